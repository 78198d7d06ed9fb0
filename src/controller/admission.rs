//! Admission for the Migration reconciler: what every Migration asks for
//! and holds, as the caches show it (with the drain batches still being
//! scheduled or prepared, and what this controller admitted a moment ago),
//! handed to `core::admission::admit`, under the scheduling lock.

use std::time::Instant;

use std::collections::HashMap;
use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use crate::api::migration::AgentState;
use crate::api::{MAINTENANCE_LABEL, Migration, MigrationPhase, MigrationType};
use crate::core::admission::{self, ActiveMigration, QueuedMigration, Stage, Step};
use crate::core::migration::{AdmissionOutcome, Phase};
use crate::core::policy::EffectivePolicy;

use super::migration::origin;
use super::snapshot::id;
use super::status::{core_phase, now, to_core};
use super::{Admitted, Ctx, Recent};

/// What a Migration holds as the cache shows it: its phase, and whether
/// the source agent has reported the end of the stream.
pub(super) fn cached_stage(m: &Migration) -> Option<Stage> {
    let status = m.status.as_ref();
    let phase = core_phase(status.map(|s| s.phase).unwrap_or_default());
    let ended = status.and_then(|s| s.source.as_ref()).is_some_and(|r| {
        matches!(
            r.state,
            AgentState::SwitchedOver | AgentState::Aborted | AgentState::Failed
        )
    });
    Stage::of(
        phase,
        m.spec.migration_type == MigrationType::Evacuate,
        ended,
    )
}

/// The migration asking, as its reconcile's state records it.
struct Own<'a> {
    key: &'a str,
    source: &'a str,
    target: &'a str,
    step: Step,
}

/// Every Migration's asks and holdings, as the caches and `recent` show
/// them (with `own` as its reconcile sees it).
fn gather(ctx: &Ctx, recent: &Recent, own: Option<Own<'_>>) -> Gathered {
    // Looked up once per admission, not once per Migration (a drain of n
    // VMs asks n times while n Migrations are in the cache).
    let clusters: std::collections::HashMap<String, String> = ctx
        .hosts
        .state()
        .iter()
        .map(|h| (h.name_any(), h.spec.cluster.clone()))
        .collect();
    let cluster_of = |host: &str| {
        clusters
            .get(host)
            .cloned()
            .unwrap_or_else(|| "default".to_string())
    };
    let mut queue = Vec::new();
    let mut active = Vec::new();
    let memory: std::collections::HashMap<String, u64> = ctx
        .vms
        .state()
        .iter()
        .map(|v| {
            (
                id(&v.namespace().unwrap_or_default(), &v.name_any()),
                v.spec.memory.bytes(),
            )
        })
        .collect();
    // A drain's Migrations queue from the drain's start, as one batch.
    let drains: std::collections::HashMap<String, crate::core::time::Timestamp> = ctx
        .maintenances
        .state()
        .iter()
        .filter_map(|hm| {
            Some((
                hm.name_any(),
                hm.metadata.creation_timestamp.as_ref().map(to_core)?,
            ))
        })
        .collect();
    for other in ctx.migrations.state() {
        let namespace = other.namespace().unwrap_or_default();
        let other_key = id(&namespace, &other.name_any());
        let status = other.status.as_ref();
        let mine = own.as_ref().is_some_and(|o| o.key == other_key);
        let recently = recent.admitted.get(&other_key);
        // Its hosts: as this reconcile's state records them, as admitted a
        // moment ago, or as cached.
        let (source, target) = if mine {
            own.as_ref()
                .map(|o| (o.source.to_string(), o.target.to_string()))
                .unwrap_or_default()
        } else if let Some(a) = recently {
            (a.source.clone(), a.target.clone())
        } else {
            (
                status
                    .and_then(|s| s.source_host.clone())
                    .unwrap_or_default(),
                status
                    .and_then(|s| s.target_host.clone())
                    .unwrap_or_default(),
            )
        };
        let phase = status.map(|s| s.phase).unwrap_or_default();
        let evacuation = other.spec.migration_type == MigrationType::Evacuate;
        // What it holds: as cached, and what it was admitted to here a
        // moment ago — with every slot up to it, until a cache shows the
        // step taken (this cache is not the reconciler's: it may lag behind
        // the version the admission was decided from).
        let cached = cached_stage(&other);
        let admitted = recently.map(|a| a.stage);
        let stage = cached.max(admitted);
        let mut holds: Vec<Stage> = cached.into_iter().collect();
        if admitted > cached {
            if admitted == Some(Stage::Transferring)
                && !evacuation
                && cached < Some(Stage::Preparing)
            {
                holds.push(Stage::Preparing);
            }
            holds.extend(admitted);
        }
        // What it asks for, and whether it is ready to.
        let mut ask: Option<(Step, bool)> = match (stage, phase) {
            (None, MigrationPhase::Queued) => Some((
                if evacuation {
                    Step::Transfer
                } else {
                    Step::Prepare
                },
                true,
            )),
            (None, MigrationPhase::Pending | MigrationPhase::Scheduling) => {
                Some((Step::Prepare, false))
            }
            (Some(Stage::Preparing), _) if !evacuation => {
                let ready = phase == MigrationPhase::PreparingTarget
                    && status
                        .and_then(|s| s.target.as_ref())
                        .is_some_and(|r| r.state == AgentState::Ready);
                Some((Step::Transfer, ready))
            }
            _ => None,
        };
        // A cancelled one ends at its next look: it asks for nothing.
        if other.spec.cancel {
            ask = None;
        }
        let batch = other.labels().get(MAINTENANCE_LABEL).cloned();
        if let Some(o) = own.as_ref().filter(|_| mine) {
            ask = Some((o.step, true));
            if o.step == Step::Prepare {
                holds.clear();
            }
        }
        for stage in holds {
            active.push(ActiveMigration {
                name: other_key.clone(),
                vm: id(&namespace, &other.spec.vm_name),
                cluster: cluster_of(&source),
                source: source.clone(),
                target: target.clone(),
                origin: origin(&other),
                stage,
            });
        }
        let Some((wants, ready)) = ask else { continue };
        // Those not ready only hold back the smaller members of their batch.
        if !ready && batch.is_none() {
            continue;
        }
        let vm = id(&namespace, &other.spec.vm_name);
        let created = other
            .meta()
            .creation_timestamp
            .as_ref()
            .map(to_core)
            .unwrap_or_else(now);
        let queued_at = batch
            .as_ref()
            .and_then(|b| drains.get(b).copied())
            .unwrap_or(created);
        queue.push(QueuedMigration {
            name: other_key,
            size: memory.get(&vm).copied().unwrap_or(0),
            vm,
            cluster: cluster_of(&source),
            source,
            target,
            origin: origin(&other),
            priority: 0,
            queued_at,
            batch,
            wants,
            ready,
        });
    }
    Gathered { queue, active }
}

struct Gathered {
    queue: Vec<QueuedMigration>,
    active: Vec<ActiveMigration>,
}

/// Ask the queue whether this migration, from `source` to `target` as its
/// state records them (the cache may not show them yet: one reconcile can
/// choose the target and ask), may take `step` now (under the lock).
pub(super) async fn admit(
    ctx: &Ctx,
    key: &str,
    (source, target): (&str, &str),
    step: Step,
    policy: &EffectivePolicy,
) -> AdmissionOutcome {
    let mut recent = ctx.recent.lock().await;
    recent.expire(Instant::now());
    // Admitted a moment ago and asking again from a cache that does not
    // show it yet: the answer stands.
    if recent
        .admitted
        .get(key)
        .is_some_and(|a| a.stage.slot() >= Some(step))
    {
        return AdmissionOutcome::Admitted;
    }
    if !ctx
        .migrations
        .state()
        .iter()
        .any(|m| id(&m.namespace().unwrap_or_default(), &m.name_any()) == key)
    {
        return AdmissionOutcome::Waiting("the migration is not in the cache yet".into());
    }
    let own = Own {
        key,
        source,
        target,
        step,
    };
    let Gathered { queue, active } = gather(ctx, &recent, Some(own));
    let plan = admission::admit(&queue, &active, &policy.limits);
    if plan.admitted.iter().any(|n| n == key) {
        let stage = match step {
            Step::Prepare => Stage::Preparing,
            Step::Transfer => Stage::Transferring,
        };
        recent.admitted.insert(
            key.to_string(),
            Admitted {
                stage,
                source: source.to_string(),
                target: target.to_string(),
                at: Instant::now(),
            },
        );
        AdmissionOutcome::Admitted
    } else {
        let why = plan.waiting.iter().find(|w| w.name == key).map_or_else(
            || "waiting for a slot".to_string(),
            // The reason only, not the position: a position in the status
            // would rewrite every queued Migration each time one starts
            // (O(n²) writes in a drain of n VMs).
            |w| format!("waiting: {}", w.reason),
        );
        AdmissionOutcome::Waiting(why)
    }
}

/// The waiting Migrations the queue would let take a step now, each under
/// its own policy's limits: the ones to look at again when a slot is given
/// up (not every Migration: a drain of n VMs would look n times at n).
pub(super) async fn wake_set(ctx: &Ctx) -> Vec<ObjectRef<Migration>> {
    let mut recent = ctx.recent.lock().await;
    recent.expire(Instant::now());
    let Gathered { queue, active } = gather(ctx, &recent, None);
    drop(recent);
    let vms: HashMap<String, Arc<crate::api::VirtualMachine>> = ctx
        .vms
        .state()
        .into_iter()
        .map(|v| (id(&v.namespace().unwrap_or_default(), &v.name_any()), v))
        .collect();
    let migrations: HashMap<String, Arc<Migration>> = ctx
        .migrations
        .state()
        .into_iter()
        .map(|m| (id(&m.namespace().unwrap_or_default(), &m.name_any()), m))
        .collect();
    // The askers, grouped by the limits they are admitted under.
    let mut by_limits: Vec<(crate::core::policy::Limits, Vec<String>)> = Vec::new();
    for q in queue.iter().filter(|q| q.ready) {
        let Some(m) = migrations.get(&q.name) else {
            continue;
        };
        let (_, policy, _) = ctx.policy_for(vms.get(&q.vm).map(|v| &**v), m.spec.policy.as_deref());
        match by_limits.iter_mut().find(|(l, _)| *l == policy.limits) {
            Some((_, names)) => names.push(q.name.clone()),
            None => by_limits.push((policy.limits, vec![q.name.clone()])),
        }
    }
    let mut wake = Vec::new();
    for (limits, names) in by_limits {
        let plan = admission::admit(&queue, &active, &limits);
        for n in plan.admitted.iter().filter(|n| names.contains(n)) {
            if let Some(m) = migrations.get(n) {
                wake.push(ObjectRef::from_obj(&**m));
            }
        }
    }
    wake
}

/// Wake the queue once the cache the admission reads shows this Migration
/// as `shown` says (else the queue would still see the slot held), or
/// after a second at most.
pub(super) fn notify_once_cached(
    ctx: Arc<Ctx>,
    m: &Migration,
    shown: impl Fn(&Migration) -> bool + Send + 'static,
) {
    let key = ObjectRef::from_obj(m);
    tokio::spawn(async move {
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        while Instant::now() < deadline {
            match ctx.migrations.get(&key) {
                Some(c) if !shown(&c) => {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await
                }
                _ => break,
            }
        }
        ctx.slot_freed.notify_one();
    });
}

/// Whether the cached Migration shows `written` or a later phase.
pub(super) fn shows_phase(written: Phase) -> impl Fn(&Migration) -> bool {
    move |c| {
        let p = core_phase(c.status.as_ref().map(|s| s.phase).unwrap_or_default());
        p >= written || p.is_terminal()
    }
}

/// Whether the cached Migration no longer holds a `step` slot (its stream
/// ended, as the source reported).
pub(super) fn shows_free(step: Step) -> impl Fn(&Migration) -> bool {
    move |c| cached_stage(c).and_then(Stage::slot) != Some(step)
}
