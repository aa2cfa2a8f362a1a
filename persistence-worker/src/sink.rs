//! Writes batches of messages into Postgres in one transaction, idempotently: a redelivered
//! entry (same `msg_id`) never makes a second row.

use chat_core::stream::StoredMessage;
use uuid::Uuid;

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Postgres is unreachable or failed transiently: retry the same batch later.
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// Postgres refused the data (an integrity violation): retrying will not help.
    #[error("postgres rejected the batch: {0}")]
    Rejected(String),
}

impl From<tokio_postgres::Error> for SinkError {
    fn from(e: tokio_postgres::Error) -> Self {
        let text = chat_core::db::describe(&e);
        match e.code() {
            // 22: data exception (e.g. invalid byte sequence), 23: integrity violation.
            Some(code) if code.code().starts_with("23") || code.code().starts_with("22") => {
                SinkError::Rejected(text)
            }
            _ => SinkError::Unavailable(text),
        }
    }
}

#[derive(Clone)]
pub struct Sink {
    pool: deadpool_postgres::Pool,
}

const INSERT_CONVERSATIONS: &str = "INSERT INTO conversations (id, kind)
     SELECT id, 'direct' FROM unnest($1::uuid[]) AS t(id)
     ON CONFLICT (id) DO NOTHING";

const INSERT_MEMBERS: &str = "INSERT INTO conversation_members (conversation_id, user_id)
     SELECT c, u FROM unnest($1::uuid[], $2::uuid[]) AS t(c, u)
     ON CONFLICT DO NOTHING";

const INSERT_MESSAGES: &str =
    "INSERT INTO messages (id, conversation_id, seq, sender_id, recipient_id, body, sent_at)
     SELECT id, c, s, f, r, b, to_timestamp(ts / 1000.0)
     FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::uuid[], $5::uuid[], $6::text[], $7::int8[])
          AS t(id, c, s, f, r, b, ts)
     ON CONFLICT (id) DO NOTHING";

/// Keeps each conversation's last seq and activity time for the conversation list. `GREATEST`,
/// because batches of one conversation can commit out of order (claims, retries).
const UPDATE_ACTIVITY: &str = "UPDATE conversations c
     SET last_seq = GREATEST(c.last_seq, t.s),
         last_activity_at = GREATEST(c.last_activity_at, to_timestamp(t.ts / 1000.0))
     FROM unnest($1::uuid[], $2::int8[], $3::int8[]) AS t(id, s, ts)
     WHERE c.id = t.id";

/// A sender has read their conversation up to their own message.
const UPDATE_SENDER_READ: &str = "UPDATE conversation_members m
     SET last_read_seq = GREATEST(m.last_read_seq, t.s)
     FROM unnest($1::uuid[], $2::uuid[], $3::int8[]) AS t(c, u, s)
     WHERE m.conversation_id = t.c AND m.user_id = t.u";

impl Sink {
    pub fn new(pool: deadpool_postgres::Pool) -> Self {
        Sink { pool }
    }

    /// Inserts the messages (and the direct conversations they start), moves each conversation's
    /// last seq and activity and each sender's read position; returns rows newly inserted.
    /// Rooms are created by the gateway's API, never here.
    pub async fn write(&self, batch: &[StoredMessage]) -> Result<u64, SinkError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| SinkError::Unavailable(chat_core::db::describe_pool(&e)))?;
        // Sorted, so concurrent workers take row locks in the same order (no deadlocks).
        let mut direct: Vec<Uuid> = batch
            .iter()
            .filter(|m| m.to.is_some())
            .map(|m| m.conversation_id)
            .collect();
        direct.sort_unstable();
        direct.dedup();
        let mut members: Vec<(Uuid, Uuid)> = batch
            .iter()
            .filter_map(|m| {
                m.to.map(|to| [(m.conversation_id, m.from), (m.conversation_id, to)])
            })
            .flatten()
            .collect();
        members.sort_unstable();
        members.dedup();
        let (member_convs, member_users): (Vec<Uuid>, Vec<Uuid>) = members.into_iter().unzip();

        // The highest seq (and its ts) per conversation, and per (conversation, sender).
        let mut activity: std::collections::BTreeMap<Uuid, (i64, i64)> = Default::default();
        let mut sender_read: std::collections::BTreeMap<(Uuid, Uuid), i64> = Default::default();
        for m in batch {
            let top = activity.entry(m.conversation_id).or_insert((m.seq, m.ts));
            if m.seq > top.0 {
                *top = (m.seq, m.ts);
            }
            let read = sender_read
                .entry((m.conversation_id, m.from))
                .or_insert(m.seq);
            *read = (*read).max(m.seq);
        }
        let activity_convs: Vec<Uuid> = activity.keys().copied().collect();
        let activity_seqs: Vec<i64> = activity.values().map(|v| v.0).collect();
        let activity_ts: Vec<i64> = activity.values().map(|v| v.1).collect();
        let read_convs: Vec<Uuid> = sender_read.keys().map(|k| k.0).collect();
        let read_users: Vec<Uuid> = sender_read.keys().map(|k| k.1).collect();
        let read_seqs: Vec<i64> = sender_read.values().copied().collect();

        let ids: Vec<Uuid> = batch.iter().map(|m| m.msg_id).collect();
        let convs: Vec<Uuid> = batch.iter().map(|m| m.conversation_id).collect();
        let seqs: Vec<i64> = batch.iter().map(|m| m.seq).collect();
        let senders: Vec<Uuid> = batch.iter().map(|m| m.from).collect();
        let recipients: Vec<Option<Uuid>> = batch.iter().map(|m| m.to).collect();
        let bodies: Vec<&str> = batch.iter().map(|m| m.body.as_str()).collect();
        let ts: Vec<i64> = batch.iter().map(|m| m.ts).collect();

        // Prepared once per pooled connection: a batch costs five executes, no parsing.
        let tx = client.transaction().await?;
        let insert_conversations = tx.prepare_cached(INSERT_CONVERSATIONS).await?;
        let insert_members = tx.prepare_cached(INSERT_MEMBERS).await?;
        let insert_messages = tx.prepare_cached(INSERT_MESSAGES).await?;
        let update_activity = tx.prepare_cached(UPDATE_ACTIVITY).await?;
        let update_sender_read = tx.prepare_cached(UPDATE_SENDER_READ).await?;
        if !direct.is_empty() {
            tx.execute(&insert_conversations, &[&direct]).await?;
            tx.execute(&insert_members, &[&member_convs, &member_users])
                .await?;
        }
        let inserted = tx
            .execute(
                &insert_messages,
                &[&ids, &convs, &seqs, &senders, &recipients, &bodies, &ts],
            )
            .await?;
        tx.execute(
            &update_activity,
            &[&activity_convs, &activity_seqs, &activity_ts],
        )
        .await?;
        tx.execute(&update_sender_read, &[&read_convs, &read_users, &read_seqs])
            .await?;
        tx.commit().await?;
        Ok(inserted)
    }
}
