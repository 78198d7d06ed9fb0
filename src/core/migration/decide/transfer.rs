//! The transfer phases: `Running` (with its abort handshake) and `PostCopy`.

use super::ABORT_ACK_TIMEOUT;
use super::POLL;
use super::SWITCHOVER_CONFIRM_TIMEOUT;
use super::{
    AbortCause, AbortRequest, Action, Deadlines, Decision, EventType, FailureReason,
    MigrationState, Observation, PROGRESS_BACKSTOP_SLACK, SourceReport, TargetReport, cancelled,
    fail, healthy,
};
use crate::core::policy::{ConvergenceMode, EffectivePolicy};
use crate::core::time::Timestamp;

pub(super) fn running(
    o: &Observation,
    policy: &EffectivePolicy,
    now: Timestamp,
    (source, target, started, abort): (&String, &String, Timestamp, Option<&AbortRequest>),
    memory: u64,
) -> Decision {
    use MigrationState as S;
    // What the source agent says comes first: it is the truth about the VM.
    match &o.source {
        SourceReport::SwitchedOver { downtime } => {
            let mut d = Decision::to(
                S::Completing {
                    source: source.clone(),
                    target: target.clone(),
                    switchover: now,
                    downtime: *downtime,
                },
                "SwitchedOver",
                format!("switchover done; the VM runs on {target}"),
            )
            .with(Action::SetVmHost {
                host: target.clone(),
            });
            if abort.is_some() {
                d = d.with(Action::EmitEvent {
                    kind: EventType::Warning,
                    reason: "AbortTooLate",
                    message: "the switchover completed before the abort".into(),
                });
            }
            return d;
        }
        SourceReport::Failed(f) => return fail(o, f.reason, &f.message, now, true),
        SourceReport::Aborted => {
            return match abort.map(|a| &a.cause) {
                Some(AbortCause::Cancel) => cancelled(o, now, true),
                Some(AbortCause::Failure(r, m)) => fail(o, *r, m, now, true),
                // The agent saw the cancel before the controller recorded
                // its request: it is the same cancel.
                None if o.cancel_requested || o.deleted => cancelled(o, now, true),
                None => fail(
                    o,
                    FailureReason::TransferFailed,
                    "the source agent aborted the transfer",
                    now,
                    true,
                ),
            };
        }
        SourceReport::PostCopyActive => {
            let mut d = Decision::to(
                S::PostCopy {
                    source: source.clone(),
                    target: target.clone(),
                    started,
                    post_copy_since: now,
                },
                "PostCopy",
                format!(
                    "post-copy: the guest runs on {target} and pulls its remaining pages from {source}"
                ),
            );
            if abort.is_some() {
                d = d.with(Action::EmitEvent {
                    kind: EventType::Warning,
                    reason: "AbortTooLate",
                    message: "post-copy started before the abort".into(),
                });
            }
            return d;
        }
        _ => {}
    }
    // The guest runs on the target and the source has not said how the
    // transfer ended. Nothing may now fail the migration back to the
    // source: its QEMU has stopped the guest for good, and the target's copy
    // is the one that runs. A guest started without its whole memory is in
    // post-copy (the source's report of it may still be on its way); one
    // with all of it has switched over, which the source confirms once it
    // sees this report — or, if it cannot, the target's word commits it.
    if let TargetReport::Running {
        memory_complete,
        since,
    } = o.target
    {
        if !memory_complete {
            return Decision::to(
                S::PostCopy {
                    source: source.clone(),
                    target: target.clone(),
                    started,
                    post_copy_since: since,
                },
                "PostCopy",
                format!(
                    "the guest runs on {target} without all its memory (post-copy); \
                     {source} holds the rest"
                ),
            );
        }
        let waited = now.since(since);
        if waited > SWITCHOVER_CONFIRM_TIMEOUT || !healthy(o.source_health) {
            let why = if healthy(o.source_health) {
                format!("{source} did not confirm within {}s", waited.as_secs())
            } else {
                format!("{source} stopped answering")
            };
            let mut d = Decision::to(
                S::Completing {
                    source: source.clone(),
                    target: target.clone(),
                    switchover: now,
                    downtime: None,
                },
                "SwitchoverUnconfirmed",
                format!(
                    "the guest runs on {target} with its whole memory; {why}, so the VM is \
                     committed to {target} on its agent's word"
                ),
            )
            .with(Action::SetVmHost {
                host: target.clone(),
            });
            if let Some(Action::EmitEvent { kind, .. }) = d.actions.first_mut() {
                *kind = EventType::Warning;
            }
            return d;
        }
        if (o.cancel_requested || o.deleted) && abort.is_none() {
            // Too late to cancel: noted, so that the switchover's Event
            // says the cancel lost the race; nothing is asked of the source.
            return Decision::to(
                S::Running {
                    source: source.clone(),
                    target: target.clone(),
                    started,
                    abort: Some(AbortRequest {
                        cause: AbortCause::Cancel,
                        at: now,
                    }),
                },
                "CancelTooLate",
                format!(
                    "cancel requested after the guest started on {target}; the switchover completes"
                ),
            );
        }
        return Decision::stay(
            &o.state,
            "SwitchingOver",
            format!("the guest runs on {target}; waiting for {source} to confirm the switchover"),
            POLL,
        );
    }
    if !healthy(o.source_health) {
        return fail(o, FailureReason::SourceHostLost, source, now, true);
    }
    if let Some(a) = abort {
        if now.since(a.at) > ABORT_ACK_TIMEOUT {
            let detail = match &a.cause {
                AbortCause::Cancel => "cancel requested".to_string(),
                AbortCause::Failure(r, m) => format!("{r}: {m}"),
            };
            return fail(o, FailureReason::AbortUnconfirmed, &detail, now, true);
        }
        let reason = match &a.cause {
            AbortCause::Cancel => "Cancelled",
            AbortCause::Failure(r, _) => r.as_str(),
        };
        return Decision::stay(
            &o.state,
            "Aborting",
            format!("waiting for {source} to abort ({reason})"),
            POLL,
        )
        .with(Action::RequestAbort { reason });
    }
    let abort_with = |cause: AbortCause, message: String| {
        let reason = match &cause {
            AbortCause::Cancel => "Cancelled",
            AbortCause::Failure(r, _) => r.as_str(),
        };
        let next = S::Running {
            source: source.clone(),
            target: target.clone(),
            started,
            abort: Some(AbortRequest { cause, at: now }),
        };
        Decision::to(next, "Aborting", message).with(Action::RequestAbort { reason })
    };
    if o.cancel_requested || o.deleted {
        return abort_with(
            AbortCause::Cancel,
            format!("cancel requested; asking {source} to abort"),
        );
    }
    if let TargetReport::Failed(f) = &o.target {
        return abort_with(
            AbortCause::Failure(f.reason, f.message.clone()),
            format!("{target} failed: {}", f.message),
        );
    }
    if !o.target_health.is_none_or(healthy) {
        return abort_with(
            AbortCause::Failure(FailureReason::TargetHostLost, target.clone()),
            format!("{target} stopped answering"),
        );
    }
    let deadline = Deadlines::new(
        started,
        memory,
        policy.convergence.completion_timeout_per_gib,
    );
    if now > deadline.completion {
        let m = format!(
            "started {}s ago, allowed {}s",
            now.since(started).as_secs(),
            deadline.completion.since(started).as_secs()
        );
        return abort_with(
            AbortCause::Failure(FailureReason::CompletionTimeout, m.clone()),
            m,
        );
    }
    let last_progress = match &o.source {
        SourceReport::Transferring { last_progress } => (*last_progress).max(started),
        _ => started,
    };
    // The backstop stands in for a source agent that stopped deciding, in
    // the modes whose agent gives up at progressTimeout. The ladder modes
    // (PostCopy, SuspendWorkloadIfNeeded) climb past progressTimeout by
    // design — throttling, raising the downtime, pausing take a step each —
    // and end at the completion deadline above.
    let gives_up_at_progress_timeout = matches!(
        policy.convergence.mode,
        ConvergenceMode::MinimalDowntime | ConvergenceMode::Legacy
    );
    let allowed = policy.convergence.progress_timeout + PROGRESS_BACKSTOP_SLACK;
    if gives_up_at_progress_timeout && now.since(last_progress) > allowed {
        let m = format!("no progress for {}s", now.since(last_progress).as_secs());
        return abort_with(
            AbortCause::Failure(FailureReason::ProgressTimeout, m.clone()),
            m,
        );
    }
    Decision::stay(
        &o.state,
        "Running",
        format!("transferring {source} → {target}"),
        POLL,
    )
}

pub(super) fn post_copy(
    o: &Observation,
    policy: &EffectivePolicy,
    now: Timestamp,
    (source, target, started): (&String, &String, Timestamp),
    memory: u64,
) -> Decision {
    use MigrationState as S;
    let lost = |detail: &str| {
        let d = fail(o, FailureReason::PostCopyInterrupted, detail, now, true);
        let message = d.message.clone();
        d.with(Action::MarkVmFailed { message })
    };
    match (&o.source, &o.target) {
        (SourceReport::SwitchedOver { downtime }, _) => {
            return Decision::to(
                S::Completing {
                    source: source.clone(),
                    target: target.clone(),
                    switchover: now,
                    downtime: *downtime,
                },
                "SwitchedOver",
                format!("post-copy finished; the VM runs on {target}"),
            )
            .with(Action::SetVmHost {
                host: target.clone(),
            });
        }
        (SourceReport::Failed(f), _) | (_, TargetReport::Failed(f)) => return lost(&f.message),
        _ => {}
    }
    let deadline = Deadlines::new(
        started,
        memory,
        policy.convergence.completion_timeout_per_gib,
    );
    let hosts_ok = healthy(o.source_health) && o.target_health.is_none_or(healthy);
    if !hosts_ok && now > deadline.completion {
        return lost("a host stayed unreachable past the completion deadline");
    }
    let mut d = if hosts_ok {
        Decision::stay(
            &o.state,
            "PostCopy",
            format!("{target} pulls the remaining pages from {source}"),
            POLL,
        )
    } else {
        Decision::stay(
            &o.state,
            "PostCopyRecovering",
            "a host is unreachable; the agents try to resume post-copy",
            POLL,
        )
    };
    if o.cancel_requested || o.deleted {
        d = d.with(Action::EmitEvent {
            kind: EventType::Warning,
            reason: "CancelRefused",
            message: "the guest already runs on the target in post-copy; cancelling would lose it"
                .into(),
        });
    }
    d
}
