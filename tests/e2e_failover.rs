//! End-to-end: a failed host's VMs are rebuilt elsewhere with the same
//! identity (`nova evacuate`) once the host is fenced, never running on two
//! hosts at once, and the old host does not run them again. Three ways a
//! host fails: power loss (agent, watchdog and QEMUs die), cut off (link
//! down, agent and QEMUs run on), and the agent dying on a cut-off host. Short fencing times keep the tests to seconds:
//! the agents' watchdogs fence after 4s (`ferry up --fence-after 4s`) and
//! the default policy evacuates after 8s of silence.

mod e2e_support;

use std::time::Duration;

use e2e_support::{Cluster, memtest_vm, root};
use ferry::agent::guest::VerifyReport;

const TIMEOUT: Duration = Duration::from_secs(120);

fn cluster() -> Cluster {
    let c = Cluster::up_with(2, &["--fence-after", "4s"]);
    c.kubectl_ok(&[
        "patch",
        "mpol",
        "default",
        "--type=merge",
        "-p",
        r#"{"spec":{"resilience":{"policy":"MigrateAll","fenceAfter":"4s","evacuateAfter":"8s"}}}"#,
    ]);
    c
}

/// A running VM and the 1-based index of its host.
fn running_vm(c: &Cluster, vm: &str) -> (String, u32) {
    c.apply(&memtest_vm(vm, "64Mi", 32));
    c.wait_for(&format!("{vm} Running"), TIMEOUT, || {
        c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
    });
    let host = c.vm_host("default", vm).unwrap();
    let index = host.trim_start_matches("host-").parse().unwrap();
    (host, index)
}

/// Wait until the VM runs on another host than `old`, sampling all the
/// while that never more than one QEMU runs it (the cluster has this one
/// VM); check it there; returns the new host.
fn rebuilt_elsewhere(c: &Cluster, vm: &str, old: &str, uid: &str) -> String {
    c.wait_for(&format!("{vm} rebuilt off {old}"), TIMEOUT, || {
        let running = c.qemu_pids();
        assert!(running.len() <= 1, "{vm} runs twice: QEMUs {running:?}");
        c.vm_host("default", vm).is_some_and(|h| h != old)
            && c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
    });
    let (host, report) = c.verify_vm("default", vm);
    assert!(matches!(report, VerifyReport::Intact { .. }), "{report:?}");
    assert_eq!(c.jsonpath(&["get", "fvm", vm], "{.metadata.uid}"), uid);
    assert_eq!(
        c.jsonpath(&["get", "host", old], "{.status.phase}"),
        "Fenced"
    );
    let evacuations = c.jsonpath(
        &["get", "mig"],
        "{range .items[?(@.spec.type==\"Evacuate\")]}{.status.phase}{\"\\n\"}{end}",
    );
    assert_eq!(evacuations, "Succeeded", "one successful evacuation");
    assert_eq!(c.host_qemu_pids(old), Vec::<i32>::new());
    assert_eq!(c.qemu_pids().len(), 1);
    host
}

#[test]
fn a_host_that_loses_power_has_its_vm_rebuilt_on_another_host() {
    let c = cluster();
    let (old, _) = running_vm(&c, "survivor");
    let uid = c.jsonpath(&["get", "fvm", "survivor"], "{.metadata.uid}");
    c.power_off(&old);
    rebuilt_elsewhere(&c, "survivor", &old, &uid);
}

#[test]
fn a_host_cut_off_from_the_network_fences_itself_and_does_not_run_the_vm_again() {
    assert!(root(), "cutting a host off needs network namespaces (root)");
    let c = cluster();
    let (old, index) = running_vm(&c, "islander");
    let uid = c.jsonpath(&["get", "fvm", "islander"], "{.metadata.uid}");
    c.set_link(index, false);
    // Its agent and QEMU keep running until the watchdog fences them.
    c.wait_for(
        "the cut-off host's watchdog to stop its QEMU",
        TIMEOUT,
        || c.host_qemu_pids(&old).is_empty(),
    );
    let new = rebuilt_elsewhere(&c, "islander", &old, &uid);
    c.set_link(index, true);
    c.wait_for(&format!("{old} back in service"), TIMEOUT, || {
        c.jsonpath(&["get", "host", &old], "{.status.phase}") == "Active"
    });
    assert_eq!(c.host_qemu_pids(&old), Vec::<i32>::new());
    assert_eq!(
        c.vm_host("default", "islander").as_deref(),
        Some(new.as_str())
    );
    assert_eq!(c.qemu_pids().len(), 1);
}

#[test]
fn an_agent_dying_on_a_cut_off_host_leaves_its_watchdog_to_fence_the_vm() {
    assert!(root(), "cutting a host off needs network namespaces (root)");
    let c = cluster();
    let (old, index) = running_vm(&c, "orphan");
    let uid = c.jsonpath(&["get", "fvm", "orphan"], "{.metadata.uid}");
    c.set_link(index, false);
    c.kill_agent(&old);
    // Nobody renews the heartbeat: the watchdog, alone, stops the QEMU.
    c.wait_for("the watchdog to stop the orphaned QEMU", TIMEOUT, || {
        c.host_qemu_pids(&old).is_empty()
    });
    rebuilt_elsewhere(&c, "orphan", &old, &uid);
    c.set_link(index, true);
    assert_eq!(c.host_qemu_pids(&old), Vec::<i32>::new());
}
