//! Retries and quarantine end to end with simulated agents: a drain's
//! failed migration is retried after its back-off; a target host that keeps
//! failing is quarantined and the scheduler says so in the next attempt's
//! `schedulingDecision`; a VM that keeps failing is quarantined and becomes
//! a final blocker. Each step is an Event.

mod common;
mod controller_support;

use std::time::Duration;

use controller_support::{Cluster, NS, within};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use serde_json::json;

use ferry::api::maintenance::MaintenancePhase;
use ferry::api::{HostMaintenance, Migration, MigrationPhase, VirtualMachine};
use ferry::core::drain::RetryPolicy;

async fn maintain(cluster: &Cluster, name: &str, host: &str) {
    let hm: HostMaintenance = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "HostMaintenance",
        "metadata": {"name": name}, "spec": {"host": host},
    }))
    .unwrap();
    Api::<HostMaintenance>::all(cluster.client.clone())
        .create(&PostParams::default(), &hm)
        .await
        .unwrap();
}

async fn wait_phase(cluster: &Cluster, name: &str, phase: MaintenancePhase) -> HostMaintenance {
    within(90, &format!("{name} reaches {phase:?}"), || async {
        let hm = Api::<HostMaintenance>::all(cluster.client.clone())
            .get(name)
            .await
            .ok()?;
        (hm.status.as_ref()?.phase == phase).then_some(hm)
    })
    .await
}

fn seconds(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> i64 {
    t.0.as_second()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_is_retried_with_back_off_then_quarantined_and_avoided() {
    let cluster = Cluster::start(3, Duration::from_millis(200)).await;
    cluster.add_vm("web", "h0", 256, true).await;
    // h2 holds a big VM, so the scheduler (policy None: most free memory)
    // prefers h1, whose target agent fails every incoming VM.
    cluster.add_vm("filler", "h2", 64 * 1024, true).await;
    cluster
        .agents
        .broken_targets
        .lock()
        .unwrap()
        .insert("h1".into());
    let retry = RetryPolicy {
        max_attempts: 4,
        base: Duration::from_secs(2),
        factor: 2,
        host_quarantine_after: 2,
        ..RetryPolicy::default()
    };
    let ctl = cluster.controller_with_retry("ctl-a", retry);
    maintain(&cluster, "drain", "h0").await;
    let hm = wait_phase(&cluster, "drain", MaintenancePhase::Completed).await;
    assert_eq!(hm.status.unwrap().vms_remaining, 0);
    assert_eq!(cluster.placement().await["web"].as_deref(), Some("h2"));

    let migs: Api<Migration> = Api::namespaced(cluster.client.clone(), NS);
    let get = |n: &'static str| {
        let migs = migs.clone();
        async move { migs.get(n).await.unwrap() }
    };
    // The drain counts the VM moved once its host changed, which may be
    // while the last attempt is still Completing (the source cleaning up).
    let third = within(30, "drain-web-3 succeeds", || async {
        let m = migs.get("drain-web-3").await.ok()?;
        (m.status.as_ref()?.phase == MigrationPhase::Succeeded).then_some(m)
    })
    .await;
    let (first, second) = (get("drain-web-1").await, get("drain-web-2").await);
    for m in [&first, &second] {
        let s = m.status.clone().unwrap();
        assert_eq!(s.phase, MigrationPhase::Failed, "{}", m.name_any());
        assert_eq!(s.failure_reason.as_deref(), Some("TargetPreparationFailed"));
        assert_eq!(s.target_host.as_deref(), Some("h1"));
    }
    // Each retry waited for its back-off (2 s, then 4 s) after the failure.
    let completed = |m: &Migration| {
        seconds(
            m.status
                .as_ref()
                .unwrap()
                .timestamps
                .as_ref()
                .unwrap()
                .completed
                .as_ref()
                .unwrap(),
        )
    };
    let created = |m: &Migration| seconds(m.metadata.creation_timestamp.as_ref().unwrap());
    assert!(
        created(&second) - completed(&first) >= 2,
        "back-off before attempt 2"
    );
    assert!(
        created(&third) - completed(&second) >= 4,
        "back-off before attempt 3"
    );
    // The third attempt avoided the quarantined host, and says why.
    let s = third.status.clone().unwrap();
    assert_eq!(s.phase, MigrationPhase::Succeeded);
    assert_eq!(s.target_host.as_deref(), Some("h2"));
    let decision = s.scheduling_decision.unwrap();
    let h1 = decision
        .rejected
        .iter()
        .find(|r| r.host == "h1")
        .unwrap_or_else(|| panic!("{decision:?}"));
    assert_eq!(h1.reason, "HostQuarantined");
    assert!(
        h1.message
            .contains("2 incoming migrations failed on it (last: TargetPreparationFailed)"),
        "{}",
        h1.message
    );
    let prepared = cluster.agents.prepared_on.lock().unwrap().clone();
    assert_eq!(prepared[&format!("{NS}/drain-web-3")], "h2");

    // The Events tell the same story.
    cluster
        .event(
            "HostMaintenance",
            "drain",
            "RetryPending",
            "default/web: attempt 1 failed",
        )
        .await;
    for n in [2, 3] {
        let e = cluster
            .event(
                "HostMaintenance",
                "drain",
                "Retrying",
                &format!("attempt {n}"),
            )
            .await;
        assert_eq!(e.related, Some(format!("drain-web-{n}")));
    }
    let failed = cluster
        .event("Migration", "drain-web-1", "TargetPreparationFailed", "h1")
        .await;
    assert_eq!(failed.type_, "Warning");
    let q = cluster
        .event(
            "Host",
            "h1",
            "HostQuarantined",
            "2 incoming migrations failed on h1",
        )
        .await;
    assert_eq!(q.type_, "Warning");
    cluster
        .event(
            "Migration",
            "drain-web-3",
            "TargetChosen",
            "h1 (HostQuarantined",
        )
        .await;
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_keeps_failing_is_quarantined_and_blocks_the_drain_for_good() {
    let cluster = Cluster::start(3, Duration::from_millis(200)).await;
    cluster.add_vm("hog", "h0", 256, true).await;
    cluster
        .agents
        .unconvergeable
        .lock()
        .unwrap()
        .insert("hog".into());
    let retry = RetryPolicy {
        max_attempts: 5,
        base: Duration::from_millis(200),
        quarantine_after: 3,
        host_quarantine_after: 2,
        ..RetryPolicy::default()
    };
    let ctl = cluster.controller_with_retry("ctl-a", retry);
    maintain(&cluster, "drain", "h0").await;
    let hm = wait_phase(&cluster, "drain", MaintenancePhase::Failed).await;
    let s = hm.status.unwrap();
    assert_eq!((s.vms_remaining, s.vms_blocked), (1, 1));
    assert_eq!(s.blockers[0].reason, "Quarantined");
    let failed = s.conditions.iter().find(|c| c.type_ == "Failed").unwrap();
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("True", "VmsCannotLeave")
    );
    // Three attempts, each NotConverging, then no more.
    let migs: Api<Migration> = Api::namespaced(cluster.client.clone(), NS);
    let all = migs.list(&Default::default()).await.unwrap().items;
    assert_eq!(
        all.len(),
        3,
        "{:?}",
        all.iter().map(|m| m.name_any()).collect::<Vec<_>>()
    );
    for m in &all {
        let st = m.status.clone().unwrap();
        assert_eq!(st.failure_reason.as_deref(), Some("NotConverging"));
    }
    let vm = Api::<VirtualMachine>::namespaced(cluster.client.clone(), NS)
        .get("hog")
        .await
        .unwrap();
    let q = vm
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Quarantined")
        .unwrap();
    assert_eq!(
        (q.status.as_str(), q.reason.as_str()),
        ("True", "RepeatedFailures")
    );
    assert_eq!(cluster.placement().await["hog"].as_deref(), Some("h0"));
    cluster
        .event("HostMaintenance", "drain", "Quarantined", "default/hog")
        .await;
    cluster
        .event(
            "VirtualMachine",
            "hog",
            "Quarantined",
            "3 failed migrations",
        )
        .await;
    cluster
        .event("HostMaintenance", "drain", "Blocked", "(Quarantined)")
        .await;
    // The VM's failures are not the targets' fault: no host is quarantined.
    assert!(
        cluster
            .events()
            .await
            .iter()
            .all(|e| e.reason != "HostQuarantined")
    );
    ctl.shutdown().await;
}
