//! The file `tern policy test` reads: `[[test]]` entries, each a caller, a
//! destination and the verdict expected.
//!
//! ```toml
//! [[test]]
//! name = "CI reaches the web app"
//! groups = ["ci"]                 # or: cert = "ci-1.crt"
//! to = "198.19.0.10:8080/tcp"
//! expect = "allow"
//! ```
//!
//! A destination is an address or a subnet with an optional port (or
//! range) and protocol (`198.19.0.10:5432/tcp`, `198.19.0.0/24/icmp`,
//! `100.64.0.10:8000-8100`), or a name: a `[[services]]` entry's name or
//! a name in a `[[gateway.dns]]` zone of the configs under test.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;
use toml::Spanned;

use crate::policy::{PortRange, Proto};
use crate::toml_error::{position, Mistake, TomlError};

/// Tests in one file, at most.
pub const MAX_TESTS: usize = 10_000;

/// What a test expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    Deny,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
        })
    }
}

/// Who a test asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestCaller {
    /// Described in the test: its groups, and its certificate name and
    /// overlay address when rules need them.
    Described {
        name: Option<String>,
        groups: Vec<String>,
        from: Option<Ipv4Addr>,
    },
    /// A certificate file (relative to the tests file): its name, address
    /// and groups.
    Cert(PathBuf),
}

/// Where a test goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An address (a /32) or a subnet, ports and protocol. `Proto::Any`
    /// with ports means TCP and UDP; without, TCP, UDP and ICMP.
    Addresses {
        net: Ipv4Net,
        ports: PortRange,
        proto: Proto,
    },
    /// A service's name or a name in a DNS zone.
    Name(String),
}

/// One `[[test]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTest {
    /// Its `name`, or `test N`.
    pub name: String,
    /// The line its `[[test]]` starts on.
    pub line: usize,
    pub caller: TestCaller,
    pub to: Destination,
    /// `to` as written, for messages.
    pub to_text: String,
    pub expect: Expect,
    /// Only the config whose file name (without `.toml`) or certificate
    /// name is this decides.
    pub node: Option<String>,
}

/// Why a tests file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct PolicyTestsError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default)]
    test: Vec<Spanned<TestToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestToml {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    caller: Option<String>,
    #[serde(default)]
    from: Option<Spanned<String>>,
    to: Spanned<String>,
    expect: Expect,
    #[serde(default)]
    node: Option<String>,
}

/// Reads a tests file's text. `file` names it in errors and is the base of
/// relative `cert` paths; it is never read.
pub fn parse(text: &str, file: &Path) -> Result<Vec<PolicyTest>, PolicyTestsError> {
    let error = |offset: usize, message: String| PolicyTestsError {
        file: file.to_path_buf(),
        line: position(text, offset).line,
        message,
    };
    let parsed: FileToml = toml::from_str(text).map_err(|e| {
        let read = TomlError::read(&e);
        let offset = read.span.as_ref().map_or(0, |s| s.start);
        let message = match read.mistake {
            Mistake::UnknownKey { name, expected } => {
                format!("unknown key `{name}` in a [[test]]; {expected}")
            }
            Mistake::Missing { name } => {
                format!("a [[test]] lacks `{name}`; every test needs `to` and `expect`")
            }
            _ => read.message,
        };
        error(offset, message)
    })?;
    if parsed.test.is_empty() {
        return Err(error(
            0,
            "no tests: add [[test]] entries with a caller, `to` and `expect`".into(),
        ));
    }
    if parsed.test.len() > MAX_TESTS {
        return Err(error(
            0,
            format!(
                "{} tests; at most {MAX_TESTS} in one file",
                parsed.test.len()
            ),
        ));
    }
    let base = file.parent().unwrap_or(Path::new(""));
    let mut tests = Vec::with_capacity(parsed.test.len());
    for (i, spanned) in parsed.test.into_iter().enumerate() {
        let start = spanned.span().start;
        let t = spanned.into_inner();
        let caller = match (t.cert, t.groups, t.caller, t.from) {
            (Some(cert), None, None, None) => TestCaller::Cert(base.join(cert)),
            (Some(_), ..) => {
                return Err(error(
                    start,
                    "a test names its caller either by `cert` or by `groups` (with `caller` and `from`), not both".into(),
                ))
            }
            (None, None, None, None) => {
                return Err(error(
                    start,
                    "a test needs a caller: `groups = [...]` (and `caller`, `from` if rules name hosts or addresses) or `cert = \"FILE\"`".into(),
                ))
            }
            (None, groups, name, from) => {
                let from = match from {
                    None => None,
                    Some(f) => Some(f.get_ref().trim().parse::<Ipv4Addr>().map_err(|_| {
                        error(
                            f.span().start,
                            format!(
                                "`from = {:?}` is not an IPv4 address; write the caller's overlay address, e.g. \"100.64.0.5\"",
                                f.get_ref()
                            ),
                        )
                    })?),
                };
                if name.as_deref() == Some("") {
                    return Err(error(start, "empty `caller`: give a certificate name or leave it out".into()));
                }
                let mut groups = groups.unwrap_or_default();
                if groups.iter().any(String::is_empty) {
                    return Err(error(start, "empty group name in `groups`".into()));
                }
                groups.sort();
                groups.dedup();
                TestCaller::Described { name, groups, from }
            }
        };
        let to = Destination::parse(t.to.get_ref()).map_err(|m| error(t.to.span().start, m))?;
        tests.push(PolicyTest {
            name: t.name.unwrap_or_else(|| format!("test {}", i + 1)),
            line: position(text, start).line,
            caller,
            to,
            to_text: t.to.into_inner(),
            expect: t.expect,
            node: t.node,
        });
    }
    Ok(tests)
}

impl Destination {
    /// `ADDRESS[/LEN][:PORTS][/PROTO]` or a name.
    pub fn parse(text: &str) -> Result<Destination, String> {
        let s = text.trim();
        let usage = "write an address or subnet with an optional port and protocol (\"198.19.0.10:5432/tcp\", \"198.19.0.0/24/icmp\"), or a service's or DNS name";
        if s.is_empty() {
            return Err(format!("empty destination; {usage}"));
        }
        let (rest, proto) = match s.rsplit_once('/') {
            Some((rest, p)) => match p.to_ascii_lowercase().as_str() {
                "tcp" => (rest, Some(Proto::Tcp)),
                "udp" => (rest, Some(Proto::Udp)),
                "icmp" => (rest, Some(Proto::Icmp)),
                "any" => (rest, Some(Proto::Any)),
                _ => (s, None),
            },
            None => (s, None),
        };
        let (addr, ports) = match rest.rsplit_once(':') {
            Some((addr, ports)) => (
                addr,
                Some(PortRange::parse(ports).map_err(|e| format!("destination {text:?}: {e}"))?),
            ),
            None => (rest, None),
        };
        let net = if let Ok(ip) = addr.parse::<Ipv4Addr>() {
            Some(Ipv4Net::from(ip))
        } else if let Ok(net) = addr.parse::<Ipv4Net>() {
            if net.trunc() != net {
                return Err(format!(
                    "destination {text:?}: {net} has host bits set; did you mean {}?",
                    net.trunc()
                ));
            }
            Some(net)
        } else {
            None
        };
        let Some(net) = net else {
            let name = addr.trim_end_matches('.').to_ascii_lowercase();
            let name_ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
                && !name.chars().all(|c| c.is_ascii_digit() || c == '.');
            if !name_ok {
                return Err(format!(
                    "destination {text:?} is neither an address nor a name; {usage}"
                ));
            }
            if ports.is_some() || proto.is_some() {
                return Err(format!(
                    "destination {text:?}: a service or DNS name takes no port or protocol (a service's port is its `listen`); write just {name:?}"
                ));
            }
            return Ok(Destination::Name(name));
        };
        let ports = ports.unwrap_or(PortRange::ANY);
        let proto = proto.unwrap_or(Proto::Any);
        if proto == Proto::Icmp && !ports.is_any() {
            return Err(format!(
                "destination {text:?}: ICMP has no ports; write \"{net}/icmp\""
            ));
        }
        Ok(Destination::Addresses { net, ports, proto })
    }
}

/// The lines the `[[firewall.inbound]]` and `[[firewall.outbound]]`
/// rules of a node config start on, in order, to name a rule by its place
/// in the file. Empty where the text does not read as TOML.
pub fn firewall_rule_lines(text: &str) -> (Vec<usize>, Vec<usize>) {
    #[derive(Deserialize, Default)]
    struct Config {
        #[serde(default)]
        firewall: Firewall,
    }
    #[derive(Deserialize, Default)]
    struct Firewall {
        #[serde(default)]
        inbound: Vec<Spanned<toml::Value>>,
        #[serde(default)]
        outbound: Vec<Spanned<toml::Value>>,
    }
    let config: Config = toml::from_str(text).unwrap_or_default();
    let lines = |rules: &[Spanned<toml::Value>]| {
        rules
            .iter()
            .map(|r| position(text, r.span().start).line)
            .collect()
    };
    (
        lines(&config.firewall.inbound),
        lines(&config.firewall.outbound),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file() -> &'static Path {
        Path::new("/etc/tern/policy.toml")
    }

    #[test]
    fn destinations_read_as_written() {
        let d = |s: &str| Destination::parse(s).unwrap();
        assert_eq!(
            d("198.19.0.10:5432/tcp"),
            Destination::Addresses {
                net: "198.19.0.10/32".parse().unwrap(),
                ports: PortRange {
                    first: 5432,
                    last: 5432
                },
                proto: Proto::Tcp
            }
        );
        assert_eq!(
            d("198.19.0.0/24/icmp"),
            Destination::Addresses {
                net: "198.19.0.0/24".parse().unwrap(),
                ports: PortRange::ANY,
                proto: Proto::Icmp
            }
        );
        assert_eq!(
            d("198.19.0.0/24:8000-8100"),
            Destination::Addresses {
                net: "198.19.0.0/24".parse().unwrap(),
                ports: PortRange {
                    first: 8000,
                    last: 8100
                },
                proto: Proto::Any
            }
        );
        assert_eq!(d("DB.internal."), Destination::Name("db.internal".into()));
        assert_eq!(d("grafana"), Destination::Name("grafana".into()));
        for bad in [
            "",
            "198.19.0.1/24",
            "198.19.0.10:99999/tcp",
            "198.19.0.10:22/icmp",
            "grafana:3000",
            "db.internal/tcp",
            "1.2.3",
            "a b",
            "198.19.0.10:/tcp",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tests_read_with_their_lines_and_callers() {
        let text = "# policy\n\n[[test]]\nname = \"ci to web\"\ngroups = [\"deploy\", \"ci\"]\nto = \"198.19.0.10:8080/tcp\"\nexpect = \"allow\"\n\n[[test]]\ncert = \"certs/dev-1.crt\"\nto = \"grafana\"\nexpect = \"deny\"\nnode = \"gw-1\"\n";
        let tests = parse(text, file()).unwrap();
        assert_eq!(tests.len(), 2);
        assert_eq!(tests[0].name, "ci to web");
        assert_eq!(tests[0].line, 3);
        assert_eq!(
            tests[0].caller,
            TestCaller::Described {
                name: None,
                groups: vec!["ci".into(), "deploy".into()],
                from: None
            }
        );
        assert_eq!(tests[1].name, "test 2");
        assert_eq!(tests[1].line, 9);
        assert_eq!(
            tests[1].caller,
            TestCaller::Cert(PathBuf::from("/etc/tern/certs/dev-1.crt"))
        );
        assert_eq!(tests[1].expect, Expect::Deny);
        assert_eq!(tests[1].node.as_deref(), Some("gw-1"));
    }

    #[test]
    fn mistakes_are_named_with_their_line() {
        let err = |text: &str| parse(text, file()).unwrap_err();
        let e = err("[[test]]\ngroups = [\"ci\"]\nto = \"198.19.0.10\"\nexpct = \"allow\"\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("unknown key `expct`"), "{e}");
        let e = err("[[test]]\ngroups = [\"ci\"]\nto = \"198.19.0.10\"\nexpect = \"maybe\"\n");
        assert_eq!(e.line, 4, "{e}");
        let e = err(
            "\n[[test]]\ngroups = [\"ci\"]\nto = \"198.19.0.10:70000/tcp\"\nexpect = \"allow\"\n",
        );
        assert_eq!(e.line, 4, "{e}");
        assert!(
            e.to_string().starts_with("/etc/tern/policy.toml:4: "),
            "{e}"
        );
        let e = err("[[test]]\ngroups = [\"ci\"\nto = \"x\"\n");
        assert_eq!(e.line, 3, "{e}");
        let e = err("[[test]]\nto = \"198.19.0.10\"\nexpect = \"allow\"\n");
        assert!(e.message.contains("needs a caller"), "{e}");
        let e = err("[[test]]\ngroups = [\"ci\"]\ncert = \"a.crt\"\nto = \"198.19.0.10\"\nexpect = \"allow\"\n");
        assert!(e.message.contains("either by `cert`"), "{e}");
        let e = err("[[test]]\ngroups = [\"ci\"]\nfrom = \"100.64.0\"\nto = \"198.19.0.10\"\nexpect = \"allow\"\n");
        assert_eq!(e.line, 3, "{e}");
        let e = err("[[test]]\ngroups = [\"ci\"]\nexpect = \"allow\"\n");
        assert!(e.message.contains("lacks `to`"), "{e}");
        assert!(err("# nothing\n").message.contains("no tests"));
    }

    #[test]
    fn rule_lines_follow_the_config() {
        let text = "[pki]\nca = \"c\"\n\n[firewall]\nlog = true\n\n[[firewall.inbound]]\nproto = \"tcp\"\n\n[[firewall.inbound]]\nproto = \"icmp\"\n[[firewall.outbound]]\nproto = \"udp\"\n";
        assert_eq!(firewall_rule_lines(text), (vec![7, 10], vec![12]));
        assert_eq!(firewall_rule_lines("not toml ["), (vec![], vec![]));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(text in "\\PC{0,300}") {
            let _ = parse(&text, file());
            let _ = Destination::parse(&text);
            let _ = firewall_rule_lines(&text);
        }

        #[test]
        fn test_shaped_garbage_never_panics(
            to in "[0-9a-z./:\\-]{0,30}",
            key in "[a-z]{1,8}",
            value in "[\\PC]{0,12}",
        ) {
            let text = format!("[[test]]\ngroups = [\"ci\"]\nto = {to:?}\nexpect = \"allow\"\n{key} = {value:?}\n");
            let _ = parse(&text, file());
        }
    }
}
