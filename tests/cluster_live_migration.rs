//! The first milestone, below `ferry up`: the embedded API server, the
//! controller and two agents in one process; a memtest VM placed by the
//! scheduler, live-migrated to the other host by a Migration object, with the
//! guest's own check of its memory intact afterwards on that host.

mod cluster_support;

use std::time::Duration;

use ferry::agent::guest::GuestConsole;
use ferry::api::{Migration, MigrationPhase, VirtualMachine, VmPhase};
use kube::Api;
use kube::api::PostParams;

use cluster_support::{Cluster, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_object_live_migrates_a_guest_between_two_agents_with_memory_intact() {
    let cluster = Cluster::start(&["host-1", "host-2"]).await;
    let vms: Api<VirtualMachine> = Api::namespaced(cluster.client.clone(), "default");
    let vm: VirtualMachine = serde_yaml::from_str(
        "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: memtest-1, namespace: default}\n\
         spec: {memory: 96Mi, boot: {memtest: {fillMib: 64, dirtyRateMib: 8}}}\n",
    )
    .unwrap();
    vms.create(&PostParams::default(), &vm).await.unwrap();
    let running = wait_for(Duration::from_secs(60), || async {
        let vm = vms.get("memtest-1").await.ok()?;
        let status = vm.status?;
        (status.phase == VmPhase::Running && status.host.is_some()).then_some(status)
    })
    .await
    .expect("the scheduler places the VM and its agent runs it");
    let source = running.host.clone().unwrap();
    let target = if source == "host-1" {
        "host-2"
    } else {
        "host-1"
    };
    assert!(running.qemu.is_some(), "the agent reports the QEMU pid");

    let mut console = GuestConsole::connect_timeout(
        &cluster.serial_socket(&source, "default", "memtest-1"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    console.wait_ready(Duration::from_secs(30)).await.unwrap();
    drop(console);

    let migrations: Api<Migration> = Api::namespaced(cluster.client.clone(), "default");
    let m: Migration = serde_yaml::from_str(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata: {{name: move-it, namespace: default}}\n\
         spec: {{vmName: memtest-1, targetHost: {target}}}\n"
    ))
    .unwrap();
    migrations.create(&PostParams::default(), &m).await.unwrap();
    let done = wait_for(Duration::from_secs(120), || async {
        let m = migrations.get("move-it").await.ok()?;
        let status = m.status?;
        matches!(
            status.phase,
            MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
        .then_some(status)
    })
    .await
    .expect("the migration ends");
    assert_eq!(done.phase, MigrationPhase::Succeeded, "{done:#?}");
    assert_eq!(done.source_host.as_deref(), Some(source.as_str()));
    assert_eq!(done.target_host.as_deref(), Some(target));
    assert!(
        done.downtime_ms.is_some(),
        "the downtime is measured: {done:#?}"
    );
    let progress = done.progress.clone().expect("progress was reported");
    assert!(progress.memory_transferred >= 64 << 20, "{progress:?}");

    let vm = wait_for(Duration::from_secs(30), || async {
        let vm = vms.get("memtest-1").await.ok()?;
        let status = vm.status.clone()?;
        (status.host.as_deref() == Some(target)
            && status.phase == VmPhase::Running
            && status.migration.is_none())
        .then_some(vm)
    })
    .await
    .expect("the VM runs on the target and no migration is in flight");
    assert_eq!(
        vm.status.unwrap().uuid,
        running.uuid,
        "the guest keeps its UUID"
    );

    let mut console = GuestConsole::connect_timeout(
        &cluster.serial_socket(target, "default", "memtest-1"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let report = console.verify().await.unwrap();
    assert!(report.is_intact(), "memory after migration: {report:?}");
    // The source QEMU is gone: the source host runs nothing.
    wait_for(Duration::from_secs(20), || async {
        cluster.running_qemus(&source).is_empty().then_some(())
    })
    .await
    .expect("the source QEMU was stopped after the switchover");
}
