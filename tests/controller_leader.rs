//! Leader election on the `ferry-controller` Lease, and the health and
//! metrics endpoints: two controllers at once never both act.

mod common;
mod controller_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use controller_support::{Cluster, watch_limits, within};
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use ferry::api::HostMaintenance;
use ferry::api::maintenance::MaintenancePhase;
use ferry::controller::leader::{self, Elector, LeaderConfig, Role};

/// A TCP proxy to the API server that can be cut, as a network partition
/// between one controller and the API.
async fn proxy(upstream: std::net::SocketAddr, cut: CancellationToken) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            if cut.is_cancelled() {
                continue;
            }
            let cut = cut.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = cut.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                }
            });
        }
    });
    addr
}

fn config(identity: &str) -> LeaderConfig {
    LeaderConfig {
        namespace: "ferry-system".into(),
        name: leader::LEASE_NAME.into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(2),
        retry_period: Duration::from_millis(400),
    }
}

type Terms = Arc<Mutex<Vec<(String, Instant, Option<Instant>)>>>;

/// Run an elector whose "loops" record when they act.
fn contend(
    client: kube::Client,
    identity: &str,
    terms: Terms,
    stop: CancellationToken,
) -> watch::Receiver<Role> {
    let (tx, rx) = watch::channel(Role::Starting);
    let id = identity.to_string();
    tokio::spawn(leader::run(
        Elector::new(client, config(identity)),
        tx,
        stop,
        move |term| {
            let (terms, id) = (terms.clone(), id.clone());
            async move {
                let i = {
                    let mut t = terms.lock().unwrap();
                    t.push((id, Instant::now(), None));
                    t.len() - 1
                };
                term.cancelled().await;
                terms.lock().unwrap()[i].2 = Some(Instant::now());
            }
        },
    ));
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_stops_before_the_standby_takes_over() {
    let cluster = Cluster::start(1, Duration::from_millis(100)).await;
    let cut = CancellationToken::new();
    let via = proxy(cluster.server.handle.addr(), cut.clone()).await;
    let yaml = cluster
        .server
        .handle
        .kubeconfig_for(cluster.server.handle.admin_token())
        .replace(
            &cluster.server.handle.url(),
            &format!("https://127.0.0.1:{}", via.port()),
        );
    let kc = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
    let partitioned = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let terms: Terms = Arc::default();
    let stop = CancellationToken::new();
    let a = contend(partitioned, "a", terms.clone(), stop.clone());
    within(10, "a leads", || async {
        (*a.borrow() == Role::Leader).then_some(())
    })
    .await;
    let b = contend(cluster.client.clone(), "b", terms.clone(), stop.clone());
    within(10, "b stands by", || async {
        (*b.borrow() == Role::Standby).then_some(())
    })
    .await;
    // b keeps waiting while a renews.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(*b.borrow(), Role::Standby);
    assert_eq!(terms.lock().unwrap().len(), 1);

    cut.cancel();
    within(20, "b takes over", || async {
        (*b.borrow() == Role::Leader).then_some(())
    })
    .await;
    assert_eq!(*a.borrow(), Role::Standby);
    let t = terms.lock().unwrap().clone();
    assert_eq!(t.len(), 2, "{t:?}");
    let (first, second) = (&t[0], &t[1]);
    assert_eq!((first.0.as_str(), second.0.as_str()), ("a", "b"));
    let a_stopped = first.2.expect("a stopped acting");
    assert!(
        a_stopped < second.1,
        "a acted until {a_stopped:?}, b began at {:?}",
        second.1
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_is_taken_over_at_once_and_two_racing_standbys_never_both_win() {
    let cluster = Cluster::start(1, Duration::from_millis(100)).await;
    let mut a = Elector::new(cluster.client.clone(), config("a"));
    let mut b = Elector::new(cluster.client.clone(), config("b"));
    assert!(matches!(a.step().await.unwrap(), leader::Step::Held { .. }));
    assert_eq!(b.step().await.unwrap(), leader::Step::Standby);
    // Renewing keeps it.
    assert!(matches!(a.step().await.unwrap(), leader::Step::Held { .. }));
    assert_eq!(b.step().await.unwrap(), leader::Step::Standby);
    a.release().await.unwrap();
    assert!(matches!(b.step().await.unwrap(), leader::Step::Held { .. }));
    assert_eq!(a.step().await.unwrap(), leader::Step::Standby);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(cluster.client.clone(), "ferry-system");
    let l = leases.get(leader::LEASE_NAME).await.unwrap();
    let spec = l.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
    // Two standbys racing for a free Lease: the resourceVersion lets one win.
    b.release().await.unwrap();
    let mut c = Elector::new(cluster.client.clone(), config("c"));
    let (ra, rc) = tokio::join!(a.step(), c.step());
    let held = [ra.unwrap(), rc.unwrap()]
        .iter()
        .filter(|s| matches!(s, leader::Step::Held { .. }))
        .count();
    assert_eq!(held, 1);
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_at_once_drain_each_vm_once_and_report_their_roles() {
    let cluster = Cluster::start(4, Duration::from_millis(150)).await;
    cluster.set_limits(3, 2, 2).await;
    for i in 0..6 {
        cluster.add_vm(&format!("v{i}"), "h0", 128, true).await;
    }
    let peaks = watch_limits(cluster.client.clone(), cluster.stop.clone());
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (aa, ab) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let a = cluster.controller_with("ctl-a", Some(la));
    let b = cluster.controller_with("ctl-b", Some(lb));
    assert_eq!(http_get(aa, "/healthz").await.0, 200);
    let roles = within(20, "both are ready", || async {
        let (ca, ra) = http_get(aa, "/readyz").await;
        let (cb, rb) = http_get(ab, "/readyz").await;
        (ca == 200 && cb == 200).then_some((ra, rb))
    })
    .await;
    let mut sorted = [roles.0.clone(), roles.1.clone()];
    sorted.sort();
    assert_eq!(
        sorted,
        ["Leader".to_string(), "Standby".to_string()],
        "{roles:?}"
    );

    let hm: HostMaintenance = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "HostMaintenance",
        "metadata": {"name": "drain"}, "spec": {"host": "h0"},
    }))
    .unwrap();
    Api::<HostMaintenance>::all(cluster.client.clone())
        .create(&PostParams::default(), &hm)
        .await
        .unwrap();
    let first_leader = if roles.0 == "Leader" { aa } else { ab };
    let moved = std::sync::atomic::AtomicBool::new(false);
    within(120, "the drain completes", || async {
        if http_get(first_leader, "/readyz").await.1 != "Leader" {
            moved.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let hm = Api::<HostMaintenance>::all(cluster.client.clone())
            .get("drain")
            .await
            .ok()?;
        (hm.status?.phase == MaintenancePhase::Completed).then_some(())
    })
    .await;
    let moves = cluster.agents.moves.lock().unwrap().clone();
    assert_eq!(moves.len(), 6);
    assert!(moves.values().all(|n| *n == 1), "{moves:?}");
    let p = peaks.lock().unwrap().clone();
    assert!(p.doubled.is_empty(), "{p:?}");
    assert!(
        p.transfers.within(3, 2, 2) && p.preparations.within(3, 2, 2),
        "{p:?}"
    );

    // The leader's metrics saw the migrations finish. Completions are
    // counted by the replica that leads when it sees them: the exact totals
    // hold when leadership did not move during the drain (on a loaded
    // machine a missed renewal can hand it over, which the test reports).
    let leader_addr = if roles.0 == "Leader" { aa } else { ab };
    let text = within(10, "the metrics count the drain", || async {
        let (code, body) = http_get(leader_addr, "/metrics").await;
        (code == 200 && body.contains("ferry_migrations{phase=\"Succeeded\"} 6")).then_some(body)
    })
    .await;
    assert!(text.contains("ferry_migration_queue_depth 0"), "{text}");
    let (_, still) = http_get(leader_addr, "/readyz").await;
    let moved = moved.load(std::sync::atomic::Ordering::SeqCst);
    if still == "Leader" && !moved {
        assert!(
            text.contains("ferry_migrations_finished_total{result=\"Succeeded\",reason=\"\"} 6"),
            "{text}"
        );
        assert!(
            text.contains("ferry_migration_downtime_seconds_count 6"),
            "{text}"
        );
    } else {
        eprintln!("leadership moved during the drain; exact completion counts not compared");
    }

    // The leader steps down gracefully; the standby takes over at once.
    let (leader, standby, standby_addr) = if roles.0 == "Leader" {
        (a, b, ab)
    } else {
        (b, a, aa)
    };
    leader.shutdown().await;
    within(10, "the standby leads", || async {
        let (_, r) = http_get(standby_addr, "/readyz").await;
        (r == "Leader").then_some(())
    })
    .await;
    standby.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_takes_over_late_gives_every_host_a_fresh_grace() {
    let cluster = Cluster::start(2, Duration::from_millis(100)).await;
    let (code, body) = common::post(
        &cluster.client,
        "/apis/ferry.dev/v1alpha1/migrationpolicies",
        json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": "cluster"},
            "spec": {"resilience": {"fenceAfter": "1s", "evacuateAfter": "3s"}},
        }),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    // Another replica holds the controller Lease (an elector alone: it
    // judges no host).
    let mut other = Elector::new(cluster.client.clone(), config("other"));
    assert!(matches!(
        other.step().await.unwrap(),
        leader::Step::Held { .. }
    ));
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(cluster.client.clone(), "ferry-system");
    let holder = |leases: Api<k8s_openapi::api::coordination::v1::Lease>| async move {
        leases
            .get(leader::LEASE_NAME)
            .await
            .ok()?
            .spec?
            .holder_identity
    };
    // Every phase any host ever shows.
    let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let record = seen.clone();
    let hosts_api: Api<ferry::api::Host> = Api::all(cluster.client.clone());
    let watch = tokio::spawn(async move {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let stream = watcher(hosts_api, watcher::Config::default()).applied_objects();
        futures::pin_mut!(stream);
        while let Some(Ok(h)) = stream.next().await {
            let phase = h.status.map(|s| s.phase).unwrap_or_default();
            record.lock().unwrap().insert(format!("{phase:?}"));
        }
    });
    // h1's agent has never renewed (no Lease): its grace counts from the
    // start of the term that judges it.
    leases.delete("h1", &Default::default()).await.unwrap();
    let b = cluster.controller("ctl-b");
    // The standby waits longer than evacuateAfter before it leads.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(matches!(
            other.step().await.unwrap(),
            leader::Step::Held { .. }
        ));
    }
    other.release().await.unwrap();
    within(10, "ctl-b leads", || async {
        (holder(leases.clone()).await.as_deref() == Some("ctl-b")).then_some(())
    })
    .await;
    // Several host passes later (within the new term's grace of 3 s), the
    // hosts have never been anything but Active.
    tokio::time::sleep(Duration::from_secs(1)).await;
    watch.abort();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["Active"]);
    b.shutdown().await;
}
