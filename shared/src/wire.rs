//! What travels on a node's one UDP socket, told apart by the first byte.
//!
//! | first byte | message |
//! | --- | --- |
//! | 1–4 | WireGuard (handshake initiation, response, cookie reply, transport data) |
//! | 0x10 | Tern hello: an unauthenticated certificate offer made before a handshake |
//! | anything else | dropped and counted |
//!
//! Tern's own pre-handshake messages live in 0x10–0x1f. QUIC long and short
//! headers always set the 0x40 bit, so a later QUIC listener on the same
//! socket cannot collide with either range.

use crate::cert::MAX_CERT_LEN;
use crate::codec::{put_blob16, Reader};

/// The kind of datagram, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    WireGuard,
    Hello,
    Unknown,
}

pub const TYPE_HELLO: u8 = 0x10;

/// Classifies a datagram without parsing it.
pub fn classify(datagram: &[u8]) -> DatagramKind {
    match datagram.first() {
        Some(1..=4) => DatagramKind::WireGuard,
        Some(&TYPE_HELLO) => DatagramKind::Hello,
        _ => DatagramKind::Unknown,
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

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = Hello::decode(&bytes);
            let _ = classify(&bytes);
        }
    }
}
