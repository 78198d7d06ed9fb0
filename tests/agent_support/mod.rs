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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry::agent::guest::{self, GuestConfig, GuestConsole};
use ferry::agent::migrate::{self, MigrationConfig};
use ferry::agent::pki::{ClusterCa, HostIdentity, TlsSettings};
use ferry::agent::qemu::QemuProcess;
use ferry::agent::relay::{
    ClientTransport, MigrationRef, MigrationTable, ServerTransport, SourceRelay, SourceRelayConfig,
    TargetRelay,
};
use ferry::agent::vms::VmManager;

/// QEMU-heavy tests take turns: two cores cannot run several TCG
/// migrations at once without every one of them crawling.
pub static QEMU_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A memtest guest's machine definition (identical on both sides).
pub fn guest_vm(dir: &Path, name: &str, memory_mib: u32, config: &GuestConfig) -> MachineSpec {
    let kernel = guest::install_kernel(dir).unwrap();
    let mut spec = MachineSpec::new(
        name,
        memory_mib,
        Boot::Kernel {
            kernel,
            initrd: None,
            cmdline: Some(config.append()),
        },
    );
    spec.extra_args = vec![
        "-device".into(),
        format!(
            "isa-debug-exit,iobase={:#x},iosize=0x04",
            guest::DEBUG_EXIT_IOBASE
        ),
        // A guest fault ends QEMU instead of rebooting into a fresh fill.
        "-no-reboot".into(),
    ];
    spec
}

/// The guest console of a VM (waits until the guest answers).
pub async fn console(vm: &QemuProcess) -> GuestConsole {
    let mut c = GuestConsole::connect_timeout(&vm.dir().serial_socket(), Duration::from_secs(10))
        .await
        .unwrap();
    c.wait_ready(Duration::from_secs(60)).await.unwrap();
    c
}

/// Two hosts on this machine: `a` (source) and `b` (target, with its TLS
/// relay on loopback), certificates from one cluster CA.
pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub guard: KillGuard,
    pub ca: ClusterCa,
    pub a: HostIdentity,
    pub b: HostIdentity,
    pub src: VmManager,
    pub dst: Arc<VmManager>,
    pub table: Arc<MigrationTable>,
    pub relay: TargetRelay,
}

impl Pair {
    pub async fn new() -> Pair {
        let tmp = tempdir();
        let ca = ClusterCa::generate("ferry test CA").unwrap();
        let a = ca.issue_host("host-a").unwrap();
        let b = ca.issue_host("host-b").unwrap();
        let table = Arc::new(MigrationTable::default());
        let server = TlsSettings::default().server_config(&b).unwrap();
        let relay = TargetRelay::bind(
            "127.0.0.1:0".parse().unwrap(),
            ServerTransport::Tls(server),
            table.clone(),
        )
        .await
        .unwrap();
        Pair {
            src: VmManager::new(state_dir(tmp.path(), "a")),
            dst: Arc::new(VmManager::new(state_dir(tmp.path(), "b"))),
            tmp,
            guard: KillGuard::default(),
            ca,
            a,
            b,
            table,
            relay,
        }
    }

    pub fn migration(&self, name: &str) -> MigrationRef {
        MigrationRef {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    /// A source relay for `vm` sending as `identity` to `addr` (normally
    /// the target relay's address).
    pub async fn source_relay(
        &self,
        vm: &QemuProcess,
        migration: &MigrationRef,
        identity: &HostIdentity,
        addr: SocketAddr,
        config: &MigrationConfig,
    ) -> SourceRelay {
        let tls = TlsSettings::default().client_config(identity).unwrap();
        SourceRelay::start(SourceRelayConfig {
            migration: migration.clone(),
            source_host: identity.host.clone(),
            target_host: "host-b".into(),
            target_addr: addr,
            socket_path: migrate::source_socket(vm),
            transport: ClientTransport::Tls(tls),
            bandwidth: config.bandwidth.relay_limit(),
        })
        .await
        .unwrap()
    }
}
