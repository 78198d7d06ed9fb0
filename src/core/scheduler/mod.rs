//! The scheduler: where a VM goes, and which VMs automatic balancing moves.
//!
//! A scheduling policy is data, as in oVirt: a list of filters, a weight and
//! a balancer, chosen by [`SchedulingPolicyKind`].
//!
//! ```text
//!  Snapshot ──► for each host ──► filters ──► rejected: reasons ───────┐
//!   + policy                         │                                 │
//!   + now                            └─► fit ──► weight ──► ranked ──► SchedulingDecision
//!                                                                      (chosen host + score,
//!                                                                       every other host: why not)
//! ```
//!
//! Filters (all policies): never the source; host `Active` and schedulable;
//! not quarantined ([`HostQuarantine`]: repeated failed incoming migrations);
//! free memory (capacity − allocated − VMs arriving) and CPU count; inbound
//! migration limit; cluster; pinned host; host selector; CPU model and
//! features; affinity and anti-affinity groups (counting VMs on their way);
//! CPU over `highUtilization` for the whole `overCommitDuration` (even with
//! `None`, as in RHV); free memory after placement under
//! `maxFreeMemoryForOverUtilized` when set. `PowerSaving` also refuses a host
//! the VM would push over `highUtilization`; `InClusterUpgrade` refuses hosts
//! older than the source.
//!
//! Weights (higher wins, ties by host name): `None` most free memory;
//! `EvenlyDistributed` / `InClusterUpgrade` lowest projected CPU;
//! `PowerSaving` highest projected CPU that still fits, empty hosts last;
//! `VmEvenlyDistributed` fewest VMs (`spmVmGrace` added on the control host).
//! Members of an affinity group prefer the host most of the group is on.
//!
//! A VM's CPU contribution is estimated from its host's load in proportion
//! to its vCPUs (see [`load::vm_share`]); an unplaced VM is assumed busy.
//! VMs on their way to a host (migrations in flight, or moves a planner has
//! already placed with [`Snapshot::add_in_flight`]) count on that host's
//! memory, CPU load, VM count and affinity groups.
//!
//! Cost: [`Snapshot::new`] indexes once (VMs per host, groups, arrivals, and
//! flat copies of each host's load series extremes, cluster and CPU features);
//! a placement is then one pass over the hosts, and a balancing pass weighs
//! only the first [`balance::CANDIDATES`] fitting targets per VM, in the
//! policy's order of preference. `benches/scheduler.rs` measures both.
//! Balancing lives in [`mod@balance`].

pub mod balance;
#[cfg(test)]
mod balance_tests;
mod evaluate;
pub mod load;
#[cfg(test)]
mod prop_tests;
mod rejection;
mod snapshot;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use thiserror::Error;

pub use balance::{BalancePlan, Move, MoveReason, PastMove, Skip, balance};
pub use evaluate::{Rejection, Score};
pub use snapshot::{
    HOST_CPU_MODELS, HostInfo, HostPhase, HostQuarantine, InFlight, LoadSample, Resources,
    Snapshot, VmInfo, VmPlacement,
};

use crate::core::policy::{EffectivePolicy, SchedulingPolicyKind};
use crate::core::time::Timestamp;
use evaluate::Request;

/// What to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementRequest<'a> {
    /// The VM's id (`namespace/name`).
    pub vm: &'a str,
    /// The host the user asked for: only that host is considered (and still
    /// filtered, so a bad choice is refused with its reasons).
    pub target: Option<&'a str>,
    /// Ignore `parallelInboundPerHost` (planning: the queue enforces it).
    pub ignore_inbound_limit: bool,
}

/// The verdict on one host.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The chosen host.
    Chosen(Score),
    /// Fit, but scored lower than the chosen host.
    ScoredLower(Score),
    /// Refused, with every reason.
    Rejected(Vec<Rejection>),
}

/// One host in a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct HostVerdict {
    /// Host name.
    pub host: Arc<str>,
    /// What happened to it.
    pub verdict: Verdict,
}

/// The scheduler's answer for one VM: stored in a Migration's
/// `status.schedulingDecision` so "why not host X?" has an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulingDecision {
    /// The VM.
    pub vm: String,
    /// The policy that decided.
    pub policy: SchedulingPolicyKind,
    /// The chosen host, if any fits.
    pub chosen: Option<String>,
    /// Every host considered, chosen first, then by score, then refused.
    pub hosts: Vec<HostVerdict>,
}

impl SchedulingDecision {
    /// The chosen host's score.
    pub fn chosen_score(&self) -> Option<&Score> {
        self.hosts.iter().find_map(|h| match &h.verdict {
            Verdict::Chosen(s) => Some(s),
            _ => None,
        })
    }

    /// The verdict on one host.
    pub fn verdict(&self, host: &str) -> Option<&Verdict> {
        self.hosts
            .iter()
            .find(|h| &*h.host == host)
            .map(|h| &h.verdict)
    }

    /// How many hosts were refused for each reason (a compact summary when
    /// the full list is too long for a status).
    pub fn rejections_by_reason(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for h in &self.hosts {
            if let Verdict::Rejected(rs) = &h.verdict {
                for r in rs {
                    *m.entry(r.reason()).or_insert(0) += 1;
                }
            }
        }
        m
    }

    /// One line for a condition or event message.
    pub fn summary(&self) -> String {
        match (&self.chosen, self.chosen_score()) {
            (Some(h), Some(s)) => format!(
                "{h} chosen by {:?} (score {:.1}, CPU {:.0}% → {:.0}%), {} other hosts considered",
                self.policy,
                s.score,
                s.cpu_now,
                s.cpu_projected,
                self.hosts.len() - 1
            ),
            _ => {
                let reasons: Vec<String> = self
                    .rejections_by_reason()
                    .into_iter()
                    .map(|(r, n)| format!("{n} {r}"))
                    .collect();
                format!(
                    "no host fits {} of {} hosts: {}",
                    self.vm,
                    self.hosts.len(),
                    reasons.join(", ")
                )
            }
        }
    }
}

/// A placement that could not even be attempted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    /// The VM is not in the snapshot.
    #[error("VM {0} is not in the scheduling snapshot")]
    UnknownVm(String),
    /// The requested target host is not in the snapshot.
    #[error("target host {0} does not exist")]
    UnknownTarget(String),
}

impl PlacementError {
    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownVm(_) => "UnknownVm",
            Self::UnknownTarget(_) => "UnknownTarget",
        }
    }

    /// Whether asking again may help: only once the missing object appears
    /// in the snapshot, which a retry after the next watch event covers.
    pub fn retryable(&self) -> bool {
        true
    }
}

/// Place one VM: the chosen host with its score and, for every other host,
/// why it was refused or scored lower.
pub fn place(
    snapshot: &Snapshot,
    policy: &EffectivePolicy,
    req: &PlacementRequest<'_>,
    now: Timestamp,
) -> Result<SchedulingDecision, PlacementError> {
    let vm_idx = *snapshot
        .vm_index
        .get(req.vm)
        .ok_or_else(|| PlacementError::UnknownVm(req.vm.to_string()))?;
    let candidates: Vec<usize> = match req.target {
        Some(t) => vec![
            *snapshot
                .host_index
                .get(t)
                .ok_or_else(|| PlacementError::UnknownTarget(t.to_string()))?,
        ],
        None => (0..snapshot.hosts.len()).collect(),
    };
    let r = Request::new(snapshot, vm_idx, policy, now, req.ignore_inbound_limit);
    let mut fit: Vec<(usize, Score)> = Vec::new();
    let mut rejected: Vec<HostVerdict> = Vec::new();
    for h in candidates {
        let reasons = r.filter(snapshot, h, true);
        if reasons.is_empty() {
            fit.push((h, r.score(snapshot, h)));
        } else {
            rejected.push(HostVerdict {
                host: snapshot.hot.names[h].clone(),
                verdict: Verdict::Rejected(reasons),
            });
        }
    }
    fit.sort_by(|(a, x), (b, y)| {
        y.score
            .total_cmp(&x.score)
            .then_with(|| snapshot.hosts[*a].name.cmp(&snapshot.hosts[*b].name))
    });
    let chosen = fit.first().map(|(h, _)| snapshot.hosts[*h].name.clone());
    let mut hosts: Vec<HostVerdict> = fit
        .into_iter()
        .enumerate()
        .map(|(i, (h, score))| HostVerdict {
            host: snapshot.hot.names[h].clone(),
            verdict: if i == 0 {
                Verdict::Chosen(score)
            } else {
                Verdict::ScoredLower(score)
            },
        })
        .collect();
    rejected.sort_by(|a, b| a.host.cmp(&b.host));
    hosts.extend(rejected);
    Ok(SchedulingDecision {
        vm: req.vm.to_string(),
        policy: policy.scheduling.policy,
        chosen,
        hosts,
    })
}

/// The best host for a VM without explanations (the balancer's inner
/// loop): walks `candidates` in order, skipping those for which `skip` is
/// true, and stops after `limit` hosts have passed the filters.
pub(crate) fn best_host(
    snapshot: &Snapshot,
    r: &Request<'_>,
    candidates: &[usize],
    skip: &dyn Fn(usize) -> bool,
    limit: usize,
) -> Option<(usize, Score)> {
    let mut best: Option<(usize, Score)> = None;
    let mut fits = 0;
    for &h in candidates.iter().filter(|h| !skip(**h)) {
        if !r.filter(snapshot, h, false).is_empty() {
            continue;
        }
        let score = r.score(snapshot, h);
        let better = match &best {
            None => true,
            Some((b, bs)) => {
                score.score > bs.score
                    || (score.score == bs.score && snapshot.hosts[h].name < snapshot.hosts[*b].name)
            }
        };
        if better {
            best = Some((h, score));
        }
        fits += 1;
        if fits >= limit {
            break;
        }
    }
    best
}
