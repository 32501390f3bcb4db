//! Helpers shared by the end-to-end tests.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tonic::transport::Channel;
use waymark_cli::dev::{Dev, DevOptions};
use waymark_cli::registry::PROCESSORS;
use waymark_proto::v1::admin_client::AdminClient;
use waymark_proto::v1::ingest_client::IngestClient;
use waymark_proto::v1::query_client::QueryClient;

/// Starts `waymark dev` in-process on ephemeral ports.
pub async fn start_dev(dir: &Path, kafka: bool) -> Dev {
    let topology = waymark_topology::Topology::default_for(PROCESSORS).expect("built-in topology");
    Dev::start(DevOptions {
        data_dir: dir.to_path_buf(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        topology,
        kafka_endpoint: kafka,
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

/// Polls `check` until it returns `Some`, for at most 60 s.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
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
