//! `Host`: one hypervisor host, published by its agent.

// Each `printcolumn(...)` of the kube derive repeats `type_ = ...`; clippy
// reads the repetition as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::values::Quantity;

/// A hypervisor host. Its agent creates it and keeps its status fresh; its
/// liveness is the `coordination.k8s.io/v1` Lease of the same name in the
/// `ferry-system` namespace, renewed by the agent.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Host",
    status = "HostStatus",
    category = "ferry",
    doc = "A hypervisor host that runs VMs, published and kept fresh by its Ferry agent.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Active, Maintenance, Unreachable, Fenced or Failed"
    ),
    printcolumn(
        name = "Cluster",
        type_ = "string",
        json_path = ".spec.cluster",
        description = "Scheduling cluster"
    ),
    printcolumn(
        name = "Unschedulable",
        type_ = "boolean",
        json_path = ".spec.unschedulable",
        description = "Set while the host is in maintenance"
    ),
    printcolumn(
        name = "VMs",
        type_ = "integer",
        json_path = ".status.vmCount",
        description = "VMs running on the host"
    ),
    printcolumn(
        name = "CPU%",
        type_ = "integer",
        json_path = ".status.cpuPercent",
        description = "Latest CPU utilisation"
    ),
    printcolumn(
        name = "Free",
        type_ = "string",
        json_path = ".status.freeMemory",
        description = "Latest free memory"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".spec.migrationEndpoint",
        priority = 1,
        description = "Migration endpoint"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct HostSpec {
    /// The scheduling cluster the host belongs to; VMs move only between
    /// hosts of one cluster.
    #[serde(default = "default_cluster")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub cluster: String,

    /// `address:port` where this host's agent accepts migration streams, on
    /// the migration network (kept apart from the management network, as the
    /// RHV manual recommends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 261))]
    pub migration_endpoint: Option<String>,

    /// No new VMs are placed here while set. A HostMaintenance sets it and
    /// clears it when deleted.
    #[serde(default)]
    pub unschedulable: bool,
}

fn default_cluster() -> String {
    "default".to_string()
}

/// Health and service state of a host.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HostPhase {
    /// Serving VMs; its Lease is fresh.
    #[default]
    Active,
    /// Being drained or drained by a HostMaintenance.
    Maintenance,
    /// Its Lease has not been renewed in time.
    Unreachable,
    /// Declared dead: its VMs have been (or are being) rebuilt elsewhere. It
    /// returns to service only when its agent comes back and has stopped
    /// every VM it no longer owns.
    Fenced,
    /// The agent reports it cannot run VMs (for example QEMU is missing).
    Failed,
}

/// Observed state of a host.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    /// Health and service state.
    #[serde(default)]
    pub phase: HostPhase,
    /// What the host offers to VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Resources>,
    /// What the VMs placed here take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Resources>,
    /// The host CPU model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// The host CPU's feature flags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
    /// Latest CPU utilisation in percent (the last sample of `load`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u32>,
    /// Latest free memory (the last sample of `load`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<Quantity>,
    /// Recent load samples, oldest first, so that "over 80% for 2 minutes"
    /// can be judged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load: Vec<LoadSample>,
    /// Number of VMs running here.
    #[serde(default)]
    pub vm_count: u32,
    /// Version of the Ferry agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The hypervisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<Hypervisor>,
    /// The generation of the spec last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready`, `Schedulable`, …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// CPU and memory.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory.
    pub memory: Quantity,
}

/// One load sample.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadSample {
    /// When the sample was taken.
    pub time: Time,
    /// CPU utilisation of the host, percent.
    pub cpu_percent: u32,
    /// Free memory.
    pub free_memory: Quantity,
}

/// The hypervisor of a host.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Hypervisor {
    /// QEMU version, e.g. `10.0.2`.
    pub qemu_version: String,
    /// `kvm` or `tcg`.
    pub accelerator: String,
}
