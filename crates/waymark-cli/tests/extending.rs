//! A processor added exactly as `docs/extending.md` says: a pure fold with
//! one plugin factory (here a module standing in for its crate), one
//! registry line, one `topology.yaml` entry. Nothing else in Waymark names
//! it, yet the topology validates its parameters, the controller creates
//! its tables and runs it, `verify` recomputes it, `Admin` lists it and the
//! query side reads it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::event;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use waymark_cli::platform::topic_configs;
use waymark_control::{Controller, PlatformOperator};
use waymark_core::default_person_id;
use waymark_embedded::{EmbeddedLog, EmbeddedStore};
use waymark_runtime::{Log, OutRecord, ProjectionStore};
use waymark_schemas::Validator;
use waymark_server::{Operator, Projections};

/// The processor's crate: what `processors/sessions/src/lib.rs` would hold.
mod sessions {
    use std::sync::Arc;

    use chrono::{DateTime, Duration, Utc};
    use serde::{Deserialize, Serialize};
    use waymark_core::{Event, Fold};
    use waymark_runtime::plugin::{BuildContext, BuildError, ProcessorFactory, TableSpec};
    use waymark_runtime::Handler;
    use waymark_topology::{ParamKind, ParamSpec};

    /// The processor's name.
    pub(crate) const NAME: &str = "sessions";

    /// A person's sessions: runs of events with gaps of at most the
    /// session gap between them.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub(crate) struct SessionsState {
        /// Sessions so far.
        pub(crate) sessions: u64,
        /// The latest event time.
        pub(crate) last: Option<DateTime<Utc>>,
    }

    /// Counts sessions.
    pub(crate) struct SessionsFold {
        gap: Duration,
    }

    impl Fold for SessionsFold {
        type State = SessionsState;

        fn apply(&self, state: &mut SessionsState, event: &Event) {
            if state.last.is_none_or(|last| event.time - last > self.gap) {
                state.sessions += 1;
            }
            state.last = Some(state.last.map_or(event.time, |l| l.max(event.time)));
        }
    }

    /// The plugin.
    pub(crate) struct SessionsProcessor;

    impl ProcessorFactory for SessionsProcessor {
        fn name(&self) -> &'static str {
            NAME
        }

        fn params(&self) -> &'static [ParamSpec] {
            &[ParamSpec {
                name: "session_gap",
                kind: ParamKind::Duration,
            }]
        }

        fn tables(&self) -> &'static [TableSpec] {
            const TABLES: &[TableSpec] = &[TableSpec::tracked("", "person id")];
            TABLES
        }

        fn state_encoding(&self) -> u32 {
            1
        }

        fn build(&self, ctx: &BuildContext<'_>) -> Result<Arc<dyn Handler>, BuildError> {
            let gap = ctx
                .spec()
                .duration_param("session_gap")
                .map_or(Duration::minutes(30), |d| {
                    Duration::from_std(d).unwrap_or(Duration::MAX)
                });
            Ok(ctx.fold(SessionsFold { gap }))
        }
    }
}

/// The topology entry.
const ENTRY: &str = "  sessions:
    inputs: [waymark.events]
    outputs: [waymark.dlq]
    projection_version: 1
    session_gap: 30m
";

fn registry() -> waymark_runtime::plugin::Registry {
    // The registry line.
    waymark_cli::registry::builtin().with(Arc::new(sessions::SessionsProcessor))
}

fn topology_text() -> String {
    format!("{}{ENTRY}", waymark_topology::default_yaml())
}

#[test]
fn the_topology_checks_the_new_processor_and_its_parameters() {
    let registry = registry();
    let decls = registry.declarations();
    let topology = waymark_topology::parse(&topology_text(), &decls).unwrap();
    let spec = topology.processor("sessions").unwrap();
    assert_eq!(
        spec.duration_param("session_gap"),
        Some(Duration::from_secs(1800))
    );

    // The built-in binary does not know it.
    let builtin = waymark_cli::registry::registry().declarations();
    let err = waymark_topology::parse(&topology_text(), &builtin).unwrap_err();
    assert!(
        err.to_string().contains("unknown processor `sessions`"),
        "{err}"
    );
    // Its parameter is typed, and its own.
    let wrong = topology_text().replace("session_gap: 30m", "session_gap: often");
    let err = waymark_topology::parse(&wrong, &decls).unwrap_err();
    assert!(
        err.to_string().contains("processors.sessions.session_gap"),
        "{err}"
    );
    let elsewhere = topology_text().replace("  journey:\n", "  journey:\n    session_gap: 1h\n");
    let err = waymark_topology::parse(&elsewhere, &decls).unwrap_err();
    assert!(
        err.to_string().contains(
            "`processors.journey.session_gap` is not supported, only these processors have a session_gap: sessions"
        ),
        "{err}"
    );
    // Its wiring is the one it declares.
    let rewired = topology_text().replace(
        "  sessions:\n    inputs: [waymark.events]",
        "  sessions:\n    inputs: [waymark.inputs]",
    );
    let err = waymark_topology::parse(&rewired, &decls).unwrap_err();
    assert!(
        err.to_string()
            .contains("`processors.sessions.inputs` must be [waymark.events]"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_processor_runs_verifies_lists_and_answers_queries() {
    let registry = registry();
    let topology = waymark_topology::parse(&topology_text(), &registry.declarations()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let embedded_log = EmbeddedLog::open(&dir.path().join("log.redb")).unwrap();
    let embedded_store = EmbeddedStore::open(&dir.path().join("store")).unwrap();
    let log: Arc<dyn Log> = Arc::new(embedded_log.clone());
    let store: Arc<dyn ProjectionStore> = Arc::new(embedded_store.clone());
    log.ensure_topics(&topic_configs(&topology)).await.unwrap();
    let validator = Arc::new(Validator::new().unwrap());

    let names: Vec<String> = registry
        .configured(&topology)
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert!(names.iter().any(|n| n == sessions::NAME));
    let (mut controller, handle) = Controller::new(
        registry.clone(),
        log.clone(),
        store.clone(),
        topology.clone(),
        validator.clone(),
        names,
        "extending-test",
    );
    controller.start().await.unwrap();
    let token = CancellationToken::new();
    let running = tokio::spawn(controller.run(token.clone()));

    // Two sessions: 00:00 and 00:10, then 02:00 and 02:05.
    let times = [
        "2026-06-01T00:00:00Z",
        "2026-06-01T00:10:00Z",
        "2026-06-01T02:00:00Z",
        "2026-06-01T02:05:00Z",
    ];
    let records = times
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let e = event(
                &format!("s{i}"),
                "interaction.recorded",
                t,
                ("chat", "u1"),
                json!({"kind": "message", "content_type": "text"}),
            );
            OutRecord::keyed("waymark.inputs", "chat:u1", e.into_bytes())
        })
        .collect();
    log.produce(records).await.unwrap();

    // The query side reads it by name, in the version the catalog says.
    let projections = Projections::new(
        store.clone(),
        waymark_control::configured_versions(&registry, &topology),
    );
    let person = default_person_id("chat", "u1");
    let state = common::eventually("the sessions projection", || async {
        let s: sessions::SessionsState = projections.state(sessions::NAME, person).await.ok()??;
        (s.sessions == 2).then_some(s)
    })
    .await;
    assert_eq!(state.last, Some("2026-06-01T02:05:00Z".parse().unwrap()));
    assert_eq!(
        store
            .positions("sessions.v1", "waymark.events")
            .await
            .unwrap()
            .values()
            .sum::<u64>(),
        4
    );

    // Admin lists it with its tables, and verify recomputes it.
    let operator = PlatformOperator::new(
        registry.clone(),
        log.clone(),
        store.clone(),
        topology.clone(),
        validator.clone(),
        projections.clone(),
        Some(handle),
    );
    let listed = operator.list().await.unwrap();
    let mine = listed
        .iter()
        .find(|p| p.processor == sessions::NAME)
        .expect("listed");
    assert_eq!(mine.input_topic, "waymark.events");
    assert_eq!(mine.versions[0].tables, ["sessions_v1"]);
    let reports = operator.verify(Some(sessions::NAME)).await.unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].records_replayed, 4);
    assert_eq!(reports[0].rows_compared, 1);
    assert_eq!(
        reports[0].difference_count, 0,
        "{:?}",
        reports[0].differences
    );

    token.cancel();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    embedded_store.close();
}
