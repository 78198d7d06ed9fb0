//! The Migration lifecycle as a pure state machine.
//!
//! ```text
//!   Pending ──► Scheduling ──► Queued ──► Scheduled ──► PreparingTarget ──► Running ──┬──► Completing ──► Succeeded
//!      │            │            │  ▲         │  (Evacuate: source fenced) ▲           │         ▲
//!      │            │            │  └ target lost / VM moved: reschedule   │           └► PostCopy┘
//!      │            │            │            └────────────────────────────┼──────────────────────►
//!      ▼            ▼            ▼            ▼               ▼            ▼            ▼
//!   Failed (reason) / Cancelled: the VM stays on the source; PostCopy can only fail (guest lost)
//! ```
//!
//! The controller calls [`decide`] with an [`Observation`] (the recorded
//! [`MigrationState`], the spec, the VM, host health, agent reports, and the
//! scheduler's / queue's answers when asked for) and `now`; it writes the
//! returned state, performs the [`Action`]s and requeues after the returned
//! delay. `decide` never mutates a deadline: the completion deadline is
//! `started + completionTimeoutPerGiB × memory`, computed each time
//! ([`Deadlines`]).
//!
//! # Hand-off protocol between the controller and the agents
//!
//! Everything goes through the Migration's status; each field has one writer.
//!
//! | field | writer | meaning |
//! |---|---|---|
//! | `status.phase`, `sourceHost`, `targetHost`, `schedulingDecision`, timestamps, `failureReason`, `message` | controller | the decision |
//! | condition `AbortRequested` | controller | source agent: abort the transfer |
//! | `status.target` report (Preparing, Ready, Failed + reason) | target agent | [`TargetReport`] |
//! | `status.progress`, `status.source` report (Transferring + last progress, PostCopyActive, SwitchedOver + downtime, Aborted, Failed + reason) | source agent | [`SourceReport`] |
//! | VM `status.host` | controller, only at a confirmed switchover or a fenced evacuation | where the VM runs |
//!
//! 1. `Scheduled` → `PreparingTarget`: the controller has assigned the target.
//!    The target agent (whose host is `targetHost`) starts QEMU with
//!    `-incoming defer`, opens its relay for this Migration and this source
//!    only, and reports `Ready` (or `Failed`).
//! 2. `PreparingTarget` → `Running`: on `Ready` the controller asks the
//!    queue for a transfer slot (the target may have been prepared while
//!    the slot was busy: `core::admission`) and, given one, writes
//!    `Running` (the transfer's start, from which the deadlines count); the
//!    source agent sets the migration parameters from the policy, starts
//!    the transfer, reports progress, and runs the convergence decisions
//!    (`core::convergence`) itself.
//! 3. The source agent reports `PostCopyActive` when it switched to post-copy
//!    (the controller writes `PostCopy`), and `SwitchedOver` when QEMU
//!    completed: the controller writes `Completing` and then the VM's
//!    `status.host = targetHost` — the commit point — and `Succeeded` once
//!    it reads that back.
//! 4. Cancel (`spec.cancel` or deletion) before `Running` ends the migration at
//!    once (no byte has moved; the target agent cleans up when it sees
//!    `Cancelled`). During `Running`, the controller records an abort request
//!    in the state and the `AbortRequested` condition; it ends the migration
//!    only when the source agent answers `Aborted` (→ `Cancelled`/`Failed`) or
//!    `SwitchedOver` (too late: → `Completing`), so the phase never claims the
//!    VM stayed when it moved. Deadlines, a lost target and target failures
//!    use the same abort path. In `PostCopy` cancel is refused: the guest
//!    already runs on the target.
//! 5. On `Failed`/`Cancelled` both agents clean up: the target kills its
//!    incoming QEMU, the source keeps running the VM.
//! 6. A lost source host ends the migration as `Failed` (`SourceHostLost`): the
//!    VM's `status.host` still names the source, whose agent fences itself;
//!    evacuation takes over from there.
//! 7. `Evacuate` skips the transfer: once the source is `Fenced`, the
//!    controller writes the VM's host and the target agent rebuilds the VM
//!    from its definition.

mod decide;
mod reasons;
mod state;
#[cfg(test)]
mod tests;

pub use decide::{
    ABORT_ACK_TIMEOUT, Action, Decision, EventType, POLL, PROGRESS_BACKSTOP_SLACK, QUEUE_POLL,
    SWITCHOVER_CONFIRM_TIMEOUT, WAITING_FOR_SLOT, decide,
};
pub use reasons::{FailureReason, UnknownReason};
pub use state::{
    AbortCause, AbortRequest, AdmissionOutcome, AgentFailure, Deadlines, HostHealth, MigrationKind,
    MigrationState, Observation, Phase, PlacementOutcome, SourceReport, TargetReport,
    VmObservation,
};
