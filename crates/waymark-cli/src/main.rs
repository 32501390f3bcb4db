//! `waymark`: run, feed and check a Waymark platform.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use waymark_cli::connect::{ClientTls, Endpoint};
use waymark_cli::dev::{Dev, DevOptions, KafkaLimits};
use waymark_cli::ops::{self, ReplayOptions};
use waymark_cli::publish::{publish, Target};
use waymark_cli::recovery;
use waymark_cli::registry;
use waymark_cli::scale::EngineOptions;
use waymark_cli::security::GrpcSecurityOptions;
use waymark_server::auth::{AuthConfig, Roles};

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
    #[command(flatten)]
    client: ClientArgs,
}

/// How the client commands (publish, replay, projections, verify, inspect,
/// parked, dlq) reach a secured server.
#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// Client commands: bearer token sent with every call (a static token
    /// or a JWT). Prefer --token-file or WAYMARK_TOKEN: a command line is
    /// visible to other users of the machine.
    #[arg(long, env = "WAYMARK_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Client commands: read the bearer token from this file.
    #[arg(
        long,
        env = "WAYMARK_TOKEN_FILE",
        global = true,
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// Client commands: connect with TLS, trusting this CA (PEM).
    #[arg(long, env = "WAYMARK_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// Client commands: client certificate (PEM) for mutual TLS.
    #[arg(long, env = "WAYMARK_TLS_CERT", global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client commands: the client certificate's key (PEM).
    #[arg(long, env = "WAYMARK_TLS_KEY", global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Client commands: the name in the server's certificate, when it is
    /// not the host of --grpc-addr.
    #[arg(long, env = "WAYMARK_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
}

impl ClientArgs {
    fn endpoint(&self, addr: &str) -> anyhow::Result<Endpoint> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(waymark_cli::security::read_secret(path)?),
            (None, None) => None,
        };
        let tls = (self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_domain.is_some())
            .then(|| ClientTls {
                ca: self.tls_ca.clone(),
                identity: self.tls_cert.clone().zip(self.tls_key.clone()),
                domain: self.tls_domain.clone(),
            });
        Ok(Endpoint {
            addr: addr.to_owned(),
            token,
            tls,
        })
    }
}

/// Who may scrape the metrics endpoint (docs/operations/security.md).
#[derive(Debug, clap::Args)]
struct MetricsArgs {
    /// Metrics: scrapes must send `authorization: Bearer <token>` with the
    /// token in this file (Prometheus: authorization.credentials_file).
    #[arg(long, env = "WAYMARK_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<PathBuf>,
    /// Metrics TLS: certificate chain (PEM); reloaded when it changes.
    #[arg(long, env = "WAYMARK_METRICS_TLS_CERT", requires = "metrics_tls_key")]
    metrics_tls_cert: Option<PathBuf>,
    /// Metrics TLS: the certificate's private key (PEM).
    #[arg(long, env = "WAYMARK_METRICS_TLS_KEY", requires = "metrics_tls_cert")]
    metrics_tls_key: Option<PathBuf>,
}

impl MetricsArgs {
    /// Reads the files and applies the loopback rule for `addr`.
    fn load(
        self,
        addr: SocketAddr,
        insecure: bool,
    ) -> anyhow::Result<waymark_cli::metrics_http::MetricsSecurity> {
        let token = match &self.metrics_token_file {
            Some(path) => Some(waymark_server::auth::token_digest(
                &waymark_cli::security::read_secret(path)?,
            )),
            None => None,
        };
        let tls = match self.metrics_tls_cert.zip(self.metrics_tls_key) {
            Some((cert, key)) => Some(
                waymark_tls::ServerTls::load(
                    waymark_tls::TlsFiles {
                        cert,
                        key,
                        client_ca: None,
                    },
                    Vec::new(),
                )
                .context("metrics TLS")?,
            ),
            None => None,
        };
        waymark_cli::security::check_exposure(
            "metrics",
            addr,
            tls.is_some(),
            token.is_some(),
            insecure,
            "--metrics-tls-cert and --metrics-tls-key, and --metrics-token-file",
        )?;
        Ok(waymark_cli::metrics_http::MetricsSecurity { token, tls })
    }
}

/// How `dev` and `serve` secure their gRPC port
/// (docs/operations/security.md).
#[derive(Debug, clap::Args)]
struct GrpcSecurityArgs {
    /// gRPC TLS: server certificate chain (PEM); reloaded when it changes.
    #[arg(long, env = "WAYMARK_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    grpc_tls_cert: Option<PathBuf>,
    /// gRPC TLS: the certificate's private key (PEM).
    #[arg(long, env = "WAYMARK_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    grpc_tls_key: Option<PathBuf>,
    /// gRPC mutual TLS: clients must present a certificate signed by this
    /// CA (PEM).
    #[arg(long, env = "WAYMARK_GRPC_TLS_CLIENT_CA", requires = "grpc_tls_cert")]
    grpc_tls_client_ca: Option<PathBuf>,
    /// Static tokens: lines `sha256:<hex> <name> <roles>` (`waymark token
    /// new` prints one); roles are query, ingest, admin.
    #[arg(long, env = "WAYMARK_GRPC_TOKENS")]
    grpc_tokens: Option<PathBuf>,
    /// JWTs: the issuer's public keys (a JWKS file); roles from the
    /// `roles` and `scope` claims.
    #[arg(long, env = "WAYMARK_GRPC_JWKS")]
    grpc_jwks: Option<PathBuf>,
    /// JWTs: the required issuer (`iss`).
    #[arg(long, env = "WAYMARK_GRPC_JWT_ISSUER")]
    grpc_jwt_issuer: Option<String>,
    /// JWTs: the required audience (`aud`).
    #[arg(long, env = "WAYMARK_GRPC_JWT_AUDIENCE")]
    grpc_jwt_audience: Option<String>,
    /// Roles of a client certificate by its subject common name or a DNS
    /// name: NAME=ROLES, e.g. replayer=admin,query (repeatable).
    #[arg(long = "grpc-cert-role", value_parser = waymark_cli::security::parse_certificate_role, env = "WAYMARK_GRPC_CERT_ROLES", value_delimiter = ';')]
    grpc_cert_roles: Vec<(String, waymark_server::auth::Roles)>,
    /// Health checks need credentials too (open by default).
    #[arg(long, env = "WAYMARK_GRPC_PROTECT_HEALTH")]
    grpc_protect_health: bool,
    /// Reflection needs credentials too (open by default).
    #[arg(long, env = "WAYMARK_GRPC_PROTECT_REFLECTION")]
    grpc_protect_reflection: bool,
    /// Serve non-loopback addresses even without TLS and authentication.
    #[arg(long, env = "WAYMARK_INSECURE")]
    insecure: bool,
}

impl GrpcSecurityArgs {
    fn options(self) -> anyhow::Result<GrpcSecurityOptions> {
        Ok(GrpcSecurityOptions {
            tls_cert: self.grpc_tls_cert,
            tls_key: self.grpc_tls_key,
            tls_client_ca: self.grpc_tls_client_ca,
            auth: AuthConfig {
                tokens: self.grpc_tokens,
                jwt: waymark_cli::security::jwt_config(
                    self.grpc_jwks,
                    self.grpc_jwt_issuer,
                    self.grpc_jwt_audience,
                )?,
                certificate_roles: self.grpc_cert_roles,
                protect_health: self.grpc_protect_health,
                protect_reflection: self.grpc_protect_reflection,
            },
            insecure: self.insecure,
        })
    }
}

// Parsed once per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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
        /// Kafka endpoint: the HOST:PORT clients are told to connect to
        /// after bootstrapping (Kafka's advertised.listeners), when it is
        /// not the listen address: a published container port, NAT.
        #[arg(long, env = "WAYMARK_KAFKA_ADVERTISED_ADDR", value_parser = parse_host_port)]
        kafka_advertised_addr: Option<(String, u16)>,
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
        /// Kafka endpoint TLS: server certificate chain (PEM); reloaded
        /// when it changes.
        #[arg(long, env = "WAYMARK_KAFKA_TLS_CERT", requires = "kafka_tls_key")]
        kafka_tls_cert: Option<PathBuf>,
        /// Kafka endpoint TLS: the certificate's private key (PEM).
        #[arg(long, env = "WAYMARK_KAFKA_TLS_KEY", requires = "kafka_tls_cert")]
        kafka_tls_key: Option<PathBuf>,
        /// Kafka endpoint SASL: users, one `name:password` per line (keep
        /// the file private); clients must log in before anything else.
        #[arg(long, env = "WAYMARK_KAFKA_SASL_USERS")]
        kafka_sasl_users: Option<PathBuf>,
        /// Kafka endpoint SASL mechanisms offered, comma-separated.
        #[arg(
            long,
            env = "WAYMARK_KAFKA_SASL_MECHANISMS",
            value_delimiter = ',',
            default_value = "SCRAM-SHA-512,SCRAM-SHA-256,PLAIN",
            requires = "kafka_sasl_users"
        )]
        kafka_sasl_mechanisms: Vec<waymark_broker::SaslMechanism>,
        #[command(flatten)]
        security: GrpcSecurityArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
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
        #[command(flatten)]
        metrics: MetricsArgs,
        /// Serve metrics beyond loopback without TLS and a token.
        #[arg(long, env = "WAYMARK_INSECURE")]
        insecure: bool,
    },
    /// Serve the gRPC API (Query, Ingest, Admin) on Kafka and
    /// ScyllaDB/Cassandra.
    Serve {
        /// gRPC listen address.
        #[arg(long, default_value = "127.0.0.1:50051", env = "WAYMARK_GRPC_ADDR")]
        grpc_addr: SocketAddr,
        /// Also serve grpc.health.v1 alone, plaintext and without
        /// credentials, on this address: for probes that cannot use a
        /// secured port (the kubelet's grpc probe). It reveals only
        /// whether the services are up.
        #[arg(long, env = "WAYMARK_GRPC_HEALTH_ADDR")]
        grpc_health_addr: Option<SocketAddr>,
        #[command(flatten)]
        engines: EngineArgs,
        /// Prometheus metrics listen address (an ephemeral port if busy).
        #[arg(
            long,
            default_value = "127.0.0.1:9465",
            env = "WAYMARK_SERVE_METRICS_ADDR"
        )]
        metrics_addr: SocketAddr,
        #[command(flatten)]
        security: GrpcSecurityArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
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
        /// For --bootstrap: librdkafka properties from a file, KEY=VALUE
        /// per line (security.protocol, sasl.*, ssl.ca.location).
        #[arg(long, env = "WAYMARK_KAFKA_PROPERTIES_FILE", requires = "bootstrap")]
        kafka_properties_file: Option<PathBuf>,
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
    /// Make credentials for secured servers.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
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
enum TokenCommand {
    /// Print a new random token, and the line that grants it roles in a
    /// --grpc-tokens file (which holds its SHA-256 only).
    New {
        /// A name for the holder (shown in refusals and logs).
        #[arg(long)]
        name: String,
        /// Roles: comma-separated query, ingest, admin.
        #[arg(long, value_parser = Roles::parse)]
        roles: Roles,
    },
    /// Print the tokens-file digest of a token read from stdin.
    Hash,
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
    #[arg(long = "kafka-property", value_parser = waymark_cli::scale::parse_property, env = "WAYMARK_KAFKA_PROPERTIES", value_delimiter = ',', hide_env_values = true)]
    kafka_properties: Vec<(String, String)>,
    /// librdkafka properties from a file, KEY=VALUE per line (`#`
    /// comments): the place for sasl.password and other secrets, which a
    /// command line would show to every user of the machine. Applied before
    /// --kafka-property.
    #[arg(long, env = "WAYMARK_KAFKA_PROPERTIES_FILE")]
    kafka_properties_file: Option<PathBuf>,
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
    /// Replication of the keyspace when Waymark creates it, as a CQL map,
    /// e.g. "{'class': 'NetworkTopologyStrategy', 'dc1': 3}" (an existing
    /// keyspace is left as it is).
    #[arg(long, default_value = waymark_cql::DEFAULT_REPLICATION, env = "WAYMARK_CQL_REPLICATION")]
    cql_replication: String,
    /// CQL role to log in as (PasswordAuthenticator).
    #[arg(long, env = "WAYMARK_CQL_USERNAME")]
    cql_username: Option<String>,
    /// Its password (prefer WAYMARK_CQL_PASSWORD or --cql-password-file:
    /// a command line is visible to other users).
    #[arg(
        long,
        env = "WAYMARK_CQL_PASSWORD",
        hide_env_values = true,
        conflicts_with = "cql_password_file"
    )]
    cql_password: Option<String>,
    /// Read the CQL password from this file.
    #[arg(long, env = "WAYMARK_CQL_PASSWORD_FILE")]
    cql_password_file: Option<PathBuf>,
    /// TLS to the CQL nodes, trusting this CA (PEM); node certificates
    /// must name the node's IP address.
    #[arg(long, env = "WAYMARK_CQL_TLS_CA")]
    cql_tls_ca: Option<PathBuf>,
    /// CQL client certificate (PEM), when the cluster requires one.
    #[arg(long, env = "WAYMARK_CQL_TLS_CERT", requires_all = ["cql_tls_key", "cql_tls_ca"])]
    cql_tls_cert: Option<PathBuf>,
    /// The CQL client certificate's key (PEM).
    #[arg(long, env = "WAYMARK_CQL_TLS_KEY", requires = "cql_tls_cert")]
    cql_tls_key: Option<PathBuf>,
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
    fn options(
        self,
        metrics_addr: SocketAddr,
        metrics_security: waymark_cli::metrics_http::MetricsSecurity,
    ) -> anyhow::Result<EngineOptions> {
        let mut kafka_properties = match &self.kafka_properties_file {
            Some(path) => waymark_cli::scale::read_properties(path)?,
            None => Vec::new(),
        };
        kafka_properties.extend(self.kafka_properties);
        let cql_password = match (self.cql_password, &self.cql_password_file) {
            (Some(p), _) => Some(p),
            (None, Some(path)) => Some(waymark_cli::security::read_secret(path)?),
            (None, None) => None,
        };
        Ok(EngineOptions {
            bootstrap: self.bootstrap,
            kafka_properties,
            cql_username: self.cql_username,
            cql_password: cql_password.map(waymark_cql::Secret::new),
            cql_tls: self.cql_tls_ca.map(|ca| waymark_cql::CqlTls {
                ca,
                client: self.cql_tls_cert.zip(self.cql_tls_key),
            }),
            cql_nodes: self.cql_nodes,
            keyspace: self.keyspace,
            cql_replication: self.cql_replication,
            group_prefix: self.group_prefix,
            row_cache_bytes: self.row_cache_mb.saturating_mul(1024 * 1024),
            topology: load_topology(self.topology.as_deref())?,
            metrics_addr,
            metrics_security,
        })
    }
}

/// `HOST:PORT` (a name, an IPv4 address, or `[IPv6]`).
fn parse_host_port(text: &str) -> Result<(String, u16), String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{text:?} has no host"));
    }
    Ok((host.to_owned(), port))
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
    /// Print the Strimzi `KafkaTopic`s of the topology (k8s/base/kafka/
    /// topics.yaml), or with --verify check rendered manifests against it.
    K8s {
        /// Topology file; the built-in topology.yaml when not given.
        #[arg(long, env = "WAYMARK_TOPOLOGY")]
        topology: Option<PathBuf>,
        /// The Strimzi `Kafka` cluster the topics belong to.
        #[arg(long, default_value = "waymark")]
        cluster: String,
        /// Replicas of each partition.
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// The topics' min.insync.replicas.
        #[arg(long, default_value_t = 2)]
        min_insync_replicas: u32,
        /// Check manifests (`kustomize build` output; "-" for stdin)
        /// instead: topics equal to the topology's, one Deployment per
        /// processor, none (and no KEDA ScaledObject) above its input's
        /// partitions. Exit 1 with every disagreement.
        #[arg(long, value_name = "FILE")]
        verify: Option<PathBuf>,
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
    let client = &cli.client;
    match cli.command {
        Command::Dev {
            data_dir,
            grpc_addr,
            metrics_addr,
            topology,
            kafka_addr,
            no_kafka,
            kafka_advertised_addr: kafka_advertised,
            kafka_max_connections,
            kafka_max_in_flight,
            kafka_max_request_bytes,
            kafka_idle_timeout_secs,
            kafka_tls_cert,
            kafka_tls_key,
            kafka_sasl_users,
            kafka_sasl_mechanisms,
            security,
            metrics,
        } => {
            let insecure = security.insecure;
            let metrics_security = metrics.load(metrics_addr, insecure)?;
            let grpc_security = security.options()?.load(grpc_addr)?;
            let kafka_tls = match kafka_tls_cert.zip(kafka_tls_key) {
                Some((cert, key)) => Some(
                    waymark_tls::ServerTls::load(
                        waymark_tls::TlsFiles {
                            cert,
                            key,
                            client_ca: None,
                        },
                        Vec::new(),
                    )
                    .context("Kafka endpoint TLS")?,
                ),
                None => None,
            };
            let kafka_sasl = match &kafka_sasl_users {
                Some(path) => Some(
                    waymark_broker::SaslConfig::load_users(path)
                        .context("Kafka endpoint SASL")?
                        .with_mechanisms(kafka_sasl_mechanisms),
                ),
                None => None,
            };
            if !no_kafka {
                waymark_cli::security::check_exposure(
                    "the Kafka endpoint",
                    kafka_addr,
                    kafka_tls.is_some(),
                    kafka_sasl.is_some(),
                    insecure,
                    "--kafka-tls-cert and --kafka-tls-key, and --kafka-sasl-users",
                )?;
            }
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
                kafka_advertised,
                grpc_security,
                kafka_tls,
                kafka_sasl,
                metrics_security,
            })
            .await?;
            println!("waymark dev is ready (data in {})", data_dir.display());
            println!("  grpc:    {}", dev.info.grpc_addr);
            if !dev.info.kafka_bootstrap.is_empty() {
                println!("  kafka:   {}", dev.info.kafka_bootstrap);
            }
            println!("  metrics: http://{}/metrics", dev.info.metrics_addr);
            println!("  status:  http://{}/", dev.info.metrics_addr);
            println!("  info:    {}", data_dir.join("dev.json").display());
            dev.run_until(shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            processors,
            engines,
            metrics_addr,
            metrics,
            insecure,
        } => {
            let metrics_security = metrics.load(metrics_addr, insecure)?;
            waymark_cli::scale::run(
                engines.options(metrics_addr, metrics_security)?,
                &processors,
                shutdown_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            grpc_addr,
            grpc_health_addr,
            engines,
            metrics_addr,
            security,
            metrics,
        } => {
            let metrics_security = metrics.load(metrics_addr, security.insecure)?;
            let security = security.options()?.load(grpc_addr)?;
            waymark_cli::scale::serve(
                engines.options(metrics_addr, metrics_security)?,
                grpc_addr,
                grpc_health_addr,
                security,
                shutdown_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish {
            grpc_addr,
            bootstrap,
            topic,
            kafka_properties_file,
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
                Some(bootstrap) => Target::Kafka {
                    bootstrap,
                    topic,
                    properties: match &kafka_properties_file {
                        Some(path) => waymark_cli::scale::read_properties(path)?,
                        None => Vec::new(),
                    },
                },
                None => Target::Grpc(client.endpoint(&grpc_addr)?),
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
            ops::replay(&client.endpoint(&grpc_addr)?, &options).await
        }
        Command::Projections { command, grpc_addr } => match command {
            None => ops::projections(&client.endpoint(&grpc_addr)?).await,
            Some(ProjectionsCommand::Switch { processor, number }) => {
                ops::switch_or_drop(&client.endpoint(&grpc_addr)?, &processor, number, false).await
            }
            Some(ProjectionsCommand::Drop { processor, number }) => {
                ops::switch_or_drop(&client.endpoint(&grpc_addr)?, &processor, number, true).await
            }
        },
        Command::Verify {
            processor,
            grpc_addr,
        } => ops::verify(&client.endpoint(&grpc_addr)?, processor.as_deref()).await,
        Command::Inspect {
            person_id,
            grpc_addr,
        } => ops::inspect(&client.endpoint(&grpc_addr)?, &person_id).await,
        Command::Parked {
            command,
            processor,
            projection_version: version,
            grpc_addr,
        } => match command {
            None => {
                recovery::parked(&client.endpoint(&grpc_addr)?, processor.as_deref(), version).await
            }
            Some(ParkedCommand::Retry { processor, key }) => {
                recovery::retry_parked(
                    &client.endpoint(&grpc_addr)?,
                    &processor,
                    &key,
                    version,
                    false,
                )
                .await
            }
            Some(ParkedCommand::Skip { processor, key }) => {
                recovery::retry_parked(
                    &client.endpoint(&grpc_addr)?,
                    &processor,
                    &key,
                    version,
                    true,
                )
                .await
            }
        },
        Command::Dlq {
            command: DlqCommand::List { filter, grpc_addr },
        } => recovery::dlq_list(&client.endpoint(&grpc_addr)?, &filter.into()).await,
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    filter,
                    dry_run,
                    grpc_addr,
                },
        } => {
            let report =
                recovery::dlq_replay(&client.endpoint(&grpc_addr)?, &filter.into(), dry_run)
                    .await?;
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
        Command::Token {
            command: TokenCommand::New { name, roles },
        } => {
            let (token, line) = waymark_cli::security::new_token(&name, roles)?;
            println!("token: {token}");
            println!("line for the --grpc-tokens file: {line}");
            eprintln!("(the token is shown once; the file holds only its SHA-256)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command: TokenCommand::Hash,
        } => {
            let mut token = String::new();
            std::io::stdin()
                .read_to_string(&mut token)
                .context("cannot read stdin")?;
            let token = token.trim();
            if token.is_empty() {
                anyhow::bail!("no token on stdin");
            }
            println!("{}", waymark_server::auth::token_digest(token));
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology {
            command:
                TopologyCommand::K8s {
                    topology,
                    cluster,
                    replicas,
                    min_insync_replicas,
                    verify,
                },
        } => {
            let topology = load_topology(topology.as_deref())?;
            let Some(file) = verify else {
                let options = waymark_cli::k8s::TopicOptions {
                    cluster,
                    replicas,
                    min_insync_replicas,
                };
                print!("{}", waymark_cli::k8s::render_topics(&topology, &options));
                return Ok(ExitCode::SUCCESS);
            };
            let manifests = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("cannot read stdin")?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            match waymark_cli::k8s::verify(&topology, &manifests) {
                Ok(v) => {
                    println!("{}", waymark_cli::k8s::summary(&v));
                    Ok(ExitCode::SUCCESS)
                }
                Err(problems) => {
                    for p in problems {
                        eprintln!("{}: {p}", file.display());
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
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

    #[test]
    fn host_port_parses() {
        use super::parse_host_port;
        assert_eq!(
            parse_host_port("kafka.example:9092"),
            Ok(("kafka.example".to_owned(), 9092))
        );
        assert_eq!(
            parse_host_port("[::1]:19092"),
            Ok(("::1".to_owned(), 19092))
        );
        for bad in ["kafka", ":9092", "h:0", "h:70000", "h:x"] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }
}
