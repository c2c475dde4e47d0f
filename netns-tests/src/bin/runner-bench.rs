//! `runner-bench`: what handing a pipeline to a runner across the mesh
//! costs, measured in one run on real kernels against baselines from the
//! same run (the lab of `netns-tests/tests/runner.rs`; needs root, python3,
//! curl, seq and bash):
//!
//! - dispatch: `tern run` spawned on the CI node → its first `[step] ` line,
//!   against `curl` spawned there fetching a small file from a python3 web
//!   server on the runner → its first byte (a new process that connects over
//!   the same mesh, without the runner);
//! - log throughput: 106 MB of `seq` output streamed back as step output,
//!   against curl downloading the same bytes over the mesh;
//! - 50 jobs at once on a runner with `concurrency = 50`: wall time until
//!   all exited against one job alone, each job's dispatch latency, and the
//!   runner daemon's peak RSS.
//!
//! ```text
//! cargo build --release --workspace
//! sudo target/release/runner-bench [--reps N] [--write]
//! ```
//!
//! `--write` replaces the runner section of BENCHMARKS.md. Each repetition
//! builds its labs afresh.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tern_netns_tests::report::{cell, machine_line, median, number, percentile, write_section};
use tern_netns_tests::tern::{
    lighthouse_status, make_ca, node_config_text, sign, start_lighthouse, start_node, write_file,
    write_lighthouse_config, write_node_config, LH_UNDERLAY,
};
use tern_netns_tests::{require_root, require_tools, wait_until, workspace_bin, Lab, Ns, Proc};

const RUNNER_IP: &str = "100.64.0.20";
const HTTP_PORT: u16 = 8000;
/// Sequential dispatches of each kind per repetition.
const DISPATCHES: usize = 20;
/// `seq 1 13000000`: 105,888,897 bytes.
const SEQ_LINES: u64 = 13_000_000;
/// Jobs started at once on a runner with as many slots.
const JOBS: usize = 50;
const DISPATCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds one 106 MB transfer (debug builds are slow).
const STREAM_TIMEOUT: Duration = Duration::from_secs(600);
/// Bounds the single job and, separately, the whole burst of 50.
const BURST_TIMEOUT: Duration = Duration::from_secs(180);

struct Args {
    reps: usize,
    write: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        reps: 3,
        write: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => {
                args.reps = number(it.next(), "--reps", 1, 20)?;
            }
            "--write" => args.write = true,
            "-h" | "--help" => {
                return Err("usage: runner-bench [--reps N (1-20, default 3)] [--write]".into())
            }
            other => return Err(format!("unknown argument {other:?}; see --help")),
        }
    }
    Ok(args)
}

/// A lighthouse, a CI node (group ci) and a runner (group runner, at
/// [`RUNNER_IP`]) whose firewall lets in the runner port and the baseline's
/// web server port; all registered.
struct World {
    // Declared before the lab so they stop first.
    runner: Proc,
    _procs: Vec<Proc>,
    ci: Ns,
    runner_ns: Ns,
    dir: PathBuf,
    _lab: Lab,
}

fn world(prefix: &str, concurrency: u32) -> World {
    let lab = Lab::new(prefix);
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let ci = lab.add_ns("ci");
    let runner_ns = lab.add_ns("runner");
    lab.connect_to_wan(&lh, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&ci, "198.18.0.2/24");
    lab.connect_to_wan(&runner_ns, "198.18.0.4/24");
    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(&dir, "ca", "ci", "100.64.0.5/10", &["--groups", "ci"]);
    sign(
        &dir,
        "ca",
        "runner",
        &format!("{RUNNER_IP}/10"),
        &["--groups", "runner"],
    );
    let procs = vec![
        start_lighthouse(&lh, &write_lighthouse_config(&dir)),
        start_node(&ci, &write_node_config(&dir, "ci", "ca.crt"), "node-ci"),
    ];
    let config = format!(
        "{}[[firewall.inbound]]\nproto = \"tcp\"\nport = 4245\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = {HTTP_PORT}\n\
         [runner]\nlabels = [\"linux\"]\nallow_groups = [\"ci\"]\nconcurrency = {concurrency}\n\
         work_dir = \"jobs\"\naudit_log = \"audit.jsonl\"\n",
        node_config_text("runner", "ca.crt")
    );
    let runner = start_node(
        &runner_ns,
        &write_file(&dir, "runner.toml", &config),
        "node-runner",
    );
    runner.wait_for_log("runner up", Duration::from_secs(10));
    wait_until("both nodes register", Duration::from_secs(15), || {
        lighthouse_status(&dir)["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2)
    });
    let logs = dir.join("bench-logs");
    fs::create_dir_all(&logs).unwrap_or_else(|e| panic!("creating {}: {e}", logs.display()));
    write_file(
        &dir,
        "ready.toml",
        "name = \"ready\"\n[[steps]]\nname = \"step\"\nrun = \"echo ready\"\n",
    );
    write_file(
        &dir,
        "big.toml",
        &format!("name = \"big\"\n[[steps]]\nname = \"gen\"\nrun = \"seq 1 {SEQ_LINES}\"\n"),
    );
    write_file(
        &dir,
        "sleep.toml",
        "name = \"sleep\"\n[[steps]]\nname = \"step\"\nrun = \"sleep 1; echo done\"\n",
    );
    World {
        runner,
        _procs: procs,
        ci,
        runner_ns,
        dir,
        _lab: lab,
    }
}

impl World {
    /// `tern run PIPELINE --node RUNNER_IP` in the CI namespace, through
    /// its node.
    fn tern_run(&self, pipeline: &str) -> Command {
        let mut cmd = self.ci.command(workspace_bin("tern"));
        cmd.current_dir(&self.dir)
            .args(["run", pipeline, "--node", RUNNER_IP, "--socket", "ci.sock"])
            .env_remove("GITHUB_ACTIONS");
        cmd
    }

    /// Where a measured process's stderr goes (the last one of a name wins).
    fn stderr_path(&self, name: &str) -> PathBuf {
        self.dir.join("bench-logs").join(format!("{name}.err"))
    }

    /// Runs one `tern run` of a pipeline until it succeeds (the first job
    /// also waits for the WireGuard handshake), bounded by `within`.
    fn warm_up(&self, pipeline: &str, within: Duration) {
        let mut last = String::new();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match once(
                self.tern_run(pipeline),
                b"",
                self.stderr_path("warm-up"),
                DISPATCH_TIMEOUT,
            ) {
                Ok(t) if t.ok() => return,
                Ok(t) => last = t.why(),
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "timed out after {within:?}: a first `tern run {pipeline}` to succeed; last: {last}"
        );
    }
}

/// What one timed process did. Durations are from its spawn.
struct Timed {
    /// To the first stdout line that starts with the marker.
    first: Option<Duration>,
    /// To its exit, as seen by polling every millisecond.
    ended: Option<Duration>,
    /// Bytes of the marked lines, marker stripped, newline counted.
    bytes: u64,
    status: Option<ExitStatus>,
    stderr: PathBuf,
}

impl Timed {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success()) && self.first.is_some()
    }

    fn why(&self) -> String {
        let err = fs::read_to_string(&self.stderr).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        let status = self
            .status
            .map_or_else(|| "did not exit in time".to_string(), |s| s.to_string());
        format!(
            "{status}, first line {}; stderr: {}",
            if self.first.is_some() {
                "seen"
            } else {
                "not seen"
            },
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    }
}

enum Event {
    First(Instant),
    End(u64),
}

/// A child whose stdout a thread reads line by line as it comes, without
/// keeping it. Dropping it kills the child if it still runs.
struct Running {
    child: Child,
    start: Instant,
    events: mpsc::Receiver<Event>,
    stderr: PathBuf,
}

impl Running {
    fn start(mut cmd: Command, marker: &'static [u8], stderr: PathBuf) -> Result<Running, String> {
        let err =
            File::create(&stderr).map_err(|e| format!("creating {}: {e}", stderr.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err);
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_args().collect::<Vec<_>>()))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("no stdout pipe".into());
        };
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::with_capacity(256 * 1024, stdout);
            let mut line = Vec::with_capacity(256);
            let (mut bytes, mut seen) = (0u64, false);
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if let Some(rest) = line.strip_prefix(marker) {
                    if !seen {
                        seen = true;
                        let _ = tx.send(Event::First(Instant::now()));
                    }
                    bytes += rest.len() as u64;
                }
            }
            let _ = tx.send(Event::End(bytes));
        });
        Ok(Running {
            child,
            start,
            events,
            stderr,
        })
    }

    /// Waits for the end of its output and its exit, until `deadline`; kills
    /// it if it is still running then.
    fn finish(&mut self, deadline: Instant) -> Timed {
        let (mut first, mut bytes) = (None, None);
        while bytes.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::First(t)) => first = Some(t.duration_since(self.start)),
                Ok(Event::End(n)) => bytes = Some(n),
                Err(_) => break,
            }
        }
        let mut status = None;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    status = Some(s);
                    break;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(1)),
                _ => break,
            }
        }
        let ended = status.map(|_| self.start.elapsed());
        if status.is_none() {
            // Our own child, not yet reaped: its PID is still ours.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        Timed {
            first,
            ended,
            bytes: bytes.unwrap_or(0),
            status,
            stderr: self.stderr.clone(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn once(
    cmd: Command,
    marker: &'static [u8],
    stderr: PathBuf,
    timeout: Duration,
) -> Result<Timed, String> {
    let mut run = Running::start(cmd, marker, stderr)?;
    Ok(run.finish(Instant::now() + timeout))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn url(name: &str) -> String {
    format!("http://{RUNNER_IP}:{HTTP_PORT}/{name}")
}

#[derive(Default)]
struct Dispatch {
    tern_ms: Vec<f64>,
    curl_ms: Vec<f64>,
    tern_failed: usize,
    curl_failed: usize,
}

/// [`DISPATCHES`] of each, alternated so drift hits both alike.
fn dispatch(w: &World) -> Dispatch {
    let mut d = Dispatch::default();
    for _ in 0..DISPATCHES {
        match once(
            w.tern_run("ready.toml"),
            b"[step] ",
            w.stderr_path("dispatch-tern"),
            DISPATCH_TIMEOUT,
        ) {
            Ok(t) if t.ok() => d.tern_ms.extend(t.first.map(ms)),
            Ok(t) => {
                d.tern_failed += 1;
                eprintln!("runner-bench: dispatch: tern run failed: {}", t.why());
            }
            Err(e) => {
                d.tern_failed += 1;
                eprintln!("runner-bench: dispatch: {e}");
            }
        }
        let mut curl = w.ci.command("curl");
        curl.args(["-s", &url("small")]);
        match once(curl, b"", w.stderr_path("dispatch-curl"), DISPATCH_TIMEOUT) {
            Ok(t) if t.ok() => d.curl_ms.extend(t.first.map(ms)),
            Ok(t) => {
                d.curl_failed += 1;
                eprintln!("runner-bench: dispatch: curl failed: {}", t.why());
            }
            Err(e) => {
                d.curl_failed += 1;
                eprintln!("runner-bench: dispatch: {e}");
            }
        }
    }
    d
}

/// MB/s (10^6 bytes) of `tern run big.toml` (first output line to exit)
/// and of curl downloading the same bytes.
fn throughput(w: &World, expected: u64) -> (Option<f64>, Option<f64>) {
    let tern = match once(
        w.tern_run("big.toml"),
        b"[gen] ",
        w.stderr_path("throughput-tern"),
        STREAM_TIMEOUT,
    ) {
        Ok(t) if t.ok() && t.bytes == expected => match (t.first, t.ended) {
            (Some(first), Some(ended)) if ended > first => {
                Some(t.bytes as f64 / (ended - first).as_secs_f64() / 1e6)
            }
            _ => None,
        },
        Ok(t) => {
            eprintln!(
                "runner-bench: throughput: tern run got {} of {expected} bytes: {}",
                t.bytes,
                t.why()
            );
            None
        }
        Err(e) => {
            eprintln!("runner-bench: throughput: {e}");
            None
        }
    };
    // The same bytes from the same web server over the mesh, read by the
    // same line-by-line reader and timed the same way (first line → exit).
    let big = url("big");
    let mut cmd = w.ci.command("curl");
    cmd.args(["-s", big.as_str()]);
    let curl = match once(cmd, b"", w.stderr_path("throughput-curl"), STREAM_TIMEOUT) {
        Ok(t) if t.ok() && t.bytes == expected => match (t.first, t.ended) {
            (Some(first), Some(ended)) if ended > first => {
                Some(t.bytes as f64 / (ended - first).as_secs_f64() / 1e6)
            }
            _ => None,
        },
        Ok(t) => {
            eprintln!(
                "runner-bench: throughput: curl got {} of {expected} bytes: {}",
                t.bytes,
                t.why()
            );
            None
        }
        Err(e) => {
            eprintln!("runner-bench: throughput: curl: {e}");
            None
        }
    };
    (tern, curl)
}

struct Burst {
    /// One job alone: spawn → exit (s) and spawn → first line (ms).
    wall1: f64,
    first1: f64,
    /// First spawn of the 50 → last exit (s).
    wall: f64,
    /// Spawn → first line of each job that printed one (ms).
    firsts: Vec<f64>,
    failed: usize,
    rss1: Option<f64>,
    rss: Option<f64>,
}

/// One job alone, then [`JOBS`] at once, on a runner with that many slots.
fn burst(w: &World) -> Option<Burst> {
    let single = match once(
        w.tern_run("sleep.toml"),
        b"",
        w.stderr_path("single"),
        BURST_TIMEOUT,
    ) {
        Ok(t) if t.ok() => t,
        Ok(t) => {
            eprintln!("runner-bench: the single job failed: {}", t.why());
            return None;
        }
        Err(e) => {
            eprintln!("runner-bench: the single job: {e}");
            return None;
        }
    };
    let rss1 = peak_rss_mib(w.runner.pid());
    let start = Instant::now();
    let deadline = start + BURST_TIMEOUT;
    let mut failed = 0;
    let mut runs = Vec::with_capacity(JOBS);
    for i in 0..JOBS {
        match Running::start(
            w.tern_run("sleep.toml"),
            b"",
            w.stderr_path(&format!("burst-{i}")),
        ) {
            Ok(r) => runs.push(r),
            Err(e) => {
                failed += 1;
                eprintln!("runner-bench: burst job {i}: {e}");
            }
        }
    }
    let results: Vec<Timed> = runs.iter_mut().map(|r| r.finish(deadline)).collect();
    let wall = start.elapsed().as_secs_f64();
    for (i, t) in results.iter().enumerate() {
        if !t.ok() {
            failed += 1;
            eprintln!("runner-bench: burst job {i} failed: {}", t.why());
        }
    }
    Some(Burst {
        wall1: single.ended.map_or(f64::NAN, |d| d.as_secs_f64()),
        first1: single.first.map_or(f64::NAN, ms),
        wall,
        firsts: results.iter().filter_map(|t| t.first.map(ms)).collect(),
        failed,
        rss1,
        rss: peak_rss_mib(w.runner.pid()),
    })
}

/// VmHWM of `pid` in MiB, if it is the `tern` daemon (`ip netns exec`
/// execs it, so the spawned PID is the daemon's).
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    if field("Name:") != Some("tern") {
        eprintln!("runner-bench: process {pid} is not the tern daemon; no RSS figure");
        return None;
    }
    let kb: f64 = field("VmHWM:")?
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn p50(v: &[f64]) -> f64 {
    median(&mut v.to_vec())
}

/// Per-repetition figures; ratios are tern run / baseline of the same rep.
#[derive(Default)]
struct Figures {
    d_tern_p50: Vec<f64>,
    d_curl_p50: Vec<f64>,
    d_ratio_p50: Vec<f64>,
    d_tern_p95: Vec<f64>,
    d_curl_p95: Vec<f64>,
    d_ratio_p95: Vec<f64>,
    d_tern_failed: Vec<f64>,
    d_curl_failed: Vec<f64>,
    tp_tern: Vec<f64>,
    tp_curl: Vec<f64>,
    tp_ratio: Vec<f64>,
    b_wall: Vec<f64>,
    b_wall1: Vec<f64>,
    b_wall_ratio: Vec<f64>,
    b_first_p50: Vec<f64>,
    b_first_p95: Vec<f64>,
    b_first1: Vec<f64>,
    b_first_ratio_p50: Vec<f64>,
    b_first_ratio_p95: Vec<f64>,
    b_failed: Vec<f64>,
    rss: Vec<f64>,
    rss1: Vec<f64>,
    rss_ratio: Vec<f64>,
}

/// `a / b` of one repetition, when both exist.
fn push_ratio(into: &mut Vec<f64>, a: f64, b: f64) {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        into.push(a / b);
    }
}

/// Dispatch and log throughput, on a runner with the tests' 2 slots.
fn measure_stream(f: &mut Figures) {
    let w = world("rbench", 2);
    let www = w.dir.join("www");
    fs::create_dir_all(&www).unwrap_or_else(|e| panic!("creating {}: {e}", www.display()));
    write_file(&www, "small", "ready\n");
    let big = www.join("big");
    let made = w.runner_ns.exec_timeout(
        "bash",
        ["-c", &format!("seq 1 {SEQ_LINES} > '{}'", big.display())],
        Duration::from_secs(60),
    );
    assert!(
        made.is_some_and(|o| o.status.success()),
        "seq could not write {}",
        big.display()
    );
    let expected = fs::metadata(&big).map(|m| m.len()).unwrap_or(0);
    let www_arg = www.to_string_lossy().into_owned();
    let port = HTTP_PORT.to_string();
    let _http = w.runner_ns.spawn(
        "python3",
        [
            "-m",
            "http.server",
            port.as_str(),
            "--bind",
            RUNNER_IP,
            "--directory",
            www_arg.as_str(),
        ],
        "http-server",
    );
    let small = url("small");
    wait_until(
        "the runner's web server answers over the mesh",
        Duration::from_secs(30),
        || {
            w.ci.exec_timeout(
                "curl",
                ["-sf", "-o", "/dev/null", "-m", "2", small.as_str()],
                Duration::from_secs(5),
            )
            .is_some_and(|o| o.status.success())
        },
    );
    w.warm_up("ready.toml", Duration::from_secs(60));

    let d = dispatch(&w);
    let (tern_p50, curl_p50) = (p50(&d.tern_ms), p50(&d.curl_ms));
    let (tern_p95, curl_p95) = (percentile(&d.tern_ms, 0.95), percentile(&d.curl_ms, 0.95));
    f.d_tern_p50.push(tern_p50);
    f.d_curl_p50.push(curl_p50);
    push_ratio(&mut f.d_ratio_p50, tern_p50, curl_p50);
    f.d_tern_p95.push(tern_p95);
    f.d_curl_p95.push(curl_p95);
    push_ratio(&mut f.d_ratio_p95, tern_p95, curl_p95);
    f.d_tern_failed.push(d.tern_failed as f64);
    f.d_curl_failed.push(d.curl_failed as f64);

    let (tern, curl) = throughput(&w, expected);
    f.tp_tern.extend(tern);
    f.tp_curl.extend(curl);
    if let (Some(t), Some(c)) = (tern, curl) {
        push_ratio(&mut f.tp_ratio, t, c);
    }
}

/// One job alone and 50 at once, on a fresh runner with 50 slots.
fn measure_burst(f: &mut Figures) {
    let w = world("rbjobs", JOBS as u32);
    w.warm_up("ready.toml", Duration::from_secs(60));
    let Some(b) = burst(&w) else {
        return;
    };
    let (first_p50, first_p95) = (p50(&b.firsts), percentile(&b.firsts, 0.95));
    f.b_wall.push(b.wall);
    f.b_wall1.push(b.wall1);
    push_ratio(&mut f.b_wall_ratio, b.wall, b.wall1);
    f.b_first_p50.push(first_p50);
    f.b_first_p95.push(first_p95);
    f.b_first1.push(b.first1);
    push_ratio(&mut f.b_first_ratio_p50, first_p50, b.first1);
    push_ratio(&mut f.b_first_ratio_p95, first_p95, b.first1);
    f.b_failed.push(b.failed as f64);
    if let (Some(r), Some(r1)) = (b.rss, b.rss1) {
        f.rss.push(r);
        f.rss1.push(r1);
        push_ratio(&mut f.rss_ratio, r, r1);
    }
}

fn last(v: &[f64]) -> String {
    v.last().map_or_else(|| "—".into(), |x| format!("{x:.1}"))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("runner-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !require_root("runner-bench")
        || !require_tools("runner-bench", &["python3", "curl", "seq", "bash"])
    {
        return ExitCode::from(2);
    }
    let mut f = Figures::default();
    for rep in 1..=args.reps {
        measure_stream(&mut f);
        measure_burst(&mut f);
        eprintln!(
            "runner-bench: rep {rep}/{}: dispatch p50 {} ms vs curl {} ms; {} vs {} MB/s; \
             50 jobs in {} s vs one in {} s",
            args.reps,
            last(&f.d_tern_p50),
            last(&f.d_curl_p50),
            last(&f.tp_tern),
            last(&f.tp_curl),
            last(&f.b_wall),
            last(&f.b_wall1),
        );
    }
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let build = if cfg!(debug_assertions) {
        " **Debug build**: not comparable with release figures."
    } else {
        ""
    };
    let big_mb = {
        // seq's output size without running it: digits of 1..=n plus newlines.
        let (mut bytes, mut lo, mut digits) = (0u64, 1u64, 1u64);
        while lo <= SEQ_LINES {
            let hi = (lo * 10 - 1).min(SEQ_LINES);
            bytes += (hi - lo + 1) * (digits + 1);
            lo *= 10;
            digits += 1;
        }
        bytes as f64 / 1e6
    };
    let prefixed_mb = big_mb + (SEQ_LINES * "[gen] ".len() as u64) as f64 / 1e6;
    let table = format!(
        "## Runner: dispatch, log throughput, 50 jobs at once\n\n\
         {}\n\
         Command: `runner-bench --reps {}` (the lab of `netns-tests/tests/runner.rs`: a \
         lighthouse, a CI node and a runner, built afresh for every repetition).{build}\n\n\
         | metric | tern run | baseline | ratio |\n|---|---|---|---|\n\
         | dispatch: spawn → first output line, p50 of {DISPATCHES} (ms) | {} | {} | {} |\n\
         | dispatch: spawn → first output line, p95 of {DISPATCHES} (ms) | {} | {} | {} |\n\
         | dispatch: failed runs (of {DISPATCHES}) | {} | {} | — |\n\
         | log throughput, {big_mb:.1} MB of step output (MB/s) | {} | {} | {} |\n\
         | {JOBS} jobs at once: first spawn → all exited (s) | {} | {} | {} |\n\
         | {JOBS} jobs at once: per-job spawn → `job … started`, p50 (ms) | {} | {} | {} |\n\
         | {JOBS} jobs at once: per-job spawn → `job … started`, p95 (ms) | {} | {} | {} |\n\
         | {JOBS} jobs at once: jobs failed (of {JOBS}) | {} | — | — |\n\
         | runner daemon peak RSS, VmHWM (MiB) | {} | {} | {} |\n\n\
         Cells are median (min–max) across repetitions; ratios are tern run / baseline within \
         each repetition. **Dispatch**: `tern run` of one step `echo ready` on the CI node \
         (which reaches the runner through that node: its API socket, a connection bound to \
         its TUN device, the job protocol's greetings), timed from spawning the process to its first `[step] ` line; the baseline is `curl -s` \
         spawned on the CI node fetching a 6-byte file from a python3 `http.server` in the \
         runner's namespace bound to its overlay address, timed to its first output — the same \
         new process → connection over the mesh → first byte, without the runner. Both run \
         alternately, one at a time, after a warm-up of each (the WireGuard session exists). \
         **Log throughput**: one step `seq 1 {SEQ_LINES}`; bytes received on the CI side after \
         stripping the `[gen] ` prefixes, over the time from the first output line to the \
         process's exit; the baseline is `curl` printing the same bytes from the same web \
         server over the mesh, read by the same line-by-line reader and timed the same way. \
         `tern run` writes {prefixed_mb:.0} MB to its reader for the {big_mb:.0} MB counted \
         (the step prefix on each of the {SEQ_LINES} lines), curl {big_mb:.0} MB. \
         **{JOBS} jobs**: a second lab \
         whose runner has `concurrency = {JOBS}`; {JOBS} `tern run`s of one step \
         `sleep 1; echo done` spawned at once; the baseline is one such job alone on the same \
         runner just before (spawn → exit; ideal ratio 1.0), and its spawn → first line \
         (`job … started on runner`) for the per-job latencies. Peak RSS is the runner daemon's \
         VmHWM after the single job (baseline) and after the {JOBS}. On this {nproc}-core \
         machine the daemons, the callers and the steps share the cores.\n",
        machine_line(),
        args.reps,
        cell(&f.d_tern_p50, 1),
        cell(&f.d_curl_p50, 1),
        cell(&f.d_ratio_p50, 2),
        cell(&f.d_tern_p95, 1),
        cell(&f.d_curl_p95, 1),
        cell(&f.d_ratio_p95, 2),
        cell(&f.d_tern_failed, 0),
        cell(&f.d_curl_failed, 0),
        cell(&f.tp_tern, 0),
        cell(&f.tp_curl, 0),
        cell(&f.tp_ratio, 2),
        cell(&f.b_wall, 2),
        cell(&f.b_wall1, 2),
        cell(&f.b_wall_ratio, 2),
        cell(&f.b_first_p50, 1),
        cell(&f.b_first1, 1),
        cell(&f.b_first_ratio_p50, 2),
        cell(&f.b_first_p95, 1),
        cell(&f.b_first1, 1),
        cell(&f.b_first_ratio_p95, 2),
        cell(&f.b_failed, 0),
        cell(&f.rss, 1),
        cell(&f.rss1, 1),
        cell(&f.rss_ratio, 2),
    );
    println!("{table}");
    if args.write {
        match write_section("runner", &table) {
            Ok(path) => eprintln!("runner-bench: wrote the section into {}", path.display()),
            Err(e) => {
                eprintln!("runner-bench: writing BENCHMARKS.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
