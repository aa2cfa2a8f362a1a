//! The message stream: the entry format both binaries agree on, the pub/sub frame built once per
//! message, and the script that assigns a sequence number, appends and publishes in one round trip.

use std::collections::HashMap;

use redis::Value;
use uuid::Uuid;

use crate::keys::KeySchema;

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

/// A message as the gateway accepts it, before Redis assigns its sequence number.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub msg_id: Uuid,
    pub conversation_id: Uuid,
    pub from: Uuid,
    /// The recipient of a direct message; `None` in a room.
    pub to: Option<Uuid>,
    pub body: String,
    pub ts: i64,
    /// The accepting span's `traceparent`, carried in the entry and the published payload so
    /// the worker and the delivering nodes continue the trace. `None` when not traced.
    pub trace_parent: Option<String>,
}

/// A message as stored in the stream and in Postgres.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub msg_id: Uuid,
    pub conversation_id: Uuid,
    pub seq: i64,
    pub from: Uuid,
    /// The recipient of a direct message; `None` in a room (the entry's `to` is empty).
    pub to: Option<Uuid>,
    pub body: String,
    pub ts: i64,
}

/// Why a stream entry could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("field {0} is missing")]
    Missing(&'static str),
    #[error("field {0} is malformed")]
    Malformed(&'static str),
}

impl StoredMessage {
    /// Decodes one stream entry's field map.
    pub fn decode(fields: &HashMap<String, Value>) -> Result<Self, DecodeError> {
        fn text(
            fields: &HashMap<String, Value>,
            name: &'static str,
        ) -> Result<String, DecodeError> {
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
}

/// The `message` frame split around its sequence number, so the script can complete it and every
/// receiving node forwards the published bytes unchanged: serialized once per message.
fn frame_parts(msg: &NewMessage) -> (String, String) {
    let body = serde_json::to_string(&msg.body).unwrap_or_else(|_| String::from("\"\""));
    let head = format!(
        "{{\"type\":\"message\",\"msg_id\":\"{}\",\"conversation_id\":\"{}\",\"seq\":",
        msg.msg_id, msg.conversation_id
    );
    let to = msg
        .to
        .map(|to| format!(",\"to\":\"{to}\""))
        .unwrap_or_default();
    let tail = format!(
        ",\"from\":\"{}\"{},\"body\":{},\"ts\":{}}}",
        msg.from, to, body, msg.ts
    );
    (head, tail)
}

/// The conversation id and seq of a `message` frame built by this module, read from their fixed
/// positions without parsing the JSON (this runs for every live frame a connection writes).
pub fn frame_conversation_seq(frame: &str) -> Option<(Uuid, i64)> {
    const HEAD: &str = "{\"type\":\"message\",\"msg_id\":\"";
    const CONV: &str = "\",\"conversation_id\":\"";
    const SEQ: &str = "\",\"seq\":";
    let rest = frame.strip_prefix(HEAD)?;
    let rest = rest.get(36..)?.strip_prefix(CONV)?;
    let conversation = Uuid::parse_str(rest.get(..36)?).ok()?;
    let rest = rest.get(36..)?.strip_prefix(SEQ)?;
    let end = rest.find(',')?;
    Some((conversation, rest[..end].parse().ok()?))
}

/// A published payload, split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published<'a> {
    /// The connection that sent the message (it gets an ack instead), or nil.
    pub origin: Uuid,
    /// The sending span's `traceparent`, when the message was traced.
    pub trace_parent: Option<&'a str>,
    /// The frame, forwarded to recipients unchanged.
    pub frame: &'a [u8],
}

/// The header line of a published payload: the origin, then the `traceparent` if any.
pub fn published_header(origin: Uuid, trace_parent: Option<&str>) -> String {
    match trace_parent {
        Some(tp) => format!("{origin} {tp}"),
        None => origin.to_string(),
    }
}

/// Splits a published payload. Layout: `<origin conn uuid>[ <traceparent>]\n<frame JSON>`.
pub fn split_published(payload: &[u8]) -> Option<Published<'_>> {
    let newline = payload.iter().position(|b| *b == b'\n')?;
    let header = std::str::from_utf8(&payload[..newline]).ok()?;
    let (origin, trace_parent) = match header.split_once(' ') {
        Some((origin, tp)) => (origin, Some(tp)),
        None => (header, None),
    };
    Some(Published {
        origin: Uuid::parse_str(origin).ok()?,
        trace_parent,
        frame: &payload[newline + 1..],
    })
}

/// The `traceparent` a stream entry carries, if any.
pub fn entry_trace_parent(fields: &HashMap<String, Value>) -> Option<String> {
    match fields.get(field::TRACE_PARENT)? {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Unless the sender's client id was appended in this conversation within the dedup window
/// (then it answers the original seq, msg_id and ts and changes nothing), assigns the next seq,
/// appends the entry to the partition stream and to the conversation's tail, records a direct
/// conversation's members with its first message, remembers the client id, and publishes the
/// frame to every channel given (both users' channels, or the room's). Every key is in one slot:
/// KEYS[1] the counter, KEYS[2] the partition stream, KEYS[3] the tail, KEYS[4] the pair,
/// KEYS[5] the client id's record. ARGV[14] is the traceparent (empty when not traced), kept in
/// the entry for the worker; the channels follow from ARGV[15].
/// The tail is a cache: if its XADD fails (its last id is above `seq` after a Redis data loss),
/// the message is still accepted, and history reads notice the hole (see `docs/architecture.md`).
const APPEND_LUA: &str = r#"
local prior = redis.call('GET', KEYS[5])
if prior then
  local seq, msg_id, ts = string.match(prior, '^(%d+):([^:]+):(%d+)$')
  return {tonumber(seq), msg_id, tonumber(ts)}
end
local seq = redis.call('INCR', KEYS[1])
local entry = {'msg_id', ARGV[1], 'conv', ARGV[2], 'seq', seq, 'from', ARGV[3], 'to', ARGV[4],
  'body', ARGV[5], 'ts', ARGV[6]}
if ARGV[14] ~= '' then
  entry[#entry + 1] = 'tp'
  entry[#entry + 1] = ARGV[14]
end
redis.call('XADD', KEYS[2], '*', unpack(entry))
local frame = ARGV[7] .. seq .. ARGV[8]
redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], seq .. '-0', 'f', frame)
redis.call('PEXPIRE', KEYS[3], ARGV[11])
if seq == 1 and ARGV[13] ~= '' then redis.call('SET', KEYS[4], ARGV[13]) end
redis.call('SET', KEYS[5], seq .. ':' .. ARGV[1] .. ':' .. ARGV[6], 'PX', ARGV[12])
local payload = ARGV[9] .. '\n' .. frame
for i = 15, #ARGV do redis.call('PUBLISH', ARGV[i], payload) end
return {seq}
"#;

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The message was appended with this seq.
    New { seq: i64 },
    /// The client id was appended before, within the window: nothing changed, and this is the
    /// original message.
    Repeat { seq: i64, msg_id: Uuid, ts: i64 },
}

impl redis::FromRedisValue for Appended {
    fn from_redis_value(v: &Value) -> redis::RedisResult<Self> {
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
}

/// Default length of a conversation's tail (entries kept in Redis for history and sync).
pub const DEFAULT_TAIL_LEN: u32 = 1000;
/// Default idle lifetime of a conversation's tail.
pub const DEFAULT_TAIL_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Default window in which a repeated client id gets the original ack.
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 10 * 60 * 1000;

/// The append script, loaded once and run with EVALSHA (falling back to EVAL after a flush).
#[derive(Clone)]
pub struct Appender {
    script: std::sync::Arc<redis::Script>,
    keys: KeySchema,
    tail_len: u32,
    tail_ttl_ms: u64,
    dedup_window_ms: u64,
}

impl Appender {
    pub fn new(keys: KeySchema) -> Self {
        Self::with_limits(
            keys,
            DEFAULT_TAIL_LEN,
            DEFAULT_TAIL_TTL_MS,
            DEFAULT_DEDUP_WINDOW_MS,
        )
    }

    /// An appender keeping `tail_len` recent messages per conversation for `tail_ttl_ms` after the
    /// conversation's last message, and each client id for `dedup_window_ms`.
    pub fn with_limits(
        keys: KeySchema,
        tail_len: u32,
        tail_ttl_ms: u64,
        dedup_window_ms: u64,
    ) -> Self {
        Appender {
            script: std::sync::Arc::new(redis::Script::new(APPEND_LUA)),
            keys,
            tail_len,
            tail_ttl_ms,
            dedup_window_ms: dedup_window_ms.max(1),
        }
    }

    /// The key schema this appender writes with.
    pub fn keys(&self) -> &KeySchema {
        &self.keys
    }

    /// Appends `msg` durably (to the extent Redis persistence is configured) and publishes it,
    /// unless its sender appended `client_id` in this conversation within the dedup window.
    /// `origin` is the sending connection, which gets an ack instead of the message.
    pub async fn append<C>(
        &self,
        conn: &mut C,
        msg: &NewMessage,
        client_id: &str,
        origin: Uuid,
    ) -> redis::RedisResult<Appended>
    where
        C: redis::aio::ConnectionLike + Send,
    {
        let (head, tail) = frame_parts(msg);
        let conv = msg.conversation_id;
        let p = self.keys.partition_of(conv);
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
            .arg(head)
            .arg(tail)
            .arg(published_header(origin, msg.trace_parent.as_deref()))
            .arg(self.tail_len)
            .arg(self.tail_ttl_ms)
            .arg(self.dedup_window_ms);
        match msg.to {
            Some(to) => {
                let (low, high) = if msg.from <= to {
                    (msg.from, to)
                } else {
                    (to, msg.from)
                };
                invocation
                    .arg(format!("{low}:{high}"))
                    .arg(msg.trace_parent.as_deref().unwrap_or_default())
                    .arg(self.keys.user_channel(to))
                    .arg(self.keys.user_channel(msg.from));
            }
            None => {
                invocation
                    .arg("")
                    .arg(msg.trace_parent.as_deref().unwrap_or_default())
                    .arg(self.keys.room_channel(conv));
            }
        }
        invocation.invoke_async(conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame completed with a seq is valid JSON with every documented field, including
    /// bodies that need escaping.
    #[test]
    fn frame_parts_make_valid_json() {
        let msg = NewMessage {
            msg_id: Uuid::now_v7(),
            conversation_id: Uuid::new_v4(),
            from: Uuid::now_v7(),
            to: Some(Uuid::now_v7()),
            body: "quote \" backslash \\ newline \n unicode é 🙂".into(),
            ts: 1_700_000_000_123,
            trace_parent: None,
        };
        let (head, tail) = frame_parts(&msg);
        let text = format!("{head}42{tail}");
        let parsed: crate::protocol::MessageFrame =
            serde_json::from_str(&text).expect("the live frame is a MessageFrame");
        assert_eq!(
            serde_json::to_string(&parsed).expect("serialize"),
            text,
            "history and sync frames are byte-identical to live ones"
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid json");
        assert_eq!(v["type"], "message");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["body"], msg.body.as_str());
        assert_eq!(v["from"], msg.from.to_string());
        assert_eq!(v["to"], msg.to.expect("direct").to_string());
        assert_eq!(
            frame_conversation_seq(&text),
            Some((msg.conversation_id, 42))
        );
        let room = NewMessage { to: None, ..msg };
        let (head, tail) = frame_parts(&room);
        let text = format!("{head}7{tail}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid json");
        assert!(v.get("to").is_none(), "room messages carry no recipient");
        assert_eq!(
            frame_conversation_seq(&text),
            Some((room.conversation_id, 7))
        );
        assert_eq!(frame_conversation_seq("{\"type\":\"ack\"}"), None);
        assert_eq!(v["ts"], msg.ts);
        assert_eq!(v["msg_id"], msg.msg_id.to_string());
        assert_eq!(v["conversation_id"], msg.conversation_id.to_string());
    }

    /// The published payload splits back into origin and frame; garbage does not split.
    #[test]
    fn split_published_round_trips() {
        let origin = Uuid::new_v4();
        let payload = format!("{}\n{{\"a\":1}}", published_header(origin, None));
        let published = split_published(payload.as_bytes()).expect("split");
        assert_eq!(published.origin, origin);
        assert_eq!(published.trace_parent, None);
        assert_eq!(published.frame, b"{\"a\":1}");
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let payload = format!("{}\n{{}}", published_header(origin, Some(tp)));
        let published = split_published(payload.as_bytes()).expect("split");
        assert_eq!(
            (published.origin, published.trace_parent, published.frame),
            (origin, Some(tp), &b"{}"[..])
        );
        assert!(split_published(b"no newline").is_none());
        assert!(split_published(b"not-a-uuid\n{}").is_none());
    }
}

/// The `ts` of a `message` frame built by this module (its last field), without parsing JSON.
pub fn frame_ts(frame: &str) -> Option<i64> {
    let start = frame.rfind("\"ts\":")? + 5;
    frame[start..].trim_end_matches('}').parse().ok()
}

#[cfg(test)]
mod frame_ts_tests {
    use super::*;

    /// The ts is found even when the body contains the same characters.
    #[test]
    fn frame_ts_reads_the_last_field() {
        let msg = NewMessage {
            msg_id: Uuid::now_v7(),
            conversation_id: Uuid::new_v4(),
            from: Uuid::now_v7(),
            to: Some(Uuid::now_v7()),
            body: "\"ts\":5}".into(),
            ts: 1_700_000_000_999,
            trace_parent: None,
        };
        let (head, tail) = frame_parts(&msg);
        assert_eq!(frame_ts(&format!("{head}1{tail}")), Some(1_700_000_000_999));
        assert_eq!(frame_ts("{}"), None);
    }
}
