//! Exponential backoff with full jitter, for every retry loop against Redis or Postgres.

use std::time::Duration;

use rand::Rng;

/// Doubles the ceiling from `base` up to `max` on each failure; sleeps a random time below it.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let millis = u64::try_from(ceiling.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }

    /// Call after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays grow but never pass the cap, and reset starts over.
    #[test]
    fn delays_are_capped_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_millis(200));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(10));
    }
}
