//! Helpers shared by the log tests: unique names, readiness waits and a
//! group member driven the way the runtime's runner drives it.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use waymark_runtime::{Appended, ConsumerEvent, LogConsumer, OutRecord};

/// Group timeouts short enough for rebalances to take seconds, not minutes.
pub const GROUP_PROPERTIES: &[(&str, &str)] = &[
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
];

/// How long a test waits for the group to settle or records to arrive.
pub const WAIT: Duration = Duration::from_secs(60);

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Waits until `ready` holds, polling; panics after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` keyed records for `topic`, values `{tag}-{i}`.
pub fn keyed(topic: &str, tag: &str, n: usize) -> Vec<OutRecord> {
    (0..n)
        .map(|i| {
            OutRecord::keyed(
                topic,
                format!("user-{}", i % 7),
                format!("{tag}-{i}").into_bytes(),
            )
        })
        .collect()
}

/// What the simulated projection store holds, shared by group members.
#[derive(Default)]
pub struct Ledger {
    /// Next offset to apply per partition (the positions a store keeps).
    pub positions: Mutex<HashMap<u32, u64>>,
    /// Every applied record: (partition, offset, value), in apply order.
    pub applied: Mutex<Vec<(u32, u64, Vec<u8>)>>,
    /// Partitions each member holds right now.
    pub assigned: Mutex<BTreeMap<String, BTreeSet<u32>>>,
    /// Anything a member saw that breaks the consumer contract.
    pub violations: Mutex<Vec<String>>,
    /// Every assignment change, in order: (member, event summary).
    pub history: Mutex<Vec<(String, String)>>,
}

impl Ledger {
    pub fn applied_count(&self) -> usize {
        self.applied.lock().unwrap().len()
    }

    pub fn assigned_to(&self, member: &str) -> BTreeSet<u32> {
        self.assigned
            .lock()
            .unwrap()
            .get(member)
            .cloned()
            .unwrap_or_default()
    }

    /// Panics on contract violations, lost or doubly applied records.
    pub fn assert_exactly(&self, produced: &BTreeSet<(u32, u64)>) {
        let violations = self.violations.lock().unwrap();
        assert!(violations.is_empty(), "violations: {violations:#?}");
        let applied = self.applied.lock().unwrap();
        let keys: Vec<(u32, u64)> = applied.iter().map(|(p, o, _)| (*p, *o)).collect();
        let unique: BTreeSet<(u32, u64)> = keys.iter().copied().collect();
        assert_eq!(unique.len(), keys.len(), "a record was applied twice");
        assert_eq!(
            &unique, produced,
            "applied records differ from produced ones"
        );
    }
}

/// Collects the positions of produce answers.
pub fn positions(appended: &[Appended]) -> BTreeSet<(u32, u64)> {
    appended.iter().map(|a| (a.partition, a.offset)).collect()
}

/// Runs `consumer` like the runner: on `Assigned` seeks every partition to
/// its stored position; applies records (checking each partition continues
/// exactly where it should), stores positions, commits.
pub fn spawn_member(
    name: &str,
    mut consumer: Box<dyn LogConsumer>,
    ledger: Arc<Ledger>,
) -> JoinHandle<()> {
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut next: HashMap<u32, u64> = HashMap::new();
        loop {
            let event = match consumer.next(50).await {
                Ok(event) => event,
                Err(e) => {
                    eprintln!("{name}: next failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match event {
                ConsumerEvent::Assigned(partitions) => {
                    ledger
                        .history
                        .lock()
                        .unwrap()
                        .push((name.clone(), format!("assigned {partitions:?}")));
                    let stored = ledger.positions.lock().unwrap().clone();
                    for p in &partitions {
                        let offset = stored.get(p).copied().unwrap_or(0);
                        if let Err(e) = consumer.seek(*p, offset).await {
                            ledger
                                .violations
                                .lock()
                                .unwrap()
                                .push(format!("{name}: seek {p}@{offset}: {e}"));
                        }
                        next.insert(*p, offset);
                    }
                    ledger
                        .assigned
                        .lock()
                        .unwrap()
                        .entry(name.clone())
                        .or_default()
                        .extend(partitions);
                }
                ConsumerEvent::Revoked(partitions) => {
                    ledger
                        .history
                        .lock()
                        .unwrap()
                        .push((name.clone(), format!("revoked {partitions:?}")));
                    let mut assigned = ledger.assigned.lock().unwrap();
                    let mine = assigned.entry(name.clone()).or_default();
                    for p in partitions {
                        next.remove(&p);
                        mine.remove(&p);
                    }
                }
                ConsumerEvent::Records(records) => {
                    let mut commit: BTreeMap<u32, u64> = BTreeMap::new();
                    {
                        let mut applied = ledger.applied.lock().unwrap();
                        let mut violations = ledger.violations.lock().unwrap();
                        for r in records {
                            match next.get_mut(&r.partition) {
                                None => violations.push(format!(
                                    "{name}: record {}@{} of a partition not assigned",
                                    r.partition, r.offset
                                )),
                                Some(n) if *n != r.offset => violations.push(format!(
                                    "{name}: partition {} expected offset {n}, got {}",
                                    r.partition, r.offset
                                )),
                                Some(n) => {
                                    *n += 1;
                                    commit.insert(r.partition, *n);
                                    applied.push((
                                        r.partition,
                                        r.offset,
                                        r.value.unwrap_or_default(),
                                    ));
                                }
                            }
                        }
                        ledger.positions.lock().unwrap().extend(commit.clone());
                    }
                    let offsets: Vec<(u32, u64)> = commit.into_iter().collect();
                    if let Err(e) = consumer.commit(&offsets).await {
                        eprintln!("{name}: commit failed: {e}");
                    }
                }
            }
        }
    })
}
