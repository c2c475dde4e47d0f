//! `handshake-flood`: what a flood of WireGuard handshake initiations from
//! many addresses costs a Tern daemon, on real kernels (root; iperf3, ping,
//! iptables, getconf). For node `a`, then the lighthouse, each in a flat lab
//! built afresh with a flooder's namespace on the same wan: TCP b→a idle,
//! during a flood at a closed port (the control) and at Tern's port; how
//! soon a node started during the flood connects, against one started
//! before; the target's CPU, memory and counters; whether cookies engage.
//!
//! ```text
//! sudo target/release/handshake-flood [--seconds S] [--sources N] [--write]
//! ```
//!
//! The same binary is the flooder, run in the flooder's namespace:
//! `handshake-flood flood --target IP:PORT --key HEX --sources-from IP
//! --sources N --seconds S [--stop-file PATH]` prints one JSON line of what
//! it sent and got back. `--write` replaces the section in BENCHMARKS.md.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::PublicKey;
use serde_json::{json, Value};
use tern_netns_tests::report::{
    iperf_gbps, machine_line, number, proc_cpu_seconds, proc_status_kb, udp_rcvbuf_errors,
    write_section,
};
use tern_netns_tests::tern::{
    flat_lab, make_ca_and_lighthouse, node_config_text, pings, sign, start_lighthouse, start_node,
    wait_registered, write_file, write_lighthouse_config, FlatLab, LH_UNDERLAY,
};
use tern_netns_tests::{require_root, require_tools, wait_until, workspace_bin, Lab, Ns, Proc};
use tern_shared::cert::Cert;
use tern_shared::keys::NodeSecretKey;

const A_OVERLAY: &str = "100.64.0.5";
const FLOODER_UNDERLAY: &str = "198.18.0.9";
/// The flood's source addresses: local to the flooder's namespace (a
/// `local` route on `lo`), routed there by the other namespaces.
const FLOOD_SOURCES_NET: &str = "198.18.128.0/20";
const FLOOD_SOURCES_FROM: &str = "198.18.128.1";
/// The addresses from [`FLOOD_SOURCES_FROM`] to the end of the /20.
const MAX_SOURCES: usize = 4094;
const TERN_PORT: u16 = 4242;
/// A port of the target's namespace nobody listens on (the control flood).
const CLOSED_PORT: u16 = 4343;
/// The flood replays [`POOL_SIZE`] initiations from this many keys no
/// certificate carries, each initiation with its own ephemeral key.
const POOL_KEYS: usize = 8;
const POOL_SIZE: usize = 512;
/// Longest a new peer is waited for.
const PATIENCE: Duration = Duration::from_secs(60);
/// Bound on each status query (a flooded daemon may answer slowly).
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// The new peer's pings, one every this many milliseconds.
const PING_EVERY_MS: f64 = 10.0;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("flood") {
        flooder_main()
    } else {
        bench_main()
    }
}

/// The flooder's arguments (`handshake-flood flood ...`).
struct FloodArgs {
    target: SocketAddr,
    key: [u8; 32],
    sources_from: Ipv4Addr,
    sources: usize,
    seconds: u64,
    /// Ends the flood early once this file exists.
    stop_file: Option<PathBuf>,
}

/// The value after `name` in `args`, parsed.
fn flag<T: FromStr>(args: &[String], name: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let at = args.iter().position(|a| a == name);
    let value = at
        .and_then(|at| args.get(at + 1))
        .ok_or_else(|| format!("{name} and its value are required"))?;
    value.parse().map_err(|e| format!("{name} {value:?}: {e}"))
}

fn parse_flood_args(args: &[String]) -> Result<FloodArgs, String> {
    let args = FloodArgs {
        target: flag(args, "--target")?,
        key: hex_key(&flag::<String>(args, "--key")?)?,
        sources_from: flag(args, "--sources-from")?,
        sources: flag(args, "--sources")?,
        seconds: flag(args, "--seconds")?,
        stop_file: flag(args, "--stop-file").ok(),
    };
    if !(1..=MAX_SOURCES).contains(&args.sources) || !(1..=600).contains(&args.seconds) {
        return Err(format!("--sources takes 1-{MAX_SOURCES}, --seconds 1-600"));
    }
    Ok(args)
}

/// 32 bytes from 64 hex digits.
fn hex_key(text: &str) -> Result<[u8; 32], String> {
    let bad = || format!("--key {text:?} is not 64 hex digits");
    if text.len() != 64 || !text.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(key)
}

/// Real initiations to `key` (MAC1 valid, no MAC2), a fresh ephemeral key
/// in each: each one admitted costs the target a Diffie-Hellman. Nothing
/// before a peer's own session checks for replays: they can be resent.
fn initiation_pool(key: [u8; 32]) -> Result<Vec<Vec<u8>>, String> {
    let target = PublicKey::from(key);
    let mut buf = vec![0u8; 256];
    let mut pool = Vec::with_capacity(POOL_SIZE);
    for k in 0..POOL_KEYS {
        let secret = NodeSecretKey::generate().static_secret();
        let mut tunn = Tunn::new(secret, target, None, None, k as u32, None);
        for _ in 0..POOL_SIZE / POOL_KEYS {
            match tunn.format_handshake_initiation(&mut buf, true) {
                TunnResult::WriteToNetwork(init) => pool.push(init.to_vec()),
                _ => return Err("boringtun formatted no handshake initiation".into()),
            }
        }
    }
    Ok(pool)
}

/// Reads what waits on every socket (at most 64 datagrams each) and counts
/// it: cookie replies (64 bytes, type 3), hellos (0x10) and anything else.
fn drain(sockets: &[UdpSocket], buf: &mut [u8], counts: &mut [u64; 3]) {
    for sock in sockets {
        for _ in 0..64 {
            let Ok(n) = sock.recv(buf) else { break };
            let kind = match buf[..n].first() {
                Some(3) if n == 64 => 0,
                Some(0x10) => 1,
                _ => 2,
            };
            counts[kind] += 1;
        }
    }
}

/// Sends the pool round-robin from `sources` addresses until `seconds` pass
/// (or the stop file appears), reading the answers every few thousand
/// sends and whenever a send fails; returns the report line.
fn flood(args: &FloodArgs) -> Result<Value, String> {
    let pool = initiation_pool(args.key)?;
    let sockets = (0..args.sources)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(args.sources_from) + i as u32);
            let sock = UdpSocket::bind(SocketAddrV4::new(ip, 0))
                .map_err(|e| format!("binding {ip} (source {} of {}): {e}", i + 1, args.sources))?;
            sock.set_nonblocking(true)
                .map_err(|e| format!("non-blocking: {e}"))?;
            Ok(sock)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let (n, mut buf, mut replies) = (sockets.len(), vec![0u8; 2048], [0u64; 3]);
    // Each socket sends 8 datagrams between two reads: its receive buffer
    // never fills.
    let drain_every = n * 8;
    let (mut sent, mut send_errors) = (0u64, 0u64);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    for i in 0..args.seconds as usize * 20_000_000 {
        if i % drain_every == 0 {
            drain(&sockets, &mut buf, &mut replies);
            let stopped = args.stop_file.as_deref().is_some_and(Path::exists);
            if stopped || Instant::now() >= deadline {
                break;
            }
        }
        let packet = &pool[(i + i / n) % pool.len()];
        if sockets[i % n].send_to(packet, args.target).is_ok() {
            sent += 1;
        } else {
            // A full queue (EAGAIN, ENOBUFS): read the answers meanwhile.
            send_errors += 1;
            drain(&sockets, &mut buf, &mut replies);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Answers still on the way.
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(20));
        drain(&sockets, &mut buf, &mut replies);
    }
    let [cookies, hellos, other] = replies;
    Ok(json!({
        "sent": sent, "seconds": seconds, "send_errors": send_errors,
        "cookie_replies_received": cookies, "hellos_received": hellos, "other_received": other,
    }))
}

fn flooder_main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let report = parse_flood_args(&args).and_then(|args| flood(&args));
    let report = report.unwrap_or_else(|e| json!({ "error": e }));
    println!("{report}");
    if report["error"].is_null() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

struct BenchArgs {
    seconds: u32,
    sources: usize,
    write: bool,
}

const USAGE: &str = "usage: handshake-flood [--seconds S (2-60, default 10)] \
                     [--sources N (1-4094, default 1024)] [--write]";

fn parse_bench_args() -> Result<BenchArgs, String> {
    let mut args = BenchArgs {
        seconds: 10,
        sources: 1024,
        write: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => args.seconds = number(it.next(), "--seconds", 2, 60)?,
            "--sources" => args.sources = number(it.next(), "--sources", 1, MAX_SOURCES)?,
            "--write" => args.write = true,
            _ => return Err(USAGE.into()),
        }
    }
    Ok(args)
}

/// The daemon the flood is aimed at.
#[derive(Clone, Copy)]
struct Target {
    label: &'static str,
    /// Its name in the lab: its certificate (its WireGuard key) and API
    /// socket are `NAME.crt` and `NAME.sock`; `bin` answers its status.
    name: &'static str,
    underlay: &'static str,
    bin: &'static str,
    /// Handshake messages a second before cookies (`HANDSHAKES_PER_SEC`).
    limit: u64,
}

const TARGETS: [Target; 2] = [
    Target {
        label: "node `a`",
        name: "a",
        underlay: "198.18.0.2",
        bin: "tern",
        limit: 500,
    },
    Target {
        label: "lighthouse",
        name: "lh1",
        underlay: LH_UNDERLAY,
        bin: "tern-lighthouse",
        limit: 1000,
    },
];

/// One lab: the lighthouse, a and b up with a session b→a; the flooder's
/// namespace f; the new peers' namespaces c and d, their certificates
/// signed, not started.
struct World {
    lab: Lab,
    dir: PathBuf,
    target: Target,
    target_ns: Ns,
    lh: Ns,
    a: Ns,
    b: Ns,
    f: Ns,
    /// The target's WireGuard public key, in hex.
    key_hex: String,
    pid: u32,
    procs: Vec<Proc>,
}

/// A node config with info logs (debug writes a line per unknown key) and
/// a firewall that lets every peer in.
fn node_config(dir: &Path, name: &str) -> PathBuf {
    let text = node_config_text(name, "ca.crt").replace("level = \"debug\"", "level = \"info\"")
        + "[[firewall.inbound]]\nproto = \"any\"\n";
    write_file(dir, &format!("{name}.toml"), &text)
}

/// The lab for `target`, and the namespaces of the new peers c and d.
fn world(target: Target) -> (World, Ns, Ns) {
    let FlatLab { lab, dir, lh, a, b } = flat_lab(&format!("hflood{}", target.name));
    let (c, d, f) = (lab.add_ns("c"), lab.add_ns("d"), lab.add_ns("f"));
    lab.connect_to_wan(&c, "198.18.0.4/24");
    lab.connect_to_wan(&d, "198.18.0.5/24");
    lab.connect_to_wan(&f, &format!("{FLOODER_UNDERLAY}/24"));
    f.ip(["route", "add", "local", FLOOD_SOURCES_NET, "dev", "lo"]);
    // ARP asks from the flooder's wan address, not from a flood source.
    f.sysctl("net.ipv4.conf.all.arp_announce", "2");
    for ns in [&lh, &a, &b] {
        ns.ip(["route", "add", FLOOD_SOURCES_NET, "via", FLOODER_UNDERLAY]);
    }
    make_ca_and_lighthouse(&dir);
    for (name, host) in [("a", 5), ("b", 6), ("c", 7), ("d", 8)] {
        sign(&dir, "ca", name, &format!("100.64.0.{host}/10"), &[]);
    }
    let lh_config = write_lighthouse_config(&dir);
    let text = fs::read_to_string(&lh_config)
        .unwrap_or_else(|e| panic!("reading {}: {e}", lh_config.display()))
        .replace("level = \"debug\"", "level = \"info\"");
    fs::write(&lh_config, text).unwrap_or_else(|e| panic!("writing the lighthouse config: {e}"));
    let mut procs = vec![start_lighthouse(&lh, &lh_config)];
    for (ns, name) in [(&a, "a"), (&b, "b")] {
        let config = node_config(&dir, name);
        procs.push(start_node(ns, &config, &format!("node-{name}")));
        wait_registered(&dir, name, Duration::from_secs(30));
    }
    let b_pings_a = || pings(&b, A_OVERLAY);
    wait_until("b pings a", Duration::from_secs(30), b_pings_a);
    let cert_file = dir.join(format!("{}.crt", target.name));
    let pem = fs::read_to_string(&cert_file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", cert_file.display()));
    let cert = Cert::from_pem(&pem)
        .unwrap_or_else(|e| panic!("{} is not a certificate: {e}", cert_file.display()));
    let key_hex = cert.body.public_key.map(|b| format!("{b:02x}")).concat();
    let target_ns = if target.name == "a" { &a } else { &lh }.clone();
    let mut w = World {
        lab,
        dir,
        target,
        target_ns,
        lh,
        a,
        b,
        f,
        key_hex,
        pid: 0,
        procs,
    };
    w.pid = w
        .target_status()
        .and_then(|s| u32::try_from(s["pid"].as_u64()?).ok())
        .unwrap_or_else(|| panic!("the {} status has no pid", target.label));
    (w, c, d)
}

impl World {
    /// `status --json` of a daemon, bounded by [`STATUS_TIMEOUT`]: `None`
    /// if it did not answer in time.
    fn status_of(&self, bin: &str, socket: &str) -> Option<Value> {
        let bin = workspace_bin(bin).to_string_lossy().into_owned();
        let socket = self.dir.join(socket).to_string_lossy().into_owned();
        let args = ["status", "--socket", socket.as_str(), "--json"];
        // A socket in the file system: any namespace reaches it.
        let out = self.lh.exec_timeout(&bin, args, STATUS_TIMEOUT)?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn target_status(&self) -> Option<Value> {
        self.status_of(self.target.bin, &format!("{}.sock", self.target.name))
    }

    /// Whether node `name` is registered with the lighthouse, as the node
    /// sees it (its registration answered): the node is not flooded, so it
    /// answers at once where a flooded lighthouse may take seconds.
    fn registered(&self, name: &str) -> bool {
        let status = self.status_of("tern", &format!("{name}.sock"));
        let lighthouses = status.and_then(|s| s["lighthouses"].as_array().cloned());
        lighthouses.is_some_and(|l| l.iter().any(|l| l["registered"] == true))
    }

    /// Starts the flooder in f against `port` of the target, for at most
    /// `seconds`.
    fn start_flood(&self, port: u16, seconds: u64, sources: usize, label: &str) -> Flood {
        let exe = std::env::current_exe()
            .unwrap_or_else(|e| panic!("cannot find this executable for the flooder: {e}"));
        let stop_file = self.dir.join(format!("stop-flood-{label}"));
        // No argument holds a space (the lab's directory has none).
        let args = format!(
            "flood --target {}:{port} --key {} --sources-from {FLOOD_SOURCES_FROM} \
             --sources {sources} --seconds {seconds} --stop-file {}",
            self.target.underlay,
            self.key_hex,
            stop_file.display()
        );
        let mut cmd = self.f.command(exe);
        cmd.args(args.split(' '));
        let proc = self.f.spawn_command(cmd, &format!("flooder-{label}"));
        Flood { proc, stop_file }
    }
}

/// A running flooder and the file that ends it.
struct Flood {
    proc: Proc,
    stop_file: PathBuf,
}

impl Flood {
    /// Ends the flood and returns the flooder's report (`None`, and its log
    /// on stderr, if it printed none).
    fn finish(self) -> Option<Value> {
        fs::write(&self.stop_file, b"stop")
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.stop_file.display()));
        // It looks every few thousand sends; ended by its PID if it does
        // not stop within 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.proc.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.proc.terminate_and_wait(Duration::from_secs(3));
        let log = self.proc.log();
        let report = log.lines().rev().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            v["sent"].is_u64().then_some(v)
        });
        if report.is_none() {
            eprintln!("handshake-flood: the flooder reported nothing; its log:\n{log}");
        }
        report
    }
}

/// TCP b→a over the overlay (Gbit/s): idle, during the control flood, and
/// during the flood at Tern's port; and those floods' datagrams a second.
struct Throughput {
    gbps: [Option<f64>; 3],
    rates: [Option<f64>; 2],
}

fn throughput(w: &World, args: &BenchArgs) -> Throughput {
    let idle = iperf_gbps(&w.b, &w.a, A_OVERLAY, args.seconds);
    let under_flood = |port: u16, label: &str| {
        let flood = w.start_flood(port, u64::from(args.seconds) + 25, args.sources, label);
        std::thread::sleep(Duration::from_secs(1));
        let gbps = iperf_gbps(&w.b, &w.a, A_OVERLAY, args.seconds);
        let rate = flood
            .finish()
            .and_then(|r| Some(r["sent"].as_f64()? / r["seconds"].as_f64()?));
        (gbps, rate)
    };
    let (control, control_rate) = under_flood(CLOSED_PORT, "control");
    let (flooded, flood_rate) = under_flood(TERN_PORT, "iperf");
    Throughput {
        gbps: [idle, control, flooded],
        rates: [control_rate, flood_rate],
    }
}

/// A node started at some moment: seconds from its start until it is
/// registered and until a answers its first ping; cookies it got.
struct NewPeer {
    registered: Option<f64>,
    answered: Option<f64>,
    cookies: Option<u64>,
}

/// Starts node `name` in `ns` and times it (bounded by [`PATIENCE`]); the
/// node keeps running in `w`.
fn new_peer(w: &mut World, ns: &Ns, name: &str) -> NewPeer {
    let cookie_rule = count_cookies_from(ns, w.target.underlay);
    let config = node_config(&w.dir, name);
    let start = Instant::now();
    w.procs
        .push(start_node(ns, &config, &format!("node-{name}")));
    let w = &*w;
    let (registered, answered) = std::thread::scope(|s| {
        let pinger = s.spawn(|| first_answer(ns, name, start));
        let mut registered = None;
        while registered.is_none() && start.elapsed() < PATIENCE {
            if w.registered(name) {
                registered = Some(start.elapsed().as_secs_f64());
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        (registered, pinger.join().ok().flatten())
    });
    let cookies = cookie_rule.then(|| cookies_counted(ns)).flatten();
    NewPeer {
        registered,
        answered,
        cookies,
    }
}

/// Seconds from `start` to the first ping from `ns` that a answers: pings
/// every [`PING_EVERY_MS`] from the moment the node's route to the overlay
/// exists, timed by ping's own clock of each answer (`-D`).
fn first_answer(ns: &Ns, name: &str, start: Instant) -> Option<f64> {
    let unix_now = || SystemTime::now().duration_since(UNIX_EPOCH).ok();
    let start_unix = unix_now()?.as_secs_f64() - start.elapsed().as_secs_f64();
    while start.elapsed() < PATIENCE {
        let route = ns.exec("ip", ["-4", "route", "get", A_OVERLAY]);
        if route.status.success() && String::from_utf8_lossy(&route.stdout).contains("tern0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let args = format!(
        "-D -n -i {} -c 6000 -w 60 {A_OVERLAY}",
        PING_EVERY_MS / 1000.0
    );
    let ping = ns.spawn("ping", args.split(' '), &format!("ping-{name}"));
    while start.elapsed() < PATIENCE && ping.is_running() {
        if first_answer_at(&ping.log()).is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    first_answer_at(&ping.log()).map(|at| at - start_unix)
}

/// When the first answer in a `ping -D` log came (Unix seconds).
fn first_answer_at(log: &str) -> Option<f64> {
    let line = log
        .lines()
        .find(|l| l.contains("icmp_seq=") && l.contains(" time="))?;
    line.strip_prefix('[')?.split(']').next()?.parse().ok()
}

/// An iptables rule in `ns` with no target, counting cookie replies from
/// `from`: UDP from port 4242, 64 bytes of payload whose first byte is 3.
/// False if the kernel has no u32 match (then nothing is counted: "—").
fn count_cookies_from(ns: &Ns, from: &str) -> bool {
    let rule = format!(
        "-A INPUT -s {from} -p udp --sport 4242 -m length --length 92 \
         -m u32 --u32 0>>22&0x3C@8>>24=3"
    );
    ns.exec("iptables", rule.split(' ')).status.success()
}

/// Packets the rule of [`count_cookies_from`] counted.
fn cookies_counted(ns: &Ns) -> Option<u64> {
    let out = ns.exec("iptables", ["-L", "INPUT", "-v", "-n", "-x"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Two header lines, then the rule: its packets first.
    text.lines().nth(2)?.split_whitespace().next()?.parse().ok()
}

/// The flood at Tern's port while node c starts: what it cost the target
/// and how soon c connected.
struct FloodCost {
    peer: NewPeer,
    seconds: f64,
    cpu_percent: Option<f64>,
    /// The target's VmRSS before and after, and its VmHWM after (MiB).
    memory: [Option<f64>; 3],
    /// The target's counters before and after (see [`counters`]).
    counters: [Option<Value>; 2],
    flooder: Option<Value>,
}

impl FloodCost {
    /// How much the target's mesh counter `name` grew over the flood.
    fn counter(&self, name: &str) -> Option<u64> {
        let [before, after] = &self.counters;
        let before = before.as_ref()?[name].as_u64()?;
        Some(after.as_ref()?[name].as_u64()?.saturating_sub(before))
    }

    /// Cookie replies came back and no more initiations were opened than
    /// the limit allows (a second's worth more for the boundaries).
    fn cookies_engage(&self, limit: u64) -> bool {
        let flooder = self.flooder.as_ref();
        let received = flooder.and_then(|f| f["cookie_replies_received"].as_u64());
        let bound = limit * (self.seconds.ceil() as u64 + 1);
        let opened = self.counter("unknown_handshake_keys");
        received.is_some_and(|r| r > 0) && opened.is_some_and(|n| n <= bound)
    }
}

fn flood_with_new_peer(w: &mut World, c: &Ns, args: &BenchArgs) -> FloodCost {
    let before = counters(w);
    let rss_before = mem_mib(w.pid, "VmRSS");
    let cpu_before = proc_cpu_seconds(w.pid);
    let started = Instant::now();
    let flood_secs = u64::from(args.seconds) + PATIENCE.as_secs() + 5;
    let flood = w.start_flood(TERN_PORT, flood_secs, args.sources, "peer");
    std::thread::sleep(Duration::from_secs(1));
    let peer = new_peer(w, c, "c");
    // At least the flood's length, however soon c connected.
    let length = Duration::from_secs(u64::from(args.seconds));
    std::thread::sleep(length.saturating_sub(started.elapsed()));
    let flooder = flood.finish();
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = proc_cpu_seconds(w.pid);
    let memory = [rss_before, mem_mib(w.pid, "VmRSS"), mem_mib(w.pid, "VmHWM")];
    let after = counters(w);
    let cpu_percent = cpu_before
        .zip(cpu_after)
        .map(|(b, a)| (a - b) / seconds * 100.0);
    FloodCost {
        peer,
        seconds,
        cpu_percent,
        memory,
        counters: [before, after],
        flooder,
    }
}

/// The target's mesh counters, and `rcvbuf_errors`: the datagrams its
/// namespace dropped because a socket's receive buffer was full.
fn counters(w: &World) -> Option<Value> {
    let mut counters = w.target_status()?["mesh_counters"].take();
    counters["rcvbuf_errors"] = udp_rcvbuf_errors(&w.target_ns)?.into();
    Some(counters)
}

/// Everything measured against one target.
struct TargetRun {
    target: Target,
    throughput: Throughput,
    idle_peer: NewPeer,
    cost: FloodCost,
    /// Seconds from the last flood's end until a and b are both registered.
    registered_after: Option<f64>,
}

impl TargetRun {
    /// What went wrong, if anything: the exit status's reasons.
    fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if !self.cost.cookies_engage(self.target.limit) {
            failures.push(format!("{}: cookies did not engage", self.target.label));
        }
        let connected = |p: &NewPeer| p.registered.is_some() && p.answered.is_some();
        if !connected(&self.cost.peer) || !connected(&self.idle_peer) {
            failures.push(format!("{}: a new peer never connected", self.target.label));
        }
        failures
    }
}

fn run_target(target: Target, args: &BenchArgs) -> TargetRun {
    let say = |what: &str| eprintln!("handshake-flood: {}: {what}", target.label);
    say("building the lab");
    let (mut w, c, d) = world(target);
    // Before any flood: a daemon's handshake count resets a second or two
    // after one ends, and a peer that comes sooner waits for a cookie.
    say("a new peer at idle");
    let idle_peer = new_peer(&mut w, &d, "d");
    say("throughput b→a, idle, control flood, flood");
    let throughput = throughput(&w, args);
    say("a new peer during the flood");
    let cost = flood_with_new_peer(&mut w, &c, args);
    let since = Instant::now();
    let mut registered_after = None;
    while registered_after.is_none() && since.elapsed() < PATIENCE {
        if w.registered("a") && w.registered("b") {
            registered_after = Some(since.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = TargetRun {
        target,
        throughput,
        idle_peer,
        cost,
        registered_after,
    };
    if !run.failures().is_empty() {
        w.lab.dump_logs();
    }
    run
}

fn fixed(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or("—".into(), |x| format!("{x:.digits$}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn wait_cell(v: Option<f64>) -> String {
    v.map_or(format!("not within {} s", PATIENCE.as_secs()), |s| {
        format!("{s:.2}")
    })
}

fn yes_no(yes: bool) -> String {
    if yes { "yes" } else { "**no**" }.into()
}

fn count(v: Option<u64>) -> String {
    v.map_or("—".into(), |n| n.to_string())
}

/// The table's rows, top to bottom; [`cells`] gives a target's column.
const ROWS: [&str; 20] = [
    "handshake limit (messages/s before cookies)",
    "flood sent at Tern's port / at the closed port (datagrams/s)",
    "TCP b→a, idle (Gbit/s)",
    "TCP b→a, flood at a closed port: control (Gbit/s)",
    "TCP b→a, flood at Tern's port (Gbit/s)",
    "flooded ÷ control, flooded ÷ idle",
    "new peer d, before any flood: start → registered, → first ping answered by a (s)",
    "new peer c, flood: start → registered (s)",
    "new peer c, flood: start → first ping answered by a (s)",
    "cookie replies the new peer got from the target, idle / flood",
    "flood with the new peer (s)",
    "target CPU during it (% of one core)",
    "target VmRSS before → after, VmHWM (MiB)",
    "initiations opened, `unknown_handshake_keys` (/s)",
    "cookie replies sent, `cookie_replies` (/s)",
    "datagrams the target's full socket buffers dropped (/s)",
    "`wireguard_errors`, `rate_limited` (hellos), `handshakes` (total)",
    "flooder got: cookie replies, hellos (/s)",
    "after the floods: a and b both registered again (s)",
    "cookies engage",
];

/// One target's column of the table, in the order of [`ROWS`].
fn cells(r: &TargetRun) -> Vec<String> {
    let (t, c) = (&r.throughput, &r.cost);
    let [idle, control, flooded] = t.gbps;
    // Over the flooder's own sending time.
    let flood_secs = c.flooder.as_ref().and_then(|f| f["seconds"].as_f64());
    let per_sec = |name: &str| {
        fixed(
            c.counter(name).zip(flood_secs).map(|(n, s)| n as f64 / s),
            0,
        )
    };
    let flooder = |field: &str| {
        let f = c.flooder.as_ref();
        fixed(
            f.and_then(|f| Some(f[field].as_f64()? / f["seconds"].as_f64()?)),
            0,
        )
    };
    let [rss_before, rss_after, hwm] = c.memory;
    let (d, p) = (&r.idle_peer, &c.peer);
    vec![
        r.target.limit.to_string(),
        format!("{} / {}", fixed(t.rates[1], 0), fixed(t.rates[0], 0)),
        fixed(idle, 2),
        fixed(control, 2),
        fixed(flooded, 2),
        format!("{}, {}", ratio(flooded, control), ratio(flooded, idle)),
        format!("{}, {}", wait_cell(d.registered), wait_cell(d.answered)),
        wait_cell(p.registered),
        wait_cell(p.answered),
        format!("{} / {}", count(d.cookies), count(p.cookies)),
        fixed(Some(c.seconds), 1),
        fixed(c.cpu_percent, 0),
        format!(
            "{} → {}, {}",
            fixed(rss_before, 1),
            fixed(rss_after, 1),
            fixed(hwm, 1)
        ),
        per_sec("unknown_handshake_keys"),
        per_sec("cookie_replies"),
        per_sec("rcvbuf_errors"),
        ["wireguard_errors", "rate_limited", "handshakes"]
            .map(|n| count(c.counter(n)))
            .join(", "),
        format!(
            "{}, {}",
            flooder("cookie_replies_received"),
            flooder("hellos_received")
        ),
        wait_cell(r.registered_after),
        yes_no(c.cookies_engage(r.target.limit)),
    ]
}

fn report(args: &BenchArgs, runs: &[TargetRun]) -> String {
    let mut t = format!(
        "## Handshake flood: cookies, established sessions and new peers\n\n{}\n\
         Command: `handshake-flood --seconds {} --sources {}` (a flat lab built afresh for \
         each target: a lighthouse, nodes a and b, a flooder beside them on the same wan).\n\n\
         One thread in the flooder's namespace replays {POOL_SIZE} real handshake initiations \
         (MAC1 valid for the target's key, {POOL_KEYS} keys no certificate carries, a fresh \
         ephemeral key in each) from {} addresses, as fast as it can. Under the limit, each \
         initiation costs the target a Diffie-Hellman and a hello back; past it, WireGuard \
         answers a 64-byte cookie reply and opens nothing. **Throughput**: iperf3 TCP b→a over \
         the overlay for {} s, idle, then while the flooder aims at a UDP port of the target's \
         namespace nobody listens on (the control: the same load on the cores and the kernel, \
         no work for Tern), then at Tern's port. **New peer**: a node started during the \
         flood at Tern's port (c) and one started before any flood (d): the time from its \
         start until its own status says it is registered with the lighthouse, and until a \
         answers the first of its pings (one every {PING_EVERY_MS:.0} ms once its route \
         exists). **Cost**: the target's CPU (utime + stime), memory and counters over that \
         flood; the datagrams the kernel dropped in its namespace because its socket's buffer \
         was full (`RcvbufErrors`: flood and legitimate traffic alike); what the flooder got \
         back; and, once the floods end, how long until a and b both say they are registered \
         again. Cookies engage when cookie replies came back and the initiations opened \
         stayed within the limit times the seconds (plus one second's worth). The machine's \
         {} cores are shared by the flooder, the daemons and iperf3.\n\n\
         | target | {} |\n|---|{}\n",
        machine_line(),
        args.seconds,
        args.sources,
        args.sources,
        args.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        runs.iter()
            .map(|r| r.target.label)
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(runs.len()),
    );
    let columns: Vec<Vec<String>> = runs.iter().map(cells).collect();
    for (i, label) in ROWS.iter().enumerate() {
        let row: Vec<&str> = columns.iter().map(|c| c[i].as_str()).collect();
        t.push_str(&format!("| {label} | {} |\n", row.join(" | ")));
    }
    t
}

fn bench_main() -> ExitCode {
    let args = match parse_bench_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("handshake-flood: {e}");
            return ExitCode::from(2);
        }
    };
    let tools = ["iperf3", "ping", "iptables", "getconf"];
    if !require_root("handshake-flood") || !require_tools("handshake-flood", &tools) {
        return ExitCode::from(2);
    }
    let runs: Vec<TargetRun> = TARGETS.iter().map(|t| run_target(*t, &args)).collect();
    let section = report(&args, &runs);
    println!("{section}");
    if args.write {
        match write_section("handshake-flood", &section) {
            Ok(path) => eprintln!("handshake-flood: wrote the section into {}", path.display()),
            Err(e) => {
                eprintln!("handshake-flood: writing BENCHMARKS.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let failures: Vec<String> = runs.iter().flat_map(TargetRun::failures).collect();
    for failure in &failures {
        eprintln!("handshake-flood: {failure}");
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `field` of `/proc/PID/status` in MiB.
fn mem_mib(pid: u32, field: &str) -> Option<f64> {
    proc_status_kb(pid, field).map(|kb| kb as f64 / 1024.0)
}
