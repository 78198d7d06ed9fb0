//! The long-running programs: `ferry apiserver`, `ferry agent run|watchdog`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::agent::daemon::AgentConfig;
use crate::agent::pki::TlsSettings;
use crate::api::{Duration as ApiDuration, Quantity};

/// `ferry apiserver`.
#[derive(Args, Debug)]
pub struct ApiServerArgs {
    /// Where the database, certificates, tokens and kubeconfig live.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
    /// Agent host names that get their own token (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub agents: Vec<String>,
}

/// Serve the embedded API server until Ctrl-C or SIGTERM.
pub async fn apiserver(args: ApiServerArgs) -> anyhow::Result<()> {
    let mut config = crate::apiserver::server::ApiServerConfig::new(&args.data_dir);
    config.listen = args.listen;
    config.agents = args.agents;
    let handle = crate::apiserver::server::start(config)
        .await
        .context("starting the API server")?;
    eprintln!(
        "API server on {}; kubeconfig: {}",
        handle.url(),
        handle.kubeconfig_path().display()
    );
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

/// `ferry agent …`.
#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Run the agent of one host.
    Run(Box<AgentArgs>),
    /// The fencing watchdog of a state directory (started by the agent).
    Watchdog {
        /// The agent's state directory.
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Issue this host's relay certificate from the cluster CA (the Helm
    /// chart's init container): reads `ca.crt` and `ca.key` (PKCS#8) from
    /// `--ca-dir`, writes `ca.crt`, `host.crt` and `host.key` to `--pki-dir`.
    Certificate {
        /// The host the certificate names.
        #[arg(long, env = "FERRY_HOST")]
        host: String,
        /// Directory with the CA's `ca.crt` and `ca.key`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where the agent's `--pki-dir` will read the result.
        #[arg(long)]
        pki_dir: PathBuf,
    },
}

/// `ferry agent run`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This host's name (its Host, Lease and certificate).
    #[arg(long, env = "FERRY_HOST")]
    pub host: String,
    /// Kubeconfig of the agent's identity.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// QEMU state: pid files, sockets, kernels.
    #[arg(long, default_value = "/var/lib/ferry")]
    pub state_dir: PathBuf,
    /// Directory with ca.crt, host.crt and host.key of this host.
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// Where the relay accepts migration streams (the migration network).
    #[arg(long, default_value = "0.0.0.0:7443")]
    pub migration_listen: SocketAddr,
    /// `address:port` other agents dial (default: the listen address).
    #[arg(long)]
    pub migration_advertise: Option<String>,
    /// The scheduling cluster.
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// Host labels, `key=value` (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// vCPUs offered to VMs (default: the host's).
    #[arg(long)]
    pub capacity_cpus: Option<u32>,
    /// Memory offered to VMs, a quantity such as 4Gi (default: the host's).
    #[arg(long)]
    pub capacity_memory: Option<Quantity>,
    /// Lease duration.
    #[arg(long, default_value = "40s")]
    pub lease_duration: ApiDuration,
    /// How often the Lease is renewed and the Host refreshed.
    #[arg(long, default_value = "2s")]
    pub renew_interval: ApiDuration,
    /// After this long without renewing the Lease, this host's VMs are stopped.
    #[arg(long, default_value = "40s")]
    pub fence_after: ApiDuration,
    /// Cancel a transfer whose bytes stand still this long (at least).
    #[arg(long, default_value = "10s")]
    pub stall_timeout: ApiDuration,
    /// A file whose number is reported as this host's CPU load (testing).
    #[arg(long)]
    pub simulated_load_file: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = crate::agent::qemu::DEFAULT_QEMU)]
    pub qemu: String,
    /// TLS cipher suites of the relay, in preference order (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub tls_cipher_suites: Vec<String>,
    /// Do not start the fencing watchdog (VMs then survive a cut-off host).
    #[arg(long)]
    pub no_watchdog: bool,
    /// A VM network and the host bridge its taps join, `NAME=BRIDGE`
    /// (repeatable); unmapped networks use QEMU's user networking.
    #[arg(long = "network", value_name = "NAME=BRIDGE")]
    pub networks: Vec<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} is not key=value"))
}

/// Run `ferry agent …`.
pub async fn agent(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::Watchdog { state_dir } => {
            tokio::task::spawn_blocking(move || crate::agent::daemon::watchdog::run(&state_dir))
                .await
                .context("the watchdog thread")?
                .context("the fencing watchdog")
        }
        AgentCommand::Run(args) => run_agent(*args).await,
        AgentCommand::Certificate {
            host,
            ca_dir,
            pki_dir,
        } => {
            let read = |name: &str| {
                let path = ca_dir.join(name);
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))
            };
            let ca = crate::agent::pki::ClusterCa::from_pem(&read("ca.crt")?, &read("ca.key")?)?;
            ca.issue_host(&host)?.save(&pki_dir)?;
            Ok(())
        }
    }
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let client = crate::cli::client::connect_path(args.kubeconfig.as_deref()).await?;
    let tls = if args.tls_cipher_suites.is_empty() {
        TlsSettings::default()
    } else {
        TlsSettings {
            cipher_suites: args.tls_cipher_suites.clone(),
        }
    };
    let config = AgentConfig {
        host: args.host,
        cluster: args.cluster,
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        state_dir: args.state_dir,
        qemu_binary: args.qemu,
        migration_listen: args.migration_listen,
        migration_advertise: args.migration_advertise,
        pki_dir: args.pki_dir,
        tls,
        capacity_cpus: args
            .capacity_cpus
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32)),
        capacity_memory: args.capacity_memory.map(|q| q.bytes()),
        lease_duration: args.lease_duration.get(),
        renew_interval: args.renew_interval.get().max(Duration::from_millis(100)),
        fence_after: args.fence_after.get(),
        simulated_load_file: args.simulated_load_file,
        stall_timeout: args.stall_timeout.get(),
        watchdog: !args.no_watchdog,
        networks: crate::agent::net::BridgeMap::parse(&args.networks)?,
    };
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    crate::agent::daemon::run(config, client, shutdown)
        .await
        .map_err(|e| anyhow::anyhow!(crate::agent::daemon::error_chain(&e)))
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// Install tracing for a daemon: `RUST_LOG` or `info`, to stderr.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// `ferry controller`.
#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// Kubeconfig of the controller's identity.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The agents' Lease duration: a host silent this long is Unreachable.
    #[arg(long, default_value = "10s")]
    pub lease_duration: ApiDuration,
    /// Serve Prometheus `/metrics`, `/healthz` and `/readyz` here.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Run the controller until Ctrl-C or SIGTERM.
pub async fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    let client = crate::cli::client::connect_path(args.kubeconfig.as_deref()).await?;
    let config = crate::controller::ControllerConfig {
        lease_duration: args.lease_duration.get(),
        metrics_listen: args.metrics_listen,
        ..crate::controller::ControllerConfig::default()
    };
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    crate::controller::run(client, config, shutdown)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}
