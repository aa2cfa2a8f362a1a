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
}

/// A message as the gateway accepts it, before Redis assigns its sequence number.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub msg_id: Uuid,
    pub conversation_id: Uuid,
    pub from: Uuid,
    pub to: Uuid,
    pub body: String,
    pub ts: i64,
}

/// A message as stored in the stream and in Postgres.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub msg_id: Uuid,
    pub conversation_id: Uuid,
    pub seq: i64,
    pub from: Uuid,
    pub to: Uuid,
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
            to: uuid(fields, field::TO)?,
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
    let tail = format!(
        ",\"from\":\"{}\",\"to\":\"{}\",\"body\":{},\"ts\":{}}}",
        msg.from, msg.to, body, msg.ts
    );
    (head, tail)
}

/// Splits a published payload into the origin connection id and the frame text.
/// Payload layout: `<origin conn uuid>\n<message frame JSON>`.
pub fn split_published(payload: &[u8]) -> Option<(Uuid, &[u8])> {
    let newline = payload.iter().position(|b| *b == b'\n')?;
    let origin = std::str::from_utf8(&payload[..newline]).ok()?;
    Some((Uuid::parse_str(origin).ok()?, &payload[newline + 1..]))
}

/// Assigns the next seq, appends the entry to the partition stream and publishes the frame to
/// both members' channels. Every key is in one slot: KEYS[1] the counter, KEYS[2] the stream.
const APPEND_LUA: &str = r#"
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], '*',
  'msg_id', ARGV[1], 'conv', ARGV[2], 'seq', seq, 'from', ARGV[3], 'to', ARGV[4],
  'body', ARGV[5], 'ts', ARGV[6])
local payload = ARGV[7] .. seq .. ARGV[8]
redis.call('PUBLISH', ARGV[9], payload)
redis.call('PUBLISH', ARGV[10], payload)
return seq
"#;

/// The append script, loaded once and run with EVALSHA (falling back to EVAL after a flush).
#[derive(Clone)]
pub struct Appender {
    script: std::sync::Arc<redis::Script>,
    keys: KeySchema,
}

impl Appender {
    pub fn new(keys: KeySchema) -> Self {
        Appender {
            script: std::sync::Arc::new(redis::Script::new(APPEND_LUA)),
            keys,
        }
    }

    /// Appends `msg` durably (to the extent Redis persistence is configured) and publishes it.
    /// `origin` is the sending connection, which gets an ack instead of the message.
    /// Returns the assigned sequence number.
    pub async fn append<C>(
        &self,
        conn: &mut C,
        msg: &NewMessage,
        origin: Uuid,
    ) -> redis::RedisResult<i64>
    where
        C: redis::aio::ConnectionLike + Send,
    {
        let (head, tail) = frame_parts(msg);
        let p = self.keys.partition_of(msg.conversation_id);
        self.script
            .key(self.keys.seq(msg.conversation_id))
            .key(self.keys.stream(p))
            .arg(msg.msg_id.to_string())
            .arg(msg.conversation_id.to_string())
            .arg(msg.from.to_string())
            .arg(msg.to.to_string())
            .arg(msg.body.as_str())
            .arg(msg.ts)
            .arg(format!("{origin}\n{head}"))
            .arg(tail)
            .arg(self.keys.user_channel(msg.to))
            .arg(self.keys.user_channel(msg.from))
            .invoke_async(conn)
            .await
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
            to: Uuid::now_v7(),
            body: "quote \" backslash \\ newline \n unicode é 🙂".into(),
            ts: 1_700_000_000_123,
        };
        let (head, tail) = frame_parts(&msg);
        let text = format!("{head}42{tail}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid json");
        assert_eq!(v["type"], "message");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["body"], msg.body.as_str());
        assert_eq!(v["from"], msg.from.to_string());
        assert_eq!(v["to"], msg.to.to_string());
        assert_eq!(v["ts"], msg.ts);
        assert_eq!(v["msg_id"], msg.msg_id.to_string());
        assert_eq!(v["conversation_id"], msg.conversation_id.to_string());
    }

    /// The published payload splits back into origin and frame; garbage does not split.
    #[test]
    fn split_published_round_trips() {
        let origin = Uuid::new_v4();
        let payload = format!("{origin}\n{{\"a\":1}}");
        let (o, frame) = split_published(payload.as_bytes()).expect("split");
        assert_eq!(o, origin);
        assert_eq!(frame, b"{\"a\":1}");
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
            to: Uuid::now_v7(),
            body: "\"ts\":5}".into(),
            ts: 1_700_000_000_999,
        };
        let (head, tail) = frame_parts(&msg);
        assert_eq!(frame_ts(&format!("{head}1{tail}")), Some(1_700_000_000_999));
        assert_eq!(frame_ts("{}"), None);
    }
}
