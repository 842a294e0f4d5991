//! Sizes and durations as people write them: `128MiB`, `64KiB`, `1048576`;
//! `500ms`, `2s`, `1m`, `30`. Used by flags and manifests alike.

use std::fmt;
use std::time::Duration;

/// A number of bytes, written with a binary unit when one fits exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl Bytes {
    /// Parses `4096`, `4096B`, `64KiB`, `128MiB` or `1GiB` (also `K`, `M`,
    /// `G`, which mean the same).
    pub fn parse(text: &str) -> Result<Bytes, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size like 65536, 64KiB or 128MiB"))?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            unit => {
                return Err(format!(
                    "unknown unit {unit:?} in {text:?}: use B, KiB, MiB or GiB"
                ));
            }
        };
        number
            .checked_mul(scale)
            .map(Bytes)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Bytes(n) = *self;
        for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= scale && n % scale == 0 {
                return write!(f, "{} {unit}", n / scale);
            }
        }
        write!(f, "{n} bytes")
    }
}

/// Parses `30`, `30s`, `500ms`, `1.5s` or `2m`; a bare number is seconds.
/// Zero is refused: no limit or timeout means "at once".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 500ms or 2m"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration"))
}

/// A duration the way the limits are documented: whole milliseconds.
pub fn display_millis(duration: Duration) -> String {
    format!("{} ms", duration.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units_or_bytes() {
        assert_eq!(Bytes::parse("4096"), Ok(Bytes(4096)));
        assert_eq!(Bytes::parse("4096B"), Ok(Bytes(4096)));
        assert_eq!(Bytes::parse("64KiB"), Ok(Bytes(64 << 10)));
        assert_eq!(Bytes::parse("128 MiB"), Ok(Bytes(128 << 20)));
        assert_eq!(Bytes::parse("2G"), Ok(Bytes(2 << 30)));
        for bad in ["", "MiB", "-1", "1.5MiB", "12TB", "99999999999999999999GiB"] {
            assert!(Bytes::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn sizes_print_with_the_largest_exact_unit() {
        assert_eq!(Bytes(128 << 20).to_string(), "128 MiB");
        assert_eq!(Bytes(1536 << 10).to_string(), "1536 KiB");
        assert_eq!(Bytes(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn durations_take_ms_s_m_or_bare_seconds() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "0", "-1s", "5h", "s", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
