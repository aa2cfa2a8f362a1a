//! Abuse limits beyond one connection: login attempts per email and per client IP (shared
//! counters, so they hold across nodes), and handshakes per client IP (counted on this node).
//! Also which IP a request comes from.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::HttpRequest;
use chat_core::counters::{CounterKey, Counters};
use hashlink::LruCache;

use crate::rate::TokenBucket;

/// Client IPs a node remembers handshake rates of; the least recently seen is forgotten first.
const MAX_TRACKED_IPS: usize = 100_000;

/// The client's IP: the peer address, or the first `X-Forwarded-For` entry when
/// `trust_forwarded_for` says a proxy in front sets it (otherwise clients could forge it).
pub fn client_ip(req: &HttpRequest, trust_forwarded_for: bool) -> Option<IpAddr> {
    if trust_forwarded_for {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|first| first.trim().parse().ok());
        if forwarded.is_some() {
            return forwarded;
        }
    }
    req.peer_addr().map(|a| a.ip())
}

/// Login attempts per email and per client IP, in one window, across all nodes.
pub struct LoginLimiter {
    counters: Arc<dyn Counters>,
    per_email: u32,
    per_ip: u32,
    window: Duration,
}

impl LoginLimiter {
    pub fn new(counters: Arc<dyn Counters>, per_email: u32, per_ip: u32, window: Duration) -> Self {
        LoginLimiter {
            counters,
            per_email,
            per_ip,
            window,
        }
    }

    /// Counts a login attempt for `email` from `ip`; false when either is over its limit. Fails
    /// open when the counters cannot answer: the password check still applies, and an outage
    /// must not lock every user out.
    pub async fn allow(&self, email: &str, ip: Option<IpAddr>) -> bool {
        let by_email = self.within(CounterKey::login_email(email), self.per_email);
        let by_ip = async {
            match ip {
                Some(ip) => self.within(CounterKey::LoginIp(ip), self.per_ip).await,
                None => true,
            }
        };
        let (email_ok, ip_ok) = tokio::join!(by_email, by_ip);
        email_ok && ip_ok
    }

    async fn within(&self, key: CounterKey, limit: u32) -> bool {
        match self.counters.count(&key, self.window).await {
            Ok(count) => count <= u64::from(limit),
            Err(e) => {
                tracing::warn!(error = %e, "login limit unavailable; allowing");
                true
            }
        }
    }
}

/// Handshakes per client IP on this node: a token bucket per IP.
pub struct HandshakeLimiter {
    buckets: Mutex<LruCache<IpAddr, TokenBucket>>,
    per_sec: f64,
}

impl HandshakeLimiter {
    /// `per_sec` handshakes per second per IP, in bursts of twice that.
    pub fn new(per_sec: u32) -> Self {
        HandshakeLimiter {
            buckets: Mutex::new(LruCache::new(MAX_TRACKED_IPS)),
            per_sec: f64::from(per_sec),
        }
    }

    /// Takes a token for `ip`; false when it handshakes too fast.
    pub fn allow(&self, ip: IpAddr) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (per_sec, burst) = (self.per_sec, self.per_sec * 2.0);
        let bucket = buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(per_sec, burst));
        bucket.take().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of twice the rate passes per IP, the next is refused, tokens come back with time.
    #[tokio::test(start_paused = true)]
    async fn handshake_buckets_refill_per_ip() {
        let limiter = HandshakeLimiter::new(5);
        let ip: IpAddr = "127.0.0.9".parse().expect("ip");
        let other: IpAddr = "127.0.0.10".parse().expect("ip");
        assert!((0..10).all(|_| limiter.allow(ip)));
        assert!(!limiter.allow(ip));
        assert!(limiter.allow(other), "another IP has its own bucket");
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(limiter.allow(ip), "refilled at 5 per second");
    }

    /// Logins are limited per email and per IP; counters that fail let logins through.
    #[tokio::test]
    async fn logins_are_limited_and_fail_open() {
        let counters = Arc::new(chat_core::counters::memory::MemoryCounters::default());
        let limiter = LoginLimiter::new(counters, 2, 3, Duration::from_secs(60));
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(limiter.allow("a@x.io", Some(ip)).await);
        assert!(limiter.allow("A@x.io", Some(ip)).await);
        assert!(
            !limiter.allow("a@x.io", Some(ip)).await,
            "third for the email"
        );
        assert!(
            !limiter.allow("b@x.io", Some(ip)).await,
            "fourth for the IP"
        );
        assert!(limiter.allow("b@x.io", None).await);

        struct Down;
        #[async_trait::async_trait]
        impl Counters for Down {
            async fn count(
                &self,
                _: &CounterKey,
                _: Duration,
            ) -> Result<u64, chat_core::backend::BackendError> {
                Err(chat_core::backend::BackendError::Timeout)
            }
        }
        let open = LoginLimiter::new(Arc::new(Down), 0, 0, Duration::from_secs(60));
        assert!(open.allow("a@x.io", Some(ip)).await);
    }
}
