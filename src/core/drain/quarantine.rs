//! Hosts that keep failing incoming migrations are quarantined: no
//! migration targets them until the quarantine ends.
//!
//! ```text
//!  failed migrations ─► blamed on the target? (TargetPreparationFailed,
//!        │              TargetPreparationTimeout, TargetHostLost,
//!        │              PostCopyUnavailable)
//!        ▼ per target host, oldest first
//!  ≥ host_quarantine_after of them within host_quarantine_window
//!        ▼ (the latest failure that completes such a run)
//!  quarantined until that failure + host_quarantine_period
//!        ▼
//!  the scheduler refuses the host (reason HostQuarantined, in the
//!  Migration's status.schedulingDecision); balancing skips it
//! ```
//!
//! A quarantine is derived from the Migrations' recorded failures, not
//! stored: a restarted controller computes the same one, and it lapses on
//! its own. A failure that is the VM's or the source's (NotConverging,
//! SourceHostLost, ...) does not count against the target.

use std::collections::BTreeMap;

use super::retry::RetryPolicy;
use crate::core::migration::FailureReason;
use crate::core::scheduler::HostQuarantine;
use crate::core::time::Timestamp;

/// A failed migration and the host it was going to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetFailure {
    /// The target host.
    pub host: String,
    /// When it failed.
    pub at: Timestamp,
    /// Why.
    pub reason: FailureReason,
}

/// Whether a failure says something is wrong with the target host.
pub fn blames_target(reason: FailureReason) -> bool {
    matches!(
        reason,
        FailureReason::TargetPreparationFailed
            | FailureReason::TargetPreparationTimeout
            | FailureReason::TargetHostLost
            | FailureReason::PostCopyUnavailable
    )
}

/// The quarantines in force at `now`, by host.
pub fn quarantined_hosts(
    failures: &[TargetFailure],
    p: &RetryPolicy,
    now: Timestamp,
) -> BTreeMap<String, HostQuarantine> {
    let mut by_host: BTreeMap<&str, Vec<&TargetFailure>> = BTreeMap::new();
    for f in failures.iter().filter(|f| blames_target(f.reason)) {
        by_host.entry(f.host.as_str()).or_default().push(f);
    }
    let need = p.host_quarantine_after.max(1) as usize;
    let mut out = BTreeMap::new();
    for (host, mut list) in by_host {
        list.sort_by_key(|f| f.at);
        // The latest failure that completes a run of `need` within the window.
        let latest = (need - 1..list.len())
            .rev()
            .find(|&i| list[i].at.since(list[i + 1 - need].at) <= p.host_quarantine_window);
        let Some(i) = latest else { continue };
        let until = list[i].at.plus(p.host_quarantine_period);
        if until > now {
            let failures = list[..=i]
                .iter()
                .filter(|f| list[i].at.since(f.at) <= p.host_quarantine_window)
                .count();
            out.insert(
                host.to_string(),
                HostQuarantine {
                    until,
                    failures: u32::try_from(failures).unwrap_or(u32::MAX),
                    last: list[i].reason,
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            host_quarantine_after: 3,
            host_quarantine_window: Duration::from_secs(600),
            host_quarantine_period: Duration::from_secs(1800),
            ..RetryPolicy::default()
        }
    }

    fn fail(host: &str, at_s: i64, reason: FailureReason) -> TargetFailure {
        TargetFailure {
            host: host.into(),
            at: Timestamp::from_secs(at_s),
            reason,
        }
    }

    const PREP: FailureReason = FailureReason::TargetPreparationFailed;

    #[test]
    fn three_target_failures_within_the_window_quarantine_the_host_for_the_period() {
        let f = [
            fail("h1", 0, PREP),
            fail("h1", 100, PREP),
            fail("h1", 200, PREP),
        ];
        let q = quarantined_hosts(&f, &policy(), Timestamp::from_secs(300));
        let h1 = q["h1"];
        assert_eq!(h1.until, Timestamp::from_secs(2000));
        assert_eq!((h1.failures, h1.last), (3, PREP));
        assert!(quarantined_hosts(&f, &policy(), Timestamp::from_secs(2000)).is_empty());
    }

    #[test]
    fn failures_spread_wider_than_the_window_or_not_the_targets_fault_do_not_count() {
        let spread = [
            fail("h1", 0, PREP),
            fail("h1", 400, PREP),
            fail("h1", 1000, PREP),
        ];
        assert!(quarantined_hosts(&spread, &policy(), Timestamp::from_secs(1001)).is_empty());
        let vm = FailureReason::NotConverging;
        let theirs = [fail("h1", 0, vm), fail("h1", 1, vm), fail("h1", 2, vm)];
        assert!(quarantined_hosts(&theirs, &policy(), Timestamp::from_secs(3)).is_empty());
        let two_hosts = [
            fail("h1", 0, PREP),
            fail("h2", 1, PREP),
            fail("h1", 2, PREP),
        ];
        assert!(quarantined_hosts(&two_hosts, &policy(), Timestamp::from_secs(3)).is_empty());
    }

    proptest! {
        /// A host is quarantined at `now` exactly when some run of
        /// `after` target failures within the window ended less than
        /// `period` ago (checked against a brute force over every run).
        #[test]
        fn quarantine_matches_the_brute_force_definition(
            times in proptest::collection::vec(0i64..5000, 0..12),
            now in 0i64..8000,
        ) {
            let p = policy();
            let f: Vec<_> = times.iter().map(|t| fail("h", *t, PREP)).collect();
            let q = quarantined_hosts(&f, &p, Timestamp::from_secs(now));
            let mut sorted = times.clone();
            sorted.sort();
            let expected = (2..sorted.len()).any(|i| {
                sorted[i] - sorted[i - 2] <= 600 && sorted[i] + 1800 > now
            });
            prop_assert_eq!(q.contains_key("h"), expected);
        }
    }
}
