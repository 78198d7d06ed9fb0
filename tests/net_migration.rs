//! The VM's address moves with it: the Linux test guest on a tap in host
//! namespace `a` answers ping and TCP echo from a client namespace on the
//! same L2 segment, and keeps answering — on the same TCP connection, every
//! counter echoed in order — across a direct QEMU-to-QEMU live migration to
//! host `b`. With QEMU's announce switched off on the target, the switch
//! keeps sending the VM's traffic to the dead source until the guest or an
//! `announce-self` says otherwise: the test sees that.
//!
//! Root only (network namespaces, taps); CI runs as root.

mod net_support;

use std::time::{Duration, Instant};

use net_support::{CounterClient, GuestVm, MAC, ping, scratch, segment, switch_port_of};
use serde_json::json;

/// Per the measurements: a 20 ms limit keeps the client's stall
/// short.
const DOWNTIME_LIMIT_MS: u64 = 20;

#[test]
fn a_guest_on_a_tap_answers_ping_and_tcp_echo_from_the_client() {
    let seg = segment("echo");
    let dir = scratch();
    let mut vm = GuestVm::start(&dir, "vm", seg.host_ns("a").unwrap(), "fytest0", false);
    vm.wait_ready();
    assert!(ping(seg.client_ns(), 3), "no ping reply from the guest");
    let client = CounterClient::start(seg.client_ns());
    client.wait_echoed(20);
    let report = client.stop();
    assert_eq!(report.error, None, "{report:?}");
    assert!(report.echoed >= 20, "{report:?}");
    assert_eq!(switch_port_of(&seg, MAC).as_deref(), Some("h0"));
}

/// What one migration looked like.
struct Migrated {
    source: GuestVm,
    target: GuestVm,
    qemu_downtime_ms: u64,
}

/// Starts the guest on host a, a client exchanging counters, a target on
/// host b (with `target_params` set before `migrate-incoming`), migrates
/// over a unix socket and quits the source (removing its tap, as its agent
/// would).
fn migrate_a_to_b(
    seg: &ferry::agent::net::Segment,
    dir: &tempfile::TempDir,
    target_params: serde_json::Value,
) -> (Migrated, CounterClient) {
    let mut source = GuestVm::start(dir, "src", seg.host_ns("a").unwrap(), "fytest0", false);
    source.wait_ready();
    let client = CounterClient::start(seg.client_ns());
    let target = GuestVm::start(dir, "dst", seg.host_ns("b").unwrap(), "fytest0", true);
    let mut tq = target.qmp();
    tq.execute("migrate-set-parameters", target_params);
    let uri = format!("unix:{}", target.incoming.display());
    tq.execute("migrate-incoming", json!({ "uri": uri }));
    client.wait_echoed(client.echoed() + 20);
    let mut sq = source.qmp();
    sq.execute(
        "migrate-set-parameters",
        json!({ "downtime-limit": DOWNTIME_LIMIT_MS }),
    );
    sq.execute("migrate", json!({ "uri": uri }));
    let done = sq.wait_migrated(Duration::from_secs(120));
    tq.wait_running(Duration::from_secs(30));
    let qemu_downtime_ms = done["downtime"].as_u64().unwrap_or_default();
    sq.execute("quit", json!({}));
    source.wait_exit(Duration::from_secs(10));
    let status = std::process::Command::new("ip")
        .args(["-n", seg.host_ns("a").unwrap(), "link", "del", "fytest0"])
        .status()
        .unwrap();
    assert!(status.success(), "removing the source's tap");
    (
        Migrated {
            source,
            target,
            qemu_downtime_ms,
        },
        client,
    )
}

#[test]
fn a_tcp_connection_survives_a_live_migration_with_every_counter_in_order() {
    let seg = segment("live");
    let dir = scratch();
    let (m, client) = migrate_a_to_b(&seg, &dir, json!({}));
    let at_switchover = client.echoed();
    client.wait_echoed(at_switchover + 50);
    let report = client.stop();
    assert_eq!(report.error, None, "{report:?}");
    assert!(report.echoed >= at_switchover + 50, "{report:?}");
    // The switch learnt that the MAC now lives behind host b.
    assert_eq!(switch_port_of(&seg, MAC).as_deref(), Some("h1"));
    assert!(ping(seg.client_ns(), 1), "no ping reply after migration");
    eprintln!(
        "live migration: QEMU downtime {} ms, client's longest TCP gap {} ms ({} counters echoed in order)",
        m.qemu_downtime_ms,
        report.longest_gap.as_millis(),
        report.echoed
    );
    drop(m.target);
    drop(m.source);
}

#[test]
fn without_announce_traffic_goes_to_the_dead_source_until_announce_self() {
    let seg = segment("noann");
    let dir = scratch();
    let mut source = GuestVm::start(&dir, "src", seg.host_ns("a").unwrap(), "fytest0", false);
    source.wait_ready();
    let client = CounterClient::start(seg.client_ns());
    // The connection stays open but idle, so that only an announce could
    // tell the switch where the guest went.
    client.pause();
    let target = GuestVm::start(&dir, "dst", seg.host_ns("b").unwrap(), "fytest0", true);
    let mut tq = target.qmp();
    tq.execute("migrate-set-parameters", json!({ "announce-rounds": 0 }));
    let uri = format!("unix:{}", target.incoming.display());
    tq.execute("migrate-incoming", json!({ "uri": uri }));
    let mut sq = source.qmp();
    sq.execute("migrate", json!({ "uri": uri }));
    sq.wait_migrated(Duration::from_secs(120));
    tq.wait_running(Duration::from_secs(30));
    sq.execute("quit", json!({}));
    source.wait_exit(Duration::from_secs(10));
    // Well past QEMU's default announce window (~1.25 s): nothing told the
    // switch, which still forwards the VM's MAC to host a, where no VM is.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        switch_port_of(&seg, MAC).as_deref(),
        Some("h0"),
        "with announce off the switch should still point at the source"
    );
    // Restore: the announce the target skipped.
    tq.execute(
        "announce-self",
        json!({ "initial": 50, "max": 550, "rounds": 5, "step": 100 }),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while switch_port_of(&seg, MAC).as_deref() != Some("h1") {
        assert!(
            Instant::now() < deadline,
            "announce-self did not move the MAC"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    client.resume();
    let before = client.echoed();
    client.wait_echoed(before + 50);
    let report = client.stop();
    assert_eq!(report.error, None, "{report:?}");
    assert!(report.echoed >= before + 50, "{report:?}");
}

#[test]
fn with_announce_an_idle_guests_mac_moves_to_the_target_host() {
    let seg = segment("ann");
    let dir = scratch();
    let mut source = GuestVm::start(&dir, "src", seg.host_ns("a").unwrap(), "fytest0", false);
    source.wait_ready();
    let client = CounterClient::start(seg.client_ns());
    client.pause();
    let target = GuestVm::start(&dir, "dst", seg.host_ns("b").unwrap(), "fytest0", true);
    let mut tq = target.qmp();
    let uri = format!("unix:{}", target.incoming.display());
    tq.execute("migrate-incoming", json!({ "uri": uri }));
    let mut sq = source.qmp();
    sq.execute("migrate", json!({ "uri": uri }));
    sq.wait_migrated(Duration::from_secs(120));
    tq.wait_running(Duration::from_secs(30));
    // The guest is silent: only QEMU's announce can move the MAC.
    let deadline = Instant::now() + Duration::from_secs(10);
    while switch_port_of(&seg, MAC).as_deref() != Some("h1") {
        assert!(
            Instant::now() < deadline,
            "the announce did not move the MAC"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    client.resume();
    let before = client.echoed();
    client.wait_echoed(before + 20);
    let report = client.stop();
    assert_eq!(report.error, None, "{report:?}");
}
