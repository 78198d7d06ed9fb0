//! End-to-end, story 9: restarts in the middle of a drain on `ferry up`,
//! driven through kubectl and `kubectl ferry` only. Four memtest guests on
//! host-1, drained one at a time over an 8 MiB/s link; while a transfer is
//! under way, in turn:
//!
//! ```text
//!  1. the controller process is killed (SIGKILL)  → ferry up starts it again
//!  2. host-1's agent is killed (SIGKILL)          → ferry up starts it again;
//!                                                  it adopts its QEMUs
//!  3. ferry up itself is killed (SIGKILL): the API server, with it → started
//!     again on the same data directory; it stops the stale agents and
//!     controller and adopts the QEMUs
//! ```
//!
//! The drain completes; every guest runs on another host in exactly one
//! QEMU with its memory intact, was moved by exactly one successful
//! Migration, and at no sampled instant executed on two hosts (vCPU
//! sampler, as in `cluster_restarts`).

mod e2e_support;
#[path = "cluster_support/vcpu.rs"]
mod vcpu;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use e2e_support::{Cluster, memtest_vm};
use ferry::agent::guest::VerifyReport;
use ferry::cli::up::layout::Layout;

const TIMEOUT: Duration = Duration::from_secs(240);
const VMS: [&str; 4] = ["r1", "r2", "r3", "r4"];

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

/// The drain's Migrations: name → (phase, VM, bytes transferred so far).
fn drain_migrations(c: &Cluster) -> BTreeMap<String, (String, String, u64)> {
    let out = c.jsonpath(
        &["get", "mig", "-l", "ferry.dev/maintenance=host-1"],
        r#"{range .items[*]}{.metadata.name} {.spec.vmName} {.status.phase} {.status.progress.memoryTransferred}{"\n"}{end}"#,
    );
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.to_string();
            let vm = f.next().unwrap_or("").to_string();
            let phase = f.next().unwrap_or("").to_string();
            let bytes = f.next().and_then(|b| b.parse().ok()).unwrap_or(0);
            Some((name, (phase, vm, bytes)))
        })
        .collect()
}

/// Waits until a drain Migration not in `done` is mid-transfer (Running,
/// more than 8 MiB sent); returns its name.
fn wait_mid_transfer(c: &Cluster, done: &BTreeSet<String>, drill: &str) -> String {
    let mut found = None;
    c.wait_for(
        &format!("a transfer under way for drill {drill}"),
        TIMEOUT,
        || {
            found = drain_migrations(c)
                .into_iter()
                .find(|(name, (phase, _, bytes))| {
                    !done.contains(name) && phase == "Running" && *bytes > 8 << 20
                })
                .map(|(name, _)| name);
            found.is_some()
        },
    );
    found.unwrap()
}

fn pid_in(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[test]
fn a_drain_survives_the_controller_the_source_agent_and_ferry_up_killed_mid_transfer() {
    let mut c = Cluster::up(3);
    let layout = Layout::at(c.data_dir());
    c.patch_default_policy(r#"{"spec":{"limits":{"parallelOutboundPerHost":1},"bandwidth":{"mode":"Custom","limit":"8Mi"}}}"#);
    // The guests start on host-1 (the others cordoned meanwhile).
    for i in 2..=3 {
        set_unschedulable(&c, &format!("host-{i}"), true);
    }
    for vm in VMS {
        c.apply(&memtest_vm(vm, "64Mi", 48));
    }
    for vm in VMS {
        c.wait_for(&format!("{vm} Running"), TIMEOUT, || {
            c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
        });
        assert_eq!(c.vm_host("default", vm).as_deref(), Some("host-1"));
    }
    for i in 2..=3 {
        set_unschedulable(&c, &format!("host-{i}"), false);
    }
    let hosts: Vec<(String, std::path::PathBuf)> = (1..=3)
        .map(|i| {
            let h = format!("host-{i}");
            (h.clone(), layout.state_dir(&h))
        })
        .collect();
    let sampler = vcpu::Sampler::start(hosts, VMS.iter().map(|v| v.to_string()).collect());

    let out = c.ferry(&["drain", "host-1", "--no-wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut drilled = BTreeSet::new();

    // 1. The controller.
    drilled.insert(wait_mid_transfer(&c, &drilled, "controller"));
    let controller_pid = layout.dir.join("controller.pid");
    let old = pid_in(&controller_pid).expect("the controller's pid");
    sigkill(old);
    c.wait_for("ferry up to start the controller again", TIMEOUT, || {
        pid_in(&controller_pid).is_some_and(|p| p != old && ferry::agent::qemu::pid_alive(p))
    });

    // 2. The source host's agent.
    drilled.insert(wait_mid_transfer(&c, &drilled, "source agent"));
    let agent_pid = layout.host_dir("host-1").join("agent.pid");
    let old = pid_in(&agent_pid).expect("host-1's agent pid");
    c.kill_agent("host-1");
    c.wait_for("ferry up to start host-1's agent again", TIMEOUT, || {
        pid_in(&agent_pid).is_some_and(|p| p != old && ferry::agent::qemu::pid_alive(p))
    });

    // 3. ferry up itself, and with it the API server.
    drilled.insert(wait_mid_transfer(&c, &drilled, "ferry up"));
    c.crash();
    c.start();

    c.wait_for("the drain to complete", TIMEOUT, || {
        c.jsonpath(&["get", "hm", "host-1"], "{.status.phase}") == "Completed"
    });
    let report = sampler.finish();
    assert!(
        report.doubles.is_empty(),
        "a guest executed on two hosts: {:?}",
        report.doubles
    );

    // Each guest: elsewhere, one QEMU, moved by exactly one successful
    // Migration (failed attempts retried are fine), memory intact.
    let migrations = drain_migrations(&c);
    for vm in VMS {
        let host = c.vm_host("default", vm).unwrap();
        assert_ne!(host, "host-1", "{vm}");
        let succeeded: Vec<&String> = migrations
            .iter()
            .filter(|(_, (phase, v, _))| v == vm && phase == "Succeeded")
            .map(|(name, _)| name)
            .collect();
        assert_eq!(succeeded.len(), 1, "{vm}: {migrations:?}");
        let (on, verify) = c.verify_vm("default", vm);
        assert_eq!(on, host);
        assert!(
            matches!(verify, VerifyReport::Intact { .. }),
            "{vm}: {verify:?}"
        );
    }
    assert_eq!(c.host_qemu_pids("host-1"), Vec::<i32>::new());
    assert_eq!(
        c.qemu_pids().len(),
        VMS.len(),
        "one QEMU per guest: {:?}",
        c.processes()
    );
    let log = c.log();
    assert!(log.contains("ferry up: restarted controller"), "{log}");
    assert!(log.contains("ferry up: restarted agent host-1"), "{log}");
    eprintln!(
        "drills on {drilled:?}; migrations: {migrations:?}; sampled {} intervals",
        report.intervals
    );
}
