//! Config types for names: `[dns]` on a node (its mesh domain, where it
//! serves DNS, whether it points the system's resolver at itself) and
//! `[[gateway.dns]]` on a gateway (the zones it answers for through its
//! private network's resolver, and who may ask). Parsed as part of
//! [`crate::config::NodeConfig`].

use std::fmt;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::cert::{canonical_zone, validate_zone};
use crate::config::{loopback_only, ConfigError};

/// Default `[dns] domain`: node names are `<certificate name>.tern`.
pub const DEFAULT_DOMAIN: &str = "tern";
/// The DNS port, for a resolver given without one.
pub const DNS_PORT: u16 = 53;
/// Default `[[gateway.dns]] queries_per_sec`: per caller, with twice that
/// at once.
pub const DEFAULT_QUERIES_PER_SEC: u32 = 1000;
/// Most `[[gateway.dns]]` entries.
pub const MAX_GATEWAY_DNS: usize = 64;

/// `[dns]`: mesh names and where this node answers DNS.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Node names are `<certificate name>.<domain>`. Default "tern".
    pub domain: String,
    /// More addresses to serve DNS on, UDP and TCP, loopback only (e.g.
    /// "127.0.0.1:5353"). In TUN mode the node serves its own overlay
    /// address, port 53, as well.
    pub listen: Vec<SocketAddr>,
    /// Point the system's resolver at this node while it runs (TUN mode):
    /// systemd-resolved's per-link DNS where it runs, else
    /// `/etc/resolv.conf`, restored at exit. `None`: yes when the node runs
    /// as root in TUN mode.
    pub configure_system: Option<bool>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            domain: DEFAULT_DOMAIN.to_string(),
            listen: Vec::new(),
            configure_system: None,
        }
    }
}

/// One `[[gateway.dns]]` entry: names under `zone` are answered by
/// `resolver`, for callers in `groups`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayDnsConfig {
    /// The zone, e.g. "internal"; the node's certificate must carry it
    /// (`tern cert sign --dns-zones`).
    pub zone: String,
    /// The private network's resolver, e.g. "198.19.0.2:53" (port 53 when
    /// left out). Several entries for one zone are tried in order.
    #[serde(deserialize_with = "resolver_addr")]
    pub resolver: SocketAddr,
    /// Callers carrying any of these groups may ask. Left out: the callers
    /// the firewall lets into this gateway's subnets.
    #[serde(default)]
    pub groups: Option<Vec<String>>,
    /// Queries per second one caller may send for this zone (twice that at
    /// once); more are refused. Default 1000.
    #[serde(default = "default_queries_per_sec")]
    pub queries_per_sec: u32,
}

fn default_queries_per_sec() -> u32 {
    DEFAULT_QUERIES_PER_SEC
}

impl DnsConfig {
    pub(crate) fn validate(&mut self, file: &Path) -> Result<(), ConfigError> {
        self.domain = canonical_zone(&self.domain);
        validate_zone(&self.domain).map_err(|e| {
            invalid(
                file,
                "dns.domain",
                format!("{e}; e.g. \"{DEFAULT_DOMAIN}\""),
            )
        })?;
        for (i, addr) in self.listen.iter().enumerate() {
            loopback_only(file, &format!("dns.listen[{i}]"), addr)?;
        }
        Ok(())
    }
}

/// Checks and canonicalizes `[[gateway.dns]]` (zones in lower case, no
/// trailing dot).
pub(crate) fn validate_gateway_dns(
    entries: &mut [GatewayDnsConfig],
    file: &Path,
) -> Result<(), ConfigError> {
    if entries.len() > MAX_GATEWAY_DNS {
        return Err(invalid(
            file,
            "gateway.dns",
            format!("more than {MAX_GATEWAY_DNS} entries"),
        ));
    }
    for (i, e) in entries.iter_mut().enumerate() {
        e.zone = canonical_zone(&e.zone);
        validate_zone(&e.zone).map_err(|err| {
            invalid(
                file,
                format!("gateway.dns[{i}].zone"),
                format!("{err}; e.g. \"internal\""),
            )
        })?;
        if e.resolver.port() == 0 || e.resolver.ip().is_unspecified() {
            return Err(invalid(
                file,
                format!("gateway.dns[{i}].resolver"),
                format!(
                    "{} is not a resolver's address; give the private network's DNS server, e.g. \"198.19.0.2:53\"",
                    e.resolver
                ),
            ));
        }
        if e.queries_per_sec == 0 {
            return Err(invalid(
                file,
                format!("gateway.dns[{i}].queries_per_sec"),
                format!("0 would refuse every query; give a rate, e.g. {DEFAULT_QUERIES_PER_SEC}"),
            ));
        }
        if let Some(groups) = &e.groups {
            if groups.is_empty() {
                return Err(invalid(
                    file,
                    format!("gateway.dns[{i}].groups"),
                    "an empty list lets nobody ask; name the groups that may, or remove groups to let in whom the firewall lets into the subnets",
                ));
            }
            if groups.iter().any(String::is_empty) {
                return Err(invalid(
                    file,
                    format!("gateway.dns[{i}].groups"),
                    "empty group name",
                ));
            }
        }
    }
    Ok(())
}

/// A resolver: "198.19.0.2:53", "198.19.0.2" (port 53) or "[fd00::2]:53".
fn resolver_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    struct ResolverVisitor;

    impl Visitor<'_> for ResolverVisitor {
        type Value = SocketAddr;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a resolver address such as \"198.19.0.2:53\" or \"198.19.0.2\"")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<SocketAddr, E> {
            parse_resolver(s).map_err(E::custom)
        }
    }

    deserializer.deserialize_str(ResolverVisitor)
}

/// Where a forward (`[[forwards]] target`, `tern forward`) goes: an IPv4
/// address, a host name resolved at each connection (through the mesh
/// when it is a mesh name or lies under a gateway's zone), or a
/// `[[services]]` entry by name (`service:NAME`), whichever node offering
/// it answers: connections are spread over them and skip one that does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardTarget {
    Addr(SocketAddrV4),
    Name { host: String, port: u16 },
    Service { name: String },
}

/// How a forward names a service: `service:NAME`.
pub const SERVICE_TARGET_PREFIX: &str = "service:";

impl FromStr for ForwardTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<ForwardTarget, String> {
        let s = s.trim();
        // `service:NAME`; `service:8080` stays the host "service", port 8080.
        if let Some(name) = s.strip_prefix(SERVICE_TARGET_PREFIX) {
            if name.parse::<u16>().is_err() {
                let ok = !name.is_empty()
                    && name.len() <= 63
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                return if ok {
                    Ok(ForwardTarget::Service {
                        name: name.to_string(),
                    })
                } else {
                    Err(format!(
                        "{s:?}: a service name is 1 to 63 lower-case letters, digits and '-' (as in `tern services`)"
                    ))
                };
            }
        }
        if let Ok(addr) = s.parse::<SocketAddrV4>() {
            return if addr.port() == 0 {
                Err(format!("{s:?}: the target needs a port"))
            } else {
                Ok(ForwardTarget::Addr(addr))
            };
        }
        let bad = || {
            format!(
                "{s:?} is not a target with a port: write an IPv4 address or a host name, then the port, e.g. 198.19.4.20:5432 or db.internal:5432"
            )
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(format!("{s:?}: the target needs a port"));
        }
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !host_ok || host.parse::<IpAddr>().is_ok() {
            return Err(bad());
        }
        Ok(ForwardTarget::Name {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for ForwardTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardTarget::Addr(a) => write!(f, "{a}"),
            ForwardTarget::Name { host, port } => write!(f, "{host}:{port}"),
            ForwardTarget::Service { name } => write!(f, "{SERVICE_TARGET_PREFIX}{name}"),
        }
    }
}

impl<'de> Deserialize<'de> for ForwardTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ForwardTarget, D::Error> {
        struct TargetVisitor;

        impl Visitor<'_> for TargetVisitor {
            type Value = ForwardTarget;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a target such as \"198.19.4.20:5432\", \"db.internal:5432\" or \"service:k8s\"",
                )
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<ForwardTarget, E> {
                s.parse()
                    .map_err(|e: String| E::custom(format!("invalid value: {e}")))
            }
        }

        deserializer.deserialize_str(TargetVisitor)
    }
}

/// A resolver address, with port 53 when none is given.
pub fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DNS_PORT))
        .map_err(|_| {
            format!("invalid value: resolver {s:?}: write an address such as \"198.19.0.2:53\" or \"198.19.0.2\"")
        })
}

fn invalid(file: &Path, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.into(),
        message: message.into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn resolvers_with_and_without_a_port() {
        assert_eq!(
            parse_resolver("198.19.0.2"),
            Ok("198.19.0.2:53".parse().unwrap())
        );
        assert_eq!(
            parse_resolver("198.19.0.2:5353"),
            Ok("198.19.0.2:5353".parse().unwrap())
        );
        assert_eq!(
            parse_resolver("[fd00::2]:53"),
            Ok("[fd00::2]:53".parse().unwrap())
        );
        assert!(parse_resolver("dns.internal")
            .unwrap_err()
            .contains("resolver"));
    }

    #[test]
    fn forward_targets_by_address_or_name() {
        assert_eq!(
            "198.19.4.20:5432".parse(),
            Ok(ForwardTarget::Addr("198.19.4.20:5432".parse().unwrap()))
        );
        assert_eq!(
            "api.internal:8080".parse(),
            Ok(ForwardTarget::Name {
                host: "api.internal".into(),
                port: 8080
            })
        );
        assert_eq!(
            "service:k8s".parse(),
            Ok(ForwardTarget::Service { name: "k8s".into() })
        );
        assert_eq!(
            "service:8080".parse(),
            Ok(ForwardTarget::Name {
                host: "service".into(),
                port: 8080
            })
        );
        assert_eq!(
            ForwardTarget::Service { name: "k8s".into() }.to_string(),
            "service:k8s"
        );
        for (bad, says) in [
            ("service:", "a service name is"),
            ("service:K8S", "a service name is"),
            ("db", "not a target with a port"),
            ("db:0", "needs a port"),
            ("198.19.0.1:0", "needs a port"),
            ("bad host:1", "not a target"),
            ("[::1]:5", "not a target"),
        ] {
            let err = bad.parse::<ForwardTarget>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    proptest! {
        #[test]
        fn resolver_parse_never_panics(s in "\\PC*") {
            let _ = parse_resolver(&s);
            let _ = s.parse::<ForwardTarget>();
        }
    }
}
