//! The memtest test guest: a tiny kernel that proves a live migration moved
//! memory intact.
//!
//! The kernel is a 32-bit multiboot (v1) ELF built by `build.rs` from
//! `guest/memtest/` (C and assembly, Debian `gcc -m32` and `ld -m elf_i386`)
//! and embedded in every Ferry binary as [`MEMTEST_KERNEL`].
//! [`install_kernel`] writes it under a content-addressed name, and
//! [`qemu_args`] gives the QEMU arguments that boot it with `-kernel`. Source
//! and target of a migration must both boot it with `-kernel` (the multiboot
//! option ROM is a RAM block and the block lists must match) and the same
//! `-append`; the kernel's path may differ (the migration test installs it
//! in two directories), its content is the same in every Ferry binary.
//!
//! # What the guest does
//!
//! ```text
//!  boot ──► fill every page (generation 1) ──► READY ──► loop:
//!                                                ├─ dirty pages at `rate`
//!                                                ├─ measure dirty KiB/s each second
//!                                                └─ answer commands on COM1
//! ```
//!
//! The command line (`-append`) takes `fill=<MiB>` (default: all RAM above
//! the kernel but 4 MiB of headroom; the guest stops with `FATAL` if it does
//! not fit) and `rate=<MiB/s>|max` (default 0, idle). Dirtying rewrites one
//! page at a time with its next generation, walking all pages with a prime
//! stride (so dirty pages are spread over RAM) and paced by a token bucket on
//! PIT ticks (IRQ0 at ~1000.15 Hz); idle time is spent in `hlt`, so an idle
//! guest costs no host CPU. `max` rewrites as fast as the vCPU can (about
//! 1.3 GiB/s under TCG here).
//!
//! # Memory layout (physical, paging off)
//!
//! ```text
//!  0x000000 ─ 0x100000   BIOS area, untouched
//!  0x100000 ─ K          kernel: code, data, 16 KiB stack, IDT (`__kernel_end` = K)
//!  T = align4K(K)        generation table: one u32 per pattern page
//!  D = T + align4K(4·N)  N pattern pages of 4 KiB
//!  D + 4096·N ─ top      headroom (at least 4 MiB when `fill` is defaulted)
//! ```
//!
//! Pattern page `i` at generation `g` holds `word[0] = i`, `word[1] = g`, and
//! words 2..1024 an xorshift32 stream seeded by a hash of `(i, g)`: non-zero,
//! incompressible and different on every rewrite. `table[i] = g`. `verify`
//! recomputes every page from the table (a lost or stale page carries an old
//! generation or old content; a corrupted one differs) and checks that the
//! table sums to `N + writes` (a stale table page shows too).
//!
//! # Serial protocol (COM1, 115200 8N1, lines end in `\n`, replies in `\r\n`)
//!
//! Commands are at most 80 characters. The guest reads them only after the
//! fill and answers each with exactly one line, in order:
//!
//! ```text
//!  guest, at boot:  FERRY-MEMTEST version=1 mem_kib=K pages=N table=0x.. data=0x..
//!                   READY pages=N fill_ms=F rate=R
//!  ping [token]     PONG [token]
//!  status           STATUS pages=N gen=G writes=W rate=R dirty_kib_s=K ticks=T fill_ms=F version=1
//!  rate N|max       RATE OK rate=R                      (N in MiB/s, 0 = idle)
//!  verify           VERIFY OK pages=N writes=W
//!                   VERIFY BAD first=P|none count=C pages=N table=ok|bad
//!  corrupt [page]   CORRUPT OK page=P   (flips a word in page P, default N/2, without
//!                                        updating the table; the dirtier then skips P)
//!  exit N           EXIT code=N         then QEMU exits with status 2N+1 (N <= 127)
//!  fault            (executes `ud2`: the FAULT line below, vector=6)
//!  anything else    ERR <reason>        (unknown command, bad argument, line too long)
//!  on a CPU fault   FAULT vector=V error=E eip=0x..  then QEMU exits with status 253
//!  on a boot error  FATAL <reason>                   then QEMU exits with status 251
//! ```
//!
//! `gen` is the generation being written (1 + completed passes), `writes`
//! the page rewrites since the fill, `ticks` the uptime in PIT ticks (~1 ms).
//! Bytes sent before the guest initialised its UART are lost and the `READY`
//! line is lost when no client is connected, so [`GuestConsole::wait_ready`]
//! pings until answered instead of waiting for `READY`, then checks the
//! protocol version in `STATUS`.

mod console;
mod protocol;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use console::{DEFAULT_TIMEOUT, DEFAULT_VERIFY_TIMEOUT, GuestConsole, GuestError};
pub use protocol::{DirtyRate, GuestStatus, MAX_LINE, PROTOCOL_VERSION, ParseError, VerifyReport};

/// The memtest guest kernel (32-bit multiboot ELF), built from `guest/memtest/`.
pub const MEMTEST_KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memtest.elf"));

/// The QEMU chardev id [`qemu_args`] gives the serial socket.
pub const SERIAL_CHARDEV_ID: &str = "ser0";

/// I/O port of the `isa-debug-exit` device; the guest writes its exit code there.
pub const DEBUG_EXIT_IOBASE: u16 = 0xf4;

/// The code the guest exits with after a CPU exception (`FAULT`); QEMU's
/// status is then 253.
pub const FAULT_EXIT_CODE: u8 = 126;

/// The code the guest exits with when it cannot start (`FATAL`, e.g. `fill=`
/// larger than RAM); QEMU's status is then 251.
pub const FATAL_EXIT_CODE: u8 = 125;

/// QEMU's exit status when the guest wrote `code` to `isa-debug-exit`.
pub fn qemu_exit_status(code: u8) -> i32 {
    (i32::from(code) << 1) | 1
}

/// FNV-1a, 64 bits: a stable content name, not a security measure.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The file name [`install_kernel`] uses: it changes whenever the kernel does.
pub fn kernel_file_name() -> String {
    format!("ferry-memtest-{:016x}.elf", fnv1a64(MEMTEST_KERNEL))
}

/// Writes [`MEMTEST_KERNEL`] into `dir` under [`kernel_file_name`] unless an
/// identical file is already there, and returns its path. The write goes to a
/// temporary file renamed into place, so concurrent callers (a source and a
/// target on one host) never see a partial kernel.
pub fn install_kernel(dir: &Path) -> io::Result<PathBuf> {
    let path = dir.join(kernel_file_name());
    if fs::read(&path).is_ok_and(|existing| existing == MEMTEST_KERNEL) {
        return Ok(path);
    }
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.{}",
        kernel_file_name(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(MEMTEST_KERNEL)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, &path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(path)
}

/// How the guest is configured at boot (its `-append`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestConfig {
    /// MiB to fill; `None` fills all RAM above the kernel but 4 MiB.
    pub fill_mib: Option<u32>,
    /// The dirtying rate from boot on.
    pub rate: DirtyRate,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            fill_mib: None,
            rate: DirtyRate::Idle,
        }
    }
}

impl GuestConfig {
    /// The kernel command line: `fill=<MiB> rate=<MiB/s|max>`.
    pub fn append(&self) -> String {
        match self.fill_mib {
            Some(mib) => format!("fill={mib} rate={}", self.rate),
            None => format!("rate={}", self.rate),
        }
    }
}

/// QEMU option values double commas to keep them literal.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The QEMU arguments that boot the guest from `kernel` (see
/// [`install_kernel`]) with its COM1 on a unix socket at `serial_socket`
/// (QEMU listens there; connect with [`GuestConsole`]), `isa-debug-exit`
/// and `-no-reboot`.
/// Memory, accelerator, QMP and migration options are the caller's.
pub fn qemu_args(kernel: &Path, config: &GuestConfig, serial_socket: &Path) -> Vec<String> {
    vec![
        "-kernel".to_owned(),
        kernel.display().to_string(),
        "-append".to_owned(),
        config.append(),
        "-chardev".to_owned(),
        format!(
            "socket,id={SERIAL_CHARDEV_ID},path={},server=on,wait=off",
            qemu_escape(&serial_socket.display().to_string())
        ),
        "-serial".to_owned(),
        format!("chardev:{SERIAL_CHARDEV_ID}"),
        "-device".to_owned(),
        format!("isa-debug-exit,iobase={DEBUG_EXIT_IOBASE:#x},iosize=0x04"),
        // A triple fault must end the run, not reboot into a fresh fill that
        // would verify as intact.
        "-no-reboot".to_owned(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_kernel_is_a_32_bit_multiboot_elf() {
        assert_eq!(&MEMTEST_KERNEL[..5], b"\x7fELF\x01");
        let header = MEMTEST_KERNEL[..8192]
            .chunks_exact(4)
            .position(|w| w == 0x1BAD_B002u32.to_le_bytes())
            .expect("multiboot header in the first 8 KiB");
        assert!(header > 0);
    }

    #[test]
    fn install_is_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let first = install_kernel(dir.path()).unwrap();
        let second = install_kernel(dir.path()).unwrap();
        assert_eq!(first, second);
        assert_eq!(fs::read(&first).unwrap(), MEMTEST_KERNEL);
        assert!(
            first
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("ferry-memtest-")
        );
        fs::write(&first, b"damaged").unwrap();
        assert_eq!(
            fs::read(install_kernel(dir.path()).unwrap()).unwrap(),
            MEMTEST_KERNEL
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary files left"
        );
    }

    #[test]
    fn qemu_args_boot_the_kernel_with_serial_and_exit_device() {
        let config = GuestConfig {
            fill_mib: Some(64),
            rate: DirtyRate::MibPerSec(20),
        };
        let args = qemu_args(
            Path::new("/k/m.elf"),
            &config,
            Path::new("/run/a,b/ser.sock"),
        );
        assert_eq!(
            args,
            [
                "-kernel",
                "/k/m.elf",
                "-append",
                "fill=64 rate=20",
                "-chardev",
                "socket,id=ser0,path=/run/a,,b/ser.sock,server=on,wait=off",
                "-serial",
                "chardev:ser0",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-no-reboot",
            ]
        );
        assert_eq!(GuestConfig::default().append(), "rate=0");
        assert_eq!(qemu_exit_status(3), 7);
    }
}
