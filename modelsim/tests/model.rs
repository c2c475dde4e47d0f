//! The model-checked simulator: proptest-state-machine generates sequences
//! of transitions — nodes starting, leaving and crashing, the lighthouse
//! restarting, NATs rebinding, loss, duplication and reordering coming and
//! going, the clock jumping by up to ten minutes, packets sent (some with a
//! forged source), a stranger with a foreign certificate trying to
//! handshake, certificates revoked and expiring — and runs them against
//! the real sans-IO cores (NodeCore,
//! LighthouseCore, Mesh, boringtun on a mock clock the simulation moves)
//! on the simulated network of `tests/tests/simnet`. After every step the
//! reference model's rules are checked:
//!
//! - every packet a node's TUN device gets was sent by the node its source
//!   names, to this node, and was not forged (no spoofed source, nothing
//!   from the stranger);
//! - no node ever answers the stranger's handshake;
//! - nothing of a revoked certificate reaches a node that knew of the
//!   revocation, and nothing sent after a certificate expired is delivered;
//! - `Check(a, b)`: once the network heals, two running nodes reach each
//!   other within [`CONVERGE`] of simulated time, whatever came before.
//!
//! A failing sequence shrinks to a minimal one. `PROPTEST_CASES` sets how
//! many sequences run (CI: a few dozen; RELIABILITY.md: the campaign).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use tern_mesh::Transmit;
use tern_shared::packet;
use tern_shared::testing::{TestCa, TestNode};
use tern_shared::wire;

#[path = "../../tests/tests/simnet/mod.rs"]
mod simnet;
use simnet::{addr, Host, NatKind, Net, LH_ADDR};

/// Nodes in the model: one on the public underlay, two on one LAN behind a
/// port-preserving NAT, one behind a symmetric NAT.
const SLOTS: usize = 4;
const AT: [&str; SLOTS] = [
    "198.18.0.10:4242",
    "198.19.1.11:4242",
    // Another port than its LAN neighbour's: the simulated NAT keeps
    // ports as they are and has no way to pick another on a clash.
    "198.19.1.12:4243",
    "198.19.2.13:4242",
];
const OVERLAY: [&str; SLOTS] = ["100.64.0.10", "100.64.0.11", "100.64.0.12", "100.64.0.13"];
/// Which NAT each slot sits behind.
const BEHIND: [Option<usize>; SLOTS] = [None, Some(0), Some(0), Some(1)];
/// Where the stranger (a certificate from another CA) sends from.
const STRANGER: &str = "198.18.0.66:4242";
/// How long two running nodes may take to reach each other once the
/// network heals.
const CONVERGE: Duration = Duration::from_secs(90);
/// Slot 2's certificate lives this long (simulated time); the others a
/// year. A sequence's clock jumps reach it often.
const SHORT_LIFETIME: u64 = 600;
/// How long after it is made a revocation must have reached every running
/// node (the network heals for it).
const REVOCATION_SPREAD: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
enum Transition {
    Start(usize),
    /// `tern down`: leaves the mesh, then stops.
    Stop(usize),
    /// Gone without a word (the process killed, the host lost).
    Crash(usize),
    RestartLighthouse,
    Rebind(usize),
    Faults {
        loss_per_mille: u32,
        duplicate_per_mille: u32,
        reorder: bool,
    },
    Advance(Duration),
    Send(usize, usize),
    /// `from` sends a packet whose source is `claimed`'s overlay address.
    Spoof {
        from: usize,
        claimed: usize,
        to: usize,
    },
    /// The stranger sends its hello and a handshake initiation to a node.
    Stranger(usize),
    /// The network heals; the two nodes must reach each other (unless a
    /// certificate of theirs has expired: then nothing may pass).
    Check(usize, usize),
    /// `tern-lighthouse revoke`: the node's certificate is revoked. The
    /// network heals while the revocation spreads.
    Revoke(usize),
}

/// What the model knows: which nodes run, whose certificate is revoked.
#[derive(Debug, Clone)]
struct Model {
    up: [bool; SLOTS],
    revoked: [bool; SLOTS],
}

const FRESH: Model = Model {
    up: [true; SLOTS],
    revoked: [false; SLOTS],
};

struct ModelMachine;

impl ReferenceStateMachine for ModelMachine {
    type State = Model;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<Model> {
        Just(FRESH).boxed()
    }

    fn transitions(_state: &Model) -> BoxedStrategy<Transition> {
        let slot = 0..SLOTS;
        prop_oneof![
            2 => slot.clone().prop_map(Transition::Start),
            1 => slot.clone().prop_map(Transition::Stop),
            1 => slot.clone().prop_map(Transition::Crash),
            1 => Just(Transition::RestartLighthouse),
            1 => (0..2usize).prop_map(Transition::Rebind),
            2 => (
                prop_oneof![Just(0u32), Just(50), Just(300)],
                prop_oneof![Just(0u32), Just(20)],
                any::<bool>()
            )
                .prop_map(|(loss_per_mille, duplicate_per_mille, reorder)| Transition::Faults {
                    loss_per_mille,
                    duplicate_per_mille,
                    reorder
                }),
            3 => prop_oneof![
                4 => (0u64..5_000).prop_map(Duration::from_millis),
                2 => (5u64..180).prop_map(Duration::from_secs),
                1 => (180u64..600).prop_map(Duration::from_secs),
            ]
            .prop_map(Transition::Advance),
            4 => (slot.clone(), slot.clone()).prop_map(|(a, b)| Transition::Send(a, b)),
            1 => (slot.clone(), slot.clone(), slot.clone())
                .prop_map(|(from, claimed, to)| Transition::Spoof { from, claimed, to }),
            1 => slot.clone().prop_map(Transition::Stranger),
            3 => (slot.clone(), slot.clone()).prop_map(|(a, b)| Transition::Check(a, b)),
            1 => slot.prop_map(Transition::Revoke),
        ]
        .boxed()
    }

    fn preconditions(state: &Model, t: &Transition) -> bool {
        match *t {
            Transition::Start(i) => !state.up[i],
            Transition::Stop(i) | Transition::Crash(i) => state.up[i],
            Transition::Send(a, b) => a != b && state.up[a],
            Transition::Check(a, b) => {
                a != b && state.up[a] && !state.revoked[a] && !state.revoked[b]
            }
            // At most two: the rest of the mesh must still have pairs.
            Transition::Revoke(i) => {
                !state.revoked[i] && state.revoked.iter().filter(|r| **r).count() < 2
            }
            Transition::Spoof { from, claimed, to } => {
                state.up[from] && from != claimed && from != to
            }
            _ => true,
        }
    }

    fn apply(mut state: Model, t: &Transition) -> Model {
        match *t {
            Transition::Start(i) => state.up[i] = true,
            Transition::Stop(i) | Transition::Crash(i) => state.up[i] = false,
            Transition::Revoke(i) => state.revoked[i] = true,
            _ => {}
        }
        state
    }
}

/// One packet sent in the run, by its id.
#[derive(Debug, Clone, Copy)]
struct Sent {
    from: usize,
    to: usize,
    forged: bool,
    /// The simulation's wall clock when it was sent (unix seconds).
    unix: u64,
}

/// The real cores on the simulated network, and what was sent.
struct System {
    net: Net,
    ca: TestCa,
    nodes: Vec<TestNode>,
    lighthouse: TestNode,
    stranger: TestNode,
    sent: HashMap<u64, Sent>,
    delivered: HashMap<u64, usize>,
    next_id: u64,
    /// The lighthouse's revocation list (versioned, as its store keeps it
    /// across restarts).
    revocations: Vec<(u32, tern_shared::control::Revocation)>,
    /// Nodes whose revocation has spread: nothing of theirs may be
    /// delivered from then on.
    revoked: [bool; SLOTS],
    /// How many revocations each node knew when the step began: those it
    /// learned, or all there were when it started (a node just started
    /// must not take a peer revoked before, even before it registers).
    knew: [usize; SLOTS],
    /// How many revocations there were when each node last started.
    started_with: [usize; SLOTS],
}

/// Each case starts boringtun's clocks afresh: the wall clock at the
/// certificates' time.
fn reset_clocks() {
    mock_instant::MockClock::set_time(Duration::ZERO);
    mock_instant::MockClock::set_system_time(Duration::from_secs(tern_shared::testing::TEST_NOW));
}

/// boringtun's clocks move with the simulation's: the monotonic one (its
/// timers) and the wall clock its handshake timestamps start from.
fn advance_clocks(d: Duration) {
    mock_instant::MockClock::advance(d);
    mock_instant::MockClock::advance_system_time(d);
}

impl System {
    fn new() -> System {
        let ca = TestCa::new("model-ca", &["100.64.0.0/10"], &["lighthouse", "ci"]);
        let lighthouse = ca.node("lh1", "100.64.0.1/10", &["lighthouse"], &[], 365 * 86_400);
        let nodes: Vec<TestNode> = (0..SLOTS)
            .map(|i| {
                ca.node(
                    &format!("n{i}"),
                    &format!("{}/10", OVERLAY[i]),
                    &["ci"],
                    &[],
                    if i == 2 { SHORT_LIFETIME } else { 365 * 86_400 },
                )
            })
            .collect();
        let foreign = TestCa::new("foreign-ca", &["100.64.0.0/10"], &[]);
        let stranger = foreign.node("n0", "100.64.0.10/10", &[], &[], 365 * 86_400);
        let mut net = Net::new();
        net.on_advance = Some(advance_clocks);
        net.add_nat("198.18.0.100", NatKind::PortPreserving);
        net.add_nat("198.18.0.101", NatKind::Symmetric);
        for (i, at) in AT.iter().enumerate() {
            if let Some(nat) = BEHIND[i] {
                net.nats[nat].inside.push(addr(at));
            }
        }
        net.add_lighthouse(&ca, &lighthouse);
        let mut system = System {
            net,
            ca,
            nodes,
            lighthouse,
            stranger,
            sent: HashMap::new(),
            delivered: HashMap::new(),
            next_id: 1,
            revocations: Vec::new(),
            revoked: [false; SLOTS],
            knew: [0; SLOTS],
            started_with: [0; SLOTS],
        };
        for i in 0..SLOTS {
            system.start(i);
        }
        system.net.run_for(Duration::from_secs(2));
        system
    }

    fn start(&mut self, i: usize) {
        self.started_with[i] = self.revocations.len();
        self.net.add_node(&self.ca, &self.nodes[i], AT[i]);
    }

    fn stop(&mut self, i: usize, graceful: bool) {
        if graceful {
            let now = self.net.now;
            if let Some(Host::Node { core, .. }) = self.net.hosts.get_mut(&addr(AT[i])) {
                core.shutdown(now);
            }
            self.net.settle();
        }
        self.net.hosts.remove(&addr(AT[i]));
    }

    /// A UDP packet from `from`'s TUN device to `to`, with `claimed`'s
    /// overlay address as its source; its id is remembered.
    fn send(&mut self, from: usize, claimed: usize, to: usize) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let unix = self.unix_now();
        self.sent.insert(
            id,
            Sent {
                from,
                to,
                forged: from != claimed,
                unix,
            },
        );
        let ip = |i: usize| {
            OVERLAY[i]
                .parse::<Ipv4Addr>()
                .unwrap_or(Ipv4Addr::UNSPECIFIED)
        };
        let mut payload = b"model".to_vec();
        payload.extend_from_slice(&id.to_be_bytes());
        let p = packet::build_udp_ipv4(ip(claimed), ip(to), 5000, 5001, &payload);
        self.net.send_from_tun(AT[from], &p);
        id
    }

    /// The stranger: its hello (a certificate of another CA) and a real
    /// WireGuard initiation toward `to`'s public key.
    fn stranger(&mut self, to: usize) {
        let cert = self.stranger.cert.encode();
        let hello = wire::Hello {
            wants_reply: true,
            cert: &cert,
        }
        .encode();
        let mut tunn = boringtun::noise::Tunn::new(
            self.stranger.key.static_secret(),
            x25519_dalek::PublicKey::from(self.nodes[to].cert.body.public_key),
            None,
            None,
            7,
            None,
        );
        let mut buf = vec![0u8; 2048];
        let initiation = match tunn.format_handshake_initiation(&mut buf, false) {
            boringtun::noise::TunnResult::WriteToNetwork(b) => b.to_vec(),
            _ => Vec::new(),
        };
        let mut scratch = vec![0u8; 65_536];
        // Toward where the node can be reached from outside: its own
        // address, or its NAT's (where only replies get in).
        let dst = match BEHIND[to] {
            None => addr(AT[to]),
            Some(nat) => SocketAddr::new(self.net.nats[nat].public_ip.into(), 4242),
        };
        for payload in [hello, initiation] {
            self.net
                .deliver(addr(STRANGER), Transmit { dst, payload }, &mut scratch);
        }
        self.net.settle();
    }

    /// Takes what every TUN device got and checks it against what was
    /// sent; the stranger got no handshake answer.
    fn check_deliveries(&mut self) {
        for (i, at) in AT.iter().enumerate() {
            let got: Vec<Vec<u8>> = match self.net.hosts.get_mut(&addr(at)) {
                Some(Host::Node { tun, .. }) => std::mem::take(tun),
                _ => continue,
            };
            for p in got {
                let view = packet::parse_udp_ipv4(&p)
                    .unwrap_or_else(|| panic!("n{i}'s TUN got a packet that is not ours: {p:?}"));
                let id = view
                    .payload
                    .strip_prefix(b"model")
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or_else(|| panic!("n{i} got a packet nobody sent"));
                let sent = self
                    .sent
                    .get(&id)
                    .copied()
                    .unwrap_or_else(|| panic!("unknown id {id}"));
                assert!(
                    !sent.forged,
                    "n{i} got packet {id} with a forged source: {sent:?}"
                );
                assert_eq!(sent.to, i, "packet {id} reached the wrong node");
                assert_eq!(
                    view.src.to_string(),
                    OVERLAY[sent.from],
                    "packet {id}'s source is not its sender's"
                );
                // Once a node knows of a revocation (when a step began),
                // or was started after it, nothing of that certificate
                // reaches it: a node just started holds sessions with
                // nodes until its lighthouse brought the list.
                assert!(
                    !self.revoked[sent.from] || self.knew[i] < self.revocations.len(),
                    "n{i} got packet {id} from n{} after its certificate's revocation spread",
                    sent.from
                );
                let not_after = self.nodes[sent.from].cert.body.not_after;
                assert!(
                    sent.unix <= not_after + 1,
                    "n{i} got packet {id}, sent by n{} at {} when its certificate had expired at {not_after}",
                    sent.from,
                    sent.unix
                );
                *self.delivered.entry(id).or_default() += 1;
            }
        }
        for (dst, payload) in &self.net.unclaimed {
            if *dst == addr(STRANGER) {
                assert_ne!(
                    wire::classify(payload),
                    wire::classify(&[2, 0, 0, 0]),
                    "a node answered the stranger's handshake"
                );
            }
        }
    }

    fn unix_now(&self) -> u64 {
        self.net.unix_now()
    }

    /// Whether `i`'s certificate expires before `within` has passed.
    fn expires_within(&self, i: usize, within: Duration) -> bool {
        self.unix_now() + within.as_secs() + 1 >= self.nodes[i].cert.body.not_after
    }

    /// How many revocations node `i` has learned (0 when it is not running).
    fn revocations_known(&mut self, i: usize) -> usize {
        match self.net.hosts.get_mut(&addr(AT[i])) {
            Some(Host::Node { core, .. }) => core.status().revoked_certs,
            _ => 0,
        }
    }

    /// The lighthouse revokes `i`'s certificate (it keeps the list across
    /// restarts, as its store does); the network heals while it spreads,
    /// and from then on nothing of `i`'s may be delivered.
    fn revoke(&mut self, i: usize) {
        self.heal();
        let version = self.revocations.len() as u32 + 1;
        self.revocations.push((
            version,
            tern_shared::control::Revocation {
                fingerprint: self.nodes[i].cert.fingerprint(),
                not_after: self.nodes[i].cert.body.not_after,
            },
        ));
        self.restore_revocations();
        self.net.run_for(REVOCATION_SPREAD);
        // What arrived while it spread is the last that may.
        self.check_deliveries();
        self.revoked[i] = true;
    }

    fn restore_revocations(&mut self) {
        let now = self.net.now;
        let list = self.revocations.clone();
        self.net.lighthouse().set_revocations(list, now);
        self.net.settle();
    }

    fn heal(&mut self) {
        self.net.faults.loss_per_mille = 0;
        self.net.faults.duplicate_per_mille = 0;
        self.net.faults.reorder = false;
    }

    /// The network heals; `a` sends to `b` once a second until it arrives.
    fn converge(&mut self, a: usize, b: usize) -> Result<(), String> {
        self.heal();
        if self.expires_within(a, CONVERGE) || self.expires_within(b, CONVERGE) {
            // Nothing may pass: a sends for a while, and every delivery
            // is checked against the certificates' expiry.
            for _ in 0..20 {
                self.send(a, a, b);
                self.net.run_for(Duration::from_secs(1));
                self.check_deliveries();
            }
            return Ok(());
        }
        let deadline = self.net.now + CONVERGE;
        while self.net.now < deadline {
            let id = self.send(a, a, b);
            self.net.run_for(Duration::from_secs(1));
            self.check_deliveries();
            if self.delivered.contains_key(&id) {
                return Ok(());
            }
        }
        let now = self.net.now;
        let lighthouse = format!("{:?}", self.net.lighthouse().status(now).nodes);
        let (sa, _) = self.net.node(AT[a]);
        let sa = format!("{:?}", sa.status());
        let (sb, _) = self.net.node(AT[b]);
        let sb = format!("{:?}", sb.status());
        Err(format!(
            "n{a} did not reach n{b} within {} s of the network healing\n\
             n{a}: {sa}\nn{b}: {sb}\nlighthouse: {lighthouse}",
            CONVERGE.as_secs()
        ))
    }
}

impl StateMachineTest for System {
    type SystemUnderTest = System;
    type Reference = ModelMachine;

    fn init_test(_model: &Model) -> System {
        reset_clocks();
        System::new()
    }

    fn apply(mut sys: System, model: &Model, t: Transition) -> System {
        for i in 0..SLOTS {
            sys.knew[i] = sys.revocations_known(i).max(sys.started_with[i]);
        }
        match t {
            Transition::Start(i) => sys.start(i),
            Transition::Stop(i) => sys.stop(i, true),
            Transition::Crash(i) => sys.stop(i, false),
            Transition::RestartLighthouse => {
                sys.net.hosts.remove(&addr(LH_ADDR));
                let (ca, lh) = (&sys.ca, &sys.lighthouse);
                sys.net.add_lighthouse(ca, lh);
                sys.restore_revocations();
            }
            Transition::Revoke(i) => sys.revoke(i),
            Transition::Rebind(nat) => sys.net.nats[nat].rebind(),
            Transition::Faults {
                loss_per_mille,
                duplicate_per_mille,
                reorder,
            } => {
                sys.net.faults.loss_per_mille = loss_per_mille;
                sys.net.faults.duplicate_per_mille = duplicate_per_mille;
                sys.net.faults.reorder = reorder;
            }
            Transition::Advance(d) => sys.net.run_for(d),
            Transition::Send(a, b) => {
                sys.send(a, a, b);
            }
            Transition::Spoof { from, claimed, to } => {
                sys.send(from, claimed, to);
            }
            Transition::Stranger(to) => sys.stranger(to),
            Transition::Check(a, b) => {
                if model.up[b] {
                    if let Err(why) = sys.converge(a, b) {
                        panic!("{why}");
                    }
                }
            }
        }
        sys.check_deliveries();
        sys
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        // Each case starts a mesh and may run many simulated minutes.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(24),
        max_shrink_iters: 2048,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]
    #[test]
    fn the_mesh_keeps_the_models_promises(sequential 1..24 => System);
}

/// Runs `transitions` from the initial state, as a found case replays.
fn replay(transitions: &[Transition]) {
    reset_clocks();
    let mut model = ModelMachine::init_state()
        .new_tree(&mut proptest::test_runner::TestRunner::deterministic())
        .map(|t| t.current())
        .unwrap_or(FRESH);
    let mut sys = System::new();
    for t in transitions {
        assert!(ModelMachine::preconditions(&model, t), "{t:?}");
        sys = <System as StateMachineTest>::apply(sys, &model, t.clone());
        model = ModelMachine::apply(model, t);
    }
}

/// Found by the model: a lighthouse restarting right after it introduced
/// two nodes behind NATs left their relayed path dead for good (the new
/// lighthouse relays only for pairs it introduced). Nodes now ask again
/// for peers without a direct path when they register anew.
#[test]
fn a_relayed_pair_survives_its_lighthouse_restarting() {
    replay(&[
        Transition::Send(1, 3),
        Transition::RestartLighthouse,
        Transition::Check(1, 3),
    ]);
}

/// Found by the model: a node behind a symmetric NAT that left and came
/// back was never reached again by a peer that still held the old relayed
/// session. A relayed peer silent for 15 s is now asked of the
/// lighthouses again, which introduces the pair and has the peer punch.
#[test]
fn a_relayed_peer_that_restarted_is_reached_again() {
    replay(&[
        Transition::Check(3, 1),
        Transition::Stop(3),
        Transition::Start(3),
        Transition::Check(1, 3),
    ]);
}

/// Found by the model, a limit of the simulation itself: a peer dropped
/// and re-created minutes of simulated time later stamped its handshakes
/// with the real wall clock, earlier than the old session's, and was refused
/// as a replay for good. boringtun's wall clock is mocked too now
/// (vendor/boringtun/PATCHES.md).
#[test]
fn a_pair_meets_again_after_minutes_of_heavy_loss() {
    replay(&[
        Transition::Send(1, 3),
        Transition::Faults {
            loss_per_mille: 300,
            duplicate_per_mille: 20,
            reorder: true,
        },
        Transition::Send(0, 3),
        Transition::Advance(Duration::from_secs(82)),
        Transition::Advance(Duration::from_secs(323)),
        Transition::Check(1, 3),
    ]);
}

/// Found by the model: a node that came back after a revocation took the
/// revoked peer's retried handshake (its certificate still verifies: same
/// CA, not expired) and delivered the packet waiting behind it, all before
/// its first registration brought the revocation list. A node now holds
/// every session with a node until a lighthouse's list is in.
#[test]
fn a_node_started_after_a_revocation_never_takes_the_revoked_peer() {
    replay(&[
        Transition::Send(3, 0),
        Transition::Crash(0),
        Transition::Advance(Duration::from_millis(2751)),
        Transition::Revoke(3),
        Transition::Start(0),
        Transition::Check(2, 1),
    ]);
}
