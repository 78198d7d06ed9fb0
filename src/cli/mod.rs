//! The `ferry` and `kubectl ferry` command lines.
//!
//! `kubectl ferry` (the `kubectl-ferry` binary) carries the user commands
//! ([`UserCommand`]); `ferry` carries the same commands plus the programs
//! (`up`, `apiserver`, `controller`, `agent`) and `crds`.

pub mod client;
pub mod crds;
pub mod daemons;
pub mod drain;
pub mod migrate;
pub mod output;
pub mod progress;
pub mod status;
pub mod up;

use clap::{Args, Subcommand};

/// Flags every user command takes.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Path of the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Namespace of VMs and Migrations.
    #[arg(short = 'n', long, global = true, default_value = "default")]
    pub namespace: String,
    /// Output format: text (default), json or yaml.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = output::Format::Text)]
    pub output: output::Format,
}

/// Whether a command waits for the work it started.
#[derive(Args, Debug, Clone, Copy)]
pub struct WaitArgs {
    /// Follow the work until it ends, with live progress (the default).
    #[arg(long, overrides_with = "no_wait")]
    pub wait: bool,
    /// Return as soon as the request is accepted.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds (the work goes on).
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
}

impl WaitArgs {
    /// Whether to follow the work.
    pub fn follow(&self) -> bool {
        !self.no_wait
    }
}

/// The commands of `kubectl ferry`, also available as `ferry <command>`.
#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Move a VM to another host (`nova live-migration`, `xm migrate [-l]`).
    Migrate(migrate::MigrateArgs),
    /// Take a host out of service and move its VMs away (`nova host-evacuate-live`).
    Drain(drain::DrainArgs),
    /// Return a drained host to service.
    Undrain(drain::UndrainArgs),
    /// Rebuild the VMs of a failed host elsewhere (`nova evacuate`).
    Evacuate(drain::EvacuateArgs),
    /// Cancel a migration; the VM keeps running on its source host.
    Cancel(migrate::CancelArgs),
    /// Hosts with their load and VM counts, and the migrations in flight.
    Status,
    /// Why a migration's target was chosen and why every other host was not.
    Explain(migrate::ExplainArgs),
}

/// Run a user command; the exit code is non-zero when the work failed.
pub async fn run_user_command(
    global: &GlobalArgs,
    command: UserCommand,
) -> anyhow::Result<std::process::ExitCode> {
    let client = client::connect(global).await?;
    match command {
        UserCommand::Migrate(args) => migrate::migrate(&client, global, args).await,
        UserCommand::Drain(args) => drain::drain(&client, global, args).await,
        UserCommand::Undrain(args) => drain::undrain(&client, global, args).await,
        UserCommand::Evacuate(args) => drain::evacuate(&client, global, args).await,
        UserCommand::Cancel(args) => migrate::cancel(&client, global, args).await,
        UserCommand::Status => status::status(&client, global).await,
        UserCommand::Explain(args) => migrate::explain(&client, global, args).await,
    }
}
