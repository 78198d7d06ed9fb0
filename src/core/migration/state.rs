//! The Migration's phases as an enum whose variants carry only what is valid
//! there, and what the controller observes each time it looks.

use std::time::Duration;

use super::reasons::FailureReason;
use crate::core::time::{GIB, Timestamp};

/// The phase names of the API (`status.phase`), without data. The
/// declaration order is the lifecycle order (`decide` compares phases with
/// it: "before the transfer" is `<= PreparingTarget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Created, not yet validated.
    Pending,
    /// Choosing a target host.
    Scheduling,
    /// Target chosen, waiting for admission under the limits.
    Queued,
    /// Admitted; the target is assigned.
    Scheduled,
    /// The target agent prepares the incoming VM.
    PreparingTarget,
    /// The source agent transfers memory (or stops the VM, for cold).
    Running,
    /// The guest runs on the target, pulling its last pages.
    PostCopy,
    /// Switchover confirmed; the VM's host is being updated.
    Completing,
    /// Done: the VM runs on the target.
    Succeeded,
    /// Did not happen; the VM stays on the source.
    Failed,
    /// Cancelled by a user; the VM stays on the source.
    Cancelled,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Phase; 11] = [
        Self::Pending,
        Self::Scheduling,
        Self::Queued,
        Self::Scheduled,
        Self::PreparingTarget,
        Self::Running,
        Self::PostCopy,
        Self::Completing,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Scheduling => "Scheduling",
            Self::Queued => "Queued",
            Self::Scheduled => "Scheduled",
            Self::PreparingTarget => "PreparingTarget",
            Self::Running => "Running",
            Self::PostCopy => "PostCopy",
            Self::Completing => "Completing",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
        }
    }

    /// Whether nothing more happens.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Whether the migration is admitted and not finished: it holds its VM
    /// (what it counts against the limits is `core::admission::Stage`).
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            Self::Scheduled
                | Self::PreparingTarget
                | Self::Running
                | Self::PostCopy
                | Self::Completing
        )
    }

    /// Whether `self → next` is a transition of the state machine (staying
    /// put is always allowed).
    pub fn may_become(self, next: Phase) -> bool {
        use Phase::*;
        self == next
            || match self {
                Pending => matches!(next, Scheduling | Failed | Cancelled),
                Scheduling => matches!(next, Queued | Failed | Cancelled),
                Queued => matches!(next, Scheduling | Scheduled | Failed | Cancelled),
                Scheduled => matches!(
                    next,
                    Scheduling | PreparingTarget | Completing | Failed | Cancelled
                ),
                PreparingTarget => matches!(next, Running | Failed | Cancelled),
                Running => matches!(next, PostCopy | Completing | Failed | Cancelled),
                PostCopy => matches!(next, Completing | Failed),
                Completing => matches!(next, Succeeded | Failed),
                Succeeded | Failed | Cancelled => false,
            }
    }
}

/// Why the controller asked the source agent to abort a running transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortCause {
    /// The user cancelled (or deleted) the Migration.
    Cancel,
    /// A failure the controller detected (deadline, target lost, ...).
    Failure(FailureReason, String),
}

/// An abort that has been asked for and not yet confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortRequest {
    /// Why.
    pub cause: AbortCause,
    /// When it was asked.
    pub at: Timestamp,
}

/// The Migration's state, as recorded in its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// Created.
    Pending,
    /// Choosing a target.
    Scheduling,
    /// Target chosen, waiting for a slot.
    Queued {
        /// The VM's host when the target was chosen.
        source: String,
        /// The chosen host.
        target: String,
    },
    /// Admitted; target assigned.
    Scheduled {
        /// Source host.
        source: String,
        /// Target host.
        target: String,
        /// When admitted.
        scheduled: Timestamp,
    },
    /// The target agent prepares; once it is ready, the migration waits
    /// for a transfer slot.
    PreparingTarget {
        /// Source host.
        source: String,
        /// Target host.
        target: String,
        /// When it was admitted (the preparation's timeout counts from here).
        scheduled: Timestamp,
    },
    /// Transferring.
    Running {
        /// Source host.
        source: String,
        /// Target host.
        target: String,
        /// When the transfer started (deadlines count from here).
        started: Timestamp,
        /// An abort asked for and not yet confirmed by the source agent.
        abort: Option<AbortRequest>,
    },
    /// Post-copy: the guest runs on the target.
    PostCopy {
        /// Source host.
        source: String,
        /// Target host.
        target: String,
        /// When the migration started.
        started: Timestamp,
        /// When post-copy began.
        post_copy_since: Timestamp,
    },
    /// Switchover confirmed.
    Completing {
        /// Source host.
        source: String,
        /// Target host.
        target: String,
        /// When the switchover was confirmed.
        switchover: Timestamp,
        /// Measured downtime, if the agent reported it.
        downtime: Option<Duration>,
    },
    /// The VM runs on the target.
    Succeeded {
        /// Source host.
        source: String,
        /// Target host.
        target: String,
        /// When the VM's host changed.
        completed: Timestamp,
        /// Measured downtime.
        downtime: Option<Duration>,
    },
    /// It did not happen.
    Failed {
        /// Machine-readable.
        reason: FailureReason,
        /// For a person.
        message: String,
        /// When.
        at: Timestamp,
    },
    /// Cancelled.
    Cancelled {
        /// When.
        at: Timestamp,
    },
}

impl MigrationState {
    /// The phase name.
    pub fn phase(&self) -> Phase {
        match self {
            Self::Pending => Phase::Pending,
            Self::Scheduling => Phase::Scheduling,
            Self::Queued { .. } => Phase::Queued,
            Self::Scheduled { .. } => Phase::Scheduled,
            Self::PreparingTarget { .. } => Phase::PreparingTarget,
            Self::Running { .. } => Phase::Running,
            Self::PostCopy { .. } => Phase::PostCopy,
            Self::Completing { .. } => Phase::Completing,
            Self::Succeeded { .. } => Phase::Succeeded,
            Self::Failed { .. } => Phase::Failed,
            Self::Cancelled { .. } => Phase::Cancelled,
        }
    }

    /// Source and target hosts, where known.
    pub fn hosts(&self) -> Option<(&str, &str)> {
        match self {
            Self::Queued { source, target }
            | Self::Scheduled { source, target, .. }
            | Self::PreparingTarget { source, target, .. }
            | Self::Running { source, target, .. }
            | Self::PostCopy { source, target, .. }
            | Self::Completing { source, target, .. }
            | Self::Succeeded { source, target, .. } => Some((source, target)),
            Self::Pending | Self::Scheduling | Self::Failed { .. } | Self::Cancelled { .. } => None,
        }
    }
}

/// Deadlines of a started migration: computed from its start and the
/// policy every time, never stored or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// `started + completionTimeoutPerGiB × memory (GiB, rounded up, at least 1)`.
    pub completion: Timestamp,
}

impl Deadlines {
    /// The deadlines of a migration of a VM of `memory` bytes.
    pub fn new(started: Timestamp, memory: u64, per_gib: Duration) -> Self {
        let gib = memory.div_ceil(GIB).max(1);
        let allowed = per_gib.saturating_mul(u32::try_from(gib).unwrap_or(u32::MAX));
        Self {
            completion: started.plus(allowed),
        }
    }
}

/// The kind of move (`spec.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationKind {
    /// Live (pre-copy, perhaps post-copy).
    Live,
    /// Stop on the source, start on the target.
    Cold,
    /// Rebuild the VM of a fenced host elsewhere.
    Evacuate,
}

/// Health of a host as seen through its `Host` and `Lease`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostHealth {
    /// Lease fresh, agent answering.
    Ready,
    /// Lease expired.
    Unreachable,
    /// Declared dead: its agent (or watchdog) has stopped its VMs.
    Fenced,
    /// No such host.
    Missing,
}

/// What the VM looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmObservation {
    /// No such VM.
    Missing,
    /// The VM.
    Present {
        /// `status.host`.
        host: Option<String>,
        /// `spec.migratable`.
        migratable: bool,
        /// A disk's cache mode is not `none`.
        unsafe_disk_cache: bool,
        /// Memory in bytes (for the completion deadline).
        memory: u64,
    },
}

/// A failure an agent reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFailure {
    /// Machine-readable.
    pub reason: FailureReason,
    /// For a person.
    pub message: String,
}

/// What the target agent reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TargetReport {
    /// Nothing yet.
    #[default]
    None,
    /// Preparing the incoming VM.
    Preparing,
    /// Listening for the stream.
    Ready,
    /// The guest runs on the target.
    Running {
        /// Its whole memory had arrived (the incoming migration completed);
        /// false in post-copy.
        memory_complete: bool,
        /// When the target agent said so.
        since: Timestamp,
    },
    /// Could not prepare, or the incoming VM failed.
    Failed(AgentFailure),
}

/// What the source agent reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SourceReport {
    /// Nothing yet.
    #[default]
    None,
    /// Transferring; `last_progress` is when remaining memory last reached
    /// a new low.
    Transferring {
        /// When remaining memory last went down.
        last_progress: Timestamp,
    },
    /// Post-copy started: the guest runs on the target.
    PostCopyActive,
    /// Switchover done: the guest runs on the target, the source is stopped.
    SwitchedOver {
        /// Measured downtime.
        downtime: Option<Duration>,
    },
    /// The transfer was aborted on request; the VM runs on the source.
    Aborted,
    /// The transfer failed; the VM runs on the source.
    Failed(AgentFailure),
}

/// The scheduler's answer, computed by the shell in `Scheduling`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementOutcome {
    /// A host fits.
    Chosen {
        /// The host.
        host: String,
    },
    /// No host fits.
    NoHost {
        /// The decision's summary.
        summary: String,
    },
}

/// The admission queue's answer for this migration, computed by the shell in
/// `Queued` (to prepare) and in `PreparingTarget` with the target ready (to
/// transfer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionOutcome {
    /// May start now.
    Admitted,
    /// Must wait, and why.
    Waiting(String),
}

/// Everything the controller looked at, read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The recorded state.
    pub state: MigrationState,
    /// `spec.type`.
    pub kind: MigrationKind,
    /// `spec.cancel`.
    pub cancel_requested: bool,
    /// The Migration has a deletion timestamp.
    pub deleted: bool,
    /// `spec.policy` names a policy that does not exist.
    pub missing_policy: Option<String>,
    /// The VM.
    pub vm: VmObservation,
    /// The source host (the VM's host before scheduling, the recorded
    /// source after).
    pub source_health: HostHealth,
    /// The target host, once known.
    pub target_health: Option<HostHealth>,
    /// The scheduler's answer (in `Scheduling`).
    pub placement: Option<PlacementOutcome>,
    /// The queue's answer (in `Queued`, and in `PreparingTarget` once the
    /// target is ready).
    pub admission: Option<AdmissionOutcome>,
    /// The target agent's report.
    pub target: TargetReport,
    /// The source agent's report.
    pub source: SourceReport,
}
