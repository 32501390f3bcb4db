//! Byte sizes in `topology.yaml`: `256KiB`, `64MiB`, `1GiB` or a plain
//! number of bytes.

/// Why a byte size is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// An empty string.
    #[error("empty, expected a size such as `256KiB`")]
    Empty,
    /// The string does not start with a whole number (e.g. `KiB`, `1.5MiB`).
    #[error("expected a whole number, optionally followed by a unit (B, KiB, MiB, GiB)")]
    InvalidNumber,
    /// A unit that is not one of `B`, `KiB`, `MiB`, `GiB`.
    #[error("unknown unit `{unit}`, expected one of B, KiB, MiB, GiB")]
    UnknownUnit {
        /// The unit as written.
        unit: String,
    },
    /// A size of zero.
    #[error("must be greater than zero")]
    Zero,
    /// A size that does not fit in 64 bits.
    #[error("too large")]
    TooLarge,
}

const UNITS: [(&str, u64); 5] = [
    ("", 1),
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
];

/// Parses a byte size: a whole number greater than zero, optionally
/// directly followed by `B`, `KiB` (1024), `MiB` or `GiB`, e.g. `256KiB`.
/// No spaces, signs, fractions or decimal units (`kB`, `MB`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    if text.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(SizeError::InvalidNumber);
    }
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| SizeError::TooLarge)?;
    let Some((_, scale)) = UNITS.iter().find(|(u, _)| *u == unit) else {
        return Err(if unit.starts_with(['.', ',']) {
            SizeError::InvalidNumber
        } else {
            SizeError::UnknownUnit {
                unit: unit.to_owned(),
            }
        });
    };
    if number == 0 {
        return Err(SizeError::Zero);
    }
    number.checked_mul(*scale).ok_or(SizeError::TooLarge)
}

/// Formats a byte size in the largest unit that divides it, as
/// [`parse_size`] reads it back.
pub fn format_size(bytes: u64) -> String {
    for (unit, scale) in UNITS.iter().rev() {
        if *scale > 1 && bytes.is_multiple_of(*scale) && bytes > 0 {
            return format!("{}{unit}", bytes / scale);
        }
    }
    format!("{bytes}B")
}

/// Serializes a byte size as [`format_size`] writes it.
pub(crate) fn serialize_size<S: serde::Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_size(*bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256KiB"), Ok(256 * 1024));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("0KiB"), Err(SizeError::Zero));
        assert_eq!(parse_size("1.5MiB"), Err(SizeError::InvalidNumber));
        assert_eq!(parse_size("MiB"), Err(SizeError::InvalidNumber));
        assert_eq!(parse_size("-1"), Err(SizeError::InvalidNumber));
        assert!(matches!(
            parse_size("1MB"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert_eq!(parse_size("99999999999GiB"), Err(SizeError::TooLarge));
        assert_eq!(
            parse_size("99999999999999999999999"),
            Err(SizeError::TooLarge)
        );
    }

    #[test]
    fn formatting_round_trips() {
        for bytes in [1, 1000, 1024, 256 * 1024, 3 << 20, 1 << 30, (1 << 30) + 1] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes), "{bytes}");
        }
        assert_eq!(format_size(256 * 1024), "256KiB");
    }
}
