//! Host health: Lease silence → `Host.status.phase`; a Fenced host's VMs
//! are rebuilt elsewhere per the resilience policy, with `Evacuate`
//! Migrations.
//!
//! Safety (a VM never runs on two hosts): the controller declares a host
//! Fenced only after `evacuateAfter` of silence on its own clock, which is
//! never more than the silence the host itself measures since its last
//! renewal; `fenceAfter` is strictly shorter, and by then the host's
//! watchdog has killed its QEMUs (whether or not its agent still runs).
//! Only then are evacuations admitted. A fenced host returns to service
//! only when its agent renews again and no longer runs any VM that the API
//! places elsewhere. `docs/safety.md` has the whole argument.

use std::collections::BTreeSet;
use std::time::Instant;

use k8s_openapi::jiff::Timestamp as Jiff;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};

use crate::api::vm::RunStrategy;
use crate::api::{Host, HostPhase, Migration, MigrationSpec, MigrationType};
use crate::core::policy::ResiliencePolicy;
use crate::core::scheduler::HostQuarantine;

use super::events::{self, Note};
use super::health::judge;
use super::snapshot::host_phase;
use super::{ControllerError, Ctx};

/// Label on the Evacuate migrations the controller creates, naming the host.
pub const EVACUATED_HOST_LABEL: &str = "ferry.dev/evacuated-host";

fn api_phase(p: crate::core::scheduler::HostPhase) -> HostPhase {
    use crate::core::scheduler::HostPhase as C;
    match p {
        C::Active => HostPhase::Active,
        C::Maintenance => HostPhase::Maintenance,
        C::Unreachable => HostPhase::Unreachable,
        C::Fenced => HostPhase::Fenced,
        C::Failed => HostPhase::Failed,
    }
}

/// One pass over every host.
pub async fn reconcile(ctx: &Ctx) -> Result<(), ControllerError> {
    let now = Instant::now();
    let cluster = ctx.cluster_policy();
    let maintained: BTreeSet<String> = ctx
        .maintenances
        .state()
        .iter()
        .filter(|m| !m.spec.dry_run)
        .map(|m| m.spec.host.clone())
        .collect();
    let leases = ctx.leases.state();
    for host in ctx.hosts.state() {
        let name = host.name_any();
        let silence = {
            let mut tracker = ctx.leases_seen.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(lease) = leases.iter().find(|l| l.name_any() == name) {
                let marker = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.renew_time.as_ref())
                    .map(|t| t.0.to_string())
                    .unwrap_or_default();
                tracker.observe(&name, &marker, now);
            }
            tracker.silence(&name, now)
        };
        let status = host.status.clone().unwrap_or_default();
        // A returning agent has caught up when it runs no more VMs than the
        // API places on it (it stops the ones rebuilt elsewhere first).
        let placed_here = ctx
            .vms
            .state()
            .iter()
            .filter(|v| v.status.as_ref().and_then(|s| s.host.as_deref()) == Some(name.as_str()))
            .filter(|v| v.spec.run_strategy == RunStrategy::Running)
            .count();
        let caught_up = status.vm_count as usize <= placed_here;
        let lease_duration = ctx.config.lease_duration;
        let judgement = judge(
            host_phase(status.phase),
            silence,
            lease_duration,
            cluster.resilience.evacuate_after,
            maintained.contains(&name),
            caught_up,
        );
        let phase = api_phase(judgement.phase);
        if phase != status.phase {
            tracing::warn!(host = %name, from = ?status.phase, to = ?phase, silence_s = silence.as_secs(), "host phase changes");
            let api: Api<Host> = Api::all(ctx.client.clone());
            let patch = serde_json::json!({"status": {"phase": phase}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(ControllerError::api("writing the host phase"))?;
            ctx.events
                .publish(
                    &events::reference(&*host),
                    phase_note(status.phase, phase, silence.as_secs()),
                )
                .await;
        }
        if phase == HostPhase::Fenced {
            evacuate(ctx, &name, status.phase != HostPhase::Fenced).await?;
        }
    }
    announce_quarantines(ctx).await;
    Ok(())
}

/// One Event on each host when a quarantine of it begins (the quarantine
/// itself is derived from the failed Migrations; see
/// `core::drain::quarantine`).
async fn announce_quarantines(ctx: &Ctx) {
    let policy = &ctx.config.drain_retry;
    let now = super::status::now();
    let current = super::snapshot::host_quarantines(&ctx.migrations.state(), policy, now);
    let fresh: Vec<(String, HostQuarantine)> = {
        let mut recent = ctx.recent.lock().await;
        recent
            .host_quarantines
            .retain(|h, _| current.contains_key(h));
        let fresh: Vec<(String, HostQuarantine)> = current
            .into_iter()
            .filter(|(h, q)| recent.host_quarantines.get(h) != Some(&q.until))
            .collect();
        for (h, q) in &fresh {
            recent.host_quarantines.insert(h.clone(), q.until);
        }
        fresh
    };
    for (host, q) in fresh {
        tracing::warn!(%host, failures = q.failures, "host quarantined");
        let text = format!(
            "{} incoming migrations failed on {host} within {} s (last: {}): no migration targets it for {} s, until {}",
            q.failures,
            policy.host_quarantine_window.as_secs(),
            q.last.as_str(),
            q.until.since(now).as_secs(),
            super::status::to_api(q.until).0
        );
        ctx.events
            .publish(
                &events::host_reference(&host),
                Note::warning("HostQuarantined", "Schedule", text),
            )
            .await;
    }
}

/// The Event of a host's phase change.
fn phase_note(from: HostPhase, to: HostPhase, silence_s: u64) -> Note {
    let text = format!("{from:?} → {to:?}: no Lease renewal for {silence_s} s");
    match to {
        HostPhase::Unreachable => Note::warning("HostUnreachable", "Monitor", text),
        HostPhase::Fenced => Note::warning(
            "HostFenced",
            "Fence",
            format!(
                "{text}; its VMs are stopped (agent or watchdog) and are rebuilt elsewhere per the resilience policy"
            ),
        ),
        HostPhase::Failed => Note::warning("HostFailed", "Monitor", text),
        HostPhase::Active | HostPhase::Maintenance => Note::normal(
            "HostRecovered",
            "Monitor",
            format!("{from:?} → {to:?}: the agent renews its Lease again"),
        ),
    }
}

/// Create an Evacuate migration for every VM of a fenced host that its
/// resilience policy rebuilds, unless one exists. When the host has just
/// been fenced (`newly`), each VM the policy leaves down gets a Warning
/// Event `NotEvacuated` naming the policy, so that no VM is left silently.
async fn evacuate(ctx: &Ctx, host: &str, newly: bool) -> Result<(), ControllerError> {
    let migrations = ctx.migrations.state();
    for vm in ctx.vms.state() {
        let status = vm.status.clone().unwrap_or_default();
        if status.host.as_deref() != Some(host) || vm.spec.run_strategy != RunStrategy::Running {
            continue;
        }
        let namespace = vm.namespace().unwrap_or_default();
        let (policy_name, policy, _) = ctx.policy_for(Some(&vm), None);
        let rebuild = match policy.resilience.policy {
            ResiliencePolicy::MigrateAll => true,
            ResiliencePolicy::MigrateHighlyAvailableOnly => vm.spec.highly_available,
            ResiliencePolicy::DoNotMigrate => false,
        };
        if !rebuild {
            if newly {
                let note = format!(
                    "{host} was fenced; resilience policy {:?} of MigrationPolicy {} leaves this VM down{}",
                    policy.resilience.policy,
                    policy_name.as_deref().unwrap_or("(built-in defaults)"),
                    if vm.spec.highly_available {
                        ""
                    } else {
                        " (it is not highlyAvailable)"
                    }
                );
                left_down(ctx, &vm, note).await;
            }
            continue;
        }
        let pending = migrations.iter().any(|m| {
            m.namespace().as_deref() == Some(namespace.as_str())
                && m.spec.vm_name == vm.name_any()
                && m.spec.migration_type == MigrationType::Evacuate
                && !m.status.as_ref().is_some_and(|s| {
                    matches!(
                        s.phase,
                        crate::api::MigrationPhase::Failed
                            | crate::api::MigrationPhase::Cancelled
                            | crate::api::MigrationPhase::Succeeded
                    )
                })
        });
        let vm_id = super::snapshot::id(&namespace, &vm.name_any());
        let mut recent = ctx.recent.lock().await;
        recent.expire(Instant::now());
        if pending || recent.evacuations.contains_key(&vm_id) {
            continue;
        }
        recent.evacuations.insert(vm_id, Instant::now());
        drop(recent);
        let m = Migration {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-evacuate-", vm.name_any())),
                namespace: Some(namespace.clone()),
                labels: Some([(EVACUATED_HOST_LABEL.to_string(), host.to_string())].into()),
                annotations: Some(
                    [(
                        "ferry.dev/reason".to_string(),
                        format!(
                            "{host} was fenced at {}; resilience policy rebuilds this VM",
                            Jiff::now()
                        ),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: MigrationSpec {
                vm_name: vm.name_any(),
                migration_type: MigrationType::Evacuate,
                target_host: None,
                policy: None,
                cancel: false,
            },
            status: None,
        };
        let api: Api<Migration> = Api::namespaced(ctx.client.clone(), &namespace);
        let created = api
            .create(&PostParams::default(), &m)
            .await
            .map_err(ControllerError::api("creating an evacuation"))?;
        tracing::warn!(vm = %vm.name_any(), %host, "evacuation created");
        let text = format!(
            "{namespace}/{} is rebuilt elsewhere by Migration {} ({:?})",
            vm.name_any(),
            created.name_any(),
            policy.resilience.policy
        );
        ctx.events
            .publish(
                &events::host_reference(host),
                Note::warning("Evacuating", "Evacuate", text.clone())
                    .about(events::reference(&created)),
            )
            .await;
        ctx.events
            .publish(
                &events::reference(&*vm),
                Note::warning("Evacuating", "Evacuate", text).about(events::reference(&created)),
            )
            .await;
    }
    Ok(())
}

/// Record that a VM of a fenced host stays down (a Warning Event on the VM).
async fn left_down(ctx: &Ctx, vm: &crate::api::VirtualMachine, note: String) {
    use kube::Resource as _;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let recorder = Recorder::new(
        ctx.client.clone(),
        Reporter {
            controller: "ferry-controller".into(),
            instance: std::env::var("HOSTNAME").ok(),
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "NotEvacuated".into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Evacuate".into(),
        secondary: None,
    };
    tracing::warn!(vm = %vm.name_any(), %note, "VM of a fenced host left down");
    if let Err(e) = recorder.publish(&event, &vm.object_ref(&())).await {
        tracing::warn!(vm = %vm.name_any(), error = %e, "publishing the NotEvacuated event failed");
    }
}
