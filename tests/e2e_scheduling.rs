//! End-to-end: live migration with the scheduler choosing the target, under
//! each scheduling policy, checked against what the policy should choose.
//!
//! Three hosts with simulated CPU loads (the agents report the number in
//! `hosts/<host>/cpu-load`):
//!
//! ```text
//!  host-1  50%  mover (the VM that moves; always the source)
//!  host-2  10%  other (one VM)
//!  host-3  40%  empty
//! ```
//!
//! - `None`: most free memory → host-3 (host-2 holds a VM);
//! - `EvenlyDistributed`: lowest CPU → host-2;
//! - `PowerSaving`: highest CPU that still fits, empty hosts last → host-2;
//! - `VmEvenlyDistributed`: fewest VMs → host-3.
//!
//! After each move `mover` is sent back to host-1 by name.

mod e2e_support;

use std::time::Duration;

use e2e_support::{Cluster, memtest_vm};
use ferry::agent::guest::VerifyReport;

const TIMEOUT: Duration = Duration::from_secs(120);

fn placed_on(c: &Cluster, vm: &str) -> String {
    c.wait_for(&format!("{vm} Running"), TIMEOUT, || {
        c.jsonpath(&["get", "fvm", vm], "{.status.phase}") == "Running"
    });
    c.vm_host("default", vm).unwrap()
}

fn migrate(c: &Cluster, args: &[&str]) {
    let mut all = vec!["migrate", "mover", "--timeout", "120"];
    all.extend_from_slice(args);
    let out = c.ferry(&all);
    assert!(
        out.status.success(),
        "kubectl ferry {all:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_scheduler_chooses_the_target_each_policy_prescribes() {
    let c = Cluster::up(3);
    for (host, load) in [("host-1", 50), ("host-2", 10), ("host-3", 40)] {
        c.set_cpu_load(host, load);
    }
    for (host, load) in [("host-1", "50"), ("host-2", "10"), ("host-3", "40")] {
        c.wait_for(&format!("{host} to report {load}%"), TIMEOUT, || {
            c.jsonpath(&["get", "host", host], "{.status.cpuPercent}") == load
        });
    }
    // Under the default policy (None: most free memory, ties by name) the
    // first VM lands on host-1 and the second on host-2.
    c.apply(&memtest_vm("mover", "64Mi", 16));
    assert_eq!(placed_on(&c, "mover"), "host-1");
    c.apply(&memtest_vm("other", "64Mi", 16));
    assert_eq!(placed_on(&c, "other"), "host-2");

    for (policy, expected) in [
        ("None", "host-3"),
        ("EvenlyDistributed", "host-2"),
        ("PowerSaving", "host-2"),
        ("VmEvenlyDistributed", "host-3"),
    ] {
        c.patch_default_policy(&format!(
            r#"{{"spec":{{"scheduling":{{"policy":"{policy}"}}}}}}"#
        ));
        migrate(&c, &[]);
        let chosen = c.vm_host("default", "mover").unwrap();
        let explain = {
            let name = c.jsonpath(
                &["get", "mig", "--sort-by=.metadata.creationTimestamp"],
                "{.items[-1:].metadata.name}",
            );
            String::from_utf8_lossy(&c.ferry(&["explain", &name]).stdout).into_owned()
        };
        assert_eq!(chosen, expected, "policy {policy}:\n{explain}");
        let (_, report) = c.verify_vm("default", "mover");
        assert!(matches!(report, VerifyReport::Intact { .. }), "{report:?}");
        migrate(&c, &["--to", "host-1"]);
        assert_eq!(c.vm_host("default", "mover").as_deref(), Some("host-1"));
    }
}
