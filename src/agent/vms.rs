//! The VM process manager: the QEMU processes of one host, by VM name.
//!
//! The manager owns the agent's state directory. `adopt_all` runs first after
//! an agent (re)start and takes over every QEMU still running there; only
//! then does the agent start or stop anything. Directories whose QEMU has
//! gone are reported (the VM died while the agent was away); the caller
//! decides whether to restart the VM or [`VmManager::remove_state`] it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::qemu::{DEFAULT_QEMU, MachineSpec, QemuError, QemuProcess, VmDir};

/// What `adopt_all` found in one VM directory.
#[derive(Debug)]
pub enum AdoptOutcome {
    /// A running QEMU, now managed.
    Adopted(Arc<QemuProcess>),
    /// The directory's QEMU is gone (or not adoptable); the reason says why.
    Gone {
        /// VM name (directory name).
        name: String,
        /// Why it could not be adopted.
        error: QemuError,
    },
}

/// The QEMU processes of this host.
#[derive(Debug)]
pub struct VmManager {
    state_dir: PathBuf,
    binary: String,
    vms: Mutex<BTreeMap<String, Arc<QemuProcess>>>,
}

/// Manager failure.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A VM of that name already runs here.
    #[error("VM {0} already runs on this host")]
    AlreadyRunning(String),
    /// No VM of that name runs here.
    #[error("VM {0} does not run on this host")]
    NotFound(String),
    /// The state directory could not be listed.
    #[error("listing state directory {path}")]
    StateDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU failed.
    #[error(transparent)]
    Qemu(#[from] QemuError),
}

impl VmManager {
    /// A manager over `state_dir` using the default QEMU binary.
    pub fn new(state_dir: impl Into<PathBuf>) -> VmManager {
        VmManager::with_binary(state_dir, DEFAULT_QEMU)
    }

    /// A manager using a specific QEMU binary.
    pub fn with_binary(state_dir: impl Into<PathBuf>, binary: impl Into<String>) -> VmManager {
        VmManager {
            state_dir: state_dir.into(),
            binary: binary.into(),
            vms: Mutex::default(),
        }
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Takes over every QEMU still running in the state directory.
    pub async fn adopt_all(&self) -> Result<Vec<AdoptOutcome>, VmError> {
        let root = self.state_dir.join("vms");
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(VmError::StateDir { path: root, source }),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut out = Vec::new();
        let mut vms = self.vms.lock().await;
        for name in names {
            if vms.get(&name).is_some_and(|p| p.is_alive()) {
                continue;
            }
            match QemuProcess::adopt(VmDir::new(&self.state_dir, &name)).await {
                Ok(p) => {
                    let p = Arc::new(p);
                    vms.insert(name, p.clone());
                    out.push(AdoptOutcome::Adopted(p));
                }
                Err(error) => {
                    tracing::warn!(vm = %name, %error, "VM directory without a running QEMU");
                    out.push(AdoptOutcome::Gone { name, error });
                }
            }
        }
        Ok(out)
    }

    /// Starts a VM (`incoming`: as a migration target waiting for its state).
    pub async fn start(
        &self,
        spec: &MachineSpec,
        incoming: bool,
    ) -> Result<Arc<QemuProcess>, VmError> {
        let mut vms = self.vms.lock().await;
        if vms.get(&spec.name).is_some_and(|p| p.is_alive()) {
            return Err(VmError::AlreadyRunning(spec.name.clone()));
        }
        let p = Arc::new(QemuProcess::spawn(&self.binary, &self.state_dir, spec, incoming).await?);
        vms.insert(spec.name.clone(), p.clone());
        Ok(p)
    }

    /// The VM's process, if managed here.
    pub async fn get(&self, name: &str) -> Option<Arc<QemuProcess>> {
        self.vms.lock().await.get(name).cloned()
    }

    /// Names and processes of all managed VMs.
    pub async fn list(&self) -> Vec<(String, Arc<QemuProcess>)> {
        let vms = self.vms.lock().await;
        vms.iter().map(|(n, p)| (n.clone(), p.clone())).collect()
    }

    /// Stops a VM (quit, SIGKILL after `grace`) and forgets it.
    pub async fn stop(&self, name: &str, grace: Duration) -> Result<(), VmError> {
        let p = self
            .vms
            .lock()
            .await
            .remove(name)
            .ok_or_else(|| VmError::NotFound(name.into()))?;
        p.stop(grace).await?;
        Ok(())
    }

    /// Deletes the state directory of a VM that does not run here.
    pub async fn remove_state(&self, name: &str) -> Result<(), VmError> {
        let vms = self.vms.lock().await;
        if vms.get(name).is_some_and(|p| p.is_alive()) {
            return Err(VmError::AlreadyRunning(name.into()));
        }
        let dir = VmDir::new(&self.state_dir, name);
        match std::fs::remove_dir_all(dir.path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(VmError::StateDir {
                path: dir.path().to_owned(),
                source,
            }),
        }
    }

    /// Forgets a VM whose QEMU has exited (e.g. a source after migration),
    /// returning it if it was managed.
    pub async fn forget(&self, name: &str) -> Option<Arc<QemuProcess>> {
        self.vms.lock().await.remove(name)
    }
}
