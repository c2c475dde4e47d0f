//! NAT traversal on real kernels: nodes behind their own NAT namespaces
//! (iptables MASQUERADE, port-preserving or `--random-fully`), a lighthouse
//! on the "internet", real curl and python's http.server across the overlay.
//! Direct paths through two NATs, the relay when there is none, lost
//! lighthouses, a NAT that changes address mid-transfer, packet loss, and
//! garbage thrown at the daemons. Needs root.

use std::fs;
use std::time::{Duration, Instant};

use tern_netns_tests::nat::*;
use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, Proc};

fn tools(test: &str) -> bool {
    require_root(test) && require_tools(test, &["curl", "python3", "iptables", "ping", "ss"])
}

/// Both behind port-preserving NATs: a direct path; the relay carried no
/// more than the first handshake (sent both ways at once) and a packet or
/// two before the direct path was proven.
#[test]
fn two_port_preserving_nats_give_a_direct_path() {
    if !tools("nat_direct") {
        return;
    }
    let _serial = serial();
    let w = world("natdirect", Nat::PortPreserving, Nat::PortPreserving);
    let start = Instant::now();
    wait_until(
        "a pings b through two NATs",
        Duration::from_secs(10),
        || pings(&w.a.node, B_OVERLAY),
    );
    let first_ping = start.elapsed();
    w.wait_path("direct", Duration::from_secs(10));
    let (ping, status) = w.ping_and_status("a", B_OVERLAY);
    assert!(
        ping.contains("answer from b (100.64.0.6)") && ping.contains("direct to 198.18.0.3:"),
        "{ping}"
    );
    assert!(status.contains("direct 198.18.0.3:"), "{status}");
    w.fetch(None, 60);
    let relay = w.relay();
    assert_near_zero_relayed(&relay);
    eprintln!("nat_direct: first ping answered {first_ping:?} after the first attempt");
}

/// Both behind `--random-fully` NATs: no direct path exists; the relay
/// carries the transfer and nothing but WireGuard messages.
#[test]
fn symmetric_nats_go_through_the_relay() {
    if !tools("nat_relayed") {
        return;
    }
    let _serial = serial();
    let w = world("natrelay", Nat::RandomFully, Nat::RandomFully);
    wait_until(
        "a pings b through the relay",
        Duration::from_secs(15),
        || pings(&w.a.node, B_OVERLAY),
    );
    w.wait_path("relayed", Duration::from_secs(5));
    let (ping, status) = w.ping_and_status("b", "a");
    assert!(
        ping.contains("answer from a (100.64.0.5)") && ping.contains("relayed via 198.18.0.1:4242"),
        "{ping}"
    );
    assert!(status.contains("relayed via 198.18.0.1:4242"), "{status}");
    w.fetch(None, 90);
    let relay = w.relay();
    let data = relay_counter(&relay, "forwarded_data");
    assert!(data > (BLOB_MB as u64 * 1_000_000) / 1500, "{relay}");
    assert!(
        relay_counter(&relay, "forwarded_handshake_initiation") >= 1,
        "{relay}"
    );
    assert!(
        relay_counter(&relay, "forwarded_handshake_response") >= 1,
        "{relay}"
    );
    assert_eq!(relay_counter(&relay, "refused_malformed"), 0, "{relay}");
    assert_eq!(
        relay_counter(&relay, "refused_not_introduced"),
        0,
        "{relay}"
    );
    let lh_status = std::process::Command::new(tern_netns_tests::workspace_bin("tern-lighthouse"))
        .args(["status", "--socket"])
        .arg(w.dir.join("lh1.sock"))
        .output()
        .unwrap_or_else(|e| panic!("tern-lighthouse status: {e}"));
    let lh_text = String::from_utf8_lossy(&lh_status.stdout);
    assert!(lh_text.contains("relay: 1 introduced pairs"), "{lh_text}");
    // Still relayed after the background punching had its chances.
    assert_eq!(w.path("a", B_OVERLAY).as_deref(), Some("relayed"));
}

/// One node behind a NAT, the other on the internet: direct.
#[test]
fn one_nat_and_one_public_node_go_direct() {
    if !tools("nat_public") {
        return;
    }
    let _serial = serial();
    let w = world("natpublic", Nat::RandomFully, Nat::Public);
    wait_until("a pings b", Duration::from_secs(10), || {
        pings(&w.a.node, B_OVERLAY)
    });
    w.wait_path("direct", Duration::from_secs(10));
    w.fetch(None, 60);
    assert_near_zero_relayed(&w.relay());
}

/// What a direct pair may have sent through the relay: the first
/// handshake and a few packets while the direct path was being proven
/// (data goes through the relay from the first packet), never the
/// transfer that followed.
fn assert_near_zero_relayed(relay: &serde_json::Value) {
    assert!(relay_counter(relay, "forwarded_data") <= 4, "{relay}");
    assert!(relay_counter(relay, "forwarded_bytes") <= 4096, "{relay}");
}

/// Drops (`-I`) or allows again (`-D`) all UDP between the two NATs.
fn udp_between_nats(w: &World, op: &str) {
    for (site, other) in [(&w.a, &w.b), (&w.b, &w.a)] {
        let nat = site.nat.as_ref().unwrap_or_else(|| unreachable!());
        let wan_if = site.nat_wan_if.as_deref().unwrap_or_else(|| unreachable!());
        nat.run(
            "iptables",
            [
                op,
                "FORWARD",
                "-o",
                wan_if,
                "-p",
                "udp",
                "-d",
                &other.public_ip,
                "-j",
                "DROP",
            ],
        );
    }
}

/// Two port-preserving NATs with all UDP between them dropped: a reaches
/// b, through the relay.
fn blocked_world(name: &str) -> World {
    let w = world(name, Nat::PortPreserving, Nat::PortPreserving);
    udp_between_nats(&w, "-I");
    wait_until(
        "a pings b through the relay",
        Duration::from_secs(15),
        || pings(&w.a.node, B_OVERLAY),
    );
    w.wait_path("relayed", Duration::from_secs(5));
    w
}

/// A firewall drops all UDP between the two NATs: relayed.
#[test]
fn udp_blocked_between_the_nats_goes_through_the_relay() {
    if !tools("nat_blocked") {
        return;
    }
    let _serial = serial();
    let w = blocked_world("natblock");
    w.fetch(None, 90);
    assert!(relay_counter(&w.relay(), "forwarded_data") > 0);
}

/// A transfer that starts through the relay (UDP between the NATs
/// blocked) moves to the direct path when the firewall opens, in the
/// middle, without a new handshake, and arrives whole (20 MB,
/// hash-checked).
#[test]
fn a_relayed_transfer_moves_to_the_direct_path_when_one_opens() {
    if !tools("nat_relay_to_direct") {
        return;
    }
    let _serial = serial();
    let w = blocked_world("natswitch");
    let handshakes = |name: &str| counter(&status(&w.dir, name), "mesh_counters", "handshakes");
    let before = handshakes("a");
    let relayed_before = relay_counter(&w.relay(), "forwarded_bytes");
    std::thread::scope(|scope| {
        // 20 MB at 1.5 MB/s: about 13 s, the first second through the
        // relay; the background punching (every 5 s at most by then) finds
        // the opened path well before the end.
        let transfer = scope.spawn(|| w.fetch(Some("1500K"), 60));
        std::thread::sleep(Duration::from_millis(1000));
        udp_between_nats(&w, "-D");
        w.wait_path("direct", Duration::from_secs(15));
        assert!(
            !transfer.is_finished(),
            "the path moved in the middle of the transfer"
        );
        if transfer.join().is_err() {
            panic!("the transfer failed");
        }
    });
    assert!(
        relay_counter(&w.relay(), "forwarded_bytes") > relayed_before + 1_000_000,
        "part of it went through the relay"
    );
    assert_eq!(handshakes("a"), before, "no new handshake for the move");
}

/// The lighthouse dies in the middle of a transfer over a direct path: the
/// transfer finishes.
#[test]
fn transfer_survives_the_lighthouse_dying() {
    if !tools("nat_lhdies") {
        return;
    }
    let _serial = serial();
    let w = world("natlhdies", Nat::PortPreserving, Nat::PortPreserving);
    wait_until("a pings b", Duration::from_secs(10), || {
        pings(&w.a.node, B_OVERLAY)
    });
    w.wait_path("direct", Duration::from_secs(10));
    let killer = {
        let pid = w.lighthouse.pid();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        })
    };
    // 20 MB at 4 MB/s: about 5 s, the lighthouse gone after the first.
    w.fetch(Some("4M"), 60);
    let _ = killer.join();
    assert!(!w.lighthouse.is_running(), "the lighthouse really died");
}

/// a's NAT gets a new public address mid-transfer (its old mappings die
/// with the old address): the transfer completes.
#[test]
fn transfer_survives_the_nat_changing_its_public_address() {
    if !tools("nat_readdr") {
        return;
    }
    let _serial = serial();
    let w = world("natreaddr", Nat::PortPreserving, Nat::PortPreserving);
    wait_until("a pings b", Duration::from_secs(10), || {
        pings(&w.a.node, B_OVERLAY)
    });
    w.wait_path("direct", Duration::from_secs(10));
    let nat = w.a.nat.clone().unwrap_or_else(|| unreachable!());
    let wan_if = w.a.nat_wan_if.clone().unwrap_or_else(|| unreachable!());
    let mover = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        // MASQUERADE forgets the mappings of an address that goes away.
        nat.ip(["addr", "del", "198.18.0.2/24", "dev", &wan_if]);
        nat.ip(["addr", "add", "198.18.0.4/24", "dev", &wan_if]);
    });
    // 20 MB at 3 MB/s: about 7 s, the address changing after 2.
    w.fetch(Some("3M"), 45);
    if mover.join().is_err() {
        panic!("re-addressing a's NAT failed (see above)");
    }
    let observed: Vec<String> = lighthouse_status(&w.dir)["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter_map(|x| x["observed"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        observed.iter().any(|o| o.starts_with("198.18.0.4:")),
        "a registered from its new address: {observed:?}"
    );
}

/// 5 % of the packets crossing each NAT are dropped: the handshake and a
/// hash-checked transfer still complete.
#[test]
fn handshake_and_transfer_complete_with_five_percent_loss() {
    if !tools("nat_loss") {
        return;
    }
    let _serial = serial();
    let w = world("natloss", Nat::PortPreserving, Nat::PortPreserving);
    for site in [&w.a, &w.b] {
        let nat = site.nat.as_ref().unwrap_or_else(|| unreachable!());
        forward_loss(nat, true);
    }
    wait_until(
        "a pings b despite the loss",
        Duration::from_secs(20),
        || pings(&w.a.node, B_OVERLAY),
    );
    w.fetch(None, 120);
}

/// Garbage at the lighthouse and at a node, relay requests from strangers:
/// counted and dropped, no crash, no unbounded state.
#[test]
fn garbage_and_stranger_relay_requests_are_dropped() {
    if !tools("nat_garbage") {
        return;
    }
    let _serial = serial();
    let w = world("natgarbage", Nat::Public, Nat::PortPreserving);
    wait_until("a pings b", Duration::from_secs(10), || {
        pings(&w.a.node, B_OVERLAY)
    });
    let attacker = w.lab.add_ns("attacker");
    w.lab.connect_to_wan(&attacker, "198.18.0.66/24");
    let rss = |proc: &Proc| -> u64 {
        fs::read_to_string(format!("/proc/{}/status", proc.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    let lh_before = rss(&w.lighthouse);
    let a_before = rss(&w.node_a);
    // 20,000 datagrams of every kind of garbage, and relay requests for b
    // from an address no node registered from, bounded in count and time.
    let script = format!(
        r#"
import os, random, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
targets = [("{lh}", 4242), ("198.18.0.2", 4242)]
random.seed(7)
deadline = time.time() + 20
for i in range(20000):
    if time.time() > deadline:
        break
    kind = i % 5
    if kind == 0:
        data = os.urandom(random.randint(0, 1500))
    elif kind == 1:
        data = bytes([random.randint(1, 4)]) + os.urandom(random.randint(0, 200))
    elif kind == 2:
        data = bytes([0x10]) + os.urandom(random.randint(0, 1100))
    elif kind == 3:
        data = bytes([0x11, 100, 64, 0, 6, 4]) + os.urandom(random.randint(15, 200))
    else:
        data = bytes([0x12, 100, 64, 0, 5, 4]) + os.urandom(random.randint(15, 200))
    for t in targets:
        s.sendto(data, t)
print("sent")
"#,
        lh = LH_UNDERLAY
    );
    let out = attacker.exec_timeout("python3", ["-c", &script], Duration::from_secs(40));
    let out = out.unwrap_or_else(|| panic!("the garbage sender did not finish in 40 s"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(w.lighthouse.is_running(), "the lighthouse survived");
    let relay = w.relay();
    assert!(
        relay_counter(&relay, "refused_unregistered_sender") >= 3000,
        "stranger relay requests refused: {relay}"
    );
    assert_eq!(relay_counter(&relay, "forwarded_data"), 0, "{relay}");
    let lh_after = rss(&w.lighthouse);
    assert!(
        lh_after < lh_before + 8 * 1024,
        "lighthouse RSS grew from {lh_before} to {lh_after} KiB"
    );
    let a_after = rss(&w.node_a);
    assert!(
        a_after < a_before + 8 * 1024,
        "node a's RSS grew from {a_before} to {a_after} KiB"
    );
    // The node still works and counted what it dropped.
    assert!(pings(&w.a.node, B_OVERLAY), "a still reaches b");
    let a = status(&w.dir, "a");
    let dropped = counter(&a, "mesh_counters", "unknown_datagrams")
        + counter(&a, "mesh_counters", "relay_drops")
        + counter(&a, "mesh_counters", "wireguard_errors")
        + counter(&a, "mesh_counters", "unknown_session_index")
        + counter(&a, "mesh_counters", "rejected_certs")
        + counter(&a, "mesh_counters", "malformed_hellos")
        + counter(&a, "mesh_counters", "rate_limited");
    assert!(dropped >= 1000, "a counted the garbage it dropped: {a}");
}

/// Two lighthouses: with either one dead, nodes behind NATs that never met
/// still find each other, and established pairs keep talking.
#[test]
fn with_two_lighthouses_losing_one_changes_nothing() {
    if !tools("nat_two_lh") {
        return;
    }
    let _serial = serial();
    let lab = tern_netns_tests::Lab::new("nattwolh");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh1_ns = lab.add_ns("lh1");
    let lh2_ns = lab.add_ns("lh2");
    lab.connect_to_wan(&lh1_ns, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&lh2_ns, "198.18.0.10/24");
    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(
        &dir,
        "ca",
        "lh2",
        "100.64.0.2/10",
        &["--groups", "lighthouse"],
    );
    let lh2_config = write_file(
        &dir,
        "lh2.toml",
        "[pki]\nca = \"ca.crt\"\ncert = \"lh2.crt\"\nkey = \"lh2.key\"\n[listen]\naddr = \"0.0.0.0:4242\"\n[api]\nsocket = \"lh2.sock\"\n",
    );
    let lh1 = start_lighthouse(&lh1_ns, &write_lighthouse_config(&dir));
    let bin = tern_netns_tests::workspace_bin("tern-lighthouse");
    let _lh2 = lh2_ns.spawn(
        &bin.to_string_lossy(),
        ["--config", &lh2_config.to_string_lossy()],
        "lighthouse-2",
    );
    let mut nodes = Vec::new();
    let mut sites = Vec::new();
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        let ip = format!("100.64.0.{}", 5 + i);
        sign(&dir, "ca", name, &format!("{ip}/10"), &[]);
        let public = format!("198.18.0.{}", 2 + i);
        let s = site(&lab, name, Nat::PortPreserving, &public, 1 + i as u8);
        sites.push((s, ip));
    }
    // a and b meet while both lighthouses live.
    for (s, _) in &sites[..2] {
        let name = s.node.short_name().to_string();
        let config = write_node_config_with(&dir, &name, "ca.crt", &["198.18.0.10:4242"]);
        nodes.push(start_node(&s.node, &config, &format!("node-{name}")));
    }
    wait_until("a pings b", Duration::from_secs(15), || {
        pings(&sites[0].0.node, &sites[1].1)
    });
    // lh1 dies. a and b keep talking; c and d, new, meet through lh2 alone.
    assert!(lh1.terminate_and_wait(Duration::from_secs(5)).is_some());
    for (s, _) in &sites[2..] {
        let name = s.node.short_name().to_string();
        let config = write_node_config_with(&dir, &name, "ca.crt", &["198.18.0.10:4242"]);
        nodes.push(start_node(&s.node, &config, &format!("node-{name}")));
    }
    wait_until(
        "c pings d through lh2 alone",
        Duration::from_secs(20),
        || pings(&sites[2].0.node, &sites[3].1),
    );
    assert!(pings(&sites[0].0.node, &sites[1].1), "a still reaches b");
    wait_until(
        "c reaches a, met after lh1 died",
        Duration::from_secs(10),
        || pings(&sites[2].0.node, &sites[0].1),
    );
}

/// Dual stack: IPv4 through two `--random-fully` NATs (no direct IPv4 path
/// exists), IPv6 global and open. The nodes listen on `[::]:4242`, offer
/// their IPv6 addresses as candidates, and the path goes direct over IPv6
/// instead of staying on the relay; the transfer is hash-checked.
#[test]
fn symmetric_ipv4_nats_with_open_ipv6_go_direct_over_ipv6() {
    if !tools("nat_dual_stack") {
        return;
    }
    let _serial = serial();
    let w = world_v6("natdual", Nat::RandomFully, Nat::RandomFully);
    wait_until("a pings b", Duration::from_secs(10), || {
        pings(&w.a.node, B_OVERLAY)
    });
    w.wait_path("direct", Duration::from_secs(15));
    let peers = status(&w.dir, "a")["peers"].clone();
    let to_b = peers
        .as_array()
        .and_then(|p| p.iter().find(|p| p["overlay_ip"] == B_OVERLAY))
        .unwrap_or_else(|| panic!("a has no peer b: {peers}"));
    assert_eq!(to_b["endpoint"], "[2001:db8:2::2]:4242", "{to_b}");
    let relayed_before = relay_counter(&w.relay(), "forwarded_bytes");
    w.fetch(None, 60);
    assert!(
        relay_counter(&w.relay(), "forwarded_bytes") < relayed_before + 100_000,
        "the transfer did not go through the relay"
    );
}

/// Two nodes behind `--random-fully` NATs and a public node r with
/// `[relay]` and the relay group: the lighthouse hands the pair to r, both
/// open sessions with it, and r carries their 20 MB (hash-checked); the
/// lighthouse's relay carries at most the first packets.
#[test]
fn a_node_with_relay_carries_a_pair_the_lighthouse_hands_it() {
    if !tools("nat_node_relay") {
        return;
    }
    let _serial = serial();
    let w = world("natnrel", Nat::RandomFully, Nat::RandomFully);
    let r = w.lab.add_ns("r");
    w.lab.connect_to_wan(&r, "198.18.0.9/24");
    sign(&w.dir, "ca", "r", "100.64.0.9/10", &["--groups", "relay"]);
    let config = open_config("r") + "[relay]\nenabled = true\n";
    let r_node = start_node(&r, &write_file(&w.dir, "r.toml", &config), "node-r");
    r_node.wait_for_log("relaying for pairs", Duration::from_secs(10));
    wait_until("r registers", Duration::from_secs(15), || {
        lighthouse_status(&w.dir)["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 3)
    });
    // r has offered (with its registration) before a asks for b.
    std::thread::sleep(Duration::from_millis(500));
    wait_until("a pings b through r", Duration::from_secs(15), || {
        pings(&w.a.node, B_OVERLAY)
    });
    w.wait_path("relayed", Duration::from_secs(5));
    wait_until("a and b go through r", Duration::from_secs(10), || {
        ["a", "b"].iter().all(|n| {
            status(&w.dir, n)["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["overlay_ip"] == B_OVERLAY || p["overlay_ip"] == "100.64.0.5")
                .all(|p| p["relay"] == "198.18.0.9:4242")
        })
    });
    let lh_before = relay_counter(&w.relay(), "forwarded_data");
    w.fetch(None, 90);
    let by_r = status(&w.dir, "r")["relaying"].clone();
    assert!(
        relay_counter(&by_r, "forwarded_data") > (BLOB_MB as u64 * 1_000_000) / 1500,
        "{by_r}"
    );
    let lh = w.relay();
    assert!(
        relay_counter(&lh, "forwarded_data") - lh_before < 10,
        "the lighthouse carried the transfer: {lh}"
    );
    let (ping, _) = w.ping_and_status("a", "b");
    assert!(ping.contains("relayed via 198.18.0.9:4242"), "{ping}");
}
