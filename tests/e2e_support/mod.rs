//! The end-to-end harness: a real `ferry up` (the built binary) in a temp
//! data directory on a free port, driven only through `kubectl` and
//! `kubectl ferry`, with a memory check of any VM through its serial
//! console on whichever host runs it.
//!
//! ```text
//!  Cluster::up(n) ─► ferry up --data-dir /tmp/feXXXX --listen 127.0.0.1:0
//!                    (stdout read until "ferry up: ready"; stderr → DIR/up.log;
//!                    the API server's port read back from DIR/kubeconfig)
//!  kubectl(...)    ─► $FERRY_KUBECTL or pyenv kubectl --kubeconfig DIR/kubeconfig
//!  ferry(...)      ─► kubectl-ferry --kubeconfig DIR/kubeconfig
//!  verify_vm(vm)   ─► status.host ─► DIR/hosts/<host>/state/vms/<ns>.<vm>/serial.sock
//!  drop            ─► SIGTERM ferry up, wait; SIGKILL; layout::cleanup(DIR)
//!                     (agents, QEMUs, watchdogs, namespaces, links)
//! ```
//!
//! Each cluster has its own data directory, hence its own namespace and
//! link names (a hash of the path), and its own port picked by the API
//! server itself, so tests run in parallel. [`net`] adds networked VMs
//! (the Linux test guest on `ferry up`'s VM network) and clients in the
//! client namespace.
#![allow(dead_code)]

pub mod net;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry::agent::guest::{GuestConsole, VerifyReport};
use ferry::cli::up::layout::{self, Layout};
use ferry::cli::up::{READY_LINE, netns};

/// How long `ferry up` may take to be ready (2 cores shared by many).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a guest may take to boot and fill its memory under TCG.
const GUEST_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The kubectl binary: `$FERRY_KUBECTL`, else the pinned real kubectl.
pub fn kubectl_binary() -> String {
    std::env::var("FERRY_KUBECTL")
        .unwrap_or_else(|_| "/root/.pyenv/versions/3.11.7/bin/kubectl".to_string())
}

/// A TCP port on loopback that was free a moment ago (bound and
/// released): another process may take it before the caller binds it, so
/// use it only where nothing binds it (a `ferry up` meant to fail before
/// listening). [`Cluster`] lets the API server pick its port instead.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `ferry up`, stopped and cleaned up on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Port of the API server (0 until `ferry up` is ready; it picks the
    /// port and writes it into the kubeconfig, read back from there).
    pub port: u16,
    /// Hosts.
    pub hosts: u32,
    extra: Vec<String>,
    /// Everything `ferry up` printed on stdout in its last run.
    pub banner: Vec<String>,
}

impl Cluster {
    /// `ferry up --hosts N` on a fresh data directory.
    pub fn up(hosts: u32) -> Cluster {
        Cluster::up_with(hosts, &[])
    }

    /// `ferry up --hosts N EXTRA…` on a fresh data directory.
    pub fn up_with(hosts: u32, extra: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("fe")
            .tempdir_in("/tmp")
            .unwrap();
        let mut cluster = Cluster {
            dir,
            child: None,
            port: 0,
            hosts,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            banner: Vec::new(),
        };
        cluster.start();
        cluster
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The instance id (namespace and link names).
    pub fn instance_id(&self) -> String {
        Layout::at(self.dir.path()).instance_id()
    }

    /// `ferry up`'s stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// Start `ferry up` on the data directory and wait for it to be ready
    /// (on a port the API server picks; a restart may get another one).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "ferry up is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("up.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("up")
            .arg("--hosts")
            .arg(self.hosts.to_string())
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        self.banner.clear();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line == READY_LINE => break,
                Ok(line) => self.banner.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().unwrap().wait().unwrap();
                    self.child = None;
                    panic!("ferry up exited ({status}) before ready:\n{}", self.log());
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "ferry up not ready within {READY_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
        }
        // Keep draining stdout so that ferry up never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        self.port = kubeconfig_port(&self.kubeconfig())
            .unwrap_or_else(|| panic!("no server port in {}", self.kubeconfig().display()));
    }

    /// Stop `ferry up` as Ctrl-C would (SIGINT) and wait for its exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("ferry up is not running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ferry up did not stop within 60s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// kubectl with this cluster's kubeconfig and its own discovery cache
    /// (kubectl caches by host:port, and ports are reused between tests).
    fn kubectl_command(&self) -> Command {
        let mut c = Command::new(kubectl_binary());
        c.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"));
        c
    }

    /// Kill `ferry up` outright (SIGKILL), as a crash would: its children
    /// (agents, controller, QEMUs, watchdogs) are left running.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("ferry up is not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Run kubectl against this cluster.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_command().args(args).output().unwrap()
    }

    /// Run kubectl and return its stdout; panic with its stderr on failure.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl patch mpol default --type=merge -p PATCH`: changes the
    /// policy every VM of the cluster falls under.
    pub fn patch_default_policy(&self, patch: &str) {
        self.kubectl_ok(&["patch", "mpol", "default", "--type=merge", "-p", patch]);
    }

    /// `kubectl apply -f -` of a manifest (with kubectl's client-side
    /// validation against the server's OpenAPI documents).
    pub fn apply(&self, manifest: &str) -> String {
        let mut child = self
            .kubectl_command()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(manifest.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run `kubectl ferry` (the `kubectl-ferry` binary) against this cluster.
    pub fn ferry(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kubectl-ferry"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .output()
            .unwrap()
    }

    /// `kubectl get … -o jsonpath=…`, trimmed.
    pub fn jsonpath(&self, args: &[&str], path: &str) -> String {
        let mut all: Vec<&str> = args.to_vec();
        let flag = format!("-o=jsonpath={path}");
        all.push(&flag);
        self.kubectl_ok(&all).trim().to_string()
    }

    /// Wait until `check` holds, polling; panic with `what` and the log.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The host a VM's status names, if any.
    pub fn vm_host(&self, namespace: &str, vm: &str) -> Option<String> {
        let host = self.jsonpath(&["get", "fvm", vm, "-n", namespace], "{.status.host}");
        (!host.is_empty()).then_some(host)
    }

    /// The serial socket of a VM on `host`.
    pub fn serial_socket(&self, host: &str, namespace: &str, vm: &str) -> PathBuf {
        Layout::at(self.dir.path()).serial_socket(host, namespace, vm)
    }

    /// Connect to the VM's serial console on the host its status names,
    /// wait for the guest to be ready and run its memory check.
    pub fn verify_vm(&self, namespace: &str, vm: &str) -> (String, VerifyReport) {
        let host = self
            .vm_host(namespace, vm)
            .unwrap_or_else(|| panic!("VM {namespace}/{vm} has no host"));
        let socket = self.serial_socket(&host, namespace, vm);
        let report = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let mut console = GuestConsole::connect_timeout(&socket, GUEST_READY_TIMEOUT)
                    .await
                    .unwrap_or_else(|e| panic!("serial console of {vm} on {host}: {e}"));
                console
                    .wait_ready(GUEST_READY_TIMEOUT)
                    .await
                    .unwrap_or_else(|e| panic!("guest {vm} on {host} not ready: {e}"));
                console
                    .verify()
                    .await
                    .unwrap_or_else(|e| panic!("verify of {vm} on {host}: {e}"))
            });
        (host, report)
    }

    /// The pids of the QEMUs running for this cluster's hosts.
    pub fn qemu_pids(&self) -> Vec<i32> {
        let layout = Layout::at(self.dir.path());
        layout
            .existing_hosts()
            .iter()
            .flat_map(|h| self.host_qemu_pids(h))
            .collect()
    }

    /// The pids of the QEMUs running on `host`.
    pub fn host_qemu_pids(&self, host: &str) -> Vec<i32> {
        let layout = Layout::at(self.dir.path());
        let Ok(entries) = std::fs::read_dir(layout.state_dir(host).join("vms")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                std::fs::read_to_string(e.path().join("qemu.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                    .filter(|p| ferry::agent::qemu::pid_alive(*p))
            })
            .collect()
    }

    /// Make `host` report `percent` CPU load instead of its measured one
    /// (the agent reads `DIR/hosts/<host>/cpu-load` on every beat).
    pub fn set_cpu_load(&self, host: &str, percent: u32) {
        let path = Layout::at(self.dir.path()).host_dir(host).join("cpu-load");
        std::fs::write(path, percent.to_string()).unwrap();
    }

    /// The command lines of the QEMUs running on `host`.
    pub fn host_qemu_cmdlines(&self, host: &str) -> Vec<String> {
        self.host_qemu_pids(host)
            .into_iter()
            .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .collect()
    }

    /// Power loss of `host`: its agent, its fencing watchdog and its QEMUs
    /// are killed at once (SIGKILL).
    pub fn power_off(&self, host: &str) {
        let layout = Layout::at(self.dir.path());
        let state = layout.state_dir(host).to_string_lossy().into_owned();
        let mut victims = self.host_qemu_pids(host);
        if let Some(agent) = std::fs::read_to_string(layout.host_dir(host).join("agent.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            victims.push(agent);
        }
        victims.extend(
            self.processes()
                .into_iter()
                .filter(|(_, cmd)| cmd.contains(" watchdog ") && cmd.contains(&state))
                .map(|(pid, _)| pid),
        );
        for pid in victims {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Kill the agent of `host` (SIGKILL), leaving its watchdog and QEMUs.
    pub fn kill_agent(&self, host: &str) {
        let pid_file = Layout::at(self.dir.path()).host_dir(host).join("agent.pid");
        let pid: i32 = std::fs::read_to_string(pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    /// The network namespace of host `i` (1-based); root only.
    pub fn namespace_of(&self, i: u32) -> String {
        netns::namespace_name(&self.instance_id(), i)
    }

    /// Set the link of host `i`'s namespace down (cut off) or up.
    pub fn set_link(&self, i: u32, up: bool) {
        let ns = self.namespace_of(i);
        let state = if up { "up" } else { "down" };
        let out = Command::new("ip")
            .args(["-n", &ns, "link", "set", "eth0", state])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip -n {ns} link set eth0 {state}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// This cluster's network namespaces and links that exist now.
    pub fn network_leftovers(&self) -> Vec<String> {
        let id = self.instance_id();
        let mut found: Vec<String> = netns::list_namespaces()
            .into_iter()
            .filter(|n| n.starts_with(&format!("ferry-{id}-")))
            .collect();
        found.extend(
            netns::list_links()
                .into_iter()
                .filter(|l| l.starts_with(&format!("fv-{id}-")) || *l == format!("fbr-{id}")),
        );
        found
    }

    /// Processes whose command line mentions this cluster's data directory
    /// (agents, watchdogs, QEMUs), excluding `ferry up` itself.
    pub fn processes(&self) -> Vec<(i32, String)> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let me = self.child.as_ref().map(|c| c.id() as i32);
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if Some(pid) == me {
                continue;
            }
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&dir) && !cmdline.contains(" up ") {
                found.push((pid, cmdline));
            }
        }
        found
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = layout::cleanup(self.dir.path());
    }
}

/// The port of the (first) cluster's server URL in a kubeconfig.
pub fn kubeconfig_port(path: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(path).ok()?;
    let config: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    let server = config["clusters"][0]["cluster"]["server"].as_str()?;
    server
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse()
        .ok()
}

/// A memtest VM manifest in the default namespace.
pub fn memtest_vm(name: &str, memory: &str, fill_mib: u32) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  memory: {memory}\n  cpus: 1\n  boot:\n    memtest:\n      fillMib: {fill_mib}\n      dirtyRateMib: 1\n"
    )
}

/// Whether this process can create network namespaces (root).
pub fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `kubectl get mig -A -l SELECTOR --watch` in the background, printing
/// `KEY PHASE` per change, where KEY is a JSONPath of the Migration
/// (`{.spec.vmName}`, `{.metadata.name}`): what a user watching the drain
/// saw, including Migrations deleted since. Killed on drop.
pub struct MigrationWatch {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl MigrationWatch {
    /// Starts the watch.
    pub fn start(c: &Cluster, selector: &str, key: &str) -> MigrationWatch {
        let mut child = Command::new(kubectl_binary())
            .arg("--kubeconfig")
            .arg(c.kubeconfig())
            .arg("--cache-dir")
            .arg(c.data_dir().join("kubectl-watch-cache"))
            .args(["get", "mig", "-A", "-l", selector, "--watch"])
            .arg(format!(r#"-o=jsonpath={key} {{.status.phase}}{{"\n"}}"#))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        MigrationWatch { child, lines }
    }

    /// KEY → the phase it was last seen in.
    pub fn last_phases(&self) -> std::collections::BTreeMap<String, String> {
        let mut last = std::collections::BTreeMap::new();
        for l in self.lines.lock().unwrap().iter() {
            let mut f = l.split_whitespace();
            if let Some(key) = f.next() {
                last.insert(key.to_string(), f.next().unwrap_or("").to_string());
            }
        }
        last
    }
}

impl Drop for MigrationWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
