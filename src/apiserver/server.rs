//! Starting and stopping the server: credentials, storage, the TLS listener
//! and the background controllers.
//!
//! ```text
//! start(config) ─► pki::prepare ─► Store::open ─► install stored CRDs
//!               ─► bind ─► kubeconfig ─► spawn { accept loop, controllers }
//!               ◄─ ApiServerHandle { addr, kubeconfig, tokens, shutdown }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::http::{self, ApiState};
use super::pki::{self, PkiError, Tokens};
use super::resources::Registry;
use super::store::{Store, StoreError};
use super::{bootstrap, controllers};

/// How the server is started.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Where the database, certificates, tokens and kubeconfig live.
    pub data_dir: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Agent host names; each gets a token `agent-<host>`.
    pub agents: Vec<String>,
    /// How many events the log keeps for watch resumption; older
    /// resourceVersions answer 410 Gone.
    pub event_window: usize,
}

/// Enough for a few minutes of a busy cluster of this size: kube-rs
/// watchers re-watch from their last version well within that.
pub const DEFAULT_EVENT_WINDOW: usize = 20_000;

impl ApiServerConfig {
    /// Defaults: `127.0.0.1:6443`, no agents, [`DEFAULT_EVENT_WINDOW`].
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
            agents: Vec::new(),
            event_window: DEFAULT_EVENT_WINDOW,
        }
    }
}

/// Failure to start the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Credentials could not be created or read.
    #[error("preparing credentials: {0}")]
    Pki(#[from] PkiError),
    /// The database could not be opened.
    #[error("opening storage: {0}")]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS configuration was rejected.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The signal handlers could not be installed.
    #[error("installing signal handlers: {source}")]
    Signal {
        /// The cause.
        source: std::io::Error,
    },
    /// A kube client could not be built.
    #[error("building a client: {0}")]
    Client(String),
}

/// A running server.
pub struct ApiServerHandle {
    addr: SocketAddr,
    kubeconfig: PathBuf,
    ca_pem: String,
    tokens: Tokens,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl ApiServerHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let host = if self.addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else if self.addr.is_ipv6() {
            format!("[{}]", self.addr.ip())
        } else {
            self.addr.ip().to_string()
        };
        format!("https://{host}:{}", self.addr.port())
    }
    /// Path of the admin kubeconfig.
    pub fn kubeconfig_path(&self) -> &std::path::Path {
        &self.kubeconfig
    }
    /// The CA certificate (PEM) clients must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
    /// The tokens.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }
    /// The admin token.
    pub fn admin_token(&self) -> &str {
        self.tokens.token_for(pki::ADMIN_USER).unwrap_or_default()
    }
    /// A kubeconfig document that authenticates with `token`.
    pub fn kubeconfig_for(&self, token: &str) -> String {
        pki::kubeconfig_yaml(&self.url(), &self.ca_pem, "ferry", token)
    }
    /// A kube client authenticating with `token`.
    pub async fn client_for(&self, token: &str) -> Result<kube::Client, ApiServerError> {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_for(token))
            .map_err(|e| ApiServerError::Client(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| ApiServerError::Client(e.to_string()))?;
        kube::Client::try_from(config).map_err(|e| ApiServerError::Client(e.to_string()))
    }
    /// A kube client with the admin token.
    pub async fn admin_client(&self) -> Result<kube::Client, ApiServerError> {
        self.client_for(self.admin_token()).await
    }
    /// Stop accepting, end watches and connections, and wait for them.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
    }
    /// Resolves when the server has stopped (after [`Self::shutdown`] from
    /// elsewhere, or never); for `ferry apiserver`'s main loop.
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn tls_config(creds: &pki::Credentials) -> Result<rustls::ServerConfig, ApiServerError> {
    let tls = |e: &dyn std::fmt::Display| ApiServerError::Tls(e.to_string());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(creds.server_cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| tls(&e))?;
    let key =
        PrivateKeyDer::from_pem_slice(creds.server_key_pem.as_bytes()).map_err(|e| tls(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(&e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| tls(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Run the server until SIGINT or SIGTERM, then shut down gracefully: what
/// `ferry apiserver --data-dir DIR [--listen ADDR]` does. `on_ready` is
/// called with the running handle (to print the kubeconfig path, say).
pub async fn serve(
    config: ApiServerConfig,
    on_ready: impl FnOnce(&ApiServerHandle),
) -> Result<(), ApiServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|source| ApiServerError::Signal { source })?;
    let handle = start(config).await?;
    on_ready(&handle);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("apiserver shutting down");
    handle.shutdown().await;
    Ok(())
}

/// Start the server; it runs until the handle is shut down or dropped.
pub async fn start(config: ApiServerConfig) -> Result<ApiServerHandle, ApiServerError> {
    let creds = pki::prepare(&config.data_dir, config.listen, &config.agents)?;
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&creds)?));
    let db_path = config.data_dir.join("state.redb");
    let window = config.event_window;
    let store = tokio::task::spawn_blocking(move || Store::open(&db_path, window))
        .await
        .map_err(|e| ApiServerError::Tls(format!("storage task: {e}")))??;
    let registry = Registry::with_builtins();
    bootstrap::ensure(&store, &registry)?;

    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| ApiServerError::Bind {
                addr: config.listen,
                source,
            })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ApiServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let cancel = CancellationToken::new();
    let state = ApiState::new(store, registry, creds.tokens.clone(), cancel.clone());

    let mut handle = ApiServerHandle {
        addr,
        kubeconfig: PathBuf::new(),
        ca_pem: creds.ca_pem.clone(),
        tokens: creds.tokens.clone(),
        cancel: cancel.clone(),
        tasks: JoinSet::new(),
    };
    let kubeconfig = pki::kubeconfig_yaml(
        &handle.url(),
        &creds.ca_pem,
        pki::ADMIN_USER,
        handle.admin_token(),
    );
    handle.kubeconfig = pki::write_kubeconfig(&config.data_dir, &kubeconfig)?;

    handle
        .tasks
        .spawn(controllers::run(state.clone(), cancel.clone()));
    handle
        .tasks
        .spawn(accept_loop(listener, tls, state, cancel));
    tracing::info!(%addr, "apiserver listening");
    Ok(handle)
}

async fn accept_loop(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    state: ApiState,
    cancel: CancellationToken,
) {
    let router = http::router(state);
    let mut conns = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let service = TowerToHyperService::new(router.clone());
        let cancel = cancel.clone();
        conns.spawn(async move {
            let stream = match tls.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(3), conn.as_mut()).await;
                }
            }
        });
    }
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(4), drain)
        .await
        .is_err()
    {
        conns.abort_all();
    }
}
