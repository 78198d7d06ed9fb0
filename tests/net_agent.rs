//! The agent's own pieces move a networked VM: the machine definition with
//! its NIC on a tap (`net::prepare_taps`), QEMUs run by `VmManager` inside
//! host namespaces, the target half `prepare_target` (which sets the
//! announce parameters before `migrate-incoming` and announces again once
//! the guest runs), `finish_source`, and the tap sweep. A client keeps one
//! TCP connection exchanging counters throughout. Root only.

mod net_support;

use std::collections::BTreeSet;
use std::time::Duration;

use ferry::agent::migrate::{MigrationConfig, finish_source, prepare_target};
use ferry::agent::net;
use ferry::agent::qmp;
use ferry::agent::vms::VmManager;
use net_support::hosts::{KillOnDrop, qemu_in, spec_in};
use net_support::{CounterClient, MAC, guest, in_ns, scratch, segment, switch_port_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_moves_a_networked_vm_and_the_connection_survives() {
    let seg = segment("agent");
    let dir = scratch();
    let g = guest();
    let (ns_a, ns_b) = (
        seg.host_ns("a").unwrap().to_string(),
        seg.host_ns("b").unwrap().to_string(),
    );
    let vms_a = VmManager::with_binary(dir.path().join("a"), qemu_in(dir.path(), &ns_a).unwrap());
    let vms_b = VmManager::with_binary(dir.path().join("b"), qemu_in(dir.path(), &ns_b).unwrap());
    let spec_a = spec_in(&ns_a, &g).await.unwrap();
    let spec_b = spec_in(&ns_b, &g).await.unwrap();
    assert_eq!(spec_a, spec_b, "source and target define the same machine");
    let source = vms_a.start(&spec_a, false).await.unwrap();
    let guard = KillOnDrop::default();
    guard.add(source.pid());
    let client_ns = seg.client_ns().to_string();
    let client = tokio::task::spawn_blocking(move || CounterClient::start(&client_ns))
        .await
        .unwrap();
    let config = MigrationConfig {
        downtime_limit: Duration::from_millis(20),
        ..MigrationConfig::default()
    };
    let target = prepare_target(&vms_b, &spec_b, &config).await.unwrap();
    guard.add(target.vm().pid());
    source
        .qmp()
        .execute(&qmp::MigrateSetParameters {
            downtime_limit: Some(20),
            ..Default::default()
        })
        .await
        .unwrap();
    let uri = format!("unix:{}", target.incoming_socket().display());
    source
        .qmp()
        .execute(&qmp::Migrate { uri, resume: None })
        .await
        .unwrap();
    target.wait_running(Duration::from_secs(120)).await.unwrap();
    finish_source(&vms_a, &source).await.unwrap();
    let removed = in_ns(&ns_a, || net::sweep_taps(&BTreeSet::new()).unwrap())
        .join()
        .unwrap();
    assert_eq!(removed, vec![net::tap_name("default.web", 0)]);
    let at_switchover = client.echoed();
    let report = tokio::task::spawn_blocking(move || {
        client.wait_echoed(at_switchover + 50);
        client.stop()
    })
    .await
    .unwrap();
    assert_eq!(report.error, None, "{report:?}");
    assert!(report.echoed >= at_switchover + 50, "{report:?}");
    assert_eq!(switch_port_of(&seg, MAC).as_deref(), Some("h1"));
    eprintln!(
        "agent path: client's longest TCP gap {} ms ({} counters echoed in order)",
        report.longest_gap.as_millis(),
        report.echoed
    );
    let _ = vms_b.stop("default.web", Duration::from_secs(5)).await;
}
