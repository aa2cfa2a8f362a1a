//! Presence as the node keeps it: recording the users it holds (join, leave), refreshing them
//! every heartbeat, sweeping users of dead nodes beside it (in batches, never in the way of the
//! refresh), and announcing each transition once to everyone who should hear it (watchers,
//! small rooms, recent direct peers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_core::backend::BackendError;
use chat_core::presence::PresenceStore;
use chat_core::protocol::{PresenceStatus, ServerFrame};
use chat_core::pubsub::{Envelope, PubSub, Publication, Topic};
use chat_core::store::{Audience, Store};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::hub::Hub;
use crate::lookups::Batcher;
use crate::metrics::Metrics;

/// Users swept per call.
const SWEEP_BATCH: usize = 1000;
/// Offline announcements of swept users sent at once (each reads its audience from Postgres).
const ANNOUNCE_CONCURRENCY: usize = 8;
/// Direct conversations whose peers hear of a transition (the most recently active).
pub const MAX_DIRECT_PEERS: i64 = 1000;

/// The node's presence.
pub struct Presence {
    presence: Arc<dyn PresenceStore>,
    pubsub: Arc<dyn PubSub>,
    store: Store,
    /// Who hears of a transition, shared with concurrent transitions.
    audiences: Batcher<Uuid, Audience>,
    /// Records `last_seen` when a user goes offline, shared likewise.
    last_seen: Batcher<Uuid, ()>,
    hub: Arc<Hub>,
    metrics: Metrics,
}

impl Presence {
    pub fn new(
        presence: Arc<dyn PresenceStore>,
        pubsub: Arc<dyn PubSub>,
        store: Store,
        audiences: Batcher<Uuid, Audience>,
        last_seen: Batcher<Uuid, ()>,
        hub: Arc<Hub>,
        metrics: Metrics,
    ) -> Self {
        Presence {
            presence,
            pubsub,
            store,
            audiences,
            last_seen,
            hub,
            metrics,
        }
    }

    /// Records that `user` has a connection here; true when they just came online (the caller
    /// announces it, beside the connection: a reconnect storm must not hold up frames).
    pub async fn join(&self, user: Uuid) -> Result<bool, BackendError> {
        self.presence.join(user).await
    }

    /// Records that `user`'s last connection here closed; announces them when they just went
    /// offline.
    pub async fn leave(&self, user: Uuid) -> Result<(), BackendError> {
        if self.presence.leave(user).await? {
            self.announce(user, PresenceStatus::Offline).await;
        }
        Ok(())
    }

    /// Whether each of `users` is online.
    pub async fn online(&self, users: &[Uuid]) -> Result<Vec<bool>, BackendError> {
        self.presence.online(users).await
    }

    /// Refreshes this node's users, and sweeps the expired users of dead nodes, every `period`
    /// until `shutdown`: two loops side by side, so a long sweep (a node with 20,000 users
    /// died) never delays the refresh that keeps this node's own users online.
    pub async fn run_heartbeats(self: Arc<Self>, period: Duration, shutdown: CancellationToken) {
        tokio::join!(
            self.every(period, &shutdown, Self::beat),
            self.every(period, &shutdown, Self::sweep),
        );
    }

    /// Runs `work` every `period` until `shutdown` (a late round delays the next, never
    /// doubles it).
    async fn every<'a, F, Fut>(&'a self, period: Duration, shutdown: &CancellationToken, work: F)
    where
        F: Fn(&'a Self) -> Fut,
        Fut: std::future::Future<Output = ()> + 'a,
    {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => work(self).await,
            }
        }
    }

    /// One heartbeat: refresh every local user, announce the revived.
    async fn beat(&self) {
        let started = Instant::now();
        match self.presence.refresh(&self.hub.local_users()).await {
            Ok(revived) => {
                for user in revived {
                    self.announce(user, PresenceStatus::Online).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "presence refresh failed"),
        }
        self.metrics
            .presence_heartbeat_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// One sweep: every expired user of any node, a batch at a time; their `last_seen` in one
    /// statement per batch and their offline announcements a few at a time.
    async fn sweep(&self) {
        let started = Instant::now();
        loop {
            let gone = match self.presence.sweep(SWEEP_BATCH).await {
                Ok(gone) => gone,
                Err(e) => {
                    tracing::warn!(error = %e, "presence sweep failed");
                    break;
                }
            };
            if !gone.is_empty() {
                if let Err(e) = self.store.touch_last_seen_many(&gone).await {
                    tracing::warn!(error = %e, "last_seen not recorded for swept users");
                }
                futures_util::stream::iter(gone.iter().copied())
                    .for_each_concurrent(ANNOUNCE_CONCURRENCY, |user| {
                        self.publish_transition(user, PresenceStatus::Offline)
                    })
                    .await;
            }
            if gone.len() < SWEEP_BATCH {
                break;
            }
        }
        self.metrics
            .presence_sweep_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Tells everyone who should know that `user` changed status: watchers (the user's presence
    /// topic), members of the user's small rooms, and the peers of their most recent direct
    /// conversations. Going offline also records `last_seen`.
    pub async fn announce(&self, user: Uuid, status: PresenceStatus) {
        if status == PresenceStatus::Offline {
            if let Err(e) = self.last_seen.get(user).await {
                tracing::warn!(error = %e, "last_seen not recorded");
            }
        }
        self.publish_transition(user, status).await
    }

    /// Publishes a transition to its audience (`last_seen` already recorded).
    async fn publish_transition(&self, user: Uuid, status: PresenceStatus) {
        let label = match status {
            PresenceStatus::Online => "online",
            PresenceStatus::Offline => "offline",
        };
        self.metrics
            .presence_transitions
            .with_label_values(&[label])
            .inc();
        let mut topics = vec![Topic::Presence(user)];
        match self.audiences.get(user).await {
            Ok(audience) => {
                let Audience { rooms, peers } = audience.unwrap_or_default();
                topics.extend(rooms.into_iter().map(Topic::Room));
                topics.extend(peers.into_iter().map(Topic::User));
            }
            Err(e) => tracing::warn!(error = %e, "presence audience unavailable; watchers only"),
        }
        let envelope = Envelope::event(
            Uuid::nil(),
            ServerFrame::Presence {
                user_id: user,
                status,
                ts: chat_core::now_ms(),
            },
        );
        if let Err(e) = self
            .pubsub
            .publish(vec![Publication { topics, envelope }])
            .await
        {
            tracing::warn!(error = %e, "presence change not published");
        }
    }
}
