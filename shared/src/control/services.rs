//! The encodings of the control messages for `[[services]]`: what a node
//! offers (with each registration), and a lighthouse's answer to "who
//! offers what".
//!
//! A service is its name (`u8` length, ASCII), its kind (`u8`: 0 http, 1
//! kubernetes), its port (`u16`) and the groups allowed to call it (`u8`
//! count, each a label).

use std::net::Ipv4Addr;

use super::{
    put_label, read_bool, read_label, ControlError, ControlMessage, MAX_CONTROL_LEN,
    T_SERVICES_ADVERT, T_SERVICES_QUERY, T_SERVICES_REPLY,
};
use crate::codec::Reader;

/// Most services one node advertises.
pub const MAX_SERVICES_ADVERTISED: usize = 16;
/// Most groups listed for one service.
pub const MAX_SERVICE_GROUPS: usize = 8;
/// What a reply's entries may take: a control message less its header,
/// flag and count.
pub const SERVICES_PAGE_BUDGET: usize = MAX_CONTROL_LEN - 8;

/// One service a node offers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct AdvertisedService {
    pub name: String,
    /// `http` or `kubernetes`.
    pub kind: String,
    pub port: u16,
    /// Groups allowed to call it (empty: any peer the firewall lets in).
    pub groups: Vec<String>,
}

/// A service and the node that offers it, as a lighthouse lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ServiceEntry {
    pub service: AdvertisedService,
    /// The offering node's overlay address and certificate name.
    pub node: Ipv4Addr,
    pub node_name: String,
}

impl ServiceEntry {
    /// Its size in a [`ControlMessage::ServicesReply`].
    pub fn encoded_len(&self) -> usize {
        service_len(&self.service) + 4 + 1 + self.node_name.len()
    }
}

fn service_len(s: &AdvertisedService) -> usize {
    1 + s.name.len() + 1 + 2 + 1 + s.groups.iter().map(|g| 1 + g.len()).sum::<usize>()
}

fn kind_byte(kind: &str) -> Result<u8, ControlError> {
    match kind {
        "http" => Ok(0),
        "kubernetes" => Ok(1),
        _ => Err(ControlError::Malformed),
    }
}

fn put_service(out: &mut Vec<u8>, s: &AdvertisedService) -> Result<(), ControlError> {
    if s.name.is_empty() || s.groups.len() > MAX_SERVICE_GROUPS {
        return Err(ControlError::Malformed);
    }
    put_label(out, &s.name)?;
    out.push(kind_byte(&s.kind)?);
    out.extend_from_slice(&s.port.to_be_bytes());
    out.push(s.groups.len() as u8);
    for g in &s.groups {
        put_label(out, g)?;
    }
    Ok(())
}

fn read_service(r: &mut Reader<'_>) -> Result<AdvertisedService, ControlError> {
    let name = read_label(r)?;
    if name.is_empty() {
        return Err(ControlError::Malformed);
    }
    let kind = match r.u8() {
        Some(0) => "http",
        Some(1) => "kubernetes",
        _ => return Err(ControlError::Malformed),
    }
    .to_string();
    let port = r.u16().ok_or(ControlError::Malformed)?;
    let n = usize::from(r.u8().ok_or(ControlError::Malformed)?);
    if n > MAX_SERVICE_GROUPS {
        return Err(ControlError::Malformed);
    }
    let mut groups = Vec::with_capacity(n);
    for _ in 0..n {
        groups.push(read_label(r)?);
    }
    Ok(AdvertisedService {
        name,
        kind,
        port,
        groups,
    })
}

/// The body of a message for services (after its type and id).
pub(super) fn put_body(msg: &ControlMessage, out: &mut Vec<u8>) -> Result<(), ControlError> {
    match msg {
        ControlMessage::ServicesAdvert { services, .. } => {
            if services.len() > MAX_SERVICES_ADVERTISED {
                return Err(ControlError::Malformed);
            }
            out.push(services.len() as u8);
            for s in services {
                put_service(out, s)?;
            }
        }
        ControlMessage::ServicesQuery { name, .. } => put_label(out, name)?,
        ControlMessage::ServicesReply {
            services, complete, ..
        } => {
            out.push(u8::from(*complete));
            if services.len() > usize::from(u8::MAX) {
                return Err(ControlError::TooLong);
            }
            out.push(services.len() as u8);
            for e in services {
                put_service(out, &e.service)?;
                out.extend_from_slice(&e.node.octets());
                put_label(out, &e.node_name)?;
            }
        }
        _ => return Err(ControlError::Malformed),
    }
    Ok(())
}

pub(super) fn read_body(
    ty: u8,
    id: u32,
    r: &mut Reader<'_>,
) -> Result<ControlMessage, ControlError> {
    Ok(match ty {
        T_SERVICES_ADVERT => {
            let n = usize::from(r.u8().ok_or(ControlError::Malformed)?);
            if n > MAX_SERVICES_ADVERTISED {
                return Err(ControlError::Malformed);
            }
            let mut services = Vec::with_capacity(n);
            for _ in 0..n {
                services.push(read_service(r)?);
            }
            ControlMessage::ServicesAdvert { id, services }
        }
        T_SERVICES_QUERY => ControlMessage::ServicesQuery {
            id,
            name: read_label(r)?,
        },
        T_SERVICES_REPLY => {
            let complete = read_bool(r)?;
            let n = usize::from(r.u8().ok_or(ControlError::Malformed)?);
            let mut services = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                let service = read_service(r)?;
                let node = r.ipv4().ok_or(ControlError::Malformed)?;
                let node_name = read_label(r)?;
                services.push(ServiceEntry {
                    service,
                    node,
                    node_name,
                });
            }
            ControlMessage::ServicesReply {
                id,
                services,
                complete,
            }
        }
        other => return Err(ControlError::UnknownType(other)),
    })
}
