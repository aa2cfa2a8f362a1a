//! Shared counters: events counted in fixed windows that every node sees (login attempts per
//! email and per client IP), so a limit holds however many nodes a client spreads over.
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
    /// Login attempts for an email (lowercased).
    LoginEmail(String),
    /// Login attempts from a client IP.
    LoginIp(IpAddr),
}

impl CounterKey {
    /// Login attempts for `email`, whatever its case.
    pub fn login_email(email: &str) -> Self {
        CounterKey::LoginEmail(email.to_lowercase())
    }
}

/// The counting role of a backend.
#[async_trait]
pub trait Counters: Send + Sync {
    /// Counts one event against `key` in the current window of length `window` (which starts
    /// at the window's first event) and returns the count so far, this event included.
    async fn count(&self, key: &CounterKey, window: Duration) -> Result<u64, BackendError>;
}
