//! Shared by the `guest_*` tests: boots the memtest guest in a real QEMU
//! (TCG) in a unique temporary directory, killed when dropped.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferry::agent::guest::{self, GuestConfig, GuestConsole};
use tempfile::TempDir;
use tokio::process::{Child, Command};

/// Generous: TCG on a loaded 2-core CI machine can be slow to boot and fill.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A scratch directory holding the installed kernel and every socket.
pub struct Rig {
    pub dir: TempDir,
    pub kernel: PathBuf,
}

impl Rig {
    pub fn new() -> Rig {
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ferry-guest-")
            .tempdir_in("/tmp")
            .unwrap();
        let kernel = guest::install_kernel(dir.path()).unwrap();
        Rig { dir, kernel }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `qemu-system-x86_64` for the guest named `name`, with a QMP
    /// socket at `<name>-qmp.sock` and COM1 at `<name>-ser.sock`.
    pub fn spawn(&self, name: &str, config: &GuestConfig, extra: &[&str]) -> Qemu {
        self.spawn_with_kernel(name, &self.kernel, config, extra)
    }

    /// Like [`Rig::spawn`] with the kernel at another path.
    pub fn spawn_with_kernel(
        &self,
        name: &str,
        kernel: &Path,
        config: &GuestConfig,
        extra: &[&str],
    ) -> Qemu {
        let serial = self.path(&format!("{name}-ser.sock"));
        let qmp = self.path(&format!("{name}-qmp.sock"));
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "128", "-nographic", "-nodefaults"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(guest::qemu_args(kernel, config, &serial))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-system-x86_64 must be installed");
        Qemu {
            child,
            serial,
            qmp,
            log: self.path(&format!("{name}.log")),
        }
    }
}

/// A running QEMU; SIGKILLed on drop, even when the test panics.
pub struct Qemu {
    pub child: Child,
    pub serial: PathBuf,
    pub qmp: PathBuf,
    pub log: PathBuf,
}

impl Qemu {
    /// Connects to COM1 and waits for the fill to finish.
    pub async fn console(&self) -> GuestConsole {
        let mut console = GuestConsole::connect_timeout(&self.serial, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}; QEMU log: {}", self.log_text()));
        console
            .wait_ready(READY_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("guest not ready: {e}; QEMU log: {}", self.log_text()));
        console
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub fn socket_uri(path: &Path) -> String {
    format!("unix:{}", path.display())
}
