use std::time::Duration;

use super::*;
use crate::core::policy::EffectivePolicy;
use crate::core::time::{GIB, Timestamp};

const T0: Timestamp = Timestamp::from_secs(1_000);

fn now() -> Timestamp {
    T0.plus(Duration::from_secs(10))
}

fn late() -> Timestamp {
    T0.plus(Duration::from_secs(36_000))
}

fn base(state: MigrationState) -> Observation {
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

fn failure(reason: FailureReason) -> AgentFailure {
    AgentFailure {
        reason,
        message: "boom".into(),
    }
}

/// A named observation: how it changes the neutral one, and whether `now`
/// is far past every deadline.
type Stimulus = (&'static str, fn(&mut Observation), bool);

fn stimuli() -> Vec<Stimulus> {
    vec![
        ("nothing new", |_| {}, false),
        ("cancel requested", |o| o.cancel_requested = true, false),
        ("deleted", |o| o.deleted = true, false),
        ("vm missing", |o| o.vm = VmObservation::Missing, false),
        (
            "source unreachable",
            |o| o.source_health = HostHealth::Unreachable,
            false,
        ),
        (
            "source fenced",
            |o| o.source_health = HostHealth::Fenced,
            false,
        ),
        (
            "target unreachable",
            |o| o.target_health = Some(HostHealth::Unreachable),
            false,
        ),
        (
            "placement chosen",
            |o| o.placement = Some(PlacementOutcome::Chosen { host: "dst".into() }),
            false,
        ),
        (
            "no host fits",
            |o| {
                o.placement = Some(PlacementOutcome::NoHost {
                    summary: "none".into(),
                })
            },
            false,
        ),
        (
            "admitted",
            |o| o.admission = Some(AdmissionOutcome::Admitted),
            false,
        ),
        (
            "must wait",
            |o| o.admission = Some(AdmissionOutcome::Waiting("cluster limit".into())),
            false,
        ),
        ("target ready", |o| o.target = TargetReport::Ready, false),
        (
            "target failed",
            |o| o.target = TargetReport::Failed(failure(FailureReason::TargetPreparationFailed)),
            false,
        ),
        (
            "progress",
            |o| {
                o.source = SourceReport::Transferring {
                    last_progress: T0.plus(Duration::from_secs(9)),
                }
            },
            false,
        ),
        (
            "post-copy active",
            |o| o.source = SourceReport::PostCopyActive,
            false,
        ),
        (
            "switched over",
            |o| {
                o.source = SourceReport::SwitchedOver {
                    downtime: Some(Duration::from_millis(80)),
                }
            },
            false,
        ),
        (
            "source aborted",
            |o| o.source = SourceReport::Aborted,
            false,
        ),
        (
            "source failed",
            |o| o.source = SourceReport::Failed(failure(FailureReason::NotConverging)),
            false,
        ),
        (
            "vm on target",
            |o| {
                o.vm = VmObservation::Present {
                    host: Some("dst".into()),
                    migratable: true,
                    unsafe_disk_cache: false,
                    memory: GIB,
                }
            },
            false,
        ),
        ("deadlines passed", |_| {}, true),
    ]
}

fn states() -> Vec<(&'static str, MigrationState)> {
    let (s, t) = ("src".to_string(), "dst".to_string());
    vec![
        ("Pending", MigrationState::Pending),
        ("Scheduling", MigrationState::Scheduling),
        (
            "Queued",
            MigrationState::Queued {
                source: s.clone(),
                target: t.clone(),
            },
        ),
        (
            "Scheduled",
            MigrationState::Scheduled {
                source: s.clone(),
                target: t.clone(),
                scheduled: T0,
            },
        ),
        (
            "PreparingTarget",
            MigrationState::PreparingTarget {
                source: s.clone(),
                target: t.clone(),
                started: T0,
            },
        ),
        (
            "Running",
            MigrationState::Running {
                source: s.clone(),
                target: t.clone(),
                started: T0,
                abort: None,
            },
        ),
        (
            "Running+abort",
            MigrationState::Running {
                source: s.clone(),
                target: t.clone(),
                started: T0,
                abort: Some(AbortRequest {
                    cause: AbortCause::Cancel,
                    at: T0.plus(Duration::from_secs(5)),
                }),
            },
        ),
        (
            "PostCopy",
            MigrationState::PostCopy {
                source: s.clone(),
                target: t.clone(),
                started: T0,
                post_copy_since: T0,
            },
        ),
        (
            "Completing",
            MigrationState::Completing {
                source: s.clone(),
                target: t.clone(),
                switchover: T0,
                downtime: None,
            },
        ),
        (
            "Succeeded",
            MigrationState::Succeeded {
                source: s,
                target: t,
                completed: T0,
                downtime: None,
            },
        ),
        (
            "Failed",
            MigrationState::Failed {
                reason: FailureReason::NoHostFits,
                message: "x".into(),
                at: T0,
            },
        ),
        ("Cancelled", MigrationState::Cancelled { at: T0 }),
    ]
}

fn label(s: &MigrationState) -> &'static str {
    match s {
        MigrationState::Running { abort: Some(_), .. } => "Running+abort",
        other => other.phase().as_str(),
    }
}

/// Expected next state for every (state, stimulus), in `stimuli()` order.
const EXPECTED: &[(&str, [&str; 20])] = &[
    (
        "Pending",
        [
            "Scheduling",
            "Cancelled",
            "Cancelled",
            "Failed",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
        ],
    ),
    (
        "Scheduling",
        [
            "Scheduling",
            "Cancelled",
            "Cancelled",
            "Failed",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Queued",
            "Failed",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
            "Scheduling",
        ],
    ),
    (
        "Queued",
        [
            "Queued",
            "Cancelled",
            "Cancelled",
            "Failed",
            "Queued",
            "Queued",
            "Scheduling",
            "Queued",
            "Queued",
            "Scheduled",
            "Queued",
            "Queued",
            "Queued",
            "Queued",
            "Queued",
            "Queued",
            "Queued",
            "Queued",
            "Scheduling",
            "Queued",
        ],
    ),
    (
        "Scheduled",
        [
            "PreparingTarget",
            "Cancelled",
            "Cancelled",
            "Failed",
            "Failed",
            "Failed",
            "Failed",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "Scheduling",
            "PreparingTarget",
        ],
    ),
    (
        "PreparingTarget",
        [
            "PreparingTarget",
            "Cancelled",
            "Cancelled",
            "Failed",
            "Failed",
            "Failed",
            "Failed",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "Running",
            "Failed",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "PreparingTarget",
            "Failed",
        ],
    ),
    (
        "Running",
        [
            "Running",
            "Running+abort",
            "Running+abort",
            "Failed",
            "Failed",
            "Failed",
            "Running+abort",
            "Running",
            "Running",
            "Running",
            "Running",
            "Running",
            "Running+abort",
            "Running",
            "PostCopy",
            "Completing",
            "Failed",
            "Failed",
            "Running",
            "Running+abort",
        ],
    ),
    (
        "Running+abort",
        [
            "Running+abort",
            "Running+abort",
            "Running+abort",
            "Failed",
            "Failed",
            "Failed",
            "Running+abort",
            "Running+abort",
            "Running+abort",
            "Running+abort",
            "Running+abort",
            "Running+abort",
            "Running+abort",
            "Running+abort",
            "PostCopy",
            "Completing",
            "Cancelled",
            "Failed",
            "Running+abort",
            "Failed",
        ],
    ),
    (
        "PostCopy",
        [
            "PostCopy",
            "PostCopy",
            "PostCopy",
            "PostCopy",
            "PostCopy",
            "PostCopy",
            "PostCopy",
            "PostCopy",
            "PostCopy",
            "PostCopy",
            "PostCopy",
            "PostCopy",
            "Failed",
            "PostCopy",
            "PostCopy",
            "Completing",
            "PostCopy",
            "Failed",
            "PostCopy",
            "PostCopy",
        ],
    ),
    (
        "Completing",
        [
            "Completing",
            "Completing",
            "Completing",
            "Failed",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Completing",
            "Succeeded",
            "Completing",
        ],
    ),
    ("Succeeded", ["Succeeded"; 20]),
    ("Failed", ["Failed"; 20]),
    ("Cancelled", ["Cancelled"; 20]),
];

#[test]
fn every_phase_answers_every_observation_as_the_table_says() {
    let policy = EffectivePolicy::default();
    let stimuli = stimuli();
    let states = states();
    assert_eq!(states.len(), EXPECTED.len());
    let mut failures = Vec::new();
    for ((name, state), (row, expected)) in states.iter().zip(EXPECTED) {
        assert_eq!(name, row);
        for ((what, apply, is_late), want) in stimuli.iter().zip(expected.iter()) {
            let mut o = base(state.clone());
            apply(&mut o);
            let t = if *is_late { late() } else { now() };
            let d = decide(&o, &policy, t);
            if label(&d.next) != *want {
                failures.push(format!(
                    "{name} × {what}: got {} ({}: {}), want {want}",
                    label(&d.next),
                    d.reason,
                    d.message
                ));
            }
            check_invariants(&o, &d, name, what);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What must hold for any decision.
fn check_invariants(o: &Observation, d: &Decision, name: &str, what: &str) {
    let (from, to) = (o.state.phase(), d.next.phase());
    let ctx = format!("{name} × {what}");
    assert!(
        from.may_become(to),
        "{ctx}: {from:?} → {to:?} is not a transition"
    );
    assert_eq!(
        d.requeue_after.is_none(),
        to.is_terminal(),
        "{ctx}: requeue {:?}",
        d.requeue_after
    );
    assert!(!d.message.is_empty() && !d.reason.is_empty(), "{ctx}");
    // The VM's host changes only at a confirmed switchover or a fenced evacuation.
    if d.actions
        .iter()
        .any(|a| matches!(a, Action::SetVmHost { .. }))
    {
        assert_eq!(to, Phase::Completing, "{ctx}");
        let fenced = o.kind == MigrationKind::Evacuate && o.source_health == HostHealth::Fenced;
        let confirmed =
            matches!(o.source, SourceReport::SwitchedOver { .. }) || from == Phase::Completing;
        assert!(
            confirmed || fenced,
            "{ctx}: host changed without a switchover"
        );
    }
    // A deleted Migration lets go of its finalizer exactly when it is finished.
    let releases = d.actions.contains(&Action::RemoveFinalizer);
    assert_eq!(releases, o.deleted && to.is_terminal(), "{ctx}: finalizer");
    if from != to && !from.is_terminal() {
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::EmitEvent { .. })),
            "{ctx}: no event on a transition"
        );
    }
    if let (
        false,
        MigrationState::Failed {
            message, reason, ..
        },
    ) = (from.is_terminal(), &d.next)
    {
        assert!(message.starts_with(reason.describe()), "{ctx}: {message}");
    }
    // Once the transfer may have started, only the source agent's word ends it.
    if from == Phase::Running && matches!(to, Phase::Cancelled) {
        assert_eq!(o.source, SourceReport::Aborted, "{ctx}");
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
