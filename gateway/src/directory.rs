//! Who exists and who may use a conversation, asked by every send, frame and request. Users are
//! never deleted and direct conversations never change members, so positive answers are kept
//! in bounded LRU caches. Room membership changes: the hub's live index (kept by membership
//! events) answers no at once, and a yes is confirmed in Postgres at most
//! `gateway_membership_recheck_secs` earlier, so a removal whose event was lost still holds on
//! every node within that time. It also says whose presence a user may see
//! (`presence_visibility`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_core::log::MessageLog;
use chat_core::pubsub::Topic;
use chat_core::store::{Membership, Store};
use hashlink::LruCache;
use uuid::Uuid;

use crate::config::PresenceVisibility;
use crate::hub::Hub;

/// Users, and direct conversations, remembered at most.
const CACHE_ENTRIES: usize = 100_000;
/// Longest a lookup may take (pool wait and query) before the caller answers `unavailable`.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// The directory could not answer (Redis and Postgres unavailable, or too slow).
#[derive(Debug, thiserror::Error)]
#[error("directory: {0}")]
pub struct DirectoryError(String);

/// Users and conversation memberships.
pub struct Directory {
    store: Store,
    log: Arc<dyn MessageLog>,
    hub: Arc<Hub>,
    users: Mutex<LruCache<Uuid, ()>>,
    pairs: Mutex<LruCache<Uuid, (Uuid, Uuid)>>,
    /// (user, room) memberships Postgres confirmed, and when.
    confirmed: Mutex<LruCache<(Uuid, Uuid), Instant>>,
    /// How long a confirmation holds.
    recheck: Duration,
    visibility: PresenceVisibility,
}

impl Directory {
    /// Room memberships the hub reports are confirmed in Postgres every `recheck`.
    pub fn new(
        store: Store,
        log: Arc<dyn MessageLog>,
        hub: Arc<Hub>,
        recheck: Duration,
        visibility: PresenceVisibility,
    ) -> Self {
        Directory {
            store,
            log,
            hub,
            users: Mutex::new(LruCache::new(CACHE_ENTRIES)),
            pairs: Mutex::new(LruCache::new(CACHE_ENTRIES)),
            confirmed: Mutex::new(LruCache::new(CACHE_ENTRIES)),
            recheck,
            visibility,
        }
    }

    /// Whose presence a user sees.
    pub fn visibility(&self) -> PresenceVisibility {
        self.visibility
    }

    /// Which of `users` `viewer` may see the presence of: all of them with `everyone`, their
    /// contacts (and themselves) with `contacts`.
    pub async fn visible_to(
        &self,
        viewer: Uuid,
        users: &[Uuid],
    ) -> Result<HashSet<Uuid>, DirectoryError> {
        if self.visibility == PresenceVisibility::Everyone {
            return Ok(users.iter().copied().collect());
        }
        let mut visible =
            tokio::time::timeout(LOOKUP_TIMEOUT, self.store.contacts_among(viewer, users))
                .await
                .map_err(|_| DirectoryError("postgres did not answer in time".into()))?
                .map_err(|e| DirectoryError(e.to_string()))?;
        if users.contains(&viewer) {
            visible.insert(viewer);
        }
        Ok(visible)
    }

    /// Whether `user` is known to exist, without asking Postgres.
    pub fn knows_user(&self, user: Uuid) -> bool {
        lock(&self.users).get(&user).is_some()
    }

    /// Records a user known to exist.
    pub fn remember_user(&self, user: Uuid) {
        lock(&self.users).insert(user, ());
    }

    /// Whether `user` exists; asks Postgres on a cache miss.
    pub async fn user_exists(&self, user: Uuid) -> Result<bool, DirectoryError> {
        if self.knows_user(user) {
            return Ok(true);
        }
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, self.store.user_exists(user))
            .await
            .map_err(|_| DirectoryError("postgres did not answer in time".into()))?
            .map_err(|e| DirectoryError(e.to_string()))?;
        if found {
            self.remember_user(user);
        }
        Ok(found)
    }

    /// `user`'s membership of `conversation`, or `None` when the conversation does not exist or
    /// `user` is not a member (callers answer both the same way).
    pub async fn membership(
        &self,
        user: Uuid,
        conversation: Uuid,
    ) -> Result<Option<Membership>, DirectoryError> {
        if self.hub.is_member(user, conversation) {
            let fresh = lock(&self.confirmed)
                .get(&(user, conversation))
                .is_some_and(|at| at.elapsed() < self.recheck);
            if fresh {
                return Ok(Some(Membership::Room));
            }
            // The index may be stale (a removal's event lost): Postgres decides.
            let membership = self.postgres_membership(user, conversation).await?;
            if membership == Some(Membership::Room) {
                lock(&self.confirmed).insert((user, conversation), Instant::now());
            }
            return Ok(membership);
        }
        let of_pair = |(a, b): (Uuid, Uuid)| {
            if a == user {
                Some(Membership::Direct { peer: b })
            } else if b == user {
                Some(Membership::Direct { peer: a })
            } else {
                None
            }
        };
        let cached = lock(&self.pairs).get(&conversation).copied();
        if let Some(pair) = cached {
            return Ok(of_pair(pair));
        }
        // A direct conversation's pair is in the log from its first message, before Postgres.
        if let Ok(Some(pair)) = self.log.direct_pair(conversation).await {
            lock(&self.pairs).insert(conversation, pair);
            return Ok(of_pair(pair));
        }
        let membership = self.postgres_membership(user, conversation).await?;
        if let Some(Membership::Direct { peer }) = membership {
            lock(&self.pairs).insert(conversation, (user, peer));
        }
        Ok(membership)
    }

    async fn postgres_membership(
        &self,
        user: Uuid,
        conversation: Uuid,
    ) -> Result<Option<Membership>, DirectoryError> {
        tokio::time::timeout(LOOKUP_TIMEOUT, self.store.membership(user, conversation))
            .await
            .map_err(|_| DirectoryError("postgres did not answer in time".into()))?
            .map_err(|e| DirectoryError(e.to_string()))
    }
}

/// The topics a conversation's live frames go to, from `user`: both members' (direct) or the
/// room's.
pub fn topics(user: Uuid, conversation: Uuid, membership: Membership) -> Vec<Topic> {
    match membership {
        Membership::Direct { peer } => vec![Topic::User(peer), Topic::User(user)],
        Membership::Room => vec![Topic::Room(conversation)],
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
