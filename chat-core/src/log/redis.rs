//! The message log on Redis: one stream per partition (the entries the workers drain), a seq
//! counter, a tail stream and the idempotency records per conversation, all in the
//! conversation's partition slot. An append is one script round trip that also publishes the
//! message envelope; the workers read each partition with the consumer group `persistence`.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chat_protocol::MessageFrame;
use redis::aio::MultiplexedConnection;
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, Value};
use uuid::Uuid;

use super::{
    ClaimPage, DecodeError, LogConsumer, LogEntry, MessageLog, PartitionReader, PartitionStats,
    ReadFrom, Retention,
};
use crate::backend::BackendError;
use crate::keys::{KeySchema, PERSISTENCE_GROUP};
use crate::message::{Appended, NewMessage, StoredMessage};
use crate::pubsub::envelope::message_header_around_seq;
use crate::redis_conn::Commands;

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
/// (then it answers the original seq, msg_id and ts and changes nothing), assigns the next seq,
/// appends the entry to the partition stream and to the conversation's tail, records a direct
/// conversation's members with its first message, remembers the client id, and publishes the
/// message envelope to every channel given (both users' channels, or the room's). Every key is
/// in one slot: KEYS[1] the counter, KEYS[2] the partition stream, KEYS[3] the tail, KEYS[4]
/// the pair, KEYS[5] the client id's record. ARGV: 1-6 the entry's fields, 7-8 the frame
/// around the seq, 9-10 the envelope header around the seq, 11-13 the tail length, tail TTL and
/// dedup window, 14 the pair (empty in rooms), 15 the traceparent (empty when not traced),
/// then the channels. The tail is a cache: if its XADD fails (its last id is above `seq` after
/// a Redis data loss), the message is still accepted, and history reads notice the hole (see
/// `docs/architecture.md`).
const APPEND_LUA: &str = r#"
local prior = redis.call('GET', KEYS[5])
if prior then
  local seq, msg_id, ts = string.match(prior, '^(%d+):([^:]+):(%d+)$')
  return {tonumber(seq), msg_id, tonumber(ts)}
end
local seq = redis.call('INCR', KEYS[1])
local entry = {'msg_id', ARGV[1], 'conv', ARGV[2], 'seq', seq, 'from', ARGV[3], 'to', ARGV[4],
  'body', ARGV[5], 'ts', ARGV[6]}
if ARGV[15] ~= '' then
  entry[#entry + 1] = 'tp'
  entry[#entry + 1] = ARGV[15]
end
redis.call('XADD', KEYS[2], '*', unpack(entry))
local frame = ARGV[7] .. seq .. ARGV[8]
redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', ARGV[11], seq .. '-0', 'f', frame)
redis.call('PEXPIRE', KEYS[3], ARGV[12])
if seq == 1 and ARGV[14] ~= '' then redis.call('SET', KEYS[4], ARGV[14]) end
redis.call('SET', KEYS[5], seq .. ':' .. ARGV[1] .. ':' .. ARGV[6], 'PX', ARGV[13])
local payload = ARGV[9] .. seq .. ARGV[10] .. '\n' .. frame
for i = 16, #ARGV do redis.call('PUBLISH', ARGV[i], payload) end
return {seq}
"#;

/// The script's reply.
fn appended_from(v: &Value) -> redis::RedisResult<Appended> {
    let malformed = || {
        redis::RedisError::from((
            redis::ErrorKind::TypeError,
            "unexpected append script reply",
        ))
    };
    let parts: Vec<Value> = redis::FromRedisValue::from_redis_value(v)?;
    match parts.as_slice() {
        [seq] => Ok(Appended::New {
            seq: redis::FromRedisValue::from_redis_value(seq)?,
        }),
        [seq, msg_id, ts] => {
            let msg_id: String = redis::FromRedisValue::from_redis_value(msg_id)?;
            Ok(Appended::Repeat {
                seq: redis::FromRedisValue::from_redis_value(seq)?,
                msg_id: Uuid::parse_str(&msg_id).map_err(|_| malformed())?,
                ts: redis::FromRedisValue::from_redis_value(ts)?,
            })
        }
        _ => Err(malformed()),
    }
}

/// The gateway's side of the log on Redis.
#[derive(Clone)]
pub struct RedisLog {
    redis: Commands,
    keys: KeySchema,
    retention: Retention,
    script: std::sync::Arc<redis::Script>,
}

impl RedisLog {
    pub fn new(redis: Commands, keys: KeySchema, retention: Retention) -> Self {
        RedisLog {
            redis,
            keys,
            retention: Retention {
                dedup_window_ms: retention.dedup_window_ms.max(1),
                ..retention
            },
            script: std::sync::Arc::new(redis::Script::new(APPEND_LUA)),
        }
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
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.keys.seq(conv))
            .key(self.keys.stream(p))
            .key(self.keys.tail(conv))
            .key(self.keys.pair(conv))
            .key(self.keys.sent(conv, msg.from, client_id))
            .arg(msg.msg_id.to_string())
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
            .arg(msg.trace_parent.as_deref().unwrap_or_default());
        for topic in msg.topics() {
            invocation.arg(self.keys.channel(topic));
        }
        let reply: Value = self.redis.invoke("append", &invocation).await?;
        Ok(appended_from(&reply)?)
    }

    async fn last_seq(&self, conversation: Uuid) -> Result<i64, BackendError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.keys.seq(conversation));
        let (seq,): (Option<i64>,) = self.redis.query("command", &pipe).await?;
        Ok(seq.unwrap_or(0))
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
}

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
    client: redis::Client,
    keys: KeySchema,
    /// Reads block this long at most; connections allow for it.
    block: Duration,
}

impl RedisLogConsumer {
    /// A consumer of every partition of `keys` on `client`, whose blocking reads wait up to
    /// `block`.
    pub fn new(client: redis::Client, keys: KeySchema, block: Duration) -> Self {
        RedisLogConsumer {
            client,
            keys,
            block,
        }
    }

    /// A consumer on `url`.
    pub fn open(url: &str, keys: KeySchema, block: Duration) -> Result<Self, BackendError> {
        Ok(Self::new(redis::Client::open(url)?, keys, block))
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
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(self.block + Duration::from_secs(5));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
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
    conn: MultiplexedConnection,
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
