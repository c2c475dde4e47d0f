//! `coldstart-bench`: how soon a whole mesh that starts at once carries
//! traffic. A lighthouse and two nodes on one flat underlay (no NAT) are
//! launched at the same moment; a pings b from the launch on (every 5 ms)
//! and the figure is the time from the launch to b's first answer. Needs
//! root and ping.
//!
//! ```text
//! cargo build --release --workspace
//! sudo target/release/coldstart-bench [--reps N] [--baseline-bin-dir DIR] [--write]
//! ```
//!
//! `--baseline-bin-dir DIR` runs every repetition a second time with the
//! `tern` and `tern-lighthouse` in DIR (another build, say the previous
//! release), interleaved, so both are measured in the same run on the same
//! machine. `--write` replaces the cold-start section of BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tern_netns_tests::report::{machine_line, median, number, percentile, write_section};
use tern_netns_tests::tern::{
    flat_lab, make_ca_and_lighthouse, node_config_text, sign, write_file, FlatLab,
};
use tern_netns_tests::{require_root, require_tools, workspace_bin};

const B_OVERLAY: &str = "100.64.0.6";
/// Longest a repetition waits for the first answer.
const PATIENCE: Duration = Duration::from_secs(15);
/// The goal: the first answer within this, every time.
const GOAL_MS: f64 = 150.0;

/// One row's cells: median, 90th percentile, worst, and how many runs
/// missed the goal (a cold start is a race: its figures are bimodal, and
/// the slow runs are what a user waits for).
fn row(v: &[f64]) -> String {
    if v.is_empty() {
        return "— | — | — | —".into();
    }
    let over = v.iter().filter(|ms| **ms > GOAL_MS).count();
    format!(
        "{:.0} | {:.0} | {:.0} | {over} of {}",
        median(&mut v.to_vec()),
        percentile(v, 0.9),
        percentile(v, 1.0),
        v.len()
    )
}

struct Args {
    reps: usize,
    baseline: Option<PathBuf>,
    write: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        reps: 5,
        baseline: None,
        write: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => args.reps = number(it.next(), "--reps", 1, 50)?,
            "--baseline-bin-dir" => {
                let dir = PathBuf::from(it.next().ok_or("--baseline-bin-dir needs a directory")?);
                for bin in ["tern", "tern-lighthouse"] {
                    if !dir.join(bin).is_file() {
                        return Err(format!("{} has no {bin}", dir.display()));
                    }
                }
                args.baseline = Some(dir);
            }
            "--write" => args.write = true,
            "-h" | "--help" => {
                return Err("usage: coldstart-bench [--reps N (1-50, default 5)] [--baseline-bin-dir DIR] [--write]".into())
            }
            other => return Err(format!("unknown argument {other:?}; see --help")),
        }
    }
    Ok(args)
}

/// One cold start with the binaries in `bins`: milliseconds from launching
/// the lighthouse and both nodes to a's first answer from b.
fn cold_start(bins: &Path) -> Option<f64> {
    let FlatLab { lab, dir, lh, a, b } = flat_lab("cold");
    make_ca_and_lighthouse(&dir);
    sign(&dir, "ca", "a", "100.64.0.5/10", &[]);
    sign(&dir, "ca", "b", "100.64.0.6/10", &[]);
    let open = "[dns]\nconfigure_system = false\n[[firewall.inbound]]\nproto = \"any\"\n[log]\nlevel = \"warn\"\n";
    let node = |name: &str| {
        let text = node_config_text(name, "ca.crt").replace("[log]\nlevel = \"debug\"\n", "");
        write_file(&dir, &format!("{name}.toml"), &format!("{text}{open}"))
    };
    let (a_config, b_config) = (node("a"), node("b"));
    let lh_config = tern_netns_tests::tern::write_lighthouse_config(&dir);
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (tern, lighthouse) = (bins.join("tern"), bins.join("tern-lighthouse"));

    let launch = Instant::now();
    let _lh = lh.spawn(
        &path(&lighthouse),
        ["--config", &path(&lh_config)],
        "lighthouse",
    );
    let _a = a.spawn(&path(&tern), ["up", "--config", &path(&a_config)], "node-a");
    let _b = b.spawn(&path(&tern), ["up", "--config", &path(&b_config)], "node-b");
    while launch.elapsed() < PATIENCE {
        // Until a's TUN device exists ping fails at once; then each run
        // pings every 5 ms for up to 2 s and ends at the first answer.
        let out = a.exec(
            "ping",
            ["-n", "-q", "-c", "1", "-i", "0.005", "-w", "2", B_OVERLAY],
        );
        if out.status.success() {
            return Some(launch.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    lab.dump_logs();
    None
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("coldstart-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !require_root("coldstart-bench") || !require_tools("coldstart-bench", &["ping"]) {
        return ExitCode::from(2);
    }
    let this = workspace_bin("tern")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let (mut now_ms, mut base_ms) = (Vec::new(), Vec::new());
    for rep in 1..=args.reps {
        match cold_start(&this) {
            Some(ms) => now_ms.push(ms),
            None => eprintln!("coldstart-bench: rep {rep}: no answer within {PATIENCE:?}"),
        }
        if let Some(dir) = &args.baseline {
            match cold_start(dir) {
                Some(ms) => base_ms.push(ms),
                None => {
                    eprintln!("coldstart-bench: rep {rep}, baseline: no answer within {PATIENCE:?}")
                }
            }
        }
        eprintln!(
            "coldstart-bench: rep {rep}/{}: {:?} ms (baseline {:?} ms)",
            args.reps,
            now_ms.last(),
            base_ms.last()
        );
    }
    let baseline_rows = match &args.baseline {
        Some(dir) if !base_ms.is_empty() && !now_ms.is_empty() => {
            let ratio = median(&mut base_ms.clone()) / median(&mut now_ms.clone());
            let p90 = percentile(&base_ms, 0.9) / percentile(&now_ms, 0.9);
            format!(
                "| the same, baseline build (`{}`) | {} |\n\
                 | baseline / this build | {ratio:.1}× | {p90:.1}× | | |\n",
                dir.display(),
                row(&base_ms)
            )
        }
        _ => String::new(),
    };
    let table = format!(
        "## Cold start: a whole mesh launched at once\n\n\
         {}\n\
         Command: `coldstart-bench --reps {}{}` (a lighthouse and two nodes on one flat \
         underlay, launched at the same moment, built afresh for every repetition).\n\n\
         | launch → a's first ping answered by b (ms) | median | p90 | worst | over {GOAL_MS:.0} ms |\n\
         |---|---|---|---|---|\n\
         | this build | {} |\n{baseline_rows}\n\
         The ping runs from the launch on, every 5 ms once a's TUN device exists; the figure \
         includes each daemon's start, the lighthouse's hello and handshake, registration, the \
         lookup of b and the handshake between a and b.\n",
        machine_line(),
        args.reps,
        if args.baseline.is_some() {
            " --baseline-bin-dir DIR"
        } else {
            ""
        },
        row(&now_ms),
    );
    println!("{table}");
    if args.write {
        match write_section("coldstart", &table) {
            Ok(path) => eprintln!("coldstart-bench: wrote the section into {}", path.display()),
            Err(e) => {
                eprintln!("coldstart-bench: writing BENCHMARKS.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if now_ms.is_empty() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
