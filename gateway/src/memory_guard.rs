//! Whether Redis has room for more messages: every few seconds the node reads `used_memory` and
//! `maxmemory` of every Redis node (one `INFO` each), exports the highest ratio, and once it
//! reaches `redis_memory_refuse_ratio` refuses sends with `unavailable` until it falls back.
//! With `noeviction` a full Redis refuses every write, for every user, presence and counters
//! included; refusing new messages first keeps the rest working while operators act.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chat_core::redis_conn::Commands;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The guard of one node.
pub struct MemoryGuard {
    full: AtomicBool,
    refuse_at: f64,
}

impl MemoryGuard {
    /// Refuses at `refuse_at` (a fraction of `maxmemory`); has room until it has read Redis.
    pub fn new(refuse_at: f64) -> Self {
        MemoryGuard {
            full: AtomicBool::new(false),
            refuse_at,
        }
    }

    /// Whether a send may be appended.
    pub fn has_room(&self) -> bool {
        !self.full.load(Ordering::Relaxed)
    }

    /// Reads Redis every `every` until `shutdown`. A read that fails keeps the last verdict.
    pub async fn watch(
        &self,
        redis: Commands,
        metrics: Metrics,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let nodes = match redis.node_info().await {
                Ok(nodes) => nodes,
                Err(e) => {
                    tracing::debug!(error = %e, "redis memory unreadable");
                    continue;
                }
            };
            let ratio = nodes
                .iter()
                .filter_map(|n| n.memory_ratio())
                .fold(0.0_f64, f64::max);
            metrics.redis_memory_ratio.set(ratio);
            let full = ratio >= self.refuse_at;
            if self.full.swap(full, Ordering::Relaxed) != full {
                if full {
                    tracing::error!(
                        ratio,
                        "redis is nearly full: sends are refused until it has room"
                    );
                } else {
                    tracing::warn!(ratio, "redis has room again: sends are accepted");
                }
            }
        }
    }
}
