//! Tern over TCP, for networks that drop UDP: what the node and the
//! lighthouse agree on, without IO.
//!
//! A TCP link (wrapped in TLS, so that middleboxes that pass only TLS on
//! 443 pass it) carries the same datagrams as the UDP socket, each framed
//! by its length ([`frame_header`]). WireGuard authenticates the
//! lighthouse inside the link; TLS only disguises it.
//!
//! On the lighthouse, each TCP connection is given a [`stream_endpoint`]: an
//! address in the discard-only prefix `100::/64` (RFC 6666) that no UDP
//! datagram can come from, so the core treats the connection as one more
//! endpoint and the shell knows to send to it over TCP. Such an address is
//! never handed to other nodes as a place to punch to.
//!
//! Through an HTTP proxy the node opens the link with `CONNECT`
//! ([`connect_request`], [`parse_connect_response`]), its address and
//! credentials taken from `HTTPS_PROXY` ([`ProxyUrl`]) unless `NO_PROXY`
//! names the lighthouse ([`no_proxy_matches`]).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use base64::Engine;
use serde::Deserialize;

/// The TCP port a lighthouse listens on for links when `[listen] tcp`
/// gives none, and that proxies allow `CONNECT` to by default.
pub const DEFAULT_TCP_PORT: u16 = 443;

/// Most bytes of a proxy's answer to `CONNECT` read before giving up on it.
pub const MAX_CONNECT_RESPONSE: usize = 8 * 1024;

/// How a node reaches one lighthouse: `[[lighthouses]] transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP, and TCP (when `tcp` is set) while UDP gets no answer.
    #[default]
    Auto,
    /// UDP only.
    Udp,
    /// TCP only (`tcp` must be set).
    Tcp,
}

/// Which transport a path uses, as `tern status` and `tern ping` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathTransport {
    Udp,
    Tcp,
}

impl fmt::Display for PathTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathTransport::Udp => "udp",
            PathTransport::Tcp => "tcp",
        })
    }
}

/// `HOST:PORT` of a TCP listener: a name, an IPv4 address or a bracketed
/// IPv6 address, and a port other than 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTarget {
    /// The host as written (no brackets around an IPv6 address).
    pub host: String,
    pub port: u16,
}

/// What is wrong with a `HOST:PORT`, a proxy URL or a proxy's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error(
        "{0:?} is not HOST:PORT (e.g. \"lighthouse.example.com:443\" or \"[2001:db8::1]:443\")"
    )]
    BadTarget(String),
    #[error("proxy URL {url:?}: {why}")]
    BadProxyUrl { url: String, why: String },
    #[error("the proxy's answer to CONNECT is not HTTP: {0}")]
    BadProxyAnswer(String),
    #[error("the proxy's answer to CONNECT is longer than {MAX_CONNECT_RESPONSE} bytes")]
    ProxyAnswerTooLong,
}

impl StreamTarget {
    pub fn parse(text: &str) -> Result<Self, TransportError> {
        let bad = || TransportError::BadTarget(text.to_string());
        let (host, port) = text.trim().rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        let host = match host.strip_prefix('[') {
            Some(inner) => {
                let inner = inner.strip_suffix(']').ok_or_else(bad)?;
                inner.parse::<Ipv6Addr>().map_err(|_| bad())?;
                inner
            }
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
        if !name_ok {
            return Err(bad());
        }
        Ok(StreamTarget {
            host: host.to_string(),
            port,
        })
    }

    /// The host as an address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for StreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl<'de> Deserialize<'de> for StreamTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        StreamTarget::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The address the lighthouse gives its TCP link number `id`: in
/// `100::/64`, which no datagram comes from.
pub fn stream_endpoint(id: u64) -> SocketAddr {
    let [a, b, c, d] = [
        (id >> 48) as u16,
        (id >> 32) as u16,
        (id >> 16) as u16,
        id as u16,
    ];
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, a, b, c, d)),
        DEFAULT_TCP_PORT,
    )
}

/// Whether `addr` is a TCP link's [`stream_endpoint`] rather than a place
/// a datagram can be sent to.
pub fn is_stream_endpoint(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V6(ip) => ip.segments()[..4] == [0x100, 0, 0, 0],
        IpAddr::V4(_) => false,
    }
}

/// The two bytes in front of each datagram on a link: its length, big
/// endian. `None` for a datagram too long to frame (none that Tern sends).
pub fn frame_header(len: usize) -> Option<[u8; 2]> {
    u16::try_from(len).ok().map(u16::to_be_bytes)
}

/// An HTTP proxy from `HTTPS_PROXY`: `http://[user:password@]host[:port][/]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    /// User and password, percent-decoded.
    pub auth: Option<(String, String)>,
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        write!(f, "{self}")
    }
}

impl fmt::Display for ProxyUrl {
    /// The proxy without its password (for logs and status).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = match &self.auth {
            Some((user, _)) => format!("{user}@"),
            None => String::new(),
        };
        let target = StreamTarget {
            host: self.host.clone(),
            port: self.port,
        };
        write!(f, "http://{user}{target}")
    }
}

impl ProxyUrl {
    pub fn parse(url: &str) -> Result<Self, TransportError> {
        let bad = |why: &str| TransportError::BadProxyUrl {
            url: redact(url),
            why: why.to_string(),
        };
        let url = url.trim();
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            return Err(bad("a proxy spoken to over TLS (https://) is not supported; give it as http://HOST:PORT (the link inside is TLS already)"));
        } else if url.contains("://") {
            return Err(bad("only http:// proxies are supported"));
        } else {
            url
        };
        let authority = rest.split('/').next().unwrap_or("");
        let (auth, hostport) = match authority.rsplit_once('@') {
            Some((auth, hostport)) => {
                let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .map(|c| c.into_owned())
                        .map_err(|_| bad("the user or password is not UTF-8 once percent-decoded"))
                };
                (Some((decode(user)?, decode(password)?)), hostport)
            }
            None => (None, authority),
        };
        let has_port = hostport
            .rsplit_once(':')
            .is_some_and(|(h, p)| !p.is_empty() && (!h.contains(':') || h.ends_with(']')));
        let target = if has_port {
            StreamTarget::parse(hostport)
        } else {
            StreamTarget::parse(&format!("{hostport}:80"))
        }
        .map_err(|_| bad("expected http://[USER:PASSWORD@]HOST[:PORT]"))?;
        Ok(ProxyUrl {
            host: target.host,
            port: target.port,
            auth,
        })
    }

    /// The proxy's own address to dial.
    pub fn target(&self) -> StreamTarget {
        StreamTarget {
            host: self.host.clone(),
            port: self.port,
        }
    }
}

/// `url` with any password replaced, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let auth = &url[scheme + 3..at];
            match auth.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        (None, Some(at)) => match url[..at].split_once(':') {
            Some((user, _)) => format!("{user}:***{}", &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// Whether `NO_PROXY` (comma-separated hosts, domains, `.domain` suffixes,
/// or `*`) says `host` is reached without the proxy.
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    no_proxy
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let entry = entry.trim_start_matches("*.").trim_start_matches('.');
            // An entry may carry a port; links only go to one port anyway.
            let entry = match entry.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
                _ => entry,
            };
            host == entry || host.ends_with(&format!(".{entry}"))
        })
}

/// The request that asks `proxy` for a tunnel to `target`.
pub fn connect_request(target: &StreamTarget, proxy: &ProxyUrl) -> Vec<u8> {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, password)) = &proxy.auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str(concat!(
        "User-Agent: tern/",
        env!("CARGO_PKG_VERSION"),
        "\r\n\r\n"
    ));
    req.into_bytes()
}

/// A proxy's complete answer to `CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectAnswer {
    pub status: u16,
    pub reason: String,
    /// Bytes of `buf` the answer's head took; what follows is the tunnel's.
    pub head_len: usize,
}

impl ConnectAnswer {
    /// The tunnel is open.
    pub fn is_open(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// What a person should do about a refusal.
    pub fn refusal(&self) -> String {
        let hint = match self.status {
            // 401: what some proxies (tinyproxy) answer instead of 407.
            401 | 407 => "; the proxy wants credentials, or refused these: give them in the URL, http://USER:PASSWORD@HOST:PORT (percent-encode @ and : inside them)",
            403 => "; the proxy refuses this destination (many allow CONNECT to port 443 only)",
            _ => "",
        };
        format!(
            "the proxy refused CONNECT: {} {}{hint}",
            self.status, self.reason
        )
    }
}

/// Parses what a proxy has sent so far in answer to `CONNECT`: `Ok(None)`
/// while the head is incomplete.
pub fn parse_connect_response(buf: &[u8]) -> Result<Option<ConnectAnswer>, TransportError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => Ok(Some(ConnectAnswer {
            status: response.code.unwrap_or(0),
            reason: response.reason.unwrap_or("").chars().take(200).collect(),
            head_len,
        })),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_CONNECT_RESPONSE => {
            Err(TransportError::ProxyAnswerTooLong)
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(TransportError::BadProxyAnswer(e.to_string())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn targets_parse_names_and_addresses() {
        let t = StreamTarget::parse("lh.example.com:443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("lh.example.com", 443));
        assert_eq!(t.ip(), None);
        let t = StreamTarget::parse("[2001:db8::1]:8443").unwrap();
        assert_eq!(t.ip(), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(t.to_string(), "[2001:db8::1]:8443");
        assert_eq!(
            StreamTarget::parse("198.18.0.1:443").unwrap().to_string(),
            "198.18.0.1:443"
        );
        for bad in [
            "",
            "lh",
            "lh:",
            "lh:0",
            "lh:70000",
            ":443",
            "2001:db8::1:443",
            "[2001:db8::1:443",
            "[nothost]:443",
            "l h:443",
            "lh/x:443",
        ] {
            assert!(StreamTarget::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stream_endpoints_are_their_own_kind() {
        let a = stream_endpoint(1);
        let b = stream_endpoint(u64::MAX);
        assert_ne!(a, b);
        assert!(is_stream_endpoint(&a) && is_stream_endpoint(&b));
        for real in [
            "198.18.0.1:443",
            "[2001:db8::1]:443",
            "[::ffff:198.18.0.1]:1",
        ] {
            assert!(!is_stream_endpoint(&real.parse().unwrap()), "{real}");
        }
    }

    #[test]
    fn proxy_urls_with_and_without_credentials() {
        let p = ProxyUrl::parse("http://ci%40corp:p%3Ass@198.18.5.1:3128/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("198.18.5.1", 3128));
        assert_eq!(p.auth, Some(("ci@corp".into(), "p:ss".into())));
        assert_eq!(p.to_string(), "http://ci@corp@198.18.5.1:3128");
        assert!(!format!("{p:?}").contains("p:ss"));
        let p = ProxyUrl::parse("proxy.corp").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.auth), ("proxy.corp", 80, None));
        let p = ProxyUrl::parse("http://[2001:db8::5]").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("2001:db8::5", 80));
        let e = ProxyUrl::parse("https://u:secret@proxy:443").unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(ProxyUrl::parse("socks5://proxy:1080").is_err());
        assert!(ProxyUrl::parse("http://").is_err());
    }

    #[test]
    fn connect_carries_basic_auth() {
        let proxy = ProxyUrl::parse("http://ci:s3cret@proxy:3128").unwrap();
        let target = StreamTarget::parse("lh.example.com:443").unwrap();
        let req = String::from_utf8(connect_request(&target, &proxy)).unwrap();
        assert!(
            req.starts_with("CONNECT lh.example.com:443 HTTP/1.1\r\nHost: lh.example.com:443\r\n")
        );
        // base64("ci:s3cret")
        assert!(
            req.contains("Proxy-Authorization: Basic Y2k6czNjcmV0\r\n"),
            "{req}"
        );
        assert!(req.ends_with("\r\n\r\n"));
        let bare = ProxyUrl::parse("http://proxy:3128").unwrap();
        assert!(!String::from_utf8(connect_request(&target, &bare))
            .unwrap()
            .contains("Proxy-Authorization"));
    }

    #[test]
    fn connect_answers() {
        assert_eq!(parse_connect_response(b"HTTP/1.1 200 Conn").unwrap(), None);
        let ok = parse_connect_response(b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03")
            .unwrap()
            .unwrap();
        assert!(ok.is_open());
        assert_eq!(ok.head_len, 39);
        let denied = parse_connect_response(
            b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(!denied.is_open());
        assert!(
            denied.refusal().contains("USER:PASSWORD"),
            "{}",
            denied.refusal()
        );
        assert!(parse_connect_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        let long = vec![b'a'; MAX_CONNECT_RESPONSE];
        let mut head = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        head.extend(long);
        assert_eq!(
            parse_connect_response(&head),
            Err(TransportError::ProxyAnswerTooLong)
        );
    }

    #[test]
    fn no_proxy_lists() {
        assert!(no_proxy_matches("*", "anything"));
        assert!(no_proxy_matches(
            "localhost, .corp.example",
            "lh.corp.example"
        ));
        assert!(no_proxy_matches("corp.example", "lh.corp.example."));
        assert!(no_proxy_matches("198.18.0.1", "198.18.0.1"));
        assert!(no_proxy_matches("lh.example.com:443", "LH.example.com"));
        assert!(!no_proxy_matches("corp.example", "notcorp.example"));
        assert!(!no_proxy_matches("", "lh"));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(text in ".{0,80}", bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = StreamTarget::parse(&text);
            let _ = ProxyUrl::parse(&text);
            let _ = no_proxy_matches(&text, &text);
            let _ = redact(&text);
            let _ = parse_connect_response(&bytes);
        }

        #[test]
        fn targets_round_trip(host in "[a-z][a-z0-9.-]{0,30}", port in 1u16..) {
            let t = StreamTarget { host, port };
            prop_assert_eq!(StreamTarget::parse(&t.to_string()).unwrap(), t);
        }

        #[test]
        fn proxy_passwords_never_show(user in "[a-z]{1,8}", password in "[a-zA-Z0-9]{6,12}") {
            let url = format!("http://{user}:{password}@proxy:3128");
            let p = ProxyUrl::parse(&url).unwrap();
            prop_assert!(!p.to_string().contains(&password));
            let refused = ProxyUrl::parse(&format!("https://{user}:{password}@p:1")).unwrap_err();
            prop_assert!(!refused.to_string().contains(&password));
        }
    }
}
