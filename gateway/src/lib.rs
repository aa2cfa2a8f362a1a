//! The chat gateway node: holds WebSocket connections, accepts messages into the log, fans them
//! out through pub/sub, and serves the HTTP API and the internal admin port.
//!
//! # Layout
//! Where a request goes, top to bottom; each module imports only those below it.
//! - [`node`]: the composition root: builds every service once, serves, drains.
//! - [`http`]: the HTTP API, one file per resource (`accounts`, `password_reset`, `users`,
//!   `conversations`, `rooms`), the route table, and the `Authenticated` extractor.
//! - [`ws`]: the WebSocket layer: `handshake` (admission and upgrade), `connection` (the loop),
//!   `frames/` (one file per client frame: `send`, `sync`, `read`, `typing`, `presence`),
//!   `ledger`, `outbox`, `reader`, `admission`, `echo`.
//! - [`web_client`]: the reference web client, served from one asset table.
//! - Services the layers above use:
//!   - [`delivery`]: the pub/sub subscriber: envelopes into the hub, membership into the room
//!     index, resync after a loss;
//!   - [`presence`]: join, leave, heartbeats, sweeps, announcements;
//!   - [`history`]: a seq range merged from the log's tail and Postgres;
//!   - [`directory`]: who exists, who may use a conversation;
//!   - [`authn`]: who is calling (token, token floor, external users);
//!   - [`lookups`]: the per-request Postgres lookups (token floors, a user's rooms), coalesced
//!     into one query per batch of concurrent callers;
//!   - [`limits`]: failed logins, registrations, handshakes per IP;
//!   - [`account_budget`]: sends per account over all its connections and nodes;
//!   - [`memory_guard`]: refusing sends before Redis is full;
//!   - [`client_ip`]: who a request comes from, behind trusted proxies;
//!   - [`passwords`]: password rules and argon2id on dedicated threads;
//!   - [`notifier`]: password reset requests, queued and handled off the request path;
//!   - [`hub`]: local connections by user, room and watch, bounded outbound queues.
//! - Leaves: [`auth`] (JWTs), [`ticket`] (single-use WebSocket tickets), [`rate`] (token buckets on Tokio time), [`fields`] (field rules),
//!   [`api_error`] (JSON errors), [`metrics`], [`config`], [`tls`].
//!
//! The backends (message log, pub/sub, presence, counters) and the SQL store are in
//! `chat_core`; this crate never talks to Redis or Postgres itself.
#![forbid(unsafe_code)]

pub mod account_budget;
pub mod api_error;
pub mod auth;
pub mod authn;
pub mod client_ip;
pub mod config;
pub mod delivery;
pub mod directory;
pub mod fields;
pub mod history;
pub mod http;
pub mod hub;
pub mod limits;
pub mod lookups;
pub mod memory_guard;
pub mod metrics;
mod node;
pub mod notifier;
pub mod passwords;
pub mod presence;
pub mod rate;
pub mod ticket;
pub mod tls;
pub mod web_client;
pub mod ws;

use std::net::TcpListener;

use tokio_util::sync::CancellationToken;

use crate::config::Validated;

/// The gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Db(#[from] chat_core::store::DbError),
    #[error(transparent)]
    Backend(#[from] chat_core::backend::BackendError),
    #[error("backend: {0}")]
    BackendLock(#[from] chat_core::store::lock::LockError),
    #[error("authentication setup: {0}")]
    Auth(String),
    #[error(transparent)]
    Passwords(#[from] passwords::PasswordError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("password reset notifier: {0}")]
    Notifier(#[from] reqwest::Error),
    #[error("redis would lose acked messages ({0}); fix its configuration, or set CHAT_REDIS_REQUIRE_DURABILITY=false to start anyway (development only)")]
    UnsafeRedis(String),
}

/// The two listening sockets, bound before `run` so tests can use port 0.
pub struct Listeners {
    pub public: TcpListener,
    pub internal: TcpListener,
}

impl Listeners {
    pub fn bind(config: &Validated) -> std::io::Result<Self> {
        Ok(Listeners {
            public: TcpListener::bind(config.listen)?,
            internal: TcpListener::bind(config.internal_listen)?,
        })
    }
}

/// Runs one gateway node until `shutdown` is cancelled, then drains: readiness fails, every
/// connection is told to reconnect elsewhere (close 1001), and the servers stop.
pub async fn run(
    config: Validated,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    node::run(config, listeners, shutdown).await
}
