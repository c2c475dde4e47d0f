//! Admission of datagrams from sources nobody has verified yet (hellos,
//! enrollment hellos and requests): a token bucket per source prefix, so one
//! address (or one forged range) cannot take more than its share, and one
//! for all sources together, so many cannot take the daemon. Sans-IO: the
//! caller passes the time.
//!
//! Drive it with [`SourceLimiter::admit`] for each datagram; it forgets
//! idle prefixes on its own, so its memory stays bounded.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::rate::TokenBucket;
use serde::Serialize;

/// The prefixes enrollment counts a source by: an IPv4 /24, an IPv6 /48
/// (what one site or one NAT pool usually holds).
pub const SITE_PREFIXES: SourcePrefixes = SourcePrefixes { v4: 24, v6: 48 };
/// The prefixes hellos are counted by: one IPv4 address, one IPv6 /64
/// (the least one host is given, and can pick any address in).
pub const HOST_PREFIXES: SourcePrefixes = SourcePrefixes { v4: 32, v6: 64 };

/// How many leading bits of a source address make it the same source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePrefixes {
    pub v4: u32,
    pub v6: u32,
}

/// Most prefixes tracked at once; beyond this, new prefixes share one
/// bucket until idle ones are forgotten.
const MAX_PREFIXES: usize = 16_384;

/// What [`SourceLimiter`] did, for `tern-lighthouse status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AdmissionCounters {
    pub admitted: u64,
    /// Over the source prefix's rate.
    pub limited_per_source: u64,
    /// Over the rate of all sources together.
    pub limited_total: u64,
}

/// Token buckets per source prefix and for all sources.
pub struct SourceLimiter {
    per_source: u32,
    prefixes: SourcePrefixes,
    buckets: HashMap<IpAddr, (TokenBucket, Instant)>,
    /// Shared by new prefixes while the table is full.
    overflow: TokenBucket,
    total: TokenBucket,
    counters: AdmissionCounters,
    last_sweep: Instant,
}

impl SourceLimiter {
    /// `per_source` datagrams a second from one prefix ([`SITE_PREFIXES`]),
    /// `total` from all (each bucket one second deep).
    pub fn new(per_source: u32, total: u32, now: Instant) -> SourceLimiter {
        SourceLimiter::by(SITE_PREFIXES, per_source, total, now)
    }

    /// As [`SourceLimiter::new`], counting sources by `prefixes`.
    pub fn by(
        prefixes: SourcePrefixes,
        per_source: u32,
        total: u32,
        now: Instant,
    ) -> SourceLimiter {
        SourceLimiter {
            per_source: per_source.max(1),
            prefixes,
            buckets: HashMap::new(),
            overflow: TokenBucket::new(per_source.max(1), now),
            total: TokenBucket::new(total.max(1), now),
            counters: AdmissionCounters::default(),
            last_sweep: now,
        }
    }

    /// Whether a datagram from `from` may be answered now.
    pub fn admit(&mut self, from: SocketAddr, now: Instant) -> bool {
        self.sweep(now);
        let prefix = prefix_of(from.ip(), self.prefixes);
        let full = self.buckets.len() >= MAX_PREFIXES;
        let allowed = match self.buckets.get_mut(&prefix) {
            Some((bucket, seen)) => {
                *seen = now;
                bucket.take(now)
            }
            None if full => self.overflow.take(now),
            None => {
                let mut bucket = TokenBucket::new(self.per_source, now);
                let allowed = bucket.take(now);
                self.buckets.insert(prefix, (bucket, now));
                allowed
            }
        };
        if !allowed {
            self.counters.limited_per_source += 1;
            return false;
        }
        if !self.total.take(now) {
            self.counters.limited_total += 1;
            return false;
        }
        self.counters.admitted += 1;
        true
    }

    pub fn counters(&self) -> &AdmissionCounters {
        &self.counters
    }

    /// Prefixes tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    /// Forgets prefixes idle long enough for their bucket to be full again
    /// (a new bucket is the same), at most once a second.
    fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) < Duration::from_secs(1) {
            return;
        }
        self.last_sweep = now;
        self.buckets
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < Duration::from_secs(2));
    }
}

fn prefix_of(ip: IpAddr, prefixes: SourcePrefixes) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - prefixes.v4.min(32)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => prefix_of(IpAddr::V4(v4), prefixes),
            None => {
                let mask = u128::MAX
                    .checked_shl(128 - prefixes.v6.min(128))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A source in documentation /48 number `i` (2001:db8:i::/48).
    fn site(i: u32) -> SocketAddr {
        let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, i as u16, 0, 0, 0, 0, 1);
        SocketAddr::new(IpAddr::V6(ip), 9)
    }

    #[test]
    fn a_flood_from_one_prefix_gets_its_rate_and_others_still_get_in() {
        let t0 = Instant::now();
        let mut limiter = SourceLimiter::new(10, 1000, t0);
        // 5000 datagrams over one second from one address (and its /24).
        let mut admitted = 0;
        for i in 0..5000u32 {
            let now = t0 + Duration::from_micros(200 * u64::from(i));
            let from = addr(&format!("198.18.7.{}:{}", i % 250, 1000 + i % 50));
            if limiter.admit(from, now) {
                admitted += 1;
            }
        }
        // A full bucket (10) and one second's refill (10), no more.
        assert!((10..=21).contains(&admitted), "{admitted}");
        // Another prefix is not held up by it.
        let now = t0 + Duration::from_secs(1);
        assert!(limiter.admit(addr("198.18.8.1:5000"), now));
        assert_eq!(limiter.counters().limited_total, 0);
        assert!(limiter.counters().limited_per_source >= 4979);
    }

    #[test]
    fn many_prefixes_together_get_the_total_rate() {
        let t0 = Instant::now();
        let mut limiter = SourceLimiter::new(10, 100, t0);
        let admitted = (0..1000u32).filter(|i| limiter.admit(site(*i), t0)).count();
        assert_eq!(admitted, 100);
        assert_eq!(limiter.counters().limited_total, 900);
    }

    #[test]
    fn idle_prefixes_are_forgotten_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut limiter = SourceLimiter::new(1, u32::MAX, t0);
        for i in 0..(MAX_PREFIXES as u32 + 500) {
            limiter.admit(site(i), t0);
        }
        assert_eq!(limiter.tracked(), MAX_PREFIXES);
        limiter.admit(addr("198.18.0.1:1"), t0 + Duration::from_secs(5));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn sources_are_counted_by_prefix() {
        let of = |ip: &str, p| prefix_of(ip.parse().unwrap(), p).to_string();
        assert_eq!(of("198.18.7.99", SITE_PREFIXES), "198.18.7.0");
        assert_eq!(of("2001:db8:1:2::5", SITE_PREFIXES), "2001:db8:1::");
        assert_eq!(of("::ffff:198.18.7.99", SITE_PREFIXES), "198.18.7.0");
        assert_eq!(of("198.18.7.99", HOST_PREFIXES), "198.18.7.99");
        assert_eq!(of("2001:db8:1:2:3::5", HOST_PREFIXES), "2001:db8:1:2::");
        let all = SourcePrefixes { v4: 0, v6: 0 };
        assert_eq!(of("198.18.7.99", all), "0.0.0.0");
        assert_eq!(of("2001:db8::1", all), "::");
    }
}
