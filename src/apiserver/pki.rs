//! The data directory's credentials: a CA, a serving certificate, bearer
//! tokens and the admin kubeconfig.
//!
//! ```text
//! DIR/ca.crt, DIR/ca.key          generated once, reused on every start
//! DIR/server.crt, DIR/server.key  re-signed by the CA on every start, so its
//!                                 SANs always cover the current listen address
//! DIR/tokens/<name>               one bearer token per identity (admin,
//!                                 controller, agent-<host>), generated once
//! DIR/kubeconfig                  admin kubeconfig for kubectl and kube-rs
//! DIR/tokens.csv                  optional static tokens, kube-apiserver's
//!                                 `--token-auth-file` format (read, never
//!                                 written): `token,user,uid,"group1,group2"`;
//!                                 e.g. service-account identities
//!                                 `system:serviceaccount:<ns>:<name>`; plus
//!                                 an optional fifth column of user extras,
//!                                 `"key=value,key=value"` (see [`static_tokens`])
//! ```
//!
//! Agent tokens (`agent-<host>`) carry the extra
//! `authentication.kubernetes.io/node-name: [<host>]`, as a Kubernetes 1.32+
//! pod-bound service-account token of a pod on that node does; admission
//! policies read it as `request.userInfo.extra`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Failure to create or read the data directory's credentials.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file in the data directory could not be read or written.
    #[error("credential file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate {what}: {source}")]
    Cert {
        /// Which certificate.
        what: &'static str,
        /// The cause.
        source: rcgen::Error,
    },
}

/// The identity a bearer token authenticates as.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// The user name RBAC subjects of kind `User` match.
    pub user: String,
    /// The user's UID (`userInfo.uid`), "" if none.
    pub uid: String,
    /// The groups RBAC subjects of kind `Group` match.
    pub groups: Vec<String>,
    /// Extra attributes (`userInfo.extra`), e.g. [`NODE_NAME_EXTRA`].
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The user extra naming the node of a pod-bound service-account token
/// (Kubernetes 1.32+).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

impl Identity {
    /// Whether this identity bypasses authorization (`system:masters`, as in
    /// Kubernetes).
    pub fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// The user name of the admin token.
pub const ADMIN_USER: &str = "ferry:admin";
/// The user name of the controller token.
pub const CONTROLLER_USER: &str = "ferry:controller";

/// The user name of the agent token for `host`.
pub fn agent_user(host: &str) -> String {
    format!("ferry:agent:{host}")
}

/// Every token known to the server: token string → identity.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_token: BTreeMap<String, Identity>,
    by_user: BTreeMap<String, String>,
}

impl Tokens {
    /// The identity of `token`, if it is one of ours.
    pub fn authenticate(&self, token: &str) -> Option<&Identity> {
        self.by_token.get(token)
    }
    /// The token of `user` (e.g. [`ADMIN_USER`], [`CONTROLLER_USER`],
    /// [`agent_user`]).
    pub fn token_for(&self, user: &str) -> Option<&str> {
        self.by_user.get(user).map(String::as_str)
    }
    /// All (user, token) pairs.
    pub fn all(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_user.iter().map(|(u, t)| (u.as_str(), t.as_str()))
    }
}

/// The material the server needs to serve TLS and authenticate clients.
pub struct Credentials {
    /// CA certificate, PEM.
    pub ca_pem: String,
    /// Serving certificate chain (leaf), PEM.
    pub server_cert_pem: String,
    /// Serving key, PEM.
    pub server_key_pem: String,
    /// The tokens.
    pub tokens: Tokens,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn random_token() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Load or create the CA, sign a fresh serving certificate for `listen`, and
/// load or create a token per identity (admin, controller, one per agent host).
pub fn prepare(dir: &Path, listen: SocketAddr, agents: &[String]) -> Result<Credentials, PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let ca_crt = dir.join("ca.crt");
    let ca_key = dir.join("ca.key");
    let cert_err = |what| move |source| PkiError::Cert { what, source };
    let (ca_pem, ca_key_pair) = if ca_crt.exists() && ca_key.exists() {
        let pem = fs::read_to_string(&ca_crt).map_err(io_err(&ca_crt))?;
        let key_pem = fs::read_to_string(&ca_key).map_err(io_err(&ca_key))?;
        let key = KeyPair::from_pem(&key_pem).map_err(cert_err("CA key"))?;
        (pem, key)
    } else {
        let key = KeyPair::generate().map_err(cert_err("CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ferry-apiserver-ca");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(cert_err("CA"))?;
        write_private(&ca_key, &key.serialize_pem())?;
        write_private(&ca_crt, &cert.pem())?;
        (cert.pem(), key)
    };
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key_pair).map_err(cert_err("CA"))?;

    let mut sans: Vec<SanType> = vec![
        SanType::DnsName("localhost".try_into().map_err(cert_err("server SAN"))?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::IpAddress("::1".parse().unwrap_or(IpAddr::from([0u16; 8]))),
    ];
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        sans.push(SanType::IpAddress(listen.ip()));
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("server"))?;
    params.subject_alt_names = sans;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "ferry-apiserver");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().map_err(cert_err("server key"))?;
    let server_cert = params
        .signed_by(&server_key, &issuer)
        .map_err(cert_err("server"))?;
    write_private(&dir.join("server.key"), &server_key.serialize_pem())?;
    write_private(&dir.join("server.crt"), &server_cert.pem())?;

    let token_dir = dir.join("tokens");
    fs::create_dir_all(&token_dir).map_err(io_err(&token_dir))?;
    let mut tokens = Tokens::default();
    let mut identities = vec![
        (
            "admin".to_string(),
            Identity {
                user: ADMIN_USER.into(),
                groups: vec!["system:masters".into(), "system:authenticated".into()],
                ..Identity::default()
            },
        ),
        (
            "controller".to_string(),
            Identity {
                user: CONTROLLER_USER.into(),
                groups: vec!["ferry:controllers".into(), "system:authenticated".into()],
                ..Identity::default()
            },
        ),
    ];
    for host in agents {
        identities.push((
            format!("agent-{host}"),
            Identity {
                user: agent_user(host),
                groups: vec!["ferry:agents".into(), "system:authenticated".into()],
                extra: BTreeMap::from([(NODE_NAME_EXTRA.to_string(), vec![host.clone()])]),
                ..Identity::default()
            },
        ));
    }
    for (file, identity) in identities {
        let path = token_dir.join(&file);
        let token = if path.exists() {
            fs::read_to_string(&path)
                .map_err(io_err(&path))?
                .trim()
                .to_string()
        } else {
            let t = random_token();
            write_private(&path, &t)?;
            t
        };
        tokens.by_user.insert(identity.user.clone(), token.clone());
        tokens.by_token.insert(token, identity);
    }
    let static_file = dir.join("tokens.csv");
    if static_file.exists() {
        let text = fs::read_to_string(&static_file).map_err(io_err(&static_file))?;
        for (token, identity) in static_tokens(&text) {
            tokens.by_user.insert(identity.user.clone(), token.clone());
            tokens.by_token.insert(token, identity);
        }
    }
    Ok(Credentials {
        ca_pem,
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        tokens,
    })
}

/// The fields of one CSV line: commas separate fields except inside double
/// quotes; `""` inside quotes is a quote.
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                if let Some(f) = fields.last_mut() {
                    f.push('"');
                }
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields.into_iter().map(|f| f.trim().to_string()).collect()
}

/// The entries of a kube-apiserver static token file: one
/// `token,user,uid[,"group1,group2"[,"key=value,key=value"]]` per line;
/// blank lines, `#` comments and lines with fewer than three fields are
/// skipped. The fifth column is Ferry's: user extras (`userInfo.extra`),
/// a key repeated for several values, e.g.
/// `"authentication.kubernetes.io/node-name=node-a"` to stand for a
/// pod-bound service-account token (kube-apiserver ignores columns past the
/// fourth). Every identity is also in `system:authenticated`; a
/// `system:serviceaccount:<ns>:<name>` user also gets the groups Kubernetes
/// gives service accounts.
pub fn static_tokens(text: &str) -> Vec<(String, Identity)> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields = csv_fields(line);
        let [token, user, uid, rest @ ..] = fields.as_slice() else {
            continue;
        };
        let list = |i: usize| -> Vec<String> {
            rest.get(i)
                .map(|f| {
                    f.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut groups = list(0);
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for kv in list(1) {
            if let Some((k, v)) = kv.split_once('=') {
                extra
                    .entry(k.trim().to_string())
                    .or_default()
                    .push(v.trim().to_string());
            }
        }
        if let Some(ns) = user
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(ns, _)| ns)
        {
            groups.push("system:serviceaccounts".into());
            groups.push(format!("system:serviceaccounts:{ns}"));
        }
        groups.push("system:authenticated".into());
        out.push((
            token.clone(),
            Identity {
                user: user.clone(),
                uid: uid.clone(),
                groups,
                extra,
            },
        ));
    }
    out
}

/// A kubeconfig document for `server` that authenticates with `token`.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferry\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: \"{user}\"\n  user:\n    token: {token}\ncontexts:\n- name: ferry\n  context:\n    cluster: ferry\n    user: \"{user}\"\n    namespace: default\ncurrent-context: ferry\npreferences: {{}}\n"
    )
}

/// Write `DIR/kubeconfig` for the admin.
pub fn write_kubeconfig(dir: &Path, contents: &str) -> Result<PathBuf, PkiError> {
    let path = dir.join("kubeconfig");
    write_private(&path, contents)?;
    Ok(path)
}
