//! Live migrations through the agents' relays with real QEMU: source QEMU →
//! source relay → mutual TLS → target relay → target QEMU, the memtest
//! guest proving memory arrived intact.

mod agent_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent_support::{Pair, QEMU_TURN, console, guest_vm};
use ferry::agent::guest::{DirtyRate, GuestConfig};
use ferry::agent::migrate::{
    self, Action, Bandwidth, MigrationConfig, MigrationError, ProgressSample, TargetHandle,
};
use ferry::agent::qemu::QemuProcess;
use ferry::agent::qmp::{self, RunState};
use ferry::agent::relay::{RefusalReason, RelayError, SourceRelay};
use tokio_util::sync::CancellationToken;

/// Source VM plus prepared target for one migration.
async fn setup(
    pair: &Pair,
    name: &str,
    memory_mib: u32,
    guest: GuestConfig,
    config: &MigrationConfig,
) -> (Arc<QemuProcess>, TargetHandle) {
    let spec = guest_vm(pair.tmp.path(), name, memory_mib, &guest);
    let vm = pair.src.start(&spec, false).await.unwrap();
    pair.guard.watch(vm.pid());
    // Migrate only once the guest has filled its memory.
    drop(console(&vm).await);
    let target = migrate::prepare_target(&pair.dst, &spec, config)
        .await
        .unwrap();
    pair.guard.watch(target.vm().pid());
    (vm, target)
}

async fn run(
    vm: &QemuProcess,
    relay: &SourceRelay,
    config: &MigrationConfig,
    mut policy: impl FnMut(&[ProgressSample]) -> Action + Send,
    mut observe: impl FnMut(&ProgressSample) + Send,
    cancel: &CancellationToken,
) -> Result<migrate::SourceCompleted, MigrationError> {
    tokio::time::timeout(
        Duration::from_secs(180),
        migrate::run_source(vm, relay, config, &mut policy, &mut observe, cancel),
    )
    .await
    .expect("the migration ends within 180 s")
}

async fn assert_source_runs_intact(vm: &QemuProcess) {
    let st = vm.qmp().execute(&qmp::QueryStatus {}).await.unwrap();
    assert!(st.running, "the source VM keeps running: {st:?}");
    let mut c = console(vm).await;
    assert!(c.verify().await.unwrap().is_intact());
}

fn fast(config: MigrationConfig) -> MigrationConfig {
    MigrationConfig {
        sample_interval: Duration::from_millis(250),
        downtime_limit: Duration::from_millis(50),
        ..config
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_over_mtls_moves_memory_intact() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    let config = fast(MigrationConfig::default());
    let guest = GuestConfig {
        fill_mib: None,
        rate: DirtyRate::MibPerSec(16),
    };
    let (vm, target) = setup(&pair, "vm1", 128, guest, &config).await;
    let mut c = console(&vm).await;
    let before = c.status().await.unwrap();
    drop(c);

    let m = pair.migration("m1");
    let delivery = pair
        .table
        .expect(m.clone(), "host-a", target.incoming_socket());
    let relay = pair
        .source_relay(&vm, &m, &pair.a, pair.relay.local_addr(), &config)
        .await;
    let mut seen = Vec::new();
    let done = run(
        &vm,
        &relay,
        &config,
        |_| Action::Continue,
        |s| seen.push(s.status.clone()),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    target.wait_running(Duration::from_secs(30)).await.unwrap();
    migrate::finish_source(&pair.src, &vm).await.unwrap();
    assert!(!vm.is_alive(), "the source QEMU is gone after switchover");

    // The guest on the target kept its memory and its state.
    let mut c = console(target.vm()).await;
    let after = c.status().await.unwrap();
    assert_eq!(after.pages, before.pages);
    assert!(after.writes > before.writes);
    assert!(c.verify().await.unwrap().is_intact());

    let pages_bytes = u64::from(before.pages) * 4096;
    assert!(done.relay_forward_bytes > pages_bytes, "{done:?}");
    // The target relay counts a chunk once QEMU has taken it, so the guest
    // may run a moment before the last chunk is counted.
    let deadline = Instant::now() + Duration::from_secs(5);
    while delivery.counters.snapshot().forward_bytes != done.relay_forward_bytes
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        delivery.counters.snapshot().forward_bytes,
        done.relay_forward_bytes
    );
    assert!(done.samples.last().unwrap().status == qmp::MigrationStatus::Completed);
    assert!(!seen.is_empty());
    assert_eq!(pair.relay.stats().refused_total(), 0);
    assert!(pair.relay.stats().accepted() >= 1);
    eprintln!(
        "downtime {:?}, total {:?}, relay {} bytes",
        done.downtime, done.total_time, done.relay_forward_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_channels_all_go_through_the_relay() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    let config = fast(MigrationConfig {
        multifd_channels: Some(2),
        ..MigrationConfig::default()
    });
    let (vm, target) = setup(&pair, "vm1", 128, GuestConfig::default(), &config).await;
    let m = pair.migration("m2");
    let delivery = pair
        .table
        .expect(m.clone(), "host-a", target.incoming_socket());
    let relay = pair
        .source_relay(&vm, &m, &pair.a, pair.relay.local_addr(), &config)
        .await;
    run(
        &vm,
        &relay,
        &config,
        |_| Action::Continue,
        |_| {},
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    target.wait_running(Duration::from_secs(30)).await.unwrap();
    // The main channel and one per multifd channel, all relayed.
    assert!(
        relay.counters().snapshot().channels_opened >= 3,
        "{:?}",
        relay.counters().snapshot()
    );
    assert_eq!(
        delivery.counters.snapshot().channels_opened,
        relay.counters().snapshot().channels_opened
    );
    let mut c = console(target.vm()).await;
    assert!(c.verify().await.unwrap().is_intact());
    migrate::finish_source(&pair.src, &vm).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_transfer_keeps_the_source_running() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    let config = fast(MigrationConfig {
        bandwidth: Bandwidth::Limit(8 << 20),
        ..MigrationConfig::default()
    });
    let (vm, target) = setup(&pair, "vm1", 128, GuestConfig::default(), &config).await;
    let m = pair.migration("m3");
    pair.table
        .expect(m.clone(), "host-a", target.incoming_socket());
    let relay = pair
        .source_relay(&vm, &m, &pair.a, pair.relay.local_addr(), &config)
        .await;
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let err = run(
        &vm,
        &relay,
        &config,
        |_| Action::Continue,
        move |s| {
            if s.transferred_bytes > 4 << 20 {
                c2.cancel();
            }
        },
        &cancel,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, MigrationError::Cancelled), "{err:?}");
    assert_source_runs_intact(&vm).await;
    // The target QEMU gives up by itself; the agent then cleans up.
    assert!(
        target.vm().wait_exit(Duration::from_secs(20)).await,
        "target exits"
    );
    target.abort(&pair.dst).await.unwrap();
    pair.src.stop("vm1", Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_transfer_leaves_the_source_running() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    let config = fast(MigrationConfig {
        bandwidth: Bandwidth::Limit(8 << 20),
        ..MigrationConfig::default()
    });
    let (vm, target) = setup(&pair, "vm1", 128, GuestConfig::default(), &config).await;
    let m = pair.migration("m4");
    pair.table
        .expect(m.clone(), "host-a", target.incoming_socket());
    let relay = pair
        .source_relay(&vm, &m, &pair.a, pair.relay.local_addr(), &config)
        .await;
    let target_relay = &pair.relay;
    let err = run(
        &vm,
        &relay,
        &config,
        |_| Action::Continue,
        |s| {
            if s.transferred_bytes > 4 << 20 {
                target_relay.shutdown();
            }
        },
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    // QEMU sees the broken stream; the relay's report says where it broke.
    assert!(
        matches!(
            err,
            MigrationError::Relay(_) | MigrationError::Failed { .. }
        ),
        "{err:?}"
    );
    assert_source_runs_intact(&vm).await;
    assert!(
        target.vm().wait_exit(Duration::from_secs(20)).await,
        "target exits"
    );
    target.abort(&pair.dst).await.unwrap();
    pair.src.stop("vm1", Duration::from_secs(5)).await.unwrap();
}

/// A TCP hop that can freeze: connections stay open but nothing moves, as
/// when a link is cut without a reset.
async fn freezable_proxy(
    to: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((a, _)) = l.accept().await {
            let b = tokio::net::TcpStream::connect(to).await.unwrap();
            let (ar, aw) = a.into_split();
            let (br, bw) = b.into_split();
            tokio::spawn(copy_unless_frozen(ar, bw, frozen.clone()));
            tokio::spawn(copy_unless_frozen(br, aw, frozen.clone()));
        }
    });
    addr
}

async fn copy_unless_frozen(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_link_is_cancelled_by_the_watchdog() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    let config = fast(MigrationConfig {
        bandwidth: Bandwidth::Limit(8 << 20),
        stall_timeout: Duration::from_secs(3),
        ..MigrationConfig::default()
    });
    let (vm, target) = setup(&pair, "vm1", 128, GuestConfig::default(), &config).await;
    let m = pair.migration("m5");
    pair.table
        .expect(m.clone(), "host-a", target.incoming_socket());
    let frozen = Arc::new(AtomicBool::new(false));
    let hop = freezable_proxy(pair.relay.local_addr(), frozen.clone()).await;
    let relay = pair.source_relay(&vm, &m, &pair.a, hop, &config).await;
    let f = frozen.clone();
    let err = run(
        &vm,
        &relay,
        &config,
        |_| Action::Continue,
        move |s| {
            if s.transferred_bytes > 4 << 20 {
                f.store(true, Ordering::SeqCst);
            }
        },
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    match &err {
        MigrationError::Stalled { stalled_for, .. } => {
            assert!(*stalled_for >= config.stall_timeout)
        }
        other => panic!("expected a stall, got {other:?}"),
    }
    assert_eq!(err.reason(), "Stalled");
    assert_source_runs_intact(&vm).await;
    frozen.store(false, Ordering::SeqCst);
    target.abort(&pair.dst).await.unwrap();
    pair.src.stop("vm1", Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_limit_holds_for_the_whole_migration() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    let limit: u64 = 16 << 20;
    let config = fast(MigrationConfig {
        bandwidth: Bandwidth::Limit(limit),
        multifd_channels: Some(2),
        ..MigrationConfig::default()
    });
    let guest = GuestConfig {
        fill_mib: Some(40),
        rate: DirtyRate::Idle,
    };
    let (vm, target) = setup(&pair, "vm1", 64, guest, &config).await;
    let m = pair.migration("m6");
    pair.table
        .expect(m.clone(), "host-a", target.incoming_socket());
    let relay = pair
        .source_relay(&vm, &m, &pair.a, pair.relay.local_addr(), &config)
        .await;
    let started = Instant::now();
    let done = run(
        &vm,
        &relay,
        &config,
        |_| Action::Continue,
        |_| {},
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let rate = done.relay_forward_bytes as f64 / secs;
    eprintln!(
        "limit {} MiB/s, measured {:.1} MiB/s over {secs:.1} s",
        limit >> 20,
        rate / (1 << 20) as f64
    );
    // A limiter can only slow things down: the upper bound is robust on a
    // slow machine (one burst of slack).
    assert!(
        rate <= limit as f64 * 1.25,
        "rate {rate} over limit {limit}"
    );
    assert!(done.relay_forward_bytes > 40 << 20);
    target.wait_running(Duration::from_secs(30)).await.unwrap();
    let mut c = console(target.vm()).await;
    assert!(c.verify().await.unwrap().is_intact());
    migrate::finish_source(&pair.src, &vm).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_can_pause_a_guest_that_dirties_too_fast() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    let config = fast(MigrationConfig {
        bandwidth: Bandwidth::Limit(32 << 20),
        ..MigrationConfig::default()
    });
    let guest = GuestConfig {
        fill_mib: Some(32),
        rate: DirtyRate::MibPerSec(128),
    };
    let (vm, target) = setup(&pair, "vm1", 64, guest, &config).await;
    let m = pair.migration("m7");
    pair.table
        .expect(m.clone(), "host-a", target.incoming_socket());
    let relay = pair
        .source_relay(&vm, &m, &pair.a, pair.relay.local_addr(), &config)
        .await;
    // A stand-in for the convergence decision: pause from iteration 3 on.
    let policy = |s: &[ProgressSample]| match s.last() {
        Some(last) if last.iteration >= 3 => Action::PauseGuest,
        _ => Action::Continue,
    };
    let done = run(
        &vm,
        &relay,
        &config,
        policy,
        |_| {},
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(done.paused_guest);
    // The guest arrives paused and the target half resumes it.
    target.wait_running(Duration::from_secs(30)).await.unwrap();
    let st = target
        .vm()
        .qmp()
        .execute(&qmp::QueryStatus {})
        .await
        .unwrap();
    assert_eq!(st.status, RunState::Running);
    let mut c = console(target.vm()).await;
    assert!(c.verify().await.unwrap().is_intact());
    migrate::finish_source(&pair.src, &vm).await.unwrap();
}

async fn refused_as(
    pair: &Pair,
    identity: &ferry::agent::pki::HostIdentity,
    name: &str,
) -> MigrationError {
    let config = fast(MigrationConfig::default());
    let spec = agent_support::guest_vm(pair.tmp.path(), name, 64, &GuestConfig::default());
    let vm = pair.src.start(&spec, false).await.unwrap();
    pair.guard.watch(vm.pid());
    let m = pair.migration(name);
    // The target expects this migration from host-a only.
    pair.table
        .expect(m.clone(), "host-a", pair.tmp.path().join("never.sock"));
    let relay = pair
        .source_relay(&vm, &m, identity, pair.relay.local_addr(), &config)
        .await;
    let err = run(
        &vm,
        &relay,
        &config,
        |_| Action::Continue,
        |_| {},
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert_source_runs_intact(&vm).await;
    pair.src.stop(name, Duration::from_secs(5)).await.unwrap();
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    // Same host name, but issued by a CA the cluster does not trust.
    let rogue = ferry::agent::pki::ClusterCa::generate("rogue")
        .unwrap()
        .issue_host("host-a")
        .unwrap();
    let err = refused_as(&pair, &rogue, "vm-rogue").await;
    match &err {
        MigrationError::Relay(e) => assert!(matches!(**e, RelayError::Tls(_)), "{e:?}"),
        other => panic!("expected a TLS failure, got {other:?}"),
    }
    let stats = pair.relay.stats();
    assert!(stats.refusals()[&RefusalReason::TlsHandshakeFailed] >= 1);
    assert_eq!(stats.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_of_a_third_host_is_refused() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    let c = pair.ca.issue_host("host-c").unwrap();
    let err = refused_as(&pair, &c, "vm-third").await;
    match &err {
        MigrationError::Relay(e) => match &**e {
            RelayError::Refused { reason, message } => {
                assert_eq!(*reason, RefusalReason::WrongSourceHost);
                assert!(message.contains("host-c"), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        },
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(err.reason(), "WrongSourceHost");
    let refusals = pair.table.refusals(&pair.migration("vm-third").uid);
    assert_eq!(refusals[0].reason, RefusalReason::WrongSourceHost);
    assert!(pair.relay.stats().refusals()[&RefusalReason::WrongSourceHost] >= 1);
    assert_eq!(pair.relay.stats().accepted(), 0);
}
