//! Messages: a seq range of one conversation (history and sync), and the batch insert the
//! persistence sink commits, idempotent on the message id.

use std::collections::BTreeMap;

use chat_protocol::MessageFrame;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::message::StoredMessage;

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

impl Store {
    /// The stored messages of `conversation` with `lo <= seq <= hi`, ascending.
    pub async fn messages_in_range(
        &self,
        conversation: Uuid,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<MessageFrame>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, seq, sender_id, recipient_id, body,
                        round(extract(epoch FROM sent_at) * 1000)::int8
                 FROM messages
                 WHERE conversation_id = $1 AND seq BETWEEN $2 AND $3
                 ORDER BY seq",
                &[&conversation, &lo, &hi],
            )
            .await?;
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

    /// Inserts a batch of messages in one transaction (and the direct conversations they start),
    /// moves each conversation's last seq and activity and each sender's read position; returns
    /// the rows newly inserted. A message already stored (same `msg_id`) is skipped, so a batch
    /// delivered twice stores each message once. Rooms are created by the room API, never here.
    pub async fn insert_messages(&self, batch: &[StoredMessage]) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        // Sorted: concurrent writers take row locks in the same order (no deadlocks).
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

        // The highest seq (and its ts) per conversation, and per (conversation, sender).
        let mut activity: BTreeMap<Uuid, (i64, i64)> = BTreeMap::new();
        let mut sender_read: BTreeMap<(Uuid, Uuid), i64> = BTreeMap::new();
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

        let mut client = self.client().await?;
        // Prepared once per pooled connection: a batch costs five executes, no parsing.
        let tx = client.transaction().await?;
        super::conversations::insert_direct(&tx, &direct, &members).await?;
        let insert_messages = tx.prepare_cached(INSERT_MESSAGES).await?;
        let update_activity = tx.prepare_cached(UPDATE_ACTIVITY).await?;
        let update_sender_read = tx.prepare_cached(UPDATE_SENDER_READ).await?;
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
