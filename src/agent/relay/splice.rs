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
        up.ready_read().await.map_err(PumpError::ReadUpstream)?;
        let n = match up.attempt(Interest::READABLE, || {
            splice(up.as_fd(), None, &pw, None, FORWARD_CHUNK, FLAGS).map_err(io::Error::from)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(PumpError::ReadUpstream(e)),
        };
        if let Some(l) = limiter {
            l.acquire(n).await;
        }
        let mut left = n;
        while left > 0 {
            down.ready_write()
                .await
                .map_err(PumpError::WriteDownstream)?;
            match down.attempt(Interest::WRITABLE, || {
                splice(&pr, None, down.as_fd(), None, left, FLAGS).map_err(io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(PumpError::WriteDownstream(e)),
            }
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

/// Reads what is there (waits for something); 0 at the end of the stream.
pub(super) async fn read_some<S: SpliceSocket>(s: &S, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.ready_read().await?;
        match s.attempt(Interest::READABLE, || {
            nix::unistd::read(s.as_fd(), buf).map_err(io::Error::from)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Like [`read_some`], scattering into `bufs` (one `readv`).
pub(super) async fn read_vectored<S: SpliceSocket>(
    s: &S,
    bufs: &mut [io::IoSliceMut<'_>],
) -> io::Result<usize> {
    loop {
        s.ready_read().await?;
        match s.attempt(Interest::READABLE, || {
            nix::sys::uio::readv(s.as_fd(), bufs).map_err(io::Error::from)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
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
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        s.ready_write().await?;
        match s.attempt(Interest::WRITABLE, || {
            nix::sys::uio::writev(s.as_fd(), bufs).map_err(io::Error::from)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
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
