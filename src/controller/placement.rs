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

use crate::bridge::conditions;

use super::events::{self, Note};
use super::snapshot::id;
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
        let snap = ctx.snapshot(&extra, super::status::now());
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
        let (fields, condition, chosen) = match scheduler::place(&snap, &policy, &request, now) {
            Ok(decision) => match &decision.chosen {
                Some(host) => (
                    serde_json::json!({"host": host, "phase": VmPhase::Scheduled}),
                    conditions::new("Scheduled", true, "Scheduled", &decision.summary()),
                    Some(host.clone()),
                ),
                None => (
                    serde_json::json!({"phase": VmPhase::Pending}),
                    conditions::new("Scheduled", false, "NoHostFits", &decision.summary()),
                    None,
                ),
            },
            Err(e) => (
                serde_json::json!({"phase": VmPhase::Pending}),
                conditions::new("Scheduled", false, "NoHostFits", &e.to_string()),
                None,
            ),
        };
        let existing = vm.status.clone().unwrap_or_default().conditions;
        let unchanged = chosen.is_none()
            && existing
                .iter()
                .any(|c| c.type_ == "Scheduled" && c.message == condition.message);
        if unchanged {
            continue;
        }
        let patch = conditions::guarded_patch(
            vm.metadata.resource_version.clone(),
            fields,
            conditions::upsert(&existing, condition.clone()),
        );
        match api
            .patch_status(
                &vm.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                let note = if chosen.is_some() {
                    Note::normal("Scheduled", "Place", condition.message.clone())
                } else {
                    Note::warning("FailedScheduling", "Place", condition.message.clone())
                };
                ctx.events.publish(&events::reference(&*vm), note).await;
                if let Some(host) = chosen {
                    tracing::info!(vm = %vm_id, %host, "{}", condition.message);
                    recent.placed.insert(vm_id.clone(), (host, Instant::now()));
                }
            }
            // Another writer changed the VM: place it on the next pass.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => return Err(ControllerError::api("placing a VM")(e)),
        }
    }
    Ok(())
}
