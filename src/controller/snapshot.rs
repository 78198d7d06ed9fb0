//! The scheduler's snapshot, built from the controller's caches.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;

use crate::api::host::HostPhase as ApiHostPhase;
use crate::api::vm::DiskCache;
use crate::api::{Host, Migration, MigrationPhase, VirtualMachine};
use crate::core::scheduler::{
    HostInfo, HostPhase, InFlight, LoadSample, Resources, Snapshot, VmInfo, VmPlacement,
};

use super::status::to_core;
use crate::core::drain::{RetryPolicy, TargetFailure, quarantined_hosts};
use crate::core::migration::FailureReason;
use crate::core::scheduler::HostQuarantine;
use crate::core::time::Timestamp;

/// The label that marks a cluster's control host (oVirt's SPM), which
/// carries `spmVmGrace` fewer VMs.
pub const CONTROL_HOST_LABEL: &str = "ferry.dev/control-host";

/// `namespace/name` of a namespaced object.
pub fn id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The core's host phase.
pub fn host_phase(p: ApiHostPhase) -> HostPhase {
    match p {
        ApiHostPhase::Active => HostPhase::Active,
        ApiHostPhase::Maintenance => HostPhase::Maintenance,
        ApiHostPhase::Unreachable => HostPhase::Unreachable,
        ApiHostPhase::Fenced => HostPhase::Fenced,
        ApiHostPhase::Failed => HostPhase::Failed,
    }
}

/// A host as the scheduler sees it.
pub fn host_info(h: &Host) -> HostInfo {
    let status = h.status.clone().unwrap_or_default();
    let capacity = status.capacity.as_ref();
    HostInfo {
        name: h.name_any(),
        cluster: h.spec.cluster.clone(),
        phase: host_phase(status.phase),
        schedulable: !h.spec.unschedulable,
        capacity: Resources {
            cpus: capacity.map_or(0, |c| c.cpus),
            memory: capacity.map_or(0, |c| c.memory.bytes()),
        },
        allocated: Resources::default(),
        cpu_model: status.cpu_model.clone().unwrap_or_default(),
        cpu_features: status.cpu_features.iter().cloned().collect(),
        labels: h.labels().clone(),
        agent_version: status.agent_version.clone().unwrap_or_default(),
        load: status
            .load
            .iter()
            .map(|s| LoadSample {
                at: to_core(&s.time),
                cpu_percent: f64::from(s.cpu_percent),
                free_memory: s.free_memory.bytes(),
            })
            .collect(),
        control_host: h
            .labels()
            .get(CONTROL_HOST_LABEL)
            .is_some_and(|v| v == "true"),
    }
}

/// A VM as the scheduler sees it.
pub fn vm_info(vm: &VirtualMachine) -> VmInfo {
    let placement = vm.spec.placement.clone().unwrap_or_default();
    let status = vm.status.clone().unwrap_or_default();
    VmInfo {
        id: id(&vm.namespace().unwrap_or_default(), &vm.name_any()),
        host: status.host.clone(),
        resources: Resources {
            cpus: vm.spec.cpus,
            memory: vm.spec.memory.bytes(),
        },
        cpu_model: vm.spec.cpu_model.clone(),
        required_cpu_features: vm
            .spec
            .required_cpu_features
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>(),
        placement: VmPlacement {
            cluster: placement.cluster,
            host_selector: placement.host_selector,
            pinned_host: placement.pinned_host,
            affinity_group: placement.affinity_group,
            anti_affinity_group: placement.anti_affinity_group,
        },
        migratable: vm.spec.migratable,
        highly_available: vm.spec.highly_available,
        quarantined: status
            .conditions
            .iter()
            .any(|c| c.type_ == "Quarantined" && c.status == "True"),
    }
}

/// Whether any disk of the VM uses a host cache mode.
pub fn unsafe_disk_cache(vm: &VirtualMachine) -> bool {
    vm.spec.disks.iter().any(|d| d.cache != DiskCache::None)
}

/// Migrations that reserve a target: chosen (Queued) up to Completing.
pub fn reserves_target(phase: MigrationPhase) -> bool {
    matches!(
        phase,
        MigrationPhase::Queued
            | MigrationPhase::Scheduled
            | MigrationPhase::PreparingTarget
            | MigrationPhase::Running
            | MigrationPhase::PostCopy
            | MigrationPhase::Completing
    )
}

/// Build the snapshot. `extra` adds decisions the caches may not show yet
/// (targets chosen a moment ago), keyed by Migration id.
pub fn build(
    hosts: &[std::sync::Arc<Host>],
    vms: &[std::sync::Arc<VirtualMachine>],
    migrations: &[std::sync::Arc<Migration>],
    extra: &BTreeMap<String, InFlight>,
) -> Snapshot {
    let vms: Vec<VmInfo> = vms.iter().map(|v| vm_info(v)).collect();
    // What VMs take is the API's truth (where each VM is placed), not the
    // agents' last report, which lags a VM just placed.
    let mut allocated: BTreeMap<&str, Resources> = BTreeMap::new();
    for vm in &vms {
        if let Some(host) = vm.host.as_deref() {
            let a = allocated.entry(host).or_default();
            a.cpus += vm.resources.cpus;
            a.memory += vm.resources.memory;
        }
    }
    let hosts: Vec<HostInfo> = hosts
        .iter()
        .map(|h| {
            let mut info = host_info(h);
            info.allocated = allocated
                .get(info.name.as_str())
                .copied()
                .unwrap_or_default();
            info
        })
        .collect();
    let mut in_flight: BTreeMap<String, InFlight> = BTreeMap::new();
    for m in migrations {
        let status = m.status.clone().unwrap_or_default();
        if !reserves_target(status.phase) {
            continue;
        }
        let namespace = m.namespace().unwrap_or_default();
        in_flight.insert(
            id(&namespace, &m.name_any()),
            InFlight {
                vm: id(&namespace, &m.spec.vm_name),
                source: status.source_host.clone().unwrap_or_default(),
                target: status.target_host.clone(),
            },
        );
    }
    for (key, f) in extra {
        in_flight.entry(key.clone()).or_insert_with(|| f.clone());
    }
    Snapshot::new(hosts, vms, in_flight.into_values().collect())
}

/// Every failed migration with a target host, for the host quarantine.
pub fn target_failures(migrations: &[std::sync::Arc<Migration>]) -> Vec<TargetFailure> {
    migrations
        .iter()
        .filter_map(|m| {
            let status = m.status.as_ref()?;
            if status.phase != MigrationPhase::Failed {
                return None;
            }
            Some(TargetFailure {
                host: status.target_host.clone()?,
                at: status
                    .timestamps
                    .as_ref()
                    .and_then(|t| t.completed.as_ref())
                    .map(to_core)?,
                reason: status
                    .failure_reason
                    .as_deref()
                    .and_then(|r| r.parse::<FailureReason>().ok())?,
            })
        })
        .collect()
}

/// The host quarantines in force at `now`.
pub fn host_quarantines(
    migrations: &[std::sync::Arc<Migration>],
    policy: &RetryPolicy,
    now: Timestamp,
) -> BTreeMap<String, HostQuarantine> {
    quarantined_hosts(&target_failures(migrations), policy, now)
}
