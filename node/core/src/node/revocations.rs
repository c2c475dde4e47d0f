//! Revocations: catching up with each lighthouse's revocation list and
//! applying it (sessions with a revoked certificate end at once; our own
//! certificate revoked stops the node).

use super::*;

impl NodeCore {
    /// A lighthouse's registration answer names the version of its
    /// revocation list; when ours from it differs, ask for what we lack
    /// (everything, when it went back: its store was replaced).
    pub(super) fn catch_up_revocations(&mut self, lighthouse: PeerId, version: u32, now: Instant) {
        let Some(link) = self.link_for(lighthouse).map(|i| &self.links[i]) else {
            return;
        };
        if link.revocations == version {
            self.revocations_current(now);
            return;
        }
        let since = if version < link.revocations {
            0
        } else {
            link.revocations
        };
        let LinkState::Up { overlay_ip, .. } = link.state else {
            return;
        };
        let id = self.request_id();
        self.send_control(
            lighthouse,
            overlay_ip,
            &ControlMessage::RevocationsQuery { id, since },
            now,
        );
    }

    /// Revocations can only take trust away, so they are applied whichever
    /// lighthouse sent them: sessions with those certificates end now, and
    /// the certificates are refused from now on.
    pub(super) fn apply_revocations(
        &mut self,
        lighthouse: PeerId,
        since: u32,
        version: u32,
        entries: &[tern_shared::control::Revocation],
        complete: bool,
        now: Instant,
    ) {
        let list: Vec<_> = entries
            .iter()
            .map(|r| (r.fingerprint, r.not_after))
            .collect();
        if !self.revoked && list.iter().any(|(f, _)| self.own_fingerprints.contains(f)) {
            self.revoked = true;
            let name = self
                .mesh
                .peer_cert(lighthouse)
                .map_or_else(|| "a lighthouse".to_string(), |c| c.name().to_string());
            tracing::error!(lighthouse = %name, "this node's certificate is revoked: no peer will accept it any more");
            self.events.push(NodeEvent::Revoked { lighthouse: name });
        }
        let new = self.mesh.revoke(&list, now);
        let fingerprints: Vec<_> = list.iter().map(|(f, _)| *f).collect();
        self.firewall
            .end_flows_of(&fingerprints, EndReason::Revoked);
        if new > 0 {
            self.counters.revocations_learned += new as u64;
            tracing::info!(
                new,
                "certificates revoked by the lighthouse; their sessions are closed"
            );
        }
        self.drain_mesh_events(now);
        let Some(i) = self.link_for(lighthouse) else {
            return;
        };
        let link = &mut self.links[i];
        // A full list (from 0), or one contiguous with what we hold: we now
        // hold up to `version`.
        if since == 0 {
            link.revocations = version;
        } else if since <= link.revocations {
            link.revocations = link.revocations.max(version);
        }
        if complete {
            if link.revocations == version {
                self.revocations_current(now);
            }
        } else {
            let since = link.revocations;
            if let LinkState::Up { overlay_ip, .. } = link.state {
                let id = self.request_id();
                self.send_control(
                    lighthouse,
                    overlay_ip,
                    &ControlMessage::RevocationsQuery { id, since },
                    now,
                );
            }
        }
    }

    /// A lighthouse's revocation list is all here: sessions with nodes,
    /// held since the start, may open (lists from other lighthouses still
    /// apply as they come, since revocations only take trust away).
    pub(super) fn revocations_current(&mut self, now: Instant) {
        if self.mesh.holds_node_sessions() {
            tracing::debug!("revocation list current: sessions with nodes may open");
            self.mesh.release_node_sessions(now);
            self.drain_mesh_events(now);
        }
    }
}
