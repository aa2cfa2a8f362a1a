//! Presence: which users have a connection on some node. Each node records the users it holds
//! and refreshes them on every heartbeat; an entry a node stops refreshing (it died) expires, and
//! a sweep finds the users whose every entry expired. Every transition (online, offline) is
//! reported to exactly one caller, which announces it.
//!
//! Implementations: [`redis`] (a sorted set per user, scripts on Redis's clock), [`memory`]
//! (one process).

pub mod memory;
pub mod redis;

use async_trait::async_trait;
use uuid::Uuid;

use crate::backend::BackendError;

/// The presence role of a backend, for one node.
#[async_trait]
pub trait PresenceStore: Send + Sync {
    /// This node holds a connection of `user`; true when they just came online.
    async fn join(&self, user: Uuid) -> Result<bool, BackendError>;
    /// This node's last connection of `user` closed; true when they just went offline.
    async fn leave(&self, user: Uuid) -> Result<bool, BackendError>;
    /// Refreshes this node's entries of `users`; returns those who had none live (swept while
    /// this node held them: they are online again).
    async fn refresh(&self, users: &[Uuid]) -> Result<Vec<Uuid>, BackendError>;
    /// Up to `max` users whose every entry expired, removed: they went offline.
    async fn sweep(&self, max: usize) -> Result<Vec<Uuid>, BackendError>;
    /// Whether each of `users` is online now.
    async fn online(&self, users: &[Uuid]) -> Result<Vec<bool>, BackendError>;
}
