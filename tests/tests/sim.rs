//! Deterministic multi-node simulation over the sans-IO cores: a lighthouse
//! and nodes on a simulated network, one clock advanced by hand. No sockets,
//! no root, milliseconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tern_lighthouse::proto::lighthouse::LighthouseCore;
use tern_lighthouse::proto::registry::Registry;
use tern_node::proto::node::{LighthouseTarget, NodeCore};
use tern_shared::cert::LIGHTHOUSE_GROUP;
use tern_shared::mesh::{Mesh, MeshSettings, TIMER_TICK};
use tern_shared::packet::build_udp_ipv4;
use tern_shared::testing::{open_firewall, TestCa, TestNode, TEST_NOW};

const LH_ADDR: &str = "198.18.0.1:4242";

enum Host {
    Node {
        core: Box<NodeCore>,
        tun: Vec<Vec<u8>>,
    },
    Lighthouse(Box<LighthouseCore>),
}

struct Net {
    hosts: BTreeMap<SocketAddr, Host>,
    now: Instant,
    /// Datagrams delivered, by first byte, for assertions.
    delivered: usize,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

impl Net {
    fn new() -> Net {
        Net {
            hosts: BTreeMap::new(),
            now: Instant::now(),
            delivered: 0,
        }
    }

    fn add_lighthouse(&mut self, ca: &TestCa, node: &TestNode) {
        self.add_lighthouse_at(ca, node, LH_ADDR);
    }

    fn add_lighthouse_at(&mut self, ca: &TestCa, node: &TestNode, at: &str) {
        let pool = ca.pool();
        let cert = node.verified(&pool);
        let mesh = Mesh::new(
            node.key.static_secret(),
            &cert,
            pool,
            MeshSettings {
                keepalive: None,
                ..MeshSettings::default()
            },
            self.now,
            TEST_NOW,
        );
        let core = LighthouseCore::new(
            mesh,
            &cert,
            Registry::new(Duration::from_secs(30), 1000),
            self.now,
        );
        self.hosts
            .insert(addr(at), Host::Lighthouse(Box::new(core)));
    }

    fn add_node(&mut self, ca: &TestCa, node: &TestNode, at: &str) {
        self.add_node_with(ca, node, at, &[LH_ADDR]);
    }

    fn add_node_with(&mut self, ca: &TestCa, node: &TestNode, at: &str, lighthouses: &[&str]) {
        let pool = ca.pool();
        let cert = node.verified(&pool);
        let mesh = Mesh::new(
            node.key.static_secret(),
            &cert,
            pool,
            MeshSettings::default(),
            self.now,
            TEST_NOW,
        );
        let targets = lighthouses
            .iter()
            .map(|l| LighthouseTarget {
                endpoint: addr(l),
                name: None,
            })
            .collect();
        let mut core = NodeCore::new(mesh, &cert, targets, self.now);
        core.set_local_endpoints(vec![addr(at)]);
        core.set_policy(&open_firewall(), vec![], &[]);
        self.hosts.insert(
            addr(at),
            Host::Node {
                core: Box::new(core),
                tun: Vec::new(),
            },
        );
    }

    /// Delivers every queued datagram until the network is quiet.
    fn settle(&mut self) {
        let mut buf = vec![0u8; 65_536];
        for _ in 0..200 {
            let mut queue = Vec::new();
            for (from, host) in self.hosts.iter_mut() {
                let mut next = || match host {
                    Host::Node { core, .. } => core.poll_transmit(),
                    Host::Lighthouse(core) => core.poll_transmit(),
                };
                while let Some(t) = next() {
                    queue.push((*from, t));
                }
            }
            if queue.is_empty() {
                return;
            }
            for (from, t) in queue {
                self.delivered += 1;
                match self.hosts.get_mut(&t.dst) {
                    Some(Host::Node { core, tun }) => {
                        if let Some(p) = core.handle_datagram(from, &t.payload, &mut buf, self.now)
                        {
                            tun.push(p.to_vec());
                        }
                    }
                    Some(Host::Lighthouse(core)) => {
                        core.handle_datagram(from, &t.payload, self.now)
                    }
                    None => {}
                }
            }
        }
        panic!("network did not settle");
    }

    /// Advances the clock in timer ticks, running every host's timers.
    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += TIMER_TICK;
            for host in self.hosts.values_mut() {
                match host {
                    Host::Node { core, .. } => core.handle_timeout(self.now),
                    Host::Lighthouse(core) => core.handle_timeout(self.now),
                }
            }
            self.settle();
        }
    }

    fn node(&mut self, at: &str) -> (&mut NodeCore, &mut Vec<Vec<u8>>) {
        match self.hosts.get_mut(&addr(at)) {
            Some(Host::Node { core, tun }) => (core, tun),
            _ => panic!("no node at {at}"),
        }
    }

    fn lighthouse(&mut self) -> &mut LighthouseCore {
        self.lighthouse_at(LH_ADDR)
    }

    fn lighthouse_at(&mut self, at: &str) -> &mut LighthouseCore {
        match self.hosts.get_mut(&addr(at)) {
            Some(Host::Lighthouse(core)) => core,
            _ => panic!("no lighthouse"),
        }
    }

    /// A packet written to `at`'s TUN device.
    fn send_from_tun(&mut self, at: &str, packet: &[u8]) {
        let now = self.now;
        let mut out = vec![0u8; 65_536];
        let from = addr(at);
        let (core, _) = self.node(at);
        let sent = core
            .handle_tun_packet(packet, &mut out, now)
            .map(|(dst, b)| (dst, b.to_vec()));
        if let Some((dst, bytes)) = sent {
            let mut buf = vec![0u8; 65_536];
            if let Some(Host::Node { core, tun }) = self.hosts.get_mut(&dst) {
                if let Some(p) = core.handle_datagram(from, &bytes, &mut buf, now) {
                    tun.push(p.to_vec());
                }
            }
        }
        self.settle();
    }

    fn registered(&mut self, at: &str) -> bool {
        self.node(at)
            .0
            .status()
            .lighthouses
            .iter()
            .all(|l| l.registered)
    }
}

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

#[test]
fn unknown_address_times_out_and_waiting_packets_are_dropped() {
    let mut lab = lab();
    lab.net.send_from_tun(
        A,
        &build_udp_ipv4(A_IP, Ipv4Addr::new(100, 64, 9, 9), 1, 2, b"nobody"),
    );
    lab.net.run_for(Duration::from_secs(16));
    let status = lab.net.node(A).0.status();
    assert_eq!(status.node_counters.lookup_timeouts, 1);
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
    net.run_for(Duration::from_secs(4));
    Lab { net, ca }
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
