//! `ferry`: the Ferry command line (the user commands of `kubectl ferry`,
//! plus the programs and `crds`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry::cli::daemons::{self, AgentCommand, ApiServerArgs, ControllerArgs};
use ferry::cli::{GlobalArgs, UserCommand};

/// Ferry: declarative live migration of QEMU virtual machines between hosts.
#[derive(Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print Ferry's CustomResourceDefinitions as YAML (or write them to a directory).
    Crds {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Serve the embedded Kubernetes API server.
    Apiserver(ApiServerArgs),
    /// Run a whole cluster on this machine: API server, agents, QEMU VMs.
    Up(Box<ferry::cli::up::UpArgs>),
    /// The controller: schedules and supervises migrations.
    Controller(ControllerArgs),
    /// The node agent of one host.
    #[command(subcommand)]
    Agent(AgentCommand),
    #[command(flatten)]
    User(UserCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { dir: None } => ferry::cli::crds::print().map(|()| ExitCode::SUCCESS),
        Command::Crds { dir: Some(dir) } => {
            ferry::cli::crds::write_dir(&dir).map(|()| ExitCode::SUCCESS)
        }
        Command::Apiserver(args) => {
            daemons::init_tracing();
            daemons::apiserver(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Up(args) => {
            daemons::init_tracing();
            ferry::cli::up::up(*args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Controller(args) => {
            daemons::init_tracing();
            daemons::controller(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Agent(command) => {
            daemons::init_tracing();
            daemons::agent(command).await.map(|()| ExitCode::SUCCESS)
        }
        Command::User(command) => ferry::cli::run_user_command(&cli.global, command).await,
    }
}
