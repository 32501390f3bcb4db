//! Criterion micro-benchmarks of Waymark's hot paths: decode + validate of
//! a raw event, the canonical decode the folds use (by each record, and
//! through the process's shared decoder), the v1→v2 upcast, each
//! fold's `Tracked::apply`, one durable embedded-store batch write of
//! 2000 rows, and the gRPC request metrics layer (`grpc/observe`) against
//! the same unary call without it (`grpc/plain`), with the Prometheus
//! recorder installed.
//!
//! Run with `cargo bench -p waymark-bench --bench micro` (add
//! `-- --quick` for a fast pass). `cargo test` never runs them.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use serde_json::json;
use waymark_bench::mix::Mix;
use waymark_core::{Event, EventType, Fold, Position, Tracked};
use waymark_embedded::EmbeddedStore;
use waymark_interactions::InteractionsFold;
use waymark_journey::JourneyFold;
use waymark_learning::LearningFold;
use waymark_person::PersonFold;
use waymark_runtime::decode::{SharedDecoder, DEFAULT_DECODER_BYTES};
use waymark_runtime::handler::decode_event;
use waymark_runtime::row::encode_row;
use waymark_runtime::{PositionWrite, ProjectionStore, Record, RowWrite, WriteBatch};
use waymark_schemas::Validator;

const WINDOW: chrono::Duration = chrono::Duration::days(7);

/// The first raw event of the mix with this type and version.
fn typical(mix: &Mix, ty: &str, version: u64) -> String {
    (0..10_000)
        .map(|i| mix.raw(i).json)
        .find(|j| {
            let v: serde_json::Value = serde_json::from_str(j).unwrap();
            v["type"] == ty && v["version"] == version
        })
        .unwrap()
}

fn decode(c: &mut Criterion) {
    let validator = Validator::new().unwrap();
    let mix = Mix::new("micro", 1000);
    let mut g = c.benchmark_group("decode");
    for (ty, version) in [
        ("interaction.recorded", 1),
        ("journey.stage_entered", 1),
        ("learning.lesson_completed", 1),
        ("learning.quiz_answered", 1),
    ] {
        let raw = typical(&mix, ty, version);
        g.bench_function(format!("validate/{ty}.v{version}/{}B", raw.len()), |b| {
            b.iter(|| validator.decode(black_box(raw.as_bytes())).unwrap())
        });
    }
    // What every fold does per record of `waymark.events`.
    let (_, canonical) = mix.resolved(&validator, 0).unwrap();
    g.bench_function(format!("canonical/{}B", canonical.len()), |b| {
        b.iter(|| Event::from_json(black_box(&canonical)).unwrap())
    });
    g.finish();
}

/// A batch of 1000 records of `waymark.events` as the runners read them:
/// decoded by each record (what every fold did before), decoded through the
/// shared decoder by the first reader (decode + keep), and served to the
/// next reader from what the first one kept (fingerprint + lookup).
fn shared_decode(c: &mut Criterion) {
    let validator = Validator::new().unwrap();
    let mix = Mix::new("micro", 1000);
    let records: Vec<Record> = (0..1000u64)
        .map(|i| {
            let (key, value) = mix.resolved(&validator, i).unwrap();
            Record {
                partition: 0,
                offset: i,
                key: Some(key.into_bytes()),
                value: Some(value),
                headers: Vec::new(),
                timestamp_ms: 0,
            }
        })
        .collect();
    let mut g = c.benchmark_group("decode_1000");
    // Kept for the batch, as `decode_events` keeps them.
    g.bench_function("each_record", |b| {
        b.iter(|| {
            records
                .iter()
                .map(|r| decode_event(black_box(r)))
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("shared_first_reader", |b| {
        b.iter_batched_ref(
            || SharedDecoder::new(DEFAULT_DECODER_BYTES),
            |d| d.decode_all("t", black_box(&records)).1,
            BatchSize::LargeInput,
        )
    });
    let kept = SharedDecoder::new(DEFAULT_DECODER_BYTES);
    kept.decode_all("t", &records);
    g.bench_function("shared_next_reader", |b| {
        b.iter(|| kept.decode_all("t", black_box(&records)).1)
    });
    g.finish();
}

fn upcast(c: &mut Criterion) {
    let data = json!({"course_id": "course-1", "lesson_id": "lesson-7", "score": 87});
    c.bench_function("upcast/learning.lesson_completed.v1_to_v2", |b| {
        b.iter_batched(
            || data.clone(),
            |d| waymark_schemas::upcast(EventType::LessonCompleted, 1, d),
            BatchSize::SmallInput,
        )
    });
}

/// Ten events of one person from the mix, decoded.
fn person_events(validator: &Validator) -> Vec<Event> {
    let mix = Mix::new("micro", 1);
    (0..10)
        .map(|i| {
            let (_, bytes) = mix.resolved(validator, i).unwrap();
            Event::from_json(&bytes).unwrap()
        })
        .collect()
}

/// `Tracked::apply` of the 10th event of a person whose row already
/// holds the first nine (the typical row of a 1M-event / 100k-person log).
fn bench_fold<F: Fold>(c: &mut Criterion, name: &str, fold: F, events: &[Event]) {
    let (last, history) = events.split_last().unwrap();
    let mut row = Tracked::<F::State>::default();
    for (i, e) in history.iter().enumerate() {
        row.apply(&fold, e, Position::new(0, i as u64), WINDOW);
    }
    let at = Position::new(0, history.len() as u64);
    c.bench_function(&format!("fold/{name}"), |b| {
        b.iter_batched(
            || row.clone(),
            |mut row| {
                row.apply(&fold, black_box(last), at, WINDOW);
                row
            },
            BatchSize::SmallInput,
        )
    });
}

fn folds(c: &mut Criterion) {
    let validator = Validator::new().unwrap();
    let events = person_events(&validator);
    bench_fold(c, "person", PersonFold, &events);
    bench_fold(
        c,
        "interactions",
        InteractionsFold::new(chrono::Duration::days(365)),
        &events,
    );
    bench_fold(c, "journey", JourneyFold, &events);
    bench_fold(c, "learning", LearningFold, &events);
}

fn store_write(c: &mut Criterion) {
    let validator = Validator::new().unwrap();
    let events = person_events(&validator);
    let mut row = Tracked::default();
    for (i, e) in events.iter().enumerate() {
        row.apply(&PersonFold, e, Position::new(0, i as u64), WINDOW);
    }
    let value = encode_row(waymark_person::STATE_ENCODING, &row);
    let batch = WriteBatch {
        rows: (0..2000u64)
            .map(|p| RowWrite {
                table: "person_v1".into(),
                key: Mix::person_id(p).to_string(),
                value: Some(value.clone()),
                order: Some(p + 1),
            })
            .collect(),
        positions: vec![PositionWrite {
            consumer: "person.v1".into(),
            topic: "waymark.events".into(),
            partition: 0,
            next_offset: 2000,
        }],
    };
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    rt.block_on(store.ensure_tables(&["person_v1".to_owned()]))
        .unwrap();
    let mut g = c.benchmark_group("store");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.bench_function(
        format!("embedded_write_2000_rows_of_{}B_fsync", value.len()),
        |b| {
            b.iter_batched(
                || batch.clone(),
                |batch| rt.block_on(store.write(batch)).unwrap(),
                BatchSize::LargeInput,
            )
        },
    );
    g.finish();
    store.close();
}

/// Answers every call with one data frame and OK trailers, as a unary rpc.
#[derive(Clone)]
struct Unary;

impl tower::Service<http::Request<()>> for Unary {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<()>) -> Self::Future {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let body = http_body_util::StreamBody::new(tokio_stream::iter([
            Ok::<_, tonic::Status>(http_body::Frame::data(bytes::Bytes::from_static(
                b"\0\0\0\0\x05hello",
            ))),
            Ok(http_body::Frame::trailers(trailers)),
        ]));
        std::future::ready(Ok(http::Response::new(tonic::body::Body::new(body))))
    }
}

fn grpc_observe(c: &mut Criterion) {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};
    // The process-wide Prometheus recorder, as the servers install it.
    waymark_cli::metrics_http::recorder();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let request = || {
        http::Request::builder()
            .uri("/waymark.v1.Query/GetPerson")
            .body(())
            .unwrap()
    };
    let known = waymark_server::observe::KnownMethods::from_descriptor_sets(&[
        waymark_proto::FILE_DESCRIPTOR_SET,
    ]);
    let observed = waymark_server::observe::ObserveLayer::new(known).layer(Unary);
    let mut g = c.benchmark_group("grpc");
    g.bench_function("plain", |b| {
        b.iter(|| {
            rt.block_on(async {
                let response = Unary.oneshot(request()).await.unwrap();
                black_box(response.into_body().collect().await.unwrap());
            })
        })
    });
    g.bench_function("observe", |b| {
        b.iter(|| {
            rt.block_on(async {
                let response = observed.clone().oneshot(request()).await.unwrap();
                black_box(response.into_body().collect().await.unwrap());
            })
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    decode,
    shared_decode,
    upcast,
    folds,
    store_write,
    grpc_observe
);
criterion_main!(benches);
