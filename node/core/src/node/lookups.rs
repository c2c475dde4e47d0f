//! Lookups: asking the lighthouses for the certificate and endpoints behind
//! an overlay address, with the packets that wait for the answer, and
//! checking that answer before a peer is made of it.

use super::backoff::Backoff;
use super::*;

/// A lookup is asked again after this (the peer may not have registered
/// yet when a mesh comes up at once) ...
pub(super) const QUERY_RETRY_FIRST: Duration = Duration::from_millis(50);
/// ... then twice as late each time, up to this ...
pub(super) const QUERY_RETRY: Duration = Duration::from_secs(1);

/// ... and given up after this long, dropping the packets that waited on it.
pub(super) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Packets held per unresolved overlay address, and unresolved addresses at once.
pub(super) const MAX_WAITING_PACKETS: usize = 32;

pub(super) const MAX_LOOKUPS: usize = 256;

pub(super) struct Lookup {
    pub(super) packets: VecDeque<Vec<u8>>,
    pub(super) started: Instant,
    pub(super) next_query: Instant,
    pub(super) retry: Backoff,
    /// Lighthouses that answered they do not know the address.
    pub(super) unknown_at: Vec<PeerId>,
    /// All of them did: pings to it are answered "unknown".
    pub(super) reported_unknown: bool,
}

impl NodeCore {
    /// Whether every connected lighthouse has said, in the running lookup,
    /// that it does not know `dst`.
    pub(super) fn known_unknown(&self, dst: Ipv4Addr) -> bool {
        self.lookups.get(&dst).is_some_and(|l| l.reported_unknown)
    }

    pub(super) fn wait_for_lookup(&mut self, dst: Ipv4Addr, packet: &[u8], now: Instant) {
        if !self.lookups.contains_key(&dst) && self.lookups.len() >= MAX_LOOKUPS {
            self.counters.lookup_queue_drops += 1;
            return;
        }
        let lookup = self.lookups.entry(dst).or_insert_with(|| Lookup {
            packets: VecDeque::new(),
            started: now,
            next_query: now,
            retry: Backoff::new(QUERY_RETRY_FIRST, QUERY_RETRY),
            unknown_at: Vec::new(),
            reported_unknown: false,
        });
        if lookup.packets.len() >= MAX_WAITING_PACKETS {
            lookup.packets.pop_front();
            self.counters.lookup_queue_drops += 1;
        }
        lookup.packets.push_back(packet.to_vec());
        if lookup.next_query <= now {
            lookup.next_query = now + lookup.retry.step(&mut self.jitter);
            self.send_query(dst, now);
        }
    }

    /// Starts a lookup with no packet waiting on it (or lets a running one be).
    pub(super) fn look_up(&mut self, dst: Ipv4Addr, now: Instant) {
        if self.lookups.contains_key(&dst) || self.lookups.len() >= MAX_LOOKUPS {
            return;
        }
        let mut retry = Backoff::new(QUERY_RETRY_FIRST, QUERY_RETRY);
        self.lookups.insert(
            dst,
            Lookup {
                packets: VecDeque::new(),
                started: now,
                next_query: now + retry.step(&mut self.jitter),
                retry,
                unknown_at: Vec::new(),
                reported_unknown: false,
            },
        );
        self.send_query(dst, now);
    }

    pub(super) fn send_query(&mut self, overlay_ip: Ipv4Addr, now: Instant) {
        tracing::debug!(%overlay_ip, "asking lighthouses");
        for i in 0..self.links.len() {
            if let LinkState::Up {
                peer,
                overlay_ip: lh_ip,
                ..
            } = self.links[i].state
            {
                let id = self.request_id();
                self.send_control(peer, lh_ip, &ControlMessage::Query { id, overlay_ip }, now);
            }
        }
    }

    /// A lighthouse does not know `overlay_ip`. Once every lighthouse with a
    /// session has said so, a ping waiting on it is answered "unknown" at
    /// once. Packets keep waiting while the lookup is retried: the peer may
    /// be registering just now (two nodes started together).
    pub(super) fn unknown_answer(&mut self, lighthouse: PeerId, overlay_ip: Ipv4Addr) {
        let connected = self.connected_lighthouses();
        let Some(lookup) = self.lookups.get_mut(&overlay_ip) else {
            return;
        };
        if !lookup.unknown_at.contains(&lighthouse) {
            lookup.unknown_at.push(lighthouse);
        }
        if lookup.unknown_at.len() < connected || lookup.reported_unknown {
            return;
        }
        lookup.reported_unknown = true;
        self.counters.lookups_unknown += 1;
        tracing::debug!(%overlay_ip, "no lighthouse knows this address (yet)");
        let pings: Vec<u32> = self
            .queries
            .pings
            .iter()
            .filter(|(_, p)| p.overlay_ip == overlay_ip)
            .map(|(id, _)| *id)
            .collect();
        for id in pings {
            if let Some(p) = self.queries.pings.remove(&id) {
                if p.report {
                    self.events.ping(PingResult::unknown(id, overlay_ip));
                }
            }
        }
    }

    pub(super) fn drive_lookups(&mut self, now: Instant) {
        let mut retry = Vec::new();
        self.lookups.retain(|ip, l| {
            if now.saturating_duration_since(l.started) >= LOOKUP_TIMEOUT {
                tracing::info!(overlay_ip = %ip, "no lighthouse knows this address; dropping waiting packets");
                self.counters.lookup_timeouts += 1;
                return false;
            }
            if l.next_query <= now {
                l.next_query = now + l.retry.step(&mut self.jitter);
                retry.push(*ip);
            }
            true
        });
        for ip in retry {
            self.send_query(ip, now);
        }
    }

    /// A lighthouse's answer is a hint, never an identity: the certificate is
    /// verified here against our own CAs and must carry the address we asked for.
    pub(super) fn handle_answer(
        &mut self,
        overlay_ip: Ipv4Addr,
        info: PeerInfo,
        introducer: Option<SocketAddr>,
        now: Instant,
    ) {
        if !self.lookups.contains_key(&overlay_ip) {
            if let Some(peer) = self.mesh.peer_by_overlay(overlay_ip) {
                // A peer we know (asked again after its path broke): newer
                // endpoints to punch toward, if the certificate is the same.
                let same = self
                    .mesh
                    .peer_cert(peer)
                    .is_some_and(|c| c.encoded() == info.cert.as_slice());
                if same {
                    let endpoints: Vec<SocketAddr> =
                        info.endpoints.iter().take(MAX_ENDPOINTS).copied().collect();
                    self.mesh.add_candidates(peer, &endpoints);
                    if self.punch.attempts.contains_key(&peer) {
                        self.mesh.punch(peer);
                    }
                }
                return;
            }
        }
        let cert = match self.mesh.learn_cert(&info.cert, now) {
            Ok(c) => c,
            Err(e) => {
                self.counters.lying_lighthouse_answers += 1;
                tracing::warn!(%overlay_ip, reason = %e, "lighthouse answered with a certificate we do not accept");
                return;
            }
        };
        if cert.overlay_ip() != overlay_ip {
            self.counters.lying_lighthouse_answers += 1;
            tracing::warn!(asked = %overlay_ip, got = %cert.overlay_ip(), name = cert.name(), "lighthouse answered with another node's certificate; ignored");
            return;
        }
        let Some(peer) = self
            .mesh
            .add_peer(cert, &info.endpoints, PeerRole::Node, now)
        else {
            return;
        };
        self.start_attempt(peer, introducer, now);
        match self.lookups.remove(&overlay_ip) {
            Some(lookup) if !lookup.packets.is_empty() => {
                for p in lookup.packets {
                    self.send_waiting(peer, &p, now);
                }
            }
            _ => self.mesh.connect(peer, false),
        }
        self.dns_gateway_known(overlay_ip, now);
    }
}

impl NodeCore {
    /// When a lookup is next asked again, or given up.
    pub(super) fn lookups_deadline(&self) -> Option<Instant> {
        self.lookups
            .values()
            .map(|l| l.next_query.min(l.started + LOOKUP_TIMEOUT))
            .min()
    }
}
