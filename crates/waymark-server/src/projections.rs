//! The read side: typed access to the projection tables.

use std::sync::{Arc, PoisonError, RwLock};

use uuid::Uuid;
use waymark_core::{Identity, Tracked};
use waymark_identity::{IdentityRow, PersonLinks};
use waymark_interactions::InteractionsState;
use waymark_journey::JourneysState;
use waymark_learning::LearningState;
use waymark_person::PersonState;
use waymark_runtime::handler::decode_row;
use waymark_runtime::identity::IdentityTables;
use waymark_runtime::{ProjectionStore, StoreError};

/// The table of each projection that queries read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionTables {
    /// Identity links and persons.
    pub identity: IdentityTables,
    /// `person` projection.
    pub person: String,
    /// `interactions` projection.
    pub interactions: String,
    /// `journey` projection.
    pub journey: String,
    /// `learning` projection.
    pub learning: String,
    /// Per-person event history (kept by the `person` processor).
    pub history: String,
}

impl ProjectionTables {
    /// Version 1 of every projection.
    pub fn v1() -> Self {
        Self {
            identity: IdentityTables::for_version(1),
            person: "person_v1".into(),
            interactions: "interactions_v1".into(),
            journey: "journey_v1".into(),
            learning: "learning_v1".into(),
            history: waymark_runtime::history::history_table(1),
        }
    }
}

/// Typed reads of the projections.
///
/// The tables read are those of the active projection versions; a switch
/// replaces them all at once ([`Projections::set_tables`]), and every read
/// uses one consistent snapshot of them.
#[derive(Clone)]
pub struct Projections {
    store: Arc<dyn ProjectionStore>,
    tables: Arc<RwLock<Arc<ProjectionTables>>>,
}

impl Projections {
    /// Reads `tables` from `store`.
    pub fn new(store: Arc<dyn ProjectionStore>, tables: ProjectionTables) -> Self {
        Self {
            store,
            tables: Arc::new(RwLock::new(Arc::new(tables))),
        }
    }

    /// The tables read now.
    pub fn tables(&self) -> Arc<ProjectionTables> {
        self.tables
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads `tables` from now on (after a version switch).
    pub fn set_tables(&self, tables: ProjectionTables) {
        let mut current = self.tables.write().unwrap_or_else(PoisonError::into_inner);
        if **current != tables {
            tracing::info!(?tables, "queries now read new projection versions");
            *current = Arc::new(tables);
        }
    }

    /// The store read.
    pub fn store(&self) -> &Arc<dyn ProjectionStore> {
        &self.store
    }

    /// One page of a person's event history: entries `from ..` (at most
    /// `limit`) and the total count.
    pub async fn history(
        &self,
        person: Uuid,
        from: u64,
        limit: u64,
    ) -> Result<Option<(Vec<waymark_runtime::history::HistoryEntry>, u64)>, StoreError> {
        let table = self.tables().history.clone();
        waymark_runtime::history::read_page(
            self.store.as_ref(),
            &table,
            &person.to_string(),
            from,
            limit,
        )
        .await
    }

    async fn tracked<S: serde::de::DeserializeOwned>(
        &self,
        table: &str,
        person: Uuid,
    ) -> Result<Option<S>, StoreError> {
        let key = person.to_string();
        match self.store.get(table, &key).await? {
            Some(bytes) => Ok(Some(decode_row::<Tracked<S>>(table, &key, &bytes)?.state)),
            None => Ok(None),
        }
    }

    /// The person an identity resolves to.
    pub async fn resolve(&self, identity: &Identity) -> Result<Option<Uuid>, StoreError> {
        let key = identity.key();
        let tables = self.tables();
        let table = &tables.identity.links;
        match self.store.get(table, &key).await? {
            Some(bytes) => Ok(Some(
                decode_row::<IdentityRow>(table, &key, &bytes)?.person_id,
            )),
            None => Ok(None),
        }
    }

    /// The identities of a person and whom it was merged into.
    pub async fn links(&self, person: Uuid) -> Result<Option<PersonLinks>, StoreError> {
        let key = person.to_string();
        let tables = self.tables();
        let table = &tables.identity.persons;
        match self.store.get(table, &key).await? {
            Some(bytes) => Ok(Some(decode_row(table, &key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// The `person` projection of a person.
    pub async fn person(&self, person: Uuid) -> Result<Option<PersonState>, StoreError> {
        let table = self.tables().person.clone();
        self.tracked(&table, person).await
    }

    /// The `interactions` projection of a person.
    pub async fn interactions(
        &self,
        person: Uuid,
    ) -> Result<Option<InteractionsState>, StoreError> {
        let table = self.tables().interactions.clone();
        self.tracked(&table, person).await
    }

    /// The `journey` projection of a person.
    pub async fn journeys(&self, person: Uuid) -> Result<Option<JourneysState>, StoreError> {
        let table = self.tables().journey.clone();
        self.tracked(&table, person).await
    }

    /// The `learning` projection of a person.
    pub async fn learning(&self, person: Uuid) -> Result<Option<LearningState>, StoreError> {
        let table = self.tables().learning.clone();
        self.tracked(&table, person).await
    }

    /// Whether anything is known about a person.
    pub async fn person_known(&self, person: Uuid) -> Result<bool, StoreError> {
        Ok(self.person(person).await?.is_some() || self.links(person).await?.is_some())
    }
}
