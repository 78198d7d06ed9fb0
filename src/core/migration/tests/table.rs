//! Every phase × every observation, as one table.

use std::time::Duration;

use super::super::*;
use super::{T0, base, failure, late, now};
use crate::core::policy::EffectivePolicy;
use crate::core::time::GIB;

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
#[rustfmt::skip]
const EXPECTED: &[(&str, [&str; 20])] = &[
    ("Pending", ["Scheduling", "Cancelled", "Cancelled", "Failed", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling"]),
    ("Scheduling", ["Scheduling", "Cancelled", "Cancelled", "Failed", "Scheduling", "Scheduling", "Scheduling", "Queued", "Failed", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling", "Scheduling"]),
    ("Queued", ["Queued", "Cancelled", "Cancelled", "Failed", "Queued", "Queued", "Scheduling", "Queued", "Queued", "Scheduled", "Queued", "Queued", "Queued", "Queued", "Queued", "Queued", "Queued", "Queued", "Scheduling", "Queued"]),
    ("Scheduled", ["PreparingTarget", "Cancelled", "Cancelled", "Failed", "Failed", "Failed", "Failed", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "Scheduling", "PreparingTarget"]),
    ("PreparingTarget", ["PreparingTarget", "Cancelled", "Cancelled", "Failed", "Failed", "Failed", "Failed", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "Running", "Failed", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "PreparingTarget", "Failed"]),
    ("Running", ["Running", "Running+abort", "Running+abort", "Failed", "Failed", "Failed", "Running+abort", "Running", "Running", "Running", "Running", "Running", "Running+abort", "Running", "PostCopy", "Completing", "Failed", "Failed", "Running", "Running+abort"]),
    ("Running+abort", ["Running+abort", "Running+abort", "Running+abort", "Failed", "Failed", "Failed", "Running+abort", "Running+abort", "Running+abort", "Running+abort", "Running+abort", "Running+abort", "Running+abort", "Running+abort", "PostCopy", "Completing", "Cancelled", "Failed", "Running+abort", "Failed"]),
    ("PostCopy", ["PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "PostCopy", "Failed", "PostCopy", "PostCopy", "Completing", "PostCopy", "Failed", "PostCopy", "PostCopy"]),
    ("Completing", ["Completing", "Completing", "Completing", "Failed", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Completing", "Succeeded", "Completing"]),
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
