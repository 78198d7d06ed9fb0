//! The Linux test guest: a real kernel with a real network stack.
//!
//! The memtest guest proves memory integrity; this one proves that a VM's
//! addresses move with it. It is the Debian cloud kernel, unpacked from its
//! package, plus an initramfs built from `busybox-static` whose `/init`
//! loads virtio-net, configures `eth0` from `ferry.ip=`/`ferry.gw=` on the
//! kernel command line and serves a TCP echo service on port
//! [`ECHO_PORT`] (the kernel answers ping).
//!
//! ```text
//!   ensure() ─► cache hit? (…/guest/linux-<hash>/kernel-package exists) ─► LinuxGuest
//!                 └─ miss: write guest/linux/{build.sh,init} to a temp dir,
//!                          run build.sh <cache dir> (apt-get download, dpkg-deb -x,
//!                          busybox cpio, gzip) ─► LinuxGuest
//! ```
//!
//! The cache key is a hash of the build script and `/init`, so editing
//! either rebuilds. Nothing is installed on the host: `apt-get download`
//! and `dpkg-deb -x` only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The TCP port of the guest's echo service.
pub const ECHO_PORT: u16 = 7;

/// The line the guest prints on its serial console once `eth0` is set up.
pub const READY_MARKER: &str = "FERRY-GUEST-READY";

/// Memory the guest needs, MiB (boots in ~3 s under TCG with this).
pub const MEMORY_MIB: u32 = 128;

const BUILD_SCRIPT: &str = include_str!("../../guest/linux/build.sh");
const INIT: &str = include_str!("../../guest/linux/init");

/// Why the guest could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LinuxGuestError {
    /// No cache directory could be determined (neither `FERRY_GUEST_CACHE`
    /// nor `HOME` is set).
    #[error("no cache directory: set FERRY_GUEST_CACHE or HOME")]
    NoCacheDir,
    /// Writing the build inputs failed.
    #[error("preparing the build in {dir}")]
    Io {
        /// Where.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The build script failed (typically: `apt-get download` impossible —
    /// no network or no Debian package lists).
    #[error(
        "building the Linux test guest failed (it needs `apt-get download` of linux-image-cloud-amd64 and busybox-static): {stderr}"
    )]
    Build {
        /// The script's standard error.
        stderr: String,
    },
}

/// A built guest: boot it with `-kernel kernel -initrd initrd -append
/// cmdline(…)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxGuest {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// A static busybox for the host side (ping, nc).
    pub busybox: PathBuf,
}

impl LinuxGuest {
    /// The kernel command line that gives `eth0` the address `ip_cidr`
    /// (e.g. `10.0.0.5/24`) and optionally a default gateway.
    pub fn cmdline(ip_cidr: &str, gateway: Option<&str>) -> String {
        // No IPv6: its router solicitations and MLD reports would make an
        // idle guest talk, and the network tests rely on a silent one.
        let mut c = format!("console=ttyS0 quiet panic=-1 ipv6.disable=1 ferry.ip={ip_cidr}");
        if let Some(gw) = gateway {
            c.push_str(&format!(" ferry.gw={gw}"));
        }
        c
    }
}

/// One build at a time within a process (tests run in parallel).
static BUILD: Mutex<()> = Mutex::new(());

/// The cache root: `$FERRY_GUEST_CACHE`, else `$HOME/.cache/ferry/guest`.
pub fn cache_root() -> Result<PathBuf, LinuxGuestError> {
    if let Some(dir) = std::env::var_os("FERRY_GUEST_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").ok_or(LinuxGuestError::NoCacheDir)?;
    Ok(PathBuf::from(home).join(".cache/ferry/guest"))
}

/// The guest, built on first use and cached under [`cache_root`].
pub fn ensure() -> Result<LinuxGuest, LinuxGuestError> {
    ensure_in(&cache_root()?)
}

/// The guest, built on first use and cached under `root`.
pub fn ensure_in(root: &Path) -> Result<LinuxGuest, LinuxGuestError> {
    let dir = root.join(format!("linux-{:016x}", input_hash()));
    let guest = LinuxGuest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.gz"),
        busybox: dir.join("busybox"),
    };
    let done = dir.join("kernel-package");
    if done.exists() {
        return Ok(guest);
    }
    let _one = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if done.exists() {
        return Ok(guest);
    }
    let io = |dir: &Path| {
        let dir = dir.to_path_buf();
        move |source| LinuxGuestError::Io { dir, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    // Per process: another process may be building into `dir` too; each
    // build writes its outputs by rename, so either result is whole.
    let inputs = dir.join(format!(".inputs.{}", std::process::id()));
    std::fs::create_dir_all(&inputs).map_err(io(&inputs))?;
    let script = inputs.join("build.sh");
    std::fs::write(&script, BUILD_SCRIPT).map_err(io(&inputs))?;
    std::fs::write(inputs.join("init"), INIT).map_err(io(&inputs))?;
    let output = Command::new("sh").arg(&script).arg(&dir).output();
    // Best effort: a leftover input directory is harmless.
    let _ = std::fs::remove_dir_all(&inputs);
    let output = output.map_err(io(&inputs))?;
    if !output.status.success() || !done.exists() {
        return Err(LinuxGuestError::Build {
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(guest)
}

/// FNV-1a over the build inputs: the cache key.
fn input_hash() -> u64 {
    BUILD_SCRIPT
        .bytes()
        .chain([0])
        .chain(INIT.bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cmdline_carries_address_and_gateway() {
        assert_eq!(
            LinuxGuest::cmdline("10.0.0.5/24", Some("10.0.0.1")),
            "console=ttyS0 quiet panic=-1 ipv6.disable=1 ferry.ip=10.0.0.5/24 ferry.gw=10.0.0.1"
        );
        assert!(!LinuxGuest::cmdline("10.0.0.5/24", None).contains("gw"));
    }

    #[test]
    fn the_init_parses_the_parameters_the_cmdline_writes() {
        assert!(INIT.contains("ferry.ip=*"));
        assert!(INIT.contains("ferry.gw=*"));
        assert!(INIT.contains(READY_MARKER));
        assert!(INIT.contains(&format!("-p {ECHO_PORT} ")));
    }
}
