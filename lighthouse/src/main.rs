//! `tern-lighthouse`: introduces Tern nodes to each other.
//!
//! `tern-lighthouse --config lighthouse.toml` runs it in the foreground;
//! `tern-lighthouse status --config lighthouse.toml` asks a running one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tern_lighthouse::io;

#[derive(Parser)]
#[command(
    name = "tern-lighthouse",
    version,
    about = "Tern lighthouse: registry of live nodes"
)]
struct Cli {
    /// The lighthouse's config file (see config/lighthouse.toml).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Show the running lighthouse's registered nodes.
    Status {
        /// The API socket, instead of the one in --config.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => match cli.config {
            Some(config) => io::run(&config),
            None => Err(anyhow::anyhow!(
                "no config given: run `tern-lighthouse --config lighthouse.toml` (see config/lighthouse.toml)"
            )),
        },
        Some(Command::Status { socket, json }) => io::status(cli.config.as_deref(), socket.as_deref(), json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
