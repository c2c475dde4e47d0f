//! What arrives on the UDP socket: WireGuard messages (handshakes answered
//! only for keys in certificates this engine verified; data decrypted and
//! its inner source checked), hellos carrying certificates, and the
//! handshakes this engine starts.

use super::*;

impl Mesh {
    pub(crate) fn handle_wireguard<'b>(
        &mut self,
        from: Via,
        datagram: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> Received<'b> {
        let idx = if datagram[0] == 1 {
            match self.accept_initiation(from, datagram, now) {
                Some(idx) => idx,
                None => return Received::Nothing,
            }
        } else {
            if datagram[0] == 2 && !self.admit_response(from, datagram, now) {
                return Received::Nothing;
            }
            // Our session index: bytes 8..12 of a handshake response (after
            // the sender's), bytes 4..8 of a cookie reply or transport packet.
            let at = if datagram[0] == 2 { 8 } else { 4 };
            let Some(receiver) = datagram.get(at..at + 4) else {
                self.counters.wireguard_errors += 1;
                return Received::Nothing;
            };
            let receiver = u32::from_le_bytes([receiver[0], receiver[1], receiver[2], receiver[3]]);
            let idx = receiver >> 8;
            if !self.peers.contains_key(&idx) {
                self.counters.unknown_session_index += 1;
                tracing::trace!(from = ?from, "no session for index");
                return Received::Nothing;
            }
            idx
        };
        self.decapsulate(idx, from, datagram, out, now)
    }

    /// Counts an answer to our handshake against the handshake rate limit
    /// (the sessions' own limiter only checks MACs): under load, only with
    /// a valid cookie MAC, else a cookie reply goes back.
    pub(crate) fn admit_response(&mut self, via: Via, datagram: &[u8], now: Instant) -> bool {
        let mut cookie = [0u8; 64];
        match self
            .rate_limiter
            .verify_packet(Some(via.addr().ip()), datagram, &mut cookie)
        {
            Ok(_) => true,
            Err(TunnResult::WriteToNetwork(reply)) => {
                self.send_cookie_reply(via, reply, now);
                false
            }
            Err(_) => {
                self.counters.wireguard_errors += 1;
                false
            }
        }
    }

    /// Under load: a cookie reply goes back while the source's and
    /// everyone's budgets allow; past them the message is dropped
    /// unanswered (its sender retries as after a loss).
    fn send_cookie_reply(&mut self, via: Via, reply: &[u8], now: Instant) {
        if self.cookie_admission.admit(via.addr(), now) {
            self.counters.cookie_replies += 1;
            self.transmits.push_back(via.transmit(reply));
        } else {
            self.counters.cookie_replies_withheld += 1;
        }
    }

    /// Checks a handshake initiation's MACs and rate limit, reveals the
    /// initiator's static key, and finds (or creates) the peer whose verified
    /// certificate carries that key. Unknown keys get a hello asking for the
    /// certificate, never a handshake response.
    pub(crate) fn accept_initiation(
        &mut self,
        via: Via,
        datagram: &[u8],
        now: Instant,
    ) -> Option<u32> {
        let from = via.addr();
        let mut cookie = [0u8; 64];
        let init = match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(Packet::HandshakeInit(init)) => init,
            Ok(_) => return None,
            Err(TunnResult::WriteToNetwork(reply)) => {
                self.send_cookie_reply(via, reply, now);
                return None;
            }
            Err(_) => {
                self.counters.wireguard_errors += 1;
                return None;
            }
        };
        let half = match parse_handshake_anon(&self.secret, &self.public, &init) {
            Ok(half) => half,
            Err(e) => {
                self.counters.wireguard_errors += 1;
                tracing::trace!(%from, error = ?e, "handshake initiation did not open");
                return None;
            }
        };
        let key = half.peer_static_public;
        if self.hold_initiation(key, via, datagram) {
            return None;
        }
        if let Some(&idx) = self.by_key.get(&key) {
            return Some(idx);
        }
        if let Via::Relay { relay, peer } = via {
            // Through a relay there is no hello: the certificate must have
            // come from a lighthouse (a query answer or a punch request).
            let unix = self.unix_time(now);
            let cert = self
                .known_certs
                .get(&key)
                .filter(|k| k.cert.not_after() >= unix && k.cert.overlay_ip() == peer)
                .map(|k| k.cert.clone());
            let Some(cert) = cert else {
                self.counters.unknown_handshake_keys += 1;
                tracing::debug!(%relay, %peer, "relayed handshake from a key with no verified certificate for that address; asking the lighthouses");
                self.events
                    .push_back(MeshEvent::UnknownRelayedPeer { overlay_ip: peer });
                return None;
            };
            let idx = self.add_peer(cert, &[], PeerRole::Node, now)?.0;
            if let Some(p) = self.peers.get_mut(&idx) {
                p.relay = Some(relay);
            }
            return Some(idx);
        }
        let unix = self.unix_time(now);
        let known = self
            .known_certs
            .get(&key)
            .filter(|k| k.cert.not_after() >= unix)
            .map(|k| k.cert.clone());
        match known {
            Some(cert) => self
                .add_peer(cert, &[from], PeerRole::Node, now)
                .map(|p| p.0),
            None => {
                self.counters.unknown_handshake_keys += 1;
                tracing::debug!(%from, "handshake from a key with no verified certificate; asking for it");
                if self.hello_admission.admit(from, now) {
                    self.send_hello(from, true);
                } else {
                    self.counters.rate_limited += 1;
                }
                None
            }
        }
    }

    pub(crate) fn decapsulate<'b>(
        &mut self,
        idx: u32,
        via: Via,
        datagram: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> Received<'b> {
        let Some(p) = self.peers.get_mut(&idx) else {
            return Received::Nothing;
        };
        if let Via::Relay { peer, .. } = via {
            if peer != p.cert.overlay_ip() {
                // The relay's label must name the node whose session this is.
                self.counters.relay_drops += 1;
                return Received::Nothing;
            }
        }
        let result = p.tunn.decapsulate(Some(via.addr().ip()), datagram, out);
        let mut direct_lost = false;
        if !matches!(result, TunnResult::Err(_)) {
            p.last_rx = Some(now);
            // A response accepted (we initiated), or an initiation answered
            // (a session on our side).
            if datagram.first() == Some(&2)
                || (datagram.first() == Some(&1)
                    && matches!(&result, TunnResult::WriteToNetwork(r) if r.first() == Some(&2)))
            {
                self.counters.handshakes += 1;
            }
            if datagram.first() == Some(&2) {
                if let Some(sent) = p.init_sent.take() {
                    p.handshake_rtt = Some(now.saturating_duration_since(sent));
                }
            }
            direct_lost = follow_path(p, via, now);
            // Over a confirmed session (a transport packet came; a
            // responder must not start a handshake here).
            if p.announce_direct && datagram.first() == Some(&4) {
                p.announce_direct = false;
                self.transmits
                    .extend(direct_keepalive(p, &mut self.scratch));
            }
        }
        if direct_lost {
            self.events
                .push_back(MeshEvent::DirectPathLost { peer: PeerId(idx) });
        }

        match result {
            TunnResult::Done => {
                self.note_connected(idx);
                Received::Nothing
            }
            TunnResult::Err(WireGuardError::WrongTai64nTimestamp)
                if datagram.first() == Some(&1) =>
            {
                self.counters.repeated_handshakes += 1;
                tracing::trace!(
                    peer = p.cert.name(),
                    "repeated handshake initiation dropped"
                );
                Received::Nothing
            }
            // Both sides initiated at once (we looked the peer up while the
            // lighthouse asked it to punch toward us): answering its
            // initiation and sending what waited made boringtun start a
            // new handshake, so the answer to our first one no longer
            // matches. Expected when peers meet, and the newer handshake
            // completes: not an error.
            TunnResult::Err(WireGuardError::UnexpectedPacket | WireGuardError::WrongIndex)
                if datagram.first() == Some(&2) =>
            {
                self.counters.crossed_handshakes += 1;
                tracing::trace!(
                    peer = p.cert.name(),
                    "answer to a handshake that a crossing one replaced; dropped"
                );
                Received::Nothing
            }
            TunnResult::Err(e) => {
                self.counters.wireguard_errors += 1;
                tracing::trace!(peer = p.cert.name(), error = ?e, "decapsulate failed");
                Received::Nothing
            }
            TunnResult::WriteToNetwork(reply) => {
                self.transmits.push_back(via.transmit(reply));
                self.flush_queued(idx);
                self.note_connected(idx);
                Received::Nothing
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                p.last_data = now;
                let allowed = src == p.cert.overlay_ip()
                    || p.cert
                        .subnets()
                        .iter()
                        .any(|n| n.contains(&IpAddr::V4(src)));
                if !allowed {
                    p.spoofed_source_drops += 1;
                    self.counters.spoofed_source_drops += 1;
                    tracing::debug!(peer = p.cert.name(), inner_source = %src, "dropped packet: inner source not in the peer's certificate");
                    return Received::Nothing;
                }
                self.counters.packets_in += 1;
                self.counters.bytes_in += packet.len() as u64;
                let connected = p.connected;
                if !connected {
                    self.note_connected(idx);
                }
                Received::Packet {
                    peer: PeerId(idx),
                    packet,
                }
            }
            TunnResult::WriteToTunnelV6(..) => {
                self.counters.non_ipv4_drops += 1;
                Received::Nothing
            }
        }
    }

    /// After a handshake completes, boringtun releases the packets it queued;
    /// they go to the endpoint that just answered.
    pub(crate) fn flush_queued(&mut self, idx: u32) {
        let Some(p) = self.peers.get_mut(&idx) else {
            return;
        };
        let Some(via) = route(p) else {
            return;
        };
        for _ in 0..512 {
            match p.tunn.decapsulate(None, &[], &mut self.scratch) {
                TunnResult::WriteToNetwork(bytes) => self.transmits.push_back(via.transmit(bytes)),
                _ => break,
            }
        }
    }

    pub(crate) fn note_connected(&mut self, idx: u32) {
        if let Some(p) = self.peers.get_mut(&idx) {
            if !p.connected && p.tunn.time_since_last_handshake().is_some() {
                p.connected = true;
                tracing::info!(peer = p.cert.name(), overlay_ip = %p.cert.overlay_ip(), endpoint = %shown_endpoint(p), "tunnel up");
                self.events
                    .push_back(MeshEvent::PeerConnected { peer: p.id });
            }
        }
    }

    pub(crate) fn handle_hello(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        let hello = match Hello::decode(datagram) {
            Ok(h) => h,
            Err(e) => {
                self.counters.malformed_hellos += 1;
                tracing::trace!(%from, error = %e, "malformed hello");
                return;
            }
        };
        // A certificate verified already (a peer's, or remembered from an
        // earlier hello) is not verified again: a node sends its hello
        // before every handshake (the second step of its join, each
        // re-key). Answering still takes a token, whatever the
        // certificate: the bucket also bounds what we send to a source
        // nobody verified.
        let known = self.verified_already(hello.cert, now);
        if (hello.wants_reply || known.is_none()) && !self.hello_admission.admit(from, now) {
            self.counters.rate_limited += 1;
            return;
        }
        let cert = match known {
            Some(c) => c,
            None => match self.ca.verify_bytes(hello.cert, self.unix_time(now)) {
                Ok(c) => c,
                Err(e) => {
                    self.counters.rejected_certs += 1;
                    tracing::debug!(%from, reason = %e, "hello with a certificate we do not accept");
                    return;
                }
            },
        };
        let key = cert.public_key();
        if key == self.public.to_bytes() {
            return;
        }
        if hello.wants_reply {
            self.send_hello(from, false);
        }
        if let Some(&idx) = self.by_key.get(&key) {
            self.refresh_cert(idx, &cert);
        }
        match self.by_key.get(&key).copied() {
            Some(idx) if hello.wants_reply => {
                // The peer does not know our certificate: it restarted, or our
                // handshake reached it before our hello did. Handshake again
                // now rather than at boringtun's next retry, seconds away.
                let Some(p) = self.peers.get_mut(&idx) else {
                    return;
                };
                if !p.connected && !p.candidates.contains(&from) && p.candidates.len() < 16 {
                    p.candidates.push(from);
                }
                let recent = p
                    .last_forced_handshake
                    .is_some_and(|t| now.saturating_duration_since(t) < FORCED_HANDSHAKE_INTERVAL);
                if !recent {
                    p.last_forced_handshake = Some(now);
                    self.connect(PeerId(idx), true);
                }
            }
            Some(_) => {}
            None => self.remember(cert.clone(), now),
        }
        self.events.push_back(MeshEvent::HelloCert { from, cert });
    }

    /// A peer sent (in a hello, verified) another certificate for the key
    /// we know it by: it reloaded or renewed its certificate. A newer one
    /// (later `not_before`, else later `not_after`) for the same overlay
    /// address replaces ours; an older one (a replay) or one for another
    /// address changes nothing.
    fn refresh_cert(&mut self, idx: u32, cert: &VerifiedCert) {
        let Some(p) = self.peers.get_mut(&idx) else {
            return;
        };
        if p.cert.encoded() == cert.encoded() {
            return;
        }
        let age = |c: &VerifiedCert| (c.cert().body.not_before, c.cert().body.not_after);
        if cert.overlay_ip() != p.cert.overlay_ip() || age(cert) <= age(&p.cert) {
            tracing::debug!(peer = p.cert.name(), "hello with an older or re-addressed certificate for a known key; kept the one we hold");
            return;
        }
        tracing::info!(
            peer = p.cert.name(),
            until = %tern_shared::cert::format_unix_time(cert.not_after()),
            "peer's certificate renewed"
        );
        p.cert = cert.clone();
    }

    /// The certificate with exactly these bytes, if this mesh verified it
    /// before and it is still good: a peer's, or one remembered.
    fn verified_already(&self, bytes: &[u8], now: Instant) -> Option<VerifiedCert> {
        let key = Cert::decode(bytes).ok()?.body.public_key;
        let cert = match self.by_key.get(&key) {
            Some(idx) => &self.peers.get(idx)?.cert,
            None => &self.known_certs.get(&key)?.cert,
        };
        let good = cert.encoded() == bytes
            && cert.not_after() >= self.unix_time(now)
            && !self.ca.revokes(cert);
        good.then(|| cert.clone())
    }

    pub(crate) fn remember(&mut self, cert: VerifiedCert, now: Instant) {
        let key = cert.public_key();
        if self.by_key.contains_key(&key) {
            return;
        }
        if self.known_certs.len() >= self.settings.max_known_certs
            && !self.known_certs.contains_key(&key)
        {
            // Bounded: forget the oldest. Rare (only when the table is full).
            if let Some(oldest) = self
                .known_certs
                .iter()
                .min_by_key(|(_, k)| k.learned)
                .map(|(k, _)| *k)
            {
                self.known_certs.remove(&oldest);
            }
        }
        self.known_certs
            .insert(key, KnownCert { cert, learned: now });
    }

    pub(crate) fn send_handshake(&mut self, idx: u32, init: &[u8]) {
        let now = self.last_now;
        if self.withhold_handshake(idx) {
            return;
        }
        let Some(p) = self.peers.get_mut(&idx) else {
            return;
        };
        p.last_init = Some(init.to_vec());
        p.init_sent = Some(now);
        let p = &**p;
        // Through the relay last: where a direct path works, its copy
        // leaves first, and usually arrives first, so the peer answers
        // that way and the session starts direct.
        let relayed = p.relay.map(|relay| {
            Via::Relay {
                relay,
                peer: p.cert.overlay_ip(),
            }
            .transmit(init)
        });
        let mut targets: Vec<SocketAddr> = p.endpoint.into_iter().collect();
        for c in &p.candidates {
            if !targets.contains(c) {
                targets.push(*c);
            }
        }
        for dst in targets {
            // Our certificate goes first so the responder can verify it
            // before the handshake names our key.
            self.transmits.push_back(Transmit {
                dst,
                payload: self.own_hello.clone(),
            });
            self.transmits.push_back(Transmit {
                dst,
                payload: init.to_vec(),
            });
        }
        self.transmits.extend(relayed);
    }
}

/// Where an authenticated packet came from tells where the peer is: a
/// direct packet fixes (or moves) its endpoint, leaving the relay; a relayed
/// one, with the direct path quiet, means the peer reaches us only through
/// the relay now. True when the direct path was dropped.
fn follow_path(p: &mut Peer, via: Via, now: Instant) -> bool {
    let mut direct_lost = false;
    if let Via::Direct(_) = via {
        p.last_direct_rx = Some(now);
    }
    // A relayed packet overtaken by direct ones (the path just moved) does
    // not count.
    if let Via::Relay { .. } = via {
        let direct_quiet = p
            .last_direct_rx
            .is_none_or(|t| now.saturating_duration_since(t) >= DIRECT_PATH_STALE);
        if p.endpoint.is_some() && direct_quiet {
            tracing::info!(peer = p.cert.name(), endpoint = %or_none(p.endpoint), "peer now comes through the relay; direct path dropped");
            p.endpoint = None;
            direct_lost = true;
        }
    }
    match via {
        Via::Direct(from) if p.endpoint != Some(from) => {
            // Authenticated by the session: the peer is reachable here
            // (roaming, or a direct path found while relayed).
            match p.endpoint {
                Some(old) => {
                    tracing::info!(peer = p.cert.name(), %old, new = %from, "peer endpoint moved")
                }
                None if p.relay.is_some() => {
                    tracing::info!(peer = p.cert.name(), endpoint = %from, "direct path found; leaving the relay");
                    p.announce_direct = true;
                }
                None => {}
            }
            p.endpoint = Some(from);
        }
        Via::Relay { relay, .. } if p.relay != Some(relay) => p.relay = Some(relay),
        _ => {}
    }
    direct_lost
}

/// One keepalive over the peer's direct path, which it takes as proof of
/// that path (see `Peer::announce_direct`).
fn direct_keepalive(p: &mut Peer, scratch: &mut [u8]) -> Option<Transmit> {
    let dst = p.endpoint?;
    match p.tunn.encapsulate(&[], scratch) {
        TunnResult::WriteToNetwork(k) if k.first() == Some(&4) => Some(Transmit {
            dst,
            payload: k.to_vec(),
        }),
        _ => None,
    }
}
