//! Admission for the Migration reconciler: the queue as the caches show
//! it (with the drain batches still being scheduled) handed to
//! `core::admission::admit`, under the scheduling lock.

use std::time::Instant;

use kube::{Resource, ResourceExt};

use crate::api::MAINTENANCE_LABEL;
use crate::core::admission::{self, ActiveMigration, QueuedMigration};
use crate::core::migration::AdmissionOutcome;
use crate::core::policy::EffectivePolicy;

use super::Ctx;
use super::migration::origin;
use super::snapshot::id;
use super::status::{now, to_core};

/// Ask the queue whether this migration may start (under the lock).
pub(super) async fn admit(ctx: &Ctx, key: &str, policy: &EffectivePolicy) -> AdmissionOutcome {
    let mut recent = ctx.recent.lock().await;
    recent.expire(Instant::now());
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
    let mut seen_self = false;
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
        let status = other.status.clone().unwrap_or_default();
        let source = status.source_host.clone().unwrap_or_default();
        let target = status.target_host.clone().unwrap_or_default();
        let phase = if other_key == key {
            seen_self = true;
            crate::api::MigrationPhase::Queued
        } else {
            status.phase
        };
        let held = recent.admitted.contains_key(&other_key);
        let vm = id(&namespace, &other.spec.vm_name);
        let batch = other.labels().get(MAINTENANCE_LABEL).cloned();
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
        let scheduling = matches!(
            phase,
            crate::api::MigrationPhase::Pending | crate::api::MigrationPhase::Scheduling
        );
        if (phase == crate::api::MigrationPhase::Queued && !held)
            || (scheduling && batch.is_some() && !other.spec.cancel)
        {
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
                ready: !scheduling,
            });
        } else if phase_of_in_flight(phase) || held {
            active.push(ActiveMigration {
                name: other_key,
                vm: id(&namespace, &other.spec.vm_name),
                cluster: cluster_of(&source),
                source,
                target,
                origin: origin(&other),
            });
        }
    }
    if !seen_self {
        return AdmissionOutcome::Waiting("the migration is not in the cache yet".into());
    }
    let plan = admission::admit(&queue, &active, &policy.limits);
    if plan.admitted.iter().any(|n| n == key) {
        recent.admitted.insert(key.to_string(), Instant::now());
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

pub(super) fn phase_of_in_flight(p: crate::api::MigrationPhase) -> bool {
    use crate::api::MigrationPhase as P;
    matches!(
        p,
        P::Scheduled | P::PreparingTarget | P::Running | P::PostCopy | P::Completing
    )
}
