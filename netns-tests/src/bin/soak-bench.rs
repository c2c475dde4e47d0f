//! `soak-bench`: the soak run of `src/soak.rs` for as many 60 s cycles of
//! faults as asked (ten by default: ten minutes), on real kernels. Needs
//! root, curl, python3 and iptables.
//!
//! ```text
//! cargo build --release --workspace
//! sudo target/release/soak-bench [--cycles N] [--write]
//! ```
//!
//! `--write` replaces the soak section of RELIABILITY.md.

use std::process::ExitCode;

use tern_netns_tests::report::{machine_line, number, write_section_in};
use tern_netns_tests::soak::{run, FAILOVER_WINDOW};
use tern_netns_tests::{require_root, require_tools};

fn main() -> ExitCode {
    let mut cycles = 10u32;
    let mut write = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cycles" => match number(it.next(), "--cycles", 1, 60) {
                Ok(n) => cycles = n,
                Err(e) => {
                    eprintln!("soak-bench: {e}");
                    return ExitCode::from(2);
                }
            },
            "--write" => write = true,
            "-h" | "--help" => {
                eprintln!("usage: soak-bench [--cycles N (1-60, default 10)] [--write]");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("soak-bench: unknown argument {other:?}; see --help");
                return ExitCode::from(2);
            }
        }
    }
    if !require_root("soak-bench")
        || !require_tools("soak-bench", &["curl", "python3", "iptables", "seq"])
    {
        return ExitCode::from(2);
    }
    let r = run("soakbench", cycles);
    let cut_after: Vec<String> = r
        .downloads_cut
        .iter()
        .map(|c| format!("{:.0} s", c.started))
        .collect();
    let kills: Vec<String> = r
        .events
        .iter()
        .filter(|(e, _)| e.starts_with("gateway killed"))
        .map(|(_, t)| format!("{t:.0} s"))
        .collect();
    let unexcused = r.cuts_outside_failover();
    let section = format!(
        "{}\n\
         Command: `soak-bench --cycles {cycles}` ({:.0} s of work; release build).\n\n\
         {}\n\
         Gateways killed at {}; downloads cut (start times) {}; cut more than {} s after \
         every gateway kill: {}. Failovers the CI node counted: {}. Jobs not ending 0: {}.\n",
        machine_line(),
        r.seconds,
        r.table(),
        if kills.is_empty() {
            "—".into()
        } else {
            kills.join(", ")
        },
        if cut_after.is_empty() {
            "none".into()
        } else {
            cut_after.join(", ")
        },
        FAILOVER_WINDOW.as_secs(),
        unexcused.len(),
        r.gateway_failovers,
        r.bad_jobs.iter().filter(|j| j.exit != Some(0)).count(),
    );
    println!("{section}");
    for (what, at) in &r.events {
        eprintln!("{at:7.1} s  {what}");
    }
    if write {
        match write_section_in("RELIABILITY.md", "soak", &section) {
            Ok(p) => eprintln!("soak-bench: wrote {}", p.display()),
            Err(e) => {
                eprintln!("soak-bench: cannot write RELIABILITY.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let lost = r.downloads_corrupt > 0 || r.lines_lost() > 0 || !unexcused.is_empty();
    if lost {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
