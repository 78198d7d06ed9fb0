//! Admission: which migrations may take their next step now, under the
//! limits.
//!
//! A migration is admitted twice: to *prepare* its target (Queued →
//! Scheduled) and to *transfer* (PreparingTarget with the target ready →
//! Running). The limits count transfers — migrations whose stream is or
//! may be flowing ([`Stage::Transferring`]) — and, separately, as many
//! preparations made ahead of them ([`Stage::Preparing`]): while a host
//! sends its `parallelOutboundPerHost` streams, as many more targets may be
//! getting ready, so the next transfer starts the moment one ends. A stream
//! ends when the source agent reports it (`SwitchedOver`, `Aborted`,
//! `Failed`): what follows (the commit of the VM's host) holds only the VM.
//!
//! ```text
//!  asks ──sort──► evacuations, then user and maintenance moves, then balancing moves;
//!                 within a class: priority (higher first), then FIFO (queued_at),
//!                 then the largest transfer first (size), then name
//!       ──walk──► not ready (a batch member still being scheduled, or preparing)?
//!                     ──► holds back the smaller members of its batch at that step
//!                 for each: VM held by another migration? a larger member of its batch
//!                 not ready for this step? cluster full? source outbound full? target
//!                 inbound full? (each counted for the step asked: preparations or transfers)
//!                     ── no ──► admitted (counts taken)
//!                     └ yes ─► waits, with the first reason that holds it
//! ```
//!
//! Largest first: a drain's Migrations enter the queue together (its
//! `queued_at` is the drain's start), and starting the longest transfers
//! first is LPT list scheduling, whose makespan is within 4/3 of the
//! optimum; an arbitrary order can leave a 2 GiB VM to start last and run
//! alone. The batch hold keeps that order at each step: a member is not
//! prepared before a larger one still being scheduled, and does not start
//! its transfer before a larger one still preparing its target (a few
//! reconciles, or one target's start) — otherwise whichever is ready first
//! would take the free slots.
//!
//! The walk is work-conserving: a migration held by a full host does not
//! hold back a later one that needs only free hosts (a drain keeps every
//! slot busy). FIFO still holds for migrations that compete for the same
//! slots: a later one never passes an earlier one that needs the same hosts.
//! Evacuations rebuild the VM from its definition (no stream leaves the dead
//! source, nothing is prepared): they ask for a transfer slot at once, hold
//! it until they end, and do not count against the source's outbound limit.
//! At most one migration per VM is in flight.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::core::migration::Phase;
use crate::core::policy::Limits;
use crate::core::time::Timestamp;

/// What an admitted migration holds, in lifecycle order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Its target is being prepared ahead of the transfer (`Scheduled`,
    /// `PreparingTarget`): a preparation slot.
    Preparing,
    /// Its stream is or may be flowing (`Running`, `PostCopy` until the
    /// source reports the end; an evacuation from its admission to its
    /// end): a transfer slot, what the limits protect.
    Transferring,
    /// The stream has ended; the move is being recorded (`Completing`, or
    /// the source's final report not yet acted on): it holds only its VM.
    Finishing,
}

impl Stage {
    /// What a migration in `phase` holds; `stream_ended` is the source
    /// agent's final report (`SwitchedOver`, `Aborted`, `Failed`).
    pub fn of(phase: Phase, evacuation: bool, stream_ended: bool) -> Option<Stage> {
        use Phase as P;
        match phase {
            P::Scheduled | P::Completing if evacuation => Some(Stage::Transferring),
            P::Scheduled | P::PreparingTarget => Some(Stage::Preparing),
            P::Running | P::PostCopy if stream_ended => Some(Stage::Finishing),
            P::Running | P::PostCopy => Some(Stage::Transferring),
            P::Completing => Some(Stage::Finishing),
            P::Pending | P::Scheduling | P::Queued | P::Succeeded | P::Failed | P::Cancelled => {
                None
            }
        }
    }

    /// The slot it holds, if any.
    pub fn slot(self) -> Option<Step> {
        match self {
            Stage::Preparing => Some(Step::Prepare),
            Stage::Transferring => Some(Step::Transfer),
            Stage::Finishing => None,
        }
    }
}

/// The slot a transition `from → to` gives up, if any: the moment to look
/// at the queue again (a transfer's end, a prepared target starting its
/// transfer, a migration failing or going back to scheduling).
pub fn frees(from: Phase, to: Phase, evacuation: bool) -> Option<Step> {
    let before = Stage::of(from, evacuation, false).and_then(Stage::slot);
    let after = Stage::of(to, evacuation, false).and_then(Stage::slot);
    before.filter(|b| Some(*b) != after)
}

/// Whether the transition `from → to` of a batch member lets the smaller
/// members of its batch go (it is no longer being scheduled: prepared,
/// queued or failed), so the queue should look again.
pub fn releases_batch(from: Phase, to: Phase) -> bool {
    let scheduling = |p: Phase| matches!(p, Phase::Pending | Phase::Scheduling);
    scheduling(from) && !scheduling(to)
}

/// A step a migration asks to be admitted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// Prepare the target ahead of the transfer.
    Prepare,
    /// Transfer (for an evacuation: rebuild on the target).
    Transfer,
}

impl Step {
    fn noun(self) -> &'static str {
        match self {
            Step::Prepare => "targets being prepared",
            Step::Transfer => "transfers",
        }
    }
}

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

/// A migration asking for its next step: `Queued` asks to prepare (an
/// evacuation, to transfer); `PreparingTarget` asks to transfer.
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
    /// The step asked for.
    pub wants: Step,
    /// False for a batch member not ready to ask yet — still being
    /// scheduled (`wants` Prepare), or still preparing its target (`wants`
    /// Transfer): it is not admitted, and holds back the
    /// smaller members of its batch at that step (one still being scheduled
    /// at both steps).
    pub ready: bool,
}

/// An admitted migration (phases `Scheduled` to `Completing`), with what it
/// holds. A preparing migration that asks to transfer is also in the queue.
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
    /// What it holds.
    pub stage: Stage,
}

/// Why a migration waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// Another migration of the same VM is in flight or ahead in the queue.
    VmBusy {
        /// That migration.
        other: String,
    },
    /// A larger member of the same batch is not ready for this step yet.
    BatchAhead {
        /// The batch (the drain).
        batch: String,
        /// The larger member.
        other: String,
    },
    /// `parallelMigrationsPerCluster` reached for this step.
    ClusterLimit {
        /// The cluster.
        cluster: String,
        /// The limit.
        limit: u32,
        /// The step counted.
        step: Step,
    },
    /// `parallelOutboundPerHost` reached on the source for this step.
    OutboundLimit {
        /// The source.
        host: String,
        /// The limit.
        limit: u32,
        /// The step counted.
        step: Step,
    },
    /// `parallelInboundPerHost` reached on the target for this step.
    InboundLimit {
        /// The target.
        host: String,
        /// The limit.
        limit: u32,
        /// The step counted.
        step: Step,
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
                "{other}, a larger VM of {batch}, is not ready for this step yet and goes first"
            ),
            Self::ClusterLimit {
                cluster,
                limit,
                step,
            } => write!(
                f,
                "cluster {cluster} has {limit} {} (parallelMigrationsPerCluster)",
                step.noun()
            ),
            Self::OutboundLimit { host, limit, step } => write!(
                f,
                "{host} has {limit} outbound {} (parallelOutboundPerHost)",
                step.noun()
            ),
            Self::InboundLimit { host, limit, step } => write!(
                f,
                "{host} has {limit} inbound {} (parallelInboundPerHost)",
                step.noun()
            ),
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

/// Slots taken at one step, by cluster, source and target.
#[derive(Default)]
struct Taken<'a> {
    cluster: HashMap<&'a str, u32>,
    outbound: HashMap<&'a str, u32>,
    inbound: HashMap<&'a str, u32>,
}

impl<'a> Taken<'a> {
    fn take(&mut self, cluster: &'a str, source: &'a str, target: &'a str, origin: Origin) {
        *self.cluster.entry(cluster).or_default() += 1;
        if origin != Origin::Evacuation {
            *self.outbound.entry(source).or_default() += 1;
        }
        *self.inbound.entry(target).or_default() += 1;
    }

    /// Why `m` may not take one more, if so.
    fn full(&self, m: &QueuedMigration, limits: &Limits) -> Option<WaitReason> {
        let step = m.wants;
        let count = |map: &HashMap<&str, u32>, key: &str| map.get(key).copied().unwrap_or(0);
        if count(&self.cluster, &m.cluster) >= limits.per_cluster {
            Some(WaitReason::ClusterLimit {
                cluster: m.cluster.clone(),
                limit: limits.per_cluster,
                step,
            })
        } else if m.origin != Origin::Evacuation
            && count(&self.outbound, &m.source) >= limits.outbound_per_host
        {
            Some(WaitReason::OutboundLimit {
                host: m.source.clone(),
                limit: limits.outbound_per_host,
                step,
            })
        } else if count(&self.inbound, &m.target) >= limits.inbound_per_host {
            Some(WaitReason::InboundLimit {
                host: m.target.clone(),
                limit: limits.inbound_per_host,
                step,
            })
        } else {
            None
        }
    }
}

/// Decide which migrations take their next step now (see the module
/// documentation).
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
    // Batches with a larger member not ready for a step: batch → that member.
    let mut unready_prepare: HashMap<&str, &str> = HashMap::new();
    let mut unready_transfer: HashMap<&str, &str> = HashMap::new();
    let mut preparing = Taken::default();
    let mut transferring = Taken::default();
    let mut vm_owner: HashMap<&str, &str> = HashMap::new();
    for m in active {
        match m.stage.slot() {
            Some(Step::Prepare) => preparing.take(&m.cluster, &m.source, &m.target, m.origin),
            Some(Step::Transfer) => transferring.take(&m.cluster, &m.source, &m.target, m.origin),
            None => {}
        }
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
                // Still being scheduled: behind it at both steps.
                unready_transfer.entry(b).or_insert(&m.name);
                if m.wants == Step::Prepare {
                    unready_prepare.entry(b).or_insert(&m.name);
                }
            }
            continue;
        }
        let (unready, taken) = match m.wants {
            Step::Prepare => (&unready_prepare, &mut preparing),
            Step::Transfer => (&unready_transfer, &mut transferring),
        };
        let ahead = m
            .batch
            .as_deref()
            .and_then(|b| unready.get(b).map(|other| (b, *other)));
        // A preparing migration asking to transfer owns its VM already.
        let held = if let Some(other) = vm_owner.get(m.vm.as_str()).filter(|o| **o != m.name) {
            Some(WaitReason::VmBusy {
                other: other.to_string(),
            })
        } else if let Some((batch, other)) = ahead {
            Some(WaitReason::BatchAhead {
                batch: batch.to_string(),
                other: other.to_string(),
            })
        } else {
            taken.full(m, limits)
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
                taken.take(&m.cluster, &m.source, &m.target, m.origin);
                plan.admitted.push(m.name.clone());
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests;
