//! `ferry`: the Ferry command line (the user commands of `kubectl ferry`, plus `crds`).

use clap::{Parser, Subcommand};
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
    #[command(flatten)]
    User(UserCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { dir: None } => {
            ferry::cli::crds::print().map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::Crds { dir: Some(dir) } => {
            ferry::cli::crds::write_dir(&dir).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::User(command) => ferry::cli::run_user_command(&cli.global, command).await,
    }
}
