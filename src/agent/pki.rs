//! The cluster's migration PKI: a CA, one certificate per host, and the
//! mutually authenticated rustls configurations of the relay.
//!
//! ```text
//!   ClusterCa (self-signed, CA:TRUE) ──issue_host("host-a")──► HostIdentity
//!        cert: SAN dns:host-a, uri:ferry-host://host-a; EKU serverAuth+clientAuth
//!
//!   source agent (client) ─── TLS 1.3, both sides present a CA-issued cert ──► target agent (server)
//!     verifies server name = target host         verifies client cert chains to the CA,
//!                                                 then peer_host() → "host-a" for the Authorizer
//! ```
//!
//! On `ferry up` the CA is generated locally; on a real cluster it comes from
//! a Secret (PEM, see [`ClusterCa::from_pem`] and [`HostIdentity::load`]).
//! Any valid certificate proves only *which host* the peer is; whether that
//! host may send a given migration is the relay's `Authorizer`'s decision.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// URI SAN scheme naming a Ferry host.
pub const HOST_URI_SCHEME: &str = "ferry-host://";

/// Default cipher suites, in preference order: AES-128-GCM first (fastest
/// with AES-NI at equal security margin for a LAN link), then AES-256-GCM,
/// then ChaCha20-Poly1305 for hosts without AES instructions. TLS 1.3 only.
pub const DEFAULT_CIPHER_SUITES: &[&str] = &[
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
];

/// PKI failure.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating or signing a key or certificate failed.
    #[error("generating {what}")]
    Generate {
        /// What was being generated.
        what: String,
        /// Cause.
        source: rcgen::Error,
    },
    /// A PEM file could not be read or written.
    #[error("{path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// PEM text could not be parsed.
    #[error("parsing PEM {what}: {detail}")]
    Pem {
        /// What was being parsed.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// A host name that cannot be a certificate's DNS name.
    #[error("host name {0:?} is not a valid DNS name")]
    InvalidHostName(String),
    /// A configured cipher suite name is unknown.
    #[error("unknown TLS cipher suite {name:?}; known: {}", known.join(", "))]
    UnknownCipherSuite {
        /// The name given.
        name: String,
        /// The names we know.
        known: Vec<String>,
    },
    /// An empty cipher suite list.
    #[error("the TLS cipher suite list is empty")]
    NoCipherSuites,
    /// rustls refused the configuration.
    #[error("building the TLS configuration")]
    Tls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("building the client certificate verifier: {0}")]
    Verifier(String),
    /// The peer presented no usable host certificate.
    #[error("peer certificate does not name a Ferry host: {0}")]
    NoPeerHost(String),
}

impl PkiError {
    /// A stable reason string for conditions and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            PkiError::Generate { .. } => "CertificateGenerationFailed",
            PkiError::File { .. } => "CertificateFileError",
            PkiError::Pem { .. } => "InvalidPem",
            PkiError::InvalidHostName(_) => "InvalidHostName",
            PkiError::UnknownCipherSuite { .. } => "UnknownCipherSuite",
            PkiError::NoCipherSuites => "NoCipherSuites",
            PkiError::Tls(_) => "TlsConfigError",
            PkiError::Verifier(_) => "TlsConfigError",
            PkiError::NoPeerHost(_) => "PeerNotAHost",
        }
    }
}

fn generate<T>(what: &str, r: Result<T, rcgen::Error>) -> Result<T, PkiError> {
    r.map_err(|source| PkiError::Generate {
        what: what.into(),
        source,
    })
}

/// The cluster CA: its certificate and signing key.
pub struct ClusterCa {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Generates a new CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<ClusterCa, PkiError> {
        let key = generate("CA key", KeyPair::generate())?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Ferry");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = generate("CA certificate", params.self_signed(&key))?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Loads a CA from PEM (e.g. a Secret's `ca.crt` and `ca.key`).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Pem {
            what: "CA key",
            detail: e.to_string(),
        })?;
        // Parse now so that a bad certificate fails here, not at first issue.
        Issuer::from_ca_cert_pem(cert_pem, &key).map_err(|e| PkiError::Pem {
            what: "CA certificate",
            detail: e.to_string(),
        })?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_string(),
            key,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM (to store in the cluster's Secret).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues the certificate of host `host`.
    pub fn issue_host(&self, host: &str) -> Result<HostIdentity, PkiError> {
        let dns = host
            .try_into()
            .map_err(|_| PkiError::InvalidHostName(host.into()))?;
        rustls_pki_types::ServerName::try_from(host)
            .map_err(|_| PkiError::InvalidHostName(host.into()))?;
        let uri = format!("{HOST_URI_SCHEME}{host}")
            .try_into()
            .map_err(|_| PkiError::InvalidHostName(host.into()))?;
        let issuer = generate(
            "CA issuer",
            Issuer::from_ca_cert_pem(&self.cert_pem, &self.key),
        )?;
        let key = generate("host key", KeyPair::generate())?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(dns), SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = generate("host certificate", params.signed_by(&key, &issuer))?;
        Ok(HostIdentity {
            host: host.into(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// A host's certificate, key and the CA it trusts.
#[derive(Clone)]
pub struct HostIdentity {
    /// The host this certificate names.
    pub host: String,
    /// Host certificate, PEM.
    pub cert_pem: String,
    /// Host private key, PEM.
    pub key_pem: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIdentity")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

const CA_FILE: &str = "ca.crt";
const CERT_FILE: &str = "host.crt";
const KEY_FILE: &str = "host.key";

impl HostIdentity {
    /// Writes `ca.crt`, `host.crt` and `host.key` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |path: PathBuf, r: std::io::Result<()>| {
            r.map_err(|source| PkiError::File { path, source })
        };
        io(dir.to_owned(), std::fs::create_dir_all(dir))?;
        for (name, text, mode) in [
            (CA_FILE, &self.ca_pem, 0o644),
            (CERT_FILE, &self.cert_pem, 0o644),
            (KEY_FILE, &self.key_pem, 0o600),
        ] {
            let path = dir.join(name);
            let r = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
            io(path, r)?;
        }
        Ok(())
    }

    /// Reads what [`save`](Self::save) wrote; the host name comes from the
    /// certificate itself.
    pub fn load(dir: &Path) -> Result<HostIdentity, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| PkiError::File { path, source })
        };
        let cert_pem = read(CERT_FILE)?;
        let der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::Pem {
                what: "host certificate",
                detail: e.to_string(),
            })?;
        let host = host_of_certificate(&der)?;
        Ok(HostIdentity {
            host,
            cert_pem,
            key_pem: read(KEY_FILE)?,
            ca_pem: read(CA_FILE)?,
        })
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::Pem {
                what: "host certificate",
                detail: e.to_string(),
            })
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, PkiError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| PkiError::Pem {
            what: "host key",
            detail: e.to_string(),
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, PkiError> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let c = c.map_err(|e| PkiError::Pem {
                what: "CA certificate",
                detail: e.to_string(),
            })?;
            roots.add(c)?;
        }
        Ok(Arc::new(roots))
    }
}

/// TLS settings of the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Cipher suite names (rustls / IANA spelling, e.g.
    /// `TLS13_AES_128_GCM_SHA256` or `TLS_AES_128_GCM_SHA256`), in preference
    /// order. Naming a TLS 1.2 suite also enables TLS 1.2.
    pub cipher_suites: Vec<String>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            cipher_suites: DEFAULT_CIPHER_SUITES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

fn suite_name(s: &SupportedCipherSuite) -> String {
    s.suite()
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:?}", s.suite()))
}

impl TlsSettings {
    /// The crypto provider restricted to the configured suites, and the
    /// protocol versions they need.
    fn provider(
        &self,
    ) -> Result<
        (
            Arc<CryptoProvider>,
            Vec<&'static rustls::SupportedProtocolVersion>,
        ),
        PkiError,
    > {
        if self.cipher_suites.is_empty() {
            return Err(PkiError::NoCipherSuites);
        }
        let all = rustls::crypto::ring::ALL_CIPHER_SUITES;
        let mut chosen = Vec::new();
        for name in &self.cipher_suites {
            // The IANA spelling of TLS 1.3 suites lacks rustls' "13".
            let canonical = match name.strip_prefix("TLS_") {
                Some(rest) if !rest.starts_with("ECDHE") => format!("TLS13_{rest}"),
                _ => name.clone(),
            };
            let Some(s) = all.iter().find(|s| suite_name(s) == canonical) else {
                return Err(PkiError::UnknownCipherSuite {
                    name: name.clone(),
                    known: all.iter().map(suite_name).collect(),
                });
            };
            if !chosen
                .iter()
                .any(|c: &SupportedCipherSuite| c.suite() == s.suite())
            {
                chosen.push(*s);
            }
        }
        let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
        if chosen
            .iter()
            .any(|s| s.version() == &rustls::version::TLS13)
        {
            versions.push(&rustls::version::TLS13);
        }
        if chosen
            .iter()
            .any(|s| s.version() == &rustls::version::TLS12)
        {
            versions.push(&rustls::version::TLS12);
        }
        let provider = CryptoProvider {
            cipher_suites: chosen,
            ..rustls::crypto::ring::default_provider()
        };
        Ok((Arc::new(provider), versions))
    }

    /// The relay server's configuration: presents `id`'s certificate and
    /// requires a client certificate issued by the cluster CA.
    pub fn server_config(&self, id: &HostIdentity) -> Result<Arc<ServerConfig>, PkiError> {
        let (provider, versions) = self.provider()?;
        let verifier = WebPkiClientVerifier::builder_with_provider(id.roots()?, provider.clone())
            .build()
            .map_err(|e| PkiError::Verifier(e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.chain()?, id.key()?)?;
        // A stream's bulk runs on the relay's own record layer
        // (`relay::records`), which takes the session's traffic keys.
        cfg.enable_secret_extraction = true;
        Ok(Arc::new(cfg))
    }

    /// The relay client's configuration: presents `id`'s certificate and
    /// trusts only servers issued by the cluster CA.
    pub fn client_config(&self, id: &HostIdentity) -> Result<Arc<ClientConfig>, PkiError> {
        let (provider, versions) = self.provider()?;
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)?
            .with_root_certificates(id.roots()?)
            .with_client_auth_cert(id.chain()?, id.key()?)?;
        cfg.enable_secret_extraction = true;
        Ok(Arc::new(cfg))
    }
}

/// The host named by a certificate: its `ferry-host://` URI SAN, which must
/// agree with a DNS SAN.
pub fn host_of_certificate(der: &CertificateDer<'_>) -> Result<String, PkiError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::NoPeerHost(format!("unparsable certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::NoPeerHost(format!("bad SAN extension: {e}")))?
        .ok_or_else(|| PkiError::NoPeerHost("no subject alternative names".into()))?;
    let names = &san.value.general_names;
    let host = names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix(HOST_URI_SCHEME),
            _ => None,
        })
        .ok_or_else(|| PkiError::NoPeerHost(format!("no {HOST_URI_SCHEME} URI SAN")))?;
    if !names
        .iter()
        .any(|n| matches!(n, GeneralName::DNSName(d) if *d == host))
    {
        return Err(PkiError::NoPeerHost(format!(
            "URI SAN names {host} but no DNS SAN does"
        )));
    }
    Ok(host.to_string())
}

/// The host name of a TLS peer, from its verified certificate (rustls has
/// already checked the chain to the cluster CA before this is called).
pub fn peer_host(conn: &rustls::CommonState) -> Result<String, PkiError> {
    let certs = conn
        .peer_certificates()
        .ok_or_else(|| PkiError::NoPeerHost("the peer sent no certificate".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| PkiError::NoPeerHost("empty certificate chain".into()))?;
    host_of_certificate(leaf)
}
