//! Shared counters inside one process: a bounded map of windows, the least recently counted
//! forgotten first.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use hashlink::LruCache;
use tokio::time::Instant;

use super::{CounterKey, Counters};
use crate::backend::BackendError;

/// Keys counted at once, at most. Forgetting the least recently counted key lets it start a new
/// window early, a bounded generosity.
const MAX_KEYS: usize = 100_000;

/// In-process counters.
pub struct MemoryCounters {
    windows: Mutex<LruCache<CounterKey, (u64, Instant)>>,
}

impl Default for MemoryCounters {
    fn default() -> Self {
        MemoryCounters {
            windows: Mutex::new(LruCache::new(MAX_KEYS)),
        }
    }
}

#[async_trait]
impl Counters for MemoryCounters {
    async fn count(&self, key: &CounterKey, window: Duration) -> Result<u64, BackendError> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let (count, ends) = windows.get(key).copied().unwrap_or((0, now));
        let (count, ends) = if ends <= now {
            (1, now + window)
        } else {
            (count + 1, ends)
        };
        windows.insert(key.clone(), (count, ends));
        Ok(count)
    }

    async fn add_many(
        &self,
        adds: &[(CounterKey, u64)],
        window: Duration,
    ) -> Result<Vec<u64>, BackendError> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        Ok(adds
            .iter()
            .map(|(key, n)| {
                let (count, ends) = match windows.get(key).copied() {
                    Some((count, ends)) if ends > now => (count + n, ends),
                    _ => (*n, now + window),
                };
                windows.insert(key.clone(), (count, ends));
                count
            })
            .collect())
    }

    async fn peek(&self, keys: &[CounterKey]) -> Result<Vec<u64>, BackendError> {
        let now = Instant::now();
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        Ok(keys
            .iter()
            .map(|key| match windows.peek(key) {
                Some(&(count, ends)) if ends > now => count,
                _ => 0,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts grow within a window and start again after it, per key.
    #[tokio::test(start_paused = true)]
    async fn windows_count_and_restart() {
        let counters = MemoryCounters::default();
        let key = CounterKey::login_failed_email("A@Example.com");
        let other = CounterKey::login_failed_email("b@example.com");
        let window = Duration::from_secs(60);
        for expected in 1..=3 {
            assert_eq!(counters.count(&key, window).await.ok(), Some(expected));
        }
        assert_eq!(counters.count(&other, window).await.ok(), Some(1));
        assert_eq!(
            counters
                .count(&CounterKey::login_failed_email("a@example.com"), window)
                .await
                .ok(),
            Some(4),
            "emails count whatever their case"
        );
        assert_eq!(
            counters.peek(&[key.clone(), other.clone()]).await.ok(),
            Some(vec![4, 1]),
            "peeking does not count"
        );
        tokio::time::advance(window).await;
        assert_eq!(
            counters.peek(std::slice::from_ref(&key)).await.ok(),
            Some(vec![0])
        );
        assert_eq!(counters.count(&key, window).await.ok(), Some(1));
    }
}
