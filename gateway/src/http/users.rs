//! Users: the list by name with presence (`GET /users`), finding a user by email, and the
//! status of given users (`GET /presence`), each showing presence only where
//! `presence_visibility` lets the caller see it.

use actix_web::{web, HttpResponse};
use chat_core::backend::BackendError;
use chat_core::store::Store;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Authenticated;
use crate::api_error::ApiError;
use crate::config::PresenceVisibility;
use crate::directory::Directory;
use crate::fields::MAX_EMAIL_BYTES;
use crate::presence::Presence;

/// Largest `user_ids` list of `GET /presence`.
const MAX_PRESENCE_IDS: usize = 100;

/// Most users a `GET /users?online=` request reads to fill its page; then it answers what it
/// found (maybe fewer than `limit`, maybe none) with a cursor to go on from.
const MAX_SCANNED_PER_PAGE: i64 = 1000;

/// A user as the users list and the presence endpoint show them.
#[derive(Debug, Serialize)]
struct UserPresence {
    id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// In the users list only (null when the user has no picture).
    #[serde(skip_serializing_if = "Option::is_none")]
    avatar_url: Option<Option<String>>,
    /// Absent where the caller may not see this user's presence (found by email).
    #[serde(skip_serializing_if = "Option::is_none")]
    online: Option<bool>,
    /// When the user last went offline, Unix ms; null if never seen. Absent with `online`.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen: Option<Option<i64>>,
}

fn visibility_name(v: PresenceVisibility) -> &'static str {
    match v {
        PresenceVisibility::Contacts => "contacts",
        PresenceVisibility::Everyone => "everyone",
    }
}

fn directory_unavailable(e: crate::directory::DirectoryError) -> ApiError {
    tracing::warn!(error = %e, "visibility check failed");
    ApiError::unavailable("the user directory")
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
    email: Option<String>,
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

/// `GET /api/v1/users?online=&q=&email=&cursor=&limit=`: users by name, with presence: the
/// caller's contacts, or everyone (`presence_visibility`). `q` matches any part of the name,
/// case-insensitively. `email` finds one user by their exact address, anyone, with presence
/// only when the caller may see it. With `online`, a page reads at most
/// [`MAX_SCANNED_PER_PAGE`] users, so it can hold fewer than `limit`; follow `next_cursor`
/// until it is absent.
pub async fn list(
    store: web::Data<Store>,
    presence: web::Data<Presence>,
    directory: web::Data<Directory>,
    query: web::Query<UsersQuery>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let visibility = visibility_name(directory.visibility());
    if let Some(email) = q.email.as_deref().map(str::trim) {
        if email.is_empty() || email.len() > MAX_EMAIL_BYTES || q.q.is_some() || q.online.is_some()
        {
            return Err(ApiError::bad_request(
                "email is one address, without q or online",
            ));
        }
        let mut users = Vec::new();
        if let Some(r) = store.user_by_email(email).await? {
            let visible = directory
                .visible_to(caller.user_id, &[r.id])
                .await
                .map_err(directory_unavailable)?;
            let online = if visible.contains(&r.id) {
                let online = presence
                    .online(&[r.id])
                    .await
                    .map_err(presence_unavailable)?;
                online.first().copied()
            } else {
                None
            };
            users.push(UserPresence {
                id: r.id,
                name: Some(r.name),
                avatar_url: Some(r.avatar_url),
                last_seen: online.map(|_| r.last_seen),
                online,
            });
        }
        return Ok(HttpResponse::Ok().json(
            serde_json::json!({"users": users, "next_cursor": null, "visibility": visibility}),
        ));
    }
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
    let (mut after_name, mut after_id) = match q.cursor.as_deref() {
        None => (String::new(), Uuid::nil()),
        Some(c) => decode_cursor(c).ok_or_else(|| ApiError::bad_request("malformed cursor"))?,
    };
    let contacts_of = match directory.visibility() {
        PresenceVisibility::Contacts => Some(caller.user_id),
        PresenceVisibility::Everyone => None,
    };
    // Without `online`, one read of `limit` rows; with it, reads in batches (presence from
    // Redis, one call per batch) until the page is full or the scan bound is reached. No list
    // of online ids ever goes to Postgres.
    let batch = if q.online.is_some() { 100 } else { limit };
    let mut users = Vec::new();
    let mut scanned = 0;
    let next_cursor = loop {
        let rows = store
            .list_users(
                pattern.as_deref(),
                contacts_of,
                (&after_name, after_id),
                batch,
            )
            .await?;
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let online = presence.online(&ids).await.map_err(presence_unavailable)?;
        let full_batch = rows.len() as i64 == batch;
        scanned += rows.len() as i64;
        let mut last = None;
        for (r, online) in rows.into_iter().zip(online) {
            last = Some((r.sort_name.clone(), r.id));
            if q.online.is_some_and(|want| want != online) {
                continue;
            }
            users.push(UserPresence {
                id: r.id,
                name: Some(r.name),
                avatar_url: Some(r.avatar_url),
                online: Some(online),
                last_seen: Some(r.last_seen),
            });
            if users.len() as i64 == limit {
                break;
            }
        }
        let Some((name, id)) = last else {
            break None;
        };
        let more = full_batch || users.len() as i64 == limit;
        if users.len() as i64 == limit || scanned >= MAX_SCANNED_PER_PAGE || !full_batch {
            break more.then(|| encode_cursor(&name, id));
        }
        (after_name, after_id) = (name, id);
    };
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "users": users,
        "next_cursor": next_cursor,
        "visibility": visibility,
    })))
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
    directory: web::Data<Directory>,
    query: web::Query<PresenceQuery>,
    Authenticated(caller): Authenticated,
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
    // Users the caller may not see are left out, as unknown ids are: the answer cannot tell
    // them apart.
    let visible = directory
        .visible_to(caller.user_id, &ids)
        .await
        .map_err(directory_unavailable)?;
    let ids: Vec<Uuid> = ids.into_iter().filter(|id| visible.contains(id)).collect();
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
            online: Some(online),
            last_seen: Some(seen.get(id).copied().flatten()),
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
