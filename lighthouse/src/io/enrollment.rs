//! Enrollment in the shell: a thread of its own owns the store and the
//! [`Enroller`] (whose decisions are sans-IO), so that the store's writes,
//! which wait on the disk, never hold up the event loop that registers,
//! introduces and relays. The event loop answers hellos itself (the
//! lighthouse's certificate, no state) and hands sealed requests over; the
//! answers come back on a channel and leave from the lighthouse's socket.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tern_shared::config::EnrollConfig;
use tern_shared::enroll::{
    disabled_answer, may_answer, open_request, request_key, ENROLL_HELLO_LEN, ENROLL_REQUEST_MIN,
    TYPE_ENROLL_CERT, TYPE_ENROLL_HELLO, TYPE_ENROLL_REQUEST,
};
use tokio::sync::mpsc::UnboundedSender;

use super::unix_now;
use crate::store::AnyStore;
use tern_lighthouse_core::admission::{AdmissionCounters, SourceLimiter};
use tern_lighthouse_core::enroll::{Decision, Enroller};
use tern_lighthouse_core::lighthouse::RenewAsk;
use tern_lighthouse_core::oidc::Jwks;
use tern_shared::control::RenewOutcome;

/// Requests waiting for the enrollment thread; beyond this they are dropped
/// (the node repeats its request).
const QUEUE: usize = 1024;
/// How long an answer is kept for a node that repeats its request because
/// the answer was lost (a node gives up after about 4 s).
const ANSWER_KEPT: Duration = Duration::from_secs(30);
/// Most answers kept, and most bytes of them; the oldest go first.
const ANSWERS_KEPT: usize = 16_384;
const ANSWERS_KEPT_BYTES: usize = 4 << 20;
/// A provider's keys are fetched again this often, so a rotation is
/// followed even before a token names the new key.
const JWKS_REFRESH: Duration = Duration::from_secs(3600);
/// The thread's idle wake-up, for key refreshes.
const TICK: Duration = Duration::from_millis(500);

enum Job {
    Request {
        from: SocketAddr,
        datagram: Vec<u8>,
    },
    Keys {
        provider: usize,
        keys: Result<Jwks, String>,
    },
    /// A node asks to renew its certificate (`[pki] renew`).
    Renew(RenewAsk),
    /// The handle was dropped (a reload replaced it, or the lighthouse
    /// stops): the thread ends.
    Stop,
}

/// The event loop's handle on the enrollment thread.
pub struct EnrollmentHandle {
    hello_answer: Vec<u8>,
    jobs: SyncSender<Job>,
    /// Set when the handle goes: the thread holds a sender of its own (for
    /// key fetches), so the channel alone never tells it.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    hellos: SourceLimiter,
    requests: SourceLimiter,
    undersized: u64,
}

/// Where the enrollment thread's work goes: answers to send, the counts of
/// results (one set for the lighthouse's life), renewal decisions for the
/// core to send in their sessions.
#[derive(Clone)]
pub struct Outlets {
    pub answers: UnboundedSender<(SocketAddr, Vec<u8>)>,
    pub results: std::sync::Arc<EnrollResults>,
    pub renewals: UnboundedSender<(RenewAsk, RenewOutcome)>,
}

/// Enrollment requests decided, by result: counted by the enrollment
/// thread, read at each metrics scrape; one set for the lighthouse's life
/// (an `[enroll]` reloaded keeps counting). A repeated request answered
/// from the cache is not counted again.
#[derive(Debug, Default)]
pub struct EnrollResults {
    pub issued: std::sync::atomic::AtomicU64,
    /// Refused by the rules (a token used up, a claim not matched, ...).
    pub refused: std::sync::atomic::AtomicU64,
    /// Refused because the store could not be reached.
    pub store_unavailable: std::sync::atomic::AtomicU64,
    /// Requests that did not open (not sealed to this lighthouse, garbage).
    pub unreadable: std::sync::atomic::AtomicU64,
}

impl EnrollResults {
    fn add(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// `(result, count)` pairs in a fixed order.
    pub fn snapshot(&self) -> [(&'static str, u64); 4] {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        [
            ("issued", get(&self.issued)),
            ("refused", get(&self.refused)),
            ("store_unavailable", get(&self.store_unavailable)),
            ("unreadable", get(&self.unreadable)),
        ]
    }
}

/// What enrollment admitted and dropped, for `tern-lighthouse status`.
#[derive(Debug, Clone, Serialize)]
pub struct EnrollmentCounters {
    pub hellos: AdmissionCounters,
    pub requests: AdmissionCounters,
    /// Hellos and requests shorter than the padding the protocol asks for
    /// (answering them would send more bytes than came in).
    pub undersized: u64,
}

impl EnrollmentHandle {
    /// An enrollment datagram from `from`: the answer to send now (a hello),
    /// or `None` (a request, answered later through the answers channel,
    /// or dropped: too short, over its source's or the total rate, or the
    /// thread is this far behind).
    pub fn handle(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> Option<Vec<u8>> {
        let min = match datagram.first() {
            Some(&TYPE_ENROLL_HELLO) => ENROLL_HELLO_LEN,
            Some(&TYPE_ENROLL_REQUEST) => ENROLL_REQUEST_MIN,
            _ => return None,
        };
        if datagram.len() < min {
            self.undersized += 1;
            tracing::trace!(%from, len = datagram.len(), "enrollment datagram shorter than its padding; dropped");
            return None;
        }
        match datagram.first() {
            Some(&TYPE_ENROLL_HELLO) => {
                if !self.hellos.admit(from, now) || !may_answer(datagram, &self.hello_answer) {
                    return None;
                }
                Some(self.hello_answer.clone())
            }
            Some(&TYPE_ENROLL_REQUEST) => {
                if !self.requests.admit(from, now) {
                    return None;
                }
                let job = Job::Request {
                    from,
                    datagram: datagram.to_vec(),
                };
                match self.jobs.try_send(job) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        tracing::debug!(%from, "enrollment queue full; the node will repeat its request")
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        tracing::error!("the enrollment thread has stopped")
                    }
                }
                None
            }
            _ => None,
        }
    }

    /// Hands a renewal request to the enrollment thread; its answer comes
    /// back on the renewals channel. A full queue drops it (the node asks
    /// again).
    pub fn renew(&self, ask: RenewAsk) {
        if self.jobs.try_send(Job::Renew(ask)).is_err() {
            tracing::debug!(
                "enrollment queue full: a renewal request dropped (the node asks again)"
            );
        }
    }

    pub fn counters(&self) -> EnrollmentCounters {
        EnrollmentCounters {
            hellos: self.hellos.counters().clone(),
            requests: self.requests.counters().clone(),
            undersized: self.undersized,
        }
    }
}

impl Drop for EnrollmentHandle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes it now if its queue has room; else it sees the flag after
        // the request it is on.
        let _ = self.jobs.try_send(Job::Stop);
    }
}

/// What a lighthouse without `[enroll]` says to enrollment datagrams: that
/// it does not enroll, and why, so a node says so at once instead of
/// waiting for an answer (under the same padding rule and rate limits).
pub struct DisabledEnrollment {
    answer: Vec<u8>,
    limiter: SourceLimiter,
}

impl DisabledEnrollment {
    pub fn new(now: Instant) -> DisabledEnrollment {
        DisabledEnrollment {
            answer: disabled_answer(
                "enrollment is not enabled on this lighthouse: its config has no [enroll] \
                 (add one, see config/lighthouse.toml, then restart it or send it SIGHUP)",
            ),
            limiter: SourceLimiter::new(
                tern_shared::config::DEFAULT_ENROLL_PER_SOURCE,
                tern_shared::config::DEFAULT_ENROLL_TOTAL,
                now,
            ),
        }
    }

    pub fn handle(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> Option<Vec<u8>> {
        let min = match datagram.first() {
            Some(&TYPE_ENROLL_HELLO) => ENROLL_HELLO_LEN,
            Some(&TYPE_ENROLL_REQUEST) => ENROLL_REQUEST_MIN,
            _ => return None,
        };
        if datagram.len() < min
            || !may_answer(datagram, &self.answer)
            || !self.limiter.admit(from, now)
        {
            return None;
        }
        Some(self.answer.clone())
    }
}

/// Opens the store and the issuer (errors here stop the lighthouse at
/// start, naming what is wrong) and starts the enrollment thread.
pub fn start(
    config: &EnrollConfig,
    location: &tern_shared::store::StoreLocation,
    password_file: Option<&Path>,
    key: &tern_shared::keys::NodeSecretKey,
    cert: &tern_shared::cert::VerifiedCert,
    outlets: Outlets,
) -> anyhow::Result<EnrollmentHandle> {
    let Outlets {
        answers,
        results,
        renewals,
    } = outlets;
    let read = |p: &Path, what: &str| {
        std::fs::read_to_string(p).with_context(|| format!("reading {what} {}", p.display()))
    };
    let issuer =
        tern_shared::cert::Cert::from_pem(&read(&config.issuer_cert, "[enroll] issuer_cert")?)
            .with_context(|| format!("[enroll] issuer_cert {}", config.issuer_cert.display()))?;
    let issuer_key =
        tern_shared::keys::CaSecretKey::from_pem(&read(&config.issuer_key, "[enroll] issuer_key")?)
            .with_context(|| format!("[enroll] issuer_key {}", config.issuer_key.display()))?;
    let mut enroller = Enroller::new(issuer, issuer_key, cert.overlay_net().prefix_len())?
        .with_lease_pool(&config.pool)?
        .with_oidc(config.oidc.clone());
    for renewing in &config.renew {
        let (cert_path, key_path) = (&renewing.issuer_cert, &renewing.issuer_key);
        let issuer =
            tern_shared::cert::Cert::from_pem(&read(cert_path, "[[enroll.renew]] issuer_cert")?)
                .with_context(|| format!("[[enroll.renew]] issuer_cert {}", cert_path.display()))?;
        let key = tern_shared::keys::CaSecretKey::from_pem(&read(
            key_path,
            "[[enroll.renew]] issuer_key",
        )?)
        .with_context(|| format!("[[enroll.renew]] issuer_key {}", key_path.display()))?;
        tracing::info!(issuer = %issuer.body.name, "renewing the certificates this issuer signed ([[enroll.renew]])");
        enroller = enroller.with_renewing(issuer, key)?;
    }
    let store = crate::store::open_off_runtime(location, password_file)
        .context("opening the enrollment store")?;
    tracing::info!(issuer = %enroller.issuer().body.name, pool = %tern_shared::show::list(enroller.lease_pool()), store = %location, "enrolling nodes");
    let (jobs, queue) = sync_channel(QUEUE);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let providers = config.oidc.len();
    let mut worker = Worker {
        enroller,
        store,
        secret: key.static_secret(),
        answered: HashMap::new(),
        answer_order: VecDeque::new(),
        answered_bytes: 0,
        keys_asked: vec![None; providers],
        fetching: vec![false; providers],
        jobs: jobs.clone(),
        answers,
        stop: stop.clone(),
        results,
        renewals,
    };
    let now = Instant::now();
    for (i, p) in config.oidc.iter().enumerate() {
        tracing::info!(issuer = %p.issuer, audience = %p.audience, jwks = %p.jwks, rules = p.rules.len(), "enrolling nodes with OIDC ID tokens");
        if p.jwks_is_url() {
            worker.ask_keys(i, now);
        } else {
            // A file must be readable at start: a typo should stop the
            // lighthouse, not refuse every job later.
            let keys = read_jwks_file(&p.jwks)
                .with_context(|| format!("[[enroll.oidc]] {} jwks", p.issuer))?;
            worker.enroller.set_keys(i, Ok(keys), unix_now());
            worker.keys_asked[i] = Some(now);
        }
    }
    std::thread::Builder::new()
        .name("enroll".into())
        .spawn(move || worker.run(queue))
        .context("starting the enrollment thread")?;
    let mut hello_answer = vec![TYPE_ENROLL_CERT];
    hello_answer.extend_from_slice(cert.encoded());
    Ok(EnrollmentHandle {
        hello_answer,
        jobs,
        stop,
        hellos: SourceLimiter::new(config.per_source_per_sec, config.total_per_sec, now),
        requests: SourceLimiter::new(config.per_source_per_sec, config.total_per_sec, now),
        undersized: 0,
    })
}

/// The enrollment thread's state: the only owner of the store connection
/// and the provider keys.
struct Worker {
    enroller: Enroller,
    store: AnyStore,
    secret: x25519_dalek::StaticSecret,
    /// Answers by enrollment (the request's ephemeral key), so a repeated
    /// request gets the same answer rather than a refusal for a token it
    /// already used; oldest first in `answer_order`, with their sizes,
    /// `answered_bytes` in all.
    answered: HashMap<[u8; 32], Vec<u8>>,
    answer_order: VecDeque<(Instant, [u8; 32], usize)>,
    answered_bytes: usize,
    /// Per OIDC provider: when its keys were last asked for, and whether a
    /// fetch of its URL is under way (fetches run on threads of their own
    /// and come back as [`Job::Keys`]).
    keys_asked: Vec<Option<Instant>>,
    fetching: Vec<bool>,
    jobs: SyncSender<Job>,
    answers: UnboundedSender<(SocketAddr, Vec<u8>)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    results: std::sync::Arc<EnrollResults>,
    renewals: UnboundedSender<(RenewAsk, RenewOutcome)>,
}

impl Worker {
    /// Until the event loop is gone (its handle dropped, or the answers
    /// channel closed).
    fn run(mut self, queue: Receiver<Job>) {
        let mut last_tick = Instant::now();
        loop {
            match queue.recv_timeout(TICK) {
                Ok(Job::Request { from, datagram }) => {
                    if let Some(answer) = self.answer(&datagram, Instant::now()) {
                        if self.answers.send((from, answer)).is_err() {
                            return;
                        }
                    }
                }
                Ok(Job::Keys { provider, keys }) => self.keys_arrived(provider, keys),
                Ok(Job::Renew(ask)) => {
                    let outcome = match self.enroller.renew(&ask.cert, &mut self.store, unix_now())
                    {
                        Ok(cert) => {
                            tracing::info!(
                                name = %cert.body.name,
                                until = %tern_shared::cert::format_unix_time(cert.body.not_after),
                                "certificate renewed"
                            );
                            RenewOutcome::Renewed(cert.encode())
                        }
                        Err(refusal) => {
                            tracing::warn!(node = ask.cert.name(), reason = %refusal.why, "renewal refused");
                            RenewOutcome::Refused(refusal.why)
                        }
                    };
                    if self.renewals.send((ask, outcome)).is_err() {
                        return;
                    }
                }
                Ok(Job::Stop) => return,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let now = Instant::now();
            if now.saturating_duration_since(last_tick) >= TICK {
                last_tick = now;
                self.refresh_keys(now);
                if self.answers.is_closed() {
                    return;
                }
            }
        }
    }

    /// The answer to a request, if one may be sent: never longer than the
    /// request (its source is not verified), so a node whose answer did not
    /// fit gets it when it repeats the request with more padding.
    fn answer(&mut self, datagram: &[u8], now: Instant) -> Option<Vec<u8>> {
        let answer = self.decide(datagram, now)?;
        if !may_answer(datagram, &answer) {
            tracing::debug!(
                answer = answer.len(),
                request = datagram.len(),
                "enrollment answer longer than its request; kept for the node's padded repeat"
            );
            return None;
        }
        Some(answer)
    }

    fn decide(&mut self, datagram: &[u8], now: Instant) -> Option<Vec<u8>> {
        while let Some(&(at, key, size)) = self.answer_order.front() {
            if now.saturating_duration_since(at) < ANSWER_KEPT
                && self.answer_order.len() < ANSWERS_KEPT
                && self.answered_bytes <= ANSWERS_KEPT_BYTES
            {
                break;
            }
            self.answered.remove(&key);
            self.answer_order.pop_front();
            self.answered_bytes -= size;
        }
        let key = request_key(datagram)?;
        if let Some(answer) = self.answered.get(&key) {
            return Some(answer.clone());
        }
        let (request, sealer) = match open_request(datagram, &self.secret) {
            Ok(r) => r,
            Err(e) => {
                EnrollResults::add(&self.results.unreadable);
                tracing::debug!(error = %e, "enrollment request refused");
                return None;
            }
        };
        let reply = match self.enroller.decide(&request, &mut self.store, unix_now()) {
            Decision::Reply(reply) => reply,
            Decision::NeedKeys(provider) => {
                // The token names a key we do not hold: read or fetch the
                // provider's keys. A file is read now; a fetch answers no
                // one yet, and the node's repeat of this request finds the
                // keys.
                self.ask_keys(provider, now);
                match self.enroller.decide(&request, &mut self.store, unix_now()) {
                    Decision::Reply(reply) => reply,
                    Decision::NeedKeys(_) => return None,
                }
            }
        };
        EnrollResults::add(match (&reply.cert, &reply.code) {
            (Some(_), _) => &self.results.issued,
            (None, Some(_)) => &self.results.store_unavailable,
            (None, None) => &self.results.refused,
        });
        match (&reply.cert, &reply.refused) {
            (Some(pem), _) => match tern_shared::cert::Cert::from_pem(pem) {
                Ok(cert) => tracing::info!(
                    name = %cert.body.name,
                    address = %tern_shared::show::list(&cert.body.ips),
                    groups = %tern_shared::show::list(&cert.body.groups),
                    until = %tern_shared::cert::format_unix_time(cert.body.not_after),
                    "node enrolled"
                ),
                Err(_) => tracing::info!("node enrolled"),
            },
            (None, Some(why)) => tracing::warn!(reason = %why, "enrollment refused"),
            _ => {}
        }
        let answer = sealer.seal(&reply).ok()?;
        // A refusal because the store was down is not kept: the node's
        // repeat is asked again (the database may be back).
        if reply.code.is_some() {
            return Some(answer);
        }
        if self.answered.insert(key, answer.clone()).is_none() {
            self.answered_bytes += answer.len();
            self.answer_order.push_back((now, key, answer.len()));
        }
        Some(answer)
    }

    /// Reads a file provider's keys now, or starts fetching a URL
    /// provider's (one fetch at a time per provider).
    fn ask_keys(&mut self, provider: usize, now: Instant) {
        let Some(p) = self.enroller.oidc_providers().nth(provider).cloned() else {
            return;
        };
        self.keys_asked[provider] = Some(now);
        if !p.jwks_is_url() {
            let keys = read_jwks_file(&p.jwks).map_err(|e| format!("{e:#}"));
            if let Err(e) = &keys {
                tracing::warn!(issuer = %p.issuer, error = %e, "reading the OIDC provider's keys");
            }
            self.enroller.set_keys(provider, keys, unix_now());
            return;
        }
        if self.fetching[provider] {
            return;
        }
        self.fetching[provider] = true;
        let jobs = self.jobs.clone();
        let spawned = std::thread::Builder::new()
            .name("jwks".into())
            .spawn(move || {
                let keys = fetch_jwks(&p.jwks);
                let _ = jobs.send(Job::Keys { provider, keys });
            });
        if let Err(e) = spawned {
            self.fetching[provider] = false;
            tracing::warn!(error = %e, "could not start fetching the OIDC provider's keys");
        }
    }

    fn keys_arrived(&mut self, provider: usize, keys: Result<Jwks, String>) {
        if let Some(f) = self.fetching.get_mut(provider) {
            *f = false;
        }
        let issuer = self
            .enroller
            .oidc_providers()
            .nth(provider)
            .map(|p| p.issuer.clone())
            .unwrap_or_default();
        match &keys {
            Ok(jwks) => tracing::info!(%issuer, keys = jwks.len(), "OIDC provider keys fetched"),
            Err(e) => tracing::warn!(%issuer, error = %e, "fetching the OIDC provider's keys"),
        }
        self.enroller.set_keys(provider, keys, unix_now());
    }

    /// Fetches every URL provider's keys again once an hour (sooner, a
    /// minute after a failed fetch).
    fn refresh_keys(&mut self, now: Instant) {
        for i in 0..self.keys_asked.len() {
            let due = self.keys_asked[i].is_none_or(|at| {
                let age = now.saturating_duration_since(at);
                age >= JWKS_REFRESH
                    || (age >= Duration::from_secs(60) && !self.enroller.has_keys(i))
            });
            if due {
                self.ask_keys(i, now);
            }
        }
    }
}

fn read_jwks_file(path: &str) -> anyhow::Result<Jwks> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    Jwks::parse(&bytes).with_context(|| path.to_string())
}

/// GETs a JWKS document (https; plain http only on loopback, which the
/// config check enforces).
fn fetch_jwks(url: &str) -> Result<Jwks, String> {
    let answer = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
        .get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let mut body = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            answer.into_reader(),
            tern_lighthouse_core::oidc::MAX_JWKS_LEN as u64 + 1,
        ),
        &mut body,
    )
    .map_err(|e| format!("GET {url}: {e}"))?;
    Jwks::parse(&body).map_err(|e| format!("{url}: {e}"))
}
