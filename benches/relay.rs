//! Migration throughput: QEMU → QEMU directly over a unix socket (the
//! limit) against a plain userspace relay (socat with 256 KiB buffers, the
//! proxy design KubeVirt uses) over TCP and over OpenSSL with mutual
//! authentication, and against Ferry's relay in plain mode and with mutual
//! TLS, on the same guest filled with non-zero data, rounds interleaved.
//! Relay CPU is this process's for Ferry's relay, the socat processes' for
//! socat.
//!
//! `cargo bench --bench relay`. Environment: `FERRY_BENCH_MIB` (guest
//! memory, default 1024), `FERRY_BENCH_ROUNDS` (default 3),
//! `FERRY_BENCH_MULTIFD` (channels, default 0 = single stream),
//! `FERRY_BENCH_MODES` (a comma list of `direct`, `socat-plain`,
//! `socat-tls`, `relay-plain`, `relay-tls`, `relay-tls-rustls` — Ferry's
//! TLS with rustls carrying every byte, as before its record layer; default all — a subset is for
//! profiling one path, ratios are printed for the modes present).
//!
//! The guest migrates back and forth between two "hosts" (two agents'
//! state directories and relays on loopback), so it is filled once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::agent::guest::{self, GuestConfig, GuestConsole};
use ferry::agent::migrate::{self, AUTO_MAX_BANDWIDTH, MigrationConfig};
use ferry::agent::pki::{ClusterCa, TlsSettings};
use ferry::agent::qemu::{Boot, MachineSpec, QemuProcess};
use ferry::agent::qmp::{self, MigrationStatus};
use ferry::agent::relay::{
    ClientTransport, MigrationRef, MigrationTable, ServerTransport, SourceRelay, SourceRelayConfig,
    TargetRelay,
};
use ferry::agent::vms::VmManager;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Direct,
    SocatPlain,
    SocatTls,
    RelayPlain,
    RelayTls,
    RelayTlsRustls,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::SocatPlain => "socat-plain",
            Mode::SocatTls => "socat-tls",
            Mode::RelayPlain => "relay-plain",
            Mode::RelayTls => "relay-tls",
            Mode::RelayTlsRustls => "relay-tls-rustls",
        }
    }
}

/// The modes to run: all, or those `FERRY_BENCH_MODES` names.
fn modes() -> Vec<Mode> {
    let Ok(list) = std::env::var("FERRY_BENCH_MODES") else {
        return MODES.to_vec();
    };
    let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
    for w in &wanted {
        assert!(
            MODES.iter().any(|m| m.name() == *w),
            "FERRY_BENCH_MODES: unknown mode {w:?} (known: {})",
            MODES.map(Mode::name).join(", ")
        );
    }
    MODES
        .into_iter()
        .filter(|m| wanted.contains(&m.name()))
        .collect()
}

const MODES: [Mode; 6] = [
    Mode::Direct,
    Mode::SocatPlain,
    Mode::SocatTls,
    Mode::RelayPlain,
    Mode::RelayTls,
    Mode::RelayTlsRustls,
];

struct Host {
    name: String,
    /// `ca.crt`, `host.crt`, `host.key` (for socat's OpenSSL).
    pki: PathBuf,
    vms: VmManager,
    tls: (TargetRelay, Arc<MigrationTable>),
    plain: (TargetRelay, Arc<MigrationTable>),
    client: Arc<rustls::ClientConfig>,
}

struct Round {
    mode: Mode,
    bytes: u64,
    qemu_ms: u64,
    downtime_ms: u64,
    /// CPU the relays (this process) spent, seconds.
    relay_cpu: f64,
}

impl Round {
    /// Bytes per second, over QEMU's own total time.
    fn rate(&self) -> f64 {
        self.bytes as f64 / (self.qemu_ms as f64 / 1000.0)
    }
}

/// This process's user + system CPU time in seconds (/proc, 100 Hz ticks):
/// unlike throughput, it hardly depends on what else loads the machine.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn host(root: &std::path::Path, name: &str, ca: &ClusterCa) -> Host {
    let id = ca.issue_host(name).unwrap();
    let pki = root.join(format!("{name}-pki"));
    id.save(&pki).unwrap();
    let tls = TlsSettings::default();
    let relay = |transport| async {
        let table = Arc::new(MigrationTable::default());
        let r = TargetRelay::bind("127.0.0.1:0".parse().unwrap(), transport, table.clone())
            .await
            .unwrap();
        (r, table)
    };
    Host {
        name: name.into(),
        pki,
        vms: VmManager::new(root.join(name)),
        tls: relay(ServerTransport::Tls(tls.server_config(&id).unwrap())).await,
        plain: relay(ServerTransport::InsecurePlain).await,
        client: tls.client_config(&id).unwrap(),
    }
}

/// CPU seconds a process has used so far (0 once it is gone).
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Whether something listens on 127.0.0.1:`port` (without connecting,
/// which socat would take for the migration).
fn listening(port: u16) -> bool {
    let needle = format!("0100007F:{port:04X} 00000000:0000 0A");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.contains(&needle))
}

/// The two socat processes of one migration: target side listening on TCP
/// (or OpenSSL) and delivering to the target QEMU's socket, source side
/// listening on a unix socket for the source QEMU.
struct Socat {
    children: Vec<Child>,
    socket: PathBuf,
}

impl Socat {
    async fn start(
        tls: bool,
        multifd: bool,
        from: &Host,
        to: &Host,
        src_dir: &Path,
        incoming: &Path,
    ) -> Socat {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let fork = if multifd { ",fork" } else { "" };
        let creds = |h: &Host| {
            format!(
                "cert={0}/host.crt,key={0}/host.key,cafile={0}/ca.crt,verify=1",
                h.pki.display()
            )
        };
        let listen = if tls {
            format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr{fork},{}",
                creds(to)
            )
        } else {
            format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr{fork}")
        };
        let spawn = |a: String, b: String| {
            Command::new("socat")
                .args(["-b262144", &a, &b])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("socat (apt-get install socat)")
        };
        let target = spawn(listen, format!("UNIX-CONNECT:{}", incoming.display()));
        while !listening(port) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let socket = src_dir.join("socat.sock");
        let connect = if tls {
            format!(
                "OPENSSL:127.0.0.1:{port},commonname={},{}",
                to.name,
                creds(from)
            )
        } else {
            format!("TCP:127.0.0.1:{port}")
        };
        let source = spawn(
            format!("UNIX-LISTEN:{},unlink-early{fork}", socket.display()),
            connect,
        );
        while !socket.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Socat {
            children: vec![source, target],
            socket,
        }
    }

    /// CPU the socat processes have used.
    fn cpu(&self) -> f64 {
        self.children.iter().map(|c| process_cpu(c.id())).sum()
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn migrate_once(
    mode: Mode,
    n: usize,
    spec: &MachineSpec,
    config: &MigrationConfig,
    from: &Host,
    vm: &Arc<QemuProcess>,
    to: &Host,
) -> (Round, Arc<QemuProcess>) {
    let target = migrate::prepare_target(&to.vms, spec, config)
        .await
        .unwrap();
    let mref = MigrationRef {
        namespace: "bench".into(),
        name: format!("m{n}"),
        uid: format!("u{n}"),
    };
    let relay_to = |(relay, table): &(TargetRelay, Arc<MigrationTable>)| -> SocketAddr {
        table.expect(mref.clone(), &from.name, target.incoming_socket());
        relay.local_addr()
    };
    let socat = match mode {
        Mode::SocatPlain | Mode::SocatTls => Some(
            Socat::start(
                mode == Mode::SocatTls,
                config.multifd_channels.is_some(),
                from,
                to,
                vm.dir().path(),
                &target.incoming_socket(),
            )
            .await,
        ),
        _ => None,
    };
    let relay = match mode {
        Mode::Direct | Mode::SocatPlain | Mode::SocatTls => None,
        Mode::RelayPlain | Mode::RelayTls | Mode::RelayTlsRustls => {
            let (addr, transport) = match mode {
                Mode::RelayTls => (relay_to(&to.tls), ClientTransport::Tls(from.client.clone())),
                Mode::RelayTlsRustls => (
                    relay_to(&to.tls),
                    ClientTransport::TlsRustlsOnly(from.client.clone()),
                ),
                _ => (relay_to(&to.plain), ClientTransport::InsecurePlain),
            };
            Some(
                SourceRelay::start(SourceRelayConfig {
                    migration: mref.clone(),
                    source_host: from.name.clone(),
                    target_host: to.name.clone(),
                    target_addr: addr,
                    socket_path: migrate::source_socket(vm),
                    transport,
                    bandwidth: None,
                })
                .await
                .unwrap(),
            )
        }
    };
    let uri = match (&relay, &socat) {
        (Some(r), _) => format!("unix:{}", r.socket_path().display()),
        (None, Some(s)) => format!("unix:{}", s.socket.display()),
        (None, None) => format!("unix:{}", target.incoming_socket().display()),
    };
    let q = vm.qmp();
    let caps = [("multifd", config.multifd_channels.is_some())];
    q.execute(&qmp::MigrateSetCapabilities {
        capabilities: caps
            .iter()
            .map(|(c, s)| qmp::CapabilityState {
                capability: c.to_string(),
                state: *s,
            })
            .collect(),
    })
    .await
    .unwrap();
    q.execute(&qmp::MigrateSetParameters {
        max_bandwidth: Some(AUTO_MAX_BANDWIDTH),
        downtime_limit: Some(config.downtime_limit.as_millis() as u64),
        multifd_channels: config.multifd_channels,
        ..Default::default()
    })
    .await
    .unwrap();
    let cpu0 = cpu_seconds();
    q.execute(&qmp::Migrate { uri, resume: None })
        .await
        .unwrap();
    let info = loop {
        let info = q.execute(&qmp::QueryMigrate {}).await.unwrap();
        match info.status {
            Some(MigrationStatus::Completed) => break info,
            Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                panic!("{mode:?} migration failed: {:?}", info.error_desc)
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    // socat lingers half a second after the stream ends: its CPU is read
    // while it is still there.
    let mut relay_cpu = match &socat {
        Some(s) => s.cpu(),
        None => cpu_seconds() - cpu0,
    };
    // socat may still hold the stream's tail for the target: it goes only
    // once the target runs.
    target.wait_running(Duration::from_secs(60)).await.unwrap();
    if let Some(s) = &socat {
        relay_cpu = relay_cpu.max(s.cpu());
    }
    drop(socat);
    migrate::finish_source(&from.vms, vm).await.unwrap();
    let ram = info.ram.unwrap_or_default();
    let round = Round {
        mode,
        bytes: ram.transferred,
        qemu_ms: info.total_time.unwrap_or(0).max(1),
        downtime_ms: info.downtime.unwrap_or(0),
        relay_cpu,
    };
    (round, target.vm().clone())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib = env("FERRY_BENCH_MIB", 1024) as u32;
    let rounds = env("FERRY_BENCH_ROUNDS", 3) as usize;
    let modes = modes();
    let multifd = match env("FERRY_BENCH_MULTIFD", 0) {
        0 => None,
        n => Some(n as u8),
    };
    let tmp = tempfile::Builder::new()
        .prefix("fb")
        .tempdir_in("/tmp")
        .unwrap();
    let ca = ClusterCa::generate("bench").unwrap();
    let a = host(tmp.path(), "host-a", &ca).await;
    let b = host(tmp.path(), "host-b", &ca).await;
    let kernel = guest::install_kernel(tmp.path()).unwrap();
    let guest_cfg = GuestConfig::default(); // fills all RAM but 4 MiB, idle
    let mut spec = MachineSpec::new(
        "bench",
        mib,
        Boot::Kernel {
            kernel,
            initrd: None,
            cmdline: Some(guest_cfg.append()),
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
    let config = MigrationConfig {
        multifd_channels: multifd,
        ..MigrationConfig::default()
    };
    let mut vm = a.vms.start(&spec, false).await.unwrap();
    let mut console =
        GuestConsole::connect_timeout(&vm.dir().serial_socket(), Duration::from_secs(10))
            .await
            .unwrap();
    let ready = console.wait_ready(Duration::from_secs(300)).await.unwrap();
    drop(console);
    println!(
        "guest {mib} MiB, {} pages filled with non-zero data; multifd {:?}; {rounds} rounds",
        ready.pages, multifd
    );
    let idle_rss = rss_kib("VmRSS:");
    let mut results = Vec::new();
    let mut on_a = true;
    let started = Instant::now();
    for r in 0..rounds {
        // The guest moves back and forth, and on this machine a
        // migration's speed can depend on its direction (relay-tls ran at
        // ~300 MiB/s one way and ~700 the other in one run, for reasons not
        // found): every other round runs the modes in reverse, so that with
        // an even number of modes each one still runs both ways.
        let mut order = modes.clone();
        if r % 2 == 1 {
            order.reverse();
        }
        for mode in order {
            let (from, to) = if on_a { (&a, &b) } else { (&b, &a) };
            let n = results.len();
            let (round, next) = migrate_once(mode, n, &spec, &config, from, &vm, to).await;
            println!(
                "round {r} {:<14} {} → {} {:>8.1} MiB/s  ({} MiB in {} ms, downtime {} ms, relay CPU {:.2} s)",
                format!("{mode:?}"),
                from.name,
                to.name,
                round.rate() / (1 << 20) as f64,
                round.bytes >> 20,
                round.qemu_ms,
                round.downtime_ms,
                round.relay_cpu
            );
            results.push(round);
            vm = next;
            on_a = !on_a;
        }
    }
    let rate = |m: Mode| {
        median(
            results
                .iter()
                .filter(|r| r.mode == m)
                .map(Round::rate)
                .collect(),
        )
    };
    let cpu_per_gib = |m: Mode| {
        median(
            results
                .iter()
                .filter(|r| r.mode == m)
                .map(|r| r.relay_cpu / (r.bytes as f64 / (1u64 << 30) as f64))
                .collect(),
        )
    };
    let has = |m: Mode| modes.contains(&m);
    let ratio = |a: Mode, b: Mode| (has(a) && has(b)).then(|| rate(a) / rate(b));
    // The same ratio within each round (the modes of a round run back to
    // back), then the median: steadier than a ratio of medians when the
    // machine's speed drifts between rounds.
    let paired = |a: Mode, b: Mode| {
        (has(a) && has(b)).then(|| {
            median(
                results
                    .chunks(modes.len())
                    .filter_map(|round| {
                        let of = |m: Mode| round.iter().find(|r| r.mode == m);
                        let (x, y) = (of(a)?, of(b)?);
                        Some(x.rate() / y.rate())
                    })
                    .collect(),
            )
        })
    };
    let shown = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
    println!("\nmedian of {rounds} rounds (QEMU's own total-time):");
    for &m in &modes {
        println!(
            "  {:<14} {:>8.1} MiB/s   ratio to direct {}   relay CPU {:.2} s/GiB",
            format!("{m:?}"),
            rate(m) / (1 << 20) as f64,
            shown(ratio(m, Mode::Direct)),
            cpu_per_gib(m)
        );
    }
    println!(
        "  Ferry TLS / socat TLS {}   Ferry plain / socat plain {}   Ferry records / rustls {}",
        shown(ratio(Mode::RelayTls, Mode::SocatTls)),
        shown(ratio(Mode::RelayPlain, Mode::SocatPlain)),
        shown(ratio(Mode::RelayTls, Mode::RelayTlsRustls))
    );
    println!(
        "  per round, median: Ferry TLS / direct {}   Ferry plain / direct {}   Ferry TLS / socat TLS {}   Ferry plain / socat plain {}   Ferry records / rustls {}",
        shown(paired(Mode::RelayTls, Mode::Direct)),
        shown(paired(Mode::RelayPlain, Mode::Direct)),
        shown(paired(Mode::RelayTls, Mode::SocatTls)),
        shown(paired(Mode::RelayPlain, Mode::SocatPlain)),
        shown(paired(Mode::RelayTls, Mode::RelayTlsRustls))
    );
    println!(
        "bench process (agents' relays) RSS: idle {} MiB, peak {} MiB; wall {:.1} s",
        idle_rss >> 10,
        rss_kib("VmHWM:") >> 10,
        started.elapsed().as_secs_f64()
    );
    let owner = if on_a { &a } else { &b };
    owner
        .vms
        .stop("bench", Duration::from_secs(10))
        .await
        .unwrap();
}
