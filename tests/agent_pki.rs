//! The cluster PKI and the relay's mutual TLS over real loopback sockets.

use std::sync::Arc;

use ferry::agent::pki::{self, ClusterCa, HostIdentity, PkiError, TlsSettings};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[test]
fn a_host_certificate_names_its_host_and_survives_save_and_load() {
    let ca = ClusterCa::generate("test CA").unwrap();
    let id = ca.issue_host("node-1.example").unwrap();
    let der = CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap();
    assert_eq!(pki::host_of_certificate(&der).unwrap(), "node-1.example");

    let dir = tempfile::tempdir().unwrap();
    id.save(dir.path()).unwrap();
    let loaded = HostIdentity::load(dir.path()).unwrap();
    assert_eq!(loaded.host, "node-1.example");
    assert_eq!(loaded.cert_pem, id.cert_pem);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("host.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is private");

    // A CA reloaded from PEM (as from a Secret) issues certificates that
    // chain to the same root.
    let again = ClusterCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
    let other = again.issue_host("node-2").unwrap();
    assert_eq!(other.ca_pem, ca.cert_pem());
}

#[test]
fn invalid_host_names_and_pem_are_typed_errors() {
    let ca = ClusterCa::generate("test CA").unwrap();
    assert!(matches!(
        ca.issue_host("not a host"),
        Err(PkiError::InvalidHostName(_))
    ));
    assert!(matches!(
        ClusterCa::from_pem("garbage", "garbage"),
        Err(PkiError::Pem { .. })
    ));
}

#[test]
fn cipher_suites_are_configurable_by_name_with_a_clear_error() {
    let id = ClusterCa::generate("ca").unwrap().issue_host("h").unwrap();
    TlsSettings::default().server_config(&id).unwrap();
    // IANA spelling and TLS 1.2 suites are accepted.
    let s = TlsSettings {
        cipher_suites: vec![
            "TLS_CHACHA20_POLY1305_SHA256".into(),
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384".into(),
        ],
    };
    s.client_config(&id).unwrap();
    let bad = TlsSettings {
        cipher_suites: vec!["TLS_RSA_WITH_RC4_128_MD5".into()],
    };
    let err = bad.server_config(&id).unwrap_err();
    match &err {
        PkiError::UnknownCipherSuite { name, known } => {
            assert_eq!(name, "TLS_RSA_WITH_RC4_128_MD5");
            assert!(known.iter().any(|k| k == "TLS13_AES_128_GCM_SHA256"));
        }
        other => panic!("expected UnknownCipherSuite, got {other:?}"),
    }
    assert!(
        err.to_string().contains("TLS13_AES_256_GCM_SHA384"),
        "{err}"
    );
    assert!(matches!(
        TlsSettings {
            cipher_suites: vec![]
        }
        .client_config(&id),
        Err(PkiError::NoCipherSuites)
    ));
}

/// One TLS exchange: returns what the server saw (peer host and suite) or
/// the client's error.
async fn exchange(
    server: &HostIdentity,
    server_tls: &TlsSettings,
    client: &HostIdentity,
    client_tls: &TlsSettings,
    expect_server: &str,
) -> Result<(String, String), std::io::Error> {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls.server_config(server).unwrap());
    let srv = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await?;
        let (_, conn) = tls.get_ref();
        let host = pki::peer_host(conn).unwrap();
        let suite = format!("{:?}", conn.negotiated_cipher_suite().unwrap().suite());
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await?;
        tls.write_all(&b).await?;
        tls.shutdown().await?;
        Ok::<_, std::io::Error>((host, suite))
    });
    let connector = tokio_rustls::TlsConnector::from(client_tls.client_config(client).unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(expect_server.to_string()).unwrap();
    let client_side = async {
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await?;
        assert_eq!(&b, b"ping");
        Ok::<_, std::io::Error>(())
    };
    let c = client_side.await;
    let s = srv.await.unwrap();
    c?;
    s
}

#[tokio::test]
async fn mutual_tls_identifies_the_peer_host_and_refuses_strangers() {
    let ca = ClusterCa::generate("cluster").unwrap();
    let a = ca.issue_host("host-a").unwrap();
    let b = ca.issue_host("host-b").unwrap();
    let d = TlsSettings::default();
    let (peer, suite) = exchange(&b, &d, &a, &d, "host-b").await.unwrap();
    assert_eq!(peer, "host-a");
    assert_eq!(suite, "TLS13_AES_128_GCM_SHA256");

    // The server's configured suites decide.
    let chacha = TlsSettings {
        cipher_suites: vec!["TLS13_CHACHA20_POLY1305_SHA256".into()],
    };
    let (_, suite) = exchange(&b, &chacha, &a, &d, "host-b").await.unwrap();
    assert_eq!(suite, "TLS13_CHACHA20_POLY1305_SHA256");

    // A client certificate from another CA is refused.
    let rogue = ClusterCa::generate("rogue")
        .unwrap()
        .issue_host("host-a")
        .unwrap();
    assert!(exchange(&b, &d, &rogue, &d, "host-b").await.is_err());
    // A server that is not the host the client meant to reach is refused.
    assert!(exchange(&b, &d, &a, &d, "host-c").await.is_err());
    let _ = Arc::new(());
}
