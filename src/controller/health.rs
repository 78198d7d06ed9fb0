//! Host liveness from Lease renewals, judged on the controller's own clock.
//!
//! Comparing a Lease's `renewTime` with the controller's clock would trust
//! two clocks to agree. Instead, like Kubernetes' node lifecycle
//! controller, the controller notes *when it saw* each renewal change and
//! judges staleness from that, on its own monotonic clock. A controller that
//! has just started gives every host the full grace from its start.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::core::migration::HostHealth;
use crate::core::scheduler::HostPhase;

/// The last renewal seen per host, and when.
#[derive(Debug)]
pub struct LeaseTracker {
    started: Instant,
    seen: HashMap<String, (String, Instant)>,
}

impl LeaseTracker {
    /// A tracker whose grace counts from now.
    pub fn new(now: Instant) -> LeaseTracker {
        LeaseTracker {
            started: now,
            seen: HashMap::new(),
        }
    }

    /// Record the host's current renewal marker (its Lease's `renewTime`);
    /// a changed marker counts as a renewal at `now`.
    pub fn observe(&mut self, host: &str, renew_marker: &str, now: Instant) {
        let unchanged = self
            .seen
            .get(host)
            .is_some_and(|(marker, _)| marker == renew_marker);
        if !unchanged {
            self.seen
                .insert(host.to_string(), (renew_marker.to_string(), now));
        }
    }

    /// How long since the host's last renewal, on our clock (since our own
    /// start when we have seen none).
    pub fn silence(&self, host: &str, now: Instant) -> Duration {
        let since = self.seen.get(host).map_or(self.started, |(_, at)| *at);
        now.saturating_duration_since(since)
    }
}

/// What the controller should make of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostJudgement {
    /// The phase to record in `Host.status.phase`.
    pub phase: HostPhase,
    /// Its health for migrations.
    pub health: HostHealth,
}

/// The pure rule. `recorded` is the phase the Host has now; `silence` how
/// long since its agent renewed; `in_maintenance` whether a HostMaintenance
/// holds it; `agent_caught_up` whether a returning agent reports no VM that
/// the API places elsewhere (it has stopped what was rebuilt elsewhere).
pub fn judge(
    recorded: HostPhase,
    silence: Duration,
    lease_duration: Duration,
    evacuate_after: Duration,
    in_maintenance: bool,
    agent_caught_up: bool,
) -> HostJudgement {
    let alive = silence <= lease_duration;
    let phase = match recorded {
        // A fenced host comes back only when its agent renews again and has
        // stopped the VMs rebuilt elsewhere.
        HostPhase::Fenced if !(alive && agent_caught_up) => HostPhase::Fenced,
        _ if silence > evacuate_after => HostPhase::Fenced,
        _ if !alive => HostPhase::Unreachable,
        HostPhase::Failed => HostPhase::Failed,
        _ if in_maintenance => HostPhase::Maintenance,
        _ => HostPhase::Active,
    };
    let health = match phase {
        HostPhase::Fenced => HostHealth::Fenced,
        HostPhase::Unreachable => HostHealth::Unreachable,
        HostPhase::Active | HostPhase::Maintenance => HostHealth::Ready,
        HostPhase::Failed => HostHealth::Unreachable,
    };
    HostJudgement { phase, health }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);
    const EVACUATE: Duration = Duration::from_secs(60);

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_renewing_host_is_active_or_in_maintenance() {
        assert_eq!(
            judge(HostPhase::Active, s(1), LEASE, EVACUATE, false, true).phase,
            HostPhase::Active
        );
        assert_eq!(
            judge(HostPhase::Active, s(1), LEASE, EVACUATE, true, true).phase,
            HostPhase::Maintenance
        );
        assert_eq!(
            judge(HostPhase::Maintenance, s(1), LEASE, EVACUATE, false, true).phase,
            HostPhase::Active
        );
    }

    #[test]
    fn a_silent_host_becomes_unreachable_then_fenced() {
        let j = judge(HostPhase::Active, s(11), LEASE, EVACUATE, false, true);
        assert_eq!(
            (j.phase, j.health),
            (HostPhase::Unreachable, HostHealth::Unreachable)
        );
        let j = judge(HostPhase::Unreachable, s(61), LEASE, EVACUATE, false, true);
        assert_eq!((j.phase, j.health), (HostPhase::Fenced, HostHealth::Fenced));
    }

    #[test]
    fn a_fenced_host_returns_only_when_its_agent_has_caught_up() {
        assert_eq!(
            judge(HostPhase::Fenced, s(1), LEASE, EVACUATE, false, false).phase,
            HostPhase::Fenced
        );
        assert_eq!(
            judge(HostPhase::Fenced, s(30), LEASE, EVACUATE, false, true).phase,
            HostPhase::Fenced
        );
        assert_eq!(
            judge(HostPhase::Fenced, s(1), LEASE, EVACUATE, false, true).phase,
            HostPhase::Active
        );
    }

    #[test]
    fn the_tracker_measures_silence_on_its_own_clock() {
        let t0 = Instant::now();
        let mut t = LeaseTracker::new(t0);
        assert_eq!(
            t.silence("h", t0 + s(5)),
            s(5),
            "unseen hosts get grace from our start"
        );
        t.observe("h", "r1", t0 + s(5));
        t.observe("h", "r1", t0 + s(9));
        assert_eq!(
            t.silence("h", t0 + s(9)),
            s(4),
            "an unchanged marker is no renewal"
        );
        t.observe("h", "r2", t0 + s(10));
        assert_eq!(t.silence("h", t0 + s(12)), s(2));
    }
}
