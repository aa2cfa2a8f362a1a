//! `sync`: sends the messages after `after_seq` of each conversation named that this connection
//! has not had (live delivery covers the rest), then `synced` per conversation. At most
//! [`SYNC_PAGE`] messages per conversation per request.

use chat_core::protocol::{ErrorCode, ServerFrame, SyncPoint};
use uuid::Uuid;

use super::{membership, reply_error, Peer};
use crate::directory::Directory;
use crate::history::{History, HistoryError};
use crate::metrics::Metrics;
use crate::ws::ledger::SyncLedger;
use crate::ws::outbox::{Outbox, WriteError};

/// Most messages one `sync` sends per conversation; `synced.complete` is false beyond it.
pub const SYNC_PAGE: i64 = 500;

pub async fn handle(
    peer: Peer,
    points: Vec<SyncPoint>,
    ledger: &mut SyncLedger,
    directory: &Directory,
    history: &History,
    metrics: &Metrics,
    out: &mut Outbox,
) -> Result<(), WriteError> {
    for point in points {
        let conversation = point.conversation_id;
        let after = point.after_seq;
        if after < 0 {
            reply_error(out, ErrorCode::BadRequest, "after_seq must be at least 0").await?;
            continue;
        }
        if let Err((code, message)) = membership(directory, peer, conversation).await {
            reply_error(out, code, message).await?;
            continue;
        }
        // From the first live message on, live delivery covers the conversation.
        let upper = match ledger.sync_ceiling(conversation) {
            Some(ceiling) => ceiling,
            None => match history.last_seq(conversation).await {
                Ok(last) => last,
                Err(e) => {
                    reply_history_error(peer, out, e).await?;
                    continue;
                }
            },
        };
        let hi = upper.min(after.saturating_add(SYNC_PAGE));
        let messages = match history.read_range(conversation, after + 1, hi).await {
            Ok(m) => m,
            Err(e) => {
                reply_history_error(peer, out, e).await?;
                continue;
            }
        };
        for message in &messages {
            let text = serde_json::to_string(message).unwrap_or_default();
            out.text(text.into()).await?;
            metrics.frames_out_message.inc();
        }
        let complete = hi >= upper;
        let last_seq = if complete { upper.max(after) } else { hi };
        ledger.synced(conversation, last_seq);
        out.frame(&synced(conversation, last_seq, complete)).await?;
    }
    Ok(())
}

fn synced(conversation_id: Uuid, last_seq: i64, complete: bool) -> ServerFrame {
    ServerFrame::Synced {
        conversation_id,
        last_seq,
        complete,
    }
}

async fn reply_history_error(
    peer: Peer,
    out: &mut Outbox,
    e: HistoryError,
) -> Result<(), WriteError> {
    tracing::warn!(error = %e, conn_id = %peer.conn_id, "sync read failed");
    let message = match e {
        HistoryError::CatchingUp => "history is catching up; sync again shortly",
        HistoryError::Postgres(_) => "history is unavailable; sync again later",
    };
    reply_error(out, ErrorCode::Unavailable, message).await
}
