//! End-to-end, story 7 (second half): a drain cancelled mid-way by
//! `kubectl delete hostmaintenance`, on a fresh `ferry up --hosts 3`,
//! driven only through kubectl. `tests/e2e_drain.rs` covers `kubectl
//! ferry undrain` with one move in flight; this one applies the
//! HostMaintenance itself with a named target, lets two moves run at once
//! and deletes it with kubectl.
//!
//! ```text
//!  4 memtest VMs on host-1 ─► kubectl apply HostMaintenance host-1 → host-3
//!     (parallelOutboundPerHost 2, 2 MiB/s per move: two transfers of 32 MiB
//!      run, two wait) ─► both seen Running ─► kubectl delete hostmaintenance
//!  then: the delete returns once the maintenance is gone (its finalizer
//!  cancels first); both in-flight moves Cancelled, none Failed; every VM
//!  Running in exactly one QEMU on exactly one host, the one its status
//!  names (host-1), memory intact; host-3 holds no QEMU; host-1 is
//!  schedulable again (a new VM lands there while the others are cordoned)
//! ```

mod e2e_support;

use std::collections::BTreeMap;
use std::time::Duration;

use e2e_support::{Cluster, MigrationWatch, memtest_vm};
use ferry::agent::guest::VerifyReport;
use ferry::cli::up::layout::Layout;

const TIMEOUT: Duration = Duration::from_secs(180);
const VMS: [&str; 4] = ["vm-a", "vm-b", "vm-c", "vm-d"];
const HOSTS: [&str; 3] = ["host-1", "host-2", "host-3"];
const FINAL: [&str; 3] = ["Succeeded", "Failed", "Cancelled"];

fn cordon(c: &Cluster, host: &str, on: bool) {
    c.kubectl_ok(&[
        "patch",
        "host",
        host,
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{{"unschedulable":{on}}}}}"#),
    ]);
}

/// Start `vms` with only host-1 schedulable, then return the others to
/// service.
fn vms_on_host_1(c: &Cluster, vms: &[&str], fill_mib: u32) {
    for h in &HOSTS[1..] {
        cordon(c, h, true);
    }
    for vm in vms {
        c.apply(&memtest_vm(vm, "64Mi", fill_mib));
    }
    for vm in vms {
        c.wait_for(&format!("{vm} Running"), TIMEOUT, || {
            c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
        });
        let (host, report) = c.verify_vm("default", vm);
        assert_eq!(host, "host-1", "{vm}");
        assert!(matches!(report, VerifyReport::Intact { .. }), "{report:?}");
    }
    for h in &HOSTS[1..] {
        cordon(c, h, false);
    }
}

/// The hosts on which a QEMU of `vm` is alive now.
fn qemu_hosts(c: &Cluster, vm: &str) -> Vec<String> {
    let layout = Layout::at(c.data_dir());
    HOSTS
        .iter()
        .filter(|h| {
            let pid_file = layout
                .state_dir(h)
                .join("vms")
                .join(format!("default.{vm}"))
                .join("qemu.pid");
            std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .is_some_and(ferry::agent::qemu::pid_alive)
        })
        .map(|h| h.to_string())
        .collect()
}

/// The drain's Migrations: name → (VM, phase).
fn drain_migrations(c: &Cluster, hm: &str) -> BTreeMap<String, (String, String)> {
    c.jsonpath(
        &["get", "mig", "-l", &format!("ferry.dev/maintenance={hm}")],
        r#"{range .items[*]}{.metadata.name} {.spec.vmName} {.status.phase}{"\n"}{end}"#,
    )
    .lines()
    .filter_map(|l| {
        let mut f = l.split_whitespace();
        let name = f.next()?.to_string();
        let vm = f.next().unwrap_or("").to_string();
        Some((name, (vm, f.next().unwrap_or("").to_string())))
    })
    .collect()
}

#[test]
fn kubectl_delete_of_a_hostmaintenance_mid_drain_cancels_both_moves_in_flight() {
    let c = Cluster::up(3);
    c.patch_default_policy(r#"{"spec":{"limits":{"parallelOutboundPerHost":2},"bandwidth":{"mode":"Custom","limit":"2Mi"}}}"#);
    vms_on_host_1(&c, &VMS, 32);

    let watch = MigrationWatch::start(&c, "ferry.dev/maintenance=host-1", "{.metadata.name}");
    c.apply(
        "apiVersion: ferry.dev/v1alpha1\nkind: HostMaintenance\nmetadata:\n  name: host-1\nspec:\n  host: host-1\n  targetHost: host-3\n  reason: cancelled mid-way by the test\n",
    );
    let mut in_flight = Vec::new();
    c.wait_for("two drain moves running at once", TIMEOUT, || {
        let migrations = drain_migrations(&c, "host-1");
        assert!(
            migrations.values().all(|(_, p)| p != "Failed"),
            "{migrations:?}"
        );
        in_flight = migrations
            .iter()
            .filter(|(_, (_, p))| p == "Running")
            .map(|(name, (vm, _))| (name.clone(), vm.clone()))
            .collect();
        in_flight.len() == 2
    });
    assert_eq!(
        c.jsonpath(&["get", "host", "host-1"], "{.spec.unschedulable}"),
        "true"
    );
    assert_eq!(
        c.jsonpath(&["get", "hm", "host-1"], "{.status.phase}"),
        "Draining"
    );

    // kubectl waits for the finalizer: the maintenance is gone on return.
    c.kubectl_ok(&["delete", "hostmaintenance", "host-1", "--timeout=170s"]);
    assert_eq!(c.kubectl(&["get", "hm", "host-1"]).status.code(), Some(1));
    c.wait_for("the drain's migrations to be collected", TIMEOUT, || {
        c.kubectl_ok(&["get", "mig", "-o", "name"])
            .trim()
            .is_empty()
    });

    let seen = watch.last_phases();
    assert!(
        seen.values().all(|p| FINAL.contains(&p.as_str())),
        "a drain migration was collected before it ended: {seen:?}"
    );
    assert_eq!(seen.len(), VMS.len(), "one move per VM: {seen:?}");
    // The two waiting moves were cancelled before they were admitted.
    assert!(seen.values().all(|p| p == "Cancelled"), "{seen:?}");
    for (name, vm) in &in_flight {
        assert_eq!(
            seen.get(name).map(String::as_str),
            Some("Cancelled"),
            "the move of {vm} in flight at the delete: {seen:?}"
        );
    }
    assert_eq!(
        c.jsonpath(&["get", "host", "host-1"], "{.spec.unschedulable}"),
        "false"
    );

    // Every VM runs in exactly one QEMU, on the host its status names, with
    // its memory intact; nothing stayed behind on the drain's target.
    for vm in VMS {
        c.wait_for(&format!("{vm} in exactly one QEMU"), TIMEOUT, || {
            qemu_hosts(&c, vm).len() == 1
        });
        let host = qemu_hosts(&c, vm).remove(0);
        assert_eq!(host, "host-1", "{vm} (no move succeeded: {seen:?})");
        assert_eq!(c.vm_host("default", vm).as_deref(), Some(host.as_str()));
        assert_eq!(
            c.jsonpath(&["get", "fvm", vm], "{.status.phase}"),
            "Running",
            "{vm}"
        );
        let (on, report) = c.verify_vm("default", vm);
        assert_eq!(on, host, "{vm}");
        assert!(
            matches!(report, VerifyReport::Intact { pages, .. } if pages > 0),
            "memory of {vm} on {host}: {report:?}"
        );
    }
    c.wait_for("host-3 to hold no QEMU", TIMEOUT, || {
        c.host_qemu_pids("host-3").is_empty()
    });

    // host-1 is back in service: with the other hosts cordoned a new VM
    // can only land there.
    vms_on_host_1(&c, &["after"], 8);
}
