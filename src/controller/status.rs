//! The Migration's status and the core's `MigrationState`, both ways.
//!
//! The state is recorded in the status and nowhere else, so a restarted
//! controller resumes every migration from what the API says:
//!
//! | state | recorded as |
//! |---|---|
//! | hosts of `Queued` … `Succeeded` | `sourceHost`, `targetHost` |
//! | `Scheduled.scheduled`, `PreparingTarget.scheduled` | `timestamps.scheduled` |
//! | `started` (the transfer's start) | `timestamps.started` |
//! | `Running.abort` | condition `AbortRequested` (reason = cause, time = when) |
//! | `PostCopy.post_copy_since` | `timestamps.postCopy` |
//! | `Completing.switchover`, `downtime` | `timestamps.switchover`, `downtimeMs` |
//! | `Succeeded.completed`, `Failed.at`, `Cancelled.at` | `timestamps.completed` |
//! | `Failed.reason`, `message` | `failureReason`, `message` |

use std::str::FromStr;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp as Jiff;

use crate::api::MigrationPhase;
use crate::api::migration::{AgentReport, AgentState, MigrationStatus, Timestamps};
use crate::core::migration::{
    AbortCause, AbortRequest, AgentFailure, FailureReason, MigrationState, SourceReport,
    TargetReport,
};
use crate::core::time::Timestamp;

/// The condition type of an abort request to the source agent.
pub const ABORT_REQUESTED: &str = "AbortRequested";

/// The controller's clock, as the core's time (the core never reads a
/// clock itself).
pub fn now() -> Timestamp {
    Timestamp::from_millis(Jiff::now().as_millisecond())
}

/// API time to core time.
pub fn to_core(t: &Time) -> Timestamp {
    Timestamp::from_millis(t.0.as_millisecond())
}

/// Core time to API time.
pub fn to_api(t: Timestamp) -> Time {
    Time(Jiff::from_millisecond(t.as_millis()).unwrap_or(Jiff::UNIX_EPOCH))
}

fn failure(reason: Option<&str>, message: Option<&str>) -> AgentFailure {
    AgentFailure {
        reason: reason
            .and_then(|r| FailureReason::from_str(r).ok())
            .unwrap_or(FailureReason::TransferFailed),
        message: message.unwrap_or_default().to_string(),
    }
}

/// What the target agent reported (`now` dates a report without a time).
pub fn target_report(status: &MigrationStatus, now: Timestamp) -> TargetReport {
    match status.target.as_ref() {
        None => TargetReport::None,
        Some(r) => match r.state {
            AgentState::Preparing => TargetReport::Preparing,
            AgentState::Ready => TargetReport::Ready,
            AgentState::Running => TargetReport::Running {
                memory_complete: r.memory_complete.unwrap_or(false),
                since: r.time.as_ref().map_or(now, to_core),
            },
            AgentState::Failed => TargetReport::Failed(failure(
                r.reason.as_deref().or(Some("TargetPreparationFailed")),
                r.message.as_deref(),
            )),
            // Source-only states never appear here; CleanedUp follows a
            // final phase.
            _ => TargetReport::None,
        },
    }
}

/// What the source agent reported.
pub fn source_report(status: &MigrationStatus, now: Timestamp) -> SourceReport {
    let Some(r) = status.source.as_ref() else {
        return SourceReport::None;
    };
    match r.state {
        AgentState::Transferring => SourceReport::Transferring {
            last_progress: r
                .last_progress
                .as_ref()
                .or(r.time.as_ref())
                .map(to_core)
                .unwrap_or(now),
        },
        AgentState::PostCopyActive => SourceReport::PostCopyActive,
        AgentState::SwitchedOver => SourceReport::SwitchedOver {
            downtime: status.downtime_ms.map(Duration::from_millis),
        },
        AgentState::Aborted => SourceReport::Aborted,
        AgentState::Failed => {
            SourceReport::Failed(failure(r.reason.as_deref(), r.message.as_deref()))
        }
        _ => SourceReport::None,
    }
}

/// The recorded state of a migration.
pub fn state_of(status: &MigrationStatus, now: Timestamp) -> MigrationState {
    let ts = status.timestamps.clone().unwrap_or_default();
    let at = |t: &Option<Time>| t.as_ref().map(to_core).unwrap_or(now);
    let source = status.source_host.clone().unwrap_or_default();
    let target = status.target_host.clone().unwrap_or_default();
    let downtime = status.downtime_ms.map(Duration::from_millis);
    match status.phase {
        MigrationPhase::Pending => MigrationState::Pending,
        MigrationPhase::Scheduling => MigrationState::Scheduling,
        MigrationPhase::Queued => MigrationState::Queued { source, target },
        MigrationPhase::Scheduled => MigrationState::Scheduled {
            source,
            target,
            scheduled: at(&ts.scheduled),
        },
        MigrationPhase::PreparingTarget => MigrationState::PreparingTarget {
            source,
            target,
            scheduled: at(&ts.scheduled),
        },
        MigrationPhase::Running => MigrationState::Running {
            source,
            target,
            started: at(&ts.started),
            abort: status
                .conditions
                .iter()
                .find(|c| c.type_ == ABORT_REQUESTED && c.status == "True")
                .map(|c| AbortRequest {
                    cause: if c.reason == "Cancelled" {
                        AbortCause::Cancel
                    } else {
                        AbortCause::Failure(
                            FailureReason::from_str(&c.reason)
                                .unwrap_or(FailureReason::TransferFailed),
                            c.message.clone(),
                        )
                    },
                    at: to_core(&c.last_transition_time),
                }),
        },
        MigrationPhase::PostCopy => MigrationState::PostCopy {
            source,
            target,
            started: at(&ts.started),
            post_copy_since: at(&ts.post_copy),
        },
        MigrationPhase::Completing => MigrationState::Completing {
            source,
            target,
            switchover: at(&ts.switchover),
            downtime,
        },
        MigrationPhase::Succeeded => MigrationState::Succeeded {
            source,
            target,
            completed: at(&ts.completed),
            downtime,
        },
        MigrationPhase::Failed => MigrationState::Failed {
            reason: status
                .failure_reason
                .as_deref()
                .and_then(|r| FailureReason::from_str(r).ok())
                .unwrap_or(FailureReason::TransferFailed),
            message: status.message.clone().unwrap_or_default(),
            at: at(&ts.completed),
        },
        MigrationPhase::Cancelled => MigrationState::Cancelled {
            at: at(&ts.completed),
        },
    }
}

/// The API phase of a state.
pub fn phase_of(state: &MigrationState) -> MigrationPhase {
    api_phase(state.phase())
}

/// The API phase of a core phase.
pub fn api_phase(phase: crate::core::migration::Phase) -> MigrationPhase {
    use crate::core::migration::Phase as P;
    match phase {
        P::Pending => MigrationPhase::Pending,
        P::Scheduling => MigrationPhase::Scheduling,
        P::Queued => MigrationPhase::Queued,
        P::Scheduled => MigrationPhase::Scheduled,
        P::PreparingTarget => MigrationPhase::PreparingTarget,
        P::Running => MigrationPhase::Running,
        P::PostCopy => MigrationPhase::PostCopy,
        P::Completing => MigrationPhase::Completing,
        P::Succeeded => MigrationPhase::Succeeded,
        P::Failed => MigrationPhase::Failed,
        P::Cancelled => MigrationPhase::Cancelled,
    }
}

/// The core's phase of an API phase (the inverse of [`api_phase`]).
pub fn core_phase(p: MigrationPhase) -> crate::core::migration::Phase {
    use crate::core::migration::Phase as P;
    match p {
        MigrationPhase::Pending => P::Pending,
        MigrationPhase::Scheduling => P::Scheduling,
        MigrationPhase::Queued => P::Queued,
        MigrationPhase::Scheduled => P::Scheduled,
        MigrationPhase::PreparingTarget => P::PreparingTarget,
        MigrationPhase::Running => P::Running,
        MigrationPhase::PostCopy => P::PostCopy,
        MigrationPhase::Completing => P::Completing,
        MigrationPhase::Succeeded => P::Succeeded,
        MigrationPhase::Failed => P::Failed,
        MigrationPhase::Cancelled => P::Cancelled,
    }
}

/// The status fields the controller owns, for a merge patch: the state,
/// the timestamps it implies (earlier ones kept), and the conditions.
pub fn status_patch(
    previous: &MigrationStatus,
    state: &MigrationState,
    reason: &str,
    message: &str,
) -> serde_json::Value {
    let message = match state {
        MigrationState::Failed { message, .. } => message.as_str(),
        _ => message,
    };
    let mut ts: Timestamps = previous.timestamps.clone().unwrap_or_default();
    let mut abort: Option<&AbortRequest> = None;
    let (mut downtime, mut failure_reason) = (None, None);
    match state {
        MigrationState::Scheduled { scheduled, .. } => ts.scheduled = Some(to_api(*scheduled)),
        MigrationState::PreparingTarget { scheduled, .. } => {
            ts.scheduled = Some(to_api(*scheduled))
        }
        MigrationState::Running {
            started, abort: a, ..
        } => {
            ts.started = Some(to_api(*started));
            abort = a.as_ref();
        }
        MigrationState::PostCopy {
            started,
            post_copy_since,
            ..
        } => {
            ts.started = Some(to_api(*started));
            ts.post_copy = Some(to_api(*post_copy_since));
        }
        MigrationState::Completing {
            switchover,
            downtime: d,
            ..
        } => {
            ts.switchover = Some(to_api(*switchover));
            downtime = *d;
        }
        MigrationState::Succeeded {
            completed,
            downtime: d,
            ..
        } => {
            ts.completed = Some(to_api(*completed));
            downtime = *d;
        }
        MigrationState::Failed { reason, at, .. } => {
            ts.completed = Some(to_api(*at));
            failure_reason = Some(reason.as_str());
        }
        MigrationState::Cancelled { at } => ts.completed = Some(to_api(*at)),
        MigrationState::Pending | MigrationState::Scheduling | MigrationState::Queued { .. } => {}
    }
    let phase = phase_of(state);
    let now = Time(Jiff::now());
    let mut conditions: Vec<Condition> = Vec::new();
    let keep_time = |type_: &str, status: &str| {
        previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
    };
    let succeeded = phase == MigrationPhase::Succeeded;
    let done = matches!(
        phase,
        MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
    );
    let progressing = if done { "False" } else { "True" };
    conditions.push(Condition {
        type_: "Progressing".into(),
        status: progressing.into(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: keep_time("Progressing", progressing).unwrap_or_else(|| now.clone()),
        observed_generation: None,
    });
    let ok = if succeeded { "True" } else { "False" };
    conditions.push(Condition {
        type_: "Succeeded".into(),
        status: ok.into(),
        reason: if succeeded {
            "Succeeded".into()
        } else {
            core_phase(phase).as_str().into()
        },
        message: message.to_string(),
        last_transition_time: keep_time("Succeeded", ok).unwrap_or_else(|| now.clone()),
        observed_generation: None,
    });
    if let Some(a) = abort {
        let (reason, message) = match &a.cause {
            AbortCause::Cancel => (
                "Cancelled".to_string(),
                "cancel requested; the source agent stops the transfer".to_string(),
            ),
            AbortCause::Failure(r, m) => (r.as_str().to_string(), m.clone()),
        };
        conditions.push(Condition {
            type_: ABORT_REQUESTED.into(),
            status: "True".into(),
            reason,
            message,
            last_transition_time: to_api(a.at),
            observed_generation: None,
        });
    }
    let (source, target) = state.hosts().map_or((None, None), |(s, t)| {
        (Some(s.to_string()), Some(t.to_string()))
    });
    let mut status = serde_json::json!({
        "phase": phase,
        "timestamps": ts,
        "conditions": conditions,
        "message": message,
    });
    let map = status.as_object_mut().expect("a JSON object");
    if let Some(s) = source.filter(|s| !s.is_empty()) {
        map.insert("sourceHost".into(), serde_json::json!(s));
    }
    if let Some(t) = target.filter(|t| !t.is_empty()) {
        map.insert("targetHost".into(), serde_json::json!(t));
    }
    if let Some(d) = downtime {
        map.insert("downtimeMs".into(), serde_json::json!(d.as_millis() as u64));
    }
    if let Some(r) = failure_reason {
        map.insert("failureReason".into(), serde_json::json!(r));
    }
    serde_json::json!({ "status": status })
}

/// An agent's report as the source of a `Failed` transition, for tests.
pub fn report(state: AgentState, reason: Option<&str>) -> AgentReport {
    AgentReport {
        state,
        reason: reason.map(str::to_string),
        message: None,
        time: None,
        last_progress: None,
        guest_stopped: None,
        guest_resumed: None,
        memory_complete: None,
        recovery: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(state: MigrationState) {
        let now = Timestamp::from_millis(1_700_000_000_000);
        let patch = status_patch(&MigrationStatus::default(), &state, "r", "m");
        let status: MigrationStatus = serde_json::from_value(patch["status"].clone()).unwrap();
        assert_eq!(state_of(&status, now), state, "{patch}");
    }

    #[test]
    fn every_state_survives_a_trip_through_the_status() {
        let t = Timestamp::from_millis(1_700_000_000_000);
        let (s, g) = ("host-1".to_string(), "host-2".to_string());
        roundtrip(MigrationState::Pending);
        roundtrip(MigrationState::Scheduling);
        roundtrip(MigrationState::Queued {
            source: s.clone(),
            target: g.clone(),
        });
        roundtrip(MigrationState::Scheduled {
            source: s.clone(),
            target: g.clone(),
            scheduled: t,
        });
        roundtrip(MigrationState::PreparingTarget {
            source: s.clone(),
            target: g.clone(),
            scheduled: t,
        });
        roundtrip(MigrationState::Running {
            source: s.clone(),
            target: g.clone(),
            started: t,
            abort: None,
        });
        roundtrip(MigrationState::Running {
            source: s.clone(),
            target: g.clone(),
            started: t,
            abort: Some(AbortRequest {
                cause: AbortCause::Cancel,
                at: t,
            }),
        });
        roundtrip(MigrationState::Running {
            source: s.clone(),
            target: g.clone(),
            started: t,
            abort: Some(AbortRequest {
                cause: AbortCause::Failure(FailureReason::CompletionTimeout, "too slow".into()),
                at: t,
            }),
        });
        roundtrip(MigrationState::PostCopy {
            source: s.clone(),
            target: g.clone(),
            started: t,
            post_copy_since: t,
        });
        roundtrip(MigrationState::Completing {
            source: s.clone(),
            target: g.clone(),
            switchover: t,
            downtime: Some(Duration::from_millis(12)),
        });
        roundtrip(MigrationState::Succeeded {
            source: s,
            target: g,
            completed: t,
            downtime: None,
        });
        roundtrip(MigrationState::Failed {
            reason: FailureReason::NoHostFits,
            message: "m".into(),
            at: t,
        });
        roundtrip(MigrationState::Cancelled { at: t });
    }

    #[test]
    fn core_and_api_phases_map_both_ways() {
        use crate::core::migration::Phase as P;
        for p in [
            P::Pending,
            P::Scheduling,
            P::Queued,
            P::Scheduled,
            P::PreparingTarget,
            P::Running,
            P::PostCopy,
            P::Completing,
            P::Succeeded,
            P::Failed,
            P::Cancelled,
        ] {
            assert_eq!(core_phase(api_phase(p)), p);
        }
    }

    #[test]
    fn agent_reports_map_onto_the_core() {
        let now = Timestamp::from_millis(5_000);
        let mut status = MigrationStatus::default();
        assert_eq!(target_report(&status, now), TargetReport::None);
        status.target = Some(report(AgentState::Ready, None));
        assert_eq!(target_report(&status, now), TargetReport::Ready);
        status.target = Some(report(AgentState::Failed, Some("PeerRejected")));
        assert!(
            matches!(target_report(&status, now), TargetReport::Failed(f) if f.reason == FailureReason::PeerRejected)
        );
        // A target running the guest says whether all its memory is there;
        // an agent that does not say is taken as not (post-copy).
        let mut running = report(AgentState::Running, None);
        running.time = Some(to_api(Timestamp::from_millis(3_000)));
        status.target = Some(running.clone());
        assert_eq!(
            target_report(&status, now),
            TargetReport::Running {
                memory_complete: false,
                since: Timestamp::from_millis(3_000)
            }
        );
        running.memory_complete = Some(true);
        running.time = None;
        status.target = Some(running);
        assert_eq!(
            target_report(&status, now),
            TargetReport::Running {
                memory_complete: true,
                since: now
            }
        );
        status.source = Some(report(AgentState::SwitchedOver, None));
        status.downtime_ms = Some(7);
        assert_eq!(
            source_report(&status, Timestamp::from_millis(0)),
            SourceReport::SwitchedOver {
                downtime: Some(Duration::from_millis(7))
            }
        );
    }
}
