//! The agent's own handle on a VM NIC's tap, and the frames it sends as
//! the VM.
//!
//! The agent opens each tap itself and hands the file to QEMU
//! (`-netdev tap,fd=N`), keeping a copy. Writing to that file is sending
//! from the VM's side of the tap: the frame enters the host bridge through
//! the VM's port, exactly as the guest's own frames do, so every bridge on
//! the segment learns the VM's MAC there. That lets the target agent speak
//! for the VM while its QEMU cannot:
//!
//! ```text
//!  source QEMU  STOP ─► source agent ══ control channel ══► target agent
//!                                                          discard what queued on the target tap
//!                                                          RARP from the VM's MAC ──► bridges learn
//!  client frames sent during the pause now go to the target tap and wait in
//!  its queue (QEMU does not read a tap while the VM is not running) until
//!  the target's vCPUs start, instead of dying on the stopped source.
//! ```
//!
//! The RARP is the frame QEMU's own announce sends (`net/announce.c`). The
//! agent never reads from a tap whose VM runs: [`TapHandle::discard_queued`]
//! is for a target whose guest has not started.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

use super::tap::NetError;

/// QEMU's self-announce frame: an Ethernet broadcast of a RARP request
/// (EtherType 0x8035) whose sender and target hardware addresses are the
/// VM's MAC, padded to the 60-byte minimum frame.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // RARP request
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

/// Parses `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// An open tap, attached to the persistent device of that name, in the
/// mode QEMU itself opens it (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), so the
/// guest sees the same offloads whichever way its QEMU got the tap.
#[derive(Debug)]
pub struct TapHandle {
    name: String,
    mac: [u8; 6],
    fd: OwnedFd,
}

fn ifreq(name: &str, flags: i32) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    req
}

impl TapHandle {
    /// Opens tap `name` (it must exist: [`super::ensure_tap`]) for the NIC
    /// with `mac`. The file is close-on-exec; [`TapHandle::inherit_fd`]
    /// gives QEMU its copy.
    pub fn open(name: &str, mac: &str) -> Result<TapHandle, NetError> {
        let fail = |what: &str, e: io::Error| NetError::Tap {
            tap: name.to_string(),
            what: what.to_string(),
            source: e,
        };
        let mac = parse_mac(mac).ok_or_else(|| {
            fail(
                "parsing the NIC's MAC",
                io::Error::new(io::ErrorKind::InvalidInput, format!("bad MAC {mac:?}")),
            )
        })?;
        // SAFETY: a plain open(2) of a NUL-terminated path.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(fail("opening /dev/net/tun", io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor we just opened and own.
        let mut fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if raw < 3 {
            // A closed stdio slot was reused: move it out of the way of the
            // child's stdin/stdout/stderr.
            // SAFETY: F_DUPFD_CLOEXEC on a valid descriptor.
            let moved = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 3) };
            if moved < 0 {
                return Err(fail(
                    "moving the tap descriptor",
                    io::Error::last_os_error(),
                ));
            }
            // SAFETY: as above, a descriptor we now own.
            fd = unsafe { OwnedFd::from_raw_fd(moved) };
        }
        let mut req = ifreq(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(fail(
                "attaching to the tap (TUNSETIFF)",
                io::Error::last_os_error(),
            ));
        }
        Ok(TapHandle {
            name: name.to_string(),
            mac,
            fd,
        })
    }

    /// Whether a link called `name` exists in this thread's network
    /// namespace (opening a tap that does not would create a new one).
    pub fn exists_here(name: &str) -> bool {
        let Ok(c) = std::ffi::CString::new(name) else {
            return false;
        };
        // SAFETY: if_nametoindex reads the NUL-terminated name.
        unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
    }

    /// The tap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor, for `-netdev tap,fd=<this>`.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Clears close-on-exec on `fd` so that a child started after fork
    /// keeps it at the same number. Async-signal-safe: for `pre_exec`.
    pub fn inherit_fd(fd: RawFd) -> io::Result<()> {
        // SAFETY: fcntl on a descriptor number; no memory is touched.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads and drops every frame queued for the VM: frames that reached
    /// a migration target's tap before the switchover (floods the source's
    /// copy of the guest has seen). Only for a VM whose vCPUs have not
    /// started: a running QEMU reads its tap itself. Returns how many.
    pub fn discard_queued(&self) -> io::Result<usize> {
        let mut buf = vec![0u8; 65_536 + 64];
        let mut n = 0;
        loop {
            // SAFETY: reading into a buffer we own, of the length given.
            let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(n),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if r == 0 {
                return Ok(n);
            }
            n += 1;
        }
    }

    /// Sends the VM's RARP announce into the bridge from the VM's side of
    /// the tap, with the virtio-net header the tap expects (all zero: no
    /// offload).
    pub fn announce(&self) -> io::Result<()> {
        let header = self.vnet_header_len()?;
        let mut frame = vec![0u8; header];
        frame.extend_from_slice(&rarp_frame(self.mac));
        // SAFETY: writing a buffer we own, of the length given.
        let r = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Length of the virtio-net header in front of every frame: 0 without
    /// `IFF_VNET_HDR`, else the size QEMU set (10 or 12 bytes).
    fn vnet_header_len(&self) -> io::Result<usize> {
        let mut req = ifreq("", 0);
        // SAFETY: TUNGETIFF fills the ifreq we pass.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNGETIFF set the flags member.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        if flags & libc::IFF_VNET_HDR == 0 {
            return Ok(0);
        }
        let mut size: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(size).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announce_is_qemus_rarp() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        assert_eq!(&f[..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac, "from the VM's MAC");
        assert_eq!(&f[12..14], &[0x80, 0x35], "RARP");
        assert_eq!(
            &f[14..22],
            &[0, 1, 8, 0, 6, 4, 0, 3],
            "Ethernet/IPv4, request"
        );
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert!(f[38..].iter().all(|b| *b == 0));
    }

    #[test]
    fn macs_parse_exactly() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f"),
            Some([0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f])
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
