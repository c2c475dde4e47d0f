//! The node's sans-IO core: the mesh plus what a node adds to it — its
//! lighthouse links (discover, register, detect a restart), lookups of
//! unknown overlay addresses with the packets waiting on them, and the split
//! between control traffic and packets for the TUN device.
//!
//! Drive it like [`Mesh`]: feed UDP datagrams to [`NodeCore::handle_datagram`],
//! TUN packets to [`NodeCore::handle_tun_packet`], call
//! [`NodeCore::handle_timeout`] by [`NodeCore::poll_timeout`], and drain
//! [`NodeCore::poll_transmit`] after each.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use tern_shared::cert::{VerifiedCert, LIGHTHOUSE_GROUP};
use tern_shared::control::{
    AdvertisedRoute, ControlMessage, PeerInfo, PolicyAnswer, RunnerInfo, RunnerLoad,
    RunnerSelector, CONTROL_PORT, MAX_ADVERTISED, MAX_ENDPOINTS, MAX_ROUTES_IN_REPLY,
};
use tern_shared::policy::{FirewallConfig, RouteConfig};

use super::firewall::{
    Caller, EndReason, Firewall, FirewallStatus, PolicyDecision, Unknown, Verdict, RECORD_QUEUE,
};
use tern_mesh::{Mesh, MeshCounters, MeshEvent, PeerId, PeerRole, PeerStatus, Received, Transmit};
use tern_shared::packet::{build_udp_ipv4, ipv4_addrs, parse_udp_ipv4};
use tern_shared::show::list;

mod backoff;
mod flowlog;
pub use flowlog::{FlowLogSettings, FlowLogStatus, FILE_QUEUE};
mod links;
mod lookups;
mod names;
mod offers;
mod punch;
mod queries;
mod relaying;
mod renew;
pub use renew::{renewal_due, RENEW_RETRY};
mod revocations;
mod routes;
mod serving;
mod zones;

pub use self::{links::*, names::*, offers::ServicesResult, queries::*, routes::*, serving::*};
use self::{lookups::*, punch::*};

/// Counters the node adds to the mesh's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeCounters {
    pub no_route_drops: u64,
    pub lookup_timeouts: u64,
    /// Lookups every connected lighthouse answered with "not registered"
    /// (pings to it are answered at once; packets wait for the retries).
    pub lookups_unknown: u64,
    pub lookup_queue_drops: u64,
    pub lying_lighthouse_answers: u64,
    pub not_for_us_drops: u64,
    pub bad_control_messages: u64,
    /// Packets for a routed subnet dropped because no gateway for it came
    /// within 15 s (or too many waited, or the route went).
    pub no_gateway_drops: u64,
    /// Gateways whose certificates do not authorize what they advertised.
    pub unauthorized_gateways: u64,
    pub gateway_failovers: u64,
    /// Revoked certificates learned from lighthouses.
    pub revocations_learned: u64,
    /// Relay requests to a node that does not relay (`[relay]` off).
    #[serde(default)]
    pub relay_requests_refused: u64,
    /// Peers that said they were leaving (`tern down`, a stopping
    /// daemon), forgotten at once.
    #[serde(default)]
    pub peers_left: u64,
}

/// What the core tells its shell besides datagrams to send: one queue,
/// drained with [`NodeCore::poll_event`] after every call.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// A packet the node answers toward its own kernel (a reject): for the
    /// TUN device, or the userspace stack.
    TunWrite(Vec<u8>),
    /// Send this subnet into the TUN device (a kernel route), unless the
    /// host already routes it another way: the shell never replaces a
    /// route it did not make.
    AddRoute(Ipv4Net),
    /// Remove the kernel route this node made for the subnet.
    RemoveRoute(Ipv4Net),
    /// A lighthouse says this node's own certificate (or its issuer) is
    /// revoked: no peer will talk to it any more; the shell stops with
    /// its own exit code.
    Revoked { lighthouse: String },
    /// The answer to [`NodeCore::ping`].
    Ping(PingResult),
    /// The answer to [`NodeCore::ask_policy`].
    Policy(PolicyResult),
    /// The answer to [`NodeCore::find_runners`].
    Runners(RunnersResult),
    /// The answer to [`NodeCore::find_services`].
    Services(ServicesResult),
    /// The answer to a question [`NodeCore::resolve`] left pending.
    Dns(DnsResult),
    /// As a gateway: ask the resolver for this zone, then call
    /// [`NodeCore::dns_forwarded`].
    DnsForward(DnsForward),
    /// `[pki] renew`: a lighthouse renewed this node's certificate (checked:
    /// the same key, name, address, groups, subnets and zones, a later expiry).
    /// The shell writes it where `[pki] cert` says, swaps it in, and calls
    /// [`NodeCore::renewal_done`].
    Renewed(VerifiedCert),
}

/// The queue behind [`NodeCore::poll_event`].
#[derive(Debug, Default)]
struct Events(VecDeque<NodeEvent>);

impl Events {
    fn push(&mut self, event: NodeEvent) {
        self.0.push_back(event);
    }
    fn tun_write(&mut self, packet: Vec<u8>) {
        self.push(NodeEvent::TunWrite(packet));
    }
    fn ping(&mut self, result: PingResult) {
        self.push(NodeEvent::Ping(result));
    }
    fn policy(&mut self, result: PolicyResult) {
        self.push(NodeEvent::Policy(result));
    }
    fn runners(&mut self, result: RunnersResult) {
        self.push(NodeEvent::Runners(result));
    }
}

/// Why the core cannot do what its shell asked; each message says what
/// would do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("{0} is this node")]
    ThisNode(Ipv4Addr),
    #[error("{ip} is not in the overlay network {overlay}")]
    NotInOverlay { ip: Ipv4Addr, overlay: Ipv4Net },
    #[error("no peer named {0:?} in the table; give its overlay address instead")]
    UnknownName(String),
    #[error(
        "no lighthouse is connected yet; runners are found through lighthouses (see `tern status`)"
    )]
    NoLighthouse,
    #[error("{0} is in no subnet a gateway routes")]
    NoRoute(Ipv4Addr),
    #[error("no gateway for {0} is usable now")]
    NoGateway(Ipv4Addr),
    #[error("no session with {peer} (the peer in front of {dst})")]
    NoSession { peer: Ipv4Addr, dst: Ipv4Addr },
    #[error(
        "{ip} is in no subnet a gateway routes ({routed}) and not in the overlay {overlay}; \
         check the gateways' [gateway] subnets and certificates, or add [[routes]]"
    )]
    Unreachable {
        ip: Ipv4Addr,
        /// "none is known yet", or "routed: A, B".
        routed: String,
        overlay: Ipv4Net,
    },
    #[error("a control message did not encode: {0}")]
    Encode(String),
}

/// `tern status` for a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub overlay_ip: Ipv4Addr,
    pub lighthouses: Vec<LighthouseStatus>,
    pub peers: Vec<PeerStatus>,
    pub mesh_counters: MeshCounters,
    pub node_counters: NodeCounters,
    pub firewall: FirewallStatus,
    /// Flow records: made, dropped, sent to a lighthouse, waiting.
    #[serde(default)]
    pub flows: FlowLogStatus,
    pub gateway_subnets: Vec<Ipv4Net>,
    pub routes: Vec<RouteStatus>,
    /// Certificates refused because a lighthouse revoked them.
    pub revoked_certs: usize,
    /// This node's own certificate was revoked (it stops).
    pub revoked: bool,
    /// No lighthouse has brought its revocation list yet: sessions with
    /// other nodes wait for it.
    #[serde(default)]
    pub awaiting_revocations: bool,
    /// Overlay addresses being asked of the lighthouses (packets may wait
    /// on them), in order.
    pub looking_up: Vec<Ipv4Addr>,
    /// Mesh names and split DNS.
    #[serde(default)]
    pub dns: DnsStatus,
    /// What this node relayed for others (`[relay]`), when it relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relaying: Option<tern_mesh::relay::RelayCounters>,
}

pub struct NodeCore {
    mesh: Mesh,
    name: String,
    /// Our certificate's and its issuer's fingerprints: a revocation of
    /// either is ours.
    own_fingerprints: Vec<tern_shared::cert::Fingerprint>,
    revoked: bool,
    overlay_ip: Ipv4Addr,
    overlay_net: Ipv4Net,
    links: Vec<LighthouseLink>,
    lookups: HashMap<Ipv4Addr, Lookup>,
    local_endpoints: Vec<SocketAddr>,
    next_request: u32,
    counters: NodeCounters,
    transmits: VecDeque<Transmit>,
    firewall: Firewall,
    flow_log: flowlog::FlowLog,
    gateway_subnets: Vec<Ipv4Net>,
    /// Gateway routes: the sub-machine in `routes.rs`.
    routes: RouteTable,
    events: Events,
    /// Direct paths: the sub-machine in `punch.rs`.
    punch: Punching,
    /// Pings, runner finds and policy queries: the sub-machine in
    /// `queries.rs`.
    queries: Queries,
    /// Mesh names and split DNS: the sub-machine in `names.rs` (the
    /// zones list in `zones.rs`).
    names: Names,
    /// DNS zones served as a gateway: `serving.rs`.
    serving: ZoneService,
    /// `[pki] renew`: the sub-machine in `renew.rs`.
    renewal: renew::Renewal,
    /// Jitter for this node's retry schedules (`backoff.rs`).
    jitter: backoff::Jitter,
    /// Relaying for others (`[relay]`): `relaying.rs`.
    relaying: Option<relaying::NodeRelay>,
    /// The relay nodes lighthouses named for our peers: `relaying.rs`.
    assigned_relays: relaying::AssignedRelays,
    /// `[[services]]` offered and looked for: `offers.rs`.
    offers: offers::Offers,
}

impl NodeCore {
    pub fn new(
        mesh: Mesh,
        own_cert: &VerifiedCert,
        lighthouses: Vec<LighthouseTarget>,
        now: Instant,
    ) -> Self {
        let mut mesh = mesh;
        if !lighthouses.is_empty() {
            // Nothing revoked is known yet: no session with a node until a
            // lighthouse brought the list (`revocations.rs`).
            mesh.hold_node_sessions();
        }
        NodeCore {
            own_fingerprints: std::iter::once(own_cert.fingerprint())
                .chain(own_cert.issuer_fingerprint())
                .collect(),
            revoked: false,
            name: own_cert.name().to_string(),
            overlay_ip: own_cert.overlay_ip(),
            overlay_net: own_cert.overlay_net(),
            mesh,
            links: lighthouses
                .into_iter()
                .map(|target| LighthouseLink {
                    target,
                    state: LinkState::discovering(now),
                    observed: None,
                    relay: false,
                    revocations: 0,
                })
                .collect(),
            lookups: HashMap::new(),
            local_endpoints: Vec::new(),
            next_request: 1,
            counters: NodeCounters::default(),
            transmits: VecDeque::new(),
            firewall: Firewall::new(&FirewallConfig::default(), own_cert.overlay_ip(), now),
            flow_log: flowlog::FlowLog::new(),
            gateway_subnets: Vec::new(),
            routes: RouteTable::new(now),
            events: Events::default(),
            punch: Punching::default(),
            queries: Queries::default(),
            names: Names::new(now),
            serving: ZoneService::default(),
            renewal: renew::Renewal::default(),
            relaying: None,
            assigned_relays: relaying::AssignedRelays::default(),
            offers: offers::Offers::default(),
            // Seeded by the node's key: different per node, the same
            // in every run of a test.
            jitter: backoff::Jitter::new(u64::from_le_bytes(
                own_cert.public_key()[..8].try_into().unwrap_or([0; 8]),
            )),
        }
    }

    /// A reloaded or renewed identity (`[pki]` on SIGHUP): new handshakes
    /// and hellos carry `cert`, and every peer re-handshakes with it. A
    /// certificate for another overlay address, or one that no longer
    /// carries the subnets this node routes as a gateway, is refused with
    /// the reason; the running identity stays. `cert` was verified against
    /// `ca` by the caller.
    pub fn replace_identity(
        &mut self,
        secret: x25519_dalek::StaticSecret,
        cert: &VerifiedCert,
        ca: tern_shared::cert::CaPool,
        now: Instant,
    ) -> Result<tern_mesh::IdentityChange, String> {
        if cert.overlay_ip() != self.overlay_ip || cert.overlay_net() != self.overlay_net {
            return Err(format!(
                "the new certificate is for {}, this node runs as {}; an address change needs a restart",
                cert.overlay_net(),
                self.overlay_net
            ));
        }
        let missing: Vec<String> = self
            .gateway_subnets
            .iter()
            .filter(|s| {
                !cert
                    .subnets()
                    .iter()
                    .any(|c| matches!(c, ipnet::IpNet::V4(c) if c.contains(*s)))
            })
            .map(|s| s.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the new certificate does not carry {}, which this gateway routes; sign it with --subnets, or change [gateway] subnets and restart",
                missing.join(", ")
            ));
        }
        self.own_fingerprints = std::iter::once(cert.fingerprint())
            .chain(cert.issuer_fingerprint())
            .collect();
        self.name = cert.name().to_string();
        Ok(self.mesh.replace_identity(secret, cert, ca, now))
    }

    /// Firewall rules, the subnets this node routes as a gateway (already
    /// checked against its certificate by the caller), and the subnets it
    /// reaches through gateways.
    pub fn set_policy(
        &mut self,
        firewall: &FirewallConfig,
        gateway_subnets: Vec<Ipv4Net>,
        routes: &[RouteConfig],
    ) {
        self.firewall.replace_rules(firewall);
        if gateway_subnets.len() > MAX_ADVERTISED {
            tracing::warn!(
                subnets = gateway_subnets.len(),
                advertised = %list(&gateway_subnets[..MAX_ADVERTISED]),
                "[gateway] subnets lists more than {MAX_ADVERTISED}; only the first {MAX_ADVERTISED} are advertised and routed (use fewer, larger subnets)"
            );
        }
        self.gateway_subnets = gateway_subnets;
        self.gateway_subnets.truncate(MAX_ADVERTISED);
        for r in routes {
            self.routes.list.push(RouteState {
                subnet: r.subnet,
                via: r.via.clone(),
                configured: true,
                kernel: true,
                refused: None,
                gateways: Vec::new(),
                active: None,
                probe_sent: None,
            });
            self.events.push(NodeEvent::AddRoute(r.subnet));
        }
        self.sort_routes();
    }

    /// New firewall rules (SIGHUP); flows and tunnels stay.
    pub fn reload_firewall(&mut self, firewall: &FirewallConfig) {
        self.firewall.replace_rules(firewall);
    }

    /// What the core has to tell the shell, oldest first (see [`NodeEvent`]).
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.0.pop_front()
    }

    pub fn overlay_ip(&self) -> Ipv4Addr {
        self.overlay_ip
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// Local underlay addresses reported to lighthouses.
    pub fn set_local_endpoints(&mut self, mut endpoints: Vec<SocketAddr>) {
        endpoints.truncate(MAX_ENDPOINTS);
        self.local_endpoints = endpoints;
    }

    /// A datagram from the UDP socket. Returns a packet for the TUN device.
    pub fn handle_datagram<'b>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> Option<&'b [u8]> {
        if datagram.first() == Some(&tern_shared::wire::TYPE_RELAY_REQUEST) {
            self.relay_request(from, datagram, now);
            return None;
        }
        let received = self.mesh.handle_datagram(from, datagram, out, now);
        self.drain_mesh_events(now);
        let Received::Packet { peer, packet } = received else {
            return None;
        };
        if let Some(udp) = parse_udp_ipv4(packet) {
            if udp.dst_port == CONTROL_PORT && udp.dst == self.overlay_ip {
                let payload = udp.payload.to_vec();
                if self.mesh.peer_role(peer) == Some(PeerRole::Lighthouse) {
                    self.handle_control(peer, &payload, now);
                } else {
                    self.handle_peer_control(peer, &payload, now);
                }
                return None;
            }
        }
        let for_us = match ipv4_addrs(packet) {
            Some((_, dst)) => {
                dst == self.overlay_ip || self.gateway_subnets.iter().any(|n| n.contains(&dst))
            }
            None => false,
        };
        if !for_us {
            self.counters.not_for_us_drops += 1;
            return None;
        }
        let cert = self.mesh.peer_cert(peer)?;
        match self.firewall.check_inbound(packet, cert, now) {
            Verdict::Allow => Some(packet),
            Verdict::Drop => None,
            Verdict::Reject(reply) => {
                self.mesh.send_packet(peer, &reply, now);
                None
            }
        }
    }

    /// An IP packet read from the TUN device. Returns ciphertext and where to send it.
    pub fn handle_tun_packet<'b>(
        &mut self,
        packet: &[u8],
        out: &'b mut [u8],
        now: Instant,
    ) -> Option<(SocketAddr, &'b [u8])> {
        let (_, dst) = ipv4_addrs(packet)?;
        let target = if self.overlay_net.contains(&dst) {
            if dst == self.overlay_ip
                || dst == self.overlay_net.broadcast()
                || dst == self.overlay_net.network()
            {
                self.counters.no_route_drops += 1;
                return None;
            }
            dst
        } else {
            let Some(route) = self.route_for(dst) else {
                self.counters.no_route_drops += 1;
                return None;
            };
            let Some(gateway) = self.choose_gateway(route, now) else {
                self.wait_for_gateway(route, packet, now);
                return None;
            };
            gateway
        };
        let Some(peer) = self.mesh.peer_by_overlay(target) else {
            self.wait_for_lookup(target, packet, now);
            return None;
        };
        let cert = self.mesh.peer_cert(peer)?;
        if !may_receive(cert, dst) {
            // A gateway whose certificate does not cover this address.
            self.refuse_gateway(target, dst);
            return None;
        }
        match self.firewall.check_outbound(packet, cert, now) {
            Verdict::Allow => self.mesh.encapsulate(peer, packet, out, now),
            Verdict::Drop => None,
            Verdict::Reject(reply) => {
                self.events.tun_write(reply);
                None
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.mesh.handle_timeout(now);
        self.firewall.handle_timeout(now);
        self.drain_mesh_events(now);
        for i in 0..self.links.len() {
            self.drive_link(i, now);
        }
        self.drive_lookups(now);
        self.drive_routes(now);
        self.refresh_relays();
        self.drive_direct_liveness(now);
        self.drive_relayed_liveness(now);
        self.drive_attempts(now);
        self.drive_pings(now);
        self.drive_finds(now);
        self.drive_service_finds(now);
        self.drive_policies(now);
        self.drive_names(now);
        self.drive_renewal(now);
        self.relay_upkeep(now);
        self.drive_relay_nodes(now);
        self.ship_flows(now);
    }

    /// The earliest moment [`NodeCore::handle_timeout`] has work: the
    /// mesh's next tick (while it has peers, for WireGuard's timers) or
    /// the first deadline of a link, lookup, route, punch or query. A
    /// fixed point in time, not "a tick from now": call it after every
    /// input and sleep until then.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        [
            self.links_deadline(),
            self.lookups_deadline(),
            Some(self.routes.deadline()),
            self.punch.deadline(),
            self.queries.deadline(),
            Some(self.names.deadline()),
            self.serving.deadline(),
            self.renewal_deadline(now),
            self.flow_deadline(),
        ]
        .into_iter()
        .flatten()
        .fold(self.mesh.poll_timeout(now), Instant::min)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits
            .pop_front()
            .or_else(|| self.mesh.poll_transmit())
    }

    /// Tells every lighthouse we are leaving, so peers stop being sent our way.
    /// Leaving: the lighthouses forget this node, and so does every peer
    /// it has a session with (at once, instead of when the session idles
    /// out; a gateway's clients fail over at once).
    pub fn shutdown(&mut self, now: Instant) {
        self.stop_flows(now);
        for i in 0..self.links.len() {
            if let LinkState::Up {
                peer, overlay_ip, ..
            } = self.links[i].state
            {
                let id = self.request_id();
                self.send_control(peer, overlay_ip, &ControlMessage::Deregister { id }, now);
            }
        }
        let peers: Vec<(PeerId, Ipv4Addr)> = self
            .mesh
            .peer_statuses()
            .into_iter()
            .filter(|p| p.role == PeerRole::Node && self.mesh.is_connected(p.id))
            .map(|p| (p.id, p.overlay_ip))
            .collect();
        for (peer, overlay_ip) in peers {
            let id = self.request_id();
            self.send_control(peer, overlay_ip, &ControlMessage::Deregister { id }, now);
        }
    }

    /// A peer said it is leaving (over its own session, so only about
    /// itself): forgotten at once, and routes through it move on.
    fn peer_left(&mut self, peer: PeerId, now: Instant) {
        let Some(cert) = self.mesh.peer_cert(peer) else {
            return;
        };
        let (ip, name) = (cert.overlay_ip(), cert.name().to_string());
        tracing::info!(peer = %name, overlay_ip = %ip, "peer left");
        self.counters.peers_left += 1;
        self.gateway_left(ip, now);
        self.mesh.remove_peer(peer);
    }

    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            name: self.name.clone(),
            overlay_ip: self.overlay_ip,
            lighthouses: self
                .links
                .iter()
                .map(|l| LighthouseStatus {
                    endpoint: l.target.endpoint,
                    name: match l.state {
                        LinkState::Up { peer, .. } => {
                            self.mesh.peer_cert(peer).map(|c| c.name().to_string())
                        }
                        _ => l.target.name.clone(),
                    },
                    registered: matches!(l.state, LinkState::Up { acked: true, .. }),
                    observed: l.observed,
                    relay: l.relay,
                    transport: None,
                })
                .collect(),
            revoked_certs: self.mesh.ca().revoked_count(),
            revoked: self.revoked,
            awaiting_revocations: self.mesh.holds_node_sessions(),
            dns: self.dns_status(),
            relaying: self.relay_counters(),
            looking_up: {
                let mut ips: Vec<Ipv4Addr> = self.lookups.keys().copied().collect();
                ips.sort();
                ips
            },
            peers: self
                .mesh
                .peer_statuses()
                .into_iter()
                .map(|mut p| {
                    // A ping's answer is fresher than the last handshake's.
                    if let Some(d) = self.queries.rtts.get(&p.overlay_ip) {
                        p.rtt_ms = Some(d.as_secs_f64() * 1000.0);
                    }
                    p
                })
                .collect(),
            mesh_counters: self.mesh.counters().clone(),
            node_counters: self.counters.clone(),
            firewall: self.firewall.status(),
            flows: self.flow_log_status(),
            gateway_subnets: self.gateway_subnets.clone(),
            routes: self
                .routes
                .list
                .iter()
                .map(|r| RouteStatus {
                    subnet: r.subnet,
                    via: r.via.clone(),
                    configured: r.configured,
                    kernel_route: r.kernel,
                    refused: r.refused.clone(),
                    gateways: r.gateways.iter().map(|g| g.name.clone()).collect(),
                    active: r
                        .active
                        .and_then(|a| r.gateways.iter().find(|g| g.overlay_ip == a))
                        .map(|g| g.name.clone()),
                })
                .collect(),
        }
    }

    fn drain_mesh_events(&mut self, now: Instant) {
        while let Some(event) = self.mesh.poll_event() {
            match event {
                MeshEvent::HelloCert { from, cert } => self.maybe_lighthouse(from, cert, now),
                MeshEvent::PeerRemoved {
                    peer, overlay_ip, ..
                } => {
                    self.queries.rtts.remove(&overlay_ip);
                    for link in &mut self.links {
                        if matches!(link.state, LinkState::Up { peer: p, .. } if p == peer) {
                            link.state = LinkState::discovering(now);
                        }
                    }
                }
                MeshEvent::PeerConnected { .. } => {}
                MeshEvent::DirectPathLost { peer } => self.direct_path_lost(peer, now),
                MeshEvent::UnknownRelayedPeer { overlay_ip } => {
                    // Our punch request from the lighthouse was lost: a
                    // lookup with nothing waiting fetches the certificate,
                    // then we connect.
                    self.look_up(overlay_ip, now);
                }
            }
        }
    }

    /// Control from an ordinary peer: only liveness probes (the daemon's own
    /// port, answered before the firewall like WireGuard's keepalives).
    fn handle_peer_control(&mut self, peer: PeerId, payload: &[u8], now: Instant) {
        match ControlMessage::decode(payload) {
            Ok(ControlMessage::PolicyQuery { id, dst, port }) => {
                let Some(cert) = self.mesh.peer_cert(peer).cloned() else {
                    return;
                };
                // Only about what the asker itself may do: the same rules
                // its packets would meet, evaluated without a packet.
                let answer = match self.firewall.inbound_tcp_decision(&cert, dst, port) {
                    PolicyDecision::Allowed => PolicyAnswer {
                        allowed: true,
                        reason: "allowed".into(),
                    },
                    PolicyDecision::Denied(reason) => PolicyAnswer {
                        allowed: false,
                        reason,
                    },
                };
                let msg = ControlMessage::PolicyReply { id, answer };
                self.send_control(peer, cert.overlay_ip(), &msg, now);
            }
            Ok(ControlMessage::PolicyReply { id, answer }) => {
                let from = self.mesh.peer_cert(peer).map(|c| c.overlay_ip());
                if let Some(p) = self.queries.policies.get(&id) {
                    if Some(p.asked) == from {
                        let name = self.mesh.peer_cert(peer).map(|c| c.name().to_string());
                        self.queries.policies.remove(&id);
                        self.events.policy(PolicyResult {
                            id,
                            asked: name,
                            answer: Some(answer),
                        });
                    }
                }
            }
            Ok(ControlMessage::Ping { id }) => {
                let Some(ip) = self.mesh.peer_cert(peer).map(|c| c.overlay_ip()) else {
                    return;
                };
                self.send_control(peer, ip, &ControlMessage::Pong { id }, now);
            }
            // Its arrival already counted as hearing from the peer.
            Ok(ControlMessage::Pong { id }) => self.pong(peer, id, now),
            Ok(ControlMessage::Deregister { .. }) => self.peer_left(peer, now),
            Ok(ControlMessage::DnsQuery { id, query }) => {
                self.serve_dns_query(peer, id, query, now)
            }
            Ok(ControlMessage::DnsAnswer {
                id,
                part,
                parts,
                answer,
            }) => self.dns_answer(peer, id, part, parts, answer),
            _ => self.counters.bad_control_messages += 1,
        }
    }

    /// A lighthouse acknowledged our registration.
    fn registered(
        &mut self,
        from_peer: PeerId,
        observed: SocketAddr,
        relay: bool,
        revocations: u32,
        now: Instant,
    ) {
        self.catch_up_revocations(from_peer, revocations, now);
        let mut first_registration = false;
        for link in &mut self.links {
            if let LinkState::Up {
                peer,
                last_ack,
                acked,
                ..
            } = &mut link.state
            {
                if *peer == from_peer {
                    if !*acked {
                        tracing::info!(lighthouse = %link.target.endpoint, %observed, "registered with lighthouse");
                        first_registration = true;
                    }
                    *last_ack = now;
                    *acked = true;
                    link.observed = Some(observed);
                    link.relay = relay;
                }
            }
        }
        self.refresh_relays();
        // With every registration: a restarted lighthouse learns
        // the runner again within one interval.
        self.advertise_runner(Some(from_peer), now);
        self.advertise_services(Some(from_peer), now);
        self.advertise_zones(Some(from_peer), now);
        if first_registration {
            // Flow records that waited for a lighthouse go now, not when
            // their backed-off resend comes.
            self.resend_flows_now(now);
            // A lighthouse that restarted (or one met anew) relays only
            // for pairs it introduced itself: ask again for every peer
            // with no direct path (reached through a relay, whose
            // choice waits on this registration), so that it introduces
            // the pair
            // once both are registered (the peer does the same when it
            // registers), instead of the path staying dead.
            let relayed: Vec<Ipv4Addr> = self
                .mesh
                .peer_statuses()
                .into_iter()
                .filter(|p| p.role == PeerRole::Node && p.endpoint.is_none())
                .map(|p| p.overlay_ip)
                .collect();
            for ip in relayed {
                self.send_query(ip, now);
            }
            // Learn the routes and zones now, not an interval
            // later: a CI job's first connection (and its first
            // name) follows `tern up` at once.
            self.routes.next_query = now;
            self.drive_routes(now);
            self.names.next_query = now + ZONES_INTERVAL;
            self.ask_zones(now);
        }
    }

    fn handle_control(&mut self, from_peer: PeerId, payload: &[u8], now: Instant) {
        let msg = match ControlMessage::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                self.counters.bad_control_messages += 1;
                tracing::debug!(error = %e, "bad control message from lighthouse");
                return;
            }
        };
        match msg {
            ControlMessage::RegisterAck {
                observed,
                relay,
                revocations,
                ..
            } => self.registered(from_peer, observed, relay, revocations, now),
            ControlMessage::RunnersReply { id, runners } => self.runners_reply(id, runners),
            ControlMessage::FlowRecordsAck { id } => self.flow_records_acked(id),
            ControlMessage::ServicesReply {
                id,
                services,
                complete,
            } => self.services_reply(id, services, complete),
            ControlMessage::Revocations {
                since,
                version,
                entries,
                complete,
                ..
            } => self.apply_revocations(from_peer, since, version, &entries, complete, now),
            ControlMessage::QueryReply {
                overlay_ip, peer, ..
            } => match peer {
                Some(info) => {
                    let introducer = self.lighthouse_endpoint(from_peer);
                    self.handle_answer(overlay_ip, info, introducer, now);
                }
                None => self.unknown_answer(from_peer, overlay_ip),
            },
            ControlMessage::Punch { peer: info, .. } => {
                // Verify now so the handshake that follows is answered, and
                // send toward the asker so our side's NAT mapping opens.
                match self.mesh.learn_cert(&info.cert, now) {
                    Ok(cert) => {
                        tracing::debug!(peer = cert.name(), endpoints = %list(&info.endpoints), "lighthouse asks us to punch");
                        let endpoints: Vec<SocketAddr> =
                            info.endpoints.iter().take(MAX_ENDPOINTS).copied().collect();
                        for e in &endpoints {
                            self.mesh.send_hello(*e, false);
                        }
                        // Both sides send at once: each side's packets open
                        // its own NAT for the other's.
                        let introducer = self.lighthouse_endpoint(from_peer);
                        if let Some(peer) =
                            self.mesh.add_peer(cert, &endpoints, PeerRole::Node, now)
                        {
                            // The attempt first: it may set the relay the
                            // handshake goes through as well.
                            self.start_attempt(peer, introducer, now);
                            if !self.mesh.is_connected(peer) {
                                self.mesh.connect(peer, false);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(reason = %e, "lighthouse relayed a certificate we do not accept")
                    }
                }
            }
            ControlMessage::RoutesReply {
                id,
                routes,
                complete,
            } => self.routes_page(from_peer, id, routes, complete, now),
            ControlMessage::Pong { id } => self.pong(from_peer, id, now),
            ControlMessage::RenewReply { id, outcome } => self.renew_reply(id, outcome, now),
            ControlMessage::ZonesReply {
                id,
                zones,
                complete,
            } => self.zones_page(from_peer, id, zones, complete, now),
            ControlMessage::NameReply { id, peer } => self.name_reply(from_peer, id, peer, now),
            ControlMessage::ZonesChanged { .. } => {
                self.names.next_query = now + ZONES_INTERVAL;
                self.ask_zones(now);
            }
            ControlMessage::Ping { id } => {
                let Some(ip) = self.mesh.peer_cert(from_peer).map(|c| c.overlay_ip()) else {
                    return;
                };
                self.send_control(from_peer, ip, &ControlMessage::Pong { id }, now);
            }
            ControlMessage::RelayIntroduce { a, b, .. } => self.relay_introduce(a, b, now),
            ControlMessage::UseRelay { peer, relay, .. } => self.use_relay(peer, relay, now),
            ControlMessage::Register { .. }
            | ControlMessage::RelayOffer { .. }
            | ControlMessage::ServicesAdvert { .. }
            | ControlMessage::ServicesQuery { .. }
            | ControlMessage::RoutesQuery { .. }
            | ControlMessage::Query { .. }
            | ControlMessage::RunnerAdvert { .. }
            | ControlMessage::RunnerJobs { .. }
            | ControlMessage::FlowRecords { .. }
            | ControlMessage::RunnersQuery { .. }
            | ControlMessage::RevocationsQuery { .. }
            | ControlMessage::PolicyQuery { .. }
            | ControlMessage::PolicyReply { .. }
            | ControlMessage::ZoneAdvert { .. }
            | ControlMessage::ZonesQuery { .. }
            | ControlMessage::NameQuery { .. }
            | ControlMessage::DnsQuery { .. }
            | ControlMessage::DnsAnswer { .. }
            | ControlMessage::RenewRequest { .. }
            | ControlMessage::Deregister { .. } => {
                self.counters.bad_control_messages += 1;
            }
        }
    }

    /// A packet that waited for its peer: checked like any outbound packet.
    fn send_waiting(&mut self, peer: PeerId, packet: &[u8], now: Instant) {
        let Some(cert) = self.mesh.peer_cert(peer) else {
            return;
        };
        let Some((_, dst)) = ipv4_addrs(packet) else {
            return;
        };
        if !may_receive(cert, dst) {
            let gateway = cert.overlay_ip();
            self.refuse_gateway(gateway, dst);
            return;
        }
        match self.firewall.check_outbound(packet, cert, now) {
            Verdict::Allow => self.mesh.send_packet(peer, packet, now),
            Verdict::Drop => {}
            Verdict::Reject(reply) => self.events.tun_write(reply),
        }
    }

    fn send_control(
        &mut self,
        peer: PeerId,
        lighthouse_ip: Ipv4Addr,
        msg: &ControlMessage,
        now: Instant,
    ) {
        let payload = match msg.encode() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "control message did not encode");
                return;
            }
        };
        let packet = build_udp_ipv4(
            self.overlay_ip,
            lighthouse_ip,
            CONTROL_PORT,
            CONTROL_PORT,
            &payload,
        );
        self.mesh.send_packet(peer, &packet, now);
    }

    /// The verified certificate behind an overlay address (for the runner,
    /// who is calling): only a peer's own address names it; addresses in
    /// subnets it routes do not.
    pub fn peer_identity(&self, ip: Ipv4Addr) -> Option<VerifiedCert> {
        let peer = self.mesh.peer_by_overlay(ip)?;
        let cert = self.mesh.peer_cert(peer)?;
        (cert.overlay_ip() == ip).then(|| cert.clone())
    }

    /// Whether traffic to `ip` has somewhere to go: a peer's overlay
    /// address, or an address in a subnet some gateway routes. The error
    /// names the address and what is routed, for `tern forward` and the
    /// proxies.
    pub fn reachable(&self, ip: Ipv4Addr) -> Result<(), CoreError> {
        if ip == self.overlay_ip {
            return Err(CoreError::ThisNode(ip));
        }
        if self.overlay_net.contains(&ip) || self.route_for(ip).is_some() {
            return Ok(());
        }
        let routed: Vec<String> = self
            .routes
            .list
            .iter()
            .map(|r| r.subnet.to_string())
            .collect();
        Err(CoreError::Unreachable {
            ip,
            routed: if routed.is_empty() {
                "none is known yet".to_string()
            } else {
                format!("routed: {}", routed.join(", "))
            },
            overlay: self.overlay_net.trunc(),
        })
    }

    fn request_id(&mut self) -> u32 {
        let id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        id
    }
}

/// Cryptokey routing outbound: a peer gets only packets for its own overlay
/// address or for a subnet its certificate carries.
fn may_receive(cert: &VerifiedCert, dst: Ipv4Addr) -> bool {
    dst == cert.overlay_ip()
        || cert
            .subnets()
            .iter()
            .any(|n| matches!(n, IpNet::V4(n) if n.contains(&dst)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(super) mod tests {
    use super::*;
    use tern_mesh::MeshSettings;
    use tern_shared::testing::{TestCa, TestNode, TEST_NOW};

    fn node(ca: &TestCa) -> NodeCore {
        node_as(ca, &ca.node("me", "100.64.0.5/10", &[], &[], 86_400))
    }

    /// A core for `me`, with one lighthouse configured.
    pub(in crate::node) fn node_as(ca: &TestCa, me: &TestNode) -> NodeCore {
        let pool = ca.pool();
        let cert = me.verified(&pool);
        let now = Instant::now();
        let mesh = Mesh::new(
            me.key.static_secret(),
            &cert,
            pool,
            MeshSettings::default(),
            now,
            TEST_NOW,
        );
        let lh = LighthouseTarget {
            endpoint: "198.18.0.1:4242".parse().unwrap(),
            name: None,
        };
        NodeCore::new(mesh, &cert, vec![lh], now)
    }

    #[test]
    fn the_next_timeout_is_the_earliest_real_deadline() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let mut core = node(&ca);
        let now = Instant::now();
        // The first hello to the lighthouse is due at once.
        assert!(core.poll_timeout(now) <= now);
        core.handle_timeout(now);
        // Then: the next hello (50 ms on), not sooner; and it stays put
        // however late it is asked.
        let next = core.poll_timeout(now);
        assert!(next > now, "{:?}", next - now);
        assert_eq!(core.poll_timeout(now + Duration::from_millis(40)), next);
        // A packet for an unknown address starts a lookup: asking again
        // and giving up are deadlines too.
        let ip: Ipv4Addr = "100.64.0.9".parse().unwrap();
        let packet = build_udp_ipv4(core.overlay_ip(), ip, 1000, 2000, b"x");
        let mut out = vec![0u8; 2048];
        assert!(core.handle_tun_packet(&packet, &mut out, now).is_none());
        let lookup = core.lookups_deadline().expect("a lookup waits");
        assert!(lookup <= now + QUERY_RETRY, "{:?}", lookup - now);
        assert!(core.poll_timeout(now) <= lookup);
    }

    /// The moments (ms after start) at which `core` sends a datagram to
    /// `dst` over `span`, driven by its own deadlines.
    fn sends_to(core: &mut NodeCore, dst: SocketAddr, start: Instant, span: Duration) -> Vec<u64> {
        let mut at = Vec::new();
        let mut now = start;
        while now <= start + span {
            core.handle_timeout(now);
            while let Some(t) = core.poll_transmit() {
                if t.dst == dst {
                    at.push(now.duration_since(start).as_millis() as u64);
                }
            }
            let next = core.poll_timeout(now);
            now = next.max(now + Duration::from_millis(1));
        }
        at
    }

    #[test]
    fn a_lighthouse_that_is_not_up_yet_is_asked_again_fast_then_slower() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let mut core = node(&ca);
        let lh: SocketAddr = "198.18.0.1:4242".parse().unwrap();
        let start = Instant::now();
        let hellos = sends_to(&mut core, lh, start, Duration::from_secs(30));
        // 0, then about 50, 150, 350, 750 ms ... (each gap 1 to 1.25 times
        // the plain doubling), and no faster than every 5 s once grown.
        assert_eq!(hellos[0], 0);
        assert!((50..=63).contains(&hellos[1]), "{hellos:?}");
        let gaps: Vec<u64> = hellos.windows(2).map(|w| w[1] - w[0]).collect();
        for (gap, nominal) in gaps
            .iter()
            .zip([50u64, 100, 200, 400, 800, 1600, 3200, 5000, 5000])
        {
            assert!(
                *gap >= nominal && *gap <= nominal + nominal / 4 + 1,
                "{gaps:?}"
            );
        }
        // The old schedule (500 ms, doubling to 5 s) sent 9 in 30 s; this
        // one sends 3 more in its first second, and the same after.
        assert!(
            hellos.len() <= 12,
            "{} hellos in 30 s: {hellos:?}",
            hellos.len()
        );
    }

    #[test]
    fn ping_refuses_what_it_cannot_reach_and_reports_silence() {
        let ca = TestCa::new("ca", &[], &[]);
        let mut core = node(&ca);
        let now = Instant::now();
        let err = core.ping("nobody", now).unwrap_err().to_string();
        assert!(err.contains("no peer named \"nobody\""), "{err}");
        assert!(core
            .ping("100.64.0.5", now)
            .unwrap_err()
            .to_string()
            .contains("this node"));
        let err = core.ping("198.19.0.10", now).unwrap_err().to_string();
        assert!(err.contains("not in the overlay network"), "{err}");
        // An address nobody answered for yet: looked up, then given up on.
        let ip = Ipv4Addr::new(100, 64, 0, 6);
        let id = core.ping("100.64.0.6", now).unwrap();
        assert!(
            core.lookups.contains_key(&ip),
            "the peer is looked up first"
        );
        let ping_result = |core: &mut NodeCore| {
            std::iter::from_fn(|| core.poll_event()).find_map(|e| match e {
                NodeEvent::Ping(r) => Some(r),
                _ => None,
            })
        };
        assert!(ping_result(&mut core).is_none());
        core.handle_timeout(now + PING_TIMEOUT);
        let result = ping_result(&mut core).expect("a timeout result");
        assert_eq!(
            (result.id, result.overlay_ip, result.rtt_ms),
            (id, ip, None)
        );
    }

    fn ask(core: &mut NodeCore, ip: Ipv4Addr) {
        let packet = build_udp_ipv4(core.overlay_ip(), ip, 1, 2, b"x");
        let mut out = vec![0u8; 2048];
        assert!(core
            .handle_tun_packet(&packet, &mut out, Instant::now())
            .is_none());
        assert!(core.lookups.contains_key(&ip));
    }

    #[test]
    fn a_lying_lighthouse_cannot_make_a_node_accept_another_key() {
        let ca = TestCa::new("ca", &[], &[]);
        let mut core = node(&ca);
        let wanted = Ipv4Addr::new(100, 64, 0, 6);
        ask(&mut core, wanted);
        let endpoints = vec!["198.18.0.66:4242".parse().unwrap()];

        // Another node's genuine certificate, offered as the answer for `wanted`.
        let other = ca.node("other", "100.64.0.7/10", &[], &[], 86_400);
        core.handle_answer(
            wanted,
            PeerInfo {
                cert: other.cert.encode(),
                endpoints: endpoints.clone(),
            },
            None,
            Instant::now(),
        );
        // A certificate for `wanted` from a CA this node does not trust.
        let rogue_ca = TestCa::new("rogue", &[], &[]);
        let forged = rogue_ca.node("impostor", "100.64.0.6/10", &[], &[], 86_400);
        core.handle_answer(
            wanted,
            PeerInfo {
                cert: forged.cert.encode(),
                endpoints: endpoints.clone(),
            },
            None,
            Instant::now(),
        );
        // Garbage.
        core.handle_answer(
            wanted,
            PeerInfo {
                cert: vec![0xde, 0xad],
                endpoints,
            },
            None,
            Instant::now(),
        );

        assert_eq!(core.counters.lying_lighthouse_answers, 3);
        assert!(core.mesh.peer_by_overlay(wanted).is_none());
        assert!(core
            .mesh
            .peer_by_overlay(Ipv4Addr::new(100, 64, 0, 7))
            .is_none());
        assert!(
            core.lookups.contains_key(&wanted),
            "still waiting for a true answer"
        );
    }

    #[test]
    fn a_true_answer_creates_the_peer_and_sends_the_waiting_packet() {
        let ca = TestCa::new("ca", &[], &[]);
        let mut core = node(&ca);
        let wanted = Ipv4Addr::new(100, 64, 0, 6);
        ask(&mut core, wanted);
        let b = ca.node("b", "100.64.0.6/10", &[], &[], 86_400);
        let endpoint: SocketAddr = "198.18.0.3:4242".parse().unwrap();
        core.handle_answer(
            wanted,
            PeerInfo {
                cert: b.cert.encode(),
                endpoints: vec![endpoint],
            },
            None,
            Instant::now(),
        );
        assert!(core.mesh.peer_by_overlay(wanted).is_some());
        assert!(!core.lookups.contains_key(&wanted));
        // No lighthouse has brought its revocation list yet: the handshake
        // waits for it, then leaves.
        let sent: Vec<Transmit> = std::iter::from_fn(|| core.poll_transmit()).collect();
        assert!(
            !sent.iter().any(|t| t.dst == endpoint),
            "nothing to a node before the revocation list is in"
        );
        assert!(core.status().awaiting_revocations);
        core.revocations_current(Instant::now());
        let sent: Vec<Transmit> = std::iter::from_fn(|| core.poll_transmit()).collect();
        assert!(
            sent.iter()
                .any(|t| t.dst == endpoint && t.payload.first() == Some(&1)),
            "a handshake initiation goes to the answered endpoint"
        );
    }

    #[test]
    fn only_a_lighthouse_certificate_is_accepted_at_a_lighthouse_endpoint() {
        let ca = TestCa::new("ca", &[], &[]);
        let mut core = node(&ca);
        let pool = ca.pool();
        let lh_endpoint: SocketAddr = "198.18.0.1:4242".parse().unwrap();
        let plain = ca.node("not-a-lighthouse", "100.64.0.1/10", &[], &[], 86_400);
        core.maybe_lighthouse(lh_endpoint, plain.verified(&pool), Instant::now());
        assert!(!matches!(core.links[0].state, LinkState::Up { .. }));
        let real = ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400);
        // From another address it is not this link's lighthouse.
        core.maybe_lighthouse(
            "198.18.0.9:4242".parse().unwrap(),
            real.verified(&pool),
            Instant::now(),
        );
        assert!(!matches!(core.links[0].state, LinkState::Up { .. }));
        core.maybe_lighthouse(lh_endpoint, real.verified(&pool), Instant::now());
        assert!(matches!(core.links[0].state, LinkState::Up { .. }));
    }

    #[test]
    fn a_pinned_lighthouse_name_is_enforced() {
        let ca = TestCa::new("ca", &[], &[]);
        let mut core = node(&ca);
        core.links[0].target.name = Some("lh-main".into());
        let pool = ca.pool();
        let lh_endpoint: SocketAddr = "198.18.0.1:4242".parse().unwrap();
        let other = ca.node(
            "lh-other",
            "100.64.0.2/10",
            &[LIGHTHOUSE_GROUP],
            &[],
            86_400,
        );
        core.maybe_lighthouse(lh_endpoint, other.verified(&pool), Instant::now());
        assert!(!matches!(core.links[0].state, LinkState::Up { .. }));
        let main = ca.node("lh-main", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400);
        core.maybe_lighthouse(lh_endpoint, main.verified(&pool), Instant::now());
        assert!(matches!(core.links[0].state, LinkState::Up { .. }));
    }

    #[test]
    fn packets_outside_the_overlay_or_to_ourselves_are_not_looked_up() {
        let ca = TestCa::new("ca", &[], &[]);
        let mut core = node(&ca);
        let mut out = vec![0u8; 2048];
        for dst in [
            Ipv4Addr::new(198, 19, 0, 10),
            Ipv4Addr::new(100, 64, 0, 5),
            Ipv4Addr::new(100, 127, 255, 255),
        ] {
            let p = build_udp_ipv4(core.overlay_ip(), dst, 1, 2, b"x");
            assert!(core
                .handle_tun_packet(&p, &mut out, Instant::now())
                .is_none());
        }
        assert!(core.lookups.is_empty());
        assert_eq!(core.counters.no_route_drops, 3);
        assert!(
            core.handle_tun_packet(&[0x60, 0, 0], &mut out, Instant::now())
                .is_none(),
            "garbage"
        );
    }
}
