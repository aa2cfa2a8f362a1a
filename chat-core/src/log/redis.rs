//! The message log on Redis: one stream per partition (the entries the workers drain), a seq
//! counter, a tail stream and the idempotency records per conversation, all in the
//! conversation's partition slot. An append is one script round trip that also publishes the
//! message envelope; the workers read each partition with the consumer group `persistence`.
//!
//! No seq is issued twice, whatever Redis loses: each partition has an epoch, opened anew when
//! Redis lost it (a flush, an empty restart) or does not know the scripts (any restart or
//! failover), and a counter issues seqs only in the epoch it was validated in, after a re-base
//! above what Postgres holds (see `docs/architecture.md`, "When Redis loses data").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_protocol::{MessageFrame, ServerFrame};
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, Value};
use uuid::Uuid;

use super::{
    ClaimPage, DecodeError, Durability, LogConsumer, LogEntry, MessageLog, PartitionReader,
    PartitionStats, ReadFrom, Retention, SeqFloor,
};
use crate::backend::BackendError;
use crate::keys::{KeySchema, PERSISTENCE_GROUP};
use crate::message::{Appended, NewMessage, StoredMessage};
use crate::pubsub::envelope::{message_header_around_seq, Envelope};
use crate::redis_conn::{Commands, Conn, RedisTarget};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

/// Field names of a stream entry. Short, because every message carries them.
pub mod field {
    pub const MSG_ID: &str = "msg_id";
    pub const CONVERSATION: &str = "conv";
    pub const SEQ: &str = "seq";
    pub const FROM: &str = "from";
    pub const TO: &str = "to";
    pub const BODY: &str = "body";
    pub const TS: &str = "ts";
    /// The W3C `traceparent` of the gateway span that accepted the message, when traced.
    pub const TRACE_PARENT: &str = "tp";
}

/// Unless the sender's client id was appended in this conversation within the dedup window
/// (then it answers the original seq, msg_id and ts, and only refreshes the record), checks that the
/// partition has an epoch (`{-1}` when not), that the conversation's counter was validated in it
/// (`{-2}` when not: it must be re-based first) and that the partition holds fewer than the
/// backlog bound (`{-3}` when full); then assigns the next seq, appends the entry to the
/// partition stream and to the conversation's tail, records a direct conversation's members
/// with its first message, remembers the client id, and publishes the message envelope to every
/// channel given (both users' channels, or the room's). Every key is in one slot: KEYS[1] the
/// counter, KEYS[2] the partition stream, KEYS[3] the tail, KEYS[4] the pair, KEYS[5] the client
/// id's record, KEYS[6] the partition's epoch. ARGV: 1-6 the entry's fields, 7-8 the frame around
/// the seq, 9-10 the envelope header around the seq, 11-13 the tail length, tail TTL and dedup
/// window, 14 the pair (empty in rooms), 15 the traceparent (empty when not traced), 16 the
/// backlog bound, 17 the tail's byte bound, then the channels. The tail is a cache: if its XADD
/// fails (its last id is above `seq`), the message is still accepted, and history reads notice
/// the hole.
///
/// The tail is bounded in messages and in bytes (its frames' sizes, kept in the counter's `tb`
/// field, reset when the tail was empty: it expired or was lost). Over 110% of the message
/// bound, or over the byte bound, its oldest frames are trimmed (never the newest) down to the
/// message bound and 90% of the byte bound: one XRANGE and one XTRIM every so many appends, and
/// one XLEN and one HINCRBY on every other.
const APPEND_LUA: &str = r#"
local prior = redis.call('GET', KEYS[5])
if prior then
  -- A write, so that a WAIT after this script also covers the original append.
  redis.call('PEXPIRE', KEYS[5], ARGV[13])
  local seq, msg_id, ts = string.match(prior, '^(%d+):([^:]+):(%d+)$')
  return {tonumber(seq), msg_id, tonumber(ts)}
end
local epoch = redis.call('GET', KEYS[6])
if not epoch then return {-1} end
if redis.call('HGET', KEYS[1], 'e') ~= epoch then return {-2} end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[16]) then return {-3} end
local seq = redis.call('HINCRBY', KEYS[1], 'n', 1)
local entry = {'msg_id', ARGV[1], 'conv', ARGV[2], 'seq', seq, 'from', ARGV[3], 'to', ARGV[4],
  'body', ARGV[5], 'ts', ARGV[6]}
if ARGV[15] ~= '' then
  entry[#entry + 1] = 'tp'
  entry[#entry + 1] = ARGV[15]
end
redis.call('XADD', KEYS[2], '*', unpack(entry))
local frame = ARGV[7] .. seq .. ARGV[8]
local added = redis.pcall('XADD', KEYS[3], seq .. '-0', 'f', frame)
if not (type(added) == 'table' and added.err) then
  local len = redis.call('XLEN', KEYS[3])
  local bytes = #frame
  if len == 1 then redis.call('HSET', KEYS[1], 'tb', bytes)
  else bytes = redis.call('HINCRBY', KEYS[1], 'tb', bytes) end
  local max_len, max_bytes = tonumber(ARGV[11]), tonumber(ARGV[17])
  if len > max_len + math.floor(max_len / 10) or bytes > max_bytes then
    local keep_bytes = math.floor(max_bytes * 9 / 10)
    local last, dropped, start = nil, 0, '-'
    repeat
      local batch = redis.call('XRANGE', KEYS[3], start, '+', 'COUNT', 100)
      local more = #batch == 100
      for _, e in ipairs(batch) do
        if len - dropped <= 1 or (len - dropped <= max_len and bytes <= keep_bytes) then
          more = false
          break
        end
        bytes = bytes - #e[2][2]
        dropped = dropped + 1
        last = e[1]
      end
      if last then start = '(' .. last end
    until not more
    if last then
      redis.call('XTRIM', KEYS[3], 'MINID', (tonumber(string.match(last, '^(%d+)')) + 1) .. '-0')
      redis.call('HSET', KEYS[1], 'tb', bytes)
    end
  end
end
redis.call('PEXPIRE', KEYS[3], ARGV[12])
if seq == 1 and ARGV[14] ~= '' then redis.call('SET', KEYS[4], ARGV[14]) end
redis.call('SET', KEYS[5], seq .. ':' .. ARGV[1] .. ':' .. ARGV[6], 'PX', ARGV[13])
local payload = ARGV[9] .. seq .. ARGV[10] .. '\n' .. frame
for i = 18, #ARGV do redis.call('PUBLISH', ARGV[i], payload) end
return {seq}
"#;

/// Validates a conversation's counter in the partition's current epoch: unless the epoch is no
/// longer ARGV[1] (`0`: read again) or another process validated it already (`1`), sets the
/// counter to at least ARGV[2], records the epoch, publishes ARGV[3] (the `rebased` event, when
/// seqs were skipped) to the channels ARGV[4..], and answers `2`. KEYS[1] the counter, KEYS[2]
/// the epoch.
const REBASE_LUA: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'e') == ARGV[1] then return 1 end
local target = tonumber(ARGV[2])
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
if n > target then target = n end
redis.call('HSET', KEYS[1], 'n', target, 'e', ARGV[1])
if ARGV[3] ~= '' then
  for i = 4, #ARGV do redis.call('PUBLISH', ARGV[i], ARGV[3]) end
end
return 2
"#;

/// What the append script answered.
#[derive(Debug, PartialEq, Eq)]
enum AppendReply {
    Done(Appended),
    /// The partition has no epoch: Redis lost it (a flush, or an empty restart).
    NoEpoch,
    /// The counter was not validated in the current epoch.
    Unvalidated,
    /// The partition holds the backlog bound.
    BacklogFull,
}

/// The script's reply.
fn append_reply(v: &Value) -> redis::RedisResult<AppendReply> {
    let malformed = || {
        redis::RedisError::from((
            redis::ErrorKind::TypeError,
            "unexpected append script reply",
        ))
    };
    let parts: Vec<Value> = redis::FromRedisValue::from_redis_value(v)?;
    match parts.as_slice() {
        [seq] => match redis::FromRedisValue::from_redis_value(seq)? {
            -1i64 => Ok(AppendReply::NoEpoch),
            -2 => Ok(AppendReply::Unvalidated),
            -3 => Ok(AppendReply::BacklogFull),
            seq if seq > 0 => Ok(AppendReply::Done(Appended::New { seq })),
            _ => Err(malformed()),
        },
        [seq, msg_id, ts] => {
            let msg_id: String = redis::FromRedisValue::from_redis_value(msg_id)?;
            Ok(AppendReply::Done(Appended::Repeat {
                seq: redis::FromRedisValue::from_redis_value(seq)?,
                msg_id: Uuid::parse_str(&msg_id).map_err(|_| malformed())?,
                ts: redis::FromRedisValue::from_redis_value(ts)?,
            }))
        }
        _ => Err(malformed()),
    }
}

/// One of the log's scripts for partition `p` of the deployment of `keys`. The prefix and the
/// partition in its text make its hash the partition's own: after a restart or a failover each
/// partition meets `NOSCRIPT` by itself and opens its own epoch before its script is loaded
/// (on the master that owns it, and only there), so no partition appends in an old epoch on a
/// new process. On a cluster the channels are shard channels in the script's own slot.
fn script(body: &str, keys: &KeySchema, p: u16) -> LogScript {
    let body = if keys.is_cluster() {
        body.replace("'PUBLISH'", "'SPUBLISH'")
    } else {
        body.to_string()
    };
    let text = format!("-- chat log {} p{p}\n{body}", keys.prefix());
    LogScript {
        script: redis::Script::new(&text),
        text,
    }
}

/// A script and its text (loaded by hand, on the partition's master only).
struct LogScript {
    script: redis::Script,
    text: String,
}

/// The log's two scripts for one partition.
struct Scripts {
    append: LogScript,
    rebase: LogScript,
}

/// `EVALSHA` of `script` on `keys`; the caller adds the arguments.
fn evalsha(script: &redis::Script, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
}

/// The margin of an epoch value (`<token>:<margin>[:<run_id>]`).
fn epoch_margin(value: &str) -> Option<u64> {
    value.split(':').nth(1)?.parse().ok()
}

/// The Redis process an epoch was opened on (`<token>:<margin>:<run_id>`; none in epochs of
/// 0.3 and earlier).
fn epoch_run(value: &str) -> Option<&str> {
    value.split(':').nth(2).filter(|r| !r.is_empty())
}

/// Replaces the epoch (KEYS[1]) with ARGV[2] only if it still holds ARGV[1] (or is missing
/// when ARGV[1] is empty): of several gateways that met `NOSCRIPT` at once, one opens the new
/// epoch and the others keep it.
const REPLACE_EPOCH_LUA: &str = r#"
local current = redis.call('GET', KEYS[1])
if (current or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"#;

/// Where a re-base moves a counter: above every seq Redis still knows (`known`), and, when seqs
/// may have been lost (`margin` > 0), above every seq that can have been issued: no conversation
/// has more than `margin` seqs beyond what Postgres held when they were issued. Returns the new
/// counter and the skipped range, if any.
pub fn rebase_target(known: i64, persisted: i64, margin: u64) -> (i64, Option<(i64, i64)>) {
    let known = known.max(persisted);
    if margin == 0 {
        return (known, None);
    }
    let above = persisted.saturating_add(i64::try_from(margin).unwrap_or(i64::MAX));
    if above > known {
        (above, Some((known + 1, above)))
    } else {
        (known, None)
    }
}

/// A counter as `HMGET n e` reads it: the last seq, and the epoch it was validated in.
type Counter = (Option<i64>, Option<String>);

/// Longest a caller waits through re-bases and epoch changes before it is told `unavailable`.
const MAX_APPEND_ROUNDS: usize = 4;

/// The gateway's side of the log on Redis.
#[derive(Clone)]
pub struct RedisLog {
    redis: Commands,
    keys: KeySchema,
    retention: Retention,
    floor: Arc<dyn SeqFloor>,
    /// Per partition.
    scripts: Arc<[Scripts]>,
    /// Epochs this process marked used (each is marked once, before its first seq).
    marked: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    durability: Durability,
}

impl RedisLog {
    /// The log on `redis`; `floor` is the durable store it re-bases counters against.
    pub fn new(
        redis: Commands,
        keys: KeySchema,
        retention: Retention,
        floor: Arc<dyn SeqFloor>,
    ) -> Self {
        RedisLog {
            redis,
            retention: Retention {
                dedup_window_ms: retention.dedup_window_ms.max(1),
                max_backlog: retention.max_backlog.max(1),
                ..retention
            },
            floor,
            scripts: (0..keys.partitions())
                .map(|p| Scripts {
                    append: script(APPEND_LUA, &keys, p),
                    rebase: script(REBASE_LUA, &keys, p),
                })
                .collect(),
            marked: Arc::default(),
            durability: Durability::Leader,
            keys,
        }
    }

    /// Acks only what `durability` promises.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    fn event(&self, event: &str) {
        if let Some(m) = self.redis.metrics() {
            m.log_events.with_label_values(&[event]).inc();
        }
    }

    /// Runs `cmd` (an [`evalsha`] of one of the log's scripts). A Redis that does not know the
    /// script is a new process (a restart or a failover): whatever it lost, the counters it
    /// holds may be behind, so every partition gets a new epoch before the scripts are loaded,
    /// and nothing is appended in the old ones.
    async fn eval(&self, label: &str, p: u16, cmd: &redis::Cmd) -> Result<Value, BackendError> {
        Ok(self.eval_waited(label, p, cmd, None).await?.0)
    }

    /// [`Self::eval`], followed on the same connection (one pipeline) by `WAIT` for `wait`
    /// replicas when given: its reply, the replicas that confirmed everything this connection
    /// wrote up to the script, comes second. `cmd` runs one of partition `p`'s scripts.
    async fn eval_waited(
        &self,
        label: &str,
        p: u16,
        cmd: &redis::Cmd,
        wait: Option<(u32, u64)>,
    ) -> Result<(Value, Option<i64>), BackendError> {
        let pipe = wait.map(|(replicas, timeout_ms)| {
            let mut pipe = redis::pipe();
            pipe.add_command(cmd.clone())
                .cmd("WAIT")
                .arg(replicas)
                .arg(timeout_ms);
            pipe
        });
        let once = || {
            self.redis.run(label, |mut conn| {
                let pipe = pipe.as_ref();
                async move {
                    let reply = match pipe {
                        None => cmd.query_async::<Value>(&mut conn).await.map(|v| (v, None)),
                        Some(pipe) => pipe
                            .query_async::<(Value, i64)>(&mut conn)
                            .await
                            .map(|(v, w)| (v, Some(w))),
                    };
                    match reply {
                        Err(e) if e.kind() == redis::ErrorKind::NoScriptError => Ok(None),
                        other => other.map(Some),
                    }
                }
            })
        };
        if let Some(reply) = once().await? {
            return Ok(reply);
        }
        tracing::warn!(
            partition = p,
            "redis does not know the partition's scripts (restarted or failed over); opening a new epoch"
        );
        self.reopen_epoch(p).await?;
        let scripts = &self.scripts[usize::from(p)];
        let slot = self.keys.partition_slot(p);
        for script in [&scripts.append, &scripts.rebase] {
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(&script.text);
            let _: Value = self
                .redis
                .run("command", |conn| async move {
                    match conn {
                        // Only the partition's master: a replica that had the script would
                        // skip the new epoch when it is promoted.
                        Conn::Cluster(mut c) => {
                            c.route_command(
                                &load,
                                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                                    Route::new(slot, SlotAddr::Master),
                                )),
                            )
                            .await
                        }
                        mut conn => load.query_async(&mut conn).await,
                    }
                })
                .await?;
        }
        once()
            .await?
            .ok_or_else(|| BackendError::Unavailable("redis lost the log's scripts again".into()))
    }

    /// The `run_id` of the Redis process that holds partition `p` (its master on a cluster).
    async fn run_id(&self, p: u16) -> Result<String, BackendError> {
        let slot = self.keys.partition_slot(p);
        let info: String = self
            .redis
            .run("command", |conn| async move {
                let mut info = redis::cmd("INFO");
                info.arg("server");
                match conn {
                    Conn::Cluster(mut c) => c
                        .route_command(
                            &info,
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                                Route::new(slot, SlotAddr::Master),
                            )),
                        )
                        .await
                        .and_then(|v| redis::from_redis_value(&v)),
                    mut conn => info.query_async(&mut conn).await,
                }
            })
            .await?;
        crate::redis_conn::info_field(&info, "run_id")
            .map(str::to_string)
            .ok_or_else(|| BackendError::Unavailable("redis reported no run_id".into()))
    }

    /// After `NOSCRIPT`: a new epoch for partition `p`, unless one was already opened on this
    /// Redis process (another gateway met `NOSCRIPT` first and has not loaded the scripts yet).
    /// The epoch carries the process's `run_id`, and is replaced only if it still holds what
    /// was read, so gateways that meet `NOSCRIPT` at once open one epoch between them.
    async fn reopen_epoch(&self, p: u16) -> Result<(), BackendError> {
        let run = self.run_id(p).await?;
        let key = self.keys.epoch(p);
        let mut get = redis::pipe();
        get.cmd("GET").arg(&key);
        let (current,): (Option<String>,) = self.redis.query("command", &get).await?;
        let current = current.unwrap_or_default();
        if epoch_run(&current) == Some(run.as_str()) {
            tracing::info!(
                partition = p,
                "log epoch already opened on this redis process"
            );
            return Ok(());
        }
        self.open_epoch_as(p, &run, Some(&current)).await
    }

    /// Opens a new epoch of partition `p` (recorded in Postgres first), only where the epoch
    /// is missing, so concurrent openers agree on one.
    async fn open_epoch(&self, p: u16) -> Result<(), BackendError> {
        let run = self.run_id(p).await?;
        self.open_epoch_as(p, &run, None).await
    }

    /// Opens epoch `<token>:<margin>:<run>` where the key holds `replacing` (`None`: where it
    /// is missing).
    async fn open_epoch_as(
        &self,
        p: u16,
        run: &str,
        replacing: Option<&str>,
    ) -> Result<(), BackendError> {
        let token = Uuid::new_v4().simple().to_string();
        let used = self.floor.open_epoch(self.keys.prefix(), p, &token).await?;
        let margin = if used { self.retention.max_backlog } else { 0 };
        let value = format!("{token}:{margin}:{run}");
        let script = redis::Script::new(REPLACE_EPOCH_LUA);
        let mut inv = script.prepare_invoke();
        inv.key(self.keys.epoch(p))
            .arg(replacing.unwrap_or_default())
            .arg(&value);
        let opened: i64 = self.redis.invoke("command", &inv).await?;
        if opened == 1 {
            self.event("epoch_opened");
            tracing::info!(partition = p, margin, "log epoch opened");
        }
        Ok(())
    }

    /// Validates `msg`'s conversation counter in the current epoch: above what Redis knows and
    /// what Postgres holds, and, when the epoch says seqs may have been lost, above every seq
    /// that can have been issued. The skipped range is announced to the conversation's topics
    /// (`rebased`) and recorded for history.
    async fn rebase(&self, msg: &NewMessage) -> Result<(), BackendError> {
        let conv = msg.conversation_id;
        let p = self.keys.partition_of(conv);
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(self.keys.seq_counter(conv))
            .arg("n")
            .arg("e")
            .cmd("GET")
            .arg(self.keys.legacy_seq(conv))
            .cmd("GET")
            .arg(self.keys.epoch(p));
        let (counter, legacy, epoch): (Counter, Option<i64>, Option<String>) =
            self.redis.query("command", &pipe).await?;
        let (n, validated) = counter;
        let Some(epoch) = epoch else {
            return self.open_epoch(p).await;
        };
        if validated.as_deref() == Some(epoch.as_str()) {
            return Ok(());
        }
        let persisted = self.floor.persisted_last_seq(conv).await?;
        let margin = epoch_margin(&epoch).unwrap_or(self.retention.max_backlog);
        let unmarked = !self
            .marked
            .lock()
            .map(|m| m.contains(&epoch))
            .unwrap_or(false);
        if unmarked {
            self.floor.mark_used(self.keys.prefix(), p, &epoch).await?;
            if let Ok(mut marked) = self.marked.lock() {
                if marked.len() >= 4096 {
                    marked.clear();
                }
                marked.insert(epoch.clone());
            }
        }
        let known = n.unwrap_or(0).max(legacy.unwrap_or(0));
        let (target, gap) = rebase_target(known, persisted, margin);
        let payload = gap
            .map(|(lo, hi)| {
                Envelope::event(
                    Uuid::nil(),
                    ServerFrame::Rebased {
                        conversation_id: conv,
                        from_seq: lo,
                        to_seq: hi,
                    },
                )
                .encode()
            })
            .unwrap_or_default();
        let mut cmd = evalsha(
            &self.scripts[usize::from(p)].rebase.script,
            &[self.keys.seq_counter(conv), self.keys.epoch(p)],
        );
        cmd.arg(epoch).arg(target).arg(payload);
        for topic in msg.topics() {
            cmd.arg(self.keys.channel_in(topic, p));
        }
        let applied: i64 =
            redis::FromRedisValue::from_redis_value(&self.eval("command", p, &cmd).await?)?;
        if applied == 2 {
            self.event("rebased");
            if let Some((lo, hi)) = gap {
                tracing::warn!(conversation = %conv, lo, hi, "seq counter re-based above seqs Redis may have lost");
                // Without the record history still skips the range, one page at a time.
                if let Err(e) = self.floor.record_gap(conv, lo, hi).await {
                    tracing::warn!(conversation = %conv, error = %e, "skipped seq range not recorded");
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl MessageLog for RedisLog {
    async fn append(
        &self,
        msg: &NewMessage,
        client_id: &str,
        origin: Uuid,
    ) -> Result<Appended, BackendError> {
        let (frame_head, frame_tail) = msg.frame_around_seq();
        let (env_head, env_tail) = message_header_around_seq(
            origin,
            msg.conversation_id,
            msg.ts,
            msg.trace_parent.as_deref(),
        );
        let conv = msg.conversation_id;
        let p = self.keys.partition_of(conv);
        let pair = msg
            .to
            .map(|to| {
                let (low, high) = if msg.from <= to {
                    (msg.from, to)
                } else {
                    (to, msg.from)
                };
                format!("{low}:{high}")
            })
            .unwrap_or_default();
        let mut cmd = evalsha(
            &self.scripts[usize::from(p)].append.script,
            &[
                self.keys.seq_counter(conv),
                self.keys.stream(p),
                self.keys.tail(conv),
                self.keys.pair(conv),
                self.keys.sent(conv, msg.from, client_id),
                self.keys.epoch(p),
            ],
        );
        cmd.arg(msg.msg_id.to_string())
            .arg(conv.to_string())
            .arg(msg.from.to_string())
            .arg(msg.to.map(|t| t.to_string()).unwrap_or_default())
            .arg(msg.body.as_str())
            .arg(msg.ts)
            .arg(frame_head)
            .arg(frame_tail)
            .arg(env_head)
            .arg(env_tail)
            .arg(self.retention.tail_len)
            .arg(self.retention.tail_ttl_ms)
            .arg(self.retention.dedup_window_ms)
            .arg(pair)
            .arg(msg.trace_parent.as_deref().unwrap_or_default())
            .arg(self.retention.max_backlog)
            .arg(self.retention.tail_max_bytes);
        for topic in msg.topics() {
            cmd.arg(self.keys.channel_in(topic, p));
        }
        let wait = match self.durability {
            Durability::Leader => None,
            Durability::Replicas { count, timeout } => Some((
                count,
                u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            )),
        };
        for _ in 0..MAX_APPEND_ROUNDS {
            let (reply, confirmed) = self.eval_waited("append", p, &cmd, wait).await?;
            match append_reply(&reply)? {
                AppendReply::Done(appended) => {
                    if let (Some((count, _)), Some(confirmed)) = (wait, confirmed) {
                        if confirmed < i64::from(count) {
                            self.event("replicas_short");
                            return Err(BackendError::Unavailable(format!(
                                "{confirmed} of {count} replicas confirmed the append in time"
                            )));
                        }
                    }
                    return Ok(appended);
                }
                AppendReply::NoEpoch => {
                    tracing::warn!(partition = p, "log partition has no epoch (Redis lost its data, or this is its first use)");
                    self.open_epoch(p).await?
                }
                AppendReply::Unvalidated => self.rebase(msg).await?,
                AppendReply::BacklogFull => {
                    self.event("backlog_full");
                    return Err(BackendError::Unavailable(format!(
                        "log partition {p} holds {} entries not yet drained",
                        self.retention.max_backlog
                    )));
                }
            }
        }
        Err(BackendError::Unavailable(
            "the log's epoch kept changing".into(),
        ))
    }

    async fn last_seq(&self, conversation: Uuid) -> Result<i64, BackendError> {
        let p = self.keys.partition_of(conversation);
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(self.keys.seq_counter(conversation))
            .arg("n")
            .arg("e")
            .cmd("GET")
            .arg(self.keys.epoch(p));
        let ((n, validated), epoch): (Counter, Option<String>) =
            self.redis.query("command", &pipe).await?;
        let n = n.unwrap_or(0);
        if epoch.is_some() && validated == epoch {
            return Ok(n);
        }
        // Not validated since Redis lost or restored data: what it says may be behind.
        Ok(n.max(self.floor.persisted_last_seq(conversation).await?))
    }

    async fn recent(
        &self,
        conversation: Uuid,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<MessageFrame>, BackendError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(self.keys.tail(conversation))
            .arg(format!("{lo}-0"))
            .arg(format!("{hi}-0"));
        let (reply,): (StreamRangeReply,) = self.redis.query("command", &pipe).await?;
        Ok(reply
            .ids
            .iter()
            .filter_map(|entry| match entry.map.get("f") {
                Some(Value::BulkString(bytes)) => {
                    serde_json::from_slice::<MessageFrame>(bytes).ok()
                }
                _ => None,
            })
            .collect())
    }

    async fn direct_pair(&self, conversation: Uuid) -> Result<Option<(Uuid, Uuid)>, BackendError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.keys.pair(conversation));
        let (text,): (Option<String>,) = self.redis.query("command", &pipe).await?;
        Ok(text.and_then(|text| {
            let (a, b) = text.split_once(':')?;
            Some((Uuid::parse_str(a).ok()?, Uuid::parse_str(b).ok()?))
        }))
    }

    async fn in_flight(&self, conversation: Uuid, seqs: &[i64]) -> Result<bool, BackendError> {
        if seqs.is_empty() {
            return Ok(false);
        }
        let script = redis::Script::new(IN_FLIGHT_LUA);
        let mut inv = script.prepare_invoke();
        inv.key(self.keys.stream(self.keys.partition_of(conversation)))
            .arg(PERSISTENCE_GROUP)
            .arg(conversation.to_string());
        for seq in seqs {
            inv.arg(*seq);
        }
        let found: i64 = self.redis.invoke("command", &inv).await?;
        Ok(found == 1)
    }
}

/// Whether one of the given seqs of a conversation is pending in the persistence group (the
/// first 1,000 pending entries of the partition are looked at). KEYS[1] the partition's stream;
/// ARGV[1] the group, ARGV[2] the conversation, ARGV[3..] the seqs.
const IN_FLIGHT_LUA: &str = r#"
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1000)
if not ok then return 0 end
local want = {}
for i = 3, #ARGV do want[ARGV[i]] = true end
for _, p in ipairs(pending) do
  local e = redis.call('XRANGE', KEYS[1], p[1], p[1])
  if e[1] then
    local f, conv, seq = e[1][2], nil, nil
    for j = 1, #f, 2 do
      if f[j] == 'conv' then conv = f[j + 1] elseif f[j] == 'seq' then seq = f[j + 1] end
    end
    if conv == ARGV[2] and want[seq] then return 1 end
  end
end
return 0
"#;

/// Decodes one stream entry's field map.
pub fn decode_entry(fields: &HashMap<String, Value>) -> Result<StoredMessage, DecodeError> {
    fn text(fields: &HashMap<String, Value>, name: &'static str) -> Result<String, DecodeError> {
        match fields.get(name) {
            Some(Value::BulkString(bytes)) => {
                String::from_utf8(bytes.clone()).map_err(|_| DecodeError::Malformed(name))
            }
            Some(Value::SimpleString(s)) => Ok(s.clone()),
            Some(_) => Err(DecodeError::Malformed(name)),
            None => Err(DecodeError::Missing(name)),
        }
    }
    fn uuid(fields: &HashMap<String, Value>, name: &'static str) -> Result<Uuid, DecodeError> {
        Uuid::parse_str(&text(fields, name)?).map_err(|_| DecodeError::Malformed(name))
    }
    fn int(fields: &HashMap<String, Value>, name: &'static str) -> Result<i64, DecodeError> {
        text(fields, name)?
            .parse()
            .map_err(|_| DecodeError::Malformed(name))
    }
    Ok(StoredMessage {
        msg_id: uuid(fields, field::MSG_ID)?,
        conversation_id: uuid(fields, field::CONVERSATION)?,
        seq: int(fields, field::SEQ)?,
        from: uuid(fields, field::FROM)?,
        to: match text(fields, field::TO)?.as_str() {
            "" => None,
            to => Some(Uuid::parse_str(to).map_err(|_| DecodeError::Malformed(field::TO))?),
        },
        body: text(fields, field::BODY)?,
        ts: int(fields, field::TS)?,
    })
}

fn entry(stream_id: StreamId) -> LogEntry {
    let trace_parent = match stream_id.map.get(field::TRACE_PARENT) {
        Some(Value::BulkString(bytes)) => String::from_utf8(bytes.clone()).ok(),
        Some(Value::SimpleString(s)) => Some(s.clone()),
        _ => None,
    };
    let message = decode_entry(&stream_id.map);
    let raw = stream_id
        .map
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::BulkString(bytes) => Some((k, bytes)),
            _ => None,
        })
        .collect();
    LogEntry {
        id: stream_id.id,
        message,
        trace_parent,
        raw,
    }
}

/// The workers' side of the log on Redis.
#[derive(Clone)]
pub struct RedisLogConsumer {
    target: RedisTarget,
    keys: KeySchema,
    /// Reads block this long at most; connections allow for it.
    block: Duration,
}

impl RedisLogConsumer {
    /// A consumer of every partition of `keys` on `target` (one instance, or a cluster: each
    /// partition is read from the master that owns its slot, followed through failovers),
    /// whose blocking reads wait up to `block`.
    pub fn open(
        target: &RedisTarget,
        keys: KeySchema,
        block: Duration,
    ) -> Result<Self, BackendError> {
        for url in target.urls() {
            redis::Client::open(url)?;
        }
        Ok(RedisLogConsumer {
            target: target.clone(),
            keys,
            block,
        })
    }

    /// A connection of one partition reader's own (its blocking reads hold it).
    async fn connect(&self) -> Result<Conn, BackendError> {
        let response_timeout = self.block + Duration::from_secs(5);
        Ok(match &self.target {
            RedisTarget::Single(url) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Duration::from_secs(2))
                    .set_response_timeout(response_timeout);
                Conn::Multiplexed(
                    redis::Client::open(url.as_str())?
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
            RedisTarget::Cluster(seeds) => Conn::Cluster(
                RedisTarget::cluster_client(
                    seeds,
                    response_timeout,
                    None::<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
                )?
                .get_async_connection()
                .await?,
            ),
        })
    }
}

#[async_trait]
impl LogConsumer for RedisLogConsumer {
    fn partitions(&self) -> u16 {
        self.keys.partitions()
    }

    async fn reader(
        &self,
        partition: u16,
        consumer: &str,
    ) -> Result<Box<dyn PartitionReader>, BackendError> {
        let mut conn = self.connect().await?;
        let stream = self.keys.stream(partition);
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(PERSISTENCE_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created {
            if e.code() != Some("BUSYGROUP") {
                return Err(e.into());
            }
        }
        Ok(Box::new(RedisPartitionReader {
            conn,
            stream,
            dead_letter: self.keys.dead_letter(partition),
            consumer: consumer.to_string(),
        }))
    }
}

struct RedisPartitionReader {
    conn: Conn,
    stream: String,
    dead_letter: String,
    consumer: String,
}

#[async_trait]
impl PartitionReader for RedisPartitionReader {
    async fn read(&mut self, from: ReadFrom, count: usize) -> Result<Vec<LogEntry>, BackendError> {
        let mut opts = StreamReadOptions::default()
            .group(PERSISTENCE_GROUP, &self.consumer)
            .count(count);
        let start = match from {
            ReadFrom::Pending => "0",
            ReadFrom::New { block } => {
                opts = opts.block(block.as_millis() as usize);
                ">"
            }
        };
        let reply: Option<StreamReadReply> = self
            .conn
            .xread_options(&[self.stream.as_str()], &[start], &opts)
            .await?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).map(entry).collect())
            .unwrap_or_default())
    }

    async fn claim(
        &mut self,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<ClaimPage, BackendError> {
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(PERSISTENCE_GROUP)
            .arg(&self.consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn)
            .await?;
        // Deleted entries (trimmed while pending) cannot be written; nothing to ack for them.
        let next = (reply.next_stream_id != "0-0").then_some(reply.next_stream_id);
        Ok(ClaimPage {
            entries: reply.claimed.into_iter().map(entry).collect(),
            next,
        })
    }

    async fn ack(&mut self, ids: &[&str]) -> Result<u64, BackendError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let acked: i64 = self.conn.xack(&self.stream, PERSISTENCE_GROUP, ids).await?;
        Ok(acked.max(0) as u64)
    }

    async fn dead_letter(&mut self, entry: &LogEntry, reason: &str) -> Result<(), BackendError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.dead_letter)
            .arg("*")
            .arg("source_id")
            .arg(&entry.id)
            .arg("reason")
            .arg(reason);
        for (k, v) in &entry.raw {
            cmd.arg(k).arg(v.as_slice());
        }
        let _: String = cmd.query_async(&mut self.conn).await?;
        // Acked here: an entry that cannot be written is never in a committed batch.
        let _: i64 = self
            .conn
            .xack(&self.stream, PERSISTENCE_GROUP, &[entry.id.as_str()])
            .await?;
        Ok(())
    }

    async fn trim(&mut self, retention: Duration) -> Result<PartitionStats, BackendError> {
        let pending: Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(PERSISTENCE_GROUP)
            .query_async(&mut self.conn)
            .await?;
        let (count, oldest) = parse_pending_summary(&pending);
        let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(&mut self.conn)
            .await?;
        let last_delivered = groups
            .iter()
            .find(|g| value_text(g.get("name")).as_deref() == Some(PERSISTENCE_GROUP))
            .and_then(|g| value_text(g.get("last-delivered-id")))
            .and_then(|id| parse_stream_id(&id));
        let now_ms = u64::try_from(crate::now_ms()).unwrap_or(0);
        let retention_floor = (
            now_ms.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX)),
            0,
        );
        // Below the oldest pending entry, or (none pending) what the group has read, every
        // entry is acked.
        let acked_floor = match (oldest.as_deref().and_then(parse_stream_id), last_delivered) {
            (Some(p), _) => Some(p),
            (None, Some(d)) => Some(d),
            (None, None) => None,
        };
        if let Some(floor) = acked_floor {
            let min_id = floor.min(retention_floor);
            let _: i64 = redis::cmd("XTRIM")
                .arg(&self.stream)
                .arg("MINID")
                .arg(format!("{}-{}", min_id.0, min_id.1))
                .query_async(&mut self.conn)
                .await?;
        }
        let length: i64 = self.conn.xlen(&self.stream).await?;
        let age = oldest
            .as_deref()
            .and_then(parse_stream_id)
            .map(|(ms, _)| now_ms.saturating_sub(ms) / 1000)
            .unwrap_or(0);
        Ok(PartitionStats {
            pending: count,
            length,
            oldest_pending_age_secs: age as i64,
        })
    }
}

fn value_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `XPENDING key group` summary: (count, smallest pending id).
fn parse_pending_summary(v: &Value) -> (i64, Option<String>) {
    match v {
        Value::Array(items) if !items.is_empty() => {
            let count = match &items[0] {
                Value::Int(n) => *n,
                _ => 0,
            };
            (count, value_text(items.get(1)))
        }
        _ => (0, None),
    }
}

/// `"1700000000000-3"` → `(1700000000000, 3)`.
fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A re-base never goes below what Redis or Postgres knows; with a margin it goes above
    /// Postgres by the margin and names the skipped range.
    #[test]
    fn rebase_targets() {
        assert_eq!(
            rebase_target(0, 0, 0),
            (0, None),
            "a new deployment starts at 1"
        );
        assert_eq!(rebase_target(7, 3, 0), (7, None));
        assert_eq!(rebase_target(3, 7, 0), (7, None));
        assert_eq!(rebase_target(3, 5, 1000), (1005, Some((6, 1005))));
        assert_eq!(rebase_target(0, 0, 1000), (1000, Some((1, 1000))));
        assert_eq!(
            rebase_target(5000, 5, 1000),
            (5000, None),
            "already above every issued seq"
        );
        assert_eq!(epoch_margin("0a1b:1000000"), Some(1_000_000));
        assert_eq!(epoch_margin("garbage"), None);
    }

    /// The script's status replies and its two kinds of answer parse; anything else is an error.
    #[test]
    fn append_replies_parse() {
        let int = |n: i64| Value::Array(vec![Value::Int(n)]);
        assert_eq!(append_reply(&int(-1)).ok(), Some(AppendReply::NoEpoch));
        assert_eq!(append_reply(&int(-2)).ok(), Some(AppendReply::Unvalidated));
        assert_eq!(append_reply(&int(-3)).ok(), Some(AppendReply::BacklogFull));
        assert_eq!(
            append_reply(&int(9)).ok(),
            Some(AppendReply::Done(Appended::New { seq: 9 }))
        );
        assert!(append_reply(&int(0)).is_err());
        let id = Uuid::now_v7();
        let repeat = Value::Array(vec![
            Value::Int(4),
            Value::BulkString(id.to_string().into_bytes()),
            Value::Int(77),
        ]);
        assert_eq!(
            append_reply(&repeat).ok(),
            Some(AppendReply::Done(Appended::Repeat {
                seq: 4,
                msg_id: id,
                ts: 77
            }))
        );
    }

    /// Stream ids order numerically, not as text.
    #[test]
    fn stream_ids_parse_and_order() {
        let a = parse_stream_id("999-5").expect("id");
        let b = parse_stream_id("1000-0").expect("id");
        assert!(a < b);
        assert_eq!(parse_stream_id("nope"), None);
    }

    /// An entry decodes into the message it was written from; a missing field is named.
    #[test]
    fn entries_decode() {
        let msg = NewMessage {
            msg_id: Uuid::now_v7(),
            conversation_id: Uuid::new_v4(),
            from: Uuid::now_v7(),
            to: None,
            body: "hi".into(),
            ts: 5,
            trace_parent: None,
        };
        let bulk = |s: String| Value::BulkString(s.into_bytes());
        let mut fields: HashMap<String, Value> = [
            (field::MSG_ID, bulk(msg.msg_id.to_string())),
            (field::CONVERSATION, bulk(msg.conversation_id.to_string())),
            (field::SEQ, bulk("3".into())),
            (field::FROM, bulk(msg.from.to_string())),
            (field::TO, bulk(String::new())),
            (field::BODY, bulk("hi".into())),
            (field::TS, bulk("5".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(decode_entry(&fields), Ok(msg.stored(3)));
        fields.remove(field::BODY);
        assert_eq!(decode_entry(&fields), Err(DecodeError::Missing("body")));
    }
}
