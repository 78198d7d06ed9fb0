//! The switchover as the segment sees it. When the source's guest stops for
//! the switchover, the source agent says so on the migration's control
//! channel and the target agent announces the guest from its tap at once,
//! so that the frames clients send during the pause wait in the target's
//! tap for the guest instead of dying on the stopped source. Root only.
//!
//! The source is held at the switchover (QEMU's `pause-before-switchover`:
//! the guest stopped, its last state not sent yet) so that what the segment
//! does in the pause can be looked at without racing it:
//!
//! ```text
//!                      guest stopped ─── hold (pings sent) ─── migrate-continue ── guest runs on b
//!  control channel:    switch: MAC → b's port    every ping of the hold answered once it runs
//!  none (as a target   switch: MAC → a's port    every ping of the hold lost
//!  of an earlier release)
//! ```
//!
//! The second migration is the first without the control channel: it shows
//! what the first one catches.

mod net_support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ferry::agent::migrate::{Action, MigrationConfig, ProgressSample, finish_source, run_source};
use ferry::agent::net;
use ferry::agent::pki::ClusterCa;
use ferry::agent::qemu::QemuProcess;
use ferry::agent::qmp::{self, MigrationStatus};
use net_support::hosts::{Host, KillOnDrop, in_host_ns, spec_in};
use net_support::outage::{Pinger, migration_link};
use net_support::{CounterClient, GUEST_IP, MAC, guest, scratch, segment, switch_port_of};
use tokio_util::sync::CancellationToken;

/// How often the client pings the guest.
const PING_EVERY: Duration = Duration::from_millis(10);
/// How long the source is held stopped at the switchover.
const HOLD: Duration = Duration::from_millis(600);

/// `migrate-continue`: lets a migration held by `pause-before-switchover`
/// go on.
#[derive(serde::Serialize)]
struct MigrateContinue {
    state: &'static str,
}

impl qmp::Command for MigrateContinue {
    const NAME: &'static str = "migrate-continue";
    type Response = qmp::Empty;
}

/// What the segment did while the source was held.
struct Held {
    /// The switch's port for the VM's MAC once the hold had lasted `HOLD`.
    port: Option<String>,
    /// Pings sent during the hold, and those never answered.
    sent: usize,
    lost: Vec<u16>,
}

/// The switch port that leads to host `name` (`h<i>` by segment order).
fn port_of(name: &str) -> String {
    format!("h{}", if name == "a" { 0 } else { 1 })
}

#[allow(clippy::too_many_arguments)]
async fn migrate_held(
    n: usize,
    from: &Host,
    to: &Host,
    vm: &QemuProcess,
    control: bool,
    seg: &net::Segment,
    pinger: &Pinger,
    kill: &KillOnDrop,
) -> (Held, std::sync::Arc<QemuProcess>) {
    let g = guest();
    let spec = spec_in(&to.ns, &g).await.unwrap();
    let config = MigrationConfig {
        downtime_limit: Duration::from_millis(20),
        stall_timeout: Duration::from_secs(60),
        ..MigrationConfig::default()
    };
    let target = to.prepare_target(&spec, &config).await.unwrap();
    kill.add(target.vm().pid());
    let m = to.expect(from, "held", n, &target, control).unwrap();
    vm.qmp()
        .execute(&qmp::MigrateSetCapabilities {
            capabilities: vec![qmp::CapabilityState {
                capability: "pause-before-switchover".into(),
                state: true,
            }],
        })
        .await
        .unwrap();
    let relay = from.source_relay(to, &m, vm, &config).await.unwrap();
    let mut policy = |_: &[ProgressSample]| Action::Continue;
    let mut observer = |_: &ProgressSample| {};
    let cancel = CancellationToken::new();
    let source = run_source(vm, &relay, &config, &mut policy, &mut observer, &cancel);
    let hold = async {
        let q = vm.qmp();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let info = q.execute(&qmp::QueryMigrate {}).await.unwrap();
            if info.status == Some(MigrationStatus::PreSwitchover) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the migration never reached the switchover: {:?}",
                info.status
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let held_at = Instant::now();
        tokio::time::sleep(HOLD).await;
        let port = switch_port_of(seg, MAC);
        let released_at = Instant::now();
        q.execute(&MigrateContinue {
            state: "pre-switchover",
        })
        .await
        .unwrap();
        (held_at, released_at, port)
    };
    let (done, (held_at, released_at, port)) = tokio::join!(source, hold);
    done.unwrap();
    target.wait_running(Duration::from_secs(60)).await.unwrap();
    to.table.remove(&m.uid);
    drop(relay);
    finish_source(&from.vms, vm).await.unwrap();
    in_host_ns(&from.ns, || net::sweep_taps(&BTreeSet::new()))
        .await
        .unwrap()
        .unwrap();
    // The guest answers again; late replies to the hold's pings are in.
    let back = Instant::now();
    while pinger.log().count_since(back) < 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = Held {
        port,
        sent: pinger.sent_between(held_at, released_at),
        lost: pinger.unanswered(held_at, released_at),
    };
    (held, target.vm().clone())
}

#[test]
fn the_segment_follows_the_guest_at_the_sources_stop_and_its_frames_wait_for_it() {
    let seg = segment("swo");
    let (ip_a, ip_b) = migration_link(&seg, "a", "b");
    let dir = scratch();
    let ca = ClusterCa::generate("ferry-switchover-test").unwrap();
    let hosts = [
        Host::new("a", seg.host_ns("a").unwrap(), ip_a, dir.path(), &ca).unwrap(),
        Host::new("b", seg.host_ns("b").unwrap(), ip_b, dir.path(), &ca).unwrap(),
    ];
    let kill = KillOnDrop::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let g = guest();
        let spec = spec_in(&hosts[0].ns, &g).await.unwrap();
        let vm = hosts[0].start(&spec).await.unwrap();
        kill.add(vm.pid());
        let client_ns = seg.client_ns().to_string();
        let counters = tokio::task::spawn_blocking(move || CounterClient::start(&client_ns))
            .await
            .unwrap();
        let pinger = Pinger::start(
            seg.client_ns(),
            GUEST_IP.parse::<Ipv4Addr>().unwrap(),
            PING_EVERY,
        )
        .unwrap();

        let (with, vm) =
            migrate_held(0, &hosts[0], &hosts[1], &vm, true, &seg, &pinger, &kill).await;
        assert_eq!(
            with.port.as_deref(),
            Some(port_of("b").as_str()),
            "with the control channel the switch forwards to the target while the guest is stopped"
        );
        assert!(with.sent >= 20, "{} pings sent during the hold", with.sent);
        assert!(
            with.lost.is_empty(),
            "pings sent while the guest was stopped were lost: {:?} of {}",
            with.lost,
            with.sent
        );

        let (without, vm) =
            migrate_held(1, &hosts[1], &hosts[0], &vm, false, &seg, &pinger, &kill).await;
        assert_eq!(
            without.port.as_deref(),
            Some(port_of("b").as_str()),
            "without it the switch still forwards to the stopped source"
        );
        assert_eq!(
            without.lost.len(),
            without.sent,
            "without it every ping of the hold goes to the stopped source"
        );

        let echoed = counters.echoed();
        let report = tokio::task::spawn_blocking(move || {
            counters.wait_echoed(echoed + 20);
            counters.stop()
        })
        .await
        .unwrap();
        assert_eq!(report.error, None, "{report:?}");
        eprintln!(
            "held {} ms at the switchover: with the control channel {} of {} pings lost, \
             without {} of {}; client's longest TCP gap {} ms ({} counters echoed in order)",
            HOLD.as_millis(),
            with.lost.len(),
            with.sent,
            without.lost.len(),
            without.sent,
            report.longest_gap.as_millis(),
            report.echoed
        );
        hosts[0]
            .vms
            .stop(&vm.spec().name, Duration::from_secs(10))
            .await
            .unwrap();
    });
}
