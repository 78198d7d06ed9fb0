//! Shared helpers of the agent's QEMU-level tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry::agent::qemu::{Boot, CacheMode, DiskSpec, MachineSpec, pid_alive};

/// Kills every QEMU it was told about when dropped (also on test failure).
#[derive(Default)]
pub struct KillGuard(Mutex<Vec<i32>>);

impl KillGuard {
    pub fn watch(&self, pid: i32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().drain(..) {
            if pid_alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A unique temp dir with a short path (unix socket paths are ≤ 107 bytes).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fa")
        .tempdir_in("/tmp")
        .unwrap()
}

/// A blank disk image and `fill_mib` MiB of random data loaded into guest
/// RAM at 16 MiB, so that migration has non-zero pages to carry. Without a
/// bootable disk the firmware idles, which is all these tests need.
pub fn blank_vm(dir: &Path, name: &str, memory_mib: u32, fill_mib: usize) -> MachineSpec {
    let disk = dir.join(format!("{name}.raw"));
    if !disk.exists() {
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    }
    let mut spec = MachineSpec::new(name, memory_mib, Boot::Disk);
    spec.disks.push(DiskSpec {
        path: disk,
        format: "raw".into(),
        cache: CacheMode::None,
    });
    if fill_mib > 0 {
        let blob = dir.join(format!("{name}.fill"));
        if !blob.exists() {
            let mut data = vec![0u8; fill_mib << 20];
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            for chunk in data.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            std::fs::write(&blob, data).unwrap();
        }
        spec.extra_args = vec![
            "-device".into(),
            format!("loader,file={},addr=0x1000000", blob.display()),
        ];
    }
    spec
}

pub fn state_dir(root: &Path, host: &str) -> PathBuf {
    let d = root.join(host);
    std::fs::create_dir_all(&d).unwrap();
    d
}
