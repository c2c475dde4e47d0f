//! Direct paths: hole punching toward peers without one (through the
//! relay meanwhile: at once by default, else after `relay_after`), and
//! noticing a direct path that stopped working.

use super::*;

/// Hole punching: the first repeat comes this soon after the first attempt,
/// each next one twice as late, up to every PUNCH_INTERVAL_MAX while the peer
/// is relayed (the background search for a direct path).
pub(super) const PUNCH_INTERVAL_FIRST: Duration = Duration::from_millis(200);

pub(super) const PUNCH_INTERVAL_MAX: Duration = Duration::from_secs(5);

/// After this long on the relay, punch only every PUNCH_INTERVAL_LONG: longer
/// than a Linux NAT keeps an unanswered UDP mapping (30 s), so a mapping our
/// own punches spoiled (both sides' first packets crossing) can expire
/// between rounds instead of being refreshed forever.
pub(super) const PUNCH_PATIENCE: Duration = Duration::from_secs(30);

pub(super) const PUNCH_INTERVAL_LONG: Duration = Duration::from_secs(40);

/// A peer that never answered, directly or relayed, for this long is left to
/// the mesh's own retries.
pub(super) const ATTEMPT_GIVE_UP: Duration = Duration::from_secs(60);

/// The search for a direct path to one peer.
pub(super) struct Attempt {
    pub(super) started: Instant,
    /// The lighthouse that introduced us, preferred as the relay.
    pub(super) introducer: Option<SocketAddr>,
    pub(super) next_punch: Instant,
    pub(super) interval: Duration,
    /// `relay_after` has passed (or the relay was set at once): the turn
    /// to the relay is no longer a deadline (a relay that comes later is
    /// taken on the next tick).
    pub(super) relay_due: bool,
    /// Neither connected nor relayed when last looked at: the attempt is
    /// given up at `started + ATTEMPT_GIVE_UP`, which is a deadline only
    /// then (a relayed peer's attempt lives on, punching now and then, and
    /// a deadline in the past would keep the daemon awake).
    pub(super) may_give_up: bool,
}

/// WireGuard answers data within its keepalive time (10 s) and starts a
/// new handshake after 15 s without an answer: a peer silent this long is
/// not reached.
pub const RELAYED_SILENCE: Duration = Duration::from_secs(15);

impl NodeCore {
    /// How long a peer may go without a direct path before it is relayed.
    pub fn set_relay_after(&mut self, relay_after: Duration) {
        self.punch.relay_after = relay_after;
    }

    /// The direct path to `peer` went away: use the relay at once, ask the
    /// lighthouses where the peer is now (its address may have changed; the
    /// answer also makes the lighthouse tell the peer to punch toward us),
    /// and punch again.
    pub(super) fn direct_path_lost(&mut self, peer: PeerId, now: Instant) {
        self.punch.attempts.remove(&peer);
        self.start_attempt(peer, None, now);
        if let Some(a) = self.punch.attempts.get_mut(&peer) {
            a.started = now.checked_sub(self.punch.relay_after).unwrap_or(a.started);
        }
        if let Some(ip) = self.mesh.peer_cert(peer).map(|c| c.overlay_ip()) {
            self.send_query(ip, now);
        }
        self.drive_attempts(now);
    }

    /// Direct paths we keep sending on without hearing back: ask the peer
    /// (a control ping, answered by every daemon) and give the path up when
    /// the answer does not come either.
    pub(super) fn drive_direct_liveness(&mut self, now: Instant) {
        let silent = self.mesh.silent_direct_peers(now, PROBE_AFTER);
        self.punch.direct_probes.retain(|p, _| silent.contains(p));
        for peer in silent {
            match self.punch.direct_probes.get(&peer).copied() {
                None => {
                    self.punch.direct_probes.insert(peer, now);
                    if let Some(ip) = self.mesh.peer_cert(peer).map(|c| c.overlay_ip()) {
                        let id = self.request_id();
                        self.queries.pings.insert(
                            id,
                            PendingPing {
                                overlay_ip: ip,
                                sent: now,
                                report: false,
                            },
                        );
                        self.send_control(peer, ip, &ControlMessage::Ping { id }, now);
                    }
                }
                Some(sent) if now.saturating_duration_since(sent) >= GATEWAY_SILENCE => {
                    self.punch.direct_probes.remove(&peer);
                    self.mesh.drop_direct_path(peer);
                    self.drain_mesh_events(now);
                }
                Some(_) => {}
            }
        }
    }

    /// A peer with no direct path that has answered nothing for
    /// [`RELAYED_SILENCE`] while we send (its relay no longer introduces
    /// us — a lighthouse restarted —, or its process restarted and knows
    /// us no more) is asked of the lighthouses again, at most every
    /// [`RELAYED_SILENCE`]: the answer introduces the pair anew and has the
    /// peer punch (and learn us) again.
    pub(super) fn drive_relayed_liveness(&mut self, now: Instant) {
        let silent = self.mesh.silent_relayed_peers(now, RELAYED_SILENCE);
        self.punch
            .relayed_requeries
            .retain(|p, _| silent.contains(p));
        for peer in silent {
            let due = self
                .punch
                .relayed_requeries
                .get(&peer)
                .is_none_or(|t| now.saturating_duration_since(*t) >= RELAYED_SILENCE);
            if !due {
                continue;
            }
            self.punch.relayed_requeries.insert(peer, now);
            if let Some(ip) = self.mesh.peer_cert(peer).map(|c| c.overlay_ip()) {
                tracing::debug!(overlay_ip = %ip, "relayed peer silent; asking the lighthouses again");
                self.send_query(ip, now);
            }
        }
    }

    /// Starts (or keeps) the search for a direct path to `peer`.
    pub(super) fn start_attempt(
        &mut self,
        peer: PeerId,
        introducer: Option<SocketAddr>,
        now: Instant,
    ) {
        if matches!(
            self.mesh.peer_path(peer),
            Some((tern_mesh::PathKind::Direct, _))
        ) {
            return;
        }
        self.punch.attempts.entry(peer).or_insert(Attempt {
            started: now,
            introducer,
            next_punch: now + PUNCH_INTERVAL_FIRST,
            interval: PUNCH_INTERVAL_FIRST,
            relay_due: false,
            may_give_up: true,
        });
        // Relayed from the first packet (`relay_after` zero): the relay is
        // set before the handshake leaves, so the initiation goes through
        // it and to every candidate at once, and whichever way answers
        // first carries the session until a direct path is proven.
        if self.punch.relay_after.is_zero()
            && self.mesh.peer_path(peer).is_some_and(|(_, r)| r.is_none())
        {
            let relays = self.mesh.relays();
            let relay = self
                .assigned_relay(peer)
                .or(introducer)
                .filter(|r| relays.contains(r))
                .or(relays.first().copied());
            if relay.is_some() {
                self.mesh.set_relay(peer, relay);
            }
        }
    }

    /// Punch on schedule; after `relay_after` without a session, go through a
    /// relay; stop once a direct path carries the session.
    pub(super) fn drive_attempts(&mut self, now: Instant) {
        use tern_mesh::PathKind;
        if self.punch.attempts.is_empty() {
            return;
        }
        // Kept current by `refresh_relays` (every tick and on each
        // registration answer); the mesh owns the list.
        let relays = self.mesh.relays().to_vec();
        let peers: Vec<PeerId> = self.punch.attempts.keys().copied().collect();
        for peer in peers {
            let Some((kind, relay)) = self.mesh.peer_path(peer) else {
                self.punch.attempts.remove(&peer);
                continue;
            };
            let connected = self.mesh.is_connected(peer);
            if kind == PathKind::Direct && connected {
                self.punch.attempts.remove(&peer);
                continue;
            }
            let assigned = self.assigned_relay(peer);
            let Some(a) = self.punch.attempts.get_mut(&peer) else {
                continue;
            };
            a.may_give_up = !connected && relay.is_none();
            if a.may_give_up && now.saturating_duration_since(a.started) > ATTEMPT_GIVE_UP {
                self.punch.attempts.remove(&peer);
                continue;
            }
            // The relay in use went away: another one, or none.
            let usable = |r: &SocketAddr| relays.contains(r);
            a.relay_due |= now.saturating_duration_since(a.started) >= self.punch.relay_after;
            let wanted = if relay.is_some() || a.relay_due {
                relay
                    .filter(usable)
                    .or(assigned.filter(usable))
                    .or(a.introducer.filter(usable))
                    .or(relays.first().copied())
            } else {
                None
            };
            if wanted != relay && (wanted.is_some() || relay.is_some()) {
                self.mesh.set_relay(peer, wanted);
                if !connected && wanted.is_some() {
                    self.mesh.connect(peer, true);
                }
            }
            if a.next_punch <= now {
                a.interval = if now.saturating_duration_since(a.started) >= PUNCH_PATIENCE {
                    PUNCH_INTERVAL_LONG
                } else {
                    (a.interval * 2).min(PUNCH_INTERVAL_MAX)
                };
                a.next_punch = now + a.interval;
                self.mesh.punch(peer);
                // No session yet after a few rounds: the lighthouse's punch
                // request to the peer may have been lost. Asking again
                // makes the lighthouse send it again.
                if !connected && a.interval >= Duration::from_millis(1600) {
                    if let Some(ip) = self.mesh.peer_cert(peer).map(|c| c.overlay_ip()) {
                        self.send_query(ip, now);
                    }
                }
            }
        }
    }
}

/// The search for direct paths.
pub(super) struct Punching {
    /// Peers without a direct path yet: punching, then relaying after
    /// `relay_after` while punching goes on.
    pub(super) attempts: HashMap<PeerId, Attempt>,
    pub(super) relay_after: Duration,
    /// Direct paths asked whether they still work, and when.
    pub(super) direct_probes: HashMap<PeerId, Instant>,
    /// Silent peers without a direct path asked of the lighthouses again,
    /// and when.
    pub(super) relayed_requeries: HashMap<PeerId, Instant>,
}

impl Default for Punching {
    fn default() -> Punching {
        Punching {
            attempts: HashMap::new(),
            relay_after: tern_shared::config::DEFAULT_RELAY_AFTER,
            direct_probes: HashMap::new(),
            relayed_requeries: HashMap::new(),
        }
    }
}

impl Punching {
    /// When a punch is due, a peer without a direct path turns to the
    /// relay, an attempt is given up, or a direct path asked whether it
    /// still works is dropped. (Which direct paths fell silent is checked
    /// on the mesh's own tick.)
    pub(super) fn deadline(&self) -> Option<Instant> {
        let attempts = self.attempts.values().map(|a| {
            let relay_turn = (!a.relay_due).then(|| a.started + self.relay_after);
            let give_up = a.may_give_up.then(|| a.started + ATTEMPT_GIVE_UP);
            relay_turn
                .into_iter()
                .chain(give_up)
                .fold(a.next_punch, Instant::min)
        });
        let probes = self
            .direct_probes
            .values()
            .map(|sent| *sent + GATEWAY_SILENCE);
        attempts.chain(probes).min()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_next_punch_the_turn_to_the_relay_or_a_probe_is_the_deadline() {
        let now = Instant::now();
        let mut punch = Punching::default();
        assert_eq!(punch.deadline(), None, "nothing to do: no timer");
        punch.attempts.insert(
            PeerId(1),
            Attempt {
                started: now,
                introducer: None,
                next_punch: now + Duration::from_millis(200),
                interval: PUNCH_INTERVAL_FIRST,
                relay_due: false,
                may_give_up: true,
            },
        );
        punch.relay_after = Duration::from_secs(2);
        assert_eq!(punch.deadline(), Some(now + Duration::from_millis(200)));
        // Past its punches, the attempt still turns to the relay in time.
        if let Some(a) = punch.attempts.get_mut(&PeerId(1)) {
            a.next_punch = now + PUNCH_INTERVAL_LONG;
        }
        assert_eq!(punch.deadline(), Some(now + punch.relay_after));
        // Once the relay's turn has come it is no deadline any more (a
        // deadline in the past would keep the daemon awake): the next
        // punch is.
        if let Some(a) = punch.attempts.get_mut(&PeerId(1)) {
            a.relay_due = true;
        }
        assert_eq!(punch.deadline(), Some(now + PUNCH_INTERVAL_LONG));
        // Not connected, not relayed: given up in time, before a far punch.
        if let Some(a) = punch.attempts.get_mut(&PeerId(1)) {
            a.next_punch = now + 2 * ATTEMPT_GIVE_UP;
        }
        assert_eq!(punch.deadline(), Some(now + ATTEMPT_GIVE_UP));
        // Relayed (or connected) long after it started, it is not given up:
        // the next punch is the deadline, never one in the past.
        if let Some(a) = punch.attempts.get_mut(&PeerId(1)) {
            a.may_give_up = false;
            a.started = now.checked_sub(2 * ATTEMPT_GIVE_UP).unwrap_or(now);
            a.next_punch = now + PUNCH_INTERVAL_LONG;
        }
        assert_eq!(punch.deadline(), Some(now + PUNCH_INTERVAL_LONG));
        // A probe of a direct path that fell silent ends at GATEWAY_SILENCE.
        punch.direct_probes.insert(PeerId(2), now);
        assert_eq!(punch.deadline(), Some(now + GATEWAY_SILENCE));
    }
}
