//! The source half of a migration: cold (stop the guest) or live (relay to
//! the target, run the executor with the core's convergence decision,
//! recover a broken post-copy stream, report the switchover with QEMU's
//! downtime and the real pause).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::agent::migrate::{self, GuestClock, MigrationError, ProgressSample};
use crate::agent::relay::clock::from_micros;
use crate::agent::relay::{ClientTransport, MigrationRef, SourceRelay, SourceRelayConfig};
use crate::api::migration::{AgentReport, AgentState, Progress};
use crate::api::{Host, Migration, MigrationType};
use crate::core::convergence::{Context, Tuning};

use super::error_chain as chain;
use super::halves::{
    Role, abort_wanted, current, effective_policy, migration_config, report_half, report_with,
};
use super::plan::local_name;
use super::progress::{CoreConvergence, Shared, agent_handle, core_time, write_progress};
use super::target_half::micro_time;
use super::{Agent, recovery};

/// How long the source waits for the target to confirm that the guest runs
/// before it reports the switchover on QEMU's word alone.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a failure came after the guest had switched to post-copy.
fn done_postcopy(e: &MigrationError) -> bool {
    matches!(
        e,
        MigrationError::PostcopyPaused { .. } | MigrationError::PostcopyRecoveryFailed { .. }
    )
}

/// Milliseconds, rounded to the nearest.
fn round_ms(d: Duration) -> u64 {
    u64::try_from((d.as_micros() + 500) / 1000).unwrap_or(u64::MAX)
}

/// Milliseconds, rounded up (an error bound never shrinks by rounding).
fn ceil_ms(d: Duration) -> u64 {
    u64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

/// Where `host`'s agent accepts migration streams now (its Host's
/// `migrationEndpoint`, resolved).
pub(super) async fn target_endpoint(agent: &Agent, host: &str) -> Option<SocketAddr> {
    let endpoint = match Api::<Host>::all(agent.client.clone()).get(host).await {
        Ok(h) => h.spec.migration_endpoint.clone()?,
        Err(e) => {
            tracing::warn!(%host, error = %e, "reading the target host");
            return None;
        }
    };
    tokio::net::lookup_host(endpoint.as_str())
        .await
        .ok()
        .and_then(|mut a| a.next())
}

/// The source half. `adopted_postcopy`: this agent restarted while its
/// QEMU was in post-copy (the stream gone with the old agent's relay, the
/// guest running on the target on pages still here); the half then goes
/// straight to recovery, with why the stream broke.
pub(super) async fn source_half(
    agent: &Agent,
    m: &Migration,
    cancel: &CancellationToken,
    adopted_postcopy: Option<String>,
) {
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
    let Some(target_addr) = target_endpoint(agent, &target_host).await else {
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
    let relay_config = SourceRelayConfig {
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
    };
    // Times the guest's stop here (QEMU's STOP event) for the real pause;
    // watching from before the migration starts.
    let clock = GuestClock::watch(vm.qmp());
    let relay = SourceRelay::start(relay_config.clone()).await;
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
    if adopted_postcopy.is_none() {
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
    }

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
    let stop_progress = CancellationToken::new();
    let writer = tokio::spawn(write_progress(
        agent_handle(agent, m),
        progress_rx,
        shared.clone(),
        clock.watcher(),
        stop_progress.clone(),
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
    let mut relay = relay;
    let rounds_before = m
        .status
        .as_ref()
        .and_then(|s| s.source.as_ref())
        .and_then(|r| r.recovery)
        .unwrap_or(0);
    let mut result = match adopted_postcopy {
        Some(why) => Err(MigrationError::PostcopyPaused { why }),
        None => {
            migrate::run_source(
                &vm,
                &relay,
                &config,
                &mut policy_hook,
                &mut observer,
                &abort,
            )
            .await
        }
    };
    if let Err(MigrationError::PostcopyPaused { why }) = &result {
        // The guest runs on the target and the stream broke: resume it over
        // a new relay connection, within the policy's limits.
        let mut rounds = recovery::SourceRecovery {
            agent,
            m,
            vm: &vm,
            relay_config: &relay_config,
            config: &config,
            limit: recovery::limit(&policy.convergence, config.stall_timeout),
            rounds_before,
        };
        result = rounds
            .run(
                &mut relay,
                why.clone(),
                &mut policy_hook,
                &mut observer,
                &abort,
            )
            .await;
    }
    watcher.abort();
    // No progress write may land after the final report (it would set the
    // half back to Transferring): let the one under way finish first.
    stop_progress.cancel();
    let writer_abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .is_err()
    {
        writer_abort.abort();
    }
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
                // The target may have announced the guest at its stop: the
                // segment must learn it is here again.
                crate::agent::net::announce_self(vm.qmp(), "the resumed source").await;
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
            let mut extra = serde_json::json!({
                "progress": progress,
                "downtimeMs": done.downtime.as_millis() as u64,
                "durationMs": elapsed_ms,
            });
            // The real pause: this guest's STOP to the target's RESUME. An
            // agent restarted after the stop (in post-copy) did not see it:
            // its progress writes kept it in the API.
            let status = current(agent, m).and_then(|m| m.status.clone());
            let stopped = clock.stopped(Duration::from_secs(1)).await.or_else(|| {
                status
                    .as_ref()
                    .and_then(|s| s.source.as_ref())
                    .and_then(|r| r.guest_stopped.as_ref())
                    .map(|t| from_micros(t.0.as_microsecond()))
            });
            let resumed = status
                .and_then(|s| s.target)
                .and_then(|t| t.guest_resumed)
                .map(|t| from_micros(t.0.as_microsecond()));
            let offset = relay.peer_clock();
            let pause = stopped
                .zip(resumed)
                .map(|(s, r)| migrate::pause::pause(s, r, offset.as_ref()));
            let channels = relay.counters().snapshot().channels_opened;
            let mut message = format!(
                "transferred {} bytes over {channels} relay channel{} in {elapsed_ms} ms, downtime {} ms",
                done.relay_forward_bytes,
                if channels == 1 { "" } else { "s" },
                done.downtime.as_millis()
            );
            if let (Some(p), Some(map)) = (pause, extra.as_object_mut()) {
                map.insert("pauseMs".into(), serde_json::json!(round_ms(p.duration)));
                if let Some(e) = p.error {
                    map.insert("pauseErrorMs".into(), serde_json::json!(ceil_ms(e)));
                }
                message.push_str(&format!(
                    ", pause {:.1} ms ± {} (target clock {})",
                    p.duration.as_secs_f64() * 1e3,
                    p.error.map_or("unknown".into(), |e| format!(
                        "{:.1} ms",
                        e.as_secs_f64() * 1e3
                    )),
                    offset.map_or("assumed synchronised".into(), |o| format!(
                        "{:+.1} ms ± {:.1} ms",
                        o.offset_us as f64 / 1e3,
                        o.error_us as f64 / 1e3
                    )),
                ));
            }
            let report = AgentReport {
                state: AgentState::SwitchedOver,
                reason: None,
                message: Some(message),
                time: Some(Time(Timestamp::now())),
                last_progress: None,
                guest_stopped: stopped.map(micro_time),
                guest_resumed: None,
                memory_complete: None,
                recovery: None,
            };
            report_with(agent, m, Role::Source, report, Some(extra)).await;
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
                (e, _) if done_postcopy(e) => "PostCopyInterrupted".into(),
                (MigrationError::Relay(r), _) if r.reason().contains("Refus") => {
                    "PeerRejected".into()
                }
                _ => "TransferFailed".into(),
            };
            let message = if done_postcopy(&e) {
                // The guest ran on the target: the source never resumes it
                // (it would run twice); its memory is split between hosts.
                format!(
                    "{} ({}); the guest had switched to {} in post-copy: it is paused \
                     there and here, and is not resumed on {}",
                    chain(&e),
                    e.reason(),
                    target_host,
                    agent.config.host
                )
            } else {
                format!(
                    "{} ({}); the guest keeps running on {}",
                    chain(&e),
                    e.reason(),
                    agent.config.host
                )
            };
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
