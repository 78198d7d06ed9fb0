//! The target half: a QEMU waiting for its state on a unix socket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{GuestClock, MigrationConfig, MigrationError, qmp_err};
use crate::agent::net;
use crate::agent::qemu::{MachineSpec, QemuProcess};
use crate::agent::qmp::{self, MigrationStatus, QmpError, RunState};
use crate::agent::relay::SourceStoppedHook;
use crate::agent::vms::{VmError, VmManager};

/// A prepared migration target: QEMU waiting on its incoming socket.
#[derive(Debug)]
pub struct TargetHandle {
    vm: Arc<QemuProcess>,
    /// The target QEMU's STOP/RESUME events since it started.
    clock: GuestClock,
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
        let caps = q
            .execute(&qmp::MigrateSetCapabilities {
                capabilities: config.capabilities(),
            })
            .await;
        if let Err(e) = caps {
            // Post-copy needs userfaultfd on the target host; tell that
            // apart from other refusals by trying again without it.
            let without = MigrationConfig {
                postcopy: false,
                ..config.clone()
            };
            if config.postcopy
                && q.execute(&qmp::MigrateSetCapabilities {
                    capabilities: without.capabilities(),
                })
                .await
                .is_ok()
            {
                return Err(MigrationError::PostcopyUnsupported(e.to_string()));
            }
            return Err(qmp_err("setting the target's migration capabilities")(e));
        }
        if let Some(n) = config.multifd_channels {
            q.execute(&qmp::MigrateSetParameters {
                multifd_channels: Some(n),
                ..Default::default()
            })
            .await
            .map_err(qmp_err("setting the target's multifd channels"))?;
        }
        // QEMU reads the announce parameters on the incoming side (net).
        q.execute(&net::SetAnnounceParameters::from(net::Announce::default()))
            .await
            .map_err(qmp_err("setting the target's announce parameters"))?;
        let uri = format!("unix:{}", vm.dir().incoming_socket().display());
        q.execute(&qmp::MigrateIncoming { uri })
            .await
            .map_err(qmp_err("starting migrate-incoming"))?;
        Ok(())
    };
    match setup.await {
        Ok(()) => Ok(TargetHandle {
            clock: GuestClock::watch(vm.qmp()),
            vm,
        }),
        Err(e) => {
            let _ = vms.stop(&spec.name, Duration::from_secs(5)).await;
            Err(e)
        }
    }
}

impl TargetHandle {
    /// The handle of a target QEMU adopted after an agent restart (its
    /// incoming migration already under way, e.g. in post-copy).
    pub fn adopt(vm: Arc<QemuProcess>) -> TargetHandle {
        TargetHandle {
            clock: GuestClock::watch(vm.qmp()),
            vm,
        }
    }

    /// The target guest's run-state events (its `RESUME` is when it runs
    /// here, for the real pause).
    pub fn clock(&self) -> &GuestClock {
        &self.clock
    }

    /// What the target does when the source says its guest stopped for the
    /// switchover: until the guest runs here, its QEMU cannot speak for it,
    /// so the agent drops what queued on the VM's taps before the stop and
    /// announces the VM's MACs from them (`net::TapHandle`). The segment
    /// then delivers frames for the VM here, where they wait in the taps'
    /// queues for the guest instead of being lost on the stopped source.
    /// `None` when the agent holds no tap of this VM (no mapped network,
    /// or an adopted QEMU): the target then advertises no control channel.
    pub fn switchover_hook(&self) -> Option<SourceStoppedHook> {
        if self.vm.taps().is_empty() {
            return None;
        }
        let vm = self.vm.clone();
        let events = self.clock.watcher();
        Some(SourceStoppedHook::new(move |stopped| {
            if events.borrow().resumed_at.is_some() {
                // The guest already runs here and announces itself.
                return;
            }
            let lag = std::time::SystemTime::now()
                .duration_since(stopped)
                .unwrap_or_default();
            for tap in vm.taps().iter() {
                let dropped = tap.discard_queued();
                match (dropped, tap.announce()) {
                    (Ok(dropped), Ok(())) => tracing::info!(
                        vm = %vm.spec().name, tap = tap.name(), dropped, ?lag,
                        "announced the VM on the target at the source's stop"
                    ),
                    (dropped, announced) => tracing::warn!(
                        vm = %vm.spec().name, tap = tap.name(), ?dropped, ?announced,
                        "could not announce the VM on the target at the source's stop"
                    ),
                }
            }
        }))
    }

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
                Ok(s) if s.running => {
                    // Announce again once running (net): best effort, the
                    // migration's own announce already ran.
                    net::announce_self(q, "the target").await;
                    return Ok(());
                }
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

    /// Whether the guest's whole memory is here: the incoming migration
    /// completed (false while post-copy still pulls pages from the source).
    pub async fn memory_complete(&self) -> Result<bool, MigrationError> {
        let m = self
            .vm
            .qmp()
            .execute(&qmp::QueryMigrate {})
            .await
            .map_err(qmp_err("querying the target's migration"))?;
        Ok(m.status == Some(MigrationStatus::Completed))
    }

    /// Prepares post-copy recovery after the stream broke: waits until the
    /// target QEMU has noticed (`postcopy-paused`), then listens for the
    /// resumed stream on a fresh socket, which it returns (deliver the
    /// source's new relay channel there).
    pub async fn recover(&self, timeout: Duration) -> Result<std::path::PathBuf, MigrationError> {
        let q = self.vm.qmp();
        let deadline = Instant::now() + timeout;
        loop {
            let m = q
                .execute(&qmp::QueryMigrate {})
                .await
                .map_err(qmp_err("querying the target's migration"))?;
            if m.status == Some(MigrationStatus::PostcopyPaused) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(MigrationError::Timeout(
                    "waiting for the target to pause post-copy",
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let socket = self.vm.dir().path().join("recover.sock");
        // A socket from an earlier recovery would make QEMU's bind fail.
        let _ = std::fs::remove_file(&socket);
        q.execute(&qmp::MigrateRecover {
            uri: format!("unix:{}", socket.display()),
        })
        .await
        .map_err(qmp_err("starting post-copy recovery on the target"))?;
        Ok(socket)
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
