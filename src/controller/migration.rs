//! The Migration reconciler: observe → `core::migration::decide` → act.
//!
//! One reconcile reads only the caches (and the scheduler's and the queue's
//! answers when the decision asks for them), calls the pure decision, then
//! carries out its actions: the status patch (the recorded state), the VM's
//! `status.host` / `status.migration`, the finalizer, Events. It never
//! depends on why it was triggered.

use crate::controller::status::now;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::api::migration::{RejectedHost, SchedulingDecision as ApiDecision};
use crate::api::{AUTOMATIC_LABEL, MAINTENANCE_LABEL, Migration, MigrationType, VirtualMachine};
use crate::core::admission::{Origin, Stage, Step, frees, releases_batch};
use crate::core::migration::{
    self as machine, Action, EventType as CoreEventType, HostHealth, MigrationKind, Observation,
    PlacementOutcome, VmObservation,
};
use crate::core::policy::EffectivePolicy;
use crate::core::scheduler::{self, InFlight, PlacementRequest, Verdict};

use super::events::{self, Note};
use super::snapshot::{self, id};
use super::status::{phase_of, source_report, state_of, status_patch, target_report};
use super::{ControllerError, Ctx};

/// Most decisions one reconcile follows before writing (`Pending` to
/// `PreparingTarget` is five).
const MAX_STEPS: usize = 8;

/// How soon a reconcile that met a stale cache looks again, should the
/// event of its own write not come first.
const STALE_RECHECK: Duration = Duration::from_millis(200);

/// The finalizer that lets a deleted Migration be cancelled first.
pub const FINALIZER: &str = "ferry.dev/migration";

/// Run the Migration controller until `shutdown`.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let api = Api::<Migration>::all(ctx.client.clone());
    // A slot given up (a transfer's end, a prepared target starting its
    // transfer, a migration ending): look again at once at the Migrations
    // the queue now lets go — only those.
    let freed = futures::stream::unfold(ctx.clone(), |ctx| async move {
        ctx.slot_freed.notified().await;
        let wake = super::admission::wake_set(&ctx).await;
        Some((futures::stream::iter(wake), ctx))
    })
    .flatten();
    let context = ctx;
    Controller::new(api, watcher::Config::default())
        // A VM names the Migration that holds it: its host written (the
        // commit of a move) lets that Migration finish at once, instead of
        // at its next poll while it still holds a slot.
        .watches(
            Api::<VirtualMachine>::all(context.client.clone()),
            watcher::Config::default(),
            |vm: VirtualMachine| {
                let namespace = vm.namespace()?;
                let name = vm.status?.migration?;
                Some(ObjectRef::<Migration>::new(&name).within(&namespace))
            },
        )
        .reconcile_on(freed)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, context)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "migration reconcile");
            }
        })
        .await;
}

type Context = Ctx;

fn error_policy(_m: Arc<Migration>, e: &ControllerError, _ctx: Arc<Context>) -> Requeue {
    tracing::warn!(error = %e, reason = e.reason(), "migration reconcile failed; retrying");
    Requeue::requeue(Duration::from_secs(2))
}

fn kind(t: MigrationType) -> MigrationKind {
    match t {
        MigrationType::Live => MigrationKind::Live,
        MigrationType::Cold => MigrationKind::Cold,
        MigrationType::Evacuate => MigrationKind::Evacuate,
    }
}

fn health(ctx: &Ctx, host: Option<&str>) -> HostHealth {
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return HostHealth::Missing;
    };
    match ctx.hosts.state().into_iter().find(|h| h.name_any() == host) {
        None => HostHealth::Missing,
        Some(h) => match h.status.clone().unwrap_or_default().phase {
            crate::api::HostPhase::Active | crate::api::HostPhase::Maintenance => HostHealth::Ready,
            crate::api::HostPhase::Fenced => HostHealth::Fenced,
            crate::api::HostPhase::Unreachable | crate::api::HostPhase::Failed => {
                HostHealth::Unreachable
            }
        },
    }
}

pub(super) fn origin(m: &Migration) -> Origin {
    if m.spec.migration_type == MigrationType::Evacuate {
        Origin::Evacuation
    } else if m.labels().contains_key(AUTOMATIC_LABEL) {
        Origin::Balancing
    } else if m.labels().contains_key(MAINTENANCE_LABEL) {
        Origin::Maintenance
    } else {
        Origin::User
    }
}

/// Most hosts a status lists by name; beyond, the summary counts them by
/// reason (a decision over 10,000 hosts would not fit in an object).
const MAX_REJECTED: usize = 50;

/// The core's scheduling decision as the API records it.
fn api_decision(d: &scheduler::SchedulingDecision) -> ApiDecision {
    let mut reason = d.summary();
    if d.hosts.len() > MAX_REJECTED + 1 {
        reason.push_str(&format!(
            "; the first {MAX_REJECTED} other hosts are listed, by reason: {:?}",
            d.rejections_by_reason()
        ));
    }
    ApiDecision {
        chosen: d.chosen.clone(),
        policy: Some(format!("{:?}", d.policy)),
        reason: Some(reason),
        rejected: d
            .hosts
            .iter()
            .filter_map(|h| match &h.verdict {
                Verdict::Chosen(_) => None,
                Verdict::ScoredLower(s) => Some(RejectedHost {
                    host: h.host.to_string(),
                    reason: "ScoredLower".into(),
                    message: format!(
                        "fits, but scored {:.1} (CPU {:.0}% → {:.0}%)",
                        s.score, s.cpu_now, s.cpu_projected
                    ),
                }),
                Verdict::Rejected(rs) => Some(RejectedHost {
                    host: h.host.to_string(),
                    reason: rs.first().map_or("Rejected", |r| r.reason()).to_string(),
                    message: rs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                }),
            })
            .take(MAX_REJECTED)
            .collect(),
    }
}

/// The Event note of a chosen target: the scheduler's summary and the
/// hosts it refused, with why.
fn chosen_note(host: &str, d: &ApiDecision) -> String {
    let refused: Vec<String> = d
        .rejected
        .iter()
        .filter(|r| r.reason != "ScoredLower" && r.reason != "IsSource")
        .map(|r| format!("{} ({}: {})", r.host, r.reason, r.message))
        .collect();
    let summary = d.reason.clone().unwrap_or_else(|| format!("{host} chosen"));
    if refused.is_empty() {
        summary
    } else {
        format!("{summary}; refused: {}", refused.join(", "))
    }
}

/// Run the scheduler for this migration (under the scheduling lock).
async fn place(
    ctx: &Ctx,
    m: &Migration,
    key: &str,
    vm_id: &str,
    policy: &EffectivePolicy,
) -> (PlacementOutcome, ApiDecision) {
    let mut recent = ctx.recent.lock().await;
    recent.expire(Instant::now());
    let extra = recent
        .targets
        .iter()
        .filter(|(k, _)| k.as_str() != key)
        .map(|(k, (f, _))| (k.clone(), f.clone()))
        .collect();
    let snap = ctx.snapshot(&extra, now());
    let request = PlacementRequest {
        vm: vm_id,
        target: m.spec.target_host.as_deref(),
        ignore_inbound_limit: true,
    };
    match scheduler::place(&snap, policy, &request, now()) {
        Ok(d) => {
            let api = api_decision(&d);
            match &d.chosen {
                Some(host) => {
                    let source = ctx
                        .vms
                        .state()
                        .into_iter()
                        .find(|v| id(&v.namespace().unwrap_or_default(), &v.name_any()) == vm_id)
                        .and_then(|v| v.status.clone().and_then(|s| s.host))
                        .unwrap_or_default();
                    recent.targets.insert(
                        key.to_string(),
                        (
                            InFlight {
                                vm: vm_id.to_string(),
                                source,
                                target: Some(host.clone()),
                            },
                            Instant::now(),
                        ),
                    );
                    (PlacementOutcome::Chosen { host: host.clone() }, api)
                }
                None => (
                    PlacementOutcome::NoHost {
                        summary: d.summary(),
                    },
                    api,
                ),
            }
        }
        Err(e) => (
            PlacementOutcome::NoHost {
                summary: e.to_string(),
            },
            ApiDecision {
                chosen: None,
                policy: None,
                reason: Some(e.to_string()),
                rejected: Vec::new(),
            },
        ),
    }
}

async fn reconcile(m: Arc<Migration>, context: Arc<Context>) -> Result<Requeue, ControllerError> {
    let ctx = &*context;
    let namespace = m.namespace().unwrap_or_default();
    let regarding = events::reference(&*m);
    let vm_ref = events::vm_reference(&namespace, &m.spec.vm_name);
    let name = m.name_any();
    let key = id(&namespace, &name);
    let api: Api<Migration> = Api::namespaced(ctx.client.clone(), &namespace);
    let status = m.status.clone().unwrap_or_default();
    let state = state_of(&status, now());
    let deleted = m.metadata.deletion_timestamp.is_some();
    // The cache may still show the very version this controller last acted
    // on, after its own status write: deciding again from it would redo
    // (or undo) that step. The write's own event brings the next look.
    if ctx
        .recent
        .lock()
        .await
        .acted_on(&key, m.resource_version().as_deref())
    {
        tracing::debug!(migration = %key, "the cache is behind this controller's last write");
        return Ok(Requeue::requeue(STALE_RECHECK));
    }

    let mut stale_versions: Vec<String> = Vec::new();
    if !deleted && !state.phase().is_terminal() && !m.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = m.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": m.resource_version()}});
        // Added, the reconcile goes on: the status is its own subresource.
        let patched = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(ControllerError::api("adding the migration finalizer"))?;
        // The version it made is older than the status about to be
        // written: a reconcile of it would decide this step again.
        stale_versions.extend(patched.resource_version());
    }

    let vm = ctx.vms.state().into_iter().find(|v| {
        v.namespace().as_deref() == Some(namespace.as_str()) && v.name_any() == m.spec.vm_name
    });
    let (policy_name, policy, missing_policy) =
        ctx.policy_for(vm.as_deref(), m.spec.policy.as_deref());
    let vm_obs = match &vm {
        None => VmObservation::Missing,
        Some(v) => VmObservation::Present {
            host: v.status.clone().and_then(|s| s.host),
            migratable: v.spec.migratable,
            unsafe_disk_cache: snapshot::unsafe_disk_cache(v),
            memory: v.spec.memory.bytes(),
        },
    };
    let vm_host = vm
        .as_ref()
        .and_then(|v| v.status.clone().and_then(|s| s.host));
    let (source_name, target_name) = match state.hosts() {
        Some((s, t)) => (Some(s.to_string()), Some(t.to_string())),
        None => (vm_host.clone(), None),
    };
    let mut observation = Observation {
        state: state.clone(),
        kind: kind(m.spec.migration_type),
        cancel_requested: m.spec.cancel,
        deleted,
        missing_policy,
        vm: vm_obs,
        source_health: health(ctx, source_name.as_deref()),
        target_health: target_name.as_deref().map(|t| health(ctx, Some(t))),
        placement: None,
        admission: None,
        target: target_report(&status, now()),
        source: source_report(&status, now()),
    };
    let vm_id = id(&namespace, &m.spec.vm_name);
    let evacuation = m.spec.migration_type == MigrationType::Evacuate;
    let mut decision = machine::decide(&observation, &policy, now());
    let mut scheduling = None;
    // Steps already passed in this reconcile: their actions are carried out
    // with the last one's, and only where they end is written.
    let mut passed = Vec::new();
    // The decision may ask for the scheduler's or the queue's answer: give
    // it and decide again; a step that looks again at once is followed at
    // once (`Decision::continues`).
    for _ in 0..MAX_STEPS {
        if decision.actions.contains(&Action::ScheduleTarget) && observation.placement.is_none() {
            let (outcome, api_decision) = place(ctx, &m, &key, &vm_id, &policy).await;
            observation.placement = Some(outcome);
            scheduling = Some(api_decision);
        } else if decision.actions.contains(&Action::RequestAdmission)
            && observation.admission.is_none()
        {
            let step = match (observation.state.phase(), evacuation) {
                (machine::Phase::Queued, false) => Step::Prepare,
                _ => Step::Transfer,
            };
            let hosts = observation.state.hosts().unwrap_or_default();
            observation.admission =
                Some(super::admission::admit(ctx, &key, hosts, step, &policy).await);
        } else if decision.continues(&observation.state) {
            observation.state = decision.next.clone();
            observation.placement = None;
            observation.admission = None;
            passed.append(&mut decision.actions);
        } else {
            break;
        }
        decision = machine::decide(&observation, &policy, now());
    }
    passed.append(&mut decision.actions);
    decision.actions = passed;
    // A slot given up: the queue looks again. At once when the cache
    // already shows it free (the source reported the end of its stream),
    // else once the new phase is written.
    let freed = frees(state.phase(), decision.next.phase(), evacuation);
    let free_in_cache =
        freed.is_some_and(|f| super::admission::cached_stage(&m).and_then(Stage::slot) != Some(f));
    if let Some(f) = freed.filter(|_| free_in_cache) {
        // The admission's cache is not this reconcile's: it may not show
        // the report yet.
        super::admission::notify_once_cached(context.clone(), &m, super::admission::shows_free(f));
    }

    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &namespace);
    // The VM's side first: a phase recorded as final then implies it.
    for action in &decision.actions {
        match action {
            Action::SetVmMigrating => {
                let patch = serde_json::json!({"status": {"migration": name}});
                patch_vm(&vms, &m.spec.vm_name, &patch).await?;
            }
            Action::ClearVmMigration => {
                if vm
                    .as_ref()
                    .and_then(|v| v.status.clone())
                    .and_then(|s| s.migration)
                    .as_deref()
                    == Some(name.as_str())
                {
                    patch_vm(
                        &vms,
                        &m.spec.vm_name,
                        &serde_json::json!({"status": {"migration": null}}),
                    )
                    .await?;
                }
            }
            Action::SetVmHost { host } => {
                // The commit point of a move: from here the VM's truth is the target.
                let patch = serde_json::json!({"status": {"host": host}});
                patch_vm(&vms, &m.spec.vm_name, &patch).await?;
            }
            Action::MarkVmFailed { message } => {
                if let Some(vm) = &vm {
                    let existing = vm.status.clone().unwrap_or_default().conditions;
                    let patch = crate::bridge::conditions::guarded_patch(
                        vm.metadata.resource_version.clone(),
                        serde_json::json!({"phase": "Failed"}),
                        crate::bridge::conditions::upsert(
                            &existing,
                            crate::bridge::conditions::new(
                                "Ready",
                                false,
                                "PostCopyInterrupted",
                                message,
                            ),
                        ),
                    );
                    patch_vm(&vms, &m.spec.vm_name, &patch).await?;
                }
            }
            Action::RemoveFinalizer
            | Action::EmitEvent { .. }
            | Action::ScheduleTarget
            | Action::StoreSchedulingDecision
            | Action::RequestAdmission
            | Action::AssignTarget { .. }
            | Action::PrepareTarget { .. }
            | Action::StartTransfer { .. }
            | Action::RequestAbort { .. } => {}
        }
    }
    let changed_state = decision.next != state;
    let previous_reason = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .map(|c| (c.reason.clone(), c.message.clone()));
    let changed_words =
        previous_reason.as_ref() != Some(&(decision.reason.to_string(), decision.message.clone()));
    let terminal_before = state.phase().is_terminal();
    if (changed_state || changed_words || scheduling.is_some()) && !terminal_before {
        let mut patch = status_patch(&status, &decision.next, decision.reason, &decision.message);
        if let Some(s) = patch.get_mut("status").and_then(|s| s.as_object_mut()) {
            if let Some(d) = &scheduling
                && decision.actions.contains(&Action::StoreSchedulingDecision)
            {
                s.insert(
                    "schedulingDecision".into(),
                    serde_json::to_value(d).unwrap_or_default(),
                );
            }
            if status.policy.is_none() {
                s.insert("policy".into(), serde_json::json!(policy_name));
            }
            s.insert(
                "observedGeneration".into(),
                serde_json::json!(m.metadata.generation),
            );
        }
        let written = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(ControllerError::api("writing the migration status"))?;
        if let Some(before) = m.resource_version()
            && written.resource_version().as_deref() != Some(before.as_str())
        {
            stale_versions.push(before);
            ctx.recent
                .lock()
                .await
                .acted
                .insert(key.clone(), (stale_versions, Instant::now()));
        }
        if changed_state {
            tracing::info!(
                migration = %key,
                vm = %m.spec.vm_name,
                from = ?phase_of(&state),
                to = ?phase_of(&decision.next),
                reason = decision.reason,
                "{}",
                decision.message
            );
        }
    }

    for action in &decision.actions {
        match action {
            Action::RemoveFinalizer => {
                let finalizers: Vec<String> = m
                    .finalizers()
                    .iter()
                    .filter(|f| *f != FINALIZER)
                    .cloned()
                    .collect();
                let patch = serde_json::json!({"metadata": {"finalizers": finalizers}});
                match api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => {
                        return Err(ControllerError::api("removing the migration finalizer")(e));
                    }
                }
            }
            Action::EmitEvent {
                kind,
                reason,
                message,
            } => {
                let note = match kind {
                    CoreEventType::Normal => Note::normal,
                    CoreEventType::Warning => Note::warning,
                };
                let action = format!("{:?}", phase_of(&decision.next));
                ctx.events.enqueue(
                    &regarding,
                    note(reason, &action, message).about(vm_ref.clone()),
                );
            }
            _ => {}
        }
    }
    if let Some(d) = &scheduling
        && let Some(host) = &d.chosen
    {
        ctx.events.enqueue(
            &regarding,
            Note::normal("TargetChosen", "Schedule", chosen_note(host, d)).about(vm_ref.clone()),
        );
    }
    if decision.reason == machine::WAITING_FOR_SLOT
        && previous_reason.as_ref().map(|(r, _)| r.as_str()) != Some(machine::WAITING_FOR_SLOT)
    {
        // Once when it starts waiting: the queue position changes at every
        // look and would make a new Event each time.
        ctx.events.enqueue(
            &regarding,
            Note::normal(machine::WAITING_FOR_SLOT, "Admit", decision.message.clone())
                .about(vm_ref.clone()),
        );
    }
    if decision.next.phase().is_terminal() {
        let mut recent = ctx.recent.lock().await;
        recent.targets.remove(&key);
        recent.admitted.remove(&key);
    } else if Stage::of(decision.next.phase(), evacuation, false).is_none() {
        // Back to scheduling: it holds nothing any more.
        ctx.recent.lock().await.admitted.remove(&key);
    }
    let released = m.labels().contains_key(MAINTENANCE_LABEL)
        && releases_batch(state.phase(), decision.next.phase());
    if (freed.is_some() && !free_in_cache) || released {
        super::admission::notify_once_cached(
            context.clone(),
            &m,
            super::admission::shows_phase(decision.next.phase()),
        );
    }
    Ok(match decision.requeue_after {
        Some(d) if d.is_zero() => Requeue::requeue(Duration::from_millis(50)),
        Some(d) => Requeue::requeue(d),
        None => Requeue::await_change(),
    })
}

async fn patch_vm(
    api: &Api<VirtualMachine>,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), ControllerError> {
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(ControllerError::api("updating the VM status")(e)),
    }
}
