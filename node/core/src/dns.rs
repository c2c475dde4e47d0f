//! DNS messages for mesh names and split DNS: what a query asks, and the
//! answers a node makes itself (its mesh names, refusals, truncation for
//! UDP). The wire format is hickory-proto's; nothing here is a hand-written
//! codec, and nothing here does IO.
//!
//! Every function takes bytes from anywhere (a local program, a peer, a
//! resolver) and never panics on them: what does not parse is answered
//! FORMERR when it carries an ID to answer, and dropped otherwise.

use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record};
use serde::{Deserialize, Serialize};

pub use hickory_proto::rr::RecordType;

/// The largest UDP answer to a client that gave no EDNS size (RFC 1035).
pub const PLAIN_UDP_LIMIT: usize = 512;
/// The largest UDP answer any client gets: the EDNS size the DNS flag day
/// settled on, which fits every path's MTU.
pub const EDNS_UDP_LIMIT: usize = 1232;
/// The largest DNS message (what a TCP length prefix can say).
pub const MAX_MESSAGE_LEN: usize = 65535;
/// The largest query a node forwards (a name is at most 255 bytes; the rest
/// is header, question and EDNS options).
pub const MAX_QUERY_LEN: usize = 1024;

/// One question from a query, in the form the node decides on.
#[derive(Debug, Clone)]
pub struct Question {
    /// The query's ID, echoed in every answer.
    pub id: u16,
    /// The name asked for: lower case, without the trailing dot ("" for
    /// the root).
    pub name: String,
    pub qtype: RecordType,
    /// How large a UDP answer to this asker may be: 512 bytes, or the EDNS
    /// size it offered (capped at [`EDNS_UDP_LIMIT`]).
    pub udp_limit: usize,
    query: Query,
    recursion_desired: bool,
    edns: bool,
}

/// What a datagram or TCP message asked.
#[derive(Debug)]
pub enum Parsed {
    /// A standard query with one question of class IN.
    Query(Question),
    /// Not one the node answers: send this back (FORMERR, NOTIMP, REFUSED).
    Reply(Vec<u8>),
    /// Nothing to answer: shorter than a header, or not a query at all
    /// (answering a response could start a loop).
    Drop,
}

/// Reads a query. A message that fails to parse but carries an ID gets
/// FORMERR back; a second question or another class is refused.
pub fn parse_query(bytes: &[u8]) -> Parsed {
    if bytes.len() < 12 || bytes.len() > MAX_MESSAGE_LEN {
        return Parsed::Drop;
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    // The QR bit: a response is never answered, parsed or not.
    if bytes[2] & 0x80 != 0 {
        return Parsed::Drop;
    }
    let message = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => return Parsed::Reply(header_only(id, ResponseCode::FormErr)),
    };
    if message.metadata.message_type != MessageType::Query {
        return Parsed::Drop;
    }
    if message.metadata.op_code != OpCode::Query {
        return Parsed::Reply(error_reply(&message, ResponseCode::NotImp));
    }
    let [query] = message.queries.as_slice() else {
        return Parsed::Reply(error_reply(&message, ResponseCode::FormErr));
    };
    if query.query_class() != DNSClass::IN {
        return Parsed::Reply(error_reply(&message, ResponseCode::NotImp));
    }
    let udp_limit = match &message.edns {
        Some(edns) => usize::from(edns.max_payload()).clamp(PLAIN_UDP_LIMIT, EDNS_UDP_LIMIT),
        None => PLAIN_UDP_LIMIT,
    };
    Parsed::Query(Question {
        id,
        name: canonical_name(query.name()),
        qtype: query.query_type(),
        udp_limit,
        query: query.clone(),
        recursion_desired: message.metadata.recursion_desired,
        edns: message.edns.is_some(),
    })
}

/// A name as zones and certificates compare it: lower case, no trailing dot.
pub fn canonical_name(name: &Name) -> String {
    let text = name.to_lowercase().to_ascii();
    text.strip_suffix('.').unwrap_or(&text).to_string()
}

/// The answer for a mesh name: A records for `ips` when the question asks
/// for A (or ANY), an empty answer (NODATA) for any other type of a name
/// that exists.
pub fn address_answer(q: &Question, ips: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
    let records = if matches!(q.qtype, RecordType::A | RecordType::ANY) {
        ips.iter()
            .map(|ip| Record::from_rdata(q.query.name().clone(), ttl, RData::A(A(*ip))))
            .collect()
    } else {
        Vec::new()
    };
    reply(q, ResponseCode::NoError, records, true)
}

/// A PTR answer: the address asked about is `target`'s (a mesh name).
pub fn ptr_answer(q: &Question, target: &str, ttl: u32) -> Vec<u8> {
    let records = match (q.qtype, Name::from_ascii(format!("{target}."))) {
        (RecordType::PTR | RecordType::ANY, Ok(name)) => vec![Record::from_rdata(
            q.query.name().clone(),
            ttl,
            RData::PTR(hickory_proto::rr::rdata::PTR(name)),
        )],
        _ => Vec::new(),
    };
    reply(q, ResponseCode::NoError, records, true)
}

/// The IPv4 address a reverse name (`d.c.b.a.in-addr.arpa`) stands for.
pub fn reverse_v4(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut parts = rest.split('.');
    for i in (0..4).rev() {
        octets[i] = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// No such name (under a domain the node answers for).
pub fn nxdomain(q: &Question) -> Vec<u8> {
    reply(q, ResponseCode::NXDomain, Vec::new(), true)
}

/// The name exists but has no record of the type asked.
pub fn nodata(q: &Question) -> Vec<u8> {
    reply(q, ResponseCode::NoError, Vec::new(), true)
}

/// Not answered for this asker (no group allows it, outside the zones, too
/// many queries).
pub fn refused(q: &Question) -> Vec<u8> {
    reply(q, ResponseCode::Refused, Vec::new(), false)
}

/// No answer could be had (no gateway answered, the resolver failed).
pub fn servfail(q: &Question) -> Vec<u8> {
    reply(q, ResponseCode::ServFail, Vec::new(), false)
}

fn reply(q: &Question, code: ResponseCode, answers: Vec<Record>, authoritative: bool) -> Vec<u8> {
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.response_code = code;
    m.metadata.authoritative = authoritative;
    m.metadata.recursion_desired = q.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(q.query.clone());
    m.add_answers(answers);
    if q.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_UDP_LIMIT as u16);
        m.set_edns(edns);
    }
    m.to_vec()
        .unwrap_or_else(|_| header_only(q.id, ResponseCode::ServFail))
}

fn error_reply(query: &Message, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::response(query.metadata.id, query.metadata.op_code);
    m.metadata.response_code = code;
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.add_queries(query.queries.iter().take(1).cloned());
    m.to_vec()
        .unwrap_or_else(|_| header_only(query.metadata.id, code))
}

/// A response header with no sections: for a query that did not parse.
fn header_only(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[..2].copy_from_slice(&id.to_be_bytes());
    // QR = 1, opcode 0; RA = 1; the code's low four bits.
    out[2] = 0x80;
    out[3] = 0x80 | (u16::from(code) & 0x0f) as u8;
    out
}

/// `answer` cut to fit a UDP reply of `limit` bytes: as it is when it fits,
/// else its header and question with the TC bit set, so the asker retries
/// over TCP (where the whole answer goes).
pub fn fit_udp(answer: &[u8], limit: usize) -> Vec<u8> {
    if answer.len() <= limit {
        return answer.to_vec();
    }
    match Message::from_vec(answer) {
        Ok(m) => m
            .truncate()
            .to_vec()
            .unwrap_or_else(|_| truncated_header(answer)),
        Err(_) => truncated_header(answer),
    }
}

fn truncated_header(answer: &[u8]) -> Vec<u8> {
    let mut out = answer[..answer.len().min(12)].to_vec();
    out.resize(12, 0);
    out[2] |= 0x82; // QR and TC
    out[4..].fill(0); // no sections
    out
}

/// Whether `answer` is a response to `q`: the same ID and question.
pub fn answers(answer: &[u8], q: &Question) -> bool {
    match Message::from_vec(answer) {
        Ok(m) => {
            m.metadata.message_type == MessageType::Response
                && m.metadata.id == q.id
                && m.queries.len() == 1
                && canonical_name(m.queries[0].name()) == q.name
                && m.queries[0].query_type() == q.qtype
        }
        Err(_) => false,
    }
}

/// The query a node makes itself (`tern resolve`, the proxies, `tern
/// forward NAME:PORT`), with recursion desired and an EDNS size.
pub fn build_query(name: &str, qtype: RecordType, id: u16) -> Result<Vec<u8>, String> {
    let name = Name::from_utf8(name)
        .map_err(|e| format!("{name:?} is not a DNS name: {e}"))?
        .to_lowercase();
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let mut fqdn = name;
    fqdn.set_fqdn(true);
    m.add_query(Query::query(fqdn, qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_UDP_LIMIT as u16);
    m.set_edns(edns);
    m.to_vec()
        .map_err(|e| format!("the query did not encode: {e}"))
}

/// What an answer says, for a person or a script (`tern resolve`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerSummary {
    /// "NOERROR", "NXDOMAIN", "REFUSED", ...
    pub rcode: String,
    /// Each record of the answer section: type, TTL, data, e.g.
    /// `{"type": "A", "ttl": 60, "data": "198.19.0.10"}`.
    pub records: Vec<RecordSummary>,
    /// The answer said it was truncated.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSummary {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    pub ttl: u32,
    pub data: String,
}

/// Reads an answer; `None` when it is not a DNS response.
pub fn summarize(answer: &[u8]) -> Option<AnswerSummary> {
    let m = Message::from_vec(answer).ok()?;
    if m.metadata.message_type != MessageType::Response {
        return None;
    }
    Some(AnswerSummary {
        rcode: rcode_name(m.metadata.response_code),
        truncated: m.metadata.truncation,
        records: m
            .answers
            .iter()
            .map(|r| RecordSummary {
                name: canonical_name(&r.name),
                rtype: r.record_type().to_string(),
                ttl: r.ttl,
                data: r.data.to_string(),
            })
            .collect(),
    })
}

/// The IPv4 addresses an answer gives (its A records, whatever CNAMEs led
/// there); `Err` with the response code when it gives none.
pub fn addresses(answer: &[u8]) -> Result<Vec<Ipv4Addr>, String> {
    let m = Message::from_vec(answer).map_err(|_| "an answer that does not parse".to_string())?;
    let ips: Vec<Ipv4Addr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    if ips.is_empty() {
        let code = m.metadata.response_code;
        return Err(if code == ResponseCode::NoError {
            "no IPv4 address (the name has no A record)".to_string()
        } else {
            rcode_name(code)
        });
    }
    Ok(ips)
}

/// The mnemonic `dig` shows for a response code.
pub fn rcode_name(code: ResponseCode) -> String {
    match u16::from(code) {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        other => format!("RCODE{other}"),
    }
}

/// A record type by name ("A", "aaaa", "SRV", ...).
pub fn record_type(text: &str) -> Result<RecordType, String> {
    text.to_ascii_uppercase()
        .parse::<RecordType>()
        .map_err(|_| format!("unknown record type {text:?}; use A, AAAA, SRV, TXT, CNAME, MX, ..."))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn question(name: &str, qtype: RecordType) -> Question {
        match parse_query(&build_query(name, qtype, 77).unwrap()) {
            Parsed::Query(q) => q,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_query_is_read_in_canonical_form() {
        let q = question("Db.Internal.", RecordType::A);
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype),
            (77, "db.internal", RecordType::A)
        );
        assert_eq!(q.udp_limit, EDNS_UDP_LIMIT);
    }

    #[test]
    fn mesh_answers_carry_addresses_for_a_and_nothing_for_other_types() {
        let q = question("gw-1.tern", RecordType::A);
        let answer = address_answer(&q, &["100.64.0.10".parse().unwrap()], 60);
        assert!(answers(&answer, &q));
        assert_eq!(addresses(&answer), Ok(vec!["100.64.0.10".parse().unwrap()]));
        let s = summarize(&answer).unwrap();
        assert_eq!(s.rcode, "NOERROR");
        assert_eq!(s.records[0].data, "100.64.0.10");
        let q6 = question("gw-1.tern", RecordType::AAAA);
        let empty = address_answer(&q6, &["100.64.0.10".parse().unwrap()], 60);
        assert_eq!(summarize(&empty).unwrap().records, vec![]);
        assert!(addresses(&empty).is_err());
        assert_eq!(summarize(&nxdomain(&q)).unwrap().rcode, "NXDOMAIN");
        assert_eq!(summarize(&refused(&q)).unwrap().rcode, "REFUSED");
    }

    #[test]
    fn a_large_answer_is_truncated_for_udp_and_whole_otherwise() {
        let q = question("many.internal", RecordType::A);
        let ips: Vec<Ipv4Addr> = (0..100u8).map(|i| Ipv4Addr::new(198, 19, 1, i)).collect();
        let big = address_answer(&q, &ips, 60);
        assert!(big.len() > EDNS_UDP_LIMIT);
        let cut = fit_udp(&big, PLAIN_UDP_LIMIT);
        assert!(cut.len() <= PLAIN_UDP_LIMIT);
        let s = summarize(&cut).unwrap();
        assert!(s.truncated && s.records.is_empty());
        assert!(
            answers(&cut, &q),
            "the truncated answer still answers the question"
        );
        assert_eq!(fit_udp(&big, MAX_MESSAGE_LEN), big);
    }

    #[test]
    fn what_is_not_a_query_is_refused_or_dropped() {
        assert!(matches!(parse_query(&[1, 2, 3]), Parsed::Drop));
        // A response is never answered.
        let q = question("x.internal", RecordType::A);
        assert!(matches!(parse_query(&nxdomain(&q)), Parsed::Drop));
        // Garbage after a header with an ID: FORMERR with that ID.
        let mut junk = vec![0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        junk.extend_from_slice(&[0xff; 9]);
        let Parsed::Reply(reply) = parse_query(&junk) else {
            panic!("expected FORMERR");
        };
        assert_eq!(&reply[..2], &[0xAB, 0xCD]);
        assert_eq!(reply[3] & 0x0f, 1, "FORMERR");
    }

    #[test]
    fn reverse_names_of_overlay_addresses() {
        assert_eq!(
            reverse_v4("6.0.64.100.in-addr.arpa"),
            Some(Ipv4Addr::new(100, 64, 0, 6))
        );
        for bad in [
            "0.64.100.in-addr.arpa",
            "1.6.0.64.100.in-addr.arpa",
            "x.0.64.100.in-addr.arpa",
            "6.0.64.100",
        ] {
            assert_eq!(reverse_v4(bad), None, "{bad}");
        }
        let q = question("6.0.64.100.in-addr.arpa", RecordType::PTR);
        let s = summarize(&ptr_answer(&q, "b.tern", 60)).unwrap();
        assert_eq!(s.records[0].data, "b.tern.");
    }

    #[test]
    fn record_types_by_name() {
        assert_eq!(record_type("aaaa"), Ok(RecordType::AAAA));
        assert_eq!(record_type("SRV"), Ok(RecordType::SRV));
        assert!(record_type("NOPE")
            .unwrap_err()
            .contains("unknown record type"));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            match parse_query(&bytes) {
                Parsed::Query(q) => {
                    let _ = address_answer(&q, &[Ipv4Addr::LOCALHOST], 1);
                    let _ = servfail(&q);
                }
                Parsed::Reply(r) => prop_assert!(r.len() >= 12),
                Parsed::Drop => {}
            }
            let _ = fit_udp(&bytes, PLAIN_UDP_LIMIT);
            let _ = summarize(&bytes);
            let _ = addresses(&bytes);
        }

        #[test]
        fn mutated_queries_never_panic(
            flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..6),
        ) {
            let mut bytes = build_query("api.prod.internal", RecordType::A, 9).unwrap();
            for (at, v) in flips {
                let at = at % bytes.len();
                bytes[at] ^= v;
            }
            let _ = parse_query(&bytes);
        }
    }
}
