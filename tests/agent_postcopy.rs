//! Post-copy through the relay, and post-copy recovery after the relay
//! breaks mid-stream (the guest must survive).

mod agent_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agent_support::{Pair, QEMU_TURN, console, guest_vm};
use ferry::agent::guest::{DirtyRate, GuestConfig};
use ferry::agent::migrate::{
    self, Action, Bandwidth, MigrationConfig, MigrationError, ProgressSample,
};
use ferry::agent::qmp::MigrationStatus;
use tokio_util::sync::CancellationToken;

fn config() -> MigrationConfig {
    MigrationConfig {
        sample_interval: Duration::from_millis(250),
        downtime_limit: Duration::from_millis(20),
        bandwidth: Bandwidth::Limit(24 << 20),
        postcopy: true,
        ..MigrationConfig::default()
    }
}

/// Pre-copy cannot converge (the guest dirties faster than the limit), so
/// the stand-in policy switches to post-copy from the second iteration.
fn switch_to_postcopy(s: &[ProgressSample]) -> Action {
    match s.last() {
        Some(last) if last.iteration >= 2 => Action::StartPostcopy,
        _ => Action::Continue,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_copy_through_the_relay_recovers_from_a_broken_stream() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    let config = config();
    let guest = GuestConfig {
        fill_mib: Some(48),
        rate: DirtyRate::MibPerSec(64),
    };
    let spec = guest_vm(pair.tmp.path(), "vm1", 64, &guest);
    let vm = pair.src.start(&spec, false).await.unwrap();
    pair.guard.watch(vm.pid());
    let before = console(&vm).await.status().await.unwrap();
    let target = migrate::prepare_target(&pair.dst, &spec, &config)
        .await
        .unwrap();
    pair.guard.watch(target.vm().pid());
    let m = pair.migration("pc1");
    pair.table
        .expect(m.clone(), "host-a", target.incoming_socket());
    let relay = pair
        .source_relay(&vm, &m, &pair.a, pair.relay.local_addr(), &config)
        .await;

    // Cut the stream once the guest runs on the target and pages are
    // still being pulled.
    let cut = AtomicBool::new(false);
    let table = pair.table.clone();
    let uid = m.uid.clone();
    let mut policy = switch_to_postcopy;
    let mut observe = |s: &ProgressSample| {
        if s.status == MigrationStatus::PostcopyActive && !cut.swap(true, Ordering::SeqCst) {
            table.remove(&uid);
        }
    };
    let cancel = CancellationToken::new();
    let err = tokio::time::timeout(
        Duration::from_secs(120),
        migrate::run_source(&vm, &relay, &config, &mut policy, &mut observe, &cancel),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        matches!(err, MigrationError::PostcopyPaused { .. }),
        "{err:?}"
    );
    assert!(
        vm.is_alive() && target.vm().is_alive(),
        "both halves wait for recovery"
    );

    // Recovery: the target listens anew, its relay expects the migration
    // again, and the source resumes through its relay.
    let socket = target.recover(Duration::from_secs(20)).await.unwrap();
    pair.table.expect(m.clone(), "host-a", socket);
    let done = tokio::time::timeout(
        Duration::from_secs(120),
        migrate::resume_source(
            &vm,
            &relay,
            &config,
            &mut |_: &[ProgressSample]| Action::Continue,
            &mut |_: &ProgressSample| {},
            &cancel,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(done.postcopy);
    target.wait_running(Duration::from_secs(30)).await.unwrap();
    let mut c = console(target.vm()).await;
    let after = c.status().await.unwrap();
    assert_eq!(after.pages, before.pages);
    assert!(after.writes > before.writes);
    assert!(
        c.verify().await.unwrap().is_intact(),
        "memory intact after recovery"
    );
    migrate::finish_source(&pair.src, &vm).await.unwrap();
}
