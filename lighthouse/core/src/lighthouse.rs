//! The lighthouse's sans-IO core: a mesh whose peers are the nodes that
//! register with it, and the registry it answers queries from.
//!
//! Drive it like the mesh: [`LighthouseCore::handle_datagram`] for each UDP
//! datagram, [`LighthouseCore::handle_timeout`] by
//! [`LighthouseCore::poll_timeout`], then drain [`LighthouseCore::poll_transmit`].
//! The only traffic it accepts inside sessions is control messages to its own
//! overlay address; everything else is dropped and counted.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;
use tern_mesh::{Mesh, MeshCounters, MeshEvent, PeerId, PeerStatus, Received, Transmit};
use tern_shared::cert::{VerifiedCert, RELAY_GROUP, RUNNER_GROUP};
use tern_shared::control::{
    ControlMessage, PeerInfo, RenewOutcome, Revocation, CONTROL_PORT, MAX_LABELS,
    MAX_REVOCATIONS_IN_REPLY,
};
use tern_shared::packet::{build_udp_ipv4, parse_udp_ipv4};
use tern_shared::show::list;
use tern_shared::transport::is_stream_endpoint;
use tern_shared::wire::{classify, DatagramKind, RelayEnvelope, TYPE_RELAYED, TYPE_RELAY_REQUEST};

use super::registry::{RegisteredNode, Registry, RunnerAd};
use super::relay::{Refusal, RelayCounters, RelayTable};
use super::relay_nodes::RelayNodes;
use super::waiting::WaitingQueries;

/// Hellos a lighthouse verifies or answers per second (a node's mesh takes
/// 100): after a restart every node joins again at once, each beginning
/// with a hello whose certificate is verified (Ed25519), so the bucket
/// bounds how fast the registry fills; at this rate 100,000 nodes are back
/// within a minute, for at most a quarter of a core spent on verifying.
const HELLOS_PER_SEC: u32 = 2_000;
/// Handshake messages a lighthouse takes per second before it asks for
/// cookies (a node's mesh takes 500): every node re-keys with it every two
/// minutes (WireGuard's REKEY_AFTER_TIME), 830 a second from 100,000 nodes.
const HANDSHAKES_PER_SEC: u64 = 1_000;
/// Registry entries and relay pairs whose time may be up, looked at per
/// call of [`LighthouseCore::handle_timeout`] (about 0.1 ms of work).
const EXPIRY_SLICE: usize = 256;

#[derive(Debug, Clone, Default, Serialize)]
pub struct LighthouseCounters {
    pub registrations: u64,
    pub queries: u64,
    pub queries_unanswered: u64,
    pub punches: u64,
    pub registry_full: u64,
    /// Registrations that advertised subnets outside the node's certificate.
    pub routes_refused: u64,
    pub non_control_drops: u64,
    pub bad_control_messages: u64,
    /// Runner adverts from certificates without the runner group.
    pub runner_adverts_refused: u64,
    /// Revocation messages sent (pushed or asked for).
    pub revocations_sent: u64,
    /// Zone adverts that named zones outside the node's certificate.
    pub zones_refused: u64,
    /// Node names asked for (mesh DNS).
    pub name_queries: u64,
    /// Lookups answered when their address registered, a moment after
    /// they were answered "unknown" (`waiting.rs`).
    pub queries_answered_late: u64,
    /// Pairs given a relay node of their own (`relay_nodes.rs`).
    pub relay_node_introductions: u64,
    /// Relay offers from certificates without the relay group.
    pub relay_offers_refused: u64,
    /// Flow records nodes sent, taken for the store.
    pub flow_records_received: u64,
    /// Batches of flow records not taken (the store's queue full): not
    /// acknowledged, so the node sends them again.
    pub flow_batches_refused: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LighthouseStatus {
    pub name: String,
    pub overlay_ip: Ipv4Addr,
    pub nodes: Vec<RegisteredNode>,
    pub peers: Vec<PeerStatus>,
    pub mesh_counters: MeshCounters,
    pub counters: LighthouseCounters,
    /// Whether this lighthouse relays, the pairs it may relay for now, and
    /// what it forwarded or refused.
    pub relay_enabled: bool,
    pub relay_introductions: usize,
    pub relay: RelayCounters,
    /// Certificates revoked (and not yet expired), and the list's version.
    pub revoked: usize,
    pub revocations_version: u32,
}

/// Renewal requests waiting for the shell at most (one per node).
const MAX_RENEWALS_WAITING: usize = 256;
/// Batches of flow records waiting for the shell's store, at most.
const MAX_FLOW_BATCHES_WAITING: usize = 1024;
/// Messages of flow records one node may send a second (up to 64 records
/// each): more are not acknowledged, so it sends them again later, and one
/// node cannot fill the store's queue for the others.
const FLOW_MESSAGES_PER_SEC: u32 = 200;
/// Nodes whose flow-record rate is tracked at once; past it, full buckets
/// are forgotten.
const MAX_FLOW_SENDERS: usize = 65_536;

/// Flow records one node sent in one message, for the store.
#[derive(Debug, Clone)]
pub struct FlowBatch {
    /// The node that made them (its verified certificate).
    pub node: String,
    pub node_fingerprint: tern_shared::cert::Fingerprint,
    /// The records the node dropped since it started.
    pub dropped: u64,
    pub flows: Vec<tern_shared::flows::FlowEntry>,
}

/// A node's request to renew the certificate that authenticated its
/// session ([`LighthouseCore::poll_renewal`]).
#[derive(Debug, Clone)]
pub struct RenewAsk {
    pub peer: PeerId,
    /// The certificate the session proved: what is renewed.
    pub cert: VerifiedCert,
    pub id: u32,
}

/// [`LighthouseCore::metrics`]: counters and sizes, borrowed.
#[derive(Debug, Clone)]
pub struct LighthouseMetrics<'a> {
    pub registered: usize,
    pub peer_paths: tern_mesh::PeerPaths,
    pub mesh_counters: &'a MeshCounters,
    pub counters: &'a LighthouseCounters,
    pub relay_introductions: usize,
    pub relay: &'a RelayCounters,
    /// Relay nodes that offered lately.
    pub relay_nodes: usize,
    pub revoked: usize,
    pub revocations_version: u32,
}

pub struct LighthouseCore {
    mesh: Mesh,
    registry: Registry,
    /// None: relaying off.
    relay: Option<RelayTable>,
    relay_counters: RelayCounters,
    /// Relayed datagrams waiting for `poll_transmit` (after the mesh's own).
    relayed: std::collections::VecDeque<Transmit>,
    name: String,
    overlay_ip: Ipv4Addr,
    counters: LighthouseCounters,
    scratch: Vec<u8>,
    last_expiry: Instant,
    /// Revoked certificates by version (the store's sequence), oldest first.
    revocations: Vec<(u32, Revocation)>,
    /// Renewal requests for the shell.
    renewals: std::collections::VecDeque<RenewAsk>,
    flow_batches: std::collections::VecDeque<FlowBatch>,
    flow_senders: std::collections::HashMap<Ipv4Addr, tern_mesh::rate::TokenBucket>,
    /// Lookups for addresses not registered yet (`waiting.rs`).
    waiting: WaitingQueries,
    /// Nodes that relay for others (`relay_nodes.rs`).
    relay_nodes: RelayNodes,
    /// The admin listener's packets (`admin.rs`).
    admin: crate::admin::AdminPlane,
}

impl LighthouseCore {
    pub fn new(mut mesh: Mesh, own_cert: &VerifiedCert, registry: Registry, now: Instant) -> Self {
        mesh.set_admission_rates(HELLOS_PER_SEC, HANDSHAKES_PER_SEC, now);
        LighthouseCore {
            mesh,
            registry,
            relay: None,
            relay_counters: RelayCounters::default(),
            relayed: std::collections::VecDeque::new(),
            name: own_cert.name().to_string(),
            overlay_ip: own_cert.overlay_ip(),
            counters: LighthouseCounters::default(),
            scratch: vec![0u8; 65_536],
            last_expiry: now,
            revocations: Vec::new(),
            renewals: std::collections::VecDeque::new(),
            flow_batches: std::collections::VecDeque::new(),
            flow_senders: std::collections::HashMap::new(),
            admin: crate::admin::AdminPlane::default(),
            waiting: WaitingQueries::default(),
            relay_nodes: RelayNodes::default(),
        }
    }

    /// Turns relaying on with these bounds (it is off until called).
    pub fn enable_relay(&mut self, table: RelayTable) {
        self.relay = Some(table);
    }

    /// Follows `[relay]` on a reload: on (with this per-node rate, keeping
    /// the pairs already introduced) or off. `new_table` makes the table
    /// when relaying was off.
    pub fn reconfigure_relay(
        &mut self,
        enabled: bool,
        packets_per_sec: u32,
        new_table: impl FnOnce() -> RelayTable,
    ) {
        match (&mut self.relay, enabled) {
            (Some(table), true) => table.set_packets_per_sec(packets_per_sec),
            (None, true) => self.relay = Some(new_table()),
            (_, false) => self.relay = None,
        }
    }

    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        if classify(datagram) == DatagramKind::RelayRequest {
            self.handle_relay_request(from, datagram, now);
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Received::Packet { peer, packet } =
            self.mesh.handle_datagram(from, datagram, &mut scratch, now)
        {
            self.handle_packet(peer, from, packet, now);
        }
        self.scratch = scratch;
        self.drain_mesh_events();
    }

    /// The version of the revocation list: the newest entry's.
    pub fn revocations_version(&self) -> u32 {
        self.revocations.last().map_or(0, |(v, _)| *v)
    }

    /// Takes the revocation list as the store has it now (version, entry;
    /// not yet expired). New entries are refused from now on, their
    /// sessions and registrations dropped, and pushed at once to every
    /// registered node, which tears down its own sessions with them.
    pub fn set_revocations(&mut self, mut list: Vec<(u32, Revocation)>, now: Instant) {
        list.sort_by_key(|(v, _)| *v);
        let before = self.revocations_version();
        let new: Vec<(u32, Revocation)> =
            list.iter().filter(|(v, _)| *v > before).copied().collect();
        self.revocations = list;
        if new.is_empty() {
            return;
        }
        let entries: Vec<_> = new
            .iter()
            .map(|(_, r)| (r.fingerprint, r.not_after))
            .collect();
        // Every registered node hears of it first, the revoked ones too:
        // they are told why they are cut off (and stop) rather than find
        // their sessions gone. Then their sessions end.
        let peers = self.registry.peers();
        let mut since = before;
        let chunks: Vec<&[(u32, Revocation)]> = new.chunks(MAX_REVOCATIONS_IN_REPLY).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let version = chunk.last().map_or(since, |(v, _)| *v);
            let msg = ControlMessage::Revocations {
                id: 0,
                since,
                version,
                entries: chunk.iter().map(|(_, r)| *r).collect(),
                complete: i + 1 == chunks.len(),
            };
            for (_, peer) in &peers {
                if let Some(cert) = self.mesh.peer_cert(*peer).cloned() {
                    self.counters.revocations_sent += 1;
                    self.reply(*peer, &cert, &msg, now);
                }
            }
            since = version;
        }
        let before_peers = self.mesh.peer_count();
        self.mesh.revoke(&entries, now);
        tracing::info!(
            new = new.len(),
            revoked = self.revocations.len(),
            sessions_torn_down = before_peers - self.mesh.peer_count(),
            "certificates revoked; pushed to the registered nodes, sessions with them ended"
        );
        self.drain_mesh_events();
    }

    /// The answer to a node that holds the list up to `since`.
    fn revocations_after(&self, id: u32, since: u32) -> ControlMessage {
        let version = self.revocations_version();
        // A node ahead of us saw another store (or ours before a reset):
        // it gets everything.
        let since = if since > version { 0 } else { since };
        let after: Vec<&(u32, Revocation)> = self
            .revocations
            .iter()
            .filter(|(v, _)| *v > since)
            .collect();
        let batch = &after[..after.len().min(MAX_REVOCATIONS_IN_REPLY)];
        ControlMessage::Revocations {
            id,
            since,
            version: batch.last().map_or(version, |(v, _)| *v),
            entries: batch.iter().map(|(_, r)| *r).collect(),
            complete: batch.len() == after.len(),
        }
    }

    /// Follows the mesh's removals: a node whose session is gone (expired,
    /// replaced, revoked) leaves the registry and the relay.
    fn drain_mesh_events(&mut self) {
        while let Some(event) = self.mesh.poll_event() {
            if let MeshEvent::PeerRemoved { overlay_ip, .. } = event {
                if self
                    .registry
                    .peer(overlay_ip)
                    .is_some_and(|p| self.mesh.peer_cert(p).is_none())
                {
                    self.registry.remove(overlay_ip);
                    self.relay_nodes.remove(overlay_ip);
                    if let Some(relay) = self.relay.as_mut() {
                        relay.forget(overlay_ip);
                    }
                }
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.mesh.handle_timeout(now);
        // Silent nodes and idle relay pairs go a slice at a time, at every
        // call (a large mesh asks for one every few milliseconds): nodes
        // that registered at once fall due at once, and no call should
        // hold up the packets behind it for long.
        for (ip, peer) in self.registry.expire_some(now, EXPIRY_SLICE) {
            tracing::info!(overlay_ip = %ip, "node silent; dropped from the registry");
            self.mesh.remove_peer(peer);
            self.relay_nodes.remove(ip);
            if let Some(relay) = self.relay.as_mut() {
                relay.forget(ip);
            }
        }
        if let Some(relay) = self.relay.as_mut() {
            relay.expire_some(now, EXPIRY_SLICE);
        }
        if now.saturating_duration_since(self.last_expiry) >= Duration::from_secs(1) {
            self.last_expiry = now;
            self.relay_nodes.expire(now);
            if let Some(relay) = self.relay.as_mut() {
                relay.drop_full_budgets(now);
            }
        }
        self.drain_mesh_events();
    }

    /// The earliest moment [`LighthouseCore::handle_timeout`] has work:
    /// the mesh's next tick, or at the latest a second after the last
    /// expiry of silent nodes and idle relay pairs. A fixed point in time.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        self.mesh
            .poll_timeout(now)
            .min(self.last_expiry + Duration::from_secs(1))
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.mesh
            .poll_transmit()
            .or_else(|| self.relayed.pop_front())
    }

    /// The registry to change by hand: what tests use to play a lighthouse
    /// that lies (nodes must not believe it).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A reloaded identity (`[pki]` on SIGHUP): see
    /// [`Mesh::replace_identity`]. One for another overlay address is
    /// refused (nodes know their lighthouses by address and name).
    pub fn replace_identity(
        &mut self,
        secret: x25519_dalek::StaticSecret,
        cert: &VerifiedCert,
        ca: tern_shared::cert::CaPool,
        now: Instant,
    ) -> Result<tern_mesh::IdentityChange, String> {
        if cert.overlay_ip() != self.overlay_ip {
            return Err(format!(
                "the new certificate is for {}, this lighthouse runs as {}; an address change needs a restart",
                cert.overlay_ip(),
                self.overlay_ip
            ));
        }
        self.name = cert.name().to_string();
        Ok(self.mesh.replace_identity(secret, cert, ca, now))
    }

    /// What metrics need, without the lists `status` carries (a scrape of a
    /// lighthouse holding 100,000 nodes copies no node).
    pub fn metrics(&self) -> LighthouseMetrics<'_> {
        LighthouseMetrics {
            registered: self.registry.len(),
            peer_paths: self.mesh.peer_paths(),
            mesh_counters: self.mesh.counters(),
            counters: &self.counters,
            relay_introductions: self.relay.as_ref().map_or(0, |r| r.introductions()),
            relay: &self.relay_counters,
            relay_nodes: self.relay_nodes.len(),
            revoked: self.revocations.len(),
            revocations_version: self.revocations_version(),
        }
    }

    /// The admin listener on `port` of the overlay address (None: off):
    /// TCP to it from a peer's own address goes to [`Self::poll_admin_packet`].
    pub fn set_admin_port(&mut self, port: Option<u16>) {
        self.admin.set_port(port);
    }

    /// A packet for the shell's admin stack, as a TUN device would get it.
    pub fn poll_admin_packet(&mut self) -> Option<Vec<u8>> {
        self.admin.poll()
    }

    /// A packet the admin stack sends: to a peer's own overlay address,
    /// from the admin port, through that peer's session. Anything else is
    /// dropped and counted.
    pub fn send_admin_packet(&mut self, packet: &[u8], now: Instant) {
        let Some(dst) = self.admin.may_send(packet, self.overlay_ip) else {
            return;
        };
        match self.mesh.peer_by_overlay(dst) {
            Some(peer) => self.mesh.send_packet(peer, packet, now),
            None => self.admin.refused_out += 1,
        }
    }

    /// The verified certificate of the peer whose own overlay address is
    /// `ip`: who an admin connection's caller is.
    pub fn peer_identity(&self, ip: Ipv4Addr) -> Option<VerifiedCert> {
        let cert = self.mesh.peer_cert(self.mesh.peer_by_overlay(ip)?)?;
        (cert.overlay_ip() == ip).then(|| cert.clone())
    }

    /// The admin listener's packet counts: dropped in (the stack behind),
    /// refused out.
    pub fn admin_packet_drops(&self) -> (u64, u64) {
        (self.admin.dropped, self.admin.refused_out)
    }

    /// A page of gateways for the admin API.
    pub fn admin_gateways(
        &self,
        after: Option<Ipv4Addr>,
        limit: usize,
        now: Instant,
    ) -> crate::admin::Page<crate::registry::GatewayEntry> {
        let (items, next) = self.registry.gateways_after(after, limit, now);
        crate::admin::Page { items, next }
    }

    /// A page of runners for the admin API.
    pub fn admin_runners(
        &self,
        after: Option<Ipv4Addr>,
        limit: usize,
        now: Instant,
    ) -> crate::admin::Page<crate::registry::RunnerEntry> {
        let (items, next) = self.registry.runners_after(after, limit, now);
        crate::admin::Page { items, next }
    }

    /// A page of registered nodes for the admin API, those `filter` lets
    /// through, each with what its verified certificate says (`admin.rs`).
    /// Unfiltered, a page costs its rows; filtered, the count of matches
    /// costs a pass over the registry (cheap fields, no copies).
    pub fn admin_nodes(
        &self,
        filter: &crate::admin::NodeFilter,
        after: Option<Ipv4Addr>,
        limit: usize,
        now: Instant,
    ) -> crate::admin::NodesPage {
        let passes = |n: &crate::registry::NodeBrief<'_>| {
            filter.is_empty() || {
                // The certificate only when a group is asked for.
                let groups = match filter.group {
                    Some(_) => self.mesh.peer_cert(n.peer).map_or(&[][..], |c| c.groups()),
                    None => &[],
                };
                filter.matches(n.name, n.overlay_ip, n.ephemeral, groups)
            }
        };
        let mut matching = self.registry.scan_after(after).filter(passes);
        let page: Vec<Ipv4Addr> = matching
            .by_ref()
            .take(limit)
            .map(|n| n.overlay_ip)
            .collect();
        let next = if matching.next().is_some() {
            page.last().copied()
        } else {
            None
        };
        let total = if filter.is_empty() {
            self.registry.len()
        } else {
            self.registry.scan_after(None).filter(passes).count()
        };
        crate::admin::NodesPage {
            nodes: page
                .into_iter()
                .filter_map(|ip| self.admin_node(ip, now))
                .collect(),
            total,
            next,
        }
    }

    /// One registered node as the admin API shows it.
    pub fn admin_node(&self, ip: Ipv4Addr, now: Instant) -> Option<crate::admin::AdminNode> {
        let (n, peer) = self.registry.node(ip, now)?;
        let cert = self.mesh.peer_cert(peer);
        let not_after = cert.map_or(0, |c| c.not_after());
        Some(crate::admin::AdminNode {
            groups: cert.map(|c| c.groups().to_vec()).unwrap_or_default(),
            fingerprint: cert
                .map(|c| c.fingerprint().to_string())
                .unwrap_or_default(),
            not_after,
            expires: tern_shared::cert::format_unix_time(not_after),
            ephemeral: n.ephemeral,
            issued_by: n.issued_by,
            transport: if is_stream_endpoint(&n.observed) {
                "tcp"
            } else {
                "udp"
            },
            observed: n.observed,
            local: n.local,
            routes: n.routes.iter().map(ToString::to_string).collect(),
            zones: n.zones,
            runner: n.runner,
            relayed_with: self
                .relay
                .as_ref()
                .map(|r| r.partners(ip).to_vec())
                .unwrap_or_default(),
            enrollment: None,
            registered_secs_ago: n.registered_secs_ago,
            last_seen_secs_ago: n.last_seen_secs_ago,
            name: n.name,
            overlay_ip: n.overlay_ip,
        })
    }

    /// The console's overview: counts over the registry (one pass), the
    /// first gateways and runners, the registry's change count.
    pub fn admin_overview(&self, now: Instant) -> crate::admin::AdminOverview {
        let (mut ephemeral, mut over_tcp) = (0, 0);
        for n in self.registry.scan_after(None) {
            ephemeral += usize::from(n.ephemeral);
            over_tcp += usize::from(is_stream_endpoint(&n.observed));
        }
        crate::admin::AdminOverview {
            nodes: self.registry.len(),
            ephemeral,
            over_tcp,
            relayed_pairs: self.relay.as_ref().map_or(0, |r| r.introductions()),
            gateways: self.admin_gateways(None, crate::admin::OVERVIEW_ROWS, now),
            runners: self.admin_runners(None, crate::admin::OVERVIEW_ROWS, now),
            changes: self.registry.changes(),
        }
    }

    /// The registry's change count (see [`crate::admin::AdminOverview`]).
    pub fn admin_changes(&self) -> u64 {
        self.registry.changes()
    }

    /// A runner's advert (its labels and load) or its newest jobs, kept
    /// for lookups and the admin console; only from a certificate with the
    /// runner group (and jobs only from a node that advertised a runner).
    fn runner_message(&mut self, cert: &VerifiedCert, msg: ControlMessage) {
        match msg {
            ControlMessage::RunnerAdvert { labels, load, .. } => {
                if !cert.has_group(RUNNER_GROUP) {
                    self.counters.runner_adverts_refused += 1;
                    tracing::debug!("runner advert from a certificate without the '{RUNNER_GROUP}' group; ignored");
                    return;
                }
                let labels: Vec<String> = labels
                    .into_iter()
                    .filter(|l| !l.is_empty())
                    .take(MAX_LABELS)
                    .collect();
                if self
                    .registry
                    .set_runner(cert.overlay_ip(), RunnerAd { labels, load })
                {
                    tracing::trace!(?load, "runner load");
                }
            }
            ControlMessage::RunnerJobs { mut jobs, .. } => {
                jobs.truncate(tern_shared::control::MAX_RECENT_JOBS);
                if !cert.has_group(RUNNER_GROUP)
                    || !self.registry.set_runner_jobs(cert.overlay_ip(), jobs)
                {
                    self.counters.runner_adverts_refused += 1;
                    tracing::debug!("runner jobs from a node that advertised no runner; ignored");
                }
            }
            _ => {}
        }
    }

    pub fn status(&self, now: Instant) -> LighthouseStatus {
        LighthouseStatus {
            name: self.name.clone(),
            overlay_ip: self.overlay_ip,
            nodes: self.registry.nodes(now),
            peers: self.mesh.peer_statuses(),
            mesh_counters: self.mesh.counters().clone(),
            counters: self.counters.clone(),
            relay_enabled: self.relay.is_some(),
            relay_introductions: self.relay.as_ref().map_or(0, |r| r.introductions()),
            relay: self.relay_counters.clone(),
            revoked: self.revocations.len(),
            revocations_version: self.revocations_version(),
        }
    }

    /// A relay request: forwarded as-is (a WireGuard message, re-labelled
    /// with the sender's overlay address) to the target's registered address
    /// when the sender is the registered node at `from`, the target is
    /// registered, the two were introduced here, and the sender is within
    /// its budget. Anything else is dropped and counted.
    fn handle_relay_request(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        let Some(relay) = self.relay.as_mut() else {
            self.relay_counters.refused_malformed += 1;
            return;
        };
        let env = match RelayEnvelope::decode(TYPE_RELAY_REQUEST, datagram) {
            Ok(env) => env,
            Err(e) => {
                self.relay_counters.refused_malformed += 1;
                tracing::trace!(%from, error = %e, "relay request refused");
                return;
            }
        };
        let Some(sender) = self.registry.node_at(from) else {
            self.relay_counters.refused_unregistered_sender += 1;
            tracing::trace!(%from, "relay request from an unregistered address");
            return;
        };
        let Some(dst) = self.registry.observed(env.peer) else {
            self.relay_counters.refused_unregistered_target += 1;
            return;
        };
        match relay.check(sender, env.peer, now) {
            Ok(()) => {}
            Err(Refusal::NotIntroduced) => {
                self.relay_counters.refused_not_introduced += 1;
                tracing::trace!(%sender, target = %env.peer, "relay request for a pair never introduced");
                return;
            }
            Err(Refusal::RateLimited) => {
                self.relay_counters.refused_rate_limited += 1;
                return;
            }
        }
        let message_type = env.message.first().copied().unwrap_or(0);
        self.relay_counters
            .count_forwarded(message_type, env.message.len());
        let out = RelayEnvelope {
            peer: sender,
            message: env.message,
        }
        .encode(TYPE_RELAYED);
        self.relayed.push_back(Transmit { dst, payload: out });
    }

    fn handle_packet(&mut self, peer: PeerId, from: SocketAddr, packet: &[u8], now: Instant) {
        let Some(cert) = self.mesh.peer_cert(peer).cloned() else {
            return;
        };
        if self.admin.take(packet, self.overlay_ip, cert.overlay_ip()) {
            return;
        }
        let Some(udp) = parse_udp_ipv4(packet).filter(|u| {
            u.dst == self.overlay_ip && u.dst_port == CONTROL_PORT && u.src == cert.overlay_ip()
        }) else {
            self.counters.non_control_drops += 1;
            return;
        };
        let msg = match ControlMessage::decode(udp.payload) {
            Ok(m) => m,
            Err(e) => {
                self.counters.bad_control_messages += 1;
                tracing::debug!(node = cert.name(), error = %e, "bad control message");
                return;
            }
        };
        let _span =
            tracing::debug_span!("node", name = cert.name(), overlay_ip = %cert.overlay_ip())
                .entered();
        self.registry.moved(cert.overlay_ip(), from);
        match msg {
            ControlMessage::Register { id, local, routes } => {
                self.register(peer, &cert, from, id, &local, routes, now)
            }
            ControlMessage::Query { id, overlay_ip } => {
                self.counters.queries += 1;
                if !self.answer_query(peer, &cert, from, id, overlay_ip, now) {
                    self.counters.queries_unanswered += 1;
                    self.waiting
                        .remember(overlay_ip, cert.overlay_ip(), id, now);
                }
            }
            ControlMessage::Deregister { .. } => {
                tracing::info!("node left");
                self.registry.remove(cert.overlay_ip());
                self.relay_nodes.remove(cert.overlay_ip());
                if let Some(relay) = self.relay.as_mut() {
                    relay.forget(cert.overlay_ip());
                }
            }
            ControlMessage::RoutesQuery { id, after } => {
                let (routes, complete) = self.registry.routes_after(after);
                let page = ControlMessage::RoutesReply {
                    id,
                    routes,
                    complete,
                };
                self.reply(peer, &cert, &page, now);
            }
            ControlMessage::Ping { id } => {
                self.reply(peer, &cert, &ControlMessage::Pong { id }, now);
            }
            msg @ (ControlMessage::RunnerAdvert { .. } | ControlMessage::RunnerJobs { .. }) => {
                self.runner_message(&cert, msg);
            }
            ControlMessage::RunnersQuery { id, selector } => {
                let runners = self.registry.runners(&selector);
                self.reply(
                    peer,
                    &cert,
                    &ControlMessage::RunnersReply { id, runners },
                    now,
                );
            }
            ControlMessage::RevocationsQuery { id, since } => {
                let answer = self.revocations_after(id, since);
                self.counters.revocations_sent += 1;
                self.reply(peer, &cert, &answer, now);
            }
            msg @ (ControlMessage::ZoneAdvert { .. }
            | ControlMessage::ZonesQuery { .. }
            | ControlMessage::NameQuery { .. }) => self.handle_names(peer, &cert, from, msg, now),
            ControlMessage::RegisterAck { .. }
            | ControlMessage::Revocations { .. }
            | ControlMessage::PolicyQuery { .. }
            | ControlMessage::PolicyReply { .. }
            | ControlMessage::QueryReply { .. }
            | ControlMessage::Punch { .. }
            | ControlMessage::RoutesReply { .. }
            | ControlMessage::RunnersReply { .. }
            | ControlMessage::ZonesReply { .. }
            | ControlMessage::ZonesChanged { .. }
            | ControlMessage::NameReply { .. }
            | ControlMessage::DnsQuery { .. }
            | ControlMessage::DnsAnswer { .. }
            | ControlMessage::RenewReply { .. }
            | ControlMessage::Pong { .. } => {
                self.counters.bad_control_messages += 1;
            }
            ControlMessage::RelayOffer { .. } => {
                if cert.has_group(RELAY_GROUP) {
                    self.relay_nodes.offer(cert.overlay_ip(), now);
                } else {
                    self.counters.relay_offers_refused += 1;
                    tracing::debug!(
                        "relay offer from a certificate without the '{RELAY_GROUP}' group; ignored"
                    );
                }
            }
            ControlMessage::ServicesAdvert { services, .. } => {
                self.registry.set_services(cert.overlay_ip(), services);
            }
            ControlMessage::ServicesQuery { id, name } => {
                let (services, complete) = self.registry.services(&name);
                let reply = ControlMessage::ServicesReply {
                    id,
                    services,
                    complete,
                };
                self.reply(peer, &cert, &reply, now);
            }
            ControlMessage::RelayIntroduce { .. }
            | ControlMessage::UseRelay { .. }
            | ControlMessage::ServicesReply { .. } => {
                self.counters.bad_control_messages += 1;
            }
            ControlMessage::FlowRecords { id, dropped, flows } => {
                self.flow_records(peer, &cert, id, dropped, flows, now)
            }
            ControlMessage::FlowRecordsAck { .. } => {
                self.counters.bad_control_messages += 1;
            }
            ControlMessage::RenewRequest { id } => {
                // At most one waiting per node: a node repeats its request
                // until answered, and the shell's answer is one.
                if self.renewals.len() < MAX_RENEWALS_WAITING
                    && !self.renewals.iter().any(|r| r.peer == peer)
                {
                    self.renewals.push_back(RenewAsk { peer, cert, id });
                }
            }
        }
    }

    /// A node's flow records: taken for the store and acknowledged, or
    /// (too many waiting, or the node over its rate) neither, so that it
    /// sends them again.
    fn flow_records(
        &mut self,
        peer: PeerId,
        cert: &VerifiedCert,
        id: u32,
        dropped: u64,
        flows: Vec<tern_shared::flows::FlowEntry>,
        now: Instant,
    ) {
        if self.flow_batches.len() >= MAX_FLOW_BATCHES_WAITING
            || !self.flow_sender_may_send(cert.overlay_ip(), now)
        {
            self.counters.flow_batches_refused += 1;
            return;
        }
        self.counters.flow_records_received += flows.len() as u64;
        self.flow_batches.push_back(FlowBatch {
            node: cert.name().to_string(),
            node_fingerprint: cert.fingerprint(),
            dropped,
            flows,
        });
        self.reply(peer, cert, &ControlMessage::FlowRecordsAck { id }, now);
    }

    /// Whether the node at `ip` is within its rate of flow-record messages.
    fn flow_sender_may_send(&mut self, ip: Ipv4Addr, now: Instant) -> bool {
        if self.flow_senders.len() >= MAX_FLOW_SENDERS && !self.flow_senders.contains_key(&ip) {
            self.flow_senders.retain(|_, b| !b.is_full(now));
            if self.flow_senders.len() >= MAX_FLOW_SENDERS {
                return false;
            }
        }
        self.flow_senders
            .entry(ip)
            .or_insert_with(|| tern_mesh::rate::TokenBucket::new(FLOW_MESSAGES_PER_SEC, now))
            .take(now)
    }

    /// The next batch of flow records a node sent, for the shell's store.
    pub fn poll_flow_batch(&mut self) -> Option<FlowBatch> {
        self.flow_batches.pop_front()
    }

    /// A batch the shell could not take yet (its store's queue full): first
    /// again. While batches wait, new ones beyond the bound are not
    /// acknowledged, so nodes keep them.
    pub fn return_flow_batch(&mut self, batch: FlowBatch) {
        self.flow_batches.push_front(batch);
    }

    /// The next certificate a node asked to renew (`[pki] renew`), for the
    /// shell to decide with its issuer and store; answered with
    /// [`LighthouseCore::answer_renewal`].
    pub fn poll_renewal(&mut self) -> Option<RenewAsk> {
        self.renewals.pop_front()
    }

    /// Sends the decision on `ask` to its node, in its session.
    pub fn answer_renewal(&mut self, ask: &RenewAsk, outcome: RenewOutcome, now: Instant) {
        let msg = ControlMessage::RenewReply {
            id: ask.id,
            outcome,
        };
        self.reply(ask.peer, &ask.cert, &msg, now);
    }

    /// A node registers (or refreshes its registration): filed under its
    /// certificate's address, its routes kept as far as the certificate
    /// authorizes them, and acknowledged.
    /// Answers `asker`'s query `id` for `target`: the registered node's
    /// certificate and endpoints, or unknown; for a node found, the two are
    /// introduced to the relay and the target is asked to punch toward the
    /// asker. Whether it was found.
    fn answer_query(
        &mut self,
        asker_peer: PeerId,
        asker: &VerifiedCert,
        asker_from: SocketAddr,
        id: u32,
        target: Ipv4Addr,
        now: Instant,
    ) -> bool {
        let answer = self.registry.lookup(target);
        let found = answer.is_some();
        if found {
            // Before the answer, so the asker knows its relay when it
            // starts toward the target.
            self.introduce_relay_node(asker.overlay_ip(), target, now);
        }
        let reply = ControlMessage::QueryReply {
            id,
            overlay_ip: target,
            peer: answer,
        };
        self.reply(asker_peer, asker, &reply, now);
        if found {
            if let Some(relay) = self.relay.as_mut() {
                if relay.introduce(asker.overlay_ip(), target, now) {
                    self.relay_counters.introductions_evicted += 1;
                }
            }
            self.punch(target, asker, asker_from, now);
        }
        found
    }

    /// `target` just registered: the nodes that asked for it a moment ago
    /// and were told "unknown" get the answer now.
    fn answer_waiting(&mut self, target: Ipv4Addr, now: Instant) {
        for w in self.waiting.take(target, now) {
            let Some(asker_peer) = self.registry.peer(w.asker) else {
                continue;
            };
            let Some(asker) = self.mesh.peer_cert(asker_peer).cloned() else {
                continue;
            };
            let Some(from) = self.registry.observed(w.asker) else {
                continue;
            };
            if self.answer_query(asker_peer, &asker, from, w.id, target, now) {
                self.counters.queries_answered_late += 1;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        peer: PeerId,
        cert: &VerifiedCert,
        from: SocketAddr,
        id: u32,
        local: &[SocketAddr],
        routes: Vec<Ipv4Net>,
        now: Instant,
    ) {
        self.counters.registrations += 1;
        match self.registry.register(
            cert.overlay_ip(),
            cert.name(),
            cert.encoded(),
            peer,
            from,
            local,
            now,
        ) {
            Ok(()) => {
                tracing::trace!(%from, ?local, "registered");
                self.registry
                    .set_issued_by(cert.overlay_ip(), cert.issued_by());
                self.accept_routes(cert, routes);
                self.reply(
                    peer,
                    cert,
                    &ControlMessage::RegisterAck {
                        id,
                        observed: from,
                        relay: self.relay.is_some(),
                        revocations: self.revocations_version(),
                    },
                    now,
                );
                if !self.waiting.is_empty() {
                    self.answer_waiting(cert.overlay_ip(), now);
                }
            }
            Err(e) => {
                self.counters.registry_full += 1;
                tracing::warn!(error = %e, "registration refused");
            }
        }
    }

    /// The messages for names: a gateway's zones, the zones list, a node
    /// by its certificate name.
    fn handle_names(
        &mut self,
        peer: PeerId,
        cert: &VerifiedCert,
        from: SocketAddr,
        msg: ControlMessage,
        now: Instant,
    ) {
        match msg {
            ControlMessage::ZoneAdvert { zones, .. } => self.accept_zones(cert, zones, now),
            ControlMessage::ZonesQuery { id, after } => {
                let (zones, complete) = self.registry.zones_after(after.as_ref());
                let page = ControlMessage::ZonesReply {
                    id,
                    zones,
                    complete,
                };
                self.reply(peer, cert, &page, now);
            }
            ControlMessage::NameQuery { id, name } => {
                self.counters.name_queries += 1;
                let answer = self.registry.by_name(&name);
                let found = answer.as_ref().and_then(|p| {
                    tern_shared::cert::Cert::decode(&p.cert)
                        .ok()
                        .and_then(|c| c.body.ips.first().map(|n| n.addr()))
                });
                let msg = ControlMessage::NameReply { id, peer: answer };
                self.reply(peer, cert, &msg, now);
                // As for an address lookup: the two nodes are about to talk.
                if let Some(std::net::IpAddr::V4(target)) = found {
                    self.introduce_relay_node(cert.overlay_ip(), target, now);
                    if let Some(relay) = self.relay.as_mut() {
                        if relay.introduce(cert.overlay_ip(), target, now) {
                            self.relay_counters.introductions_evicted += 1;
                        }
                    }
                    self.punch(target, cert, from, now);
                }
            }
            _ => self.counters.bad_control_messages += 1,
        }
    }

    /// Keeps the advertised zones the node's certificate carries (each
    /// equal to or under one of its zones); the rest are ignored and
    /// logged (once per change).
    fn accept_zones(&mut self, cert: &VerifiedCert, advertised: Vec<String>, now: Instant) {
        let (ok, refused): (Vec<String>, Vec<String>) =
            advertised.into_iter().partition(|z| cert.answers_for(z));
        if !refused.is_empty() {
            self.counters.zones_refused += 1;
            tracing::warn!(refused = %list(&refused), authorized = %list(cert.dns_zones()), "node advertises DNS zones its certificate does not carry; ignored");
        }
        if !self.registry.set_zones(cert.overlay_ip(), ok.clone()) {
            return;
        }
        if !ok.is_empty() {
            tracing::info!(zones = %list(&ok), "node answers DNS for zones");
        }
        // Every registered node reads the list again now: a job that just
        // joined may ask a name under the new zone at once.
        for (ip, peer) in self.registry.peers() {
            if ip == cert.overlay_ip() {
                continue;
            }
            if let Some(to) = self.mesh.peer_cert(peer).cloned() {
                self.reply(peer, &to, &ControlMessage::ZonesChanged { id: 0 }, now);
            }
        }
    }

    /// Keeps the advertised subnets the node's certificate authorizes; the
    /// rest are ignored and logged (once per change).
    fn accept_routes(&mut self, cert: &VerifiedCert, advertised: Vec<Ipv4Net>) {
        let (ok, refused): (Vec<Ipv4Net>, Vec<Ipv4Net>) = advertised.into_iter().partition(|net| {
            cert.subnets()
                .iter()
                .any(|s| matches!(s, IpNet::V4(s) if s.contains(net)))
        });
        if !refused.is_empty() {
            self.counters.routes_refused += 1;
        }
        if self
            .registry
            .set_routes(cert.overlay_ip(), ok.clone(), refused.clone())
        {
            if !ok.is_empty() {
                tracing::info!(routes = %list(&ok), "node routes subnets");
            }
            if !refused.is_empty() {
                tracing::warn!(refused = %list(&refused), authorized = %list(cert.subnets()), "node advertises subnets its certificate does not carry; ignored");
            }
        }
    }

    /// Gives the pair `a`, `b` a relay node, when one offered and both
    /// reach it over UDP (neither registered over a TCP link, which ends
    /// here): it is told to forward between them, and they to use it (with
    /// its certificate: they open sessions with it, by which it knows them).
    fn introduce_relay_node(&mut self, a: Ipv4Addr, b: Ipv4Addr, now: Instant) {
        if self.relay_nodes.is_empty() {
            return;
        }
        let udp_at = |ip: Ipv4Addr| {
            self.registry
                .observed(ip)
                .filter(|at| !is_stream_endpoint(at))
        };
        // Both reach the relay over UDP (a TCP link ends here).
        if udp_at(a).is_none() || udp_at(b).is_none() {
            return;
        }
        let Some(relay) = self.relay_nodes.choose(a, b, now, |r| udp_at(r).is_some()) else {
            return;
        };
        let Some(relay_at) = udp_at(relay) else {
            return;
        };
        let mut sessions = Vec::with_capacity(3);
        for ip in [relay, a, b] {
            let Some(peer) = self.registry.peer(ip) else {
                return;
            };
            let Some(cert) = self.mesh.peer_cert(peer).cloned() else {
                return;
            };
            sessions.push((peer, cert));
        }
        self.counters.relay_node_introductions += 1;
        tracing::debug!(%a, %b, %relay, "relay node for the pair");
        let introduce = ControlMessage::RelayIntroduce { id: 0, a, b };
        self.reply(sessions[0].0, &sessions[0].1, &introduce, now);
        let relay_info = PeerInfo {
            cert: sessions[0].1.encoded().to_vec(),
            endpoints: vec![relay_at],
        };
        for (i, other) in [(1, b), (2, a)] {
            let msg = ControlMessage::UseRelay {
                id: 0,
                peer: other,
                relay: relay_info.clone(),
            };
            self.reply(sessions[i].0, &sessions[i].1, &msg, now);
        }
    }

    /// Tells the target of a query to send toward the asker now, with the
    /// asker's certificate, so both NAT mappings open at once.
    fn punch(
        &mut self,
        target_ip: Ipv4Addr,
        asker: &VerifiedCert,
        asker_observed: SocketAddr,
        now: Instant,
    ) {
        let Some(target_peer) = self.registry.peer(target_ip) else {
            return;
        };
        let Some(target_cert) = self.mesh.peer_cert(target_peer).cloned() else {
            return;
        };
        let endpoints = self
            .registry
            .lookup(asker.overlay_ip())
            .map(|i| i.endpoints)
            .unwrap_or_else(|| vec![asker_observed]);
        self.counters.punches += 1;
        let msg = ControlMessage::Punch {
            id: 0,
            peer: PeerInfo {
                cert: asker.encoded().to_vec(),
                endpoints,
            },
        };
        self.reply(target_peer, &target_cert, &msg, now);
    }

    fn reply(&mut self, peer: PeerId, to: &VerifiedCert, msg: &ControlMessage, now: Instant) {
        let payload = match msg.encode() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "control message did not encode");
                return;
            }
        };
        let packet = build_udp_ipv4(
            self.overlay_ip,
            to.overlay_ip(),
            CONTROL_PORT,
            CONTROL_PORT,
            &payload,
        );
        self.mesh.send_packet(peer, &packet, now);
    }
}
