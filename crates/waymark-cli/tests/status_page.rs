//! The status page in a real browser: headless Chromium driven through
//! WebDriver (Debian's `chromium` and `chromium-driver`, which
//! `scripts/test` installs), against `waymark dev` with data, a dead
//! letter and a rebuild in progress.
//!
//! Set `WAYMARK_UPDATE_DOCS=1` to write the screenshot to
//! `docs/operations/status-page.png`; it is always written to the test's
//! target directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use waymark_proto::v1 as pb;

/// chromedriver, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_binary(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| {
        Command::new("sh")
            .args(["-c", &format!("command -v {n}")])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    })
}

/// Starts chromedriver, or says why it cannot (a failure under CI).
fn driver() -> Option<(Driver, String)> {
    let (Some(chromedriver), Some(chromium)) = (
        find_binary(&["chromedriver"]),
        find_binary(&["chromium", "chromium-browser", "google-chrome"]),
    ) else {
        let why = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver; scripts/test does)";
        assert!(!waymark_testenv::in_ci(), "{why}");
        waymark_testenv::skip(why);
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    Some((
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        },
        chromium,
    ))
}

async fn browser(driver: &Driver, chromium: &str) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--hide-scrollbars", "--window-size=1280,1500"],
        }),
    );
    let mut last = None;
    // chromedriver takes a moment to listen.
    for _ in 0..100 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&driver.url)
            .await
        {
            Ok(c) => return c,
            Err(e) => last = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no WebDriver session: {last:?}");
}

async fn text_of(client: &Client, css: &str) -> String {
    client
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} never appeared: {e}"))
        .text()
        .await
        .unwrap()
}

/// Polls the text of `css` until it contains `want`.
async fn eventually_contains(client: &Client, css: &str, want: &str) -> String {
    let mut text = String::new();
    for _ in 0..150 {
        text = text_of(client, css).await;
        if text.contains(want) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{css} never showed {want:?}; it shows:\n{text}");
}

/// Types `q` into the lookup box (replacing what is there) and submits it.
async fn look_up(client: &Client, q: &str) {
    let input = client.find(Locator::Id("person-q")).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(q).await.unwrap();
    client
        .find(Locator::Css("#person-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_processors_dead_letters_rebuilds_and_a_person() {
    let Some((driver, chromium)) = driver() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let dev = common::start_dev(data.path(), true).await;

    // Data: the examples, a record that is no JSON, and a rebuild.
    let examples: Vec<String> = include_str!("../../../examples/events.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    common::publish_all(&dev.info.grpc_addr, &examples).await;
    let (producer, _) = common::kafka::idempotent_producer(&dev.info.kafka_bootstrap);
    common::kafka::produce_all(
        &producer,
        "waymark.inputs",
        &[("telegram:mallory".to_owned(), "{not json".to_owned())],
    );
    let mut clients = common::clients(&dev.info.grpc_addr).await;
    clients
        .admin
        .start_rebuild(pb::StartRebuildRequest {
            processor: "journey".into(),
            to_version: 0,
            switch_when_caught_up: false,
        })
        .await
        .unwrap();

    let client = browser(&driver, &chromium).await;
    client
        .goto(&format!("http://{}/", dev.info.metrics_addr))
        .await
        .unwrap();

    // Every processor, live, caught up.
    let topology = waymark_cli::registry::default_topology().unwrap();
    for processor in topology.processors.keys() {
        let row = eventually_contains(
            &client,
            &format!("#processors tr[data-processor='{processor}'][data-version='1']"),
            "caught up",
        )
        .await;
        assert!(row.contains("live"), "{row}");
    }
    // The rebuild, with its own row.
    let rebuild = text_of(
        &client,
        "#processors tr[data-processor='journey'][data-version='2']",
    )
    .await;
    assert!(rebuild.contains("building"), "{rebuild}");
    // The Kafka endpoint, and the dead letter with its reason.
    let kafka = text_of(&client, "#kafka").await;
    assert!(kafka.contains(&dev.info.kafka_bootstrap), "{kafka}");
    let letters = eventually_contains(&client, "#dead-letters", "malformed_json").await;
    assert!(letters.contains("telegram:mallory"), "{letters}");
    assert!(letters.contains("identity"), "{letters}");

    // A person looked up by an identity, typed and submitted.
    look_up(&client, "telegram:alice").await;
    let person = text_of(&client, "#person-result").await;
    assert!(person.contains("web:alice@example.com"), "{person}");
    assert!(person.contains("onboarding: completed"), "{person}");
    assert!(person.contains("rust-101"), "{person}");
    assert!(person.contains("hello!"), "{person}");

    // An unknown identity says so.
    look_up(&client, "telegram:nobody").await;
    let missing = text_of(&client, "#person-error").await;
    assert!(
        missing.contains("identity telegram:nobody not found"),
        "{missing}"
    );

    // Back to alice for the picture.
    look_up(&client, "telegram:alice").await;
    text_of(&client, "#person-result").await;
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png"),
        &png,
    )
    .unwrap();
    if std::env::var("WAYMARK_UPDATE_DOCS").is_ok_and(|v| v == "1") {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../docs/operations/status-page.png");
        std::fs::write(docs, &png).unwrap();
    }
    client.close().await.unwrap();
    dev.stop().await.unwrap();
}
