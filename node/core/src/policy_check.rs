//! `tern policy test|explain`, sans IO: what the nodes of some configs
//! decide for a caller and a destination, without a packet. Every
//! decision goes through the code that decides for packets: the
//! firewall's [`Firewall::decide`] for a flow's first packet, a node's
//! "is this packet for me" test, [`ServedZone::admits`] for a DNS zone and
//! [`tern_shared::services::authorize`] for a service.
//!
//! A destination wider than one address, port or protocol is checked at
//! every point where some rule or subnet of the node begins or ends, so
//! the verdict holds for all of it; where parts differ, both are shown.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::Instant;

use ipnet::{IpNet, Ipv4Net};
use tern_shared::config::NodeConfig;
use tern_shared::packet::{Flow, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use tern_shared::policy::{Action, PortRange, Proto, RuleConfig};
use tern_shared::policy_tests::{Destination, Expect, PolicyTest};
use tern_shared::show::list;

use crate::firewall::{ip_proto_name, Caller, Decided, Direction, Firewall, Unknown};
use crate::node::ServedZone;

/// Points checked for one test at one node, at most: a destination wider
/// than that is refused with a request to narrow it.
pub const MAX_POINTS: usize = 100_000;

/// A node whose config is under test.
pub struct NodeUnderTest {
    /// How it is named in output: its config file's name.
    pub label: String,
    /// Its certificate's name, when its certificate could be read.
    pub cert_name: Option<String>,
    /// Its config file's name without `.toml`.
    pub stem: String,
    pub config: NodeConfig,
    /// Its overlay address, from its certificate: what rules without
    /// `local_cidr` and services cover. `None`: the certificate could not
    /// be read (`cert_problem` says why).
    pub own_ip: Option<Ipv4Addr>,
    pub cert_problem: Option<String>,
    /// The lines its inbound rules start on.
    pub inbound_lines: Vec<usize>,
    firewall: Firewall,
    subnets: Vec<Ipv4Net>,
    served: Vec<ServedZone>,
}

impl NodeUnderTest {
    pub fn new(
        label: String,
        stem: String,
        config: NodeConfig,
        cert: Result<(String, Ipv4Addr), String>,
        inbound_lines: Vec<usize>,
    ) -> NodeUnderTest {
        let (cert_name, own_ip, cert_problem) = match cert {
            Ok((name, ip)) => (Some(name), Some(ip), None),
            Err(why) => (None, None, Some(why)),
        };
        // The firewall is built as the daemon builds it; a node whose
        // address is unknown gets one no destination can be.
        let firewall = Firewall::new(
            &config.firewall,
            own_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            Instant::now(),
        );
        let subnets = config
            .gateway
            .as_ref()
            .map(|g| g.subnets.clone())
            .unwrap_or_default();
        let served = config
            .gateway
            .as_ref()
            .map(ServedZone::from_config)
            .unwrap_or_default();
        NodeUnderTest {
            label,
            cert_name,
            stem,
            config,
            own_ip,
            cert_problem,
            inbound_lines,
            firewall,
            subnets,
            served,
        }
    }

    fn named(&self, name: &str) -> bool {
        self.stem == name || self.label == name || self.cert_name.as_deref() == Some(name)
    }

    /// Whether a packet to `dst` is this node's to decide (its own address,
    /// or a subnet it routes): the data path's test.
    fn takes(&self, dst: Ipv4Addr) -> bool {
        Some(dst) == self.own_ip || self.subnets.iter().any(|n| n.contains(&dst))
    }
}

/// The caller a test asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asker {
    pub name: Option<String>,
    /// Sorted.
    pub groups: Vec<String>,
    pub address: Option<Ipv4Addr>,
}

impl Caller for Asker {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn has_group(&self, group: &str) -> bool {
        self.groups
            .binary_search_by(|g| g.as_str().cmp(group))
            .is_ok()
    }

    fn address_known(&self) -> bool {
        self.address.is_some()
    }
}

impl fmt::Display for Asker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} ")?,
            None => f.write_str("a caller ")?,
        }
        write!(f, "in groups [{}]", self.groups.join(", "))?;
        if let Some(ip) = self.address {
            write!(f, " from {ip}")?;
        }
        Ok(())
    }
}

/// One point of a destination: what a first packet would carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub proto: u8,
    pub dst: Ipv4Addr,
    /// TCP and UDP only.
    pub port: Option<u16>,
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}/{}", self.dst, ip_proto_name(self.proto)),
            None => write!(f, "{}/{}", self.dst, ip_proto_name(self.proto)),
        }
    }
}

/// Why a node allows or denies one point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// An inbound rule decided.
    Rule {
        index: usize,
        line: Option<usize>,
        rule: String,
        action: Action,
    },
    /// No inbound rule matched.
    DefaultDeny,
    /// The packet is not this node's: not its address, not in its subnets.
    NotRouted { subnets: Vec<Ipv4Net> },
    /// The firewall lets the caller reach the service's port, and the
    /// service's groups decide.
    Service {
        name: String,
        port: u16,
        firewall: Box<Why>,
        refused: Option<String>,
    },
    /// A DNS zone's groups, or the firewall's callers, decide.
    Zone {
        zone: String,
        groups: Option<Vec<String>>,
    },
}

/// One node's verdict for one point (or a range behind it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub node: usize,
    pub point: Option<Point>,
    pub allowed: bool,
    pub why: Why,
}

/// What the configs say about one test (or one question).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Every node that takes the destination decided; parts that agree
    /// in node, verdict and reason are shown once.
    Decided(Vec<Part>),
    /// The test cannot be decided: the message says what to add or fix.
    Undecidable(String),
}

impl Answer {
    /// `Some(Allow)` or `Some(Deny)` when every part agrees.
    pub fn verdict(&self) -> Option<Expect> {
        match self {
            Answer::Decided(parts) if parts.iter().all(|p| p.allowed) => Some(Expect::Allow),
            Answer::Decided(parts) if parts.iter().all(|p| !p.allowed) => Some(Expect::Deny),
            _ => None,
        }
    }
}

/// What the nodes decide for `asker` going to `to`, restricted to the
/// node named `only` when given.
pub fn answer(
    nodes: &[NodeUnderTest],
    asker: &Asker,
    to: &Destination,
    only: Option<&str>,
) -> Answer {
    let chosen: Vec<usize> = (0..nodes.len())
        .filter(|&i| only.is_none_or(|n| nodes[i].named(n)))
        .collect();
    if chosen.is_empty() {
        let names: Vec<String> = nodes
            .iter()
            .map(|n| n.cert_name.clone().unwrap_or_else(|| n.stem.clone()))
            .collect();
        return Answer::Undecidable(format!(
            "node {:?} is none of the configs given ({}); name a config file (without .toml) or a certificate name",
            only.unwrap_or_default(),
            names.join(", ")
        ));
    }
    let result = match to {
        Destination::Addresses { net, ports, proto } => {
            addresses(nodes, &chosen, asker, *net, *ports, *proto)
        }
        Destination::Name(name) => named(nodes, &chosen, asker, name),
    };
    match result {
        Ok(mut parts) => {
            // One line per node, verdict and reason: the first point shows it.
            let mut seen: Vec<Part> = Vec::new();
            parts.retain(|p| {
                let fresh = !seen
                    .iter()
                    .any(|s| s.node == p.node && s.allowed == p.allowed && s.why == p.why);
                if fresh {
                    seen.push(p.clone());
                }
                fresh
            });
            Answer::Decided(parts)
        }
        Err(why) => Answer::Undecidable(why),
    }
}

/// Runs one `[[test]]` for `asker` (its caller, read by the shell).
pub fn run_test(nodes: &[NodeUnderTest], asker: &Asker, test: &PolicyTest) -> Answer {
    answer(nodes, asker, &test.to, test.node.as_deref())
}

fn addresses(
    nodes: &[NodeUnderTest],
    chosen: &[usize],
    asker: &Asker,
    net: Ipv4Net,
    ports: PortRange,
    proto: Proto,
) -> Result<Vec<Part>, String> {
    let takers: Vec<usize> = chosen
        .iter()
        .copied()
        .filter(|&i| {
            let n = &nodes[i];
            n.own_ip.is_some_and(|ip| net.contains(&ip))
                || n.subnets
                    .iter()
                    .any(|s| s.contains(&net.network()) || net.contains(s))
        })
        .collect();
    if takers.is_empty() {
        let unknown: Vec<String> = chosen
            .iter()
            .filter_map(|&i| {
                nodes[i]
                    .cert_problem
                    .as_ref()
                    .map(|p| format!("{}: {p}", nodes[i].label))
            })
            .collect();
        let mut message = format!(
            "no node among the configs owns or routes {net}: it is neither a node's overlay address nor in a [gateway] subnet"
        );
        if !unknown.is_empty() {
            message.push_str(&format!(
                " (a node's address comes from its certificate, which could not be read: {})",
                unknown.join("; ")
            ));
        }
        return Err(message);
    }
    let protos: Vec<u8> = match proto {
        Proto::Tcp => vec![PROTO_TCP],
        Proto::Udp => vec![PROTO_UDP],
        Proto::Icmp => vec![PROTO_ICMP],
        Proto::Any if !ports.is_any() => vec![PROTO_TCP, PROTO_UDP],
        Proto::Any => vec![PROTO_TCP, PROTO_UDP, PROTO_ICMP],
    };
    let mut parts = Vec::new();
    for &i in &takers {
        let node = &nodes[i];
        let addrs = address_points(node, net);
        let port_points = port_points(&node.config.firewall.inbound, ports);
        let count = addrs
            .len()
            .saturating_mul(port_points.len())
            .saturating_mul(protos.len());
        if count > MAX_POINTS {
            return Err(format!(
                "{net}:{ports} is too wide to check at {} ({count} points where its rules change); narrow the subnet or the ports",
                node.label
            ));
        }
        for &p in &protos {
            for &dst in &addrs {
                let ports_here: &[u16] = if p == PROTO_ICMP { &[0] } else { &port_points };
                for &port in ports_here {
                    let point = Point {
                        proto: p,
                        dst,
                        port: (p != PROTO_ICMP).then_some(port),
                    };
                    parts.push(decide_point(nodes, i, asker, point)?);
                }
            }
        }
    }
    Ok(parts)
}

/// The node's verdict for a first packet to `point`.
fn decide_point(
    nodes: &[NodeUnderTest],
    i: usize,
    asker: &Asker,
    point: Point,
) -> Result<Part, String> {
    let node = &nodes[i];
    if !node.takes(point.dst) {
        return Ok(Part {
            node: i,
            point: Some(point),
            allowed: false,
            why: Why::NotRouted {
                subnets: node.subnets.clone(),
            },
        });
    }
    let why = firewall_why(node, asker, point)?;
    Ok(Part {
        node: i,
        point: Some(point),
        allowed: matches!(
            why,
            Why::Rule {
                action: Action::Allow,
                ..
            }
        ),
        why,
    })
}

fn firewall_why(node: &NodeUnderTest, asker: &Asker, point: Point) -> Result<Why, String> {
    let flow = Flow {
        proto: point.proto,
        src: asker.address.unwrap_or(Ipv4Addr::UNSPECIFIED),
        dst: point.dst,
        src_port: 40000,
        dst_port: point.port.unwrap_or(0),
        // An echo request: the first packet of an ICMP flow.
        icmp_type: 8,
        icmp_code: 0,
        fragment: false,
    };
    match node.firewall.decide(Direction::Inbound, &flow, asker) {
        Ok(Decided::Rule { index, action }) => Ok(Why::Rule {
            index,
            line: node.inbound_lines.get(index).copied(),
            rule: describe_rule(&node.config.firewall.inbound[index]),
            action,
        }),
        Ok(_) => Ok(Why::DefaultDeny),
        Err((index, unknown)) => Err(needs(node, index, unknown)),
    }
}

fn needs(node: &NodeUnderTest, index: usize, unknown: Unknown) -> String {
    let at = match node.inbound_lines.get(index) {
        Some(line) => format!("{}:{line}", node.label),
        None => node.label.clone(),
    };
    let rule = describe_rule(&node.config.firewall.inbound[index]);
    match unknown {
        Unknown::Name => format!(
            "inbound rule-{index} ({at}: {rule}) names a host: give the caller's certificate name (`caller = \"NAME\"`, --caller) or its certificate (`cert`, --cert)"
        ),
        Unknown::Address => format!(
            "inbound rule-{index} ({at}: {rule}) depends on the caller's overlay address: give it (`from = \"100.64.0.5\"`, --from) or its certificate (`cert`, --cert)"
        ),
    }
}

/// A service's or a DNS zone's verdict.
fn named(
    nodes: &[NodeUnderTest],
    chosen: &[usize],
    asker: &Asker,
    name: &str,
) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    for &i in chosen {
        let node = &nodes[i];
        if let Some(service) = node.config.services.iter().find(|s| s.name == name) {
            let Some(own_ip) = node.own_ip else {
                return Err(format!(
                    "{} offers service {name:?} on its own address, which its certificate gives: {}",
                    node.label,
                    node.cert_problem.as_deref().unwrap_or("unknown")
                ));
            };
            let point = Point {
                proto: PROTO_TCP,
                dst: own_ip,
                port: Some(service.listen),
            };
            let firewall = firewall_why(node, asker, point)?;
            let passes = matches!(
                firewall,
                Why::Rule {
                    action: Action::Allow,
                    ..
                }
            );
            let refused = tern_shared::services::authorize(&service.groups, &asker.groups).err();
            parts.push(Part {
                node: i,
                point: Some(point),
                allowed: passes && refused.is_none(),
                why: Why::Service {
                    name: name.to_string(),
                    port: service.listen,
                    firewall: Box::new(firewall),
                    refused,
                },
            });
        } else if let Some(zone) = ServedZone::for_name(&node.served, name) {
            let allowed = zone
                .admits(
                    asker,
                    asker.address.unwrap_or(Ipv4Addr::UNSPECIFIED),
                    &node.firewall,
                    &node.subnets,
                )
                .map_err(|unknown| match unknown {
                    Unknown::Name => format!("zone {:?} at {} admits the callers its firewall lets into its subnets, and a rule names a host: give `caller` or `cert`", zone.zone, node.label),
                    Unknown::Address => format!("zone {:?} at {} admits the callers its firewall lets into its subnets, and a rule depends on the caller's address: give `from` or `cert`", zone.zone, node.label),
                })?;
            parts.push(Part {
                node: i,
                point: None,
                allowed,
                why: Why::Zone {
                    zone: zone.zone.clone(),
                    groups: zone.groups.clone(),
                },
            });
        }
    }
    if parts.is_empty() {
        return Err(format!(
            "{name:?} is neither a [[services]] name nor in a [[gateway.dns]] zone of the configs given"
        ));
    }
    Ok(parts)
}

/// The addresses of `net` where the node's decision may change: where a
/// rule's `local_cidr`, a routed subnet or its own address begins or ends.
fn address_points(node: &NodeUnderTest, net: Ipv4Net) -> Vec<Ipv4Addr> {
    let (first, last) = (u32::from(net.network()), u32::from(net.broadcast()));
    let mut edges: Vec<u32> = vec![first];
    let mut add = |start: u32, end: u32| {
        for e in [Some(start), end.checked_add(1)].into_iter().flatten() {
            if (first..=last).contains(&e) {
                edges.push(e);
            }
        }
    };
    for rule in &node.config.firewall.inbound {
        if let Some(IpNet::V4(c)) = rule.local_cidr {
            add(c.network().into(), c.broadcast().into());
        }
    }
    for s in &node.subnets {
        add(s.network().into(), s.broadcast().into());
    }
    if let Some(ip) = node.own_ip {
        add(ip.into(), ip.into());
    }
    edges.sort_unstable();
    edges.dedup();
    edges.into_iter().map(Ipv4Addr::from).collect()
}

/// The ports of `range` where a rule's port range begins or ends.
fn port_points(rules: &[RuleConfig], range: PortRange) -> Vec<u16> {
    let mut edges = vec![range.first];
    for rule in rules {
        if rule.port.is_any() {
            continue;
        }
        for e in [Some(rule.port.first), rule.port.last.checked_add(1)]
            .into_iter()
            .flatten()
        {
            if range.contains(e) {
                edges.push(e);
            }
        }
    }
    edges.sort_unstable();
    edges.dedup();
    edges
}

/// A rule as it reads in the config: `proto tcp, port 5432, groups [ci],
/// local_cidr 198.19.0.0/24, action reject`.
pub fn describe_rule(rule: &RuleConfig) -> String {
    let mut parts = vec![format!("proto {}", crate::firewall::proto_name(rule.proto))];
    if !rule.port.is_any() {
        parts.push(format!("port {}", rule.port));
    }
    if let Some(host) = &rule.host {
        parts.push(format!("host {host}"));
    }
    if !rule.groups.is_empty() {
        parts.push(format!("groups [{}]", rule.groups.join(", ")));
    }
    if let Some(cidr) = rule.cidr {
        parts.push(format!("cidr {cidr}"));
    }
    match rule.local_cidr {
        Some(c) => parts.push(format!("local_cidr {c}")),
        None => parts.push("the node's own address".into()),
    }
    parts.push(format!(
        "action {}",
        match rule.action {
            Action::Allow => "allow",
            Action::Reject => "reject",
        }
    ));
    parts.join(", ")
}

impl Part {
    /// One line: where, what, and why — `gw-1 (gateway.toml): 198.19.0.10:5432/tcp
    /// denied by inbound rule-2 (gateway.toml:57: ...)`.
    pub fn describe(&self, nodes: &[NodeUnderTest]) -> String {
        let node = &nodes[self.node];
        let at = match &node.cert_name {
            Some(name) => format!("{name} ({})", node.label),
            None => node.label.clone(),
        };
        let what = match self.point {
            Some(p) => p.to_string(),
            None => "a DNS query".to_string(),
        };
        let verdict = if self.allowed { "allowed" } else { "denied" };
        format!("{at}: {what} {verdict} {}", self.why.describe(node))
    }
}

impl Why {
    fn describe(&self, node: &NodeUnderTest) -> String {
        match self {
            Why::Rule {
                index, line, rule, ..
            } => {
                let at = match line {
                    Some(l) => format!("{}:{l}", node.label),
                    None => node.label.clone(),
                };
                format!("by inbound rule-{index} ({at}: {rule})")
            }
            Why::DefaultDeny => "by default: no inbound rule matches (inbound is default deny)".into(),
            Why::NotRouted { subnets } => {
                let subnets = subnets.iter().map(|s| s.to_string()).collect::<Vec<_>>();
                format!(
                    "because it does not route there (not its address; its [gateway] subnets: {})",
                    if subnets.is_empty() { "none".to_string() } else { subnets.join(", ") }
                )
            }
            Why::Service {
                name,
                port,
                firewall,
                refused,
            } => match (firewall.as_ref(), refused) {
                (
                    Why::Rule {
                        action: Action::Allow,
                        ..
                    },
                    None,
                ) => format!(
                    "to service {name} (port {port}): its firewall lets the caller in {} and the service's groups admit it",
                    firewall.describe(node)
                ),
                (
                    Why::Rule {
                        action: Action::Allow,
                        ..
                    },
                    Some(why),
                ) => format!("by service {name}: {why}"),
                (other, _) => format!(
                    "to service {name} (port {port}) {}",
                    other.describe(node)
                ),
            },
            Why::Zone { zone, groups } => match groups {
                Some(groups) => format!(
                    "by [[gateway.dns]] zone {zone}: for callers in any of the groups [{}]",
                    list(groups)
                ),
                None => format!(
                    "by [[gateway.dns]] zone {zone}: it names no groups, so it answers the callers the firewall lets into the subnets"
                ),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
