//! `VirtualMachine`: what runs, and where.

// Each `printcolumn(...)` of the kube derive repeats `type_ = ...`; clippy
// reads the repetition as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::values::Quantity;

/// A QEMU virtual machine managed by Ferry. Its `status.host` is the single
/// truth of where it runs; it changes only at a confirmed switchover of a
/// migration or at a fenced evacuation.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "VirtualMachine",
    namespaced,
    status = "VirtualMachineStatus",
    shortname = "fvm",
    category = "ferry",
    doc = "A QEMU virtual machine that Ferry runs on one host at a time and moves between hosts.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase of the VM"
    ),
    printcolumn(
        name = "Host",
        type_ = "string",
        json_path = ".status.host",
        description = "The host the VM runs on"
    ),
    printcolumn(
        name = "Memory",
        type_ = "string",
        json_path = ".spec.memory",
        description = "Guest memory"
    ),
    printcolumn(
        name = "CPUs",
        type_ = "integer",
        json_path = ".spec.cpus",
        description = "Virtual CPUs"
    ),
    printcolumn(
        name = "Migration",
        type_ = "string",
        json_path = ".status.migration",
        description = "The migration in flight, if any"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(oldSelf.uuid) || (has(self.uuid) && self.uuid == oldSelf.uuid)").message("uuid is immutable once set").field_path(".uuid"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// The SMBIOS UUID of the guest. When unset, the object's `metadata.uid`
    /// is used, so the guest keeps one UUID for its whole life; once set it
    /// cannot change. A migrated or evacuated VM keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    ))]
    pub uuid: Option<String>,

    /// Guest memory, as a Kubernetes quantity (`"128Mi"`, `"4Gi"`).
    #[x_kube(validation = Rule::new("quantity(self).compareTo(quantity('16Mi')) >= 0").message("memory must be at least 16Mi"))]
    pub memory: Quantity,

    /// Number of virtual CPUs.
    #[serde(default = "default_cpus")]
    #[schemars(range(min = 1, max = 256))]
    pub cpus: u32,

    /// The CPU model presented to the guest (a QEMU `-cpu` model name). Hosts
    /// whose CPU cannot provide it are not candidates for this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    )]
    pub cpu_model: Option<String>,

    /// CPU features the guest needs (e.g. `sse4_2`, `avx2`); only hosts that
    /// have all of them are candidates, as the Xen and RHV manuals require
    /// for live migration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub required_cpu_features: Vec<String>,

    /// What the guest boots. Exactly one source must be given.
    pub boot: Boot,

    /// Disks on shared storage, attached in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub disks: Vec<Disk>,

    /// Network interfaces. Each keeps its MAC address (and IP address if
    /// given) when the VM moves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub networks: Vec<Network>,

    /// Rebuild this VM elsewhere when its host fails, even under a
    /// resilience policy of `MigrateHighlyAvailableOnly`.
    #[serde(default)]
    pub highly_available: bool,

    /// Whether the VM may be live-migrated. A host drain treats a
    /// non-migratable VM as its `nonMigratable` setting says.
    #[serde(default = "default_true")]
    pub migratable: bool,

    /// Whether the VM should be running.
    #[serde(default)]
    pub run_strategy: RunStrategy,

    /// Where the VM may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

fn default_cpus() -> u32 {
    1
}

fn default_true() -> bool {
    true
}

/// The boot source of a VM: exactly one of `kernel`, `disk` or `memtest`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.kernel), has(self.disk), has(self.memtest)].filter(x, x).size() == 1").message("exactly one of kernel, disk or memtest must be set"))]
#[serde(rename_all = "camelCase")]
pub struct Boot {
    /// Boot a kernel directly (QEMU `-kernel`), with an optional initrd and
    /// command line. Paths are on storage every host can read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelBoot>,

    /// Boot from the first disk of `disks`, by its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub disk: Option<String>,

    /// Boot Ferry's memory-pattern test guest, which fills its memory with a
    /// verifiable pattern and keeps dirtying it, so that a migration can be
    /// proven to have moved memory intact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memtest: Option<MemtestBoot>,
}

/// A kernel booted directly.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KernelBoot {
    /// Path of the kernel image.
    #[schemars(length(min = 1, max = 4096))]
    pub kernel: String,
    /// Path of the initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub cmdline: Option<String>,
}

/// Settings of the memory-pattern test guest.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemtestBoot {
    /// MiB of guest memory to fill with the pattern (default: most of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub fill_mib: Option<u32>,
    /// MiB per second the guest keeps rewriting (0: idle after filling).
    #[serde(default)]
    #[schemars(range(max = 100000))]
    pub dirty_rate_mib: u32,
}

/// A disk image on shared storage.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// Name of the disk, unique within the VM.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Path of the image on storage that every candidate host mounts.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
    /// Host page-cache mode. Live migration of a disk whose cache is not
    /// `None` can lose writes and is refused unless the migration policy
    /// sets `allowUnsafe`.
    #[serde(default)]
    pub cache: DiskCache,
    /// Attach the disk read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// QEMU's disk cache modes.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum DiskCache {
    /// No host page cache (`cache=none`): safe to live-migrate.
    #[default]
    None,
    /// Host page cache, write-back.
    Writeback,
    /// Host page cache, write-through.
    Writethrough,
    /// No host page cache, synchronous writes.
    Directsync,
    /// Ignore flushes.
    Unsafe,
}

/// A network interface of the VM.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// Name of the network; each host maps it to a bridge.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// MAC address. When unset, a stable one is derived from the VM's UUID
    /// and the network name (locally administered, prefix 52:54:00), shown in
    /// `status.networks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$"))]
    pub mac: Option<String>,
    /// Static IPv4 address with prefix length (`10.0.0.5/24`), which the VM
    /// keeps when it moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$"))]
    pub ip: Option<String>,
}

/// Whether the VM should run.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum RunStrategy {
    /// Keep the VM running.
    #[default]
    Running,
    /// Keep the VM stopped.
    Stopped,
}

/// Constraints on where a VM runs.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Only hosts of this cluster are candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub cluster: Option<String>,
    /// Only hosts whose labels match all of these are candidates.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_selector: BTreeMap<String, String>,
    /// The VM runs only on this host; it is never moved automatically, and a
    /// drain of this host treats it as not migratable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub pinned_host: Option<String>,
    /// VMs of the same affinity group prefer to share a host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub affinity_group: Option<String>,
    /// VMs of the same anti-affinity group never share a host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub anti_affinity_group: Option<String>,
}

/// Where the VM is in its life.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum VmPhase {
    /// Not yet placed on a host.
    #[default]
    Pending,
    /// A host is chosen; its agent has not started the VM yet.
    Scheduled,
    /// The agent is starting QEMU.
    Starting,
    /// Running on `status.host`.
    Running,
    /// Running, with a migration in flight.
    Migrating,
    /// Being stopped.
    Stopping,
    /// Not running.
    Stopped,
    /// QEMU exited unexpectedly or could not start.
    Failed,
}

/// Observed state of a VM.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: VmPhase,
    /// The host the VM runs on: the single truth of its location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The migration in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// The UUID the guest runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The interfaces as the guest sees them, with their effective MACs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkStatus>,
    /// The QEMU process on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<QemuStatus>,
    /// The generation of the spec last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready`, `Quarantined`, …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// An interface as configured in the guest.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    /// Network name.
    pub name: String,
    /// Effective MAC address.
    pub mac: String,
    /// Static IP address, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// The QEMU process of a running VM.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QemuStatus {
    /// Process id on the host.
    pub pid: i64,
    /// When the process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
}
