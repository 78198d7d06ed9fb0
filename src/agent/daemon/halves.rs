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
//!    phase final → forget the relay entry
//! ```
//!
//! A half that was under way when the agent restarted cannot be resumed
//! (its relay died with the agent, and QEMU failed the stream): it is
//! reported `Failed` with reason `AgentRestarted`, and the VM keeps running
//! on the source. Which QEMUs belong to a migration is derived from the
//! Migrations (see [`super::Agent::reserved`]); the VM plan cleans up what
//! is left once the migration is final.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::agent::migrate::{
    self, Bandwidth, ConvergencePolicy, MigrationConfig, MigrationError, ProgressSample, Throttle,
};
use crate::agent::relay::{ClientTransport, MigrationRef, SourceRelay, SourceRelayConfig};
use crate::api::migration::{AgentReport, AgentState, Progress};
use crate::api::{Host, Migration, MigrationPhase, MigrationPolicy, MigrationType};
use crate::core::convergence::{self, Assessment, Context, Tuning};
use crate::core::policy::{self as core_policy, EffectivePolicy, PolicySource};
use crate::core::time::Timestamp as CoreTime;

use super::plan::local_name;
use super::{Agent, error_chain as chain, migration_owns_qemus};

/// How long the source waits for the target to confirm that the guest runs
/// before it reports the switchover on QEMU's word alone.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a live transfer may run at the very most (the policy's
/// deadlines end it long before).
const TARGET_WAIT: Duration = Duration::from_secs(24 * 3600);
/// How long a report the API server could not take is retried: longer than
/// a restart of the API server, within a Migration's deadlines.
const REPORT_RETRY: Duration = Duration::from_secs(120);

/// A running half.
pub struct Half {
    cancel: CancellationToken,
}

/// Which half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
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
            )
        });
        if migration_owns_qemus(status.phase) && lost {
            let m = (*m).clone();
            // One look at a time per migration.
            if let Ok(mut halves) = agent.halves.lock() {
                halves.insert(
                    uid.clone(),
                    Half {
                        cancel: CancellationToken::new(),
                    },
                );
            }
            tokio::spawn({
                let agent = agent.clone();
                async move {
                    report_lost_half(&agent, &m, role).await;
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
                Role::Source => source_half(&agent, &m, &cancel).await,
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
fn current(agent: &Agent, m: &Migration) -> Option<Arc<Migration>> {
    agent
        .migration_store
        .state()
        .into_iter()
        .find(|x| x.uid() == m.uid())
}

/// Whether the controller wants this migration's transfer stopped: a final
/// phase, a deletion, a cancel or the `AbortRequested` condition.
fn abort_wanted(m: &Migration) -> bool {
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
async fn report_half(
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
    };
    report_with(agent, m, role, report, extra).await;
}

async fn report_with(
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
async fn effective_policy(agent: &Agent, m: &Migration) -> (EffectivePolicy, u32) {
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
fn migration_config(
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

async fn target_half(agent: &Agent, m: &Migration, cancel: &CancellationToken) {
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
        .expect(migration, &source_host, handle.incoming_socket());
    report_half(agent, m, Role::Target, AgentState::Ready, None, None, None).await;

    let outcome = tokio::select! {
        r = handle.wait_running(TARGET_WAIT) => Some(r),
        _ = wait_until(agent, m, cancel, abort_wanted) => None,
    };
    match outcome {
        Some(Ok(())) => {
            report_half(
                agent,
                m,
                Role::Target,
                AgentState::Running,
                None,
                Some(format!("the guest runs on {}", agent.config.host)),
                None,
            )
            .await;
            // Keep the relay entry until the migration is final (post-copy
            // recovery would come through it).
            wait_until(agent, m, cancel, |m| {
                !migration_owns_qemus(m.status.clone().unwrap_or_default().phase)
            })
            .await;
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

/// Wait until `done` holds for the cached Migration (or it is gone, or the
/// agent shuts down).
async fn wait_until(
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

/// The core's convergence decision behind the executor's policy hook.
struct CoreConvergence {
    cfg: core_policy::ConvergenceConfig,
    ctx: Context,
    tuning: Tuning,
    started: Instant,
    shared: Arc<Mutex<Shared>>,
}

/// What the convergence decision tells the progress writer.
#[derive(Default)]
struct Shared {
    assessment: Option<Assessment>,
    abort_reason: Option<String>,
    last_progress: Option<Timestamp>,
    min_remaining: Option<u64>,
}

fn core_time(at: Timestamp) -> CoreTime {
    CoreTime::from_millis(at.as_millisecond())
}

impl ConvergencePolicy for CoreConvergence {
    fn next_action(&mut self, samples: &[ProgressSample]) -> migrate::Action {
        let start = Timestamp::now() - self.started.elapsed();
        let core_samples: Vec<convergence::ProgressSample> = samples
            .iter()
            .map(|s| convergence::ProgressSample {
                at: core_time(start + s.elapsed),
                iteration: s.iteration,
                total: s.total_bytes,
                transferred: s.transferred_bytes,
                remaining: s.remaining_bytes,
                dirty_rate: s.dirty_rate,
                throughput: s.throughput,
                expected_downtime: s.expected_downtime,
                cpu_throttle_percent: u8::try_from(s.cpu_throttle_percent).unwrap_or(u8::MAX),
            })
            .collect();
        let now = core_time(Timestamp::now());
        let decision = convergence::decide(&core_samples, &self.tuning, &self.cfg, &self.ctx, now);
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.assessment = Some(decision.assessment);
        let changed = |t: &mut Tuning| t.last_change = Some(now);
        match decision.action {
            convergence::Action::Continue => migrate::Action::Continue,
            convergence::Action::SetDowntimeLimit(d) => {
                self.tuning.downtime_limit = Some(d);
                changed(&mut self.tuning);
                migrate::Action::SetDowntimeLimit(d)
            }
            convergence::Action::EnableAutoConverge { initial, increment } => {
                self.tuning.auto_converge = true;
                self.tuning.throttle_percent = initial;
                changed(&mut self.tuning);
                migrate::Action::SetThrottle(Throttle { initial, increment })
            }
            convergence::Action::RaiseThrottle(p) => {
                self.tuning.throttle_percent = p;
                changed(&mut self.tuning);
                migrate::Action::SetThrottle(Throttle {
                    initial: p,
                    increment: convergence::THROTTLE_INCREMENT,
                })
            }
            convergence::Action::StartPostCopy => {
                self.tuning.post_copy = true;
                changed(&mut self.tuning);
                migrate::Action::StartPostcopy
            }
            convergence::Action::PauseGuest => {
                self.tuning.paused = true;
                changed(&mut self.tuning);
                migrate::Action::PauseGuest
            }
            // Post-copy recovery over a new relay connection is not built
            // yet: keep waiting rather than abort (which would lose the guest).
            convergence::Action::RecoverPostCopy => migrate::Action::Continue,
            convergence::Action::Abort { reason, message } => {
                shared.abort_reason = Some(reason.as_str().to_string());
                migrate::Action::Abort(message)
            }
        }
    }
}

async fn source_half(agent: &Agent, m: &Migration, cancel: &CancellationToken) {
    let namespace = m.namespace().unwrap_or_default();
    let name = local_name(&namespace, &m.spec.vm_name);
    let Some(vm) = agent.vms.get(&name).await.filter(|p| p.is_alive()) else {
        let message = format!(
            "VM {namespace}/{} does not run on {}",
            m.spec.vm_name, agent.config.host
        );
        report_half(
            agent,
            m,
            Role::Source,
            AgentState::Failed,
            Some("VmNotRunning"),
            Some(message),
            None,
        )
        .await;
        return;
    };
    if m.spec.migration_type == MigrationType::Cold {
        report_half(
            agent,
            m,
            Role::Source,
            AgentState::Transferring,
            None,
            Some("stopping the guest".into()),
            None,
        )
        .await;
        return match agent.vms.stop(&name, Duration::from_secs(10)).await {
            Ok(()) => {
                let message =
                    "the guest is stopped here; it starts on the target with the same identity"
                        .to_string();
                report_half(
                    agent,
                    m,
                    Role::Source,
                    AgentState::SwitchedOver,
                    None,
                    Some(message),
                    None,
                )
                .await
            }
            Err(e) => {
                report_half(
                    agent,
                    m,
                    Role::Source,
                    AgentState::Failed,
                    Some("TransferFailed"),
                    Some(chain(&e)),
                    None,
                )
                .await
            }
        };
    }
    let target_host = m
        .status
        .as_ref()
        .and_then(|s| s.target_host.clone())
        .unwrap_or_default();
    let endpoint = match Api::<Host>::all(agent.client.clone())
        .get(&target_host)
        .await
    {
        Ok(h) => h.spec.migration_endpoint.clone(),
        Err(e) => {
            tracing::warn!(host = %target_host, error = %e, "reading the target host");
            None
        }
    };
    let target_addr = match endpoint {
        Some(ep) => tokio::net::lookup_host(ep.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next()),
        None => None,
    };
    let Some(target_addr) = target_addr else {
        let message = format!("host {target_host} has no reachable migration endpoint");
        report_half(
            agent,
            m,
            Role::Source,
            AgentState::Failed,
            Some("TransferFailed"),
            Some(message),
            None,
        )
        .await;
        return;
    };
    let (policy, channels) = effective_policy(agent, m).await;
    let config = migration_config(&policy, channels, agent.config.stall_timeout);
    let Some(uid) = m.uid() else { return };
    let relay = SourceRelay::start(SourceRelayConfig {
        migration: MigrationRef {
            namespace: namespace.clone(),
            name: m.name_any(),
            uid,
        },
        source_host: agent.config.host.clone(),
        target_host: target_host.clone(),
        target_addr,
        socket_path: migrate::source_socket(&vm),
        transport: ClientTransport::Tls(agent.client_tls.clone()),
        bandwidth: config.bandwidth.relay_limit(),
    })
    .await;
    let relay = match relay {
        Ok(r) => r,
        Err(e) => {
            report_half(
                agent,
                m,
                Role::Source,
                AgentState::Failed,
                Some("TransferFailed"),
                Some(chain(&e)),
                None,
            )
            .await;
            return;
        }
    };
    let started = Timestamp::now();
    report_half(
        agent,
        m,
        Role::Source,
        AgentState::Transferring,
        None,
        None,
        None,
    )
    .await;

    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut policy_hook = CoreConvergence {
        cfg: policy.convergence,
        ctx: Context {
            started: core_time(started),
            post_copy_available: config.postcopy,
        },
        tuning: Tuning::default(),
        started: Instant::now(),
        shared: shared.clone(),
    };
    // The observer runs inside the executor: it only records; a task writes.
    let (progress_tx, progress_rx) = tokio::sync::watch::channel::<Option<ProgressSample>>(None);
    let mut observer = move |s: &ProgressSample| {
        let _ = progress_tx.send(Some(s.clone()));
    };
    let writer = tokio::spawn(write_progress(
        agent_handle(agent, m),
        progress_rx,
        shared.clone(),
    ));
    let abort = CancellationToken::new();
    let watcher = {
        let abort = abort.clone();
        let cancel = cancel.clone();
        let store = agent.migration_store.clone();
        let uid = m.uid();
        tokio::spawn(async move {
            loop {
                let now = store.state().into_iter().find(|x| x.uid() == uid);
                if now.is_none_or(|m| abort_wanted(&m)) || cancel.is_cancelled() {
                    abort.cancel();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let result = migrate::run_source(
        &vm,
        &relay,
        &config,
        &mut policy_hook,
        &mut observer,
        &abort,
    )
    .await;
    watcher.abort();
    writer.abort();
    let elapsed_ms = u64::try_from(
        (Timestamp::now() - started)
            .total(k8s_openapi::jiff::Unit::Millisecond)
            .unwrap_or(0.0) as i64,
    )
    .unwrap_or(0);
    match result {
        Ok(done) => {
            // The guest runs on the target once it says so; wait for that
            // before declaring the switchover, within reason.
            let confirmed = tokio::time::timeout(CONFIRM_TIMEOUT, async {
                loop {
                    let target = current(agent, m)
                        .and_then(|m| m.status.clone())
                        .and_then(|s| s.target);
                    match target.map(|t| t.state) {
                        Some(AgentState::Running) => return true,
                        Some(AgentState::Failed | AgentState::CleanedUp) => return false,
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
            .await
            .unwrap_or(true);
            if !confirmed && !done.postcopy {
                // The target agent saw its QEMU die after the stream ended:
                // the paused source is the only copy left, resume it.
                let _ = vm.qmp().execute(&crate::agent::qmp::Cont {}).await;
                let message =
                    "the target QEMU died at switchover; the guest was resumed on the source"
                        .to_string();
                report_half(
                    agent,
                    m,
                    Role::Source,
                    AgentState::Failed,
                    Some("TransferFailed"),
                    Some(message),
                    None,
                )
                .await;
                return;
            }
            let last = done.samples.last();
            let progress = Progress {
                iteration: last.map_or(0, |s| s.iteration),
                memory_total: last.map_or(0, |s| s.total_bytes),
                memory_transferred: last.map_or(0, |s| s.transferred_bytes),
                memory_remaining: 0,
                dirty_rate: last.map_or(0, |s| s.dirty_rate),
                throughput: last.map_or(0, |s| s.throughput),
                expected_downtime_ms: last
                    .and_then(|s| s.expected_downtime)
                    .map_or(0, |d| d.as_millis() as u64),
                percent: 100,
                eta_seconds: None,
                converging: true,
                convergence: Some(if done.paused_guest {
                    "completed after pausing the guest".into()
                } else if done.postcopy {
                    "completed in post-copy".into()
                } else {
                    "completed in pre-copy".into()
                }),
            };
            let extra = serde_json::json!({
                "progress": progress,
                "downtimeMs": done.downtime.as_millis() as u64,
                "durationMs": elapsed_ms,
            });
            let message = format!(
                "transferred {} bytes in {elapsed_ms} ms, downtime {} ms",
                done.relay_forward_bytes,
                done.downtime.as_millis()
            );
            report_half(
                agent,
                m,
                Role::Source,
                AgentState::SwitchedOver,
                None,
                Some(message),
                Some(extra),
            )
            .await;
        }
        Err(MigrationError::Cancelled) => {
            report_half(
                agent,
                m,
                Role::Source,
                AgentState::Aborted,
                None,
                Some("the transfer was cancelled; the guest runs here".into()),
                None,
            )
            .await;
        }
        Err(e) => {
            let policy_reason = shared.lock().ok().and_then(|s| s.abort_reason.clone());
            let reason = match (&e, policy_reason.as_deref()) {
                (MigrationError::Aborted(_), Some(r)) => r.to_string(),
                (MigrationError::Stalled { .. }, _) => "TransferStalled".into(),
                (MigrationError::Relay(r), _) if r.reason().contains("Refus") => {
                    "PeerRejected".into()
                }
                _ => "TransferFailed".into(),
            };
            let message = format!(
                "{} ({}); the guest keeps running on {}",
                chain(&e),
                e.reason(),
                agent.config.host
            );
            report_half(
                agent,
                m,
                Role::Source,
                AgentState::Failed,
                Some(&reason),
                Some(message),
                None,
            )
            .await;
        }
    }
}

/// What the progress writer needs to patch the Migration.
struct MigrationHandle {
    api: Api<Migration>,
    name: String,
}

fn agent_handle(agent: &Agent, m: &Migration) -> MigrationHandle {
    MigrationHandle {
        api: Api::namespaced(agent.client.clone(), &m.namespace().unwrap_or_default()),
        name: m.name_any(),
    }
}

/// Write the latest sample to `status.progress` about once a second (never
/// more: the API is not a time-series store).
async fn write_progress(
    handle: MigrationHandle,
    mut rx: tokio::sync::watch::Receiver<Option<ProgressSample>>,
    shared: Arc<Mutex<Shared>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if rx.changed().await.is_err() {
            return;
        }
        let Some(s) = rx.borrow_and_update().clone() else {
            continue;
        };
        let (assessment, last_progress) = {
            let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
            if shared
                .min_remaining
                .is_none_or(|min| s.remaining_bytes < min)
            {
                shared.min_remaining = Some(s.remaining_bytes);
                shared.last_progress = Some(Timestamp::now());
            }
            (shared.assessment.clone(), shared.last_progress)
        };
        let percent = (s.remaining_bytes.min(s.total_bytes) * 100)
            .checked_div(s.total_bytes)
            .map_or(0, |left| 100 - left as u32);
        let progress = Progress {
            iteration: s.iteration,
            memory_total: s.total_bytes,
            memory_transferred: s.transferred_bytes,
            memory_remaining: s.remaining_bytes,
            dirty_rate: s.dirty_rate,
            throughput: s.throughput,
            expected_downtime_ms: s.expected_downtime.map_or(0, |d| d.as_millis() as u64),
            percent: percent.min(99),
            eta_seconds: assessment.as_ref().and_then(|a| a.eta).map(|d| d.as_secs()),
            converging: assessment.as_ref().is_some_and(|a| a.converging),
            convergence: assessment
                .as_ref()
                .map(|a| format!("{}; {}", a.explanation, a.next_step)),
        };
        let state = if s.status.is_postcopy() {
            AgentState::PostCopyActive
        } else {
            AgentState::Transferring
        };
        let report = AgentReport {
            state,
            reason: None,
            message: None,
            time: None,
            last_progress: last_progress.map(Time),
        };
        let patch = serde_json::json!({"status": {"progress": progress, "source": report}});
        if let Err(e) = handle
            .api
            .patch_status(&handle.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::debug!(migration = %handle.name, error = %e, "progress update failed");
        }
    }
}
