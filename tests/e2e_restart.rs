//! End-to-end: `ferry up` starts again an agent that dies (SIGKILL, its
//! watchdog and QEMUs left running, as after a crash), and the new agent
//! adopts the VMs it finds: the same QEMU process, the guest never
//! rebooted, its memory intact, the host never fenced.

mod e2e_support;

use std::time::Duration;

use e2e_support::{Cluster, memtest_vm};
use ferry::agent::guest::{GuestConsole, VerifyReport};
use ferry::cli::up::layout::Layout;

const TIMEOUT: Duration = Duration::from_secs(120);

/// The guest's timer ticks (they only grow while the same guest runs).
fn guest_ticks(c: &Cluster, host: &str, vm: &str) -> u64 {
    let socket = c.serial_socket(host, "default", vm);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut console = GuestConsole::connect_timeout(&socket, Duration::from_secs(60))
                .await
                .unwrap();
            console.wait_ready(Duration::from_secs(60)).await.unwrap();
            console.status().await.unwrap().ticks
        })
}

/// `text` without terminal colour codes (`ESC [ … m`).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn agent_pid(c: &Cluster, host: &str) -> Option<i32> {
    std::fs::read_to_string(Layout::at(c.data_dir()).host_dir(host).join("agent.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn a_killed_agent_is_restarted_by_ferry_up_and_adopts_its_running_vm() {
    let c = Cluster::up(2);
    c.apply(&memtest_vm("keeper", "64Mi", 16));
    c.wait_for("keeper Running", TIMEOUT, || {
        c.jsonpath(&["get", "fvm", "keeper"], "{.status.phase}") == "Running"
    });
    let host = c.vm_host("default", "keeper").unwrap();
    let qemus = c.host_qemu_pids(&host);
    assert_eq!(qemus.len(), 1, "{qemus:?}");
    let ticks = guest_ticks(&c, &host, "keeper");
    let old_agent = agent_pid(&c, &host).unwrap();

    c.kill_agent(&host);
    c.wait_for("ferry up restarts the agent", TIMEOUT, || {
        agent_pid(&c, &host).is_some_and(|p| p != old_agent && ferry::agent::qemu::pid_alive(p))
    });
    let log = Layout::at(c.data_dir()).host_dir(&host).join("agent.log");
    c.wait_for("the new agent adopts the QEMU", TIMEOUT, || {
        std::fs::read_to_string(&log).is_ok_and(|text| {
            plain(&text).lines().any(|l| {
                l.contains("adopted running QEMU") && l.contains(&format!("pid={}", qemus[0]))
            })
        })
    });
    // It serves the host again: the Lease moves on under the new agent.
    let renewed = c.jsonpath(
        &["get", "lease", "-n", "ferry-system", &host],
        "{.spec.renewTime}",
    );
    c.wait_for("the new agent renews the host's Lease", TIMEOUT, || {
        c.jsonpath(
            &["get", "lease", "-n", "ferry-system", &host],
            "{.spec.renewTime}",
        ) != renewed
    });
    assert_eq!(
        c.jsonpath(&["get", "host", &host], "{.status.phase}"),
        "Active"
    );
    assert_eq!(c.host_qemu_pids(&host), qemus, "the same QEMU runs the VM");
    assert_eq!(
        c.vm_host("default", "keeper").as_deref(),
        Some(host.as_str())
    );
    assert_eq!(
        c.jsonpath(&["get", "fvm", "keeper"], "{.status.phase}"),
        "Running"
    );
    let later = guest_ticks(&c, &host, "keeper");
    assert!(
        later > ticks,
        "the guest was never rebooted: {ticks} then {later}"
    );
    let (_, report) = c.verify_vm("default", "keeper");
    assert!(matches!(report, VerifyReport::Intact { .. }), "{report:?}");
    let up_log = c.log();
    assert!(
        up_log.contains(&format!("ferry up: restarted agent {host}")),
        "{up_log}"
    );
    // No evacuation, no second QEMU anywhere.
    assert_eq!(c.qemu_pids(), qemus);
    assert_eq!(c.jsonpath(&["get", "mig"], "{.items[*].metadata.name}"), "");
}
