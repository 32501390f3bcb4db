//! The identity processor's handler: validates raw input, resolves each
//! event's person and forwards it to the resolved-events topic keyed by
//! person, keeping the identity links in two tables.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;
use waymark_core::{Event, Identity, Rejection};
use waymark_identity::{IdentityRow, IdentityView, PersonLinks};
use waymark_schemas::Validator;

use crate::handler::{decode_row, encode_row, BatchOutput, HandleError, Handler};
use crate::log::{OutRecord, Record};
use crate::store::{ProjectionStore, RowWrite};

/// Table names of the identity processor for one projection version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityTables {
    /// identity key (`platform:platform_id`) → [`IdentityRow`].
    pub links: String,
    /// person id → [`PersonLinks`].
    pub persons: String,
}

impl IdentityTables {
    /// The tables of projection `version`.
    pub fn for_version(version: u32) -> Self {
        Self {
            links: format!("identity_v{version}_links"),
            persons: format!("identity_v{version}_persons"),
        }
    }
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

/// The identity rows a batch may touch, loaded up front, plus its changes.
#[derive(Default)]
struct BatchView {
    links: HashMap<Identity, Option<Uuid>>,
    persons: HashMap<Uuid, Option<PersonLinks>>,
    changed_links: BTreeSet<Identity>,
    changed_persons: BTreeSet<Uuid>,
}

impl IdentityView for BatchView {
    fn identity(&self, id: &Identity) -> Option<Uuid> {
        self.links.get(id).copied().flatten()
    }

    fn set_identity(&mut self, id: &Identity, person: Uuid) {
        self.links.insert(id.clone(), Some(person));
        self.changed_links.insert(id.clone());
    }

    fn person(&self, person: Uuid) -> Option<PersonLinks> {
        self.persons.get(&person).cloned().flatten()
    }

    fn put_person(&mut self, person: Uuid, links: PersonLinks) {
        self.persons.insert(person, Some(links));
        self.changed_persons.insert(person);
    }
}

#[async_trait]
impl Handler for IdentityHandler {
    fn processor(&self) -> &str {
        "identity"
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

        // Preload every row the batch can touch: the identities it names,
        // then their persons, their default persons and the given persons.
        let mut view = BatchView::default();
        let identities: BTreeSet<Identity> = events
            .iter()
            .flat_map(|(_, e)| waymark_identity::needed_identities(e))
            .collect();
        let identities: Vec<Identity> = identities.into_iter().collect();
        let keys: Vec<String> = identities.iter().map(Identity::key).collect();
        let rows = store.get_many(&self.tables.links, &keys).await?;
        let mut persons: BTreeSet<Uuid> = events.iter().filter_map(|(_, e)| e.person_id).collect();
        for ((identity, key), row) in identities.iter().zip(&keys).zip(rows) {
            let person = match row {
                Some(bytes) => {
                    Some(decode_row::<IdentityRow>(&self.tables.links, key, &bytes)?.person_id)
                }
                None => None,
            };
            persons.extend(person);
            persons.insert(identity.default_person_id());
            view.links.insert(identity.clone(), person);
        }
        let persons: Vec<Uuid> = persons.into_iter().collect();
        let keys: Vec<String> = persons.iter().map(Uuid::to_string).collect();
        let rows = store.get_many(&self.tables.persons, &keys).await?;
        for ((person, key), row) in persons.iter().zip(&keys).zip(rows) {
            let links = match row {
                Some(bytes) => Some(decode_row::<PersonLinks>(
                    &self.tables.persons,
                    key,
                    &bytes,
                )?),
                None => None,
            };
            view.persons.insert(*person, links);
        }

        for (i, mut event) in events {
            let person = match waymark_identity::resolve(&mut view, &mut event) {
                Ok(person) => person,
                Err(rejection) => {
                    out.rejected.push((i, rejection));
                    continue;
                }
            };
            out.produce.push(OutRecord::keyed(
                self.events_topic.clone(),
                person.to_string().into_bytes(),
                event.to_json(),
            ));
            out.stats.applied += 1;
        }

        for identity in &view.changed_links {
            if let Some(Some(person)) = view.links.get(identity) {
                out.rows.push(RowWrite {
                    table: self.tables.links.clone(),
                    key: identity.key(),
                    value: Some(encode_row(&IdentityRow { person_id: *person })),
                    order: None,
                });
            }
        }
        for person in &view.changed_persons {
            if let Some(Some(links)) = view.persons.get(person) {
                out.rows.push(RowWrite {
                    table: self.tables.persons.clone(),
                    key: person.to_string(),
                    value: Some(encode_row(links)),
                    order: None,
                });
            }
        }
        Ok(out)
    }
}
