//! What travels on a node's one UDP socket, told apart by the first byte.
//!
//! | first byte | message |
//! | --- | --- |
//! | 1–4 | WireGuard (handshake initiation, response, cookie reply, transport data) |
//! | 0x10 | Tern hello: an unauthenticated certificate offer made before a handshake |
//! | 0x11 | relay request, node → relay: `0x11, target overlay IPv4 (4), WireGuard message` |
//! | 0x12 | relayed, relay → node: `0x12, source overlay IPv4 (4), WireGuard message` |
//! | anything else | dropped and counted |
//!
//! A relay forwards WireGuard messages (types 1–4) and nothing else: it never
//! holds the end-to-end keys, so what it carries is as opaque to it as to
//! anyone on the path. It knows who sent a relay request by the address the
//! request came from (the sender's registered, observed endpoint), and
//! forwards only between nodes it introduced to each other.
//!
//! Tern's own pre-handshake messages live in 0x10–0x1f. QUIC long and short
//! headers always set the 0x40 bit, so a later QUIC listener on the same
//! socket cannot collide with either range.

use crate::cert::MAX_CERT_LEN;
use crate::codec::{put_blob16, Reader};

use std::net::Ipv4Addr;

/// The kind of datagram, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    WireGuard,
    Hello,
    RelayRequest,
    Relayed,
    Unknown,
}

pub const TYPE_HELLO: u8 = 0x10;
pub const TYPE_RELAY_REQUEST: u8 = 0x11;
pub const TYPE_RELAYED: u8 = 0x12;

/// Bytes a relay envelope adds in front of the WireGuard message.
pub const RELAY_HEADER_LEN: usize = 5;

/// Largest WireGuard message a relay carries: one datagram's worth.
pub const MAX_RELAYED_LEN: usize = 65_507 - RELAY_HEADER_LEN;

/// Classifies a datagram without parsing it.
pub fn classify(datagram: &[u8]) -> DatagramKind {
    match datagram.first() {
        Some(1..=4) => DatagramKind::WireGuard,
        Some(&TYPE_HELLO) => DatagramKind::Hello,
        Some(&TYPE_RELAY_REQUEST) => DatagramKind::RelayRequest,
        Some(&TYPE_RELAYED) => DatagramKind::Relayed,
        _ => DatagramKind::Unknown,
    }
}

/// A WireGuard message in a relay envelope: for a relay request, `peer` is
/// the node it is for; for a relayed message, the node it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayEnvelope<'a> {
    pub peer: Ipv4Addr,
    pub message: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("not a relay envelope of the expected kind")]
    WrongType,
    #[error("relay envelope shorter than its header")]
    Truncated,
    #[error("relay envelope carries message type {0}, not a WireGuard message (1-4)")]
    NotWireGuard(u8),
    #[error("relayed message longer than {MAX_RELAYED_LEN} bytes")]
    TooLong,
}

/// The header of a relay envelope of kind `kind` (a `TYPE_RELAY_*`).
pub fn relay_header(kind: u8, peer: Ipv4Addr) -> [u8; RELAY_HEADER_LEN] {
    let o = peer.octets();
    [kind, o[0], o[1], o[2], o[3]]
}

impl<'a> RelayEnvelope<'a> {
    /// Parses an envelope of kind `kind`, checking that it carries a
    /// WireGuard message and nothing else.
    pub fn decode(kind: u8, datagram: &'a [u8]) -> Result<RelayEnvelope<'a>, RelayError> {
        let Some((&first, rest)) = datagram.split_first() else {
            return Err(RelayError::Truncated);
        };
        if first != kind {
            return Err(RelayError::WrongType);
        }
        if rest.len() < RELAY_HEADER_LEN {
            return Err(RelayError::Truncated);
        }
        let (ip, message) = rest.split_at(4);
        match message.first() {
            Some(1..=4) => {}
            Some(&t) => return Err(RelayError::NotWireGuard(t)),
            None => return Err(RelayError::Truncated),
        }
        if message.len() > MAX_RELAYED_LEN {
            return Err(RelayError::TooLong);
        }
        Ok(RelayEnvelope {
            peer: Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
            message,
        })
    }

    pub fn encode(&self, kind: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(RELAY_HEADER_LEN + self.message.len());
        out.extend_from_slice(&relay_header(kind, self.peer));
        out.extend_from_slice(self.message);
        out
    }
}

/// A certificate offer. It proves nothing by itself: the receiver verifies the
/// certificate against its own CAs and learns only "this key claims this
/// identity"; the WireGuard handshake that follows proves possession of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello<'a> {
    /// The sender wants the receiver's certificate in return.
    pub wants_reply: bool,
    /// The sender's certificate, binary encoding.
    pub cert: &'a [u8],
}

/// Largest hello on the wire.
pub const MAX_HELLO_LEN: usize = 4 + MAX_CERT_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not a hello message")]
    WrongType,
    #[error("hello truncated or its certificate longer than {MAX_CERT_LEN} bytes")]
    Malformed,
    #[error("hello carries unknown flags {0:#04x}")]
    UnknownFlags(u8),
}

const FLAG_WANTS_REPLY: u8 = 0x01;

impl<'a> Hello<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.cert.len());
        out.push(TYPE_HELLO);
        out.push(if self.wants_reply {
            FLAG_WANTS_REPLY
        } else {
            0
        });
        put_blob16(&mut out, self.cert);
        out
    }

    pub fn decode(datagram: &'a [u8]) -> Result<Hello<'a>, HelloError> {
        let mut r = Reader::new(datagram);
        if r.u8() != Some(TYPE_HELLO) {
            return Err(HelloError::WrongType);
        }
        let flags = r.u8().ok_or(HelloError::Malformed)?;
        if flags & !FLAG_WANTS_REPLY != 0 {
            return Err(HelloError::UnknownFlags(flags));
        }
        let cert = r.blob16(MAX_CERT_LEN).ok_or(HelloError::Malformed)?;
        if !r.is_empty() {
            return Err(HelloError::Malformed);
        }
        Ok(Hello {
            wants_reply: flags & FLAG_WANTS_REPLY != 0,
            cert,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trip() {
        let h = Hello {
            wants_reply: true,
            cert: b"certificate bytes",
        };
        let bytes = h.encode();
        assert_eq!(classify(&bytes), DatagramKind::Hello);
        assert_eq!(Hello::decode(&bytes), Ok(h));
    }

    #[test]
    fn classify_by_first_byte() {
        assert_eq!(classify(&[1, 0, 0, 0]), DatagramKind::WireGuard);
        assert_eq!(classify(&[4]), DatagramKind::WireGuard);
        assert_eq!(classify(&[0x40]), DatagramKind::Unknown);
        assert_eq!(classify(&[]), DatagramKind::Unknown);
    }

    #[test]
    fn hello_rejects_bad_input() {
        assert_eq!(Hello::decode(&[0x10]), Err(HelloError::Malformed));
        assert_eq!(
            Hello::decode(&[0x10, 0x80, 0, 0]),
            Err(HelloError::UnknownFlags(0x80))
        );
        assert_eq!(
            Hello::decode(&[0x10, 0, 0, 2, 1]),
            Err(HelloError::Malformed)
        );
        assert_eq!(
            Hello::decode(&[0x10, 0, 0, 0, 9]),
            Err(HelloError::Malformed)
        );
        assert_eq!(Hello::decode(&[0x11, 0, 0, 0]), Err(HelloError::WrongType));
        let mut big = vec![0x10, 0];
        big.extend_from_slice(&((MAX_CERT_LEN + 1) as u16).to_be_bytes());
        big.resize(4 + MAX_CERT_LEN + 1, 0);
        assert_eq!(Hello::decode(&big), Err(HelloError::Malformed));
    }

    #[test]
    fn relay_envelope_round_trip_and_refusals() {
        let ip = Ipv4Addr::new(100, 64, 0, 6);
        let env = RelayEnvelope {
            peer: ip,
            message: &[4, 0, 0, 0, 9, 9],
        };
        let bytes = env.encode(TYPE_RELAY_REQUEST);
        assert_eq!(classify(&bytes), DatagramKind::RelayRequest);
        assert_eq!(bytes.len(), RELAY_HEADER_LEN + 6);
        assert_eq!(RelayEnvelope::decode(TYPE_RELAY_REQUEST, &bytes), Ok(env));
        assert_eq!(
            RelayEnvelope::decode(TYPE_RELAYED, &bytes),
            Err(RelayError::WrongType)
        );
        let relayed = env.encode(TYPE_RELAYED);
        assert_eq!(classify(&relayed), DatagramKind::Relayed);
        assert_eq!(RelayEnvelope::decode(TYPE_RELAYED, &relayed), Ok(env));
        // Only WireGuard rides a relay: not a hello, not another envelope.
        let hello = RelayEnvelope {
            peer: ip,
            message: &[TYPE_HELLO, 0, 0, 0],
        }
        .encode(TYPE_RELAY_REQUEST);
        assert_eq!(
            RelayEnvelope::decode(TYPE_RELAY_REQUEST, &hello),
            Err(RelayError::NotWireGuard(TYPE_HELLO))
        );
        assert_eq!(
            RelayEnvelope::decode(TYPE_RELAY_REQUEST, &[0x11, 100, 64]),
            Err(RelayError::Truncated)
        );
        assert_eq!(
            RelayEnvelope::decode(TYPE_RELAY_REQUEST, &[0x11, 100, 64, 0, 6]),
            Err(RelayError::Truncated)
        );
        assert_eq!(
            RelayEnvelope::decode(TYPE_RELAY_REQUEST, &[]),
            Err(RelayError::Truncated)
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = Hello::decode(&bytes);
            let _ = classify(&bytes);
            for kind in [TYPE_RELAY_REQUEST, TYPE_RELAYED] {
                if let Ok(env) = RelayEnvelope::decode(kind, &bytes) {
                    prop_assert!(matches!(env.message.first(), Some(1..=4)));
                    prop_assert_eq!(env.encode(kind), bytes.clone());
                }
            }
        }
    }
}
