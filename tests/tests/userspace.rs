//! Userspace mode on loopback, no root: real `tern-lighthouse` and `tern up
//! --userspace` processes, a gateway in front of "private" servers on
//! 127.77.0.10 (python's http.server, a UDP echo server), and real clients
//! (curl) reaching them through `[[forwards]]`, SOCKS5 and HTTP CONNECT.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tern_tests::{bin, free_tcp_ports, free_udp, run, wait_until, Daemon};

const PRIVATE: &str = "127.77.0.10";

/// One lab at a time: they are CPU-heavy, and the ports are picked free.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tools these tests drive; without them the test is skipped, except under
/// `CI=true`, where it fails.
fn have(tools: &[&str], test: &str) -> bool {
    let missing: Vec<&&str> = tools
        .iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: missing {missing:?} in CI"
    );
    eprintln!("{test}: skipped, missing {missing:?}");
    false
}

fn tern(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new(bin("tern"));
    cmd.current_dir(dir).args(args);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sign(dir: &Path, name: &str, ip: &str, extra: &[&str]) {
    let mut args = vec![
        "cert", "sign", "--ca-crt", "ca.crt", "--ca-key", "ca.key", "--name", name, "--ip", ip,
    ];
    args.extend_from_slice(extra);
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    args.extend_from_slice(&["--out-key", &key, "--out-crt", &crt]);
    tern(dir, &args);
}

fn node_config(name: &str, port: u16, lh: u16, extra: &str) -> String {
    format!(
        "[pki]\nca = \"ca.crt\"\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\n[listen]\naddr = \"127.0.0.1:{port}\"\n\
         [[lighthouses]]\nendpoint = \"127.0.0.1:{lh}\"\n[tun]\nmode = \"userspace\"\n[api]\nsocket = \"{name}.sock\"\n\
         [log]\nlevel = \"debug\"\n{extra}"
    )
}

/// A lighthouse, a userspace gateway routing 127.77.0.0/24 and a userspace
/// client with a forward, SOCKS5 and HTTP CONNECT; python's http.server on
/// 127.77.0.10 serving a 50 MB file, a UDP echo server, and a TCP server on
/// a port the gateway's firewall rejects.
struct Lab {
    dir: tempfile::TempDir,
    http: u16,
    udp: u16,
    denied: u16,
    closed: u16,
    forward: u16,
    socks: u16,
    proxy: u16,
    _daemons: Vec<Daemon>,
    _server: Daemon2,
}

/// python's http.server, killed on drop.
struct Daemon2(std::process::Child);

impl Drop for Daemon2 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Lab {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }
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
            "ca",
            "--out-crt",
            "ca.crt",
            "--out-key",
            "ca.key",
        ],
    );
    sign(d, "lh1", "100.64.0.1/10", &["--groups", "lighthouse"]);
    sign(d, "gw", "100.64.0.2/10", &["--subnets", "127.77.0.0/24"]);
    sign(d, "client", "100.64.0.3/10", &["--groups", "ci"]);
    let (lh, gw, client) = (free_udp(), free_udp(), free_udp());
    // All different: a "closed" port that happened to be the HTTP server's
    // would not be refused.
    let [http, denied, closed, forward, socks, proxy] = free_tcp_ports();
    let udp = free_udp();

    // The private servers.
    let www = d.join("www");
    fs::create_dir_all(&www).unwrap();
    let blob: Vec<u8> = (0..50_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    fs::write(www.join("blob"), &blob).unwrap();
    let server = Command::new("python3")
        .args(["-m", "http.server", &http.to_string(), "--bind", PRIVATE])
        .current_dir(&www)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Daemon2(server);
    let echo = UdpSocket::bind((PRIVATE, udp)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        // Ends with the test process.
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = echo.send_to(&reply, from);
        }
    });
    let refused_by_firewall = TcpListener::bind((PRIVATE, denied)).unwrap();
    std::thread::spawn(move || {
        // Accepts (and drops) whatever would get through: nothing should.
        for s in refused_by_firewall.incoming().flatten() {
            drop(s);
        }
    });

    fs::write(
        d.join("lh.toml"),
        format!("[pki]\nca = \"ca.crt\"\ncert = \"lh1.crt\"\nkey = \"lh1.key\"\n[listen]\naddr = \"127.0.0.1:{lh}\"\n[api]\nsocket = \"lh.sock\"\n"),
    )
    .unwrap();
    fs::write(
        d.join("gw.toml"),
        node_config(
            "gw",
            gw,
            lh,
            &format!(
                "[gateway]\nsubnets = [\"127.77.0.0/24\"]\n\
                 [[firewall.inbound]]\nproto = \"tcp\"\nport = \"{http}\"\nlocal_cidr = \"127.77.0.0/24\"\ngroups = [\"ci\"]\n\
                 [[firewall.inbound]]\nproto = \"tcp\"\nport = \"{closed}\"\nlocal_cidr = \"127.77.0.0/24\"\n\
                 [[firewall.inbound]]\nproto = \"udp\"\nport = \"{udp}\"\nlocal_cidr = \"127.77.0.0/24\"\n\
                 [[firewall.inbound]]\nproto = \"tcp\"\nport = \"{denied}\"\nlocal_cidr = \"127.77.0.0/24\"\naction = \"reject\"\n"
            ),
        ),
    )
    .unwrap();
    fs::write(
        d.join("client.toml"),
        node_config(
            "client",
            client,
            lh,
            &format!(
                "[proxy]\nsocks5 = \"127.0.0.1:{socks}\"\nhttp = \"127.0.0.1:{proxy}\"\n\
                 [[forwards]]\nlisten = \"127.0.0.1:{forward}\"\ntarget = \"{PRIVATE}:{http}\"\n"
            ),
        ),
    )
    .unwrap();
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
        Daemon::start(
            "tern",
            &["up", "--config", &d.join("client.toml").to_string_lossy()],
            d.join("client.log"),
        ),
    ];
    let lab = Lab {
        dir,
        http,
        udp,
        denied,
        closed,
        forward,
        socks,
        proxy,
        _daemons: daemons,
        _server: server,
    };
    wait_until(
        "the client learns the gateway's route",
        Duration::from_secs(20),
        || {
            status(&lab, "client")["routes"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["subnet"] == "127.77.0.0/24"))
        },
    );
    wait_until(
        "the private web server answers",
        Duration::from_secs(10),
        || TcpStream::connect((PRIVATE, http)).is_ok(),
    );
    lab
}

fn status(lab: &Lab, node: &str) -> serde_json::Value {
    let sock = lab.file(&format!("{node}.sock"));
    let out = run(
        "tern",
        &["status", "--socket", &sock.to_string_lossy(), "--json"],
        Duration::from_secs(10),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn curl(lab: &Lab, args: &[&str], out: &str) -> String {
    let o = Command::new("curl")
        .args(["-s", "--max-time", "60", "-o"])
        .arg(lab.file(out))
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn curl_through_a_forward_socks5_and_http_connect_gets_50_mb_intact() {
    let test = "userspace_50mb";
    if !have(&["curl", "python3", "sha256sum"], test) {
        return;
    }
    let _serial = serial();
    let lab = lab();
    let want = sha256(&lab.path().join("www/blob"));
    let url = format!("http://{PRIVATE}:{}/blob", lab.http);
    // Through the forward: the local port is the private service.
    let code = curl(
        &lab,
        &[&format!("http://127.0.0.1:{}/blob", lab.forward)],
        "via-forward",
    );
    assert_eq!(code, "200");
    assert_eq!(sha256(&lab.file("via-forward")), want, "forward");
    // Through SOCKS5, and through the HTTP CONNECT proxy.
    let code = curl(
        &lab,
        &["--socks5", &format!("127.0.0.1:{}", lab.socks), &url],
        "via-socks",
    );
    assert_eq!(code, "200");
    assert_eq!(sha256(&lab.file("via-socks")), want, "socks5");
    let code = curl(
        &lab,
        &["-p", "-x", &format!("http://127.0.0.1:{}", lab.proxy), &url],
        "via-connect",
    );
    assert_eq!(code, "200");
    assert_eq!(sha256(&lab.file("via-connect")), want, "http connect");
}

/// A SOCKS5 client by hand: greeting, then one request; the reply code.
fn socks_request(port: u16, command: u8, target: (Ipv4Addr, u16)) -> (TcpStream, u8, SocketAddr) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut g = [0u8; 2];
    s.read_exact(&mut g).unwrap();
    assert_eq!(g, [5, 0], "no authentication accepted");
    let mut req = vec![5, command, 0, 1];
    req.extend_from_slice(&target.0.octets());
    req.extend_from_slice(&target.1.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    let bound = SocketAddr::from((
        Ipv4Addr::new(reply[4], reply[5], reply[6], reply[7]),
        u16::from_be_bytes([reply[8], reply[9]]),
    ));
    (s, reply[1], bound)
}

#[test]
fn udp_goes_through_socks5_udp_associate_to_an_echo_server() {
    let test = "userspace_udp";
    if !have(&["python3"], test) {
        return;
    }
    let _serial = serial();
    let lab = lab();
    let private: Ipv4Addr = PRIVATE.parse().unwrap();
    let (_control, code, relay) = socks_request(lab.socks, 3, (Ipv4Addr::UNSPECIFIED, 0));
    assert_eq!(code, 0, "UDP ASSOCIATE granted");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = Vec::new();
    for i in 0..5 {
        let payload = format!("datagram {i}");
        let mut d = vec![0, 0, 0, 1];
        d.extend_from_slice(&private.octets());
        d.extend_from_slice(&lab.udp.to_be_bytes());
        d.extend_from_slice(payload.as_bytes());
        udp.send_to(&d, relay).unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((n, _)) = udp.recv_from(&mut buf) {
            assert_eq!(&buf[..4], &[0, 0, 0, 1]);
            assert_eq!(&buf[4..8], &private.octets(), "the answer's source");
            assert_eq!(u16::from_be_bytes([buf[8], buf[9]]), lab.udp);
            got.push(String::from_utf8_lossy(&buf[10..n]).into_owned());
        }
    }
    // The first datagram may wait for the path; the rest come back.
    assert!(got.len() >= 4, "{got:?}");
    assert!(
        got.iter().all(|g| g.starts_with("echo:datagram ")),
        "{got:?}"
    );
}

#[test]
fn refusals_come_back_quickly_and_the_firewall_rejects_as_in_tun_mode() {
    let test = "userspace_refusals";
    if !have(&["python3"], test) {
        return;
    }
    let _serial = serial();
    let lab = lab();
    let private: Ipv4Addr = PRIVATE.parse().unwrap();
    // Warm the path up, so the timings below are the refusals' own.
    let (_s, code, _) = socks_request(lab.socks, 1, (private, lab.http));
    assert_eq!(code, 0);
    // Nothing listens there: the gateway's dial is refused, the client gets
    // a RST, and SOCKS5 says "connection refused" (5).
    let start = Instant::now();
    let (_s, code, _) = socks_request(lab.socks, 1, (private, lab.closed));
    assert_eq!(code, 5, "connection refused");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // A server listens, but the gateway's firewall rejects the port.
    let before = status(&lab, "gw")["firewall"]["denied"].to_string();
    let start = Instant::now();
    let (_s, code, _) = socks_request(lab.socks, 1, (private, lab.denied));
    assert_eq!(code, 5, "rejected by the firewall");
    assert!(start.elapsed() < Duration::from_secs(2));
    let after = status(&lab, "gw")["firewall"]["denied"].to_string();
    assert!(
        after.contains("reject") && after != before,
        "{before} → {after}"
    );
    // An address no gateway routes: "network unreachable" (3), at once.
    let (_s, code, _) = socks_request(lab.socks, 1, (Ipv4Addr::new(127, 66, 0, 1), 80));
    assert_eq!(code, 3);
    // Through HTTP CONNECT the firewall's refusal says why, in the body:
    // which peer, which rule.
    let mut s = TcpStream::connect(("127.0.0.1", lab.proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "CONNECT {private}:{} HTTP/1.1\r\nHost: x\r\n\r\n",
        lab.denied
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden"), "{answer}");
    assert!(
        answer.contains("is denied by policy: gw's inbound rule-"),
        "{answer}"
    );
}

#[test]
fn bad_input_is_refused_clearly_and_the_node_keeps_working() {
    let test = "userspace_bad_input";
    if !have(&["python3"], test) {
        return;
    }
    let _serial = serial();
    let lab = lab();
    // Garbage at the SOCKS5 port: the connection is dropped, nothing else.
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[5, 0][..],
        &[5, 1, 0, 5, 9, 9, 9][..],
        &[4, 1, 0, 80, 1, 2, 3, 4, 0][..],
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", lab.socks)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(garbage);
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
    }
    let (_s, code, _) = socks_request(lab.socks, 1, (PRIVATE.parse().unwrap(), lab.http));
    assert_eq!(code, 0, "still serving after garbage");
    // A bad CONNECT head gets a 400.
    let mut s = TcpStream::connect(("127.0.0.1", lab.proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT nowhere HTTP/1.1\r\n\r\n").unwrap();
    let mut head = String::new();
    let _ = s.read_to_string(&mut head);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // tern forward: a target no gateway routes, and a local port in use.
    let sock = lab.file("client.sock");
    let sock = sock.to_string_lossy();
    let out = run(
        "tern",
        &["forward", "--socket", &sock, "127.0.0.1:1=127.66.0.10:80"],
        Duration::from_secs(10),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("127.66.0.10 is in no subnet a gateway routes")
            && err.contains("127.77.0.0/24"),
        "{err}"
    );
    let out = run(
        "tern",
        &[
            "forward",
            "--socket",
            &sock,
            &format!("127.0.0.1:{}={PRIVATE}:{}", lab.forward, lab.http),
        ],
        Duration::from_secs(10),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already in use"), "{err}");
    let out = run(
        "tern",
        &["forward", "--socket", &sock, "0.0.0.0:1=127.77.0.10:80"],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
    // A daemon whose forward's port is taken does not start, and says why.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = fs::read_to_string(lab.file("client.toml")).unwrap();
    let udp_line = text
        .lines()
        .find(|l| l.starts_with("addr = "))
        .unwrap()
        .to_string();
    let text = text
        .replace(&udp_line, &format!("addr = \"127.0.0.1:{}\"", free_udp()))
        .replace(
            &format!("listen = \"127.0.0.1:{}\"", lab.forward),
            &format!("listen = \"127.0.0.1:{port}\""),
        )
        .replace("socket = \"client.sock\"", "socket = \"client2.sock\"")
        .replace(&format!("socks5 = \"127.0.0.1:{}\"\n", lab.socks), "")
        .replace(&format!("http = \"127.0.0.1:{}\"\n", lab.proxy), "");
    fs::write(lab.file("client2.toml"), text).unwrap();
    let out = run(
        "tern",
        &[
            "up",
            "--config",
            &lab.file("client2.toml").to_string_lossy(),
        ],
        Duration::from_secs(10),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("127.0.0.1:{port} is already in use")),
        "{err}"
    );
    drop(taken);
}

#[test]
fn a_pipeline_runs_on_a_userspace_runner_from_a_userspace_client() {
    let test = "userspace_runner";
    if !have(&["python3", "bash"], test) {
        return;
    }
    let _serial = serial();
    let lab = lab();
    let d = lab.path();
    sign(d, "runner", "100.64.0.4/10", &["--groups", "runner"]);
    let lh_port = fs::read_to_string(lab.file("lh.toml"))
        .unwrap()
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|p| p.split('"').next())
        .unwrap()
        .to_string();
    fs::write(
        d.join("runner.toml"),
        node_config(
            "runner",
            free_udp(),
            lh_port.parse().unwrap(),
            "[[firewall.inbound]]\nproto = \"tcp\"\nport = 4245\n[runner]\nlabels = [\"linux\"]\nallow_groups = [\"ci\"]\nwork_dir = \"jobs\"\naudit_log = \"audit.jsonl\"\n",
        ),
    )
    .unwrap();
    let _runner = Daemon::start(
        "tern",
        &["up", "--config", &d.join("runner.toml").to_string_lossy()],
        d.join("runner.log"),
    );
    fs::write(
        d.join("p.toml"),
        "name = \"p\"\n[[steps]]\nname = \"hello\"\nrun = \"echo hello from $TERN_RUNNER for $TERN_CALLER\"\n[[steps]]\nname = \"fail\"\nrun = \"echo failing; exit 3\"\n",
    )
    .unwrap();
    let sock = lab.file("client.sock");
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Command::new(bin("tern"))
            .current_dir(d)
            .args(["run", "p.toml", "--on", "linux", "--socket"])
            .arg(&sock)
            .env_remove("GITHUB_ACTIONS")
            .output()
            .unwrap();
        last = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.code() == Some(69) {
            std::thread::sleep(Duration::from_millis(500)); // not advertised yet
            continue;
        }
        assert_eq!(out.status.code(), Some(3), "{last}");
        assert!(
            last.contains("[hello] hello from runner for client"),
            "{last}"
        );
        assert!(last.contains("[fail] failing"), "{last}");
        // The lighthouse knows the runner's newest job (the admin console
        // and API show it): who ran which pipeline, and how it ended.
        let mut runners = serde_json::Value::Null;
        tern_tests::wait_until("the runner told its job", Duration::from_secs(10), || {
            runners = tern_tests::admin_get(&lab.file("lh.sock"), "/api/v1/runners");
            runners["items"][0]["jobs"][0]["state"] == "failed"
        });
        let job = &runners["items"][0]["jobs"][0];
        assert_eq!(job["caller"], "client", "{runners}");
        assert_eq!(job["pipeline"], "p", "{runners}");
        assert_eq!(job["exit_code"], 3, "{runners}");
        assert!(
            job["ended"].as_u64() >= job["started"].as_u64(),
            "{runners}"
        );
        return;
    }
    panic!("the runner was never found: {last}");
}

#[test]
fn tern_demo_runs_to_completion_and_leaves_nothing_behind() {
    let test = "tern_demo";
    if !have(&["bash"], test) {
        return;
    }
    let _serial = serial();
    let out = run("tern", &["demo"], Duration::from_secs(120));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("hello from the private service at 127.77.0.10"),
        "{stdout}"
    );
    assert!(stdout.contains("[hello] hello from runner"), "{stdout}");
    assert!(stdout.contains("[count] tick 3"), "{stdout}");
    let dir = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("cleaned up: ")
                .and_then(|r| r.split("removed ").nth(1))
        })
        .unwrap_or_else(|| panic!("no cleanup line: {stdout}"));
    assert!(!Path::new(dir.trim()).exists(), "{dir} removed");
}
