//! The read side: the projection tables of the versions queries read, by
//! processor name. Nothing here names a processor; each processor's reads
//! are in its query module.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use uuid::Uuid;
use waymark_core::Tracked;
use waymark_runtime::plugin::table_name;
use waymark_runtime::row::decode_row;
use waymark_runtime::{ProjectionStore, StoreError};

/// What queries read of one processor: its active version, the state
/// encoding of its rows, and whether it went live before catching up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveVersion {
    /// The projection version read.
    pub version: u32,
    /// The state encoding of its rows ([`waymark_runtime::row`]).
    pub encoding: u32,
    /// It replaced a version this build cannot read and has not caught up
    /// yet ([`waymark_runtime::catalog::VersionInfo::catching_up`]): reads
    /// answer `UNAVAILABLE` rather than partial state.
    pub catching_up: bool,
}

impl Default for ActiveVersion {
    /// Version 1, encoding 1, caught up.
    fn default() -> Self {
        Self {
            version: 1,
            encoding: 1,
            catching_up: false,
        }
    }
}

/// The [`ActiveVersion`] of each processor's projections; a processor not
/// listed reads [`ActiveVersion::default`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ActiveVersions(BTreeMap<String, ActiveVersion>);

impl ActiveVersions {
    /// The versions `versions`, by processor.
    pub fn new(versions: BTreeMap<String, ActiveVersion>) -> Self {
        Self(versions)
    }

    /// What `processor` reads.
    pub fn of(&self, processor: &str) -> ActiveVersion {
        self.0.get(processor).copied().unwrap_or_default()
    }

    /// The version of `processor` read.
    pub fn get(&self, processor: &str) -> u32 {
        self.of(processor).version
    }

    /// The table `suffix` of `processor` in the version read.
    pub fn table(&self, processor: &str, suffix: &str) -> Table {
        let active = self.of(processor);
        Table {
            name: table_name(processor, active.version, suffix),
            encoding: active.encoding,
            catching_up: active.catching_up,
        }
    }
}

/// One table of an active version, as queries read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Its name.
    pub name: String,
    /// The state encoding of its rows.
    pub encoding: u32,
    catching_up: bool,
}

impl Table {
    /// The table, or `UNAVAILABLE` while its version is catching up after
    /// replacing one this build cannot read.
    pub fn readable(self) -> Result<Self, StoreError> {
        if self.catching_up {
            return Err(StoreError::Unavailable(format!(
                "{} is being rebuilt from the log after a change of its state encoding; \
                 it answers once it has caught up",
                self.name
            )));
        }
        Ok(self)
    }

    /// Reads and decodes the row `key`.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        store: &dyn ProjectionStore,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match store.get(&self.name, key).await? {
            Some(bytes) => Ok(Some(decode_row(self.encoding, &self.name, key, &bytes)?)),
            None => Ok(None),
        }
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
            let versions: BTreeMap<&str, u32> = active
                .0
                .iter()
                .map(|(n, a)| (n.as_str(), a.version))
                .collect();
            tracing::info!(?versions, "queries now read new projection versions");
            *current = Arc::new(active);
        }
    }

    /// The table `suffix` of `processor` in the version read now, or
    /// `UNAVAILABLE` while that version is catching up
    /// ([`ActiveVersion::catching_up`]).
    pub fn table(&self, processor: &str, suffix: &str) -> Result<Table, StoreError> {
        self.active().table(processor, suffix).readable()
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
        let table = self.table(processor, "")?;
        let row: Option<Tracked<S>> = table.get(self.store.as_ref(), &person.to_string()).await?;
        Ok(row.map(|r| r.state))
    }
}
