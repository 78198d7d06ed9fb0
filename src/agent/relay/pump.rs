//! Carrying one channel's bytes both ways.
//!
//! `upstream` faces the source QEMU, `downstream` the target QEMU. Forward
//! (upstream → downstream) is the migration stream: large reads, metered and
//! limited. Backward is QEMU's return path (post-copy page requests, acks):
//! small, metered, never limited. When the source closes, its end-of-stream
//! is passed on (TLS close_notify, then the unix write side), and the
//! backward direction gets [`LINGER`] to finish. Any error or a cancel ends
//! both directions at once.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::meter::{RateLimiter, RelayCounters};

/// Read size of the forward direction. Large reads mean fewer syscalls and
/// full 16 KiB TLS records; 1 MiB was the best of 256 KiB–4 MiB here.
pub const FORWARD_CHUNK: usize = 1 << 20;
const BACKWARD_CHUNK: usize = 64 << 10;
/// How long the return path may stay open after the stream has ended.
pub(crate) const LINGER: Duration = Duration::from_secs(30);

/// How a channel ended, other than cleanly.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// Reading from the source side failed.
    #[error("reading the stream from the source side")]
    ReadUpstream(#[source] std::io::Error),
    /// Writing towards the target failed.
    #[error("writing the stream towards the target")]
    WriteDownstream(#[source] std::io::Error),
    /// Reading the return path failed.
    #[error("reading the return path from the target side")]
    ReadDownstream(#[source] std::io::Error),
    /// Writing the return path failed.
    #[error("writing the return path towards the source")]
    WriteUpstream(#[source] std::io::Error),
    /// The migration was cancelled.
    #[error("cancelled")]
    Cancelled,
}

async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    chunk: usize,
    count: impl Fn(u64),
    limiter: Option<&RateLimiter>,
    forward: bool,
) -> Result<(), PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (read_err, write_err): (fn(_) -> _, fn(_) -> _) = if forward {
        (PumpError::ReadUpstream, PumpError::WriteDownstream)
    } else {
        (PumpError::ReadDownstream, PumpError::WriteUpstream)
    };
    let mut buf = vec![0u8; chunk];
    loop {
        // While waiting for the sender, push out what the writer still
        // holds: a TLS writer keeps records queued when the socket was
        // full and sends them only when driven again. Without this the
        // last records of the guest's final state waited for the next
        // write — after the source QEMU has gone quiet — and the target
        // could not run the guest before it had them. A read that becomes
        // ready first ends the flush (it resumes on the next wait).
        let n = {
            let read = r.read(&mut buf);
            tokio::pin!(read);
            tokio::select! {
                biased;
                n = &mut read => n,
                flushed = w.flush() => {
                    flushed.map_err(write_err)?;
                    read.await
                }
            }
        }
        .map_err(read_err)?;
        if n == 0 {
            // Pass the end of stream on; the peer may already be gone.
            let _ = w.shutdown().await;
            return Ok(());
        }
        if let Some(l) = limiter {
            l.acquire(n).await;
        }
        w.write_all(&buf[..n]).await.map_err(write_err)?;
        count(n as u64);
    }
}

/// Carries bytes between the two streams until both directions end, one
/// fails, or `cancel` fires.
pub async fn pump<U, D>(
    upstream: U,
    downstream: D,
    counters: &RelayCounters,
    limiter: Option<&RateLimiter>,
    cancel: &CancellationToken,
) -> Result<(), PumpError>
where
    U: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let (mut dr, mut dw) = tokio::io::split(downstream);
    let fwd = copy(
        &mut ur,
        &mut dw,
        FORWARD_CHUNK,
        |n| counters.add_forward(n),
        limiter,
        true,
    );
    let bwd = copy(
        &mut dr,
        &mut uw,
        BACKWARD_CHUNK,
        |n| counters.add_backward(n),
        None,
        false,
    );
    drive(fwd, bwd, cancel).await
}

/// Runs a channel's two directions until both end, one fails, or `cancel`
/// fires; once the forward direction has ended the backward one has
/// [`LINGER`] to finish. Every pump (plain splice, TLS, Ferry records) ends
/// this way.
pub(crate) async fn drive(
    fwd: impl std::future::Future<Output = Result<(), PumpError>>,
    bwd: impl std::future::Future<Output = Result<(), PumpError>>,
    cancel: &CancellationToken,
) -> Result<(), PumpError> {
    tokio::pin!(fwd, bwd);
    let (mut fwd_done, mut bwd_done) = (false, false);
    // Armed (reset) when the forward direction ends.
    let linger = tokio::time::sleep(LINGER);
    tokio::pin!(linger);
    while !(fwd_done && bwd_done) {
        tokio::select! {
            r = &mut fwd, if !fwd_done => {
                r?;
                fwd_done = true;
                linger.as_mut().reset(tokio::time::Instant::now() + LINGER);
            }
            r = &mut bwd, if !bwd_done => {
                r?;
                bwd_done = true;
            }
            _ = &mut linger, if fwd_done => break,
            _ = cancel.cancelled() => return Err(PumpError::Cancelled),
        }
    }
    Ok(())
}
