//! Control messages between a node and a lighthouse.
//!
//! They travel inside the WireGuard session with the lighthouse, as UDP
//! datagrams between the two overlay addresses on [`CONTROL_PORT`], so they
//! inherit the session's mutual authentication, encryption and replay
//! protection. The daemons intercept them; they never reach a TUN device.
//! Identity never comes from a message's contents: the lighthouse files a
//! registration under the overlay address of the certificate that
//! authenticated the session.
//!
//! Layout: `u8 type`, `u32 request id`, then the body. Requests are retried
//! by the node; replies echo the request id.
//!
//! The messages for names (zones, node names, DNS between a node and a
//! gateway) are encoded in `control/names.rs`.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;

use crate::cert::{Fingerprint, MAX_CERT_LEN};
use crate::codec::{put_blob16, put_socket_addr, Reader};

mod flows;
mod jobs;
mod names;
mod services;
pub use flows::{
    fits as flow_records_fit, flow_text, MAX_FLOW_CALLERS, MAX_FLOW_GROUPS, MAX_FLOW_RECORDS,
    RECORD_LEN as FLOW_RECORD_LEN,
};
pub use jobs::{job_text, RecentJob, RecentJobState, MAX_JOB_TEXT, MAX_RECENT_JOBS};
pub use names::{
    split_answer, AdvertisedZone, DNS_ANSWER_CHUNK, MAX_DNS_ANSWER_PARTS, MAX_DNS_QUERY_LEN,
    MAX_ZONES_IN_REPLY, ZONES_PAGE_BUDGET,
};
pub use services::{
    AdvertisedService, ServiceEntry, MAX_SERVICES_ADVERTISED, MAX_SERVICE_GROUPS,
    SERVICES_PAGE_BUDGET,
};

/// UDP port on overlay addresses where daemons exchange control messages.
pub const CONTROL_PORT: u16 = 4243;
/// Largest control message accepted or produced.
pub const MAX_CONTROL_LEN: usize = 1400;
/// Most endpoints one node may report or one answer may carry.
pub const MAX_ENDPOINTS: usize = 8;
/// Most subnets one gateway may advertise.
pub const MAX_ADVERTISED: usize = 16;
/// Most routes in one [`ControlMessage::RoutesReply`]: one page of the
/// list, which a node reads page by page until `complete`.
pub const MAX_ROUTES_IN_REPLY: usize = 16;
/// Most labels one runner may advertise.
pub const MAX_LABELS: usize = 16;
/// Longest label or name in a runner message, in bytes.
pub const MAX_LABEL_LEN: usize = 64;
/// Most runners in one [`ControlMessage::RunnersReply`].
pub const MAX_RUNNERS_IN_REPLY: usize = 16;
/// Most revocations in one [`ControlMessage::Revocations`] (40 bytes each).
pub const MAX_REVOCATIONS_IN_REPLY: usize = 32;

/// Where a node can be reached, and with which certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The node's certificate, binary encoding. The receiver verifies it itself.
    pub cert: Vec<u8>,
    /// Candidate underlay endpoints, the observed public address first.
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// Node → lighthouse: "I am here; these are my local addresses, and
    /// these private subnets I route" (a gateway; the lighthouse keeps only
    /// subnets the node's certificate authorizes).
    Register {
        id: u32,
        local: Vec<SocketAddr>,
        routes: Vec<Ipv4Net>,
    },
    /// Lighthouse → node: registration accepted; the address it came from,
    /// and whether this lighthouse relays for nodes that find no direct path.
    RegisterAck {
        id: u32,
        observed: SocketAddr,
        relay: bool,
        /// The version of this lighthouse's revocation list: a node that
        /// holds an older one asks for what it lacks.
        revocations: u32,
    },
    /// Node → lighthouse: "where is this overlay address?"
    Query {
        id: u32,
        overlay_ip: Ipv4Addr,
    },
    /// Lighthouse → node: the answer (`None`: not registered here).
    QueryReply {
        id: u32,
        overlay_ip: Ipv4Addr,
        peer: Option<PeerInfo>,
    },
    /// Lighthouse → node: another node is about to connect; send toward it
    /// now so both sides' NAT mappings open.
    Punch {
        id: u32,
        peer: PeerInfo,
    },
    /// Node → lighthouse: leaving now; forget me.
    Deregister {
        id: u32,
    },
    /// Node → lighthouse: which gateways route which subnets? The page
    /// of routes after `after` (a subnet and gateway), or the first page.
    RoutesQuery {
        id: u32,
        after: Option<(Ipv4Net, Ipv4Addr)>,
    },
    /// Lighthouse → node: one page of advertised routes, in order of
    /// subnet then gateway; `complete` is false when more follow (ask again
    /// after the last one). A hint: the node verifies each gateway's
    /// certificate itself before using it.
    RoutesReply {
        id: u32,
        routes: Vec<AdvertisedRoute>,
        complete: bool,
    },
    /// Any peer → any peer: are you there? (Answered by every daemon.)
    Ping {
        id: u32,
    },
    Pong {
        id: u32,
    },
    /// Node → lighthouse: "I offer a runner with these labels, this busy".
    /// Sent after each registration and whenever the load changes. Only a
    /// node whose certificate carries [`crate::cert::RUNNER_GROUP`] is
    /// listed; callers check that group themselves.
    RunnerAdvert {
        id: u32,
        labels: Vec<String>,
        load: RunnerLoad,
    },
    /// Node → lighthouse: the runner's newest jobs (`jobs.rs`), after
    /// each registration and whenever one starts or ends. A lighthouse
    /// keeps them for the admin console; nothing else depends on them.
    RunnerJobs {
        id: u32,
        jobs: Vec<RecentJob>,
    },
    /// Node → lighthouse: flow records its firewall made (`flows.rs`), and
    /// how many it dropped since it started. Answered with
    /// [`ControlMessage::FlowRecordsAck`]; sent again until then.
    FlowRecords {
        id: u32,
        dropped: u64,
        flows: Vec<crate::flows::FlowEntry>,
    },
    /// Lighthouse → node: the records of that id are in its hands.
    FlowRecordsAck {
        id: u32,
    },
    /// Node → lighthouse: which runners match?
    RunnersQuery {
        id: u32,
        selector: RunnerSelector,
    },
    /// Lighthouse → node: the matches, least busy first (a hint: the caller
    /// verifies the runner's certificate when it connects).
    RunnersReply {
        id: u32,
        runners: Vec<RunnerInfo>,
    },
    /// Node → lighthouse: the revocations after version `since`.
    RevocationsQuery {
        id: u32,
        since: u32,
    },
    /// Lighthouse → node: revoked certificates, the answer to a query or
    /// pushed (id 0) the moment a revocation is made. `entries` are those
    /// after version `since` up to `version`; `complete` is false when more
    /// follow (ask again from `version`). Revocations can only take trust
    /// away, so a node applies them from any of its lighthouses.
    Revocations {
        id: u32,
        since: u32,
        version: u32,
        entries: Vec<Revocation>,
        complete: bool,
    },
    /// Any peer → the peer (or gateway) in front of `dst`: would your
    /// inbound firewall let me open TCP to `dst:port`?
    PolicyQuery {
        id: u32,
        dst: Ipv4Addr,
        port: u16,
    },
    PolicyReply {
        id: u32,
        answer: PolicyAnswer,
    },
    /// Gateway → lighthouse: "I answer DNS for these zones". Sent after
    /// each registration; the lighthouse lists only zones the node's
    /// certificate carries, and clients check that again themselves.
    ZoneAdvert {
        id: u32,
        zones: Vec<String>,
    },
    /// Node → lighthouse: which gateways answer for which zones? The page
    /// after `after` (a zone and gateway), or the first page.
    ZonesQuery {
        id: u32,
        after: Option<(String, Ipv4Addr)>,
    },
    /// Lighthouse → node: one page of advertised zones, by zone then
    /// gateway; `complete` is false when more follow. A hint, like routes.
    ZonesReply {
        id: u32,
        zones: Vec<AdvertisedZone>,
        complete: bool,
    },
    /// Lighthouse → node, pushed (id 0): the advertised zones changed; read
    /// the list again now (a name under a new zone may be asked at once).
    ZonesChanged {
        id: u32,
    },
    /// Node → lighthouse: the node whose certificate has this name (any
    /// case), for mesh DNS.
    NameQuery {
        id: u32,
        name: String,
    },
    /// Lighthouse → node: its certificate and endpoints (`None`: no node of
    /// that name is registered here). The asker verifies the certificate
    /// and its name itself.
    NameReply {
        id: u32,
        peer: Option<PeerInfo>,
    },
    /// Node → gateway: a DNS query (wire format) for a name under a zone
    /// the gateway answers for.
    DnsQuery {
        id: u32,
        query: Vec<u8>,
    },
    /// Gateway → node: part `part` (from 0) of `parts` of the DNS answer
    /// (wire format, up to 64 KiB in [`DNS_ANSWER_CHUNK`]-byte parts).
    DnsAnswer {
        id: u32,
        part: u8,
        parts: u8,
        answer: Vec<u8>,
    },
    /// Node → lighthouse (`[pki] renew`): a fresh certificate for the one
    /// that authenticated this session. Nothing else is asked: the
    /// lighthouse renews exactly what the session proves.
    RenewRequest {
        id: u32,
    },
    /// Lighthouse → node: the renewed certificate, or why not.
    RenewReply {
        id: u32,
        outcome: RenewOutcome,
    },
    /// Node → lighthouse, with each registration: this node relays for
    /// others (`[relay]`; the lighthouse checks its certificate carries the
    /// `relay` group).
    RelayOffer {
        id: u32,
    },
    /// Lighthouse → relay node: forward between nodes `a` and `b` (each
    /// known by the session it will open with the relay).
    RelayIntroduce {
        id: u32,
        a: Ipv4Addr,
        b: Ipv4Addr,
    },
    /// Node → lighthouse, with each registration: the `[[services]]` it
    /// offers.
    ServicesAdvert {
        id: u32,
        services: Vec<AdvertisedService>,
    },
    /// Node → lighthouse: who offers the service `name` (empty: any).
    ServicesQuery {
        id: u32,
        name: String,
    },
    /// Lighthouse → node: the offers, as many as fit (`complete`: all).
    ServicesReply {
        id: u32,
        services: Vec<ServiceEntry>,
        complete: bool,
    },
    /// Lighthouse → node: until a direct path is proven, reach `peer`
    /// through the relay node `relay` (its certificate and address; the
    /// node opens a session with it, which is how the relay knows it).
    UseRelay {
        id: u32,
        peer: Ipv4Addr,
        relay: PeerInfo,
    },
}

/// The answer to [`ControlMessage::RenewRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewOutcome {
    /// The new certificate, binary encoding (the node verifies it itself).
    Renewed(Vec<u8>),
    /// Refused, and why (at most [`MAX_RENEW_REASON`] bytes).
    Refused(String),
}

/// Longest reason in a [`RenewOutcome::Refused`], in bytes.
pub const MAX_RENEW_REASON: usize = 512;

/// Whether a peer's inbound firewall lets the asker open a TCP connection
/// to `dst:port` (answered by any daemon on its control port, from its
/// rules alone): how `tern up --wait-for` tells a target denied by policy
/// from one that refused or did not answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyAnswer {
    pub allowed: bool,
    /// What decided: e.g. "inbound rule-2/reject".
    pub reason: String,
}

/// One revoked certificate (a node's or an issuer's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revocation {
    pub fingerprint: Fingerprint,
    /// When the certificate expires anyway: the entry can be dropped then.
    pub not_after: u64,
}

/// How busy a runner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct RunnerLoad {
    /// Jobs running now.
    pub running: u16,
    /// Jobs waiting for a slot.
    pub queued: u16,
    /// Jobs it runs at once.
    pub concurrency: u16,
}

impl RunnerLoad {
    /// Orders runners from least to most busy: by the share of slots that
    /// are taken or waited for, then by the queue's length.
    pub fn busyness(&self) -> (u64, u16) {
        let demand = u64::from(self.running) + u64::from(self.queued);
        let slots = u64::from(self.concurrency.max(1));
        (demand * 1_000_000 / slots, self.queued)
    }
}

/// What `tern run` asks for: `--on LABEL` or `--node NAME`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunnerSelector {
    Label(String),
    Name(String),
}

/// Orders runners least busy first, then by name; runners found by name
/// without a load come last. Lighthouses answer in this order and nodes
/// merge their answers in it.
pub fn sort_least_busy(runners: &mut [RunnerInfo]) {
    runners.sort_by(|a, b| {
        let key = |r: &RunnerInfo| r.load.map_or((u64::MAX, u16::MAX), |l| l.busyness());
        key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
    });
}

/// One runner in a [`ControlMessage::RunnersReply`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunnerInfo {
    pub overlay_ip: Ipv4Addr,
    /// Its certificate's name, as the lighthouse saw it.
    pub name: String,
    /// `None`: found by name, but it advertises no runner.
    pub load: Option<RunnerLoad>,
}

/// One subnet a registered gateway advertises.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AdvertisedRoute {
    pub subnet: Ipv4Net,
    /// The gateway's overlay address (look it up like any peer).
    pub gateway: Ipv4Addr,
    /// The gateway's certificate name, for `via` preferences.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("control message longer than {MAX_CONTROL_LEN} bytes")]
    TooLong,
    #[error("control message truncated or malformed")]
    Malformed,
    #[error("unknown control message type {0}")]
    UnknownType(u8),
    #[error("control message lists more than {MAX_ENDPOINTS} endpoints")]
    TooManyEndpoints,
    #[error("control message lists too many routes")]
    TooManyRoutes,
    #[error("control message lists too many labels or runners, or one too long")]
    TooManyLabels,
    #[error("control message carries a DNS name, zone or message that is too long or malformed")]
    BadName,
}

const T_REGISTER: u8 = 1;
const T_REGISTER_ACK: u8 = 2;
const T_QUERY: u8 = 3;
const T_QUERY_REPLY: u8 = 4;
const T_PUNCH: u8 = 5;
const T_DEREGISTER: u8 = 6;
const T_ROUTES_QUERY: u8 = 7;
const T_ROUTES_REPLY: u8 = 8;
const T_PING: u8 = 9;
const T_PONG: u8 = 10;
const T_RUNNER_ADVERT: u8 = 11;
const T_RUNNERS_QUERY: u8 = 12;
const T_RUNNERS_REPLY: u8 = 13;
const T_REVOCATIONS_QUERY: u8 = 14;
const T_REVOCATIONS: u8 = 15;
const T_POLICY_QUERY: u8 = 16;
const T_POLICY_REPLY: u8 = 17;
const T_ZONE_ADVERT: u8 = 18;
const T_ZONES_QUERY: u8 = 19;
const T_ZONES_REPLY: u8 = 20;
const T_NAME_QUERY: u8 = 21;
const T_NAME_REPLY: u8 = 22;
const T_DNS_QUERY: u8 = 23;
const T_DNS_ANSWER: u8 = 24;
const T_ZONES_CHANGED: u8 = 25;
const T_RENEW_REQUEST: u8 = 26;
const T_RENEW_REPLY: u8 = 27;
const T_RELAY_OFFER: u8 = 28;
const T_RELAY_INTRODUCE: u8 = 29;
const T_USE_RELAY: u8 = 30;
const T_SERVICES_ADVERT: u8 = 31;
const T_SERVICES_QUERY: u8 = 32;
const T_SERVICES_REPLY: u8 = 33;
const T_RUNNER_JOBS: u8 = 34;
const T_FLOW_RECORDS: u8 = 35;
const T_FLOW_RECORDS_ACK: u8 = 36;

impl ControlMessage {
    pub fn id(&self) -> u32 {
        match self {
            ControlMessage::Register { id, .. }
            | ControlMessage::RegisterAck { id, .. }
            | ControlMessage::Query { id, .. }
            | ControlMessage::QueryReply { id, .. }
            | ControlMessage::Punch { id, .. }
            | ControlMessage::Deregister { id }
            | ControlMessage::RoutesQuery { id, .. }
            | ControlMessage::RoutesReply { id, .. }
            | ControlMessage::Ping { id }
            | ControlMessage::Pong { id }
            | ControlMessage::RunnerAdvert { id, .. }
            | ControlMessage::RunnerJobs { id, .. }
            | ControlMessage::FlowRecords { id, .. }
            | ControlMessage::FlowRecordsAck { id }
            | ControlMessage::RunnersQuery { id, .. }
            | ControlMessage::RunnersReply { id, .. }
            | ControlMessage::RevocationsQuery { id, .. }
            | ControlMessage::Revocations { id, .. }
            | ControlMessage::PolicyQuery { id, .. }
            | ControlMessage::PolicyReply { id, .. }
            | ControlMessage::ZoneAdvert { id, .. }
            | ControlMessage::ZonesQuery { id, .. }
            | ControlMessage::ZonesReply { id, .. }
            | ControlMessage::ZonesChanged { id }
            | ControlMessage::NameQuery { id, .. }
            | ControlMessage::NameReply { id, .. }
            | ControlMessage::DnsQuery { id, .. }
            | ControlMessage::DnsAnswer { id, .. }
            | ControlMessage::RenewRequest { id }
            | ControlMessage::RenewReply { id, .. }
            | ControlMessage::RelayOffer { id }
            | ControlMessage::RelayIntroduce { id, .. }
            | ControlMessage::UseRelay { id, .. }
            | ControlMessage::ServicesAdvert { id, .. }
            | ControlMessage::ServicesQuery { id, .. }
            | ControlMessage::ServicesReply { id, .. } => *id,
        }
    }

    /// The message's type byte and request id.
    fn type_and_id(&self) -> (u8, u32) {
        let (ty, id) = match self {
            ControlMessage::Register { id, .. } => (T_REGISTER, id),
            ControlMessage::RegisterAck { id, .. } => (T_REGISTER_ACK, id),
            ControlMessage::Query { id, .. } => (T_QUERY, id),
            ControlMessage::QueryReply { id, .. } => (T_QUERY_REPLY, id),
            ControlMessage::Punch { id, .. } => (T_PUNCH, id),
            ControlMessage::Deregister { id } => (T_DEREGISTER, id),
            ControlMessage::RoutesQuery { id, .. } => (T_ROUTES_QUERY, id),
            ControlMessage::RoutesReply { id, .. } => (T_ROUTES_REPLY, id),
            ControlMessage::Ping { id } => (T_PING, id),
            ControlMessage::Pong { id } => (T_PONG, id),
            ControlMessage::RunnerAdvert { id, .. } => (T_RUNNER_ADVERT, id),
            ControlMessage::RunnerJobs { id, .. } => (T_RUNNER_JOBS, id),
            ControlMessage::FlowRecords { id, .. } => (T_FLOW_RECORDS, id),
            ControlMessage::FlowRecordsAck { id } => (T_FLOW_RECORDS_ACK, id),
            ControlMessage::RunnersQuery { id, .. } => (T_RUNNERS_QUERY, id),
            ControlMessage::RunnersReply { id, .. } => (T_RUNNERS_REPLY, id),
            ControlMessage::RevocationsQuery { id, .. } => (T_REVOCATIONS_QUERY, id),
            ControlMessage::Revocations { id, .. } => (T_REVOCATIONS, id),
            ControlMessage::PolicyQuery { id, .. } => (T_POLICY_QUERY, id),
            ControlMessage::PolicyReply { id, .. } => (T_POLICY_REPLY, id),
            ControlMessage::ZoneAdvert { id, .. } => (T_ZONE_ADVERT, id),
            ControlMessage::ZonesQuery { id, .. } => (T_ZONES_QUERY, id),
            ControlMessage::ZonesReply { id, .. } => (T_ZONES_REPLY, id),
            ControlMessage::ZonesChanged { id } => (T_ZONES_CHANGED, id),
            ControlMessage::NameQuery { id, .. } => (T_NAME_QUERY, id),
            ControlMessage::NameReply { id, .. } => (T_NAME_REPLY, id),
            ControlMessage::DnsQuery { id, .. } => (T_DNS_QUERY, id),
            ControlMessage::DnsAnswer { id, .. } => (T_DNS_ANSWER, id),
            ControlMessage::RenewRequest { id } => (T_RENEW_REQUEST, id),
            ControlMessage::RenewReply { id, .. } => (T_RENEW_REPLY, id),
            ControlMessage::RelayOffer { id } => (T_RELAY_OFFER, id),
            ControlMessage::RelayIntroduce { id, .. } => (T_RELAY_INTRODUCE, id),
            ControlMessage::UseRelay { id, .. } => (T_USE_RELAY, id),
            ControlMessage::ServicesAdvert { id, .. } => (T_SERVICES_ADVERT, id),
            ControlMessage::ServicesQuery { id, .. } => (T_SERVICES_QUERY, id),
            ControlMessage::ServicesReply { id, .. } => (T_SERVICES_REPLY, id),
        };
        (ty, *id)
    }

    /// Encodes the message. Endpoint lists are cut to [`MAX_ENDPOINTS`] and
    /// certificates longer than [`MAX_CERT_LEN`] refused, so every encoded
    /// message decodes.
    pub fn encode(&self) -> Result<Vec<u8>, ControlError> {
        let mut out = Vec::with_capacity(64);
        let (ty, id) = self.type_and_id();
        out.push(ty);
        out.extend_from_slice(&id.to_be_bytes());
        match self {
            ControlMessage::Register { local, routes, .. } => {
                put_endpoints(&mut out, local)?;
                if routes.len() > MAX_ADVERTISED {
                    return Err(ControlError::TooManyRoutes);
                }
                out.push(routes.len() as u8);
                for r in routes {
                    put_net(&mut out, r);
                }
            }
            ControlMessage::RegisterAck {
                observed,
                relay,
                revocations,
                ..
            } => {
                put_socket_addr(&mut out, observed);
                out.push(u8::from(*relay));
                out.extend_from_slice(&revocations.to_be_bytes());
            }
            ControlMessage::RevocationsQuery { since, .. } => {
                out.extend_from_slice(&since.to_be_bytes());
            }
            ControlMessage::PolicyQuery { dst, port, .. } => {
                out.extend_from_slice(&dst.octets());
                out.extend_from_slice(&port.to_be_bytes());
            }
            ControlMessage::PolicyReply { answer, .. } => {
                out.push(u8::from(answer.allowed));
                put_label(&mut out, &answer.reason)?;
            }
            ControlMessage::Revocations {
                since,
                version,
                entries,
                complete,
                ..
            } => {
                if entries.len() > MAX_REVOCATIONS_IN_REPLY {
                    return Err(ControlError::TooManyLabels);
                }
                out.extend_from_slice(&since.to_be_bytes());
                out.extend_from_slice(&version.to_be_bytes());
                out.push(u8::from(*complete));
                out.push(entries.len() as u8);
                for e in entries {
                    out.extend_from_slice(&e.fingerprint.0);
                    out.extend_from_slice(&e.not_after.to_be_bytes());
                }
            }
            ControlMessage::Query { overlay_ip, .. } => out.extend_from_slice(&overlay_ip.octets()),
            ControlMessage::QueryReply {
                overlay_ip, peer, ..
            } => {
                out.extend_from_slice(&overlay_ip.octets());
                match peer {
                    None => out.push(0),
                    Some(p) => {
                        out.push(1);
                        put_peer(&mut out, p)?;
                    }
                }
            }
            ControlMessage::Punch { peer, .. } => put_peer(&mut out, peer)?,
            ControlMessage::RoutesQuery { after, .. } => {
                if let Some((subnet, gateway)) = after {
                    put_net(&mut out, subnet);
                    out.extend_from_slice(&gateway.octets());
                }
            }
            ControlMessage::Deregister { .. }
            | ControlMessage::Ping { .. }
            | ControlMessage::Pong { .. }
            | ControlMessage::RenewRequest { .. }
            | ControlMessage::RelayOffer { .. } => {}
            ControlMessage::RenewReply { outcome, .. } => put_renew_outcome(&mut out, outcome)?,
            ControlMessage::RelayIntroduce { a, b, .. } => {
                out.extend_from_slice(&a.octets());
                out.extend_from_slice(&b.octets());
            }
            ControlMessage::UseRelay { peer, relay, .. } => {
                out.extend_from_slice(&peer.octets());
                put_peer(&mut out, relay)?;
            }
            ControlMessage::RunnerAdvert { labels, load, .. } => {
                if labels.len() > MAX_LABELS {
                    return Err(ControlError::TooManyLabels);
                }
                out.push(labels.len() as u8);
                for l in labels {
                    put_label(&mut out, l)?;
                }
                put_load(&mut out, load);
            }
            ControlMessage::RunnersQuery { selector, .. } => match selector {
                RunnerSelector::Label(l) => {
                    out.push(0);
                    put_label(&mut out, l)?;
                }
                RunnerSelector::Name(n) => {
                    out.push(1);
                    put_label(&mut out, n)?;
                }
            },
            ControlMessage::RunnersReply { runners, .. } => {
                if runners.len() > MAX_RUNNERS_IN_REPLY {
                    return Err(ControlError::TooManyLabels);
                }
                out.push(runners.len() as u8);
                for r in runners {
                    out.extend_from_slice(&r.overlay_ip.octets());
                    put_label(&mut out, &r.name)?;
                    match &r.load {
                        None => out.push(0),
                        Some(load) => {
                            out.push(1);
                            put_load(&mut out, load);
                        }
                    }
                }
            }
            ControlMessage::RoutesReply {
                routes, complete, ..
            } => put_routes_page(&mut out, routes, *complete)?,
            ControlMessage::ZoneAdvert { .. }
            | ControlMessage::ZonesQuery { .. }
            | ControlMessage::ZonesReply { .. }
            | ControlMessage::ZonesChanged { .. }
            | ControlMessage::NameQuery { .. }
            | ControlMessage::NameReply { .. }
            | ControlMessage::DnsQuery { .. }
            | ControlMessage::DnsAnswer { .. } => names::put_body(self, &mut out)?,
            ControlMessage::ServicesAdvert { .. }
            | ControlMessage::ServicesQuery { .. }
            | ControlMessage::ServicesReply { .. } => services::put_body(self, &mut out)?,
            ControlMessage::RunnerJobs { .. } => jobs::put_body(self, &mut out)?,
            ControlMessage::FlowRecords { .. } => flows::put_body(self, &mut out)?,
            ControlMessage::FlowRecordsAck { .. } => {}
        }
        if out.len() > MAX_CONTROL_LEN {
            return Err(ControlError::TooLong);
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<ControlMessage, ControlError> {
        if bytes.len() > MAX_CONTROL_LEN {
            return Err(ControlError::TooLong);
        }
        let mut r = Reader::new(bytes);
        let ty = r.u8().ok_or(ControlError::Malformed)?;
        let id = r.u32().ok_or(ControlError::Malformed)?;
        let msg = match ty {
            T_REGISTER => read_register(id, &mut r)?,
            T_REGISTER_ACK => ControlMessage::RegisterAck {
                id,
                observed: r.socket_addr().ok_or(ControlError::Malformed)?,
                relay: read_bool(&mut r)?,
                revocations: r.u32().ok_or(ControlError::Malformed)?,
            },
            T_REVOCATIONS_QUERY => ControlMessage::RevocationsQuery {
                id,
                since: r.u32().ok_or(ControlError::Malformed)?,
            },
            T_POLICY_QUERY => ControlMessage::PolicyQuery {
                id,
                dst: r.ipv4().ok_or(ControlError::Malformed)?,
                port: r.u16().ok_or(ControlError::Malformed)?,
            },
            T_POLICY_REPLY => {
                let allowed = read_bool(&mut r)?;
                ControlMessage::PolicyReply {
                    id,
                    answer: PolicyAnswer {
                        allowed,
                        reason: read_label(&mut r)?,
                    },
                }
            }
            T_REVOCATIONS => read_revocations(id, &mut r)?,
            T_QUERY => ControlMessage::Query {
                id,
                overlay_ip: r.ipv4().ok_or(ControlError::Malformed)?,
            },
            T_QUERY_REPLY => {
                let overlay_ip = r.ipv4().ok_or(ControlError::Malformed)?;
                let peer = match r.u8() {
                    Some(0) => None,
                    Some(1) => Some(read_peer(&mut r)?),
                    _ => return Err(ControlError::Malformed),
                };
                ControlMessage::QueryReply {
                    id,
                    overlay_ip,
                    peer,
                }
            }
            T_PUNCH => ControlMessage::Punch {
                id,
                peer: read_peer(&mut r)?,
            },
            T_DEREGISTER => ControlMessage::Deregister { id },
            T_ROUTES_QUERY => {
                let after = if r.is_empty() {
                    None
                } else {
                    let subnet = read_net(&mut r)?;
                    Some((subnet, r.ipv4().ok_or(ControlError::Malformed)?))
                };
                ControlMessage::RoutesQuery { id, after }
            }
            T_PING => ControlMessage::Ping { id },
            T_PONG => ControlMessage::Pong { id },
            T_ROUTES_REPLY => {
                let (routes, complete) = read_routes_page(&mut r)?;
                ControlMessage::RoutesReply {
                    id,
                    routes,
                    complete,
                }
            }
            T_RUNNER_ADVERT => read_runner_advert(id, &mut r)?,
            T_RUNNERS_QUERY => {
                let kind = r.u8().ok_or(ControlError::Malformed)?;
                let text = read_label(&mut r)?;
                let selector = match kind {
                    0 => RunnerSelector::Label(text),
                    1 => RunnerSelector::Name(text),
                    _ => return Err(ControlError::Malformed),
                };
                ControlMessage::RunnersQuery { id, selector }
            }
            T_RUNNERS_REPLY => read_runners_reply(id, &mut r)?,
            T_ZONE_ADVERT..=T_ZONES_CHANGED => names::read_body(ty, id, &mut r)?,
            T_SERVICES_ADVERT..=T_SERVICES_REPLY => services::read_body(ty, id, &mut r)?,
            T_RUNNER_JOBS => jobs::read_body(id, &mut r)?,
            T_FLOW_RECORDS => flows::read_body(id, &mut r)?,
            T_FLOW_RECORDS_ACK => ControlMessage::FlowRecordsAck { id },
            T_RENEW_REQUEST => ControlMessage::RenewRequest { id },
            T_RENEW_REPLY => {
                let outcome = match r.u8() {
                    Some(0) => RenewOutcome::Renewed(
                        r.blob16(MAX_CERT_LEN)
                            .ok_or(ControlError::Malformed)?
                            .to_vec(),
                    ),
                    Some(1) => {
                        let why = r.blob16(MAX_RENEW_REASON).ok_or(ControlError::Malformed)?;
                        RenewOutcome::Refused(
                            String::from_utf8(why.to_vec()).map_err(|_| ControlError::Malformed)?,
                        )
                    }
                    _ => return Err(ControlError::Malformed),
                };
                ControlMessage::RenewReply { id, outcome }
            }
            T_RELAY_OFFER => ControlMessage::RelayOffer { id },
            T_RELAY_INTRODUCE => ControlMessage::RelayIntroduce {
                id,
                a: r.ipv4().ok_or(ControlError::Malformed)?,
                b: r.ipv4().ok_or(ControlError::Malformed)?,
            },
            T_USE_RELAY => ControlMessage::UseRelay {
                id,
                peer: r.ipv4().ok_or(ControlError::Malformed)?,
                relay: read_peer(&mut r)?,
            },
            other => return Err(ControlError::UnknownType(other)),
        };
        if !r.is_empty() {
            return Err(ControlError::Malformed);
        }
        Ok(msg)
    }
}

/// A gateway's name in a page of routes is cut at this many bytes.
const MAX_ROUTE_NAME_LEN: usize = 64;

/// One page of routes: whether it is the last, then the routes.
fn put_routes_page(
    out: &mut Vec<u8>,
    routes: &[AdvertisedRoute],
    complete: bool,
) -> Result<(), ControlError> {
    out.push(u8::from(complete));
    if routes.len() > MAX_ROUTES_IN_REPLY {
        return Err(ControlError::TooManyRoutes);
    }
    out.push(routes.len() as u8);
    for r in routes {
        put_net(out, &r.subnet);
        out.extend_from_slice(&r.gateway.octets());
        let name = r.name.as_bytes();
        let name = &name[..name.len().min(MAX_ROUTE_NAME_LEN)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
    }
    Ok(())
}

fn read_routes_page(r: &mut Reader<'_>) -> Result<(Vec<AdvertisedRoute>, bool), ControlError> {
    let complete = match r.u8() {
        Some(0) => false,
        Some(1) => true,
        _ => return Err(ControlError::Malformed),
    };
    let n = r.u8().ok_or(ControlError::Malformed)? as usize;
    if n > MAX_ROUTES_IN_REPLY {
        return Err(ControlError::TooManyRoutes);
    }
    let mut routes = Vec::with_capacity(n);
    for _ in 0..n {
        let subnet = read_net(r)?;
        let gateway = r.ipv4().ok_or(ControlError::Malformed)?;
        let len = r.u8().ok_or(ControlError::Malformed)? as usize;
        // Longer than a sender writes (it cuts names at the limit): not
        // from a Tern lighthouse.
        if len > MAX_ROUTE_NAME_LEN {
            return Err(ControlError::Malformed);
        }
        let name = r.bytes(len).ok_or(ControlError::Malformed)?;
        let name = std::str::from_utf8(name)
            .map_err(|_| ControlError::Malformed)?
            .to_string();
        routes.push(AdvertisedRoute {
            subnet,
            gateway,
            name,
        });
    }
    Ok((routes, complete))
}

pub(super) fn put_label(out: &mut Vec<u8>, label: &str) -> Result<(), ControlError> {
    if label.len() > MAX_LABEL_LEN {
        return Err(ControlError::TooManyLabels);
    }
    out.push(label.len() as u8);
    out.extend_from_slice(label.as_bytes());
    Ok(())
}

pub(super) fn read_label(r: &mut Reader<'_>) -> Result<String, ControlError> {
    let len = r.u8().ok_or(ControlError::Malformed)? as usize;
    if len > MAX_LABEL_LEN {
        return Err(ControlError::TooManyLabels);
    }
    let bytes = r.bytes(len).ok_or(ControlError::Malformed)?;
    std::str::from_utf8(bytes)
        .map(str::to_string)
        .map_err(|_| ControlError::Malformed)
}

fn put_load(out: &mut Vec<u8>, load: &RunnerLoad) {
    for v in [load.running, load.queued, load.concurrency] {
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn read_load(r: &mut Reader<'_>) -> Result<RunnerLoad, ControlError> {
    let mut v = [0u16; 3];
    for x in &mut v {
        let hi = r.u8().ok_or(ControlError::Malformed)?;
        let lo = r.u8().ok_or(ControlError::Malformed)?;
        *x = u16::from_be_bytes([hi, lo]);
    }
    Ok(RunnerLoad {
        running: v[0],
        queued: v[1],
        concurrency: v[2],
    })
}

fn put_endpoints(out: &mut Vec<u8>, endpoints: &[SocketAddr]) -> Result<(), ControlError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(ControlError::TooManyEndpoints);
    }
    out.push(endpoints.len() as u8);
    for e in endpoints {
        put_socket_addr(out, e);
    }
    Ok(())
}

/// A renewal's answer: 0 and the certificate, or 1 and the reason (cut at a
/// character boundary to [`MAX_RENEW_REASON`] bytes).
fn put_renew_outcome(out: &mut Vec<u8>, outcome: &RenewOutcome) -> Result<(), ControlError> {
    match outcome {
        RenewOutcome::Renewed(cert) => {
            if cert.len() > MAX_CERT_LEN {
                return Err(ControlError::TooLong);
            }
            out.push(0);
            put_blob16(out, cert);
        }
        RenewOutcome::Refused(why) => {
            out.push(1);
            let mut end = why.len().min(MAX_RENEW_REASON);
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            put_blob16(out, &why.as_bytes()[..end]);
        }
    }
    Ok(())
}

fn put_peer(out: &mut Vec<u8>, peer: &PeerInfo) -> Result<(), ControlError> {
    if peer.cert.len() > MAX_CERT_LEN {
        return Err(ControlError::TooLong);
    }
    put_blob16(out, &peer.cert);
    put_endpoints(out, &peer.endpoints)
}

fn put_net(out: &mut Vec<u8>, net: &Ipv4Net) {
    out.extend_from_slice(&net.addr().octets());
    out.push(net.prefix_len());
}

fn read_net(r: &mut Reader<'_>) -> Result<Ipv4Net, ControlError> {
    let addr = r.ipv4().ok_or(ControlError::Malformed)?;
    let prefix = r.u8().ok_or(ControlError::Malformed)?;
    Ipv4Net::new(addr, prefix).map_err(|_| ControlError::Malformed)
}

/// A flag: 0 or 1, anything else malformed.
pub(super) fn read_bool(r: &mut Reader<'_>) -> Result<bool, ControlError> {
    match r.u8() {
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        _ => Err(ControlError::Malformed),
    }
}

fn read_register(id: u32, r: &mut Reader<'_>) -> Result<ControlMessage, ControlError> {
    let local = read_endpoints(r)?;
    let n = r.u8().ok_or(ControlError::Malformed)? as usize;
    if n > MAX_ADVERTISED {
        return Err(ControlError::TooManyRoutes);
    }
    let mut routes = Vec::with_capacity(n);
    for _ in 0..n {
        routes.push(read_net(r)?);
    }
    Ok(ControlMessage::Register { id, local, routes })
}

fn read_revocations(id: u32, r: &mut Reader<'_>) -> Result<ControlMessage, ControlError> {
    let since = r.u32().ok_or(ControlError::Malformed)?;
    let version = r.u32().ok_or(ControlError::Malformed)?;
    let complete = read_bool(r)?;
    let n = r.u8().ok_or(ControlError::Malformed)? as usize;
    if n > MAX_REVOCATIONS_IN_REPLY {
        return Err(ControlError::TooManyLabels);
    }
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let fingerprint = Fingerprint(r.array().ok_or(ControlError::Malformed)?);
        let not_after = u64::from_be_bytes(r.array().ok_or(ControlError::Malformed)?);
        entries.push(Revocation {
            fingerprint,
            not_after,
        });
    }
    Ok(ControlMessage::Revocations {
        id,
        since,
        version,
        entries,
        complete,
    })
}

fn read_runner_advert(id: u32, r: &mut Reader<'_>) -> Result<ControlMessage, ControlError> {
    let n = r.u8().ok_or(ControlError::Malformed)? as usize;
    if n > MAX_LABELS {
        return Err(ControlError::TooManyLabels);
    }
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        labels.push(read_label(r)?);
    }
    Ok(ControlMessage::RunnerAdvert {
        id,
        labels,
        load: read_load(r)?,
    })
}

fn read_runners_reply(id: u32, r: &mut Reader<'_>) -> Result<ControlMessage, ControlError> {
    let n = r.u8().ok_or(ControlError::Malformed)? as usize;
    if n > MAX_RUNNERS_IN_REPLY {
        return Err(ControlError::TooManyLabels);
    }
    let mut runners = Vec::with_capacity(n);
    for _ in 0..n {
        let overlay_ip = r.ipv4().ok_or(ControlError::Malformed)?;
        let name = read_label(r)?;
        let load = match r.u8() {
            Some(0) => None,
            Some(1) => Some(read_load(r)?),
            _ => return Err(ControlError::Malformed),
        };
        runners.push(RunnerInfo {
            overlay_ip,
            name,
            load,
        });
    }
    Ok(ControlMessage::RunnersReply { id, runners })
}

fn read_endpoints(r: &mut Reader<'_>) -> Result<Vec<SocketAddr>, ControlError> {
    let n = r.u8().ok_or(ControlError::Malformed)? as usize;
    if n > MAX_ENDPOINTS {
        return Err(ControlError::TooManyEndpoints);
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(r.socket_addr().ok_or(ControlError::Malformed)?);
    }
    Ok(out)
}

fn read_peer(r: &mut Reader<'_>) -> Result<PeerInfo, ControlError> {
    let cert = r
        .blob16(MAX_CERT_LEN)
        .ok_or(ControlError::Malformed)?
        .to_vec();
    Ok(PeerInfo {
        cert,
        endpoints: read_endpoints(r)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_peer() -> PeerInfo {
        PeerInfo {
            cert: vec![7; 300],
            endpoints: vec![
                "198.18.0.2:4242".parse().unwrap_or_else(|_| unreachable!()),
                "[2001:db8::1]:5000"
                    .parse()
                    .unwrap_or_else(|_| unreachable!()),
            ],
        }
    }

    #[test]
    fn every_message_round_trips() {
        let ip = Ipv4Addr::new(100, 64, 0, 7);
        let msgs = vec![
            ControlMessage::Register {
                id: 1,
                local: sample_peer().endpoints,
                routes: vec!["198.19.0.0/24".parse().unwrap_or_else(|_| unreachable!())],
            },
            ControlMessage::RoutesQuery { id: 8, after: None },
            ControlMessage::RoutesQuery {
                id: 8,
                after: Some((
                    "198.19.0.0/24".parse().unwrap_or_else(|_| unreachable!()),
                    ip,
                )),
            },
            ControlMessage::Ping { id: 10 },
            ControlMessage::Pong { id: 11 },
            ControlMessage::RenewRequest { id: 40 },
            ControlMessage::RelayOffer { id: 50 },
            ControlMessage::ServicesAdvert {
                id: 60,
                services: vec![AdvertisedService {
                    name: "k8s".into(),
                    kind: "kubernetes".into(),
                    port: 6443,
                    groups: vec!["ci".into(), "deploy".into()],
                }],
            },
            ControlMessage::ServicesQuery {
                id: 61,
                name: "k8s".into(),
            },
            ControlMessage::ServicesReply {
                id: 62,
                services: vec![ServiceEntry {
                    service: AdvertisedService {
                        name: "api".into(),
                        kind: "http".into(),
                        port: 9000,
                        groups: vec![],
                    },
                    node: ip,
                    node_name: "gw-1".into(),
                }],
                complete: true,
            },
            ControlMessage::RelayIntroduce {
                id: 51,
                a: ip,
                b: Ipv4Addr::new(100, 64, 0, 8),
            },
            ControlMessage::UseRelay {
                id: 52,
                peer: ip,
                relay: sample_peer(),
            },
            ControlMessage::RenewReply {
                id: 40,
                outcome: RenewOutcome::Renewed(vec![9; MAX_CERT_LEN]),
            },
            ControlMessage::RenewReply {
                id: 41,
                outcome: RenewOutcome::Refused("revoked: ask for a new certificate".into()),
            },
            ControlMessage::RoutesReply {
                id: 9,
                routes: vec![AdvertisedRoute {
                    subnet: "198.19.0.0/24".parse().unwrap_or_else(|_| unreachable!()),
                    gateway: ip,
                    name: "gw-1".into(),
                }],
                complete: false,
            },
            ControlMessage::RegisterAck {
                id: 2,
                observed: sample_peer().endpoints[0],
                relay: true,
                revocations: 7,
            },
            ControlMessage::RevocationsQuery { id: 16, since: 3 },
            ControlMessage::PolicyQuery {
                id: 18,
                dst: Ipv4Addr::new(198, 19, 0, 10),
                port: 5432,
            },
            ControlMessage::PolicyReply {
                id: 19,
                answer: PolicyAnswer {
                    allowed: false,
                    reason: "inbound rule-2/reject".into(),
                },
            },
            ControlMessage::Revocations {
                id: 17,
                since: 3,
                version: 40,
                complete: false,
                entries: vec![
                    Revocation {
                        fingerprint: Fingerprint([7; 32]),
                        not_after: 1_800_000_000,
                    };
                    MAX_REVOCATIONS_IN_REPLY
                ],
            },
            ControlMessage::Query {
                id: 3,
                overlay_ip: ip,
            },
            ControlMessage::QueryReply {
                id: 4,
                overlay_ip: ip,
                peer: Some(sample_peer()),
            },
            ControlMessage::QueryReply {
                id: 5,
                overlay_ip: ip,
                peer: None,
            },
            ControlMessage::Punch {
                id: 6,
                peer: sample_peer(),
            },
            ControlMessage::Deregister { id: 7 },
            ControlMessage::RunnerAdvert {
                id: 12,
                labels: vec!["linux".into(), "vpc-a".into()],
                load: RunnerLoad {
                    running: 2,
                    queued: 7,
                    concurrency: 2,
                },
            },
            ControlMessage::RunnerJobs {
                id: 34,
                jobs: vec![
                    RecentJob {
                        job_id: "runner-1-412-7".into(),
                        caller: "ci-vm-1a2b".into(),
                        pipeline: "deploy é".into(),
                        started: 1_800_000_000,
                        ended: None,
                        state: RecentJobState::Running,
                        exit_code: 0,
                    },
                    RecentJob {
                        job_id: "runner-1-412-6".into(),
                        caller: "ci-vm-9f".into(),
                        pipeline: "test".into(),
                        started: 1_799_999_000,
                        ended: Some(1_799_999_100),
                        state: RecentJobState::Failed,
                        exit_code: -2,
                    },
                ],
            },
            ControlMessage::FlowRecords {
                id: 35,
                dropped: 12,
                flows: vec![crate::flows::FlowEntry {
                    seq: 1 << 40,
                    start_ms: 1_800_000_000_000,
                    end_ms: 1_800_000_000_250,
                    caller: "ci-vm-1a2b".into(),
                    fingerprint: crate::cert::Fingerprint([7; 32]),
                    groups: vec!["ci".into()],
                    src: ip,
                    src_port: 40000,
                    dst: Ipv4Addr::new(198, 19, 0, 10),
                    dst_port: 5432,
                    dst_port_last: 5432,
                    proto: 6,
                    allowed: true,
                    rule: Some(2),
                    reason: crate::flows::FlowEnd::Closed,
                    bytes_in: 1200,
                    packets_in: 9,
                    bytes_out: 88_000,
                    packets_out: 61,
                }],
            },
            ControlMessage::FlowRecordsAck { id: 36 },
            ControlMessage::RunnersQuery {
                id: 13,
                selector: RunnerSelector::Label("linux".into()),
            },
            ControlMessage::RunnersQuery {
                id: 14,
                selector: RunnerSelector::Name("runner-1".into()),
            },
            ControlMessage::RunnersReply {
                id: 15,
                runners: vec![
                    RunnerInfo {
                        overlay_ip: ip,
                        name: "runner-1".into(),
                        load: Some(RunnerLoad::default()),
                    },
                    RunnerInfo {
                        overlay_ip: ip,
                        name: "db".into(),
                        load: None,
                    },
                ],
            },
        ];
        for m in msgs {
            let bytes = m.encode().unwrap_or_else(|e| panic!("{m:?}: {e}"));
            assert_eq!(ControlMessage::decode(&bytes), Ok(m));
        }
    }

    #[test]
    fn limits_are_enforced_both_ways() {
        let too_many = ControlMessage::Register {
            id: 1,
            local: vec![sample_peer().endpoints[0]; MAX_ENDPOINTS + 1],
            routes: vec![],
        };
        assert_eq!(too_many.encode(), Err(ControlError::TooManyEndpoints));
        let big_cert = ControlMessage::Punch {
            id: 1,
            peer: PeerInfo {
                cert: vec![0; MAX_CERT_LEN + 1],
                endpoints: vec![],
            },
        };
        assert_eq!(big_cert.encode(), Err(ControlError::TooLong));
        assert_eq!(
            ControlMessage::decode(&[99, 0, 0, 0, 1]),
            Err(ControlError::UnknownType(99))
        );
        assert_eq!(
            ControlMessage::decode(&[3, 0, 0]),
            Err(ControlError::Malformed)
        );
        assert_eq!(
            ControlMessage::decode(&[6, 0, 0, 0, 1, 0]),
            Err(ControlError::Malformed),
            "trailing bytes"
        );
        assert_eq!(
            ControlMessage::decode(&vec![1; MAX_CONTROL_LEN + 1]),
            Err(ControlError::TooLong)
        );
    }

    #[test]
    fn the_largest_runner_messages_fit() {
        let long = "l".repeat(MAX_LABEL_LEN);
        let advert = ControlMessage::RunnerAdvert {
            id: 1,
            labels: vec![long.clone(); MAX_LABELS],
            load: RunnerLoad::default(),
        };
        assert!(advert.encode().is_ok());
        let reply = ControlMessage::RunnersReply {
            id: 1,
            runners: vec![
                RunnerInfo {
                    overlay_ip: Ipv4Addr::new(100, 64, 0, 1),
                    name: long.clone(),
                    load: Some(RunnerLoad::default()),
                };
                MAX_RUNNERS_IN_REPLY
            ],
        };
        assert!(reply.encode().is_ok());
        let too_long = ControlMessage::RunnersQuery {
            id: 1,
            selector: RunnerSelector::Label(format!("{long}x")),
        };
        assert_eq!(too_long.encode(), Err(ControlError::TooManyLabels));
        let long = job_text(&"é".repeat(MAX_JOB_TEXT));
        assert!(long.len() <= MAX_JOB_TEXT);
        let jobs = ControlMessage::RunnerJobs {
            id: 1,
            jobs: vec![
                RecentJob {
                    job_id: long.clone(),
                    caller: long.clone(),
                    pipeline: long,
                    started: u64::MAX,
                    ended: Some(u64::MAX),
                    state: RecentJobState::Error,
                    exit_code: i32::MIN,
                };
                MAX_RECENT_JOBS
            ],
        };
        let Ok(bytes) = jobs.encode() else {
            panic!("six of the longest jobs must fit");
        };
        assert_eq!(ControlMessage::decode(&bytes), Ok(jobs));
        let mut too_many = bytes.clone();
        too_many[5] = (MAX_RECENT_JOBS + 1) as u8;
        assert_eq!(
            ControlMessage::decode(&too_many),
            Err(ControlError::Malformed)
        );
        let mut bad_state = bytes;
        bad_state.truncate(bad_state.len() - 1);
        assert_eq!(
            ControlMessage::decode(&bad_state),
            Err(ControlError::Malformed)
        );
    }

    #[test]
    fn least_busy_orders_by_share_of_slots_taken() {
        let load = |running, queued, concurrency| RunnerLoad {
            running,
            queued,
            concurrency,
        };
        let idle_big = load(1, 0, 4);
        let half = load(1, 0, 2);
        let full = load(2, 0, 2);
        let queued = load(2, 3, 2);
        let mut v = vec![queued, full, half, idle_big];
        v.sort_by_key(RunnerLoad::busyness);
        assert_eq!(v, vec![idle_big, half, full, queued]);
        assert!(load(0, 0, 0).busyness() < load(1, 0, 0).busyness());
    }

    /// Found by the `control` fuzz target: a route's name longer than any
    /// sender writes decoded, and re-encoded to another message.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_route_name_longer_than_a_sender_writes_is_refused() {
        let reply = ControlMessage::RoutesReply {
            id: 11,
            routes: vec![AdvertisedRoute {
                subnet: "198.19.0.0/24".parse().unwrap(),
                gateway: "100.64.0.30".parse().unwrap(),
                name: "n".repeat(MAX_ROUTE_NAME_LEN),
            }],
            complete: true,
        };
        let bytes = reply.encode().unwrap();
        assert_eq!(ControlMessage::decode(&bytes).unwrap(), reply);
        let at = bytes.iter().position(|b| *b == b'n').unwrap() - 1;
        assert_eq!(usize::from(bytes[at]), MAX_ROUTE_NAME_LEN);
        let mut longer = bytes.clone();
        longer[at] += 1;
        longer.insert(at + 1, b'n');
        assert_eq!(
            ControlMessage::decode(&longer),
            Err(ControlError::Malformed)
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = ControlMessage::decode(&bytes);
        }

        #[test]
        fn typed_garbage_never_panics(ty in 0u8..40, rest in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut bytes = vec![ty, 0, 0, 0, 1];
            bytes.extend(rest);
            let _ = ControlMessage::decode(&bytes);
        }
    }
}
