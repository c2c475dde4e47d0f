//! Flow records: what the firewall saw of each flow a peer started, and of
//! what it refused. An allowed flow is recorded when it ends (closed, idle,
//! revoked, node stopped) with its bytes and packets each way; refusals are
//! summed per caller, protocol, destination and rule over a minute (first
//! seen, last seen, count), so that a scan or a flood makes a few records,
//! not one per packet.
//!
//! Records wait in a bounded queue for the shell (and the lighthouses):
//! when it is full they are counted as dropped, never waited for.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tern_shared::cert::{Fingerprint, VerifiedCert};
use tern_shared::packet::{Flow, PROTO_TCP, PROTO_UDP};

use super::FlowKey;

/// Records waiting for the shell, at most; more are dropped and counted.
pub const RECORD_QUEUE: usize = 4096;
/// Refusals are summed over this long before a record is made.
pub const DENIED_WINDOW: Duration = Duration::from_secs(60);
/// Refusal sums held at once, per destination; past it, a caller's further
/// refusals are summed per protocol and rule alone (destination "any").
/// Well under [`RECORD_QUEUE`], so that a window's sums fit in it.
pub const MAX_DENIED_SUMS: usize = 2048;
/// Sums per caller, protocol and rule (past [`MAX_DENIED_SUMS`]) held at
/// most; past this, refusals are counted as dropped records.
pub const MAX_WIDE_DENIED_SUMS: usize = 256;
/// How long a closed TCP flow's entry stays (its last ACKs pass), recorded
/// already.
pub const CLOSED_LINGER: Duration = Duration::from_secs(10);

/// Why a flow's record was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// TCP: both sides sent FIN, or one sent RST.
    Closed,
    /// No packet for the protocol's timeout.
    Idle,
    /// The caller's certificate was revoked: its flows end now.
    Revoked,
    /// The node stopped.
    Stopped,
    /// A sum of refused attempts over [`DENIED_WINDOW`] (or until the node
    /// stopped).
    Denied,
}

impl EndReason {
    pub const ALL: [EndReason; 5] = [
        EndReason::Closed,
        EndReason::Idle,
        EndReason::Revoked,
        EndReason::Stopped,
        EndReason::Denied,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Closed => "closed",
            EndReason::Idle => "idle",
            EndReason::Revoked => "revoked",
            EndReason::Stopped => "stopped",
            EndReason::Denied => "denied",
        }
    }
}

/// One record, in the core's time.
#[derive(Debug, Clone)]
pub struct FlowRecord {
    /// The first packet (a refusal sum: the first refused).
    pub started: Instant,
    /// The last packet (a refusal sum: the last refused).
    pub ended: Instant,
    /// Who started it: the peer's verified certificate.
    pub caller: VerifiedCert,
    pub src: Ipv4Addr,
    pub src_port: u16,
    /// `0.0.0.0` in a sum of refusals to many destinations.
    pub dst: Ipv4Addr,
    /// TCP and UDP; 0 otherwise. A sum of refusals covers
    /// `dst_port..=dst_port_last`.
    pub dst_port: u16,
    pub dst_port_last: u16,
    pub proto: u8,
    pub allowed: bool,
    /// The inbound rule that decided (0-based); `None`: no rule matched
    /// (default deny), or the flow table was full.
    pub rule: Option<usize>,
    pub reason: EndReason,
    /// From the caller: bytes (IP packets, headers included) and packets.
    /// For a sum of refusals: the refused packets.
    pub bytes_in: u64,
    pub packets_in: u64,
    /// To the caller.
    pub bytes_out: u64,
    pub packets_out: u64,
}

/// An allowed flow a peer started, while it lasts.
#[derive(Debug)]
pub(super) struct OpenFlow {
    started: Instant,
    last: Instant,
    caller: VerifiedCert,
    rule: Option<usize>,
    bytes_in: u64,
    packets_in: u64,
    bytes_out: u64,
    packets_out: u64,
    fin_in: bool,
    fin_out: bool,
}

/// What a packet did to an open flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Counted {
    Open,
    /// TCP closed: record it now.
    Closed,
}

impl OpenFlow {
    pub(super) fn new(caller: &VerifiedCert, rule: Option<usize>, now: Instant) -> OpenFlow {
        OpenFlow {
            started: now,
            last: now,
            caller: caller.clone(),
            rule,
            bytes_in: 0,
            packets_in: 0,
            bytes_out: 0,
            packets_out: 0,
            fin_in: false,
            fin_out: false,
        }
    }

    /// Counts a packet; `inbound`: from the caller.
    pub(super) fn count(&mut self, inbound: bool, packet: &[u8], now: Instant) -> Counted {
        self.last = now;
        let len = packet.len() as u64;
        if inbound {
            self.bytes_in += len;
            self.packets_in += 1;
        } else {
            self.bytes_out += len;
            self.packets_out += 1;
        }
        let Some(flags) = tcp_flags(packet) else {
            return Counted::Open;
        };
        const FIN: u8 = 0x01;
        const RST: u8 = 0x04;
        if flags & RST != 0 {
            return Counted::Closed;
        }
        if flags & FIN != 0 {
            if inbound {
                self.fin_in = true;
            } else {
                self.fin_out = true;
            }
        }
        if self.fin_in && self.fin_out {
            Counted::Closed
        } else {
            Counted::Open
        }
    }

    /// The record of this flow (`flow` its key in the table), ended for
    /// `reason`.
    pub(super) fn record(&self, flow: &FlowKey, reason: EndReason) -> FlowRecord {
        // ICMP's "ports" in the key are its echo identifier.
        let ports = flow.proto == PROTO_TCP || flow.proto == PROTO_UDP;
        let (src_port, dst_port) = if ports {
            (flow.remote_port, flow.local_port)
        } else {
            (0, 0)
        };
        FlowRecord {
            started: self.started,
            ended: self.last,
            caller: self.caller.clone(),
            src: flow.remote,
            src_port,
            dst: flow.local,
            dst_port,
            dst_port_last: dst_port,
            proto: flow.proto,
            allowed: true,
            rule: self.rule,
            reason,
            bytes_in: self.bytes_in,
            packets_in: self.packets_in,
            bytes_out: self.bytes_out,
            packets_out: self.packets_out,
        }
    }

    pub(super) fn fingerprint(&self) -> Fingerprint {
        self.caller.fingerprint()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DeniedKey {
    caller: Fingerprint,
    proto: u8,
    /// `None`: many destinations (the sums were full).
    dst: Option<Ipv4Addr>,
    rule: Option<usize>,
}

#[derive(Debug)]
struct DeniedSum {
    first: Instant,
    last: Instant,
    caller: VerifiedCert,
    src: Ipv4Addr,
    port_min: u16,
    port_max: u16,
    count: u64,
    bytes: u64,
}

/// The records waiting for the shell, the refusals being summed, and what
/// was dropped. One owner: the [`super::Firewall`].
#[derive(Debug, Default)]
pub(super) struct Records {
    queue: VecDeque<FlowRecord>,
    denied: HashMap<DeniedKey, DeniedSum>,
    wide_denied: usize,
    next_flush: Option<Instant>,
    /// Records dropped because the queue was full, or refusals that found
    /// no room to be summed.
    pub dropped: u64,
    /// Records made.
    pub made: u64,
}

impl Records {
    pub(super) fn push(&mut self, record: FlowRecord) {
        if self.queue.len() >= RECORD_QUEUE {
            self.dropped += 1;
            return;
        }
        self.made += 1;
        self.queue.push_back(record);
    }

    pub(super) fn take(&mut self, max: usize) -> impl Iterator<Item = FlowRecord> + '_ {
        let n = self.queue.len().min(max);
        self.queue.drain(..n)
    }

    pub(super) fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// A refused first packet from `caller`, decided by `rule`.
    pub(super) fn denied(
        &mut self,
        caller: &VerifiedCert,
        flow: &Flow,
        len: usize,
        rule: Option<usize>,
        now: Instant,
    ) {
        let port = if !flow.fragment && (flow.proto == PROTO_TCP || flow.proto == PROTO_UDP) {
            flow.dst_port
        } else {
            0
        };
        let mut key = DeniedKey {
            caller: caller.fingerprint(),
            proto: flow.proto,
            dst: Some(flow.dst),
            rule,
        };
        if !self.denied.contains_key(&key)
            && self.denied.len() - self.wide_denied >= MAX_DENIED_SUMS
        {
            key.dst = None;
            if !self.denied.contains_key(&key) {
                if self.wide_denied >= MAX_WIDE_DENIED_SUMS {
                    self.dropped += 1;
                    return;
                }
                self.wide_denied += 1;
            }
        }
        let sum = self.denied.entry(key).or_insert_with(|| DeniedSum {
            first: now,
            last: now,
            caller: caller.clone(),
            src: flow.src,
            port_min: port,
            port_max: port,
            count: 0,
            bytes: 0,
        });
        sum.last = now;
        sum.count += 1;
        sum.bytes += len as u64;
        sum.port_min = sum.port_min.min(port);
        sum.port_max = sum.port_max.max(port);
        if self.next_flush.is_none() {
            self.next_flush = Some(now + DENIED_WINDOW);
        }
    }

    /// Sums older than [`DENIED_WINDOW`] become records (all of them when
    /// `all`, as the node stops).
    pub(super) fn flush_denied(&mut self, now: Instant, all: bool) {
        if !all && self.next_flush.is_none_or(|t| now < t) {
            return;
        }
        self.flush_denied_where(|_, sum| all || now >= sum.first + DENIED_WINDOW);
    }

    /// The sums of these callers become records now (they were revoked).
    pub(super) fn flush_denied_of(&mut self, fingerprints: &[Fingerprint]) {
        self.flush_denied_where(|key, _| fingerprints.contains(&key.caller));
    }

    fn flush_denied_where(&mut self, due: impl Fn(&DeniedKey, &DeniedSum) -> bool) {
        let due: Vec<DeniedKey> = self
            .denied
            .iter()
            .filter(|(k, s)| due(k, s))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(sum) = self.denied.remove(&key) else {
                continue;
            };
            if key.dst.is_none() {
                self.wide_denied -= 1;
            }
            self.push(FlowRecord {
                started: sum.first,
                ended: sum.last,
                caller: sum.caller,
                src: sum.src,
                src_port: 0,
                dst: key.dst.unwrap_or(Ipv4Addr::UNSPECIFIED),
                dst_port: sum.port_min,
                dst_port_last: sum.port_max,
                proto: key.proto,
                allowed: false,
                rule: key.rule,
                reason: EndReason::Denied,
                bytes_in: sum.bytes,
                packets_in: sum.count,
                bytes_out: 0,
                packets_out: 0,
            });
        }
        self.next_flush = self.denied.values().map(|s| s.first + DENIED_WINDOW).min();
    }
}

/// A TCP packet's flags (not for fragments past the first).
pub(super) fn tcp_flags(packet: &[u8]) -> Option<u8> {
    let first = *packet.first()?;
    if first >> 4 != 4 || *packet.get(9)? != PROTO_TCP {
        return None;
    }
    let fragment_offset = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff;
    if fragment_offset != 0 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    packet.get(ihl + 13).copied()
}
