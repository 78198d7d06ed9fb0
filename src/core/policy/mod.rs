//! Migration policies resolved once into an effective configuration.
//!
//! A `MigrationPolicy` in the API leaves most fields optional. The controller
//! maps the API object onto [`PolicyOverrides`] (plain options, no Kubernetes
//! types) and calls [`EffectivePolicy::resolve`], which fills every missing
//! field from the defaults below and checks the cross-field rules. Everything
//! else in the core takes an [`EffectivePolicy`] and never looks at an
//! `Option` for a policy value again.
//!
//! Which policy applies to a VM is decided by [`select()`](select::select): see its module
//! documentation for the "most specific match wins" rule.
//!
//! The defaults carry their source: oVirt/RHV (scheduling parameters, the
//! convergence modes), KubeVirt and Nova (timeouts, concurrency limits), and
//! a few that are Ferry's own (the anti-flapping guards of automatic
//! balancing, fencing delays) with the reason for each value.

pub mod select;

use std::time::Duration;

use thiserror::Error;

pub use select::{LabelSelector, PolicyCandidate, Requirement, Selection, SelectorOp, select};

/// How a migration reaches convergence (see `core::convergence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ConvergenceMode {
    /// Pre-copy within the downtime limit; abort when it does not converge.
    /// oVirt's default migration policy ("Minimal downtime").
    #[default]
    MinimalDowntime,
    /// Switch to post-copy when pre-copy stalls (needs userfaultfd).
    PostCopy,
    /// Auto-converge throttling, then a rising downtime limit, then pause the
    /// guest to finish.
    SuspendWorkloadIfNeeded,
    /// Plain pre-copy with the hypervisor's defaults.
    Legacy,
}

/// How the migration stream's bandwidth is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bandwidth {
    /// As fast as the migration network allows (QEMU's own 128 MiB/s cap is
    /// lifted by the agent).
    #[default]
    Auto,
    /// Whatever the agent on the source host is configured with.
    HypervisorDefault,
    /// A fixed limit in bytes per second.
    Custom {
        /// Bytes per second.
        bytes_per_sec: u64,
    },
}

/// Which scheduling policy spreads VMs over hosts (oVirt's five).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SchedulingPolicyKind {
    /// Place by capacity only, no balancing (the RHV default).
    #[default]
    None,
    /// Spread CPU load evenly.
    EvenlyDistributed,
    /// Pack VMs onto few hosts so the others can be switched off.
    PowerSaving,
    /// Spread the number of VMs evenly.
    VmEvenlyDistributed,
    /// During a rolling upgrade, move only to same-or-newer hosts.
    InClusterUpgrade,
}

/// What happens to the VMs of a failed host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResiliencePolicy {
    /// Rebuild every VM elsewhere (RHV's default "Migrate Virtual Machines").
    #[default]
    MigrateAll,
    /// Rebuild only VMs marked highly available.
    MigrateHighlyAvailableOnly,
    /// Leave them.
    DoNotMigrate,
}

/// Defaults, each with where it comes from.
pub mod defaults {
    use std::time::Duration;

    /// oVirt/RHV default: the shortest pause that pre-copy can manage.
    pub const DOWNTIME_LIMIT: Duration = Duration::from_millis(300);
    /// KubeVirt `completionTimeoutPerGiB` and Nova
    /// `live_migration_completion_timeout` both default to 150 s per GiB.
    pub const COMPLETION_TIMEOUT_PER_GIB: Duration = Duration::from_secs(150);
    /// KubeVirt `progressTimeout` default (150 s without remaining bytes
    /// going down).
    pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(150);
    /// KubeVirt `parallelMigrationsPerCluster` default.
    pub const PARALLEL_MIGRATIONS_PER_CLUSTER: u32 = 5;
    /// KubeVirt `parallelOutboundMigrationsPerNode` default.
    pub const PARALLEL_OUTBOUND_PER_HOST: u32 = 2;
    /// Ferry: symmetric with the outbound limit, so that a drain cannot pile
    /// every VM onto one target at once.
    pub const PARALLEL_INBOUND_PER_HOST: u32 = 2;
    /// oVirt `HighUtilization` default (%): "a host is overloaded when its
    /// CPU load is over 80% for more than 2 minutes".
    pub const HIGH_UTILIZATION: u32 = 80;
    /// oVirt `LowUtilization` default (%).
    pub const LOW_UTILIZATION: u32 = 20;
    /// oVirt `CpuOverCommitDurationMinutes` default: 2 minutes.
    pub const OVER_COMMIT_DURATION: Duration = Duration::from_secs(120);
    /// oVirt `HighVmCount` default.
    pub const HIGH_VM_COUNT: u32 = 10;
    /// oVirt `MigrationThreshold` default.
    pub const MIGRATION_THRESHOLD: u32 = 5;
    /// oVirt `SpmVmGrace` default.
    pub const SPM_VM_GRACE: u32 = 5;
    /// oVirt runs its balancer once a minute.
    pub const BALANCING_INTERVAL: Duration = Duration::from_secs(60);
    /// Ferry: a VM moved by the balancer stays put for ten minutes, five
    /// times the default overcommit duration, so that a load spike cannot
    /// bounce it back (descheduler flapping reports).
    pub const VM_COOLDOWN: Duration = Duration::from_secs(600);
    /// Ferry: a balancing move must narrow the gap between its two hosts by
    /// more than 10 percentage points of CPU, or it is not worth a migration.
    pub const IMPROVEMENT_MARGIN: f64 = 10.0;
    /// Ferry: at most 3 automatic moves of one VM per hour.
    pub const MOVES_PER_VM_PER_WINDOW: u32 = 3;
    /// Ferry: the window of [`MOVES_PER_VM_PER_WINDOW`].
    pub const MOVE_BUDGET_WINDOW: Duration = Duration::from_secs(3600);
    /// Ferry: an agent that cannot renew its Lease for 40 s stops its VMs,
    /// the same grace as kube-controller-manager's `node-monitor-grace-period`.
    pub const FENCE_AFTER: Duration = Duration::from_secs(40);
    /// Ferry: the controller rebuilds a failed host's VMs 20 s after the
    /// host's agent (or its watchdog) must have stopped them.
    pub const EVACUATE_AFTER: Duration = Duration::from_secs(60);
}

/// A policy as written: every field optional. The controller fills it from
/// the `MigrationPolicy` object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyOverrides {
    /// `convergence` mode.
    pub convergence: Option<ConvergenceMode>,
    /// `downtimeLimit`.
    pub downtime_limit: Option<Duration>,
    /// `completionTimeoutPerGiB`.
    pub completion_timeout_per_gib: Option<Duration>,
    /// `progressTimeout`.
    pub progress_timeout: Option<Duration>,
    /// `bandwidth`.
    pub bandwidth: Option<Bandwidth>,
    /// `limits.parallelMigrationsPerCluster`.
    pub parallel_migrations_per_cluster: Option<u32>,
    /// `limits.parallelOutboundPerHost`.
    pub parallel_outbound_per_host: Option<u32>,
    /// `limits.parallelInboundPerHost`.
    pub parallel_inbound_per_host: Option<u32>,
    /// `scheduling.policy`.
    pub scheduling_policy: Option<SchedulingPolicyKind>,
    /// `scheduling.highUtilization` (%).
    pub high_utilization: Option<u32>,
    /// `scheduling.lowUtilization` (%).
    pub low_utilization: Option<u32>,
    /// `scheduling.overCommitDuration`.
    pub over_commit_duration: Option<Duration>,
    /// `scheduling.highVmCount`.
    pub high_vm_count: Option<u32>,
    /// `scheduling.migrationThreshold`.
    pub migration_threshold: Option<u32>,
    /// `scheduling.spmVmGrace`.
    pub spm_vm_grace: Option<u32>,
    /// `scheduling.maxFreeMemoryForOverUtilized` (bytes).
    pub max_free_memory_for_over_utilized: Option<u64>,
    /// `scheduling.minFreeMemoryForUnderUtilized` (bytes).
    pub min_free_memory_for_under_utilized: Option<u64>,
    /// `scheduling.balancing.enabled`.
    pub balancing_enabled: Option<bool>,
    /// `scheduling.balancing.interval`.
    pub balancing_interval: Option<Duration>,
    /// Per-VM cooldown after an automatic move.
    pub vm_cooldown: Option<Duration>,
    /// Minimum improvement of a balancing move (percentage points).
    pub improvement_margin: Option<f64>,
    /// Automatic moves allowed per VM per budget window.
    pub moves_per_vm_per_window: Option<u32>,
    /// The budget window.
    pub move_budget_window: Option<Duration>,
    /// `resilience.policy`.
    pub resilience: Option<ResiliencePolicy>,
    /// `resilience.fenceAfter`.
    pub fence_after: Option<Duration>,
    /// `resilience.evacuateAfter`.
    pub evacuate_after: Option<Duration>,
    /// `allowUnsafe`.
    pub allow_unsafe: Option<bool>,
}

/// Where an effective policy came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PolicySource {
    /// No policy matched: the built-in defaults.
    #[default]
    Defaults,
    /// The named `MigrationPolicy`.
    Named(String),
}

/// Convergence settings of a migration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvergenceConfig {
    /// The mode.
    pub mode: ConvergenceMode,
    /// The downtime the guest may be paused for at switchover.
    pub downtime_limit: Duration,
    /// Allowed duration per GiB of guest memory.
    pub completion_timeout_per_gib: Duration,
    /// Longest time without progress before giving up.
    pub progress_timeout: Duration,
}

/// Concurrency limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Migrations in flight in a cluster.
    pub per_cluster: u32,
    /// Migrations leaving one host.
    pub outbound_per_host: u32,
    /// Migrations arriving at one host.
    pub inbound_per_host: u32,
}

/// Automatic balancing and its guards against storms and flapping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalancingParams {
    /// Whether the balancer proposes moves at all.
    pub enabled: bool,
    /// At most one move per source host per interval.
    pub interval: Duration,
    /// A VM moved automatically is not moved again within this time.
    pub vm_cooldown: Duration,
    /// A move must improve the spread by more than this (percentage points
    /// of CPU load; VM counts for `VmEvenlyDistributed` use
    /// `migration_threshold`).
    pub improvement_margin: f64,
    /// Automatic moves allowed per VM per window.
    pub moves_per_vm_per_window: u32,
    /// The window of the move budget.
    pub move_budget_window: Duration,
}

/// Scheduling policy and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulingParams {
    /// Which policy.
    pub policy: SchedulingPolicyKind,
    /// CPU load (%) over which a host is over-utilised.
    pub high_utilization: u32,
    /// CPU load (%) under which a host is under-utilised.
    pub low_utilization: u32,
    /// How long a host must stay over/under a threshold to count as such.
    pub over_commit_duration: Duration,
    /// `VmEvenlyDistributed`: VM count over which a host is overloaded.
    pub high_vm_count: u32,
    /// `VmEvenlyDistributed`: difference in VM counts needed to move.
    pub migration_threshold: u32,
    /// `VmEvenlyDistributed`: VMs fewer on the control host.
    pub spm_vm_grace: u32,
    /// A host with less free memory than this is over-utilised.
    pub max_free_memory_for_over_utilized: Option<u64>,
    /// A host with more free memory than this is under-utilised.
    pub min_free_memory_for_under_utilized: Option<u64>,
    /// Automatic balancing.
    pub balancing: BalancingParams,
}

/// What to do with a failed host's VMs, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resilience {
    /// Which VMs are rebuilt.
    pub policy: ResiliencePolicy,
    /// The agent fences itself after this long without a Lease renewal.
    pub fence_after: Duration,
    /// The controller evacuates after this long (strictly longer).
    pub evacuate_after: Duration,
}

/// A policy with every field resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectivePolicy {
    /// Where it came from.
    pub source: PolicySource,
    /// Convergence.
    pub convergence: ConvergenceConfig,
    /// Bandwidth limit.
    pub bandwidth: Bandwidth,
    /// Concurrency limits.
    pub limits: Limits,
    /// Scheduling.
    pub scheduling: SchedulingParams,
    /// Resilience.
    pub resilience: Resilience,
    /// Migrate VMs whose disk cache is not `none`.
    pub allow_unsafe: bool,
}

/// A policy that cannot be resolved, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PolicyError {
    /// A percentage outside 0..=100.
    #[error("scheduling.{field} is {value}%, it must be between 0 and 100")]
    PercentOutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u32,
    },
    /// `lowUtilization` must be below `highUtilization`.
    #[error(
        "scheduling.lowUtilization ({low}%) must be below scheduling.highUtilization ({high}%)"
    )]
    LowNotBelowHigh {
        /// lowUtilization.
        low: u32,
        /// highUtilization.
        high: u32,
    },
    /// A limit or count that must be at least 1.
    #[error("{field} is 0, it must be at least 1")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// `evacuateAfter` must be strictly longer than `fenceAfter`, or a VM
    /// could run on two hosts.
    #[error(
        "resilience.evacuateAfter ({evacuate:?}) must be longer than resilience.fenceAfter ({fence:?}): a host must have stopped its VMs before they are rebuilt elsewhere"
    )]
    EvacuateNotAfterFence {
        /// fenceAfter.
        fence: Duration,
        /// evacuateAfter.
        evacuate: Duration,
    },
    /// A negative or non-finite improvement margin.
    #[error("balancing improvement margin {0} must be a finite number >= 0")]
    BadMargin(f64),
}

impl PolicyError {
    /// A stable reason string for conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PercentOutOfRange { .. } => "PercentOutOfRange",
            Self::LowNotBelowHigh { .. } => "LowUtilizationNotBelowHigh",
            Self::Zero { .. } => "ZeroValue",
            Self::EvacuateNotAfterFence { .. } => "EvacuateNotAfterFence",
            Self::BadMargin(_) => "BadImprovementMargin",
        }
    }
}

impl Default for EffectivePolicy {
    fn default() -> Self {
        Self::resolve(PolicySource::Defaults, &PolicyOverrides::default())
            .expect("the built-in defaults satisfy every rule") // checked by a test
    }
}

impl EffectivePolicy {
    /// Fill every missing field with its default and check the rules.
    pub fn resolve(source: PolicySource, o: &PolicyOverrides) -> Result<Self, PolicyError> {
        use defaults as d;
        let high = o.high_utilization.unwrap_or(d::HIGH_UTILIZATION);
        let low = o.low_utilization.unwrap_or(d::LOW_UTILIZATION);
        for (field, value) in [("highUtilization", high), ("lowUtilization", low)] {
            if value > 100 {
                return Err(PolicyError::PercentOutOfRange { field, value });
            }
        }
        if low >= high {
            return Err(PolicyError::LowNotBelowHigh { low, high });
        }
        let limits = Limits {
            per_cluster: o
                .parallel_migrations_per_cluster
                .unwrap_or(d::PARALLEL_MIGRATIONS_PER_CLUSTER),
            outbound_per_host: o
                .parallel_outbound_per_host
                .unwrap_or(d::PARALLEL_OUTBOUND_PER_HOST),
            inbound_per_host: o
                .parallel_inbound_per_host
                .unwrap_or(d::PARALLEL_INBOUND_PER_HOST),
        };
        for (field, value) in [
            ("limits.parallelMigrationsPerCluster", limits.per_cluster),
            ("limits.parallelOutboundPerHost", limits.outbound_per_host),
            ("limits.parallelInboundPerHost", limits.inbound_per_host),
            (
                "scheduling.highVmCount",
                o.high_vm_count.unwrap_or(d::HIGH_VM_COUNT),
            ),
        ] {
            if value == 0 {
                return Err(PolicyError::Zero { field });
            }
        }
        let zero_durations = [
            ("downtimeLimit", o.downtime_limit),
            ("completionTimeoutPerGiB", o.completion_timeout_per_gib),
            ("progressTimeout", o.progress_timeout),
            ("scheduling.balancing.interval", o.balancing_interval),
        ];
        for (field, value) in zero_durations {
            if value == Some(Duration::ZERO) {
                return Err(PolicyError::Zero { field });
            }
        }
        if let Bandwidth::Custom { bytes_per_sec: 0 } = o.bandwidth.unwrap_or_default() {
            return Err(PolicyError::Zero {
                field: "bandwidth.limit",
            });
        }
        let fence_after = o.fence_after.unwrap_or(d::FENCE_AFTER);
        let evacuate_after = o.evacuate_after.unwrap_or(d::EVACUATE_AFTER);
        if evacuate_after <= fence_after {
            return Err(PolicyError::EvacuateNotAfterFence {
                fence: fence_after,
                evacuate: evacuate_after,
            });
        }
        let margin = o.improvement_margin.unwrap_or(d::IMPROVEMENT_MARGIN);
        if !margin.is_finite() || margin < 0.0 {
            return Err(PolicyError::BadMargin(margin));
        }
        Ok(Self {
            source,
            convergence: ConvergenceConfig {
                mode: o.convergence.unwrap_or_default(),
                downtime_limit: o.downtime_limit.unwrap_or(d::DOWNTIME_LIMIT),
                completion_timeout_per_gib: o
                    .completion_timeout_per_gib
                    .unwrap_or(d::COMPLETION_TIMEOUT_PER_GIB),
                progress_timeout: o.progress_timeout.unwrap_or(d::PROGRESS_TIMEOUT),
            },
            bandwidth: o.bandwidth.unwrap_or_default(),
            limits,
            scheduling: SchedulingParams {
                policy: o.scheduling_policy.unwrap_or_default(),
                high_utilization: high,
                low_utilization: low,
                over_commit_duration: o.over_commit_duration.unwrap_or(d::OVER_COMMIT_DURATION),
                high_vm_count: o.high_vm_count.unwrap_or(d::HIGH_VM_COUNT),
                migration_threshold: o.migration_threshold.unwrap_or(d::MIGRATION_THRESHOLD),
                spm_vm_grace: o.spm_vm_grace.unwrap_or(d::SPM_VM_GRACE),
                max_free_memory_for_over_utilized: o.max_free_memory_for_over_utilized,
                min_free_memory_for_under_utilized: o.min_free_memory_for_under_utilized,
                balancing: BalancingParams {
                    enabled: o.balancing_enabled.unwrap_or(false),
                    interval: o.balancing_interval.unwrap_or(d::BALANCING_INTERVAL),
                    vm_cooldown: o.vm_cooldown.unwrap_or(d::VM_COOLDOWN),
                    improvement_margin: margin,
                    moves_per_vm_per_window: o
                        .moves_per_vm_per_window
                        .unwrap_or(d::MOVES_PER_VM_PER_WINDOW),
                    move_budget_window: o.move_budget_window.unwrap_or(d::MOVE_BUDGET_WINDOW),
                },
            },
            resilience: Resilience {
                policy: o.resilience.unwrap_or_default(),
                fence_after,
                evacuate_after,
            },
            allow_unsafe: o.allow_unsafe.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests;
