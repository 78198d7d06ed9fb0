//! The agent's halves of migrations, driven by the Migration's status (the
//! hand-off protocol of `core::migration`):
//!
//! ```text
//!  target (status.targetHost = me)            source (status.sourceHost = me)
//!  phase PreparingTarget, no report:          phase Running, no report:
//!    report Preparing                           Live: relay to the target's endpoint,
//!    QEMU -incoming defer, migrate-incoming           run_source (convergence by core),
//!    relay expects (this migration, source)           progress every second,
//!    report Ready                                     SwitchedOver(downtime) | Aborted | Failed
//!    guest runs here → report Running           Cold: stop the guest → SwitchedOver
//!      (guestResumed: QEMU's RESUME)                  (guestStopped: QEMU's STOP; pauseMs)
//!    post-copy: serve recovery rounds           post-copy stream broke: recovery rounds
//!    phase final → forget the relay entry
//! ```
//!
//! The source half lives in `source_half`, the target half in
//! `target_half`, post-copy recovery in `recovery`, progress reporting in
//! `progress`.
//!
//! A half that was under way when the agent restarted cannot be resumed
//! (its relay died with the agent, and QEMU failed the stream): it is
//! reported `Failed` with reason `AgentRestarted`, and the VM keeps running
//! on the source — unless its adopted QEMU shows the transfer had completed
//! (`report_lost_half`), or is in post-copy: then the half is taken up
//! again and recovers the stream (`adopt_lost_half`). Which QEMUs belong to a migration is derived from the
//! Migrations (see [`super::Agent::reserved`]); the VM plan cleans up what
//! is left once the migration is final.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::agent::migrate::{Bandwidth, MigrationConfig, TargetHandle, Throttle};
use crate::agent::qemu::QemuProcess;
use crate::agent::qmp::{MigratePause, MigrationStatus, QueryMigrate};
use crate::agent::relay::MigrationRef;
use crate::api::migration::{AgentReport, AgentState};
use crate::api::{Migration, MigrationPhase, MigrationPolicy, MigrationType};
use crate::core::convergence;
use crate::core::policy::{self as core_policy, EffectivePolicy, PolicySource};

use super::plan::local_name;
use super::recovery;
use super::source_half::source_half;
use super::target_half::target_half;
use super::{Agent, migration_owns_qemus};

/// How long a report the API server could not take is retried: longer than
/// a restart of the API server, within a Migration's deadlines.
const REPORT_RETRY: Duration = Duration::from_secs(120);

/// A running half.
pub struct Half {
    cancel: CancellationToken,
}

/// Which half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Source,
    Target,
}

/// Start missing halves; report halves lost to a restart.
pub async fn reconcile(agent: &Arc<Agent>) {
    let me = agent.config.host.clone();
    // Forget finished halves of migrations that are gone.
    let live: std::collections::HashSet<String> = agent
        .migration_store
        .state()
        .iter()
        .filter_map(|m| m.uid())
        .collect();
    if let Ok(mut finished) = agent.finished.lock() {
        finished.retain(|uid| live.contains(uid));
    }
    for m in agent.migration_store.state() {
        let Some(uid) = m.uid() else { continue };
        let status = m.status.clone().unwrap_or_default();
        let running_here = agent
            .halves
            .lock()
            .map(|h| h.contains_key(&uid))
            .unwrap_or(true);
        let finished_here = agent
            .finished
            .lock()
            .map(|f| f.contains(&uid))
            .unwrap_or(true);
        if running_here || finished_here {
            continue;
        }
        let role = if status.target_host.as_deref() == Some(me.as_str())
            && m.spec.migration_type != MigrationType::Evacuate
        {
            Role::Target
        } else if status.source_host.as_deref() == Some(me.as_str())
            && m.spec.migration_type != MigrationType::Evacuate
        {
            Role::Source
        } else {
            continue;
        };
        let report = match role {
            Role::Target => status.target.as_ref(),
            Role::Source => status.source.as_ref(),
        };
        let lost = report.is_some_and(|r| {
            matches!(
                r.state,
                AgentState::Preparing
                    | AgentState::Ready
                    | AgentState::Transferring
                    | AgentState::PostCopyActive
            ) || (role == Role::Target
                && r.state == AgentState::Running
                && status.phase == MigrationPhase::PostCopy)
        });
        if migration_owns_qemus(status.phase) && lost {
            let m = (*m).clone();
            // One look at a time per migration.
            let cancel = CancellationToken::new();
            if let Ok(mut halves) = agent.halves.lock() {
                halves.insert(
                    uid.clone(),
                    Half {
                        cancel: cancel.clone(),
                    },
                );
            }
            tokio::spawn({
                let agent = agent.clone();
                async move {
                    if adopt_lost_half(&agent, &m, role, &cancel).await
                        && let Ok(mut finished) = agent.finished.lock()
                    {
                        finished.insert(uid.clone());
                    }
                    if let Ok(mut halves) = agent.halves.lock() {
                        halves.remove(&uid);
                    }
                }
            });
            continue;
        }
        let start = match role {
            Role::Target => status.phase == MigrationPhase::PreparingTarget && report.is_none(),
            Role::Source => status.phase == MigrationPhase::Running && report.is_none(),
        };
        if !start {
            continue;
        }
        let cancel = CancellationToken::new();
        if let Ok(mut halves) = agent.halves.lock() {
            halves.insert(
                uid.clone(),
                Half {
                    cancel: cancel.clone(),
                },
            );
        }
        let agent = agent.clone();
        let m = (*m).clone();
        tokio::spawn(async move {
            match role {
                Role::Target => target_half(&agent, &m, &cancel).await,
                Role::Source => source_half(&agent, &m, &cancel, None).await,
            }
            if let Ok(mut finished) = agent.finished.lock() {
                finished.insert(uid.clone());
            }
            if let Ok(mut halves) = agent.halves.lock() {
                halves.remove(&uid);
            }
        });
    }
}

/// A half that was under way when this agent restarted. A QEMU in
/// post-copy is taken up again: the guest runs on the target on pages the
/// source still holds, so giving up would lose the VM; the source resumes
/// the stream through recovery rounds and the target serves them, as when
/// only the connection broke. Anything else is reported from what QEMU
/// says ([`report_lost_half`]). Returns whether the half was taken up (and
/// has now ended).
async fn adopt_lost_half(
    agent: &Agent,
    m: &Migration,
    role: Role,
    cancel: &CancellationToken,
) -> bool {
    let me = agent.config.host.clone();
    let namespace = m.namespace().unwrap_or_default();
    let name = local_name(&namespace, &m.spec.vm_name);
    let vm = agent.vms.get(&name).await.filter(|p| p.is_alive());
    let postcopy = match &vm {
        Some(p) => postcopy_status(p).await,
        None => None,
    };
    let (Some(vm), Some(state)) = (vm, postcopy) else {
        report_lost_half(agent, m, role).await;
        return false;
    };
    tracing::warn!(migration = %m.name_any(), ?role, ?state, "the agent restarted during post-copy; taking the half up again");
    match role {
        Role::Source => {
            if state == MigrationStatus::PostcopyActive {
                // Still writing into a dead socket: pause, so that the
                // stream can resume.
                let _ = vm.qmp().execute(&MigratePause {}).await;
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline
                    && postcopy_status(&vm).await != Some(MigrationStatus::PostcopyPaused)
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let why = format!("the agent on {me} restarted during post-copy");
            source_half(agent, m, cancel, Some(why)).await;
        }
        Role::Target => {
            let Some(uid) = m.uid() else { return false };
            let status = m.status.clone().unwrap_or_default();
            let source_host = status.source_host.unwrap_or_default();
            let served = status.target.and_then(|t| t.recovery).unwrap_or(0);
            let migration = MigrationRef {
                namespace,
                name: m.name_any(),
                uid: uid.clone(),
            };
            let handle = TargetHandle::adopt(vm);
            recovery::serve_target(agent, m, &handle, &migration, &source_host, served, cancel)
                .await;
            agent.table.remove(&uid);
        }
    }
    true
}

/// The QEMU's migration status when it is in post-copy.
async fn postcopy_status(vm: &QemuProcess) -> Option<MigrationStatus> {
    let status = vm.qmp().execute(&QueryMigrate {}).await.ok()?.status?;
    matches!(
        status,
        MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecoverSetup
            | MigrationStatus::PostcopyRecover
    )
    .then_some(status)
}

/// Report a half that was under way when this agent restarted, from what
/// its adopted QEMU says. The stream died with the old agent, unless it had
/// already completed: then a source QEMU is paused for good
/// (`postmigrate`) and the guest runs on the target, or a target QEMU runs
/// the guest. Reporting `AgentRestarted` then would fail a migration that
/// succeeded: the target would stop the only running copy (the source
/// cannot run again), or the source would resume while the target runs.
async fn report_lost_half(agent: &Agent, m: &Migration, role: Role) {
    use crate::agent::qmp::{Cont, QueryStatus, RunState};
    let me = agent.config.host.as_str();
    let name = local_name(&m.namespace().unwrap_or_default(), &m.spec.vm_name);
    let state = match agent.vms.get(&name).await.filter(|p| p.is_alive()) {
        Some(p) => p
            .qmp()
            .execute(&QueryStatus {})
            .await
            .ok()
            .map(|s| s.status),
        None => None,
    };
    let target = m
        .status
        .as_ref()
        .and_then(|s| s.target.as_ref())
        .map(|r| r.state);
    let (state, reason, message) = match (role, state) {
        (Role::Source, Some(RunState::Postmigrate)) => match target {
            Some(AgentState::Running) => (
                AgentState::SwitchedOver,
                None,
                format!(
                    "the transfer had completed when the agent on {me} restarted; the guest runs on the target"
                ),
            ),
            Some(AgentState::Failed | AgentState::CleanedUp) => {
                // The target lost the guest after the stream ended: the
                // paused source is the only copy left.
                if let Some(p) = agent.vms.get(&name).await {
                    let _ = p.qmp().execute(&Cont {}).await;
                }
                (
                    AgentState::Failed,
                    Some("TransferFailed"),
                    format!(
                        "the agent on {me} restarted after the transfer and the target lost the guest; it was resumed here"
                    ),
                )
            }
            // The target has not said yet: look again on a later pass.
            _ => return,
        },
        (Role::Target, Some(RunState::Running)) => (
            AgentState::Running,
            None,
            format!("the guest runs on {me} (the agent restarted after the switchover)"),
        ),
        (Role::Source, _) => (
            AgentState::Failed,
            Some("AgentRestarted"),
            format!(
                "the agent on {me} restarted during the migration; the stream it carried is gone and the VM keeps running here"
            ),
        ),
        (Role::Target, _) => (
            AgentState::Failed,
            Some("AgentRestarted"),
            format!(
                "the agent on {me} restarted during the migration; the stream it carried is gone"
            ),
        ),
    };
    report_half(agent, m, role, state, reason, Some(message), None).await;
}

/// Cancel every running half (agent shutdown).
pub fn shutdown(agent: &Agent) {
    if let Ok(halves) = agent.halves.lock() {
        for half in halves.values() {
            half.cancel.cancel();
        }
    }
}

/// The Migration as the cache has it now.
pub(super) fn current(agent: &Agent, m: &Migration) -> Option<Arc<Migration>> {
    agent
        .migration_store
        .state()
        .into_iter()
        .find(|x| x.uid() == m.uid())
}

/// Whether the controller wants this migration's transfer stopped: a final
/// phase, a deletion, a cancel or the `AbortRequested` condition.
pub(super) fn abort_wanted(m: &Migration) -> bool {
    let status = m.status.clone().unwrap_or_default();
    matches!(
        status.phase,
        MigrationPhase::Failed | MigrationPhase::Cancelled
    ) || m.metadata.deletion_timestamp.is_some()
        || m.spec.cancel
        || status
            .conditions
            .iter()
            .any(|c| c.type_ == "AbortRequested" && c.status == "True")
}

/// Write this agent's report (and optionally more status fields).
pub(super) async fn report_half(
    agent: &Agent,
    m: &Migration,
    role: Role,
    state: AgentState,
    reason: Option<&str>,
    message: Option<String>,
    extra: Option<serde_json::Value>,
) {
    let report = AgentReport {
        state,
        reason: reason.map(str::to_string),
        message,
        time: Some(Time(Timestamp::now())),
        last_progress: None,
        guest_stopped: None,
        guest_resumed: None,
        memory_complete: None,
        recovery: None,
    };
    report_with(agent, m, role, report, extra).await;
}

/// Write `report` as this agent's half (fields left `None` keep their
/// earlier values: a JSON merge patch), with `extra` status fields.
pub(super) async fn report_with(
    agent: &Agent,
    m: &Migration,
    role: Role,
    report: AgentReport,
    extra: Option<serde_json::Value>,
) {
    let key = match role {
        Role::Source => "source",
        Role::Target => "target",
    };
    let mut status = serde_json::json!({ key: report });
    if let (Some(serde_json::Value::Object(extra)), Some(map)) = (extra, status.as_object_mut()) {
        map.extend(extra);
    }
    let api: Api<Migration> =
        Api::namespaced(agent.client.clone(), &m.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "status": status });
    // A report lost to an API server restarting would leave the other half
    // and the controller waiting on a state this half has left: retry what
    // can succeed later, for a while.
    let deadline = Instant::now() + REPORT_RETRY;
    let mut pause = Duration::from_millis(200);
    loop {
        let result = api
            .patch_status(
                &m.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await;
        match result {
            Ok(_) => return,
            Err(e) if report_retryable(&e) && Instant::now() + pause < deadline => {
                tracing::warn!(migration = %m.name_any(), error = %e, "reporting the migration half failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(migration = %m.name_any(), error = %e, "reporting the migration half failed");
                return;
            }
        }
    }
}

/// Whether a failed report can succeed later: the API server was
/// unreachable or overloaded, not a refusal of the report itself.
fn report_retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        _ => true,
    }
}

/// The effective policy the controller chose for this migration.
pub(super) async fn effective_policy(agent: &Agent, m: &Migration) -> (EffectivePolicy, u32) {
    let name = m.status.as_ref().and_then(|s| s.policy.clone());
    let Some(name) = name else {
        return (EffectivePolicy::default(), 0);
    };
    let api: Api<MigrationPolicy> = Api::all(agent.client.clone());
    match api.get(&name).await {
        Ok(p) => {
            let resolved = EffectivePolicy::resolve(
                PolicySource::Named(name.clone()),
                &crate::bridge::policy::overrides(&p.spec),
            );
            match resolved {
                Ok(e) => (e, p.spec.parallel_connections),
                Err(e) => {
                    tracing::warn!(policy = %name, error = %e, "policy does not resolve; using the defaults");
                    (EffectivePolicy::default(), 0)
                }
            }
        }
        Err(e) => {
            tracing::warn!(policy = %name, error = %e, "policy not readable; using the defaults");
            (EffectivePolicy::default(), 0)
        }
    }
}

/// Whether this host can do post-copy (userfaultfd as root, or allowed to all).
fn post_copy_available() -> bool {
    nix::unistd::geteuid().is_root()
        || std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
            .is_ok_and(|v| v.trim() == "1")
}

/// The executor's configuration from the effective policy.
pub(super) fn migration_config(
    policy: &EffectivePolicy,
    channels: u32,
    stall_floor: Duration,
) -> MigrationConfig {
    let c = &policy.convergence;
    let legacy = c.mode == core_policy::ConvergenceMode::Legacy;
    MigrationConfig {
        // Legacy keeps QEMU's defaults: 300 ms and its own bandwidth cap.
        downtime_limit: if legacy {
            Duration::from_millis(300)
        } else {
            c.downtime_limit
        },
        bandwidth: match policy.bandwidth {
            _ if legacy => Bandwidth::HypervisorDefault,
            core_policy::Bandwidth::Auto => Bandwidth::Auto,
            core_policy::Bandwidth::HypervisorDefault => Bandwidth::HypervisorDefault,
            core_policy::Bandwidth::Custom { bytes_per_sec } => Bandwidth::Limit(bytes_per_sec),
        },
        multifd_channels: u8::try_from(channels).ok().filter(|n| *n > 0),
        postcopy: c.mode == core_policy::ConvergenceMode::PostCopy && post_copy_available(),
        // Enabled from the start: QEMU throttles only when the guest dirties
        // faster than the link carries (its trigger threshold).
        auto_converge: (c.mode == core_policy::ConvergenceMode::SuspendWorkloadIfNeeded).then_some(
            Throttle {
                initial: convergence::THROTTLE_INITIAL,
                increment: convergence::THROTTLE_INCREMENT,
            },
        ),
        stall_timeout: convergence::stall_timeout(c).max(stall_floor),
        sample_interval: Duration::from_secs(1),
    }
}

/// Wait until `done` holds for the cached Migration (or it is gone, or the
/// agent shuts down).
pub(super) async fn wait_until(
    agent: &Agent,
    m: &Migration,
    cancel: &CancellationToken,
    done: impl Fn(&Migration) -> bool,
) {
    loop {
        match current(agent, m) {
            Some(now) if !done(&now) => {}
            _ => return,
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_mode(mode: core_policy::ConvergenceMode) -> EffectivePolicy {
        let mut p = EffectivePolicy::default();
        p.convergence.mode = mode;
        p
    }

    #[test]
    fn parallel_connections_become_multifd_channels_and_zero_one_stream() {
        let p = EffectivePolicy::default();
        let floor = Duration::from_secs(1);
        assert_eq!(migration_config(&p, 0, floor).multifd_channels, None);
        assert_eq!(migration_config(&p, 2, floor).multifd_channels, Some(2));
        assert_eq!(migration_config(&p, 16, floor).multifd_channels, Some(16));
        // Beyond what QEMU's parameter can hold (the schema stops at 16).
        assert_eq!(migration_config(&p, 300, floor).multifd_channels, None);
    }

    #[test]
    fn legacy_keeps_qemus_defaults_and_the_others_follow_the_policy() {
        let floor = Duration::from_secs(1);
        let legacy = migration_config(&with_mode(core_policy::ConvergenceMode::Legacy), 0, floor);
        assert_eq!(legacy.downtime_limit, Duration::from_millis(300));
        assert_eq!(legacy.bandwidth, Bandwidth::HypervisorDefault);
        assert!(legacy.auto_converge.is_none() && !legacy.postcopy);

        let mut capped = with_mode(core_policy::ConvergenceMode::MinimalDowntime);
        capped.bandwidth = core_policy::Bandwidth::Custom {
            bytes_per_sec: 4 << 20,
        };
        capped.convergence.downtime_limit = Duration::from_millis(20);
        let c = migration_config(&capped, 0, floor);
        assert_eq!(c.bandwidth, Bandwidth::Limit(4 << 20));
        assert_eq!(c.downtime_limit, Duration::from_millis(20));

        let suspend = migration_config(
            &with_mode(core_policy::ConvergenceMode::SuspendWorkloadIfNeeded),
            0,
            floor,
        );
        assert!(suspend.auto_converge.is_some());
        let post = migration_config(&with_mode(core_policy::ConvergenceMode::PostCopy), 0, floor);
        assert_eq!(post.postcopy, post_copy_available());
    }
}
