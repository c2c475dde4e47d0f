//! Hostile peers with valid certificates, on the simulated network over
//! the real cores: a node of the mesh sends the lighthouse and another node
//! garbage, truncated and oversized control messages, messages only a
//! lighthouse sends, and a flood of lookups for random addresses. Each is
//! counted and dropped; the honest nodes keep exchanging packets all along,
//! and the lighthouse keeps them registered. (RELIABILITY.md)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use tern_shared::cert::LIGHTHOUSE_GROUP;
use tern_shared::control::{ControlMessage, CONTROL_PORT};
use tern_shared::packet::build_udp_ipv4;
use tern_shared::testing::TestCa;

mod simnet;
use simnet::*;

const A: &str = "198.18.0.2:4242";
const B: &str = "198.18.0.3:4242";
const H: &str = "198.18.0.4:4242";
const LH_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const A_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 5);
const B_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 6);
const H_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 66);

/// A seeded generator, so that a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.next() as usize) % (max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The control messages the hostile node sends, by kind: garbage of any
/// length, valid messages cut short, messages padded past their end,
/// messages only a lighthouse sends, and lookups of random addresses.
fn hostile_payload(rng: &mut Rng, i: usize) -> Vec<u8> {
    let valid = ControlMessage::Query {
        id: i as u32,
        overlay_ip: Ipv4Addr::from(0x6440_0000 | (rng.next() as u32 & 0x003f_ffff)),
    }
    .encode()
    .unwrap();
    match i % 5 {
        0 => rng.bytes(1300),
        1 => valid[..(rng.next() as usize) % valid.len()].to_vec(),
        2 => {
            let mut long = valid.clone();
            long.extend(rng.bytes(1200));
            long
        }
        3 => ControlMessage::RegisterAck {
            id: i as u32,
            observed: "198.18.0.99:1".parse().unwrap(),
            relay: true,
            revocations: u32::MAX,
        }
        .encode()
        .unwrap(),
        _ => valid,
    }
}

/// A lighthouse, honest nodes a and b, and h, whose certificate is as
/// valid as theirs; `relayed`: a and b cannot reach each other directly.
fn mesh_with_hostile_node(relayed: bool) -> Net {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    net.add_node(&ca, &ca.node("a", "100.64.0.5/10", &[], &[], 86_400), A);
    net.add_node(&ca, &ca.node("b", "100.64.0.6/10", &[], &[], 86_400), B);
    net.add_node(&ca, &ca.node("h", "100.64.0.66/10", &[], &[], 86_400), H);
    if relayed {
        net.blocked
            .push(("198.18.0.2".parse().unwrap(), "198.18.0.3".parse().unwrap()));
    }
    net.run_for(Duration::from_secs(1));
    net
}

#[test]
fn a_peer_with_a_valid_certificate_sending_garbage_is_counted_and_dropped() {
    let mut net = mesh_with_hostile_node(false);

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let rounds = 40;
    let per_round = 100;
    let (mut to_lighthouse, mut to_node) = (0u64, 0u64);
    // What the lighthouse must refuse: all but the well-formed lookups.
    let mut unusable = 0u64;
    for round in 0..rounds {
        for i in 0..per_round {
            let n = round * per_round + i;
            let payload = hostile_payload(&mut rng, n);
            // Most at the lighthouse, every tenth at node a.
            let (dst, count) = if n % 10 == 9 {
                (A_IP, &mut to_node)
            } else {
                (LH_IP, &mut to_lighthouse)
            };
            *count += 1;
            if dst == LH_IP && n % 5 != 4 {
                unusable += 1;
            }
            let packet = build_udp_ipv4(H_IP, dst, 40_000, CONTROL_PORT, &payload);
            net.send_from_tun(H, &packet);
        }
        // The honest pair, both ways, every round.
        let ab = build_udp_ipv4(A_IP, B_IP, 5000, 6000, format!("a{round}").as_bytes());
        net.send_from_tun(A, &ab);
        let ba = build_udp_ipv4(B_IP, A_IP, 6000, 5000, format!("b{round}").as_bytes());
        net.send_from_tun(B, &ba);
        net.run_for(Duration::from_millis(250));
        assert_eq!(
            net.node(B).1.pop().as_deref(),
            Some(ab.as_slice()),
            "round {round}: a's packet reached b"
        );
        assert_eq!(
            net.node(A).1.pop().as_deref(),
            Some(ba.as_slice()),
            "round {round}: b's packet reached a"
        );
    }

    // The lighthouse counted what it could not use and kept the honest
    // nodes; the lookups for random addresses were answered "unknown".
    let now = net.now;
    let status = net.lighthouse().status(now);
    let c = &status.counters;
    let refused = c.bad_control_messages + c.non_control_drops;
    assert_eq!(
        refused, unusable,
        "every garbage, cut, padded or misdirected message counted: {c:?}"
    );
    assert_eq!(
        c.queries_unanswered,
        to_lighthouse - unusable,
        "every lookup of a random address answered unknown: {c:?}"
    );
    let names: Vec<String> = status.nodes.iter().map(|n| n.name.clone()).collect();
    for name in ["a", "b", "h"] {
        assert!(
            names.contains(&name.to_string()),
            "{name} still registered: {names:?}"
        );
    }
    // Node a counted what h sent it and answered none of it as a
    // lighthouse's word (its revocation list and relay are as before).
    let a = net.node(A).0.status();
    assert_eq!(
        a.node_counters.bad_control_messages, to_node,
        "a node refuses lookups (it is no lighthouse): {:?}",
        a.node_counters
    );
    assert!(!a.revoked);
    assert_eq!(a.revoked_certs, 0);
    assert!(net.registered(A) && net.registered(B));
    eprintln!(
        "sent the lighthouse {to_lighthouse} and node a {to_node} hostile messages; \
         the lighthouse refused {refused}, answered {} lookups unknown; a refused {}",
        c.queries_unanswered, a.node_counters.bad_control_messages
    );
}

/// Every datagram on the network delivered twice and shuffled (an on-path
/// attacker replaying relayed envelopes and WireGuard messages, the
/// lighthouse's relay forwarding each copy): each packet still reaches its
/// node exactly once. Then a lookup flood at full rate from a peer with a
/// valid certificate: the honest pair goes on.
#[test]
fn replayed_datagrams_deliver_once_and_a_lookup_flood_changes_nothing_for_others() {
    // a and b cannot reach each other directly: the lighthouse relays.
    let mut net = mesh_with_hostile_node(true);
    let first = build_udp_ipv4(A_IP, B_IP, 5000, 6000, b"first");
    net.send_from_tun(A, &first);
    net.run_for(Duration::from_secs(3));
    net.node(B).1.clear();

    net.faults.duplicate_per_mille = 1000;
    net.faults.reorder = true;
    net.faults.seed = 0x0bad_5eed;
    let mut sent = Vec::new();
    for i in 0..200u32 {
        let p = build_udp_ipv4(A_IP, B_IP, 5000, 6000, &i.to_be_bytes());
        net.send_from_tun(A, &p);
        sent.push(p);
        net.run_for(Duration::from_millis(10));
    }
    net.run_for(Duration::from_secs(1));
    let got = std::mem::take(net.node(B).1);
    let relayed = net.relay_counters().forwarded_data;
    assert!(net.faults.duplicated > 200, "{}", net.faults.duplicated);
    assert!(relayed >= 200, "through the lighthouse's relay: {relayed}");
    let mut got_sorted = got.clone();
    got_sorted.sort();
    let mut sent_sorted = sent.clone();
    sent_sorted.sort();
    assert_eq!(
        got_sorted.len(),
        sent_sorted.len(),
        "each packet once, not its copies"
    );
    assert_eq!(got_sorted, sent_sorted);
    net.faults.duplicate_per_mille = 0;
    net.faults.reorder = false;

    // h asks the lighthouse for 20,000 random addresses at once.
    let mut rng = Rng(0xf100d);
    for i in 0..20_000u32 {
        let q = ControlMessage::Query {
            id: i,
            overlay_ip: Ipv4Addr::from(0x6440_0000 | (rng.next() as u32 & 0x003f_ffff)),
        }
        .encode()
        .unwrap();
        let packet = build_udp_ipv4(H_IP, LH_IP, 40_000, CONTROL_PORT, &q);
        net.send_from_tun(H, &packet);
    }
    net.run_for(Duration::from_secs(1));
    for i in 0..20u32 {
        let p = build_udp_ipv4(A_IP, B_IP, 5000, 6000, format!("after {i}").as_bytes());
        net.send_from_tun(A, &p);
        net.run_for(Duration::from_millis(50));
        assert_eq!(
            net.node(B).1.pop().as_deref(),
            Some(p.as_slice()),
            "after the flood, packet {i}"
        );
    }
    let now = net.now;
    let lh = net.lighthouse().status(now);
    eprintln!(
        "200 packets relayed with every datagram doubled and shuffled ({} copies): {} delivered once each; \
         after 20,000 lookups from h ({} answered unknown), the pair's 20 packets all arrived",
        net.faults.duplicated,
        got.len(),
        lh.counters.queries_unanswered
    );
    assert!(net.registered(A) && net.registered(B));
}
