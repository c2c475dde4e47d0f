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
    proc_status_kb, udp_rcvbuf_errors, write_section,
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
    /// Each node's offered load in the paced round, Mbit/s.
    rate: u32,
    write: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        nodes: 50,
        seconds: 10,
        rate: 10,
        write: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nodes" => args.nodes = number(it.next(), "--nodes", 1, 100)?,
            "--seconds" => args.seconds = number(it.next(), "--seconds", 1, 60)?,
            "--rate" => args.rate = number(it.next(), "--rate", 1, 10_000)?,
            "--write" => args.write = true,
            "-h" | "--help" => {
                return Err(
                    "usage: fleet-bench [--nodes N (1-100, default 50)] [--seconds S (1-60, default 10)] [--rate MBIT (per node in the paced round, default 10)] [--write]"
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
    /// The CI nodes' daemons' CPU seconds over the round, together.
    nodes_cpu_s: Option<f64>,
    /// Datagrams the gateway's UDP socket had no room for.
    gateway_rcvbuf_errors: u64,
    /// TCP retransmits iperf3 reported, all streams.
    retransmits: u64,
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

/// CPU seconds the processes `pids` used, together (None if one is gone).
fn cpu_of(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|p| proc_cpu_seconds(*p)).sum()
}

/// Every CI host runs iperf3 to its own server port for `seconds`, all at
/// once, as fast as it can or at `rate_mbit` each. `gateway_pid` and
/// `node_pids`: the daemons whose CPU is counted.
fn throughput(
    f: &Fleet,
    seconds: u32,
    rate_mbit: Option<u32>,
    gateway_pid: Option<u32>,
    node_pids: &[u32],
    label: &str,
) -> Throughput {
    let busy = |j: Option<(u64, u64)>| j.map_or(0, |(b, _)| b);
    let (j0, g0) = (machine_jiffies(), gateway_pid.and_then(proc_cpu_seconds));
    let (n0, r0) = (cpu_of(node_pids), udp_rcvbuf_errors(&f.gw).unwrap_or(0));
    let secs = seconds.to_string();
    let clients: Vec<Proc> = f
        .cis
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let port = (FIRST_PORT + i as u16).to_string();
            let mut args = vec!["-c", SERVER, "-p", port.as_str(), "-t", secs.as_str(), "-J"];
            let rate = rate_mbit.map(|r| format!("{r}M"));
            if let Some(r) = &rate {
                args.extend(["-b", r.as_str()]);
            }
            ns.spawn("iperf3", args, &format!("iperf3-{label}-{}", ci_name(i)))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(seconds as u64 + 30);
    while clients.iter().any(Proc::is_running) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (j1, g1) = (machine_jiffies(), gateway_pid.and_then(proc_cpu_seconds));
    let (n1, r1) = (cpu_of(node_pids), udp_rcvbuf_errors(&f.gw).unwrap_or(0));
    let ticks = tern_netns_tests::report::clock_ticks();
    let mut gbps = Vec::new();
    let mut bytes = 0.0;
    let mut retransmits = 0;
    for c in &clients {
        let json: serde_json::Value = serde_json::from_str(&c.log()).unwrap_or_default();
        retransmits += json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
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
        nodes_cpu_s: if node_pids.is_empty() {
            None
        } else {
            n0.zip(n1).map(|(a, b)| b - a)
        },
        gateway_rcvbuf_errors: r1.saturating_sub(r0),
        retransmits,
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

/// Everything one run measured.
struct Figures {
    raw: Throughput,
    tern: Throughput,
    paced: Throughput,
    /// The same two rounds with the gateway daemon ahead of the others
    /// for the CPU (nice [`GATEWAY_NICE`]).
    tern_first: Throughput,
    paced_first: Throughput,
    join1: Vec<Option<f64>>,
    join2: Vec<Option<f64>>,
    /// Start to the last node's first answer, wave 1 (s).
    span1: f64,
    /// Handshakes the gateway completed while wave 1 joined.
    handshakes: u64,
    /// The gateway's VmRSS (kB): idle, wave 1 joined, after the streams,
    /// wave 2 joined; and its VmHWM.
    rss: [u64; 4],
    hwm: u64,
    /// The fleet at rest: the machine busy (% of all cores) and the node
    /// daemons together (% of one core).
    idle_machine_pct: f64,
    idle_nodes_pct: f64,
    /// Node peers still on the gateway 30 s after wave 2 stopped.
    peers_left: usize,
}

/// Busy % of the machine and CPU % of `pids` (of one core) over `window`.
fn at_rest(pids: &[u32], window: Duration) -> (f64, f64) {
    let (j0, c0) = (machine_jiffies(), cpu_of(pids));
    std::thread::sleep(window);
    let (j1, c1) = (machine_jiffies(), cpu_of(pids));
    let machine = j0.zip(j1).map_or(f64::NAN, |((b0, t0), (b1, t1))| {
        100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64
    });
    let nodes = c0
        .zip(c1)
        .map_or(f64::NAN, |(a, b)| 100.0 * (b - a) / window.as_secs_f64());
    (machine, nodes)
}

fn stop_all(nodes: Vec<Proc>) {
    for p in &nodes {
        p.terminate_and_wait(Duration::from_secs(10));
    }
}

/// The gateway's niceness in the rounds where it goes first for the CPU:
/// as a gateway with a machine of its own, not one process among a hundred
/// with a fair share each.
const GATEWAY_NICE: i32 = -15;

/// Sets the niceness of process `pid` (root may lower it), with renice.
fn set_nice(pid: u32, nice: i32) {
    let out = std::process::Command::new("renice")
        .args(["-n", &nice.to_string(), "-p", &pid.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("running renice: {e}"));
    assert!(
        out.status.success(),
        "renice -n {nice} -p {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn measure(args: &Args) -> Figures {
    let f = build(args.nodes);
    let dir = f.lab.dir().to_path_buf();
    plain_routes(&f, true);
    let raw = throughput(&f, args.seconds, None, None, &[], "raw");
    plain_routes(&f, false);

    let gw_proc = start_node(&f.gw, &dir.join("gw.toml"), "node-gw");
    gw_proc.wait_for_log("gateway forwarding set up", Duration::from_secs(20));
    wait_registered(&dir, "gw", Duration::from_secs(20));
    let gw = gw_proc.pid();
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = proc_status_kb(gw, "VmRSS").unwrap_or(0);
    let hs0 = gateway_handshakes(&dir);
    let (wave1, join1, span1) = join(&f, 1);
    let handshakes = gateway_handshakes(&dir).saturating_sub(hs0);
    let rss_joined = proc_status_kb(gw, "VmRSS").unwrap_or(0);
    let node_pids: Vec<u32> = wave1.iter().map(Proc::pid).collect();
    let (idle_machine_pct, idle_nodes_pct) = at_rest(&node_pids, Duration::from_secs(3));
    let tern = throughput(&f, args.seconds, None, Some(gw), &node_pids, "tern");
    let rate = Some(args.rate);
    let paced = throughput(&f, args.seconds, rate, Some(gw), &node_pids, "paced");
    set_nice(gw, GATEWAY_NICE);
    let tern_first = throughput(&f, args.seconds, None, Some(gw), &node_pids, "first");
    let paced_first = throughput(&f, args.seconds, rate, Some(gw), &node_pids, "paced-first");
    set_nice(gw, 0);
    let rss_after_load = proc_status_kb(gw, "VmRSS").unwrap_or(0);
    stop_all(wave1);
    let (wave2, join2, _) = join(&f, 2);
    let rss_wave2 = proc_status_kb(gw, "VmRSS").unwrap_or(0);
    let hwm = proc_status_kb(gw, "VmHWM").unwrap_or(0);
    stop_all(wave2);
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
    Figures {
        raw,
        tern,
        paced,
        tern_first,
        paced_first,
        join1,
        join2,
        span1,
        handshakes,
        rss: [rss_idle, rss_joined, rss_after_load, rss_wave2],
        hwm,
        idle_machine_pct,
        idle_nodes_pct,
        peers_left: gateway_peers().saturating_sub(1),
    }
}

/// Slowest and fastest node of a round, Mbit/s.
fn spread(t: &Throughput) -> (f64, f64) {
    let ok: Vec<f64> = t.gbps.iter().copied().filter(|g| g.is_finite()).collect();
    (
        percentile(&ok, 1.0 / ok.len().max(1) as f64) * 1000.0,
        percentile(&ok, 1.0) * 1000.0,
    )
}

fn per_gb(cpu_s: Option<f64>, t: &Throughput) -> f64 {
    cpu_s.map_or(f64::NAN, |s| s / (t.bytes / 1e9))
}

/// A row of the all-out table: the plain path, Tern, Tern ÷ plain, Tern
/// with the gateway first, and that ÷ plain (`ratio` for rows where a
/// ratio means something).
fn all_out_row(label: &str, cells: [String; 3], ratio: Option<(f64, f64, f64)>) -> String {
    let [plain, tern, first] = cells;
    let (r1, r2) = ratio.map_or((String::new(), String::new()), |(p, t, f)| {
        (format!("{:.2}", t / p), format!("{:.2}", f / p))
    });
    format!("| {label} | {plain} | {tern} | {r1} | {first} | {r2} |\n")
}

fn all_out_table(n: usize, raw: &Throughput, tern: &Throughput, first: &Throughput) -> String {
    let s = |t: &Throughput| {
        let (lo, hi) = spread(t);
        format!("{lo:.0} / {hi:.0}")
    };
    let cpu = |t: &Throughput| format!("{:.2}", t.machine_cpu_per_gb());
    let gbps = |t: &Throughput| format!("{:.2}", t.sum_gbps());
    let mut out = format!(
        "| {n} streams at once, as fast as they can | plain path (baseline) | through Tern | Tern / plain | through Tern, the gateway first for the CPU (nice {GATEWAY_NICE}) | ÷ plain |\n\
         |---|---|---|---|---|---|\n"
    );
    out += &all_out_row(
        "aggregate throughput (Gbit/s)",
        [gbps(raw), gbps(tern), gbps(first)],
        Some((raw.sum_gbps(), tern.sum_gbps(), first.sum_gbps())),
    );
    out += &all_out_row(
        "slowest / fastest node (Mbit/s)",
        [s(raw), s(tern), s(first)],
        None,
    );
    out += &all_out_row(
        "fairness (Jain's index, 1 = all equal)",
        [raw, tern, first].map(|t| format!("{:.3}", t.fairness())),
        None,
    );
    out += &all_out_row(
        "streams that failed",
        [raw, tern, first].map(|t| t.failed().to_string()),
        None,
    );
    out += &all_out_row(
        "TCP retransmits (iperf3), all streams",
        [raw, tern, first].map(|t| t.retransmits.to_string()),
        None,
    );
    out += &all_out_row(
        "whole machine's CPU per GB moved (s)",
        [cpu(raw), cpu(tern), cpu(first)],
        Some((
            raw.machine_cpu_per_gb(),
            tern.machine_cpu_per_gb(),
            first.machine_cpu_per_gb(),
        )),
    );
    out += &all_out_row(
        &format!("the {n} CI nodes' daemons' CPU per GB, together (s)"),
        [
            String::new(),
            format!("{:.2}", per_gb(tern.nodes_cpu_s, tern)),
            format!("{:.2}", per_gb(first.nodes_cpu_s, first)),
        ],
        None,
    );
    out += &all_out_row(
        "the gateway daemon's CPU per GB forwarded (s)",
        [
            String::new(),
            format!("{:.2}", per_gb(tern.gateway_cpu_s, tern)),
            format!("{:.2}", per_gb(first.gateway_cpu_s, first)),
        ],
        None,
    );
    out += &all_out_row(
        "datagrams the gateway's UDP socket dropped (no room)",
        [
            String::new(),
            tern.gateway_rcvbuf_errors.to_string(),
            first.gateway_rcvbuf_errors.to_string(),
        ],
        None,
    );
    out
}

/// A row of the paced table: `label`, then the round's figures.
fn paced_row(label: &str, t: &Throughput, offered: f64) -> String {
    let (lo, hi) = spread(t);
    format!(
        "| {label} | {:.3} of {offered:.3} ({:.1} %) | {lo:.1} / {hi:.1}; {:.3} | {:.2}; {:.2} |\n",
        t.sum_gbps(),
        100.0 * t.sum_gbps() / offered,
        t.fairness(),
        per_gb(t.gateway_cpu_s, t),
        t.machine_cpu_per_gb(),
    )
}

fn report(args: &Args, fig: &Figures) -> String {
    let n = args.nodes;
    let mib = |kb: u64| kb as f64 / 1024.0;
    let offered = n as f64 * args.rate as f64 / 1000.0;
    format!(
        "## Fleet: {n} CI nodes through one gateway at once\n\n\
         {}\n\
         Command: `fleet-bench --nodes {n} --seconds {} --rate {}` (release build; a lighthouse, one \
         TUN-mode gateway and {n} CI nodes, each in its own namespace on one wan; all of them \
         and every iperf3 share this machine's cores).\n\n\
         Join: all {n} nodes start at the same moment; the figure is each one's time from its \
         start to its first ping answered by the private server through the gateway. Then \
         every node runs iperf3 (one TCP stream, {} s) to its own server port in the private \
         network, all at once, as fast as it can; the baseline is the same runs over the plain \
         path through the gateway's namespace (routed, no tunnel), in the same run. Then the \
         same through Tern paced at {} Mbit/s per node (iperf3 `-b`), as CI jobs fetching \
         and pushing rather than racing. Both rounds through Tern run twice: with every \
         process at the same priority, and with the gateway daemon at nice {GATEWAY_NICE}, \
         ahead of the {n} node daemons and their iperf3 clients for the CPU, as a gateway \
         with a machine of its own would be. Then all nodes stop and a second wave of {n} \
         joins.\n\n\
         | join (ms from start to first answer) | connected | median | p90 | worst |\n\
         |---|---|---|---|---|\n{}{}\n\
         {}\n\
         | {n} streams at once, {} Mbit/s each, through Tern | delivered of offered (Gbit/s) | slowest / fastest node (Mbit/s); fairness | the gateway daemon's CPU per GB forwarded (s); whole machine's (s) |\n\
         |---|---|---|---|\n{}{}\n\
         | gateway | |\n|---|---|\n\
         | handshakes completed while wave 1 joined | {} in {:.2} s ({:.0} per second) |\n\
         | the fleet at rest, {n} nodes joined: machine busy; the {n} daemons together (% of one core) | {:.1} %; {:.1} % |\n\
         | RSS idle → {n} peers joined (MiB) | {:.1} → {:.1} ({:.0} KiB per peer) |\n\
         | RSS after the streams; after wave 2 joined; high-water mark (MiB) | {:.1}; {:.1}; {:.1} |\n\
         | node peers left on the gateway 30 s after wave 2 stopped | {} |\n",
        machine_line(),
        args.seconds,
        args.rate,
        args.seconds,
        args.rate,
        join_row("wave 1", &fig.join1),
        join_row("wave 2 (after wave 1 left)", &fig.join2),
        all_out_table(n, &fig.raw, &fig.tern, &fig.tern_first),
        args.rate,
        paced_row("every process at the same priority", &fig.paced, offered),
        paced_row(
            &format!("the gateway first for the CPU (nice {GATEWAY_NICE})"),
            &fig.paced_first,
            offered
        ),
        fig.handshakes,
        fig.span1,
        fig.handshakes as f64 / fig.span1.max(0.001),
        fig.idle_machine_pct,
        fig.idle_nodes_pct,
        mib(fig.rss[0]),
        mib(fig.rss[1]),
        (fig.rss[1] as f64 - fig.rss[0] as f64) / n as f64,
        mib(fig.rss[2]),
        mib(fig.rss[3]),
        mib(fig.hwm),
        fig.peers_left,
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
        || !require_tools("fleet-bench", &["iperf3", "ping", "iptables", "renice"])
    {
        return ExitCode::from(2);
    }
    let fig = measure(&args);
    let section = report(&args, &fig);
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
    let connected = fig.join1.iter().flatten().count() + fig.join2.iter().flatten().count();
    let failed =
        fig.tern.failed() + fig.paced.failed() + fig.tern_first.failed() + fig.paced_first.failed();
    if connected != 2 * args.nodes || failed > 0 || fig.peers_left > 0 {
        eprintln!(
            "fleet-bench: {connected} of {} joins reached the private server, {failed} streams failed, {} peers left behind",
            2 * args.nodes,
            fig.peers_left
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
