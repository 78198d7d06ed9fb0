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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

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

/// A running child process.
pub struct Child {
    /// What it is (`agent host-1`, `controller`).
    pub what: String,
    /// Its log file.
    pub log: PathBuf,
    process: tokio::process::Child,
}

impl Child {
    /// Spawn `program args…` (inside network namespace `netns` when given),
    /// logging to `log` and recording the pid in `pid_file`.
    pub fn spawn(
        what: impl Into<String>,
        program: &Path,
        args: &[String],
        netns: Option<&str>,
        log: PathBuf,
        pid_file: &Path,
    ) -> Result<Child, ChildError> {
        let what = what.into();
        let file = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ChildError::File { path, source }
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(file(&log))?;
        let err = out.try_clone().map_err(file(&log))?;
        let mut command = match netns {
            // `ip netns exec` execs the program after joining the namespace,
            // so the pid we see is the program's own.
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => tokio::process::Command::new(program),
        };
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(false);
        let process = command.spawn().map_err(|source| ChildError::Spawn {
            what: what.clone(),
            source,
        })?;
        if let Some(pid) = process.id() {
            std::fs::write(pid_file, format!("{pid}\n")).map_err(file(pid_file))?;
        }
        Ok(Child { what, log, process })
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
