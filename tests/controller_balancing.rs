//! Automatic balancing against the embedded API server: an overloaded host
//! sheds a VM through an ordinary Migration, labelled automatic and
//! annotated with why, which the simulated agents carry out.

mod common;
mod controller_support;

use std::time::Duration;

use controller_support::{Cluster, NS, within};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use ferry::api::{AUTOMATIC_LABEL, Host, Migration, MigrationPhase};
use ferry::controller::balancing::{IMPROVEMENT_ANNOTATION, REASON_ANNOTATION};

async fn load(cluster: &Cluster, host: &str, percent: u32) {
    let now = k8s_openapi::jiff::Timestamp::now();
    let samples: Vec<_> = (0..6)
        .map(|i| {
            let t = now - k8s_openapi::jiff::SignedDuration::from_secs(10 - 2 * i);
            json!({"time": t.to_string(), "cpuPercent": percent, "freeMemory": "200Gi"})
        })
        .collect();
    Api::<Host>::all(cluster.client.clone())
        .patch_status(
            host,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"load": samples}})),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_host_sheds_a_vm_through_an_automatic_migration() {
    let cluster = Cluster::start(2, Duration::from_millis(100)).await;
    let (code, body) = common::post(
        &cluster.client,
        "/apis/ferry.dev/v1alpha1/migrationpolicies",
        json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": "cluster"},
            "spec": {"scheduling": {
                "policy": "EvenlyDistributed", "highUtilization": 80, "overCommitDuration": "5s",
                "balancing": {"enabled": true, "interval": "1s"},
            }},
        }),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    for i in 0..4 {
        cluster.add_vm(&format!("v{i}"), "h0", 128, true).await;
    }
    load(&cluster, "h0", 95).await;
    load(&cluster, "h1", 10).await;
    let ctl = cluster.controller("ctl-a");
    let migs: Api<Migration> = Api::namespaced(cluster.client.clone(), NS);
    let m = within(30, "an automatic migration succeeds", || async {
        let l = migs.list(&Default::default()).await.ok()?;
        l.items.into_iter().find(|m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.phase == MigrationPhase::Succeeded)
        })
    })
    .await;
    assert_eq!(m.labels()[AUTOMATIC_LABEL], "true");
    assert!(!m.annotations()[REASON_ANNOTATION].is_empty());
    assert!(
        m.annotations()[IMPROVEMENT_ANNOTATION].contains("→"),
        "{:?}",
        m.annotations()
    );
    assert_eq!(m.spec.target_host.as_deref(), Some("h1"));
    // Users see the move, why it was made and what it should improve.
    let name = kube::ResourceExt::name_any(&m);
    let e = cluster
        .event("Migration", &name, "BalancingMove", "h0 → h1")
        .await;
    assert!(
        e.note.contains(&m.annotations()[REASON_ANNOTATION]),
        "{e:?}"
    );
    cluster
        .event("Host", "h0", "BalancingMove", "h0 → h1")
        .await;
    let s = m.status.unwrap();
    assert_eq!(
        (s.source_host.as_deref(), s.target_host.as_deref()),
        (Some("h0"), Some("h1"))
    );
    // One move per interval per source host, and the moved VM's cooldown:
    // never two automatic moves of one VM.
    let l = migs.list(&Default::default()).await.unwrap();
    let mut vms: Vec<_> = l.iter().map(|m| m.spec.vm_name.clone()).collect();
    let n = vms.len();
    vms.sort();
    vms.dedup();
    assert_eq!(vms.len(), n, "{vms:?}");
    ctl.shutdown().await;
}
