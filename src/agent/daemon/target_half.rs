//! The target half of a live migration: prepare a QEMU that waits for the
//! stream, let the relay deliver the source's stream to it, report when the
//! guest runs here (with when, for the real pause), and serve post-copy
//! recovery rounds until the migration is final.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tokio_util::sync::CancellationToken;

use crate::agent::migrate;
use crate::agent::relay::MigrationRef;
use crate::api::migration::{AgentReport, AgentState};
use crate::api::{Migration, MigrationType};

use super::error_chain as chain;
use super::halves::{
    Role, abort_wanted, current, effective_policy, migration_config, report_half, report_with,
    wait_until,
};
use super::{Agent, recovery};

/// How long a live transfer may run at the very most (the policy's
/// deadlines end it long before).
const TARGET_WAIT: Duration = Duration::from_secs(24 * 3600);

/// A wall-clock time as the API's microsecond time.
pub(super) fn micro_time(
    t: std::time::SystemTime,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime {
    let us = crate::agent::relay::clock::micros_since_epoch(t);
    k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        Timestamp::from_microsecond(us).unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

pub(super) async fn target_half(agent: &Agent, m: &Migration, cancel: &CancellationToken) {
    report_half(
        agent,
        m,
        Role::Target,
        AgentState::Preparing,
        None,
        None,
        None,
    )
    .await;
    let namespace = m.namespace().unwrap_or_default();
    let vm = agent.vm_store.state().into_iter().find(|v| {
        v.namespace().as_deref() == Some(namespace.as_str()) && v.name_any() == m.spec.vm_name
    });
    let Some(vm) = vm else {
        let message = format!("VirtualMachine {namespace}/{} not found", m.spec.vm_name);
        report_half(
            agent,
            m,
            Role::Target,
            AgentState::Failed,
            Some("VmNotFound"),
            Some(message),
            None,
        )
        .await;
        return;
    };
    // The NICs join this host's bridges on taps created here (net).
    let spec = match super::vmloop::spec_with_taps(agent, &vm) {
        Ok(spec) => spec,
        Err((_, message)) => {
            report_half(
                agent,
                m,
                Role::Target,
                AgentState::Failed,
                Some("TargetPreparationFailed"),
                Some(message),
                None,
            )
            .await;
            return;
        }
    };
    if m.spec.migration_type == MigrationType::Cold {
        // Nothing to prepare: once the source has stopped the guest, the
        // controller places the VM here and the VM loop starts it.
        report_half(
            agent,
            m,
            Role::Target,
            AgentState::Ready,
            None,
            Some("the VM will start here from its definition".into()),
            None,
        )
        .await;
        return;
    }
    let (policy, channels) = effective_policy(agent, m).await;
    let config = migration_config(&policy, channels, agent.config.stall_timeout);
    // A dead QEMU of an earlier attempt may still be in the manager.
    if agent
        .vms
        .get(&spec.name)
        .await
        .is_some_and(|p| !p.is_alive())
    {
        agent.vms.forget(&spec.name).await;
    }
    let handle = match migrate::prepare_target(&agent.vms, &spec, &config).await {
        Ok(h) => h,
        Err(e) => {
            report_half(
                agent,
                m,
                Role::Target,
                AgentState::Failed,
                Some("TargetPreparationFailed"),
                Some(chain(&e)),
                None,
            )
            .await;
            return;
        }
    };
    let Some(uid) = m.uid() else { return };
    let source_host = m
        .status
        .as_ref()
        .and_then(|s| s.source_host.clone())
        .unwrap_or_default();
    let migration = MigrationRef {
        namespace: namespace.clone(),
        name: m.name_any(),
        uid: uid.clone(),
    };
    let _delivery = agent
        .table
        .expect(migration.clone(), &source_host, handle.incoming_socket());
    if let Some(hook) = handle.switchover_hook() {
        agent.table.on_source_stopped(&uid, hook);
    }
    // Times the guest's start here (QEMU's RESUME event) for the real pause.
    let clock = handle.clock();
    report_half(agent, m, Role::Target, AgentState::Ready, None, None, None).await;

    let outcome = tokio::select! {
        r = handle.wait_running(TARGET_WAIT) => Some(r),
        _ = wait_until(agent, m, cancel, abort_wanted) => None,
    };
    match outcome {
        Some(Ok(())) => {
            // QEMU sends RESUME before it answers the query that saw the
            // guest running; give the watcher a moment to have read it.
            let resumed = clock.resumed(Duration::from_secs(2)).await;
            // Says whether committing the VM here is safe without the
            // source's word (the controller's fallback, docs/protocol.md).
            let complete = match handle.memory_complete().await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "cannot tell whether the guest's memory is complete here");
                    None
                }
            };
            let report = AgentReport {
                state: AgentState::Running,
                reason: None,
                message: Some(format!("the guest runs on {}", agent.config.host)),
                time: Some(Time(Timestamp::now())),
                last_progress: None,
                guest_stopped: None,
                guest_resumed: resumed.map(micro_time),
                memory_complete: complete,
                recovery: None,
            };
            report_with(agent, m, Role::Target, report, None).await;
            // Keep the relay entry until the migration is final, and serve
            // the source's post-copy recovery rounds through it.
            recovery::serve_target(agent, m, &handle, &migration, &source_host, 0, cancel).await;
        }
        Some(Err(e)) => {
            let expected = current(agent, m).is_some_and(|m| abort_wanted(&m));
            if !expected {
                report_half(
                    agent,
                    m,
                    Role::Target,
                    AgentState::Failed,
                    Some("TargetExited"),
                    Some(chain(&e)),
                    None,
                )
                .await;
            }
            let _ = handle.abort(&agent.vms).await;
            report_half(
                agent,
                m,
                Role::Target,
                AgentState::CleanedUp,
                None,
                None,
                None,
            )
            .await;
        }
        None => {
            let _ = handle.abort(&agent.vms).await;
            report_half(
                agent,
                m,
                Role::Target,
                AgentState::CleanedUp,
                None,
                Some("the migration ended before the guest ran here".into()),
                None,
            )
            .await;
        }
    }
    agent.table.remove(&uid);
}
