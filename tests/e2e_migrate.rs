//! End-to-end: live migration to a named host on `ferry up` (`nova
//! live-migration server host`, `xm migrate -l`): `kubectl apply -f` of a
//! Migration, and `kubectl ferry migrate --to`, each moving a real memtest
//! guest between two agents (each in its own network namespace as root)
//! with its memory verified intact on the target.

mod e2e_support;

use std::time::Duration;

use e2e_support::{Cluster, memtest_vm};
use ferry::agent::guest::VerifyReport;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Apply a VM, let the controller place it, wait until it runs; its host.
fn running_vm(c: &Cluster, vm: &str) -> String {
    c.apply(&memtest_vm(vm, "64Mi", 32));
    c.wait_for(&format!("{vm} Running"), TIMEOUT, || {
        c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
    });
    let (host, report) = c.verify_vm("default", vm);
    assert!(matches!(report, VerifyReport::Intact { .. }), "{report:?}");
    host
}

fn other(host: &str) -> &'static str {
    if host == "host-1" { "host-2" } else { "host-1" }
}

fn assert_moved_intact(c: &Cluster, vm: &str, target: &str) {
    assert_eq!(c.vm_host("default", vm).as_deref(), Some(target));
    let (host, report) = c.verify_vm("default", vm);
    assert_eq!(host, target);
    assert!(
        matches!(report, VerifyReport::Intact { pages, .. } if pages > 0),
        "memory of {vm} on {target}: {report:?}"
    );
    // The source's QEMU is gone: one QEMU for the one VM.
    c.wait_for("the source QEMU to stop", TIMEOUT, || {
        c.qemu_pids().len() == 1
    });
}

#[test]
fn kubectl_apply_of_a_migration_live_migrates_a_guest_to_the_named_host() {
    let c = Cluster::up(2);
    let source = running_vm(&c, "mover");
    let target = other(&source);
    c.apply(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Migration\nmetadata:\n  name: mover-to-{target}\n  namespace: default\nspec:\n  vmName: mover\n  type: Live\n  targetHost: {target}\n"
    ));
    let name = format!("mover-to-{target}");
    c.wait_for("the migration to end", TIMEOUT, || {
        matches!(
            c.jsonpath(&["get", "mig", &name], "{.status.phase}")
                .as_str(),
            "Succeeded" | "Failed" | "Cancelled"
        )
    });
    let phase = c.jsonpath(&["get", "mig", &name], "{.status.phase}");
    assert_eq!(
        phase,
        "Succeeded",
        "{}",
        c.kubectl_ok(&["get", "mig", &name, "-o", "yaml"])
    );
    assert_eq!(
        c.jsonpath(&["get", "mig", &name], "{.status.sourceHost}"),
        source
    );
    assert_moved_intact(&c, "mover", target);
}

#[test]
fn a_policys_parallel_connections_carry_the_migration_on_that_many_multifd_channels() {
    let c = Cluster::up(2);
    c.patch_default_policy(r#"{"spec":{"parallelConnections":2}}"#);
    let source = running_vm(&c, "wide");
    let target = other(&source);
    let out = c.ferry(&["migrate", "wide", "--to", target, "--timeout", "120"]);
    assert!(
        out.status.success(),
        "kubectl ferry migrate failed:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.log()
    );
    // The only Migration of this cluster.
    let name = c.jsonpath(&["get", "mig"], "{.items[0].metadata.name}");
    // QEMU's main channel and the two multifd channels, each through the
    // relay.
    let message = c.jsonpath(&["get", "mig", &name], "{.status.source.message}");
    assert!(
        message.contains("over 3 relay channels"),
        "source report: {message}\n{}",
        c.kubectl_ok(&["get", "mig", &name, "-o", "yaml"])
    );
    assert_moved_intact(&c, "wide", target);
}

#[test]
fn kubectl_ferry_migrate_to_a_host_waits_and_reports_success() {
    let c = Cluster::up(2);
    let source = running_vm(&c, "walker");
    let target = other(&source);
    let out = c.ferry(&["migrate", "walker", "--to", target, "--timeout", "120"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubectl ferry migrate failed:\n{text}\n{}",
        c.log()
    );
    assert!(text.contains("Succeeded"), "{text}");
    assert_moved_intact(&c, "walker", target);
}

#[test]
fn cold_migration_restarts_the_guest_on_the_target_with_the_same_identity() {
    // `xm migrate` without -l: the guest stops on the source and starts on
    // the target with the same name, UUID and MAC address.
    const UUID: &str = "5d0c7a4e-2f1b-4c3a-9e8d-7b6a5f4e3d2c";
    const MAC: &str = "52:54:00:f3:77:01";
    let c = Cluster::up(2);
    c.apply(&format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: coldie\n  namespace: default\nspec:\n  uuid: {UUID}\n  memory: 64Mi\n  boot:\n    memtest:\n      fillMib: 32\n  networks:\n  - name: default\n    mac: \"{MAC}\"\n"
    ));
    c.wait_for("coldie Running", TIMEOUT, || {
        c.jsonpath(&["get", "fvm", "coldie"], "{.status.phase}") == "Running"
    });
    let source = c.vm_host("default", "coldie").unwrap();
    let target = other(&source);
    let identity = |host: &str| {
        let lines = c.host_qemu_cmdlines(host);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains(&format!("-uuid {UUID}")), "{}", lines[0]);
        assert!(lines[0].contains(&format!("mac={MAC}")), "{}", lines[0]);
    };
    identity(&source);

    let out = c.ferry(&[
        "migrate",
        "coldie",
        "--cold",
        "--to",
        target,
        "--timeout",
        "120",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubectl ferry migrate --cold failed:\n{text}"
    );
    assert!(text.contains("Succeeded"), "{text}");
    c.wait_for("the source QEMU to stop", TIMEOUT, || {
        c.host_qemu_pids(&source).is_empty()
    });
    assert_eq!(c.vm_host("default", "coldie").as_deref(), Some(target));
    identity(target);
    let (_, report) = c.verify_vm("default", "coldie");
    assert!(matches!(report, VerifyReport::Intact { .. }), "{report:?}");
}
