//! The migration relay: the memory stream carried agent to agent.
//!
//! QEMU never listens on the network. The source QEMU migrates into a unix
//! socket of its agent; the source agent carries every connection QEMU opens
//! (multifd opens several) over mutually authenticated TLS to the target
//! agent, which feeds the target QEMU's `migrate-incoming` socket:
//!
//! ```text
//!  source QEMU ──unix──► SourceRelay ══TLS 1.3, mTLS══► TargetRelay ──unix──► target QEMU
//!   migrate unix:…        per channel: Hello ──►         Authorizer: is the peer host the
//!                                      ◄── Accept/Refuse  Migration's source, for that Migration?
//! ```
//!
//! A target holding the VM's taps also takes a *control channel* per
//! migration (advertised in the Accept, authorized like a stream), on which
//! the source says when its guest stopped for the switchover
//! ([`SourceRelay::source_stopped`], [`SourceStoppedHook`]).
//!
//! Each side counts bytes per migration in both directions; the source side
//! enforces the migration's bandwidth limit with one token bucket shared by
//! its channels. Cancelling closes every channel, which QEMU sees as a broken
//! stream. The handshake ([`wire`]) carries a protocol version and is bounded
//! in size and time. Every leg returns a typed result: a [`ChannelReport`]
//! on the source, an [`Incoming`] outcome on the target; refusals are also
//! counted by reason ([`TargetStats`]) and logged.
//!
//! The TLS handshake, Hello and reply go through rustls (reading through a
//! 256 KiB buffer: rustls alone reads the socket 4 KiB at a time). After a
//! stream's Accept both agents carry its bytes on their own TLS 1.3 record
//! layer with the session's keys, encrypting and decrypting in place
//! (module `records`), unless the peer is of a release without it. The plain
//! path splices socket to socket through a pipe without copying.
//!
//! A plain TCP mode exists for the benchmark comparison only; it must be
//! chosen explicitly ([`ClientTransport::InsecurePlain`]) and is never a
//! default.

pub mod clock;
pub mod meter;
mod pump;
mod records;
pub mod source;
mod splice;
pub mod target;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use clock::ClockOffset;
pub use meter::{CounterSnapshot, RateLimiter, RelayCounters};
pub use pump::{FORWARD_CHUNK, PumpError};
pub use source::{SourceRelay, SourceRelayConfig};
pub use target::{
    Authorizer, Delivery, Expected, Incoming, MigrationTable, Refusal, SourceStoppedHook,
    TargetRelay, TargetStats,
};
pub use wire::{Hello, PROTOCOL_VERSION, Reply, Role};

/// Identifies a Migration object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigrationRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID (distinguishes a re-created Migration of the same name).
    pub uid: String,
}

impl std::fmt::Display for MigrationRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// Why the target refused a stream (a closed set: metric label and
/// condition reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RefusalReason {
    /// TLS failed: no certificate, one from another CA, or no host name.
    TlsHandshakeFailed,
    /// The Hello was malformed, oversized or late.
    BadHandshake,
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// The Hello's claimed source host is not the certificate's host.
    ClaimMismatch,
    /// No such migration is expected here.
    UnknownMigration,
    /// The UID is known but namespace/name differ.
    MigrationMismatch,
    /// The peer is a valid host, but not this migration's source.
    WrongSourceHost,
    /// The target QEMU is not listening (yet, or any more).
    TargetNotReady,
}

impl RefusalReason {
    /// The stable reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::TlsHandshakeFailed => "TlsHandshakeFailed",
            RefusalReason::BadHandshake => "BadHandshake",
            RefusalReason::UnsupportedVersion => "UnsupportedVersion",
            RefusalReason::ClaimMismatch => "ClaimMismatch",
            RefusalReason::UnknownMigration => "UnknownMigration",
            RefusalReason::MigrationMismatch => "MigrationMismatch",
            RefusalReason::WrongSourceHost => "WrongSourceHost",
            RefusalReason::TargetNotReady => "TargetNotReady",
        }
    }
}

/// How the source side connects.
#[derive(Debug, Clone)]
pub enum ClientTransport {
    /// Mutual TLS with the host's certificate (the only production mode);
    /// a stream's bulk runs on Ferry's record layer when the target takes it
    /// ([`records`]).
    Tls(Arc<rustls::ClientConfig>),
    /// Mutual TLS with rustls carrying every byte, the record layer never
    /// offered: what a source of an earlier release does. For the benchmark
    /// comparison and compatibility tests.
    TlsRustlsOnly(Arc<rustls::ClientConfig>),
    /// Unauthenticated, unencrypted TCP: benchmarks only.
    InsecurePlain,
}

/// How the target side accepts.
#[derive(Debug, Clone)]
pub enum ServerTransport {
    /// Mutual TLS requiring a certificate from the cluster CA.
    Tls(Arc<rustls::ServerConfig>),
    /// Unauthenticated, unencrypted TCP: benchmarks only.
    InsecurePlain,
}

/// Failure of a relay leg.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The socket or listener could not be bound.
    #[error("binding {addr}")]
    Bind {
        /// Path or address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The target agent could not be reached.
    #[error("connecting to the target relay at {addr}")]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS failed (untrusted or wrong certificate, protocol error).
    #[error("TLS handshake with the target relay")]
    Tls(#[source] std::io::Error),
    /// The relay handshake failed.
    #[error("relay handshake: {0}")]
    Handshake(String),
    /// The target refused the stream.
    #[error("the target refused the stream ({}): {message}", reason.as_str())]
    Refused {
        /// Why.
        reason: RefusalReason,
        /// Detail.
        message: String,
    },
    /// The stream broke while being carried.
    #[error("carrying the stream")]
    Stream(#[source] PumpError),
    /// Cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl From<PumpError> for RelayError {
    fn from(e: PumpError) -> Self {
        match e {
            PumpError::Cancelled => RelayError::Cancelled,
            e => RelayError::Stream(e),
        }
    }
}

impl RelayError {
    /// A stable reason string for conditions and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            RelayError::Bind { .. } => "RelayBindFailed",
            RelayError::Connect { .. } => "RelayUnreachable",
            RelayError::Tls(_) => "RelayTlsFailed",
            RelayError::Handshake(_) => "RelayHandshakeFailed",
            RelayError::Refused { reason, .. } => reason.as_str(),
            RelayError::Stream(_) => "RelayStreamBroken",
            RelayError::Cancelled => "Cancelled",
        }
    }
}

/// How one source-side channel ended.
#[derive(Debug, Clone)]
pub struct ChannelReport {
    /// Channel index.
    pub channel: u32,
    /// `None` when it ended cleanly.
    pub error: Option<Arc<RelayError>>,
}
