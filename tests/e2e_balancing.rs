//! End-to-end: automatic balancing on a fresh `ferry up`. A host loaded past
//! `highUtilization` for `overCommitDuration` sheds one VM through an
//! automatic Migration (label `ferry.dev/automatic`), and no second VM
//! leaves it within the policy's balancing `interval`.
//!
//! ```text
//!  host-1 95%  alpha bravo charlie   ─► one of them moves (automatic)
//!  host-2  5%                            to host-2 or host-3, memory intact
//!  host-3  5%
//! ```

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::{Cluster, memtest_vm};
use ferry::agent::guest::VerifyReport;

const TIMEOUT: Duration = Duration::from_secs(180);
const VMS: [&str; 3] = ["alpha", "bravo", "charlie"];
/// The balancing interval: the least time between two moves off one host.
const INTERVAL_SECS: u64 = 40;

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

/// Automatic Migrations: (name, vm, phase, source, target).
fn automatic(c: &Cluster) -> Vec<(String, String, String, String, String)> {
    c.jsonpath(
        &["get", "mig", "-A", "-l", "ferry.dev/automatic=true"],
        r#"{range .items[*]}{.metadata.name} {.spec.vmName} {.status.phase} {.status.sourceHost} {.status.targetHost}{"\n"}{end}"#,
    )
    .lines()
    .map(|l| {
        let f: Vec<String> = l.split_whitespace().map(str::to_string).collect();
        let get = |i: usize| f.get(i).cloned().unwrap_or_default();
        (get(0), get(1), get(2), get(3), get(4))
    })
    .collect()
}

#[test]
fn an_overloaded_host_sheds_exactly_one_vm_per_balancing_interval() {
    let c = Cluster::up(3);
    // All three VMs on host-1.
    set_unschedulable(&c, "host-2", true);
    set_unschedulable(&c, "host-3", true);
    for vm in VMS {
        c.apply(&memtest_vm(vm, "64Mi", 16));
    }
    for vm in VMS {
        c.wait_for(&format!("{vm} Running"), TIMEOUT, || {
            c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
        });
        assert_eq!(c.vm_host("default", vm).as_deref(), Some("host-1"));
    }
    set_unschedulable(&c, "host-2", false);
    set_unschedulable(&c, "host-3", false);
    for (host, load) in [("host-1", "95"), ("host-2", "5"), ("host-3", "5")] {
        c.set_cpu_load(host, load.parse().unwrap());
        c.wait_for(&format!("{host} to report {load}%"), TIMEOUT, || {
            c.jsonpath(&["get", "host", host], "{.status.cpuPercent}") == load
        });
    }
    // Nothing moves while balancing is off.
    assert!(automatic(&c).is_empty());

    c.patch_default_policy(&format!(
            r#"{{"spec":{{"scheduling":{{"policy":"EvenlyDistributed","highUtilization":50,"overCommitDuration":"4s","balancing":{{"enabled":true,"interval":"{INTERVAL_SECS}s"}}}}}}}}"#
        ));
    c.wait_for("an automatic migration", TIMEOUT, || {
        !automatic(&c).is_empty()
    });
    let first_seen = Instant::now();
    let moves = automatic(&c);
    assert_eq!(moves.len(), 1, "{moves:?}");
    let (name, vm, _, _, _) = moves[0].clone();
    c.wait_for("the automatic migration to end", TIMEOUT, || {
        matches!(
            c.jsonpath(&["get", "mig", &name], "{.status.phase}")
                .as_str(),
            "Succeeded" | "Failed" | "Cancelled"
        )
    });
    let moves = automatic(&c);
    let (_, _, phase, source, target) = moves.iter().find(|m| m.0 == name).cloned().unwrap();
    assert_eq!(
        phase,
        "Succeeded",
        "{}",
        c.kubectl_ok(&["get", "mig", &name, "-o", "yaml"])
    );
    assert_eq!(source, "host-1");
    assert!(target == "host-2" || target == "host-3", "{target}");
    let (host, report) = c.verify_vm("default", &vm);
    assert_eq!(host, target);
    assert!(
        matches!(report, VerifyReport::Intact { pages, .. } if pages > 0),
        "{report:?}"
    );
    // host-1 is still at 95%, yet within the interval no second VM leaves
    // it (watched for half the interval from when the first was seen, which
    // is after it was created).
    while first_seen.elapsed() < Duration::from_secs(INTERVAL_SECS / 2) {
        let moves = automatic(&c);
        assert_eq!(
            moves.len(),
            1,
            "a second automatic move within the interval: {moves:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let on_host_1 = VMS
        .iter()
        .filter(|v| c.vm_host("default", v).as_deref() == Some("host-1"))
        .count();
    assert_eq!(on_host_1, 2);
}
