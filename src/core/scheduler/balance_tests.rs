use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

use super::testkit::{HostExt, NOW, flat_load, host, vm};
use super::*;
use crate::core::policy::{EffectivePolicy, PolicyOverrides, PolicySource, SchedulingPolicyKind};
use crate::core::time::Timestamp;

fn policy(kind: SchedulingPolicyKind) -> EffectivePolicy {
    let o = PolicyOverrides {
        scheduling_policy: Some(kind),
        balancing_enabled: Some(true),
        ..Default::default()
    };
    EffectivePolicy::resolve(PolicySource::Defaults, &o).unwrap()
}

/// `hot` at 90% with four 4-vCPU VMs, `cool` at 10% with one.
fn hot_and_cool() -> (Vec<HostInfo>, Vec<VmInfo>) {
    let mut vms: Vec<VmInfo> = (0..4)
        .map(|i| vm(&format!("ns/h{i}"), Some("hot")))
        .collect();
    vms.push(vm("ns/c0", Some("cool")));
    for v in &mut vms {
        v.resources.cpus = 4;
    }
    (vec![host("hot").cpu(90.0), host("cool").cpu(10.0)], vms)
}

fn skip_of(plan: &BalancePlan, h: &str) -> Option<Skip> {
    plan.skipped
        .iter()
        .find(|(n, _)| n == h)
        .map(|(_, s)| s.clone())
}

#[test]
fn an_overloaded_host_gives_a_vm_to_the_least_loaded_one() {
    let (hosts, vms) = hot_and_cool();
    let plan = balance(
        &Snapshot::new(hosts, vms, vec![]),
        &policy(SchedulingPolicyKind::EvenlyDistributed),
        &[],
        NOW,
    );
    assert_eq!(plan.moves.len(), 1, "{plan:?}");
    let m = &plan.moves[0];
    assert_eq!((m.source.as_str(), m.target.as_str()), ("hot", "cool"));
    assert_eq!(m.reason.reason(), "CpuOverloaded");
    // 90 vs 10: moving a 22.5-point VM leaves 67.5 vs 32.5.
    assert_eq!((m.before, m.after), (80.0, 35.0));
    assert!(
        m.improvement() > 10.0 && m.explanation.contains("hot"),
        "{}",
        m.explanation
    );
}

#[test]
fn balancing_does_nothing_when_disabled_or_under_policy_none() {
    let (hosts, vms) = hot_and_cool();
    let s = Snapshot::new(hosts, vms, vec![]);
    let off = EffectivePolicy::resolve(
        PolicySource::Defaults,
        &PolicyOverrides {
            scheduling_policy: Some(SchedulingPolicyKind::EvenlyDistributed),
            ..Default::default()
        },
    )
    .unwrap();
    for p in [off, policy(SchedulingPolicyKind::None)] {
        let plan = balance(&s, &p, &[], NOW);
        assert!(plan.moves.is_empty());
        assert_eq!(plan.skipped, vec![(String::new(), Skip::Disabled)]);
    }
}

#[test]
fn a_host_over_the_threshold_for_less_than_the_whole_duration_is_left_alone() {
    let (mut hosts, vms) = hot_and_cool();
    hosts[0].load = flat_load(50.0, 400, 900);
    hosts[0].load.extend(flat_load(95.0, 910, 1000));
    let plan = balance(
        &Snapshot::new(hosts, vms, vec![]),
        &policy(SchedulingPolicyKind::EvenlyDistributed),
        &[],
        NOW,
    );
    assert!(plan.moves.is_empty() && plan.skipped.is_empty(), "{plan:?}");
}

#[test]
fn each_guard_holds_back_a_move_with_its_reason() {
    let p = policy(SchedulingPolicyKind::EvenlyDistributed);
    fn past(vm: &str, source: &str, ago: u64) -> PastMove {
        PastMove {
            vm: vm.into(),
            source: source.into(),
            target: "elsewhere".into(),
            at: NOW.minus(Duration::from_secs(ago)),
        }
    }
    type Setup = fn(&mut Vec<HostInfo>, &mut Vec<VmInfo>, &mut Vec<InFlight>, &mut Vec<PastMove>);
    let cases: Vec<(&str, Setup, Skip)> = vec![
        (
            "migration in flight on the source",
            |_, vms, f, _| {
                vms.push(vm("ns/x", Some("hot")));
                f.push(InFlight {
                    vm: "ns/x".into(),
                    source: "hot".into(),
                    target: None,
                });
            },
            Skip::Busy,
        ),
        (
            "one move per interval per source",
            |_, _, _, h| h.push(past("ns/other", "hot", 30)),
            Skip::Interval {
                next: NOW.plus(Duration::from_secs(30)),
            },
        ),
        (
            "per-VM cooldown",
            |_, _, _, h| {
                for i in 0..4 {
                    h.push(past(&format!("ns/h{i}"), "x", 300));
                }
            },
            Skip::NoMovableVm,
        ),
        (
            "per-VM move budget",
            |_, _, _, h| {
                for i in 0..4 {
                    for ago in [3000, 2500, 2000] {
                        h.push(past(&format!("ns/h{i}"), "x", ago));
                    }
                }
            },
            Skip::NoMovableVm,
        ),
        (
            "pinned, quarantined and non-migratable VMs stay",
            |_, vms, _, _| {
                vms[0].placement.pinned_host = Some("hot".into());
                vms[1].quarantined = true;
                vms[2].migratable = false;
                vms[3].migratable = false;
            },
            Skip::NoMovableVm,
        ),
        (
            "improvement under the margin",
            |hosts, _, _, _| hosts[1] = host("cool").cpu(75.0),
            Skip::NoImprovingMove,
        ),
    ];
    for (name, setup, want) in cases {
        let (mut hosts, mut vms) = hot_and_cool();
        let (mut flights, mut history) = (Vec::new(), Vec::new());
        setup(&mut hosts, &mut vms, &mut flights, &mut history);
        let plan = balance(&Snapshot::new(hosts, vms, flights), &p, &history, NOW);
        assert!(plan.moves.is_empty(), "{name}: {plan:?}");
        assert_eq!(skip_of(&plan, "hot"), Some(want), "{name}");
    }
}

#[test]
fn a_target_with_migrations_in_flight_is_not_used() {
    let (mut hosts, mut vms) = hot_and_cool();
    hosts.push(host("idle").cpu(0.0));
    vms.push(vm("ns/arriving", Some("cool")));
    let f = vec![InFlight {
        vm: "ns/arriving".into(),
        source: "cool".into(),
        target: Some("idle".into()),
    }];
    let plan = balance(
        &Snapshot::new(hosts, vms, f),
        &policy(SchedulingPolicyKind::EvenlyDistributed),
        &[],
        NOW,
    );
    assert_eq!(
        skip_of(&plan, "hot"),
        Some(Skip::NoImprovingMove),
        "{plan:?}"
    );
}

#[test]
fn a_host_takes_part_in_at_most_one_move_per_pass() {
    let (mut hosts, mut vms) = hot_and_cool();
    hosts.push(host("hot2").cpu(85.0));
    vms.extend((0..4).map(|i| {
        let mut v = vm(&format!("ns/k{i}"), Some("hot2"));
        v.resources.cpus = 4;
        v
    }));
    let plan = balance(
        &Snapshot::new(hosts, vms, vec![]),
        &policy(SchedulingPolicyKind::EvenlyDistributed),
        &[],
        NOW,
    );
    assert_eq!(plan.moves.len(), 1, "{plan:?}");
    assert_eq!(plan.moves[0].source, "hot", "the worst host goes first");
    assert_eq!(skip_of(&plan, "hot2"), Some(Skip::NoImprovingMove));
}

#[test]
fn power_saving_empties_an_under_utilized_host_onto_a_busier_one() {
    let hosts = vec![
        host("idle").cpu(8.0),
        host("busy").cpu(50.0),
        host("empty").cpu(0.0),
    ];
    let vms = vec![vm("ns/a", Some("idle")), vm("ns/b", Some("busy"))];
    let plan = balance(
        &Snapshot::new(hosts, vms, vec![]),
        &policy(SchedulingPolicyKind::PowerSaving),
        &[],
        NOW,
    );
    assert_eq!(plan.moves.len(), 1, "{plan:?}");
    let m = &plan.moves[0];
    assert_eq!(
        (m.vm.as_str(), m.target.as_str(), m.reason.reason()),
        ("ns/a", "busy", "UnderUtilized")
    );
}

#[test]
fn vm_evenly_distributed_moves_when_the_gap_exceeds_the_threshold() {
    let mk = |n_big: usize, n_small: usize| {
        let mut vms: Vec<VmInfo> = (0..n_big)
            .map(|i| vm(&format!("ns/b{i}"), Some("big")))
            .collect();
        vms.extend((0..n_small).map(|i| vm(&format!("ns/s{i}"), Some("small"))));
        Snapshot::new(vec![host("big"), host("small")], vms, vec![])
    };
    let p = policy(SchedulingPolicyKind::VmEvenlyDistributed);
    let plan = balance(&mk(12, 2), &p, &[], NOW);
    assert_eq!(plan.moves.len(), 1);
    assert_eq!(
        (plan.moves[0].reason.reason(), plan.moves[0].target.as_str()),
        ("TooManyVms", "small")
    );
    // 12 vs 8: over highVmCount but within migrationThreshold.
    let plan = balance(&mk(12, 8), &p, &[], NOW);
    assert_eq!(skip_of(&plan, "big"), Some(Skip::NoImprovingMove));
    // 10 VMs: not over highVmCount.
    assert!(balance(&mk(10, 0), &p, &[], NOW).skipped.is_empty());
}

/// A cluster where every VM uses `k` cores per vCPU, so a host's load is
/// exactly what the estimator assumes, and it stays fixed.
struct Sim {
    cpus: Vec<u32>,
    vm_cpus: Vec<u32>,
    placement: Vec<usize>,
    k: f64,
    log: Vec<Vec<(i64, f64)>>,
}

impl Sim {
    fn load(&self, h: usize) -> f64 {
        let vcpus: u32 = (0..self.vm_cpus.len())
            .filter(|v| self.placement[*v] == h)
            .map(|v| self.vm_cpus[v])
            .sum();
        100.0 * f64::from(vcpus) * self.k / f64::from(self.cpus[h])
    }

    fn snapshot(&self, t: i64) -> Snapshot {
        let hosts = (0..self.cpus.len())
            .map(|h| {
                let mut host = host(&format!("h{h}")).cpus(self.cpus[h]).memory_gib(512, 0);
                host.load = (t - 600..=t)
                    .step_by(10)
                    .map(|at| {
                        let cpu = self.log[h]
                            .iter()
                            .rev()
                            .find(|(since, _)| *since <= at)
                            .map_or(0.0, |(_, c)| *c);
                        LoadSample {
                            at: Timestamp::from_secs(at),
                            cpu_percent: cpu,
                            free_memory: 1 << 40,
                        }
                    })
                    .collect();
                host
            })
            .collect();
        let vms = (0..self.vm_cpus.len())
            .map(|v| {
                let mut x = vm(
                    &format!("ns/v{v}"),
                    Some(&format!("h{}", self.placement[v])),
                );
                x.resources.cpus = self.vm_cpus[v];
                x.resources.memory = 1 << 30;
                x
            })
            .collect();
        Snapshot::new(hosts, vms, vec![])
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn balancing_a_fixed_load_converges_and_never_moves_a_vm_back(
        cpus in prop::collection::vec(prop_oneof![Just(8u32), Just(16), Just(32)], 2..6),
        vms in prop::collection::vec((1u32..5, 0usize..6), 1..30),
        k in 0.3f64..1.0,
        kind in prop_oneof![
            Just(SchedulingPolicyKind::EvenlyDistributed),
            Just(SchedulingPolicyKind::PowerSaving),
            Just(SchedulingPolicyKind::VmEvenlyDistributed),
            Just(SchedulingPolicyKind::InClusterUpgrade),
        ],
    ) {
        let n = cpus.len();
        let mut sim = Sim {
            vm_cpus: vms.iter().map(|(c, _)| *c).collect(),
            placement: vms.iter().map(|(_, h)| h % n).collect(),
            cpus,
            k,
            log: vec![],
        };
        sim.log = (0..n).map(|h| vec![(0, sim.load(h))]).collect();
        let p = policy(kind);
        let high = f64::from(p.scheduling.high_utilization);
        let mut history: Vec<PastMove> = Vec::new();
        let mut moves_per_round = Vec::new();
        let mut path: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let rounds = 150;
        for round in 0..rounds {
            let t = 1000 + 60 * round;
            let plan = balance(&sim.snapshot(t), &p, &history, Timestamp::from_secs(t));
            moves_per_round.push(plan.moves.len());
            for m in plan.moves {
                let v: usize = m.vm.trim_start_matches("ns/v").parse().unwrap();
                let (s, d): (usize, usize) = (m.source[1..].parse().unwrap(), m.target[1..].parse().unwrap());
                let before = sim.load(d);
                sim.placement[v] = d;
                for h in [s, d] {
                    let l = sim.load(h);
                    sim.log[h].push((t, l));
                }
                if kind != SchedulingPolicyKind::VmEvenlyDistributed {
                    prop_assert!(sim.load(d) <= high + 1e-9 || sim.load(d) <= before, "target pushed over: {}", sim.load(d));
                }
                let p = path.entry(m.vm.clone()).or_default();
                prop_assert!(!p.iter().any(|(a, b)| *a == m.target && *b == m.source), "{} moved back {:?} then {}→{}", m.vm, p, m.source, m.target);
                p.push((m.source.clone(), m.target.clone()));
                history.push(PastMove { vm: m.vm, source: m.source, target: m.target, at: Timestamp::from_secs(t) });
            }
        }
        // Quiet for the last two budget windows: converged, not merely throttled.
        let quiet = moves_per_round.iter().rev().take(120).all(|m| *m == 0);
        prop_assert!(quiet, "still moving: {:?}", moves_per_round);
    }
}

#[test]
fn a_pass_makes_no_more_moves_per_cluster_than_may_run_at_once() {
    let mut hosts = Vec::new();
    let mut vms = Vec::new();
    for i in 0..8 {
        hosts.push(host(&format!("hot{i}")).cpu(90.0));
        hosts.push(host(&format!("cool{i}")).cpu(5.0));
        for j in 0..4 {
            let mut v = vm(&format!("ns/h{i}-{j}"), Some(&format!("hot{i}")));
            v.resources.cpus = 4;
            vms.push(v);
        }
    }
    let p = policy(SchedulingPolicyKind::EvenlyDistributed);
    let plan = balance(&Snapshot::new(hosts, vms, vec![]), &p, &[], NOW);
    assert_eq!(plan.moves.len(), p.limits.per_cluster as usize);
    assert_eq!(
        plan.skipped
            .iter()
            .filter(|(_, s)| *s == Skip::PassFull)
            .count(),
        3
    );
}
