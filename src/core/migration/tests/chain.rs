//! Following one decision with the next before writing
//! (`Decision::continues`), and the transfer's own admission once the
//! target is ready.

use std::time::Duration;

use super::super::*;
use super::{T0, base, late, now};
use crate::core::policy::EffectivePolicy;

/// What the shell does in one reconcile: give the answers asked for, follow
/// every step that continues, and return the phases passed and the last
/// decision with every action of the steps passed.
fn follow(mut o: Observation, admission: AdmissionOutcome) -> (Vec<Phase>, Decision) {
    let policy = EffectivePolicy::default();
    let mut passed = Vec::new();
    let mut actions = Vec::new();
    let mut d = decide(&o, &policy, now());
    for _ in 0..10 {
        if d.actions.contains(&Action::ScheduleTarget) && o.placement.is_none() {
            o.placement = Some(PlacementOutcome::Chosen { host: "dst".into() });
        } else if d.actions.contains(&Action::RequestAdmission) && o.admission.is_none() {
            o.admission = Some(admission.clone());
        } else if d.continues(&o.state) {
            assert!(o.state.phase().may_become(d.next.phase()));
            passed.push(o.state.phase());
            o.state = d.next.clone();
            o.placement = None;
            o.admission = None;
            actions.append(&mut d.actions);
        } else {
            break;
        }
        d = decide(&o, &policy, now());
    }
    actions.append(&mut d.actions);
    d.actions = actions;
    (passed, d)
}

fn events(d: &Decision) -> Vec<&'static str> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::EmitEvent { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

#[test]
fn a_new_migration_reaches_preparing_its_target_in_one_write_when_every_answer_is_at_hand() {
    let (passed, d) = follow(base(MigrationState::Pending), AdmissionOutcome::Admitted);
    assert_eq!(
        passed,
        [
            Phase::Pending,
            Phase::Scheduling,
            Phase::Queued,
            Phase::Scheduled
        ]
    );
    assert_eq!(
        d.next,
        MigrationState::PreparingTarget {
            source: "src".into(),
            target: "dst".into(),
            scheduled: now(),
        }
    );
    // Every step still tells its story and does its part.
    assert_eq!(
        events(&d),
        ["Scheduling", "Queued", "Scheduled", "PreparingTarget"]
    );
    for action in [Action::StoreSchedulingDecision, Action::SetVmMigrating] {
        assert!(d.actions.contains(&action), "{action:?}: {:?}", d.actions);
    }
    // Held back by the queue, it is recorded as Queued, waiting.
    let (passed, d) = follow(
        base(MigrationState::Pending),
        AdmissionOutcome::Waiting("full".into()),
    );
    assert_eq!(passed, [Phase::Pending, Phase::Scheduling]);
    assert_eq!(d.next.phase(), Phase::Queued);
    assert_eq!(d.reason, WAITING_FOR_SLOT);
}

#[test]
fn nothing_is_followed_past_a_write_the_next_decision_must_read_back() {
    let policy = EffectivePolicy::default();
    let running = MigrationState::Running {
        source: "src".into(),
        target: "dst".into(),
        started: T0,
        abort: None,
    };
    // The switchover: the VM's host is written, read back by the next look.
    let mut o = base(running.clone());
    o.source = SourceReport::SwitchedOver { downtime: None };
    let d = decide(&o, &policy, now());
    assert_eq!(d.next.phase(), Phase::Completing);
    assert!(!d.continues(&o.state));
    // A final state, or staying put.
    o.source = SourceReport::Aborted;
    let d = decide(&o, &policy, now());
    assert!(d.next.phase().is_terminal() && !d.continues(&o.state));
    let d = decide(&base(running.clone()), &policy, now());
    assert_eq!(d.next, running);
    assert!(!d.continues(&running));
}

#[test]
fn a_prepared_target_waits_for_a_transfer_slot_and_the_transfer_clock_starts_when_it_gets_one() {
    let policy = EffectivePolicy::default();
    let preparing = MigrationState::PreparingTarget {
        source: "src".into(),
        target: "dst".into(),
        scheduled: T0,
    };
    let mut o = base(preparing.clone());
    o.target = TargetReport::Ready;
    let d = decide(&o, &policy, now());
    assert_eq!(d.next, preparing);
    assert!(d.actions.contains(&Action::RequestAdmission), "{d:?}");
    // Waiting, however long, is not a preparation that timed out: the
    // target is ready.
    o.admission = Some(AdmissionOutcome::Waiting("waiting: h0 is full".into()));
    let d = decide(&o, &policy, late());
    assert_eq!(d.next, preparing);
    assert_eq!(d.reason, WAITING_FOR_SLOT);
    assert!(d.message.contains("dst is ready; waiting: h0 is full"));
    assert_eq!(d.requeue_after, Some(QUEUE_POLL));
    // Admitted: the transfer starts, and its deadlines count from now, not
    // from the admission to prepare.
    o.admission = Some(AdmissionOutcome::Admitted);
    let at = T0.plus(Duration::from_secs(600));
    let d = decide(&o, &policy, at);
    assert_eq!(
        d.next,
        MigrationState::Running {
            source: "src".into(),
            target: "dst".into(),
            started: at,
            abort: None,
        }
    );
    assert!(
        d.actions
            .contains(&Action::StartTransfer { host: "src".into() })
    );
    // A target not ready within the timeout still fails it.
    let mut o = base(preparing);
    o.target = TargetReport::Preparing;
    let d = decide(&o, &policy, late());
    assert!(matches!(
        d.next,
        MigrationState::Failed {
            reason: FailureReason::TargetPreparationTimeout,
            ..
        }
    ));
}

#[test]
fn a_source_that_aborts_on_a_cancel_before_the_request_is_recorded_ends_it_cancelled() {
    let mut o = base(MigrationState::Running {
        source: "src".into(),
        target: "dst".into(),
        started: T0,
        abort: None,
    });
    o.source = SourceReport::Aborted;
    o.cancel_requested = true;
    let d = decide(&o, &EffectivePolicy::default(), now());
    assert!(matches!(d.next, MigrationState::Cancelled { .. }), "{d:?}");
    assert!(d.actions.contains(&Action::ClearVmMigration));
    // Without a cancel, an abort nobody asked for is a failed transfer.
    o.cancel_requested = false;
    let d = decide(&o, &EffectivePolicy::default(), now());
    assert!(matches!(
        d.next,
        MigrationState::Failed {
            reason: FailureReason::TransferFailed,
            ..
        }
    ));
}
