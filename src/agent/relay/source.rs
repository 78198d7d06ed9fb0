//! The source half: a unix socket QEMU migrates into, each accepted
//! connection carried to the target agent.
//!
//! ```text
//!  QEMU ──migrate unix:<sock>──► accept #i ──TCP connect──► TLS (server name = target host)
//!                                             ──Hello{migration, source host, channel i}──►
//!                                             ◄──Accept{target clock} | Refuse{reason}──
//!                                   Accept: pump both ways until EOF / error / cancel
//!                                   Refuse / error: close QEMU's connection → QEMU fails the migration
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::meter::{RateLimiter, RelayCounters};
use super::pump::pump;
use super::records::{self, REKEY_RECORDS, Records, pump_source};
use super::splice::pump_plain;
use super::wire::{self, AcceptInfo, Control, Hello, Reply, Role};
use super::{ChannelReport, ClientTransport, ClockOffset, MigrationRef, RelayError};

/// How long connecting and the handshake to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the source relay of one migration needs.
#[derive(Debug, Clone)]
pub struct SourceRelayConfig {
    /// The migration.
    pub migration: MigrationRef,
    /// This host's name (as in its certificate).
    pub source_host: String,
    /// The target host's name (checked against its certificate).
    pub target_host: String,
    /// The target agent's relay address (its migration network).
    pub target_addr: SocketAddr,
    /// The unix socket QEMU migrates into.
    pub socket_path: PathBuf,
    /// TLS (default) or plain (benchmarks only).
    pub transport: ClientTransport,
    /// Bandwidth limit for the whole migration, bytes/s; `None`: unlimited.
    pub bandwidth: Option<u64>,
}

/// A running source relay. Dropping it cancels every channel.
#[derive(Debug)]
pub struct SourceRelay {
    socket_path: PathBuf,
    counters: Arc<RelayCounters>,
    limiter: Arc<RateLimiter>,
    cancel: CancellationToken,
    reports: Arc<Mutex<Vec<ChannelReport>>>,
    clock: Arc<Mutex<Option<ClockOffset>>>,
    control: ControlSlot,
    accept_task: tokio::task::JoinHandle<()>,
}

impl SourceRelay {
    /// Binds the unix socket and starts accepting QEMU's connections.
    pub async fn start(cfg: SourceRelayConfig) -> Result<SourceRelay, RelayError> {
        // A stale socket from a crashed run would make bind fail.
        let _ = std::fs::remove_file(&cfg.socket_path);
        let listener = UnixListener::bind(&cfg.socket_path).map_err(|source| RelayError::Bind {
            addr: cfg.socket_path.display().to_string(),
            source,
        })?;
        let counters = Arc::new(RelayCounters::default());
        let limiter = Arc::new(RateLimiter::new(cfg.bandwidth));
        let cancel = CancellationToken::new();
        let reports = Arc::new(Mutex::new(Vec::new()));
        let clock = Arc::new(Mutex::new(None));
        let control = ControlSlot::default();
        let accept_task = tokio::spawn(accept_loop(
            listener,
            Arc::new(cfg.clone()),
            Channels {
                counters: counters.clone(),
                limiter: limiter.clone(),
                cancel: cancel.clone(),
                reports: reports.clone(),
                clock: clock.clone(),
                control: control.clone(),
                control_asked: Arc::default(),
            },
        ));
        Ok(SourceRelay {
            socket_path: cfg.socket_path,
            counters,
            limiter,
            cancel,
            reports,
            clock,
            control,
            accept_task,
        })
    }

    /// The socket to give QEMU (`migrate uri=unix:<this>`).
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The migration's byte counters on this side.
    pub fn counters(&self) -> &Arc<RelayCounters> {
        &self.counters
    }

    /// The migration's bandwidth limiter (adjustable while running).
    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }

    /// How each finished channel ended, in order of completion.
    pub fn reports(&self) -> Vec<ChannelReport> {
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The first channel failure, if any (e.g. the target's refusal).
    pub fn first_failure(&self) -> Option<ChannelReport> {
        self.reports().into_iter().find(|r| r.error.is_some())
    }

    /// The target host's clock against this host's, from the handshake of
    /// the channel with the shortest round trip so far (`None` before the
    /// first channel, or from a target that sends no clock).
    pub fn peer_clock(&self) -> Option<ClockOffset> {
        *self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the target that the source's guest stopped for the switchover
    /// at `at` (so it can announce the guest on its side at once). `false`
    /// when the migration has no control channel: a target of an earlier
    /// release, one with nothing to announce, or one not open yet.
    pub async fn source_stopped(&self, at: SystemTime) -> Result<bool, RelayError> {
        let mut slot = self.control.lock().await;
        let Some(ControlChannel(stream)) = slot.as_mut() else {
            return Ok(false);
        };
        let message = Control::SourceStopped {
            at_us: super::clock::micros_since_epoch(at),
        };
        let sent = tokio::time::timeout(CONNECT_TIMEOUT, wire::write_control(stream, &message))
            .await
            .map_err(|_| {
                RelayError::Handshake("the control channel did not take the message".into())
            })
            .and_then(|r| r.map_err(|e| RelayError::Handshake(e.to_string())));
        if sent.is_err() {
            // A broken control channel is not used again.
            *slot = None;
        }
        sent.map(|()| true)
    }

    /// Closes every channel and stops accepting.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

impl Drop for SourceRelay {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.accept_task.abort();
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

/// What the channels of one migration share.
#[derive(Clone)]
struct Channels {
    counters: Arc<RelayCounters>,
    limiter: Arc<RateLimiter>,
    cancel: CancellationToken,
    reports: Arc<Mutex<Vec<ChannelReport>>>,
    clock: Arc<Mutex<Option<ClockOffset>>>,
    /// The control channel, once open.
    control: ControlSlot,
    /// Whether it has been asked for (once per migration).
    control_asked: Arc<AtomicBool>,
}

/// The migration's control channel to the target, if it has one.
type ControlSlot = Arc<tokio::sync::Mutex<Option<ControlChannel>>>;

/// An open control channel.
struct ControlChannel(Box<dyn Stream>);

impl std::fmt::Debug for ControlChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlChannel")
    }
}

async fn accept_loop(listener: UnixListener, cfg: Arc<SourceRelayConfig>, shared: Channels) {
    let cancel = shared.cancel.clone();
    let mut channel = 0u32;
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = cancel.cancelled() => return,
        };
        let conn = match conn {
            Ok((c, _)) => c,
            Err(e) => {
                tracing::warn!(error = %e, "source relay accept failed");
                continue;
            }
        };
        let index = channel;
        channel += 1;
        let (cfg, shared) = (cfg.clone(), shared.clone());
        tokio::spawn(async move {
            let r = run_channel(conn, &cfg, index, &shared).await;
            if let Err(e) = &r {
                tracing::warn!(
                    migration = %cfg.migration, channel = index, reason = e.reason(), error = %e,
                    "source relay channel failed"
                );
            }
            shared
                .reports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(ChannelReport {
                    channel: index,
                    error: r.err().map(Arc::new),
                });
        });
    }
}

async fn run_channel(
    qemu: UnixStream,
    cfg: &SourceRelayConfig,
    index: u32,
    shared: &Channels,
) -> Result<(), RelayError> {
    let (counters, limiter, cancel) = (&shared.counters, &*shared.limiter, &shared.cancel);
    let mut remote = connect(cfg, cancel).await?;
    let hello = Hello {
        migration: cfg.migration.clone(),
        source_host: cfg.source_host.clone(),
        channel: index,
        role: Role::Stream,
        records: remote.offers_records(&cfg.transport),
    };
    let (reply, info, offset) = handshake(&mut remote, &hello).await?;
    if let Some(offset) = offset {
        let mut best = shared.clock.lock().unwrap_or_else(|p| p.into_inner());
        if best.is_none_or(|b| offset.error_us <= b.error_us) {
            *best = Some(offset);
        }
    }
    if let Reply::Refuse { reason, message } = reply {
        return Err(RelayError::Refused { reason, message });
    }
    if info.control && !shared.control_asked.swap(true, Ordering::SeqCst) {
        let (cfg, shared) = (cfg.clone(), shared.clone());
        tokio::spawn(async move {
            match open_control(&cfg, &shared.cancel).await {
                Ok(c) => *shared.control.lock().await = Some(ControlChannel(c)),
                Err(e) => tracing::warn!(
                    migration = %cfg.migration, reason = e.reason(), error = %e,
                    "the target's control channel could not be opened; the switchover goes without it"
                ),
            }
        });
    }
    counters.channel_opened();
    let r = match remote {
        Remote::Tls(t) if info.records => {
            let (tcp, records) = Records::client(*t, REKEY_RECORDS)
                .map_err(|e| RelayError::Handshake(e.to_string()))?;
            pump_source(qemu, tcp, records, counters, Some(limiter), cancel).await
        }
        Remote::Tls(t) => pump(qemu, t, counters, Some(limiter), cancel).await,
        Remote::Plain(t) => pump_plain(qemu, t, counters, Some(limiter), cancel).await,
    };
    counters.channel_closed();
    r.map_err(RelayError::from)
}

/// Opens the migration's control channel (the target advertised one).
async fn open_control(
    cfg: &SourceRelayConfig,
    cancel: &CancellationToken,
) -> Result<Box<dyn Stream>, RelayError> {
    let hello = Hello {
        migration: cfg.migration.clone(),
        source_host: cfg.source_host.clone(),
        channel: 0,
        role: Role::Control,
        records: false,
    };
    let mut remote = connect(cfg, cancel).await?;
    let (reply, _, _) = handshake(&mut remote, &hello).await?;
    if let Reply::Refuse { reason, message } = reply {
        return Err(RelayError::Refused { reason, message });
    }
    Ok(match remote {
        Remote::Tls(t) => t,
        Remote::Plain(t) => Box::new(t),
    })
}

/// TCP, then TLS with the target host's name (or plain, benchmarks only).
async fn connect(
    cfg: &SourceRelayConfig,
    cancel: &CancellationToken,
) -> Result<Remote, RelayError> {
    let connect = async {
        let tcp = TcpStream::connect(cfg.target_addr)
            .await
            .map_err(|source| RelayError::Connect {
                addr: cfg.target_addr,
                source,
            })?;
        tune(&tcp);
        match &cfg.transport {
            ClientTransport::Tls(tls) | ClientTransport::TlsRustlsOnly(tls) => {
                let name = rustls_pki_types::ServerName::try_from(cfg.target_host.clone())
                    .map_err(|_| {
                        RelayError::Handshake(format!("bad target host {}", cfg.target_host))
                    })?;
                let mut stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, BufReader::with_capacity(TLS_READ_BUFFER, tcp))
                    .await
                    .map_err(RelayError::Tls)?;
                stream.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
                Ok(Remote::Tls(Box::new(stream)))
            }
            ClientTransport::InsecurePlain => Ok::<_, RelayError>(Remote::Plain(tcp)),
        }
    };
    tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => {
            r.map_err(|_| RelayError::Handshake("connecting to the target timed out".into()))?
        }
        _ = cancel.cancelled() => Err(RelayError::Cancelled),
    }
}

/// Sends the Hello and reads the reply, timing the exchange against the
/// target's clock.
async fn handshake(
    remote: &mut Remote,
    hello: &Hello,
) -> Result<(Reply, AcceptInfo, Option<ClockOffset>), RelayError> {
    let exchange = async {
        let s: &mut dyn Stream = match remote {
            Remote::Tls(t) => t.as_mut(),
            Remote::Plain(t) => t,
        };
        let sent = (SystemTime::now(), Instant::now());
        wire::write_hello(s, hello).await?;
        let (reply, info) = wire::read_reply_with(s).await?;
        let offset = info
            .clock_us
            .map(|us| ClockOffset::from_exchange(sent.0, sent.1.elapsed(), us));
        Ok::<_, wire::WireError>((reply, info, offset))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, exchange)
        .await
        .map_err(|_| RelayError::Handshake("the target did not answer the hello".into()))?
        .map_err(|e| RelayError::Handshake(e.to_string()))
}

enum Remote {
    Tls(Box<tokio_rustls::client::TlsStream<BufReader<TcpStream>>>),
    Plain(TcpStream),
}

impl Remote {
    /// Whether a stream on this connection offers Ferry's record layer:
    /// TLS 1.3 negotiated, and the transport not told to keep rustls.
    fn offers_records(&self, transport: &ClientTransport) -> bool {
        match self {
            Remote::Tls(t) => {
                matches!(transport, ClientTransport::Tls(_)) && records::available(t.get_ref().1)
            }
            Remote::Plain(_) => false,
        }
    }
}

/// Read buffer under rustls, which on its own reads 4 KiB per syscall.
pub(crate) const TLS_READ_BUFFER: usize = 256 << 10;
/// Encrypted records rustls may queue per write (its default is 64 KiB,
/// which splits every 1 MiB chunk into sixteen flushes).
pub(crate) const TLS_WRITE_BUFFER: usize = 4 << 20;

/// A bidirectional byte stream (TLS or plain TCP).
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Unsent bytes a relay socket holds before it stops taking more
/// (`TCP_NOTSENT_LOWAT`).
pub(crate) const TCP_UNSENT: u32 = 128 << 10;
/// A relay socket's receive buffer (`SO_RCVBUF`, which Linux doubles for
/// its bookkeeping and which ends its autotuning): a window of ~1 MiB.
pub(crate) const TCP_RECEIVE_BUFFER: usize = 1 << 20;

/// Socket options of a relay TCP connection.
///
/// No Nagle delay: the return path carries small latency-sensitive page
/// requests in post-copy.
///
/// Short queues: when QEMU stops the guest for the last pages, whatever the
/// sockets still hold of the stream must cross before the target can run
/// the guest, and QEMU's `downtime` does not see it (it ends when the
/// source has written its last byte). Left alone, Linux grows a receive
/// buffer up to `tcp_rmem`'s maximum (32 MiB here) and keeps up to 4 MiB
/// unsent on the sender: tens of milliseconds of stream at the rates of
/// this machine. A 1 MiB window still carries ~8 Gbit/s at a 1 ms round
/// trip and ~80 Gbit/s at 0.1 ms, a LAN's.
pub(crate) fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    if let Err(e) = sock.set_tcp_notsent_lowat(TCP_UNSENT) {
        tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set on a relay socket");
    }
    // SO_RCVBUFFORCE (the agent runs as root) is not capped by
    // `net.core.rmem_max`, which is 208 KiB on many hosts.
    let forced = nix::sys::socket::setsockopt(
        tcp,
        nix::sys::socket::sockopt::RcvBufForce,
        &TCP_RECEIVE_BUFFER,
    );
    if forced.is_err()
        && let Err(e) = sock.set_recv_buffer_size(TCP_RECEIVE_BUFFER)
    {
        tracing::debug!(error = %e, "SO_RCVBUF not set on a relay socket");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a relay connection keep short queues (the time from the
    /// source's last byte to the guest running depends on it).
    #[tokio::test]
    async fn relay_sockets_keep_short_queues() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        for tcp in [client.unwrap(), accepted.unwrap().0] {
            let before = socket2::SockRef::from(&tcp).recv_buffer_size().unwrap();
            tune(&tcp);
            let sock = socket2::SockRef::from(&tcp);
            assert!(tcp.nodelay().unwrap());
            assert_eq!(sock.tcp_notsent_lowat().unwrap(), TCP_UNSENT);
            // Linux doubles what it is given, and the buffer no longer grows.
            let after = sock.recv_buffer_size().unwrap();
            assert_eq!(after, 2 * TCP_RECEIVE_BUFFER, "was {before}");
        }
    }
}
