//! `GET /debug/echo`: a WebSocket echo with the same frame reader, limits and close codes as
//! `/ws`, served only when `gateway_debug_echo` is on, so that the Autobahn test cases can drive
//! our WebSocket stack (they need a peer that echoes). No authentication, no Origin check; it
//! counts against the node's connections and the handshakes per IP like `/ws`.

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseReason, Session};

use super::admission::Slot;
use super::outbox::WRITE_TIMEOUT;
use super::reader::{FrameReader, Inbound};
use super::Services;
use crate::api_error::ApiError;

/// Upgrades and echoes text and binary messages until the peer closes or breaks the protocol.
pub async fn echo(
    ws: web::Data<Services>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let slot = super::handshake::take_place(&ws, &req)?;
    let max = ws.settings.max_frame_bytes;
    let (response, session, reader) = super::handshake::upgrade(&req, body, max).await?;
    actix_web::rt::spawn(ws.tasks.track_future(run(session, reader, slot)));
    Ok(response)
}

/// Echoes until the peer is done; `_slot` holds the connection's place in the node's capacity.
async fn run(mut session: Session, mut reader: FrameReader, _slot: Slot) {
    let close = loop {
        let written = match reader.recv().await {
            None => break None,
            Some(Ok(Inbound::Text(text))) => timed(session.text(text)).await,
            Some(Ok(Inbound::Binary(bytes))) => timed(session.binary(bytes)).await,
            Some(Ok(Inbound::Ping(payload))) => timed(session.pong(&payload)).await,
            Some(Ok(Inbound::Pong(_))) => true,
            Some(Ok(Inbound::Close(reason))) => break reason,
            Some(Err(e)) => match e.close_code() {
                Some(code) => {
                    break Some(CloseReason {
                        code: actix_ws::CloseCode::from(code.code()),
                        description: Some(code.reason().to_string()),
                    })
                }
                None => return,
            },
        };
        if !written {
            return;
        }
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, session.close(close)).await;
}

async fn timed<F>(write: F) -> bool
where
    F: std::future::Future<Output = Result<(), actix_ws::Closed>>,
{
    matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(())))
}
