//! Sessions with nodes held until the revocation list is current.
//!
//! A node that starts (or restarts) knows no revocation until a lighthouse
//! tells it. Until then it must not open a session with another node: that
//! node's certificate may have been revoked while this one was away, and
//! nothing else would refuse it. Lighthouses are not held (they bring the
//! list). While held, handshake initiations from nodes wait here, bounded,
//! and are answered on release; handshakes of ours toward nodes are not
//! sent, and their packets wait in boringtun's queue as behind any
//! handshake. On release, everything held is checked against the list as it
//! is then: an initiation from a revoked key finds no certificate, a peer
//! with a revoked certificate is already gone.

use super::*;

/// Initiations from nodes kept while held (the latest per key); past this
/// the oldest is dropped and its sender retries, as after a loss.
pub(crate) const HELD_INITIATIONS: usize = 64;

#[derive(Default)]
pub(crate) struct NodeHold {
    initiations: VecDeque<HeldInitiation>,
    /// Peers whose handshake we did not send.
    withheld: Vec<u32>,
}

struct HeldInitiation {
    key: [u8; 32],
    via: Via,
    datagram: Vec<u8>,
}

impl Mesh {
    /// Holds every session with a node (not a lighthouse) until
    /// [`Mesh::release_node_sessions`]: a node calls it when it starts, before
    /// its lighthouses have told it which certificates are revoked.
    pub fn hold_node_sessions(&mut self) {
        if self.hold.is_none() {
            self.hold = Some(NodeHold::default());
        }
    }

    /// Whether sessions with nodes are held.
    pub fn holds_node_sessions(&self) -> bool {
        self.hold.is_some()
    }

    /// The revocation list is current: answers the initiations that waited
    /// (those whose key is still backed by a certificate not revoked) and
    /// starts the handshakes that were not sent.
    pub fn release_node_sessions(&mut self, now: Instant) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        self.last_now = now;
        let mut out = vec![0u8; 2048];
        for held in hold.initiations {
            let _ = self.handle_wireguard(held.via, &held.datagram, &mut out, now);
        }
        for idx in hold.withheld {
            // A peer revoked meanwhile is gone; one that answered a held
            // initiation has its session.
            let waiting = self.peers.get(&idx).is_some_and(|p| !p.connected);
            if waiting {
                self.connect(PeerId(idx), true);
            }
        }
    }

    /// While held: keeps an initiation from a node whose certificate we
    /// hold (answered on release) and says so. Initiations from lighthouses
    /// go on, and so do those from unknown keys (they are answered with a
    /// hello asking for the certificate, which opens no session).
    pub(crate) fn hold_initiation(&mut self, key: [u8; 32], via: Via, datagram: &[u8]) -> bool {
        if self.hold.is_none() {
            return false;
        }
        let role = self
            .by_key
            .get(&key)
            .and_then(|idx| self.peers.get(idx))
            .map(|p| p.role);
        let known = role.is_some() || self.known_certs.contains_key(&key);
        if role == Some(PeerRole::Lighthouse) || !known {
            return false;
        }
        let Some(hold) = self.hold.as_mut() else {
            return false;
        };
        hold.initiations.retain(|h| h.key != key);
        if hold.initiations.len() >= HELD_INITIATIONS {
            hold.initiations.pop_front();
        }
        hold.initiations.push_back(HeldInitiation {
            key,
            via,
            datagram: datagram.to_vec(),
        });
        self.counters.held_handshakes += 1;
        true
    }

    /// While held: a handshake of ours toward a node is not sent (it starts
    /// on release). Says whether it was withheld.
    pub(crate) fn withhold_handshake(&mut self, idx: u32) -> bool {
        let Some(hold) = self.hold.as_mut() else {
            return false;
        };
        if self.peers.get(&idx).map(|p| p.role) != Some(PeerRole::Node) {
            return false;
        }
        if !hold.withheld.contains(&idx) {
            hold.withheld.push(idx);
        }
        self.counters.held_handshakes += 1;
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::tests::{exchange, setup, Side, A_IP, B_IP};
    use tern_shared::packet::build_udp_ipv4;

    /// `a` adds `b` as a peer of `role` and sends it a first packet (which
    /// waits behind the handshake).
    fn send_first(a: &mut Side, b: &Side, role: PeerRole, now: Instant) -> Vec<u8> {
        let pb = a
            .mesh
            .add_peer(b.cert.clone(), &[b.addr], role, now)
            .unwrap();
        let first = build_udp_ipv4(A_IP, B_IP, 1000, 2000, b"first");
        let mut out = vec![0u8; 4096];
        assert!(a.mesh.encapsulate(pb, &first, &mut out, now).is_none());
        first
    }

    #[test]
    fn a_held_node_answers_a_nodes_handshake_only_on_release() {
        let (mut a, mut b, now) = setup(&[]);
        b.mesh.hold_node_sessions();
        let first = send_first(&mut a, &b, PeerRole::Node, now);
        exchange(&mut a, &mut b, now, None);
        assert!(b.delivered.is_empty(), "nothing before the list is in");
        assert_eq!(b.mesh.peer_count(), 0, "no session while held");
        assert!(b.mesh.counters().held_handshakes >= 1);

        b.mesh.release_node_sessions(now);
        assert!(!b.mesh.holds_node_sessions());
        exchange(&mut a, &mut b, now, None);
        assert_eq!(b.delivered, vec![first], "the held handshake answered");
    }

    #[test]
    fn a_handshake_held_from_a_peer_revoked_meanwhile_is_never_answered() {
        let (mut a, mut b, now) = setup(&[]);
        b.mesh.hold_node_sessions();
        send_first(&mut a, &b, PeerRole::Node, now);
        exchange(&mut a, &mut b, now, None);
        b.mesh
            .revoke(&[(a.cert.fingerprint(), a.cert.not_after())], now);
        b.mesh.release_node_sessions(now);
        exchange(&mut a, &mut b, now, None);
        assert_eq!(b.mesh.peer_count(), 0);
        assert!(b.delivered.is_empty());
        // Nor later, when a tries again.
        let later = now + Duration::from_secs(1);
        let pb = a.mesh.peer_by_overlay(B_IP).unwrap();
        a.mesh.connect(pb, true);
        exchange(&mut a, &mut b, later, None);
        assert_eq!(b.mesh.peer_count(), 0);
        assert!(b.delivered.is_empty());
    }

    #[test]
    fn a_held_node_sends_its_own_handshake_to_a_node_only_on_release() {
        let (mut a, mut b, now) = setup(&[]);
        a.mesh.hold_node_sessions();
        let first = send_first(&mut a, &b, PeerRole::Node, now);
        assert!(
            a.mesh.poll_transmit().is_none(),
            "neither hello nor initiation leaves while held"
        );
        b.mesh.release_node_sessions(now);
        a.mesh.release_node_sessions(now);
        exchange(&mut a, &mut b, now, None);
        assert_eq!(b.delivered, vec![first]);
    }

    #[test]
    fn a_peer_revoked_while_our_handshake_was_held_is_not_contacted() {
        let (mut a, b, now) = setup(&[]);
        a.mesh.hold_node_sessions();
        send_first(&mut a, &b, PeerRole::Node, now);
        a.mesh
            .revoke(&[(b.cert.fingerprint(), b.cert.not_after())], now);
        a.mesh.release_node_sessions(now);
        assert!(a.mesh.poll_transmit().is_none());
        assert_eq!(a.mesh.peer_count(), 0);
    }

    #[test]
    fn lighthouses_are_never_held() {
        let (mut a, mut b, now) = setup(&[]);
        a.mesh.hold_node_sessions();
        b.mesh.hold_node_sessions();
        // a reaches b as its lighthouse; b (a node too, here) takes a's
        // handshake only because it knows a as its lighthouse.
        b.mesh
            .add_peer(a.cert.clone(), &[a.addr], PeerRole::Lighthouse, now)
            .unwrap();
        let first = send_first(&mut a, &b, PeerRole::Lighthouse, now);
        exchange(&mut a, &mut b, now, None);
        assert_eq!(b.delivered, vec![first]);
        assert_eq!(a.mesh.counters().held_handshakes, 0);
        assert_eq!(b.mesh.counters().held_handshakes, 0);
    }

    #[test]
    fn held_initiations_are_bounded() {
        let (mut a, mut b, now) = setup(&[]);
        b.mesh.hold_node_sessions();
        send_first(&mut a, &b, PeerRole::Node, now);
        exchange(&mut a, &mut b, now, None);
        let pb = a.mesh.peer_by_overlay(B_IP).unwrap();
        for i in 1..=(2 * HELD_INITIATIONS as u64) {
            a.mesh.connect(pb, true);
            exchange(&mut a, &mut b, now + Duration::from_millis(i), None);
        }
        let held = b.mesh.hold.as_ref().unwrap().initiations.len();
        assert_eq!(held, 1, "the latest per key");
    }
}
