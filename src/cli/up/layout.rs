//! The data directory of `ferry up`: what lives where, the lock that keeps
//! one instance per directory, the hosts' certificates, and the clean-up of
//! everything an instance may leave behind.
//!
//! ```text
//!  DIR/ferry-up.lock          flock held while an instance runs (holds its pid)
//!  DIR/kubeconfig             admin kubeconfig (written by the API server)
//!  DIR/ca.crt, tokens/, state.redb, server.*   the embedded API server's data
//!  DIR/network.json           the namespaces' subnet (root only)
//!  DIR/cluster-ca/ca.{crt,key}   the agents' CA (mutual TLS of the relay)
//!  DIR/controller.kubeconfig, DIR/controller.log
//!  DIR/hosts/host-N/pki/      ca.crt host.crt host.key
//!  DIR/hosts/host-N/state/    the agent's state: vms/<ns>.<name>/{qemu.pid,serial.sock,…}
//!  DIR/hosts/host-N/kubeconfig, agent.log, agent.pid
//!  DIR/hosts/host-N/cpu-load  optional: a CPU percentage the host reports instead of its own
//! ```

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::netns;
use crate::agent::pki::{ClusterCa, HostIdentity};

/// Failure to prepare the data directory.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Another `ferry up` holds the directory.
    #[error(
        "the data directory {dir} belongs to a running `ferry up` (pid {pid}); stop it first or pass another --data-dir"
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid as it recorded it.
        pid: String,
    },
    /// A file could not be read or written.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A certificate could not be made or read.
    #[error("the agents' certificates in {dir}")]
    Pki {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: crate::agent::pki::PkiError,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LayoutError + 'a {
    move |source| LayoutError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The paths of one data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The data directory, absolute.
    pub dir: PathBuf,
}

/// The name of host `i` (1-based).
pub fn host_name(i: u32) -> String {
    format!("host-{i}")
}

impl Layout {
    /// Create the directory if needed and make its path absolute.
    pub fn create(dir: &Path) -> Result<Layout, LayoutError> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let dir = dir.canonicalize().map_err(io("resolving", dir))?;
        Ok(Layout { dir })
    }
    /// A layout over an existing absolute directory (for clean-up).
    pub fn at(dir: impl Into<PathBuf>) -> Layout {
        Layout { dir: dir.into() }
    }
    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// The instance id (names of namespaces and links).
    pub fn instance_id(&self) -> String {
        netns::instance_id(&self.dir)
    }
    /// Where the namespaces' subnet is remembered.
    pub fn network_file(&self) -> PathBuf {
        self.dir.join("network.json")
    }
    /// The directory of host `name`.
    pub fn host_dir(&self, name: &str) -> PathBuf {
        self.dir.join("hosts").join(name)
    }
    /// The agent state directory of host `name`.
    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.host_dir(name).join("state")
    }
    /// The serial console socket of VM `namespace/vm` on host `host`.
    pub fn serial_socket(&self, host: &str, namespace: &str, vm: &str) -> PathBuf {
        self.state_dir(host)
            .join("vms")
            .join(crate::agent::daemon::plan::local_name(namespace, vm))
            .join("serial.sock")
    }
    /// The hosts that have a directory, by name.
    pub fn existing_hosts(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("hosts")) else {
            return Vec::new();
        };
        let mut hosts: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        hosts.sort();
        hosts
    }

    /// Take the directory's lock, or say who holds it.
    pub fn lock(&self) -> Result<Flock<File>, LayoutError> {
        let path = self.dir.join("ferry-up.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("opening", &path))?;
        let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            LayoutError::Locked {
                dir: self.dir.clone(),
                pid: std::fs::read_to_string(&path)
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
            }
        })?;
        lock.set_len(0).map_err(io("writing", &path))?;
        writeln!(lock, "{}", std::process::id()).map_err(io("writing", &path))?;
        Ok(lock)
    }

    /// Load the agents' CA, or create it on first start.
    pub fn cluster_ca(&self) -> Result<ClusterCa, LayoutError> {
        let dir = self.dir.join("cluster-ca");
        let pki = |source| LayoutError::Pki {
            dir: dir.clone(),
            source,
        };
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        if crt.exists() && key.exists() {
            let cert = std::fs::read_to_string(&crt).map_err(io("reading", &crt))?;
            let key_pem = std::fs::read_to_string(&key).map_err(io("reading", &key))?;
            return ClusterCa::from_pem(&cert, &key_pem).map_err(pki);
        }
        let ca = ClusterCa::generate("ferry-up-cluster-ca").map_err(pki)?;
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        write_private(&key, &ca.key_pem())?;
        write_private(&crt, ca.cert_pem())?;
        Ok(ca)
    }

    /// Make sure host `name` has a certificate from `ca` (reused when it
    /// exists and still names the host); returns its pki directory.
    pub fn host_identity(&self, ca: &ClusterCa, name: &str) -> Result<PathBuf, LayoutError> {
        let dir = self.host_dir(name).join("pki");
        let current = HostIdentity::load(&dir)
            .ok()
            .filter(|id| id.host == name && id.ca_pem == ca.cert_pem());
        if current.is_none() {
            let pki = |source| LayoutError::Pki {
                dir: dir.clone(),
                source,
            };
            ca.issue_host(name).map_err(pki)?.save(&dir).map_err(pki)?;
        }
        Ok(dir)
    }
}

/// Write a file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<(), LayoutError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(io("writing", path))
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Signal `pid` with SIGTERM, wait up to `grace` for it to go, then SIGKILL.
/// Returns whether it was alive.
pub fn terminate(pid: i32, grace: Duration) -> bool {
    let target = Pid::from_raw(pid);
    if !crate::agent::qemu::pid_alive(pid) {
        return false;
    }
    let _ = kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while crate::agent::qemu::pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if crate::agent::qemu::pid_alive(pid) {
        let _ = kill(target, Signal::SIGKILL);
    }
    true
}

/// Stand the fencing watchdog of `state_dir` down and wait until it has
/// gone (it polls every 250 ms); kill it if it has not within a second —
/// it must not outlive the directory, where it would wait forever for a
/// heartbeat file that no longer exists.
pub fn stop_watchdog(state_dir: &Path) {
    use crate::agent::daemon::watchdog;
    if !state_dir.exists() {
        return;
    }
    let _ = watchdog::stand_down(state_dir);
    let deadline = Instant::now() + Duration::from_secs(1);
    while watchdog::is_running(state_dir) {
        if Instant::now() > deadline {
            for pid in watchdog_pids(state_dir) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pids of `… agent watchdog --state-dir <state_dir>` processes.
fn watchdog_pids(state_dir: &Path) -> Vec<i32> {
    let want = state_dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = String::from_utf8_lossy(&cmdline)
                .split('\0')
                .map(str::to_string)
                .collect();
            let is_watchdog = args.iter().any(|a| a == "watchdog")
                && args
                    .windows(2)
                    .any(|w| w[0] == "--state-dir" && w[1] == want);
            is_watchdog.then_some(pid)
        })
        .collect()
}

/// Stop the QEMUs of a host state directory (SIGTERM, then SIGKILL after
/// `grace`) and its fencing watchdog. Returns the QEMU pids stopped.
pub fn stop_host_vms(state_dir: &Path, grace: Duration) -> Vec<i32> {
    stop_watchdog(state_dir);
    let Ok(entries) = std::fs::read_dir(state_dir.join("vms")) else {
        return Vec::new();
    };
    let pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| read_pid(&e.path().join("qemu.pid")))
        .filter(|pid| crate::agent::qemu::pid_alive(*pid))
        .collect();
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for pid in &pids {
        while crate::agent::qemu::pid_alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if crate::agent::qemu::pid_alive(*pid) {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
    pids
}

/// What [`cleanup`] found and stopped.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// Agent and controller processes stopped.
    pub daemons: Vec<i32>,
    /// QEMU processes stopped.
    pub qemus: Vec<i32>,
    /// Namespaces and links removed.
    pub network: Vec<String>,
}

/// Stop everything an instance on `dir` may have left running — agents,
/// the controller, QEMUs, watchdogs — and remove its namespaces and links.
/// Safe to call on a directory whose instance stopped cleanly (it finds
/// nothing) and after a crash; the end-to-end tests call it on drop.
pub fn cleanup(dir: &Path) -> Cleanup {
    let layout = Layout::at(dir);
    let mut report = Cleanup {
        daemons: stop_stale_daemons(dir),
        ..Cleanup::default()
    };
    for host in layout.existing_hosts() {
        report.qemus.extend(stop_host_vms(
            &layout.state_dir(&host),
            Duration::from_secs(2),
        ));
    }
    if nix::unistd::geteuid().is_root() {
        report.network = netns::teardown_instance(&layout.instance_id());
    }
    report
}

/// Stop the agents and the controller that an earlier instance on `dir`
/// left running (it was killed: its children outlive it), by their pid
/// files. QEMUs and watchdogs are left alone: the new agents adopt them.
pub fn stop_stale_daemons(dir: &Path) -> Vec<i32> {
    let layout = Layout::at(dir);
    let mut stopped = Vec::new();
    let controller_pid = dir.join("controller.pid");
    for pid_file in layout
        .existing_hosts()
        .iter()
        .map(|h| layout.host_dir(h).join("agent.pid"))
        .chain(std::iter::once(controller_pid))
    {
        if let Some(pid) = read_pid(&pid_file)
            && is_ferry_process(pid)
            && terminate(pid, Duration::from_secs(5))
        {
            stopped.push(pid);
        }
    }
    stopped
}

/// Whether `pid` runs a Ferry binary (a stale pid file may name a reused pid).
fn is_ferry_process(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        String::from_utf8_lossy(&c)
            .split('\0')
            .next()
            .is_some_and(|exe| exe.contains("ferry") || exe == "ip")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_with_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::create(tmp.path()).unwrap();
        let held = layout.lock().unwrap();
        let err = layout.lock().unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&std::process::id().to_string()), "{text}");
        drop(held);
        layout.lock().unwrap();
    }

    #[test]
    fn host_certificates_are_reused_while_the_ca_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::create(tmp.path()).unwrap();
        let ca = layout.cluster_ca().unwrap();
        let dir = layout.host_identity(&ca, "host-1").unwrap();
        let first = std::fs::read_to_string(dir.join("host.crt")).unwrap();
        let ca_again = layout.cluster_ca().unwrap();
        assert_eq!(ca_again.cert_pem(), ca.cert_pem());
        layout.host_identity(&ca_again, "host-1").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("host.crt")).unwrap(),
            first
        );
        assert_eq!(HostIdentity::load(&dir).unwrap().host, "host-1");
    }
}
