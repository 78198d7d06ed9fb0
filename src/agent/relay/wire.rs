//! The relay's handshake frames.
//!
//! Every frame is a fixed 11-byte header and a bounded JSON body:
//!
//! ```text
//!  0        4        6      7                11
//!  ┌────────┬────────┬──────┬─────────────────┬───────────────────┐
//!  │ "FRLY" │ ver u16│ kind │ body length u32 │ body (JSON) ≤ 4096 │
//!  └────────┴────────┴──────┴─────────────────┴───────────────────┘
//!  kind 1 Hello   (source → target): migration ref, claimed source host, channel, role, records
//!  kind 2 Accept  (target → source): {clockUs, control, records}   then, for a stream:
//!                                    raw migration bytes both ways
//!  kind 3 Refuse  (target → source): reason + message, then close
//!  kind 4 Control (source → target, control channel only): {type: SourceStopped, atUs}
//! ```
//!
//! `clockUs` is the target's wall clock when it accepted (µs since the
//! epoch), from which the source estimates the clock offset between the
//! hosts ([`super::clock`]). It is optional and ignored by peers that do not
//! know it, so it needs no new protocol version.
//!
//! `control: true` in a stream's Accept says the target takes a *control
//! channel* for the migration: one more connection, authorized like the
//! streams, whose Hello has `role: Control` and which carries `Control`
//! frames instead of QEMU's bytes. The source opens it only when a target
//! advertised it (a target of an earlier release would hand it to QEMU as a
//! stream), so it too needs no new version. Its one message,
//! `SourceStopped`, tells the target the source's guest stopped for the
//! switchover (see `agent::net::handle`).
//!
//! `records: true` in a Hello offers, and in its Accept takes, Ferry's own
//! TLS 1.3 record layer for the rest of the stream (`relay::records`): the
//! same records, sealed and opened in place by the agents with the
//! session's keys. A peer of an earlier release neither offers nor takes
//! it, and the stream stays on rustls.
//!
//! Lengths are checked before anything is allocated; a frame of another
//! version is answered with a `Refuse` of reason `UnsupportedVersion` in the
//! target's own version so a newer source can tell what went wrong.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{MigrationRef, RefusalReason};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"FRLY";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest body accepted (a Hello is a few hundred bytes).
pub const MAX_BODY: u32 = 4096;

const HEADER_LEN: usize = 11;

/// The first frame of every relay connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// The Migration this stream belongs to.
    pub migration: MigrationRef,
    /// The host the sender claims to be (must match its certificate).
    pub source_host: String,
    /// Channel index within the migration (0 = first connection QEMU made).
    pub channel: u32,
    /// What the connection carries (absent from earlier releases: a stream).
    #[serde(default, skip_serializing_if = "Role::is_stream")]
    pub role: Role,
    /// The sender can carry the stream after the Accept on Ferry's own TLS
    /// 1.3 record layer (`relay::records`); absent from earlier releases.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub records: bool,
}

/// What a relay connection carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// QEMU's migration bytes.
    #[default]
    Stream,
    /// The migration's control messages ([`Control`]).
    Control,
}

impl Role {
    fn is_stream(&self) -> bool {
        *self == Role::Stream
    }
}

/// A message on a migration's control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Control {
    /// The source's guest stopped for the switchover at `at_us` (the
    /// source's wall clock, µs since the epoch).
    #[serde(rename_all = "camelCase")]
    SourceStopped {
        /// When QEMU stopped the guest.
        at_us: i64,
    },
}

/// An Accept's details.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcceptInfo {
    /// The target's wall clock when it accepted, µs since the epoch.
    pub clock_us: Option<i64>,
    /// The target takes a control channel for this migration.
    pub control: bool,
    /// After this Accept the stream runs on Ferry's record layer (only when
    /// the Hello offered it).
    pub records: bool,
}

/// The target's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Reply {
    /// Go ahead.
    Accept,
    /// Refused; the connection closes after this frame.
    Refuse {
        /// Why, from a closed set.
        reason: RefusalReason,
        /// Human-readable detail.
        message: String,
    },
}

/// The reply's body: the reply and, with an accept, the target's clock.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReplyBody {
    #[serde(flatten)]
    reply: Reply,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clock_us: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    control: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    records: bool,
}

/// A handshake failure on the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or closed mid-frame.
    #[error("reading or writing a handshake frame")]
    Io(#[from] std::io::Error),
    /// Not our protocol.
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// Another protocol version.
    #[error("peer speaks relay protocol version {0}, this agent {PROTOCOL_VERSION}")]
    Version(u16),
    /// Unknown frame kind.
    #[error("unexpected frame kind {0}")]
    Kind(u8),
    /// Oversized body.
    #[error("frame body of {0} bytes exceeds the limit of {MAX_BODY}")]
    TooLarge(u32),
    /// Body not decodable.
    #[error("malformed frame body: {0}")]
    Body(String),
}

const KIND_HELLO: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_REFUSE: u8 = 3;
const KIND_CONTROL: u8 = 4;

async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    kind: u8,
    body: &[u8],
) -> Result<(), WireError> {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    if len > MAX_BODY {
        return Err(WireError::TooLarge(len));
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    frame.push(kind);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame header and body. A version mismatch is reported after
/// the body has been consumed so the connection can still carry a reply.
async fn read_frame<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<(u8, Vec<u8>), WireError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await?;
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = u16::from_be_bytes([h[4], h[5]]);
    let kind = h[6];
    let len = u32::from_be_bytes([h[7], h[8], h[9], h[10]]);
    if len > MAX_BODY {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    Ok((kind, body))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, WireError> {
    serde_json::to_vec(v).map_err(|e| WireError::Body(e.to_string()))
}

/// Sends the Hello.
pub async fn write_hello<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    hello: &Hello,
) -> Result<(), WireError> {
    write_frame(w, KIND_HELLO, &encode(hello)?).await
}

/// Reads the Hello.
pub async fn read_hello<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Hello, WireError> {
    match read_frame(r).await? {
        (KIND_HELLO, body) => {
            serde_json::from_slice(&body).map_err(|e| WireError::Body(e.to_string()))
        }
        (k, _) => Err(WireError::Kind(k)),
    }
}

/// Sends the reply.
pub async fn write_reply<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    reply: &Reply,
) -> Result<(), WireError> {
    write_reply_clocked(w, reply, None).await
}

/// Sends the reply with this host's wall clock (µs since the epoch).
pub async fn write_reply_clocked<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    reply: &Reply,
    clock_us: Option<i64>,
) -> Result<(), WireError> {
    write_reply_with(
        w,
        reply,
        AcceptInfo {
            clock_us,
            ..AcceptInfo::default()
        },
    )
    .await
}

/// Sends the reply with an Accept's details.
pub async fn write_reply_with<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    reply: &Reply,
    info: AcceptInfo,
) -> Result<(), WireError> {
    let kind = match reply {
        Reply::Accept => KIND_ACCEPT,
        Reply::Refuse { .. } => KIND_REFUSE,
    };
    let body = ReplyBody {
        reply: reply.clone(),
        clock_us: info.clock_us,
        control: info.control,
        records: info.records,
    };
    write_frame(w, kind, &encode(&body)?).await
}

/// Reads the reply.
pub async fn read_reply<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Reply, WireError> {
    read_reply_clocked(r).await.map(|(reply, _)| reply)
}

/// Reads the reply and the peer's wall clock, if it sent one.
pub async fn read_reply_clocked<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<(Reply, Option<i64>), WireError> {
    read_reply_with(r)
        .await
        .map(|(reply, info)| (reply, info.clock_us))
}

/// Reads the reply and an Accept's details.
pub async fn read_reply_with<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<(Reply, AcceptInfo), WireError> {
    match read_frame(r).await? {
        (KIND_ACCEPT | KIND_REFUSE, body) => serde_json::from_slice::<ReplyBody>(&body)
            .map(|b| {
                (
                    b.reply,
                    AcceptInfo {
                        clock_us: b.clock_us,
                        control: b.control,
                        records: b.records,
                    },
                )
            })
            .map_err(|e| WireError::Body(e.to_string())),
        (k, _) => Err(WireError::Kind(k)),
    }
}

/// Sends a control message (control channel only).
pub async fn write_control<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    message: &Control,
) -> Result<(), WireError> {
    write_frame(w, KIND_CONTROL, &encode(message)?).await
}

/// Reads the next control message.
pub async fn read_control<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Control, WireError> {
    match read_frame(r).await? {
        (KIND_CONTROL, body) => {
            serde_json::from_slice(&body).map_err(|e| WireError::Body(e.to_string()))
        }
        (k, _) => Err(WireError::Kind(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            migration: MigrationRef {
                namespace: "default".into(),
                name: "m1".into(),
                uid: "u-1".into(),
            },
            source_host: "host-a".into(),
            channel: 2,
            role: Role::Stream,
            records: false,
        }
    }

    #[tokio::test]
    async fn hello_and_replies_round_trip() {
        let mut buf = Vec::new();
        write_hello(&mut buf, &hello()).await.unwrap();
        assert_eq!(&buf[..4], b"FRLY");
        assert_eq!(read_hello(&mut &buf[..]).await.unwrap(), hello());
        for reply in [
            Reply::Accept,
            Reply::Refuse {
                reason: RefusalReason::WrongSourceHost,
                message: "no".into(),
            },
        ] {
            let mut buf = Vec::new();
            write_reply(&mut buf, &reply).await.unwrap();
            assert_eq!(read_reply(&mut &buf[..]).await.unwrap(), reply);
        }
    }

    #[tokio::test]
    async fn the_accept_carries_the_clock_and_old_readers_ignore_it() {
        let mut buf = Vec::new();
        write_reply_clocked(&mut buf, &Reply::Accept, Some(1_700_000_000_000_001))
            .await
            .unwrap();
        assert_eq!(
            read_reply_clocked(&mut &buf[..]).await.unwrap(),
            (Reply::Accept, Some(1_700_000_000_000_001))
        );
        // A peer of the first release decodes the body as a bare `Reply`.
        let body = &buf[HEADER_LEN..];
        assert_eq!(
            serde_json::from_slice::<Reply>(body).unwrap(),
            Reply::Accept
        );
        // And its accept, without a clock, reads as no clock.
        let old = serde_json::to_vec(&Reply::Accept).unwrap();
        let b: ReplyBody = serde_json::from_slice(&old).unwrap();
        assert_eq!((b.reply, b.clock_us), (Reply::Accept, None));
    }

    #[tokio::test]
    async fn the_record_layer_is_offered_and_taken_and_old_peers_see_neither() {
        // Not offered: the Hello reads as before (an older target ignores
        // an unknown field anyway, but nothing new is sent).
        let plain = serde_json::to_value(hello()).unwrap();
        assert!(plain.get("records").is_none(), "{plain}");
        let offered = Hello {
            records: true,
            ..hello()
        };
        let mut buf = Vec::new();
        write_hello(&mut buf, &offered).await.unwrap();
        assert_eq!(read_hello(&mut &buf[..]).await.unwrap(), offered);
        // An older source's Hello reads as not offering.
        let old: Hello = serde_json::from_value(plain).unwrap();
        assert!(!old.records);
        let taken = AcceptInfo {
            clock_us: Some(7),
            control: false,
            records: true,
        };
        let mut buf = Vec::new();
        write_reply_with(&mut buf, &Reply::Accept, taken)
            .await
            .unwrap();
        assert_eq!(
            read_reply_with(&mut &buf[..]).await.unwrap(),
            (Reply::Accept, taken)
        );
        // An older target's Accept reads as not taking it.
        let old = serde_json::to_vec(&Reply::Accept).unwrap();
        let b: ReplyBody = serde_json::from_slice(&old).unwrap();
        assert!(!b.records);
    }

    #[tokio::test]
    async fn the_control_channel_is_advertised_asked_for_and_carried() {
        // A stream's Hello reads as it did before roles existed.
        let plain = serde_json::to_value(hello()).unwrap();
        assert!(plain.get("role").is_none(), "{plain}");
        let old: Hello = serde_json::from_value(plain).unwrap();
        assert_eq!(old.role, Role::Stream);
        let control = Hello {
            role: Role::Control,
            ..hello()
        };
        let mut buf = Vec::new();
        write_hello(&mut buf, &control).await.unwrap();
        assert_eq!(read_hello(&mut &buf[..]).await.unwrap(), control);
        // The advertisement rides on the Accept; without it, none is read.
        let mut buf = Vec::new();
        let info = AcceptInfo {
            clock_us: Some(5),
            control: true,
            records: false,
        };
        write_reply_with(&mut buf, &Reply::Accept, info)
            .await
            .unwrap();
        assert_eq!(
            read_reply_with(&mut &buf[..]).await.unwrap(),
            (Reply::Accept, info)
        );
        let mut buf = Vec::new();
        write_reply_clocked(&mut buf, &Reply::Accept, Some(5))
            .await
            .unwrap();
        assert!(!read_reply_with(&mut &buf[..]).await.unwrap().1.control);
        // The message itself.
        let stopped = Control::SourceStopped {
            at_us: 1_700_000_000_000_002,
        };
        let mut buf = Vec::new();
        write_control(&mut buf, &stopped).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&buf[HEADER_LEN..]).unwrap(),
            serde_json::json!({"type": "SourceStopped", "atUs": 1_700_000_000_000_002_i64})
        );
        assert_eq!(read_control(&mut &buf[..]).await.unwrap(), stopped);
        // A stream frame is not a control message.
        let mut buf = Vec::new();
        write_hello(&mut buf, &hello()).await.unwrap();
        assert!(matches!(
            read_control(&mut &buf[..]).await,
            Err(WireError::Kind(KIND_HELLO))
        ));
    }

    #[tokio::test]
    async fn oversized_frames_are_rejected_before_allocation() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        buf.push(KIND_HELLO);
        buf.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read_hello(&mut &buf[..]).await,
            Err(WireError::TooLarge(u32::MAX))
        ));
    }

    #[tokio::test]
    async fn other_versions_and_magic_are_named() {
        let mut buf = Vec::new();
        write_hello(&mut buf, &hello()).await.unwrap();
        buf[5] = 9;
        assert!(matches!(
            read_hello(&mut &buf[..]).await,
            Err(WireError::Version(9))
        ));
        buf[0] = b'X';
        assert!(matches!(
            read_hello(&mut &buf[..]).await,
            Err(WireError::BadMagic(_))
        ));
        let mut short = Vec::new();
        write_hello(&mut short, &hello()).await.unwrap();
        short.truncate(20);
        assert!(matches!(
            read_hello(&mut &short[..]).await,
            Err(WireError::Io(_))
        ));
    }
}
