//! What one connection remembers about what it sent, each bounded: which messages a sync may
//! still owe (so a sync and live delivery together send every message once), the presence
//! status last sent per user, and when `typing` was last relayed per conversation. Time is
//! Tokio's, so the throttle is tested under paused time.

use std::collections::HashMap;
use std::time::Duration;

use chat_core::protocol::PresenceStatus;
use hashlink::LruCache;
use tokio::time::Instant;
use uuid::Uuid;

/// Users a connection remembers the last presence status of.
const MAX_PRESENCE_SEEN: usize = 10_000;
/// Conversations a connection remembers typing times for.
const MAX_TYPING_ENTRIES: usize = 64;
/// At most one `typing` relayed per conversation per connection in this interval.
pub const TYPING_INTERVAL: Duration = Duration::from_secs(1);

/// Sync de-duplication. Live delivery on a connection is in seq order and gap-free from its
/// first live message of a conversation on, so a sync stops below it; a sync that ran first
/// records how far it went, and live frames up to there are skipped. One entry per conversation
/// the connection has seen traffic in.
#[derive(Debug, Default)]
pub struct SyncLedger {
    /// The seq of the first live `message` written here, per conversation.
    first_live: HashMap<Uuid, i64>,
    /// The highest seq a sync sent for a conversation with no live message yet.
    synced_through: HashMap<Uuid, i64>,
}

impl SyncLedger {
    /// Whether a live message should be written (false: a sync sent it already); records the
    /// first live seq of its conversation.
    pub fn admit(&mut self, conversation: Uuid, seq: i64) -> bool {
        if let Some(through) = self.synced_through.get(&conversation) {
            if seq <= *through {
                return false;
            }
            self.synced_through.remove(&conversation);
        }
        self.first_live.entry(conversation).or_insert(seq);
        true
    }

    /// The highest seq a sync of `conversation` still owes when live delivery has started,
    /// or `None` when the sync must read up to the conversation's last seq.
    pub fn sync_ceiling(&self, conversation: Uuid) -> Option<i64> {
        self.first_live.get(&conversation).map(|first| first - 1)
    }

    /// A sync sent everything of `conversation` up to `last_seq`.
    pub fn synced(&mut self, conversation: Uuid, last_seq: i64) {
        if !self.first_live.contains_key(&conversation) {
            self.synced_through.insert(conversation, last_seq);
        }
    }

    /// Live delivery had a gap (a resync): syncs no longer stop below the first live seq.
    pub fn forget(&mut self) {
        self.first_live.clear();
        self.synced_through.clear();
    }
}

/// The presence status last written per user: a change reaches a connection once even when
/// several topics carry it (a watch and a shared room).
pub struct PresenceSeen(LruCache<Uuid, PresenceStatus>);

impl Default for PresenceSeen {
    fn default() -> Self {
        PresenceSeen(LruCache::new(MAX_PRESENCE_SEEN))
    }
}

impl PresenceSeen {
    /// Records `status` for `user`; false when this connection already has it.
    pub fn changed(&mut self, user: Uuid, status: PresenceStatus) -> bool {
        self.0.insert(user, status) != Some(status)
    }
}

/// At most one `typing` per conversation per [`TYPING_INTERVAL`].
pub struct TypingThrottle(LruCache<Uuid, Instant>);

impl Default for TypingThrottle {
    fn default() -> Self {
        TypingThrottle(LruCache::new(MAX_TYPING_ENTRIES))
    }
}

impl TypingThrottle {
    /// Whether `typing` in `conversation` may be relayed now (and records it when so).
    pub fn allow(&mut self, conversation: Uuid) -> bool {
        let now = Instant::now();
        if self
            .0
            .get(&conversation)
            .is_some_and(|at| now.duration_since(*at) < TYPING_INTERVAL)
        {
            return false;
        }
        self.0.insert(conversation, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sync then live frames: live frames the sync covered are skipped once; after the first
    /// live message a sync stops below it; a resync forgets both.
    #[test]
    fn sync_and_live_send_each_message_once() {
        let conv = Uuid::now_v7();
        let mut ledger = SyncLedger::default();
        assert_eq!(ledger.sync_ceiling(conv), None);
        ledger.synced(conv, 5);
        assert!(!ledger.admit(conv, 4), "the sync sent it");
        assert!(!ledger.admit(conv, 5));
        assert!(ledger.admit(conv, 6));
        assert_eq!(ledger.sync_ceiling(conv), Some(5), "live from 6 on");
        ledger.synced(conv, 5);
        assert!(
            ledger.admit(conv, 7),
            "a sync after live delivery skips nothing"
        );
        ledger.forget();
        assert_eq!(ledger.sync_ceiling(conv), None);
        let other = Uuid::now_v7();
        assert!(ledger.admit(other, 1));
        assert_eq!(ledger.sync_ceiling(other), Some(0));
    }

    /// The same status twice is written once; a change is written.
    #[test]
    fn presence_changes_only() {
        let mut seen = PresenceSeen::default();
        let user = Uuid::now_v7();
        assert!(seen.changed(user, PresenceStatus::Online));
        assert!(!seen.changed(user, PresenceStatus::Online));
        assert!(seen.changed(user, PresenceStatus::Offline));
    }

    /// One typing per conversation per second, other conversations independent.
    #[tokio::test(start_paused = true)]
    async fn typing_is_throttled_per_conversation() {
        let mut typing = TypingThrottle::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(typing.allow(a));
        assert!(!typing.allow(a));
        assert!(typing.allow(b));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!typing.allow(a));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(typing.allow(a));
    }
}
