//! Presence on Redis. Per user, a sorted set of the nodes holding a connection, each scored with
//! the (Redis clock) time its entry expires; beside them, per presence partition, an index of
//! its present users scored with their latest expiry, which the sweep walks. Every transition is
//! decided inside one script, so exactly one caller sees it. Every key a script touches is passed
//! in `KEYS`, and all of them share the partition's hash tag: one slot per call, so it runs on a
//! Redis Cluster as on one instance.

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::PresenceStore;
use crate::backend::BackendError;
use crate::keys::{KeySchema, PRESENCE_PARTITIONS};
use crate::redis_conn::Commands;

/// Users refreshed per script call.
const REFRESH_BATCH: usize = 500;

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

/// KEYS: deadlines. ARGV: batch. The users whose latest expiry passed (sweep candidates).
const DUE_LUA: &str = r#"
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"#;

/// KEYS: deadlines, then the user set of each candidate. ARGV: the candidates' ids. Returns the
/// candidates whose every entry expired, removing them from the deadlines: each is returned to
/// one caller only (a concurrent leave or sweep gets 0 from its ZREM). A candidate refreshed in
/// the meantime keeps its entries and gets its new deadline.
const SWEEP_LUA: &str = r#"
local gone = {}
for i = 2, #KEYS do
  local user = ARGV[i - 1]
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local top = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
  if #top == 0 then
    redis.call('DEL', KEYS[i])
    if redis.call('ZREM', KEYS[1], user) == 1 then gone[#gone + 1] = user end
  else
    redis.call('ZADD', KEYS[1], top[2], user)
  end
end
return gone
"#;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{NOW_LUA}{body}"))
}

fn uuids(ids: Vec<String>) -> Vec<Uuid> {
    ids.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect()
}

/// One node's presence in Redis.
pub struct RedisPresence {
    redis: Commands,
    keys: KeySchema,
    node_id: String,
    ttl_ms: u64,
    join: redis::Script,
    leave: redis::Script,
    refresh: redis::Script,
    due: redis::Script,
    sweep: redis::Script,
}

impl RedisPresence {
    /// Presence of node `node_id`, whose entries live `ttl` without a refresh.
    pub fn new(redis: Commands, keys: KeySchema, node_id: String, ttl: Duration) -> Self {
        RedisPresence {
            redis,
            keys,
            node_id,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            join: script(JOIN_LUA),
            leave: script(LEAVE_LUA),
            refresh: script(REFRESH_LUA),
            due: script(DUE_LUA),
            sweep: script(SWEEP_LUA),
        }
    }
}

impl RedisPresence {
    /// `users` grouped by presence partition, in partition order.
    fn by_partition<'a>(&self, users: impl Iterator<Item = &'a Uuid>) -> Vec<(u16, Vec<Uuid>)> {
        let mut groups: std::collections::BTreeMap<u16, Vec<Uuid>> = Default::default();
        for u in users {
            groups
                .entry(self.keys.presence_partition(*u))
                .or_default()
                .push(*u);
        }
        groups.into_iter().collect()
    }

    /// Sweeps partition `q`: up to `max` users whose every entry expired.
    async fn sweep_partition(&self, q: u16, max: usize) -> Result<Vec<Uuid>, BackendError> {
        let mut due = self.due.prepare_invoke();
        due.key(self.keys.presence_deadlines(q)).arg(max);
        let candidates = uuids(self.redis.invoke("command", &due).await?);
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.sweep.prepare_invoke();
        inv.key(self.keys.presence_deadlines(q));
        for u in &candidates {
            inv.key(self.keys.presence(*u));
        }
        for u in &candidates {
            inv.arg(u.to_string());
        }
        Ok(uuids(self.redis.invoke("command", &inv).await?))
    }
}

#[async_trait]
impl PresenceStore for RedisPresence {
    async fn join(&self, user: Uuid) -> Result<bool, BackendError> {
        let mut inv = self.join.prepare_invoke();
        inv.key(self.keys.presence(user))
            .key(
                self.keys
                    .presence_deadlines(self.keys.presence_partition(user)),
            )
            .arg(&self.node_id)
            .arg(self.ttl_ms)
            .arg(user.to_string());
        let came_online: i64 = self.redis.invoke("command", &inv).await?;
        Ok(came_online == 1)
    }

    async fn leave(&self, user: Uuid) -> Result<bool, BackendError> {
        let mut inv = self.leave.prepare_invoke();
        inv.key(self.keys.presence(user))
            .key(
                self.keys
                    .presence_deadlines(self.keys.presence_partition(user)),
            )
            .arg(&self.node_id)
            .arg(user.to_string());
        let went_offline: i64 = self.redis.invoke("command", &inv).await?;
        Ok(went_offline == 1)
    }

    async fn refresh(&self, users: &[Uuid]) -> Result<Vec<Uuid>, BackendError> {
        let mut revived = Vec::new();
        for (q, group) in self.by_partition(users.iter()) {
            for batch in group.chunks(REFRESH_BATCH) {
                let mut inv = self.refresh.prepare_invoke();
                inv.key(self.keys.presence_deadlines(q));
                for u in batch {
                    inv.key(self.keys.presence(*u));
                }
                inv.arg(&self.node_id).arg(self.ttl_ms);
                for u in batch {
                    inv.arg(u.to_string());
                }
                let ids: Vec<String> = self.redis.invoke("command", &inv).await?;
                revived.extend(uuids(ids));
            }
        }
        Ok(revived)
    }

    async fn sweep(&self, max: usize) -> Result<Vec<Uuid>, BackendError> {
        let mut gone = Vec::new();
        for q in 0..PRESENCE_PARTITIONS {
            if gone.len() >= max {
                break;
            }
            gone.extend(self.sweep_partition(q, max - gone.len()).await?);
        }
        Ok(gone)
    }

    async fn online(&self, users: &[Uuid]) -> Result<Vec<bool>, BackendError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let now = crate::now_ms() as f64;
        let mut online: std::collections::HashMap<Uuid, bool> = Default::default();
        let reads = self
            .by_partition(users.iter())
            .into_iter()
            .map(|(q, group)| async move {
                let mut pipe = redis::pipe();
                pipe.cmd("ZMSCORE").arg(self.keys.presence_deadlines(q));
                for u in &group {
                    pipe.arg(u.to_string());
                }
                let (scores,): (Vec<Option<f64>>,) = self.redis.query("command", &pipe).await?;
                Ok::<_, BackendError>(group.into_iter().zip(scores).collect::<Vec<_>>())
            });
        for group in futures_util::future::join_all(reads).await {
            for (u, score) in group? {
                online.insert(u, score.is_some_and(|s| s > now));
            }
        }
        Ok(users
            .iter()
            .map(|u| online.get(u).copied().unwrap_or(false))
            .collect())
    }
}
