//! Two agent hosts on one segment, each a network namespace holding the
//! agent's pieces: a `VmManager` whose QEMUs run in the namespace, a
//! target relay listening on the host's migration address, and a runtime
//! whose threads live in the namespace (so that the relays' connections
//! leave from there and the agent opens the VM's taps there). Used by
//! `benches/outage.rs` and `tests/net_switchover.rs`.
//!
//! ```text
//!  host a ns: br-ferry ─ tap ─ QEMU     host b ns: br-ferry ─ tap ─ QEMU
//!        └──── mig veth 10.81.0.1 ◄──────────► 10.81.0.2 ────┘
//!        relay listener, runtime threads       relay listener, runtime threads
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use ferry::agent::linux_guest::{LinuxGuest, MEMORY_MIB};
use ferry::agent::machine::{Boot, MachineSpec, NicSpec};
use ferry::agent::migrate::{self, MigrationConfig, TargetHandle};
use ferry::agent::net::{self, BridgeMap};
use ferry::agent::pki::{ClusterCa, TlsSettings};
use ferry::agent::qemu::QemuProcess;
use ferry::agent::relay::{
    ClientTransport, MigrationRef, MigrationTable, ServerTransport, SourceRelay, SourceRelayConfig,
    TargetRelay,
};
use ferry::agent::vms::VmManager;

use super::{GUEST_IP, MAC, in_ns};

/// The VM's name on both hosts.
pub const VM: &str = "default.web";

/// One host: a network namespace with its agent's pieces.
pub struct Host {
    pub name: &'static str,
    pub ns: String,
    /// Address on the migration network.
    pub addr: Ipv4Addr,
    pub vms: Arc<VmManager>,
    pub relay: TargetRelay,
    pub table: Arc<MigrationTable>,
    pub client: Arc<rustls::ClientConfig>,
    /// Runs in the host's namespace: its relays, and whatever must open
    /// the host's taps (starting its QEMUs).
    pub rt: tokio::runtime::Runtime,
}

impl Host {
    pub fn new(
        name: &'static str,
        ns: &str,
        addr: Ipv4Addr,
        root: &Path,
        ca: &ClusterCa,
    ) -> anyhow::Result<Host> {
        let enter = ns.to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = net::enter(&enter) {
                    panic!("a host thread cannot enter its namespace: {e}");
                }
            })
            .build()?;
        let id = ca.issue_host(name)?;
        let tls = TlsSettings::default();
        let listener = in_ns(ns, move || std::net::TcpListener::bind((addr, 0)))
            .join()
            .map_err(|_| anyhow!("binding the relay panicked"))??;
        let table = Arc::new(MigrationTable::default());
        let relay = {
            let _in_rt = rt.enter();
            TargetRelay::from_std(
                listener,
                ServerTransport::Tls(tls.server_config(&id)?),
                table.clone(),
            )?
        };
        Ok(Host {
            name,
            ns: ns.to_string(),
            addr,
            vms: Arc::new(VmManager::with_binary(root.join(name), qemu_in(root, ns)?)),
            relay,
            table,
            client: tls.client_config(&id)?,
            rt,
        })
    }

    /// Starts the VM here (from a thread of the host's namespace, so the
    /// agent opens its tap and keeps a handle on it).
    pub async fn start(&self, spec: &MachineSpec) -> anyhow::Result<Arc<QemuProcess>> {
        let (vms, spec) = (self.vms.clone(), spec.clone());
        Ok(self
            .rt
            .spawn(async move { vms.start(&spec, false).await })
            .await??)
    }

    /// Prepares a migration target here, as the agent does.
    pub async fn prepare_target(
        &self,
        spec: &MachineSpec,
        config: &MigrationConfig,
    ) -> anyhow::Result<TargetHandle> {
        let (vms, spec, config) = (self.vms.clone(), spec.clone(), config.clone());
        Ok(self
            .rt
            .spawn(async move { migrate::prepare_target(&vms, &spec, &config).await })
            .await??)
    }

    /// Expects migration `tag`-`n` of `from` into `target` here, as the
    /// target agent does; with `announce`, the target announces the guest
    /// at the source's stop (the control channel). Returns the migration.
    pub fn expect(
        &self,
        from: &Host,
        tag: &str,
        n: usize,
        target: &TargetHandle,
        announce: bool,
    ) -> anyhow::Result<MigrationRef> {
        let m = MigrationRef {
            namespace: "default".into(),
            name: format!("{tag}-{n}"),
            uid: format!("{tag}-uid-{n}"),
        };
        self.table
            .expect(m.clone(), from.name, target.incoming_socket());
        if announce {
            let hook = target
                .switchover_hook()
                .ok_or_else(|| anyhow!("the target agent holds no tap of the VM"))?;
            self.table.on_source_stopped(&m.uid, hook);
        }
        Ok(m)
    }

    /// The source relay of migration `m` of `vm` from here to `to`, over
    /// mutual TLS.
    pub async fn source_relay(
        &self,
        to: &Host,
        m: &MigrationRef,
        vm: &QemuProcess,
        config: &MigrationConfig,
    ) -> anyhow::Result<SourceRelay> {
        let relay_config = SourceRelayConfig {
            migration: m.clone(),
            source_host: self.name.into(),
            target_host: to.name.into(),
            target_addr: SocketAddr::new(to.addr.into(), to.relay.local_addr().port()),
            socket_path: migrate::source_socket(vm),
            transport: ClientTransport::Tls(self.client.clone()),
            bandwidth: config.bandwidth.relay_limit(),
        };
        Ok(self.rt.spawn(SourceRelay::start(relay_config)).await??)
    }
}

/// A QEMU "binary" that runs the real one inside network namespace `ns`.
pub fn qemu_in(dir: &Path, ns: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("qemu-{ns}"));
    std::fs::write(
        &path,
        format!("#!/bin/sh\nexec ip netns exec {ns} qemu-system-x86_64 \"$@\"\n"),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path.to_string_lossy().into_owned())
}

/// Runs `f` in namespace `ns` without blocking the runtime.
pub async fn in_host_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let ns = ns.to_string();
    tokio::task::spawn_blocking(move || in_ns(&ns, f).join())
        .await?
        .map_err(|_| anyhow!("a thread in a host namespace panicked"))
}

/// The VM's definition with its NIC on a tap of `br-ferry` in `ns` (the tap
/// is created, as the agent there would).
pub async fn spec_in(ns: &str, g: &LinuxGuest) -> anyhow::Result<MachineSpec> {
    let mut spec = MachineSpec::new(
        VM,
        MEMORY_MIB,
        Boot::Kernel {
            kernel: g.kernel.clone(),
            initrd: Some(g.initrd.clone()),
            cmdline: Some(LinuxGuest::cmdline(&format!("{GUEST_IP}/24"), None)),
        },
    );
    spec.uuid = uuid::Uuid::from_u128(0x5);
    spec.nics.push(NicSpec {
        mac: MAC.into(),
        tap: None,
    });
    let spec = in_host_ns(ns, move || {
        let bridges = BridgeMap::parse(&["default=br-ferry"])?;
        net::prepare_taps(&mut spec, &["default".to_string()], &bridges)?;
        Ok::<_, anyhow::Error>(spec)
    })
    .await??;
    Ok(spec)
}

/// Kills every QEMU registered on the way out, even on failure.
#[derive(Default)]
pub struct KillOnDrop(Mutex<Vec<i32>>);

impl KillOnDrop {
    pub fn add(&self, pid: i32) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
