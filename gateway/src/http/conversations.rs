//! Conversations: the caller's conversation list, and the history of one conversation.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use chat_core::protocol::{ErrorCode, MessageFrame};
use chat_core::store::{Member, Membership, Store};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Authenticated;
use crate::api_error::ApiError;
use crate::directory::Directory;
use crate::history::{History, HistoryError};

/// Default and largest page of the history endpoint.
const HISTORY_DEFAULT_LIMIT: i64 = 50;
const HISTORY_MAX_LIMIT: i64 = 200;
/// Default and largest page of the conversation list.
const LIST_DEFAULT_LIMIT: i64 = 50;
const LIST_MAX_LIMIT: i64 = 100;
/// Unread counts stop counting here (the list shows "999+" style numbers beyond it).
const UNREAD_CAP: i64 = 1000;

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
async fn require_member(
    directory: &Directory,
    user: Uuid,
    conversation: Uuid,
) -> Result<Membership, ApiError> {
    match directory.membership(user, conversation).await {
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

fn history_error(e: HistoryError) -> ApiError {
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
    directory: web::Data<Directory>,
    history: web::Data<History>,
    path: web::Path<String>,
    query: web::Query<HistoryQuery>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
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
    require_member(&directory, caller.user_id, conversation).await?;
    let last = history
        .last_seq(conversation)
        .await
        .map_err(history_error)?;
    let upper = q.before_seq.map_or(last, |b| (b - 1).min(last));
    let lower = q.after_seq.map_or(1, |a| a + 1);
    let (lo, hi) = if q.after_seq.is_some() {
        (lower, upper.min(lower.saturating_add(limit - 1)))
    } else {
        ((upper - limit + 1).max(lower), upper)
    };
    let range = history
        .read_range(conversation, lo, hi)
        .await
        .map_err(history_error)?;
    // The next page starts where this one's messages end, or past a skipped range at its edge.
    let first = range.messages.first().map(|m| m.seq);
    let highest = range.messages.last().map(|m| m.seq);
    let (covered_lo, covered_hi) = range.covered;
    let before = match first {
        Some(seq) if covered_lo < lo => Some(seq.min(covered_lo)),
        Some(seq) => Some(seq),
        None if lo <= hi => Some(covered_lo),
        None => None,
    };
    let after = match highest {
        Some(seq) if covered_hi > hi => Some(seq.max(covered_hi)),
        Some(seq) => Some(seq),
        None if lo <= hi => Some(covered_hi),
        None => None,
    };
    Ok(HttpResponse::Ok().json(HistoryPage {
        next_before_seq: before.filter(|s| *s > 1),
        next_after_seq: after.filter(|s| *s < last),
        messages: range.messages,
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
struct ConversationView {
    id: Uuid,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// The other member of a direct conversation.
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<Member>,
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
/// first. Served from Postgres: it trails live traffic by the sink's lag (milliseconds).
pub async fn list(
    store: web::Data<Store>,
    query: web::Query<ListQuery>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let limit = q.limit.unwrap_or(LIST_DEFAULT_LIMIT);
    if !(1..=LIST_MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 100"));
    }
    let cursor = match q.cursor.as_deref() {
        None => (i64::MAX, Uuid::max()),
        Some(c) => parse_cursor(c).ok_or_else(|| ApiError::bad_request("malformed cursor"))?,
    };
    let rows = store
        .conversation_page(caller.user_id, cursor, limit, UNREAD_CAP)
        .await?;
    let next_cursor = (rows.len() as i64 >= limit)
        .then(|| {
            rows.last()
                .map(|r| format!("{}_{}", r.activity_micros, r.id))
        })
        .flatten();
    let conversations = rows
        .into_iter()
        .map(|r| ConversationView {
            id: r.id,
            kind: r.kind,
            name: r.name,
            peer: r.peer,
            last_message: r.last_message,
            last_seq: r.last_seq,
            last_read_seq: r.last_read_seq,
            unread: r.unread,
            last_activity_ts: r.activity_micros / 1000,
        })
        .collect();
    Ok(HttpResponse::Ok().json(ConversationPage {
        conversations,
        next_cursor,
    }))
}
