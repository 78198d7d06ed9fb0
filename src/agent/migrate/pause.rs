//! The real pause of a live migration: from the guest stopping on the
//! source to it running on the target, from QEMU's own events on each side.
//!
//! ```text
//!  source QEMU   ── STOP {timestamp} ──►  GuestClock (source agent): stopped_at
//!  target QEMU   ── RESUME {timestamp} ─► GuestClock (target agent): resumed_at → target report
//!  source agent: pause = to_local(resumed_at) − stopped_at,
//!                error = ½ handshake round trip + drift since   (relay::clock)
//! ```
//!
//! QEMU stamps each event with its host's wall clock (`CLOCK_REALTIME`,
//! microseconds), the clock the agent reads too. QEMU's `downtime` is
//! measured on the source alone (stop to the last byte sent), so it leaves
//! out the target loading the device state and starting the vCPUs; the real
//! pause includes them, and anything that paused the guest earlier (a
//! policy's `PauseGuest`).

use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::agent::qmp::{Event, Qmp};
use crate::agent::relay::ClockOffset;
use crate::agent::relay::clock::micros_since_epoch;

/// What a QEMU's run-state events said, latest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunEvents {
    /// The last `STOP` not followed by a `RESUME`: the guest is stopped
    /// since then.
    pub stopped_at: Option<SystemTime>,
    /// The last `RESUME`.
    pub resumed_at: Option<SystemTime>,
}

impl RunEvents {
    fn apply(&mut self, event: &Event) {
        let at = event.time();
        match event.name.as_str() {
            "STOP" => self.stopped_at = Some(at),
            "RESUME" => {
                self.stopped_at = None;
                self.resumed_at = Some(at);
            }
            _ => {}
        }
    }
}

/// Watches a QEMU's `STOP` and `RESUME` events from the moment it is
/// created. Dropping it stops watching.
#[derive(Debug)]
pub struct GuestClock {
    state: watch::Receiver<RunEvents>,
    task: tokio::task::JoinHandle<()>,
}

impl GuestClock {
    /// Starts watching `qmp`'s events.
    pub fn watch(qmp: &Qmp) -> GuestClock {
        let mut events = qmp.events();
        let (tx, rx) = watch::channel(RunEvents::default());
        let task = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) => tx.send_modify(|s| s.apply(&e)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "missed QEMU events while timing the pause");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        GuestClock { state: rx, task }
    }

    /// What has been seen so far.
    pub fn now(&self) -> RunEvents {
        *self.state.borrow()
    }

    /// A receiver of what is seen (for a synchronous look later).
    pub fn watcher(&self) -> watch::Receiver<RunEvents> {
        self.state.clone()
    }

    /// When the guest stopped, waiting up to `within` for the event (QEMU
    /// sends it before it reports the state that made us ask).
    pub async fn stopped(&self, within: Duration) -> Option<SystemTime> {
        self.wait(within, |s| s.stopped_at).await
    }

    /// When the guest last resumed, waiting up to `within` for the event.
    pub async fn resumed(&self, within: Duration) -> Option<SystemTime> {
        self.wait(within, |s| s.resumed_at).await
    }

    async fn wait(
        &self,
        within: Duration,
        field: impl Fn(&RunEvents) -> Option<SystemTime>,
    ) -> Option<SystemTime> {
        let mut rx = self.state.clone();
        let got = tokio::time::timeout(within, rx.wait_for(|s| field(s).is_some())).await;
        match got {
            Ok(Ok(s)) => field(&s),
            _ => field(&self.now()),
        }
    }
}

impl Drop for GuestClock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A measured pause and how far it may be off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    /// From the guest stopping on the source to it running on the target.
    pub duration: Duration,
    /// The error bound from comparing the two clocks; `None` when the
    /// target's clock was not measured and synchronised clocks are assumed.
    pub error: Option<Duration>,
}

/// The pause from the source's stop (its clock) to the target's resume
/// (the target's clock), converted with `offset` when measured. A negative
/// difference (possible only within the error bound) counts as zero.
pub fn pause(stopped: SystemTime, resumed: SystemTime, offset: Option<&ClockOffset>) -> Pause {
    let resumed_local = offset.map_or(resumed, |o| o.to_local(resumed));
    let us = micros_since_epoch(resumed_local).saturating_sub(micros_since_epoch(stopped));
    Pause {
        duration: Duration::from_micros(us.max(0).unsigned_abs()),
        error: offset.map(|o| o.error_at(resumed_local)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::qmp::EventTimestamp;
    use crate::agent::relay::clock::from_micros;

    fn event(name: &str, us: i64) -> Event {
        Event {
            name: name.into(),
            data: serde_json::json!({}),
            timestamp: EventTimestamp {
                seconds: us / 1_000_000,
                microseconds: us % 1_000_000,
            },
        }
    }

    #[test]
    fn a_resume_clears_the_stop_and_the_last_stop_counts() {
        let mut s = RunEvents::default();
        s.apply(&event("STOP", 1_000_000));
        s.apply(&event("RESUME", 2_000_000));
        assert_eq!(s.stopped_at, None);
        s.apply(&event("MIGRATION", 2_500_000));
        s.apply(&event("STOP", 3_000_123));
        assert_eq!(s.stopped_at, Some(from_micros(3_000_123)));
        assert_eq!(s.resumed_at, Some(from_micros(2_000_000)));
    }

    #[test]
    fn the_pause_is_converted_to_the_source_clock_with_its_bound() {
        // The target's clock runs 40 ms ahead; measured with a 1 ms round trip.
        let offset = ClockOffset::from_exchange(from_micros(0), Duration::from_millis(1), 40_500);
        let p = pause(
            from_micros(10_000_000),
            from_micros(10_075_000),
            Some(&offset),
        );
        assert_eq!(p.duration, Duration::from_millis(35));
        // ½ ms of round trip plus 200 ppm of the 10.0345 s since.
        assert_eq!(p.error, Some(Duration::from_micros(500 + 2_006)));
        let unsynced = pause(from_micros(10_000_000), from_micros(9_999_000), None);
        assert_eq!(unsynced.duration, Duration::ZERO);
        assert_eq!(unsynced.error, None);
    }
}
