//! The lighthouse's command line besides running it: `status` (asks the
//! running lighthouse), `revoke` (writes the store; the lighthouse pushes
//! it), `token create|list|revoke` (the store; the daemon need not run).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use tern_shared::cert::format_unix_time;
use tern_shared::config::{EnrollConfig, LighthouseConfig};
use tern_shared::duration::format_duration;
use tern_udp::daemon::unix_now;

use crate::io::{load_config, open_store, runtime, DEFAULT_SOCKET};
use crate::ops;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub fn status(config: Option<&Path>, socket: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let path = match (socket, config) {
        (Some(s), _) => s.to_path_buf(),
        (None, Some(c)) => crate::io::api_socket_path(&load_config(c)?),
        (None, None) => PathBuf::from(DEFAULT_SOCKET),
    };
    // Refuse a socket another user could have put in place of the daemon's.
    tern_udp::api_socket::check_before_connect(&path)
        .with_context(|| format!("the lighthouse's API socket {}", path.display()))?;
    let reply = runtime()?.block_on(ask_status(&path)).with_context(|| {
        format!(
            "asking the lighthouse's API socket {} (is it running?)",
            path.display()
        )
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    println!(
        "lighthouse {} {}  (api {})",
        reply["name"].as_str().unwrap_or("-"),
        reply["overlay_ip"].as_str().unwrap_or("-"),
        path.display()
    );
    println!(
        "  {:<16} {:<15} {:<22} {:>10}  KIND",
        "NAME", "OVERLAY IP", "OBSERVED", "LAST SEEN"
    );
    for n in reply["nodes"].as_array().into_iter().flatten() {
        // A TCP link's own address means nothing outside this lighthouse.
        let observed = match n["observed"].as_str() {
            Some(o)
                if o.parse()
                    .is_ok_and(|a| tern_shared::transport::is_stream_endpoint(&a)) =>
            {
                "(over TCP)"
            }
            Some(o) => o,
            None => "-",
        };
        let kind = match n["issued_by"].as_str() {
            Some(issuer) => format!("ephemeral (issued by {issuer})"),
            None => "long-lived".to_string(),
        };
        println!(
            "  {:<16} {:<15} {:<22} {:>9}s  {kind}",
            n["name"].as_str().unwrap_or("-"),
            n["overlay_ip"].as_str().unwrap_or("-"),
            observed,
            n["last_seen_secs_ago"]
        );
    }
    if let Some(links) = reply["tcp_links"].as_u64().filter(|&n| n > 0) {
        println!("TCP links ([listen] tcp): {links}");
    }
    if let Some(revoked) = reply["revoked"].as_u64().filter(|&r| r > 0) {
        println!(
            "revoked certificates in force: {revoked} (list version {})",
            reply["revocations_version"].as_u64().unwrap_or(0)
        );
    }
    if reply["relay_enabled"].as_bool() == Some(true) {
        let r = &reply["relay"];
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        println!(
            "relay: {} introduced pairs; forwarded {} handshake initiations, {} responses, {} cookie replies, {} data messages ({} bytes)",
            reply["relay_introductions"].as_u64().unwrap_or(0),
            n("forwarded_handshake_initiation"),
            n("forwarded_handshake_response"),
            n("forwarded_cookie_reply"),
            n("forwarded_data"),
            n("forwarded_bytes"),
        );
        println!(
            "  refused: {} from unregistered addresses, {} to unregistered nodes, {} for pairs never introduced, {} malformed or not WireGuard, {} over budget",
            n("refused_unregistered_sender"),
            n("refused_unregistered_target"),
            n("refused_not_introduced"),
            n("refused_malformed"),
            n("refused_rate_limited"),
        );
    } else {
        println!("relay: off");
    }
    Ok(())
}

/// `tern-lighthouse revoke FINGERPRINT|NAME`: records the revocation in the
/// store; the running lighthouse reads it within a second and pushes it to
/// every registered node, which tears down its sessions with that
/// certificate.
pub fn revoke(config_path: Option<&Path>, what: &str) -> anyhow::Result<()> {
    let path = config_path.ok_or_else(|| {
        anyhow::anyhow!("give the lighthouse's config: tern-lighthouse revoke --config lighthouse.toml FINGERPRINT|NAME")
    })?;
    for r in ops::revoke(path, what, unix_now())? {
        let until = if r.not_after == u64::MAX {
            "for good".to_string()
        } else {
            format!(
                "until it expires at {}",
                tern_shared::cert::format_unix_time(r.not_after)
            )
        };
        let who = if r.name.is_empty() {
            String::new()
        } else {
            format!("{} ", r.name)
        };
        if r.new {
            println!("revoked {who}{} {until}", r.fingerprint);
        } else {
            println!("{who}{} was already revoked", r.fingerprint);
        }
    }
    println!("a running lighthouse pushes revocations to its nodes within a second");
    Ok(())
}

/// What the lighthouse running with `config` answers on its API socket
/// (`[api] socket`, or the default) within `timeout`: the socket and the
/// status `tern-lighthouse status --json` prints. An error when nothing
/// answers in time (the lighthouse may not run).
/// One status request on the API socket at `path`.
async fn ask_status(path: &Path) -> anyhow::Result<serde_json::Value> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    write.write_all(b"{\"cmd\":\"status\"}\n").await?;
    let line = BufReader::new(read)
        .lines()
        .next_line()
        .await?
        .context("the lighthouse closed the connection without answering")?;
    Ok(serde_json::from_str(&line)?)
}

pub fn running_status(
    config: &LighthouseConfig,
    timeout: Duration,
) -> anyhow::Result<(PathBuf, serde_json::Value)> {
    let path = crate::io::api_socket_path(config);
    tern_udp::api_socket::check_before_connect(&path)
        .with_context(|| format!("the lighthouse's API socket {}", path.display()))?;
    let reply = runtime()?.block_on(async {
        tokio::time::timeout(timeout, ask_status(&path))
            .await
            .with_context(|| format!("no answer on {} within {timeout:?}", path.display()))?
    })?;
    Ok((path, reply))
}

/// How long `token create` waits for a running lighthouse's status.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// `tern-lighthouse token create`: checks the token against the issuer
/// before anything is stored (a token the issuer would refuse is refused
/// now, not at enrollment), stores its hash, prints the token alone on
/// stdout and its id on stderr, and warns when the running lighthouse does
/// not enroll.
pub fn token_create(
    config_path: Option<&Path>,
    groups: &[String],
    ttl: &str,
    uses: u32,
    cert_ttl: &str,
) -> anyhow::Result<()> {
    let (path, config, _) = enroll_config(config_path, "create --groups ci")?;
    let t = ops::create_token(&path, groups, ttl, uses, cert_ttl, unix_now())?;
    println!("{}", t.token);
    eprintln!(
        "token id {}, groups {}, {uses} use{}, expires {}, certificates for {}",
        t.id,
        groups_text(groups),
        if uses == 1 { "" } else { "s" },
        format_unix_time(t.expires),
        format_duration(Duration::from_secs(t.cert_ttl_secs)),
    );
    // A lighthouse started before [enroll] was added answers enrollment
    // with nothing: say so now rather than let the job time out. Nothing
    // answering says nothing (the lighthouse may not run yet).
    if let Ok((socket, status)) = running_status(&config, STATUS_WAIT) {
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
pub fn token_list(config_path: Option<&Path>, json: bool) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let (path, config, _) = enroll_config(config_path, "list")?;
    let tokens = ops::list_tokens(&path, unix_now())?;
    let mut out = String::new();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&tokens)?)?;
    } else if tokens.is_empty() {
        writeln!(
            out,
            "no tokens in {} (tern-lighthouse token create makes one)",
            crate::io::store_location(&config, &path)?
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
                t.expires,
                t.created,
                format_duration(Duration::from_secs(t.cert_ttl_secs)),
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
pub fn token_revoke(config_path: Option<&Path>, id: &str) -> anyhow::Result<()> {
    let (path, _, _) = enroll_config(config_path, "revoke ID")?;
    let id = ops::delete_token(&path, id)?;
    println!(
        "revoked token {id}: no node can enroll with it any more (certificates it bought stay valid until they expire; tern-lighthouse revoke NAME ends them)"
    );
    Ok(())
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
    let (config, enroll) = ops::enroll_config(path)?;
    Ok((path.to_path_buf(), config, enroll))
}

fn groups_text(groups: &[String]) -> String {
    if groups.is_empty() {
        "(none)".to_string()
    } else {
        groups.join(",")
    }
}

fn token_state(t: &ops::ListedToken) -> &'static str {
    match (t.expired, t.used_up) {
        (true, true) => "expired, used up",
        (true, false) => "expired",
        (false, true) => "used up",
        (false, false) => "valid",
    }
}

/// `tern-lighthouse store migrate`: brings the configured store's schema up
/// to this version (a lighthouse does it at start too) and says what it did.
pub fn store_migrate(config_path: Option<&Path>) -> anyhow::Result<()> {
    let path = config_path.ok_or_else(|| {
        anyhow::anyhow!(
            "give the lighthouse's config: tern-lighthouse store migrate --config lighthouse.toml"
        )
    })?;
    let config = load_config(path)?;
    let location = crate::io::store_location(&config, path)?;
    let store = open_store(&config, path)?;
    match store.migrated() {
        Some((from, to)) if from == to => {
            println!("store {location}: schema version {to}, up to date")
        }
        Some((from, to)) => {
            println!("store {location}: schema migrated from version {from} to {to}")
        }
        None => println!("store {location}: connected"),
    }
    Ok(())
}

/// `tern-lighthouse store copy --from URL --to URL`: a store's whole state
/// into another, empty, store (a single lighthouse's SQLite file into the
/// PostgreSQL database several lighthouses will share). Stop the
/// lighthouses that use the source first, so nothing changes meanwhile.
pub fn store_copy(from: &str, to: &str, password_file: Option<&Path>) -> anyhow::Result<()> {
    use tern_shared::store::{parse_store_url, StoreLocation};
    let here = std::env::current_dir().context("the current directory")?;
    let from = parse_store_url(from, &here).map_err(|e| anyhow::anyhow!("--from {from}: {e}"))?;
    let to = parse_store_url(to, &here).map_err(|e| anyhow::anyhow!("--to {to}: {e}"))?;
    if from == to {
        anyhow::bail!("--from and --to name the same store ({from})");
    }
    if let StoreLocation::Sqlite(path) = &from {
        if !path.exists() {
            anyhow::bail!(
                "--from {from}: no such file (a lighthouse's SQLite store is [store] url, or [enroll] store in older configs)"
            );
        }
    }
    let mut source = crate::store::open(&from, password_file).context("--from")?;
    let mut target = crate::store::open(&to, password_file).context("--to")?;
    let dump = source.dump().with_context(|| format!("reading {from}"))?;
    target
        .load(&dump)
        .with_context(|| format!("writing {to}"))?;
    println!("copied {} from {from} to {to}", dump.summary());
    Ok(())
}

/// `tern-lighthouse flows`: the flow records the store holds, newest first.
pub fn flows(
    config_path: Option<&Path>,
    query: &tern_lighthouse_core::flows::FlowQuery,
    json: bool,
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let path = config_path.ok_or_else(|| {
        anyhow::anyhow!(
            "give the lighthouse's config: tern-lighthouse flows --config lighthouse.toml"
        )
    })?;
    let (found, sources) = ops::flows(path, query)?;
    let mut out = String::new();
    if json {
        for f in &found {
            writeln!(out, "{}", serde_json::to_string(f)?)?;
        }
    } else if found.is_empty() {
        writeln!(out, "no flow records match")?;
    } else {
        writeln!(
            out,
            "{:<24}  {:<12}  {:<16}  {:<26}  {:<15}  {:<7}  {:>16}  {:>16}  ENROLLED",
            "END",
            "NODE",
            "CALLER",
            "TO",
            "VERDICT",
            "REASON",
            "IN (BYTES/PKTS)",
            "OUT (BYTES/PKTS)"
        )?;
        for f in &found {
            writeln!(
                out,
                "{:<24}  {:<12}  {:<16}  {:<26}  {:<15}  {:<7}  {:>16}  {:>16}  {}",
                f.end,
                f.node,
                f.caller,
                flow_destination(f),
                match f.rule {
                    Some(r) => format!("{} rule-{r}", f.verdict),
                    None if f.verdict == "deny" => "deny default".to_string(),
                    None => f.verdict.clone(),
                },
                f.reason.as_str(),
                format!("{}/{}", f.bytes_in, f.packets_in),
                format!("{}/{}", f.bytes_out, f.packets_out),
                crate::store::enrollment_summary(f.enrollment.as_ref()),
            )?;
        }
    }
    if !json {
        for s in sources.iter().filter(|s| s.dropped > 0) {
            writeln!(
                out,
                "note: node {} dropped {} flow records (its queue was full) since it started",
                s.node, s.dropped
            )?;
        }
    }
    match std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// `198.19.0.10:5432/tcp`, `198.19.0.10:20-25/tcp` (refusals), `198.19.0.10/icmp`.
fn flow_destination(f: &tern_shared::flows::FlowView) -> String {
    let dst = if f.dst.is_unspecified() {
        "many".to_string()
    } else {
        f.dst.to_string()
    };
    match (f.proto.as_str(), f.dst_port_last) {
        ("tcp" | "udp", Some(last)) => format!("{dst}:{}-{last}/{}", f.dst_port, f.proto),
        ("tcp" | "udp", None) => format!("{dst}:{}/{}", f.dst_port, f.proto),
        _ => format!("{dst}/{}", f.proto),
    }
}
