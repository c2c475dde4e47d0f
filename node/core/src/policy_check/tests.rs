//! The checker's verdicts, and that they are the packet path's verdicts.

use super::*;
use crate::firewall::Verdict;
use proptest::prelude::*;
use std::path::Path;
use tern_shared::testing::TestCa;

const GATEWAY: &str = r#"
[pki]
ca = "ca.crt"
cert = "gw-1.crt"
key = "gw-1.key"

[gateway]
subnets = ["198.19.0.0/24"]

[[gateway.dns]]
zone = "internal"
resolver = "198.19.0.2"
groups = ["ci"]

[[services]]
name = "grafana"
listen = 3000
upstream = "http://198.19.0.20:3000"
groups = ["ops"]

[[firewall.inbound]]
proto = "tcp"
port = "8080"
groups = ["ci"]
local_cidr = "198.19.0.10/32"

[[firewall.inbound]]
proto = "tcp"
port = "5432"
action = "reject"
local_cidr = "198.19.0.0/24"

[[firewall.inbound]]
proto = "tcp"
port = "5000-5999"
groups = ["ci"]
local_cidr = "198.19.0.0/25"

[[firewall.inbound]]
proto = "icmp"
groups = ["ci"]
local_cidr = "198.19.0.0/24"

[[firewall.inbound]]
proto = "tcp"
port = "3000"

[[firewall.inbound]]
proto = "tcp"
port = "22"
host = "admin-1"
cidr = "100.64.0.0/24"
local_cidr = "198.19.0.10/32"
"#;

fn gateway() -> NodeUnderTest {
    node(
        "gateway.toml",
        GATEWAY,
        Ok(("gw-1".into(), "100.64.0.10".parse().unwrap())),
    )
}

fn node(label: &str, text: &str, cert: Result<(String, Ipv4Addr), String>) -> NodeUnderTest {
    let config = NodeConfig::parse(text, Path::new("/etc/tern").join(label).as_path()).unwrap();
    let (inbound, _) = tern_shared::policy_tests::firewall_rule_lines(text);
    NodeUnderTest::new(
        label.into(),
        label.trim_end_matches(".toml").into(),
        config,
        cert,
        inbound,
    )
}

fn asker(groups: &[&str]) -> Asker {
    let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    groups.sort();
    Asker {
        name: None,
        groups,
        address: None,
    }
}

fn verdict(nodes: &[NodeUnderTest], who: &Asker, to: &str) -> Option<Expect> {
    answer(nodes, who, &Destination::parse(to).unwrap(), None).verdict()
}

#[test]
fn groups_ports_protocols_and_local_cidr_decide() {
    let nodes = [gateway()];
    let ci = asker(&["ci"]);
    let dev = asker(&["dev"]);
    assert_eq!(
        verdict(&nodes, &ci, "198.19.0.10:8080/tcp"),
        Some(Expect::Allow)
    );
    assert_eq!(
        verdict(&nodes, &dev, "198.19.0.10:8080/tcp"),
        Some(Expect::Deny),
        "group"
    );
    assert_eq!(
        verdict(&nodes, &ci, "198.19.0.10:8081/tcp"),
        Some(Expect::Deny),
        "port"
    );
    assert_eq!(
        verdict(&nodes, &ci, "198.19.0.10:8080/udp"),
        Some(Expect::Deny),
        "protocol"
    );
    assert_eq!(
        verdict(&nodes, &ci, "198.19.0.11:8080/tcp"),
        Some(Expect::Deny),
        "local_cidr"
    );
    assert_eq!(
        verdict(&nodes, &ci, "198.19.0.10:5432/tcp"),
        Some(Expect::Deny),
        "reject first"
    );
    assert_eq!(
        verdict(&nodes, &ci, "198.19.0.99/icmp"),
        Some(Expect::Allow)
    );
    assert_eq!(
        verdict(&nodes, &dev, "198.19.0.99/icmp"),
        Some(Expect::Deny)
    );
    // A rule without local_cidr covers the node's own address only.
    assert_eq!(
        verdict(&nodes, &dev, "100.64.0.10:3000/tcp"),
        Some(Expect::Allow)
    );
    assert_eq!(
        verdict(&nodes, &dev, "198.19.0.10:3000/tcp"),
        Some(Expect::Deny)
    );
}

#[test]
fn the_deciding_rule_is_named_with_its_line() {
    let nodes = [gateway()];
    let Answer::Decided(parts) = answer(
        &nodes,
        &asker(&["ci"]),
        &Destination::parse("198.19.0.10:5432/tcp").unwrap(),
        None,
    ) else {
        panic!("undecided")
    };
    assert_eq!(parts.len(), 1);
    let Why::Rule { index, line, .. } = &parts[0].why else {
        panic!("{parts:?}")
    };
    assert_eq!((*index, *line), (1, Some(27)));
    let text = parts[0].describe(&nodes);
    assert_eq!(
        text,
        "gw-1 (gateway.toml): 198.19.0.10:5432/tcp denied by inbound rule-1 (gateway.toml:27: proto tcp, port 5432, local_cidr 198.19.0.0/24, action reject)"
    );
}

#[test]
fn ranges_are_checked_where_rules_change_and_mixed_parts_are_shown() {
    let nodes = [gateway()];
    let ci = asker(&["ci"]);
    // 5000-5431 (below the rejected 5432) opens 198.19.0.0/25 only.
    assert_eq!(
        verdict(&nodes, &ci, "198.19.0.0/25:5000-5431/tcp"),
        Some(Expect::Allow)
    );
    let a = answer(
        &nodes,
        &ci,
        &Destination::parse("198.19.0.0/24:5000-5431/tcp").unwrap(),
        None,
    );
    assert_eq!(a.verdict(), None);
    let Answer::Decided(parts) = a else { panic!() };
    let allowed: Vec<_> = parts.iter().filter(|p| p.allowed).collect();
    let denied: Vec<_> = parts.iter().filter(|p| !p.allowed).collect();
    assert_eq!(allowed.len(), 1);
    assert_eq!(denied.len(), 1, "{parts:?}");
    assert_eq!(
        denied[0].point.unwrap().dst,
        "198.19.0.128".parse::<Ipv4Addr>().unwrap()
    );
    // Wider than the gateway's subnet: the part outside is not routed.
    let Answer::Decided(parts) = answer(
        &nodes,
        &ci,
        &Destination::parse("198.19.0.0/23/icmp").unwrap(),
        None,
    ) else {
        panic!()
    };
    assert!(parts.iter().any(|p| matches!(p.why, Why::NotRouted { .. })));
    assert!(parts.iter().any(|p| p.allowed));
    // Any protocol on a port: TCP and UDP both.
    assert_eq!(verdict(&nodes, &ci, "198.19.0.10:8080"), None);
}

#[test]
fn services_and_zones_decide_with_their_groups() {
    let nodes = [gateway()];
    assert_eq!(
        verdict(&nodes, &asker(&["ops"]), "grafana"),
        Some(Expect::Allow)
    );
    assert_eq!(
        verdict(&nodes, &asker(&["ci"]), "grafana"),
        Some(Expect::Deny)
    );
    assert_eq!(
        verdict(&nodes, &asker(&["ci"]), "db.internal"),
        Some(Expect::Allow)
    );
    assert_eq!(
        verdict(&nodes, &asker(&["ops"]), "db.internal"),
        Some(Expect::Deny)
    );
    let a = answer(
        &nodes,
        &asker(&["ci"]),
        &Destination::Name("nothing.example".into()),
        None,
    );
    assert!(matches!(a, Answer::Undecidable(m) if m.contains("neither a [[services]] name")));
}

#[test]
fn what_a_rule_needs_and_the_test_lacks_is_asked_for() {
    let nodes = [gateway()];
    let to = Destination::parse("198.19.0.10:22/tcp").unwrap();
    let a = answer(&nodes, &asker(&[]), &to, None);
    assert!(
        matches!(&a, Answer::Undecidable(m) if m.contains("names a host") && m.contains("gateway.toml:48")),
        "{a:?}"
    );
    let mut admin = asker(&[]);
    admin.name = Some("admin-1".into());
    let a = answer(&nodes, &admin, &to, None);
    assert!(
        matches!(&a, Answer::Undecidable(m) if m.contains("overlay address")),
        "{a:?}"
    );
    admin.address = Some("100.64.0.7".parse().unwrap());
    assert_eq!(
        answer(&nodes, &admin, &to, None).verdict(),
        Some(Expect::Allow)
    );
    admin.address = Some("100.64.1.7".parse().unwrap());
    assert_eq!(
        answer(&nodes, &admin, &to, None).verdict(),
        Some(Expect::Deny)
    );
}

#[test]
fn only_nodes_that_take_the_destination_decide_and_a_node_may_be_named() {
    let other = node(
        "gw-2.toml",
        "[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[gateway]\nsubnets = [\"198.19.0.0/24\"]\n",
        Err("no such file".into()),
    );
    let nodes = [gateway(), other];
    let ci = asker(&["ci"]);
    let to = Destination::parse("198.19.0.10:8080/tcp").unwrap();
    // gw-2 routes the subnet and lets nothing in: the two disagree.
    assert_eq!(answer(&nodes, &ci, &to, None).verdict(), None);
    assert_eq!(
        answer(&nodes, &ci, &to, Some("gw-1")).verdict(),
        Some(Expect::Allow)
    );
    assert_eq!(
        answer(&nodes, &ci, &to, Some("gw-2")).verdict(),
        Some(Expect::Deny)
    );
    let a = answer(&nodes, &ci, &to, Some("gw-3"));
    assert!(
        matches!(&a, Answer::Undecidable(m) if m.contains("gw-1, gw-2")),
        "{a:?}"
    );
    let a = answer(
        &nodes,
        &ci,
        &Destination::parse("198.19.7.1/icmp").unwrap(),
        None,
    );
    assert!(
        matches!(&a, Answer::Undecidable(m) if m.contains("no node among the configs owns or routes") && m.contains("no such file")),
        "{a:?}"
    );
}

#[test]
fn too_wide_a_destination_is_refused() {
    let mut text = String::from(
        "[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[gateway]\nsubnets = [\"198.19.0.0/16\"]\n",
    );
    for i in 0..400u32 {
        text.push_str(&format!(
            "[[firewall.inbound]]\nproto = \"tcp\"\nport = \"{}\"\nlocal_cidr = \"198.19.{}.0/24\"\n",
            1000 + i,
            i % 256
        ));
    }
    let nodes = [node("wide.toml", &text, Err("none".into()))];
    let a = answer(
        &nodes,
        &asker(&[]),
        &Destination::parse("198.19.0.0/16/tcp").unwrap(),
        None,
    );
    assert!(
        matches!(&a, Answer::Undecidable(m) if m.contains("too wide")),
        "{a:?}"
    );
}

fn tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 2, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    tern_shared::packet::build_udp_ipv4(src, dst, 40000, dport, b"x")
}

fn echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 1, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    p
}

fn rule_text(
    proto: u8,
    port: Option<(u16, u16)>,
    group: Option<u8>,
    local: Option<(u8, u8)>,
    host: bool,
    cidr: Option<u8>,
    reject: bool,
) -> String {
    let proto_s = ["any", "tcp", "udp", "icmp"][proto as usize % 4];
    let mut t = format!("[[firewall.inbound]]\nproto = \"{proto_s}\"\n");
    if let (Some((a, b)), "tcp" | "udp") = (port, proto_s) {
        t.push_str(&format!("port = \"{}-{}\"\n", a.min(b), a.max(b)));
    }
    if let Some(g) = group {
        t.push_str(&format!("groups = [\"g{}\"]\n", g % 3));
    }
    if let Some((third, len)) = local {
        let len = 22 + len % 11;
        let net: Ipv4Net = format!("198.19.{}.0/{len}", third % 4).parse().unwrap();
        t.push_str(&format!("local_cidr = \"{}\"\n", net.trunc()));
    }
    if host {
        t.push_str("host = \"n-1\"\n");
    }
    if let Some(c) = cidr {
        t.push_str(&format!("cidr = \"100.64.{}.0/24\"\n", c % 2));
    }
    if reject {
        t.push_str("action = \"reject\"\n");
    }
    t
}

type RuleArgs = (
    u8,
    Option<(u16, u16)>,
    Option<u8>,
    Option<(u8, u8)>,
    bool,
    Option<u8>,
    bool,
);

fn rule_args() -> impl Strategy<Value = RuleArgs> {
    (
        0u8..4,
        proptest::option::of((20u16..30, 20u16..30)),
        proptest::option::of(0u8..3),
        proptest::option::of((0u8..4, 0u8..11)),
        proptest::bool::weighted(0.2),
        proptest::option::weighted(0.2, 0u8..2),
        proptest::bool::weighted(0.3),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Whatever the rules, the caller and the first packet, the checker
    /// says what the firewall does to that packet at a gateway.
    #[test]
    fn the_checker_agrees_with_the_packet_path(
        rules in proptest::collection::vec(rule_args(), 0..8),
        groups in proptest::collection::btree_set(0u8..3, 0..3),
        from_net in 0u8..2,
        proto in 0u8..3,
        third in 0u8..4,
        last in 0u8..=255,
        port in 18u16..32,
    ) {
        let mut text = String::from("[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[gateway]\nsubnets = [\"198.19.0.0/22\"]\n");
        for r in &rules {
            text.push_str(&rule_text(r.0, r.1, r.2, r.3, r.4, r.5, r.6));
        }
        let gw_ip: Ipv4Addr = "100.64.0.10".parse().unwrap();
        let nodes = [node("gw.toml", &text, Ok(("gw-1".into(), gw_ip)))];
        let group_names: Vec<String> = groups.iter().map(|g| format!("g{g}")).collect();
        let group_refs: Vec<&str> = group_names.iter().map(String::as_str).collect();
        let caller_ip: Ipv4Addr = format!("100.64.{from_net}.5").parse().unwrap();
        let ca = TestCa::new("ca", &[], &[]);
        let cert = ca.node("n-1", &format!("{caller_ip}/10"), &group_refs, &[], 86_400).verified(&ca.pool());
        let asker = Asker { name: Some("n-1".into()), groups: group_names.clone(), address: Some(caller_ip) };
        let dst = Ipv4Addr::new(198, 19, third, last);
        let (packet, to) = match proto {
            0 => (tcp_syn(caller_ip, dst, port), format!("{dst}:{port}/tcp")),
            1 => (udp(caller_ip, dst, port), format!("{dst}:{port}/udp")),
            _ => (echo(caller_ip, dst), format!("{dst}/icmp")),
        };
        let mut fw = Firewall::new(&nodes[0].config.firewall, gw_ip, Instant::now());
        let packet_allowed = fw.check_inbound(&packet, &cert, Instant::now()) == Verdict::Allow;
        let checked = answer(&nodes, &asker, &Destination::parse(&to).unwrap(), None).verdict();
        let expected = if packet_allowed { Expect::Allow } else { Expect::Deny };
        prop_assert_eq!(checked, Some(expected), "{}\n{}", to, text);
    }

    /// A range's verdict is the verdict of every address and port in it.
    #[test]
    fn a_range_verdict_holds_for_each_point(
        rules in proptest::collection::vec(rule_args(), 0..6),
        groups in proptest::collection::btree_set(0u8..3, 0..3),
        third in 0u8..4,
        len in 28u8..=32,
        first in 18u16..32,
        span in 0u16..6,
    ) {
        let mut text = String::from("[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[gateway]\nsubnets = [\"198.19.0.0/22\"]\n");
        for r in &rules {
            text.push_str(&rule_text(r.0, r.1, r.2, r.3, false, None, r.6));
        }
        let nodes = [node("gw.toml", &text, Ok(("gw-1".into(), "100.64.0.10".parse().unwrap())))];
        let mut names: Vec<String> = groups.iter().map(|g| format!("g{g}")).collect();
        names.sort();
        let who = Asker { name: None, groups: names, address: None };
        let net: Ipv4Net = format!("198.19.{third}.64/{len}").parse::<Ipv4Net>().unwrap().trunc();
        let range = format!("{net}:{first}-{}/tcp", first + span);
        let whole = verdict(&nodes, &who, &range);
        let mut each = Vec::new();
        for dst in net.hosts().chain([net.network(), net.broadcast()]) {
            for port in first..=first + span {
                each.push(verdict(&nodes, &who, &format!("{dst}:{port}/tcp")));
            }
        }
        let all_allow = each.iter().all(|v| *v == Some(Expect::Allow));
        let all_deny = each.iter().all(|v| *v == Some(Expect::Deny));
        let expected = if all_allow { Some(Expect::Allow) } else if all_deny { Some(Expect::Deny) } else { None };
        prop_assert_eq!(whole, expected, "{}\n{}", range, text);
    }
}

#[test]
fn the_example_tests_pass_against_the_example_gateway() {
    let text = include_str!("../../../../config/gateway.toml");
    let nodes = [node("gateway.toml", text, Err("not in config/".into()))];
    let tests = tern_shared::policy_tests::parse(
        include_str!("../../../../config/policy-tests.toml"),
        Path::new("config/policy-tests.toml"),
    )
    .unwrap();
    assert!(tests.len() >= 8);
    for t in &tests {
        let tern_shared::policy_tests::TestCaller::Described { name, groups, from } = &t.caller
        else {
            panic!("{}: the examples describe their callers", t.name)
        };
        let who = Asker {
            name: name.clone(),
            groups: groups.clone(),
            address: *from,
        };
        let a = run_test(&nodes, &who, t);
        assert_eq!(a.verdict(), Some(t.expect), "{}: {a:?}", t.name);
    }
    // Both verdicts are tested.
    assert!(tests.iter().any(|t| t.expect == Expect::Allow));
    assert!(tests.iter().any(|t| t.expect == Expect::Deny));
}
