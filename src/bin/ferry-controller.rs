//! `ferry-controller`: schedules and supervises migrations.

use clap::Parser;
use ferry::cli::daemons::{self, ControllerArgs};

/// Ferry's controller: turns Migrations, HostMaintenances and policies into decisions.
#[derive(Parser)]
#[command(name = "ferry-controller", version, about)]
struct Cli {
    #[command(flatten)]
    args: ControllerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    daemons::init_tracing();
    daemons::controller(Cli::parse().args).await
}
