//! Events: every decision a user should see is a Kubernetes Event on the
//! right object, counted as Kubernetes counts them, and the outcome of a
//! cancelled drain outlives its HostMaintenance and Migrations.

mod common;
mod controller_support;

use std::time::Duration;

use controller_support::{Cluster, NS, within};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use ferry::api::{Host, HostMaintenance, Migration, MigrationPhase};
use ferry::controller::events::{self, Note, Recorder};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_event_is_counted_in_one_series_and_a_different_note_is_its_own() {
    let cluster = Cluster::start(1, Duration::from_millis(100)).await;
    let recorder = Recorder::new(cluster.client.clone(), "test");
    let host = events::host_reference("h0");
    for _ in 0..3 {
        recorder
            .publish(
                &host,
                Note::warning("Blocked", "Drain", "default/a: pinned"),
            )
            .await;
    }
    recorder
        .publish(
            &host,
            Note::warning("Blocked", "Drain", "default/b: pinned"),
        )
        .await;
    let seen = cluster.events_about("Host", "h0").await;
    let counts: Vec<(&str, i32)> = seen.iter().map(|e| (e.note.as_str(), e.count)).collect();
    assert_eq!(
        counts,
        [("default/a: pinned", 3), ("default/b: pinned", 1)],
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|e| e.type_ == "Warning" && e.reason == "Blocked")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_tells_its_story_on_the_maintenance_and_on_each_migration() {
    let cluster = Cluster::start(4, Duration::from_millis(300)).await;
    // One at a time, so the others wait in the queue.
    cluster.set_limits(1, 1, 1).await;
    Api::<Host>::all(cluster.client.clone())
        .patch(
            "h1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    for i in 0..3 {
        cluster.add_vm(&format!("v{i}"), "h0", 128, true).await;
    }
    let ctl = cluster.controller("ctl-a");
    maintain(&cluster, "drain", "h0").await;
    cluster
        .event("HostMaintenance", "drain", "Completed", "h0 is empty")
        .await;
    let story = cluster.events_about("HostMaintenance", "drain").await;
    let reasons: Vec<&str> = story.iter().map(|e| e.reason.as_str()).collect();
    let at = |r: &str| reasons.iter().position(|x| *x == r);
    assert!(at("Draining") < at("Progress"), "{story:?}");
    assert_eq!(reasons.last(), Some(&"Completed"), "{story:?}");
    let created: Vec<_> = story
        .iter()
        .filter(|e| e.reason == "MigrationCreated")
        .collect();
    assert_eq!(created.len(), 3, "{story:?}");
    assert!(created.iter().all(|e| e.related.is_some()), "{created:?}");
    assert!(
        story
            .iter()
            .any(|e| e.reason == "Progress" && e.note.starts_with("3 of 3 VMs have left h0")),
        "{story:?}"
    );
    // Each migration: the target chosen with the hosts refused and why,
    // the queue, every phase, the outcome.
    let migs: Api<Migration> = Api::namespaced(cluster.client.clone(), NS);
    let mut waited = 0;
    for m in migs.list(&Default::default()).await.unwrap() {
        let name = kube::ResourceExt::name_any(&m);
        let e = cluster
            .event("Migration", &name, "Succeeded", "the VM runs on")
            .await;
        assert_eq!(e.related.as_deref(), Some(m.spec.vm_name.as_str()));
        let seen = cluster.events_about("Migration", &name).await;
        let chosen = seen.iter().find(|e| e.reason == "TargetChosen").unwrap();
        assert!(
            chosen.note.contains("h1 (HostUnschedulable"),
            "{}",
            chosen.note
        );
        for reason in ["Queued", "Scheduled", "Succeeded"] {
            assert!(
                seen.iter().any(|e| e.reason == reason),
                "{reason}: {seen:?}"
            );
        }
        waited += usize::from(seen.iter().any(|e| e.reason == "WaitingForSlot"));
    }
    assert!(waited >= 1, "with one slot, someone waited");
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_drain_leaves_its_outcome_on_the_host_after_everything_is_gone() {
    let cluster = Cluster::start(3, Duration::from_secs(600)).await;
    cluster.set_limits(5, 1, 1).await;
    for i in 0..2 {
        cluster.add_vm(&format!("v{i}"), "h0", 128, true).await;
    }
    let ctl = cluster.controller("ctl-a");
    maintain(&cluster, "drain", "h0").await;
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
    Api::<HostMaintenance>::all(cluster.client.clone())
        .delete("drain", &DeleteParams::default())
        .await
        .unwrap();
    within(
        60,
        "the maintenance and its migrations are gone",
        || async {
            let hm = Api::<HostMaintenance>::all(cluster.client.clone())
                .get_opt("drain")
                .await
                .ok()?;
            let left = migs.list(&Default::default()).await.ok()?.items.len();
            (hm.is_none() && left == 0).then_some(())
        },
    )
    .await;
    let host = cluster.events_about("Host", "h0").await;
    let ended = host
        .iter()
        .find(|e| e.reason == "MaintenanceEnded")
        .unwrap_or_else(|| panic!("{host:?}"));
    assert!(
        ended
            .note
            .contains("0 VMs moved; 2 cancelled: default/v0, default/v1; 0 failed"),
        "{}",
        ended.note
    );
    assert_eq!(ended.related.as_deref(), Some("drain"));
    let story = cluster.events_about("HostMaintenance", "drain").await;
    assert!(
        story
            .iter()
            .any(|e| e.reason == "Cancelling" && e.note.contains("default/v0")),
        "{story:?}"
    );
    assert!(cluster.events().await.iter().any(|e| e.kind == "Migration"
        && e.reason == "Cancelled"
        && e.note.contains("the VM stays on its host")));
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_is_fenced_and_evacuated_with_events_on_the_host_and_the_vm() {
    let cluster = Cluster::start(2, Duration::from_millis(100)).await;
    let (code, body) = common::post(
        &cluster.client,
        "/apis/ferry.dev/v1alpha1/migrationpolicies",
        json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": "cluster"},
            "spec": {"resilience": {"fenceAfter": "1s", "evacuateAfter": "2s"}},
        }),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    cluster.add_vm("db", "h1", 128, true).await;
    let mut config = cluster.config("ctl-a");
    config.lease_duration = Duration::from_secs(1);
    let ctl = cluster.spawn_controller(config, None);
    // h1's agent stops renewing.
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        cluster.client.clone(),
        "ferry-system",
    )
    .delete("h1", &Default::default())
    .await
    .unwrap();
    cluster
        .event("Host", "h1", "HostUnreachable", "no Lease renewal")
        .await;
    cluster
        .event("Host", "h1", "HostFenced", "rebuilt elsewhere")
        .await;
    let e = cluster
        .event("Host", "h1", "Evacuating", "default/db")
        .await;
    assert_eq!(e.type_, "Warning");
    cluster
        .event("VirtualMachine", "db", "Evacuating", "rebuilt elsewhere")
        .await;
    within(60, "db runs on h0", || async {
        (cluster.placement().await["db"].as_deref() == Some("h0")).then_some(())
    })
    .await;
    ctl.shutdown().await;
}
