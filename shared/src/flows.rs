//! Flow records as nodes write them, ship them to the lighthouses and the
//! lighthouses keep them: one record per flow a peer started through a
//! node's inbound rules (when it ended, with its bytes and packets each
//! way and the rule that let it in), or per sum of refused attempts
//! (first and last seen, how many). The node's core makes them
//! (`tern-node-core`'s firewall); this is their form outside it.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::cert::{format_unix_time, Fingerprint};

/// Why a record was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowEnd {
    /// TCP: both sides sent FIN, or one sent RST.
    Closed,
    /// No packet for the protocol's timeout.
    Idle,
    /// The caller's certificate was revoked: its flows ended at once.
    Revoked,
    /// The node stopped.
    Stopped,
    /// A sum of refused attempts.
    Denied,
}

impl FlowEnd {
    pub const ALL: [FlowEnd; 5] = [
        FlowEnd::Closed,
        FlowEnd::Idle,
        FlowEnd::Revoked,
        FlowEnd::Stopped,
        FlowEnd::Denied,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FlowEnd::Closed => "closed",
            FlowEnd::Idle => "idle",
            FlowEnd::Revoked => "revoked",
            FlowEnd::Stopped => "stopped",
            FlowEnd::Denied => "denied",
        }
    }

    /// Its number on the wire and in a store.
    pub fn code(self) -> u8 {
        Self::ALL.iter().position(|e| *e == self).unwrap_or(0) as u8
    }

    pub fn from_code(code: u8) -> Option<FlowEnd> {
        Self::ALL.get(usize::from(code)).copied()
    }

    pub fn parse(s: &str) -> Option<FlowEnd> {
        Self::ALL.iter().copied().find(|e| e.as_str() == s)
    }
}

/// One record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowEntry {
    /// Unique per node (a random base per start, then counting): a
    /// record sent twice is kept once.
    pub seq: u64,
    /// Unix milliseconds of the first and last packet (of a sum: the first
    /// and last refused).
    pub start_ms: u64,
    pub end_ms: u64,
    /// Who started it: the certificate the node verified.
    pub caller: String,
    pub fingerprint: Fingerprint,
    pub groups: Vec<String>,
    pub src: Ipv4Addr,
    pub src_port: u16,
    /// `0.0.0.0`: a sum of refusals to many destinations.
    pub dst: Ipv4Addr,
    /// TCP and UDP; 0 otherwise. A sum covers `dst_port..=dst_port_last`.
    pub dst_port: u16,
    pub dst_port_last: u16,
    /// The IP protocol number (6 TCP, 17 UDP, 1 ICMP).
    pub proto: u8,
    pub allowed: bool,
    /// The inbound rule that decided (0-based, `rule-N`); `None`: no rule
    /// matched (default deny), or the flow table was full.
    pub rule: Option<u16>,
    pub reason: FlowEnd,
    /// From the caller: bytes of IP packets (headers included) and
    /// packets; for a sum of refusals, the refused packets.
    pub bytes_in: u64,
    pub packets_in: u64,
    /// To the caller.
    pub bytes_out: u64,
    pub packets_out: u64,
}

/// A record as JSON: a line of a node's `[flows] path`, and what
/// `tern-lighthouse flows --json` and the admin API give (with the
/// claims the caller enrolled with, when it enrolled).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowView {
    /// The node whose rules decided (it made the record).
    pub node: String,
    /// RFC 3339, milliseconds, UTC.
    pub start: String,
    pub end: String,
    pub caller: String,
    pub fingerprint: String,
    pub groups: Vec<String>,
    pub src: Ipv4Addr,
    pub src_port: u16,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
    /// A sum of refusals over several ports: the highest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_port_last: Option<u16>,
    /// `tcp`, `udp`, `icmp`, or the protocol's number.
    pub proto: String,
    /// `allow` or `deny`.
    pub verdict: String,
    pub rule: Option<u16>,
    pub reason: FlowEnd,
    pub bytes_in: u64,
    pub packets_in: u64,
    pub bytes_out: u64,
    pub packets_out: u64,
    /// The OIDC claims (or the token id) the caller's certificate was
    /// issued for, from the lighthouse's issuance log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment: Option<serde_json::Value>,
}

impl FlowView {
    pub fn new(node: &str, e: &FlowEntry) -> FlowView {
        FlowView {
            node: node.to_string(),
            start: format_unix_ms(e.start_ms),
            end: format_unix_ms(e.end_ms),
            caller: e.caller.clone(),
            fingerprint: e.fingerprint.to_string(),
            groups: e.groups.clone(),
            src: e.src,
            src_port: e.src_port,
            dst: e.dst,
            dst_port: e.dst_port,
            dst_port_last: (e.dst_port_last != e.dst_port).then_some(e.dst_port_last),
            proto: proto_name(e.proto),
            verdict: if e.allowed { "allow" } else { "deny" }.to_string(),
            rule: e.rule,
            reason: e.reason,
            bytes_in: e.bytes_in,
            packets_in: e.packets_in,
            bytes_out: e.bytes_out,
            packets_out: e.packets_out,
            enrollment: None,
        }
    }
}

/// Records waiting for a lighthouse, by default.
pub const DEFAULT_FLOW_QUEUE: usize = 16_384;

/// Flow records kept by a lighthouse, by default.
pub const DEFAULT_RETAIN: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// `[flows]` of a node config: what becomes of the records of flows peers
/// start through its inbound rules. A node without inbound rules makes
/// none (nothing comes in).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsConfig {
    /// Make records at all. Default true.
    pub record: bool,
    /// Send them to the lighthouses, which keep them in their store.
    /// Default true.
    pub ship: bool,
    /// Also write them here, one JSON object per line (mode 0600).
    /// Default: no file.
    pub path: Option<std::path::PathBuf>,
    /// The file is rotated past this many MiB. Default 64.
    pub rotate_size_mb: u64,
    /// Rotated files kept (`PATH.1` newest … `PATH.N`). Default 5.
    pub rotate_keep: u32,
    /// Records waiting for a lighthouse (one unreachable, say), at most;
    /// more are dropped and counted. Default 16384 (a few MB).
    pub queue: usize,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        FlowsConfig {
            record: true,
            ship: true,
            path: None,
            rotate_size_mb: 64,
            rotate_keep: 5,
            queue: DEFAULT_FLOW_QUEUE,
        }
    }
}

impl FlowsConfig {
    pub(crate) fn resolve(&mut self, base: &std::path::Path) {
        if let Some(p) = &mut self.path {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    pub(crate) fn validate(
        &self,
        file: &std::path::Path,
    ) -> Result<(), crate::config::ConfigError> {
        let invalid = |key: &str, message: &str| crate::config::ConfigError::Invalid {
            file: file.to_path_buf(),
            key: format!("flows.{key}"),
            message: message.to_string(),
        };
        if !(1..=1 << 20).contains(&self.rotate_size_mb) {
            return Err(invalid(
                "rotate_size_mb",
                "must be between 1 and 1048576 (MiB)",
            ));
        }
        if !(1..=1 << 20).contains(&self.queue) {
            return Err(invalid("queue", "between 1 and 1048576 records"));
        }
        if self.rotate_keep > 1000 {
            return Err(invalid("rotate_keep", "at most 1000 rotated files"));
        }
        if self.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid("path", "empty path; give a file or remove `path`"));
        }
        Ok(())
    }
}

/// `[flows]` of a lighthouse config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LighthouseFlowsConfig {
    /// Records older than this (by their end) are deleted from the store.
    /// Default 30 days ([`DEFAULT_RETAIN`]).
    #[serde(deserialize_with = "crate::config::duration")]
    pub retain: std::time::Duration,
}

impl Default for LighthouseFlowsConfig {
    fn default() -> Self {
        LighthouseFlowsConfig {
            retain: DEFAULT_RETAIN,
        }
    }
}

/// `tcp`, `udp`, `icmp`, else the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        n => n.to_string(),
    }
}

/// Unix milliseconds as RFC 3339 in UTC: `2026-12-07T21:00:00.123Z`.
pub fn format_unix_ms(ms: u64) -> String {
    let secs = format_unix_time(ms / 1000);
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), ms % 1000)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ends_round_trip_and_times_read_as_rfc3339() {
        for e in FlowEnd::ALL {
            assert_eq!(FlowEnd::from_code(e.code()), Some(e));
            assert_eq!(FlowEnd::parse(e.as_str()), Some(e));
        }
        assert_eq!(FlowEnd::from_code(9), None);
        assert_eq!(
            format_unix_ms(1_796_678_400_123),
            "2026-12-07T21:20:00.123Z"
        );
        assert_eq!(format_unix_ms(5), "1970-01-01T00:00:00.005Z");
    }
}
