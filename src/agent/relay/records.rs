//! The bulk of a TLS stream on the relay's own record layer.
//!
//! rustls (through tokio-rustls) costs the relay four user-space copies of
//! every byte: into its record buffer on the source, and on the target from
//! the read buffer into rustls' deframer, out of it into the caller's
//! buffer, and on to the socket. On a host whose cores both QEMUs need, that
//! was most of the TLS path's CPU (the AES-GCM itself is about a sixth).
//! So once a stream's handshake, Hello and Accept are done, both agents take
//! the session's traffic keys from rustls and carry the bytes as TLS 1.3
//! records themselves, encrypting and decrypting in place:
//!
//! ```text
//!  source: readv(QEMU's socket) into record slots ─ seal in place ─ write(TCP)
//!  target: read(TCP) ─ open in place ─ writev(the plaintexts) to QEMU's socket
//! ```
//!
//! The records are RFC 8446 records (outer type application_data, the inner
//! content type, AES-GCM or ChaCha20-Poly1305 with the per-record nonce from
//! the sequence number), so nothing about TLS' protection changes: every
//! record is authenticated, a replayed, dropped, reordered or altered record
//! fails to open, and the stream ends only with an authenticated
//! close_notify (a TCP end without one is an error, as in rustls).
//!
//! One thing TLS 1.3 does and this layer does differently is re-keying:
//! AES-GCM must not seal more than about 2^24 records under one key, and
//! rustls would send a KeyUpdate; its extracted keys cannot be updated. So
//! every [`REKEY_RECORDS`] records each direction moves to a new key
//! generation derived with HKDF-SHA256 from a secret both ends export from
//! the session (RFC 8446 §7.5 exporter, [`EXPORTER_LABEL`]) and the
//! generation number. Both ends count the same records, so no message is
//! needed. Both ends must agree to use this layer: the source offers it in
//! its Hello (`records`), the target accepts in its Accept; a peer of an
//! earlier release does neither and the stream stays on rustls.

use std::io::{self, IoSlice, IoSliceMut};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use tokio::io::BufReader;
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

use super::meter::{RateLimiter, RelayCounters};
use super::pump::PumpError;
use super::splice::{
    SpliceSocket, read_some, read_vectored, shutdown_write, write_all, write_all_vectored,
};

/// Largest plaintext of one record (RFC 8446 §5.1).
const MAX_PLAINTEXT: usize = 1 << 14;
const HEADER: usize = 5;
const TAG: usize = 16;
/// Largest ciphertext a peer may send (plaintext, type, padding, tag).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// A sealing slot: header, plaintext, content type, tag.
const SLOT: usize = HEADER + MAX_PLAINTEXT + 1 + TAG;
/// Records sealed per key generation; well inside AES-GCM's limit
/// (rustls' confidentiality limit for it is 2^24).
pub(crate) const REKEY_RECORDS: u64 = 1 << 23;
/// The exporter label of the re-keying secret.
const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL ferry relay record rekey";

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const CLOSE_NOTIFY: [u8; 2] = [1, 0];

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Which end of the TLS session this is (the directions' keys differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The source agent (TLS client).
    Client,
    /// The target agent (TLS server).
    Server,
}

/// One direction's keys: the current generation's key and IV, the record
/// sequence number within it, and the secret the next generations come from.
struct DirectionKeys {
    algorithm: &'static aead::Algorithm,
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    generation: u32,
    rekey_every: u64,
    next: hkdf::Prk,
}

/// An HKDF output length.
struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl DirectionKeys {
    fn new(
        secrets: (u64, ConnectionTrafficSecrets),
        next: hkdf::Prk,
        rekey_every: u64,
    ) -> io::Result<Self> {
        let (seq, secrets) = secrets;
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("no record layer for the negotiated cipher")),
        };
        let iv: [u8; aead::NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("the session's IV is not 12 bytes"))?;
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| invalid("the session's key does not fit its cipher"))?;
        Ok(DirectionKeys {
            algorithm,
            key: LessSafeKey::new(key),
            iv,
            seq,
            generation: 0,
            rekey_every,
            next,
        })
    }

    /// The nonce of the next record, moving to the next key generation
    /// first when this one has sealed its share.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= self.rekey_every {
            self.rekey()?;
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    fn rekey(&mut self) -> io::Result<()> {
        let generation = self.generation.checked_add(1).ok_or_else(|| {
            invalid("a relay stream used up its key generations (2^32 × 2^23 records)")
        })?;
        let derive = |what: &[u8], out: &mut [u8]| {
            let g = generation.to_be_bytes();
            let info = [what, &g[..]];
            self.next
                .expand(&info, Len(out.len()))
                .and_then(|okm| okm.fill(out))
                .map_err(|_| invalid("deriving the next record key failed"))
        };
        let mut key = vec![0u8; self.algorithm.key_len()];
        let mut iv = [0u8; aead::NONCE_LEN];
        derive(b"key", &mut key)?;
        derive(b"iv", &mut iv)?;
        let key = UnboundKey::new(self.algorithm, &key)
            .map_err(|_| invalid("the derived key does not fit its cipher"))?;
        self.key = LessSafeKey::new(key);
        self.iv = iv;
        self.seq = 0;
        self.generation = generation;
        Ok(())
    }

    /// Seals `len` plaintext bytes at `record[HEADER..]` in place as one
    /// record of `content_type`; returns the record's length.
    fn seal(&mut self, record: &mut [u8], len: usize, content_type: u8) -> io::Result<usize> {
        debug_assert!(len <= MAX_PLAINTEXT && record.len() >= HEADER + len + 1 + TAG);
        record[HEADER + len] = content_type;
        let body = len + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (body >> 8) as u8, body as u8];
        record[..HEADER].copy_from_slice(&header);
        let nonce = self.next_nonce()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(
                nonce,
                Aad::from(header),
                &mut record[HEADER..HEADER + len + 1],
            )
            .map_err(|_| invalid("sealing a record failed"))?;
        record[HEADER + len + 1..HEADER + body].copy_from_slice(tag.as_ref());
        Ok(HEADER + body)
    }

    /// Opens one whole record in place; returns its inner content type and
    /// plaintext length (the plaintext is at `record[HEADER..]`).
    fn open(&mut self, record: &mut [u8]) -> io::Result<(u8, usize)> {
        let header: [u8; HEADER] = record[..HEADER].try_into().expect("a whole record");
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), &mut record[HEADER..])
            .map_err(|_| invalid("a TLS record from the peer failed authentication"))?;
        // The inner plaintext ends with the content type and zero padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(invalid("a TLS record without a content type"));
        };
        Ok((plain[end], end))
    }
}

/// A stream's two directions of keys, and what the handshake's reader had
/// already taken off the socket.
pub(crate) struct Records {
    tx: DirectionKeys,
    rx: DirectionKeys,
    unread: Vec<u8>,
}

/// Whether a session can switch to this record layer: TLS 1.3 only (a TLS
/// 1.2 record has another nonce and additional data).
pub(crate) fn available(session: &rustls::CommonState) -> bool {
    session.protocol_version() == Some(ProtocolVersion::TLSv1_3)
}

/// What the record layer needs of a rustls connection of either end.
trait Session: Sized {
    const END: End;
    fn common(&mut self) -> &mut rustls::CommonState;
    fn process(&mut self) -> Result<rustls::IoState, rustls::Error>;
    fn export(&self, label: &[u8]) -> Result<[u8; 32], rustls::Error>;
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error>;
}

macro_rules! session {
    ($t:ty, $end:expr) => {
        impl Session for $t {
            const END: End = $end;
            fn common(&mut self) -> &mut rustls::CommonState {
                self
            }
            fn process(&mut self) -> Result<rustls::IoState, rustls::Error> {
                self.process_new_packets()
            }
            fn export(&self, label: &[u8]) -> Result<[u8; 32], rustls::Error> {
                self.export_keying_material([0u8; 32], label, None)
            }
            fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
                self.dangerous_extract_secrets()
            }
        }
    };
}
session!(rustls::ClientConnection, End::Client);
session!(rustls::ServerConnection, End::Server);

impl Records {
    /// Takes the session's keys from a connection whose handshake, Hello and
    /// reply are done and which holds nothing unread or unsent.
    fn from_session<S: Session>(
        mut conn: S,
        unread: Vec<u8>,
        rekey_every: u64,
    ) -> io::Result<Records> {
        let tls = |e: rustls::Error| invalid(format!("taking the TLS session's keys: {e}"));
        if !available(conn.common()) {
            return Err(invalid("Ferry's record layer needs TLS 1.3"));
        }
        let state = conn.process().map_err(tls)?;
        if state.plaintext_bytes_to_read() > 0 || state.tls_bytes_to_write() > 0 {
            return Err(invalid(
                "the TLS session holds unread or unsent data at the switch to Ferry's records",
            ));
        }
        let seed = conn.export(EXPORTER_LABEL).map_err(tls)?;
        let secrets = conn.extract().map_err(tls)?;
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(&seed);
        let direction = |label: &[u8]| -> io::Result<hkdf::Prk> {
            let mut out = [0u8; 32];
            prk.expand(&[label], Len(32))
                .and_then(|okm| okm.fill(&mut out))
                .map_err(|_| invalid("deriving the re-keying secret failed"))?;
            Ok(hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &out))
        };
        let (tx_label, rx_label): (&[u8], &[u8]) = match S::END {
            End::Client => (b"client to server", b"server to client"),
            End::Server => (b"server to client", b"client to server"),
        };
        Ok(Records {
            tx: DirectionKeys::new(secrets.tx, direction(tx_label)?, rekey_every)?,
            rx: DirectionKeys::new(secrets.rx, direction(rx_label)?, rekey_every)?,
            unread,
        })
    }

    /// The source's side of an accepted stream.
    pub(crate) fn client(
        tls: tokio_rustls::client::TlsStream<BufReader<TcpStream>>,
        rekey_every: u64,
    ) -> io::Result<(TcpStream, Records)> {
        let (io, conn) = tls.into_inner();
        Self::take(io, conn, rekey_every)
    }

    /// The target's side of an accepted stream.
    pub(crate) fn server(
        tls: tokio_rustls::server::TlsStream<BufReader<TcpStream>>,
        rekey_every: u64,
    ) -> io::Result<(TcpStream, Records)> {
        let (io, conn) = tls.into_inner();
        Self::take(io, conn, rekey_every)
    }

    /// The socket back, with what its read buffer held as the first bytes.
    fn take<S: Session>(
        io: BufReader<TcpStream>,
        conn: S,
        rekey_every: u64,
    ) -> io::Result<(TcpStream, Records)> {
        let records = Self::from_session(conn, io.buffer().to_vec(), rekey_every)?;
        Ok((io.into_inner(), records))
    }
}

/// One direction of a channel, as the pumps carry it.
struct Leg {
    /// Records' worth of plaintext per read.
    records: usize,
    /// Where its bytes are counted.
    count: fn(&RelayCounters, u64),
    /// What a failed read is.
    read_error: fn(io::Error) -> PumpError,
    /// What a failed write is.
    write_error: fn(io::Error) -> PumpError,
}

/// QEMU's stream, source to target: 64 records, the 1 MiB forward chunk.
const STREAM: Leg = Leg {
    records: 64,
    count: RelayCounters::add_forward,
    read_error: PumpError::ReadUpstream,
    write_error: PumpError::WriteDownstream,
};

/// QEMU's return path, target to source: small.
const RETURN: Leg = Leg {
    records: 4,
    count: RelayCounters::add_backward,
    read_error: PumpError::ReadDownstream,
    write_error: PumpError::WriteUpstream,
};

/// Reads plaintext from `from` straight into record slots, seals them in
/// place and writes them to `to`; at the end of `from`, a close_notify.
async fn seal<F: SpliceSocket, T: SpliceSocket>(
    from: &F,
    to: &T,
    keys: &mut DirectionKeys,
    leg: &Leg,
    counters: &RelayCounters,
    limiter: Option<&RateLimiter>,
) -> Result<(), PumpError> {
    let (read_err, write_err) = (leg.read_error, leg.write_error);
    let mut buf = vec![0u8; leg.records * SLOT];
    loop {
        let n = {
            let mut iov: Vec<IoSliceMut> = buf
                .chunks_mut(SLOT)
                .map(|s| IoSliceMut::new(&mut s[HEADER..HEADER + MAX_PLAINTEXT]))
                .collect();
            read_vectored(from, &mut iov).await.map_err(read_err)?
        };
        if n == 0 {
            let mut alert = [0u8; HEADER + 2 + 1 + TAG];
            alert[HEADER..HEADER + 2].copy_from_slice(&CLOSE_NOTIFY);
            let len = keys.seal(&mut alert, 2, ALERT).map_err(write_err)?;
            // The peer may already be gone.
            let _ = write_all(to, &alert[..len]).await;
            shutdown_write(to);
            return Ok(());
        }
        let mut end = 0;
        for (i, slot) in buf.chunks_mut(SLOT).enumerate() {
            let len = n.saturating_sub(i * MAX_PLAINTEXT).min(MAX_PLAINTEXT);
            if len == 0 {
                break;
            }
            end = i * SLOT + keys.seal(slot, len, APPLICATION_DATA).map_err(write_err)?;
        }
        if let Some(l) = limiter {
            l.acquire(n).await;
        }
        write_all(to, &buf[..end]).await.map_err(write_err)?;
        (leg.count)(counters, n as u64);
    }
}

/// Reads records from `from` (after what the handshake left `unread`),
/// opens them in place and writes their plaintexts to `to` in one gather.
async fn open<F: SpliceSocket, T: SpliceSocket>(
    from: &F,
    to: &T,
    keys: &mut DirectionKeys,
    unread: &[u8],
    leg: &Leg,
    counters: &RelayCounters,
) -> Result<(), PumpError> {
    let (read_err, write_err) = (leg.read_error, leg.write_error);
    let record_max = HEADER + MAX_CIPHERTEXT;
    let chunk = leg.records * MAX_PLAINTEXT;
    let mut buf = vec![0u8; (chunk + record_max).max(unread.len() + record_max)];
    buf[..unread.len()].copy_from_slice(unread);
    let (mut start, mut end) = (0, unread.len());
    // Where each opened record's plaintext lies in `buf`.
    let mut plain: Vec<(usize, usize)> = Vec::new();
    loop {
        plain.clear();
        let mut closed = false;
        while end - start >= HEADER && !closed {
            let header = &buf[start..start + HEADER];
            let len = u16::from_be_bytes([header[3], header[4]]) as usize;
            if header[0] != APPLICATION_DATA || !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
                return Err(read_err(invalid(format!(
                    "not a TLS 1.3 record from the peer (type {}, length {len})",
                    header[0]
                ))));
            }
            if end - start < HEADER + len {
                break;
            }
            let record = &mut buf[start..start + HEADER + len];
            let (content_type, n) = keys.open(record).map_err(read_err)?;
            match content_type {
                APPLICATION_DATA => plain.push((start + HEADER, n)),
                ALERT if record[HEADER..HEADER + n] == CLOSE_NOTIFY => closed = true,
                ALERT => {
                    return Err(read_err(invalid(format!(
                        "the peer sent TLS alert {:?}",
                        &record[HEADER..HEADER + n]
                    ))));
                }
                // A session ticket: this layer resumes nothing.
                HANDSHAKE if record.get(HEADER) == Some(&4) => {}
                other => {
                    return Err(read_err(invalid(format!(
                        "unexpected TLS content type {other} after the switch to Ferry's records"
                    ))));
                }
            }
            start += HEADER + len;
        }
        let total: usize = plain.iter().map(|&(_, n)| n).sum();
        if total > 0 {
            let mut slices: Vec<IoSlice> = plain
                .iter()
                .map(|&(at, n)| IoSlice::new(&buf[at..at + n]))
                .collect();
            write_all_vectored(to, &mut slices)
                .await
                .map_err(write_err)?;
            (leg.count)(counters, total as u64);
        }
        if closed {
            shutdown_write(to);
            return Ok(());
        }
        if start == end {
            (start, end) = (0, 0);
        } else if buf.len() - end < record_max {
            // Less than a record's room left: move the partial one down.
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        let n = read_some(from, &mut buf[end..]).await.map_err(read_err)?;
        if n == 0 {
            return Err(read_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed connection without sending TLS close_notify",
            )));
        }
        end += n;
    }
}

/// The source's pump: QEMU's stream sealed towards the target, the return
/// path opened towards QEMU.
pub(crate) async fn pump_source(
    qemu: UnixStream,
    remote: TcpStream,
    records: Records,
    counters: &RelayCounters,
    limiter: Option<&RateLimiter>,
    cancel: &CancellationToken,
) -> Result<(), PumpError> {
    let Records {
        mut tx,
        mut rx,
        unread,
    } = records;
    let fwd = seal(&qemu, &remote, &mut tx, &STREAM, counters, limiter);
    let bwd = open(&remote, &qemu, &mut rx, &unread, &RETURN, counters);
    super::pump::drive(fwd, bwd, cancel).await
}

/// The target's pump: the source's records opened into QEMU, QEMU's return
/// path sealed back.
pub(crate) async fn pump_target(
    remote: TcpStream,
    qemu: UnixStream,
    records: Records,
    counters: &RelayCounters,
    cancel: &CancellationToken,
) -> Result<(), PumpError> {
    let Records {
        mut tx,
        mut rx,
        unread,
    } = records;
    let fwd = open(&remote, &qemu, &mut rx, &unread, &STREAM, counters);
    let bwd = seal(&qemu, &remote, &mut tx, &RETURN, counters, None);
    super::pump::drive(fwd, bwd, cancel).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::crypto::cipher::{AeadKey, Iv};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::agent::pki::{ClusterCa, TlsSettings};

    fn keys(rekey_every: u64) -> DirectionKeys {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv: Iv::new([1u8; 12]),
        };
        let next = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &[9u8; 32]);
        DirectionKeys::new((3, secrets), next, rekey_every).unwrap()
    }

    /// Seals `n` records of distinct contents; each is (bytes, plaintext).
    fn sealed(tx: &mut DirectionKeys, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let plain: Vec<u8> = (0..100 + i).map(|b| (b * 7 + i) as u8).collect();
                let mut slot = vec![0u8; SLOT];
                slot[HEADER..HEADER + plain.len()].copy_from_slice(&plain);
                let len = tx.seal(&mut slot, plain.len(), APPLICATION_DATA).unwrap();
                slot.truncate(len);
                (slot, plain)
            })
            .collect()
    }

    #[test]
    fn records_open_in_order_across_key_generations() {
        let (mut tx, mut rx) = (keys(4), keys(4));
        for (mut record, plain) in sealed(&mut tx, 13) {
            let (ty, n) = rx.open(&mut record).unwrap();
            assert_eq!(ty, APPLICATION_DATA);
            assert_eq!(&record[HEADER..HEADER + n], &plain[..]);
        }
        // 13 records from seq 3, four per generation: three moves.
        assert_eq!((tx.generation, rx.generation), (3, 3));
        // A generation's keys are new: the first record of generation 1
        // does not open under generation 0's key.
        let (mut tx, mut rx) = (keys(2), keys(1 << 20));
        let mut records = sealed(&mut tx, 2);
        assert!(rx.open(&mut records[1].0).is_err(), "sealed after a re-key");
    }

    #[test]
    fn an_altered_replayed_or_reordered_record_does_not_open() {
        let mut tx = keys(REKEY_RECORDS);
        let records = sealed(&mut tx, 3);
        // Altered ciphertext, or an altered header (the AAD).
        for at in [HEADER + 10, 4] {
            let mut rx = keys(REKEY_RECORDS);
            let mut r = records[0].0.clone();
            r[at] ^= 1;
            assert!(rx.open(&mut r).is_err(), "altered at {at}");
        }
        // Reordered: the second record where the first is due.
        let mut rx = keys(REKEY_RECORDS);
        assert!(rx.open(&mut records[1].0.clone()).is_err());
        // Replayed: the first record twice.
        let mut rx = keys(REKEY_RECORDS);
        rx.open(&mut records[0].0.clone()).unwrap();
        assert!(rx.open(&mut records[0].0.clone()).is_err());
    }

    #[tokio::test]
    async fn a_stream_without_close_notify_is_an_error_and_with_it_an_end() {
        let mut tx = keys(REKEY_RECORDS);
        let records = sealed(&mut tx, 2);
        let counters = RelayCounters::default();
        // Records, then the socket closes: truncated.
        let (peer, relay_in) = UnixStream::pair().unwrap();
        let (relay_out, mut qemu) = UnixStream::pair().unwrap();
        let mut peer = peer;
        for (r, _) in &records {
            peer.write_all(r).await.unwrap();
        }
        drop(peer);
        let mut rx = keys(REKEY_RECORDS);
        let r = open(&relay_in, &relay_out, &mut rx, &[], &STREAM, &counters).await;
        match r {
            Err(PumpError::ReadUpstream(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}")
            }
            other => panic!("expected a truncation error, got {other:?}"),
        }
        // The plaintext that did arrive authenticated was delivered.
        let mut got = vec![0u8; records[0].1.len() + records[1].1.len()];
        qemu.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [records[0].1.clone(), records[1].1.clone()].concat());

        // With a close_notify the stream ends cleanly and the end is passed on.
        let (plain_in, relay_from) = UnixStream::pair().unwrap();
        let (relay_to, peer_out) = UnixStream::pair().unwrap();
        let mut plain_in = plain_in;
        plain_in.write_all(b"last words").await.unwrap();
        drop(plain_in);
        let mut tx = keys(REKEY_RECORDS);
        seal(&relay_from, &relay_to, &mut tx, &STREAM, &counters, None)
            .await
            .unwrap();
        drop(relay_to);
        let (relay_out, mut qemu) = UnixStream::pair().unwrap();
        let mut rx = keys(REKEY_RECORDS);
        open(&peer_out, &relay_out, &mut rx, &[], &STREAM, &counters)
            .await
            .unwrap();
        drop(relay_out);
        let mut got = Vec::new();
        qemu.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }

    /// A TLS 1.3 session over loopback TCP as the relay makes one, with one
    /// exchange through rustls first (the Hello and the Accept).
    async fn session() -> (
        tokio_rustls::client::TlsStream<BufReader<TcpStream>>,
        tokio_rustls::server::TlsStream<BufReader<TcpStream>>,
    ) {
        let ca = ClusterCa::generate("ca").unwrap();
        let (a, b) = (
            ca.issue_host("host-a").unwrap(),
            ca.issue_host("host-b").unwrap(),
        );
        let settings = TlsSettings::default();
        let (client_cfg, server_cfg) = (
            settings.client_config(&a).unwrap(),
            settings.server_config(&b).unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = tokio_rustls::TlsAcceptor::from(Arc::clone(&server_cfg))
                .accept(BufReader::new(tcp))
                .await
                .unwrap();
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).await.unwrap();
            s.write_all(b"accept").await.unwrap();
            s.flush().await.unwrap();
            s
        };
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("host-b").unwrap();
            let mut c = tokio_rustls::TlsConnector::from(Arc::clone(&client_cfg))
                .connect(name, BufReader::new(tcp))
                .await
                .unwrap();
            c.write_all(b"hello").await.unwrap();
            c.flush().await.unwrap();
            let mut accept = [0u8; 6];
            c.read_exact(&mut accept).await.unwrap();
            c
        };
        tokio::join!(client, server)
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
            .collect()
    }

    #[tokio::test]
    async fn both_agents_on_records_carry_both_ways_across_key_generations() {
        let (client, server) = session().await;
        let (c_tcp, c_records) = Records::client(client, 5).unwrap();
        let (s_tcp, s_records) = Records::server(server, 5).unwrap();
        let (mut source_qemu, source_relay) = UnixStream::pair().unwrap();
        let (target_relay, mut target_qemu) = UnixStream::pair().unwrap();
        let (c_counters, s_counters) = (RelayCounters::default(), RelayCounters::default());
        let cancel = CancellationToken::new();
        let source = pump_source(source_relay, c_tcp, c_records, &c_counters, None, &cancel);
        let target = pump_target(s_tcp, target_relay, s_records, &s_counters, &cancel);
        // Not a multiple of a record; many generations of five records.
        let forward = pattern(3_000_017, 1);
        let backward = pattern(200_003, 2);
        let qemus = async {
            let (mut sr, mut sw) = source_qemu.split();
            let (mut tr, mut tw) = target_qemu.split();
            let send = async {
                sw.write_all(&forward).await.unwrap();
                sw.shutdown().await.unwrap();
            };
            let receive = async {
                let mut got = Vec::new();
                tr.read_to_end(&mut got).await.unwrap();
                got
            };
            let back = async {
                tw.write_all(&backward).await.unwrap();
                tw.shutdown().await.unwrap();
                let mut got = Vec::new();
                sr.read_to_end(&mut got).await.unwrap();
                got
            };
            let ((), got, back) = tokio::join!(send, receive, back);
            (got, back)
        };
        let (s, t, (got, back)) = tokio::join!(source, target, qemus);
        s.unwrap();
        t.unwrap();
        assert!(got == forward, "the stream arrived intact");
        assert!(back == backward, "the return path arrived intact");
        assert_eq!(c_counters.snapshot().forward_bytes, forward.len() as u64);
        assert_eq!(s_counters.snapshot().forward_bytes, forward.len() as u64);
        assert_eq!(c_counters.snapshot().backward_bytes, backward.len() as u64);
    }

    #[tokio::test]
    async fn the_records_are_tls_1_3_records_rustls_reads_and_writes() {
        // Only the source switches; the target stays on rustls.
        let (client, mut server) = session().await;
        let (c_tcp, c_records) = Records::client(client, REKEY_RECORDS).unwrap();
        let (mut source_qemu, source_relay) = UnixStream::pair().unwrap();
        let counters = RelayCounters::default();
        let cancel = CancellationToken::new();
        let source = pump_source(source_relay, c_tcp, c_records, &counters, None, &cancel);
        let forward = pattern(1_000_003, 3);
        let backward = pattern(70_001, 4);
        let rest = async {
            source_qemu.write_all(&forward).await.unwrap();
            source_qemu.shutdown().await.unwrap();
            let mut got = Vec::new();
            // rustls ends the read cleanly only on an authenticated
            // close_notify; a bare TCP end would be an error here.
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&backward).await.unwrap();
            server.shutdown().await.unwrap();
            let mut back = Vec::new();
            source_qemu.read_to_end(&mut back).await.unwrap();
            (got, back)
        };
        let (s, (got, back)) = tokio::join!(source, rest);
        s.unwrap();
        assert!(got == forward, "rustls read our records");
        assert!(back == backward, "we read rustls' records");
    }
}
