//! The node's stateful firewall, sans IO.
//!
//! Drive it from the data path: [`Firewall::check_inbound`] for every
//! decrypted packet (after the inner-source check, before the TUN device or a
//! local service), [`Firewall::check_outbound`] for every packet about to be
//! encrypted, [`Firewall::handle_timeout`] now and then to expire flows, and
//! [`Firewall::replace_rules`] on reload (flows survive it).
//!
//! Semantics: inbound is default deny, outbound default allow (an empty
//! outbound list allows everything; a non-empty one allows only what it
//! matches). The first matching rule decides. A packet of a flow already
//! allowed either way passes both ways until the flow times out.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tern_mesh::rate::TokenBucket;
use tern_shared::cert::{Fingerprint, VerifiedCert};
use tern_shared::packet::{
    flow_of, icmp_error_quote, icmp_unreachable_for, tcp_reset_for, Flow, PROTO_ICMP, PROTO_TCP,
    PROTO_UDP,
};
use tern_shared::policy::{Action, FirewallConfig};
use tern_shared::show::list;

mod records;
mod rules;

use records::{Counted, OpenFlow, Records};
pub use records::{
    EndReason, FlowRecord, CLOSED_LINGER, DENIED_WINDOW, MAX_DENIED_SUMS, RECORD_QUEUE,
};
use rules::{decide, Rule};
pub use rules::{
    ip_proto_name, proto_name, subnet_within, subnets_no_rule_opens, Caller, Decided,
    PolicyDecision, Unknown,
};

/// Flows remembered at most; past that, new flows are refused (and counted)
/// until old ones expire.
pub const MAX_FLOWS: usize = 200_000;
/// Denials logged per second at most (all are counted).
const LOG_RATE: u32 = 20;
/// Rejections answered per second at most (the rest are dropped silently).
const REJECT_RATE: u32 = 200;

/// What to do with a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Drop,
    /// Drop, and send this reply (a TCP RST or an ICMP unreachable) back
    /// toward the packet's source.
    Reject(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Counters for `tern status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FirewallStatus {
    pub inbound_rules: usize,
    pub outbound_rules: usize,
    pub flows: usize,
    /// Denials by rule or reason, e.g. `inbound/default-deny`,
    /// `inbound/rule-2/reject`, `outbound/flow-table-full`.
    pub denied: BTreeMap<String, u64>,
    pub allowed_new_flows: u64,
}

pub struct Firewall {
    inbound: Vec<Rule>,
    outbound: Vec<Rule>,
    log: bool,
    timeouts: Timeouts,
    own_ip: Ipv4Addr,
    flows: HashMap<FlowKey, FlowState>,
    /// Whether flows peers start, and refusals, are recorded.
    record_flows: bool,
    records: Records,
    denied: BTreeMap<String, u64>,
    allowed_new_flows: u64,
    log_bucket: TokenBucket,
    reject_bucket: TokenBucket,
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    tcp: Duration,
    udp: Duration,
    icmp: Duration,
}

/// A flow in the table: when it expires, and, for a flow a peer started
/// while records are on, what it carried so far (boxed: most of the table
/// is this small without).
#[derive(Debug)]
struct FlowState {
    expires: Instant,
    open: Option<Box<OpenFlow>>,
    /// A TCP flow recorded as closed: its last packets pass until
    /// `expires`, which they do not push back.
    closed: bool,
}

/// A flow seen from this node: its local and remote ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    local: Ipv4Addr,
    remote: Ipv4Addr,
    local_port: u16,
    remote_port: u16,
}

impl Firewall {
    pub fn new(config: &FirewallConfig, own_ip: Ipv4Addr, now: Instant) -> Firewall {
        let mut fw = Firewall {
            inbound: Vec::new(),
            outbound: Vec::new(),
            log: false,
            timeouts: Timeouts {
                tcp: config.tcp_timeout,
                udp: config.udp_timeout,
                icmp: config.icmp_timeout,
            },
            own_ip,
            flows: HashMap::new(),
            record_flows: false,
            records: Records::default(),
            denied: BTreeMap::new(),
            allowed_new_flows: 0,
            log_bucket: TokenBucket::new(LOG_RATE, now),
            reject_bucket: TokenBucket::new(REJECT_RATE, now),
        };
        fw.replace_rules(config);
        fw
    }

    /// New rules and timeouts; established flows stay.
    pub fn replace_rules(&mut self, config: &FirewallConfig) {
        self.inbound = config.inbound.iter().map(Rule::from_config).collect();
        self.outbound = config.outbound.iter().map(Rule::from_config).collect();
        self.log = config.log;
        self.timeouts = Timeouts {
            tcp: config.tcp_timeout,
            udp: config.udp_timeout,
            icmp: config.icmp_timeout,
        };
    }

    /// A decrypted packet from `peer`, addressed to this node or to a subnet
    /// it routes.
    pub fn check_inbound(&mut self, packet: &[u8], peer: &VerifiedCert, now: Instant) -> Verdict {
        self.check(Direction::Inbound, packet, peer, now)
    }

    /// A packet this node is about to send to `peer`.
    pub fn check_outbound(&mut self, packet: &[u8], peer: &VerifiedCert, now: Instant) -> Verdict {
        self.check(Direction::Outbound, packet, peer, now)
    }

    /// What the inbound rules say about a new TCP connection from `peer`
    /// to `dst:port`, without a packet and without touching flows or
    /// counters: what a peer asks before it concludes that a target it
    /// could not reach was denied by policy.
    pub fn inbound_tcp_decision(
        &self,
        peer: &VerifiedCert,
        dst: Ipv4Addr,
        port: u16,
    ) -> PolicyDecision {
        let flow = Flow {
            proto: PROTO_TCP,
            src: peer.overlay_ip(),
            dst,
            src_port: 0,
            dst_port: port,
            icmp_type: 0,
            icmp_code: 0,
            fragment: false,
        };
        match self.decide(Direction::Inbound, &flow, peer) {
            Ok(Decided::Rule {
                action: Action::Allow,
                ..
            }) => PolicyDecision::Allowed,
            Ok(Decided::Rule { index, .. }) => {
                PolicyDecision::Denied(format!("inbound rule-{index}/reject"))
            }
            _ => PolicyDecision::Denied("inbound default-deny (no rule allows it)".into()),
        }
    }

    /// Which rule decides a new flow `flow` in direction `dir` from (or to)
    /// `caller`: the same decision [`Firewall::check_inbound`] and
    /// [`Firewall::check_outbound`] make for a packet that starts a flow.
    pub fn decide<C: Caller + ?Sized>(
        &self,
        dir: Direction,
        flow: &Flow,
        caller: &C,
    ) -> Result<Decided, (usize, Unknown)> {
        let rules = match dir {
            Direction::Inbound => &self.inbound,
            Direction::Outbound => &self.outbound,
        };
        decide(rules, dir, flow, caller, self.own_ip)
    }

    /// The node's own overlay address: what a rule without `local_cidr`
    /// covers.
    pub fn own_ip(&self) -> Ipv4Addr {
        self.own_ip
    }

    /// Whether some inbound allow rule lets `peer` into any of `subnets`
    /// at all, whatever the protocol or port: who a gateway answers DNS
    /// for when its `[[gateway.dns]]` names no groups.
    pub fn lets_into(&self, peer: &VerifiedCert, subnets: &[Ipv4Net]) -> bool {
        self.lets_caller_into(peer, peer.overlay_ip(), subnets)
            .unwrap_or(false)
    }

    /// [`Firewall::lets_into`] for any caller: `Err` when a rule that
    /// could let it in needs what the caller did not say.
    pub fn lets_caller_into<C: Caller + ?Sized>(
        &self,
        caller: &C,
        caller_ip: Ipv4Addr,
        subnets: &[Ipv4Net],
    ) -> Result<bool, Unknown> {
        for rule in &self.inbound {
            if rule.lets_into(caller, caller_ip, subnets)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Forgets flows past their timeout (recording those a peer started as
    /// idle), and makes records of refusals summed long enough.
    pub fn handle_timeout(&mut self, now: Instant) {
        let records = &mut self.records;
        self.flows.retain(|key, state| {
            if state.expires > now {
                return true;
            }
            if let Some(open) = state.open.take() {
                records.push(open.record(key, EndReason::Idle));
            }
            false
        });
        self.records.flush_denied(now, false);
    }

    /// Records each flow a peer starts (inbound) and sums refusals, from
    /// now on; off: no more records (flows open keep theirs).
    pub fn record_flows(&mut self, on: bool) {
        self.record_flows = on;
    }

    /// Ends the flows of these certificates (revoked): each is recorded
    /// with `reason` and forgotten, so that no further packet of it passes
    /// without the rules; their sums of refusals are recorded now too.
    pub fn end_flows_of(&mut self, fingerprints: &[Fingerprint], reason: EndReason) {
        if fingerprints.is_empty() {
            return;
        }
        let records = &mut self.records;
        self.flows.retain(|key, state| {
            let Some(open) = &state.open else {
                return true;
            };
            if !fingerprints.contains(&open.fingerprint()) {
                return true;
            }
            records.push(open.record(key, reason));
            false
        });
        self.records.flush_denied_of(fingerprints);
    }

    /// The node stops: every open flow is recorded as stopped, every sum
    /// of refusals as it stands.
    pub fn stop_recording(&mut self, now: Instant) {
        for (key, state) in self.flows.iter_mut() {
            if let Some(open) = state.open.take() {
                self.records.push(open.record(key, EndReason::Stopped));
            }
        }
        self.records.flush_denied(now, true);
    }

    /// Up to `max` records, oldest first.
    pub fn take_records(&mut self, max: usize) -> Vec<FlowRecord> {
        self.records.take(max).collect()
    }

    /// Records waiting to be taken.
    pub fn records_waiting(&self) -> usize {
        self.records.waiting()
    }

    /// Records made, and dropped (the queue full, or no room to sum a
    /// refusal), since the start.
    pub fn record_counts(&self) -> (u64, u64) {
        (self.records.made, self.records.dropped)
    }

    pub fn status(&self) -> FirewallStatus {
        FirewallStatus {
            inbound_rules: self.inbound.len(),
            outbound_rules: self.outbound.len(),
            flows: self.flows.len(),
            denied: self.denied.clone(),
            allowed_new_flows: self.allowed_new_flows,
        }
    }

    fn check(
        &mut self,
        dir: Direction,
        packet: &[u8],
        peer: &VerifiedCert,
        now: Instant,
    ) -> Verdict {
        let Some(flow) = flow_of(packet) else {
            return self.deny(dir, "malformed", None, packet, peer, now, Action::Allow);
        };
        let key = FlowKey::new(dir, &flow);
        if let Some(state) = self.flows.get_mut(&key) {
            if state.expires > now {
                if state.closed {
                    // A new connection on the same ports is a new flow.
                    if records::tcp_flags(packet).is_some_and(|f| f & 0x12 == 0x02) {
                        self.flows.remove(&key);
                        return self.check_new(dir, key, flow, packet, peer, now);
                    }
                    return Verdict::Allow;
                }
                state.expires = now + self.timeouts.of(flow.proto);
                if let Some(open) = &mut state.open {
                    if open.count(dir == Direction::Inbound, packet, now) == Counted::Closed {
                        self.records.push(open.record(&key, EndReason::Closed));
                        state.open = None;
                        // Its last ACKs still pass; recorded already.
                        state.closed = true;
                        state.expires = now + records::CLOSED_LINGER.min(self.timeouts.tcp);
                    }
                }
                return Verdict::Allow;
            }
        }
        self.check_new(dir, key, flow, packet, peer, now)
    }

    /// A packet of no flow in the table: an ICMP error tied to a flow, or
    /// the first packet of a new one.
    fn check_new(
        &mut self,
        dir: Direction,
        key: FlowKey,
        flow: Flow,
        packet: &[u8],
        peer: &VerifiedCert,
        now: Instant,
    ) -> Verdict {
        // An ICMP error about a flow we carry (e.g. "fragmentation needed",
        // which path MTU discovery lives on) belongs to that flow, if it is
        // tied to it: sent to the host that sent the quoted packet, about
        // a packet that went to (inbound) or came from (outbound) the peer's
        // side. Anything else would let a peer with one allowed flow forge
        // errors toward any host behind a gateway.
        if flow.proto == PROTO_ICMP {
            if let Some(quoted) = icmp_error_quote(packet) {
                let opposite = match dir {
                    Direction::Inbound => Direction::Outbound,
                    Direction::Outbound => Direction::Inbound,
                };
                let qkey = FlowKey::new(opposite, &quoted);
                if self.flows.get(&qkey).is_some_and(|e| e.expires > now) {
                    let peer_end = match dir {
                        Direction::Inbound => quoted.dst,
                        Direction::Outbound => quoted.src,
                    };
                    if flow.dst == quoted.src && on_peers_side(peer, peer_end) {
                        return Verdict::Allow;
                    }
                    return self.deny(
                        dir,
                        "icmp-error-not-for-its-flow",
                        Some(&flow),
                        packet,
                        peer,
                        now,
                        Action::Allow,
                    );
                }
            }
        }
        // A verified certificate tells everything a rule asks about.
        let decided = self.decide(dir, &flow, peer).unwrap_or(Decided::NoRule);
        if dir == Direction::Inbound && self.record_flows && !decided.allows() {
            self.records
                .denied(peer, &flow, packet.len(), decided.rule(), now);
        }
        match decided {
            Decided::OpenOutbound
            | Decided::Rule {
                action: Action::Allow,
                ..
            } => self.admit(key, &flow, dir, packet, peer, decided.rule(), now),
            Decided::Rule { index, .. } => {
                let reason = format!("rule-{index}/reject");
                self.deny(dir, &reason, Some(&flow), packet, peer, now, Action::Reject)
            }
            Decided::NoRule => self.deny(
                dir,
                "default-deny",
                Some(&flow),
                packet,
                peer,
                now,
                Action::Allow,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        key: FlowKey,
        flow: &Flow,
        dir: Direction,
        packet: &[u8],
        peer: &VerifiedCert,
        rule: Option<usize>,
        now: Instant,
    ) -> Verdict {
        if self.flows.len() >= MAX_FLOWS {
            self.handle_timeout(now);
            if self.flows.len() >= MAX_FLOWS {
                if dir == Direction::Inbound && self.record_flows {
                    self.records.denied(peer, flow, packet.len(), None, now);
                }
                return self.deny(
                    dir,
                    "flow-table-full",
                    None,
                    packet,
                    peer,
                    now,
                    Action::Allow,
                );
            }
        }
        self.allowed_new_flows += 1;
        let open = (dir == Direction::Inbound && self.record_flows).then(|| {
            let mut open = OpenFlow::new(peer, rule, now);
            open.count(true, packet, now);
            Box::new(open)
        });
        let state = FlowState {
            expires: now + self.timeouts.of(flow.proto),
            open,
            closed: false,
        };
        // An entry past its timeout that no sweep removed yet: its flow
        // ended idle.
        if let Some(old) = self.flows.insert(key, state) {
            if let Some(open) = old.open {
                self.records.push(open.record(&key, EndReason::Idle));
            }
        }
        Verdict::Allow
    }

    #[allow(clippy::too_many_arguments)]
    fn deny(
        &mut self,
        dir: Direction,
        reason: &str,
        flow: Option<&Flow>,
        packet: &[u8],
        peer: &VerifiedCert,
        now: Instant,
        action: Action,
    ) -> Verdict {
        let counter = format!("{}/{reason}", dir.as_str());
        *self.denied.entry(counter).or_insert(0) += 1;
        if self.log && self.log_bucket.take(now) {
            // Ports only where the protocol has them: for ICMP, `Flow`
            // carries the echo identifier there, which reads like a port.
            match flow {
                Some(f) if !f.fragment && (f.proto == PROTO_TCP || f.proto == PROTO_UDP) => {
                    tracing::info!(
                        direction = dir.as_str(),
                        peer = peer.name(),
                        groups = %list(peer.groups()),
                        proto = %ip_proto_name(f.proto),
                        src = %f.src,
                        src_port = f.src_port,
                        dst = %f.dst,
                        dst_port = f.dst_port,
                        reason,
                        "firewall denied"
                    )
                }
                Some(f) if !f.fragment && f.proto == PROTO_ICMP => tracing::info!(
                    direction = dir.as_str(),
                    peer = peer.name(),
                    groups = %list(peer.groups()),
                    proto = %ip_proto_name(f.proto),
                    src = %f.src,
                    dst = %f.dst,
                    icmp_type = f.icmp_type,
                    icmp_code = f.icmp_code,
                    reason,
                    "firewall denied"
                ),
                Some(f) => tracing::info!(
                    direction = dir.as_str(),
                    peer = peer.name(),
                    groups = %list(peer.groups()),
                    proto = %ip_proto_name(f.proto),
                    src = %f.src,
                    dst = %f.dst,
                    fragment = f.fragment,
                    reason,
                    "firewall denied"
                ),
                None => tracing::info!(
                    direction = dir.as_str(),
                    peer = peer.name(),
                    reason,
                    "firewall denied"
                ),
            }
        }
        if action != Action::Reject || !self.reject_bucket.take(now) {
            return Verdict::Drop;
        }
        let reply = match flow.map(|f| f.proto) {
            Some(PROTO_TCP) => tcp_reset_for(packet),
            Some(PROTO_UDP) => flow.and_then(|f| icmp_unreachable_for(packet, f.dst, 3)),
            Some(_) => flow.and_then(|f| icmp_unreachable_for(packet, f.dst, 13)),
            None => None,
        };
        reply.map(Verdict::Reject).unwrap_or(Verdict::Drop)
    }
}

impl Timeouts {
    fn of(&self, proto: u8) -> Duration {
        match proto {
            PROTO_TCP => self.tcp,
            PROTO_ICMP => self.icmp,
            _ => self.udp,
        }
    }
}

impl FlowKey {
    fn new(dir: Direction, f: &Flow) -> FlowKey {
        match dir {
            Direction::Inbound => FlowKey {
                proto: f.proto,
                local: f.dst,
                remote: f.src,
                local_port: f.dst_port,
                remote_port: f.src_port,
            },
            Direction::Outbound => FlowKey {
                proto: f.proto,
                local: f.src,
                remote: f.dst,
                local_port: f.src_port,
                remote_port: f.dst_port,
            },
        }
    }
}

/// Whether `ip` is the peer's overlay address or inside a subnet its
/// certificate carries.
fn on_peers_side(peer: &VerifiedCert, ip: Ipv4Addr) -> bool {
    ip == peer.overlay_ip()
        || peer
            .subnets()
            .iter()
            .any(|n| matches!(n, ipnet::IpNet::V4(n) if n.contains(&ip)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
