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

impl Sink {
    pub fn new(pool: deadpool_postgres::Pool) -> Self {
        Sink { pool }
    }

    /// Inserts the messages and their direct conversations; returns rows newly inserted.
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
        let mut conversations: Vec<Uuid> = batch.iter().map(|m| m.conversation_id).collect();
        conversations.sort_unstable();
        conversations.dedup();
        let mut members: Vec<(Uuid, Uuid)> = batch
            .iter()
            .flat_map(|m| [(m.conversation_id, m.from), (m.conversation_id, m.to)])
            .collect();
        members.sort_unstable();
        members.dedup();
        let (member_convs, member_users): (Vec<Uuid>, Vec<Uuid>) = members.into_iter().unzip();

        let ids: Vec<Uuid> = batch.iter().map(|m| m.msg_id).collect();
        let convs: Vec<Uuid> = batch.iter().map(|m| m.conversation_id).collect();
        let seqs: Vec<i64> = batch.iter().map(|m| m.seq).collect();
        let senders: Vec<Uuid> = batch.iter().map(|m| m.from).collect();
        let recipients: Vec<Uuid> = batch.iter().map(|m| m.to).collect();
        let bodies: Vec<&str> = batch.iter().map(|m| m.body.as_str()).collect();
        let ts: Vec<i64> = batch.iter().map(|m| m.ts).collect();

        // Prepared once per pooled connection: a batch costs three executes, no parsing.
        let tx = client.transaction().await?;
        let insert_conversations = tx.prepare_cached(INSERT_CONVERSATIONS).await?;
        let insert_members = tx.prepare_cached(INSERT_MEMBERS).await?;
        let insert_messages = tx.prepare_cached(INSERT_MESSAGES).await?;
        tx.execute(&insert_conversations, &[&conversations]).await?;
        tx.execute(&insert_members, &[&member_convs, &member_users])
            .await?;
        let inserted = tx
            .execute(
                &insert_messages,
                &[&ids, &convs, &seqs, &senders, &recipients, &bodies, &ts],
            )
            .await?;
        tx.commit().await?;
        Ok(inserted)
    }
}
