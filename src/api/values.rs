//! Kubernetes-style value types used in Ferry's resources.
//!
//! - [`Duration`]: `"90s"`, `"2m"`, `"1h30m"`, `"300ms"` — the Go duration
//!   syntax that Kubernetes and CEL's `duration()` understand.
//! - [`Quantity`]: a number of bytes written as a Kubernetes quantity,
//!   `"4Gi"`, `"500Mi"`, `"1G"`, `"1048576"`.
//! - [`Bandwidth`]: a quantity of bytes per second, `"1Gi"` = 1 GiB/s.
//!
//! Each parses with an error that quotes the bad value and shows a good one,
//! serialises back to the text it was written as (so a `kubectl apply` of
//! the same manifest is a no-op), and carries a JSON schema pattern so that
//! the API server refuses a malformed value before any Ferry code sees it.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Schema pattern for [`Duration`]: one or more `<number><unit>` groups.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// Schema pattern for [`Quantity`] and [`Bandwidth`]: an unsigned decimal
/// number with an optional binary (`Ki` … `Ei`) or decimal (`k` … `E`) suffix.
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// Why a value could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A duration that is not `<number><unit>…`.
    #[error(
        "invalid duration {value:?}: {why}; write a number and a unit (ms, s, m, h), e.g. \"90s\" or \"2m\""
    )]
    Duration {
        /// The text as written.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A quantity that is not `<number>[suffix]`.
    #[error(
        "invalid quantity {value:?}: {why}; write a number with an optional suffix (Ki, Mi, Gi, Ti, k, M, G, T), e.g. \"512Mi\" or \"4Gi\""
    )]
    Quantity {
        /// The text as written.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// A span of time written the Kubernetes way (`"90s"`, `"2m"`, `"1h30m"`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Duration {
    text: String,
    value: std::time::Duration,
}

impl Duration {
    /// The duration as a [`std::time::Duration`].
    pub fn get(&self) -> std::time::Duration {
        self.value
    }

    /// A duration from whole seconds, written as `"<n>s"`.
    pub fn from_secs(secs: u64) -> Self {
        Self {
            text: format!("{secs}s"),
            value: std::time::Duration::from_secs(secs),
        }
    }

    /// A duration from milliseconds, written as `"<n>ms"`.
    pub fn from_millis(ms: u64) -> Self {
        Self {
            text: format!("{ms}ms"),
            value: std::time::Duration::from_millis(ms),
        }
    }

    /// The text the duration was written as.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Duration {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ValueError::Duration {
            value: s.to_string(),
            why,
        };
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        let mut total_nanos: u128 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| err("the last number has no unit"))?;
            if num_len == 0 {
                return Err(err("a unit is not preceded by a number"));
            }
            let number = &rest[..num_len];
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let unit_nanos: u128 = match unit {
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(err("the unit is not one of ms, s, m, h")),
            };
            total_nanos +=
                decimal_times(number, unit_nanos).ok_or_else(|| err("a number is malformed"))?;
        }
        let nanos = u64::try_from(total_nanos).map_err(|_| err("it is too long"))?;
        Ok(Self {
            text: s.to_string(),
            value: std::time::Duration::from_nanos(nanos),
        })
    }
}

/// `number` (decimal, optional fraction) times `scale`, exactly when the
/// product is whole; fractional remainders are truncated.
fn decimal_times(number: &str, scale: u128) -> Option<u128> {
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int.is_empty() || (number.contains('.') && frac.is_empty()) {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u128 = int.parse().ok()?;
    let mut total = int.checked_mul(scale)?;
    let mut denominator: u128 = 1;
    for digit in frac.bytes().take(18) {
        denominator *= 10;
        total = total.checked_add(u128::from(digit - b'0') * scale / denominator)?;
    }
    Some(total)
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Duration({:?})", self.text)
    }
}

/// A quantity of bytes written as a Kubernetes quantity (`"4Gi"`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Quantity {
    text: String,
    bytes: u64,
}

impl Quantity {
    /// The number of bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The number of whole MiB (rounded down).
    pub fn mib(&self) -> u64 {
        self.bytes / (1 << 20)
    }

    /// A quantity of `mib` MiB, written as `"<n>Mi"`.
    pub fn from_mib(mib: u64) -> Self {
        Self {
            text: format!("{mib}Mi"),
            bytes: mib << 20,
        }
    }

    /// A quantity of bytes written in the largest binary unit that divides it.
    pub fn from_bytes(bytes: u64) -> Self {
        const UNITS: [(&str, u32); 5] =
            [("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)];
        for (suffix, shift) in UNITS {
            if bytes != 0 && bytes.trailing_zeros() >= shift {
                return Self {
                    text: format!("{}{suffix}", bytes >> shift),
                    bytes,
                };
            }
        }
        Self {
            text: bytes.to_string(),
            bytes,
        }
    }

    /// The text the quantity was written as.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Quantity {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ValueError::Quantity {
            value: s.to_string(),
            why,
        };
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(split);
        if number.is_empty() {
            return Err(err("it does not start with a number"));
        }
        let scale: u128 = match suffix {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "Pi" => 1 << 50,
            "Ei" => 1 << 60,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "P" => 1_000_000_000_000_000,
            "E" => 1_000_000_000_000_000_000,
            _ => {
                return Err(err(
                    "the suffix is not one of Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E",
                ));
            }
        };
        let bytes = decimal_times(number, scale).ok_or_else(|| err("the number is malformed"))?;
        let bytes = u64::try_from(bytes).map_err(|_| err("it is too large"))?;
        Ok(Self {
            text: s.to_string(),
            bytes,
        })
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Quantity({:?})", self.text)
    }
}

/// A transfer rate: a quantity of bytes per second (`"1Gi"` = 1 GiB/s).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Bandwidth(Quantity);

impl Bandwidth {
    /// Bytes per second.
    pub fn bytes_per_second(&self) -> u64 {
        self.0.bytes()
    }

    /// A bandwidth of `mib` MiB/s.
    pub fn from_mib_per_second(mib: u64) -> Self {
        Self(Quantity::from_mib(mib))
    }
}

impl FromStr for Bandwidth {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

impl fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", self.0)
    }
}

impl fmt::Debug for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bandwidth({:?})", self.0.as_str())
    }
}

/// Serde and JSON schema for a type that is written as a string.
macro_rules! string_value {
    ($ty:ty, $name:literal, $pattern:expr, $text:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let text: fn(&$ty) -> &str = $text;
                serializer.serialize_str(text(self))
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }

            fn inline_schema() -> bool {
                true
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "pattern": $pattern })
            }
        }
    };
}

string_value!(Duration, "Duration", DURATION_PATTERN, |d| d.as_str());
string_value!(Quantity, "Quantity", QUANTITY_PATTERN, |q| q.as_str());
string_value!(Bandwidth, "Bandwidth", QUANTITY_PATTERN, |b| b.0.as_str());

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> std::time::Duration {
        s.parse::<Duration>().unwrap().get()
    }

    #[test]
    fn durations_parse_like_kubernetes() {
        assert_eq!(d("90s"), std::time::Duration::from_secs(90));
        assert_eq!(d("2m"), std::time::Duration::from_secs(120));
        assert_eq!(d("1h30m"), std::time::Duration::from_secs(5400));
        assert_eq!(d("300ms"), std::time::Duration::from_millis(300));
        assert_eq!(d("1.5s"), std::time::Duration::from_millis(1500));
        assert_eq!(d("0s"), std::time::Duration::ZERO);
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        for (bad, why) in [
            ("", "empty"),
            ("90", "no unit"),
            ("5 minutes", "unit"),
            ("s", "not preceded"),
            ("1d", "unit"),
            ("1..5s", "malformed"),
            ("-5s", "not preceded"),
        ] {
            let err = bad.parse::<Duration>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn quantities_parse_binary_and_decimal_suffixes() {
        let q = |s: &str| s.parse::<Quantity>().unwrap().bytes();
        assert_eq!(q("4Gi"), 4 << 30);
        assert_eq!(q("500Mi"), 500 << 20);
        assert_eq!(q("1G"), 1_000_000_000);
        assert_eq!(q("1.5Gi"), 3 << 29);
        assert_eq!(q("1048576"), 1 << 20);
        assert_eq!(q("64k"), 64_000);
    }

    #[test]
    fn bad_quantities_say_what_is_wrong() {
        for (bad, why) in [
            ("", "empty"),
            ("Gi", "number"),
            ("4GB", "suffix"),
            ("4gi", "suffix"),
            ("1.Gi", "malformed"),
            ("99999Ei", "too large"),
        ] {
            let err = bad.parse::<Quantity>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn values_round_trip_through_serde_as_written() {
        for text in ["90s", "1h30m", "2m", "300ms"] {
            let v: Duration = serde_json::from_value(serde_json::json!(text)).unwrap();
            assert_eq!(serde_json::to_value(&v).unwrap(), serde_json::json!(text));
        }
        for text in ["4Gi", "500Mi", "1G"] {
            let v: Quantity = serde_json::from_value(serde_json::json!(text)).unwrap();
            assert_eq!(serde_json::to_value(&v).unwrap(), serde_json::json!(text));
            let b: Bandwidth = serde_json::from_value(serde_json::json!(text)).unwrap();
            assert_eq!(serde_json::to_value(&b).unwrap(), serde_json::json!(text));
        }
        let err = serde_json::from_value::<Duration>(serde_json::json!("soon")).unwrap_err();
        assert!(err.to_string().contains("invalid duration \"soon\""));
    }

    #[test]
    fn from_bytes_picks_the_largest_exact_unit() {
        assert_eq!(Quantity::from_bytes(4 << 30).as_str(), "4Gi");
        assert_eq!(Quantity::from_bytes(1536 << 20).as_str(), "1536Mi");
        assert_eq!(Quantity::from_bytes(1000).as_str(), "1000");
        assert_eq!(Quantity::from_bytes(0).as_str(), "0");
    }

    proptest! {
        #[test]
        fn the_schema_pattern_accepts_exactly_what_parses(s in "[0-9.a-zA-Z]{0,8}") {
            let duration_re = regex::Regex::new(DURATION_PATTERN).unwrap();
            let quantity_re = regex::Regex::new(QUANTITY_PATTERN).unwrap();
            // Anything the schema lets through must parse (the reverse may be
            // stricter in code only for overflow).
            if duration_re.is_match(&s) {
                prop_assert!(s.parse::<Duration>().is_ok(), "{}", s);
            } else {
                prop_assert!(s.parse::<Duration>().is_err(), "{}", s);
            }
            match (quantity_re.is_match(&s), s.parse::<Quantity>()) {
                (true, Ok(_)) | (false, Err(_)) => {}
                // The schema cannot express the 64-bit range: only overflow may differ.
                (true, Err(e)) => prop_assert!(e.to_string().contains("too large"), "{}: {}", s, e),
                (false, Ok(_)) => prop_assert!(false, "{} parsed but the schema refuses it", s),
            }
        }

        #[test]
        fn seconds_round_trip(secs in 0u64..1_000_000) {
            let text = format!("{secs}s");
            prop_assert_eq!(d(&text), std::time::Duration::from_secs(secs));
            prop_assert_eq!(Duration::from_secs(secs).to_string(), text);
        }
    }
}
