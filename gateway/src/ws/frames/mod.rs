//! What a client frame does: decoded once ([`on_text`]), then handed to its handler, one file
//! per frame type, each taking only what it uses:
//! - [`send`]: `send` (append, ack);
//! - [`sync`]: `sync` (missed messages, then `synced`);
//! - [`read`]: `read` (read position, receipt);
//! - [`typing`]: `typing` (relayed, throttled);
//! - [`presence`]: `presence.watch` and `presence.unwatch`.

pub mod presence;
pub mod read;
pub mod send;
pub mod sync;
pub mod typing;

use chat_core::protocol::validate;
use chat_core::protocol::{ClientFrame, ErrorCode, ServerFrame};
use chat_core::store::Membership;
use tokio::time::Instant;
use uuid::Uuid;

use super::ledger::{PresenceSeen, SyncLedger, TypingThrottle};
use super::outbox::{Outbox, WriteError};
use super::Services;
use crate::directory::Directory;
use crate::rate::Limiter;

/// Who a connection is.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub user_id: Uuid,
    pub conn_id: Uuid,
}

/// What one connection remembers between frames.
pub struct ConnState {
    pub ledger: SyncLedger,
    pub presence_seen: PresenceSeen,
    pub typing: TypingThrottle,
    /// `send` frames: one unit each, bursts of twice the rate.
    pub send_limiter: Limiter,
    /// Every other frame, weighted by [`cost`].
    pub frame_budget: Limiter,
}

/// A connection's frame budget holds this many seconds' worth of its rate: enough for a client
/// with 1,000 conversations to sync them all at connect (ten `sync` frames of 100).
pub const FRAME_BURST_SECS: u32 = 10;

impl ConnState {
    pub fn new(send_rate_per_sec: u32, frame_budget_per_sec: u32) -> Self {
        ConnState {
            ledger: SyncLedger::default(),
            presence_seen: PresenceSeen::default(),
            typing: TypingThrottle::default(),
            send_limiter: Limiter::new(send_rate_per_sec, send_rate_per_sec.saturating_mul(2)),
            frame_budget: Limiter::new(
                frame_budget_per_sec,
                frame_budget_per_sec.saturating_mul(FRAME_BURST_SECS),
            ),
        }
    }

    /// Whether the client kept going far above a limit after being told `rate_limited`.
    pub fn abusive(&self) -> bool {
        self.send_limiter.abusive() || self.frame_budget.abusive()
    }
}

/// What a frame costs from the frame budget, in units of about one backend lookup: a `sync`
/// one per conversation it names (a membership check, a read of the log or Postgres each), a
/// `presence.watch` one per ten users (subscriptions and a presence read), anything else one.
/// `send` has its own limit and costs nothing here.
pub fn cost(frame: &ClientFrame) -> u32 {
    match frame {
        ClientFrame::Send { .. } => 0,
        ClientFrame::Sync { conversations, .. } => {
            u32::try_from(conversations.as_ref().map_or(1, Vec::len).max(1)).unwrap_or(u32::MAX)
        }
        ClientFrame::PresenceWatch { user_ids } => {
            u32::try_from(user_ids.len().div_ceil(10).max(1)).unwrap_or(u32::MAX)
        }
        ClientFrame::Read { .. }
        | ClientFrame::Typing { .. }
        | ClientFrame::PresenceUnwatch { .. } => 1,
    }
}

/// A frame refused: the error code and message to answer with.
pub type Refusal = (ErrorCode, String);

/// Decodes a client's text frame and runs its handler.
pub async fn on_text(
    ws: &Services,
    peer: Peer,
    state: &mut ConnState,
    out: &mut Outbox,
    text: &str,
) -> Result<(), WriteError> {
    let received = Instant::now();
    let frame = match validate::decode(text) {
        Ok(frame) => frame,
        Err(rejection) => {
            ws.metrics.frames_in.with_label_values(&["invalid"]).inc();
            // Answering costs a little too: a client flooding garbage is limited like any.
            if !state.frame_budget.allow() {
                return refuse_over_budget(ws, out).await;
            }
            return out.frame(&rejection.into_frame()).await;
        }
    };
    if !state.frame_budget.allow_n(cost(&frame)) {
        return refuse_over_budget(ws, out).await;
    }
    let count_in = |kind: &str| ws.metrics.frames_in.with_label_values(&[kind]).inc();
    match frame {
        ClientFrame::Send {
            id,
            to,
            conversation_id,
            body,
        } => {
            ws.metrics.frames_in_send.inc();
            let target = send::Target {
                id,
                to,
                conversation_id,
                body,
            };
            let limits = send::Limits {
                rate_per_sec: ws.settings.send_rate_per_sec,
                account_rate_per_sec: ws.settings.account_send_rate_per_sec,
                max_body_bytes: ws.settings.max_body_bytes,
            };
            send::handle(
                peer,
                target,
                limits,
                &mut state.send_limiter,
                &ws.account_budget,
                &ws.memory_guard,
                ws.log.as_ref(),
                &ws.directory,
                &ws.metrics,
                out,
                received,
            )
            .await
        }
        ClientFrame::Sync {
            conversation_id,
            after_seq,
            conversations,
        } => {
            count_in("sync");
            let points = match validate::sync_points(conversation_id, after_seq, conversations) {
                Ok(points) => points,
                Err((code, message)) => return reply_error(out, code, message).await,
            };
            sync::handle(
                peer,
                points,
                &mut state.ledger,
                &ws.directory,
                &ws.history,
                &ws.metrics,
                out,
            )
            .await
        }
        ClientFrame::Read {
            conversation_id,
            seq,
        } => {
            count_in("read");
            let done = read::handle(
                peer,
                conversation_id,
                seq,
                &ws.directory,
                &ws.history,
                &ws.store,
                ws.pubsub.as_ref(),
            )
            .await;
            answer(out, done).await
        }
        ClientFrame::Typing { conversation_id } => {
            count_in("typing");
            let done = typing::handle(
                peer,
                conversation_id,
                &mut state.typing,
                &ws.directory,
                ws.pubsub.as_ref(),
            )
            .await;
            answer(out, done).await
        }
        ClientFrame::PresenceWatch { user_ids } => {
            count_in("presence.watch");
            presence::watch(
                peer,
                user_ids,
                ws.settings.max_watched_users,
                &mut state.presence_seen,
                &ws.directory,
                &ws.hub,
                ws.pubsub.as_ref(),
                &ws.presence,
                out,
            )
            .await
        }
        ClientFrame::PresenceUnwatch { user_ids } => {
            count_in("presence.unwatch");
            presence::unwatch(peer, &user_ids, &ws.hub, ws.pubsub.as_ref());
            Ok(())
        }
    }
}

/// The answer to a frame over the connection's frame budget.
async fn refuse_over_budget(ws: &Services, out: &mut Outbox) -> Result<(), WriteError> {
    ws.metrics.rate_limited.with_label_values(&["frames"]).inc();
    let message = format!(
        "more than {} units of work per second (a sync costs one per conversation); slow down",
        ws.settings.frame_budget_per_sec
    );
    reply_error(out, ErrorCode::RateLimited, message).await
}

/// An error frame without a client id.
async fn reply_error(
    out: &mut Outbox,
    code: ErrorCode,
    message: impl Into<String>,
) -> Result<(), WriteError> {
    out.frame(&ServerFrame::error(None, code, message)).await
}

/// Nothing to write when a handler succeeded; its error frame when it refused.
async fn answer(out: &mut Outbox, done: Result<(), Refusal>) -> Result<(), WriteError> {
    match done {
        Ok(()) => Ok(()),
        Err((code, message)) => reply_error(out, code, message).await,
    }
}

/// The caller's membership of a conversation, or the refusal to answer.
async fn membership(
    directory: &Directory,
    peer: Peer,
    conversation: Uuid,
) -> Result<Membership, Refusal> {
    match directory.membership(peer.user_id, conversation).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err((
            ErrorCode::Forbidden,
            format!("not a member of conversation {conversation}"),
        )),
        Err(e) => {
            tracing::warn!(error = %e, conn_id = %peer.conn_id, "membership lookup failed");
            Err((
                ErrorCode::Unavailable,
                "cannot check membership now; retry".into(),
            ))
        }
    }
}
