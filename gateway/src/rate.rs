//! Rates on Tokio's clock: the token bucket every per-connection and per-IP limit uses, and the
//! abuse meter that tells a client slowing down from one ignoring `rate_limited`. Time comes
//! from `tokio::time`, so the tests run under paused time.

use tokio::time::Instant;

/// `rate` events per second, in bursts of up to `burst`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes one token; false when none is left. Returns the tokens refilled since the last
    /// call as well (the abuse meter drains by them).
    pub fn take(&mut self) -> (bool, f64) {
        self.take_n(1.0)
    }

    /// Takes `n` tokens at once, or none when fewer are left.
    pub fn take_n(&mut self, n: f64) -> (bool, f64) {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= n {
            self.tokens -= n;
            (true, refill)
        } else {
            (false, refill)
        }
    }
}

/// A connection is closed with 4029 once its refused work, draining at the limit's rate per
/// second, exceeds this many seconds' worth of the rate (sending at over twice the limit for
/// about ten seconds, or one flood of twelve seconds' worth).
pub const ABUSE_FACTOR: f64 = 10.0;

/// One of a connection's limits: a bucket refilled at `rate` units per second, up to `burst`,
/// and a level of refused units that drains at the same rate; past [`ABUSE_FACTOR`] × `rate`
/// refused units the connection is abusive. Sends cost one unit each; other frames cost what
/// they make the node do (see `ws::frames::cost`).
#[derive(Debug, Clone, Copy)]
pub struct Limiter {
    bucket: TokenBucket,
    rate: f64,
    refused: f64,
    abusive: bool,
}

impl Limiter {
    /// `rate` units per second, in bursts of `burst`.
    pub fn new(rate: u32, burst: u32) -> Self {
        let rate = f64::from(rate);
        Limiter {
            bucket: TokenBucket::new(rate, f64::from(burst)),
            rate,
            refused: 0.0,
            abusive: false,
        }
    }

    /// Whether one more unit of work is allowed now.
    pub fn allow(&mut self) -> bool {
        self.allow_n(1)
    }

    /// Whether work costing `cost` units is allowed now.
    pub fn allow_n(&mut self, cost: u32) -> bool {
        let cost = f64::from(cost);
        let (allowed, refill) = self.bucket.take_n(cost);
        self.refused = (self.refused - refill).max(0.0);
        if !allowed {
            self.refused += cost;
            self.abusive |= self.refused > ABUSE_FACTOR * self.rate;
        }
        allowed
    }

    /// Whether the connection kept sending far above its limit after being refused.
    pub fn abusive(&self) -> bool {
        self.abusive
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A burst of twice the rate passes, the next is refused, and tokens come back with time.
    #[tokio::test(start_paused = true)]
    async fn buckets_refill_with_time() {
        let mut bucket = TokenBucket::new(5.0, 10.0);
        assert!((0..10).all(|_| bucket.take().0));
        assert!(!bucket.take().0);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(bucket.take().0, "refilled at 5 per second");
        assert!(!bucket.take().0);
    }

    /// A client that backs off after `rate_limited` is never abusive; one that keeps sending at
    /// three times the limit is, after about ten seconds.
    #[tokio::test(start_paused = true)]
    async fn abuse_needs_sustained_refusals() {
        let mut polite = Limiter::new(10, 20);
        for _ in 0..30 {
            polite.allow();
        }
        tokio::time::advance(Duration::from_secs(20)).await;
        for _ in 0..20 {
            polite.allow();
        }
        assert!(!polite.abusive());

        let mut flood = Limiter::new(10, 20);
        let mut seconds = 0;
        while !flood.abusive() && seconds < 60 {
            for _ in 0..30 {
                flood.allow();
            }
            tokio::time::advance(Duration::from_secs(1)).await;
            seconds += 1;
        }
        assert!(flood.abusive(), "three times the rate for a minute");
        assert!((5..=12).contains(&seconds), "abusive after {seconds} s");
    }

    /// Costly work drains the bucket by its cost: a burst's worth at once, then nothing until
    /// it refills; refused costly work makes a connection abusive sooner.
    #[tokio::test(start_paused = true)]
    async fn work_costs_its_weight() {
        let mut limiter = Limiter::new(100, 1000);
        assert!((0..10).all(|_| limiter.allow_n(100)), "ten syncs of 100");
        assert!(!limiter.allow_n(100));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(limiter.allow_n(100), "a second later: 100 units");
        let mut refused = 0;
        while !limiter.abusive() {
            assert!(!limiter.allow_n(100));
            refused += 1;
        }
        assert_eq!(refused, 11, "ten seconds' worth refused, then abusive");
    }
}
