//! Names: mesh DNS and split DNS.
//!
//! A query from a local program (or `tern resolve`, or a proxy) comes in
//! through [`NodeCore::resolve`] and is one of three kinds:
//!
//! - a **node name**, `<certificate name>.<domain>`: answered from a
//!   certificate this node verified itself — its own, a peer's, or one a
//!   lighthouse hands over for the name (checked against our CAs and the
//!   name asked, never taken on the lighthouse's word);
//! - a name under a **zone a gateway advertises**: sent through the mesh
//!   (a [`ControlMessage::DnsQuery`]) to a gateway whose verified
//!   certificate carries the zone, which asks its resolver; several
//!   gateways for a zone fail over like gateways for a subnet;
//! - anything else: [`DnsStep::Upstream`], for the shell to send to the
//!   system's own resolver unchanged.
//!
//! On a gateway, a query from a peer ([`ControlMessage::DnsQuery`]) is
//! checked — a name under a zone this node serves, a caller its groups
//! allow, within the caller's rate — and handed to the shell
//! ([`NodeEvent::DnsForward`]), whose resolver's answer comes back in
//! through [`NodeCore::dns_forwarded`] and goes to the caller in parts.

use super::zones::ZonesFetch;
use super::*;
use crate::dns::{self, Parsed, Question};
use std::collections::BTreeSet;
use tern_shared::cert::name_in_zone;
use tern_shared::control::MAX_DNS_ANSWER_PARTS;

/// How often a node asks its lighthouses which gateways answer for which
/// zones.
pub const ZONES_INTERVAL: Duration = Duration::from_secs(3);
/// A gateway that has not answered a DNS query in this long is passed over
/// for the next one of the zone (and held down like a silent gateway).
pub const DNS_GATEWAY_TIMEOUT: Duration = Duration::from_millis(2500);
/// A question nobody answered in this long is answered SERVFAIL.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a node name's answer may be cached (by us and by the asker),
/// unless the certificate expires sooner.
pub const NAME_TTL: Duration = Duration::from_secs(60);
/// Questions waiting at once; more are answered SERVFAIL.
pub const MAX_PENDING_QUESTIONS: usize = 1024;
/// Most zones a node takes in from a lighthouse's list.
pub const MAX_LEARNED_ZONES: usize = 1024;

/// What [`NodeCore::resolve`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsStep {
    /// The answer, now.
    Answer { answer: Vec<u8>, source: String },
    /// The answer comes later, as [`NodeEvent::Dns`] with this id.
    Pending(u32),
    /// Not a mesh name: the shell asks the system's resolver.
    Upstream,
    /// Nothing to answer (not a query).
    Drop,
}

/// The answer to a pending question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsResult {
    pub id: u32,
    /// DNS wire format; its ID is the query's.
    pub answer: Vec<u8>,
    /// Who answered: "mesh (certificate of gw-1)", "gateway gw-1 (zone
    /// internal)", or why nobody did.
    pub source: String,
}

/// What `tern status` shows of names.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DnsStatus {
    pub domain: String,
    /// Zones gateways advertise, with the gateways' names.
    pub zones: BTreeMap<String, Vec<String>>,
    /// Zones this node answers for.
    pub serving: Vec<String>,
    pub counters: DnsCounters,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DnsCounters {
    /// Queries this node was asked (local programs, the CLI, proxies).
    pub queries: u64,
    /// Of those, answered from certificates.
    pub mesh_answers: u64,
    /// Of those, sent through the mesh to a gateway.
    pub forwarded_to_gateways: u64,
    /// Malformed queries, locally or from peers (FORMERR or dropped).
    pub malformed: u64,
    /// Questions that got no answer in time (SERVFAIL).
    pub timeouts: u64,
    /// Gateways passed over because they did not answer.
    pub gateway_failovers: u64,
    /// Zones advertised for a gateway whose certificate does not carry
    /// them: ignored.
    pub forged_zone_adverts: u64,
    /// Answers from a gateway that did not answer the question asked.
    pub bad_answers: u64,
    /// As a gateway: queries from peers.
    pub served: u64,
    /// As a gateway: refused because the name is outside its zones.
    pub refused_outside_zones: u64,
    /// As a gateway: refused because no allowed group is the caller's.
    pub refused_groups: u64,
    /// As a gateway: refused because the caller asked too fast.
    pub rate_limited: u64,
}

pub(super) struct PendingQuestion {
    question: Question,
    query: Vec<u8>,
    started: Instant,
    pub(super) how: Pending,
}

pub(super) enum Pending {
    /// A node name asked of the registered lighthouses.
    Name {
        label: String,
        next_retry: Instant,
        unknown_at: Vec<PeerId>,
    },
    /// A name under `zone`, asked of `gateway` (sent once its certificate
    /// is known and carries the zone).
    Zone {
        zone: String,
        gateway: Ipv4Addr,
        gateway_name: String,
        sent: Option<Instant>,
        tried: Vec<Ipv4Addr>,
        parts: Vec<Option<Vec<u8>>>,
    },
    /// A name under a zone this node serves itself: with the shell's
    /// resolver.
    Local { zone: String },
}

/// Names' state: one owner, [`NodeCore`].
pub(super) struct Names {
    domain: String,
    pub(super) zones: BTreeMap<String, Vec<GatewayCandidate>>,
    pub(super) next_query: Instant,
    pub(super) fetch: Option<ZonesFetch>,
    pub(super) pending: BTreeMap<u32, PendingQuestion>,
    cache: HashMap<String, (Ipv4Addr, Instant)>,
    /// Adverts of a zone for a gateway whose certificate lacks it: ignored
    /// (and counted once).
    pub(super) ignored: BTreeSet<(String, Ipv4Addr)>,
    pub(super) counters: DnsCounters,
}

impl Names {
    pub(super) fn new(now: Instant) -> Names {
        Names {
            domain: tern_shared::dns::DEFAULT_DOMAIN.to_string(),
            zones: BTreeMap::new(),
            next_query: now,
            fetch: None,
            pending: BTreeMap::new(),
            cache: HashMap::new(),
            ignored: BTreeSet::new(),
            counters: DnsCounters::default(),
        }
    }

    /// The next retry, failover or timeout of a question, or the next
    /// reading of the zones list.
    pub(super) fn deadline(&self) -> Instant {
        let questions = self.pending.values().map(|p| {
            let timeout = p.started + DNS_TIMEOUT;
            match &p.how {
                Pending::Name { next_retry, .. } => timeout.min(*next_retry),
                Pending::Zone { sent: Some(s), .. } => timeout.min(*s + DNS_GATEWAY_TIMEOUT),
                Pending::Zone { sent: None, .. } | Pending::Local { .. } => timeout,
            }
        });
        questions.fold(self.next_query, Instant::min)
    }

    /// A question that waits for its answer under `id`.
    fn pend(&mut self, id: u32, question: Question, query: &[u8], how: Pending, started: Instant) {
        self.pending.insert(
            id,
            PendingQuestion {
                question,
                query: query.to_vec(),
                started,
                how,
            },
        );
    }

    /// The longest advertised zone `name` lies under.
    fn zone_for(&self, name: &str) -> Option<String> {
        self.zones
            .keys()
            .filter(|z| name_in_zone(name, z))
            .max_by_key(|z| z.len())
            .cloned()
    }
}

impl NodeCore {
    /// `[dns] domain` and, on a gateway, the zones it answers for.
    pub fn set_dns(&mut self, domain: &str, served: Vec<ServedZone>) {
        self.names.domain = tern_shared::cert::canonical_zone(domain);
        self.serving.set(served);
    }

    pub fn dns_status(&self) -> DnsStatus {
        DnsStatus {
            domain: self.names.domain.clone(),
            zones: self
                .names
                .zones
                .iter()
                .map(|(z, gws)| (z.clone(), gws.iter().map(|g| g.name.clone()).collect()))
                .collect(),
            serving: self.serving.zones(),
            counters: self.names.counters.clone(),
        }
    }

    /// Whether `name` (canonical) is one the mesh answers: a node name or
    /// under an advertised or served zone. The proxies resolve other names
    /// themselves.
    pub fn is_mesh_name(&self, name: &str) -> bool {
        name_in_zone(name, &self.names.domain)
            || self.names.zone_for(name).is_some()
            || self.serving.served_for(name).is_some()
    }

    /// A DNS query (wire format) from a local program, the CLI or a proxy.
    pub fn resolve(&mut self, query: &[u8], now: Instant) -> DnsStep {
        self.names.counters.queries += 1;
        let question = match dns::parse_query(query) {
            Parsed::Query(q) => q,
            Parsed::Reply(answer) => {
                self.names.counters.malformed += 1;
                return DnsStep::Answer {
                    answer,
                    source: "this node (the query is malformed)".into(),
                };
            }
            Parsed::Drop => {
                self.names.counters.malformed += 1;
                return DnsStep::Drop;
            }
        };
        if self.names.pending.len() >= MAX_PENDING_QUESTIONS {
            return DnsStep::Answer {
                answer: dns::servfail(&question),
                source: "this node (too many questions waiting)".into(),
            };
        }
        if name_in_zone(&question.name, &self.names.domain) {
            return self.resolve_node_name(question, query, now);
        }
        if let Some(ip) = dns::reverse_v4(&question.name).filter(|ip| self.overlay_net.contains(ip))
        {
            return self.resolve_reverse(&question, ip);
        }
        if self.serving.served_for(&question.name).is_some() {
            return self.resolve_locally(question, query, now);
        }
        match self.names.zone_for(&question.name) {
            Some(zone) => self.resolve_in_zone(question, query, zone, now),
            None => DnsStep::Upstream,
        }
    }

    fn resolve_node_name(&mut self, q: Question, query: &[u8], now: Instant) -> DnsStep {
        let domain = self.names.domain.clone();
        let label = match q.name.strip_suffix(&domain) {
            Some("") | None => {
                return DnsStep::Answer {
                    answer: dns::nodata(&q),
                    source: format!("mesh (the domain {domain})"),
                }
            }
            Some(rest) => rest.trim_end_matches('.').to_string(),
        };
        if let Some((ip, source, ttl)) = self.known_name(&label, now) {
            self.names.counters.mesh_answers += 1;
            return DnsStep::Answer {
                answer: dns::address_answer(&q, &[ip], ttl),
                source,
            };
        }
        let id = self.request_id();
        self.names.pend(
            id,
            q,
            query,
            Pending::Name {
                label: label.clone(),
                next_retry: now + QUERY_RETRY,
                unknown_at: Vec::new(),
            },
            now,
        );
        self.ask_name(id, &label, now);
        DnsStep::Pending(id)
    }

    /// An overlay address's name (PTR), from the certificates this node
    /// holds: its own and its peers'. The overlay is the mesh's: an
    /// address no peer here holds gets NXDOMAIN, never a public resolver.
    fn resolve_reverse(&mut self, q: &Question, ip: Ipv4Addr) -> DnsStep {
        let name = if ip == self.overlay_ip {
            Some(self.name.clone())
        } else {
            self.peer_identity(ip).map(|c| c.name().to_string())
        };
        let answer = match name {
            Some(name) => {
                self.names.counters.mesh_answers += 1;
                let target = format!("{}.{}", name.to_ascii_lowercase(), self.names.domain);
                dns::ptr_answer(q, &target, ttl_secs(NAME_TTL))
            }
            None => dns::nxdomain(q),
        };
        DnsStep::Answer {
            answer,
            source: format!("mesh (the overlay address {ip})"),
        }
    }

    /// A node name answered from a certificate already verified: ours, a
    /// peer's, or one cached from a lighthouse's answer.
    fn known_name(&mut self, label: &str, now: Instant) -> Option<(Ipv4Addr, String, u32)> {
        if label.eq_ignore_ascii_case(&self.name) {
            return Some((
                self.overlay_ip,
                "mesh (this node)".into(),
                ttl_secs(NAME_TTL),
            ));
        }
        if let Some(peer) = self
            .mesh
            .peer_statuses()
            .into_iter()
            .find(|p| p.name.eq_ignore_ascii_case(label))
        {
            return Some((
                peer.overlay_ip,
                format!("mesh (certificate of {})", peer.name),
                ttl_secs(NAME_TTL),
            ));
        }
        match self.names.cache.get(label) {
            Some((ip, until)) if *until > now => Some((
                *ip,
                format!("mesh (certificate of {label})"),
                ttl_secs(until.saturating_duration_since(now)),
            )),
            Some(_) => {
                self.names.cache.remove(label);
                None
            }
            None => None,
        }
    }

    fn ask_name(&mut self, id: u32, label: &str, now: Instant) {
        for (peer, ip) in self.registered_lighthouses() {
            let msg = ControlMessage::NameQuery {
                id,
                name: label.to_string(),
            };
            self.send_control(peer, ip, &msg, now);
        }
    }

    /// A lighthouse's answer for a node name: the certificate is verified
    /// here and must carry the name asked.
    pub(super) fn name_reply(
        &mut self,
        lighthouse: PeerId,
        id: u32,
        info: Option<PeerInfo>,
        now: Instant,
    ) {
        let Some(p) = self.names.pending.get_mut(&id) else {
            return;
        };
        let Pending::Name {
            label, unknown_at, ..
        } = &mut p.how
        else {
            return;
        };
        let label = label.clone();
        let verified = info.as_ref().and_then(|info| {
            match self.mesh.learn_cert(&info.cert, now) {
                Ok(cert) if cert.name().eq_ignore_ascii_case(&label) => Some(cert),
                Ok(cert) => {
                    tracing::warn!(asked = %label, got = cert.name(), "lighthouse answered a name with another node's certificate; ignored");
                    None
                }
                Err(e) => {
                    tracing::warn!(name = %label, reason = %e, "lighthouse answered a name with a certificate we do not accept");
                    None
                }
            }
        });
        let Some(cert) = verified else {
            if info.is_some() {
                self.counters.lying_lighthouse_answers += 1;
            }
            if !unknown_at.contains(&lighthouse) {
                unknown_at.push(lighthouse);
            }
            if unknown_at.len() >= self.connected_lighthouses() {
                if let Some(p) = self.names.pending.remove(&id) {
                    self.events.push(NodeEvent::Dns(DnsResult {
                        id,
                        answer: dns::nxdomain(&p.question),
                        source: format!("mesh (no node is named {label})"),
                    }));
                }
            }
            return;
        };
        let Some(p) = self.names.pending.remove(&id) else {
            return;
        };
        let lifetime =
            Duration::from_secs(cert.not_after().saturating_sub(self.mesh.unix_time(now)));
        let ttl = NAME_TTL.min(lifetime);
        self.names
            .cache
            .insert(label.clone(), (cert.overlay_ip(), now + ttl));
        self.names.counters.mesh_answers += 1;
        self.events.push(NodeEvent::Dns(DnsResult {
            id,
            answer: dns::address_answer(&p.question, &[cert.overlay_ip()], ttl_secs(ttl)),
            source: format!("mesh (certificate of {})", cert.name()),
        }));
        // The asker connects next: start now, as a lookup would.
        if let Some(info) = info {
            if self.mesh.peer_by_overlay(cert.overlay_ip()).is_none() {
                let introducer = self.lighthouse_endpoint(lighthouse);
                self.handle_answer(cert.overlay_ip(), info, introducer, now);
            }
        }
    }

    fn resolve_in_zone(
        &mut self,
        q: Question,
        query: &[u8],
        zone: String,
        now: Instant,
    ) -> DnsStep {
        let id = self.request_id();
        self.names.pend(
            id,
            q,
            query,
            Pending::Zone {
                zone,
                gateway: Ipv4Addr::UNSPECIFIED,
                gateway_name: String::new(),
                sent: None,
                tried: Vec::new(),
                parts: Vec::new(),
            },
            now,
        );
        self.names.counters.forwarded_to_gateways += 1;
        self.next_gateway(id, now);
        DnsStep::Pending(id)
    }

    fn resolve_locally(&mut self, q: Question, query: &[u8], now: Instant) -> DnsStep {
        let id = self.request_id();
        let Some(forward) = self.forward_own(id, q.clone(), query, now) else {
            return DnsStep::Upstream;
        };
        self.names.pend(
            id,
            q,
            query,
            Pending::Local {
                zone: forward.zone.clone(),
            },
            now,
        );
        self.events.push(NodeEvent::DnsForward(forward));
        DnsStep::Pending(id)
    }

    /// Sends a zone question to the next gateway for its zone that has not
    /// been tried and is not held down (or, all tried, answers SERVFAIL).
    fn next_gateway(&mut self, id: u32, now: Instant) {
        loop {
            let Some(p) = self.names.pending.get(&id) else {
                return;
            };
            let Pending::Zone { zone, tried, .. } = &p.how else {
                return;
            };
            let zone = zone.clone();
            let candidates = self.names.zones.get(&zone).cloned().unwrap_or_default();
            let usable = |g: &&GatewayCandidate| g.down_until.is_none_or(|t| t <= now);
            let pick = candidates
                .iter()
                .filter(|g| !tried.contains(&g.overlay_ip))
                .find(usable)
                .or_else(|| candidates.iter().find(|g| !tried.contains(&g.overlay_ip)));
            let Some(pick) = pick.cloned() else {
                self.answer_servfail(id, format!("no gateway for the zone {zone} answered"));
                return;
            };
            if let Some(p) = self.names.pending.get_mut(&id) {
                if let Pending::Zone {
                    gateway,
                    gateway_name,
                    sent,
                    tried,
                    parts,
                    ..
                } = &mut p.how
                {
                    *gateway = pick.overlay_ip;
                    *gateway_name = pick.name.clone();
                    *sent = None;
                    tried.push(pick.overlay_ip);
                    parts.clear();
                }
            }
            match self.send_dns_query(id, now) {
                Sent::Yes | Sent::Waiting => return,
                Sent::Refused => continue,
            }
        }
    }

    /// Sends a pending zone question to its gateway once the gateway's
    /// certificate is known and carries the zone; a gateway not known yet
    /// is looked up first.
    fn send_dns_query(&mut self, id: u32, now: Instant) -> Sent {
        let Some(p) = self.names.pending.get(&id) else {
            return Sent::Yes;
        };
        let Pending::Zone { zone, gateway, .. } = &p.how else {
            return Sent::Yes;
        };
        let (zone, gateway) = (zone.clone(), *gateway);
        let Some(peer) = self.mesh.peer_by_overlay(gateway) else {
            self.look_up(gateway, now);
            return Sent::Waiting;
        };
        let Some(cert) = self.mesh.peer_cert(peer).cloned() else {
            return Sent::Waiting;
        };
        if cert.overlay_ip() != gateway || !cert.answers_for(&zone) {
            self.forged_zone(&zone, gateway, &cert);
            return Sent::Refused;
        }
        let query = p.query.clone();
        if let Some(Pending::Zone { sent, .. }) =
            self.names.pending.get_mut(&id).map(|p| &mut p.how)
        {
            *sent = Some(now);
        }
        self.send_control(peer, gateway, &ControlMessage::DnsQuery { id, query }, now);
        Sent::Yes
    }

    /// A gateway became a peer: the zone questions waiting for it go out.
    pub(super) fn dns_gateway_known(&mut self, gateway: Ipv4Addr, now: Instant) {
        let waiting: Vec<u32> = self
            .names
            .pending
            .iter()
            .filter(|(_, p)| {
                matches!(&p.how, Pending::Zone { gateway: g, sent: None, .. } if *g == gateway)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            if self.send_dns_query(id, now) == Sent::Refused {
                self.next_gateway(id, now);
            }
        }
    }

    /// One part of a gateway's answer.
    pub(super) fn dns_answer(
        &mut self,
        peer: PeerId,
        id: u32,
        part: u8,
        parts: u8,
        bytes: Vec<u8>,
    ) {
        let Some(cert) = self.mesh.peer_cert(peer).cloned() else {
            return;
        };
        let Some(p) = self.names.pending.get_mut(&id) else {
            return;
        };
        let Pending::Zone {
            zone,
            gateway,
            gateway_name,
            parts: got,
            ..
        } = &mut p.how
        else {
            return;
        };
        if cert.overlay_ip() != *gateway || !cert.answers_for(zone) {
            self.names.counters.bad_answers += 1;
            return;
        }
        let parts = usize::from(parts).min(MAX_DNS_ANSWER_PARTS);
        if got.is_empty() {
            got.resize(parts, None);
        }
        if got.len() != parts || usize::from(part) >= parts {
            self.names.counters.bad_answers += 1;
            return;
        }
        got[usize::from(part)] = Some(bytes);
        if got.iter().any(Option::is_none) {
            return;
        }
        let answer: Vec<u8> = got.iter().flatten().flatten().copied().collect();
        let source = format!("gateway {gateway_name} (zone {zone})");
        if !dns::answers(&answer, &p.question) {
            self.names.counters.bad_answers += 1;
            tracing::debug!(gateway = %gateway_name, "a gateway's DNS answer does not answer the question");
            return;
        }
        self.names.pending.remove(&id);
        self.events
            .push(NodeEvent::Dns(DnsResult { id, answer, source }));
    }

    fn answer_servfail(&mut self, id: u32, why: String) {
        if let Some(p) = self.names.pending.remove(&id) {
            self.names.counters.timeouts += 1;
            self.events.push(NodeEvent::Dns(DnsResult {
                id,
                answer: dns::servfail(&p.question),
                source: why,
            }));
        }
    }

    /// Reads the zones list now and then; retries, fails over and times
    /// out questions.
    pub(super) fn drive_names(&mut self, now: Instant) {
        if self.names.next_query <= now {
            self.names.next_query = now + ZONES_INTERVAL;
            self.ask_zones(now);
        }
        let ids: Vec<u32> = self.names.pending.keys().copied().collect();
        for id in ids {
            let Some(p) = self.names.pending.get_mut(&id) else {
                continue;
            };
            if now.saturating_duration_since(p.started) >= DNS_TIMEOUT {
                let why = match &p.how {
                    Pending::Name { label, .. } => {
                        format!("no lighthouse answered for the node name {label}")
                    }
                    Pending::Zone { zone, .. } => {
                        format!("no gateway for the zone {zone} answered")
                    }
                    Pending::Local { zone } => {
                        format!("the resolver for the zone {zone} did not answer")
                    }
                };
                self.answer_servfail(id, why);
                continue;
            }
            match &mut p.how {
                Pending::Name {
                    label, next_retry, ..
                } if *next_retry <= now => {
                    *next_retry = now + QUERY_RETRY;
                    let label = label.clone();
                    self.ask_name(id, &label, now);
                }
                Pending::Zone {
                    sent: Some(sent),
                    gateway,
                    gateway_name,
                    zone,
                    ..
                } if now.saturating_duration_since(*sent) >= DNS_GATEWAY_TIMEOUT => {
                    tracing::warn!(%zone, gateway = %gateway_name, "gateway did not answer a DNS query; trying another");
                    let (gateway, zone) = (*gateway, zone.clone());
                    self.names.counters.gateway_failovers += 1;
                    if let Some(gws) = self.names.zones.get_mut(&zone) {
                        for g in gws.iter_mut().filter(|g| g.overlay_ip == gateway) {
                            g.down_until = Some(now + GATEWAY_HOLD_DOWN);
                        }
                    }
                    self.next_gateway(id, now);
                }
                Pending::Zone {
                    sent: None,
                    gateway,
                    ..
                } if self.mesh.peer_by_overlay(*gateway).is_some() => {
                    let gateway = *gateway;
                    self.dns_gateway_known(gateway, now);
                }
                _ => {}
            }
        }
        self.drive_serving(now);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Yes,
    /// The gateway is being looked up.
    Waiting,
    /// Its certificate does not carry the zone.
    Refused,
}

fn ttl_secs(d: Duration) -> u32 {
    d.as_secs().min(u64::from(u32::MAX)) as u32
}
