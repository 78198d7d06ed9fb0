//! End-to-end: host maintenance (`nova host-evacuate-live`, RHV maintenance
//! mode) on a fresh `ferry up`, driven only through `kubectl` and
//! `kubectl ferry drain/undrain`, with the memory of every moved guest
//! verified intact on its new host.
//!
//! ```text
//!  cordon host-2.. ─► 3 memtest VMs land on host-1 ─► uncordon
//!  drain host-1            ─► every VM elsewhere, host-1 cordoned meanwhile,
//!                             ≤ parallelOutboundPerHost in flight, Completed 3/0
//!  drain host-1 --to host-3 ─► every VM on host-3
//!  drain host-1 --dry-run  ─► a plan printed, nothing moved
//!  drain, then undrain      ─► in-flight moves Cancelled, the rest stay on host-1
//! ```

mod e2e_support;

use std::collections::BTreeMap;
use std::time::Duration;

use e2e_support::{Cluster, MigrationWatch, memtest_vm};
use ferry::agent::guest::VerifyReport;

const TIMEOUT: Duration = Duration::from_secs(180);
const VMS: [&str; 3] = ["alpha", "bravo", "charlie"];
/// Phases in which a migration's stream is or may be flowing: what the
/// limits count (until the source reports the end of the stream).
const TRANSFERRING: [&str; 2] = ["Running", "PostCopy"];
/// The source's reports that end the stream.
const STREAM_ENDED: [&str; 3] = ["SwitchedOver", "Aborted", "Failed"];
/// Phases of a target prepared ahead of its transfer: as many again as the
/// limits allow, counted on their own.
const PREPARING: [&str; 2] = ["Scheduled", "PreparingTarget"];
const FINAL: [&str; 3] = ["Succeeded", "Failed", "Cancelled"];

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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

fn unschedulable(c: &Cluster, host: &str) -> String {
    c.jsonpath(&["get", "host", host], "{.spec.unschedulable}")
}

/// Patch the default MigrationPolicy's spec with `spec` (JSON).
fn policy(c: &Cluster, spec: &str) {
    c.patch_default_policy(&format!(r#"{{"spec":{spec}}}"#));
}

/// Start the three VMs on host-1 (the other hosts cordoned meanwhile, then
/// returned to service) and check their memory there.
fn three_vms_on_host_1(c: &Cluster) {
    for i in 2..=c.hosts {
        set_unschedulable(c, &format!("host-{i}"), true);
    }
    for vm in VMS {
        c.apply(&memtest_vm(vm, "64Mi", 16));
    }
    for vm in VMS {
        c.wait_for(&format!("{vm} Running"), TIMEOUT, || {
            c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
        });
        let (host, report) = c.verify_vm("default", vm);
        assert_eq!(host, "host-1", "{vm}");
        assert!(matches!(report, VerifyReport::Intact { .. }), "{report:?}");
    }
    for i in 2..=c.hosts {
        set_unschedulable(c, &format!("host-{i}"), false);
    }
}

/// The drain Migrations of maintenance `hm`: name → (phase, source host).
fn drain_migrations(c: &Cluster, hm: &str) -> BTreeMap<String, (String, String)> {
    let out = c.jsonpath(
        &[
            "get",
            "mig",
            "-A",
            "-l",
            &format!("ferry.dev/maintenance={hm}"),
        ],
        r#"{range .items[*]}{.metadata.name} {.status.phase} {.status.sourceHost} {.spec.vmName}{"\n"}{end}"#,
    );
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.to_string();
            let phase = f.next().unwrap_or("").to_string();
            let source = f.next().unwrap_or("").to_string();
            Some((name, (phase, source)))
        })
        .collect()
}

/// How many of a drain's migrations transfer from `host`, and how many
/// have their target prepared, as the limits count them.
fn streams_from(c: &Cluster, hm: &str, host: &str) -> (usize, usize) {
    let out = c.jsonpath(
        &[
            "get",
            "mig",
            "-A",
            "-l",
            &format!("ferry.dev/maintenance={hm}"),
        ],
        r#"{range .items[*]}{.status.phase} {.status.sourceHost} {.status.source.state}{"\n"}{end}"#,
    );
    let (mut transfers, mut preparations) = (0, 0);
    for l in out.lines() {
        let mut f = l.split_whitespace();
        let (phase, source, report) = (
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
        );
        if source != host {
            continue;
        }
        if TRANSFERRING.contains(&phase) && !STREAM_ENDED.contains(&report) {
            transfers += 1;
        } else if PREPARING.contains(&phase) {
            preparations += 1;
        }
    }
    (transfers, preparations)
}

fn assert_intact_on(c: &Cluster, vm: &str, expect: impl Fn(&str) -> bool, what: &str) {
    let (host, report) = c.verify_vm("default", vm);
    assert!(expect(&host), "{vm} on {host}, expected {what}");
    assert!(
        matches!(report, VerifyReport::Intact { pages, .. } if pages > 0),
        "memory of {vm} on {host}: {report:?}"
    );
}

#[test]
fn draining_a_host_moves_every_vm_elsewhere_one_at_a_time_and_undrain_returns_it() {
    let c = Cluster::up(3);
    policy(
        &c,
        r#"{"limits":{"parallelOutboundPerHost":1},"bandwidth":{"mode":"Custom","limit":"16Mi"}}"#,
    );
    three_vms_on_host_1(&c);

    let out = c.ferry(&["drain", "host-1", "--no-wait"]);
    assert!(out.status.success(), "{}", text(&out));

    // Sample while draining: host-1 stays cordoned, never more than one
    // transfer leaves it at once, and one more target at most is prepared.
    let mut most_in_flight = 0;
    let mut seen = BTreeMap::new();
    c.wait_for("the drain to complete", TIMEOUT, || {
        let phase = c.jsonpath(&["get", "hm", "host-1"], "{.status.phase}");
        let migrations = drain_migrations(&c, "host-1");
        let (in_flight, preparing) = streams_from(&c, "host-1", "host-1");
        assert!(
            preparing <= 1,
            "{preparing} targets prepared for host-1's next moves: {migrations:?}"
        );
        most_in_flight = most_in_flight.max(in_flight);
        for (name, (p, _)) in &migrations {
            seen.insert(name.clone(), p.clone());
        }
        if phase != "Completed" {
            assert_eq!(unschedulable(&c, "host-1"), "true", "drain phase {phase}");
        }
        assert!(
            in_flight <= 1,
            "{in_flight} migrations in flight from host-1: {migrations:?}"
        );
        assert_ne!(
            phase,
            "Failed",
            "{}",
            c.kubectl_ok(&["get", "hm", "host-1", "-o", "yaml"])
        );
        phase == "Completed"
    });
    assert_eq!(
        most_in_flight, 1,
        "no migration was seen in flight: {seen:?}"
    );
    assert_eq!(unschedulable(&c, "host-1"), "true");
    assert_eq!(
        c.jsonpath(
            &["get", "hm", "host-1"],
            "{.status.vmsTotal} {.status.vmsRemaining}"
        ),
        "3 0"
    );
    // The drain completes when every VM has moved (the commit point); each
    // Migration records Succeeded once it reads that back, a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let migrations = loop {
        let migrations = drain_migrations(&c, "host-1");
        let done = migrations.values().all(|(p, _)| p == "Succeeded");
        if done || std::time::Instant::now() > deadline {
            break migrations;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(migrations.len(), 3, "{migrations:?}");
    assert!(
        migrations
            .values()
            .all(|(p, s)| p == "Succeeded" && s == "host-1"),
        "{migrations:?}"
    );
    for vm in VMS {
        assert_intact_on(&c, vm, |h| h != "host-1", "a host other than host-1");
    }
    c.wait_for("host-1's QEMUs to stop", TIMEOUT, || {
        c.host_qemu_pids("host-1").is_empty()
    });

    let out = c.ferry(&["undrain", "host-1"]);
    assert!(out.status.success(), "{}", text(&out));
    c.wait_for("host-1 schedulable again", TIMEOUT, || {
        unschedulable(&c, "host-1") == "false"
    });
    c.wait_for("the maintenance to go", TIMEOUT, || {
        c.kubectl(&["get", "hm", "host-1"]).status.code() == Some(1)
    });
}

#[test]
fn draining_to_a_named_host_puts_every_vm_there() {
    let c = Cluster::up(3);
    three_vms_on_host_1(&c);
    let out = c.ferry(&["drain", "host-1", "--to", "host-3", "--timeout", "170"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.log());
    assert_eq!(
        c.jsonpath(&["get", "hm", "host-1"], "{.status.phase}"),
        "Completed"
    );
    for vm in VMS {
        assert_eq!(c.vm_host("default", vm).as_deref(), Some("host-3"), "{vm}");
        assert_intact_on(&c, vm, |h| h == "host-3", "host-3");
    }
    assert!(c.host_qemu_pids("host-2").is_empty());
    c.wait_for("host-1's QEMUs to stop", TIMEOUT, || {
        c.host_qemu_pids("host-1").is_empty()
    });
}

#[test]
fn a_dry_run_drain_prints_a_plan_and_moves_nothing() {
    let c = Cluster::up(3);
    three_vms_on_host_1(&c);
    let out = c.ferry(&["drain", "host-1", "--dry-run", "--timeout", "120"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains("plan for draining host-1 (estimated "),
        "{printed}"
    );
    for vm in VMS {
        let line = printed
            .lines()
            .find(|l| l.contains(&format!("default/{vm} ")))
            .unwrap_or_else(|| panic!("no plan line for {vm}:\n{printed}"));
        assert!(
            line.contains("-> host-2 (~") || line.contains("-> host-3 (~"),
            "{line}"
        );
    }
    // Nothing moved, nothing left behind, host-1 still in service.
    assert_eq!(c.kubectl_ok(&["get", "mig", "-A", "-o", "name"]).trim(), "");
    c.wait_for("the dry run's maintenance to go", TIMEOUT, || {
        c.kubectl_ok(&["get", "hm", "-o", "name"]).trim().is_empty()
    });
    assert_eq!(unschedulable(&c, "host-1"), "false");
    for vm in VMS {
        assert_eq!(c.vm_host("default", vm).as_deref(), Some("host-1"));
    }
    assert_eq!(c.host_qemu_pids("host-1").len(), 3);
}

#[test]
fn undrain_mid_way_cancels_in_flight_moves_and_leaves_the_rest_on_the_host() {
    let c = Cluster::up(2);
    // Slow and one at a time: the first move is still running when the
    // drain is cancelled, the others still queued.
    policy(
        &c,
        r#"{"limits":{"parallelOutboundPerHost":1},"bandwidth":{"mode":"Custom","limit":"2Mi"}}"#,
    );
    three_vms_on_host_1(&c);
    let out = c.ferry(&["drain", "host-1", "--no-wait"]);
    assert!(out.status.success(), "{}", text(&out));
    c.wait_for("a drain migration to be running", TIMEOUT, || {
        drain_migrations(&c, "host-1")
            .values()
            .any(|(p, _)| p == "Running")
    });
    assert_eq!(unschedulable(&c, "host-1"), "true");

    // The drain's Migrations are owned by the maintenance and collected
    // with it, so their phases are read from a watch started before.
    let watch = MigrationWatch::start(&c, "ferry.dev/maintenance=host-1", "{.spec.vmName}");
    let out = c.ferry(&["undrain", "host-1"]);
    assert!(out.status.success(), "{}", text(&out));
    c.wait_for("the maintenance to go", TIMEOUT, || {
        c.kubectl(&["get", "hm", "host-1"]).status.code() == Some(1)
    });
    c.wait_for("the drain's migrations to be collected", TIMEOUT, || {
        c.kubectl_ok(&["get", "mig", "-A", "-o", "name"])
            .trim()
            .is_empty()
    });
    let by_vm = watch.last_phases();
    assert_eq!(by_vm.len(), 3, "{by_vm:?}");
    assert!(
        by_vm.values().all(|p| FINAL.contains(&p.as_str())),
        "a drain migration was collected before it ended: {by_vm:?}"
    );
    assert!(
        by_vm.values().any(|p| p == "Cancelled"),
        "no drain migration was cancelled: {by_vm:?}"
    );
    assert!(by_vm.values().all(|p| p != "Failed"), "{by_vm:?}");
    assert_eq!(unschedulable(&c, "host-1"), "false");
    for vm in VMS {
        let moved = by_vm.get(vm).is_some_and(|p| p == "Succeeded");
        assert_eq!(
            c.jsonpath(&["get", "fvm", vm], "{.status.phase}"),
            "Running",
            "{vm}"
        );
        if moved {
            assert_intact_on(&c, vm, |h| h == "host-2", "host-2 (its move succeeded)");
        } else {
            assert_intact_on(&c, vm, |h| h == "host-1", "host-1 (not moved)");
        }
    }
    assert!(
        VMS.iter()
            .any(|vm| c.vm_host("default", vm).as_deref() == Some("host-1")),
        "every VM left host-1 despite the cancel"
    );
}
