//! Automatic balancing: every `balancing.interval` of the cluster policy
//! (when enabled), `core::scheduler::balance` over a snapshot; each move
//! becomes an ordinary Migration, labelled as automatic and annotated with
//! why it was made and what it is expected to improve.
//!
//! ```text
//!  tick ──► enabled and interval elapsed? ──► Ctx::snapshot(caches + recent targets + quarantines)
//!        ──► history: automatic Migrations not Failed/Cancelled (when created)
//!        ──► balance(snapshot, policy, history, now) ──► one Migration per move
//! ```
//!
//! The history counts automatic Migrations from their creation, whatever
//! their phase short of a failure, so a move still Pending is not proposed
//! again on the next pass (the snapshot's in-flight set only holds those
//! with a target reserved). The Migration's name is derived from the VM and
//! the pass time, so a pass retried on a stale cache gets 409, not a
//! second move.

use crate::controller::status::now;
use std::sync::Arc;
use std::time::Instant;

use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::api::{AUTOMATIC_LABEL, Migration, MigrationPhase, MigrationSpec, MigrationType};
use crate::core::scheduler::{Move, PastMove, balance};
use crate::core::time::Timestamp;

use super::events::{self, Note};
use super::snapshot::id;
use super::status::to_core;
use super::{ControllerError, Ctx};

/// Annotation on an automatic Migration: why the balancer made it.
pub const REASON_ANNOTATION: &str = "ferry.dev/balancing-reason";
/// Annotation on an automatic Migration: the improvement it should bring.
pub const IMPROVEMENT_ANNOTATION: &str = "ferry.dev/expected-improvement";

/// Run the balancing loop until `shutdown`.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let policy = ctx.cluster_policy();
        let bal = policy.scheduling.balancing;
        if !bal.enabled || last.is_some_and(|t| t.elapsed() < bal.interval) {
            continue;
        }
        last = Some(Instant::now());
        match pass(&ctx).await {
            Ok(n) if n > 0 => tracing::info!(moves = n, "balancing pass"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "balancing pass failed"),
        }
    }
}

/// The balancer's history from the Migrations.
pub fn history(migrations: &[Arc<Migration>]) -> Vec<PastMove> {
    migrations
        .iter()
        .filter(|m| m.labels().get(AUTOMATIC_LABEL).map(String::as_str) == Some("true"))
        .filter_map(|m| {
            let status = m.status.clone().unwrap_or_default();
            if matches!(
                status.phase,
                MigrationPhase::Failed | MigrationPhase::Cancelled
            ) {
                return None;
            }
            let namespace = m.namespace().unwrap_or_default();
            Some(PastMove {
                vm: id(&namespace, &m.spec.vm_name),
                source: status.source_host.clone().unwrap_or_default(),
                target: status
                    .target_host
                    .clone()
                    .or_else(|| m.spec.target_host.clone())
                    .unwrap_or_default(),
                at: m.metadata.creation_timestamp.as_ref().map(to_core)?,
            })
        })
        .collect()
}

/// The Migration a move becomes.
pub fn migration_for(mv: &Move, at: Timestamp) -> Option<Migration> {
    let (namespace, vm) = mv.vm.split_once('/')?;
    let mut name = format!("auto-{vm}-{}", at.as_millis() / 1000);
    name.truncate(253);
    Some(Migration {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_string()),
            labels: Some([(AUTOMATIC_LABEL.to_string(), "true".to_string())].into()),
            annotations: Some(
                [
                    (REASON_ANNOTATION.to_string(), mv.explanation.clone()),
                    (
                        IMPROVEMENT_ANNOTATION.to_string(),
                        format!(
                            "{}: {:.1} → {:.1} (improves by {:.1})",
                            mv.metric,
                            mv.before,
                            mv.after,
                            mv.improvement()
                        ),
                    ),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: MigrationSpec {
            vm_name: vm.to_string(),
            migration_type: MigrationType::Live,
            target_host: Some(mv.target.clone()),
            policy: None,
            cancel: false,
        },
        status: None,
    })
}

/// One balancing pass; returns the number of Migrations created.
pub async fn pass(ctx: &Ctx) -> Result<usize, ControllerError> {
    let t = now();
    let policy = ctx.cluster_policy();
    let migrations = ctx.migrations.state();
    let plan = {
        let mut recent = ctx.recent.lock().await;
        recent.expire(Instant::now());
        let extra = recent
            .targets
            .iter()
            .map(|(k, (f, _))| (k.clone(), f.clone()))
            .collect();
        let snap = ctx.snapshot(&extra, t);
        balance(&snap, &policy, &history(&migrations), t)
    };
    let mut created = 0;
    for mv in &plan.moves {
        let Some(m) = migration_for(mv, t) else {
            continue;
        };
        let api: Api<Migration> =
            Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
        match api.create(&PostParams::default(), &m).await {
            Ok(made) => {
                created += 1;
                tracing::info!(vm = %mv.vm, source = %mv.source, target = %mv.target, "{}", mv.explanation);
                let text = format!(
                    "{} {} → {}: {}; {}: {:.1} → {:.1}",
                    mv.vm, mv.source, mv.target, mv.explanation, mv.metric, mv.before, mv.after
                );
                let (namespace, vm) = mv.vm.split_once('/').unwrap_or(("", &mv.vm));
                ctx.events
                    .publish(
                        &events::reference(&made),
                        Note::normal("BalancingMove", "Balance", text.clone())
                            .about(events::vm_reference(namespace, vm)),
                    )
                    .await;
                ctx.events
                    .publish(
                        &events::host_reference(&mv.source),
                        Note::normal("BalancingMove", "Balance", text)
                            .about(events::reference(&made)),
                    )
                    .await;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(ControllerError::api("creating a balancing migration")(e)),
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_becomes_a_labelled_annotated_migration_to_its_target() {
        let mv = Move {
            vm: "prod/web-1".into(),
            source: "h1".into(),
            target: "h2".into(),
            reason: crate::core::scheduler::MoveReason::CpuOverloaded {
                percent: 95.0,
                threshold: 80,
                duration: std::time::Duration::from_secs(120),
            },
            metric: "CPU gap (points)",
            before: 60.0,
            after: 20.0,
            explanation: "h1 over 80% for 2m".into(),
        };
        let m = migration_for(&mv, Timestamp::from_secs(1000)).unwrap();
        assert_eq!(m.namespace().as_deref(), Some("prod"));
        assert_eq!(m.name_any(), "auto-web-1-1000");
        assert_eq!(m.spec.target_host.as_deref(), Some("h2"));
        assert_eq!(m.labels()[AUTOMATIC_LABEL], "true");
        assert_eq!(m.annotations()[REASON_ANNOTATION], "h1 over 80% for 2m");
        assert_eq!(
            m.annotations()[IMPROVEMENT_ANNOTATION],
            "CPU gap (points): 60.0 → 20.0 (improves by 40.0)"
        );
    }
}
