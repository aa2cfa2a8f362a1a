//! The WebSocket wire protocol: client frames, server frames, and the one table of error and
//! close codes used by the server, `docs/protocol.md` and metric labels. [`validate`] decodes a
//! client's text frame and makes the checks that need no state; the fuzz target in `fuzz/`
//! drives both.

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod validate;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A frame a client sends. Every frame is one JSON object with a `type`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Send a message: to a user (`to`, a direct message) or into a conversation
    /// (`conversation_id`, a room or a direct conversation). Exactly one of the two.
    Send {
        /// Client-chosen id, echoed in the ack or error.
        id: String,
        /// Recipient user id.
        #[serde(default)]
        to: Option<Uuid>,
        /// Target conversation.
        #[serde(default)]
        conversation_id: Option<Uuid>,
        /// Message text.
        body: String,
    },
    /// Ask for the messages after `after_seq` in one conversation (`conversation_id`), or in
    /// several (`conversations`). Answered with `message` frames, then one `synced` per
    /// conversation.
    Sync {
        #[serde(default)]
        conversation_id: Option<Uuid>,
        #[serde(default)]
        after_seq: Option<i64>,
        #[serde(default)]
        conversations: Option<Vec<SyncPoint>>,
    },
    /// The reader has read the conversation up to `seq`.
    Read { conversation_id: Uuid, seq: i64 },
    /// The user is typing in the conversation.
    Typing { conversation_id: Uuid },
    /// Receive presence changes of these users (besides those sharing a conversation).
    #[serde(rename = "presence.watch")]
    PresenceWatch { user_ids: Vec<Uuid> },
    /// Stop receiving presence changes of these users through a watch.
    #[serde(rename = "presence.unwatch")]
    PresenceUnwatch { user_ids: Vec<Uuid> },
}

/// Whether a user has a live connection anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    Online,
    Offline,
}

/// One conversation of a multi-conversation `sync`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncPoint {
    pub conversation_id: Uuid,
    #[serde(default)]
    pub after_seq: i64,
}

/// The `message` frame, as history answers, sync sends and live delivery forwards it (the log
/// serializes it once per message, around its seq: [`MessageFrame::around_seq`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "message")]
pub struct MessageFrame {
    pub msg_id: Uuid,
    pub conversation_id: Uuid,
    pub seq: i64,
    pub from: Uuid,
    /// The recipient of a direct message; absent in rooms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Uuid>,
    pub body: String,
    pub ts: i64,
}

/// The placeholder seq [`MessageFrame::around_seq`] serializes and splits at, and the text serde
/// writes for it.
const SEQ_PLACEHOLDER: i64 = i64::MIN;
const SEQ_FIELD: &str = "\"seq\":";
const SEQ_MARKER: &str = "\"seq\":-9223372036854775808";

/// Where the last frame's seq placeholder was: every message frame has it at the same place
/// (its fields before the seq have fixed widths), so a search is needed only once.
static LAST_SEQ_AT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl MessageFrame {
    /// The frame's JSON split around its seq: `head + seq + tail` is what serde writes for this
    /// frame with that seq. Lets a log that assigns the seq later (inside a Redis script) finish
    /// the frame without serializing it again. The split point is found, not assumed: a body
    /// cannot contain the unescaped text `"seq":`, since serde escapes its quotes.
    pub fn around_seq(mut self) -> (String, String) {
        use std::sync::atomic::Ordering::Relaxed;
        self.seq = SEQ_PLACEHOLDER;
        let mut buf = Vec::with_capacity(self.body.len() + 256);
        // Serializing plain strings, uuids and integers cannot fail, and writes UTF-8.
        let _ = serde_json::to_writer(&mut buf, &self);
        let mut json = String::from_utf8(buf).unwrap_or_default();
        let marker = SEQ_MARKER;
        let hint = LAST_SEQ_AT.load(Relaxed);
        let at = if json.get(hint..hint + marker.len()) == Some(marker) {
            Some(hint)
        } else {
            let found = json.find(marker);
            if let Some(at) = found {
                LAST_SEQ_AT.store(at, Relaxed);
            }
            found
        };
        match at {
            Some(at) => {
                let tail = json.split_off(at + marker.len());
                json.truncate(at + SEQ_FIELD.len());
                (json, tail)
            }
            None => (json, String::new()),
        }
    }
}

/// How a room's membership changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipChange {
    Added,
    Removed,
    /// The member's role changed (to the frame's `role`).
    Role,
}

/// A room member's role: the owner (one per room) and admins add and remove people; plain
/// members cannot add anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomRole {
    Owner,
    Admin,
    Member,
}

impl RoomRole {
    /// The role's name, as JSON and Postgres spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            RoomRole::Owner => "owner",
            RoomRole::Admin => "admin",
            RoomRole::Member => "member",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<RoomRole> {
        match name {
            "owner" => Some(RoomRole::Owner),
            "admin" => Some(RoomRole::Admin),
            "member" => Some(RoomRole::Member),
            _ => None,
        }
    }
}

/// Frames the server sends, other than `message` ([`MessageFrame`], serialized once per message).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every connection.
    Hello {
        user_id: Uuid,
        conn_id: Uuid,
        node_id: String,
        heartbeat_ms: u64,
    },
    /// The message was appended to the Redis stream: it will reach Postgres, and is published
    /// live to the recipient's connected devices (live delivery is at most once per connection).
    Ack {
        id: String,
        msg_id: Uuid,
        conversation_id: Uuid,
        seq: i64,
        ts: i64,
    },
    /// The end of a sync for one conversation: every message up to `last_seq` has been sent
    /// (by this sync or live). When `complete` is false, more remain: sync again from `last_seq`.
    Synced {
        conversation_id: Uuid,
        last_seq: i64,
        complete: bool,
    },
    /// A member read the conversation up to `seq` (also sent to the reader's other devices).
    Read {
        conversation_id: Uuid,
        user_id: Uuid,
        seq: i64,
    },
    /// A member is typing.
    Typing {
        conversation_id: Uuid,
        user_id: Uuid,
    },
    /// A room member was added, removed, or given another role (`by` did it). Sent to the
    /// room's members and to the affected user; a user who is added should sync the room.
    /// `role` is the member's role after an `added` or `role` change.
    Membership {
        conversation_id: Uuid,
        user_id: Uuid,
        change: MembershipChange,
        by: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<RoomRole>,
    },
    /// A user came online (first connection anywhere) or went offline (last one closed, or
    /// their node stopped refreshing them). `ts` is when it was noticed, Unix ms.
    Presence {
        user_id: Uuid,
        status: PresenceStatus,
        ts: i64,
    },
    /// Live delivery to this connection may have missed frames (the node lost its Redis pub/sub
    /// connection for a moment): sync every conversation, as after a reconnect.
    Resync { reason: String },
    /// The log lost data (Redis restarted, failed over or was flushed) and the conversation's
    /// seq moved past `from_seq..=to_seq`: no message will ever have those seqs. Messages held
    /// in that range were lost; count the range as held and sync the conversation.
    Rebased {
        conversation_id: Uuid,
        from_seq: i64,
        to_seq: i64,
    },
    /// A frame could not be processed; the connection stays usable.
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: ErrorCode,
        message: String,
    },
}

/// Every `type` a server frame may have, `message` included: the frame names the docs, the
/// AsyncAPI file and the `chat_gateway_frames_out_total` labels use.
pub const SERVER_FRAME_TYPES: [&str; 11] = [
    "hello",
    "ack",
    "message",
    "synced",
    "read",
    "typing",
    "membership",
    "presence",
    "resync",
    "rebased",
    "error",
];

impl ServerFrame {
    /// The frame's `type` on the wire, also its metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::Hello { .. } => "hello",
            ServerFrame::Ack { .. } => "ack",
            ServerFrame::Synced { .. } => "synced",
            ServerFrame::Read { .. } => "read",
            ServerFrame::Typing { .. } => "typing",
            ServerFrame::Membership { .. } => "membership",
            ServerFrame::Presence { .. } => "presence",
            ServerFrame::Resync { .. } => "resync",
            ServerFrame::Rebased { .. } => "rebased",
            ServerFrame::Error { .. } => "error",
        }
    }

    /// The JSON text of this frame.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string keys, no floats.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"type\":\"error\"}"))
    }

    /// An error frame.
    pub fn error(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            id,
            code,
            message: message.into(),
        }
    }
}

/// Error codes, shared by WebSocket error frames and HTTP error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, unknown frame type, missing or invalid field.
    BadRequest,
    /// A body or frame over the configured limit.
    TooLarge,
    /// The recipient or resource does not exist.
    NotFound,
    /// The caller may not do this.
    Forbidden,
    /// Too many requests; slow down.
    RateLimited,
    /// A dependency (Redis, Postgres) is unavailable; retry later. Never acked.
    Unavailable,
    /// Missing, malformed or expired credentials.
    Unauthorized,
    /// Login failed: unknown email or wrong password (deliberately indistinguishable).
    InvalidCredentials,
    /// The email is already registered.
    EmailTaken,
    /// A field failed validation (HTTP 422); `fields` names each.
    ValidationFailed,
    /// Binary frames are not part of the protocol.
    UnsupportedData,
    /// An unexpected server fault.
    Internal,
}

impl ErrorCode {
    /// Every code, for docs and tests.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::NotFound,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Unauthorized,
        ErrorCode::InvalidCredentials,
        ErrorCode::EmailTaken,
        ErrorCode::ValidationFailed,
        ErrorCode::UnsupportedData,
        ErrorCode::Internal,
    ];

    /// The wire name, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::InvalidCredentials => "invalid_credentials",
            ErrorCode::EmailTaken => "email_taken",
            ErrorCode::ValidationFailed => "validation_failed",
            ErrorCode::UnsupportedData => "unsupported_data",
            ErrorCode::Internal => "internal",
        }
    }
}

/// WebSocket close codes the server uses. 1000–1015 are RFC 6455; 4000–4099 mean "reconnect
/// (with backoff)", 4100–4199 mean "do not reconnect without user action".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: normal closure (client asked).
    Normal,
    /// 1001: the node is shutting down; reconnect (to another node).
    GoingAway,
    /// 1002: WebSocket protocol violation.
    ProtocolError,
    /// 1007: a text message (or a close reason) that is not valid UTF-8.
    InvalidPayload,
    /// 1009: a frame or message exceeded the frame limit.
    MessageTooBig,
    /// 1011: unexpected server fault.
    InternalError,
    /// 4000: the client missed heartbeats; reconnect.
    HeartbeatTimeout,
    /// 4008: the client read too slowly and its outbound queue overflowed; reconnect and sync.
    SlowConsumer,
    /// 4100: the token expired during the session; get a new token, then reconnect.
    TokenExpired,
    /// 4101: the user's password changed; tokens issued before no longer work. Log in again.
    TokenRevoked,
    /// 4029: the client kept sending far above its rate limit after being told `rate_limited`.
    RateLimited,
}

impl CloseCode {
    /// Every code, for docs and tests.
    pub const ALL: [CloseCode; 11] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidPayload,
        CloseCode::MessageTooBig,
        CloseCode::InternalError,
        CloseCode::HeartbeatTimeout,
        CloseCode::SlowConsumer,
        CloseCode::TokenExpired,
        CloseCode::TokenRevoked,
        CloseCode::RateLimited,
    ];

    /// The numeric code on the wire.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidPayload => 1007,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::HeartbeatTimeout => 4000,
            CloseCode::SlowConsumer => 4008,
            CloseCode::TokenExpired => 4100,
            CloseCode::TokenRevoked => 4101,
            CloseCode::RateLimited => 4029,
        }
    }

    /// Short reason text sent in the close frame, also the metric label.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "going_away",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::InvalidPayload => "invalid_payload",
            CloseCode::MessageTooBig => "message_too_big",
            CloseCode::InternalError => "internal_error",
            CloseCode::HeartbeatTimeout => "heartbeat_timeout",
            CloseCode::SlowConsumer => "slow_consumer",
            CloseCode::TokenExpired => "token_expired",
            CloseCode::TokenRevoked => "token_revoked",
            CloseCode::RateLimited => "rate_limited",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error code serializes to the name `as_str` reports, so docs, wire and metrics agree.
    #[test]
    fn error_code_wire_names_match_as_str() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).expect("serialize");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    /// The marker is the field as serde writes it with the placeholder.
    #[test]
    fn seq_marker_is_what_serde_writes() {
        let placeholder = serde_json::to_string(&SEQ_PLACEHOLDER).expect("json");
        assert_eq!(SEQ_MARKER, format!("{SEQ_FIELD}{placeholder}"));
    }

    /// `kind` is the `type` serde writes, and every kind is in the table.
    #[test]
    fn server_frame_kind_is_its_wire_type() {
        let id = Uuid::nil();
        let frames = [
            ServerFrame::Hello {
                user_id: id,
                conn_id: id,
                node_id: "n".into(),
                heartbeat_ms: 1,
            },
            ServerFrame::Ack {
                id: "1".into(),
                msg_id: id,
                conversation_id: id,
                seq: 1,
                ts: 1,
            },
            ServerFrame::Synced {
                conversation_id: id,
                last_seq: 1,
                complete: true,
            },
            ServerFrame::Read {
                conversation_id: id,
                user_id: id,
                seq: 1,
            },
            ServerFrame::Typing {
                conversation_id: id,
                user_id: id,
            },
            ServerFrame::Membership {
                conversation_id: id,
                user_id: id,
                change: MembershipChange::Added,
                by: id,
                role: Some(RoomRole::Member),
            },
            ServerFrame::Presence {
                user_id: id,
                status: PresenceStatus::Online,
                ts: 1,
            },
            ServerFrame::Resync { reason: "r".into() },
            ServerFrame::Rebased {
                conversation_id: id,
                from_seq: 4,
                to_seq: 1_000_003,
            },
            ServerFrame::error(None, ErrorCode::Internal, "x"),
        ];
        for frame in frames {
            let v: serde_json::Value = serde_json::from_str(&frame.to_json()).expect("json");
            assert_eq!(v["type"], frame.kind());
            assert!(SERVER_FRAME_TYPES.contains(&frame.kind()));
        }
    }

    /// Close codes are unique and fall in the documented ranges.
    #[test]
    fn close_codes_are_unique_and_in_range() {
        let mut seen = std::collections::HashSet::new();
        for c in CloseCode::ALL {
            assert!(seen.insert(c.code()), "duplicate {}", c.code());
            assert!((1000..=1015).contains(&c.code()) || (4000..=4199).contains(&c.code()));
        }
    }

    /// Every frame type a client may send parses, and a sync names its conversations.
    #[test]
    fn client_frames_parse() {
        let conv = "0190c8a4-0000-7000-8000-000000000000";
        for text in [
            format!(r#"{{"type":"send","id":"1","conversation_id":"{conv}","body":"x"}}"#),
            format!(r#"{{"type":"sync","conversation_id":"{conv}","after_seq":3}}"#),
            format!(
                r#"{{"type":"sync","conversations":[{{"conversation_id":"{conv}","after_seq":0}}]}}"#
            ),
            format!(r#"{{"type":"read","conversation_id":"{conv}","seq":3}}"#),
            format!(r#"{{"type":"typing","conversation_id":"{conv}"}}"#),
            format!(r#"{{"type":"presence.watch","user_ids":["{conv}"]}}"#),
            format!(r#"{{"type":"presence.unwatch","user_ids":["{conv}"]}}"#),
        ] {
            assert!(serde_json::from_str::<ClientFrame>(&text).is_ok(), "{text}");
        }
    }

    /// Unknown fields and unknown types are rejected rather than silently ignored.
    #[test]
    fn client_frame_is_strict() {
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(
            r#"{"type":"send","id":"1","to":"0190c8a4-0000-7000-8000-000000000000","body":"x","extra":1}"#
        )
        .is_err());
        let ok = serde_json::from_str::<ClientFrame>(
            r#"{"type":"send","id":"1","to":"0190c8a4-0000-7000-8000-000000000000","body":"x"}"#,
        );
        assert!(matches!(ok, Ok(ClientFrame::Send { .. })));
    }
}
