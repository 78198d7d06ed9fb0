//! The Migration reconciler with simulated agents: a migration to a named
//! host goes through every phase to Succeeded and the VM's host changes.

mod common;
mod controller_support;

use std::time::Duration;

use controller_support::{Cluster, NS, within};
use kube::api::{Api, PostParams};
use serde_json::json;

use ferry::api::{Migration, MigrationPhase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_to_a_named_host_succeeds_with_simulated_agents() {
    let cluster = Cluster::start(3, Duration::from_millis(200)).await;
    cluster.add_vm("web", "h0", 256, true).await;
    let ctl = cluster.controller("ctl-a");
    let api: Api<Migration> = Api::namespaced(cluster.client.clone(), NS);
    let m: Migration = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Migration",
        "metadata": {"name": "move-web"},
        "spec": {"vmName": "web", "targetHost": "h2"},
    }))
    .unwrap();
    api.create(&PostParams::default(), &m).await.unwrap();

    // Record every phase the migration passes through.
    let phases = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = within(30, "the migration finishes", || {
        let api = api.clone();
        let phases = phases.clone();
        async move {
            let m = api.get("move-web").await.ok()?;
            let s = m.status.clone().unwrap_or_default();
            let mut seen = phases.lock().unwrap();
            if seen.last() != Some(&s.phase) {
                seen.push(s.phase);
            }
            matches!(
                s.phase,
                MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
            )
            .then_some(m)
        }
    })
    .await;
    let s = done.status.unwrap();
    assert_eq!(
        s.phase,
        MigrationPhase::Succeeded,
        "{:?}: {:?}",
        s.failure_reason,
        s.message
    );
    assert_eq!(s.source_host.as_deref(), Some("h0"));
    assert_eq!(s.target_host.as_deref(), Some("h2"));
    assert_eq!(s.downtime_ms, Some(12));
    assert_eq!(cluster.placement().await["web"].as_deref(), Some("h2"));
    assert_eq!(cluster.agents.moves.lock().unwrap()["web"], 1);
    // Phases only move forward (polling may skip some).
    let order = |p: &MigrationPhase| *p as u8;
    let phases = phases.lock().unwrap().clone();
    assert!(
        phases.windows(2).all(|w| order(&w[0]) < order(&w[1])),
        "{phases:?}"
    );
    ctl.shutdown().await;
}
