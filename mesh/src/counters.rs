//! What the mesh counts, for `tern status` and the daemons' metrics: drops
//! and errors by reason, handshakes and traffic, and peers by path.

use serde::{Deserialize, Serialize};

/// Drop and error counters, for `tern status` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshCounters {
    pub unknown_datagrams: u64,
    pub malformed_hellos: u64,
    pub rate_limited: u64,
    pub rejected_certs: u64,
    pub unknown_handshake_keys: u64,
    pub unknown_session_index: u64,
    pub wireguard_errors: u64,
    /// Handshake initiations no newer than one already answered: the same
    /// initiation resent while punching or reaching us by two paths (or a
    /// replay). Dropped, and expected on a healthy mesh, so not an error.
    pub repeated_handshakes: u64,
    /// Answers to a handshake of ours that a crossing one (both sides
    /// initiating at once when they meet) replaced. Expected, not an error.
    pub crossed_handshakes: u64,
    /// Decrypted packets whose inner source the sender's cert does not allow.
    pub spoofed_source_drops: u64,
    pub non_ipv4_drops: u64,
    pub expired_peers: u64,
    /// Sessions torn down because the peer's certificate was revoked.
    pub revoked_peers: u64,
    /// Relayed datagrams from an address that is not one of our relays, or
    /// malformed, or labelled with a source other than the peer that sent them.
    pub relay_drops: u64,
    /// WireGuard handshakes completed: as the initiator, a response
    /// accepted; as the responder, an initiation answered with a session.
    #[serde(default)]
    pub handshakes: u64,
    /// Decrypted IP packets delivered (their inner source allowed), and
    /// their bytes.
    #[serde(default)]
    pub packets_in: u64,
    #[serde(default)]
    pub bytes_in: u64,
    /// IP packets encrypted toward a peer, and their bytes (before
    /// encryption; keepalives not counted).
    #[serde(default)]
    pub packets_out: u64,
    #[serde(default)]
    pub bytes_out: u64,
    /// Handshake messages answered with a cookie reply because the node was
    /// under load (past its handshake rate limit, without a valid cookie
    /// MAC): not processed, the sender asked to prove its address first.
    #[serde(default)]
    pub cookie_replies: u64,
    /// Handshake messages under load that got no cookie reply either: over
    /// the budget of their source address or of all sources (dropped).
    #[serde(default)]
    pub cookie_replies_withheld: u64,
    /// Handshakes with nodes, either way, held because the revocation list
    /// was not current yet (a node that just started, before its first
    /// lighthouse brought the list): answered or sent once it is.
    #[serde(default)]
    pub held_handshakes: u64,
}

impl MeshCounters {
    pub(crate) fn count_out(&mut self, bytes: usize) {
        if bytes > 0 {
            self.packets_out += 1;
            self.bytes_out += bytes as u64;
        }
    }
}

/// Peers counted by how packets reach them ([`Mesh::peer_paths`](crate::Mesh::peer_paths)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerPaths {
    pub direct: usize,
    pub relayed: usize,
    pub probing: usize,
}
