//! Leader election on a `coordination.k8s.io/v1` Lease: one controller acts,
//! the others wait with warm caches.
//!
//! (`kube-leader-election`, the maintained crate, is built on kube 4; Ferry
//! is on kube 5, so this is a small implementation of the same client-go
//! algorithm, with optimistic concurrency on the Lease's resourceVersion.)
//!
//! ```text
//!            ┌──────────── renew fails until the deadline ─────────────┐
//!            ▼                                                         │
//!  Standby ──── Lease free, released, or unchanged for leaseDuration ──► Leader
//!     ▲         on our own clock, and our replace (with the seen            │
//!     │         resourceVersion) wins                                      │
//!     └──────────────────── shutdown: release the Lease ◄──────────────────┘
//! ```
//!
//! Safety: a leader stops acting at `t_send + leaseDuration`, where
//! `t_send` is when it *sent* its last successful renewal (before the API
//! server wrote it). A standby may take over only after seeing the same
//! Lease record unchanged for `leaseDuration` on its own monotonic clock,
//! and it can first see that record only after the server wrote it, so
//! later than `t_send`. Both intervals have the same length and the
//! standby's starts later: the old leader has stopped before a new one
//! starts, with no assumption about wall clocks agreeing. Two standbys
//! racing for one Lease are serialised by the resourceVersion: only one
//! replace succeeds.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp as Jiff;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The Lease the controllers elect on, in `ferry-system`.
pub const LEASE_NAME: &str = "ferry-controller";

/// What a controller replica is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not yet decided (caches syncing, first attempt pending).
    Starting,
    /// Another replica holds the Lease; this one waits.
    Standby,
    /// This replica holds the Lease and runs the loops.
    Leader,
}

/// How the election runs.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (the Lease's `holderIdentity`).
    pub identity: String,
    /// How long a Lease not renewed stays held (15 s: client-go's default).
    pub lease_duration: Duration,
    /// How often the holder renews and a standby retries (a third of the
    /// duration, so two renewals may fail before the lease is lost).
    pub retry_period: Duration,
}

/// Why an election step failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease could not be read or written.
    #[error("{what} the controller Lease: {source}")]
    Api {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: Box<kube::Error>,
    },
}

impl LeaderError {
    fn api(what: &'static str) -> impl FnOnce(kube::Error) -> LeaderError {
        move |source| LeaderError::Api {
            what,
            source: Box::new(source),
        }
    }
}

/// One replica's view of the election.
pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    /// The last Lease record seen (resourceVersion) and when, on our clock.
    observed: Option<(String, Instant)>,
}

/// The answer of one election step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// We hold the Lease until this instant (unless renewed again).
    Held {
        /// When to stop acting if no renewal succeeds meanwhile.
        until: Instant,
    },
    /// Another replica holds it.
    Standby,
}

fn micro_now() -> MicroTime {
    MicroTime(Jiff::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    /// An elector over `client`'s Lease API.
    pub fn new(client: kube::Client, config: LeaderConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Acquire or renew the Lease once.
    pub async fn step(&mut self) -> Result<Step, LeaderError> {
        let sent = Instant::now();
        let held = Step::Held {
            until: sent + self.config.lease_duration,
        };
        let Some(lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(LeaderError::api("reading"))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(micro_now()),
                    renew_time: Some(micro_now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(held),
                Err(e) if is_conflict(&e) => Ok(Step::Standby),
                Err(e) => Err(LeaderError::api("creating")(e)),
            };
        };
        let version = lease.resource_version().unwrap_or_default();
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.config.identity.as_str());
        if !mine && holder.is_some() {
            // Someone else's: take over only after seeing this very record
            // unchanged for a whole lease duration (theirs, if longer).
            let theirs = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.lease_duration, Duration::from_secs)
                .max(self.config.lease_duration);
            let first_seen = match &self.observed {
                Some((v, at)) if *v == version => *at,
                _ => {
                    self.observed = Some((version.clone(), sent));
                    sent
                }
            };
            if sent.duration_since(first_seen) < theirs {
                return Ok(Step::Standby);
            }
        }
        let mut next = lease.clone();
        let s = next.spec.get_or_insert_with(LeaseSpec::default);
        if !mine {
            s.acquire_time = Some(micro_now());
            s.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        s.holder_identity = Some(self.config.identity.clone());
        s.lease_duration_seconds = Some(self.duration_secs());
        s.renew_time = Some(micro_now());
        // `replace` carries the resourceVersion we read: a concurrent writer
        // makes it fail with 409 instead of both believing they hold it.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => {
                self.observed = None;
                Ok(held)
            }
            Err(e) if is_conflict(&e) => Ok(Step::Standby),
            Err(e) => Err(LeaderError::api("renewing")(e)),
        }
    }

    /// Give the Lease up (on shutdown) so a standby takes over at once.
    pub async fn release(&mut self) -> Result<(), LeaderError> {
        let Some(lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(LeaderError::api("reading"))?
        else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        let mut next = lease;
        if let Some(s) = next.spec.as_mut() {
            s.holder_identity = None;
            s.renew_time = Some(micro_now());
        }
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(LeaderError::api("releasing")(e)),
        }
    }
}

/// Take part in the election until `shutdown`; while this replica leads,
/// run `lead(term)`, where `term` is cancelled the moment leadership may
/// be lost (the renewal deadline passes) or on shutdown. `lead` must stop
/// acting when `term` is cancelled; its future is awaited before this
/// replica competes again. `role` reports the state for `/readyz`.
pub async fn run<F, Fut>(
    mut elector: Elector,
    role: watch::Sender<Role>,
    shutdown: CancellationToken,
    mut lead: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let retry = elector.config.retry_period;
    loop {
        // Standby: try until we hold it.
        let mut until = loop {
            match elector.step().await {
                Ok(Step::Held { until }) => break until,
                Ok(Step::Standby) => {
                    let _ = role.send_replace(Role::Standby);
                }
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
        };
        tracing::info!(identity = %elector.identity(), "leading");
        let _ = role.send_replace(Role::Leader);
        let term = shutdown.child_token();
        let task = tokio::spawn(lead(term.clone()));
        // Leader: renew; stop at once when the deadline passes.
        let lost = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = tokio::time::sleep_until(until) => break true,
                _ = tokio::time::sleep(retry) => {}
            }
            let renewed = tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = tokio::time::sleep_until(until) => break true,
                r = elector.step() => r,
            };
            match renewed {
                Ok(Step::Held { until: next }) => until = next,
                Ok(Step::Standby) => break true,
                Err(e) => tracing::warn!(error = %e, "renewing the controller Lease"),
            }
        };
        term.cancel();
        if let Err(e) = task.await {
            tracing::error!(error = %e, "the leader's loops panicked");
        }
        if lost {
            tracing::warn!(identity = %elector.identity(), "lost the controller Lease; standing by");
            let _ = role.send_replace(Role::Standby);
            continue;
        }
        if let Err(e) = elector.release().await {
            tracing::warn!(error = %e, "releasing the controller Lease");
        }
        return;
    }
}
