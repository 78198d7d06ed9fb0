//! `decide`: the next state, the actions and when to look again.

mod transfer;

use std::time::Duration;

use super::reasons::FailureReason;
use super::state::{
    AbortCause, AbortRequest, AdmissionOutcome, Deadlines, HostHealth, MigrationKind,
    MigrationState, Observation, PlacementOutcome, SourceReport, TargetReport, VmObservation,
};
use crate::core::policy::EffectivePolicy;
use crate::core::time::Timestamp;

/// How often an active migration is looked at again.
pub const POLL: Duration = Duration::from_secs(1);
/// How often a queued migration is looked at again (a slot freeing also
/// triggers a reconcile; this is the backstop).
pub const QUEUE_POLL: Duration = Duration::from_secs(5);
/// How soon a Completing migration looks again for its commit (the VM's
/// host read back): it still holds a slot that a drain's next VM waits for.
pub const COMMIT_POLL: Duration = Duration::from_millis(200);
/// The reason of a Queued migration that the admission queue holds back
/// (distinct from `Queued`, the transition into the queue, so the
/// controller records one Event when the wait begins).
pub const WAITING_FOR_SLOT: &str = "WaitingForSlot";
/// The source agent has this long to confirm an abort before the
/// migration is failed anyway (it sees the request within a second).
pub const ABORT_ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// The controller's progress backstop waits this much longer than
/// `progressTimeout`, so that the agent, which sees every sample, decides
/// first and with a better reason.
pub const PROGRESS_BACKSTOP_SLACK: Duration = Duration::from_secs(15);
/// How long the controller waits for the source to confirm a switchover
/// that the target reports done with the guest's whole memory (the source
/// agent itself reports within 30 s of QEMU's `completed`), before it
/// commits the VM to the target on the target's word alone.
pub const SWITCHOVER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// Kubernetes Event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Normal.
    Normal,
    /// Warning.
    Warning,
}

/// Something the shell does besides writing the next state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the scheduler and call `decide` again with its answer.
    ScheduleTarget,
    /// Store the scheduling decision in `status.schedulingDecision`.
    StoreSchedulingDecision,
    /// Run admission and call `decide` again with its answer.
    RequestAdmission,
    /// Write `status.sourceHost` / `status.targetHost`.
    AssignTarget {
        /// Source.
        source: String,
        /// Target.
        target: String,
    },
    /// Set the VM's `status.migration` to this Migration.
    SetVmMigrating,
    /// The target agent may prepare (the phase tells it; informational).
    PrepareTarget {
        /// Target host.
        host: String,
    },
    /// The source agent may start the transfer (the phase tells it).
    StartTransfer {
        /// Source host.
        host: String,
    },
    /// Ask the source agent to abort (condition `AbortRequested`).
    RequestAbort {
        /// Stable reason ("Cancelled" or a failure reason).
        reason: &'static str,
    },
    /// Write the VM's `status.host`: the commit point of a move.
    SetVmHost {
        /// The new host.
        host: String,
    },
    /// Clear the VM's `status.migration`.
    ClearVmMigration,
    /// Mark the VM failed (its guest was lost in post-copy).
    MarkVmFailed {
        /// Why.
        message: String,
    },
    /// Remove the Migration's finalizer (deletion may proceed).
    RemoveFinalizer,
    /// Emit a Kubernetes Event.
    EmitEvent {
        /// Type.
        kind: EventType,
        /// Reason.
        reason: &'static str,
        /// Message.
        message: String,
    },
}

/// The outcome of one `decide`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The state to record (maybe the same).
    pub next: MigrationState,
    /// What to do.
    pub actions: Vec<Action>,
    /// When to look again (`None`: only on change).
    pub requeue_after: Option<Duration>,
    /// Stable reason for the condition.
    pub reason: &'static str,
    /// For a person.
    pub message: String,
}

impl Decision {
    fn stay(
        state: &MigrationState,
        reason: &'static str,
        message: impl Into<String>,
        requeue: Duration,
    ) -> Self {
        Self {
            next: state.clone(),
            actions: vec![],
            requeue_after: Some(requeue),
            reason,
            message: message.into(),
        }
    }

    fn to(next: MigrationState, reason: &'static str, message: impl Into<String>) -> Self {
        let message = message.into();
        let kind = match &next {
            MigrationState::Failed { .. } => EventType::Warning,
            _ => EventType::Normal,
        };
        let event = Action::EmitEvent {
            kind,
            reason,
            message: message.clone(),
        };
        let requeue = if next.phase().is_terminal() {
            None
        } else {
            Some(Duration::ZERO)
        };
        Self {
            next,
            actions: vec![event],
            requeue_after: requeue,
            reason,
            message,
        }
    }

    /// Whether the shell may decide again at once from `next`, before
    /// writing anything, and record only where that ends: a step into a
    /// new state that looks again at once, with nothing whose effect the
    /// next decision would have to read back (the VM's host or its
    /// failure, a finalizer). A drain's Migration then goes from `Pending`
    /// to `PreparingTarget` in one status write instead of five.
    pub fn continues(&self, from: &MigrationState) -> bool {
        self.next != *from
            && !self.next.phase().is_terminal()
            && self.requeue_after == Some(Duration::ZERO)
            && !self.actions.iter().any(|a| {
                matches!(
                    a,
                    Action::SetVmHost { .. }
                        | Action::ClearVmMigration
                        | Action::MarkVmFailed { .. }
                        | Action::RemoveFinalizer
                )
            })
    }

    fn with(mut self, a: Action) -> Self {
        self.actions.push(a);
        self
    }

    fn terminal(mut self, o: &Observation, holds_vm: bool) -> Self {
        if holds_vm {
            self.actions.push(Action::ClearVmMigration);
        }
        if o.deleted {
            self.actions.push(Action::RemoveFinalizer);
        }
        self
    }
}

fn fail(
    o: &Observation,
    reason: FailureReason,
    detail: &str,
    now: Timestamp,
    holds_vm: bool,
) -> Decision {
    let message = if detail.is_empty() {
        reason.describe().to_string()
    } else {
        format!("{}: {detail}", reason.describe())
    };
    Decision::to(
        MigrationState::Failed {
            reason,
            message: message.clone(),
            at: now,
        },
        reason.as_str(),
        message,
    )
    .terminal(o, holds_vm)
}

fn cancelled(o: &Observation, now: Timestamp, holds_vm: bool) -> Decision {
    let why = if o.deleted {
        "the Migration was deleted"
    } else {
        "cancel was requested"
    };
    Decision::to(
        MigrationState::Cancelled { at: now },
        "Cancelled",
        format!("{why}; the VM stays on its host"),
    )
    .terminal(o, holds_vm)
}

fn healthy(h: HostHealth) -> bool {
    h == HostHealth::Ready
}

/// Decide what happens next (see the module documentation for the protocol).
pub fn decide(o: &Observation, policy: &EffectivePolicy, now: Timestamp) -> Decision {
    use MigrationState as S;
    let cancel = o.cancel_requested || o.deleted;
    let memory = match &o.vm {
        VmObservation::Present { memory, .. } => *memory,
        VmObservation::Missing => 0,
    };
    let vm_host = match &o.vm {
        VmObservation::Present { host, .. } => host.as_deref(),
        VmObservation::Missing => None,
    };
    let target_ok = o.target_health.is_none_or(healthy);
    match &o.state {
        S::Succeeded { .. } | S::Failed { .. } | S::Cancelled { .. } => {
            let mut d = Decision {
                next: o.state.clone(),
                actions: vec![],
                requeue_after: None,
                reason: o.state.phase().as_str(),
                message: "finished".into(),
            };
            if o.deleted {
                d.actions.push(Action::RemoveFinalizer);
            }
            d
        }
        _ if cancel && o.state.phase() <= super::Phase::PreparingTarget => {
            cancelled(o, now, o.state.phase().in_flight())
        }
        _ if o.vm == VmObservation::Missing && o.state.phase() <= super::Phase::Running => {
            fail(o, FailureReason::VmNotFound, "", now, false)
        }
        S::Pending => pending(o, policy, now),
        S::Scheduling => match &o.placement {
            None => Decision::stay(
                &o.state,
                "Scheduling",
                "choosing a target host",
                Duration::ZERO,
            )
            .with(Action::ScheduleTarget),
            Some(PlacementOutcome::NoHost { summary }) => {
                fail(o, FailureReason::NoHostFits, summary, now, false)
                    .with(Action::StoreSchedulingDecision)
            }
            Some(PlacementOutcome::Chosen { host }) => {
                let source = vm_host.unwrap_or_default().to_string();
                Decision::to(
                    S::Queued {
                        source: source.clone(),
                        target: host.clone(),
                    },
                    "Queued",
                    format!("target {host} chosen; waiting for a migration slot"),
                )
                .with(Action::StoreSchedulingDecision)
            }
        },
        S::Queued { source, target } => {
            if o.kind != MigrationKind::Evacuate && vm_host != Some(source.as_str()) {
                return Decision::to(
                    S::Scheduling,
                    "SourceChanged",
                    "the VM moved while queued; choosing again",
                );
            }
            if !target_ok {
                return Decision::to(
                    S::Scheduling,
                    "TargetUnavailable",
                    format!("{target} is no longer ready; choosing again"),
                );
            }
            match &o.admission {
                None => Decision::stay(&o.state, "Queued", "waiting for admission", Duration::ZERO)
                    .with(Action::RequestAdmission),
                Some(AdmissionOutcome::Waiting(why)) => {
                    Decision::stay(&o.state, WAITING_FOR_SLOT, why.clone(), QUEUE_POLL)
                }
                Some(AdmissionOutcome::Admitted) => Decision::to(
                    S::Scheduled {
                        source: source.clone(),
                        target: target.clone(),
                        scheduled: now,
                    },
                    "Scheduled",
                    format!("admitted: {source} → {target}"),
                )
                .with(Action::AssignTarget {
                    source: source.clone(),
                    target: target.clone(),
                })
                .with(Action::SetVmMigrating),
            }
        }
        S::Scheduled {
            source,
            target,
            scheduled,
        } => {
            if o.kind != MigrationKind::Evacuate && vm_host != Some(source.as_str()) {
                return Decision::to(
                    S::Scheduling,
                    "SourceChanged",
                    "the VM moved before the transfer; choosing again",
                )
                .with(Action::ClearVmMigration);
            }
            if !target_ok {
                return fail(o, FailureReason::TargetHostLost, target, now, true);
            }
            if o.kind == MigrationKind::Evacuate {
                if o.source_health != HostHealth::Fenced {
                    return Decision::stay(
                        &o.state,
                        "WaitingForFence",
                        format!("waiting until {source} is fenced: a VM never runs on two hosts"),
                        QUEUE_POLL,
                    );
                }
                return Decision::to(
                    S::Completing {
                        source: source.clone(),
                        target: target.clone(),
                        switchover: now,
                        downtime: None,
                    },
                    "Evacuating",
                    format!("{source} is fenced; rebuilding the VM on {target}"),
                )
                .with(Action::SetVmHost {
                    host: target.clone(),
                });
            }
            if !healthy(o.source_health) {
                return fail(o, FailureReason::SourceHostLost, source, now, true);
            }
            Decision::to(
                S::PreparingTarget {
                    source: source.clone(),
                    target: target.clone(),
                    scheduled: *scheduled,
                },
                "PreparingTarget",
                format!("{target} prepares the incoming VM"),
            )
            .with(Action::PrepareTarget {
                host: target.clone(),
            })
        }
        S::PreparingTarget {
            source,
            target,
            scheduled,
        } => {
            if !healthy(o.source_health) {
                return fail(o, FailureReason::SourceHostLost, source, now, true);
            }
            if !target_ok {
                return fail(o, FailureReason::TargetHostLost, target, now, true);
            }
            match &o.target {
                TargetReport::Failed(f) => fail(o, f.reason, &f.message, now, true),
                // Prepared ahead: the transfer waits for its own slot.
                TargetReport::Ready | TargetReport::Running { .. } => match &o.admission {
                    None => Decision::stay(
                        &o.state,
                        "PreparingTarget",
                        format!("{target} is ready; asking for a transfer slot"),
                        Duration::ZERO,
                    )
                    .with(Action::RequestAdmission),
                    Some(AdmissionOutcome::Waiting(why)) => Decision::stay(
                        &o.state,
                        WAITING_FOR_SLOT,
                        format!("{target} is ready; {why}"),
                        QUEUE_POLL,
                    ),
                    Some(AdmissionOutcome::Admitted) => Decision::to(
                        S::Running {
                            source: source.clone(),
                            target: target.clone(),
                            started: now,
                            abort: None,
                        },
                        "Running",
                        format!("{target} is ready; {source} starts the transfer"),
                    )
                    .with(Action::StartTransfer {
                        host: source.clone(),
                    }),
                },
                TargetReport::None | TargetReport::Preparing => {
                    let limit = policy.convergence.progress_timeout;
                    if now.since(*scheduled) > limit {
                        fail(
                            o,
                            FailureReason::TargetPreparationTimeout,
                            &format!("{target} not ready after {}s", limit.as_secs()),
                            now,
                            true,
                        )
                    } else {
                        Decision::stay(
                            &o.state,
                            "PreparingTarget",
                            format!("waiting for {target}"),
                            POLL,
                        )
                    }
                }
            }
        }
        S::Running {
            source,
            target,
            started,
            abort,
        } => transfer::running(
            o,
            policy,
            now,
            (source, target, *started, abort.as_ref()),
            memory,
        ),
        S::PostCopy {
            source,
            target,
            started,
            ..
        } => transfer::post_copy(o, policy, now, (source, target, *started), memory),
        S::Completing {
            source,
            target,
            switchover,
            downtime,
        } => {
            if o.vm == VmObservation::Missing {
                return fail(
                    o,
                    FailureReason::VmNotFound,
                    "deleted during switchover",
                    now,
                    false,
                );
            }
            if vm_host == Some(target.as_str()) {
                let dt = downtime
                    .map(|d| format!(", downtime {} ms", d.as_millis()))
                    .unwrap_or_default();
                return Decision::to(
                    S::Succeeded {
                        source: source.clone(),
                        target: target.clone(),
                        completed: now,
                        downtime: *downtime,
                    },
                    "Succeeded",
                    format!("the VM runs on {target}{dt}"),
                )
                .terminal(o, true);
            }
            let mut d = Decision::stay(
                &o.state,
                "Completing",
                format!(
                    "switchover at {}ms; recording {target} as the VM's host",
                    switchover.as_millis()
                ),
                COMMIT_POLL,
            )
            .with(Action::SetVmHost {
                host: target.clone(),
            });
            if cancel {
                d = d.with(Action::EmitEvent {
                    kind: EventType::Warning,
                    reason: "CancelTooLate",
                    message: "the switchover is done; the migration can no longer be cancelled"
                        .into(),
                });
            }
            d
        }
    }
}

fn pending(o: &Observation, policy: &EffectivePolicy, now: Timestamp) -> Decision {
    let VmObservation::Present {
        host,
        migratable,
        unsafe_disk_cache,
        ..
    } = &o.vm
    else {
        return fail(o, FailureReason::VmNotFound, "", now, false);
    };
    if let Some(p) = &o.missing_policy {
        return fail(o, FailureReason::PolicyNotFound, p, now, false);
    }
    match o.kind {
        MigrationKind::Evacuate => {
            if !matches!(
                o.source_health,
                HostHealth::Fenced | HostHealth::Unreachable
            ) {
                let h = host.as_deref().unwrap_or("no host");
                return fail(
                    o,
                    FailureReason::SourceNotFailed,
                    &format!("{h} is up"),
                    now,
                    false,
                );
            }
        }
        MigrationKind::Live | MigrationKind::Cold => {
            if host.is_none() {
                return fail(o, FailureReason::VmNotRunning, "", now, false);
            }
            if o.kind == MigrationKind::Live && !migratable {
                return fail(o, FailureReason::VmNotMigratable, "", now, false);
            }
            if o.kind == MigrationKind::Live && *unsafe_disk_cache && !policy.allow_unsafe {
                return fail(o, FailureReason::UnsafeDiskCache, "", now, false);
            }
        }
    }
    Decision::to(
        MigrationState::Scheduling,
        "Scheduling",
        "validated; choosing a target host",
    )
}
