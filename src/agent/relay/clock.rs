//! Comparing the two hosts' wall clocks over the relay handshake
//! (Cristian's algorithm), so that times reported by the source and the
//! target agents can be subtracted with a known error bound.
//!
//! ```text
//!  source clock                          target clock
//!  t0 ── Hello ───────────────────────►
//!                                        t1 = now, sent in the Accept
//!  t2 ◄─────────────────────── Accept{clockUs: t1}
//!
//!  offset θ (target − source) = t1 − (t0 + t2) / 2,  |error| ≤ (t2 − t0) / 2
//! ```
//!
//! The bound holds whatever the delays on the two legs: the target read its
//! clock at some instant between `t0` and `t2` of the source's clock. It
//! does not cover the clocks drifting apart after the exchange; callers add
//! [`MAX_DRIFT_PPM`] of the time elapsed since.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Combined rate difference allowed between two hosts' clocks, parts per
/// million (two free-running quartz clocks each within ±100 ppm; NTP keeps
/// them far closer).
pub const MAX_DRIFT_PPM: u64 = 200;

/// The target's clock against the source's, as one handshake measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset {
    /// Target clock minus source clock, microseconds.
    pub offset_us: i64,
    /// How far `offset_us` may be off: half the round trip, microseconds.
    pub error_us: u64,
    /// When (source clock) it was measured.
    pub measured_at: SystemTime,
}

impl ClockOffset {
    /// From one exchange: the source's wall clock when it sent the Hello,
    /// the round trip measured on its monotonic clock, and the target's
    /// wall clock (µs since the epoch) in the Accept.
    pub fn from_exchange(sent: SystemTime, round_trip: Duration, peer_us: i64) -> ClockOffset {
        let midpoint = sent + round_trip / 2;
        ClockOffset {
            offset_us: peer_us.saturating_sub(micros_since_epoch(midpoint)),
            error_us: u64::try_from(round_trip.as_micros().div_ceil(2)).unwrap_or(u64::MAX),
            measured_at: midpoint,
        }
    }

    /// The error bound at `at` (source clock): the exchange's bound plus
    /// the drift the clocks may have accumulated since.
    pub fn error_at(&self, at: SystemTime) -> Duration {
        let since = at
            .duration_since(self.measured_at)
            .or_else(|_| self.measured_at.duration_since(at))
            .unwrap_or_default();
        let drift_us = since.as_micros().saturating_mul(u128::from(MAX_DRIFT_PPM)) / 1_000_000;
        Duration::from_micros(
            self.error_us
                .saturating_add(u64::try_from(drift_us).unwrap_or(u64::MAX)),
        )
    }

    /// A time read on the target's clock, on the source's clock.
    pub fn to_local(&self, peer: SystemTime) -> SystemTime {
        from_micros(micros_since_epoch(peer).saturating_sub(self.offset_us))
    }
}

/// Microseconds since the epoch (negative before it).
pub fn micros_since_epoch(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// The time `us` microseconds after the epoch.
pub fn from_micros(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_the_midpoint_and_the_bound_half_the_round_trip() {
        let sent = from_micros(1_000_000_000);
        // The target's clock is 5 ms ahead; the round trip took 2 ms.
        let c = ClockOffset::from_exchange(sent, Duration::from_millis(2), 1_000_006_000);
        assert_eq!(c.offset_us, 5_000);
        assert_eq!(c.error_us, 1_000);
        let peer = from_micros(2_000_005_000);
        assert_eq!(micros_since_epoch(c.to_local(peer)), 2_000_000_000);
    }

    #[test]
    fn the_bound_grows_with_drift_since_the_exchange() {
        let c = ClockOffset::from_exchange(from_micros(0), Duration::from_micros(100), 50);
        assert_eq!(c.error_at(c.measured_at), Duration::from_micros(50));
        // 10 s later: 200 ppm of 10 s is 2 ms.
        let later = c.measured_at + Duration::from_secs(10);
        assert_eq!(c.error_at(later), Duration::from_micros(2_050));
    }

    #[test]
    fn times_before_the_epoch_round_trip() {
        for us in [-5_000_000, -1, 0, 1, 1_700_000_000_123_456] {
            assert_eq!(micros_since_epoch(from_micros(us)), us);
        }
    }
}
