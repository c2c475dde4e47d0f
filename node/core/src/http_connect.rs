//! HTTP CONNECT proxy requests (RFC 9110 §9.3.6), sans IO.
//!
//! Drive it from the local proxy listener: feed the bytes read so far to
//! [`parse`] until it returns `Some((request, head_len))`, answer with
//! [`established`], and relay from `buf[head_len..]` on (a client may send its
//! first bytes, such as a TLS ClientHello, right behind the head). On an
//! error, answer `response(err.status())` and close.
//!
//! Supported: `CONNECT host:port HTTP/1.1` (or `HTTP/1.0`) with a host name,
//! an IPv4 literal or a bracketed IPv6 literal; lines may end in CRLF or a
//! bare LF. Headers are read past and ignored (`Proxy-Authorization`
//! included: the listener only serves local programs). Not supported: any
//! other method (no `GET http://…` forwarding proxy; clients must tunnel,
//! e.g. `curl --proxytunnel` or an `https://` URL), IPv6 zone ids, and heads
//! longer than [`MAX_HEAD`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::socks::{is_valid_hostname, Target};

/// The longest request head accepted, terminating empty line included.
pub const MAX_HEAD: usize = 8192;

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpConnectError {
    #[error("HTTP request head is longer than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("HTTP method {0:?} is not supported: this proxy only tunnels with CONNECT (use an https:// URL or curl --proxytunnel)")]
    NotConnect(String),
    #[error("bad CONNECT request: {0}")]
    BadRequest(String),
}

impl HttpConnectError {
    /// The status code and reason phrase to answer with.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HttpConnectError::TooLarge => (431, "Request Header Fields Too Large"),
            HttpConnectError::NotConnect(_) => (405, "Method Not Allowed"),
            HttpConnectError::BadRequest(_) => (400, "Bad Request"),
        }
    }
}

/// Parses a request head. `Ok(None)` means the empty line that ends the head
/// has not arrived yet; otherwise the request and the head's length in bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(ConnectRequest, usize)>, HttpConnectError> {
    let window = &buf[..buf.len().min(MAX_HEAD)];
    let Some(head_len) = head_end(window) else {
        return if buf.len() >= MAX_HEAD {
            Err(HttpConnectError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let line_end = window.iter().position(|&b| b == b'\n').unwrap_or(0);
    let line = strip_cr(&window[..line_end]);
    let line =
        std::str::from_utf8(line).map_err(|_| bad("the request line is not valid UTF-8".into()))?;
    let target = parse_request_line(line)?;
    Ok(Some((ConnectRequest { target }, head_len)))
}

/// A response head: `HTTP/1.1 {status} {reason}`, and for a status outside
/// 2xx an empty body and `Connection: close` (plus `Allow: CONNECT` for 405,
/// as RFC 9110 requires).
pub fn response(status: u16, reason: &str) -> Vec<u8> {
    // A reason phrase must not break the head apart.
    let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    if !(200..300).contains(&status) {
        if status == 405 {
            out.push_str("Allow: CONNECT\r\n");
        }
        out.push_str("Content-Length: 0\r\nConnection: close\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// An error answer whose body (plain text) says why, for a person reading
/// what curl or a proxy-aware client prints.
pub fn response_with_body(status: u16, reason: &str, body: &str) -> Vec<u8> {
    let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The answer to a successful CONNECT; the tunnel starts right after it.
pub fn established() -> Vec<u8> {
    b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec()
}

fn bad(reason: String) -> HttpConnectError {
    HttpConnectError::BadRequest(reason)
}

/// The length of the head up to and including its first empty line (CRLF or
/// bare LF), if `buf` holds one.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(offset) = buf[start..].iter().position(|&b| b == b'\n') {
        let end = start + offset;
        if strip_cr(&buf[start..end]).is_empty() {
            return Some(end + 1);
        }
        start = end + 1;
    }
    None
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn parse_request_line(line: &str) -> Result<Target, HttpConnectError> {
    let parts: Vec<&str> = line.split_ascii_whitespace().collect();
    let [method, authority, version] = parts[..] else {
        return Err(bad(format!(
            "expected `CONNECT host:port HTTP/1.1`, got {line:?}"
        )));
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(bad(format!(
            "HTTP version {version:?} is not supported; expected HTTP/1.1 or HTTP/1.0"
        )));
    }
    if method != "CONNECT" {
        return Err(HttpConnectError::NotConnect(method.to_string()));
    }
    parse_authority(authority)
}

/// `host:port`, `ipv4:port` or `[ipv6]:port`.
fn parse_authority(authority: &str) -> Result<Target, HttpConnectError> {
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err(bad(format!(
            "target {authority:?} has no port; expected host:port"
        )));
    };
    let port = parse_port(port).ok_or_else(|| {
        bad(format!(
            "port {port:?} in {authority:?} is not a number from 1 to 65535"
        ))
    })?;
    if let Some(inner) = host.strip_prefix('[') {
        let ip = inner
            .strip_suffix(']')
            .and_then(|inner| inner.parse::<Ipv6Addr>().ok())
            .ok_or_else(|| {
                bad(format!(
                    "{host:?} in {authority:?} is not a bracketed IPv6 address (zone ids are not supported)"
                ))
            })?;
        return Ok(Target::Ip(SocketAddr::new(IpAddr::V6(ip), port)));
    }
    if host.contains(':') {
        return Err(bad(format!(
            "IPv6 address in {authority:?} must be in brackets, as in [::1]:22"
        )));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Target::Ip(SocketAddr::new(IpAddr::V4(ip), port)));
    }
    if !is_valid_hostname(host.as_bytes()) {
        return Err(bad(format!(
            "host {host:?} is not a valid name: use 1 to 255 letters, digits, '-', '.' or '_'"
        )));
    }
    Ok(Target::Domain(host.to_string(), port))
}

fn parse_port(port: &str) -> Option<u16> {
    // `u16::from_str` would also take a leading '+'.
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse::<u16>().ok().filter(|&p| p != 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `curl -p -x http://127.0.0.1:8080 telnet://db.internal:5432`
    const CURL_DOMAIN: &[u8] = b"CONNECT db.internal:5432 HTTP/1.1\r\n\
        Host: db.internal:5432\r\n\
        User-Agent: curl/8.5.0\r\n\
        Proxy-Connection: Keep-Alive\r\n\r\n";

    fn target_of(head: &str) -> Result<Option<Target>, HttpConnectError> {
        parse(head.as_bytes()).map(|r| r.map(|(req, _)| req.target))
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn curl_request() {
        let (req, used) = parse(CURL_DOMAIN).unwrap().unwrap();
        assert_eq!(used, CURL_DOMAIN.len());
        assert_eq!(req.target, Target::Domain("db.internal".into(), 5432));
    }

    #[test]
    fn pipelined_bytes_are_left() {
        let mut buf = CURL_DOMAIN.to_vec();
        buf.extend_from_slice(b"\x16\x03\x01 client hello");
        let (_, used) = parse(&buf).unwrap().unwrap();
        assert_eq!(&buf[used..], b"\x16\x03\x01 client hello");
    }

    #[test]
    fn targets() {
        assert_eq!(
            target_of("CONNECT 198.19.0.10:443 HTTP/1.1\r\n\r\n").unwrap(),
            Some(Target::Ip(sa("198.19.0.10:443")))
        );
        assert_eq!(
            target_of("CONNECT [::1]:22 HTTP/1.0\r\n\r\n").unwrap(),
            Some(Target::Ip(sa("[::1]:22")))
        );
        assert_eq!(
            target_of("CONNECT kube_api.mesh:6443 HTTP/1.1\n\n").unwrap(),
            Some(Target::Domain("kube_api.mesh".into(), 6443))
        );
        assert_eq!(
            target_of("CONNECT a:65535 HTTP/1.1\r\nX: y\n\r\n").unwrap(),
            Some(Target::Domain("a".into(), 65535))
        );
    }

    #[test]
    fn strict_prefixes_are_incomplete() {
        let bare_lf = b"CONNECT [fd00::1]:443 HTTP/1.1\nHost: x\n\n";
        for msg in [CURL_DOMAIN, &bare_lf[..]] {
            for i in 0..msg.len() {
                assert_eq!(parse(&msg[..i]), Ok(None), "prefix {i}");
            }
        }
    }

    #[test]
    fn too_large() {
        let mut head = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        head.resize(MAX_HEAD - 1, b'x');
        assert_eq!(parse(&head), Ok(None));
        head.push(b'x');
        assert_eq!(parse(&head), Err(HttpConnectError::TooLarge));

        // A head ending exactly at the limit is fine.
        let mut head = b"CONNECT a:1 HTTP/1.1\r\nX: ".to_vec();
        head.resize(MAX_HEAD - 4, b'x');
        head.extend_from_slice(b"\r\n\r\n");
        assert!(parse(&head).unwrap().is_some());
    }

    #[test]
    fn not_connect() {
        let err = target_of("GET http://db.internal/ HTTP/1.1\r\nHost: db\r\n\r\n").unwrap_err();
        assert_eq!(err, HttpConnectError::NotConnect("GET".into()));
        assert_eq!(err.status(), (405, "Method Not Allowed"));
        assert_eq!(
            target_of("connect a:1 HTTP/1.1\r\n\r\n").unwrap_err(),
            HttpConnectError::NotConnect("connect".into())
        );
    }

    #[test]
    fn bad_requests() {
        for head in [
            "\r\n",
            "CONNECT a:1\r\n\r\n",
            "CONNECT a:1 HTTP/1.1 extra\r\n\r\n",
            "CONNECT a:1 HTTP/2\r\n\r\n",
            "CONNECT a HTTP/1.1\r\n\r\n",
            "CONNECT a: HTTP/1.1\r\n\r\n",
            "CONNECT a:0 HTTP/1.1\r\n\r\n",
            "CONNECT a:65536 HTTP/1.1\r\n\r\n",
            "CONNECT a:+80 HTTP/1.1\r\n\r\n",
            "CONNECT :80 HTTP/1.1\r\n\r\n",
            "CONNECT ::1:22 HTTP/1.1\r\n\r\n",
            "CONNECT [::1:22 HTTP/1.1\r\n\r\n",
            "CONNECT [fe80::1%25eth0]:22 HTTP/1.1\r\n\r\n",
            "CONNECT [db.internal]:22 HTTP/1.1\r\n\r\n",
            "CONNECT a/b:80 HTTP/1.1\r\n\r\n",
            "CONNECT user@a:80 HTTP/1.1\r\n\r\n",
        ] {
            let err = target_of(head).unwrap_err();
            assert!(
                matches!(err, HttpConnectError::BadRequest(_)),
                "{head:?} gave {err:?}"
            );
            assert_eq!(err.status(), (400, "Bad Request"));
        }
        let long_name = format!("CONNECT {}:80 HTTP/1.1\r\n\r\n", "a".repeat(256));
        assert!(matches!(
            target_of(&long_name),
            Err(HttpConnectError::BadRequest(_))
        ));
        assert!(matches!(
            parse(b"CONNECT \xff:80 HTTP/1.1\r\n\r\n"),
            Err(HttpConnectError::BadRequest(_))
        ));
        assert_eq!(HttpConnectError::TooLarge.status().0, 431);
    }

    #[test]
    fn error_messages_say_what_is_wrong() {
        let err = target_of("CONNECT db.internal HTTP/1.1\r\n\r\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad CONNECT request: target \"db.internal\" has no port; expected host:port"
        );
    }

    #[test]
    fn responses() {
        assert_eq!(
            established(),
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        );
        assert_eq!(response(200, "Connection established"), established());
        assert_eq!(
            response(502, "Bad Gateway"),
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            response(405, "Method Not Allowed"),
            b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(response(400, "Bad\r\nX: y"), response(400, "BadX: y"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&buf);
        }

        #[test]
        fn arbitrary_heads_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..10 * 1024)) {
            if let Ok(Some((_, used))) = parse(&buf) {
                prop_assert!(used <= buf.len().min(MAX_HEAD));
            }
        }

        #[test]
        fn arbitrary_request_lines_never_panic(line in "[ -~]{0,300}", crlf in any::<bool>()) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let _ = parse(format!("{line}{eol}Host: x{eol}{eol}").as_bytes());
            let _ = parse(format!("CONNECT {line} HTTP/1.1{eol}{eol}").as_bytes());
        }

        #[test]
        fn display_of_target_parses_back(addr in any::<SocketAddr>(), port in 1u16..) {
            let target = Target::Ip(SocketAddr::new(addr.ip(), port));
            let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
            prop_assert_eq!(target_of(&head).unwrap(), Some(target));
        }

        #[test]
        fn hostnames_parse_back(host in "[a-z0-9_-][a-z0-9._-]{0,60}", port in 1u16..) {
            prop_assume!(host.parse::<Ipv4Addr>().is_err());
            let target = Target::Domain(host, port);
            let head = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
            prop_assert_eq!(target_of(&head).unwrap(), Some(target));
        }
    }
}
