//! Just enough IPv4 and UDP to route packets by address and to carry control
//! datagrams inside WireGuard sessions. No allocation on the parse side.

use std::net::Ipv4Addr;

pub const IPV4_HEADER_LEN: usize = 20;
pub const UDP_HEADER_LEN: usize = 8;
const PROTO_UDP: u8 = 17;

/// Source and destination of an IPv4 packet (version 4, header complete).
pub fn ipv4_addrs(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if packet.len() < IPV4_HEADER_LEN || packet[0] >> 4 != 4 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    Some((src, dst))
}

/// A UDP datagram inside an IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpView<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

/// Parses an unfragmented IPv4/UDP packet; `None` for anything else.
pub fn parse_udp_ipv4(packet: &[u8]) -> Option<UdpView<'_>> {
    let (src, dst) = ipv4_addrs(packet)?;
    let ihl = ((packet[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    let flags_frag = u16::from_be_bytes([packet[6], packet[7]]);
    if ihl < IPV4_HEADER_LEN || total < ihl + UDP_HEADER_LEN || total > packet.len() {
        return None;
    }
    // More-fragments flag or a fragment offset: not a whole datagram.
    if flags_frag & 0x3fff != 0 || packet[9] != PROTO_UDP {
        return None;
    }
    let udp = &packet[ihl..total];
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if udp_len < UDP_HEADER_LEN || udp_len > udp.len() {
        return None;
    }
    Some(UdpView {
        src,
        dst,
        src_port: u16::from_be_bytes([udp[0], udp[1]]),
        dst_port: u16::from_be_bytes([udp[2], udp[3]]),
        payload: &udp[UDP_HEADER_LEN..udp_len],
    })
}

/// Builds an IPv4/UDP packet (header checksum set; UDP checksum 0, which IPv4
/// allows and which the WireGuard AEAD makes redundant).
pub fn build_udp_ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = IPV4_HEADER_LEN + UDP_HEADER_LEN + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = ipv4_header_checksum(&p[..IPV4_HEADER_LEN]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&((UDP_HEADER_LEN + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

fn ipv4_header_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in header.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn udp_round_trip() {
        let a = Ipv4Addr::new(100, 64, 0, 5);
        let b = Ipv4Addr::new(100, 64, 0, 1);
        let p = build_udp_ipv4(a, b, 4243, 4243, b"hello");
        assert_eq!(ipv4_header_checksum(&p[..20]), 0, "checksum verifies");
        let v = parse_udp_ipv4(&p).unwrap_or_else(|| panic!("parses"));
        assert_eq!((v.src, v.dst, v.src_port, v.dst_port), (a, b, 4243, 4243));
        assert_eq!(v.payload, b"hello");
        assert_eq!(ipv4_addrs(&p), Some((a, b)));
    }

    #[test]
    fn rejects_fragments_and_other_protocols() {
        let a = Ipv4Addr::new(100, 64, 0, 5);
        let mut p = build_udp_ipv4(a, a, 1, 2, b"x");
        p[6] = 0x20; // more fragments
        assert!(parse_udp_ipv4(&p).is_none());
        let mut p = build_udp_ipv4(a, a, 1, 2, b"x");
        p[9] = 6;
        assert!(parse_udp_ipv4(&p).is_none());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_udp_ipv4(&bytes);
            let _ = ipv4_addrs(&bytes);
        }
    }
}
