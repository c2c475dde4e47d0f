//! Relays that are nodes. Two sides of it:
//!
//! - As a relay (`[relay]`, with the `relay` group in its certificate):
//!   the node offers with each registration; a lighthouse that hands it a
//!   pair says who they are (`RelayIntroduce`), and both open sessions
//!   with it. From then on it forwards WireGuard messages between the two,
//!   in the same envelopes and on the same budget as a lighthouse's relay
//!   ([`RelayTable`]): a request counts as the sender's only when it comes
//!   from the address of the sender's authenticated session with this node
//!   (through a NAT that maps each destination to its own port, the only
//!   address that says who sent it), and goes to the address of the
//!   target's. It never holds their keys and forwards only between pairs a
//!   lighthouse (a peer it verified, with the lighthouse group) handed it.
//! - As one of a pair: a lighthouse names the relay node for a peer
//!   (`UseRelay`, with its certificate); the node opens a session with it
//!   and, once that is up, reaches the peer through it while no direct path
//!   is proven (before, through the lighthouse's relay).

use std::collections::HashMap;

use tern_mesh::relay::{Refusal, RelayCounters, RelayTable};
use tern_shared::control::PeerInfo;
use tern_shared::wire::{RelayEnvelope, TYPE_RELAYED, TYPE_RELAY_REQUEST};

use super::*;
use GATEWAY_SILENCE;

/// Most pairs one relay node serves at once.
const MAX_PAIRS: usize = 65_536;
/// A pair unused this long is forgotten (its nodes keep a relayed session
/// alive with keepalives far more often).
const PAIR_IDLE_EXPIRY: Duration = Duration::from_secs(300);
/// Most peers whose relay node a lighthouse named that are remembered.
const MAX_ASSIGNED: usize = 65_536;

/// This node relaying for others.
pub(super) struct NodeRelay {
    table: RelayTable,
    pub(super) counters: RelayCounters,
}

/// The relay nodes lighthouses named for our peers: by the peer's overlay
/// address, the relay's session and address.
#[derive(Default)]
pub(super) struct AssignedRelays {
    by_peer: HashMap<Ipv4Addr, (PeerId, SocketAddr)>,
    /// Relay nodes asked whether they are alive, and when.
    probes: HashMap<PeerId, Instant>,
    /// Relay nodes found silent, and when: a lighthouse naming one again
    /// soon (its choice is the same for the same pair) is not followed.
    silent: HashMap<SocketAddr, Instant>,
}

/// How long a relay node found silent is not used again.
const SILENT_RELAY_SHUNNED: Duration = Duration::from_secs(60);

impl NodeCore {
    /// Relays for pairs that lighthouses hand to this node, `packets_per_sec`
    /// per sender. The shell checks the certificate carries the `relay`
    /// group (a lighthouse would ignore the offer otherwise).
    pub fn enable_relay(&mut self, packets_per_sec: u32) {
        self.relaying = Some(NodeRelay {
            table: RelayTable::new(MAX_PAIRS, PAIR_IDLE_EXPIRY, packets_per_sec),
            counters: RelayCounters::default(),
        });
    }

    /// What this node relayed for others, when it relays.
    pub fn relay_counters(&self) -> Option<RelayCounters> {
        self.relaying.as_ref().map(|r| r.counters.clone())
    }

    /// Sent with each registration while relaying.
    pub(super) fn relay_offer(&self) -> Option<ControlMessage> {
        self.relaying
            .as_ref()
            .map(|_| ControlMessage::RelayOffer { id: 0 })
    }

    /// A lighthouse hands us the pair `a`, `b`.
    pub(super) fn relay_introduce(&mut self, a: Ipv4Addr, b: Ipv4Addr, now: Instant) {
        let Some(relay) = self.relaying.as_mut() else {
            self.counters.bad_control_messages += 1;
            return;
        };
        tracing::debug!(%a, %b, "relaying for a pair");
        if relay.table.introduce(a, b, now) {
            relay.counters.introductions_evicted += 1;
        }
    }

    /// The address of our session with the node at `ip`.
    fn session_at(&self, ip: Ipv4Addr) -> Option<SocketAddr> {
        let peer = self.mesh.peer_by_overlay(ip)?;
        self.mesh.peer_endpoint(peer)
    }

    /// A relay request from `from`: forwarded to the other node of an
    /// introduced pair, re-labelled with the sender, within its budget.
    pub(super) fn relay_request(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        if self.relaying.is_none() {
            self.counters.relay_requests_refused += 1;
            return;
        }
        let env = match RelayEnvelope::decode(TYPE_RELAY_REQUEST, datagram) {
            Ok(env) => env,
            Err(_) => {
                self.count_refusal(|c| c.refused_malformed += 1);
                return;
            }
        };
        let Some(dst) = self.session_at(env.peer) else {
            self.count_refusal(|c| c.refused_unregistered_target += 1);
            return;
        };
        // The sender: the one of the target's partners whose session with
        // us is at `from`.
        let partners: Vec<Ipv4Addr> = self
            .relaying
            .as_ref()
            .map(|r| r.table.partners(env.peer).to_vec())
            .unwrap_or_default();
        let Some(sender) = partners
            .into_iter()
            .find(|p| self.session_at(*p) == Some(from))
        else {
            self.count_refusal(|c| c.refused_unregistered_sender += 1);
            return;
        };
        let Some(relay) = self.relaying.as_mut() else {
            return;
        };
        match relay.table.check(sender, env.peer, now) {
            Ok(()) => {}
            Err(Refusal::NotIntroduced) => {
                relay.counters.refused_not_introduced += 1;
                return;
            }
            Err(Refusal::RateLimited) => {
                relay.counters.refused_rate_limited += 1;
                return;
            }
        }
        let message_type = env.message.first().copied().unwrap_or(0);
        relay
            .counters
            .count_forwarded(message_type, env.message.len());
        let payload = RelayEnvelope {
            peer: sender,
            message: env.message,
        }
        .encode(TYPE_RELAYED);
        self.transmits.push_back(Transmit { dst, payload });
    }

    fn count_refusal(&mut self, count: impl FnOnce(&mut RelayCounters)) {
        if let Some(relay) = self.relaying.as_mut() {
            count(&mut relay.counters);
        }
    }

    /// The relay table's upkeep (idle pairs, full budgets).
    pub(super) fn relay_upkeep(&mut self, now: Instant) {
        if let Some(relay) = self.relaying.as_mut() {
            relay.table.expire_some(now, 256);
            relay.table.drop_full_budgets(now);
        }
    }

    /// A lighthouse names the relay node for `peer_ip`: we open a session
    /// with it (by which it knows us), and once that is up reach the peer
    /// through it while no direct path is proven.
    pub(super) fn use_relay(&mut self, peer_ip: Ipv4Addr, relay: PeerInfo, now: Instant) {
        let Some(relay_at) = relay.endpoints.first().copied() else {
            self.counters.bad_control_messages += 1;
            return;
        };
        let cert = match self.mesh.learn_cert(&relay.cert, now) {
            Ok(c) if c.has_group(tern_shared::cert::RELAY_GROUP) => c,
            Ok(_) | Err(_) => {
                tracing::warn!(
                    "a lighthouse named a relay node whose certificate we do not accept"
                );
                return;
            }
        };
        let relay_ip = cert.overlay_ip();
        if relay_ip == peer_ip || relay_ip == self.overlay_ip {
            return;
        }
        let shunned = &mut self.assigned_relays.silent;
        shunned.retain(|_, at| now.saturating_duration_since(*at) < SILENT_RELAY_SHUNNED);
        if shunned.contains_key(&relay_at) {
            tracing::debug!(peer = %peer_ip, relay = %relay_at, "a lighthouse names a relay node found silent lately; staying on the lighthouses' relay");
            return;
        }
        let Some(relay_peer) = self.mesh.add_peer(cert, &[relay_at], PeerRole::Node, now) else {
            return;
        };
        if !self.mesh.is_connected(relay_peer) {
            self.mesh.connect(relay_peer, false);
        }
        let assigned = &mut self.assigned_relays.by_peer;
        if assigned.len() >= MAX_ASSIGNED && !assigned.contains_key(&peer_ip) {
            assigned.clear();
        }
        assigned.insert(peer_ip, (relay_peer, relay_at));
        tracing::debug!(peer = %peer_ip, relay = %relay_at, "a lighthouse names the relay node for the peer");
        self.follow_assigned_relays();
    }

    /// Peers whose relay node's session is up and that have no direct
    /// path go through it (the relays list first, so their relayed
    /// answers are taken), also when the other side's packets still come
    /// through a lighthouse's relay for a moment: both converge on the relay
    /// node until it is found silent.
    fn follow_assigned_relays(&mut self) {
        if self.assigned_relays.by_peer.is_empty() {
            return;
        }
        self.refresh_relays();
        let moves: Vec<(PeerId, SocketAddr)> = self
            .assigned_relays
            .by_peer
            .iter()
            .filter(|(_, (relay_peer, _))| self.mesh.is_connected(*relay_peer))
            .filter_map(|(ip, (_, at))| Some((self.mesh.peer_by_overlay(*ip)?, *at)))
            .filter(|(peer, at)| {
                matches!(self.mesh.peer_path(*peer), Some((kind, current))
                    if kind != tern_mesh::PathKind::Direct && current != Some(*at))
            })
            .collect();
        for (peer, at) in moves {
            self.mesh.set_relay(peer, Some(at));
        }
    }

    /// A relay node that carries our traffic to peers that stopped
    /// answering is asked (a control ping over our session with it); one
    /// that does not answer within [`GATEWAY_SILENCE`] is dropped, and its
    /// peers go back to the lighthouses' relay (as a silent direct path
    /// is dropped).
    pub(super) fn drive_relay_nodes(&mut self, now: Instant) {
        self.follow_assigned_relays();
        if self.assigned_relays.by_peer.is_empty() {
            return;
        }
        let recent = |t: Option<Instant>| {
            t.is_some_and(|t| now.saturating_duration_since(t) < super::routes::PROBE_AFTER)
        };
        let mut relay_nodes: Vec<(PeerId, SocketAddr)> =
            self.assigned_relays.by_peer.values().copied().collect();
        relay_nodes.sort_by_key(|(p, _)| p.0);
        relay_nodes.dedup();
        for (relay_peer, at) in relay_nodes {
            // Peers relayed through it that we send to and no longer hear.
            let users: Vec<PeerId> = self
                .assigned_relays
                .by_peer
                .iter()
                .filter(|(_, (p, _))| *p == relay_peer)
                .filter_map(|(ip, _)| self.mesh.peer_by_overlay(*ip))
                .collect();
            let stalled = users.iter().copied().any(|peer| {
                matches!(self.mesh.peer_path(peer), Some((tern_mesh::PathKind::Relayed, Some(r))) if r == at)
                    && self
                        .mesh
                        .peer_activity(peer)
                        .is_some_and(|(rx, tx)| recent(tx) && !recent(rx))
            });
            let heard = self.mesh.peer_activity(relay_peer).and_then(|(rx, _)| rx);
            match self.assigned_relays.probes.get(&relay_peer).copied() {
                None if stalled => {
                    self.assigned_relays.probes.insert(relay_peer, now);
                    if let Some(ip) = self.mesh.peer_cert(relay_peer).map(|c| c.overlay_ip()) {
                        let id = self.request_id();
                        self.send_control(relay_peer, ip, &ControlMessage::Ping { id }, now);
                    }
                }
                None => {}
                Some(sent) if heard.is_some_and(|h| h >= sent) => {
                    self.assigned_relays.probes.remove(&relay_peer);
                }
                Some(sent) if now.saturating_duration_since(sent) >= GATEWAY_SILENCE => {
                    tracing::info!(relay = %at, "relay node silent; its peers go back to the lighthouses' relay");
                    self.assigned_relays.probes.remove(&relay_peer);
                    if self.assigned_relays.silent.len() < MAX_ASSIGNED {
                        self.assigned_relays.silent.insert(at, now);
                    }
                    self.assigned_relays
                        .by_peer
                        .retain(|_, (p, _)| *p != relay_peer);
                    self.refresh_relays();
                    let fallback = self.mesh.relays().first().copied();
                    for peer in users {
                        if !matches!(self.mesh.peer_path(peer), Some((_, Some(r))) if r == at) {
                            continue;
                        }
                        self.mesh.set_relay(peer, fallback);
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// The relay node named for `peer`, once our session with it is up.
    pub(super) fn assigned_relay(&self, peer: PeerId) -> Option<SocketAddr> {
        let ip = self.mesh.peer_cert(peer)?.overlay_ip();
        let (relay_peer, at) = self.assigned_relays.by_peer.get(&ip)?;
        self.mesh.is_connected(*relay_peer).then_some(*at)
    }

    /// Every relay node named for a peer whose session with us is up.
    pub(super) fn assigned_relay_addrs(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for (relay_peer, addr) in self.assigned_relays.by_peer.values() {
            if self.mesh.is_connected(*relay_peer) && !out.contains(addr) {
                out.push(*addr);
            }
        }
        out
    }
}
