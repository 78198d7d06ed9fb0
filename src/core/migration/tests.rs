use std::time::Duration;

use super::*;
use crate::core::policy::{ConvergenceMode, EffectivePolicy};
use crate::core::time::{GIB, Timestamp};

mod chain;
mod table;

pub(super) const T0: Timestamp = Timestamp::from_secs(1_000);

pub(super) fn now() -> Timestamp {
    T0.plus(Duration::from_secs(10))
}

pub(super) fn late() -> Timestamp {
    T0.plus(Duration::from_secs(36_000))
}

pub(super) fn base(state: MigrationState) -> Observation {
    Observation {
        state,
        kind: MigrationKind::Live,
        cancel_requested: false,
        deleted: false,
        missing_policy: None,
        vm: VmObservation::Present {
            host: Some("src".into()),
            migratable: true,
            unsafe_disk_cache: false,
            memory: GIB,
        },
        source_health: HostHealth::Ready,
        target_health: Some(HostHealth::Ready),
        placement: None,
        admission: None,
        target: TargetReport::None,
        source: SourceReport::None,
    }
}

pub(super) fn failure(reason: FailureReason) -> AgentFailure {
    AgentFailure {
        reason,
        message: "boom".into(),
    }
}

#[test]
fn validation_refuses_what_cannot_move_live() {
    let present = |host: Option<&str>, migratable, unsafe_cache| VmObservation::Present {
        host: host.map(str::to_string),
        migratable,
        unsafe_disk_cache: unsafe_cache,
        memory: GIB,
    };
    let table = [
        (
            MigrationKind::Live,
            present(None, true, false),
            HostHealth::Ready,
            Some(FailureReason::VmNotRunning),
        ),
        (
            MigrationKind::Live,
            present(Some("src"), false, false),
            HostHealth::Ready,
            Some(FailureReason::VmNotMigratable),
        ),
        (
            MigrationKind::Cold,
            present(Some("src"), false, false),
            HostHealth::Ready,
            None,
        ),
        (
            MigrationKind::Live,
            present(Some("src"), true, true),
            HostHealth::Ready,
            Some(FailureReason::UnsafeDiskCache),
        ),
        (
            MigrationKind::Evacuate,
            present(Some("src"), true, false),
            HostHealth::Ready,
            Some(FailureReason::SourceNotFailed),
        ),
        (
            MigrationKind::Evacuate,
            present(Some("src"), false, true),
            HostHealth::Fenced,
            None,
        ),
    ];
    for (kind, vm, health, want) in table {
        let mut o = base(MigrationState::Pending);
        (o.kind, o.vm, o.source_health) = (kind, vm, health);
        let d = decide(&o, &EffectivePolicy::default(), now());
        match (want, &d.next) {
            (Some(r), MigrationState::Failed { reason, .. }) => assert_eq!(*reason, r),
            (None, MigrationState::Scheduling) => {}
            (w, got) => panic!("{kind:?}: want {w:?}, got {got:?}"),
        }
    }
}

#[test]
fn unsafe_disk_cache_moves_when_the_policy_allows_it() {
    let mut o = base(MigrationState::Pending);
    o.vm = VmObservation::Present {
        host: Some("src".into()),
        migratable: true,
        unsafe_disk_cache: true,
        memory: GIB,
    };
    let p = EffectivePolicy {
        allow_unsafe: true,
        ..Default::default()
    };
    assert_eq!(decide(&o, &p, now()).next, MigrationState::Scheduling);
}

#[test]
fn a_missing_policy_fails_the_migration_with_its_name() {
    let mut o = base(MigrationState::Pending);
    o.missing_policy = Some("gold".into());
    let d = decide(&o, &EffectivePolicy::default(), now());
    assert!(
        matches!(&d.next, MigrationState::Failed { reason: FailureReason::PolicyNotFound, message, .. } if message.contains("gold"))
    );
}

#[test]
fn the_completion_deadline_scales_with_memory_and_is_never_stored() {
    let per_gib = Duration::from_secs(150);
    assert_eq!(
        Deadlines::new(T0, 4 * GIB, per_gib).completion,
        T0.plus(Duration::from_secs(600))
    );
    assert_eq!(
        Deadlines::new(T0, GIB + 1, per_gib).completion,
        T0.plus(Duration::from_secs(300))
    );
    assert_eq!(
        Deadlines::new(T0, 0, per_gib).completion,
        T0.plus(Duration::from_secs(150))
    );
    // 4 GiB: fine at 590 s, aborting at 610 s.
    let mut o = base(MigrationState::Running {
        source: "src".into(),
        target: "dst".into(),
        started: T0,
        abort: None,
    });
    o.vm = VmObservation::Present {
        host: Some("src".into()),
        migratable: true,
        unsafe_disk_cache: false,
        memory: 4 * GIB,
    };
    o.source = SourceReport::Transferring {
        last_progress: T0.plus(Duration::from_secs(580)),
    };
    let p = EffectivePolicy::default();
    assert_eq!(
        decide(&o, &p, T0.plus(Duration::from_secs(590))).next,
        o.state
    );
    let d = decide(&o, &p, T0.plus(Duration::from_secs(610)));
    assert!(
        d.actions.contains(&Action::RequestAbort {
            reason: "CompletionTimeout"
        }),
        "{d:?}"
    );
}

#[test]
fn no_progress_for_the_timeout_asks_for_an_abort_and_the_answer_fails_the_migration() {
    let p = EffectivePolicy::default();
    let mut o = base(MigrationState::Running {
        source: "src".into(),
        target: "dst".into(),
        started: T0,
        abort: None,
    });
    o.vm = VmObservation::Present {
        host: Some("src".into()),
        migratable: true,
        unsafe_disk_cache: false,
        memory: 8 * GIB,
    };
    o.source = SourceReport::Transferring { last_progress: T0 };
    let at =
        T0.plus(p.convergence.progress_timeout + PROGRESS_BACKSTOP_SLACK + Duration::from_secs(1));
    let d = decide(&o, &p, at);
    assert!(d.actions.contains(&Action::RequestAbort {
        reason: "ProgressTimeout"
    }));
    let mut o2 = base(d.next.clone());
    o2.source = SourceReport::Aborted;
    let d2 = decide(&o2, &p, at.plus(Duration::from_secs(2)));
    assert!(
        matches!(
            d2.next,
            MigrationState::Failed {
                reason: FailureReason::ProgressTimeout,
                ..
            }
        ),
        "{d2:?}"
    );
    assert!(d2.actions.contains(&Action::ClearVmMigration));
}

#[test]
fn the_ladder_modes_climb_past_the_progress_timeout_and_end_at_the_completion_deadline() {
    for mode in [
        ConvergenceMode::SuspendWorkloadIfNeeded,
        ConvergenceMode::PostCopy,
    ] {
        let mut p = EffectivePolicy::default();
        p.convergence.mode = mode;
        let mut o = base(MigrationState::Running {
            source: "src".into(),
            target: "dst".into(),
            started: T0,
            abort: None,
        });
        o.vm = VmObservation::Present {
            host: Some("src".into()),
            migratable: true,
            unsafe_disk_cache: false,
            memory: 8 * GIB,
        };
        o.source = SourceReport::Transferring { last_progress: T0 };
        let past_backstop = T0.plus(
            p.convergence.progress_timeout + PROGRESS_BACKSTOP_SLACK + Duration::from_secs(1),
        );
        let d = decide(&o, &p, past_backstop);
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::RequestAbort { .. })),
            "{mode:?}: the agent's ladder is still climbing: {d:?}"
        );
        let deadline = Deadlines::new(T0, 8 * GIB, p.convergence.completion_timeout_per_gib);
        let d = decide(&o, &p, deadline.completion.plus(Duration::from_secs(1)));
        assert!(
            d.actions.contains(&Action::RequestAbort {
                reason: "CompletionTimeout"
            }),
            "{mode:?}: {d:?}"
        );
    }
}

#[test]
fn an_unconfirmed_abort_fails_after_the_ack_timeout() {
    let abort = AbortRequest {
        cause: AbortCause::Cancel,
        at: T0,
    };
    let o = base(MigrationState::Running {
        source: "src".into(),
        target: "dst".into(),
        started: T0,
        abort: Some(abort),
    });
    let p = EffectivePolicy::default();
    let d = decide(&o, &p, T0.plus(ABORT_ACK_TIMEOUT));
    assert_eq!(
        d.actions,
        vec![Action::RequestAbort {
            reason: "Cancelled"
        }],
        "still waiting at the limit"
    );
    let d = decide(&o, &p, T0.plus(ABORT_ACK_TIMEOUT + Duration::from_secs(1)));
    assert!(matches!(
        d.next,
        MigrationState::Failed {
            reason: FailureReason::AbortUnconfirmed,
            ..
        }
    ));
}

fn running(abort: Option<AbortRequest>) -> Observation {
    base(MigrationState::Running {
        source: "src".into(),
        target: "dst".into(),
        started: T0,
        abort,
    })
}

fn target_runs(memory_complete: bool, since: Timestamp) -> TargetReport {
    TargetReport::Running {
        memory_complete,
        since,
    }
}

#[test]
fn a_guest_running_on_the_target_is_never_failed_back_to_the_source() {
    let p = EffectivePolicy::default();
    // An abort asked for long ago and never confirmed: once the target runs
    // the guest, the source's QEMU has stopped it for good, so failing the
    // migration (the VM stays on the source) would lose the only copy.
    let mut o = running(Some(AbortRequest {
        cause: AbortCause::Failure(FailureReason::CompletionTimeout, "late".into()),
        at: T0,
    }));
    o.source = SourceReport::Transferring { last_progress: T0 };
    let at = T0.plus(ABORT_ACK_TIMEOUT + Duration::from_secs(5));
    o.target = target_runs(true, at);
    let d = decide(&o, &p, at.plus(Duration::from_secs(1)));
    assert_eq!(
        (d.next.phase(), d.reason),
        (Phase::Running, "SwitchingOver")
    );
    assert!(
        d.actions.is_empty(),
        "no abort is asked for: {:?}",
        d.actions
    );
    // Past every deadline it still waits for the source's word.
    let mut o = running(None);
    o.target = target_runs(true, late());
    let d = decide(&o, &p, late());
    assert_eq!(d.reason, "SwitchingOver");
}

#[test]
fn a_switchover_the_source_cannot_confirm_is_committed_on_the_targets_word() {
    let p = EffectivePolicy::default();
    let mut o = running(None);
    o.source = SourceReport::Transferring { last_progress: T0 };
    o.target = target_runs(true, T0);
    let d = decide(&o, &p, T0.plus(SWITCHOVER_CONFIRM_TIMEOUT));
    assert_eq!(d.reason, "SwitchingOver", "still waiting at the limit");
    let d = decide(
        &o,
        &p,
        T0.plus(SWITCHOVER_CONFIRM_TIMEOUT + Duration::from_secs(1)),
    );
    assert_eq!(d.next.phase(), Phase::Completing);
    assert!(
        d.actions
            .contains(&Action::SetVmHost { host: "dst".into() })
    );
    assert!(d.actions.iter().any(|a| matches!(
        a,
        Action::EmitEvent {
            kind: EventType::Warning,
            reason: "SwitchoverUnconfirmed",
            ..
        }
    )));
    // A source host that stopped answering cannot confirm: no wait.
    o.source_health = HostHealth::Unreachable;
    let d = decide(&o, &p, T0.plus(Duration::from_secs(2)));
    assert_eq!(d.next.phase(), Phase::Completing, "{}", d.message);
    assert!(d.message.contains("stopped answering"), "{}", d.message);
}

#[test]
fn a_guest_started_on_the_target_without_all_its_memory_is_post_copy() {
    let p = EffectivePolicy::default();
    let mut o = running(None);
    o.source = SourceReport::Transferring { last_progress: T0 };
    o.target = target_runs(false, T0.plus(Duration::from_secs(3)));
    let d = decide(&o, &p, now());
    assert!(
        matches!(d.next, MigrationState::PostCopy { post_copy_since, .. } if post_copy_since == T0.plus(Duration::from_secs(3))),
        "{:?}",
        d.next
    );
    // Never committed on the target's word: the source holds pages.
    o.source_health = HostHealth::Unreachable;
    let d = decide(&o, &p, late());
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::SetVmHost { .. }))
    );
}

#[test]
fn a_cancel_after_the_guest_started_on_the_target_is_too_late_and_said_so() {
    let p = EffectivePolicy::default();
    let mut o = running(None);
    o.cancel_requested = true;
    o.target = target_runs(true, T0);
    let d = decide(&o, &p, now());
    assert_eq!(d.reason, "CancelTooLate");
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::RequestAbort { .. })),
        "{:?}",
        d.actions
    );
    let mut o = base(d.next);
    o.cancel_requested = true;
    o.source = SourceReport::SwitchedOver { downtime: None };
    let d = decide(&o, &p, now());
    assert_eq!(d.next.phase(), Phase::Completing);
    assert!(d.actions.iter().any(|a| matches!(
        a,
        Action::EmitEvent {
            reason: "AbortTooLate",
            ..
        }
    )));
}

#[test]
fn evacuation_waits_for_the_fence_then_commits_the_new_host() {
    let p = EffectivePolicy::default();
    let mut o = base(MigrationState::Scheduled {
        source: "src".into(),
        target: "dst".into(),
        scheduled: T0,
    });
    o.kind = MigrationKind::Evacuate;
    o.source_health = HostHealth::Unreachable;
    let d = decide(&o, &p, now());
    assert_eq!(
        (d.next.phase(), d.reason),
        (Phase::Scheduled, "WaitingForFence")
    );
    assert!(d.actions.is_empty());
    o.source_health = HostHealth::Fenced;
    let d = decide(&o, &p, now());
    assert_eq!(d.next.phase(), Phase::Completing);
    assert!(
        d.actions
            .contains(&Action::SetVmHost { host: "dst".into() })
    );
}

#[test]
fn a_user_target_that_fails_the_filters_fails_the_migration_with_the_summary() {
    let mut o = base(MigrationState::Scheduling);
    o.placement = Some(PlacementOutcome::NoHost {
        summary: "dst: host is Maintenance".into(),
    });
    let d = decide(&o, &EffectivePolicy::default(), now());
    assert!(
        matches!(&d.next, MigrationState::Failed { reason: FailureReason::NoHostFits, message, .. } if message.contains("Maintenance"))
    );
    assert!(d.actions.contains(&Action::StoreSchedulingDecision));
}

#[test]
fn success_records_the_downtime_and_releases_the_vm() {
    let mut o = base(MigrationState::Running {
        source: "src".into(),
        target: "dst".into(),
        started: T0,
        abort: None,
    });
    o.source = SourceReport::SwitchedOver {
        downtime: Some(Duration::from_millis(42)),
    };
    let p = EffectivePolicy::default();
    let d = decide(&o, &p, now());
    let mut o2 = base(d.next);
    o2.vm = VmObservation::Present {
        host: Some("dst".into()),
        migratable: true,
        unsafe_disk_cache: false,
        memory: GIB,
    };
    let d2 = decide(&o2, &p, now());
    assert!(
        matches!(d2.next, MigrationState::Succeeded { downtime: Some(dt), .. } if dt == Duration::from_millis(42))
    );
    assert!(d2.message.contains("42 ms") && d2.actions.contains(&Action::ClearVmMigration));
}

#[test]
fn losing_the_guest_in_post_copy_marks_the_vm_failed() {
    let mut o = base(MigrationState::PostCopy {
        source: "src".into(),
        target: "dst".into(),
        started: T0,
        post_copy_since: T0,
    });
    o.source_health = HostHealth::Unreachable;
    let d = decide(&o, &EffectivePolicy::default(), late());
    assert!(matches!(
        d.next,
        MigrationState::Failed {
            reason: FailureReason::PostCopyInterrupted,
            ..
        }
    ));
    assert!(
        d.actions
            .iter()
            .any(|a| matches!(a, Action::MarkVmFailed { .. }))
    );
}
