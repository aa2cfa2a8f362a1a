//! Users: the list by name with presence (`GET /users`), and the status of given users
//! (`GET /presence`).

use actix_web::{web, HttpResponse};
use chat_core::backend::BackendError;
use chat_core::store::Store;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Authenticated;
use crate::api_error::ApiError;
use crate::presence::Presence;

/// Largest `user_ids` list of `GET /presence`.
const MAX_PRESENCE_IDS: usize = 100;

/// A user as the users list and the presence endpoint show them.
#[derive(Debug, Serialize)]
struct UserPresence {
    id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// In the users list only (null when the user has no picture).
    #[serde(skip_serializing_if = "Option::is_none")]
    avatar_url: Option<Option<String>>,
    online: bool,
    /// When the user last went offline, Unix ms; null if never seen.
    last_seen: Option<i64>,
}

fn presence_unavailable(e: BackendError) -> ApiError {
    tracing::warn!(error = %e, "presence read failed");
    ApiError::unavailable("presence")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersQuery {
    online: Option<bool>,
    q: Option<String>,
    cursor: Option<String>,
    limit: Option<i64>,
}

/// A users-list cursor: the last row's lowercased name (hex) and id.
fn encode_cursor(name: &str, id: Uuid) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.{id}")
}

fn decode_cursor(cursor: &str) -> Option<(String, Uuid)> {
    let (hex, id) = cursor.split_once('.')?;
    if hex.len() % 2 != 0 || hex.len() > 1024 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    Some((String::from_utf8(bytes?).ok()?, Uuid::parse_str(id).ok()?))
}

/// `GET /api/v1/users?online=&q=&cursor=&limit=`: users by name, with presence. `q` matches
/// any part of the name, case-insensitively. With `online`, a page can hold fewer than `limit`
/// users; follow `next_cursor` until it is absent.
pub async fn list(
    store: web::Data<Store>,
    presence: web::Data<Presence>,
    query: web::Query<UsersQuery>,
    _caller: Authenticated,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let limit = q.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 100"));
    }
    let pattern = match q.q.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) if text.chars().count() > 100 => {
            return Err(ApiError::bad_request("q is at most 100 characters"))
        }
        Some(text) => {
            let escaped = text
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            Some(format!("%{escaped}%"))
        }
    };
    let (after_name, after_id) = match q.cursor.as_deref() {
        None => (String::new(), Uuid::nil()),
        Some(c) => decode_cursor(c).ok_or_else(|| ApiError::bad_request("malformed cursor"))?,
    };
    let only_ids = if q.online == Some(true) {
        Some(presence.all_online().await.map_err(presence_unavailable)?)
    } else {
        None
    };
    let rows = store
        .list_users(
            pattern.as_deref(),
            only_ids.as_deref(),
            (&after_name, after_id),
            limit,
        )
        .await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let online = presence.online(&ids).await.map_err(presence_unavailable)?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| encode_cursor(&r.sort_name, r.id)))
        .flatten();
    let users: Vec<UserPresence> = rows
        .into_iter()
        .zip(online)
        .filter(|(_, online)| q.online.is_none_or(|want| want == *online))
        .map(|(r, online)| UserPresence {
            id: r.id,
            name: Some(r.name),
            avatar_url: Some(r.avatar_url),
            online,
            last_seen: r.last_seen,
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({"users": users, "next_cursor": next_cursor})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceQuery {
    user_ids: String,
}

/// `GET /api/v1/presence?user_ids=a,b,c`: the status of up to 100 users.
pub async fn presence(
    store: web::Data<Store>,
    presence: web::Data<Presence>,
    query: web::Query<PresenceQuery>,
    _caller: Authenticated,
) -> Result<HttpResponse, ApiError> {
    let ids: Result<Vec<Uuid>, _> = query
        .user_ids
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| Uuid::parse_str(s.trim()))
        .collect();
    let ids =
        ids.map_err(|_| ApiError::bad_request("user_ids must be comma-separated user ids"))?;
    if ids.is_empty() || ids.len() > MAX_PRESENCE_IDS {
        return Err(ApiError::bad_request("give 1 to 100 user_ids"));
    }
    let online = presence.online(&ids).await.map_err(presence_unavailable)?;
    let seen = store.last_seen(&ids).await?;
    let users: Vec<UserPresence> = ids
        .iter()
        .zip(online)
        .filter(|(id, _)| seen.contains_key(id))
        .map(|(id, online)| UserPresence {
            id: *id,
            name: None,
            avatar_url: None,
            online,
            last_seen: seen.get(id).copied().flatten(),
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "users": users })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cursors round-trip any name, and garbage is refused.
    #[test]
    fn cursors_round_trip() {
        let id = Uuid::now_v7();
        for name in ["", "alice", "Zoë 🙂 . _ %"] {
            assert_eq!(
                decode_cursor(&encode_cursor(name, id)),
                Some((name.to_string(), id))
            );
        }
        assert_eq!(decode_cursor("zz.nope"), None);
        assert_eq!(decode_cursor("abc"), None);
    }
}
