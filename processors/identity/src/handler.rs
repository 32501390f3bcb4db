//! The identity processor as a plugin ([`IdentityProcessor`]) and its
//! batch handler: validates raw input, resolves each event's person with
//! [`crate::resolve`] and forwards it to the events topic keyed by person,
//! keeping the identity links in two tables.

use std::collections::{BTreeMap, BTreeSet};
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

use crate::{resolve, IdentityRow, MemoryView, PersonLinks, Stamp};

/// The processor's name.
pub const NAME: &str = "identity";

/// Suffix of the links table: identity key (`platform:platform_id`) →
/// [`IdentityRow`].
pub const LINKS: &str = "links";

/// Suffix of the persons table: person id → [`PersonLinks`](crate::PersonLinks).
pub const PERSONS: &str = "persons";

/// Suffix of the resolutions table: input partition → the
/// [`Resolutions`](crate::Resolutions) of its latest batch, written only on
/// stores that several processes write at once (see `shared.rs`).
pub const RESOLUTIONS: &str = "resolutions";

/// The state encoding of the identity rows ([`waymark_runtime::row`]):
/// raise it whenever [`IdentityRow`], [`PersonLinks`] or
/// [`Resolutions`](crate::Resolutions) change shape. 2: rows record their
/// transitions, person rows are merges (several writers).
pub const STATE_ENCODING: u32 = 2;

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
            TableSpec::bookkeeping(RESOLUTIONS, "input partition"),
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
                resolutions: ctx.table(RESOLUTIONS),
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
    /// person id → [`PersonLinks`].
    pub persons: String,
    /// input partition → [`Resolutions`](crate::Resolutions).
    pub resolutions: String,
    /// The state encoding of their rows.
    pub encoding: u32,
}

/// Resolves `waymark.inputs` into `waymark.events`.
pub struct IdentityHandler {
    validator: Arc<Validator>,
    pub(crate) tables: IdentityTables,
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

    /// The record of `waymark.events` for `event`, resolved from `source`:
    /// keyed by its person and carrying where it came from, so that the
    /// folds apply it once even when a crash makes a batch append it again.
    pub(crate) fn output(&self, source: &Record, person: Uuid, event: &Event) -> OutRecord {
        let mut record = OutRecord::keyed(
            self.events_topic.clone(),
            person.to_string().into_bytes(),
            event.to_json(),
        );
        record
            .headers
            .push(source_header(source.partition, source.offset));
        record
    }

    /// Reads identity rows by identity.
    pub(crate) async fn load_identities(
        &self,
        store: &dyn ProjectionStore,
        ids: &[Identity],
    ) -> Result<Vec<Option<(Vec<u8>, IdentityRow)>>, HandleError> {
        let keys: Vec<String> = ids.iter().map(Identity::key).collect();
        let rows = store.get_many(&self.tables.links, &keys).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (key, row) in keys.iter().zip(rows) {
            out.push(match row {
                Some(bytes) => {
                    let row = decode_row(self.tables.encoding, &self.tables.links, key, &bytes)?;
                    Some((bytes, row))
                }
                None => None,
            });
        }
        Ok(out)
    }

    /// Reads person rows by person.
    pub(crate) async fn load_persons(
        &self,
        store: &dyn ProjectionStore,
        persons: &[Uuid],
    ) -> Result<Vec<Option<(Vec<u8>, PersonLinks)>>, HandleError> {
        let keys: Vec<String> = persons.iter().map(Uuid::to_string).collect();
        let rows = store.get_many(&self.tables.persons, &keys).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (key, row) in keys.iter().zip(rows) {
            out.push(match row {
                Some(bytes) => {
                    let row = decode_row(self.tables.encoding, &self.tables.persons, key, &bytes)?;
                    Some((bytes, row))
                }
                None => None,
            });
        }
        Ok(out)
    }

    /// A batch on a store with one writer (this process): resolve it
    /// against the rows as stored, then write the changed identity rows and
    /// the person rows with the batch's changes merged in, in the batch's
    /// one atomic write.
    async fn handle_alone(
        &self,
        store: &dyn ProjectionStore,
        records: &[Record],
        events: Vec<(usize, Event)>,
        mut out: BatchOutput,
    ) -> Result<BatchOutput, HandleError> {
        let mut view = MemoryView::new();
        let identities: BTreeSet<Identity> = events
            .iter()
            .flat_map(|(_, e)| crate::needed_identities(e))
            .collect();
        let identities: Vec<Identity> = identities.into_iter().collect();
        let rows = self.load_identities(store, &identities).await?;
        for (identity, row) in identities.into_iter().zip(rows) {
            if let Some((_, row)) = row {
                view.load_identity(identity, row);
            }
        }

        for (i, mut event) in events {
            let source = &records[i];
            let at = Stamp::of(&event, source.partition, source.offset);
            match resolve(&mut view, &mut event, at) {
                Ok(resolved) => {
                    out.produce
                        .push((i, self.output(source, resolved.person, &event)));
                    out.stats.applied += 1;
                }
                Err(rejection) => out.rejected.push((i, rejection)),
            }
        }

        let changes = view.take_changes();
        let persons: Vec<Uuid> = changes.persons().into_iter().collect();
        let loaded = self.load_persons(store, &persons).await?;
        let mut rows: BTreeMap<Uuid, PersonLinks> = persons
            .iter()
            .zip(loaded)
            .map(|(p, row)| (*p, row.map(|(_, r)| r).unwrap_or_default()))
            .collect();
        for change in &changes.person_changes {
            rows.entry(change.person).or_default().apply(change);
        }
        for (identity, row) in changes.identities {
            out.rows.push(RowWrite {
                table: self.tables.links.clone(),
                key: identity.key(),
                value: Some(encode_row(self.tables.encoding, &row)),
                order: None,
            });
        }
        for (person, links) in rows {
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

#[async_trait]
impl Handler for IdentityHandler {
    fn processor(&self) -> &str {
        NAME
    }

    fn tables(&self) -> Vec<String> {
        vec![
            self.tables.links.clone(),
            self.tables.persons.clone(),
            self.tables.resolutions.clone(),
        ]
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
        if store.written_by_several_processes() {
            crate::shared::handle(self, store, records, events, out).await
        } else {
            self.handle_alone(store, records, events, out).await
        }
    }
}
