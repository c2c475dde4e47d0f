//! `nat-bench`: what NAT traversal costs, measured in one run on real
//! kernels (the NAT lab of `src/nat.rs`; needs root, iperf3 and ping):
//!
//! - time from the first packet to a direct path through two port-preserving
//!   MASQUERADE NATs (both nodes' `tern status` say "direct");
//! - time from the first packet to the relay fallback through two
//!   `--random-fully` NATs (both say "relayed"; `[peers] relay_after` is 2 s);
//! - iperf3 TCP throughput over the direct path and over the relay.
//!
//! ```text
//! cargo build --release --workspace
//! sudo target/release/nat-bench [--reps N] [--seconds S] [--write]
//! ```
//!
//! `--write` replaces the NAT section of BENCHMARKS.md. Each repetition
//! builds both labs afresh, so every "first packet" is really the first.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tern_netns_tests::nat::{world, Nat, World, B_OVERLAY};
use tern_netns_tests::{require_root, require_tools};

struct Args {
    reps: usize,
    seconds: u32,
    write: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        reps: 3,
        seconds: 5,
        write: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => {
                args.reps = number(it.next(), "--reps", 1, 20)?;
            }
            "--seconds" => {
                args.seconds = number(it.next(), "--seconds", 1, 60)?;
            }
            "--write" => args.write = true,
            "-h" | "--help" => {
                return Err("usage: nat-bench [--reps N (1-20, default 3)] [--seconds S (1-60, default 5)] [--write]".into())
            }
            other => return Err(format!("unknown argument {other:?}; see --help")),
        }
    }
    Ok(args)
}

fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    v: Option<String>,
    flag: &str,
    min: T,
    max: T,
) -> Result<T, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    let n: T = v
        .parse()
        .map_err(|_| format!("{flag} {v:?} is not a number"))?;
    if n < min || n > max {
        return Err(format!("{flag} must be {min} to {max}"));
    }
    Ok(n)
}

/// Starts pinging b from a and returns how long until both sides report
/// `kind` as their path to each other.
fn time_to(w: &World, kind: &str) -> Option<Duration> {
    let start = Instant::now();
    let _ping = w.a.node.spawn(
        "ping",
        ["-i", "0.05", "-c", "400", "-W", "1", B_OVERLAY],
        "ping",
    );
    while start.elapsed() < Duration::from_secs(20) {
        if w.path("a", B_OVERLAY).as_deref() == Some(kind)
            && w.path("b", "100.64.0.5").as_deref() == Some(kind)
        {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// iperf3 a→b over the overlay for `seconds`: Gbit/s received.
fn iperf(w: &World, seconds: u32) -> Option<f64> {
    let _server =
        w.b.node
            .spawn("iperf3", ["-s", "-1", "-B", B_OVERLAY], "iperf3-server");
    std::thread::sleep(Duration::from_millis(300));
    let secs = seconds.to_string();
    let out = w.a.node.exec_timeout(
        "iperf3",
        ["-c", B_OVERLAY, "-t", secs.as_str(), "-J"],
        Duration::from_secs(seconds as u64 + 20),
    )?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn cell(v: &[f64], digits: usize) -> String {
    let mut v = v.to_vec();
    if v.is_empty() {
        return "—".into();
    }
    let m = median(&mut v);
    if v.len() == 1 {
        return format!("{m:.digits$}");
    }
    format!(
        "{m:.digits$} ({:.digits$}–{:.digits$})",
        v[0],
        v[v.len() - 1]
    )
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nat-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !require_root("nat-bench")
        || !require_tools(
            "nat-bench",
            &["iperf3", "ping", "iptables", "python3", "ss"],
        )
    {
        return ExitCode::from(2);
    }
    let (mut to_direct, mut to_relay, mut direct_gbps, mut relayed_gbps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=args.reps {
        {
            let w = world("nbdirect", Nat::PortPreserving, Nat::PortPreserving);
            match time_to(&w, "direct") {
                Some(t) => to_direct.push(t.as_secs_f64() * 1000.0),
                None => eprintln!("nat-bench: rep {rep}: no direct path within 20 s"),
            }
            if let Some(g) = iperf(&w, args.seconds) {
                direct_gbps.push(g);
            }
        }
        {
            let w = world("nbrelay", Nat::RandomFully, Nat::RandomFully);
            match time_to(&w, "relayed") {
                Some(t) => to_relay.push(t.as_secs_f64() * 1000.0),
                None => eprintln!("nat-bench: rep {rep}: no relayed path within 20 s"),
            }
            if let Some(g) = iperf(&w, args.seconds) {
                relayed_gbps.push(g);
            }
        }
        eprintln!(
            "nat-bench: rep {rep}/{}: direct after {:?} ms, relayed after {:?} ms, {:?} / {:?} Gbit/s",
            args.reps,
            to_direct.last(),
            to_relay.last(),
            direct_gbps.last(),
            relayed_gbps.last()
        );
    }
    let ratio = {
        let (mut d, mut r) = (direct_gbps.clone(), relayed_gbps.clone());
        median(&mut r) / median(&mut d)
    };
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let table = format!(
        "## NAT traversal: time to a path, and the relay's cost\n\n\
         Machine: {nproc} cores, kernel {}; {date}; tern {commit}.\n\
         Command: `nat-bench --reps {} --seconds {}` (the NAT lab of `netns-tests/src/nat.rs`, \
         built afresh for every repetition).\n\n\
         | metric | median (min–max) |\n|---|---|\n\
         | first packet → direct path through two port-preserving NATs (ms) | {} |\n\
         | first packet → relayed path through two `--random-fully` NATs (ms; `relay_after` = 2 s) | {} |\n\
         | TCP throughput a→b, direct (Gbit/s) | {} |\n\
         | TCP throughput a→b, through the relay (Gbit/s) | {} |\n\
         | relayed / direct | {ratio:.2}× |\n\n\
         \"First packet\" is the first of a stream of pings from a to b, sent while neither knows \
         the other; the path counts when both nodes' `tern status` show it. The relay is the \
         lighthouse, which forwards WireGuard ciphertext it cannot read; on this 2-core machine it \
         shares the cores with both nodes and iperf3.\n",
        kernel.trim(),
        args.reps,
        args.seconds,
        cell(&to_direct, 0),
        cell(&to_relay, 0),
        cell(&direct_gbps, 2),
        cell(&relayed_gbps, 2),
    );
    println!("{table}");
    if args.write {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let (start, end) = ("<!-- bench:nat:start -->", "<!-- bench:nat:end -->");
        let section = format!("{start}\n{table}{end}");
        let new = match (text.find(start), text.find(end)) {
            (Some(s), Some(e)) if s < e => {
                format!("{}{section}{}", &text[..s], &text[e + end.len()..])
            }
            _ => format!("{text}\n{section}\n"),
        };
        if let Err(e) = std::fs::write(&path, new) {
            eprintln!("nat-bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("nat-bench: wrote the section into {}", path.display());
    }
    ExitCode::SUCCESS
}
