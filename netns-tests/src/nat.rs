//! A NAT lab: a lighthouse on the "internet" (198.18.0.0/24) and nodes a and
//! b, each on the internet or behind its own NAT namespace (iptables
//! MASQUERADE, port-preserving or `--random-fully`), b serving a file over
//! HTTP on its overlay address. Used by `tests/nat.rs` and the `nat-bench`
//! benchmark.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::tern::*;
use crate::{wait_until, Lab, Ns, Proc};

pub const A_OVERLAY: &str = "100.64.0.5";
pub const B_OVERLAY: &str = "100.64.0.6";
pub const BLOB_MB: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// On the internet itself, no NAT.
    Public,
    /// MASQUERADE: keeps the source port when it can.
    PortPreserving,
    /// MASQUERADE --random-fully: a random port per destination (symmetric).
    RandomFully,
}

/// One node's place: its namespace, and the NAT namespace in front of it.
pub struct Site {
    pub node: Ns,
    pub nat: Option<Ns>,
    /// The NAT's interface on the internet, and its address there.
    pub nat_wan_if: Option<String>,
    pub public_ip: String,
    /// The interfaces of the link between the NAT and the node (router's
    /// end, node's end); for a public node, its interface on the internet.
    pub lan_ifs: (String, String),
}

/// Puts a node called `name` on the internet at `public_ip`, or behind a
/// NAT whose outside address is `public_ip` and inside network 198.18.`inside`.0/24.
pub fn site(lab: &Lab, name: &str, nat: Nat, public_ip: &str, inside: u8) -> Site {
    if nat == Nat::Public {
        let node = lab.add_ns(name);
        let wan_if = lab.connect_to_wan(&node, &format!("{public_ip}/24"));
        return Site {
            node,
            nat: None,
            nat_wan_if: None,
            public_ip: public_ip.to_string(),
            lan_ifs: (String::new(), wan_if),
        };
    }
    let router = lab.add_ns(&format!("nat-{name}"));
    let wan_if = lab.connect_to_wan(&router, &format!("{public_ip}/24"));
    let node = lab.add_ns(name);
    let lan_ifs = lab.link(
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
        lan_ifs,
    }
}

/// Drops 5 % of the packets `router` forwards, both ways (`on`), or
/// stops dropping them.
pub fn forward_loss(router: &Ns, on: bool) {
    let op = if on { "-I" } else { "-D" };
    router.run(
        "iptables",
        [
            op,
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

/// The lab's IPv6 internet: 2001:db8::/64 on the wan, where host `n` of
/// [`world_v6`] is 2001:db8::`n`.
fn wan_v6(n: u8) -> String {
    format!("2001:db8::{n}")
}

/// Gives a site IPv6 as many homes have it: global addresses, routed, no
/// NAT, and its router lets everything through (an open IPv6 firewall).
/// The node is 2001:db8:`inside`::2 behind its router, 2001:db8::`wan` on
/// the wan; a public node is 2001:db8::`wan` itself. Returns the site's
/// prefix and the router's wan address (the route others need), or None
/// for a public node.
fn site_v6(site: &Site, wan: u8, inside: u8) -> Option<(String, String)> {
    let add = |ns: &Ns, cidr: &str, dev: &str| {
        ns.ip(["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
    };
    let Some(router) = &site.nat else {
        add(&site.node, &format!("{}/64", wan_v6(wan)), &site.lan_ifs.1);
        return None;
    };
    let wan_if = site.nat_wan_if.as_deref().unwrap_or_default();
    add(router, &format!("{}/64", wan_v6(wan)), wan_if);
    add(router, &format!("2001:db8:{inside}::1/64"), &site.lan_ifs.0);
    add(
        &site.node,
        &format!("2001:db8:{inside}::2/64"),
        &site.lan_ifs.1,
    );
    site.node.ip([
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("2001:db8:{inside}::1"),
    ]);
    router.sysctl("net.ipv6.conf.all.forwarding", "1");
    Some((format!("2001:db8:{inside}::/64"), wan_v6(wan)))
}

pub struct World {
    pub lab: Lab,
    pub dir: PathBuf,
    pub lighthouse: Proc,
    pub a: Site,
    pub b: Site,
    pub node_a: Proc,
    _node_b: Proc,
    _http: Proc,
}

pub fn open_config(name: &str) -> String {
    format!(
        "{}[[firewall.inbound]]\nproto = \"any\"\n",
        node_config_text(name, "ca.crt")
    )
}

/// Lighthouse, nodes a and b behind NATs of the given kinds, b serving a
/// `BLOB_MB` MB file over HTTP on its overlay address; both registered.
pub fn world(prefix: &str, nat_a: Nat, nat_b: Nat) -> World {
    world_with(prefix, nat_a, nat_b, false)
}

/// [`world`] with IPv6 too: global, routed, open (no NAT) beside the
/// IPv4 NATs; the nodes listen dual-stack (`[::]:4242`) and reach the
/// lighthouse over IPv4.
pub fn world_v6(prefix: &str, nat_a: Nat, nat_b: Nat) -> World {
    world_with(prefix, nat_a, nat_b, true)
}

fn world_with(prefix: &str, nat_a: Nat, nat_b: Nat, v6: bool) -> World {
    let lab = Lab::new(prefix);
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh_ns = lab.add_ns("lh");
    let lh_if = lab.connect_to_wan(&lh_ns, &format!("{LH_UNDERLAY}/24"));
    let a = site(&lab, "a", nat_a, "198.18.0.2", 1);
    let b = site(&lab, "b", nat_b, "198.18.0.3", 2);
    let listen = if v6 { "[::]:4242" } else { "0.0.0.0:4242" };
    let open_config = |name: &str| {
        self::open_config(name).replace("addr = \"0.0.0.0:4242\"", &format!("addr = \"{listen}\""))
    };
    if v6 {
        lh_ns.ip([
            "-6",
            "addr",
            "add",
            &format!("{}/64", wan_v6(1)),
            "dev",
            &lh_if,
            "nodad",
        ]);
        let routes: Vec<(String, String)> = [site_v6(&a, 2, 1), site_v6(&b, 3, 2)]
            .into_iter()
            .flatten()
            .collect();
        // Everyone on the wan routes each site's prefix to its router.
        let wan_hosts = [Some(&lh_ns), a.nat.as_ref(), b.nat.as_ref()];
        let public = [
            a.nat.is_none().then_some(&a.node),
            b.nat.is_none().then_some(&b.node),
        ];
        for host in wan_hosts.into_iter().chain(public).flatten() {
            for (prefix, via) in &routes {
                if host.ip(["-6", "addr", "show"]).contains(via.as_str()) {
                    continue;
                }
                host.ip(["-6", "route", "add", prefix, "via", via]);
            }
        }
    }

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
        node_a,
        _node_b: node_b,
        _http: http,
    }
}

impl World {
    /// a fetches the blob from b (optionally rate-limited) and checks it.
    pub fn fetch(&self, limit_rate: Option<&str>, max_secs: u32) {
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
    pub fn path(&self, name: &str, ip: &str) -> Option<String> {
        status(&self.dir, name)["peers"]
            .as_array()?
            .iter()
            .find(|p| p["overlay_ip"] == ip)
            .and_then(|p| p["path"].as_str().map(str::to_string))
    }

    /// `tern ping` from node `from` to `peer`, and `tern status` of `from`.
    pub fn ping_and_status(&self, from: &str, peer: &str) -> (String, String) {
        let socket = self.dir.join(format!("{from}.sock"));
        let socket = socket.to_string_lossy();
        let ping = tern(
            &self.dir,
            &["ping", "--socket", &socket, "-n", "2", "-i", "200ms", peer],
        );
        let status = tern(&self.dir, &["status", "--socket", &socket]);
        (ping, status)
    }

    pub fn relay(&self) -> Value {
        lighthouse_status(&self.dir)["relay"].clone()
    }

    pub fn wait_path(&self, kind: &str, timeout: Duration) {
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

pub fn relay_counter(relay: &Value, name: &str) -> u64 {
    relay[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no relay counter {name} in {relay}"))
}
