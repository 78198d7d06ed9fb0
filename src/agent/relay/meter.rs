//! Byte counters and the bandwidth limiter of one migration.
//!
//! The limiter is a token bucket shared by every channel of a migration
//! (multifd opens several), so the limit holds for the migration as a whole.
//! A caller takes the tokens for a chunk it has already read and sleeps off
//! any debt: concurrent channels queue behind each other's debt, which keeps
//! the aggregate rate without a central scheduler.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters of one migration on one side of the relay.
#[derive(Debug, Default)]
pub struct RelayCounters {
    forward: AtomicU64,
    backward: AtomicU64,
    channels_opened: AtomicU32,
    channels_active: AtomicU32,
}

/// A point-in-time copy of [`RelayCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterSnapshot {
    /// Bytes from the source QEMU towards the target QEMU.
    pub forward_bytes: u64,
    /// Bytes from the target back to the source (QEMU's return path).
    pub backward_bytes: u64,
    /// Channels opened so far.
    pub channels_opened: u32,
    /// Channels currently carrying data.
    pub channels_active: u32,
}

impl RelayCounters {
    /// Adds forward bytes.
    pub fn add_forward(&self, n: u64) {
        self.forward.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds backward bytes.
    pub fn add_backward(&self, n: u64) {
        self.backward.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn channel_opened(&self) {
        self.channels_opened.fetch_add(1, Ordering::Relaxed);
        self.channels_active.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn channel_closed(&self) {
        self.channels_active.fetch_sub(1, Ordering::Relaxed);
    }
    /// Total bytes both ways (what the stall watchdog watches).
    pub fn total(&self) -> u64 {
        self.forward.load(Ordering::Relaxed) + self.backward.load(Ordering::Relaxed)
    }
    /// A copy of the counters.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            forward_bytes: self.forward.load(Ordering::Relaxed),
            backward_bytes: self.backward.load(Ordering::Relaxed),
            channels_opened: self.channels_opened.load(Ordering::Relaxed),
            channels_active: self.channels_active.load(Ordering::Relaxed),
        }
    }
}

/// The largest burst the bucket holds, as time at the configured rate.
const BURST: Duration = Duration::from_millis(50);

/// A token-bucket bandwidth limit, shared by all channels of a migration.
#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (`None`: unlimited).
    pub fn new(bytes_per_sec: Option<u64>) -> RateLimiter {
        RateLimiter {
            rate: AtomicU64::new(bytes_per_sec.unwrap_or(0)),
            bucket: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Changes the limit (applies from the next chunk).
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        self.rate
            .store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }

    /// The limit in bytes per second, if any.
    pub fn rate(&self) -> Option<u64> {
        match self.rate.load(Ordering::Relaxed) {
            0 => None,
            r => Some(r),
        }
    }

    /// How long to wait after taking `n` bytes of tokens (zero if unlimited).
    pub fn take(&self, n: usize) -> Duration {
        let Some(rate) = self.rate() else {
            return Duration::ZERO;
        };
        let rate = rate as f64;
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let burst = rate * BURST.as_secs_f64();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(burst);
        b.1 = now;
        b.0 -= n as f64;
        if b.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.0 / rate)
        }
    }

    /// Takes `n` bytes of tokens, sleeping off any debt.
    pub async fn acquire(&self, n: usize) {
        let wait = self.take(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let l = RateLimiter::new(None);
        assert_eq!(l.take(1 << 30), Duration::ZERO);
    }

    #[test]
    fn debt_is_paid_at_the_configured_rate() {
        let l = RateLimiter::new(Some(1_000_000));
        // 1 MB against an empty bucket: about one second of debt.
        let w = l.take(1_000_000);
        assert!(
            w > Duration::from_millis(900) && w <= Duration::from_millis(1000),
            "{w:?}"
        );
        // A second taker queues behind the first one's debt.
        let w2 = l.take(500_000);
        assert!(w2 > Duration::from_millis(1400), "{w2:?}");
    }

    #[test]
    fn counters_add_up() {
        let c = RelayCounters::default();
        c.channel_opened();
        c.add_forward(10);
        c.add_backward(3);
        assert_eq!(c.total(), 13);
        c.channel_closed();
        let s = c.snapshot();
        assert_eq!(
            (s.forward_bytes, s.channels_opened, s.channels_active),
            (10, 1, 0)
        );
    }
}
