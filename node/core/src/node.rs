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
use serde::Serialize;
use tern_shared::cert::{VerifiedCert, LIGHTHOUSE_GROUP};
use tern_shared::control::{
    AdvertisedRoute, ControlMessage, PeerInfo, PolicyAnswer, RunnerInfo, RunnerLoad,
    RunnerSelector, CONTROL_PORT, MAX_ADVERTISED, MAX_ENDPOINTS, MAX_ROUTES_IN_REPLY,
};
use tern_shared::policy::{FirewallConfig, RouteConfig};

use super::firewall::{Firewall, FirewallStatus, PolicyDecision, Verdict};
use tern_mesh::{Mesh, MeshCounters, MeshEvent, PeerId, PeerRole, PeerStatus, Received, Transmit};
use tern_shared::packet::{build_udp_ipv4, ipv4_addrs, parse_udp_ipv4};
use tern_shared::show::list;

/// How long [`NodeCore::find_runners`] waits for every lighthouse to answer.
pub const FIND_RUNNERS_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a node re-registers with each lighthouse.
pub const REGISTER_INTERVAL: Duration = Duration::from_secs(4);
/// A lighthouse that acknowledged nothing for this long is presumed restarted
/// or gone: its session is dropped and it is discovered anew.
pub const LIGHTHOUSE_DEAD_AFTER: Duration = Duration::from_secs(9);
/// A lookup is retried this often ...
const QUERY_RETRY: Duration = Duration::from_secs(1);
/// ... and given up after this long, dropping the packets that waited on it.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Packets held per unresolved overlay address, and unresolved addresses at once.
const MAX_WAITING_PACKETS: usize = 32;
const MAX_LOOKUPS: usize = 256;
const HELLO_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a node asks its lighthouses which gateways route what.
pub const ROUTES_INTERVAL: Duration = Duration::from_secs(3);
/// Most advertised routes a node takes in (pages of
/// [`MAX_ROUTES_IN_REPLY`] read one after the other).
pub const MAX_LEARNED_ROUTES: usize = 4096;
/// A gateway we keep sending to without hearing back for this long is asked
/// whether it is alive ...
pub const PROBE_AFTER: Duration = Duration::from_millis(1000);
/// ... and presumed gone when that goes unanswered this long; traffic moves
/// to another gateway for the subnet.
pub const GATEWAY_SILENCE: Duration = Duration::from_millis(1500);
/// How long a silent gateway is passed over.
const GATEWAY_HOLD_DOWN: Duration = Duration::from_secs(30);
/// Hole punching: the first repeat comes this soon after the first attempt,
/// each next one twice as late, up to every PUNCH_INTERVAL_MAX while the peer
/// is relayed (the background search for a direct path).
const PUNCH_INTERVAL_FIRST: Duration = Duration::from_millis(200);
const PUNCH_INTERVAL_MAX: Duration = Duration::from_secs(5);
/// After this long on the relay, punch only every PUNCH_INTERVAL_LONG: longer
/// than a Linux NAT keeps an unanswered UDP mapping (30 s), so a mapping our
/// own punches spoiled (both sides' first packets crossing) can expire
/// between rounds instead of being refreshed forever.
const PUNCH_PATIENCE: Duration = Duration::from_secs(30);
const PUNCH_INTERVAL_LONG: Duration = Duration::from_secs(40);
/// A control ping (`tern ping`, liveness checks) unanswered this long is lost.
/// Long enough for a lookup, a handshake and a relay fallback.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that never answered, directly or relayed, for this long is left to
/// the mesh's own retries.
const ATTEMPT_GIVE_UP: Duration = Duration::from_secs(60);

/// A lighthouse this node was configured with.
#[derive(Debug, Clone)]
pub struct LighthouseTarget {
    pub endpoint: SocketAddr,
    /// Accept only a lighthouse certificate with this name.
    pub name: Option<String>,
}

/// Counters the node adds to the mesh's.
#[derive(Debug, Clone, Default, Serialize)]
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
}

/// The answer to [`NodeCore::ping`], or its timeout.
#[derive(Debug, Clone, Serialize)]
pub struct PingResult {
    pub id: u32,
    pub overlay_ip: Ipv4Addr,
    /// The peer's certificate name, once known.
    pub name: Option<String>,
    /// None: no answer within [`PING_TIMEOUT`].
    pub rtt_ms: Option<f64>,
    /// The path the answer came back on.
    pub path: Option<tern_mesh::PathKind>,
    pub endpoint: Option<SocketAddr>,
    pub relay: Option<SocketAddr>,
    /// Every lighthouse said it does not know the address: no answer can
    /// come.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
}

impl PingResult {
    /// No lighthouse knows the address: no answer can come.
    fn unknown(id: u32, overlay_ip: Ipv4Addr) -> PingResult {
        PingResult {
            id,
            overlay_ip,
            name: None,
            rtt_ms: None,
            path: None,
            endpoint: None,
            relay: None,
            unknown: true,
        }
    }
}

/// The answer to [`NodeCore::find_runners`]: what the lighthouses that
/// answered know, least busy first.
#[derive(Debug, Clone, Serialize)]
pub struct RunnersResult {
    pub id: u32,
    pub runners: Vec<RunnerInfo>,
    pub asked: usize,
    pub answered: usize,
}

struct PendingFind {
    sent: Instant,
    /// Request ids still unanswered, one per lighthouse asked.
    waiting: Vec<u32>,
    asked: usize,
    runners: Vec<RunnerInfo>,
}

/// The runner this node offers, as advertised to lighthouses.
struct RunnerAdvert {
    labels: Vec<String>,
    load: RunnerLoad,
}

struct PendingPing {
    overlay_ip: Ipv4Addr,
    sent: Instant,
    /// Somebody (the API) waits for the result.
    report: bool,
}

/// Side effects for the shell beyond packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCommand {
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
}

/// A routed subnet as `tern status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RouteStatus {
    pub subnet: Ipv4Net,
    pub via: Option<String>,
    pub configured: bool,
    pub gateways: Vec<String>,
    pub active: Option<String>,
    /// Whether this node asked for a kernel route for it (TUN mode; the
    /// host keeps its own route if it has one).
    pub kernel_route: bool,
    /// Why a learned route gets no kernel route, when it is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// `tern status` for a node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub overlay_ip: Ipv4Addr,
    pub lighthouses: Vec<LighthouseStatus>,
    pub peers: Vec<PeerStatus>,
    pub mesh_counters: MeshCounters,
    pub node_counters: NodeCounters,
    pub firewall: FirewallStatus,
    pub gateway_subnets: Vec<Ipv4Net>,
    pub routes: Vec<RouteStatus>,
    /// Certificates refused because a lighthouse revoked them.
    pub revoked_certs: usize,
    /// This node's own certificate was revoked (it stops).
    pub revoked: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LighthouseStatus {
    pub endpoint: SocketAddr,
    pub name: Option<String>,
    pub registered: bool,
    /// Our address as this lighthouse sees it.
    pub observed: Option<SocketAddr>,
    /// It relays for us when a peer has no direct path.
    pub relay: bool,
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
    gateway_subnets: Vec<Ipv4Net>,
    routes: Vec<RouteState>,
    next_routes_query: Instant,
    /// Packets for a configured route whose gateways are not known yet (the
    /// route list is being asked for): sent once it comes, as packets for
    /// a peer wait for its lookup, instead of dropped (which would cost a
    /// TCP connection its first SYN, a second).
    gateway_waiting: VecDeque<(Instant, Vec<u8>)>,
    /// When the route list was last asked for because packets wait on it.
    routes_asked: Option<Instant>,
    /// The list of routes being read from a lighthouse, page by page.
    routes_fetch: Option<RoutesFetch>,
    /// `[tun] accept_routes`: learned routes get kernel routes too (once a
    /// verified certificate covers them), not only `[[routes]]`.
    accept_routes: bool,
    tun_writes: VecDeque<Vec<u8>>,
    commands: VecDeque<NodeCommand>,
    /// Peers without a direct path yet: punching, then relaying after
    /// `relay_after` while punching goes on.
    attempts: HashMap<PeerId, Attempt>,
    relay_after: Duration,
    /// Direct paths asked whether they still work, and when.
    direct_probes: HashMap<PeerId, Instant>,
    pings: HashMap<u32, PendingPing>,
    ping_results: VecDeque<PingResult>,
    rtts: HashMap<Ipv4Addr, Duration>,
    runner: Option<RunnerAdvert>,
    finds: HashMap<u32, PendingFind>,
    find_results: VecDeque<RunnersResult>,
    policies: HashMap<u32, PendingPolicy>,
    policy_results: VecDeque<PolicyResult>,
}

/// A [`ControlMessage::PolicyQuery`] waiting for its answer.
struct PendingPolicy {
    /// Whom we asked: only its answer counts.
    asked: Ipv4Addr,
    sent: Instant,
}

/// What [`NodeCore::ask_policy`] learned.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyResult {
    pub id: u32,
    /// The name of the peer that answered.
    pub asked: Option<String>,
    /// `None`: no answer in time.
    pub answer: Option<PolicyAnswer>,
}

/// The search for a direct path to one peer.
struct Attempt {
    started: Instant,
    /// The lighthouse that introduced us, preferred as the relay.
    introducer: Option<SocketAddr>,
    next_punch: Instant,
    interval: Duration,
}

/// One reading of a lighthouse's route list.
struct RoutesFetch {
    lighthouse: PeerId,
    lighthouse_ip: Ipv4Addr,
    /// The request whose answer is the next page.
    request: u32,
    routes: Vec<AdvertisedRoute>,
}

struct RouteState {
    subnet: Ipv4Net,
    via: Option<String>,
    /// From `[[routes]]` (kept even when nobody advertises it).
    configured: bool,
    /// A kernel route was asked for (AddRoute sent, RemoveRoute not yet).
    kernel: bool,
    /// Why a learned route may not have a kernel route (logged once).
    refused: Option<String>,
    gateways: Vec<GatewayCandidate>,
    active: Option<Ipv4Addr>,
    /// When we last asked the active gateway whether it is alive.
    probe_sent: Option<Instant>,
}

#[derive(Debug, Clone)]
struct GatewayCandidate {
    overlay_ip: Ipv4Addr,
    name: String,
    down_until: Option<Instant>,
}

struct LighthouseLink {
    target: LighthouseTarget,
    state: LinkState,
    observed: Option<SocketAddr>,
    /// The lighthouse said it relays (in its registration answer).
    relay: bool,
    /// The version of this lighthouse's revocation list we hold.
    revocations: u32,
}

enum LinkState {
    /// Sending hellos until the lighthouse answers with an acceptable certificate.
    Discovering {
        next_hello: Instant,
        backoff: Duration,
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

struct Lookup {
    packets: VecDeque<Vec<u8>>,
    started: Instant,
    next_query: Instant,
    /// Lighthouses that answered they do not know the address.
    unknown_at: Vec<PeerId>,
    /// All of them did: pings to it are answered "unknown".
    reported_unknown: bool,
}

impl NodeCore {
    pub fn new(
        mesh: Mesh,
        own_cert: &VerifiedCert,
        lighthouses: Vec<LighthouseTarget>,
        now: Instant,
    ) -> Self {
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
                    state: LinkState::Discovering {
                        next_hello: now,
                        backoff: Duration::from_millis(500),
                    },
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
            gateway_subnets: Vec::new(),
            routes: Vec::new(),
            next_routes_query: now,
            gateway_waiting: VecDeque::new(),
            routes_asked: None,
            routes_fetch: None,
            accept_routes: false,
            tun_writes: VecDeque::new(),
            commands: VecDeque::new(),
            attempts: HashMap::new(),
            relay_after: tern_shared::config::DEFAULT_RELAY_AFTER,
            direct_probes: HashMap::new(),
            pings: HashMap::new(),
            ping_results: VecDeque::new(),
            rtts: HashMap::new(),
            runner: None,
            finds: HashMap::new(),
            find_results: VecDeque::new(),
            policies: HashMap::new(),
            policy_results: VecDeque::new(),
        }
    }

    /// Advertises a runner with these labels to every lighthouse (after
    /// each registration, and at once when its load changes).
    pub fn set_runner(&mut self, labels: Vec<String>, load: RunnerLoad, now: Instant) {
        self.runner = Some(RunnerAdvert { labels, load });
        self.advertise_runner(None, now);
    }

    pub fn set_runner_load(&mut self, load: RunnerLoad, now: Instant) {
        if let Some(r) = &mut self.runner {
            if r.load != load {
                r.load = load;
                self.advertise_runner(None, now);
            }
        }
    }

    /// Sends the runner advert to one lighthouse peer, or to all registered.
    fn advertise_runner(&mut self, only: Option<PeerId>, now: Instant) {
        let Some(r) = &self.runner else {
            return;
        };
        let (labels, load) = (r.labels.clone(), r.load);
        let targets = self.registered_lighthouses();
        for (peer, ip) in targets
            .into_iter()
            .filter(|(p, _)| only.is_none_or(|o| o == *p))
        {
            let id = self.request_id();
            let msg = ControlMessage::RunnerAdvert {
                id,
                labels: labels.clone(),
                load,
            };
            self.send_control(peer, ip, &msg, now);
        }
    }

    /// The lighthouses that acknowledged our registration: their peer and
    /// overlay address.
    fn registered_lighthouses(&self) -> Vec<(PeerId, Ipv4Addr)> {
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

    /// `tern run --on LABEL | --node NAME`: asks every registered
    /// lighthouse which runners match. The merged answer comes out of
    /// [`NodeCore::poll_runners_result`] with the returned id once all have
    /// answered or [`FIND_RUNNERS_TIMEOUT`] passed.
    pub fn find_runners(&mut self, selector: RunnerSelector, now: Instant) -> Result<u32, String> {
        let targets = self.registered_lighthouses();
        if targets.is_empty() {
            return Err("no lighthouse is connected yet; runners are found through lighthouses (see `tern status`)".into());
        }
        let id = self.request_id();
        let mut waiting = Vec::new();
        for (peer, ip) in &targets {
            let request = self.request_id();
            waiting.push(request);
            let msg = ControlMessage::RunnersQuery {
                id: request,
                selector: selector.clone(),
            };
            self.send_control(*peer, *ip, &msg, now);
        }
        self.finds.insert(
            id,
            PendingFind {
                sent: now,
                waiting,
                asked: targets.len(),
                runners: Vec::new(),
            },
        );
        Ok(id)
    }

    pub fn poll_runners_result(&mut self) -> Option<RunnersResult> {
        self.find_results.pop_front()
    }

    fn runners_reply(&mut self, request: u32, runners: Vec<RunnerInfo>) {
        let Some((&id, find)) = self
            .finds
            .iter_mut()
            .find(|(_, f)| f.waiting.contains(&request))
        else {
            return;
        };
        find.waiting.retain(|&r| r != request);
        for r in runners {
            // Lighthouses may disagree on the load; keep the first answer.
            if !find.runners.iter().any(|x| x.overlay_ip == r.overlay_ip) {
                find.runners.push(r);
            }
        }
        if find.waiting.is_empty() {
            self.finish_find(id);
        }
    }

    fn finish_find(&mut self, id: u32) {
        let Some(find) = self.finds.remove(&id) else {
            return;
        };
        let mut runners = find.runners;
        tern_shared::control::sort_least_busy(&mut runners);
        self.find_results.push_back(RunnersResult {
            id,
            answered: find.asked - find.waiting.len(),
            asked: find.asked,
            runners,
        });
    }

    fn drive_finds(&mut self, now: Instant) {
        let late: Vec<u32> = self
            .finds
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.sent) >= FIND_RUNNERS_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.finish_find(id);
        }
    }

    /// How long a peer may go without a direct path before it is relayed.
    pub fn set_relay_after(&mut self, relay_after: Duration) {
        self.relay_after = relay_after;
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
            self.routes.push(RouteState {
                subnet: r.subnet,
                via: r.via.clone(),
                configured: true,
                kernel: true,
                refused: None,
                gateways: Vec::new(),
                active: None,
                probe_sent: None,
            });
            self.commands.push_back(NodeCommand::AddRoute(r.subnet));
        }
        self.sort_routes();
    }

    /// `[tun] accept_routes`: give learned routes kernel routes too, once
    /// a gateway's verified certificate covers them; never the default
    /// route, the overlay, or a prefix holding a lighthouse's or this
    /// node's underlay address (name those in `[[routes]]` if you mean it).
    pub fn set_accept_routes(&mut self, accept: bool) {
        self.accept_routes = accept;
    }

    /// New firewall rules (SIGHUP); flows and tunnels stay.
    pub fn reload_firewall(&mut self, firewall: &FirewallConfig) {
        self.firewall.replace_rules(firewall);
    }

    /// A packet the node itself answers toward its own kernel (a reject).
    pub fn poll_tun_write(&mut self) -> Option<Vec<u8>> {
        self.tun_writes.pop_front()
    }

    pub fn poll_command(&mut self) -> Option<NodeCommand> {
        self.commands.pop_front()
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
                self.tun_writes.push_back(reply);
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
        self.drive_attempts(now);
        self.drive_pings(now);
        self.drive_finds(now);
        self.drive_policies(now);
    }

    pub fn poll_timeout(&self, now: Instant) -> Instant {
        self.mesh.poll_timeout(now)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits
            .pop_front()
            .or_else(|| self.mesh.poll_transmit())
    }

    /// Tells every lighthouse we are leaving, so peers stop being sent our way.
    pub fn shutdown(&mut self, now: Instant) {
        for i in 0..self.links.len() {
            if let LinkState::Up {
                peer, overlay_ip, ..
            } = self.links[i].state
            {
                let id = self.request_id();
                self.send_control(peer, overlay_ip, &ControlMessage::Deregister { id }, now);
            }
        }
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
                })
                .collect(),
            revoked_certs: self.mesh.ca().revoked_count(),
            revoked: self.revoked,
            peers: self
                .mesh
                .peer_statuses()
                .into_iter()
                .map(|mut p| {
                    // A ping's answer is fresher than the last handshake's.
                    if let Some(d) = self.rtts.get(&p.overlay_ip) {
                        p.rtt_ms = Some(d.as_secs_f64() * 1000.0);
                    }
                    p
                })
                .collect(),
            mesh_counters: self.mesh.counters().clone(),
            node_counters: self.counters.clone(),
            firewall: self.firewall.status(),
            gateway_subnets: self.gateway_subnets.clone(),
            routes: self
                .routes
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

    /// The most specific route covering `dst`.
    fn route_for(&self, dst: Ipv4Addr) -> Option<usize> {
        // Kept sorted most specific first.
        self.routes.iter().position(|r| r.subnet.contains(&dst))
    }

    fn sort_routes(&mut self) {
        self.routes.sort_by(|a, b| {
            b.subnet
                .prefix_len()
                .cmp(&a.subnet.prefix_len())
                .then(a.subnet.cmp(&b.subnet))
        });
    }

    /// The gateway in use for a route: the active one while it lives, else
    /// the `via` one, else the first by name that is not held down.
    fn choose_gateway(&mut self, route: usize, now: Instant) -> Option<Ipv4Addr> {
        let r = self.routes.get_mut(route)?;
        let usable = |g: &GatewayCandidate| g.down_until.is_none_or(|t| t <= now);
        if let Some(a) = r.active {
            if r.gateways.iter().any(|g| g.overlay_ip == a && usable(g)) {
                return Some(a);
            }
        }
        let pick = r
            .gateways
            .iter()
            .filter(|g| usable(g))
            .find(|g| r.via.as_deref() == Some(g.name.as_str()))
            .or_else(|| r.gateways.iter().find(|g| usable(g)))
            // Everything held down: a gateway that may be back beats none.
            .or_else(|| r.gateways.first())?;
        let (ip, name) = (pick.overlay_ip, pick.name.clone());
        if r.active != Some(ip) {
            tracing::info!(subnet = %r.subnet, gateway = %name, "route via gateway");
            r.active = Some(ip);
        }
        Some(ip)
    }

    fn refuse_gateway(&mut self, gateway: Ipv4Addr, dst: Ipv4Addr) {
        self.counters.unauthorized_gateways += 1;
        tracing::warn!(%gateway, destination = %dst, "gateway's certificate does not authorize this subnet; not routing through it");
        for r in &mut self.routes {
            r.gateways.retain(|g| g.overlay_ip != gateway);
            if r.active == Some(gateway) {
                r.active = None;
            }
        }
    }

    /// A packet for `route`, which has no gateway yet: held while the
    /// route list is asked for (at once, then every [`QUERY_RETRY`] while
    /// packets wait), up to [`LOOKUP_TIMEOUT`] as for a lookup.
    fn wait_for_gateway(&mut self, route: usize, packet: &[u8], now: Instant) {
        if self
            .routes
            .get(route)
            .is_none_or(|r| !r.gateways.is_empty())
        {
            self.counters.no_gateway_drops += 1;
            return;
        }
        if self.gateway_waiting.len() >= MAX_WAITING_PACKETS {
            self.gateway_waiting.pop_front();
            self.counters.no_gateway_drops += 1;
        }
        self.gateway_waiting.push_back((now, packet.to_vec()));
        self.ask_routes_for_waiting(now);
    }

    fn ask_routes_for_waiting(&mut self, now: Instant) {
        if !self.gateway_waiting.is_empty()
            && self
                .routes_asked
                .is_none_or(|t| now.saturating_duration_since(t) >= QUERY_RETRY)
        {
            self.routes_asked = Some(now);
            self.ask_routes(now);
        }
    }

    /// Starts reading the route list from a registered lighthouse (a
    /// reading still unfinished is dropped: a page was lost; this one
    /// starts over).
    fn ask_routes(&mut self, now: Instant) {
        if let Some((lighthouse, lighthouse_ip)) = self.registered_lighthouses().first().copied() {
            let request = self.request_id();
            self.routes_fetch = Some(RoutesFetch {
                lighthouse,
                lighthouse_ip,
                request,
                routes: Vec::new(),
            });
            let query = ControlMessage::RoutesQuery {
                id: request,
                after: None,
            };
            self.send_control(lighthouse, lighthouse_ip, &query, now);
        }
    }

    /// The packets that waited for a route's gateways, once a route list
    /// came: each goes on as if just read (to its gateway, or to wait for
    /// its gateway's lookup); those whose route still has no gateway wait
    /// on; those whose route is gone are dropped.
    fn release_gateway_waiting(&mut self, now: Instant) {
        for (since, packet) in std::mem::take(&mut self.gateway_waiting) {
            let Some(route) = ipv4_addrs(&packet).and_then(|(_, dst)| self.route_for(dst)) else {
                self.counters.no_gateway_drops += 1;
                continue;
            };
            match self.choose_gateway(route, now) {
                None => self.gateway_waiting.push_back((since, packet)),
                Some(gateway) => match self.mesh.peer_by_overlay(gateway) {
                    Some(peer) => self.send_waiting(peer, &packet, now),
                    None => self.wait_for_lookup(gateway, &packet, now),
                },
            }
        }
    }

    /// Asks for advertised routes now and then, and fails over from a
    /// gateway that went silent while we kept sending to it.
    fn drive_routes(&mut self, now: Instant) {
        if self.next_routes_query <= now {
            self.next_routes_query = now + ROUTES_INTERVAL;
            self.ask_routes(now);
        }
        let expired = self
            .gateway_waiting
            .iter()
            .take_while(|(since, _)| now.saturating_duration_since(*since) >= LOOKUP_TIMEOUT)
            .count();
        self.gateway_waiting.drain(..expired);
        self.counters.no_gateway_drops += expired as u64;
        self.ask_routes_for_waiting(now);
        self.install_accepted_routes();
        for i in 0..self.routes.len() {
            let Some(active) = self.routes[i].active else {
                continue;
            };
            let Some(peer) = self.mesh.peer_by_overlay(active) else {
                continue;
            };
            let Some((last_rx, last_tx)) = self.mesh.peer_activity(peer) else {
                continue;
            };
            // Sending but not hearing back proves nothing by itself (the
            // gateway's firewall may drop that flow), so ask: a live gateway
            // answers a ping on its control port at once.
            let waiting = match (last_tx, last_rx) {
                (Some(tx), Some(rx)) => tx > rx && now.saturating_duration_since(rx) >= PROBE_AFTER,
                (Some(tx), None) => now.saturating_duration_since(tx) >= PROBE_AFTER,
                _ => false,
            };
            if !waiting {
                self.routes[i].probe_sent = None;
                continue;
            }
            match self.routes[i].probe_sent {
                Some(sent)
                    if last_rx.is_none_or(|rx| rx < sent)
                        && now.saturating_duration_since(sent) >= GATEWAY_SILENCE => {}
                Some(_) => continue,
                None => {
                    self.routes[i].probe_sent = Some(now);
                    let id = self.request_id();
                    self.send_control(peer, active, &ControlMessage::Ping { id }, now);
                    continue;
                }
            }
            let alternatives = self.routes[i]
                .gateways
                .iter()
                .filter(|g| g.overlay_ip != active)
                .count();
            let r = &mut self.routes[i];
            r.probe_sent = None;
            if alternatives > 0 {
                tracing::warn!(subnet = %r.subnet, gateway = %active, "gateway stopped answering; failing over");
                for g in r.gateways.iter_mut().filter(|g| g.overlay_ip == active) {
                    g.down_until = Some(now + GATEWAY_HOLD_DOWN);
                }
                r.active = None;
                self.counters.gateway_failovers += 1;
                self.mesh.remove_peer(peer);
            }
        }
    }

    /// One page of a lighthouse's route list: kept until the last page,
    /// then the whole list replaces what we knew. Pages must go forward
    /// (each route after the one before), and the list is bounded.
    fn routes_page(
        &mut self,
        from: PeerId,
        id: u32,
        page: Vec<AdvertisedRoute>,
        complete: bool,
        now: Instant,
    ) {
        let Some(fetch) = self.routes_fetch.as_mut() else {
            return;
        };
        if fetch.lighthouse != from || fetch.request != id {
            return;
        }
        let key = |a: &AdvertisedRoute| (a.subnet, a.gateway);
        let mut last = fetch.routes.last().map(key);
        for route in page.into_iter().take(MAX_ROUTES_IN_REPLY) {
            if last.is_some_and(|l| key(&route) <= l) {
                self.counters.bad_control_messages += 1;
                tracing::warn!("a lighthouse's route list went backwards; reading it again later");
                self.routes_fetch = None;
                return;
            }
            last = Some(key(&route));
            fetch.routes.push(route);
        }
        let full = fetch.routes.len() >= MAX_LEARNED_ROUTES;
        if complete || full {
            if full && !complete {
                tracing::warn!("more than {MAX_LEARNED_ROUTES} advertised routes; using the first {MAX_LEARNED_ROUTES}");
            }
            let routes = std::mem::take(&mut fetch.routes);
            self.routes_fetch = None;
            self.handle_routes(routes, now);
            return;
        }
        let (lighthouse, lighthouse_ip, after) = (fetch.lighthouse, fetch.lighthouse_ip, last);
        let request = self.request_id();
        if let Some(f) = self.routes_fetch.as_mut() {
            f.request = request;
        }
        let query = ControlMessage::RoutesQuery { id: request, after };
        self.send_control(lighthouse, lighthouse_ip, &query, now);
    }

    /// The lighthouse's list of advertised routes replaces what we knew:
    /// configured routes keep their kernel route, learned ones come and go.
    fn handle_routes(&mut self, advertised: Vec<AdvertisedRoute>, now: Instant) {
        let mut by_subnet: BTreeMap<Ipv4Net, Vec<&AdvertisedRoute>> = BTreeMap::new();
        for a in &advertised {
            if a.gateway != self.overlay_ip && !self.gateway_subnets.contains(&a.subnet) {
                by_subnet.entry(a.subnet).or_default().push(a);
            }
        }
        for r in &mut self.routes {
            let fresh = by_subnet.remove(&r.subnet).unwrap_or_default();
            let old = std::mem::take(&mut r.gateways);
            r.gateways = fresh
                .iter()
                .map(|a| GatewayCandidate {
                    overlay_ip: a.gateway,
                    name: a.name.clone(),
                    down_until: old
                        .iter()
                        .find(|g| g.overlay_ip == a.gateway)
                        .and_then(|g| g.down_until),
                })
                .collect();
            if r.active
                .is_some_and(|a| !r.gateways.iter().any(|g| g.overlay_ip == a))
            {
                tracing::info!(subnet = %r.subnet, "gateway no longer advertises the subnet");
                r.active = None;
            }
        }
        let mut gone = Vec::new();
        self.routes.retain(|r| {
            let keep = r.configured || !r.gateways.is_empty();
            if !keep {
                gone.push((r.subnet, r.kernel));
            }
            keep
        });
        for (subnet, kernel) in gone {
            tracing::info!(%subnet, "no gateway advertises the subnet any more; route removed");
            if kernel {
                self.commands.push_back(NodeCommand::RemoveRoute(subnet));
            }
        }
        let mut look_up = Vec::new();
        for (subnet, gws) in by_subnet {
            tracing::info!(%subnet, gateways = %list(gws.iter().map(|g| &g.name)), "learned route");
            let refused = self.refuse_learned(subnet);
            if self.accept_routes {
                match &refused {
                    Some(why) => {
                        tracing::warn!(%subnet, reason = %why, "learned route gets no kernel route")
                    }
                    // Its gateways' certificates decide: look them up.
                    None => look_up.extend(gws.iter().map(|g| g.gateway)),
                }
            }
            self.routes.push(RouteState {
                subnet,
                via: None,
                configured: false,
                kernel: false,
                refused,
                probe_sent: None,
                gateways: gws
                    .iter()
                    .map(|a| GatewayCandidate {
                        overlay_ip: a.gateway,
                        name: a.name.clone(),
                        down_until: None,
                    })
                    .collect(),
                active: None,
            });
        }
        self.sort_routes();
        for gateway in look_up {
            if self.mesh.peer_by_overlay(gateway).is_none() {
                self.look_up(gateway, now);
            }
        }
        self.install_accepted_routes();
        self.release_gateway_waiting(now);
    }

    /// Why a learned subnet may not get a kernel route, whatever its
    /// gateway's certificate says: it would take the host's default route,
    /// the overlay itself, or the way to a lighthouse or out of this host.
    fn refuse_learned(&self, subnet: Ipv4Net) -> Option<String> {
        if subnet.prefix_len() == 0 {
            return Some("it is the default route".into());
        }
        if subnet.contains(&self.overlay_net.network())
            || self.overlay_net.contains(&subnet.network())
        {
            return Some(format!("it overlaps the overlay {}", self.overlay_net));
        }
        let underlay = self
            .links
            .iter()
            .flat_map(|l| [Some(l.target.endpoint), l.observed])
            .flatten()
            .map(|e| (e, "a lighthouse's or this node's public address"))
            .chain(
                self.local_endpoints
                    .iter()
                    .map(|e| (*e, "this node's own underlay address")),
            );
        for (endpoint, what) in underlay {
            if let std::net::IpAddr::V4(ip) = endpoint.ip() {
                if subnet.contains(&ip) {
                    return Some(format!("it covers {ip}, {what}"));
                }
            }
        }
        None
    }

    /// With `accept_routes`: a kernel route for each learned subnet that a
    /// gateway's verified certificate covers whole.
    fn install_accepted_routes(&mut self) {
        if !self.accept_routes {
            return;
        }
        for i in 0..self.routes.len() {
            let r = &self.routes[i];
            if r.kernel || r.configured || r.refused.is_some() {
                continue;
            }
            let covered_by = r.gateways.iter().find_map(|g| {
                let cert = self
                    .mesh
                    .peer_cert(self.mesh.peer_by_overlay(g.overlay_ip)?)?;
                covers(cert, r.subnet).then(|| cert.name().to_string())
            });
            if let Some(gateway) = covered_by {
                let r = &mut self.routes[i];
                tracing::info!(subnet = %r.subnet, %gateway, "learned route accepted ([tun] accept_routes)");
                r.kernel = true;
                self.commands.push_back(NodeCommand::AddRoute(r.subnet));
            }
        }
    }

    /// Whether every connected lighthouse has said, in the running lookup,
    /// that it does not know `dst`.
    fn known_unknown(&self, dst: Ipv4Addr) -> bool {
        self.lookups.get(&dst).is_some_and(|l| l.reported_unknown)
    }

    fn wait_for_lookup(&mut self, dst: Ipv4Addr, packet: &[u8], now: Instant) {
        if !self.lookups.contains_key(&dst) && self.lookups.len() >= MAX_LOOKUPS {
            self.counters.lookup_queue_drops += 1;
            return;
        }
        let lookup = self.lookups.entry(dst).or_insert_with(|| Lookup {
            packets: VecDeque::new(),
            started: now,
            next_query: now,
            unknown_at: Vec::new(),
            reported_unknown: false,
        });
        if lookup.packets.len() >= MAX_WAITING_PACKETS {
            lookup.packets.pop_front();
            self.counters.lookup_queue_drops += 1;
        }
        lookup.packets.push_back(packet.to_vec());
        if lookup.next_query <= now {
            lookup.next_query = now + QUERY_RETRY;
            self.send_query(dst, now);
        }
    }

    /// Starts a lookup with no packet waiting on it (or lets a running one be).
    fn look_up(&mut self, dst: Ipv4Addr, now: Instant) {
        if self.lookups.contains_key(&dst) || self.lookups.len() >= MAX_LOOKUPS {
            return;
        }
        self.lookups.insert(
            dst,
            Lookup {
                packets: VecDeque::new(),
                started: now,
                next_query: now + QUERY_RETRY,
                unknown_at: Vec::new(),
                reported_unknown: false,
            },
        );
        self.send_query(dst, now);
    }

    fn send_query(&mut self, overlay_ip: Ipv4Addr, now: Instant) {
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
    fn unknown_answer(&mut self, lighthouse: PeerId, overlay_ip: Ipv4Addr) {
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
            .pings
            .iter()
            .filter(|(_, p)| p.overlay_ip == overlay_ip)
            .map(|(id, _)| *id)
            .collect();
        for id in pings {
            if let Some(p) = self.pings.remove(&id) {
                if p.report {
                    self.ping_results
                        .push_back(PingResult::unknown(id, overlay_ip));
                }
            }
        }
    }

    fn connected_lighthouses(&self) -> usize {
        self.links
            .iter()
            .filter(|l| matches!(l.state, LinkState::Up { .. }))
            .count()
    }

    fn drive_lookups(&mut self, now: Instant) {
        let mut retry = Vec::new();
        self.lookups.retain(|ip, l| {
            if now.saturating_duration_since(l.started) >= LOOKUP_TIMEOUT {
                tracing::info!(overlay_ip = %ip, "no lighthouse knows this address; dropping waiting packets");
                self.counters.lookup_timeouts += 1;
                return false;
            }
            if l.next_query <= now {
                l.next_query = now + QUERY_RETRY;
                retry.push(*ip);
            }
            true
        });
        for ip in retry {
            self.send_query(ip, now);
        }
    }

    fn drive_link(&mut self, i: usize, now: Instant) {
        match self.links[i].state {
            LinkState::Discovering {
                next_hello,
                backoff,
            } => {
                if next_hello <= now {
                    let endpoint = self.links[i].target.endpoint;
                    tracing::debug!(%endpoint, "hello to lighthouse");
                    self.mesh.send_hello(endpoint, true);
                    self.links[i].state = LinkState::Discovering {
                        next_hello: now + backoff,
                        backoff: (backoff * 2).min(HELLO_BACKOFF_MAX),
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
                    self.links[i].state = LinkState::Discovering {
                        next_hello: now,
                        backoff: Duration::from_millis(500),
                    };
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
                }
            }
        }
    }

    fn drain_mesh_events(&mut self, now: Instant) {
        while let Some(event) = self.mesh.poll_event() {
            match event {
                MeshEvent::HelloCert { from, cert } => self.maybe_lighthouse(from, cert, now),
                MeshEvent::PeerRemoved {
                    peer, overlay_ip, ..
                } => {
                    self.rtts.remove(&overlay_ip);
                    for link in &mut self.links {
                        if matches!(link.state, LinkState::Up { peer: p, .. } if p == peer) {
                            link.state = LinkState::Discovering {
                                next_hello: now,
                                backoff: Duration::from_millis(500),
                            };
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

    /// A hello answered from a configured lighthouse endpoint: accept it as
    /// that lighthouse only if its certificate carries the lighthouse group
    /// (and the pinned name, when the config gives one).
    fn maybe_lighthouse(&mut self, from: SocketAddr, cert: VerifiedCert, now: Instant) {
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
                if let Some(p) = self.policies.get(&id) {
                    if Some(p.asked) == from {
                        let name = self.mesh.peer_cert(peer).map(|c| c.name().to_string());
                        self.policies.remove(&id);
                        self.policy_results.push_back(PolicyResult {
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
            _ => self.counters.bad_control_messages += 1,
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
            } => {
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
                if first_registration {
                    // Learn the routes now, not an interval later: a CI
                    // job's first connection follows `tern up` at once.
                    self.next_routes_query = now;
                    self.drive_routes(now);
                }
            }
            ControlMessage::RunnersReply { id, runners } => self.runners_reply(id, runners),
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
                            if !self.mesh.is_connected(peer) {
                                self.mesh.connect(peer, false);
                            }
                            self.start_attempt(peer, introducer, now);
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
            ControlMessage::Ping { id } => {
                let Some(ip) = self.mesh.peer_cert(from_peer).map(|c| c.overlay_ip()) else {
                    return;
                };
                self.send_control(from_peer, ip, &ControlMessage::Pong { id }, now);
            }
            ControlMessage::Register { .. }
            | ControlMessage::RoutesQuery { .. }
            | ControlMessage::Query { .. }
            | ControlMessage::RunnerAdvert { .. }
            | ControlMessage::RunnersQuery { .. }
            | ControlMessage::RevocationsQuery { .. }
            | ControlMessage::PolicyQuery { .. }
            | ControlMessage::PolicyReply { .. }
            | ControlMessage::Deregister { .. } => {
                self.counters.bad_control_messages += 1;
            }
        }
    }

    /// A lighthouse's registration answer names the version of its
    /// revocation list; when ours from it differs, ask for what we lack
    /// (everything, when it went back: its store was replaced).
    fn catch_up_revocations(&mut self, lighthouse: PeerId, version: u32, now: Instant) {
        let Some(link) = self.link_for(lighthouse).map(|i| &self.links[i]) else {
            return;
        };
        if link.revocations == version {
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
    fn apply_revocations(
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
            self.commands
                .push_back(NodeCommand::Revoked { lighthouse: name });
        }
        let new = self.mesh.revoke(&list, now);
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
        if !complete {
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

    /// A lighthouse's answer is a hint, never an identity: the certificate is
    /// verified here against our own CAs and must carry the address we asked for.
    fn handle_answer(
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
                    if self.attempts.contains_key(&peer) {
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
    }

    /// The direct path to `peer` went away: use the relay at once, ask the
    /// lighthouses where the peer is now (its address may have changed; the
    /// answer also makes the lighthouse tell the peer to punch toward us),
    /// and punch again.
    fn direct_path_lost(&mut self, peer: PeerId, now: Instant) {
        self.attempts.remove(&peer);
        self.start_attempt(peer, None, now);
        if let Some(a) = self.attempts.get_mut(&peer) {
            a.started = now.checked_sub(self.relay_after).unwrap_or(a.started);
        }
        if let Some(ip) = self.mesh.peer_cert(peer).map(|c| c.overlay_ip()) {
            self.send_query(ip, now);
        }
        self.drive_attempts(now);
    }

    /// Direct paths we keep sending on without hearing back: ask the peer
    /// (a control ping, answered by every daemon) and give the path up when
    /// the answer does not come either.
    fn drive_direct_liveness(&mut self, now: Instant) {
        let silent = self.mesh.silent_direct_peers(now, PROBE_AFTER);
        self.direct_probes.retain(|p, _| silent.contains(p));
        for peer in silent {
            match self.direct_probes.get(&peer).copied() {
                None => {
                    self.direct_probes.insert(peer, now);
                    if let Some(ip) = self.mesh.peer_cert(peer).map(|c| c.overlay_ip()) {
                        let id = self.request_id();
                        self.pings.insert(
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
                    self.direct_probes.remove(&peer);
                    self.mesh.drop_direct_path(peer);
                    self.drain_mesh_events(now);
                }
                Some(_) => {}
            }
        }
    }

    /// The link to the lighthouse whose session is `peer`.
    fn link_for(&self, peer: PeerId) -> Option<usize> {
        self.links
            .iter()
            .position(|l| matches!(l.state, LinkState::Up { peer: p, .. } if p == peer))
    }

    /// The underlay endpoint of the lighthouse whose session is `peer`.
    fn lighthouse_endpoint(&self, peer: PeerId) -> Option<SocketAddr> {
        self.link_for(peer).map(|i| self.links[i].target.endpoint)
    }

    /// The lighthouses that relay for us now (registered, and said so).
    fn relays(&self) -> Vec<SocketAddr> {
        self.links
            .iter()
            .filter(|l| l.relay && matches!(l.state, LinkState::Up { acked: true, .. }))
            .map(|l| l.target.endpoint)
            .collect()
    }

    fn refresh_relays(&mut self) {
        let relays = self.relays();
        self.mesh.set_relays(relays);
    }

    /// Starts (or keeps) the search for a direct path to `peer`.
    fn start_attempt(&mut self, peer: PeerId, introducer: Option<SocketAddr>, now: Instant) {
        if matches!(
            self.mesh.peer_path(peer),
            Some((tern_mesh::PathKind::Direct, _))
        ) {
            return;
        }
        self.attempts.entry(peer).or_insert(Attempt {
            started: now,
            introducer,
            next_punch: now + PUNCH_INTERVAL_FIRST,
            interval: PUNCH_INTERVAL_FIRST,
        });
    }

    /// Punch on schedule; after `relay_after` without a session, go through a
    /// relay; stop once a direct path carries the session.
    fn drive_attempts(&mut self, now: Instant) {
        use tern_mesh::PathKind;
        if self.attempts.is_empty() {
            return;
        }
        // Kept current by `refresh_relays` (every tick and on each
        // registration answer); the mesh owns the list.
        let relays = self.mesh.relays().to_vec();
        let peers: Vec<PeerId> = self.attempts.keys().copied().collect();
        for peer in peers {
            let Some((kind, relay)) = self.mesh.peer_path(peer) else {
                self.attempts.remove(&peer);
                continue;
            };
            let connected = self.mesh.is_connected(peer);
            if kind == PathKind::Direct && connected {
                self.attempts.remove(&peer);
                continue;
            }
            let Some(a) = self.attempts.get_mut(&peer) else {
                continue;
            };
            if !connected
                && relay.is_none()
                && now.saturating_duration_since(a.started) > ATTEMPT_GIVE_UP
            {
                self.attempts.remove(&peer);
                continue;
            }
            // The relay in use went away: another one, or none.
            let usable = |r: &SocketAddr| relays.contains(r);
            let wanted = if relay.is_some()
                || now.saturating_duration_since(a.started) >= self.relay_after
            {
                relay
                    .filter(usable)
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
            Verdict::Reject(reply) => self.tun_writes.push_back(reply),
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

    /// `tern ping`: a control ping to `target` (an overlay address, or the
    /// name of a peer in the table), looked up first when the peer is not
    /// known yet. The answer, or its absence, comes out of
    /// [`NodeCore::poll_ping_result`] with the returned id.
    pub fn ping(&mut self, target: &str, now: Instant) -> Result<u32, String> {
        let overlay_ip = match target.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(_) => self
                .mesh
                .peer_statuses()
                .into_iter()
                .find(|p| p.name == target)
                .map(|p| p.overlay_ip)
                .ok_or_else(|| {
                    format!(
                        "no peer named {target:?} in the table; give its overlay address instead"
                    )
                })?,
        };
        if overlay_ip == self.overlay_ip {
            return Err(format!("{overlay_ip} is this node"));
        }
        if !self.overlay_net.contains(&overlay_ip) {
            return Err(format!(
                "{overlay_ip} is not in the overlay network {}",
                self.overlay_net
            ));
        }
        let id = self.request_id();
        if self.mesh.peer_by_overlay(overlay_ip).is_none() && self.known_unknown(overlay_ip) {
            self.ping_results
                .push_back(PingResult::unknown(id, overlay_ip));
            return Ok(id);
        }
        self.pings.insert(
            id,
            PendingPing {
                overlay_ip,
                sent: now,
                report: true,
            },
        );
        match self.mesh.peer_by_overlay(overlay_ip) {
            Some(peer) => self.send_control(peer, overlay_ip, &ControlMessage::Ping { id }, now),
            None => {
                let payload = ControlMessage::Ping { id }
                    .encode()
                    .map_err(|e| e.to_string())?;
                let packet = build_udp_ipv4(
                    self.overlay_ip,
                    overlay_ip,
                    CONTROL_PORT,
                    CONTROL_PORT,
                    &payload,
                );
                self.wait_for_lookup(overlay_ip, &packet, now);
            }
        }
        Ok(id)
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
    pub fn reachable(&self, ip: Ipv4Addr) -> Result<(), String> {
        if ip == self.overlay_ip {
            return Err(format!("{ip} is this node"));
        }
        if self.overlay_net.contains(&ip) || self.route_for(ip).is_some() {
            return Ok(());
        }
        let routed: Vec<String> = self.routes.iter().map(|r| r.subnet.to_string()).collect();
        Err(format!(
            "{ip} is in no subnet a gateway routes ({}) and not in the overlay {}; \
             check the gateways' [gateway] subnets and certificates, or add [[routes]]",
            if routed.is_empty() {
                "none is known yet".to_string()
            } else {
                format!("routed: {}", routed.join(", "))
            },
            self.overlay_net.trunc()
        ))
    }

    /// Asks the peer in front of `dst` (the peer itself, or the gateway in
    /// use for its subnet) whether its inbound firewall lets this node open
    /// TCP to `dst:port`. The answer (or its absence after 2 s) comes out of
    /// [`NodeCore::poll_policy_result`] with the returned id.
    pub fn ask_policy(&mut self, dst: Ipv4Addr, port: u16, now: Instant) -> Result<u32, String> {
        let asked = if self.overlay_net.contains(&dst) {
            dst
        } else {
            let route = self
                .route_for(dst)
                .ok_or_else(|| format!("{dst} is in no subnet a gateway routes"))?;
            self.choose_gateway(route, now)
                .ok_or_else(|| format!("no gateway for {dst} is usable now"))?
        };
        let peer = self
            .mesh
            .peer_by_overlay(asked)
            .filter(|p| self.mesh.is_connected(*p))
            .ok_or_else(|| format!("no session with {asked} (the peer in front of {dst})"))?;
        let id = self.request_id();
        self.policies.insert(id, PendingPolicy { asked, sent: now });
        self.send_control(
            peer,
            asked,
            &ControlMessage::PolicyQuery { id, dst, port },
            now,
        );
        Ok(id)
    }

    /// An answer to [`NodeCore::ask_policy`], or its timeout.
    pub fn poll_policy_result(&mut self) -> Option<PolicyResult> {
        self.policy_results.pop_front()
    }

    fn drive_policies(&mut self, now: Instant) {
        let lost: Vec<u32> = self
            .policies
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.sent) >= PING_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.policies.remove(&id);
            self.policy_results.push_back(PolicyResult {
                id,
                asked: None,
                answer: None,
            });
        }
    }

    /// A ping's answer or timeout, for whoever asked.
    pub fn poll_ping_result(&mut self) -> Option<PingResult> {
        self.ping_results.pop_front()
    }

    fn pong(&mut self, peer: PeerId, id: u32, now: Instant) {
        let Some(cert) = self.mesh.peer_cert(peer) else {
            return;
        };
        let (ip, name) = (cert.overlay_ip(), cert.name().to_string());
        let Some(pending) = self.pings.get(&id) else {
            return;
        };
        if pending.overlay_ip != ip {
            return;
        }
        let Some(pending) = self.pings.remove(&id) else {
            return;
        };
        let rtt = now.saturating_duration_since(pending.sent);
        self.rtts.insert(ip, rtt);
        if pending.report {
            let path = self.mesh.peer_path(peer);
            self.ping_results.push_back(PingResult {
                id,
                overlay_ip: ip,
                name: Some(name),
                rtt_ms: Some(rtt.as_secs_f64() * 1000.0),
                path: path.map(|(kind, _)| kind),
                endpoint: self.mesh.peer_endpoint(peer),
                relay: path.and_then(|(_, relay)| relay),
                unknown: false,
            });
        }
    }

    fn drive_pings(&mut self, now: Instant) {
        let lost: Vec<u32> = self
            .pings
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.sent) >= PING_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            let Some(p) = self.pings.remove(&id) else {
                continue;
            };
            if p.report {
                let name = self
                    .mesh
                    .peer_by_overlay(p.overlay_ip)
                    .and_then(|peer| self.mesh.peer_cert(peer))
                    .map(|c| c.name().to_string());
                self.ping_results.push_back(PingResult {
                    id,
                    overlay_ip: p.overlay_ip,
                    name,
                    rtt_ms: None,
                    path: None,
                    endpoint: None,
                    relay: None,
                    unknown: false,
                });
            }
        }
    }

    fn request_id(&mut self) -> u32 {
        let id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        id
    }
}

/// Cryptokey routing outbound: a peer gets only packets for its own overlay
/// address or for a subnet its certificate carries.
/// Whether the certificate authorizes the whole subnet.
fn covers(cert: &VerifiedCert, subnet: Ipv4Net) -> bool {
    cert.subnets()
        .iter()
        .any(|n| matches!(n, IpNet::V4(n) if n.contains(&subnet)))
}

fn may_receive(cert: &VerifiedCert, dst: Ipv4Addr) -> bool {
    dst == cert.overlay_ip()
        || cert
            .subnets()
            .iter()
            .any(|n| matches!(n, IpNet::V4(n) if n.contains(&dst)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tern_mesh::MeshSettings;
    use tern_shared::testing::{TestCa, TEST_NOW};

    fn node(ca: &TestCa) -> NodeCore {
        let me = ca.node("me", "100.64.0.5/10", &[], &[], 86_400);
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
    fn ping_refuses_what_it_cannot_reach_and_reports_silence() {
        let ca = TestCa::new("ca", &[], &[]);
        let mut core = node(&ca);
        let now = Instant::now();
        let err = core.ping("nobody", now).unwrap_err();
        assert!(err.contains("no peer named \"nobody\""), "{err}");
        assert!(core
            .ping("100.64.0.5", now)
            .unwrap_err()
            .contains("this node"));
        let err = core.ping("198.19.0.10", now).unwrap_err();
        assert!(err.contains("not in the overlay network"), "{err}");
        // An address nobody answered for yet: looked up, then given up on.
        let ip = Ipv4Addr::new(100, 64, 0, 6);
        let id = core.ping("100.64.0.6", now).unwrap();
        assert!(
            core.lookups.contains_key(&ip),
            "the peer is looked up first"
        );
        assert!(core.poll_ping_result().is_none());
        core.handle_timeout(now + PING_TIMEOUT);
        let result = core.poll_ping_result().expect("a timeout result");
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
