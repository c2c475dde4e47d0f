//! `tern-lighthouse`: introduces Tern nodes to each other.
//!
//! `tern-lighthouse --config lighthouse.toml` runs it in the foreground;
//! `tern-lighthouse status --config lighthouse.toml` asks a running one;
//! `tern-lighthouse token create|list|revoke` manage enrollment tokens in
//! the store named by the config (the daemon need not run).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};

use tern_lighthouse::io;
use tern_lighthouse::store::SqliteStore;
use tern_lighthouse_core::enroll::{self, EnrollStore, NewToken, TokenIdPrefix, TokenInfo};
use tern_shared::cert::{format_unix_time, Cert};
use tern_shared::config::{EnrollConfig, LighthouseConfig};
use tern_shared::duration::{format_duration, parse_duration};

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

/// How long `token create` waits for a running lighthouse's status.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// `tern-lighthouse token create`: checks the token against the issuer
/// before anything is stored (a token the issuer would refuse is refused
/// now, not at enrollment), stores its hash, prints the token alone on
/// stdout and its id on stderr, and warns when the running lighthouse does
/// not enroll.
fn token_create(
    config_path: Option<&Path>,
    groups: &[String],
    ttl: &str,
    uses: u32,
    cert_ttl: &str,
) -> anyhow::Result<()> {
    let (path, config, enroll) = enroll_config(config_path, "create --groups ci")?;
    let ttl = parse_duration(ttl).map_err(|e| anyhow::anyhow!("--ttl {ttl:?}: {e}"))?;
    let cert_ttl =
        parse_duration(cert_ttl).map_err(|e| anyhow::anyhow!("--cert-ttl {cert_ttl:?}: {e}"))?;
    if ttl.as_secs() == 0 {
        anyhow::bail!("--ttl under a second would make a token nobody can use; give e.g. 1h");
    }
    if cert_ttl.as_secs() == 0 {
        anyhow::bail!(
            "--cert-ttl under a second would buy certificates that are never valid; give e.g. 30m"
        );
    }
    if uses == 0 {
        anyhow::bail!("--uses 0 would make a token nobody can use; give 1 or more");
    }
    for g in groups {
        let ok = !g.is_empty()
            && g.len() <= 64
            && g.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            anyhow::bail!("--groups: {g:?} is not a group name (1-64 of A-Z a-z 0-9 . _ -)");
        }
    }
    let issuer_file = &enroll.issuer_cert;
    let issuer = std::fs::read_to_string(issuer_file)
        .map_err(anyhow::Error::from)
        .and_then(|pem| Ok(Cert::from_pem(&pem)?))
        .with_context(|| format!("reading [enroll] issuer_cert {}", issuer_file.display()))?;
    let now = unix_now();
    enroll::check_token_against_issuer(&issuer, groups, cert_ttl.as_secs(), now).map_err(
        |why| {
            anyhow::anyhow!(
                "{why} ([enroll] issuer_cert {}); no token was created",
                issuer_file.display()
            )
        },
    )?;
    let mut store = open_store(&enroll)?;
    let token = enroll::new_token();
    let hash = tern_shared::enroll::token_hash(&token);
    let expires = now.saturating_add(ttl.as_secs());
    store.create_token(
        &NewToken {
            hash: hash.clone(),
            groups: groups.to_vec(),
            uses,
            expires,
            cert_ttl: cert_ttl.as_secs(),
        },
        now,
    )?;
    println!("{token}");
    eprintln!(
        "token id {}, groups {}, {uses} use{}, expires {}, certificates for {}",
        enroll::token_id(&hash),
        groups_text(groups),
        if uses == 1 { "" } else { "s" },
        format_unix_time(expires),
        format_duration(Duration::from_secs(cert_ttl.as_secs())),
    );
    // A lighthouse started before [enroll] was added answers enrollment
    // with nothing: say so now rather than let the job time out. Nothing
    // answering says nothing (the lighthouse may not run yet).
    if let Ok((socket, status)) = io::running_status(&config, STATUS_WAIT) {
        if status.get("relay_enabled").is_some() && status.get("enrollment").is_none() {
            eprintln!(
                "warning: the lighthouse running on {} was started without [enroll]: it cannot enroll anyone with this token until it reloads {} (send it SIGHUP, or restart it)",
                socket.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// `tern-lighthouse token list [--json]`.
fn token_list(config_path: Option<&Path>, json: bool) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let (_, _, enroll) = enroll_config(config_path, "list")?;
    let tokens = open_store(&enroll)?.list_tokens(unix_now())?;
    let mut out = String::new();
    if json {
        let list: Vec<serde_json::Value> = tokens
            .iter()
            .map(|t| {
                serde_json::json!({
                    "id": t.id,
                    "groups": t.groups,
                    "uses_left": t.uses_left,
                    "expires": format_unix_time(t.expires),
                    "created": format_unix_time(t.created),
                    "cert_ttl_secs": t.cert_ttl,
                    "expired": t.expired,
                    "used_up": t.uses_left == 0,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
    } else if tokens.is_empty() {
        writeln!(
            out,
            "no tokens in {} (tern-lighthouse token create makes one)",
            enroll.store.display()
        )?;
    } else {
        writeln!(
            out,
            "{:<12}  {:<20}  {:>9}  {:<20}  {:<20}  {:>8}  STATE",
            "ID", "GROUPS", "USES LEFT", "EXPIRES", "CREATED", "CERT TTL"
        )?;
        for t in &tokens {
            writeln!(
                out,
                "{:<12}  {:<20}  {:>9}  {:<20}  {:<20}  {:>8}  {}",
                t.id,
                groups_text(&t.groups),
                t.uses_left,
                format_unix_time(t.expires),
                format_unix_time(t.created),
                format_duration(Duration::from_secs(t.cert_ttl)),
                token_state(t)
            )?;
        }
    }
    // A reader that stops early (`| head`) is no error.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// `tern-lighthouse token revoke ID`: the token is deleted from the store,
/// which the lighthouse reads at every enrollment, so it takes effect at
/// once.
fn token_revoke(config_path: Option<&Path>, id: &str) -> anyhow::Result<()> {
    let (_, _, enroll) = enroll_config(config_path, "revoke ID")?;
    let prefix = TokenIdPrefix::parse(id)?;
    match open_store(&enroll)?.revoke_token(&prefix)? {
        Ok(id) => {
            println!(
                "revoked token {id}: no node can enroll with it any more (certificates it bought stay valid until they expire; tern-lighthouse revoke NAME ends them)"
            );
            Ok(())
        }
        Err(refusal) => Err(anyhow::anyhow!("{refusal}; nothing was revoked")),
    }
}

/// The config's path, the config and its `[enroll]`, or why not: tokens
/// live in the enrollment store, and only a lighthouse with `[enroll]`
/// takes them.
fn enroll_config(
    config_path: Option<&Path>,
    usage: &str,
) -> anyhow::Result<(PathBuf, LighthouseConfig, EnrollConfig)> {
    let path = config_path.ok_or_else(|| {
        anyhow::anyhow!(
            "give the lighthouse's config: tern-lighthouse token {usage} --config lighthouse.toml"
        )
    })?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let config = LighthouseConfig::parse(&text, path)?;
    let enroll = config.enroll.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "{} has no [enroll] section, so this lighthouse enrolls no one and takes no tokens: \
             add [enroll] with issuer_cert and issuer_key (see config/lighthouse.toml; \
             tern cert sign --issuer makes them), then restart the lighthouse or send it SIGHUP",
            path.display()
        )
    })?;
    Ok((path.to_path_buf(), config, enroll))
}

fn open_store(enroll: &EnrollConfig) -> anyhow::Result<SqliteStore> {
    SqliteStore::open(&enroll.store)
        .with_context(|| format!("opening the enrollment store {}", enroll.store.display()))
}

fn groups_text(groups: &[String]) -> String {
    if groups.is_empty() {
        "(none)".to_string()
    } else {
        groups.join(",")
    }
}

fn token_state(t: &TokenInfo) -> &'static str {
    match (t.expired, t.uses_left == 0) {
        (true, true) => "expired, used up",
        (true, false) => "expired",
        (false, true) => "used up",
        (false, false) => "valid",
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
