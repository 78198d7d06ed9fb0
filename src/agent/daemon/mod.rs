//! The agent daemon: the Kubernetes side of a host.
//!
//! ```text
//!   start ─► adopt running QEMUs ─► sync VM and Migration caches ─► loop every beat:
//!              │                                                    1. renew Lease, refresh Host, touch heartbeat
//!              └─ fencing watchdog (own process)                     2. VMs: plan() — stops first, then starts
//!                                                                    3. Migrations: start missing halves,
//!                                                                       report halves lost to a restart
//! ```
//!
//! Everything is recomputed from the API on each pass, so a restart at any
//! point resumes: QEMUs outlive the agent and are adopted; which QEMUs belong
//! to a migration is derived from the Migrations, not remembered.

mod halves;
pub mod host;
pub mod load;
pub mod machine;
pub mod plan;
mod progress;
pub mod recovery;
mod source_half;
mod target_half;
mod vmloop;
pub mod watchdog;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::agent::pki::{HostIdentity, TlsSettings};
use crate::agent::relay::{MigrationTable, ServerTransport, TargetRelay};
use crate::agent::vms::VmManager;
use crate::api::{Migration, MigrationPhase, VirtualMachine};

/// How an agent is configured.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's name (also its Host, its Lease and its certificate).
    pub host: String,
    /// The scheduling cluster.
    pub cluster: String,
    /// Labels of the Host.
    pub labels: BTreeMap<String, String>,
    /// Where QEMU state lives (pid files, sockets, kernels).
    pub state_dir: PathBuf,
    /// The QEMU binary.
    pub qemu_binary: String,
    /// Where the relay listens for migration streams (the migration network).
    pub migration_listen: SocketAddr,
    /// What other agents dial (default: the listen address).
    pub migration_advertise: Option<String>,
    /// Directory with `ca.crt`, `host.crt`, `host.key`.
    pub pki_dir: PathBuf,
    /// TLS settings of the relay (cipher suites).
    pub tls: TlsSettings,
    /// vCPUs offered to VMs.
    pub capacity_cpus: u32,
    /// Memory offered to VMs, bytes (default: the host's total).
    pub capacity_memory: Option<u64>,
    /// The Lease's duration.
    pub lease_duration: Duration,
    /// How often the Lease is renewed and the Host refreshed.
    pub renew_interval: Duration,
    /// After this long without a renewal the watchdog stops the VMs.
    pub fence_after: Duration,
    /// A file holding a CPU percentage reported instead of the measured one
    /// (lets one machine stand in for loaded and idle hosts).
    pub simulated_load_file: Option<PathBuf>,
    /// Cancel a transfer whose bytes stand still this long.
    pub stall_timeout: Duration,
    /// Start the fencing watchdog process (off only in unit tests).
    pub watchdog: bool,
    /// Which host bridge each VM network attaches to (`--network
    /// default=br-ferry`); unmapped networks use QEMU's user networking.
    pub networks: crate::agent::net::BridgeMap,
}

impl AgentConfig {
    /// `address:port` other agents dial.
    pub fn migration_endpoint(&self) -> String {
        self.migration_advertise
            .clone()
            .unwrap_or_else(|| self.migration_listen.to_string())
    }

    /// The simulated CPU percentage, if configured and readable.
    pub fn simulated_cpu_percent(&self) -> Option<u32> {
        let path = self.simulated_load_file.as_ref()?;
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<u32>()
            .ok()
            .map(|p| p.min(100))
    }
}

/// Why the agent stopped or could not act.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// QEMU cannot be run.
    #[error("QEMU ({binary}) cannot be run: install qemu-system-x86")]
    QemuMissing {
        /// The binary.
        binary: String,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU runs but does not say its version.
    #[error("QEMU ({binary}) is not usable: {why}")]
    QemuUnusable {
        /// The binary.
        binary: String,
        /// What was wrong.
        why: String,
    },
    /// QEMU is older than the oldest release Ferry runs.
    #[error(
        "QEMU {found} ({binary}) is older than {}.{}, the oldest release Ferry runs: under TCG, \
         QEMU 7.2 failed the guest's memory check after post-copy and pause-to-finish migrations. \
         Install qemu-system-x86 {}.{} or newer (Debian 12: from bookworm-backports)",
        crate::agent::qemu::MIN_VERSION.0, crate::agent::qemu::MIN_VERSION.1,
        crate::agent::qemu::MIN_VERSION.0, crate::agent::qemu::MIN_VERSION.1
    )]
    QemuTooOld {
        /// The binary.
        binary: String,
        /// Its version.
        found: String,
    },
    /// The host's certificate is missing or does not name this host.
    #[error("the host certificate in {dir}: {message}")]
    Identity {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A Kubernetes API call failed.
    #[error("{what}")]
    Api {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: Box<kube::Error>,
    },
    /// The relay could not listen.
    #[error("the migration relay")]
    Relay(#[from] crate::agent::relay::RelayError),
    /// The VM manager failed.
    #[error("the VM manager")]
    Vms(#[from] crate::agent::vms::VmError),
    /// A local file could not be written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

impl AgentError {
    /// Map a kube error while doing `what`.
    pub fn api(what: &'static str) -> impl FnOnce(kube::Error) -> AgentError {
        move |source| AgentError::Api {
            what,
            source: Box::new(source),
        }
    }
}

/// What the agent's loops share.
pub struct Agent {
    config: AgentConfig,
    client: kube::Client,
    vms: Arc<VmManager>,
    table: Arc<MigrationTable>,
    client_tls: Arc<rustls::ClientConfig>,
    vm_store: reflector::Store<VirtualMachine>,
    migration_store: reflector::Store<Migration>,
    /// Migration halves running here, by Migration uid.
    halves: Mutex<HashMap<String, halves::Half>>,
    /// Migrations whose half on this host has finished (in this process).
    finished: Mutex<std::collections::HashSet<String>>,
    /// Local names whose QEMU failed to start, with the error (reported,
    /// not retried in a tight loop).
    start_failures: Mutex<BTreeMap<String, String>>,
}

/// An error with its causes, for a person: `what: why: deeper why`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Phases in which a migration owns its VM's QEMUs on both hosts.
pub fn migration_owns_qemus(phase: MigrationPhase) -> bool {
    matches!(
        phase,
        MigrationPhase::PreparingTarget
            | MigrationPhase::Running
            | MigrationPhase::PostCopy
            | MigrationPhase::Completing
    )
}

impl Agent {
    /// The local names of VMs whose QEMUs on this host belong to a migration
    /// in flight: derived from the API, never remembered.
    fn reserved(&self) -> BTreeSet<String> {
        let me = self.config.host.as_str();
        self.migration_store
            .state()
            .iter()
            .filter(|m| {
                let status = m.status.clone().unwrap_or_default();
                migration_owns_qemus(status.phase)
                    && (status.source_host.as_deref() == Some(me)
                        || status.target_host.as_deref() == Some(me))
            })
            .map(|m| plan::local_name(&m.namespace().unwrap_or_default(), &m.spec.vm_name))
            .collect()
    }
}

/// Run the agent until `shutdown`. QEMUs keep running when it returns.
pub async fn run(
    mut config: AgentConfig,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let qemu_version = host::qemu_version(&config.qemu_binary).await?;
    std::fs::create_dir_all(&config.state_dir).map_err(|source| AgentError::Io {
        what: "creating the state directory",
        source,
    })?;
    let identity = HostIdentity::load(&config.pki_dir).map_err(|e| AgentError::Identity {
        dir: config.pki_dir.clone(),
        message: e.to_string(),
    })?;
    if identity.host != config.host {
        return Err(AgentError::Identity {
            dir: config.pki_dir.clone(),
            message: format!("it names host {:?}, not {:?}", identity.host, config.host),
        });
    }
    let identity_error = |e: crate::agent::pki::PkiError| AgentError::Identity {
        dir: config.pki_dir.clone(),
        message: e.to_string(),
    };
    let server_tls = config
        .tls
        .server_config(&identity)
        .map_err(identity_error)?;
    let client_tls = config
        .tls
        .client_config(&identity)
        .map_err(identity_error)?;

    // QEMUs outlive the agent: take them over before anything else.
    let vms = Arc::new(VmManager::with_binary(
        &config.state_dir,
        &config.qemu_binary,
    ));
    for outcome in vms.adopt_all().await? {
        match outcome {
            crate::agent::vms::AdoptOutcome::Adopted(p) => {
                tracing::info!(vm = %p.spec().name, pid = p.pid(), "adopted running QEMU")
            }
            crate::agent::vms::AdoptOutcome::Gone { name, error } => {
                tracing::warn!(vm = %name, %error, "QEMU of a VM died while the agent was away")
            }
        }
    }
    if config.watchdog {
        start_watchdog(&config)?;
    }

    let table = Arc::new(MigrationTable::default());
    let relay = TargetRelay::bind(
        config.migration_listen,
        ServerTransport::Tls(server_tls),
        table.clone(),
    )
    .await?;
    // Listening on port 0 (tests): other agents dial the port it got.
    if config.migration_advertise.is_none() && config.migration_listen.port() == 0 {
        config.migration_advertise = Some(relay.local_addr().to_string());
    }
    tracing::info!(host = %config.host, relay = %relay.local_addr(), "agent started");

    let (vm_store, vm_writer) = reflector::store();
    let (migration_store, migration_writer) = reflector::store();
    let vm_stream = reflector::reflector(
        vm_writer,
        watcher(
            Api::<VirtualMachine>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let migration_stream = reflector::reflector(
        migration_writer,
        watcher(
            Api::<Migration>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::channel::<()>(1);
    let feed = |stream: futures::stream::BoxStream<'static, ()>,
                wake: tokio::sync::mpsc::Sender<()>| {
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while stream.next().await.is_some() {
                let _ = wake.try_send(());
            }
        })
    };
    let vm_feed = feed(vm_stream.map(|_| ()).boxed(), wake_tx.clone());
    let migration_feed = feed(migration_stream.map(|_| ()).boxed(), wake_tx);

    let agent = Arc::new(Agent {
        config: config.clone(),
        client: client.clone(),
        vms,
        table,
        client_tls,
        vm_store,
        migration_store,
        halves: Mutex::default(),
        finished: Mutex::default(),
        start_failures: Mutex::default(),
    });

    tokio::select! {
        _ = async {
            let _ = agent.vm_store.wait_until_ready().await;
            let _ = agent.migration_store.wait_until_ready().await;
        } => {}
        _ = shutdown.cancelled() => return Ok(()),
    }

    let mut publisher = host::HostPublisher::new(&client, qemu_version);
    let mut beat = tokio::time::interval(config.renew_interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether a renewal of this run has touched the heartbeat yet.
    let mut renewed = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = beat.tick() => {
                // Date the heartbeat by when the renewal was sent: a slow
                // reply can then only make the watchdog fence earlier.
                let sent = std::time::SystemTime::now();
                match publisher.renew(&config).await {
                    Ok(()) => {
                        match watchdog::touch_at(&config.state_dir, config.fence_after, sent) {
                            Ok(()) => renewed = true,
                            Err(e) => tracing::error!(error = %e, "cannot write the fencing heartbeat"),
                        }
                        let running = vmloop::running_resources(&agent).await;
                        if let Err(e) = publisher.refresh(&config, &running).await {
                            tracing::warn!(error = %error_chain(&e), "refreshing the host status failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %error_chain(&e), "renewing the host lease failed"),
                }
            }
            _ = wake_rx.recv() => {}
        }
        // An agent back on a host its watchdog is fencing (silent for
        // fenceAfter) would see whatever it starts killed: start nothing
        // until a renewal has told the watchdog the host lives.
        if !renewed {
            continue;
        }
        vmloop::reconcile(&agent).await;
        halves::reconcile(&agent).await;
    }
    vm_feed.abort();
    migration_feed.abort();
    halves::shutdown(&agent);
    drop(relay);
    Ok(())
}

/// Start the fencing watchdog as its own process (`<exe> agent watchdog`),
/// unless one already guards this state directory.
fn start_watchdog(config: &AgentConfig) -> Result<(), AgentError> {
    use std::os::unix::process::CommandExt;
    if watchdog::is_running(&config.state_dir) {
        return Ok(());
    }
    // Until the first renewal, allow a full fenceAfter from now.
    watchdog::touch(&config.state_dir, config.fence_after).map_err(|source| AgentError::Io {
        what: "writing the fencing heartbeat",
        source,
    })?;
    let exe = std::env::current_exe().map_err(|source| AgentError::Io {
        what: "finding the agent's executable",
        source,
    })?;
    let standalone = exe
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("ferry-agent"));
    let mut command = std::process::Command::new(exe);
    if !standalone {
        command.arg("agent");
    }
    command
        .arg("watchdog")
        .arg("--state-dir")
        .arg(&config.state_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    command
        .spawn()
        .map(|_| ())
        .map_err(|source| AgentError::Io {
            what: "starting the fencing watchdog",
            source,
        })
}
