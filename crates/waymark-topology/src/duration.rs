//! Durations as written in `topology.yaml`: `<n>ms|s|m|h|d|w`, or `forever`
//! where a [`Retention`] is expected.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// The units a duration may use, in the order they are listed in messages,
/// with their length in milliseconds.
const UNITS: [(&str, u64); 6] = [
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
    ("w", 604_800_000),
];

/// The units used by [`format_duration`], largest first. Weeks are left out
/// on purpose: `14d` reads better in logs than `2w`.
const FORMAT_UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// How long a topic keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Retention {
    /// Records are never deleted for their age (`forever`).
    Forever,
    /// Records older than this are deleted.
    Duration(Duration),
}

impl Retention {
    /// The duration, or `None` for [`Retention::Forever`].
    pub fn as_duration(self) -> Option<Duration> {
        match self {
            Retention::Forever => None,
            Retention::Duration(d) => Some(d),
        }
    }

    /// Whether records are kept forever.
    pub fn is_forever(self) -> bool {
        matches!(self, Retention::Forever)
    }

    /// The value of Kafka's `retention.ms` topic setting: `-1` for
    /// [`Retention::Forever`], otherwise the milliseconds (saturating at
    /// `i64::MAX`).
    pub fn kafka_retention_ms(self) -> i64 {
        match self {
            Retention::Forever => -1,
            Retention::Duration(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retention::Forever => f.write_str("forever"),
            Retention::Duration(d) => f.write_str(&format_duration(*d)),
        }
    }
}

impl FromStr for Retention {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_retention(s)
    }
}

impl Serialize for Retention {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Why a string is not a valid duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// The string is empty.
    #[error("expected a duration such as `7d`, found an empty string")]
    Empty,
    /// `forever` where only a finite duration is allowed.
    #[error("`forever` is not allowed here, expected a finite duration such as `7d`")]
    ForeverNotAllowed,
    /// The string does not start with a whole number (e.g. `d`, `-1d`, `1.5h`).
    #[error("expected a whole number followed by a unit (ms, s, m, h, d, w)")]
    InvalidNumber,
    /// A number without a unit (e.g. `7`).
    #[error("missing unit, expected one of ms, s, m, h, d, w")]
    MissingUnit,
    /// A unit that is not one of `ms`, `s`, `m`, `h`, `d`, `w`.
    #[error("unknown unit `{unit}`, expected one of ms, s, m, h, d, w")]
    UnknownUnit {
        /// The unit as written.
        unit: String,
    },
    /// A duration of zero.
    #[error("must be greater than zero")]
    Zero,
    /// A duration longer than [`MAX_DURATION`] (100 years).
    #[error("too large, at most 36500d (100 years)")]
    TooLarge,
}

/// The longest duration `topology.yaml` accepts: 100 years (36500 days).
/// Every duration is bounded so that no arithmetic on configuration (an
/// event time minus a dedupe window, a retention horizon) can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// Parses a finite duration: a whole number greater than zero directly
/// followed by one of the units `ms`, `s`, `m`, `h`, `d` (24 h) or `w` (7 d),
/// e.g. `250ms`, `7d`. No spaces, signs or fractions; `forever` is rejected.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text == "forever" {
        return Err(DurationError::ForeverNotAllowed);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || !unit.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(DurationError::InvalidNumber);
    }
    if unit.is_empty() {
        return Err(DurationError::MissingUnit);
    }
    let Some(&(_, unit_ms)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(DurationError::UnknownUnit {
            unit: unit.to_owned(),
        });
    };
    // `digits` is non-empty ASCII digits, so the only possible failure is
    // overflow.
    let n: u64 = digits.parse().map_err(|_| DurationError::TooLarge)?;
    if n == 0 {
        return Err(DurationError::Zero);
    }
    let ms = n.checked_mul(unit_ms).ok_or(DurationError::TooLarge)?;
    let duration = Duration::from_millis(ms);
    if duration > MAX_DURATION {
        return Err(DurationError::TooLarge);
    }
    Ok(duration)
}

/// Parses a [`Retention`]: `forever` or a duration as in [`parse_duration`].
pub fn parse_retention(text: &str) -> Result<Retention, DurationError> {
    if text == "forever" {
        Ok(Retention::Forever)
    } else {
        parse_duration(text).map(Retention::Duration)
    }
}

/// Formats a duration in the syntax [`parse_duration`] reads, with the
/// largest of `d`, `h`, `m`, `s`, `ms` that divides it exactly (`7d`, `90m`).
/// Anything below a millisecond is dropped; a zero duration gives `0ms`.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms == 0 {
        return "0ms".to_owned();
    }
    for (unit, unit_ms) in FORMAT_UNITS {
        let unit_ms = u128::from(unit_ms);
        // Not `is_multiple_of`: it needs a newer compiler than some builds
        // of this workspace declare.
        let (count, rest) = (ms / unit_ms, ms % unit_ms);
        if rest == 0 {
            return format!("{count}{unit}");
        }
    }
    format!("{ms}ms")
}

/// Serializes a [`Duration`] as [`format_duration`] text (for `serde`'s
/// `serialize_with`).
pub(crate) fn serialize_duration<S: Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&format_duration(*duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600;
    const DAY: u64 = 24 * HOUR;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(15 * 60)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * HOUR)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * DAY)));
        assert_eq!(parse_duration("365d"), Ok(Duration::from_secs(365 * DAY)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * DAY)));
        assert_eq!(parse_duration("007s"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
    }

    #[test]
    fn rejects_malformed_durations() {
        use DurationError::*;
        let cases = [
            ("", Empty),
            ("forever", ForeverNotAllowed),
            ("7", MissingUnit),
            ("d", InvalidNumber),
            ("-1d", InvalidNumber),
            ("+1d", InvalidNumber),
            ("1.5h", InvalidNumber),
            (" 7d", InvalidNumber),
            ("7d ", InvalidNumber),
            ("7 d", InvalidNumber),
            ("1h30m", InvalidNumber),
            ("0s", Zero),
            ("0ms", Zero),
            (
                "7D",
                UnknownUnit {
                    unit: "D".to_owned(),
                },
            ),
            (
                "3y",
                UnknownUnit {
                    unit: "y".to_owned(),
                },
            ),
            (
                "5min",
                UnknownUnit {
                    unit: "min".to_owned(),
                },
            ),
            ("99999999999999999999s", TooLarge),
            ("18446744073709551615w", TooLarge),
            ("100000000w", TooLarge),
            ("36501d", TooLarge),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_duration(input), Err(expected), "input {input:?}");
        }
    }

    #[test]
    fn durations_are_bounded_by_a_hundred_years() {
        let max_ms = MAX_DURATION.as_millis().to_string();
        assert_eq!(parse_duration(&format!("{max_ms}ms")), Ok(MAX_DURATION));
        let over = (MAX_DURATION.as_millis() + 1).to_string();
        assert_eq!(
            parse_duration(&format!("{over}ms")),
            Err(DurationError::TooLarge)
        );
        assert_eq!(
            parse_duration("18446744073709551615ms"),
            Err(DurationError::TooLarge)
        );
    }

    #[test]
    fn retention_accepts_forever() {
        assert_eq!(parse_retention("forever"), Ok(Retention::Forever));
        assert_eq!(
            "30d".parse::<Retention>(),
            Ok(Retention::Duration(Duration::from_secs(30 * DAY)))
        );
        assert_eq!(
            parse_retention("Forever"),
            Err(DurationError::InvalidNumber)
        );
        assert_eq!(Retention::Forever.kafka_retention_ms(), -1);
        assert_eq!(
            Retention::Duration(Duration::from_secs(7 * DAY)).kafka_retention_ms(),
            604_800_000
        );
    }

    #[test]
    fn formats_with_the_largest_exact_unit() {
        assert_eq!(format_duration(Duration::from_secs(7 * DAY)), "7d");
        assert_eq!(format_duration(Duration::from_secs(90 * 60)), "90m");
        assert_eq!(format_duration(Duration::from_millis(1_500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0ms");
        assert_eq!(Retention::Forever.to_string(), "forever");
        for text in ["250ms", "30s", "15m", "12h", "7d", "365d"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(format_duration(d), text);
        }
    }

    #[test]
    fn messages_are_lowercase_without_trailing_period() {
        let errors = [
            DurationError::Empty,
            DurationError::ForeverNotAllowed,
            DurationError::InvalidNumber,
            DurationError::MissingUnit,
            DurationError::UnknownUnit { unit: "y".into() },
            DurationError::Zero,
            DurationError::TooLarge,
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(!msg.ends_with('.'), "{msg}");
            assert!(msg.starts_with(|c: char| !c.is_uppercase()), "{msg}");
        }
    }
}
