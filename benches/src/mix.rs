//! The event mix of the benchmarks.
//!
//! The contract names the event types but no traffic mix, so this one is
//! Waymark's benchmark mix (documented in `docs/performance.md`): every
//! type of contract §3, weighted towards interactions, with about 200 bytes
//! per raw envelope and persons drawn uniformly at random.
//!
//! | share | type |
//! |---|---|
//! | 40 % | `interaction.recorded` (message, reaction, view, call; text content of 20–60 chars) |
//! | 5 % | `journey.started` |
//! | 15 % | `journey.stage_entered` |
//! | 5 % | `journey.completed` |
//! | 7 % | `learning.lesson_completed` v1 (`score`, upcast to v2) |
//! | 8 % | `learning.lesson_completed` v2 (`result`) |
//! | 15 % | `learning.quiz_answered` |
//! | 5 % | `identity.linked` (an e-mail identity of the same person) |

use serde_json::{json, Value};
use uuid::Uuid;
use waymark_core::{default_person_id, Rejection};
use waymark_schemas::Validator;

/// Event times start here (2026-01-01T00:00:00Z) and advance one second
/// per event index.
const BASE_UNIX_SECS: i64 = 1_767_225_600;

const PLATFORMS: [&str; 3] = ["web", "telegram", "whatsapp"];

const WORDS: [&str; 16] = [
    "hello", "lesson", "thanks", "question", "about", "the", "next", "stage", "please", "help",
    "quiz", "score", "great", "course", "when", "today",
];

/// One raw input event: its record key on `waymark.inputs`
/// (`<platform>:<platform_id>`) and its JSON envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    /// Record key.
    pub key: String,
    /// The JSON envelope, as a producer writes it.
    pub json: String,
}

/// The deterministic event mix over `persons` persons.
#[derive(Debug, Clone)]
pub struct Mix {
    tag: String,
    persons: u64,
    seed: u64,
}

/// SplitMix64: a tiny, good-enough deterministic generator.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Mix {
    /// A mix whose event ids start with `tag` (so mixes with different tags
    /// never share an id), over `persons` persons (at least 1).
    pub fn new(tag: &str, persons: u64) -> Self {
        let seed = tag.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self {
            tag: tag.to_owned(),
            persons: persons.max(1),
            seed,
        }
    }

    /// Number of persons.
    pub fn persons(&self) -> u64 {
        self.persons
    }

    fn random(&self, i: u64, stream: u64) -> u64 {
        splitmix(self.seed ^ splitmix(i.wrapping_mul(8).wrapping_add(stream)))
    }

    /// The person (index) event `i` belongs to.
    pub fn person_of(&self, i: u64) -> u64 {
        self.random(i, 0) % self.persons
    }

    /// The source identity `(platform, platform_id)` of person `p`.
    pub fn source(p: u64) -> (&'static str, String) {
        (PLATFORMS[(p % 3) as usize], format!("user-{p:07}"))
    }

    /// The person id person `p` resolves to (its default person id).
    pub fn person_id(p: u64) -> Uuid {
        let (platform, id) = Self::source(p);
        default_person_id(platform, &id)
    }

    /// Raw event number `i`.
    pub fn raw(&self, i: u64) -> RawEvent {
        let p = self.person_of(i);
        let (platform, platform_id) = Self::source(p);
        let r = self.random(i, 1);
        let pick = r % 100;
        let small = (r >> 8) % 1000;
        let secs = BASE_UNIX_SECS + i as i64;
        let time = chrono::DateTime::from_timestamp(secs, 0)
            .unwrap_or_default()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let (ty, version, data) = match pick {
            0..=39 => {
                let kind = ["message", "message", "reaction", "view", "call"][(small % 5) as usize];
                let words = 3 + (small % 7) as usize;
                let content: Vec<&str> = (0..words)
                    .map(|w| WORDS[((r >> (12 + w * 4)) % 16) as usize])
                    .collect();
                let mut data =
                    json!({"kind": kind, "content_type": "text", "content": content.join(" ")});
                if small.is_multiple_of(4) {
                    data["direction"] = json!("outbound");
                }
                ("interaction.recorded", 1, data)
            }
            40..=44 => (
                "journey.started",
                1,
                json!({"journey_id": format!("journey-{}", small % 3), "stage": "welcome"}),
            ),
            45..=59 => (
                "journey.stage_entered",
                1,
                json!({"journey_id": format!("journey-{}", small % 3), "stage": format!("stage-{}", small % 8)}),
            ),
            60..=64 => (
                "journey.completed",
                1,
                json!({"journey_id": format!("journey-{}", small % 3)}),
            ),
            65..=71 => (
                "learning.lesson_completed",
                1,
                json!({"course_id": format!("course-{}", small % 4), "lesson_id": format!("lesson-{}", small % 20), "score": small % 101}),
            ),
            72..=79 => (
                "learning.lesson_completed",
                2,
                json!({"course_id": format!("course-{}", small % 4), "lesson_id": format!("lesson-{}", small % 20), "result": {"points": small % 11, "max_points": 10}}),
            ),
            80..=94 => (
                "learning.quiz_answered",
                1,
                json!({"course_id": format!("course-{}", small % 4), "quiz_id": format!("quiz-{}", small % 30), "correct": !small.is_multiple_of(3)}),
            ),
            _ => (
                "identity.linked",
                1,
                json!({"platform": "email", "platform_id": format!("user-{p:07}@example.com")}),
            ),
        };
        let envelope = json!({
            "id": format!("{}-{i:09}", self.tag),
            "type": ty,
            "version": version,
            "time": time,
            "source": {"platform": platform, "platform_id": platform_id},
            "data": data,
        });
        RawEvent {
            key: format!("{platform}:{platform_id}"),
            json: envelope.to_string(),
        }
    }

    /// Resolved event number `i` as the identity processor writes it to
    /// `waymark.events`: `(key, canonical JSON)`, keyed by its person id.
    pub fn resolved(&self, validator: &Validator, i: u64) -> Result<(String, Vec<u8>), Rejection> {
        let raw = self.raw(i);
        let mut event = validator.decode(raw.json.as_bytes())?;
        let person = Self::person_id(self.person_of(i));
        event.person_id = Some(person);
        Ok((person.to_string(), event.to_json()))
    }
}

/// A raw `interaction.recorded` event of a person nobody else writes to
/// (platform `bench`), used as a visibility probe.
pub fn probe_event(id: &str, platform_id: &str, time_unix_secs: i64) -> String {
    let time = chrono::DateTime::from_timestamp(time_unix_secs, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let v: Value = json!({
        "id": id,
        "type": "interaction.recorded",
        "time": time,
        "source": {"platform": "bench", "platform_id": platform_id},
        "data": {"kind": "message", "content_type": "text", "content": "probe"},
    });
    v.to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_mix_is_valid_deterministic_and_about_200_bytes() {
        let validator = Validator::new().unwrap();
        let mix = Mix::new("t", 100);
        let mut bytes = 0;
        let mut types = std::collections::BTreeSet::new();
        for i in 0..2000 {
            let raw = mix.raw(i);
            assert_eq!(raw, mix.raw(i));
            let event = validator
                .decode(raw.json.as_bytes())
                .unwrap_or_else(|r| panic!("event {i} rejected: {r:?}: {}", raw.json));
            types.insert(event.event_type());
            bytes += raw.json.len();
            let (key, canonical) = mix.resolved(&validator, i).unwrap();
            assert_eq!(key, Mix::person_id(mix.person_of(i)).to_string());
            assert!(waymark_core::Event::from_json(&canonical).is_ok());
        }
        assert_eq!(types.len(), waymark_core::EventType::ALL.len());
        let mean = bytes / 2000;
        assert!((150..=260).contains(&mean), "mean raw size {mean}");
    }

    #[test]
    fn probes_are_valid() {
        let validator = Validator::new().unwrap();
        let e = validator
            .decode(probe_event("p-1", "probe-1", 1_767_225_600).as_bytes())
            .unwrap();
        assert_eq!(e.source.unwrap().platform, "bench");
    }
}
