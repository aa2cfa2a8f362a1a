//! What the gateway and the persistence worker share: the wire protocol, the Redis key schema,
//! the stream entry format, configuration loading, database migrations and the admin server.
//!
//! # Layout
//! - [`protocol`]: client and server frames, the error-code and close-code tables.
//! - [`conversation`]: how conversation ids are derived.
//! - [`keys`]: every Redis key and channel name, partitioning, hash tags.
//! - [`stream`]: the message stream entry, and the one-round-trip append script.
//! - [`settings`]: layered configuration loading (defaults, TOML file, `CHAT_*` env).
//! - [`db`]: Postgres pool and versioned migrations.
//! - [`redis_pool`]: the Redis connection pool.
//! - [`admin`]: the internal HTTP server (`/healthz`, `/readyz`, `/metrics`).
//! - [`backoff`]: exponential backoff with jitter for every retry loop.
//! - [`telemetry`]: logging and tracing setup, and the trace context carried in messages.
//! - [`shutdown`]: SIGTERM/SIGINT into a cancellation token.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod conversation;
pub mod db;
pub mod keys;
/// The wire protocol lives in its own small crate (so the fuzz target builds quickly).
pub use chat_protocol as protocol;
pub mod redis_pool;
pub mod settings;
pub mod shutdown;
pub mod stream;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

/// Current time as Unix milliseconds, the `ts` of every message.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
