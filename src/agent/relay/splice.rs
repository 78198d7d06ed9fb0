//! The plain (benchmark) path's zero-copy pump: `splice(2)` through a pipe.
//!
//! ```text
//!  upstream socket ──splice──► pipe (1 MiB) ──splice──► downstream socket
//! ```
//!
//! The bytes never enter user space: the kernel moves page references from
//! the socket into the pipe and from the pipe into the other socket, saving
//! the two copies (and the cache pollution) of a read/write relay — CPU
//! that both QEMUs need on a small host. Only the plain mode can use it:
//! TLS must see the bytes to encrypt them. The return path is small and
//! uses ordinary reads and writes.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

use super::meter::{RateLimiter, RelayCounters};
use super::pump::{FORWARD_CHUNK, PumpError};

/// A tokio socket the splice pump can drive.
pub trait SpliceSocket: AsFd + Send + Sync {
    /// Waits until readable.
    fn ready_read(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Waits until writable.
    fn ready_write(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Runs a non-blocking operation, clearing readiness on `WouldBlock`.
    fn attempt<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! splice_socket {
    ($t:ty) => {
        impl SpliceSocket for $t {
            fn ready_read(&self) -> impl Future<Output = io::Result<()>> + Send {
                self.readable()
            }
            fn ready_write(&self) -> impl Future<Output = io::Result<()>> + Send {
                self.writable()
            }
            fn attempt<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                self.try_io(interest, f)
            }
        }
    };
}
splice_socket!(TcpStream);
splice_socket!(UnixStream);

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A larger pipe means fewer splice calls; the default is 64 KiB. The
    // system limit may refuse it, which only costs speed.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(FORWARD_CHUNK as i32));
    Ok((r, w))
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

async fn forward<U: SpliceSocket, D: SpliceSocket>(
    up: &U,
    down: &D,
    counters: &RelayCounters,
    limiter: Option<&RateLimiter>,
) -> Result<(), PumpError> {
    let (pr, pw) = pipe().map_err(PumpError::ReadUpstream)?;
    loop {
        let n = when_ready(up, Interest::READABLE, || {
            splice(up.as_fd(), None, &pw, None, FORWARD_CHUNK, FLAGS).map_err(io::Error::from)
        })
        .await
        .map_err(PumpError::ReadUpstream)?;
        if n == 0 {
            break;
        }
        if let Some(l) = limiter {
            l.acquire(n).await;
        }
        let mut left = n;
        while left > 0 {
            left -= when_ready(down, Interest::WRITABLE, || {
                splice(&pr, None, down.as_fd(), None, left, FLAGS).map_err(io::Error::from)
            })
            .await
            .map_err(PumpError::WriteDownstream)?;
        }
        counters.add_forward(n as u64);
    }
    shutdown_write(down);
    Ok(())
}

async fn backward<U: SpliceSocket, D: SpliceSocket>(
    down: &D,
    up: &U,
    counters: &RelayCounters,
) -> Result<(), PumpError> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = read_some(down, &mut buf)
            .await
            .map_err(PumpError::ReadDownstream)?;
        if n == 0 {
            break;
        }
        write_all(up, &buf[..n])
            .await
            .map_err(PumpError::WriteUpstream)?;
        counters.add_backward(n as u64);
    }
    shutdown_write(up);
    Ok(())
}

/// Runs the non-blocking `op` once `s` is ready for `interest`, again each
/// time it would block.
async fn when_ready<S: SpliceSocket, R>(
    s: &S,
    interest: Interest,
    mut op: impl FnMut() -> io::Result<R>,
) -> io::Result<R> {
    loop {
        if interest.is_readable() {
            s.ready_read().await?;
        } else {
            s.ready_write().await?;
        }
        match s.attempt(interest, &mut op) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Reads what is there (waits for something); 0 at the end of the stream.
pub(super) async fn read_some<S: SpliceSocket>(s: &S, buf: &mut [u8]) -> io::Result<usize> {
    read_vectored(s, &mut [io::IoSliceMut::new(buf)]).await
}

/// Like [`read_some`], scattering into `bufs` (one `readv`).
pub(super) async fn read_vectored<S: SpliceSocket>(
    s: &S,
    bufs: &mut [io::IoSliceMut<'_>],
) -> io::Result<usize> {
    when_ready(s, Interest::READABLE, || {
        nix::sys::uio::readv(s.as_fd(), bufs).map_err(io::Error::from)
    })
    .await
}

/// Writes all of `buf`.
pub(super) async fn write_all<S: SpliceSocket>(s: &S, buf: &[u8]) -> io::Result<()> {
    write_all_vectored(s, &mut [io::IoSlice::new(buf)]).await
}

/// Writes all of `bufs`, gathering them (`writev`).
pub(super) async fn write_all_vectored<S: SpliceSocket>(
    s: &S,
    mut bufs: &mut [io::IoSlice<'_>],
) -> io::Result<()> {
    // Drop leading empty slices: a writev of nothing returns 0, which
    // would read as the socket taking no more.
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = when_ready(s, Interest::WRITABLE, || {
            nix::sys::uio::writev(s.as_fd(), bufs).map_err(io::Error::from)
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

pub(super) fn shutdown_write(s: &impl AsFd) {
    // The peer may be gone already; there is nothing left to tell it then.
    let _ = nix::sys::socket::shutdown(s.as_fd().as_raw_fd(), nix::sys::socket::Shutdown::Write);
}

/// Carries bytes between two plain sockets with splice until both
/// directions end, one fails, or `cancel` fires.
pub async fn pump_plain<U: SpliceSocket, D: SpliceSocket>(
    up: U,
    down: D,
    counters: &RelayCounters,
    limiter: Option<&RateLimiter>,
    cancel: &CancellationToken,
) -> Result<(), PumpError> {
    let fwd = forward(&up, &down, counters, limiter);
    let bwd = backward(&down, &up, counters);
    super::pump::drive(fwd, bwd, cancel).await
}
