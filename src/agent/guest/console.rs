//! The async client of the memtest guest's serial console (see the protocol
//! in [`super`]).
//!
//! Every request writes one command line and then reads lines until the reply
//! with the command's tag arrives; other lines (boot noise, answers to pings
//! sent while the guest was still filling) are skipped. A request that times
//! out leaves a reply in flight, so the console marks itself out of step and
//! resynchronises before the next request with a `ping <nonce>`: the guest
//! answers in order, so everything before `PONG <nonce>` is stale.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, sleep, timeout_at};

use super::protocol::{
    self, DirtyRate, GuestStatus, MAX_LINE, PROTOCOL_VERSION, ParseError, VerifyReport,
};

/// How long an ordinary command may take to be answered.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// `verify` reads every page; under TCG on a loaded 2-core machine a 256 MiB
/// guest takes a few seconds, so allow far more.
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `wait_ready` pings a guest that is still booting or filling.
const READY_PING_INTERVAL: Duration = Duration::from_millis(500);
/// How often `connect_timeout` retries while QEMU has not created the socket.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// What went wrong talking to the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The serial socket could not be connected.
    #[error("cannot connect to the guest's serial socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The last connect error.
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("guest serial console I/O failed: {0}")]
    Io(#[from] io::Error),
    /// QEMU closed the socket (it exited, or another client took over).
    #[error("guest serial console closed")]
    Closed,
    /// No reply within the deadline.
    #[error("no reply to `{command}` from the guest within {timeout:?}")]
    Timeout {
        /// The command sent.
        command: String,
        /// The deadline it had.
        timeout: Duration,
    },
    /// A line longer than [`MAX_LINE`]: this is not the memtest guest.
    #[error("the guest sent a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// The guest answered `ERR ...`.
    #[error("the guest rejected `{command}`: {reason}")]
    Rejected {
        /// The command sent.
        command: String,
        /// The guest's explanation.
        reason: String,
    },
    /// The guest reported a CPU exception or a fatal boot error.
    #[error("the guest failed: {line}")]
    Crashed {
        /// The guest's `FAULT ...` or `FATAL ...` line.
        line: String,
    },
    /// A reply with the right tag that could not be parsed.
    #[error("malformed reply `{line}` from the guest: {source}")]
    Malformed {
        /// The reply line.
        line: String,
        /// What was wrong with it.
        source: ParseError,
    },
    /// The guest speaks another protocol version than this client.
    #[error("the guest speaks protocol version {found}, this client {PROTOCOL_VERSION}")]
    Version {
        /// The guest's version.
        found: u32,
    },
    /// A command that cannot be sent (e.g. an exit code above 127).
    #[error("invalid guest command: {0}")]
    InvalidCommand(String),
}

impl GuestError {
    /// A stable reason string for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            GuestError::Connect { .. } => "GuestConnectFailed",
            GuestError::Io(_) => "GuestConsoleIo",
            GuestError::Closed => "GuestConsoleClosed",
            GuestError::Timeout { .. } => "GuestTimeout",
            GuestError::LineTooLong => "GuestLineTooLong",
            GuestError::Rejected { .. } => "GuestRejected",
            GuestError::Crashed { .. } => "GuestCrashed",
            GuestError::Malformed { .. } => "GuestMalformedReply",
            GuestError::Version { .. } => "GuestProtocolVersion",
            GuestError::InvalidCommand(_) => "GuestInvalidCommand",
        }
    }

    /// Whether trying again may help (the guest may still be busy).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            GuestError::Timeout { .. } | GuestError::Connect { .. }
        )
    }
}

/// A connection to the memtest guest's COM1, through QEMU's unix socket
/// chardev. One client at a time: QEMU serves a single connection.
#[derive(Debug)]
pub struct GuestConsole {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Bytes of a line not yet terminated; kept across cancelled reads.
    partial: Vec<u8>,
    /// Skipping the rest of an over-long line.
    discarding: bool,
    timeout: Duration,
    verify_timeout: Duration,
    nonce: u64,
    out_of_step: bool,
}

impl GuestConsole {
    /// Connects to the serial socket once.
    pub async fn connect(path: &Path) -> Result<Self, GuestError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| GuestError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let mut console = Self::from_stream(stream);
        // The guest may hold part of a line from an earlier connection, or
        // answers nobody read: end that line, and have the first command
        // resynchronise past whatever it draws.
        console.writer.write_all(b"\n").await?;
        console.out_of_step = true;
        Ok(console)
    }

    /// Connects, retrying while QEMU has not yet created or opened the socket.
    pub async fn connect_timeout(path: &Path, timeout: Duration) -> Result<Self, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::connect(path).await {
                Ok(console) => return Ok(console),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => sleep(CONNECT_RETRY).await,
            }
        }
    }

    fn from_stream(stream: UnixStream) -> Self {
        let (reader, writer) = stream.into_split();
        GuestConsole {
            reader: BufReader::new(reader),
            writer,
            partial: Vec::new(),
            discarding: false,
            timeout: DEFAULT_TIMEOUT,
            verify_timeout: DEFAULT_VERIFY_TIMEOUT,
            nonce: 0,
            out_of_step: false,
        }
    }

    /// Sets the deadlines for ordinary commands and for `verify`.
    pub fn with_timeouts(mut self, command: Duration, verify: Duration) -> Self {
        self.timeout = command;
        self.verify_timeout = verify;
        self
    }

    /// Waits until the guest has booted and filled its memory, then returns
    /// its status. Pings until answered: commands are only read after the
    /// fill, and the `READY` line may have gone out before we connected.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<GuestStatus, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.nonce += 1;
            let token = format!("ready-{}", self.nonce);
            self.send(&format!("ping {token}")).await?;
            let attempt = (Instant::now() + READY_PING_INTERVAL).min(deadline);
            match timeout_at(attempt, self.read_ready()).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => return Err(e),
                Err(_) if Instant::now() >= deadline => {
                    return Err(GuestError::Timeout {
                        command: "ping (wait for ready)".to_owned(),
                        timeout,
                    });
                }
                Err(_) => {}
            }
        }
        // Earlier pings are still queued in the guest; skip their answers.
        self.out_of_step = true;
        let status = self.status().await?;
        if status.version != PROTOCOL_VERSION {
            return Err(GuestError::Version {
                found: status.version,
            });
        }
        Ok(status)
    }

    /// Reads until any `PONG ready-*` or `READY` line.
    async fn read_ready(&mut self) -> Result<(), GuestError> {
        loop {
            let line = self.read_line().await?;
            crashed(&line)?;
            if line.starts_with("READY")
                || protocol::tagged(&line, "PONG").is_some_and(|t| t.starts_with("ready-"))
            {
                return Ok(());
            }
        }
    }

    /// Asks the guest for its status.
    pub async fn status(&mut self) -> Result<GuestStatus, GuestError> {
        let (line, fields) = self.request("status", "STATUS", self.timeout).await?;
        protocol::parse_status(&fields).map_err(|source| GuestError::Malformed { line, source })
    }

    /// Sets the dirtying rate (`0` or [`DirtyRate::Idle`] stops it) and
    /// returns the rate the guest now applies.
    pub async fn set_rate(&mut self, rate: impl Into<DirtyRate>) -> Result<DirtyRate, GuestError> {
        let command = format!("rate {}", rate.into());
        let (line, fields) = self.request(&command, "RATE", self.timeout).await?;
        protocol::parse_rate_ok(&fields).map_err(|source| GuestError::Malformed { line, source })
    }

    /// Has the guest check every page against its generation table.
    pub async fn verify(&mut self) -> Result<VerifyReport, GuestError> {
        let (line, fields) = self
            .request("verify", "VERIFY", self.verify_timeout)
            .await?;
        protocol::parse_verify(&fields).map_err(|source| GuestError::Malformed { line, source })
    }

    /// Deliberately corrupts one page (the middle one when `page` is `None`)
    /// without updating the table, so that `verify` must fail; the dirtier
    /// leaves that page alone afterwards. Returns the page corrupted.
    pub async fn corrupt(&mut self, page: Option<u32>) -> Result<u32, GuestError> {
        let command = page.map_or_else(|| "corrupt".to_owned(), |p| format!("corrupt {p}"));
        let (line, fields) = self.request(&command, "CORRUPT", self.timeout).await?;
        protocol::parse_corrupt_ok(&fields).map_err(|source| GuestError::Malformed { line, source })
    }

    /// Makes QEMU exit through `isa-debug-exit`; its exit status is then
    /// [`super::qemu_exit_status`]`(code)`. Returns once the guest confirmed.
    pub async fn exit(&mut self, code: u8) -> Result<(), GuestError> {
        if code > 127 {
            return Err(GuestError::InvalidCommand(format!(
                "exit code {code} is above 127"
            )));
        }
        match self
            .request(&format!("exit {code}"), "EXIT", self.timeout)
            .await
        {
            // QEMU may exit before its last line reaches us: that is success.
            Ok(_) | Err(GuestError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Makes the guest take a CPU exception (`ud2`), which it reports before
    /// QEMU exits with status 253: proves faults are reported. Returns the
    /// guest's `FAULT` line as [`GuestError::Crashed`]; anything else is
    /// an error too.
    pub async fn fault(&mut self) -> Result<GuestError, GuestError> {
        match self.request("fault", "FAULT", self.timeout).await {
            Err(crash @ GuestError::Crashed { .. }) => Ok(crash),
            Err(e) => Err(e),
            Ok((line, _)) => Ok(GuestError::Crashed { line }),
        }
    }

    /// Round-trips a `ping`; useful to check the guest is alive.
    pub async fn ping(&mut self) -> Result<(), GuestError> {
        self.nonce += 1;
        let command = format!("ping {}", self.nonce);
        self.request(&command, "PONG", self.timeout)
            .await
            .map(|_| ())
    }

    /// Sends `command` and returns the reply line tagged `tag` and its fields.
    async fn request(
        &mut self,
        command: &str,
        tag: &str,
        timeout: Duration,
    ) -> Result<(String, String), GuestError> {
        let timed_out = || GuestError::Timeout {
            command: command.to_owned(),
            timeout,
        };
        if self.out_of_step {
            let resync_deadline = Instant::now() + self.timeout;
            timeout_at(resync_deadline, self.resync())
                .await
                .map_err(|_| GuestError::Timeout {
                    command: "ping (resynchronise)".to_owned(),
                    timeout: self.timeout,
                })??;
        }
        let deadline = Instant::now() + timeout;
        let expect_nonce = (tag == "PONG").then(|| command.trim_start_matches("ping ").to_owned());
        self.send(command).await?;
        let result = timeout_at(deadline, async {
            loop {
                let line = self.read_line().await?;
                crashed(&line)?;
                if let Some(reason) = protocol::tagged(&line, "ERR") {
                    return Err(GuestError::Rejected {
                        command: command.to_owned(),
                        reason: reason.to_owned(),
                    });
                }
                if let Some(fields) = protocol::tagged(&line, tag)
                    && expect_nonce.as_deref().is_none_or(|n| n == fields)
                {
                    let fields = fields.to_owned();
                    return Ok((line, fields));
                }
                tracing::debug!(%line, %command, "skipping guest line");
            }
        })
        .await;
        match result {
            Ok(Err(e @ (GuestError::LineTooLong | GuestError::Io(_)))) => {
                self.out_of_step = true;
                Err(e)
            }
            Ok(reply) => reply,
            Err(_) => {
                self.out_of_step = true;
                Err(timed_out())
            }
        }
    }

    /// Drains everything up to the answer of a fresh `ping <nonce>`.
    async fn resync(&mut self) -> Result<(), GuestError> {
        self.nonce += 1;
        let token = format!("sync-{}", self.nonce);
        self.send(&format!("ping {token}")).await?;
        loop {
            let line = self.read_line().await?;
            crashed(&line)?;
            if protocol::tagged(&line, "PONG") == Some(token.as_str()) {
                self.out_of_step = false;
                return Ok(());
            }
        }
    }

    async fn send(&mut self, command: &str) -> Result<(), GuestError> {
        if command.len() > 80 || command.contains(['\r', '\n']) {
            return Err(GuestError::InvalidCommand(command.to_owned()));
        }
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        Ok(())
    }

    /// Reads one non-empty line, at most [`MAX_LINE`] bytes. Cancel-safe:
    /// a partial line stays in `self.partial`.
    async fn read_line(&mut self) -> Result<String, GuestError> {
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                return Err(GuestError::Closed);
            }
            let (take, complete) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if self.discarding {
                self.reader.consume(take);
                self.discarding = !complete;
                continue;
            }
            if self.partial.len() + take > MAX_LINE + 1 {
                self.partial.clear();
                self.reader.consume(take);
                self.discarding = !complete;
                return Err(GuestError::LineTooLong);
            }
            self.partial.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            if complete {
                let line = String::from_utf8_lossy(&self.partial).trim().to_owned();
                self.partial.clear();
                if !line.is_empty() {
                    return Ok(line);
                }
            }
        }
    }
}

/// Fails on the guest's `FAULT` and `FATAL` lines.
fn crashed(line: &str) -> Result<(), GuestError> {
    if protocol::tagged(line, "FAULT").is_some() || protocol::tagged(line, "FATAL").is_some() {
        return Err(GuestError::Crashed {
            line: line.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::guest::VerifyReport;

    /// A scripted stand-in for the guest on the other end of a socket pair:
    /// answers each command line in order, after an optional delay.
    fn fake_guest(
        answer: impl Fn(&str, usize) -> (Duration, String) + Send + 'static,
    ) -> GuestConsole {
        let (ours, theirs) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let (reader, mut writer) = theirs.into_split();
            let mut lines = BufReader::new(reader).lines();
            let mut count = 0;
            while let Ok(Some(line)) = lines.next_line().await {
                count += 1;
                let (delay, reply) = answer(&line, count);
                sleep(delay).await;
                if writer.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        GuestConsole::from_stream(ours)
            .with_timeouts(Duration::from_secs(5), Duration::from_millis(200))
    }

    const STATUS: &str = "STATUS pages=2 gen=1 writes=0 rate=0 dirty_kib_s=0 ticks=5 fill_ms=1";

    #[tokio::test]
    async fn ready_skips_boot_noise_and_stale_pongs() {
        let mut console = fake_guest(|line, _| match line.split_once(' ') {
            Some(("ping", token)) => (
                Duration::ZERO,
                format!("\x1b[2J SeaBIOS noise\r\n\r\nPONG {token}\r\n"),
            ),
            _ if line == "status" => (Duration::ZERO, format!("{STATUS} version=1\r\n")),
            _ => (Duration::ZERO, "ERR unknown command\r\n".to_owned()),
        });
        let status = console.wait_ready(Duration::from_secs(5)).await.unwrap();
        assert_eq!((status.pages, status.version), (2, PROTOCOL_VERSION));
        console.ping().await.unwrap();
    }

    #[tokio::test]
    async fn a_late_reply_after_a_timeout_is_not_taken_for_the_next() {
        let mut console = fake_guest(|line, n| match line.split_once(' ') {
            Some(("ping", token)) => (Duration::ZERO, format!("PONG {token}\r\n")),
            // The first verify answers after the client gave up, and badly.
            _ if n == 1 => (
                Duration::from_millis(400),
                "VERIFY BAD first=1 count=1 pages=2 table=ok\r\n".to_owned(),
            ),
            _ => (Duration::ZERO, "VERIFY OK pages=2 writes=0\r\n".to_owned()),
        });
        let first = console.verify().await.unwrap_err();
        assert!(matches!(first, GuestError::Timeout { .. }), "{first}");
        assert!(first.is_retryable());
        let second = console.verify().await.unwrap();
        assert_eq!(
            second,
            VerifyReport::Intact {
                pages: 2,
                writes: 0
            }
        );
    }

    #[tokio::test]
    async fn errors_faults_and_oversized_lines_are_typed() {
        let mut console = fake_guest(|line, _| match line {
            _ if line.starts_with("ping ") => (Duration::ZERO, format!("PONG {}\r\n", &line[5..])),
            "rate 5" => (Duration::ZERO, "ERR rate wants MiB/s\r\n".to_owned()),
            "status" => (Duration::ZERO, format!("{}\n", "x".repeat(MAX_LINE + 10))),
            "verify" => (
                Duration::ZERO,
                "FAULT vector=13 error=0 eip=0x00100000\r\n".to_owned(),
            ),
            _ => (Duration::ZERO, "CORRUPT OK page=x\r\n".to_owned()),
        });
        let rejected = console.set_rate(5).await.unwrap_err();
        assert_eq!(rejected.reason(), "GuestRejected");
        assert!(
            rejected.to_string().contains("rate wants MiB/s"),
            "{rejected}"
        );
        assert!(matches!(
            console.status().await,
            Err(GuestError::LineTooLong)
        ));
        assert!(matches!(
            console.verify().await,
            Err(GuestError::Crashed { .. })
        ));
        let malformed = console.corrupt(None).await.unwrap_err();
        assert_eq!(malformed.reason(), "GuestMalformedReply", "{malformed}");
    }
}
