//! Enrollment on loopback, no root: a lighthouse with an issuer, tokens from
//! `tern-lighthouse token create`, and CI nodes that join with `tern up
//! --userspace --enroll-token` and nothing but the CA on disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_tests::{bin, run, wait_until, Daemon};

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tern(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin("tern"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A root CA, a lighthouse with an issuer for 100.64.100.0/24 (groups ci,
/// deploy; names ci-*; at most 1 h), and a userspace gateway into
/// 127.78.0.0/24 that lets group ci reach an HTTP server there.
struct Lab {
    dir: tempfile::TempDir,
    lh_port: u16,
    http_port: u16,
    _daemons: Vec<Daemon>,
    _http: std::thread::JoinHandle<()>,
}

fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tern(
        d,
        &[
            "cert",
            "ca",
            "--name",
            "root",
            "--out-crt",
            "ca.crt",
            "--out-key",
            "ca.key",
        ],
    );
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
            "100.64.0.1/10",
            "--groups",
            "lighthouse",
            "--out-key",
            "lh1.key",
            "--out-crt",
            "lh1.crt",
        ],
    );
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
            "gw",
            "--ip",
            "100.64.0.2/10",
            "--subnets",
            "127.78.0.0/24",
            "--out-key",
            "gw.key",
            "--out-crt",
            "gw.crt",
        ],
    );
    tern(
        d,
        &[
            "cert",
            "sign",
            "--issuer",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "lh-issuer",
            "--ips",
            "100.64.100.0/24",
            "--groups",
            "ci,deploy",
            "--max-duration",
            "1h",
            "--out-key",
            "issuer.key",
            "--out-crt",
            "issuer.crt",
        ],
    );
    let (lh_port, gw_port, http_port) = (free_udp(), free_udp(), free_tcp());
    fs::write(
        d.join("lh.toml"),
        format!(
            "[pki]\nca = \"ca.crt\"\ncert = \"lh1.crt\"\nkey = \"lh1.key\"\n[listen]\naddr = \"127.0.0.1:{lh_port}\"\n[api]\nsocket = \"lh.sock\"\n[enroll]\nissuer_cert = \"issuer.crt\"\nissuer_key = \"issuer.key\"\n"
        ),
    )
    .unwrap();
    fs::write(
        d.join("gw.toml"),
        format!(
            "[pki]\nca = \"ca.crt\"\ncert = \"gw.crt\"\nkey = \"gw.key\"\n[listen]\naddr = \"127.0.0.1:{gw_port}\"\n[[lighthouses]]\nendpoint = \"127.0.0.1:{lh_port}\"\n[tun]\nmode = \"userspace\"\n[api]\nsocket = \"gw.sock\"\n[gateway]\nsubnets = [\"127.78.0.0/24\"]\n[[firewall.inbound]]\nproto = \"tcp\"\nlocal_cidr = \"127.78.0.0/24\"\ngroups = [\"ci\"]\n"
        ),
    )
    .unwrap();
    // The private service: answers every connection with one line.
    let server = TcpListener::bind(("127.78.0.10", http_port)).unwrap();
    let http = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in server.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body = "private hello\n";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let daemons = vec![
        Daemon::start(
            "tern-lighthouse",
            &["--config", &d.join("lh.toml").to_string_lossy()],
            d.join("lh.log"),
        ),
        Daemon::start(
            "tern",
            &["up", "--config", &d.join("gw.toml").to_string_lossy()],
            d.join("gw.log"),
        ),
    ];
    Lab {
        dir,
        lh_port,
        http_port,
        _daemons: daemons,
        _http: http,
    }
}

impl Lab {
    fn token(&self, uses: &str, groups: &str) -> String {
        let out = run(
            "tern-lighthouse",
            &[
                "token",
                "create",
                "--config",
                &self.dir.path().join("lh.toml").to_string_lossy(),
                "--groups",
                groups,
                "--ttl",
                "1h",
                "--uses",
                uses,
                "--cert-ttl",
                "30m",
            ],
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            token.starts_with("tern1_") && !token.contains('\n'),
            "alone on stdout: {token:?}"
        );
        token
    }

    /// A CI node's config: the CA only, a forward to the private service.
    fn ci_config(&self, name: &str, forward: u16) -> std::path::PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        fs::write(
            &path,
            format!(
                "[pki]\nca = \"ca.crt\"\n[listen]\naddr = \"127.0.0.1:{}\"\n[[lighthouses]]\nendpoint = \"127.0.0.1:{}\"\n[tun]\nmode = \"userspace\"\n[api]\nsocket = \"{name}.sock\"\n[[forwards]]\nlisten = \"127.0.0.1:{forward}\"\ntarget = \"127.78.0.10:{}\"\n",
                free_udp(), self.lh_port, self.http_port
            ),
        )
        .unwrap();
        path
    }
}

fn get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn a_ci_node_enrolls_with_a_token_reaches_the_private_service_and_the_token_is_spent() {
    let lab = lab();
    let token = lab.token("1", "ci");
    let forward = free_tcp();
    let config = lab.ci_config("job", forward);
    let started = Instant::now();
    let job = Daemon::start(
        "tern",
        &[
            "up",
            "--config",
            &config.to_string_lossy(),
            "--enroll-token",
            &token,
        ],
        lab.dir.path().join("job.log"),
    );
    wait_until(
        "the job reaches the private service",
        Duration::from_secs(20),
        || get(forward).is_some_and(|r| r.contains("private hello")),
    );
    eprintln!(
        "enrolled and through the gateway in {:?}",
        started.elapsed()
    );
    let log = job.log();
    assert!(log.contains("enrolled") && log.contains("ci-"), "{log}");
    // Nothing but the CA and configs on disk: no key was written.
    let keys: Vec<_> = fs::read_dir(lab.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ci-"))
        .collect();
    assert!(keys.is_empty(), "{keys:?}");
    // The token is spent: a second node is refused, exit 77, saying why.
    let again = run(
        "tern",
        &[
            "up",
            "--config",
            &lab.ci_config("job2", free_tcp()).to_string_lossy(),
            "--enroll-token",
            &token,
        ],
        Duration::from_secs(20),
    );
    assert_eq!(
        again.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("used up"));
}

#[test]
fn two_nodes_racing_with_one_single_use_token_get_one_certificate() {
    let lab = lab();
    let token = lab.token("1", "ci");
    let racers: Vec<_> = (0..2)
        .map(|i| {
            let config = lab.ci_config(&format!("racer{i}"), free_tcp());
            Command::new(bin("tern"))
                .args([
                    "up",
                    "--config",
                    &config.to_string_lossy(),
                    "--enroll-token",
                    &token,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    let mut refused = 0;
    let mut running = 0;
    for mut r in racers {
        match r.try_wait().unwrap() {
            Some(status) => {
                assert_eq!(status.code(), Some(77));
                refused += 1;
            }
            None => {
                running += 1;
                let _ = r.kill();
            }
        }
        let _ = r.wait();
    }
    assert_eq!((running, refused), (1, 1));
}

#[test]
fn enrollment_failures_have_their_own_exit_codes() {
    let lab = lab();
    // A token the lighthouse never made.
    let bogus = run(
        "tern",
        &[
            "up",
            "--config",
            &lab.ci_config("bogus", free_tcp()).to_string_lossy(),
            "--enroll-token",
            "tern1_0000",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(bogus.status.code(), Some(77));
    assert!(String::from_utf8_lossy(&bogus.stderr).contains("unknown"));
    // A token granting a group the issuer may not sign.
    let db = lab.token("1", "db");
    let out = run(
        "tern",
        &[
            "up",
            "--config",
            &lab.ci_config("db", free_tcp()).to_string_lossy(),
            "--enroll-token",
            &db,
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(77));
    // No lighthouse answers: 69.
    let config = lab.ci_config("lost", free_tcp());
    let text = fs::read_to_string(&config).unwrap().replace(
        &format!(":{}\"", lab.lh_port),
        &format!(":{}\"", free_udp()),
    );
    fs::write(&config, text).unwrap();
    let lost = run(
        "tern",
        &[
            "up",
            "--config",
            &config.to_string_lossy(),
            "--enroll-token",
            "x",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(
        lost.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&lost.stderr)
    );
    // A config with only the CA but no token says how to enroll.
    let none = run(
        "tern",
        &[
            "up",
            "--config",
            &lab.ci_config("none", free_tcp()).to_string_lossy(),
        ],
        Duration::from_secs(10),
    );
    assert!(String::from_utf8_lossy(&none.stderr).contains("--enroll-token"));
}

#[test]
fn the_readiness_gate_returns_once_the_target_answers_and_tern_down_leaves() {
    let lab = lab();
    let token = lab.token("3", "ci");
    let forward = free_tcp();
    let config = lab.ci_config("gated", forward);
    let sock = lab.dir.path().join("gated.sock");
    // If anything below fails, the background node is stopped all the same.
    let _down = Down(sock.clone());
    let started = Instant::now();
    let out = run(
        "tern",
        &[
            "up",
            "--config",
            &config.to_string_lossy(),
            "--enroll-token",
            &token,
            "--wait-for",
            &format!("127.78.0.10:{}", lab.http_port),
            "--wait-timeout",
            "20s",
            "--log-file",
            &lab.dir.path().join("gated.log").to_string_lossy(),
        ],
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ready: 127.78.0.10:"), "{stdout}");
    eprintln!(
        "tern up --enroll-token --wait-for returned after {:?}",
        started.elapsed()
    );
    // Ready means ready: the first try goes through.
    assert!(get(forward).is_some_and(|r| r.contains("private hello")));
    // tern down: the node leaves, and the lighthouse forgets it at once.
    let down = run(
        "tern",
        &["down", "--socket", &sock.to_string_lossy()],
        Duration::from_secs(20),
    );
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!sock.exists());
    let lh_sock = lab.dir.path().join("lh.sock");
    wait_until(
        "the lighthouse forgets the job",
        Duration::from_secs(5),
        || {
            let out = run(
                "tern-lighthouse",
                &["status", "--socket", &lh_sock.to_string_lossy(), "--json"],
                Duration::from_secs(5),
            );
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            status["nodes"].as_array().is_some_and(|n| {
                n.iter()
                    .all(|n| !n["name"].as_str().unwrap_or("").starts_with("ci-"))
            })
        },
    );
    // Each way of not being ready has its code.
    for (target, code) in [
        ("127.66.0.1:80".to_string(), 68),
        (format!("127.78.0.10:{}", free_tcp()), 70),
    ] {
        let config = lab.ci_config(&format!("gate{code}"), free_tcp());
        let out = run(
            "tern",
            &[
                "up",
                "--config",
                &config.to_string_lossy(),
                "--enroll-token",
                &token,
                "--wait-for",
                &target,
                "--wait-timeout",
                "3s",
            ],
            Duration::from_secs(30),
        );
        assert_eq!(
            out.status.code(),
            Some(code),
            "{target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `tern down` on the node behind this API socket when dropped.
struct Down(std::path::PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = Command::new(bin("tern"))
                .args(["down", "--socket"])
                .arg(&self.0)
                .output();
        }
    }
}
