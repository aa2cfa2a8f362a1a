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
/// Skipped ranges (seqs a re-base passed over) one sync steps over before it answers.
const MAX_SKIPS: usize = 2;

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
        // One page, and another after each skipped range the page ends in (a few at most).
        let mut reached = after;
        let mut failed = false;
        for _ in 0..=MAX_SKIPS {
            let hi = upper.min(reached.saturating_add(SYNC_PAGE));
            let range = match history.read_range(conversation, reached + 1, hi).await {
                Ok(range) => range,
                Err(e) => {
                    reply_history_error(peer, out, e).await?;
                    failed = true;
                    break;
                }
            };
            for message in &range.messages {
                let text = serde_json::to_string(message).unwrap_or_default();
                out.text(text.into()).await?;
                metrics.frames_out_message.inc();
            }
            reached = range.covered.1.min(upper).max(hi);
            if reached >= upper || reached == hi {
                break;
            }
        }
        if failed {
            continue;
        }
        let complete = reached >= upper;
        let last_seq = if complete { upper.max(after) } else { reached };
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
