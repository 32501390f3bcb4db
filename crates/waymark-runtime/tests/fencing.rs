//! A runner whose handler finds its partition applied past the batch by
//! another member (`HandleError::Fenced`) drops the batch, reads the
//! partition again from the stored position and goes on from there:
//! nothing below it is written by this process, nothing above it is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use waymark_runtime::memory::MemoryStore;
use waymark_runtime::memory_log::MemoryLog;
use waymark_runtime::{
    BatchOutput, HandleError, Handler, Log, OutRecord, PositionWrite, ProjectionStore, Record,
    Runner, RunnerConfig, TopicConfig, WriteBatch,
};

const INPUT: &str = "in";
const OUT: &str = "out";
const DLQ: &str = "dlq";
const CONSUMER: &str = "fwd.v1";
/// Where the other member got to.
const RIVAL_AT: u64 = 10;

/// Forwards every record; on its first batch it plays the other member:
/// stores the partition's position at [`RIVAL_AT`] and answers fenced.
struct Rival {
    store: MemoryStore,
    fenced: AtomicBool,
}

#[async_trait]
impl Handler for Rival {
    fn processor(&self) -> &str {
        "fwd"
    }

    fn tables(&self) -> Vec<String> {
        Vec::new()
    }

    async fn handle(
        &self,
        _store: &dyn ProjectionStore,
        _topic: &str,
        records: &[Record],
    ) -> Result<BatchOutput, HandleError> {
        let first = &records[0];
        if !self.fenced.swap(true, Ordering::SeqCst) {
            assert_eq!(first.offset, 0, "the first batch starts at the beginning");
            self.store
                .write(WriteBatch {
                    rows: Vec::new(),
                    positions: vec![PositionWrite {
                        consumer: CONSUMER.into(),
                        topic: INPUT.into(),
                        partition: first.partition,
                        next_offset: RIVAL_AT,
                    }],
                })
                .await
                .unwrap();
            return Err(HandleError::Fenced {
                partition: first.partition,
                offset: first.offset,
            });
        }
        let mut out = BatchOutput::default();
        for (i, r) in records.iter().enumerate() {
            out.produce.push((
                i,
                OutRecord::keyed(OUT, "k", r.value.clone().unwrap_or_default()),
            ));
        }
        Ok(out)
    }
}

#[tokio::test]
async fn a_fenced_batch_is_dropped_and_the_partition_read_again_from_the_stored_position() {
    let log = MemoryLog::new();
    let topics = [(INPUT, 3), (OUT, 1), (DLQ, 1)].map(|(name, partitions)| TopicConfig {
        name: name.into(),
        partitions,
        retention: None,
        compaction: false,
    });
    log.ensure_topics(&topics).await.unwrap();
    let store = MemoryStore::new();
    let values: Vec<Vec<u8>> = (0..30).map(|i| format!("v{i}").into_bytes()).collect();
    log.produce(
        values
            .iter()
            .map(|v| OutRecord::keyed(INPUT, "one-key", v.clone()))
            .collect(),
    )
    .await
    .unwrap();
    let partition = log.records(INPUT)[0].partition;

    let mut config = RunnerConfig::new(CONSUMER, INPUT, DLQ);
    config.backoff_min = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(5);
    let handler = Arc::new(Rival {
        store: store.clone(),
        fenced: AtomicBool::new(false),
    });
    let runner = Runner::new(
        Arc::new(log.clone()),
        Arc::new(store.clone()),
        handler,
        config,
    );
    let token = CancellationToken::new();
    let task = tokio::spawn(runner.run(token.clone()));
    for _ in 0..4_000 {
        let stored = store.positions(CONSUMER, INPUT).await.unwrap();
        if stored.get(&partition) == Some(&30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    token.cancel();
    task.await.unwrap().unwrap();

    let out: Vec<Vec<u8>> = log
        .records(OUT)
        .into_iter()
        .map(|r| r.value.unwrap())
        .collect();
    assert_eq!(
        out,
        values[RIVAL_AT as usize..].to_vec(),
        "only what the other member had not applied, once, in order"
    );
}
