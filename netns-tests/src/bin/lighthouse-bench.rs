//! `lighthouse-bench`: one lighthouse holding many nodes (10,000 and
//! 100,000 by default): the memory each registered node costs it, the
//! registrations it answers per second and the CPU they take, and how fast
//! it answers a lookup. No root, no namespaces: loopback only.
//!
//! Every simulated node has its own certificate (signed in-process by a
//! throwaway CA, 100.64.0.0/10), its own WireGuard session (boringtun's
//! `Tunn`, the node's side of it) and its own underlay address, and joins
//! as `tern up` does: a hello asking for the lighthouse's certificate, its
//! own hello and a handshake initiation, a registration; then it
//! re-registers every `REGISTER_INTERVAL` (4 s). Two modes, at each count:
//!
//! - **sans-IO**: a `LighthouseCore` built in this process the way the
//!   lighthouse's shell builds it (no keepalives, a 30 s registry, relaying
//!   on), driven with datagrams and the real clock; only the time inside
//!   its calls is counted, and its heap with a counting allocator (the
//!   nodes' side is built before the core, and allocates nothing that lives
//!   while the core works). Its timers run when `poll_timeout` says.
//! - **UDP**: the release `tern-lighthouse` on 127.0.0.1 (no `[enroll]`), and
//!   a load generator here: the nodes behind 8 UDP sockets, each node
//!   sending from its own loopback address in 127.64.0.0/16 (chosen per
//!   datagram with `IP_PKTINFO`), so the lighthouse sees one endpoint per
//!   node. Its memory (VmRSS, VmHWM) and CPU (utime + stime) come from
//!   /proc. Phases of C × 4 s: re-registrations with lookups among them;
//!   pings at the same rate instead (the baseline: the cheapest message the
//!   same core answers in a session); the cadence `tern up` keeps
//!   (re-registration every 4 s, route and zone lists read every 3 s).
//!
//! ```text
//! cargo build --release -p tern-lighthouse -p tern-netns-tests
//! target/release/lighthouse-bench [--nodes N[,N...]] [--cycles C] [--lookups L]
//!     [--mode both|sansio|udp] [--join-deadline SECS] [--quick] [--write]
//! ```
//!
//! `--quick` is the CI smoke run (1,000 nodes, one cycle). `--write`
//! replaces the lighthouse section of BENCHMARKS.md. Every loop is bounded
//! in count and time; the lighthouse started here is stopped by its PID,
//! also on error. Exit codes: 0 done, 1 a step failed, 2 a prerequisite is
//! missing or an argument is wrong.

use std::alloc::System;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::PublicKey;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::socket::{
    bind, getsockname, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily,
    ControlMessage as Cmsg, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrIn,
};
use nix::sys::time::TimeSpec;
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};
use tern_lighthouse_core::lighthouse::LighthouseCore;
use tern_lighthouse_core::registry::Registry;
use tern_lighthouse_core::relay::RelayTable;
use tern_mesh::{Mesh, MeshSettings, PeerId, Transmit};
use tern_netns_tests::report::{
    cell, command_output, machine_line, median, number, percentile, write_section,
};
use tern_netns_tests::workspace_bin;
use tern_node_core::node::{REGISTER_INTERVAL, ROUTES_INTERVAL, ZONES_INTERVAL};
use tern_shared::cert::{
    self_sign_ca, sign_node, CaPool, Cert, CertBody, CertKind, Fingerprint, LIGHTHOUSE_GROUP,
};
use tern_shared::control::{ControlMessage, CONTROL_PORT};
use tern_shared::keys::{CaSecretKey, NodeSecretKey};
use tern_shared::packet::{build_udp_ipv4, parse_udp_ipv4};
use tern_shared::wire::{Hello, TYPE_HELLO};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// What the lighthouse's shell (`lighthouse/src/io/mod.rs`) gives its core:
/// the registry's bound, the relay's, and the defaults of `[registry]
/// expiry` and `[relay]`.
const MAX_NODES: usize = 100_000;
const REGISTRY_EXPIRY: Duration = Duration::from_secs(30);
const RELAY_IDLE_EXPIRY: Duration = Duration::from_secs(300);
const RELAY_PACKETS_PER_SEC: u32 = 100_000;

/// The lighthouse's and the nodes' overlay addresses (node i: base + i).
const LH_OVERLAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const PROBE_OVERLAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const NODES_OVERLAY: Ipv4Addr = Ipv4Addr::new(100, 65, 0, 0);
/// The nodes' underlay: node i sends from 127.64.0.0 + 1 + i / SOCKETS, on
/// the port of socket i % SOCKETS.
const SRC_BASE: Ipv4Addr = Ipv4Addr::new(127, 64, 0, 0);
const SOCKETS: usize = 8;
/// The sans-IO mode's stand-in ports for those sockets.
const SIM_PORT: u16 = 40_000;

/// Joins in flight at once in UDP mode (each node's own sequence of
/// hellos, handshake and registration).
const JOIN_WINDOW: usize = 256;
/// A join step unanswered this long is sent again (a discovery hello backs
/// off to 5 s, as a node's does).
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
const HELLO_BACKOFF_START: Duration = Duration::from_millis(500);
const HELLO_BACKOFF_MAX: Duration = Duration::from_secs(5);
const MAX_JOIN_TRIES: u32 = 40;
/// Replies to the last requests of a phase are collected this long.
const GRACE: Duration = Duration::from_millis(500);
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Re-keys timed in sans-IO mode.
const REKEY_SAMPLE: usize = 1000;
/// Route and zone list reads timed in sans-IO mode per cycle.
const LIST_SAMPLE: usize = 10_000;

struct Args {
    nodes: Vec<usize>,
    cycles: usize,
    lookups: usize,
    sansio: bool,
    udp: bool,
    /// `--mode console`: the admin console's pages and live views instead.
    console: bool,
    join_deadline: Duration,
    quick: bool,
    write: bool,
}

fn usage() -> String {
    format!(
        "usage: lighthouse-bench [--nodes N[,N...] (each 100-{MAX_NODES}, default 10000,100000)] \
         [--cycles C (4 s each, 1-10, default 3)] [--lookups L (0-100000, default 5000)] \
         [--mode both|sansio|udp|console] [--join-deadline SECS (10-1800, default 300)] \
         [--quick (1000 nodes, 1 cycle, 500 lookups)] [--write]"
    )
}

fn parse_args() -> Result<Args, String> {
    let (mut nodes, mut cycles, mut lookups) = (None, None, None);
    let (mut mode, mut deadline) = ("both".to_string(), 300u64);
    let (mut quick, mut write) = (false, false);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nodes" => {
                let v = it.next().ok_or("--nodes needs a value")?;
                let list: Result<Vec<usize>, String> = v
                    .split(',')
                    .map(|n| number(Some(n.to_string()), "--nodes", 100, MAX_NODES))
                    .collect();
                nodes = Some(list?);
            }
            "--cycles" => cycles = Some(number(it.next(), "--cycles", 1, 10)?),
            "--lookups" => lookups = Some(number(it.next(), "--lookups", 0, 100_000)?),
            "--mode" => {
                mode = it.next().ok_or("--mode needs a value")?;
                if !["both", "sansio", "udp", "console"].contains(&mode.as_str()) {
                    return Err(format!("--mode {mode:?}: use both, sansio, udp or console"));
                }
            }
            "--join-deadline" => deadline = number(it.next(), "--join-deadline", 10, 1800)?,
            "--quick" => quick = true,
            "--write" => write = true,
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}; see --help")),
        }
    }
    Ok(Args {
        nodes: nodes.unwrap_or_else(|| {
            if quick {
                vec![1000]
            } else if mode == "console" {
                vec![10_000]
            } else {
                vec![10_000, 100_000]
            }
        }),
        cycles: cycles.unwrap_or(if quick { 1 } else { 3 }),
        lookups: lookups.unwrap_or(if quick { 500 } else { 5000 }),
        sansio: mode == "both" || mode == "sansio",
        udp: mode == "both" || mode == "udp",
        console: mode == "console",
        join_deadline: Duration::from_secs(deadline),
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------
// Certificates and addresses

/// A node's certificate (binary) and key.
struct Creds {
    cert: Vec<u8>,
    key: NodeSecretKey,
}

struct Pki {
    ca: Cert,
    pool: CaPool,
    lh: Cert,
    lh_key: NodeSecretKey,
    /// What the readiness probe sends hellos with.
    probe: Creds,
    nodes: Vec<Creds>,
}

fn node_overlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(NODES_OVERLAY) + i as u32)
}

fn src_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(SRC_BASE) + 1 + (i / SOCKETS) as u32)
}

/// The node whose source address is `ip` on socket `socket`.
fn node_at(ip: Ipv4Addr, socket: usize) -> Option<usize> {
    let j = u32::from(ip).checked_sub(u32::from(SRC_BASE) + 1)? as usize;
    Some(j * SOCKETS + socket)
}

/// Node i's underlay address in sans-IO mode.
fn sim_addr(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        src_ip(i),
        SIM_PORT + (i % SOCKETS) as u16,
    ))
}

fn sim_node(addr: SocketAddr) -> Option<usize> {
    let SocketAddr::V4(a) = addr else {
        return None;
    };
    let socket = usize::from(a.port().checked_sub(SIM_PORT)?);
    (socket < SOCKETS)
        .then(|| node_at(*a.ip(), socket))
        .flatten()
}

/// A CA, the lighthouse's certificate, and `n` node certificates (signed
/// on two threads), valid from an hour ago for two days.
fn make_pki(n: usize) -> Result<Pki, String> {
    let unix = unix_now();
    let ca_key = CaSecretKey::generate();
    let ca = self_sign_ca(
        CertBody {
            kind: CertKind::Ca,
            name: "bench-ca".into(),
            ips: vec!["100.64.0.0/10".parse().map_err(|e| format!("{e}"))?],
            groups: vec![],
            subnets: vec![],
            dns_zones: vec![],
            not_before: unix - 86_400,
            not_after: unix + 30 * 86_400,
            public_key: ca_key.public_bytes(),
            issuer: Fingerprint([0; 32]),
            name_prefix: String::new(),
            max_lifetime: 0,
            chain: None,
        },
        &ca_key,
    )
    .map_err(|e| format!("the bench CA: {e}"))?;
    let sign = |name: &str, ip: Ipv4Addr, groups: &[&str]| -> Result<Creds, String> {
        let key = NodeSecretKey::generate();
        let cert = sign_node(
            &ca,
            &ca_key,
            CertBody {
                kind: CertKind::Node,
                name: name.to_string(),
                ips: vec![format!("{ip}/10").parse().map_err(|e| format!("{e}"))?],
                groups: groups.iter().map(|g| g.to_string()).collect(),
                subnets: vec![],
                dns_zones: vec![],
                not_before: unix - 3600,
                not_after: unix + 2 * 86_400,
                public_key: key.public_bytes(),
                issuer: Fingerprint([0; 32]),
                name_prefix: String::new(),
                max_lifetime: 0,
                chain: None,
            },
            unix,
        )
        .map_err(|e| format!("signing {name}: {e}"))?;
        Ok(Creds {
            cert: cert.encode(),
            key,
        })
    };
    let lh = sign("lh", LH_OVERLAY, &[LIGHTHOUSE_GROUP])?;
    let probe = sign("probe", PROBE_OVERLAY, &[])?;
    let half = n / 2;
    let (a, b) = thread::scope(|s| {
        let first = s.spawn(|| {
            (0..half)
                .map(|i| sign(&format!("n{i}"), node_overlay(i), &[]))
                .collect::<Result<Vec<_>, _>>()
        });
        let second = (half..n)
            .map(|i| sign(&format!("n{i}"), node_overlay(i), &[]))
            .collect::<Result<Vec<_>, _>>();
        (first.join(), second)
    });
    let mut nodes = a.map_err(|_| "a signing thread panicked".to_string())??;
    nodes.extend(b?);
    let pool = CaPool::new(vec![ca.clone()]).map_err(|e| format!("the CA pool: {e}"))?;
    let lh_cert = Cert::decode(&lh.cert).map_err(|e| format!("the lighthouse cert: {e}"))?;
    Ok(Pki {
        ca,
        pool,
        lh: lh_cert,
        lh_key: lh.key,
        probe,
        nodes,
    })
}

// ---------------------------------------------------------------------------
// The nodes' side: one WireGuard session each

/// A control message sealed for the lighthouse: a transport datagram, or
/// (no session) a handshake initiation, the message queued behind it.
enum Sealed {
    Data(Vec<u8>),
    Handshake(Vec<u8>),
}

/// What a node made of a datagram from the lighthouse.
enum Arrived {
    /// The lighthouse's hello (with its certificate).
    LhHello {
        wants_reply: bool,
        ours: bool,
    },
    /// A handshake response: the session is up; these go back (the
    /// keepalive that confirms it, and what was queued).
    Session(Vec<Vec<u8>>),
    /// A cookie reply: the lighthouse is under load; initiate again.
    Cookie,
    Control(ControlMessage),
    Nothing,
    Bad(String),
}

/// The simulated nodes' WireGuard state, one `Tunn` per node.
struct Fleet<'p> {
    pki: &'p Pki,
    tunns: Vec<Tunn>,
    lh_hello_cert: Vec<u8>,
    lh_ip: IpAddr,
    buf: Vec<u8>,
}

impl<'p> Fleet<'p> {
    fn new(pki: &'p Pki, n: usize, lh_ip: Ipv4Addr) -> Fleet<'p> {
        let lh_pub = PublicKey::from(pki.lh_key.public_bytes());
        let mut tunns = Vec::with_capacity(n);
        for (i, c) in pki.nodes[..n].iter().enumerate() {
            tunns.push(Tunn::new(
                c.key.static_secret(),
                lh_pub,
                None,
                None,
                i as u32,
                None,
            ));
        }
        Fleet {
            pki,
            tunns,
            lh_hello_cert: pki.lh.encode(),
            lh_ip: IpAddr::V4(lh_ip),
            buf: vec![0u8; 65_536],
        }
    }

    fn hello(&self, i: usize, wants_reply: bool) -> Vec<u8> {
        Hello {
            wants_reply,
            cert: &self.pki.nodes[i].cert,
        }
        .encode()
    }

    /// A new handshake initiation (a cookie, if one came, is in it).
    fn init(&mut self, i: usize) -> Result<Vec<u8>, String> {
        match self.tunns[i].format_handshake_initiation(&mut self.buf, true) {
            TunnResult::WriteToNetwork(b) => Ok(b.to_vec()),
            TunnResult::Err(e) => Err(format!("node {i}: no handshake initiation: {e:?}")),
            _ => Err(format!("node {i}: no handshake initiation")),
        }
    }

    /// What node i's WireGuard timers send now (a node runs them every
    /// 250 ms, the bench before each of its messages): a new handshake,
    /// its hello first, once the session is two minutes old
    /// (REKEY_AFTER_TIME) or when one went unanswered, or a keepalive.
    fn timers(&mut self, i: usize) -> Vec<Vec<u8>> {
        let out = match self.tunns[i].update_timers(&mut self.buf) {
            TunnResult::WriteToNetwork(b) => b.to_vec(),
            _ => return Vec::new(),
        };
        if out.first() == Some(&1) {
            vec![self.hello(i, false), out]
        } else {
            vec![out]
        }
    }

    fn control(&mut self, i: usize, msg: &ControlMessage) -> Result<Sealed, String> {
        let payload = msg.encode().map_err(|e| format!("encoding {msg:?}: {e}"))?;
        let packet = build_udp_ipv4(
            node_overlay(i),
            LH_OVERLAY,
            CONTROL_PORT,
            CONTROL_PORT,
            &payload,
        );
        match self.tunns[i].encapsulate(&packet, &mut self.buf) {
            TunnResult::WriteToNetwork(b) if b.first() == Some(&4) => Ok(Sealed::Data(b.to_vec())),
            TunnResult::WriteToNetwork(b) => Ok(Sealed::Handshake(b.to_vec())),
            TunnResult::Err(e) => Err(format!("node {i}: encapsulate: {e:?}")),
            _ => Err(format!("node {i}: encapsulate gave nothing")),
        }
    }

    fn open(&mut self, i: usize, datagram: &[u8]) -> Arrived {
        match datagram.first() {
            Some(&TYPE_HELLO) => match Hello::decode(datagram) {
                Ok(h) => Arrived::LhHello {
                    wants_reply: h.wants_reply,
                    ours: h.cert == self.lh_hello_cert.as_slice(),
                },
                Err(e) => Arrived::Bad(format!("a hello that does not decode: {e}")),
            },
            Some(1..=4) => {
                let kind = datagram[0];
                match self.tunns[i].decapsulate(Some(self.lh_ip), datagram, &mut self.buf) {
                    TunnResult::WriteToNetwork(b) => {
                        let mut out = vec![b.to_vec()];
                        for _ in 0..64 {
                            match self.tunns[i].decapsulate(None, &[], &mut self.buf) {
                                TunnResult::WriteToNetwork(b) => out.push(b.to_vec()),
                                _ => break,
                            }
                        }
                        Arrived::Session(out)
                    }
                    TunnResult::Done if kind == 3 => Arrived::Cookie,
                    TunnResult::Done => Arrived::Nothing,
                    TunnResult::WriteToTunnelV4(packet, _) => {
                        let Some(udp) = parse_udp_ipv4(packet) else {
                            return Arrived::Bad("not an IPv4/UDP packet".into());
                        };
                        match ControlMessage::decode(udp.payload) {
                            Ok(m) => Arrived::Control(m),
                            Err(e) => Arrived::Bad(format!("a control message: {e}")),
                        }
                    }
                    TunnResult::WriteToTunnelV6(..) => Arrived::Bad("IPv6".into()),
                    TunnResult::Err(e) => Arrived::Bad(format!("decapsulate: {e:?}")),
                }
            }
            _ => Arrived::Bad("an unknown datagram".into()),
        }
    }
}

/// A small deterministic generator for lookup pairs.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }

    /// Two different nodes of `n`.
    fn pair(&mut self, n: usize) -> (usize, usize) {
        let a = self.below(n);
        let b = (a + 1 + self.below(n - 1)) % n;
        (a, b)
    }
}

fn held_bytes() -> i64 {
    let s = GLOBAL.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64 + s.bytes_reallocated as i64
}

// ---------------------------------------------------------------------------
// sans-IO mode

/// The core, with the time spent in its calls.
struct SimCore {
    core: LighthouseCore,
    /// In `handle_datagram` and draining `poll_transmit`.
    busy: Duration,
    /// Each `handle_timeout` (with its drain), in ms.
    ticks: Vec<f64>,
    tick_total: Duration,
    txs: Vec<Transmit>,
    /// Handshakes the nodes' own timers started (each session is re-keyed
    /// after two minutes), and the core's time for them.
    rekeys: u64,
    rekey_busy: Duration,
}

impl SimCore {
    fn new(pki: &Pki, n: usize, now: Instant) -> Result<SimCore, String> {
        let unix = unix_now();
        let lh = pki
            .pool
            .verify(&pki.lh, unix)
            .map_err(|e| format!("the lighthouse cert: {e}"))?;
        let settings = MeshSettings {
            keepalive: None,
            idle_timeout: REGISTRY_EXPIRY * 4,
            seed: 0x5eed,
            max_peers: MAX_NODES.max(n),
            ..MeshSettings::default()
        };
        let mesh = Mesh::new(
            pki.lh_key.static_secret(),
            &lh,
            pki.pool.clone(),
            settings,
            now,
            unix,
        );
        let mut core = LighthouseCore::new(
            mesh,
            &lh,
            Registry::new(REGISTRY_EXPIRY, MAX_NODES.max(n)),
            now,
        );
        core.enable_relay(RelayTable::new(
            MAX_NODES.max(n) * 4,
            RELAY_IDLE_EXPIRY,
            RELAY_PACKETS_PER_SEC,
        ));
        Ok(SimCore {
            core,
            busy: Duration::ZERO,
            ticks: Vec::with_capacity(16_384),
            tick_total: Duration::ZERO,
            txs: Vec::with_capacity(1024),
            rekeys: 0,
            rekey_busy: Duration::ZERO,
        })
    }

    fn datagram(&mut self, from: SocketAddr, d: &[u8], now: Instant) -> Duration {
        let t = Instant::now();
        self.core.handle_datagram(from, d, now);
        while let Some(tx) = self.core.poll_transmit() {
            self.txs.push(tx);
        }
        let spent = t.elapsed();
        self.busy += spent;
        spent
    }

    /// The timers, when due (what they send is dropped: a lighthouse
    /// without keepalives sends nothing from them here).
    fn tick(&mut self, now: Instant) {
        if self.core.poll_timeout(now) > now {
            return;
        }
        let t = Instant::now();
        self.core.handle_timeout(now);
        while let Some(tx) = self.core.poll_transmit() {
            self.txs.push(tx);
        }
        let spent = t.elapsed();
        let sent = self.txs.len();
        self.txs.clear();
        self.tick_total += spent;
        self.ticks.push(spent.as_secs_f64() * 1e3);
        if spent > Duration::from_millis(5) {
            eprintln!(
                "lighthouse-bench: note: the core's timers took {:.1} ms once ({sent} datagrams out)",
                spent.as_secs_f64() * 1e3
            );
        }
    }
}

/// Sends node `i`'s datagrams to the core and hands each node what the
/// core sent it, and the core what the nodes answer (the keepalive after a
/// handshake), until quiet. What the nodes received lands in `got`; the
/// core's time is returned.
fn exchange(
    core: &mut SimCore,
    fleet: &mut Fleet,
    i: usize,
    datagrams: Vec<Vec<u8>>,
    now: Instant,
    got: &mut Vec<(usize, Arrived)>,
) -> Duration {
    let mut queue: VecDeque<(usize, Vec<u8>)> = datagrams.into_iter().map(|d| (i, d)).collect();
    let mut spent = Duration::ZERO;
    for _ in 0..64 {
        let Some((from, d)) = queue.pop_front() else {
            break;
        };
        spent += core.datagram(sim_addr(from), &d, now);
        let txs = std::mem::take(&mut core.txs);
        for tx in &txs {
            let Some(j) = sim_node(tx.dst).filter(|j| *j < fleet.tunns.len()) else {
                continue;
            };
            match fleet.open(j, &tx.payload) {
                Arrived::Session(out) => {
                    queue.extend(out.into_iter().map(|o| (j, o)));
                    got.push((j, Arrived::Session(Vec::new())));
                }
                a => got.push((j, a)),
            }
        }
        core.txs = txs;
        core.txs.clear();
    }
    spent
}

/// Runs node `i`'s WireGuard timers and hands the core what they send (a
/// re-key): its time is counted apart from the message that follows.
fn node_timers(
    core: &mut SimCore,
    fleet: &mut Fleet,
    i: usize,
    now: Instant,
    got: &mut Vec<(usize, Arrived)>,
) -> Result<(), String> {
    let ds = fleet.timers(i);
    if ds.is_empty() {
        return Ok(());
    }
    if ds.len() == 2 {
        core.rekeys += 1;
    }
    got.clear();
    let mut spent = exchange(core, fleet, i, ds, now, got);
    for _ in 0..3 {
        if !got
            .iter()
            .any(|(j, a)| *j == i && matches!(a, Arrived::Cookie))
        {
            break;
        }
        got.clear();
        let init = fleet.init(i)?;
        spent += exchange(core, fleet, i, vec![init], now, got);
    }
    core.rekey_busy += spent;
    Ok(())
}

/// One node's join, as `tern up` does it; false when the core did not let
/// it through now (its hello rate limit), and the core's time.
fn join_one(
    core: &mut SimCore,
    fleet: &mut Fleet,
    i: usize,
    now: Instant,
    got: &mut Vec<(usize, Arrived)>,
    cookies: &mut u64,
) -> Result<(bool, Duration), String> {
    got.clear();
    let mut spent = exchange(core, fleet, i, vec![fleet.hello(i, true)], now, got);
    if !got
        .iter()
        .any(|(j, a)| *j == i && matches!(a, Arrived::LhHello { ours: true, .. }))
    {
        return Ok((false, spent));
    }
    got.clear();
    let init = fleet.init(i)?;
    spent += exchange(core, fleet, i, vec![fleet.hello(i, false), init], now, got);
    for _ in 0..3 {
        if !got
            .iter()
            .any(|(j, a)| *j == i && matches!(a, Arrived::Cookie))
        {
            break;
        }
        *cookies += 1;
        got.clear();
        let init = fleet.init(i)?;
        spent += exchange(core, fleet, i, vec![init], now, got);
    }
    if !got
        .iter()
        .any(|(j, a)| *j == i && matches!(a, Arrived::Session(_)))
    {
        return Ok((false, spent));
    }
    got.clear();
    let reg = register_datagrams(fleet, i, 1)?;
    spent += exchange(core, fleet, i, reg, now, got);
    Ok((answered(got, i, Kind::Register), spent))
}

fn register_datagrams(fleet: &mut Fleet, i: usize, id: u32) -> Result<Vec<Vec<u8>>, String> {
    datagrams_for(fleet, i, &message(Kind::Register, id))
}

fn datagrams_for(
    fleet: &mut Fleet,
    i: usize,
    msg: &ControlMessage,
) -> Result<Vec<Vec<u8>>, String> {
    Ok(match fleet.control(i, msg)? {
        Sealed::Data(d) => vec![d],
        Sealed::Handshake(init) => vec![fleet.hello(i, false), init],
    })
}

/// The messages a node sends periodically.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Register,
    Ping,
    Routes,
    Zones,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Register, Kind::Ping, Kind::Routes, Kind::Zones];

    fn index(self) -> usize {
        match self {
            Kind::Register => 0,
            Kind::Ping => 1,
            Kind::Routes => 2,
            Kind::Zones => 3,
        }
    }

    fn answers(self, msg: &ControlMessage) -> Option<u32> {
        match (self, msg) {
            (Kind::Register, ControlMessage::RegisterAck { id, .. })
            | (Kind::Ping, ControlMessage::Pong { id })
            | (Kind::Routes, ControlMessage::RoutesReply { id, .. })
            | (Kind::Zones, ControlMessage::ZonesReply { id, .. }) => Some(*id),
            _ => None,
        }
    }
}

fn message(kind: Kind, id: u32) -> ControlMessage {
    match kind {
        Kind::Register => ControlMessage::Register {
            id,
            local: vec![],
            routes: vec![],
        },
        Kind::Ping => ControlMessage::Ping { id },
        Kind::Routes => ControlMessage::RoutesQuery { id, after: None },
        Kind::Zones => ControlMessage::ZonesQuery { id, after: None },
    }
}

/// What the nodes received, for an error message.
fn describe(got: &[(usize, Arrived)]) -> String {
    let items: Vec<String> = got
        .iter()
        .map(|(j, a)| match a {
            Arrived::LhHello { wants_reply, .. } => {
                format!("{j}: hello (wants reply {wants_reply})")
            }
            Arrived::Session(_) => format!("{j}: handshake response"),
            Arrived::Cookie => format!("{j}: cookie"),
            Arrived::Control(m) => format!("{j}: {m:?}"),
            Arrived::Nothing => format!("{j}: nothing"),
            Arrived::Bad(e) => format!("{j}: {e}"),
        })
        .collect();
    if items.is_empty() {
        "nothing came back".into()
    } else {
        items.join(", ")
    }
}

fn answered(got: &[(usize, Arrived)], i: usize, kind: Kind) -> bool {
    got.iter()
        .any(|(j, a)| *j == i && matches!(a, Arrived::Control(m) if kind.answers(m).is_some()))
}

/// Lookup timings (core µs each).
#[derive(Default)]
struct Lookups {
    by_address_us: Vec<f64>,
    by_name_us: Vec<f64>,
    full_table_us: Vec<f64>,
    /// Answers that were not the node asked for.
    wrong: usize,
}

/// `count` lookups of a random node by another, by address (`Query`) or
/// by certificate name (`NameQuery`): the core's time for each.
#[allow(clippy::too_many_arguments)]
fn lookup_pass(
    core: &mut SimCore,
    fleet: &mut Fleet,
    keeper: &mut Keeper,
    rng: &mut Rng,
    pki: &Pki,
    count: usize,
    by_name: bool,
    wrong: &mut usize,
) -> Result<Vec<f64>, String> {
    let n = fleet.tunns.len();
    let mut got = Vec::with_capacity(16);
    let mut samples = Vec::with_capacity(count);
    for k in 0..count {
        let (a, b) = rng.pair(n);
        let now = Instant::now();
        core.tick(now);
        keeper.run(core, fleet, now, &mut got)?;
        node_timers(core, fleet, a, now, &mut got)?;
        let id = k as u32;
        let msg = if by_name {
            ControlMessage::NameQuery {
                id,
                name: format!("n{b}"),
            }
        } else {
            ControlMessage::Query {
                id,
                overlay_ip: node_overlay(b),
            }
        };
        let ds = datagrams_for(fleet, a, &msg)?;
        got.clear();
        let spent = exchange(core, fleet, a, ds, now, &mut got);
        samples.push(spent.as_secs_f64() * 1e6);
        let right = |p: &tern_shared::control::PeerInfo| {
            p.cert == pki.nodes[b].cert && p.endpoints.first() == Some(&sim_addr(b))
        };
        let ok = got.iter().any(|(j, m)| {
            *j == a
                && match m {
                    Arrived::Control(ControlMessage::QueryReply { peer: Some(p), .. })
                    | Arrived::Control(ControlMessage::NameReply { peer: Some(p), .. }) => right(p),
                    _ => false,
                }
        });
        if !ok {
            *wrong += 1;
        }
    }
    Ok(samples)
}

/// Keeps every joined node registered, as a node does: re-registers each
/// one whose last registration is `REGISTER_INTERVAL` old, whatever the
/// phase is timing.
struct Keeper {
    queue: VecDeque<(Instant, usize)>,
    last: Vec<Option<Instant>>,
}

impl Keeper {
    fn new(n: usize) -> Keeper {
        Keeper {
            queue: VecDeque::with_capacity(n + 1),
            last: vec![None; n],
        }
    }

    /// Node `i` registered at `now`.
    fn registered(&mut self, i: usize, now: Instant) {
        if self.last[i].is_none() {
            self.queue.push_back((now + REGISTER_INTERVAL, i));
        }
        self.last[i] = Some(now);
    }

    fn run(
        &mut self,
        core: &mut SimCore,
        fleet: &mut Fleet,
        now: Instant,
        got: &mut Vec<(usize, Arrived)>,
    ) -> Result<(), String> {
        while let Some(&(due, i)) = self.queue.front() {
            if due > now {
                break;
            }
            self.queue.pop_front();
            let last = self.last[i].unwrap_or(now);
            if last + REGISTER_INTERVAL > now {
                // Registered since it was queued.
                self.queue.push_back((last + REGISTER_INTERVAL, i));
                continue;
            }
            node_timers(core, fleet, i, now, got)?;
            got.clear();
            let reg = register_datagrams(fleet, i, 2)?;
            exchange(core, fleet, i, reg, now, got);
            if !answered(got, i, Kind::Register) {
                let status = core.core.status(now);
                return Err(format!(
                    "sans-IO: node {i}'s re-registration unanswered ({}; registered: {}; the core's counters: {:?}, {:?})",
                    describe(got),
                    core.core.registry().lookup(node_overlay(i)).is_some(),
                    status.mesh_counters,
                    status.counters,
                ));
            }
            self.last[i] = Some(now);
            self.queue.push_back((now + REGISTER_INTERVAL, i));
        }
        Ok(())
    }
}

struct SansIo {
    heap_per_node: f64,
    registry_per_node: f64,
    join_s: f64,
    joins_per_s: f64,
    join_core_us: f64,
    join_refused: u64,
    cookies: u64,
    rekey_us: f64,
    /// Re-keys the nodes' own timers started during the run, and the
    /// core's µs for each.
    timer_rekeys: u64,
    timer_rekey_us: f64,
    /// Per cycle: mean core µs per message, by [`Kind::index`].
    per_msg_us: [Vec<f64>; 4],
    lookups: Lookups,
    ticks_ms: Vec<f64>,
    tick_share: f64,
}

fn sansio(pki: &Pki, n: usize, args: &Args) -> Result<SansIo, String> {
    let lh_ip = Ipv4Addr::LOCALHOST;
    eprintln!("lighthouse-bench: sans-IO, {n} nodes: building the nodes' sessions...");
    let mut fleet = Fleet::new(pki, n, lh_ip);
    let mut got: Vec<(usize, Arrived)> = Vec::with_capacity(64);
    let mut keeper = Keeper::new(n);
    let mut retry: VecDeque<usize> = VecDeque::with_capacity(1024);
    let start = Instant::now();
    let held_before = held_bytes();
    let mut core = SimCore::new(pki, n, start)?;

    // Join, re-registering the joined ones every 4 s meanwhile.
    let deadline = start + args.join_deadline;
    let (mut joined, mut next, mut join_core) = (0usize, 0usize, Duration::ZERO);
    let (mut refused, mut cookies, mut paused_until) = (0u64, 0u64, start);
    let mut last_note = start;
    while joined < n {
        let now = Instant::now();
        if now > deadline {
            return Err(format!(
                "sans-IO: {joined} of {n} nodes joined within {:?} ({refused} attempts refused)",
                args.join_deadline
            ));
        }
        if now.duration_since(last_note) >= Duration::from_secs(10) {
            last_note = now;
            eprintln!("lighthouse-bench: sans-IO: {joined} of {n} joined");
        }
        core.tick(now);
        keeper.run(&mut core, &mut fleet, now, &mut got)?;
        if now < paused_until {
            thread::sleep((paused_until - now).min(Duration::from_millis(1)));
            continue;
        }
        let i = match retry.pop_front() {
            Some(i) => i,
            None => {
                next += 1;
                next - 1
            }
        };
        let (ok, spent) = join_one(&mut core, &mut fleet, i, now, &mut got, &mut cookies)?;
        join_core += spent;
        if ok {
            joined += 1;
            keeper.registered(i, now);
        } else {
            refused += 1;
            retry.push_front(i);
            paused_until = now + Duration::from_millis(5);
        }
    }
    let join_s = start.elapsed().as_secs_f64();
    let heap = held_bytes() - held_before;
    eprintln!(
        "lighthouse-bench: sans-IO: {n} joined in {join_s:.1} s, core heap {:.0} B/node",
        heap as f64 / n as f64
    );

    // Steady: every node sends each kind once per cycle, as fast as the
    // core answers.
    let steady_start = Instant::now();
    let ticks_before = (core.ticks.len(), core.tick_total);
    let mut per_msg_us: [Vec<f64>; 4] = Default::default();
    let mut id = 10u32;
    for cycle in 0..args.cycles {
        for kind in Kind::ALL {
            // Every node registers and pings; the list reads are timed on
            // a sample (each of them walked every node before this
            // bench's fixes).
            let count = match kind {
                Kind::Register | Kind::Ping => n,
                Kind::Routes | Kind::Zones => n.min(LIST_SAMPLE),
            };
            let mut busy = Duration::ZERO;
            for k in 0..count {
                let i = k * n / count;
                let now = Instant::now();
                core.tick(now);
                keeper.run(&mut core, &mut fleet, now, &mut got)?;
                node_timers(&mut core, &mut fleet, i, now, &mut got)?;
                id = id.wrapping_add(1);
                let ds = datagrams_for(&mut fleet, i, &message(kind, id))?;
                got.clear();
                busy += exchange(&mut core, &mut fleet, i, ds, now, &mut got);
                if kind == Kind::Register {
                    keeper.registered(i, now);
                }
                if !answered(&got, i, kind) {
                    return Err(format!(
                        "sans-IO: node {i}'s {kind:?} unanswered ({}; registered: {})",
                        describe(&got),
                        core.core.registry().lookup(node_overlay(i)).is_some()
                    ));
                }
            }
            let us = busy.as_secs_f64() * 1e6 / count as f64;
            per_msg_us[kind.index()].push(us);
            eprintln!(
                "lighthouse-bench: sans-IO cycle {}/{}: {kind:?} {us:.2} µs of core time each",
                cycle + 1,
                args.cycles
            );
        }
    }

    // Lookups: a random node asks for another's address, then for
    // another's name (mesh DNS); then, with the relay's table of
    // introductions filled to its bound by as many lookups (each lookup
    // introduces a pair), addresses again.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
    let mut lookups = Lookups::default();
    let mut pass = |count: usize, by_name: bool, wrong: &mut usize| {
        lookup_pass(
            &mut core,
            &mut fleet,
            &mut keeper,
            &mut rng,
            pki,
            count,
            by_name,
            wrong,
        )
    };
    lookups.by_address_us = pass(args.lookups, false, &mut lookups.wrong)?;
    lookups.by_name_us = pass(args.lookups, true, &mut lookups.wrong)?;
    let fill = Instant::now();
    let pairs = MAX_NODES.max(n) * 4;
    pass(pairs + pairs / 20, false, &mut lookups.wrong)?;
    eprintln!(
        "lighthouse-bench: sans-IO: {} lookups to fill the relay's table in {:.1} s",
        pairs + pairs / 20,
        fill.elapsed().as_secs_f64()
    );
    lookups.full_table_us = pass(args.lookups, false, &mut lookups.wrong)?;
    let steady_s = steady_start.elapsed().as_secs_f64();
    let ticks_ms: Vec<f64> = core.ticks[ticks_before.0..].to_vec();
    let tick_share = (core.tick_total - ticks_before.1).as_secs_f64() / steady_s;

    // Re-keys: a sample of nodes handshakes again (hello first, as a node does).
    let mut rekey = Duration::ZERO;
    let sample = n.min(REKEY_SAMPLE);
    for k in 0..sample {
        let i = k * n / sample;
        let now = Instant::now();
        core.tick(now);
        keeper.run(&mut core, &mut fleet, now, &mut got)?;
        node_timers(&mut core, &mut fleet, i, now, &mut got)?;
        got.clear();
        let datagrams = vec![fleet.hello(i, false), fleet.init(i)?];
        rekey += exchange(&mut core, &mut fleet, i, datagrams, now, &mut got);
        for _ in 0..3 {
            if !got
                .iter()
                .any(|(j, a)| *j == i && matches!(a, Arrived::Cookie))
            {
                break;
            }
            got.clear();
            let init = fleet.init(i)?;
            rekey += exchange(&mut core, &mut fleet, i, vec![init], now, &mut got);
        }
        if !got
            .iter()
            .any(|(j, a)| *j == i && matches!(a, Arrived::Session(_)))
        {
            return Err(format!("sans-IO: node {i}'s re-key did not complete"));
        }
    }
    let rekeys = (core.rekeys, core.rekey_busy);
    drop(core);
    drop(fleet);

    // The registry alone: the same nodes' entries.
    let now = Instant::now();
    let before = held_bytes();
    let mut registry = Registry::new(REGISTRY_EXPIRY, MAX_NODES.max(n));
    for i in 0..n {
        registry
            .register(
                node_overlay(i),
                &format!("n{i}"),
                &pki.nodes[i].cert,
                PeerId(i as u32),
                sim_addr(i),
                &[],
                now,
            )
            .map_err(|e| format!("registry: {e}"))?;
    }
    let registry_per_node = (held_bytes() - before) as f64 / n as f64;
    drop(registry);

    Ok(SansIo {
        heap_per_node: heap as f64 / n as f64,
        registry_per_node,
        join_s,
        joins_per_s: n as f64 / join_s,
        join_core_us: join_core.as_secs_f64() * 1e6 / n as f64,
        join_refused: refused,
        cookies,
        rekey_us: rekey.as_secs_f64() * 1e6 / sample.max(1) as f64,
        timer_rekeys: rekeys.0,
        timer_rekey_us: rekeys.1.as_secs_f64() * 1e6 / rekeys.0.max(1) as f64,
        per_msg_us,
        lookups,
        ticks_ms,
        tick_share,
    })
}

// ---------------------------------------------------------------------------
// UDP mode: the real lighthouse

/// A started `tern-lighthouse`; dropping it stops it.
struct Lighthouse {
    child: Child,
    log: PathBuf,
}

impl Lighthouse {
    fn start(
        bin: &Path,
        dir: &Path,
        addr: SocketAddr,
        probe: &Creds,
    ) -> Result<Lighthouse, String> {
        let log = dir.join("lighthouse.log");
        let out = fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("creating {}: {e}", log.display()))?;
        let child = Command::new(bin)
            .args(["--config", "lh.toml"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let mut lh = Lighthouse { child, log };
        let probe_sock =
            UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("binding a UDP socket: {e}"))?;
        probe_sock
            .connect(addr)
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let hello = Hello {
            wants_reply: true,
            cert: &probe.cert,
        }
        .encode();
        let deadline = Instant::now() + START_TIMEOUT;
        let mut buf = vec![0u8; 2048];
        loop {
            if let Ok(Some(status)) = lh.child.try_wait() {
                return Err(format!(
                    "the lighthouse exited at start ({status}){}",
                    lh.tail()
                ));
            }
            let _ = probe_sock.send(&hello);
            let _ = probe_sock.set_read_timeout(Some(Duration::from_millis(200)));
            if matches!(probe_sock.recv(&mut buf), Ok(n) if n > 1 && buf[0] == TYPE_HELLO) {
                return Ok(lh);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the lighthouse did not answer a hello within {START_TIMEOUT:?}{}",
                    lh.tail()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

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
        proc_mem_mib(&format!("/proc/{}/status", self.pid()), field)
    }

    fn cpu_s(&self, ticks: f64) -> Option<f64> {
        proc_cpu_s(&format!("/proc/{}/stat", self.pid()), ticks)
    }

    fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.pid()) {
            // Our own unreaped child: its PID is still ours.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Lighthouse {
    fn drop(&mut self) {
        self.stop();
    }
}

fn proc_mem_mib(path: &str, field: &str) -> Option<f64> {
    let status = fs::read_to_string(path).ok()?;
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

/// utime + stime of /proc/…/stat, in seconds.
fn proc_cpu_s(path: &str, ticks: f64) -> Option<f64> {
    let stat = fs::read_to_string(path).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// The load generator's sockets: bound to every address (on `lo` when the
/// kernel lets an unprivileged process say so), each node's datagrams sent
/// from its own loopback address with IP_PKTINFO.
struct Net {
    socks: Vec<OwnedFd>,
    lh: SockaddrIn,
    lh_addr: SocketAddrV4,
    on_lo: bool,
    buf: Vec<u8>,
    cmsg: Vec<u8>,
    send_errors: u64,
    foreign: u64,
}

impl Net {
    fn new(lh: SocketAddrV4) -> Result<Net, String> {
        let mut socks = Vec::with_capacity(SOCKETS);
        let mut on_lo = true;
        for _ in 0..SOCKETS {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Datagram,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| format!("a UDP socket: {e}"))?;
            on_lo &= setsockopt(&fd, sockopt::BindToDevice, &OsString::from("lo")).is_ok();
            setsockopt(&fd, sockopt::Ipv4PacketInfo, &true)
                .map_err(|e| format!("IP_PKTINFO: {e}"))?;
            let _ = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
            let _ = setsockopt(&fd, sockopt::SndBuf, &(4 << 20));
            bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, 0))
                .map_err(|e| format!("binding a UDP socket: {e}"))?;
            socks.push(fd);
        }
        Ok(Net {
            socks,
            lh: SockaddrIn::from(lh),
            lh_addr: lh,
            on_lo,
            buf: vec![0u8; 65_536],
            cmsg: nix::cmsg_space!(libc::in_pktinfo),
            send_errors: 0,
            foreign: 0,
        })
    }

    fn port(&self, socket: usize) -> Result<u16, String> {
        let local: SockaddrIn =
            getsockname(self.socks[socket].as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
        Ok(local.port())
    }

    fn send(&mut self, i: usize, bytes: &[u8]) {
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(src_ip(i)).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        let sent = sendmsg(
            self.socks[i % SOCKETS].as_raw_fd(),
            &[IoSlice::new(bytes)],
            &[Cmsg::Ipv4PacketInfo(&info)],
            MsgFlags::empty(),
            Some(&self.lh),
        );
        if sent.is_err() {
            self.send_errors += 1;
        }
    }

    /// One datagram from socket `s`: the node it is for and its length (in
    /// `self.buf`); `Ok(None)` when the socket has none.
    fn recv(&mut self, s: usize) -> Result<Option<Option<(usize, usize)>>, String> {
        let mut iov = [IoSliceMut::new(&mut self.buf)];
        let msg = match recvmsg::<SockaddrIn>(
            self.socks[s].as_raw_fd(),
            &mut iov,
            Some(&mut self.cmsg),
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(format!("receiving: {e}")),
        };
        let len = msg.bytes;
        let from_lh = msg.address.map(SocketAddrV4::from) == Some(self.lh_addr);
        let mut dst = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::Ipv4PacketInfo(pi) = c {
                    dst = Some(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr)));
                }
            }
        }
        match dst.and_then(|ip| node_at(ip, s)) {
            Some(i) if from_lh => Ok(Some(Some((i, len)))),
            _ => {
                self.foreign += 1;
                Ok(Some(None))
            }
        }
    }

    /// Waits until a socket is readable, at most `ms`.
    fn wait(&self, timeout: Duration) {
        let mut fds: Vec<PollFd> = self
            .socks
            .iter()
            .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
            .collect();
        let _ = ppoll(&mut fds, Some(TimeSpec::from(timeout)), None);
    }
}

/// Where a node is in its join.
#[derive(Clone, Copy, PartialEq)]
enum St {
    New,
    Hello {
        deadline: Instant,
        backoff: Duration,
        tries: u32,
    },
    Handshake {
        deadline: Instant,
        tries: u32,
    },
    FirstAck {
        deadline: Instant,
        tries: u32,
    },
    Joined,
    Failed,
}

/// Each node sends `kind` every `period`, node i at `i / n` of it.
struct Schedule {
    kind: Kind,
    period: Duration,
    queue: VecDeque<(Instant, usize)>,
}

impl Schedule {
    fn spread(kind: Kind, period: Duration, start: Instant, n: usize) -> Schedule {
        let queue = (0..n)
            .map(|i| (start + period.mul_f64(i as f64 / n as f64), i))
            .collect();
        Schedule {
            kind,
            period,
            queue,
        }
    }

    fn due(&mut self, now: Instant) -> Option<usize> {
        let &(t, i) = self.queue.front()?;
        if t > now {
            return None;
        }
        self.queue.pop_front();
        self.queue.push_back((t + self.period, i));
        Some(i)
    }
}

/// What one phase of the UDP run measured.
#[derive(Default)]
struct Phase {
    window_s: f64,
    lh_cpu_s: f64,
    gen_cpu_s: f64,
    sent: [u64; 4],
    answered: [u64; 4],
    rtt_ms: [Vec<f64>; 4],
    lookups_sent: u64,
    lookup_rtt_ms: Vec<f64>,
    lookups_wrong: u64,
    punches: u64,
    /// Handshakes the nodes' timers started (sessions two minutes old).
    rekeys: u64,
}

/// The load generator.
struct Gen<'p> {
    pki: &'p Pki,
    fleet: Fleet<'p>,
    net: Net,
    n: usize,
    ports: Vec<u16>,
    st: Vec<St>,
    /// The outstanding request of each kind per node: id and when sent.
    pending: [Vec<Option<(u32, Instant)>>; 4],
    lookups: HashMap<u32, (usize, usize, Instant)>,
    next_id: u32,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    newly_joined: Vec<usize>,
    newly_failed: usize,
    phase: Phase,
    cookies: u64,
    rekeys: u64,
    hello_resends: u64,
    bad: u64,
    first_bad: Option<String>,
}

impl<'p> Gen<'p> {
    fn send_kind(&mut self, kind: Kind, i: usize, now: Instant) {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        // An earlier one still unanswered is a loss (sent, never answered).
        self.pending[kind.index()][i] = Some((id, now));
        self.phase.sent[kind.index()] += 1;
        self.send_control(i, &message(kind, id));
    }

    fn send_control(&mut self, i: usize, msg: &ControlMessage) {
        let timers = self.fleet.timers(i);
        if timers.len() == 2 {
            self.rekeys += 1;
            self.phase.rekeys += 1;
        }
        for d in timers {
            self.net.send(i, &d);
        }
        match self.fleet.control(i, msg) {
            Ok(Sealed::Data(d)) => self.net.send(i, &d),
            Ok(Sealed::Handshake(init)) => {
                self.rekeys += 1;
                let hello = self.fleet.hello(i, false);
                self.net.send(i, &hello);
                self.net.send(i, &init);
            }
            Err(e) => self.note_bad(e),
        }
    }

    fn note_bad(&mut self, why: String) {
        self.bad += 1;
        if self.first_bad.is_none() {
            self.first_bad = Some(why);
        }
    }

    fn start_join(&mut self, i: usize, now: Instant) {
        let hello = self.fleet.hello(i, true);
        self.net.send(i, &hello);
        let deadline = now + HELLO_BACKOFF_START;
        self.st[i] = St::Hello {
            deadline,
            backoff: HELLO_BACKOFF_START,
            tries: 1,
        };
        self.timers.push(Reverse((deadline, i)));
    }

    fn send_handshake(&mut self, i: usize, with_hello: bool) {
        if with_hello {
            let hello = self.fleet.hello(i, false);
            self.net.send(i, &hello);
        }
        match self.fleet.init(i) {
            Ok(init) => self.net.send(i, &init),
            Err(e) => self.note_bad(e),
        }
    }

    fn set_step(&mut self, i: usize, st: St) {
        if let St::Hello { deadline, .. }
        | St::Handshake { deadline, .. }
        | St::FirstAck { deadline, .. } = st
        {
            self.timers.push(Reverse((deadline, i)));
        }
        self.st[i] = st;
    }

    fn fail(&mut self, i: usize) {
        self.st[i] = St::Failed;
        self.newly_failed += 1;
    }

    /// A join step that timed out at `t`: sent again (a stale timer does nothing).
    fn step_timeout(&mut self, i: usize, t: Instant, now: Instant) {
        match self.st[i] {
            St::Hello {
                deadline,
                backoff,
                tries,
            } if deadline == t => {
                if tries >= MAX_JOIN_TRIES {
                    return self.fail(i);
                }
                self.hello_resends += 1;
                let hello = self.fleet.hello(i, true);
                self.net.send(i, &hello);
                let backoff = (backoff * 2).min(HELLO_BACKOFF_MAX);
                self.set_step(
                    i,
                    St::Hello {
                        deadline: now + backoff,
                        backoff,
                        tries: tries + 1,
                    },
                );
            }
            St::Handshake { deadline, tries } if deadline == t => {
                if tries >= MAX_JOIN_TRIES {
                    return self.fail(i);
                }
                self.send_handshake(i, true);
                self.set_step(
                    i,
                    St::Handshake {
                        deadline: now + STEP_TIMEOUT,
                        tries: tries + 1,
                    },
                );
            }
            St::FirstAck { deadline, tries } if deadline == t => {
                if tries >= MAX_JOIN_TRIES {
                    return self.fail(i);
                }
                self.send_kind(Kind::Register, i, now);
                self.set_step(
                    i,
                    St::FirstAck {
                        deadline: now + STEP_TIMEOUT,
                        tries: tries + 1,
                    },
                );
            }
            _ => {}
        }
    }

    /// Everything the sockets hold now, at most `limit` datagrams; whether
    /// there was any.
    fn receive(&mut self, limit: usize) -> Result<bool, String> {
        let mut any = false;
        let mut left = limit;
        for s in 0..SOCKETS {
            while left > 0 {
                let Some(got) = self.net.recv(s)? else {
                    break;
                };
                left -= 1;
                any = true;
                let Some((i, len)) = got.filter(|(i, _)| *i < self.n) else {
                    continue;
                };
                let datagram = self.net.buf[..len].to_vec();
                let now = Instant::now();
                self.handle(i, &datagram, now);
            }
        }
        Ok(any)
    }

    fn handle(&mut self, i: usize, datagram: &[u8], now: Instant) {
        match self.fleet.open(i, datagram) {
            Arrived::LhHello { ours: false, .. } => {
                self.note_bad("a hello with another certificate".into())
            }
            Arrived::LhHello { wants_reply, .. } => match self.st[i] {
                St::Hello { .. } => {
                    self.send_handshake(i, true);
                    self.set_step(
                        i,
                        St::Handshake {
                            deadline: now + STEP_TIMEOUT,
                            tries: 1,
                        },
                    );
                }
                // It dropped our hello and asks for the certificate again.
                St::Handshake { .. } if wants_reply => self.send_handshake(i, true),
                _ => {}
            },
            Arrived::Session(out) => {
                for d in out {
                    self.net.send(i, &d);
                }
                if let St::Handshake { .. } = self.st[i] {
                    self.send_kind(Kind::Register, i, now);
                    self.set_step(
                        i,
                        St::FirstAck {
                            deadline: now + STEP_TIMEOUT,
                            tries: 1,
                        },
                    );
                }
            }
            Arrived::Cookie => {
                self.cookies += 1;
                self.send_handshake(i, false);
            }
            Arrived::Control(msg) => self.control(i, msg, now),
            Arrived::Nothing => {}
            Arrived::Bad(e) => self.note_bad(format!("node {i}: {e}")),
        }
    }

    fn control(&mut self, i: usize, msg: ControlMessage, now: Instant) {
        match msg {
            ControlMessage::QueryReply { id, peer, .. } => {
                let Some((asker, target, sent)) = self.lookups.remove(&id) else {
                    return;
                };
                let want = SocketAddr::V4(SocketAddrV4::new(
                    src_ip(target),
                    self.ports[target % SOCKETS],
                ));
                let right = asker == i
                    && peer.is_some_and(|p| {
                        p.cert == self.pki.nodes[target].cert && p.endpoints.first() == Some(&want)
                    });
                if right {
                    self.phase
                        .lookup_rtt_ms
                        .push(now.duration_since(sent).as_secs_f64() * 1e3);
                } else {
                    self.phase.lookups_wrong += 1;
                }
            }
            ControlMessage::Punch { .. } => self.phase.punches += 1,
            msg => {
                for kind in Kind::ALL {
                    let Some(id) = kind.answers(&msg) else {
                        continue;
                    };
                    let slot = &mut self.pending[kind.index()][i];
                    let Some((want, sent)) = *slot else {
                        return;
                    };
                    if want != id {
                        return;
                    }
                    *slot = None;
                    if kind == Kind::Register && matches!(self.st[i], St::FirstAck { .. }) {
                        self.st[i] = St::Joined;
                        self.newly_joined.push(i);
                        return;
                    }
                    self.phase.answered[kind.index()] += 1;
                    self.phase.rtt_ms[kind.index()]
                        .push(now.duration_since(sent).as_secs_f64() * 1e3);
                    return;
                }
            }
        }
    }

    fn send_lookup(&mut self, rng: &mut Rng, now: Instant) {
        let (a, b) = rng.pair(self.n);
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.lookups.insert(id, (a, b, now));
        self.phase.lookups_sent += 1;
        self.send_control(
            a,
            &ControlMessage::Query {
                id,
                overlay_ip: node_overlay(b),
            },
        );
    }

    /// Every node joins (at most [`JOIN_WINDOW`] at a time), the joined
    /// ones re-registering every 4 s meanwhile.
    /// Joins every node (at most `rate` joins begun per second, if given),
    /// re-registering the joined ones meanwhile: the time it took, and the
    /// cookie replies met.
    fn join_all(
        &mut self,
        deadline: Duration,
        lh: &mut Lighthouse,
        rate: Option<f64>,
    ) -> Result<(f64, u64), String> {
        let start = Instant::now();
        let mut rereg: VecDeque<(Instant, usize)> = VecDeque::with_capacity(self.n);
        let (mut next, mut in_flight, mut joined, mut failed) = (0usize, 0usize, 0usize, 0usize);
        let mut last_note = start;
        while joined + failed < self.n {
            let now = Instant::now();
            if now > start + deadline {
                return Err(format!(
                    "UDP: {joined} of {} nodes joined within {deadline:?}",
                    self.n
                ));
            }
            if now.duration_since(last_note) >= Duration::from_secs(10) {
                last_note = now;
                eprintln!(
                    "lighthouse-bench: UDP: {joined} of {} joined ({} cookies, {} hellos resent)",
                    self.n, self.cookies, self.hello_resends
                );
                if !lh.alive() {
                    return Err(format!("the lighthouse exited{}", lh.tail()));
                }
            }
            let allowed = rate.map_or(self.n, |r| {
                (now.duration_since(start).as_secs_f64() * r) as usize + 1
            });
            while in_flight < JOIN_WINDOW && next < self.n && next < allowed {
                self.start_join(next, now);
                next += 1;
                in_flight += 1;
            }
            while let Some(&Reverse((t, i))) = self.timers.peek() {
                if t > now {
                    break;
                }
                self.timers.pop();
                self.step_timeout(i, t, now);
            }
            while let Some(&(t, i)) = rereg.front() {
                if t > now {
                    break;
                }
                rereg.pop_front();
                self.send_kind(Kind::Register, i, now);
                rereg.push_back((t + REGISTER_INTERVAL, i));
            }
            let any = self.receive(4096)?;
            for i in std::mem::take(&mut self.newly_joined) {
                joined += 1;
                in_flight -= 1;
                rereg.push_back((now + REGISTER_INTERVAL, i));
            }
            let gave_up = std::mem::take(&mut self.newly_failed);
            failed += gave_up;
            in_flight -= gave_up;
            if !any {
                self.net.wait(Duration::from_millis(1));
            }
        }
        if failed > 0 {
            return Err(format!(
                "UDP: {failed} of {} nodes did not join ({} tries each){}",
                self.n,
                MAX_JOIN_TRIES,
                self.first_bad
                    .as_deref()
                    .map_or_else(String::new, |b| format!("; first problem: {b}"))
            ));
        }
        let join_s = start.elapsed().as_secs_f64();
        Ok((join_s, self.cookies))
    }

    /// One measured phase: each node sends each of `kinds` at its period,
    /// `lookups` lookups spread over it; CPU over `length`, answers
    /// collected until [`GRACE`] after.
    fn run_phase(
        &mut self,
        kinds: &[(Kind, Duration)],
        length: Duration,
        lookups: usize,
        lh: &mut Lighthouse,
        ticks: f64,
    ) -> Result<Phase, String> {
        self.phase = Phase::default();
        for slots in &mut self.pending {
            slots.iter_mut().for_each(|s| *s = None);
        }
        self.lookups.clear();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ self.n as u64);
        let start = Instant::now();
        let mut schedules: Vec<Schedule> = kinds
            .iter()
            .map(|(k, p)| Schedule::spread(*k, *p, start, self.n))
            .collect();
        let (cpu0, gen0) = (lh.cpu_s(ticks), proc_cpu_s("/proc/self/stat", ticks));
        let end = start + length;
        let lookup_every = length / (lookups.max(1) as u32);
        let mut next_lookup = start;
        let mut cpu_end = None;
        loop {
            let now = Instant::now();
            if now >= end && cpu_end.is_none() {
                cpu_end = Some((lh.cpu_s(ticks), proc_cpu_s("/proc/self/stat", ticks)));
            }
            if now >= end + GRACE {
                break;
            }
            if now < end {
                for s in &mut schedules {
                    while let Some(i) = s.due(now) {
                        let kind = s.kind;
                        self.send_kind(kind, i, now);
                    }
                }
                while (self.phase.lookups_sent as usize) < lookups && next_lookup <= now {
                    self.send_lookup(&mut rng, now);
                    next_lookup += lookup_every;
                }
            }
            if !self.receive(4096)? {
                // Until the next message is due: the nodes' messages go
                // out spread as their schedule says, not in bursts.
                let next = schedules
                    .iter()
                    .filter_map(|s| s.queue.front().map(|(t, _)| *t))
                    .chain(((self.phase.lookups_sent as usize) < lookups).then_some(next_lookup))
                    .filter(|_| now < end)
                    .min()
                    .unwrap_or(now + Duration::from_millis(1));
                let wait = next
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(1));
                if !wait.is_zero() {
                    self.net.wait(wait);
                }
            }
        }
        if !lh.alive() {
            return Err(format!("the lighthouse exited{}", lh.tail()));
        }
        let (cpu1, gen1) = cpu_end.unwrap_or((None, None));
        let mut phase = std::mem::take(&mut self.phase);
        phase.window_s = length.as_secs_f64();
        phase.lh_cpu_s = match (cpu0, cpu1) {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        };
        phase.gen_cpu_s = match (gen0, gen1) {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        };
        Ok(phase)
    }
}

struct UdpRun {
    rss_fresh: f64,
    rss_joined: f64,
    rss_end: f64,
    hwm: f64,
    join_s: f64,
    join_cpu_s: f64,
    cookies: u64,
    hello_resends: u64,
    rekeys: u64,
    regs: Phase,
    pings: Phase,
    cadence: Phase,
    send_errors: u64,
    foreign: u64,
    on_lo: bool,
    bad: u64,
    first_bad: Option<String>,
    counters: Option<serde_json::Value>,
}

/// A lighthouse in a temporary directory (its API socket `lh.sock`
/// there) and `n` simulated nodes ready to join it, and the clock ticks
/// per second of /proc's CPU times.
struct UdpLab<'p> {
    dir: tempfile::TempDir,
    lh: Lighthouse,
    g: Gen<'p>,
    ticks: f64,
    rss_fresh: f64,
}

fn udp_lab<'p>(pki: &'p Pki, n: usize, bin: &Path) -> Result<UdpLab<'p>, String> {
    let dir = tempfile::Builder::new()
        .prefix("lighthouse-bench-")
        .tempdir()
        .map_err(|e| format!("creating a temporary directory: {e}"))?;
    let d = dir.path();
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("finding a free port: {e}"))?
        .port();
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let write = |name: &str, text: &str| {
        fs::write(d.join(name), text).map_err(|e| format!("writing {name}: {e}"))
    };
    write("ca.crt", &pki.ca.to_pem())?;
    write("lh.crt", &pki.lh.to_pem())?;
    write("lh.key", &pki.lh_key.to_pem())?;
    write(
        "lh.toml",
        &format!(
            "[pki]\nca = \"ca.crt\"\ncert = \"lh.crt\"\nkey = \"lh.key\"\n\
             [listen]\naddr = \"{addr}\"\n[api]\nsocket = \"lh.sock\"\n[log]\nlevel = \"warn\"\n"
        ),
    )?;
    let ticks: f64 = command_output("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0);
    eprintln!("lighthouse-bench: UDP, {n} nodes: building the nodes' sessions...");
    let fleet = Fleet::new(pki, n, Ipv4Addr::LOCALHOST);
    let net = Net::new(addr)?;
    let ports = (0..SOCKETS)
        .map(|s| net.port(s))
        .collect::<Result<Vec<_>, _>>()?;
    let lh = Lighthouse::start(bin, d, SocketAddr::V4(addr), &pki.probe)?;
    thread::sleep(Duration::from_millis(300));
    let rss_fresh = lh.mem_mib("VmRSS").unwrap_or(f64::NAN);
    let mut g = Gen {
        pki,
        fleet,
        net,
        n,
        ports,
        st: vec![St::New; n],
        pending: Default::default(),
        lookups: HashMap::new(),
        next_id: 0,
        timers: BinaryHeap::new(),
        newly_joined: Vec::new(),
        newly_failed: 0,
        phase: Phase::default(),
        cookies: 0,
        rekeys: 0,
        hello_resends: 0,
        bad: 0,
        first_bad: None,
    };
    for slots in &mut g.pending {
        *slots = vec![None; n];
    }
    Ok(UdpLab {
        dir,
        lh,
        g,
        ticks,
        rss_fresh,
    })
}

fn udp(pki: &Pki, n: usize, args: &Args, bin: &Path) -> Result<UdpRun, String> {
    let UdpLab {
        dir,
        mut lh,
        mut g,
        ticks,
        rss_fresh,
    } = udp_lab(pki, n, bin)?;
    let d = dir.path();
    let cpu0 = lh.cpu_s(ticks);
    let (join_s, cookies) = g
        .join_all(args.join_deadline, &mut lh, None)
        .map_err(|e| format!("{e}{}", lh.tail()))?;
    let join_cpu_s = match (cpu0, lh.cpu_s(ticks)) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    eprintln!(
        "lighthouse-bench: UDP: {n} joined in {join_s:.1} s ({:.0}/s), {cookies} cookie replies",
        n as f64 / join_s
    );
    let length = REGISTER_INTERVAL * args.cycles as u32;
    let regs = g.run_phase(
        &[(Kind::Register, REGISTER_INTERVAL)],
        length,
        args.lookups,
        &mut lh,
        ticks,
    )?;
    let rss_joined = lh.mem_mib("VmRSS").unwrap_or(f64::NAN);
    report_phase("registrations + lookups", &regs);
    let pings = g.run_phase(
        &[(Kind::Ping, REGISTER_INTERVAL)],
        length,
        0,
        &mut lh,
        ticks,
    )?;
    report_phase("pings", &pings);
    let cadence = g.run_phase(
        &[
            (Kind::Register, REGISTER_INTERVAL),
            (Kind::Routes, ROUTES_INTERVAL),
            (Kind::Zones, ZONES_INTERVAL),
        ],
        length,
        0,
        &mut lh,
        ticks,
    )?;
    report_phase("a node's cadence", &cadence);
    let rss_end = lh.mem_mib("VmRSS").unwrap_or(f64::NAN);
    let hwm = lh.mem_mib("VmHWM").unwrap_or(f64::NAN);
    let counters = lighthouse_counters(bin, d);
    lh.stop();
    Ok(UdpRun {
        rss_fresh,
        rss_joined,
        rss_end,
        hwm,
        join_s,
        join_cpu_s,
        cookies,
        hello_resends: g.hello_resends,
        rekeys: g.rekeys,
        regs,
        pings,
        cadence,
        send_errors: g.net.send_errors,
        foreign: g.net.foreign,
        on_lo: g.net.on_lo,
        bad: g.bad,
        first_bad: g.first_bad,
        counters,
    })
}

/// The running lighthouse's own counters (`tern-lighthouse status
/// --json`, after the measurements: its answer lists every node), or None
/// when it does not answer within 30 s.
fn lighthouse_counters(bin: &Path, dir: &Path) -> Option<serde_json::Value> {
    let path = dir.join("status.json");
    let out = fs::File::create(&path).ok()?;
    let mut child = Command::new(bin)
        .args(["status", "--config", "lh.toml", "--json"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).ok()?).ok()?;
    Some(serde_json::json!({
        "nodes": v["nodes"].as_array().map(Vec::len),
        "counters": v["counters"],
        "mesh_counters": v["mesh_counters"],
        "relay_introductions": v["relay_introductions"],
    }))
}

fn report_phase(label: &str, p: &Phase) {
    let kinds: Vec<String> = Kind::ALL
        .iter()
        .filter(|k| p.sent[k.index()] > 0)
        .map(|k| {
            let rtt = &p.rtt_ms[k.index()];
            format!(
                "{k:?} {}/{} answered, RTT p50 {:.3} p99 {:.3} ms",
                p.answered[k.index()],
                p.sent[k.index()],
                percentile(rtt, 0.5),
                percentile(rtt, 0.99)
            )
        })
        .collect();
    eprintln!(
        "lighthouse-bench: UDP {label}: lighthouse CPU {:.2} s in {:.0} s ({:.0} %), load generator {:.2} s; {}{}",
        p.lh_cpu_s,
        p.window_s,
        100.0 * p.lh_cpu_s / p.window_s,
        p.gen_cpu_s,
        kinds.join("; "),
        if p.lookups_sent > 0 {
            format!(
                "; lookups {}/{} right, RTT p50 {:.3} p99 {:.3} ms",
                p.lookup_rtt_ms.len(),
                p.lookups_sent,
                percentile(&p.lookup_rtt_ms, 0.5),
                percentile(&p.lookup_rtt_ms, 0.99)
            )
        } else {
            String::new()
        }
    );
}

// ---------------------------------------------------------------------------
// Report

struct Outcome {
    table: String,
    problems: Vec<String>,
}

fn fmt(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "—".into()
    }
}

fn pct(a: f64, b: f64) -> String {
    fmt(100.0 * a / b, 1)
}

/// One cell of the table: the node count and its two results.
type Cell<'a> = dyn Fn(usize, Option<&SansIo>, Option<&UdpRun>) -> String + 'a;

/// Per node count: a sans-IO result and a UDP result, either may be missing.
type Results = Vec<(usize, Option<SansIo>, Option<UdpRun>)>;

fn table(args: &Args, results: &Results) -> String {
    let counts: Vec<String> = results
        .iter()
        .map(|(n, _, _)| format!("{n} nodes"))
        .collect();
    let header = format!(
        "| metric | {} | goal |\n|---|{}---|\n",
        counts.join(" | "),
        "---|".repeat(results.len())
    );
    let mut rows = String::new();
    let mut row = |label: &str, goal: &str, f: &Cell<'_>| {
        let cells: Vec<String> = results
            .iter()
            .map(|(n, s, u)| f(*n, s.as_ref(), u.as_ref()))
            .collect();
        rows.push_str(&format!("| {label} | {} | {goal} |\n", cells.join(" | ")));
    };
    let dash = || "—".to_string();
    let regs_per_4s = |n: usize, us: f64| n as f64 * us / 1e6 / REGISTER_INTERVAL.as_secs_f64();
    row(
        "**sans-IO: the core in this process, only its calls timed**",
        "",
        &|_, _, _| String::new(),
    );
    row(
        "heap held by the core per registered node (bytes)",
        "100,000 nodes in < 1 GiB: < 10,737",
        &|_, s, _| s.map_or_else(dash, |s| fmt(s.heap_per_node, 0)),
    );
    row(
        "… of which boringtun's `Tunn`, inline (each live session boxed beside it, about 1.3 KB)",
        "",
        &|_, s, _| s.map_or_else(dash, |_| std::mem::size_of::<Tunn>().to_string()),
    );
    row(
        "… of which the registry's entry (measured alone)",
        "",
        &|_, s, _| s.map_or_else(dash, |s| fmt(s.registry_per_node, 0)),
    );
    row(
        "join: hello, handshake, first registration (core µs per node)",
        "",
        &|_, s, _| s.map_or_else(dash, |s| fmt(s.join_core_us, 1)),
    );
    row(
        "join: nodes per second, wall (attempts refused by the hello limit; cookie replies)",
        "",
        &|_, s, _| {
            s.map_or_else(dash, |s| {
                format!(
                    "{} in {} s ({}; {})",
                    fmt(s.joins_per_s, 0),
                    fmt(s.join_s, 1),
                    s.join_refused,
                    s.cookies
                )
            })
        },
    );
    row(
        "re-key: hello and handshake again (core µs; those the nodes' timers started, 120 s into a session: count, µs)",
        "",
        &|_, s, _| {
            s.map_or_else(dash, |s| {
                format!(
                    "{} ({}, {})",
                    fmt(s.rekey_us, 1),
                    s.timer_rekeys,
                    if s.timer_rekeys > 0 {
                        fmt(s.timer_rekey_us, 1)
                    } else {
                        "—".into()
                    }
                )
            })
        },
    );
    let msg = |k: Kind| {
        move |_: usize, s: Option<&SansIo>, _: Option<&UdpRun>| {
            s.map_or_else(dash, |s| cell(&s.per_msg_us[k.index()], 2))
        }
    };
    row("ping → pong, the baseline (core µs)", "", &msg(Kind::Ping));
    row("registration → ack (core µs)", "", &msg(Kind::Register));
    row("registration ÷ ping", "", &|_, s, _| {
        s.map_or_else(dash, |s| {
            let r = median(&mut s.per_msg_us[0].clone()) / median(&mut s.per_msg_us[1].clone());
            fmt(r, 2)
        })
    });
    row(
        "registrations per second of core time (1 / registration)",
        "",
        &|_, s, _| s.map_or_else(dash, |s| fmt(1e6 / median(&mut s.per_msg_us[0].clone()), 0)),
    );
    row("CPU per 1,000 registrations (ms)", "", &|_, s, _| {
        s.map_or_else(dash, |s| fmt(median(&mut s.per_msg_us[0].clone()), 2))
    });
    row(
        "route list read, RoutesQuery (core µs)",
        "",
        &msg(Kind::Routes),
    );
    row(
        "zone list read, ZonesQuery (core µs)",
        "",
        &msg(Kind::Zones),
    );
    row(
        "timers (`handle_timeout`, when `poll_timeout` says): ms per call, p50 / p99 / max",
        "",
        &|_, s, _| {
            s.map_or_else(dash, |s| {
                let max = s.ticks_ms.iter().copied().fold(f64::NAN, f64::max);
                format!(
                    "{} / {} / {}",
                    fmt(percentile(&s.ticks_ms, 0.5), 3),
                    fmt(percentile(&s.ticks_ms, 0.99), 3),
                    fmt(max, 3)
                )
            })
        },
    );
    row("timers: share of one core", "", &|_, s, _| {
        s.map_or_else(dash, |s| format!("{} %", fmt(100.0 * s.tick_share, 1)))
    });
    row(
        "every node re-registering every 4 s: share of one core (registrations + timers)",
        "≤ 100 %",
        &|n, s, _| {
            s.map_or_else(dash, |s| {
                let r = regs_per_4s(n, median(&mut s.per_msg_us[0].clone()));
                format!("{} %", fmt(100.0 * (r + s.tick_share), 1))
            })
        },
    );
    row(
        "… and reading the route and zone lists every 3 s each, as `tern up` does",
        "",
        &|n, s, _| {
            s.map_or_else(dash, |s| {
                let r = regs_per_4s(n, median(&mut s.per_msg_us[0].clone()));
                let q = n as f64
                    * (median(&mut s.per_msg_us[2].clone()) / ROUTES_INTERVAL.as_secs_f64()
                        + median(&mut s.per_msg_us[3].clone()) / ZONES_INTERVAL.as_secs_f64())
                    / 1e6;
                format!("{} %", fmt(100.0 * (r + q + s.tick_share), 1))
            })
        },
    );
    row(
        "… and re-keying every 120 s (WireGuard's REKEY_AFTER_TIME)",
        "",
        &|n, s, _| {
            s.map_or_else(dash, |s| {
                let r = regs_per_4s(n, median(&mut s.per_msg_us[0].clone()));
                let q = n as f64
                    * (median(&mut s.per_msg_us[2].clone()) / ROUTES_INTERVAL.as_secs_f64()
                        + median(&mut s.per_msg_us[3].clone()) / ZONES_INTERVAL.as_secs_f64())
                    / 1e6;
                let k = n as f64 * s.rekey_us / 120.0 / 1e6;
                format!("{} %", fmt(100.0 * (r + q + k + s.tick_share), 1))
            })
        },
    );
    let p50_p99 = |v: &[f64]| {
        format!(
            "{} / {}",
            fmt(percentile(v, 0.5), 1),
            fmt(percentile(v, 0.99), 1)
        )
    };
    row(
        "lookup by address: Query → QueryReply and Punch (core µs), p50 / p99",
        "p99 ≤ 1 ms",
        &|_, s, _| s.map_or_else(dash, |s| p50_p99(&s.lookups.by_address_us)),
    );
    row(
        "lookup by name (mesh DNS): NameQuery → NameReply and Punch (core µs), p50 / p99",
        "",
        &|_, s, _| s.map_or_else(dash, |s| p50_p99(&s.lookups.by_name_us)),
    );
    row(
        "lookup by address, the relay's introductions at their bound of 400,000 pairs (core µs), p50 / p99",
        "",
        &|_, s, _| s.map_or_else(dash, |s| p50_p99(&s.lookups.full_table_us)),
    );
    row(
        "**UDP: `tern-lighthouse` on 127.0.0.1, the load generator in this process**",
        "",
        &|_, _, _| String::new(),
    );
    row(
        "lighthouse VmRSS: fresh → with every node registered (MiB)",
        "",
        &|_, _, u| {
            u.map_or_else(dash, |u| {
                format!("{} → {}", fmt(u.rss_fresh, 1), fmt(u.rss_joined, 1))
            })
        },
    );
    row(
        "VmRSS per registered node (bytes)",
        "100,000 nodes in < 1 GiB",
        &|n, _, u| {
            u.map_or_else(dash, |u| {
                fmt((u.rss_joined - u.rss_fresh) * 1024.0 * 1024.0 / n as f64, 0)
            })
        },
    );
    row(
        "lighthouse VmHWM at the end (MiB)",
        "< 1,024",
        &|_, _, u| u.map_or_else(dash, |u| fmt(u.hwm, 1)),
    );
    row(
        "join: nodes per second, wall (lighthouse CPU per join, ms; cookie replies)",
        "",
        &|n, _, u| {
            u.map_or_else(dash, |u| {
                format!(
                    "{} ({}; {})",
                    fmt(n as f64 / u.join_s, 0),
                    fmt(u.join_cpu_s * 1e3 / n as f64, 3),
                    u.cookies
                )
            })
        },
    );
    let k =
        |p: &Phase, kind: Kind| format!("{} of {}", p.answered[kind.index()], p.sent[kind.index()]);
    let with_rekeys = |p: &Phase, kind: Kind| format!("{} ({} re-keys)", k(p, kind), p.rekeys);
    row(
        "pings (baseline), one per node every 4 s: answered (re-keys the nodes' timers started meanwhile)",
        "",
        &|_, _, u| u.map_or_else(dash, |u| with_rekeys(&u.pings, Kind::Ping)),
    );
    row(
        "… lighthouse CPU (% of one core; ms per 1,000 pings)",
        "",
        &|_, _, u| {
            u.map_or_else(dash, |u| {
                let p = &u.pings;
                format!(
                    "{} %; {}",
                    pct(p.lh_cpu_s, p.window_s),
                    fmt(p.lh_cpu_s * 1e6 / p.sent[1].max(1) as f64, 2)
                )
            })
        },
    );
    row(
        "registrations, one per node every 4 s: answered (re-keys meanwhile)",
        "",
        &|_, _, u| u.map_or_else(dash, |u| with_rekeys(&u.regs, Kind::Register)),
    );
    row(
        "… lighthouse CPU (% of one core; ms per 1,000 registrations)",
        "≤ 100 %",
        &|_, _, u| {
            u.map_or_else(dash, |u| {
                let p = &u.regs;
                format!(
                    "{} %; {}",
                    pct(p.lh_cpu_s, p.window_s),
                    fmt(p.lh_cpu_s * 1e6 / p.sent[0].max(1) as f64, 2)
                )
            })
        },
    );
    row("… CPU per registration ÷ per ping", "", &|_, _, u| {
        u.map_or_else(dash, |u| {
            let r = u.regs.lh_cpu_s / u.regs.sent[0].max(1) as f64;
            let p = u.pings.lh_cpu_s / u.pings.sent[1].max(1) as f64;
            fmt(r / p, 2)
        })
    });
    let rtt = |p: &Phase, kind: Kind| {
        let v = &p.rtt_ms[kind.index()];
        format!(
            "{} / {}",
            fmt(percentile(v, 0.5), 3),
            fmt(percentile(v, 0.99), 3)
        )
    };
    row("ping RTT p50 / p99 (ms), baseline", "", &|_, _, u| {
        u.map_or_else(dash, |u| rtt(&u.pings, Kind::Ping))
    });
    row("registration RTT p50 / p99 (ms)", "", &|_, _, u| {
        u.map_or_else(dash, |u| rtt(&u.regs, Kind::Register))
    });
    row(
        "lookup RTT p50 / p99 (ms), among the registrations (right answers of sent)",
        "p99 ≤ 1 ms",
        &|_, _, u| {
            u.map_or_else(dash, |u| {
                let v = &u.regs.lookup_rtt_ms;
                format!(
                    "{} / {} ({} of {})",
                    fmt(percentile(v, 0.5), 3),
                    fmt(percentile(v, 0.99), 3),
                    v.len(),
                    u.regs.lookups_sent
                )
            })
        },
    );
    row("lookup p99 ÷ ping p99", "", &|_, _, u| {
        u.map_or_else(dash, |u| {
            fmt(
                percentile(&u.regs.lookup_rtt_ms, 0.99) / percentile(&u.pings.rtt_ms[1], 0.99),
                2,
            )
        })
    });
    row(
        "`tern up`'s cadence (registration every 4 s, route and zone lists every 3 s): lighthouse CPU (% of one core)",
        "",
        &|_, _, u| u.map_or_else(dash, |u| format!("{} %", pct(u.cadence.lh_cpu_s, u.cadence.window_s))),
    );
    row(
        "… answered: registrations; route lists; zone lists",
        "",
        &|_, _, u| {
            u.map_or_else(dash, |u| {
                format!(
                    "{}; {}; {} ({} re-keys)",
                    k(&u.cadence, Kind::Register),
                    k(&u.cadence, Kind::Routes),
                    k(&u.cadence, Kind::Zones),
                    u.cadence.rekeys
                )
            })
        },
    );
    let build = if cfg!(debug_assertions) {
        " **Debug build**: not comparable with release figures."
    } else {
        ""
    };
    let nodes: Vec<String> = results.iter().map(|(n, _, _)| n.to_string()).collect();
    let mode = match (args.sansio, args.udp) {
        (true, false) => " --mode sansio",
        (false, true) => " --mode udp",
        _ => "",
    };
    let quick = if args.quick { " --quick" } else { "" };
    format!(
        "## Lighthouse: {} nodes on one lighthouse\n\n\
         {}\n\
         Command: `lighthouse-bench --nodes {} --cycles {} --lookups {}{mode}{quick}` (no root, loopback only).{build}\n\n\
         Every simulated node has its own certificate, its own WireGuard session (boringtun's `Tunn` on \
         its side) and its own underlay address, joins as `tern up` does (a hello asking for the \
         lighthouse's certificate, its own hello and a handshake initiation, a registration) and \
         re-registers every 4 s. **sans-IO**: a `LighthouseCore` built in the bench process as the \
         lighthouse's shell builds it (no keepalives, 30 s registry, relaying on), on the real clock; \
         only the time inside its calls counts (`handle_datagram` and draining `poll_transmit`; its \
         timers separately), and its heap with a counting allocator (the nodes' side is built first). \
         The steady figures are every node registering and pinging once per cycle as fast as the core \
         answers, and {LIST_SAMPLE} of them reading the route and zone lists ({} cycles: median \
         (min–max) of the per-cycle means); the shares of one core scale \
         them to one message per node every 4 s (every 3 s for the route and zone lists). \
         **UDP**: the release `tern-lighthouse` on 127.0.0.1 (default config, no `[enroll]`), the \
         nodes behind {SOCKETS} UDP sockets of the bench, each node sending from its own address in \
         127.64.0.0/16 (IP_PKTINFO); the lighthouse's VmRSS/VmHWM and utime + stime from /proc. Join: \
         at most {JOIN_WINDOW} nodes joining at once, the joined ones re-registering meanwhile; a \
         cookie reply is answered at once (a node waits for its 5 s handshake timer). Then three \
         phases of {} s each: registrations every 4 s per node with {} lookups (a random node asks \
         for another's address) spread among them; pings instead of registrations at the same rate \
         (the baseline: the cheapest message the same core answers in a session); `tern up`'s \
         cadence. Each node sends at its own moment of the period (the load generator sleeps \
         until the next one is due), so the messages arrive spread out, not in bursts; each node's \
         WireGuard timers run before its messages (a session is re-keyed two minutes after it \
         began). RTTs are the load generator's, send to answer. On this 2-core machine the \
         lighthouse and the load generator share the cores.\n\n\
         {header}{rows}",
        nodes.join(" and "),
        machine_line(),
        nodes.join(","),
        args.cycles,
        args.lookups,
        args.cycles,
        (REGISTER_INTERVAL * args.cycles as u32).as_secs(),
        args.lookups,
    )
}

fn problems(results: &Results) -> Vec<String> {
    let mut out = Vec::new();
    for (n, s, u) in results {
        if let Some(s) = s {
            if s.lookups.wrong > 0 {
                out.push(format!(
                    "sans-IO {n}: {} lookups answered wrongly",
                    s.lookups.wrong
                ));
            }
        }
        if let Some(u) = u {
            if u.bad > 0 {
                out.push(format!(
                    "UDP {n}: {} bad datagrams (first: {})",
                    u.bad,
                    u.first_bad.as_deref().unwrap_or("?")
                ));
            }
            if u.regs.lookups_wrong > 0 {
                out.push(format!(
                    "UDP {n}: {} lookups answered wrongly",
                    u.regs.lookups_wrong
                ));
            }
            if u.send_errors > 0 {
                out.push(format!("UDP {n}: {} sends failed", u.send_errors));
            }
            if !u.on_lo {
                eprintln!("lighthouse-bench: note: the sockets could not be bound to lo (SO_BINDTODEVICE); they take datagrams only from the lighthouse's address");
            }
            eprintln!(
                "lighthouse-bench: UDP {n}: {} re-keys, {} hellos resent, {} foreign datagrams, VmRSS at the end {:.1} MiB; the lighthouse's counters: {}",
                u.rekeys,
                u.hello_resends,
                u.foreign,
                u.rss_end,
                u.counters
                    .as_ref()
                    .map_or_else(|| "none (status did not answer)".into(), |c| c.to_string())
            );
        }
    }
    out
}

fn bench(args: &Args) -> Result<Outcome, Fail> {
    let bin = if args.udp || args.console {
        Some(find_bin("tern-lighthouse").map_err(Fail::Missing)?)
    } else {
        None
    };
    let max = args.nodes.iter().copied().max().unwrap_or(0);
    let t = Instant::now();
    let pki = make_pki(max)?;
    eprintln!(
        "lighthouse-bench: {max} node certificates signed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if let (true, Some(bin)) = (args.console, &bin) {
        return Ok(Outcome {
            table: console_bench(&pki, max, args, bin)?,
            problems: Vec::new(),
        });
    }
    let mut results: Results = Vec::new();
    for &n in &args.nodes {
        let s = if args.sansio {
            Some(sansio(&pki, n, args)?)
        } else {
            None
        };
        let u = match &bin {
            Some(bin) => Some(udp(&pki, n, args, bin)?),
            None => None,
        };
        results.push((n, s, u));
    }
    let problems = problems(&results);
    Ok(Outcome {
        table: table(args, &results),
        problems,
    })
}

/// `--mode console`: the admin console on a lighthouse holding `n`
/// nodes, over its API socket (the lighthouse's own work: no mesh path in
/// front): time to first byte and to the last of its pages, against a
/// static file of the same server (the baseline); then the lighthouse's
/// CPU while nodes join at 100 per second, with no console open and with
/// 10 watching live views (5 overviews, 5 node lists), each from a fresh
/// lighthouse.
fn console_bench(pki: &Pki, n: usize, args: &Args, bin: &Path) -> Result<String, String> {
    use tern_netns_tests::console_load::{median_p90, timed_get, Watchers};
    let samples = if args.quick { 5 } else { 25 };
    let joins = if args.quick { 200 } else { n.min(2000) };
    let mut lab = udp_lab(pki, n, bin)?;
    let (join_s, _) = lab
        .g
        .join_all(args.join_deadline, &mut lab.lh, None)
        .map_err(|e| format!("{e}{}", lab.lh.tail()))?;
    eprintln!("lighthouse-bench: console: {n} nodes joined in {join_s:.1} s");
    let pages: Vec<(&str, &str)> = vec![
        ("static file (baseline)", "/static/console.css"),
        ("overview", "/"),
        ("node list, first page (100 rows)", "/nodes"),
        (
            "node list, searched (\"100.65.1.\": a pass over all)",
            "/nodes?q=100.65.1.",
        ),
        ("API: nodes, a page of 1,000", "/api/v1/nodes?limit=1000"),
    ];
    let socket = lab.dir.path().join("lh.sock");
    let wanted: Vec<(String, String)> = pages
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    // The nodes keep registering (as `tern up` does) while the pages are
    // fetched, one at a time.
    let measurer = thread::spawn(move || {
        let mut rows = Vec::new();
        for (label, path) in wanted {
            timed_get(&socket, &path)?;
            let (mut first, mut full, mut bytes) = (Vec::new(), Vec::new(), 0);
            for _ in 0..samples {
                let f = timed_get(&socket, &path)?;
                if f.status != 200 {
                    return Err(format!("GET {path}: {}", f.status));
                }
                first.push(f.first_byte);
                full.push(f.full);
                bytes = f.bytes;
            }
            rows.push((label, median_p90(&mut first), median_p90(&mut full), bytes));
        }
        Ok::<_, String>(rows)
    });
    let cycles = if args.quick { 1 } else { 3 };
    lab.g.run_phase(
        &[(Kind::Register, REGISTER_INTERVAL)],
        REGISTER_INTERVAL * cycles,
        0,
        &mut lab.lh,
        lab.ticks,
    )?;
    let rows = measurer
        .join()
        .map_err(|_| "the page measurer panicked".to_string())??;
    lab.lh.stop();
    drop(lab);

    let mut cpu = Vec::new();
    for watching in [0usize, 10] {
        let mut lab = udp_lab(pki, joins, bin)?;
        let socket = lab.dir.path().join("lh.sock");
        let views = ["overview", "nodes"].repeat(watching / 2);
        let watchers = if watching > 0 {
            Some(Watchers::start(&socket, &views)?)
        } else {
            None
        };
        let c0 = lab.lh.cpu_s(lab.ticks);
        let (join_s, _) = lab
            .g
            .join_all(args.join_deadline, &mut lab.lh, Some(100.0))
            .map_err(|e| format!("{e}{}", lab.lh.tail()))?;
        let c1 = lab.lh.cpu_s(lab.ticks);
        let updates = watchers
            .map(Watchers::stop)
            .transpose()?
            .unwrap_or_default();
        let used = match (c0, c1) {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        };
        eprintln!("lighthouse-bench: console: {joins} joins at 100/s with {watching} consoles: {used:.2} s CPU over {join_s:.1} s");
        cpu.push((watching, used, join_s, updates));
    }

    let ms = |d: Duration| fmt(d.as_secs_f64() * 1000.0, 2);
    let base = rows.first().map_or(f64::NAN, |r| r.2 .0.as_secs_f64());
    let mut t = format!(
        "## Admin console: its pages on {n} nodes, live views while nodes join\n\n\
         `lighthouse-bench --mode console` ({n} registered nodes, each \
         re-registering every 4 s meanwhile; {samples} fetches each over the lighthouse's \
         API socket, so the figures are the lighthouse's own work, not the mesh path):\n\n\
         | page | first byte, median (p90) | full load, median (p90) | bytes | full load ÷ static file |\n\
         |---|---|---|---|---|\n"
    );
    for (label, (f50, f90), (l50, l90), bytes) in &rows {
        t.push_str(&format!(
            "| {label} | {} ms ({}) | {} ms ({}) | {bytes} | {} |\n",
            ms(*f50),
            ms(*f90),
            ms(*l50),
            ms(*l90),
            fmt(l50.as_secs_f64() / base, 1)
        ));
    }
    let none = cpu.first().map_or(f64::NAN, |c| c.1);
    t.push_str(&format!(
        "\nThe lighthouse's CPU while {joins} nodes join at 100 per second (a fresh \
         lighthouse each time; the live views re-render at most every 0.5 s):\n\n\
         | consoles watching | lighthouse CPU (s) | over (s) | CPU ÷ none | updates each console got |\n\
         |---|---|---|---|---|\n"
    ));
    for (watching, used, secs, updates) in &cpu {
        let got = if updates.is_empty() {
            "—".to_string()
        } else {
            let (lo, hi) = (updates.iter().min(), updates.iter().max());
            format!("{}–{}", lo.unwrap_or(&0), hi.unwrap_or(&0))
        };
        t.push_str(&format!(
            "| {watching} | {} | {} | {} | {got} |\n",
            fmt(*used, 2),
            fmt(*secs, 1),
            fmt(used / none, 2)
        ));
    }
    Ok(t)
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

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lighthouse-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = match bench(&args) {
        Ok(o) => o,
        Err(Fail::Missing(e)) => {
            eprintln!("lighthouse-bench: {e}");
            return ExitCode::from(2);
        }
        Err(Fail::Step(e)) => {
            eprintln!("lighthouse-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", outcome.table);
    if !outcome.problems.is_empty() {
        for p in &outcome.problems {
            eprintln!("lighthouse-bench: {p}");
        }
        eprintln!("lighthouse-bench: not writing BENCHMARKS.md");
        return ExitCode::FAILURE;
    }
    if args.write {
        let section = if args.console {
            "lighthouse-console"
        } else {
            "lighthouse"
        };
        match write_section(section, &outcome.table) {
            Ok(path) => eprintln!(
                "lighthouse-bench: wrote the section into {}",
                path.display()
            ),
            Err(e) => {
                eprintln!("lighthouse-bench: writing BENCHMARKS.md: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
