//! Human durations as used on the command line and in config files:
//! `90s`, `30m`, `24h`, `8760h`, `1h30m`, `500ms`, `7d`.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration: write a number with a unit, e.g. \"30s\", \"15m\", \"24h\"")]
    Empty,
    #[error("bad duration {input:?}: expected numbers with units ms, s, m, h or d, e.g. \"90s\" or \"1h30m\"")]
    Malformed { input: String },
    #[error("duration {input:?} is too large")]
    Overflow { input: String },
}

/// Parses `1h30m`-style durations. Every number needs a unit.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let malformed = || DurationError::Malformed {
        input: input.to_string(),
    };
    let overflow = || DurationError::Overflow {
        input: input.to_string(),
    };
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total_ms: u64 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(malformed());
        }
        let number: u64 = s[start..i].parse().map_err(|_| overflow())?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit_ms: u64 = match &s[unit_start..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(malformed()),
        };
        let part = number.checked_mul(unit_ms).ok_or_else(overflow)?;
        total_ms = total_ms.checked_add(part).ok_or_else(overflow)?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Formats a duration the way [`parse_duration`] reads it (largest units first).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis() as u64;
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3_600_000u64), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{}", ms / size, unit));
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("8760h"),
            Ok(Duration::from_secs(8760 * 3600))
        );
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86400)));
    }

    #[test]
    fn rejects_bad_forms() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        for bad in ["10", "h", "10x", "1.5h", "-3s", "s10", "10 s"] {
            assert!(
                matches!(parse_duration(bad), Err(DurationError::Malformed { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_duration("99999999999999999999h"),
            Err(DurationError::Overflow { .. })
        ));
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn format_round_trips(ms in 0u64..10_000_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
