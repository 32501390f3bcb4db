//! Kafka record batches (format v2, "magic 2") in and out of the log.
//!
//! Requests and responses are decoded and encoded by the `kafka-protocol`
//! crate; this module handles only the record batches they carry as bytes.
//! It does not use that crate's `Record` type because it keeps header names
//! as UTF-8 strings in a map: a name of other bytes is refused and repeated
//! names collapse, while Kafka's record format carries header names as
//! bytes, in order, repeatable. Varints come from `prost` (Kafka's are protobuf's zig-zag
//! varints), CRC-32C
//! from `crc32c`, and decompression from the same libraries `kafka-protocol`
//! uses (flate2, snap, lz4, zstd), each bounded so that a small compressed
//! batch cannot expand without limit.
//!
//! Layout of a batch (big endian):
//! `base_offset i64 | batch_length i32 | partition_leader_epoch i32 |
//! magic i8 | crc u32 | attributes i16 | last_offset_delta i32 |
//! base_timestamp i64 | max_timestamp i64 | producer_id i64 |
//! producer_epoch i16 | base_sequence i32 | record_count i32 | records`,
//! the CRC covering everything from `attributes` on.

use std::io::Read;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{decode_varint, encode_varint};
use waymark_embedded::StoredRecord;

/// Bytes before `records` in a batch.
const BATCH_HEADER: usize = 61;
/// Bytes of `base_offset` and `batch_length`, not counted in the length.
const LOG_OVERHEAD: usize = 12;
/// Offset of the CRC-covered part.
const CRC_START: usize = 21;

const ATTR_COMPRESSION: i16 = 0x07;
const ATTR_LOG_APPEND_TIME: i16 = 0x08;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;

/// Why a batch was refused, each with the Kafka error it is answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Bad CRC, bad framing or a record that does not parse:
    /// `CORRUPT_MESSAGE`.
    #[error("corrupt record batch: {0}")]
    Corrupt(String),
    /// Not format v2: `UNSUPPORTED_FOR_MESSAGE_FORMAT`.
    #[error("record batch format (magic) {0} is not supported; only 2 is")]
    Magic(i8),
    /// A batch or record larger than the topic allows: `MESSAGE_TOO_LARGE`.
    #[error("{0}")]
    TooLarge(String),
    /// Transactional or control batches: `INVALID_RECORD`.
    #[error("{0}")]
    Unsupported(String),
}

/// A decoded batch from a producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Producer id, -1 when not idempotent.
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
    /// Sequence of the first record, -1 when not idempotent.
    pub base_sequence: i32,
    /// The records (their timestamps are the producer's; the log stamps its
    /// own append time).
    pub records: Vec<StoredRecord>,
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest batch, as sent (Kafka's `max.message.bytes`), and largest
    /// record payload after decompression.
    pub max_message_bytes: usize,
    /// Largest decompressed size of one batch.
    pub max_decompressed_bytes: usize,
}

fn corrupt(what: impl Into<String>) -> BatchError {
    BatchError::Corrupt(what.into())
}

/// Decodes every batch in `buf` (the `records` of one partition of a
/// produce request).
pub fn decode_batches(mut buf: Bytes, limits: Limits) -> Result<Vec<Batch>, BatchError> {
    let mut out = Vec::new();
    if buf.is_empty() {
        return Err(corrupt("no record batch"));
    }
    while !buf.is_empty() {
        if buf.len() < LOG_OVERHEAD {
            return Err(corrupt("truncated batch header"));
        }
        let length = i32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let length = usize::try_from(length).map_err(|_| corrupt("negative batch length"))?;
        let total = LOG_OVERHEAD + length;
        if total > limits.max_message_bytes + LOG_OVERHEAD {
            return Err(BatchError::TooLarge(format!(
                "record batch of {total} bytes is larger than the topic's maximum of {} bytes",
                limits.max_message_bytes
            )));
        }
        if buf.len() < total || total < BATCH_HEADER {
            return Err(corrupt(format!(
                "batch length {length} does not match the {} bytes sent",
                buf.len()
            )));
        }
        out.push(decode_batch(buf.split_to(total), limits)?);
    }
    Ok(out)
}

fn decode_batch(batch: Bytes, limits: Limits) -> Result<Batch, BatchError> {
    let magic = batch[16] as i8;
    if magic != 2 {
        return Err(BatchError::Magic(magic));
    }
    let crc = u32::from_be_bytes([batch[17], batch[18], batch[19], batch[20]]);
    if crc32c::crc32c(&batch[CRC_START..]) != crc {
        return Err(corrupt("CRC-32C mismatch"));
    }
    let mut h = batch.slice(CRC_START..BATCH_HEADER);
    let attributes = h.get_i16();
    let _last_offset_delta = h.get_i32();
    let _base_timestamp = h.get_i64();
    let _max_timestamp = h.get_i64();
    let producer_id = h.get_i64();
    let producer_epoch = h.get_i16();
    let base_sequence = h.get_i32();
    let count = h.get_i32();
    if attributes & ATTR_CONTROL != 0 {
        return Err(BatchError::Unsupported(
            "control batches are written by brokers, not producers".into(),
        ));
    }
    if attributes & ATTR_TRANSACTIONAL != 0 {
        return Err(BatchError::Unsupported(
            "transactions are not supported by waymark dev".into(),
        ));
    }
    let count = usize::try_from(count).map_err(|_| corrupt("negative record count"))?;
    if count == 0 {
        return Err(corrupt("a batch without records"));
    }
    let body = batch.slice(BATCH_HEADER..);
    let mut records_buf = decompress(attributes & ATTR_COMPRESSION, body, limits)?;
    let mut records = Vec::with_capacity(count.min(100_000));
    for i in 0..count {
        let record = decode_record(&mut records_buf)
            .map_err(|e| corrupt(format!("record {i} of {count}: {e}")))?;
        if record.payload_len() > limits.max_message_bytes {
            return Err(BatchError::TooLarge(format!(
                "a record of {} bytes is larger than the topic's maximum of {} bytes",
                record.payload_len(),
                limits.max_message_bytes
            )));
        }
        records.push(record);
    }
    if !records_buf.is_empty() {
        return Err(corrupt(format!(
            "{} bytes after the last of {count} records",
            records_buf.len()
        )));
    }
    Ok(Batch {
        producer_id,
        producer_epoch,
        base_sequence,
        records,
    })
}

fn bounded(reader: impl Read, limit: usize, what: &str) -> Result<Bytes, BatchError> {
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| corrupt(format!("{what}: {e}")))?;
    if out.len() > limit {
        return Err(BatchError::TooLarge(format!(
            "a {what} batch decompresses to more than {limit} bytes"
        )));
    }
    Ok(out.into())
}

/// The xerial framing Kafka's Java client uses for snappy.
const SNAPPY_XERIAL: &[u8] = b"\x82SNAPPY\x00";

fn decompress(codec: i16, body: Bytes, limits: Limits) -> Result<Bytes, BatchError> {
    let limit = limits.max_decompressed_bytes;
    match codec {
        0 => Ok(body),
        1 => bounded(flate2::read::MultiGzDecoder::new(&body[..]), limit, "gzip"),
        2 => {
            let mut out = Vec::new();
            let mut push = |block: &[u8]| -> Result<(), BatchError> {
                let len = snap::raw::decompress_len(block)
                    .map_err(|e| corrupt(format!("snappy: {e}")))?;
                if out.len() + len > limit {
                    return Err(BatchError::TooLarge(format!(
                        "a snappy batch decompresses to more than {limit} bytes"
                    )));
                }
                let start = out.len();
                out.resize(start + len, 0);
                snap::raw::Decoder::new()
                    .decompress(block, &mut out[start..])
                    .map_err(|e| corrupt(format!("snappy: {e}")))?;
                Ok(())
            };
            if body.starts_with(SNAPPY_XERIAL) && body.len() >= 16 {
                let mut rest = &body[16..];
                while !rest.is_empty() {
                    if rest.len() < 4 {
                        return Err(corrupt("snappy: truncated block length"));
                    }
                    let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    let block = rest
                        .get(4..4 + n)
                        .ok_or_else(|| corrupt("snappy: truncated block"))?;
                    push(block)?;
                    rest = &rest[4 + n..];
                }
            } else {
                push(&body)?;
            }
            Ok(out.into())
        }
        3 => {
            let decoder = lz4::Decoder::new(&body[..]).map_err(|e| corrupt(format!("lz4: {e}")))?;
            bounded(decoder, limit, "lz4")
        }
        4 => {
            let decoder = zstd::stream::read::Decoder::new(&body[..])
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            bounded(decoder, limit, "zstd")
        }
        other => Err(corrupt(format!("unknown compression codec {other}"))),
    }
}

// Kafka's varints are protobuf's `sint32`/`sint64`: zig-zag, then LEB128.

fn varlong(buf: &mut Bytes) -> Result<i64, String> {
    let v = decode_varint(buf).map_err(|e| e.to_string())?;
    Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
}

fn varint(buf: &mut Bytes) -> Result<i32, String> {
    let v = varlong(buf)?;
    i32::try_from(v).map_err(|_| format!("varint {v} out of range"))
}

fn take(buf: &mut Bytes, len: i32, what: &str) -> Result<Option<Vec<u8>>, String> {
    match len {
        -1 => Ok(None),
        n if n < -1 => Err(format!("negative {what} length {n}")),
        n => {
            let n = n as usize;
            if buf.len() < n {
                return Err(format!("{what} of {n} bytes is truncated"));
            }
            Ok(Some(buf.split_to(n).to_vec()))
        }
    }
}

fn decode_record(buf: &mut Bytes) -> Result<StoredRecord, String> {
    let size = varint(buf)?;
    let size = usize::try_from(size).map_err(|_| format!("negative record size {size}"))?;
    if buf.len() < size {
        return Err(format!("record of {size} bytes is truncated"));
    }
    let mut r = buf.split_to(size);
    if r.is_empty() {
        return Err("empty record".into());
    }
    let _attributes = r.get_i8();
    let _timestamp_delta = varlong(&mut r)?;
    let _offset_delta = varint(&mut r)?;
    let len = varint(&mut r)?;
    let key = take(&mut r, len, "key")?;
    let len = varint(&mut r)?;
    let value = take(&mut r, len, "value")?;
    let n = varint(&mut r)?;
    let n = usize::try_from(n).map_err(|_| format!("negative header count {n}"))?;
    let mut headers = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let len = varint(&mut r)?;
        let name =
            take(&mut r, len, "header name")?.ok_or_else(|| "null header name".to_owned())?;
        let len = varint(&mut r)?;
        headers.push((name, take(&mut r, len, "header value")?));
    }
    if !r.is_empty() {
        return Err(format!("{} bytes after the record's headers", r.len()));
    }
    Ok(StoredRecord {
        timestamp_ms: 0,
        key,
        value,
        headers,
    })
}

fn put_varlong(buf: &mut BytesMut, v: i64) {
    encode_varint(((v << 1) ^ (v >> 63)) as u64, buf);
}

fn put_varint(buf: &mut BytesMut, v: i32) {
    put_varlong(buf, i64::from(v));
}

fn put_bytes(buf: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            put_varint(buf, b.len() as i32);
            buf.put_slice(b);
        }
        None => put_varint(buf, -1),
    }
}

/// Appends one uncompressed batch of `records` (consecutive offsets from
/// `base_offset`, all with one log append time) to `out`.
pub fn encode_batch(out: &mut BytesMut, base_offset: u64, records: &[StoredRecord]) {
    let Some(first) = records.first() else {
        return;
    };
    let timestamp = first.timestamp_ms;
    let mut body = BytesMut::new();
    for (delta, r) in records.iter().enumerate() {
        let mut rec = BytesMut::new();
        rec.put_i8(0);
        put_varlong(&mut rec, 0);
        put_varint(&mut rec, delta as i32);
        put_bytes(&mut rec, r.key.as_deref());
        put_bytes(&mut rec, r.value.as_deref());
        put_varint(&mut rec, r.headers.len() as i32);
        for (name, value) in &r.headers {
            put_bytes(&mut rec, Some(name));
            put_bytes(&mut rec, value.as_deref());
        }
        put_varint(&mut body, rec.len() as i32);
        body.put_slice(&rec);
    }
    let mut crc_part = BytesMut::with_capacity(BATCH_HEADER - CRC_START + body.len());
    crc_part.put_i16(ATTR_LOG_APPEND_TIME);
    crc_part.put_i32(records.len() as i32 - 1);
    crc_part.put_i64(timestamp);
    crc_part.put_i64(timestamp);
    crc_part.put_i64(-1); // producer id
    crc_part.put_i16(-1); // producer epoch
    crc_part.put_i32(-1); // base sequence
    crc_part.put_i32(records.len() as i32);
    crc_part.put_slice(&body);
    let length = (BATCH_HEADER - LOG_OVERHEAD) + body.len();
    out.put_i64(base_offset as i64);
    out.put_i32(length as i32);
    out.put_i32(0); // partition leader epoch
    out.put_i8(2);
    out.put_u32(crc32c::crc32c(&crc_part));
    out.put_slice(&crc_part);
}

/// Encodes records read from the log (`(offset, record)`, consecutive) as
/// batches, one per run of records sharing an append time.
pub fn encode_fetched(records: &[(u64, StoredRecord)]) -> Bytes {
    let mut out = BytesMut::new();
    let mut start = 0;
    while start < records.len() {
        let ts = records[start].1.timestamp_ms;
        let mut end = start + 1;
        while end < records.len()
            && records[end].1.timestamp_ms == ts
            && records[end].0 == records[end - 1].0 + 1
        {
            end += 1;
        }
        let run: Vec<StoredRecord> = records[start..end].iter().map(|(_, r)| r.clone()).collect();
        encode_batch(&mut out, records[start].0, &run);
        start = end;
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LIMITS: Limits = Limits {
        max_message_bytes: 1 << 20,
        max_decompressed_bytes: 4 << 20,
    };

    fn record(key: &str, value: &str) -> StoredRecord {
        StoredRecord {
            timestamp_ms: 1000,
            key: Some(key.as_bytes().to_vec()),
            value: Some(value.as_bytes().to_vec()),
            headers: vec![
                (b"h".to_vec(), Some(b"1".to_vec())),
                (b"h".to_vec(), Some(b"2".to_vec())),
                (vec![0xff, 0x00], None),
            ],
        }
    }

    #[test]
    fn batches_round_trip_with_raw_headers() {
        let records = vec![record("a", "1"), record("b", "2")];
        let mut buf = BytesMut::new();
        encode_batch(&mut buf, 7, &records);
        let batches = decode_batches(buf.freeze(), LIMITS).unwrap();
        assert_eq!(batches.len(), 1);
        let mut expected = records.clone();
        for r in &mut expected {
            r.timestamp_ms = 0;
        }
        assert_eq!(batches[0].records, expected);
        assert_eq!(batches[0].producer_id, -1);
    }

    #[test]
    fn the_library_decodes_what_we_encode() {
        // kafka-protocol's own decoder agrees on the framing (it only
        // accepts UTF-8 header names, so use those here).
        let mut r = record("k", "v");
        r.headers = vec![(b"name".to_vec(), Some(b"x".to_vec()))];
        let fetched = vec![
            (3, r.clone()),
            (4, r.clone()),
            (
                5,
                StoredRecord {
                    timestamp_ms: 2000,
                    ..r
                },
            ),
        ];
        let mut bytes = encode_fetched(&fetched);
        let sets = kafka_protocol::records::RecordBatchDecoder::decode_all(&mut bytes).unwrap();
        let offsets: Vec<i64> = sets
            .iter()
            .flat_map(|s| s.records.iter().map(|r| r.offset))
            .collect();
        assert_eq!(offsets, vec![3, 4, 5]);
        assert_eq!(sets.len(), 2, "one batch per append time");
        assert_eq!(sets[1].records[0].timestamp, 2000);
    }

    #[test]
    fn corrupt_and_oversized_batches_are_refused() {
        let mut buf = BytesMut::new();
        encode_batch(&mut buf, 0, &[record("a", "1")]);
        let good = buf.freeze();
        let mut bad = good.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(matches!(
            decode_batches(Bytes::from(bad), LIMITS),
            Err(BatchError::Corrupt(_))
        ));
        assert!(matches!(
            decode_batches(good.slice(..good.len() - 1), LIMITS),
            Err(BatchError::Corrupt(_))
        ));
        let mut magic = good.to_vec();
        magic[16] = 1;
        assert_eq!(
            decode_batches(Bytes::from(magic), LIMITS),
            Err(BatchError::Magic(1))
        );
        let small = Limits {
            max_message_bytes: 20,
            max_decompressed_bytes: 100,
        };
        assert!(matches!(
            decode_batches(good, small),
            Err(BatchError::TooLarge(_))
        ));
    }

    #[test]
    fn compressed_batches_decode_within_bounds() {
        // Build a gzip batch with kafka-protocol's encoder (UTF-8 headers).
        use kafka_protocol::records::{
            Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
        };
        let records: Vec<Record> = (0..100)
            .map(|i| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: 0,
                producer_id: 5,
                producer_epoch: 0,
                timestamp_type: TimestampType::Creation,
                offset: i,
                sequence: i as i32,
                timestamp: 0,
                key: Some(Bytes::from_static(b"key")),
                value: Some(Bytes::from(vec![b'x'; 1000])),
                headers: Default::default(),
            })
            .collect();
        for compression in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let mut buf = BytesMut::new();
            RecordBatchEncoder::encode(
                &mut buf,
                &records,
                &RecordEncodeOptions {
                    version: 2,
                    compression,
                },
            )
            .unwrap();
            let bytes = buf.freeze();
            let batches = decode_batches(bytes.clone(), LIMITS).unwrap();
            assert_eq!(batches[0].records.len(), 100, "{compression:?}");
            assert_eq!(batches[0].producer_id, 5);
            let tight = Limits {
                max_message_bytes: 1 << 20,
                max_decompressed_bytes: 50_000,
            };
            assert!(
                matches!(decode_batches(bytes, tight), Err(BatchError::TooLarge(_))),
                "{compression:?} must be bounded"
            );
        }
    }

    proptest::proptest! {
        /// Any bytes are a batch or a refusal, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = decode_batches(Bytes::from(bytes), LIMITS);
        }

        /// A valid batch with bytes changed after the CRC, and the CRC fixed
        /// up so that parsing goes deep, is still a batch or a refusal.
        #[test]
        fn damaged_batches_with_a_good_crc_never_panic(
            changes in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 1..8),
            cut in 0usize..400,
        ) {
            let mut buf = BytesMut::new();
            encode_batch(&mut buf, 0, &[record("a", "1"), record("b", "22")]);
            let mut bytes = buf.to_vec();
            for (at, v) in changes {
                let at = CRC_START + at % (bytes.len() - CRC_START);
                bytes[at] = v;
            }
            bytes.truncate(bytes.len().min(BATCH_HEADER + cut));
            if bytes.len() >= BATCH_HEADER {
                let crc = crc32c::crc32c(&bytes[CRC_START..]);
                bytes[17..21].copy_from_slice(&crc.to_be_bytes());
            }
            let _ = decode_batches(Bytes::from(bytes), LIMITS);
        }
    }
}
