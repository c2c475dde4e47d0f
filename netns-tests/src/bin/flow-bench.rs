//! `flow-bench`: what flow records cost a gateway, on real kernels (needs
//! root, iperf3 and iptables). A lighthouse, one TUN-mode gateway in front
//! of a private network, one CI node. For each repetition, with flow
//! records off and then on (`[flows] record`, switched by SIGHUP; on, also
//! written to a file):
//!
//! - single-stream TCP throughput through the gateway (iperf3) and the
//!   gateway daemon's CPU per GB;
//! - short connections: one client connecting, reading one byte and closing,
//!   as fast as it can, for the same time: connections per second and the
//!   gateway's CPU per thousand connections (each makes a record);
//! - bytes of log per flow (the file's, and on the wire to the lighthouse).
//!
//! And first, without IO (so without this machine's noise): the firewall's
//! own work per packet of one long flow and per short flow, records off
//! and on, and what a record costs after the firewall (its JSON line, its
//! share of a `FlowRecords` message).
//!
//! ```text
//! cargo build --release --workspace
//! sudo TERN_BIN_DIR=target/release target/release/flow-bench [--reps N] [--seconds S] [--write]
//! ```
//!
//! `--write` replaces the flows section of BENCHMARKS.md. `.ci/run` runs it
//! briefly as a smoke run (`--reps 1 --seconds 1`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tern_netns_tests::report::{
    cell, machine_line, median, proc_cpu_seconds, write_section, RepsArgs,
};
use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, wait_until, Ns, Proc};
use tern_node_core::firewall::{Firewall, Verdict};
use tern_shared::cert::{CaPool, Cert};
use tern_shared::config::NodeConfig;
use tern_shared::control::ControlMessage;
use tern_shared::flows::{FlowEntry, FlowView};

const SERVER: &str = "198.19.0.10";
const SHORT_PORT: u16 = 7000;

/// `flow-bench --serve ADDR`: accepts, writes one byte, waits for the
/// client to close (so that TIME_WAIT lands on the client, which picks a
/// fresh port for its next connection), closes; until killed.
fn serve(addr: &str) -> ExitCode {
    let Ok(listener) = TcpListener::bind(addr) else {
        eprintln!("flow-bench: cannot listen on {addr}");
        return ExitCode::from(1);
    };
    for mut conn in listener.incoming().flatten() {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = conn.write_all(b"x");
        let mut rest = [0u8; 16];
        while matches!(conn.read(&mut rest), Ok(n) if n > 0) {}
    }
    ExitCode::SUCCESS
}

/// `flow-bench --connect ADDR SECONDS`: connections one after another for
/// SECONDS (at most a million): prints how many completed.
fn connect(addr: &str, seconds: &str) -> ExitCode {
    let (Ok(addr), Ok(seconds)) = (addr.parse::<SocketAddr>(), seconds.parse::<u64>()) else {
        eprintln!("flow-bench: --connect ADDR SECONDS");
        return ExitCode::from(2);
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut done = 0u64;
    let mut failed = 0u64;
    while Instant::now() < deadline && done + failed < 1_000_000 {
        let ok = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte)
        });
        match ok {
            Ok(()) => done += 1,
            Err(_) => failed += 1,
        }
    }
    println!("{done} {failed}");
    ExitCode::SUCCESS
}

/// A TCP packet of `len` bytes (`flags`: SYN 0x02, ACK 0x10, FIN 0x11).
fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.resize(len.max(40), 0);
    p
}

/// A verified certificate for the caller (group ci), made with `tern cert`.
fn caller_cert() -> tern_shared::cert::VerifiedCert {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    make_ca(dir.path(), "ca");
    sign(
        dir.path(),
        "ca",
        "ci",
        "100.64.0.40/10",
        &["--groups", "ci"],
    );
    let read = |f: &str| {
        let text = std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
        Cert::from_pem(&text).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let pool = CaPool::new(vec![read("ca.crt")]).unwrap_or_else(|e| panic!("{e}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    pool.verify(&read("ci.crt"), now)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The firewall's work, records off then on: ns per packet of one long
/// flow, ns per short flow (seven packets, its record taken).
fn firewall_costs(caller: &tern_shared::cert::VerifiedCert, on: bool, scale: usize) -> (f64, f64) {
    let rules = format!(
        "[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[firewall.inbound]]\nproto = \"tcp\"\nport = \"5432\"\ngroups = [\"ci\"]\nlocal_cidr = \"{SERVER}/32\"\n"
    );
    let config = NodeConfig::parse(&rules, std::path::Path::new("/bench/gw.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
        .firewall;
    let (ci, db, gw) = (
        Ipv4Addr::new(100, 64, 0, 40),
        Ipv4Addr::new(198, 19, 0, 10),
        Ipv4Addr::new(100, 64, 0, 30),
    );
    let t0 = Instant::now();
    let mut fw = Firewall::new(&config, gw, t0);
    fw.record_flows(on);
    fw.check_inbound(&tcp(ci, db, 40000, 5432, 0x02, 40), caller, t0);
    let (data_in, data_out) = (
        tcp(ci, db, 40000, 5432, 0x10, 1400),
        tcp(db, ci, 5432, 40000, 0x10, 1400),
    );
    let packets = 200_000 * scale;
    let started = Instant::now();
    for n in 0..packets {
        let v = if n % 2 == 0 {
            fw.check_inbound(&data_in, caller, t0)
        } else {
            fw.check_outbound(&data_out, caller, t0)
        };
        assert_eq!(v, Verdict::Allow);
    }
    let per_packet = started.elapsed().as_nanos() as f64 / packets as f64;
    let mut fw = Firewall::new(&config, gw, t0);
    fw.record_flows(on);
    let flows = 20_000 * scale;
    let made: Vec<Vec<(bool, Vec<u8>)>> = (0..60_000u16)
        .take(flows.min(60_000))
        .map(|i| {
            let port = 1024 + i;
            vec![
                (true, tcp(ci, db, port, 5432, 0x02, 60)),
                (false, tcp(db, ci, 5432, port, 0x12, 60)),
                (true, tcp(ci, db, port, 5432, 0x10, 52)),
                (true, tcp(ci, db, port, 5432, 0x18, 200)),
                (false, tcp(db, ci, 5432, port, 0x18, 300)),
                (true, tcp(ci, db, port, 5432, 0x11, 52)),
                (false, tcp(db, ci, 5432, port, 0x11, 52)),
            ]
        })
        .collect();
    let started = Instant::now();
    let mut at = t0;
    for f in 0..flows {
        for (inbound, p) in &made[f % made.len()] {
            if *inbound {
                fw.check_inbound(p, caller, at);
            } else {
                fw.check_outbound(p, caller, at);
            }
        }
        let _ = fw.take_records(usize::MAX);
        if f % made.len() == made.len() - 1 {
            // The same ports again: the old flows are gone by then.
            at += Duration::from_secs(3600);
            fw.handle_timeout(at);
        }
    }
    (
        per_packet,
        started.elapsed().as_nanos() as f64 / flows as f64,
    )
}

/// What a record costs after the firewall: its JSON line and its share of
/// a 16-record `FlowRecords` message, ns.
fn record_cost(caller: &tern_shared::cert::VerifiedCert, scale: usize) -> f64 {
    let entry = FlowEntry {
        seq: 1,
        start_ms: 1_800_000_000_000,
        end_ms: 1_800_000_000_100,
        caller: caller.name().to_string(),
        fingerprint: caller.fingerprint(),
        groups: caller.groups().to_vec(),
        src: Ipv4Addr::new(100, 64, 0, 40),
        src_port: 40000,
        dst: Ipv4Addr::new(198, 19, 0, 10),
        dst_port: 5432,
        dst_port_last: 5432,
        proto: 6,
        allowed: true,
        rule: Some(0),
        reason: tern_shared::flows::FlowEnd::Closed,
        bytes_in: 1200,
        packets_in: 9,
        bytes_out: 88_000,
        packets_out: 61,
    };
    let batch: Vec<FlowEntry> = (0..16)
        .map(|i| FlowEntry {
            seq: i,
            ..entry.clone()
        })
        .collect();
    let rounds = 1_000 * scale;
    let started = Instant::now();
    for _ in 0..rounds {
        for e in &batch {
            let line = serde_json::to_vec(&FlowView::new("gw", e)).unwrap_or_default();
            assert!(!line.is_empty());
        }
        let msg = ControlMessage::FlowRecords {
            id: 1,
            dropped: 0,
            flows: batch.clone(),
        };
        assert!(msg.encode().is_ok());
    }
    started.elapsed().as_nanos() as f64 / (rounds * 16) as f64
}

/// The figures without IO, as Markdown.
fn sans_io(reps: usize, scale: usize) -> String {
    let caller = caller_cert();
    let (mut long, mut short, mut after) = (
        [Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
        Vec::new(),
    );
    for _ in 0..reps {
        for (i, on) in [false, true].into_iter().enumerate() {
            let (p, f) = firewall_costs(&caller, on, scale);
            long[i].push(p);
            short[i].push(f);
        }
        after.push(record_cost(&caller, scale));
    }
    let [l_off, l_on] = &mut long;
    let [s_off, s_on] = &mut short;
    format!(
        "Without IO (this build, one core; {reps} runs, median (min–max)): a gateway's firewall with one rule; \
         {} packets of 1,400 bytes of one flow, alternating in and out; {} short flows of seven packets \
         (SYN, SYN-ACK, ACK, a request, an answer, two FINs), each making a record when on, taken from the queue.\n\n\
         | | records off | records on | on / off |\n|---|---|---|---|\n\
         | firewall, ns per packet of a long flow | {} | {} | {} |\n\
         | firewall, ns per short flow | {} | {} | {} |\n\n\
         After the firewall, a record's JSON line and its share of a 16-record `FlowRecords` message: {} ns.\n\n",
        200_000 * scale,
        20_000 * scale,
        cell(l_off, 1),
        cell(l_on, 1),
        ratio(l_on, l_off),
        cell(s_off, 0),
        cell(s_on, 0),
        ratio(s_on, s_off),
        cell(&after, 0),
    )
}

struct Bench {
    dir: std::path::PathBuf,
    ci: Ns,
    vpc: Ns,
    gw_proc: Proc,
    _keep: Vec<Proc>,
    _lab: tern_netns_tests::Lab,
}

fn gateway_config(records: bool) -> String {
    let quiet = |t: String| t.replace("level = \"debug\"", "level = \"info\"");
    format!(
        "{}[gateway]\nsubnets = [\"198.19.0.0/24\"]\nmasquerade = true\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = \"5201\"\ngroups = [\"ci\"]\nlocal_cidr = \"{SERVER}/32\"\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = \"{SHORT_PORT}\"\ngroups = [\"ci\"]\nlocal_cidr = \"{SERVER}/32\"\n\
         [flows]\nrecord = {records}\npath = \"gw-flows.jsonl\"\n",
        quiet(node_config_text("gw", "ca.crt"))
    )
}

fn build() -> Bench {
    let GatewayLab {
        lab,
        dir,
        lh,
        ci,
        gw,
        vpc,
    } = gateway_lab("flwb", SERVER);
    make_ca_and_lighthouse(&dir);
    sign(
        &dir,
        "ca",
        "gw",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24"],
    );
    sign(&dir, "ca", "ci", "100.64.0.40/10", &["--groups", "ci"]);
    let lh_config = write_lighthouse_config(&dir);
    let text = std::fs::read_to_string(&lh_config)
        .unwrap_or_default()
        .replace("level = \"debug\"", "level = \"info\"");
    write_file(&dir, "lighthouse.toml", &text);
    let mut keep = vec![start_lighthouse(&lh, &lh_config)];
    let gw_proc = start_node(
        &gw,
        &write_file(&dir, "gw.toml", &gateway_config(false)),
        "node-gw",
    );
    let ci_config = node_config_text("ci", "ca.crt")
        .replace("level = \"debug\"", "level = \"info\"")
        + "[[routes]]\nsubnet = \"198.19.0.0/24\"\n";
    keep.push(start_node(
        &ci,
        &write_file(&dir, "ci.toml", &ci_config),
        "node-ci",
    ));
    keep.push(vpc.spawn(
        "iperf3",
        ["-s", "-B", SERVER, "-p", "5201"],
        "iperf3-server",
    ));
    let me = std::env::current_exe().unwrap_or_default();
    keep.push(vpc.spawn(
        &me.to_string_lossy(),
        ["--serve", &format!("{SERVER}:{SHORT_PORT}")],
        "short-server",
    ));
    wait_until("ci reaches the vpc", Duration::from_secs(30), || {
        ci.exec("ping", ["-c1", "-W1", SERVER]).status.success() || short_connections(&ci, 1).0 > 0
    });
    Bench {
        dir,
        ci,
        vpc,
        gw_proc,
        _keep: keep,
        _lab: lab,
    }
}

/// Completed and failed short connections in `seconds`.
fn short_connections(ci: &Ns, seconds: u64) -> (u64, u64) {
    let me = std::env::current_exe().unwrap_or_default();
    let out = ci.exec_timeout(
        &me.to_string_lossy(),
        [
            "--connect".to_string(),
            format!("{SERVER}:{SHORT_PORT}"),
            seconds.to_string(),
        ],
        Duration::from_secs(seconds + 20),
    );
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .map(|n| n.parse::<u64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Records on or off: the gateway's config rewritten and reloaded.
fn set_records(b: &Bench, on: bool) {
    let seen = b.gw_proc.log().matches("firewall rules reloaded").count();
    write_file(&b.dir, "gw.toml", &gateway_config(on));
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &b.gw_proc.pid().to_string()])
        .status();
    b.gw_proc
        .wait_for_another_log("firewall rules reloaded", seen, Duration::from_secs(10));
}

#[derive(Default)]
struct Round {
    gbps: Vec<f64>,
    cpu_per_gb: Vec<f64>,
    conns_per_sec: Vec<f64>,
    cpu_per_kconn: Vec<f64>,
    failed: u64,
}

fn measure(b: &Bench, seconds: u32, round: &mut Round) {
    let pid = b.gw_proc.pid();
    let c0 = proc_cpu_seconds(pid);
    let secs = seconds.to_string();
    let out = b.ci.exec_timeout(
        "iperf3",
        ["-c", SERVER, "-p", "5201", "-t", secs.as_str(), "-J"],
        Duration::from_secs(seconds as u64 + 20),
    );
    let c1 = proc_cpu_seconds(pid);
    let json: serde_json::Value = out
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default();
    let received = &json["end"]["sum_received"];
    if let (Some(bps), Some(bytes), Some((a, z))) = (
        received["bits_per_second"].as_f64(),
        received["bytes"].as_f64(),
        c0.zip(c1),
    ) {
        round.gbps.push(bps / 1e9);
        round.cpu_per_gb.push((z - a) / (bytes / 1e9));
    }
    let c0 = proc_cpu_seconds(pid);
    let started = Instant::now();
    let (done, failed) = short_connections(&b.ci, seconds as u64);
    let elapsed = started.elapsed().as_secs_f64().max(seconds as f64);
    let c1 = proc_cpu_seconds(pid);
    round.failed += failed;
    if done > 0 {
        round.conns_per_sec.push(done as f64 / elapsed);
        if let Some((a, z)) = c0.zip(c1) {
            round.cpu_per_kconn.push((z - a) / (done as f64 / 1000.0));
        }
    }
}

fn ratio(on: &mut [f64], off: &mut [f64]) -> String {
    let (a, b) = (median(on), median(off));
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.3}×", a / b)
    } else {
        "—".into()
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        Some("--serve") => return serve(argv.get(2).map_or("", String::as_str)),
        Some("--connect") => {
            return connect(
                argv.get(2).map_or("", String::as_str),
                argv.get(3).map_or("", String::as_str),
            )
        }
        _ => {}
    }
    let args = match RepsArgs::parse("flow-bench") {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let without_io = sans_io(args.reps, if args.seconds >= 5 { 5 } else { 1 });
    eprint!("{without_io}");
    if !require_root("flow-bench") || !require_tools("flow-bench", &["iperf3", "iptables", "ping"])
    {
        return ExitCode::from(2);
    }
    let b = build();
    let (mut off, mut on) = (Round::default(), Round::default());
    for rep in 0..args.reps {
        for (records, round) in [(false, &mut off), (true, &mut on)] {
            set_records(&b, records);
            eprintln!(
                "flow-bench: repetition {} with records {}",
                rep + 1,
                if records { "on" } else { "off" }
            );
            measure(&b, args.seconds, round);
        }
    }
    // Let the last flows end (closed at once; the rest within their
    // timeout is not waited for), then read what was written and sent.
    std::thread::sleep(Duration::from_secs(1));
    let status = status(&b.dir, "gw");
    let flows = &status["flows"];
    let file = std::fs::read_to_string(b.dir.join("gw-flows.jsonl")).unwrap_or_default();
    let lines = file.lines().count().max(1);
    let per_line = file.len() as f64 / lines as f64;
    let (recorded, dropped, shipped) = (
        flows["recorded"].as_u64().unwrap_or(0),
        flows["dropped"].as_u64().unwrap_or(0),
        flows["shipped"].as_u64().unwrap_or(0),
    );
    let wire = tern_shared::control::FLOW_RECORD_LEN as f64;
    let mut table = format!("## Flow records: a gateway with records off and on\n\n{without_io}");
    table.push_str(&format!(
        "On real kernels: flow records at a TUN-mode gateway, off and on (`[flows] record`, switched by SIGHUP; on, also \
         written to a file and sent to the lighthouse), interleaved, {} repetitions of {} s each; \
         median (min–max). {}\n\n\
         | | records off | records on | on / off |\n|---|---|---|---|\n",
        args.reps,
        args.seconds,
        machine_line()
    ));
    let row = |label: &str, a: &mut Vec<f64>, z: &mut Vec<f64>, digits: usize| {
        format!(
            "| {label} | {} | {} | {} |\n",
            cell(a, digits),
            cell(z, digits),
            ratio(z, a)
        )
    };
    table.push_str(&row(
        "single-stream TCP, Gbit/s",
        &mut off.gbps,
        &mut on.gbps,
        2,
    ));
    table.push_str(&row(
        "gateway CPU s per GB",
        &mut off.cpu_per_gb,
        &mut on.cpu_per_gb,
        3,
    ));
    table.push_str(&row(
        "short connections per second (one client)",
        &mut off.conns_per_sec,
        &mut on.conns_per_sec,
        0,
    ));
    table.push_str(&row(
        "gateway CPU s per 1,000 connections",
        &mut off.cpu_per_kconn,
        &mut on.cpu_per_kconn,
        3,
    ));
    table.push_str(&format!(
        "\nRecords made: {recorded}, sent to the lighthouse and acknowledged: {shipped}, dropped: {dropped}; \
         connections that failed: {} off, {} on. A record is {per_line:.0} bytes as a JSON line in the file \
         and {wire:.0} bytes on the wire (plus its caller's name and groups once per message of up to 64).\n",
        off.failed, on.failed
    ));
    println!("{table}");
    let _ = &b.vpc;
    if args.write {
        match write_section("flows", &table) {
            Ok(p) => eprintln!("flow-bench: wrote {}", p.display()),
            Err(e) => {
                eprintln!("flow-bench: writing BENCHMARKS.md: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}
