//! Lighthouse links: discovering each configured lighthouse (hellos with
//! backoff until it answers with a lighthouse certificate), registering
//! with it, noticing it restarted or went away, and the relays it offers.

use super::backoff::Backoff;
use super::*;

/// How often a node re-registers with each lighthouse.
pub const REGISTER_INTERVAL: Duration = Duration::from_secs(4);

/// A lighthouse that acknowledged nothing for this long is presumed restarted
/// or gone: its session is dropped and it is discovered anew.
pub const LIGHTHOUSE_DEAD_AFTER: Duration = Duration::from_secs(9);

/// Hellos to a lighthouse that has not answered are sent again after this
/// (a mesh starting at once: the lighthouse may not listen yet) ...
pub(super) const HELLO_RETRY_FIRST: Duration = Duration::from_millis(50);
/// ... then twice as late each time, up to this.
pub(super) const HELLO_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A lighthouse this node was configured with.
#[derive(Debug, Clone)]
pub struct LighthouseTarget {
    pub endpoint: SocketAddr,
    /// Accept only a lighthouse certificate with this name.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LighthouseStatus {
    pub endpoint: SocketAddr,
    pub name: Option<String>,
    pub registered: bool,
    /// Our address as this lighthouse sees it.
    pub observed: Option<SocketAddr>,
    /// It relays for us when a peer has no direct path.
    pub relay: bool,
    /// How it is reached: `udp`, or `tcp HOST:PORT [via proxy URL]` (the
    /// node's shell says; the core does not know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

pub(super) struct LighthouseLink {
    pub(super) target: LighthouseTarget,
    pub(super) state: LinkState,
    pub(super) observed: Option<SocketAddr>,
    /// The lighthouse said it relays (in its registration answer).
    pub(super) relay: bool,
    /// The version of this lighthouse's revocation list we hold.
    pub(super) revocations: u32,
}

pub(super) enum LinkState {
    /// Sending hellos until the lighthouse answers with an acceptable certificate.
    Discovering {
        next_hello: Instant,
        backoff: Backoff,
    },
    /// Session set up (or being set up); registering periodically.
    Up {
        peer: PeerId,
        overlay_ip: Ipv4Addr,
        last_ack: Instant,
        acked: bool,
        next_register: Instant,
    },
}

impl LinkState {
    /// Looking for the lighthouse from `now` on: a hello at once, then
    /// again on the fast first schedule.
    pub(super) fn discovering(now: Instant) -> LinkState {
        LinkState::Discovering {
            next_hello: now,
            backoff: Backoff::new(HELLO_RETRY_FIRST, HELLO_BACKOFF_MAX),
        }
    }
}

impl NodeCore {
    /// The lighthouses that acknowledged our registration: their peer and
    /// overlay address.
    pub(super) fn registered_lighthouses(&self) -> Vec<(PeerId, Ipv4Addr)> {
        self.links
            .iter()
            .filter_map(|l| match l.state {
                LinkState::Up {
                    peer,
                    overlay_ip,
                    acked: true,
                    ..
                } => Some((peer, overlay_ip)),
                _ => None,
            })
            .collect()
    }

    /// When the lighthouse at `endpoint` last acknowledged a registration
    /// (none while it is being looked for).
    pub fn lighthouse_last_ack(&self, endpoint: SocketAddr) -> Option<Instant> {
        self.links.iter().find_map(|l| match l.state {
            LinkState::Up {
                last_ack,
                acked: true,
                ..
            } if l.target.endpoint == endpoint => Some(last_ack),
            _ => None,
        })
    }

    /// The way to the lighthouse at `endpoint` changed (a TCP link opened
    /// or closed): say hello, or register, at once, so that it learns
    /// where this node is now without waiting for the next interval.
    pub fn lighthouse_path_changed(&mut self, endpoint: SocketAddr, now: Instant) {
        let Some(i) = self
            .links
            .iter()
            .position(|l| l.target.endpoint == endpoint)
        else {
            return;
        };
        match &mut self.links[i].state {
            LinkState::Discovering { .. } => self.links[i].state = LinkState::discovering(now),
            LinkState::Up { next_register, .. } => *next_register = now,
        }
        self.drive_link(i, now);
    }

    pub(super) fn connected_lighthouses(&self) -> usize {
        self.links
            .iter()
            .filter(|l| matches!(l.state, LinkState::Up { .. }))
            .count()
    }

    pub(super) fn drive_link(&mut self, i: usize, now: Instant) {
        match self.links[i].state {
            LinkState::Discovering {
                next_hello,
                mut backoff,
            } => {
                if next_hello <= now {
                    let endpoint = self.links[i].target.endpoint;
                    tracing::debug!(%endpoint, "hello to lighthouse");
                    self.mesh.send_hello(endpoint, true);
                    self.links[i].state = LinkState::Discovering {
                        next_hello: now + backoff.step(&mut self.jitter),
                        backoff,
                    };
                }
            }
            LinkState::Up {
                peer,
                overlay_ip,
                last_ack,
                next_register,
                ..
            } => {
                if now.saturating_duration_since(last_ack) >= LIGHTHOUSE_DEAD_AFTER {
                    tracing::warn!(endpoint = %self.links[i].target.endpoint, "lighthouse stopped answering; reconnecting");
                    self.links[i].state = LinkState::discovering(now);
                    self.mesh.remove_peer(peer);
                    self.drain_mesh_events(now);
                    return;
                }
                if next_register <= now {
                    if let LinkState::Up { next_register, .. } = &mut self.links[i].state {
                        *next_register = now + REGISTER_INTERVAL;
                    }
                    let id = self.request_id();
                    let local = self.local_endpoints.clone();
                    let routes = self.gateway_subnets.clone();
                    self.send_control(
                        peer,
                        overlay_ip,
                        &ControlMessage::Register { id, local, routes },
                        now,
                    );
                    if let Some(offer) = self.relay_offer() {
                        self.send_control(peer, overlay_ip, &offer, now);
                    }
                }
            }
        }
    }

    /// A hello answered from a configured lighthouse endpoint: accept it as
    /// that lighthouse only if its certificate carries the lighthouse group
    /// (and the pinned name, when the config gives one).
    pub(super) fn maybe_lighthouse(&mut self, from: SocketAddr, cert: VerifiedCert, now: Instant) {
        let Some(i) = self.links.iter().position(|l| {
            l.target.endpoint == from && matches!(l.state, LinkState::Discovering { .. })
        }) else {
            return;
        };
        if !cert.has_group(LIGHTHOUSE_GROUP) {
            tracing::warn!(endpoint = %from, name = cert.name(), "the node at a lighthouse endpoint has no '{LIGHTHOUSE_GROUP}' group in its certificate; not using it");
            return;
        }
        if let Some(pin) = &self.links[i].target.name {
            if pin != cert.name() {
                tracing::warn!(endpoint = %from, expected = %pin, got = cert.name(), "lighthouse certificate name does not match the pinned name");
                return;
            }
        }
        let overlay_ip = cert.overlay_ip();
        let name = cert.name().to_string();
        let Some(peer) = self.mesh.add_peer(cert, &[from], PeerRole::Lighthouse, now) else {
            return;
        };
        tracing::info!(endpoint = %from, lighthouse = %name, %overlay_ip, "lighthouse found");
        self.links[i].state = LinkState::Up {
            peer,
            overlay_ip,
            last_ack: now,
            acked: false,
            next_register: now,
        };
        self.drive_link(i, now);
        // Lookups that waited for a lighthouse can go now.
        let waiting: Vec<Ipv4Addr> = self.lookups.keys().copied().collect();
        for ip in waiting {
            let id = self.request_id();
            self.send_control(
                peer,
                overlay_ip,
                &ControlMessage::Query { id, overlay_ip: ip },
                now,
            );
        }
    }

    /// The link to the lighthouse whose session is `peer`.
    pub(super) fn link_for(&self, peer: PeerId) -> Option<usize> {
        self.links
            .iter()
            .position(|l| matches!(l.state, LinkState::Up { peer: p, .. } if p == peer))
    }

    /// The underlay endpoint of the lighthouse whose session is `peer`.
    pub(super) fn lighthouse_endpoint(&self, peer: PeerId) -> Option<SocketAddr> {
        self.link_for(peer).map(|i| self.links[i].target.endpoint)
    }

    /// The relays we use now: the lighthouses that relay for us
    /// (registered, and said so), then the relay nodes they named for our
    /// peers.
    pub(super) fn relays(&self) -> Vec<SocketAddr> {
        let mut relays: Vec<SocketAddr> = self
            .links
            .iter()
            .filter(|l| l.relay && matches!(l.state, LinkState::Up { acked: true, .. }))
            .map(|l| l.target.endpoint)
            .collect();
        if self.registered_lighthouses().is_empty() {
            // Relay nodes are named by lighthouses: with none registered,
            // none is used either.
            return relays;
        }
        for r in self.assigned_relay_addrs() {
            if !relays.contains(&r) {
                relays.push(r);
            }
        }
        relays
    }

    pub(super) fn refresh_relays(&mut self) {
        let relays = self.relays();
        self.mesh.set_relays(relays);
    }
}

impl NodeCore {
    /// When a link next needs the clock: a hello to send, a registration
    /// due, or a lighthouse presumed gone.
    pub(super) fn links_deadline(&self) -> Option<Instant> {
        self.links
            .iter()
            .map(|l| match l.state {
                LinkState::Discovering { next_hello, .. } => next_hello,
                LinkState::Up {
                    last_ack,
                    next_register,
                    ..
                } => next_register.min(last_ack + LIGHTHOUSE_DEAD_AFTER),
            })
            .min()
    }
}
