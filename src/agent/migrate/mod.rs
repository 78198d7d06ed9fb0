//! The migration executor: the source and target halves of a live
//! migration, as QMP calls, sampling and a watchdog.
//!
//! ```text
//!  target agent                              source agent
//!  prepare_target(spec, cfg)                 SourceRelay::start(… socket …)
//!   QEMU -incoming defer                     run_source(vm, relay, cfg, policy, …)
//!   caps + multifd-channels                   caps + params (downtime, bandwidth, …)
//!   migrate-incoming unix:<incoming.sock>     migrate unix:<relay socket>
//!   (TargetRelay delivers there)              every sample_interval:
//!                                               query-migrate → ProgressSample → observer
//!                                               stall watchdog (ram.transferred, relay bytes)
//!                                               policy.next_action(samples) → apply
//!                                               cancel token → migrate_cancel
//!  wait_running() ◄────── completed ───────── Completed{downtime,…} (source paused)
//!                                            finish_source(): quit the source QEMU
//! ```
//!
//! Until QEMU reports `completed` (or the guest runs post-copy on the
//! target) the source is authoritative: every error path leaves it running
//! and the caller tears the target down ([`TargetHandle::abort`]). QEMU does
//! not notice a stalled stream (a cut link leaves it `active` forever), so
//! the watchdog cancels a migration whose `ram.transferred` and relay byte
//! counters have both stood still for `stall_timeout`.

use std::sync::Arc;
use std::time::Duration;

use super::qmp::{CapabilityState, MigrationStatus, QmpError};
use super::relay::RelayError;
use super::vms::VmError;

/// QEMU's `max-bandwidth` for `Auto`: effectively unlimited (QEMU's default
/// of 128 MiB/s would otherwise silently cap the migration). 64 GiB/s.
pub const AUTO_MAX_BANDWIDTH: u64 = 64 << 30;

/// How a migration's bandwidth is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bandwidth {
    /// As fast as the path allows (QEMU's cap lifted, no relay limit).
    Auto,
    /// QEMU's own default cap (128 MiB/s), no relay limit.
    HypervisorDefault,
    /// This many bytes per second, in QEMU and in the relay.
    Limit(u64),
}

impl Bandwidth {
    /// The relay's limit for this setting.
    pub fn relay_limit(self) -> Option<u64> {
        match self {
            Bandwidth::Limit(b) => Some(b),
            Bandwidth::Auto | Bandwidth::HypervisorDefault => None,
        }
    }
    fn qemu_max_bandwidth(self) -> Option<u64> {
        match self {
            Bandwidth::Auto => Some(AUTO_MAX_BANDWIDTH),
            Bandwidth::HypervisorDefault => None,
            Bandwidth::Limit(b) => Some(b),
        }
    }
}

/// Auto-converge throttle settings (percent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// First throttle step.
    pub initial: u8,
    /// Increment per step.
    pub increment: u8,
}

/// The resolved migration settings the executor applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    /// QEMU's downtime limit at switchover.
    pub downtime_limit: Duration,
    /// Bandwidth limit.
    pub bandwidth: Bandwidth,
    /// Parallel multifd channels (`None`: one stream).
    pub multifd_channels: Option<u8>,
    /// Enable `postcopy-ram` (both sides) so that the policy can switch.
    pub postcopy: bool,
    /// Enable auto-converge throttling with these settings.
    pub auto_converge: Option<Throttle>,
    /// Cancel when neither QEMU's nor the relay's byte count moves this long.
    pub stall_timeout: Duration,
    /// How often to sample `query-migrate`.
    pub sample_interval: Duration,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            downtime_limit: Duration::from_millis(300),
            bandwidth: Bandwidth::Auto,
            multifd_channels: None,
            postcopy: false,
            auto_converge: None,
            stall_timeout: Duration::from_secs(15),
            sample_interval: Duration::from_secs(1),
        }
    }
}

impl MigrationConfig {
    /// Capabilities set identically on both sides.
    fn capabilities(&self) -> Vec<CapabilityState> {
        let cap = |name: &str, state: bool| CapabilityState {
            capability: name.into(),
            state,
        };
        vec![
            cap("events", true),
            cap("multifd", self.multifd_channels.is_some()),
            cap("postcopy-ram", self.postcopy),
            cap("auto-converge", self.auto_converge.is_some()),
        ]
    }
}

/// One `query-migrate` sample.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressSample {
    /// Time since `migrate` was issued.
    pub elapsed: Duration,
    /// QEMU's migration status.
    pub status: MigrationStatus,
    /// Pre-copy iteration (QEMU's dirty-sync-count).
    pub iteration: u64,
    /// Guest RAM size.
    pub total_bytes: u64,
    /// Bytes transferred so far.
    pub transferred_bytes: u64,
    /// Bytes left in this iteration.
    pub remaining_bytes: u64,
    /// Dirtying rate, bytes per second.
    pub dirty_rate: u64,
    /// Throughput, bytes per second.
    pub throughput: u64,
    /// QEMU's expected downtime.
    pub expected_downtime: Option<Duration>,
    /// Current auto-converge throttle, percent.
    pub cpu_throttle_percent: u64,
    /// Bytes the relay has carried towards the target.
    pub relay_forward_bytes: u64,
    /// The downtime limit currently set.
    pub downtime_limit: Duration,
}

/// What the convergence policy wants next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Keep going.
    Continue,
    /// Raise (or lower) the downtime limit.
    SetDowntimeLimit(Duration),
    /// Change the bandwidth limit (QEMU and relay).
    SetBandwidth(Bandwidth),
    /// Change the auto-converge throttle (needs `auto_converge` enabled).
    SetThrottle(Throttle),
    /// Switch to post-copy (needs `postcopy` enabled).
    StartPostcopy,
    /// Pause the guest so the migration finishes (the pause is downtime).
    PauseGuest,
    /// Give up; the source keeps running.
    Abort(String),
}

/// The convergence decision, taken as an input (the pure decision lives in
/// `core`). Implemented for closures.
pub trait ConvergencePolicy: Send {
    /// The next action, given every sample so far.
    fn next_action(&mut self, samples: &[ProgressSample]) -> Action;
}

impl<F: FnMut(&[ProgressSample]) -> Action + Send> ConvergencePolicy for F {
    fn next_action(&mut self, samples: &[ProgressSample]) -> Action {
        self(samples)
    }
}

/// Failure of a migration half.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Starting or stopping a QEMU failed.
    #[error("managing the {side} QEMU")]
    Vm {
        /// `source` or `target`.
        side: &'static str,
        /// Cause.
        source: VmError,
    },
    /// A QMP step failed.
    #[error("{step}")]
    Qmp {
        /// What was being done.
        step: &'static str,
        /// Cause.
        source: QmpError,
    },
    /// QEMU reported the migration failed.
    #[error("QEMU reports the migration failed: {desc}")]
    Failed {
        /// QEMU's error description.
        desc: String,
    },
    /// The relay failed (refused, unreachable, broken), so QEMU failed.
    #[error("the migration stream failed")]
    Relay(#[source] Arc<RelayError>),
    /// No progress for the stall timeout; cancelled.
    #[error("no progress for {stalled_for:?} (transferred {transferred} bytes); {action}")]
    Stalled {
        /// How long nothing moved.
        stalled_for: Duration,
        /// Bytes transferred before the stall.
        transferred: u64,
        /// What was done about it.
        action: &'static str,
    },
    /// Cancelled on request.
    #[error("cancelled")]
    Cancelled,
    /// The policy aborted.
    #[error("aborted by the convergence policy: {0}")]
    Aborted(String),
    /// The policy asked for something the configuration did not enable.
    #[error("the policy asked for {0}, which this migration was not configured for")]
    Unsupported(&'static str),
    /// The target QEMU exited.
    #[error("the target QEMU exited ({0})")]
    TargetExited(String),
    /// Waited too long.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The target cannot enable post-copy (no userfaultfd on its host, or a
    /// capability it does not combine with); the migration fails at
    /// preparation with QEMU's reason.
    #[error("post-copy cannot be enabled on the target: {0}")]
    PostcopyUnsupported(String),
    /// The stream broke during post-copy: the guest lives on the target,
    /// paused, and recovers with [`TargetHandle::recover`] then
    /// [`resume_source`].
    #[error("the post-copy stream broke ({why}); the migration is paused and recoverable")]
    PostcopyPaused {
        /// What broke it.
        why: String,
    },
    /// Post-copy could not be resumed: the guest, which ran on the target,
    /// is paused on both hosts with its memory split between them.
    #[error("post-copy could not be resumed after {rounds} recovery rounds in {within:?}: {why}")]
    PostcopyRecoveryFailed {
        /// Rounds tried.
        rounds: u32,
        /// Time spent.
        within: Duration,
        /// The last reason.
        why: String,
    },
}

impl MigrationError {
    /// A stable reason string for conditions and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            MigrationError::Vm { .. } => "VmError",
            MigrationError::Qmp { .. } => "QmpError",
            MigrationError::Failed { .. } => "QemuMigrationFailed",
            MigrationError::Relay(e) => e.reason(),
            MigrationError::Stalled { .. } => "Stalled",
            MigrationError::Cancelled => "Cancelled",
            MigrationError::Aborted(_) => "AbortedByPolicy",
            MigrationError::Unsupported(_) => "UnsupportedAction",
            MigrationError::TargetExited(_) => "TargetExited",
            MigrationError::Timeout(_) => "Timeout",
            MigrationError::PostcopyPaused { .. } => "PostcopyPaused",
            MigrationError::PostcopyRecoveryFailed { .. } => "PostCopyInterrupted",
            MigrationError::PostcopyUnsupported(_) => "PostcopyUnsupported",
        }
    }
}

pub(crate) fn qmp_err(step: &'static str) -> impl FnOnce(QmpError) -> MigrationError {
    move |source| MigrationError::Qmp { step, source }
}

pub mod pause;
mod source;
mod target;

pub use pause::GuestClock;
pub use source::{SourceCompleted, finish_source, resume_source, run_source, source_socket};
pub use target::{TargetHandle, prepare_target};
