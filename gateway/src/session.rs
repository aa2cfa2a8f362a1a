//! One WebSocket connection: the handshake (Origin, token, subscription), then a single loop over
//! client frames, queued deliveries, heartbeats, token expiry and shutdown.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseReason, Closed, Session};
use bytestring::ByteString;
use chat_core::conversation::direct_conversation_id;
use chat_core::keys::Topic;
use chat_core::protocol::validate::{self, SendTarget};
use chat_core::protocol::{
    ClientFrame, CloseCode, ErrorCode, PresenceStatus, ServerFrame, SyncPoint,
};
use chat_core::stream::{frame_conversation_seq, frame_ts, Appended, NewMessage};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::accounts::authenticate;
use crate::api_error::ApiError;
use crate::conversations::{self, Membership};
use crate::history;
use crate::hub::LocalConn;
use crate::inbound::{FrameReader, Inbound, InboundError};
use crate::node::Node;
use crate::presence;

/// Longest a single write to the socket may wait before the client counts as a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection is closed with 4029 once its refused sends, draining at the send rate per
/// second, exceed this many seconds' worth of the rate (sending at over twice the limit for
/// about ten seconds, or one flood of twelve seconds' worth).
const ABUSE_FACTOR: f64 = 10.0;

/// Most messages one `sync` sends per conversation; `synced.complete` is false beyond it.
const SYNC_PAGE: i64 = 500;
/// At most one `typing` relayed per conversation per connection in this interval.
const TYPING_INTERVAL: Duration = Duration::from_secs(1);
/// Conversations a connection remembers typing times for, before forgetting the old ones.
const MAX_TYPING_ENTRIES: usize = 64;
/// Users a connection remembers the last presence status of, before starting over.
const MAX_PRESENCE_SEEN: usize = 10_000;
/// The start of the node-internal frame that revokes tokens issued before a password change.
const REVOKED_PREFIX: &str = "{\"type\":\"revoked\"";

/// The `before` (Unix seconds) of a revocation frame.
fn revoked_before(frame: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(frame)
        .ok()?
        .get("before")?
        .as_u64()
}

/// The start of a resync frame.
const RESYNC_PREFIX: &str = "{\"type\":\"resync\"";
/// The start of a presence frame.
const PRESENCE_PREFIX: &str = "{\"type\":\"presence\"";

/// `GET /ws`: checks Origin and token, subscribes the user, then upgrades.
pub async fn handshake(
    node: web::Data<Node>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let span = tracing::info_span!("ws.handshake", result = tracing::field::Empty);
    if let Some(parent) = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|_| chat_core::telemetry::exporting())
    {
        chat_core::telemetry::continue_trace(&span, parent);
    }
    let result = accept(&node, &req, body).instrument(span.clone()).await;
    let label = match &result {
        Ok(_) => "accepted",
        Err(e) => e.code.as_str(),
    };
    span.record("result", label);
    node.metrics.handshakes.with_label_values(&[label]).inc();
    result
}

async fn accept(
    node: &web::Data<Node>,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    check_origin(node, req)?;
    if let Some(ip) = crate::limits::client_ip(node, req) {
        if !node.handshakes.allow(ip) {
            return Err(limited(
                node,
                "handshakes_per_ip",
                "too many connection attempts; retry in a few seconds",
            ));
        }
    }
    let identity = authenticate(node, req, true).await?;
    if !crate::limits::connection_allowed(node, identity.user_id) {
        return Err(limited(
            node,
            "connections_per_user",
            "too many open connections for this user on this node",
        ));
    }
    if node.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "this node is draining; connect to another node",
        ));
    }
    if node.metrics.connections_open.get() >= node.metrics.connections_limit.get() {
        node.metrics
            .rate_limited
            .with_label_values(&["connections"])
            .inc();
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "this node is full; connect to another node",
        ));
    }
    let cfg = &node.config.raw;
    let (response, session, stream) = upgrade(req, body, cfg.gateway_max_frame_bytes).await?;
    let conn_id = Uuid::new_v4();
    let user_id = identity.user_id;
    let (outbound_tx, outbound) = mpsc::channel(cfg.gateway_outbound_queue);
    let kick = CancellationToken::new();
    let first_here = node.hub.register(
        user_id,
        LocalConn {
            conn_id,
            outbound: outbound_tx,
            kick: kick.clone(),
        },
    );
    // Hello goes out only once this node receives the user's channel and their rooms' channels:
    // nothing sent to the user after the hello can be missed. The user's channel comes first, so
    // a membership change made while the rooms load arrives as an event, after the query.
    if let Err(e) = subscribe_user_and_rooms(node, user_id).await {
        tracing::warn!(error = %e, %conn_id, "subscription failed during handshake");
        let released = node.hub.unregister(user_id, conn_id);
        node.broker.release(released).await;
        return Err(ApiError::unavailable("messaging"));
    }

    let connection = Connection {
        node: node.clone(),
        user_id,
        conn_id,
        token_exp: identity.exp,
        token_iat: identity.iat,
        first_here,
    };
    node.metrics.connections_open.inc();
    tracing::debug!(%conn_id, %user_id, "connection open");
    actix_web::rt::spawn(connection.run(session, stream, outbound, kick));
    Ok(response)
}

/// Upgrades the request: the response and the outbound session from actix-ws, and the inbound
/// frames through [`FrameReader`] (frames and reassembled messages up to `max_message` bytes).
pub async fn upgrade(
    req: &HttpRequest,
    body: web::Payload,
    max_message: usize,
) -> Result<(HttpResponse, Session, FrameReader), ApiError> {
    let not_upgrade = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "expected a WebSocket upgrade request",
        )
    };
    // actix-ws gets an empty body: the client's frames are read by the FrameReader.
    let unused = <web::Payload as actix_web::FromRequest>::from_request(
        req,
        &mut actix_web::dev::Payload::None,
    )
    .await
    .map_err(|_| not_upgrade())?;
    let (response, session, _unused_stream) =
        actix_ws::handle(req, unused).map_err(|_| not_upgrade())?;
    Ok((response, session, FrameReader::new(body, max_message)))
}

/// Why a handshake could not subscribe the user.
#[derive(Debug, thiserror::Error)]
enum SubscribeError {
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error("loading rooms: {0}")]
    Rooms(String),
}

async fn subscribe_user_and_rooms(node: &Node, user: Uuid) -> Result<(), SubscribeError> {
    node.broker
        .ensure_subscribed(vec![Topic::User(user)])
        .await?;
    let client = node
        .db
        .get()
        .await
        .map_err(|e| SubscribeError::Rooms(chat_core::db::describe_pool(&e)))?;
    let max_rooms = node.config.raw.gateway_max_rooms_per_user as i64;
    // Every handshake runs this: prepared once per pooled connection (one round trip, not two).
    let statement = client
        .prepare_cached(
            "SELECT m.conversation_id FROM conversation_members m
             JOIN conversations c ON c.id = m.conversation_id
             WHERE m.user_id = $1 AND c.kind = 'room' LIMIT $2",
        )
        .await
        .map_err(|e| SubscribeError::Rooms(chat_core::db::describe(&e)))?;
    let rooms: Vec<Uuid> = client
        .query(&statement, &[&user, &max_rooms])
        .await
        .map_err(|e| SubscribeError::Rooms(chat_core::db::describe(&e)))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let new_rooms = node.hub.join(user, &rooms);
    if !new_rooms.is_empty() {
        let topics = new_rooms.into_iter().map(Topic::Room).collect();
        node.broker.ensure_subscribed(topics).await?;
    }
    Ok(())
}

/// A `429 rate_limited` answer, counted by limit.
fn limited(node: &Node, limit: &str, message: &str) -> ApiError {
    node.metrics.rate_limited.with_label_values(&[limit]).inc();
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RateLimited,
        message,
    )
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
    token_iat: u64,
    /// The user's first connection on this node: it records their presence here (the last one
    /// to close removes it).
    first_here: bool,
}

/// What one connection remembers about the frames it wrote, so a sync and live delivery
/// together send every message of a conversation exactly once on this connection.
#[derive(Default)]
struct Delivered {
    /// The seq of the first live `message` written here, per conversation. Live delivery on a
    /// connection is in seq order and gap-free from there, so a sync stops below it.
    first_live: HashMap<Uuid, i64>,
    /// The highest seq a sync sent for a conversation with no live message yet: queued live
    /// frames at or below it are dropped instead of written twice.
    synced_through: HashMap<Uuid, i64>,
    /// When this connection last relayed `typing`, per conversation.
    typing_at: HashMap<Uuid, Instant>,
    /// The last presence status written here per user: a change reaches a connection once even
    /// when several channels carry it (a watch and a shared room).
    presence_seen: HashMap<Uuid, PresenceStatus>,
    /// Tokens for `send` frames: refilled at `gateway_send_rate_per_sec`, up to twice that.
    send_tokens: f64,
    tokens_at: Option<Instant>,
    /// Refused sends not yet forgiven: +1 per refusal, draining at the send rate per second.
    refused_level: f64,
    /// Set when `refused_level` passed its bound: the connection is closed with 4029.
    abusive: bool,
}

impl Delivered {
    /// Records `status` for `user`; false when this connection already has it.
    fn presence_changed(&mut self, user: Uuid, status: PresenceStatus) -> bool {
        if self.presence_seen.len() >= MAX_PRESENCE_SEEN {
            self.presence_seen.clear();
        }
        self.presence_seen.insert(user, status) != Some(status)
    }

    /// Takes one send token; false when the connection sends faster than `rate` per second.
    /// Refusals pile up (draining at `rate` per second); beyond `ABUSE_FACTOR` × `rate` of them
    /// the connection is marked abusive.
    fn take_send_token(&mut self, rate: u32) -> bool {
        let now = Instant::now();
        let rate = f64::from(rate);
        let burst = rate * 2.0;
        let refill = self
            .tokens_at
            .map_or(burst, |at| now.duration_since(at).as_secs_f64() * rate);
        self.send_tokens = (self.send_tokens + refill).min(burst);
        self.refused_level = (self.refused_level - refill).max(0.0);
        self.tokens_at = Some(now);
        if self.send_tokens >= 1.0 {
            self.send_tokens -= 1.0;
            true
        } else {
            self.refused_level += 1.0;
            self.abusive |= self.refused_level > ABUSE_FACTOR * rate;
            false
        }
    }
}

impl Delivered {
    /// Whether and how a live frame should be written; records the first live seq of its
    /// conversation.
    fn admit(&mut self, frame: &str) -> Outbound {
        if frame.starts_with(RESYNC_PREFIX) {
            // Live delivery had a gap: a sync must no longer stop below the first live seq.
            self.first_live.clear();
            self.synced_through.clear();
            return Outbound::Event;
        }
        let Some((conversation, seq)) = frame_conversation_seq(frame) else {
            if frame.starts_with(PRESENCE_PREFIX) {
                if let Ok(ServerFrame::Presence {
                    user_id, status, ..
                }) = serde_json::from_str(frame)
                {
                    if !self.presence_changed(user_id, status) {
                        return Outbound::Skip;
                    }
                }
            }
            return Outbound::Event;
        };
        if let Some(through) = self.synced_through.get(&conversation) {
            if seq <= *through {
                return Outbound::Skip;
            }
            self.synced_through.remove(&conversation);
        }
        self.first_live.entry(conversation).or_insert(seq);
        Outbound::Message
    }
}

/// What to do with a queued live frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outbound {
    /// Already sent on this connection (by a sync, or the same presence status).
    Skip,
    /// A `message` frame.
    Message,
    /// Any other relayed frame (read, typing, presence, membership, resync).
    Event,
}

/// The `type` of a relayed frame, as a metric label from a fixed set.
fn event_label(frame: &str) -> &'static str {
    const TYPES: [&str; 5] = ["read", "typing", "presence", "membership", "resync"];
    let kind = frame
        .strip_prefix("{\"type\":\"")
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default();
    TYPES.into_iter().find(|t| *t == kind).unwrap_or("other")
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
        mut stream: FrameReader,
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
        let mut delivered = Delivered::default();
        if end.is_none() && self.first_here {
            match self.node.presence.join(&self.node, self.user_id).await {
                // Announced beside the session: a reconnect storm must not hold up the frames.
                Ok(true) => {
                    let (node, user) = (self.node.clone(), self.user_id);
                    actix_web::rt::spawn(async move {
                        presence::announce(&node, user, PresenceStatus::Online).await
                    });
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, conn_id = %self.conn_id, "presence join failed")
                }
            }
        }

        while end.is_none() {
            end = tokio::select! {
                _ = shutdown.cancelled() => Some(End::Close(CloseCode::GoingAway)),
                _ = kick.cancelled() => Some(End::Close(CloseCode::SlowConsumer)),
                _ = &mut expiry => Some(End::Close(CloseCode::TokenExpired)),
                frame = outbound.recv() => match frame {
                    Some(frame) if frame.starts_with(REVOKED_PREFIX) => {
                        revoked_before(&frame)
                            .filter(|before| self.token_iat < *before)
                            .map(|_| End::Close(CloseCode::TokenRevoked))
                    }
                    Some(frame) => match delivered.admit(&frame) {
                        Outbound::Skip => None,
                        kind => {
                            let ts = (kind == Outbound::Message).then(|| frame_ts(&frame)).flatten();
                            let label = (kind == Outbound::Event).then(|| event_label(&frame));
                            match tokio::time::timeout(WRITE_TIMEOUT, session.text(frame)).await {
                                Ok(Ok(())) => {
                                    self.count_written(ts, label);
                                    None
                                }
                                Ok(Err(Closed)) => Some(End::Gone),
                                Err(_) => Some(End::Close(CloseCode::SlowConsumer)),
                            }
                        }
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
                    self.on_client_message(&mut session, msg, &mut delivered).await
                }
            };
        }

        let released = self.node.hub.unregister(self.user_id, self.conn_id);
        let last_here = released.contains(&Topic::User(self.user_id));
        self.node.broker.release(released).await;
        self.node.metrics.connections_open.dec();
        if last_here {
            match self.node.presence.leave(&self.node, self.user_id).await {
                Ok(true) => {
                    presence::announce(&self.node, self.user_id, PresenceStatus::Offline).await
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, conn_id = %self.conn_id, "presence leave failed")
                }
            }
        }
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
        msg: Option<Result<Inbound, InboundError>>,
        delivered: &mut Delivered,
    ) -> Option<End> {
        let msg = match msg {
            None => return Some(End::Gone),
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(error = %e, conn_id = %self.conn_id, "inbound frame error");
                return Some(e.close_code().map_or(End::Gone, End::Close));
            }
        };
        let sent = match msg {
            Inbound::Text(text) => {
                let sent = self.on_text(session, &text, delivered).await;
                if delivered.abusive {
                    return Some(End::Close(CloseCode::RateLimited));
                }
                sent
            }
            Inbound::Binary(_) => {
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
            Inbound::Ping(payload) => {
                match tokio::time::timeout(WRITE_TIMEOUT, session.pong(&payload)).await {
                    Ok(result) => result,
                    Err(_) => Err(Closed),
                }
            }
            Inbound::Pong(_) => Ok(()),
            Inbound::Close(reason) => return Some(End::ClientClosed(reason)),
        };
        sent.err().map(|_| End::Gone)
    }

    async fn on_text(
        &self,
        session: &mut Session,
        text: &str,
        delivered: &mut Delivered,
    ) -> Result<(), Closed> {
        let received = Instant::now();
        let frame = match validate::decode(text) {
            Ok(f) => f,
            Err(rejection) => {
                self.node
                    .metrics
                    .frames_in
                    .with_label_values(&["invalid"])
                    .inc();
                return self.send(session, &rejection.into_frame()).await;
            }
        };
        match frame {
            ClientFrame::Send {
                id,
                to,
                conversation_id,
                body,
            } => {
                self.node.metrics.frames_in_send.inc();
                let rate = self.node.config.raw.gateway_send_rate_per_sec;
                let reply = if !delivered.take_send_token(rate) {
                    self.node
                        .metrics
                        .rate_limited
                        .with_label_values(&["send"])
                        .inc();
                    let message = format!("more than {rate} messages per second; slow down");
                    ServerFrame::error(Some(id), ErrorCode::RateLimited, message)
                } else {
                    let span = chat_core::telemetry::span_if_exporting(|| {
                        tracing::info_span!(
                            "chat.send",
                            conn_id = %self.conn_id,
                            outcome = tracing::field::Empty,
                        )
                    });
                    let accepted = self
                        .accept_send(&id, to, conversation_id, body)
                        .instrument(span.clone())
                        .await;
                    span.record(
                        "outcome",
                        match &accepted {
                            Ok(_) => "ack",
                            Err((code, _)) => code.as_str(),
                        },
                    );
                    match accepted {
                        Ok(ack) => ack,
                        Err((code, message)) => ServerFrame::error(Some(id), code, message),
                    }
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
            ClientFrame::Sync {
                conversation_id,
                after_seq,
                conversations,
            } => {
                self.count_in("sync");
                let points = match validate::sync_points(conversation_id, after_seq, conversations)
                {
                    Ok(points) => points,
                    Err((code, message)) => return self.reply_error(session, code, message).await,
                };
                for point in points {
                    self.sync(session, point, delivered).await?;
                }
                Ok(())
            }
            ClientFrame::Read {
                conversation_id,
                seq,
            } => {
                self.count_in("read");
                match self.mark_read(conversation_id, seq).await {
                    Ok(()) => Ok(()),
                    Err((code, message)) => self.reply_error(session, code, message).await,
                }
            }
            ClientFrame::PresenceWatch { user_ids } => {
                self.count_in("presence.watch");
                self.watch(session, user_ids, delivered).await
            }
            ClientFrame::PresenceUnwatch { user_ids } => {
                self.count_in("presence.unwatch");
                let released = self.node.hub.unwatch(self.conn_id, &user_ids);
                self.node.broker.release(released).await;
                Ok(())
            }
            ClientFrame::Typing { conversation_id } => {
                self.count_in("typing");
                match self.relay_typing(conversation_id, delivered).await {
                    Ok(()) => Ok(()),
                    Err((code, message)) => self.reply_error(session, code, message).await,
                }
            }
        }
    }

    /// Starts watching users' presence, then answers their current status, one `presence`
    /// frame each.
    async fn watch(
        &self,
        session: &mut Session,
        user_ids: Vec<Uuid>,
        delivered: &mut Delivered,
    ) -> Result<(), Closed> {
        let max = self.node.config.raw.gateway_max_watched_users;
        let Some(new) = self
            .node
            .hub
            .watch(self.user_id, self.conn_id, &user_ids, max)
        else {
            let message = format!("a connection may watch at most {max} users");
            return self
                .reply_error(session, ErrorCode::BadRequest, message)
                .await;
        };
        if !new.is_empty() {
            let topics = new.into_iter().map(Topic::Presence).collect();
            if let Err(e) = self.node.broker.ensure_subscribed(topics).await {
                tracing::warn!(error = %e, conn_id = %self.conn_id, "watch subscription failed");
                return self
                    .reply_error(session, ErrorCode::Unavailable, "cannot watch now; retry")
                    .await;
            }
        }
        let online = match self.node.presence.online(&self.node, &user_ids).await {
            Ok(online) => online,
            Err(e) => {
                tracing::warn!(error = %e, conn_id = %self.conn_id, "presence read failed");
                return self
                    .reply_error(session, ErrorCode::Unavailable, "cannot read presence now")
                    .await;
            }
        };
        let ts = chat_core::now_ms();
        for (user_id, online) in user_ids.into_iter().zip(online) {
            let status = if online {
                PresenceStatus::Online
            } else {
                PresenceStatus::Offline
            };
            if delivered.presence_changed(user_id, status) {
                let frame = ServerFrame::Presence {
                    user_id,
                    status,
                    ts,
                };
                self.send(session, &frame).await?;
            }
        }
        Ok(())
    }

    /// Counts a live frame written to the socket: a message (with its delivery latency from
    /// `ts`, the sender node's clock) or a relayed event.
    fn count_written(&self, ts: Option<i64>, event: Option<&str>) {
        let metrics = &self.node.metrics;
        match event {
            Some(label) => metrics.frames_out.with_label_values(&[label]).inc(),
            None => {
                metrics.messages_delivered.inc();
                metrics.frames_out_message.inc();
                if let Some(ts) = ts {
                    let age_ms = (chat_core::now_ms() - ts).max(0);
                    metrics.delivery_latency.observe(age_ms as f64 / 1000.0);
                }
            }
        }
    }

    fn count_in(&self, frame_type: &str) {
        self.node
            .metrics
            .frames_in
            .with_label_values(&[frame_type])
            .inc();
    }

    async fn reply_error(
        &self,
        session: &mut Session,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Result<(), Closed> {
        self.send(session, &ServerFrame::error(None, code, message))
            .await
    }

    /// The caller's membership of a conversation, or the error to answer.
    async fn membership(&self, conversation: Uuid) -> Result<Membership, (ErrorCode, String)> {
        match self
            .node
            .conversations
            .resolve(&self.node, self.user_id, conversation)
            .await
        {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err((
                ErrorCode::Forbidden,
                format!("not a member of conversation {conversation}"),
            )),
            Err(e) => {
                tracing::warn!(error = %e, conn_id = %self.conn_id, "membership lookup failed");
                Err((
                    ErrorCode::Unavailable,
                    "cannot check membership now; retry".into(),
                ))
            }
        }
    }

    /// Sends the messages after `point.after_seq` that this connection has not had, then
    /// `synced`. At most `SYNC_PAGE` messages per conversation per request.
    async fn sync(
        &self,
        session: &mut Session,
        point: SyncPoint,
        delivered: &mut Delivered,
    ) -> Result<(), Closed> {
        let conversation = point.conversation_id;
        let after = point.after_seq;
        if after < 0 {
            return self
                .reply_error(
                    session,
                    ErrorCode::BadRequest,
                    "after_seq must be at least 0",
                )
                .await;
        }
        if let Err((code, message)) = self.membership(conversation).await {
            return self.reply_error(session, code, message).await;
        }
        // From the first live message on, live delivery covers the conversation.
        let upper = match delivered.first_live.get(&conversation) {
            Some(first) => first - 1,
            None => match history::last_seq(&self.node, conversation).await {
                Ok(last) => last,
                Err(e) => return self.reply_history_error(session, e).await,
            },
        };
        let hi = upper.min(after.saturating_add(SYNC_PAGE));
        let messages = match history::read_range(&self.node, conversation, after + 1, hi).await {
            Ok(m) => m,
            Err(e) => return self.reply_history_error(session, e).await,
        };
        for message in &messages {
            let text = serde_json::to_string(message).unwrap_or_default();
            match tokio::time::timeout(WRITE_TIMEOUT, session.text(text)).await {
                Ok(Ok(())) => self.node.metrics.frames_out_message.inc(),
                _ => return Err(Closed),
            }
        }
        let complete = hi >= upper;
        let last_seq = if complete { upper.max(after) } else { hi };
        if !delivered.first_live.contains_key(&conversation) {
            delivered.synced_through.insert(conversation, last_seq);
        }
        let synced = ServerFrame::Synced {
            conversation_id: conversation,
            last_seq,
            complete,
        };
        self.send(session, &synced).await
    }

    async fn reply_history_error(
        &self,
        session: &mut Session,
        e: history::HistoryError,
    ) -> Result<(), Closed> {
        tracing::warn!(error = %e, conn_id = %self.conn_id, "sync read failed");
        let message = match e {
            history::HistoryError::CatchingUp => "history is catching up; sync again shortly",
            history::HistoryError::Postgres(_) => "history is unavailable; sync again later",
        };
        self.reply_error(session, ErrorCode::Unavailable, message)
            .await
    }

    /// Stores the caller's read position (never backwards) and relays it when it moved.
    async fn mark_read(&self, conversation: Uuid, seq: i64) -> Result<(), (ErrorCode, String)> {
        if seq < 1 {
            return Err((ErrorCode::BadRequest, "seq must be at least 1".into()));
        }
        let membership = self.membership(conversation).await?;
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::warn!(error = %e, conn_id = %self.conn_id, "read receipt failed");
            (
                ErrorCode::Unavailable,
                "cannot store the read position now; retry".to_string(),
            )
        };
        let last = history::last_seq(&self.node, conversation)
            .await
            .map_err(|e| unavailable(&e))?;
        if seq > last {
            return Err((
                ErrorCode::BadRequest,
                format!("seq {seq} is beyond the conversation's last message ({last})"),
            ));
        }
        let mut client = self
            .node
            .db
            .get()
            .await
            .map_err(|e| unavailable(&chat_core::db::describe_pool(&e)))?;
        let db = |e: tokio_postgres::Error| unavailable(&chat_core::db::describe(&e));
        let tx = client.transaction().await.map_err(db)?;
        if let Membership::Direct { peer } = membership {
            // The worker may not have written the conversation yet; these are the rows it would
            // write, taken in its order (conversation, then members by id) so neither deadlocks.
            let (low, high) = if self.user_id < peer {
                (self.user_id, peer)
            } else {
                (peer, self.user_id)
            };
            tx.execute(
                "INSERT INTO conversations (id, kind) VALUES ($1, 'direct') ON CONFLICT DO NOTHING",
                &[&conversation],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "INSERT INTO conversation_members (conversation_id, user_id)
                 VALUES ($1, $2), ($1, $3) ON CONFLICT DO NOTHING",
                &[&conversation, &low, &high],
            )
            .await
            .map_err(db)?;
        }
        let moved = tx
            .execute(
                "UPDATE conversation_members SET last_read_seq = $3
                 WHERE conversation_id = $1 AND user_id = $2 AND last_read_seq < $3",
                &[&conversation, &self.user_id, &seq],
            )
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        if moved == 0 {
            return Ok(());
        }
        let frame = ServerFrame::Read {
            conversation_id: conversation,
            user_id: self.user_id,
            seq,
        };
        let channels = conversations::channels(&self.node, self.user_id, conversation, membership);
        self.node
            .broker
            .publish(&channels, self.conn_id, &frame.to_json())
            .await
            .map_err(|e| unavailable(&e))
    }

    /// Relays `typing` to the conversation's other members, at most once per conversation per
    /// `TYPING_INTERVAL` from this connection (more are dropped without an error).
    async fn relay_typing(
        &self,
        conversation: Uuid,
        delivered: &mut Delivered,
    ) -> Result<(), (ErrorCode, String)> {
        let membership = self.membership(conversation).await?;
        let now = Instant::now();
        if delivered
            .typing_at
            .get(&conversation)
            .is_some_and(|at| now.duration_since(*at) < TYPING_INTERVAL)
        {
            return Ok(());
        }
        if delivered.typing_at.len() >= MAX_TYPING_ENTRIES {
            delivered
                .typing_at
                .retain(|_, at| now.duration_since(*at) < TYPING_INTERVAL);
        }
        delivered.typing_at.insert(conversation, now);
        let frame = ServerFrame::Typing {
            conversation_id: conversation,
            user_id: self.user_id,
        };
        let channels = conversations::channels(&self.node, self.user_id, conversation, membership);
        self.node
            .broker
            .publish(&channels, self.conn_id, &frame.to_json())
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, conn_id = %self.conn_id, "typing relay failed");
                (ErrorCode::Unavailable, "typing not relayed".to_string())
            })
    }

    /// Validates and appends one message; the ack to send, or the error code and message.
    async fn accept_send(
        &self,
        id: &str,
        to: Option<Uuid>,
        conversation_id: Option<Uuid>,
        body: String,
    ) -> Result<ServerFrame, (ErrorCode, String)> {
        let (conversation_id, to) = self
            .validate_send(id, to, conversation_id, &body)
            .instrument(chat_core::telemetry::span_if_exporting(|| {
                tracing::info_span!("chat.send.validate")
            }))
            .await?;
        let msg = NewMessage {
            msg_id: Uuid::now_v7(),
            conversation_id,
            from: self.user_id,
            to,
            body,
            ts: chat_core::now_ms(),
            trace_parent: chat_core::telemetry::traceparent(&tracing::Span::current()),
        };
        let appended = self
            .node
            .broker
            .append(&msg, id, self.conn_id)
            .instrument(chat_core::telemetry::span_if_exporting(|| {
                tracing::info_span!("redis.append")
            }))
            .await;
        match appended {
            Ok(Appended::New { seq }) => {
                self.node.metrics.messages_accepted.inc();
                Ok(ServerFrame::Ack {
                    id: id.to_string(),
                    msg_id: msg.msg_id,
                    conversation_id: msg.conversation_id,
                    seq,
                    ts: msg.ts,
                })
            }
            // A retry of a send that was appended: the original ack, nothing stored again.
            Ok(Appended::Repeat { seq, msg_id, ts }) => {
                self.node.metrics.sends_repeated.inc();
                Ok(ServerFrame::Ack {
                    id: id.to_string(),
                    msg_id,
                    conversation_id: msg.conversation_id,
                    seq,
                    ts,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, conn_id = %self.conn_id, "append failed");
                Err((ErrorCode::Unavailable, "message not accepted; retry".into()))
            }
        }
    }

    /// Checks a `send`: its id and body, and that the sender may write to the conversation.
    /// Returns the conversation and the direct recipient (`None` in a room).
    async fn validate_send(
        &self,
        id: &str,
        to: Option<Uuid>,
        conversation_id: Option<Uuid>,
        body: &str,
    ) -> Result<(Uuid, Option<Uuid>), (ErrorCode, String)> {
        let max_body = self.node.config.raw.gateway_max_body_bytes;
        let pair = match validate::check_send(id, to, conversation_id, body, max_body)? {
            SendTarget::User(to) => {
                self.check_recipient(to).await?;
                (direct_conversation_id(self.user_id, to), Some(to))
            }
            SendTarget::Conversation(conversation) => match self.membership(conversation).await? {
                Membership::Direct { peer } => (conversation, Some(peer)),
                Membership::Room => (conversation, None),
            },
        };
        Ok(pair)
    }

    /// Checks a direct message's recipient: not the sender, and an existing user.
    async fn check_recipient(&self, to: Uuid) -> Result<(), (ErrorCode, String)> {
        if to == self.user_id {
            return Err((
                ErrorCode::BadRequest,
                "cannot send a direct message to yourself".into(),
            ));
        }
        match self.node.directory.exists(&self.node.db, to).await {
            Ok(true) => Ok(()),
            Ok(false) => Err((ErrorCode::NotFound, "no such recipient".into())),
            Err(e) => {
                tracing::warn!(error = %e, conn_id = %self.conn_id, "recipient lookup failed");
                Err((
                    ErrorCode::Unavailable,
                    "cannot check the recipient now; retry".into(),
                ))
            }
        }
    }

    async fn send(&self, session: &mut Session, frame: &ServerFrame) -> Result<(), Closed> {
        let metrics = &self.node.metrics;
        match frame {
            ServerFrame::Ack { .. } => metrics.frames_out_ack.inc(),
            ServerFrame::Hello { .. } => metrics.frames_out.with_label_values(&["hello"]).inc(),
            ServerFrame::Synced { .. } => metrics.frames_out.with_label_values(&["synced"]).inc(),
            // Relayed frames are written by the delivery path; these arms count direct writes.
            ServerFrame::Read { .. } => metrics.frames_out.with_label_values(&["read"]).inc(),
            ServerFrame::Typing { .. } => metrics.frames_out.with_label_values(&["typing"]).inc(),
            ServerFrame::Resync { .. } => metrics.frames_out.with_label_values(&["resync"]).inc(),
            ServerFrame::Presence { .. } => {
                metrics.frames_out.with_label_values(&["presence"]).inc()
            }
            ServerFrame::Membership { .. } => {
                metrics.frames_out.with_label_values(&["membership"]).inc()
            }
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
