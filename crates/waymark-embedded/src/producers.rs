//! Idempotent-producer state, as a Kafka broker keeps it: per producer id
//! and partition, the producer's epoch and the sequence ranges of its last
//! five batches with the offsets they were appended at.
//!
//! The writer thread checks every idempotent batch against this state and
//! updates it in the same transaction as the append, so after a crash the
//! state matches the log exactly: a retry of a batch that was appended
//! (before or after the crash) is answered with its first offset and not
//! appended again, and a gap in sequence numbers is refused.

use std::collections::{HashMap, VecDeque};

/// Batches remembered per producer and partition (Kafka keeps five, the
/// most a producer may have in flight).
pub(crate) const REMEMBERED_BATCHES: usize = 5;

/// Producer state not written for this long is forgotten on open (Kafka's
/// `producer.id.expiration.ms` is one day; a week is more forgiving for a
/// laptop that sleeps).
pub(crate) const EXPIRY_MS: i64 = 7 * 24 * 3600 * 1000;

/// An idempotent producer's batch: who sent it and its sequence range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    /// Producer id (from `InitProducerId`).
    pub producer_id: i64,
    /// Producer epoch.
    pub epoch: i16,
    /// Sequence number of the batch's first record.
    pub first_sequence: i32,
    /// Records in the batch (at least 1).
    pub count: i32,
}

impl ProducerBatch {
    fn last_sequence(&self) -> i32 {
        wrapping_seq(self.first_sequence, self.count - 1)
    }
}

/// Kafka sequence numbers wrap from `i32::MAX` to 0.
fn wrapping_seq(seq: i32, plus: i32) -> i32 {
    let next = i64::from(seq) + i64::from(plus);
    (next % (i64::from(i32::MAX) + 1)) as i32
}

/// Why an idempotent batch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceRefusal {
    /// The batch's first sequence is not the next expected one.
    OutOfOrder {
        /// The sequence the broker expected.
        expected: i32,
    },
    /// The epoch is older than the producer's current one (a zombie).
    StaleEpoch {
        /// The current epoch.
        current: i16,
    },
}

/// What the state says about a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Append it.
    Append,
    /// Already appended at this first offset: answer that, append nothing.
    Duplicate(u64),
    /// Refuse it.
    Refuse(SequenceRefusal),
}

/// State of one producer on one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Entry {
    pub(crate) epoch: i16,
    /// `(first_sequence, last_sequence, first_offset)`, oldest first.
    pub(crate) batches: VecDeque<(i32, i32, u64)>,
    pub(crate) last_write_ms: i64,
}

impl Entry {
    pub(crate) fn check(&self, batch: &ProducerBatch) -> Check {
        if batch.epoch < self.epoch {
            return Check::Refuse(SequenceRefusal::StaleEpoch {
                current: self.epoch,
            });
        }
        if batch.epoch > self.epoch || self.batches.is_empty() {
            // A new epoch (or a partition this producer never wrote)
            // starts at sequence 0.
            return if batch.first_sequence == 0 {
                Check::Append
            } else {
                Check::Refuse(SequenceRefusal::OutOfOrder { expected: 0 })
            };
        }
        let last = batch.last_sequence();
        if let Some(&(_, _, offset)) = self
            .batches
            .iter()
            .find(|(first, end, _)| *first == batch.first_sequence && *end == last)
        {
            return Check::Duplicate(offset);
        }
        let expected = self
            .batches
            .back()
            .map_or(0, |(_, end, _)| wrapping_seq(*end, 1));
        if batch.first_sequence == expected {
            Check::Append
        } else {
            Check::Refuse(SequenceRefusal::OutOfOrder { expected })
        }
    }

    pub(crate) fn record(&mut self, batch: &ProducerBatch, first_offset: u64, now_ms: i64) {
        if batch.epoch != self.epoch {
            self.epoch = batch.epoch;
            self.batches.clear();
        }
        self.batches
            .push_back((batch.first_sequence, batch.last_sequence(), first_offset));
        while self.batches.len() > REMEMBERED_BATCHES {
            self.batches.pop_front();
        }
        self.last_write_ms = now_ms;
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(11 + self.batches.len() * 16);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.last_write_ms.to_le_bytes());
        out.push(self.batches.len() as u8);
        for (first, last, offset) in &self.batches {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&last.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let epoch = i16::from_le_bytes(bytes.get(0..2)?.try_into().ok()?);
        let last_write_ms = i64::from_le_bytes(bytes.get(2..10)?.try_into().ok()?);
        let n = usize::from(*bytes.get(10)?);
        let mut batches = VecDeque::with_capacity(n);
        for i in 0..n {
            let at = 11 + i * 16;
            let b = bytes.get(at..at + 16)?;
            batches.push_back((
                i32::from_le_bytes(b[0..4].try_into().ok()?),
                i32::from_le_bytes(b[4..8].try_into().ok()?),
                u64::from_le_bytes(b[8..16].try_into().ok()?),
            ));
        }
        Some(Self {
            epoch,
            batches,
            last_write_ms,
        })
    }
}

/// Key of a producer's state on a partition.
pub(crate) type Key = (i64, String, u32);

/// The table key of a [`Key`].
pub(crate) fn key_text(key: &Key) -> String {
    format!("{}\u{0}{}\u{0}{}", key.0, key.1, key.2)
}

/// Parses a table key written by [`key_text`].
pub(crate) fn parse_key(text: &str) -> Option<Key> {
    let mut parts = text.split('\u{0}');
    let pid = parts.next()?.parse().ok()?;
    let topic = parts.next()?.to_owned();
    let partition = parts.next()?.parse().ok()?;
    Some((pid, topic, partition))
}

/// Every producer's state, owned by the writer thread.
#[derive(Debug, Default)]
pub(crate) struct Producers {
    pub(crate) entries: HashMap<Key, Entry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(epoch: i16, first: i32, count: i32) -> ProducerBatch {
        ProducerBatch {
            producer_id: 7,
            epoch,
            first_sequence: first,
            count,
        }
    }

    #[test]
    fn sequences_follow_on_and_retries_are_duplicates() {
        let mut e = Entry::default();
        assert_eq!(e.check(&batch(0, 0, 3)), Check::Append);
        e.record(&batch(0, 0, 3), 100, 1);
        assert_eq!(e.check(&batch(0, 0, 3)), Check::Duplicate(100));
        assert_eq!(e.check(&batch(0, 3, 2)), Check::Append);
        e.record(&batch(0, 3, 2), 103, 2);
        assert_eq!(e.check(&batch(0, 3, 2)), Check::Duplicate(103));
        assert_eq!(e.check(&batch(0, 0, 3)), Check::Duplicate(100));
        assert_eq!(
            e.check(&batch(0, 9, 1)),
            Check::Refuse(SequenceRefusal::OutOfOrder { expected: 5 })
        );
        // Only the last five batches are remembered.
        for i in 0..5 {
            e.record(&batch(0, 5 + i, 1), 105 + i as u64, 3);
        }
        assert_eq!(e.batches.len(), REMEMBERED_BATCHES);
        assert_eq!(
            e.check(&batch(0, 0, 3)),
            Check::Refuse(SequenceRefusal::OutOfOrder { expected: 10 })
        );
    }

    #[test]
    fn epochs_fence_and_restart_sequences() {
        let mut e = Entry::default();
        e.record(&batch(1, 0, 1), 0, 1);
        assert_eq!(
            e.check(&batch(0, 1, 1)),
            Check::Refuse(SequenceRefusal::StaleEpoch { current: 1 })
        );
        assert_eq!(
            e.check(&batch(2, 5, 1)),
            Check::Refuse(SequenceRefusal::OutOfOrder { expected: 0 })
        );
        assert_eq!(e.check(&batch(2, 0, 1)), Check::Append);
        e.record(&batch(2, 0, 1), 1, 2);
        assert_eq!(e.epoch, 2);
        assert_eq!(e.batches.len(), 1);
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        let mut e = Entry::default();
        e.record(&batch(0, 0, 1), 0, 0);
        e.batches.clear();
        e.batches.push_back((i32::MAX - 1, i32::MAX, 5));
        assert_eq!(e.check(&batch(0, 0, 1)), Check::Append);
        assert_eq!(batch(0, i32::MAX, 2).last_sequence(), 0);
    }

    #[test]
    fn entries_and_keys_round_trip() {
        let mut e = Entry::default();
        e.record(&batch(3, 0, 10), 42, 99);
        e.record(&batch(3, 10, 1), 52, 100);
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        let key = (5, "waymark.inputs".to_owned(), 2);
        assert_eq!(parse_key(&key_text(&key)), Some(key));
        assert!(Entry::decode(&[1]).is_none());
    }
}
