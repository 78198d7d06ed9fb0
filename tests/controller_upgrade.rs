//! An in-cluster upgrade (RHV's `InClusterUpgrade` scheduling policy)
//! through the controller, with simulated agents: hosts report different
//! versions in `Host.status.agentVersion` (what a real agent writes on each
//! beat: its build's version), and a drain of an old host moves its VMs
//! only to hosts with the same or a newer version, never to an older one;
//! a VM on the newest host has nowhere to go back to.

mod common;
mod controller_support;

use std::time::Duration;

use controller_support::{Cluster, NS, within};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use ferry::api::maintenance::MaintenancePhase;
use ferry::api::{Host, HostMaintenance, HostPhase, Migration, MigrationPhase};

async fn set_version(cluster: &Cluster, host: &str, version: &str) {
    Api::<Host>::all(cluster.client.clone())
        .patch_status(
            host,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"agentVersion": version}})),
        )
        .await
        .unwrap();
}

async fn maintain(cluster: &Cluster, name: &str, host: &str, dry_run: bool) {
    let hm: HostMaintenance = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "HostMaintenance",
        "metadata": {"name": name}, "spec": {"host": host, "dryRun": dry_run},
    }))
    .unwrap();
    Api::<HostMaintenance>::all(cluster.client.clone())
        .create(&PostParams::default(), &hm)
        .await
        .unwrap();
}

async fn wait_phase(cluster: &Cluster, name: &str, phase: MaintenancePhase) -> HostMaintenance {
    let api: Api<HostMaintenance> = Api::all(cluster.client.clone());
    within(120, &format!("{name} reaches {phase:?}"), || async {
        let hm = api.get(name).await.ok()?;
        (hm.status.as_ref()?.phase == phase).then_some(hm)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_drain_moves_vms_only_to_same_or_newer_hosts_and_never_back() {
    let cluster = Cluster::start(4, Duration::from_millis(200)).await;
    // h0 is being upgraded from 1.0.0; h1 runs the same, h2 is already
    // upgraded, h3 is older still.
    for (host, version) in [
        ("h0", "1.0.0"),
        ("h1", "1.0.0"),
        ("h2", "1.10.0"),
        ("h3", "0.9.9"),
    ] {
        set_version(&cluster, host, version).await;
    }
    let (code, body) = common::post(
        &cluster.client,
        "/apis/ferry.dev/v1alpha1/migrationpolicies",
        json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": "upgrade"},
            "spec": {"scheduling": {"policy": "InClusterUpgrade"}},
        }),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    for i in 0..6 {
        cluster.add_vm(&format!("v{i}"), "h0", 256, true).await;
    }
    let ctl = cluster.controller("ctl-a");

    maintain(&cluster, "upgrade-h0", "h0", false).await;
    let hm = wait_phase(&cluster, "upgrade-h0", MaintenancePhase::Completed).await;
    assert_eq!(hm.status.unwrap().vms_remaining, 0);
    let placement = cluster.placement().await;
    for (vm, host) in &placement {
        assert!(
            matches!(host.as_deref(), Some("h1" | "h2")),
            "{vm} went to {host:?}, not a same-or-newer host"
        );
    }
    // Every move says why the older host was refused.
    let migrations: Api<Migration> = Api::namespaced(cluster.client.clone(), NS);
    let all = migrations.list(&Default::default()).await.unwrap().items;
    assert_eq!(all.len(), 6, "one move per VM");
    for m in &all {
        let decision = m
            .status
            .as_ref()
            .and_then(|s| s.scheduling_decision.clone())
            .expect("a scheduling decision");
        assert_eq!(
            decision.policy.as_deref(),
            Some("InClusterUpgrade"),
            "{decision:?}"
        );
        let h3 = decision
            .rejected
            .iter()
            .find(|r| r.host == "h3")
            .unwrap_or_else(|| panic!("h3 rejected: {decision:?}"));
        assert_eq!(h3.reason, "OlderVersion", "{h3:?}");
        assert!(
            h3.message.contains("0.9.9") && h3.message.contains("1.0.0"),
            "{h3:?}"
        );
    }

    // VMs on the newest host have nowhere to go: h0 is in maintenance and
    // every other host is older. The plan says so and nothing moves back.
    let on_h2: Vec<String> = placement
        .iter()
        .filter(|(_, h)| h.as_deref() == Some("h2"))
        .map(|(vm, _)| vm.clone())
        .collect();
    assert!(
        !on_h2.is_empty(),
        "the scheduler used the newer host too: {placement:?}"
    );
    maintain(&cluster, "what-if-h2", "h2", true).await;
    let hm = wait_phase(&cluster, "what-if-h2", MaintenancePhase::Planned).await;
    let plan = hm.status.unwrap().plan.expect("a plan");
    assert_eq!(plan.entries.len(), on_h2.len(), "{plan:?}");
    for entry in &plan.entries {
        assert_eq!(entry.target, None, "{entry:?}");
        let blocker = entry.blocker.as_deref().unwrap_or_default();
        // h0, h1 and h3 all run older versions than h2's 1.10.0.
        assert!(
            blocker.starts_with("NoHostFits") && blocker.contains("3 OlderVersion"),
            "{entry:?}"
        );
    }

    // The upgraded h0 returns with the new version: now the newest host's
    // VMs can go there, and only there.
    Api::<HostMaintenance>::all(cluster.client.clone())
        .delete("upgrade-h0", &Default::default())
        .await
        .unwrap();
    set_version(&cluster, "h0", "1.10.0").await;
    // Back in service once schedulable and Active again (the maintenance's
    // finalizer clears the first, the host health pass the second).
    within(60, "h0 is schedulable and Active again", || async {
        let h = Api::<Host>::all(cluster.client.clone())
            .get("h0")
            .await
            .ok()?;
        let active = h.status.is_some_and(|s| s.phase == HostPhase::Active);
        (!h.spec.unschedulable && active).then_some(())
    })
    .await;
    Api::<HostMaintenance>::all(cluster.client.clone())
        .delete("what-if-h2", &Default::default())
        .await
        .unwrap();
    maintain(&cluster, "upgrade-h2", "h2", false).await;
    wait_phase(&cluster, "upgrade-h2", MaintenancePhase::Completed).await;
    let after = cluster.placement().await;
    for vm in &on_h2 {
        assert_eq!(after[vm].as_deref(), Some("h0"), "{vm}: {after:?}");
    }
    within(30, "every move succeeded", || async {
        let all = migrations.list(&Default::default()).await.ok()?;
        all.iter()
            .all(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MigrationPhase::Succeeded)
            })
            .then_some(())
    })
    .await;
    ctl.shutdown().await;
}
