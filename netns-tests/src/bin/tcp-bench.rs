//! `tcp-bench`: what Tern over TCP costs, measured in one run on real
//! kernels (needs root, iptables, iperf3 and ping). Three nodes' worth of
//! namespaces on one wan: a lighthouse listening on UDP 4242 and TCP 443,
//! nodes a and b. For each repetition, both ways in turn, each lab built
//! afresh:
//!
//! - UDP direct: a and b straight to each other over UDP (the baseline);
//! - TCP relay: every UDP packet in a's namespace dropped (iptables), so a
//!   registers over TCP 443 (TLS) and reaches b through the lighthouse's
//!   relay over that link;
//!
//! and in each: the round trip of pings a→b (median of 50, 20 ms apart)
//! and iperf3 TCP throughput a→b.
//!
//! ```text
//! cargo build --release --workspace
//! sudo target/release/tcp-bench [--reps N] [--seconds S] [--write]
//! ```
//!
//! `--write` replaces the TCP section of BENCHMARKS.md.

use std::process::ExitCode;
use std::time::Duration;

use tern_netns_tests::report::{cell, iperf_gbps, machine_line, median, write_section, RepsArgs};
use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, wait_until, Lab, Ns, Proc};

const A_OVERLAY: &str = "100.64.0.5";
const B_OVERLAY: &str = "100.64.0.6";

struct World {
    _lab: Lab,
    dir: std::path::PathBuf,
    a: Ns,
    b: Ns,
    _procs: Vec<Proc>,
}

/// The lab; with `udp_blocked`, a's namespace drops every UDP packet.
fn world(prefix: &str, udp_blocked: bool) -> World {
    let FlatLab { lab, dir, lh, a, b } = flat_lab(prefix);
    make_ca_and_lighthouse(&dir);
    sign(&dir, "ca", "a", &format!("{A_OVERLAY}/10"), &[]);
    sign(&dir, "ca", "b", &format!("{B_OVERLAY}/10"), &[]);
    let config = write_lighthouse_config(&dir);
    // The relay's per-node budget out of the way: this measures the link.
    let text = std::fs::read_to_string(&config)
        .unwrap_or_default()
        .replace(
            "addr = \"0.0.0.0:4242\"\n",
            "addr = \"0.0.0.0:4242\"\ntcp = \"0.0.0.0:443\"\n",
        )
        .replace("level = \"debug\"", "level = \"info\"")
        + "[relay]\npackets_per_sec = 10000000\n";
    std::fs::write(&config, text).unwrap_or_else(|e| panic!("lighthouse config: {e}"));
    let lighthouse = start_lighthouse(&lh, &config);
    if udp_blocked {
        for chain in ["OUTPUT", "INPUT"] {
            a.run("iptables", ["-A", chain, "-p", "udp", "-j", "DROP"]);
        }
    }
    let node = |name: &str| {
        node_config_text(name, "ca.crt").replace("level = \"debug\"", "level = \"info\"")
            + &format!("tcp = \"{LH_UNDERLAY}:443\"\n[[firewall.inbound]]\nproto = \"any\"\n")
    };
    let node_a = start_node(&a, &write_file(&dir, "a.toml", &node("a")), "node-a");
    let node_b = start_node(&b, &write_file(&dir, "b.toml", &node("b")), "node-b");
    wait_until("a and b register", Duration::from_secs(20), || {
        lighthouse_status(&dir)["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2)
    });
    World {
        _lab: lab,
        dir,
        a,
        b,
        _procs: vec![lighthouse, node_a, node_b],
    }
}

impl World {
    /// a's path to b once a ping got through: "direct" or "relayed", and
    /// the lighthouse's transport.
    fn path(&self) -> (String, String) {
        let s = status(&self.dir, "a");
        let path = s["peers"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["overlay_ip"] == B_OVERLAY).cloned())
            .map(|p| p["path"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default();
        let transport = s["lighthouses"][0]["transport"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (path, transport)
    }

    /// Median round trip (ms) of 50 pings a→b.
    fn rtt_ms(&self) -> Option<f64> {
        let out = self.a.exec(
            "ping",
            ["-n", "-i", "0.02", "-c", "50", "-W", "1", B_OVERLAY],
        );
        let mut rtts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(" time=").nth(1))
            .filter_map(|t| t.split_whitespace().next()?.parse().ok())
            .collect();
        (!rtts.is_empty()).then(|| median(&mut rtts))
    }

    /// iperf3 a→b for `seconds`: Gbit/s received.
    fn gbps(&self, seconds: u32) -> Option<f64> {
        iperf_gbps(&self.a, &self.b, B_OVERLAY, seconds)
    }
}

/// One case: the lab built, the path checked, then latency and throughput.
fn measure(prefix: &str, udp_blocked: bool, seconds: u32) -> Result<(f64, f64), String> {
    let w = world(prefix, udp_blocked);
    let want = if udp_blocked {
        ("relayed", format!("tcp {LH_UNDERLAY}:443"))
    } else {
        ("direct", "udp".to_string())
    };
    let mut seen = (String::new(), String::new());
    for _ in 0..100 {
        let _ = w.a.exec("ping", ["-n", "-c", "1", "-W", "1", B_OVERLAY]);
        seen = w.path();
        if seen.0 == want.0 && seen.1 == want.1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if seen.0 != want.0 || seen.1 != want.1 {
        return Err(format!("wanted {want:?}, a's status says {seen:?}"));
    }
    let rtt = w.rtt_ms().ok_or("no ping answered")?;
    let gbps = w.gbps(seconds).ok_or("iperf3 failed")?;
    Ok((rtt, gbps))
}

fn main() -> ExitCode {
    let args = match RepsArgs::parse("tcp-bench") {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tcp-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !require_root("tcp-bench")
        || !require_tools("tcp-bench", &["iperf3", "ping", "iptables", "python3"])
    {
        return ExitCode::from(2);
    }
    let (mut udp_rtt, mut udp_gbps, mut tcp_rtt, mut tcp_gbps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=args.reps {
        for (udp_blocked, rtts, gbps) in [
            (false, &mut udp_rtt, &mut udp_gbps),
            (true, &mut tcp_rtt, &mut tcp_gbps),
        ] {
            let prefix = if udp_blocked { "tbtcp" } else { "tbudp" };
            match measure(prefix, udp_blocked, args.seconds) {
                Ok((rtt, g)) => {
                    rtts.push(rtt);
                    gbps.push(g);
                    eprintln!(
                        "tcp-bench: rep {rep}/{}: {}: {rtt:.3} ms, {g:.2} Gbit/s",
                        args.reps,
                        if udp_blocked {
                            "TCP relay"
                        } else {
                            "UDP direct"
                        }
                    );
                }
                Err(e) => eprintln!("tcp-bench: rep {rep}: {prefix}: {e}"),
            }
        }
    }
    let ratio = |a: &[f64], b: &[f64]| {
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        median(&mut a) / median(&mut b)
    };
    let table = format!(
        "## Over TCP 443: the relay through a TLS link against UDP direct\n\n\
         {}\n\
         Command: `tcp-bench --reps {} --seconds {}` (lighthouse, a and b on one wan; each case's \
         lab built afresh; in the TCP case iptables drops every UDP packet in a's namespace).\n\n\
         | metric | UDP direct | TCP relay | TCP / UDP |\n|---|---|---|---|\n\
         | ping a→b round trip, median of 50 (ms) | {} | {} | {:.2}× |\n\
         | iperf3 TCP a→b (Gbit/s) | {} | {} | {:.2}× |\n\n\
         In the TCP case a registers with the lighthouse over its TLS listener and every packet to b \
         goes in a relay envelope over that link: a's TCP/TLS, the lighthouse's relay, then UDP to \
         b; b's answers the other way. The relay's per-node budget is raised out of the way \
         (`[relay] packets_per_sec = 10000000`). All of it shares this machine's 2 cores.\n",
        machine_line(),
        args.reps,
        args.seconds,
        cell(&udp_rtt, 3),
        cell(&tcp_rtt, 3),
        ratio(&tcp_rtt, &udp_rtt),
        cell(&udp_gbps, 2),
        cell(&tcp_gbps, 2),
        ratio(&tcp_gbps, &udp_gbps),
    );
    println!("{table}");
    if args.write {
        match write_section("tcp", &table) {
            Ok(path) => eprintln!("tcp-bench: wrote the section into {}", path.display()),
            Err(e) => {
                eprintln!("tcp-bench: writing BENCHMARKS.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
