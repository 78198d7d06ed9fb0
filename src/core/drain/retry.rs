//! Retries of a failed move: exponential back-off, a limit, quarantine.
//!
//! ```text
//!  failed ──► VM failed ≥ quarantine_after times within quarantine_window? ──► Quarantine
//!        ──► last failure not retryable (VmNotMigratable, PostCopyInterrupted, ...) ──► GiveUp
//!        ──► attempts ≥ max_attempts in this maintenance ──► GiveUp (a blocker)
//!        ──► retry at last failure + base × factor^(attempts−1), capped
//! ```
//!
//! Quarantine is a condition on the VM that balancing and retries respect
//! until a user clears it, so a VM that keeps failing does not keep a drain
//! or the network busy forever.

use std::time::Duration;

use crate::core::migration::FailureReason;
use crate::core::time::Timestamp;

/// Back-off and limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per VM per maintenance (3: Nova's `migrate_max_retries`
    /// style, one try and two retries).
    pub max_attempts: u32,
    /// First back-off.
    pub base: Duration,
    /// Growth per attempt.
    pub factor: u32,
    /// Back-off cap.
    pub max_backoff: Duration,
    /// Failures within the window that quarantine a VM.
    pub quarantine_after: u32,
    /// The quarantine window.
    pub quarantine_window: Duration,
    /// Failed incoming migrations (blamed on the target) within
    /// `host_quarantine_window` that quarantine a host.
    pub host_quarantine_after: u32,
    /// The window of `host_quarantine_after`.
    pub host_quarantine_window: Duration,
    /// How long a quarantined host is left out of scheduling.
    pub host_quarantine_period: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            // Long enough for a transient overload or a restarting agent.
            base: Duration::from_secs(30),
            factor: 2,
            max_backoff: Duration::from_secs(600),
            // Five failures in a day, across maintenances: something is wrong
            // with this VM, not with the hosts.
            quarantine_after: 5,
            quarantine_window: Duration::from_secs(24 * 3600),
            // Three targets failures in ten minutes: the host, not the VMs,
            // is the likely cause (a broken QEMU, a full disk, a bad link);
            // half an hour away from new work gives an operator time to look.
            host_quarantine_after: 3,
            host_quarantine_window: Duration::from_secs(600),
            host_quarantine_period: Duration::from_secs(1800),
        }
    }
}

/// A failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// When it failed.
    pub at: Timestamp,
    /// Why.
    pub reason: FailureReason,
}

/// What to do after failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try now.
    RetryNow,
    /// Try at this time.
    RetryAt(Timestamp),
    /// Stop trying in this maintenance: report a blocker.
    GiveUp {
        /// For a person.
        message: String,
    },
    /// Quarantine the VM.
    Quarantine {
        /// For a person.
        message: String,
    },
}

/// Decide about the next attempt, from this maintenance's failed attempts
/// (oldest first) and every recent failure of the VM.
pub fn next_attempt(
    this_drain: &[Attempt],
    vm_history: &[Attempt],
    p: &RetryPolicy,
    now: Timestamp,
) -> RetryDecision {
    let recent = vm_history
        .iter()
        .filter(|a| now.since(a.at) < p.quarantine_window)
        .count();
    if recent >= p.quarantine_after as usize {
        return RetryDecision::Quarantine {
            message: format!(
                "{recent} failed migrations in the last {} h; quarantined until a user clears it",
                p.quarantine_window.as_secs() / 3600
            ),
        };
    }
    let Some(last) = this_drain.last() else {
        return RetryDecision::RetryNow;
    };
    if !last.reason.retryable() {
        return RetryDecision::GiveUp {
            message: format!("{}: retrying cannot help", last.reason.describe()),
        };
    }
    let attempts = u32::try_from(this_drain.len()).unwrap_or(u32::MAX);
    if attempts >= p.max_attempts {
        return RetryDecision::GiveUp {
            message: format!("failed {attempts} times, last: {}", last.reason.describe()),
        };
    }
    let growth = p.factor.checked_pow(attempts - 1).unwrap_or(u32::MAX);
    let backoff = p
        .base
        .checked_mul(growth)
        .unwrap_or(p.max_backoff)
        .min(p.max_backoff);
    let at = last.at.plus(backoff);
    if now >= at {
        RetryDecision::RetryNow
    } else {
        RetryDecision::RetryAt(at)
    }
}
