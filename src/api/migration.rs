//! `Migration`: one move of one VM.

// Each `printcolumn(...)` of the kube derive repeats `type_ = ...`; clippy
// reads the repetition as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One move of one VM: live, cold, or the evacuation of a failed host.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Migration",
    namespaced,
    status = "MigrationStatus",
    shortname = "mig",
    category = "ferry",
    doc = "One move of one VM between hosts: live (pre-copy or post-copy), cold, or the evacuation of a failed host.",
    printcolumn(
        name = "VM",
        type_ = "string",
        json_path = ".spec.vmName",
        description = "The VM being moved"
    ),
    printcolumn(
        name = "Type",
        type_ = "string",
        json_path = ".spec.type",
        description = "Live, Cold or Evacuate"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the migration is"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".status.sourceHost",
        description = "Host the VM leaves"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.targetHost",
        description = "Host the VM goes to"
    ),
    printcolumn(
        name = "Progress",
        type_ = "integer",
        json_path = ".status.progress.percent",
        description = "Percent of memory transferred"
    ),
    printcolumn(
        name = "Pause",
        type_ = "integer",
        json_path = ".status.pauseMs",
        description = "Milliseconds from the guest stopping on the source to it running on the target"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.failureReason",
        priority = 1,
        description = "Why it failed"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.targetHost) == has(oldSelf.targetHost)").message("targetHost cannot be added or removed after creation").field_path(".targetHost"))]
#[x_kube(validation = Rule::new("has(self.policy) == has(oldSelf.policy)").message("policy cannot be added or removed after creation").field_path(".policy"))]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    /// Name of the VirtualMachine to move, in the Migration's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("vmName is immutable"))]
    pub vm_name: String,

    /// `Live` (the guest keeps running; `nova live-migration`, `xm migrate
    /// -l`), `Cold` (the guest is stopped, then started on the target with the
    /// same identity; `xm migrate`) or `Evacuate` (rebuild on another host
    /// after the VM's host failed and was fenced; `nova evacuate`).
    #[serde(default, rename = "type")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("type is immutable"))]
    pub migration_type: MigrationType,

    /// The host to move to. When unset, the scheduler picks one by the
    /// scheduling policy and records why in `status.schedulingDecision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("targetHost is immutable"))]
    pub target_host: Option<String>,

    /// Name of the MigrationPolicy to use. When unset, the most specific
    /// policy whose selectors match the VM applies, else the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("policy is immutable"))]
    pub policy: Option<String>,

    /// Set to true to cancel the migration. Until switchover the VM keeps
    /// running on its source host and the target is cleaned up; a cancel
    /// cannot be withdrawn. Deleting the Migration cancels it too.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self || !oldSelf").message("a cancel cannot be withdrawn"))]
    pub cancel: bool,
}

/// How the VM moves.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MigrationType {
    /// Move the running guest's memory while it runs.
    #[default]
    Live,
    /// Stop the guest, start it on the target with the same identity.
    Cold,
    /// Rebuild the guest of a failed, fenced host on another host.
    Evacuate,
}

/// Where a migration is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MigrationPhase {
    /// Accepted, not yet looked at.
    #[default]
    Pending,
    /// Looking for a target host.
    Scheduling,
    /// Waiting for a slot within the concurrency limits.
    Queued,
    /// A target host is chosen and a slot taken.
    Scheduled,
    /// The target agent is preparing the receiving VM.
    PreparingTarget,
    /// Memory is being transferred (pre-copy) or the VM restarted (cold).
    Running,
    /// The guest runs on the target; remaining pages are pulled on demand.
    PostCopy,
    /// Switchover done; the source is being cleaned up.
    Completing,
    /// The VM runs on the target host.
    Succeeded,
    /// The migration failed; the VM runs where `failureReason` says.
    Failed,
    /// Cancelled; the VM runs on its source host.
    Cancelled,
}

/// Observed state of a migration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Where the migration is.
    #[serde(default)]
    pub phase: MigrationPhase,
    /// The host the VM leaves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_host: Option<String>,
    /// The host the VM goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_host: Option<String>,
    /// The policy in effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// How the target was chosen: every host considered and why each one
    /// not chosen was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling_decision: Option<SchedulingDecision>,
    /// What the source host's agent reports (written only by that agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<AgentReport>,
    /// What the target host's agent reports (written only by that agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<AgentReport>,
    /// Transfer progress, sampled by the source agent about once a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// When each step happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamps: Option<Timestamps>,
    /// The guest's measured pause at switchover, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Total duration of the transfer, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The real pause, in milliseconds: from the guest stopping on the
    /// source (QEMU's `STOP` event there) to it running on the target (the
    /// `RESUME` event there), the two hosts' clocks compared as
    /// `docs/protocol.md` describes. At least `downtimeMs`, which QEMU
    /// measures on the source alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// How far `pauseMs` may be off, in milliseconds, from comparing two
    /// hosts' clocks (half the round trip of the clock exchange plus the
    /// clocks' possible drift since). Absent when the target's clock could
    /// not be measured and synchronised clocks were assumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_error_ms: Option<u64>,
    /// Machine-readable reason of a failure (e.g. `ProgressTimeout`,
    /// `NoHostFits`, `StreamStalled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// What happened, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The generation of the spec last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One agent's half of a migration, as that agent reports it. The
/// controller reads both halves and decides the phase; each agent writes only
/// its own half, so the three writers never overwrite each other.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// Where this agent's half is.
    pub state: AgentState,
    /// Machine-readable reason, with `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What happened, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the state was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// Source, while transferring: when remaining memory last reached a new
    /// low (the progress timeout counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress: Option<Time>,
    /// Source: when the guest stopped here for the switchover (QEMU's `STOP`
    /// event, this host's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_stopped: Option<MicroTime>,
    /// Target: when the guest started running here (QEMU's `RESUME` event,
    /// this host's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_resumed: Option<MicroTime>,
    /// Target, with `Running`: whether the guest's whole memory had arrived
    /// here when it started (the incoming migration completed). False in
    /// post-copy, where the source still holds pages the guest needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_complete: Option<bool>,
    /// Post-copy recovery round: in the source's report the round it asks
    /// for (the stream broke), in the target's the round it listens for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<u32>,
}

/// The states an agent reports for its half of a migration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentState {
    /// Target: starting the receiving QEMU.
    Preparing,
    /// Target: the receiving QEMU waits for the stream; the relay accepts
    /// the source host, for this migration only.
    Ready,
    /// Target: the guest runs here.
    Running,
    /// Source: memory is being sent.
    Transferring,
    /// Source: switched to post-copy; the guest runs on the target and
    /// pulls its remaining pages from the source.
    PostCopyActive,
    /// Source: the transfer completed and the target runs the guest; the
    /// source guest is paused for good.
    SwitchedOver,
    /// Source: the transfer was aborted on request; the guest runs on the
    /// source.
    Aborted,
    /// This half failed; `reason` says why. Before switchover the guest
    /// keeps running on the source.
    Failed,
    /// Target: the receiving QEMU is gone after a failure or cancel.
    CleanedUp,
}

/// How the scheduler chose the target.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingDecision {
    /// The chosen host, if any fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<String>,
    /// The scheduling policy that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Why the chosen host won.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every other host, with why it was not chosen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedHost>,
}

/// A host that was not chosen.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RejectedHost {
    /// The host.
    pub host: String,
    /// Machine-readable reason (the filter or weight that decided).
    pub reason: String,
    /// Explanation for a person.
    pub message: String,
}

/// Transfer progress.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Pre-copy iteration (QEMU's dirty-sync count).
    #[serde(default)]
    pub iteration: u64,
    /// Guest memory, bytes.
    #[serde(default)]
    pub memory_total: u64,
    /// Bytes transferred so far.
    #[serde(default)]
    pub memory_transferred: u64,
    /// Bytes still to send in this iteration.
    #[serde(default)]
    pub memory_remaining: u64,
    /// Bytes per second the guest dirties.
    #[serde(default)]
    pub dirty_rate: u64,
    /// Bytes per second on the wire.
    #[serde(default)]
    pub throughput: u64,
    /// QEMU's expected downtime if it switched over now, milliseconds.
    #[serde(default)]
    pub expected_downtime_ms: u64,
    /// Percent of memory transferred (0–100).
    #[serde(default)]
    pub percent: u32,
    /// Estimated seconds to completion, when converging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// Whether the transfer is outpacing the guest's dirtying.
    #[serde(default)]
    pub converging: bool,
    /// What the convergence policy does now and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence: Option<String>,
}

/// When each step of a migration happened.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Timestamps {
    /// Admitted: the target is chosen and may prepare (the preparation's
    /// timeout counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<Time>,
    /// Transfer started: admitted to a transfer slot with the target ready
    /// (the completion deadline counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Time>,
    /// Switched to post-copy: the guest began running on the target while
    /// its remaining pages were pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy: Option<Time>,
    /// The guest started running on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<Time>,
    /// Reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<Time>,
}
