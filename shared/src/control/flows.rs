//! Flow records on their way from a node to a lighthouse
//! (`FlowRecords`, answered by `FlowRecordsAck` with the same id).
//!
//! The body: the node's count of records it dropped since it started
//! (`u64`); a `u8` count of callers (at most [`MAX_FLOW_CALLERS`]), each
//! its certificate's fingerprint (32 bytes), name (a label) and groups (a
//! `u8` count, at most [`MAX_FLOW_GROUPS`], then labels); a `u8` count of
//! records (at most [`MAX_FLOW_RECORDS`]), each [`RECORD_LEN`] bytes: seq,
//! start and end (Unix ms) as `u64`, the caller's index (`u8`), source
//! address and port, destination address, port and last port, protocol,
//! flags (bit 0: allowed), rule (`u16`, `0xffff`: none), end reason, then
//! bytes and packets in and out (`u64` each). Names and groups longer
//! than a label are cut by the sender ([`flow_text`]).

use std::net::Ipv4Addr;

use super::{put_label, read_label, ControlError, ControlMessage, MAX_CONTROL_LEN, MAX_LABEL_LEN};
use crate::cert::Fingerprint;
use crate::codec::Reader;
use crate::flows::{FlowEnd, FlowEntry};

/// Callers in one message, at most.
pub const MAX_FLOW_CALLERS: usize = 16;
/// Groups per caller carried, at most (the first, in the certificate's
/// order).
pub const MAX_FLOW_GROUPS: usize = 8;
/// Records in one message, at most.
pub const MAX_FLOW_RECORDS: usize = 64;
/// The bytes of one record.
pub const RECORD_LEN: usize = 8 * 3 + 1 + 4 + 2 + 4 + 2 + 2 + 1 + 1 + 2 + 1 + 8 * 4;

const NO_RULE: u16 = u16::MAX;
/// The message's header: type, id, dropped, the two counts.
const HEADER_LEN: usize = 1 + 4 + 8 + 1 + 1;

/// `text` cut to a label's length on a character boundary.
pub fn flow_text(text: &str) -> &str {
    let mut end = text.len().min(MAX_LABEL_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// How many of `entries`, from the first, fit in one message (at least
/// one when there is one: a single record always fits).
pub fn fits(entries: &[FlowEntry]) -> usize {
    let mut size = HEADER_LEN;
    let mut callers: Vec<Fingerprint> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let mut more = RECORD_LEN;
        let new_caller = !callers.contains(&e.fingerprint);
        if new_caller {
            more += caller_len(e);
        }
        if i == MAX_FLOW_RECORDS
            || (new_caller && callers.len() == MAX_FLOW_CALLERS)
            || size + more > MAX_CONTROL_LEN
        {
            return i;
        }
        if new_caller {
            callers.push(e.fingerprint);
        }
        size += more;
    }
    entries.len()
}

fn caller_len(e: &FlowEntry) -> usize {
    32 + 1
        + flow_text(&e.caller).len()
        + 1
        + e.groups
            .iter()
            .take(MAX_FLOW_GROUPS)
            .map(|g| 1 + flow_text(g).len())
            .sum::<usize>()
}

pub(super) fn put_body(msg: &ControlMessage, out: &mut Vec<u8>) -> Result<(), ControlError> {
    let ControlMessage::FlowRecords { dropped, flows, .. } = msg else {
        return Err(ControlError::Malformed);
    };
    if flows.len() > MAX_FLOW_RECORDS {
        return Err(ControlError::Malformed);
    }
    out.extend_from_slice(&dropped.to_be_bytes());
    let mut callers: Vec<&FlowEntry> = Vec::new();
    let mut index = Vec::with_capacity(flows.len());
    for e in flows {
        let i = match callers.iter().position(|c| c.fingerprint == e.fingerprint) {
            Some(i) => i,
            None => {
                callers.push(e);
                callers.len() - 1
            }
        };
        index.push(i as u8);
    }
    if callers.len() > MAX_FLOW_CALLERS {
        return Err(ControlError::Malformed);
    }
    out.push(callers.len() as u8);
    for c in &callers {
        out.extend_from_slice(&c.fingerprint.0);
        put_label(out, flow_text(&c.caller))?;
        let groups: Vec<&String> = c.groups.iter().take(MAX_FLOW_GROUPS).collect();
        out.push(groups.len() as u8);
        for g in groups {
            put_label(out, flow_text(g))?;
        }
    }
    out.push(flows.len() as u8);
    for (e, caller) in flows.iter().zip(index) {
        for v in [e.seq, e.start_ms, e.end_ms] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.push(caller);
        out.extend_from_slice(&e.src.octets());
        out.extend_from_slice(&e.src_port.to_be_bytes());
        out.extend_from_slice(&e.dst.octets());
        out.extend_from_slice(&e.dst_port.to_be_bytes());
        out.extend_from_slice(&e.dst_port_last.to_be_bytes());
        out.push(e.proto);
        out.push(u8::from(e.allowed));
        out.extend_from_slice(&e.rule.unwrap_or(NO_RULE).to_be_bytes());
        out.push(e.reason.code());
        for v in [e.bytes_in, e.packets_in, e.bytes_out, e.packets_out] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    Ok(())
}

pub(super) fn read_body(id: u32, r: &mut Reader<'_>) -> Result<ControlMessage, ControlError> {
    let bad = || ControlError::Malformed;
    let dropped = r.u64().ok_or_else(bad)?;
    let n_callers = r.u8().ok_or_else(bad)? as usize;
    if n_callers > MAX_FLOW_CALLERS {
        return Err(bad());
    }
    let mut callers = Vec::with_capacity(n_callers);
    for _ in 0..n_callers {
        let fingerprint = Fingerprint(r.array::<32>().ok_or_else(bad)?);
        let name = read_label(r)?;
        let n_groups = r.u8().ok_or_else(bad)? as usize;
        if n_groups > MAX_FLOW_GROUPS {
            return Err(bad());
        }
        let groups = (0..n_groups)
            .map(|_| read_label(r))
            .collect::<Result<Vec<_>, _>>()?;
        // One entry per certificate, as the sender makes them.
        if callers.iter().any(|(f, _, _)| *f == fingerprint) {
            return Err(bad());
        }
        callers.push((fingerprint, name, groups));
    }
    let n = r.u8().ok_or_else(bad)? as usize;
    if n > MAX_FLOW_RECORDS {
        return Err(bad());
    }
    let mut flows = Vec::with_capacity(n);
    for _ in 0..n {
        let seq = r.u64().ok_or_else(bad)?;
        let start_ms = r.u64().ok_or_else(bad)?;
        let end_ms = r.u64().ok_or_else(bad)?;
        let (fingerprint, caller, groups) = callers
            .get(r.u8().ok_or_else(bad)? as usize)
            .cloned()
            .ok_or_else(bad)?;
        let src = r.ipv4().ok_or_else(bad)?;
        let src_port = r.u16().ok_or_else(bad)?;
        let dst: Ipv4Addr = r.ipv4().ok_or_else(bad)?;
        let dst_port = r.u16().ok_or_else(bad)?;
        let dst_port_last = r.u16().ok_or_else(bad)?;
        let proto = r.u8().ok_or_else(bad)?;
        let flags = r.u8().ok_or_else(bad)?;
        let rule = r.u16().ok_or_else(bad)?;
        let reason = FlowEnd::from_code(r.u8().ok_or_else(bad)?).ok_or_else(bad)?;
        let bytes_in = r.u64().ok_or_else(bad)?;
        let packets_in = r.u64().ok_or_else(bad)?;
        let bytes_out = r.u64().ok_or_else(bad)?;
        let packets_out = r.u64().ok_or_else(bad)?;
        if flags > 1 || end_ms < start_ms || dst_port_last < dst_port {
            return Err(bad());
        }
        flows.push(FlowEntry {
            seq,
            start_ms,
            end_ms,
            caller,
            fingerprint,
            groups,
            src,
            src_port,
            dst,
            dst_port,
            dst_port_last,
            proto,
            allowed: flags == 1,
            rule: (rule != NO_RULE).then_some(rule),
            reason,
            bytes_in,
            packets_in,
            bytes_out,
            packets_out,
        });
    }
    Ok(ControlMessage::FlowRecords { id, dropped, flows })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    pub(crate) fn entry(seq: u64, caller: &str, groups: &[&str]) -> FlowEntry {
        let mut fp = [0u8; 32];
        fp[..caller.len().min(32)].copy_from_slice(&caller.as_bytes()[..caller.len().min(32)]);
        FlowEntry {
            seq,
            start_ms: 1_000 + seq,
            end_ms: 2_000 + seq,
            caller: caller.into(),
            fingerprint: Fingerprint(fp),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            src: Ipv4Addr::new(100, 64, 0, 5),
            src_port: 40000,
            dst: Ipv4Addr::new(198, 19, 0, 10),
            dst_port: 5432,
            dst_port_last: 5432,
            proto: 6,
            allowed: seq.is_multiple_of(2),
            rule: (!seq.is_multiple_of(3)).then_some(seq as u16),
            reason: FlowEnd::ALL[seq as usize % 5],
            bytes_in: seq * 100,
            packets_in: seq,
            bytes_out: u64::MAX - seq,
            packets_out: 7,
        }
    }

    #[test]
    fn records_round_trip_with_their_callers_once() {
        let flows: Vec<FlowEntry> = (0..20)
            .map(|i| entry(i, ["ci-1", "ci-2"][i as usize % 2], &["ci", "deploy"]))
            .collect();
        let n = fits(&flows);
        assert!(n >= 12, "{n} records fit");
        let msg = ControlMessage::FlowRecords {
            id: 9,
            dropped: 3,
            flows: flows[..n].to_vec(),
        };
        let bytes = msg.encode().unwrap();
        assert!(bytes.len() <= MAX_CONTROL_LEN);
        assert_eq!(ControlMessage::decode(&bytes).unwrap(), msg);
        let ack = ControlMessage::FlowRecordsAck { id: 9 };
        assert_eq!(ControlMessage::decode(&ack.encode().unwrap()).unwrap(), ack);
    }

    #[test]
    fn what_fits_always_encodes() {
        let long = "x".repeat(200);
        let groups: Vec<&str> = (0..20).map(|_| long.as_str()).collect();
        let flows: Vec<FlowEntry> = (0..40)
            .map(|i| entry(i, &format!("{long}{i}"), &groups))
            .collect();
        let n = fits(&flows);
        assert!(n >= 1);
        let msg = ControlMessage::FlowRecords {
            id: 1,
            dropped: 0,
            flows: flows[..n].to_vec(),
        };
        let bytes = msg.encode().unwrap();
        assert!(bytes.len() <= MAX_CONTROL_LEN, "{}", bytes.len());
        let ControlMessage::FlowRecords { flows: back, .. } =
            ControlMessage::decode(&bytes).unwrap()
        else {
            panic!()
        };
        assert_eq!(back[0].caller.len(), MAX_LABEL_LEN);
        assert_eq!(back[0].groups.len(), MAX_FLOW_GROUPS);
        assert_eq!(fits(&[]), 0);
    }

    #[test]
    fn forged_bodies_are_refused() {
        let msg = ControlMessage::FlowRecords {
            id: 1,
            dropped: 0,
            flows: vec![entry(1, "ci-1", &["ci"])],
        };
        let good = msg.encode().unwrap();
        // The caller index points past the callers.
        let mut bad = good.clone();
        let at = good.len() - RECORD_LEN + 24;
        bad[at] = 5;
        assert!(ControlMessage::decode(&bad).is_err());
        // Cut short anywhere.
        for cut in 0..good.len() {
            assert!(ControlMessage::decode(&good[..cut]).is_err(), "{cut}");
        }
    }
}
