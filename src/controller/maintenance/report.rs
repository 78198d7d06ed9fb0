//! What a drain tells people: Events on each change a pass makes (phase,
//! progress, new blockers), and the outcome that outlives the maintenance.
//!
//! ```text
//!  status before ─┐
//!                 ├─ phase changed ───────► Draining | Completed | DeadlineExceeded | Blocked
//!  status after ──┤  fewer VMs remaining ─► Progress  "3 of 8 VMs have left h0 ..."
//!                 └─ a blocker is new ────► Blocked (Warning) | RetryPending, about the VM
//!  deleted ─► Cancelling (the live ones) ─► MaintenanceEnded on the HostMaintenance *and*
//!             on the Host: the drain's Migrations go with the maintenance (owner
//!             references); the Host's Event keeps what became of each VM.
//! ```
//!
//! Each Event's note names what changed, so a pass repeated on a stale
//! cache counts the same Event again instead of telling a new story.

use std::sync::Arc;

use kube::ResourceExt;

use crate::api::maintenance::{HostMaintenanceStatus, MaintenancePhase};
use crate::api::{HostMaintenance, Migration, MigrationPhase};
use crate::controller::Ctx;
use crate::controller::events::{self, Note};

/// The blocker reason of a failed attempt waiting for its back-off.
pub const RETRY_PENDING: &str = "RetryPending";

/// Record the Events of one pass, from the status before and after it.
pub async fn announce(
    ctx: &Ctx,
    hm: &HostMaintenance,
    before: &HostMaintenanceStatus,
    after: &HostMaintenanceStatus,
    late: bool,
) {
    for note in notes(&hm.spec.host, before, after, late) {
        super::publish(ctx, hm, note).await;
    }
}

/// The Events of a pass (pure, for tests).
pub fn notes(
    host: &str,
    before: &HostMaintenanceStatus,
    after: &HostMaintenanceStatus,
    late: bool,
) -> Vec<Note> {
    let mut out = Vec::new();
    let message = after.message.clone().unwrap_or_default();
    if before.phase == MaintenancePhase::Draining && after.vms_remaining < before.vms_remaining {
        let gone = after.vms_total.saturating_sub(after.vms_remaining);
        out.push(Note::normal(
            "Progress",
            "Drain",
            format!(
                "{gone} of {} VMs have left {host}; {} remaining, {} blocked",
                after.vms_total, after.vms_remaining, after.vms_blocked
            ),
        ));
    }
    if after.phase != before.phase {
        out.push(match after.phase {
            MaintenancePhase::Failed if late => Note::warning("DeadlineExceeded", "Drain", message),
            MaintenancePhase::Failed => Note::warning("Blocked", "Drain", message),
            MaintenancePhase::Draining => Note::normal(
                "Draining",
                "Drain",
                format!(
                    "{host} is unschedulable; moving {} VMs off it",
                    after.vms_total
                ),
            ),
            p => Note::normal(&format!("{p:?}"), "Drain", message),
        });
    }
    for b in &after.blockers {
        let known = before
            .blockers
            .iter()
            .any(|o| o.namespace == b.namespace && o.vm == b.vm && o.reason == b.reason);
        if known {
            continue;
        }
        let text = format!("{}/{}: {}", b.namespace, b.vm, b.message);
        let note = if b.reason == RETRY_PENDING {
            Note::normal(RETRY_PENDING, "Retry", text)
        } else {
            Note::warning("Blocked", "Drain", format!("{} ({})", text, b.reason))
        };
        out.push(note.about(events::vm_reference(&b.namespace, &b.vm)));
    }
    out
}

/// What became of each VM of a drain, from its Migrations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// `ns/vm → host` of the VMs moved.
    pub moved: Vec<String>,
    /// `ns/vm` whose last attempt was cancelled.
    pub cancelled: Vec<String>,
    /// `ns/vm (reason)` whose last attempt failed.
    pub failed: Vec<String>,
}

impl Outcome {
    /// The outcome of a drain's Migrations (the last attempt of each VM).
    pub fn of(migrations: &[Arc<Migration>]) -> Self {
        let mut last: std::collections::BTreeMap<String, &Migration> = Default::default();
        for m in migrations {
            let vm = format!("{}/{}", m.namespace().unwrap_or_default(), m.spec.vm_name);
            let attempt = |m: &Migration| {
                m.labels()
                    .get(super::ATTEMPT_LABEL)
                    .and_then(|a| a.parse::<u32>().ok())
                    .unwrap_or(1)
            };
            if last.get(&vm).is_none_or(|o| attempt(o) < attempt(m)) {
                last.insert(vm, m);
            }
        }
        let mut out = Self::default();
        for (vm, m) in last {
            let status = m.status.clone().unwrap_or_default();
            match status.phase {
                MigrationPhase::Succeeded => out
                    .moved
                    .push(format!("{vm} → {}", status.target_host.unwrap_or_default())),
                MigrationPhase::Cancelled => out.cancelled.push(vm),
                MigrationPhase::Failed => out.failed.push(format!(
                    "{vm} ({})",
                    status.failure_reason.unwrap_or_default()
                )),
                _ => {}
            }
        }
        out
    }

    /// For a person.
    pub fn describe(&self, maintenance: &str, host: &str) -> String {
        let list = |v: &[String]| {
            if v.is_empty() {
                String::new()
            } else {
                format!(": {}", v.join(", "))
            }
        };
        format!(
            "HostMaintenance {maintenance} ended; {host} is back in service. \
             {} VMs moved{}; {} cancelled{}; {} failed{}",
            self.moved.len(),
            list(&self.moved),
            self.cancelled.len(),
            list(&self.cancelled),
            self.failed.len(),
            list(&self.failed),
        )
    }
}

/// Record the end of a maintenance on it and on its Host (which outlives it).
pub async fn ended(ctx: &Ctx, hm: &HostMaintenance, outcome: &Outcome) {
    let text = outcome.describe(&hm.name_any(), &hm.spec.host);
    super::publish(
        ctx,
        hm,
        Note::normal("MaintenanceEnded", "Drain", text.clone()),
    )
    .await;
    ctx.events
        .publish(
            &events::host_reference(&hm.spec.host),
            Note::normal("MaintenanceEnded", "Drain", text).about(events::reference(hm)),
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::maintenance::Blocker;

    fn status(
        phase: MaintenancePhase,
        remaining: u32,
        blockers: &[(&str, &str)],
    ) -> HostMaintenanceStatus {
        HostMaintenanceStatus {
            phase,
            vms_total: 4,
            vms_remaining: remaining,
            vms_blocked: blockers.len() as u32,
            blockers: blockers
                .iter()
                .map(|(vm, reason)| Blocker {
                    namespace: "ns".into(),
                    vm: (*vm).into(),
                    reason: (*reason).into(),
                    message: "m".into(),
                })
                .collect(),
            message: Some("msg".into()),
            ..HostMaintenanceStatus::default()
        }
    }

    fn reasons(n: &[Note]) -> Vec<&str> {
        n.iter().map(|n| n.reason.as_str()).collect()
    }

    #[test]
    fn a_pass_that_changes_nothing_says_nothing() {
        let s = status(MaintenancePhase::Draining, 3, &[("a", "NotMigratable")]);
        assert!(notes("h0", &s, &s, false).is_empty());
    }

    #[test]
    fn the_start_progress_blockers_and_the_end_are_each_told_once() {
        let pending = HostMaintenanceStatus::default();
        let d4 = status(MaintenancePhase::Draining, 4, &[]);
        assert_eq!(reasons(&notes("h0", &pending, &d4, false)), ["Draining"]);
        let d2 = status(MaintenancePhase::Draining, 2, &[("a", RETRY_PENDING)]);
        let n = notes("h0", &d4, &d2, false);
        assert_eq!(reasons(&n), ["Progress", RETRY_PENDING]);
        assert!(
            n[0].note.starts_with("2 of 4 VMs have left h0"),
            "{}",
            n[0].note
        );
        assert_eq!(n[1].related.as_ref().unwrap().name.as_deref(), Some("a"));
        let blocked = status(MaintenancePhase::Draining, 2, &[("a", "RetriesExhausted")]);
        let n = notes("h0", &d2, &blocked, false);
        assert_eq!(reasons(&n), ["Blocked"]);
        assert_eq!(n[0].kind, events::Kind::Warning);
        let failed = status(MaintenancePhase::Failed, 2, &[("a", "RetriesExhausted")]);
        assert_eq!(reasons(&notes("h0", &blocked, &failed, false)), ["Blocked"]);
        assert_eq!(
            reasons(&notes("h0", &blocked, &failed, true)),
            ["DeadlineExceeded"]
        );
        let done = status(MaintenancePhase::Completed, 0, &[]);
        assert_eq!(
            reasons(&notes("h0", &d2, &done, false)),
            ["Progress", "Completed"]
        );
    }
}
