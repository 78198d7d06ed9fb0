//! The memtest guest in a real QEMU: fill, verify, deliberate corruption,
//! paced dirtying and exit codes.

mod guest_support;

use std::time::Duration;

use ferry::agent::guest::{
    DirtyRate, FATAL_EXIT_CODE, FAULT_EXIT_CODE, GuestConfig, VerifyReport, qemu_exit_status,
};
use guest_support::Rig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_fills_the_requested_memory_and_verifies_intact() {
    let rig = Rig::new();
    let qemu = rig.spawn(
        "vm",
        &GuestConfig {
            fill_mib: Some(64),
            rate: DirtyRate::Idle,
        },
        &[],
    );
    let mut console = qemu.console().await;

    let status = console.status().await.unwrap();
    assert_eq!(status.pages, 64 * 256, "64 MiB of 4 KiB pages");
    assert_eq!(status.writes, 0, "an idle guest rewrites nothing");
    assert_eq!(status.generation, 1);
    assert_eq!(status.rate, DirtyRate::Idle);

    let report = console.verify().await.unwrap();
    assert_eq!(
        report,
        VerifyReport::Intact {
            pages: 64 * 256,
            writes: 0
        }
    );
    console.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupting_a_page_makes_verify_fail_and_exit_reaches_qemu() {
    let rig = Rig::new();
    // Default fill: most of the 128 MiB, dirtying from boot on (`rate=` in -append).
    let mut qemu = rig.spawn(
        "vm",
        &GuestConfig {
            fill_mib: None,
            rate: DirtyRate::MibPerSec(20),
        },
        &[],
    );
    let mut console = qemu.console().await;
    let status = console.status().await.unwrap();
    assert!(
        status.pages > 100 * 256,
        "default fill leaves only headroom: {status:?}"
    );
    assert_eq!(status.rate, DirtyRate::MibPerSec(20));
    assert!(console.verify().await.unwrap().is_intact());

    let page = console.corrupt(None).await.unwrap();
    assert_eq!(page, status.pages / 2);
    // The dirtier keeps running but leaves the corrupted page alone.
    let report = console.verify().await.unwrap();
    assert_eq!(
        report,
        VerifyReport::Damaged {
            first: Some(page),
            count: 1,
            pages: status.pages,
            table_ok: true
        }
    );

    let other = console.corrupt(Some(7)).await.unwrap();
    assert_eq!(other, 7);
    match console.verify().await.unwrap() {
        VerifyReport::Damaged { first, .. } => {
            assert_eq!(first, Some(7), "the lowest damaged page comes first")
        }
        intact => panic!("verify missed a corruption: {intact:?}"),
    }

    console.exit(3).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), qemu.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        exit.code(),
        Some(qemu_exit_status(3)),
        "isa-debug-exit carries the code"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_dirties_at_the_set_rate_and_stays_verifiable() {
    let rig = Rig::new();
    let qemu = rig.spawn(
        "vm",
        &GuestConfig {
            fill_mib: Some(64),
            rate: DirtyRate::Idle,
        },
        &[],
    );
    let mut console = qemu.console().await;

    assert_eq!(
        console.set_rate(40).await.unwrap(),
        DirtyRate::MibPerSec(40)
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = console.status().await.unwrap();
    assert_eq!(status.rate, DirtyRate::MibPerSec(40));
    assert!(status.writes > 0, "pages were rewritten: {status:?}");
    // Sanity only, not timing: the pacer never runs far ahead of its rate.
    assert!(
        status.dirty_kib_per_s > 0 && status.dirty_kib_per_s <= 2 * 40 * 1024,
        "measured rate out of any reason: {status:?}"
    );
    let report = console.verify().await.unwrap();
    assert!(report.is_intact(), "{report:?}");

    // Idle stops the rewriting entirely.
    assert_eq!(console.set_rate(0).await.unwrap(), DirtyRate::Idle);
    let before = console.status().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = console.status().await.unwrap();
    assert_eq!(
        before.writes, after.writes,
        "an idle guest rewrites nothing"
    );
    assert!(after.ticks > before.ticks, "the PIT keeps ticking");

    // Unthrottled: as fast as the vCPU goes, generations advance.
    assert_eq!(
        console.set_rate(DirtyRate::Unthrottled).await.unwrap(),
        DirtyRate::Unthrottled
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fast = console.status().await.unwrap();
    assert!(fast.writes > after.writes, "{fast:?}");
    assert!(console.verify().await.unwrap().is_intact());
    assert!(
        console.set_rate(2_000_000).await.is_err(),
        "rates above the guest's limit are refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_exception_is_reported_and_ends_qemu() {
    let rig = Rig::new();
    let mut qemu = rig.spawn(
        "vm",
        &GuestConfig {
            fill_mib: Some(8),
            rate: DirtyRate::Idle,
        },
        &[],
    );
    let mut console = qemu.console().await;
    let crash = console.fault().await.unwrap();
    assert!(
        crash.to_string().contains("FAULT vector=6"),
        "invalid opcode reported: {crash}"
    );
    let exit = tokio::time::timeout(Duration::from_secs(30), qemu.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(qemu_exit_status(FAULT_EXIT_CODE)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_larger_than_ram_stops_the_guest_with_a_fatal_exit() {
    let rig = Rig::new();
    let mut qemu = rig.spawn(
        "vm",
        &GuestConfig {
            fill_mib: Some(512),
            rate: DirtyRate::Idle,
        },
        &[],
    );
    let exit = tokio::time::timeout(Duration::from_secs(60), qemu.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        exit.code(),
        Some(qemu_exit_status(FATAL_EXIT_CODE)),
        "log: {}",
        qemu.log_text()
    );
}
