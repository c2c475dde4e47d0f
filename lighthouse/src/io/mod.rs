//! The lighthouse's tokio shell: one UDP socket, the clock, the local API,
//! around the sans-IO [`LighthouseCore`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tern_mesh::{Mesh, MeshSettings};
use tern_shared::config::LighthouseConfig;
use tern_shared::identity::Identity;
use tern_shared::ops::LogFormat;
use tern_udp::daemon::{
    init_logging, load_identity, seed, set_log_level, unix_now, READS_PER_WAKEUP,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::store::AnyStore;
use tern_lighthouse_core::lighthouse::{LighthouseCore, RenewAsk};
use tern_lighthouse_core::registry::Registry;
use tern_lighthouse_core::relay::RelayTable;
use tern_shared::enroll::{TYPE_ENROLL_HELLO, TYPE_ENROLL_REQUEST};
use tern_shared::store::StoreLocation;

mod admin;
mod console;
mod enrollment;
mod flows;
mod links;
mod metrics;

pub(crate) const DEFAULT_SOCKET: &str = "/run/tern/lighthouse.sock";
/// A relay introduction unused this long is forgotten (nodes keep a relayed
/// session alive with keepalives far more often).
const RELAY_IDLE_EXPIRY: std::time::Duration = std::time::Duration::from_secs(300);

/// Most nodes one lighthouse keeps in its registry.
const MAX_NODES: usize = 100_000;

pub(crate) fn load_config(path: &Path) -> anyhow::Result<LighthouseConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    Ok(LighthouseConfig::parse(&text, path)?)
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run(config_path: &Path, log_format: Option<LogFormat>) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    init_logging(&config.log.level, log_format.unwrap_or(config.log.format));
    let store = store_location(&config, config_path)?;
    runtime()?.block_on(serve(config, config_path, store))
}

/// Where the lighthouse's lasting state lives: `[store] url`, else the
/// SQLite file of `[enroll] store`, or "lighthouse.db" beside the config
/// when there is no `[enroll]` (a lighthouse that enrolls no one can still
/// revoke certificates).
pub(crate) fn store_location(
    config: &LighthouseConfig,
    config_path: &Path,
) -> anyhow::Result<StoreLocation> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    config
        .store
        .location(default_store_path(config, config_path), base)
        .map_err(|e| anyhow::anyhow!("{}: [store] url: {e}", config_path.display()))
}

/// Opens the configured store (for the CLI's commands).
pub(crate) fn open_store(
    config: &LighthouseConfig,
    config_path: &Path,
) -> anyhow::Result<AnyStore> {
    crate::store::open(
        &store_location(config, config_path)?,
        config.store.password_file.as_deref(),
    )
}

fn default_store_path(config: &LighthouseConfig, config_path: &Path) -> PathBuf {
    match &config.enroll {
        Some(e) => e.store.clone(),
        None => config_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("lighthouse.db"),
    }
}

/// The revocation list, read from the store when it changed (by
/// `tern-lighthouse revoke`, or another lighthouse on the same PostgreSQL
/// database) on a thread of its own (a database may be slow or away; the
/// loop must not wait), and handed to the loop, which gives it to the core
/// to push what is new to the nodes. Dropped, the thread ends.
struct RevocationFeed {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for RevocationFeed {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A revocation list as the store gives it: versions and entries.
type RevocationList = Vec<(u32, tern_shared::control::Revocation)>;

/// How often the watcher looks at the store (a revocation reaches the
/// loop within this, plus the read; on PostgreSQL at once, announced on a
/// listening connection, with this look as the catch-up after a lost one).
const REVOCATIONS_POLL: Duration = Duration::from_millis(250);

/// The watcher thread's state.
struct RevocationWatcher {
    location: StoreLocation,
    password_file: Option<PathBuf>,
    store: Option<AnyStore>,
    /// On PostgreSQL: the connection that hears revocations announced.
    listener: Option<crate::store::RevocationListener>,
    seen: Option<i64>,
    last_full_read: Option<Instant>,
    /// When a failure to reach the store was last logged.
    last_warning: Option<Instant>,
    lists: mpsc::UnboundedSender<RevocationList>,
}

impl RevocationFeed {
    /// Starts the watcher; the lists arrive on the returned receiver. With
    /// `must_exist`, a store that cannot be opened stops the lighthouse.
    fn start(
        location: StoreLocation,
        password_file: Option<PathBuf>,
        must_exist: bool,
    ) -> anyhow::Result<(RevocationFeed, mpsc::UnboundedReceiver<RevocationList>)> {
        let (lists, rx) = mpsc::unbounded_channel();
        let mut watcher = RevocationWatcher {
            location,
            password_file,
            store: None,
            listener: None,
            seen: None,
            last_full_read: None,
            last_warning: None,
            lists,
        };
        if must_exist || watcher.exists() {
            watcher.store = Some(crate::store::open_off_runtime(
                &watcher.location,
                watcher.password_file.as_deref(),
            )?);
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("revocations".into())
            .spawn(move || {
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    if !watcher.poll(Instant::now()) {
                        return;
                    }
                    watcher.wait(REVOCATIONS_POLL);
                }
            })
            .context("starting the revocation watcher")?;
        Ok((RevocationFeed { stop }, rx))
    }
}

impl RevocationWatcher {
    /// A SQLite store may not exist yet (nothing enrolled, nothing
    /// revoked); a database always does.
    fn exists(&self) -> bool {
        match &self.location {
            StoreLocation::Sqlite(path) => path.exists(),
            StoreLocation::Postgres(_) => true,
        }
    }

    fn warn(&mut self, now: Instant, what: &str, e: &dyn std::fmt::Display) {
        if self
            .last_warning
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(30))
        {
            self.last_warning = Some(now);
            tracing::warn!(store = %self.location, error = %e, "{what}");
        }
    }

    /// Until the next look: `at_most`, or less when a revocation is
    /// announced on the database.
    fn wait(&mut self, at_most: Duration) {
        if self.listener.is_none() {
            if let Some(store) = &self.store {
                match store.listen_for_revocations() {
                    Some(Ok(l)) => self.listener = Some(l),
                    Some(Err(e)) => self.warn(Instant::now(), "listening for revocations", &e),
                    None => {}
                }
            }
        }
        match self.listener.as_mut().map(|l| l.wait(at_most)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                self.listener = None;
                self.warn(Instant::now(), "listening for revocations", &e);
                std::thread::sleep(at_most);
            }
            None => std::thread::sleep(at_most),
        }
    }

    /// One look; false once the loop is gone.
    fn poll(&mut self, now: Instant) -> bool {
        if self.store.is_none() {
            if !self.exists() {
                return true;
            }
            match crate::store::open(&self.location, self.password_file.as_deref()) {
                Ok(s) => self.store = Some(s),
                Err(e) => {
                    self.warn(
                        now,
                        "cannot open the store for revocations",
                        &format!("{e:#}"),
                    );
                    return true;
                }
            }
        }
        let Some(store) = self.store.as_mut() else {
            return true;
        };
        let changed = match store.revocations_changed_token() {
            Ok(v) => self.seen.replace(v) != Some(v),
            Err(e) => {
                // A lost connection is opened again at the next look.
                self.store = None;
                self.warn(now, "reading the store's revocations", &e);
                return true;
            }
        };
        // Also once a minute, so expired entries leave the list.
        let stale = self
            .last_full_read
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(60));
        if !changed && !stale {
            return true;
        }
        self.last_full_read = Some(now);
        match tern_lighthouse_core::enroll::EnrollStore::revocations(store, unix_now()) {
            Ok(list) => self.lists.send(list).is_ok(),
            Err(e) => {
                self.store = None;
                self.warn(now, "reading the store's revocations", &e);
                true
            }
        }
    }
}

/// Nodes use only a lighthouse whose certificate carries the group.
fn warn_without_lighthouse_group(cert: &tern_shared::cert::VerifiedCert) {
    if !cert.has_group(tern_shared::cert::LIGHTHOUSE_GROUP) {
        tracing::warn!(
            "this certificate lacks the '{}' group: nodes will not use this lighthouse; sign it with --groups {}",
            tern_shared::cert::LIGHTHOUSE_GROUP,
            tern_shared::cert::LIGHTHOUSE_GROUP
        );
    }
}

async fn serve(
    mut config: LighthouseConfig,
    config_path: &Path,
    store: StoreLocation,
) -> anyhow::Result<()> {
    let mut identity = load_identity(&config.pki.ca, &config.pki.cert, &config.pki.key)
        .map_err(anyhow::Error::msg)
        .context("the lighthouse's identity")?;
    let cert = identity.cert.clone();
    warn_without_lighthouse_group(&cert);
    let socket = tern_udp::bind(config.listen.addr)
        .with_context(|| format!("binding UDP {} ([listen] addr)", config.listen.addr))?;
    let socket = tern_udp::Outer::new(socket)
        .context("setting up the UDP socket's batching and offloads")?;
    tracing::info!(name = cert.name(), overlay_ip = %cert.overlay_ip(), listen = %socket.local_addr()?, "lighthouse up");
    let _links = links::start(&config.listen, cert.name(), socket.streams().clone()).await?;

    let mut core = build_core(&config, &identity);

    // Enrollment runs on a thread of its own: its store writes wait on the
    // disk, and registrations and relaying must not wait with them.
    let (answers_tx, mut answers_rx) = mpsc::unbounded_channel::<(SocketAddr, Vec<u8>)>();
    let enroll_results = std::sync::Arc::new(enrollment::EnrollResults::default());
    let (renewals_tx, mut renewals_rx) =
        mpsc::unbounded_channel::<(RenewAsk, tern_shared::control::RenewOutcome)>();
    let outlets = enrollment::Outlets {
        answers: answers_tx.clone(),
        results: enroll_results.clone(),
        renewals: renewals_tx,
    };
    let mut enrollment = match &config.enroll {
        Some(e) => Some(enrollment::start(
            e,
            &store,
            config.store.password_file.as_deref(),
            &identity.key,
            &cert,
            outlets.clone(),
        )?),
        None => None,
    };
    let mut not_enrolling = enrollment::DisabledEnrollment::new(Instant::now());
    let (_revocations, mut revocation_lists) = RevocationFeed::start(
        store.clone(),
        config.store.password_file.clone(),
        enrollment.is_some(),
    )?;
    let flow_store = flows::FlowStore::start(
        store.clone(),
        config.store.password_file.clone(),
        config.flows.retain,
    )?;
    let (admin_api, mut api_rx, mut admin_listener, changes_tx) =
        console::start_admin(&mut core, &cert, &config, config_path, seed())?;
    let _api = serve_api(
        &api_socket_path(&config),
        config.api.group.as_deref(),
        admin_api.clone(),
    )?;
    let (metrics_tx, mut metrics_rx) = mpsc::channel::<oneshot::Sender<String>>(4);
    let _metrics = serve_metrics(config.metrics.listen, metrics_tx).await?;

    let mut sighup = signal(SignalKind::hangup())?;
    let reload = Reload {
        path: config_path,
        outlets: &outlets,
        store: &store,
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut received = tern_udp::RecvBatch::default();
    let mut sends = tern_udp::SendBatch::default();
    let mut next_timer = tokio::time::Instant::now();
    let mut expiry = tern_udp::daemon::ExpiryWarnings::default();
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
                expiry.check(&identity.cert, unix_now());
                next_timer = tokio::time::Instant::from_std(core.poll_timeout(now));
            }
            Some(list) = revocation_lists.recv() => {
                core.set_revocations(list, Instant::now());
            }
            Some((to, answer)) = answers_rx.recv() => {
                sends.push(&socket, to, &answer).await;
            }
            Some((ask, outcome)) = renewals_rx.recv() => {
                core.answer_renewal(&ask, outcome, Instant::now());
            }
            conn = admin::next_event(admin_listener.as_mut()) => {
                if let Some(conn) = conn {
                    admin::accept(&admin_api, &core, conn);
                }
            }
            Some(call) = api_rx.recv() => {
                answer_call(call, &core, enrollment.as_ref(), socket.streams(), &admin_api);
            }
            Some(reply) = metrics_rx.recv() => {
                let _ = reply.send(metrics::render(&core, identity.cert.not_after(), enrollment.as_ref(), &enroll_results, socket.streams(), &admin_api, &flow_store));
            }
            _ = sighup.recv() => {
                if reload.apply(&mut config, &mut core, &mut enrollment, &mut identity) {
                    expiry = tern_udp::daemon::ExpiryWarnings::default();
                }
            }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
        }
        route_renewals(&mut core, enrollment.as_ref());
        flow_store.take(&mut core);
        let deadline = end_step(&mut core, admin_listener.as_mut(), &socket, &mut sends).await;
        next_timer = next_timer.min(deadline);
        console::publish_changes(&changes_tx, &core);
    }
    flow_store.finish(&mut core);
    Ok(())
}

/// Answers what the API and console ask of the event loop.
fn answer_call(
    call: admin::LoopCall,
    core: &LighthouseCore,
    enrollment: Option<&enrollment::EnrollmentHandle>,
    streams: &tern_udp::stream::Streams,
    admin_api: &admin::Admin,
) {
    match call {
        admin::LoopCall::Status(reply) => {
            let _ = reply.send(status_json(core, enrollment, streams, admin_api));
        }
        admin::LoopCall::List { request, reply } => {
            let _ = reply.send(admin::list(core, &request, Instant::now()));
        }
        admin::LoopCall::Console { query, reply } => {
            let _ = reply.send(console::answer(core, &query, Instant::now()));
        }
    }
}

/// After every step: the admin stack pumped, everything the core has to
/// send sent; gives when the core (or the admin stack's timers) want the
/// clock next, which may be sooner than the sleep in progress (a new peer).
async fn end_step(
    core: &mut LighthouseCore,
    admin_listener: Option<&mut admin::AdminListener>,
    socket: &tern_udp::Outer,
    sends: &mut tern_udp::SendBatch,
) -> tokio::time::Instant {
    let mut admin_delay = None;
    if let Some(l) = admin_listener {
        l.pump(core, Instant::now());
        admin_delay = l.poll_delay();
    }
    while let Some(t) = core.poll_transmit() {
        sends.push(socket, t.dst, &t.payload).await;
    }
    sends.flush(socket).await;
    let now = Instant::now();
    let mut deadline = core.poll_timeout(now);
    if let Some(d) = admin_delay {
        deadline = deadline.min(now + d);
    }
    tokio::time::Instant::from_std(deadline)
}

/// The `[metrics] listen` endpoint; each scrape asks the event loop. Stops
/// when the guard is dropped.
/// The API socket's path: `[api] socket`, or the default.
pub(crate) fn api_socket_path(config: &LighthouseConfig) -> PathBuf {
    config
        .api
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

async fn serve_metrics(
    listen: Option<SocketAddr>,
    calls: mpsc::Sender<oneshot::Sender<String>>,
) -> anyhow::Result<Option<AbortOnDrop>> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let listener = tern_udp::metrics::bind(listen)
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!(%listen, "metrics at http://{listen}/metrics");
    Ok(Some(AbortOnDrop(tern_udp::metrics::serve(
        listener,
        move || {
            let calls = calls.clone();
            async move {
                let (tx, rx) = oneshot::channel();
                calls.send(tx).await.ok()?;
                rx.await.ok()
            }
        },
    ))))
}

/// A task that stops with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The core for this config and identity: its mesh sized for a lighthouse,
/// the registry, and the relay when `[relay]` enables it.
fn build_core(config: &LighthouseConfig, identity: &Identity) -> LighthouseCore {
    let now = Instant::now();
    let settings = MeshSettings {
        // Nodes keep their sessions alive by registering; no keepalives needed.
        keepalive: None,
        idle_timeout: config.registry.expiry * 4,
        seed: seed(),
        max_peers: MAX_NODES,
        ..MeshSettings::default()
    };
    let mesh = Mesh::for_identity(identity, settings, now, unix_now());
    let mut core = LighthouseCore::new(
        mesh,
        &identity.cert,
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
    core
}

/// Renewal requests the core collected go to the enrollment thread (it owns
/// the issuer and the store); without `[enroll]` they are refused at once.
fn route_renewals(core: &mut LighthouseCore, enrollment: Option<&enrollment::EnrollmentHandle>) {
    while let Some(ask) = core.poll_renewal() {
        match enrollment {
            Some(e) => e.renew(ask),
            None => core.answer_renewal(
                &ask,
                tern_shared::control::RenewOutcome::Refused(
                    "this lighthouse renews no certificates: it has no [enroll] issuer".into(),
                ),
                Instant::now(),
            ),
        }
    }
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
    links: &tern_udp::stream::Streams,
    admin: &admin::Admin,
) -> serde_json::Value {
    let mut status = serde_json::to_value(core.status(Instant::now())).unwrap_or_default();
    if let Some(fields) = status.as_object_mut() {
        fields.insert("pid".into(), std::process::id().into());
        fields.insert("tcp_links".into(), links.links().into());
        let (dropped, refused_out) = core.admin_packet_drops();
        fields.insert(
            "admin".into(),
            serde_json::json!({
                "refused": admin.refused.load(std::sync::atomic::Ordering::Relaxed),
                "packets_dropped": dropped,
                "packets_refused_out": refused_out,
            }),
        );
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
    outlets: &'a enrollment::Outlets,
    /// The store the lighthouse started with (a new one needs a restart).
    store: &'a StoreLocation,
}

impl Reload<'_> {
    /// Whether the identity was replaced.
    fn apply(
        &self,
        running: &mut LighthouseConfig,
        core: &mut LighthouseCore,
        enrollment: &mut Option<enrollment::EnrollmentHandle>,
        identity: &mut Identity,
    ) -> bool {
        tracing::info!(config = %self.path.display(), "SIGHUP: reading the config again");
        let new = match load_config(self.path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "config not reloaded; the running one stays");
                return false;
            }
        };
        let mut changed = Vec::new();
        if new.enroll != running.enroll {
            // The store holds tokens and leases for whichever config: a
            // new path would split them, so it needs a restart.
            let store_moved = store_location(&new, self.path).is_ok_and(|l| l != *self.store)
                || matches!((&new.enroll, &running.enroll), (Some(a), Some(b)) if a.store != b.store);
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
                    self.store,
                    running.store.password_file.as_deref(),
                    &identity.key,
                    &identity.cert,
                    self.outlets.clone(),
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
            match set_log_level(&new.log.level) {
                Some(Ok(())) => {
                    running.log = new.log.clone();
                    changed.push("[log] level");
                }
                Some(Err(e)) => tracing::error!(error = %e, "[log] not reloaded"),
                None => tracing::warn!("[log] changed, but RUST_LOG sets the level; unchanged"),
            }
        }
        let replaced = self.reload_pki(&new, core, enrollment, identity);
        if replaced {
            running.pki = new.pki.clone();
            changed.push("[pki]");
        }
        for (what, differs) in [
            ("[listen]", new.listen != running.listen),
            ("[api]", new.api != running.api),
            ("[admin]", new.admin != running.admin),
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
        replaced
    }

    /// `[pki]` read again: a certificate that verifies, for the same
    /// overlay address, replaces the running one (enrollment restarts with
    /// it, as it seals to the lighthouse's key); anything else is refused
    /// and logged. Whether it was replaced.
    fn reload_pki(
        &self,
        new: &LighthouseConfig,
        core: &mut LighthouseCore,
        enrollment: &mut Option<enrollment::EnrollmentHandle>,
        identity: &mut Identity,
    ) -> bool {
        let fresh = match load_identity(&new.pki.ca, &new.pki.cert, &new.pki.key) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!("SIGHUP: [pki] refused, keeping the running certificate: {e}");
                return false;
            }
        };
        if fresh.cert.encoded() == identity.cert.encoded() && fresh.ca.trusts_same_cas(&identity.ca)
        {
            return false;
        }
        let change = match core.replace_identity(
            fresh.key.static_secret(),
            &fresh.cert,
            fresh.ca.clone(),
            Instant::now(),
        ) {
            Ok(c) => c,
            Err(why) => {
                tracing::error!("SIGHUP: new certificate refused, keeping the running one: {why}");
                return false;
            }
        };
        tracing::info!(
            name = fresh.cert.name(),
            until = %tern_shared::cert::format_unix_time(fresh.cert.not_after()),
            new_key = change.new_key,
            peers = change.rehandshakes,
            "SIGHUP: certificate reloaded; every node re-handshakes with it"
        );
        if let (Some(_), Some(e)) = (enrollment.as_ref(), new.enroll.as_ref()) {
            match enrollment::start(
                e,
                self.store,
                new.store.password_file.as_deref(),
                &fresh.key,
                &fresh.cert,
                self.outlets.clone(),
            ) {
                Ok(handle) => *enrollment = Some(handle),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "enrollment not restarted with the new certificate; it goes on with the old one")
                }
            }
        }
        *identity = fresh;
        true
    }
}

/// Serves the API socket (`admin.rs`: status lines and the admin API
/// over HTTP) until dropped.
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
    admin: std::sync::Arc<admin::Admin>,
) -> anyhow::Result<ApiGuard> {
    let listener = tern_udp::api_socket::bind(path, group)?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(admin::serve_socket_connection(admin.clone(), stream));
        }
    });
    Ok(ApiGuard {
        path: path.to_path_buf(),
        task,
    })
}
