//! Durations as written in config files and on the command line: `60s`,
//! `100ms`, `5m`, `1h`, or a bare number of seconds (`0` disables a timer).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: expected a number with a unit (ms, s, m, h), e.g. 60s")]
pub struct DurationError(String);

pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError(text.to_string());
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let millis_per_unit: u64 = match unit.trim() {
        "" | "s" => 1_000,
        "ms" => 1,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    if let Ok(whole) = number.parse::<u64>() {
        let ms = whole.checked_mul(millis_per_unit).ok_or_else(bad)?;
        return Ok(Duration::from_millis(ms));
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let secs = value * millis_per_unit as f64 / 1000.0;
    if !secs.is_finite() || secs > 1e12 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `#[serde(with = "rouse_config::duration")]`
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
    }
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn units() {
        assert_eq!(parse("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert!(parse("ten").is_err());
        assert!(parse("5 parsecs").is_err());
        assert!(parse("").is_err());
    }

    proptest! {
        #[test]
        fn format_round_trips(ms in 0u64..10_000_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse(&format(d)).unwrap(), d);
        }

        #[test]
        fn never_panics(s in "\\PC{0,20}") {
            let _ = parse(&s);
        }
    }
}
