//! NAT traversal on real kernels: nodes behind their own NAT namespaces
//! (iptables MASQUERADE, port-preserving or `--random-fully`), a lighthouse
//! on the "internet", real curl and python's http.server across the overlay.
//! Direct paths through two NATs, the relay when there is none, lost
//! lighthouses, a NAT that changes address mid-transfer, packet loss, and
//! garbage thrown at the daemons. Needs root.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, Lab, Ns, Proc};

const A_OVERLAY: &str = "100.64.0.5";
const B_OVERLAY: &str = "100.64.0.6";
const BLOB_MB: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nat {
    /// On the internet itself, no NAT.
    Public,
    /// MASQUERADE: keeps the source port when it can.
    PortPreserving,
    /// MASQUERADE --random-fully: a random port per destination (symmetric).
    RandomFully,
}

/// One node's place: its namespace, and the NAT namespace in front of it.
struct Site {
    node: Ns,
    nat: Option<Ns>,
    /// The NAT's interface on the internet, and its address there.
    nat_wan_if: Option<String>,
    public_ip: String,
}

/// Puts a node called `name` on the internet at `public_ip`, or behind a
/// NAT whose outside address is `public_ip` and inside network 198.18.`inside`.0/24.
fn site(lab: &Lab, name: &str, nat: Nat, public_ip: &str, inside: u8) -> Site {
    if nat == Nat::Public {
        let node = lab.add_ns(name);
        lab.connect_to_wan(&node, &format!("{public_ip}/24"));
        return Site {
            node,
            nat: None,
            nat_wan_if: None,
            public_ip: public_ip.to_string(),
        };
    }
    let router = lab.add_ns(&format!("nat-{name}"));
    let wan_if = lab.connect_to_wan(&router, &format!("{public_ip}/24"));
    let node = lab.add_ns(name);
    lab.link(
        &router,
        &format!("198.18.{inside}.1/24"),
        &node,
        &format!("198.18.{inside}.2/24"),
    );
    node.ip([
        "route",
        "add",
        "default",
        "via",
        &format!("198.18.{inside}.1"),
    ]);
    router.sysctl("net.ipv4.ip_forward", "1");
    let mut rule = vec![
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        wan_if.as_str(),
        "-j",
        "MASQUERADE",
    ];
    if nat == Nat::RandomFully {
        rule.push("--random-fully");
    }
    router.run("iptables", rule);
    // Like any router: nothing unsolicited from the internet reaches the
    // router itself. (Without this, Linux keeps a conntrack entry for each
    // unsolicited datagram it answers with "port unreachable", and a punch
    // that arrives a moment before our own first packet leaves makes
    // MASQUERADE give that packet another port: a NAT no router ships.)
    router.run(
        "iptables",
        [
            "-A",
            "INPUT",
            "-i",
            wan_if.as_str(),
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ],
    );
    Site {
        node,
        nat: Some(router),
        nat_wan_if: Some(wan_if),
        public_ip: public_ip.to_string(),
    }
}

struct World {
    lab: Lab,
    dir: PathBuf,
    lighthouse: Proc,
    a: Site,
    b: Site,
    _node_a: Proc,
    _node_b: Proc,
    _http: Proc,
}

fn open_config(name: &str) -> String {
    format!(
        "{}[[firewall.inbound]]\nproto = \"any\"\n",
        node_config_text(name, "ca.crt")
    )
}

/// Lighthouse, nodes a and b behind NATs of the given kinds, b serving a
/// `BLOB_MB` MB file over HTTP on its overlay address; both registered.
fn world(prefix: &str, nat_a: Nat, nat_b: Nat) -> World {
    let lab = Lab::new(prefix);
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh_ns = lab.add_ns("lh");
    lab.connect_to_wan(&lh_ns, &format!("{LH_UNDERLAY}/24"));
    let a = site(&lab, "a", nat_a, "198.18.0.2", 1);
    let b = site(&lab, "b", nat_b, "198.18.0.3", 2);

    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(&dir, "ca", "a", &format!("{A_OVERLAY}/10"), &[]);
    sign(&dir, "ca", "b", &format!("{B_OVERLAY}/10"), &[]);
    let lighthouse = start_lighthouse(&lh_ns, &write_lighthouse_config(&dir));
    let node_a = start_node(
        &a.node,
        &write_file(&dir, "a.toml", &open_config("a")),
        "node-a",
    );
    let node_b = start_node(
        &b.node,
        &write_file(&dir, "b.toml", &open_config("b")),
        "node-b",
    );
    wait_until("a and b register", Duration::from_secs(15), || {
        lighthouse_status(&dir)["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2)
    });

    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap_or_else(|e| panic!("mkdir www: {e}"));
    let blob: Vec<u8> = (0..BLOB_MB * 1_000_000)
        .map(|i| (i * 7 + i / 1000) as u8)
        .collect();
    fs::write(www.join("blob.bin"), &blob).unwrap_or_else(|e| panic!("write blob: {e}"));
    let mut cmd = b.node.command("python3");
    cmd.args([
        "-m",
        "http.server",
        "--bind",
        B_OVERLAY,
        "8080",
        "--directory",
    ])
    .arg(&www);
    let http = b.node.spawn_command(cmd, "http-b");
    wait_until("b's http server listens", Duration::from_secs(10), || {
        b.node
            .exec("ss", ["-ltn", "sport = :8080"])
            .stdout
            .windows(4)
            .any(|w| w == b"8080")
    });
    World {
        lab,
        dir,
        lighthouse,
        a,
        b,
        _node_a: node_a,
        _node_b: node_b,
        _http: http,
    }
}

impl World {
    /// a fetches the blob from b (optionally rate-limited) and checks it.
    fn fetch(&self, limit_rate: Option<&str>, max_secs: u32) {
        let out = self.dir.join("fetched.bin");
        let _ = fs::remove_file(&out);
        let url = format!("http://{B_OVERLAY}:8080/blob.bin");
        let max = max_secs.to_string();
        let out_s = out.to_string_lossy().into_owned();
        let mut args = vec![
            "-sS",
            "-f",
            "--retry",
            "3",
            "--retry-all-errors",
            "--connect-timeout",
            "10",
            "--max-time",
            max.as_str(),
            "-o",
            out_s.as_str(),
        ];
        if let Some(rate) = limit_rate {
            args.extend(["--limit-rate", rate]);
        }
        args.push(url.as_str());
        let res = self.a.node.exec("curl", &args);
        if !res.status.success() {
            self.lab.dump_logs();
            panic!("curl failed: {}", String::from_utf8_lossy(&res.stderr));
        }
        assert_eq!(
            sha256_file(&out),
            sha256_file(&self.dir.join("www/blob.bin")),
            "the blob arrives intact"
        );
    }

    /// How node `name` reaches the peer with overlay address `ip`.
    fn path(&self, name: &str, ip: &str) -> Option<String> {
        status(&self.dir, name)["peers"]
            .as_array()?
            .iter()
            .find(|p| p["overlay_ip"] == ip)
            .and_then(|p| p["path"].as_str().map(str::to_string))
    }

    /// `tern ping` from node `from` to `peer`, and `tern status` of `from`.
    fn ping_and_status(&self, from: &str, peer: &str) -> (String, String) {
        let socket = self.dir.join(format!("{from}.sock"));
        let socket = socket.to_string_lossy();
        let ping = tern(
            &self.dir,
            &["ping", "--socket", &socket, "-n", "2", "-i", "200ms", peer],
        );
        let status = tern(&self.dir, &["status", "--socket", &socket]);
        (ping, status)
    }

    fn relay(&self) -> Value {
        lighthouse_status(&self.dir)["relay"].clone()
    }

    fn wait_path(&self, kind: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let (a, b) = (self.path("a", B_OVERLAY), self.path("b", A_OVERLAY));
            if a.as_deref() == Some(kind) && b.as_deref() == Some(kind) {
                return;
            }
            if start.elapsed() > timeout {
                self.lab.dump_logs();
                panic!(
                    "a and b do not reach each other {kind} within {timeout:?}: a→b {a:?}, b→a {b:?}\na: {}\nb: {}",
                    status(&self.dir, "a")["peers"],
                    status(&self.dir, "b")["peers"]
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn relay_counter(relay: &Value, name: &str) -> u64 {
    relay[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no relay counter {name} in {relay}"))
}

fn tools(test: &str) -> bool {
    require_root(test) && require_tools(test, &["curl", "python3", "iptables", "ping", "ss"])
}

/// Both behind port-preserving NATs: a direct path, nothing relayed.
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
    assert_eq!(relay_counter(&relay, "forwarded_data"), 0, "{relay}");
    assert_eq!(relay_counter(&relay, "forwarded_bytes"), 0, "{relay}");
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
    assert_eq!(relay_counter(&w.relay(), "forwarded_data"), 0);
}

/// A firewall drops all UDP between the two NATs: relayed.
#[test]
fn udp_blocked_between_the_nats_goes_through_the_relay() {
    if !tools("nat_blocked") {
        return;
    }
    let _serial = serial();
    let w = world("natblock", Nat::PortPreserving, Nat::PortPreserving);
    for (site, other) in [(&w.a, &w.b), (&w.b, &w.a)] {
        let nat = site.nat.as_ref().unwrap_or_else(|| unreachable!());
        let wan_if = site.nat_wan_if.as_deref().unwrap_or_else(|| unreachable!());
        nat.run(
            "iptables",
            [
                "-I",
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
    wait_until(
        "a pings b through the relay",
        Duration::from_secs(15),
        || pings(&w.a.node, B_OVERLAY),
    );
    w.wait_path("relayed", Duration::from_secs(5));
    w.fetch(None, 90);
    assert!(relay_counter(&w.relay(), "forwarded_data") > 0);
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
        nat.run(
            "iptables",
            [
                "-I",
                "FORWARD",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.05",
                "-j",
                "DROP",
            ],
        );
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
