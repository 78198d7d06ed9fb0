//! Why a migration failed: machine-readable, stable, and said for people.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A failure reason. [`FailureReason::as_str`] is the stable string written
/// in `status.failureReason`, conditions, Events and metric labels; agents
/// write the same strings in their reports, parsed back with [`FromStr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The VM does not exist.
    VmNotFound,
    /// The VM is not running anywhere, so it cannot move live.
    VmNotRunning,
    /// `spec.migratable` is false.
    VmNotMigratable,
    /// A disk's cache is not `none` and the policy does not allow unsafe.
    UnsafeDiskCache,
    /// An evacuation was asked for a VM whose host has not failed.
    SourceNotFailed,
    /// The named policy does not exist.
    PolicyNotFound,
    /// No host passes the scheduler's filters (or the requested one fails).
    NoHostFits,
    /// The source host stopped renewing its Lease.
    SourceHostLost,
    /// The target host stopped renewing its Lease.
    TargetHostLost,
    /// The target agent could not prepare the incoming VM.
    TargetPreparationFailed,
    /// The target was not ready within the progress timeout.
    TargetPreparationTimeout,
    /// The target kernel has no userfaultfd: post-copy is impossible.
    PostCopyUnavailable,
    /// The peer agent refused the stream (certificate or identity).
    PeerRejected,
    /// The transfer failed (QEMU or relay error).
    TransferFailed,
    /// Remaining memory did not go down for `progressTimeout`.
    ProgressTimeout,
    /// `completionTimeoutPerGiB × memory` passed.
    CompletionTimeout,
    /// The guest dirties memory faster than the link carries it.
    NotConverging,
    /// No bytes moved for the stall timeout (a cut link).
    TransferStalled,
    /// Post-copy could not finish: guest state is split between hosts.
    PostCopyInterrupted,
    /// The source agent never confirmed an abort.
    AbortUnconfirmed,
}

impl FailureReason {
    /// Every reason, for tests and metric label sets.
    pub const ALL: [FailureReason; 20] = [
        Self::VmNotFound,
        Self::VmNotRunning,
        Self::VmNotMigratable,
        Self::UnsafeDiskCache,
        Self::SourceNotFailed,
        Self::PolicyNotFound,
        Self::NoHostFits,
        Self::SourceHostLost,
        Self::TargetHostLost,
        Self::TargetPreparationFailed,
        Self::TargetPreparationTimeout,
        Self::PostCopyUnavailable,
        Self::PeerRejected,
        Self::TransferFailed,
        Self::ProgressTimeout,
        Self::CompletionTimeout,
        Self::NotConverging,
        Self::TransferStalled,
        Self::PostCopyInterrupted,
        Self::AbortUnconfirmed,
    ];

    /// The stable string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VmNotFound => "VmNotFound",
            Self::VmNotRunning => "VmNotRunning",
            Self::VmNotMigratable => "VmNotMigratable",
            Self::UnsafeDiskCache => "UnsafeDiskCache",
            Self::SourceNotFailed => "SourceNotFailed",
            Self::PolicyNotFound => "PolicyNotFound",
            Self::NoHostFits => "NoHostFits",
            Self::SourceHostLost => "SourceHostLost",
            Self::TargetHostLost => "TargetHostLost",
            Self::TargetPreparationFailed => "TargetPreparationFailed",
            Self::TargetPreparationTimeout => "TargetPreparationTimeout",
            Self::PostCopyUnavailable => "PostCopyUnavailable",
            Self::PeerRejected => "PeerRejected",
            Self::TransferFailed => "TransferFailed",
            Self::ProgressTimeout => "ProgressTimeout",
            Self::CompletionTimeout => "CompletionTimeout",
            Self::NotConverging => "NotConverging",
            Self::TransferStalled => "TransferStalled",
            Self::PostCopyInterrupted => "PostCopyInterrupted",
            Self::AbortUnconfirmed => "AbortUnconfirmed",
        }
    }

    /// Whether trying the same migration again may succeed (a drain retries
    /// only these).
    pub fn retryable(self) -> bool {
        !matches!(
            self,
            Self::VmNotFound
                | Self::VmNotMigratable
                | Self::UnsafeDiskCache
                | Self::SourceNotFailed
                | Self::PolicyNotFound
                | Self::PostCopyUnavailable
                | Self::PostCopyInterrupted
                | Self::PeerRejected
        )
    }

    /// A sentence for a person, to which the specifics are appended.
    pub fn describe(self) -> &'static str {
        match self {
            Self::VmNotFound => "the virtual machine no longer exists",
            Self::VmNotRunning => {
                "the virtual machine is not running on any host, so it cannot move live"
            }
            Self::VmNotMigratable => "the virtual machine is marked as not migratable",
            Self::UnsafeDiskCache => {
                "a disk uses a cache mode other than none; allow it with a policy's allowUnsafe"
            }
            Self::SourceNotFailed => "evacuation is only for VMs of a failed (fenced) host",
            Self::PolicyNotFound => "the migration names a MigrationPolicy that does not exist",
            Self::NoHostFits => "no host can take the virtual machine",
            Self::SourceHostLost => "the source host stopped answering; the VM stays where it was",
            Self::TargetHostLost => "the target host stopped answering; the VM stays on the source",
            Self::TargetPreparationFailed => "the target host could not prepare the incoming VM",
            Self::TargetPreparationTimeout => "the target host was not ready in time",
            Self::PostCopyUnavailable => {
                "post-copy needs userfaultfd, which the target kernel does not offer"
            }
            Self::PeerRejected => "the other host's agent refused the migration stream",
            Self::TransferFailed => "the memory transfer failed",
            Self::ProgressTimeout => {
                "the remaining memory stopped going down for longer than progressTimeout"
            }
            Self::CompletionTimeout => {
                "the migration took longer than completionTimeoutPerGiB allows"
            }
            Self::NotConverging => "the guest writes memory faster than the link can carry it",
            Self::TransferStalled => {
                "no bytes moved for too long: the link between the hosts is likely cut"
            }
            Self::PostCopyInterrupted => {
                "post-copy could not finish: the guest's memory is split between hosts and the guest is lost"
            }
            Self::AbortUnconfirmed => "the source agent did not confirm the abort",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason string that is not one of [`FailureReason`]'s.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown migration failure reason {0:?}")]
pub struct UnknownReason(pub String);

impl FromStr for FailureReason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_strings_are_unique_and_parse_back() {
        let mut seen = std::collections::HashSet::new();
        for r in FailureReason::ALL {
            assert!(seen.insert(r.as_str()), "{r} twice");
            assert_eq!(r.as_str().parse::<FailureReason>(), Ok(r));
            assert!(!r.describe().is_empty());
        }
        assert!("Nope".parse::<FailureReason>().is_err());
    }

    #[test]
    fn only_transient_failures_are_retryable() {
        assert!(FailureReason::TargetHostLost.retryable());
        assert!(FailureReason::NotConverging.retryable());
        assert!(!FailureReason::VmNotMigratable.retryable());
        assert!(!FailureReason::PostCopyInterrupted.retryable());
    }
}
