//! The simulated agents: a test double of every host's agent that obeys
//! the agent protocol by patching Migration status, driven like the real
//! agent (`src/agent/daemon`): a reflector store of the Migrations, a pass
//! over it on every watch event, and a timer for the end of each transfer.
//!
//! ```text
//!  PreparingTarget, no target report ──► target Ready (Failed on a broken target)
//!  Running, no source report          ──► Transferring (the transfer's clock starts)
//!  Running, Transferring              ──► SwitchedOver once the transfer time has passed
//!                                         Failed NotConverging for an unconvergeable VM
//!  Running, spec.cancel               ──► Aborted
//! ```
//!
//! What it wrote is remembered per Migration (by uid) and taken over a
//! store that has not shown it yet, so a pass woken by another event never
//! writes a report twice. A transfer found under way with no clock (the
//! double restarted, or a watch re-list) starts its clock then.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use ferry::api::{AgentState, Migration, MigrationPhase};

use super::AgentLog;

fn report(state: AgentState) -> serde_json::Value {
    json!({"state": state, "time": k8s_openapi::jiff::Timestamp::now().to_string()})
}

/// The reports the double wrote for one Migration.
#[derive(Default, Clone, Copy)]
struct Written {
    target: Option<AgentState>,
    source: Option<AgentState>,
}

/// One report to write, and what it records.
struct Report {
    patch: serde_json::Value,
    side: Side,
    state: AgentState,
}

#[derive(Clone, Copy)]
enum Side {
    Target,
    Source,
}

struct Double {
    client: kube::Client,
    log: Arc<AgentLog>,
    transfer: Duration,
    written: HashMap<String, Written>,
}

impl Double {
    /// What this Migration asks of its agents now, if anything; the
    /// transfer's end when it is under way and not yet due.
    fn next(&self, m: &Migration, uid: &str, key: &str) -> (Option<Report>, Option<Instant>) {
        let status = m.status.clone().unwrap_or_default();
        let written = self.written.get(uid).copied().unwrap_or_default();
        // The store may not show our last write yet: ours is the truth.
        let target = written.target.or(status.target.as_ref().map(|r| r.state));
        let source = written.source.or(status.source.as_ref().map(|r| r.state));
        let target_host = status.target_host.clone().unwrap_or_default();
        let vm = m.spec.vm_name.as_str();
        let log = &self.log;
        let source_report = |state: AgentState, patch: serde_json::Value| Report {
            patch,
            side: Side::Source,
            state,
        };
        match status.phase {
            MigrationPhase::PreparingTarget if target.is_none() => {
                log.prepared_on
                    .lock()
                    .unwrap()
                    .insert(key.to_string(), target_host.clone());
                let report = if log.broken_targets.lock().unwrap().contains(&target_host) {
                    Report {
                        patch: json!({"status": {"target": {
                            "state": "Failed", "reason": "TargetPreparationFailed",
                            "message": format!("{target_host}: QEMU could not start the incoming VM"),
                            "time": k8s_openapi::jiff::Timestamp::now().to_string()}}}),
                        side: Side::Target,
                        state: AgentState::Failed,
                    }
                } else {
                    Report {
                        patch: json!({"status": {"target": report(AgentState::Ready)}}),
                        side: Side::Target,
                        state: AgentState::Ready,
                    }
                };
                (Some(report), None)
            }
            MigrationPhase::Running
                if source == Some(AgentState::Transferring)
                    && log.unconvergeable.lock().unwrap().contains(vm) =>
            {
                let patch = json!({"status": {"source": {
                    "state": "Failed", "reason": "NotConverging",
                    "message": "the guest dirties memory faster than the link carries it",
                    "time": k8s_openapi::jiff::Timestamp::now().to_string()}}});
                (Some(source_report(AgentState::Failed, patch)), None)
            }
            MigrationPhase::Running
                if m.spec.cancel
                    && !matches!(source, Some(AgentState::SwitchedOver | AgentState::Aborted)) =>
            {
                let patch = json!({"status": {"source": report(AgentState::Aborted)}});
                (Some(source_report(AgentState::Aborted, patch)), None)
            }
            MigrationPhase::Running if source.is_none() => {
                log.started
                    .lock()
                    .unwrap()
                    .insert(key.to_string(), Instant::now());
                let patch = json!({"status": {"source": report(AgentState::Transferring)}});
                (Some(source_report(AgentState::Transferring, patch)), None)
            }
            MigrationPhase::Running if source == Some(AgentState::Transferring) => {
                let begun = *log
                    .started
                    .lock()
                    .unwrap()
                    .entry(key.to_string())
                    .or_insert_with(Instant::now);
                let end = begun + log.transfer_of(vm, self.transfer);
                if Instant::now() < end {
                    return (None, Some(end));
                }
                log.spans
                    .lock()
                    .unwrap()
                    .push((vm.to_string(), begun, Instant::now()));
                *log.moves.lock().unwrap().entry(vm.to_string()).or_default() += 1;
                let patch = json!({"status": {
                    "source": report(AgentState::SwitchedOver), "downtimeMs": 12}});
                (Some(source_report(AgentState::SwitchedOver, patch)), None)
            }
            _ => (None, None),
        }
    }

    /// One pass over every Migration: write what is due; the earliest
    /// transfer end still to come.
    async fn pass(&mut self, migrations: &[Arc<Migration>]) -> Option<Instant> {
        let mut due: Option<Instant> = None;
        for m in migrations {
            let Some(uid) = m.meta().uid.clone() else {
                continue;
            };
            let ns = m.namespace().unwrap_or_default();
            let key = format!("{ns}/{}", m.name_any());
            let (report, end) = self.next(m, &uid, &key);
            if let Some(end) = end {
                due = Some(due.map_or(end, |d| d.min(end)));
            }
            let Some(report) = report else { continue };
            let api: Api<Migration> = Api::namespaced(self.client.clone(), &ns);
            let written = api
                .patch_status(
                    &m.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&report.patch),
                )
                .await
                .is_ok();
            if written {
                let w = self.written.entry(uid).or_default();
                match report.side {
                    Side::Target => w.target = Some(report.state),
                    Side::Source => w.source = Some(report.state),
                }
            }
        }
        due
    }
}

/// Run the simulated agents until `stop`.
pub async fn simulate_agents(
    client: kube::Client,
    log: Arc<AgentLog>,
    transfer: Duration,
    stop: CancellationToken,
) {
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<Migration>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    // Woken on every event, as the real agent is; events that arrive
    // during a pass coalesce into one more pass.
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::channel::<()>(1);
    let feed = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while stream.next().await.is_some() {
            let _ = wake_tx.try_send(());
        }
    });
    tokio::select! {
        _ = stop.cancelled() => {
            feed.abort();
            return;
        }
        _ = store.wait_until_ready() => {}
    }
    let mut double = Double {
        client,
        log,
        transfer,
        written: HashMap::new(),
    };
    loop {
        let due = double.pass(&store.state()).await;
        let timer = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = wake_rx.recv() => {}
            _ = timer => {}
        }
    }
    feed.abort();
}
