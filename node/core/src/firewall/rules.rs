//! Rules and the one function that decides with them: [`decide`], used by
//! the firewall for every new flow, by a peer's policy question, and by
//! `tern policy test|explain` (`crate::policy_check`), so that a test's
//! verdict is the packet's verdict.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use tern_shared::cert::VerifiedCert;
use tern_shared::packet::{Flow, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use tern_shared::policy::{Action, FirewallConfig, PortRange, Proto, RuleConfig};

use super::Direction;

/// Who a rule is asked about: a peer's verified certificate, or the caller
/// a policy test describes (which may leave its name or address unsaid).
pub trait Caller {
    /// The certificate name, `None` when not known.
    fn name(&self) -> Option<&str>;
    fn has_group(&self, group: &str) -> bool;
    /// Whether the flow's remote address is the caller's real one (a
    /// policy test without `from` does not know it).
    fn address_known(&self) -> bool;
}

impl Caller for VerifiedCert {
    fn name(&self) -> Option<&str> {
        Some(VerifiedCert::name(self))
    }

    fn has_group(&self, group: &str) -> bool {
        VerifiedCert::has_group(self, group)
    }

    fn address_known(&self) -> bool {
        true
    }
}

/// What a rule needed to know about the caller and was not told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// The rule names a `host`: the caller's certificate name.
    Name,
    /// The rule has a `cidr`: the caller's overlay address.
    Address,
}

/// Which rule decided a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    /// The rule at this index (0-based, as `rule-N` in counters and flow
    /// records) of the direction's list matched.
    Rule { index: usize, action: Action },
    /// No rule matched: denied (inbound always; outbound when it has rules).
    NoRule,
    /// Outbound without rules: everything goes out.
    OpenOutbound,
}

impl Decided {
    pub fn allows(self) -> bool {
        matches!(
            self,
            Decided::Rule {
                action: Action::Allow,
                ..
            } | Decided::OpenOutbound
        )
    }

    /// The deciding rule's index, if a rule decided.
    pub fn rule(self) -> Option<usize> {
        match self {
            Decided::Rule { index, .. } => Some(index),
            _ => None,
        }
    }
}

/// A rule as the firewall holds it.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    proto: Option<u8>,
    port: PortRange,
    host: Option<String>,
    groups: Vec<String>,
    cidr: Option<IpNet>,
    local_cidr: Option<IpNet>,
    pub(super) action: Action,
}

/// The first rule of `rules` that matches `flow` in direction `dir` decides;
/// none, and inbound (or outbound with rules) is denied. `Err` when a rule
/// that could decide needs what the caller did not say (never for a
/// [`VerifiedCert`]).
pub(super) fn decide<C: Caller + ?Sized>(
    rules: &[Rule],
    dir: Direction,
    flow: &Flow,
    caller: &C,
    own_ip: Ipv4Addr,
) -> Result<Decided, (usize, Unknown)> {
    if dir == Direction::Outbound && rules.is_empty() {
        return Ok(Decided::OpenOutbound);
    }
    for (index, rule) in rules.iter().enumerate() {
        match rule.matches(dir, flow, caller, own_ip) {
            Ok(true) => {
                return Ok(Decided::Rule {
                    index,
                    action: rule.action,
                })
            }
            Ok(false) => {}
            Err(unknown) => return Err((index, unknown)),
        }
    }
    Ok(Decided::NoRule)
}

impl Rule {
    pub(super) fn from_config(c: &RuleConfig) -> Rule {
        Rule {
            proto: c.proto.number(),
            port: c.port,
            host: c.host.clone(),
            groups: c.groups.clone(),
            cidr: c.cidr,
            local_cidr: c.local_cidr,
            action: c.action,
        }
    }

    fn matches<C: Caller + ?Sized>(
        &self,
        dir: Direction,
        f: &Flow,
        caller: &C,
        own_ip: Ipv4Addr,
    ) -> Result<bool, Unknown> {
        if self.proto.is_some_and(|p| p != f.proto) {
            return Ok(false);
        }
        let (local, remote) = match dir {
            Direction::Inbound => (f.dst, f.src),
            Direction::Outbound => (f.src, f.dst),
        };
        if !self.port.is_any() {
            // Fragments carry no ports: only "any" rules can match them.
            if f.fragment
                || !(f.proto == PROTO_TCP || f.proto == PROTO_UDP)
                || !self.port.contains(f.dst_port)
            {
                return Ok(false);
            }
        }
        if !self.groups.iter().all(|g| caller.has_group(g)) {
            return Ok(false);
        }
        let local_matches = match self.local_cidr {
            Some(c) => c.contains(&IpAddr::V4(local)),
            None => local == own_ip,
        };
        if !local_matches {
            return Ok(false);
        }
        // What the caller may not have said comes last, so that a rule
        // ruled out by the rest never asks for it.
        self.caller_matches(caller, remote)
    }

    /// The rule's `host` and `cidr` (for the caller at `remote`).
    fn caller_matches<C: Caller + ?Sized>(
        &self,
        caller: &C,
        remote: Ipv4Addr,
    ) -> Result<bool, Unknown> {
        if let Some(host) = self.host.as_deref() {
            match caller.name() {
                Some(name) if name == host => {}
                Some(_) => return Ok(false),
                None => return Err(Unknown::Name),
            }
        }
        match self.cidr {
            Some(_) if !caller.address_known() => Err(Unknown::Address),
            Some(cidr) => Ok(cidr.contains(&IpAddr::V4(remote))),
            None => Ok(true),
        }
    }

    /// Whether this allow rule lets `caller` (at `caller_ip`) into any of
    /// `subnets`, whatever the protocol or port.
    pub(super) fn lets_into<C: Caller + ?Sized>(
        &self,
        caller: &C,
        caller_ip: Ipv4Addr,
        subnets: &[Ipv4Net],
    ) -> Result<bool, Unknown> {
        let into = self.action == Action::Allow
            && self.local_cidr.is_some_and(|c| {
                subnets.iter().any(|s| match c {
                    IpNet::V4(c) => c.contains(&s.network()) || s.contains(&c.network()),
                    IpNet::V6(_) => false,
                })
            })
            && self.groups.iter().all(|g| caller.has_group(g));
        if !into {
            return Ok(false);
        }
        self.caller_matches(caller, caller_ip)
    }
}

/// An IP protocol as a person names it: `tcp`, `udp`, `icmp`, else its number.
pub fn ip_proto_name(proto: u8) -> std::borrow::Cow<'static, str> {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP => "icmp".into(),
        n => n.to_string().into(),
    }
}

/// What [`super::Firewall::inbound_tcp_decision`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyDecision {
    Allowed,
    /// Denied, and by what (`inbound rule-2/reject`, `inbound default-deny`).
    Denied(String),
}

/// Proto rule values as users write them, for messages.
pub fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Any => "any",
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    }
}

/// The gateway subnets no inbound rule lets anything into: an `allow` rule
/// reaches a routed subnet only through a `local_cidr` that overlaps it (a
/// rule without one covers the node's own overlay address alone, the safe
/// default), so a gateway with none such passes nothing and every client
/// times out. The shell warns about each, with the rule to add.
pub fn subnets_no_rule_opens(config: &FirewallConfig, subnets: &[Ipv4Net]) -> Vec<Ipv4Net> {
    subnets
        .iter()
        .filter(|subnet| {
            !config.inbound.iter().any(|rule| {
                rule.action == Action::Allow
                    && match rule.local_cidr {
                        Some(IpNet::V4(local)) => {
                            local.contains(*subnet) || subnet.contains(&local)
                        }
                        _ => false,
                    }
            })
        })
        .copied()
        .collect()
}

/// Whether `net` lies inside one of `outer`.
pub fn subnet_within(net: &Ipv4Net, outer: &[IpNet]) -> bool {
    outer.iter().any(|o| match o {
        IpNet::V4(o) => o.contains(net),
        IpNet::V6(_) => false,
    })
}
