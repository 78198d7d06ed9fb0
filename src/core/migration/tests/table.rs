//! Every phase × every observation, as one table.

use std::time::Duration;

use super::super::*;
use super::{T0, base, failure, late, now};
use crate::core::policy::EffectivePolicy;
use crate::core::time::GIB;

/// A named observation: how it changes the neutral one, and whether `now`
/// is far past every deadline.
pub(super) type Stimulus = (&'static str, fn(&mut Observation), bool);

pub(super) fn stimuli() -> Vec<Stimulus> {
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
        (
            "target ready, transfer admitted",
            |o| {
                o.target = TargetReport::Ready;
                o.admission = Some(AdmissionOutcome::Admitted);
            },
            false,
        ),
        (
            "target ready, transfer must wait",
            |o| {
                o.target = TargetReport::Ready;
                o.admission = Some(AdmissionOutcome::Waiting("outbound limit".into()));
            },
            false,
        ),
        (
            "target runs the guest, all its memory there",
            |o| {
                o.target = TargetReport::Running {
                    memory_complete: true,
                    since: T0,
                }
            },
            false,
        ),
        (
            "target runs the guest in post-copy",
            |o| {
                o.target = TargetReport::Running {
                    memory_complete: false,
                    since: T0,
                }
            },
            false,
        ),
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
                scheduled: T0,
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
#[rustfmt::skip]
const EXPECTED: &[(&str, [&str; 24])] = &[
    ("Pending", ["Scheduling", "Cancelled", "Cancelled", "Failed", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling"]),
    ("Scheduling", ["Scheduling", "Cancelled", "Cancelled", "Failed", "Scheduling", "Scheduling", "Scheduling", "Queued", "Failed", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling"]),
    ("Queued", ["Queued", "Cancelled", "Cancelled", "Failed", "Queued", "Queued", "Scheduling", "Queued", "Queued", "Scheduled", "Queued", "Queued", "Queued", "Queued", "Queued", "Queued", "Queued", "Queued", "Scheduling", "Queued", "Scheduled", "Queued", "Queued", "Queued"]),
    ("Scheduled", ["PreparingTarget", "Cancelled", "Cancelled", "Failed", "Failed", "Failed", "Failed", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "Scheduling", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget"]),
    ("PreparingTarget", ["PreparingTarget", "Cancelled", "Cancelled", "Failed", "Failed", "Failed", "Failed", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "Failed", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "Failed", "Running", "PreparingTarget", "PreparingTarget", "PreparingTarget"]),
    ("Running", ["Running", "Running+abort", "Running+abort", "Failed", "Failed", "Failed", "Running+abort", "Running", "Running", "Running", "Running", "Running", "Running+abort", "Running", "PostCopy", "Completing", "Failed", "Failed", "Running", "Running+abort", "Running", "Running", "Running", "PostCopy"]),
    ("Running+abort", ["Running+abort", "Running+abort", "Running+abort", "Failed", "Failed", "Failed", "Running+abort", "Running+abort", "Running+abort", "Running+abort", "Running+abort", "Running+abort", "Running+abort", "Running+abort", "PostCopy", "Completing", "Cancelled", "Failed", "Running+abort", "Failed", "Running+abort", "Running+abort", "Running+abort", "PostCopy"]),
    ("PostCopy", ["PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "Failed", "PostCopy", "PostCopy", "Completing", "PostCopy", "Failed", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy"]),
    ("Completing", ["Completing", "Completing", "Completing", "Failed", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Succeeded", "Completing", "Completing", "Completing", "Completing", "Completing"]),
    ("Succeeded", ["Succeeded"; 24]),
    ("Failed", ["Failed"; 24]),
    ("Cancelled", ["Cancelled"; 24]),
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
pub(super) fn check_invariants(o: &Observation, d: &Decision, name: &str, what: &str) {
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
        // Confirmed by the source, or — when the source cannot say — by a
        // target that runs the guest with its whole memory.
        let confirmed = matches!(o.source, SourceReport::SwitchedOver { .. })
            || from == Phase::Completing
            || matches!(
                o.target,
                TargetReport::Running {
                    memory_complete: true,
                    ..
                }
            );
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

proptest::proptest! {
    /// Any sequence of observations, from creation: the invariants of
    /// [`check_invariants`] hold at every step, terminal states are final,
    /// and the VM's host never changes unless the source agent confirmed a
    /// switchover.
    #[test]
    fn any_sequence_of_observations_keeps_the_invariants(
        steps in proptest::collection::vec((0usize..24, 0u64..400, proptest::bool::ANY, proptest::bool::ANY), 1..40),
        kind in proptest::prop_oneof![
            proptest::strategy::Just(MigrationKind::Live),
            proptest::strategy::Just(MigrationKind::Cold),
            proptest::strategy::Just(MigrationKind::Evacuate),
        ],
    ) {
        let policy = EffectivePolicy::default();
        let stimuli = stimuli();
        let mut state = MigrationState::Pending;
        let mut t = T0;
        for (i, dt, sticky_vm, happy) in steps {
            t = t.plus(Duration::from_secs(dt));
            // Half the steps push along the happy path, so that walks reach
            // the transfer phases, not only the early ones.
            let i = if happy {
                match state.phase() {
                    Phase::Scheduling => 7,
                    Phase::Queued => 9,
                    Phase::PreparingTarget => 20,
                    Phase::Running => [13, 14, 15][i % 3],
                    Phase::PostCopy => 15,
                    Phase::Completing => 18,
                    _ => 0,
                }
            } else {
                i
            };
            let (what, apply, _) = &stimuli[i];
            let mut o = base(state.clone());
            o.kind = kind;
            if kind == MigrationKind::Evacuate {
                o.source_health = HostHealth::Fenced;
            }
            apply(&mut o);
            if sticky_vm && o.state.phase() == Phase::Completing {
                // The VM's host has been written: read it back.
                o.vm = VmObservation::Present { host: Some("dst".into()), migratable: true, unsafe_disk_cache: false, memory: GIB };
            }
            if let MigrationState::Queued { target, .. } = &o.state {
                // The placement chose "dst"; the VM is still on "src".
                proptest::prop_assert_eq!(target, "dst");
            }
            let d = decide(&o, &policy, t);
            check_invariants(&o, &d, o.state.phase().as_str(), what);
            if o.state.phase().is_terminal() {
                proptest::prop_assert_eq!(&d.next, &o.state);
            }
            state = d.next;
        }
    }
}
