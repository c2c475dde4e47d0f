//! `fleet-bench`: fifty CI nodes through one gateway at once, on real
//! kernels (needs root, iperf3, ping and iptables). A lighthouse, one
//! TUN-mode gateway in front of a private network, and N CI nodes, each in
//! its own namespace on the wan. In one run:
//!
//! 1. **The baseline:** the same N hosts reach the private network through
//!    the gateway's namespace routing plainly (no tunnel, no NAT), each
//!    running iperf3 to its own server there, all at once.
//! 2. **Join:** all N nodes start at the same moment; for each, the time
//!    from the start to its first ping answered by the private server
//!    through the gateway; the gateway's handshakes per second and its
//!    memory per peer.
//! 3. **Through Tern:** the same iperf3 runs, all at once, through the
//!    gateway: aggregate throughput, per-node fairness (Jain's index), the
//!    gateway daemon's CPU per GB, the whole machine's CPU per GB against
//!    the baseline's.
//! 4. **Leave and join again:** every node stops (`SIGTERM`), and a second
//!    wave of N starts: its join times, and the gateway's memory after the
//!    second wave against the first (a leak would show).
//!
//! ```text
//! cargo build --release --workspace
//! sudo TERN_BIN_DIR=target/release target/release/fleet-bench [--nodes N] [--seconds S] [--write]
//! ```
//!
//! `--write` replaces the fleet section of BENCHMARKS.md. `.ci/run` runs it
//! briefly (`--nodes 5 --seconds 2`) as a smoke run.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tern_netns_tests::report::{
    jain_fairness, machine_jiffies, machine_line, median, number, percentile, proc_cpu_seconds,
    proc_status_kb, write_section,
};
use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, Lab, Ns, Proc};

const SERVER: &str = "198.19.0.10";
const GW_UNDERLAY: &str = "198.18.0.4";
const FIRST_PORT: u16 = 5201;
/// Longest a node may take to reach the private server.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);

struct Args {
    nodes: usize,
    seconds: u32,
    write: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        nodes: 50,
        seconds: 10,
        write: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nodes" => args.nodes = number(it.next(), "--nodes", 1, 100)?,
            "--seconds" => args.seconds = number(it.next(), "--seconds", 1, 60)?,
            "--write" => args.write = true,
            "-h" | "--help" => {
                return Err(
                    "usage: fleet-bench [--nodes N (1-100, default 50)] [--seconds S (1-60, default 10)] [--write]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?}; see --help")),
        }
    }
    Ok(args)
}

struct Fleet {
    lab: Lab,
    gw: Ns,
    vpc: Ns,
    cis: Vec<Ns>,
    _procs: Vec<Proc>,
}

fn ci_name(i: usize) -> String {
    format!("ci-{}", i + 1)
}

fn ci_underlay(i: usize) -> String {
    format!("198.18.0.{}", 100 + i)
}

/// The lab, the lighthouse, the private network's iperf3 servers, and the
/// certificates and configs of the gateway and every CI node.
fn build(nodes: usize) -> Fleet {
    let lab = Lab::new("fleet");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let gw = lab.add_ns("gw");
    let vpc = lab.add_ns("vpc");
    lab.connect_to_wan(&lh, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&gw, &format!("{GW_UNDERLAY}/24"));
    lab.bridge(&vpc, "br1", &format!("{SERVER}/24"));
    lab.connect_to_bridge(&gw, "198.19.0.2/24", &vpc, "br1");
    let cis: Vec<Ns> = (0..nodes)
        .map(|i| {
            let ns = lab.add_ns(&ci_name(i));
            lab.connect_to_wan(&ns, &format!("{}/24", ci_underlay(i)));
            ns
        })
        .collect();
    let mut procs = Vec::new();
    for i in 0..nodes {
        let port = (FIRST_PORT + i as u16).to_string();
        procs.push(vpc.spawn(
            "iperf3",
            ["-s", "-B", SERVER, "-p", port.as_str()],
            &format!("iperf3-server-{port}"),
        ));
    }
    make_ca_and_lighthouse(&dir);
    sign(
        &dir,
        "ca",
        "gw",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24"],
    );
    let quiet = |text: String| text.replace("level = \"debug\"", "level = \"info\"");
    write_file(
        &dir,
        "gw.toml",
        &(quiet(gateway_8080_config(&node_config_text("gw", "ca.crt")))
            + "[[firewall.inbound]]\nproto = \"any\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.10/32\"\n"),
    );
    for i in 0..nodes {
        let name = ci_name(i);
        let ip = format!("100.64.1.{}/10", i + 1);
        sign(&dir, "ca", &name, &ip, &["--groups", "ci"]);
        write_file(
            &dir,
            &format!("{name}.toml"),
            &(quiet(node_config_text(&name, "ca.crt"))
                + "[[routes]]\nsubnet = \"198.19.0.0/24\"\n"),
        );
    }
    let config = write_lighthouse_config(&dir);
    let text = quiet(std::fs::read_to_string(&config).unwrap_or_default());
    write_file(&dir, "lighthouse.toml", &text);
    procs.push(start_lighthouse(&lh, &config));
    Fleet {
        lab,
        gw,
        vpc,
        cis,
        _procs: procs,
    }
}

/// What one round of iperf3 runs, all nodes at once, gave.
struct Throughput {
    /// Per node, Gbit/s received at the server (NaN for a failed run).
    gbps: Vec<f64>,
    bytes: f64,
    /// The whole machine's busy CPU seconds over the round.
    machine_cpu_s: f64,
    /// The gateway daemon's CPU seconds over the round (tunnel only).
    gateway_cpu_s: Option<f64>,
}

impl Throughput {
    fn sum_gbps(&self) -> f64 {
        self.gbps.iter().filter(|g| g.is_finite()).sum()
    }

    fn failed(&self) -> usize {
        self.gbps.iter().filter(|g| !g.is_finite()).count()
    }

    fn fairness(&self) -> f64 {
        let ok: Vec<f64> = self
            .gbps
            .iter()
            .map(|g| if g.is_finite() { *g } else { 0.0 })
            .collect();
        jain_fairness(&ok)
    }

    fn machine_cpu_per_gb(&self) -> f64 {
        self.machine_cpu_s / (self.bytes / 1e9)
    }
}

/// Every CI host runs iperf3 to its own server port for `seconds`, all at
/// once.
fn throughput(f: &Fleet, seconds: u32, gateway_pid: Option<u32>, label: &str) -> Throughput {
    let busy = |j: Option<(u64, u64)>| j.map_or(0, |(b, _)| b);
    let (j0, g0) = (machine_jiffies(), gateway_pid.and_then(proc_cpu_seconds));
    let secs = seconds.to_string();
    let clients: Vec<Proc> = f
        .cis
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let port = (FIRST_PORT + i as u16).to_string();
            ns.spawn(
                "iperf3",
                ["-c", SERVER, "-p", port.as_str(), "-t", secs.as_str(), "-J"],
                &format!("iperf3-{label}-{}", ci_name(i)),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(seconds as u64 + 30);
    while clients.iter().any(Proc::is_running) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (j1, g1) = (machine_jiffies(), gateway_pid.and_then(proc_cpu_seconds));
    let ticks = tern_netns_tests::report::clock_ticks();
    let mut gbps = Vec::new();
    let mut bytes = 0.0;
    for c in &clients {
        let json: serde_json::Value = serde_json::from_str(&c.log()).unwrap_or_default();
        let received = &json["end"]["sum_received"];
        match (
            received["bits_per_second"].as_f64(),
            received["bytes"].as_f64(),
        ) {
            (Some(bps), Some(b)) => {
                gbps.push(bps / 1e9);
                bytes += b;
            }
            _ => {
                eprintln!("fleet-bench: {} gave no result", c.name());
                gbps.push(f64::NAN);
            }
        }
    }
    Throughput {
        gbps,
        bytes,
        machine_cpu_s: busy(j1).saturating_sub(busy(j0)) as f64 / ticks,
        gateway_cpu_s: g0.zip(g1).map(|(a, b)| b - a),
    }
}

/// The plain path for the baseline: CI hosts route the private network via
/// the gateway's namespace, which forwards; the private network routes the
/// wan back. `on = false` takes it away again.
fn plain_routes(f: &Fleet, on: bool) {
    let op = if on { "add" } else { "del" };
    if on {
        f.gw.sysctl("net.ipv4.ip_forward", "1");
    }
    f.vpc
        .ip(["route", op, "198.18.0.0/24", "via", "198.19.0.2"]);
    for ns in &f.cis {
        ns.ip(["route", op, "198.19.0.0/24", "via", GW_UNDERLAY]);
    }
}

/// One wave: every CI node starts at once; each one's time from the start
/// to its first ping answered by the private server (None: not within
/// [`JOIN_PATIENCE`]).
fn join(f: &Fleet, wave: usize) -> (Vec<Proc>, Vec<Option<f64>>, f64) {
    let dir = f.lab.dir();
    let started = Instant::now();
    let nodes: Vec<Proc> = f
        .cis
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let name = ci_name(i);
            start_node(
                ns,
                &dir.join(format!("{name}.toml")),
                &format!("node-{name}-wave{wave}"),
            )
        })
        .collect();
    let times: Vec<Option<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = f
            .cis
            .iter()
            .map(|ns| {
                s.spawn(move || {
                    while started.elapsed() < JOIN_PATIENCE {
                        if ns
                            .exec_timeout(
                                "ping",
                                ["-c1", "-W1", "-n", SERVER],
                                Duration::from_secs(3),
                            )
                            .is_some_and(|o| o.status.success())
                        {
                            return Some(started.elapsed().as_secs_f64());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    None
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(None))
            .collect()
    });
    let span = times.iter().flatten().fold(0.0f64, |a, b| a.max(*b));
    (nodes, times, span)
}

fn gateway_handshakes(dir: &Path) -> u64 {
    status(dir, "gw")["mesh_counters"]["handshakes"]
        .as_u64()
        .unwrap_or(0)
}

fn join_row(label: &str, times: &[Option<f64>]) -> String {
    let ok: Vec<f64> = times.iter().flatten().map(|s| s * 1000.0).collect();
    format!(
        "| {label} | {} of {} | {:.0} | {:.0} | {:.0} |\n",
        ok.len(),
        times.len(),
        median(&mut ok.clone()),
        percentile(&ok, 0.9),
        percentile(&ok, 1.0)
    )
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fleet-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !require_root("fleet-bench")
        || !require_tools("fleet-bench", &["iperf3", "ping", "iptables"])
    {
        return ExitCode::from(2);
    }
    let n = args.nodes;
    let f = build(n);
    let dir = f.lab.dir().to_path_buf();

    plain_routes(&f, true);
    let raw = throughput(&f, args.seconds, None, "raw");
    plain_routes(&f, false);

    let gw_proc = start_node(&f.gw, &dir.join("gw.toml"), "node-gw");
    gw_proc.wait_for_log("gateway forwarding set up", Duration::from_secs(20));
    wait_registered(&dir, "gw", Duration::from_secs(20));
    let gw_pid = gw_proc.pid();
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = proc_status_kb(gw_pid, "VmRSS").unwrap_or(0);
    let hs0 = gateway_handshakes(&dir);
    let (wave1, join1, span1) = join(&f, 1);
    let hs1 = gateway_handshakes(&dir);
    let rss_joined = proc_status_kb(gw_pid, "VmRSS").unwrap_or(0);
    let tern = throughput(&f, args.seconds, Some(gw_pid), "tern");
    let rss_after_load = proc_status_kb(gw_pid, "VmRSS").unwrap_or(0);
    for p in &wave1 {
        p.terminate_and_wait(Duration::from_secs(10));
    }
    drop(wave1);
    let (wave2, join2, _) = join(&f, 2);
    let rss_wave2 = proc_status_kb(gw_pid, "VmRSS").unwrap_or(0);
    let hwm = proc_status_kb(gw_pid, "VmHWM").unwrap_or(0);
    for p in &wave2 {
        p.terminate_and_wait(Duration::from_secs(10));
    }
    drop(wave2);
    // Nodes that said goodbye leave the gateway's peer list (the
    // lighthouse stays).
    let gateway_peers = || {
        status(&dir, "gw")["peers"]
            .as_array()
            .map_or(usize::MAX, Vec::len)
    };
    let left_by = Instant::now() + Duration::from_secs(30);
    while gateway_peers() > 1 && Instant::now() < left_by {
        std::thread::sleep(Duration::from_millis(200));
    }
    let peers_left = gateway_peers().saturating_sub(1);

    let connected = join1.iter().flatten().count() + join2.iter().flatten().count();
    let per_peer_kb = (rss_joined as f64 - rss_idle as f64) / n as f64;
    let gw_cpu_per_gb = tern
        .gateway_cpu_s
        .map_or(f64::NAN, |s| s / (tern.bytes / 1e9));
    let gb = |t: &Throughput| {
        let ok: Vec<f64> = t.gbps.iter().copied().filter(|g| g.is_finite()).collect();
        (
            percentile(&ok, 1.0 / ok.len().max(1) as f64) * 1000.0,
            percentile(&ok, 1.0) * 1000.0,
        )
    };
    let ((raw_min, raw_max), (tern_min, tern_max)) = (gb(&raw), gb(&tern));
    let section = format!(
        "## Fleet: {n} CI nodes through one gateway at once\n\n\
         {}\n\
         Command: `fleet-bench --nodes {n} --seconds {}` (release build; a lighthouse, one TUN-mode \
         gateway and {n} CI nodes, each in its own namespace on one wan).\n\n\
         Join: all {n} nodes start at the same moment; the figure is each one's time from its \
         start to its first ping answered by the private server through the gateway. Then \
         every node runs iperf3 (one TCP stream, {} s) to its own server port in the private \
         network, all at once; the baseline is the same runs over the plain path through the \
         gateway's namespace (routed, no tunnel), in the same run. Then all nodes stop and a \
         second wave of {n} joins.\n\n\
         | join (ms from start to first answer) | connected | median | p90 | worst |\n\
         |---|---|---|---|---|\n{}{}\n\
         | {n} streams at once | plain path (baseline) | through Tern | Tern / plain |\n\
         |---|---|---|---|\n\
         | aggregate throughput (Gbit/s) | {:.2} | {:.2} | {:.2} |\n\
         | slowest / fastest node (Mbit/s) | {:.0} / {:.0} | {:.0} / {:.0} | |\n\
         | fairness (Jain's index, 1 = all equal) | {:.3} | {:.3} | |\n\
         | streams that failed | {} | {} | |\n\
         | whole machine's CPU per GB moved (s) | {:.2} | {:.2} | {:.2} |\n\n\
         | gateway | |\n|---|---|\n\
         | handshakes completed while wave 1 joined | {} in {:.2} s ({:.0} per second) |\n\
         | CPU per GB forwarded (gateway daemon, s) | {:.2} |\n\
         | RSS idle → {n} peers joined (MiB) | {:.1} → {:.1} ({:.0} KiB per peer) |\n\
         | RSS after the streams; after wave 2 joined; high-water mark (MiB) | {:.1}; {:.1}; {:.1} |\n\
         | peers left on the gateway after wave 2 stopped | {} |\n",
        machine_line(),
        args.seconds,
        args.seconds,
        join_row("wave 1", &join1),
        join_row("wave 2 (after wave 1 left)", &join2),
        raw.sum_gbps(),
        tern.sum_gbps(),
        tern.sum_gbps() / raw.sum_gbps(),
        raw_min,
        raw_max,
        tern_min,
        tern_max,
        raw.fairness(),
        tern.fairness(),
        raw.failed(),
        tern.failed(),
        raw.machine_cpu_per_gb(),
        tern.machine_cpu_per_gb(),
        tern.machine_cpu_per_gb() / raw.machine_cpu_per_gb(),
        hs1.saturating_sub(hs0),
        span1,
        hs1.saturating_sub(hs0) as f64 / span1.max(0.001),
        gw_cpu_per_gb,
        rss_idle as f64 / 1024.0,
        rss_joined as f64 / 1024.0,
        per_peer_kb,
        rss_after_load as f64 / 1024.0,
        rss_wave2 as f64 / 1024.0,
        hwm as f64 / 1024.0,
        peers_left,
    );
    println!("{section}");
    if args.write {
        match write_section("fleet", &section) {
            Ok(p) => eprintln!("fleet-bench: wrote {}", p.display()),
            Err(e) => {
                eprintln!("fleet-bench: cannot write BENCHMARKS.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if connected != 2 * n || tern.failed() > 0 {
        eprintln!(
            "fleet-bench: {connected} of {} joins reached the private server, {} streams failed",
            2 * n,
            tern.failed()
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
