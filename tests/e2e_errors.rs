//! End-to-end: `ferry up` refuses clearly when QEMU is missing, when its
//! port is taken and when its data directory belongs to a running instance.

mod e2e_support;

use std::process::Command;

use e2e_support::{Cluster, free_port};

fn ferry_up(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("up")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_qemu_is_named_with_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let (ok, err) = ferry_up(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--qemu",
        "/nonexistent/qemu-system-x86_64",
    ]);
    assert!(!ok);
    assert!(
        err.contains("cannot be run") && err.contains("apt-get install qemu-system-x86"),
        "{err}"
    );
}

#[test]
fn a_taken_port_and_a_data_dir_in_use_are_refused() {
    let c = Cluster::up(1);
    let listen = format!("127.0.0.1:{}", c.port);

    let other = tempfile::tempdir().unwrap();
    let (ok, err) = ferry_up(&[
        "--data-dir",
        other.path().to_str().unwrap(),
        "--listen",
        &listen,
    ]);
    assert!(!ok);
    assert!(err.contains(&format!("cannot listen on {listen}")), "{err}");

    let (ok, err) = ferry_up(&[
        "--data-dir",
        c.data_dir().to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    assert!(!ok);
    assert!(err.contains("belongs to a running `ferry up`"), "{err}");
    // The refused instance touched nothing: the cluster still answers.
    assert_eq!(
        c.jsonpath(&["get", "hosts"], "{.items[*].metadata.name}"),
        "host-1"
    );
}
