//! Nodes that relay for others (`[relay]` on a node whose certificate
//! carries the `relay` group), so that relayed traffic is not all on the
//! lighthouses. Such a node offers with each registration; for a pair it
//! introduces, the lighthouse picks one of them, tells it to forward
//! between the two (`RelayIntroduce`), and tells both to use it
//! (`UseRelay`). A pair always lands on the same relay while the set of
//! relays stays the same, and pairs spread over all of them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// A relay that has not offered again within this long is not chosen (it
/// offers with each registration, every 4 s).
pub const OFFER_FRESH: Duration = Duration::from_secs(10);

/// Most relay nodes remembered.
const MAX_RELAY_NODES: usize = 4096;

/// The relay nodes that offered lately, by overlay address.
#[derive(Debug, Default)]
pub struct RelayNodes {
    offers: BTreeMap<Ipv4Addr, Instant>,
}

impl RelayNodes {
    /// `node` offers to relay (its certificate was checked for the group).
    pub fn offer(&mut self, node: Ipv4Addr, now: Instant) {
        if self.offers.len() >= MAX_RELAY_NODES && !self.offers.contains_key(&node) {
            self.expire(now);
            if self.offers.len() >= MAX_RELAY_NODES {
                return;
            }
        }
        self.offers.insert(node, now);
    }

    /// `node` left (deregistered, expired, revoked).
    pub fn remove(&mut self, node: Ipv4Addr) {
        self.offers.remove(&node);
    }

    /// Forgets relays whose offer went stale.
    pub fn expire(&mut self, now: Instant) {
        self.offers
            .retain(|_, at| now.saturating_duration_since(*at) < OFFER_FRESH);
    }

    pub fn len(&self) -> usize {
        self.offers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offers.is_empty()
    }

    /// The relay for the pair `a`, `b` (neither of them), among those
    /// whose offer is fresh and that `usable` accepts (registered at an
    /// address others can send to): the same one for the same pair.
    pub fn choose(
        &self,
        a: Ipv4Addr,
        b: Ipv4Addr,
        now: Instant,
        usable: impl Fn(Ipv4Addr) -> bool,
    ) -> Option<Ipv4Addr> {
        let fresh: Vec<Ipv4Addr> = self
            .offers
            .iter()
            .filter(|(ip, at)| {
                **ip != a && **ip != b && now.saturating_duration_since(**at) < OFFER_FRESH
            })
            .map(|(ip, _)| *ip)
            .filter(|ip| usable(*ip))
            .collect();
        if fresh.is_empty() {
            return None;
        }
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let key = (u64::from(u32::from(lo)) << 32) | u64::from(u32::from(hi));
        // splitmix64's finalizer: neighbouring pairs land far apart.
        let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Some(fresh[(z % fresh.len() as u64) as usize])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 64, 0, n)
    }

    #[test]
    fn pairs_keep_their_relay_and_spread_over_all() {
        let t0 = Instant::now();
        let mut relays = RelayNodes::default();
        assert_eq!(relays.choose(ip(1), ip(2), t0, |_| true), None);
        for n in 200..204 {
            relays.offer(ip(n), t0);
        }
        let first = relays.choose(ip(1), ip(2), t0, |_| true).unwrap();
        assert_eq!(relays.choose(ip(2), ip(1), t0, |_| true), Some(first));
        let mut used = std::collections::BTreeSet::new();
        for a in 1..60 {
            used.insert(relays.choose(ip(a), ip(a + 100), t0, |_| true).unwrap());
        }
        assert_eq!(used.len(), 4, "{used:?}");
        // Never one of the pair; never one that is not usable.
        assert_ne!(relays.choose(ip(200), ip(2), t0, |_| true), Some(ip(200)));
        assert_eq!(
            relays.choose(ip(1), ip(2), t0, |r| r == ip(203)),
            Some(ip(203))
        );
    }

    #[test]
    fn stale_and_departed_relays_are_not_chosen() {
        let t0 = Instant::now();
        let mut relays = RelayNodes::default();
        relays.offer(ip(200), t0);
        relays.offer(ip(201), t0 + OFFER_FRESH);
        let later = t0 + OFFER_FRESH + Duration::from_secs(1);
        assert_eq!(relays.choose(ip(1), ip(2), later, |_| true), Some(ip(201)));
        relays.remove(ip(201));
        assert_eq!(relays.choose(ip(1), ip(2), later, |_| true), None);
        relays.expire(later);
        assert!(relays.is_empty());
    }
}
