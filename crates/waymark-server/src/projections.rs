//! The read side: the projection tables of the versions queries read, by
//! processor name. Nothing here names a processor; each processor's reads
//! are in its query module.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use uuid::Uuid;
use waymark_core::Tracked;
use waymark_runtime::handler::decode_row;
use waymark_runtime::plugin::table_name;
use waymark_runtime::{ProjectionStore, StoreError};

/// The version of each processor's projections that queries read; a
/// processor not listed reads version 1.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ActiveVersions(BTreeMap<String, u32>);

impl ActiveVersions {
    /// The versions `versions`, by processor.
    pub fn new(versions: BTreeMap<String, u32>) -> Self {
        Self(versions)
    }

    /// The version of `processor` read.
    pub fn get(&self, processor: &str) -> u32 {
        self.0.get(processor).copied().unwrap_or(1)
    }

    /// The table `suffix` of `processor` in the version read.
    pub fn table(&self, processor: &str, suffix: &str) -> String {
        table_name(processor, self.get(processor), suffix)
    }
}

/// Typed reads of the projections.
///
/// The tables read are those of the active projection versions; a switch
/// replaces them all at once ([`Projections::set_active`]), and every read
/// uses one consistent snapshot of them.
#[derive(Clone)]
pub struct Projections {
    store: Arc<dyn ProjectionStore>,
    active: Arc<RwLock<Arc<ActiveVersions>>>,
}

impl Projections {
    /// Reads the `active` versions from `store`.
    pub fn new(store: Arc<dyn ProjectionStore>, active: ActiveVersions) -> Self {
        Self {
            store,
            active: Arc::new(RwLock::new(Arc::new(active))),
        }
    }

    /// The versions read now.
    pub fn active(&self) -> Arc<ActiveVersions> {
        self.active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the `active` versions from now on (after a version switch).
    pub fn set_active(&self, active: ActiveVersions) {
        let mut current = self.active.write().unwrap_or_else(PoisonError::into_inner);
        if **current != active {
            tracing::info!(versions = ?active.0, "queries now read new projection versions");
            *current = Arc::new(active);
        }
    }

    /// The table `suffix` of `processor` in the version read now.
    pub fn table(&self, processor: &str, suffix: &str) -> String {
        self.active().table(processor, suffix)
    }

    /// The store read.
    pub fn store(&self) -> &Arc<dyn ProjectionStore> {
        &self.store
    }

    /// One person's state in the main table of fold processor `processor`
    /// (the version read now): the `state` of its
    /// [`Tracked`](waymark_core::Tracked) row, `None` when it has none.
    pub async fn state<S: serde::de::DeserializeOwned>(
        &self,
        processor: &str,
        person: Uuid,
    ) -> Result<Option<S>, StoreError> {
        let table = self.table(processor, "");
        let key = person.to_string();
        match self.store.get(&table, &key).await? {
            Some(bytes) => Ok(Some(decode_row::<Tracked<S>>(&table, &key, &bytes)?.state)),
            None => Ok(None),
        }
    }
}
