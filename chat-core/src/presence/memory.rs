//! Presence inside one process: the node is the only one, so a user is online while it holds a
//! connection of theirs; entries still expire without a heartbeat, as in Redis, so a connection
//! whose task ended without leaving (a panic) turns offline at the next sweep.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use uuid::Uuid;

use super::PresenceStore;
use crate::backend::BackendError;

/// In-process presence.
pub struct MemoryPresence {
    /// Present users and when their entry expires.
    expiry: Mutex<HashMap<Uuid, Instant>>,
    ttl: Duration,
}

impl MemoryPresence {
    /// Presence whose entries live `ttl` without a refresh.
    pub fn new(ttl: Duration) -> Self {
        MemoryPresence {
            expiry: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Instant>> {
        self.expiry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl PresenceStore for MemoryPresence {
    async fn join(&self, user: Uuid) -> Result<bool, BackendError> {
        let now = Instant::now();
        let before = self.lock().insert(user, now + self.ttl);
        Ok(before.is_none_or(|expires| expires <= now))
    }

    async fn leave(&self, user: Uuid) -> Result<bool, BackendError> {
        Ok(self.lock().remove(&user).is_some())
    }

    async fn refresh(&self, users: &[Uuid]) -> Result<Vec<Uuid>, BackendError> {
        let now = Instant::now();
        let mut expiry = self.lock();
        Ok(users
            .iter()
            .filter(|u| expiry.insert(**u, now + self.ttl).is_none())
            .copied()
            .collect())
    }

    async fn sweep(&self, max: usize) -> Result<Vec<Uuid>, BackendError> {
        let now = Instant::now();
        let mut expiry = self.lock();
        let gone: Vec<Uuid> = expiry
            .iter()
            .filter(|(_, e)| **e <= now)
            .map(|(u, _)| *u)
            .take(max)
            .collect();
        for user in &gone {
            expiry.remove(user);
        }
        Ok(gone)
    }

    async fn online(&self, users: &[Uuid]) -> Result<Vec<bool>, BackendError> {
        let now = Instant::now();
        let expiry = self.lock();
        Ok(users
            .iter()
            .map(|u| expiry.get(u).is_some_and(|e| *e > now))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transitions are reported once; an entry nobody refreshes is swept once, and a refresh
    /// after a sweep revives it.
    #[tokio::test(start_paused = true)]
    async fn transitions_expiry_and_revival() {
        let presence = MemoryPresence::new(Duration::from_secs(30));
        let user = Uuid::now_v7();
        assert!(presence.join(user).await.expect("join"));
        assert!(!presence.join(user).await.expect("join again"));
        assert_eq!(presence.online(&[user]).await.expect("online"), vec![true]);
        assert!(presence.refresh(&[user]).await.expect("refresh").is_empty());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(presence.online(&[user]).await.expect("online"), vec![false]);
        assert_eq!(presence.sweep(10).await.expect("sweep"), vec![user]);
        assert!(presence.sweep(10).await.expect("sweep").is_empty());
        assert_eq!(
            presence.refresh(&[user]).await.expect("refresh"),
            vec![user]
        );
        assert!(presence.leave(user).await.expect("leave"));
        assert!(!presence.leave(user).await.expect("leave again"));
    }
}
