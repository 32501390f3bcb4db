//! `verify`: recompute a projection from the log and compare it with the
//! stored one, row by row.

use std::collections::BTreeMap;
use std::path::PathBuf;

use waymark_proto::v1 as pb;
use waymark_runtime::catalog::consumer_id;
use waymark_runtime::plugin::TableSpec;
use waymark_runtime::row::row_payload;
use waymark_runtime::{ProjectionStore, StoreError, WriteBatch};
use waymark_server::ApiError;

use crate::operator::PlatformOperator;

/// Records read from the log per step of `verify`.
const VERIFY_CHUNK: usize = 2000;

/// Differences listed per verify report.
const MAX_DIFFERENCES: usize = 100;

/// Recomputes the active version of `processor` from the log into a
/// scratch store and compares it row by row with the live store, up to
/// the positions the live store had when it started.
pub(crate) async fn verify_one(
    op: &PlatformOperator,
    processor: &str,
) -> Result<pb::VerifyReport, ApiError> {
    let topic = op.known(processor)?;
    op.check_from_start(&topic, processor).await?;
    let entry = op.entry(processor).await?;
    let version = entry.active;
    let encoding = op.registry().encoding(processor).unwrap_or_default();
    if !entry.readable(version, encoding) {
        return Err(ApiError::FailedPrecondition(
            crate::controller::unreadable_message(&entry, version, encoding),
        ));
    }
    let snapshot = op
        .store()
        .positions(&consumer_id(processor, version), &topic)
        .await?;
    let scratch = Scratch::open()?;
    let handler = op
        .registry()
        .handler(processor, version, op.topology(), op.validator())
        .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
    scratch.store.ensure_tables(&handler.tables()).await?;
    let mut replayed = 0u64;
    for (partition, end) in &snapshot {
        let mut from = 0;
        while from < *end {
            let mut records = op
                .log()
                .read(&topic, *partition, from, VERIFY_CHUNK)
                .await?;
            records.retain(|r| r.offset < *end);
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            replayed += records.len() as u64;
            let out = handler
                .handle(&scratch.store, &topic, &records)
                .await
                .map_err(ApiError::from)?;
            scratch
                .store
                .write(WriteBatch {
                    rows: out.rows,
                    positions: Vec::new(),
                })
                .await?;
        }
    }
    let mut report = pb::VerifyReport {
        processor: processor.to_owned(),
        version,
        records_replayed: replayed,
        ..Default::default()
    };
    let specs = op
        .registry()
        .require(processor)
        .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?
        .tables();
    for spec in specs.iter().filter(|s| s.verified) {
        compare_table(
            &spec.name(processor, version),
            spec,
            &scratch.store,
            op.store().as_ref(),
            &snapshot,
            &mut report,
        )
        .await?;
    }
    Ok(report)
}

/// A throw-away embedded store in a temporary directory.
struct Scratch {
    dir: PathBuf,
    store: waymark_embedded::EmbeddedStore,
}

impl Scratch {
    fn open() -> Result<Self, ApiError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("waymark-verify-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| {
            ApiError::Store(StoreError::Unavailable(format!(
                "cannot create scratch dir {}: {e}",
                dir.display()
            )))
        })?;
        let store = waymark_embedded::EmbeddedStore::open(&dir.join("scratch"))?;
        Ok(Self { dir, store })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.store.close();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether live processing moved the stored row past the snapshot (the
/// table's spec says which position a row reflects).
fn moved_on(spec: &TableSpec, key: &str, stored: &[u8], snapshot: &BTreeMap<u32, u64>) -> bool {
    row_payload(stored)
        .and_then(|(_, value)| (spec.position)(key, value))
        .is_some_and(|p| p.offset >= snapshot.get(&p.partition).copied().unwrap_or(0))
}

/// Whether the head row of sub row `key` (`<head key>/...`, see
/// [`TableSpec`]) moved past the snapshot in the live store.
async fn head_moved_on(
    spec: &TableSpec,
    table: &str,
    key: &str,
    live: &dyn ProjectionStore,
    snapshot: &BTreeMap<u32, u64>,
) -> Result<bool, ApiError> {
    let Some((head, _)) = key.split_once('/') else {
        return Ok(false);
    };
    Ok(match live.get(table, head).await {
        Ok(Some(row)) => moved_on(spec, head, &row, snapshot),
        Ok(None) | Err(StoreError::UnknownTable(_)) => false,
        Err(e) => return Err(e.into()),
    })
}

fn difference(report: &mut pb::VerifyReport, table: &str, key: &str, kind: &str, detail: String) {
    report.difference_count += 1;
    if report.differences.len() < MAX_DIFFERENCES {
        report.differences.push(pb::Difference {
            table: table.to_owned(),
            key: key.to_owned(),
            kind: kind.to_owned(),
            detail,
        });
    }
}

/// Compares `table` row by row between the recomputation and the store.
async fn compare_table(
    table: &str,
    spec: &TableSpec,
    scratch: &dyn ProjectionStore,
    live: &dyn ProjectionStore,
    snapshot: &BTreeMap<u32, u64>,
    report: &mut pb::VerifyReport,
) -> Result<(), ApiError> {
    // Every recomputed row must be stored, equal.
    let mut after: Option<String> = None;
    loop {
        let page = scratch.scan(table, after.as_deref(), VERIFY_CHUNK).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let keys: Vec<String> = page.iter().map(|(k, _)| k.clone()).collect();
        let stored = match live.get_many(table, &keys).await {
            Ok(rows) => rows,
            Err(StoreError::UnknownTable(_)) => vec![None; keys.len()],
            Err(e) => return Err(e.into()),
        };
        for ((key, expected), stored) in page.iter().zip(stored) {
            if stored.is_none() && head_moved_on(spec, table, key, live, snapshot).await? {
                // Live processing deleted it after the snapshot (a pruned
                // chunk of a sub-keyed table).
                report.rows_skipped += 1;
                continue;
            }
            report.rows_compared += 1;
            match stored {
                None => difference(
                    report,
                    table,
                    key,
                    "missing",
                    format!(
                        "recomputed a row of {} bytes; none is stored",
                        expected.len()
                    ),
                ),
                Some(actual) if actual == *expected => {}
                Some(actual) if moved_on(spec, key, &actual, snapshot) => report.rows_skipped += 1,
                Some(actual) => difference(
                    report,
                    table,
                    key,
                    "different",
                    format!(
                        "stored {} bytes differ from the recomputed {} bytes",
                        actual.len(),
                        expected.len()
                    ),
                ),
            }
        }
    }
    // Every stored row must have been recomputed.
    let mut after: Option<String> = None;
    loop {
        let page = match live.scan(table, after.as_deref(), VERIFY_CHUNK).await {
            Ok(page) => page,
            Err(StoreError::UnknownTable(_)) => break,
            Err(e) => return Err(e.into()),
        };
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let keys: Vec<String> = page.iter().map(|(k, _)| k.clone()).collect();
        let expected = scratch.get_many(table, &keys).await?;
        for ((key, actual), expected) in page.iter().zip(expected) {
            if expected.is_none() {
                if moved_on(spec, key, actual, snapshot) {
                    report.rows_skipped += 1;
                } else {
                    report.rows_compared += 1;
                    difference(
                        report,
                        table,
                        key,
                        "unexpected",
                        format!(
                            "a row of {} bytes is stored; none was recomputed",
                            actual.len()
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}
