//! Reads a client's WebSocket frames off the upgraded connection: RFC 6455 framing with
//! actix-http's codec, fragmented messages reassembled up to a size limit, UTF-8 checked as the
//! fragments arrive, and every failure mapped to the close code RFC 6455 asks for (1002, 1007,
//! 1009). actix-ws's own stream reports several of these alike, so the session reads through this.

use actix_codec::Decoder;
use actix_http::ws::{CloseReason, Codec, Frame, Item, ProtocolError};
use actix_web::web;
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use chat_core::protocol::CloseCode;
use futures_util::StreamExt;

/// A complete message or control frame from the client.
#[derive(Debug)]
pub enum Inbound {
    Text(ByteString),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    Close(Option<CloseReason>),
}

/// Why reading stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// A framing violation: answer with 1002 and close.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Text (or a close reason) that is not UTF-8: answer with 1007 and close.
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// A frame or reassembled message above the limit: answer with 1009 and close.
    #[error("message too big")]
    TooBig,
    /// The connection failed; no close frame can be sent.
    #[error("connection: {0}")]
    Connection(String),
}

impl InboundError {
    /// The close code to answer with, or `None` when the peer is gone.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            InboundError::Protocol(_) => Some(CloseCode::ProtocolError),
            InboundError::InvalidUtf8 => Some(CloseCode::InvalidPayload),
            InboundError::TooBig => Some(CloseCode::MessageTooBig),
            InboundError::Connection(_) => None,
        }
    }
}

/// A fragmented message being reassembled.
struct Partial {
    text: bool,
    bytes: BytesMut,
    /// Prefix of `bytes` already checked to be UTF-8 (text only).
    checked: usize,
}

/// The inbound half of one connection.
pub struct FrameReader {
    payload: web::Payload,
    buffer: BytesMut,
    codec: Codec,
    partial: Option<Partial>,
    max_message: usize,
    failed: bool,
}

impl FrameReader {
    /// Reads `payload` (the upgraded request body), with frames and reassembled messages of at
    /// most `max_message` bytes.
    pub fn new(payload: web::Payload, max_message: usize) -> Self {
        FrameReader {
            payload,
            buffer: BytesMut::new(),
            codec: Codec::new().max_size(max_message),
            partial: None,
            max_message,
            failed: false,
        }
    }

    /// The next message or control frame; `None` once the client's side is closed. After an
    /// error nothing more is read.
    pub async fn recv(&mut self) -> Option<Result<Inbound, InboundError>> {
        if self.failed {
            return None;
        }
        let next = self.next_inbound().await;
        if matches!(next, Some(Err(_))) {
            self.failed = true;
        }
        next
    }

    async fn next_inbound(&mut self) -> Option<Result<Inbound, InboundError>> {
        loop {
            if let Err(e) = check_close_reason(&self.buffer) {
                return Some(Err(e));
            }
            match self.codec.decode(&mut self.buffer) {
                Ok(Some(frame)) => match self.on_frame(frame) {
                    Ok(Some(inbound)) => return Some(Ok(inbound)),
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                },
                Ok(None) => {}
                Err(e) => return Some(Err(classify(e))),
            }
            match self.payload.next().await {
                // Take an empty buffer's chunk as is (no copy; the old allocation is freed).
                Some(Ok(chunk)) if self.buffer.is_empty() => self.buffer = BytesMut::from(chunk),
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => return Some(Err(InboundError::Connection(e.to_string()))),
                None => return None,
            }
        }
    }

    /// A decoded frame: a whole message, a control frame, or a fragment (`None`, keep reading).
    fn on_frame(&mut self, frame: Frame) -> Result<Option<Inbound>, InboundError> {
        Ok(Some(match frame {
            Frame::Text(bytes) => Inbound::Text(utf8(bytes)?),
            Frame::Binary(bytes) => Inbound::Binary(bytes),
            Frame::Ping(bytes) => Inbound::Ping(bytes),
            Frame::Pong(bytes) => Inbound::Pong(bytes),
            Frame::Close(reason) => Inbound::Close(reason),
            Frame::Continuation(item) => return self.on_fragment(item),
        }))
    }

    fn on_fragment(&mut self, item: Item) -> Result<Option<Inbound>, InboundError> {
        // `first` is whether a new message starts, and then whether it is text.
        let (first, bytes, last) = match item {
            Item::FirstText(bytes) => (Some(true), bytes, false),
            Item::FirstBinary(bytes) => (Some(false), bytes, false),
            Item::Continue(bytes) => (None, bytes, false),
            Item::Last(bytes) => (None, bytes, true),
        };
        if let Some(text) = first {
            if self.partial.is_some() {
                return Err(InboundError::Protocol(
                    "a new message inside a fragmented one".into(),
                ));
            }
            self.partial = Some(Partial {
                text,
                bytes: BytesMut::new(),
                checked: 0,
            });
        }
        let Some(partial) = self.partial.as_mut() else {
            return Err(InboundError::Protocol(
                "a continuation without a first fragment".into(),
            ));
        };
        if partial.bytes.len() + bytes.len() > self.max_message {
            return Err(InboundError::TooBig);
        }
        partial.bytes.extend_from_slice(&bytes);
        if partial.text {
            // Fail as soon as a fragment makes the text invalid, not only at the end.
            match std::str::from_utf8(&partial.bytes[partial.checked..]) {
                Ok(_) => partial.checked = partial.bytes.len(),
                Err(e) if e.error_len().is_some() => return Err(InboundError::InvalidUtf8),
                Err(e) => partial.checked += e.valid_up_to(),
            }
        }
        if !last {
            return Ok(None);
        }
        let Some(done) = self.partial.take() else {
            return Ok(None);
        };
        let bytes = done.bytes.freeze();
        Ok(Some(if done.text {
            Inbound::Text(utf8(bytes)?)
        } else {
            Inbound::Binary(bytes)
        }))
    }
}

fn utf8(bytes: Bytes) -> Result<ByteString, InboundError> {
    ByteString::try_from(bytes).map_err(|_| InboundError::InvalidUtf8)
}

/// Maps the codec's errors to the close code RFC 6455 asks for.
fn classify(e: ProtocolError) -> InboundError {
    match e {
        ProtocolError::Overflow => InboundError::TooBig,
        // Reserved bits, unmasked frames, bad opcodes, long or fragmented control frames, close
        // codes outside the registry, continuation errors.
        other => InboundError::Protocol(other.to_string()),
    }
}

/// The codec reports an invalid close code and a close reason that is not UTF-8 alike; RFC 6455
/// wants 1002 for the first and 1007 for the second. So a complete close frame at the head of
/// the buffer with a valid code is checked here first.
fn check_close_reason(buffer: &[u8]) -> Result<(), InboundError> {
    let [first, second, rest @ ..] = buffer else {
        return Ok(());
    };
    let masked = second & 0x80 != 0;
    let len = usize::from(second & 0x7f);
    if first & 0x0f != 0x8 || !masked || !(3..=125).contains(&len) || rest.len() < 4 + len {
        return Ok(());
    }
    let (mask, payload) = rest.split_at(4);
    let unmasked: Vec<u8> = payload[..len]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    let code = u16::from_be_bytes([unmasked[0], unmasked[1]]);
    let code_valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
    if code_valid && std::str::from_utf8(&unmasked[2..]).is_err() {
        return Err(InboundError::InvalidUtf8);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame (mask 0x01020304) with `payload`.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() <= 125);
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![first, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn close_reasons_that_are_not_utf8_are_1007_and_bad_codes_are_left_to_the_codec() {
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(&[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xff]);
        assert!(matches!(
            check_close_reason(&frame(0x88, &bad_reason)),
            Err(InboundError::InvalidUtf8)
        ));
        let mut good = 1000u16.to_be_bytes().to_vec();
        good.extend_from_slice("bye κόσμε".as_bytes());
        assert!(check_close_reason(&frame(0x88, &good)).is_ok());
        // Code 999 with a bad reason: a protocol error (1002), which the codec reports.
        let mut bad_code = 999u16.to_be_bytes().to_vec();
        bad_code.extend_from_slice(&[0xff]);
        assert!(check_close_reason(&frame(0x88, &bad_code)).is_ok());
        // Incomplete frames and other opcodes are not looked at.
        let whole = frame(0x88, &bad_reason);
        assert!(check_close_reason(&whole[..whole.len() - 1]).is_ok());
        assert!(check_close_reason(&frame(0x81, &bad_reason)).is_ok());
        assert!(check_close_reason(&[]).is_ok());
    }

    #[test]
    fn codec_errors_map_to_close_codes() {
        assert_eq!(
            classify(ProtocolError::Overflow).close_code(),
            Some(CloseCode::MessageTooBig)
        );
        assert_eq!(
            classify(ProtocolError::BadOpCode).close_code(),
            Some(CloseCode::ProtocolError)
        );
        assert_eq!(
            classify(ProtocolError::UnmaskedFrame).close_code(),
            Some(CloseCode::ProtocolError)
        );
        assert_eq!(InboundError::Connection("reset".into()).close_code(), None);
    }
}
