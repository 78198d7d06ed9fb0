//! The outage a client sees during a live migration: QEMU migrating
//! directly against Ferry's path, side by side, with `downtime-limit` 20 ms
//! and 300 ms (issue 9, "Performance").
//!
//! ```text
//!  client ns ── TCP counter every 10 ms (echo) ─┐
//!            ── ICMP echo every 10 ms ──────────┴─► guest 10.80.0.5 (128 MiB Linux, virtio-net)
//!                      one L2 segment (switch ns)
//!  host a ns: br-ferry ─ tap ─ QEMU             host b ns: br-ferry ─ tap ─ QEMU
//!        └──────── mig veth 10.81.0.1 ◄──────────► 10.81.0.2 ────────┘
//!  direct: source QEMU ── migrate tcp:<target>:4444 ──► target QEMU
//!  ferry:  prepare_target │ QEMU ─unix─► SourceRelay ═TLS 1.3, mTLS═► TargetRelay ─unix─► QEMU
//!          run_source     │ (relay threads in the source host's namespace, listener in the target's)
//!                         │ control channel: source STOP ──► target announces the guest from its tap
//!          wait_running (announce-self), finish_source, tap sweep
//! ```
//!
//! In Ferry's mode the target QEMU is prepared from a thread of the target
//! host's namespace, as the agent there does, so the agent holds the VM's
//! tap and announces the guest at the source's stop (docs/networking.md).
//! QEMU direct has nothing of the kind: its target announces once the guest
//! runs.
//!
//! Both modes start both QEMUs through the agent's `VmManager` from the same
//! machine definition, set the same capabilities (events on; multifd,
//! post-copy, auto-converge off), `max-bandwidth` of `Bandwidth::Auto` and
//! the same announce parameters on the target. Per migration the bench
//! records, over the window from `migrate` until the guest has run on the
//! target for [`SETTLE`]: the longest gap between ping replies, the longest
//! stall between TCP echoes, QEMU's `downtime`, and the real pause — the
//! source's `STOP` event to the target's `RESUME` event, in two parts: to
//! the source's migration completing (`MIGRATION` `completed`: its last
//! byte written, which is where QEMU's `downtime` ends), and from there to
//! the target's `RESUME` (what was still on its way carried and loaded; the
//! target's own `completed` comes after its `RESUME`). QMP stamps events
//! with the host's wall clock (`g_get_real_time`); both QEMUs run on this
//! machine, so the two stamps come from one clock.
//!
//! `cargo bench --bench outage`. `FERRY_OUTAGE_ROUNDS` (default 5):
//! migrations per mode and limit; `FERRY_OUTAGE_INTERVAL_MS` (default 10):
//! the client's pace; the guest moves back and forth, and the
//! four configurations are interleaved (reversed every other round, so each
//! one runs in both directions). Needs root and the Linux test guest;
//! without them it prints what is missing and exits 0.

#[path = "../tests/net_support/mod.rs"]
mod net_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use ferry::agent::linux_guest::{self, ECHO_PORT, LinuxGuest, MEMORY_MIB};
use ferry::agent::machine::MachineSpec;
use ferry::agent::migrate::{
    AUTO_MAX_BANDWIDTH, Action, MigrationConfig, ProgressSample, finish_source, run_source,
};
use ferry::agent::net::{self, Announce, SetAnnounceParameters};
use ferry::agent::pki::ClusterCa;
use ferry::agent::qemu::QemuProcess;
use ferry::agent::qmp::{self, Event, MigrationStatus};
use net_support::hosts::{Host, KillOnDrop, VM, in_host_ns, spec_in};
use net_support::outage::{EchoLog, Pinger, longest_gap, migration_link};
use net_support::{BOOT_TIMEOUT, GUEST_IP, scratch, segment};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Between two counters, and between two pings, unless
/// `FERRY_OUTAGE_INTERVAL_MS` says otherwise.
const INTERVAL_MS: usize = 10;
/// How long the guest runs on the target before a migration's window
/// closes (QEMU's announce rounds take ~1.25 s).
const SETTLE: Duration = Duration::from_secs(2);
/// The port the target QEMU listens on in direct mode.
const DIRECT_PORT: u16 = 4444;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Direct,
    Ferry,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Ferry => "ferry",
        }
    }
}

/// The migration capabilities Ferry sets (`MigrationConfig::default()`
/// without multifd, post-copy or auto-converge), for the direct mode.
fn capabilities() -> qmp::MigrateSetCapabilities {
    let cap = |name: &str, state| qmp::CapabilityState {
        capability: name.into(),
        state,
    };
    qmp::MigrateSetCapabilities {
        capabilities: vec![
            cap("events", true),
            cap("multifd", false),
            cap("postcopy-ram", false),
            cap("auto-converge", false),
        ],
    }
}

/// The guest has switched over: the target QEMU runs it.
struct Switched {
    target: Arc<QemuProcess>,
    qemu_downtime: Duration,
    /// When `migrate` was issued.
    started: Instant,
    /// When the target was seen running.
    running: Instant,
    target_events: broadcast::Receiver<Event>,
}

/// QEMU to QEMU over TCP on the migration network.
async fn direct(
    from: &Host,
    to: &Host,
    vm: &QemuProcess,
    spec: &MachineSpec,
    config: &MigrationConfig,
    kill: &KillOnDrop,
) -> anyhow::Result<Switched> {
    let target = to.vms.start(spec, true).await?;
    kill.add(target.pid());
    let tq = target.qmp();
    let target_events = tq.events();
    tq.execute(&capabilities()).await?;
    tq.execute(&SetAnnounceParameters::from(Announce::default()))
        .await?;
    let uri = format!("tcp:{}:{DIRECT_PORT}", to.addr);
    tq.execute(&qmp::MigrateIncoming { uri: uri.clone() })
        .await?;
    let sq = vm.qmp();
    sq.execute(&capabilities()).await?;
    sq.execute(&qmp::MigrateSetParameters {
        downtime_limit: Some(config.downtime_limit.as_millis() as u64),
        max_bandwidth: Some(AUTO_MAX_BANDWIDTH),
        ..Default::default()
    })
    .await?;
    let started = Instant::now();
    sq.execute(&qmp::Migrate { uri, resume: None }).await?;
    let deadline = started + Duration::from_secs(120);
    let info = loop {
        let info = sq.execute(&qmp::QueryMigrate {}).await?;
        match info.status {
            Some(MigrationStatus::Completed) => break info,
            Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                bail!(
                    "direct migration {} → {} failed: {:?}",
                    from.name,
                    to.name,
                    info.error_desc
                )
            }
            _ if Instant::now() > deadline => bail!("direct migration unfinished after 120 s"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let running = loop {
        if tq.execute(&qmp::QueryStatus {}).await?.running {
            break Instant::now();
        }
        if Instant::now() > deadline {
            bail!("the direct target never ran the guest");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    Ok(Switched {
        target,
        qemu_downtime: Duration::from_millis(info.downtime.unwrap_or(0)),
        started,
        running,
        target_events,
    })
}

/// The agent's halves and Ferry's relay over mutual TLS, with the target's
/// control channel: the target QEMU is prepared in its host's namespace,
/// so the agent holds its tap and announces the guest there when the
/// source says it stopped.
async fn ferry(
    n: usize,
    from: &Host,
    to: &Host,
    vm: &QemuProcess,
    spec: &MachineSpec,
    config: &MigrationConfig,
    kill: &KillOnDrop,
) -> anyhow::Result<Switched> {
    let target = to.prepare_target(spec, config).await?;
    kill.add(target.vm().pid());
    let target_events = target.vm().qmp().events();
    let migration = to.expect(from, "outage", n, &target, true)?;
    let relay = from.source_relay(to, &migration, vm, config).await?;
    let mut policy = |_: &[ProgressSample]| Action::Continue;
    let mut observer = |_: &ProgressSample| {};
    let started = Instant::now();
    let done = run_source(
        vm,
        &relay,
        config,
        &mut policy,
        &mut observer,
        &CancellationToken::new(),
    )
    .await?;
    target.wait_running(Duration::from_secs(60)).await?;
    let running = Instant::now();
    to.table.remove(&migration.uid);
    Ok(Switched {
        target: target.vm().clone(),
        qemu_downtime: done.downtime,
        started,
        running,
        target_events,
    })
}

/// What one migration looked like to the client and to QEMU.
struct Run {
    mode: Mode,
    limit_ms: u64,
    ping_gap: Duration,
    tcp_stall: Duration,
    real_pause: Option<Duration>,
    /// The real pause in two parts: the source's `STOP` to its migration
    /// completing (its last byte written), and that to the target's
    /// `RESUME` (the bytes still on their way carried and loaded).
    stopped_to_sent: Option<Duration>,
    sent_to_running: Option<Duration>,
    qemu_downtime: Duration,
}

/// When each event in the receiver's backlog first came, in µs since the
/// epoch; a `MIGRATION` event is keyed by its status (`MIGRATION:completed`).
fn event_times(rx: &mut broadcast::Receiver<Event>) -> BTreeMap<String, i64> {
    let mut at = BTreeMap::new();
    loop {
        match rx.try_recv() {
            Ok(e) => {
                let key = match e.data.get("status").and_then(|s| s.as_str()) {
                    Some(status) if e.name == "MIGRATION" => format!("MIGRATION:{status}"),
                    _ => e.name.clone(),
                };
                at.entry(key)
                    .or_insert(e.timestamp.seconds * 1_000_000 + e.timestamp.microseconds);
            }
            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return at,
        }
    }
}

/// From `a` to `b` (µs since the epoch), when both came and in that order.
fn between(a: Option<&i64>, b: Option<&i64>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) if b >= a => Some(Duration::from_micros((b - a) as u64)),
        _ => None,
    }
}

/// Everything the client side runs.
struct Client {
    echo: EchoLog,
    ping: Pinger,
}

impl Client {
    fn check(&self) -> anyhow::Result<()> {
        match self.echo.error() {
            Some(e) => bail!("the client's TCP connection failed: {e}"),
            None => Ok(()),
        }
    }

    /// Waits until both logs have `n` answers since `t`, and `t + min`.
    async fn wait_answers(&self, t: Instant, n: usize, min: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now().max(t + min) + BOOT_TIMEOUT;
        loop {
            self.check()?;
            let (e, p) = (
                self.echo.log().count_since(t),
                self.ping.log().count_since(t),
            );
            if e >= n && p >= n && Instant::now() >= t + min {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no traffic: {e} echoes and {p} ping replies since the switchover");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn migrate_once(
    mode: Mode,
    limit_ms: u64,
    n: usize,
    from: &Host,
    to: &Host,
    vm: &QemuProcess,
    g: &LinuxGuest,
    client: &Client,
    kill: &KillOnDrop,
) -> anyhow::Result<(Run, Arc<QemuProcess>)> {
    let spec = spec_in(&to.ns, g).await?;
    let config = MigrationConfig {
        downtime_limit: Duration::from_millis(limit_ms),
        ..MigrationConfig::default()
    };
    let mut source_events = vm.qmp().events();
    let mut s = match mode {
        Mode::Direct => direct(from, to, vm, &spec, &config, kill).await,
        Mode::Ferry => ferry(n, from, to, vm, &spec, &config, kill).await,
    }
    .with_context(|| format!("{} migration {} → {}", mode.label(), from.name, to.name))?;
    finish_source(&from.vms, vm).await?;
    in_host_ns(&from.ns, || net::sweep_taps(&BTreeSet::new())).await??;
    client.wait_answers(s.running, 20, SETTLE).await?;
    let end = Instant::now();
    let gap = |log: &net_support::outage::Log| {
        longest_gap(&log.times(), s.started, end).unwrap_or_default()
    };
    let (src, tgt) = (
        event_times(&mut source_events),
        event_times(&mut s.target_events),
    );
    let (stop, sent) = (src.get("STOP"), src.get("MIGRATION:completed"));
    let resume = tgt.get("RESUME");
    let run = Run {
        mode,
        limit_ms,
        ping_gap: gap(client.ping.log()),
        tcp_stall: gap(client.echo.log()),
        real_pause: between(stop, resume),
        stopped_to_sent: between(stop, sent),
        sent_to_running: between(sent, resume),
        qemu_downtime: s.qemu_downtime,
    };
    println!(
        "{:<6} {:>3} ms {} → {}: ping gap {:>4} ms, TCP stall {:>4} ms, real pause {:>4} ms (sent {} + carried {}), QEMU downtime {:>3} ms, migration {:.2} s",
        mode.label(),
        limit_ms,
        from.name,
        to.name,
        run.ping_gap.as_millis(),
        run.tcp_stall.as_millis(),
        show(run.real_pause),
        show(run.stopped_to_sent),
        show(run.sent_to_running),
        run.qemu_downtime.as_millis(),
        (s.running - s.started).as_secs_f64(),
    );
    Ok((run, s.target))
}

fn show(d: Option<Duration>) -> String {
    d.map_or_else(|| "?".into(), |d| d.as_millis().to_string())
}

async fn bench(
    hosts: &[Host; 2],
    client_ns: &str,
    rounds: usize,
    interval: Duration,
    kill: &KillOnDrop,
) -> anyhow::Result<Vec<Run>> {
    let g = linux_guest::ensure()?;
    let spec = spec_in(&hosts[0].ns, &g).await?;
    let mut vm = hosts[0].start(&spec).await?;
    kill.add(vm.pid());
    let guest: Ipv4Addr = GUEST_IP.parse()?;
    let client = Client {
        echo: EchoLog::start(
            client_ns,
            SocketAddr::new(guest.into(), ECHO_PORT),
            interval,
        ),
        ping: Pinger::start(client_ns, guest, interval).map_err(|e| anyhow!(e))?,
    };
    client
        .wait_answers(Instant::now(), 50, Duration::ZERO)
        .await
        .context("waiting for the guest to boot and answer")?;
    let configs = [
        (Mode::Direct, 20),
        (Mode::Ferry, 20),
        (Mode::Direct, 300),
        (Mode::Ferry, 300),
    ];
    let (mut at, mut n, mut runs) = (0usize, 0usize, Vec::new());
    for round in 0..rounds {
        let mut order = configs.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for (mode, limit) in order {
            let (from, to) = (&hosts[at], &hosts[1 - at]);
            let (run, target) =
                migrate_once(mode, limit, n, from, to, &vm, &g, &client, kill).await?;
            runs.push(run);
            vm = target;
            at = 1 - at;
            n += 1;
        }
    }
    hosts[at].vms.stop(VM, Duration::from_secs(10)).await?;
    Ok(runs)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

type Figure = fn(&Run) -> Option<Duration>;

const FIGURES: [(&str, Figure); 6] = [
    ("ping gap", |r| Some(r.ping_gap)),
    ("TCP stall", |r| Some(r.tcp_stall)),
    ("real pause", |r| r.real_pause),
    (" stop→sent", |r| r.stopped_to_sent),
    (" sent→running", |r| r.sent_to_running),
    ("QEMU downtime", |r| Some(r.qemu_downtime)),
];

fn values(runs: &[Run], mode: Mode, limit: u64, f: Figure) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.mode == mode && r.limit_ms == limit)
        .filter_map(f)
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect()
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

fn ratio(ferry: Option<f64>, direct: Option<f64>) -> Option<f64> {
    match (ferry, direct) {
        (Some(f), Some(d)) if d > 0.0 => Some(f / d),
        _ => None,
    }
}

fn report(runs: &[Run], rounds: usize) {
    println!(
        "\nClient-observed outage, {MEMORY_MIB} MiB Linux guest, {rounds} migrations per mode and limit (ms; ratio = ferry/direct)"
    );
    println!(
        "{:<6} {:<14} {:>13} {:>7} {:>13} {:>7} {:>13} {:>9}",
        "limit",
        "figure",
        "direct median",
        "max",
        "ferry median",
        "max",
        "ratio median",
        "ratio max"
    );
    for limit in [20, 300] {
        for (name, f) in FIGURES {
            let (d, fe) = (
                values(runs, Mode::Direct, limit, f),
                values(runs, Mode::Ferry, limit, f),
            );
            let (dm, dx, fm, fx) = (median(d.clone()), max(&d), median(fe.clone()), max(&fe));
            let r = |a, b| ratio(a, b).map_or_else(|| "-".into(), |r| format!("{r:.2}"));
            println!(
                "{:<6} {:<14} {:>13} {:>7} {:>13} {:>7} {:>13} {:>9}",
                format!("{limit} ms"),
                name,
                ms(dm),
                ms(dx),
                ms(fm),
                ms(fx),
                r(fm, dm),
                r(fx, dx),
            );
        }
    }
    println!("\nGoals:");
    for limit in [20, 300] {
        let ratios: Vec<(String, Option<f64>)> = FIGURES[..2]
            .iter()
            .map(|(name, f)| {
                let m = |mode| median(values(runs, mode, limit, *f));
                (name.to_string(), ratio(m(Mode::Ferry), m(Mode::Direct)))
            })
            .collect();
        let met = ratios.iter().all(|(_, r)| r.is_some_and(|r| r <= 1.2));
        println!(
            "  {limit} ms: Ferry adds at most 20% to what the client sees (medians): {} ({})",
            if met { "met" } else { "NOT met" },
            ratios
                .iter()
                .map(|(n, r)| format!(
                    "{n} ×{}",
                    r.map_or_else(|| "-".into(), |r| format!("{r:.2}"))
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for mode in [Mode::Ferry, Mode::Direct] {
        let stalls = values(runs, mode, 20, FIGURES[1].1);
        let over = stalls.iter().filter(|s| **s >= 150.0).count();
        println!(
            "  20 ms, {}: TCP stall under 150 ms in every run: {} (max {} ms; {over} of {} runs at or above 150 ms)",
            mode.label(),
            if over == 0 { "met" } else { "NOT met" },
            ms(max(&stalls)),
            stalls.len()
        );
    }
}

/// What this bench needs that is missing here, if anything.
fn prerequisites() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("root is required (network namespaces, taps, raw ICMP socket)".into());
    }
    for (tool, arg) in [("ip", "-V"), ("qemu-system-x86_64", "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!("`{tool}` is not installed or does not run"));
        }
    }
    linux_guest::ensure()
        .map(|_| ())
        .map_err(|e| format!("the Linux test guest is not available: {e}"))
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn run(rounds: usize, interval_ms: usize) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "outage bench: {rounds} round(s), client pace {interval_ms} ms, {cpus} CPUs, load average {} at start",
        loadavg()
    );
    let interval = Duration::from_millis(interval_ms as u64);
    let seg = segment("out");
    let (ip_a, ip_b) = migration_link(&seg, "a", "b");
    let dir = scratch();
    let ca = ClusterCa::generate("ferry-outage-bench")?;
    let ns = |h| {
        seg.host_ns(h)
            .ok_or_else(|| anyhow!("no namespace for host {h}"))
    };
    let hosts = [
        Host::new("a", ns("a")?, ip_a, dir.path(), &ca)?,
        Host::new("b", ns("b")?, ip_b, dir.path(), &ca)?,
    ];
    let kill = KillOnDrop::default();
    let main_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let runs = main_rt.block_on(bench(&hosts, seg.client_ns(), rounds, interval, &kill))?;
    report(&runs, rounds);
    println!("load average {} at the end", loadavg());
    Ok(())
}

fn main() -> ExitCode {
    if let Err(missing) = prerequisites() {
        println!("outage bench not run: {missing}");
        return ExitCode::SUCCESS;
    }
    match run(
        env("FERRY_OUTAGE_ROUNDS", 5),
        env("FERRY_OUTAGE_INTERVAL_MS", INTERVAL_MS),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outage bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
