//! DNS zones this node answers for as a gateway (`[[gateway.dns]]`): a
//! peer's query is checked — a name under a zone served here, a caller the
//! zone's groups allow (or the firewall lets into the subnets), within the
//! caller's rate — and handed to the shell's resolver
//! ([`NodeEvent::DnsForward`]); the answer goes back to the peer in parts.
//! Never an open resolver into the private network: names outside the
//! zones are refused.

use super::names::Pending;
use super::*;
use crate::dns::{self, Parsed, Question};
use tern_mesh::rate::TokenBucket;
use tern_shared::cert::name_in_zone;
use tern_shared::control::split_answer;

/// A zone this node answers for as a gateway (`[[gateway.dns]]`): checked
/// against its certificate by the shell before it gets here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedZone {
    pub zone: String,
    /// Callers carrying any of these groups may ask; `None`: those its
    /// firewall lets into its subnets.
    pub groups: Option<Vec<String>>,
    /// Queries per second one caller may send for the zone (twice that at
    /// once).
    pub queries_per_sec: u32,
}

/// A query for this node's resolver, as a gateway (see [`NodeEvent::DnsForward`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsForward {
    /// Echo it in [`NodeCore::dns_forwarded`].
    pub request: u32,
    /// The served zone the name lies under: the shell's resolvers for it.
    pub zone: String,
    /// The query, DNS wire format, as the caller sent it.
    pub query: Vec<u8>,
}

impl ServedZone {
    /// The zones a gateway's `[[gateway.dns]]` entries serve: several
    /// entries for a zone are more resolvers, the groups of all (none
    /// named in one: the firewall's callers), the highest rate.
    pub fn from_config(gateway: &tern_shared::policy::GatewayConfig) -> Vec<ServedZone> {
        let mut served: Vec<ServedZone> = Vec::new();
        for entry in &gateway.dns {
            match served.iter_mut().find(|s| s.zone == entry.zone) {
                Some(s) => {
                    if let (Some(all), Some(more)) = (&mut s.groups, &entry.groups) {
                        all.extend(more.iter().cloned());
                    } else {
                        s.groups = None;
                    }
                    s.queries_per_sec = s.queries_per_sec.max(entry.queries_per_sec);
                }
                None => served.push(ServedZone {
                    zone: entry.zone.clone(),
                    groups: entry.groups.clone(),
                    queries_per_sec: entry.queries_per_sec,
                }),
            }
        }
        served
    }

    /// The longest of `served` that `name` lies under.
    pub fn for_name<'a>(served: &'a [ServedZone], name: &str) -> Option<&'a ServedZone> {
        served
            .iter()
            .filter(|s| name_in_zone(name, &s.zone))
            .max_by_key(|s| s.zone.len())
    }

    /// Whether `caller` (at `caller_ip`) may ask this zone: it carries one
    /// of the zone's groups, or, the zone naming none, `firewall` lets it
    /// into the gateway's `subnets`.
    pub fn admits<C: Caller + ?Sized>(
        &self,
        caller: &C,
        caller_ip: Ipv4Addr,
        firewall: &Firewall,
        subnets: &[Ipv4Net],
    ) -> Result<bool, Unknown> {
        match &self.groups {
            Some(groups) => Ok(groups.iter().any(|g| caller.has_group(g))),
            None => firewall.lets_caller_into(caller, caller_ip, subnets),
        }
    }
}

/// A query handed to the shell's resolver.
struct Forward {
    asker: Asker,
    question: Question,
    started: Instant,
}

/// Who waits for a forwarded query's answer.
enum Asker {
    /// A peer: its session, address and request id.
    Peer { peer: PeerId, ip: Ipv4Addr, id: u32 },
    /// A question of this node's own (it serves the zone itself).
    Local { id: u32 },
}

/// The zones served here and the queries in the resolver's hands: one
/// owner, [`NodeCore`].
#[derive(Default)]
pub(super) struct ZoneService {
    served: Vec<ServedZone>,
    forwards: BTreeMap<u32, Forward>,
    /// Each caller's queries per served zone.
    buckets: HashMap<(Ipv4Addr, String), TokenBucket>,
}

impl ZoneService {
    pub(super) fn set(&mut self, served: Vec<ServedZone>) {
        self.served = served;
    }

    pub(super) fn zones(&self) -> Vec<String> {
        self.served.iter().map(|s| s.zone.clone()).collect()
    }

    /// The longest served zone `name` lies under.
    pub(super) fn served_for(&self, name: &str) -> Option<&ServedZone> {
        ServedZone::for_name(&self.served, name)
    }

    /// When the oldest query in the resolver's hands is given up.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.forwards
            .values()
            .map(|f| f.started + DNS_TIMEOUT)
            .min()
    }
}

impl NodeCore {
    /// This node's own question for a zone it serves: straight to the
    /// shell's resolver.
    pub(super) fn forward_own(
        &mut self,
        id: u32,
        q: Question,
        query: &[u8],
        now: Instant,
    ) -> Option<DnsForward> {
        let zone = self.serving.served_for(&q.name)?.zone.clone();
        let request = self.request_id();
        self.serving.forwards.insert(
            request,
            Forward {
                asker: Asker::Local { id },
                question: q,
                started: now,
            },
        );
        Some(DnsForward {
            request,
            zone,
            query: query.to_vec(),
        })
    }

    /// As a gateway: a peer's query for a name under a zone this node serves.
    pub(super) fn serve_dns_query(&mut self, peer: PeerId, id: u32, query: Vec<u8>, now: Instant) {
        let Some(cert) = self.mesh.peer_cert(peer).cloned() else {
            return;
        };
        self.names.counters.served += 1;
        let reply = |core: &mut NodeCore, answer: Vec<u8>| {
            core.send_dns_answer(peer, cert.overlay_ip(), id, &answer, now)
        };
        let q = match dns::parse_query(&query) {
            Parsed::Query(q) => q,
            Parsed::Reply(answer) => {
                self.names.counters.malformed += 1;
                return reply(self, answer);
            }
            Parsed::Drop => {
                self.names.counters.malformed += 1;
                return;
            }
        };
        let Some(served) = self.serving.served_for(&q.name).cloned() else {
            // Never an open resolver into the private network.
            self.names.counters.refused_outside_zones += 1;
            return reply(self, dns::refused(&q));
        };
        let allowed = served
            .admits(
                &cert,
                cert.overlay_ip(),
                &self.firewall,
                &self.gateway_subnets,
            )
            .unwrap_or(false);
        if !allowed {
            self.names.counters.refused_groups += 1;
            tracing::debug!(caller = cert.name(), zone = %served.zone, "DNS query refused: no allowed group");
            return reply(self, dns::refused(&q));
        }
        let rate = served.queries_per_sec.max(1);
        let bucket = self
            .serving
            .buckets
            .entry((cert.overlay_ip(), served.zone.clone()))
            .or_insert_with(|| TokenBucket::new(rate.saturating_mul(2), now));
        if !bucket.take(now) {
            self.names.counters.rate_limited += 1;
            return reply(self, dns::refused(&q));
        }
        if self.serving.forwards.len() >= MAX_PENDING_QUESTIONS {
            return reply(self, dns::servfail(&q));
        }
        let request = self.request_id();
        self.serving.forwards.insert(
            request,
            Forward {
                asker: Asker::Peer {
                    peer,
                    ip: cert.overlay_ip(),
                    id,
                },
                question: q,
                started: now,
            },
        );
        self.events.push(NodeEvent::DnsForward(DnsForward {
            request,
            zone: served.zone,
            query,
        }));
    }

    /// The shell's resolver answered a [`NodeEvent::DnsForward`] (`None`:
    /// it failed or timed out). The answer goes to whoever asked.
    pub fn dns_forwarded(&mut self, request: u32, answer: Option<Vec<u8>>, now: Instant) {
        let Some(f) = self.serving.forwards.remove(&request) else {
            return;
        };
        let answer = match answer {
            Some(a) if dns::answers(&a, &f.question) => a,
            _ => dns::servfail(&f.question),
        };
        match f.asker {
            Asker::Peer { peer, ip, id } => self.send_dns_answer(peer, ip, id, &answer, now),
            Asker::Local { id } => {
                if let Some(p) = self.names.pending.remove(&id) {
                    let zone = match p.how {
                        Pending::Local { zone } => zone,
                        _ => String::new(),
                    };
                    self.events.push(NodeEvent::Dns(DnsResult {
                        id,
                        answer,
                        source: format!("this gateway's resolver (zone {zone})"),
                    }));
                }
            }
        }
    }

    fn send_dns_answer(
        &mut self,
        peer: PeerId,
        ip: Ipv4Addr,
        id: u32,
        answer: &[u8],
        now: Instant,
    ) {
        for (part, parts, chunk) in split_answer(answer) {
            let msg = ControlMessage::DnsAnswer {
                id,
                part,
                parts,
                answer: chunk.to_vec(),
            };
            self.send_control(peer, ip, &msg, now);
        }
    }

    /// Tells one lighthouse (or every registered one) the zones this node
    /// answers for.
    pub(super) fn advertise_zones(&mut self, only: Option<PeerId>, now: Instant) {
        if self.serving.served.is_empty() {
            return;
        }
        let zones: Vec<String> = self.serving.served.iter().map(|s| s.zone.clone()).collect();
        for (peer, ip) in self
            .registered_lighthouses()
            .into_iter()
            .filter(|(p, _)| only.is_none_or(|o| o == *p))
        {
            let id = self.request_id();
            let msg = ControlMessage::ZoneAdvert {
                id,
                zones: zones.clone(),
            };
            self.send_control(peer, ip, &msg, now);
        }
    }

    /// Gives up queries the resolver never answered; forgets callers'
    /// buckets that are full again.
    pub(super) fn drive_serving(&mut self, now: Instant) {
        let stale: Vec<u32> = self
            .serving
            .forwards
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.started) >= DNS_TIMEOUT)
            .map(|(r, _)| *r)
            .collect();
        for request in stale {
            self.dns_forwarded(request, None, now);
        }
        self.serving.buckets.retain(|_, b| !b.is_full(now));
    }
}
