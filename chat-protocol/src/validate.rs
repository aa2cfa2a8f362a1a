//! Decoding a client's text frame and the checks on it that need no state: the client id, the
//! body, the target of a send, the conversations of a sync. The session makes the checks that
//! need Redis or Postgres (membership, recipients) only after these pass.

use uuid::Uuid;

use crate::{ClientFrame, ErrorCode, ServerFrame, SyncPoint};

/// Longest client-chosen `id` of a `send`, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 128;
/// Most conversations one `sync` frame may name.
pub const MAX_SYNC_CONVERSATIONS: usize = 100;
/// Every `type` a client may send.
pub const CLIENT_FRAME_TYPES: [&str; 6] = [
    "send",
    "sync",
    "read",
    "typing",
    "presence.watch",
    "presence.unwatch",
];

/// A frame refused before any state was touched: the error frame's code and message, and the
/// client id it answers when the frame had a usable one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    /// The error frame that answers the refused frame.
    pub fn into_frame(self) -> ServerFrame {
        ServerFrame::error(self.id, self.code, self.message)
    }
}

/// Where a `send` goes, as the frame names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendTarget {
    /// A direct message to this user.
    User(Uuid),
    /// A message into this conversation (a room, or a direct conversation by its id).
    Conversation(Uuid),
}

/// Parses a client's text frame. A frame that does not parse is answered with `bad_request`,
/// a message that says what is wrong, and the frame's `id` when it had a usable one.
pub fn decode(text: &str) -> Result<ClientFrame, Rejection> {
    // serde also reads an internally tagged enum from an array, its fields by position
    // (`["send","1",null,"<conversation>","hi"]` is a send): frames are objects only. Found by
    // the fuzz target.
    let is_object = text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{');
    let parsed = if is_object {
        serde_json::from_str::<ClientFrame>(text).map_err(Some)
    } else {
        Err(None)
    };
    parsed.map_err(|err| describe_parse_error(text, err.as_ref()))
}

/// The answer to a frame that did not decode; `err` is serde's complaint about an object.
fn describe_parse_error(text: &str, err: Option<&serde_json::Error>) -> Rejection {
    let value: Option<serde_json::Value> = serde_json::from_str(text).ok();
    let id = value
        .as_ref()
        .and_then(|v| v.get("id"))
        .and_then(|v| v.as_str())
        .filter(|s| s.len() <= MAX_CLIENT_ID_BYTES)
        .map(str::to_string);
    let message = match &value {
        None => "malformed JSON".to_string(),
        Some(v) if !v.is_object() => "a frame must be a JSON object".to_string(),
        Some(v) => match v.get("type").and_then(|t| t.as_str()) {
            None => "missing field `type`".to_string(),
            Some(t) if !CLIENT_FRAME_TYPES.contains(&t) => "unknown frame type".to_string(),
            Some(_) => err.map_or_else(
                || "a frame must be a JSON object".to_string(),
                |err| format!("invalid frame: {err}"),
            ),
        },
    };
    Rejection {
        id,
        code: ErrorCode::BadRequest,
        message,
    }
}

/// Checks a `send`'s id and body, and that it names exactly one target. `max_body_bytes` is the
/// configured body limit (`gateway_max_body_bytes`).
pub fn check_send(
    id: &str,
    to: Option<Uuid>,
    conversation_id: Option<Uuid>,
    body: &str,
    max_body_bytes: usize,
) -> Result<SendTarget, (ErrorCode, String)> {
    if id.is_empty() || id.len() > MAX_CLIENT_ID_BYTES {
        return Err((
            ErrorCode::BadRequest,
            format!("id must be 1 to {MAX_CLIENT_ID_BYTES} bytes"),
        ));
    }
    if body.trim().is_empty() {
        return Err((ErrorCode::BadRequest, "body must not be empty".into()));
    }
    if body.contains('\0') {
        return Err((
            ErrorCode::BadRequest,
            "body must not contain NUL characters".into(),
        ));
    }
    if body.len() > max_body_bytes {
        return Err((
            ErrorCode::TooLarge,
            format!("body exceeds {max_body_bytes} bytes"),
        ));
    }
    match (to, conversation_id) {
        (Some(to), None) => Ok(SendTarget::User(to)),
        (None, Some(conversation)) => Ok(SendTarget::Conversation(conversation)),
        _ => Err((
            ErrorCode::BadRequest,
            "give exactly one of to and conversation_id".into(),
        )),
    }
}

/// The conversations a `sync` asks for: one (`conversation_id`, with `after_seq` defaulting to
/// 0) or a list (`conversations`), never both, 1 to [`MAX_SYNC_CONVERSATIONS`] of them.
pub fn sync_points(
    conversation_id: Option<Uuid>,
    after_seq: Option<i64>,
    conversations: Option<Vec<SyncPoint>>,
) -> Result<Vec<SyncPoint>, (ErrorCode, String)> {
    let points = match (conversation_id, conversations) {
        (Some(conversation_id), None) => vec![SyncPoint {
            conversation_id,
            after_seq: after_seq.unwrap_or(0),
        }],
        (None, Some(points)) if after_seq.is_none() => points,
        _ => {
            return Err((
                ErrorCode::BadRequest,
                "give conversation_id (and after_seq) or conversations".into(),
            ))
        }
    };
    if points.is_empty() || points.len() > MAX_SYNC_CONVERSATIONS {
        return Err((
            ErrorCode::BadRequest,
            format!("sync 1 to {MAX_SYNC_CONVERSATIONS} conversations"),
        ));
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONV: &str = "0190c8a4-0000-7000-8000-000000000000";

    /// A refused frame's answer keeps its id when it is short enough to echo, and says what
    /// was wrong.
    #[test]
    fn rejections_name_the_problem_and_echo_short_ids() {
        let cases = [
            ("not json", None, "malformed JSON"),
            ("[1,2]", None, "a frame must be a JSON object"),
            (r#"["sync"]"#, None, "a frame must be a JSON object"),
            (r#" ["typing","x"]"#, None, "a frame must be a JSON object"),
            (r#"{"id":"a"}"#, Some("a"), "missing field `type`"),
            (
                r#"{"type":"shout","id":"b"}"#,
                Some("b"),
                "unknown frame type",
            ),
        ];
        for (text, id, message) in cases {
            let rejection = decode(text).expect_err(text);
            assert_eq!(rejection.id.as_deref(), id, "{text}");
            assert_eq!(rejection.message, message, "{text}");
            assert_eq!(rejection.code, ErrorCode::BadRequest);
        }
        let long_id = "x".repeat(MAX_CLIENT_ID_BYTES + 1);
        let text = format!(r#"{{"type":"send","id":"{long_id}","body":1}}"#);
        let rejection = decode(&text).expect_err("body is not a string");
        assert_eq!(rejection.id, None);
        assert!(rejection.message.starts_with("invalid frame: "));
    }

    /// Each rule of a send, in the order the session applies them.
    #[test]
    fn send_checks() {
        let conv: Uuid = CONV.parse().expect("uuid");
        let ok = check_send("1", None, Some(conv), "hi", 8);
        assert_eq!(ok, Ok(SendTarget::Conversation(conv)));
        assert_eq!(
            check_send("1", Some(conv), None, "hi", 8),
            Ok(SendTarget::User(conv))
        );
        let refused =
            |id: &str, to, c, body: &str| check_send(id, to, c, body, 8).expect_err(body).0;
        assert_eq!(refused("", None, Some(conv), "hi"), ErrorCode::BadRequest);
        let long = "i".repeat(MAX_CLIENT_ID_BYTES + 1);
        assert_eq!(
            refused(&long, None, Some(conv), "hi"),
            ErrorCode::BadRequest
        );
        assert_eq!(refused("1", None, Some(conv), " \n"), ErrorCode::BadRequest);
        assert_eq!(
            refused("1", None, Some(conv), "a\0b"),
            ErrorCode::BadRequest
        );
        assert_eq!(
            refused("1", None, Some(conv), "123456789"),
            ErrorCode::TooLarge
        );
        assert_eq!(refused("1", None, None, "hi"), ErrorCode::BadRequest);
        assert_eq!(
            refused("1", Some(conv), Some(conv), "hi"),
            ErrorCode::BadRequest
        );
    }

    /// A sync names one conversation or a bounded list, never both.
    #[test]
    fn sync_point_rules() {
        let conv: Uuid = CONV.parse().expect("uuid");
        let one = sync_points(Some(conv), None, None).expect("one");
        assert_eq!((one.len(), one[0].after_seq), (1, 0));
        let point = SyncPoint {
            conversation_id: conv,
            after_seq: 5,
        };
        assert!(sync_points(None, None, Some(vec![point])).is_ok());
        assert!(sync_points(None, Some(1), Some(vec![point])).is_err());
        assert!(sync_points(Some(conv), None, Some(vec![point])).is_err());
        assert!(sync_points(None, None, None).is_err());
        assert!(sync_points(None, None, Some(vec![])).is_err());
        let many = vec![point; MAX_SYNC_CONVERSATIONS + 1];
        assert!(sync_points(None, None, Some(many)).is_err());
    }

    /// Frames are objects; serde would read a tagged enum from an array with its fields by
    /// position. Nested structs still read from arrays (docs/conformance.md says so).
    #[test]
    fn frames_are_objects_but_nested_points_may_be_arrays() {
        let send = format!(r#"["send","1",null,"{CONV}","hi"]"#);
        assert!(decode(&send).is_err());
        let sync = format!(r#"{{"type":"sync","conversations":[["{CONV}",3]]}}"#);
        let Ok(ClientFrame::Sync {
            conversations: Some(points),
            ..
        }) = decode(&sync)
        else {
            panic!("a sync with an array point decodes");
        };
        assert_eq!(points[0].after_seq, 3);
    }
}
