//! The soak run: a mesh under steady work while its parts fail and recover,
//! on real kernels. Used by `tests/soak.rs` (one cycle in CI) and the
//! `soak-bench` binary (ten cycles, figures for RELIABILITY.md).
//!
//! The mesh: two lighthouses, two TUN-mode gateways in front of a private
//! network (python's http.server holding a 4 MiB file of random bytes), a
//! runner, and a CI node behind a port-preserving NAT. All nodes know both
//! lighthouses.
//!
//! The work, for the whole run:
//! - the CI node downloads the file through a gateway with curl, again and
//!   again, each copy checked against the file's SHA-256;
//! - the CI node hands the runner one job after another with `tern run`;
//!   each prints 400 numbered lines over about ten seconds, and every line
//!   must arrive, in order.
//!
//! The faults, every 60 s cycle (offsets in seconds):
//! - 4: a lighthouse is killed (SIGKILL), and started again 3 s later
//!   (lh1 in even cycles, lh2 in odd ones);
//! - 12 to 22 and 50 to 56: 5 % of the packets through the CI node's NAT
//!   are dropped, both ways;
//! - 26: the NAT rebinds: its public address changes, and with it every
//!   mapping (MASQUERADE forgets its connections when its address goes);
//! - 34: the gateway in use is killed (SIGKILL), and started again at 46.
//!   The CI node finds it silent and moves to the other one. A download in
//!   flight through the killed gateway is cut (the private server's TCP
//!   peer was that gateway's masquerade) and is tried again; only that may
//!   fail.
//! - 44: a lighthouse is killed again (the other one), back at 47.
//!
//! What is counted: downloads intact, corrupt (must be 0) and cut (with
//! when); jobs run and lines lost (must be 0); the daemons' resident memory
//! at the start and the end.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::nat::{forward_loss, site, Nat, Site};
use crate::report::proc_status_kb;
use crate::tern::*;
use crate::{wait_until, workspace_bin, Lab, Ns, Proc};

/// Length of one cycle of faults.
pub const CYCLE: Duration = Duration::from_secs(60);
/// The private server the CI node downloads from, through a gateway.
pub const SERVER: &str = "198.19.0.10";
const BLOB_BYTES: usize = 4 << 20;
const LH2_UNDERLAY: &str = "198.18.0.6";
const RUNNER_IP: &str = "100.64.0.20";
const RUNNER_UNDERLAY: &str = "198.18.0.7";
/// The NAT's public addresses: it moves between these to rebind.
const NAT_PUBLIC: [&str; 2] = ["198.18.0.30", "198.18.0.31"];
/// Lines each job prints, one every 25 ms.
pub const JOB_LINES: u64 = 400;
/// How long after a gateway is killed a cut download is the failover's.
pub const FAILOVER_WINDOW: Duration = Duration::from_secs(15);

/// A download that did not complete: when it started and ended (seconds
/// from the start of the run) and what curl said.
#[derive(Debug, Clone)]
pub struct CutDownload {
    pub started: f64,
    pub ended: f64,
    pub why: String,
}

/// A job whose lines did not all arrive, or that did not end with 0.
#[derive(Debug, Clone)]
pub struct BadJob {
    pub started: f64,
    pub exit: Option<i32>,
    pub lines: u64,
    pub in_order: bool,
}

/// What a soak run tried and what it lost.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub seconds: f64,
    pub cycles: u32,
    pub downloads_intact: u64,
    pub downloads_corrupt: u64,
    pub downloads_cut: Vec<CutDownload>,
    pub bytes_intact: u64,
    pub jobs: u64,
    pub job_lines: u64,
    pub bad_jobs: Vec<BadJob>,
    /// (event, seconds from the start).
    pub events: Vec<(String, f64)>,
    /// (daemon, VmRSS kB after warm-up, VmRSS kB at the end).
    pub rss_kb: Vec<(String, u64, u64)>,
    /// Failovers the CI node counted.
    pub gateway_failovers: u64,
}

impl SoakReport {
    /// Lines lost over all jobs (expected minus received in order).
    pub fn lines_lost(&self) -> u64 {
        self.jobs * JOB_LINES - self.job_lines
    }

    /// Cut downloads that started more than [`FAILOVER_WINDOW`] after
    /// every gateway kill, or ended before one: these no fault excuses.
    pub fn cuts_outside_failover(&self) -> Vec<CutDownload> {
        let kills: Vec<f64> = self
            .events
            .iter()
            .filter(|(e, _)| e.starts_with("gateway killed"))
            .map(|(_, t)| *t)
            .collect();
        self.downloads_cut
            .iter()
            .filter(|c| {
                !kills
                    .iter()
                    .any(|&k| c.started <= k + FAILOVER_WINDOW.as_secs_f64() && c.ended + 1.0 >= k)
            })
            .cloned()
            .collect()
    }

    /// A markdown summary table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        t.push_str("| Work | Tried | Survived | Lost |\n| --- | ---: | ---: | --- |\n");
        t.push_str(&format!(
            "| 4 MiB downloads through a gateway, SHA-256 checked | {} | {} intact ({:.1} GB) | {} corrupt; {} cut by a gateway's crash and tried again |\n",
            self.downloads_intact + self.downloads_corrupt + self.downloads_cut.len() as u64,
            self.downloads_intact,
            self.bytes_intact as f64 / 1e9,
            self.downloads_corrupt,
            self.downloads_cut.len(),
        ));
        t.push_str(&format!(
            "| Runner jobs of {JOB_LINES} lines, streamed live | {} jobs, {} lines | {} lines in order | {} lines; {} jobs not ending 0 |\n",
            self.jobs,
            self.jobs * JOB_LINES,
            self.job_lines,
            self.lines_lost(),
            self.bad_jobs.iter().filter(|j| j.exit != Some(0)).count(),
        ));
        t.push_str("\n| Daemon | RSS after warm-up | RSS at the end | Growth |\n| --- | ---: | ---: | ---: |\n");
        for (name, start, end) in &self.rss_kb {
            t.push_str(&format!(
                "| {name} | {:.1} MiB | {:.1} MiB | {:+.1} MiB |\n",
                *start as f64 / 1024.0,
                *end as f64 / 1024.0,
                (*end as f64 - *start as f64) / 1024.0
            ));
        }
        t
    }
}

/// The daemons and places of the soak mesh.
struct Mesh {
    lab: Lab,
    dir: PathBuf,
    lh: [Ns; 2],
    lh_config: [PathBuf; 2],
    gw: [Ns; 2],
    ci: Site,
    runner: Ns,
    blob_sha: String,
    _http: Proc,
}

/// The common part of every node's config, listing both lighthouses; logs
/// at info (ten minutes of debug logs are large).
fn soak_node_text(name: &str) -> String {
    node_config_text(name, "ca.crt").replace("level = \"debug\"", "level = \"info\"")
        + &format!("[[lighthouses]]\nendpoint = \"{LH2_UNDERLAY}:4242\"\n")
}

fn build_mesh(prefix: &str) -> Mesh {
    let lab = Lab::new(prefix);
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = [lab.add_ns("lh1"), lab.add_ns("lh2")];
    let gw = [lab.add_ns("gw1"), lab.add_ns("gw2")];
    let runner = lab.add_ns("runner");
    let vpc = lab.add_ns("vpc");
    lab.connect_to_wan(&lh[0], &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&lh[1], &format!("{LH2_UNDERLAY}/24"));
    lab.connect_to_wan(&gw[0], "198.18.0.4/24");
    lab.connect_to_wan(&gw[1], "198.18.0.5/24");
    lab.connect_to_wan(&runner, &format!("{RUNNER_UNDERLAY}/24"));
    let ci = site(&lab, "ci", Nat::PortPreserving, NAT_PUBLIC[0], 30);
    lab.bridge(&vpc, "br1", &format!("{SERVER}/24"));
    lab.connect_to_bridge(&gw[0], "198.19.0.2/24", &vpc, "br1");
    lab.connect_to_bridge(&gw[1], "198.19.0.3/24", &vpc, "br1");

    let mut blob = vec![0u8; BLOB_BYTES];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut blob))
        .unwrap_or_else(|e| panic!("reading /dev/urandom: {e}"));
    let blob_sha = format!("{:x}", Sha256::digest(&blob));
    let http = web_server(&vpc, &dir, SERVER, &[("blob.bin", &blob)]);

    make_ca(&dir, "ca");
    for (name, ip) in [("lh1", "100.64.0.1/10"), ("lh2", "100.64.0.2/10")] {
        sign(&dir, "ca", name, ip, &["--groups", "lighthouse"]);
    }
    for (name, ip) in [("gw-1", "100.64.0.30/10"), ("gw-2", "100.64.0.31/10")] {
        sign(&dir, "ca", name, ip, &["--subnets", "198.19.0.0/24"]);
    }
    sign(&dir, "ca", "ci", "100.64.0.5/10", &["--groups", "ci"]);
    sign(
        &dir,
        "ca",
        "runner",
        &format!("{RUNNER_IP}/10"),
        &["--groups", "runner"],
    );
    let base = fs::read_to_string(write_lighthouse_config(&dir)).unwrap_or_default();
    let lh_config = ["lh1", "lh2"].map(|name| {
        let text = base
            .replace("lh1", name)
            .replace("level = \"debug\"", "level = \"info\"");
        write_file(&dir, &format!("{name}.toml"), &text)
    });
    for name in ["gw-1", "gw-2"] {
        write_file(
            &dir,
            &format!("{name}.toml"),
            &gateway_8080_config(&soak_node_text(name)),
        );
    }
    write_file(
        &dir,
        "ci.toml",
        &format!(
            "{}[[routes]]\nsubnet = \"198.19.0.0/24\"\n",
            soak_node_text("ci")
        ),
    );
    write_file(
        &dir,
        "runner.toml",
        &format!(
            "{}[[firewall.inbound]]\nproto = \"tcp\"\nport = 4245\ngroups = [\"ci\"]\n\
             [runner]\nlabels = [\"linux\"]\nallow_groups = [\"ci\"]\nconcurrency = 2\nwork_dir = \"jobs\"\n",
            soak_node_text("runner")
        ),
    );
    write_file(
        &dir,
        "stream.toml",
        &format!(
            "name = \"stream\"\n[[steps]]\nname = \"lines\"\n\
             run = \"for i in $(seq 1 {JOB_LINES}); do echo \\\"soak line $i\\\"; sleep 0.025; done\"\n"
        ),
    );
    Mesh {
        lab,
        dir,
        lh,
        lh_config,
        gw,
        ci,
        runner,
        blob_sha,
        _http: http,
    }
}

fn vm_rss_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmRSS").unwrap_or(0)
}

/// The events of the run, in order, stamped with seconds from its start.
struct Events {
    start: Instant,
    list: Mutex<Vec<(String, f64)>>,
}

impl Events {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn record(&self, what: String) {
        let t = self.now();
        eprintln!("soak {t:7.1} s: {what}");
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((what, t));
    }
}

/// Downloads the file again and again until `stop`.
fn downloads(m: &Mesh, ev: &Events, stop: &AtomicBool, report: &Mutex<SoakReport>) {
    let out = m.dir.join("download.bin");
    let url = format!("http://{SERVER}:8080/blob.bin");
    let out_arg = out.to_string_lossy().into_owned();
    while !stop.load(Ordering::Relaxed) {
        let _ = fs::remove_file(&out);
        let started = ev.now();
        let result = m.ci.node.exec_timeout(
            "curl",
            [
                "-sS",
                "--fail",
                "--limit-rate",
                "4M",
                "--connect-timeout",
                "5",
                "--max-time",
                "30",
                "-o",
                &out_arg,
                &url,
            ],
            Duration::from_secs(40),
        );
        let mut r = report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Some(o) if o.status.success() => {
                if sha256_file(&out) == m.blob_sha {
                    r.downloads_intact += 1;
                    r.bytes_intact += BLOB_BYTES as u64;
                } else {
                    r.downloads_corrupt += 1;
                    ev.record(format!("CORRUPT download started at {started:.1} s"));
                }
            }
            other => {
                let why = other.map_or("no answer within 40 s".to_string(), |o| {
                    String::from_utf8_lossy(&o.stderr).trim().to_string()
                });
                // What the CI node's firewall refused so far, and the
                // gateway it used: where a cut came from.
                let ci = status(&m.dir, "ci");
                ev.record(format!(
                    "download started at {started:.1} s cut ({why}); CI node's firewall denials {}, route {}",
                    ci["firewall"]["denied"], ci["routes"][0]["active"]
                ));
                r.downloads_cut.push(CutDownload {
                    started,
                    ended: ev.now(),
                    why,
                });
                drop(r);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Runs jobs on the runner one after another until `stop`; every line of
/// each must arrive, in order.
fn jobs(m: &Mesh, ev: &Events, stop: &AtomicBool, report: &Mutex<SoakReport>) {
    let tern = workspace_bin("tern").to_string_lossy().into_owned();
    while !stop.load(Ordering::Relaxed) {
        let started = ev.now();
        let socket = m.dir.join("ci.sock").to_string_lossy().into_owned();
        let mut cmd = m.ci.node.command(&tern);
        cmd.current_dir(&m.dir)
            .args([
                "run",
                "stream.toml",
                "--node",
                RUNNER_IP,
                "--socket",
                &socket,
            ])
            .env_remove("GITHUB_ACTIONS");
        let out = cmd.output();
        let (exit, stdout) = match out {
            Ok(o) => (
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
            ),
            Err(e) => (None, format!("cannot start tern run: {e}")),
        };
        let mut next = 1;
        let mut in_order = true;
        for line in stdout.lines() {
            if let Some(n) = line
                .strip_prefix("[lines] soak line ")
                .and_then(|n| n.trim().parse::<u64>().ok())
            {
                if n == next {
                    next += 1;
                } else {
                    in_order = false;
                }
            }
        }
        let lines = next - 1;
        let mut r = report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.jobs += 1;
        r.job_lines += lines;
        if exit != Some(0) || lines != JOB_LINES || !in_order {
            ev.record(format!(
                "job started at {started:.1} s: exit {exit:?}, {lines} lines, in order {in_order}"
            ));
            r.bad_jobs.push(BadJob {
                started,
                exit,
                lines,
                in_order,
            });
        }
    }
}

/// The NAT moves to its other public address: every mapping is forgotten.
fn rebind(m: &Mesh, to: usize) {
    let (nat, wan_if) = match (&m.ci.nat, &m.ci.nat_wan_if) {
        (Some(nat), Some(wan_if)) => (nat, wan_if),
        _ => panic!("the CI node has no NAT"),
    };
    let (old, new) = (NAT_PUBLIC[1 - to], NAT_PUBLIC[to]);
    nat.ip(["addr", "del", &format!("{old}/24"), "dev", wan_if]);
    nat.ip(["addr", "add", &format!("{new}/24"), "dev", wan_if]);
}

fn loss(m: &Mesh, on: bool) {
    let Some(nat) = &m.ci.nat else {
        panic!("the CI node has no NAT");
    };
    forward_loss(nat, on);
}

/// Sleeps until `at` from the start of the run.
fn until(ev: &Events, at: Duration) {
    let at = ev.start + at;
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

fn active_gateway(dir: &Path) -> Option<String> {
    status(dir, "ci")["routes"][0]["active"]
        .as_str()
        .map(str::to_string)
}

/// Runs `cycles` cycles of faults over the mesh at work; see the module's
/// documentation. `prefix` names the lab.
pub fn run(prefix: &str, cycles: u32) -> SoakReport {
    let m = build_mesh(prefix);
    let start_lh = |i: usize| start_lighthouse(&m.lh[i], &m.lh_config[i]);
    let start_gw = |i: usize| {
        let name = format!("gw-{}", i + 1);
        start_node(
            &m.gw[i],
            &m.dir.join(format!("{name}.toml")),
            &format!("node-{name}"),
        )
    };
    let mut lighthouses = [Some(start_lh(0)), Some(start_lh(1))];
    let mut gateways = [Some(start_gw(0)), Some(start_gw(1))];
    let runner = start_node(&m.runner, &m.dir.join("runner.toml"), "node-runner");
    let ci = start_node(&m.ci.node, &m.dir.join("ci.toml"), "node-ci");
    runner.wait_for_log("runner up", Duration::from_secs(20));
    wait_until(
        "the CI node knows both gateways",
        Duration::from_secs(30),
        || {
            status(&m.dir, "ci")["routes"][0]["gateways"]
                .as_array()
                .is_some_and(|g| g.len() == 2)
        },
    );

    let ev = Events {
        start: Instant::now(),
        list: Mutex::new(Vec::new()),
    };
    let report = Mutex::new(SoakReport {
        cycles,
        ..SoakReport::default()
    });
    let stop = AtomicBool::new(false);
    let mut rss_start: Vec<(String, u32, u64)> = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| downloads(&m, &ev, &stop, &report));
        s.spawn(|| jobs(&m, &ev, &stop, &report));
        std::thread::sleep(Duration::from_secs(3));
        for p in [&ci, &runner] {
            rss_start.push((p.name().to_string(), p.pid(), vm_rss_kb(p.pid())));
        }
        for cycle in 0..cycles {
            let base = CYCLE * cycle;
            let lh_first = (cycle % 2) as usize;
            until(&ev, base + Duration::from_secs(4));
            if let Some(p) = lighthouses[lh_first].take() {
                p.kill_hard();
            }
            ev.record(format!("lighthouse lh{} killed", lh_first + 1));
            until(&ev, base + Duration::from_secs(7));
            lighthouses[lh_first] = Some(start_lh(lh_first));
            ev.record(format!("lighthouse lh{} started again", lh_first + 1));
            until(&ev, base + Duration::from_secs(12));
            loss(&m, true);
            ev.record("5 % loss at the CI node's NAT".into());
            until(&ev, base + Duration::from_secs(22));
            loss(&m, false);
            ev.record("loss ends".into());
            until(&ev, base + Duration::from_secs(26));
            let to = ((cycle + 1) % 2) as usize;
            rebind(&m, to);
            ev.record(format!("NAT rebinds to {}", NAT_PUBLIC[to]));
            until(&ev, base + Duration::from_secs(34));
            let active = active_gateway(&m.dir);
            let victim = usize::from(active.as_deref() == Some("gw-2"));
            if let Some(p) = gateways[victim].take() {
                p.kill_hard();
            }
            ev.record(format!(
                "gateway killed: gw-{} (was active: {active:?})",
                victim + 1
            ));
            until(&ev, base + Duration::from_secs(44));
            let lh_second = 1 - lh_first;
            if let Some(p) = lighthouses[lh_second].take() {
                p.kill_hard();
            }
            ev.record(format!("lighthouse lh{} killed", lh_second + 1));
            until(&ev, base + Duration::from_secs(46));
            gateways[victim] = Some(start_gw(victim));
            ev.record(format!("gateway gw-{} started again", victim + 1));
            until(&ev, base + Duration::from_secs(47));
            lighthouses[lh_second] = Some(start_lh(lh_second));
            ev.record(format!("lighthouse lh{} started again", lh_second + 1));
            until(&ev, base + Duration::from_secs(50));
            loss(&m, true);
            ev.record("5 % loss at the CI node's NAT".into());
            until(&ev, base + Duration::from_secs(56));
            loss(&m, false);
            ev.record("loss ends".into());
            until(&ev, base + CYCLE);
        }
        stop.store(true, Ordering::Relaxed);
        ev.record("work stops; the last download and job finish".into());
    });
    for name in ["ci", "runner", "gw-1", "gw-2"] {
        let s = status(&m.dir, name);
        ev.record(format!(
            "{name}: firewall denials {}, mesh counters {}",
            s["firewall"]["denied"], s["mesh_counters"]
        ));
    }
    let mut r = report
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    r.seconds = ev.now();
    r.events = ev
        .list
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    r.rss_kb = rss_start
        .into_iter()
        .map(|(name, pid, kb)| (name, kb, vm_rss_kb(pid)))
        .collect();
    r.gateway_failovers = status(&m.dir, "ci")["node_counters"]["gateway_failovers"]
        .as_u64()
        .unwrap_or(0);
    drop((lighthouses, gateways, runner, ci));
    drop(m.lab);
    r
}
