//! The VM half of the agent's loop: start what the API places here, stop
//! what it does not (stops first), and report each VM's state.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::agent::net;
use crate::api::vm::{NetworkStatus, QemuStatus, RunStrategy};
use crate::api::{VirtualMachine, VmPhase};

use crate::bridge::conditions;

use super::Agent;

/// The condition with which a drain keeps a VM stopped
/// (`controller::maintenance::STOPPED_CONDITION`).
pub const MAINTENANCE_STOPPED: &str = "MaintenanceStopped";
use super::machine::{effective_mac, effective_uuid, machine_spec};
use super::plan::{DesiredVm, VmAction, local_name, plan};

/// How long a VM gets to quit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `(memory MiB, vCPUs)` of every live QEMU here, for the Host's status.
pub async fn running_resources(agent: &Agent) -> Vec<(u32, u32)> {
    agent
        .vms
        .list()
        .await
        .into_iter()
        .filter(|(_, p)| p.is_alive())
        .map(|(_, p)| (p.spec().memory_mib, p.spec().cpus))
        .collect()
}

/// One pass: plan, act, report.
pub async fn reconcile(agent: &Agent) {
    let me = agent.config.host.as_str();
    let placed: Vec<std::sync::Arc<VirtualMachine>> = agent
        .vm_store
        .state()
        .into_iter()
        .filter(|vm| vm.status.as_ref().and_then(|s| s.host.as_deref()) == Some(me))
        .collect();
    let desired: Vec<DesiredVm> = placed
        .iter()
        .map(|vm| DesiredVm {
            name: local_name(&vm.namespace().unwrap_or_default(), &vm.name_any()),
            // A drain with `nonMigratable: Stop` keeps the VM stopped
            // without touching its spec.
            run: vm.spec.run_strategy == RunStrategy::Running
                && !conditions::is_true(
                    &vm.status.clone().unwrap_or_default().conditions,
                    MAINTENANCE_STOPPED,
                ),
        })
        .collect();
    let running: BTreeSet<String> = agent
        .vms
        .list()
        .await
        .into_iter()
        .filter(|(_, p)| p.is_alive())
        .map(|(name, _)| name)
        .collect();
    let reserved = agent.reserved();
    for action in plan(&desired, &running, &reserved) {
        match action {
            VmAction::Stop { name, reason } => {
                tracing::info!(vm = %name, reason = reason.as_str(), "stopping VM");
                if let Err(e) = agent.vms.stop(&name, STOP_GRACE).await {
                    tracing::warn!(vm = %name, error = %e, "stopping VM failed");
                }
            }
            VmAction::Start { name } => {
                let Some(vm) = placed.iter().find(|vm| {
                    local_name(&vm.namespace().unwrap_or_default(), &vm.name_any()) == name
                }) else {
                    continue;
                };
                start(agent, vm, &name).await;
            }
        }
    }
    sweep_taps(agent, &reserved).await;
    for vm in &placed {
        let name = local_name(&vm.namespace().unwrap_or_default(), &vm.name_any());
        if reserved.contains(&name) {
            continue;
        }
        report(agent, vm, &name).await;
    }
}

/// Start a VM's QEMU; a failure is remembered per generation so that a bad
/// spec is reported once, not retried in a loop.
async fn start(agent: &Agent, vm: &VirtualMachine, name: &str) {
    let generation = vm.metadata.generation.unwrap_or_default();
    let key = format!("{name}@{generation}");
    if agent
        .start_failures
        .lock()
        .map(|f| f.contains_key(&key))
        .unwrap_or(false)
    {
        return;
    }
    let result = match spec_with_taps(agent, vm) {
        Ok(spec) => agent
            .vms
            .start(&spec, false)
            .await
            .map(|_| ())
            .map_err(|e| ("StartFailed", super::error_chain(&e))),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => tracing::info!(vm = %name, "started VM"),
        Err((reason, message)) => {
            tracing::warn!(vm = %name, %reason, %message, "VM could not start");
            if let Ok(mut failures) = agent.start_failures.lock() {
                failures.insert(key, message.clone());
            }
            let existing = vm.status.clone().unwrap_or_default().conditions;
            let patch = conditions::guarded_patch(
                vm.metadata.resource_version.clone(),
                serde_json::json!({"phase": VmPhase::Failed}),
                conditions::upsert(&existing, conditions::new("Ready", false, reason, &message)),
            );
            patch_status(agent, vm, &patch).await;
        }
    }
}

/// The VM's machine with its NICs on taps of the mapped bridges (created
/// here); `(reason, message)` on failure.
pub(super) fn spec_with_taps(
    agent: &Agent,
    vm: &VirtualMachine,
) -> Result<crate::agent::qemu::MachineSpec, (&'static str, String)> {
    let mut spec =
        machine_spec(vm, &agent.config.state_dir).map_err(|e| (e.reason(), e.to_string()))?;
    let networks: Vec<String> = vm.spec.networks.iter().map(|n| n.name.clone()).collect();
    net::prepare_taps(&mut spec, &networks, &agent.config.networks)
        .map_err(|e| (e.reason(), e.to_string()))?;
    Ok(spec)
}

/// Removes Ferry's taps that no live QEMU here uses and no migration here
/// is about to use (after a stop, a crash, or a source quit at switchover).
async fn sweep_taps(agent: &Agent, reserved: &BTreeSet<String>) {
    if agent.config.networks.is_empty() {
        return;
    }
    let mut keep: BTreeSet<String> = agent
        .vms
        .list()
        .await
        .into_iter()
        .filter(|(_, p)| p.is_alive())
        .flat_map(|(_, p)| {
            p.spec()
                .nics
                .iter()
                .filter_map(|n| n.tap.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    for vm in agent.vm_store.state() {
        let name = local_name(&vm.namespace().unwrap_or_default(), &vm.name_any());
        if reserved.contains(&name) {
            keep.extend((0..vm.spec.networks.len()).map(|i| net::tap_name(&name, i)));
        }
    }
    match net::sweep_taps(&keep) {
        Ok(removed) if !removed.is_empty() => tracing::info!(?removed, "removed unused taps"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "removing unused taps failed"),
    }
}

/// Write the VM's phase, QEMU and identity when they differ from what the
/// status says.
async fn report(agent: &Agent, vm: &VirtualMachine, name: &str) {
    let process = agent.vms.get(name).await.filter(|p| p.is_alive());
    let status = vm.status.clone().unwrap_or_default();
    let (phase, qemu) = match &process {
        Some(p) => (VmPhase::Running, Some(i64::from(p.pid()))),
        None if vm.spec.run_strategy == RunStrategy::Stopped
            || conditions::is_true(&status.conditions, MAINTENANCE_STOPPED) =>
        {
            (VmPhase::Stopped, None)
        }
        None if status.phase == VmPhase::Failed => return,
        None => (VmPhase::Starting, None),
    };
    let Ok(uuid) = effective_uuid(vm) else { return };
    let networks: Vec<NetworkStatus> = vm
        .spec
        .networks
        .iter()
        .map(|n| NetworkStatus {
            name: n.name.clone(),
            mac: effective_mac(&uuid, &n.name, n.mac.as_deref()),
            ip: n.ip.clone(),
        })
        .collect();
    let same_qemu = status.qemu.as_ref().map(|q| q.pid) == qemu;
    if status.phase == phase
        && same_qemu
        && status.uuid.as_deref() == Some(&uuid.to_string())
        && status.networks == networks
    {
        return;
    }
    let qemu_status = qemu.map(|pid| QemuStatus {
        pid,
        start_time: Some(Time(Timestamp::now())),
    });
    let ready = match phase {
        VmPhase::Running => conditions::new(
            "Ready",
            true,
            "Running",
            &format!("QEMU runs on {}", agent.config.host),
        ),
        VmPhase::Stopped if vm.spec.run_strategy == RunStrategy::Stopped => {
            conditions::new("Ready", false, "Stopped", "runStrategy is Stopped")
        }
        VmPhase::Stopped => conditions::new(
            "Ready",
            false,
            "MaintenanceStopped",
            "stopped for a host maintenance",
        ),
        _ => conditions::new(
            "Ready",
            false,
            "Starting",
            &format!("starting on {}", agent.config.host),
        ),
    };
    let patch = conditions::guarded_patch(
        vm.metadata.resource_version.clone(),
        serde_json::json!({
            "phase": phase,
            "qemu": qemu_status,
            "uuid": uuid.to_string(),
            "networks": networks,
            "observedGeneration": vm.metadata.generation,
        }),
        conditions::upsert(&status.conditions, ready),
    );
    patch_status(agent, vm, &patch).await;
}

async fn patch_status(agent: &Agent, vm: &VirtualMachine, patch: &serde_json::Value) {
    let api: Api<VirtualMachine> =
        Api::namespaced(agent.client.clone(), &vm.namespace().unwrap_or_default());
    if let Err(e) = api
        .patch_status(
            &vm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        // A 409 means another writer got there first: the next pass
        // recomputes from the fresh object.
        tracing::debug!(vm = %vm.name_any(), error = %e, "updating VM status failed");
    }
}
