//! Host maintenance: the drain plan, and retries of failed moves.
//!
//! [`plan`] answers "what happens if I drain this host?" (a `HostMaintenance`
//! with `dryRun: true` shows it in `status.plan`; a real drain follows the
//! same order and targets):
//!
//! ```text
//!  VMs on the host, largest memory first (longest transfers first keeps the
//!  makespan short: LPT list scheduling)
//!    │ quarantined ───────────────────────────► blocker
//!    │ not migratable ── nonMigratable: Stop ─► stopped
//!    │                └─ nonMigratable: Block ► blocker
//!    │ scheduler (or the given target), each placed VM reserving its target
//!    │   no host fits ─────────────────────────► blocker with the scheduler's summary
//!    ▼
//!  transfer time per VM: memory / (rate − dirty rate), the rate being the
//!  policy's bandwidth shared by the concurrent outbound streams
//!    ▼
//!  list-scheduling simulation under parallelOutboundPerHost,
//!  parallelMigrationsPerCluster and parallelInboundPerHost
//!    ▼
//!  start and end of each move, the makespan, and the ideal
//!  (total transfer time ÷ allowed concurrency) to compare it with
//! ```
//!
//! [`retry`] decides when a failed move is tried again (exponential back-off),
//! when it becomes a blocker, and when a VM that keeps failing is
//! quarantined; [`quarantine`] when a target host that keeps failing is
//! left out of scheduling for a while.

pub mod quarantine;
pub mod retry;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::time::Duration;

use thiserror::Error;

use crate::core::policy::{ConvergenceMode, EffectivePolicy};
use crate::core::scheduler::{InFlight, PlacementError, PlacementRequest, Snapshot, place};
use crate::core::time::{MIB, Timestamp};

pub use quarantine::{TargetFailure, blames_target, quarantined_hosts};
pub use retry::{Attempt, RetryDecision, RetryPolicy, next_attempt};

/// What to do with VMs that cannot live-migrate (`spec.nonMigratable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonMigratable {
    /// Leave them and report them as blockers (the host is not emptied).
    #[default]
    Block,
    /// Stop them so the host can be emptied.
    Stop,
}

/// The drain request.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainRequest<'a> {
    /// The host to empty.
    pub host: &'a str,
    /// Send every VM there instead of asking the scheduler.
    pub target: Option<&'a str>,
    /// Policy for VMs that cannot move live.
    pub non_migratable: NonMigratable,
    /// Recent dirty rate of each VM (bytes/s), where known.
    pub dirty_rates: &'a HashMap<String, u64>,
    /// Bandwidth available to the drain's outbound streams together
    /// (bytes/s): the migration network's speed, or the policy's limit
    /// times the concurrency.
    pub link_bandwidth: u64,
}

/// Why a VM will not leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// `migratable: false` and `nonMigratable: Block`.
    NotMigratable,
    /// Quarantined after repeated failures.
    Quarantined,
    /// The scheduler found no host.
    NoHostFits {
        /// The scheduler's summary.
        summary: String,
    },
}

impl Blocker {
    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotMigratable => "NotMigratable",
            Self::Quarantined => "Quarantined",
            Self::NoHostFits { .. } => "NoHostFits",
        }
    }

    /// For a person.
    pub fn message(&self) -> String {
        match self {
            Self::NotMigratable => "the VM is not migratable and nonMigratable is Block".into(),
            Self::Quarantined => "the VM is quarantined after repeated failed migrations".into(),
            Self::NoHostFits { summary } => summary.clone(),
        }
    }
}

/// What happens to one VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It moves.
    Migrate {
        /// Where.
        target: String,
        /// When it is expected to start, from the beginning of the drain.
        start: Duration,
        /// How long its transfer is expected to take.
        duration: Duration,
        /// A warning when it is not expected to converge by pre-copy.
        risk: Option<String>,
    },
    /// It is stopped (`nonMigratable: Stop`).
    Stop,
    /// A migration of it is already in flight (the drain waits for it).
    AlreadyMoving {
        /// Its target, once assigned.
        target: Option<String>,
    },
    /// It stays, and the host cannot be emptied.
    Blocked(Blocker),
}

/// One VM in the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanEntry {
    /// The VM.
    pub vm: String,
    /// Position in the drain order (1 = first).
    pub order: usize,
    /// Its memory (bytes).
    pub memory: u64,
    /// What happens to it.
    pub outcome: Outcome,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainPlan {
    /// Every VM of the host, in drain order.
    pub entries: Vec<PlanEntry>,
    /// Expected time until the last move ends.
    pub estimated_total: Duration,
    /// Total transfer time ÷ allowed concurrency: no schedule beats it.
    pub ideal: Duration,
    /// Moves allowed at once from this host.
    pub concurrency: u32,
}

impl DrainPlan {
    /// The blocked VMs.
    pub fn blockers(&self) -> impl Iterator<Item = (&str, &Blocker)> {
        self.entries.iter().filter_map(|e| match &e.outcome {
            Outcome::Blocked(b) => Some((e.vm.as_str(), b)),
            _ => None,
        })
    }
}

/// A drain that cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DrainError {
    /// The host is not in the snapshot.
    #[error("host {0} does not exist")]
    UnknownHost(String),
    /// The requested target host is not in the snapshot.
    #[error("target host {0} does not exist")]
    UnknownTarget(String),
    /// The scheduler could not be asked.
    #[error("placement failed: {0}")]
    Placement(#[from] PlacementError),
    /// No bandwidth to plan with.
    #[error("the migration bandwidth is 0 bytes/s; cannot estimate a drain")]
    NoBandwidth,
}

impl DrainError {
    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownHost(_) => "UnknownHost",
            Self::UnknownTarget(_) => "UnknownTarget",
            Self::Placement(e) => e.reason(),
            Self::NoBandwidth => "NoBandwidth",
        }
    }
}

/// A fixed cost per migration: target QEMU start, handshake, switchover.
pub const SETUP_TIME: Duration = Duration::from_secs(2);

/// Plan the drain of `req.host` (see the module documentation).
pub fn plan(
    snapshot: &Snapshot,
    policy: &EffectivePolicy,
    req: &DrainRequest<'_>,
    now: Timestamp,
) -> Result<DrainPlan, DrainError> {
    if snapshot.host(req.host).is_none() {
        return Err(DrainError::UnknownHost(req.host.to_string()));
    }
    if let Some(t) = req.target
        && snapshot.host(t).is_none()
    {
        return Err(DrainError::UnknownTarget(t.to_string()));
    }
    if req.link_bandwidth == 0 {
        return Err(DrainError::NoBandwidth);
    }
    let limits = policy.limits;
    let concurrency = limits.outbound_per_host.min(limits.per_cluster).max(1);
    let rate = match policy.bandwidth {
        crate::core::policy::Bandwidth::Custom { bytes_per_sec } => {
            bytes_per_sec.min(req.link_bandwidth / u64::from(concurrency))
        }
        _ => req.link_bandwidth / u64::from(concurrency),
    }
    .max(1);
    let mut vms: Vec<_> = snapshot.vms_on(req.host).cloned().collect();
    vms.sort_by(|a, b| {
        b.resources
            .memory
            .cmp(&a.resources.memory)
            .then_with(|| a.id.cmp(&b.id))
    });
    let mut working = snapshot.clone();
    let mut entries = Vec::with_capacity(vms.len());
    for (i, vm) in vms.iter().enumerate() {
        let moving = snapshot.in_flight().iter().find(|m| m.vm == vm.id);
        let outcome = if let Some(m) = moving {
            Outcome::AlreadyMoving {
                target: m.target.clone(),
            }
        } else if vm.quarantined {
            Outcome::Blocked(Blocker::Quarantined)
        } else if !vm.migratable {
            match req.non_migratable {
                NonMigratable::Stop => Outcome::Stop,
                NonMigratable::Block => Outcome::Blocked(Blocker::NotMigratable),
            }
        } else {
            let pr = PlacementRequest {
                vm: &vm.id,
                target: req.target,
                ignore_inbound_limit: true,
            };
            let decision = place(&working, policy, &pr, now)?;
            match decision.chosen.clone() {
                None => Outcome::Blocked(Blocker::NoHostFits {
                    summary: decision.summary(),
                }),
                Some(target) => {
                    working.add_in_flight(InFlight {
                        vm: vm.id.clone(),
                        source: req.host.to_string(),
                        target: Some(target.clone()),
                    });
                    let dirty = req.dirty_rates.get(&vm.id).copied().unwrap_or(0);
                    let (duration, risk) = transfer_time(vm.resources.memory, dirty, rate, policy);
                    Outcome::Migrate {
                        target,
                        start: Duration::ZERO,
                        duration,
                        risk,
                    }
                }
            }
        };
        entries.push(PlanEntry {
            vm: vm.id.clone(),
            order: i + 1,
            memory: vm.resources.memory,
            outcome,
        });
    }
    let estimated_total = simulate(&mut entries, concurrency, limits.inbound_per_host);
    let busy: Duration = entries
        .iter()
        .filter_map(|e| match &e.outcome {
            Outcome::Migrate { duration, .. } => Some(*duration),
            _ => None,
        })
        .sum();
    Ok(DrainPlan {
        entries,
        estimated_total,
        ideal: busy / concurrency,
        concurrency,
    })
}

/// Expected transfer time of `memory` bytes dirtied at `dirty` over `rate`:
/// pre-copy re-sends what is dirtied meanwhile, a geometric series that sums
/// to `memory / (rate − dirty)`. When the guest dirties nearly as fast as
/// the link, the policy's mode decides how it ends.
fn transfer_time(
    memory: u64,
    dirty: u64,
    rate: u64,
    policy: &EffectivePolicy,
) -> (Duration, Option<String>) {
    let one_pass = Duration::from_secs_f64(memory as f64 / rate as f64);
    if (dirty as f64) < 0.8 * rate as f64 {
        let t = Duration::from_secs_f64(memory as f64 / (rate - dirty) as f64);
        return (t + SETUP_TIME, None);
    }
    let speeds = format!(
        "dirties {} MiB/s, a stream carries {} MiB/s",
        dirty / MIB,
        rate / MIB
    );
    let c = &policy.convergence;
    match c.mode {
        ConvergenceMode::PostCopy => (
            one_pass * 2 + SETUP_TIME,
            Some(format!("{speeds}: expected to finish in post-copy")),
        ),
        ConvergenceMode::SuspendWorkloadIfNeeded => (
            one_pass * 3 + SETUP_TIME,
            Some(format!("{speeds}: expected to need throttling or a pause")),
        ),
        ConvergenceMode::MinimalDowntime | ConvergenceMode::Legacy => (
            c.progress_timeout + one_pass + SETUP_TIME,
            Some(format!(
                "{speeds}: likely to abort as not converging, then be retried"
            )),
        ),
    }
}

/// List scheduling in plan order: whenever a slot frees, start every waiting
/// move (in order) whose target can take one more. Fills in each move's
/// start; returns the makespan.
fn simulate(entries: &mut [PlanEntry], concurrency: u32, inbound: u32) -> Duration {
    let mut waiting: Vec<usize> = (0..entries.len())
        .filter(|i| matches!(entries[*i].outcome, Outcome::Migrate { .. }))
        .collect();
    let mut running: Vec<(Duration, usize)> = Vec::new(); // (end, entry)
    let mut now = Duration::ZERO;
    let mut makespan = Duration::ZERO;
    let target_of = |e: &PlanEntry| match &e.outcome {
        Outcome::Migrate { target, .. } => target.clone(),
        _ => String::new(),
    };
    while !waiting.is_empty() || !running.is_empty() {
        let mut i = 0;
        while i < waiting.len() && running.len() < concurrency as usize {
            let idx = waiting[i];
            let target = target_of(&entries[idx]);
            let arriving = running
                .iter()
                .filter(|(_, r)| target_of(&entries[*r]) == target)
                .count();
            if arriving < inbound as usize {
                if let Outcome::Migrate {
                    start, duration, ..
                } = &mut entries[idx].outcome
                {
                    *start = now;
                    running.push((now + *duration, idx));
                }
                waiting.remove(i);
            } else {
                i += 1;
            }
        }
        let Some(next) = running.iter().map(|(end, _)| *end).min() else {
            break;
        };
        now = next;
        makespan = makespan.max(now);
        running.retain(|(end, _)| *end > now);
    }
    makespan
}
