//! `ferry-agent`: the node agent (`run`) and its fencing watchdog (`watchdog`).

use clap::Parser;
use ferry::cli::daemons::{self, AgentCommand};

/// Ferry's node agent: runs this host's VMs and its half of every migration.
#[derive(Parser)]
#[command(name = "ferry-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: AgentCommand,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    daemons::init_tracing();
    daemons::agent(Cli::parse().command).await
}
