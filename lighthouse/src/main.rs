//! `tern-lighthouse`: introduces Tern nodes to each other.
//!
//! `tern-lighthouse --config lighthouse.toml` runs it in the foreground;
//! `tern-lighthouse status --config lighthouse.toml` asks a running one;
//! `tern-lighthouse token create|list|revoke` manage enrollment tokens in
//! the store named by the config (the daemon need not run);
//! `tern-lighthouse store migrate|copy` manage the store itself.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tern_lighthouse::cli::{
    flows, revoke, status, store_copy, store_migrate, token_create, token_list, token_revoke,
};
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
    /// How the lighthouse logs to stderr: text (for a person) or json (one
    /// object a line, for a log pipeline). Overrides `[log] format`.
    #[arg(long, value_name = "text|json")]
    log_format: Option<tern_shared::ops::LogFormat>,
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
    /// The enrollment store: migrate its schema, copy it into another.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Flow records nodes sent (who reached what, through which rule, how
    /// much), newest first, each with the claims or token its caller
    /// enrolled with; read from the store (the daemon need not run).
    Flows(FlowsArgs),
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

#[derive(clap::Args)]
struct FlowsArgs {
    /// The caller's certificate name (a CI job's node).
    #[arg(long)]
    name: Option<String>,
    /// The caller's certificate fingerprint, or its first 8 or more hex digits.
    #[arg(long)]
    fingerprint: Option<String>,
    /// An OIDC claim the caller enrolled with, e.g. repository=org/repo.
    #[arg(long, value_name = "CLAIM=VALUE")]
    claim: Option<String>,
    /// The destination: an address or subnet, with :PORT if you like.
    #[arg(long, value_name = "CIDR[:PORT]")]
    dest: Option<String>,
    /// Records that ended this recently, e.g. 1h, 7d.
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Refusals only.
    #[arg(long)]
    denied: bool,
    /// The node whose rules decided (it made the record).
    #[arg(long)]
    node: Option<String>,
    /// At most this many records (1-1000, default 100).
    #[arg(long)]
    limit: Option<usize>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Bring the configured store's schema up to this version (a lighthouse
    /// does it at start too); says from which version to which.
    Migrate,
    /// Copy a store's whole state (tokens, leases, issued certificates, OIDC
    /// replay marks, revocations) into another, empty, store: e.g. a single
    /// lighthouse's SQLite file into the PostgreSQL database several
    /// lighthouses will share. Stop the lighthouse using --from first. A
    /// PostgreSQL password comes from TERN_STORE_PASSWORD or --password-file.
    Copy {
        /// The store to read: sqlite:PATH or postgres://USER@HOST:PORT/DB?sslmode=verify-full|disable.
        #[arg(long, value_name = "URL")]
        from: String,
        /// The store to write, which must be empty (a new file or database).
        #[arg(long, value_name = "URL")]
        to: String,
        /// A file holding the PostgreSQL password (else TERN_STORE_PASSWORD).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token, checked against the issuer in [enroll]; the token is
    /// printed alone on stdout (only its hash is kept), its id on stderr.
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
        /// Lifetime of each certificate it buys (at most the issuer's maximum), e.g. 30m.
        #[arg(long, default_value = "30m")]
        cert_ttl: String,
    },
    /// List the tokens in the store: id, groups, uses left, expiry, creation
    /// (never the token, nor its hash beyond the id).
    List {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id (from token create or token list): no node
    /// can enroll with it afterwards.
    Revoke {
        /// The token's id, or at least its first 8 hex digits.
        #[arg(value_name = "ID")]
        id: String,
    },
}

fn run_flows(config: Option<&std::path::Path>, a: FlowsArgs) -> anyhow::Result<()> {
    let limit = a.limit.map(|l| l.to_string());
    let query = tern_lighthouse_core::flows::FlowQuery::from_params(
        a.name.as_deref(),
        a.fingerprint.as_deref(),
        a.claim.as_deref(),
        a.dest.as_deref(),
        a.since.as_deref(),
        Some(if a.denied { "true" } else { "false" }),
        a.node.as_deref(),
        limit.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("tern-lighthouse flows: {e}"))?;
    flows(config, &query, a.json)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => match cli.config {
            Some(config) => io::run(&config, cli.log_format),
            None => Err(anyhow::anyhow!(
                "no config given: run `tern-lighthouse --config lighthouse.toml` (see config/lighthouse.toml)"
            )),
        },
        Some(Command::Revoke { what }) => revoke(cli.config.as_deref(), &what),
        Some(Command::Store(StoreCommand::Migrate)) => store_migrate(cli.config.as_deref()),
        Some(Command::Store(StoreCommand::Copy {
            from,
            to,
            password_file,
        })) => store_copy(&from, &to, password_file.as_deref()),
        Some(Command::Flows(a)) => run_flows(cli.config.as_deref(), a),
        Some(Command::Status { socket, json }) => status(cli.config.as_deref(), socket.as_deref(), json),
        Some(Command::Token(TokenCommand::Create {
            groups,
            ttl,
            uses,
            cert_ttl,
        })) => token_create(cli.config.as_deref(), &groups, &ttl, uses, &cert_ttl),
        Some(Command::Token(TokenCommand::List { json })) => {
            token_list(cli.config.as_deref(), json)
        }
        Some(Command::Token(TokenCommand::Revoke { id })) => {
            token_revoke(cli.config.as_deref(), &id)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
