//! The source half's progress: the core's convergence decision behind the
//! executor's policy hook, and the rate-limited writer of
//! `status.progress`.
//!
//! ```text
//!  executor sample ─► observer ─► watch channel ─► write_progress (≤ 1/s) ─► status.progress, source.lastProgress
//!                 └─► CoreConvergence::next_action ─► core::convergence::decide ─► migrate::Action
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::agent::migrate::{self, ConvergencePolicy, ProgressSample, Throttle};
use crate::api::Migration;
use crate::api::migration::{AgentReport, AgentState, Progress};
use crate::core::convergence::{self, Assessment, Context, Tuning};
use crate::core::policy as core_policy;
use crate::core::time::Timestamp as CoreTime;

use super::Agent;

/// The core's convergence decision behind the executor's policy hook.
pub(super) struct CoreConvergence {
    pub(super) cfg: core_policy::ConvergenceConfig,
    pub(super) ctx: Context,
    pub(super) tuning: Tuning,
    pub(super) started: Instant,
    pub(super) shared: Arc<Mutex<Shared>>,
}

/// What the convergence decision tells the progress writer.
#[derive(Default)]
pub(super) struct Shared {
    assessment: Option<Assessment>,
    pub(super) abort_reason: Option<String>,
    last_progress: Option<Timestamp>,
    min_remaining: Option<u64>,
}

pub(super) fn core_time(at: Timestamp) -> CoreTime {
    CoreTime::from_millis(at.as_millisecond())
}

impl ConvergencePolicy for CoreConvergence {
    fn next_action(&mut self, samples: &[ProgressSample]) -> migrate::Action {
        let start = Timestamp::now() - self.started.elapsed();
        let core_samples: Vec<convergence::ProgressSample> = samples
            .iter()
            .map(|s| convergence::ProgressSample {
                at: core_time(start + s.elapsed),
                iteration: s.iteration,
                total: s.total_bytes,
                transferred: s.transferred_bytes,
                remaining: s.remaining_bytes,
                dirty_rate: s.dirty_rate,
                throughput: s.throughput,
                expected_downtime: s.expected_downtime,
                cpu_throttle_percent: u8::try_from(s.cpu_throttle_percent).unwrap_or(u8::MAX),
            })
            .collect();
        let now = core_time(Timestamp::now());
        let decision = convergence::decide(&core_samples, &self.tuning, &self.cfg, &self.ctx, now);
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.assessment = Some(decision.assessment);
        let changed = |t: &mut Tuning| t.last_change = Some(now);
        match decision.action {
            convergence::Action::Continue => migrate::Action::Continue,
            convergence::Action::SetDowntimeLimit(d) => {
                self.tuning.downtime_limit = Some(d);
                changed(&mut self.tuning);
                migrate::Action::SetDowntimeLimit(d)
            }
            convergence::Action::EnableAutoConverge { initial, increment } => {
                self.tuning.auto_converge = true;
                self.tuning.throttle_percent = initial;
                changed(&mut self.tuning);
                migrate::Action::SetThrottle(Throttle { initial, increment })
            }
            convergence::Action::RaiseThrottle(p) => {
                self.tuning.throttle_percent = p;
                changed(&mut self.tuning);
                migrate::Action::SetThrottle(Throttle {
                    initial: p,
                    increment: convergence::THROTTLE_INCREMENT,
                })
            }
            convergence::Action::StartPostCopy => {
                self.tuning.post_copy = true;
                changed(&mut self.tuning);
                migrate::Action::StartPostcopy
            }
            convergence::Action::PauseGuest => {
                self.tuning.paused = true;
                changed(&mut self.tuning);
                migrate::Action::PauseGuest
            }
            // The executor pauses a frozen post-copy stream itself (its
            // stall watchdog) and the source half then drives the recovery
            // (`recovery`): nothing to apply here.
            convergence::Action::RecoverPostCopy => migrate::Action::Continue,
            convergence::Action::Abort { reason, message } => {
                shared.abort_reason = Some(reason.as_str().to_string());
                migrate::Action::Abort(message)
            }
        }
    }
}

/// What the progress writer needs to patch the Migration.
pub(super) struct MigrationHandle {
    api: Api<Migration>,
    name: String,
}

pub(super) fn agent_handle(agent: &Agent, m: &Migration) -> MigrationHandle {
    MigrationHandle {
        api: Api::namespaced(agent.client.clone(), &m.namespace().unwrap_or_default()),
        name: m.name_any(),
    }
}

/// Write the latest sample to `status.progress` about once a second (never
/// more: the API is not a time-series store), until `stop`. A write under
/// way when `stop` fires is finished first: the caller awaits this task
/// before its final report, so that no progress write (which says
/// `Transferring`) can reach the API server after the final report and
/// overwrite it.
pub(super) async fn write_progress(
    handle: MigrationHandle,
    mut rx: tokio::sync::watch::Receiver<Option<ProgressSample>>,
    shared: Arc<Mutex<Shared>>,
    guest: tokio::sync::watch::Receiver<migrate::pause::RunEvents>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() {
                return;
            },
        }
        let Some(s) = rx.borrow_and_update().clone() else {
            continue;
        };
        let (assessment, last_progress) = {
            let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
            if shared
                .min_remaining
                .is_none_or(|min| s.remaining_bytes < min)
            {
                shared.min_remaining = Some(s.remaining_bytes);
                shared.last_progress = Some(Timestamp::now());
            }
            (shared.assessment.clone(), shared.last_progress)
        };
        let percent = (s.remaining_bytes.min(s.total_bytes) * 100)
            .checked_div(s.total_bytes)
            .map_or(0, |left| 100 - left as u32);
        let progress = Progress {
            iteration: s.iteration,
            memory_total: s.total_bytes,
            memory_transferred: s.transferred_bytes,
            memory_remaining: s.remaining_bytes,
            dirty_rate: s.dirty_rate,
            throughput: s.throughput,
            expected_downtime_ms: s.expected_downtime.map_or(0, |d| d.as_millis() as u64),
            percent: percent.min(99),
            eta_seconds: assessment.as_ref().and_then(|a| a.eta).map(|d| d.as_secs()),
            converging: assessment.as_ref().is_some_and(|a| a.converging),
            convergence: assessment
                .as_ref()
                .map(|a| format!("{}; {}", a.explanation, a.next_step)),
        };
        let state = if s.status.is_postcopy() {
            AgentState::PostCopyActive
        } else {
            AgentState::Transferring
        };
        let report = AgentReport {
            state,
            reason: None,
            message: None,
            time: None,
            last_progress: last_progress.map(Time),
            // Kept in the API as soon as the guest stops (post-copy, the
            // policy's pause): an agent restarted after it still knows when.
            guest_stopped: guest
                .borrow()
                .stopped_at
                .map(super::target_half::micro_time),
            guest_resumed: None,
            memory_complete: None,
            recovery: None,
        };
        let patch = serde_json::json!({"status": {"progress": progress, "source": report}});
        if let Err(e) = handle
            .api
            .patch_status(&handle.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::debug!(migration = %handle.name, error = %e, "progress update failed");
        }
    }
}
