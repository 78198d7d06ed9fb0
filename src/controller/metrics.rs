//! Prometheus metrics and health endpoints.
//!
//! ```text
//!  Migration cache ──(every scrape interval)──► observe()
//!     gauges:     ferry_migrations{phase}, ferry_migration_queue_depth
//!     per migration reaching a final phase (once, after this process began):
//!                 ferry_migrations_finished_total{result}
//!                 ferry_migration_duration_seconds, ferry_migration_downtime_seconds,
//!                 ferry_migration_bytes_total, ferry_scheduling_latency_seconds
//!  HTTP (axum): /metrics (OpenMetrics text), /healthz (alive), /readyz
//!     (caches synced and a role decided: leader or standby)
//! ```
//!
//! Everything is derived from the recorded Migration statuses, so the
//! figures are the same whoever wrote them and survive nothing but what the
//! API keeps; counters count what finished while this process ran.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::leader::Role;
use crate::api::{Migration, MigrationPhase};
use crate::core::time::Timestamp;

/// Label: a migration phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// The phase.
    pub phase: String,
}

/// Label: how a migration ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Succeeded, Failed or Cancelled.
    pub result: String,
    /// The failure reason (empty unless Failed).
    pub reason: String,
}

/// The controller's metrics.
pub struct Metrics {
    registry: Registry,
    by_phase: Family<PhaseLabel, Gauge>,
    queue_depth: Gauge,
    finished: Family<ResultLabel, Counter>,
    duration: Histogram,
    downtime: Histogram,
    bytes: Counter,
    scheduling_latency: Histogram,
    counted: Mutex<BTreeSet<String>>,
    started: Timestamp,
}

const PHASES: [MigrationPhase; 11] = [
    MigrationPhase::Pending,
    MigrationPhase::Scheduling,
    MigrationPhase::Queued,
    MigrationPhase::Scheduled,
    MigrationPhase::PreparingTarget,
    MigrationPhase::Running,
    MigrationPhase::PostCopy,
    MigrationPhase::Completing,
    MigrationPhase::Succeeded,
    MigrationPhase::Failed,
    MigrationPhase::Cancelled,
];

impl Metrics {
    /// Register every metric; `started` is when this process began (only
    /// migrations finishing later are counted).
    pub fn new(started: Timestamp) -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let by_phase = Family::<PhaseLabel, Gauge>::default();
        registry.register("migrations", "Migrations by phase", by_phase.clone());
        let queue_depth = Gauge::default();
        registry.register(
            "migration_queue_depth",
            "Migrations waiting for a slot within the limits",
            queue_depth.clone(),
        );
        let finished = Family::<ResultLabel, Counter>::default();
        registry.register(
            "migrations_finished",
            "Migrations that reached a final phase, by result",
            finished.clone(),
        );
        // 1 s … ~4.5 h
        let duration = Histogram::new(exponential_buckets(1.0, 2.0, 15));
        registry.register(
            "migration_duration_seconds",
            "Time from the transfer's start to the end of a successful migration",
            duration.clone(),
        );
        // 1 ms … ~16 s
        let downtime = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "migration_downtime_seconds",
            "Measured guest downtime at switchover",
            downtime.clone(),
        );
        let bytes = Counter::default();
        registry.register(
            "migration_bytes",
            "Memory bytes transferred by finished migrations",
            bytes.clone(),
        );
        // 10 ms … ~5.5 min
        let scheduling_latency = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "scheduling_latency_seconds",
            "Time from a migration's creation to its target being chosen and a slot taken",
            scheduling_latency.clone(),
        );
        Self {
            registry,
            by_phase,
            queue_depth,
            finished,
            duration,
            downtime,
            bytes,
            scheduling_latency,
            counted: Mutex::new(BTreeSet::new()),
            started,
        }
    }

    /// Update the metrics from the Migrations as recorded.
    pub fn observe(&self, migrations: &[Arc<Migration>]) {
        let mut counts = [0i64; PHASES.len()];
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        for m in migrations {
            let status = m.status.clone().unwrap_or_default();
            if let Some(i) = PHASES.iter().position(|p| *p == status.phase) {
                counts[i] += 1;
            }
            let terminal = matches!(
                status.phase,
                MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
            );
            let Some(uid) = m.metadata.uid.clone() else {
                continue;
            };
            if !terminal || counted.contains(&uid) {
                continue;
            }
            counted.insert(uid);
            let ts = status.timestamps.clone().unwrap_or_default();
            let completed = ts.completed.as_ref().map(super::status::to_core);
            // API times have whole seconds: compare with the second we
            // started in, or a migration finished in that second is missed.
            let started_second =
                Timestamp::from_millis(self.started.as_millis().div_euclid(1000) * 1000);
            if completed.is_none_or(|c| c < started_second) {
                continue;
            }
            self.finished
                .get_or_create(&ResultLabel {
                    result: format!("{:?}", status.phase),
                    reason: status.failure_reason.clone().unwrap_or_default(),
                })
                .inc();
            if let Some(p) = &status.progress {
                self.bytes.inc_by(p.memory_transferred);
            }
            if status.phase == MigrationPhase::Succeeded {
                if let Some(ms) = status.duration_ms {
                    self.duration.observe(ms as f64 / 1000.0);
                }
                if let Some(ms) = status.downtime_ms {
                    self.downtime.observe(ms as f64 / 1000.0);
                }
            }
            if let (Some(created), Some(scheduled)) = (
                m.metadata.creation_timestamp.as_ref(),
                ts.scheduled.as_ref(),
            ) {
                let latency = super::status::to_core(scheduled)
                    .since(super::status::to_core(created))
                    .as_secs_f64();
                self.scheduling_latency.observe(latency);
            }
        }
        for (phase, n) in PHASES.iter().zip(counts) {
            self.by_phase
                .get_or_create(&PhaseLabel {
                    phase: format!("{phase:?}"),
                })
                .set(n);
        }
        self.queue_depth.set(counts[2]);
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// What `/readyz` looks at.
pub struct Health {
    /// The caches have synced.
    pub synced: AtomicBool,
    /// The election role.
    pub role: watch::Receiver<Role>,
}

impl Health {
    /// Ready: caches synced and a role decided.
    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::Acquire)
            && matches!(*self.role.borrow(), Role::Leader | Role::Standby)
    }
}

/// The endpoints' shared state.
#[derive(Clone)]
pub struct Endpoint {
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health.
    pub health: Arc<Health>,
}

/// The HTTP routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(state: Endpoint) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<Endpoint>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<Endpoint>) -> impl IntoResponse {
    if s.health.ready() {
        let role = format!("{:?}", *s.health.role.borrow());
        (StatusCode::OK, role)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready".to_string())
    }
}

/// Serve the endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Endpoint,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MigrationSpec, MigrationStatus};

    fn finished(uid: &str, phase: MigrationPhase, completed_ms: i64) -> Arc<Migration> {
        let mut m = Migration::new(
            uid,
            MigrationSpec {
                vm_name: "vm".into(),
                ..serde_json::from_value(serde_json::json!({"vmName": "vm"})).unwrap()
            },
        );
        m.metadata.uid = Some(uid.into());
        let status: MigrationStatus = serde_json::from_value(serde_json::json!({
            "phase": format!("{phase:?}"),
            "durationMs": 4000,
            "downtimeMs": 120,
            "progress": {"memoryTransferred": 1000, "memoryTotal": 1000, "memoryRemaining": 0,
                         "iteration": 1, "dirtyRate": 0, "throughput": 0, "expectedDowntimeMs": 0,
                         "percent": 100, "converging": true},
            "timestamps": {"completed": super::super::status::to_api(Timestamp::from_millis(completed_ms))},
        }))
        .unwrap();
        m.status = Some(status);
        Arc::new(m)
    }

    #[test]
    fn a_finished_migration_is_counted_once_and_only_if_it_ended_after_the_start() {
        let metrics = Metrics::new(Timestamp::from_millis(10_000));
        let ms = vec![
            finished("a", MigrationPhase::Succeeded, 20_000),
            finished("b", MigrationPhase::Succeeded, 5_000),
        ];
        metrics.observe(&ms);
        metrics.observe(&ms);
        let text = metrics.encode();
        assert!(
            text.contains("ferry_migrations_finished_total{result=\"Succeeded\",reason=\"\"} 1"),
            "{text}"
        );
        assert!(text.contains("ferry_migration_bytes_total 1000"), "{text}");
        assert!(
            text.contains("ferry_migrations{phase=\"Succeeded\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ferry_migration_downtime_seconds_count 1"),
            "{text}"
        );
    }
}
