//! One WebSocket connection: the handshake (Origin, token, subscription), then a single loop over
//! client frames, queued deliveries, heartbeats, token expiry and shutdown.

use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{
    AggregatedMessage, AggregatedMessageStream, CloseReason, Closed, ProtocolError, Session,
};
use bytestring::ByteString;
use chat_core::conversation::direct_conversation_id;
use chat_core::protocol::{ClientFrame, CloseCode, ErrorCode, ServerFrame};
use chat_core::stream::NewMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::accounts::authenticate;
use crate::api_error::ApiError;
use crate::hub::LocalConn;
use crate::node::Node;

/// Longest a single write to the socket may wait before the client counts as a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest client message id accepted.
const MAX_CLIENT_ID_BYTES: usize = 128;

/// `GET /ws`: checks Origin and token, subscribes the user, then upgrades.
pub async fn handshake(
    node: web::Data<Node>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let result = accept(&node, &req, body).await;
    let label = match &result {
        Ok(_) => "accepted",
        Err(e) => e.code.as_str(),
    };
    node.metrics.handshakes.with_label_values(&[label]).inc();
    result
}

async fn accept(
    node: &web::Data<Node>,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    check_origin(node, req)?;
    let identity = authenticate(node, req, true)?;
    if node.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "this node is draining; connect to another node",
        ));
    }
    let (response, session, stream) = actix_ws::handle(req, body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "expected a WebSocket upgrade request",
        )
    })?;

    let cfg = &node.config.raw;
    let conn_id = Uuid::new_v4();
    let user_id = identity.user_id;
    let (outbound_tx, outbound) = mpsc::channel(cfg.gateway_outbound_queue);
    let kick = CancellationToken::new();
    node.hub.register(
        user_id,
        LocalConn {
            conn_id,
            outbound: outbound_tx,
            kick: kick.clone(),
        },
    );
    // Hello goes out only once this node receives the user's channel: nothing sent to the user
    // after the hello can be missed.
    if let Err(e) = node.broker.ensure_subscribed(user_id).await {
        tracing::warn!(error = %e, %conn_id, "subscription failed during handshake");
        if node.hub.unregister(user_id, conn_id) {
            node.broker.release(user_id).await;
        }
        return Err(ApiError::unavailable("messaging"));
    }

    let stream = stream
        .max_frame_size(cfg.gateway_max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(cfg.gateway_max_frame_bytes);
    let connection = Connection {
        node: node.clone(),
        user_id,
        conn_id,
        token_exp: identity.exp,
    };
    node.metrics.connections_open.inc();
    tracing::debug!(%conn_id, %user_id, "connection open");
    actix_web::rt::spawn(connection.run(session, stream, outbound, kick));
    Ok(response)
}

/// Refuses browsers from Origins not on the allow-list (cross-site WebSocket hijacking).
/// Clients that send no Origin are not browsers and are allowed.
fn check_origin(node: &Node, req: &HttpRequest) -> Result<(), ApiError> {
    let allowed = &node.config.allowed_origins;
    if allowed.is_empty() {
        return Ok(());
    }
    let Some(origin) = req.headers().get(actix_web::http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
    if allowed.iter().any(|a| a == origin) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "origin not allowed",
        ))
    }
}

/// The state of one open connection.
struct Connection {
    node: web::Data<Node>,
    user_id: Uuid,
    conn_id: Uuid,
    token_exp: u64,
}

/// How the loop ended: close with a code, or the peer is already gone.
enum End {
    Close(CloseCode),
    /// The client sent a close frame; echo its code.
    ClientClosed(Option<CloseReason>),
    Gone,
}

impl Connection {
    async fn run(
        self,
        mut session: Session,
        mut stream: AggregatedMessageStream,
        mut outbound: mpsc::Receiver<ByteString>,
        kick: CancellationToken,
    ) {
        let cfg = &self.node.config.raw;
        let heartbeat = Duration::from_secs(cfg.gateway_heartbeat_secs);
        let client_timeout = Duration::from_secs(cfg.gateway_client_timeout_secs);
        let hello = ServerFrame::Hello {
            user_id: self.user_id,
            conn_id: self.conn_id,
            node_id: self.node.config.node_id.clone(),
            heartbeat_ms: heartbeat.as_millis() as u64,
        };
        let mut end = match self.send(&mut session, &hello).await {
            Ok(()) => None,
            Err(_) => Some(End::Gone),
        };

        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        let mut last_heard = Instant::now();
        let until_expiry = self.token_exp.saturating_sub(crate::auth::unix_now());
        let expiry = tokio::time::sleep(Duration::from_secs(until_expiry));
        tokio::pin!(expiry);
        let shutdown = self.node.shutdown.clone();

        while end.is_none() {
            end = tokio::select! {
                _ = shutdown.cancelled() => Some(End::Close(CloseCode::GoingAway)),
                _ = kick.cancelled() => Some(End::Close(CloseCode::SlowConsumer)),
                _ = &mut expiry => Some(End::Close(CloseCode::TokenExpired)),
                frame = outbound.recv() => match frame {
                    Some(frame) => match tokio::time::timeout(WRITE_TIMEOUT, session.text(frame)).await {
                        Ok(Ok(())) => {
                            self.node.metrics.messages_delivered.inc();
                            self.node.metrics.frames_out_message.inc();
                            None
                        }
                        Ok(Err(Closed)) => Some(End::Gone),
                        Err(_) => Some(End::Close(CloseCode::SlowConsumer)),
                    },
                    None => Some(End::Close(CloseCode::InternalError)),
                },
                _ = ticker.tick() => {
                    if last_heard.elapsed() > client_timeout {
                        Some(End::Close(CloseCode::HeartbeatTimeout))
                    } else {
                        match tokio::time::timeout(WRITE_TIMEOUT, session.ping(b"")).await {
                            Ok(Ok(())) => None,
                            Ok(Err(Closed)) => Some(End::Gone),
                            Err(_) => Some(End::Close(CloseCode::SlowConsumer)),
                        }
                    }
                }
                msg = stream.recv() => {
                    last_heard = Instant::now();
                    self.on_client_message(&mut session, msg).await
                }
            };
        }

        if self.node.hub.unregister(self.user_id, self.conn_id) {
            self.node.broker.release(self.user_id).await;
        }
        self.node.metrics.connections_open.dec();
        let reason = match end {
            Some(End::Close(code)) => {
                self.node
                    .metrics
                    .closes
                    .with_label_values(&[code.reason()])
                    .inc();
                Some(CloseReason {
                    code: actix_ws::CloseCode::from(code.code()),
                    description: Some(code.reason().to_string()),
                })
            }
            Some(End::ClientClosed(reason)) => {
                self.node
                    .metrics
                    .closes
                    .with_label_values(&["client"])
                    .inc();
                reason
            }
            Some(End::Gone) | None => {
                self.node.metrics.closes.with_label_values(&["gone"]).inc();
                None
            }
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, session.close(reason)).await;
        tracing::debug!(conn_id = %self.conn_id, "connection closed");
    }

    async fn on_client_message(
        &self,
        session: &mut Session,
        msg: Option<Result<AggregatedMessage, ProtocolError>>,
    ) -> Option<End> {
        let msg = match msg {
            None => return Some(End::Gone),
            Some(Ok(m)) => m,
            Some(Err(ProtocolError::Overflow)) => {
                return Some(End::Close(CloseCode::MessageTooBig))
            }
            // actix-ws reports an over-long continuation as an I/O error.
            Some(Err(ProtocolError::Io(e))) if e.to_string().contains("continuation size") => {
                return Some(End::Close(CloseCode::MessageTooBig))
            }
            Some(Err(ProtocolError::Io(_))) => return Some(End::Gone),
            Some(Err(e)) => {
                tracing::debug!(error = %e, conn_id = %self.conn_id, "protocol error");
                return Some(End::Close(CloseCode::ProtocolError));
            }
        };
        let sent = match msg {
            AggregatedMessage::Text(text) => self.on_text(session, &text).await,
            AggregatedMessage::Binary(_) => {
                self.node
                    .metrics
                    .frames_in
                    .with_label_values(&["binary"])
                    .inc();
                let frame = ServerFrame::error(
                    None,
                    ErrorCode::UnsupportedData,
                    "binary frames are not supported; send JSON text frames",
                );
                self.send(session, &frame).await
            }
            AggregatedMessage::Ping(payload) => {
                match tokio::time::timeout(WRITE_TIMEOUT, session.pong(&payload)).await {
                    Ok(result) => result,
                    Err(_) => Err(Closed),
                }
            }
            AggregatedMessage::Pong(_) => Ok(()),
            AggregatedMessage::Close(reason) => return Some(End::ClientClosed(reason)),
        };
        sent.err().map(|_| End::Gone)
    }

    async fn on_text(&self, session: &mut Session, text: &str) -> Result<(), Closed> {
        let received = Instant::now();
        let frame = match serde_json::from_str::<ClientFrame>(text) {
            Ok(f) => f,
            Err(e) => {
                self.node
                    .metrics
                    .frames_in
                    .with_label_values(&["invalid"])
                    .inc();
                let (id, message) = describe_parse_error(text, &e);
                return self
                    .send(
                        session,
                        &ServerFrame::error(id, ErrorCode::BadRequest, message),
                    )
                    .await;
            }
        };
        match frame {
            ClientFrame::Send { id, to, body } => {
                self.node.metrics.frames_in_send.inc();
                let reply = match self.accept_send(&id, to, body).await {
                    Ok(ack) => ack,
                    Err((code, message)) => ServerFrame::error(Some(id), code, message),
                };
                let sent = self.send(session, &reply).await;
                if matches!(reply, ServerFrame::Ack { .. }) {
                    self.node
                        .metrics
                        .send_latency
                        .observe(received.elapsed().as_secs_f64());
                }
                sent
            }
        }
    }

    /// Validates and appends one message; the ack to send, or the error code and message.
    async fn accept_send(
        &self,
        id: &str,
        to: Uuid,
        body: String,
    ) -> Result<ServerFrame, (ErrorCode, String)> {
        let max_body = self.node.config.raw.gateway_max_body_bytes;
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
        if body.len() > max_body {
            return Err((
                ErrorCode::TooLarge,
                format!("body exceeds {max_body} bytes"),
            ));
        }
        if to == self.user_id {
            return Err((
                ErrorCode::BadRequest,
                "cannot send a direct message to yourself".into(),
            ));
        }
        match self.node.directory.exists(&self.node.db, to).await {
            Ok(true) => {}
            Ok(false) => return Err((ErrorCode::NotFound, "no such recipient".into())),
            Err(e) => {
                tracing::warn!(error = %e, conn_id = %self.conn_id, "recipient lookup failed");
                return Err((
                    ErrorCode::Unavailable,
                    "cannot check the recipient now; retry".into(),
                ));
            }
        }
        let msg = NewMessage {
            msg_id: Uuid::now_v7(),
            conversation_id: direct_conversation_id(self.user_id, to),
            from: self.user_id,
            to,
            body,
            ts: chat_core::now_ms(),
        };
        match self.node.broker.append(&msg, self.conn_id).await {
            Ok(seq) => {
                self.node.metrics.messages_accepted.inc();
                Ok(ServerFrame::Ack {
                    id: id.to_string(),
                    msg_id: msg.msg_id,
                    conversation_id: msg.conversation_id,
                    seq,
                    ts: msg.ts,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, conn_id = %self.conn_id, "append failed");
                Err((ErrorCode::Unavailable, "message not accepted; retry".into()))
            }
        }
    }

    async fn send(&self, session: &mut Session, frame: &ServerFrame) -> Result<(), Closed> {
        let metrics = &self.node.metrics;
        match frame {
            ServerFrame::Ack { .. } => metrics.frames_out_ack.inc(),
            ServerFrame::Hello { .. } => metrics.frames_out.with_label_values(&["hello"]).inc(),
            ServerFrame::Error { code, .. } => {
                metrics
                    .errors_sent
                    .with_label_values(&[code.as_str()])
                    .inc();
                metrics.frames_out.with_label_values(&["error"]).inc();
            }
        }
        // A client that does not read its acks within the timeout is treated as gone.
        match tokio::time::timeout(WRITE_TIMEOUT, session.text(frame.to_json())).await {
            Ok(result) => result,
            Err(_) => Err(Closed),
        }
    }
}

/// The client id (when the frame had one) and a message for a frame that did not parse.
fn describe_parse_error(text: &str, err: &serde_json::Error) -> (Option<String>, String) {
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
            Some(t) if !["send"].contains(&t) => "unknown frame type".to_string(),
            Some(_) => format!("invalid frame: {err}"),
        },
    };
    (id, message)
}
