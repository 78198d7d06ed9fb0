//! Automatic balancing: the moves a policy wants, with guards against storms
//! and flapping.
//!
//! ```text
//!  hosts ──► over/under the policy's threshold for the whole
//!            overCommitDuration? ──no──► left alone
//!               │ yes, worst first
//!               ▼
//!  skip if: migrations in flight on it │ a move from it within `interval`
//!           │ already part of a move in this pass │ its cluster already has
//!           `parallelMigrationsPerCluster` moves in this pass (no storms)
//!               ▼
//!  movable VMs: migratable, not pinned, not quarantined, not in flight,
//!               not moved within `vmCooldown`, under the per-VM move budget
//!               ▼
//!  best target per VM (the scheduler's filters and weight; hosts busy or
//!  already used in this pass excluded) ──► expected improvement
//!               ▼
//!  keep the best move if its improvement > margin ──► Move (reason + numbers)
//! ```
//!
//! What counts as an improvement, per policy:
//! - `EvenlyDistributed`, `InClusterUpgrade`: the CPU gap between source and
//!   target narrows by more than `improvementMargin` points, and the target
//!   stays under `highUtilization`. Moving the same VM back would widen the
//!   gap again, so a fixed load never oscillates.
//! - `PowerSaving`: an overloaded host sheds load (its peak drops by more
//!   than the margin); an under-utilised host (under `lowUtilization` for the
//!   whole duration) is emptied onto strictly busier hosts that stay under
//!   `highUtilization`, so VMs only ever flow towards busier hosts.
//! - `VmEvenlyDistributed`: a host over `highVmCount` (with `spmVmGrace` on
//!   the control host) gives a VM to the host with the fewest, when the
//!   difference is over `migrationThreshold` (at least 1).
//! - Memory: with `maxFreeMemoryForOverUtilized`, a host short of free memory
//!   for the whole duration gives a VM to a host that stays above it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::evaluate::Request;
use super::load::{cpu_now, memory_plenty, memory_short};
use super::{Snapshot, best_host};
use crate::core::policy::{EffectivePolicy, SchedulingPolicyKind};
use crate::core::time::{MIB, Timestamp};

/// An automatic move made earlier (from Migrations labelled automatic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastMove {
    /// The VM.
    pub vm: String,
    /// From.
    pub source: String,
    /// To.
    pub target: String,
    /// When it was created.
    pub at: Timestamp,
}

/// Why the balancer wants a VM off its host.
#[derive(Debug, Clone, PartialEq)]
pub enum MoveReason {
    /// CPU over `highUtilization` for `overCommitDuration`.
    CpuOverloaded {
        /// Current load (%).
        percent: f64,
        /// The threshold (%).
        threshold: u32,
        /// The duration.
        duration: Duration,
    },
    /// Free memory under `maxFreeMemoryForOverUtilized` for the duration.
    MemoryOverUtilized {
        /// Free bytes now.
        free: u64,
        /// The threshold.
        threshold: u64,
    },
    /// `PowerSaving`: CPU under `lowUtilization` for the duration.
    UnderUtilized {
        /// Current load (%).
        percent: f64,
        /// The threshold (%).
        threshold: u32,
    },
    /// `VmEvenlyDistributed`: more VMs than `highVmCount`.
    TooManyVms {
        /// VMs (with grace on the control host).
        count: u32,
        /// `highVmCount`.
        limit: u32,
    },
}

impl MoveReason {
    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::CpuOverloaded { .. } => "CpuOverloaded",
            Self::MemoryOverUtilized { .. } => "MemoryOverUtilized",
            Self::UnderUtilized { .. } => "UnderUtilized",
            Self::TooManyVms { .. } => "TooManyVms",
        }
    }
}

/// A move the balancer wants: becomes a `Migration` labelled automatic.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    /// The VM.
    pub vm: String,
    /// From.
    pub source: String,
    /// To.
    pub target: String,
    /// Why the source needs relief.
    pub reason: MoveReason,
    /// What `before`/`after` measure ("CPU gap (points)", ...).
    pub metric: &'static str,
    /// The metric before the move.
    pub before: f64,
    /// The metric expected after it.
    pub after: f64,
    /// A sentence for the Migration's message.
    pub explanation: String,
}

impl Move {
    /// The expected improvement (`before - after`).
    pub fn improvement(&self) -> f64 {
        self.before - self.after
    }
}

/// Why a host that needed relief got no move in this pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    /// Balancing is off or the policy is `None`.
    Disabled,
    /// It has migrations in flight.
    Busy,
    /// It was the source of a move less than `interval` ago.
    Interval {
        /// When the next move may start.
        next: Timestamp,
    },
    /// It is already part of a move in this pass.
    UsedThisPass,
    /// Its cluster already has `parallelMigrationsPerCluster` moves in this
    /// pass: more could not run anyway, and the next pass decides on fresh
    /// load.
    PassFull,
    /// None of its VMs may move (pinned, cooldown, budget, ...).
    NoMovableVm,
    /// No move improves the spread by more than the margin.
    NoImprovingMove,
}

/// The outcome of a balancing pass.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BalancePlan {
    /// Moves to make now.
    pub moves: Vec<Move>,
    /// Hosts that needed relief but got no move, and why.
    pub skipped: Vec<(String, Skip)>,
}

/// One balancing pass (see the module documentation).
pub fn balance(
    snapshot: &Snapshot,
    policy: &EffectivePolicy,
    history: &[PastMove],
    now: Timestamp,
) -> BalancePlan {
    let sched = &policy.scheduling;
    let bal = &sched.balancing;
    let mut plan = BalancePlan::default();
    if !bal.enabled || sched.policy == SchedulingPolicyKind::None {
        plan.skipped.push((String::new(), Skip::Disabled));
        return plan;
    }
    let mut last_from_host: HashMap<&str, Timestamp> = HashMap::new();
    let mut vm_moves: HashMap<&str, (Timestamp, u32)> = HashMap::new();
    for m in history.iter().filter(|m| m.at <= now) {
        let e = last_from_host.entry(m.source.as_str()).or_insert(m.at);
        *e = (*e).max(m.at);
        let v = vm_moves.entry(m.vm.as_str()).or_insert((m.at, 0));
        v.0 = v.0.max(m.at);
        if now.since(m.at) < bal.move_budget_window {
            v.1 += 1;
        }
    }
    let loads: Vec<f64> = snapshot.hosts.iter().map(|h| cpu_now(h, now)).collect();
    let in_flight_vms: HashSet<&str> = snapshot.in_flight.iter().map(|m| m.vm.as_str()).collect();
    let candidates = candidates(snapshot, policy, &loads, now);
    let mut used: HashSet<usize> = HashSet::new();
    let mut per_cluster: HashMap<&str, u32> = HashMap::new();
    for (h, reason) in sources(snapshot, policy, &loads, now) {
        let name = snapshot.hosts[h].name.clone();
        let source_cluster = snapshot.hosts[h].cluster.as_str();
        if per_cluster.get(source_cluster).copied().unwrap_or(0) >= policy.limits.per_cluster {
            plan.skipped.push((name, Skip::PassFull));
            continue;
        }
        if snapshot.busy(h) {
            plan.skipped.push((name, Skip::Busy));
            continue;
        }
        if used.contains(&h) {
            plan.skipped.push((name, Skip::UsedThisPass));
            continue;
        }
        if let Some(last) = last_from_host.get(name.as_str())
            && now.since(*last) < bal.interval
        {
            plan.skipped.push((
                name,
                Skip::Interval {
                    next: last.plus(bal.interval),
                },
            ));
            continue;
        }
        let movable: Vec<usize> = snapshot.vms_on[h]
            .iter()
            .copied()
            .filter(|v| {
                let vm = &snapshot.vms[*v];
                let (last, count) = vm_moves
                    .get(vm.id.as_str())
                    .copied()
                    .unwrap_or((Timestamp::default(), 0));
                vm.migratable
                    && !vm.quarantined
                    && vm.placement.pinned_host.is_none()
                    && !in_flight_vms.contains(vm.id.as_str())
                    && (count == 0 || now.since(last) >= bal.vm_cooldown)
                    && count < bal.moves_per_vm_per_window
            })
            .collect();
        if movable.is_empty() {
            plan.skipped.push((name, Skip::NoMovableVm));
            continue;
        }
        let mut best: Option<(f64, Move, usize)> = None;
        for v in movable {
            let r = Request::new(snapshot, v, policy, now, false);
            let under = matches!(reason, MoveReason::UnderUtilized { .. });
            let skip =
                |t: usize| snapshot.busy(t) || used.contains(&t) || (under && loads[t] <= loads[h]);
            let cluster = r.cluster.unwrap_or(snapshot.hosts[h].cluster.as_str());
            let list = candidates.get(cluster).map_or(&[][..], Vec::as_slice);
            let Some((t, score)) = best_host(snapshot, &r, list, &skip, CANDIDATES) else {
                continue;
            };
            let Some(m) = evaluate(snapshot, policy, &r, h, t, &score, &loads, &reason) else {
                continue;
            };
            let imp = m.improvement();
            let better = best
                .as_ref()
                .is_none_or(|(b, bm, _)| imp > *b || (imp == *b && m.vm < bm.vm));
            if better {
                best = Some((imp, m, t));
            }
        }
        match best {
            Some((_, m, t)) => {
                *per_cluster.entry(source_cluster).or_default() += 1;
                used.insert(h);
                used.insert(t);
                plan.moves.push(m);
            }
            None => plan.skipped.push((name, Skip::NoImprovingMove)),
        }
    }
    plan
}

/// How many fitting targets the balancer weighs per VM. Targets are walked
/// in the policy's order of preference, so the first few that fit hold the
/// best move; weighing every host for every VM of every overloaded host
/// would make a pass quadratic in the cluster size.
pub const CANDIDATES: usize = 16;

/// Possible targets per cluster, most promising first: least loaded for
/// the spreading policies, most loaded (under `highUtilization`) for
/// `PowerSaving`, fewest VMs for `VmEvenlyDistributed`. Hosts that no VM
/// could enter (not Active, cordoned, overloaded) are left out.
fn candidates<'s>(
    s: &'s Snapshot,
    p: &EffectivePolicy,
    loads: &[f64],
    now: Timestamp,
) -> HashMap<&'s str, Vec<usize>> {
    let sched = &p.scheduling;
    let mut by_cluster: HashMap<&str, Vec<usize>> = HashMap::new();
    for (h, host) in s.hosts.iter().enumerate() {
        let open = host.phase == super::HostPhase::Active
            && host.schedulable
            && s.quarantine_of(h, now).is_none()
            && !s.busy(h)
            && !s.cpu_over(h, sched.high_utilization, sched.over_commit_duration, now);
        if open {
            by_cluster.entry(host.cluster.as_str()).or_default().push(h);
        }
    }
    let count = |h: usize| {
        s.vms_on[h].len() + usize::from(s.hosts[h].control_host) * sched.spm_vm_grace as usize
    };
    for list in by_cluster.values_mut() {
        match sched.policy {
            SchedulingPolicyKind::PowerSaving => {
                list.sort_by(|a, b| loads[*b].total_cmp(&loads[*a]))
            }
            SchedulingPolicyKind::VmEvenlyDistributed => list.sort_by_key(|h| count(*h)),
            _ => list.sort_by(|a, b| loads[*a].total_cmp(&loads[*b])),
        }
    }
    by_cluster
}

/// Hosts that need relief, worst first.
fn sources(
    s: &Snapshot,
    p: &EffectivePolicy,
    loads: &[f64],
    now: Timestamp,
) -> Vec<(usize, MoveReason)> {
    let sched = &p.scheduling;
    let d = sched.over_commit_duration;
    let counts: Vec<u32> = (0..s.hosts.len())
        .map(|h| {
            let grace = if s.hosts[h].control_host {
                sched.spm_vm_grace
            } else {
                0
            };
            u32::try_from(s.vms_on[h].len()).unwrap_or(u32::MAX) + grace
        })
        .collect();
    let mut out: Vec<(usize, MoveReason, f64)> = Vec::new();
    for (h, host) in s.hosts.iter().enumerate() {
        if s.vms_on[h].is_empty() {
            continue;
        }
        match sched.policy {
            SchedulingPolicyKind::VmEvenlyDistributed => {
                if counts[h] > sched.high_vm_count {
                    let reason = MoveReason::TooManyVms {
                        count: counts[h],
                        limit: sched.high_vm_count,
                    };
                    out.push((h, reason, f64::from(counts[h])));
                }
                continue;
            }
            SchedulingPolicyKind::None => continue,
            _ => {}
        }
        if s.cpu_over(h, sched.high_utilization, d, now) {
            let reason = MoveReason::CpuOverloaded {
                percent: loads[h],
                threshold: sched.high_utilization,
                duration: d,
            };
            out.push((h, reason, 1000.0 + loads[h]));
        } else if let Some(t) = sched.max_free_memory_for_over_utilized
            && memory_short(host, t, d, now)
        {
            let free = host.load.last().map_or(0, |l| l.free_memory);
            out.push((
                h,
                MoveReason::MemoryOverUtilized { free, threshold: t },
                500.0,
            ));
        } else if sched.policy == SchedulingPolicyKind::PowerSaving
            && s.cpu_under(h, sched.low_utilization, d, now)
            && sched
                .min_free_memory_for_under_utilized
                .is_none_or(|m| memory_plenty(host, m, d, now))
        {
            let reason = MoveReason::UnderUtilized {
                percent: loads[h],
                threshold: sched.low_utilization,
            };
            // Empty the emptiest first: it is the closest to being switched off.
            out.push((h, reason, 100.0 - loads[h]));
        }
    }
    out.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then_with(|| s.hosts[a.0].name.cmp(&s.hosts[b.0].name))
    });
    out.into_iter().map(|(h, r, _)| (h, r)).collect()
}

/// The move of `r.vm` from `h` to `t` with its expected improvement, if it
/// is worth making.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    s: &Snapshot,
    p: &EffectivePolicy,
    r: &Request<'_>,
    h: usize,
    t: usize,
    score: &super::Score,
    loads: &[f64],
    reason: &MoveReason,
) -> Option<Move> {
    let sched = &p.scheduling;
    let margin = sched.balancing.improvement_margin;
    let high = f64::from(sched.high_utilization);
    let (src, tgt) = (&s.hosts[h], &s.hosts[t]);
    let ds = r.share_on(src.capacity.cpus);
    let (ls, lt) = (loads[h], loads[t]);
    let lt_after = score.cpu_projected;
    let (metric, before, after, ok, detail) = match reason {
        MoveReason::TooManyVms { count, .. } => {
            let ct = f64::from(score.vm_count);
            let cs = f64::from(*count);
            let threshold = f64::from(sched.migration_threshold.max(1));
            let after = ((cs - 1.0) - (ct + 1.0)).abs();
            (
                "VM count gap",
                cs - ct,
                after,
                cs - ct > threshold,
                format!(
                    "{} has {count} VMs (highVmCount {}), {} has {}",
                    src.name, sched.high_vm_count, tgt.name, ct
                ),
            )
        }
        MoveReason::UnderUtilized { percent, threshold } => (
            "source CPU (%)",
            ls,
            (ls - ds).max(0.0),
            lt_after <= high && lt > ls,
            format!(
                "{} is under {threshold}% CPU ({percent:.0}%) and is being emptied onto busier hosts",
                src.name
            ),
        ),
        MoveReason::MemoryOverUtilized { free, threshold } => {
            let pct = |free: u64, cap: u64| 100.0 * free as f64 / cap.max(1) as f64;
            let mem = r.vm.resources.memory;
            let fs = pct(*free, src.capacity.memory);
            let ft = pct(s.free_memory(t), tgt.capacity.memory);
            let after = (pct(free.saturating_add(mem), src.capacity.memory)
                - pct(s.free_memory(t).saturating_sub(mem), tgt.capacity.memory))
            .abs();
            (
                "free memory gap (points)",
                ft - fs,
                after,
                score.free_memory_after >= *threshold && ft > fs,
                format!(
                    "{} has {} MiB free, under {} MiB",
                    src.name,
                    free / MIB,
                    threshold / MIB
                ),
            )
        }
        MoveReason::CpuOverloaded {
            percent, threshold, ..
        } if sched.policy == SchedulingPolicyKind::PowerSaving => (
            "peak CPU (%)",
            ls.max(lt),
            (ls - ds).max(lt_after),
            lt_after <= high,
            format!(
                "{} has been over {threshold}% CPU ({percent:.0}%)",
                src.name
            ),
        ),
        MoveReason::CpuOverloaded {
            percent, threshold, ..
        } => (
            "CPU gap (points)",
            ls - lt,
            ((ls - ds) - lt_after).abs(),
            lt_after <= high && ls > lt,
            format!(
                "{} has been over {threshold}% CPU ({percent:.0}%)",
                src.name
            ),
        ),
    };
    let needs_margin = !matches!(
        reason,
        MoveReason::UnderUtilized { .. } | MoveReason::TooManyVms { .. }
    );
    if !ok || (needs_margin && before - after <= margin) || (!needs_margin && before - after <= 0.0)
    {
        return None;
    }
    let explanation = format!(
        "{detail}; moving {} to {}: {metric} {before:.1} → {after:.1} (CPU {} {ls:.0}% → {:.0}%, {} {lt:.0}% → {lt_after:.0}%)",
        r.vm.id,
        tgt.name,
        src.name,
        (ls - ds).max(0.0),
        tgt.name
    );
    Some(Move {
        vm: r.vm.id.clone(),
        source: src.name.clone(),
        target: tgt.name.clone(),
        reason: reason.clone(),
        metric,
        before,
        after,
        explanation,
    })
}
