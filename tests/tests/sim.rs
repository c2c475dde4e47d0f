//! Deterministic multi-node simulation over the sans-IO cores: a lighthouse
//! and nodes on a simulated network, one clock advanced by hand. No sockets,
//! no root, milliseconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use tern_mesh::PathKind;
use tern_node_core::node::NodeEvent;
use tern_shared::cert::LIGHTHOUSE_GROUP;
use tern_shared::packet::build_udp_ipv4;
use tern_shared::testing::{open_firewall, TestCa, TEST_NOW};

mod simnet;
use simnet::*;

struct Lab {
    net: Net,
    ca: TestCa,
}

const A: &str = "198.18.0.2:4242";
const B: &str = "198.18.0.3:4242";
const A_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 5);
const B_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 6);

fn lab() -> Lab {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    net.add_node(&ca, &ca.node("a", "100.64.0.5/10", &["ci"], &[], 86_400), A);
    net.add_node(&ca, &ca.node("b", "100.64.0.6/10", &[], &[], 86_400), B);
    net.run_for(Duration::from_secs(1));
    Lab { net, ca }
}

#[test]
fn nodes_register_and_meet_through_the_lighthouse() {
    let mut lab = lab();
    assert!(lab.net.registered(A));
    assert!(lab.net.registered(B));
    assert_eq!(lab.net.lighthouse().registry().len(), 2);

    let ping = build_udp_ipv4(A_IP, B_IP, 5000, 6000, b"hello b");
    lab.net.send_from_tun(A, &ping);
    assert_eq!(
        lab.net.node(B).1,
        &vec![ping],
        "the first packet waits for the lookup, then arrives"
    );

    let pong = build_udp_ipv4(B_IP, A_IP, 6000, 5000, b"hello a");
    lab.net.send_from_tun(B, &pong);
    assert_eq!(lab.net.node(A).1, &vec![pong]);

    let status = lab.net.node(A).0.status();
    let peer_b = status
        .peers
        .iter()
        .find(|p| p.name == "b")
        .expect("b in a's peers");
    assert_eq!(peer_b.endpoint, Some(addr(B)));
    assert!(peer_b.last_handshake_secs.is_some());
    assert!(status.lighthouses[0].observed == Some(addr(A)));
}

/// `tern status` on a fresh, healthy mesh shows no WireGuard errors. When
/// two nodes meet, both initiate at once: a looks b up while the
/// lighthouse asks b to punch toward a. a must not answer b's initiation by
/// starting a second one of its own (which orphaned its first, so b's
/// answer to that failed as an unexpected packet).
#[test]
fn peers_meeting_through_the_lighthouse_count_no_wireguard_errors() {
    let mut lab = lab();
    let ping = build_udp_ipv4(A_IP, B_IP, 5000, 6000, b"hello b");
    lab.net.send_from_tun(A, &ping);
    assert_eq!(lab.net.node(B).1, &vec![ping], "delivered once");
    let pong = build_udp_ipv4(B_IP, A_IP, 6000, 5000, b"hello a");
    lab.net.send_from_tun(B, &pong);
    assert_eq!(lab.net.node(A).1, &vec![pong]);
    lab.net.run_for(Duration::from_secs(30));
    for at in [A, B] {
        let status = lab.net.node(at).0.status();
        assert!(status.peers.iter().all(|p| p.last_handshake_secs.is_some()));
        assert_eq!(
            status.mesh_counters.wireguard_errors, 0,
            "{at}: {:?}",
            status.mesh_counters
        );
    }
    let now = lab.net.now;
    let counters = lab.net.lighthouse().status(now).mesh_counters;
    assert_eq!(counters.wireguard_errors, 0, "lighthouse: {counters:?}");
}

#[test]
fn established_tunnel_survives_lighthouse_loss_and_nodes_reregister_after_restart() {
    let mut lab = lab();
    lab.net
        .send_from_tun(A, &build_udp_ipv4(A_IP, B_IP, 1, 2, b"warm up"));
    lab.net.node(B).1.clear();

    // The lighthouse dies: the existing tunnel carries on.
    let lighthouse = lab.net.hosts.remove(&addr(LH_ADDR));
    assert!(lighthouse.is_some());
    lab.net.run_for(Duration::from_secs(20));
    let p = build_udp_ipv4(A_IP, B_IP, 1, 2, b"still here");
    lab.net.send_from_tun(A, &p);
    assert_eq!(lab.net.node(B).1, &vec![p]);
    assert!(!lab.net.registered(A), "a noticed the lighthouse is gone");

    // A new lighthouse process (empty registry) at the same address.
    let lh = lab
        .ca
        .node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400);
    lab.net.add_lighthouse(&lab.ca, &lh);
    lab.net.run_for(Duration::from_secs(6));
    assert!(lab.net.registered(A), "a re-registered by itself");
    assert!(lab.net.registered(B), "b re-registered by itself");
    assert_eq!(lab.net.lighthouse().registry().len(), 2);

    // A node that joins now meets an old one through the new lighthouse.
    let c = lab.ca.node("c", "100.64.0.7/10", &[], &[], 86_400);
    lab.net.add_node(&lab.ca, &c, "198.18.0.4:4242");
    lab.net.run_for(Duration::from_secs(1));
    let p = build_udp_ipv4(Ipv4Addr::new(100, 64, 0, 7), A_IP, 1, 2, b"from c");
    lab.net.send_from_tun("198.18.0.4:4242", &p);
    assert_eq!(lab.net.node(A).1, &vec![p]);
}

#[test]
fn node_from_another_ca_registers_nowhere_and_reaches_no_one() {
    let mut lab = lab();
    let rogue_ca = TestCa::new("rogue", &[], &[]);
    let rogue = rogue_ca.node("rogue", "100.64.0.66/10", &[], &[], 86_400);
    // The rogue trusts our CA too, so only our side's checks stand in its way.
    lab.net.add_node(&rogue_ca, &rogue, "198.18.0.66:4242");
    lab.net.run_for(Duration::from_secs(3));
    assert!(!lab.net.registered("198.18.0.66:4242"));
    assert_eq!(lab.net.lighthouse().registry().len(), 2);
    let now = lab.net.now;
    assert!(
        lab.net
            .lighthouse()
            .status(now)
            .mesh_counters
            .rejected_certs
            > 0
    );
    lab.net.send_from_tun(
        "198.18.0.66:4242",
        &build_udp_ipv4(Ipv4Addr::new(100, 64, 0, 66), A_IP, 1, 2, b"let me in"),
    );
    assert!(lab.net.node(A).1.is_empty());
}

/// A mesh coming up at once: a asks for b a moment before b registers.
/// The lighthouse says "unknown" at once and, when b registers, answers a
/// right then, without a's next retry.
#[test]
fn a_lookup_just_before_its_node_registers_is_answered_when_it_does() {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    net.add_node(&ca, &ca.node("a", "100.64.0.5/10", &[], &[], 86_400), A);
    net.run_for(Duration::from_secs(1));
    let p = build_udp_ipv4(A_IP, B_IP, 1, 2, b"before b is up");
    net.send_from_tun(A, &p);
    let now = net.now;
    let asked = net.lighthouse().status(now).counters;
    assert_eq!(asked.queries_unanswered, 1);
    // b starts and registers, and the clock does not move.
    net.add_node(&ca, &ca.node("b", "100.64.0.6/10", &[], &[], 86_400), B);
    net.node(B).0.handle_timeout(now);
    net.settle();
    assert!(net.registered(B));
    assert_eq!(net.node(B).1, &vec![p], "the waiting packet arrived");
    let counters = net.lighthouse().status(now).counters;
    assert_eq!(counters.queries, asked.queries, "a did not ask again");
    assert_eq!(counters.queries_answered_late, 1);
}

#[test]
fn unknown_address_times_out_and_waiting_packets_are_dropped() {
    let mut lab = lab();
    lab.net.send_from_tun(
        A,
        &build_udp_ipv4(A_IP, Ipv4Addr::new(100, 64, 9, 9), 1, 2, b"nobody"),
    );
    // Every lighthouse says at once that it does not know the address
    // (a ping would be answered so now), but packets wait for the
    // retries: the peer may be registering just now.
    lab.net.run_for(Duration::from_millis(200));
    let status = lab.net.node(A).0.status();
    assert_eq!(status.node_counters.lookups_unknown, 1, "{status:?}");
    assert_eq!(status.node_counters.lookup_timeouts, 0);
    lab.net.run_for(Duration::from_secs(16));
    let status = lab.net.node(A).0.status();
    assert_eq!(status.node_counters.lookup_timeouts, 1);
    assert_eq!(status.node_counters.lookups_unknown, 1);
    assert!(status
        .peers
        .iter()
        .all(|p| p.overlay_ip != Ipv4Addr::new(100, 64, 9, 9)));
}

#[test]
fn deregistered_node_is_forgotten_at_once() {
    let mut lab = lab();
    let now = lab.net.now;
    lab.net.node(B).0.shutdown(now);
    lab.net.settle();
    lab.net.hosts.remove(&addr(B));
    assert_eq!(lab.net.lighthouse().registry().len(), 1);
}

#[test]
fn with_two_lighthouses_losing_either_changes_nothing_for_new_pairs() {
    const LH2: &str = "198.18.0.10:4242";
    for dead in [None, Some(LH_ADDR), Some(LH2)] {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let mut net = Net::new();
        net.add_lighthouse(
            &ca,
            &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
        );
        net.add_lighthouse_at(
            &ca,
            &ca.node("lh2", "100.64.0.2/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
            LH2,
        );
        if let Some(dead) = dead {
            net.hosts.remove(&addr(dead));
        }
        net.add_node_with(
            &ca,
            &ca.node("a", "100.64.0.5/10", &[], &[], 86_400),
            A,
            &[LH_ADDR, LH2],
        );
        net.add_node_with(
            &ca,
            &ca.node("b", "100.64.0.6/10", &[], &[], 86_400),
            B,
            &[LH_ADDR, LH2],
        );
        net.run_for(Duration::from_secs(2));
        let status = net.node(A).0.status();
        let expected = if dead.is_some() { 1 } else { 2 };
        assert_eq!(
            status.lighthouses.iter().filter(|l| l.registered).count(),
            expected,
            "{dead:?} down: {status:?}"
        );
        if dead.is_none() {
            assert_eq!(
                net.lighthouse_at(LH_ADDR).registry().len(),
                2,
                "registered with every lighthouse"
            );
            assert_eq!(net.lighthouse_at(LH2).registry().len(), 2);
        }
        let p = build_udp_ipv4(A_IP, B_IP, 1, 2, b"via the survivor");
        net.send_from_tun(A, &p);
        assert_eq!(net.node(B).1, &vec![p], "lighthouse {dead:?} down");
        // The second lighthouse's answer makes a resend the same
        // initiation: b drops the copy as repeated, not as an error.
        let counters = net.node(B).0.status().mesh_counters;
        assert_eq!(counters.wireguard_errors, 0, "{dead:?} down: {counters:?}");
    }
}

// ---- Gateways and routes -------------------------------------------------

fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CI: &str = "198.18.0.20:4242";
const DEV: &str = "198.18.0.21:4242";
const GW1: &str = "198.18.0.30:4242";
const GW2: &str = "198.18.0.31:4242";
const CI_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 20);
const DEV_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 21);

fn gateway_policy() -> tern_shared::policy::FirewallConfig {
    let text = "[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[firewall.inbound]]\nproto = \"tcp\"\nport = \"8080\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.10/32\"\n";
    tern_shared::config::NodeConfig::parse(text, std::path::Path::new("/sim/gw.toml"))
        .unwrap()
        .firewall
}

fn route_config() -> Vec<tern_shared::policy::RouteConfig> {
    vec![tern_shared::policy::RouteConfig {
        subnet: "198.19.0.0/24".parse().unwrap(),
        via: None,
    }]
}

/// A lighthouse, gateways for 198.19.0.0/24 (authorized by their certs), a
/// client in group ci and one in group dev.
fn gateway_lab(gateways: &[(&str, &str, &str)]) -> Lab {
    let mut lab = gateway_lab_cold(gateways);
    lab.net.run_for(Duration::from_secs(4));
    lab
}

/// [`gateway_lab`] before any time has passed: nobody registered yet.
fn gateway_lab_cold(gateways: &[(&str, &str, &str)]) -> Lab {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    for (name, ip, at) in gateways {
        net.add_node(&ca, &ca.node(name, ip, &[], &["198.19.0.0/24"], 86_400), at);
        net.node(at).0.set_policy(
            &gateway_policy(),
            vec!["198.19.0.0/24".parse().unwrap()],
            &[],
        );
    }
    for (name, ip, at, group) in [
        ("ci-1", "100.64.0.20/10", CI, "ci"),
        ("dev-1", "100.64.0.21/10", DEV, "dev"),
    ] {
        net.add_node(&ca, &ca.node(name, ip, &[group], &[], 86_400), at);
        net.node(at).0.set_policy(
            &tern_shared::policy::FirewallConfig::default(),
            vec![],
            &route_config(),
        );
    }
    Lab { net, ca }
}

#[test]
fn the_first_packet_to_a_route_waits_for_its_gateway_instead_of_being_dropped() {
    // The client is up before any gateway: its route has none yet.
    let mut lab = gateway_lab(&[]);
    let status = lab.net.node(CI).0.status();
    assert!(status.routes[0].gateways.is_empty(), "{status:?}");
    let syn = tcp_packet(CI_IP, SERVER, 40000, 8080, 0x02);
    lab.net.send_from_tun(CI, &syn);

    // The gateway comes a moment later (it was starting too).
    let gw = lab
        .ca
        .node("gw-1", "100.64.0.30/10", &[], &["198.19.0.0/24"], 86_400);
    lab.net.add_node(&lab.ca, &gw, GW1);
    lab.net.node(GW1).0.set_policy(
        &gateway_policy(),
        vec!["198.19.0.0/24".parse().unwrap()],
        &[],
    );
    lab.net.run_for(Duration::from_secs(2));
    assert_eq!(
        lab.net.node(GW1).1,
        &vec![syn],
        "the SYN waited for the route list, then for gw-1's lookup, and went on"
    );
    let counters = lab.net.node(CI).0.status().node_counters;
    assert_eq!(counters.no_gateway_drops, 0, "{counters:?}");
}

#[test]
fn client_reaches_a_private_address_through_the_gateway_and_only_what_policy_allows() {
    let mut lab = gateway_lab(&[("gw-1", "100.64.0.30/10", GW1)]);
    let status = lab.net.node(CI).0.status();
    assert_eq!(status.routes.len(), 1);
    assert_eq!(
        status.routes[0].gateways,
        vec!["gw-1".to_string()],
        "{status:?}"
    );

    let syn = tcp_packet(CI_IP, SERVER, 40000, 8080, 0x02);
    lab.net.send_from_tun(CI, &syn);
    assert_eq!(
        lab.net.node(GW1).1,
        &vec![syn],
        "the SYN reaches the gateway's TUN (and so the private network)"
    );

    // The server's answer, forwarded back by the gateway's kernel.
    let syn_ack = tcp_packet(SERVER, CI_IP, 8080, 40000, 0x12);
    lab.net.send_from_tun(GW1, &syn_ack);
    assert_eq!(
        lab.net.node(CI).1,
        &vec![syn_ack],
        "the reply passes both firewalls (stateful)"
    );

    // Not allowed: another port, or a client outside group ci.
    lab.net.node(GW1).1.clear();
    lab.net
        .send_from_tun(CI, &tcp_packet(CI_IP, SERVER, 40001, 5432, 0x02));
    lab.net
        .send_from_tun(DEV, &tcp_packet(DEV_IP, SERVER, 40002, 8080, 0x02));
    lab.net.run_for(Duration::from_secs(1));
    assert!(lab.net.node(GW1).1.is_empty());
    let denied = lab.net.node(GW1).0.status().firewall.denied;
    assert_eq!(denied.get("inbound/default-deny"), Some(&2), "{denied:?}");

    // A spoofed inner source from the client is dropped at the gateway.
    lab.net.send_from_tun(
        CI,
        &tcp_packet(Ipv4Addr::new(100, 64, 0, 99), SERVER, 40003, 8080, 0x02),
    );
    assert!(lab.net.node(GW1).1.is_empty());
    assert_eq!(
        lab.net
            .node(GW1)
            .0
            .status()
            .mesh_counters
            .spoofed_source_drops,
        1
    );
}

#[test]
fn a_node_advertising_a_subnet_its_certificate_lacks_is_never_a_route() {
    let mut lab = gateway_lab(&[]);
    // A node whose certificate carries no subnets advertises 198.19.0.0/24
    // anyway (the real daemon refuses to start like this; the core does not check).
    let liar = lab.ca.node("liar", "100.64.0.40/10", &[], &[], 86_400);
    lab.net.add_node(&lab.ca, &liar, "198.18.0.40:4242");
    lab.net.node("198.18.0.40:4242").0.set_policy(
        &open_firewall(),
        vec!["198.19.0.0/24".parse().unwrap()],
        &[],
    );
    lab.net.run_for(Duration::from_secs(8));
    let now = lab.net.now;
    assert!(lab.net.lighthouse().status(now).counters.routes_refused > 0);
    let status = lab.net.node(CI).0.status();
    assert!(status.routes[0].gateways.is_empty(), "{status:?}");
    lab.net
        .send_from_tun(CI, &tcp_packet(CI_IP, SERVER, 40000, 8080, 0x02));
    // It waits for a gateway as long as a lookup would, then is dropped.
    lab.net.run_for(Duration::from_secs(16));
    assert!(lab.net.node("198.18.0.40:4242").1.is_empty());
    assert_eq!(
        lab.net.node(CI).0.status().node_counters.no_gateway_drops,
        1
    );
}

#[test]
fn traffic_fails_over_to_the_other_gateway_when_one_goes_away() {
    let mut lab = gateway_lab(&[
        ("gw-1", "100.64.0.30/10", GW1),
        ("gw-2", "100.64.0.31/10", GW2),
    ]);
    let syn = tcp_packet(CI_IP, SERVER, 40000, 8080, 0x02);
    lab.net.send_from_tun(CI, &syn);
    assert_eq!(lab.net.node(GW1).1.len(), 1, "gw-1 first (by name)");

    // Traffic the gateway's firewall drops gets no answer; that alone is no
    // reason to leave a gateway that answers its pings.
    for i in 0..24u16 {
        lab.net
            .send_from_tun(CI, &tcp_packet(CI_IP, SERVER, 42000 + i, 5432, 0x02));
        lab.net.run_for(Duration::from_millis(250));
    }
    let status = lab.net.node(CI).0.status();
    assert_eq!(
        status.routes[0].active.as_deref(),
        Some("gw-1"),
        "{status:?}"
    );
    assert_eq!(status.node_counters.gateway_failovers, 0);

    // gw-1 vanishes without a word (crash, cable). The client keeps polling.
    lab.net.hosts.remove(&addr(GW1));
    let mut reached = false;
    for i in 0..40u16 {
        lab.net
            .send_from_tun(CI, &tcp_packet(CI_IP, SERVER, 41000 + i, 8080, 0x02));
        lab.net.run_for(Duration::from_millis(250));
        if !lab.net.node(GW2).1.is_empty() {
            reached = true;
            break;
        }
    }
    assert!(reached, "traffic moved to gw-2 within 10 s");
    let status = lab.net.node(CI).0.status();
    assert_eq!(
        status.routes[0].active.as_deref(),
        Some("gw-2"),
        "{status:?}"
    );
}

fn net(s: &str) -> ipnet::Ipv4Net {
    s.parse().unwrap()
}

/// A gateway at `at` whose certificate carries `cert_subnets` and which
/// advertises `advertised`.
fn add_gateway(
    lab: &mut Lab,
    name: &str,
    ip: &str,
    at: &str,
    cert_subnets: &[&str],
    advertised: Vec<ipnet::Ipv4Net>,
) {
    let node = lab.ca.node(name, ip, &[], cert_subnets, 86_400);
    lab.net.add_node(&lab.ca, &node, at);
    lab.net
        .node(at)
        .0
        .set_policy(&gateway_policy(), advertised, &[]);
}

/// The routes a node learned: (subnet, gateway names).
fn learned(lab: &mut Lab, at: &str) -> BTreeMap<ipnet::Ipv4Net, Vec<String>> {
    lab.net
        .node(at)
        .0
        .status()
        .routes
        .into_iter()
        .map(|r| (r.subnet, r.gateways))
        .collect()
}

#[test]
fn a_gateway_advertising_many_small_subnets_does_not_take_another_gateways_route() {
    // gw-1 routes 198.19.0.0/24 (the clients' [[routes]]); gw-2 routes
    // 198.19.200.0/24; "greedy" holds 198.19.0.0/16 and advertises sixteen
    // /32s, which sort between the two.
    let mut lab = gateway_lab(&[("gw-1", "100.64.0.30/10", GW1)]);
    add_gateway(
        &mut lab,
        "gw-2",
        "100.64.0.31/10",
        GW2,
        &["198.19.200.0/24"],
        vec![net("198.19.200.0/24")],
    );
    let small: Vec<_> = (1..=16).map(|i| net(&format!("198.19.0.{i}/32"))).collect();
    add_gateway(
        &mut lab,
        "greedy",
        "100.64.0.32/10",
        "198.18.0.32:4242",
        &["198.19.0.0/16"],
        small.clone(),
    );
    lab.net.run_for(Duration::from_secs(8));
    let routes = learned(&mut lab, CI);
    assert_eq!(
        routes.get(&net("198.19.0.0/24")),
        Some(&vec!["gw-1".to_string()]),
        "{routes:?}"
    );
    assert_eq!(
        routes.get(&net("198.19.200.0/24")),
        Some(&vec!["gw-2".to_string()]),
        "{routes:?}"
    );
    for s in &small {
        assert_eq!(
            routes.get(s),
            Some(&vec!["greedy".to_string()]),
            "{routes:?}"
        );
    }
    assert_eq!(routes.len(), 18);
    // And gw-2's subnet is still reached through gw-2 (whose firewall
    // opens only 198.19.0.10, so it counts the packet as denied).
    let syn = tcp_packet(CI_IP, Ipv4Addr::new(198, 19, 200, 10), 40000, 8080, 0x02);
    lab.net.send_from_tun(CI, &syn);
    let denied = lab.net.node(GW2).0.status().firewall.denied;
    assert_eq!(denied.get("inbound/default-deny"), Some(&1), "{denied:?}");
}

#[test]
fn a_mesh_with_a_hundred_subnet_gateway_pairs_learns_every_one() {
    let mut lab = gateway_lab(&[]);
    // 25 gateways with four /24s each.
    for g in 0..25u8 {
        let subnets: Vec<String> = (0..4)
            .map(|k| format!("198.19.{}.0/24", 4 * g + k + 1))
            .collect();
        let refs: Vec<&str> = subnets.iter().map(String::as_str).collect();
        add_gateway(
            &mut lab,
            &format!("gw-{g}"),
            &format!("100.64.1.{g}/10"),
            &format!("198.18.1.{g}:4242"),
            &refs,
            subnets.iter().map(|s| net(s)).collect(),
        );
    }
    lab.net.run_for(Duration::from_secs(8));
    let routes = learned(&mut lab, CI);
    // The configured 198.19.0.0/24 (no gateway for it) and all 100.
    assert_eq!(routes.len(), 101, "{routes:?}");
    for g in 0..25u8 {
        for k in 0..4 {
            let s = net(&format!("198.19.{}.0/24", 4 * g + k + 1));
            assert_eq!(routes.get(&s), Some(&vec![format!("gw-{g}")]), "{s}");
        }
    }
}

#[test]
fn learned_routes_get_kernel_routes_only_when_accepted_and_verified_and_never_over_the_underlay() {
    let mut lab = gateway_lab(&[("gw-1", "100.64.0.30/10", GW1)]);
    // A gateway whose certificate covers the underlay (and the lighthouse's
    // 198.18.0.1) advertises it, and one a /25 inside the clients' subnet.
    add_gateway(
        &mut lab,
        "wide",
        "100.64.0.33/10",
        "198.18.0.33:4242",
        &["198.18.0.0/16"],
        vec![net("198.18.0.0/16")],
    );
    add_gateway(
        &mut lab,
        "gw-3",
        "100.64.0.34/10",
        "198.18.0.34:4242",
        &["198.19.7.0/24"],
        vec![net("198.19.7.0/24")],
    );
    let kernel_adds = |lab: &mut Lab, at: &str| {
        let mut adds = Vec::new();
        while let Some(e) = lab.net.node(at).0.poll_event() {
            if let NodeEvent::AddRoute(s) = e {
                adds.push(s);
            }
        }
        adds
    };
    // dev-1 accepts routes; ci-1 does not.
    lab.net.node(DEV).0.set_accept_routes(true);
    assert_eq!(
        kernel_adds(&mut lab, CI),
        vec![net("198.19.0.0/24")],
        "[[routes]] at start"
    );
    assert_eq!(kernel_adds(&mut lab, DEV), vec![net("198.19.0.0/24")]);
    lab.net.run_for(Duration::from_secs(8));
    assert!(
        kernel_adds(&mut lab, CI).is_empty(),
        "learned routes stay out of ci-1's kernel"
    );
    let dev = kernel_adds(&mut lab, DEV);
    assert_eq!(
        dev,
        vec![net("198.19.7.0/24")],
        "only the verified, harmless one"
    );
    let status = lab.net.node(DEV).0.status();
    let wide = status
        .routes
        .iter()
        .find(|r| r.subnet == net("198.18.0.0/16"))
        .unwrap();
    assert!(!wide.kernel_route);
    assert!(
        wide.refused
            .as_deref()
            .is_some_and(|w| w.contains("198.18.0.1")),
        "{wide:?}"
    );
}

// ---- NAT traversal and relays --------------------------------------------

const A_INSIDE: &str = "198.18.1.2:4242";
const B_INSIDE: &str = "198.18.2.2:4242";

/// A lighthouse on the open network and nodes a and b, each behind its own NAT
/// of `kind`.
fn nat_lab(kind_a: NatKind, kind_b: NatKind) -> Net {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    let nat_a = net.add_nat("198.18.0.2", kind_a);
    let nat_b = net.add_nat("198.18.0.3", kind_b);
    let a = ca.node("a", "100.64.0.5/10", &[], &[], 86_400);
    let b = ca.node("b", "100.64.0.6/10", &[], &[], 86_400);
    net.add_node_behind(&ca, &a, A_INSIDE, nat_a);
    net.add_node_behind(&ca, &b, B_INSIDE, nat_b);
    net.run_for(Duration::from_secs(1));
    assert!(net.registered(A_INSIDE) && net.registered(B_INSIDE));
    net
}

fn path_to(net: &mut Net, at: &str, ip: Ipv4Addr) -> Option<PathKind> {
    net.node(at)
        .0
        .status()
        .peers
        .iter()
        .find(|p| p.overlay_ip == ip)
        .map(|p| p.path)
}

/// Sends `count` packets a→b, one every `every`, and returns how many of
/// them b's TUN device got.
fn stream(net: &mut Net, count: usize, every: Duration) -> usize {
    net.node(B_INSIDE).1.clear();
    for i in 0..count {
        let p = build_udp_ipv4(A_IP, B_IP, 5000, 6000, format!("packet {i}").as_bytes());
        net.send_from_tun(A_INSIDE, &p);
        net.run_for(every);
    }
    let tun = net.node(B_INSIDE).1.clone();
    (0..count)
        .filter(|i| {
            let want = format!("packet {i}");
            tun.iter().any(|p| p.ends_with(want.as_bytes()))
        })
        .count()
}

#[test]
fn two_port_preserving_nats_punch_a_direct_path() {
    let mut net = nat_lab(NatKind::PortPreserving, NatKind::PortPreserving);
    let start = net.now;
    let first = build_udp_ipv4(A_IP, B_IP, 5000, 6000, b"hello through two NATs");
    net.send_from_tun(A_INSIDE, &first);
    let mut direct_after = None;
    for _ in 0..20 {
        net.run_for(Duration::from_millis(100));
        if path_to(&mut net, A_INSIDE, B_IP) == Some(PathKind::Direct)
            && path_to(&mut net, B_INSIDE, A_IP) == Some(PathKind::Direct)
        {
            direct_after = Some(net.now - start);
            break;
        }
    }
    let took = direct_after.expect("a direct path both ways within 2 s");
    assert!(took < Duration::from_secs(1), "direct after {took:?}");
    assert_eq!(
        net.node(B_INSIDE).1,
        &vec![first],
        "the first packet waited and arrived"
    );
    assert_eq!(stream(&mut net, 10, Duration::from_millis(50)), 10);
    let relay = net.relay_counters();
    assert_eq!(relay.forwarded_data, 0, "nothing relayed: {relay:?}");
}

#[test]
fn symmetric_nats_fall_back_to_the_relay_and_it_carries_only_wireguard() {
    let mut net = nat_lab(NatKind::Symmetric, NatKind::Symmetric);
    let start = net.now;
    let first = build_udp_ipv4(A_IP, B_IP, 5000, 6000, b"through the relay");
    net.send_from_tun(A_INSIDE, &first);
    let mut relayed_after = None;
    for _ in 0..50 {
        net.run_for(Duration::from_millis(100));
        if !net.node(B_INSIDE).1.is_empty() {
            relayed_after = Some(net.now - start);
            break;
        }
    }
    let took = relayed_after.expect("the packet arrives through the relay within 5 s");
    assert!(
        took <= Duration::from_millis(300),
        "through the relay from the first packet: {took:?}"
    );
    assert_eq!(net.node(B_INSIDE).1, &vec![first]);
    assert_eq!(path_to(&mut net, A_INSIDE, B_IP), Some(PathKind::Relayed));
    assert_eq!(path_to(&mut net, B_INSIDE, A_IP), Some(PathKind::Relayed));
    assert_eq!(stream(&mut net, 20, Duration::from_millis(50)), 20);
    // Punching goes on and never finds a path through two symmetric NATs.
    net.run_for(Duration::from_secs(12));
    assert_eq!(path_to(&mut net, A_INSIDE, B_IP), Some(PathKind::Relayed));
    // Long relayed, past every deadline the attempt once had, a node still
    // sleeps until its next timer: none in the past that would keep it
    // awake.
    net.run_for(Duration::from_secs(60));
    for at in [A_INSIDE, B_INSIDE] {
        let now = net.now;
        let next = net.node(at).0.poll_timeout(now);
        assert!(next > now, "{at} would wake at once, relayed for 72 s");
    }
    assert_eq!(path_to(&mut net, A_INSIDE, B_IP), Some(PathKind::Relayed));
    let relay = net.relay_counters();
    assert!(relay.forwarded_data >= 20, "{relay:?}");
    assert!(relay.forwarded_handshake_initiation >= 1 && relay.forwarded_handshake_response >= 1);
    assert_eq!(
        relay.refused_malformed, 0,
        "only WireGuard was offered: {relay:?}"
    );
}

#[test]
fn relayed_peer_moves_to_a_direct_path_when_one_opens_without_losing_the_flow() {
    let mut net = nat_lab(NatKind::PortPreserving, NatKind::PortPreserving);
    let (a, b) = ("198.18.0.2".parse().unwrap(), "198.18.0.3".parse().unwrap());
    net.blocked.push((a, b));
    net.send_from_tun(A_INSIDE, &build_udp_ipv4(A_IP, B_IP, 1, 2, b"first"));
    net.run_for(Duration::from_secs(3));
    assert_eq!(path_to(&mut net, A_INSIDE, B_IP), Some(PathKind::Relayed));
    assert_eq!(stream(&mut net, 10, Duration::from_millis(50)), 10);
    // The firewall between them opens: the background punching finds it.
    net.blocked.clear();
    assert_eq!(
        stream(&mut net, 140, Duration::from_millis(50)),
        140,
        "no packet lost while the path changes"
    );
    assert_eq!(path_to(&mut net, A_INSIDE, B_IP), Some(PathKind::Direct));
    assert_eq!(path_to(&mut net, B_INSIDE, A_IP), Some(PathKind::Direct));
}

#[test]
fn a_node_behind_nat_reaches_a_public_node_directly() {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    let nat = net.add_nat("198.18.0.2", NatKind::Symmetric);
    net.add_node_behind(
        &ca,
        &ca.node("a", "100.64.0.5/10", &[], &[], 86_400),
        A_INSIDE,
        nat,
    );
    net.add_node(&ca, &ca.node("b", "100.64.0.6/10", &[], &[], 86_400), B);
    net.run_for(Duration::from_secs(1));
    let p = build_udp_ipv4(A_IP, B_IP, 1, 2, b"out through one NAT");
    net.send_from_tun(A_INSIDE, &p);
    net.run_for(Duration::from_millis(500));
    assert_eq!(net.node(B).1, &vec![p]);
    assert_eq!(path_to(&mut net, A_INSIDE, B_IP), Some(PathKind::Direct));
    // And back, from the public node to the one behind the NAT.
    let back = build_udp_ipv4(B_IP, A_IP, 2, 1, b"and back in");
    net.send_from_tun(B, &back);
    assert_eq!(net.node(A_INSIDE).1, &vec![back]);
    // The relay carried the first packets (the session started both
    // ways at once), a handful, until the direct path was proven.
    let relayed = net.relay_counters().forwarded_data;
    assert!(relayed <= 4, "{relayed} data packets relayed");
}

#[test]
fn nat_rebinding_moves_the_session_to_the_new_address() {
    let mut net = nat_lab(NatKind::PortPreserving, NatKind::PortPreserving);
    assert_eq!(stream(&mut net, 5, Duration::from_millis(50)), 5);
    assert_eq!(path_to(&mut net, A_INSIDE, B_IP), Some(PathKind::Direct));
    // a's NAT forgets every mapping and hands out new ports: b's NAT now
    // refuses a's packets until b sends toward a's new address.
    net.nats[0].rebind();
    net.node(B_INSIDE).1.clear();
    let rebound = net.now;
    let mut back = None;
    for i in 0..100 {
        let p = build_udp_ipv4(A_IP, B_IP, 5000, 6000, format!("after {i}").as_bytes());
        net.send_from_tun(A_INSIDE, &p);
        net.run_for(Duration::from_millis(50));
        if !net.node(B_INSIDE).1.is_empty() {
            back = Some(net.now - rebound);
            break;
        }
    }
    let took = back.expect("packets flow again within 5 s");
    assert!(took <= Duration::from_secs(3), "resumed after {took:?}");
    assert_eq!(
        stream(&mut net, 20, Duration::from_millis(50)),
        20,
        "and keep flowing"
    );
    // Punching finds the new direct path in the background.
    net.run_for(Duration::from_secs(12));
    assert_eq!(path_to(&mut net, A_INSIDE, B_IP), Some(PathKind::Direct));
    assert_eq!(path_to(&mut net, B_INSIDE, A_IP), Some(PathKind::Direct));
    assert_eq!(stream(&mut net, 20, Duration::from_millis(50)), 20);
}

/// Two nodes behind symmetric NATs and a public node r with `[relay]`
/// (and the relay group): the lighthouse hands the pair to r, which
/// carries their traffic from the first packet; the lighthouse's own relay
/// carries none of their data. r relays only for the pair it was handed,
/// and a node without the group that offers is ignored.
#[test]
fn a_node_with_the_relay_group_relays_for_pairs_the_lighthouse_hands_it() {
    use tern_shared::cert::RELAY_GROUP;
    use tern_shared::wire::{RelayEnvelope, TYPE_RELAY_REQUEST};
    const R_AT: &str = "198.18.0.9:4242";
    const S_AT: &str = "198.18.0.10:4242";
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    // s offers too, without the group: never chosen.
    for (name, ip, groups, at) in [
        ("s", "100.64.0.10/10", &[][..], S_AT),
        ("r", "100.64.0.9/10", &[RELAY_GROUP][..], R_AT),
    ] {
        net.add_node(&ca, &ca.node(name, ip, groups, &[], 86_400), at);
        net.node(at).0.enable_relay(100_000);
    }
    let nat_a = net.add_nat("198.18.0.2", NatKind::Symmetric);
    let nat_b = net.add_nat("198.18.0.3", NatKind::Symmetric);
    net.add_node_behind(
        &ca,
        &ca.node("a", "100.64.0.5/10", &[], &[], 86_400),
        A_INSIDE,
        nat_a,
    );
    net.add_node_behind(
        &ca,
        &ca.node("b", "100.64.0.6/10", &[], &[], 86_400),
        B_INSIDE,
        nat_b,
    );
    net.run_for(Duration::from_secs(5));

    let start = net.now;
    let first = build_udp_ipv4(A_IP, B_IP, 5000, 6000, b"through the relay node");
    net.send_from_tun(A_INSIDE, &first);
    let mut arrived = None;
    for _ in 0..50 {
        net.run_for(Duration::from_millis(20));
        if !net.node(B_INSIDE).1.is_empty() {
            arrived = Some(net.now - start);
            break;
        }
    }
    let took = arrived.expect("the first packet arrives within 1 s");
    assert!(took <= Duration::from_millis(300), "{took:?}");
    assert_eq!(stream(&mut net, 50, Duration::from_millis(20)), 50);
    for (at, peer) in [(A_INSIDE, B_IP), (B_INSIDE, A_IP)] {
        let status = net.node(at).0.status();
        let p = status.peers.iter().find(|p| p.overlay_ip == peer).unwrap();
        assert_eq!(p.path, PathKind::Relayed, "{at}");
        assert_eq!(p.relay, Some(addr(R_AT)), "{at} goes through r");
    }
    let by_r = net.node(R_AT).0.status().relaying.unwrap();
    assert!(by_r.forwarded_data >= 50, "{by_r:?}");
    assert_eq!(
        net.node(S_AT).0.status().relaying.unwrap().forwarded_data,
        0
    );
    let lh = net.relay_counters();
    // The lighthouse's relay carries the first packets, until the pair's
    // sessions with r are up (a round trip), and nothing after.
    assert!(
        lh.forwarded_data <= 5,
        "the lighthouse carried the pair's data: {lh:?}"
    );
    let now = net.now;
    assert!(net.lighthouse().status(now).counters.relay_offers_refused > 0);

    // r goes away: within a few seconds both ask it, hear nothing, and go
    // back to the lighthouse's relay.
    for nat in ["198.18.0.2", "198.18.0.3"] {
        net.blocked
            .push((nat.parse().unwrap(), "198.18.0.9".parse().unwrap()));
    }
    let arrived = stream(&mut net, 100, Duration::from_millis(50));
    assert!(arrived >= 50, "{arrived} of 100 after r went away");
    // b answers (as a TCP receiver would): it finds r silent too.
    for i in 0..60 {
        let p = build_udp_ipv4(B_IP, A_IP, 6000, 5000, format!("ack {i}").as_bytes());
        net.send_from_tun(B_INSIDE, &p);
        net.run_for(Duration::from_millis(50));
    }
    for (at, peer) in [(A_INSIDE, B_IP), (B_INSIDE, A_IP)] {
        let status = net.node(at).0.status();
        let p = status.peers.iter().find(|p| p.overlay_ip == peer).unwrap();
        assert_eq!(
            p.relay,
            Some(addr(LH_ADDR)),
            "{at} is back on the lighthouse"
        );
    }
    assert_eq!(stream(&mut net, 20, Duration::from_millis(50)), 20);
    net.blocked.clear();

    // r forwards nothing from an address that is not the session of one of
    // the pair (a stranger, or a's NAT on another port).
    let refused_before = by_r.refused_unregistered_sender + by_r.refused_not_introduced;
    let stray = RelayEnvelope {
        peer: B_IP,
        message: &[
            4, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
        ],
    }
    .encode(TYPE_RELAY_REQUEST);
    let mut out = vec![0u8; 2048];
    for from in ["198.18.0.2:1", "198.18.0.77:4242"] {
        net.node(R_AT)
            .0
            .handle_datagram(addr(from), &stray, &mut out, now);
    }
    let by_r = net.node(R_AT).0.status().relaying.unwrap();
    assert_eq!(
        by_r.refused_unregistered_sender + by_r.refused_not_introduced,
        refused_before + 2,
        "{by_r:?}"
    );
}

#[test]
fn the_relay_refuses_strangers_unintroduced_pairs_and_non_wireguard() {
    use tern_shared::wire::{RelayEnvelope, TYPE_RELAY_REQUEST};
    let mut net = nat_lab(NatKind::PortPreserving, NatKind::PortPreserving);
    let data = RelayEnvelope {
        peer: B_IP,
        message: &[
            4, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
        ],
    }
    .encode(TYPE_RELAY_REQUEST);
    let lh = addr(LH_ADDR);
    let now = net.now;
    // From an address no node registered from.
    net.lighthouse()
        .handle_datagram(addr("198.18.0.99:4242"), &data, now);
    // From a's registered address, but a and b were never introduced.
    net.lighthouse()
        .handle_datagram(addr("198.18.0.2:4242"), &data, now);
    // A hello in a relay envelope.
    let mut hello = data.clone();
    hello[5] = 0x10;
    net.lighthouse()
        .handle_datagram(addr("198.18.0.2:4242"), &hello, now);
    // Garbage.
    for junk in [&[0x11u8][..], &[0x11, 1, 2], &[0x11, 100, 64, 0, 6]] {
        net.lighthouse()
            .handle_datagram(addr("198.18.0.2:4242"), junk, now);
    }
    let relay = net.lighthouse().status(now).relay;
    assert_eq!(relay.refused_unregistered_sender, 1, "{relay:?}");
    assert_eq!(relay.refused_not_introduced, 1, "{relay:?}");
    assert_eq!(relay.refused_malformed, 4, "{relay:?}");
    assert_eq!(relay.forwarded_data, 0);
    assert!(
        net.lighthouse().poll_transmit().is_none(),
        "nothing forwarded to {lh}"
    );
}

#[test]
fn runners_are_found_by_label_least_busy_first_and_only_from_runner_certificates() {
    use tern_shared::cert::RUNNER_GROUP;
    use tern_shared::control::{RunnerLoad, RunnerSelector};
    const R1: &str = "198.18.0.7:4242";
    const R2: &str = "198.18.0.8:4242";
    const FAKE: &str = "198.18.0.9:4242";
    let mut lab = lab();
    let ca = &lab.ca;
    let r1 = ca.node("r1", "100.64.0.7/10", &[RUNNER_GROUP], &[], 86_400);
    let r2 = ca.node("r2", "100.64.0.8/10", &[RUNNER_GROUP], &[], 86_400);
    let fake = ca.node("fake", "100.64.0.9/10", &["ci"], &[], 86_400);
    lab.net.add_node(ca, &r1, R1);
    lab.net.add_node(ca, &r2, R2);
    lab.net.add_node(ca, &fake, FAKE);
    lab.net.run_for(Duration::from_secs(1));
    let load = |running, queued| RunnerLoad {
        running,
        queued,
        concurrency: 2,
    };
    let now = lab.net.now;
    let labels = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    lab.net
        .node(R1)
        .0
        .set_runner(labels(&["linux"]), load(2, 0), now);
    lab.net
        .node(R2)
        .0
        .set_runner(labels(&["linux", "gpu"]), load(1, 0), now);
    lab.net
        .node(FAKE)
        .0
        .set_runner(labels(&["linux", "gpu"]), load(0, 0), now);
    lab.net.run_for(Duration::from_millis(100));

    let find = |net: &mut Net, selector: RunnerSelector| {
        let now = net.now;
        let id = net.node(A).0.find_runners(selector, now).unwrap();
        net.run_for(Duration::from_millis(100));
        let result = std::iter::from_fn(|| net.node(A).0.poll_event())
            .find_map(|e| match e {
                NodeEvent::Runners(r) => Some(r),
                _ => None,
            })
            .expect("answered");
        assert_eq!(result.id, id);
        assert_eq!((result.asked, result.answered), (1, 1));
        result
            .runners
            .into_iter()
            .map(|r| r.name)
            .collect::<Vec<_>>()
    };
    // The fake (no runner group) is never listed, however idle it claims to be.
    assert_eq!(
        find(&mut lab.net, RunnerSelector::Label("linux".into())),
        ["r2", "r1"]
    );
    assert_eq!(
        find(&mut lab.net, RunnerSelector::Label("gpu".into())),
        ["r2"]
    );
    // Load changes reach the lighthouse at once and reorder the answer.
    let now = lab.net.now;
    lab.net.node(R2).0.set_runner_load(load(2, 3), now);
    lab.net.node(R1).0.set_runner_load(load(0, 0), now);
    lab.net.run_for(Duration::from_millis(100));
    assert_eq!(
        find(&mut lab.net, RunnerSelector::Label("linux".into())),
        ["r1", "r2"]
    );
    // By name: any registered node, runner or not.
    assert_eq!(find(&mut lab.net, RunnerSelector::Name("b".into())), ["b"]);
    assert!(find(&mut lab.net, RunnerSelector::Label("arm".into())).is_empty());
    let now = lab.net.now;
    let refused = lab
        .net
        .lighthouse()
        .status(now)
        .counters
        .runner_adverts_refused;
    assert!(refused >= 1, "the fake's adverts were refused");
}

#[test]
fn a_node_issued_by_an_issuer_meets_peers_and_forged_ones_are_refused() {
    const JOB: &str = "198.18.0.7:4242";
    let mut lab = lab();
    let issuer = lab
        .ca
        .issuer("lh-issuer", "100.64.100.0/24", &["ci"], "ci-", 3600);
    let job = issuer.node("ci-job-1", "100.64.100.5/10", &["ci"], 1800);
    let ca = &lab.ca;
    lab.net.add_node(ca, &job, JOB);
    lab.net.run_for(Duration::from_secs(2));
    assert!(lab.net.registered(JOB), "the issued node registers");
    let job_ip = Ipv4Addr::new(100, 64, 100, 5);
    let hello = build_udp_ipv4(job_ip, B_IP, 5000, 6000, b"from a CI job");
    lab.net.send_from_tun(JOB, &hello);
    assert_eq!(
        lab.net.node(B).1,
        &vec![hello],
        "b accepts the issued identity, trusting only the root"
    );
    // Signed with the issuer's key but outside its constraints: what a
    // stolen issuer key could make. The pool every node and lighthouse
    // verifies peers with refuses each one (a node cannot even start with
    // one: its own certificate is verified the same way).
    let pool = lab.ca.pool();
    for (forged, why) in [
        (
            issuer.forge("prod-db", "100.64.100.6/10", &["ci"], 1800),
            "does not start with",
        ),
        (
            issuer.forge("ci-x", "100.64.0.9/10", &["ci"], 1800),
            "outside its pool",
        ),
        (
            issuer.forge("ci-y", "100.64.100.7/10", &["lighthouse"], 1800),
            "not among its groups",
        ),
        (
            issuer.forge("ci-z", "100.64.100.8/10", &["ci"], 7200),
            "longer than its maximum",
        ),
    ] {
        let err = pool
            .verify_bytes(&forged.cert.encode(), TEST_NOW)
            .expect_err("forged");
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
}

#[test]
fn a_revocation_is_pushed_to_every_node_and_ends_sessions_with_that_certificate_at_once() {
    const JOB: &str = "198.18.0.7:4242";
    const LATE: &str = "198.18.0.8:4242";
    let mut lab = lab();
    let issuer = lab
        .ca
        .issuer("lh-issuer", "100.64.100.0/24", &["ci"], "ci-", 3600);
    let job = issuer.node("ci-job-1", "100.64.100.5/10", &["ci"], 1800);
    let ca = &lab.ca;
    lab.net.add_node(ca, &job, JOB);
    lab.net.run_for(Duration::from_secs(2));
    let job_ip = Ipv4Addr::new(100, 64, 100, 5);
    let now = lab.net.now;
    let status = lab.net.lighthouse().status(now);
    let listed = status
        .nodes
        .iter()
        .find(|n| n.overlay_ip == job_ip)
        .unwrap();
    assert!(listed.ephemeral, "an issued node is marked ephemeral");
    assert_eq!(listed.issued_by.as_deref(), Some("lh-issuer"));
    assert!(
        !status
            .nodes
            .iter()
            .find(|n| n.overlay_ip == B_IP)
            .unwrap()
            .ephemeral
    );

    let hello = build_udp_ipv4(job_ip, B_IP, 5000, 6000, b"before");
    lab.net.send_from_tun(JOB, &hello);
    assert_eq!(lab.net.node(B).1, &vec![hello], "a session is up");
    lab.net.node(B).1.clear();

    // The store's list, as `tern-lighthouse revoke ci-job-1` leaves it.
    let revocation = tern_shared::control::Revocation {
        fingerprint: job.cert.fingerprint(),
        not_after: job.cert.body.not_after,
    };
    let now = lab.net.now;
    lab.net
        .lighthouse()
        .set_revocations(vec![(1, revocation)], now);
    lab.net.settle();
    // Pushed: b has torn the session down before any timer ran.
    let b_status = lab.net.node(B).0.status();
    assert_eq!(b_status.revoked_certs, 1);
    assert!(
        b_status.peers.iter().all(|p| p.name != "ci-job-1"),
        "{:?}",
        b_status.peers
    );
    assert!(!lab.net.registered(JOB) || lab.net.lighthouse().registry().lookup(job_ip).is_none());
    // The job cannot get back in: b refuses it, the lighthouse forgets it.
    let after = build_udp_ipv4(job_ip, B_IP, 5000, 6000, b"after");
    lab.net.send_from_tun(JOB, &after);
    lab.net.run_for(Duration::from_secs(5));
    assert!(
        lab.net.node(B).1.is_empty(),
        "nothing from the revoked job reaches b"
    );
    assert!(lab.net.lighthouse().registry().lookup(job_ip).is_none());
    // A node that joins later learns the list when it registers.
    let late = lab.ca.node("late", "100.64.0.8/10", &[], &[], 86_400);
    let ca = &lab.ca;
    lab.net.add_node(ca, &late, LATE);
    lab.net.run_for(Duration::from_secs(2));
    assert_eq!(lab.net.node(LATE).0.status().revoked_certs, 1);
    assert_eq!(lab.net.lighthouse().status(now).revocations_version, 1);
}

#[test]
fn a_node_asks_the_gateway_whether_policy_lets_it_in_and_gets_the_gateways_own_verdict() {
    let mut lab = gateway_lab(&[("gw-1", "100.64.0.30/10", GW1)]);
    // The session with the gateway comes with the first packet.
    lab.net
        .send_from_tun(CI, &tcp_packet(CI_IP, SERVER, 40000, 8080, 0x02));
    lab.net
        .send_from_tun(DEV, &tcp_packet(DEV_IP, SERVER, 40000, 8080, 0x02));
    let denied_before = lab.net.node(GW1).0.status().firewall.denied;
    let ask = |lab: &mut Lab, at: &str, port: u16| {
        let now = lab.net.now;
        let id = lab.net.node(at).0.ask_policy(SERVER, port, now).unwrap();
        lab.net.settle();
        let result = std::iter::from_fn(|| lab.net.node(at).0.poll_event())
            .find_map(|e| match e {
                NodeEvent::Policy(r) => Some(r),
                _ => None,
            })
            .expect("an answer");
        assert_eq!(result.id, id);
        assert_eq!(result.asked.as_deref(), Some("gw-1"));
        result.answer.expect("answered")
    };
    assert!(ask(&mut lab, CI, 8080).allowed);
    let no = ask(&mut lab, CI, 5432);
    assert!(!no.allowed && no.reason.contains("default-deny"), "{no:?}");
    let dev = ask(&mut lab, DEV, 8080);
    assert!(!dev.allowed, "dev-1 is not in group ci: {dev:?}");
    // Asking moved none of the gateway's counters.
    assert_eq!(lab.net.node(GW1).0.status().firewall.denied, denied_before);
    // An address no gateway routes cannot be asked about.
    let now = lab.net.now;
    assert!(lab
        .net
        .node(CI)
        .0
        .ask_policy(Ipv4Addr::new(198, 18, 9, 9), 80, now)
        .is_err());
}
