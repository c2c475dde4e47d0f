//! What the benchmark binaries share: their `--reps/--seconds/--write`
//! arguments, an iperf3 run, argument
//! numbers, medians and percentiles, table cells, the machine line, and the
//! replacement of their section in BENCHMARKS.md.

use std::path::{Path, PathBuf};

/// Parses a flag's value and checks it is within `min..=max`.
pub fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
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

/// Sorts `v` and returns its median (NaN when empty).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile, `p` in (0, 1] (NaN when empty).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// "median (min–max)" of the finite values, or "—".
pub fn cell(v: &[f64], digits: usize) -> String {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
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

/// A command's trimmed stdout, or "" if it cannot run.
pub fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// "Machine: N cores, kernel K; date; tern COMMIT."
pub fn machine_line() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
    format!(
        "Machine: {nproc} cores, kernel {}; {date}; tern {commit}.",
        kernel.trim()
    )
}

/// A field of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`), if readable.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if unreadable).
pub fn clock_ticks() -> f64 {
    command_output("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0)
}

/// CPU seconds (utime + stime, all threads) process `pid` has used.
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Busy and total jiffies of the whole machine (`/proc/stat`'s cpu line).
pub fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait are the fourth and fifth.
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// UDP datagrams the kernel dropped in `ns` because a socket's receive
/// buffer was full (`RcvbufErrors` in the namespace's /proc/net/snmp).
pub fn udp_rcvbuf_errors(ns: &crate::Ns) -> Option<u64> {
    let snmp = String::from_utf8_lossy(&ns.exec("cat", ["/proc/net/snmp"]).stdout).into_owned();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Jain's fairness index of `v`: 1 when all are equal, 1/n when one has all.
pub fn jain_fairness(v: &[f64]) -> f64 {
    let sum: f64 = v.iter().sum();
    let squares: f64 = v.iter().map(|x| x * x).sum();
    if v.is_empty() || squares == 0.0 {
        return f64::NAN;
    }
    sum * sum / (v.len() as f64 * squares)
}

/// Replaces the section between `<!-- bench:NAME:start -->` and its end
/// marker in BENCHMARKS.md with `table` (appends it when missing).
pub fn write_section(name: &str, table: &str) -> std::io::Result<PathBuf> {
    write_section_in("BENCHMARKS.md", name, table)
}

/// [`write_section`] in another file at the repository's root
/// (RELIABILITY.md, say).
pub fn write_section_in(file: &str, name: &str, table: &str) -> std::io::Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let (start, end) = (
        format!("<!-- bench:{name}:start -->"),
        format!("<!-- bench:{name}:end -->"),
    );
    let section = format!("{start}\n{table}{end}");
    let new = match (text.find(&start), text.find(&end)) {
        (Some(s), Some(e)) if s < e => {
            format!("{}{section}{}", &text[..s], &text[e + end.len()..])
        }
        _ => format!("{text}\n{section}\n"),
    };
    std::fs::write(&path, new)?;
    Ok(path)
}

/// `--reps N --seconds S --write`, the arguments of the benchmarks that
/// repeat timed runs.
pub struct RepsArgs {
    pub reps: usize,
    pub seconds: u32,
    pub write: bool,
}

impl RepsArgs {
    /// The process's arguments for the benchmark `name` (3 repetitions of
    /// 5 s by default).
    pub fn parse(name: &str) -> Result<RepsArgs, String> {
        let mut args = RepsArgs {
            reps: 3,
            seconds: 5,
            write: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                "--reps" => args.reps = number(it.next(), "--reps", 1, 20)?,
                "--seconds" => args.seconds = number(it.next(), "--seconds", 1, 60)?,
                "--write" => args.write = true,
                "-h" | "--help" => {
                    return Err(format!(
                        "usage: {name} [--reps N (1-20, default 3)] [--seconds S (1-60, default 5)] [--write]"
                    ))
                }
                other => return Err(format!("unknown argument {other:?}; see --help")),
            }
        }
        Ok(args)
    }
}

/// iperf3 TCP from `client` to a one-shot server in `server` bound to `ip`,
/// for `seconds`: Gbit/s received.
pub fn iperf_gbps(client: &crate::Ns, server: &crate::Ns, ip: &str, seconds: u32) -> Option<f64> {
    let _server = server.spawn("iperf3", ["-s", "-1", "-B", ip], "iperf3-server");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let secs = seconds.to_string();
    let out = client.exec_timeout(
        "iperf3",
        ["-c", ip, "-t", secs.as_str(), "-J"],
        std::time::Duration::from_secs(seconds as u64 + 20),
    )?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_percentiles_and_cells() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
        assert_eq!(percentile(&[5.0, 1.0, 3.0, 2.0, 4.0], 0.95), 5.0);
        assert_eq!(percentile(&[5.0, 1.0, 3.0, 2.0, 4.0], 0.5), 3.0);
        assert_eq!(cell(&[2.0, 1.0, f64::NAN, 3.0], 1), "2.0 (1.0–3.0)");
        assert_eq!(cell(&[], 1), "—");
        assert_eq!(number::<u32>(Some("7".into()), "--reps", 1, 20), Ok(7));
        assert!(number::<u32>(Some("0".into()), "--reps", 1, 20).is_err());
        assert!(number::<u32>(Some("x".into()), "--reps", 1, 20).is_err());
        assert!(number::<u32>(None, "--reps", 1, 20).is_err());
        assert_eq!(jain_fairness(&[2.0, 2.0, 2.0]), 1.0);
        assert_eq!(jain_fairness(&[4.0, 0.0, 0.0, 0.0]), 0.25);
        assert!(jain_fairness(&[]).is_nan());
        assert!(proc_status_kb(std::process::id(), "VmRSS").is_some_and(|kb| kb > 0));
        assert!(proc_cpu_seconds(std::process::id()).is_some());
    }
}
