//! HostMaintenance against the embedded API server with simulated agents:
//! limits at every instant, restart mid-drain, dry run, cancellation,
//! non-migratable VMs.

mod common;
mod controller_support;

use std::time::Duration;

use controller_support::{Cluster, NS, watch_limits, within};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

use ferry::api::maintenance::MaintenancePhase;
use ferry::api::{Host, HostMaintenance, MAINTENANCE_LABEL, Migration, MigrationPhase};

async fn maintain(cluster: &Cluster, name: &str, host: &str, extra: serde_json::Value) {
    let api: Api<HostMaintenance> = Api::all(cluster.client.clone());
    let mut spec = json!({"host": host});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    let hm: HostMaintenance = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "HostMaintenance",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    api.create(&PostParams::default(), &hm).await.unwrap();
}

async fn phase_of(cluster: &Cluster, name: &str) -> Option<HostMaintenance> {
    Api::<HostMaintenance>::all(cluster.client.clone())
        .get(name)
        .await
        .ok()
}

async fn wait_phase(
    cluster: &Cluster,
    name: &str,
    phase: MaintenancePhase,
    secs: u64,
) -> HostMaintenance {
    within(secs, &format!("{name} reaches {phase:?}"), || async move {
        let hm = phase_of(cluster, name).await?;
        (hm.status.as_ref()?.phase == phase).then_some(hm)
    })
    .await
}

async fn unschedulable(cluster: &Cluster, host: &str) -> bool {
    Api::<Host>::all(cluster.client.clone())
        .get(host)
        .await
        .unwrap()
        .spec
        .unschedulable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_of_many_vms_respects_every_limit_at_every_instant() {
    let cluster = Cluster::start(6, Duration::from_millis(150)).await;
    cluster.set_limits(3, 2, 1).await;
    for i in 0..8 {
        cluster
            .add_vm(&format!("a{i}"), "h0", 128 + 16 * i, true)
            .await;
        cluster
            .add_vm(&format!("b{i}"), "h1", 128 + 16 * i, true)
            .await;
    }
    let peaks = watch_limits(cluster.client.clone(), cluster.stop.clone());
    let ctl = cluster.controller("ctl-a");
    maintain(&cluster, "drain-h0", "h0", json!({})).await;
    maintain(&cluster, "drain-h1", "h1", json!({})).await;
    let a = wait_phase(&cluster, "drain-h0", MaintenancePhase::Completed, 120).await;
    let b = wait_phase(&cluster, "drain-h1", MaintenancePhase::Completed, 120).await;
    for hm in [&a, &b] {
        let s = hm.status.clone().unwrap();
        assert_eq!((s.vms_total, s.vms_remaining, s.vms_blocked), (8, 0, 0));
        assert_eq!(s.migrations.len(), 8);
    }
    assert!(unschedulable(&cluster, "h0").await && unschedulable(&cluster, "h1").await);
    let placement = cluster.placement().await;
    for (vm, host) in &placement {
        let host = host.as_deref().unwrap();
        assert!(host != "h0" && host != "h1", "{vm} still on {host}");
        assert_eq!(cluster.agents.moves.lock().unwrap()[vm], 1, "{vm}");
    }
    let p = peaks.lock().unwrap().clone();
    assert!(p.doubled.is_empty(), "{p:?}");
    // The limits count transfers; as many targets again may be prepared
    // ahead, each count within the limits on its own.
    assert!(p.transfers.within(3, 2, 1), "{p:?}");
    assert!(p.preparations.within(3, 2, 1), "{p:?}");
    // Targets were prepared while transfers ran (the watch saw both).
    assert!(p.transfers.cluster >= 2, "{p:?}");
    assert!(p.together > 3, "{p:?}");
    // Owned by their maintenance, labelled with it.
    let migs: Api<Migration> = Api::namespaced(cluster.client.clone(), NS);
    let m = migs.get("drain-h0-a0-1").await.unwrap();
    assert_eq!(m.labels()[MAINTENANCE_LABEL], "drain-h0");
    assert_eq!(m.owner_references()[0].name, "drain-h0");
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_drain_is_replaced_and_no_vm_moves_twice() {
    let cluster = Cluster::start(4, Duration::from_millis(300)).await;
    cluster.set_limits(2, 2, 2).await;
    for i in 0..8 {
        cluster.add_vm(&format!("v{i}"), "h0", 128, true).await;
    }
    let first = cluster.controller("ctl-a");
    maintain(&cluster, "drain", "h0", json!({})).await;
    // Kill it once some VMs have moved and others have not.
    within(60, "a first VM moves", || async {
        (!cluster.agents.moves.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    first.kill();
    let second = cluster.controller("ctl-b");
    let hm = wait_phase(&cluster, "drain", MaintenancePhase::Completed, 120).await;
    assert_eq!(hm.status.unwrap().vms_remaining, 0);
    let moves = cluster.agents.moves.lock().unwrap().clone();
    assert_eq!(moves.len(), 8, "{moves:?}");
    assert!(moves.values().all(|n| *n == 1), "{moves:?}");
    let migs: Api<Migration> = Api::namespaced(cluster.client.clone(), NS);
    let all = migs.list(&Default::default()).await.unwrap();
    assert_eq!(all.items.len(), 8, "one attempt per VM");
    // The drain completes when every VM has moved (its status.host, the
    // commit point); each Migration records Succeeded once it reads that
    // back, a moment later.
    within(30, "every migration succeeded", || async {
        let all = migs.list(&Default::default()).await.ok()?;
        all.iter()
            .all(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MigrationPhase::Succeeded)
            })
            .then_some(())
    })
    .await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_fills_the_plan_and_moves_nothing() {
    let cluster = Cluster::start(3, Duration::from_millis(100)).await;
    cluster.add_vm("big", "h0", 1024, true).await;
    cluster.add_vm("small", "h0", 256, true).await;
    cluster.add_vm("pinned", "h0", 256, false).await;
    let ctl = cluster.controller("ctl-a");
    maintain(&cluster, "what-if", "h0", json!({"dryRun": true})).await;
    let hm = wait_phase(&cluster, "what-if", MaintenancePhase::Planned, 30).await;
    let s = hm.status.unwrap();
    let plan = s.plan.expect("a plan");
    let order: Vec<&str> = plan.entries.iter().map(|e| e.vm.as_str()).collect();
    assert_eq!(order[0], "big", "largest first: {order:?}");
    let big = &plan.entries[0];
    assert!(
        matches!(big.target.as_deref(), Some("h1" | "h2")),
        "{big:?}"
    );
    assert!(big.estimated_seconds >= 2, "{big:?}");
    let pinned = plan.entries.iter().find(|e| e.vm == "pinned").unwrap();
    assert!(
        pinned
            .blocker
            .as_deref()
            .unwrap()
            .starts_with("NotMigratable"),
        "{pinned:?}"
    );
    assert_eq!((s.vms_total, s.vms_blocked), (3, 1));
    assert_eq!(s.blockers[0].reason, "NotMigratable");
    assert!(plan.estimated_seconds >= big.estimated_seconds);
    // Nothing moved, nothing cordoned, no Migration.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!unschedulable(&cluster, "h0").await);
    let migs: Api<Migration> = Api::namespaced(cluster.client.clone(), NS);
    assert!(
        migs.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        cluster
            .placement()
            .await
            .values()
            .all(|h| h.as_deref() == Some("h0"))
    );
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_maintenance_cancels_what_is_in_flight_then_returns_the_host() {
    // Transfers take long enough to be caught in flight.
    let cluster = Cluster::start(3, Duration::from_secs(600)).await;
    cluster.set_limits(5, 1, 1).await;
    for i in 0..3 {
        cluster.add_vm(&format!("v{i}"), "h0", 128, true).await;
    }
    let peaks = watch_limits(cluster.client.clone(), cluster.stop.clone());
    let ctl = cluster.controller("ctl-a");
    maintain(&cluster, "drain", "h0", json!({})).await;
    let migs: Api<Migration> = Api::namespaced(cluster.client.clone(), NS);
    within(60, "a drain migration is transferring", || async {
        let l = migs.list(&Default::default()).await.ok()?;
        l.iter()
            .any(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MigrationPhase::Running)
            })
            .then_some(())
    })
    .await;
    assert!(unschedulable(&cluster, "h0").await);
    Api::<HostMaintenance>::all(cluster.client.clone())
        .delete("drain", &DeleteParams::default())
        .await
        .unwrap();
    within(60, "the maintenance is gone", || async {
        phase_of(&cluster, "drain").await.is_none().then_some(())
    })
    .await;
    // Every drain migration ended cancelled (then the garbage collector
    // removed them with their owner).
    let last = peaks.lock().unwrap().last.clone();
    assert_eq!(last.len(), 3, "{last:?}");
    for (name, (phase, cancel)) in &last {
        assert!(*cancel, "{name}");
        assert_eq!(*phase, MigrationPhase::Cancelled, "{name}");
    }
    assert!(!unschedulable(&cluster, "h0").await);
    assert!(
        cluster
            .placement()
            .await
            .values()
            .all(|h| h.as_deref() == Some("h0"))
    );
    assert!(cluster.agents.moves.lock().unwrap().is_empty());
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_migratable_vms_block_the_drain_or_are_stopped_for_it() {
    let cluster = Cluster::start(3, Duration::from_millis(100)).await;
    cluster.add_vm("free", "h0", 128, true).await;
    cluster.add_vm("pinned", "h0", 128, false).await;
    cluster.add_vm("free1", "h1", 128, true).await;
    cluster.add_vm("pinned1", "h1", 128, false).await;
    let ctl = cluster.controller("ctl-a");
    maintain(&cluster, "block", "h0", json!({"targetHost": "h2"})).await;
    maintain(
        &cluster,
        "stop",
        "h1",
        json!({"nonMigratable": "Stop", "targetHost": "h2"}),
    )
    .await;
    let stopped = wait_phase(&cluster, "stop", MaintenancePhase::Completed, 60).await;
    let drained = stopped
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Drained")
        .cloned()
        .unwrap();
    assert_eq!(
        (drained.status.as_str(), drained.reason.as_str()),
        ("True", "HostEmpty")
    );
    assert_eq!(stopped.status.unwrap().vms_total, 2);
    let blocked = within(60, "the blocked drain shows its blocker", || async {
        let hm = phase_of(&cluster, "block").await?;
        let s = hm.status.clone()?;
        (s.vms_remaining == 1 && s.vms_blocked == 1).then_some(s)
    })
    .await;
    assert_eq!(blocked.phase, MaintenancePhase::Draining);
    assert_eq!(blocked.blockers[0].vm, "pinned");
    assert_eq!(blocked.blockers[0].reason, "NotMigratable");
    // Conditions: still draining, not drained, blocked by the pinned VM,
    // as `kubectl describe` shows them, with the Event that said so.
    let cond = |t: &str| {
        blocked
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .cloned()
            .unwrap_or_else(|| panic!("no {t}: {:?}", blocked.conditions))
    };
    assert_eq!(cond("Draining").status, "True");
    assert_eq!(cond("Drained").status, "False");
    assert_eq!(cond("Failed").status, "False");
    let b = cond("Blocked");
    assert_eq!(
        (b.status.as_str(), b.reason.as_str()),
        ("True", "NotMigratable")
    );
    assert!(
        b.message.contains("default/pinned (NotMigratable"),
        "{}",
        b.message
    );
    cluster
        .event("HostMaintenance", "block", "Blocked", "default/pinned")
        .await;
    let describe = cluster
        .kubectl(&["describe", "hostmaintenance", "block"])
        .await;
    for text in ["Blocked", "NotMigratable", "default/pinned", "Draining"] {
        assert!(describe.contains(text), "{text}:\n{describe}");
    }
    let wide = cluster.kubectl(&["get", "hm", "block", "-o", "wide"]).await;
    assert!(
        wide.contains("MESSAGE") && wide.contains("1 blocked"),
        "{wide}"
    );
    let placement = cluster.placement().await;
    assert_eq!(placement["free"].as_deref(), Some("h2"));
    assert_eq!(placement["free1"].as_deref(), Some("h2"));
    // The stopped VM stays placed where it was, held by a condition.
    assert_eq!(placement["pinned1"].as_deref(), Some("h1"));
    let vms: Api<ferry::api::VirtualMachine> = Api::namespaced(cluster.client.clone(), NS);
    let held = |v: &ferry::api::VirtualMachine| {
        v.status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.type_ == "MaintenanceStopped" && c.status == "True")
    };
    let p = vms.get("pinned1").await.unwrap();
    assert!(held(&p));
    assert_eq!(
        p.spec.run_strategy,
        ferry::api::vm::RunStrategy::Running,
        "the user's spec is untouched"
    );
    // Ending the maintenance releases it.
    Api::<HostMaintenance>::all(cluster.client.clone())
        .delete("stop", &DeleteParams::default())
        .await
        .unwrap();
    within(30, "the stopped VM is released", || async {
        (!held(&vms.get("pinned1").await.ok()?)).then_some(())
    })
    .await;
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_deadline_fails_and_says_why() {
    // Transfers that never finish within the test.
    let cluster = Cluster::start(2, Duration::from_secs(600)).await;
    cluster.add_vm("slow", "h0", 128, true).await;
    let ctl = cluster.controller("ctl-a");
    maintain(&cluster, "hurry", "h0", json!({"deadline": "2s"})).await;
    let hm = wait_phase(&cluster, "hurry", MaintenancePhase::Failed, 30).await;
    let s = hm.status.unwrap();
    assert_eq!(s.vms_remaining, 1);
    assert!(s.message.unwrap().contains("deadline passed"));
    let cond = |t: &str| s.conditions.iter().find(|c| c.type_ == t).cloned().unwrap();
    assert_eq!(cond("DeadlineExceeded").status, "True");
    let failed = cond("Failed");
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("True", "DeadlineExceeded")
    );
    assert_eq!(cond("Draining").status, "False");
    cluster
        .event(
            "HostMaintenance",
            "hurry",
            "DeadlineExceeded",
            "deadline passed",
        )
        .await;
    ctl.shutdown().await;
}
