//! Helpers shared by the end-to-end tests.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

pub mod contract;
pub mod engines;
pub mod kafka;
pub mod replay;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tonic::transport::Channel;
use waymark_cli::dev::{Dev, DevInfo, DevOptions};
use waymark_core::default_person_id;
use waymark_proto::v1 as pb;
use waymark_proto::v1::admin_client::AdminClient;
use waymark_proto::v1::ingest_client::IngestClient;
use waymark_proto::v1::publish_result::Outcome;
use waymark_proto::v1::query_client::QueryClient;

/// Starts `waymark dev` in-process on ephemeral ports.
pub async fn start_dev(dir: &Path, kafka: bool) -> Dev {
    let topology = waymark_cli::registry::default_topology().expect("built-in topology");
    Dev::start(DevOptions {
        data_dir: dir.to_path_buf(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        topology,
        kafka_addr: kafka.then(|| "127.0.0.1:0".parse().unwrap()),
        kafka_limits: Default::default(),
        kafka_advertised: None,
        grpc_security: waymark_server::Security::open(),
        kafka_tls: None,
        kafka_sasl: None,
        metrics_security: Default::default(),
    })
    .await
    .expect("waymark dev starts")
}

pub struct Clients {
    pub query: QueryClient<Channel>,
    pub ingest: IngestClient<Channel>,
    pub admin: AdminClient<Channel>,
}

pub async fn clients(grpc_addr: &str) -> Clients {
    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to grpc");
    Clients {
        query: QueryClient::new(channel.clone()),
        ingest: IngestClient::new(channel.clone()),
        admin: AdminClient::new(channel),
    }
}

/// `GET /metrics` with a plain TCP request (no HTTP client needed).
pub async fn metrics_text(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Polls `check` until it returns `Some`, for at most 120 s.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A JSON event envelope.
pub fn event(
    id: &str,
    ty: &str,
    time: &str,
    source: (&str, &str),
    data: serde_json::Value,
) -> String {
    serde_json::json!({
        "id": id,
        "type": ty,
        "time": time,
        "source": {"platform": source.0, "platform_id": source.1},
        "data": data,
    })
    .to_string()
}

/// `n` events spread over `persons` people; returns the events and the
/// number of events per person.
pub fn workload(tag: &str, n: usize, persons: usize) -> (Vec<String>, BTreeMap<String, u64>) {
    let mut events = Vec::with_capacity(n);
    let mut per_person = BTreeMap::new();
    for i in 0..n {
        let who = format!("{tag}-{}", i % persons);
        let minute = i / persons;
        let time = format!(
            "2026-04-01T{:02}:{:02}:{:02}Z",
            minute / 3600 % 24,
            minute / 60 % 60,
            minute % 60
        );
        let e = match i % 3 {
            0 => event(
                &format!("{tag}-{i}"),
                "interaction.recorded",
                &time,
                ("web", &who),
                json!({"kind": "message", "content_type": "text", "content": "x"}),
            ),
            1 => event(
                &format!("{tag}-{i}"),
                "journey.stage_entered",
                &time,
                ("web", &who),
                json!({"journey_id": "j", "stage": format!("s{i}")}),
            ),
            _ => event(
                &format!("{tag}-{i}"),
                "learning.quiz_answered",
                &time,
                ("web", &who),
                json!({"course_id": "c", "quiz_id": format!("q{i}"), "correct": i % 2 == 0}),
            ),
        };
        events.push(e);
        *per_person.entry(who).or_insert(0) += 1;
    }
    (events, per_person)
}

pub async fn publish_all(addr: &str, events: &[String]) {
    let mut c = clients(addr).await;
    for chunk in events.chunks(500) {
        let results = c
            .ingest
            .publish(pb::PublishRequest {
                events: chunk.to_vec(),
            })
            .await
            .expect("publish")
            .into_inner()
            .results;
        assert!(results
            .iter()
            .all(|r| matches!(r.outcome, Some(Outcome::Accepted(_)))));
    }
}

/// Waits until every person's event count is as expected, then checks it
/// stays there (no late double counting).
pub async fn assert_counts(addr: &str, expected: &BTreeMap<String, u64>) {
    let c = clients(addr).await;
    for (who, count) in expected {
        let id = default_person_id("web", who).to_string();
        let q = c.query.clone();
        let got = eventually(&format!("{who} has {count} events"), || {
            let mut q = q.clone();
            let id = id.clone();
            async move {
                let p = q
                    .get_person(pb::GetPersonRequest { person_id: id })
                    .await
                    .ok()?
                    .into_inner();
                (p.event_count >= *count).then_some(p.event_count)
            }
        })
        .await;
        assert_eq!(got, *count, "{who}: event count");
    }
}

/// Starts the `waymark` binary's `dev` on `dir`, its Kafka endpoint on
/// `kafka_addr` (`127.0.0.1:0` for any port), and waits for `dev.json`.
/// Callers own the child and always kill and wait for it.
#[allow(clippy::zombie_processes)]
/// A `waymark dev` child process, killed when dropped: a test that fails
/// half-way leaves no process behind (a stray one would hold the test's
/// output open and take CPU from every test after it).
pub struct DevProcess(Child);

impl std::ops::Deref for DevProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for DevProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn spawn_dev(dir: &Path, kafka_addr: &str) -> (DevProcess, DevInfo) {
    spawn_dev_in(dir, kafka_addr, None)
}

/// [`spawn_dev`], started through `bash -c SHELL` when given (e.g. to set
/// limits with `ulimit` first; `SHELL` ends with `exec "$0" "$@"`).
#[allow(clippy::zombie_processes)]
pub fn spawn_dev_in(dir: &Path, kafka_addr: &str, shell: Option<&str>) -> (DevProcess, DevInfo) {
    let _ = std::fs::remove_file(dir.join("dev.json"));
    let mut command = match shell {
        Some(script) => {
            let mut c = Command::new("bash");
            c.arg("-c").arg(script).arg(env!("CARGO_BIN_EXE_waymark"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_waymark")),
    };
    let child = DevProcess(
        command
            .args([
                "dev",
                "--grpc-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--kafka-addr",
                kafka_addr,
                "--data-dir",
            ])
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn waymark dev"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(bytes) = std::fs::read(dir.join("dev.json")) {
            if let Ok(info) = serde_json::from_slice::<DevInfo>(&bytes) {
                return (child, info);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waymark dev did not become ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Sends SIGTERM to `child` and waits for it to exit 0.
pub fn terminate(child: &mut Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "waymark dev exits 0 on SIGTERM, got {exit:?}"
    );
}
