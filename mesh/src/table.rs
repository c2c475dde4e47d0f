//! The peer table's upkeep: revocations, expired certificates, removing
//! and evicting peers, and session indexes.

use super::*;

impl Mesh {
    /// Revokes certificates (fingerprint, and when each would have expired):
    /// from now on they fail verification, and the sessions and remembered
    /// certificates they back are dropped at once. Returns how many were new.
    pub fn revoke(&mut self, entries: &[(Fingerprint, u64)], now: Instant) -> usize {
        self.last_now = now;
        let new = entries
            .iter()
            .filter(|(fp, not_after)| self.ca.revoke(*fp, *not_after))
            .count();
        if new == 0 {
            return 0;
        }
        let gone: Vec<u32> = self
            .peers
            .iter()
            .filter(|(_, p)| self.ca.revokes(&p.cert))
            .map(|(i, _)| *i)
            .collect();
        for idx in gone {
            self.counters.revoked_peers += 1;
            self.remove_index(idx, RemoveReason::Revoked);
        }
        let ca = &self.ca;
        self.known_certs.retain(|_, k| !ca.revokes(&k.cert));
        new
    }

    /// The once-a-second part of certificate expiry: revocations of
    /// expired certificates are dropped, and remembered certificates that
    /// expired. Peers' certificates are checked as their timers run.
    pub(crate) fn expire_certs(&mut self, now: Instant) {
        let unix = self.unix_time(now);
        self.ca.prune_revoked(unix);
        self.known_certs.retain(|_, k| k.cert.not_after() >= unix);
    }

    pub(crate) fn remove_index(&mut self, idx: u32, reason: RemoveReason) {
        let Some(p) = self.peers.remove(&idx) else {
            return;
        };
        // Its place in the timers' ring goes to the last peer's.
        if self.timer_ring.get(p.ring_pos) == Some(&idx) {
            self.timer_ring.swap_remove(p.ring_pos);
            if let Some(&moved) = self.timer_ring.get(p.ring_pos) {
                if let Some(m) = self.peers.get_mut(&moved) {
                    m.ring_pos = p.ring_pos;
                }
            }
        }
        let ip = p.cert.overlay_ip();
        if self.by_overlay.get(&ip) == Some(&idx) {
            self.by_overlay.remove(&ip);
        }
        if self.by_key.get(&p.cert.public_key()) == Some(&idx) {
            self.by_key.remove(&p.cert.public_key());
        }
        tracing::info!(peer = p.cert.name(), overlay_ip = %ip, %reason, "peer removed");
        self.events.push_back(MeshEvent::PeerRemoved {
            peer: p.id,
            overlay_ip: ip,
            reason,
        });
    }

    pub(crate) fn evict_one_idle_peer(&mut self) {
        if let Some(idx) = self
            .peers
            .iter()
            .filter(|(_, p)| p.role == PeerRole::Node)
            .min_by_key(|(_, p)| p.last_data)
            .map(|(i, _)| *i)
        {
            self.remove_index(idx, RemoveReason::Idle);
        }
    }

    pub(crate) fn allocate_index(&mut self) -> Option<u32> {
        for _ in 0..0x0100_0000u32 {
            let idx = self.next_index;
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if !self.peers.contains_key(&idx) {
                return Some(idx);
            }
        }
        None
    }
}
