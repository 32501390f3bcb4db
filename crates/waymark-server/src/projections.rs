//! The read side: typed access to the projection tables.

use std::sync::Arc;

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
        }
    }
}

/// Typed reads of the projections.
#[derive(Clone)]
pub struct Projections {
    store: Arc<dyn ProjectionStore>,
    tables: ProjectionTables,
}

impl Projections {
    /// Reads `tables` from `store`.
    pub fn new(store: Arc<dyn ProjectionStore>, tables: ProjectionTables) -> Self {
        Self { store, tables }
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
        let table = &self.tables.identity.links;
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
        let table = &self.tables.identity.persons;
        match self.store.get(table, &key).await? {
            Some(bytes) => Ok(Some(decode_row(table, &key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// The `person` projection of a person.
    pub async fn person(&self, person: Uuid) -> Result<Option<PersonState>, StoreError> {
        self.tracked(&self.tables.person, person).await
    }

    /// The `interactions` projection of a person.
    pub async fn interactions(
        &self,
        person: Uuid,
    ) -> Result<Option<InteractionsState>, StoreError> {
        self.tracked(&self.tables.interactions, person).await
    }

    /// The `journey` projection of a person.
    pub async fn journeys(&self, person: Uuid) -> Result<Option<JourneysState>, StoreError> {
        self.tracked(&self.tables.journey, person).await
    }

    /// The `learning` projection of a person.
    pub async fn learning(&self, person: Uuid) -> Result<Option<LearningState>, StoreError> {
        self.tracked(&self.tables.learning, person).await
    }

    /// Whether anything is known about a person.
    pub async fn person_known(&self, person: Uuid) -> Result<bool, StoreError> {
        Ok(self.person(person).await?.is_some() || self.links(person).await?.is_some())
    }
}
