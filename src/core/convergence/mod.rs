//! What to do next with a live migration, from its progress samples.
//!
//! The source agent samples `query-migrate` about once a second and calls
//! [`decide`] with the samples so far, what it has already applied
//! ([`Tuning`]), the policy's [`ConvergenceConfig`], whether the target can do
//! post-copy, and `now`. The answer is one [`Action`] and an [`Assessment`]
//! (is it converging, why, when will it finish, what happens next if not)
//! for `status.progress`.
//!
//! Definitions, over the samples:
//! - *progress*: remaining bytes reach a new low. The last time that happened
//!   is the progress clock (KubeVirt's `progressTimeout` semantics).
//! - *moving*: transferred bytes grow. QEMU never notices a cut link (the
//!   source stays `active` with `ram.transferred` frozen), so frozen bytes for
//!   the stall timeout (`min(progressTimeout, 30s)`) abort the migration as
//!   `TransferStalled` — in every mode, and never by starting post-copy or
//!   pausing the guest, which on a dead link would only lose the guest or
//!   stop it for nothing.
//! - *converging*: the link carries more than the guest dirties (throughput
//!   over dirty rate, averaged over the last samples) and there has been
//!   progress within a step: remaining shrinks at `throughput − dirty rate`,
//!   which gives the estimated time to completion. Rates that say
//!   "converging" while remaining memory makes no new low do not count.
//! - *stalling*: bytes move but there has been no progress for a step
//!   (`progressTimeout / 5`, between 3 and 30 s). Each mode's escalation
//!   waits a step after its previous change before the next.
//!
//! Each mode's ladder, and its defined end:
//!
//! ```text
//! MinimalDowntime  set downtimeLimit ─ stalling: wait ─ progressTimeout / completion deadline: Abort
//! PostCopy         set downtimeLimit ─ stalling or completion deadline: StartPostCopy ─ (no post-copy: Abort)
//! SuspendWorkload  set downtimeLimit ─ stalling: EnableAutoConverge(50, +20) ─ RaiseThrottle … 99%
//!                  ─ SetDowntimeLimit ×2 … 5 s ─ PauseGuest ─ completion deadline: PauseGuest, then Abort
//! Legacy           QEMU's defaults ─ progressTimeout / completion deadline: Abort
//! ```
//!
//! Once post-copy runs nothing is aborted (that would lose the guest): frozen
//! bytes then ask for post-copy recovery instead.

#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::core::migration::{Deadlines, FailureReason};
use crate::core::policy::{ConvergenceConfig, ConvergenceMode};
use crate::core::time::{MIB, Timestamp};

/// Longest stall tolerated (frozen transferred bytes), whatever the policy.
pub const STALL_TIMEOUT_MAX: Duration = Duration::from_secs(30);
/// Auto-converge's first throttle (%): QEMU's default 20 did not finish a
/// dirtying guest in 60 s on this kind of machine; 50 did (QEMU-FACTS).
pub const THROTTLE_INITIAL: u8 = 50;
/// Auto-converge's increment per iteration (%), as measured in QEMU-FACTS.
pub const THROTTLE_INCREMENT: u8 = 20;
/// QEMU's `max-cpu-throttle` default.
pub const THROTTLE_MAX: u8 = 99;
/// The highest downtime `SuspendWorkloadIfNeeded` raises to before pausing
/// (oVirt's "suspend workload if needed" ends its ladder at 5 s).
pub const DOWNTIME_MAX: Duration = Duration::from_secs(5);
/// Bytes that moved this recently count as "moving" (samples come about
/// once a second).
const MOVING_WITHIN: Duration = Duration::from_secs(3);
/// Samples averaged to judge rates.
const RATE_WINDOW: usize = 3;

/// One `query-migrate` sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressSample {
    /// When.
    pub at: Timestamp,
    /// Dirty-sync count (pre-copy iteration).
    pub iteration: u64,
    /// Guest RAM bytes.
    pub total: u64,
    /// Bytes sent so far.
    pub transferred: u64,
    /// Bytes left in this iteration.
    pub remaining: u64,
    /// Bytes dirtied per second.
    pub dirty_rate: u64,
    /// Bytes sent per second.
    pub throughput: u64,
    /// QEMU's expected downtime.
    pub expected_downtime: Option<Duration>,
    /// Auto-converge throttle (%).
    pub cpu_throttle_percent: u8,
}

/// What the agent has applied so far to this migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tuning {
    /// The downtime limit set, if any.
    pub downtime_limit: Option<Duration>,
    /// Auto-converge enabled.
    pub auto_converge: bool,
    /// Throttle asked for (%).
    pub throttle_percent: u8,
    /// Post-copy started.
    pub post_copy: bool,
    /// Guest paused to finish.
    pub paused: bool,
    /// When the last of these changed.
    pub last_change: Option<Timestamp>,
}

/// Facts about this migration that are not samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// When the transfer started.
    pub started: Timestamp,
    /// The target supports post-copy (userfaultfd).
    pub post_copy_available: bool,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    Continue,
    /// Set QEMU's `downtime-limit`.
    SetDowntimeLimit(Duration),
    /// Enable auto-converge with these throttle settings (%).
    EnableAutoConverge {
        /// `cpu-throttle-initial`.
        initial: u8,
        /// `cpu-throttle-increment`.
        increment: u8,
    },
    /// Raise `cpu-throttle-initial` to this (%).
    RaiseThrottle(u8),
    /// `migrate-start-postcopy`.
    StartPostCopy,
    /// Post-copy's stream stalled: resume it over a new connection.
    RecoverPostCopy,
    /// Pause the guest so the last pages can go.
    PauseGuest,
    /// Cancel the migration; the VM stays on the source.
    Abort {
        /// Machine-readable.
        reason: FailureReason,
        /// For a person.
        message: String,
    },
}

/// How the migration is doing, for `status.progress`.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    /// The link carries more than the guest dirties.
    pub converging: bool,
    /// Estimated time to completion, when converging.
    pub eta: Option<Duration>,
    /// Why, in numbers.
    pub explanation: String,
    /// What the policy does next if it does not converge.
    pub next_step: String,
}

/// The answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// How it is going.
    pub assessment: Assessment,
}

/// The stall timeout of a policy.
pub fn stall_timeout(cfg: &ConvergenceConfig) -> Duration {
    cfg.progress_timeout.min(STALL_TIMEOUT_MAX)
}

/// How long without progress counts as stalling, and the spacing of
/// escalation steps.
pub fn step(cfg: &ConvergenceConfig) -> Duration {
    (cfg.progress_timeout / 5).clamp(Duration::from_secs(3), Duration::from_secs(30))
}

fn mib_s(bytes_per_sec: f64) -> String {
    format!("{:.0} MiB/s", bytes_per_sec / MIB as f64)
}

/// Decide what to do next (see the module documentation).
pub fn decide(
    samples: &[ProgressSample],
    tuning: &Tuning,
    cfg: &ConvergenceConfig,
    ctx: &Context,
    now: Timestamp,
) -> Decision {
    let next_step = ladder(samples.last(), tuning, cfg, ctx);
    let Some(last) = samples.last() else {
        let action = initial(tuning, cfg).unwrap_or(Action::Continue);
        let assessment = Assessment {
            converging: false,
            eta: None,
            explanation: "no progress sample yet".into(),
            next_step: describe(&next_step),
        };
        return Decision { action, assessment };
    };
    let recent = &samples[samples.len().saturating_sub(RATE_WINDOW)..];
    let n = recent.len() as f64;
    let dirty = recent.iter().map(|s| s.dirty_rate as f64).sum::<f64>() / n;
    let throughput = recent.iter().map(|s| s.throughput as f64).sum::<f64>() / n;
    // The progress clock and the moving clock.
    let mut low = u64::MAX;
    let mut last_progress = ctx.started;
    let mut last_moved = ctx.started;
    let mut prev_transferred = None;
    for s in samples {
        if s.remaining < low {
            low = s.remaining;
            last_progress = last_progress.max(s.at);
        }
        if prev_transferred.is_none_or(|p| s.transferred > p) {
            last_moved = last_moved.max(s.at);
        }
        prev_transferred = Some(s.transferred);
    }
    let no_progress = now.since(last_progress);
    // The rates are averages of QEMU's estimates; the remaining bytes are
    // the truth. A link that carries a little more than the guest dirties
    // (a guest throttled to 99% that paces its writes by the clock) can look
    // converging for ever while remaining memory makes no new low: that is
    // not converging.
    let converging = throughput > 0.0 && dirty < throughput && no_progress < step(cfg);
    let eta =
        converging.then(|| Duration::from_secs_f64(last.remaining as f64 / (throughput - dirty)));
    let frozen = now.since(last_moved);
    // Starting post-copy or pausing the guest only helps when bytes flow.
    let moving = frozen <= MOVING_WITHIN;
    let explanation = if !moving {
        format!(
            "no bytes moved for {}s ({} MiB sent, {} MiB left)",
            frozen.as_secs(),
            last.transferred / MIB,
            last.remaining / MIB
        )
    } else if converging {
        format!(
            "converging: the link carries {}, the guest dirties {}; {} MiB left",
            mib_s(throughput),
            mib_s(dirty),
            last.remaining / MIB
        )
    } else {
        format!(
            "not converging: the guest dirties {}, the link carries {}; {} MiB left, no new low for {}s",
            mib_s(dirty),
            mib_s(throughput),
            last.remaining / MIB,
            no_progress.as_secs()
        )
    };
    let assessment = Assessment {
        converging,
        eta,
        explanation,
        next_step: describe(&next_step),
    };
    let decision = |action| Decision {
        action,
        assessment: assessment.clone(),
    };
    let abort =
        |reason: FailureReason, message: String| decision(Action::Abort { reason, message });

    if tuning.post_copy {
        // Aborting now would lose the guest: only recovery is possible.
        let action = if frozen >= stall_timeout(cfg) {
            Action::RecoverPostCopy
        } else {
            Action::Continue
        };
        return decision(action);
    }
    if frozen >= stall_timeout(cfg) {
        return abort(
            FailureReason::TransferStalled,
            format!(
                "no bytes moved for {}s; the VM keeps running on the source",
                frozen.as_secs()
            ),
        );
    }
    if let Some(a) = initial(tuning, cfg) {
        return decision(a);
    }
    let deadline = Deadlines::new(ctx.started, last.total, cfg.completion_timeout_per_gib);
    if now > deadline.completion {
        let m = format!(
            "running for {}s, allowed {}s",
            now.since(ctx.started).as_secs(),
            deadline.completion.since(ctx.started).as_secs()
        );
        return match cfg.mode {
            ConvergenceMode::PostCopy if ctx.post_copy_available && moving => {
                decision(Action::StartPostCopy)
            }
            ConvergenceMode::SuspendWorkloadIfNeeded if !tuning.paused && moving => {
                decision(Action::PauseGuest)
            }
            ConvergenceMode::PostCopy | ConvergenceMode::SuspendWorkloadIfNeeded
                if !moving && !tuning.paused =>
            {
                decision(Action::Continue)
            }
            _ => abort(FailureReason::CompletionTimeout, m),
        };
    }
    if tuning.paused {
        return decision(Action::Continue);
    }
    if no_progress > cfg.progress_timeout
        && matches!(
            cfg.mode,
            ConvergenceMode::MinimalDowntime | ConvergenceMode::Legacy
        )
    {
        let (reason, why) = if dirty >= throughput {
            (
                FailureReason::NotConverging,
                format!(
                    "the guest dirties {}, the link carries {}",
                    mib_s(dirty),
                    mib_s(throughput)
                ),
            )
        } else {
            (
                FailureReason::ProgressTimeout,
                format!(
                    "remaining memory has not gone down for {}s",
                    no_progress.as_secs()
                ),
            )
        };
        return abort(reason, why);
    }
    let stalling = no_progress >= step(cfg);
    let rested = tuning.last_change.is_none_or(|t| now.since(t) >= step(cfg));
    if stalling && rested && moving {
        return decision(next_step);
    }
    decision(Action::Continue)
}

/// The first action of a mode: the downtime limit (Legacy keeps QEMU's).
fn initial(tuning: &Tuning, cfg: &ConvergenceConfig) -> Option<Action> {
    (cfg.mode != ConvergenceMode::Legacy && tuning.downtime_limit.is_none())
        .then_some(Action::SetDowntimeLimit(cfg.downtime_limit))
}

/// The mode's next escalation if the migration stalls.
fn ladder(
    last: Option<&ProgressSample>,
    tuning: &Tuning,
    cfg: &ConvergenceConfig,
    ctx: &Context,
) -> Action {
    match cfg.mode {
        ConvergenceMode::MinimalDowntime | ConvergenceMode::Legacy => Action::Continue,
        ConvergenceMode::PostCopy if ctx.post_copy_available => Action::StartPostCopy,
        ConvergenceMode::PostCopy => Action::Abort {
            reason: FailureReason::PostCopyUnavailable,
            message: "pre-copy stalls and the target cannot do post-copy".into(),
        },
        ConvergenceMode::SuspendWorkloadIfNeeded => {
            let throttle = tuning
                .throttle_percent
                .max(last.map_or(0, |s| s.cpu_throttle_percent));
            let downtime = tuning.downtime_limit.unwrap_or(cfg.downtime_limit);
            if !tuning.auto_converge {
                Action::EnableAutoConverge {
                    initial: THROTTLE_INITIAL,
                    increment: THROTTLE_INCREMENT,
                }
            } else if throttle < THROTTLE_MAX {
                Action::RaiseThrottle(
                    throttle
                        .saturating_add(THROTTLE_INCREMENT)
                        .min(THROTTLE_MAX),
                )
            } else if downtime < DOWNTIME_MAX {
                Action::SetDowntimeLimit((downtime * 2).min(DOWNTIME_MAX))
            } else {
                Action::PauseGuest
            }
        }
    }
}

/// A phrase for "what the policy will do next".
fn describe(a: &Action) -> String {
    match a {
        Action::Continue => {
            "keep copying until progressTimeout or the completion deadline, then abort".into()
        }
        Action::SetDowntimeLimit(d) => format!("raise the downtime limit to {} ms", d.as_millis()),
        Action::EnableAutoConverge { initial, increment } => {
            format!(
                "throttle the guest's CPU (auto-converge from {initial}%, +{increment}% per round)"
            )
        }
        Action::RaiseThrottle(p) => format!("throttle the guest's CPU to {p}%"),
        Action::StartPostCopy => "switch to post-copy".into(),
        Action::RecoverPostCopy => "resume post-copy over a new connection".into(),
        Action::PauseGuest => "pause the guest to finish".into(),
        Action::Abort { message, .. } => format!("abort: {message}"),
    }
}
