//! The composition root shared by every handler: one `Node` per gateway process.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::accounts::UserDirectory;
use crate::auth::Auth;
use crate::broker::Broker;
use crate::config::Validated;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Everything a request or a connection needs.
pub struct Node {
    /// Validated settings (limits, node id, origins).
    pub config: Arc<Validated>,
    /// Token issuing and verification, password hashing.
    pub auth: Auth,
    /// Postgres: users (and, later, history).
    pub db: deadpool_postgres::Pool,
    /// Local connections by user.
    pub hub: Arc<Hub>,
    /// Redis append and pub/sub subscriptions.
    pub broker: Broker,
    /// Cached "does this recipient exist".
    pub directory: UserDirectory,
    /// Who may use a conversation.
    pub conversations: crate::conversations::Directory,
    /// Who is online.
    pub presence: crate::presence::Presence,
    /// The threads that hash and verify passwords (argon2id is memory-hard).
    pub passwords: crate::auth::PasswordPool,
    /// Handshakes per client IP on this node.
    pub handshakes: crate::limits::HandshakeLimiter,
    /// Where password reset tokens go.
    pub password_resets: crate::password_reset::Notifier,
    pub metrics: Metrics,
    /// Cancelled when the node starts to drain; every session watches it.
    pub shutdown: CancellationToken,
}
