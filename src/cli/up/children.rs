//! The child processes of `ferry up` (one agent per host, the controller)
//! and the TCP forwarder that lets the hosts' namespaces reach the API
//! server.
//!
//! ```text
//!  ferry up ─┬─ [ip netns exec ferry-<id>-host-N] ferry agent run --host host-N …
//!            │        └─ ferry agent watchdog (own session)   QEMUs (own sessions)
//!            └─ ferry controller --kubeconfig DIR/controller.kubeconfig
//! ```
//!
//! Each child writes to its own log file and its pid to a pid file, so that
//! [`super::layout::cleanup`] can find it after a crash. Children are
//! stopped with SIGTERM, then SIGKILL after a grace period; the QEMUs and
//! watchdogs, which outlive agents by design, are stopped afterwards from
//! their pid files.
//!
//! [`supervise`] starts a child that dies again, as systemd would on a
//! host, after a back-off (1 s, doubling to 30 s; back to 1 s once it has
//! run for a minute), and never once shutdown has begun:
//!
//! ```text
//!  Running ──exits──► Waiting(until) ──until passed──┬─ Restart allows ─► respawn ─► Running
//!                          ▲                         └─ it does not ───► Down (logged)
//!                          └──── respawn failed: a longer back-off ◄──────┘
//! ```
//!
//! An agent is restarted only while its host's fencing watchdog still runs
//! ([`Restart::WhileWatchdogRuns`]): an agent that crashed leaves it behind,
//! but a host that lost power (agent, watchdog and QEMUs gone at once) would
//! take its supervisor with it, so it stays down, to be fenced and
//! evacuated. A restarted agent adopts the QEMUs it finds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The first wait before a child that died is started again.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between restarts (the scale of systemd's `RestartSec`
/// with its back-off).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A child that ran this long before dying starts over at [`FIRST_BACKOFF`].
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How often [`supervise`] looks at the children.
const SUPERVISE_TICK: Duration = Duration::from_millis(500);

/// Failure to start a child.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The process could not be spawned.
    #[error("starting {what}")]
    Spawn {
        /// Which child.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Its log or pid file could not be written.
    #[error("{path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Whether a child that died is started again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// Never: its end is reported.
    Never,
    /// Always, after the back-off (the controller).
    Always,
    /// While the fencing watchdog of this state directory runs (an agent:
    /// when the watchdog is gone too, the host lost power and stays down).
    WhileWatchdogRuns(PathBuf),
}

/// Where a child is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Its process runs, since then.
    Running(Instant),
    /// It died; it is started again at this instant.
    Waiting(Instant),
    /// It died and stays down.
    Down,
}

/// How to start a child (again).
struct Command {
    program: PathBuf,
    args: Vec<String>,
    netns: Option<String>,
    log: PathBuf,
    pid_file: PathBuf,
}

/// A running child process.
pub struct Child {
    /// What it is (`agent host-1`, `controller`).
    pub what: String,
    /// Its log file.
    pub log: PathBuf,
    process: tokio::process::Child,
    command: Command,
    restart: Restart,
    life: Life,
    /// Restarts since it last ran for [`STABLE_AFTER`].
    failures: u32,
    /// Restarts in all.
    restarts: u32,
}

impl Child {
    /// Spawn `program args…` (inside network namespace `netns` when given),
    /// logging to `log` and recording the pid in `pid_file`. It is not
    /// restarted unless [`Child::restart`] says so.
    pub fn spawn(
        what: impl Into<String>,
        program: &Path,
        args: &[String],
        netns: Option<&str>,
        log: PathBuf,
        pid_file: &Path,
    ) -> Result<Child, ChildError> {
        let what = what.into();
        let command = Command {
            program: program.to_path_buf(),
            args: args.to_vec(),
            netns: netns.map(str::to_string),
            log: log.clone(),
            pid_file: pid_file.to_path_buf(),
        };
        let process = command.launch(&what)?;
        Ok(Child {
            what,
            log,
            process,
            command,
            restart: Restart::Never,
            life: Life::Running(Instant::now()),
            failures: 0,
            restarts: 0,
        })
    }

    /// Set whether it is started again when it dies.
    pub fn restart(mut self, restart: Restart) -> Child {
        self.restart = restart;
        self
    }

    /// How many times it was started again.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// The pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// The exit status if it has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.try_wait().ok().flatten()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; waits for the end.
    pub async fn stop(&mut self, grace: Duration) {
        self.life = Life::Down;
        if let Some(pid) = self.process.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, self.process.wait())
            .await
            .is_err()
        {
            let _ = self.process.start_kill();
            let _ = self.process.wait().await;
        }
    }

    /// One look by the supervisor at `now`: report an end, then schedule
    /// or make a restart. Nothing is started once `shutdown` is cancelled.
    fn supervise_once(&mut self, now: Instant, shutdown: &CancellationToken) {
        match self.life {
            Life::Down => {}
            Life::Running(since) => {
                let Some(status) = self.exited() else { return };
                eprintln!(
                    "ferry up: {} exited ({status}); see {}",
                    self.what,
                    self.log.display()
                );
                if self.restart == Restart::Never {
                    self.life = Life::Down;
                    return;
                }
                if now.duration_since(since) >= STABLE_AFTER {
                    self.failures = 0;
                }
                let wait = backoff(self.failures);
                eprintln!("ferry up: restarting {} in {wait:?}", self.what);
                self.life = Life::Waiting(now + wait);
            }
            Life::Waiting(at) => {
                if now < at || shutdown.is_cancelled() {
                    return;
                }
                if let Restart::WhileWatchdogRuns(state_dir) = &self.restart
                    && !crate::agent::daemon::watchdog::is_running(state_dir)
                {
                    eprintln!(
                        "ferry up: not restarting {}: its host's fencing watchdog is gone too, as after a power loss; the host stays down",
                        self.what
                    );
                    self.life = Life::Down;
                    return;
                }
                self.failures = self.failures.saturating_add(1);
                match self.command.launch(&self.what) {
                    Ok(process) => {
                        self.process = process;
                        self.restarts += 1;
                        self.life = Life::Running(now);
                        eprintln!(
                            "ferry up: restarted {} (pid {}, restart {})",
                            self.what,
                            self.pid().unwrap_or_default(),
                            self.restarts
                        );
                    }
                    Err(e) => {
                        let wait = backoff(self.failures);
                        eprintln!(
                            "ferry up: restarting {} failed: {}; trying again in {wait:?}",
                            self.what,
                            crate::agent::daemon::error_chain(&e)
                        );
                        self.life = Life::Waiting(now + wait);
                    }
                }
            }
        }
    }
}

impl Command {
    /// Spawn the process, appending to its log, and write its pid file.
    fn launch(&self, what: &str) -> Result<tokio::process::Child, ChildError> {
        let file = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ChildError::File { path, source }
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(file(&self.log))?;
        let err = out.try_clone().map_err(file(&self.log))?;
        let mut command = match &self.netns {
            // `ip netns exec` execs the program after joining the namespace,
            // so the pid we see is the program's own.
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => tokio::process::Command::new(&self.program),
        };
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(false);
        let process = command.spawn().map_err(|source| ChildError::Spawn {
            what: what.to_string(),
            source,
        })?;
        if let Some(pid) = process.id() {
            std::fs::write(&self.pid_file, format!("{pid}\n")).map_err(file(&self.pid_file))?;
        }
        Ok(process)
    }
}

/// The wait before the restart that follows `failures` quick deaths.
fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF)
}

/// Watch `children` until `shutdown`: report each that ends and start it
/// again as its [`Restart`] allows, after the back-off. Returns as soon as
/// shutdown begins; nothing is started after that.
pub async fn supervise(children: &mut [Child], shutdown: &CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SUPERVISE_TICK) => {}
        }
        let now = Instant::now();
        for child in children.iter_mut() {
            child.supervise_once(now, shutdown);
        }
    }
}

/// The last `lines` lines of a log file (for error messages).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Forward every TCP connection accepted on `listener` to `target` until
/// `cancel`: how the hosts' namespaces reach an API server that listens on
/// loopback only.
pub async fn forward(listener: TcpListener, target: SocketAddr, cancel: CancellationToken) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (mut inbound, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "forwarder accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let cancel = cancel.clone();
        conns.spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
    conns.abort_all();
}

/// A kubeconfig for a daemon: `server` with the API server's CA, verified
/// as `tls_server_name` (the serving certificate names `localhost`, not the
/// bridge address the namespaces dial), authenticating with `token`.
pub fn daemon_kubeconfig(
    server: &str,
    ca_pem: &str,
    tls_server_name: Option<&str>,
    user: &str,
    token: &str,
) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let sni = tls_server_name
        .map(|n| format!("    tls-server-name: {n}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferry\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n{sni}users:\n- name: \"{user}\"\n  user:\n    token: {token}\ncontexts:\n- name: ferry\n  context:\n    cluster: ferry\n    user: \"{user}\"\n    namespace: default\ncurrent-context: ferry\npreferences: {{}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_kubeconfig_names_the_tls_server_and_parses() {
        let text = daemon_kubeconfig(
            "https://10.77.3.1:6443",
            "-----BEGIN CERTIFICATE-----\n",
            Some("localhost"),
            "ferry:agent:host-1",
            "abc",
        );
        let kc = kube::config::Kubeconfig::from_yaml(&text).unwrap();
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.tls_server_name.as_deref(), Some("localhost"));
        assert_eq!(cluster.server.as_deref(), Some("https://10.77.3.1:6443"));
    }

    #[test]
    fn restarts_back_off_from_one_second_to_thirty() {
        let waits: Vec<u64> = (0..7).map(|f| backoff(f).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    /// A child running `sh -c 'exit 3'`, logging under `dir`.
    async fn dead_child(dir: &Path, restart: Restart) -> Child {
        let mut child = Child::spawn(
            "test child",
            Path::new("/bin/sh"),
            &["-c".to_string(), "exit 3".to_string()],
            None,
            dir.join("child.log"),
            &dir.join("child.pid"),
        )
        .unwrap()
        .restart(restart);
        child.process.wait().await.unwrap();
        child
    }

    #[tokio::test]
    async fn a_dead_child_is_started_again_after_its_back_off_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = dead_child(dir.path(), Restart::Always).await;
        let first_pid = std::fs::read_to_string(dir.path().join("child.pid")).unwrap();
        let shutdown = CancellationToken::new();
        let t0 = Instant::now();
        child.supervise_once(t0, &shutdown);
        assert_eq!(child.life, Life::Waiting(t0 + FIRST_BACKOFF));
        child.supervise_once(t0 + FIRST_BACKOFF / 2, &shutdown);
        assert_eq!(child.restarts(), 0, "not before the back-off");
        child.supervise_once(t0 + FIRST_BACKOFF, &shutdown);
        assert_eq!(child.restarts(), 1);
        assert!(matches!(child.life, Life::Running(_)));
        let second_pid = std::fs::read_to_string(dir.path().join("child.pid")).unwrap();
        assert_ne!(first_pid, second_pid, "the pid file names the new process");
        // It dies again at once: the next wait is longer.
        child.process.wait().await.unwrap();
        let t1 = t0 + FIRST_BACKOFF;
        child.supervise_once(t1, &shutdown);
        assert_eq!(child.life, Life::Waiting(t1 + 2 * FIRST_BACKOFF));
    }

    #[tokio::test]
    async fn nothing_is_restarted_once_shutdown_has_begun() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = dead_child(dir.path(), Restart::Always).await;
        let shutdown = CancellationToken::new();
        let t0 = Instant::now();
        child.supervise_once(t0, &shutdown);
        shutdown.cancel();
        child.supervise_once(t0 + MAX_BACKOFF, &shutdown);
        assert_eq!(child.restarts(), 0);
    }

    #[tokio::test]
    async fn an_agent_whose_watchdog_is_gone_too_stays_down_and_one_with_it_restarts() {
        use nix::fcntl::{Flock, FlockArg};
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let shutdown = CancellationToken::new();
        let t0 = Instant::now();
        // No watchdog holds the lock: a power loss.
        let mut child = dead_child(dir.path(), Restart::WhileWatchdogRuns(state.clone())).await;
        child.supervise_once(t0, &shutdown);
        child.supervise_once(t0 + MAX_BACKOFF, &shutdown);
        assert_eq!((child.life, child.restarts()), (Life::Down, 0));
        // A watchdog (here: this test) holds the lock: the agent crashed.
        let lock = std::fs::File::create(state.join("watchdog.lock")).unwrap();
        let _held = Flock::lock(lock, FlockArg::LockExclusiveNonblock).unwrap();
        let mut child = dead_child(dir.path(), Restart::WhileWatchdogRuns(state)).await;
        child.supervise_once(t0, &shutdown);
        child.supervise_once(t0 + MAX_BACKOFF, &shutdown);
        assert_eq!(child.restarts(), 1);
    }

    #[tokio::test]
    async fn the_forwarder_carries_bytes_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(forward(front, target, cancel.clone()));
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        cancel.cancel();
        task.await.unwrap();
    }
}
