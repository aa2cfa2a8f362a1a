//! The node's [`Subscriber`]: every envelope the backend receives is pushed in here, routed by
//! its type to the hub's local connections, and a membership event first updates the hub's
//! room index and the subscriptions it needs. After a pub/sub loss it tells every local
//! connection to resync, re-checks its users' tokens (a revocation may have been missed) and
//! reloads room memberships from Postgres.

use std::sync::Arc;

use async_trait::async_trait;
use chat_core::protocol::{MembershipChange, ServerFrame};
use chat_core::pubsub::{Envelope, Interest, Subscriber, Topic};
use chat_core::store::Store;
use uuid::Uuid;

use crate::hub::{Hub, Outbound};

/// Users whose rooms one Postgres query reloads.
const RELOAD_BATCH: usize = 1000;

/// Routes envelopes into the hub.
pub struct Delivery {
    hub: Arc<Hub>,
    store: Store,
}

impl Delivery {
    pub fn new(hub: Arc<Hub>, store: Store) -> Self {
        Delivery { hub, store }
    }

    /// Hands every local user whose password ever changed a revocation at their current token
    /// floor, as if its publish had arrived: connections holding older tokens close with 4101.
    /// Returns how many users were re-checked.
    async fn recheck_tokens(&self) -> Result<usize, chat_core::store::StoreError> {
        let mut checked = 0;
        for users in self.hub.local_users().chunks(RELOAD_BATCH) {
            checked += users.len();
            for (user, floor) in self.store.changed_token_floors(users).await? {
                let revoked = Outbound::Envelope(crate::authn::revocation(floor));
                self.hub
                    .deliver(Topic::User(user), Uuid::nil(), None, &Arc::new(revoked));
            }
        }
        Ok(checked)
    }

    /// Reloads every local user's rooms from Postgres into the hub; returns the room topics to
    /// subscribe and to release.
    pub async fn reload_rooms(&self) -> Result<Interest, chat_core::store::StoreError> {
        let mut interest = Interest::default();
        for users in self.hub.local_users().chunks(RELOAD_BATCH) {
            for (user, rooms) in self.store.rooms_of_users(users).await? {
                let (joined, left) = self.hub.set_rooms(user, &rooms);
                interest
                    .subscribe
                    .extend(joined.into_iter().map(Topic::Room));
                interest.release.extend(left.into_iter().map(Topic::Room));
            }
        }
        Ok(interest)
    }
}

#[async_trait]
impl Subscriber for Delivery {
    fn deliver(&self, topic: Topic, envelope: Envelope) -> Interest {
        let mut interest = Interest::default();
        let (origin, skip_user) = match &envelope {
            Envelope::Message(m) => (m.origin, None),
            Envelope::Revoked { .. } => (Uuid::nil(), None),
            Envelope::Event { origin, frame, .. } => match frame {
                ServerFrame::Membership {
                    conversation_id,
                    user_id,
                    change,
                    ..
                } => match topic {
                    // On the affected user's own topic: the room index follows before anything
                    // else of that room is read.
                    Topic::User(_) => {
                        match change {
                            MembershipChange::Added => {
                                if !self.hub.join(*user_id, &[*conversation_id]).is_empty() {
                                    interest.subscribe.push(Topic::Room(*conversation_id));
                                }
                            }
                            MembershipChange::Removed => {
                                if self.hub.leave(*user_id, *conversation_id) {
                                    interest.release.push(Topic::Room(*conversation_id));
                                }
                            }
                            MembershipChange::Role => {}
                        }
                        (*origin, None)
                    }
                    // The affected user gets the event on their own topic.
                    Topic::Room(_) | Topic::Presence(_) => (*origin, Some(*user_id)),
                },
                // A user's presence change reaches their rooms, not themselves.
                ServerFrame::Presence { user_id, .. } => (*origin, Some(*user_id)),
                _ => (*origin, None),
            },
        };
        // A traced message gets a delivery span on every node that hands it to local sockets.
        let span = match &envelope {
            Envelope::Message(m) if chat_core::telemetry::exporting() => {
                m.trace_parent.as_deref().map(|tp| {
                    let span =
                        tracing::info_span!("chat.deliver", connections = tracing::field::Empty);
                    chat_core::telemetry::continue_trace(&span, tp);
                    span
                })
            }
            _ => None,
        };
        let queued = {
            let _entered = span.as_ref().map(|s| s.enter());
            self.hub.deliver(
                topic,
                origin,
                skip_user,
                &Arc::new(Outbound::Envelope(envelope)),
            )
        };
        if let Some(span) = span {
            span.record("connections", queued);
        }
        interest
    }

    fn wants(&self, topic: Topic) -> bool {
        self.hub.has_local(topic)
    }

    fn topics(&self) -> Vec<Topic> {
        self.hub.topics()
    }

    async fn missed(&self) -> Interest {
        let told = self.hub.broadcast(&Arc::new(Outbound::Resync));
        tracing::warn!(connections = told, "connections told to resync");
        match self.recheck_tokens().await {
            Ok(users) => tracing::info!(users, "tokens re-checked after pub/sub loss"),
            Err(e) => {
                tracing::warn!(error = %e, "tokens not re-checked after pub/sub loss; a revoked session may stay open until it reconnects")
            }
        }
        // Membership events may have been missed too: rebuild the room index.
        match self.reload_rooms().await {
            Ok(interest) => {
                tracing::info!(
                    joined = interest.subscribe.len(),
                    left = interest.release.len(),
                    "room memberships reloaded after pub/sub loss"
                );
                interest
            }
            Err(e) => {
                tracing::warn!(error = %e, "room memberships not reloaded; they update at the next event or reconnect");
                Interest::default()
            }
        }
    }
}
