//! `waymark`: run, feed and check a Waymark platform.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use waymark_cli::dev::{Dev, DevOptions, KafkaLimits};
use waymark_cli::ops::{self, ReplayOptions};
use waymark_cli::publish::{publish, Target};
use waymark_cli::recovery;
use waymark_cli::registry;
use waymark_cli::scale::EngineOptions;

/// jemalloc instead of the system allocator. With glibc's malloc, the
/// freed batch buffers stayed resident in each thread's arena and the
/// resident size of `waymark dev` grew with the lag it drained (590 MiB at
/// 2M events); limiting glibc to two arenas kept it flat but made threads
/// queue on the arena locks. See S5 in docs/performance.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Waymark: Kafka-centric, event-sourced per-person state, served over gRPC.
#[derive(Debug, Parser)]
#[command(name = "waymark", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole platform in one process: a durable embedded log and
    /// projection store, every processor, the gRPC services and a
    /// Kafka-protocol endpoint. Nothing else to install.
    Dev {
        /// Where the log, the projections and dev.json live.
        #[arg(long, default_value = ".waymark", env = "WAYMARK_DATA_DIR")]
        data_dir: PathBuf,
        /// gRPC listen address (Query, Ingest, Admin, reflection, health).
        #[arg(long, default_value = "127.0.0.1:50051", env = "WAYMARK_GRPC_ADDR")]
        grpc_addr: SocketAddr,
        /// Prometheus metrics listen address (an ephemeral port if busy).
        #[arg(long, default_value = "127.0.0.1:9464", env = "WAYMARK_METRICS_ADDR")]
        metrics_addr: SocketAddr,
        /// Topology file; the built-in topology.yaml when not given.
        #[arg(long, env = "WAYMARK_TOPOLOGY")]
        topology: Option<PathBuf>,
        /// Kafka-protocol listen address (bootstrap.servers for any Kafka
        /// client); a busy address is an error.
        #[arg(long, default_value = "127.0.0.1:19092", env = "WAYMARK_KAFKA_ADDR")]
        kafka_addr: SocketAddr,
        /// Do not start the Kafka-protocol endpoint.
        #[arg(long)]
        no_kafka: bool,
        /// Kafka endpoint: open connections at most (more are closed).
        #[arg(long, default_value_t = KafkaLimits::default().max_connections, env = "WAYMARK_KAFKA_MAX_CONNECTIONS")]
        kafka_max_connections: usize,
        /// Kafka endpoint: requests of one connection handled at once (a
        /// client pipelining more waits).
        #[arg(long, default_value_t = KafkaLimits::default().max_in_flight, env = "WAYMARK_KAFKA_MAX_IN_FLIGHT")]
        kafka_max_in_flight: usize,
        /// Kafka endpoint: largest request in bytes (larger ones close the
        /// connection before they are read).
        #[arg(long, default_value_t = KafkaLimits::default().max_request_bytes, env = "WAYMARK_KAFKA_MAX_REQUEST_BYTES")]
        kafka_max_request_bytes: usize,
        /// Kafka endpoint: seconds after which an idle connection is closed.
        #[arg(long, default_value_t = KafkaLimits::default().idle_timeout.as_secs(), env = "WAYMARK_KAFKA_IDLE_TIMEOUT_SECS")]
        kafka_idle_timeout_secs: u64,
    },
    /// Run processors on Apache Kafka and ScyllaDB/Cassandra (all by
    /// default). Start as many as you like: each processor is a Kafka
    /// consumer group, and its members split the partitions.
    Run {
        /// Processors to run (names in topology.yaml); all when none is given.
        processors: Vec<String>,
        #[command(flatten)]
        engines: EngineArgs,
        /// Prometheus metrics listen address (an ephemeral port if busy).
        #[arg(long, default_value = "127.0.0.1:9464", env = "WAYMARK_METRICS_ADDR")]
        metrics_addr: SocketAddr,
    },
    /// Serve the gRPC API (Query, Ingest, Admin) on Kafka and
    /// ScyllaDB/Cassandra.
    Serve {
        /// gRPC listen address.
        #[arg(long, default_value = "127.0.0.1:50051", env = "WAYMARK_GRPC_ADDR")]
        grpc_addr: SocketAddr,
        #[command(flatten)]
        engines: EngineArgs,
        /// Prometheus metrics listen address (an ephemeral port if busy).
        #[arg(
            long,
            default_value = "127.0.0.1:9465",
            env = "WAYMARK_SERVE_METRICS_ADDR"
        )]
        metrics_addr: SocketAddr,
    },
    /// Validate JSON-lines events (FILE or stdin) and publish them.
    ///
    /// Rejected lines are reported with their line number; the exit code is
    /// non-zero when any line was rejected.
    Publish {
        /// Ingest service address (the default target; lossless).
        #[arg(long, default_value = "127.0.0.1:50051", conflicts_with = "bootstrap")]
        grpc_addr: String,
        /// Publish straight to Kafka at HOST:PORT with an idempotent producer.
        #[arg(long)]
        bootstrap: Option<String>,
        /// Topic for --bootstrap.
        #[arg(long, default_value = "waymark.inputs", requires = "bootstrap")]
        topic: String,
        /// JSON-lines file; stdin when absent or "-".
        file: Option<PathBuf>,
    },
    /// Work with topology.yaml.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Rebuild a processor's projections from offset 0 as a new version,
    /// while the live version keeps serving.
    Replay {
        /// Processor (a name in topology.yaml).
        processor: String,
        /// Version to build (default: the highest version so far + 1).
        #[arg(long)]
        to_version: Option<u32>,
        /// Make it live as soon as it has caught up.
        #[arg(long)]
        switch: bool,
        /// Show progress (rate, ETA, lag) until caught up, or until live
        /// with --switch.
        #[arg(long)]
        wait: bool,
        /// Admin service address.
        #[arg(long, default_value = "127.0.0.1:50051", env = "WAYMARK_GRPC_ADDR")]
        grpc_addr: String,
    },
    /// Print every processor's projection versions and their progress;
    /// `switch` and `drop` operate them.
    Projections {
        #[command(subcommand)]
        command: Option<ProjectionsCommand>,
        /// Admin service address.
        #[arg(
            long,
            default_value = "127.0.0.1:50051",
            env = "WAYMARK_GRPC_ADDR",
            global = true
        )]
        grpc_addr: String,
    },
    /// Recompute projections from the log in a scratch store and compare
    /// them with the live versions: exit 0 when identical.
    Verify {
        /// Processor to verify (all when absent).
        processor: Option<String>,
        /// Admin service address.
        #[arg(long, default_value = "127.0.0.1:50051", env = "WAYMARK_GRPC_ADDR")]
        grpc_addr: String,
    },
    /// List the keys (persons) a processor parked after one of their
    /// records failed for good; `retry` and `skip` resume them.
    Parked {
        #[command(subcommand)]
        command: Option<ParkedCommand>,
        /// Processor to list (every processor when absent).
        #[arg(long)]
        processor: Option<String>,
        /// Projection version (the live one when absent).
        #[arg(long = "projection-version", value_name = "VERSION", global = true)]
        projection_version: Option<u32>,
        /// Admin service address.
        #[arg(
            long,
            default_value = "127.0.0.1:50051",
            env = "WAYMARK_GRPC_ADDR",
            global = true
        )]
        grpc_addr: String,
    },
    /// Work with the dead letters (waymark.dlq).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Print one person's state and event history.
    Inspect {
        /// The person id (a UUID).
        person_id: String,
        /// Query service address.
        #[arg(long, default_value = "127.0.0.1:50051", env = "WAYMARK_GRPC_ADDR")]
        grpc_addr: String,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectionsCommand {
    /// Make a building version that has caught up live.
    Switch {
        /// Processor.
        processor: String,
        /// Version number.
        #[arg(value_name = "VERSION")]
        number: u32,
    },
    /// Drop a building or retired version and delete its data.
    Drop {
        /// Processor.
        processor: String,
        /// Version number.
        #[arg(value_name = "VERSION")]
        number: u32,
    },
}

#[derive(Debug, Subcommand)]
enum ParkedCommand {
    /// Apply a parked key's records again, in their original order, once
    /// the cause is fixed.
    Retry {
        /// Processor.
        processor: String,
        /// The key, as `waymark parked` prints it.
        key: String,
    },
    /// Dead-letter a parked key's failing record, then apply the rest.
    Skip {
        /// Processor.
        processor: String,
        /// The key, as `waymark parked` prints it.
        key: String,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Print the dead letters (filtered).
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Admin service address.
        #[arg(long, default_value = "127.0.0.1:50051", env = "WAYMARK_GRPC_ADDR")]
        grpc_addr: String,
    },
    /// Publish the dead letters (filtered) again through Ingest, with the
    /// same validation as new input. Exit code non-zero when any was
    /// refused or could not be sent.
    Replay {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Only count what would be sent.
        #[arg(long)]
        dry_run: bool,
        /// Admin and Ingest service address.
        #[arg(long, default_value = "127.0.0.1:50051", env = "WAYMARK_GRPC_ADDR")]
        grpc_addr: String,
    },
}

/// Which dead letters.
#[derive(Debug, clap::Args)]
struct DlqFilterArgs {
    /// Only those rejected by this processor.
    #[arg(long)]
    processor: Option<String>,
    /// Only those of this kind, e.g. processing_failed or invalid_data.
    #[arg(long)]
    error: Option<String>,
    /// Only those read from this topic, e.g. waymark.inputs.
    #[arg(long)]
    topic: Option<String>,
}

impl From<DlqFilterArgs> for recovery::DlqFilter {
    fn from(a: DlqFilterArgs) -> Self {
        Self {
            processor: a.processor,
            error: a.error,
            topic: a.topic,
        }
    }
}

/// Where Kafka and the CQL cluster are.
#[derive(Debug, clap::Args)]
struct EngineArgs {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        default_value = "127.0.0.1:9092",
        env = "WAYMARK_KAFKA_BOOTSTRAP"
    )]
    bootstrap: String,
    /// A librdkafka property, KEY=VALUE (repeatable), e.g.
    /// security.protocol=SASL_SSL; env: comma-separated.
    #[arg(long = "kafka-property", value_parser = waymark_cli::scale::parse_property, env = "WAYMARK_KAFKA_PROPERTIES", value_delimiter = ',')]
    kafka_properties: Vec<(String, String)>,
    /// CQL contact points, host:port, comma-separated (ScyllaDB or Cassandra).
    #[arg(
        long,
        default_value = "127.0.0.1:9042",
        env = "WAYMARK_CQL_NODES",
        value_delimiter = ','
    )]
    cql_nodes: Vec<String>,
    /// Keyspace of the projections (created when missing).
    #[arg(long, default_value = "waymark", env = "WAYMARK_KEYSPACE")]
    keyspace: String,
    /// Prefix of the consumer groups: <prefix>.<processor>.v<version>.
    #[arg(long, default_value = "waymark", env = "WAYMARK_GROUP_PREFIX")]
    group_prefix: String,
    /// Topology file; the built-in topology.yaml when not given.
    #[arg(long, env = "WAYMARK_TOPOLOGY")]
    topology: Option<PathBuf>,
    /// MiB of rows each fold keeps cached across batches, so it reads from
    /// the cluster only rows it has not seen (0: no cache).
    #[arg(long, default_value_t = 64, env = "WAYMARK_ROW_CACHE_MB")]
    row_cache_mb: usize,
}

impl EngineArgs {
    fn options(self, metrics_addr: SocketAddr) -> anyhow::Result<EngineOptions> {
        Ok(EngineOptions {
            bootstrap: self.bootstrap,
            kafka_properties: self.kafka_properties,
            cql_nodes: self.cql_nodes,
            keyspace: self.keyspace,
            group_prefix: self.group_prefix,
            row_cache_bytes: self.row_cache_mb.saturating_mul(1024 * 1024),
            topology: load_topology(self.topology.as_deref())?,
            metrics_addr,
        })
    }
}

fn load_topology(path: Option<&std::path::Path>) -> anyhow::Result<waymark_topology::Topology> {
    match path {
        Some(path) => registry::load_topology(path),
        None => registry::default_topology(),
    }
}

#[derive(Debug, Subcommand)]
enum TopologyCommand {
    /// Check a topology file; reports every error at once with its location.
    Check {
        /// The file to check.
        #[arg(default_value = "topology.yaml")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Dev {
            data_dir,
            grpc_addr,
            metrics_addr,
            topology,
            kafka_addr,
            no_kafka,
            kafka_max_connections,
            kafka_max_in_flight,
            kafka_max_request_bytes,
            kafka_idle_timeout_secs,
        } => {
            let topology = match topology {
                Some(path) => registry::load_topology(&path)?,
                None => registry::default_topology()?,
            };
            let dev = Dev::start(DevOptions {
                data_dir: data_dir.clone(),
                grpc_addr,
                metrics_addr,
                topology,
                kafka_addr: (!no_kafka).then_some(kafka_addr),
                kafka_limits: KafkaLimits {
                    max_connections: kafka_max_connections,
                    max_in_flight: kafka_max_in_flight.max(1),
                    max_request_bytes: kafka_max_request_bytes,
                    idle_timeout: std::time::Duration::from_secs(kafka_idle_timeout_secs.max(1)),
                },
            })
            .await?;
            println!("waymark dev is ready (data in {})", data_dir.display());
            println!("  grpc:    {}", dev.info.grpc_addr);
            if !dev.info.kafka_bootstrap.is_empty() {
                println!("  kafka:   {}", dev.info.kafka_bootstrap);
            }
            println!("  metrics: http://{}/metrics", dev.info.metrics_addr);
            println!("  info:    {}", data_dir.join("dev.json").display());
            dev.run_until(shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            processors,
            engines,
            metrics_addr,
        } => {
            waymark_cli::scale::run(
                engines.options(metrics_addr)?,
                &processors,
                shutdown_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            grpc_addr,
            engines,
            metrics_addr,
        } => {
            waymark_cli::scale::serve(engines.options(metrics_addr)?, grpc_addr, shutdown_signal())
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish {
            grpc_addr,
            bootstrap,
            topic,
            file,
        } => {
            let input = match &file {
                Some(path) if path.as_os_str() != "-" => std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                _ => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("cannot read stdin")?;
                    s
                }
            };
            let target = match bootstrap {
                Some(bootstrap) => Target::Kafka { bootstrap, topic },
                None => Target::Grpc(grpc_addr),
            };
            let report = publish(&input, &target).await?;
            for (line, kind, message) in &report.rejected {
                eprintln!("line {line}: rejected: {kind}: {message}");
            }
            println!(
                "published {} events, rejected {}",
                report.accepted,
                report.rejected.len()
            );
            Ok(if report.rejected.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Replay {
            processor,
            to_version,
            switch,
            wait,
            grpc_addr,
        } => {
            let options = ReplayOptions {
                processor,
                to_version,
                switch,
                wait,
            };
            ops::replay(&grpc_addr, &options).await
        }
        Command::Projections { command, grpc_addr } => match command {
            None => ops::projections(&grpc_addr).await,
            Some(ProjectionsCommand::Switch { processor, number }) => {
                ops::switch_or_drop(&grpc_addr, &processor, number, false).await
            }
            Some(ProjectionsCommand::Drop { processor, number }) => {
                ops::switch_or_drop(&grpc_addr, &processor, number, true).await
            }
        },
        Command::Verify {
            processor,
            grpc_addr,
        } => ops::verify(&grpc_addr, processor.as_deref()).await,
        Command::Inspect {
            person_id,
            grpc_addr,
        } => ops::inspect(&grpc_addr, &person_id).await,
        Command::Parked {
            command,
            processor,
            projection_version: version,
            grpc_addr,
        } => match command {
            None => recovery::parked(&grpc_addr, processor.as_deref(), version).await,
            Some(ParkedCommand::Retry { processor, key }) => {
                recovery::retry_parked(&grpc_addr, &processor, &key, version, false).await
            }
            Some(ParkedCommand::Skip { processor, key }) => {
                recovery::retry_parked(&grpc_addr, &processor, &key, version, true).await
            }
        },
        Command::Dlq {
            command: DlqCommand::List { filter, grpc_addr },
        } => recovery::dlq_list(&grpc_addr, &filter.into()).await,
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    filter,
                    dry_run,
                    grpc_addr,
                },
        } => {
            let report = recovery::dlq_replay(&grpc_addr, &filter.into(), dry_run).await?;
            for (at, why) in &report.unsendable {
                eprintln!("not sent: {at}: {why}");
            }
            for (at, why) in &report.rejected {
                eprintln!("rejected: {at}: {why}");
            }
            println!(
                "{} {}, {} rejected, {} not sendable",
                report.accepted,
                if dry_run {
                    "would be published"
                } else {
                    "published again"
                },
                report.rejected.len(),
                report.unsendable.len()
            );
            Ok(
                if report.rejected.is_empty() && report.unsendable.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        Command::Topology {
            command: TopologyCommand::Check { file },
        } => match waymark_topology::load(&file, &registry::registry().declarations()) {
            Ok(t) => {
                println!(
                    "{}: ok ({} topics, {} processors)",
                    file.display(),
                    t.topics.iter().count(),
                    t.processors.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand's arguments are well-formed (clap checks names,
    /// conflicts and groups only when a command is built).
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
