//! The properties the fuzz target (`fuzz/fuzz_targets/client_frame.rs`) checks on every input,
//! here so that `cargo test` checks them on the committed corpus without nightly Rust.

use crate::validate::{self, SendTarget, CLIENT_FRAME_TYPES, MAX_CLIENT_ID_BYTES};
use crate::{ClientFrame, ErrorCode, ServerFrame};

/// Body limit the target checks sends against (the gateway's default).
const MAX_BODY_BYTES: usize = 4096;

/// Decodes `data` as a client's text frame and validates it as the session would, panicking
/// when a property does not hold. Input that is not UTF-8 never reaches the decoder (the frame
/// reader closes with 1007 first), so it is skipped.
pub fn client_frame(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match validate::decode(text) {
        Err(rejection) => {
            assert_eq!(rejection.code, ErrorCode::BadRequest);
            assert!(!rejection.message.is_empty());
            if let Some(id) = &rejection.id {
                assert!(id.len() <= MAX_CLIENT_ID_BYTES, "echoed id too long");
            }
            // The answer is a well-formed frame that reads back the same.
            let frame = rejection.into_frame();
            let json = frame.to_json();
            let back: ServerFrame = serde_json::from_str(&json).expect("error frame reads back");
            assert_eq!(back, frame);
        }
        Ok(frame) => {
            // Whatever decodes is a JSON object with a known type.
            let value: serde_json::Value = serde_json::from_str(text).expect("decoded is JSON");
            let frame_type = value.get("type").and_then(|t| t.as_str());
            assert!(frame_type.is_some_and(|t| CLIENT_FRAME_TYPES.contains(&t)));
            check_frame(frame);
        }
    }
}

fn check_frame(frame: ClientFrame) {
    match frame {
        ClientFrame::Send {
            id,
            to,
            conversation_id,
            body,
        } => match validate::check_send(&id, to, conversation_id, &body, MAX_BODY_BYTES) {
            Ok(target) => {
                assert!(!id.is_empty() && id.len() <= MAX_CLIENT_ID_BYTES);
                assert!(!body.trim().is_empty() && !body.contains('\0'));
                assert!(body.len() <= MAX_BODY_BYTES);
                match target {
                    SendTarget::User(u) => assert!(to == Some(u) && conversation_id.is_none()),
                    SendTarget::Conversation(c) => {
                        assert!(conversation_id == Some(c) && to.is_none())
                    }
                }
            }
            Err((code, message)) => {
                assert!(matches!(code, ErrorCode::BadRequest | ErrorCode::TooLarge));
                assert!(!message.is_empty());
            }
        },
        ClientFrame::Sync {
            conversation_id,
            after_seq,
            conversations,
        } => {
            let listed = conversations.as_ref().map(Vec::len);
            match validate::sync_points(conversation_id, after_seq, conversations) {
                Ok(points) => {
                    assert!((1..=validate::MAX_SYNC_CONVERSATIONS).contains(&points.len()));
                    assert_eq!(points.len(), listed.unwrap_or(1));
                }
                Err((code, _)) => assert_eq!(code, ErrorCode::BadRequest),
            }
        }
        ClientFrame::Read { .. }
        | ClientFrame::Typing { .. }
        | ClientFrame::PresenceWatch { .. }
        | ClientFrame::PresenceUnwatch { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    /// Every input of the committed corpus holds the fuzz target's properties.
    #[test]
    fn committed_corpus_holds_the_properties() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/client_frame");
        let entries = std::fs::read_dir(&dir).expect("the corpus is committed");
        let mut count = 0;
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            super::client_frame(&data);
            count += 1;
        }
        assert!(
            count >= 20,
            "only {count} corpus inputs in {}",
            dir.display()
        );
    }
}
