//! The source manuals' stories on an in-process cluster (API server,
//! controller, agents) with real QEMU guests: cold migration (`xm migrate`),
//! cancel mid-transfer, and the evacuation of a failed host (`nova
//! evacuate`) that never runs a VM on two hosts.

mod cluster_support;

use std::time::Duration;

use ferry::agent::guest::GuestConsole;
use ferry::api::{
    Migration, MigrationPhase, MigrationPolicy, MigrationType, VirtualMachine, VmPhase,
};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};

use cluster_support::{Cluster, Options, wait_for};

async fn create_vm(cluster: &Cluster, name: &str, spec: &str) -> (String, String) {
    let vms: Api<VirtualMachine> = Api::namespaced(cluster.client.clone(), "default");
    let vm: VirtualMachine = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
    ))
    .unwrap();
    vms.create(&PostParams::default(), &vm).await.unwrap();
    let status = wait_for(Duration::from_secs(60), || async {
        let status = vms.get(name).await.ok()?.status?;
        (status.phase == VmPhase::Running && status.host.is_some()).then_some(status)
    })
    .await
    .expect("the VM is placed and runs");
    let source = status.host.unwrap();
    let other = cluster
        .hosts
        .iter()
        .find(|h| **h != source)
        .unwrap()
        .clone();
    (source, other)
}

async fn create_policy(cluster: &Cluster, yaml: &str) {
    let api: Api<MigrationPolicy> = Api::all(cluster.client.clone());
    let p: MigrationPolicy = serde_yaml::from_str(yaml).unwrap();
    api.create(&PostParams::default(), &p).await.unwrap();
}

async fn migrate(cluster: &Cluster, name: &str, vm: &str, kind: MigrationType, target: &str) {
    let api: Api<Migration> = Api::namespaced(cluster.client.clone(), "default");
    let m: Migration = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{vmName: {vm}, type: {kind:?}, targetHost: {target}}}\n"
    ))
    .unwrap();
    api.create(&PostParams::default(), &m).await.unwrap();
}

async fn wait_final(cluster: &Cluster, name: &str, limit: Duration) -> ferry::api::MigrationStatus {
    let api: Api<Migration> = Api::namespaced(cluster.client.clone(), "default");
    let status = wait_for(limit, || async {
        let status = api.get(name).await.ok()?.status?;
        matches!(
            status.phase,
            MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
        .then_some(status)
    })
    .await;
    match status {
        Some(s) => s,
        None => panic!(
            "migration {name} did not end: {:#?}",
            api.get(name).await.ok().and_then(|m| m.status)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_migration_restarts_the_guest_on_the_target_with_the_same_identity() {
    let cluster = Cluster::start(&["host-1", "host-2"]).await;
    let (source, target) = create_vm(
        &cluster,
        "cold-1",
        "{memory: 64Mi, boot: {memtest: {fillMib: 16}}, networks: [{name: default}]}",
    )
    .await;
    let vms: Api<VirtualMachine> = Api::namespaced(cluster.client.clone(), "default");
    let before = vms.get("cold-1").await.unwrap().status.unwrap();
    migrate(
        &cluster,
        "cold-move",
        "cold-1",
        MigrationType::Cold,
        &target,
    )
    .await;
    let done = wait_final(&cluster, "cold-move", Duration::from_secs(60)).await;
    assert_eq!(done.phase, MigrationPhase::Succeeded, "{done:#?}");
    let after = wait_for(Duration::from_secs(30), || async {
        let status = vms.get("cold-1").await.ok()?.status?;
        (status.host.as_deref() == Some(target.as_str()) && status.phase == VmPhase::Running)
            .then_some(status)
    })
    .await
    .expect("the VM runs on the target");
    assert_eq!(after.uuid, before.uuid, "same UUID");
    assert_eq!(after.networks, before.networks, "same MAC addresses");
    assert!(
        cluster.running_qemus(&source).is_empty(),
        "nothing runs on the source"
    );
    let mut console = GuestConsole::connect_timeout(
        &cluster.serial_socket(&target, "default", "cold-1"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    console.wait_ready(Duration::from_secs(30)).await.unwrap();
    assert!(console.verify().await.unwrap().is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_migration_leaves_the_guest_running_on_its_source() {
    let cluster = Cluster::start(&["host-1", "host-2"]).await;
    // 16 MiB/s for 96 MiB of pattern: the transfer takes seconds, long
    // enough to cancel in the middle.
    create_policy(
        &cluster,
        "apiVersion: ferry.dev/v1alpha1\nkind: MigrationPolicy\nmetadata: {name: slow}\n\
         spec: {selector: {matchLabels: {speed: slow}}, bandwidth: {mode: Custom, limit: 16Mi}}\n",
    )
    .await;
    let (source, target) = create_vm(
        &cluster,
        "busy-1",
        "{memory: 128Mi, boot: {memtest: {fillMib: 96}}}",
    )
    .await;
    let vms: Api<VirtualMachine> = Api::namespaced(cluster.client.clone(), "default");
    vms.patch(
        "busy-1",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"speed": "slow"}}})),
    )
    .await
    .unwrap();
    migrate(
        &cluster,
        "to-cancel",
        "busy-1",
        MigrationType::Live,
        &target,
    )
    .await;
    let migrations: Api<Migration> = Api::namespaced(cluster.client.clone(), "default");
    let moving = wait_for(Duration::from_secs(60), || async {
        let status = migrations.get("to-cancel").await.ok()?.status?;
        status
            .progress
            .filter(|p| p.memory_transferred > 0 && p.percent < 90)
    })
    .await;
    let Some(moving) = moving else {
        panic!(
            "the transfer makes no progress: {:#?}",
            migrations
                .get("to-cancel")
                .await
                .ok()
                .and_then(|m| m.status)
        );
    };
    assert!(
        moving.throughput <= 24 << 20,
        "the bandwidth limit holds: {moving:?}"
    );
    migrations
        .patch(
            "to-cancel",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
        )
        .await
        .unwrap();
    let done = wait_final(&cluster, "to-cancel", Duration::from_secs(60)).await;
    assert_eq!(done.phase, MigrationPhase::Cancelled, "{done:#?}");
    let vm = vms.get("busy-1").await.unwrap().status.unwrap();
    assert_eq!(vm.host.as_deref(), Some(source.as_str()));
    assert!(vm.migration.is_none());
    wait_for(Duration::from_secs(20), || async {
        cluster.running_qemus(&target).is_empty().then_some(())
    })
    .await
    .expect("the target QEMU is gone");
    let mut console = GuestConsole::connect_timeout(
        &cluster.serial_socket(&source, "default", "busy-1"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(
        console.verify().await.unwrap().is_intact(),
        "the source guest is unharmed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_host_is_fenced_and_its_vm_rebuilt_elsewhere_never_running_twice() {
    let mut options = Options::hosts(&["host-1", "host-2"]);
    options.lease_duration = Duration::from_secs(2);
    options.fence_after = Duration::from_secs(3);
    options.watchdog = true;
    let cluster = Cluster::start_with(options).await;
    create_policy(
        &cluster,
        "apiVersion: ferry.dev/v1alpha1\nkind: MigrationPolicy\nmetadata: {name: default}\n\
         spec: {resilience: {policy: MigrateAll, fenceAfter: 3s, evacuateAfter: 6s}}\n",
    )
    .await;
    let (failed, survivor) = create_vm(
        &cluster,
        "ha-1",
        "{memory: 64Mi, highlyAvailable: true, boot: {memtest: {fillMib: 16}}}",
    )
    .await;
    let vms: Api<VirtualMachine> = Api::namespaced(cluster.client.clone(), "default");
    let before = vms.get("ha-1").await.unwrap().status.unwrap();

    cluster.kill_agent(&failed);
    // Watch both hosts while the evacuation happens: never two copies.
    let rebuilt = wait_for(Duration::from_secs(60), || async {
        let on_failed = cluster.running_qemus(&failed).len();
        let on_survivor = cluster.running_qemus(&survivor).len();
        assert!(
            on_failed + on_survivor <= 1,
            "the VM runs on two hosts at once"
        );
        let status = vms.get("ha-1").await.ok()?.status?;
        (status.host.as_deref() == Some(survivor.as_str()) && status.phase == VmPhase::Running)
            .then_some(status)
    })
    .await
    .expect("the VM is rebuilt on the surviving host");
    assert_eq!(rebuilt.uuid, before.uuid, "the rebuilt VM keeps its UUID");
    let migrations: Api<Migration> = Api::namespaced(cluster.client.clone(), "default");
    let evacuations = wait_for(Duration::from_secs(20), || async {
        let list = migrations.list(&ListParams::default()).await.ok()?;
        let evacuations: Vec<Migration> = list
            .items
            .into_iter()
            .filter(|m| m.spec.migration_type == MigrationType::Evacuate)
            .collect();
        evacuations
            .iter()
            .all(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MigrationPhase::Succeeded)
            })
            .then_some(evacuations)
    })
    .await
    .expect("the evacuation succeeds");
    assert_eq!(
        evacuations.len(),
        1,
        "one evacuation, created by the controller"
    );
    let hosts: Api<ferry::api::Host> = Api::all(cluster.client.clone());
    let host = hosts.get(&failed).await.unwrap();
    assert_eq!(host.status.unwrap().phase, ferry::api::HostPhase::Fenced);
    assert!(
        cluster.running_qemus(&failed).is_empty(),
        "the watchdog fenced the failed host"
    );
}
