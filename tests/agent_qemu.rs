//! QEMU processes and QMP against a real QEMU.

mod agent_support;

use std::time::Duration;

use agent_support::{KillGuard, blank_vm, state_dir, tempdir};
use ferry::agent::qemu::{QemuError, QemuProcess, pid_alive};
use ferry::agent::qmp::{self, QmpError, RunState};
use ferry::agent::vms::{AdoptOutcome, VmManager};

#[tokio::test]
async fn qmp_reports_status_version_and_events() {
    let tmp = tempdir();
    let guard = KillGuard::default();
    let mgr = VmManager::new(state_dir(tmp.path(), "h"));
    let spec = blank_vm(tmp.path(), "vm1", 64, 0);
    let vm = mgr.start(&spec, false).await.unwrap();
    guard.watch(vm.pid());
    let q = vm.qmp();
    let greeting = q.greeting().version.qemu;
    assert!(
        (greeting.major, greeting.minor) >= ferry::agent::qemu::MIN_VERSION,
        "QEMU {greeting} is older than the oldest release Ferry runs"
    );
    let v = q.execute(&qmp::QueryVersion {}).await.unwrap();
    assert_eq!(v, q.greeting().version);
    let binary = ferry::agent::qemu::binary_version("qemu-system-x86_64")
        .await
        .unwrap();
    assert_eq!(binary, v.qemu.to_string());
    let st = q.execute(&qmp::QueryStatus {}).await.unwrap();
    assert!(st.running);
    assert_eq!(st.status, RunState::Running);

    let mut events = q.events();
    q.execute(&qmp::Stop {}).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.name, "STOP");
    let st = q.execute(&qmp::QueryStatus {}).await.unwrap();
    assert_eq!(st.status, RunState::Paused);
    q.execute(&qmp::Cont {}).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.name, "RESUME");

    // A QEMU error comes back typed, with QEMU's class and description.
    let err = q
        .execute(&qmp::MigrateIncoming {
            uri: "unix:/nonexistent/x".into(),
        })
        .await
        .unwrap_err();
    match err {
        QmpError::Qemu {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "migrate-incoming");
            assert_eq!(class, "GenericError");
            assert!(!desc.is_empty());
        }
        other => panic!("expected a QEMU error, got {other:?}"),
    }

    mgr.stop("vm1", Duration::from_secs(5)).await.unwrap();
    assert!(!pid_alive(vm.pid()));
    assert!(vm.qmp().is_closed());
    let err = vm.qmp().execute(&qmp::QueryStatus {}).await.unwrap_err();
    assert!(matches!(err, QmpError::Disconnected { .. }), "{err:?}");
}

#[tokio::test]
async fn a_restarted_agent_readopts_running_qemu() {
    let tmp = tempdir();
    let guard = KillGuard::default();
    let dir = state_dir(tmp.path(), "h");
    let spec = blank_vm(tmp.path(), "vm1", 64, 0);
    let pid = {
        // The first agent starts the VM, then goes away (its manager, QMP
        // session and runtime with it).
        let rt = tokio::runtime::Runtime::new().unwrap();
        let d = dir.clone();
        let s = spec.clone();
        let pid = std::thread::spawn(move || {
            rt.block_on(async move {
                let mgr = VmManager::new(d);
                mgr.start(&s, false).await.unwrap().pid()
            })
        })
        .join()
        .unwrap();
        guard.watch(pid);
        pid
    };
    assert!(pid_alive(pid), "the VM must survive its agent");
    // It runs in its own session: signals to the agent's process group or
    // session (Ctrl-C, a service manager stopping the agent) miss it.
    let own = nix::unistd::getsid(None).unwrap();
    let qemu = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
    assert_ne!(own, qemu);

    let mgr = VmManager::new(dir.clone());
    let found = mgr.adopt_all().await.unwrap();
    assert_eq!(found.len(), 1);
    let AdoptOutcome::Adopted(vm) = &found[0] else {
        panic!("expected adoption, got {:?}", found[0]);
    };
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.spec(), &spec);
    assert!(
        vm.qmp()
            .execute(&qmp::QueryStatus {})
            .await
            .unwrap()
            .running
    );

    // After the VM is stopped, a further restart finds nothing to adopt.
    mgr.stop("vm1", Duration::from_secs(5)).await.unwrap();
    let mgr2 = VmManager::new(dir);
    let found = mgr2.adopt_all().await.unwrap();
    assert!(
        matches!(
            &found[..],
            [AdoptOutcome::Gone {
                error: QemuError::StateDir { .. },
                ..
            }]
        ),
        "{found:?}"
    );
    mgr2.remove_state("vm1").await.unwrap();
    assert!(mgr2.adopt_all().await.unwrap().is_empty());
}

#[tokio::test]
async fn startup_failure_reports_qemus_message() {
    let tmp = tempdir();
    let mut spec = blank_vm(tmp.path(), "vm1", 64, 0);
    spec.extra_args = vec!["-device".into(), "no-such-device".into()];
    let err = QemuProcess::spawn(
        "qemu-system-x86_64",
        &state_dir(tmp.path(), "h"),
        &spec,
        false,
    )
    .await
    .unwrap_err();
    match err {
        QemuError::StartupExit { log, .. } => assert!(log.contains("no-such-device"), "{log}"),
        other => panic!("expected StartupExit, got {other:?}"),
    }
}
