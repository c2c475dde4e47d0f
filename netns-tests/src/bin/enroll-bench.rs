//! `enroll-bench`: how many certificates one lighthouse hands out per
//! second, measured on loopback against the cheapest request the same
//! socket answers (no root, no namespaces; needs the release `tern` and
//! `tern-lighthouse`, and `openssl` for the RS256 provider):
//!
//! - `hello`: 0x13 → 0x14, the lighthouse's certificate (the baseline: no
//!   cryptography, no store);
//! - `token`: a sealed 0x15 request with a multi-use token → 0x16 with a
//!   certificate;
//! - `oidc-es256`, `oidc-rs256`: the same with a pre-signed OIDC ID token
//!   (ES256, RS256) from a throwaway provider whose JWKS is a file.
//!
//! The client speaks the enrollment protocol in-process (as `tern up
//! --enroll-*` does, see `node/src/io/enroll.rs`): C workers, each with its
//! own UDP socket and one request outstanding, a 2 s timeout and up to 3
//! resends of the same datagram.
//!
//! ```text
//! cargo build --release -p tern-node -p tern-lighthouse -p tern-netns-tests
//! target/release/enroll-bench [--reps R] [--count N] [--concurrency C] [--quick] [--write]
//! ```
//!
//! `--write` replaces the enroll section of BENCHMARKS.md. Exit codes: 0
//! done, 1 a step failed (or requests failed: the table is printed, not
//! written), 2 a prerequisite is missing or an argument is wrong.

use std::fs;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tern_lighthouse_core::oidc::test_issuer::{github_like_claims, TestOidcIssuer};
use tern_netns_tests::report::{
    cell, command_output, machine_line, median, number, percentile, write_section,
};
use tern_netns_tests::tern::{ca_args, issuer_args, sign_args};
use tern_netns_tests::workspace_bin;
use tern_shared::cert::{CaPool, Cert, LIGHTHOUSE_GROUP};
use tern_shared::enroll::{
    enroll_hello, EnrollRequest, Sealer, ENROLL_REQUEST_MIN, MAX_ENROLL_LEN, MAX_ENROLL_REPLY_LEN,
    TYPE_ENROLL_CERT, TYPE_ENROLL_REPLY,
};
use tern_shared::keys::NodeSecretKey;

const OIDC_ISSUER: &str = "https://bench.example.test";
const AUDIENCE: &str = "tern";
/// One try of a request: this long for its answer, then the same datagram
/// again, at most [`RESENDS`] times.
const TRY_TIMEOUT: Duration = Duration::from_secs(2);
const RESENDS: usize = 3;
/// Bounds one batch: requests not started by then count as failed.
const BATCH_DEADLINE: Duration = Duration::from_secs(120);
/// Bounds a lighthouse's start (until it answers a hello).
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a lighthouse gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Most requests per kind per repetition (each batch runs on a freshly
/// started lighthouse, so every kind starts without cached answers).
const MAX_COUNT: usize = 4000;
/// The private network behind the gateway for the join figures.
const PRIVATE_NET: &str = "127.81.0";

struct Args {
    reps: usize,
    count: usize,
    concurrency: usize,
    quick: bool,
    write: bool,
}

fn usage() -> String {
    format!(
        "usage: enroll-bench [--reps R (1-20, default 3)] [--count N (requests per kind per rep, \
         1-{MAX_COUNT}, default 2000)] [--concurrency C (1-64, default 8)] \
         [--quick (200 requests, 1 rep)] [--write]"
    )
}

fn parse_args() -> Result<Args, String> {
    let (mut reps, mut count, mut concurrency) = (None, None, 8);
    let (mut quick, mut write) = (false, false);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => reps = Some(number(it.next(), "--reps", 1, 20)?),
            "--count" => count = Some(number(it.next(), "--count", 1, MAX_COUNT)?),
            "--concurrency" => concurrency = number(it.next(), "--concurrency", 1, 64)?,
            "--quick" => quick = true,
            "--write" => write = true,
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}; see --help")),
        }
    }
    Ok(Args {
        reps: reps.unwrap_or(if quick { 1 } else { 3 }),
        count: count.unwrap_or(if quick { 200 } else { 2000 }),
        concurrency,
        quick,
        write,
    })
}

/// Why the bench stopped early.
enum Fail {
    /// A step failed (exit 1).
    Step(String),
    /// A prerequisite is missing (exit 2).
    Missing(String),
}

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail::Step(s)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hello,
    Token,
    Es256,
    Rs256,
    /// `Token` on a lighthouse whose store is a PostgreSQL database.
    TokenPostgres,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Hello,
        Kind::Token,
        Kind::Es256,
        Kind::Rs256,
        Kind::TokenPostgres,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Token => "token",
            Kind::Es256 => "oidc-es256",
            Kind::Rs256 => "oidc-rs256",
            Kind::TokenPostgres => "token-postgres",
        }
    }

    fn index(self) -> usize {
        match self {
            Kind::Hello => 0,
            Kind::Token => 1,
            Kind::Es256 => 2,
            Kind::Rs256 => 3,
            Kind::TokenPostgres => 4,
        }
    }

    /// The lighthouse config its batches run on.
    fn config(self) -> &'static str {
        match self {
            Kind::TokenPostgres => "lh-pg.toml",
            _ => "lh.toml",
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs a workspace binary in `dir`; its stdout, or why it failed.
fn run(dir: &Path, program: &Path, args: &[&str]) -> Result<String, String> {
    let name = program
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {name} {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{name} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Borrowed arguments, for [`run`].
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// [`workspace_bin`] without its panic: the path, or how to get it.
fn find_bin(name: &str) -> Result<PathBuf, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found = std::panic::catch_unwind(|| workspace_bin(name));
    std::panic::set_hook(hook);
    found.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| format!("{name} not found"))
    })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(tool).is_file()))
}

/// A free UDP port on loopback (free when this returns; the lighthouse
/// binds it a moment later).
fn free_port() -> Result<u16, String> {
    let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("binding a UDP socket: {e}"))?;
    s.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("reading its port: {e}"))
}

/// The file system `path` is on (the longest mount point above it), from
/// /proc/self/mounts: "ext4", "tmpfs"...
fn fs_type(path: &Path) -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (point, kind) = (f.nth(1)?, f.next()?);
            path.starts_with(point).then_some((point.len(), kind))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(
            || "an unknown file system".into(),
            |(_, kind)| kind.to_string(),
        )
}

fn client_socket(to: SocketAddr) -> Result<UdpSocket, String> {
    let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("binding a UDP socket: {e}"))?;
    s.connect(to)
        .map_err(|e| format!("connecting a UDP socket to {to}: {e}"))?;
    Ok(s)
}

/// Sends the item's datagram and waits for an answer of type `ty` (for an
/// enrollment request, one sealed for the same ephemeral key); resends its
/// repeat (padded to fit any answer, as the node does) after each
/// [`TRY_TIMEOUT`], [`RESENDS`] times. The answer's length in `buf`.
fn exchange(
    sock: &UdpSocket,
    item: &Item,
    ty: u8,
    try_timeout: Duration,
    buf: &mut [u8],
) -> Result<usize, String> {
    let eph = (ty == TYPE_ENROLL_REPLY)
        .then(|| item.datagram.get(1..33))
        .flatten();
    for attempt in 0..=RESENDS {
        let datagram = if attempt == 0 {
            &item.datagram
        } else {
            &item.repeat
        };
        sock.send(datagram).map_err(|e| format!("sending: {e}"))?;
        let until = Instant::now() + try_timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left < Duration::from_micros(100) {
                break;
            }
            sock.set_read_timeout(Some(left))
                .map_err(|e| format!("setting a timeout: {e}"))?;
            match sock.recv(buf) {
                Ok(n)
                    if buf.first() == Some(&ty)
                        && eph.is_none_or(|e| buf.get(1..33) == Some(e)) =>
                {
                    return Ok(n)
                }
                // A late answer to an earlier request of this socket.
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => return Err(format!("receiving: {e}")),
            }
        }
    }
    Err(format!(
        "no answer after {} sends, {try_timeout:?} apart",
        RESENDS + 1
    ))
}

/// One request, ready to send: the datagram, its repeat and, for an
/// enrollment, the sealer that opens its reply and the key the certificate
/// must carry.
struct Item {
    datagram: Vec<u8>,
    repeat: Vec<u8>,
    sealer: Option<(Sealer, [u8; 32])>,
}

fn hello_item() -> Item {
    Item {
        datagram: enroll_hello(),
        repeat: enroll_hello(),
        sealer: None,
    }
}

/// A request with a fresh node key and a fresh ephemeral key, sealed to
/// the lighthouse's key (what `enroll_with` in node/src/io/enroll.rs does).
fn enroll_item(
    lh_pub: [u8; 32],
    token: Option<String>,
    oidc: Option<String>,
) -> Result<Item, String> {
    let key = NodeSecretKey::generate();
    let sealer = Sealer::new(NodeSecretKey::generate().static_secret(), lh_pub);
    let request = EnrollRequest {
        token,
        oidc,
        public_key: key.public_bytes(),
        name_hint: Some("bench".into()),
    };
    let seal = |min_len| {
        sealer
            .seal_request(&request, min_len)
            .map_err(|e| format!("sealing a request: {e}"))
    };
    let (datagram, repeat) = (seal(ENROLL_REQUEST_MIN)?, seal(MAX_ENROLL_REPLY_LEN)?);
    Ok(Item {
        datagram,
        repeat,
        sealer: Some((sealer, key.public_bytes())),
    })
}

/// A started `tern-lighthouse`; dropping it stops it.
struct Lighthouse {
    child: Child,
    log: PathBuf,
}

impl Lighthouse {
    fn start(
        bin: &Path,
        dir: &Path,
        config: &str,
        n: usize,
        addr: SocketAddr,
    ) -> Result<Lighthouse, String> {
        let log = dir.join(format!("lighthouse-{n}.log"));
        let out = fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("creating {}: {e}", log.display()))?;
        let child = Command::new(bin)
            .args(["--config", config])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let mut lh = Lighthouse { child, log };
        let probe = client_socket(addr)?;
        let mut buf = vec![0u8; MAX_ENROLL_LEN];
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = lh.child.try_wait() {
                return Err(format!(
                    "the lighthouse exited at start ({status}){}",
                    lh.tail()
                ));
            }
            // A refused port (not bound yet) fails at once: wait a little.
            match exchange_once(&probe, &mut buf) {
                true => return Ok(lh),
                false if Instant::now() >= deadline => {
                    return Err(format!(
                        "the lighthouse did not answer a hello within {START_TIMEOUT:?}{}",
                        lh.tail()
                    ))
                }
                false => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, to append to an error.
    fn tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(8).collect();
        if lines.is_empty() {
            return String::new();
        }
        let lines: Vec<&str> = lines.into_iter().rev().collect();
        format!("; its log ends:\n  {}", lines.join("\n  "))
    }

    /// A field of /proc/PID/status in MiB (VmRSS, VmHWM).
    fn mem_mib(&self, field: &str) -> Option<f64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    /// User + system CPU time so far, in seconds.
    fn cpu_s(&self, ticks_per_s: f64) -> Option<f64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // After "(comm)": state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / ticks_per_s)
    }

    fn stop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`]. Only while the child is not
/// reaped, so its PID is still ours.
fn stop_child(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `tern up` started by the bench; stopped when dropped.
struct Node(Child);

impl Node {
    fn start(
        tern: &Path,
        dir: &Path,
        config: &str,
        token: Option<&str>,
        log: &str,
    ) -> Result<Node, String> {
        let out = fs::File::create(dir.join(log)).map_err(|e| format!("creating {log}: {e}"))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("creating {log}: {e}"))?;
        let mut cmd = Command::new(tern);
        cmd.args(["up", "--config", config])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(token) = token {
            cmd.env("TERN_ENROLL_TOKEN", token);
        }
        cmd.spawn()
            .map(Node)
            .map_err(|e| format!("starting tern up --config {config}: {e}"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        stop_child(&mut self.0);
    }
}

/// An HTTP GET through a local port: whether the private service answered.
fn fetch(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut out = String::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_ok()
        && s.read_to_string(&mut out).is_ok()
        && out.contains("private hello")
}

/// `tern up` to the first byte from the private service through the
/// gateway, over a local forward, in seconds.
fn time_to_first_byte(
    tern: &Path,
    dir: &Path,
    config: &str,
    token: Option<&str>,
    forward: u16,
) -> Result<f64, String> {
    let started = Instant::now();
    let node = Node::start(tern, dir, config, token, &format!("{config}.log"))?;
    let deadline = started + Duration::from_secs(20);
    loop {
        if fetch(forward) {
            let took = started.elapsed().as_secs_f64();
            drop(node);
            return Ok(took);
        }
        if Instant::now() >= deadline {
            let log = fs::read_to_string(dir.join(format!("{config}.log"))).unwrap_or_default();
            return Err(format!(
                "{config}: no answer through the forward within 20 s; its log:\n{log}"
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Per repetition: ms to the first byte with a certificate on disk, ms
/// when enrolling, and their ratio.
type JoinFigures = (Vec<f64>, Vec<f64>, Vec<f64>);

/// The join figures: a CI node with a certificate on disk against one that
/// enrolls with a token, each from `tern up` to the first byte of a private
/// service behind a userspace gateway, interleaved.
fn join_figures(
    tern: &Path,
    lighthouse: &Path,
    dir: &Path,
    addr: SocketAddr,
    reps: usize,
) -> Result<JoinFigures, String> {
    let subnets = format!("{PRIVATE_NET}.0/24");
    run(
        dir,
        tern,
        &strs(&sign_args(
            "ca",
            "gw",
            "100.64.0.2/10",
            &["--subnets", &subnets],
        )),
    )?;
    let http = std::net::TcpListener::bind((format!("{PRIVATE_NET}.10").as_str(), 0))
        .map_err(|e| format!("binding the private service: {e}"))?;
    let http_port = http.local_addr().map_err(|e| e.to_string())?.port();
    thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in http.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\nprivate hello\n");
        }
    });
    let node_text = |name: &str, pki: &str, forward: u16| -> Result<String, String> {
        Ok(format!(
            "[pki]\n{pki}[listen]\naddr = \"127.0.0.1:{}\"\n[[lighthouses]]\nendpoint = \"{addr}\"\n\
             [tun]\nmode = \"userspace\"\n[api]\nsocket = \"{name}.sock\"\n[log]\nlevel = \"warn\"\n\
             [[forwards]]\nlisten = \"127.0.0.1:{forward}\"\ntarget = \"{PRIVATE_NET}.10:{http_port}\"\n",
            free_port()?
        ))
    };
    let gw =
        format!(
        "{}[gateway]\nsubnets = [\"{PRIVATE_NET}.0/24\"]\n[[firewall.inbound]]\nproto = \"tcp\"\n\
         local_cidr = \"{PRIVATE_NET}.0/24\"\ngroups = [\"ci\"]\n",
        node_text("gw", "ca = \"ca.crt\"\ncert = \"gw.crt\"\nkey = \"gw.key\"\n", free_tcp()?)?
    );
    fs::write(dir.join("gw.toml"), gw).map_err(|e| format!("writing gw.toml: {e}"))?;
    let _lighthouse = Lighthouse::start(lighthouse, dir, "lh.toml", 999, addr)?;
    let _gateway = Node::start(tern, dir, "gw.toml", None, "gw.log")?;
    let (mut static_s, mut enrolled_s, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        // Everything but the join itself is prepared before the clock starts.
        let name = format!("job-static-{rep}");
        let ip = format!("100.64.1.{}/10", rep + 1);
        run(
            dir,
            tern,
            &strs(&sign_args("ca", &name, &ip, &["--groups", "ci"])),
        )?;
        let (f1, f2) = (free_tcp()?, free_tcp()?);
        let pki = format!("ca = \"ca.crt\"\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\n");
        fs::write(
            dir.join(format!("{name}.toml")),
            node_text(&name, &pki, f1)?,
        )
        .map_err(|e| format!("writing {name}.toml: {e}"))?;
        let enrolled = format!("job-enrolled-{rep}");
        fs::write(
            dir.join(format!("{enrolled}.toml")),
            node_text(&enrolled, "ca = \"ca.crt\"\n", f2)?,
        )
        .map_err(|e| format!("writing {enrolled}.toml: {e}"))?;
        let token = run(
            dir,
            tern.with_file_name("tern-lighthouse").as_path(),
            &[
                "token",
                "create",
                "--config",
                "lh.toml",
                "--groups",
                "ci",
                "--ttl",
                "1h",
                "--uses",
                "1",
                "--cert-ttl",
                "10m",
            ],
        )?;
        let s = time_to_first_byte(tern, dir, &format!("{name}.toml"), None, f1)?;
        let e = time_to_first_byte(
            tern,
            dir,
            &format!("{enrolled}.toml"),
            Some(token.trim()),
            f2,
        )?;
        eprintln!(
            "enroll-bench: join rep {}/{reps}: certificate on disk {:.0} ms, enrolled {:.0} ms",
            rep + 1,
            s * 1e3,
            e * 1e3
        );
        static_s.push(s * 1e3);
        enrolled_s.push(e * 1e3);
        ratio.push(e / s);
    }
    Ok((static_s, enrolled_s, ratio))
}

/// A free TCP port on loopback.
fn free_tcp() -> Result<u16, String> {
    let s = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("binding a TCP socket: {e}"))?;
    s.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("reading its port: {e}"))
}

impl Drop for Lighthouse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One hello with a short timeout and no resend: whether it was answered.
fn exchange_once(sock: &UdpSocket, buf: &mut [u8]) -> bool {
    if sock.send(&enroll_hello()).is_err() {
        return false;
    }
    if sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .is_err()
    {
        return false;
    }
    matches!(sock.recv(buf), Ok(n) if n > 1 && buf.first() == Some(&TYPE_ENROLL_CERT))
}

/// The temporary directory and the lighthouse running in it; dropping it
/// stops the lighthouse, then removes the directory (also on failure).
struct Guard {
    // Declared first: stopped before the directory goes.
    lighthouse: Option<Lighthouse>,
    started: usize,
    bin: PathBuf,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Guard {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the running lighthouse, if any, and starts a fresh one on the
    /// same address with `config` (and so its store).
    fn restart(&mut self, config: &str) -> Result<&Lighthouse, String> {
        if let Some(mut old) = self.lighthouse.take() {
            old.stop();
        }
        self.started += 1;
        let lh = Lighthouse::start(&self.bin, self.dir.path(), config, self.started, self.addr)?;
        Ok(self.lighthouse.insert(lh))
    }

    fn tail(&self) -> String {
        self.lighthouse
            .as_ref()
            .map_or_else(String::new, Lighthouse::tail)
    }
}

/// What one batch measured.
struct Batch {
    wall_s: f64,
    ok: usize,
    failed: usize,
    lat_ms: Vec<f64>,
    first_failure: Option<String>,
}

/// Sends every item once (resending on loss), `concurrency` workers each
/// with one request outstanding; times only the exchanges.
fn run_batch(addr: SocketAddr, items: &[Item], concurrency: usize) -> Result<Batch, String> {
    let sockets = (0..concurrency)
        .map(|_| client_socket(addr))
        .collect::<Result<Vec<_>, _>>()?;
    let next = AtomicUsize::new(0);
    let first_failure = Mutex::new(None::<String>);
    let barrier = Barrier::new(concurrency + 1);
    let note = |why: String| {
        let mut f = first_failure.lock().unwrap_or_else(PoisonError::into_inner);
        if f.is_none() {
            *f = Some(why);
        }
    };
    let (start, outs) = thread::scope(|s| {
        let workers: Vec<_> = sockets
            .iter()
            .map(|sock| {
                let (next, barrier, note) = (&next, &barrier, &note);
                s.spawn(move || {
                    let mut buf = vec![0u8; MAX_ENROLL_LEN + 64];
                    let (mut lat, mut failed) = (Vec::with_capacity(items.len()), 0usize);
                    barrier.wait();
                    let deadline = Instant::now() + BATCH_DEADLINE;
                    while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if Instant::now() >= deadline {
                            failed += 1;
                            note(format!("not sent: the batch ran past {BATCH_DEADLINE:?}"));
                            continue;
                        }
                        let ty = if item.sealer.is_some() {
                            TYPE_ENROLL_REPLY
                        } else {
                            TYPE_ENROLL_CERT
                        };
                        let t = Instant::now();
                        let answer = exchange(sock, item, ty, TRY_TIMEOUT, &mut buf);
                        let ms = t.elapsed().as_secs_f64() * 1000.0;
                        let verdict = answer.and_then(|n| match &item.sealer {
                            None => Ok(()),
                            Some((sealer, _)) => {
                                let reply = sealer
                                    .open_reply(&buf[..n])
                                    .map_err(|e| format!("the reply: {e}"))?;
                                match reply.cert {
                                    Some(_) => Ok(()),
                                    None => Err(format!(
                                        "refused: {}",
                                        reply.refused.unwrap_or_else(|| "no reason given".into())
                                    )),
                                }
                            }
                        });
                        match verdict {
                            Ok(()) => lat.push(ms),
                            Err(why) => {
                                failed += 1;
                                note(why);
                            }
                        }
                    }
                    (lat, failed)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let outs: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        (start, outs)
    });
    let wall_s = start.elapsed().as_secs_f64();
    let mut batch = Batch {
        wall_s,
        ok: 0,
        failed: 0,
        lat_ms: Vec::with_capacity(items.len()),
        first_failure: None,
    };
    for out in outs {
        let (lat, failed) = out.map_err(|_| "a client worker panicked".to_string())?;
        batch.ok += lat.len();
        batch.failed += failed;
        batch.lat_ms.extend(lat);
    }
    batch.first_failure = first_failure
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    Ok(batch)
}

/// The lighthouse's certificate from a hello, verified against the CA
/// pool with the lighthouse group (as the node does): its X25519 key.
fn lighthouse_key(addr: SocketAddr, pool: &CaPool) -> Result<[u8; 32], String> {
    let sock = client_socket(addr)?;
    let mut buf = vec![0u8; MAX_ENROLL_LEN];
    let n = exchange(
        &sock,
        &hello_item(),
        TYPE_ENROLL_CERT,
        TRY_TIMEOUT,
        &mut buf,
    )?;
    let lh = pool
        .verify_bytes(&buf[1..n], unix_now())
        .map_err(|e| format!("the lighthouse's certificate does not verify against ca.crt: {e}"))?;
    if !lh.has_group(LIGHTHOUSE_GROUP) {
        return Err(format!("{} lacks the lighthouse group", lh.name()));
    }
    Ok(lh.public_key())
}

/// One enrollment, its certificate parsed and verified against the CA pool
/// and checked to carry the requested key: a line describing it.
fn sanity(addr: SocketAddr, pool: &CaPool, item: &Item) -> Result<String, String> {
    let sock = client_socket(addr)?;
    let mut buf = vec![0u8; MAX_ENROLL_LEN + 64];
    let n = exchange(&sock, item, TYPE_ENROLL_REPLY, TRY_TIMEOUT, &mut buf)?;
    let Some((sealer, public_key)) = &item.sealer else {
        return Err("not an enrollment request".into());
    };
    let reply = sealer
        .open_reply(&buf[..n])
        .map_err(|e| format!("the reply: {e}"))?;
    let Some(pem) = reply.cert else {
        return Err(format!(
            "refused: {}",
            reply.refused.unwrap_or_else(|| "no reason given".into())
        ));
    };
    let cert = Cert::from_pem(&pem).map_err(|e| format!("the certificate does not parse: {e}"))?;
    let cert = pool
        .verify(&cert, unix_now())
        .map_err(|e| format!("the certificate does not verify against ca.crt: {e}"))?;
    if cert.public_key() != *public_key {
        return Err("the certificate carries another key than the one asked for".into());
    }
    Ok(format!(
        "{} {} groups {:?} issued by {:?}, valid {} s",
        cert.name(),
        cert.overlay_net(),
        cert.groups(),
        cert.issued_by().unwrap_or("the root"),
        cert.not_after().saturating_sub(unix_now())
    ))
}

/// `n` ID tokens for the bench's provider, each with its own `jti` (one
/// enrollment per ID token), valid an hour so a slow run does not see them
/// expire.
fn sign_tokens(issuer: &TestOidcIssuer, n: usize) -> Vec<String> {
    let now = unix_now();
    let tag = format!("{}-{now}", issuer.alg().to_lowercase());
    (0..n)
        .map(|i| {
            let mut claims =
                github_like_claims(OIDC_ISSUER, AUDIENCE, "acme/app", "refs/heads/main", now);
            claims["jti"] = json!(format!("bench-{tag}-{i}"));
            claims["exp"] = json!(now + 3600);
            issuer.sign(&claims)
        })
        .collect()
}

/// Per kind, one value per repetition.
#[derive(Default, Clone)]
struct Figures {
    tput: Vec<f64>,
    ratio: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    failed: usize,
    sent: usize,
    cpu_ms: Vec<f64>,
    hwm: Vec<f64>,
    rss_start: Vec<f64>,
}

struct Outcome {
    table: String,
    failed: usize,
}

fn bench(args: &Args) -> Result<Outcome, Fail> {
    let tern = find_bin("tern").map_err(Fail::Missing)?;
    let lighthouse_bin = find_bin("tern-lighthouse").map_err(Fail::Missing)?;
    if !on_path("kill") {
        return Err(Fail::Missing(
            "needs `kill` (procps) on PATH to stop the lighthouse".into(),
        ));
    }
    let dir = tempfile::Builder::new()
        .prefix("enroll-bench-")
        .tempdir()
        .map_err(|e| format!("creating a temporary directory: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut g = Guard {
        lighthouse: None,
        started: 0,
        bin: lighthouse_bin.clone(),
        addr,
        dir,
    };
    let d = g.path().to_path_buf();
    let fs_type = fs_type(&d);

    // The PKI: a root, the lighthouse, and an issuer with a big pool.
    run(&d, &tern, &strs(&ca_args("ca")))?;
    run(
        &d,
        &tern,
        &strs(&sign_args(
            "ca",
            "lh1",
            "100.64.0.1/10",
            &["--groups", "lighthouse"],
        )),
    )?;
    run(
        &d,
        &tern,
        &strs(&issuer_args("ca", "lh-issuer", "100.80.0.0/14", "ci")),
    )?;
    let ca_text =
        fs::read_to_string(d.join("ca.crt")).map_err(|e| format!("reading ca.crt: {e}"))?;
    let pool = Cert::all_from_pem(&ca_text)
        .and_then(CaPool::new)
        .map_err(|e| format!("ca.crt: {e}"))?;

    // The OIDC provider: an ES256 and, with openssl, an RS256 key.
    let es = TestOidcIssuer::es256("k1").map_err(|e| format!("an ES256 key: {e}"))?;
    let (rs, skipped) = if on_path("openssl") {
        let rs = TestOidcIssuer::rs256("k2").map_err(|e| format!("an RS256 key: {e}"))?;
        (Some(rs), None)
    } else {
        eprintln!("enroll-bench: openssl not found: oidc-rs256 skipped");
        (
            None,
            Some("skipped: `openssl` not found (it makes the RS256 key)"),
        )
    };
    let keys: Vec<_> = std::iter::once(es.jwk())
        .chain(rs.as_ref().map(TestOidcIssuer::jwk))
        .collect();
    let write = |name: &str, text: &str| {
        fs::write(d.join(name), text).map_err(|e| format!("writing {name}: {e}"))
    };
    write("jwks.json", &json!({ "keys": keys }).to_string())?;
    write(
        "lh.toml",
        &format!(
            "[pki]\nca = \"ca.crt\"\ncert = \"lh1.crt\"\nkey = \"lh1.key\"\n\
             [listen]\naddr = \"{addr}\"\n[api]\nsocket = \"lh.sock\"\n[log]\nlevel = \"warn\"\n\
             [enroll]\nissuer_cert = \"lh-issuer.crt\"\nissuer_key = \"lh-issuer.key\"\n\
             per_source_per_sec = 1000000\ntotal_per_sec = 1000000\n\
             [[enroll.oidc]]\nissuer = \"{OIDC_ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks = \"jwks.json\"\n\
             [[enroll.oidc.rules]]\nclaims = {{ repository = \"acme/*\" }}\ngroups = [\"ci\"]\n"
        ),
    )?;

    // The same lighthouse on a PostgreSQL database (a server of this run's
    // own, on loopback), where PostgreSQL can be run.
    let postgres = tern_lighthouse::store::testing::TestServer::start_for_bench();
    let pg_skipped = postgres.is_none().then_some(
        "skipped: PostgreSQL is not installed here (Debian's postgresql) or this is not root",
    );
    if let Some(server) = &postgres {
        server.create_db("bench");
        let text =
            fs::read_to_string(d.join("lh.toml")).map_err(|e| format!("reading lh.toml: {e}"))?;
        write(
            "lh-pg.toml",
            &format!("{text}[store]\nurl = \"{}\"\n", server.tcp_url("bench")),
        )?;
    }

    // Credentials, all made before anything is timed: one multi-use token
    // in each store, and one ID token per enrollment (plus the sanity
    // check's).
    let per_kind = args.reps * args.count + 1;
    let uses = (per_kind + 16).to_string();
    let make_token = |config: &str| -> Result<String, Fail> {
        let token = run(
            &d,
            &lighthouse_bin,
            &[
                "token",
                "create",
                "--config",
                config,
                "--groups",
                "ci",
                "--ttl",
                "1h",
                "--uses",
                &uses,
                "--cert-ttl",
                "10m",
            ],
        )?
        .trim()
        .to_string();
        if token.is_empty() {
            return Err(Fail::Step(
                "tern-lighthouse token create printed no token".into(),
            ));
        }
        Ok(token)
    };
    let token = make_token("lh.toml")?;
    let pg_token = match &postgres {
        Some(_) => Some(make_token("lh-pg.toml")?),
        None => None,
    };
    let t = Instant::now();
    let mut es_tokens = sign_tokens(&es, per_kind);
    eprintln!(
        "enroll-bench: signed {per_kind} ES256 ID tokens in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut rs_tokens = match &rs {
        Some(rs) => {
            let t = Instant::now();
            let v = sign_tokens(rs, per_kind);
            eprintln!(
                "enroll-bench: signed {per_kind} RS256 ID tokens in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            v
        }
        None => Vec::new(),
    };

    // Start, and check one certificate of each kind.
    g.restart("lh.toml")?;
    let lh_pub = lighthouse_key(addr, &pool).map_err(|e| format!("{e}{}", g.tail()))?;
    let mut checks = vec![("token", enroll_item(lh_pub, Some(token.clone()), None)?)];
    if let Some(t) = es_tokens.pop() {
        checks.push(("oidc-es256", enroll_item(lh_pub, None, Some(t))?));
    }
    if let Some(t) = rs_tokens.pop() {
        checks.push(("oidc-rs256", enroll_item(lh_pub, None, Some(t))?));
    }
    for (label, item) in &checks {
        let line = sanity(addr, &pool, item)
            .map_err(|e| format!("sanity check, {label}: {e}{}", g.tail()))?;
        eprintln!("enroll-bench: sanity {label}: {line}");
    }

    let ticks: f64 = command_output("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0);
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| *k != Kind::Rs256 || rs.is_some())
        .filter(|k| *k != Kind::TokenPostgres || pg_token.is_some())
        .collect();
    let mut figs: Vec<Figures> = vec![Figures::default(); Kind::ALL.len()];
    let mut failed_total = 0;
    for rep in 1..=args.reps {
        let mut hello_tput = f64::NAN;
        for &kind in &kinds {
            // The requests, sealed before the clock starts.
            let items: Result<Vec<Item>, String> = match kind {
                Kind::Hello => (0..args.count).map(|_| Ok(hello_item())).collect(),
                Kind::Token => (0..args.count)
                    .map(|_| enroll_item(lh_pub, Some(token.clone()), None))
                    .collect(),
                Kind::TokenPostgres => (0..args.count)
                    .map(|_| enroll_item(lh_pub, pg_token.clone(), None))
                    .collect(),
                Kind::Es256 | Kind::Rs256 => {
                    let tokens = if kind == Kind::Es256 {
                        &mut es_tokens
                    } else {
                        &mut rs_tokens
                    };
                    let start = tokens.len().saturating_sub(args.count);
                    tokens
                        .split_off(start)
                        .into_iter()
                        .map(|t| enroll_item(lh_pub, None, Some(t)))
                        .collect()
                }
            };
            let items: Vec<Item> = items.map_err(Fail::Step)?;
            let lh = g.restart(kind.config())?;
            let rss_start = lh.mem_mib("VmRSS");
            let cpu_before = lh.cpu_s(ticks);
            let batch = run_batch(addr, &items, args.concurrency)
                .map_err(|e| format!("{} batch: {e}", kind.label()))?;
            let lh = g
                .lighthouse
                .as_ref()
                .ok_or_else(|| Fail::Step("the lighthouse is gone".into()))?;
            let hwm = lh.mem_mib("VmHWM");
            let cpu = match (cpu_before, lh.cpu_s(ticks)) {
                // Clock ticks are 10 ms: a short batch says nothing.
                (Some(a), Some(b)) if batch.ok > 0 && batch.wall_s >= 0.5 => {
                    Some((b - a) * 1000.0 / batch.ok as f64)
                }
                _ => None,
            };
            if let Ok(Some(status)) = g
                .lighthouse
                .as_mut()
                .map_or(Ok(None), |lh| lh.child.try_wait())
            {
                return Err(Fail::Step(format!(
                    "the lighthouse exited during the {} batch ({status}){}",
                    kind.label(),
                    g.tail()
                )));
            }
            let tput = batch.ok as f64 / batch.wall_s;
            let f = &mut figs[kind.index()];
            f.tput.push(tput);
            if kind == Kind::Hello {
                hello_tput = tput;
            }
            if hello_tput.is_finite() && hello_tput > 0.0 {
                f.ratio.push(tput / hello_tput);
            }
            let (p50, p99) = (
                median(&mut batch.lat_ms.clone()),
                percentile(&batch.lat_ms, 0.99),
            );
            f.p50.push(p50);
            f.p99.push(p99);
            f.failed += batch.failed;
            f.sent += items.len();
            f.cpu_ms.extend(cpu);
            f.hwm.extend(hwm);
            f.rss_start.extend(rss_start);
            failed_total += batch.failed;
            eprintln!(
                "enroll-bench: rep {rep}/{}: {:<10} {:>8.0}/s in {:.2} s, p50 {p50:.2} ms, p99 {p99:.2} ms, \
                 lighthouse CPU {} ms/request, VmHWM {} MiB, {} failed{}",
                args.reps,
                kind.label(),
                tput,
                batch.wall_s,
                cpu.map_or_else(|| "?".into(), |c| format!("{c:.3}")),
                hwm.map_or_else(|| "?".into(), |m| format!("{m:.1}")),
                batch.failed,
                batch
                    .first_failure
                    .as_deref()
                    .map_or_else(String::new, |w| format!(" (first: {w})")),
            );
        }
    }
    if let Some(mut lh) = g.lighthouse.take() {
        lh.stop();
    }
    let join_reps = if args.quick {
        2
    } else {
        (args.reps * 2).max(5)
    };
    let (join_static, join_enrolled, join_ratio) =
        join_figures(&tern, &lighthouse_bin, &d, addr, join_reps).map_err(Fail::Step)?;

    let rss_first = figs[Kind::Hello.index()].rss_start.first().copied();
    let all_rss: Vec<f64> = figs.iter().flat_map(|f| f.rss_start.clone()).collect();
    let peak = figs
        .iter()
        .flat_map(|f| f.hwm.iter().copied())
        .fold(f64::NAN, f64::max);
    let build = if cfg!(debug_assertions) {
        " **Debug build**: not comparable with release figures."
    } else {
        ""
    };
    let quick = if args.quick { " --quick" } else { "" };
    let describe = |k: Kind| match k {
        Kind::Hello => "hello: 0x13 → 0x14 with the lighthouse's certificate (baseline)",
        Kind::Token => "token: sealed request with a multi-use token → certificate",
        Kind::Es256 => "oidc-es256: sealed request with an ES256 ID token → certificate",
        Kind::Rs256 => "oidc-rs256: sealed request with an RS256 ID token → certificate",
        Kind::TokenPostgres => "token-postgres: as token, the store a PostgreSQL database",
    };
    let mut rows = String::new();
    for k in Kind::ALL {
        let f = &figs[k.index()];
        let why_skipped = match k {
            Kind::Rs256 => skipped,
            Kind::TokenPostgres => pg_skipped,
            _ => None,
        };
        {
            if let Some(why) = why_skipped {
                rows.push_str(&format!(
                    "| {} | {why} | — | — | — | — | — | — |\n",
                    describe(k)
                ));
                continue;
            }
        }
        rows.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} of {} | {} | {} |\n",
            describe(k),
            cell(&f.tput, 0),
            cell(&f.ratio, 4),
            cell(&f.p50, 2),
            cell(&f.p99, 2),
            f.failed,
            f.sent,
            cell(&f.cpu_ms, 3),
            cell(&f.hwm, 1),
        ));
    }
    let mib = |v: Option<f64>| v.map_or_else(|| "—".into(), |m| format!("{m:.1}"));
    let table = format!(
        "## Enrollment: certificates per second from one lighthouse\n\n\
         {}\n\
         Command: `enroll-bench --reps {} --count {} --concurrency {}{quick}` (loopback, no root: \
         a `tern-lighthouse` with `[enroll]` and an in-process client).{build}\n\n\
         One lighthouse, its enrollment store (SQLite, WAL) on {fs_type}, answers {} clients on \
         loopback, each with its own UDP socket and one request outstanding (a 2 s timeout, up to \
         3 resends). **Baseline**: `hello` (0x13 → 0x14, the lighthouse's certificate), the \
         cheapest request the same socket answers: no cryptography, no store. **token**: a \
         request sealed to the lighthouse's key (X25519 + ChaCha20-Poly1305) carrying a \
         multi-use token and a fresh X25519 public key, answered with a certificate signed by \
         the lighthouse's issuer (pool 100.80.0.0/14): the token's use, the address lease and \
         the issued certificate are written to the store. **oidc-es256 / oidc-rs256**: the same \
         with a pre-signed ID token of a throwaway provider (JWKS file, one claim rule), whose \
         signature, claims and rule are checked and whose `jti` is recorded (one enrollment per \
         ID token). **token-postgres**: as token, on the same lighthouse with `[store] url` \
         naming a database of a PostgreSQL server this run starts on loopback (Debian's, \
         initdb's defaults, fsync on and `synchronous_commit=off`, the durability of the SQLite \
         store's WAL with `synchronous=NORMAL`), over TCP. Every request has a new node key; requests are sealed and ID tokens signed \
         before the clock starts; only the exchanges are timed, and an enrollment counts only if \
         its reply opens and carries a certificate. One certificate of each kind was parsed and \
         verified against the CA first. Each batch of {} requests runs on a freshly started \
         lighthouse sharing one store (so no kind finds another's answers cached), kinds \
         interleaved within each repetition. Throughput is \
         successful requests over the batch's wall time (a batch of hellos lasts only \
         milliseconds, so that figure is noisy); ÷ hello is per repetition; latency is \
         per request (send → answer); lighthouse CPU is its user + system time over the batch \
         per successful request. Cells are median (min–max) across repetitions.\n\n\
         | request | per second | ÷ hello | latency p50 (ms) | latency p99 (ms) | failed | \
         lighthouse CPU per request (ms) | lighthouse VmHWM after the batch (MiB) |\n\
         |---|---|---|---|---|---|---|---|\n\
         {rows}\n\
         Lighthouse RSS before the first batch: {} MiB (VmRSS of a fresh lighthouse: {} MiB); \
         peak over the run: {} MiB (VmHWM).\n\n\
         ### Joining: `tern up` to the first byte from a private service\n\n\
         A userspace CI node on loopback starts with `tern up` and fetches a page from an HTTP \
         service at {PRIVATE_NET}.10 behind a userspace gateway (whose firewall lets group ci \
         in), through a local forward, polled every 5 ms from the moment the process is \
         started. **Baseline**: the same node with a long-lived certificate and key on disk. \
         **Enrolled**: its config names only the CA; `tern up` makes a key, enrolls with a \
         one-time token, registers, learns the routes and connects. {join_reps} repetitions, \
         interleaved; median (min–max).\n\n\
         | join | to the first byte (ms) | ÷ baseline |\n|---|---|---|\n\
         | certificate on disk (baseline) | {} | 1.00 |\n\
         | `tern up --enroll-token` | {} | {} |\n",
        machine_line(),
        args.reps,
        args.count,
        args.concurrency,
        args.concurrency,
        args.count,
        mib(rss_first),
        cell(&all_rss, 1),
        mib(peak.is_finite().then_some(peak)),
        cell(&join_static, 0),
        cell(&join_enrolled, 0),
        cell(&join_ratio, 2),
    );
    Ok(Outcome {
        table,
        failed: failed_total,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("enroll-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = match bench(&args) {
        Ok(o) => o,
        Err(Fail::Missing(e)) => {
            eprintln!("enroll-bench: {e}");
            return ExitCode::from(2);
        }
        Err(Fail::Step(e)) => {
            eprintln!("enroll-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", outcome.table);
    if outcome.failed > 0 {
        eprintln!(
            "enroll-bench: {} requests failed; not writing BENCHMARKS.md",
            outcome.failed
        );
        return ExitCode::FAILURE;
    }
    if args.write {
        match write_section("enroll", &outcome.table) {
            Ok(path) => eprintln!("enroll-bench: wrote the section into {}", path.display()),
            Err(e) => {
                eprintln!("enroll-bench: writing BENCHMARKS.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
