//! Lookups for an address nobody had registered yet, remembered for a
//! moment: when a mesh comes up at once, a node often asks for a peer a few
//! milliseconds before that peer registers. The asker is told "unknown" at
//! once (as before) and, when the peer registers within [`QUERY_WAIT`], gets
//! the answer (and the peer its punch request) right then, instead of on its
//! next retry. Bounded: at most [`MAX_WAITING`] remembered.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// How long an unanswered lookup waits for its address to register.
pub const QUERY_WAIT: Duration = Duration::from_secs(3);
/// Most lookups remembered at once (then new ones are not).
pub const MAX_WAITING: usize = 4096;

/// One asker waiting for one address: the asker's overlay address and the
/// id of its query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub asker: Ipv4Addr,
    pub id: u32,
    since: Instant,
}

#[derive(Debug, Default)]
pub struct WaitingQueries {
    by_target: HashMap<Ipv4Addr, Vec<Waiting>>,
    count: usize,
}

impl WaitingQueries {
    /// `asker` asked for `target` (query `id`) and nobody had it. An
    /// earlier query of the same asker for the same target is replaced.
    pub fn remember(&mut self, target: Ipv4Addr, asker: Ipv4Addr, id: u32, now: Instant) {
        if self.count >= MAX_WAITING {
            self.forget_old(now);
            if self.count >= MAX_WAITING {
                return;
            }
        }
        let list = self.by_target.entry(target).or_default();
        let before = list.len();
        list.retain(|w| w.asker != asker);
        self.count -= before - list.len();
        list.push(Waiting {
            asker,
            id,
            since: now,
        });
        self.count += 1;
    }

    /// `target` registered: who still waits for it (asked within
    /// [`QUERY_WAIT`]), forgotten here.
    pub fn take(&mut self, target: Ipv4Addr, now: Instant) -> Vec<Waiting> {
        let Some(list) = self.by_target.remove(&target) else {
            return Vec::new();
        };
        self.count -= list.len();
        list.into_iter()
            .filter(|w| now.saturating_duration_since(w.since) < QUERY_WAIT)
            .collect()
    }

    /// Lookups remembered now.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn forget_old(&mut self, now: Instant) {
        let mut count = 0;
        self.by_target.retain(|_, list| {
            list.retain(|w| now.saturating_duration_since(w.since) < QUERY_WAIT);
            count += list.len();
            !list.is_empty()
        });
        self.count = count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 64, 0, last)
    }

    #[test]
    fn a_registration_within_the_wait_answers_its_askers_once() {
        let now = Instant::now();
        let mut w = WaitingQueries::default();
        w.remember(ip(6), ip(5), 1, now);
        w.remember(ip(6), ip(5), 2, now); // asked again: replaced
        w.remember(ip(6), ip(7), 9, now);
        assert_eq!(w.len(), 2);
        let waiting = w.take(ip(6), now + Duration::from_millis(20));
        let got: Vec<(Ipv4Addr, u32)> = waiting.iter().map(|w| (w.asker, w.id)).collect();
        assert_eq!(got, [(ip(5), 2), (ip(7), 9)]);
        assert!(w.is_empty());
        assert!(w.take(ip(6), now).is_empty(), "answered once");
    }

    #[test]
    fn old_lookups_are_not_answered_and_the_table_is_bounded() {
        let now = Instant::now();
        let mut w = WaitingQueries::default();
        w.remember(ip(6), ip(5), 1, now);
        assert!(w.take(ip(6), now + QUERY_WAIT).is_empty(), "too late");
        for i in 0..(MAX_WAITING as u32 + 10) {
            w.remember(Ipv4Addr::from(0x6440_0000 + i), ip(5), i, now);
        }
        assert_eq!(w.len(), MAX_WAITING);
        // Once the old ones are past their wait, new ones find room.
        let later = now + QUERY_WAIT;
        w.remember(ip(9), ip(5), 1, later);
        assert_eq!(w.len(), 1);
        assert_eq!(w.take(ip(9), later).len(), 1);
    }
}
