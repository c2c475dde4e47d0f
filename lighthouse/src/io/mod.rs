//! The lighthouse's tokio shell: one UDP socket, the clock, the local API,
//! around the sans-IO [`LighthouseCore`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tern_mesh::{Mesh, MeshSettings};
use tern_shared::config::LighthouseConfig;
use tern_shared::identity::Identity;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::store::SqliteStore;
use tern_lighthouse_core::lighthouse::LighthouseCore;
use tern_lighthouse_core::registry::Registry;
use tern_lighthouse_core::relay::RelayTable;
use tern_shared::enroll::{TYPE_ENROLL_HELLO, TYPE_ENROLL_REQUEST};

mod enrollment;

const DEFAULT_SOCKET: &str = "/run/tern/lighthouse.sock";
/// A relay introduction unused this long is forgotten (nodes keep a relayed
/// session alive with keepalives far more often).
const RELAY_IDLE_EXPIRY: std::time::Duration = std::time::Duration::from_secs(300);

/// Receives per wake-up before the loop looks at its timers and API again.
const READS_PER_WAKEUP: usize = 16;

/// Most nodes one lighthouse keeps in its registry.
const MAX_NODES: usize = 100_000;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn load_config(path: &Path) -> anyhow::Result<LighthouseConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    Ok(LighthouseConfig::parse(&text, path)?)
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour for a person at a terminal only: a log file or the journal
    // would keep the escape codes as text.
    let ansi = tern_shared::show::colour_logs(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_filter_reloading();
    let handle = builder.reload_handle();
    if builder.try_init().is_ok() {
        let _ = LOG_LEVEL.set(Box::new(move |level: &str| {
            let filter = tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| format!("[log] level {level:?}: {e}"))?;
            handle.reload(filter).map_err(|e| e.to_string())
        }));
    }
}

/// Sets the log level while running (SIGHUP), once logging is set up.
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
static LOG_LEVEL: std::sync::OnceLock<SetLevel> = std::sync::OnceLock::new();

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    init_logging(&config.log.level);
    let store = store_path(&config, config_path);
    runtime()?.block_on(serve(config, config_path, store))
}

/// Where the lighthouse's lasting state lives: `[enroll] store`, or
/// "lighthouse.db" beside the config when there is no `[enroll]` (a
/// lighthouse that enrolls no one can still revoke certificates).
fn store_path(config: &LighthouseConfig, config_path: &Path) -> PathBuf {
    match &config.enroll {
        Some(e) => e.store.clone(),
        None => config_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("lighthouse.db"),
    }
}

/// The revocation list in the shell: read from the store when it changed
/// (`tern-lighthouse revoke` writes it from another process) and handed to
/// the core, which pushes what is new to the nodes.
struct RevocationFeed {
    path: PathBuf,
    store: Option<SqliteStore>,
    seen: Option<i64>,
    last_full_read: Option<Instant>,
}

impl RevocationFeed {
    fn new(path: PathBuf, must_exist: bool) -> anyhow::Result<RevocationFeed> {
        let mut feed = RevocationFeed {
            path,
            store: None,
            seen: None,
            last_full_read: None,
        };
        if must_exist || feed.path.exists() {
            feed.store = Some(SqliteStore::open(&feed.path).with_context(|| {
                format!("opening the lighthouse store {}", feed.path.display())
            })?);
        }
        Ok(feed)
    }

    fn poll(&mut self, core: &mut LighthouseCore, now: Instant) {
        if self.store.is_none() {
            if !self.path.exists() {
                return;
            }
            match SqliteStore::open(&self.path) {
                Ok(s) => self.store = Some(s),
                Err(e) => {
                    tracing::warn!(store = %self.path.display(), error = %e, "cannot open the store for revocations");
                    return;
                }
            }
        }
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let changed = match store.data_version() {
            Ok(v) => self.seen.replace(v) != Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "reading the store's revocations");
                return;
            }
        };
        // Also once a minute, so expired entries leave the list.
        let stale = self
            .last_full_read
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(60));
        if !changed && !stale {
            return;
        }
        self.last_full_read = Some(now);
        match tern_lighthouse_core::enroll::EnrollStore::revocations(store, unix_now()) {
            Ok(list) => core.set_revocations(list, now),
            Err(e) => tracing::warn!(error = %e, "reading the store's revocations"),
        }
    }
}

async fn serve(
    mut config: LighthouseConfig,
    config_path: &Path,
    store_path: PathBuf,
) -> anyhow::Result<()> {
    let read = |p: &Path, what: &str| {
        std::fs::read_to_string(p).with_context(|| format!("reading {what} {}", p.display()))
    };
    let identity = Identity::from_pem(
        &read(&config.pki.ca, "CA file [pki] ca =")?,
        &read(&config.pki.cert, "certificate [pki] cert =")?,
        &read(&config.pki.key, "key [pki] key =")?,
        unix_now(),
    )
    .context("checking the lighthouse's identity")?;
    let cert = identity.cert.clone();
    if !cert.has_group(tern_shared::cert::LIGHTHOUSE_GROUP) {
        tracing::warn!(
            "this certificate lacks the '{}' group: nodes will not use this lighthouse; sign it with --groups {}",
            tern_shared::cert::LIGHTHOUSE_GROUP,
            tern_shared::cert::LIGHTHOUSE_GROUP
        );
    }
    let socket = tern_udp::bind(config.listen.addr)
        .with_context(|| format!("binding UDP {} ([listen] addr)", config.listen.addr))?;
    let socket = tern_udp::Outer::new(socket)
        .context("setting up the UDP socket's batching and offloads")?;
    tracing::info!(name = cert.name(), overlay_ip = %cert.overlay_ip(), listen = %socket.local_addr()?, "lighthouse up");

    let now = Instant::now();
    let settings = MeshSettings {
        // Nodes keep their sessions alive by registering; no keepalives needed.
        keepalive: None,
        idle_timeout: config.registry.expiry * 4,
        seed: seed(),
        max_peers: MAX_NODES,
        ..MeshSettings::default()
    };
    let mesh = Mesh::new(
        identity.key.static_secret(),
        &cert,
        identity.ca.clone(),
        settings,
        now,
        unix_now(),
    );
    let mut core = LighthouseCore::new(
        mesh,
        &cert,
        Registry::new(config.registry.expiry, MAX_NODES),
        now,
    );
    if config.relay.enabled {
        core.enable_relay(RelayTable::new(
            MAX_NODES * 4,
            RELAY_IDLE_EXPIRY,
            config.relay.packets_per_sec,
        ));
        tracing::info!(
            packets_per_sec = config.relay.packets_per_sec,
            "relaying for registered nodes that find no direct path"
        );
    }

    // Enrollment runs on a thread of its own: its store writes wait on the
    // disk, and registrations and relaying must not wait with them.
    let (answers_tx, mut answers_rx) = mpsc::unbounded_channel::<(SocketAddr, Vec<u8>)>();
    let mut enrollment = match &config.enroll {
        Some(e) => Some(enrollment::start(
            e,
            &identity.key,
            &cert,
            answers_tx.clone(),
        )?),
        None => None,
    };
    let mut not_enrolling = enrollment::DisabledEnrollment::new(Instant::now());
    let mut revocations = RevocationFeed::new(store_path, enrollment.is_some())?;
    revocations.poll(&mut core, Instant::now());
    let mut revocation_tick = tokio::time::interval(Duration::from_millis(500));
    revocation_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (api_tx, mut api_rx) = mpsc::channel::<oneshot::Sender<serde_json::Value>>(16);
    let socket_path = config
        .api
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let _api = serve_api(&socket_path, config.api.group.as_deref(), api_tx)?;

    let mut sighup = signal(SignalKind::hangup())?;
    let reload = Reload {
        path: config_path,
        identity: &identity,
        answers: &answers_tx,
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut received = tern_udp::RecvBatch::default();
    let mut sends = tern_udp::SendBatch::default();
    let mut next_timer = tokio::time::Instant::now();
    loop {
        tokio::select! {
            ready = socket.readable() => match ready {
                Ok(()) => {
                    // What the socket has, bounded, then everything it
                    // produced (relayed datagrams go out in GSO runs).
                    for _ in 0..READS_PER_WAKEUP {
                        match received.recv(&socket) {
                            Ok(_) => {
                                let now = Instant::now();
                                for (from, datagram) in received.datagrams() {
                                    let answer = dispatch(&mut core, enrollment.as_mut(), &mut not_enrolling, from, datagram, now);
                                    if let Some(answer) = answer {
                                        sends.push(&socket, from, &answer).await;
                                    }
                                }
                                while let Some(t) = core.poll_transmit() {
                                    sends.push(&socket, t.dst, &t.payload).await;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                tracing::debug!(error = %e, "UDP receive failed");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "UDP socket error"),
            },
            _ = tokio::time::sleep_until(next_timer) => {
                let now = Instant::now();
                core.handle_timeout(now);
                next_timer = tokio::time::Instant::from_std(core.poll_timeout(now));
            }
            _ = revocation_tick.tick() => {
                revocations.poll(&mut core, Instant::now());
            }
            Some((to, answer)) = answers_rx.recv() => {
                sends.push(&socket, to, &answer).await;
            }
            Some(reply) = api_rx.recv() => {
                let _ = reply.send(status_json(&core, enrollment.as_ref()));
            }
            _ = sighup.recv() => reload.apply(&mut config, &mut core, &mut enrollment),
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
        }
        while let Some(t) = core.poll_transmit() {
            sends.push(&socket, t.dst, &t.payload).await;
        }
        sends.flush(&socket).await;
    }
    Ok(())
}

/// One datagram: enrollment's (answered here, or handed to its thread) or
/// the core's. An answer to send back at once, if any.
fn dispatch(
    core: &mut LighthouseCore,
    enrollment: Option<&mut enrollment::EnrollmentHandle>,
    not_enrolling: &mut enrollment::DisabledEnrollment,
    from: SocketAddr,
    datagram: &[u8],
    now: Instant,
) -> Option<Vec<u8>> {
    let enrolling = matches!(
        datagram.first(),
        Some(&TYPE_ENROLL_HELLO | &TYPE_ENROLL_REQUEST)
    );
    match enrollment {
        _ if !enrolling => {
            core.handle_datagram(from, datagram, now);
            None
        }
        Some(e) => e.handle(from, datagram, now),
        None => not_enrolling.handle(from, datagram, now),
    }
}

/// What `tern-lighthouse status` shows: the core's status, this process's
/// pid, and enrollment's counters when it runs.
fn status_json(
    core: &LighthouseCore,
    enrollment: Option<&enrollment::EnrollmentHandle>,
) -> serde_json::Value {
    let mut status = serde_json::to_value(core.status(Instant::now())).unwrap_or_default();
    if let Some(fields) = status.as_object_mut() {
        fields.insert("pid".into(), std::process::id().into());
        if let Some(e) = enrollment {
            fields.insert(
                "enrollment".into(),
                serde_json::to_value(e.counters()).unwrap_or_default(),
            );
        }
    }
    status
}

/// SIGHUP: what a running lighthouse takes from its config file again.
/// A file that does not parse, or an `[enroll]` that does not start,
/// changes nothing; every change is logged, and what only a restart can
/// change is named.
struct Reload<'a> {
    path: &'a Path,
    identity: &'a Identity,
    answers: &'a mpsc::UnboundedSender<(SocketAddr, Vec<u8>)>,
}

impl Reload<'_> {
    fn apply(
        &self,
        running: &mut LighthouseConfig,
        core: &mut LighthouseCore,
        enrollment: &mut Option<enrollment::EnrollmentHandle>,
    ) {
        tracing::info!(config = %self.path.display(), "SIGHUP: reading the config again");
        let new = match load_config(self.path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "config not reloaded; the running one stays");
                return;
            }
        };
        let mut changed = Vec::new();
        if new.enroll != running.enroll {
            // The store holds tokens and leases for whichever config: a
            // new path would split them, so it needs a restart.
            let store_moved =
                matches!((&new.enroll, &running.enroll), (Some(a), Some(b)) if a.store != b.store);
            if store_moved {
                tracing::warn!("[enroll] store changed: it takes effect at the next restart; the rest of [enroll] is reloaded");
            }
            let mut wanted = new.enroll.clone();
            if let (true, Some(w), Some(r)) = (store_moved, wanted.as_mut(), &running.enroll) {
                w.store = r.store.clone();
            }
            match &wanted {
                Some(e) => match enrollment::start(
                    e,
                    &self.identity.key,
                    &self.identity.cert,
                    self.answers.clone(),
                ) {
                    Ok(handle) => {
                        *enrollment = Some(handle);
                        running.enroll = wanted.clone();
                        changed.push("[enroll]");
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "[enroll] not reloaded; enrollment goes on as before")
                    }
                },
                None => {
                    *enrollment = None;
                    running.enroll = None;
                    changed.push("[enroll] (enrollment off)");
                }
            }
        }
        if new.relay != running.relay {
            core.reconfigure_relay(new.relay.enabled, new.relay.packets_per_sec, || {
                RelayTable::new(MAX_NODES * 4, RELAY_IDLE_EXPIRY, new.relay.packets_per_sec)
            });
            running.relay = new.relay.clone();
            changed.push("[relay]");
        }
        if new.log != running.log {
            // RUST_LOG, when set, is the operator's word over the file's.
            let set = LOG_LEVEL
                .get()
                .filter(|_| std::env::var_os("RUST_LOG").is_none());
            match set.map(|set| set(&new.log.level)) {
                Some(Ok(())) => {
                    running.log = new.log.clone();
                    changed.push("[log] level");
                }
                Some(Err(e)) => tracing::error!(error = %e, "[log] not reloaded"),
                None => tracing::warn!("[log] changed, but RUST_LOG sets the level; unchanged"),
            }
        }
        for (what, differs) in [
            ("[pki]", new.pki != running.pki),
            ("[listen]", new.listen != running.listen),
            ("[api]", new.api != running.api),
            ("[registry]", new.registry != running.registry),
        ] {
            if differs {
                tracing::warn!(
                    section = what,
                    "changed in the file; takes effect at the next restart"
                );
            }
        }
        if changed.is_empty() {
            tracing::info!("config reloaded: nothing that can change while running has changed");
        } else {
            tracing::info!(changed = %changed.join(", "), "config reloaded");
        }
    }
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 32)
}

/// Serves `{"cmd":"status"}` lines on the Unix socket until dropped.
struct ApiGuard {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiGuard {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_api(
    path: &Path,
    group: Option<&str>,
    calls: mpsc::Sender<oneshot::Sender<serde_json::Value>>,
) -> anyhow::Result<ApiGuard> {
    let listener = tern_udp::api_socket::bind(path, group)?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let calls = calls.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply = if line.contains("\"status\"") {
                        let (tx, rx) = oneshot::channel();
                        calls.send(tx).await.ok();
                        rx.await.unwrap_or_default()
                    } else {
                        serde_json::json!({"error": "unknown request; send {\"cmd\":\"status\"}"})
                    };
                    let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
                    bytes.push(b'\n');
                    if write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(ApiGuard {
        path: path.to_path_buf(),
        task,
    })
}

pub fn status(config: Option<&Path>, socket: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let path = match (socket, config) {
        (Some(s), _) => s.to_path_buf(),
        (None, Some(c)) => load_config(c)?
            .api
            .socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
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
        let kind = match n["issued_by"].as_str() {
            Some(issuer) => format!("ephemeral (issued by {issuer})"),
            None => "long-lived".to_string(),
        };
        println!(
            "  {:<16} {:<15} {:<22} {:>9}s  {kind}",
            n["name"].as_str().unwrap_or("-"),
            n["overlay_ip"].as_str().unwrap_or("-"),
            n["observed"].as_str().unwrap_or("-"),
            n["last_seen_secs_ago"]
        );
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
    use tern_lighthouse_core::enroll::EnrollStore;
    let path = config_path.ok_or_else(|| {
        anyhow::anyhow!("give the lighthouse's config: tern-lighthouse revoke --config lighthouse.toml FINGERPRINT|NAME")
    })?;
    let config = load_config(path)?;
    let store_file = store_path(&config, path);
    let mut store = SqliteStore::open(&store_file)
        .with_context(|| format!("opening the lighthouse store {}", store_file.display()))?;
    let now = unix_now();
    let targets: Vec<(tern_shared::cert::Fingerprint, String, u64)> =
        match what.parse::<tern_shared::cert::Fingerprint>() {
            Ok(fp) => {
                // Not issued here (a long-lived certificate signed by the
                // root): its expiry is unknown, so it is kept for good.
                let (name, not_after) = store.issued(&fp)?.unwrap_or((String::new(), u64::MAX));
                vec![(fp, name, not_after)]
            }
            Err(_) => {
                let found = store.issued_named(what, now)?;
                if found.is_empty() {
                    anyhow::bail!(
                        "no unexpired certificate named {what:?} was issued by this lighthouse; \
                         revoke it by its fingerprint (64 hex digits; `tern cert print` shows it)"
                    );
                }
                found
                    .into_iter()
                    .map(|(fp, not_after)| (fp, what.to_string(), not_after))
                    .collect()
            }
        };
    for (fp, name, not_after) in targets {
        let new = store.revoke(&fp, &name, not_after, now)?;
        let until = if not_after == u64::MAX {
            "for good".to_string()
        } else {
            format!(
                "until it expires at {}",
                tern_shared::cert::format_unix_time(not_after)
            )
        };
        let who = if name.is_empty() {
            String::new()
        } else {
            format!("{name} ")
        };
        if new {
            println!("revoked {who}{fp} {until}");
        } else {
            println!("{who}{fp} was already revoked");
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
    let path = config
        .api
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    tern_udp::api_socket::check_before_connect(&path)
        .with_context(|| format!("the lighthouse's API socket {}", path.display()))?;
    let reply = runtime()?.block_on(async {
        tokio::time::timeout(timeout, ask_status(&path))
            .await
            .with_context(|| format!("no answer on {} within {timeout:?}", path.display()))?
    })?;
    Ok((path, reply))
}
