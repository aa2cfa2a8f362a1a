//! `send`: checks the frame and the sender's right to write, appends the message to the log
//! (which assigns its seq and publishes it), and answers `ack`, or `error` with the client's id.

use chat_core::conversation::direct_conversation_id;
use chat_core::log::MessageLog;
use chat_core::message::{Appended, NewMessage};
use chat_core::protocol::validate::{self, SendTarget};
use chat_core::protocol::{ErrorCode, ServerFrame};
use chat_core::store::Membership;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::{membership, Peer, Refusal};
use crate::account_budget::AccountBudget;
use crate::directory::Directory;
use crate::memory_guard::MemoryGuard;
use crate::metrics::Metrics;
use crate::rate::Limiter;
use crate::ws::outbox::{Outbox, WriteError};

/// What the frame asks for.
pub struct Target {
    pub id: String,
    pub to: Option<Uuid>,
    pub conversation_id: Option<Uuid>,
    pub body: String,
}

/// The limits a send is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub rate_per_sec: u32,
    /// The account's budget over all its connections and nodes (for the error message).
    pub account_rate_per_sec: u32,
    pub max_body_bytes: usize,
}

#[allow(clippy::too_many_arguments)]
pub async fn handle(
    peer: Peer,
    target: Target,
    limits: Limits,
    limiter: &mut Limiter,
    account: &AccountBudget,
    room: &MemoryGuard,
    log: &dyn MessageLog,
    directory: &Directory,
    metrics: &Metrics,
    out: &mut Outbox,
    received: Instant,
) -> Result<(), WriteError> {
    let id = target.id.clone();
    let reply = if !limiter.allow() {
        metrics.rate_limited.with_label_values(&["send"]).inc();
        let message = format!(
            "more than {} messages per second; slow down",
            limits.rate_per_sec
        );
        ServerFrame::error(Some(id), ErrorCode::RateLimited, message)
    } else if !account.allow(peer.user_id) {
        metrics.rate_limited.with_label_values(&["account"]).inc();
        let message = format!(
            "your account sends more than {} messages per second over all its connections; slow down",
            limits.account_rate_per_sec
        );
        ServerFrame::error(Some(id), ErrorCode::RateLimited, message)
    } else if !room.has_room() {
        metrics
            .rate_limited
            .with_label_values(&["redis_full"])
            .inc();
        ServerFrame::error(
            Some(id),
            ErrorCode::Unavailable,
            "the message store is nearly full; retry later",
        )
    } else {
        let span = chat_core::telemetry::span_if_exporting(|| {
            tracing::info_span!(
                "chat.send",
                conn_id = %peer.conn_id,
                outcome = tracing::field::Empty,
            )
        });
        let accepted = accept(peer, target, limits, log, directory, metrics)
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
    let written = out.frame(&reply).await;
    if matches!(reply, ServerFrame::Ack { .. }) {
        metrics
            .send_latency
            .observe(received.elapsed().as_secs_f64());
    }
    written
}

/// Validates and appends one message; the ack to send.
async fn accept(
    peer: Peer,
    target: Target,
    limits: Limits,
    log: &dyn MessageLog,
    directory: &Directory,
    metrics: &Metrics,
) -> Result<ServerFrame, Refusal> {
    let (conversation_id, to) = validate_target(peer, &target, limits, directory)
        .instrument(chat_core::telemetry::span_if_exporting(|| {
            tracing::info_span!("chat.send.validate")
        }))
        .await?;
    let msg = NewMessage {
        msg_id: Uuid::now_v7(),
        conversation_id,
        from: peer.user_id,
        to,
        body: target.body,
        ts: chat_core::now_ms(),
        trace_parent: chat_core::telemetry::traceparent(&tracing::Span::current()),
    };
    // The log answers within about 3 s (it may still complete after: a retry with the same id
    // then gets the original ack).
    let appended = log
        .append(&msg, &target.id, peer.conn_id)
        .instrument(chat_core::telemetry::span_if_exporting(|| {
            tracing::info_span!("log.append")
        }))
        .await;
    let (seq, msg_id, ts) = match appended {
        Ok(Appended::New { seq }) => {
            metrics.messages_accepted.inc();
            (seq, msg.msg_id, msg.ts)
        }
        // A retry of a send that was appended: the original ack, nothing stored again.
        Ok(Appended::Repeat { seq, msg_id, ts }) => {
            metrics.sends_repeated.inc();
            (seq, msg_id, ts)
        }
        Err(e) => {
            tracing::warn!(error = %e, conn_id = %peer.conn_id, "append failed");
            return Err((ErrorCode::Unavailable, "message not accepted; retry".into()));
        }
    };
    Ok(ServerFrame::Ack {
        id: target.id,
        msg_id,
        conversation_id: msg.conversation_id,
        seq,
        ts,
    })
}

/// Checks a `send`: its id and body, and that the sender may write to the conversation.
/// Returns the conversation and the direct recipient (`None` in a room).
async fn validate_target(
    peer: Peer,
    target: &Target,
    limits: Limits,
    directory: &Directory,
) -> Result<(Uuid, Option<Uuid>), Refusal> {
    let checked = validate::check_send(
        &target.id,
        target.to,
        target.conversation_id,
        &target.body,
        limits.max_body_bytes,
    )?;
    match checked {
        SendTarget::User(to) => {
            check_recipient(peer, to, directory).await?;
            Ok((direct_conversation_id(peer.user_id, to), Some(to)))
        }
        SendTarget::Conversation(conversation) => {
            match membership(directory, peer, conversation).await? {
                Membership::Direct { peer } => Ok((conversation, Some(peer))),
                Membership::Room => Ok((conversation, None)),
            }
        }
    }
}

/// Checks a direct message's recipient: not the sender, and an existing user.
async fn check_recipient(peer: Peer, to: Uuid, directory: &Directory) -> Result<(), Refusal> {
    if to == peer.user_id {
        return Err((
            ErrorCode::BadRequest,
            "cannot send a direct message to yourself".into(),
        ));
    }
    match directory.user_exists(to).await {
        Ok(true) => Ok(()),
        Ok(false) => Err((ErrorCode::NotFound, "no such recipient".into())),
        Err(e) => {
            tracing::warn!(error = %e, conn_id = %peer.conn_id, "recipient lookup failed");
            Err((
                ErrorCode::Unavailable,
                "cannot check the recipient now; retry".into(),
            ))
        }
    }
}
