//! The identity processor as a plugin ([`IdentityProcessor`]) and its
//! batch handler: validates raw input, resolves each event's person with
//! [`crate::resolve`] and forwards it to the events topic keyed by person,
//! keeping the identity links in two tables.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;
use waymark_core::{Event, Identity, Rejection};
use waymark_runtime::handler::{source_header, BatchOutput, HandleError, Handler};
use waymark_runtime::plugin::{BuildContext, BuildError, ProcessorFactory, TableSpec};
use waymark_runtime::row::{decode_row, encode_row};
use waymark_runtime::{OutRecord, ProjectionStore, Record, RowWrite};
use waymark_schemas::Validator;
use waymark_topology::TopicRole;

use crate::{IdentityRow, MemoryView};

/// The processor's name.
pub const NAME: &str = "identity";

/// Suffix of the links table: identity key (`platform:platform_id`) →
/// [`IdentityRow`].
pub const LINKS: &str = "links";

/// Suffix of the persons table: person id → [`PersonLinks`](crate::PersonLinks).
pub const PERSONS: &str = "persons";

/// The state encoding of the identity rows ([`waymark_runtime::row`]):
/// raise it whenever [`IdentityRow`] or [`PersonLinks`](crate::PersonLinks)
/// change shape.
pub const STATE_ENCODING: u32 = 1;

/// The identity processor: reads the inputs topic, writes the events topic
/// and dead letters.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityProcessor;

impl ProcessorFactory for IdentityProcessor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn input(&self) -> TopicRole {
        TopicRole::Inputs
    }

    fn outputs(&self) -> &'static [TopicRole] {
        &[TopicRole::Events, TopicRole::Dlq]
    }

    fn tables(&self) -> &'static [TableSpec] {
        const TABLES: &[TableSpec] = &[
            TableSpec::unpositioned(LINKS, "identity key `platform:platform_id`"),
            TableSpec::unpositioned(PERSONS, "person id"),
        ];
        TABLES
    }

    fn state_encoding(&self) -> u32 {
        STATE_ENCODING
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Arc<dyn Handler>, BuildError> {
        Ok(Arc::new(IdentityHandler::new(
            ctx.validator().clone(),
            IdentityTables {
                links: ctx.table(LINKS),
                persons: ctx.table(PERSONS),
                encoding: ctx.encoding(),
            },
            ctx.output(TopicRole::Events)?,
        )))
    }
}

/// Table names of the identity processor for one projection version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityTables {
    /// identity key (`platform:platform_id`) → [`IdentityRow`].
    pub links: String,
    /// person id → [`PersonLinks`](crate::PersonLinks).
    pub persons: String,
    /// The state encoding of their rows.
    pub encoding: u32,
}

/// Resolves `waymark.inputs` into `waymark.events`.
pub struct IdentityHandler {
    validator: Arc<Validator>,
    tables: IdentityTables,
    events_topic: String,
}

impl IdentityHandler {
    /// A handler writing `tables` and forwarding to `events_topic`.
    pub fn new(
        validator: Arc<Validator>,
        tables: IdentityTables,
        events_topic: impl Into<String>,
    ) -> Self {
        Self {
            validator,
            tables,
            events_topic: events_topic.into(),
        }
    }

    fn decode(&self, record: &Record) -> Result<Event, Rejection> {
        self.validator
            .decode(record.value.as_deref().unwrap_or_default())
    }
}

#[async_trait]
impl Handler for IdentityHandler {
    fn processor(&self) -> &str {
        NAME
    }

    fn tables(&self) -> Vec<String> {
        vec![self.tables.links.clone(), self.tables.persons.clone()]
    }

    async fn handle(
        &self,
        store: &dyn ProjectionStore,
        _topic: &str,
        records: &[Record],
    ) -> Result<BatchOutput, HandleError> {
        let mut out = BatchOutput::default();
        let mut events = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            match self.decode(record) {
                Ok(event) => events.push((i, event)),
                Err(rejection) => out.rejected.push((i, rejection)),
            }
        }

        // Preload every row the batch can touch (closed over the batch, see
        // `crate::needed_persons`): the identities it names, then
        // their stored persons, their default persons and the given persons.
        let mut view = MemoryView::new();
        let identities: BTreeSet<Identity> = events
            .iter()
            .flat_map(|(_, e)| crate::needed_identities(e))
            .collect();
        let identities: Vec<Identity> = identities.into_iter().collect();
        let keys: Vec<String> = identities.iter().map(Identity::key).collect();
        let rows = store.get_many(&self.tables.links, &keys).await?;
        let mut stored: HashMap<Identity, Uuid> = HashMap::new();
        for ((identity, key), row) in identities.iter().zip(&keys).zip(rows) {
            if let Some(bytes) = row {
                let row: IdentityRow =
                    decode_row(self.tables.encoding, &self.tables.links, key, &bytes)?;
                stored.insert(identity.clone(), row.person_id);
                view.load_identity(identity.clone(), row);
            }
        }
        let persons: BTreeSet<Uuid> = events
            .iter()
            .flat_map(|(_, e)| crate::needed_persons(e, |id| stored.get(id).copied()))
            .collect();
        let persons: Vec<Uuid> = persons.into_iter().collect();
        let keys: Vec<String> = persons.iter().map(Uuid::to_string).collect();
        let rows = store.get_many(&self.tables.persons, &keys).await?;
        for ((person, key), row) in persons.iter().zip(&keys).zip(rows) {
            if let Some(bytes) = row {
                view.load_person(
                    *person,
                    decode_row(self.tables.encoding, &self.tables.persons, key, &bytes)?,
                );
            }
        }

        for (i, mut event) in events {
            let person = match crate::resolve(&mut view, &mut event) {
                Ok(person) => person,
                Err(rejection) => {
                    out.rejected.push((i, rejection));
                    continue;
                }
            };
            let mut record = OutRecord::keyed(
                self.events_topic.clone(),
                person.to_string().into_bytes(),
                event.to_json(),
            );
            // Where it came from, so that the folds apply it once even when
            // a crash makes this batch append it again.
            let source = &records[i];
            record
                .headers
                .push(source_header(source.partition, source.offset));
            out.produce.push((i, record));
            out.stats.applied += 1;
        }

        let changes = view.take_changes();
        for (identity, row) in changes.identities {
            out.rows.push(RowWrite {
                table: self.tables.links.clone(),
                key: identity.key(),
                value: Some(encode_row(self.tables.encoding, &row)),
                order: None,
            });
        }
        for (person, links) in changes.persons {
            out.rows.push(RowWrite {
                table: self.tables.persons.clone(),
                key: person.to_string(),
                value: Some(encode_row(self.tables.encoding, &links)),
                order: None,
            });
        }
        Ok(out)
    }
}
