//! Flow records, from the firewall to the shell's file and to the
//! lighthouses. The firewall makes them (`firewall/records.rs`); here
//! they get their wall-clock times and sequence numbers, wait in bounded
//! queues (full: dropped and counted, never waited for), and go to one
//! registered lighthouse at a time in `FlowRecords` messages, a few in
//! flight, each sent again (to whichever lighthouse is up) until
//! acknowledged.

use super::*;
use crate::firewall::FlowRecord;
use tern_shared::control::flow_records_fit;
use tern_shared::flows::{FlowEnd, FlowEntry};

/// Records waiting for the shell's file, at most.
pub const FILE_QUEUE: usize = 4096;
/// Messages of records sent and not yet acknowledged, at most.
const IN_FLIGHT: usize = 8;
/// A message not acknowledged in this long is sent again (doubling up to
/// [`RESEND_MAX`]).
const RESEND_FIRST: Duration = Duration::from_secs(2);
const RESEND_MAX: Duration = Duration::from_secs(60);
/// A record waits at most this long for others to share its message (a
/// message per record would cost a gateway making many short flows more
/// than the records themselves).
const SHIP_DELAY: Duration = Duration::from_secs(1);
/// Records that fill a message well: sent without waiting for more.
const SHIP_BATCH: usize = 16;
/// The drop count is logged at most this often, when it grew.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the shell asks of flow records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLogSettings {
    /// Record flows at all (the node has inbound rules, and `[flows]`
    /// does not turn them off).
    pub record: bool,
    /// Send them to the lighthouses.
    pub ship: bool,
    /// Keep them for the shell's file.
    pub file: bool,
    /// The first record's sequence number (random per start).
    pub seq_base: u64,
    /// Records waiting for a lighthouse, at most (`[flows] queue`).
    pub queue: usize,
}

/// Counters for `tern status` and the metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowLogStatus {
    pub recorded: u64,
    /// Dropped: the firewall's queue, the lighthouse queue or the file's
    /// queue full (or no room to sum a refusal).
    pub dropped: u64,
    /// Acknowledged by a lighthouse.
    pub shipped: u64,
    /// Waiting for a lighthouse (in flight included).
    pub waiting: u64,
}

struct InFlight {
    entries: Vec<FlowEntry>,
    sent: Instant,
    wait: Duration,
}

/// One owner: [`NodeCore`].
pub(super) struct FlowLog {
    settings: FlowLogSettings,
    next_seq: u64,
    to_ship: VecDeque<FlowEntry>,
    to_file: Vec<FlowEntry>,
    in_flight: BTreeMap<u32, InFlight>,
    dropped_here: u64,
    shipped: u64,
    recorded: u64,
    logged_drops: u64,
    next_drop_log: Option<Instant>,
    /// Since when the oldest record in `to_ship` waits.
    waiting_since: Option<Instant>,
    /// The node stops: everything goes at once.
    stopping: bool,
}

impl FlowLog {
    pub(super) fn new() -> FlowLog {
        FlowLog {
            settings: FlowLogSettings {
                record: false,
                ship: false,
                file: false,
                seq_base: 0,
                queue: 0,
            },
            next_seq: 0,
            to_ship: VecDeque::new(),
            to_file: Vec::new(),
            in_flight: BTreeMap::new(),
            dropped_here: 0,
            shipped: 0,
            recorded: 0,
            logged_drops: 0,
            next_drop_log: None,
            waiting_since: None,
            stopping: false,
        }
    }

    fn entry(&mut self, r: FlowRecord, now: Instant, unix_ms: u64) -> FlowEntry {
        let ago = |t: Instant| now.saturating_duration_since(t).as_millis() as u64;
        let seq = self.settings.seq_base.wrapping_add(self.next_seq);
        self.next_seq += 1;
        FlowEntry {
            seq,
            start_ms: unix_ms.saturating_sub(ago(r.started)),
            end_ms: unix_ms.saturating_sub(ago(r.ended)),
            caller: r.caller.name().to_string(),
            fingerprint: r.caller.fingerprint(),
            groups: r.caller.groups().to_vec(),
            src: r.src,
            src_port: r.src_port,
            dst: r.dst,
            dst_port: r.dst_port,
            dst_port_last: r.dst_port_last,
            proto: r.proto,
            allowed: r.allowed,
            rule: r.rule.and_then(|i| u16::try_from(i).ok()),
            reason: match r.reason {
                crate::firewall::EndReason::Closed => FlowEnd::Closed,
                crate::firewall::EndReason::Idle => FlowEnd::Idle,
                crate::firewall::EndReason::Revoked => FlowEnd::Revoked,
                crate::firewall::EndReason::Stopped => FlowEnd::Stopped,
                crate::firewall::EndReason::Denied => FlowEnd::Denied,
            },
            bytes_in: r.bytes_in,
            packets_in: r.packets_in,
            bytes_out: r.bytes_out,
            packets_out: r.packets_out,
        }
    }
}

impl NodeCore {
    /// Whether and where flow records go. Records are made from now on;
    /// off, the firewall makes none.
    pub fn set_flow_log(&mut self, settings: FlowLogSettings) {
        self.flow_log.settings = settings;
        self.flow_log.next_seq = 0;
        self.firewall.record_flows(settings.record);
    }

    /// Records flows from now on, or not (a reload changed the rules or
    /// `[flows] record`).
    pub fn record_flows(&mut self, on: bool) {
        self.flow_log.settings.record = on;
        self.firewall.record_flows(on);
    }

    /// The node stops without leaving (revoked): open flows are recorded
    /// as stopped.
    pub fn stop_recording_flows(&mut self, now: Instant) {
        self.stop_flows(now);
    }

    /// Whether records wait in the firewall: the shell then calls
    /// [`NodeCore::take_flow_records`].
    pub fn flow_records_waiting(&self) -> bool {
        self.firewall.records_waiting() > 0
    }

    /// Takes the firewall's records: timed (`unix_ms` is the wall clock
    /// at `now`), queued for the lighthouses, and returned for the shell's
    /// file (none when it keeps none). Sends what it can at once.
    pub fn take_flow_records(&mut self, now: Instant, unix_ms: u64) -> Vec<FlowEntry> {
        let records = self.firewall.take_records(RECORD_QUEUE);
        for r in records {
            let entry = self.flow_log.entry(r, now, unix_ms);
            self.flow_log.recorded += 1;
            let log = &mut self.flow_log;
            if log.settings.file {
                if log.to_file.len() < FILE_QUEUE {
                    log.to_file.push(entry.clone());
                } else {
                    log.dropped_here += 1;
                }
            }
            if log.settings.ship {
                if log.to_ship.len() >= log.settings.queue {
                    // Into messages first, while few are in flight.
                    self.ship_flows(now);
                }
                let log = &mut self.flow_log;
                if log.to_ship.len() < log.settings.queue {
                    log.to_ship.push_back(entry);
                    log.waiting_since.get_or_insert(now);
                } else {
                    log.dropped_here += 1;
                }
            }
        }
        self.ship_flows(now);
        std::mem::take(&mut self.flow_log.to_file)
    }

    /// Records the shell could not write (its writer's queue full).
    pub fn flow_records_lost(&mut self, n: u64) {
        self.flow_log.dropped_here += n;
    }

    pub fn flow_log_status(&self) -> FlowLogStatus {
        let log = &self.flow_log;
        FlowLogStatus {
            recorded: log.recorded,
            dropped: self.flows_dropped(),
            shipped: log.shipped,
            waiting: log.to_ship.len() as u64
                + log
                    .in_flight
                    .values()
                    .map(|f| f.entries.len() as u64)
                    .sum::<u64>(),
        }
    }

    fn flows_dropped(&self) -> u64 {
        self.firewall.record_counts().1 + self.flow_log.dropped_here
    }

    /// A lighthouse took the records of `id`.
    pub(super) fn flow_records_acked(&mut self, id: u32) {
        if let Some(f) = self.flow_log.in_flight.remove(&id) {
            self.flow_log.shipped += f.entries.len() as u64;
        }
    }

    /// Sends what waits (new messages while few are in flight, and again
    /// those unacknowledged too long), and logs a grown drop count.
    pub(super) fn ship_flows(&mut self, now: Instant) {
        self.log_flow_drops(now);
        if !self.flow_log.settings.ship
            || (self.flow_log.to_ship.is_empty() && self.flow_log.in_flight.is_empty())
        {
            return;
        }
        let Some((peer, ip)) = self.registered_lighthouses().first().copied() else {
            return;
        };
        let dropped = self.flows_dropped();
        let due: Vec<u32> = self
            .flow_log
            .in_flight
            .iter()
            .filter(|(_, f)| now >= f.sent + f.wait)
            .map(|(id, _)| *id)
            .collect();
        for old in due {
            let Some(mut f) = self.flow_log.in_flight.remove(&old) else {
                continue;
            };
            f.sent = now;
            f.wait = (f.wait * 2).min(RESEND_MAX);
            let id = self.request_id();
            let msg = ControlMessage::FlowRecords {
                id,
                dropped,
                flows: f.entries.clone(),
            };
            self.send_control(peer, ip, &msg, now);
            self.flow_log.in_flight.insert(id, f);
        }
        let log = &self.flow_log;
        let full = log.to_ship.len() >= SHIP_BATCH.min(log.settings.queue);
        let waited = log.waiting_since.is_some_and(|t| now >= t + SHIP_DELAY);
        if !(full || waited || log.stopping) {
            return;
        }
        while self.flow_log.in_flight.len() < IN_FLIGHT && !self.flow_log.to_ship.is_empty() {
            let queue = self.flow_log.to_ship.make_contiguous();
            let n = flow_records_fit(queue).max(1).min(queue.len());
            let entries: Vec<FlowEntry> = self.flow_log.to_ship.drain(..n).collect();
            let id = self.request_id();
            let msg = ControlMessage::FlowRecords {
                id,
                dropped,
                flows: entries.clone(),
            };
            self.send_control(peer, ip, &msg, now);
            self.flow_log.in_flight.insert(
                id,
                InFlight {
                    entries,
                    sent: now,
                    wait: RESEND_FIRST,
                },
            );
        }
        // What is left waits from now (or for room in flight).
        self.flow_log.waiting_since = (!self.flow_log.to_ship.is_empty()).then_some(now);
    }

    fn log_flow_drops(&mut self, now: Instant) {
        let dropped = self.flows_dropped();
        let log = &mut self.flow_log;
        if dropped == log.logged_drops || log.next_drop_log.is_some_and(|t| now < t) {
            return;
        }
        tracing::warn!(
            dropped_total = dropped,
            new = dropped - log.logged_drops,
            "flow records dropped: their queue was full (the data path never waits for them)"
        );
        log.logged_drops = dropped;
        log.next_drop_log = Some(now + DROP_LOG_INTERVAL);
    }

    /// A lighthouse registered us anew: what waits for an acknowledgement
    /// is sent again at once.
    pub(super) fn resend_flows_now(&mut self, now: Instant) {
        for f in self.flow_log.in_flight.values_mut() {
            f.sent = now.checked_sub(f.wait).unwrap_or(f.sent);
        }
        self.ship_flows(now);
    }

    /// When records wait to be sent again, or to be sent at all.
    pub(super) fn flow_deadline(&self) -> Option<Instant> {
        let log = &self.flow_log;
        if !log.settings.ship {
            return None;
        }
        let resend = log.in_flight.values().map(|f| f.sent + f.wait).min();
        let batch = log.waiting_since.map(|t| t + SHIP_DELAY);
        [resend, batch].into_iter().flatten().min()
    }

    /// The node stops: every open flow and sum of refusals is recorded,
    /// and sent once.
    pub(super) fn stop_flows(&mut self, now: Instant) {
        self.flow_log.stopping = true;
        self.firewall.stop_recording(now);
    }
}
