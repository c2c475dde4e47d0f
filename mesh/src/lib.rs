//! The sans-IO mesh core: the peer table, one WireGuard session per peer, and
//! the certificate exchange that comes before each handshake.
//!
//! Both daemons drive it the same way:
//! - a datagram from the UDP socket → [`Mesh::handle_datagram`]; a decrypted,
//!   source-checked IP packet may come back in the caller's buffer;
//! - an IP packet for a peer → [`Mesh::encapsulate`], which returns the
//!   ciphertext and where to send it, also in the caller's buffer;
//! - when [`Mesh::poll_timeout`] says (at least every [`TIMER_TICK`]; more
//!   often for a large table, whose timers run a slice at a time) →
//!   [`Mesh::handle_timeout`];
//! - after each of those, drain [`Mesh::poll_transmit`] (handshakes, hellos,
//!   keepalives: the rare, owned packets) and [`Mesh::poll_event`].
//!
//! The data path (transport packets both ways) allocates nothing and takes no
//! lock: it writes into the buffer the caller lends it, always from its first
//! byte (a ciphertext, relay envelope and all, or a decrypted packet), so a
//! caller batching into one buffer needs only the returned length.
//!
//! Identity: a peer exists only for a certificate this core verified itself
//! against its own CAs, and a handshake is answered only when its static key
//! (revealed by `parse_handshake_anon`) is the key in such a certificate.
//! Certificates arrive in hellos or from the caller (a lighthouse's answer);
//! either way they are verified here, so nobody else is trusted for identity.
//!
//! boringtun's `Tunn` reads its own clock for WireGuard's timers; those are
//! treated as opaque, and run for every peer every [`TIMER_TICK`] (once a
//! second beyond a thousand peers: they count whole seconds, and a
//! lighthouse holds 100,000 sessions). Our own timers (certificate expiry,
//! idle peers, rate buckets) run on the `now` passed in, so they test
//! deterministically.

pub mod admission;
mod counters;
mod hold;
mod paths;
pub mod rate;
pub use counters::{MeshCounters, PeerPaths};
mod receive;
pub mod relay;
mod table;

use paths::{path_kind, route, shown_endpoint};

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::{Deserialize, Serialize};

use crate::admission::{SourceLimiter, HOST_PREFIXES};
use tern_shared::cert::{CaPool, Cert, CertError, Fingerprint, VerifiedCert};
use tern_shared::show::{list, or_none};
use tern_shared::wire::{
    classify, relay_header, DatagramKind, Hello, RelayEnvelope, RELAY_HEADER_LEN, TYPE_RELAYED,
    TYPE_RELAY_REQUEST,
};

/// How often [`Mesh::handle_timeout`] must run at the latest.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// A call to [`Mesh::handle_timeout`] runs the timers of about this many
/// peers (all of a smaller table), so that no call holds up the packets
/// behind it for long (about 0.2 ms): a larger table is walked in slices.
const TIMER_SLICE: usize = 256;
/// Up to this many peers, each peer's timers run every [`TIMER_TICK`];
/// beyond, every [`TIMER_SWEEP`].
const TICK_EVERY_PEER_UP_TO: usize = 1024;
/// How often each peer's timers run in a large table (a lighthouse's):
/// boringtun counts its timers in seconds (retries after 5 s, keepalives,
/// re-keys after 120 s), so each fires at most a second late, and walking
/// 100,000 sessions four times a second would cost a quarter of a core.
const TIMER_SWEEP: Duration = Duration::from_secs(1);
/// Room a caller's output buffer needs beyond the packet it carries.
pub const OVERHEAD: usize = 32;
/// Smallest output buffer any call accepts (a handshake initiation is 148 bytes).
pub const MIN_BUFFER: usize = 256;

/// Handshake messages (initiations, and answers to ours) accepted per
/// second across all peers before cookies are demanded; each counted once.
const HANDSHAKE_RATE_LIMIT: u64 = 500;
/// A direct path that brought nothing for this long gives way to the relay
/// when the peer's packets start coming through it.
const DIRECT_PATH_STALE: Duration = Duration::from_secs(1);
/// Least time between two handshakes restarted on a peer's request.
const FORCED_HANDSHAKE_INTERVAL: Duration = Duration::from_secs(1);
/// Hellos verified or answered per second (each costs an Ed25519 verification).
const HELLO_RATE: u32 = 100;
/// Of those, from one source address (an IPv4 address, an IPv6 /64): a
/// flood from one address takes its share and no more, and the others
/// still join (many nodes behind one NAT address join at this pace).
const HELLOS_PER_SOURCE: u32 = 50;
/// Cookie replies sent per second from one source address (an IPv4
/// address, an IPv6 /64) while under load. WireGuard retries an
/// initiation after 5 s, so an honest initiator needs one; a flood from an
/// address gets no more than this, and the rest of it costs no send.
const COOKIE_REPLIES_PER_SOURCE: u32 = 2;
/// Cookie replies sent per second from all sources together: each is a
/// datagram of its own, so without a bound a flood of initiations costs a
/// send each, and the socket's buffer overflows with what the daemon has
/// no time left to read: honest peers' packets among them.
const COOKIE_REPLIES_PER_SEC: u32 = 10_000;

/// A peer's slot in the table. It is also the upper 24 bits of the WireGuard
/// session index, so an incoming transport packet finds its peer in one lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerId(pub u32);

/// What a peer is to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRole {
    /// An ordinary node: forgotten when idle or expired, met again on demand.
    Node,
    /// A lighthouse this node registers with: kept by its owner, never idled out.
    Lighthouse,
}

/// Tunables, from the daemon's config.
#[derive(Debug, Clone)]
pub struct MeshSettings {
    /// WireGuard persistent keepalive toward peers, seconds (None: off).
    pub keepalive: Option<u16>,
    /// A node peer with no data either way this long is forgotten.
    pub idle_timeout: Duration,
    /// Verified-but-unused certificates kept (from hellos and lighthouse answers).
    pub max_known_certs: usize,
    /// Upper bound on the peer table.
    pub max_peers: usize,
    /// Seed for session indexes.
    pub seed: u64,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            keepalive: Some(25),
            idle_timeout: Duration::from_secs(300),
            max_known_certs: 1024,
            max_peers: 65_536,
            seed: 0,
        }
    }
}

/// A packet for the network that the core built on its own (hello, handshake,
/// keepalive, cookie reply). Rare, so it owns its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// Something the owner may act on.
#[derive(Debug, Clone)]
pub enum MeshEvent {
    /// A hello from `from` carried a certificate that verified.
    HelloCert {
        from: SocketAddr,
        cert: VerifiedCert,
    },
    /// A WireGuard session with the peer is up.
    PeerConnected { peer: PeerId },
    /// A handshake came through a relay from a node whose certificate we do
    /// not have: ask a lighthouse about `overlay_ip`.
    UnknownRelayedPeer { overlay_ip: Ipv4Addr },
    /// The peer's direct path was lost (silent, or the peer now reaches us
    /// only through a relay): packets go through the relay, if any.
    DirectPathLost { peer: PeerId },
    /// The peer is gone from the table.
    PeerRemoved {
        peer: PeerId,
        overlay_ip: Ipv4Addr,
        reason: RemoveReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoveReason {
    CertExpired,
    Idle,
    SessionExpired,
    Replaced,
    Requested,
    /// Its certificate (or its issuer) was revoked.
    Revoked,
    /// The CAs this daemon reloaded do not accept its certificate.
    Refused,
}

/// As `tern status --json` spells it, for logs.
impl std::fmt::Display for RemoveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RemoveReason::CertExpired => "cert_expired",
            RemoveReason::Idle => "idle",
            RemoveReason::SessionExpired => "session_expired",
            RemoveReason::Replaced => "replaced",
            RemoveReason::Requested => "requested",
            RemoveReason::Revoked => "revoked",
            RemoveReason::Refused => "refused",
        })
    }
}

/// What [`Mesh::handle_datagram`] produced for the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'b> {
    /// Nothing to deliver (a handshake, hello, keepalive, or a drop).
    Nothing,
    /// A decrypted IPv4 packet whose inner source the peer's cert allows.
    Packet { peer: PeerId, packet: &'b [u8] },
}

/// What [`Mesh::replace_identity`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityChange {
    /// The key changed: every session was re-keyed.
    pub new_key: bool,
    /// Peers asked to handshake again (with our hello first).
    pub rehandshakes: usize,
    /// Peers dropped because the new CAs do not accept their certificates.
    pub peers_refused: usize,
}

/// How packets to a peer travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// Straight to the peer's endpoint.
    Direct,
    /// Through a relay, in relay envelopes.
    Relayed,
    /// Not yet known: handshakes go to every candidate.
    Probing,
}

/// Where a datagram came from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Direct(SocketAddr),
    /// Through `relay`; `peer` is the overlay address of the node at the
    /// other end (the relay's label, checked against the session).
    Relay {
        relay: SocketAddr,
        peer: Ipv4Addr,
    },
}

impl Via {
    fn addr(&self) -> SocketAddr {
        match *self {
            Via::Direct(a) => a,
            Via::Relay { relay, .. } => relay,
        }
    }

    /// A WireGuard message as the datagram that carries it this way.
    fn transmit(&self, message: &[u8]) -> Transmit {
        match *self {
            Via::Direct(dst) => Transmit {
                dst,
                payload: message.to_vec(),
            },
            Via::Relay { relay, peer } => {
                let mut payload = Vec::with_capacity(RELAY_HEADER_LEN + message.len());
                payload.extend_from_slice(&relay_header(TYPE_RELAY_REQUEST, peer));
                payload.extend_from_slice(message);
                Transmit {
                    dst: relay,
                    payload,
                }
            }
        }
    }
}

/// One peer as `tern status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: PeerId,
    pub name: String,
    pub overlay_ip: Ipv4Addr,
    pub role: PeerRole,
    /// How packets to the peer travel now.
    pub path: PathKind,
    /// The direct endpoint, once an authenticated packet came from it.
    pub endpoint: Option<SocketAddr>,
    /// The relay the peer is reached through when there is no direct path.
    pub relay: Option<SocketAddr>,
    pub candidates: Vec<SocketAddr>,
    pub groups: Vec<String>,
    /// Seconds since the last completed handshake (None: no session yet).
    pub last_handshake_secs: Option<f64>,
    /// Round-trip time of the last control ping answered (filled in by the
    /// node; the mesh does not ping).
    pub rtt_ms: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub spoofed_source_drops: u64,
    pub cert_not_after: u64,
}

/// The peer table and every session in it. See the module docs for how to drive it.
pub struct Mesh {
    secret: StaticSecret,
    public: PublicKey,
    own_cert: VerifiedCert,
    own_hello: Vec<u8>,
    ca: CaPool,
    settings: MeshSettings,
    /// Boxed: a peer is about 10 KiB (boringtun's `Tunn` keeps eight
    /// session slots inline), and the map's spare slots should cost a pointer
    /// each, not a peer each.
    peers: HashMap<u32, Box<Peer>>,
    by_overlay: HashMap<Ipv4Addr, u32>,
    by_key: HashMap<[u8; 32], u32>,
    known_certs: HashMap<[u8; 32], KnownCert>,
    next_index: u32,
    /// Admission of handshake messages: every one counts here, once.
    rate_limiter: Arc<RateLimiter>,
    /// What each `Tunn` checks its handshake messages with: their MACs
    /// only (its limit is never reached), since `rate_limiter` already
    /// counted them. Sharing `rate_limiter` instead counted each
    /// initiation twice, halving the limit.
    session_limiter: Arc<RateLimiter>,
    /// Hellos answered or verified: per source address, and all together.
    hello_admission: SourceLimiter,
    /// Cookie replies sent under load: per source address, and all together.
    cookie_admission: SourceLimiter,
    /// Handshake messages a second before cookies are demanded.
    handshake_rate: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<MeshEvent>,
    counters: MeshCounters,
    clock_origin: (Instant, u64),
    last_second: Instant,
    /// The latest time any call passed in, for work done in calls that take
    /// none (a handshake started by `connect`).
    last_now: Instant,
    /// When [`Mesh::handle_timeout`] last ran.
    last_tick: Instant,
    /// Every peer's index in the order their timers run, and where the
    /// next slice starts (see [`Mesh::handle_timeout`]).
    timer_ring: Vec<u32>,
    timer_cursor: usize,
    scratch: Vec<u8>,
    /// Addresses whose relayed datagrams (0x12) this mesh accepts.
    relays: Vec<SocketAddr>,
    /// Sessions with nodes held until the revocation list is current
    /// (`hold.rs`).
    hold: Option<hold::NodeHold>,
}

struct Peer {
    id: PeerId,
    cert: VerifiedCert,
    tunn: Tunn,
    role: PeerRole,
    /// The direct path, set by an authenticated packet from it.
    endpoint: Option<SocketAddr>,
    /// The relay used while there is no direct path.
    relay: Option<SocketAddr>,
    candidates: Vec<SocketAddr>,
    /// The last handshake initiation, resent as-is while punching.
    last_init: Option<Vec<u8>>,
    connected: bool,
    last_data: Instant,
    /// Last authenticated packet from the peer / last data packet to it.
    last_rx: Option<Instant>,
    last_tx: Option<Instant>,
    /// Last authenticated packet that came straight from the peer.
    /// We just left the relay for a direct path the peer's packet proved:
    /// the next transport packet from it is answered with one keepalive
    /// over that path, so the peer, which may still send through the
    /// relay, leaves it too (once per switch: no keepalive ping-pong).
    announce_direct: bool,
    last_direct_rx: Option<Instant>,
    /// When our last handshake initiation left, and the round trip of the
    /// last one answered: an RTT for every session, no ping needed.
    init_sent: Option<Instant>,
    handshake_rtt: Option<Duration>,
    /// Last handshake restarted because the peer asked for our certificate:
    /// at most one a second, so two nodes that refuse each other's
    /// certificates cannot keep each other busy.
    last_forced_handshake: Option<Instant>,
    spoofed_source_drops: u64,
    /// Where it is in `Mesh::timer_ring`.
    ring_pos: usize,
}

struct KnownCert {
    cert: VerifiedCert,
    learned: Instant,
}

impl Mesh {
    /// `own_cert` is this daemon's certificate (already verified by its owner);
    /// `unix_now` is wall-clock seconds at `now`, for certificate validity.
    /// A mesh for a daemon's verified identity (its key, certificate and
    /// CAs), as both daemons make theirs.
    pub fn for_identity(
        identity: &tern_shared::identity::Identity,
        settings: MeshSettings,
        now: Instant,
        unix_now: u64,
    ) -> Mesh {
        Mesh::new(
            identity.key.static_secret(),
            &identity.cert,
            identity.ca.clone(),
            settings,
            now,
            unix_now,
        )
    }

    pub fn new(
        secret: StaticSecret,
        own_cert: &VerifiedCert,
        ca: CaPool,
        settings: MeshSettings,
        now: Instant,
        unix_now: u64,
    ) -> Mesh {
        let public = PublicKey::from(&secret);
        let own_hello = Hello {
            wants_reply: false,
            cert: own_cert.encoded(),
        }
        .encode();
        Mesh {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            session_limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
            secret,
            public,
            own_cert: own_cert.clone(),
            own_hello,
            ca,
            next_index: (settings.seed as u32) & 0x00ff_ffff,
            settings,
            peers: HashMap::new(),
            by_overlay: HashMap::new(),
            by_key: HashMap::new(),
            known_certs: HashMap::new(),
            hello_admission: hello_admission(HELLO_RATE, now),
            cookie_admission: SourceLimiter::by(
                HOST_PREFIXES,
                COOKIE_REPLIES_PER_SOURCE,
                COOKIE_REPLIES_PER_SEC,
                now,
            ),
            handshake_rate: HANDSHAKE_RATE_LIMIT,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: MeshCounters::default(),
            clock_origin: (now, unix_now),
            last_second: now,
            last_now: now,
            last_tick: now,
            timer_ring: Vec::new(),
            timer_cursor: 0,
            relays: Vec::new(),
            hold: None,
            scratch: vec![0u8; 2048],
        }
    }

    /// A new identity for this daemon (a certificate reloaded or renewed):
    /// new handshakes and hellos carry `own_cert`, signed by one of `ca`.
    /// With the same key, sessions stay and every peer re-handshakes with a
    /// hello first, which brings it the new certificate; with a new key,
    /// every session is re-keyed (packets wait behind the new handshake in
    /// boringtun's queue, as after any expiry). The caller checks that the
    /// certificate is its own to use (verified, same overlay address).
    pub fn replace_identity(
        &mut self,
        secret: StaticSecret,
        own_cert: &VerifiedCert,
        mut ca: CaPool,
        now: Instant,
    ) -> IdentityChange {
        // Revocations learned from lighthouses stay: a pool read from files
        // knows none of them, and lighthouses send only newer ones.
        ca.keep_revocations_of(&self.ca);
        let same_cas = ca.trusts_same_cas(&self.ca);
        self.last_now = now;
        let public = PublicKey::from(&secret);
        let new_key = public != self.public;
        self.own_hello = Hello {
            wants_reply: false,
            cert: own_cert.encoded(),
        }
        .encode();
        self.ca = ca;
        self.own_cert = own_cert.clone();
        if new_key {
            self.rate_limiter = Arc::new(RateLimiter::new(&public, self.handshake_rate));
            self.session_limiter = Arc::new(RateLimiter::new(&public, u64::MAX));
            for p in self.peers.values_mut() {
                p.tunn.set_static_private(
                    secret.clone(),
                    public,
                    Some(self.session_limiter.clone()),
                );
                p.connected = false;
            }
            self.secret = secret;
            self.public = public;
        }
        // Peers whose certificates new CAs no longer accept go (the same CAs
        // accept what they accepted: nothing to verify again).
        let unix = self.unix_time(now);
        let refused: Vec<u32> = if same_cas {
            Vec::new()
        } else {
            self.peers
                .iter()
                .filter(|(_, p)| self.ca.verify_bytes(p.cert.encoded(), unix).is_err())
                .map(|(idx, _)| *idx)
                .collect()
        };
        for idx in &refused {
            self.remove_index(*idx, RemoveReason::Refused);
        }
        let ids: Vec<u32> = self.peers.keys().copied().collect();
        for idx in &ids {
            self.connect(PeerId(*idx), true);
        }
        IdentityChange {
            new_key,
            rehandshakes: ids.len(),
            peers_refused: refused.len(),
        }
    }

    /// How many strangers this mesh takes on per second: hellos verified
    /// (each an Ed25519 verification) or answered (at most
    /// 50 of them a second from one address), and handshake messages
    /// before WireGuard's cookies are demanded. A node's defaults suit a
    /// node; a lighthouse, which every node joins at once when it restarts
    /// and which re-keys with every node every two minutes, asks for more.
    pub fn set_admission_rates(
        &mut self,
        hellos_per_sec: u32,
        handshakes_per_sec: u64,
        now: Instant,
    ) {
        self.hello_admission = hello_admission(hellos_per_sec, now);
        self.handshake_rate = handshakes_per_sec;
        self.rate_limiter = Arc::new(RateLimiter::new(&self.public, handshakes_per_sec));
    }

    /// Wall-clock seconds at `now`, derived from the origin given at construction.
    pub fn unix_time(&self, now: Instant) -> u64 {
        let (origin, unix) = self.clock_origin;
        unix + now.saturating_duration_since(origin).as_secs()
    }

    /// This daemon's own certificate (the one its hellos carry).
    pub fn own_cert(&self) -> &VerifiedCert {
        &self.own_cert
    }

    /// The CAs this mesh trusts.
    pub fn ca(&self) -> &CaPool {
        &self.ca
    }

    /// Verifies a certificate from anywhere (a lighthouse answer, a punch
    /// request) against our own CAs and remembers it, so the handshake its
    /// owner sends is answered.
    pub fn learn_cert(&mut self, bytes: &[u8], now: Instant) -> Result<VerifiedCert, CertError> {
        let cert = self
            .ca
            .verify_bytes(bytes, self.unix_time(now))
            .inspect_err(|_| self.counters.rejected_certs += 1)?;
        self.remember(cert.clone(), now);
        Ok(cert)
    }

    /// Adds (or refreshes) a peer for a certificate verified by this mesh. An
    /// existing peer with the same key keeps its session and gains the
    /// candidates; a peer with the same overlay address but another key is
    /// replaced (the CA signed both; the newer identity wins).
    pub fn add_peer(
        &mut self,
        cert: VerifiedCert,
        candidates: &[SocketAddr],
        role: PeerRole,
        now: Instant,
    ) -> Option<PeerId> {
        self.last_now = now;
        let key = cert.public_key();
        if key == self.public.to_bytes() {
            return None;
        }
        if let Some(&idx) = self.by_key.get(&key) {
            let peer = self.peers.get_mut(&idx)?;
            for c in candidates {
                if !peer.candidates.contains(c) && peer.candidates.len() < 16 {
                    peer.candidates.push(*c);
                }
            }
            if role == PeerRole::Lighthouse {
                peer.role = role;
            }
            return Some(peer.id);
        }
        if let Some(&old) = self.by_overlay.get(&cert.overlay_ip()) {
            self.remove_index(old, RemoveReason::Replaced);
        }
        if self.peers.len() >= self.settings.max_peers {
            self.evict_one_idle_peer();
        }
        let idx = self.allocate_index()?;
        let tunn = Tunn::new(
            self.secret.clone(),
            PublicKey::from(key),
            None,
            self.settings.keepalive.filter(|k| *k > 0),
            idx,
            Some(self.session_limiter.clone()),
        );
        let mut unique = Vec::with_capacity(candidates.len());
        for c in candidates.iter().take(16) {
            if !unique.contains(c) {
                unique.push(*c);
            }
        }
        tracing::debug!(peer = cert.name(), overlay_ip = %cert.overlay_ip(), candidates = %list(&unique), "peer added");
        self.by_overlay.insert(cert.overlay_ip(), idx);
        self.by_key.insert(key, idx);
        self.known_certs.remove(&key);
        self.peers.insert(
            idx,
            Box::new(Peer {
                id: PeerId(idx),
                cert,
                tunn,
                role,
                endpoint: None,
                relay: None,
                candidates: unique,
                last_init: None,
                connected: false,
                last_data: now,
                last_rx: None,
                last_tx: None,
                last_forced_handshake: None,
                last_direct_rx: None,
                announce_direct: false,
                init_sent: None,
                handshake_rtt: None,
                spoofed_source_drops: 0,
                ring_pos: self.timer_ring.len(),
            }),
        );
        self.timer_ring.push(idx);
        Some(PeerId(idx))
    }

    /// Starts a handshake with the peer now unless one is under way or a
    /// session is up.
    pub fn connect(&mut self, peer: PeerId, force: bool) {
        let Some(p) = self.peers.get_mut(&peer.0) else {
            return;
        };
        if let TunnResult::WriteToNetwork(init) =
            p.tunn.format_handshake_initiation(&mut self.scratch, force)
        {
            let init = init.to_vec();
            self.send_handshake(peer.0, &init);
        }
    }

    /// Sends our certificate to `dst`, asking for theirs when `wants_reply`.
    pub fn send_hello(&mut self, dst: SocketAddr, wants_reply: bool) {
        let mut payload = self.own_hello.clone();
        if wants_reply {
            payload[1] |= 0x01;
        }
        self.transmits.push_back(Transmit { dst, payload });
    }

    pub fn peer_by_overlay(&self, ip: Ipv4Addr) -> Option<PeerId> {
        self.by_overlay.get(&ip).map(|&i| PeerId(i))
    }

    pub fn peer_cert(&self, peer: PeerId) -> Option<&VerifiedCert> {
        self.peers.get(&peer.0).map(|p| &p.cert)
    }

    pub fn peer_endpoint(&self, peer: PeerId) -> Option<SocketAddr> {
        self.peers.get(&peer.0).and_then(|p| p.endpoint)
    }

    pub fn peer_role(&self, peer: PeerId) -> Option<PeerRole> {
        self.peers.get(&peer.0).map(|p| p.role)
    }

    /// When we last heard from the peer (any authenticated packet) and last
    /// sent it data: a peer we keep sending to but no longer hear from is gone.
    pub fn peer_activity(&self, peer: PeerId) -> Option<(Option<Instant>, Option<Instant>)> {
        self.peers.get(&peer.0).map(|p| (p.last_rx, p.last_tx))
    }

    /// Whether the peer has a WireGuard session up.
    pub fn is_connected(&self, peer: PeerId) -> bool {
        self.peers.get(&peer.0).is_some_and(|p| p.connected)
    }

    pub fn remove_peer(&mut self, peer: PeerId) {
        self.remove_index(peer.0, RemoveReason::Requested);
    }

    pub fn counters(&self) -> &MeshCounters {
        &self.counters
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// How many peers are reached each way now (for metrics: no list).
    pub fn peer_paths(&self) -> PeerPaths {
        let mut paths = PeerPaths::default();
        for p in self.peers.values() {
            match path_kind(p) {
                PathKind::Direct => paths.direct += 1,
                PathKind::Relayed => paths.relayed += 1,
                PathKind::Probing => paths.probing += 1,
            }
        }
        paths
    }

    /// Every peer, ordered by overlay address.
    pub fn peer_statuses(&self) -> Vec<PeerStatus> {
        let mut out: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| {
                let (last, tx, rx, _, _) = p.tunn.stats();
                PeerStatus {
                    id: p.id,
                    name: p.cert.name().to_string(),
                    overlay_ip: p.cert.overlay_ip(),
                    role: p.role,
                    path: path_kind(p),
                    endpoint: p.endpoint,
                    relay: p.relay,
                    candidates: p.candidates.clone(),
                    groups: p.cert.groups().to_vec(),
                    last_handshake_secs: last.map(|d| d.as_secs_f64()),
                    rtt_ms: p.handshake_rtt.map(|d| d.as_secs_f64() * 1000.0),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                    spoofed_source_drops: p.spoofed_source_drops,
                    cert_not_after: p.cert.not_after(),
                }
            })
            .collect();
        out.sort_by_key(|s| s.overlay_ip);
        out
    }

    /// Encrypts one IP packet for `peer` into `out` (at least
    /// `packet.len() + OVERHEAD` and [`MIN_BUFFER`] bytes). Returns the
    /// ciphertext and its destination; `None` when the packet was queued
    /// behind a handshake (see [`Mesh::poll_transmit`]) or dropped.
    pub fn encapsulate<'b>(
        &mut self,
        peer: PeerId,
        packet: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> Option<(SocketAddr, &'b [u8])> {
        self.last_now = now;
        let p = self.peers.get_mut(&peer.0)?;
        if !packet.is_empty() {
            p.last_data = now;
            p.last_tx = Some(now);
        }
        let via = route(p);
        // Relayed: the ciphertext goes after the envelope's header, so the
        // whole datagram is built in `out` without a copy.
        let header = match via {
            Some(Via::Relay { .. }) => RELAY_HEADER_LEN,
            _ => 0,
        };
        let body = out.get_mut(header..)?;
        let sealed = match p.tunn.encapsulate(packet, body) {
            TunnResult::WriteToNetwork(bytes) if bytes.first() == Some(&1) => Err(bytes.to_vec()),
            TunnResult::WriteToNetwork(bytes) => Ok(bytes.len()),
            TunnResult::Err(e) => {
                self.counters.wireguard_errors += 1;
                tracing::trace!(error = ?e, "encapsulate failed");
                return None;
            }
            _ => return None,
        };
        match sealed {
            Err(init) => {
                self.send_handshake(peer.0, &init);
                None
            }
            Ok(n) => match via? {
                Via::Direct(dst) => {
                    self.counters.count_out(packet.len());
                    Some((dst, &out[..n]))
                }
                Via::Relay { relay, peer } => {
                    self.counters.count_out(packet.len());
                    out[..RELAY_HEADER_LEN]
                        .copy_from_slice(&relay_header(TYPE_RELAY_REQUEST, peer));
                    Some((relay, &out[..RELAY_HEADER_LEN + n]))
                }
            },
        }
    }

    /// Encrypts a packet built on the control path (a control message, a
    /// queued packet) and queues it for [`Mesh::poll_transmit`]. Allocates;
    /// the data path uses [`Mesh::encapsulate`] instead.
    pub fn send_packet(&mut self, peer: PeerId, packet: &[u8], now: Instant) {
        let mut buf = vec![0u8; packet.len() + OVERHEAD + MIN_BUFFER];
        if let Some((dst, bytes)) = self.encapsulate(peer, packet, &mut buf, now) {
            self.transmits.push_back(Transmit {
                dst,
                payload: bytes.to_vec(),
            });
        }
    }

    /// Handles one datagram from the UDP socket. A decrypted packet lands in
    /// `out` (as large as the largest datagram).
    pub fn handle_datagram<'b>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> Received<'b> {
        self.last_now = now;
        match classify(datagram) {
            DatagramKind::WireGuard => self.handle_wireguard(Via::Direct(from), datagram, out, now),
            DatagramKind::Relayed => {
                if !self.relays.contains(&from) {
                    self.counters.relay_drops += 1;
                    tracing::trace!(%from, "relayed datagram from an address that is not our relay");
                    return Received::Nothing;
                }
                match RelayEnvelope::decode(TYPE_RELAYED, datagram) {
                    Ok(env) => self.handle_wireguard(
                        Via::Relay {
                            relay: from,
                            peer: env.peer,
                        },
                        env.message,
                        out,
                        now,
                    ),
                    Err(e) => {
                        self.counters.relay_drops += 1;
                        tracing::trace!(%from, error = %e, "bad relayed datagram");
                        Received::Nothing
                    }
                }
            }
            DatagramKind::RelayRequest => {
                // Nodes are not relays.
                self.counters.unknown_datagrams += 1;
                Received::Nothing
            }
            DatagramKind::Hello => {
                self.handle_hello(from, datagram, now);
                Received::Nothing
            }
            DatagramKind::Unknown => {
                self.counters.unknown_datagrams += 1;
                tracing::trace!(%from, "dropped datagram of unknown type");
                Received::Nothing
            }
        }
    }

    /// Runs timers: WireGuard's (handshake retries, rekeys, keepalives) and
    /// ours (certificate expiry, idle peers, rate buckets). A table of up
    /// to 256 peers is walked whole; a larger one a slice at a time, in
    /// proportion to the time since the last call, so that each peer comes
    /// up every [`TIMER_TICK`] (every second beyond 1,024 peers) when
    /// called by [`Mesh::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        let elapsed = now.saturating_duration_since(self.last_tick);
        self.last_tick = now;
        if now.saturating_duration_since(self.last_second) >= Duration::from_secs(1) {
            self.last_second = now;
            self.rate_limiter.reset_count();
            self.expire_certs(now);
        }
        let n = self.timer_ring.len();
        let quota = if n <= TIMER_SLICE {
            n
        } else {
            // Called late (the caller was busy), a call catches up on a few
            // slices, not on all it missed at once.
            let share = elapsed.as_secs_f64() / self.sweep(n).as_secs_f64();
            ((n as f64 * share).ceil() as usize).clamp(1, n.min(4 * TIMER_SLICE))
        };
        let unix = self.unix_time(now);
        let mut expired = Vec::new();
        for _ in 0..quota {
            if self.timer_cursor >= self.timer_ring.len() {
                self.timer_cursor = 0;
            }
            let Some(&idx) = self.timer_ring.get(self.timer_cursor) else {
                break;
            };
            self.timer_cursor += 1;
            let Some(p) = self.peers.get_mut(&idx) else {
                continue;
            };
            if p.cert.not_after() < unix {
                expired.push((idx, RemoveReason::CertExpired));
                continue;
            }
            match p.tunn.update_timers(&mut self.scratch) {
                TunnResult::WriteToNetwork(bytes) => {
                    if bytes.first() == Some(&1) {
                        let init = bytes.to_vec();
                        self.send_handshake(idx, &init);
                    } else if let Some(via) = route(p) {
                        self.transmits.push_back(via.transmit(bytes));
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    if p.role == PeerRole::Node {
                        expired.push((idx, RemoveReason::SessionExpired));
                    } else {
                        p.connected = false;
                    }
                }
                _ => {}
            }
            if let Some(p) = self.peers.get(&idx) {
                if p.role == PeerRole::Node
                    && now.saturating_duration_since(p.last_data) >= self.settings.idle_timeout
                {
                    expired.push((idx, RemoveReason::Idle));
                }
            }
        }
        for (idx, reason) in expired {
            if reason == RemoveReason::CertExpired && self.peers.contains_key(&idx) {
                self.counters.expired_peers += 1;
            }
            self.remove_index(idx, reason);
        }
    }

    /// How often each of `n` peers' timers run.
    fn sweep(&self, n: usize) -> Duration {
        if n <= TICK_EVERY_PEER_UP_TO {
            TIMER_TICK
        } else {
            TIMER_SWEEP
        }
    }

    /// When [`Mesh::handle_timeout`] wants to run next: [`TIMER_TICK`]
    /// after it last ran while there are peers (boringtun's WireGuard
    /// timers are opaque and want that), sooner for a table walked in
    /// slices (the next slice), else a second after its last
    /// once-a-second bookkeeping. A fixed point in time (earlier than
    /// `now` when overdue), so a caller that asks after every input still
    /// runs the timers under a steady stream of packets.
    pub fn poll_timeout(&self, _now: Instant) -> Instant {
        let n = self.timer_ring.len();
        if n == 0 {
            self.last_second + Duration::from_secs(1)
        } else if n <= TIMER_SLICE {
            self.last_tick + TIMER_TICK
        } else {
            self.last_tick + self.sweep(n).mul_f64(TIMER_SLICE as f64 / n as f64)
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<MeshEvent> {
        self.events.pop_front()
    }
}

/// Hello admission: `total` a second, at most [`HELLOS_PER_SOURCE`] of
/// them from one source address.
fn hello_admission(total: u32, now: Instant) -> SourceLimiter {
    SourceLimiter::by(HOST_PREFIXES, HELLOS_PER_SOURCE.min(total), total, now)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use tern_shared::packet::build_udp_ipv4;
    use tern_shared::testing::{TestCa, TestNode, TEST_NOW};

    pub(crate) const A_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 5);
    pub(crate) const B_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 6);

    /// The workspace builds boringtun from `vendor/boringtun`, whose `Tunn` boxes its
    /// session slots; the published crate's is 11,040 bytes. A lighthouse holds one per
    /// registered node, so losing the patch (a `cargo update`, the `[patch]` entry
    /// dropped) would cost 10 KB per node: this is the alarm.
    #[test]
    fn wireguard_session_slots_are_boxed() {
        let tunn = std::mem::size_of::<Tunn>();
        assert!(
            tunn < 2_048,
            "boringtun's Tunn is {tunn} bytes: the vendored patch (vendor/boringtun/PATCHES.md) is not in use"
        );
    }

    pub(crate) struct Side {
        pub(crate) mesh: Mesh,
        pub(crate) addr: SocketAddr,
        pub(crate) cert: VerifiedCert,
        pub(crate) delivered: Vec<Vec<u8>>,
    }

    fn side(node: &TestNode, pool: CaPool, addr: &str, now: Instant) -> Side {
        let cert = node.verified(&pool);
        Side {
            mesh: Mesh::new(
                node.key.static_secret(),
                &cert,
                pool,
                // Distinct index ranges per side, as in real life.
                MeshSettings {
                    seed: addr.len() as u64 * 7919
                        + addr.as_bytes()[addr.len() - 6] as u64 * 104_729,
                    ..MeshSettings::default()
                },
                now,
                TEST_NOW,
            ),
            addr: addr.parse().unwrap(),
            cert,
            delivered: Vec::new(),
        }
    }

    /// Moves queued transmits between the two sides until both are quiet.
    /// `drop_first` drops the first datagram of that kind seen (by first byte).
    pub(crate) fn exchange(a: &mut Side, b: &mut Side, now: Instant, mut drop_first: Option<u8>) {
        for _ in 0..100 {
            let moved_ab = pump(a, b, now, &mut drop_first);
            let moved_ba = pump(b, a, now, &mut drop_first);
            if !moved_ab && !moved_ba {
                return;
            }
        }
        panic!("exchange did not settle");
    }

    fn pump(src: &mut Side, dst: &mut Side, now: Instant, drop_first: &mut Option<u8>) -> bool {
        let mut buf = vec![0u8; 4096];
        let mut moved = false;
        while let Some(t) = src.mesh.poll_transmit() {
            moved = true;
            if t.dst != dst.addr {
                continue;
            }
            if drop_first.is_some_and(|k| t.payload.first() == Some(&k)) {
                *drop_first = None;
                continue;
            }
            if let Received::Packet { packet, .. } = dst
                .mesh
                .handle_datagram(src.addr, &t.payload, &mut buf, now)
            {
                dst.delivered.push(packet.to_vec());
            }
        }
        moved
    }

    pub(crate) fn setup(a_subnets: &[&str]) -> (Side, Side, Instant) {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let na = ca.node("a", "100.64.0.5/10", &["ci"], a_subnets, 86_400);
        let nb = ca.node("b", "100.64.0.6/10", &[], &[], 86_400);
        let now = Instant::now();
        (
            side(&na, ca.pool(), "198.18.0.2:4242", now),
            side(&nb, ca.pool(), "198.18.0.3:4242", now),
            now,
        )
    }

    /// The data path's contract: what the mesh writes into a lent buffer
    /// starts at its first byte, both ways.
    #[test]
    fn output_starts_at_the_first_byte_of_the_lent_buffer() {
        let (mut a, mut b, now) = setup(&[]);
        let peer = connect(&mut a, &mut b, now);
        let packet = build_udp_ipv4(A_IP, B_IP, 1000, 2000, b"hello");
        let mut out = vec![0u8; 4096];
        let start = out.as_ptr();
        let (_, sealed) = a
            .mesh
            .encapsulate(peer, &packet, &mut out, now)
            .expect("a session");
        assert_eq!(sealed.as_ptr(), start);
        let sealed = sealed.to_vec();
        let mut opened = vec![0u8; 4096];
        let start = opened.as_ptr();
        match b.mesh.handle_datagram(a.addr, &sealed, &mut opened, now) {
            Received::Packet { packet: p, .. } => {
                assert_eq!(p.as_ptr(), start);
                assert_eq!(p, &packet[..]);
            }
            Received::Nothing => panic!("the packet did not arrive"),
        }
    }

    #[test]
    fn handshakes_and_traffic_are_counted_on_both_sides() {
        let (mut a, mut b, now) = setup(&[]);
        let peer = connect(&mut a, &mut b, now);
        let packet = build_udp_ipv4(A_IP, B_IP, 1000, 2000, b"hello");
        send(&mut a, &mut b, peer, &packet, now);
        send(&mut a, &mut b, peer, &packet, now);
        assert_eq!(a.mesh.counters().handshakes, 1, "a accepted a response");
        assert_eq!(b.mesh.counters().handshakes, 1, "b answered an initiation");
        // Two sent on the data path (the first, queued behind the
        // handshake, left with boringtun's queue and is not counted here).
        assert_eq!(a.mesh.counters().packets_out, 2);
        assert_eq!(a.mesh.counters().bytes_out, 2 * packet.len() as u64);
        // Three delivered: the queued one and the two.
        assert_eq!(b.mesh.counters().packets_in, 3);
        assert_eq!(b.delivered.len(), 2);
        assert_eq!(a.mesh.counters().packets_in, 0);
    }

    /// Both sides send each other a packet; both arrive.
    fn both_ways(a: &mut Side, b: &mut Side, now: Instant) {
        let (pa, pb) = (
            a.mesh.peer_by_overlay(B_IP).expect("a knows b"),
            b.mesh.peer_by_overlay(A_IP).expect("b knows a"),
        );
        let to_b = build_udp_ipv4(A_IP, B_IP, 1000, 2000, b"to b");
        let to_a = build_udp_ipv4(B_IP, A_IP, 2000, 1000, b"to a");
        send(a, b, pa, &to_b, now);
        send(b, a, pb, &to_a, now);
        assert_eq!(b.delivered.pop(), Some(to_b));
        assert_eq!(a.delivered.pop(), Some(to_a));
    }

    #[test]
    fn a_renewed_certificate_reaches_the_peer_and_the_session_goes_on() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let na = ca.node("a", "100.64.0.5/10", &["ci"], &[], 3_600);
        let nb = ca.node("b", "100.64.0.6/10", &[], &[], 86_400);
        let now = Instant::now();
        let mut a = side(&na, ca.pool(), "198.18.0.2:4242", now);
        let mut b = side(&nb, ca.pool(), "198.18.0.3:4242", now);
        connect(&mut a, &mut b, now);
        both_ways(&mut a, &mut b, now);
        // Renewed: the same key, later validity.
        let renewed = ca.resign(&na, TEST_NOW, 86_400);
        let change = a.mesh.replace_identity(
            renewed.key.static_secret(),
            &renewed.verified(&ca.pool()),
            ca.pool(),
            now,
        );
        assert_eq!(
            change,
            IdentityChange {
                new_key: false,
                rehandshakes: 1,
                peers_refused: 0
            }
        );
        // Packets keep flowing on the old session before the new handshake.
        both_ways(&mut a, &mut b, now);
        exchange(&mut a, &mut b, now, None);
        let pa = b.mesh.peer_by_overlay(A_IP).unwrap();
        assert_eq!(
            b.mesh.peer_cert(pa).unwrap().not_after(),
            TEST_NOW + 86_400,
            "b holds the renewed certificate"
        );
        both_ways(&mut a, &mut b, now);
        // The old certificate again (a replay) does not take its place.
        let old = Hello {
            wants_reply: false,
            cert: na.verified(&ca.pool()).encoded(),
        }
        .encode();
        let mut buf = vec![0u8; 4096];
        b.mesh.handle_datagram(a.addr, &old, &mut buf, now);
        assert_eq!(b.mesh.peer_cert(pa).unwrap().not_after(), TEST_NOW + 86_400);
    }

    #[test]
    fn a_new_key_rekeys_every_session_and_the_peer_follows() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let (mut a, mut b, now) = {
            let na = ca.node("a", "100.64.0.5/10", &["ci"], &[], 86_400);
            let nb = ca.node("b", "100.64.0.6/10", &[], &[], 86_400);
            let now = Instant::now();
            (
                side(&na, ca.pool(), "198.18.0.2:4242", now),
                side(&nb, ca.pool(), "198.18.0.3:4242", now),
                now,
            )
        };
        connect(&mut a, &mut b, now);
        let fresh = ca.node("a", "100.64.0.5/10", &["ci"], &[], 86_400);
        let change = a.mesh.replace_identity(
            fresh.key.static_secret(),
            &fresh.verified(&ca.pool()),
            ca.pool(),
            now,
        );
        assert!(change.new_key);
        exchange(&mut a, &mut b, now, None);
        let pa = b.mesh.peer_by_overlay(A_IP).unwrap();
        assert_eq!(
            b.mesh.peer_cert(pa).unwrap().public_key(),
            fresh.key.public_bytes(),
            "b talks to a's new key"
        );
        both_ways(&mut a, &mut b, now);
    }

    #[test]
    fn revocations_learned_survive_a_reloaded_identity() {
        let (mut a, _b, now) = setup(&[]);
        let revoked = Fingerprint([9; 32]);
        a.mesh.revoke(&[(revoked, TEST_NOW + 86_400)], now);
        assert!(a.mesh.ca().is_revoked(&revoked));
        let ca = TestCa::new("ca2", &["100.64.0.0/10"], &[]);
        let na = ca.node("a", "100.64.0.5/10", &["ci"], &[], 86_400);
        a.mesh.replace_identity(
            na.key.static_secret(),
            &na.verified(&ca.pool()),
            ca.pool(),
            now,
        );
        assert!(
            a.mesh.ca().is_revoked(&revoked),
            "still refused after the reload"
        );
    }

    #[test]
    fn peers_the_new_cas_do_not_accept_are_dropped() {
        let (mut a, mut b, now) = setup(&[]);
        connect(&mut a, &mut b, now);
        let other = TestCa::new("other", &["100.64.0.0/10"], &[]);
        let na = other.node("a", "100.64.0.5/10", &["ci"], &[], 86_400);
        let change = a.mesh.replace_identity(
            na.key.static_secret(),
            &na.verified(&other.pool()),
            other.pool(),
            now,
        );
        assert_eq!(change.peers_refused, 1);
        assert_eq!(a.mesh.peer_count(), 0);
    }

    #[test]
    fn the_next_timeout_is_a_fixed_point_not_a_tick_from_now() {
        let (mut a, b, now) = setup(&[]);
        // No peers: once a second, for the bookkeeping.
        assert_eq!(a.mesh.poll_timeout(now), now + Duration::from_secs(1));
        a.mesh
            .add_peer(b.cert.clone(), &[b.addr], PeerRole::Node, now)
            .unwrap();
        // A peer: WireGuard's timers, a tick after they last ran, however
        // late the caller asks (a steady stream of packets must not keep
        // pushing the timers back).
        assert_eq!(a.mesh.poll_timeout(now), now + TIMER_TICK);
        let later = now + Duration::from_millis(200);
        assert_eq!(a.mesh.poll_timeout(later), now + TIMER_TICK);
        a.mesh.handle_timeout(later);
        assert_eq!(a.mesh.poll_timeout(later), later + TIMER_TICK);
    }

    fn connect(a: &mut Side, b: &mut Side, now: Instant) -> PeerId {
        let pb = a
            .mesh
            .add_peer(b.cert.clone(), &[b.addr], PeerRole::Node, now)
            .unwrap();
        let mut out = vec![0u8; 4096];
        let first = build_udp_ipv4(A_IP, B_IP, 1000, 2000, b"first");
        assert!(
            a.mesh.encapsulate(pb, &first, &mut out, now).is_none(),
            "queued behind the handshake"
        );
        exchange(a, b, now, None);
        assert_eq!(
            b.delivered,
            vec![first],
            "queued packet arrives once the handshake completes"
        );
        b.delivered.clear();
        pb
    }

    fn send(a: &mut Side, b: &mut Side, peer: PeerId, packet: &[u8], now: Instant) {
        let mut out = vec![0u8; 4096];
        let (dst, bytes) = a
            .mesh
            .encapsulate(peer, packet, &mut out, now)
            .expect("session up");
        assert_eq!(dst, b.addr);
        let bytes = bytes.to_vec();
        let mut buf = vec![0u8; 4096];
        if let Received::Packet { packet, .. } =
            b.mesh.handle_datagram(a.addr, &bytes, &mut buf, now)
        {
            b.delivered.push(packet.to_vec());
        }
    }

    #[test]
    fn hellos_asking_for_our_certificate_restart_the_handshake_at_most_once_a_second() {
        let (mut a, mut b, now) = setup(&[]);
        let pb = a
            .mesh
            .add_peer(b.cert.clone(), &[b.addr], PeerRole::Node, now)
            .unwrap();
        a.mesh.connect(pb, false);
        while a.mesh.poll_transmit().is_some() {}
        b.mesh.send_hello(a.addr, true);
        let ask = b.mesh.poll_transmit().unwrap().payload;
        let mut buf = vec![0u8; 4096];
        let mut initiations = |a: &mut Side, at: Instant| {
            for _ in 0..5 {
                a.mesh.handle_datagram(b.addr, &ask, &mut buf, at);
            }
            let mut n = 0;
            while let Some(t) = a.mesh.poll_transmit() {
                n += usize::from(t.payload.first() == Some(&1));
            }
            n
        };
        assert_eq!(
            initiations(&mut a, now),
            1,
            "five requests, one new handshake"
        );
        assert_eq!(initiations(&mut a, now + Duration::from_millis(500)), 0);
        assert_eq!(initiations(&mut a, now + Duration::from_millis(1100)), 1);
    }

    #[test]
    fn hello_then_handshake_then_data_both_ways() {
        let (mut a, mut b, now) = setup(&[]);
        let pb = connect(&mut a, &mut b, now);
        let status = a.mesh.peer_statuses();
        assert_eq!(status[0].path, PathKind::Direct);
        assert!(
            status[0].rtt_ms.is_some(),
            "the handshake's round trip is the first RTT"
        );
        assert!(a.mesh.is_connected(pb));
        let pa = b
            .mesh
            .peer_by_overlay(A_IP)
            .expect("b learned a from the handshake");
        assert_eq!(b.mesh.peer_endpoint(pa), Some(a.addr));
        let reply = build_udp_ipv4(B_IP, A_IP, 2000, 1000, b"reply");
        send(&mut b, &mut a, pa, &reply, now);
        assert_eq!(a.delivered, vec![reply]);
        let status = a.mesh.peer_statuses();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].name, "b");
        assert!(status[0].last_handshake_secs.is_some());
    }

    #[test]
    fn spoofed_inner_source_is_dropped_and_counted() {
        let (mut a, mut b, now) = setup(&[]);
        let pb = connect(&mut a, &mut b, now);
        let spoofed = build_udp_ipv4(Ipv4Addr::new(100, 64, 0, 99), B_IP, 1, 2, b"spoof");
        send(&mut a, &mut b, pb, &spoofed, now);
        assert!(b.delivered.is_empty());
        assert_eq!(b.mesh.counters().spoofed_source_drops, 1);
        assert_eq!(b.mesh.peer_statuses()[0].spoofed_source_drops, 1);
    }

    #[test]
    fn source_inside_a_cert_subnet_is_accepted() {
        let (mut a, mut b, now) = setup(&["198.19.0.0/24"]);
        let pb = connect(&mut a, &mut b, now);
        let routed = build_udp_ipv4(Ipv4Addr::new(198, 19, 0, 10), B_IP, 1, 2, b"routed");
        send(&mut a, &mut b, pb, &routed, now);
        assert_eq!(b.delivered, vec![routed]);
        assert_eq!(b.mesh.counters().spoofed_source_drops, 0);
    }

    #[test]
    fn peer_from_another_ca_gets_no_handshake_response() {
        let ca = TestCa::new("ca", &[], &[]);
        let other = TestCa::new("other", &[], &[]);
        let na = other.node("a", "100.64.0.5/10", &[], &[], 86_400);
        let nb = ca.node("b", "100.64.0.6/10", &[], &[], 86_400);
        let now = Instant::now();
        // a trusts both CAs (so it accepts b), b trusts only its own.
        let both = CaPool::new(vec![ca.cert.clone(), other.cert.clone()]).unwrap();
        let mut a = side(&na, both, "198.18.0.2:4242", now);
        let mut b = side(&nb, ca.pool(), "198.18.0.3:4242", now);
        let pb = a
            .mesh
            .add_peer(b.cert.clone(), &[b.addr], PeerRole::Node, now)
            .unwrap();
        let mut out = vec![0u8; 4096];
        a.mesh
            .encapsulate(pb, &build_udp_ipv4(A_IP, B_IP, 1, 2, b"x"), &mut out, now);
        exchange(&mut a, &mut b, now, None);
        assert!(!a.mesh.is_connected(pb));
        assert_eq!(b.mesh.peer_count(), 0);
        assert!(b.delivered.is_empty());
        assert!(b.mesh.counters().rejected_certs >= 1);
        assert!(b.mesh.counters().unknown_handshake_keys >= 1);
    }

    #[test]
    fn handshake_before_certificate_asks_for_it_and_recovers() {
        let (mut a, mut b, now) = setup(&[]);
        let pb = a
            .mesh
            .add_peer(b.cert.clone(), &[b.addr], PeerRole::Node, now)
            .unwrap();
        let mut out = vec![0u8; 4096];
        let first = build_udp_ipv4(A_IP, B_IP, 1, 2, b"first");
        a.mesh.encapsulate(pb, &first, &mut out, now);
        exchange(&mut a, &mut b, now, Some(tern_shared::wire::TYPE_HELLO));
        assert!(
            a.mesh.is_connected(pb),
            "b asked for the cert, a resent its handshake"
        );
        assert_eq!(b.delivered, vec![first]);
    }

    #[test]
    fn expired_peer_is_disconnected_on_the_fake_clock() {
        let ca = TestCa::new("ca", &[], &[]);
        let na = ca.node("a", "100.64.0.5/10", &[], &[], 100);
        let nb = ca.node("b", "100.64.0.6/10", &[], &[], 86_400);
        let now = Instant::now();
        let mut a = side(&na, ca.pool(), "198.18.0.2:4242", now);
        let mut b = side(&nb, ca.pool(), "198.18.0.3:4242", now);
        connect(&mut a, &mut b, now);
        assert_eq!(b.mesh.peer_count(), 1);
        while b.mesh.poll_event().is_some() {}
        b.mesh.handle_timeout(now + Duration::from_secs(50));
        assert_eq!(b.mesh.peer_count(), 1, "still valid");
        b.mesh.handle_timeout(now + Duration::from_secs(102));
        assert_eq!(b.mesh.peer_count(), 0);
        let removed = std::iter::from_fn(|| b.mesh.poll_event()).any(|e| {
            matches!(e, MeshEvent::PeerRemoved { reason: RemoveReason::CertExpired, overlay_ip, .. } if overlay_ip == A_IP)
        });
        assert!(removed);
        assert_eq!(b.mesh.counters().expired_peers, 1);
    }

    #[test]
    fn a_revoked_peer_loses_its_session_at_once_and_cannot_handshake_again() {
        let (mut a, mut b, now) = setup(&[]);
        connect(&mut a, &mut b, now);
        assert_eq!(b.mesh.peer_count(), 1);
        while b.mesh.poll_event().is_some() {}
        let entry = (a.cert.fingerprint(), a.cert.not_after());
        assert_eq!(b.mesh.revoke(&[entry], now), 1);
        assert_eq!(b.mesh.revoke(&[entry], now), 0, "known already");
        assert_eq!(b.mesh.peer_count(), 0);
        assert!(std::iter::from_fn(|| b.mesh.poll_event()).any(|e| matches!(
            e,
            MeshEvent::PeerRemoved { reason: RemoveReason::Revoked, overlay_ip, .. } if overlay_ip == A_IP
        )));
        assert_eq!(b.mesh.counters().revoked_peers, 1);
        // a still thinks it has a session; its packets find none on b, and a
        // new handshake (hello first) is refused for the certificate.
        let rejected = b.mesh.counters().rejected_certs;
        let later = now + Duration::from_secs(1);
        let pb = a.mesh.peer_by_overlay(B_IP).unwrap();
        a.mesh.connect(pb, true);
        exchange(&mut a, &mut b, later, None);
        assert_eq!(b.mesh.peer_count(), 0);
        assert!(b.mesh.counters().rejected_certs > rejected);
        assert!(b.delivered.is_empty());
    }

    #[test]
    fn idle_peers_are_forgotten_but_lighthouses_kept() {
        let (mut a, mut b, now) = setup(&[]);
        connect(&mut a, &mut b, now);
        let later = now + Duration::from_secs(301);
        a.mesh.handle_timeout(later);
        assert_eq!(a.mesh.peer_count(), 0);
        let (mut a, mut b, now) = setup(&[]);
        a.mesh
            .add_peer(b.cert.clone(), &[b.addr], PeerRole::Lighthouse, now)
            .unwrap();
        exchange(&mut a, &mut b, now, None);
        a.mesh.handle_timeout(now + Duration::from_secs(301));
        assert_eq!(a.mesh.peer_count(), 1);
    }

    #[test]
    fn roaming_moves_the_endpoint_on_an_authenticated_packet() {
        let (mut a, mut b, now) = setup(&[]);
        let pb = connect(&mut a, &mut b, now);
        a.addr = "198.18.0.77:5000".parse().unwrap();
        send(
            &mut a,
            &mut b,
            pb,
            &build_udp_ipv4(A_IP, B_IP, 1, 2, b"moved"),
            now,
        );
        let pa = b.mesh.peer_by_overlay(A_IP).unwrap();
        assert_eq!(b.mesh.peer_endpoint(pa), Some(a.addr));
        // A forged datagram from elsewhere does not move it.
        let mut buf = vec![0u8; 4096];
        let mut forged = vec![4u8, 0, 0, 0];
        forged.extend_from_slice(&(pa.0 << 8).to_le_bytes());
        forged.extend_from_slice(&[0u8; 40]);
        b.mesh
            .handle_datagram("198.18.0.66:1".parse().unwrap(), &forged, &mut buf, now);
        assert_eq!(b.mesh.peer_endpoint(pa), Some(a.addr));
    }

    #[test]
    fn a_large_table_runs_its_timers_a_slice_at_a_time_each_peer_within_a_sweep() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let us = ca.node("lh", "100.64.0.1/10", &[], &[], 86_400);
        let now = Instant::now();
        let idle = Duration::from_secs(10);
        let mut mesh = Mesh::new(
            us.key.static_secret(),
            &us.verified(&ca.pool()),
            ca.pool(),
            MeshSettings {
                idle_timeout: idle,
                ..MeshSettings::default()
            },
            now,
            TEST_NOW,
        );
        let n = 2000u32;
        for i in 0..n {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 65, 0, 0)) + i);
            let node = ca.node(&format!("p{i}"), &format!("{ip}/10"), &[], &[], 86_400);
            let endpoint = SocketAddr::from(([198, 18, 1, 1], 1000 + i as u16));
            mesh.add_peer(node.verified(&ca.pool()), &[endpoint], PeerRole::Node, now)
                .unwrap();
        }
        let step = mesh.poll_timeout(now) - now;
        assert!(step < TIMER_TICK, "a slice at a time: {step:?}");
        // Driven by poll_timeout: once idle, the peers go a slice per call,
        // all of them within a sweep.
        let mut t = now;
        let mut calls_after_idle = 0;
        while mesh.peer_count() > 0 {
            t = mesh.poll_timeout(t);
            let before = mesh.peer_count();
            mesh.handle_timeout(t);
            if t >= now + idle {
                calls_after_idle += 1;
                assert!(
                    before - mesh.peer_count() <= 2 * TIMER_SLICE,
                    "one slice a call"
                );
            }
            assert!(
                t < now + idle + TIMER_SWEEP + step * 2,
                "all gone within a sweep"
            );
        }
        assert!(calls_after_idle > 1);
    }

    #[test]
    fn a_handshake_counts_once_against_the_rate_limit() {
        let (mut a, mut b, now) = setup(&[]);
        // One handshake message a second: counted twice (once by the mesh,
        // once by the session), the initiation would get a cookie reply.
        b.mesh.set_admission_rates(100, 1, now);
        let pb = connect(&mut a, &mut b, now);
        assert!(a.mesh.is_connected(pb));
    }

    #[test]
    fn an_initiation_flood_past_the_limit_gets_cookie_replies_and_they_are_counted() {
        let (_, mut b, now) = setup(&[]);
        let limit = 5;
        b.mesh.set_admission_rates(100, limit, now);
        // Initiations from a key no certificate carries, each with a fresh
        // ephemeral key, all within boringtun's one-second window.
        let stranger = StaticSecret::from([7u8; 32]);
        let mut initiation = vec![0u8; 256];
        let from: SocketAddr = "198.18.0.66:4242".parse().unwrap();
        let (mut buf, mut cookie_replies_sent) = (vec![0u8; 4096], 0);
        let flood = 20;
        for i in 0..flood {
            let mut tunn = Tunn::new(stranger.clone(), b.mesh.public, None, None, i, None);
            let TunnResult::WriteToNetwork(init) =
                tunn.format_handshake_initiation(&mut initiation, true)
            else {
                panic!("no initiation formatted");
            };
            let init = init.to_vec();
            b.mesh.handle_datagram(from, &init, &mut buf, now);
            while let Some(t) = b.mesh.poll_transmit() {
                if t.payload.first() == Some(&3) {
                    assert_eq!(t.payload.len(), 64, "a cookie reply");
                    assert_eq!(t.dst, from);
                    cookie_replies_sent += 1;
                }
            }
        }
        let counters = b.mesh.counters();
        assert_eq!(
            counters.unknown_handshake_keys, limit,
            "under the limit, opened"
        );
        // One source address: its two cookie replies this second, and the
        // rest dropped unanswered.
        assert_eq!(
            counters.cookie_replies,
            u64::from(COOKIE_REPLIES_PER_SOURCE)
        );
        assert_eq!(
            counters.cookie_replies_withheld,
            u64::from(flood) - limit - u64::from(COOKIE_REPLIES_PER_SOURCE)
        );
        assert_eq!(cookie_replies_sent, counters.cookie_replies);

        // Another address still gets its cookie; a second later the first
        // one gets its two again.
        let other: SocketAddr = "198.18.0.67:4242".parse().unwrap();
        let mut tunn = Tunn::new(stranger.clone(), b.mesh.public, None, None, 99, None);
        let TunnResult::WriteToNetwork(init) =
            tunn.format_handshake_initiation(&mut initiation, true)
        else {
            panic!("no initiation formatted");
        };
        let init = init.to_vec();
        b.mesh.handle_datagram(other, &init, &mut buf, now);
        let replies: Vec<Transmit> = std::iter::from_fn(|| b.mesh.poll_transmit()).collect();
        assert!(
            replies
                .iter()
                .any(|t| t.dst == other && t.payload.first() == Some(&3)),
            "{replies:?}"
        );
        let later = now + Duration::from_millis(1100);
        b.mesh.handle_timeout(later);
        for _ in 0..limit + 3 {
            b.mesh.handle_datagram(from, &init, &mut buf, later);
        }
        assert_eq!(
            b.mesh.counters().cookie_replies,
            u64::from(2 * COOKIE_REPLIES_PER_SOURCE) + 1
        );
    }

    #[test]
    fn a_hello_flood_from_one_address_leaves_room_for_other_addresses() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let na = ca.node("a", "100.64.0.5/10", &[], &[], 86_400);
        let nb = ca.node("b", "100.64.0.6/10", &[], &[], 86_400);
        let nc = ca.node("c", "100.64.0.7/10", &[], &[], 86_400);
        let now = Instant::now();
        let mut b = side(&nb, ca.pool(), "198.18.0.3:4242", now);
        b.mesh.set_admission_rates(2_000, 500, now);
        let hello = |n: &TestNode| {
            Hello {
                wants_reply: true,
                cert: n.verified(&ca.pool()).encoded(),
            }
            .encode()
        };
        let (flood, mut buf) = (hello(&na), vec![0u8; 4096]);
        let flooder: SocketAddr = "198.18.0.66:4242".parse().unwrap();
        // 20,000 hellos within a second, from one address and many ports.
        let mut answered = 0;
        for i in 0..20_000u32 {
            let at = now + Duration::from_micros(50 * u64::from(i));
            let from = SocketAddr::new(flooder.ip(), 1024 + (i % 5000) as u16);
            b.mesh.handle_datagram(from, &flood, &mut buf, at);
            while b.mesh.poll_transmit().is_some() {
                answered += 1;
            }
        }
        assert!(
            answered <= 2 * HELLOS_PER_SOURCE as usize + 1,
            "the flood got its share and no more: {answered}"
        );
        // Another address is answered at once, in the same second.
        let at = now + Duration::from_millis(999);
        let other: SocketAddr = "198.18.0.7:4242".parse().unwrap();
        b.mesh.handle_datagram(other, &hello(&nc), &mut buf, at);
        let reply = b.mesh.poll_transmit().expect("the other node is answered");
        assert_eq!(reply.dst, other);
    }

    #[test]
    fn hellos_with_a_certificate_verified_already_cost_no_token() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let na = ca.node("a", "100.64.0.5/10", &[], &[], 86_400);
        let nb = ca.node("b", "100.64.0.6/10", &[], &[], 86_400);
        let nc = ca.node("c", "100.64.0.7/10", &[], &[], 86_400);
        let now = Instant::now();
        let mut b = side(&nb, ca.pool(), "198.18.0.3:4242", now);
        b.mesh.set_admission_rates(1, 500, now);
        let hello = |n: &TestNode, wants_reply| {
            Hello {
                wants_reply,
                cert: n.verified(&ca.pool()).encoded(),
            }
            .encode()
        };
        let mut buf = vec![0u8; 4096];
        let from: SocketAddr = "198.18.0.2:4242".parse().unwrap();
        for _ in 0..3 {
            b.mesh
                .handle_datagram(from, &hello(&na, false), &mut buf, now);
        }
        assert_eq!(
            b.mesh.counters().rate_limited,
            0,
            "verified once, then known"
        );
        b.mesh
            .handle_datagram(from, &hello(&nc, false), &mut buf, now);
        assert_eq!(b.mesh.counters().rate_limited, 1, "a stranger waits");
        // Answering takes a token, known or not.
        b.mesh
            .handle_datagram(from, &hello(&na, true), &mut buf, now);
        assert_eq!(b.mesh.counters().rate_limited, 2);
        assert!(b.mesh.poll_transmit().is_none());
        let later = now + Duration::from_secs(1);
        b.mesh
            .handle_datagram(from, &hello(&na, true), &mut buf, later);
        assert!(b.mesh.poll_transmit().is_some(), "answered");
    }

    #[test]
    fn garbage_datagrams_are_counted_never_panic() {
        let (_, mut b, now) = setup(&[]);
        let mut buf = vec![0u8; 4096];
        let from: SocketAddr = "198.18.0.9:1".parse().unwrap();
        for g in [
            &[][..],
            &[0],
            &[1],
            &[2, 0, 0],
            &[4, 1, 2, 3, 4, 5, 6, 7],
            &[0x10, 0, 0],
            &[0x40, 1],
            &[1; 148],
        ] {
            assert_eq!(
                b.mesh.handle_datagram(from, g, &mut buf, now),
                Received::Nothing
            );
        }
        assert!(b.mesh.counters().unknown_datagrams >= 2);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let (_, mut b, now) = setup(&[]);
            let mut buf = vec![0u8; 4096];
            let _ = b.mesh.handle_datagram("198.18.0.9:1".parse().unwrap(), &bytes, &mut buf, now);
        }
    }
}
