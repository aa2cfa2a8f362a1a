//! Presence: who is online, in Redis. Each node keeps, per user it holds, an entry in the user's
//! sorted set scored with its expiry (Redis clock) and refreshes all of them every heartbeat in
//! batches; a user is online while any node's entry is live. Transitions (first connection
//! anywhere, last one gone, or a dead node's entries expired) are announced once, by whichever
//! node's atomic script observed them. Also the users list and batch status endpoints.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use chat_core::keys::KeySchema;
use chat_core::protocol::{PresenceStatus, ServerFrame};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::accounts::authenticate;
use crate::api_error::ApiError;
use crate::node::Node;

/// Users refreshed per script call.
const REFRESH_BATCH: usize = 500;
/// Users swept per script call.
const SWEEP_BATCH: usize = 1000;
/// Direct conversations whose peers hear of a transition (the most recently active).
const MAX_DIRECT_PEERS: i64 = 1000;
/// Largest `user_ids` list of `GET /presence`.
const MAX_PRESENCE_IDS: usize = 100;
/// Most online users `GET /users?online=true` considers.
const MAX_ONLINE_SCAN: usize = 100_000;

/// Redis's clock in milliseconds, so expiry does not depend on the nodes' clocks.
const NOW_LUA: &str = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// KEYS: user set, deadlines. ARGV: node, ttl ms, user id. Returns 1 when the user was offline.
const JOIN_LUA: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local before = redis.call('ZCARD', KEYS[1])
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'GT', expiry, ARGV[3])
if before == 0 then return 1 end
return 0
"#;

/// KEYS: user set, deadlines. ARGV: node, user id. Returns 1 when the user went offline. Only
/// the caller that removes the user from the deadlines reports it, so a concurrent sweep cannot
/// report it twice.
const LEAVE_LUA: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #top == 0 then
  redis.call('DEL', KEYS[1])
  return redis.call('ZREM', KEYS[2], ARGV[2])
end
redis.call('ZADD', KEYS[2], top[2], ARGV[2])
return 0
"#;

/// KEYS: deadlines, then one user set per user. ARGV: node, ttl ms, then the user ids. Returns
/// the users that had no live entry (swept while this node held them: announce them again).
/// Three commands per user when the node's entry was there; the revival check runs only when
/// it was not (measured in docs/benchmarks.md).
const REFRESH_LUA: &str = r#"
local expiry = now + tonumber(ARGV[2])
local revived = {}
for i = 2, #KEYS do
  if redis.call('ZADD', KEYS[i], expiry, ARGV[1]) == 1 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    if redis.call('ZCARD', KEYS[i]) == 1 then revived[#revived + 1] = ARGV[i + 1] end
  end
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
  redis.call('ZADD', KEYS[1], 'GT', expiry, ARGV[i + 1])
end
return revived
"#;

/// KEYS: deadlines. ARGV: user-set key prefix, batch. Returns the users whose every entry
/// expired (their nodes stopped refreshing them), removing them: each is returned once.
const SWEEP_LUA: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local gone = {}
for _, user in ipairs(due) do
  local key = ARGV[1] .. user
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if #top == 0 then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], user)
    gone[#gone + 1] = user
  else
    redis.call('ZADD', KEYS[1], top[2], user)
  end
end
return gone
"#;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{NOW_LUA}{body}"))
}

/// The node's presence bookkeeping.
pub struct Presence {
    keys: KeySchema,
    node_id: String,
    ttl_ms: u64,
    join: redis::Script,
    leave: redis::Script,
    refresh: redis::Script,
    sweep: redis::Script,
}

impl Presence {
    pub fn new(keys: KeySchema, node_id: String, ttl: Duration) -> Self {
        Presence {
            keys,
            node_id,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            join: script(JOIN_LUA),
            leave: script(LEAVE_LUA),
            refresh: script(REFRESH_LUA),
            sweep: script(SWEEP_LUA),
        }
    }

    /// Records that `user` has a connection here; true when they just came online.
    pub async fn join(&self, node: &Node, user: Uuid) -> Result<bool, crate::broker::BrokerError> {
        let mut inv = self.join.prepare_invoke();
        inv.key(self.keys.presence(user))
            .key(self.keys.presence_deadlines())
            .arg(&self.node_id)
            .arg(self.ttl_ms)
            .arg(user.to_string());
        let came_online: i64 = node.broker.invoke(&inv).await?;
        Ok(came_online == 1)
    }

    /// Records that `user`'s last connection here closed; true when they just went offline.
    pub async fn leave(&self, node: &Node, user: Uuid) -> Result<bool, crate::broker::BrokerError> {
        let mut inv = self.leave.prepare_invoke();
        inv.key(self.keys.presence(user))
            .key(self.keys.presence_deadlines())
            .arg(&self.node_id)
            .arg(user.to_string());
        let went_offline: i64 = node.broker.invoke(&inv).await?;
        Ok(went_offline == 1)
    }

    /// Whether each user is online now.
    pub async fn online(
        &self,
        node: &Node,
        users: &[Uuid],
    ) -> Result<Vec<bool>, crate::broker::BrokerError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("ZMSCORE").arg(self.keys.presence_deadlines());
        for u in users {
            pipe.arg(u.to_string());
        }
        let (scores,): (Vec<Option<f64>>,) = node.broker.query(&pipe).await?;
        let now = chat_core::now_ms() as f64;
        Ok(scores.iter().map(|s| s.is_some_and(|s| s > now)).collect())
    }

    /// Every online user (at most `MAX_ONLINE_SCAN`).
    async fn all_online(&self, node: &Node) -> Result<Vec<Uuid>, crate::broker::BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGEBYSCORE")
            .arg(self.keys.presence_deadlines())
            .arg(chat_core::now_ms())
            .arg("+inf")
            .arg("LIMIT")
            .arg(0)
            .arg(MAX_ONLINE_SCAN);
        let (ids,): (Vec<String>,) = node.broker.query(&pipe).await?;
        Ok(ids.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect())
    }

    /// One heartbeat: refresh every local user, announce the revived, sweep the expired.
    async fn beat(&self, node: &Node) {
        let started = Instant::now();
        let users = node.hub.local_users();
        for batch in users.chunks(REFRESH_BATCH) {
            let mut inv = self.refresh.prepare_invoke();
            inv.key(self.keys.presence_deadlines());
            for u in batch {
                inv.key(self.keys.presence(*u));
            }
            inv.arg(&self.node_id).arg(self.ttl_ms);
            for u in batch {
                inv.arg(u.to_string());
            }
            match node.broker.invoke::<Vec<String>>(&inv).await {
                Ok(revived) => {
                    for user in revived.iter().filter_map(|s| Uuid::parse_str(s).ok()) {
                        announce(node, user, PresenceStatus::Online).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "presence refresh failed"),
            }
        }
        let prefix = self.keys.presence(Uuid::nil());
        let prefix = prefix
            .trim_end_matches(&Uuid::nil().to_string())
            .to_string();
        loop {
            let mut inv = self.sweep.prepare_invoke();
            inv.key(self.keys.presence_deadlines())
                .arg(&prefix)
                .arg(SWEEP_BATCH);
            let gone = match node.broker.invoke::<Vec<String>>(&inv).await {
                Ok(gone) => gone,
                Err(e) => {
                    tracing::warn!(error = %e, "presence sweep failed");
                    break;
                }
            };
            for user in gone.iter().filter_map(|s| Uuid::parse_str(s).ok()) {
                announce(node, user, PresenceStatus::Offline).await;
            }
            if gone.len() < SWEEP_BATCH {
                break;
            }
        }
        node.metrics
            .presence_heartbeat_duration
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Refreshes and sweeps every `presence_heartbeat_secs` until `shutdown`.
pub async fn run_heartbeats(node: web::Data<Node>, shutdown: CancellationToken) {
    let period = Duration::from_secs(node.config.raw.presence_heartbeat_secs);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => node.presence.beat(&node).await,
        }
    }
}

/// Tells everyone who should know that `user` changed status: watchers (the user's presence
/// channel), members of the user's rooms up to `gateway_presence_room_max_members`, and the
/// peers of their most recent direct conversations. Going offline also records `last_seen`.
pub async fn announce(node: &Node, user: Uuid, status: PresenceStatus) {
    let label = match status {
        PresenceStatus::Online => "online",
        PresenceStatus::Offline => "offline",
    };
    node.metrics
        .presence_transitions
        .with_label_values(&[label])
        .inc();
    let keys = node.broker.keys();
    let mut channels = vec![keys.presence_channel(user)];
    match audience(node, user, status).await {
        Ok((rooms, peers)) => {
            channels.extend(rooms.into_iter().map(|r| keys.room_channel(r)));
            channels.extend(peers.into_iter().map(|p| keys.user_channel(p)));
        }
        Err(e) => tracing::warn!(error = %e, "presence audience unavailable; watchers only"),
    }
    let frame = ServerFrame::Presence {
        user_id: user,
        status,
        ts: chat_core::now_ms(),
    };
    if let Err(e) = node
        .broker
        .publish(&channels, Uuid::nil(), &frame.to_json())
        .await
    {
        tracing::warn!(error = %e, "presence change not published");
    }
}

/// The rooms (small enough) and direct peers of `user`; records `last_seen` when offline.
async fn audience(
    node: &Node,
    user: Uuid,
    status: PresenceStatus,
) -> Result<(Vec<Uuid>, Vec<Uuid>), String> {
    let client = node
        .db
        .get()
        .await
        .map_err(|e| chat_core::db::describe_pool(&e))?;
    if status == PresenceStatus::Offline {
        client
            .execute("UPDATE users SET last_seen = now() WHERE id = $1", &[&user])
            .await
            .map_err(|e| chat_core::db::describe(&e))?;
    }
    let max_members = node.config.raw.gateway_presence_room_max_members;
    let rooms = client
        .query(
            "SELECT m.conversation_id FROM conversation_members m
             JOIN conversations c ON c.id = m.conversation_id
             WHERE m.user_id = $1 AND c.kind = 'room' AND c.member_count <= $2",
            &[&user, &i32::try_from(max_members).unwrap_or(i32::MAX)],
        )
        .await
        .map_err(|e| chat_core::db::describe(&e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let peers = client
        .query(
            "SELECT o.user_id FROM conversation_members m
             JOIN conversations c ON c.id = m.conversation_id AND c.kind = 'direct'
             JOIN conversation_members o ON o.conversation_id = m.conversation_id
                                        AND o.user_id <> m.user_id
             WHERE m.user_id = $1
             ORDER BY c.last_activity_at DESC LIMIT $2",
            &[&user, &MAX_DIRECT_PEERS],
        )
        .await
        .map_err(|e| chat_core::db::describe(&e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok((rooms, peers))
}

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

fn unavailable_redis(e: crate::broker::BrokerError) -> ApiError {
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
pub async fn list_users(
    node: web::Data<Node>,
    req: HttpRequest,
    query: web::Query<UsersQuery>,
) -> Result<HttpResponse, ApiError> {
    authenticate(&node, &req, false).await?;
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
        Some(
            node.presence
                .all_online(&node)
                .await
                .map_err(unavailable_redis)?,
        )
    } else {
        None
    };
    let client = node.db.get().await.map_err(ApiError::pool)?;
    let rows = client
        .query(
            "SELECT id, name, lower(name), (extract(epoch FROM last_seen) * 1000)::int8, avatar_url
             FROM users
             WHERE ($1::text IS NULL OR name ILIKE $1)
               AND ($2::uuid[] IS NULL OR id = ANY($2))
               AND (lower(name), id) > ($3, $4)
             ORDER BY lower(name), id
             LIMIT $5",
            &[&pattern, &only_ids, &after_name, &after_id, &limit],
        )
        .await
        .map_err(ApiError::db)?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let online = node
        .presence
        .online(&node, &ids)
        .await
        .map_err(unavailable_redis)?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| encode_cursor(r.get(2), r.get(0))))
        .flatten();
    let users: Vec<UserPresence> = rows
        .iter()
        .zip(online)
        .filter(|(_, online)| q.online.is_none_or(|want| want == *online))
        .map(|(r, online)| UserPresence {
            id: r.get(0),
            name: Some(r.get(1)),
            avatar_url: Some(r.get(4)),
            online,
            last_seen: r.get(3),
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
pub async fn batch(
    node: web::Data<Node>,
    req: HttpRequest,
    query: web::Query<PresenceQuery>,
) -> Result<HttpResponse, ApiError> {
    authenticate(&node, &req, false).await?;
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
    let online = node
        .presence
        .online(&node, &ids)
        .await
        .map_err(unavailable_redis)?;
    let client = node.db.get().await.map_err(ApiError::pool)?;
    let seen: HashMap<Uuid, Option<i64>> = client
        .query(
            "SELECT id, (extract(epoch FROM last_seen) * 1000)::int8 FROM users WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(ApiError::db)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
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
