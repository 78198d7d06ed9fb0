use proptest::prelude::*;

use super::*;

fn q(name: &str, vm: &str, src: &str, dst: &str, origin: Origin, at: i64) -> QueuedMigration {
    QueuedMigration {
        name: name.into(),
        vm: vm.into(),
        cluster: "c1".into(),
        source: src.into(),
        target: dst.into(),
        origin,
        priority: 0,
        queued_at: Timestamp::from_secs(at),
        size: 0,
        batch: None,
        wants: Step::Transfer,
        ready: true,
    }
}

fn active(name: &str, vm: &str, src: &str, dst: &str) -> ActiveMigration {
    ActiveMigration {
        name: name.into(),
        vm: vm.into(),
        cluster: "c1".into(),
        source: src.into(),
        target: dst.into(),
        origin: Origin::User,
        stage: Stage::Transferring,
    }
}

const LIMITS: Limits = Limits {
    per_cluster: 5,
    outbound_per_host: 2,
    inbound_per_host: 2,
};

fn reason_of(p: &AdmissionPlan, name: &str) -> Option<&'static str> {
    p.waiting
        .iter()
        .find(|w| w.name == name)
        .map(|w| w.reason.reason())
}

#[test]
fn each_limit_holds_back_a_migration_with_its_reason() {
    let table: Vec<(&str, Vec<ActiveMigration>, &str)> = vec![
        (
            "vm already moving",
            vec![active("m0", "vm", "a", "b")],
            "VmBusy",
        ),
        (
            "cluster full",
            (0..5)
                .map(|i| {
                    active(
                        &format!("m{i}"),
                        &format!("v{i}"),
                        &format!("s{i}"),
                        &format!("t{i}"),
                    )
                })
                .collect(),
            "ClusterLimit",
        ),
        (
            "source sends two",
            vec![
                active("m0", "v0", "src", "x"),
                active("m1", "v1", "src", "y"),
            ],
            "OutboundLimit",
        ),
        (
            "target receives two",
            vec![
                active("m0", "v0", "x", "dst"),
                active("m1", "v1", "y", "dst"),
            ],
            "InboundLimit",
        ),
    ];
    for (name, running, want) in table {
        let p = admit(
            &[q("new", "vm", "src", "dst", Origin::User, 1)],
            &running,
            &LIMITS,
        );
        assert!(p.admitted.is_empty(), "{name}");
        assert_eq!(reason_of(&p, "new"), Some(want), "{name}");
        assert!(!p.waiting[0].reason.to_string().is_empty());
    }
}

#[test]
fn user_migrations_go_before_balancing_and_fifo_within_a_class() {
    let queue = vec![
        q("auto-old", "v1", "src", "t1", Origin::Balancing, 1),
        q("user-late", "v2", "src", "t2", Origin::User, 5),
        q("user-early", "v3", "src", "t3", Origin::User, 3),
    ];
    let p = admit(&queue, &[], &LIMITS);
    assert_eq!(p.admitted, vec!["user-early", "user-late"]);
    assert_eq!(reason_of(&p, "auto-old"), Some("OutboundLimit"));
    assert_eq!(p.waiting[0].position, 1);
}

#[test]
fn priority_orders_within_a_class_and_evacuations_come_first() {
    let mut hi = q("hi", "v1", "src", "t1", Origin::Maintenance, 9);
    hi.priority = 10;
    let queue = vec![
        q("lo", "v2", "src", "t2", Origin::Maintenance, 1),
        hi,
        q("evac", "v3", "dead", "t3", Origin::Evacuation, 20),
    ];
    let limits = Limits {
        per_cluster: 2,
        ..LIMITS
    };
    let p = admit(&queue, &[], &limits);
    assert_eq!(p.admitted, vec!["evac", "hi"]);
    assert_eq!(reason_of(&p, "lo"), Some("ClusterLimit"));
}

#[test]
fn a_blocked_migration_does_not_hold_back_one_that_needs_free_hosts() {
    let running = vec![
        active("m0", "v0", "x", "busy"),
        active("m1", "v1", "y", "busy"),
    ];
    let queue = vec![
        q("first", "v2", "src", "busy", Origin::User, 1),
        q("second", "v3", "src", "free", Origin::User, 2),
    ];
    let p = admit(&queue, &running, &LIMITS);
    assert_eq!(p.admitted, vec!["second"]);
    assert_eq!(reason_of(&p, "first"), Some("InboundLimit"));
}

#[test]
fn two_queued_migrations_of_one_vm_start_one_at_a_time() {
    let queue = vec![
        q("a", "vm", "src", "t1", Origin::User, 1),
        q("b", "vm", "src", "t2", Origin::User, 2),
    ];
    let p = admit(&queue, &[], &LIMITS);
    assert_eq!(p.admitted, vec!["a"]);
    assert_eq!(
        p.waiting[0].reason,
        WaitReason::VmBusy { other: "a".into() }
    );
}

#[test]
fn evacuations_do_not_use_the_dead_sources_outbound_slots() {
    let queue: Vec<QueuedMigration> = (0..4)
        .map(|i| {
            q(
                &format!("e{i}"),
                &format!("v{i}"),
                "dead",
                &format!("t{i}"),
                Origin::Evacuation,
                i,
            )
        })
        .collect();
    assert_eq!(admit(&queue, &[], &LIMITS).admitted.len(), 4);
}

proptest! {
    #[test]
    fn admission_never_exceeds_a_limit_and_keeps_fifo_among_equals(
        queued in prop::collection::vec((0u8..6, 0u8..4, 0u8..4, 0u8..3, 0i64..50), 0..30),
        running in prop::collection::vec((0u8..6, 0u8..4, 0u8..4), 0..6),
        per_cluster in 1u32..8, outbound in 1u32..4, inbound in 1u32..4,
    ) {
        let limits = Limits { per_cluster, outbound_per_host: outbound, inbound_per_host: inbound };
        let origins = [Origin::User, Origin::Maintenance, Origin::Balancing];
        let queue: Vec<QueuedMigration> = queued.iter().enumerate().map(|(i, (vm, s, t, o, at))| {
            q(&format!("q{i}"), &format!("v{vm}"), &format!("h{s}"), &format!("h{}", (t + s + 1) % 5), origins[*o as usize], *at)
        }).collect();
        let active: Vec<ActiveMigration> = running.iter().enumerate().map(|(i, (vm, s, t))| {
            active(&format!("r{i}"), &format!("w{vm}"), &format!("h{s}"), &format!("h{}", (t + s + 1) % 5))
        }).collect();
        let p = admit(&queue, &active, &limits);
        prop_assert_eq!(p.admitted.len() + p.waiting.len(), queue.len());
        let started: Vec<&QueuedMigration> = p.admitted.iter().map(|n| queue.iter().find(|m| &m.name == n).unwrap()).collect();
        let total = active.len() + started.len();
        prop_assert!(started.is_empty() || total as u32 <= per_cluster.max(active.len() as u32));
        for h in 0..5 {
            let host = format!("h{h}");
            let out_before = active.iter().filter(|m| m.source == host).count() as u32;
            let in_before = active.iter().filter(|m| m.target == host).count() as u32;
            let out_new = started.iter().filter(|m| m.source == host).count() as u32;
            let in_new = started.iter().filter(|m| m.target == host).count() as u32;
            prop_assert!(out_new == 0 || out_before + out_new <= outbound);
            prop_assert!(in_new == 0 || in_before + in_new <= inbound);
        }
        let mut vms = std::collections::HashSet::new();
        for m in &started {
            prop_assert!(vms.insert(&m.vm), "two migrations of {} started", m.vm);
        }
        // FIFO among equals: an admitted migration never passes an earlier
        // waiting one of the same class that needs exactly the same slots.
        for w in &p.waiting {
            let wm = queue.iter().find(|m| m.name == w.name).unwrap();
            for s in &started {
                let same = s.source == wm.source && s.target == wm.target && s.origin.class() == wm.origin.class() && s.vm != wm.vm;
                if same && !matches!(w.reason, WaitReason::VmBusy { .. }) {
                    prop_assert!((s.queued_at, &s.name) < (wm.queued_at, &wm.name), "{} passed {}", s.name, wm.name);
                }
            }
        }
    }
}

#[test]
fn a_batch_starts_largest_first_and_waits_for_a_larger_member_still_being_scheduled() {
    let member = |name: &str, size: u64, ready: bool| QueuedMigration {
        size,
        batch: Some("drain-h0".into()),
        wants: Step::Prepare,
        ready,
        ..q(
            name,
            name,
            "h0",
            &format!("t-{name}"),
            Origin::Maintenance,
            10,
        )
    };
    let limits = Limits {
        per_cluster: 10,
        outbound_per_host: 2,
        inbound_per_host: 2,
    };
    // Names in the opposite order of sizes: size decides.
    let queue = [
        member("a", 1, true),
        member("b", 2, true),
        member("c", 3, true),
    ];
    let p = admit(&queue, &[], &limits);
    assert_eq!(p.admitted, ["c", "b"]);
    // The largest is not queued yet: nothing smaller of its batch passes it.
    let queue = [
        member("a", 1, true),
        member("b", 2, true),
        member("c", 3, false),
    ];
    let p = admit(&queue, &[], &limits);
    assert!(p.admitted.is_empty(), "{p:?}");
    assert_eq!(reason_of(&p, "b"), Some("BatchAhead"));
    assert!(
        p.waiting[0]
            .reason
            .to_string()
            .contains("c, a larger VM of drain-h0, is not ready")
    );
    // A smaller member still being scheduled holds nothing back.
    let queue = [
        member("a", 1, false),
        member("b", 2, true),
        member("c", 3, true),
    ];
    assert_eq!(admit(&queue, &[], &limits).admitted, ["c", "b"]);
    // Another batch, or a user's migration, is not held by it.
    let other = QueuedMigration {
        batch: Some("drain-h1".into()),
        ..member("x", 1, true)
    };
    let user = q("u", "u", "h2", "h3", Origin::User, 10);
    let queue = [member("c", 3, false), other, user];
    assert_eq!(admit(&queue, &[], &limits).admitted, ["x", "u"]);
}

proptest! {
    /// One drain (a batch from one host, targets never full): the members
    /// that start are the largest ready ones ahead of every member still
    /// being scheduled, as many as the source's outbound limit allows.
    #[test]
    fn a_drain_is_admitted_longest_transfer_first(
        members in prop::collection::vec((1u64..6, prop::bool::weighted(0.8)), 1..20),
        outbound in 1u32..6,
    ) {
        let queue: Vec<QueuedMigration> = members.iter().enumerate().map(|(i, (size, ready))| QueuedMigration {
            size: *size,
            batch: Some("drain".into()),
            wants: Step::Prepare,
            ready: *ready,
            ..q(&format!("m{i:02}"), &format!("v{i}"), "h0", &format!("t{i}"), Origin::Maintenance, 0)
        }).collect();
        let limits = Limits { per_cluster: 100, outbound_per_host: outbound, inbound_per_host: 100 };
        let p = admit(&queue, &[], &limits);
        let mut by_size: Vec<&QueuedMigration> = queue.iter().collect();
        by_size.sort_by(|a, b| b.size.cmp(&a.size).then(a.name.cmp(&b.name)));
        let expected: Vec<String> = by_size
            .iter()
            .take_while(|m| m.ready)
            .take(outbound as usize)
            .map(|m| m.name.clone())
            .collect();
        prop_assert_eq!(&p.admitted, &expected);
        // Nothing smaller ever starts before something larger of the batch.
        for a in &p.admitted {
            let a = queue.iter().find(|m| &m.name == a).unwrap();
            for b in queue.iter().filter(|b| !p.admitted.contains(&b.name)) {
                prop_assert!(a.size >= b.size, "{} ({}) started before {} ({})", a.name, a.size, b.name, b.size);
            }
        }
    }
}

#[test]
fn a_migration_holds_a_preparation_slot_then_a_transfer_slot_then_only_its_vm() {
    use Phase as P;
    let table = [
        (P::Pending, false, false, None),
        (P::Queued, false, false, None),
        (P::Scheduled, false, false, Some(Stage::Preparing)),
        (P::PreparingTarget, false, false, Some(Stage::Preparing)),
        (P::Running, false, false, Some(Stage::Transferring)),
        (P::PostCopy, false, false, Some(Stage::Transferring)),
        // The source reported the stream's end: nothing flows any more.
        (P::Running, false, true, Some(Stage::Finishing)),
        (P::PostCopy, false, true, Some(Stage::Finishing)),
        (P::Completing, false, false, Some(Stage::Finishing)),
        (P::Succeeded, false, false, None),
        (P::Failed, false, true, None),
        (P::Cancelled, false, false, None),
        // An evacuation prepares nothing: a transfer slot from admission to end.
        (P::Scheduled, true, false, Some(Stage::Transferring)),
        (P::Completing, true, false, Some(Stage::Transferring)),
    ];
    for (phase, evacuation, ended, want) in table {
        assert_eq!(
            Stage::of(phase, evacuation, ended),
            want,
            "{phase:?} evacuation={evacuation} ended={ended}"
        );
    }
    assert_eq!(Stage::Preparing.slot(), Some(Step::Prepare));
    assert_eq!(Stage::Transferring.slot(), Some(Step::Transfer));
    assert_eq!(Stage::Finishing.slot(), None);
}

#[test]
fn preparations_and_transfers_are_counted_each_against_the_limits() {
    let held = |name: &str, vm: &str, stage: Stage| ActiveMigration {
        stage,
        ..active(name, vm, "src", &format!("t-{name}"))
    };
    let ask = |name: &str, wants: Step| QueuedMigration {
        wants,
        ..q(name, name, "src", &format!("t-{name}"), Origin::User, 1)
    };
    // The source sends two streams (its outbound limit): a third target
    // may still be prepared, and a second one.
    let sending = vec![
        held("s0", "v0", Stage::Transferring),
        held("s1", "v1", Stage::Transferring),
    ];
    let p = admit(
        &[ask("p0", Step::Prepare), ask("p1", Step::Prepare)],
        &sending,
        &LIMITS,
    );
    assert_eq!(p.admitted, ["p0", "p1"]);
    // Two prepared ahead as well: a third preparation waits, and so does a
    // prepared one's transfer, each saying which count is full.
    let mut all = sending.clone();
    all.push(held("p0", "p0", Stage::Preparing));
    all.push(held("p1", "p1", Stage::Preparing));
    let p = admit(
        &[ask("p0", Step::Transfer), ask("p2", Step::Prepare)],
        &all,
        &LIMITS,
    );
    assert!(p.admitted.is_empty(), "{p:?}");
    assert_eq!(
        p.waiting[0].reason,
        WaitReason::OutboundLimit {
            host: "src".into(),
            limit: 2,
            step: Step::Transfer
        }
    );
    assert!(
        p.waiting[0]
            .reason
            .to_string()
            .contains("outbound transfers")
    );
    assert_eq!(
        p.waiting[1].reason,
        WaitReason::OutboundLimit {
            host: "src".into(),
            limit: 2,
            step: Step::Prepare
        }
    );
    assert!(
        p.waiting[1]
            .reason
            .to_string()
            .contains("targets being prepared")
    );
    // One stream ends (the source reported it): the prepared one starts at
    // once; its own VM, which it holds while preparing, does not hold it.
    all[0].stage = Stage::Finishing;
    let p = admit(&[ask("p0", Step::Transfer)], &all, &LIMITS);
    assert_eq!(p.admitted, ["p0"]);
    // A finishing migration still holds its VM.
    let p = admit(
        &[ask("again", Step::Prepare)],
        &[held("s0", "again", Stage::Finishing)],
        &LIMITS,
    );
    assert_eq!(reason_of(&p, "again"), Some("VmBusy"));
}

#[test]
fn a_batch_member_does_not_start_its_transfer_before_a_larger_one_still_preparing() {
    let member = |name: &str, size: u64, wants: Step, ready: bool| QueuedMigration {
        size,
        batch: Some("drain-h0".into()),
        wants,
        ready,
        ..q(
            name,
            name,
            "h0",
            &format!("t-{name}"),
            Origin::Maintenance,
            10,
        )
    };
    // "big" is still preparing its target; "small" is prepared.
    let queue = [
        member("small", 1, Step::Transfer, true),
        member("big", 2, Step::Transfer, false),
        member("next", 1, Step::Prepare, true),
    ];
    let p = admit(&queue, &[], &LIMITS);
    assert_eq!(
        p.waiting[0].reason,
        WaitReason::BatchAhead {
            batch: "drain-h0".into(),
            other: "big".into()
        }
    );
    // Preparing is not held by it: the pipeline fills.
    assert_eq!(p.admitted, ["next"]);
    // Once it is prepared, the larger goes first.
    let queue = [
        member("small", 1, Step::Transfer, true),
        member("big", 2, Step::Transfer, true),
    ];
    let limits = Limits {
        outbound_per_host: 1,
        ..LIMITS
    };
    assert_eq!(admit(&queue, &[], &limits).admitted, ["big"]);
}

proptest! {
    /// Whatever mix of steps is asked for and held, each step's count stays
    /// within every limit; what a finishing migration held is free.
    #[test]
    fn neither_step_ever_exceeds_a_limit(
        queued in prop::collection::vec((0u8..8, 0u8..3, 0u8..4, prop::bool::ANY), 0..30),
        held in prop::collection::vec((0u8..8, 0u8..3, 0u8..4, 0u8..3), 0..10),
        per_cluster in 1u32..8, outbound in 1u32..4, inbound in 1u32..4,
    ) {
        let limits = Limits { per_cluster, outbound_per_host: outbound, inbound_per_host: inbound };
        let stages = [Stage::Preparing, Stage::Transferring, Stage::Finishing];
        let active: Vec<ActiveMigration> = held.iter().enumerate().map(|(i, (vm, s, t, st))| ActiveMigration {
            stage: stages[*st as usize],
            ..active(&format!("r{i}"), &format!("w{vm}"), &format!("h{s}"), &format!("h{}", (t + s + 1) % 5))
        }).collect();
        let queue: Vec<QueuedMigration> = queued.iter().enumerate().map(|(i, (vm, s, t, transfer))| QueuedMigration {
            wants: if *transfer { Step::Transfer } else { Step::Prepare },
            ..q(&format!("q{i}"), &format!("v{vm}"), &format!("h{s}"), &format!("h{}", (t + s + 1) % 5), Origin::User, i as i64)
        }).collect();
        let p = admit(&queue, &active, &limits);
        for step in [Step::Prepare, Step::Transfer] {
            let holding: Vec<(&str, &str)> = active.iter().filter(|m| m.stage.slot() == Some(step)).map(|m| (m.source.as_str(), m.target.as_str())).collect();
            let started: Vec<(&str, &str)> = p.admitted.iter().map(|n| queue.iter().find(|m| &m.name == n).unwrap()).filter(|m| m.wants == step).map(|m| (m.source.as_str(), m.target.as_str())).collect();
            if !started.is_empty() {
                prop_assert!((holding.len() + started.len()) as u32 <= per_cluster);
            }
            for h in 0..5 {
                let host = format!("h{h}");
                let count = |v: &[(&str, &str)], out: bool| v.iter().filter(|(s, t)| if out { *s == host } else { *t == host }).count() as u32;
                let (out_new, in_new) = (count(&started, true), count(&started, false));
                prop_assert!(out_new == 0 || count(&holding, true) + out_new <= outbound);
                prop_assert!(in_new == 0 || count(&holding, false) + in_new <= inbound);
            }
        }
        // With nothing but finishing migrations held, the first ask of
        // either step is always admitted.
        if active.iter().all(|m| m.stage == Stage::Finishing) {
            let free_vm = |m: &QueuedMigration| !active.iter().any(|a| a.vm == m.vm);
            for step in [Step::Prepare, Step::Transfer] {
                if let Some(first) = queue.iter().find(|m| m.wants == step && free_vm(m)) {
                    let earlier_same_vm = queue.iter().any(|o| o.vm == first.vm && (o.queued_at, &o.name) < (first.queued_at, &first.name));
                    if !earlier_same_vm {
                        prop_assert!(p.admitted.contains(&first.name), "{} not admitted: {:?}", first.name, p);
                    }
                }
            }
        }
    }
}

#[test]
fn the_queue_is_looked_at_again_when_a_transition_gives_up_a_slot() {
    use Phase as P;
    let table = [
        (P::Queued, P::Scheduled, false, None),
        (P::Queued, P::PreparingTarget, false, None),
        (P::Scheduled, P::PreparingTarget, false, None),
        (P::PreparingTarget, P::Running, false, Some(Step::Prepare)),
        (P::PreparingTarget, P::Failed, false, Some(Step::Prepare)),
        (P::Scheduled, P::Scheduling, false, Some(Step::Prepare)),
        (P::Running, P::PostCopy, false, None),
        (P::Running, P::Completing, false, Some(Step::Transfer)),
        (P::PostCopy, P::Completing, false, Some(Step::Transfer)),
        (P::Running, P::Cancelled, false, Some(Step::Transfer)),
        (P::Completing, P::Succeeded, false, None),
        (P::Scheduled, P::Completing, true, None),
        (P::Completing, P::Succeeded, true, Some(Step::Transfer)),
    ];
    for (from, to, evacuation, want) in table {
        assert_eq!(frees(from, to, evacuation), want, "{from:?} → {to:?}");
    }
    // A batch member leaving scheduling lets the smaller ones go.
    assert!(releases_batch(P::Pending, P::PreparingTarget));
    assert!(releases_batch(P::Scheduling, P::Queued));
    assert!(releases_batch(P::Scheduling, P::Failed));
    assert!(!releases_batch(P::Pending, P::Scheduling));
    assert!(!releases_batch(P::Queued, P::PreparingTarget));
}
