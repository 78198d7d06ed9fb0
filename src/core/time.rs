//! Time as plain data.
//!
//! The core never reads a clock: every decision takes `now` as an argument,
//! and deadlines are computed from recorded start times and the policy. A
//! [`Timestamp`] is milliseconds since the Unix epoch, so that the shell can
//! build one from whatever clock or API field it has, and tests can write
//! `Timestamp::from_secs(90)`.

use std::time::Duration;

/// A point in time: milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The timestamp `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    /// The timestamp `s` seconds after the epoch.
    pub const fn from_secs(s: i64) -> Self {
        Self(s.saturating_mul(1000))
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This instant moved forward by `d` (saturating).
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.saturating_add(duration_millis(d)))
    }

    /// This instant moved back by `d` (saturating).
    pub fn minus(self, d: Duration) -> Self {
        Self(self.0.saturating_sub(duration_millis(d)))
    }

    /// How long after `earlier` this instant is; zero if it is not after it.
    pub fn since(self, earlier: Timestamp) -> Duration {
        let ms = self.0.saturating_sub(earlier.0);
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }
}

impl From<chrono::DateTime<chrono::Utc>> for Timestamp {
    fn from(t: chrono::DateTime<chrono::Utc>) -> Self {
        Self(t.timestamp_millis())
    }
}

impl From<Timestamp> for chrono::DateTime<chrono::Utc> {
    fn from(t: Timestamp) -> Self {
        chrono::DateTime::from_timestamp_millis(t.0).unwrap_or_default()
    }
}

/// A duration in whole milliseconds, saturating at `i64::MAX`.
fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Bytes in one gibibyte.
pub const GIB: u64 = 1 << 30;
/// Bytes in one mebibyte.
pub const MIB: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_zero_when_the_other_instant_is_later() {
        let a = Timestamp::from_secs(10);
        let b = Timestamp::from_secs(20);
        assert_eq!(b.since(a), Duration::from_secs(10));
        assert_eq!(a.since(b), Duration::ZERO);
    }

    #[test]
    fn plus_and_minus_round_trip() {
        let t = Timestamp::from_millis(1_700_000_000_123);
        let d = Duration::from_millis(4_567);
        assert_eq!(t.plus(d).minus(d), t);
        assert_eq!(t.plus(d).since(t), d);
    }

    #[test]
    fn converts_to_and_from_chrono() {
        let t = Timestamp::from_millis(1_700_000_000_123);
        let c: chrono::DateTime<chrono::Utc> = t.into();
        assert_eq!(Timestamp::from(c), t);
    }
}
