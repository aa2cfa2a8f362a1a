//! Abuse limits beyond one connection: failed logins and registrations (shared counters, so
//! they hold across nodes), and handshakes per client IP (counted on this node).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_core::counters::{CounterKey, Counters};
use hashlink::LruCache;

use crate::rate::TokenBucket;

/// Client IPs a node remembers handshake rates of; the least recently seen is forgotten first.
const MAX_TRACKED_IPS: usize = 100_000;

/// Each failed login for an email beyond the slow threshold adds this much wait to every later
/// attempt for that email, up to [`MAX_LOGIN_DELAY`].
const LOGIN_DELAY_STEP: Duration = Duration::from_millis(250);
/// The longest an attempt waits because its email is being guessed.
pub const MAX_LOGIN_DELAY: Duration = Duration::from_secs(3);

/// How many failures of each kind a window allows.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    /// Failures for one email from one client IP before that IP is refused for that email.
    pub per_email_ip: u32,
    /// Failures from one client IP, any email, before the IP is refused.
    pub per_ip: u32,
    /// Failures for one email, any IP, after which its attempts are slowed (never refused: an
    /// owner is not locked out by strangers guessing).
    pub slow_per_email: u32,
    pub window: Duration,
}

/// What a login attempt may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginGate {
    /// Go ahead after waiting this long (zero unless the email is being guessed).
    Proceed(Duration),
    /// Refused: this IP failed too often (for this email, or for any).
    Refused,
}

/// Failed logins per (email, client IP), per client IP and per email, across all nodes.
///
/// Attempts are checked before the password is and counted only when they fail, so an owner's
/// right password never counts. Concurrent guesses from one IP may each pass the check before
/// any is counted; the password threads bound how many run at once.
pub struct LoginLimiter {
    counters: Arc<dyn Counters>,
    limits: LoginLimits,
}

impl LoginLimiter {
    pub fn new(counters: Arc<dyn Counters>, limits: LoginLimits) -> Self {
        LoginLimiter { counters, limits }
    }

    fn keys(email: &str, ip: Option<IpAddr>) -> Vec<CounterKey> {
        let mut keys = vec![CounterKey::login_failed_email(email)];
        if let Some(ip) = ip {
            keys.push(CounterKey::login_failed_email_ip(email, ip));
            keys.push(CounterKey::LoginFailedIp(ip));
        }
        keys
    }

    /// Whether an attempt for `email` from `ip` may go ahead, and after how long. Fails open
    /// when the counters cannot answer: the password check still applies, and an outage must
    /// not lock every user out.
    pub async fn check(&self, email: &str, ip: Option<IpAddr>) -> LoginGate {
        let counts = match self.counters.peek(&Self::keys(email, ip)).await {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(error = %e, "login limits unavailable; allowing");
                return LoginGate::Proceed(Duration::ZERO);
            }
        };
        let of = |i: usize| counts.get(i).copied().unwrap_or_default();
        let l = &self.limits;
        if of(1) >= u64::from(l.per_email_ip) || of(2) >= u64::from(l.per_ip) {
            return LoginGate::Refused;
        }
        let beyond = of(0).saturating_sub(u64::from(l.slow_per_email));
        let delay = LOGIN_DELAY_STEP.saturating_mul(u32::try_from(beyond).unwrap_or(u32::MAX));
        LoginGate::Proceed(delay.min(MAX_LOGIN_DELAY))
    }

    /// Counts a failed attempt.
    pub async fn failed(&self, email: &str, ip: Option<IpAddr>) {
        let adds: Vec<(CounterKey, u64)> =
            Self::keys(email, ip).into_iter().map(|k| (k, 1)).collect();
        if let Err(e) = self.counters.add_many(&adds, self.limits.window).await {
            tracing::warn!(error = %e, "login failure not counted");
        }
    }
}

/// Registrations per client IP and on the whole deployment, in one window, across all nodes:
/// every registration costs an argon2id hash, so strangers cannot make the nodes hash at will.
pub struct RegistrationLimiter {
    counters: Arc<dyn Counters>,
    per_ip: u32,
    total: u32,
    window: Duration,
}

impl RegistrationLimiter {
    pub fn new(counters: Arc<dyn Counters>, per_ip: u32, total: u32, window: Duration) -> Self {
        RegistrationLimiter {
            counters,
            per_ip,
            total,
            window,
        }
    }

    /// Counts a registration attempt from `ip`; false when the IP or the deployment is over its
    /// limit. Counted before the password is hashed. Fails closed when the counters cannot
    /// answer: registration can wait for Redis, and an outage must not lift the limit.
    pub async fn allow(&self, ip: Option<IpAddr>) -> bool {
        let by_ip = async {
            match ip {
                Some(ip) => self.within(CounterKey::RegisterIp(ip), self.per_ip).await,
                None => true,
            }
        };
        let (ip_ok, total_ok) =
            tokio::join!(by_ip, self.within(CounterKey::RegisterAll, self.total));
        ip_ok && total_ok
    }

    async fn within(&self, key: CounterKey, limit: u32) -> bool {
        match self.counters.count(&key, self.window).await {
            Ok(count) => count <= u64::from(limit),
            Err(e) => {
                tracing::warn!(error = %e, "registration limit unavailable; refusing");
                false
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

    /// A guessed email is slowed, not locked; the guessing IP is refused for it after its
    /// limit, and for every email after the per-IP limit; other IPs are not; counters that fail
    /// let logins through.
    #[tokio::test]
    async fn failed_logins_refuse_the_guesser_and_slow_the_email() {
        let counters = Arc::new(chat_core::counters::memory::MemoryCounters::default());
        let limits = LoginLimits {
            per_email_ip: 3,
            per_ip: 5,
            slow_per_email: 2,
            window: Duration::from_secs(60),
        };
        let limiter = LoginLimiter::new(counters, limits);
        let guesser: IpAddr = "10.0.0.1".parse().expect("ip");
        let owner: IpAddr = "10.0.0.2".parse().expect("ip");
        let go = LoginGate::Proceed(Duration::ZERO);
        assert_eq!(limiter.check("a@x.io", Some(guesser)).await, go);
        for _ in 0..3 {
            limiter.failed("A@x.io", Some(guesser)).await;
        }
        assert_eq!(
            limiter.check("a@x.io", Some(guesser)).await,
            LoginGate::Refused,
            "three failures for the email from this IP"
        );
        assert_eq!(
            limiter.check("a@x.io", Some(owner)).await,
            LoginGate::Proceed(LOGIN_DELAY_STEP),
            "another IP is slowed, one step past the threshold of 2"
        );
        assert_eq!(limiter.check("b@x.io", Some(guesser)).await, go);
        limiter.failed("b@x.io", Some(guesser)).await;
        limiter.failed("c@x.io", Some(guesser)).await;
        assert_eq!(
            limiter.check("d@x.io", Some(guesser)).await,
            LoginGate::Refused,
            "five failures from the IP"
        );
        for _ in 0..100 {
            limiter.failed("a@x.io", None).await;
        }
        assert_eq!(
            limiter.check("a@x.io", Some(owner)).await,
            LoginGate::Proceed(MAX_LOGIN_DELAY),
            "slowed at most this much"
        );

        let open = LoginLimiter::new(Arc::new(Down), limits);
        assert_eq!(open.check("a@x.io", Some(guesser)).await, go);
    }

    /// Registrations are limited per IP and in total; counters that fail refuse them.
    #[tokio::test]
    async fn registrations_are_limited_per_ip_and_in_total() {
        let counters = Arc::new(chat_core::counters::memory::MemoryCounters::default());
        let limiter = RegistrationLimiter::new(counters, 2, 3, Duration::from_secs(60));
        let one: IpAddr = "10.0.0.1".parse().expect("ip");
        let two: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(limiter.allow(Some(one)).await);
        assert!(limiter.allow(Some(one)).await);
        assert!(!limiter.allow(Some(one)).await, "third from the IP");
        assert!(!limiter.allow(Some(two)).await, "fourth in total");
        let closed = RegistrationLimiter::new(Arc::new(Down), 9, 9, Duration::from_secs(60));
        assert!(!closed.allow(Some(one)).await);
    }

    /// Counters whose backend is down.
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

        async fn peek(
            &self,
            _: &[CounterKey],
        ) -> Result<Vec<u64>, chat_core::backend::BackendError> {
            Err(chat_core::backend::BackendError::Timeout)
        }

        async fn add_many(
            &self,
            _: &[(CounterKey, u64)],
            _: Duration,
        ) -> Result<Vec<u64>, chat_core::backend::BackendError> {
            Err(chat_core::backend::BackendError::Timeout)
        }
    }
}
