//! The relay's handshake and carrying, against real TLS sockets (no QEMU):
//! refusals by reason, version checks, delivery, counters and cancel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry::agent::pki::{ClusterCa, HostIdentity, TlsSettings};
use ferry::agent::relay::{
    ClientTransport, Hello, MigrationRef, MigrationTable, RefusalReason, RelayError, Reply,
    ServerTransport, SourceRelay, SourceRelayConfig, TargetRelay, wire,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

struct Rig {
    tmp: tempfile::TempDir,
    a: HostIdentity,
    table: Arc<MigrationTable>,
    relay: TargetRelay,
}

async fn rig() -> Rig {
    let tmp = tempfile::Builder::new()
        .prefix("fr")
        .tempdir_in("/tmp")
        .unwrap();
    let ca = ClusterCa::generate("ca").unwrap();
    let a = ca.issue_host("host-a").unwrap();
    let b = ca.issue_host("host-b").unwrap();
    let table = Arc::new(MigrationTable::default());
    let cfg = TlsSettings::default().server_config(&b).unwrap();
    let relay = TargetRelay::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerTransport::Tls(cfg),
        table.clone(),
    )
    .await
    .unwrap();
    Rig {
        tmp,
        a,
        table,
        relay,
    }
}

fn mref(uid: &str) -> MigrationRef {
    MigrationRef {
        namespace: "ns".into(),
        name: "m".into(),
        uid: uid.into(),
    }
}

async fn tls_to(addr: SocketAddr, id: &HostIdentity) -> tokio_rustls::client::TlsStream<TcpStream> {
    let cfg = TlsSettings::default().client_config(id).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("host-b").unwrap(), tcp)
        .await
        .unwrap()
}

async fn hello_reply(r: &Rig, id: &HostIdentity, hello: &Hello) -> Reply {
    let mut s = tls_to(r.relay.local_addr(), id).await;
    wire::write_hello(&mut s, hello).await.unwrap();
    wire::read_reply(&mut s).await.unwrap()
}

fn refused(reply: Reply) -> RefusalReason {
    match reply {
        Reply::Refuse { reason, .. } => reason,
        Reply::Accept => panic!("expected a refusal"),
    }
}

#[tokio::test]
async fn refusals_carry_their_reason_and_are_counted() {
    let r = rig().await;
    let hello = |uid: &str, host: &str| Hello {
        role: Default::default(),
        records: false,
        migration: mref(uid),
        source_host: host.into(),
        channel: 0,
    };
    // Nothing expected.
    let reply = hello_reply(&r, &r.a, &hello("u1", "host-a")).await;
    assert_eq!(refused(reply), RefusalReason::UnknownMigration);
    // Claiming to be another host than the certificate says.
    let reply = hello_reply(&r, &r.a, &hello("u1", "host-b")).await;
    assert_eq!(refused(reply), RefusalReason::ClaimMismatch);
    // Expected, but the target QEMU is not listening.
    r.table
        .expect(mref("u2"), "host-a", r.tmp.path().join("none.sock"));
    let reply = hello_reply(&r, &r.a, &hello("u2", "host-a")).await;
    assert_eq!(refused(reply), RefusalReason::TargetNotReady);
    // Same UID, other name.
    let mut other = hello("u2", "host-a");
    other.migration.name = "other".into();
    assert_eq!(
        refused(hello_reply(&r, &r.a, &other).await),
        RefusalReason::MigrationMismatch
    );
    let stats = r.relay.stats().refusals();
    assert_eq!(stats[&RefusalReason::UnknownMigration], 1);
    assert_eq!(stats[&RefusalReason::ClaimMismatch], 1);
    assert_eq!(stats[&RefusalReason::TargetNotReady], 1);
    assert_eq!(r.relay.stats().refused_total(), 4);
}

#[tokio::test]
async fn another_protocol_version_is_refused_by_name() {
    let r = rig().await;
    let mut frame = Vec::new();
    wire::write_hello(
        &mut frame,
        &Hello {
            migration: mref("u"),
            source_host: "host-a".into(),
            channel: 0,
            role: Default::default(),
            records: false,
        },
    )
    .await
    .unwrap();
    frame[4..6].copy_from_slice(&99u16.to_be_bytes());
    let mut s = tls_to(r.relay.local_addr(), &r.a).await;
    s.write_all(&frame).await.unwrap();
    let reply = wire::read_reply(&mut s).await.unwrap();
    assert_eq!(refused(reply), RefusalReason::UnsupportedVersion);
}

/// A stand-in for the target QEMU: echoes what it receives, reversed in
/// direction, so both directions of the pump are exercised.
async fn echo_socket(path: &std::path::Path) {
    let l = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
}

async fn source(r: &Rig, uid: &str, transport: ClientTransport, addr: SocketAddr) -> SourceRelay {
    SourceRelay::start(SourceRelayConfig {
        migration: mref(uid),
        source_host: "host-a".into(),
        target_host: "host-b".into(),
        target_addr: addr,
        socket_path: r.tmp.path().join(format!("{uid}.out")),
        transport,
        bandwidth: None,
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn bytes_cross_both_ways_and_cancel_closes_the_channels() {
    let r = rig().await;
    let target_sock = r.tmp.path().join("qemu-in.sock");
    echo_socket(&target_sock).await;
    let delivery = r.table.expect(mref("u3"), "host-a", target_sock);
    let tls = TlsSettings::default().client_config(&r.a).unwrap();
    let src = source(&r, "u3", ClientTransport::Tls(tls), r.relay.local_addr()).await;

    // Two channels, as multifd would open.
    let mut c1 = UnixStream::connect(src.socket_path()).await.unwrap();
    let mut c2 = UnixStream::connect(src.socket_path()).await.unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for c in [&mut c1, &mut c2] {
        let (mut rd, mut wr) = c.split();
        let send = async {
            wr.write_all(&data).await.unwrap();
        };
        let mut back = vec![0u8; data.len()];
        let recv = async {
            rd.read_exact(&mut back).await.unwrap();
        };
        tokio::join!(send, recv);
        assert!(back == data, "the echo came back intact");
    }
    let s = src.counters().snapshot();
    assert_eq!(s.forward_bytes, 6_000_000);
    assert_eq!(s.backward_bytes, 6_000_000);
    assert_eq!(s.channels_opened, 2);
    assert_eq!(delivery.counters.snapshot().forward_bytes, 6_000_000);
    // Both agents of this release carry the bulk on Ferry's record layer.
    assert_eq!(r.relay.stats().on_records(), 2);

    // Cancelling on the target side closes the migration's channels.
    r.table.remove("u3");
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), c1.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "the channel is closed: {n:?}");
    tokio::time::timeout(Duration::from_secs(5), async {
        while src.reports().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(src.reports().iter().all(|c| c.error.is_some()));
}

#[tokio::test]
async fn a_source_that_keeps_rustls_is_carried_by_rustls() {
    // What a source of an earlier release does: no record layer offered.
    let r = rig().await;
    let target_sock = r.tmp.path().join("compat-in.sock");
    echo_socket(&target_sock).await;
    let delivery = r.table.expect(mref("u6"), "host-a", target_sock);
    let tls = TlsSettings::default().client_config(&r.a).unwrap();
    let src = source(
        &r,
        "u6",
        ClientTransport::TlsRustlsOnly(tls),
        r.relay.local_addr(),
    )
    .await;
    let mut c = UnixStream::connect(src.socket_path()).await.unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let (mut rd, mut wr) = c.split();
    let mut back = vec![0u8; data.len()];
    tokio::join!(async { wr.write_all(&data).await.unwrap() }, async {
        rd.read_exact(&mut back).await.unwrap()
    });
    assert!(back == data, "the echo came back intact");
    assert_eq!(delivery.counters.snapshot().forward_bytes, 1_000_000);
    assert_eq!(r.relay.stats().accepted(), 1);
    assert_eq!(r.relay.stats().on_records(), 0);
}

#[tokio::test]
async fn plain_mode_carries_bytes_for_benchmarks_only() {
    let r = rig().await;
    let target_sock = r.tmp.path().join("plain-in.sock");
    echo_socket(&target_sock).await;
    let table = Arc::new(MigrationTable::default());
    table.expect(mref("u4"), "host-a", target_sock);
    let plain = TargetRelay::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerTransport::InsecurePlain,
        table,
    )
    .await
    .unwrap();
    let src = source(&r, "u4", ClientTransport::InsecurePlain, plain.local_addr()).await;
    let mut c = UnixStream::connect(src.socket_path()).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"hello");

    // A plain source cannot talk to the TLS relay.
    let src2 = source(
        &r,
        "u5",
        ClientTransport::InsecurePlain,
        r.relay.local_addr(),
    )
    .await;
    let mut c = UnixStream::connect(src2.socket_path()).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(15), c.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    let report = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(r) = src2.first_failure() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(matches!(*report.error.unwrap(), RelayError::Handshake(_)));
}
