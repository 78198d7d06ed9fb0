//! The HostMaintenance reconciler: cordon the host, one live Migration per
//! VM, progress and blockers; a dry run only plans.
//!
//! ```text
//!            dryRun ──► core::drain::plan ──► status.plan ──► Planned (moves nothing)
//!  Pending ──┤
//!            └► cordon (Host spec.unschedulable) ──► Draining
//!                 each pass: assess (see `assess`) ─► create / stop / quarantine
//!                 no VM left and no blocker ─────────► Completed
//!                 deadline passed, or only final blockers left ─► Failed
//!  deleted ──► cancel in-flight drain migrations (spec.cancel) ─► wait until final
//!              ─► restart VMs it stopped, uncordon (unless another drain holds
//!                 the host) ─► remove the finalizer
//! ```
//!
//! Pacing: every Migration is created at once, in drain order (largest
//! memory first, like the plan). The Migration reconciler's admission queue
//! (FIFO within a priority) enforces `parallelMigrationsPerCluster`,
//! `parallelOutboundPerHost` and `parallelInboundPerHost`; creating them
//! all makes the queue, and `kubectl get mig`, show the whole drain.
//!
//! Idempotence: a Migration's name is `<maintenance>-<vm>-<attempt>`, so a
//! pass repeated on a stale cache, or by a restarted controller, gets 409
//! from the API instead of a second move; and a VM with a Succeeded attempt
//! is never given another (its cache entry may still show the old host).
//!
//! `nonMigratable: Stop`: the drain does not change the user's spec
//! (`runStrategy`) nor the VM's placement (`status.host`, the one truth of
//! where it runs, which would send it to another host through placement).
//! It sets the VM's condition `MaintenanceStopped=True` (reason
//! `HostMaintenance`, message naming the maintenance); the agent stops a VM
//! with that condition and does not start it while it holds. Deleting the
//! maintenance removes the condition and the agent starts the VM again.

mod act;
pub mod assess;
pub mod conditions;
mod plan;
pub mod report;

use crate::controller::status::now;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::api::maintenance::{Blocker, HostMaintenanceStatus, MaintenancePhase, NonMigratable};
use crate::api::{HostMaintenance, MAINTENANCE_LABEL, Migration, MigrationPhase};

use super::events::{self, Note};
use super::snapshot;
use super::status::to_core;
use super::{ControllerError, Ctx};
use assess::{AttemptView, VmView};

/// The finalizer that cancels a deleted maintenance's migrations first.
pub const FINALIZER: &str = "ferry.dev/maintenance";
/// The VM condition that keeps a VM stopped for a maintenance.
pub const STOPPED_CONDITION: &str = "MaintenanceStopped";
/// The label naming a drain Migration's attempt number.
pub const ATTEMPT_LABEL: &str = "ferry.dev/attempt";
/// How often a draining maintenance is looked at besides its triggers (VM
/// moves do not trigger it).
const POLL: Duration = Duration::from_secs(2);

type Context = Ctx;

/// Run the HostMaintenance controller until `shutdown`.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let api = Api::<HostMaintenance>::all(ctx.client.clone());
    let context = ctx.clone();
    Controller::new(api, watcher::Config::default())
        .watches(
            Api::<Migration>::all(ctx.client.clone()),
            watcher::Config::default().labels(MAINTENANCE_LABEL),
            |m: Migration| {
                m.labels()
                    .get(MAINTENANCE_LABEL)
                    .map(|n| ObjectRef::<HostMaintenance>::new(n))
            },
        )
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, context)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "maintenance reconcile");
            }
        })
        .await;
}

fn error_policy(_m: Arc<HostMaintenance>, e: &ControllerError, _: Arc<Context>) -> Requeue {
    tracing::warn!(error = %e, reason = e.reason(), "maintenance reconcile failed; retrying");
    Requeue::requeue(Duration::from_secs(2))
}

/// The drain's Migrations (from the cache).
fn drain_migrations(ctx: &Ctx, name: &str) -> Vec<Arc<Migration>> {
    ctx.migrations
        .state()
        .into_iter()
        .filter(|m| m.labels().get(MAINTENANCE_LABEL).map(String::as_str) == Some(name))
        .collect()
}

fn is_final(p: MigrationPhase) -> bool {
    matches!(
        p,
        MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
    )
}

fn phase_of(m: &Migration) -> MigrationPhase {
    m.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// Whether a VM holds this maintenance's stop condition.
pub fn stopped_by(vm: &crate::api::VirtualMachine, maintenance: &str) -> bool {
    vm.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == STOPPED_CONDITION
                && c.status == "True"
                && c.message
                    .contains(&format!("HostMaintenance {maintenance}:"))
        })
    })
}

/// Record an Event about the maintenance.
async fn publish(ctx: &Ctx, hm: &HostMaintenance, note: Note) {
    ctx.events.publish(&events::reference(hm), note).await;
}

#[tracing::instrument(skip_all, fields(maintenance = %hm.name_any(), host = %hm.spec.host))]
async fn reconcile(
    hm: Arc<HostMaintenance>,
    context: Arc<Context>,
) -> Result<Requeue, ControllerError> {
    let ctx = &*context;
    let name = hm.name_any();
    let api: Api<HostMaintenance> = Api::all(ctx.client.clone());
    if hm.metadata.deletion_timestamp.is_some() {
        return finish(ctx, &hm).await;
    }
    if !hm.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = hm.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": hm.resource_version()}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(ControllerError::api("adding the maintenance finalizer"))?;
        return Ok(Requeue::requeue(Duration::ZERO));
    }
    let status = hm.status.clone().unwrap_or_default();
    if hm.spec.dry_run {
        if status.phase == MaintenancePhase::Pending {
            let next = plan::dry_run(ctx, &hm);
            let phase = next.phase;
            write_status(&api, &hm, &next).await?;
            publish(
                ctx,
                &hm,
                Note::normal(
                    &format!("{phase:?}"),
                    "Plan",
                    next.message.clone().unwrap_or_default(),
                ),
            )
            .await;
        }
        return Ok(Requeue::await_change());
    }
    if matches!(
        status.phase,
        MaintenancePhase::Completed | MaintenancePhase::Failed
    ) {
        return Ok(Requeue::await_change());
    }
    act::cordon(ctx, &hm.spec.host, true).await?;
    drain(ctx, &hm, status).await
}

/// One pass of a real drain.
async fn drain(
    ctx: &Ctx,
    hm: &HostMaintenance,
    status: HostMaintenanceStatus,
) -> Result<Requeue, ControllerError> {
    let name = hm.name_any();
    let host = hm.spec.host.as_str();
    let t = now();
    let mine = drain_migrations(ctx, &name);
    let all = ctx.migrations.state();
    let on_host: Vec<Arc<crate::api::VirtualMachine>> = ctx
        .vms
        .state()
        .into_iter()
        .filter(|v| v.status.as_ref().and_then(|s| s.host.as_deref()) == Some(host))
        .collect();
    let views: Vec<VmView> = on_host
        .iter()
        .map(|v| {
            let info = snapshot::vm_info(v);
            VmView {
                namespace: v.namespace().unwrap_or_default(),
                name: v.name_any(),
                memory: info.resources.memory,
                migratable: info.migratable,
                quarantined: info.quarantined,
                stopped: stopped_by(v, &name),
            }
        })
        .collect();
    let attempts = |vm: &VmView| -> Vec<AttemptView> {
        mine.iter()
            .filter(|m| {
                m.namespace().as_deref() == Some(vm.namespace.as_str()) && m.spec.vm_name == vm.name
            })
            .map(|m| act::attempt_view(m))
            .collect()
    };
    let history = |vm: &VmView| act::failures_of(&all, &vm.namespace, &vm.name);
    let a = assess::assess(
        &views,
        hm.spec.non_migratable == NonMigratable::Stop,
        &attempts,
        &history,
        &ctx.config.drain_retry,
        t,
    );
    let started = hm
        .metadata
        .creation_timestamp
        .as_ref()
        .map(to_core)
        .unwrap_or(t);
    let late = hm
        .spec
        .deadline
        .as_ref()
        .is_some_and(|d| t.since(started) >= d.get());
    // Past the deadline the drain gives up: nothing new is started (what
    // is in flight finishes under its own deadlines).
    for step in a
        .acts
        .iter()
        .filter(|s| !(late && matches!(s, assess::Act::Create { .. })))
    {
        act::carry_out(ctx, hm, step).await?;
    }
    let only_final = !a.blocked.is_empty() && a.moving == 0 && a.blocked.iter().all(|b| b.fin);
    let (phase, message) = if a.remaining == 0 {
        (MaintenancePhase::Completed, format!("{host} is empty"))
    } else if late {
        (
            MaintenancePhase::Failed,
            format!(
                "the deadline passed with {} VMs still on {host}; no new migrations are started",
                a.remaining
            ),
        )
    } else if only_final {
        (
            MaintenancePhase::Failed,
            format!("{} VMs cannot leave {host}; see blockers", a.blocked.len()),
        )
    } else {
        (
            MaintenancePhase::Draining,
            format!(
                "{} of the VMs left, {} moving, {} blocked",
                a.remaining,
                a.moving,
                a.blocked.len()
            ),
        )
    };
    let mut names: Vec<String> = status.migrations.clone();
    for m in &mine {
        let n = m.name_any();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    for step in a.acts.iter().filter(|_| !late) {
        if let assess::Act::Create { vm, index, .. } = step {
            let n = act::migration_name(&name, vm, *index);
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    let total = status
        .vms_total
        .max(u32::try_from(on_host.len()).unwrap_or(u32::MAX));
    let blockers: Vec<Blocker> = a
        .blocked
        .iter()
        .map(|b| Blocker {
            namespace: b.namespace.clone(),
            vm: b.vm.clone(),
            reason: b.reason.clone(),
            message: b.message.clone(),
        })
        .collect();
    let conditions = conditions::conditions(
        &status.conditions,
        &conditions::Facts {
            host,
            phase,
            total,
            remaining: a.remaining,
            blockers: &blockers,
            deadline: hm.spec.deadline.as_ref().map(|d| d.get()),
            late,
        },
        super::status::to_api(t),
    );
    let next = HostMaintenanceStatus {
        phase,
        vms_total: total,
        vms_remaining: a.remaining,
        vms_blocked: u32::try_from(a.blocked.len()).unwrap_or(u32::MAX),
        migrations: names,
        blockers,
        plan: None,
        message: Some(message.clone()),
        observed_generation: hm.metadata.generation,
        conditions,
    };
    write_status(&Api::all(ctx.client.clone()), hm, &next).await?;
    report::announce(ctx, hm, &status, &next, late).await;
    Ok(match phase {
        MaintenancePhase::Draining => Requeue::requeue(
            a.next_retry
                .map_or(POLL, |at| assess::until(at, t).min(POLL)),
        ),
        _ => Requeue::await_change(),
    })
}

async fn write_status(
    api: &Api<HostMaintenance>,
    hm: &HostMaintenance,
    next: &HostMaintenanceStatus,
) -> Result<(), ControllerError> {
    if hm.status.as_ref() == Some(next) {
        return Ok(());
    }
    let mut value = serde_json::to_value(next).unwrap_or_default();
    // A merge patch leaves out what serde skips: clear those explicitly.
    if let Some(s) = value.as_object_mut() {
        for key in ["migrations", "blockers", "plan", "message"] {
            s.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    let patch = serde_json::json!({"status": value});
    api.patch_status(
        &hm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(ControllerError::api("writing the maintenance status"))?;
    Ok(())
}

/// The deleted maintenance: cancel, wait, restore, release.
async fn finish(ctx: &Ctx, hm: &HostMaintenance) -> Result<Requeue, ControllerError> {
    let name = hm.name_any();
    if !hm.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Requeue::await_change());
    }
    let live: Vec<Arc<Migration>> = drain_migrations(ctx, &name)
        .into_iter()
        .filter(|m| !is_final(phase_of(m)))
        .collect();
    if !live.is_empty() {
        let mut cancelled = Vec::new();
        for m in &live {
            if !m.spec.cancel {
                act::cancel(ctx, m).await?;
                cancelled.push(format!(
                    "{}/{}",
                    m.namespace().unwrap_or_default(),
                    m.spec.vm_name
                ));
            }
        }
        if !cancelled.is_empty() {
            publish(
                ctx,
                hm,
                Note::normal(
                    "Cancelling",
                    "Cancel",
                    format!(
                        "cancelling the migrations of {} before returning {} to service",
                        cancelled.join(", "),
                        hm.spec.host
                    ),
                ),
            )
            .await;
        }
        return Ok(Requeue::requeue(Duration::from_millis(500)));
    }
    if !hm.spec.dry_run {
        for vm in ctx.vms.state() {
            if stopped_by(&vm, &name) {
                act::set_stopped(ctx, &vm, &name, false).await?;
            }
        }
        let others = ctx.maintenances.state().into_iter().any(|o| {
            o.name_any() != name
                && o.spec.host == hm.spec.host
                && !o.spec.dry_run
                && o.metadata.deletion_timestamp.is_none()
        });
        if !others {
            act::cordon(ctx, &hm.spec.host, false).await?;
        }
        report::ended(ctx, hm, &report::Outcome::of(&drain_migrations(ctx, &name))).await;
    }
    let finalizers: Vec<String> = hm
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let patch = serde_json::json!({"metadata": {"finalizers": finalizers}});
    match Api::<HostMaintenance>::all(ctx.client.clone())
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(Requeue::await_change()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Requeue::await_change()),
        Err(e) => Err(ControllerError::api("removing the maintenance finalizer")(
            e,
        )),
    }
}
