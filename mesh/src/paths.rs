//! How packets reach each peer: its direct endpoint once proven, the
//! candidates tried before, and the relay (in relay envelopes) when there
//! is no direct path; hole punching, and noticing a direct path that fell
//! silent.

use super::*;

impl Mesh {
    /// The relays (their underlay addresses) whose relayed datagrams this
    /// mesh accepts: the lighthouses it registered with that offer relaying.
    pub fn set_relays(&mut self, relays: Vec<SocketAddr>) {
        if self.relays != relays {
            self.relays = relays;
        }
    }

    /// The relays set by [`Mesh::set_relays`].
    pub fn relays(&self) -> &[SocketAddr] {
        &self.relays
    }

    /// Reaches `peer` through `relay` while no direct path is proven (None:
    /// direct only).
    pub fn set_relay(&mut self, peer: PeerId, relay: Option<SocketAddr>) {
        if let Some(p) = self.peers.get_mut(&peer.0) {
            if p.relay != relay {
                tracing::info!(peer = p.cert.name(), relay = %or_none(relay), "relay for peer");
                p.relay = relay;
            }
        }
    }

    /// How packets to the peer travel now, and through which relay.
    pub fn peer_path(&self, peer: PeerId) -> Option<(PathKind, Option<SocketAddr>)> {
        self.peers.get(&peer.0).map(|p| (path_kind(p), p.relay))
    }

    /// Adds endpoints to try for the peer (a lighthouse's newer answer).
    pub fn add_candidates(&mut self, peer: PeerId, candidates: &[SocketAddr]) {
        if let Some(p) = self.peers.get_mut(&peer.0) {
            for c in candidates {
                if !p.candidates.contains(c) && p.candidates.len() < 16 {
                    p.candidates.push(*c);
                }
            }
        }
    }

    /// Forgets the direct path (it stopped answering): traffic goes through
    /// the relay, if any, while punching finds a new one.
    pub fn drop_direct_path(&mut self, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer.0) {
            if let Some(old) = p.endpoint.take() {
                tracing::info!(peer = p.cert.name(), endpoint = %old, relay = %or_none(p.relay), "direct path silent; dropped");
                self.events.push_back(MeshEvent::DirectPathLost { peer });
            }
        }
    }

    /// Peers on a direct path that we sent to within `silence` but that sent
    /// nothing back for longer than `silence`: the path may be dead.
    pub fn silent_direct_peers(&self, now: Instant, silence: Duration) -> Vec<PeerId> {
        let recent =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < silence);
        self.peers
            .values()
            .filter(|p| p.endpoint.is_some() && p.connected)
            .filter(|p| recent(p.last_tx) && !recent(p.last_rx))
            .map(|p| p.id)
            .collect()
    }

    /// Node peers with no direct path (relayed, or not yet anywhere) that
    /// we sent to within `silence` but that sent nothing back for longer:
    /// WireGuard answers data within its keepalive time, so the way there
    /// (the relay's introduction, the peer's process) is gone.
    pub fn silent_relayed_peers(&self, now: Instant, silence: Duration) -> Vec<PeerId> {
        let recent =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < silence);
        self.peers
            .values()
            .filter(|p| p.endpoint.is_none() && p.role == crate::PeerRole::Node)
            .filter(|p| recent(p.last_tx) && !recent(p.last_rx))
            .map(|p| p.id)
            .collect()
    }

    /// One round of hole punching toward the peer: before a session, our
    /// certificate and the last handshake initiation again to every
    /// candidate (and through the relay); with a session but no direct path,
    /// an authenticated keepalive to every candidate, which becomes the
    /// direct path at the other end the moment one gets through.
    pub fn punch(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer.0) else {
            return;
        };
        if p.endpoint.is_some() {
            return;
        }
        if !p.connected {
            let Some(init) = p.last_init.clone() else {
                self.connect(peer, false);
                return;
            };
            self.send_handshake(peer.0, &init);
            return;
        }
        let candidates = p.candidates.clone();
        for dst in candidates {
            let Some(p) = self.peers.get_mut(&peer.0) else {
                return;
            };
            if let TunnResult::WriteToNetwork(bytes) = p.tunn.encapsulate(&[], &mut self.scratch) {
                if bytes.first() == Some(&4) {
                    self.transmits.push_back(Transmit {
                        dst,
                        payload: bytes.to_vec(),
                    });
                }
            }
        }
    }
}

/// The way to the peer now: its direct endpoint once one is proven, else
/// its relay.
pub(crate) fn route(p: &Peer) -> Option<Via> {
    match (p.endpoint, p.relay) {
        (Some(e), _) => Some(Via::Direct(e)),
        (None, Some(relay)) => Some(Via::Relay {
            relay,
            peer: p.cert.overlay_ip(),
        }),
        (None, None) => None,
    }
}

/// The peer's endpoint as a log shows it: the address, `relayed`, or `none`.
pub(crate) fn shown_endpoint(p: &Peer) -> String {
    match (p.endpoint, p.relay) {
        (Some(e), _) => e.to_string(),
        (None, Some(_)) => "relayed".to_string(),
        (None, None) => "none".to_string(),
    }
}

pub(crate) fn path_kind(p: &Peer) -> PathKind {
    match route(p) {
        Some(Via::Direct(_)) => PathKind::Direct,
        Some(Via::Relay { .. }) => PathKind::Relayed,
        None => PathKind::Probing,
    }
}
