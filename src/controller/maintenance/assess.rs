//! The pure half of a drain pass: from the VMs still on the host and the
//! drain's Migrations so far, what to create, stop or quarantine now, and
//! what blocks.
//!
//! ```text
//!  for each VM on the host (largest memory first, as core::drain::plan orders them)
//!    an attempt of ours not final ───────────────► in flight: wait
//!    an attempt of ours Succeeded ───────────────► wait (the VM cache lags the move;
//!                                                  never a second move)
//!    quarantined ────────────────────────────────► blocker Quarantined (final)
//!    not migratable ── Stop ─► stop it (once) ──► stopped, not remaining
//!                   └─ Block ──────────────────► blocker NotMigratable
//!    last attempt Cancelled (by a user) ─────────► blocker Cancelled (final)
//!    core::drain::next_attempt over our failed attempts and the VM's history
//!       RetryNow ─► create attempt n+1     RetryAt(t) ─► look again at t
//!       GiveUp ───► blocker (final)        Quarantine ─► quarantine + blocker (final)
//! ```

use std::time::Duration;

use crate::api::MigrationPhase;
use crate::core::drain::{Attempt, RetryDecision, RetryPolicy, next_attempt};
use crate::core::migration::FailureReason;
use crate::core::time::Timestamp;

/// A VM on the host being drained.
#[derive(Debug, Clone, PartialEq)]
pub struct VmView {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Memory (bytes): the drain order.
    pub memory: u64,
    /// `spec.migratable`.
    pub migratable: bool,
    /// Has the `Quarantined` condition.
    pub quarantined: bool,
    /// Has been stopped by this drain (`nonMigratable: Stop`).
    pub stopped: bool,
}

/// One of the drain's Migrations of a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptView {
    /// Attempt number (1 = first).
    pub index: u32,
    /// Its phase.
    pub phase: MigrationPhase,
    /// Machine-readable failure reason, when Failed.
    pub reason: Option<FailureReason>,
    /// Its message.
    pub message: String,
    /// When it ended.
    pub completed: Option<Timestamp>,
}

/// What the pass must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Act {
    /// Create attempt `index` for the VM.
    Create {
        /// VM namespace.
        namespace: String,
        /// VM name.
        vm: String,
        /// Attempt number.
        index: u32,
    },
    /// Stop the VM for the maintenance.
    Stop {
        /// VM namespace.
        namespace: String,
        /// VM name.
        vm: String,
    },
    /// Put the `Quarantined` condition on the VM.
    Quarantine {
        /// VM namespace.
        namespace: String,
        /// VM name.
        vm: String,
        /// Why.
        message: String,
    },
}

/// A VM that cannot move, and whether waiting can change that.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    /// VM namespace.
    pub namespace: String,
    /// VM name.
    pub vm: String,
    /// Machine-readable reason.
    pub reason: String,
    /// For a person.
    pub message: String,
    /// Nothing this drain does will move it (retries given up, quarantine,
    /// cancelled by a user).
    pub fin: bool,
}

/// The outcome of a pass.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assessment {
    /// Things to do now, in drain order.
    pub acts: Vec<Act>,
    /// Blocked VMs.
    pub blocked: Vec<Blocked>,
    /// VMs still to leave (on the host, not stopped by the drain).
    pub remaining: u32,
    /// VMs with a migration of ours under way (or just created now).
    pub moving: u32,
    /// The earliest retry not yet due.
    pub next_retry: Option<Timestamp>,
}

fn terminal(p: MigrationPhase) -> bool {
    matches!(
        p,
        MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
    )
}

/// Assess one pass. `attempts(vm)` gives the drain's attempts for a VM,
/// `history(vm)` every recent failed migration of it (any origin).
pub fn assess(
    vms: &[VmView],
    stop_non_migratable: bool,
    attempts: &dyn Fn(&VmView) -> Vec<AttemptView>,
    history: &dyn Fn(&VmView) -> Vec<Attempt>,
    retry: &RetryPolicy,
    now: Timestamp,
) -> Assessment {
    let mut vms: Vec<&VmView> = vms.iter().collect();
    vms.sort_by(|a, b| {
        b.memory
            .cmp(&a.memory)
            .then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
    });
    let mut out = Assessment::default();
    for vm in vms {
        let block = |reason: &str, message: String, fin: bool| Blocked {
            namespace: vm.namespace.clone(),
            vm: vm.name.clone(),
            reason: reason.to_string(),
            message,
            fin,
        };
        if vm.stopped {
            continue;
        }
        out.remaining += 1;
        let mut mine = attempts(vm);
        mine.sort_by_key(|a| a.index);
        if mine
            .iter()
            .any(|a| !terminal(a.phase) || a.phase == MigrationPhase::Succeeded)
        {
            out.moving += 1;
            continue;
        }
        if vm.quarantined {
            out.blocked.push(block(
                "Quarantined",
                "the VM is quarantined after repeated failed migrations; clear its Quarantined condition to retry".into(),
                true,
            ));
            continue;
        }
        if !vm.migratable {
            if stop_non_migratable {
                out.acts.push(Act::Stop {
                    namespace: vm.namespace.clone(),
                    vm: vm.name.clone(),
                });
                out.remaining -= 1;
            } else {
                out.blocked.push(block(
                    "NotMigratable",
                    "the VM is not migratable and nonMigratable is Block".into(),
                    false,
                ));
            }
            continue;
        }
        if let Some(last) = mine.last()
            && last.phase == MigrationPhase::Cancelled
        {
            out.blocked.push(block(
                "Cancelled",
                format!(
                    "the drain's migration (attempt {}) was cancelled; delete it to try again",
                    last.index
                ),
                true,
            ));
            continue;
        }
        let failed: Vec<Attempt> = mine
            .iter()
            .filter(|a| a.phase == MigrationPhase::Failed)
            .map(|a| Attempt {
                at: a.completed.unwrap_or(now),
                reason: a.reason.unwrap_or(FailureReason::TransferFailed),
            })
            .collect();
        let last_reason = mine
            .last()
            .and_then(|a| a.reason)
            .map_or("RetriesExhausted", |r| {
                if r == FailureReason::NoHostFits {
                    "NoHostFits"
                } else {
                    "RetriesExhausted"
                }
            });
        let last_message = mine.last().map(|a| a.message.clone()).unwrap_or_default();
        match next_attempt(&failed, &history(vm), retry, now) {
            RetryDecision::RetryNow => {
                out.acts.push(Act::Create {
                    namespace: vm.namespace.clone(),
                    vm: vm.name.clone(),
                    index: mine.last().map_or(1, |a| a.index + 1),
                });
                out.moving += 1;
            }
            RetryDecision::RetryAt(at) => {
                out.next_retry = Some(out.next_retry.map_or(at, |t: Timestamp| t.min(at)));
                out.blocked.push(block(
                    super::report::RETRY_PENDING,
                    format!(
                        "attempt {} failed ({last_message}); retrying in {} s",
                        mine.len(),
                        at.since(now).as_secs()
                    ),
                    false,
                ));
            }
            RetryDecision::GiveUp { message } => {
                out.blocked.push(block(last_reason, message, true));
            }
            RetryDecision::Quarantine { message } => {
                out.acts.push(Act::Quarantine {
                    namespace: vm.namespace.clone(),
                    vm: vm.name.clone(),
                    message: message.clone(),
                });
                out.blocked.push(block("Quarantined", message, true));
            }
        }
    }
    out
}

/// How long until `at`, at least a little (for a requeue).
pub fn until(at: Timestamp, now: Timestamp) -> Duration {
    at.since(now).max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, memory: u64) -> VmView {
        VmView {
            namespace: "ns".into(),
            name: name.into(),
            memory,
            migratable: true,
            quarantined: false,
            stopped: false,
        }
    }

    fn failed(index: u32, at_s: i64) -> AttemptView {
        AttemptView {
            index,
            phase: MigrationPhase::Failed,
            reason: Some(FailureReason::NotConverging),
            message: "not converging".into(),
            completed: Some(Timestamp::from_millis(at_s * 1000)),
        }
    }

    fn run(vms: &[VmView], attempts: Vec<AttemptView>, now_s: i64, stop: bool) -> Assessment {
        let policy = RetryPolicy {
            base: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        assess(
            vms,
            stop,
            &|v: &VmView| {
                if v.name == "a" {
                    attempts.clone()
                } else {
                    Vec::new()
                }
            },
            &|_| Vec::new(),
            &policy,
            Timestamp::from_millis(now_s * 1000),
        )
    }

    #[test]
    fn every_vm_gets_a_first_attempt_largest_first() {
        let a = run(&[vm("small", 1), vm("big", 9)], vec![], 0, false);
        let names: Vec<_> = a
            .acts
            .iter()
            .map(|x| match x {
                Act::Create { vm, index, .. } => format!("{vm}#{index}"),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["big#1", "small#1"]);
        assert_eq!((a.remaining, a.moving), (2, 2));
    }

    #[test]
    fn a_vm_with_an_attempt_in_flight_or_succeeded_is_never_moved_again() {
        for phase in [MigrationPhase::Running, MigrationPhase::Succeeded] {
            let attempt = AttemptView {
                phase,
                ..failed(1, 0)
            };
            let a = run(&[vm("a", 1)], vec![attempt], 100, false);
            assert!(a.acts.is_empty(), "{phase:?}: {a:?}");
            assert_eq!(a.moving, 1);
        }
    }

    #[test]
    fn a_failure_is_retried_after_the_back_off_then_given_up() {
        let early = run(&[vm("a", 1)], vec![failed(1, 100)], 105, false);
        assert!(early.acts.is_empty());
        assert_eq!(early.next_retry, Some(Timestamp::from_millis(110_000)));
        let due = run(&[vm("a", 1)], vec![failed(1, 100)], 111, false);
        assert!(matches!(due.acts[..], [Act::Create { index: 2, .. }]));
        let spent = run(
            &[vm("a", 1)],
            vec![failed(1, 100), failed(2, 120), failed(3, 200)],
            1000,
            false,
        );
        assert!(spent.acts.is_empty());
        assert_eq!(spent.blocked[0].reason, "RetriesExhausted");
        assert!(spent.blocked[0].fin);
    }

    #[test]
    fn non_migratable_vms_block_or_are_stopped() {
        let pinned = VmView {
            migratable: false,
            ..vm("p", 1)
        };
        let blocked = run(std::slice::from_ref(&pinned), vec![], 0, false);
        assert_eq!(blocked.blocked[0].reason, "NotMigratable");
        assert_eq!(blocked.remaining, 1);
        let stopped = run(std::slice::from_ref(&pinned), vec![], 0, true);
        assert!(matches!(stopped.acts[..], [Act::Stop { .. }]));
        assert_eq!(stopped.remaining, 0);
        let done = run(
            &[VmView {
                stopped: true,
                ..pinned
            }],
            vec![],
            0,
            true,
        );
        assert_eq!(done, Assessment::default());
    }

    #[test]
    fn a_quarantined_vm_is_a_final_blocker() {
        let q = VmView {
            quarantined: true,
            ..vm("q", 1)
        };
        let a = run(&[q], vec![], 0, false);
        assert!(a.acts.is_empty());
        assert_eq!(a.blocked[0].reason, "Quarantined");
    }
}
