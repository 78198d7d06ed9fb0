//! Why a host was refused: a stable reason and a sentence.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::snapshot::HostPhase;
use crate::core::migration::FailureReason;
use crate::core::time::MIB;

/// Why a host cannot take a VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// The VM already runs there: a migration never targets its source.
    IsSource,
    /// The host is not `Active`.
    NotActive {
        /// Its phase.
        phase: HostPhase,
    },
    /// The host is cordoned (maintenance or by hand).
    Unschedulable,
    /// Too many incoming migrations failed on this host lately.
    Quarantined {
        /// How long the quarantine still lasts.
        remaining: Duration,
        /// Failed incoming migrations that started it.
        failures: u32,
        /// The last failure's reason.
        last: FailureReason,
    },
    /// The host is in another cluster.
    WrongCluster {
        /// The host's cluster.
        host: Arc<str>,
        /// The VM's.
        required: Arc<str>,
    },
    /// The host lacks a label of the VM's `hostSelector`.
    HostSelector {
        /// Label key.
        key: String,
        /// Required value.
        want: String,
        /// The host's value.
        got: Option<String>,
    },
    /// The VM is pinned to another host.
    NotPinned {
        /// The pinned host.
        pinned: String,
    },
    /// The host's CPU model differs.
    CpuModel {
        /// The host's model.
        host: String,
        /// The model required.
        required: String,
    },
    /// The host lacks CPU features the VM needs.
    MissingCpuFeatures {
        /// The missing flags.
        missing: Vec<String>,
    },
    /// Not enough free memory.
    Memory {
        /// Free bytes.
        free: u64,
        /// Needed bytes.
        needed: u64,
    },
    /// Fewer CPUs than the VM has vCPUs.
    Cpus {
        /// The host's CPUs.
        host: u32,
        /// The VM's vCPUs.
        needed: u32,
    },
    /// Other members of the VM's affinity group run elsewhere.
    Affinity {
        /// The group.
        group: String,
        /// Where its members are.
        hosts: Vec<String>,
    },
    /// A member of the VM's anti-affinity group runs (or arrives) here.
    AntiAffinity {
        /// The group.
        group: String,
        /// The member.
        vm: String,
    },
    /// The host already receives as many migrations as allowed.
    InboundLimit {
        /// Arriving now.
        in_flight: u32,
        /// `parallelInboundPerHost`.
        limit: u32,
    },
    /// CPU over `highUtilization` for the whole `overCommitDuration`.
    Overloaded {
        /// Current load (%).
        percent: f64,
        /// The threshold (%).
        threshold: u32,
        /// The duration.
        duration: Duration,
    },
    /// `PowerSaving`: the VM would push the host over `highUtilization`.
    WouldExceedHighUtilization {
        /// Projected load (%).
        projected: f64,
        /// The threshold (%).
        threshold: u32,
    },
    /// Free memory after placement would fall under
    /// `maxFreeMemoryForOverUtilized`.
    MemoryOverUtilized {
        /// Free bytes after placement.
        free_after: u64,
        /// The threshold.
        threshold: u64,
    },
    /// `InClusterUpgrade`: the host runs an older version than the source.
    OlderVersion {
        /// The host's version.
        host: String,
        /// The source's version.
        source: String,
    },
}

impl Rejection {
    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::IsSource => "IsSource",
            Self::NotActive { .. } => "HostNotActive",
            Self::Unschedulable => "HostUnschedulable",
            Self::Quarantined { .. } => "HostQuarantined",
            Self::WrongCluster { .. } => "WrongCluster",
            Self::HostSelector { .. } => "HostSelectorMismatch",
            Self::NotPinned { .. } => "PinnedToOtherHost",
            Self::CpuModel { .. } => "CpuModelMismatch",
            Self::MissingCpuFeatures { .. } => "MissingCpuFeatures",
            Self::Memory { .. } => "InsufficientMemory",
            Self::Cpus { .. } => "InsufficientCpus",
            Self::Affinity { .. } => "AffinityGroupElsewhere",
            Self::AntiAffinity { .. } => "AntiAffinityConflict",
            Self::InboundLimit { .. } => "InboundLimitReached",
            Self::Overloaded { .. } => "HostOverloaded",
            Self::WouldExceedHighUtilization { .. } => "WouldExceedHighUtilization",
            Self::MemoryOverUtilized { .. } => "MemoryOverUtilized",
            Self::OlderVersion { .. } => "OlderVersion",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IsSource => write!(f, "the VM already runs on this host"),
            Self::NotActive { phase } => write!(f, "host is {}, not Active", phase.as_str()),
            Self::Unschedulable => write!(f, "host is unschedulable (cordoned or in maintenance)"),
            Self::Quarantined {
                remaining,
                failures,
                last,
            } => write!(
                f,
                "host is quarantined for another {} s: {failures} incoming migrations failed on it (last: {})",
                remaining.as_secs(),
                last.as_str()
            ),
            Self::WrongCluster { host, required } => {
                write!(
                    f,
                    "host is in cluster {host:?}, the VM must stay in {required:?}"
                )
            }
            Self::HostSelector {
                key,
                want,
                got: Some(got),
            } => {
                write!(f, "host label {key}={got:?}, hostSelector wants {want:?}")
            }
            Self::HostSelector {
                key,
                want,
                got: None,
            } => {
                write!(f, "host has no label {key}, hostSelector wants {want:?}")
            }
            Self::NotPinned { pinned } => write!(f, "the VM is pinned to host {pinned:?}"),
            Self::CpuModel { host, required } => {
                write!(f, "host CPU model is {host:?}, the VM needs {required:?}")
            }
            Self::MissingCpuFeatures { missing } => {
                write!(f, "host CPU lacks {}", missing.join(", "))
            }
            Self::Memory { free, needed } => {
                write!(
                    f,
                    "{} MiB free, the VM needs {} MiB",
                    free / MIB,
                    needed / MIB
                )
            }
            Self::Cpus { host, needed } => {
                write!(f, "host has {host} CPUs, the VM has {needed} vCPUs")
            }
            Self::Affinity { group, hosts } => {
                write!(f, "affinity group {group:?} runs on {}", hosts.join(", "))
            }
            Self::AntiAffinity { group, vm } => {
                write!(
                    f,
                    "anti-affinity group {group:?}: {vm} runs or arrives here"
                )
            }
            Self::InboundLimit { in_flight, limit } => {
                write!(
                    f,
                    "{in_flight} migrations already arriving (parallelInboundPerHost {limit})"
                )
            }
            Self::Overloaded {
                percent,
                threshold,
                duration,
            } => write!(
                f,
                "CPU {percent:.0}% has been over {threshold}% for {}s (overCommitDuration)",
                duration.as_secs()
            ),
            Self::WouldExceedHighUtilization {
                projected,
                threshold,
            } => {
                write!(
                    f,
                    "the VM would bring CPU to {projected:.0}%, over highUtilization {threshold}%"
                )
            }
            Self::MemoryOverUtilized {
                free_after,
                threshold,
            } => write!(
                f,
                "{} MiB would stay free, under maxFreeMemoryForOverUtilized {} MiB",
                free_after / MIB,
                threshold / MIB
            ),
            Self::OlderVersion { host, source } => {
                write!(
                    f,
                    "host runs version {host}, older than the source's {source} (InClusterUpgrade)"
                )
            }
        }
    }
}
