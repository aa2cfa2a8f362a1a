//! Pub/sub between nodes: the topics a node subscribes to, the typed [`Envelope`] they carry,
//! the [`PubSub`] role a backend plays, and the [`Subscriber`] the node gives it. A backend
//! pushes every envelope into the subscriber as it arrives; nothing polls.
//!
//! Implementations: [`redis`] (one pub/sub connection per node), [`redis_cluster`] (shard
//! channels on a Redis Cluster, one connection per master), [`memory`] (one process).

pub mod canary;
pub mod envelope;
pub mod memory;
pub mod redis;
pub mod redis_cluster;

use async_trait::async_trait;
use uuid::Uuid;

pub use envelope::{Envelope, EnvelopeError, MessageEnvelope};

use crate::backend::BackendError;

/// What a node subscribes to: a user's own topic (every connection of the user), a room's
/// topic, or the presence changes of a user that a local connection watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    User(Uuid),
    Room(Uuid),
    Presence(Uuid),
}

/// One envelope for several topics, published in order.
#[derive(Debug, Clone)]
pub struct Publication {
    pub topics: Vec<Topic>,
    pub envelope: Envelope,
}

/// Subscriptions an envelope changed: a membership event can make a node need a room (a local
/// user was added) or stop needing it (the last local member was removed).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Interest {
    pub subscribe: Vec<Topic>,
    pub release: Vec<Topic>,
}

impl Interest {
    pub fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.release.is_empty()
    }
}

/// The node's side of pub/sub: where envelopes go and which topics it needs.
#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    /// An envelope arrived on `topic`. Called in the order the topic's envelopes were
    /// published; returns the subscriptions it changed.
    fn deliver(&self, topic: Topic, envelope: Envelope) -> Interest;
    /// Whether the node still needs `topic` (a release is only carried out when it does not).
    fn wants(&self, topic: Topic) -> bool;
    /// Every topic the node needs now (subscribed again after a reconnect).
    fn topics(&self) -> Vec<Topic>;
    /// The backend lost envelopes (its connection dropped) and has subscribed again: the node
    /// tells its connections to resync and reloads what it may have missed.
    async fn missed(&self) -> Interest;
}

/// The pub/sub role of a backend.
#[async_trait]
pub trait PubSub: Send + Sync {
    /// Returns once this node receives `topics` (those the subscriber still wants).
    async fn subscribe(&self, topics: Vec<Topic>) -> Result<(), BackendError>;
    /// The node may no longer need `topics`; those the subscriber no longer wants are dropped.
    /// Never waits: what cannot be queued is caught by the next periodic reconciliation.
    fn release(&self, topics: Vec<Topic>);
    /// Publishes every envelope to its topics, in order, in one round trip where possible.
    async fn publish(&self, publications: Vec<Publication>) -> Result<(), BackendError>;
    /// True while every topic the node needs is subscribed (readiness reports it as `pubsub`).
    fn healthy(&self) -> bool;
}
