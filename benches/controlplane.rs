//! Control-plane latency and drain makespan on a real `ferry up --hosts 2`
//! (the built binaries, each host in its own network namespace as root,
//! the relay over mutual TLS), driven through the real kubectl as a user
//! would; the harness is the end-to-end tests' (`tests/e2e_support`).
//!
//! `cargo bench --bench controlplane` (or `--profile dev`, the build the
//! end-to-end tests run) prints:
//!
//! 1. Latency, over `MIGRATIONS` live migrations of a 64 MiB memtest guest
//!    back and forth: from the start of `kubectl apply -f` of a Migration
//!    (and from the moment kubectl returned, the create acknowledged) to
//!    the first byte on the wire, p50/p99, with the phases on the way.
//!    "First byte on the wire" is the target agent accepting the stream's
//!    relay channel (its `relay channel accepted` log line, microsecond
//!    timestamps, same clock): the source QEMU has connected to its agent's
//!    socket and the TLS connection to the target agent is up, so QEMU's
//!    first bytes, already waiting in the socket, cross the wire right
//!    after. Nothing earlier carries guest memory; nothing the cluster
//!    publishes is finer (status timestamps have whole seconds, progress is
//!    sampled once a second).
//! 2. Drain makespan of a host with `DRAIN_VMS` 64 MiB guests against the
//!    ideal for the configured concurrency: each guest migrated alone first
//!    (apply → Succeeded), ideal = max(sum / slots, longest), slots =
//!    min(parallelOutboundPerHost, parallelInboundPerHost,
//!    parallelMigrationsPerCluster) of the default policy.
//!
//! Phase times are when a watch in this process saw them.

#[path = "../tests/e2e_support/mod.rs"]
mod e2e_support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use e2e_support::{Cluster, memtest_vm};
use ferry::agent::guest::VerifyReport;
use ferry::api::{HostMaintenance, Migration, MigrationPolicy};
use ferry::cli::up::layout::Layout;
use futures::StreamExt;
use kube::Api;
use kube::runtime::watcher;

const MIGRATIONS: usize = 20;
const DRAIN_VMS: usize = 8;
const TIMEOUT: Duration = Duration::from_secs(300);

/// First time each (object, phase) was seen by a watch.
type Seen = Arc<Mutex<HashMap<(String, String), SystemTime>>>;

fn record(seen: &Seen, name: String, phase: String) {
    seen.lock()
        .unwrap()
        .entry((name, phase))
        .or_insert_with(SystemTime::now);
}

fn watch_migrations(rt: &tokio::runtime::Runtime, client: kube::Client, seen: Seen) {
    rt.spawn(async move {
        let api: Api<Migration> = Api::namespaced(client, "default");
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(e) = events.next().await {
            if let Ok(watcher::Event::Apply(m) | watcher::Event::InitApply(m)) = e {
                let phase = m.status.as_ref().map(|s| s.phase).unwrap_or_default();
                let name = m.metadata.name.clone().unwrap_or_default();
                record(&seen, name, format!("{phase:?}"));
            }
        }
    });
}

fn watch_maintenances(rt: &tokio::runtime::Runtime, client: kube::Client, seen: Seen) {
    rt.spawn(async move {
        let api: Api<HostMaintenance> = Api::all(client);
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(e) = events.next().await {
            if let Ok(watcher::Event::Apply(m) | watcher::Event::InitApply(m)) = e {
                let phase = m.status.as_ref().map(|s| s.phase).unwrap_or_default();
                let name = m.metadata.name.clone().unwrap_or_default();
                record(&seen, format!("hm/{name}"), format!("{phase:?}"));
            }
        }
    });
}

fn seen_at(seen: &Seen, name: &str, phase: &str) -> Option<SystemTime> {
    seen.lock()
        .unwrap()
        .get(&(name.to_string(), phase.to_string()))
        .copied()
}

/// Wait until the watch saw `name` Succeeded; panic if it failed.
fn wait_succeeded(c: &Cluster, seen: &Seen, name: &str) -> SystemTime {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(t) = seen_at(seen, name, "Succeeded") {
            return t;
        }
        for bad in ["Failed", "Cancelled"] {
            if seen_at(seen, name, bad).is_some() {
                panic!(
                    "migration {name} {bad}:\n{}",
                    c.kubectl_ok(&["get", "mig", name, "-o", "yaml"])
                );
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} did not finish:\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// When the target agent accepted the first relay channel of `name`.
fn first_byte(c: &Cluster, target: &str, name: &str) -> Option<SystemTime> {
    let log = Layout::at(c.data_dir()).host_dir(target).join("agent.log");
    let text = std::fs::read_to_string(log).ok()?;
    let needle = format!("default/{name} (");
    text.lines()
        .map(strip_ansi)
        .filter(|l| l.contains("relay channel accepted") && l.contains(&needle))
        .filter_map(|l| {
            let stamp = l.split_whitespace().next()?.to_string();
            chrono::DateTime::parse_from_rfc3339(&stamp).ok()
        })
        .map(|t| SystemTime::UNIX_EPOCH + Duration::from_micros(t.timestamp_micros() as u64))
        .min()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Resident memory of each agent process of the cluster whose data
/// directory is `dir`, MiB, by host.
fn agent_rss_in(dir: &std::path::Path) -> Vec<(String, f64)> {
    let dir = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(&dir) || !cmdline.contains(" agent run ") {
            continue;
        }
        let host = cmdline
            .split_whitespace()
            .skip_while(|w| *w != "--host")
            .nth(1)
            .unwrap_or("?")
            .to_string();
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
        if let Some(kib) = kib {
            out.push((host, kib / 1024.0));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Samples the agents' resident memory every 100 ms until stopped; the
/// highest seen per host.
struct RssPeak {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<BTreeMap<String, f64>>,
}

impl RssPeak {
    fn start(c: &Cluster) -> RssPeak {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let dir = c.data_dir().to_path_buf();
        let thread = std::thread::spawn(move || {
            let mut peak = BTreeMap::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for (host, mib) in agent_rss_in(&dir) {
                    let e = peak.entry(host).or_insert(0.0f64);
                    *e = e.max(mib);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        RssPeak { stop, thread }
    }

    fn stop(self) -> BTreeMap<String, f64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn ms(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or_else(|e| -e.duration().as_secs_f64() * 1e3)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn migration(name: &str, vm: &str, target: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  vmName: {vm}\n  type: Live\n  targetHost: {target}\n"
    )
}

fn other(host: &str) -> &'static str {
    if host == "host-1" { "host-2" } else { "host-1" }
}

fn wait_running(c: &Cluster, vm: &str) {
    c.wait_for(&format!("{vm} Running"), TIMEOUT, || {
        c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
    });
}

fn assert_intact(c: &Cluster, vm: &str, host: &str) {
    let (on, report) = c.verify_vm("default", vm);
    assert_eq!(on, host, "{vm}");
    assert!(
        matches!(report, VerifyReport::Intact { pages, .. } if pages > 0),
        "memory of {vm} on {host}: {report:?}"
    );
}

fn cordon(c: &Cluster, host: &str, on: bool) {
    c.kubectl_ok(&[
        "patch",
        "host",
        host,
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{{"unschedulable":{on}}}}}"#),
    ]);
}

struct Row {
    kubectl: f64,
    scheduled: Option<f64>,
    preparing: Option<f64>,
    running: Option<f64>,
    first_byte: f64,
    first_byte_after_ack: f64,
    done: f64,
}

fn latency(c: &Cluster, seen: &Seen) -> Vec<Row> {
    c.apply(&memtest_vm("lat", "64Mi", 48));
    wait_running(c, "lat");
    let mut rows = Vec::new();
    for i in 0..MIGRATIONS {
        let source = c.vm_host("default", "lat").unwrap();
        let target = other(&source);
        let name = format!("lat-{i:02}");
        let t0 = SystemTime::now();
        c.apply(&migration(&name, "lat", target));
        let ack = SystemTime::now();
        let done = wait_succeeded(c, seen, &name);
        let fb = first_byte(c, target, &name)
            .unwrap_or_else(|| panic!("no relay channel of {name} in {target}'s log"));
        let at = |phase: &str| seen_at(seen, &name, phase).map(|t| ms(t0, t));
        rows.push(Row {
            kubectl: ms(t0, ack),
            scheduled: at("Scheduled"),
            preparing: at("PreparingTarget"),
            running: at("Running"),
            first_byte: ms(t0, fb),
            first_byte_after_ack: ms(ack, fb),
            done: ms(t0, done),
        });
        // The VM's status names the target before the next move starts.
        c.wait_for("the VM's status to name the target", TIMEOUT, || {
            c.vm_host("default", "lat").as_deref() == Some(target)
                && c.jsonpath(&["get", "fvm", "lat"], "{.status.migration}")
                    .is_empty()
        });
    }
    let host = c.vm_host("default", "lat").unwrap();
    assert_intact(c, "lat", &host);
    c.kubectl_ok(&["delete", "fvm", "lat", "--timeout=120s"]);
    c.wait_for("lat's QEMU to stop", TIMEOUT, || c.qemu_pids().is_empty());
    rows
}

struct Drain {
    singles: Vec<f64>,
    /// Running → Succeeded of each guest alone.
    single_spans: Vec<f64>,
    /// Running → Succeeded of each drain migration.
    drain_spans: Vec<f64>,
    /// Scheduled → Running of each guest alone, and in the drain.
    single_prepare: Vec<f64>,
    drain_prepare: Vec<f64>,
    slots: u32,
    makespan: f64,
    completed: Option<f64>,
    most_in_flight: usize,
}

fn drain(c: &Cluster, seen: &Seen, slots: u32) -> Drain {
    let vms: Vec<String> = (0..DRAIN_VMS).map(|i| format!("d{i}")).collect();
    cordon(c, "host-2", true);
    for vm in &vms {
        c.apply(&memtest_vm(vm, "64Mi", 48));
    }
    for vm in &vms {
        wait_running(c, vm);
        assert_eq!(c.vm_host("default", vm).as_deref(), Some("host-1"));
    }
    cordon(c, "host-2", false);
    // Each guest alone, host-1 → host-2.
    let mut singles = Vec::new();
    let mut single_spans = Vec::new();
    let mut single_prepare = Vec::new();
    for vm in &vms {
        let name = format!("single-{vm}");
        let t0 = SystemTime::now();
        c.apply(&migration(&name, vm, "host-2"));
        let done = wait_succeeded(c, seen, &name);
        singles.push(ms(t0, done));
        if let Some(running) = seen_at(seen, &name, "Running") {
            single_spans.push(ms(running, done));
            if let Some(scheduled) = seen_at(seen, &name, "Scheduled") {
                single_prepare.push(ms(scheduled, running));
            }
        }
        c.wait_for("the VM's status to name host-2", TIMEOUT, || {
            c.vm_host("default", vm).as_deref() == Some("host-2")
        });
    }
    c.wait_for("host-1's QEMUs to stop", TIMEOUT, || {
        c.host_qemu_pids("host-1").is_empty()
    });
    // All of them at once: drain host-2 (host-1 is the only other host).
    let t0 = SystemTime::now();
    c.apply(
        "apiVersion: ferry.dev/v1alpha1\nkind: HostMaintenance\nmetadata:\n  name: host-2\nspec:\n  host: host-2\n",
    );
    let mut names = Vec::new();
    c.wait_for("the drain's migrations", TIMEOUT, || {
        let out = c.kubectl_ok(&[
            "get",
            "mig",
            "-l",
            "ferry.dev/maintenance=host-2",
            "-o",
            "name",
        ]);
        names = out
            .lines()
            .map(|l| l.rsplit('/').next().unwrap_or(l).to_string())
            .collect();
        names.len() == DRAIN_VMS
    });
    let ends: Vec<SystemTime> = names.iter().map(|n| wait_succeeded(c, seen, n)).collect();
    let last = ends.iter().max().copied().unwrap();
    c.wait_for("the maintenance Completed", TIMEOUT, || {
        seen_at(seen, "hm/host-2", "Completed").is_some()
    });
    let completed = seen_at(seen, "hm/host-2", "Completed").map(|t| ms(t0, t));
    // Overlap of transfers as the watch saw them (Running → Succeeded).
    let spans: Vec<(SystemTime, SystemTime)> = names
        .iter()
        .zip(&ends)
        .filter_map(|(n, end)| Some((seen_at(seen, n, "Running")?, *end)))
        .collect();
    let drain_spans = spans.iter().map(|(s, e)| ms(*s, *e)).collect();
    let drain_prepare = names
        .iter()
        .filter_map(|n| {
            Some(ms(
                seen_at(seen, n, "Scheduled")?,
                seen_at(seen, n, "Running")?,
            ))
        })
        .collect();
    let most_in_flight = spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap_or(0);
    for vm in &vms {
        c.wait_for(&format!("{vm} on host-1"), TIMEOUT, || {
            c.vm_host("default", vm).as_deref() == Some("host-1")
        });
        assert_intact(c, vm, "host-1");
    }
    Drain {
        singles,
        single_spans,
        drain_spans,
        single_prepare,
        drain_prepare,
        slots,
        makespan: ms(t0, last),
        completed,
        most_in_flight,
    }
}

fn line(label: &str, values: &[f64]) {
    println!(
        "  {label:<44} p50 {:>7.0} ms   p99 {:>7.0} ms   min {:>7.0}   max {:>7.0}",
        percentile(values, 0.5),
        percentile(values, 0.99),
        percentile(values, 0.0),
        percentile(values, 1.0)
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    println!("load average at start: {}", loadavg());
    let c = Cluster::up(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(ferry::cli::client::connect_path(Some(&c.kubeconfig())))
        .unwrap();
    let seen: Seen = Arc::default();
    watch_migrations(&rt, client.clone(), seen.clone());
    watch_maintenances(&rt, client.clone(), seen.clone());

    // Agents idle (no VM, nothing migrating), then their peak while the
    // latency run and the drain migrate.
    std::thread::sleep(Duration::from_secs(2));
    let idle = agent_rss_in(c.data_dir());
    let sampler = RssPeak::start(&c);
    let rows = latency(&c, &seen);
    let col = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<f64> { rows.iter().filter_map(f).collect() };
    println!(
        "control-plane latency, {} live migrations of a 64 MiB memtest guest (48 MiB pattern), ferry up --hosts 2:",
        rows.len()
    );
    line(
        "kubectl apply returns (create acknowledged)",
        &col(&|r| Some(r.kubectl)),
    );
    line(
        "apply → Scheduled (seen by a watch)",
        &col(&|r| r.scheduled),
    );
    line("apply → PreparingTarget", &col(&|r| r.preparing));
    line(
        "apply → Running (source transferring)",
        &col(&|r| r.running),
    );
    line(
        "apply → first byte on the wire",
        &col(&|r| Some(r.first_byte)),
    );
    line(
        "create acknowledged → first byte on the wire",
        &col(&|r| Some(r.first_byte_after_ack)),
    );
    line("apply → Succeeded", &col(&|r| Some(r.done)));
    let skipped = rows.len() - col(&|r| r.preparing).len();
    if skipped > 0 {
        println!("  ({skipped} migrations passed PreparingTarget between two watch events)");
    }

    let limits = rt
        .block_on(Api::<MigrationPolicy>::all(client.clone()).get("default"))
        .unwrap()
        .spec
        .limits;
    let slots = limits
        .parallel_outbound_per_host
        .min(limits.parallel_inbound_per_host)
        .min(limits.parallel_migrations_per_cluster);
    let d = drain(&c, &seen, slots);
    let total: f64 = d.singles.iter().sum();
    let longest = d.singles.iter().copied().fold(0.0, f64::max);
    let ideal = (total / d.slots as f64).max(longest);
    println!(
        "drain of a host with {DRAIN_VMS} 64 MiB guests (48 MiB pattern each), {} slots:",
        d.slots
    );
    line("each guest migrated alone, apply → Succeeded", &d.singles);
    println!(
        "  sum {:.0} ms, longest {:.0} ms: ideal makespan max(sum / {}, longest) = {:.0} ms",
        total, longest, d.slots, ideal
    );
    println!(
        "  drain makespan (apply → last Succeeded)     {:>7.0} ms   ratio to ideal {:.2}",
        d.makespan,
        d.makespan / ideal
    );
    if let Some(done) = d.completed {
        println!("  apply → HostMaintenance Completed           {done:>7.0} ms");
    }
    line("prepare alone (Scheduled → Running)", &d.single_prepare);
    line(
        "prepare in the drain (Scheduled → Running)",
        &d.drain_prepare,
    );
    line("transfer alone (Running → Succeeded)", &d.single_spans);
    line(
        "transfer in the drain (Running → Succeeded)",
        &d.drain_spans,
    );
    let busy: f64 = d.drain_spans.iter().sum();
    println!(
        "  slot time not spent transferring: makespan × {} − sum of transfers = {:.0} ms ({:.0} ms per migration)",
        d.slots,
        d.makespan * d.slots as f64 - busy,
        (d.makespan * d.slots as f64 - busy) / DRAIN_VMS as f64
    );
    println!(
        "  transfers seen in flight at once: at most {} (limit {})",
        d.most_in_flight, d.slots
    );
    let peak = sampler.stop();
    println!("agent resident memory (VmRSS), per host:");
    for (host, mib) in &idle {
        println!(
            "  {host}: idle {mib:.1} MiB, peak while migrating {:.1} MiB",
            peak.get(host).copied().unwrap_or(f64::NAN)
        );
    }
    println!("load average at the end: {}", loadavg());
}
