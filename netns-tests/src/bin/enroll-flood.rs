//! enroll-flood: what a flood of unauthenticated enrollment requests costs a
//! lighthouse. Loopback, no root.
//!
//! A `tern-lighthouse` with `[enroll]` gets COUNT sealed requests (to its
//! real key, so each one is opened and decided) with bogus tokens, each
//! padded to the largest enrollment datagram (8 KiB), from 64 source
//! addresses in 64 different /24s of 127/8, RATE a second (about what one
//! lighthouse decides, so that they are read, not dropped by its socket). Reported: the answers that came back and their bytes against the
//! bytes sent, and the lighthouse's memory (VmRSS before, VmHWM after).
//!
//! `--baseline-bin PATH` runs the same flood against another
//! `tern-lighthouse` binary first (an older build), so both figures come
//! from one run on one machine. Its config uses only keys every version
//! knows (the rate limits take their defaults).
//!
//! ```text
//! enroll-flood [--count N] [--rate R] [--baseline-bin PATH] [--write]
//! ```

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tern_netns_tests::report::{machine_line, write_section};
use tern_netns_tests::tern::{ca_args, issuer_args, sign_args};
use tern_netns_tests::workspace_bin;
use tern_shared::cert::Cert;
use tern_shared::enroll::{enroll_hello, EnrollRequest, Sealer, MAX_ENROLL_LEN, TYPE_ENROLL_CERT};
use tern_shared::keys::NodeSecretKey;

/// Source sockets, one per /24 (127.91.S.1).
const SOURCES: usize = 64;
/// Bounds the flood and the wait for answers after it.
const FLOOD_DEADLINE: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(3);

struct Args {
    count: usize,
    /// Requests sent per second.
    rate: u32,
    baseline: Option<PathBuf>,
    write: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        count: 16_000,
        rate: 2000,
        baseline: None,
        write: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--count" => {
                args.count = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or("--count takes 1-100000")?
            }
            "--rate" => {
                args.rate = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or("--rate takes 1-1000000 (requests a second)")?
            }
            "--baseline-bin" => {
                args.baseline = Some(it.next().ok_or("--baseline-bin takes a path")?.into())
            }
            "--write" => args.write = true,
            _ => return Err(
                "usage: enroll-flood [--count N (default 16000)] [--rate R (per second, default 2000)] [--baseline-bin PATH] [--write]"
                    .into(),
            ),
        }
    }
    Ok(args)
}

/// One lighthouse under the flood: what came back and what it cost.
struct Outcome {
    label: String,
    sent: usize,
    sent_bytes: usize,
    answers: usize,
    answer_bytes: usize,
    rss_before: f64,
    hwm_after: f64,
    seconds: f64,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("enroll-flood: {e}");
            return ExitCode::from(2);
        }
    };
    let mut runs = Vec::new();
    if let Some(bin) = &args.baseline {
        runs.push(("baseline (--baseline-bin)".to_string(), bin.clone(), ""));
    }
    let this = workspace_bin("tern-lighthouse");
    runs.push((
        "this build, default rate limits".to_string(),
        this.clone(),
        "",
    ));
    // The answer cache's own bound, with every request admitted.
    runs.push((
        "this build, rate limits lifted".to_string(),
        this,
        "per_source_per_sec = 1000000\ntotal_per_sec = 1000000\n",
    ));
    let mut outcomes = Vec::new();
    for (label, bin, extra) in runs {
        match flood(&label, &bin, args.count, args.rate, extra) {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                eprintln!("enroll-flood: {label}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let table = report(&args, &outcomes);
    println!("{table}");
    if args.write {
        if let Err(e) = write_section("enroll-flood", &table) {
            eprintln!("enroll-flood: writing BENCHMARKS.md: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn report(args: &Args, outcomes: &[Outcome]) -> String {
    let mut t = format!(
        "## Enrollment under a flood of unauthenticated requests\n\n{}\n\
         Command: `enroll-flood --count {} --rate {}{}` (loopback, no root).\n\n\
         A `tern-lighthouse` with `[enroll]` is sent {} enrollment requests sealed to its key \
         (each opened, X25519 + ChaCha20-Poly1305, and decided against the store) carrying bogus \
         tokens, each padded to 8 KiB, from {SOURCES} source addresses in as many /24s, {} a \
         second. **Baseline**: the same flood on the build named by \
         `--baseline-bin`, with the same config; then this build with its default rate limits, \
         and with them lifted (every request admitted: the answer cache's own bound). Memory is the lighthouse's VmRSS before the flood and VmHWM after it.\n\n\
         | lighthouse | requests sent (MiB) | answers (MiB) | answered bytes ÷ sent | \
         VmRSS before (MiB) | VmHWM after (MiB) | VmHWM ÷ baseline | flood (s) |\n\
         |---|---|---|---|---|---|---|---|\n",
        machine_line(),
        args.count,
        args.rate,
        if args.baseline.is_some() {
            " --baseline-bin OLD/tern-lighthouse"
        } else {
            ""
        },
        args.count,
        args.rate,
    );
    let base = outcomes.first().map_or(1.0, |o| o.hwm_after);
    for o in outcomes {
        t.push_str(&format!(
            "| {} | {} ({:.1}) | {} ({:.2}) | {:.4} | {:.1} | {:.1} | {:.2} | {:.1} |\n",
            o.label,
            o.sent,
            o.sent_bytes as f64 / (1 << 20) as f64,
            o.answers,
            o.answer_bytes as f64 / (1 << 20) as f64,
            o.answer_bytes as f64 / o.sent_bytes.max(1) as f64,
            o.rss_before,
            o.hwm_after,
            o.hwm_after / base,
            o.seconds,
        ));
    }
    t
}

/// `extra`: more `[enroll]` keys for this lighthouse's config.
fn flood(label: &str, bin: &Path, count: usize, rate: u32, extra: &str) -> Result<Outcome, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
    let d = dir.path();
    let tern = workspace_bin("tern");
    let run = |args: Vec<String>| -> Result<(), String> {
        let out = Command::new(&tern)
            .args(&args)
            .current_dir(d)
            .output()
            .map_err(|e| format!("running tern: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tern {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    };
    run(ca_args("ca"))?;
    run(sign_args(
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    ))?;
    run(issuer_args("ca", "lh-issuer", "100.80.0.0/14", "ci"))?;
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("a free port: {e}"))?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    fs::write(
        d.join("lh.toml"),
        format!(
            "[pki]\nca = \"ca.crt\"\ncert = \"lh1.crt\"\nkey = \"lh1.key\"\n\
             [listen]\naddr = \"{addr}\"\n[api]\nsocket = \"lh.sock\"\n[log]\nlevel = \"error\"\n\
             [enroll]\nissuer_cert = \"lh-issuer.crt\"\nissuer_key = \"lh-issuer.key\"\n{extra}"
        ),
    )
    .map_err(|e| format!("writing lh.toml: {e}"))?;
    let mut lh = Started::new(bin, d)?;
    let lh_pub = lighthouse_key(addr, &mut lh)?;

    // Sealed before the clock starts.
    eprintln!("enroll-flood: {label}: sealing {count} requests");
    let requests: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let request = EnrollRequest {
                token: Some(format!("tern1_{i:064x}")),
                oidc: None,
                public_key: NodeSecretKey::generate().public_bytes(),
                name_hint: Some("flood".into()),
            };
            Sealer::new(NodeSecretKey::generate().static_secret(), lh_pub)
                .seal_request(&request, MAX_ENROLL_LEN)
                .map_err(|e| format!("sealing: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let sockets: Vec<UdpSocket> = (0..SOURCES)
        .map(|s| {
            let sock = UdpSocket::bind(format!("127.91.{s}.1:0"))
                .map_err(|e| format!("binding 127.91.{s}.1: {e}"))?;
            sock.connect(addr).map_err(|e| format!("connecting: {e}"))?;
            sock.set_nonblocking(true)
                .map_err(|e| format!("non-blocking: {e}"))?;
            Ok(sock)
        })
        .collect::<Result<_, String>>()?;
    let rss_before = lh.mem_mib("VmRSS").unwrap_or(0.0);
    let started = Instant::now();
    let (mut answers, mut answer_bytes, mut sent_bytes) = (0, 0, 0);
    let mut buf = vec![0u8; MAX_ENROLL_LEN + 64];
    let mut drain = |answers: &mut usize, answer_bytes: &mut usize| {
        for sock in &sockets {
            while let Ok(n) = sock.recv(&mut buf) {
                *answers += 1;
                *answer_bytes += n;
            }
        }
    };
    for (i, request) in requests.iter().enumerate() {
        if started.elapsed() > FLOOD_DEADLINE {
            return Err(format!("the flood ran past {FLOOD_DEADLINE:?}"));
        }
        // Paced, so that the lighthouse reads what is sent instead of its
        // socket buffer dropping it.
        let due = Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let sock = &sockets[i % SOURCES];
        // A full socket buffer: take the answers, wait a moment, go on.
        while sock.send(request).is_err() {
            drain(&mut answers, &mut answer_bytes);
            std::thread::sleep(Duration::from_millis(1));
            if started.elapsed() > FLOOD_DEADLINE {
                return Err(format!("the flood ran past {FLOOD_DEADLINE:?}"));
            }
        }
        sent_bytes += request.len();
        if i % 256 == 0 {
            drain(&mut answers, &mut answer_bytes);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let settle_until = Instant::now() + SETTLE;
    while Instant::now() < settle_until {
        drain(&mut answers, &mut answer_bytes);
        std::thread::sleep(Duration::from_millis(20));
    }
    let hwm_after = lh
        .mem_mib("VmHWM")
        .ok_or("the lighthouse is gone after the flood")?;
    eprintln!(
        "enroll-flood: {label}: {count} requests in {seconds:.1} s, {answers} answers, VmHWM {hwm_after:.1} MiB"
    );
    Ok(Outcome {
        label: label.to_string(),
        sent: count,
        sent_bytes,
        answers,
        answer_bytes,
        rss_before,
        hwm_after,
        seconds,
    })
}

/// The lighthouse's X25519 key, from its answer to a padded hello.
fn lighthouse_key(addr: SocketAddr, lh: &mut Started) -> Result<[u8; 32], String> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("binding: {e}"))?;
    sock.connect(addr).map_err(|e| format!("connecting: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| format!("a timeout: {e}"))?;
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if lh.exited() {
            return Err("the lighthouse exited at start (see its log)".into());
        }
        let _ = sock.send(&enroll_hello());
        if let Ok(n) = sock.recv(&mut buf) {
            if buf.first() == Some(&TYPE_ENROLL_CERT) {
                let cert = Cert::decode(&buf[1..n]).map_err(|e| format!("its certificate: {e}"))?;
                return Ok(cert.body.public_key);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("the lighthouse did not answer a hello within 15 s".into())
}

/// A started lighthouse, stopped (by its PID) when dropped.
struct Started {
    child: Child,
}

impl Started {
    fn new(bin: &Path, dir: &Path) -> Result<Started, String> {
        let log = fs::File::create(dir.join("lh.log")).map_err(|e| format!("lh.log: {e}"))?;
        let child = Command::new(bin)
            .args(["--config", "lh.toml"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| format!("lh.log: {e}"))?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        Ok(Started { child })
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn mem_mib(&self, field: &str) -> Option<f64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
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
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
