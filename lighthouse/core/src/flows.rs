//! Which flow records a question asks for: `tern-lighthouse flows`'s
//! options and the admin API's `GET /api/v1/flows` query alike, read and
//! checked here, answered by the store.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Records in one answer, by default and at most.
pub const DEFAULT_FLOW_LIMIT: usize = 100;
pub const MAX_FLOW_LIMIT: usize = 1000;

/// A question about flow records. Every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowQuery {
    /// The caller's certificate name.
    pub name: Option<String>,
    /// The caller's certificate fingerprint, or its first 8 or more hex
    /// digits (lower case).
    pub fingerprint: Option<String>,
    /// An enrollment claim and its value (`repository=org/repo`): flows of
    /// certificates issued for an ID token with that claim.
    pub claim: Option<(String, String)>,
    /// The destination lies in this net (and, given, the port in the
    /// record's ports).
    pub dest: Option<(Ipv4Net, Option<u16>)>,
    /// Records that ended this recently.
    pub since: Option<std::time::Duration>,
    /// Refusals only.
    pub denied: bool,
    /// The reporting node's name.
    pub node: Option<String>,
    pub limit: usize,
}

impl FlowQuery {
    /// The query's parameters (`name`, `fingerprint`, `claim`, `dest`,
    /// `since`, `denied`, `node`, `limit`), each `None` when absent.
    #[allow(clippy::too_many_arguments)]
    pub fn from_params(
        name: Option<&str>,
        fingerprint: Option<&str>,
        claim: Option<&str>,
        dest: Option<&str>,
        since: Option<&str>,
        denied: Option<&str>,
        node: Option<&str>,
        limit: Option<&str>,
    ) -> Result<FlowQuery, String> {
        let name = match present(name) {
            Some(n) if valid_name(n) => Some(n.to_string()),
            Some(n) => {
                return Err(format!(
                    "name={n:?} is not a certificate name (letters, digits, '-', '_', '.')"
                ))
            }
            None => None,
        };
        let node = match present(node) {
            Some(n) if valid_name(n) => Some(n.to_string()),
            Some(n) => {
                return Err(format!(
                    "node={n:?} is not a certificate name (letters, digits, '-', '_', '.')"
                ))
            }
            None => None,
        };
        let fingerprint = match present(fingerprint) {
            Some(f) => Some(parse_fingerprint(f)?),
            None => None,
        };
        let claim = present(claim).map(parse_claim).transpose()?;
        let dest = present(dest).map(parse_dest).transpose()?;
        let since = match present(since) {
            Some(s) => Some(tern_shared::duration::parse_duration(s).map_err(|e| {
                format!("since={s:?}: {e}; give how far back, e.g. \"1h\" or \"7d\"")
            })?),
            None => None,
        };
        let denied = match present(denied).unwrap_or("false") {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            other => return Err(format!("denied={other:?}: give true or false")),
        };
        let limit = match present(limit) {
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=MAX_FLOW_LIMIT).contains(&n) => n,
                _ => {
                    return Err(format!(
                        "limit={l:?}: give a number from 1 to {MAX_FLOW_LIMIT}"
                    ))
                }
            },
            None => DEFAULT_FLOW_LIMIT,
        };
        Ok(FlowQuery {
            name,
            fingerprint,
            claim,
            dest,
            since,
            denied,
            node,
            limit,
        })
    }

    /// The oldest end asked for (Unix ms), `now_ms` being the wall clock.
    pub fn since_ms(&self, now_ms: u64) -> Option<u64> {
        self.since
            .map(|ago| now_ms.saturating_sub(ago.as_millis() as u64))
    }

    /// The destination as integers: the net's first and last address.
    pub fn dest_range(&self) -> Option<(u32, u32, Option<u16>)> {
        self.dest
            .map(|(net, port)| (u32::from(net.network()), u32::from(net.broadcast()), port))
    }
}

/// A parameter given and not blank, trimmed.
fn present(v: Option<&str>) -> Option<&str> {
    v.map(str::trim).filter(|v| !v.is_empty())
}

fn valid_name(n: &str) -> bool {
    n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A fingerprint or its first 8 or more hex digits, lower-cased.
fn parse_fingerprint(f: &str) -> Result<String, String> {
    let f = f.to_ascii_lowercase();
    if f.len() < 8 || f.len() > 64 || !f.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "fingerprint={f:?}: give a certificate's fingerprint (64 hex digits) or its first 8 or more"
        ));
    }
    Ok(f)
}

/// `KEY=VALUE`, the key a claim's name.
fn parse_claim(c: &str) -> Result<(String, String), String> {
    let Some((key, value)) = c.split_once('=') else {
        return Err(format!(
            "claim={c:?}: give CLAIM=VALUE, e.g. repository=org/repo"
        ));
    };
    let key = key.trim();
    if key.is_empty()
        || key.len() > 64
        || !key
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-'))
    {
        return Err(format!(
            "claim={c:?}: the claim's name may hold letters, digits, '_' and '-'"
        ));
    }
    if value.len() > 256 {
        return Err(format!(
            "claim={c:?}: the value is longer than a kept claim (256 bytes)"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// `ADDRESS`, `CIDR`, either with `:PORT`.
fn parse_dest(d: &str) -> Result<(Ipv4Net, Option<u16>), String> {
    let bad = || {
        format!("dest={d:?}: give an address or subnet, with :PORT if you like (198.19.0.10:5432, 198.19.0.0/24)")
    };
    let (addr, port) = match d.rsplit_once(':') {
        Some((a, p)) => (a, Some(p.parse::<u16>().map_err(|_| bad())?)),
        None => (d, None),
    };
    let net = if let Ok(ip) = addr.parse::<Ipv4Addr>() {
        Ipv4Net::from(ip)
    } else {
        addr.parse::<Ipv4Net>().map_err(|_| bad())?.trunc()
    };
    Ok((net, port))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(pairs: &[(&str, &str)]) -> Result<FlowQuery, String> {
        let get = |k: &str| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        FlowQuery::from_params(
            get("name"),
            get("fingerprint"),
            get("claim"),
            get("dest"),
            get("since"),
            get("denied"),
            get("node"),
            get("limit"),
        )
    }

    #[test]
    fn questions_read_as_written() {
        let all = q(&[
            ("name", "ci-42"),
            ("fingerprint", "ABCDEF0123"),
            ("claim", "repository=org/repo"),
            ("dest", "198.19.0.0/24:5432"),
            ("since", "1h"),
            ("denied", "true"),
            ("node", "gw-1"),
            ("limit", "5"),
        ])
        .unwrap();
        assert_eq!(all.name.as_deref(), Some("ci-42"));
        assert_eq!(all.fingerprint.as_deref(), Some("abcdef0123"));
        assert_eq!(all.claim, Some(("repository".into(), "org/repo".into())));
        assert_eq!(
            all.dest,
            Some(("198.19.0.0/24".parse().unwrap(), Some(5432)))
        );
        assert_eq!(all.since_ms(10_000_000), Some(10_000_000 - 3_600_000));
        assert!(all.denied);
        assert_eq!(all.limit, 5);
        assert_eq!(
            all.dest_range().unwrap().0,
            u32::from(Ipv4Addr::new(198, 19, 0, 0))
        );
        let none = q(&[]).unwrap();
        assert_eq!(none.limit, DEFAULT_FLOW_LIMIT);
        assert_eq!(
            q(&[("dest", "198.19.0.10")])
                .unwrap()
                .dest
                .unwrap()
                .0
                .prefix_len(),
            32
        );
        assert_eq!(
            q(&[("dest", "198.19.0.9/24")])
                .unwrap()
                .dest
                .unwrap()
                .0
                .to_string(),
            "198.19.0.0/24"
        );
        for bad in [
            ("name", "a b"),
            ("fingerprint", "abc"),
            ("fingerprint", "zzzzzzzzzz"),
            ("claim", "repository"),
            ("claim", "a.b=c"),
            ("dest", "198.19.0.0/24:99999"),
            ("dest", "example"),
            ("since", "yesterday"),
            ("denied", "maybe"),
            ("limit", "0"),
            ("limit", "5000"),
        ] {
            assert!(q(&[bad]).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn garbage_is_refused_or_read_never_a_panic(
            key in prop::sample::select(vec!["name", "fingerprint", "claim", "dest", "since", "denied", "node", "limit"]),
            value in "\\PC{0,80}",
        ) {
            let _ = q(&[(key, value.as_str())]);
        }
    }
}
