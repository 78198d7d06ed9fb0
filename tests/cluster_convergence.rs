//! Each convergence mode on a guest that dirties memory faster than the
//! migration's bandwidth carries it (RHV's migration policies): it must end
//! by its mode's mechanism — `MinimalDowntime` fails cleanly with the guest
//! still running on the source; `PostCopy` and `SuspendWorkloadIfNeeded`
//! finish, with the guest's memory intact on the target.

mod cluster_support;

use std::time::Duration;

use ferry::agent::guest::GuestConsole;
use ferry::api::{Migration, MigrationPhase, MigrationPolicy, VirtualMachine, VmPhase};
use kube::Api;
use kube::api::PostParams;

use cluster_support::{Cluster, wait_for};

/// A guest rewriting 64 MiB/s against a 24 MiB/s link never converges by
/// pre-copy alone.
const DIRTY_MIB_S: u32 = 64;
const LIMIT: &str = "24Mi";

async fn run(mode: &str) -> (Cluster, ferry::api::MigrationStatus, String, String) {
    let cluster = Cluster::start(&["host-1", "host-2"]).await;
    let policies: Api<MigrationPolicy> = Api::all(cluster.client.clone());
    let policy: MigrationPolicy = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: MigrationPolicy\nmetadata: {{name: mode}}\n\
         spec: {{convergence: {{mode: {mode}, downtimeLimit: 50ms, progressTimeout: 15s, completionTimeoutPerGiB: 240s}}, \
         bandwidth: {{mode: Custom, limit: {LIMIT}}}}}\n"
    ))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let vms: Api<VirtualMachine> = Api::namespaced(cluster.client.clone(), "default");
    let vm: VirtualMachine = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: dirty, namespace: default}}\n\
         spec: {{memory: 96Mi, boot: {{memtest: {{fillMib: 64, dirtyRateMib: {DIRTY_MIB_S}}}}}}}\n"
    ))
    .unwrap();
    vms.create(&PostParams::default(), &vm).await.unwrap();
    let source = wait_for(Duration::from_secs(60), || async {
        let s = vms.get("dirty").await.ok()?.status?;
        (s.phase == VmPhase::Running).then_some(s.host?)
    })
    .await
    .expect("the VM runs");
    let target = cluster
        .hosts
        .iter()
        .find(|h| **h != source)
        .unwrap()
        .clone();
    let migrations: Api<Migration> = Api::namespaced(cluster.client.clone(), "default");
    let m: Migration = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: converge, namespace: default}}\n\
         spec: {{vmName: dirty, targetHost: {target}, policy: mode}}\n"
    ))
    .unwrap();
    migrations.create(&PostParams::default(), &m).await.unwrap();
    let done = wait_for(Duration::from_secs(150), || async {
        let s = migrations.get("converge").await.ok()?.status?;
        matches!(
            s.phase,
            MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
        .then_some(s)
    })
    .await;
    let Some(done) = done else {
        panic!(
            "{mode}: the migration did not end: {:#?}",
            migrations.get("converge").await.ok().and_then(|m| m.status)
        );
    };
    (cluster, done, source, target)
}

async fn verify_on(cluster: &Cluster, host: &str) {
    let mut console = GuestConsole::connect_timeout(
        &cluster.serial_socket(host, "default", "dirty"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let report = console.verify().await.unwrap();
    assert!(report.is_intact(), "memory on {host}: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minimal_downtime_gives_up_on_a_guest_that_outruns_the_link_and_keeps_it_on_the_source() {
    let (cluster, done, source, target) = run("MinimalDowntime").await;
    assert_eq!(done.phase, MigrationPhase::Failed, "{done:#?}");
    let reason = done.failure_reason.clone().unwrap_or_default();
    assert!(
        ["NotConverging", "ProgressTimeout", "CompletionTimeout"].contains(&reason.as_str()),
        "a convergence reason, not {reason:?}: {done:#?}"
    );
    let vms: Api<VirtualMachine> = Api::namespaced(cluster.client.clone(), "default");
    assert_eq!(
        vms.get("dirty")
            .await
            .unwrap()
            .status
            .unwrap()
            .host
            .as_deref(),
        Some(source.as_str())
    );
    wait_for(Duration::from_secs(20), || async {
        cluster.running_qemus(&target).is_empty().then_some(())
    })
    .await
    .expect("the target is cleaned up");
    verify_on(&cluster, &source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn post_copy_finishes_a_guest_that_outruns_the_link() {
    let (cluster, done, _source, target) = run("PostCopy").await;
    assert_eq!(done.phase, MigrationPhase::Succeeded, "{done:#?}");
    assert!(
        done.timestamps
            .as_ref()
            .is_some_and(|t| t.post_copy.is_some()),
        "it switched to post-copy: {done:#?}"
    );
    verify_on(&cluster, &target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suspend_workload_if_needed_throttles_then_pauses_to_finish() {
    let (cluster, done, _source, target) = run("SuspendWorkloadIfNeeded").await;
    assert_eq!(done.phase, MigrationPhase::Succeeded, "{done:#?}");
    let how = done
        .progress
        .as_ref()
        .and_then(|p| p.convergence.clone())
        .unwrap_or_default();
    assert!(
        !how.is_empty(),
        "the status says how it converged: {done:#?}"
    );
    verify_on(&cluster, &target).await;
}
