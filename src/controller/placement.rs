//! Initial placement: a VM without a host gets one from the scheduler.
//!
//! A VM that names `placement.pinnedHost` goes there (still filtered, so a
//! full or failed host is refused with the reason in the VM's conditions).

use std::time::Instant;

use k8s_openapi::jiff::Timestamp as Jiff;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::api::vm::RunStrategy;
use crate::api::{VirtualMachine, VmPhase};
use crate::core::scheduler::{self, InFlight, PlacementRequest};
use crate::core::time::Timestamp;

use super::snapshot::{self, id};
use super::{ControllerError, Ctx};

/// Place every unplaced VM that should run.
pub async fn reconcile(ctx: &Ctx) -> Result<(), ControllerError> {
    let unplaced: Vec<_> = ctx
        .vms
        .state()
        .into_iter()
        .filter(|v| {
            v.spec.run_strategy == RunStrategy::Running
                && v.status.as_ref().and_then(|s| s.host.as_ref()).is_none()
        })
        .filter(|v| v.metadata.deletion_timestamp.is_none())
        .collect();
    if unplaced.is_empty() {
        return Ok(());
    }
    let mut recent = ctx.recent.lock().await;
    recent.expire(Instant::now());
    for vm in unplaced {
        let vm_id = id(&vm.namespace().unwrap_or_default(), &vm.name_any());
        if recent.placed.contains_key(&vm_id) {
            continue;
        }
        // Placements made this pass count against capacity at once.
        let extra = recent
            .placed
            .iter()
            .map(|(v, (host, _))| {
                (
                    format!("placement:{v}"),
                    InFlight {
                        vm: v.clone(),
                        source: String::new(),
                        target: Some(host.clone()),
                    },
                )
            })
            .chain(
                recent
                    .targets
                    .iter()
                    .map(|(k, (f, _))| (k.clone(), f.clone())),
            )
            .collect();
        let snap = snapshot::build(
            &ctx.hosts.state(),
            &ctx.vms.state(),
            &ctx.migrations.state(),
            &extra,
        );
        let (_, policy, _) = ctx.policy_for(Some(&vm), None);
        let pinned = vm
            .spec
            .placement
            .as_ref()
            .and_then(|p| p.pinned_host.clone());
        let request = PlacementRequest {
            vm: &vm_id,
            target: pinned.as_deref(),
            ignore_inbound_limit: true,
        };
        let now = Timestamp::from_millis(Jiff::now().as_millisecond());
        let api: Api<VirtualMachine> =
            Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
        let patch = match scheduler::place(&snap, &policy, &request, now) {
            Ok(decision) => match &decision.chosen {
                Some(host) => {
                    recent
                        .placed
                        .insert(vm_id.clone(), (host.clone(), Instant::now()));
                    tracing::info!(vm = %vm_id, %host, "{}", decision.summary());
                    serde_json::json!({"status": {
                        "host": host,
                        "phase": VmPhase::Scheduled,
                        "conditions": [condition("True", "Scheduled", &decision.summary())],
                    }})
                }
                None => serde_json::json!({"status": {
                    "phase": VmPhase::Pending,
                    "conditions": [condition("False", "NoHostFits", &decision.summary())],
                }}),
            },
            Err(e) => serde_json::json!({"status": {
                "phase": VmPhase::Pending,
                "conditions": [condition("False", "NoHostFits", &e.to_string())],
            }}),
        };
        let unchanged = vm.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == "Scheduled"
                    && Some(c.message.as_str())
                        == patch["status"]["conditions"][0]["message"].as_str()
            })
        });
        if unchanged {
            continue;
        }
        api.patch_status(
            &vm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(ControllerError::api("placing a VM"))?;
    }
    Ok(())
}

fn condition(status: &str, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "Scheduled",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Jiff::now()),
    })
}
