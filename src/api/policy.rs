//! `MigrationPolicy`: how migrations behave and how VMs are spread.
//!
//! Every setting has a default (listed with its source) so that an empty
//! policy is a complete, sensible one. Which policy applies to a VM: the
//! Migration's `spec.policy` if named; else, among the policies whose
//! `selector` and `namespaceSelector` both match the VM, the one with the
//! most selector terms (a policy with no selectors matches every VM with no
//! terms, so it is the cluster-wide fallback); ties go to more VM-selector
//! terms, then to the name that sorts first; else the built-in defaults.
//! The rule and its tests live in `core::policy::select`.

// Each `printcolumn(...)` of the kube derive repeats `type_ = ...`; clippy
// reads the repetition as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::values::{Bandwidth, Duration, Quantity};

/// How migrations behave (convergence, bandwidth, concurrency) and how the
/// scheduler spreads VMs over hosts, for the VMs it selects.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "MigrationPolicy",
    status = "MigrationPolicyStatus",
    shortname = "mpol",
    category = "ferry",
    doc = "How migrations converge, how much bandwidth and concurrency they get, how VMs are spread over hosts and what happens to the VMs of a failed host.",
    printcolumn(
        name = "Convergence",
        type_ = "string",
        json_path = ".spec.convergence.mode"
    ),
    printcolumn(
        name = "Bandwidth",
        type_ = "string",
        json_path = ".spec.bandwidth.mode"
    ),
    printcolumn(
        name = "Scheduling",
        type_ = "string",
        json_path = ".spec.scheduling.policy"
    ),
    printcolumn(
        name = "Resilience",
        type_ = "string",
        json_path = ".spec.resilience.policy"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPolicySpec {
    /// VMs whose labels match this selector use the policy. Empty or unset
    /// matches every VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Only VMs in namespaces whose labels match use the policy. Empty or
    /// unset matches every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// How a live migration is brought to an end.
    #[serde(default)]
    pub convergence: Convergence,
    /// How much bandwidth a migration may use.
    #[serde(default)]
    pub bandwidth: BandwidthPolicy,
    /// How many migrations run at once.
    #[serde(default)]
    pub limits: Limits,
    /// How VMs are placed and balanced.
    #[serde(default)]
    pub scheduling: Scheduling,
    /// What happens to the VMs of a failed host.
    #[serde(default)]
    pub resilience: Resilience,
    /// Multifd channels per live migration (0: a single stream). More
    /// channels move memory faster where CPU allows.
    #[serde(default)]
    #[schemars(range(max = 16))]
    pub parallel_connections: u32,
    /// Allow live migration of VMs whose disks use a host cache mode other
    /// than `None`, at the risk of losing writes.
    #[serde(default)]
    pub allow_unsafe: bool,
}

/// How a live migration is brought to an end (the RHV migration policies).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Convergence {
    /// `MinimalDowntime` (pre-copy within the downtime limit; abort when it
    /// does not converge), `PostCopy` (switch to post-copy when pre-copy
    /// stalls; a network failure after the switch is fatal to the guest, so
    /// this is opt-in), `SuspendWorkloadIfNeeded` (throttle the guest's CPUs,
    /// then raise the downtime limit step by step, finally pause the guest to
    /// finish), `Legacy` (plain pre-copy with QEMU's defaults).
    #[serde(default)]
    pub mode: ConvergenceMode,
    /// Longest pause of the guest at switchover (QEMU `downtime-limit`).
    /// Default 300ms, QEMU's and KubeVirt's default.
    #[serde(default = "default_downtime_limit")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1ms') && duration(self) <= duration('60s')").message("downtimeLimit must be between 1ms and 60s"))]
    pub downtime_limit: Duration,
    /// Abort when the migration takes longer than this per GiB of guest
    /// memory. Default 150s, as KubeVirt's `completionTimeoutPerGiB` and
    /// Nova's `live_migration_completion_timeout`.
    #[serde(
        default = "default_completion_timeout",
        rename = "completionTimeoutPerGiB"
    )]
    pub completion_timeout_per_gib: Duration,
    /// Abort (or escalate, per mode) when remaining memory has not shrunk for
    /// this long. Default 150s, as KubeVirt's `progressTimeout`.
    #[serde(default = "default_progress_timeout")]
    pub progress_timeout: Duration,
}

impl Default for Convergence {
    fn default() -> Self {
        Self {
            mode: ConvergenceMode::default(),
            downtime_limit: default_downtime_limit(),
            completion_timeout_per_gib: default_completion_timeout(),
            progress_timeout: default_progress_timeout(),
        }
    }
}

fn default_downtime_limit() -> Duration {
    Duration::from_millis(300)
}

fn default_completion_timeout() -> Duration {
    Duration::from_secs(150)
}

fn default_progress_timeout() -> Duration {
    Duration::from_secs(150)
}

/// The convergence modes of RHV's migration policies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConvergenceMode {
    /// Pre-copy within the downtime limit; abort if it does not converge.
    #[default]
    MinimalDowntime,
    /// Switch to post-copy when pre-copy stalls.
    PostCopy,
    /// Throttle, raise the downtime limit, finally pause to finish.
    SuspendWorkloadIfNeeded,
    /// Plain pre-copy with QEMU's defaults.
    Legacy,
}

/// Bandwidth of a migration (RHV's migration bandwidth modes).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.limit) == (self.mode == 'Custom')").message("limit is required when mode is Custom, and only then").field_path(".limit"))]
#[serde(rename_all = "camelCase")]
pub struct BandwidthPolicy {
    /// `Auto` (no limit beyond the link: QEMU's 128 MiB/s default cap is
    /// lifted), `HypervisorDefault` (QEMU's own default cap), `Custom`
    /// (`limit`).
    #[serde(default)]
    pub mode: BandwidthMode,
    /// Bytes per second per migration, with `Custom` (`"100Mi"` = 100 MiB/s).
    /// Enforced by the agents' relay and by QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Bandwidth>,
}

/// RHV's migration bandwidth modes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BandwidthMode {
    /// As fast as the link allows.
    #[default]
    Auto,
    /// The hypervisor's default cap.
    HypervisorDefault,
    /// The given `limit`.
    Custom,
}

/// Concurrency limits (KubeVirt's defaults). Each counts transfers:
/// migrations whose memory stream is or may be flowing (phases `Running`
/// and `PostCopy`, until the source host reports the switchover or the
/// abort; an evacuation from its admission to its end). As many migrations
/// again may have their target prepared meanwhile (phases `Scheduled` and
/// `PreparingTarget`, counted on their own against the same numbers), so
/// the next transfer starts as soon as one ends. `Completing` (the VM's new
/// host being recorded) counts against neither.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Transfers at once in the whole cluster (and as many targets being
    /// prepared ahead of them). Default 5 (KubeVirt).
    #[serde(default = "default_parallel_cluster")]
    #[schemars(range(min = 1, max = 1000))]
    pub parallel_migrations_per_cluster: u32,
    /// Transfers leaving one host at once (and as many targets being
    /// prepared for its next ones). Default 2 (KubeVirt).
    #[serde(default = "default_parallel_host")]
    #[schemars(range(min = 1, max = 100))]
    pub parallel_outbound_per_host: u32,
    /// Transfers arriving at one host at once (and as many incoming VMs
    /// being prepared on it). Default 2.
    #[serde(default = "default_parallel_host")]
    #[schemars(range(min = 1, max = 100))]
    pub parallel_inbound_per_host: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            parallel_migrations_per_cluster: default_parallel_cluster(),
            parallel_outbound_per_host: default_parallel_host(),
            parallel_inbound_per_host: default_parallel_host(),
        }
    }
}

fn default_parallel_cluster() -> u32 {
    5
}

fn default_parallel_host() -> u32 {
    2
}

/// Placement and balancing (oVirt's scheduling policies and their parameters).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.lowUtilization < self.highUtilization").message("lowUtilization must be less than highUtilization").field_path(".lowUtilization"))]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// `None` (place by capacity only, no balancing: the RHV default),
    /// `EvenlyDistributed` (spread CPU load), `PowerSaving` (pack VMs onto few
    /// hosts so idle ones can be switched off), `VmEvenlyDistributed` (spread
    /// VM counts), `InClusterUpgrade` (only to hosts with the same or newer
    /// agent and hypervisor).
    #[serde(default)]
    pub policy: SchedulingPolicy,
    /// CPU percent above which a host is over-utilised. Default 80 (oVirt).
    #[serde(default = "default_high_utilization")]
    #[schemars(range(min = 1, max = 100))]
    pub high_utilization: u32,
    /// CPU percent below which a host is under-utilised (PowerSaving empties
    /// it). Default 20 (oVirt).
    #[serde(default = "default_low_utilization")]
    #[schemars(range(max = 99))]
    pub low_utilization: u32,
    /// How long a host must stay over `highUtilization` to count as
    /// over-utilised. Default 2m (oVirt `CpuOverCommitDurationMinutes`).
    #[serde(default = "default_overcommit_duration")]
    pub over_commit_duration: Duration,
    /// VmEvenlyDistributed: VM count from which a host is over-loaded.
    /// Default 10 (oVirt `HighVmCount`).
    #[serde(default = "default_high_vm_count")]
    #[schemars(range(min = 1, max = 10000))]
    pub high_vm_count: u32,
    /// VmEvenlyDistributed: VM-count difference between the most and least
    /// loaded host that triggers balancing. Default 5 (oVirt
    /// `MigrationThreshold`).
    #[serde(default = "default_migration_threshold")]
    #[schemars(range(min = 1, max = 10000))]
    pub migration_threshold: u32,
    /// VmEvenlyDistributed: how many fewer VMs hosts labelled
    /// `ferry.dev/control-host` carry. Default 5 (oVirt `SpmVmGrace`).
    #[serde(default = "default_spm_vm_grace")]
    #[schemars(range(max = 10000))]
    pub spm_vm_grace: u32,
    /// A host with less free memory than this counts as over-utilised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_free_memory_for_over_utilized: Option<Quantity>,
    /// A host with more free memory than this counts as under-utilised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_memory_for_under_utilized: Option<Quantity>,
    /// Automatic balancing moves.
    #[serde(default)]
    pub balancing: Balancing,
}

impl Default for Scheduling {
    fn default() -> Self {
        Self {
            policy: SchedulingPolicy::default(),
            high_utilization: default_high_utilization(),
            low_utilization: default_low_utilization(),
            over_commit_duration: default_overcommit_duration(),
            high_vm_count: default_high_vm_count(),
            migration_threshold: default_migration_threshold(),
            spm_vm_grace: default_spm_vm_grace(),
            max_free_memory_for_over_utilized: None,
            min_free_memory_for_under_utilized: None,
            balancing: Balancing::default(),
        }
    }
}

fn default_high_utilization() -> u32 {
    80
}

fn default_low_utilization() -> u32 {
    20
}

fn default_overcommit_duration() -> Duration {
    Duration::from_secs(120)
}

fn default_high_vm_count() -> u32 {
    10
}

fn default_migration_threshold() -> u32 {
    5
}

fn default_spm_vm_grace() -> u32 {
    5
}

/// oVirt's scheduling policies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SchedulingPolicy {
    /// Capacity only, no balancing.
    #[default]
    None,
    /// Spread CPU load evenly.
    EvenlyDistributed,
    /// Pack VMs onto few hosts.
    PowerSaving,
    /// Spread VM counts evenly.
    VmEvenlyDistributed,
    /// Move only to hosts with the same or newer versions.
    InClusterUpgrade,
}

/// Automatic balancing moves.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Balancing {
    /// Let the controller create balancing Migrations (labelled
    /// `ferry.dev/automatic`) when the policy wants them.
    #[serde(default)]
    pub enabled: bool,
    /// How often a balancing pass runs; also the least time between two
    /// balancing moves off one host. Default 1m (oVirt's balancing interval).
    #[serde(default = "default_balancing_interval")]
    pub interval: Duration,
}

impl Default for Balancing {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: default_balancing_interval(),
        }
    }
}

fn default_balancing_interval() -> Duration {
    Duration::from_secs(60)
}

/// What happens to the VMs of a failed host (RHV's resilience policy).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("duration(self.fenceAfter) < duration(self.evacuateAfter)").message("fenceAfter must be shorter than evacuateAfter, so a host has stopped its VMs before they are rebuilt elsewhere").field_path(".fenceAfter"))]
#[serde(rename_all = "camelCase")]
pub struct Resilience {
    /// `MigrateAll` (rebuild every VM elsewhere), `MigrateHighlyAvailableOnly`
    /// (only VMs with `highlyAvailable`), `DoNotMigrate`.
    #[serde(default)]
    pub policy: ResiliencePolicy,
    /// An agent that cannot renew its host's Lease for this long stops its
    /// own VMs (self-fencing). Default 40s, the grace kube-controller-manager
    /// gives a node (`node-monitor-grace-period`).
    #[serde(default = "default_fence_after")]
    pub fence_after: Duration,
    /// The controller declares a host whose Lease is this old Fenced and
    /// rebuilds its VMs elsewhere. Must exceed `fenceAfter`. Default 60s.
    #[serde(default = "default_evacuate_after")]
    pub evacuate_after: Duration,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            policy: ResiliencePolicy::default(),
            fence_after: default_fence_after(),
            evacuate_after: default_evacuate_after(),
        }
    }
}

fn default_fence_after() -> Duration {
    Duration::from_secs(40)
}

fn default_evacuate_after() -> Duration {
    Duration::from_secs(60)
}

/// RHV's resilience policies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ResiliencePolicy {
    /// Rebuild every VM of a failed host.
    #[default]
    MigrateAll,
    /// Rebuild only highly available VMs.
    MigrateHighlyAvailableOnly,
    /// Leave them down.
    DoNotMigrate,
}

/// Observed state of a policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPolicyStatus {
    /// The generation of the spec last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
