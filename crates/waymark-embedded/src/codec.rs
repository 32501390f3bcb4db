//! Binary layout of a stored log record (format 2, little endian):
//!
//! ```text
//! timestamp i64 | key_len u32 | key | headers u32 |
//! (name_len u32 | name | value_len u32 | value)* | value_len u32 | value
//! ```
//!
//! A length of `u32::MAX` stands for an absent (null) key, header value or
//! value. Header names are stored as bytes: a Kafka client may send names
//! of any bytes and any length, and they come back exactly as sent.
//!
//! Format 1 (before the Kafka-protocol broker) stored the header name length
//! as `u16`, had no null header values and took the value as the rest of
//! the bytes; [`decode_v1`] reads it so that an older log is migrated on
//! open (see `log.rs`).

use waymark_runtime::Record;

/// The format written by this version.
pub(crate) const FORMAT: u32 = 2;

const NONE: u32 = u32::MAX;

/// A record as it is stored, bytes exactly as they were appended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredRecord {
    /// Append time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Key, `None` when null.
    pub key: Option<Vec<u8>>,
    /// Value, `None` when null (a tombstone).
    pub value: Option<Vec<u8>>,
    /// Headers in order; names of any bytes, values possibly null.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl StoredRecord {
    /// Bytes of key, value and headers (what record size limits count).
    pub fn payload_len(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }

    /// The runtime's view: header names as text (lossy), a null value as
    /// `None`.
    pub(crate) fn into_record(self, partition: u32, offset: u64) -> Record {
        Record {
            partition,
            offset,
            key: self.key,
            value: self.value,
            headers: self
                .headers
                .into_iter()
                .map(|(n, v)| {
                    (
                        String::from_utf8(n)
                            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                        v.unwrap_or_default(),
                    )
                })
                .collect(),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            // Records are bounded far below 4 GiB by the writers' limits.
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        None => out.extend_from_slice(&NONE.to_le_bytes()),
    }
}

/// Encodes everything but partition and offset (they are the table and key).
pub(crate) fn encode<'a, N, H>(
    timestamp_ms: i64,
    key: Option<&[u8]>,
    headers: H,
    value: Option<&[u8]>,
) -> Vec<u8>
where
    N: AsRef<[u8]> + 'a + ?Sized,
    H: IntoIterator<Item = (&'a N, Option<&'a [u8]>)> + Clone,
{
    let headers_len: usize = headers
        .clone()
        .into_iter()
        .map(|(n, v)| 8 + n.as_ref().len() + v.map_or(0, <[u8]>::len))
        .sum();
    let mut out = Vec::with_capacity(
        20 + key.map_or(0, <[u8]>::len) + headers_len + value.map_or(0, <[u8]>::len),
    );
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    put_bytes(&mut out, key);
    let count = headers.clone().into_iter().count() as u32;
    out.extend_from_slice(&count.to_le_bytes());
    for (name, v) in headers {
        put_bytes(&mut out, Some(name.as_ref()));
        put_bytes(&mut out, v);
    }
    put_bytes(&mut out, value);
    out
}

/// Encodes a [`StoredRecord`] with the given append time.
pub fn encode_stored(timestamp_ms: i64, r: &StoredRecord) -> Vec<u8> {
    encode(
        timestamp_ms,
        r.key.as_deref(),
        r.headers.iter().map(|(n, v)| (n.as_slice(), v.as_deref())),
        r.value.as_deref(),
    )
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i64(&mut self) -> Option<i64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(i64::from_le_bytes(a))
    }

    fn bytes(&mut self) -> Option<Option<Vec<u8>>> {
        match self.u32()? {
            NONE => Some(None),
            n => Some(Some(self.take(n as usize)?.to_vec())),
        }
    }
}

/// The append timestamp of a stored record (the same in both formats).
pub(crate) fn timestamp(bytes: &[u8]) -> Option<i64> {
    Reader { buf: bytes }.i64()
}

/// Decodes a stored record; `None` if the bytes are not a record.
pub fn decode(bytes: &[u8]) -> Option<StoredRecord> {
    let mut r = Reader { buf: bytes };
    let timestamp_ms = r.i64()?;
    let key = r.bytes()?;
    let n = r.u32()?;
    let mut headers = Vec::with_capacity(n.min(64) as usize);
    for _ in 0..n {
        let name = r.bytes()??;
        headers.push((name, r.bytes()?));
    }
    let value = r.bytes()?;
    r.buf.is_empty().then_some(StoredRecord {
        timestamp_ms,
        key,
        value,
        headers,
    })
}

/// Decodes a record of format 1; `None` if the bytes are not one.
pub fn decode_v1(bytes: &[u8]) -> Option<StoredRecord> {
    let mut r = Reader { buf: bytes };
    let timestamp_ms = r.i64()?;
    let key = match r.u32()? {
        NONE => None,
        n => Some(r.take(n as usize)?.to_vec()),
    };
    let n = r.u32()?;
    let mut headers = Vec::with_capacity(n.min(64) as usize);
    for _ in 0..n {
        let len = r.u16()? as usize;
        let name = r.take(len)?.to_vec();
        let len = r.u32()? as usize;
        headers.push((name, Some(r.take(len)?.to_vec())));
    }
    Some(StoredRecord {
        timestamp_ms,
        key,
        value: Some(r.buf.to_vec()),
        headers,
    })
}

/// The runtime's view of stored bytes that do not decode: the raw bytes as
/// the value and a `waymark.log.corrupt` header saying why, so the record
/// reaches a processor (which dead-letters it, since it is not an event)
/// instead of stopping it.
pub(crate) fn corrupt(partition: u32, offset: u64, bytes: &[u8]) -> Record {
    Record {
        partition,
        offset,
        key: None,
        value: Some(bytes.to_vec()),
        headers: vec![(
            CORRUPT_HEADER.to_owned(),
            format!("stored record at offset {offset} does not decode").into_bytes(),
        )],
        timestamp_ms: timestamp(bytes).unwrap_or(0),
    }
}

/// Header set on records whose stored bytes do not decode.
pub const CORRUPT_HEADER: &str = "waymark.log.corrupt";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = StoredRecord {
            timestamp_ms: 42,
            key: Some(b"k".to_vec()),
            value: Some(b"value".to_vec()),
            headers: vec![
                (b"a".to_vec(), Some(b"1".to_vec())),
                (b"a".to_vec(), Some(b"2".to_vec())),
                (vec![0xff, 0xfe], None),
                (vec![b'n'; 70_000], Some(vec![])),
            ],
        };
        let bytes = encode_stored(42, &r);
        assert_eq!(decode(&bytes), Some(r.clone()));
        assert_eq!(timestamp(&bytes), Some(42));
        let view = r.into_record(3, 7);
        assert_eq!((view.partition, view.offset), (3, 7));
        assert_eq!(view.headers[2].0, "\u{fffd}\u{fffd}");
        assert_eq!(view.headers[3].0.len(), 70_000);

        let empty = StoredRecord {
            timestamp_ms: 1,
            ..StoredRecord::default()
        };
        assert_eq!(decode(&encode_stored(1, &empty)), Some(empty));
        assert!(decode(&[1, 2]).is_none());
        // Trailing bytes are not a record.
        let mut long = encode_stored(1, &StoredRecord::default());
        long.push(0);
        assert!(decode(&long).is_none());
    }

    #[test]
    fn format_1_is_read() {
        // ts=5, key "k", one header ("h", "v"), value "x".
        let mut v1 = Vec::new();
        v1.extend_from_slice(&5i64.to_le_bytes());
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.push(b'k');
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.push(b'h');
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.push(b'v');
        v1.push(b'x');
        let r = decode_v1(&v1).unwrap();
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r.headers, vec![(b"h".to_vec(), Some(b"v".to_vec()))]);
        assert_eq!(r.value.as_deref(), Some(&b"x"[..]));
    }
}
