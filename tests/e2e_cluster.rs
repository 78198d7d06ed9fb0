//! End-to-end: `ferry up` brings up hosts that run VMs, resumes on the same
//! data directory, and leaves nothing behind on Ctrl-C. Driven only through
//! kubectl and `kubectl ferry`; memory checked through the guest's serial
//! console on the host that runs it.

mod e2e_support;

use std::time::Duration;

use e2e_support::{Cluster, memtest_vm, root};
use ferry::agent::guest::VerifyReport;

const VM_TIMEOUT: Duration = Duration::from_secs(90);

fn wait_running(c: &Cluster, vm: &str) {
    c.wait_for(&format!("{vm} Running"), VM_TIMEOUT, || {
        c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
    });
}

fn assert_intact(c: &Cluster, vm: &str, want_host: &str) {
    let (host, report) = c.verify_vm("default", vm);
    assert_eq!(host, want_host);
    assert!(
        matches!(report, VerifyReport::Intact { pages, .. } if pages > 0),
        "{vm} on {host}: {report:?}"
    );
}

#[test]
fn hosts_publish_their_capacity_from_their_own_network_namespaces() {
    let c = Cluster::up(2);
    let names = c.jsonpath(&["get", "hosts"], "{.items[*].metadata.name}");
    assert_eq!(names, "host-1 host-2");
    for host in ["host-1", "host-2"] {
        assert_eq!(
            c.jsonpath(&["get", "host", host], "{.status.capacity.memory}"),
            "1Gi"
        );
        assert_eq!(
            c.jsonpath(&["get", "host", host], "{.status.phase}"),
            "Active"
        );
    }
    let endpoints: Vec<String> = ["host-1", "host-2"]
        .iter()
        .map(|h| c.jsonpath(&["get", "host", h], "{.spec.migrationEndpoint}"))
        .collect();
    assert_ne!(endpoints[0], endpoints[1]);
    if root() {
        // Each host has its own address on the bridge's subnet.
        for e in &endpoints {
            assert!(e.starts_with("10.77.") && e.ends_with(":7443"), "{e}");
        }
        assert_eq!(
            c.network_leftovers().len(),
            2 + 2 + 2 + 1,
            "2 host namespaces, the VM network's switch and client namespaces, 2 veths, a bridge"
        );
    } else {
        assert!(endpoints[0].starts_with("127.0.0.1:"), "{}", endpoints[0]);
    }
    assert_eq!(
        c.jsonpath(&["get", "mpol", "default"], "{.metadata.name}"),
        "default"
    );
    let status = c.ferry(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(text.contains("host-1") && text.contains("host-2"), "{text}");
    assert!(
        c.banner
            .iter()
            .any(|l| l.contains(&c.kubeconfig().display().to_string())),
        "the banner names the kubeconfig: {:?}",
        c.banner
    );
}

#[test]
fn a_vm_placed_by_hand_runs_on_that_host_with_its_memory_intact() {
    let c = Cluster::up(2);
    c.apply(&memtest_vm("placed", "64Mi", 32));
    c.kubectl_ok(&[
        "patch",
        "fvm",
        "placed",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"host":"host-2"}}"#,
    ]);
    wait_running(&c, "placed");
    assert_intact(&c, "placed", "host-2");
    // The controller may have placed the VM elsewhere a moment before the
    // patch; that host's agent then stops its copy: one QEMU remains.
    c.wait_for("exactly one QEMU", VM_TIMEOUT, || c.qemu_pids().len() == 1);
    c.wait_for("host-2 counts the VM", VM_TIMEOUT, || {
        c.jsonpath(&["get", "host", "host-2"], "{.status.vmCount}") == "1"
    });
}

#[test]
fn ferry_up_again_on_the_same_data_dir_resumes_the_same_cluster() {
    let mut c = Cluster::up_with(1, &["--demo", "--demo-vms", "1", "--demo-guest", "memtest"]);
    wait_running(&c, "demo-1");
    let uid = c.jsonpath(&["get", "fvm", "demo-1"], "{.metadata.uid}");
    let policy_uid = c.jsonpath(&["get", "mpol", "default"], "{.metadata.uid}");
    c.kubectl_ok(&["label", "fvm", "demo-1", "kept=yes"]);
    assert!(c.stop().success(), "{}", c.log());
    assert!(c.qemu_pids().is_empty(), "ferry up stopped the VM");

    c.start();
    assert_eq!(
        c.jsonpath(&["get", "fvm", "demo-1"], "{.metadata.uid}"),
        uid
    );
    assert_eq!(
        c.jsonpath(&["get", "mpol", "default"], "{.metadata.uid}"),
        policy_uid
    );
    assert_eq!(
        c.jsonpath(&["get", "fvm", "demo-1"], "{.metadata.labels.kept}"),
        "yes"
    );
    c.wait_for("demo-1 running again", VM_TIMEOUT, || {
        c.qemu_pids().len() == 1
    });
    wait_running(&c, "demo-1");
    assert_intact(&c, "demo-1", "host-1");
}

#[test]
fn ctrl_c_stops_agents_vms_watchdogs_and_removes_the_network() {
    let mut c = Cluster::up_with(2, &["--demo", "--demo-vms", "2", "--demo-guest", "memtest"]);
    for vm in ["demo-1", "demo-2"] {
        wait_running(&c, vm);
    }
    assert_eq!(
        c.jsonpath(&["get", "fvm", "demo-1"], "{.status.host}"),
        "host-1"
    );
    assert_eq!(
        c.jsonpath(&["get", "fvm", "demo-2"], "{.status.host}"),
        "host-2"
    );
    let qemus = c.qemu_pids();
    assert_eq!(qemus.len(), 2);
    assert!(!c.processes().is_empty());
    if root() {
        assert!(!c.network_leftovers().is_empty());
    }

    assert!(c.stop().success(), "{}", c.log());
    for pid in qemus {
        assert!(!ferry::agent::qemu::pid_alive(pid), "QEMU {pid} survived");
    }
    // The watchdogs exit within their poll interval after standing down.
    c.wait_for(
        "no agent, watchdog or QEMU left",
        Duration::from_secs(5),
        || c.processes().is_empty(),
    );
    assert_eq!(c.network_leftovers(), Vec::<String>::new());
}

#[test]
fn ferry_up_killed_outright_is_replaced_and_its_running_vm_adopted() {
    let mut c = Cluster::up_with(2, &["--demo", "--demo-vms", "2", "--demo-guest", "memtest"]);
    for vm in ["demo-1", "demo-2"] {
        wait_running(&c, vm);
    }
    let mut before = c.qemu_pids();
    before.sort();
    c.crash();
    c.start();
    // One agent per host again: the stale ones were stopped, not doubled.
    let agents = c
        .processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(" agent run "))
        .count();
    assert_eq!(agents, 2, "{:?}", c.processes());
    // The guests kept running through the crash: the same QEMUs, adopted.
    let mut after = c.qemu_pids();
    after.sort();
    assert_eq!(after, before);
    assert_intact(&c, "demo-1", "host-1");
    assert_intact(&c, "demo-2", "host-2");
    c.wait_for("host-1 to count its adopted VM", VM_TIMEOUT, || {
        c.jsonpath(&["get", "host", "host-1"], "{.status.vmCount}") == "1"
    });
}
