//! The WebSocket layer, one file per concern:
//! - [`handshake`]: `GET /ws`: Origin, rate and capacity checks, the token, the subscriptions,
//!   then the upgrade and the connection task;
//! - [`admission`]: the node's connection slots and a connection's place in the hub, each a
//!   guard released by `Drop`;
//! - [`connection`]: the loop of one connection (client frames, queued deliveries, heartbeats,
//!   token expiry, shutdown) and nothing else;
//! - [`frames`]: one file per client frame type, each handler taking only what it uses;
//! - [`ledger`]: what a connection remembers to send each message once and to throttle;
//! - [`outbox`]: writing frames to the socket, bounded in time and counted;
//! - [`reader`]: reading frames off the socket, with RFC 6455 close codes;
//! - [`echo`]: the conformance-test echo route.

pub mod admission;
pub mod connection;
pub mod echo;
pub mod frames;
pub mod handshake;
pub mod ledger;
pub mod outbox;
pub mod reader;

use std::sync::Arc;
use std::time::Duration;

use chat_core::log::MessageLog;
use chat_core::pubsub::PubSub;
use chat_core::store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::authn::Authenticator;
use crate::directory::Directory;
use crate::history::History;
use crate::hub::Hub;
use crate::limits::HandshakeLimiter;
use crate::lookups::Batcher;
use crate::metrics::Metrics;
use crate::presence::Presence;

/// The settings of the WebSocket layer.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// This node's id (sent in `hello`).
    pub node_id: String,
    /// Origins allowed to open WebSockets; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: crate::client_ip::TrustedProxies,
    /// Continue a handshake's `traceparent` (`otel_trust_client_context`).
    pub trust_client_trace: bool,
    pub heartbeat: Duration,
    pub client_timeout: Duration,
    /// Largest frame or reassembled message a client may send.
    pub max_frame_bytes: usize,
    /// Frames queued for one connection before it counts as a slow consumer.
    pub outbound_queue: usize,
    pub max_connections_per_user: usize,
    /// Rooms loaded (and subscribed) per user at the handshake.
    pub max_rooms_per_user: usize,
    /// Sustained `send` frames per second per connection.
    pub send_rate_per_sec: u32,
    /// Units of work per second per connection for every other frame (`ws::frames::cost`).
    pub frame_budget_per_sec: u32,
    /// Sends per second per account over all its connections and nodes.
    pub account_send_rate_per_sec: u32,
    pub max_body_bytes: usize,
    pub max_watched_users: usize,
}

/// What the WebSocket layer uses, wired once by the node. Each frame handler is handed only the
/// pieces it needs.
#[derive(Clone)]
pub struct Services {
    pub settings: Arc<WsSettings>,
    pub metrics: Metrics,
    pub slots: Arc<admission::Slots>,
    pub handshakes: Arc<HandshakeLimiter>,
    pub account_budget: Arc<crate::account_budget::AccountBudget>,
    pub memory_guard: Arc<crate::memory_guard::MemoryGuard>,
    pub authenticator: Arc<Authenticator>,
    pub hub: Arc<Hub>,
    pub pubsub: Arc<dyn PubSub>,
    pub log: Arc<dyn MessageLog>,
    pub directory: Arc<Directory>,
    pub history: Arc<History>,
    pub presence: Arc<Presence>,
    pub store: Store,
    /// A user's rooms, read at the handshake; shared with concurrent handshakes.
    pub rooms: Batcher<Uuid, Vec<Uuid>>,
    /// Every connection task and the work it starts beside itself; the node waits on these
    /// when it drains.
    pub tasks: TaskTracker,
    /// Cancelled when the node starts to drain: every connection closes with 1001.
    pub shutdown: CancellationToken,
}
