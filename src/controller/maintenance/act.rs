//! The API calls of a drain: cordon, create a Migration, cancel one, stop or
//! quarantine a VM (conditions written with the VM's resourceVersion, so a
//! concurrent status writer is never overwritten).

use std::str::FromStr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};

use super::assess::{Act, AttemptView};
use super::{ATTEMPT_LABEL, STOPPED_CONDITION, publish};
use crate::api::{
    Host, HostMaintenance, MAINTENANCE_LABEL, Migration, MigrationPhase, MigrationSpec,
    MigrationType, VirtualMachine,
};
use crate::controller::events::{self, Note};
use crate::controller::status::{to_api, to_core};
use crate::controller::{ControllerError, Ctx};
use crate::core::drain::Attempt;
use crate::core::migration::FailureReason;

/// Mark the host unschedulable (or schedulable again).
pub async fn cordon(ctx: &Ctx, host: &str, on: bool) -> Result<(), ControllerError> {
    let cached = ctx.hosts.state().into_iter().find(|h| h.name_any() == host);
    if cached.as_ref().is_some_and(|h| h.spec.unschedulable == on) {
        return Ok(());
    }
    let api: Api<Host> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({"spec": {"unschedulable": on}});
    match api
        .patch(host, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // A maintenance of a host that does not exist cordons nothing.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(ControllerError::api("cordoning the host")(e)),
    }
}

/// The Migration name of a drain's attempt: `<maintenance>-<vm>-<n>`,
/// shortened with a stable hash beyond the 253-character limit.
pub fn migration_name(maintenance: &str, vm: &str, index: u32) -> String {
    let full = format!("{maintenance}-{vm}-{index}");
    if full.len() <= 253 {
        return full;
    }
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut prefix: String = full.chars().take(220).collect();
    while prefix.ends_with('.') || prefix.ends_with('-') {
        prefix.pop();
    }
    format!("{prefix}-{hash:016x}-{index}")
}

/// A drain Migration as the assessment sees it.
pub fn attempt_view(m: &Migration) -> AttemptView {
    let status = m.status.clone().unwrap_or_default();
    AttemptView {
        index: m
            .labels()
            .get(ATTEMPT_LABEL)
            .and_then(|n| n.parse().ok())
            .unwrap_or(1),
        phase: status.phase,
        reason: status
            .failure_reason
            .as_deref()
            .and_then(|r| FailureReason::from_str(r).ok()),
        message: status.message.clone().unwrap_or_default(),
        completed: status
            .timestamps
            .as_ref()
            .and_then(|t| t.completed.as_ref())
            .map(to_core),
    }
}

/// Every failed migration of a VM, whoever made it (quarantine counts them).
pub fn failures_of(all: &[std::sync::Arc<Migration>], namespace: &str, vm: &str) -> Vec<Attempt> {
    all.iter()
        .filter(|m| m.namespace().as_deref() == Some(namespace) && m.spec.vm_name == vm)
        .filter(|m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.phase == MigrationPhase::Failed)
        })
        .map(|m| {
            let v = attempt_view(m);
            Attempt {
                at: v.completed.unwrap_or_else(|| {
                    m.metadata
                        .creation_timestamp
                        .as_ref()
                        .map(to_core)
                        .unwrap_or_default()
                }),
                reason: v.reason.unwrap_or(FailureReason::TransferFailed),
            }
        })
        .collect()
}

/// Carry out one step of the assessment.
pub async fn carry_out(ctx: &Ctx, hm: &HostMaintenance, step: &Act) -> Result<(), ControllerError> {
    match step {
        Act::Create {
            namespace,
            vm,
            index,
        } => create(ctx, hm, namespace, vm, *index).await,
        Act::Stop { namespace, vm } => {
            let Some(v) = find_vm(ctx, namespace, vm) else {
                return Ok(());
            };
            set_stopped(ctx, &v, &hm.name_any(), true).await?;
            publish(
                ctx,
                hm,
                Note::normal(
                    "Stopped",
                    "Drain",
                    format!(
                        "{namespace}/{vm} is not migratable: stopped until the maintenance ends"
                    ),
                )
                .about(events::reference(&*v)),
            )
            .await;
            Ok(())
        }
        Act::Quarantine {
            namespace,
            vm,
            message,
        } => {
            let Some(v) = find_vm(ctx, namespace, vm) else {
                return Ok(());
            };
            set_condition(
                ctx,
                &v,
                condition("Quarantined", "RepeatedFailures", message),
            )
            .await?;
            let note = Note::warning(
                "Quarantined",
                "Retry",
                format!("{namespace}/{vm}: {message}"),
            );
            publish(ctx, hm, note.clone().about(events::reference(&*v))).await;
            ctx.events
                .publish(&events::reference(&*v), note.about(events::reference(hm)))
                .await;
            Ok(())
        }
    }
}

fn find_vm(ctx: &Ctx, namespace: &str, name: &str) -> Option<std::sync::Arc<VirtualMachine>> {
    ctx.vms
        .state()
        .into_iter()
        .find(|v| v.namespace().as_deref() == Some(namespace) && v.name_any() == name)
}

async fn create(
    ctx: &Ctx,
    hm: &HostMaintenance,
    namespace: &str,
    vm: &str,
    index: u32,
) -> Result<(), ControllerError> {
    let name = migration_name(&hm.name_any(), vm, index);
    let owner = hm.controller_owner_ref(&());
    let m = Migration {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(
                [
                    (MAINTENANCE_LABEL.to_string(), hm.name_any()),
                    (ATTEMPT_LABEL.to_string(), index.to_string()),
                ]
                .into(),
            ),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: MigrationSpec {
            vm_name: vm.to_string(),
            migration_type: MigrationType::Live,
            target_host: hm.spec.target_host.clone(),
            policy: hm.spec.policy.clone(),
            cancel: false,
        },
        status: None,
    };
    let api: Api<Migration> = Api::namespaced(ctx.client.clone(), namespace);
    match api.create(&PostParams::default(), &m).await {
        Ok(_) => {
            tracing::info!(migration = %name, vm = %vm, attempt = index, "drain migration created");
            let about = events::migration_reference(namespace, &name);
            let note = if index > 1 {
                Note::normal(
                    "Retrying",
                    "Retry",
                    format!("{namespace}/{vm}: attempt {index} ({name})"),
                )
            } else {
                Note::normal(
                    "MigrationCreated",
                    "Drain",
                    format!("{namespace}/{vm}: Migration {name}"),
                )
            };
            publish(ctx, hm, note.about(about)).await;
            Ok(())
        }
        // Created before (a stale cache or a restarted controller): the
        // same attempt is never made twice.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(ControllerError::api("creating a drain migration")(e)),
    }
}

/// Ask for a drain Migration to be cancelled.
pub async fn cancel(ctx: &Ctx, m: &Migration) -> Result<(), ControllerError> {
    let api: Api<Migration> =
        Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
    let patch = serde_json::json!({"spec": {"cancel": true}});
    match api
        .patch(
            &m.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(ControllerError::api("cancelling a drain migration")(e)),
    }
}

fn condition(type_: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: "True".into(),
        reason: reason.into(),
        message: message.chars().take(32_000).collect(),
        last_transition_time: to_api(crate::controller::status::now()),
        observed_generation: None,
    }
}

/// Put `MaintenanceStopped` on the VM (or take it off).
pub async fn set_stopped(
    ctx: &Ctx,
    vm: &VirtualMachine,
    maintenance: &str,
    on: bool,
) -> Result<(), ControllerError> {
    if on {
        let c = condition(
            STOPPED_CONDITION,
            "HostMaintenance",
            &format!(
                "stopped by HostMaintenance {maintenance}: not migratable, nonMigratable is Stop"
            ),
        );
        set_condition(ctx, vm, c).await
    } else {
        write_conditions(ctx, vm, |cs| cs.retain(|c| c.type_ != STOPPED_CONDITION)).await
    }
}

async fn set_condition(
    ctx: &Ctx,
    vm: &VirtualMachine,
    c: Condition,
) -> Result<(), ControllerError> {
    write_conditions(ctx, vm, move |cs| {
        cs.retain(|x| x.type_ != c.type_);
        cs.push(c);
    })
    .await
}

/// Rewrite the VM's conditions. A merge patch replaces the whole list, so
/// it carries the resourceVersion it was computed from: a concurrent
/// writer makes it fail (409) and the next pass recomputes.
async fn write_conditions(
    ctx: &Ctx,
    vm: &VirtualMachine,
    change: impl FnOnce(&mut Vec<Condition>),
) -> Result<(), ControllerError> {
    let mut conditions = vm.status.clone().unwrap_or_default().conditions;
    change(&mut conditions);
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": vm.resource_version()},
        "status": {"conditions": conditions},
    });
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    match api
        .patch_status(
            &vm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(ControllerError::api("writing a VM condition")(e)),
    }
}
