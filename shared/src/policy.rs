//! Config types for what a node lets through and where it routes:
//! `[firewall]` with `[[firewall.inbound]]` / `[[firewall.outbound]]` rules,
//! `[gateway]` and `[[routes]]`. Parsed as part of [`crate::config::NodeConfig`].

use std::fmt;
use std::path::Path;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::config::ConfigError;

/// Default conntrack timeouts (the ones Nebula users know).
pub const DEFAULT_TCP_TIMEOUT: Duration = Duration::from_secs(12 * 60);
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(3 * 60);
pub const DEFAULT_ICMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Most rules per direction.
pub const MAX_RULES: usize = 1024;

/// `[firewall]`: stateful, default deny inbound, default allow outbound.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirewallConfig {
    /// Rules for packets arriving from peers. None: nothing comes in (but
    /// replies to flows this node started).
    pub inbound: Vec<RuleConfig>,
    /// Rules for packets this node sends to peers. None: everything goes out.
    pub outbound: Vec<RuleConfig>,
    /// Log every denied packet (rate-limited) with peer, groups and 5-tuple.
    pub log: bool,
    #[serde(deserialize_with = "crate::config::duration")]
    pub tcp_timeout: Duration,
    #[serde(deserialize_with = "crate::config::duration")]
    pub udp_timeout: Duration,
    #[serde(deserialize_with = "crate::config::duration")]
    pub icmp_timeout: Duration,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        FirewallConfig {
            inbound: Vec::new(),
            outbound: Vec::new(),
            log: false,
            tcp_timeout: DEFAULT_TCP_TIMEOUT,
            udp_timeout: DEFAULT_UDP_TIMEOUT,
            icmp_timeout: DEFAULT_ICMP_TIMEOUT,
        }
    }
}

/// One rule. Every condition given must hold; conditions left out match anything.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(default)]
    pub proto: Proto,
    /// Destination port or range: `"any"`, `"22"`, `"8000-8100"` (or a number).
    #[serde(default, deserialize_with = "port_range")]
    pub port: PortRange,
    /// The peer's certificate name.
    #[serde(default)]
    pub host: Option<String>,
    /// Groups the peer's certificate must all carry.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The remote address (inbound: source; outbound: destination) lies in this net.
    #[serde(default)]
    pub cidr: Option<IpNet>,
    /// The local address (inbound: destination; outbound: source) lies in
    /// this net: a routed subnet on a gateway. Left out, the rule covers only
    /// traffic to (or from) this node's own overlay address.
    #[serde(default)]
    pub local_cidr: Option<IpNet>,
    #[serde(default)]
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    /// The IP protocol number, `None` for any.
    pub fn number(self) -> Option<u8> {
        match self {
            Proto::Any => None,
            Proto::Tcp => Some(6),
            Proto::Udp => Some(17),
            Proto::Icmp => Some(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    /// Refuse loudly: TCP RST, ICMP unreachable for the rest.
    Reject,
}

/// An inclusive port range; `0-65535` is "any".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange::ANY
    }
}

impl PortRange {
    pub const ANY: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn is_any(&self) -> bool {
        *self == PortRange::ANY
    }

    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    /// `"any"`, `"22"`, `"8000-8100"`.
    pub fn parse(s: &str) -> Result<PortRange, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("any") {
            return Ok(PortRange::ANY);
        }
        let bad = || {
            format!("invalid value: port {s:?}: write \"any\", a port such as \"22\", or a range such as \"8000-8100\"")
        };
        let num = |p: &str| p.trim().parse::<u16>().map_err(|_| bad());
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let p = num(s)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!(
                "invalid value: port range {s:?} runs backwards; write \"{last}-{first}\""
            ));
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            f.write_str("any")
        } else if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

fn port_range<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PortRange, D::Error> {
    struct PortVisitor;

    impl Visitor<'_> for PortVisitor {
        type Value = PortRange;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a port: \"any\", \"22\", \"8000-8100\" or a number")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<PortRange, E> {
            PortRange::parse(s).map_err(E::custom)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
            let p = u16::try_from(v)
                .map_err(|_| E::custom(format!("invalid value: port {v} is not in 0-65535")))?;
            Ok(PortRange { first: p, last: p })
        }
    }

    deserializer.deserialize_any(PortVisitor)
}

/// `[gateway]`: this node forwards overlay traffic into private subnets.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Subnets to route; each must lie inside a subnet the node's certificate carries.
    pub subnets: Vec<Ipv4Net>,
    /// Rewrite the source of forwarded traffic to the gateway's own address,
    /// so the private network needs no route back to the overlay. Default true.
    #[serde(default = "yes")]
    pub masquerade: bool,
    /// `[[gateway.dns]]`: DNS zones this gateway answers for through the
    /// private network's resolvers.
    #[serde(default)]
    pub dns: Vec<crate::dns::GatewayDnsConfig>,
}

fn yes() -> bool {
    true
}

/// `[[routes]]` on a client: send this subnet through a gateway.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub subnet: Ipv4Net,
    /// The gateway's certificate name. Optional: without it, any gateway whose
    /// certificate authorizes the subnet and which advertises it is used.
    #[serde(default)]
    pub via: Option<String>,
}

impl FirewallConfig {
    pub(crate) fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        for (direction, rules) in [("inbound", &self.inbound), ("outbound", &self.outbound)] {
            if rules.len() > MAX_RULES {
                return Err(invalid(
                    file,
                    format!("firewall.{direction}"),
                    format!("{} rules; at most {MAX_RULES}", rules.len()),
                ));
            }
            for (i, rule) in rules.iter().enumerate() {
                rule.validate(file, &format!("firewall.{direction}[{i}]"))?;
            }
        }
        for (key, d) in [
            ("tcp_timeout", self.tcp_timeout),
            ("udp_timeout", self.udp_timeout),
            ("icmp_timeout", self.icmp_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(
                    file,
                    format!("firewall.{key}"),
                    "must be longer than zero",
                ));
            }
        }
        Ok(())
    }
}

impl RuleConfig {
    fn validate(&self, file: &Path, key: &str) -> Result<(), ConfigError> {
        if matches!(self.proto, Proto::Icmp | Proto::Any) && !self.port.is_any() {
            return Err(invalid(
                file,
                format!("{key}.port"),
                format!("a port needs proto = \"tcp\" or \"udp\" (this rule says {:?}); set proto or remove port", self.proto),
            ));
        }
        if self.host.as_deref() == Some("") {
            return Err(invalid(
                file,
                format!("{key}.host"),
                "empty host name; give a certificate name or remove host",
            ));
        }
        if self.groups.iter().any(String::is_empty) {
            return Err(invalid(file, format!("{key}.groups"), "empty group name"));
        }
        Ok(())
    }
}

impl GatewayConfig {
    pub(crate) fn validate(&mut self, file: &Path) -> Result<(), ConfigError> {
        crate::dns::validate_gateway_dns(&mut self.dns, file)?;
        if self.subnets.is_empty() {
            return Err(invalid(file, "gateway.subnets", "no subnets: list the private networks this gateway routes, e.g. [\"198.19.0.0/24\"]"));
        }
        for (i, s) in self.subnets.iter().enumerate() {
            if s.trunc() != *s {
                return Err(invalid(
                    file,
                    format!("gateway.subnets[{i}]"),
                    format!("{s} has host bits set; did you mean {}?", s.trunc()),
                ));
            }
        }
        Ok(())
    }
}

pub(crate) fn validate_routes(routes: &[RouteConfig], file: &Path) -> Result<(), ConfigError> {
    for (i, r) in routes.iter().enumerate() {
        if r.subnet.trunc() != r.subnet {
            return Err(invalid(
                file,
                format!("routes[{i}].subnet"),
                format!(
                    "{} has host bits set; did you mean {}?",
                    r.subnet,
                    r.subnet.trunc()
                ),
            ));
        }
        if r.via.as_deref() == Some("") {
            return Err(invalid(
                file,
                format!("routes[{i}].via"),
                "empty gateway name; give its certificate name or remove via",
            ));
        }
    }
    Ok(())
}

fn invalid(file: &Path, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.into(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn port_ranges() {
        assert_eq!(PortRange::parse("any"), Ok(PortRange::ANY));
        assert_eq!(
            PortRange::parse("22"),
            Ok(PortRange {
                first: 22,
                last: 22
            })
        );
        assert_eq!(
            PortRange::parse("8000-8100"),
            Ok(PortRange {
                first: 8000,
                last: 8100
            })
        );
        assert!(PortRange::parse("8100-8000").is_err());
        for bad in ["", "-", "x", "70000", "1-2-3", "22,23", "-5"] {
            assert!(PortRange::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            PortRange::parse("8000-8100").map(|p| p.to_string()),
            Ok("8000-8100".into())
        );
    }

    proptest! {
        #[test]
        fn port_parse_never_panics(s in "\\PC*") {
            let _ = PortRange::parse(&s);
        }
    }
}
