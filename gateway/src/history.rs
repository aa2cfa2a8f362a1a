//! Message history: any seq range of one conversation, merged from the conversation's Redis tail
//! (recent messages, possibly not yet in Postgres) and Postgres (everything the worker wrote), so
//! an acked message is readable at once on every node.
//!
//! Seqs are gap-free from 1 to the conversation's counter, so the seqs a request wants are known
//! before reading: the tail answers them when it holds them all, Postgres fills in the rest, and
//! a seq that neither has is reported rather than skipped while the worker may still write it.

use std::collections::BTreeMap;

use chat_core::protocol::MessageFrame;
use redis::streams::StreamRangeReply;
use uuid::Uuid;

use crate::node::Node;

/// Why a range could not be read completely.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("postgres: {0}")]
    Postgres(String),
    /// A wanted message is neither in the tail nor (yet) in Postgres: the worker is behind by
    /// more than the tail holds, or Redis is unreachable while it is behind. Retry.
    #[error("history is catching up")]
    CatchingUp,
}

/// The conversation's last seq: the Redis counter, or Postgres's record when Redis cannot
/// answer. 0 for a conversation without messages.
pub async fn last_seq(node: &Node, conversation: Uuid) -> Result<i64, HistoryError> {
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(node.broker.keys().seq(conversation));
    match node.broker.query::<(Option<i64>,)>(&pipe).await {
        Ok((seq,)) => Ok(seq.unwrap_or(0)),
        Err(e) => {
            tracing::warn!(error = %e, "seq counter unreadable; using postgres");
            postgres_last_seq(node, conversation).await
        }
    }
}

async fn postgres_last_seq(node: &Node, conversation: Uuid) -> Result<i64, HistoryError> {
    let client = node
        .db
        .get()
        .await
        .map_err(|e| HistoryError::Postgres(chat_core::db::describe_pool(&e)))?;
    let row = client
        .query_opt(
            "SELECT last_seq FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .await
        .map_err(|e| HistoryError::Postgres(chat_core::db::describe(&e)))?;
    Ok(row.map(|r| r.get::<_, i64>(0)).unwrap_or(0))
}

/// The messages with `lo <= seq <= hi`, ascending. Call with a bounded range (it is read whole).
pub async fn read_range(
    node: &Node,
    conversation: Uuid,
    lo: i64,
    hi: i64,
) -> Result<Vec<MessageFrame>, HistoryError> {
    let lo = lo.max(1);
    if lo > hi {
        return Ok(Vec::new());
    }
    let wanted = usize::try_from(hi - lo + 1).unwrap_or(usize::MAX);
    let mut found = read_tail(node, conversation, lo, hi).await;
    if found.len() < wanted {
        for m in read_postgres(node, conversation, lo, hi).await? {
            found.entry(m.seq).or_insert(m);
        }
    }
    if found.len() < wanted {
        let missing_above = (lo..=hi)
            .filter(|s| !found.contains_key(s))
            .max()
            .unwrap_or(0);
        // A hole at or below what Postgres has recorded will never fill (a dead-lettered entry,
        // or Redis data loss); a hole above it may still be written by the worker.
        if missing_above > postgres_last_seq(node, conversation).await? {
            node.metrics.history_incomplete.inc();
            return Err(HistoryError::CatchingUp);
        }
        tracing::warn!(%conversation, "history has a permanent hole; skipping it");
    }
    Ok(found.into_values().collect())
}

/// What the tail holds of the range; empty when Redis cannot answer (Postgres is asked then).
async fn read_tail(
    node: &Node,
    conversation: Uuid,
    lo: i64,
    hi: i64,
) -> BTreeMap<i64, MessageFrame> {
    let mut pipe = redis::pipe();
    pipe.cmd("XRANGE")
        .arg(node.broker.keys().tail(conversation))
        .arg(format!("{lo}-0"))
        .arg(format!("{hi}-0"));
    let reply = match node.broker.query::<(StreamRangeReply,)>(&pipe).await {
        Ok((reply,)) => reply,
        Err(e) => {
            tracing::warn!(error = %e, "history tail unreadable; using postgres");
            return BTreeMap::new();
        }
    };
    reply
        .ids
        .iter()
        .filter_map(|entry| match entry.map.get("f") {
            Some(redis::Value::BulkString(bytes)) => {
                serde_json::from_slice::<MessageFrame>(bytes).ok()
            }
            _ => None,
        })
        .map(|m| (m.seq, m))
        .collect()
}

async fn read_postgres(
    node: &Node,
    conversation: Uuid,
    lo: i64,
    hi: i64,
) -> Result<Vec<MessageFrame>, HistoryError> {
    let client = node
        .db
        .get()
        .await
        .map_err(|e| HistoryError::Postgres(chat_core::db::describe_pool(&e)))?;
    let rows = client
        .query(
            "SELECT id, seq, sender_id, recipient_id, body,
                    round(extract(epoch FROM sent_at) * 1000)::int8
             FROM messages
             WHERE conversation_id = $1 AND seq BETWEEN $2 AND $3
             ORDER BY seq",
            &[&conversation, &lo, &hi],
        )
        .await
        .map_err(|e| HistoryError::Postgres(chat_core::db::describe(&e)))?;
    Ok(rows
        .iter()
        .map(|r| MessageFrame {
            msg_id: r.get(0),
            conversation_id: conversation,
            seq: r.get(1),
            from: r.get(2),
            to: r.get(3),
            body: r.get(4),
            ts: r.get(5),
        })
        .collect())
}
