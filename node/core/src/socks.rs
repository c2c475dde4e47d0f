//! SOCKS5 server side (RFC 1928), sans IO.
//!
//! Drive it from the local proxy listener: feed the bytes read so far to
//! [`parse_greeting`] until it returns `Some`, answer with
//! [`greeting_reply`] (`NO_AUTH` if [`Greeting::offers_no_auth`], else
//! `NO_ACCEPTABLE` and close), drop the bytes it used, then feed
//! [`parse_request`] the same way and answer with [`reply`]. On an error,
//! answer a request with `reply(err.reply(), unspecified)` and close; a bad
//! greeting gets no answer beyond closing. For UDP ASSOCIATE, each datagram
//! from the client goes through [`parse_udp`] and each one back through
//! [`encode_udp`].
//!
//! Supported: method "no authentication" (0x00) only, CONNECT and
//! UDP ASSOCIATE, IPv4, IPv6 and domain targets. Not supported: any other
//! authentication method (no GSSAPI, no username/password of RFC 1929),
//! BIND (parsed, so that it can be refused with
//! [`Reply::CommandNotSupported`]), and UDP fragmentation (a datagram with
//! FRAG ≠ 0 is [`SocksError::Fragmented`]).
//!
//! A domain target that is an IPv4 literal ("198.19.0.10") comes out as
//! [`Target::Ip`], so callers never resolve an address. Port 0 is not
//! refused here: a UDP ASSOCIATE legitimately names 0.0.0.0:0.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Authentication method "no authentication required".
pub const NO_AUTH: u8 = 0x00;
/// Method reply meaning "none of the offered methods is acceptable".
pub const NO_ACCEPTABLE: u8 = 0xFF;

const VERSION: u8 = 0x05;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// Where the client wants to go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Ip(SocketAddr),
    /// A host name (letters, digits, '-', '.', '_'; 1..=255 bytes) and port.
    Domain(String, u16),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Ip(addr) => write!(f, "{addr}"),
            Target::Domain(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

/// The client's first message: the authentication methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub methods: Vec<u8>,
}

impl Greeting {
    /// Whether the client accepts "no authentication", the only method we
    /// speak.
    pub fn offers_no_auth(&self) -> bool {
        self.methods.contains(&NO_AUTH)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Bind,
    UdpAssociate,
}

/// The client's request, sent after the method is agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub target: Target,
}

/// Reply codes (the REP field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

/// A datagram relayed under UDP ASSOCIATE: its destination (from the client)
/// and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    pub target: Target,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocksError {
    #[error("not SOCKS5: version byte {0}; use socks5:// (or socks5h://)")]
    BadVersion(u8),
    #[error(
        "SOCKS5 greeting offers no authentication method; it must offer 0x00 (no authentication)"
    )]
    NoMethods,
    #[error(
        "SOCKS5 command {0:#04x} is not supported; only CONNECT (1) and UDP ASSOCIATE (3) are"
    )]
    BadCommand(u8),
    #[error("SOCKS5 address type {0:#04x} is unknown; expected 1 (IPv4), 3 (domain) or 4 (IPv6)")]
    BadAddressType(u8),
    #[error("SOCKS5 domain name is empty or has characters other than letters, digits, '-', '.' and '_'")]
    BadDomain,
    #[error("SOCKS5 reserved byte is {0:#04x}; it must be 0")]
    BadReserved(u8),
    #[error(
        "SOCKS5 UDP datagram is fragment {0}; fragmentation is not supported (FRAG must be 0)"
    )]
    Fragmented(u8),
    #[error("SOCKS5 UDP datagram of {0} bytes ends inside its header")]
    Truncated(usize),
}

impl SocksError {
    /// The reply code to answer a failed request with.
    pub fn reply(&self) -> Reply {
        match self {
            SocksError::BadCommand(_) => Reply::CommandNotSupported,
            SocksError::BadAddressType(_) => Reply::AddressTypeNotSupported,
            _ => Reply::GeneralFailure,
        }
    }
}

/// Parses `VER NMETHODS METHODS…`. `Ok(None)` means more bytes are needed;
/// otherwise the greeting and how many bytes of `buf` it used.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<(Greeting, usize)>, SocksError> {
    let Some(&version) = buf.first() else {
        return Ok(None);
    };
    check_version(version)?;
    let Some(&count) = buf.get(1) else {
        return Ok(None);
    };
    if count == 0 {
        return Err(SocksError::NoMethods);
    }
    let end = 2 + usize::from(count);
    let Some(methods) = buf.get(2..end) else {
        return Ok(None);
    };
    Ok(Some((
        Greeting {
            methods: methods.to_vec(),
        },
        end,
    )))
}

/// The answer to a greeting: the chosen method, or [`NO_ACCEPTABLE`].
pub fn greeting_reply(method: u8) -> [u8; 2] {
    [VERSION, method]
}

/// Parses `VER CMD RSV ATYP DST.ADDR DST.PORT`. `Ok(None)` means more bytes
/// are needed; otherwise the request and how many bytes of `buf` it used.
/// Each field is checked as soon as it has arrived.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, SocksError> {
    let Some(&version) = buf.first() else {
        return Ok(None);
    };
    check_version(version)?;
    let Some(&cmd) = buf.get(1) else {
        return Ok(None);
    };
    let command = match cmd {
        0x01 => Command::Connect,
        0x02 => Command::Bind,
        0x03 => Command::UdpAssociate,
        other => return Err(SocksError::BadCommand(other)),
    };
    let Some(&reserved) = buf.get(2) else {
        return Ok(None);
    };
    if reserved != 0 {
        return Err(SocksError::BadReserved(reserved));
    }
    Ok(parse_address(&buf[3..])?.map(|(target, used)| (Request { command, target }, 3 + used)))
}

/// `VER REP RSV ATYP BND.ADDR BND.PORT`: the answer to a request. `bound` is
/// the address the server uses toward the target (for CONNECT) or where the
/// client must send its datagrams (for UDP ASSOCIATE); on failure send an
/// unspecified address such as `0.0.0.0:0`.
pub fn reply(code: Reply, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![VERSION, code as u8, 0];
    encode_address(&mut out, bound);
    out
}

/// Parses a UDP ASSOCIATE datagram from the client:
/// `RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA`.
pub fn parse_udp(buf: &[u8]) -> Result<UdpDatagram<'_>, SocksError> {
    let truncated = SocksError::Truncated(buf.len());
    let [r0, r1, frag, rest @ ..] = buf else {
        return Err(truncated);
    };
    if let Some(&nonzero) = [r0, r1].into_iter().find(|&&b| b != 0) {
        return Err(SocksError::BadReserved(nonzero));
    }
    if *frag != 0 {
        return Err(SocksError::Fragmented(*frag));
    }
    let (target, used) = parse_address(rest)?.ok_or(truncated)?;
    Ok(UdpDatagram {
        target,
        payload: &rest[used..],
    })
}

/// Frames a datagram for the client: `source` is where it came from.
pub fn encode_udp(source: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(22 + payload.len());
    out.extend_from_slice(&[0, 0, 0]);
    encode_address(&mut out, source);
    out.extend_from_slice(payload);
    out
}

/// Whether `host` is a name we accept: 1..=255 bytes of ASCII letters,
/// digits, '-', '.' and '_'. Shared with the HTTP CONNECT parser.
pub(crate) fn is_valid_hostname(host: &[u8]) -> bool {
    (1..=255).contains(&host.len())
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn check_version(version: u8) -> Result<(), SocksError> {
    if version == VERSION {
        Ok(())
    } else {
        Err(SocksError::BadVersion(version))
    }
}

/// Parses `ATYP ADDR PORT` at the start of `buf`; `Ok(None)` if incomplete.
fn parse_address(buf: &[u8]) -> Result<Option<(Target, usize)>, SocksError> {
    let Some(&atyp) = buf.first() else {
        return Ok(None);
    };
    let (addr_len, addr_start) = match atyp {
        ATYP_IPV4 => (4, 1),
        ATYP_IPV6 => (16, 1),
        ATYP_DOMAIN => match buf.get(1) {
            None => return Ok(None),
            Some(0) => return Err(SocksError::BadDomain),
            Some(&len) => (usize::from(len), 2),
        },
        other => return Err(SocksError::BadAddressType(other)),
    };
    let port_at = addr_start + addr_len;
    let addr = &buf[addr_start..port_at.min(buf.len())];
    // Reject a bad name before the rest of it arrives.
    if atyp == ATYP_DOMAIN && !is_valid_hostname_prefix(addr) {
        return Err(SocksError::BadDomain);
    }
    let Some(&[hi, lo]) = buf.get(port_at..port_at + 2) else {
        return Ok(None);
    };
    let port = u16::from_be_bytes([hi, lo]);
    let target = if atyp == ATYP_DOMAIN {
        // Only hostname characters (checked above), so this is ASCII.
        let host = String::from_utf8_lossy(addr).into_owned();
        match host.parse::<Ipv4Addr>() {
            Ok(ip) => Target::Ip(SocketAddr::new(ip.into(), port)),
            Err(_) => Target::Domain(host, port),
        }
    } else {
        // `addr` is exactly 4 or 16 bytes here, by `addr_len`.
        let ip = <[u8; 4]>::try_from(addr)
            .map(IpAddr::from)
            .or_else(|_| <[u8; 16]>::try_from(addr).map(IpAddr::from))
            .map_err(|_| SocksError::BadAddressType(atyp))?;
        Target::Ip(SocketAddr::new(ip, port))
    };
    Ok(Some((target, port_at + 2)))
}

fn is_valid_hostname_prefix(prefix: &[u8]) -> bool {
    prefix.is_empty() || is_valid_hostname(prefix)
}

fn encode_address(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    /// `curl --socks5 127.0.0.1:1080 http://198.19.0.10/`
    const CURL_GREETING: [u8; 3] = [0x05, 0x01, 0x00];
    /// The same from a curl built with GSSAPI.
    const CURL_GREETING_GSSAPI: [u8; 4] = [0x05, 0x02, 0x00, 0x01];
    const CURL_REQUEST_IPV4: [u8; 10] =
        [0x05, 0x01, 0x00, 0x01, 0xc6, 0x13, 0x00, 0x0a, 0x00, 0x50];

    /// `curl --socks5-hostname 127.0.0.1:1080 http://db.internal:5432/`
    fn curl_request_domain() -> Vec<u8> {
        let mut req = vec![0x05, 0x01, 0x00, 0x03, 11];
        req.extend_from_slice(b"db.internal");
        req.extend_from_slice(&[0x15, 0x38]);
        req
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn target_display() {
        assert_eq!(
            Target::Ip(sa("198.19.0.10:80")).to_string(),
            "198.19.0.10:80"
        );
        assert_eq!(
            Target::Domain("db.internal".into(), 5432).to_string(),
            "db.internal:5432"
        );
        assert_eq!(Target::Ip(sa("[::1]:22")).to_string(), "[::1]:22");
    }

    #[test]
    fn curl_greetings() {
        let (greeting, used) = parse_greeting(&CURL_GREETING).unwrap().unwrap();
        assert_eq!(used, 3);
        assert_eq!(greeting.methods, vec![NO_AUTH]);
        assert!(greeting.offers_no_auth());

        let (greeting, used) = parse_greeting(&CURL_GREETING_GSSAPI).unwrap().unwrap();
        assert_eq!(used, 4);
        assert_eq!(greeting.methods, vec![NO_AUTH, 0x01]);
        assert!(greeting.offers_no_auth());

        assert_eq!(greeting_reply(NO_AUTH), [0x05, 0x00]);
        assert_eq!(greeting_reply(NO_ACCEPTABLE), [0x05, 0xff]);
    }

    #[test]
    fn greeting_without_no_auth() {
        // Username/password only (RFC 1929), which we do not speak.
        let (greeting, _) = parse_greeting(&[0x05, 0x01, 0x02]).unwrap().unwrap();
        assert!(!greeting.offers_no_auth());
    }

    #[test]
    fn greeting_leaves_pipelined_bytes() {
        let mut buf = CURL_GREETING.to_vec();
        buf.extend_from_slice(&CURL_REQUEST_IPV4);
        let (_, used) = parse_greeting(&buf).unwrap().unwrap();
        let (req, used2) = parse_request(&buf[used..]).unwrap().unwrap();
        assert_eq!(used + used2, buf.len());
        assert_eq!(req.target, Target::Ip(sa("198.19.0.10:80")));
    }

    #[test]
    fn curl_request_ipv4() {
        let (req, used) = parse_request(&CURL_REQUEST_IPV4).unwrap().unwrap();
        assert_eq!(used, CURL_REQUEST_IPV4.len());
        assert_eq!(
            req,
            Request {
                command: Command::Connect,
                target: Target::Ip(sa("198.19.0.10:80")),
            }
        );
    }

    #[test]
    fn curl_request_domain_socks5h() {
        let buf = curl_request_domain();
        let (req, used) = parse_request(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(req.command, Command::Connect);
        assert_eq!(req.target, Target::Domain("db.internal".into(), 5432));
    }

    #[test]
    fn request_ipv6_and_other_commands() {
        let mut buf = vec![0x05, 0x03, 0x00, 0x04];
        buf.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        buf.extend_from_slice(&22u16.to_be_bytes());
        let (req, used) = parse_request(&buf).unwrap().unwrap();
        assert_eq!(used, 22);
        assert_eq!(req.command, Command::UdpAssociate);
        assert_eq!(req.target, Target::Ip(sa("[::1]:22")));

        buf[1] = 0x02;
        let (req, _) = parse_request(&buf).unwrap().unwrap();
        assert_eq!(req.command, Command::Bind);
    }

    #[test]
    fn domain_ipv4_literal_becomes_ip() {
        let mut buf = vec![0x05, 0x01, 0x00, 0x03, 11];
        buf.extend_from_slice(b"198.19.0.10");
        buf.extend_from_slice(&[0x00, 0x50]);
        let (req, _) = parse_request(&buf).unwrap().unwrap();
        assert_eq!(req.target, Target::Ip(sa("198.19.0.10:80")));
    }

    #[test]
    fn domain_of_255_bytes() {
        let name = "a".repeat(255);
        let mut buf = vec![0x05, 0x01, 0x00, 0x03, 255];
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&[0x01, 0xbb]);
        let (req, used) = parse_request(&buf).unwrap().unwrap();
        assert_eq!(used, 4 + 1 + 255 + 2);
        assert_eq!(req.target, Target::Domain(name, 443));
    }

    #[test]
    fn strict_prefixes_are_incomplete() {
        let messages: [&[u8]; 2] = [&CURL_GREETING, &CURL_GREETING_GSSAPI];
        for msg in messages {
            for i in 0..msg.len() {
                assert_eq!(parse_greeting(&msg[..i]), Ok(None), "greeting prefix {i}");
            }
        }
        let mut v6 = vec![0x05, 0x01, 0x00, 0x04];
        v6.extend_from_slice(&[0xfd; 16]);
        v6.extend_from_slice(&[0x00, 0x16]);
        let requests = [CURL_REQUEST_IPV4.to_vec(), curl_request_domain(), v6];
        for msg in &requests {
            for i in 0..msg.len() {
                assert_eq!(parse_request(&msg[..i]), Ok(None), "request prefix {i}");
            }
            assert!(parse_request(msg).unwrap().is_some());
        }
    }

    #[test]
    fn errors() {
        // An HTTP client pointed at the SOCKS port, and a SOCKS4 client.
        assert_eq!(
            parse_greeting(b"CONNECT"),
            Err(SocksError::BadVersion(b'C'))
        );
        assert_eq!(
            parse_greeting(&[0x04, 0x01]),
            Err(SocksError::BadVersion(4))
        );
        assert_eq!(parse_greeting(&[0x05, 0x00]), Err(SocksError::NoMethods));
        assert_eq!(parse_request(&[0x04]), Err(SocksError::BadVersion(4)));
        assert_eq!(parse_request(&[0x05, 0x09]), Err(SocksError::BadCommand(9)));
        assert_eq!(
            parse_request(&[0x05, 0x01, 0x01]),
            Err(SocksError::BadReserved(1))
        );
        assert_eq!(
            parse_request(&[0x05, 0x01, 0x00, 0x02]),
            Err(SocksError::BadAddressType(2))
        );
        assert_eq!(
            parse_request(&[0x05, 0x01, 0x00, 0x03, 0x00]),
            Err(SocksError::BadDomain)
        );
        // A bad character is refused before the rest of the name arrives.
        assert_eq!(
            parse_request(&[0x05, 0x01, 0x00, 0x03, 0x05, b'a', b'/']),
            Err(SocksError::BadDomain)
        );
        let mut non_utf8 = vec![0x05, 0x01, 0x00, 0x03, 0x02, 0xc3, 0xa9, 0x00, 0x50];
        assert_eq!(parse_request(&non_utf8), Err(SocksError::BadDomain));
        non_utf8[5..7].copy_from_slice(b"a ");
        assert_eq!(parse_request(&non_utf8), Err(SocksError::BadDomain));

        assert_eq!(parse_udp(&[0, 0]), Err(SocksError::Truncated(2)));
        assert_eq!(
            parse_udp(&[0, 0, 0, 1, 1, 2]),
            Err(SocksError::Truncated(6))
        );
        assert_eq!(parse_udp(&[0, 7, 0, 1]), Err(SocksError::BadReserved(7)));
        assert_eq!(parse_udp(&[0, 0, 1, 1]), Err(SocksError::Fragmented(1)));
        assert_eq!(parse_udp(&[0, 0, 0, 9]), Err(SocksError::BadAddressType(9)));
    }

    #[test]
    fn error_reply_codes_and_messages() {
        assert_eq!(
            SocksError::BadCommand(2).reply(),
            Reply::CommandNotSupported
        );
        assert_eq!(
            SocksError::BadAddressType(2).reply(),
            Reply::AddressTypeNotSupported
        );
        assert_eq!(SocksError::BadDomain.reply(), Reply::GeneralFailure);
        assert_eq!(SocksError::BadReserved(1).reply(), Reply::GeneralFailure);
        assert_eq!(
            SocksError::BadVersion(4).to_string(),
            "not SOCKS5: version byte 4; use socks5:// (or socks5h://)"
        );
    }

    #[test]
    fn reply_bytes() {
        assert_eq!(
            reply(Reply::Succeeded, sa("198.19.0.1:40000")),
            [0x05, 0x00, 0x00, 0x01, 198, 19, 0, 1, 0x9c, 0x40]
        );
        assert_eq!(
            reply(Reply::HostUnreachable, sa("0.0.0.0:0")),
            [0x05, 0x04, 0x00, 0x01, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(reply(Reply::Succeeded, sa("[::1]:22")).len(), 22);
    }

    #[test]
    fn udp_datagram() {
        let mut buf = vec![0, 0, 0, 0x03, 11];
        buf.extend_from_slice(b"dns.example");
        buf.extend_from_slice(&53u16.to_be_bytes());
        buf.extend_from_slice(b"query");
        let dgram = parse_udp(&buf).unwrap();
        assert_eq!(dgram.target, Target::Domain("dns.example".into(), 53));
        assert_eq!(dgram.payload, b"query");

        let empty = encode_udp(sa("198.19.0.10:53"), b"");
        assert_eq!(empty, [0, 0, 0, 1, 198, 19, 0, 10, 0, 53]);
        assert_eq!(parse_udp(&empty).unwrap().payload, b"");
    }

    /// `SocketAddr` as it survives the wire (no flow info or scope id).
    fn wire(addr: SocketAddr) -> SocketAddr {
        SocketAddr::new(addr.ip(), addr.port())
    }

    proptest! {
        #[test]
        fn parsers_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_greeting(&buf);
            let _ = parse_request(&buf);
            let _ = parse_udp(&buf);
        }

        #[test]
        fn parsed_lengths_are_in_bounds(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Some((_, used))) = parse_greeting(&buf) {
                prop_assert!(used <= buf.len());
            }
            if let Ok(Some((_, used))) = parse_request(&buf) {
                prop_assert!(used <= buf.len());
            }
        }

        #[test]
        fn encode_udp_round_trips(
            source in any::<SocketAddr>(),
            payload in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let buf = encode_udp(source, &payload);
            let dgram = parse_udp(&buf).unwrap();
            prop_assert_eq!(dgram.target, Target::Ip(wire(source)));
            prop_assert_eq!(dgram.payload, &payload[..]);
        }

        #[test]
        fn reply_round_trips(bound in any::<SocketAddr>(), code in 0u8..=8) {
            let codes = [
                Reply::Succeeded, Reply::GeneralFailure, Reply::NotAllowed,
                Reply::NetworkUnreachable, Reply::HostUnreachable,
                Reply::ConnectionRefused, Reply::TtlExpired,
                Reply::CommandNotSupported, Reply::AddressTypeNotSupported,
            ];
            let code = codes[usize::from(code)];
            let mut buf = reply(code, bound);
            prop_assert_eq!(buf[1], code as u8);
            // A reply has a request's layout with REP in place of CMD.
            buf[1] = 0x01;
            let (req, used) = parse_request(&buf).unwrap().unwrap();
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(req.target, Target::Ip(wire(bound)));
        }
    }
}
