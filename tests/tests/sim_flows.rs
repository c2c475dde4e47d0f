//! Flow records from a gateway's core to a lighthouse's, on the simulated
//! network: a flow a client starts is recorded when it closes and reaches
//! the lighthouse once, acknowledged; records share messages (a burst goes
//! in full messages at once, a lone record waits a second for company);
//! past the queue's bound records are dropped and counted, the flows
//! themselves untouched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use tern_node_core::node::FlowLogSettings;
use tern_shared::cert::LIGHTHOUSE_GROUP;
use tern_shared::flows::FlowEnd;
use tern_shared::testing::TestCa;

mod simnet;
use simnet::*;

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CI: &str = "198.18.0.20:4242";
const GW: &str = "198.18.0.30:4242";
const CI_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 20);

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

/// A lighthouse, a gateway recording flows (records shipped, `queue` at
/// most waiting), a client in group ci with a route through it.
fn lab(queue: usize) -> Net {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    net.add_node(
        &ca,
        &ca.node("gw-1", "100.64.0.30/10", &[], &["198.19.0.0/24"], 86_400),
        GW,
    );
    let rules = "[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[firewall.inbound]]\nproto = \"tcp\"\nport = \"8080\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.0/24\"\n";
    let firewall =
        tern_shared::config::NodeConfig::parse(rules, std::path::Path::new("/sim/gw.toml"))
            .unwrap()
            .firewall;
    net.node(GW)
        .0
        .set_policy(&firewall, vec!["198.19.0.0/24".parse().unwrap()], &[]);
    net.node(GW).0.set_flow_log(FlowLogSettings {
        record: true,
        ship: true,
        file: false,
        seq_base: 1 << 40,
        queue,
    });
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
    net
}

/// One whole TCP flow from the client on `port`: SYN, SYN-ACK, FINs.
fn flow(net: &mut Net, port: u16) {
    net.send_from_tun(CI, &tcp(CI_IP, SERVER, port, 8080, 0x02));
    net.send_from_tun(GW, &tcp(SERVER, CI_IP, 8080, port, 0x12));
    net.send_from_tun(CI, &tcp(CI_IP, SERVER, port, 8080, 0x11));
    net.send_from_tun(GW, &tcp(SERVER, CI_IP, 8080, port, 0x11));
}

/// What the shell does after each step: the gateway's records, timed.
fn take(net: &mut Net) {
    let (now, unix_ms) = (net.now, net.unix_now() * 1000);
    assert!(
        net.node(GW).0.take_flow_records(now, unix_ms).is_empty(),
        "no file kept"
    );
}

fn batches(net: &mut Net) -> Vec<tern_lighthouse_core::lighthouse::FlowBatch> {
    std::iter::from_fn(|| net.lighthouse().poll_flow_batch()).collect()
}

#[test]
fn a_closed_flow_reaches_the_lighthouse_once_with_its_caller_rule_and_bytes() {
    let mut net = lab(1024);
    flow(&mut net, 40000);
    assert!(net.node(GW).0.flow_records_waiting());
    take(&mut net);
    net.run_for(Duration::from_millis(500));
    assert!(
        batches(&mut net).is_empty(),
        "a lone record waits for company"
    );
    net.run_for(Duration::from_secs(1));
    let got = batches(&mut net);
    assert_eq!(got.len(), 1);
    let b = &got[0];
    assert_eq!((b.node.as_str(), b.dropped, b.flows.len()), ("gw-1", 0, 1));
    let e = &b.flows[0];
    assert_eq!(
        (e.caller.as_str(), e.groups.as_slice()),
        ("ci-1", &["ci".to_string()][..])
    );
    assert_eq!(
        (e.dst, e.dst_port, e.src_port, e.proto),
        (SERVER, 8080, 40000, 6)
    );
    assert_eq!(
        (e.allowed, e.rule, e.reason),
        (true, Some(0), FlowEnd::Closed)
    );
    assert_eq!(
        (e.packets_in, e.bytes_in, e.packets_out, e.bytes_out),
        (2, 80, 2, 80)
    );
    assert_eq!(e.seq, 1 << 40);
    assert!(e.start_ms <= e.end_ms && e.end_ms <= net.unix_now() * 1000);
    let status = net.node(GW).0.flow_log_status();
    assert_eq!(
        (
            status.recorded,
            status.shipped,
            status.waiting,
            status.dropped
        ),
        (1, 1, 0, 0)
    );
    net.run_for(Duration::from_secs(10));
    assert!(
        batches(&mut net).is_empty(),
        "acknowledged: never sent again"
    );
}

#[test]
fn a_burst_goes_in_full_messages_at_once() {
    let mut net = lab(1024);
    for i in 0..40 {
        flow(&mut net, 41000 + i);
    }
    take(&mut net);
    net.run_for(Duration::from_millis(100));
    let first: Vec<usize> = batches(&mut net).iter().map(|b| b.flows.len()).collect();
    assert_eq!(first.iter().sum::<usize>(), 40, "{first:?}");
    assert!(first.len() <= 3, "{first:?}");
    let status = net.node(GW).0.flow_log_status();
    assert_eq!((status.shipped, status.waiting), (40, 0));
}

#[test]
fn past_the_queue_records_are_dropped_and_counted_and_flows_pass() {
    let mut net = lab(4);
    // The gateway and the lighthouse cannot reach each other: nothing is
    // acknowledged.
    let (gw, lh) = (ip4(addr(GW)), ip4(addr(LH_ADDR)));
    net.blocked.push((gw, lh));
    net.node(GW).1.clear();
    for i in 0..200 {
        flow(&mut net, 42000 + i);
        take(&mut net);
    }
    assert_eq!(
        net.node(GW).1.len(),
        400,
        "every SYN and FIN reached the private network"
    );
    net.blocked.clear();
    let status = net.node(GW).0.flow_log_status();
    assert_eq!(status.recorded, 200);
    assert!(status.dropped > 0, "{status:?}");
    assert_eq!(
        status.recorded,
        status.dropped + status.waiting,
        "{status:?}"
    );
    // Back: what waited arrives, with the count of what was dropped.
    net.run_for(Duration::from_secs(70));
    let got = batches(&mut net);
    let kept: usize = got.iter().map(|b| b.flows.len()).sum();
    assert_eq!(kept as u64, status.waiting);
    assert_eq!(got.iter().map(|b| b.dropped).max(), Some(status.dropped));
}

#[test]
fn a_node_flooding_the_lighthouse_with_records_is_held_to_its_rate() {
    use tern_shared::control::{ControlMessage, CONTROL_PORT};
    use tern_shared::packet::build_udp_ipv4;
    let mut net = lab(1024);
    let entry = tern_shared::flows::FlowEntry {
        seq: 0,
        start_ms: 1,
        end_ms: 2,
        caller: "forged".into(),
        fingerprint: tern_shared::cert::Fingerprint([5; 32]),
        groups: vec![],
        src: CI_IP,
        src_port: 1,
        dst: SERVER,
        dst_port: 2,
        dst_port_last: 2,
        proto: 6,
        allowed: true,
        rule: None,
        reason: FlowEnd::Closed,
        bytes_in: 0,
        packets_in: 0,
        bytes_out: 0,
        packets_out: 0,
    };
    // ci-1 (no rules of its own, so no records) sends 1,000 messages at once.
    for i in 0..1000u32 {
        let msg = ControlMessage::FlowRecords {
            id: i,
            dropped: 0,
            flows: vec![tern_shared::flows::FlowEntry {
                seq: u64::from(i),
                ..entry.clone()
            }],
        }
        .encode()
        .unwrap();
        let packet = build_udp_ipv4(
            CI_IP,
            Ipv4Addr::new(100, 64, 0, 1),
            40_000,
            CONTROL_PORT,
            &msg,
        );
        net.send_from_tun(CI, &packet);
    }
    net.run_for(Duration::from_millis(100));
    let taken = batches(&mut net).len();
    let now = net.now;
    let refused = net.lighthouse().status(now).counters.flow_batches_refused;
    assert!(
        (150..=250).contains(&taken),
        "about one second's rate taken: {taken}"
    );
    assert_eq!(taken as u64 + refused, 1000);
    // The gateway's own records still get through.
    flow(&mut net, 43000);
    take(&mut net);
    net.run_for(Duration::from_secs(2));
    assert_eq!(
        batches(&mut net)
            .iter()
            .map(|b| b.flows.len())
            .sum::<usize>(),
        1
    );
}
