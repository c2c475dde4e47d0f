//! Names over the sans-IO cores, deterministic: node names answered from
//! verified certificates, split DNS through gateways whose certificates
//! carry the zone (and only for callers their groups allow), failover
//! between gateways, and a lying lighthouse's zone advert ignored. The test
//! plays the gateways' resolver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use tern_node_core::dns::{self, Parsed, RecordType};
use tern_node_core::node::{DnsForward, DnsResult, DnsStep, NodeEvent, ServedZone};
use tern_shared::cert::LIGHTHOUSE_GROUP;
use tern_shared::testing::TestCa;

mod simnet;
use simnet::*;

const CI: &str = "198.18.0.20:4242";
const DEV: &str = "198.18.0.21:4242";
const GW1: &str = "198.18.0.30:4242";
const GW2: &str = "198.18.0.31:4242";
const LIAR: &str = "198.18.0.40:4242";
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);

fn gateway_policy() -> tern_shared::policy::FirewallConfig {
    let text = "[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[firewall.inbound]]\nproto = \"tcp\"\nport = \"8080\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.10/32\"\n";
    tern_shared::config::NodeConfig::parse(text, std::path::Path::new("/sim/gw.toml"))
        .unwrap()
        .firewall
}

struct Lab {
    net: Net,
    ca: TestCa,
}

/// A lighthouse, gateways for 198.19.0.0/24 and the zone `internal`
/// (`zones` in their certificates; each serves `internal`, for whom its
/// firewall lets in), and clients ci-1 (group ci) and dev-1 (group dev).
fn lab(gateways: &[(&str, &str, &str, &[&str])]) -> Lab {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut net = Net::new();
    net.add_lighthouse(
        &ca,
        &ca.node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400),
    );
    let mut lab = Lab { net, ca };
    for (name, ip, at, zones) in gateways {
        add_gateway(&mut lab, name, ip, at, zones);
    }
    for (name, ip, at, group) in [
        ("ci-1", "100.64.0.20/10", CI, "ci"),
        ("dev-1", "100.64.0.21/10", DEV, "dev"),
    ] {
        let node = lab.ca.node(name, ip, &[group], &[], 86_400);
        lab.net.add_node(&lab.ca, &node, at);
    }
    lab.net.run_for(Duration::from_secs(4));
    lab
}

fn add_gateway(lab: &mut Lab, name: &str, ip: &str, at: &str, zones: &[&str]) {
    add_gateway_with_rate(lab, name, ip, at, zones, 1000);
}

fn add_gateway_with_rate(lab: &mut Lab, name: &str, ip: &str, at: &str, zones: &[&str], rate: u32) {
    let node = lab
        .ca
        .node_with_zones(name, ip, &[], &["198.19.0.0/24"], zones, 86_400);
    lab.net.add_node(&lab.ca, &node, at);
    let core = lab.net.node(at).0;
    core.set_policy(
        &gateway_policy(),
        vec!["198.19.0.0/24".parse().unwrap()],
        &[],
    );
    core.set_dns(
        "tern",
        vec![ServedZone {
            zone: "internal".into(),
            groups: None,
            queries_per_sec: rate,
        }],
    );
}

fn events(lab: &mut Lab, at: &str) -> Vec<NodeEvent> {
    let core = lab.net.node(at).0;
    std::iter::from_fn(|| core.poll_event()).collect()
}

fn answers(lab: &mut Lab, at: &str) -> Vec<DnsResult> {
    events(lab, at)
        .into_iter()
        .filter_map(|e| match e {
            NodeEvent::Dns(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn forwards(lab: &mut Lab, at: &str) -> Vec<DnsForward> {
    events(lab, at)
        .into_iter()
        .filter_map(|e| match e {
            NodeEvent::DnsForward(f) => Some(f),
            _ => None,
        })
        .collect()
}

fn ask(lab: &mut Lab, at: &str, name: &str, qtype: RecordType) -> DnsStep {
    let query = dns::build_query(name, qtype, 4711).unwrap();
    let now = lab.net.now;
    let step = lab.net.node(at).0.resolve(&query, now);
    lab.net.settle();
    step
}

/// The gateway's resolver: every forwarded query answered with SERVER.
fn play_resolver(lab: &mut Lab, at: &str) -> usize {
    let fwd = forwards(lab, at);
    for f in &fwd {
        let Parsed::Query(q) = dns::parse_query(&f.query) else {
            panic!("the gateway forwarded something that is not a query");
        };
        assert_eq!(f.zone, "internal");
        let answer = dns::address_answer(&q, &[SERVER], 30);
        let now = lab.net.now;
        lab.net
            .node(at)
            .0
            .dns_forwarded(f.request, Some(answer), now);
    }
    lab.net.settle();
    fwd.len()
}

fn rcode(answer: &[u8]) -> String {
    dns::summarize(answer).unwrap().rcode
}

#[test]
fn a_name_under_a_zone_goes_through_the_mesh_to_the_gateway_and_back() {
    let mut lab = lab(&[("gw-1", "100.64.0.30/10", GW1, &["internal"])]);
    let status = lab.net.node(CI).0.status();
    assert_eq!(status.dns.zones["internal"], ["gw-1"], "{:?}", status.dns);
    let DnsStep::Pending(id) = ask(&mut lab, CI, "api.internal", RecordType::A) else {
        panic!("a zone's name waits for its gateway");
    };
    // Not only names under zones: anything else is the system's.
    assert_eq!(
        ask(&mut lab, CI, "www.example.test", RecordType::A),
        DnsStep::Upstream
    );
    lab.net.run_for(Duration::from_millis(200));
    assert_eq!(
        play_resolver(&mut lab, GW1),
        1,
        "gw-1 asked its resolver once"
    );
    let got = answers(&mut lab, CI);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].id, id);
    assert_eq!(dns::addresses(&got[0].answer), Ok(vec![SERVER]));
    assert_eq!(got[0].source, "gateway gw-1 (zone internal)");
}

#[test]
fn a_caller_no_rule_lets_into_the_subnets_is_refused_and_outside_names_never_leave() {
    let mut lab = lab(&[("gw-1", "100.64.0.30/10", GW1, &["internal"])]);
    ask(&mut lab, DEV, "api.internal", RecordType::A);
    lab.net.run_for(Duration::from_millis(200));
    assert_eq!(
        play_resolver(&mut lab, GW1),
        0,
        "nothing reached the resolver"
    );
    let got = answers(&mut lab, DEV);
    assert_eq!(rcode(&got[0].answer), "REFUSED");
    let counters = lab.net.node(GW1).0.status().dns.counters;
    assert_eq!(counters.refused_groups, 1, "{counters:?}");
}

#[test]
fn a_lying_lighthouses_zone_advert_is_ignored() {
    let mut lab = lab(&[]);
    // "liar" routes the subnet but its certificate carries no zone; the
    // lighthouse (lying, or fooled) lists it for one anyway.
    let liar = lab
        .ca
        .node("liar", "100.64.0.40/10", &[], &["198.19.0.0/24"], 86_400);
    lab.net.add_node(&lab.ca, &liar, LIAR);
    lab.net.node(LIAR).0.set_policy(
        &gateway_policy(),
        vec!["198.19.0.0/24".parse().unwrap()],
        &[],
    );
    lab.net.run_for(Duration::from_secs(1));
    lab.net
        .lighthouse()
        .registry_mut()
        .set_zones("100.64.0.40".parse().unwrap(), vec!["internal".into()]);
    lab.net.run_for(Duration::from_secs(4));
    assert_eq!(lab.net.node(CI).0.status().dns.zones["internal"], ["liar"]);
    ask(&mut lab, CI, "api.internal", RecordType::A);
    lab.net.run_for(Duration::from_secs(1));
    let got = answers(&mut lab, CI);
    assert_eq!(rcode(&got[0].answer), "SERVFAIL", "{got:?}");
    let status = lab.net.node(CI).0.status();
    assert_eq!(status.dns.counters.forged_zone_adverts, 1);
    assert!(status.dns.zones.is_empty(), "the advert is dropped");
    let liar = lab.net.node(LIAR).0.status().dns.counters;
    assert_eq!(liar.served, 0, "the query never went to it");
}

#[test]
fn a_zone_fails_over_to_the_other_gateway() {
    let mut lab = lab(&[
        ("gw-1", "100.64.0.30/10", GW1, &["internal"]),
        ("gw-2", "100.64.0.31/10", GW2, &["internal"]),
    ]);
    // gw-1 (first by name) vanishes without a word.
    lab.net.hosts.remove(&simnet::addr(GW1));
    let DnsStep::Pending(id) = ask(&mut lab, CI, "db.internal", RecordType::A) else {
        panic!("pending");
    };
    for _ in 0..40 {
        lab.net.run_for(Duration::from_millis(100));
        if play_resolver(&mut lab, GW2) > 0 {
            break;
        }
    }
    let got = answers(&mut lab, CI);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].id, id);
    assert_eq!(got[0].source, "gateway gw-2 (zone internal)");
    assert_eq!(
        lab.net.node(CI).0.status().dns.counters.gateway_failovers,
        1
    );
}

#[test]
fn node_names_come_from_certificates_the_node_verified() {
    let mut lab = lab(&[("gw-1", "100.64.0.30/10", GW1, &["internal"])]);
    // Its own name, at once.
    let DnsStep::Answer { answer, .. } = ask(&mut lab, CI, "ci-1.tern", RecordType::A) else {
        panic!("own name answered at once");
    };
    assert_eq!(
        dns::addresses(&answer),
        Ok(vec![Ipv4Addr::new(100, 64, 0, 20)])
    );
    // Another node's: asked of the lighthouse, answered from the
    // certificate it hands over (any case).
    let DnsStep::Pending(_) = ask(&mut lab, CI, "GW-1.tern", RecordType::A) else {
        panic!("asked of the lighthouse");
    };
    lab.net.run_for(Duration::from_millis(100));
    let got = answers(&mut lab, CI);
    assert_eq!(
        dns::addresses(&got[0].answer),
        Ok(vec![Ipv4Addr::new(100, 64, 0, 30)])
    );
    assert_eq!(got[0].source, "mesh (certificate of gw-1)");
    // Now a peer: answered from the table.
    assert!(matches!(
        ask(&mut lab, CI, "gw-1.tern", RecordType::A),
        DnsStep::Answer { .. }
    ));
    // AAAA of a node: no record, no error; an unknown name: NXDOMAIN.
    let DnsStep::Answer { answer, .. } = ask(&mut lab, CI, "gw-1.tern", RecordType::AAAA) else {
        panic!("AAAA answered at once");
    };
    assert_eq!(rcode(&answer), "NOERROR");
    ask(&mut lab, CI, "nobody.tern", RecordType::A);
    lab.net.run_for(Duration::from_millis(100));
    let got = answers(&mut lab, CI);
    assert_eq!(rcode(&got[0].answer), "NXDOMAIN");
    // The reverse of an overlay address: the peer's name.
    let DnsStep::Answer { answer, .. } =
        ask(&mut lab, CI, "30.0.64.100.in-addr.arpa", RecordType::PTR)
    else {
        panic!("PTR answered at once");
    };
    assert_eq!(
        dns::summarize(&answer).unwrap().records[0].data,
        "gw-1.tern."
    );
}

#[test]
fn a_new_zone_reaches_registered_nodes_at_once() {
    let mut lab = lab(&[]);
    assert!(lab.net.node(CI).0.status().dns.zones.is_empty());
    add_gateway(&mut lab, "gw-1", "100.64.0.30/10", GW1, &["internal"]);
    // Well within the 3 s between readings of the list: the lighthouse
    // tells registered nodes the list changed.
    lab.net.run_for(Duration::from_millis(600));
    assert_eq!(lab.net.node(CI).0.status().dns.zones["internal"], ["gw-1"]);
}

#[test]
fn a_caller_asking_too_fast_is_refused_and_counted() {
    let mut lab = lab(&[]);
    add_gateway_with_rate(&mut lab, "gw-1", "100.64.0.30/10", GW1, &["internal"], 5);
    lab.net.run_for(Duration::from_secs(1));
    for i in 0..20 {
        ask(&mut lab, CI, &format!("host{i}.internal"), RecordType::A);
    }
    lab.net.run_for(Duration::from_millis(100));
    assert_eq!(play_resolver(&mut lab, GW1), 10, "twice the rate at once");
    lab.net.settle();
    let got = answers(&mut lab, CI);
    let refused = got.iter().filter(|r| rcode(&r.answer) == "REFUSED").count();
    assert_eq!((got.len(), refused), (20, 10), "{got:?}");
    let counters = lab.net.node(GW1).0.status().dns.counters;
    assert_eq!(counters.rate_limited, 10, "{counters:?}");
}

/// Found beside the routes' case (`sim_leaving.rs`): a lighthouse that has
/// just restarted lists only the gateways that registered with it again.
/// A client took that list at its word and forgot the zone, so names under
/// it went to the system's resolvers (out of the mesh) until the gateway
/// was back. A gateway missing from the list now stays for `ROUTE_GRACE`.
#[test]
fn a_restarted_lighthouse_that_does_not_list_the_zones_gateway_yet_keeps_the_zone() {
    let mut lab = lab(&[("gw-1", "100.64.0.30/10", GW1, &["internal"])]);
    // ci-1 is using gw-1 for the zone.
    let DnsStep::Pending(_) = ask(&mut lab, CI, "db.internal", RecordType::A) else {
        panic!("pending");
    };
    for _ in 0..20 {
        lab.net.run_for(Duration::from_millis(100));
        if play_resolver(&mut lab, GW1) > 0 {
            break;
        }
    }
    assert_eq!(answers(&mut lab, CI).len(), 1);
    let lighthouse = lab
        .ca
        .node("lh1", "100.64.0.1/10", &[LIGHTHOUSE_GROUP], &[], 86_400);
    lab.net.hosts.remove(&simnet::addr(LH_ADDR));
    lab.net
        .blocked
        .push((ip4(simnet::addr(GW1)), ip4(simnet::addr(LH_ADDR))));
    lab.net.add_lighthouse(&lab.ca, &lighthouse);
    // ci-1 registers with the new lighthouse and reads its zones list.
    let ci_ip = Ipv4Addr::new(100, 64, 0, 20);
    let mut waited = 0;
    while lab.net.lighthouse().registry().lookup(ci_ip).is_none() {
        assert!(waited < 60, "ci-1 never registered with the new lighthouse");
        lab.net.run_for(Duration::from_millis(500));
        waited += 1;
    }
    lab.net.run_for(Duration::from_secs(4));
    assert!(
        lab.net
            .lighthouse()
            .registry()
            .zones_after(None)
            .0
            .is_empty(),
        "the new lighthouse lists no zone"
    );
    let zones = lab.net.node(CI).0.status().dns.zones;
    assert_eq!(zones.get("internal").map(Vec::len), Some(1), "{zones:?}");
    // A name under it still goes to gw-1.
    let DnsStep::Pending(id) = ask(&mut lab, CI, "db.internal", RecordType::A) else {
        panic!("pending");
    };
    assert_eq!(play_resolver(&mut lab, GW1), 1);
    let got = answers(&mut lab, CI);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].id, id);
    assert_eq!(got[0].source, "gateway gw-1 (zone internal)");

    // gw-1 never gets through: after the grace no list names it, and the
    // zone goes.
    lab.net.run_for(Duration::from_secs(25));
    let zones = lab.net.node(CI).0.status().dns.zones;
    assert!(!zones.contains_key("internal"), "{zones:?}");
}
