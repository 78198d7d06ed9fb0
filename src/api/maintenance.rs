//! `HostMaintenance`: take a host out of service.

// Each `printcolumn(...)` of the kube derive repeats `type_ = ...`; clippy
// reads the repetition as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::values::Duration;

/// Take a host out of service the way `nova host-evacuate-live` or RHV's
/// maintenance mode do: mark it unschedulable and live-migrate every VM off
/// it within the concurrency limits. Deleting the maintenance returns the
/// host to service (in-flight migrations are cancelled first).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "HostMaintenance",
    status = "HostMaintenanceStatus",
    shortname = "hm",
    category = "ferry",
    doc = "Drain a host: mark it unschedulable and live-migrate its VMs away (nova host-evacuate-live, RHV maintenance mode).",
    printcolumn(
        name = "Host",
        type_ = "string",
        json_path = ".spec.host",
        description = "The host being drained"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Planned, Draining, Completed or Failed"
    ),
    printcolumn(
        name = "Total",
        type_ = "integer",
        json_path = ".status.vmsTotal",
        description = "VMs on the host when the drain began"
    ),
    printcolumn(
        name = "Remaining",
        type_ = "integer",
        json_path = ".status.vmsRemaining",
        description = "VMs still on the host"
    ),
    printcolumn(
        name = "Blocked",
        type_ = "integer",
        json_path = ".status.vmsBlocked",
        description = "VMs that cannot move"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".spec.reason",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        description = "Where the drain is, or why it stopped",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.targetHost) == has(oldSelf.targetHost)").message("targetHost cannot be added or removed after creation").field_path(".targetHost"))]
#[x_kube(validation = Rule::new("!has(self.targetHost) || self.targetHost != self.host").message("targetHost must differ from host").field_path(".targetHost"))]
#[serde(rename_all = "camelCase")]
pub struct HostMaintenanceSpec {
    /// The host to drain.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("host is immutable"))]
    pub host: String,

    /// Move every VM to this host (`nova host-evacuate-live --target-host`).
    /// When unset, the scheduler chooses a target for each VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("targetHost is immutable"))]
    pub target_host: Option<String>,

    /// Why the host is being drained, for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,

    /// The MigrationPolicy for the drain's migrations. When unset each VM's
    /// own policy applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub policy: Option<String>,

    /// What to do with VMs that cannot be live-migrated: `Block` keeps the
    /// host in the drain and reports them as blockers; `Stop` shuts them down
    /// (a cold stop, started again when the host returns).
    #[serde(default)]
    pub non_migratable: NonMigratable,

    /// Give up (phase Failed) if the drain has not finished after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Duration>,

    /// Move nothing: fill `status.plan` with where each VM would go (or what
    /// blocks it), in which order, and how long the drain would take.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("dryRun is immutable: create a new HostMaintenance"))]
    pub dry_run: bool,
}

/// What a drain does with a VM that cannot be live-migrated.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NonMigratable {
    /// Report it as a blocker; the drain does not complete.
    #[default]
    Block,
    /// Stop it; the drain completes without it.
    Stop,
}

/// Where a drain is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MaintenancePhase {
    /// Accepted, not yet looked at.
    #[default]
    Pending,
    /// A dry run's plan is ready in `status.plan`.
    Planned,
    /// VMs are being moved off the host.
    Draining,
    /// The host is empty (blocked VMs aside when `nonMigratable` is Stop).
    Completed,
    /// The deadline passed or a VM could not be moved after its retries.
    Failed,
}

/// Observed state of a drain.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HostMaintenanceStatus {
    /// Where the drain is.
    #[serde(default)]
    pub phase: MaintenancePhase,
    /// VMs on the host when the drain began.
    #[serde(default)]
    pub vms_total: u32,
    /// VMs still on the host.
    #[serde(default)]
    pub vms_remaining: u32,
    /// VMs that cannot move.
    #[serde(default)]
    pub vms_blocked: u32,
    /// The Migrations this drain created.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<String>,
    /// VMs that cannot move, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blockers: Vec<Blocker>,
    /// With `dryRun`: what the drain would do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<DrainPlan>,
    /// What happened, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The generation of the spec last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions of a real drain: `Draining` (True while VMs are
    /// moved off), `Drained` (True once the host is empty), `Blocked` (True
    /// while some VMs cannot leave; the message names each with why),
    /// `Failed` (True when the drain gave up: `DeadlineExceeded` or
    /// `VmsCannotLeave`), and with `spec.deadline`, `DeadlineExceeded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A VM that cannot move.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Blocker {
    /// Namespace of the VM.
    pub namespace: String,
    /// Name of the VM.
    pub vm: String,
    /// Machine-readable reason (`NotMigratable`, `NoHostFits`, `RetriesExhausted`, …).
    pub reason: String,
    /// Explanation for a person.
    pub message: String,
}

/// What a drain would do.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DrainPlan {
    /// Each VM, in the order it would move.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<PlanEntry>,
    /// Estimated time for the whole drain, seconds.
    #[serde(default)]
    pub estimated_seconds: u64,
}

/// One VM in a drain plan.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanEntry {
    /// Namespace of the VM.
    pub namespace: String,
    /// Name of the VM.
    pub vm: String,
    /// Where it would go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Why it cannot go anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocker: Option<String>,
    /// Estimated seconds for its migration.
    #[serde(default)]
    pub estimated_seconds: u64,
}
