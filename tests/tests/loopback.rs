//! Loopback integration tests, no root: a real `tern-lighthouse` process on
//! 127.0.0.1, node cores driven over real UDP sockets in this process, and
//! the CLI's answers to bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use tern_mesh::{Mesh, MeshSettings};
use tern_node_core::node::{LighthouseTarget, NodeCore};
use tern_shared::identity::Identity;
use tern_shared::packet::build_udp_ipv4;
use tern_tests::{free_udp, run, wait_until, Daemon};

fn tern(dir: &Path, args: &[&str]) {
    let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    // Certificate paths are relative to `dir`.
    for a in full.iter_mut() {
        if a.ends_with(".crt") || a.ends_with(".key") || a.ends_with(".pub") {
            *a = dir.join(&*a).to_string_lossy().into_owned();
        }
    }
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let out = run("tern", &full, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pki(dir: &Path) {
    tern(
        dir,
        &[
            "cert",
            "ca",
            "--name",
            "test-ca",
            "--out-crt",
            "ca.crt",
            "--out-key",
            "ca.key",
        ],
    );
    for (name, ip, groups) in [
        ("lh1", "100.64.0.1/10", "lighthouse"),
        ("a", "100.64.0.5/10", "ci"),
        ("b", "100.64.0.6/10", "dev"),
    ] {
        tern(
            dir,
            &[
                "cert",
                "sign",
                "--ca-crt",
                "ca.crt",
                "--ca-key",
                "ca.key",
                "--name",
                name,
                "--ip",
                ip,
                "--groups",
                groups,
                "--out-key",
                &format!("{name}.key"),
                "--out-crt",
                &format!("{name}.crt"),
            ],
        );
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A node core on a real UDP socket, driven by this test.
struct LoopNode {
    core: NodeCore,
    socket: UdpSocket,
    tun: Vec<Vec<u8>>,
}

impl LoopNode {
    fn new(dir: &Path, name: &str, lighthouse: SocketAddr) -> LoopNode {
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        let id = Identity::from_pem(
            &read("ca.crt"),
            &read(&format!("{name}.crt")),
            &read(&format!("{name}.key")),
            unix_now(),
        )
        .unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let now = Instant::now();
        let mesh = Mesh::new(
            id.key.static_secret(),
            &id.cert,
            id.ca,
            MeshSettings {
                seed: socket.local_addr().unwrap().port() as u64,
                ..MeshSettings::default()
            },
            now,
            unix_now(),
        );
        let mut core = NodeCore::new(
            mesh,
            &id.cert,
            vec![LighthouseTarget {
                endpoint: lighthouse,
                name: Some("lh1".into()),
            }],
            now,
        );
        core.set_local_endpoints(vec![socket.local_addr().unwrap()]);
        core.set_policy(&tern_shared::testing::open_firewall(), vec![], &[]);
        LoopNode {
            core,
            socket,
            tun: Vec::new(),
        }
    }

    /// One round: receive what arrived, run timers, send what is queued.
    fn poll(&mut self) {
        let mut buf = vec![0u8; 65_536];
        let mut out = vec![0u8; 65_600];
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            if let Some(p) = self
                .core
                .handle_datagram(from, &buf[..n], &mut out, Instant::now())
            {
                self.tun.push(p.to_vec());
            }
        }
        self.core.handle_timeout(Instant::now());
        while let Some(t) = self.core.poll_transmit() {
            let _ = self.socket.send_to(&t.payload, t.dst);
        }
    }

    fn send_from_tun(&mut self, packet: &[u8]) {
        let mut out = vec![0u8; 65_600];
        if let Some((dst, bytes)) = self
            .core
            .handle_tun_packet(packet, &mut out, Instant::now())
        {
            let _ = self.socket.send_to(bytes, dst);
        }
        while let Some(t) = self.core.poll_transmit() {
            let _ = self.socket.send_to(&t.payload, t.dst);
        }
    }
}

fn lighthouse_status(dir: &Path) -> serde_json::Value {
    let sock = dir.join("lh.sock");
    let out = run(
        "tern-lighthouse",
        &["status", "--socket", &sock.to_string_lossy(), "--json"],
        Duration::from_secs(10),
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// A `tern-lighthouse` on 127.0.0.1 (a free port) with `dir`'s lh1
/// identity and `extra` config, once its API socket is there.
fn start_lighthouse(dir: &Path, extra: &str) -> (Daemon, SocketAddr) {
    let port = free_udp();
    let config = dir.join("lighthouse.toml");
    fs::write(
        &config,
        format!("[pki]\nca = \"ca.crt\"\ncert = \"lh1.crt\"\nkey = \"lh1.key\"\n[listen]\naddr = \"127.0.0.1:{port}\"\n[api]\nsocket = \"lh.sock\"\n{extra}"),
    )
    .unwrap();
    let lh = Daemon::start(
        "tern-lighthouse",
        &["--config", &config.to_string_lossy()],
        dir.join("lh.log"),
    );
    wait_until("lighthouse API socket", Duration::from_secs(10), || {
        dir.join("lh.sock").exists()
    });
    (lh, format!("127.0.0.1:{port}").parse().unwrap())
}

#[test]
fn node_cores_meet_through_a_real_lighthouse_process_on_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let (lh, lh_addr) = start_lighthouse(dir, "[log]\nlevel = \"debug\"\n");

    // Garbage first: the lighthouse counts it and carries on.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    for g in [
        &b"\x00"[..],
        b"\x10\x00\x00\x05hello",
        b"\x01",
        &[4u8; 64],
        &[0x10, 0x80, 0, 0],
    ] {
        junk.send_to(g, lh_addr).unwrap();
    }

    let mut a = LoopNode::new(dir, "a", lh_addr);
    let mut b = LoopNode::new(dir, "b", lh_addr);
    wait_until("both nodes register", Duration::from_secs(10), || {
        a.poll();
        b.poll();
        let s = [a.core.status(), b.core.status()];
        s.iter().all(|s| s.lighthouses[0].registered)
    });
    let st = lighthouse_status(dir);
    let names: Vec<&str> = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["a", "b"], "{st}");
    assert!(
        st["mesh_counters"]["unknown_datagrams"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert!(
        st["mesh_counters"]["malformed_hellos"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert!(
        st["mesh_counters"]["rejected_certs"].as_u64().unwrap() >= 1,
        "{st}"
    );

    let packet = build_udp_ipv4(
        "100.64.0.5".parse().unwrap(),
        "100.64.0.6".parse().unwrap(),
        7,
        9,
        b"over loopback",
    );
    a.send_from_tun(&packet);
    wait_until("b receives a's packet", Duration::from_secs(10), || {
        a.poll();
        b.poll();
        !b.tun.is_empty()
    });
    assert_eq!(b.tun, vec![packet]);
    assert!(lh.log().contains("lighthouse up"));
}

/// Logs a daemon writes to a file are plain text: no ANSI colour codes
/// (those are for a terminal), and values as a person writes them.
#[test]
fn daemon_log_files_carry_no_colour_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let (lh_port, a_port) = (free_udp(), free_udp());
    let lh_config = write(
        dir,
        "lighthouse.toml",
        &format!("[pki]\nca = \"ca.crt\"\ncert = \"lh1.crt\"\nkey = \"lh1.key\"\n[listen]\naddr = \"127.0.0.1:{lh_port}\"\n[api]\nsocket = \"lh.sock\"\n[log]\nlevel = \"debug\"\n"),
    );
    let a_config = write(
        dir,
        "a.toml",
        &format!("[pki]\nca = \"ca.crt\"\ncert = \"a.crt\"\nkey = \"a.key\"\n[listen]\naddr = \"127.0.0.1:{a_port}\"\n[[lighthouses]]\nendpoint = \"127.0.0.1:{lh_port}\"\n[tun]\nmode = \"userspace\"\n[api]\nsocket = \"a.sock\"\n[log]\nlevel = \"debug\"\n"),
    );
    let lh = Daemon::start(
        "tern-lighthouse",
        &["--config", &lh_config],
        dir.join("lh.log"),
    );
    let a = Daemon::start("tern", &["up", "--config", &a_config], dir.join("a.log"));
    wait_until("a registers", Duration::from_secs(20), || {
        a.log().contains("registered with lighthouse")
    });
    for d in [&lh, &a] {
        let log = fs::read(&d.log).unwrap();
        assert!(!log.is_empty());
        assert!(
            !log.contains(&0x1b),
            "ESC in {}:\n{}",
            d.log.display(),
            String::from_utf8_lossy(&log)
        );
    }
    let tunnel_up = a.log();
    let tunnel_up = tunnel_up
        .lines()
        .find(|l| l.contains("tunnel up"))
        .expect("a logs its tunnel to the lighthouse");
    assert!(
        tunnel_up.contains(&format!("endpoint=127.0.0.1:{lh_port}"))
            && !tunnel_up.contains("Some("),
        "{tunnel_up}"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

const NODE_OK: &str = "[pki]\nca = \"ca.crt\"\ncert = \"a.crt\"\nkey = \"a.key\"\n[tun]\nname = \"terntest0\"\n[api]\nsocket = \"a.sock\"\n";

#[test]
fn tern_up_names_the_unknown_key_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = write(
        tmp.path(),
        "bad.toml",
        &format!("{NODE_OK}[listen]\nadress = \"0.0.0.0:4242\"\n"),
    );
    let out = run("tern", &["up", "--config", &bad], Duration::from_secs(10));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("adress") && err.contains("bad.toml"), "{err}");
}

#[test]
fn tern_up_refuses_an_expired_certificate_and_a_wrong_key_before_touching_the_network() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    tern(
        dir,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "old",
            "--ip",
            "100.64.0.9/10",
            "--duration",
            "1s",
            "--out-key",
            "old.key",
            "--out-crt",
            "old.crt",
        ],
    );
    std::thread::sleep(Duration::from_millis(2100));
    let cfg = write(
        dir,
        "old.toml",
        &NODE_OK
            .replace("\"a.crt\"", "\"old.crt\"")
            .replace("\"a.key\"", "\"old.key\""),
    );
    let out = run("tern", &["up", "--config", &cfg], Duration::from_secs(10));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expired") && err.contains("old.crt"), "{err}");

    let cfg = write(
        dir,
        "mixed.toml",
        &NODE_OK.replace("\"a.key\"", "\"b.key\""),
    );
    let out = run("tern", &["up", "--config", &cfg], Duration::from_secs(10));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not hold the key of this certificate"),
        "{err}"
    );
}

/// `[relay]` needs the relay group in the node's certificate: without it,
/// the node says so and does not start.
#[test]
fn tern_up_refuses_relay_without_the_relay_group() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let cfg = write(
        dir,
        "relay.toml",
        &format!(
            "{}[listen]\naddr = \"127.0.0.1:0\"\n[relay]\nenabled = true\n",
            NODE_OK.replace(
                "[tun]\nname = \"terntest0\"\n",
                "[tun]\nmode = \"userspace\"\n"
            )
        ),
    );
    let out = run("tern", &["up", "--config", &cfg], Duration::from_secs(10));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lacks the 'relay' group") && err.contains("--groups relay"),
        "{err}"
    );
}

#[test]
fn lighthouse_without_config_says_how_to_run_it() {
    let out = run("tern-lighthouse", &[], Duration::from_secs(10));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

#[test]
fn status_without_a_daemon_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("nothing.sock");
    let out = run(
        "tern",
        &["status", "--socket", &sock.to_string_lossy()],
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nothing.sock") && err.contains("tern up"),
        "{err}"
    );
}

/// A flood of hellos from one address (127.0.0.2, far over the
/// lighthouse's rate) does not keep a node on another address from
/// joining within its usual time: hellos are admitted per source address.
#[test]
fn a_hello_flood_from_one_address_does_not_keep_another_node_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let (_lh, lh_addr) = start_lighthouse(dir, "");

    // b's hello, valid and asking for an answer, sent from 127.0.0.2 at
    // 20,000 a second (ten times the lighthouse's whole hello rate) for at
    // most 6 s: bounded in count and time.
    let cert = fs::read_to_string(dir.join("b.crt")).unwrap();
    let cert = tern_shared::cert::Cert::from_pem(&cert).unwrap().encode();
    let hello = tern_shared::wire::Hello {
        wants_reply: true,
        cert: &cert,
    }
    .encode();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.2:0").unwrap();
            let start = Instant::now();
            let mut sent = 0u64;
            // Evenly paced (one every 50 us), not in bursts: a burst
            // leaves gaps in which anyone's hello finds a token.
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(6)
                && sent < 120_000
            {
                if start.elapsed() < Duration::from_micros(50 * sent) {
                    std::thread::yield_now();
                    continue;
                }
                let _ = socket.send_to(&hello, lh_addr);
                sent += 1;
            }
            sent
        })
    };
    // Long enough for the flood to drain the lighthouse's whole bucket (2000
    // deep) even when the lighthouse is slower than the flood.
    std::thread::sleep(Duration::from_millis(1500));

    let started = Instant::now();
    let mut a = LoopNode::new(dir, "a", lh_addr);
    wait_until(
        "a registers during the flood",
        Duration::from_secs(3),
        || {
            a.poll();
            a.core.status().lighthouses[0].registered
        },
    );
    let joined = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    let st = lighthouse_status(dir);
    let limited = st["mesh_counters"]["rate_limited"].as_u64().unwrap();
    assert!(
        limited >= sent / 2,
        "the flood met the limit: {limited} of {sent} limited"
    );
    eprintln!("a joined {joined:?} into a flood of {sent} hellos ({limited} limited)");
}
