//! Gateways and nodes coming and going, as the soak run
//! (`netns-tests/src/soak.rs`) found them:
//!
//! - A node that stops says so to every peer it has a session with, not
//!   only to its lighthouses: each forgets it at once (not after five idle
//!   minutes), and a gateway's clients move to the other gateway with their
//!   next packet instead of after probing a silent one. The message counts
//!   only for the session it came over: a peer can make others forget
//!   itself, nobody else.
//! - A lighthouse that has just restarted lists only the gateways that
//!   registered with it again since. A client taking that list at its word
//!   moved its route to another gateway and cut every connection through
//!   the one in use; now a gateway missing from the list stays a candidate
//!   for `ROUTE_GRACE`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use tern_shared::cert::LIGHTHOUSE_GROUP;
use tern_shared::packet::build_udp_ipv4;
use tern_shared::testing::TestCa;

mod simnet;
use simnet::*;

const A: &str = "198.18.0.2:4242";
const B: &str = "198.18.0.3:4242";
const C: &str = "198.18.0.4:4242";
const A_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 5);
const B_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 6);
const C_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 7);
const CI: &str = "198.18.0.20:4242";
const GW1: &str = "198.18.0.30:4242";
const GW2: &str = "198.18.0.31:4242";
const CI_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 20);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);

fn mesh(nodes: &[(&str, &str, &str)]) -> (Net, TestCa) {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    for (name, ip, at) in nodes {
        net.add_node(&ca, &ca.node(name, ip, &["ci"], &[], 86_400), at);
    }
    net.run_for(Duration::from_secs(1));
    (net, ca)
}

fn peers_of(net: &mut Net, at: &str) -> Vec<String> {
    net.node(at)
        .0
        .status()
        .peers
        .iter()
        .map(|p| p.name.clone())
        .collect()
}

/// `tern down`: the core says goodbye, the datagrams go out, the host goes.
fn stop(net: &mut Net, at: &str) {
    let now = net.now;
    net.node(at).0.shutdown(now);
    net.settle();
    net.hosts.remove(&addr(at));
}

#[test]
fn a_stopping_node_is_forgotten_at_once_by_every_peer_and_by_nobody_else() {
    let (mut net, _ca) = mesh(&[
        ("a", "100.64.0.5/10", A),
        ("b", "100.64.0.6/10", B),
        ("c", "100.64.0.7/10", C),
    ]);
    // a has sessions with b and c; b with c too.
    for (from, src, dst) in [(A, A_IP, B_IP), (A, A_IP, C_IP), (B, B_IP, C_IP)] {
        let p = build_udp_ipv4(src, dst, 5000, 6000, b"hi");
        net.send_from_tun(from, &p);
    }
    assert!(peers_of(&mut net, B).contains(&"a".to_string()));
    assert!(peers_of(&mut net, C).contains(&"a".to_string()));

    stop(&mut net, A);
    for at in [B, C] {
        let peers = peers_of(&mut net, at);
        assert!(!peers.contains(&"a".to_string()), "{at}: {peers:?}");
        assert_eq!(net.node(at).0.status().node_counters.peers_left, 1);
        assert_eq!(
            net.node(at).0.status().node_counters.bad_control_messages,
            0
        );
    }
    // Only a went: b and c still talk without a new handshake.
    assert!(peers_of(&mut net, C).contains(&"b".to_string()));
    let p = build_udp_ipv4(B_IP, C_IP, 5000, 6000, b"still here");
    net.send_from_tun(B, &p);
    assert_eq!(net.node(C).1.last(), Some(&p));
    // The lighthouse forgot a too.
    assert!(net.lighthouse().registry().lookup(A_IP).is_none());
}

fn tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&8080u16.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

/// A lighthouse, gw-1 and gw-2 for 198.19.0.0/24 (group ci let in to
/// 198.19.0.10:8080), and ci-1 routing the subnet; ci-1's first packet went to gw-1.
fn two_gateways() -> (Net, TestCa) {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    let open = tern_shared::config::NodeConfig::parse(
        "[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[firewall.inbound]]\nproto = \"tcp\"\nport = \"8080\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.10/32\"\n",
        std::path::Path::new("/sim/gw.toml"),
    )
    .unwrap()
    .firewall;
    for (name, ip, at) in [
        ("gw-1", "100.64.0.30/10", GW1),
        ("gw-2", "100.64.0.31/10", GW2),
    ] {
        net.add_node(&ca, &ca.node(name, ip, &[], &["198.19.0.0/24"], 86_400), at);
        net.node(at)
            .0
            .set_policy(&open, vec!["198.19.0.0/24".parse().unwrap()], &[]);
    }
    net.add_node(
        &ca,
        &ca.node("ci-1", "100.64.0.20/10", &["ci"], &[], 86_400),
        CI,
    );
    net.node(CI).0.set_policy(
        &tern_shared::policy::FirewallConfig::default(),
        vec![],
        &[tern_shared::policy::RouteConfig {
            subnet: "198.19.0.0/24".parse().unwrap(),
            via: None,
        }],
    );
    net.run_for(Duration::from_secs(4));
    net.send_from_tun(CI, &tcp_syn(CI_IP, SERVER, 40000));
    assert_eq!(net.node(GW1).1.len(), 1, "gw-1 first (by name)");
    (net, ca)
}

#[test]
fn a_stopping_gateways_clients_move_to_the_other_gateway_with_their_next_packet() {
    let (mut net, _ca) = two_gateways();
    stop(&mut net, GW1);
    let status = net.node(CI).0.status();
    assert_eq!(status.node_counters.peers_left, 1);
    assert_eq!(status.node_counters.gateway_failovers, 1);
    assert_eq!(status.routes[0].active, None, "{status:?}");
    // The next packet goes to gw-2, with no probe of gw-1 first: no time
    // passes beyond the handshake's round trips.
    let syn = tcp_syn(CI_IP, SERVER, 40001);
    net.send_from_tun(CI, &syn);
    assert_eq!(net.node(GW2).1, &vec![syn]);
    let status = net.node(CI).0.status();
    assert_eq!(status.routes[0].active.as_deref(), Some("gw-2"));
    assert_eq!(status.node_counters.gateway_failovers, 1);
}

#[test]
fn a_restarted_lighthouse_that_does_not_list_the_gateway_in_use_yet_does_not_move_the_route() {
    let (mut net, ca) = two_gateways();
    let lighthouse = ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400);
    // The lighthouse restarts; gw-1 cannot reach the new one (yet), so its
    // route list names gw-2 alone. ci-1 still reaches gw-1.
    net.hosts.remove(&addr(LH_ADDR));
    net.blocked.push((ip4(addr(GW1)), ip4(addr(LH_ADDR))));
    net.add_lighthouse(&ca, &lighthouse);
    let mut sport = 41000;
    let mut poll = |net: &mut Net, secs: u64| {
        for _ in 0..secs * 4 {
            sport += 1;
            net.send_from_tun(CI, &tcp_syn(CI_IP, SERVER, sport));
            net.run_for(Duration::from_millis(250));
        }
    };
    poll(&mut net, 12);
    let listed: Vec<_> = net
        .lighthouse()
        .registry()
        .routes_after(None)
        .0
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(listed, ["gw-2"], "the new lighthouse knows gw-2 alone");
    let status = net.node(CI).0.status();
    assert_eq!(
        status.routes[0].active.as_deref(),
        Some("gw-1"),
        "{status:?}"
    );
    assert!(net.node(GW2).1.is_empty(), "nothing moved to gw-2");
    assert_eq!(status.node_counters.gateway_failovers, 0);

    // gw-1 gets through again: it registers, and nothing ever moved.
    net.blocked.clear();
    poll(&mut net, 10);
    assert!(net.node(GW2).1.is_empty());
    let status = net.node(CI).0.status();
    assert_eq!(status.routes[0].active.as_deref(), Some("gw-1"));
    assert_eq!(status.routes[0].gateways.len(), 2);
}

#[test]
fn a_gateway_no_lighthouse_lists_any_more_is_dropped_after_the_grace() {
    let (mut net, _ca) = two_gateways();
    // gw-1 can no longer reach the lighthouse, which forgets it; ci-1
    // still reaches gw-1, but after ROUTE_GRACE goes by gw-2.
    net.blocked.push((ip4(addr(GW1)), ip4(addr(LH_ADDR))));
    let mut moved_after = None;
    for i in 0..240u16 {
        net.send_from_tun(CI, &tcp_syn(CI_IP, SERVER, 42000 + i));
        net.run_for(Duration::from_millis(500));
        if !net.node(GW2).1.is_empty() {
            moved_after = Some(Duration::from_millis(500) * u32::from(i + 1));
            break;
        }
    }
    let moved_after = moved_after.expect("the route moved to gw-2 within two minutes");
    let status = net.node(CI).0.status();
    assert_eq!(
        status.routes[0].active.as_deref(),
        Some("gw-2"),
        "{status:?}"
    );
    assert_eq!(status.routes[0].gateways.len(), 1, "gw-1 dropped");
    assert!(
        moved_after >= tern_node_core::node::ROUTE_GRACE,
        "not before the grace: {moved_after:?}"
    );
}
