use clap::{Parser, Subcommand};

/// Ferry: declarative live migration of QEMU virtual machines between hosts.
#[derive(Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { dir: None } => ferry::cli::crds::print(),
        Command::Crds { dir: Some(dir) } => ferry::cli::crds::write_dir(&dir),
    }
}
