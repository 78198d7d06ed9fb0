//! The controller: turns Migrations, HostMaintenances and MigrationPolicies
//! into decisions, and supervises them. It never touches a VM: it writes
//! decisions into the API (a Migration's phase and hosts, a VM's
//! `status.host`) for the agents, and watches them happen.
//!
//! ```text
//!  caches (reflectors): VMs, Hosts, Migrations, Policies, Namespaces, Leases
//!      │
//!      ├─ Migration controller (kube-runtime): observe → core::migration::decide → act
//!      ├─ hosts loop (every second): Lease silence → Host phase; Fenced → Evacuate migrations
//!      ├─ placement loop: VMs without a host → core::scheduler::place → status.host
//!      ├─ HostMaintenance controller: cordon, one Migration per VM, progress, blockers
//!      ├─ balancing loop: core::scheduler::balance → automatic Migrations
//!      ├─ events: every decision a user should see, as counted Events ([`events`])
//!      └─ metrics: Migration cache → Prometheus (/metrics, /healthz, /readyz)
//! ```
//!
//! Only the holder of the `ferry-controller` Lease runs the loops
//! ([`leader`]); a standby keeps its caches warm and takes over when the
//! Lease lapses.
//!
//! Everything is recomputed from the API: a restarted controller resumes
//! every migration from its recorded status. Decisions that the caches may
//! not show yet (a target chosen, a slot taken a moment ago) are held in
//! [`Ctx::recent`] until the caches catch up, so two reconciles never both
//! take the last slot.

mod admission;
pub mod balancing;
pub mod events;
pub mod health;
mod hosts;
pub mod leader;
pub mod maintenance;
pub mod metrics;
mod migration;
mod placement;
pub mod snapshot;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::api::{
    Host, HostMaintenance, Migration, MigrationPolicy, SYSTEM_NAMESPACE, VirtualMachine,
};
use crate::core::policy::EffectivePolicy;
use crate::core::scheduler::InFlight;

/// How the controller is configured.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Hosts whose Lease has not changed for this long are Unreachable
    /// (the agents' Lease duration).
    pub lease_duration: Duration,
    /// How often the host and placement loops run.
    pub tick: Duration,
    /// This replica's identity in the leader election.
    pub identity: String,
    /// The controller Lease's duration (a leader that cannot renew for
    /// this long stops acting).
    pub leader_lease: Duration,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Retries of a drain's failed migrations, and the quarantine of VMs
    /// and of target hosts that keep failing.
    pub drain_retry: crate::core::drain::RetryPolicy,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(10),
            tick: Duration::from_secs(1),
            identity: format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "ferry-controller".into()),
                uuid::Uuid::new_v4().simple()
            ),
            leader_lease: Duration::from_secs(15),
            metrics_listen: None,
            drain_retry: crate::core::drain::RetryPolicy::default(),
        }
    }
}

/// Why the controller could not act.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A Kubernetes API call failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: Box<kube::Error>,
    },
    /// The metrics endpoint could not listen.
    #[error("listening for metrics on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

impl ControllerError {
    /// Map a kube error while doing `what`.
    pub fn api(what: &'static str) -> impl FnOnce(kube::Error) -> ControllerError {
        move |source| ControllerError::Api {
            what,
            source: Box::new(source),
        }
    }

    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ControllerError::Api { .. } => "ApiError",
            ControllerError::Listen { .. } => "ListenFailed",
        }
    }
}

/// An admission, until the caches show it.
pub struct Admitted {
    /// The stage admitted to.
    pub stage: crate::core::admission::Stage,
    /// Source host.
    pub source: String,
    /// Target host.
    pub target: String,
    /// When.
    pub at: Instant,
}

/// Decisions taken but perhaps not yet visible in the caches.
#[derive(Default)]
pub struct Recent {
    /// Migration id → the target it reserved (Queued and later).
    pub targets: BTreeMap<String, (InFlight, Instant)>,
    /// Migration id → what it was admitted to.
    pub admitted: BTreeMap<String, Admitted>,
    /// Migration id → the resourceVersions a status write was decided
    /// from (the one read, and the one its own finalizer patch made).
    pub acted: BTreeMap<String, (Vec<String>, Instant)>,
    /// VM id → host chosen by placement.
    pub placed: BTreeMap<String, (String, Instant)>,
    /// VM id → when an evacuation was created for it.
    pub evacuations: BTreeMap<String, Instant>,
    /// Host → the end of the quarantine last announced by an Event.
    pub host_quarantines: BTreeMap<String, crate::core::time::Timestamp>,
}

impl Recent {
    /// Whether `version` of this Migration is one a status write was
    /// already decided from (the cache has not caught up with the write).
    /// A newer version forgets them.
    pub fn acted_on(&mut self, key: &str, version: Option<&str>) -> bool {
        match (self.acted.get(key), version) {
            (Some((versions, at)), Some(version)) if versions.iter().any(|v| v == version) => {
                at.elapsed() < Duration::from_secs(10)
            }
            (Some(_), _) => {
                self.acted.remove(key);
                false
            }
            (None, _) => false,
        }
    }

    /// Forget what the caches must show by now.
    pub fn expire(&mut self, now: Instant) {
        const HORIZON: Duration = Duration::from_secs(10);
        self.targets
            .retain(|_, (_, at)| now.duration_since(*at) < HORIZON);
        self.admitted
            .retain(|_, a| now.duration_since(a.at) < HORIZON);
        self.acted
            .retain(|_, (_, at)| now.duration_since(*at) < HORIZON);
        self.placed
            .retain(|_, (_, at)| now.duration_since(*at) < HORIZON);
        self.evacuations
            .retain(|_, at| now.duration_since(*at) < HORIZON);
    }
}

/// What every reconcile shares.
pub struct Ctx {
    /// The API client.
    pub client: kube::Client,
    /// Configuration.
    pub config: ControllerConfig,
    /// Caches.
    pub vms: reflector::Store<VirtualMachine>,
    /// Caches.
    pub hosts: reflector::Store<Host>,
    /// Caches.
    pub migrations: reflector::Store<Migration>,
    /// Caches.
    pub policies: reflector::Store<MigrationPolicy>,
    /// Caches.
    pub namespaces: reflector::Store<Namespace>,
    /// Caches.
    pub leases: reflector::Store<Lease>,
    /// Caches.
    pub maintenances: reflector::Store<HostMaintenance>,
    /// Serialises scheduling and admission, with what they decided lately.
    pub recent: Mutex<Recent>,
    /// Lease renewals seen.
    pub leases_seen: std::sync::Mutex<health::LeaseTracker>,
    /// Woken when a migration gives up a slot (its transfer ended, its
    /// prepared target started the transfer, it failed), so waiting
    /// migrations are looked at again at once, not at the next poll.
    pub slot_freed: tokio::sync::Notify,
    /// Records the Events users see (`kubectl describe`, `kubectl events`).
    pub events: events::Recorder,
}

impl Ctx {
    /// The policy that applies to a VM (or the explicitly named one) and its
    /// effective settings; `Err` names a policy that does not resolve.
    pub fn policy_for(
        &self,
        vm: Option<&VirtualMachine>,
        explicit: Option<&str>,
    ) -> (Option<String>, EffectivePolicy, Option<String>) {
        let policies: Vec<MigrationPolicy> = self
            .policies
            .state()
            .iter()
            .map(|p| (**p).clone())
            .collect();
        let labels = vm.map(|v| v.labels().clone()).unwrap_or_default();
        let namespace_labels = vm
            .and_then(|v| v.namespace())
            .and_then(|ns| {
                self.namespaces
                    .state()
                    .into_iter()
                    .find(|n| n.name_any() == ns)
            })
            .map(|n| n.labels().clone())
            .unwrap_or_default();
        match crate::bridge::policy::resolve(&policies, explicit, &labels, &namespace_labels) {
            Ok((selection, effective)) => {
                let missing = match &selection {
                    crate::core::policy::Selection::ExplicitMissing { name } => Some(name.clone()),
                    _ => None,
                };
                (selection.name().map(str::to_string), effective, missing)
            }
            Err(e) => {
                tracing::warn!(error = %e, "a MigrationPolicy does not resolve; using the defaults");
                (None, EffectivePolicy::default(), None)
            }
        }
    }

    /// The scheduler's snapshot of the caches, with `extra` decisions the
    /// caches may not show yet and the host quarantines in force at `now`.
    pub fn snapshot(
        &self,
        extra: &BTreeMap<String, InFlight>,
        now: crate::core::time::Timestamp,
    ) -> crate::core::scheduler::Snapshot {
        let migrations = self.migrations.state();
        let mut snap = snapshot::build(&self.hosts.state(), &self.vms.state(), &migrations, extra);
        for (host, q) in snapshot::host_quarantines(&migrations, &self.config.drain_retry, now) {
            snap.quarantine(&host, q);
        }
        snap
    }

    /// The cluster-wide policy: what applies to a VM with no labels. Host
    /// fencing timing (`fenceAfter`, `evacuateAfter`) comes from it.
    pub fn cluster_policy(&self) -> EffectivePolicy {
        self.policy_for(None, None).1
    }
}

fn store<K>(api: Api<K>, shutdown: &CancellationToken) -> reflector::Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                next = stream.next() => if next.is_none() { return },
            }
        }
    });
    reader
}

/// Run the controller until `shutdown`.
pub async fn run(
    client: kube::Client,
    config: ControllerConfig,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    let listener = match config.metrics_listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ControllerError::Listen { addr, source })?,
        ),
    };
    run_with(client, config, listener, shutdown).await
}

/// Run the controller until `shutdown`, serving the metrics and health
/// endpoints on `listener` when given.
pub async fn run_with(
    client: kube::Client,
    config: ControllerConfig,
    listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    let (role_tx, role_rx) = tokio::sync::watch::channel(leader::Role::Starting);
    let started = crate::core::time::Timestamp::from_millis(
        k8s_openapi::jiff::Timestamp::now().as_millisecond(),
    );
    let endpoint = metrics::Endpoint {
        metrics: Arc::new(metrics::Metrics::new(started)),
        health: Arc::new(metrics::Health {
            synced: std::sync::atomic::AtomicBool::new(false),
            role: role_rx,
        }),
    };
    if let Some(listener) = listener {
        let (state, stop) = (endpoint.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, state, stop).await {
                tracing::error!(error = %e, "the metrics endpoint failed");
            }
        });
    }
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        config: config.clone(),
        vms: store(Api::<VirtualMachine>::all(client.clone()), &shutdown),
        hosts: store(Api::<Host>::all(client.clone()), &shutdown),
        migrations: store(Api::<Migration>::all(client.clone()), &shutdown),
        policies: store(Api::<MigrationPolicy>::all(client.clone()), &shutdown),
        namespaces: store(Api::<Namespace>::all(client.clone()), &shutdown),
        leases: store(
            Api::<Lease>::namespaced(client.clone(), SYSTEM_NAMESPACE),
            &shutdown,
        ),
        maintenances: store(Api::<HostMaintenance>::all(client.clone()), &shutdown),
        recent: Mutex::default(),
        leases_seen: std::sync::Mutex::new(health::LeaseTracker::new(Instant::now())),
        slot_freed: tokio::sync::Notify::new(),
        events: events::Recorder::new(client.clone(), &config.identity),
    });
    for ready in [
        ctx.vms.wait_until_ready().boxed(),
        ctx.hosts.wait_until_ready().boxed(),
        ctx.migrations.wait_until_ready().boxed(),
        ctx.policies.wait_until_ready().boxed(),
        ctx.namespaces.wait_until_ready().boxed(),
        ctx.leases.wait_until_ready().boxed(),
        ctx.maintenances.wait_until_ready().boxed(),
    ] {
        tokio::select! {
            _ = ready => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    tracing::info!("controller caches synced");
    endpoint
        .health
        .synced
        .store(true, std::sync::atomic::Ordering::Release);
    tokio::spawn(observe(
        ctx.clone(),
        endpoint.metrics.clone(),
        shutdown.clone(),
    ));
    let elector = leader::Elector::new(
        client,
        leader::LeaderConfig {
            namespace: SYSTEM_NAMESPACE.to_string(),
            name: leader::LEASE_NAME.to_string(),
            identity: config.identity.clone(),
            lease_duration: config.leader_lease,
            retry_period: config.leader_lease / 3,
        },
    );
    leader::run(elector, role_tx, shutdown, move |term| {
        lead(ctx.clone(), term)
    })
    .await;
    Ok(())
}

/// The leader's loops, until `term`.
async fn lead(ctx: Arc<Ctx>, term: CancellationToken) {
    // A new term judges host silence from now: a standby saw no renewals
    // (the hosts loop did not run), and counting from its own start would
    // fence every host at once. Reservations of an earlier term are void.
    *ctx.leases_seen.lock().unwrap_or_else(|p| p.into_inner()) =
        health::LeaseTracker::new(Instant::now());
    *ctx.recent.lock().await = Recent::default();
    let _ = tokio::join!(
        tokio::spawn(periodic(ctx.clone(), term.clone())),
        tokio::spawn(migration::run(ctx.clone(), term.clone())),
        tokio::spawn(maintenance::run(ctx.clone(), term.clone())),
        tokio::spawn(balancing::run(ctx.clone(), term.clone())),
    );
}

/// Keep the metrics current from the Migration cache.
async fn observe(ctx: Arc<Ctx>, metrics: Arc<metrics::Metrics>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.config.tick);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => metrics.observe(&ctx.migrations.state()),
        }
    }
}

/// The host and placement loops.
async fn periodic(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = hosts::reconcile(&ctx).await {
            tracing::warn!(error = %e, "host health pass failed");
        }
        if let Err(e) = placement::reconcile(&ctx).await {
            tracing::warn!(error = %e, "placement pass failed");
        }
    }
}
