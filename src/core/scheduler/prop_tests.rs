//! Properties of placement over random clusters.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::testkit::{HostExt, NOW, host, vm};
use super::*;
use crate::core::policy::{EffectivePolicy, PolicyOverrides, PolicySource, SchedulingPolicyKind};
use crate::core::time::GIB;

fn policy(kind: SchedulingPolicyKind) -> EffectivePolicy {
    let o = PolicyOverrides {
        scheduling_policy: Some(kind),
        ..Default::default()
    };
    EffectivePolicy::resolve(PolicySource::Defaults, &o).unwrap()
}

fn place_vm(s: &Snapshot, p: &EffectivePolicy, id: &str) -> SchedulingDecision {
    place(
        s,
        p,
        &PlacementRequest {
            vm: id,
            target: None,
            ignore_inbound_limit: false,
        },
        NOW,
    )
    .unwrap()
}

/// An independent statement of what "fit" means, to check the filters by.
fn oracle_fits(s: &Snapshot, p: &EffectivePolicy, vm: &VmInfo, h: &HostInfo) -> bool {
    let src = vm.host.as_deref().and_then(|x| s.host(x));
    let arriving: Vec<&InFlight> = s
        .in_flight()
        .iter()
        .filter(|m| m.target.as_deref() == Some(h.name.as_str()))
        .collect();
    let reserved: u64 = arriving
        .iter()
        .filter_map(|m| s.vm(&m.vm))
        .map(|v| v.resources.memory)
        .sum();
    let free = h
        .capacity
        .memory
        .saturating_sub(h.allocated.memory)
        .saturating_sub(reserved);
    let cluster = vm
        .placement
        .cluster
        .clone()
        .or(src.map(|x| x.cluster.clone()));
    let overloaded = load::cpu_over(
        h,
        p.scheduling.high_utilization,
        p.scheduling.over_commit_duration,
        NOW,
    );
    let anti = vm.placement.anti_affinity_group.as_ref().is_some_and(|g| {
        s.vms().iter().any(|o| {
            o.id != vm.id
                && o.placement.anti_affinity_group.as_ref() == Some(g)
                && (o.host.as_deref() == Some(&h.name) || arriving.iter().any(|m| m.vm == o.id))
        })
    });
    vm.host.as_deref() != Some(&h.name)
        && h.phase == HostPhase::Active
        && h.schedulable
        && free >= vm.resources.memory
        && h.capacity.cpus >= vm.resources.cpus
        && (arriving.len() as u32) < p.limits.inbound_per_host
        && cluster.is_none_or(|c| c == h.cluster)
        && vm.required_cpu_features.is_subset(&h.cpu_features)
        && !overloaded
        && !anti
}

fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    let host_s = (
        0u8..3,
        0u8..5,
        1u32..16,
        0u64..64,
        0u8..4,
        0.0f64..100.0,
        any::<bool>(),
        0u8..3,
    );
    (
        prop::collection::vec(host_s, 2..8),
        prop::collection::vec((0usize..8, 1u32..8, 1u64..16, 0u8..4, 0u8..3), 1..12),
    )
        .prop_map(|(hs, vs)| {
            let hosts: Vec<HostInfo> = hs
                .iter()
                .enumerate()
                .map(|(i, (cl, ph, cpus, alloc, feat, cpu, sched, ver))| {
                    let mut h = host(&format!("h{i}"))
                        .cpus(*cpus)
                        .memory_gib(64, *alloc)
                        .cpu(*cpu);
                    h.cluster = format!("c{}", cl % 2);
                    h.phase = [
                        HostPhase::Active,
                        HostPhase::Active,
                        HostPhase::Active,
                        HostPhase::Maintenance,
                        HostPhase::Unreachable,
                    ][*ph as usize];
                    h.schedulable = *sched || i % 2 == 0;
                    h.cpu_features = ["avx2", "aes", "sse4_2"]
                        .iter()
                        .take(*feat as usize)
                        .map(|s| s.to_string())
                        .collect();
                    h.agent_version = format!("1.{ver}.0");
                    h
                })
                .collect();
            let n = hosts.len();
            let vms: Vec<VmInfo> = vs
                .iter()
                .enumerate()
                .map(|(i, (h, cpus, mem, feat, grp))| {
                    let mut v = vm(&format!("ns/v{i}"), Some(&format!("h{}", h % n)));
                    v.resources = Resources {
                        cpus: *cpus,
                        memory: mem * GIB,
                    };
                    v.required_cpu_features = ["avx2", "aes", "sse4_2"]
                        .iter()
                        .take(*feat as usize)
                        .map(|s| s.to_string())
                        .collect::<BTreeSet<_>>();
                    if *grp == 1 {
                        v.placement.anti_affinity_group = Some("anti".into());
                    }
                    v
                })
                .collect();
            let flights = if vms.len() > 2 && n > 2 {
                vec![InFlight {
                    vm: vms[1].id.clone(),
                    source: vms[1].host.clone().unwrap(),
                    target: Some(format!("h{}", (n - 1))),
                }]
            } else {
                vec![]
            };
            Snapshot::new(hosts, vms, flights)
        })
}

fn arb_kind() -> impl Strategy<Value = SchedulingPolicyKind> {
    prop_oneof![
        Just(SchedulingPolicyKind::None),
        Just(SchedulingPolicyKind::EvenlyDistributed),
        Just(SchedulingPolicyKind::PowerSaving),
        Just(SchedulingPolicyKind::VmEvenlyDistributed),
        Just(SchedulingPolicyKind::InClusterUpgrade),
    ]
}

proptest! {
    #[test]
    fn no_filter_lets_an_unfit_host_through(s in arb_snapshot(), kind in arb_kind()) {
        let p = policy(kind);
        for v in s.vms() {
            let d = place_vm(&s, &p, &v.id);
            for hv in &d.hosts {
                let h = s.host(&hv.host).unwrap();
                match &hv.verdict {
                    Verdict::Chosen(_) | Verdict::ScoredLower(_) => {
                        prop_assert!(oracle_fits(&s, &p, v, h), "{} accepted for {}", h.name, v.id);
                    }
                    Verdict::Rejected(rs) => prop_assert!(!rs.is_empty()),
                }
            }
            // Every host is judged exactly once, and the chosen one is first.
            prop_assert_eq!(d.hosts.len(), s.hosts().len());
            if let Some(c) = &d.chosen {
                prop_assert_eq!(&*d.hosts[0].host, c.as_str());
            }
        }
    }

    #[test]
    fn power_saving_never_pushes_a_host_over_high_utilization(s in arb_snapshot()) {
        let p = policy(SchedulingPolicyKind::PowerSaving);
        let high = f64::from(p.scheduling.high_utilization);
        for v in s.vms() {
            let d = place_vm(&s, &p, &v.id);
            if let Some(c) = &d.chosen {
                let h = s.host(c).unwrap();
                let src = s.host(v.host.as_deref().unwrap()).unwrap();
                let vcpus: u32 = s.vms_on(&src.name).map(|x| x.resources.cpus).sum();
                let share = load::vm_share(load::cpu_now(src, NOW), src.capacity.cpus, vcpus, v.resources.cpus);
                let projected = load::cpu_now(h, NOW) + load::rescale(share, src.capacity.cpus, h.capacity.cpus);
                prop_assert!(projected <= high + 1e-9, "{c} would reach {projected}");
            }
        }
    }
}
