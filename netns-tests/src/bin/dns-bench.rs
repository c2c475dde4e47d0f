//! `dns-bench`: what resolving a private name through the mesh costs,
//! measured in one run on real kernels (needs root and dnsmasq):
//!
//! - latency of `api.internal` asked of the CI node (its overlay address,
//!   port 53), which sends it through the mesh to the gateway, whose
//!   resolver (dnsmasq in the private network) answers — against the same
//!   query sent straight to that resolver from the gateway's namespace;
//! - a node name (`gw-1.tern`), answered by the CI node from a certificate;
//! - queries per second through the mesh with 32 outstanding, against the
//!   resolver straight;
//! - cold start: `tern up --wait-for` to a private service, then the first
//!   query.
//!
//! ```text
//! cargo build --release --workspace
//! sudo target/release/dns-bench [--reps N] [--queries N] [--seconds S] [--write]
//! ```
//!
//! The DNS client is this binary again, run inside a namespace
//! (`dns-bench --client ...`). `--write` replaces the DNS section of
//! BENCHMARKS.md.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tern_netns_tests::report::{cell, machine_line, median, number, percentile, write_section};
use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, wait_until, workspace_bin, Lab, Ns, Proc};
use tern_node_core::dns::{self, RecordType};

const SERVER: &str = "198.19.0.10";
const RESOLVER: &str = "198.19.0.2";
const CI_IP: &str = "100.64.0.20";
const WINDOW: usize = 32;

struct Args {
    reps: usize,
    queries: usize,
    seconds: u64,
    write: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        reps: 3,
        queries: 2000,
        seconds: 5,
        write: false,
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => args.reps = number(it.next(), "--reps", 1, 20)?,
            "--queries" => args.queries = number(it.next(), "--queries", 10, 100_000)?,
            "--seconds" => args.seconds = number(it.next(), "--seconds", 1, 60)?,
            "--write" => args.write = true,
            "-h" | "--help" => {
                return Err("usage: dns-bench [--reps N (1-20, default 3)] [--queries N (10-100000, default 2000)] [--seconds S (1-60, default 5)] [--write]".into())
            }
            other => return Err(format!("unknown argument {other:?}; see --help")),
        }
    }
    Ok(args)
}

/// The client, inside a namespace: `--client SERVER NAME latency N` prints
/// each query's time in ms; `--client SERVER NAME qps SECONDS` prints the
/// answers with addresses, the other answers, and the seconds it ran.
fn client(mut it: impl Iterator<Item = String>) -> Result<(), String> {
    let server: SocketAddr = it
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("--client SERVER")?;
    let name = it.next().ok_or("--client SERVER NAME")?;
    let mode = it.next().ok_or("--client SERVER NAME MODE")?;
    let n: u64 = it
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("--client SERVER NAME MODE N")?;
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.connect(server).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let query = |id: u16| dns::build_query(&name, RecordType::A, id);
    match mode.as_str() {
        "latency" => {
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            for i in 0..n {
                let id = (i % 65_536) as u16;
                let q = query(id)?;
                let t = Instant::now();
                socket.send(&q).map_err(|e| e.to_string())?;
                loop {
                    let got = socket
                        .recv(&mut buf)
                        .map_err(|e| format!("query {i}: {e}"))?;
                    if got >= 12 && buf[..2] == id.to_be_bytes() {
                        dns::addresses(&buf[..got]).map_err(|e| format!("query {i}: {e}"))?;
                        break;
                    }
                }
                println!("{}", t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        "qps" => {
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .map_err(|e| e.to_string())?;
            let started = Instant::now();
            let end = started + Duration::from_secs(n);
            let mut outstanding: HashMap<u16, Instant> = HashMap::new();
            let (mut next, mut answered, mut other) = (0u16, 0u64, 0u64);
            while Instant::now() < end {
                while outstanding.len() < WINDOW {
                    next = next.wrapping_add(1);
                    socket.send(&query(next)?).map_err(|e| e.to_string())?;
                    outstanding.insert(next, Instant::now());
                }
                match socket.recv(&mut buf) {
                    Ok(got) if got >= 12 => {
                        let id = u16::from_be_bytes([buf[0], buf[1]]);
                        if outstanding.remove(&id).is_some() {
                            if dns::addresses(&buf[..got]).is_ok() {
                                answered += 1;
                            } else {
                                other += 1;
                            }
                        }
                    }
                    Ok(_) => {}
                    // A lost query: forget what waited too long.
                    Err(_) => outstanding.retain(|_, t| t.elapsed() < Duration::from_secs(1)),
                }
            }
            println!("{answered} {other} {}", started.elapsed().as_secs_f64());
        }
        other => return Err(format!("unknown client mode {other:?}")),
    }
    Ok(())
}

/// Runs the client in `ns`; its stdout.
fn run_client(ns: &Ns, args: &[&str], limit: Duration) -> Option<String> {
    let bin = std::env::current_exe().ok()?;
    let mut all = vec!["--client"];
    all.extend_from_slice(args);
    let out = ns.exec_timeout(&bin.to_string_lossy(), all, limit)?;
    if !out.status.success() {
        eprintln!(
            "dns-bench: client {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn latencies(ns: &Ns, server: &str, name: &str, n: usize) -> Vec<f64> {
    run_client(
        ns,
        &[server, name, "latency", &n.to_string()],
        Duration::from_secs(120),
    )
    .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
    .unwrap_or_default()
}

/// Answers with addresses per second, and the share of other answers.
fn qps(ns: &Ns, server: &str, name: &str, seconds: u64) -> Option<(f64, u64)> {
    let out = run_client(
        ns,
        &[server, name, "qps", &seconds.to_string()],
        Duration::from_secs(seconds + 30),
    )?;
    let v: Vec<f64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match v.as_slice() {
        [answered, other, secs] => Some((answered / secs, *other as u64)),
        _ => None,
    }
}

struct World {
    lab: Lab,
    job: Ns,
    gw: Ns,
    _procs: Vec<Proc>,
}

fn world() -> World {
    let lab = Lab::new("dnsbench");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let job = lab.add_ns("job");
    let gw = lab.add_ns("gw");
    let vpc = lab.add_ns("vpc");
    lab.connect_to_wan(&lh, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&job, "198.18.0.2/24");
    lab.connect_to_wan(&gw, "198.18.0.4/24");
    lab.bridge(&vpc, "br1", &format!("{SERVER}/24"));
    vpc.ip(["addr", "add", &format!("{RESOLVER}/24"), "dev", "br1"]);
    lab.connect_to_bridge(&gw, "198.19.0.3/24", &vpc, "br1");
    let mut dnsmasq = vpc.command("dnsmasq");
    dnsmasq.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--dns-forward-max=1000",
        &format!("--listen-address={RESOLVER}"),
        &format!("--host-record=api.internal,{SERVER}"),
        &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
    ]);
    let mut procs = vec![
        vpc.spawn_command(dnsmasq, "dnsmasq"),
        vpc.spawn(
            "python3",
            ["-m", "http.server", "--bind", SERVER, "8080"],
            "http",
        ),
    ];
    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(&dir, "ca", "ci-1", "100.64.0.20/10", &["--groups", "ci"]);
    sign(
        &dir,
        "ca",
        "gw-1",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24", "--dns-zones", "internal"],
    );
    let quiet = |t: String| t.replace("level = \"debug\"", "level = \"warn\"");
    procs.push(start_lighthouse(&lh, &write_lighthouse_config(&dir)));
    let gw_config = format!(
        "{}[gateway]\nsubnets = [\"198.19.0.0/24\"]\n[[gateway.dns]]\nzone = \"internal\"\nresolver = \"{RESOLVER}\"\nqueries_per_sec = 1000000\n[[firewall.inbound]]\nproto = \"tcp\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.0/24\"\n",
        quiet(node_config_text("gw-1", "ca.crt"))
    );
    procs.push(start_node(
        &gw,
        &write_file(&dir, "gw-1.toml", &gw_config),
        "node-gw",
    ));
    write_file(
        &dir,
        "ci-1.toml",
        &format!(
            "{}[[routes]]\nsubnet = \"198.19.0.0/24\"\n",
            quiet(node_config_text("ci-1", "ca.crt"))
        ),
    );
    wait_until(
        "dnsmasq answers in the vpc",
        Duration::from_secs(10),
        || !latencies(&gw, &format!("{RESOLVER}:53"), "api.internal", 1).is_empty(),
    );
    World {
        lab,
        job,
        gw,
        _procs: procs,
    }
}

/// Starts ci-1 with `tern up --wait-for` the private web server; how long
/// that took and the first query after it (ms).
fn cold_start(w: &World) -> Option<(f64, f64)> {
    let config = w.lab.dir().join("ci-1.toml");
    let t = Instant::now();
    let out = w.job.exec_timeout(
        &workspace_bin("tern").to_string_lossy(),
        [
            "up",
            "--config",
            &config.to_string_lossy(),
            "--wait-for",
            &format!("{SERVER}:8080"),
            "--wait-timeout",
            "20s",
        ],
        Duration::from_secs(30),
    )?;
    let up = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        eprintln!(
            "dns-bench: tern up --wait-for failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let first = latencies(&w.job, &format!("{CI_IP}:53"), "api.internal", 1);
    Some((up, *first.first()?))
}

fn stop_ci(w: &World) {
    let config = w.lab.dir().join("ci-1.toml");
    let _ = w.job.exec_timeout(
        &workspace_bin("tern").to_string_lossy(),
        ["down", "--config", &config.to_string_lossy()],
        Duration::from_secs(15),
    );
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("--client") {
        argv.next();
        return match client(argv) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dns-bench --client: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dns-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !require_root("dns-bench") || !require_tools("dns-bench", &["dnsmasq", "python3"]) {
        return ExitCode::from(2);
    }
    let (through, straight) = (format!("{CI_IP}:53"), format!("{RESOLVER}:53"));
    // Per rep: p50 and p99 through the mesh and straight, their ratios; the
    // node name's p50; qps both ways and their ratio; cold start.
    let mut f: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut other_answers = 0;
    for rep in 1..=args.reps {
        let w = world();
        let Some((up, first)) = cold_start(&w) else {
            return ExitCode::FAILURE;
        };
        let mesh = latencies(&w.job, &through, "api.internal", args.queries);
        let direct = latencies(&w.gw, &straight, "api.internal", args.queries);
        let node = latencies(&w.job, &through, "gw-1.tern", args.queries);
        if mesh.len() < args.queries || direct.len() < args.queries || node.len() < args.queries {
            eprintln!("dns-bench: rep {rep}: queries went unanswered");
            return ExitCode::FAILURE;
        }
        let stats = |v: &[f64]| (median(&mut v.to_vec()), percentile(v, 0.99));
        let ((m50, m99), (d50, d99), (n50, _)) = (stats(&mesh), stats(&direct), stats(&node));
        let mq = qps(&w.job, &through, "api.internal", args.seconds);
        let dq = qps(&w.gw, &straight, "api.internal", args.seconds);
        stop_ci(&w);
        let (Some((mq, mo)), Some((dq, _))) = (mq, dq) else {
            eprintln!("dns-bench: rep {rep}: the qps client failed");
            return ExitCode::FAILURE;
        };
        other_answers += mo;
        for (k, v) in [
            ("m50", m50),
            ("m99", m99),
            ("d50", d50),
            ("d99", d99),
            ("r50", m50 / d50),
            ("r99", m99 / d99),
            ("n50", n50),
            ("mq", mq),
            ("dq", dq),
            ("rq", mq / dq),
            ("up", up),
            ("first", first),
        ] {
            f.entry(k).or_default().push(v);
        }
        eprintln!(
            "dns-bench: rep {rep}/{}: through the mesh p50 {m50:.3} ms p99 {m99:.3} ms, straight p50 {d50:.3} ms p99 {d99:.3} ms; node name p50 {n50:.3} ms; {mq:.0} qps through the mesh ({mo} other answers), {dq:.0} straight; up --wait-for {up:.0} ms, first query {first:.2} ms",
            args.reps
        );
    }
    let c = |k: &str, d: usize| cell(f.get(k).map_or(&[][..], Vec::as_slice), d);
    let table = format!(
        "## Names: split DNS through the mesh\n\n\
         {}\n\
         Command: `dns-bench --reps {} --queries {} --seconds {}` (a lighthouse, a CI node in TUN \
         mode, a gateway whose certificate carries the zone `internal`, dnsmasq as the private \
         network's resolver; built afresh for each repetition). The client is a plain UDP DNS \
         client run inside a namespace: through the mesh it asks the CI node on its overlay \
         address, which sends the query to the gateway, which asks dnsmasq; straight, it asks \
         dnsmasq from the gateway's own namespace. The gateway's per-caller limit \
         (`queries_per_sec`, default 1000) is raised for this run, so that the rates below are \
         what the path carries.\n\n\
         | metric | through the mesh | straight to the resolver | mesh / straight |\n|---|---|---|---|\n\
         | `api.internal` A, p50 of {} sequential queries (ms) | {} | {} | {} |\n\
         | same, p99 (ms) | {} | {} | {} |\n\
         | queries per second, {WINDOW} outstanding, {} s | {} | {} | {} |\n\
         | `gw-1.tern` A (a node name, from a certificate), p50 (ms) | {} | — | — |\n\
         | cold start: `tern up --wait-for` a private service (ms) | {} | — | — |\n\
         | cold start: the first query after it (ms) | {} | — | — |\n\n\
         Answers other than an address during the qps runs (REFUSED by the per-caller rate \
         limit, SERVFAIL): {other_answers} in all. Cells are median (min–max) across \
         repetitions; ratios are per repetition.\n",
        machine_line(),
        args.reps,
        args.queries,
        args.seconds,
        args.queries,
        c("m50", 3),
        c("d50", 3),
        c("r50", 1),
        c("m99", 3),
        c("d99", 3),
        c("r99", 1),
        args.seconds,
        c("mq", 0),
        c("dq", 0),
        c("rq", 2),
        c("n50", 3),
        c("up", 0),
        c("first", 2),
    );
    println!("{table}");
    if args.write {
        match write_section("dns", &table) {
            Ok(path) => eprintln!("dns-bench: wrote the section into {}", path.display()),
            Err(e) => {
                eprintln!("dns-bench: writing BENCHMARKS.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
