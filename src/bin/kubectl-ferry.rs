//! `kubectl ferry`: move VMs, drain hosts and follow migrations.

use clap::Parser;
use ferry::cli::{GlobalArgs, UserCommand};

/// Move running VMs between hosts, drain hosts, and watch it happen.
#[derive(Parser)]
#[command(name = "kubectl ferry", version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: UserCommand,
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    ferry::cli::run_user_command(&cli.global, cli.command).await
}
