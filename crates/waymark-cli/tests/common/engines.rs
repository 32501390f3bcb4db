//! Real Apache Kafka and Cassandra (from `scripts/dev-services`) for the
//! integration tests: every test gets its own topics, consumer groups and
//! keyspace, and runs the real `waymark run` / `waymark serve` binaries.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Kafka and CQL addresses, or `None` when the test is skipped (the
/// policy of `waymark_testenv`: required under `CI=true` or with
/// `WAYMARK_*` set, else a visible `SKIPPED` line).
pub fn engines() -> Option<(String, String)> {
    waymark_testenv::engines()
}

/// A child process killed (and reaped) when dropped.
pub struct Proc {
    pub child: Child,
    pub stderr: PathBuf,
}

impl Proc {
    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!("process did not stop within 60s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what its processes logged last (the harness
        // prints a failed test's output only).
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "--- last {} lines of {} ---\n{}",
                tail.len(),
                self.stderr.display(),
                tail.join("\n")
            );
        }
    }
}

/// One test's isolated deployment on the shared engines.
pub struct Deployment {
    pub bootstrap: String,
    pub cql: String,
    pub keyspace: String,
    pub group_prefix: String,
    pub inputs: String,
    pub topology: PathBuf,
    pub dir: tempfile::TempDir,
    spawned: std::sync::atomic::AtomicUsize,
}

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}{:x}", std::process::id(), nanos % 0xffff_ffff_ffff)
}

impl Deployment {
    pub fn new(bootstrap: String, cql: String) -> Self {
        Self::with_yaml(bootstrap, cql, waymark_topology::default_yaml().to_owned())
    }

    /// A deployment whose `inputs` topic has one partition, so identity
    /// links resolve in publish order across keys (as in `waymark dev`).
    pub fn single_inputs_partition(bootstrap: String, cql: String) -> Self {
        let yaml = waymark_topology::default_yaml().replacen("partitions: 6", "partitions: 1", 1);
        Self::with_yaml(bootstrap, cql, yaml)
    }

    fn with_yaml(bootstrap: String, cql: String, yaml: String) -> Self {
        let id = unique();
        let dir = tempfile::tempdir().unwrap();
        let yaml = yaml.replace("waymark.", &format!("t{id}."));
        let topology = dir.path().join("topology.yaml");
        std::fs::write(&topology, yaml).unwrap();
        Self {
            bootstrap,
            cql,
            keyspace: format!("wm_{id}"),
            group_prefix: format!("g{id}"),
            inputs: format!("t{id}.inputs"),
            topology,
            dir,
            spawned: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn command(&self, args: &[&str]) -> Proc {
        self.command_with(args, &[])
    }

    fn command_with(&self, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let n = self
            .spawned
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let stderr = self.dir.path().join(format!("{n}-{}.log", args[0]));
        let child = Command::new(env!("CARGO_BIN_EXE_waymark"))
            .args(args)
            .arg("--topology")
            .arg(&self.topology)
            .env("WAYMARK_KAFKA_BOOTSTRAP", &self.bootstrap)
            .env("WAYMARK_CQL_NODES", &self.cql)
            .env("WAYMARK_KEYSPACE", &self.keyspace)
            .env("WAYMARK_GROUP_PREFIX", &self.group_prefix)
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn waymark");
        Proc { child, stderr }
    }

    /// `waymark run PROCESSORS...` (all when empty).
    pub fn run(&self, processors: &[&str]) -> Proc {
        let mut args = vec!["run", "--metrics-addr", "127.0.0.1:0"];
        args.extend_from_slice(processors);
        self.command(&args)
    }

    /// `waymark run PROCESSORS...` with more environment variables.
    pub fn run_with(&self, processors: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut args = vec!["run", "--metrics-addr", "127.0.0.1:0"];
        args.extend_from_slice(processors);
        self.command_with(&args, env)
    }

    /// `waymark serve` on a free port; returns it with its address.
    pub fn serve(&self) -> (Proc, String) {
        self.serve_with(&[])
    }

    /// `waymark serve` with more environment variables.
    pub fn serve_with(&self, env: &[(&str, &str)]) -> (Proc, String) {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let proc = self.command_with(
            &[
                "serve",
                "--grpc-addr",
                &addr,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            env,
        );
        (proc, addr)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Waits until the gRPC server at `addr` answers.
pub async fn wait_for_grpc(addr: &str) {
    super::eventually(&format!("grpc at {addr}"), || async {
        let mut c = waymark_proto::v1::admin_client::AdminClient::connect(format!("http://{addr}"))
            .await
            .ok()?;
        c.get_status(waymark_proto::v1::GetStatusRequest {})
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}
