//! Certificates replaced without downtime, on loopback, no root: a CI job
//! downloads a file through a userspace gateway (python's http.server in
//! the private network, read slowly so that the transfer spans the
//! reloads) while the gateway's certificate is renewed (same key, signed
//! later) and SIGHUP sent; the transfer completes hash-checked, and the
//! job's node holds the renewed certificate for the gateway. A certificate
//! for another address is refused with the reason and the gateway keeps
//! working; a certificate with a new key re-keys the sessions and traffic
//! goes on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tern_tests::enroll_lab::{get, lab_custom, tern, Down, Lab, LabExtra};
use tern_tests::{free_tcp, need_tool, wait_until, Daemon};

const FILE_BYTES: usize = 6 * 1024 * 1024;

/// python3's http.server serving `dir` on `ip`; stopped by its PID on drop.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hup(pid: u32) {
    let ok = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP {pid}");
}

/// A new certificate for the gateway, written over gw.crt: for its key
/// (`gw.pub`), or, with `new_key`, for a new key written over gw.key.
fn sign_gateway(lab: &Lab, ip: &str, duration: &str, new_key: bool) {
    let subnets = format!("{}.0/24", lab.subnet);
    let mut args = vec![
        "cert",
        "sign",
        "--ca-crt",
        "ca.crt",
        "--ca-key",
        "ca.key",
        "--name",
        "gw",
        "--ip",
        ip,
        "--subnets",
        &subnets,
        "--duration",
        duration,
        "--out-crt",
        "gw.crt",
        "--force",
    ];
    args.extend_from_slice(if new_key {
        &["--out-key", "gw.key"]
    } else {
        &["--in-pub", "gw.pub"]
    });
    tern(lab.dir.path(), &args);
}

/// GET `path` through the local port, reading slowly (about 2 MB/s), with
/// `during` called once a quarter of the body has arrived; the body.
fn slow_get(port: u16, path: &str, during: impl FnOnce()) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut all = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut during = Some(during);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the transfer took over a minute");
        let n = s.read(&mut buf).expect("the transfer broke");
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        if all.len() > FILE_BYTES / 4 {
            if let Some(f) = during.take() {
                f();
            }
        }
        std::thread::sleep(Duration::from_millis(8));
    }
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    assert!(all.starts_with(b"HTTP/1.0 200"), "not a 200");
    all.split_off(split + 4)
}

fn peer_not_after(lab: &Lab, node: &str, peer: &str) -> u64 {
    lab.node_status(node)["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == peer)
        .and_then(|p| p["cert_not_after"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_gateway_certificate_replaced_under_load_keeps_the_transfer_going() {
    if !need_tool("rotation", "python3", "python3") {
        return;
    }
    let lab = lab_custom("127.83.0", &LabExtra::default());
    let d = lab.dir.path();
    tern(
        d,
        &["cert", "pubkey", "--key", "gw.key", "--out-pub", "gw.pub"],
    );

    // The file, served in the private network.
    let www = d.join("www");
    fs::create_dir_all(&www).unwrap();
    let body: Vec<u8> = (0..FILE_BYTES)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(www.join("big.bin"), &body).unwrap();
    let want = Sha256::digest(&body);
    let http_port = free_tcp();
    let service = format!("{}.11", lab.subnet);
    let _served = Served(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &http_port.to_string(),
                "--bind",
                &service,
            ])
            .arg("--directory")
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("http.server listens", Duration::from_secs(10), || {
        TcpStream::connect((service.as_str(), http_port)).is_ok()
    });

    // The job, with a forward to it.
    let token = lab.token("1", "ci");
    let forward = free_tcp();
    let ci = lab.ci_config_to("ci", &[(forward, &format!("{service}:{http_port}"))]);
    let _down = Down(d.join("ci.sock"));
    let _job = Daemon::start(
        "tern",
        &[
            "up",
            "--config",
            &ci.to_string_lossy(),
            "--enroll-token",
            &token,
        ],
        d.join("ci.log"),
    );
    wait_until("the job reaches the file", Duration::from_secs(20), || {
        get(forward).is_some_and(|r| r.starts_with("HTTP/1.0"))
    });
    let before = peer_not_after(&lab, "ci", "gw");
    assert!(before > 0, "the job knows the gateway");

    // 1. Renewed (same key, a longer life) in the middle of a transfer.
    let got = slow_get(forward, "/big.bin", || {
        // Signed now: a later start than the running one's, so newer (the
        // CA's year-long life bounds the expiry).
        sign_gateway(&lab, "100.64.0.2/10", "4000h", false);
        hup(lab.gateway_pid());
    });
    assert_eq!(got.len(), FILE_BYTES, "the whole file arrived");
    assert_eq!(Sha256::digest(&got), want, "and unchanged");
    wait_until(
        "the gateway says it reloaded",
        Duration::from_secs(10),
        || lab.gateway_log().contains("SIGHUP: certificate reloaded"),
    );
    wait_until(
        "the job holds the renewed certificate",
        Duration::from_secs(10),
        || {
            let now = peer_not_after(&lab, "ci", "gw");
            now != before && now > 0
        },
    );

    // 2. A certificate for another address: refused, the old one stays.
    let renewed = fs::read(d.join("gw.crt")).unwrap();
    sign_gateway(&lab, "100.64.0.99/10", "4000h", false);
    hup(lab.gateway_pid());
    wait_until("the gateway refuses it", Duration::from_secs(10), || {
        lab.gateway_log()
            .contains("new certificate refused, keeping the running one")
    });
    assert!(lab
        .gateway_log()
        .contains("an address change needs a restart"));
    assert!(get(forward).is_some_and(|r| r.starts_with("HTTP/1.0 200")));
    fs::write(d.join("gw.crt"), &renewed).unwrap();

    // 3. A new key: sessions re-keyed, and a whole transfer again.
    sign_gateway(&lab, "100.64.0.2/10", "4000h", true);
    hup(lab.gateway_pid());
    wait_until(
        "the gateway reloads its new key",
        Duration::from_secs(10),
        || lab.gateway_log().contains("new_key=true"),
    );
    let mut whole = Vec::new();
    wait_until(
        "a transfer after the new key",
        Duration::from_secs(20),
        || {
            whole = std::panic::catch_unwind(|| slow_get(forward, "/big.bin", || {}))
                .unwrap_or_default();
            whole.len() == FILE_BYTES
        },
    );
    assert_eq!(Sha256::digest(&whole), want);
}

#[test]
fn a_lighthouse_certificate_replaced_keeps_its_nodes_and_enrollment() {
    let lab = lab_custom("127.84.0", &LabExtra::default());
    let d = lab.dir.path();
    wait_until("the gateway registers", Duration::from_secs(20), || {
        lab.registered().iter().any(|n| n == "gw")
    });
    let lh_pid = lab.lighthouse_status()["pid"].as_u64().unwrap() as u32;
    tern(
        d,
        &["cert", "pubkey", "--key", "lh1.key", "--out-pub", "lh1.pub"],
    );
    let resign = |ip: &str| {
        tern(
            d,
            &[
                "cert",
                "sign",
                "--ca-crt",
                "ca.crt",
                "--ca-key",
                "ca.key",
                "--name",
                "lh1",
                "--ip",
                ip,
                "--groups",
                "lighthouse",
                "--duration",
                "4000h",
                "--in-pub",
                "lh1.pub",
                "--out-crt",
                "lh1.crt",
                "--force",
            ],
        );
    };
    let log = || fs::read_to_string(d.join("lh.log")).unwrap_or_default();

    // Another address: refused, nothing changes.
    let original = fs::read(d.join("lh1.crt")).unwrap();
    resign("100.64.0.77/10");
    hup(lh_pid);
    wait_until("the lighthouse refuses it", Duration::from_secs(10), || {
        log().contains("an address change needs a restart")
    });
    fs::write(d.join("lh1.crt"), &original).unwrap();

    // Renewed: reloaded; the gateway stays registered and learns it; a job
    // still enrolls (enrollment restarted with the new certificate). Peers
    // take a certificate that starts later than the one they hold: sign it
    // a second after the lab's.
    std::thread::sleep(Duration::from_millis(1100));
    resign("100.64.0.1/10");
    hup(lh_pid);
    wait_until("the lighthouse reloads", Duration::from_secs(10), || {
        log().contains("SIGHUP: certificate reloaded")
    });
    let renewed = tern(d, &["cert", "print", "lh1.crt", "--json"]);
    let until = serde_json::from_str::<serde_json::Value>(&renewed).unwrap()["not_after_unix"]
        .as_u64()
        .expect("not_after_unix in tern cert print --json");
    wait_until(
        "the gateway holds the lighthouse's renewed certificate",
        Duration::from_secs(15),
        || {
            lab.node_status("gw")["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == "lh1" && p["cert_not_after"].as_u64() == Some(until))
        },
    );
    assert!(lab.registered().iter().any(|n| n == "gw"));
    let token = lab.token("1", "ci");
    let (_job, forward) = lab.start_job("ci-after", &token);
    assert!(get(forward).is_some_and(|r| r.contains("private hello")));
    let _down = Down(d.join("ci-after.sock"));
}

/// `[pki] renew`: a node whose 45-second certificate the lighthouse's
/// issuer signed asks for a fresh one two thirds into its life, writes it
/// over its file, and keeps talking to a CI job past the first
/// certificate's expiry.
#[test]
fn a_short_certificate_is_renewed_before_it_expires_and_peers_stay() {
    let lab = lab_custom("127.85.0", &LabExtra::default());
    let d = lab.dir.path();
    tern(
        d,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "issuer.crt",
            "--ca-key",
            "issuer.key",
            "--name",
            "ci-renewing",
            "--ip",
            "100.64.100.200/10",
            "--groups",
            "ci",
            "--duration",
            "45s",
            "--out-key",
            "r.key",
            "--out-crt",
            "r.crt",
        ],
    );
    let first = fs::read_to_string(d.join("r.crt")).unwrap();
    let config = d.join("r.toml");
    fs::write(
        &config,
        format!(
            "[pki]\nca = \"ca.crt\"\ncert = \"r.crt\"\nkey = \"r.key\"\nrenew = true\n[listen]\naddr = \"127.0.0.1:{}\"\n\
             [[lighthouses]]\nendpoint = \"127.0.0.1:{}\"\n[tun]\nmode = \"userspace\"\n[api]\nsocket = \"r.sock\"\n",
            tern_tests::free_udp(),
            lab.lh_port
        ),
    )
    .unwrap();
    let started = Instant::now();
    let _down_r = Down(d.join("r.sock"));
    let renewing = Daemon::start(
        "tern",
        &["up", "--config", &config.to_string_lossy()],
        d.join("r.log"),
    );
    let token = lab.token("1", "ci");
    let (_job, _forward) = lab.start_job("ci-job", &token);
    let _down_job = Down(d.join("ci-job.sock"));
    let ping = || {
        Command::new(tern_tests::bin("tern"))
            .args(["ping", "ci-renewing", "-n", "1", "--socket"])
            .arg(d.join("ci-job.sock"))
            .output()
            .unwrap()
            .status
            .success()
    };
    wait_until(
        "the job reaches the renewing node",
        Duration::from_secs(20),
        ping,
    );

    // Two thirds into its 45 s: renewed, written over r.crt (mode 0600).
    wait_until(
        "the certificate is renewed",
        Duration::from_secs(40),
        || {
            renewing
                .log()
                .contains("certificate renewed; every peer re-handshakes with it")
        },
    );
    let second = fs::read_to_string(d.join("r.crt")).unwrap();
    assert_ne!(first, second, "r.crt was replaced");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(d.join("r.crt")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let printed: serde_json::Value =
        serde_json::from_str(&tern(d, &["cert", "print", "r.crt", "--json"])).unwrap();
    let until = printed["not_after_unix"].as_u64().unwrap();

    // Past the first certificate's end, the job still reaches it, and
    // holds the renewed certificate for it.
    let past = Duration::from_secs(47).saturating_sub(started.elapsed());
    std::thread::sleep(past);
    wait_until("the job still reaches it", Duration::from_secs(10), ping);
    let holds = lab.node_status("ci-job")["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["name"] == "ci-renewing" && p["cert_not_after"].as_u64() == Some(until));
    assert!(holds, "the job holds the renewed certificate");
    let lh_log = fs::read_to_string(d.join("lh.log")).unwrap();
    assert!(lh_log.contains("certificate renewed"), "{lh_log}");
}
