//! Decoding each record of `waymark.events` once per process.
//!
//! Every folding processor reads the same records of `waymark.events`, and
//! each used to decode every record itself: four JSON decodes of the same
//! bytes per event in a process running the four folds (10 % of all CPU
//! samples of a rebuild in `docs/performance.md`). A [`SharedDecoder`] is
//! one per process (the [controller] gives it to every runner it starts):
//! the first runner to decode a record keeps the decoded event, and the
//! others reading the same record get the same [`Arc<Event>`].
//!
//! # Guarantees
//! - **Same result as decoding.** An entry is used only for the record it
//!   was decoded from: the same topic, partition and offset, and value
//!   bytes of the same length and the same 64-bit XXH3 fingerprint, so a
//!   topic deleted and created again (offsets start over) never serves an
//!   event of the old one. Records that do not decode are never kept: each
//!   reader rejects them itself, with its own error.
//! - **Bounded.** Entries cost an estimate of their memory (twice the
//!   value's bytes plus a fixed overhead); past the byte budget the oldest
//!   entries go first. Readers far behind the others decode again what
//!   was dropped; nothing waits for anything.
//! - **No coupling between processors.** Sharing is best effort: a runner
//!   never blocks on another, and one stopped or parked changes nothing
//!   for the rest.
//!
//! Handlers use it without knowing: [`crate::handler::decode_events`] and
//! [`crate::handler::decode_event`] look it up in the scope the runner
//! sets around [`crate::Handler::handle`] ([`scope`]); outside a scope (tests,
//! tools) they decode every record.
//!
//! [controller]: ../../waymark_control/index.html

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use waymark_core::{Event, Rejection};

use crate::log::Record;

/// The default byte budget of a [`SharedDecoder`]: 8 MiB, about 13 000
/// events of the benchmark mix.
pub const DEFAULT_DECODER_BYTES: usize = 8 << 20;

/// Fixed part of an entry's estimated cost (the event's struct, the map
/// entry and the order queue's slot).
const ENTRY_OVERHEAD: usize = 128;

/// Decoded records shared by the runners of one process.
#[derive(Debug)]
pub struct SharedDecoder {
    budget: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Entries by topic (few: `waymark.events`, a rebuild's renamed one).
    topics: Vec<(String, Entries)>,
    /// Entries in the order they were added: (topic index, partition,
    /// offset).
    order: VecDeque<(usize, u32, u64)>,
    bytes: usize,
}

/// One topic's entries by (partition, offset).
type Entries = HashMap<(u32, u64), Entry>;

#[derive(Debug)]
struct Entry {
    len: usize,
    fingerprint: u64,
    cost: usize,
    event: Arc<Event>,
}

/// What a reader gets for one record.
enum Lookup {
    Hit(Arc<Event>),
    Miss,
}

impl SharedDecoder {
    /// A decoder keeping at most about `budget` bytes of decoded events.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decodes the records of `topic` with `decode`, each at most once for
    /// all readers while it is kept. Returns one result per record, in
    /// order, and how many came from what another reader decoded.
    pub fn decode_all<F>(
        &self,
        topic: &str,
        records: &[Record],
        decode: F,
    ) -> (Vec<Result<Arc<Event>, Rejection>>, u64)
    where
        F: Fn(&Record) -> Result<Event, Rejection>,
    {
        let prints: Vec<u64> = records
            .iter()
            .map(|r| fingerprint(r.value.as_deref()))
            .collect();
        let found: Vec<Lookup> = {
            let state = self.state();
            let entries = state.entries(topic);
            records
                .iter()
                .zip(&prints)
                .map(|(r, print)| {
                    let len = r.value.as_ref().map_or(0, Vec::len);
                    match entries.and_then(|e| e.get(&(r.partition, r.offset))) {
                        Some(e) if e.len == len && e.fingerprint == *print => {
                            Lookup::Hit(e.event.clone())
                        }
                        _ => Lookup::Miss,
                    }
                })
                .collect()
        };
        let mut shared = 0;
        let mut fresh = Vec::new();
        let results: Vec<Result<Arc<Event>, Rejection>> = records
            .iter()
            .zip(found)
            .zip(&prints)
            .map(|((r, found), print)| match found {
                Lookup::Hit(event) => {
                    shared += 1;
                    Ok(event)
                }
                Lookup::Miss => {
                    let event = Arc::new(decode(r)?);
                    fresh.push((r, *print, event.clone()));
                    Ok(event)
                }
            })
            .collect();
        if !fresh.is_empty() {
            self.keep(topic, fresh);
        }
        (results, shared)
    }

    /// Adds freshly decoded events, dropping the oldest entries past the
    /// budget.
    fn keep(&self, topic: &str, fresh: Vec<(&Record, u64, Arc<Event>)>) {
        let mut state = self.state();
        let index = state.topic_index(topic);
        for (r, fingerprint, event) in fresh {
            let len = r.value.as_ref().map_or(0, Vec::len);
            let cost = 2 * len + ENTRY_OVERHEAD;
            let key = (r.partition, r.offset);
            let entry = Entry {
                len,
                fingerprint,
                cost,
                event,
            };
            if let Some(old) = state.topics[index].1.insert(key, entry) {
                // Another reader decoded it meanwhile (or the topic was
                // created again): one entry, counted once.
                state.bytes -= old.cost;
            } else {
                state.order.push_back((index, key.0, key.1));
            }
            state.bytes += cost;
        }
        while state.bytes > self.budget {
            let Some((t, partition, offset)) = state.order.pop_front() else {
                break;
            };
            if let Some(old) = state.topics[t].1.remove(&(partition, offset)) {
                state.bytes -= old.cost;
            }
        }
    }

    /// Decoded events kept now.
    pub fn len(&self) -> usize {
        self.state().topics.iter().map(|(_, e)| e.len()).sum()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The estimated bytes kept now.
    pub fn bytes(&self) -> usize {
        self.state().bytes
    }
}

impl State {
    fn entries(&self, topic: &str) -> Option<&Entries> {
        self.topics.iter().find(|(t, _)| t == topic).map(|(_, e)| e)
    }

    fn topic_index(&mut self, topic: &str) -> usize {
        match self.topics.iter().position(|(t, _)| t == topic) {
            Some(i) => i,
            None => {
                self.topics.push((topic.to_owned(), HashMap::new()));
                self.topics.len() - 1
            }
        }
    }
}

fn fingerprint(value: Option<&[u8]>) -> u64 {
    value.map_or(0, xxhash_rust::xxh3::xxh3_64)
}

/// The decoder and topic of the batch a runner is handling, and what was
/// shared in it.
#[derive(Debug)]
pub struct Scope {
    decoder: Arc<SharedDecoder>,
    topic: String,
    shared: AtomicU64,
    decoded: AtomicU64,
}

impl Scope {
    /// Records whose event came from another reader.
    pub fn shared(&self) -> u64 {
        self.shared.load(Ordering::Relaxed)
    }

    /// Records decoded here.
    pub fn decoded(&self) -> u64 {
        self.decoded.load(Ordering::Relaxed)
    }
}

tokio::task_local! {
    static SCOPE: Arc<Scope>;
}

/// Runs `handle` (a handler's batch) with `decoder` for records of `topic`;
/// returns its output and the scope's counts.
pub async fn scope<F: Future>(
    decoder: Arc<SharedDecoder>,
    topic: &str,
    handle: F,
) -> (F::Output, Arc<Scope>) {
    let scope = Arc::new(Scope {
        decoder,
        topic: topic.to_owned(),
        shared: AtomicU64::new(0),
        decoded: AtomicU64::new(0),
    });
    let output = SCOPE.scope(scope.clone(), handle).await;
    (output, scope)
}

/// Decodes `records` with `decode`, through the scope's shared decoder
/// when there is one.
pub(crate) fn decode_all<F>(records: &[Record], decode: F) -> Vec<Result<Arc<Event>, Rejection>>
where
    F: Fn(&Record) -> Result<Event, Rejection>,
{
    let scoped = SCOPE.try_with(|scope| {
        let (results, shared) = scope.decoder.decode_all(&scope.topic, records, &decode);
        scope.shared.fetch_add(shared, Ordering::Relaxed);
        scope
            .decoded
            .fetch_add(records.len() as u64 - shared, Ordering::Relaxed);
        results
    });
    match scoped {
        Ok(results) => results,
        Err(_) => records.iter().map(|r| decode(r).map(Arc::new)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waymark_core::{EventData, RejectKind};

    fn record(partition: u32, offset: u64, value: &[u8]) -> Record {
        Record {
            partition,
            offset,
            key: None,
            value: Some(value.to_vec()),
            headers: Vec::new(),
            timestamp_ms: 0,
        }
    }

    /// A stand-in decoder: the value's text is the event id; "bad" is
    /// rejected.
    fn decode(r: &Record) -> Result<Event, Rejection> {
        let id = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
        if id == "bad" {
            return Err(Rejection::new(RejectKind::MalformedJson, "bad"));
        }
        Ok(Event {
            id,
            time: chrono::DateTime::UNIX_EPOCH,
            source: None,
            person_id: None,
            data: EventData::QuizAnswered {
                course_id: "c".into(),
                quiz_id: "q".into(),
                correct: true,
            },
        })
    }

    #[test]
    fn a_second_reader_gets_the_first_readers_events() {
        let d = SharedDecoder::new(1 << 20);
        let batch = [record(0, 0, b"a"), record(0, 1, b"b"), record(1, 0, b"c")];
        let (first, shared) = d.decode_all("t", &batch, decode);
        assert_eq!(shared, 0);
        let (second, shared) = d.decode_all("t", &batch, decode);
        assert_eq!(shared, 3);
        for (a, b) in first.iter().zip(&second) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert!(Arc::ptr_eq(a, b), "the same decoded event");
        }
        // Another topic's records at the same positions are not these.
        let (_, shared) = d.decode_all("u", &batch, decode);
        assert_eq!(shared, 0);
    }

    #[test]
    fn other_bytes_at_the_same_position_are_decoded_again() {
        let d = SharedDecoder::new(1 << 20);
        d.decode_all("t", &[record(0, 0, b"old")], decode);
        // The topic was created again: offset 0 holds another record.
        let (again, shared) = d.decode_all("t", &[record(0, 0, b"new")], decode);
        assert_eq!(shared, 0);
        assert_eq!(again[0].as_ref().unwrap().id, "new");
        let (kept, shared) = d.decode_all("t", &[record(0, 0, b"new")], decode);
        assert_eq!((shared, kept[0].as_ref().unwrap().id.as_str()), (1, "new"));
        assert_eq!(d.len(), 1, "replaced, not added");
    }

    #[test]
    fn rejections_are_never_kept() {
        let d = SharedDecoder::new(1 << 20);
        let batch = [record(0, 0, b"bad"), record(0, 1, b"ok")];
        let (first, _) = d.decode_all("t", &batch, decode);
        assert!(first[0].is_err() && first[1].is_ok());
        let (second, shared) = d.decode_all("t", &batch, decode);
        assert_eq!(shared, 1);
        assert_eq!(
            second[0].as_ref().unwrap_err().kind,
            RejectKind::MalformedJson
        );
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn the_oldest_entries_go_past_the_budget() {
        // Room for three entries of one byte.
        let d = SharedDecoder::new(3 * (2 + ENTRY_OVERHEAD));
        let batch: Vec<Record> = (0..5).map(|o| record(0, o, b"x")).collect();
        d.decode_all("t", &batch, decode);
        assert_eq!(d.len(), 3);
        assert!(d.bytes() <= 3 * (2 + ENTRY_OVERHEAD));
        let (_, shared) = d.decode_all("t", &batch[..2], decode);
        assert_eq!(shared, 0, "offsets 0 and 1 were dropped first");
        let (_, shared) = d.decode_all("t", &batch[4..], decode);
        assert_eq!(shared, 1, "offset 4 was kept");
    }

    #[tokio::test]
    async fn handlers_share_only_inside_a_runners_scope() {
        let d = Arc::new(SharedDecoder::new(1 << 20));
        let batch = [record(0, 0, b"a"), record(0, 1, b"b")];
        // Outside a scope nothing is kept.
        assert!(decode_all(&batch, decode).iter().all(Result::is_ok));
        assert!(d.is_empty());
        let (_, first) = scope(d.clone(), "t", async { decode_all(&batch, decode) }).await;
        assert_eq!((first.decoded(), first.shared()), (2, 0));
        let (results, second) = scope(d.clone(), "t", async { decode_all(&batch, decode) }).await;
        assert_eq!((second.decoded(), second.shared()), (0, 2));
        assert_eq!(results[1].as_ref().unwrap().id, "b");
    }
}
