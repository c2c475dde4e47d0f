//! The short strings users type: durations, port ranges, store URLs,
//! forward targets, resolver addresses, service upstreams, packet views.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tern_shared::{dns, duration, packet, policy, services, store};

fuzz_target!(|data: &[u8]| {
    let _ = packet::ipv4_addrs(data);
    let _ = packet::parse_udp_ipv4(data);
    let _ = packet::flow_of(data);
    let _ = packet::icmp_error_quote(data);
    let _ = packet::tcp_reset_for(data);
    let _ = packet::icmp_unreachable_for(data, std::net::Ipv4Addr::new(100, 64, 0, 1), 3);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = duration::parse_duration(text) {
        assert_eq!(
            duration::parse_duration(&duration::format_duration(d)).ok(),
            Some(d)
        );
    }
    if let Ok(range) = policy::PortRange::parse(text) {
        assert_eq!(
            policy::PortRange::parse(&range.to_string()).ok(),
            Some(range)
        );
    }
    let _ = store::parse_store_url(text, Path::new("/var/lib/tern"));
    if let Ok(target) = text.parse::<dns::ForwardTarget>() {
        assert_eq!(
            target.to_string().parse::<dns::ForwardTarget>().ok(),
            Some(target)
        );
    }
    let _ = dns::parse_resolver(text);
    let _ = services::Upstream::parse(text);
});
