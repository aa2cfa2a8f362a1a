//! `read`: moves the reader's read position forward (never back) and, when it moved, relays a
//! `read` receipt to the conversation's members and the reader's other connections.

use chat_core::protocol::{ErrorCode, ServerFrame};
use chat_core::pubsub::{Envelope, PubSub, Publication};
use chat_core::store::{Membership, Store};
use uuid::Uuid;

use super::{membership, Peer, Refusal};
use crate::directory::{self, Directory};
use crate::history::History;

pub async fn handle(
    peer: Peer,
    conversation: Uuid,
    seq: i64,
    directory: &Directory,
    history: &History,
    store: &Store,
    pubsub: &dyn PubSub,
) -> Result<(), Refusal> {
    if seq < 1 {
        return Err((ErrorCode::BadRequest, "seq must be at least 1".into()));
    }
    let membership = membership(directory, peer, conversation).await?;
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, conn_id = %peer.conn_id, "read receipt failed");
        (
            ErrorCode::Unavailable,
            "cannot store the read position now; retry".to_string(),
        )
    };
    let last = history
        .last_seq(conversation)
        .await
        .map_err(|e| unavailable(&e))?;
    if seq > last {
        return Err((
            ErrorCode::BadRequest,
            format!("seq {seq} is beyond the conversation's last message ({last})"),
        ));
    }
    let direct_peer = match membership {
        Membership::Direct { peer } => Some(peer),
        Membership::Room => None,
    };
    let moved = store
        .mark_read(conversation, peer.user_id, seq, direct_peer)
        .await
        .map_err(|e| unavailable(&e))?;
    if !moved {
        return Ok(());
    }
    let receipt = Publication {
        topics: directory::topics(peer.user_id, conversation, membership),
        envelope: Envelope::event(
            peer.conn_id,
            ServerFrame::Read {
                conversation_id: conversation,
                user_id: peer.user_id,
                seq,
            },
        ),
    };
    pubsub
        .publish(vec![receipt])
        .await
        .map_err(|e| unavailable(&e))
}
