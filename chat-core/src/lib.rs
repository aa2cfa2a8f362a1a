//! What the gateway and the persistence worker share: the wire protocol, the message model, the
//! backend roles with their Redis and in-memory implementations, the SQL store, configuration
//! loading and the admin server.
//!
//! # Layout
//! - [`protocol`]: client and server frames, the error-code and close-code tables.
//! - [`conversation`]: how conversation ids are derived.
//! - [`message`]: a message as accepted and as stored, and its frame built around its seq.
//! - Backend roles, each a trait in `mod.rs` with one file per implementation (`redis.rs`,
//!   `memory.rs`):
//!   - [`log`]: the message log (append with seq and idempotency, tail, consumer group);
//!   - [`pubsub`]: topics, the typed envelopes they carry, and the subscriber they push into;
//!   - [`presence`]: who is online, with heartbeats and sweeps;
//!   - [`counters`]: counts in windows shared by every node (login limits).
//! - [`backend`]: the error every role answers with.
//! - [`keys`]: every Redis key and channel name (Redis backend only).
//! - [`redis_conn`]: the shared Redis command connection and its metrics (Redis backend only).
//! - [`store`]: every SQL statement, behind one pool; versioned migrations.
//! - [`settings`]: layered configuration loading (defaults, TOML file, `CHAT_*` env).
//! - [`admin`]: the internal HTTP server (`/healthz`, `/readyz` with its probes, `/metrics`).
//! - [`backoff`]: exponential backoff with jitter for every retry loop.
//! - [`telemetry`]: logging and tracing setup, and the trace context carried in messages.
//! - [`shutdown`]: SIGTERM/SIGINT into a cancellation token.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod backoff;
pub mod conversation;
pub mod counters;
pub mod keys;
pub mod log;
pub mod message;
pub mod presence;
/// The wire protocol lives in its own small crate (so the fuzz target builds quickly).
pub use chat_protocol as protocol;
pub mod pubsub;
pub mod redis_conn;
pub mod settings;
pub mod shutdown;
pub mod store;
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
