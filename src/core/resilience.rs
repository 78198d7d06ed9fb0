//! Failed hosts: when a host counts as unreachable, when its agent must fence
//! itself, when the controller may rebuild its VMs elsewhere, and which ones.
//!
//! ```text
//!  last Lease renewal ─┬─ + lease grace ──► Unreachable (no new work)
//!                      ├─ + fenceAfter ───► the agent (or its watchdog) stops every VM
//!                      └─ + evacuateAfter ► the controller marks the host Fenced and
//!                                           creates Evacuate migrations
//! ```
//!
//! A VM never runs on two hosts: `evacuateAfter` is strictly longer than
//! `fenceAfter` (the policy refuses anything else), and both clocks start
//! from the same event — the last renewal the agent made, which is the
//! `renewTime` the controller reads. The agent stops its VMs `fenceAfter`
//! after its last *successful* renewal, measured on its own monotonic clock;
//! the controller rebuilds them `evacuateAfter` after the `renewTime` it sees.
//! The difference is the margin for clock drift between the two machines
//! and for the time the agent takes to kill its QEMUs; it must cover both.
//! An agent that renews again within `fenceAfter` (a restart, a short
//! partition) keeps its VMs: nothing has been rebuilt elsewhere.

use std::time::Duration;

use crate::core::policy::{Resilience, ResiliencePolicy};
use crate::core::scheduler::VmInfo;
use crate::core::time::Timestamp;

/// Kubernetes' node lease renews every 10 s; three missed renewals make a
/// host unreachable for scheduling, long before anything is fenced.
pub const LEASE_GRACE: Duration = Duration::from_secs(30);

/// How the controller judges a host from its Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostLiveness {
    /// Renewed recently.
    Alive,
    /// Missed renewals: schedule nothing onto it, start nothing from it.
    Unreachable {
        /// When its VMs may be rebuilt elsewhere.
        evacuate_at: Timestamp,
    },
    /// Its agent has fenced itself by now: mark it Fenced, evacuate.
    Evacuate,
}

/// Judge a host by its last Lease renewal (`None`: never renewed, which
/// counts as renewed when the host was created, `created`).
pub fn judge(
    last_renewal: Option<Timestamp>,
    created: Timestamp,
    r: &Resilience,
    now: Timestamp,
) -> HostLiveness {
    let since = last_renewal.unwrap_or(created);
    let silent = now.since(since);
    if silent > r.evacuate_after {
        HostLiveness::Evacuate
    } else if silent > LEASE_GRACE.min(r.fence_after) {
        HostLiveness::Unreachable {
            evacuate_at: since.plus(r.evacuate_after),
        }
    } else {
        HostLiveness::Alive
    }
}

/// Whether the agent (or the watchdog standing in for it) must stop every VM
/// of its host now: it has not renewed its Lease for `fenceAfter`.
pub fn must_fence(
    last_successful_renewal: Timestamp,
    fence_after: Duration,
    now: Timestamp,
) -> bool {
    now.since(last_successful_renewal) > fence_after
}

/// The VMs of a failed host that the resilience policy rebuilds elsewhere,
/// in the order to rebuild them (highly available first, then by name).
pub fn to_evacuate<'v>(
    vms: impl IntoIterator<Item = &'v VmInfo>,
    policy: ResiliencePolicy,
) -> Vec<&'v VmInfo> {
    let mut out: Vec<&VmInfo> = vms
        .into_iter()
        .filter(|v| match policy {
            ResiliencePolicy::MigrateAll => true,
            ResiliencePolicy::MigrateHighlyAvailableOnly => v.highly_available,
            ResiliencePolicy::DoNotMigrate => false,
        })
        .collect();
    out.sort_by(|a, b| {
        b.highly_available
            .cmp(&a.highly_available)
            .then_with(|| a.id.cmp(&b.id))
    });
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::core::policy::EffectivePolicy;
    use crate::core::scheduler::testkit::vm;

    fn secs(s: i64) -> Timestamp {
        Timestamp::from_secs(s)
    }

    #[test]
    fn a_silent_host_becomes_unreachable_then_evacuable() {
        let r = EffectivePolicy::default().resilience; // fence 40 s, evacuate 60 s
        let table = [
            (10, HostLiveness::Alive),
            (30, HostLiveness::Alive),
            (
                31,
                HostLiveness::Unreachable {
                    evacuate_at: secs(1060),
                },
            ),
            (
                60,
                HostLiveness::Unreachable {
                    evacuate_at: secs(1060),
                },
            ),
            (61, HostLiveness::Evacuate),
        ];
        for (silent, want) in table {
            assert_eq!(
                judge(Some(secs(1000)), secs(0), &r, secs(1000 + silent)),
                want,
                "{silent} s"
            );
        }
        assert_eq!(
            judge(None, secs(1000), &r, secs(1010)),
            HostLiveness::Alive,
            "a new host has a grace too"
        );
    }

    #[test]
    fn an_agent_fences_after_fence_after_and_a_quick_restart_keeps_its_vms() {
        let fence = Duration::from_secs(40);
        assert!(!must_fence(secs(100), fence, secs(140)));
        assert!(must_fence(secs(100), fence, secs(141)));
        // Restarted and renewed at 130: the clock starts again.
        assert!(!must_fence(secs(130), fence, secs(141)));
    }

    #[test]
    fn the_resilience_policy_chooses_which_vms_are_rebuilt() {
        let mut ha = vm("ns/b-ha", Some("dead"));
        ha.highly_available = true;
        let vms = [vm("ns/a", Some("dead")), ha, vm("ns/c", Some("dead"))];
        let ids = |p| {
            to_evacuate(&vms, p)
                .iter()
                .map(|v| v.id.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(ResiliencePolicy::MigrateAll),
            vec!["ns/b-ha", "ns/a", "ns/c"]
        );
        assert_eq!(
            ids(ResiliencePolicy::MigrateHighlyAvailableOnly),
            vec!["ns/b-ha"]
        );
        assert!(ids(ResiliencePolicy::DoNotMigrate).is_empty());
    }

    proptest! {
        /// The argument of the module documentation, checked: whenever the
        /// controller may evacuate, the agent has already had to fence,
        /// provided the agent's last successful renewal is the one the
        /// controller saw and the clocks drift by less than the margin.
        #[test]
        fn evacuation_never_precedes_fencing(
            renewal in 0i64..10_000,
            elapsed in 0u64..200,
            fence in 1u64..100,
            margin in 1u64..100,
            drift in 0u64..100,
        ) {
            prop_assume!(drift < margin);
            let r = Resilience {
                policy: ResiliencePolicy::MigrateAll,
                fence_after: Duration::from_secs(fence),
                evacuate_after: Duration::from_secs(fence + margin),
            };
            let controller_now = secs(renewal).plus(Duration::from_secs(elapsed));
            // The agent's clock runs behind the controller's by `drift`.
            let agent_now = controller_now.minus(Duration::from_secs(drift));
            if judge(Some(secs(renewal)), secs(0), &r, controller_now) == HostLiveness::Evacuate {
                prop_assert!(must_fence(secs(renewal), r.fence_after, agent_now));
            }
        }
    }
}
