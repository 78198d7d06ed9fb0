//! Scheduler benchmark: one placement among 1,000 hosts / 10,000 VMs, a
//! balancing pass over the same, and growth from 100 to 10,000 hosts.
//!
//! `cargo bench --bench scheduler` prints the figures (median and p99 of
//! repeated runs); the goals are one placement under 1 ms and a balancing
//! pass under 100 ms at 1,000 hosts / 10,000 VMs.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use ferry::core::policy::{EffectivePolicy, PolicyOverrides, PolicySource, SchedulingPolicyKind};
use ferry::core::scheduler::{
    HostInfo, HostPhase, LoadSample, PlacementRequest, Resources, Snapshot, VmInfo, VmPlacement,
    balance, place,
};
use ferry::core::time::{GIB, Timestamp};

const NOW: Timestamp = Timestamp::from_secs(100_000);

/// A deterministic pseudo-random sequence (xorshift), so every run measures
/// the same cluster.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `hosts` hosts in 4 clusters, 10 VMs per host, 13 load samples each over
/// the last 2 minutes; about 5% of the hosts overloaded, a few in
/// maintenance, some VMs in affinity and anti-affinity groups.
fn cluster(hosts: usize, rng: &mut Rng) -> Snapshot {
    let (h, v) = inputs(hosts, rng);
    Snapshot::new(h, v, vec![])
}

/// The hosts and VMs of [`cluster`], before indexing.
fn inputs(hosts: usize, rng: &mut Rng) -> (Vec<HostInfo>, Vec<VmInfo>) {
    let features: Vec<String> = ["sse4_2", "avx", "avx2", "aes", "avx512f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let host_list: Vec<HostInfo> = (0..hosts)
        .map(|i| {
            let overloaded = rng.below(100) < 5;
            let base = if overloaded {
                85.0 + rng.below(10) as f64
            } else {
                10.0 + rng.below(60) as f64
            };
            let load = (0..13)
                .map(|k| LoadSample {
                    at: NOW.minus(Duration::from_secs(10 * (12 - k))),
                    cpu_percent: base
                        + (rng.below(5) as f64 - 2.0) * if overloaded { 0.0 } else { 1.0 },
                    free_memory: 64 * GIB,
                })
                .collect();
            HostInfo {
                name: format!("host-{i:05}"),
                cluster: format!("cluster-{}", i % 4),
                phase: if rng.below(100) < 2 {
                    HostPhase::Maintenance
                } else {
                    HostPhase::Active
                },
                schedulable: true,
                capacity: Resources {
                    cpus: 64,
                    memory: 512 * GIB,
                },
                allocated: Resources {
                    cpus: 40,
                    memory: (100 + rng.below(300)) * GIB,
                },
                cpu_model: "Skylake-Server".into(),
                cpu_features: features
                    .iter()
                    .take(3 + rng.below(3) as usize)
                    .cloned()
                    .collect(),
                labels: BTreeMap::from([("rack".to_string(), format!("r{}", i % 20))]),
                agent_version: format!("1.{}.0", rng.below(3)),
                load,
                control_host: i % 250 == 0,
            }
        })
        .collect();
    let vms: Vec<VmInfo> = (0..hosts * 10)
        .map(|v| {
            let mut placement = VmPlacement::default();
            match rng.below(50) {
                0 => placement.anti_affinity_group = Some(format!("anti-{}", rng.below(100))),
                1 => placement.affinity_group = Some(format!("aff-{}", rng.below(500))),
                _ => {}
            }
            VmInfo {
                id: format!("ns-{}/vm-{v:06}", v % 50),
                host: Some(format!("host-{:05}", v / 10)),
                resources: Resources {
                    cpus: 1 + rng.below(8) as u32,
                    memory: (1 + rng.below(16)) * GIB,
                },
                cpu_model: None,
                required_cpu_features: features
                    .iter()
                    .take(rng.below(3) as usize)
                    .cloned()
                    .collect(),
                placement,
                migratable: true,
                quarantined: false,
                highly_available: false,
            }
        })
        .collect();
    (host_list, vms)
}

fn policy(kind: SchedulingPolicyKind) -> EffectivePolicy {
    let o = PolicyOverrides {
        scheduling_policy: Some(kind),
        balancing_enabled: Some(true),
        ..Default::default()
    };
    EffectivePolicy::resolve(PolicySource::Defaults, &o).expect("valid policy")
}

/// Median and 99th percentile of `runs` timings of `f`.
fn measure(runs: usize, mut f: impl FnMut(usize)) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..runs)
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed()
        })
        .collect();
    times.sort();
    (times[runs / 2], times[(runs * 99 / 100).min(runs - 1)])
}

fn us(d: Duration) -> String {
    format!("{:>9.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:>8.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    println!("scheduler benchmark (10 VMs per host, 4 clusters; median / p99)");
    println!();
    let kinds = [
        SchedulingPolicyKind::None,
        SchedulingPolicyKind::EvenlyDistributed,
        SchedulingPolicyKind::PowerSaving,
        SchedulingPolicyKind::VmEvenlyDistributed,
    ];
    // `FERRY_BENCH_ONLY=placement|balancing|growth` runs one section
    // (handy under a profiler).
    let only = std::env::var("FERRY_BENCH_ONLY").ok();
    let run = |section: &str| only.as_deref().is_none_or(|o| o == section);
    let s = cluster(1_000, &mut rng);
    if run("placement") {
        println!(
            "1,000 hosts / 10,000 VMs: one placement (full decision with every host's reasons)"
        );
    }
    for kind in kinds.into_iter().filter(|_| run("placement")) {
        let p = policy(kind);
        let n = s.vms().len();
        let (med, p99) = measure(300, |i| {
            let vm = &s.vms()[(i * 7919) % n].id;
            let req = PlacementRequest {
                vm,
                target: None,
                ignore_inbound_limit: false,
            };
            black_box(place(&s, &p, &req, NOW).expect("known VM"));
        });
        println!("  {:<22} {} {}", format!("{kind:?}"), us(med), us(p99));
    }
    if run("balancing") {
        println!();
        println!("1,000 hosts / 10,000 VMs: one balancing pass");
    }
    for kind in kinds.into_iter().filter(|_| run("balancing")) {
        let p = policy(kind);
        let mut moves = 0;
        let (med, p99) = measure(20, |_| {
            moves = black_box(balance(&s, &p, &[], NOW)).moves.len()
        });
        println!(
            "  {:<22} {} {}   ({moves} moves)",
            format!("{kind:?}"),
            ms(med),
            ms(p99)
        );
    }
    if !run("growth") {
        return;
    }
    println!();
    println!(
        "growth (EvenlyDistributed): hosts, VMs, Snapshot::new (indexing), placement, balancing pass"
    );
    let p = policy(SchedulingPolicyKind::EvenlyDistributed);
    for hosts in [100, 1_000, 10_000] {
        let (h, v) = inputs(hosts, &mut Rng(7));
        let mut builds: Vec<Duration> = (0..3)
            .map(|_| {
                let (h, v) = (h.clone(), v.clone());
                let t = Instant::now();
                black_box(Snapshot::new(h, v, vec![]));
                t.elapsed()
            })
            .collect();
        builds.sort();
        let build = builds[1];
        let s = cluster(hosts, &mut rng);
        let n = s.vms().len();
        let (place_med, _) = measure(if hosts > 5_000 { 50 } else { 200 }, |i| {
            let vm = &s.vms()[(i * 7919) % n].id;
            let req = PlacementRequest {
                vm,
                target: None,
                ignore_inbound_limit: false,
            };
            black_box(place(&s, &p, &req, NOW).expect("known VM"));
        });
        let (bal_med, _) = measure(if hosts > 5_000 { 3 } else { 10 }, |_| {
            black_box(balance(&s, &p, &[], NOW));
        });
        println!(
            "  {hosts:>6} {n:>7}   build {}   place {}   balance {}",
            ms(build),
            us(place_med),
            ms(bal_med)
        );
    }
}
