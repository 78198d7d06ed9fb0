//! Admission: which queued migrations may start now, under the limits.
//!
//! ```text
//!  queue ──sort──► evacuations, then user and maintenance moves, then balancing moves;
//!                  within a class: priority (higher first), then FIFO (queued_at),
//!                  then the largest transfer first (size), then name
//!        ──walk──► not yet scheduled (a batch member still Pending/Scheduling)?
//!                      ──► holds back the smaller members of its batch
//!                  for each: VM already moving? a larger member of its batch not yet
//!                  scheduled? cluster full? source outbound full? target inbound full?
//!                      ── no ──► admitted (counts taken)
//!                      └ yes ─► waits, with the first reason that holds it
//! ```
//!
//! Largest first: a drain's Migrations enter the queue together (its
//! `queued_at` is the drain's start), and starting the longest transfers
//! first is LPT list scheduling, whose makespan is within 4/3 of the
//! optimum; an arbitrary order can leave a 2 GiB VM to start last and run
//! alone. The batch hold keeps that order while the batch's Migrations are
//! still being scheduled (a few reconciles each): otherwise whichever
//! reaches `Queued` first would take the free slots.
//!
//! The walk is work-conserving: a migration held by a full host does not
//! hold back a later one that needs only free hosts (a drain keeps every
//! slot busy). FIFO still holds for migrations that compete for the same
//! slots: a later one never passes an earlier one that needs the same hosts.
//! Evacuations rebuild the VM from its definition (no stream leaves the dead
//! source), so they do not count against the source's outbound limit.
//! At most one migration per VM is in flight.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::core::policy::Limits;
use crate::core::time::Timestamp;

/// Who asked for a migration: decides its class in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// Rebuild of a failed host's VM: the VM is down, it goes first.
    Evacuation,
    /// A user's explicit migration.
    User,
    /// Created by a HostMaintenance (a user's drain).
    Maintenance,
    /// Automatic balancing: last.
    Balancing,
}

impl Origin {
    /// The class rank: lower goes first. User and maintenance moves share a
    /// class (both are a person's explicit request).
    fn class(self) -> u8 {
        match self {
            Self::Evacuation => 0,
            Self::User | Self::Maintenance => 1,
            Self::Balancing => 2,
        }
    }
}

/// A migration waiting in `Queued`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMigration {
    /// `namespace/name` of the Migration.
    pub name: String,
    /// The VM.
    pub vm: String,
    /// Cluster (of the source host).
    pub cluster: String,
    /// Source host.
    pub source: String,
    /// Target host.
    pub target: String,
    /// Who asked.
    pub origin: Origin,
    /// Higher first within a class.
    pub priority: i32,
    /// When it entered the queue (creation time; a drain's start for the
    /// drain's Migrations).
    pub queued_at: Timestamp,
    /// Expected transfer work (the VM's memory, bytes): larger first among
    /// equals.
    pub size: u64,
    /// The batch it belongs to (a drain), whose members start largest first.
    pub batch: Option<String>,
    /// False for a batch member not yet `Queued` (still being scheduled): it
    /// is not admitted, and holds back the smaller members of its batch.
    pub ready: bool,
}

/// A migration holding a slot (phases `Scheduled` to `Completing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveMigration {
    /// Its name.
    pub name: String,
    /// The VM.
    pub vm: String,
    /// Cluster.
    pub cluster: String,
    /// Source host.
    pub source: String,
    /// Target host.
    pub target: String,
    /// Evacuations do not use the source's outbound slots.
    pub origin: Origin,
}

/// Why a migration waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// Another migration of the same VM is in flight or ahead in the queue.
    VmBusy {
        /// That migration.
        other: String,
    },
    /// A larger member of the same batch is still being scheduled.
    BatchAhead {
        /// The batch (the drain).
        batch: String,
        /// The larger member.
        other: String,
    },
    /// `parallelMigrationsPerCluster` reached.
    ClusterLimit {
        /// The cluster.
        cluster: String,
        /// The limit.
        limit: u32,
    },
    /// `parallelOutboundPerHost` reached on the source.
    OutboundLimit {
        /// The source.
        host: String,
        /// The limit.
        limit: u32,
    },
    /// `parallelInboundPerHost` reached on the target.
    InboundLimit {
        /// The target.
        host: String,
        /// The limit.
        limit: u32,
    },
}

impl WaitReason {
    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::VmBusy { .. } => "VmBusy",
            Self::BatchAhead { .. } => "BatchAhead",
            Self::ClusterLimit { .. } => "ClusterLimit",
            Self::OutboundLimit { .. } => "OutboundLimit",
            Self::InboundLimit { .. } => "InboundLimit",
        }
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VmBusy { other } => write!(f, "the VM is already being moved by {other}"),
            Self::BatchAhead { batch, other } => write!(
                f,
                "{other}, a larger VM of {batch}, is still being scheduled and starts first"
            ),
            Self::ClusterLimit { cluster, limit } => {
                write!(
                    f,
                    "cluster {cluster} has {limit} migrations in flight (parallelMigrationsPerCluster)"
                )
            }
            Self::OutboundLimit { host, limit } => {
                write!(
                    f,
                    "{host} already sends {limit} migrations (parallelOutboundPerHost)"
                )
            }
            Self::InboundLimit { host, limit } => {
                write!(
                    f,
                    "{host} already receives {limit} migrations (parallelInboundPerHost)"
                )
            }
        }
    }
}

/// One waiting migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The Migration.
    pub name: String,
    /// Its place among the waiting (1 = next).
    pub position: usize,
    /// What holds it.
    pub reason: WaitReason,
}

/// The queue's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdmissionPlan {
    /// May start now, in queue order.
    pub admitted: Vec<String>,
    /// Must wait, in queue order.
    pub waiting: Vec<Waiting>,
}

/// Decide which queued migrations start now (see the module documentation).
pub fn admit(
    queue: &[QueuedMigration],
    active: &[ActiveMigration],
    limits: &Limits,
) -> AdmissionPlan {
    let mut order: Vec<&QueuedMigration> = queue.iter().collect();
    order.sort_by(|a, b| {
        (
            a.origin.class(),
            -i64::from(a.priority),
            a.queued_at,
            std::cmp::Reverse(a.size),
            &a.name,
        )
            .cmp(&(
                b.origin.class(),
                -i64::from(b.priority),
                b.queued_at,
                std::cmp::Reverse(b.size),
                &b.name,
            ))
    });
    // Batches with a member ahead still being scheduled: batch → that member.
    let mut unready: HashMap<&str, &str> = HashMap::new();
    let mut cluster: HashMap<&str, u32> = HashMap::new();
    let mut outbound: HashMap<&str, u32> = HashMap::new();
    let mut inbound: HashMap<&str, u32> = HashMap::new();
    let mut vm_owner: HashMap<&str, &str> = HashMap::new();
    for m in active {
        *cluster.entry(&m.cluster).or_default() += 1;
        if m.origin != Origin::Evacuation {
            *outbound.entry(&m.source).or_default() += 1;
        }
        *inbound.entry(&m.target).or_default() += 1;
        vm_owner.insert(&m.vm, &m.name);
    }
    let mut plan = AdmissionPlan::default();
    let mut seen: HashSet<&str> = HashSet::new();
    for m in order {
        if !seen.insert(&m.name) {
            continue;
        }
        if !m.ready {
            if let Some(b) = &m.batch {
                unready.entry(b).or_insert(&m.name);
            }
            continue;
        }
        let ahead = m
            .batch
            .as_deref()
            .and_then(|b| unready.get(b).map(|other| (b, *other)));
        let held = if let Some(other) = vm_owner.get(m.vm.as_str()) {
            Some(WaitReason::VmBusy {
                other: other.to_string(),
            })
        } else if let Some((batch, other)) = ahead {
            Some(WaitReason::BatchAhead {
                batch: batch.to_string(),
                other: other.to_string(),
            })
        } else if cluster.get(m.cluster.as_str()).copied().unwrap_or(0) >= limits.per_cluster {
            Some(WaitReason::ClusterLimit {
                cluster: m.cluster.clone(),
                limit: limits.per_cluster,
            })
        } else if m.origin != Origin::Evacuation
            && outbound.get(m.source.as_str()).copied().unwrap_or(0) >= limits.outbound_per_host
        {
            Some(WaitReason::OutboundLimit {
                host: m.source.clone(),
                limit: limits.outbound_per_host,
            })
        } else if inbound.get(m.target.as_str()).copied().unwrap_or(0) >= limits.inbound_per_host {
            Some(WaitReason::InboundLimit {
                host: m.target.clone(),
                limit: limits.inbound_per_host,
            })
        } else {
            None
        };
        // Whatever happens, the first migration of a VM in the queue owns it:
        // a later one for the same VM waits behind it.
        vm_owner.entry(&m.vm).or_insert(&m.name);
        match held {
            Some(reason) => {
                let position = plan.waiting.len() + 1;
                plan.waiting.push(Waiting {
                    name: m.name.clone(),
                    position,
                    reason,
                });
            }
            None => {
                *cluster.entry(&m.cluster).or_default() += 1;
                if m.origin != Origin::Evacuation {
                    *outbound.entry(&m.source).or_default() += 1;
                }
                *inbound.entry(&m.target).or_default() += 1;
                plan.admitted.push(m.name.clone());
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests;
