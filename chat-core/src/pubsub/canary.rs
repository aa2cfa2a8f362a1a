//! The delivery canary: every few seconds a node publishes a token on a channel only it
//! subscribes to, through Redis, and expects it back on its pub/sub connection. A connection
//! that stays open but delivers nothing (a half-open TCP link, a stalled proxy, a wedged
//! subscription) shows as a token that does not come back within the timeout; the manager
//! then drops that connection, subscribes again on a new one and tells the node it missed
//! envelopes. Only a token that was published (Redis answered the PUBLISH) counts: when Redis
//! cannot be reached at all, the readiness probe of the command connection says so. On a Redis
//! Cluster a node keeps one canary per stream partition, each on a shard channel in that
//! partition's slot, so every master that carries the node's channels carries a canary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{Histogram, IntCounter};
use tokio::time::Instant;
use uuid::Uuid;

/// How often a canary is sent, and how long it may take to come back.
#[derive(Debug, Clone, Copy)]
pub struct CanarySettings {
    pub every: Duration,
    pub timeout: Duration,
}

impl Default for CanarySettings {
    fn default() -> Self {
        CanarySettings {
            every: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
        }
    }
}

/// What the canary counts.
#[derive(Clone)]
pub struct CanaryMetrics {
    /// Publish to arrival of each canary that came back.
    pub round_trip: Histogram,
    /// Canaries published that did not come back within the timeout (each one reconnects).
    pub lost: IntCounter,
}

/// What a tick found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing wrong; publish `token` now if given.
    Fine(Option<u64>),
    /// The last canary was published and has not come back within the timeout.
    Lost,
}

#[derive(Default)]
struct Outstanding {
    /// The last token handed out for publishing.
    token: u64,
    /// When Redis confirmed publishing it; `None` until then (or when it failed).
    published_at: Option<Instant>,
}

/// One node's canary, shared by its manager (which ticks and publishes) and its reader (which
/// sees tokens arrive).
#[derive(Clone)]
pub struct Canary {
    channel: String,
    settings: CanarySettings,
    metrics: Option<CanaryMetrics>,
    outstanding: Arc<Mutex<Outstanding>>,
    /// The highest token seen back.
    seen: Arc<AtomicU64>,
}

impl Canary {
    /// A canary on `{prefix}:canary:<random id>`: no other process subscribes to it.
    pub fn new(prefix: &str, settings: CanarySettings, metrics: Option<CanaryMetrics>) -> Self {
        Self::on_channel(
            format!("{prefix}:canary:{}", Uuid::new_v4()),
            settings,
            metrics,
        )
    }

    /// A canary on `channel`, which no other process may subscribe to.
    pub fn on_channel(
        channel: String,
        settings: CanarySettings,
        metrics: Option<CanaryMetrics>,
    ) -> Self {
        Canary {
            channel,
            settings,
            metrics,
            outstanding: Arc::default(),
            seen: Arc::default(),
        }
    }

    /// The channel the canary travels on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// How often the manager should tick.
    pub fn every(&self) -> Duration {
        self.settings.every
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outstanding> {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A payload arrived on the canary channel.
    pub fn arrived(&self, payload: &[u8]) {
        let Some(token) = std::str::from_utf8(payload)
            .ok()
            .and_then(|t| t.parse::<u64>().ok())
        else {
            return;
        };
        let previous = self.seen.fetch_max(token, Ordering::Relaxed);
        if token <= previous {
            return;
        }
        let out = self.lock();
        if let (Some(at), Some(m)) = (out.published_at, &self.metrics) {
            if out.token == token {
                m.round_trip.observe(at.elapsed().as_secs_f64());
            }
        }
    }

    /// Redis answered the PUBLISH of `token`: from now on it must come back in time.
    pub fn published(&self, token: u64) {
        let mut out = self.lock();
        if out.token == token {
            out.published_at = Some(Instant::now());
        }
    }

    /// Whether a token handed out after `token` (or it) has come back.
    pub fn returned_since(&self, token: u64) -> bool {
        self.seen.load(Ordering::Relaxed) >= token
    }

    /// The manager's periodic check: the last canary is lost if it was published more than the
    /// timeout ago and has not come back; otherwise a new token to publish when the last one is
    /// back (or was never published: a failed PUBLISH is retried, not held against the
    /// connection).
    pub fn tick(&self) -> Verdict {
        let mut out = self.lock();
        let back = self.seen.load(Ordering::Relaxed) >= out.token;
        match out.published_at {
            Some(at) if !back && at.elapsed() > self.settings.timeout => {
                if let Some(m) = &self.metrics {
                    m.lost.inc();
                }
                // Forget it: the next connection starts with a new token.
                out.published_at = None;
                Verdict::Lost
            }
            Some(_) if !back => Verdict::Fine(None),
            _ => {
                out.token += 1;
                out.published_at = None;
                Verdict::Fine(Some(out.token))
            }
        }
    }

    /// Forgets the canary in flight (its connection is being replaced): the next tick hands
    /// out a new token instead of holding the old one against the new connection.
    pub fn forget(&self) {
        self.lock().published_at = None;
    }

    /// The last token handed out.
    pub fn last_token(&self) -> u64 {
        self.lock().token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canary() -> Canary {
        Canary::new(
            "t",
            CanarySettings {
                every: Duration::from_secs(1),
                timeout: Duration::from_secs(3),
            },
            None,
        )
    }

    /// A canary that comes back lets the next one go; one published and not back within the
    /// timeout is lost once; one never published is never lost.
    #[tokio::test(start_paused = true)]
    async fn canaries_come_back_or_are_lost() {
        let c = canary();
        assert_eq!(c.tick(), Verdict::Fine(Some(1)));
        c.published(1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(c.tick(), Verdict::Fine(None), "still in flight");
        c.arrived(b"1");
        assert!(c.returned_since(1));
        assert_eq!(c.tick(), Verdict::Fine(Some(2)));
        c.published(2);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(c.tick(), Verdict::Lost);
        assert_eq!(c.tick(), Verdict::Fine(Some(3)), "a new token after a loss");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            c.tick(),
            Verdict::Fine(Some(4)),
            "an unpublished canary is not lost"
        );
        c.arrived(b"nonsense");
        c.arrived(b"2");
        assert!(!c.returned_since(4), "a late old token is not the new one");
        c.published(4);
        c.forget();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            c.tick(),
            Verdict::Fine(Some(5)),
            "a forgotten canary is not held against the new connection"
        );
    }
}
