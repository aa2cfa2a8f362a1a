//! Abuse limits beyond one connection: login attempts per email and per client IP (counted in
//! Redis, so they hold across nodes), and handshakes per client IP and connections per user
//! (counted on this node).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use uuid::Uuid;

use crate::node::Node;

/// Client IPs a node remembers handshake counts for before it starts over.
const MAX_TRACKED_IPS: usize = 100_000;

/// The client's IP: the peer address, or the first `X-Forwarded-For` entry when
/// `gateway_trust_forwarded_for` says a proxy in front sets it (otherwise clients could forge it).
pub fn client_ip(node: &Node, req: &HttpRequest) -> Option<IpAddr> {
    if node.config.raw.gateway_trust_forwarded_for {
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

/// Counts one event against `key` in a fixed window shared by every node; true while the count
/// is within `limit`. Fails open (true) when Redis cannot answer: the caller's other checks
/// still apply, and a Redis outage must not lock every user out.
async fn within_shared(node: &Node, key: String, limit: u32, window: Duration) -> bool {
    let mut pipe = redis::pipe();
    pipe.cmd("INCR")
        .arg(&key)
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(u64::try_from(window.as_millis()).unwrap_or(u64::MAX))
        .arg("NX")
        .ignore();
    match node.broker.query::<(u64,)>(&pipe).await {
        Ok((count,)) => count <= u64::from(limit),
        Err(e) => {
            tracing::warn!(error = %e, "login limit unavailable; allowing");
            true
        }
    }
}

/// Whether another login attempt for `email` from `ip` is allowed now (and counts it).
pub async fn login_allowed(node: &Node, email: &str, ip: Option<IpAddr>) -> bool {
    let cfg = &node.config.raw;
    let window = Duration::from_secs(cfg.gateway_login_window_secs);
    let prefix = node.broker.keys().prefix();
    let by_email = within_shared(
        node,
        format!("{prefix}:limit:login:email:{}", email.to_lowercase()),
        cfg.gateway_login_attempts_per_email,
        window,
    );
    let by_ip = async {
        match ip {
            Some(ip) => {
                within_shared(
                    node,
                    format!("{prefix}:limit:login:ip:{ip}"),
                    cfg.gateway_login_attempts_per_ip,
                    window,
                )
                .await
            }
            None => true,
        }
    };
    let (email_ok, ip_ok) = tokio::join!(by_email, by_ip);
    email_ok && ip_ok
}

/// Handshakes per client IP on this node: a token bucket per IP.
pub struct HandshakeLimiter {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
    per_sec: f64,
    burst: f64,
}

impl HandshakeLimiter {
    /// `per_sec` handshakes per second per IP, in bursts of twice that.
    pub fn new(per_sec: u32) -> Self {
        HandshakeLimiter {
            buckets: Mutex::new(HashMap::new()),
            per_sec: f64::from(per_sec),
            burst: f64::from(per_sec) * 2.0,
        }
    }

    /// Takes a token for `ip`; false when it handshakes too fast.
    pub fn allow(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED_IPS && !buckets.contains_key(&ip) {
            // Forgetting everyone is generous for a moment, but bounded.
            buckets.clear();
        }
        let (tokens, at) = buckets.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Whether `user` may open another connection on this node.
pub fn connection_allowed(node: &Node, user: Uuid) -> bool {
    node.hub.connection_count(user) < node.config.raw.gateway_max_connections_per_user
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of twice the rate passes, the next is refused, and tokens come back with time.
    #[test]
    fn handshake_buckets_refill() {
        let limiter = HandshakeLimiter::new(5);
        let ip: IpAddr = "127.0.0.9".parse().expect("ip");
        let other: IpAddr = "127.0.0.10".parse().expect("ip");
        assert!((0..10).all(|_| limiter.allow(ip)));
        assert!(!limiter.allow(ip));
        assert!(limiter.allow(other), "another IP has its own bucket");
        std::thread::sleep(Duration::from_millis(250));
        assert!(limiter.allow(ip), "refilled at 5 per second");
    }
}
