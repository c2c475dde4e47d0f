//! The simulated network the simulation tests drive: hosts (nodes and
//! lighthouses, the real sans-IO cores) at underlay addresses, NATs in
//! front of some of them, one clock advanced by hand.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tern_lighthouse_core::lighthouse::LighthouseCore;
use tern_lighthouse_core::registry::Registry;
use tern_lighthouse_core::relay::RelayTable;
use tern_mesh::{Mesh, MeshSettings, Transmit, TIMER_TICK};
use tern_node_core::node::{LighthouseTarget, NodeCore};
use tern_shared::testing::{open_firewall, TestCa, TestNode, TEST_NOW};

pub const LH_ADDR: &str = "198.18.0.1:4242";

pub enum Host {
    Node {
        core: Box<NodeCore>,
        tun: Vec<Vec<u8>>,
    },
    Lighthouse(Box<LighthouseCore>),
}

pub struct Net {
    pub hosts: BTreeMap<SocketAddr, Host>,
    pub now: Instant,
    /// When the simulation started: its wall clock is [`TEST_NOW`] then.
    pub origin: Instant,
    /// Datagrams delivered, by first byte, for assertions.
    pub delivered: usize,
    pub nats: Vec<Nat>,
    /// Public addresses that cannot reach each other (a firewall between them).
    pub blocked: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Loss, duplication and reordering on every path (none by default).
    pub faults: Faults,
    /// Called with each step the clock takes (the model simulator moves
    /// boringtun's mock clock with it).
    pub on_advance: Option<fn(Duration)>,
    /// Datagrams that reached an address with no host (the last thousand):
    /// what a node sent toward a stranger.
    pub unclaimed: Vec<(SocketAddr, Vec<u8>)>,
}

/// What the network does to datagrams, decided by a seeded generator so
/// that a run replays exactly.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Datagrams lost, per thousand.
    pub loss_per_mille: u32,
    /// Datagrams delivered twice, per thousand.
    pub duplicate_per_mille: u32,
    /// Each round's datagrams delivered in a shuffled order.
    pub reorder: bool,
    pub seed: u64,
    /// What was done, for the figures.
    pub lost: u64,
    pub duplicated: u64,
}

impl Faults {
    /// The next number from the generator (xorshift64*).
    fn next(&mut self) -> u64 {
        let mut x = self.seed | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.seed = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn roll(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && (self.next() % 1000) < u64::from(per_mille)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Linux MASQUERADE: the inside port kept, replies only from where we sent.
    PortPreserving,
    /// MASQUERADE --random-fully: a new port per destination.
    Symmetric,
}

/// A NAT in front of some hosts: outbound datagrams get its public address;
/// inbound ones pass only as replies to what an inside host sent (the remote
/// address and port must match).
pub struct Nat {
    pub public_ip: Ipv4Addr,
    pub kind: NatKind,
    pub inside: Vec<SocketAddr>,
    /// (public port, remote) -> inside host: what may come in.
    pub allowed: HashMap<(u16, SocketAddr), SocketAddr>,
    pub symmetric_ports: HashMap<(SocketAddr, SocketAddr), u16>,
    pub next_port: u16,
    /// Added to preserved ports: a rebinding moves every mapping.
    pub port_shift: u16,
}

impl Nat {
    pub fn outbound(&mut self, inside: SocketAddr, remote: SocketAddr) -> SocketAddr {
        let port = match self.kind {
            NatKind::PortPreserving => inside.port() + self.port_shift,
            NatKind::Symmetric => {
                let next = &mut self.next_port;
                *self
                    .symmetric_ports
                    .entry((inside, remote))
                    .or_insert_with(|| {
                        *next += 7;
                        *next
                    })
            }
        };
        self.allowed.insert((port, remote), inside);
        SocketAddr::new(self.public_ip.into(), port)
    }

    pub fn inbound(&self, port: u16, remote: SocketAddr) -> Option<SocketAddr> {
        self.allowed.get(&(port, remote)).copied()
    }

    /// The NAT forgets every mapping and hands out new ports (a conntrack
    /// flush, or a new public address's worth of change).
    pub fn rebind(&mut self) {
        self.allowed.clear();
        self.symmetric_ports.clear();
        self.port_shift += 1000;
        self.next_port += 1000;
    }
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn ip4(a: SocketAddr) -> Ipv4Addr {
    match a.ip() {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(_) => panic!("IPv4 only"),
    }
}

impl Net {
    /// The simulation's wall clock: [`TEST_NOW`] at its start, moving with
    /// its time. A host started later (a restart) starts from it too.
    pub fn unix_now(&self) -> u64 {
        TEST_NOW + self.now.saturating_duration_since(self.origin).as_secs()
    }

    pub fn new() -> Net {
        let start = Instant::now();
        Net {
            hosts: BTreeMap::new(),
            now: start,
            origin: start,
            delivered: 0,
            nats: Vec::new(),
            blocked: Vec::new(),
            faults: Faults::default(),
            on_advance: None,
            unclaimed: Vec::new(),
        }
    }

    /// A NAT with public address `public_ip`; returns its index.
    pub fn add_nat(&mut self, public_ip: &str, kind: NatKind) -> usize {
        self.nats.push(Nat {
            public_ip: public_ip.parse().unwrap(),
            kind,
            inside: Vec::new(),
            allowed: HashMap::new(),
            symmetric_ports: HashMap::new(),
            next_port: 40_000,
            port_shift: 0,
        });
        self.nats.len() - 1
    }

    /// A node at private address `at` behind NAT `nat`.
    pub fn add_node_behind(&mut self, ca: &TestCa, node: &TestNode, at: &str, nat: usize) {
        self.nats[nat].inside.push(addr(at));
        self.add_node(ca, node, at);
    }

    /// Where a datagram from `from` to `dst` lands: the source address the
    /// receiver sees and the host it reaches. None: lost on the way.
    pub fn route(&mut self, from: SocketAddr, dst: SocketAddr) -> Option<(SocketAddr, SocketAddr)> {
        let src_nat = self.nats.iter().position(|n| n.inside.contains(&from));
        if let Some(i) = src_nat {
            if self.nats[i].inside.contains(&dst) {
                return Some((from, dst)); // the same LAN
            }
        }
        if self.nats.iter().any(|n| n.inside.contains(&dst)) {
            return None; // someone else's private address
        }
        let apparent = match src_nat {
            Some(i) => self.nats[i].outbound(from, dst),
            None => from,
        };
        let (a, b) = (ip4(apparent), ip4(dst));
        if self
            .blocked
            .iter()
            .any(|&(x, y)| (x, y) == (a, b) || (y, x) == (a, b))
        {
            return None;
        }
        match self.nats.iter().position(|n| n.public_ip == b) {
            Some(j) => Some((apparent, self.nats[j].inbound(dst.port(), apparent)?)),
            None => Some((apparent, dst)),
        }
    }

    /// Hands one datagram to the host it reaches.
    pub fn deliver(&mut self, from: SocketAddr, t: Transmit, buf: &mut [u8]) {
        if self.faults.roll(self.faults.loss_per_mille) {
            self.faults.lost += 1;
            return;
        }
        if self.faults.roll(self.faults.duplicate_per_mille) {
            self.faults.duplicated += 1;
            self.deliver_once(
                from,
                Transmit {
                    dst: t.dst,
                    payload: t.payload.clone(),
                },
                buf,
            );
        }
        self.deliver_once(from, t, buf);
    }

    fn deliver_once(&mut self, from: SocketAddr, t: Transmit, buf: &mut [u8]) {
        let Some((source, host)) = self.route(from, t.dst) else {
            return;
        };
        self.delivered += 1;
        let _host = tracing::debug_span!("host", at = %host).entered();
        match self.hosts.get_mut(&host) {
            Some(Host::Node { core, tun }) => {
                if let Some(p) = core.handle_datagram(source, &t.payload, buf, self.now) {
                    tun.push(p.to_vec());
                }
            }
            Some(Host::Lighthouse(core)) => core.handle_datagram(source, &t.payload, self.now),
            None => {
                if self.unclaimed.len() >= 1000 {
                    self.unclaimed.remove(0);
                }
                self.unclaimed.push((host, t.payload));
            }
        }
    }

    pub fn add_lighthouse(&mut self, ca: &TestCa, node: &TestNode) {
        self.add_lighthouse_at(ca, node, LH_ADDR);
    }

    pub fn add_lighthouse_at(&mut self, ca: &TestCa, node: &TestNode, at: &str) {
        let pool = ca.pool();
        let cert = node.verified(&pool);
        let mesh = Mesh::new(
            node.key.static_secret(),
            &cert,
            pool,
            MeshSettings {
                keepalive: None,
                ..MeshSettings::default()
            },
            self.now,
            self.unix_now(),
        );
        let mut core = LighthouseCore::new(
            mesh,
            &cert,
            Registry::new(Duration::from_secs(30), 1000),
            self.now,
        );
        core.enable_relay(RelayTable::new(4000, Duration::from_secs(300), 20_000));
        self.hosts
            .insert(addr(at), Host::Lighthouse(Box::new(core)));
    }

    pub fn add_node(&mut self, ca: &TestCa, node: &TestNode, at: &str) {
        self.add_node_with(ca, node, at, &[LH_ADDR]);
    }

    pub fn add_node_with(&mut self, ca: &TestCa, node: &TestNode, at: &str, lighthouses: &[&str]) {
        let pool = ca.pool();
        let cert = node.verified(&pool);
        let mesh = Mesh::new(
            node.key.static_secret(),
            &cert,
            pool,
            MeshSettings::default(),
            self.now,
            self.unix_now(),
        );
        let targets = lighthouses
            .iter()
            .map(|l| LighthouseTarget {
                endpoint: addr(l),
                name: None,
            })
            .collect();
        let mut core = NodeCore::new(mesh, &cert, targets, self.now);
        core.set_local_endpoints(vec![addr(at)]);
        core.set_policy(&open_firewall(), vec![], &[]);
        self.hosts.insert(
            addr(at),
            Host::Node {
                core: Box::new(core),
                tun: Vec::new(),
            },
        );
    }

    /// Delivers every queued datagram until the network is quiet.
    pub fn settle(&mut self) {
        let mut buf = vec![0u8; 65_536];
        for _ in 0..200 {
            let mut queue = Vec::new();
            for (from, host) in self.hosts.iter_mut() {
                let mut next = || match host {
                    Host::Node { core, .. } => core.poll_transmit(),
                    Host::Lighthouse(core) => core.poll_transmit(),
                };
                while let Some(t) = next() {
                    queue.push((*from, t));
                }
            }
            if queue.is_empty() {
                return;
            }
            if self.faults.reorder {
                for i in (1..queue.len()).rev() {
                    let j = (self.faults.next() % (i as u64 + 1)) as usize;
                    queue.swap(i, j);
                }
            }
            for (from, t) in queue {
                self.deliver(from, t, &mut buf);
            }
        }
        panic!("network did not settle");
    }

    /// Advances the clock in timer ticks, running every host's timers.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += TIMER_TICK;
            if let Some(advance) = self.on_advance {
                advance(TIMER_TICK);
            }
            for (at, host) in self.hosts.iter_mut() {
                let _host = tracing::debug_span!("host", %at).entered();
                match host {
                    Host::Node { core, .. } => core.handle_timeout(self.now),
                    Host::Lighthouse(core) => core.handle_timeout(self.now),
                }
            }
            self.settle();
        }
    }

    pub fn node(&mut self, at: &str) -> (&mut NodeCore, &mut Vec<Vec<u8>>) {
        match self.hosts.get_mut(&addr(at)) {
            Some(Host::Node { core, tun }) => (core, tun),
            _ => panic!("no node at {at}"),
        }
    }

    pub fn lighthouse(&mut self) -> &mut LighthouseCore {
        self.lighthouse_at(LH_ADDR)
    }

    pub fn lighthouse_at(&mut self, at: &str) -> &mut LighthouseCore {
        match self.hosts.get_mut(&addr(at)) {
            Some(Host::Lighthouse(core)) => core,
            _ => panic!("no lighthouse"),
        }
    }

    /// A packet written to `at`'s TUN device.
    pub fn send_from_tun(&mut self, at: &str, packet: &[u8]) {
        let now = self.now;
        let mut out = vec![0u8; 65_536];
        let from = addr(at);
        let _host = tracing::debug_span!("host", at).entered();
        let (core, _) = self.node(at);
        let sent = core
            .handle_tun_packet(packet, &mut out, now)
            .map(|(dst, b)| Transmit {
                dst,
                payload: b.to_vec(),
            });
        if let Some(t) = sent {
            let mut buf = vec![0u8; 65_536];
            self.deliver(from, t, &mut buf);
        }
        self.settle();
    }

    pub fn relay_counters(&mut self) -> tern_lighthouse_core::relay::RelayCounters {
        let now = self.now;
        self.lighthouse().status(now).relay
    }

    pub fn registered(&mut self, at: &str) -> bool {
        self.node(at)
            .0
            .status()
            .lighthouses
            .iter()
            .all(|l| l.registered)
    }
}
