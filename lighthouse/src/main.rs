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
    /// Enrollment tokens for CI nodes (needs [enroll] in the config).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Revoke a certificate: by its fingerprint (any certificate), or by the
    /// name of certificates this lighthouse issued. Nodes tear down their
    /// sessions with it within seconds and refuse it afterwards.
    Revoke {
        /// A certificate fingerprint (64 hex digits, from tern cert print) or
        /// an issued certificate's name.
        #[arg(value_name = "FINGERPRINT|NAME")]
        what: String,
    },
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

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; it is printed alone on stdout, and only its hash is kept.
    Create {
        /// Groups the enrolled node's certificate carries (the issuer must allow them).
        #[arg(long, value_delimiter = ',', value_name = "GROUP,...")]
        groups: Vec<String>,
        /// How long the token can be used, e.g. 1h.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many enrollments it allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Lifetime of each certificate it buys (capped by the issuer's maximum), e.g. 30m.
        #[arg(long, default_value = "30m")]
        cert_ttl: String,
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
        Some(Command::Revoke { what }) => io::revoke(cli.config.as_deref(), &what),
        Some(Command::Status { socket, json }) => io::status(cli.config.as_deref(), socket.as_deref(), json),
        Some(Command::Token(TokenCommand::Create {
            groups,
            ttl,
            uses,
            cert_ttl,
        })) => io::create_token(cli.config.as_deref(), &groups, &ttl, uses, &cert_ttl),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
