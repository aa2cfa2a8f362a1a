//! What travels between nodes on a topic, typed: a message with the routing facts beside its
//! frame, a relayed event, or a revocation. Parsed once where it enters a node; nothing
//! downstream reads JSON to route it. Also its wire form on Redis pub/sub.
//!
//! Wire form (one pub/sub payload):
//! - `m <origin> <conversation> <ts> <seq>[ <traceparent>]\n<message frame JSON>`
//! - `e <origin>\n<event frame JSON>` (a `read`, `typing`, `presence` or `membership` frame)
//! - `r <before>` (tokens issued before Unix second `before` are revoked)
//!
//! The message header is built around the seq like the frame, because the append script learns
//! the seq only when it runs (see [`message_header_around_seq`]).

use bytes::Bytes;
use bytestring::ByteString;
use chat_protocol::{MessageFrame, ServerFrame};
use uuid::Uuid;

/// A message published by the log, ready to forward: its frame bytes are shared by every
/// recipient on every node.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageEnvelope {
    /// The connection that sent it (it gets the ack instead), or nil.
    pub origin: Uuid,
    pub conversation: Uuid,
    pub seq: i64,
    /// The accepting node's clock, Unix ms (delivery latency is measured from it).
    pub ts: i64,
    /// The accepting span's `traceparent`, when the send was traced.
    pub trace_parent: Option<Box<str>>,
    /// The `message` frame, exactly as sent to clients.
    pub frame: ByteString,
}

/// Everything a topic carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Envelope {
    Message(MessageEnvelope),
    /// A frame relayed to the topic's connections: `read`, `typing`, `presence` or
    /// `membership`. `origin` is the connection that caused it (it does not get it back), or nil.
    Event {
        origin: Uuid,
        frame: ServerFrame,
        json: ByteString,
    },
    /// The user's password changed: tokens older than the change are revoked and connections
    /// holding one close with 4101. Tokens carrying a version below `version` are older; those
    /// without one (0.2's) if issued in or before the second `before` (Unix seconds). `version`
    /// is `None` from 0.2 nodes during a rolling upgrade.
    Revoked {
        before: u64,
        version: Option<i64>,
    },
}

/// A payload that is not an envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("malformed envelope header")]
    Header,
    #[error("envelope frame is not UTF-8")]
    Utf8,
    #[error("envelope frame is not a relayable frame")]
    Frame,
}

impl Envelope {
    /// An event envelope: `frame` serialized once. Only `read`, `typing`, `presence`,
    /// `membership` and `rebased` frames are relayed between nodes.
    pub fn event(origin: Uuid, frame: ServerFrame) -> Self {
        debug_assert!(is_relayable(&frame), "{frame:?} is not relayed");
        let json = ByteString::from(frame.to_json());
        Envelope::Event {
            origin,
            frame,
            json,
        }
    }

    /// The conversation the envelope is about, if any (a message, a receipt, typing, a
    /// membership change, a re-base).
    pub fn conversation(&self) -> Option<Uuid> {
        match self {
            Envelope::Message(m) => Some(m.conversation),
            Envelope::Event { frame, .. } => match frame {
                ServerFrame::Read {
                    conversation_id, ..
                }
                | ServerFrame::Typing {
                    conversation_id, ..
                }
                | ServerFrame::Membership {
                    conversation_id, ..
                }
                | ServerFrame::Rebased {
                    conversation_id, ..
                } => Some(*conversation_id),
                _ => None,
            },
            Envelope::Revoked { .. } => None,
        }
    }

    /// The envelope's wire form.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Envelope::Message(m) => {
                let (head, tail) = message_header_around_seq(
                    m.origin,
                    m.conversation,
                    m.ts,
                    m.trace_parent.as_deref(),
                );
                let mut out = Vec::with_capacity(head.len() + tail.len() + m.frame.len() + 24);
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(m.seq.to_string().as_bytes());
                out.extend_from_slice(tail.as_bytes());
                out.push(b'\n');
                out.extend_from_slice(m.frame.as_bytes());
                out
            }
            Envelope::Event { origin, json, .. } => format!("e {origin}\n{json}").into_bytes(),
            Envelope::Revoked {
                before,
                version: Some(version),
            } => format!("r {before} {version}").into_bytes(),
            Envelope::Revoked {
                before,
                version: None,
            } => format!("r {before}").into_bytes(),
        }
    }

    /// Parses a wire payload. Also reads the untyped payloads of gateways before 0.2
    /// (`<origin>[ <traceparent>]\n<frame>`), so a rolling upgrade keeps delivering from old
    /// nodes to new ones.
    pub fn decode(payload: &[u8]) -> Result<Envelope, EnvelopeError> {
        // A message's header has two UUIDs at fixed places before its newline: skip them.
        let from = if payload.starts_with(b"m ") {
            MESSAGE_UUIDS.min(payload.len())
        } else {
            0
        };
        let (header, body) = match payload[from..].iter().position(|b| *b == b'\n') {
            Some(at) => (&payload[..from + at], Some(&payload[from + at + 1..])),
            None => (payload, None),
        };
        if let (Some(rest), Some(body)) = (header.strip_prefix(b"m "), body) {
            return decode_message(rest, body);
        }
        let header = std::str::from_utf8(header).map_err(|_| EnvelopeError::Header)?;
        let mut fields = header.split(' ');
        match (fields.next(), body) {
            (Some("e"), Some(body)) => {
                let origin = parse_uuid(fields.next().ok_or(EnvelopeError::Header)?)?;
                event_from_json(origin, utf8(body)?)
            }
            (Some("r"), None) => {
                let before = fields
                    .next()
                    .and_then(|b| b.parse().ok())
                    .ok_or(EnvelopeError::Header)?;
                let version = match fields.next() {
                    Some(v) => Some(v.parse().map_err(|_| EnvelopeError::Header)?),
                    None => None,
                };
                Ok(Envelope::Revoked { before, version })
            }
            (Some(legacy), Some(body)) => decode_legacy(parse_uuid(legacy)?, fields.next(), body),
            _ => Err(EnvelopeError::Header),
        }
    }
}

/// Bytes of a message header before anything but its two UUIDs (`m <origin> <conversation> `).
const MESSAGE_UUIDS: usize = 2 + 2 * 37;

/// A message envelope after its `m `: two hyphenated UUIDs at fixed places, then ts, seq and
/// the optional traceparent. Read by position, as every node does for every message.
fn decode_message(header: &[u8], body: &[u8]) -> Result<Envelope, EnvelopeError> {
    const UUID: usize = 36;
    let uuid_at = |at: usize| {
        header
            .get(at..at + UUID)
            .and_then(|b| Uuid::try_parse_ascii(b).ok())
            .filter(|_| header.get(at + UUID) == Some(&b' '))
            .ok_or(EnvelopeError::Header)
    };
    let origin = uuid_at(0)?;
    let conversation = uuid_at(UUID + 1)?;
    let rest = header
        .get(2 * (UUID + 1)..)
        .and_then(|r| std::str::from_utf8(r).ok())
        .ok_or(EnvelopeError::Header)?;
    let mut fields = rest.splitn(3, ' ');
    let mut number = || {
        fields
            .next()
            .and_then(|f| f.parse::<i64>().ok())
            .ok_or(EnvelopeError::Header)
    };
    let ts = number()?;
    let seq = number()?;
    Ok(Envelope::Message(MessageEnvelope {
        origin,
        conversation,
        seq,
        ts,
        trace_parent: fields.next().map(Box::from),
        frame: utf8(body)?,
    }))
}

/// Whether nodes relay this frame to other connections.
fn is_relayable(frame: &ServerFrame) -> bool {
    matches!(
        frame,
        ServerFrame::Read { .. }
            | ServerFrame::Typing { .. }
            | ServerFrame::Presence { .. }
            | ServerFrame::Membership { .. }
            | ServerFrame::Rebased { .. }
    )
}

fn parse_uuid(text: &str) -> Result<Uuid, EnvelopeError> {
    Uuid::parse_str(text).map_err(|_| EnvelopeError::Header)
}

fn utf8(bytes: &[u8]) -> Result<ByteString, EnvelopeError> {
    ByteString::try_from(Bytes::copy_from_slice(bytes)).map_err(|_| EnvelopeError::Utf8)
}

fn event_from_json(origin: Uuid, json: ByteString) -> Result<Envelope, EnvelopeError> {
    let frame: ServerFrame = serde_json::from_str(&json).map_err(|_| EnvelopeError::Frame)?;
    if !is_relayable(&frame) {
        return Err(EnvelopeError::Frame);
    }
    Ok(Envelope::Event {
        origin,
        frame,
        json,
    })
}

/// A payload of a gateway before 0.2: the frame's `type` says what it is. Read fully only on
/// this path, which lasts as long as a rolling upgrade.
fn decode_legacy(
    origin: Uuid,
    trace_parent: Option<&str>,
    body: &[u8],
) -> Result<Envelope, EnvelopeError> {
    let json = utf8(body)?;
    let value: serde_json::Value = serde_json::from_str(&json).map_err(|_| EnvelopeError::Frame)?;
    match value.get("type").and_then(|t| t.as_str()) {
        Some("message") => {
            let m: MessageFrame =
                serde_json::from_value(value).map_err(|_| EnvelopeError::Frame)?;
            Ok(Envelope::Message(MessageEnvelope {
                origin,
                conversation: m.conversation_id,
                seq: m.seq,
                ts: m.ts,
                trace_parent: trace_parent.map(Box::from),
                frame: json,
            }))
        }
        Some("revoked") => Ok(Envelope::Revoked {
            before: value
                .get("before")
                .and_then(|b| b.as_u64())
                .ok_or(EnvelopeError::Frame)?,
            version: None,
        }),
        _ => event_from_json(origin, json),
    }
}

/// The header of a message envelope split around its seq: `head + seq + tail`, then `\n` and
/// the frame, is the envelope's wire form. The append script joins them.
pub fn message_header_around_seq(
    origin: Uuid,
    conversation: Uuid,
    ts: i64,
    trace_parent: Option<&str>,
) -> (String, String) {
    let mut head = String::with_capacity(2 + 2 * 37 + 21);
    let mut buf = Uuid::encode_buffer();
    head.push_str("m ");
    head.push_str(origin.hyphenated().encode_lower(&mut buf));
    head.push(' ');
    head.push_str(conversation.hyphenated().encode_lower(&mut buf));
    head.push(' ');
    head.push_str(&ts.to_string());
    head.push(' ');
    let tail = trace_parent.map(|tp| format!(" {tp}")).unwrap_or_default();
    (head, tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_protocol::{MembershipChange, PresenceStatus};

    fn message(trace_parent: Option<&str>) -> Envelope {
        Envelope::Message(MessageEnvelope {
            origin: Uuid::new_v4(),
            conversation: Uuid::new_v4(),
            seq: 42,
            ts: 1_700_000_000_123,
            trace_parent: trace_parent.map(Box::from),
            frame: ByteString::from_static("{\"type\":\"message\",\"body\":\"a\\nb m x\"}"),
        })
    }

    /// Every kind of envelope reads back as it was written.
    #[test]
    fn envelopes_round_trip() {
        let user = Uuid::now_v7();
        let room = Uuid::now_v7();
        let envelopes = [
            message(None),
            message(Some(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )),
            Envelope::event(
                Uuid::new_v4(),
                ServerFrame::Read {
                    conversation_id: room,
                    user_id: user,
                    seq: 3,
                },
            ),
            Envelope::event(
                Uuid::nil(),
                ServerFrame::Membership {
                    conversation_id: room,
                    user_id: user,
                    change: MembershipChange::Removed,
                    by: user,
                    role: None,
                },
            ),
            Envelope::event(
                Uuid::nil(),
                ServerFrame::Presence {
                    user_id: user,
                    status: PresenceStatus::Online,
                    ts: 5,
                },
            ),
            Envelope::Revoked {
                before: 1_700_000_000,
                version: Some(3),
            },
            Envelope::Revoked {
                before: 1_700_000_000,
                version: None,
            },
        ];
        for envelope in envelopes {
            assert_eq!(Envelope::decode(&envelope.encode()), Ok(envelope));
        }
    }

    /// The header the append script builds around the seq is the one `encode` writes.
    #[test]
    fn script_header_matches_encode() {
        let Envelope::Message(m) = message(Some("tp")) else {
            unreachable!()
        };
        let (head, tail) = message_header_around_seq(m.origin, m.conversation, m.ts, Some("tp"));
        let scripted = format!("{head}{}{tail}\n{}", m.seq, m.frame);
        assert_eq!(scripted.into_bytes(), Envelope::Message(m).encode());
    }

    /// Frames never relayed between nodes, garbage and broken headers are refused.
    #[test]
    fn foreign_payloads_are_refused() {
        let hello = format!(
            "e {}\n{}",
            Uuid::nil(),
            ServerFrame::Resync { reason: "x".into() }.to_json()
        );
        assert_eq!(
            Envelope::decode(hello.as_bytes()),
            Err(EnvelopeError::Frame)
        );
        assert_eq!(Envelope::decode(b"m nope\n{}"), Err(EnvelopeError::Header));
        let Envelope::Message(m) = message(None) else {
            unreachable!()
        };
        let good = Envelope::Message(m).encode();
        let mut shifted = good.clone();
        shifted.insert(2, b' ');
        assert_eq!(Envelope::decode(&shifted), Err(EnvelopeError::Header));
        let no_seq = format!("m {} {} 5\n{{}}", Uuid::nil(), Uuid::nil());
        assert_eq!(
            Envelope::decode(no_seq.as_bytes()),
            Err(EnvelopeError::Header)
        );
        assert_eq!(Envelope::decode(b"r soon"), Err(EnvelopeError::Header));
        assert_eq!(Envelope::decode(b"no newline"), Err(EnvelopeError::Header));
        let bad_utf8 = [
            b"e ".as_slice(),
            Uuid::nil().to_string().as_bytes(),
            b"\n\xff",
        ]
        .concat();
        assert_eq!(Envelope::decode(&bad_utf8), Err(EnvelopeError::Utf8));
    }

    /// Payloads of gateways before 0.2 still route: messages, events and revocations.
    #[test]
    fn legacy_payloads_decode() {
        let origin = Uuid::new_v4();
        let conversation = Uuid::new_v4();
        let frame = format!(
            "{{\"type\":\"message\",\"msg_id\":\"{}\",\"conversation_id\":\"{conversation}\",\"seq\":7,\"from\":\"{}\",\"body\":\"hi\",\"ts\":99}}",
            Uuid::now_v7(),
            Uuid::now_v7()
        );
        let Ok(Envelope::Message(m)) =
            Envelope::decode(format!("{origin} tp-1\n{frame}").as_bytes())
        else {
            panic!("legacy message")
        };
        assert_eq!(
            (
                m.origin,
                m.conversation,
                m.seq,
                m.ts,
                m.trace_parent.as_deref()
            ),
            (origin, conversation, 7, 99, Some("tp-1"))
        );
        assert_eq!(
            Envelope::decode(
                format!("{}\n{{\"type\":\"revoked\",\"before\":12}}", Uuid::nil()).as_bytes()
            ),
            Ok(Envelope::Revoked {
                before: 12,
                version: None
            })
        );
        let typing = ServerFrame::Typing {
            conversation_id: conversation,
            user_id: origin,
        };
        assert!(matches!(
            Envelope::decode(format!("{origin}\n{}", typing.to_json()).as_bytes()),
            Ok(Envelope::Event { frame, .. }) if frame == typing
        ));
    }
}
