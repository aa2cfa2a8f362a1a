//! `typing`: relayed to the conversation's other members, at most once per conversation per
//! second from one connection (more are dropped without an error).

use chat_core::protocol::{ErrorCode, ServerFrame};
use chat_core::pubsub::{Envelope, PubSub, Publication};
use uuid::Uuid;

use super::{membership, Peer, Refusal};
use crate::directory::{self, Directory};
use crate::ws::ledger::TypingThrottle;

pub async fn handle(
    peer: Peer,
    conversation: Uuid,
    throttle: &mut TypingThrottle,
    directory: &Directory,
    pubsub: &dyn PubSub,
) -> Result<(), Refusal> {
    let membership = membership(directory, peer, conversation).await?;
    if !throttle.allow(conversation) {
        return Ok(());
    }
    let typing = Publication {
        topics: directory::topics(peer.user_id, conversation, membership),
        envelope: Envelope::event(
            peer.conn_id,
            ServerFrame::Typing {
                conversation_id: conversation,
                user_id: peer.user_id,
            },
        ),
    };
    pubsub.publish(vec![typing]).await.map_err(|e| {
        tracing::warn!(error = %e, conn_id = %peer.conn_id, "typing relay failed");
        (ErrorCode::Unavailable, "typing not relayed".to_string())
    })
}
