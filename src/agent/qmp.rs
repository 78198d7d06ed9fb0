//! An asynchronous QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! QMP is line-delimited JSON. The session goes:
//!
//! ```text
//!   connect ──► greeting {"QMP":{"version":…}} ──► {"execute":"qmp_capabilities"}
//!                                                        │ {"return":{}}
//!                                                        ▼
//!                  ┌──────────── command mode ─────────────┐
//!   execute(cmd) ──► {"execute":N,"arguments":A,"id":k} ──►│ QEMU
//!   oneshot k    ◄── {"return":R,"id":k} | {"error":…,"id":k}
//!   events tx    ◄── {"event":E,"data":D,"timestamp":…}     │
//!                  └────────────────────────────────────────┘
//! ```
//!
//! One reader task owns the read half: it routes replies to the waiting caller
//! by `id` and broadcasts events. Writers share the write half behind a mutex.
//! Every command has a timeout; a reply that never comes is a typed
//! [`QmpError::Timeout`], a QEMU refusal is [`QmpError::Qemu`] with QEMU's error
//! class and description, and a closed socket fails every waiting command with
//! [`QmpError::Disconnected`].
//!
//! The commands are a handful of our own typed structs rather than the
//! `qapi-qmp` crate: its generated schema is large to compile on the build
//! machines, and its strict enums were generated from an older QEMU than the
//! 10.x we run (a new migration status would fail to decode). Our types keep
//! unknown enum values as `Other(String)`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot};

pub use commands::*;

#[path = "qmp_commands.rs"]
mod commands;

/// How long a command waits for its reply unless told otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A line from QEMU longer than this is a protocol violation (QMP replies we
/// use are a few KiB; this bounds memory on a corrupt stream).
const MAX_LINE: usize = 4 << 20;

/// Failure of a QMP operation.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("connecting to QMP socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket I/O")]
    Io(#[from] std::io::Error),
    /// QEMU did not greet as QMP does.
    #[error("unexpected QMP greeting: {0}")]
    Greeting(String),
    /// No reply within the command's timeout.
    #[error("QMP command {command} got no reply within {after:?}")]
    Timeout {
        /// Command name.
        command: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// QEMU refused the command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Qemu {
        /// Command name.
        command: String,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The connection closed before the reply arrived.
    #[error("QMP connection closed while waiting for {command}")]
    Disconnected {
        /// Command name.
        command: String,
    },
    /// The reply did not have the expected shape.
    #[error("decoding the reply of QMP command {command}")]
    Decode {
        /// Command name.
        command: String,
        /// Cause.
        source: serde_json::Error,
    },
}

impl QmpError {
    /// A stable reason string for conditions and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            QmpError::Connect { .. } => "QmpConnectFailed",
            QmpError::Io(_) => "QmpIoError",
            QmpError::Greeting(_) => "QmpBadGreeting",
            QmpError::Timeout { .. } => "QmpTimeout",
            QmpError::Qemu { .. } => "QemuRefused",
            QmpError::Disconnected { .. } => "QmpDisconnected",
            QmpError::Decode { .. } => "QmpBadReply",
        }
    }

    /// Whether retrying the same command may help.
    pub fn retryable(&self) -> bool {
        matches!(self, QmpError::Timeout { .. } | QmpError::Connect { .. })
    }
}

/// A QMP command: its wire name, arguments (the struct itself) and reply type.
pub trait Command: Serialize {
    /// The name QEMU knows the command by.
    const NAME: &'static str;
    /// The decoded `return` value.
    type Response: DeserializeOwned;
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// Event name, e.g. `STOP`, `RESUME`, `MIGRATION`, `SHUTDOWN`.
    #[serde(rename = "event")]
    pub name: String,
    /// Event payload (`{}` when the event has none).
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it.
    pub timestamp: EventTimestamp,
}

/// QEMU's event timestamp (wall clock, seconds and microseconds).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct EventTimestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Event {
    /// When QEMU emitted it (the host's wall clock).
    pub fn time(&self) -> std::time::SystemTime {
        crate::agent::relay::clock::from_micros(
            self.timestamp
                .seconds
                .saturating_mul(1_000_000)
                .saturating_add(self.timestamp.microseconds),
        )
    }

    /// The migration status carried by a `MIGRATION` event.
    pub fn migration_status(&self) -> Option<MigrationStatus> {
        if self.name != "MIGRATION" {
            return None;
        }
        serde_json::from_value(self.data.get("status")?.clone()).ok()
    }
}

type Pending =
    Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// A connected QMP session. Cheap to share behind an `Arc`.
pub struct Qmp {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    closed: Arc<tokio::sync::watch::Sender<bool>>,
    greeting: Greeting,
    path: PathBuf,
    reader: tokio::task::JoinHandle<()>,
}

/// QEMU's greeting.
#[derive(Debug, Clone, Deserialize)]
pub struct Greeting {
    /// QEMU's version.
    pub version: VersionInfo,
    /// Capabilities QEMU offers (we enable none).
    #[serde(default)]
    pub capabilities: Vec<Value>,
}

#[derive(Deserialize)]
struct GreetingLine {
    #[serde(rename = "QMP")]
    qmp: Greeting,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::with_capacity(64 * 1024, read);
        let greeting = tokio::time::timeout(DEFAULT_COMMAND_TIMEOUT, read_greeting(&mut reader))
            .await
            .map_err(|_| QmpError::Greeting("no greeting within the timeout".into()))??;
        let (events, _) = broadcast::channel(256);
        let (closed, _) = tokio::sync::watch::channel(false);
        let closed = Arc::new(closed);
        let pending: Pending = Arc::default();
        let reader = tokio::spawn(read_loop(
            reader,
            pending.clone(),
            events.clone(),
            closed.clone(),
        ));
        let qmp = Qmp {
            writer: Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            events,
            closed,
            greeting,
            path: path.to_owned(),
            reader,
        };
        qmp.execute(&QmpCapabilities {}).await?;
        Ok(qmp)
    }

    /// Connects, retrying until the socket accepts or `within` passes (QEMU
    /// creates its QMP socket a little after the process starts).
    pub async fn connect_retry(path: &Path, within: Duration) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match Qmp::connect(path).await {
                Ok(q) => return Ok(q),
                Err(e @ QmpError::Connect { .. }) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// QEMU's greeting (its version).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The socket this session is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A receiver of every event from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether the connection is closed (QEMU exited or closed the socket).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Waits until the connection closes — for QEMU, that it exited.
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        // An error means the sender is gone, which also means closed.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Runs a command with the default timeout.
    pub async fn execute<C: Command>(&self, cmd: &C) -> Result<C::Response, QmpError> {
        self.execute_timeout(cmd, DEFAULT_COMMAND_TIMEOUT).await
    }

    /// Runs a command, waiting at most `timeout` for its reply.
    pub async fn execute_timeout<C: Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Response, QmpError> {
        let value = self.execute_raw(C::NAME, cmd, timeout).await?;
        serde_json::from_value(value).map_err(|source| QmpError::Decode {
            command: C::NAME.to_string(),
            source,
        })
    }

    async fn execute_raw(
        &self,
        name: &str,
        args: &impl Serialize,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let args = serde_json::to_value(args).map_err(|source| QmpError::Decode {
            command: name.to_string(),
            source,
        })?;
        let mut msg = serde_json::json!({ "execute": name, "id": id });
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if self.is_closed() {
            lock(&self.pending).remove(&id);
            return Err(QmpError::Disconnected {
                command: name.into(),
            });
        }
        let written = {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await
        };
        if let Err(e) = written {
            lock(&self.pending).remove(&id);
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    QmpError::Disconnected {
                        command: name.into(),
                    }
                }
                _ => QmpError::Io(e),
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(QmpError::Timeout {
                    command: name.into(),
                    after: timeout,
                })
            }
            Ok(Err(_)) => Err(QmpError::Disconnected {
                command: name.into(),
            }),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Qemu {
                command: name.into(),
                class,
                desc,
            }),
            Ok(Ok(Ok(v))) => Ok(v),
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

/// Events QEMU may write ahead of its greeting before the greeting counts as
/// missing.
const MAX_EVENTS_BEFORE_GREETING: usize = 64;

/// Reads QEMU's greeting, passing over events written ahead of it.
///
/// QEMU can put an event on a connection it has just accepted before the
/// greeting: its monitor accepts in its own thread while the main thread
/// emits events (a `RESUME` as a fresh VM starts), and a monitor that has
/// not greeted yet is not marked as negotiating. Such an event is from
/// before the session began, so nobody is subscribed to it; it is skipped.
async fn read_greeting<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Greeting, QmpError> {
    let mut line = String::new();
    for _ in 0..=MAX_EVENTS_BEFORE_GREETING {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(QmpError::Greeting(
                "connection closed before the greeting".into(),
            ));
        }
        let value: Value = serde_json::from_str(&line)
            .map_err(|e| QmpError::Greeting(format!("{e}: {}", line.trim())))?;
        if value.get("event").is_some() && value.get("QMP").is_none() {
            tracing::debug!(
                line = line.trim(),
                "QMP event ahead of the greeting, skipped"
            );
            continue;
        }
        let greeting: GreetingLine = serde_json::from_value(value)
            .map_err(|e| QmpError::Greeting(format!("{e}: {}", line.trim())))?;
        return Ok(greeting.qmp);
    }
    Err(QmpError::Greeting(format!(
        "more than {MAX_EVENTS_BEFORE_GREETING} events and no greeting"
    )))
}

async fn read_loop(
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    closed: Arc<tokio::sync::watch::Sender<bool>>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) if line.len() > MAX_LINE => {
                tracing::warn!(len = line.len(), "oversized QMP line, closing the session");
                break;
            }
            Ok(_) => {}
        }
        let Ok(mut value) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(line = line.trim(), "undecodable QMP line");
            continue;
        };
        if value.get("event").is_some() {
            match serde_json::from_value::<Event>(value) {
                // No subscriber is not an error: events are optional.
                Ok(ev) => drop(events.send(ev)),
                Err(e) => tracing::warn!(error = %e, "malformed QMP event"),
            }
            continue;
        }
        let Some(id) = value.get("id").and_then(Value::as_u64) else {
            tracing::debug!(line = line.trim(), "QMP reply without our id");
            continue;
        };
        let Some(tx) = lock(&pending).remove(&id) else {
            continue; // the caller timed out and left
        };
        let result = if let Some(err) = value.get_mut("error") {
            match serde_json::from_value::<ErrorBody>(err.take()) {
                Ok(e) => Err((e.class, e.desc)),
                Err(e) => Err(("Unknown".into(), e.to_string())),
            }
        } else {
            Ok(value
                .get_mut("return")
                .map(Value::take)
                .unwrap_or(Value::Null))
        };
        drop(tx.send(result));
    }
    closed.send_replace(true);
    // Dropping the senders wakes every waiting caller with Disconnected.
    lock(&pending).clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
    const RESUME: &str =
        r#"{"timestamp": {"seconds": 1796684058, "microseconds": 758192}, "event": "RESUME"}"#;

    /// A QMP server that writes `before` lines, then answers every command
    /// with an empty return carrying its id.
    async fn serve(before: Vec<String>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            for line in before {
                write
                    .write_all(format!("{line}\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let cmd: Value = serde_json::from_str(&line).unwrap();
                let reply = serde_json::json!({"return": {}, "id": cmd["id"]});
                write
                    .write_all(format!("{reply}\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        (dir, path)
    }

    /// Connects to `path`, which must refuse; checks the refusal says `why`.
    async fn assert_refused(path: &Path, why: &str) {
        match Qmp::connect(path).await {
            Ok(_) => panic!("the session was accepted"),
            Err(QmpError::Greeting(m)) => assert!(m.contains(why), "{m}"),
            Err(e) => panic!("refused for another reason: {e}"),
        }
    }

    #[tokio::test]
    async fn events_ahead_of_the_greeting_are_passed_over() {
        let (_dir, path) = serve(vec![RESUME.into(), RESUME.into(), GREETING.into()]).await;
        let qmp = Qmp::connect(&path).await.expect("connects past the events");
        assert_eq!(qmp.greeting().version.qemu.major, 7);
        assert_eq!(qmp.greeting().capabilities.len(), 1);
    }

    #[tokio::test]
    async fn a_line_that_is_neither_event_nor_greeting_is_refused() {
        let (_dir, path) = serve(vec![r#"{"return": {}}"#.into(), GREETING.into()]).await;
        assert_refused(&path, "missing field `QMP`").await;
    }

    #[tokio::test]
    async fn endless_events_without_a_greeting_are_refused() {
        let lines = vec![RESUME.to_string(); MAX_EVENTS_BEFORE_GREETING + 1];
        let (_dir, path) = serve(lines).await;
        assert_refused(&path, "no greeting").await;
    }

    #[tokio::test]
    async fn a_close_before_the_greeting_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream
                .write_all(format!("{RESUME}\r\n").as_bytes())
                .await
                .unwrap();
        });
        assert_refused(&path, "closed before").await;
    }
}
