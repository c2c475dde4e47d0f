//! Just enough IPv4 and UDP to route packets by address and to carry control
//! datagrams inside WireGuard sessions. No allocation on the parse side.

use std::net::Ipv4Addr;

pub const IPV4_HEADER_LEN: usize = 20;
pub const UDP_HEADER_LEN: usize = 8;
pub const PROTO_UDP: u8 = 17;

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

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;

/// The transport-level identity of an IPv4 packet, enough for a firewall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// TCP/UDP source port; ICMP echo identifier; 0 otherwise.
    pub src_port: u16,
    /// TCP/UDP destination port; ICMP echo identifier; 0 otherwise.
    pub dst_port: u16,
    /// ICMP type (0 for other protocols).
    pub icmp_type: u8,
    /// ICMP code (0 for other protocols): which unreachable, for a log.
    pub icmp_code: u8,
    /// A non-first fragment: no transport header, ports unknown.
    pub fragment: bool,
}

/// Parses the flow of an IPv4 packet. `None` for anything that is not a
/// complete IPv4 header, or a first fragment too short for its ports.
pub fn flow_of(packet: &[u8]) -> Option<Flow> {
    let (src, dst) = ipv4_addrs(packet)?;
    let ihl = ((packet[0] & 0x0f) as usize) * 4;
    if ihl < IPV4_HEADER_LEN || packet.len() < ihl {
        return None;
    }
    let proto = packet[9];
    let frag_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    let mut flow = Flow {
        proto,
        src,
        dst,
        src_port: 0,
        dst_port: 0,
        icmp_type: 0,
        icmp_code: 0,
        fragment: frag_offset != 0,
    };
    if flow.fragment {
        return Some(flow);
    }
    let l4 = &packet[ihl..];
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let h = l4.get(..4)?;
            flow.src_port = u16::from_be_bytes([h[0], h[1]]);
            flow.dst_port = u16::from_be_bytes([h[2], h[3]]);
        }
        PROTO_ICMP => {
            let h = l4.get(..8)?;
            flow.icmp_type = h[0];
            flow.icmp_code = h[1];
            if matches!(h[0], 0 | 8 | 13 | 14) {
                let id = u16::from_be_bytes([h[4], h[5]]);
                flow.src_port = id;
                flow.dst_port = id;
            }
        }
        _ => {}
    }
    Some(flow)
}

/// For an ICMP error (destination unreachable, time exceeded, parameter
/// problem), the flow of the packet it reports on, which it quotes.
pub fn icmp_error_quote(packet: &[u8]) -> Option<Flow> {
    let ihl = ((packet.first()? & 0x0f) as usize) * 4;
    let icmp = packet.get(ihl..)?;
    if !matches!(icmp.first()?, 3 | 11 | 12) {
        return None;
    }
    flow_of(icmp.get(8..)?)
}

/// A TCP RST answering `packet` (an IPv4 TCP segment), from its destination
/// back to its source, as a host would send for a closed port.
pub fn tcp_reset_for(packet: &[u8]) -> Option<Vec<u8>> {
    let flow = flow_of(packet)?;
    if flow.proto != PROTO_TCP || flow.fragment {
        return None;
    }
    let ihl = ((packet[0] & 0x0f) as usize) * 4;
    let total = (u16::from_be_bytes([packet[2], packet[3]]) as usize).min(packet.len());
    let tcp = packet.get(ihl..total)?;
    if tcp.len() < 20 {
        return None;
    }
    let flags = tcp[13];
    if flags & 0x04 != 0 {
        return None; // never answer a RST
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let data_offset = ((tcp[12] >> 4) as usize) * 4;
    let payload = tcp.len().saturating_sub(data_offset) as u32;
    let syn_fin = u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0);
    let (rst_seq, rst_ack, rst_flags) = if flags & 0x10 != 0 {
        (ack, 0, 0x04)
    } else {
        (0, seq.wrapping_add(payload).wrapping_add(syn_fin), 0x14)
    };
    let mut seg = Vec::with_capacity(20);
    seg.extend_from_slice(&flow.dst_port.to_be_bytes());
    seg.extend_from_slice(&flow.src_port.to_be_bytes());
    seg.extend_from_slice(&rst_seq.to_be_bytes());
    seg.extend_from_slice(&rst_ack.to_be_bytes());
    seg.extend_from_slice(&[0x50, rst_flags, 0, 0, 0, 0, 0, 0]);
    let sum = transport_checksum(flow.dst, flow.src, PROTO_TCP, &seg);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    Some(ipv4_packet(flow.dst, flow.src, PROTO_TCP, &seg))
}

/// An ICMP destination unreachable (`code`: 3 port, 13 administratively
/// prohibited) answering `packet`, from `from` back to its source.
pub fn icmp_unreachable_for(packet: &[u8], from: Ipv4Addr, code: u8) -> Option<Vec<u8>> {
    let flow = flow_of(packet)?;
    // Never answer an ICMP error with another.
    if flow.proto == PROTO_ICMP && !matches!(flow.icmp_type, 0 | 8 | 13 | 14) {
        return None;
    }
    let ihl = ((packet[0] & 0x0f) as usize) * 4;
    let quote = &packet[..packet.len().min(ihl + 8)];
    let mut icmp = Vec::with_capacity(8 + quote.len());
    icmp.extend_from_slice(&[3, code, 0, 0, 0, 0, 0, 0]);
    icmp.extend_from_slice(quote);
    let sum = ones_complement(&icmp, 0);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(ipv4_packet(from, flow.src, PROTO_ICMP, &icmp))
}

fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = IPV4_HEADER_LEN + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = ipv4_header_checksum(&p[..IPV4_HEADER_LEN]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn transport_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = 0u32;
    for w in [src.octets(), dst.octets()] {
        pseudo += u16::from_be_bytes([w[0], w[1]]) as u32 + u16::from_be_bytes([w[2], w[3]]) as u32;
    }
    pseudo += proto as u32 + segment.len() as u32;
    ones_complement(segment, pseudo)
}

fn ones_complement(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        sum += u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod reply_tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> Vec<u8> {
        let mut seg = Vec::new();
        seg.extend_from_slice(&sport.to_be_bytes());
        seg.extend_from_slice(&dport.to_be_bytes());
        seg.extend_from_slice(&seq.to_be_bytes());
        seg.extend_from_slice(&0u32.to_be_bytes());
        seg.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        ipv4_packet(src, dst, PROTO_TCP, &seg)
    }

    #[test]
    fn reset_answers_a_syn() {
        let a = Ipv4Addr::new(100, 64, 0, 5);
        let b = Ipv4Addr::new(198, 19, 0, 10);
        let syn = tcp_syn(a, b, 40000, 5432, 1000);
        let f = flow_of(&syn).unwrap_or_else(|| panic!("flow"));
        assert_eq!((f.proto, f.src_port, f.dst_port), (PROTO_TCP, 40000, 5432));
        let rst = tcp_reset_for(&syn).unwrap_or_else(|| panic!("rst"));
        let r = flow_of(&rst).unwrap_or_else(|| panic!("rst flow"));
        assert_eq!((r.src, r.dst, r.src_port, r.dst_port), (b, a, 5432, 40000));
        assert_eq!(rst[20 + 13], 0x14, "RST|ACK");
        assert_eq!(
            u32::from_be_bytes([rst[28], rst[29], rst[30], rst[31]]),
            1001,
            "acks the SYN"
        );
        assert_eq!(ipv4_header_checksum(&rst[..20]), 0);
        assert_eq!(
            transport_checksum(b, a, PROTO_TCP, &rst[20..]),
            0,
            "TCP checksum verifies"
        );
        assert!(tcp_reset_for(&rst).is_none(), "no RST for a RST");
    }

    #[test]
    fn unreachable_quotes_the_packet() {
        let a = Ipv4Addr::new(100, 64, 0, 5);
        let b = Ipv4Addr::new(100, 64, 0, 6);
        let dgram = build_udp_ipv4(a, b, 5000, 53, b"query");
        let icmp = icmp_unreachable_for(&dgram, b, 3).unwrap_or_else(|| panic!("icmp"));
        let f = flow_of(&icmp).unwrap_or_else(|| panic!("flow"));
        assert_eq!(
            (f.proto, f.src, f.dst, f.icmp_type, f.icmp_code),
            (PROTO_ICMP, b, a, 3, 3)
        );
        assert_eq!(ones_complement(&icmp[20..], 0), 0, "ICMP checksum verifies");
        let quoted = icmp_error_quote(&icmp).unwrap_or_else(|| panic!("quote"));
        assert_eq!(
            (quoted.src, quoted.dst, quoted.src_port, quoted.dst_port),
            (a, b, 5000, 53)
        );
        assert!(
            icmp_unreachable_for(&icmp, a, 3).is_none(),
            "no error for an error"
        );
    }

    proptest! {
        #[test]
        fn builders_and_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = flow_of(&bytes);
            let _ = icmp_error_quote(&bytes);
            let _ = tcp_reset_for(&bytes);
            let _ = icmp_unreachable_for(&bytes, Ipv4Addr::LOCALHOST, 3);
        }
    }
}
