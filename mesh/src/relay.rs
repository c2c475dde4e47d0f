//! Which pairs of nodes a relay (a lighthouse, or a node with `[relay]`)
//! serves, and how much.
//!
//! A relay forwards WireGuard messages between two registered nodes only
//! after it introduced them to each other (one asked the lighthouse where the
//! other is). Introductions expire when unused; each sender has a packet
//! budget per second. All state is bounded, so a relay cannot be turned into
//! an open reflector or made to remember without limit.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::rate::TokenBucket;
use serde::Serialize;

/// Why a relay request was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The two nodes were never introduced here (or the introduction expired).
    NotIntroduced,
    /// The sender spent its packets for this second.
    RateLimited,
}

/// Relay counters for `tern-lighthouse status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
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
///
/// Nothing here walks every pair on the way of a message: the table is
/// full after 400,000 lookups at a lighthouse of 100,000 nodes, and each
/// lookup introduces a pair. Who is introduced to whom is kept both ways
/// (a node that leaves is forgotten pair by pair), and the pairs in the
/// order they came (the oldest are the first looked at, to make room and
/// to expire).
pub struct RelayTable {
    /// Unordered pairs (lower address first) and when last introduced or used.
    introductions: HashMap<(Ipv4Addr, Ipv4Addr), Instant>,
    /// Each node's partners in `introductions`.
    partners: HashMap<Ipv4Addr, Vec<Ipv4Addr>>,
    /// Pairs with the time they had when queued, oldest first, roughly: a
    /// pair used since it was queued goes to the back again when it comes
    /// up, and one forgotten is dropped then.
    order: VecDeque<((Ipv4Addr, Ipv4Addr), Instant)>,
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
            partners: HashMap::new(),
            order: VecDeque::new(),
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
        if let Some(last) = self.introductions.get_mut(&key) {
            *last = now;
            return false;
        }
        let evicted = self.introductions.len() >= self.max_introductions && self.evict_oldest();
        self.introductions.insert(key, now);
        self.partners.entry(key.0).or_default().push(key.1);
        self.partners.entry(key.1).or_default().push(key.0);
        self.order.push_back((key, now));
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
        for partner in self.partners.remove(&node).unwrap_or_default() {
            self.introductions.remove(&pair(node, partner));
            self.unlink(partner, node);
        }
        self.budgets.remove(&node);
    }

    /// Drops introductions unused for longer than the idle expiry, and the
    /// budgets that refilled (a full bucket says no more than a new one).
    pub fn expire(&mut self, now: Instant) {
        self.expire_some(now, usize::MAX);
        self.drop_full_budgets(now);
    }

    /// Drops idle introductions, looking at no more than `max` pairs:
    /// pairs introduced at once come up at once, and a caller that runs
    /// this often spreads them over several calls.
    pub fn expire_some(&mut self, now: Instant, max: usize) {
        for _ in 0..max {
            let Some(&(key, queued)) = self.order.front() else {
                break;
            };
            if now.saturating_duration_since(queued) <= self.idle_expiry {
                break;
            }
            self.order.pop_front();
            match self.introductions.get(&key).copied() {
                Some(last) if now.saturating_duration_since(last) > self.idle_expiry => {
                    self.drop_pair(key)
                }
                Some(last) => self.order.push_back((key, last)),
                None => {}
            }
        }
        // Pairs forgotten leave their place in the queue behind until it
        // comes up; start afresh when those outnumber the live ones.
        if self.order.len() > 2 * self.introductions.len() + 1024 {
            let mut live: Vec<_> = self.introductions.iter().map(|(k, t)| (*k, *t)).collect();
            live.sort_by_key(|(k, t)| (*t, *k));
            self.order = live.into();
        }
    }

    /// Drops the budgets that refilled: a full bucket says no more than a
    /// new one.
    pub fn drop_full_budgets(&mut self, now: Instant) {
        self.budgets.retain(|_, b| !b.is_full(now));
    }

    /// The nodes `node` was introduced to.
    pub fn partners(&self, node: Ipv4Addr) -> &[Ipv4Addr] {
        self.partners.get(&node).map_or(&[], Vec::as_slice)
    }

    pub fn introductions(&self) -> usize {
        self.introductions.len()
    }

    /// Makes room: drops the oldest pair still unused since it was queued.
    fn evict_oldest(&mut self) -> bool {
        // Each pair comes up at most twice: the second time with the time
        // it was queued again.
        for _ in 0..2 * self.order.len() + 1 {
            let Some((key, queued)) = self.order.pop_front() else {
                break;
            };
            match self.introductions.get(&key).copied() {
                Some(last) if last == queued => {
                    self.drop_pair(key);
                    return true;
                }
                Some(last) => self.order.push_back((key, last)),
                None => {}
            }
        }
        false
    }

    fn drop_pair(&mut self, key: (Ipv4Addr, Ipv4Addr)) {
        self.introductions.remove(&key);
        self.unlink(key.0, key.1);
        self.unlink(key.1, key.0);
    }

    fn unlink(&mut self, node: Ipv4Addr, partner: Ipv4Addr) {
        if let Some(list) = self.partners.get_mut(&node) {
            if let Some(at) = list.iter().position(|p| *p == partner) {
                list.swap_remove(at);
            }
            if list.is_empty() {
                self.partners.remove(&node);
            }
        }
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

    #[test]
    fn a_full_table_makes_room_from_the_oldest_unused_pair() {
        let now = Instant::now();
        let at = |s| now + Duration::from_secs(s);
        let mut t = RelayTable::new(2, Duration::from_secs(60), 1000);
        t.introduce(A, B, now);
        t.introduce(A, C, at(1));
        assert_eq!(t.check(A, B, at(2)), Ok(()), "A-B used since");
        assert!(t.introduce(B, C, at(3)));
        assert_eq!(t.check(A, C, at(4)), Err(Refusal::NotIntroduced));
        assert_eq!(t.check(A, B, at(4)), Ok(()));
        assert_eq!(t.check(B, C, at(4)), Ok(()));
    }

    #[test]
    fn forgetting_a_node_drops_its_pairs_only_and_expiry_keeps_used_ones() {
        const D: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 8);
        let now = Instant::now();
        let at = |s| now + Duration::from_secs(s);
        let mut t = RelayTable::new(10, Duration::from_secs(60), 1000);
        t.introduce(A, B, now);
        t.introduce(A, C, now);
        t.introduce(C, D, now);
        t.introduce(A, A, now);
        t.forget(A);
        assert_eq!(t.introductions(), 1);
        assert_eq!(t.check(C, D, at(1)), Ok(()));
        t.introduce(A, B, at(1));
        assert_eq!(t.check(A, B, at(50)), Ok(()));
        t.expire(at(62));
        assert_eq!(t.introductions(), 1, "C-D idle 61 s, A-B used 12 s ago");
        assert_eq!(t.check(A, B, at(62)), Ok(()));
        t.expire(at(200));
        assert_eq!(t.introductions(), 0);
        assert!(t.partners.is_empty() && t.budgets.is_empty());
    }
}
