//! The encodings of the control messages for names: zones gateways
//! advertise, pages of them from a lighthouse, node names, and DNS
//! messages between a node and a gateway.
//!
//! A zone or name is `u8 length` then ASCII; zones must be in canonical form
//! ([`crate::cert::validate_zone`]). DNS messages are `u16 length` then the
//! wire format, which the receiver parses itself.

use std::net::Ipv4Addr;

use super::{
    put_peer, read_peer, ControlError, ControlMessage, MAX_CONTROL_LEN, T_DNS_ANSWER, T_DNS_QUERY,
    T_NAME_QUERY, T_NAME_REPLY, T_ZONES_CHANGED, T_ZONES_QUERY, T_ZONES_REPLY, T_ZONE_ADVERT,
};
use crate::cert::{validate_zone, MAX_DNS_ZONES, MAX_ZONE_LEN};
use crate::codec::{put_blob16, Reader};

/// Most zones in one [`super::ControlMessage::ZonesReply`]; a page also ends
/// before it would outgrow a control message.
pub const MAX_ZONES_IN_REPLY: usize = 16;
/// The largest DNS query a node sends a gateway.
pub const MAX_DNS_QUERY_LEN: usize = 1024;
/// Bytes of a DNS answer per [`super::ControlMessage::DnsAnswer`].
pub const DNS_ANSWER_CHUNK: usize = 1200;
/// Parts of one DNS answer at most: 64 KiB, the largest DNS message.
pub const MAX_DNS_ANSWER_PARTS: usize = 65535 / DNS_ANSWER_CHUNK + 1;

/// One zone a registered gateway answers for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AdvertisedZone {
    pub zone: String,
    /// The gateway's overlay address (look it up like any peer).
    pub gateway: Ipv4Addr,
    /// The gateway's certificate name.
    pub name: String,
}

impl AdvertisedZone {
    /// Its size in a [`super::ControlMessage::ZonesReply`], so that a
    /// lighthouse can fill a page without going over.
    pub fn encoded_len(&self) -> usize {
        1 + self.zone.len() + 4 + 1 + self.name.len()
    }
}

/// What a page's entries may take: a control message less its header,
/// flag and count.
pub const ZONES_PAGE_BUDGET: usize = MAX_CONTROL_LEN - 8;

/// The body of a message for names (after its type and id).
pub(super) fn put_body(msg: &ControlMessage, out: &mut Vec<u8>) -> Result<(), ControlError> {
    match msg {
        ControlMessage::ZoneAdvert { zones, .. } => put_zone_advert(out, zones),
        ControlMessage::ZonesQuery { after, .. } => {
            if let Some((zone, gateway)) = after {
                put_name(out, zone)?;
                out.extend_from_slice(&gateway.octets());
            }
            Ok(())
        }
        ControlMessage::ZonesReply {
            zones, complete, ..
        } => put_zones_page(out, zones, *complete),
        ControlMessage::NameQuery { name, .. } => put_name(out, name),
        ControlMessage::NameReply { peer, .. } => match peer {
            None => {
                out.push(0);
                Ok(())
            }
            Some(p) => {
                out.push(1);
                put_peer(out, p)
            }
        },
        ControlMessage::DnsQuery { query, .. } => put_dns_query(out, query),
        ControlMessage::DnsAnswer {
            part,
            parts,
            answer,
            ..
        } => put_dns_answer(out, *part, *parts, answer),
        // ZonesChanged has no body; the rest are not messages for names.
        _ => Ok(()),
    }
}

/// A message for names of type `ty` (one of `T_ZONE_ADVERT..=T_ZONES_CHANGED`).
pub(super) fn read_body(
    ty: u8,
    id: u32,
    r: &mut Reader<'_>,
) -> Result<ControlMessage, ControlError> {
    Ok(match ty {
        T_ZONE_ADVERT => ControlMessage::ZoneAdvert {
            id,
            zones: read_zone_advert(r)?,
        },
        T_ZONES_QUERY => {
            let after = if r.is_empty() {
                None
            } else {
                let zone = read_name(r)?;
                Some((zone, r.ipv4().ok_or(ControlError::Malformed)?))
            };
            ControlMessage::ZonesQuery { id, after }
        }
        T_ZONES_REPLY => {
            let (zones, complete) = read_zones_page(r)?;
            ControlMessage::ZonesReply {
                id,
                zones,
                complete,
            }
        }
        T_ZONES_CHANGED => ControlMessage::ZonesChanged { id },
        T_NAME_QUERY => ControlMessage::NameQuery {
            id,
            name: read_name(r)?,
        },
        T_NAME_REPLY => {
            let peer = match r.u8() {
                Some(0) => None,
                Some(1) => Some(read_peer(r)?),
                _ => return Err(ControlError::Malformed),
            };
            ControlMessage::NameReply { id, peer }
        }
        T_DNS_QUERY => ControlMessage::DnsQuery {
            id,
            query: read_dns_query(r)?,
        },
        T_DNS_ANSWER => {
            let (part, parts, answer) = read_dns_answer(r)?;
            ControlMessage::DnsAnswer {
                id,
                part,
                parts,
                answer,
            }
        }
        other => return Err(ControlError::UnknownType(other)),
    })
}

fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), ControlError> {
    if name.is_empty() || name.len() > MAX_ZONE_LEN {
        return Err(ControlError::BadName);
    }
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

/// A name: 1-253 printable ASCII bytes.
fn read_name(r: &mut Reader<'_>) -> Result<String, ControlError> {
    let len = usize::from(r.u8().ok_or(ControlError::Malformed)?);
    let bytes = r.bytes(len).ok_or(ControlError::Malformed)?;
    if len == 0 || len > MAX_ZONE_LEN || !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return Err(ControlError::BadName);
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

fn read_zone(r: &mut Reader<'_>) -> Result<String, ControlError> {
    let zone = read_name(r)?;
    validate_zone(&zone).map_err(|_| ControlError::BadName)?;
    Ok(zone)
}

fn put_zone_advert(out: &mut Vec<u8>, zones: &[String]) -> Result<(), ControlError> {
    if zones.len() > MAX_DNS_ZONES {
        return Err(ControlError::TooManyLabels);
    }
    out.push(zones.len() as u8);
    for zone in zones {
        put_name(out, zone)?;
    }
    Ok(())
}

fn read_zone_advert(r: &mut Reader<'_>) -> Result<Vec<String>, ControlError> {
    let n = usize::from(r.u8().ok_or(ControlError::Malformed)?);
    if n > MAX_DNS_ZONES {
        return Err(ControlError::TooManyLabels);
    }
    (0..n).map(|_| read_zone(r)).collect()
}

fn put_zones_page(
    out: &mut Vec<u8>,
    zones: &[AdvertisedZone],
    complete: bool,
) -> Result<(), ControlError> {
    if zones.len() > MAX_ZONES_IN_REPLY {
        return Err(ControlError::TooManyRoutes);
    }
    out.push(u8::from(complete));
    out.push(zones.len() as u8);
    for z in zones {
        put_name(out, &z.zone)?;
        out.extend_from_slice(&z.gateway.octets());
        put_name(out, &z.name)?;
    }
    Ok(())
}

fn read_zones_page(r: &mut Reader<'_>) -> Result<(Vec<AdvertisedZone>, bool), ControlError> {
    let complete = super::read_bool(r)?;
    let n = usize::from(r.u8().ok_or(ControlError::Malformed)?);
    if n > MAX_ZONES_IN_REPLY {
        return Err(ControlError::TooManyRoutes);
    }
    let mut zones = Vec::with_capacity(n);
    for _ in 0..n {
        let zone = read_zone(r)?;
        let gateway = r.ipv4().ok_or(ControlError::Malformed)?;
        let name = read_name(r)?;
        zones.push(AdvertisedZone {
            zone,
            gateway,
            name,
        });
    }
    Ok((zones, complete))
}

fn put_dns_query(out: &mut Vec<u8>, query: &[u8]) -> Result<(), ControlError> {
    if query.len() < 12 || query.len() > MAX_DNS_QUERY_LEN {
        return Err(ControlError::BadName);
    }
    put_blob16(out, query);
    Ok(())
}

fn read_dns_query(r: &mut Reader<'_>) -> Result<Vec<u8>, ControlError> {
    let query = r.blob16(MAX_DNS_QUERY_LEN).ok_or(ControlError::BadName)?;
    if query.len() < 12 {
        return Err(ControlError::BadName);
    }
    Ok(query.to_vec())
}

fn put_dns_answer(
    out: &mut Vec<u8>,
    part: u8,
    parts: u8,
    answer: &[u8],
) -> Result<(), ControlError> {
    check_part(part, parts)?;
    if answer.len() > DNS_ANSWER_CHUNK {
        return Err(ControlError::BadName);
    }
    out.push(part);
    out.push(parts);
    put_blob16(out, answer);
    Ok(())
}

fn read_dns_answer(r: &mut Reader<'_>) -> Result<(u8, u8, Vec<u8>), ControlError> {
    let part = r.u8().ok_or(ControlError::Malformed)?;
    let parts = r.u8().ok_or(ControlError::Malformed)?;
    check_part(part, parts)?;
    let answer = r.blob16(DNS_ANSWER_CHUNK).ok_or(ControlError::BadName)?;
    Ok((part, parts, answer.to_vec()))
}

fn check_part(part: u8, parts: u8) -> Result<(), ControlError> {
    if parts == 0 || usize::from(parts) > MAX_DNS_ANSWER_PARTS || part >= parts {
        return Err(ControlError::BadName);
    }
    Ok(())
}

/// A DNS answer in the parts [`super::ControlMessage::DnsAnswer`] carries:
/// `(part, parts, bytes)`; an answer over 64 KiB is cut there (no DNS
/// message is longer).
pub fn split_answer(answer: &[u8]) -> Vec<(u8, u8, &[u8])> {
    let answer = &answer[..answer.len().min(65535)];
    let chunks: Vec<&[u8]> = if answer.is_empty() {
        vec![answer]
    } else {
        answer.chunks(DNS_ANSWER_CHUNK).collect()
    };
    let parts = chunks.len() as u8;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| (i as u8, parts, c))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::ControlMessage;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn name_messages_round_trip() {
        let gw = Ipv4Addr::new(100, 64, 0, 10);
        let msgs = vec![
            ControlMessage::ZoneAdvert {
                id: 1,
                zones: vec!["internal".into(), "svc.cluster.local".into()],
            },
            ControlMessage::ZonesQuery { id: 2, after: None },
            ControlMessage::ZonesChanged { id: 0 },
            ControlMessage::ZonesQuery {
                id: 2,
                after: Some(("internal".into(), gw)),
            },
            ControlMessage::ZonesReply {
                id: 3,
                zones: vec![AdvertisedZone {
                    zone: "internal".into(),
                    gateway: gw,
                    name: "gw-1".into(),
                }],
                complete: true,
            },
            ControlMessage::NameQuery {
                id: 4,
                name: "GW-1".into(),
            },
            ControlMessage::NameReply { id: 5, peer: None },
            ControlMessage::DnsQuery {
                id: 6,
                query: vec![9; 40],
            },
            ControlMessage::DnsAnswer {
                id: 7,
                part: 1,
                parts: 3,
                answer: vec![1; DNS_ANSWER_CHUNK],
            },
        ];
        for m in msgs {
            let bytes = m.encode().unwrap();
            assert_eq!(ControlMessage::decode(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn bad_names_and_parts_are_refused() {
        for zones in [vec!["Upper".to_string()], vec!["a..b".to_string()]] {
            let mut bytes = ControlMessage::ZoneAdvert {
                id: 1,
                zones: vec![],
            }
            .encode()
            .unwrap();
            bytes.truncate(5);
            bytes.push(1);
            bytes.push(zones[0].len() as u8);
            bytes.extend_from_slice(zones[0].as_bytes());
            assert_eq!(ControlMessage::decode(&bytes), Err(ControlError::BadName));
        }
        let bad = ControlMessage::DnsAnswer {
            id: 1,
            part: 3,
            parts: 3,
            answer: vec![],
        };
        assert_eq!(bad.encode(), Err(ControlError::BadName));
        let short = ControlMessage::DnsQuery {
            id: 1,
            query: vec![0; 5],
        };
        assert_eq!(short.encode(), Err(ControlError::BadName));
    }

    #[test]
    fn answers_split_into_parts_and_back() {
        for len in [0, 1, DNS_ANSWER_CHUNK, DNS_ANSWER_CHUNK + 1, 65535, 70000] {
            let answer: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let parts = split_answer(&answer);
            assert!(parts.len() <= MAX_DNS_ANSWER_PARTS);
            let joined: Vec<u8> = parts.iter().flat_map(|(_, _, c)| c.to_vec()).collect();
            assert_eq!(joined, answer[..len.min(65535)]);
            for (part, n, chunk) in parts {
                let m = ControlMessage::DnsAnswer {
                    id: 1,
                    part,
                    parts: n,
                    answer: chunk.to_vec(),
                };
                assert!(m.encode().unwrap().len() <= MAX_CONTROL_LEN);
            }
        }
    }

    #[test]
    fn a_full_page_of_the_longest_entries_fits() {
        let entry = AdvertisedZone {
            zone: "z".repeat(MAX_ZONE_LEN),
            gateway: Ipv4Addr::LOCALHOST,
            name: "n".repeat(64),
        };
        let fit = ZONES_PAGE_BUDGET / entry.encoded_len();
        let page = ControlMessage::ZonesReply {
            id: 1,
            zones: vec![entry; fit],
            complete: false,
        };
        assert!(page.encode().unwrap().len() <= MAX_CONTROL_LEN);
    }

    proptest! {
        #[test]
        fn garbage_name_messages_never_panic(
            ty in 18u8..=25,
            body in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let mut bytes = vec![ty, 0, 0, 0, 1];
            bytes.extend_from_slice(&body);
            if let Ok(m) = ControlMessage::decode(&bytes) {
                prop_assert_eq!(ControlMessage::decode(&m.encode().unwrap()).unwrap(), m);
            }
        }
    }
}
