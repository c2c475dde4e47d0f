//! This host's own addresses worth offering peers as direct-path
//! candidates: on a dual-stack socket, the global IPv6 addresses of its
//! interfaces (an IPv6 path often needs no NAT traversal at all, where the
//! IPv4 one goes through a NAT or a relay).

use std::net::Ipv6Addr;

/// Most IPv6 addresses offered (a host with privacy addresses may hold
/// many; a node registers at most eight endpoints in all).
pub const MAX_LOCAL_V6: usize = 3;

/// The global IPv6 addresses of this host's interfaces that are up, at
/// most [`MAX_LOCAL_V6`], in the order the kernel lists them.
pub fn interface_ipv6() -> Vec<Ipv6Addr> {
    use nix::net::if_::InterfaceFlags;
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ifa in addrs {
        if !ifa.flags.contains(InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(ip) = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in6())
            .map(|a| a.ip())
        else {
            continue;
        };
        if usable_v6(ip) && !out.contains(&ip) && out.len() < MAX_LOCAL_V6 {
            out.push(ip);
        }
    }
    out
}

/// Whether a peer elsewhere could reach `ip`: not loopback, unspecified,
/// multicast, link-local (it needs an interface to go with it) or an
/// IPv4-mapped address.
pub fn usable_v6(ip: Ipv6Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (ip.segments()[0] & 0xffc0) == 0xfe80
        || ip.to_ipv4_mapped().is_some())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_a_peer_elsewhere_can_reach_are_offered() {
        for good in ["2001:db8::2", "fd00::5", "2a00:1450::1"] {
            assert!(usable_v6(good.parse().unwrap()), "{good}");
        }
        for bad in [
            "::1",
            "::",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "::ffff:198.18.0.1",
        ] {
            assert!(!usable_v6(bad.parse().unwrap()), "{bad}");
        }
        // The host's own list holds nothing unusable, and is bounded.
        let own = interface_ipv6();
        assert!(own.len() <= MAX_LOCAL_V6);
        assert!(own.iter().all(|ip| usable_v6(*ip)), "{own:?}");
    }
}
