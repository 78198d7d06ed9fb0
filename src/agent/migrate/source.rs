//! The source half: migrate into the relay, sample, watch, decide.
//!
//! ```text
//!  run_source: caps, params, migrate ─┐        resume_source: migrate resume=true ─┐
//!                                     ▼                                            ▼
//!                  monitor: every sample_interval query-migrate → sample → observer
//!                   completed ──────────────► Ok(SourceCompleted)   (source paused)
//!                   failed / cancelled ─────► Err, source running (relay report if any)
//!                   postcopy-paused ────────► Err(PostcopyPaused)   (recoverable)
//!                   no bytes move ≥ stall ──► pre-copy: cancel → Err(Stalled)
//!                                             post-copy: migrate-pause → Err(PostcopyPaused)
//!                   policy.next_action ─────► apply (downtime, bandwidth, throttle,
//!                                             post-copy, pause guest, abort)
//! ```

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Action, ConvergencePolicy, MigrationConfig, MigrationError, ProgressSample, qmp_err};
use crate::agent::net;
use crate::agent::qemu::QemuProcess;
use crate::agent::qmp::{self, MigrationStatus};
use crate::agent::relay::SourceRelay;
use crate::agent::vms::{VmError, VmManager};

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
/// Every error before post-copy leaves the source VM running.
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
    q.execute(&qmp::MigrateSetParameters {
        downtime_limit: Some(config.downtime_limit.as_millis() as u64),
        max_bandwidth: config.bandwidth.qemu_max_bandwidth(),
        multifd_channels: config.multifd_channels,
        cpu_throttle_initial: config.auto_converge.map(|t| t.initial),
        cpu_throttle_increment: config.auto_converge.map(|t| t.increment),
        ..Default::default()
    })
    .await
    .map_err(qmp_err("setting the source's migration parameters"))?;
    let uri = format!("unix:{}", relay.socket_path().display());
    // Watch for the guest's stop from before the migration starts.
    let events = q.events();
    q.execute(&qmp::Migrate { uri, resume: None })
        .await
        .map_err(qmp_err("starting the migration"))?;
    Monitor::new(vm, relay, config, false, Some(events))
        .run(policy, observer, cancel)
        .await
}

/// Resumes a post-copy migration paused by a broken stream, through
/// `relay` (whose target side must deliver to the socket that
/// [`TargetHandle::recover`](super::TargetHandle::recover) returned).
pub async fn resume_source(
    vm: &QemuProcess,
    relay: &SourceRelay,
    config: &MigrationConfig,
    policy: &mut dyn ConvergencePolicy,
    observer: &mut (dyn FnMut(&ProgressSample) + Send),
    cancel: &CancellationToken,
) -> Result<SourceCompleted, MigrationError> {
    let uri = format!("unix:{}", relay.socket_path().display());
    vm.qmp()
        .execute(&qmp::Migrate {
            uri,
            resume: Some(true),
        })
        .await
        .map_err(qmp_err("resuming the post-copy migration"))?;
    Monitor::new(vm, relay, config, true, None)
        .run(policy, observer, cancel)
        .await
}

struct Monitor<'a> {
    vm: &'a QemuProcess,
    relay: &'a SourceRelay,
    config: &'a MigrationConfig,
    started: Instant,
    samples: Vec<ProgressSample>,
    downtime_limit: Duration,
    paused_guest: bool,
    postcopy: bool,
    /// The source QEMU's events, watched for the guest's stop (none when
    /// resuming post-copy: the guest stopped here long ago).
    events: Option<tokio::sync::broadcast::Receiver<qmp::Event>>,
    /// The target was told the guest stopped (and announced it there).
    told_target: bool,
}

impl<'a> Monitor<'a> {
    fn new(
        vm: &'a QemuProcess,
        relay: &'a SourceRelay,
        config: &'a MigrationConfig,
        postcopy: bool,
        events: Option<tokio::sync::broadcast::Receiver<qmp::Event>>,
    ) -> Self {
        Monitor {
            vm,
            relay,
            config,
            started: Instant::now(),
            samples: Vec::new(),
            downtime_limit: config.downtime_limit,
            paused_guest: false,
            postcopy,
            events,
            told_target: false,
        }
    }

    async fn run(
        mut self,
        policy: &mut dyn ConvergencePolicy,
        observer: &mut (dyn FnMut(&ProgressSample) + Send),
        cancel: &CancellationToken,
    ) -> Result<SourceCompleted, MigrationError> {
        let r = self.monitor(policy, observer, cancel).await;
        if r.is_err() && self.told_target {
            self.announce_again().await;
        }
        r
    }

    async fn monitor(
        &mut self,
        policy: &mut dyn ConvergencePolicy,
        observer: &mut (dyn FnMut(&ProgressSample) + Send),
        cancel: &CancellationToken,
    ) -> Result<SourceCompleted, MigrationError> {
        let q = self.vm.qmp().clone();
        let (mut last_ram, mut last_relay, mut last_move) = (0u64, 0u64, Instant::now());
        let mut tick = tokio::time::interval(self.config.sample_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events = self.events.take();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // Once in post-copy the guest runs on the target: a cancel
                // can no longer return it to the source, so it is ignored.
                _ = cancel.cancelled(), if !self.postcopy => {
                    self.cancel_and_wait().await;
                    return Err(MigrationError::Cancelled);
                }
                stop = next_stop(&mut events), if events.is_some() => {
                    if let Some(at) = stop {
                        // Once is enough: the guest stays stopped from here
                        // unless the migration fails.
                        events = None;
                        self.tell_target(at).await;
                    }
                    continue;
                }
            }
            let info = q
                .execute(&qmp::QueryMigrate {})
                .await
                .map_err(qmp_err("querying the migration"))?;
            let status = info.status.clone().unwrap_or(MigrationStatus::None);
            let ram = info.ram.unwrap_or_default();
            let relay_forward = self.relay.counters().snapshot().forward_bytes;
            let sample = ProgressSample {
                elapsed: self.started.elapsed(),
                status: status.clone(),
                iteration: ram.dirty_sync_count,
                total_bytes: ram.total,
                transferred_bytes: ram.transferred,
                remaining_bytes: ram.remaining,
                dirty_rate: ram.dirty_pages_rate * ram.page_size.max(1),
                throughput: (ram.mbps * 1_000_000.0 / 8.0) as u64,
                expected_downtime: info.expected_downtime.map(Duration::from_millis),
                cpu_throttle_percent: info.cpu_throttle_percentage.unwrap_or(0),
                relay_forward_bytes: relay_forward,
                downtime_limit: self.downtime_limit,
            };
            observer(&sample);
            self.samples.push(sample);
            match status {
                MigrationStatus::Completed => {
                    return Ok(SourceCompleted {
                        downtime: Duration::from_millis(info.downtime.unwrap_or(0)),
                        total_time: Duration::from_millis(info.total_time.unwrap_or(0)),
                        relay_forward_bytes: relay_forward,
                        samples: std::mem::take(&mut self.samples),
                        paused_guest: self.paused_guest,
                        postcopy: self.postcopy,
                    });
                }
                MigrationStatus::Failed => return Err(self.failed(info.error_desc).await),
                MigrationStatus::Cancelled => {
                    self.relay.cancel();
                    return Err(MigrationError::Cancelled);
                }
                MigrationStatus::PostcopyPaused => {
                    let why = self
                        .relay
                        .first_failure()
                        .and_then(|r| r.error)
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "the stream broke".into());
                    return Err(MigrationError::PostcopyPaused { why });
                }
                ref s if s.is_postcopy() => self.postcopy = true,
                _ => {}
            }
            // Stall watchdog: QEMU never notices a stream that stopped moving.
            let relay_total = self.relay.counters().total();
            if ram.transferred != last_ram || relay_total != last_relay {
                (last_ram, last_relay, last_move) = (ram.transferred, relay_total, Instant::now());
            } else if last_move.elapsed() >= self.config.stall_timeout {
                return Err(self.stalled(last_move.elapsed(), ram.transferred).await);
            }
            let action = policy.next_action(&self.samples);
            if let Some(err) = self.apply(action).await? {
                return Err(err);
            }
        }
    }

    /// Applies the policy's action; `Some(error)` ends the migration.
    async fn apply(&mut self, action: Action) -> Result<Option<MigrationError>, MigrationError> {
        let q = self.vm.qmp();
        match action {
            Action::Continue => {}
            // Already done: the policy may keep asking.
            Action::StartPostcopy if self.postcopy => {}
            Action::PauseGuest if self.paused_guest => {}
            Action::SetDowntimeLimit(d) => {
                q.execute(&qmp::MigrateSetParameters {
                    downtime_limit: Some(d.as_millis() as u64),
                    ..Default::default()
                })
                .await
                .map_err(qmp_err("changing the downtime limit"))?;
                self.downtime_limit = d;
            }
            Action::SetBandwidth(b) => {
                q.execute(&qmp::MigrateSetParameters {
                    max_bandwidth: Some(b.qemu_max_bandwidth().unwrap_or(QEMU_DEFAULT_BANDWIDTH)),
                    ..Default::default()
                })
                .await
                .map_err(qmp_err("changing the bandwidth limit"))?;
                self.relay.limiter().set_rate(b.relay_limit());
            }
            Action::SetThrottle(t) => {
                if self.config.auto_converge.is_none() {
                    return Ok(Some(self.unsupported("throttling").await));
                }
                q.execute(&qmp::MigrateSetParameters {
                    cpu_throttle_initial: Some(t.initial),
                    cpu_throttle_increment: Some(t.increment),
                    ..Default::default()
                })
                .await
                .map_err(qmp_err("changing the throttle"))?;
            }
            Action::StartPostcopy => {
                if !self.config.postcopy {
                    return Ok(Some(self.unsupported("post-copy").await));
                }
                q.execute(&qmp::MigrateStartPostcopy {})
                    .await
                    .map_err(qmp_err("switching to post-copy"))?;
                self.postcopy = true;
            }
            Action::PauseGuest => {
                q.execute(&qmp::Stop {})
                    .await
                    .map_err(qmp_err("pausing the guest"))?;
                self.paused_guest = true;
            }
            Action::Abort(reason) => {
                if self.postcopy {
                    tracing::warn!(%reason, "abort requested during post-copy; ignored");
                } else {
                    self.cancel_and_wait().await;
                    return Ok(Some(MigrationError::Aborted(reason)));
                }
            }
        }
        Ok(None)
    }

    /// The guest stopped for the switchover (QEMU's `STOP`, or the
    /// policy's pause): tell the target at once, so that it announces the
    /// guest on its side while the last state crosses.
    async fn tell_target(&mut self, at: std::time::SystemTime) {
        match self.relay.source_stopped(at).await {
            Ok(true) => self.told_target = true,
            Ok(false) => {
                tracing::debug!("no control channel: the target announces the guest when it runs")
            }
            Err(e) => tracing::warn!(error = %e, "could not tell the target the guest stopped"),
        }
    }

    /// The target announced the guest, but the migration failed and the
    /// guest runs here again: announce it from here, so that the segment
    /// stops sending its frames to the target.
    async fn announce_again(&self) {
        let q = self.vm.qmp();
        if !matches!(q.execute(&qmp::QueryStatus {}).await, Ok(s) if s.running) {
            return;
        }
        net::announce_self(q, "the source after a failed switchover").await;
    }

    async fn failed(&self, desc: Option<String>) -> MigrationError {
        self.relay.cancel();
        self.resume_if_we_paused().await;
        if let Some(e) = self.relay.first_failure().and_then(|r| r.error) {
            return MigrationError::Relay(e);
        }
        MigrationError::Failed {
            desc: desc.unwrap_or_else(|| "no reason given".into()),
        }
    }

    async fn stalled(&self, stalled_for: Duration, transferred: u64) -> MigrationError {
        if self.postcopy {
            // Keep the guest recoverable on the target.
            if let Err(e) = self.vm.qmp().execute(&qmp::MigratePause {}).await {
                tracing::warn!(error = %e, "migrate-pause failed");
            }
            return MigrationError::PostcopyPaused {
                why: format!("no progress for {stalled_for:?}"),
            };
        }
        self.cancel_and_wait().await;
        MigrationError::Stalled {
            stalled_for,
            transferred,
            action: "cancelled; the VM keeps running on the source",
        }
    }

    async fn unsupported(&self, what: &'static str) -> MigrationError {
        self.cancel_and_wait().await;
        MigrationError::Unsupported(what)
    }

    async fn resume_if_we_paused(&self) {
        if self.paused_guest
            && let Err(e) = self.vm.qmp().execute(&qmp::Cont {}).await
        {
            tracing::warn!(error = %e, "could not resume the source guest we paused");
        }
    }

    /// `migrate_cancel`, close the relay, and wait (bounded) until QEMU has
    /// left the active states so that the source is known to run on.
    async fn cancel_and_wait(&self) {
        let q = self.vm.qmp();
        if let Err(e) = q.execute(&qmp::MigrateCancel {}).await {
            tracing::warn!(error = %e, "migrate_cancel failed");
        }
        self.relay.cancel();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match q.execute(&qmp::QueryMigrate {}).await {
                Ok(m) if m.status.as_ref().is_none_or(MigrationStatus::is_finished) => break,
                Ok(_) => {}
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.resume_if_we_paused().await;
    }
}

/// Waits for the next `STOP` among QEMU's events: its time, or `None`
/// when the events end (then `events` is emptied, so nothing waits on it).
async fn next_stop(
    events: &mut Option<tokio::sync::broadcast::Receiver<qmp::Event>>,
) -> Option<std::time::SystemTime> {
    use tokio::sync::broadcast::error::RecvError;
    let rx = events.as_mut()?;
    loop {
        match rx.recv().await {
            Ok(e) if e.name == "STOP" => return Some(e.time()),
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => {
                *events = None;
                return None;
            }
        }
    }
}

/// QEMU's own default `max-bandwidth` (128 MiB/s), restored for
/// `HypervisorDefault` when the policy changes the limit mid-flight.
const QEMU_DEFAULT_BANDWIDTH: u64 = 128 << 20;

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

/// The unix socket of the source relay for a VM's migration (in the VM's
/// state directory).
pub fn source_socket(vm: &QemuProcess) -> std::path::PathBuf {
    vm.dir().path().join("outgoing.sock")
}
