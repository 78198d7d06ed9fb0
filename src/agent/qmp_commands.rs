//! The QMP commands Ferry uses, typed: arguments as the struct's fields,
//! replies as [`Command::Response`](super::Command::Response).

use serde::{Deserialize, Serialize};

use super::Command;

/// An empty `return` (`{}`).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Empty {}

macro_rules! unit_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, Serialize)]
        pub struct $ty {}
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Response = Empty;
        }
    };
}

unit_command!(
    /// Leaves capabilities negotiation (the first command of a session).
    QmpCapabilities,
    "qmp_capabilities"
);
unit_command!(
    /// Cancels the outgoing migration; the source keeps running.
    MigrateCancel,
    "migrate_cancel"
);
unit_command!(
    /// Switches a running pre-copy migration to post-copy.
    MigrateStartPostcopy,
    "migrate-start-postcopy"
);
unit_command!(
    /// Resumes the guest's vCPUs.
    Cont,
    "cont"
);
unit_command!(
    /// Pauses the guest's vCPUs.
    Stop,
    "stop"
);
unit_command!(
    /// Makes QEMU exit.
    Quit,
    "quit"
);

/// `query-version`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryVersion {}
impl Command for QueryVersion {
    const NAME: &'static str = "query-version";
    type Response = VersionInfo;
}

/// QEMU's version.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    /// Numeric version.
    pub qemu: VersionTriple,
    /// Distribution package string.
    #[serde(default)]
    pub package: String,
}

/// `major.minor.micro`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl std::fmt::Display for VersionTriple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// `query-status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryStatus {}
impl Command for QueryStatus {
    const NAME: &'static str = "query-status";
    type Response = StatusInfo;
}

/// The VM's run state.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// QEMU's run state.
    pub status: RunState,
}

/// QEMU's `RunState`, with unknown values kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Running.
    Running,
    /// Paused by `stop` or `-S`.
    Paused,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// Source after a completed migration.
    Postmigrate,
    /// Paused for the final phase of an outgoing migration.
    FinishMigrate,
    /// Started with `-S`, never run.
    Prelaunch,
    /// The guest shut down.
    Shutdown,
    /// The guest panicked.
    GuestPanicked,
    /// An internal error stopped the VM.
    InternalError,
    /// Restoring a snapshot / loading VM state.
    RestoreVm,
    /// Paused by an I/O error.
    IoError,
    /// Suspended (S3).
    Suspended,
    /// Any state this client does not know.
    #[serde(untagged)]
    Other(String),
}

/// `query-migrate`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrate {}
impl Command for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    type Response = MigrationInfo;
}

/// QEMU's `MigrationStatus`, with unknown values kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration yet.
    None,
    /// Setting up.
    Setup,
    /// Being cancelled.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Pre-copy transferring.
    Active,
    /// Post-copy transferring.
    PostcopyActive,
    /// Post-copy stream broken, recoverable.
    PostcopyPaused,
    /// Post-copy recovery set up on the target.
    PostcopyRecoverSetup,
    /// Post-copy recovering.
    PostcopyRecover,
    /// Done.
    Completed,
    /// Failed.
    Failed,
    /// Colo mode.
    Colo,
    /// Held before switchover (`pause-before-switchover`).
    PreSwitchover,
    /// Switching over to the target device state.
    Device,
    /// Waiting for the unplug of devices.
    WaitUnplug,
    /// Any state this client does not know.
    #[serde(untagged)]
    Other(String),
}

impl MigrationStatus {
    /// Whether the migration has ended (one way or another).
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }

    /// Whether the guest already runs on the target (a failure now is fatal
    /// to the guest unless post-copy recovery succeeds).
    pub fn is_postcopy(&self) -> bool {
        matches!(
            self,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecover
                | MigrationStatus::PostcopyRecoverSetup
        )
    }
}

/// The reply of `query-migrate` (the fields Ferry reads).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Absent before any migration.
    pub status: Option<MigrationStatus>,
    /// Milliseconds since start (or total, once completed).
    pub total_time: Option<u64>,
    /// Measured downtime in ms, once completed.
    pub downtime: Option<u64>,
    /// Downtime QEMU expects at switchover, in ms, while active.
    pub expected_downtime: Option<u64>,
    /// Setup time in ms.
    pub setup_time: Option<u64>,
    /// RAM transfer statistics.
    pub ram: Option<RamStats>,
    /// Current auto-converge throttle, percent.
    pub cpu_throttle_percentage: Option<u64>,
    /// Why it failed.
    pub error_desc: Option<String>,
}

/// `MigrationStats` of RAM.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes transferred so far.
    pub transferred: u64,
    /// Bytes left to send in this iteration.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Zero pages sent as markers.
    #[serde(default)]
    pub duplicate: u64,
    /// Pages sent in full.
    #[serde(default)]
    pub normal: u64,
    /// Throughput in megabits per second.
    #[serde(default)]
    pub mbps: f64,
    /// Pages dirtied per second.
    #[serde(default)]
    pub dirty_pages_rate: u64,
    /// Completed dirty-bitmap syncs (pre-copy iterations).
    #[serde(default)]
    pub dirty_sync_count: u64,
    /// Page size QEMU counts pages in.
    #[serde(default)]
    pub page_size: u64,
    /// Post-copy page requests served.
    #[serde(default)]
    pub postcopy_requests: u64,
}

/// One migration capability and whether it is on.
#[derive(Debug, Clone, Serialize)]
pub struct CapabilityState {
    /// Capability name, e.g. `multifd`, `postcopy-ram`, `auto-converge`.
    pub capability: String,
    /// On or off.
    pub state: bool,
}

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetCapabilities {
    /// The capabilities to set.
    pub capabilities: Vec<CapabilityState>,
}
impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Response = Empty;
}

/// `migrate-set-parameters`; only the fields that are `Some` are sent.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Maximum downtime at switchover, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Bandwidth cap, bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Post-copy bandwidth cap, bytes per second (0 = unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Number of multifd channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    /// First auto-converge throttle, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u8>,
    /// Auto-converge throttle step, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u8>,
}
impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Response = Empty;
}

/// `migrate` (outgoing).
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    /// Destination, e.g. `unix:/path`.
    pub uri: String,
    /// Resume a paused post-copy migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
}
impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Response = Empty;
}

/// `migrate-incoming` (target started with `-incoming defer`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    /// Where to listen, e.g. `unix:/path`.
    pub uri: String,
}
impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Response = Empty;
}

/// `migrate-recover` (target side of post-copy recovery).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateRecover {
    /// Where to listen for the resumed stream.
    pub uri: String,
}
impl Command for MigrateRecover {
    const NAME: &'static str = "migrate-recover";
    type Response = Empty;
}

/// `migrate-pause` (force post-copy into the paused, recoverable state).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MigratePause {}
impl Command for MigratePause {
    const NAME: &'static str = "migrate-pause";
    type Response = Empty;
}

/// `pmemsave`: writes guest-physical memory to a file on the host
/// (diagnostics and tests).
#[derive(Debug, Clone, Serialize)]
pub struct Pmemsave {
    /// Guest-physical start address.
    pub val: u64,
    /// Bytes.
    pub size: u64,
    /// Host file to write.
    pub filename: String,
}
impl Command for Pmemsave {
    const NAME: &'static str = "pmemsave";
    type Response = Empty;
}
