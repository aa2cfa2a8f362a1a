//! Conversations: who may use a conversation (the directory every frame and request asks), the
//! caller's conversation list, and the history endpoint.

use std::collections::HashMap;
use std::sync::Mutex;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chat_core::protocol::{ErrorCode, MessageFrame};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::accounts::authenticate;
use crate::api_error::ApiError;
use crate::history::{self, HistoryError};
use crate::node::Node;

/// Default and largest page of the history endpoint.
const HISTORY_DEFAULT_LIMIT: i64 = 50;
const HISTORY_MAX_LIMIT: i64 = 200;
/// Default and largest page of the conversation list.
const LIST_DEFAULT_LIMIT: i64 = 50;
const LIST_MAX_LIMIT: i64 = 100;
/// Unread counts stop counting here (the list shows "999+" style numbers beyond it).
const UNREAD_CAP: i64 = 1000;

/// What a conversation is to one of its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A direct conversation with `peer`.
    Direct { peer: Uuid },
    /// A room.
    Room,
}

/// The directory could not answer (Redis and Postgres unavailable).
#[derive(Debug, thiserror::Error)]
#[error("conversation directory: {0}")]
pub struct DirectoryError(String);

/// Resolves conversation ids to the caller's membership. Direct conversations never change
/// members, so their pairs are cached (bounded, cleared when full); room membership changes, so
/// it comes from the hub's live index (for local users) or from Postgres.
pub struct Directory {
    pairs: Mutex<HashMap<Uuid, (Uuid, Uuid)>>,
    capacity: usize,
}

impl Directory {
    pub fn new(capacity: usize) -> Self {
        Directory {
            pairs: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    fn cached_pair(&self, conversation: Uuid) -> Option<(Uuid, Uuid)> {
        self.pairs
            .lock()
            .ok()
            .and_then(|p| p.get(&conversation).copied())
    }

    fn remember_pair(&self, conversation: Uuid, pair: (Uuid, Uuid)) {
        if let Ok(mut pairs) = self.pairs.lock() {
            if pairs.len() >= self.capacity {
                pairs.clear();
            }
            pairs.insert(conversation, pair);
        }
    }

    /// The caller's membership of `conversation`, or `None` when the conversation does not
    /// exist or the caller is not a member (callers answer both the same way).
    pub async fn resolve(
        &self,
        node: &Node,
        user: Uuid,
        conversation: Uuid,
    ) -> Result<Option<Membership>, DirectoryError> {
        if node.hub.is_member(user, conversation) {
            return Ok(Some(Membership::Room));
        }
        let pair_membership = |(a, b): (Uuid, Uuid)| {
            if a == user {
                Some(Membership::Direct { peer: b })
            } else if b == user {
                Some(Membership::Direct { peer: a })
            } else {
                None
            }
        };
        if let Some(pair) = self.cached_pair(conversation) {
            return Ok(pair_membership(pair));
        }
        // A direct conversation's pair is in Redis from its first message, before Postgres.
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(node.broker.keys().pair(conversation));
        if let Ok((Some(text),)) = node.broker.query::<(Option<String>,)>(&pipe).await {
            if let Some((a, b)) = text.split_once(':') {
                if let (Ok(a), Ok(b)) = (Uuid::parse_str(a), Uuid::parse_str(b)) {
                    self.remember_pair(conversation, (a, b));
                    return Ok(pair_membership((a, b)));
                }
            }
        }
        let client = node
            .db
            .get()
            .await
            .map_err(|e| DirectoryError(chat_core::db::describe_pool(&e)))?;
        let row = client
            .query_opt(
                "SELECT c.kind,
                        (SELECT o.user_id FROM conversation_members o
                         WHERE o.conversation_id = c.id AND o.user_id <> $2 LIMIT 1)
                 FROM conversations c
                 JOIN conversation_members m ON m.conversation_id = c.id AND m.user_id = $2
                 WHERE c.id = $1",
                &[&conversation, &user],
            )
            .await
            .map_err(|e| DirectoryError(chat_core::db::describe(&e)))?;
        Ok(row.and_then(|row| {
            let kind: String = row.get(0);
            match (kind.as_str(), row.get::<_, Option<Uuid>>(1)) {
                ("room", _) => Some(Membership::Room),
                ("direct", Some(peer)) => {
                    self.remember_pair(conversation, (user, peer));
                    Some(Membership::Direct { peer })
                }
                _ => None,
            }
        }))
    }
}

/// The channels a conversation's live frames go to.
pub fn channels(
    node: &Node,
    user: Uuid,
    conversation: Uuid,
    membership: Membership,
) -> Vec<String> {
    let keys = node.broker.keys();
    match membership {
        Membership::Direct { peer } => vec![keys.user_channel(peer), keys.user_channel(user)],
        Membership::Room => vec![keys.room_channel(conversation)],
    }
}

/// `404 not_found` for a conversation the caller cannot see, existing or not.
fn no_such_conversation() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such conversation",
    )
}

/// Parses a conversation id from the path; a malformed id is simply not found.
pub fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| no_such_conversation())
}

/// Checks the caller may read `conversation`.
pub async fn require_member(
    node: &Node,
    user: Uuid,
    conversation: Uuid,
) -> Result<Membership, ApiError> {
    match node.conversations.resolve(node, user, conversation).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(no_such_conversation()),
        Err(e) => {
            tracing::warn!(error = %e, "membership lookup failed");
            Err(ApiError::unavailable("the conversation directory"))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    before_seq: Option<i64>,
    after_seq: Option<i64>,
    limit: Option<i64>,
}

#[derive(Debug, Serialize)]
struct HistoryPage {
    messages: Vec<MessageFrame>,
    /// Pass as `before_seq` for the next older page; absent at the start of the conversation.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before_seq: Option<i64>,
    /// Pass as `after_seq` for the next newer page; absent at the conversation's last message.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after_seq: Option<i64>,
    /// The conversation's last seq when the page was read.
    last_seq: i64,
}

pub fn history_error(e: HistoryError) -> ApiError {
    match e {
        HistoryError::Postgres(text) => {
            tracing::warn!(error = %text, "history read failed");
            ApiError::unavailable("history")
        }
        HistoryError::CatchingUp => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "history is catching up; retry shortly",
        ),
    }
}

/// `GET /api/v1/conversations/{id}/messages?before_seq=&after_seq=&limit=`
///
/// With `after_seq`: the oldest `limit` messages after it. Otherwise: the newest `limit`
/// messages before `before_seq` (or the newest of all). Always in ascending seq order.
pub async fn messages(
    node: web::Data<Node>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<HistoryQuery>,
) -> Result<HttpResponse, ApiError> {
    let identity = authenticate(&node, &req, false).await?;
    let conversation = parse_id(&path)?;
    let q = query.into_inner();
    let limit = q.limit.unwrap_or(HISTORY_DEFAULT_LIMIT);
    if !(1..=HISTORY_MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 200"));
    }
    if q.before_seq.is_some_and(|s| s < 1) || q.after_seq.is_some_and(|s| s < 0) {
        return Err(ApiError::bad_request(
            "before_seq must be at least 1 and after_seq at least 0",
        ));
    }
    require_member(&node, identity.user_id, conversation).await?;
    let last = history::last_seq(&node, conversation)
        .await
        .map_err(history_error)?;
    let upper = q.before_seq.map_or(last, |b| (b - 1).min(last));
    let lower = q.after_seq.map_or(1, |a| a + 1);
    let (lo, hi) = if q.after_seq.is_some() {
        (lower, upper.min(lower.saturating_add(limit - 1)))
    } else {
        ((upper - limit + 1).max(lower), upper)
    };
    let messages = history::read_range(&node, conversation, lo, hi)
        .await
        .map_err(history_error)?;
    let first = messages.first().map(|m| m.seq);
    let highest = messages.last().map(|m| m.seq);
    Ok(HttpResponse::Ok().json(HistoryPage {
        next_before_seq: first.filter(|s| *s > 1),
        next_after_seq: highest.filter(|s| *s < last),
        messages,
        last_seq: last,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    cursor: Option<String>,
    limit: Option<i64>,
}

#[derive(Debug, Serialize)]
struct Peer {
    id: Uuid,
    name: String,
    avatar_url: Option<String>,
    /// How far the other member has read: the caller's messages up to it are "seen".
    last_read_seq: i64,
}

#[derive(Debug, Serialize)]
struct ConversationView {
    id: Uuid,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// The other member of a direct conversation.
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<Peer>,
    last_message: Option<MessageFrame>,
    last_seq: i64,
    last_read_seq: i64,
    unread: i64,
    /// Unix milliseconds of the last message (or of creation).
    last_activity_ts: i64,
}

#[derive(Debug, Serialize)]
struct ConversationPage {
    conversations: Vec<ConversationView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// A list cursor: the last row's activity time (Unix microseconds) and id.
fn parse_cursor(cursor: &str) -> Option<(i64, Uuid)> {
    let (micros, id) = cursor.split_once('_')?;
    Some((micros.parse().ok()?, Uuid::parse_str(id).ok()?))
}

/// `GET /api/v1/conversations?cursor=&limit=`: the caller's conversations, most recent activity
/// first. Served from Postgres: it trails live traffic by the worker's lag (milliseconds).
pub async fn list(
    node: web::Data<Node>,
    req: HttpRequest,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let identity = authenticate(&node, &req, false).await?;
    let q = query.into_inner();
    let limit = q.limit.unwrap_or(LIST_DEFAULT_LIMIT);
    if !(1..=LIST_MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 100"));
    }
    let (cursor_micros, cursor_id) = match q.cursor.as_deref() {
        None => (i64::MAX, Uuid::max()),
        Some(c) => parse_cursor(c).ok_or_else(|| ApiError::bad_request("malformed cursor"))?,
    };
    let client = node.db.get().await.map_err(ApiError::pool)?;
    let rows = client
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
                &identity.user_id,
                &cursor_micros.min(i64::MAX / 2),
                &cursor_id,
                &limit,
                &UNREAD_CAP,
            ],
        )
        .await
        .map_err(ApiError::db)?;
    let mut next_cursor = None;
    let conversations: Vec<ConversationView> = rows
        .iter()
        .map(|r| {
            let id: Uuid = r.get(0);
            let last_seq: i64 = r.get(3);
            let activity: i64 = r.get(5);
            next_cursor = Some(format!("{activity}_{id}"));
            let last_message = r.get::<_, Option<Uuid>>(8).map(|msg_id| MessageFrame {
                msg_id,
                conversation_id: id,
                seq: last_seq,
                from: r.get(9),
                to: r.get(10),
                body: r.get(11),
                ts: r.get(12),
            });
            ConversationView {
                id,
                kind: r.get(1),
                name: r.get(2),
                peer: r.get::<_, Option<Uuid>>(6).map(|peer| Peer {
                    id: peer,
                    name: r.get::<_, Option<String>>(7).unwrap_or_default(),
                    avatar_url: r.get(15),
                    last_read_seq: r.get::<_, Option<i64>>(14).unwrap_or(0),
                }),
                last_message,
                last_seq,
                last_read_seq: r.get(4),
                unread: r.get(13),
                last_activity_ts: activity / 1000,
            }
        })
        .collect();
    if (conversations.len() as i64) < limit {
        next_cursor = None;
    }
    Ok(HttpResponse::Ok().json(ConversationPage {
        conversations,
        next_cursor,
    }))
}
