//! The target half: a TLS listener on the host's migration address that
//! delivers authorized streams to the target QEMU's incoming socket.
//!
//! ```text
//!  accept TCP ─► TLS handshake (client cert must chain to the cluster CA)
//!     │ fail: Refused(TlsHandshakeFailed), counted, nothing sent
//!     ▼
//!  peer host ← certificate URI SAN        read Hello (bounded, timed)
//!     │ claimed source ≠ certificate: Refuse(ClaimMismatch)
//!     ▼
//!  Authorizer::authorize(hello, peer) ── Err(refusal) ─► Refuse(reason), counted, logged
//!     │ Ok(Delivery)
//!     ▼
//!  connect Delivery.socket (QEMU migrate-incoming) ─ fail ─► Refuse(TargetNotReady)
//!     ▼
//!  Accept, then pump both ways (counters of that migration)
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::meter::RelayCounters;
use super::pump::pump;
use super::records::{self, REKEY_RECORDS, Records, pump_target};
use super::source::{Stream, TLS_READ_BUFFER, TLS_WRITE_BUFFER, tune};
use super::splice::pump_plain;
use super::wire::{self, AcceptInfo, Control, Hello, Reply, Role, WireError};
use super::{MigrationRef, RefusalReason, RelayError, ServerTransport};
use crate::agent::pki;

/// How long a peer may take for the TLS handshake and its Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an authorized stream goes, and the migration's accounting.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The target QEMU's incoming unix socket.
    pub socket: PathBuf,
    /// The migration's counters on the target side.
    pub counters: Arc<RelayCounters>,
    /// Cancelling it closes the migration's channels on the target side.
    pub cancel: CancellationToken,
    /// What to do when the source says its guest stopped for the
    /// switchover; with one, streams' Accepts advertise a control channel.
    pub on_source_stopped: Option<SourceStoppedHook>,
}

/// Called (on the relay's task, so it must not block) with the source's
/// stop time when the source's guest stopped for the switchover.
#[derive(Clone)]
pub struct SourceStoppedHook(Arc<dyn Fn(std::time::SystemTime) + Send + Sync>);

impl SourceStoppedHook {
    /// A hook running `f`.
    pub fn new(f: impl Fn(std::time::SystemTime) + Send + Sync + 'static) -> SourceStoppedHook {
        SourceStoppedHook(Arc::new(f))
    }
}

impl std::fmt::Debug for SourceStoppedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceStoppedHook")
    }
}

/// A refusal: reason from a closed set, and detail for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub reason: RefusalReason,
    /// Detail.
    pub message: String,
}

impl Refusal {
    /// A refusal with `reason` and `message`.
    pub fn new(reason: RefusalReason, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
        }
    }
}

/// Decides whether a peer may deliver a stream, and where it goes. The
/// agent implements it against the API (the Migration names its source and
/// target hosts); [`MigrationTable`] is the in-memory form the target agent
/// fills when it prepares a target.
pub trait Authorizer: Send + Sync + 'static {
    /// `peer_host` is the host named by the peer's verified certificate (in
    /// plain mode: the unauthenticated claim).
    fn authorize<'a>(
        &'a self,
        hello: &'a Hello,
        peer_host: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Delivery, Refusal>> + Send + 'a>>;
}

/// A migration the target expects.
#[derive(Debug, Clone)]
pub struct Expected {
    /// The migration.
    pub migration: MigrationRef,
    /// The only host allowed to send it.
    pub source_host: String,
    /// Where to deliver.
    pub delivery: Delivery,
}

/// The migrations this target expects, by UID, and refusals seen per UID.
#[derive(Debug, Default)]
pub struct MigrationTable {
    entries: Mutex<HashMap<String, Expected>>,
    refusals: Mutex<HashMap<String, Vec<Refusal>>>,
}

impl MigrationTable {
    /// Expects `migration` from `source_host`, delivered to `socket`;
    /// returns the delivery (counters, cancel) for the caller to keep.
    pub fn expect(&self, migration: MigrationRef, source_host: &str, socket: PathBuf) -> Delivery {
        let delivery = Delivery {
            socket,
            counters: Arc::default(),
            cancel: CancellationToken::new(),
            on_source_stopped: None,
        };
        let e = Expected {
            migration: migration.clone(),
            source_host: source_host.into(),
            delivery: delivery.clone(),
        };
        lock(&self.entries).insert(migration.uid.clone(), e);
        delivery
    }

    /// Runs `hook` when the source of an expected migration says its guest
    /// stopped for the switchover (over the control channel this makes the
    /// target advertise). `false` if the migration is not expected.
    pub fn on_source_stopped(&self, uid: &str, hook: SourceStoppedHook) -> bool {
        match lock(&self.entries).get_mut(uid) {
            Some(e) => {
                e.delivery.on_source_stopped = Some(hook);
                true
            }
            None => false,
        }
    }

    /// Stops expecting a migration and closes its channels.
    pub fn remove(&self, uid: &str) {
        if let Some(e) = lock(&self.entries).remove(uid) {
            e.delivery.cancel.cancel();
        }
    }

    /// Refusals recorded against a migration (for its status).
    pub fn refusals(&self, uid: &str) -> Vec<Refusal> {
        lock(&self.refusals).get(uid).cloned().unwrap_or_default()
    }

    fn refuse(&self, uid: &str, r: Refusal) -> Refusal {
        lock(&self.refusals)
            .entry(uid.into())
            .or_default()
            .push(r.clone());
        r
    }
}

impl Authorizer for MigrationTable {
    fn authorize<'a>(
        &'a self,
        hello: &'a Hello,
        peer_host: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Delivery, Refusal>> + Send + 'a>> {
        let uid = &hello.migration.uid;
        let r = match lock(&self.entries).get(uid).cloned() {
            None => Err(Refusal::new(
                RefusalReason::UnknownMigration,
                format!("no migration {} is expected on this host", hello.migration),
            )),
            Some(e) if e.migration != hello.migration => Err(self.refuse(
                uid,
                Refusal::new(
                    RefusalReason::MigrationMismatch,
                    format!(
                        "uid {uid} belongs to {}, not {}",
                        e.migration, hello.migration
                    ),
                ),
            )),
            Some(e) if e.source_host != peer_host => Err(self.refuse(
                uid,
                Refusal::new(
                    RefusalReason::WrongSourceHost,
                    format!(
                        "migration {} comes from host {}, not {peer_host}",
                        e.migration, e.source_host
                    ),
                ),
            )),
            Some(e) => Ok(e.delivery),
        };
        Box::pin(std::future::ready(r))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What happened to one incoming connection.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// Authorized and carried; `error` says how it ended if not cleanly.
    Carried {
        /// The Hello.
        hello: Hello,
        /// The authenticated peer.
        peer_host: String,
        /// How it ended.
        error: Option<Arc<RelayError>>,
    },
    /// Refused.
    Refused {
        /// The peer's address.
        peer_addr: SocketAddr,
        /// The authenticated peer host, if TLS got that far.
        peer_host: Option<String>,
        /// The Hello, if one was read.
        hello: Option<Hello>,
        /// Why.
        refusal: Refusal,
    },
}

/// Counters of the target relay as a whole.
#[derive(Debug, Default)]
pub struct TargetStats {
    refusals: Mutex<HashMap<RefusalReason, u64>>,
    accepted: std::sync::atomic::AtomicU64,
    records: std::sync::atomic::AtomicU64,
}

impl TargetStats {
    /// Refusals so far, by reason.
    pub fn refusals(&self) -> HashMap<RefusalReason, u64> {
        lock(&self.refusals).clone()
    }
    /// Total refusals.
    pub fn refused_total(&self) -> u64 {
        lock(&self.refusals).values().sum()
    }
    /// Channels accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Of those, streams carried on Ferry's record layer.
    pub fn on_records(&self) -> u64 {
        self.records.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The running target relay. Dropping it stops the listener and every
/// channel.
#[derive(Debug)]
pub struct TargetRelay {
    local_addr: SocketAddr,
    stats: Arc<TargetStats>,
    outcomes: broadcast::Sender<Incoming>,
    cancel: CancellationToken,
}

struct Shared {
    transport: ServerTransport,
    authorizer: Arc<dyn Authorizer>,
    stats: Arc<TargetStats>,
    outcomes: broadcast::Sender<Incoming>,
    cancel: CancellationToken,
}

impl TargetRelay {
    /// Listens on `addr` (the host's migration address).
    pub async fn bind(
        addr: SocketAddr,
        transport: ServerTransport,
        authorizer: Arc<dyn Authorizer>,
    ) -> Result<TargetRelay, RelayError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RelayError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        TargetRelay::serve(listener, transport, authorizer)
    }

    /// Serves on an already bound listener (e.g. one bound inside the
    /// migration network's namespace, or handed over by the service
    /// manager).
    pub fn from_std(
        listener: std::net::TcpListener,
        transport: ServerTransport,
        authorizer: Arc<dyn Authorizer>,
    ) -> Result<TargetRelay, RelayError> {
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let bind_err = |source| RelayError::Bind {
            addr: addr.clone(),
            source,
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = TcpListener::from_std(listener).map_err(bind_err)?;
        TargetRelay::serve(listener, transport, authorizer)
    }

    fn serve(
        listener: TcpListener,
        transport: ServerTransport,
        authorizer: Arc<dyn Authorizer>,
    ) -> Result<TargetRelay, RelayError> {
        let local_addr = listener.local_addr().map_err(|source| RelayError::Bind {
            addr: "relay listener".into(),
            source,
        })?;
        let (outcomes, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            transport,
            authorizer,
            stats: Arc::default(),
            outcomes: outcomes.clone(),
            cancel: CancellationToken::new(),
        });
        let relay = TargetRelay {
            local_addr,
            stats: shared.stats.clone(),
            outcomes,
            cancel: shared.cancel.clone(),
        };
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "target relay accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = shared.cancel.cancelled() => return,
                };
                tune(&tcp);
                tokio::spawn(handle(shared.clone(), tcp, peer));
            }
        });
        Ok(relay)
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
    /// Acceptance and refusal counters.
    pub fn stats(&self) -> &Arc<TargetStats> {
        &self.stats
    }
    /// Every connection's outcome from now on.
    pub fn outcomes(&self) -> broadcast::Receiver<Incoming> {
        self.outcomes.subscribe()
    }
    /// Stops the listener and closes every channel.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for TargetRelay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn handle(shared: Arc<Shared>, tcp: tokio::net::TcpStream, peer_addr: SocketAddr) {
    let refuse = |peer_host: Option<String>, hello: Option<Hello>, refusal: Refusal| {
        *lock(&shared.stats.refusals)
            .entry(refusal.reason)
            .or_default() += 1;
        tracing::warn!(
            %peer_addr, peer_host = peer_host.as_deref().unwrap_or("-"),
            migration = hello.as_ref().map(|h| h.migration.to_string()).unwrap_or_default(),
            reason = ?refusal.reason, message = %refusal.message,
            "relay refused a migration stream"
        );
        let _ = shared.outcomes.send(Incoming::Refused {
            peer_addr,
            peer_host,
            hello,
            refusal,
        });
    };
    // TLS: the certificate must chain to the cluster CA (rustls checks),
    // and then it names the peer host.
    let (mut conn, peer_host) = match &shared.transport {
        ServerTransport::Tls(cfg) => {
            let accept = tokio_rustls::TlsAcceptor::from(cfg.clone())
                .accept(BufReader::with_capacity(TLS_READ_BUFFER, tcp));
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(mut tls)) => match pki::peer_host(tls.get_ref().1) {
                    Ok(h) => {
                        tls.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
                        (Conn::Tls(Box::new(tls)), Some(h))
                    }
                    Err(e) => {
                        let r = Refusal::new(RefusalReason::TlsHandshakeFailed, e.to_string());
                        return refuse(None, None, r);
                    }
                },
                Ok(Err(e)) => {
                    let r = Refusal::new(RefusalReason::TlsHandshakeFailed, e.to_string());
                    return refuse(None, None, r);
                }
                Err(_) => {
                    let r = Refusal::new(RefusalReason::TlsHandshakeFailed, "handshake timed out");
                    return refuse(None, None, r);
                }
            }
        }
        ServerTransport::InsecurePlain => (Conn::Plain(tcp), None),
    };
    let stream = conn.io();
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::read_hello(stream)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let reason = match e {
                WireError::Version(_) => RefusalReason::UnsupportedVersion,
                _ => RefusalReason::BadHandshake,
            };
            let r = Refusal::new(reason, e.to_string());
            let _ = wire::write_reply(stream, &reply(&r)).await;
            return refuse(peer_host, None, r);
        }
        Err(_) => {
            return refuse(
                peer_host,
                None,
                Refusal::new(RefusalReason::BadHandshake, "no hello in time"),
            );
        }
    };
    // In plain mode the claim is all there is (benchmarks only).
    let peer = peer_host
        .clone()
        .unwrap_or_else(|| hello.source_host.clone());
    if peer != hello.source_host {
        let r = Refusal::new(
            RefusalReason::ClaimMismatch,
            format!(
                "peer claims to be {} but its certificate names {peer}",
                hello.source_host
            ),
        );
        let _ = wire::write_reply(stream, &reply(&r)).await;
        return refuse(peer_host, Some(hello), r);
    }
    let delivery = match shared.authorizer.authorize(&hello, &peer).await {
        Ok(d) => d,
        Err(r) => {
            let _ = wire::write_reply(stream, &reply(&r)).await;
            return refuse(peer_host, Some(hello), r);
        }
    };
    if hello.role == Role::Control {
        return control(&shared, conn, hello, peer, delivery).await;
    }
    let qemu = match UnixStream::connect(&delivery.socket).await {
        Ok(s) => s,
        Err(e) => {
            let r = Refusal::new(
                RefusalReason::TargetNotReady,
                format!("target QEMU socket {}: {e}", delivery.socket.display()),
            );
            let _ = wire::write_reply(stream, &reply(&r)).await;
            return refuse(peer_host, Some(hello), r);
        }
    };
    let info = AcceptInfo {
        records: hello.records && conn.takes_records(),
        ..accept_info(delivery.on_source_stopped.is_some())
    };
    let stream = conn.io();
    if let Err(e) = wire::write_reply_with(stream, &Reply::Accept, info).await {
        tracing::warn!(%peer_addr, error = %e, "relay could not send accept");
        return;
    }
    shared
        .stats
        .accepted
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if info.records {
        shared
            .stats
            .records
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!(migration = %hello.migration, channel = hello.channel, %peer, records = info.records, "relay channel accepted");
    delivery.counters.channel_opened();
    let cancel = CancellationToken::new();
    let r = tokio::select! {
        r = async {
            match conn {
                Conn::Tls(t) if info.records => match Records::server(*t, REKEY_RECORDS) {
                    Ok((tcp, records)) => {
                        pump_target(tcp, qemu, records, &delivery.counters, &cancel).await
                    }
                    Err(e) => Err(super::pump::PumpError::ReadUpstream(e)),
                },
                Conn::Tls(t) => pump(t, qemu, &delivery.counters, None, &cancel).await,
                Conn::Plain(t) => pump_plain(t, qemu, &delivery.counters, None, &cancel).await,
            }
        } => r,
        _ = delivery.cancel.cancelled() => Err(super::pump::PumpError::Cancelled),
        _ = shared.cancel.cancelled() => Err(super::pump::PumpError::Cancelled),
    };
    delivery.counters.channel_closed();
    let error = r.err().map(|e| Arc::new(RelayError::from(e)));
    let _ = shared.outcomes.send(Incoming::Carried {
        hello,
        peer_host: peer,
        error,
    });
}

/// An Accept's details: this host's clock now, and whether the migration
/// takes a control channel.
fn accept_info(control: bool) -> AcceptInfo {
    AcceptInfo {
        clock_us: Some(super::clock::micros_since_epoch(
            std::time::SystemTime::now(),
        )),
        control,
        records: false,
    }
}

/// A migration's control channel: accepted like a stream, then read for
/// control messages until the source closes it or the migration ends.
async fn control(shared: &Shared, mut conn: Conn, hello: Hello, peer: String, delivery: Delivery) {
    if let Err(e) = wire::write_reply_with(conn.io(), &Reply::Accept, accept_info(true)).await {
        tracing::warn!(migration = %hello.migration, error = %e, "relay could not accept a control channel");
        return;
    }
    tracing::info!(migration = %hello.migration, %peer, "relay control channel accepted");
    loop {
        let message = tokio::select! {
            m = wire::read_control(conn.io()) => m,
            _ = delivery.cancel.cancelled() => return,
            _ = shared.cancel.cancelled() => return,
        };
        match message {
            Ok(Control::SourceStopped { at_us }) => {
                tracing::info!(migration = %hello.migration, "the source's guest stopped for the switchover");
                if let Some(hook) = &delivery.on_source_stopped {
                    (hook.0)(super::clock::from_micros(at_us));
                }
            }
            // The source closed it (the migration ended) or broke it.
            Err(WireError::Io(_)) => return,
            Err(e) => {
                tracing::warn!(migration = %hello.migration, error = %e, "bad message on a control channel; closed");
                return;
            }
        }
    }
}

enum Conn {
    Tls(Box<tokio_rustls::server::TlsStream<BufReader<tokio::net::TcpStream>>>),
    Plain(tokio::net::TcpStream),
}

impl Conn {
    /// Whether this connection can switch to Ferry's record layer (TLS 1.3).
    fn takes_records(&self) -> bool {
        match self {
            Conn::Tls(t) => records::available(t.get_ref().1),
            Conn::Plain(_) => false,
        }
    }

    fn io(&mut self) -> &mut dyn Stream {
        match self {
            Conn::Tls(t) => t.as_mut(),
            Conn::Plain(t) => t,
        }
    }
}

fn reply(r: &Refusal) -> Reply {
    Reply::Refuse {
        reason: r.reason,
        message: r.message.clone(),
    }
}
