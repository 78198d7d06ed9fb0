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
    c.patch_default_policy(
        r#"{"spec":{"resilience":{"policy":"MigrateAll","fenceAfter":"4s","evacuateAfter":"8s"}}}"#,
    );
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

fn set_unschedulable(c: &Cluster, host: &str, on: bool) {
    c.kubectl_ok(&[
        "patch",
        "host",
        host,
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{{"unschedulable":{on}}}}}"#),
    ]);
}

/// A memtest VM on `host` (the other hosts cordoned while it starts).
fn vm_on(c: &Cluster, vm: &str, host: &str, highly_available: bool) -> String {
    let others: Vec<String> = (1..=c.hosts)
        .map(|i| format!("host-{i}"))
        .filter(|h| h != host)
        .collect();
    for h in &others {
        set_unschedulable(c, h, true);
    }
    c.apply(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {vm}\n  namespace: default\n\
         spec:\n  memory: 64Mi\n  cpus: 1\n  highlyAvailable: {highly_available}\n  boot:\n    memtest:\n      fillMib: 16\n"
    ));
    c.wait_for(&format!("{vm} Running"), TIMEOUT, || {
        c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
    });
    assert_eq!(c.vm_host("default", vm).as_deref(), Some(host));
    for h in &others {
        set_unschedulable(c, h, false);
    }
    c.jsonpath(&["get", "fvm", vm], "{.metadata.uid}")
}

/// The VMs a `NotEvacuated` Warning Event was recorded for.
fn not_evacuated(c: &Cluster) -> Vec<String> {
    let names = c.jsonpath(
        &["get", "events"],
        "{range .items[?(@.reason==\"NotEvacuated\")]}{.involvedObject.name}{\"\\n\"}{end}",
    );
    let mut v: Vec<String> = names.lines().map(str::to_string).collect();
    v.sort();
    v.dedup();
    v
}

/// Each resilience policy rebuilds exactly the VMs it names: under
/// `MigrateHighlyAvailableOnly` a powered-off host's highly available VM
/// is rebuilt elsewhere and the other stays down with a `NotEvacuated`
/// Event; under `DoNotMigrate` nothing is rebuilt. (`MigrateAll`: the
/// tests above.)
#[test]
fn each_resilience_policy_rebuilds_exactly_the_vms_it_names() {
    let c = Cluster::up_with(3, &["--fence-after", "4s"]);
    let resilience = |policy: &str| {
        c.patch_default_policy(&format!(
                r#"{{"spec":{{"resilience":{{"policy":"{policy}","fenceAfter":"4s","evacuateAfter":"8s"}}}}}}"#
            ));
    };

    resilience("MigrateHighlyAvailableOnly");
    let ha = vm_on(&c, "ha", "host-1", true);
    vm_on(&c, "plain", "host-1", false);
    c.power_off("host-1");
    c.wait_for("ha rebuilt off host-1", TIMEOUT, || {
        c.vm_host("default", "ha").is_some_and(|h| h != "host-1")
            && c.jsonpath(&["get", "fvm", "ha"], "{.status.phase}") == "Running"
    });
    let (_, report) = c.verify_vm("default", "ha");
    assert!(matches!(report, VerifyReport::Intact { .. }), "{report:?}");
    assert_eq!(c.jsonpath(&["get", "fvm", "ha"], "{.metadata.uid}"), ha);
    c.wait_for("a NotEvacuated event for plain", TIMEOUT, || {
        not_evacuated(&c) == ["plain"]
    });
    assert_eq!(
        c.vm_host("default", "plain").as_deref(),
        Some("host-1"),
        "plain stays assigned to its failed host"
    );
    let evacuated = c.jsonpath(
        &["get", "mig"],
        "{range .items[?(@.spec.type==\"Evacuate\")]}{.spec.vmName}{\"\\n\"}{end}",
    );
    assert_eq!(evacuated.trim(), "ha", "only the highly available VM");

    resilience("DoNotMigrate");
    let ha_host = c.vm_host("default", "ha").unwrap();
    c.power_off(&ha_host);
    c.wait_for(&format!("{ha_host} fenced"), TIMEOUT, || {
        c.jsonpath(&["get", "host", &ha_host], "{.status.phase}") == "Fenced"
    });
    c.wait_for("a NotEvacuated event for ha", TIMEOUT, || {
        not_evacuated(&c) == ["ha", "plain"]
    });
    assert_eq!(c.vm_host("default", "ha"), Some(ha_host.clone()));
    let evacuated = c.jsonpath(
        &["get", "mig"],
        "{range .items[?(@.spec.type==\"Evacuate\")]}{.spec.vmName}{\"\\n\"}{end}",
    );
    assert_eq!(evacuated.trim(), "ha", "no evacuation under DoNotMigrate");
    assert_eq!(c.qemu_pids(), Vec::<i32>::new(), "nothing runs anywhere");
}
