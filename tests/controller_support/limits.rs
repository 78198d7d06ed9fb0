//! What the concurrency limits count, at every change the API records: a
//! watch on every Migration, evaluated after each event in the order the
//! API server recorded them.
//!
//! The limits' documented meaning (`parallelMigrationsPerCluster`,
//! `parallelOutboundPerHost`, `parallelInboundPerHost`), written out here
//! from the phases and the agents' reports rather than taken from the
//! controller's code:
//!
//! | counted as | phases |
//! |---|---|
//! | a transfer | `Running`, `PostCopy`, until the source reports `SwitchedOver`, `Aborted` or `Failed`; an evacuation in `Scheduled` or `Completing` |
//! | a preparation ahead (as many again allowed) | `Scheduled`, `PreparingTarget` (not an evacuation) |
//! | neither (holds only its VM) | `Completing` of a live or cold move |

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher;
use kube::{ResourceExt, runtime::WatchStreamExt};
use tokio_util::sync::CancellationToken;

use ferry::api::{AgentState, Migration, MigrationPhase, MigrationType};

/// The highest count seen at any recorded instant, in the cluster and per
/// source and target host.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub cluster: usize,
    pub outbound: BTreeMap<String, usize>,
    pub inbound: BTreeMap<String, usize>,
}

impl Counts {
    fn raise(&mut self, now: &Counts) {
        self.cluster = self.cluster.max(now.cluster);
        for (h, n) in &now.outbound {
            let e = self.outbound.entry(h.clone()).or_default();
            *e = (*e).max(*n);
        }
        for (h, n) in &now.inbound {
            let e = self.inbound.entry(h.clone()).or_default();
            *e = (*e).max(*n);
        }
    }

    fn add(&mut self, source: &str, target: &str, outbound: bool) {
        self.cluster += 1;
        if outbound {
            *self.outbound.entry(source.to_string()).or_default() += 1;
        }
        *self.inbound.entry(target.to_string()).or_default() += 1;
    }

    /// Whether every count stayed within these limits.
    pub fn within(&self, cluster: usize, outbound: usize, inbound: usize) -> bool {
        self.cluster <= cluster
            && self.outbound.values().all(|n| *n <= outbound)
            && self.inbound.values().all(|n| *n <= inbound)
    }
}

/// The highest concurrency seen at any recorded instant.
#[derive(Debug, Default, Clone)]
pub struct Peaks {
    /// Transfers: what the limits count.
    pub transfers: Counts,
    /// Targets prepared ahead of their transfer (as many again allowed).
    pub preparations: Counts,
    /// Most transfers and preparations at one instant, together.
    pub together: usize,
    /// VMs with two migrations in flight at once (must stay empty).
    pub doubled: BTreeSet<String>,
    /// Each Migration's last recorded phase and `spec.cancel` (kept after
    /// it is deleted).
    pub last: BTreeMap<String, (MigrationPhase, bool)>,
}

/// What a migration counts as, by the table above.
#[derive(PartialEq)]
enum Counted {
    Transfer,
    Preparation,
    VmOnly,
    Nothing,
}

fn counted(m: &Migration) -> Counted {
    let s = m.status.clone().unwrap_or_default();
    let evacuation = m.spec.migration_type == MigrationType::Evacuate;
    let ended = s.source.as_ref().is_some_and(|r| {
        matches!(
            r.state,
            AgentState::SwitchedOver | AgentState::Aborted | AgentState::Failed
        )
    });
    match s.phase {
        MigrationPhase::Scheduled | MigrationPhase::Completing if evacuation => Counted::Transfer,
        MigrationPhase::Scheduled | MigrationPhase::PreparingTarget => Counted::Preparation,
        MigrationPhase::Running | MigrationPhase::PostCopy if !ended => Counted::Transfer,
        MigrationPhase::Running | MigrationPhase::PostCopy | MigrationPhase::Completing => {
            Counted::VmOnly
        }
        _ => Counted::Nothing,
    }
}

/// Watch every Migration and record the peaks of what the limits count,
/// evaluated after each change in the order the API server recorded them.
pub fn watch_limits(client: kube::Client, stop: CancellationToken) -> Arc<Mutex<Peaks>> {
    let peaks = Arc::new(Mutex::new(Peaks::default()));
    let out = peaks.clone();
    tokio::spawn(async move {
        let api: Api<Migration> = Api::all(client);
        let stream = watcher(api, watcher::Config::default()).applied_objects();
        futures::pin_mut!(stream);
        let mut state: BTreeMap<String, Migration> = BTreeMap::new();
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = stream.next() => n,
            };
            let Some(Ok(m)) = next else { continue };
            state.insert(
                format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any()),
                m,
            );
            let mut p = peaks.lock().unwrap();
            for (k, m) in &state {
                let phase = m.status.as_ref().map(|s| s.phase).unwrap_or_default();
                p.last.insert(k.clone(), (phase, m.spec.cancel));
            }
            let (mut transfers, mut preparations) = (Counts::default(), Counts::default());
            let mut vms = BTreeSet::new();
            for m in state.values() {
                let s = m.status.clone().unwrap_or_default();
                let (source, target) = (
                    s.source_host.clone().unwrap_or_default(),
                    s.target_host.clone().unwrap_or_default(),
                );
                let outbound = m.spec.migration_type != MigrationType::Evacuate;
                match counted(m) {
                    Counted::Transfer => transfers.add(&source, &target, outbound),
                    Counted::Preparation => preparations.add(&source, &target, outbound),
                    Counted::VmOnly => {}
                    Counted::Nothing => continue,
                }
                if !vms.insert(m.spec.vm_name.clone()) {
                    p.doubled.insert(m.spec.vm_name.clone());
                }
            }
            p.together = p.together.max(transfers.cluster + preparations.cluster);
            p.transfers.raise(&transfers);
            p.preparations.raise(&preparations);
        }
    });
    out
}
