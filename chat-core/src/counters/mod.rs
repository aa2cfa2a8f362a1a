//! Shared counters: events counted in fixed windows that every node sees (failed logins,
//! registrations), so a limit holds however many nodes a client spreads over.
//!
//! Implementations: [`redis`] (one `INCR` per count), [`memory`] (one process).

pub mod memory;
pub mod redis;

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::BackendError;

/// What is counted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CounterKey {
    /// Failed logins for an email (lowercased), from any IP.
    LoginFailedEmail(String),
    /// Failed logins for an email (lowercased) from one client IP.
    LoginFailedEmailIp(String, IpAddr),
    /// Failed logins from a client IP, for any email.
    LoginFailedIp(IpAddr),
    /// Registrations from a client IP.
    RegisterIp(IpAddr),
    /// Registrations on the whole deployment.
    RegisterAll,
    /// Handshakes with one WebSocket ticket (its id): the first one spends it.
    WsTicket(uuid::Uuid),
    /// Sends of an account in one window (its index since the epoch).
    AccountSends(uuid::Uuid, u64),
}

impl CounterKey {
    /// Failed logins for `email`, whatever its case.
    pub fn login_failed_email(email: &str) -> Self {
        CounterKey::LoginFailedEmail(email.to_lowercase())
    }

    /// Failed logins for `email`, whatever its case, from `ip`.
    pub fn login_failed_email_ip(email: &str, ip: IpAddr) -> Self {
        CounterKey::LoginFailedEmailIp(email.to_lowercase(), ip)
    }
}

/// The counting role of a backend.
#[async_trait]
pub trait Counters: Send + Sync {
    /// Counts one event against `key` in the current window of length `window` (which starts
    /// at the window's first event) and returns the count so far, this event included.
    async fn count(&self, key: &CounterKey, window: Duration) -> Result<u64, BackendError>;

    /// The counts of `keys` in their current windows (0 for a key not counted), without
    /// counting.
    async fn peek(&self, keys: &[CounterKey]) -> Result<Vec<u64>, BackendError>;

    /// Adds `n` to each key (its window `window` long, from its first count), in one round
    /// trip; returns each total.
    async fn add_many(
        &self,
        adds: &[(CounterKey, u64)],
        window: Duration,
    ) -> Result<Vec<u64>, BackendError>;
}
