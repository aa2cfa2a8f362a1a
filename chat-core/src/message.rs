//! A chat message on its way through the system: as a gateway accepts it ([`NewMessage`]), as
//! the log stores it with its seq ([`StoredMessage`]), what an append did ([`Appended`]), and
//! its `message` frame, serialized once per message around the seq the log assigns.

use chat_protocol::MessageFrame;
use uuid::Uuid;

use crate::pubsub::Topic;

/// A message as the gateway accepts it, before the log assigns its sequence number.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub msg_id: Uuid,
    pub conversation_id: Uuid,
    pub from: Uuid,
    /// The recipient of a direct message; `None` in a room.
    pub to: Option<Uuid>,
    pub body: String,
    pub ts: i64,
    /// The accepting span's `traceparent`, carried in the log entry and the published envelope
    /// so the worker and the delivering nodes continue the trace. `None` when not traced.
    pub trace_parent: Option<String>,
}

impl NewMessage {
    /// The message with its seq, as the log stores it.
    pub fn stored(&self, seq: i64) -> StoredMessage {
        StoredMessage {
            msg_id: self.msg_id,
            conversation_id: self.conversation_id,
            seq,
            from: self.from,
            to: self.to,
            body: self.body.clone(),
            ts: self.ts,
        }
    }

    /// The `message` frame split around its seq: `head + seq + tail` is the frame's JSON, as
    /// serde writes [`MessageFrame`]. The log joins them once the seq is known, so the frame is
    /// serialized once per message and every recipient gets the same bytes.
    pub fn frame_around_seq(&self) -> (String, String) {
        MessageFrame {
            msg_id: self.msg_id,
            conversation_id: self.conversation_id,
            seq: 0,
            from: self.from,
            to: self.to,
            body: self.body.clone(),
            ts: self.ts,
        }
        .around_seq()
    }

    /// The topics the message is published to.
    pub fn topics(&self) -> Vec<Topic> {
        topics(self.conversation_id, self.from, self.to)
    }
}

/// The topics a message is published to: both users' (direct, the recipient first) or the
/// room's.
fn topics(conversation: Uuid, from: Uuid, to: Option<Uuid>) -> Vec<Topic> {
    match to {
        Some(to) => vec![Topic::User(to), Topic::User(from)],
        None => vec![Topic::Room(conversation)],
    }
}

/// A message as stored in the log and in Postgres.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub msg_id: Uuid,
    pub conversation_id: Uuid,
    pub seq: i64,
    pub from: Uuid,
    /// The recipient of a direct message; `None` in a room.
    pub to: Option<Uuid>,
    pub body: String,
    pub ts: i64,
}

impl StoredMessage {
    /// The topics the message is published to.
    pub fn topics(&self) -> Vec<Topic> {
        topics(self.conversation_id, self.from, self.to)
    }

    /// Its `message` frame.
    pub fn frame(self) -> MessageFrame {
        MessageFrame {
            msg_id: self.msg_id,
            conversation_id: self.conversation_id,
            seq: self.seq,
            from: self.from,
            to: self.to,
            body: self.body,
            ts: self.ts,
        }
    }
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The message was appended with this seq.
    New { seq: i64 },
    /// The sender appended this client id in this conversation before, within the dedup
    /// window: nothing changed, and this is the original message.
    Repeat { seq: i64, msg_id: Uuid, ts: i64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(to: Option<Uuid>, body: &str) -> NewMessage {
        NewMessage {
            msg_id: Uuid::now_v7(),
            conversation_id: Uuid::new_v4(),
            from: Uuid::now_v7(),
            to,
            body: body.into(),
            ts: 1_700_000_000_123,
            trace_parent: None,
        }
    }

    /// The frame joined around a seq is byte-identical to serde's own `MessageFrame`, also for
    /// bodies that look like the seq field or need escaping, and rooms carry no recipient.
    #[test]
    fn frame_around_seq_joins_to_serdes_frame() {
        for body in [
            "quote \" backslash \\ newline \n unicode é 🙂",
            "\"seq\":-9223372036854775808,",
            "{\"seq\":1}",
        ] {
            for to in [Some(Uuid::now_v7()), None] {
                let msg = message(to, body);
                let (head, tail) = msg.frame_around_seq();
                let joined = format!("{head}42{tail}");
                let expected =
                    serde_json::to_string(&msg.stored(42).frame()).expect("serialize frame");
                assert_eq!(joined, expected);
                let v: serde_json::Value = serde_json::from_str(&joined).expect("json");
                assert_eq!(v["seq"], 42);
                assert_eq!(v["body"], body);
                assert_eq!(v.get("to").is_some(), to.is_some());
            }
        }
    }
}
