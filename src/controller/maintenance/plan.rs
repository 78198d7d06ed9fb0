//! The dry run: `core::drain::plan` over a snapshot of the caches, written
//! as `status.plan`; nothing is moved or cordoned.

use std::collections::HashMap;

use kube::ResourceExt;

use crate::api::HostMaintenance;
use crate::api::maintenance::{
    Blocker, DrainPlan as ApiPlan, HostMaintenanceStatus, MaintenancePhase, NonMigratable,
    PlanEntry as ApiEntry,
};
use crate::controller::Ctx;
use crate::controller::snapshot::id;
use crate::controller::status::to_core;
use crate::core::drain::{self, DrainRequest, Outcome};
use crate::core::policy::Bandwidth;
use crate::core::time::{GIB, Timestamp};

use super::now;

/// The migration network's bandwidth assumed by a plan when the policy sets
/// no limit: 10 Gbit/s, the common migration network.
const DEFAULT_LINK: u64 = 10 * GIB / 8;

/// The dry run: the plan, nothing moved.
pub fn dry_run(ctx: &Ctx, hm: &HostMaintenance) -> HostMaintenanceStatus {
    let host = hm.spec.host.as_str();
    let snap = ctx.snapshot(&Default::default(), now());
    let policy = match &hm.spec.policy {
        Some(p) => ctx.policy_for(None, Some(p)).1,
        None => ctx.cluster_policy(),
    };
    // The latest dirty rate each VM showed in a migration.
    let mut dirty: HashMap<String, (Timestamp, u64)> = HashMap::new();
    for m in ctx.migrations.state() {
        let Some(s) = &m.status else { continue };
        let Some(p) = &s.progress else { continue };
        let at = m
            .metadata
            .creation_timestamp
            .as_ref()
            .map(to_core)
            .unwrap_or_default();
        let key = id(&m.namespace().unwrap_or_default(), &m.spec.vm_name);
        let e = dirty.entry(key).or_insert((at, p.dirty_rate));
        if at >= e.0 {
            *e = (at, p.dirty_rate);
        }
    }
    let dirty_rates = dirty.into_iter().map(|(k, (_, r))| (k, r)).collect();
    let concurrency = policy
        .limits
        .outbound_per_host
        .min(policy.limits.per_cluster)
        .max(1);
    let link_bandwidth = match policy.bandwidth {
        Bandwidth::Custom { bytes_per_sec } => bytes_per_sec.saturating_mul(u64::from(concurrency)),
        _ => DEFAULT_LINK,
    };
    let req = DrainRequest {
        host,
        target: hm.spec.target_host.as_deref(),
        non_migratable: match hm.spec.non_migratable {
            NonMigratable::Block => drain::NonMigratable::Block,
            NonMigratable::Stop => drain::NonMigratable::Stop,
        },
        dirty_rates: &dirty_rates,
        link_bandwidth,
    };
    match drain::plan(&snap, &policy, &req, now()) {
        Err(e) => HostMaintenanceStatus {
            phase: MaintenancePhase::Failed,
            message: Some(format!("cannot plan the drain ({}): {e}", e.reason())),
            observed_generation: hm.metadata.generation,
            ..HostMaintenanceStatus::default()
        },
        Ok(plan) => {
            let split = |vm: &str| match vm.split_once('/') {
                Some((ns, n)) => (ns.to_string(), n.to_string()),
                None => (String::new(), vm.to_string()),
            };
            let blockers: Vec<Blocker> = plan
                .blockers()
                .map(|(vm, b)| {
                    let (namespace, vm) = split(vm);
                    Blocker {
                        namespace,
                        vm,
                        reason: b.reason().into(),
                        message: b.message(),
                    }
                })
                .collect();
            let entries: Vec<ApiEntry> = plan
                .entries
                .iter()
                .map(|e| {
                    let (namespace, vm) = split(&e.vm);
                    let (target, blocker, secs) = match &e.outcome {
                        Outcome::Migrate {
                            target, duration, ..
                        } => (Some(target.clone()), None, duration.as_secs()),
                        Outcome::Stop => (
                            None,
                            Some("Stopped: not migratable, nonMigratable is Stop".to_string()),
                            0,
                        ),
                        Outcome::AlreadyMoving { target } => (target.clone(), None, 0),
                        Outcome::Blocked(b) => {
                            (None, Some(format!("{}: {}", b.reason(), b.message())), 0)
                        }
                    };
                    ApiEntry {
                        namespace,
                        vm,
                        target,
                        blocker,
                        estimated_seconds: secs,
                    }
                })
                .collect();
            let total = u32::try_from(entries.len()).unwrap_or(u32::MAX);
            let message = format!(
                "dry run: {} VMs, {} blocked, about {} s at {} at once (ideal {} s)",
                total,
                blockers.len(),
                plan.estimated_total.as_secs(),
                plan.concurrency,
                plan.ideal.as_secs()
            );
            HostMaintenanceStatus {
                phase: MaintenancePhase::Planned,
                vms_total: total,
                vms_remaining: total,
                vms_blocked: u32::try_from(blockers.len()).unwrap_or(u32::MAX),
                blockers,
                plan: Some(ApiPlan {
                    entries,
                    estimated_seconds: plan.estimated_total.as_secs(),
                }),
                message: Some(message),
                observed_generation: hm.metadata.generation,
                ..HostMaintenanceStatus::default()
            }
        }
    }
}
