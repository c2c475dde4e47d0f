//! TCP links to lighthouses (`[[lighthouses]] tcp`), for networks that
//! drop UDP: when UDP gets no answer (or `transport = "tcp"`), the node
//! dials the lighthouse's TCP listener — through `HTTPS_PROXY` when the
//! environment names one — and attaches the link to the UDP socket's
//! [`Outer`] under the lighthouse's UDP endpoint. The core goes on sending
//! to that endpoint, registrations and relayed traffic alike, and does not
//! know the difference. While on TCP, a registration goes over UDP every
//! [`UDP_PROBE_EVERY`]; once the lighthouse answers over UDP, the link is
//! closed and the node is back on UDP.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tern_node_core::node::NodeCore;
use tern_shared::config::LighthouseEntry;
use tern_shared::transport::{PathTransport, ProxyUrl, StreamTarget, Transport};
use tern_udp::Outer;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

type TlsLink = tokio_rustls::client::TlsStream<TcpStream>;

/// A lighthouse never heard from over UDP this long after start: try TCP.
const FIRST_ANSWER_PATIENCE: Duration = Duration::from_millis(1000);
/// A registered lighthouse silent this long (it answers every 4 s): try TCP.
const SILENCE_PATIENCE: Duration = Duration::from_secs(7);
/// While on TCP, how often to see whether UDP works again.
pub const UDP_PROBE_EVERY: Duration = Duration::from_secs(15);
/// After a failed dial, the next waits this long, doubling up to a minute.
const REDIAL_FIRST: Duration = Duration::from_secs(1);
const REDIAL_MAX: Duration = Duration::from_secs(60);
/// How often the links are looked after while any is configured.
const TICK: Duration = Duration::from_millis(100);

/// The TCP fallbacks of all lighthouses that have one.
pub(crate) struct LighthouseLinks {
    links: Vec<Fallback>,
    started: Instant,
}

struct Fallback {
    /// The lighthouse's UDP endpoint, which the link stands for.
    endpoint: SocketAddr,
    target: StreamTarget,
    transport: Transport,
    proxy: Option<ProxyUrl>,
    dialing: Option<oneshot::Receiver<io::Result<TlsLink>>>,
    next_dial: Instant,
    failures: u32,
    /// When the current link was attached.
    attached_at: Option<Instant>,
    next_probe: Instant,
    /// UDP got no answer and has not since: a link that closes is dialled
    /// again at once, not after another wait for UDP.
    udp_failed: bool,
    /// When the last link closed.
    link_closed_at: Option<Instant>,
}

impl LighthouseLinks {
    /// The fallbacks `lighthouses` configure, with the proxy the
    /// environment names for each.
    pub(crate) fn new(
        lighthouses: &[LighthouseEntry],
        outer: &Outer,
        now: Instant,
    ) -> anyhow::Result<Self> {
        let mut links = Vec::new();
        for lh in lighthouses {
            let Some(target) = &lh.tcp else {
                continue;
            };
            if lh.transport == Transport::Udp {
                continue;
            }
            let proxy = match tern_udp::stream::proxy_from_env(target) {
                Ok(proxy) => proxy,
                Err(e) if lh.transport == Transport::Tcp => anyhow::bail!("{e}"),
                Err(e) => {
                    // UDP may well work: only the fallback is lost.
                    tracing::warn!(lighthouse = %lh.endpoint, "{e}; no TCP fallback to this lighthouse");
                    continue;
                }
            };
            if lh.transport == Transport::Tcp {
                outer.streams().hold(lh.endpoint);
            }
            links.push(Fallback {
                endpoint: lh.endpoint,
                target: target.clone(),
                transport: lh.transport,
                proxy,
                dialing: None,
                next_dial: now,
                failures: 0,
                attached_at: None,
                next_probe: now + UDP_PROBE_EVERY,
                udp_failed: false,
                link_closed_at: None,
            });
        }
        Ok(LighthouseLinks {
            links,
            started: now,
        })
    }

    /// How soon [`tick`](Self::tick) wants to run again.
    pub(crate) fn poll_delay(&self) -> Option<Duration> {
        (!self.links.is_empty()).then_some(TICK)
    }

    /// Dials, attaches, probes and closes links as the lighthouses'
    /// answers say.
    pub(crate) fn tick(&mut self, core: &mut NodeCore, outer: &Outer, now: Instant) {
        for link in &mut self.links {
            link.tick(core, outer, self.started, now);
        }
    }

    /// How the lighthouse at `endpoint` is reached now, for status:
    /// `udp`, or `tcp HOST:PORT [via proxy URL]`.
    pub(crate) fn describe(&self, outer: &Outer, endpoint: SocketAddr) -> String {
        match self.links.iter().find(|l| l.endpoint == endpoint) {
            Some(l) if outer.streams().is_attached(endpoint) => match &l.proxy {
                Some(p) => format!("tcp {} via proxy {p}", l.target),
                None => format!("tcp {}", l.target),
            },
            _ => "udp".into(),
        }
    }
}

/// Which transport a path to or through `addr` uses.
pub(crate) fn transport_to(outer: &Outer, addr: SocketAddr) -> PathTransport {
    if outer.streams().is_attached(addr) {
        PathTransport::Tcp
    } else {
        PathTransport::Udp
    }
}

impl Fallback {
    fn tick(&mut self, core: &mut NodeCore, outer: &Outer, started: Instant, now: Instant) {
        let streams = outer.streams();
        self.collect_dial(core, outer, now);
        let attached = streams.is_attached(self.endpoint);
        if !attached && self.attached_at.take().is_some() {
            self.link_closed_at = Some(now);
            tracing::warn!(lighthouse = %self.endpoint, tcp = %self.target, "TCP link to the lighthouse closed");
            core.lighthouse_path_changed(self.endpoint, now);
        }
        let want_tcp = match self.transport {
            Transport::Tcp => true,
            Transport::Udp => false,
            Transport::Auto if attached => {
                let since = self.attached_at.unwrap_or(now);
                if streams.heard_udp(self.endpoint).is_some_and(|t| t >= since) {
                    tracing::info!(lighthouse = %self.endpoint, "the lighthouse answers over UDP again; leaving the TCP link");
                    streams.detach(self.endpoint);
                    self.attached_at = None;
                    self.link_closed_at = Some(now);
                    self.udp_failed = false;
                    core.lighthouse_path_changed(self.endpoint, now);
                    return;
                }
                if now >= self.next_probe {
                    self.next_probe = now + UDP_PROBE_EVERY;
                    streams.probe_udp(self.endpoint);
                    // The registration this asks for is the probe.
                    core.lighthouse_path_changed(self.endpoint, now);
                }
                true
            }
            Transport::Auto => {
                // Not on a link: any answer came over UDP.
                let silent = match core.lighthouse_last_ack(self.endpoint) {
                    Some(t) => now.saturating_duration_since(t) >= SILENCE_PATIENCE,
                    None => now.saturating_duration_since(started) >= FIRST_ANSWER_PATIENCE,
                };
                // Once failed, UDP counts as failed until it answers (a
                // link that closed is dialled again at once).
                let acked_over_udp = core
                    .lighthouse_last_ack(self.endpoint)
                    .is_some_and(|t| self.ack_came_over_udp(t));
                self.udp_failed = (self.udp_failed && !acked_over_udp) || silent;
                self.udp_failed
            }
        };
        if want_tcp && !attached && self.dialing.is_none() && now >= self.next_dial {
            self.dial();
        }
    }

    /// Whether an acknowledgement at `t` came after the last link closed
    /// (so over UDP).
    fn ack_came_over_udp(&self, t: Instant) -> bool {
        self.link_closed_at.is_none_or(|closed| t > closed)
    }

    fn dial(&mut self) {
        let (tx, rx) = oneshot::channel();
        let target = self.target.clone();
        let proxy = self.proxy.clone();
        tracing::debug!(lighthouse = %self.endpoint, tcp = %target, proxy = ?proxy, "dialling the lighthouse over TCP");
        tokio::spawn(async move {
            let _ = tx.send(tern_udp::stream::dial(&target, proxy.as_ref()).await);
        });
        self.dialing = Some(rx);
    }

    /// A dial that finished: attach its link, or wait to try again.
    fn collect_dial(&mut self, core: &mut NodeCore, outer: &Outer, now: Instant) {
        let Some(rx) = self.dialing.as_mut() else {
            return;
        };
        let result = match rx.try_recv() {
            Ok(r) => r,
            Err(oneshot::error::TryRecvError::Empty) => return,
            Err(oneshot::error::TryRecvError::Closed) => {
                Err(io::Error::other("the dialling task ended"))
            }
        };
        self.dialing = None;
        match result {
            Ok(tls) => {
                let via = match &self.proxy {
                    Some(p) => format!(" via proxy {p}"),
                    None => String::new(),
                };
                tracing::info!(lighthouse = %self.endpoint, "reaching the lighthouse over TCP {}{via}", self.target);
                drop(outer.streams().attach(self.endpoint, tls));
                self.attached_at = Some(now);
                self.failures = 0;
                self.next_probe = now + UDP_PROBE_EVERY;
                core.lighthouse_path_changed(self.endpoint, now);
            }
            Err(e) => {
                let pause = REDIAL_FIRST
                    .saturating_mul(1 << self.failures.min(6))
                    .min(REDIAL_MAX);
                if self.failures == 0 {
                    tracing::warn!(lighthouse = %self.endpoint, tcp = %self.target, error = %e, "cannot reach the lighthouse over TCP; trying again in {pause:?}");
                } else {
                    tracing::debug!(lighthouse = %self.endpoint, tcp = %self.target, error = %e, "TCP dial failed again");
                }
                self.failures = self.failures.saturating_add(1);
                self.next_dial = now + pause;
            }
        }
    }
}
