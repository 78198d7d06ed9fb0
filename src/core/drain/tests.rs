use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::core::migration::FailureReason;
use crate::core::policy::{EffectivePolicy, Limits, PolicyOverrides, PolicySource};
use crate::core::scheduler::testkit::{HostExt, NOW, host, vm};
use crate::core::scheduler::{HostPhase, VmInfo};
use crate::core::time::GIB;

fn sized(id: &str, gib: u64) -> VmInfo {
    let mut v = vm(id, Some("old"));
    v.resources.memory = gib * GIB;
    v
}

fn request<'a>(rates: &'a HashMap<String, u64>) -> DrainRequest<'a> {
    DrainRequest {
        host: "old",
        target: None,
        non_migratable: NonMigratable::Block,
        dirty_rates: rates,
        link_bandwidth: 200 * MIB,
    }
}

fn migrate(e: &PlanEntry) -> (&str, Duration, Duration) {
    match &e.outcome {
        Outcome::Migrate {
            target,
            start,
            duration,
            ..
        } => (target.as_str(), *start, *duration),
        other => panic!("{}: {other:?}", e.vm),
    }
}

#[test]
fn every_vm_gets_a_target_or_a_blocker_with_its_reason() {
    let mut stuck = sized("ns/stuck", 2);
    stuck.migratable = false;
    let mut sick = sized("ns/sick", 2);
    sick.quarantined = true;
    let vms = vec![
        sized("ns/small", 2),
        sized("ns/huge", 200),
        stuck,
        sick,
        sized("ns/big", 8),
    ];
    let s = Snapshot::new(vec![host("old"), host("a"), host("b")], vms, vec![]);
    let rates = HashMap::new();
    let p = plan(&s, &EffectivePolicy::default(), &request(&rates), NOW).unwrap();
    let order: Vec<&str> = p.entries.iter().map(|e| e.vm.as_str()).collect();
    assert_eq!(
        order,
        vec!["ns/huge", "ns/big", "ns/sick", "ns/small", "ns/stuck"],
        "largest first, then by name"
    );
    let reasons: Vec<(&str, &str)> = p.blockers().map(|(v, b)| (v, b.reason())).collect();
    assert_eq!(
        reasons,
        vec![
            ("ns/huge", "NoHostFits"),
            ("ns/sick", "Quarantined"),
            ("ns/stuck", "NotMigratable")
        ]
    );
    let huge = p.blockers().next().unwrap().1.message();
    assert!(huge.contains("InsufficientMemory"), "{huge}");
    assert_eq!(
        p.entries.iter().map(|e| e.order).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
}

#[test]
fn non_migratable_vms_are_stopped_when_asked() {
    let mut stuck = sized("ns/stuck", 2);
    stuck.migratable = false;
    let s = Snapshot::new(vec![host("old"), host("a")], vec![stuck], vec![]);
    let rates = HashMap::new();
    let req = DrainRequest {
        non_migratable: NonMigratable::Stop,
        ..request(&rates)
    };
    let p = plan(&s, &EffectivePolicy::default(), &req, NOW).unwrap();
    assert_eq!(p.entries[0].outcome, Outcome::Stop);
    assert_eq!(p.blockers().count(), 0);
}

#[test]
fn placed_vms_reserve_their_target_so_later_ones_go_elsewhere() {
    let vms = vec![sized("ns/x", 40), sized("ns/y", 40)];
    let s = Snapshot::new(vec![host("old"), host("a"), host("b")], vms, vec![]);
    let rates = HashMap::new();
    let p = plan(&s, &EffectivePolicy::default(), &request(&rates), NOW).unwrap();
    let targets: Vec<&str> = p.entries.iter().map(|e| migrate(e).0).collect();
    assert_eq!(targets, vec!["a", "b"]);
}

#[test]
fn a_given_target_takes_every_vm_that_fits_and_the_rest_are_blocked() {
    let vms = vec![sized("ns/x", 40), sized("ns/y", 40)];
    let s = Snapshot::new(vec![host("old"), host("a"), host("b")], vms, vec![]);
    let rates = HashMap::new();
    let req = DrainRequest {
        target: Some("b"),
        ..request(&rates)
    };
    let p = plan(&s, &EffectivePolicy::default(), &req, NOW).unwrap();
    assert_eq!(migrate(&p.entries[0]).0, "b");
    assert_eq!(
        p.entries[1].outcome,
        Outcome::Blocked(Blocker::NoHostFits {
            summary: p.blockers().next().unwrap().1.message()
        })
    );
    let err = plan(
        &s,
        &EffectivePolicy::default(),
        &DrainRequest {
            target: Some("zz"),
            ..request(&rates)
        },
        NOW,
    );
    assert_eq!(err, Err(DrainError::UnknownTarget("zz".into())));
    let err = plan(
        &s,
        &EffectivePolicy::default(),
        &DrainRequest {
            host: "nope",
            ..request(&rates)
        },
        NOW,
    );
    assert_eq!(err, Err(DrainError::UnknownHost("nope".into())));
    assert_eq!(err.unwrap_err().reason(), "UnknownHost");
}

#[test]
fn the_estimate_follows_memory_bandwidth_dirty_rate_and_limits() {
    // Four 4 GiB VMs, 200 MiB/s shared by 2 streams: 100 MiB/s each.
    let vms: Vec<VmInfo> = (0..4).map(|i| sized(&format!("ns/v{i}"), 4)).collect();
    let s = Snapshot::new(
        vec![
            host("old"),
            host("a"),
            host("b"),
            host("c").phase(HostPhase::Maintenance),
        ],
        vms,
        vec![],
    );
    let mut rates = HashMap::new();
    let policy = EffectivePolicy::default();
    let p = plan(&s, &policy, &request(&rates), NOW).unwrap();
    let one = Duration::from_secs_f64(4096.0 / 100.0) + SETUP_TIME;
    assert_eq!(p.concurrency, 2);
    assert_eq!(p.estimated_total, one * 2, "two waves of two");
    assert_eq!(p.ideal, one * 2);
    // A guest dirtying half the stream doubles its transfer.
    rates.insert("ns/v0".to_string(), 50 * MIB);
    let p = plan(&s, &policy, &request(&rates), NOW).unwrap();
    let v0 = p.entries.iter().find(|e| e.vm == "ns/v0").unwrap();
    assert_eq!(
        migrate(v0).2,
        Duration::from_secs_f64(4096.0 / 50.0) + SETUP_TIME
    );
    // One target that takes one at a time: serial.
    let limits = Limits {
        inbound_per_host: 1,
        ..policy.limits
    };
    let serial = EffectivePolicy {
        limits,
        ..policy.clone()
    };
    let p = plan(
        &s,
        &serial,
        &DrainRequest {
            target: Some("a"),
            ..request(&HashMap::new())
        },
        NOW,
    )
    .unwrap();
    let p_targets: Vec<Duration> = p.entries.iter().map(|e| migrate(e).1).collect();
    assert_eq!(p_targets, vec![Duration::ZERO, one, one * 2, one * 3]);
}

#[test]
fn a_guest_dirtying_faster_than_a_stream_is_flagged() {
    let s = Snapshot::new(
        vec![host("old"), host("a")],
        vec![sized("ns/busy", 4)],
        vec![],
    );
    let rates = HashMap::from([("ns/busy".to_string(), 150 * MIB)]);
    let p = plan(&s, &EffectivePolicy::default(), &request(&rates), NOW).unwrap();
    let Outcome::Migrate {
        risk: Some(risk), ..
    } = &p.entries[0].outcome
    else {
        panic!("{:?}", p.entries[0])
    };
    assert!(risk.contains("abort"), "{risk}");
    let zero = DrainRequest {
        link_bandwidth: 0,
        ..request(&rates)
    };
    assert_eq!(
        plan(&s, &EffectivePolicy::default(), &zero, NOW),
        Err(DrainError::NoBandwidth)
    );
}

proptest! {
    #[test]
    fn the_simulated_drain_respects_every_limit_at_every_instant(
        sizes in prop::collection::vec(1u64..16, 1..30),
        targets in 1usize..6,
        outbound in 1u32..4, inbound in 1u32..3, per_cluster in 1u32..6,
    ) {
        let vms: Vec<VmInfo> = sizes.iter().enumerate().map(|(i, g)| sized(&format!("ns/v{i}"), *g)).collect();
        let mut hosts = vec![host("old")];
        hosts.extend((0..targets).map(|i| host(&format!("t{i}")).memory_gib(1024, 0)));
        let s = Snapshot::new(hosts, vms, vec![]);
        let o = PolicyOverrides { parallel_outbound_per_host: Some(outbound), parallel_inbound_per_host: Some(inbound), parallel_migrations_per_cluster: Some(per_cluster), ..Default::default() };
        let policy = EffectivePolicy::resolve(PolicySource::Defaults, &o).unwrap();
        let rates = HashMap::new();
        let p = plan(&s, &policy, &request(&rates), NOW).unwrap();
        let moves: Vec<(&str, Duration, Duration)> = p.entries.iter().map(migrate).collect();
        prop_assert_eq!(moves.len(), sizes.len());
        for (_, start, _) in &moves {
            let live: Vec<_> = moves.iter().filter(|(_, s2, d2)| s2 <= start && *start < *s2 + *d2).collect();
            prop_assert!(live.len() as u32 <= outbound.min(per_cluster));
            for t in 0..targets {
                let name = format!("t{t}");
                prop_assert!(live.iter().filter(|(x, _, _)| *x == name).count() as u32 <= inbound);
            }
        }
        let longest = moves.iter().map(|m| m.2).max().unwrap();
        prop_assert!(p.estimated_total >= p.ideal);
        prop_assert!(p.estimated_total <= p.ideal * (outbound.min(per_cluster)) + longest);
    }
}

#[test]
fn retries_back_off_then_give_up_and_quarantine_repeat_offenders() {
    let p = RetryPolicy::default();
    let t = |s: i64| Timestamp::from_secs(s);
    let fail = |s: i64, reason| Attempt { at: t(s), reason };
    let lost = FailureReason::TargetHostLost;
    let table: Vec<(Vec<Attempt>, Vec<Attempt>, i64, RetryDecision)> = vec![
        (vec![], vec![], 0, RetryDecision::RetryNow),
        (
            vec![fail(100, lost)],
            vec![fail(100, lost)],
            110,
            RetryDecision::RetryAt(t(130)),
        ),
        (
            vec![fail(100, lost)],
            vec![fail(100, lost)],
            130,
            RetryDecision::RetryNow,
        ),
        (
            vec![fail(0, lost), fail(100, lost)],
            vec![],
            120,
            RetryDecision::RetryAt(t(160)),
        ),
    ];
    for (drain, history, now, want) in table {
        assert_eq!(
            next_attempt(&drain, &history, &p, t(now)),
            want,
            "{drain:?} at {now}"
        );
    }
    let three = vec![fail(0, lost), fail(100, lost), fail(200, lost)];
    assert!(matches!(
        next_attempt(&three, &[], &p, t(10_000)),
        RetryDecision::GiveUp { .. }
    ));
    let fatal = vec![fail(0, FailureReason::VmNotMigratable)];
    assert!(
        matches!(next_attempt(&fatal, &[], &p, t(10)), RetryDecision::GiveUp { message } if message.contains("cannot help"))
    );
    let history: Vec<Attempt> = (0..5).map(|i| fail(i * 1000, lost)).collect();
    assert!(matches!(
        next_attempt(&[], &history, &p, t(5000)),
        RetryDecision::Quarantine { .. }
    ));
    // Failures older than the window are forgiven.
    assert_eq!(
        next_attempt(&[], &history, &p, t(5000 + 24 * 3600)),
        RetryDecision::RetryNow
    );
}

#[test]
fn back_off_is_capped() {
    let p = RetryPolicy {
        max_attempts: 100,
        ..Default::default()
    };
    let attempts: Vec<Attempt> = (0..20)
        .map(|i| Attempt {
            at: Timestamp::from_secs(i),
            reason: FailureReason::TransferFailed,
        })
        .collect();
    assert_eq!(
        next_attempt(&attempts, &[], &p, Timestamp::from_secs(20)),
        RetryDecision::RetryAt(Timestamp::from_secs(19).plus(p.max_backoff))
    );
}

fn with_policy(kind: crate::core::policy::SchedulingPolicyKind) -> EffectivePolicy {
    let o = PolicyOverrides {
        scheduling_policy: Some(kind),
        ..Default::default()
    };
    EffectivePolicy::resolve(PolicySource::Defaults, &o).unwrap()
}

#[test]
fn an_evenly_distributed_drain_spreads_busy_vms_over_idle_hosts() {
    // Each VM carries a third of the old host's load: 33 points. Without
    // counting the moves already planned, all three would go to `a`.
    let vms: Vec<VmInfo> = (0..3)
        .map(|i| {
            let mut v = sized(&format!("ns/v{i}"), 2);
            v.resources.cpus = 8;
            v
        })
        .collect();
    let s = Snapshot::new(
        vec![
            host("old").cpu(100.0),
            host("a").cpu(0.0),
            host("b").cpu(10.0),
            host("c").cpu(20.0),
        ],
        vms,
        vec![],
    );
    let rates = HashMap::new();
    let policy = with_policy(crate::core::policy::SchedulingPolicyKind::EvenlyDistributed);
    let p = plan(&s, &policy, &request(&rates), NOW).unwrap();
    let mut targets: Vec<&str> = p.entries.iter().map(|e| migrate(e).0).collect();
    targets.sort();
    assert_eq!(
        targets,
        vec!["a", "b", "c"],
        "planned moves count on their targets' load"
    );
}

#[test]
fn an_in_cluster_upgrade_drain_empties_an_old_host_onto_upgraded_ones_only() {
    let vms: Vec<VmInfo> = (0..4).map(|i| sized(&format!("ns/v{i}"), 2)).collect();
    let s = Snapshot::new(
        vec![
            host("old").version("1.4.0"),
            host("older").version("1.3.0"),
            host("new").version("1.5.0"),
        ],
        vms,
        vec![],
    );
    let rates = HashMap::new();
    let policy = with_policy(crate::core::policy::SchedulingPolicyKind::InClusterUpgrade);
    let p = plan(&s, &policy, &request(&rates), NOW).unwrap();
    assert!(p.entries.iter().all(|e| migrate(e).0 == "new"), "{p:?}");
}

#[test]
fn a_vm_already_in_flight_is_not_planned_twice() {
    let s = Snapshot::new(
        vec![host("old"), host("a")],
        vec![sized("ns/moving", 2), sized("ns/still", 2)],
        vec![crate::core::scheduler::InFlight {
            vm: "ns/moving".into(),
            source: "old".into(),
            target: Some("a".into()),
        }],
    );
    let rates = HashMap::new();
    let p = plan(&s, &EffectivePolicy::default(), &request(&rates), NOW).unwrap();
    let moving = p.entries.iter().find(|e| e.vm == "ns/moving").unwrap();
    assert_eq!(
        moving.outcome,
        Outcome::AlreadyMoving {
            target: Some("a".into())
        }
    );
    let still = p.entries.iter().find(|e| e.vm == "ns/still").unwrap();
    assert_eq!(migrate(still).0, "a");
}
