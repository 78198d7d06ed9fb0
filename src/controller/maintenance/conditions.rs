//! A drain's standard conditions, computed from the pass's facts.
//!
//! | type | True while | reasons |
//! |---|---|---|
//! | `Draining` | VMs are being moved off the host | `Draining`; False: `Drained`, `DeadlineExceeded`, `VmsCannotLeave` |
//! | `Drained` | the host is empty (stopped VMs aside) | `HostEmpty`; False: `VmsRemaining` |
//! | `Blocked` | a VM cannot leave now (the message names each, with why) | the blockers' reason when they share one, else `VmsBlocked`; False: `NoBlockers` |
//! | `Failed` | the drain gave up | `DeadlineExceeded`, `VmsCannotLeave`; False: `NotFailed` |
//! | `DeadlineExceeded` | `spec.deadline` passed (only with a deadline) | `DeadlineExceeded`; False: `WithinDeadline` |
//!
//! A condition's `lastTransitionTime` changes only when its status does, so
//! `Draining=True` keeps the time the drain began however many passes
//! rewrite its message.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::maintenance::{Blocker, MaintenancePhase};

/// Condition type: VMs are being moved off the host.
pub const DRAINING: &str = "Draining";
/// Condition type: the host is empty.
pub const DRAINED: &str = "Drained";
/// Condition type: some VMs cannot leave now.
pub const BLOCKED: &str = "Blocked";
/// Condition type: the drain gave up.
pub const FAILED: &str = "Failed";
/// Condition type: `spec.deadline` passed.
pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";

/// What a pass found, for the conditions.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts<'a> {
    /// The host.
    pub host: &'a str,
    /// The phase the pass decided.
    pub phase: MaintenancePhase,
    /// VMs on the host when the drain began.
    pub total: u32,
    /// VMs still to leave.
    pub remaining: u32,
    /// VMs that cannot leave now.
    pub blockers: &'a [Blocker],
    /// `spec.deadline`, when set.
    pub deadline: Option<Duration>,
    /// Whether it has passed.
    pub late: bool,
}

fn condition(type_: &str, status: bool, reason: &str, message: String, now: &Time) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.chars().take(32_000).collect(),
        last_transition_time: now.clone(),
        observed_generation: None,
    }
}

/// The conditions after a pass, keeping each one's transition time while
/// its status holds.
pub fn conditions(previous: &[Condition], f: &Facts, now: Time) -> Vec<Condition> {
    let failed_reason = if f.late {
        "DeadlineExceeded"
    } else {
        "VmsCannotLeave"
    };
    let moved = f.total.saturating_sub(f.remaining);
    let mut out = vec![
        match f.phase {
            MaintenancePhase::Completed => condition(
                DRAINING,
                false,
                "Drained",
                format!("{} is empty", f.host),
                &now,
            ),
            MaintenancePhase::Failed => condition(
                DRAINING,
                false,
                failed_reason,
                format!("the drain of {} stopped", f.host),
                &now,
            ),
            _ => condition(
                DRAINING,
                true,
                "Draining",
                format!(
                    "{moved} of {} VMs have left {}; {} remaining",
                    f.total, f.host, f.remaining
                ),
                &now,
            ),
        },
        if f.phase == MaintenancePhase::Completed {
            condition(
                DRAINED,
                true,
                "HostEmpty",
                format!("{moved} VMs moved off {}", f.host),
                &now,
            )
        } else {
            condition(
                DRAINED,
                false,
                "VmsRemaining",
                format!("{} VMs still on {}", f.remaining, f.host),
                &now,
            )
        },
        blocked(f, &now),
        if f.phase == MaintenancePhase::Failed {
            let why = if f.late {
                format!(
                    "the deadline passed with {} VMs still on {}",
                    f.remaining, f.host
                )
            } else {
                format!(
                    "{} VMs cannot leave {}, and nothing the drain does will change that",
                    f.blockers.len(),
                    f.host
                )
            };
            condition(FAILED, true, failed_reason, why, &now)
        } else {
            condition(FAILED, false, "NotFailed", String::new(), &now)
        },
    ];
    if let Some(d) = f.deadline {
        out.push(if f.late {
            condition(
                DEADLINE_EXCEEDED,
                true,
                "DeadlineExceeded",
                format!(
                    "the drain did not finish within its deadline of {} s; no new migrations are started",
                    d.as_secs()
                ),
                &now,
            )
        } else {
            condition(
                DEADLINE_EXCEEDED,
                false,
                "WithinDeadline",
                format!("deadline {} s after creation", d.as_secs()),
                &now,
            )
        });
    }
    for c in &mut out {
        if let Some(p) = previous
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
        {
            c.last_transition_time = p.last_transition_time.clone();
        }
    }
    out
}

fn blocked(f: &Facts, now: &Time) -> Condition {
    let Some(first) = f.blockers.first() else {
        return condition(BLOCKED, false, "NoBlockers", String::new(), now);
    };
    let reason = if f.blockers.iter().all(|b| b.reason == first.reason) {
        first.reason.as_str()
    } else {
        "VmsBlocked"
    };
    let list: Vec<String> = f
        .blockers
        .iter()
        .map(|b| format!("{}/{} ({}: {})", b.namespace, b.vm, b.reason, b.message))
        .collect();
    condition(
        BLOCKED,
        true,
        reason,
        format!(
            "{} VMs cannot leave {} now: {}",
            f.blockers.len(),
            f.host,
            list.join("; ")
        ),
        now,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn blocker(vm: &str, reason: &str) -> Blocker {
        Blocker {
            namespace: "ns".into(),
            vm: vm.into(),
            reason: reason.into(),
            message: "why".into(),
        }
    }

    fn facts<'a>(phase: MaintenancePhase, remaining: u32, blockers: &'a [Blocker]) -> Facts<'a> {
        Facts {
            host: "h0",
            phase,
            total: 4,
            remaining,
            blockers,
            deadline: None,
            late: false,
        }
    }

    fn get<'a>(cs: &'a [Condition], t: &str) -> &'a Condition {
        cs.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn draining_stays_true_from_the_first_pass_while_its_message_follows_progress() {
        let first = conditions(&[], &facts(MaintenancePhase::Draining, 4, &[]), at(10));
        let later = conditions(&first, &facts(MaintenancePhase::Draining, 1, &[]), at(50));
        let d = get(&later, DRAINING);
        assert_eq!(
            (d.status.as_str(), d.last_transition_time.clone()),
            ("True", at(10))
        );
        assert_eq!(d.message, "3 of 4 VMs have left h0; 1 remaining");
        assert_eq!(get(&later, DRAINED).status, "False");
        assert_eq!(get(&later, BLOCKED).reason, "NoBlockers");
        assert!(later.iter().all(|c| c.type_ != DEADLINE_EXCEEDED));
        let done = conditions(&later, &facts(MaintenancePhase::Completed, 0, &[]), at(60));
        let (d, e) = (get(&done, DRAINING), get(&done, DRAINED));
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("False", "Drained"));
        assert_eq!(d.last_transition_time, at(60));
        assert_eq!(
            (e.status.as_str(), e.reason.as_str()),
            ("True", "HostEmpty")
        );
        assert_eq!(get(&done, FAILED).status, "False");
    }

    #[test]
    fn blocked_names_each_vm_and_a_shared_reason() {
        let one = [blocker("a", "NotMigratable")];
        let c = conditions(&[], &facts(MaintenancePhase::Draining, 2, &one), at(0));
        let b = get(&c, BLOCKED);
        assert_eq!(
            (b.status.as_str(), b.reason.as_str()),
            ("True", "NotMigratable")
        );
        assert!(
            b.message.contains("ns/a (NotMigratable: why)"),
            "{}",
            b.message
        );
        let two = [blocker("a", "NotMigratable"), blocker("b", "Quarantined")];
        let c = conditions(&[], &facts(MaintenancePhase::Failed, 2, &two), at(0));
        assert_eq!(get(&c, BLOCKED).reason, "VmsBlocked");
        let f = get(&c, FAILED);
        assert_eq!(
            (f.status.as_str(), f.reason.as_str()),
            ("True", "VmsCannotLeave")
        );
        assert_eq!(get(&c, DRAINING).reason, "VmsCannotLeave");
    }

    #[test]
    fn a_deadline_is_a_condition_that_turns_true_when_it_passes() {
        let mut f = facts(MaintenancePhase::Draining, 2, &[]);
        f.deadline = Some(Duration::from_secs(60));
        let c = conditions(&[], &f, at(0));
        assert_eq!(get(&c, DEADLINE_EXCEEDED).reason, "WithinDeadline");
        f.late = true;
        f.phase = MaintenancePhase::Failed;
        let c = conditions(&c, &f, at(61));
        let d = get(&c, DEADLINE_EXCEEDED);
        assert_eq!(
            (d.status.as_str(), d.last_transition_time.clone()),
            ("True", at(61))
        );
        assert_eq!(get(&c, FAILED).reason, "DeadlineExceeded");
    }
}
