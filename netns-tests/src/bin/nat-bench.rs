//! `nat-bench`: what NAT traversal costs, measured in one run on real
//! kernels (the NAT lab of `src/nat.rs`; needs root, iperf3 and ping):
//!
//! - time from the first packet to a direct path through two port-preserving
//!   MASQUERADE NATs (both nodes' `tern status` say "direct");
//! - time from the first packet to the relay fallback through two
//!   `--random-fully` NATs (both say "relayed"; data goes through the relay
//!   from the first packet by default, `[peers] relay_after` 0 s);
//! - time from the first packet to the first answer, both ways through;
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
use tern_netns_tests::report::{cell, iperf_gbps, machine_line, median, write_section, RepsArgs};
use tern_netns_tests::{require_root, require_tools};

/// Pings sent every this many milliseconds from the first packet on.
const PING_EVERY_MS: f64 = 10.0;

/// Starts pinging b from a and returns how long until both sides report
/// `kind` as their path to each other, and how long until the first
/// answer (ms; from the ping's own log).
fn time_to(w: &World, kind: &str) -> (Option<Duration>, Option<f64>) {
    let start = Instant::now();
    let ping = w.a.node.spawn(
        "ping",
        ["-n", "-i", "0.01", "-c", "2000", "-W", "1", B_OVERLAY],
        "ping",
    );
    let mut path = None;
    while start.elapsed() < Duration::from_secs(20) {
        if w.path("a", B_OVERLAY).as_deref() == Some(kind)
            && w.path("b", "100.64.0.5").as_deref() == Some(kind)
        {
            path = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (path, first_answer_ms(&ping.log()))
}

/// When the first echo answered left, after the first (`icmp_seq=1`): its
/// sequence number times the interval, plus its round trip.
fn first_answer_ms(log: &str) -> Option<f64> {
    let line = log
        .lines()
        .find(|l| l.contains("icmp_seq=") && l.contains(" time="))?;
    let field = |name: &str| {
        let rest = &line[line.find(name)? + name.len()..];
        rest.split_whitespace().next()?.parse::<f64>().ok()
    };
    Some((field("icmp_seq=")? - 1.0) * PING_EVERY_MS + field(" time=")?)
}

/// iperf3 a→b over the overlay for `seconds`: Gbit/s received.
fn iperf(w: &World, seconds: u32) -> Option<f64> {
    iperf_gbps(&w.a.node, &w.b.node, B_OVERLAY, seconds)
}

fn main() -> ExitCode {
    let args = match RepsArgs::parse("nat-bench") {
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
    let (mut first_direct, mut first_relayed) = (Vec::new(), Vec::new());
    for rep in 1..=args.reps {
        {
            let w = world("nbdirect", Nat::PortPreserving, Nat::PortPreserving);
            let (path, first) = time_to(&w, "direct");
            match path {
                Some(t) => to_direct.push(t.as_secs_f64() * 1000.0),
                None => eprintln!("nat-bench: rep {rep}: no direct path within 20 s"),
            }
            first_direct.extend(first);
            if let Some(g) = iperf(&w, args.seconds) {
                direct_gbps.push(g);
            }
        }
        {
            let w = world("nbrelay", Nat::RandomFully, Nat::RandomFully);
            let (path, first) = time_to(&w, "relayed");
            match path {
                Some(t) => to_relay.push(t.as_secs_f64() * 1000.0),
                None => eprintln!("nat-bench: rep {rep}: no relayed path within 20 s"),
            }
            first_relayed.extend(first);
            if let Some(g) = iperf(&w, args.seconds) {
                relayed_gbps.push(g);
            }
        }
        eprintln!(
            "nat-bench: rep {rep}/{}: direct after {:?} ms (first answer {:?} ms), relayed after {:?} ms (first answer {:?} ms), {:?} / {:?} Gbit/s",
            args.reps,
            to_direct.last(),
            first_direct.last(),
            to_relay.last(),
            first_relayed.last(),
            direct_gbps.last(),
            relayed_gbps.last()
        );
    }
    let ratio = {
        let (mut d, mut r) = (direct_gbps.clone(), relayed_gbps.clone());
        median(&mut r) / median(&mut d)
    };
    let table = format!(
        "## NAT traversal: time to a path, and the relay's cost\n\n\
         {}\n\
         Command: `nat-bench --reps {} --seconds {}` (the NAT lab of `netns-tests/src/nat.rs`, \
         built afresh for every repetition).\n\n\
         | metric | median (min–max) |\n|---|---|\n\
         | first packet → direct path through two port-preserving NATs (ms) | {} |\n\
         | first packet → relayed path through two `--random-fully` NATs (ms) | {} |\n\
         | first packet → first answer, two port-preserving NATs (ms) | {} |\n\
         | first packet → first answer, two `--random-fully` NATs, through the relay (ms) | {} |\n\
         | TCP throughput a→b, direct (Gbit/s) | {} |\n\
         | TCP throughput a→b, through the relay (Gbit/s) | {} |\n\
         | relayed / direct | {ratio:.2}× |\n\n\
         \"First packet\" is the first of a stream of pings from a to b (one every 10 ms), sent \
         while neither knows the other; the path counts when both nodes' `tern status` show it, \
         the first answer when the first echo reply comes back (the ping's sequence number and \
         round trip). Data goes through the relay from the first packet while punching runs, \
         and moves to a direct path as soon as one is proven. The relay is the \
         lighthouse, which forwards WireGuard ciphertext it cannot read; on this 2-core machine it \
         shares the cores with both nodes and iperf3.\n",
        machine_line(),
        args.reps,
        args.seconds,
        cell(&to_direct, 0),
        cell(&to_relay, 0),
        cell(&first_direct, 0),
        cell(&first_relayed, 0),
        cell(&direct_gbps, 2),
        cell(&relayed_gbps, 2),
    );
    println!("{table}");
    if args.write {
        match write_section("nat", &table) {
            Ok(path) => eprintln!("nat-bench: wrote the section into {}", path.display()),
            Err(e) => {
                eprintln!("nat-bench: writing BENCHMARKS.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
