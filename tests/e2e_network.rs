//! End-to-end on `ferry up` (root): a VM's network addresses move with it
//! (issue 9). VMs run the Linux test guest with a static address on the
//! VM network `default`; a client in the client namespace keeps one TCP
//! connection exchanging a counter every 20 ms with the guest's echo
//! service, and pings it every 20 ms.
//!
//! ```text
//!  live migration  ─► the connection survives, every counter echoed in order
//!  drain (2 VMs)   ─► each VM's connection survives
//!  cold migration  ─► same MAC and IP: the client reconnects to the same address
//!  evacuation      ─► same MAC and IP after the failed host is fenced
//! ```
//!
//! The tests run one at a time (a lock): each boots real guests under TCG,
//! and the gaps they print are only meaningful without the others' load.
//! They print the client's longest gaps; they assert only what must hold.

mod e2e_support;

use std::sync::Mutex;
use std::time::Duration;

use e2e_support::net::{CounterClient, Pinger, linux_vm, vm_address};
use e2e_support::{Cluster, root};

const TIMEOUT: Duration = Duration::from_secs(240);
/// Counters that must come back after the move (≥ 1 s of traffic).
const AFTER: u32 = 50;

/// One networked test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn other(host: &str) -> &'static str {
    if host == "host-1" { "host-2" } else { "host-1" }
}

/// The QEMU of `vm` on `host` has the NIC with `mac`.
fn qemu_has_mac(c: &Cluster, host: &str, mac: &str) {
    let lines = c.host_qemu_cmdlines(host);
    assert!(
        lines.iter().any(|l| l.contains(&format!("mac={mac}"))),
        "no QEMU with mac={mac} on {host}: {lines:?}"
    );
}

/// The `downtime N ms` that `kubectl ferry migrate` reports at the end.
fn reported_downtime(out: &str) -> String {
    out.rsplit("downtime ")
        .next()
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or("?")
        .to_string()
}

#[test]
fn a_live_migrated_vm_keeps_its_tcp_connection_and_every_counter() {
    assert!(root(), "the VM network needs network namespaces (root)");
    let _one = serial();
    let c = Cluster::up(2);
    c.apply(&linux_vm("web", 11));
    c.wait_vm_running("web");
    let nic = c.vm_nic("web");
    assert_eq!(nic.1, "10.78.0.11/24");
    let ns = c.client_namespace();
    // There and back: with the default downtime limit, then with 20 ms.
    for limit in [None, Some("20ms")] {
        if let Some(limit) = limit {
            c.patch_default_policy(&format!(
                r#"{{"spec":{{"convergence":{{"downtimeLimit":"{limit}"}}}}}}"#
            ));
            assert_eq!(
                c.jsonpath(
                    &["get", "mpol", "default"],
                    "{.spec.convergence.downtimeLimit}"
                ),
                limit
            );
        }
        let source = c.vm_host("default", "web").unwrap();
        let target = other(&source);
        let client = CounterClient::start(&ns, &vm_address(11));
        let ping = Pinger::start(&ns, &vm_address(11));

        let out = c.ferry(&["migrate", "web", "--to", target, "--timeout", "240"]);
        let said = text(&out);
        assert!(out.status.success(), "{said}\n{}", c.log());
        let at_switchover = client.echoed();
        client.wait_echoed(at_switchover + AFTER);
        let report = client.stop();
        let ping = ping.stop();

        assert_eq!(report.error, None, "{report:?}");
        assert!(report.echoed >= at_switchover + AFTER, "{report:?}");
        assert!(ping.received > 0, "{ping:?}");
        assert_eq!(c.vm_host("default", "web").as_deref(), Some(target));
        assert_eq!(c.vm_nic("web"), nic, "MAC and IP moved with the VM");
        qemu_has_mac(&c, target, &nic.0);
        eprintln!(
            "live migration through ferry up (downtimeLimit {}): QEMU downtime {} ms; client's longest TCP gap {} ms ({} counters echoed in order); longest ping gap {} ms ({} of {} answered)",
            limit.unwrap_or("300ms, the default"),
            reported_downtime(&said),
            report.longest_gap.as_millis(),
            report.echoed,
            ping.longest_gap.as_millis(),
            ping.received,
            ping.sent,
        );
    }
}

#[test]
fn draining_a_host_with_two_networked_vms_keeps_both_connections() {
    assert!(root(), "the VM network needs network namespaces (root)");
    let _one = serial();
    let c = Cluster::up(2);
    let cordon = |on: bool| {
        c.kubectl_ok(&[
            "patch",
            "host",
            "host-2",
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"unschedulable":{on}}}}}"#),
        ])
    };
    // Both VMs on host-1: host-2 is cordoned while they are placed.
    cordon(true);
    let vms = [("left", 21u8), ("right", 22u8)];
    for (vm, octet) in vms {
        c.apply(&linux_vm(vm, octet));
    }
    for (vm, _) in vms {
        assert_eq!(c.wait_vm_running(vm), "host-1", "{vm}");
    }
    cordon(false);
    let ns = c.client_namespace();
    let nics: Vec<_> = vms.iter().map(|(vm, _)| c.vm_nic(vm)).collect();
    let clients: Vec<CounterClient> = vms
        .iter()
        .map(|(_, octet)| CounterClient::start(&ns, &vm_address(*octet)))
        .collect();

    let out = c.ferry(&["drain", "host-1", "--timeout", "240"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    let marks: Vec<u32> = clients.iter().map(CounterClient::echoed).collect();
    for (client, mark) in clients.iter().zip(&marks) {
        client.wait_echoed(mark + AFTER);
    }
    for (((vm, _), client), (mark, nic)) in vms.iter().zip(clients).zip(marks.iter().zip(&nics)) {
        let report = client.stop();
        assert_eq!(report.error, None, "{vm}: {report:?}");
        assert!(report.echoed >= mark + AFTER, "{vm}: {report:?}");
        assert_eq!(c.vm_host("default", vm).as_deref(), Some("host-2"), "{vm}");
        assert_eq!(&c.vm_nic(vm), nic, "{vm}: MAC and IP moved with it");
        eprintln!(
            "drain through ferry up: {vm}: client's longest TCP gap {} ms ({} counters echoed in order)",
            report.longest_gap.as_millis(),
            report.echoed
        );
    }
}

#[test]
fn a_cold_migrated_vm_keeps_its_mac_and_ip() {
    assert!(root(), "the VM network needs network namespaces (root)");
    let _one = serial();
    let c = Cluster::up(2);
    c.apply(&linux_vm("cold", 31));
    let source = c.wait_vm_running("cold");
    let target = other(&source);
    let nic = c.vm_nic("cold");
    let ns = c.client_namespace();
    let before = CounterClient::start(&ns, &vm_address(31)).stop();
    assert_eq!(before.error, None, "{before:?}");

    let out = c.ferry(&[
        "migrate",
        "cold",
        "--cold",
        "--to",
        target,
        "--timeout",
        "240",
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    c.wait_for("the source QEMU to stop", TIMEOUT, || {
        c.host_qemu_pids(&source).is_empty()
    });
    assert_eq!(c.vm_host("default", "cold").as_deref(), Some(target));
    assert_eq!(c.vm_nic("cold"), nic);
    qemu_has_mac(&c, target, &nic.0);
    // The guest booted again on the target: a new connection to the same
    // address reaches it.
    let after = CounterClient::start(&ns, &vm_address(31)).stop();
    assert_eq!(after.error, None, "{after:?}");
}

#[test]
fn an_evacuated_vm_keeps_its_mac_and_ip() {
    assert!(root(), "the VM network needs network namespaces (root)");
    let _one = serial();
    let c = Cluster::up_with(2, &["--fence-after", "4s"]);
    c.patch_default_policy(
        r#"{"spec":{"resilience":{"policy":"MigrateAll","fenceAfter":"4s","evacuateAfter":"8s"}}}"#,
    );
    c.apply(&linux_vm("phoenix", 41));
    let old = c.wait_vm_running("phoenix");
    let nic = c.vm_nic("phoenix");
    let ns = c.client_namespace();
    let before = CounterClient::start(&ns, &vm_address(41)).stop();
    assert_eq!(before.error, None, "{before:?}");

    c.power_off(&old);
    c.wait_for("phoenix rebuilt on another host", TIMEOUT, || {
        c.vm_host("default", "phoenix").is_some_and(|h| h != old)
            && c.jsonpath(&["get", "fvm", "phoenix"], "{.status.phase}") == "Running"
    });
    let new = c.vm_host("default", "phoenix").unwrap();
    assert_eq!(
        c.jsonpath(&["get", "host", &old], "{.status.phase}"),
        "Fenced"
    );
    assert_eq!(c.vm_nic("phoenix"), nic);
    qemu_has_mac(&c, &new, &nic.0);
    let after = CounterClient::start(&ns, &vm_address(41)).stop();
    assert_eq!(after.error, None, "{after:?}");
}

#[test]
fn the_vm_network_survives_a_crash_of_ferry_up_is_removed_on_ctrl_c_and_rebuilt_on_restart() {
    assert!(root(), "the VM network needs network namespaces (root)");
    let _one = serial();
    let mut c = Cluster::up(1);
    let ns = c.client_namespace();
    assert!(
        c.banner.iter().any(|l| l.contains(&ns)),
        "the banner names the client namespace: {:?}",
        c.banner
    );
    c.apply(&linux_vm("stay", 51));
    c.wait_vm_running("stay");
    let status = text(&c.ferry(&["status"]));
    assert!(
        status.contains(&format!("ip netns exec {ns} ")) && status.contains("10.78.0.51"),
        "{status}"
    );

    // ferry up killed outright: its network stays in place and the next
    // run keeps it, so the adopted guest's connection goes on.
    let client = CounterClient::start(&ns, &vm_address(51));
    let qemus = c.qemu_pids();
    c.crash();
    c.start();
    assert_eq!(c.qemu_pids(), qemus, "the running QEMU was adopted");
    let mark = client.echoed();
    client.wait_echoed(mark + AFTER);
    let report = client.stop();
    assert_eq!(report.error, None, "{report:?}");
    assert!(report.echoed >= mark + AFTER, "{report:?}");

    // Ctrl-C removes the whole network; a restart builds it again and the
    // VM is reachable at the same address.
    assert!(c.stop().success(), "{}", c.log());
    assert_eq!(c.network_leftovers(), Vec::<String>::new());
    c.start();
    let again = CounterClient::start(&ns, &vm_address(51)).stop();
    assert_eq!(again.error, None, "{again:?}");
}

#[test]
fn without_network_namespaces_ferry_up_says_there_is_no_vm_network() {
    let c = Cluster::up_with(1, &["--no-netns"]);
    assert!(
        c.banner.iter().any(|l| l.starts_with("No VM network")),
        "{:?}",
        c.banner
    );
    let cm = c.kubectl(&["get", "configmap", "-n", "ferry-system", "ferry-up-network"]);
    assert!(!cm.status.success(), "no VM network is published");
}
