//! Sends per account across all its connections and nodes: each node counts its sends per
//! account in fixed windows, refuses once the account's total in the window (what every node
//! reported to the shared counters, plus what this node has not reported yet) reaches the
//! budget, and reports its counts in one pipeline a second. An account on one node is limited
//! exactly; one spread over N nodes may pass the budget by what the other nodes accepted in the
//! last second before they reported.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_core::counters::{CounterKey, Counters};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The window sends are counted in.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How often a node reports its counts and learns the others'.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// One account's window on this node.
#[derive(Debug, Clone, Copy)]
struct Entry {
    window: u64,
    /// The account's total in the window as the shared counters last said (this node's
    /// reported sends included).
    known: u64,
    /// Sends accepted here and not reported yet.
    pending: u64,
}

/// Per-account send budget of one node.
pub struct AccountBudget {
    counters: Arc<dyn Counters>,
    /// Sends per account per window.
    per_window: u64,
    entries: Mutex<HashMap<Uuid, Entry>>,
}

fn window_now() -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    secs / WINDOW.as_secs()
}

impl AccountBudget {
    /// `per_sec` sends per second per account, counted over [`WINDOW`].
    pub fn new(counters: Arc<dyn Counters>, per_sec: u32) -> Self {
        AccountBudget {
            counters,
            per_window: u64::from(per_sec) * WINDOW.as_secs(),
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one send for `user`; false when the account's budget for this window is spent.
    pub fn allow(&self, user: Uuid) -> bool {
        self.allow_in(user, window_now())
    }

    fn allow_in(&self, user: Uuid, window: u64) -> bool {
        let mut entries = self.lock();
        let entry = entries.entry(user).or_insert(Entry {
            window,
            known: 0,
            pending: 0,
        });
        if entry.window != window {
            *entry = Entry {
                window,
                known: 0,
                pending: 0,
            };
        }
        if entry.known + entry.pending >= self.per_window {
            return false;
        }
        entry.pending += 1;
        true
    }

    /// Reports this node's unreported sends and learns each account's total; forgets
    /// accounts of past windows. One pipeline for every account that sent.
    pub async fn report(&self) {
        self.report_in(window_now()).await
    }

    async fn report_in(&self, window: u64) {
        let batch: Vec<(Uuid, u64, u64)> = {
            let mut entries = self.lock();
            entries.retain(|_, e| e.window == window || e.pending > 0);
            entries
                .iter_mut()
                .filter(|(_, e)| e.pending > 0)
                .map(|(user, e)| {
                    let pending = std::mem::take(&mut e.pending);
                    (*user, e.window, pending)
                })
                .collect()
        };
        if batch.is_empty() {
            return;
        }
        let adds: Vec<(CounterKey, u64)> = batch
            .iter()
            .map(|(user, w, n)| (CounterKey::AccountSends(*user, *w), *n))
            .collect();
        match self.counters.add_many(&adds, WINDOW * 2).await {
            Ok(totals) => {
                let mut entries = self.lock();
                for ((user, w, _), total) in batch.iter().zip(totals) {
                    if let Some(e) = entries.get_mut(user).filter(|e| e.window == *w) {
                        e.known = e.known.max(total);
                    }
                }
                entries.retain(|_, e| e.window == window);
            }
            Err(e) => {
                // Counted here still: keep them as known so this node's own limit holds.
                tracing::warn!(error = %e, "account send counts not reported");
                let mut entries = self.lock();
                for (user, w, n) in batch {
                    if let Some(e) = entries.get_mut(&user).filter(|e| e.window == w) {
                        e.known += n;
                    }
                }
            }
        }
    }

    /// Reports every [`REPORT_EVERY`] until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(REPORT_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => self.report().await,
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::counters::memory::MemoryCounters;

    /// One node stops at the budget; a second node learns the first's sends when both report,
    /// so together they pass it by at most what was accepted before the report; a new window
    /// starts afresh.
    #[tokio::test]
    async fn the_budget_holds_per_node_and_across_nodes_after_a_report() {
        let counters: Arc<dyn Counters> = Arc::new(MemoryCounters::default());
        let a = AccountBudget::new(counters.clone(), 1); // 10 per window
        let b = AccountBudget::new(counters, 1);
        let user = Uuid::now_v7();
        assert_eq!((0..15).filter(|_| a.allow_in(user, 7)).count(), 10);
        a.report_in(7).await;
        assert!(b.allow_in(user, 7), "b has not heard of a's sends yet");
        b.report_in(7).await;
        assert!(
            !b.allow_in(user, 7),
            "b learned the total (11): past the budget by what it accepted before reporting"
        );
        assert!(!a.allow_in(user, 7));
        assert!(a.allow_in(user, 8), "a new window starts afresh");
    }
}
