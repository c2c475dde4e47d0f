//! A node that starts (or restarts) knows no revocation until a lighthouse
//! tells it: until then it holds every session with another node, so that a
//! peer revoked while it was away cannot get in (the model found a
//! restarted node taking a revoked peer's retried handshake before its
//! first registration). What it held is checked against the list as it
//! came: a peer revoked meanwhile never gets in, a good peer gets in the
//! moment the list is in, with no WireGuard retry. (The sequence the model
//! found is `modelsim`'s
//! `a_node_started_after_a_revocation_never_takes_the_revoked_peer`; here
//! boringtun's timers run on the real clock, so a peer handshakes anew only
//! when it is new.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use tern_shared::cert::LIGHTHOUSE_GROUP;
use tern_shared::control::Revocation;
use tern_shared::packet::build_udp_ipv4;
use tern_shared::testing::{TestCa, TestNode};

mod simnet;
use simnet::*;

const A: &str = "198.18.0.2:4242";
const B: &str = "198.18.0.3:4242";
const J: &str = "198.18.0.4:4242";
const A_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 5);
const B_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 6);
const J_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 7);
const C: &str = "198.18.0.5:4242";
const C_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 8);

struct Lab {
    net: Net,
    ca: TestCa,
    b: TestNode,
    j: TestNode,
}

/// A lighthouse and three nodes; `a` and `j` each have a session with `b`.
fn lab() -> Lab {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let lighthouse = ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400);
    let (a, b, j) = (
        ca.node("a", "100.64.0.5/10", &["ci"], &[], 86_400),
        ca.node("b", "100.64.0.6/10", &["ci"], &[], 86_400),
        ca.node("j", "100.64.0.7/10", &["ci"], &[], 86_400),
    );
    let mut net = Net::new();
    net.add_lighthouse(&ca, &lighthouse);
    for (node, at) in [(&a, A), (&b, B), (&j, J)] {
        net.add_node(&ca, node, at);
    }
    net.run_for(Duration::from_secs(1));
    for (at, src) in [(A, A_IP), (J, J_IP)] {
        let p = build_udp_ipv4(src, B_IP, 5000, 6000, b"hi");
        net.send_from_tun(at, &p);
        assert_eq!(net.node(B).1, &vec![p], "a session is up");
        net.node(B).1.clear();
    }
    Lab { net, ca, b, j }
}

/// `count` revocations at the lighthouse, `j`'s last: a list of several
/// pages.
fn revoke_j_after(lab: &mut Lab, count: u32) {
    let mut list: Vec<(u32, Revocation)> = (1..count)
        .map(|v| {
            let mut fingerprint = [0u8; 32];
            fingerprint[..4].copy_from_slice(&v.to_be_bytes());
            (
                v,
                Revocation {
                    fingerprint: tern_shared::cert::Fingerprint(fingerprint),
                    not_after: lab.j.cert.body.not_after,
                },
            )
        })
        .collect();
    list.push((
        count,
        Revocation {
            fingerprint: lab.j.cert.fingerprint(),
            not_after: lab.j.cert.body.not_after,
        },
    ));
    let now = lab.net.now;
    lab.net.lighthouse().set_revocations(list, now);
    lab.net.settle();
}

/// `b` gone without a word and started again (same key and certificate).
fn restart_b(lab: &mut Lab) {
    lab.net.hosts.remove(&addr(B));
    let ca = &lab.ca;
    lab.net.add_node(ca, &lab.b, B);
}

/// `b` restarted without a way to its lighthouse; a new node `c` at `C`
/// (certificate `c`) has found it through the lighthouse (b's old
/// registration) and sent it a packet, whose handshake b holds.
fn c_waits_on_a_held_b(lab: &mut Lab, c: &TestNode) -> Vec<u8> {
    let (b_ip, lh_ip) = (ip4(addr(B)), ip4(addr(LH_ADDR)));
    lab.net.blocked.push((b_ip, lh_ip));
    restart_b(lab);
    let ca = &lab.ca;
    lab.net.add_node(ca, c, C);
    lab.net.run_for(Duration::from_secs(1));
    let p = build_udp_ipv4(C_IP, B_IP, 5000, 6000, b"held");
    lab.net.send_from_tun(C, &p);
    lab.net.run_for(Duration::from_secs(10));
    assert!(lab.net.node(B).1.is_empty(), "held while no list came");
    let status = lab.net.node(B).0.status();
    assert!(status.awaiting_revocations);
    assert!(status.mesh_counters.held_handshakes >= 1);
    assert!(status
        .peers
        .iter()
        .all(|p| p.name != "c" || p.last_handshake_secs.is_none()));
    p
}

/// The way to the lighthouse opens; steps until b has the whole list.
/// Whether `p` reached b by then.
fn b_gets_the_list(lab: &mut Lab, p: &[u8]) -> bool {
    lab.net.blocked.clear();
    let mut got = false;
    for _ in 0..200 {
        lab.net.run_for(Duration::from_millis(250));
        let waiting = lab.net.node(B).0.status().awaiting_revocations;
        got = lab.net.node(B).1.iter().any(|q| q == p);
        if !waiting {
            break;
        }
    }
    assert!(!lab.net.node(B).0.status().awaiting_revocations);
    got
}

#[test]
fn a_handshake_held_from_a_peer_revoked_meanwhile_is_never_answered() {
    let mut lab = lab();
    let c = lab.ca.node("c", "100.64.0.8/10", &["ci"], &[], 86_400);
    let p = c_waits_on_a_held_b(&mut lab, &c);
    // c is revoked while its handshake waits at b.
    lab.j = c;
    revoke_j_after(&mut lab, 100);
    assert!(!b_gets_the_list(&mut lab, &p), "nothing of c's on release");
    let later = build_udp_ipv4(C_IP, B_IP, 5000, 6000, b"later");
    lab.net.send_from_tun(C, &later);
    lab.net.run_for(Duration::from_secs(5));
    assert!(lab.net.node(B).1.is_empty(), "nothing of c's, ever");
    let status = lab.net.node(B).0.status();
    assert_eq!(status.revoked_certs, 100, "the whole list, four pages");
    assert!(status.peers.iter().all(|p| p.name != "c"));
}

#[test]
fn a_started_node_holds_a_good_peers_handshake_until_the_list_is_in_then_answers_it() {
    let mut lab = lab();
    revoke_j_after(&mut lab, 100);
    let c = lab.ca.node("c", "100.64.0.8/10", &["ci"], &[], 86_400);
    let p = c_waits_on_a_held_b(&mut lab, &c);
    // The moment b has the whole list (four pages), it answers c's held
    // handshake, and c's packet, waiting behind that handshake, arrives.
    // c sends nothing more: no WireGuard retry.
    assert!(
        b_gets_the_list(&mut lab, &p),
        "c's packet arrived in the step b's list came in"
    );
    assert_eq!(lab.net.node(B).0.status().revoked_certs, 100);
}
