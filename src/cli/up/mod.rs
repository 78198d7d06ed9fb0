//! `ferry up`: a whole Ferry cluster on one machine, in the foreground.
//!
//! ```text
//!  lock DIR ─► check QEMU ─► API server (in process) ─► CRDs Established,
//!  ferry-system, RBAC, MigrationPolicy "default" ─► network (root: one
//!  namespace per host, management bridge + forwarder, VM network
//!  `default` with its switch and client namespaces; ConfigMap
//!  ferry-up-network) ─► [--demo VMs, placed] ─► CA and host certificates ─►
//!  agents (children, `--network default=br-ferry`) ─► Hosts published ─►
//!  controller (child) ─► "ready"
//!        … Ctrl-C / SIGTERM …
//!  agents stopped ─► their QEMUs and watchdogs stopped ─► namespaces and
//!  links removed ─► API server stopped ─► lock released
//! ```
//!
//! Everything lives in the data directory (see [`layout`]), so a second run
//! on it resumes the same cluster: same CA, tokens, objects, certificates
//! and subnet; the VMs placed on a host are started again by its agent.
//! After a crash of `ferry up` itself (its children outlive it), the next
//! run stops the stale agents and controller and adopts the running QEMUs.
//!
//! The controller runs as a child (`ferry controller`) in the root
//! namespace, with its own token; it marks Hosts Active or Unreachable from
//! their Leases, places VMs without a host and runs Migrations. The demo
//! VMs are placed round-robin by hand before the agents start, so they are
//! spread across the hosts whatever the scheduling policy says.

pub mod children;
pub mod cluster;
pub mod demo;
pub mod layout;
pub mod netns;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::api::Quantity;
use children::Child;
use layout::{Layout, LayoutError, host_name};

/// What `ferry up` prints once everything is running; the end-to-end tests
/// wait for this line.
pub const READY_LINE: &str = "ferry up: ready";
/// The port the relay of every agent listens on inside its namespace.
const RELAY_PORT: u16 = 7443;
/// How long agents get to publish their Host.
const HOSTS_TIMEOUT: Duration = Duration::from_secs(60);
/// The agents' Lease duration, which the controller must be told too.
const LEASE_DURATION: &str = "10s";
/// How long a child gets after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `ferry up`.
#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Number of hosts (agents).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub hosts: u32,
    /// Create a few small test-guest VMs across the hosts.
    #[arg(long)]
    pub demo: bool,
    /// How many VMs `--demo` creates.
    #[arg(long, default_value_t = 3)]
    pub demo_vms: u32,
    /// What the demo VMs run: `auto` puts demo-1 on the Linux test guest
    /// with an address on the VM network when both are available.
    #[arg(long, value_enum, default_value_t = demo::DemoGuest::Auto)]
    pub demo_guest: demo::DemoGuest,
    /// Where the cluster lives; run again on it to resume.
    #[arg(long, default_value = ".ferry")]
    pub data_dir: PathBuf,
    /// Address of the API server; port 0 picks a free port, which the
    /// kubeconfig names.
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
    /// Memory each host offers to VMs.
    #[arg(long, default_value = "1Gi")]
    pub host_memory: Quantity,
    /// vCPUs each host offers to VMs.
    #[arg(long, default_value_t = 4)]
    pub host_cpus: u32,
    /// Run every host in the root network namespace on loopback ports even
    /// as root.
    #[arg(long)]
    pub no_netns: bool,
    /// The QEMU binary.
    #[arg(long, default_value = crate::agent::qemu::DEFAULT_QEMU)]
    pub qemu: String,
    /// After this long without renewing its Lease, a host's VMs are stopped.
    #[arg(long, default_value = "40s")]
    pub fence_after: crate::api::Duration,
}

/// Why `ferry up` could not start.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// QEMU is not installed.
    #[error(
        "QEMU ({binary}) cannot be run: {source}. Install it (`apt-get install qemu-system-x86`, or `source scripts/setup.sh && ferry_setup`) or pass --qemu PATH"
    )]
    QemuMissing {
        /// The binary.
        binary: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The API server's port is taken.
    #[error(
        "cannot listen on {addr}: {source} (another `ferry up` or API server may use it; pass --listen 127.0.0.1:PORT)"
    )]
    PortTaken {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The data directory.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The API server.
    #[error("starting the API server")]
    ApiServer(#[from] crate::apiserver::ApiServerError),
    /// Installing the cluster's objects.
    #[error("setting up the cluster")]
    Cluster(#[from] cluster::ClusterError),
    /// The network namespaces.
    #[error("setting up the hosts' network namespaces")]
    Network(#[from] netns::NetnsError),
    /// The Linux guest that `--demo-guest linux` asked for.
    #[error(transparent)]
    DemoGuest(#[from] demo::DemoGuestUnavailable),
    /// A child process.
    #[error("starting a child process")]
    Child(#[from] children::ChildError),
    /// Agents that did not publish their Host.
    #[error(
        "hosts {hosts:?} did not come up within {HOSTS_TIMEOUT:?}; last lines of their logs:\n{logs}"
    )]
    HostsMissing {
        /// The hosts.
        hosts: Vec<String>,
        /// The tails of their logs.
        logs: String,
    },
}

/// What runs, so that it can be stopped in order.
#[derive(Default)]
struct Running {
    api: Option<crate::apiserver::ApiServerHandle>,
    network: Option<netns::Network>,
    forwarder: Option<CancellationToken>,
    children: Vec<Child>,
    state_dirs: Vec<PathBuf>,
}

impl Running {
    async fn stop(mut self) {
        let stops = self.children.iter_mut().map(|c| c.stop(STOP_GRACE));
        futures::future::join_all(stops).await;
        for dir in &self.state_dirs {
            let dir = dir.clone();
            let _ = tokio::task::spawn_blocking(move || {
                layout::stop_host_vms(&dir, Duration::from_secs(3))
            })
            .await;
        }
        if let Some(f) = self.forwarder.take() {
            f.cancel();
        }
        if let Some(net) = self.network.take() {
            let _ = tokio::task::spawn_blocking(move || netns::teardown(&net)).await;
        }
        if let Some(api) = self.api.take() {
            api.shutdown().await;
        }
    }
}

/// Run `ferry up` until Ctrl-C or SIGTERM.
pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let layout = Layout::create(&args.data_dir)?;
    let _lock = layout.lock()?;
    check_qemu(&args.qemu).await?;
    // An instance killed outright leaves its children running; the lock
    // is ours, so they are stale. Their QEMUs stay, to be adopted.
    let dir = layout.dir.clone();
    let stale = tokio::task::spawn_blocking(move || layout::stop_stale_daemons(&dir))
        .await
        .unwrap_or_default();
    if !stale.is_empty() {
        eprintln!(
            "ferry up: stopped {} daemons of an earlier run that was killed",
            stale.len()
        );
    }
    let mut running = Running::default();
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        crate::cli::daemons::shutdown_signal().await;
        on_signal.cancel();
    });
    let started = tokio::select! {
        r = start(&args, &layout, &mut running) => r,
        _ = shutdown.cancelled() => Ok(()),
    };
    if let Err(e) = started {
        running.stop().await;
        return Err(e.into());
    }
    if !shutdown.is_cancelled() {
        println!("{READY_LINE}");
        supervise(&mut running, &shutdown).await;
    }
    eprintln!("ferry up: stopping agents, VMs and network…");
    running.stop().await;
    eprintln!(
        "ferry up: stopped; run again with --data-dir {} to resume",
        layout.dir.display()
    );
    Ok(())
}

async fn check_qemu(binary: &str) -> Result<(), UpError> {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .map_err(|source| UpError::QemuMissing {
            binary: binary.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(UpError::QemuMissing {
            binary: binary.to_string(),
            source: std::io::Error::other(format!(
                "`{binary} --version` exited with {}",
                out.status
            )),
        })
    }
}

async fn start(args: &UpArgs, layout: &Layout, running: &mut Running) -> Result<(), UpError> {
    let hosts: Vec<String> = (1..=args.hosts).map(host_name).collect();
    let mut config = crate::apiserver::ApiServerConfig::new(&layout.dir);
    config.listen = args.listen;
    config.agents = hosts.clone();
    let api = match crate::apiserver::start(config).await {
        Ok(api) => api,
        Err(crate::apiserver::ApiServerError::Bind { addr, source }) => {
            return Err(UpError::PortTaken { addr, source });
        }
        Err(e) => return Err(e.into()),
    };
    let admin = api.admin_client().await?;
    let api_addr = api.addr();
    let url = api.url();
    let ca_pem = api.ca_pem().to_string();
    let tokens = api.tokens().clone();
    running.api = Some(api);
    cluster::install_crds(&admin).await?;
    cluster::install_access(&admin).await?;
    cluster::install_default_policy(&admin).await?;

    let use_netns = !args.no_netns && netns::available();
    // What the agents dial: the API server itself, or from the namespaces
    // the bridge address (forwarded to loopback, or served directly when
    // the API server listens on every address).
    let (agent_server, tls_name) = if use_netns {
        let id = layout.instance_id();
        let hosts_n = args.hosts;
        let file = layout.network_file();
        let (net, kept) = tokio::task::spawn_blocking(move || netns::setup(&id, hosts_n, &file))
            .await
            .map_err(|e| netns::NetnsError::Io {
                what: "the network setup task".into(),
                source: std::io::Error::other(e),
            })??;
        if kept {
            eprintln!(
                "ferry up: kept the network namespaces of the earlier run (its VMs stay connected)"
            );
        }
        let gateway = net.gateway();
        running.network = Some(net);
        if !api_addr.ip().is_unspecified() {
            let front = SocketAddr::from((gateway, api_addr.port()));
            let listener = tokio::net::TcpListener::bind(front)
                .await
                .map_err(|source| UpError::PortTaken {
                    addr: front,
                    source,
                })?;
            let cancel = CancellationToken::new();
            tokio::spawn(children::forward(listener, api_addr, cancel.clone()));
            running.forwarder = Some(cancel);
        }
        (
            format!("https://{gateway}:{}", api_addr.port()),
            Some("localhost"),
        )
    } else {
        (url.clone(), None)
    };
    let net_info = running.network.as_ref().map(|net| cluster::NetworkInfo {
        network: netns::VM_NETWORK.into(),
        subnet: netns::VM_SUBNET.into(),
        client_namespace: net.client_namespace(),
        ping: demo::ping_command(),
    });
    cluster::publish_network(&admin, net_info.as_ref()).await?;
    let mut demo_lines = Vec::new();
    if args.demo {
        let (requested, networked) = (args.demo_guest, net_info.is_some());
        let choice = tokio::task::spawn_blocking(move || demo::choose(requested, networked))
            .await
            .map_err(|e| children::ChildError::Spawn {
                what: "the demo guest task".into(),
                source: std::io::Error::other(e),
            })??;
        eprintln!("ferry up: {}", choice.note);
        let vms = demo::install(&admin, args.demo_vms, &hosts, choice.linux.as_ref()).await?;
        demo_lines = vms
            .iter()
            .map(|vm| vm.describe(net_info.as_ref()))
            .collect();
    }

    let ca = layout.cluster_ca()?;
    let exe = std::env::current_exe().map_err(|source| children::ChildError::Spawn {
        what: "finding the ferry executable".into(),
        source,
    })?;
    for (i, host) in (1..=args.hosts).zip(&hosts) {
        let pki_dir = layout.host_identity(&ca, host)?;
        let host_dir = layout.host_dir(host);
        let user = crate::apiserver::pki::agent_user(host);
        let token = tokens.token_for(&user).unwrap_or_default();
        let kubeconfig = host_dir.join("kubeconfig");
        layout::write_private(
            &kubeconfig,
            &children::daemon_kubeconfig(&agent_server, &ca_pem, tls_name, &user, token),
        )?;
        let (listen, ns) = match &running.network {
            Some(net) => (
                SocketAddr::from((net.address(i), RELAY_PORT)),
                Some(net.namespace(i)),
            ),
            None => (free_loopback_port().await?, None),
        };
        let state_dir = layout.state_dir(host);
        running.state_dirs.push(state_dir.clone());
        let mut agent_args: Vec<String> = vec![
            "agent".into(),
            "run".into(),
            "--host".into(),
            host.clone(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--pki-dir".into(),
            pki_dir.display().to_string(),
            "--migration-listen".into(),
            listen.to_string(),
            "--capacity-memory".into(),
            args.host_memory.to_string(),
            "--capacity-cpus".into(),
            args.host_cpus.to_string(),
            "--renew-interval".into(),
            "1s".into(),
            "--lease-duration".into(),
            LEASE_DURATION.into(),
            "--fence-after".into(),
            args.fence_after.to_string(),
            "--qemu".into(),
            args.qemu.clone(),
            // A number written here replaces the host's measured CPU load
            // (one machine standing in for loaded and idle hosts); absent,
            // the load is measured.
            "--simulated-load-file".into(),
            host_dir.join("cpu-load").display().to_string(),
        ];
        if running.network.is_some() {
            agent_args.push("--network".into());
            agent_args.push(format!("{}={}", netns::VM_NETWORK, netns::VM_BRIDGE));
        }
        let child = Child::spawn(
            format!("agent {host}"),
            &exe,
            &agent_args,
            ns.as_deref(),
            host_dir.join("agent.log"),
            &host_dir.join("agent.pid"),
        )?
        .restart(children::Restart::WhileWatchdogRuns(state_dir));
        running.children.push(child);
    }

    if let Err(missing) = cluster::wait_for_hosts(&admin, &hosts, HOSTS_TIMEOUT).await {
        let logs = missing
            .iter()
            .map(|h| {
                let log = layout.host_dir(h).join("agent.log");
                format!("== {} ==\n{}", log.display(), children::log_tail(&log, 10))
            })
            .collect::<Vec<_>>()
            .join("\n");
        return Err(UpError::HostsMissing {
            hosts: missing,
            logs,
        });
    }
    start_controller(layout, &exe, &url, &ca_pem, &tokens, running)?;
    print_banner(
        args,
        layout,
        &url,
        running.network.as_ref(),
        net_info.as_ref(),
        &demo_lines,
    );
    Ok(())
}

/// Start `ferry controller` with the controller's token, in the root
/// namespace (it reaches the API server on loopback).
fn start_controller(
    layout: &Layout,
    exe: &std::path::Path,
    url: &str,
    ca_pem: &str,
    tokens: &crate::apiserver::pki::Tokens,
    running: &mut Running,
) -> Result<(), UpError> {
    let user = crate::apiserver::pki::CONTROLLER_USER;
    let kubeconfig = layout.dir.join("controller.kubeconfig");
    layout::write_private(
        &kubeconfig,
        &children::daemon_kubeconfig(
            url,
            ca_pem,
            None,
            user,
            tokens.token_for(user).unwrap_or_default(),
        ),
    )?;
    let args = vec![
        "controller".to_string(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--lease-duration".into(),
        LEASE_DURATION.into(),
    ];
    let child = Child::spawn(
        "controller",
        exe,
        &args,
        None,
        layout.dir.join("controller.log"),
        &layout.dir.join("controller.pid"),
    )?
    .restart(children::Restart::Always);
    running.children.push(child);
    Ok(())
}

async fn free_loopback_port() -> Result<SocketAddr, UpError> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let l = tokio::net::TcpListener::bind(any)
        .await
        .map_err(|source| UpError::PortTaken { addr: any, source })?;
    l.local_addr()
        .map_err(|source| UpError::PortTaken { addr: any, source })
}

/// Report children that end while `ferry up` runs and start them again
/// ([`children::supervise`]), until shutdown.
async fn supervise(running: &mut Running, shutdown: &CancellationToken) {
    children::supervise(&mut running.children, shutdown).await;
}

fn print_banner(
    args: &UpArgs,
    layout: &Layout,
    url: &str,
    net: Option<&netns::Network>,
    info: Option<&cluster::NetworkInfo>,
    demo_vms: &[String],
) {
    let kubeconfig = layout.kubeconfig();
    let kc = kubeconfig.display();
    println!("Ferry is up: API server {url}, {} hosts.", args.hosts);
    let api_port = url.rsplit(':').next().unwrap_or_default();
    match (net, info) {
        (Some(net), Some(info)) => {
            println!(
                "Hosts run in network namespaces {} on {} (bridge {}, API at {}:{api_port} from the hosts).",
                net.namespaces().join(", "),
                net.cidr(),
                net.bridge(),
                net.gateway(),
            );
            println!(
                "VM network {}: {} on bridge {} in every host; client namespace {} ({}) is on it.",
                info.network,
                info.subnet,
                netns::VM_BRIDGE,
                info.client_namespace,
                net.client_address(),
            );
            println!(
                "  Give a VM `networks: [{{name: {}, ip: 10.78.0.X/24}}]` and configure that address in the guest; reach it with",
                info.network
            );
            println!(
                "  ip netns exec {} {} 10.78.0.X",
                info.client_namespace, info.ping
            );
        }
        _ => {
            println!("Hosts run in this network namespace on loopback ports.");
            println!(
                "No VM network: it needs network namespaces (run as root, without --no-netns); VM NICs use QEMU's user networking."
            );
        }
    }
    println!("kubeconfig: {kc}");
    if !demo_vms.is_empty() {
        println!("Demo VMs:");
        for line in demo_vms {
            println!("  {line}");
        }
    }
    println!();
    println!("Try:");
    println!("  export KUBECONFIG={kc}");
    println!("  kubectl get hosts,fvm");
    println!("  kubectl apply -f examples/vm-memtest.yaml      # placed by the controller");
    if args.demo {
        println!("  kubectl ferry migrate demo-1 --to host-2");
    }
    println!("  kubectl apply -f examples/migration-live-to-host.yaml");
    println!("  kubectl ferry status                           # hosts, migrations, VM addresses");
    println!("Logs: {}/hosts/host-N/agent.log", layout.dir.display());
    println!(
        "Stop with Ctrl-C; run again with --data-dir {} to resume.",
        layout.dir.display()
    );
}
