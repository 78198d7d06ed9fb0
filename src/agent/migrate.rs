//! The migration executor: the source and target halves of a live
//! migration, as QMP calls, sampling and a watchdog.
//!
//! ```text
//!  target agent                              source agent
//!  prepare_target(spec, cfg)                 SourceRelay::start(… socket …)
//!   QEMU -incoming defer                     run_source(vm, relay, cfg, policy, …)
//!   caps + multifd-channels                   caps + params (downtime, bandwidth, …)
//!   migrate-incoming unix:<incoming.sock>     migrate unix:<relay socket>
//!   (TargetRelay delivers there)              every sample_interval:
//!                                               query-migrate → ProgressSample → observer
//!                                               stall watchdog (ram.transferred, relay bytes)
//!                                               policy.next_action(samples) → apply
//!                                               cancel token → migrate_cancel
//!  wait_running() ◄────── completed ───────── Completed{downtime,…} (source paused)
//!                                            finish_source(): quit the source QEMU
//! ```
//!
//! Until QEMU reports `completed` (or the guest runs post-copy on the
//! target) the source is authoritative: every error path leaves it running
//! and the caller tears the target down ([`TargetHandle::abort`]). QEMU does
//! not notice a stalled stream (a cut link leaves it `active` forever), so
//! the watchdog cancels a migration whose `ram.transferred` and relay byte
//! counters have both stood still for `stall_timeout`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::qemu::{MachineSpec, QemuProcess};
use super::qmp::{self, CapabilityState, MigrationStatus, QmpError, RunState};
use super::relay::{RelayError, SourceRelay};
use super::vms::{VmError, VmManager};

/// QEMU's `max-bandwidth` for `Auto`: effectively unlimited (QEMU's default
/// of 128 MiB/s would otherwise silently cap the migration). 64 GiB/s.
pub const AUTO_MAX_BANDWIDTH: u64 = 64 << 30;

/// How a migration's bandwidth is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bandwidth {
    /// As fast as the path allows (QEMU's cap lifted, no relay limit).
    Auto,
    /// QEMU's own default cap (128 MiB/s), no relay limit.
    HypervisorDefault,
    /// This many bytes per second, in QEMU and in the relay.
    Limit(u64),
}

impl Bandwidth {
    /// The relay's limit for this setting.
    pub fn relay_limit(self) -> Option<u64> {
        match self {
            Bandwidth::Limit(b) => Some(b),
            Bandwidth::Auto | Bandwidth::HypervisorDefault => None,
        }
    }
    fn qemu_max_bandwidth(self) -> Option<u64> {
        match self {
            Bandwidth::Auto => Some(AUTO_MAX_BANDWIDTH),
            Bandwidth::HypervisorDefault => None,
            Bandwidth::Limit(b) => Some(b),
        }
    }
}

/// Auto-converge throttle settings (percent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// First throttle step.
    pub initial: u8,
    /// Increment per step.
    pub increment: u8,
}

/// The resolved migration settings the executor applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    /// QEMU's downtime limit at switchover.
    pub downtime_limit: Duration,
    /// Bandwidth limit.
    pub bandwidth: Bandwidth,
    /// Parallel multifd channels (`None`: one stream).
    pub multifd_channels: Option<u8>,
    /// Enable `postcopy-ram` (both sides) so that the policy can switch.
    pub postcopy: bool,
    /// Enable auto-converge throttling with these settings.
    pub auto_converge: Option<Throttle>,
    /// Cancel when neither QEMU's nor the relay's byte count moves this long.
    pub stall_timeout: Duration,
    /// How often to sample `query-migrate`.
    pub sample_interval: Duration,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            downtime_limit: Duration::from_millis(300),
            bandwidth: Bandwidth::Auto,
            multifd_channels: None,
            postcopy: false,
            auto_converge: None,
            stall_timeout: Duration::from_secs(15),
            sample_interval: Duration::from_secs(1),
        }
    }
}

impl MigrationConfig {
    /// Capabilities set identically on both sides.
    fn capabilities(&self) -> Vec<CapabilityState> {
        let cap = |name: &str, state: bool| CapabilityState {
            capability: name.into(),
            state,
        };
        vec![
            cap("events", true),
            cap("multifd", self.multifd_channels.is_some()),
            cap("postcopy-ram", self.postcopy),
            cap("auto-converge", self.auto_converge.is_some()),
        ]
    }
}

/// One `query-migrate` sample.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressSample {
    /// Time since `migrate` was issued.
    pub elapsed: Duration,
    /// QEMU's migration status.
    pub status: MigrationStatus,
    /// Pre-copy iteration (QEMU's dirty-sync-count).
    pub iteration: u64,
    /// Guest RAM size.
    pub total_bytes: u64,
    /// Bytes transferred so far.
    pub transferred_bytes: u64,
    /// Bytes left in this iteration.
    pub remaining_bytes: u64,
    /// Dirtying rate, bytes per second.
    pub dirty_rate: u64,
    /// Throughput, bytes per second.
    pub throughput: u64,
    /// QEMU's expected downtime.
    pub expected_downtime: Option<Duration>,
    /// Current auto-converge throttle, percent.
    pub cpu_throttle_percent: u64,
    /// Bytes the relay has carried towards the target.
    pub relay_forward_bytes: u64,
    /// The downtime limit currently set.
    pub downtime_limit: Duration,
}

/// What the convergence policy wants next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Keep going.
    Continue,
    /// Raise (or lower) the downtime limit.
    SetDowntimeLimit(Duration),
    /// Change the bandwidth limit (QEMU and relay).
    SetBandwidth(Bandwidth),
    /// Change the auto-converge throttle (needs `auto_converge` enabled).
    SetThrottle(Throttle),
    /// Switch to post-copy (needs `postcopy` enabled).
    StartPostcopy,
    /// Pause the guest so the migration finishes (the pause is downtime).
    PauseGuest,
    /// Give up; the source keeps running.
    Abort(String),
}

/// The convergence decision, taken as an input (the pure decision lives in
/// `core`). Implemented for closures.
pub trait ConvergencePolicy: Send {
    /// The next action, given every sample so far.
    fn next_action(&mut self, samples: &[ProgressSample]) -> Action;
}

impl<F: FnMut(&[ProgressSample]) -> Action + Send> ConvergencePolicy for F {
    fn next_action(&mut self, samples: &[ProgressSample]) -> Action {
        self(samples)
    }
}

/// Failure of a migration half.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Starting or stopping a QEMU failed.
    #[error("managing the {side} QEMU")]
    Vm {
        /// `source` or `target`.
        side: &'static str,
        /// Cause.
        source: VmError,
    },
    /// A QMP step failed.
    #[error("{step}")]
    Qmp {
        /// What was being done.
        step: &'static str,
        /// Cause.
        source: QmpError,
    },
    /// QEMU reported the migration failed.
    #[error("QEMU reports the migration failed: {desc}")]
    Failed {
        /// QEMU's error description.
        desc: String,
    },
    /// The relay failed (refused, unreachable, broken), so QEMU failed.
    #[error("the migration stream failed")]
    Relay(#[source] Arc<RelayError>),
    /// No progress for the stall timeout; cancelled.
    #[error("no progress for {stalled_for:?} (transferred {transferred} bytes); {action}")]
    Stalled {
        /// How long nothing moved.
        stalled_for: Duration,
        /// Bytes transferred before the stall.
        transferred: u64,
        /// What was done about it.
        action: &'static str,
    },
    /// Cancelled on request.
    #[error("cancelled")]
    Cancelled,
    /// The policy aborted.
    #[error("aborted by the convergence policy: {0}")]
    Aborted(String),
    /// The policy asked for something the configuration did not enable.
    #[error("the policy asked for {0}, which this migration was not configured for")]
    Unsupported(&'static str),
    /// The target QEMU exited.
    #[error("the target QEMU exited ({0})")]
    TargetExited(String),
    /// Waited too long.
    #[error("{0} timed out")]
    Timeout(&'static str),
}

impl MigrationError {
    /// A stable reason string for conditions and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            MigrationError::Vm { .. } => "VmError",
            MigrationError::Qmp { .. } => "QmpError",
            MigrationError::Failed { .. } => "QemuMigrationFailed",
            MigrationError::Relay(e) => e.reason(),
            MigrationError::Stalled { .. } => "Stalled",
            MigrationError::Cancelled => "Cancelled",
            MigrationError::Aborted(_) => "AbortedByPolicy",
            MigrationError::Unsupported(_) => "UnsupportedAction",
            MigrationError::TargetExited(_) => "TargetExited",
            MigrationError::Timeout(_) => "Timeout",
        }
    }
}

fn qmp_err(step: &'static str) -> impl FnOnce(QmpError) -> MigrationError {
    move |source| MigrationError::Qmp { step, source }
}

/// A prepared migration target: QEMU waiting on its incoming socket.
#[derive(Debug)]
pub struct TargetHandle {
    vm: Arc<QemuProcess>,
}

/// Starts the target QEMU with `-incoming defer`, sets the same
/// capabilities as the source and listens on the VM's incoming socket.
/// On failure the QEMU is stopped again.
pub async fn prepare_target(
    vms: &VmManager,
    spec: &MachineSpec,
    config: &MigrationConfig,
) -> Result<TargetHandle, MigrationError> {
    let vm = vms
        .start(spec, true)
        .await
        .map_err(|source| MigrationError::Vm {
            side: "target",
            source,
        })?;
    let setup = async {
        let q = vm.qmp();
        q.execute(&qmp::MigrateSetCapabilities {
            capabilities: config.capabilities(),
        })
        .await
        .map_err(qmp_err("setting the target's migration capabilities"))?;
        if let Some(n) = config.multifd_channels {
            q.execute(&qmp::MigrateSetParameters {
                multifd_channels: Some(n),
                ..Default::default()
            })
            .await
            .map_err(qmp_err("setting the target's multifd channels"))?;
        }
        let uri = format!("unix:{}", vm.dir().incoming_socket().display());
        q.execute(&qmp::MigrateIncoming { uri })
            .await
            .map_err(qmp_err("starting migrate-incoming"))?;
        Ok(())
    };
    match setup.await {
        Ok(()) => Ok(TargetHandle { vm }),
        Err(e) => {
            let _ = vms.stop(&spec.name, Duration::from_secs(5)).await;
            Err(e)
        }
    }
}

impl TargetHandle {
    /// The socket the target relay delivers to.
    pub fn incoming_socket(&self) -> std::path::PathBuf {
        self.vm.dir().incoming_socket()
    }

    /// The target QEMU.
    pub fn vm(&self) -> &Arc<QemuProcess> {
        &self.vm
    }

    /// Waits until the migrated guest runs on the target. If the source was
    /// paused to finish, the guest arrives paused and is resumed here.
    pub async fn wait_running(&self, timeout: Duration) -> Result<(), MigrationError> {
        let deadline = Instant::now() + timeout;
        let q = self.vm.qmp();
        loop {
            if !self.vm.is_alive() {
                let status = self
                    .vm
                    .exit_status()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "gone".into());
                return Err(MigrationError::TargetExited(status));
            }
            match q.execute(&qmp::QueryStatus {}).await {
                Ok(s) if s.running => return Ok(()),
                Ok(s) if s.status == RunState::Paused => {
                    let m = q
                        .execute(&qmp::QueryMigrate {})
                        .await
                        .map_err(qmp_err("querying the target's migration"))?;
                    if m.status == Some(MigrationStatus::Completed) {
                        q.execute(&qmp::Cont {})
                            .await
                            .map_err(qmp_err("resuming the target"))?;
                    }
                }
                Ok(_) => {}
                // QEMU exiting closes QMP; the liveness check above reports it.
                Err(QmpError::Disconnected { .. }) => {}
                Err(e) => return Err(qmp_err("querying the target's status")(e)),
            }
            if Instant::now() >= deadline {
                return Err(MigrationError::Timeout("waiting for the target to run"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Tears the target down (the migration failed or was cancelled; QEMU
    /// usually exits by itself then).
    pub async fn abort(self, vms: &VmManager) -> Result<(), MigrationError> {
        let name = self.vm.spec().name.clone();
        match vms.stop(&name, Duration::from_secs(5)).await {
            Ok(()) | Err(VmError::NotFound(_)) => Ok(()),
            Err(source) => Err(MigrationError::Vm {
                side: "target",
                source,
            }),
        }
    }
}

/// A completed outgoing migration. The source QEMU is paused
/// (`postmigrate`) until [`finish_source`] quits it.
#[derive(Debug, Clone)]
pub struct SourceCompleted {
    /// Downtime QEMU measured at switchover.
    pub downtime: Duration,
    /// Total migration time QEMU measured.
    pub total_time: Duration,
    /// Every sample taken.
    pub samples: Vec<ProgressSample>,
    /// Bytes the relay carried towards the target.
    pub relay_forward_bytes: u64,
    /// Whether the policy paused the guest to finish.
    pub paused_guest: bool,
    /// Whether the guest switched to post-copy.
    pub postcopy: bool,
}

/// Runs the source half until completion, failure, stall or cancel.
/// Every error leaves the source VM running (unless the guest already
/// switched to post-copy, which the error's status then says).
pub async fn run_source(
    vm: &QemuProcess,
    relay: &SourceRelay,
    config: &MigrationConfig,
    policy: &mut dyn ConvergencePolicy,
    observer: &mut (dyn FnMut(&ProgressSample) + Send),
    cancel: &CancellationToken,
) -> Result<SourceCompleted, MigrationError> {
    let q = vm.qmp();
    q.execute(&qmp::MigrateSetCapabilities {
        capabilities: config.capabilities(),
    })
    .await
    .map_err(qmp_err("setting the source's migration capabilities"))?;
    let mut downtime_limit = config.downtime_limit;
    q.execute(&qmp::MigrateSetParameters {
        downtime_limit: Some(downtime_limit.as_millis() as u64),
        max_bandwidth: config.bandwidth.qemu_max_bandwidth(),
        multifd_channels: config.multifd_channels,
        cpu_throttle_initial: config.auto_converge.map(|t| t.initial),
        cpu_throttle_increment: config.auto_converge.map(|t| t.increment),
        ..Default::default()
    })
    .await
    .map_err(qmp_err("setting the source's migration parameters"))?;
    let started = Instant::now();
    let uri = format!("unix:{}", relay.socket_path().display());
    q.execute(&qmp::Migrate { uri, resume: None })
        .await
        .map_err(qmp_err("starting the migration"))?;

    let mut samples: Vec<ProgressSample> = Vec::new();
    let (mut last_ram, mut last_relay, mut last_move) = (0u64, 0u64, Instant::now());
    let (mut paused_guest, mut postcopy) = (false, false);
    let mut tick = tokio::time::interval(config.sample_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => {
                if postcopy {
                    tracing::warn!("cancel requested during post-copy; the guest already runs on the target");
                } else {
                    cancel_and_wait(vm, relay).await;
                    return Err(MigrationError::Cancelled);
                }
            }
        }
        let info = q
            .execute(&qmp::QueryMigrate {})
            .await
            .map_err(qmp_err("querying the migration"))?;
        let status = info.status.clone().unwrap_or(MigrationStatus::None);
        let ram = info.ram.unwrap_or_default();
        let sample = ProgressSample {
            elapsed: started.elapsed(),
            status: status.clone(),
            iteration: ram.dirty_sync_count,
            total_bytes: ram.total,
            transferred_bytes: ram.transferred,
            remaining_bytes: ram.remaining,
            dirty_rate: ram.dirty_pages_rate * ram.page_size.max(1),
            throughput: (ram.mbps * 1_000_000.0 / 8.0) as u64,
            expected_downtime: info.expected_downtime.map(Duration::from_millis),
            cpu_throttle_percent: info.cpu_throttle_percentage.unwrap_or(0),
            relay_forward_bytes: relay.counters().snapshot().forward_bytes,
            downtime_limit,
        };
        observer(&sample);
        samples.push(sample);
        match status {
            MigrationStatus::Completed => {
                return Ok(SourceCompleted {
                    downtime: Duration::from_millis(info.downtime.unwrap_or(0)),
                    total_time: Duration::from_millis(info.total_time.unwrap_or(0)),
                    relay_forward_bytes: relay.counters().snapshot().forward_bytes,
                    samples,
                    paused_guest,
                    postcopy,
                });
            }
            MigrationStatus::Failed => {
                relay.cancel();
                if paused_guest {
                    // We paused it; a failed migration must leave it running.
                    let _ = q.execute(&qmp::Cont {}).await;
                }
                if let Some(e) = relay.first_failure().and_then(|r| r.error) {
                    return Err(MigrationError::Relay(e));
                }
                return Err(MigrationError::Failed {
                    desc: info.error_desc.unwrap_or_else(|| "no reason given".into()),
                });
            }
            MigrationStatus::Cancelled => {
                relay.cancel();
                return Err(MigrationError::Cancelled);
            }
            s if s.is_postcopy() => postcopy = true,
            _ => {}
        }
        // Stall watchdog: QEMU never notices a stream that stopped moving.
        let relay_total = relay.counters().total();
        if ram.transferred != last_ram || relay_total != last_relay {
            (last_ram, last_relay, last_move) = (ram.transferred, relay_total, Instant::now());
        } else if last_move.elapsed() >= config.stall_timeout {
            let stalled_for = last_move.elapsed();
            let action = if postcopy {
                // Keep the guest recoverable on the target.
                let _ = q.execute(&qmp::MigratePause {}).await;
                "post-copy paused for recovery"
            } else {
                cancel_and_wait(vm, relay).await;
                "cancelled; the VM keeps running on the source"
            };
            return Err(MigrationError::Stalled {
                stalled_for,
                transferred: ram.transferred,
                action,
            });
        }
        match policy.next_action(&samples) {
            Action::Continue => {}
            Action::SetDowntimeLimit(d) => {
                q.execute(&qmp::MigrateSetParameters {
                    downtime_limit: Some(d.as_millis() as u64),
                    ..Default::default()
                })
                .await
                .map_err(qmp_err("changing the downtime limit"))?;
                downtime_limit = d;
            }
            Action::SetBandwidth(b) => {
                q.execute(&qmp::MigrateSetParameters {
                    max_bandwidth: Some(b.qemu_max_bandwidth().unwrap_or(128 << 20)),
                    ..Default::default()
                })
                .await
                .map_err(qmp_err("changing the bandwidth limit"))?;
                relay.limiter().set_rate(b.relay_limit());
            }
            Action::SetThrottle(t) => {
                if config.auto_converge.is_none() {
                    return abort_unsupported(vm, relay, "throttling").await;
                }
                q.execute(&qmp::MigrateSetParameters {
                    cpu_throttle_initial: Some(t.initial),
                    cpu_throttle_increment: Some(t.increment),
                    ..Default::default()
                })
                .await
                .map_err(qmp_err("changing the throttle"))?;
            }
            Action::StartPostcopy if !postcopy => {
                if !config.postcopy {
                    return abort_unsupported(vm, relay, "post-copy").await;
                }
                q.execute(&qmp::MigrateStartPostcopy {})
                    .await
                    .map_err(qmp_err("switching to post-copy"))?;
                postcopy = true;
            }
            Action::StartPostcopy => {}
            Action::PauseGuest if !paused_guest => {
                q.execute(&qmp::Stop {})
                    .await
                    .map_err(qmp_err("pausing the guest"))?;
                paused_guest = true;
            }
            Action::PauseGuest => {}
            Action::Abort(reason) => {
                if !postcopy {
                    cancel_and_wait(vm, relay).await;
                    if paused_guest {
                        let _ = q.execute(&qmp::Cont {}).await;
                    }
                    return Err(MigrationError::Aborted(reason));
                }
            }
        }
    }
}

async fn abort_unsupported(
    vm: &QemuProcess,
    relay: &SourceRelay,
    what: &'static str,
) -> Result<SourceCompleted, MigrationError> {
    cancel_and_wait(vm, relay).await;
    Err(MigrationError::Unsupported(what))
}

/// `migrate_cancel`, close the relay, and wait (bounded) until QEMU has
/// left the active states so that the source is known to run on.
async fn cancel_and_wait(vm: &QemuProcess, relay: &SourceRelay) {
    let q = vm.qmp();
    if let Err(e) = q.execute(&qmp::MigrateCancel {}).await {
        tracing::warn!(error = %e, "migrate_cancel failed");
    }
    relay.cancel();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match q.execute(&qmp::QueryMigrate {}).await {
            Ok(m) if m.status.as_ref().is_none_or(MigrationStatus::is_finished) => break,
            Ok(_) => {}
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Quits the source QEMU after the target runs the guest.
pub async fn finish_source(vms: &VmManager, vm: &QemuProcess) -> Result<(), MigrationError> {
    match vms.stop(&vm.spec().name, Duration::from_secs(10)).await {
        Ok(()) => Ok(()),
        Err(VmError::NotFound(_)) => {
            vm.stop(Duration::from_secs(10))
                .await
                .map_err(|e| MigrationError::Vm {
                    side: "source",
                    source: e.into(),
                })
        }
        Err(source) => Err(MigrationError::Vm {
            side: "source",
            source,
        }),
    }
}

/// The unix socket path of the source relay for a VM's migration.
pub fn source_socket(vm: &QemuProcess) -> std::path::PathBuf {
    vm.dir().path().join("outgoing.sock")
}
