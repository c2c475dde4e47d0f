//! Which pairs of nodes a lighthouse relays for, and how much.
//!
//! A relay forwards WireGuard messages between two registered nodes only
//! after it introduced them to each other (one asked the lighthouse where the
//! other is). Introductions expire when unused; each sender has a packet
//! budget per second. All state is bounded, so a relay cannot be turned into
//! an open reflector or made to remember without limit.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tern_mesh::rate::TokenBucket;

/// Why a relay request was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The two nodes were never introduced here (or the introduction expired).
    NotIntroduced,
    /// The sender spent its packets for this second.
    RateLimited,
}

/// Relay counters for `tern-lighthouse status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RelayCounters {
    /// Forwarded messages by WireGuard type: handshake initiation, handshake
    /// response, cookie reply, transport data.
    pub forwarded_handshake_initiation: u64,
    pub forwarded_handshake_response: u64,
    pub forwarded_cookie_reply: u64,
    pub forwarded_data: u64,
    pub forwarded_bytes: u64,
    /// From an address that is no registered node's.
    pub refused_unregistered_sender: u64,
    /// To an overlay address that is not registered.
    pub refused_unregistered_target: u64,
    pub refused_not_introduced: u64,
    /// Not a well-formed envelope around a WireGuard message.
    pub refused_malformed: u64,
    pub refused_rate_limited: u64,
    /// Introductions forgotten to stay within the table's bound.
    pub introductions_evicted: u64,
}

impl RelayCounters {
    pub fn count_forwarded(&mut self, message_type: u8, bytes: usize) {
        match message_type {
            1 => self.forwarded_handshake_initiation += 1,
            2 => self.forwarded_handshake_response += 1,
            3 => self.forwarded_cookie_reply += 1,
            _ => self.forwarded_data += 1,
        }
        self.forwarded_bytes += bytes as u64;
    }
}

/// The pairs a relay serves and each sender's budget.
pub struct RelayTable {
    /// Unordered pairs (lower address first) and when last introduced or used.
    introductions: HashMap<(Ipv4Addr, Ipv4Addr), Instant>,
    budgets: HashMap<Ipv4Addr, TokenBucket>,
    max_introductions: usize,
    idle_expiry: Duration,
    packets_per_sec: u32,
}

fn pair(a: Ipv4Addr, b: Ipv4Addr) -> (Ipv4Addr, Ipv4Addr) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

impl RelayTable {
    /// At most `max_introductions` pairs, each forgotten after `idle_expiry`
    /// without use; each sender may relay `packets_per_sec` packets a second.
    pub fn new(max_introductions: usize, idle_expiry: Duration, packets_per_sec: u32) -> Self {
        RelayTable {
            introductions: HashMap::new(),
            budgets: HashMap::new(),
            max_introductions: max_introductions.max(1),
            idle_expiry,
            packets_per_sec: packets_per_sec.max(1),
        }
    }

    /// A new per-sender budget (a reload): introductions stay, budgets
    /// start again at the new rate.
    pub fn set_packets_per_sec(&mut self, packets_per_sec: u32) {
        self.packets_per_sec = packets_per_sec.max(1);
        self.budgets.clear();
    }

    /// Records that `a` and `b` were introduced (one asked where the other
    /// is). Returns true when an older introduction had to be forgotten.
    pub fn introduce(&mut self, a: Ipv4Addr, b: Ipv4Addr, now: Instant) -> bool {
        let key = pair(a, b);
        let mut evicted = false;
        if !self.introductions.contains_key(&key)
            && self.introductions.len() >= self.max_introductions
        {
            if let Some(oldest) = self
                .introductions
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| *k)
            {
                self.introductions.remove(&oldest);
                evicted = true;
            }
        }
        self.introductions.insert(key, now);
        evicted
    }

    /// May `from` relay one message to `to` now? Refreshes the introduction.
    pub fn check(&mut self, from: Ipv4Addr, to: Ipv4Addr, now: Instant) -> Result<(), Refusal> {
        let Some(last) = self.introductions.get_mut(&pair(from, to)) else {
            return Err(Refusal::NotIntroduced);
        };
        if now.saturating_duration_since(*last) > self.idle_expiry {
            return Err(Refusal::NotIntroduced);
        }
        *last = now;
        let rate = self.packets_per_sec;
        let budget = self
            .budgets
            .entry(from)
            .or_insert_with(|| TokenBucket::new(rate, now));
        if budget.take(now) {
            Ok(())
        } else {
            Err(Refusal::RateLimited)
        }
    }

    /// Forgets a node that left: its introductions and its budget.
    pub fn forget(&mut self, node: Ipv4Addr) {
        self.introductions
            .retain(|(a, b), _| *a != node && *b != node);
        self.budgets.remove(&node);
    }

    /// Drops introductions unused for longer than the idle expiry, and the
    /// budgets of senders with no introduction left.
    pub fn expire(&mut self, now: Instant) {
        let expiry = self.idle_expiry;
        self.introductions
            .retain(|_, t| now.saturating_duration_since(*t) <= expiry);
        let intros = &self.introductions;
        self.budgets
            .retain(|ip, _| intros.keys().any(|(a, b)| a == ip || b == ip));
    }

    pub fn introductions(&self) -> usize {
        self.introductions.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 5);
    const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 6);
    const C: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 7);

    #[test]
    fn only_introduced_pairs_both_ways_until_idle() {
        let now = Instant::now();
        let mut t = RelayTable::new(10, Duration::from_secs(60), 1000);
        assert_eq!(t.check(A, B, now), Err(Refusal::NotIntroduced));
        t.introduce(A, B, now);
        assert_eq!(t.check(A, B, now), Ok(()));
        assert_eq!(t.check(B, A, now), Ok(()), "either direction");
        assert_eq!(t.check(A, C, now), Err(Refusal::NotIntroduced));
        let later = now + Duration::from_secs(50);
        assert_eq!(t.check(A, B, later), Ok(()), "use refreshes");
        let idle = later + Duration::from_secs(61);
        assert_eq!(t.check(A, B, idle), Err(Refusal::NotIntroduced));
        t.expire(idle);
        assert_eq!(t.introductions(), 0);
    }

    #[test]
    fn table_is_bounded_and_oldest_goes_first() {
        let now = Instant::now();
        let mut t = RelayTable::new(2, Duration::from_secs(60), 1000);
        assert!(!t.introduce(A, B, now));
        assert!(!t.introduce(A, C, now + Duration::from_secs(1)));
        assert!(t.introduce(B, C, now + Duration::from_secs(2)));
        assert_eq!(t.introductions(), 2);
        let at = now + Duration::from_secs(3);
        assert_eq!(t.check(A, B, at), Err(Refusal::NotIntroduced));
        assert_eq!(t.check(B, C, at), Ok(()));
    }

    #[test]
    fn each_sender_has_a_budget() {
        let now = Instant::now();
        let mut t = RelayTable::new(10, Duration::from_secs(60), 5);
        t.introduce(A, B, now);
        let passed = (0..20).filter(|_| t.check(A, B, now).is_ok()).count();
        assert!((1..=5).contains(&passed), "{passed} of 20 passed");
        assert_eq!(t.check(A, B, now), Err(Refusal::RateLimited));
        assert_eq!(t.check(B, A, now), Ok(()), "B has its own budget");
        t.forget(A);
        assert_eq!(t.check(B, A, now), Err(Refusal::NotIntroduced));
    }
}
