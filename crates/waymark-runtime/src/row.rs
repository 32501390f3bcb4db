//! How rows are stored: every row carries the encoding of the state it
//! holds.
//!
//! A processor's stored state is its Rust types encoded with `postcard`,
//! which is compact and fast but not self-describing: a row written by one
//! shape of a type does not decode (or decodes wrongly) as another. So every
//! processor declares a **state encoding** number
//! ([`crate::plugin::ProcessorFactory::state_encoding`]) that its crate
//! raises whenever the stored shape of any of its rows changes, and every
//! row starts with it:
//!
//! ```text
//! 0xE7 | encoding (postcard varint u32) | the value (postcard)
//! ```
//!
//! The catalog records, per projection version, the encoding its rows were
//! written with ([`crate::catalog::VersionInfo::encoding`]). A build whose
//! encoding differs cannot read that version: the controller detects it at
//! start-up and says to raise `projection_version` (which rebuilds the
//! projection from the log in the new encoding), and a row read anyway is
//! [`StoreError::Encoding`], never a silently wrong value. The golden
//! stored bytes of every processor's fixtures
//! (`waymark_foldtest::assert_stored_encoding`) catch, in CI, a changed
//! type whose encoding number was not raised.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::StoreError;

/// The first byte of every stored row.
pub const ROW_MAGIC: u8 = 0xE7;

/// Encodes `value` as a row of state encoding `encoding`.
pub fn encode_row<T: Serialize>(encoding: u32, value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(ROW_MAGIC);
    // postcard cannot fail on the plain data types used for rows (no maps
    // with non-serializable keys, no unsized sequences); extending a Vec
    // cannot fail either.
    if let Ok(out) = postcard::to_extend(&encoding, out) {
        if let Ok(out) = postcard::to_extend(value, out) {
            return out;
        }
    }
    Vec::new()
}

/// A row's state encoding and its value bytes; `None` when the row does not
/// start with a row header (it was written before rows carried one, or is
/// not a row).
pub fn row_payload(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let rest = bytes.strip_prefix(&[ROW_MAGIC])?;
    postcard::take_from_bytes::<u32>(rest).ok()
}

/// Decodes a row of `table` stored under `key`, which must be of state
/// encoding `encoding`.
pub fn decode_row<T: DeserializeOwned>(
    encoding: u32,
    table: &str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let (found, payload) = check_encoding(encoding, table, key, bytes)?;
    debug_assert_eq!(found, encoding);
    postcard::from_bytes(payload).map_err(|e| StoreError::Corrupt {
        table: table.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// The value bytes of a row that must be of state encoding `encoding`.
pub fn check_encoding<'a>(
    encoding: u32,
    table: &str,
    key: &str,
    bytes: &'a [u8],
) -> Result<(u32, &'a [u8]), StoreError> {
    match row_payload(bytes) {
        Some((found, payload)) if found == encoding => Ok((found, payload)),
        found => Err(StoreError::Encoding {
            table: table.to_owned(),
            key: key.to_owned(),
            found: found.map(|(f, _)| f),
            expected: encoding,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_carry_their_encoding() {
        let bytes = encode_row(3, &(7u32, "x".to_owned()));
        assert_eq!(bytes[..2], [ROW_MAGIC, 3]);
        assert_eq!(row_payload(&bytes).map(|(e, _)| e), Some(3));
        let value: (u32, String) = decode_row(3, "t", "k", &bytes).unwrap();
        assert_eq!(value, (7, "x".to_owned()));
    }

    #[test]
    fn a_row_of_another_encoding_is_an_encoding_error_naming_both() {
        let bytes = encode_row(1, &5u64);
        let err = decode_row::<u64>(2, "journey_v1", "p", &bytes).unwrap_err();
        assert!(matches!(
            err,
            StoreError::Encoding {
                found: Some(1),
                expected: 2,
                ..
            }
        ));
        let text = err.to_string();
        assert!(
            text.contains("encoding 1") && text.contains("encoding 2"),
            "{text}"
        );
        assert!(text.contains("projection_version"), "{text}");
    }

    #[test]
    fn a_row_without_a_header_is_an_encoding_error() {
        let legacy = postcard::to_stdvec(&5u64).unwrap();
        let err = decode_row::<u64>(1, "t", "k", &legacy).unwrap_err();
        assert!(matches!(err, StoreError::Encoding { found: None, .. }));
        assert!(row_payload(&[]).is_none());
        assert!(row_payload(&[ROW_MAGIC]).is_none());
    }

    #[test]
    fn large_encodings_round_trip() {
        let bytes = encode_row(u32::MAX, &());
        assert_eq!(row_payload(&bytes).map(|(e, _)| e), Some(u32::MAX));
    }
}
