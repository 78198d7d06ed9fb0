//! Drain makespan benchmark: the real controller drains a host of 8, 32
//! and 128 VMs against the embedded API server, with simulated agents
//! whose transfer takes the VM's memory over a fixed bandwidth; the time
//! the drain takes is set against the ideal of the same run.
//!
//! ```text
//!  ideal   = max(total transfer time ÷ slots, the longest transfer)
//!  slots   = min(parallelOutboundPerHost, parallelMigrationsPerCluster,
//!                parallelInboundPerHost × targets)
//!  LPT     = list scheduling, largest first, on the same slots (pure)
//!  span    = first transfer start → last switchover (agents' clock)
//!  drain   = HostMaintenance created → Completed, as a watch sees it
//! ```
//!
//! `cargo bench --bench drain` prints every figure and the ratios side by
//! side. `FERRY_BENCH_SIZES=8,32` runs fewer sizes.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/controller_support/mod.rs"]
mod controller_support;
#[path = "drain/phases.rs"]
mod phases;

use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use serde_json::json;

use controller_support::Cluster;
use ferry::api::HostMaintenance;
use ferry::api::maintenance::MaintenancePhase;
use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};

/// Simulated migration bandwidth: 1 GiB/s (a 2 GiB VM moves in 2 s).
const BANDWIDTH: u64 = 1 << 30;
/// Target hosts besides the drained one.
const TARGETS: usize = 8;
/// Limits: 4 outbound streams from the host, 2 inbound per target.
const CLUSTER: u32 = 8;
const OUTBOUND: u32 = 4;
const INBOUND: u32 = 2;
/// VM sizes (MiB), drawn in a scrambled order so names say nothing of size.
const SIZES: [u32; 5] = [128, 256, 512, 1024, 2048];

/// Deterministic scramble (xorshift), so each run drains the same VMs.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Makespan of list scheduling in the given order on `slots` slots.
fn list_schedule(durations: &[f64], slots: usize) -> f64 {
    let mut ends = vec![0.0_f64; slots.max(1)];
    for d in durations {
        let (i, _) = ends
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .expect("at least one slot");
        ends[i] += d;
    }
    ends.into_iter().fold(0.0, f64::max)
}

struct Figures {
    vms: usize,
    ideal: f64,
    lpt: f64,
    span: f64,
    drain: f64,
    /// Mean rank (0 = first) at which the largest fifth of the VMs started,
    /// as a fraction of the drain: 0 is largest-first, 0.5 is no order.
    big_start: f64,
    /// HostMaintenance created → first transfer start.
    head: f64,
    /// Last switchover → HostMaintenance seen Completed.
    tail: f64,
    transfers: Vec<phases::Transfer>,
    marks: phases::Marks,
    begun: Instant,
    slots: usize,
}

/// When a watch first sees the HostMaintenance `drain` Completed (at most
/// ten minutes).
async fn completed_at(client: kube::Client) -> Option<Instant> {
    let api = Api::<HostMaintenance>::all(client);
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let wait = async {
        while let Some(hm) = stream.next().await {
            let done = hm
                .ok()
                .filter(|hm| hm.metadata.name.as_deref() == Some("drain"))
                .and_then(|hm| hm.status)
                .is_some_and(|s| s.phase == MaintenancePhase::Completed);
            if done {
                return Some(Instant::now());
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(600), wait)
        .await
        .ok()
        .flatten()
}

async fn drain(vms: usize, rng: &mut Rng) -> Figures {
    let cluster = Cluster::start(TARGETS + 1, Duration::from_secs(1)).await;
    cluster.set_limits(CLUSTER, OUTBOUND, INBOUND).await;
    *cluster.agents.bandwidth.lock().expect("agent log") = Some(BANDWIDTH);
    let mut sizes = Vec::with_capacity(vms);
    for i in 0..vms {
        let mib = SIZES[rng.below(SIZES.len() as u64) as usize];
        sizes.push((format!("vm{i:03}"), mib));
        cluster.add_vm(&format!("vm{i:03}"), "h0", mib, true).await;
    }
    let ctl = cluster.controller("bench");
    // Let the controller lead and sync before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hm: HostMaintenance = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "HostMaintenance",
        "metadata": {"name": "drain"}, "spec": {"host": "h0"},
    }))
    .expect("a HostMaintenance");
    let marks = phases::record(cluster.client.clone(), cluster.stop.clone());
    let completed = tokio::spawn(completed_at(cluster.client.clone()));
    let begun = Instant::now();
    Api::<HostMaintenance>::all(cluster.client.clone())
        .create(&PostParams::default(), &hm)
        .await
        .expect("created");
    // Completed as a watch sees it (a poll would add half its period).
    let completed = completed
        .await
        .expect("the watch task")
        .expect("the drain completes");
    let drain = (completed - begun).as_secs_f64();
    let marks = marks.lock().expect("marks").clone();
    let spans = cluster.agents.spans.lock().expect("agent log").clone();
    ctl.shutdown().await;
    assert_eq!(spans.len(), vms, "every VM moved once");
    let first = spans.iter().map(|s| s.1).min().expect("a transfer");
    let last = spans.iter().map(|s| s.2).max().expect("a transfer");
    let seconds = |mib: u32| f64::from(mib) * f64::from(1 << 20) / BANDWIDTH as f64;
    let mut durations: Vec<f64> = sizes.iter().map(|(_, m)| seconds(*m)).collect();
    let slots = (OUTBOUND.min(CLUSTER) as usize).min(INBOUND as usize * TARGETS);
    let total: f64 = durations.iter().sum();
    let longest = durations.iter().copied().fold(0.0, f64::max);
    durations.sort_by(|a, b| b.total_cmp(a));
    // Start rank of the largest fifth.
    let mut by_start = spans.clone();
    by_start.sort_by_key(|s| s.1);
    let rank = |vm: &str| by_start.iter().position(|s| s.0 == vm).unwrap_or(0);
    let mut largest = sizes.clone();
    largest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let fifth = (vms / 5).max(1);
    let big_start = largest[..fifth]
        .iter()
        .map(|(vm, _)| rank(vm) as f64 / vms as f64)
        .sum::<f64>()
        / fifth as f64;
    let transfers = spans
        .iter()
        .map(|(vm, start, end)| phases::Transfer {
            vm: vm.clone(),
            start: start.into_std(),
            end: end.into_std(),
            ideal: Duration::from_secs_f64(
                sizes
                    .iter()
                    .find(|(name, _)| name == vm)
                    .map_or(0.0, |(_, m)| seconds(*m)),
            ),
        })
        .collect();
    Figures {
        vms,
        ideal: (total / slots as f64).max(longest),
        lpt: list_schedule(&durations, slots),
        span: (last - first).as_secs_f64(),
        drain,
        big_start,
        head: (first.into_std() - begun).as_secs_f64(),
        tail: completed
            .checked_duration_since(last.into_std())
            .unwrap_or_default()
            .as_secs_f64(),
        transfers,
        marks,
        begun,
        slots,
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("FERRY_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![8, 32, 128]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    println!(
        "drain makespan: {TARGETS} targets, limits cluster {CLUSTER} / outbound {OUTBOUND} / inbound {INBOUND}, \
         {} MiB/s per stream, VMs of {SIZES:?} MiB",
        BANDWIDTH >> 20
    );
    println!();
    println!(
        "{:>5} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>11} {:>10}",
        "VMs",
        "ideal s",
        "LPT s",
        "span s",
        "drain s",
        "LPT/ideal",
        "span/ideal",
        "drain/ideal",
        "big start"
    );
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut all = Vec::new();
    for n in sizes {
        let f = runtime.block_on(drain(n, &mut rng));
        println!(
            "{:>5} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.3} {:>10.3} {:>11.3} {:>10.2}",
            f.vms,
            f.ideal,
            f.lpt,
            f.span,
            f.drain,
            f.lpt / f.ideal,
            f.span / f.ideal,
            f.drain / f.ideal,
            f.big_start
        );
        all.push(f);
    }
    println!();
    println!(
        "hand-overs: P = the transfer that ended, N = the next to start in its slot; \
         each step as a watch on the Migrations first saw it"
    );
    for f in &all {
        println!(
            "  {} VMs: HostMaintenance created → first transfer {:.3} s; last switchover → Completed seen {:.3} s",
            f.vms, f.head, f.tail
        );
        phases::print_head(f.begun, &f.transfers, &f.marks);
        phases::print(f.vms, &f.transfers, &f.marks, f.slots);
    }
    println!();
    println!(
        "big start: mean start rank of the largest fifth of the VMs, as a fraction of the drain \
         (0 = largest first, about 0.5 = no order)"
    );
}
