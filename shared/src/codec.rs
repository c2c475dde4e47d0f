//! Bounds-checked big-endian reader and writer for Tern's binary messages.
//! Every read returns `None` past the end, so decoders never index out of range.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn ipv4(&mut self) -> Option<Ipv4Addr> {
        Some(Ipv4Addr::from(self.array::<4>()?))
    }

    /// `u8 family (4|6)`, address bytes, `u16 port`.
    pub(crate) fn socket_addr(&mut self) -> Option<SocketAddr> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.u16()?))
    }

    /// A `u16`-length-prefixed byte string of at most `max` bytes.
    pub(crate) fn blob16(&mut self, max: usize) -> Option<&'a [u8]> {
        let len = self.u16()? as usize;
        if len > max {
            return None;
        }
        self.bytes(len)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

pub(crate) fn put_socket_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

pub(crate) fn put_blob16(out: &mut Vec<u8>, blob: &[u8]) {
    // Callers cap blobs far below u16::MAX before encoding.
    out.extend_from_slice(&(blob.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(&blob[..blob.len().min(u16::MAX as usize)]);
}
