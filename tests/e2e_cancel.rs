//! End-to-end: cancelling a live migration mid-transfer leaves the VM
//! running on its source with its memory intact, and nothing on the target.
//! The default policy caps migration bandwidth at 4 MiB/s so the transfer
//! of a 64 MiB guest lasts long enough to be cancelled.

mod e2e_support;

use std::time::Duration;

use e2e_support::{Cluster, memtest_vm};
use ferry::agent::guest::VerifyReport;

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn a_live_migration_cancelled_mid_transfer_leaves_the_vm_on_its_source() {
    let c = Cluster::up(2);
    c.patch_default_policy(r#"{"spec":{"bandwidth":{"mode":"Custom","limit":"4Mi"}}}"#);
    c.apply(&memtest_vm("stayer", "64Mi", 48));
    c.wait_for("stayer Running", TIMEOUT, || {
        c.jsonpath(&["get", "fvm", "stayer"], "{.status.phase}") == "Running"
    });
    let source = c.vm_host("default", "stayer").unwrap();
    let target = if source == "host-1" {
        "host-2"
    } else {
        "host-1"
    };

    let out = c.ferry(&["migrate", "stayer", "--to", target, "--no-wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = c.jsonpath(&["get", "mig"], "{.items[0].metadata.name}");
    c.wait_for("the transfer to start", TIMEOUT, || {
        c.jsonpath(&["get", "mig", &name], "{.status.phase}") == "Running"
    });
    let out = c.ferry(&["cancel", &name, "--timeout", "120"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Cancelled"), "{text}");
    assert_eq!(
        c.jsonpath(&["get", "mig", &name], "{.status.phase}"),
        "Cancelled"
    );
    assert_eq!(
        c.vm_host("default", "stayer").as_deref(),
        Some(source.as_str())
    );
    c.wait_for("the target's QEMU to go", TIMEOUT, || {
        c.host_qemu_pids(target).is_empty()
    });
    assert_eq!(c.host_qemu_pids(&source).len(), 1);
    let (host, report) = c.verify_vm("default", "stayer");
    assert_eq!(host, source);
    assert!(matches!(report, VerifyReport::Intact { .. }), "{report:?}");
}
