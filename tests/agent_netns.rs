//! The relay across two network stacks: the target agent's relay listens
//! inside its own network namespace, reached over a veth pair from the
//! source's namespace, as on a separate migration network. Cutting that
//! link (interface down: no reset, packets just stop) is what QEMU cannot
//! detect; the agent's stall watchdog must.

mod agent_support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use agent_support::{Pair, QEMU_TURN, console, guest_vm};
use ferry::agent::guest::GuestConfig;
use ferry::agent::migrate::{self, Action, Bandwidth, MigrationConfig, MigrationError};
use ferry::agent::pki::TlsSettings;
use ferry::agent::relay::{ServerTransport, TargetRelay};
use tokio_util::sync::CancellationToken;

/// A network namespace joined to this one by a veth pair; removed on drop.
struct Netns {
    name: String,
    outer: String,
    inner_addr: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn create() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = std::process::id() % 10_000 * 10 + N.fetch_add(1, Ordering::SeqCst);
        let (name, outer, inner) = (format!("fa{id}"), format!("fo{id}"), format!("fi{id}"));
        let net = format!("10.{}.{}", 200 + id % 50, (id / 50) % 250);
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name,
            outer,
            inner_addr: format!("{net}.2"),
        };
        ip(&[
            "link", "add", &ns.outer, "type", "veth", "peer", "name", &inner,
        ]);
        ip(&["link", "set", &inner, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &ns.outer]);
        ip(&["link", "set", &ns.outer, "up"]);
        let x = |a: &[&str]| {
            let mut v = vec!["netns", "exec", &ns.name, "ip"];
            v.extend_from_slice(a);
            ip(&v);
        };
        x(&["addr", "add", &format!("{net}.2/24"), "dev", &inner]);
        x(&["link", "set", &inner, "up"]);
        x(&["link", "set", "lo", "up"]);
        ns
    }

    /// Binds a TCP listener inside the namespace (the socket stays there).
    fn bind(&self, port: u16) -> std::net::TcpListener {
        let path = format!("/run/netns/{}", self.name);
        let addr = format!("{}:{port}", self.inner_addr);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            std::net::TcpListener::bind(addr).unwrap()
        })
        .join()
        .unwrap()
    }

    /// Takes the link down on this side: no reset, the packets just stop.
    fn cut(&self) {
        ip(&["link", "set", &self.outer, "down"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

async fn relay_in(ns: &Netns, pair: &Pair) -> TargetRelay {
    let tls = TlsSettings::default().server_config(&pair.b).unwrap();
    TargetRelay::from_std(ns.bind(0), ServerTransport::Tls(tls), pair.table.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_crosses_network_namespaces_and_a_cut_link_is_caught() {
    let _turn = QEMU_TURN.lock().await;
    let pair = Pair::new().await;
    let ns = Netns::create();
    let relay = relay_in(&ns, &pair).await;
    assert!(relay.local_addr().ip().to_string().starts_with("10."));

    // 1. A complete migration over the veth link.
    let config = MigrationConfig {
        sample_interval: Duration::from_millis(250),
        downtime_limit: Duration::from_millis(50),
        ..MigrationConfig::default()
    };
    let spec = guest_vm(pair.tmp.path(), "vm1", 64, &GuestConfig::default());
    let vm = pair.src.start(&spec, false).await.unwrap();
    pair.guard.watch(vm.pid());
    drop(console(&vm).await);
    let target = migrate::prepare_target(&pair.dst, &spec, &config)
        .await
        .unwrap();
    pair.guard.watch(target.vm().pid());
    let m = pair.migration("ns1");
    pair.table
        .expect(m.clone(), "host-a", target.incoming_socket());
    let src_relay = pair
        .source_relay(&vm, &m, &pair.a, relay.local_addr(), &config)
        .await;
    let cancel = CancellationToken::new();
    let done = migrate::run_source(
        &vm,
        &src_relay,
        &config,
        &mut |_: &[_]| Action::Continue,
        &mut |_: &_| {},
        &cancel,
    )
    .await
    .unwrap();
    assert!(done.relay_forward_bytes > 32 << 20);
    target.wait_running(Duration::from_secs(30)).await.unwrap();
    migrate::finish_source(&pair.src, &vm).await.unwrap();
    assert!(
        console(target.vm())
            .await
            .verify()
            .await
            .unwrap()
            .is_intact()
    );
    drop(src_relay);

    // 2. A second VM, with the link cut half-way: QEMU would stay `active`
    // forever; the watchdog cancels and the VM runs on at the source.
    let config = MigrationConfig {
        bandwidth: Bandwidth::Limit(8 << 20),
        stall_timeout: Duration::from_secs(3),
        ..config
    };
    let spec = guest_vm(pair.tmp.path(), "vm2", 64, &GuestConfig::default());
    let vm = pair.src.start(&spec, false).await.unwrap();
    pair.guard.watch(vm.pid());
    drop(console(&vm).await);
    let target = migrate::prepare_target(&pair.dst, &spec, &config)
        .await
        .unwrap();
    pair.guard.watch(target.vm().pid());
    let m = pair.migration("ns2");
    pair.table
        .expect(m.clone(), "host-a", target.incoming_socket());
    let src_relay = pair
        .source_relay(&vm, &m, &pair.a, relay.local_addr(), &config)
        .await;
    let ns = Arc::new(ns);
    let cutter = ns.clone();
    let mut cut = false;
    let err = migrate::run_source(
        &vm,
        &src_relay,
        &config,
        &mut |_: &[_]| Action::Continue,
        &mut |s: &migrate::ProgressSample| {
            if !cut && s.transferred_bytes > 4 << 20 {
                cutter.cut();
                cut = true;
            }
        },
        &cancel,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, MigrationError::Stalled { .. }), "{err:?}");
    let st = vm
        .qmp()
        .execute(&ferry::agent::qmp::QueryStatus {})
        .await
        .unwrap();
    assert!(st.running, "the VM runs on at the source");
    assert!(console(&vm).await.verify().await.unwrap().is_intact());
    target.abort(&pair.dst).await.unwrap();
    pair.src.stop("vm2", Duration::from_secs(5)).await.unwrap();
}
