//! Kafka clients nobody here wrote, against `waymark dev`: kcat (`-P`, `-C`,
//! `-G`), the Apache Kafka Java client (console consumer, a consumer group of
//! two members, `kafka-consumer-groups.sh --describe`) and kafka-python.
//! `scripts/test-clients ensure` installs them (scripts/test runs it); under
//! `CI=true` a missing client fails, elsewhere its test skips.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{assert_counts, publish_all, start_dev, workload};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the clients are: `WAYMARK_TEST_*`, or what `scripts/test-clients
/// env` says. `None` (skip) only outside CI.
fn client(var: &str) -> Option<String> {
    if let Ok(v) = std::env::var(var) {
        return Some(v);
    }
    let out = Command::new(root().join("scripts/test-clients"))
        .arg("env")
        .output()
        .ok()
        .filter(|o| o.status.success());
    let found = out.and_then(|o| {
        String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
            let (k, v) = l.strip_prefix("export ")?.split_once('=')?;
            (k == var).then(|| v.trim_matches('\'').replace("\\*", "*"))
        })
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: {var} must be available (scripts/test-clients ensure)"
        );
        eprintln!("skipped: {var} not available (run scripts/test-clients ensure)");
    }
    found
}

/// Lines a child prints on `stdout` (or `stderr`), collected as they come.
struct Lines {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    fn spawn(mut cmd: Command, stderr: bool) -> Self {
        let mut child = if stderr {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()
        } else {
            cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()
        }
        .expect("spawn a client");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out: Box<dyn std::io::Read + Send> = if stderr {
            Box::new(child.stderr.take().unwrap())
        } else {
            Box::new(child.stdout.take().unwrap())
        };
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    fn wait_for(&self, what: &str, check: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if check(&self.lines.lock().unwrap()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}; got {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the person of `platform:id` has `n` applied events.
async fn applied(grpc: &str, platform: &str, id: &str, n: u64) {
    let person = waymark_core::default_person_id(platform, id).to_string();
    let c = common::clients(grpc).await;
    common::eventually(&format!("{platform}:{id} has {n} events"), || {
        let mut q = c.query.clone();
        let person_id = person.clone();
        async move {
            let p = q
                .get_person(waymark_proto::v1::GetPersonRequest { person_id })
                .await
                .ok()?
                .into_inner();
            (p.event_count == n).then_some(())
        }
    })
    .await;
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a client");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const EVENT: &str = r#"{"id":"kc-1","type":"interaction.recorded","time":"2026-03-01T11:00:00Z","source":{"platform":"kcat","platform_id":"a"},"data":{"kind":"message","content_type":"text"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_produces_with_any_header_bytes_consumes_and_joins_a_group() {
    let Some(kcat) = client("WAYMARK_TEST_KCAT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), true).await;
    let b = dev.info.kafka_bootstrap.clone();

    // -P with a key and headers: repeated names, a null value, a name that
    // is not UTF-8 and a name of 70,000 bytes.
    let long_name = "n".repeat(70_000);
    let mut odd = b"\xff\xfe=raw".to_vec();
    odd.push(0x80);
    let mut p = Command::new(&kcat);
    p.args(["-P", "-b", &b, "-t", "waymark.inputs", "-k", "kcat:a"])
        .args(["-H", "dup=1", "-H", "dup=2", "-H", "nullhdr", "-H"])
        .arg(std::ffi::OsStr::from_bytes(&odd))
        .arg("-H")
        .arg(format!("{long_name}=long"))
        .stdin(Stdio::piped());
    let mut child = p.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(EVENT.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "kcat -P");

    let stored = dev
        .log
        .read_stored("waymark.inputs", 0, 0, usize::MAX)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    let headers = &stored[0].1.headers;
    assert_eq!(
        headers,
        &vec![
            (b"dup".to_vec(), Some(b"1".to_vec())),
            (b"dup".to_vec(), Some(b"2".to_vec())),
            (b"nullhdr".to_vec(), None),
            (b"\xff\xfe".to_vec(), Some(b"raw\x80".to_vec())),
            (long_name.clone().into_bytes(), Some(b"long".to_vec())),
        ]
    );
    // The event itself is applied like any other.
    applied(&dev.info.grpc_addr, "kcat", "a", 1).await;

    // -C gives the same bytes back.
    let out = Command::new(&kcat)
        .args([
            "-C",
            "-b",
            &b,
            "-t",
            "waymark.inputs",
            "-e",
            "-o",
            "beginning",
            "-q",
        ])
        .args(["-f", "%k|%h|%s\n"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = out.stdout;
    assert!(text.starts_with(b"kcat:a|dup=1,dup=2,nullhdr=NULL,\xff\xfe=raw\x80,n"));
    assert!(text.windows(EVENT.len()).any(|w| w == EVENT.as_bytes()));

    // -G: a group member reads everything of waymark.events and commits.
    let (events, _) = workload("kg", 300, 30);
    publish_all(&dev.info.grpc_addr, &events).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let total = loop {
        let mut n = 0;
        for p in 0..6 {
            n += dev.log.offsets("waymark.events", p).unwrap().1;
        }
        if n >= 301 {
            break n;
        }
        assert!(Instant::now() < deadline, "identity resolves the events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let b2 = b.clone();
    let kcat2 = kcat.clone();
    let consumed = tokio::task::spawn_blocking(move || {
        run(Command::new(&kcat2)
            .args(["-b", &b2, "-G", "kcat-group", "waymark.events", "-e", "-q"])
            .args(["-X", "auto.offset.reset=earliest", "-f", "%p %o\n"]))
    })
    .await
    .unwrap();
    assert_eq!(consumed.lines().count() as u64, total);
    dev.stop().await.unwrap();
}

fn java_member(
    java: &str,
    cp: &str,
    bootstrap: &str,
    group: &str,
    name: &str,
    stop: &str,
) -> Lines {
    let mut cmd = Command::new(java);
    cmd.arg("-cp")
        .arg(cp)
        .arg(root().join("crates/waymark-cli/tests/clients/GroupMember.java"))
        .args([bootstrap, "waymark.events", group, name, "0", "120", stop]);
    Lines::spawn(cmd, false)
}

/// The partitions of the newest ASSIGNED line of `name`.
fn assignment(lines: &[String], name: &str) -> Option<BTreeSet<i32>> {
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("ASSIGNED {name} ")))
        .map(|p| p.split(',').filter_map(|x| x.parse().ok()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_java_consumer_group_of_two_splits_waymark_events_and_hands_over() {
    let (Some(java), Some(cp)) = (
        client("WAYMARK_TEST_JAVA"),
        client("WAYMARK_TEST_KAFKA_CLASSPATH"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), true).await;
    let b = dev.info.kafka_bootstrap.clone();
    let (events, expected) = workload("jg", 600, 60);
    publish_all(&dev.info.grpc_addr, &events[..300]).await;
    assert_counts(&dev.info.grpc_addr, &workload("jg", 300, 60).1).await;

    let stop_b = dir.path().join("b.stop");
    let (b1, java1, cp1) = (b.clone(), java.clone(), cp.clone());
    let a = tokio::task::spawn_blocking(move || {
        let a = java_member(
            &java1,
            &cp1,
            &b1,
            "java-group",
            "alpha",
            "/nonexistent/stop",
        );
        a.wait_for("alpha gets all six partitions", |l| {
            assignment(l, "alpha").is_some_and(|p| p.len() == 6)
        });
        a
    })
    .await
    .unwrap();
    let stop = stop_b.to_string_lossy().into_owned();
    let (b2, java2, cp2) = (b.clone(), java.clone(), cp.clone());
    let beta = tokio::task::spawn_blocking(move || {
        java_member(&java2, &cp2, &b2, "java-group", "beta", &stop)
    })
    .await
    .unwrap();
    let (a, beta) = tokio::task::spawn_blocking(move || {
        a.wait_for("alpha keeps three", |l| {
            assignment(l, "alpha").is_some_and(|p| p.len() == 3)
        });
        beta.wait_for("beta takes three", |l| {
            assignment(l, "beta").is_some_and(|p| p.len() == 3)
        });
        (a, beta)
    })
    .await
    .unwrap();
    let split_a = assignment(&a.lines.lock().unwrap(), "alpha").unwrap();
    let split_b = assignment(&beta.lines.lock().unwrap(), "beta").unwrap();
    assert!(split_a.is_disjoint(&split_b));

    // The group, as an operator sees it.
    let describe = run(Command::new(root().join("scripts/dev-services")).args([
        "kafka",
        "consumer-groups",
        "--bootstrap-server",
        &b,
        "--describe",
        "--group",
        "java-group",
    ]));
    assert!(
        describe.contains("waymark-test-alpha") && describe.contains("waymark-test-beta"),
        "{describe}"
    );

    // More events while both consume; then beta leaves and alpha takes over.
    publish_all(&dev.info.grpc_addr, &events[300..]).await;
    std::fs::write(&stop_b, b"").unwrap();
    let a = tokio::task::spawn_blocking(move || {
        beta.wait_for("beta closes", |l| l.iter().any(|x| x == "CLOSED beta"));
        a.wait_for("alpha takes all six back", |l| {
            l.iter()
                .any(|x| *x == format!("REVOKED alpha {}", fmt(&split_a)))
                && assignment(l, "alpha").is_some_and(|p| p.len() == 6)
        });
        let seen_by_beta: BTreeSet<(String, String)> = records(&beta.lines.lock().unwrap(), "beta");
        (a, seen_by_beta)
    })
    .await
    .unwrap();
    let (a, seen_by_beta) = a;
    assert_counts(&dev.info.grpc_addr, &expected).await;
    let mut total = 0;
    for p in 0..6 {
        total += dev.log.offsets("waymark.events", p).unwrap().1 as usize;
    }
    // Between them they see every record.
    let a = tokio::task::spawn_blocking(move || {
        a.wait_for("every record consumed by the group", |l| {
            let mut all = records(l, "alpha");
            all.extend(seen_by_beta.iter().cloned());
            all.len() >= total
        });
        a
    })
    .await
    .unwrap();
    drop(a);
    dev.stop().await.unwrap();
}

fn fmt(p: &BTreeSet<i32>) -> String {
    p.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn records(lines: &[String], name: &str) -> BTreeSet<(String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut f = l.strip_prefix(&format!("RECORD {name} "))?.split(' ');
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_java_console_consumer_reads_waymark_events() {
    if client("WAYMARK_TEST_JAVA").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), true).await;
    let (events, expected) = workload("cc", 50, 5);
    publish_all(&dev.info.grpc_addr, &events).await;
    assert_counts(&dev.info.grpc_addr, &expected).await;
    let b = dev.info.kafka_bootstrap.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new(root().join("scripts/dev-services")).args([
            "kafka",
            "console-consumer",
            "--bootstrap-server",
            &b,
            "--topic",
            "waymark.events",
            "--from-beginning",
            "--max-messages",
            "50",
            "--timeout-ms",
            "30000",
        ]))
    })
    .await
    .unwrap();
    let ids: BTreeSet<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 50, "{out}");
    dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_produces_consumes_in_a_group_and_round_trips_headers() {
    let Some(python) = client("WAYMARK_TEST_PYTHON") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), true).await;
    let b = dev.info.kafka_bootstrap.clone();
    let script = root().join("crates/waymark-cli/tests/clients/kafka_python_client.py");
    let (py, s, b1) = (python.clone(), script.clone(), b.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new(&py).arg(&s).args([
            "produce",
            "--bootstrap",
            &b1,
            "--topic",
            "waymark.inputs",
            "--count",
            "25",
            "--key-prefix",
            "alice",
        ]))
    })
    .await
    .unwrap();
    assert!(out.contains("PRODUCED 25"), "{out}");
    applied(&dev.info.grpc_addr, "python", "alice", 25).await;
    let (py, s, b1) = (python.clone(), script.clone(), b.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new(&py).arg(&s).args([
            "consume",
            "--bootstrap",
            &b1,
            "--topic",
            "waymark.events",
            "--group",
            "py-group",
            "--count",
            "25",
            "--timeout",
            "60",
        ]))
    })
    .await
    .unwrap();
    assert!(out.contains("CONSUMED 25"), "{out}");
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new(&python).arg(&script).args([
            "headers",
            "--bootstrap",
            &b,
            "--topic",
            "waymark.inputs",
        ]))
    })
    .await
    .unwrap();
    assert!(out.contains("waymark.test.null"), "{out}");
    dev.stop().await.unwrap();
}
