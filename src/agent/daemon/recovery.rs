//! Post-copy recovery, driven by the agents: when the stream breaks after
//! the guest switched to the target (QEMU `postcopy-paused` on both sides),
//! the guest lives on the target, paused on missing pages, and the source
//! holds the rest of its memory. Aborting would lose it; so the halves
//! resume the stream over a new relay connection, in rounds coordinated
//! through the Migration's status:
//!
//! ```text
//!  source agent                                  target agent
//!  run_source → Err(PostcopyPaused{why})
//!  round n: report PostCopyActive, recovery: n ─► sees source.recovery = n > served
//!                                                 QEMU still postcopy-active (cut link)? migrate-pause
//!                                                 wait postcopy-paused; migrate-recover unix:recover.sock
//!                                                 relay expects (migration, source) → recover.sock
//!           ◄──────────────────────────────────── report Running, recovery: n
//!  new SourceRelay (outgoing-rN.sock)
//!  migrate resume=true → monitor as before
//!    completed ──► SwitchedOver
//!    postcopy-paused again ──► round n+1
//!  rounds > MAX_ROUNDS or past limit() ──► Failed(PostCopyInterrupted): the guest is
//!  never resumed on the source (it would run on two hosts); the VM is marked Failed
//! ```
//!
//! A round whose target does not answer within the stall timeout is asked
//! again as the next round.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::agent::migrate::{
    self, ConvergencePolicy, MigrationConfig, MigrationError, ProgressSample, SourceCompleted,
    TargetHandle,
};
use crate::agent::qemu::QemuProcess;
use crate::agent::qmp::{self, MigrationStatus};
use crate::agent::relay::{MigrationRef, SourceRelay, SourceRelayConfig};
use crate::api::Migration;
use crate::api::migration::{AgentReport, AgentState};
use crate::core::policy::ConvergenceConfig;

use super::error_chain as chain;
use super::halves::{Role, current, report_half, report_with};
use super::source_half::target_endpoint;
use super::{Agent, migration_owns_qemus};

/// Recovery rounds tried before the migration fails.
pub const MAX_ROUNDS: u32 = 5;
/// How long the target waits for its QEMU to notice the broken stream.
const TARGET_PAUSE_WAIT: Duration = Duration::from_secs(10);
/// Pause between rounds that failed at once.
const ROUND_BACKOFF: Duration = Duration::from_secs(1);

/// How long after the break recovery may go on: the policy's
/// `progressTimeout` (no progress is made meanwhile), at least two stall
/// timeouts.
pub fn limit(policy: &ConvergenceConfig, stall_timeout: Duration) -> Duration {
    policy.progress_timeout.max(stall_timeout * 2)
}

/// The source's side of the recovery of one migration.
pub(super) struct SourceRecovery<'a> {
    pub(super) agent: &'a Agent,
    pub(super) m: &'a Migration,
    pub(super) vm: &'a QemuProcess,
    pub(super) relay_config: &'a SourceRelayConfig,
    pub(super) config: &'a MigrationConfig,
    pub(super) limit: Duration,
    /// Rounds asked for before this run (by an agent that has since
    /// restarted): this run's rounds are numbered after them, so that the
    /// target's answer to an old round is not taken for a new one.
    pub(super) rounds_before: u32,
}

/// Whether the target is ready for a round.
enum Ready {
    Yes,
    Gone(String),
    Timeout,
}

impl SourceRecovery<'_> {
    /// Recovers until the migration completes, fails for good, or the
    /// limits pass. `relay` is replaced by each round's new relay.
    pub(super) async fn run(
        &mut self,
        relay: &mut SourceRelay,
        mut why: String,
        policy: &mut dyn ConvergencePolicy,
        observer: &mut (dyn FnMut(&ProgressSample) + Send),
        abort: &CancellationToken,
    ) -> Result<SourceCompleted, MigrationError> {
        let began = Instant::now();
        let mut round = self.rounds_before;
        loop {
            if round - self.rounds_before >= MAX_ROUNDS || began.elapsed() >= self.limit {
                return Err(MigrationError::PostcopyRecoveryFailed {
                    rounds: round - self.rounds_before,
                    within: began.elapsed(),
                    why,
                });
            }
            round += 1;
            tracing::warn!(migration = %relay_name(self.relay_config), round, %why, "post-copy stream broke; recovering");
            self.ask(round, &why).await;
            let wait = self
                .config
                .stall_timeout
                .min(self.limit.saturating_sub(began.elapsed()));
            match self.target_ready(round, wait).await {
                Ready::Yes => {}
                Ready::Gone(message) => {
                    return Err(MigrationError::PostcopyRecoveryFailed {
                        rounds: round - self.rounds_before,
                        within: began.elapsed(),
                        why: message,
                    });
                }
                Ready::Timeout => {
                    why = format!(
                        "the target did not listen for recovery round {round} within {wait:?}"
                    );
                    continue;
                }
            }
            // Each round its own socket: dropping the old relay removes its
            // socket file, which must not be the new one's.
            let mut cfg = self.relay_config.clone();
            cfg.socket_path = cfg
                .socket_path
                .with_file_name(format!("outgoing-r{round}.sock"));
            // A target agent that restarted may listen elsewhere now.
            if let Some(addr) = target_endpoint(self.agent, &cfg.target_host).await {
                cfg.target_addr = addr;
            }
            match SourceRelay::start(cfg).await {
                Ok(fresh) => *relay = fresh,
                Err(e) => {
                    why = chain(&e);
                    tokio::time::sleep(ROUND_BACKOFF).await;
                    continue;
                }
            }
            match migrate::resume_source(self.vm, relay, self.config, policy, observer, abort).await
            {
                Ok(done) => {
                    tracing::info!(migration = %relay_name(self.relay_config), round, "post-copy recovered");
                    return Ok(done);
                }
                Err(MigrationError::PostcopyPaused { why: w }) => why = w,
                Err(e @ MigrationError::Qmp { .. }) if self.paused().await => {
                    why = chain(&e);
                    tokio::time::sleep(ROUND_BACKOFF).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Asks the target for round `round`.
    async fn ask(&self, round: u32, why: &str) {
        let report = AgentReport {
            state: AgentState::PostCopyActive,
            reason: None,
            message: Some(format!(
                "the post-copy stream broke ({why}); recovery round {round} (at most {MAX_ROUNDS} in a row)"
            )),
            time: Some(Time(Timestamp::now())),
            last_progress: None,
            guest_stopped: None,
            guest_resumed: None,
            memory_complete: None,
            recovery: Some(round),
        };
        report_with(self.agent, self.m, Role::Source, report, None).await;
    }

    /// Waits until the target listens for `round`.
    async fn target_ready(&self, round: u32, wait: Duration) -> Ready {
        let deadline = Instant::now() + wait;
        loop {
            let Some(now) = current(self.agent, self.m) else {
                return Ready::Gone("the Migration is gone".into());
            };
            let status = now.status.clone().unwrap_or_default();
            if !migration_owns_qemus(status.phase) {
                return Ready::Gone(format!("the migration ended ({:?})", status.phase));
            }
            if let Some(t) = status.target {
                if t.state == AgentState::Failed {
                    return Ready::Gone(format!(
                        "the target failed: {}",
                        t.message.unwrap_or_default()
                    ));
                }
                if t.recovery.is_some_and(|r| r >= round) {
                    return Ready::Yes;
                }
            }
            if Instant::now() >= deadline {
                return Ready::Timeout;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the source QEMU waits in `postcopy-paused`.
    async fn paused(&self) -> bool {
        self.vm
            .qmp()
            .execute(&qmp::QueryMigrate {})
            .await
            .is_ok_and(|m| m.status == Some(MigrationStatus::PostcopyPaused))
    }
}

fn relay_name(cfg: &SourceRelayConfig) -> String {
    cfg.migration.to_string()
}

/// The target's side: until the migration is final, answer each recovery
/// round the source asks for by listening anew. `served`: the rounds
/// answered before (by this agent before it restarted).
pub(super) async fn serve_target(
    agent: &Agent,
    m: &Migration,
    handle: &TargetHandle,
    migration: &MigrationRef,
    source_host: &str,
    mut served: u32,
    cancel: &CancellationToken,
) {
    loop {
        let Some(now) = current(agent, m) else { return };
        let status = now.status.clone().unwrap_or_default();
        if !migration_owns_qemus(status.phase) {
            return;
        }
        let asked = status.source.as_ref().and_then(|s| s.recovery).unwrap_or(0);
        if asked > served {
            served = asked;
            match listen(handle).await {
                Ok(socket) => {
                    let _ = agent.table.expect(migration.clone(), source_host, socket);
                    let report = AgentReport {
                        state: AgentState::Running,
                        reason: None,
                        message: Some(format!("listening for post-copy recovery round {asked}")),
                        time: Some(Time(Timestamp::now())),
                        last_progress: None,
                        guest_stopped: None,
                        guest_resumed: None,
                        memory_complete: None,
                        recovery: Some(asked),
                    };
                    report_with(agent, m, Role::Target, report, None).await;
                }
                Err(e) if !handle.vm().is_alive() => {
                    let message = format!(
                        "the target QEMU exited during post-copy ({}); the guest cannot be recovered",
                        chain(&e)
                    );
                    report_half(
                        agent,
                        m,
                        Role::Target,
                        AgentState::Failed,
                        Some("TargetExited"),
                        Some(message),
                        None,
                    )
                    .await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(migration = %migration, round = asked, error = %chain(&e), "cannot listen for post-copy recovery; the source will ask again");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Makes the target QEMU listen for the resumed stream.
async fn listen(handle: &TargetHandle) -> Result<PathBuf, MigrationError> {
    // A cut link leaves the target's QEMU waiting on a dead stream: pause it
    // so that it listens again (QEMU's migrate-pause works on this side too).
    let q = handle.vm().qmp();
    if let Ok(info) = q.execute(&qmp::QueryMigrate {}).await
        && matches!(
            info.status,
            Some(MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover)
        )
        && let Err(e) = q.execute(&qmp::MigratePause {}).await
    {
        tracing::warn!(error = %e, "migrate-pause on the target failed");
    }
    handle.recover(TARGET_PAUSE_WAIT).await
}
