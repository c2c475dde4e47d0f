//! Retry schedules that start fast and slow down: the first retry soon
//! after the first try, each next one twice as late, up to a ceiling. When a
//! whole mesh comes up at once (or its lighthouse restarts), the first hello
//! or query often goes out before the other side listens; a fast first
//! retry gets it through in tens of milliseconds, and the doubling brings
//! the rate down to the ceiling's as before. Each delay is stretched by a
//! little jitter (0 to 25 %, never shortened, so no more packets than the
//! plain schedule), different per node, so nodes started together do not
//! retry in step.

use std::time::Duration;

/// One retry schedule: the next delay, and the ceiling it doubles up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first.min(max),
            max,
        }
    }

    /// How long to wait before the next try (jittered), doubling the one
    /// after.
    pub(super) fn step(&mut self, jitter: &mut Jitter) -> Duration {
        let delay = jitter.stretch(self.next);
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// A node's own stream of jitter (splitmix64 over a seed, such as its
/// public key): deterministic for tests, different between nodes.
#[derive(Debug, Clone)]
pub(super) struct Jitter(u64);

impl Jitter {
    pub(super) fn new(seed: u64) -> Jitter {
        Jitter(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `d` stretched by 0 to 25 %.
    pub(super) fn stretch(&mut self, d: Duration) -> Duration {
        let quarter = d / 4;
        let nanos = u64::try_from(quarter.as_nanos()).unwrap_or(u64::MAX);
        match nanos {
            0 => d,
            n => d + Duration::from_nanos(self.next_u64() % n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_start_fast_double_and_stop_at_the_ceiling() {
        let mut jitter = Jitter::new(7);
        let mut b = Backoff::new(50 * MS, 5_000 * MS);
        let delays: Vec<Duration> = (0..12).map(|_| b.step(&mut jitter)).collect();
        let nominal = [
            50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000, 5000,
        ];
        for (d, n) in delays.iter().zip(nominal) {
            let n = n * MS;
            assert!(*d >= n && *d <= n + n / 4, "{d:?} for {n:?}");
        }
    }

    #[test]
    fn nodes_with_other_seeds_retry_at_other_moments() {
        let (mut a, mut b) = (Jitter::new(1), Jitter::new(2));
        let d = Duration::from_secs(1);
        let a: Vec<Duration> = (0..8).map(|_| a.stretch(d)).collect();
        let b: Vec<Duration> = (0..8).map(|_| b.stretch(d)).collect();
        assert_ne!(a, b);
        // Spread over the range, not stuck at one end.
        let spread = a
            .iter()
            .max()
            .unwrap_or(&d)
            .saturating_sub(*a.iter().min().unwrap_or(&d));
        assert!(spread > 50 * MS, "{a:?}");
    }

    #[test]
    fn a_first_delay_above_the_ceiling_is_the_ceiling() {
        let mut jitter = Jitter::new(3);
        let mut b = Backoff::new(10_000 * MS, 5_000 * MS);
        let d = b.step(&mut jitter);
        assert!(d >= 5_000 * MS && d <= 6_250 * MS, "{d:?}");
        assert_eq!(
            Backoff::new(Duration::ZERO, MS).step(&mut jitter),
            Duration::ZERO
        );
    }
}
