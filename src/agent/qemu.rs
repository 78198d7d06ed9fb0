//! QEMU processes: a machine definition, its command line, its state
//! directory, and a process that outlives the agent.
//!
//! ```text
//!  MachineSpec ──argv()──► qemu-system-x86_64 … (new session, stderr → qemu.log)
//!                                │ writes
//!  <state>/vms/<name>/  spec.json qemu.pid qmp.sock serial.sock qemu.log
//!                                ▲ reads after an agent restart
//!  QemuProcess::adopt(dir) ──────┘ (pid file + /proc check + QMP connect)
//! ```
//!
//! QEMU runs in its own session (`setsid`) so neither a signal to the agent's
//! process group nor the agent's death reaches it; an agent restart re-adopts
//! it from the pid file and the QMP socket. A QEMU we spawned is reaped by a
//! task that records its exit status; an adopted one is watched through
//! `/proc`. QEMU never listens on the network: QMP, serial and the incoming
//! migration are unix sockets in the VM's directory.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use super::net::{NetError, TapHandle};
use super::qmp::{self, Qmp, QmpError};

pub use super::machine::{Boot, CacheMode, DiskSpec, MachineSpec, NicSpec};

/// The QEMU binary used unless told otherwise.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// How long QEMU gets to create its QMP socket after spawning (TCG start-up
/// on a loaded 2-core machine can take a second; give wide headroom).
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Failure to start, adopt or stop a QEMU process.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The machine definition is unusable.
    #[error("invalid machine spec: {0}")]
    InvalidSpec(String),
    /// A file in the VM's state directory could not be read or written.
    #[error("VM state directory {path}")]
    StateDir {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("spawning {binary}")]
    Spawn {
        /// The binary.
        binary: String,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU exited during start-up.
    #[error("QEMU exited during start-up ({status}): {log}")]
    StartupExit {
        /// Exit status.
        status: String,
        /// The tail of its log.
        log: String,
    },
    /// No live QEMU behind the pid file.
    #[error("no running QEMU for {dir} ({why})")]
    NotRunning {
        /// The VM directory.
        dir: PathBuf,
        /// Why adoption failed.
        why: String,
    },
    /// QMP failed.
    #[error("QMP")]
    Qmp(#[from] QmpError),
    /// A NIC's tap could not be opened for QEMU.
    #[error("the VM's network")]
    Net(#[from] NetError),
}

impl QemuError {
    /// A stable reason string for conditions and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            QemuError::InvalidSpec(_) => "InvalidMachineSpec",
            QemuError::StateDir { .. } => "StateDirError",
            QemuError::Spawn { .. } => "QemuSpawnFailed",
            QemuError::StartupExit { .. } => "QemuStartupFailed",
            QemuError::NotRunning { .. } => "QemuNotRunning",
            QemuError::Qmp(e) => e.reason(),
            QemuError::Net(e) => e.reason(),
        }
    }
}

/// A VM's state directory and the well-known files in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir(PathBuf);

impl VmDir {
    /// The directory for VM `name` under the agent's state directory.
    pub fn new(state_dir: &Path, name: &str) -> VmDir {
        VmDir(state_dir.join("vms").join(name))
    }
    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// QEMU's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("qemu.pid")
    }
    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.0.join("qmp.sock")
    }
    /// The serial console socket.
    pub fn serial_socket(&self) -> PathBuf {
        self.0.join("serial.sock")
    }
    /// Where a migration target listens for the incoming stream.
    pub fn incoming_socket(&self) -> PathBuf {
        self.0.join("incoming.sock")
    }
    /// The spec QEMU was started with.
    pub fn spec_file(&self) -> PathBuf {
        self.0.join("spec.json")
    }
    /// QEMU's stdout/stderr.
    pub fn log_file(&self) -> PathBuf {
        self.0.join("qemu.log")
    }

    fn io<T>(&self, path: PathBuf, r: std::io::Result<T>) -> Result<T, QemuError> {
        r.map_err(|source| QemuError::StateDir { path, source })
    }

    fn read_spec(&self) -> Result<MachineSpec, QemuError> {
        let p = self.spec_file();
        let text = self.io(p.clone(), std::fs::read_to_string(&p))?;
        serde_json::from_str(&text).map_err(|e| QemuError::StateDir {
            path: p,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    fn read_pid(&self) -> Result<i32, QemuError> {
        let p = self.pid_file();
        let text = self.io(p.clone(), std::fs::read_to_string(&p))?;
        text.trim().parse().map_err(|_| QemuError::NotRunning {
            dir: self.0.clone(),
            why: format!("pid file holds {:?}", text.trim()),
        })
    }
}

/// The oldest QEMU release the agent runs, the one Ferry is tested with.
/// Under TCG, Debian 12's own QEMU 7.2 failed the guest's memory check
/// after post-copy and pause-to-finish migrations, and failed multifd
/// streams through the relay; 10.0 passes them all.
pub const MIN_VERSION: (u32, u32) = (10, 0);

/// Whether `version` (`10.0.2`) is [`MIN_VERSION`] or newer.
pub fn version_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= MIN_VERSION,
        _ => false,
    }
}

/// The version of a QEMU binary (`qemu-system-x86_64 --version`), e.g.
/// `10.0.2`, for the host's published status.
pub async fn binary_version(binary: &str) -> Result<String, QemuError> {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .map_err(|source| QemuError::Spawn {
            binary: binary.into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .and_then(|l| l.strip_prefix("QEMU emulator version "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .ok_or_else(|| QemuError::StartupExit {
            status: out.status.to_string(),
            log: format!("unrecognised --version output: {}", text.trim()),
        })
}

/// Whether `pid` is a live (not zombie) process.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|s| s != 'Z' && s != 'X'),
        Err(_) => false,
    }
}

fn pid_cmdline(pid: i32) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// A running QEMU, spawned by us or adopted, with its QMP session.
#[derive(Debug)]
pub struct QemuProcess {
    spec: MachineSpec,
    dir: VmDir,
    pid: i32,
    qmp: Arc<Qmp>,
    /// Set once the process has been reaped (only for QEMUs we spawned).
    exit: Option<tokio::sync::watch::Receiver<Option<std::process::ExitStatus>>>,
    /// The agent's copies of the taps QEMU inherited while it runs (only
    /// for QEMUs we spawned; an adopted QEMU's taps are its own).
    taps: Arc<std::sync::Mutex<Vec<TapHandle>>>,
}

impl QemuProcess {
    /// Starts QEMU for `spec` in its directory under `state_dir`, detached
    /// from the agent, and connects QMP. `incoming` starts a migration target.
    pub async fn spawn(
        binary: &str,
        state_dir: &Path,
        spec: &MachineSpec,
        incoming: bool,
    ) -> Result<QemuProcess, QemuError> {
        spec.validate()?;
        let dir = VmDir::new(state_dir, &spec.name);
        dir.io(dir.0.clone(), std::fs::create_dir_all(&dir.0))?;
        for stale in [
            dir.qmp_socket(),
            dir.serial_socket(),
            dir.incoming_socket(),
            dir.pid_file(),
        ] {
            // A previous run's leftovers; absence is fine.
            let _ = std::fs::remove_file(stale);
        }
        let spec_json = serde_json::to_vec_pretty(spec)
            .map_err(|e| QemuError::InvalidSpec(format!("serialising spec: {e}")))?;
        dir.io(dir.spec_file(), std::fs::write(dir.spec_file(), spec_json))?;
        let log = dir.io(dir.log_file(), std::fs::File::create(dir.log_file()))?;
        let log2 = dir.io(dir.log_file(), log.try_clone())?;
        // The agent opens each tap and QEMU inherits it, so that the agent
        // keeps a handle to speak for the VM (net::TapHandle).
        // A tap that is not in this process's network namespace (QEMU run
        // through `ip netns exec` by a test harness) is left to QEMU to open
        // by name, without a handle.
        let mut taps = Vec::new();
        for (i, nic) in spec.nics.iter().enumerate() {
            match &nic.tap {
                Some(tap) if TapHandle::exists_here(tap) => {
                    taps.push((i, TapHandle::open(tap, &nic.mac)?));
                }
                Some(tap) => {
                    tracing::debug!(vm = %spec.name, %tap, "tap not in the agent's network namespace; QEMU opens it by name");
                }
                None => {}
            }
        }
        let fds: Vec<(usize, i32)> = taps.iter().map(|(i, t)| (*i, t.raw_fd())).collect();
        let inherit: Vec<i32> = fds.iter().map(|(_, fd)| *fd).collect();
        let mut cmd = std::process::Command::new(binary);
        cmd.args(spec.argv(&dir, incoming, &fds))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: setsid and fcntl are async-signal-safe; `inherit` was
        // allocated before the fork and is only read.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                for fd in &inherit {
                    TapHandle::inherit_fd(*fd)?;
                }
                Ok(())
            });
        }
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: binary.into(),
                source,
            })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(-1);
        let (exit_tx, exit_rx) = tokio::sync::watch::channel(None);
        // The agent lets go of the taps when QEMU exits, so that a new QEMU
        // of the VM can attach to them.
        let taps = Arc::new(std::sync::Mutex::new(
            taps.into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
        ));
        let held = taps.clone();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                held.lock().unwrap_or_else(|p| p.into_inner()).clear();
                exit_tx.send_replace(Some(status));
            }
        });
        let mut exit = exit_rx.clone();
        let qmp_path = dir.qmp_socket();
        let qmp = tokio::select! {
            r = Qmp::connect_retry(&qmp_path, START_TIMEOUT) => r,
            s = exit.wait_for(|s| s.is_some()) => {
                let status = s.ok().and_then(|s| s.map(|s| s.to_string())).unwrap_or_default();
                return Err(QemuError::StartupExit { status, log: log_tail(&dir.log_file()) });
            }
        };
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                // QEMU may create its socket and then fail on a later
                // argument: prefer its own message when it exits.
                let mut exit = exit_rx.clone();
                let exited =
                    tokio::time::timeout(Duration::from_secs(2), exit.wait_for(|s| s.is_some()))
                        .await;
                if let Ok(Ok(status)) = exited {
                    let status = status.map(|s| s.to_string()).unwrap_or_default();
                    return Err(QemuError::StartupExit {
                        status,
                        log: log_tail(&dir.log_file()),
                    });
                }
                kill(pid);
                return Err(e.into());
            }
        };
        tracing::info!(vm = %spec.name, pid, incoming, "QEMU started");
        Ok(QemuProcess {
            spec: spec.clone(),
            dir,
            pid,
            qmp: Arc::new(qmp),
            exit: Some(exit_rx),
            taps,
        })
    }

    /// Re-adopts a QEMU left running by a previous agent: reads the spec and
    /// pid file, checks the process is alive and is this VM's QEMU, and
    /// connects QMP.
    pub async fn adopt(dir: VmDir) -> Result<QemuProcess, QemuError> {
        let spec = dir.read_spec()?;
        let pid = dir.read_pid()?;
        let not_running = |why: String| QemuError::NotRunning {
            dir: dir.0.clone(),
            why,
        };
        if !pid_alive(pid) {
            return Err(not_running(format!("pid {pid} is not alive")));
        }
        // Guard against pid reuse: the process must be QEMU for this UUID.
        let cmdline = pid_cmdline(pid).unwrap_or_default();
        if !cmdline.contains(&spec.uuid.to_string()) {
            return Err(not_running(format!("pid {pid} is not this VM's QEMU")));
        }
        let qmp = Qmp::connect_retry(&dir.qmp_socket(), Duration::from_secs(2)).await?;
        tracing::info!(vm = %spec.name, pid, "QEMU adopted");
        Ok(QemuProcess {
            spec,
            dir,
            pid,
            qmp: Arc::new(qmp),
            exit: None,
            taps: Arc::default(),
        })
    }

    /// The machine definition.
    pub fn spec(&self) -> &MachineSpec {
        &self.spec
    }
    /// The VM's state directory.
    pub fn dir(&self) -> &VmDir {
        &self.dir
    }
    /// QEMU's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }
    /// The QMP session.
    pub fn qmp(&self) -> &Arc<Qmp> {
        &self.qmp
    }

    /// The agent's handles on the VM's taps (empty for an adopted QEMU,
    /// for taps QEMU opened by name, and once QEMU has exited).
    pub fn taps(&self) -> std::sync::MutexGuard<'_, Vec<TapHandle>> {
        self.taps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether QEMU is still running.
    pub fn is_alive(&self) -> bool {
        if let Some(exit) = &self.exit
            && exit.borrow().is_some()
        {
            return false;
        }
        pid_alive(self.pid)
    }

    /// Exit status, if we spawned it and it has exited.
    pub fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.exit.as_ref().and_then(|e| *e.borrow())
    }

    /// Waits until QEMU has exited, at most `timeout`; true if it did.
    pub async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let _ = tokio::time::timeout(timeout, self.qmp.closed()).await;
        while self.is_alive() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops QEMU: `quit`, then SIGKILL if it has not exited within `grace`.
    /// Removes the pid file and sockets. Idempotent.
    pub async fn stop(&self, grace: Duration) -> Result<(), QemuError> {
        if self.is_alive() {
            // The reply may not arrive before QEMU closes the socket.
            match self.qmp.execute_timeout(&qmp::Quit {}, grace).await {
                Ok(_) | Err(QmpError::Disconnected { .. }) | Err(QmpError::Timeout { .. }) => {}
                Err(e) => tracing::warn!(vm = %self.spec.name, error = %e, "quit failed"),
            }
            if !self.wait_exit(grace).await {
                tracing::warn!(vm = %self.spec.name, pid = self.pid, "QEMU ignored quit; SIGKILL");
                kill(self.pid);
                self.wait_exit(Duration::from_secs(5)).await;
            }
        }
        for f in [
            self.dir.pid_file(),
            self.dir.qmp_socket(),
            self.dir.serial_socket(),
        ] {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }

    /// SIGKILLs QEMU at once (tests and last-resort clean-up).
    pub fn kill(&self) {
        kill(self.pid);
    }
}

fn kill(pid: i32) {
    if pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_releases_from_the_tested_one_on_are_supported() {
        for ok in ["10.0.2", "10.0", "10.1.0", "11.0.0"] {
            assert!(version_supported(ok), "{ok}");
        }
        for old in ["7.2.22", "9.2.0", "8.2", "", "x.y", "10"] {
            assert!(!version_supported(old), "{old}");
        }
    }
}
