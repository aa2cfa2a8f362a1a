//! `presence.watch` and `presence.unwatch`: a connection follows the presence of users it shares
//! no conversation with (or, with `presence_visibility` = `contacts`, shares one only through a
//! room too big for presence fan-out). A watch answers each user's current status, then
//! delivers changes. Users the watcher may not see are skipped, without a word (as unknown ids
//! are).

use chat_core::protocol::{ErrorCode, PresenceStatus, ServerFrame};
use chat_core::pubsub::{PubSub, Topic};
use uuid::Uuid;

use super::{reply_error, Peer};
use crate::directory::Directory;
use crate::hub::Hub;
use crate::presence::Presence;
use crate::ws::ledger::PresenceSeen;
use crate::ws::outbox::{Outbox, WriteError};

/// Starts watching users, then answers their current status, one `presence` frame each (unless
/// this connection has that status already).
#[allow(clippy::too_many_arguments)]
pub async fn watch(
    peer: Peer,
    user_ids: Vec<Uuid>,
    max_watched: usize,
    seen: &mut PresenceSeen,
    directory: &Directory,
    hub: &Hub,
    pubsub: &dyn PubSub,
    presence: &Presence,
    out: &mut Outbox,
) -> Result<(), WriteError> {
    let visible = match directory.visible_to(peer.user_id, &user_ids).await {
        Ok(visible) => visible,
        Err(e) => {
            tracing::warn!(error = %e, conn_id = %peer.conn_id, "visibility check failed");
            return reply_error(out, ErrorCode::Unavailable, "cannot watch now; retry").await;
        }
    };
    let user_ids: Vec<Uuid> = user_ids
        .into_iter()
        .filter(|u| visible.contains(u))
        .collect();
    let Some(new) = hub.watch(peer.user_id, peer.conn_id, &user_ids, max_watched) else {
        let message = format!("a connection may watch at most {max_watched} users");
        return reply_error(out, ErrorCode::BadRequest, message).await;
    };
    if !new.is_empty() {
        let topics = new.into_iter().map(Topic::Presence).collect();
        if let Err(e) = pubsub.subscribe(topics).await {
            tracing::warn!(error = %e, conn_id = %peer.conn_id, "watch subscription failed");
            return reply_error(out, ErrorCode::Unavailable, "cannot watch now; retry").await;
        }
    }
    let online = match presence.online(&user_ids).await {
        Ok(online) => online,
        Err(e) => {
            tracing::warn!(error = %e, conn_id = %peer.conn_id, "presence read failed");
            return reply_error(out, ErrorCode::Unavailable, "cannot read presence now").await;
        }
    };
    let ts = chat_core::now_ms();
    for (user_id, online) in user_ids.into_iter().zip(online) {
        let status = if online {
            PresenceStatus::Online
        } else {
            PresenceStatus::Offline
        };
        if seen.changed(user_id, status) {
            out.frame(&ServerFrame::Presence {
                user_id,
                status,
                ts,
            })
            .await?;
        }
    }
    Ok(())
}

/// Stops watching users; releases the topics nobody here watches any more.
pub fn unwatch(peer: Peer, user_ids: &[Uuid], hub: &Hub, pubsub: &dyn PubSub) {
    pubsub.release(hub.unwatch(peer.conn_id, user_ids));
}
