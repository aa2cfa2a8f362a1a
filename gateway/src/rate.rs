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
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            (true, refill)
        } else {
            (false, refill)
        }
    }
}

/// A connection is closed with 4029 once its refused sends, draining at the send rate per
/// second, exceed this many seconds' worth of the rate (sending at over twice the limit for
/// about ten seconds, or one flood of twelve seconds' worth).
pub const ABUSE_FACTOR: f64 = 10.0;

/// A connection's send limit: a bucket refilled at `rate` per second, up to twice that, and a
/// level of refused sends that drains at the same rate; past [`ABUSE_FACTOR`] × `rate` refused
/// sends the connection is abusive.
#[derive(Debug, Clone, Copy)]
pub struct SendLimiter {
    bucket: TokenBucket,
    rate: f64,
    refused: f64,
    abusive: bool,
}

impl SendLimiter {
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate);
        SendLimiter {
            bucket: TokenBucket::new(rate, rate * 2.0),
            rate,
            refused: 0.0,
            abusive: false,
        }
    }

    /// Whether one more send is allowed now.
    pub fn allow(&mut self) -> bool {
        let (allowed, refill) = self.bucket.take();
        self.refused = (self.refused - refill).max(0.0);
        if !allowed {
            self.refused += 1.0;
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
        let mut polite = SendLimiter::new(10);
        for _ in 0..30 {
            polite.allow();
        }
        tokio::time::advance(Duration::from_secs(20)).await;
        for _ in 0..20 {
            polite.allow();
        }
        assert!(!polite.abusive());

        let mut flood = SendLimiter::new(10);
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
}
