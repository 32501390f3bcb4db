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
//!   event of the old one. Every reader decodes with
//!   [`crate::handler::decode_event`], so a record that does not decode is
//!   rejected alike for all of them.
//! - **Readers at the same records split the work.** Each record is decoded
//!   by the first reader to reach it; a reader that reaches it while it is
//!   being decoded waits for that one record, never for anything else
//!   (test `readers_at_the_same_records_split_the_work`). Without this,
//!   folds reading the same batch at the same moment each decoded all of
//!   it.
//! - **Bounded.** Entries cost an estimate of their memory (twice the
//!   value's bytes plus a fixed overhead); past the byte budget the oldest
//!   entries go first. Readers far behind the others decode again what
//!   was dropped.
//! - **No coupling between processors.** Sharing is best effort: a runner
//!   waits at most for one record's decode by another, and one stopped or
//!   parked changes nothing for the rest.
//!
//! Handlers use it without knowing: [`crate::handler::decode_events`] and
//! [`crate::handler::decode_indexed`] look it up in the scope the runner
//! sets around [`crate::Handler::handle`] ([`scope`]); outside a scope (tests,
//! tools) they decode every record.
//!
//! [controller]: ../../waymark_control/index.html

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use waymark_core::{Event, Rejection};

use crate::log::Record;

/// The default byte budget of a [`SharedDecoder`]: 8 MiB, about 13 000
/// events of the benchmark mix.
pub const DEFAULT_DECODER_BYTES: usize = 8 << 20;

/// Fixed part of an entry's estimated cost (the event's struct, the map
/// entry and the order queue's slot).
const ENTRY_OVERHEAD: usize = 128;

/// Decoded records shared by the runners of one process.
pub struct SharedDecoder {
    budget: usize,
    decode: DecodeFn,
    state: Mutex<State>,
}

/// How a record becomes an event.
type DecodeFn = fn(&Record) -> Result<Event, Rejection>;

/// One record's decoded event (or rejection), filled by the first reader
/// that gets to it.
type Cell = Arc<OnceLock<Result<Arc<Event>, Rejection>>>;

impl std::fmt::Debug for SharedDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDecoder")
            .field("budget", &self.budget)
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
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

struct Entry {
    len: usize,
    fingerprint: u64,
    cost: usize,
    cell: Cell,
}

impl SharedDecoder {
    /// A decoder of records of `waymark.events`
    /// ([`crate::handler::decode_event`]) keeping at most about `budget`
    /// bytes of decoded events.
    pub fn new(budget: usize) -> Self {
        Self::with(budget, crate::handler::decode_event)
    }

    fn with(budget: usize, decode: DecodeFn) -> Self {
        Self {
            budget,
            decode,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decodes the records of `topic`, each at most once for all readers
    /// while it is kept. Returns one result per record, in order, and how
    /// many came from what another reader decoded.
    ///
    /// Readers that meet the same records at the same time split the work:
    /// each record is decoded by the first reader to reach it, and one that
    /// reaches it while it is being decoded waits for that one record
    /// (decoding a record waits for nothing else, so no reader can wait on
    /// another in a cycle).
    pub fn decode_all(
        &self,
        topic: &str,
        records: &[Record],
    ) -> (Vec<Result<Arc<Event>, Rejection>>, u64) {
        let cells = self.cells(topic, records);
        let mut shared = 0;
        let results = records
            .iter()
            .zip(cells)
            .map(|(r, cell)| {
                let mut here = false;
                let result = cell.get_or_init(|| {
                    here = true;
                    (self.decode)(r).map(Arc::new)
                });
                if !here {
                    shared += 1;
                }
                result.clone()
            })
            .collect();
        (results, shared)
    }

    /// The cell of every record, added where there is none (or where the
    /// one there is for other bytes); the oldest entries go past the budget.
    fn cells(&self, topic: &str, records: &[Record]) -> Vec<Cell> {
        let prints: Vec<u64> = records
            .iter()
            .map(|r| fingerprint(r.value.as_deref()))
            .collect();
        let mut state = self.state();
        let index = state.topic_index(topic);
        let mut added = 0isize;
        let mut order = Vec::new();
        let cells = records
            .iter()
            .zip(prints)
            .map(|(r, fingerprint)| {
                let len = r.value.as_ref().map_or(0, Vec::len);
                let key = (r.partition, r.offset);
                let entries = &mut state.topics[index].1;
                if let Some(e) = entries.get(&key) {
                    if e.len == len && e.fingerprint == fingerprint {
                        return e.cell.clone();
                    }
                }
                let cost = 2 * len + ENTRY_OVERHEAD;
                let cell = Cell::default();
                let entry = Entry {
                    len,
                    fingerprint,
                    cost,
                    cell: cell.clone(),
                };
                match entries.insert(key, entry) {
                    // The topic was created again: the old entry goes.
                    Some(old) => added -= old.cost as isize,
                    None => order.push((index, key.0, key.1)),
                }
                added += cost as isize;
                cell
            })
            .collect();
        state.order.extend(order);
        state.bytes = state.bytes.saturating_add_signed(added);
        while state.bytes > self.budget {
            let Some((t, partition, offset)) = state.order.pop_front() else {
                break;
            };
            if let Some(old) = state.topics[t].1.remove(&(partition, offset)) {
                state.bytes -= old.cost;
            }
        }
        cells
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

/// Decodes `records` with [`crate::handler::decode_event`], through the
/// scope's shared decoder when there is one.
pub(crate) fn decode_all(records: &[Record]) -> Vec<Result<Arc<Event>, Rejection>> {
    let scoped = SCOPE.try_with(|scope| {
        let (results, shared) = scope.decoder.decode_all(&scope.topic, records);
        scope.shared.fetch_add(shared, Ordering::Relaxed);
        scope
            .decoded
            .fetch_add(records.len() as u64 - shared, Ordering::Relaxed);
        results
    });
    match scoped {
        Ok(results) => results,
        Err(_) => records
            .iter()
            .map(|r| crate::handler::decode_event(r).map(Arc::new))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
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

    fn event(id: &str) -> Event {
        Event {
            id: id.to_owned(),
            time: chrono::DateTime::UNIX_EPOCH,
            source: None,
            person_id: Some(uuid::Uuid::nil()),
            data: EventData::QuizAnswered {
                course_id: "c".into(),
                quiz_id: "q".into(),
                correct: true,
            },
        }
    }

    /// A stand-in decoder: the value's text is the event id; "bad" is
    /// rejected.
    fn decode(r: &Record) -> Result<Event, Rejection> {
        let id = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
        if id == "bad" {
            return Err(Rejection::new(RejectKind::MalformedJson, "bad"));
        }
        Ok(event(&id))
    }

    #[test]
    fn a_second_reader_gets_the_first_readers_events() {
        let d = SharedDecoder::with(1 << 20, decode);
        let batch = [record(0, 0, b"a"), record(0, 1, b"b"), record(1, 0, b"c")];
        let (first, shared) = d.decode_all("t", &batch);
        assert_eq!(shared, 0);
        let (second, shared) = d.decode_all("t", &batch);
        assert_eq!(shared, 3);
        for (a, b) in first.iter().zip(&second) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert!(Arc::ptr_eq(a, b), "the same decoded event");
        }
        // Another topic's records at the same positions are not these.
        let (_, shared) = d.decode_all("u", &batch);
        assert_eq!(shared, 0);
    }

    #[test]
    fn other_bytes_at_the_same_position_are_decoded_again() {
        let d = SharedDecoder::with(1 << 20, decode);
        d.decode_all("t", &[record(0, 0, b"old")]);
        // The topic was created again: offset 0 holds another record.
        let (again, shared) = d.decode_all("t", &[record(0, 0, b"new")]);
        assert_eq!(shared, 0);
        assert_eq!(again[0].as_ref().unwrap().id, "new");
        let (kept, shared) = d.decode_all("t", &[record(0, 0, b"new")]);
        assert_eq!((shared, kept[0].as_ref().unwrap().id.as_str()), (1, "new"));
        assert_eq!(d.len(), 1, "replaced, not added");
        assert_eq!(d.bytes(), 2 * 3 + ENTRY_OVERHEAD);
    }

    #[test]
    fn a_rejection_is_shared_like_an_event() {
        let d = SharedDecoder::with(1 << 20, decode);
        let batch = [record(0, 0, b"bad"), record(0, 1, b"ok")];
        let (first, _) = d.decode_all("t", &batch);
        assert!(first[0].is_err() && first[1].is_ok());
        let (second, shared) = d.decode_all("t", &batch);
        assert_eq!(shared, 2);
        let rejection = second[0].as_ref().unwrap_err();
        assert_eq!(rejection.kind, RejectKind::MalformedJson);
        assert_eq!(second[1].as_ref().unwrap().id, "ok");
    }

    #[test]
    fn the_oldest_entries_go_past_the_budget() {
        // Room for three entries of one byte.
        let d = SharedDecoder::with(3 * (2 + ENTRY_OVERHEAD), decode);
        let batch: Vec<Record> = (0..5).map(|o| record(0, o, b"x")).collect();
        d.decode_all("t", &batch);
        assert_eq!(d.len(), 3);
        assert!(d.bytes() <= 3 * (2 + ENTRY_OVERHEAD));
        let (_, shared) = d.decode_all("t", &batch[4..]);
        assert_eq!(shared, 1, "offset 4 was kept");
        let (_, shared) = d.decode_all("t", &batch[..1]);
        assert_eq!(shared, 0, "offset 0 was dropped first");
    }

    static DECODES: AtomicUsize = AtomicUsize::new(0);

    fn counting(r: &Record) -> Result<Event, Rejection> {
        DECODES.fetch_add(1, Ordering::Relaxed);
        decode(r)
    }

    /// Readers meeting the same records at the same time decode each of
    /// them once between them.
    #[test]
    fn readers_at_the_same_records_split_the_work() {
        let d = SharedDecoder::with(64 << 20, counting);
        let batch: Vec<Record> = (0..20_000u64)
            .map(|o| record((o % 3) as u32, o / 3, format!("e{o}").as_bytes()))
            .collect();
        let barrier = std::sync::Barrier::new(4);
        let shared: u64 = std::thread::scope(|s| {
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let (results, shared) = d.decode_all("t", &batch);
                        for (i, r) in results.iter().enumerate() {
                            let id = &r.as_ref().unwrap().id;
                            let expected = format!("e{i}");
                            assert_eq!(id, &expected);
                        }
                        shared
                    })
                })
                .collect();
            readers.into_iter().map(|r| r.join().unwrap()).sum()
        });
        assert_eq!(DECODES.load(Ordering::Relaxed), 20_000);
        assert_eq!(shared, 3 * 20_000);
    }

    #[tokio::test]
    async fn handlers_share_only_inside_a_runners_scope() {
        let d = Arc::new(SharedDecoder::new(1 << 20));
        let batch = [
            record(0, 0, &event("a").to_json()),
            record(0, 1, &event("b").to_json()),
        ];
        // Outside a scope nothing is kept.
        assert!(decode_all(&batch).iter().all(Result::is_ok));
        assert!(d.is_empty());
        let (_, first) = scope(d.clone(), "t", async { decode_all(&batch) }).await;
        assert_eq!((first.decoded(), first.shared()), (2, 0));
        let (results, second) = scope(d.clone(), "t", async { decode_all(&batch) }).await;
        assert_eq!((second.decoded(), second.shared()), (0, 2));
        assert_eq!(results[1].as_ref().unwrap().id, "b");
    }
}
