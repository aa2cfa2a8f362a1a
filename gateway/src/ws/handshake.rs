//! `GET /ws`: admits a connection (Origin, handshakes per IP, a free slot, the token, the
//! per-user limit), upgrades it, subscribes the user and their rooms, and starts its task.
//! Nothing is sent to the user between the subscription and the `hello`, so nothing published
//! after the `hello` can be missed.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::Session;
use chat_core::protocol::ErrorCode;
use chat_core::pubsub::Topic;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::admission::{origin_allowed, Registration, Slot};
use super::connection::Connection;
use super::reader::FrameReader;
use super::Services;
use crate::api_error::ApiError;
use crate::authn::TokenFrom;
use crate::hub::LocalConn;

/// `GET /ws`.
pub async fn handshake(
    ws: web::Data<Services>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let span = tracing::info_span!("ws.handshake", result = tracing::field::Empty);
    if let Some(parent) = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|_| ws.settings.trust_client_trace && chat_core::telemetry::exporting())
    {
        chat_core::telemetry::continue_trace(&span, parent);
    }
    let result = accept(&ws, &req, body).instrument(span.clone()).await;
    let label = match &result {
        Ok(_) => "accepted",
        Err(e) => e.code.as_str(),
    };
    span.record("result", label);
    ws.metrics.handshakes.with_label_values(&[label]).inc();
    result
}

async fn accept(
    ws: &Services,
    req: &HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let settings = &ws.settings;
    if !origin_allowed(&settings.allowed_origins, req) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "origin not allowed",
        ));
    }
    let slot = take_place(ws, req)?;
    let identity = ws
        .authenticator
        .authenticate(req, TokenFrom::HeaderOrQuery)
        .await?;
    let user = identity.user_id;
    let conn_id = Uuid::new_v4();
    let (outbound_tx, outbound) = mpsc::channel(settings.outbound_queue);
    let kick = CancellationToken::new();
    let meter = ws.hub.meter();
    let local = LocalConn {
        conn_id,
        outbound: outbound_tx,
        kick: kick.clone(),
        meter: meter.clone(),
    };
    let Some(first_here) = ws
        .hub
        .register(user, local, settings.max_connections_per_user)
    else {
        return Err(limited(
            ws,
            "connections_per_user",
            "too many open connections for this user on this node",
        ));
    };
    let registration =
        Registration::new(ws.hub.clone(), ws.pubsub.clone(), user, conn_id, first_here);
    let (response, session, reader) = upgrade(req, body, settings.max_frame_bytes).await?;
    // The user's topic comes first, so a membership change made while the rooms load arrives
    // as an event after the query. On failure the registration's drop releases both.
    if let Err(e) = subscribe_user_and_rooms(ws, user).await {
        tracing::warn!(error = %e, %conn_id, "subscription failed during handshake");
        return Err(ApiError::unavailable("messaging"));
    }
    let connection = Connection::new(ws.clone(), identity, registration, slot);
    tracing::debug!(%conn_id, %user, "connection open");
    actix_web::rt::spawn(ws.tasks.track_future(connection.run(
        session,
        reader,
        (outbound, meter),
        kick,
    )));
    Ok(response)
}

/// Upgrades the request: the response and the outbound session from actix-ws, and the inbound
/// frames through [`FrameReader`] (frames and reassembled messages up to `max_message` bytes).
pub async fn upgrade(
    req: &HttpRequest,
    body: web::Payload,
    max_message: usize,
) -> Result<(HttpResponse, Session, FrameReader), ApiError> {
    let not_upgrade = || ApiError::bad_request("expected a WebSocket upgrade request");
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
    PubSub(#[from] chat_core::backend::BackendError),
    #[error("loading rooms: {0}")]
    Rooms(#[from] crate::lookups::LookupError),
}

/// Returns once this node receives the user's topic and their rooms' topics.
async fn subscribe_user_and_rooms(ws: &Services, user: Uuid) -> Result<(), SubscribeError> {
    ws.pubsub.subscribe(vec![Topic::User(user)]).await?;
    // At most `max_rooms_per_user`, from a query shared with concurrent handshakes.
    let rooms = ws.rooms.get(user).await?.unwrap_or_default();
    let new_rooms = ws.hub.join(user, &rooms);
    if !new_rooms.is_empty() {
        let topics = new_rooms.into_iter().map(Topic::Room).collect();
        ws.pubsub.subscribe(topics).await?;
    }
    Ok(())
}

/// A `429 rate_limited` answer, counted by limit.
/// A place on this node for a connection from `req`'s client: within the handshakes per IP,
/// not while draining, and a free slot (taken before anything awaits, so concurrent handshakes
/// cannot overfill the node). `/ws` and `/debug/echo` both admit through it.
pub(super) fn take_place(ws: &Services, req: &HttpRequest) -> Result<Slot, ApiError> {
    if let Some(ip) = ws.settings.trusted_proxies.client_ip(req) {
        if !ws.handshakes.allow(ip) {
            return Err(limited(
                ws,
                "handshakes_per_ip",
                "too many connection attempts; retry in a few seconds",
            ));
        }
    }
    if ws.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "this node is draining; connect to another node",
        ));
    }
    ws.slots.take().ok_or_else(|| {
        ws.metrics
            .rate_limited
            .with_label_values(&["connections"])
            .inc();
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "this node is full; connect to another node",
        )
    })
}

fn limited(ws: &Services, limit: &str, message: &str) -> ApiError {
    ws.metrics.rate_limited.with_label_values(&[limit]).inc();
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RateLimited,
        message,
    )
}
