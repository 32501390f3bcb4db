//! Cross-platform identities.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One identity of a person on one platform, e.g. `telegram:12345`.
///
/// Ordered by platform, then platform id, as contract §4 lists them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// Platform name, `[a-z0-9_-]{1,32}`.
    pub platform: String,
    /// The person's id on that platform.
    pub platform_id: String,
}

impl Identity {
    /// Builds an identity.
    pub fn new(platform: impl Into<String>, platform_id: impl Into<String>) -> Self {
        Self {
            platform: platform.into(),
            platform_id: platform_id.into(),
        }
    }

    /// The record key producers use on `waymark.inputs`: `<platform>:<platform_id>`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.platform, self.platform_id)
    }

    /// The person an identity belongs to the first time it is seen
    /// (contract §2): `UUIDv5(NAMESPACE_URL, "waymark:identity:<platform>:<platform_id>")`.
    pub fn default_person_id(&self) -> Uuid {
        default_person_id(&self.platform, &self.platform_id)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.platform, self.platform_id)
    }
}

/// `UUIDv5(NAMESPACE_URL, "waymark:identity:<platform>:<platform_id>")`.
///
/// Deterministic, so a replay from offset 0 reproduces the same person ids.
pub fn default_person_id(platform: &str, platform_id: &str) -> Uuid {
    let name = format!("waymark:identity:{platform}:{platform_id}");
    Uuid::new_v5(&Uuid::NAMESPACE_URL, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_person_id_is_uuid_v5_of_the_url_namespace() {
        let id = default_person_id("telegram", "42");
        assert_eq!(id.get_version_num(), 5);
        // Independently computed with Python:
        // uuid.uuid5(uuid.NAMESPACE_URL, "waymark:identity:telegram:42")
        assert_eq!(id.to_string(), "3095ab98-1137-5b2a-bb38-d695297f3289");
        assert_eq!(
            Uuid::NAMESPACE_URL.to_string(),
            "6ba7b811-9dad-11d1-80b4-00c04fd430c8"
        );
    }

    #[test]
    fn identities_sort_by_platform_then_id() {
        let mut ids = [
            Identity::new("web", "a"),
            Identity::new("telegram", "b"),
            Identity::new("telegram", "a"),
        ];
        ids.sort();
        assert_eq!(ids[0], Identity::new("telegram", "a"));
        assert_eq!(ids[2], Identity::new("web", "a"));
    }
}
