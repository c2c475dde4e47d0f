//! Rate limiting on the caller's clock.

use std::time::Instant;

/// A token bucket refilled continuously at `rate` per second, `rate` deep.
/// `take(now)` spends a token if there is one.
pub struct TokenBucket {
    rate: u32,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate as f64,
            last: now,
        }
    }

    /// Whether the bucket has refilled to the brim by `now`: one that is
    /// full says nothing a new bucket would not, and may be dropped.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate as f64 >= self.rate as f64
    }

    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
