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

fn reasons(d: &SchedulingDecision, h: &str) -> Vec<&'static str> {
    match d.verdict(h) {
        Some(Verdict::Rejected(rs)) => rs.iter().map(|r| r.reason()).collect(),
        _ => vec![],
    }
}

type Tweak = fn(&mut HostInfo, &mut VmInfo, &mut Vec<VmInfo>, &mut Vec<InFlight>);

#[test]
fn each_filter_rejects_an_unfit_host_with_its_reason() {
    let cases: Vec<(&str, Tweak, &str)> = vec![
        (
            "maintenance host",
            |h, _, _, _| h.phase = HostPhase::Maintenance,
            "HostNotActive",
        ),
        (
            "unreachable host",
            |h, _, _, _| h.phase = HostPhase::Unreachable,
            "HostNotActive",
        ),
        (
            "cordoned host",
            |h, _, _, _| h.schedulable = false,
            "HostUnschedulable",
        ),
        (
            "other cluster",
            |h, _, _, _| h.cluster = "c2".into(),
            "WrongCluster",
        ),
        (
            "required cluster",
            |_, v, _, _| v.placement.cluster = Some("c9".into()),
            "WrongCluster",
        ),
        (
            "host selector",
            |h, v, _, _| {
                v.placement
                    .host_selector
                    .insert("disk".into(), "ssd".into());
                *h = h.clone().label("disk", "hdd");
            },
            "HostSelectorMismatch",
        ),
        (
            "pinned elsewhere",
            |_, v, _, _| v.placement.pinned_host = Some("src".into()),
            "PinnedToOtherHost",
        ),
        (
            "named cpu model",
            |_, v, _, _| v.cpu_model = Some("EPYC".into()),
            "CpuModelMismatch",
        ),
        (
            "passthrough needs the source model",
            |h, v, _, _| {
                v.cpu_model = Some("host-passthrough".into());
                h.cpu_model = "Haswell".into();
            },
            "CpuModelMismatch",
        ),
        (
            "passthrough needs the source features",
            |h, v, _, _| {
                v.cpu_model = Some("host-passthrough".into());
                h.cpu_features.remove("avx2");
            },
            "MissingCpuFeatures",
        ),
        (
            "required feature",
            |_, v, _, _| {
                v.required_cpu_features.insert("avx512f".into());
            },
            "MissingCpuFeatures",
        ),
        (
            "memory",
            |h, _, _, _| h.allocated.memory = 62 * GIB,
            "InsufficientMemory",
        ),
        (
            "memory reserved by an arriving VM",
            |_, _, others, flights| {
                let mut big = vm("ns/big", Some("other"));
                big.resources.memory = 61 * GIB;
                others.push(big);
                flights.push(InFlight {
                    vm: "ns/big".into(),
                    source: "other".into(),
                    target: Some("h".into()),
                });
            },
            "InsufficientMemory",
        ),
        ("cpus", |h, _, _, _| h.capacity.cpus = 1, "InsufficientCpus"),
        (
            "affinity group elsewhere",
            |_, v, others, _| {
                v.placement.affinity_group = Some("g".into());
                let mut mate = vm("ns/mate", Some("other"));
                mate.placement.affinity_group = Some("g".into());
                others.push(mate);
            },
            "AffinityGroupElsewhere",
        ),
        (
            "anti-affinity member here",
            |_, v, others, _| {
                v.placement.anti_affinity_group = Some("g".into());
                let mut rival = vm("ns/rival", Some("h"));
                rival.placement.anti_affinity_group = Some("g".into());
                others.push(rival);
            },
            "AntiAffinityConflict",
        ),
        (
            "anti-affinity member arriving",
            |_, v, others, flights| {
                v.placement.anti_affinity_group = Some("g".into());
                let mut rival = vm("ns/rival", Some("other"));
                rival.placement.anti_affinity_group = Some("g".into());
                others.push(rival);
                flights.push(InFlight {
                    vm: "ns/rival".into(),
                    source: "other".into(),
                    target: Some("h".into()),
                });
            },
            "AntiAffinityConflict",
        ),
        (
            "inbound limit",
            |_, _, others, flights| {
                for i in 0..2 {
                    others.push(vm(&format!("ns/in{i}"), Some("other")));
                    flights.push(InFlight {
                        vm: format!("ns/in{i}"),
                        source: "other".into(),
                        target: Some("h".into()),
                    });
                }
            },
            "InboundLimitReached",
        ),
        (
            "overloaded for the whole duration",
            |h, _, _, _| *h = h.clone().cpu(95.0),
            "HostOverloaded",
        ),
    ];
    for (name, tweak, want) in cases {
        let mut h = host("h");
        let mut v = vm("ns/vm", Some("src"));
        let mut others = Vec::new();
        let mut flights = Vec::new();
        tweak(&mut h, &mut v, &mut others, &mut flights);
        let mut vms = vec![v];
        vms.extend(others);
        let s = Snapshot::new(vec![host("src"), h, host("other")], vms, flights);
        let d = place_vm(&s, &policy(SchedulingPolicyKind::None), "ns/vm");
        assert_eq!(reasons(&d, "h"), vec![want], "{name}: {:?}", d.verdict("h"));
        assert_eq!(reasons(&d, "src")[0], "IsSource", "{name}");
        let Some(Verdict::Rejected(rs)) = d.verdict("h") else {
            unreachable!()
        };
        assert!(!rs[0].to_string().is_empty());
    }
}

#[test]
fn a_fit_host_is_chosen_and_the_others_say_why_not() {
    let s = Snapshot::new(
        vec![
            host("src"),
            host("a").memory_gib(64, 32),
            host("b"),
            host("c").phase(HostPhase::Fenced),
        ],
        vec![vm("ns/vm", Some("src"))],
        vec![],
    );
    let d = place_vm(&s, &policy(SchedulingPolicyKind::None), "ns/vm");
    assert_eq!(
        d.chosen.as_deref(),
        Some("b"),
        "more free memory wins under None"
    );
    assert!(matches!(d.verdict("a"), Some(Verdict::ScoredLower(_))));
    assert_eq!(reasons(&d, "c"), vec!["HostNotActive"]);
    assert!(d.summary().contains("b chosen"), "{}", d.summary());
    assert_eq!(d.rejections_by_reason().get("IsSource"), Some(&1));
}

#[test]
fn every_reason_is_listed_not_only_the_first() {
    let s = Snapshot::new(
        vec![
            host("src"),
            host("h")
                .cluster("c2")
                .phase(HostPhase::Maintenance)
                .memory_gib(4, 4),
        ],
        vec![vm("ns/vm", Some("src"))],
        vec![],
    );
    let d = place_vm(&s, &policy(SchedulingPolicyKind::None), "ns/vm");
    assert_eq!(
        reasons(&d, "h"),
        vec!["HostNotActive", "InsufficientMemory", "WrongCluster"]
    );
    assert_eq!(d.chosen, None);
    assert!(d.summary().starts_with("no host fits"), "{}", d.summary());
}

#[test]
fn a_requested_target_is_the_only_host_considered_and_is_still_filtered() {
    let s = Snapshot::new(
        vec![
            host("src"),
            host("a"),
            host("b").phase(HostPhase::Maintenance),
        ],
        vec![vm("ns/vm", Some("src"))],
        vec![],
    );
    let p = policy(SchedulingPolicyKind::None);
    let ok = place(
        &s,
        &p,
        &PlacementRequest {
            vm: "ns/vm",
            target: Some("a"),
            ignore_inbound_limit: false,
        },
        NOW,
    )
    .unwrap();
    assert_eq!((ok.chosen.as_deref(), ok.hosts.len()), (Some("a"), 1));
    let bad = place(
        &s,
        &p,
        &PlacementRequest {
            vm: "ns/vm",
            target: Some("b"),
            ignore_inbound_limit: false,
        },
        NOW,
    )
    .unwrap();
    assert_eq!(
        (bad.chosen.clone(), reasons(&bad, "b")),
        (None, vec!["HostNotActive"])
    );
    let err = place(
        &s,
        &p,
        &PlacementRequest {
            vm: "ns/vm",
            target: Some("zz"),
            ignore_inbound_limit: false,
        },
        NOW,
    );
    assert_eq!(err, Err(PlacementError::UnknownTarget("zz".into())));
    let err = place(
        &s,
        &p,
        &PlacementRequest {
            vm: "ns/no",
            target: None,
            ignore_inbound_limit: false,
        },
        NOW,
    );
    assert_eq!(err, Err(PlacementError::UnknownVm("ns/no".into())));
}

#[test]
fn planning_may_ignore_the_inbound_limit() {
    let mut vms = vec![vm("ns/vm", Some("src"))];
    let mut flights = vec![];
    for i in 0..2 {
        vms.push(vm(&format!("ns/in{i}"), Some("src")));
        flights.push(InFlight {
            vm: format!("ns/in{i}"),
            source: "src".into(),
            target: Some("h".into()),
        });
    }
    let s = Snapshot::new(vec![host("src"), host("h")], vms, flights);
    let p = policy(SchedulingPolicyKind::None);
    let d = place(
        &s,
        &p,
        &PlacementRequest {
            vm: "ns/vm",
            target: None,
            ignore_inbound_limit: true,
        },
        NOW,
    )
    .unwrap();
    assert_eq!(d.chosen.as_deref(), Some("h"));
}

#[test]
fn each_policy_prefers_the_host_its_weight_says() {
    // a: busy 60%, b: idle 10% with VMs, c: empty.
    let hosts = || {
        vec![
            host("src").cpu(20.0),
            host("a").cpu(60.0),
            host("b").cpu(10.0),
            host("c").cpu(0.0).memory_gib(64, 0),
        ]
    };
    let vms = || {
        let mut v = vec![vm("ns/vm", Some("src")), vm("ns/src2", Some("src"))];
        v.extend((0..6).map(|i| vm(&format!("ns/a{i}"), Some("a"))));
        v.extend((0..2).map(|i| vm(&format!("ns/b{i}"), Some("b"))));
        v
    };
    let table = [
        (SchedulingPolicyKind::EvenlyDistributed, "c"),
        (SchedulingPolicyKind::PowerSaving, "a"),
        (SchedulingPolicyKind::VmEvenlyDistributed, "c"),
        (SchedulingPolicyKind::InClusterUpgrade, "c"),
    ];
    for (kind, want) in table {
        let d = place_vm(
            &Snapshot::new(hosts(), vms(), vec![]),
            &policy(kind),
            "ns/vm",
        );
        assert_eq!(d.chosen.as_deref(), Some(want), "{kind:?}: {}", d.summary());
    }
}

#[test]
fn power_saving_refuses_a_host_the_vm_would_push_over_high_utilization() {
    let s = Snapshot::new(
        vec![
            host("src").cpu(40.0).cpus(4),
            host("full").cpu(75.0),
            host("roomy").cpu(30.0),
        ],
        vec![
            vm("ns/vm", Some("src")),
            vm("ns/x", Some("full")),
            vm("ns/y", Some("roomy")),
        ],
        vec![],
    );
    // The VM has all of src's 4 vCPUs' load: 40% of 4 CPUs = 10% of 16.
    let d = place_vm(&s, &policy(SchedulingPolicyKind::PowerSaving), "ns/vm");
    assert_eq!(reasons(&d, "full"), vec!["WouldExceedHighUtilization"]);
    assert_eq!(d.chosen.as_deref(), Some("roomy"));
}

#[test]
fn in_cluster_upgrade_never_moves_a_vm_to_an_older_host() {
    let s = Snapshot::new(
        vec![
            host("src").version("1.4.0"),
            host("old").version("1.3.9"),
            host("new").version("1.10.0"),
        ],
        vec![vm("ns/vm", Some("src"))],
        vec![],
    );
    let d = place_vm(&s, &policy(SchedulingPolicyKind::InClusterUpgrade), "ns/vm");
    assert_eq!(reasons(&d, "old"), vec!["OlderVersion"]);
    assert_eq!(d.chosen.as_deref(), Some("new"));
}

#[test]
fn vm_evenly_distributed_counts_the_control_host_grace() {
    let s = Snapshot::new(
        vec![host("src"), host("spm"), host("plain")],
        {
            let mut v = vec![vm("ns/vm", Some("src"))];
            v.extend((0..2).map(|i| vm(&format!("ns/p{i}"), Some("plain"))));
            v
        },
        vec![],
    );
    let mut s2 = s.clone();
    s2.hosts[1].control_host = true;
    let p = policy(SchedulingPolicyKind::VmEvenlyDistributed);
    assert_eq!(place_vm(&s, &p, "ns/vm").chosen.as_deref(), Some("spm"));
    let s2 = Snapshot::new(s2.hosts, s2.vms, vec![]);
    assert_eq!(
        place_vm(&s2, &p, "ns/vm").chosen.as_deref(),
        Some("plain"),
        "spm counts 0 + 5 grace"
    );
}

#[test]
fn an_affinity_group_follows_its_members() {
    let mut v = vm("ns/vm", Some("src"));
    v.placement.affinity_group = Some("g".into());
    let mut mate = vm("ns/mate", Some("b"));
    mate.placement.affinity_group = Some("g".into());
    let s = Snapshot::new(
        vec![host("src"), host("a"), host("b").memory_gib(64, 40)],
        vec![v, mate],
        vec![],
    );
    let d = place_vm(&s, &policy(SchedulingPolicyKind::None), "ns/vm");
    assert_eq!(d.chosen.as_deref(), Some("b"));
}

#[test]
fn a_quarantined_host_is_refused_with_the_reason_until_its_quarantine_ends() {
    let mut s = Snapshot::new(
        vec![host("src"), host("bad"), host("ok").memory_gib(64, 32)],
        vec![vm("ns/vm", Some("src"))],
        vec![],
    );
    s.quarantine(
        "bad",
        HostQuarantine {
            until: NOW.plus(std::time::Duration::from_secs(90)),
            failures: 3,
            last: crate::core::migration::FailureReason::TargetPreparationFailed,
        },
    );
    let p = policy(SchedulingPolicyKind::None);
    let d = place_vm(&s, &p, "ns/vm");
    assert_eq!(d.chosen.as_deref(), Some("ok"));
    assert_eq!(reasons(&d, "bad"), vec!["HostQuarantined"]);
    let Some(Verdict::Rejected(rs)) = d.verdict("bad") else {
        panic!("bad was not rejected")
    };
    assert_eq!(
        rs[0].to_string(),
        "host is quarantined for another 90 s: 3 incoming migrations failed on it (last: TargetPreparationFailed)"
    );
    // Once it ends, the host with more free memory wins again.
    let later = place(
        &s,
        &p,
        &PlacementRequest {
            vm: "ns/vm",
            target: None,
            ignore_inbound_limit: false,
        },
        NOW.plus(std::time::Duration::from_secs(90)),
    )
    .unwrap();
    assert_eq!(later.chosen.as_deref(), Some("bad"));
}
