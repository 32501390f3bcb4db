//! Binary layout of a stored log record:
//! `timestamp i64 | key_len u32 (u32::MAX = none) | key | headers u32 |
//! (name_len u16 | name | value_len u32 | value)* | value...` (little endian).

use waymark_runtime::Record;

/// Encodes everything but partition and offset (they are the table and key).
pub(crate) fn encode(
    timestamp_ms: i64,
    key: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
    value: &[u8],
) -> Vec<u8> {
    let headers_len: usize = headers.iter().map(|(n, v)| 6 + n.len() + v.len()).sum();
    let mut out = Vec::with_capacity(16 + key.map_or(0, <[u8]>::len) + headers_len + value.len());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    match key {
        Some(k) => {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k);
        }
        None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
    }
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (name, v) in headers {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out.extend_from_slice(value);
    out
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
}

/// The append timestamp of a stored record.
pub(crate) fn timestamp(bytes: &[u8]) -> Option<i64> {
    Reader { buf: bytes }.i64()
}

/// Decodes a stored record; `None` if the bytes are not a record.
pub(crate) fn decode(partition: u32, offset: u64, bytes: &[u8]) -> Option<Record> {
    let mut r = Reader { buf: bytes };
    let timestamp_ms = r.i64()?;
    let key = match r.u32()? {
        u32::MAX => None,
        n => Some(r.take(n as usize)?.to_vec()),
    };
    let n = r.u32()?;
    let mut headers = Vec::with_capacity(n.min(64) as usize);
    for _ in 0..n {
        let len = r.u16()? as usize;
        let name = String::from_utf8_lossy(r.take(len)?).into_owned();
        let len = r.u32()? as usize;
        headers.push((name, r.take(len)?.to_vec()));
    }
    Some(Record {
        partition,
        offset,
        key,
        value: Some(r.buf.to_vec()),
        headers,
        timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let headers = vec![("a".to_string(), b"1".to_vec()), ("bb".to_string(), vec![])];
        let bytes = encode(42, Some(b"k"), &headers, b"value");
        let r = decode(3, 7, &bytes).unwrap();
        assert_eq!(r.timestamp_ms, 42);
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r.headers, headers);
        assert_eq!(r.value.as_deref(), Some(&b"value"[..]));
        assert_eq!((r.partition, r.offset), (3, 7));
        let none = decode(0, 0, &encode(1, None, &[], b"")).unwrap();
        assert_eq!(none.key, None);
        assert!(decode(0, 0, &[1, 2]).is_none());
    }
}
