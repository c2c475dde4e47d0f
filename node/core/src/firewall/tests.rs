//! The firewall's tests: rules, flows, rejections, ICMP errors, logs.

use super::*;
use tern_shared::packet::build_udp_ipv4;
use tern_shared::testing::TestCa;

#[test]
fn a_gateway_subnet_without_an_allow_rule_into_it_is_named() {
    let parse = |rules: &str| {
        let text = format!("[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n{rules}");
        tern_shared::config::NodeConfig::parse(&text, std::path::Path::new("/t/gw.toml"))
            .unwrap()
            .firewall
    };
    let subnets: Vec<Ipv4Net> = vec![
        "198.19.0.0/24".parse().unwrap(),
        "198.19.1.0/24".parse().unwrap(),
    ];
    // Rules for the node itself (no local_cidr) open no subnet.
    let own = parse("[[firewall.inbound]]\nproto = \"tcp\"\nport = \"22\"\n");
    assert_eq!(subnets_no_rule_opens(&own, &subnets), subnets);
    // One host in the first subnet opens that subnet; a reject rule opens nothing.
    let one = parse(
        "[[firewall.inbound]]\nproto = \"tcp\"\nlocal_cidr = \"198.19.0.20/32\"\n\
         [[firewall.inbound]]\nlocal_cidr = \"198.19.1.0/24\"\naction = \"reject\"\n",
    );
    assert_eq!(subnets_no_rule_opens(&one, &subnets), vec![subnets[1]]);
    // A wider local_cidr covers both.
    let wide = parse("[[firewall.inbound]]\nlocal_cidr = \"198.19.0.0/16\"\n");
    assert!(subnets_no_rule_opens(&wide, &subnets).is_empty());
}

const GW: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 10);
const CI: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 5);
const DB: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

fn ping(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, id: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 1, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[ty, 0, 0, 0]);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p
}

fn rules(text: &str) -> FirewallConfig {
    let full = format!("[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n{text}");
    tern_shared::config::NodeConfig::parse(&full, std::path::Path::new("/t/node.toml"))
        .unwrap()
        .firewall
}

struct Peers {
    ci: VerifiedCert,
    dev: VerifiedCert,
    /// A gateway for 198.19.0.0/24 (DB's network).
    gw: VerifiedCert,
}

fn peers() -> Peers {
    let ca = TestCa::new("ca", &[], &[]);
    let pool = ca.pool();
    Peers {
        ci: ca
            .node("ci-1", "100.64.0.5/10", &["ci", "deploy"], &[], 86_400)
            .verified(&pool),
        dev: ca
            .node("dev-1", "100.64.0.6/10", &["dev"], &[], 86_400)
            .verified(&pool),
        gw: ca
            .node("gw-1", "100.64.0.10/10", &[], &["198.19.0.0/24"], 86_400)
            .verified(&pool),
    }
}

const GATEWAY_RULES: &str = r#"
[firewall]
[[firewall.inbound]]
proto = "tcp"
port = "8080"
groups = ["ci"]
local_cidr = "198.19.0.10/32"
[[firewall.inbound]]
proto = "tcp"
port = "22"
groups = ["ci", "deploy"]
local_cidr = "198.19.0.10/32"
[[firewall.inbound]]
proto = "tcp"
port = "5432"
action = "reject"
local_cidr = "198.19.0.0/24"
[[firewall.inbound]]
proto = "icmp"
host = "ci-1"
"#;

#[test]
fn inbound_default_deny_and_rule_matching() {
    let p = peers();
    let now = Instant::now();
    let mut fw = Firewall::new(&rules(GATEWAY_RULES), GW, now);
    assert_eq!(
        fw.check_inbound(&tcp(CI, DB, 40000, 8080, 2), &p.ci, now),
        Verdict::Allow
    );
    assert_eq!(
        fw.check_inbound(&tcp(CI, DB, 40001, 22, 2), &p.ci, now),
        Verdict::Allow,
        "both groups held"
    );
    assert_eq!(
        fw.check_inbound(&tcp(CI, DB, 40002, 9999, 2), &p.ci, now),
        Verdict::Drop,
        "no rule: default deny"
    );
    assert_eq!(
        fw.check_inbound(
            &tcp(CI, Ipv4Addr::new(198, 19, 0, 11), 40003, 8080, 2),
            &p.ci,
            now
        ),
        Verdict::Drop,
        "outside local_cidr"
    );
    assert_eq!(
        fw.check_inbound(&tcp(CI, GW, 40004, 8080, 2), &p.ci, now),
        Verdict::Drop,
        "gateway's own address is not the subnet"
    );
    assert_eq!(
        fw.check_inbound(
            &tcp(Ipv4Addr::new(100, 64, 0, 6), DB, 40000, 8080, 2),
            &p.dev,
            now
        ),
        Verdict::Drop,
        "not in group ci"
    );
    assert_eq!(
        fw.check_inbound(&ping(CI, GW, 8, 7), &p.ci, now),
        Verdict::Allow,
        "icmp to the node itself from host ci-1"
    );
    assert_eq!(
        fw.check_inbound(&ping(CI, DB, 8, 7), &p.ci, now),
        Verdict::Drop,
        "no local_cidr: own address only"
    );
    let s = fw.status();
    assert_eq!(s.denied.get("inbound/default-deny"), Some(&5));
    assert_eq!(s.allowed_new_flows, 3);
}

#[test]
fn a_policy_question_gets_the_verdict_a_syn_would_get_and_changes_nothing() {
    let p = peers();
    let now = Instant::now();
    let mut fw = Firewall::new(&rules(GATEWAY_RULES), GW, now);
    assert_eq!(
        fw.inbound_tcp_decision(&p.ci, DB, 8080),
        PolicyDecision::Allowed
    );
    assert_eq!(
        fw.inbound_tcp_decision(&p.ci, DB, 5432),
        PolicyDecision::Denied("inbound rule-2/reject".into())
    );
    assert!(matches!(
        fw.inbound_tcp_decision(&p.ci, DB, 9999),
        PolicyDecision::Denied(r) if r.starts_with("inbound default-deny")
    ));
    assert!(
        matches!(
            fw.inbound_tcp_decision(&p.dev, DB, 8080),
            PolicyDecision::Denied(_)
        ),
        "not in group ci"
    );
    // The same answers as real SYNs, and no flow or counter moved.
    let before = fw.status();
    assert_eq!(before.flows, 0);
    assert_eq!(before.allowed_new_flows, 0);
    assert!(before.denied.is_empty());
    for (port, allowed) in [(8080, true), (5432, false), (9999, false)] {
        let verdict = fw.check_inbound(&tcp(CI, DB, 40000 + port, port, 2), &p.ci, now);
        assert_eq!(verdict == Verdict::Allow, allowed, "port {port}");
    }
}

#[test]
fn reject_answers_with_a_reset() {
    let p = peers();
    let now = Instant::now();
    let mut fw = Firewall::new(&rules(GATEWAY_RULES), GW, now);
    let syn = tcp(CI, DB, 40000, 5432, 2);
    match fw.check_inbound(&syn, &p.ci, now) {
        Verdict::Reject(rst) => {
            let f = flow_of(&rst).unwrap();
            assert_eq!(
                (f.src, f.dst, f.src_port, f.dst_port),
                (DB, CI, 5432, 40000)
            );
        }
        other => panic!("expected a reject, got {other:?}"),
    }
    assert_eq!(fw.status().denied.get("inbound/rule-2/reject"), Some(&1));
    let dgram = build_udp_ipv4(CI, GW, 1, 2, b"x");
    let mut fw = Firewall::new(
        &rules("[[firewall.inbound]]\nproto = \"udp\"\naction = \"reject\"\n"),
        GW,
        now,
    );
    assert!(
        matches!(fw.check_inbound(&dgram, &p.ci, now), Verdict::Reject(r) if flow_of(&r).unwrap().icmp_type == 3)
    );
}

#[test]
fn replies_to_allowed_flows_pass_both_ways_until_they_expire() {
    let p = peers();
    let now = Instant::now();
    let config = rules(&format!(
        "{GATEWAY_RULES}\n[[firewall.outbound]]\nproto = \"icmp\"\n"
    ));
    let mut fw = Firewall::new(&config, GW, now);
    // Inbound SYN allowed; the server's reply goes out although outbound
    // rules allow only icmp.
    assert_eq!(
        fw.check_inbound(&tcp(CI, DB, 40000, 8080, 2), &p.ci, now),
        Verdict::Allow
    );
    assert_eq!(
        fw.check_outbound(&tcp(DB, CI, 8080, 40000, 0x12), &p.ci, now),
        Verdict::Allow
    );
    assert_eq!(
        fw.check_outbound(&tcp(DB, CI, 8080, 40001, 0x12), &p.ci, now),
        Verdict::Drop,
        "another flow"
    );
    // Outbound ping allowed by rule; its reply comes in although no inbound rule allows it.
    assert_eq!(
        fw.check_outbound(&ping(GW, CI, 8, 9), &p.ci, now),
        Verdict::Allow
    );
    assert_eq!(
        fw.check_inbound(&ping(CI, GW, 0, 9), &p.ci, now),
        Verdict::Allow
    );
    assert_eq!(
        fw.check_inbound(&ping(CI, GW, 0, 10), &p.dev, now),
        Verdict::Drop,
        "other id, other host"
    );
    // Expiry: ICMP 30 s, TCP 12 min (defaults).
    let later = now + Duration::from_secs(31);
    fw.handle_timeout(later);
    assert_eq!(
        fw.check_inbound(&ping(CI, GW, 0, 9), &p.dev, later),
        Verdict::Drop,
        "icmp flow expired"
    );
    assert_eq!(
        fw.check_outbound(&tcp(DB, CI, 8080, 40000, 0x10), &p.ci, later),
        Verdict::Allow,
        "tcp flow lives on"
    );
    let much_later = now + Duration::from_secs(12 * 60 + 32);
    fw.handle_timeout(much_later);
    assert_eq!(fw.status().flows, 0);
    assert_eq!(
        fw.check_outbound(&tcp(DB, CI, 8080, 40000, 0x10), &p.ci, much_later),
        Verdict::Drop
    );
}

#[test]
fn outbound_is_open_without_rules_and_timeouts_follow_config() {
    let p = peers();
    let now = Instant::now();
    let mut fw = Firewall::new(&rules("[firewall]\nudp_timeout = \"5s\"\n"), CI, now);
    let out = build_udp_ipv4(CI, GW, 5353, 53, b"q");
    assert_eq!(fw.check_outbound(&out, &p.dev, now), Verdict::Allow);
    let back = build_udp_ipv4(GW, CI, 53, 5353, b"a");
    assert_eq!(
        fw.check_inbound(&back, &p.dev, now + Duration::from_secs(4)),
        Verdict::Allow
    );
    assert_eq!(
        fw.check_inbound(&back, &p.dev, now + Duration::from_secs(10)),
        Verdict::Drop,
        "idle past the udp timeout"
    );
}

/// An ICMP error from `from` to `to` (type 3 code 4: fragmentation
/// needed, MTU 1420) quoting the first 28 bytes of `quoted`.
fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let mut err = vec![0x45, 0, 0, 56, 0, 0, 0x40, 0, 64, 1, 0, 0];
    err.extend_from_slice(&from.octets());
    err.extend_from_slice(&to.octets());
    err.extend_from_slice(&[3, 4, 0, 0, 0, 0, 5, 0x8c]);
    err.extend_from_slice(&quoted[..28]);
    err
}

#[test]
fn icmp_errors_about_a_flow_pass_with_it() {
    let p = peers();
    let now = Instant::now();
    let mut fw = Firewall::new(&FirewallConfig::default(), CI, now);
    let syn = tcp(CI, DB, 40000, 443, 2);
    assert_eq!(fw.check_outbound(&syn, &p.gw, now), Verdict::Allow);
    // "Fragmentation needed" from a router on the far side, quoting our
    // segment: path MTU discovery works.
    let router = Ipv4Addr::new(198, 19, 0, 1);
    let err = icmp_error(router, CI, &syn);
    assert_eq!(fw.check_inbound(&err, &p.gw, now), Verdict::Allow);
    let unrelated = {
        let mut e = err.clone();
        e[20 + 8 + 20] = 0x11; // another source port in the quote
        e
    };
    assert_eq!(fw.check_inbound(&unrelated, &p.gw, now), Verdict::Drop);
}

#[test]
fn forged_icmp_errors_are_not_tied_to_a_flow_and_are_dropped_and_counted() {
    let p = peers();
    let now = Instant::now();
    // A gateway for DB's network: ci-1 has an allowed flow to DB:8080.
    let mut fw = Firewall::new(&rules(GATEWAY_RULES), GW, now);
    let syn = tcp(CI, DB, 40000, 8080, 2);
    assert_eq!(fw.check_inbound(&syn, &p.ci, now), Verdict::Allow);
    let syn_ack = tcp(DB, CI, 8080, 40000, 0x12);
    assert_eq!(fw.check_outbound(&syn_ack, &p.ci, now), Verdict::Allow);
    // ci-1 sends an "error" about DB's reply, but to another host
    // behind the gateway: not for the host that sent the quoted packet.
    let other = Ipv4Addr::new(198, 19, 0, 77);
    let forged = icmp_error(CI, other, &syn_ack);
    assert_eq!(fw.check_inbound(&forged, &p.ci, now), Verdict::Drop);
    // Another peer (dev-1) quotes the same flow to DB itself: the
    // quoted destination is not on dev-1's side.
    let forged = icmp_error(Ipv4Addr::new(100, 64, 0, 6), DB, &syn_ack);
    assert_eq!(fw.check_inbound(&forged, &p.dev, now), Verdict::Drop);
    let denied = fw.status().denied;
    assert_eq!(
        denied.get("inbound/icmp-error-not-for-its-flow"),
        Some(&2),
        "{denied:?}"
    );
    // The genuine error, from ci-1's side to DB about DB's reply, passes.
    let genuine = icmp_error(CI, DB, &syn_ack);
    assert_eq!(fw.check_inbound(&genuine, &p.ci, now), Verdict::Allow);
    // Outbound alike: an error toward ci-1 about ci-1's own segment
    // passes; one sent to another peer about it does not.
    let router = Ipv4Addr::new(198, 19, 0, 1);
    assert_eq!(
        fw.check_outbound(&icmp_error(router, CI, &syn), &p.ci, now),
        Verdict::Allow
    );
    let to_dev = icmp_error(router, Ipv4Addr::new(100, 64, 0, 6), &syn);
    assert_eq!(fw.check_outbound(&to_dev, &p.dev, now), Verdict::Drop);
}

#[test]
fn reload_keeps_flows_and_applies_new_rules() {
    let p = peers();
    let now = Instant::now();
    let mut fw = Firewall::new(&rules(GATEWAY_RULES), GW, now);
    assert_eq!(
        fw.check_inbound(&tcp(CI, DB, 40000, 8080, 2), &p.ci, now),
        Verdict::Allow
    );
    assert_eq!(
        fw.check_inbound(&tcp(CI, DB, 40001, 9000, 2), &p.ci, now),
        Verdict::Drop
    );
    fw.replace_rules(&rules(
        "[[firewall.inbound]]\nproto = \"tcp\"\nport = \"9000\"\nlocal_cidr = \"198.19.0.0/24\"\n",
    ));
    assert_eq!(
        fw.check_inbound(&tcp(CI, DB, 40001, 9000, 2), &p.ci, now),
        Verdict::Allow,
        "new rule applies"
    );
    assert_eq!(
        fw.check_inbound(&tcp(CI, DB, 40000, 8080, 0x10), &p.ci, now),
        Verdict::Allow,
        "running flow survives"
    );
    assert_eq!(
        fw.check_inbound(&tcp(CI, DB, 40002, 8080, 2), &p.ci, now),
        Verdict::Drop,
        "but no new 8080 flows"
    );
}

#[test]
fn garbage_is_dropped_and_counted() {
    let p = peers();
    let now = Instant::now();
    let mut fw = Firewall::new(&FirewallConfig::default(), GW, now);
    for g in [&[][..], &[0x45], &[0x60; 40]] {
        assert_eq!(fw.check_inbound(g, &p.ci, now), Verdict::Drop);
    }
    assert_eq!(fw.status().denied.get("inbound/malformed"), Some(&3));
}

/// Log lines written while `f` runs.
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = logs.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn denials_are_logged_with_the_protocol_named_and_ports_only_for_tcp_and_udp() {
    let p = peers();
    let now = Instant::now();
    let mut fw = Firewall::new(
        &rules(&GATEWAY_RULES.replacen("[firewall]\n", "[firewall]\nlog = true\n", 1)),
        GW,
        now,
    );
    let dev = Ipv4Addr::new(100, 64, 0, 6);
    let logs = logged(|| {
        assert_eq!(
            fw.check_inbound(&ping(dev, GW, 8, 29684), &p.dev, now),
            Verdict::Drop
        );
        assert_eq!(
            fw.check_inbound(&tcp(CI, DB, 40002, 9999, 2), &p.ci, now),
            Verdict::Drop
        );
    });
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 2, "{logs}");
    let icmp = lines[0];
    for want in ["proto=icmp", "icmp_type=8", "icmp_code=0", "groups=dev"] {
        assert!(icmp.contains(want), "{want} in {icmp}");
    }
    assert!(!icmp.contains("port"), "no ports for ICMP: {icmp}");
    assert!(!icmp.contains("29684"), "the echo id is no port: {icmp}");
    let tcp = lines[1];
    for want in [
        "proto=tcp",
        "src_port=40002",
        "dst_port=9999",
        "groups=ci, deploy",
    ] {
        assert!(tcp.contains(want), "{want} in {tcp}");
    }
    assert!(!tcp.contains("icmp"), "{tcp}");
}

proptest::proptest! {
    #[test]
    fn arbitrary_packets_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
        let p = peers();
        let now = Instant::now();
        let mut fw = Firewall::new(&rules(GATEWAY_RULES), GW, now);
        let _ = fw.check_inbound(&bytes, &p.ci, now);
        let _ = fw.check_outbound(&bytes, &p.ci, now);
    }
}

fn recording(rules_text: &str, now: Instant) -> Firewall {
    let mut fw = Firewall::new(&rules(rules_text), GW, now);
    fw.record_flows(true);
    fw
}

#[test]
fn a_tcp_flow_is_recorded_when_it_closes_with_its_bytes_each_way() {
    let p = peers();
    let t0 = Instant::now();
    let mut fw = recording(GATEWAY_RULES, t0);
    let syn = tcp(CI, DB, 40000, 8080, 0x02);
    let synack = tcp(DB, CI, 8080, 40000, 0x12);
    let mut data = tcp(CI, DB, 40000, 8080, 0x18);
    data.extend_from_slice(&[7u8; 100]);
    let fin_in = tcp(CI, DB, 40000, 8080, 0x11);
    let fin_out = tcp(DB, CI, 8080, 40000, 0x11);
    let last_ack = tcp(CI, DB, 40000, 8080, 0x10);
    let t = |ms: u64| t0 + Duration::from_millis(ms);
    assert_eq!(fw.check_inbound(&syn, &p.ci, t(0)), Verdict::Allow);
    assert_eq!(fw.check_outbound(&synack, &p.ci, t(1)), Verdict::Allow);
    assert_eq!(fw.check_inbound(&data, &p.ci, t(2)), Verdict::Allow);
    assert_eq!(fw.check_inbound(&fin_in, &p.ci, t(3)), Verdict::Allow);
    assert_eq!(fw.records_waiting(), 0, "half closed: still open");
    assert_eq!(fw.check_outbound(&fin_out, &p.ci, t(4)), Verdict::Allow);
    assert_eq!(
        fw.check_inbound(&last_ack, &p.ci, t(5)),
        Verdict::Allow,
        "the last ACK passes"
    );
    let records = fw.take_records(10);
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(
        (r.reason, r.allowed, r.rule),
        (EndReason::Closed, true, Some(0))
    );
    assert_eq!(
        (r.src, r.src_port, r.dst, r.dst_port, r.proto),
        (CI, 40000, DB, 8080, 6)
    );
    assert_eq!(r.caller.name(), "ci-1");
    assert_eq!((r.packets_in, r.bytes_in), (3, 40 + 140 + 40));
    assert_eq!((r.packets_out, r.bytes_out), (2, 80));
    assert_eq!((r.started, r.ended), (t(0), t(4)));
    // The ACK after the record made no second one, and the entry goes.
    fw.handle_timeout(t(20_000));
    assert!(fw.take_records(10).is_empty());
    assert_eq!(fw.status().flows, 0);
    assert_eq!(fw.record_counts(), (1, 0));
}

#[test]
fn a_reset_closes_and_idle_flows_are_recorded_as_idle() {
    let p = peers();
    let t0 = Instant::now();
    let mut fw = recording(GATEWAY_RULES, t0);
    fw.check_inbound(&tcp(CI, DB, 40000, 8080, 0x02), &p.ci, t0);
    fw.check_outbound(&tcp(DB, CI, 8080, 40000, 0x04), &p.ci, t0);
    assert_eq!(fw.take_records(10)[0].reason, EndReason::Closed);

    let udp_rules = "[[firewall.inbound]]\nproto = \"udp\"\nport = \"53\"\nlocal_cidr = \"198.19.0.0/24\"\n[[firewall.inbound]]\nproto = \"icmp\"\n";
    let mut fw = recording(udp_rules, t0);
    let q = build_udp_ipv4(CI, DB, 5353, 53, b"query");
    let a = build_udp_ipv4(DB, CI, 53, 5353, b"answer!");
    assert_eq!(fw.check_inbound(&q, &p.ci, t0), Verdict::Allow);
    assert_eq!(
        fw.check_outbound(&a, &p.ci, t0 + Duration::from_secs(1)),
        Verdict::Allow
    );
    assert_eq!(
        fw.check_inbound(&ping(CI, GW, 8, 77), &p.ci, t0),
        Verdict::Allow
    );
    fw.handle_timeout(t0 + Duration::from_secs(60));
    let icmp = fw.take_records(10);
    assert_eq!(icmp.len(), 1, "ICMP times out first: {icmp:?}");
    assert_eq!(
        (icmp[0].proto, icmp[0].dst_port, icmp[0].src_port),
        (1, 0, 0),
        "no echo id as a port"
    );
    fw.handle_timeout(t0 + Duration::from_secs(3 * 60 + 2));
    let records = fw.take_records(10);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(
        (r.reason, r.rule, r.dst_port, r.proto),
        (EndReason::Idle, Some(0), 53, 17)
    );
    assert_eq!(
        (r.packets_in, r.bytes_in, r.packets_out, r.bytes_out),
        (1, 33, 1, 35)
    );
    assert_eq!(
        r.ended,
        t0 + Duration::from_secs(1),
        "ended with its last packet"
    );
}

#[test]
fn refusals_are_summed_per_destination_and_rule_over_a_window() {
    let p = peers();
    let t0 = Instant::now();
    let mut fw = recording(GATEWAY_RULES, t0);
    // A scan of ports 9000-9099 on DB (default deny), three attempts at 5432 (rule 2 rejects).
    for port in 9000..9100 {
        assert_eq!(
            fw.check_inbound(&tcp(CI, DB, 40000, port, 0x02), &p.ci, t0),
            Verdict::Drop
        );
    }
    for i in 0..3 {
        let at = t0 + Duration::from_secs(i);
        assert!(matches!(
            fw.check_inbound(&tcp(CI, DB, 40001, 5432, 0x02), &p.ci, at),
            Verdict::Reject(_)
        ));
    }
    fw.handle_timeout(t0 + Duration::from_secs(30));
    assert!(fw.take_records(10).is_empty(), "summed for a minute");
    fw.handle_timeout(t0 + records::DENIED_WINDOW);
    let mut records = fw.take_records(10);
    records.sort_by_key(|r| r.rule);
    assert_eq!(records.len(), 2, "{records:?}");
    let scan = &records[0];
    assert_eq!(
        (scan.allowed, scan.rule, scan.reason),
        (false, None, EndReason::Denied)
    );
    assert_eq!(
        (scan.dst, scan.dst_port, scan.dst_port_last, scan.packets_in),
        (DB, 9000, 9099, 100)
    );
    let reject = &records[1];
    assert_eq!(
        (reject.rule, reject.packets_in, reject.dst_port),
        (Some(2), 3, 5432)
    );
    assert_eq!(reject.ended, t0 + Duration::from_secs(2));
}

#[test]
fn a_flood_of_destinations_is_summed_wide_and_never_grows_past_its_bounds() {
    let p = peers();
    let t0 = Instant::now();
    let mut fw = recording(GATEWAY_RULES, t0);
    let n = records::MAX_DENIED_SUMS as u32 + 500;
    for i in 0..n {
        let dst = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i);
        fw.check_inbound(&tcp(CI, dst, 40000, 9999, 0x02), &p.ci, t0);
    }
    fw.handle_timeout(t0 + records::DENIED_WINDOW);
    let records = fw.take_records(usize::MAX);
    assert_eq!(records.len(), records::MAX_DENIED_SUMS + 1);
    let wide: Vec<_> = records
        .iter()
        .filter(|r| r.dst == Ipv4Addr::UNSPECIFIED)
        .collect();
    assert_eq!(wide.len(), 1);
    assert_eq!(wide[0].packets_in, 500);
    assert_eq!(
        records.iter().map(|r| r.packets_in).sum::<u64>(),
        u64::from(n)
    );
}

#[test]
fn revoked_callers_flows_end_and_stopping_records_the_rest() {
    let p = peers();
    let t0 = Instant::now();
    let mut fw = recording(GATEWAY_RULES, t0);
    fw.check_inbound(&tcp(CI, DB, 40000, 8080, 0x02), &p.ci, t0);
    fw.check_inbound(&tcp(CI, DB, 40001, 8080, 0x02), &p.ci, t0);
    fw.check_inbound(
        &tcp(Ipv4Addr::new(100, 64, 0, 6), DB, 40000, 8080, 0x02),
        &p.dev,
        t0,
    );
    fw.end_flows_of(&[p.ci.fingerprint()], EndReason::Revoked);
    let revoked = fw.take_records(10);
    assert_eq!(revoked.len(), 2);
    assert!(revoked
        .iter()
        .all(|r| r.reason == EndReason::Revoked && r.caller.name() == "ci-1"));
    assert_eq!(
        fw.status().flows,
        0,
        "dev-1 was denied; ci-1's flows are gone"
    );
    // A packet of the ended flow is checked afresh (here: allowed, a new flow).
    fw.check_inbound(&tcp(CI, DB, 40000, 8080, 0x10), &p.ci, t0);
    fw.stop_recording(t0);
    let stopped = fw.take_records(10);
    assert_eq!(stopped.len(), 2, "{stopped:?}");
    assert!(stopped.iter().any(|r| r.reason == EndReason::Stopped));
    assert!(stopped
        .iter()
        .any(|r| r.reason == EndReason::Denied && r.caller.name() == "dev-1"));
}

#[test]
fn a_full_queue_drops_records_never_packets() {
    let p = peers();
    let t0 = Instant::now();
    let mut fw = recording(GATEWAY_RULES, t0);
    let n = RECORD_QUEUE as u16 + 100;
    for port in 0..n {
        let sport = 1000 + port;
        assert_eq!(
            fw.check_inbound(&tcp(CI, DB, sport, 8080, 0x02), &p.ci, t0),
            Verdict::Allow
        );
        assert_eq!(
            fw.check_outbound(&tcp(DB, CI, 8080, sport, 0x04), &p.ci, t0),
            Verdict::Allow
        );
    }
    assert_eq!(fw.records_waiting(), RECORD_QUEUE);
    assert_eq!(fw.record_counts(), (RECORD_QUEUE as u64, 100));
    // Without records, nothing is kept.
    let mut quiet = Firewall::new(&rules(GATEWAY_RULES), GW, t0);
    quiet.check_inbound(&tcp(CI, DB, 1, 8080, 0x02), &p.ci, t0);
    quiet.check_inbound(&tcp(CI, DB, 1, 9, 0x02), &p.ci, t0);
    quiet.stop_recording(t0);
    assert_eq!(quiet.records_waiting(), 0);
}

#[test]
fn a_new_connection_on_a_closed_flows_ports_is_a_new_flow() {
    let p = peers();
    let t0 = Instant::now();
    let mut fw = recording(GATEWAY_RULES, t0);
    for _ in 0..2 {
        fw.check_inbound(&tcp(CI, DB, 40000, 8080, 0x02), &p.ci, t0);
        fw.check_outbound(&tcp(DB, CI, 8080, 40000, 0x04), &p.ci, t0);
    }
    assert_eq!(fw.take_records(10).len(), 2);
}
