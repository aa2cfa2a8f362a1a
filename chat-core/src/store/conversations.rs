//! Conversations and their members: who may use a conversation, the conversation list, read
//! positions, the rooms of users, and the direct-conversation insert that the worker's batches
//! and a read receipt share, with the one lock order both take.

use std::collections::{HashMap, HashSet};

use chat_protocol::{MessageFrame, RoomRole};
use serde::Serialize;
use uuid::Uuid;

use super::{Store, StoreError};

/// What a conversation is to one of its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A direct conversation with `peer`.
    Direct { peer: Uuid },
    /// A room.
    Room,
}

/// A member of a conversation as lists show them: the other member of a direct conversation,
/// or a member of a room.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub id: Uuid,
    pub name: String,
    pub avatar_url: Option<String>,
    /// How far this member has read the conversation: messages up to it are "seen".
    pub last_read_seq: i64,
    /// The member's role in a room (none in a direct conversation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<RoomRole>,
}

/// One row of a user's conversation list.
#[derive(Debug, Clone)]
pub struct ConversationRow {
    pub id: Uuid,
    /// `direct` or `room`.
    pub kind: String,
    pub name: Option<String>,
    pub last_seq: i64,
    /// The caller's read position.
    pub last_read_seq: i64,
    /// Last activity, Unix microseconds (the list's cursor).
    pub activity_micros: i64,
    /// The other member of a direct conversation.
    pub peer: Option<Member>,
    /// The last message, when the worker has stored it.
    pub last_message: Option<MessageFrame>,
    /// Messages of other members after the read position, counted up to the cap asked for.
    pub unread: i64,
}

/// Who hears of a user's presence changes besides watchers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audience {
    /// The user's rooms small enough to hear of it.
    pub rooms: Vec<Uuid>,
    /// The other members of the user's most recently active direct conversations.
    pub peers: Vec<Uuid>,
}

/// Inserts direct conversations and their members unless they exist. Both binaries take these
/// rows in this order, conversations then members, each sorted, so that concurrent writers
/// (worker batches, read receipts) never deadlock: callers pass sorted, deduplicated slices.
/// A new conversation's activity starts at the epoch, not at the insert: its messages' times
/// move it (`GREATEST` in the batch insert), so a conversation the worker stores late, or in
/// one batch with later messages of other conversations, still sorts by when it was used.
pub(super) async fn insert_direct(
    tx: &deadpool_postgres::Transaction<'_>,
    conversations: &[Uuid],
    members: &[(Uuid, Uuid)],
) -> Result<(), StoreError> {
    debug_assert!(conversations.windows(2).all(|w| w[0] < w[1]));
    debug_assert!(members.windows(2).all(|w| w[0] < w[1]));
    if conversations.is_empty() {
        return Ok(());
    }
    let insert_conversations = tx
        .prepare_cached(
            "INSERT INTO conversations (id, kind, last_activity_at)
             SELECT id, 'direct', 'epoch' FROM unnest($1::uuid[]) AS t(id)
             ON CONFLICT (id) DO NOTHING",
        )
        .await?;
    let insert_members = tx
        .prepare_cached(
            "INSERT INTO conversation_members (conversation_id, user_id)
             SELECT c, u FROM unnest($1::uuid[], $2::uuid[]) AS t(c, u)
             ON CONFLICT DO NOTHING",
        )
        .await?;
    let (member_convs, member_users): (Vec<Uuid>, Vec<Uuid>) = members.iter().copied().unzip();
    tx.execute(&insert_conversations, &[&conversations]).await?;
    tx.execute(&insert_members, &[&member_convs, &member_users])
        .await?;
    Ok(())
}

impl Store {
    /// The caller's membership of `conversation`, or `None` when it does not exist or the
    /// caller is not a member.
    pub async fn membership(
        &self,
        user: Uuid,
        conversation: Uuid,
    ) -> Result<Option<Membership>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT c.kind,
                        (SELECT o.user_id FROM conversation_members o
                         WHERE o.conversation_id = c.id AND o.user_id <> $2 LIMIT 1)
                 FROM conversations c
                 JOIN conversation_members m ON m.conversation_id = c.id AND m.user_id = $2
                 WHERE c.id = $1",
                &[&conversation, &user],
            )
            .await?;
        Ok(row.and_then(|row| {
            let kind: String = row.get(0);
            match (kind.as_str(), row.get::<_, Option<Uuid>>(1)) {
                ("room", _) => Some(Membership::Room),
                ("direct", Some(peer)) => Some(Membership::Direct { peer }),
                _ => None,
            }
        }))
    }

    /// The last seq the worker recorded for `conversation`; 0 when it has none.
    pub async fn last_seq(&self, conversation: Uuid) -> Result<i64, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT last_seq FROM conversations WHERE id = $1",
                &[&conversation],
            )
            .await?;
        Ok(row.map(|r| r.get::<_, i64>(0)).unwrap_or(0))
    }

    /// A page of `user`'s conversations, most recent activity first, strictly before the cursor
    /// (activity in Unix microseconds, id).
    pub async fn conversation_page(
        &self,
        user: Uuid,
        cursor: (i64, Uuid),
        limit: i64,
        unread_cap: i64,
    ) -> Result<Vec<ConversationRow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT c.id, c.kind, c.name, c.last_seq, m.last_read_seq,
                        (extract(epoch FROM c.last_activity_at) * 1000000)::int8 AS activity,
                        p.user_id, pu.name,
                        lm.id, lm.sender_id, lm.recipient_id, lm.body,
                        round(extract(epoch FROM lm.sent_at) * 1000)::int8,
                        (SELECT count(*) FROM (
                            SELECT 1 FROM messages x
                            WHERE x.conversation_id = c.id AND x.seq > m.last_read_seq
                              AND x.sender_id <> $1
                            LIMIT $5) unread),
                        p.last_read_seq, pu.avatar_url
                 FROM conversation_members m
                 JOIN conversations c ON c.id = m.conversation_id
                 LEFT JOIN LATERAL (
                     SELECT o.user_id, o.last_read_seq FROM conversation_members o
                     WHERE c.kind = 'direct' AND o.conversation_id = c.id AND o.user_id <> $1
                     LIMIT 1) p ON true
                 LEFT JOIN users pu ON pu.id = p.user_id
                 LEFT JOIN messages lm ON lm.conversation_id = c.id AND lm.seq = c.last_seq
                 WHERE m.user_id = $1
                   AND (c.last_activity_at, c.id)
                       < (timestamptz 'epoch' + $2::int8 * interval '1 microsecond', $3)
                 ORDER BY c.last_activity_at DESC, c.id DESC
                 LIMIT $4",
                &[
                    &user,
                    &cursor.0.min(i64::MAX / 2),
                    &cursor.1,
                    &limit,
                    &unread_cap,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let id: Uuid = r.get(0);
                let last_seq: i64 = r.get(3);
                ConversationRow {
                    id,
                    kind: r.get(1),
                    name: r.get(2),
                    last_seq,
                    last_read_seq: r.get(4),
                    activity_micros: r.get(5),
                    peer: r.get::<_, Option<Uuid>>(6).map(|id| Member {
                        id,
                        name: r.get::<_, Option<String>>(7).unwrap_or_default(),
                        avatar_url: r.get(15),
                        last_read_seq: r.get::<_, Option<i64>>(14).unwrap_or(0),
                        role: None,
                    }),
                    last_message: r.get::<_, Option<Uuid>>(8).map(|msg_id| MessageFrame {
                        msg_id,
                        conversation_id: id,
                        seq: last_seq,
                        from: r.get(9),
                        to: r.get(10),
                        body: r.get(11),
                        ts: r.get(12),
                    }),
                    unread: r.get(13),
                }
            })
            .collect())
    }

    /// The rooms each of `users` is a member of, at most `limit` each (a user with none has
    /// no entry). Every handshake needs its user's; concurrent handshakes share this query
    /// (`gateway::lookups`), prepared once per pooled connection.
    pub async fn rooms_of_each(
        &self,
        users: &[Uuid],
        limit: i64,
    ) -> Result<HashMap<Uuid, Vec<Uuid>>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT u.id, r.conversation_id FROM unnest($1::uuid[]) AS u(id)
                 CROSS JOIN LATERAL (
                     SELECT m.conversation_id FROM conversation_members m
                     JOIN conversations c ON c.id = m.conversation_id
                     WHERE m.user_id = u.id AND c.kind = 'room' LIMIT $2
                 ) r",
            )
            .await?;
        let rows = client.query(&statement, &[&users, &limit]).await?;
        let mut rooms: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for row in rows {
            rooms.entry(row.get(0)).or_default().push(row.get(1));
        }
        Ok(rooms)
    }

    /// The rooms of each of `users` (every one of them is a key, with no rooms if none).
    pub async fn rooms_of_users(
        &self,
        users: &[Uuid],
    ) -> Result<HashMap<Uuid, HashSet<Uuid>>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT m.user_id, m.conversation_id FROM conversation_members m
                 JOIN conversations c ON c.id = m.conversation_id AND c.kind = 'room'
                 WHERE m.user_id = ANY($1)",
                &[&users],
            )
            .await?;
        let mut rooms: HashMap<Uuid, HashSet<Uuid>> =
            users.iter().map(|u| (*u, HashSet::new())).collect();
        for row in rows {
            rooms.entry(row.get(0)).or_default().insert(row.get(1));
        }
        Ok(rooms)
    }

    /// Who hears of each of `users`' presence changes besides watchers: their rooms of at most
    /// `max_room_members` members, and the other members of their `max_peers` most recently
    /// active direct conversations (a user with neither has no entry). Every connection that
    /// comes online or goes offline needs its user's; concurrent ones share this call
    /// (`gateway::lookups`): two statements for the whole batch, prepared once per pooled
    /// connection.
    pub async fn presence_audiences(
        &self,
        users: &[Uuid],
        max_room_members: usize,
        max_peers: i64,
    ) -> Result<HashMap<Uuid, Audience>, StoreError> {
        let client = self.client().await?;
        let rooms = client
            .prepare_cached(
                "SELECT m.user_id, m.conversation_id FROM conversation_members m
                 JOIN conversations c ON c.id = m.conversation_id
                 WHERE m.user_id = ANY($1) AND c.kind = 'room' AND c.member_count <= $2",
            )
            .await?;
        let peers = client
            .prepare_cached(
                "SELECT u.id, p.user_id FROM unnest($1::uuid[]) AS u(id)
                 CROSS JOIN LATERAL (
                     SELECT o.user_id FROM conversation_members m
                     JOIN conversations c ON c.id = m.conversation_id AND c.kind = 'direct'
                     JOIN conversation_members o ON o.conversation_id = m.conversation_id
                                                AND o.user_id <> m.user_id
                     WHERE m.user_id = u.id
                     ORDER BY c.last_activity_at DESC LIMIT $2
                 ) p",
            )
            .await?;
        let max_room_members = i32::try_from(max_room_members).unwrap_or(i32::MAX);
        let mut audiences: HashMap<Uuid, Audience> = HashMap::new();
        for row in client.query(&rooms, &[&users, &max_room_members]).await? {
            audiences
                .entry(row.get(0))
                .or_default()
                .rooms
                .push(row.get(1));
        }
        for row in client.query(&peers, &[&users, &max_peers]).await? {
            audiences
                .entry(row.get(0))
                .or_default()
                .peers
                .push(row.get(1));
        }
        Ok(audiences)
    }

    /// Moves `user`'s read position in `conversation` to `seq` unless it is there or beyond;
    /// true when it moved. For a direct conversation (`peer` given), the conversation and its
    /// members are written first if the worker has not written them yet.
    pub async fn mark_read(
        &self,
        conversation: Uuid,
        user: Uuid,
        seq: i64,
        peer: Option<Uuid>,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some(peer) = peer {
            let mut members = [(conversation, user), (conversation, peer)];
            members.sort_unstable();
            insert_direct(&tx, &[conversation], &members).await?;
        }
        let moved = tx
            .execute(
                "UPDATE conversation_members SET last_read_seq = $3
                 WHERE conversation_id = $1 AND user_id = $2 AND last_read_seq < $3",
                &[&conversation, &user, &seq],
            )
            .await?;
        tx.commit().await?;
        Ok(moved > 0)
    }
}
