//! One connection's loop, and only that: one `select!` over the client's frames, the queued
//! deliveries, the heartbeat tick, token expiry, the slow-consumer kick, a coalesced `resync`
//! and shutdown; then the close. What a client frame does is in [`super::frames`].

use std::time::Duration;

use actix_ws::{CloseReason, Session};
use chat_core::protocol::{CloseCode, ErrorCode, PresenceStatus, ServerFrame};
use chat_core::pubsub::Envelope;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::admission::{Registration, Slot};
use super::frames::{self, ConnState, Peer};
use super::outbox::{Outbox, WriteError};
use super::reader::{FrameReader, Inbound, InboundError};
use super::Services;
use crate::auth::Identity;
use crate::hub::{Outbound, QueueMeter, Queued};

/// A `resync` is written this long (at random, up to) after the gap that asks for it ended, so
/// a node's connections do not all sync at the same instant, and gaps ending meanwhile share it.
const RESYNC_JITTER: Duration = Duration::from_millis(500);
/// At most one `resync` per connection in this long: a pub/sub connection that flaps does not
/// make its clients sync every conversation again and again. A gap ending sooner gets its
/// `resync` when the interval is over.
const MIN_RESYNC_INTERVAL: Duration = Duration::from_secs(2);

/// When a connection's next `resync` may be written.
#[derive(Default)]
struct ResyncSchedule {
    /// When the pending one is due; `None` when none is pending.
    due: Option<Instant>,
    /// When the last one was written.
    last: Option<Instant>,
}

impl ResyncSchedule {
    /// A gap ended: a `resync` is due after some jitter, not within the interval of the last
    /// one, and not again if one is pending already.
    fn gap_ended(&mut self) {
        if self.due.is_some() {
            return;
        }
        let jitter = RESYNC_JITTER.mul_f64(rand::random::<f64>());
        let earliest = self.last.map(|t| t + MIN_RESYNC_INTERVAL);
        let due = Instant::now() + jitter;
        self.due = Some(earliest.map_or(due, |e| e.max(due)));
    }

    fn written(&mut self) {
        self.due = None;
        self.last = Some(Instant::now());
    }
}

/// How the loop ended: close with a code, or the peer is already gone.
enum End {
    Close(CloseCode),
    /// The client sent a close frame; echo its code.
    ClientClosed(Option<CloseReason>),
    Gone,
}

impl End {
    /// A live write that failed: a client that stalls is a slow consumer.
    fn from_live_write(e: WriteError) -> End {
        match e {
            WriteError::Closed => End::Gone,
            WriteError::Stalled => End::Close(CloseCode::SlowConsumer),
        }
    }
}

/// An open connection.
pub struct Connection {
    ws: Services,
    peer: Peer,
    token_iat: u64,
    token_exp: u64,
    token_version: Option<i64>,
    registration: Registration,
    /// Held until the connection ends: its place in the node's capacity.
    _slot: Slot,
    state: ConnState,
}

impl Connection {
    pub fn new(ws: Services, identity: Identity, registration: Registration, slot: Slot) -> Self {
        let state = ConnState::new(
            ws.settings.send_rate_per_sec,
            ws.settings.frame_budget_per_sec,
        );
        Connection {
            peer: Peer {
                user_id: identity.user_id,
                conn_id: registration.conn_id,
            },
            token_iat: identity.iat,
            token_exp: identity.exp,
            token_version: identity.version,
            registration,
            _slot: slot,
            state,
            ws,
        }
    }

    pub async fn run(
        mut self,
        session: Session,
        mut reader: FrameReader,
        (mut outbound, meter): (mpsc::Receiver<Queued>, QueueMeter),
        kick: CancellationToken,
    ) {
        let settings = self.ws.settings.clone();
        let mut out = Outbox::new(session, self.ws.metrics.clone());
        let hello = ServerFrame::Hello {
            user_id: self.peer.user_id,
            conn_id: self.peer.conn_id,
            node_id: settings.node_id.clone(),
            heartbeat_ms: settings.heartbeat.as_millis() as u64,
        };
        let mut end = out.frame(&hello).await.err().map(|_| End::Gone);
        let mut ticker =
            tokio::time::interval_at(Instant::now() + settings.heartbeat, settings.heartbeat);
        let mut last_heard = Instant::now();
        let until_expiry = self.token_exp.saturating_sub(crate::auth::unix_now());
        let expiry = tokio::time::sleep(Duration::from_secs(until_expiry));
        tokio::pin!(expiry);
        let shutdown = self.ws.shutdown.clone();
        let mut resync = ResyncSchedule::default();
        if end.is_none() && self.registration.first_here {
            self.join_presence().await;
        }

        while end.is_none() {
            end = tokio::select! {
                _ = shutdown.cancelled() => Some(End::Close(CloseCode::GoingAway)),
                _ = kick.cancelled() => Some(End::Close(CloseCode::SlowConsumer)),
                _ = &mut expiry => Some(End::Close(CloseCode::TokenExpired)),
                item = outbound.recv() => match item {
                    Some(item) => {
                        meter.taken(item.wire_len());
                        self.deliver(&mut out, &item, &mut resync).await
                    }
                    None => Some(End::Close(CloseCode::InternalError)),
                },
                _ = sleep_until_some(resync.due) => {
                    resync.written();
                    let frame = ServerFrame::Resync {
                        reason: "pubsub_reconnected".into(),
                    };
                    out.frame(&frame).await.err().map(End::from_live_write)
                }
                _ = ticker.tick() => {
                    if last_heard.elapsed() > settings.client_timeout {
                        Some(End::Close(CloseCode::HeartbeatTimeout))
                    } else {
                        out.ping().await.err().map(End::from_live_write)
                    }
                }
                msg = reader.recv() => {
                    last_heard = Instant::now();
                    self.on_client_message(&mut out, msg).await
                }
            };
        }

        // What is still queued leaves the node's count with the connection; once closed, the
        // hub can queue nothing more here.
        outbound.close();
        while let Ok(item) = outbound.try_recv() {
            meter.taken(item.wire_len());
        }
        if self.registration.release() {
            if let Err(e) = self.ws.presence.leave(self.peer.user_id).await {
                tracing::warn!(error = %e, conn_id = %self.peer.conn_id, "presence leave failed");
            }
        }
        let closes = &self.ws.metrics.closes;
        let reason = match end {
            Some(End::Close(code)) => {
                closes.with_label_values(&[code.reason()]).inc();
                Some(CloseReason {
                    code: actix_ws::CloseCode::from(code.code()),
                    description: Some(code.reason().to_string()),
                })
            }
            Some(End::ClientClosed(reason)) => {
                closes.with_label_values(&["client"]).inc();
                reason
            }
            Some(End::Gone) | None => {
                closes.with_label_values(&["gone"]).inc();
                None
            }
        };
        out.close(reason).await;
        tracing::debug!(conn_id = %self.peer.conn_id, "connection closed");
    }

    /// Records the user's presence here; announces it beside the connection, so a reconnect
    /// storm does not hold up frames.
    async fn join_presence(&self) {
        let user = self.peer.user_id;
        match self.ws.presence.join(user).await {
            Ok(true) => {
                let presence = self.ws.presence.clone();
                actix_web::rt::spawn(self.ws.tasks.track_future(async move {
                    presence.announce(user, PresenceStatus::Online).await
                }));
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, conn_id = %self.peer.conn_id, "presence join failed")
            }
        }
    }

    /// Writes one queued delivery, unless this connection has it already; a gap schedules a
    /// `resync`.
    async fn deliver(
        &mut self,
        out: &mut Outbox,
        item: &Queued,
        resync: &mut ResyncSchedule,
    ) -> Option<End> {
        let metrics = &self.ws.metrics;
        let written = match &**item {
            Outbound::Resync => {
                // Live delivery had a gap: a sync must no longer stop below the first live seq
                // (from now on, though the frame may wait).
                self.state.ledger.forget();
                resync.gap_ended();
                return None;
            }
            Outbound::Envelope(Envelope::Revoked { before, version }) => {
                let revoked =
                    crate::authn::revokes(*before, *version, self.token_iat, self.token_version);
                return revoked.then_some(End::Close(CloseCode::TokenRevoked));
            }
            Outbound::Envelope(Envelope::Message(m)) => {
                if !self.state.ledger.admit(m.conversation, m.seq) {
                    return None;
                }
                let written = out.text(m.frame.clone()).await;
                if written.is_ok() {
                    metrics.messages_delivered.inc();
                    metrics.frames_out_message.inc();
                    let age_ms = (chat_core::now_ms() - m.ts).max(0);
                    metrics.delivery_latency.observe(age_ms as f64 / 1000.0);
                }
                written
            }
            Outbound::Envelope(Envelope::Event { frame, json, .. }) => {
                if let ServerFrame::Presence {
                    user_id, status, ..
                } = frame
                {
                    if !self.state.presence_seen.changed(*user_id, *status) {
                        return None;
                    }
                }
                let written = out.text(json.clone()).await;
                if written.is_ok() {
                    metrics.frames_out.with_label_values(&[frame.kind()]).inc();
                }
                written
            }
        };
        written.err().map(End::from_live_write)
    }

    async fn on_client_message(
        &mut self,
        out: &mut Outbox,
        msg: Option<Result<Inbound, InboundError>>,
    ) -> Option<End> {
        let msg = match msg {
            None => return Some(End::Gone),
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(error = %e, conn_id = %self.peer.conn_id, "inbound frame error");
                return Some(e.close_code().map_or(End::Gone, End::Close));
            }
        };
        let written = match msg {
            Inbound::Text(text) => {
                let written =
                    frames::on_text(&self.ws, self.peer, &mut self.state, out, &text).await;
                if self.state.abusive() {
                    return Some(End::Close(CloseCode::RateLimited));
                }
                written
            }
            Inbound::Binary(_) => {
                self.ws
                    .metrics
                    .frames_in
                    .with_label_values(&["binary"])
                    .inc();
                let frame = ServerFrame::error(
                    None,
                    ErrorCode::UnsupportedData,
                    "binary frames are not supported; send JSON text frames",
                );
                out.frame(&frame).await
            }
            Inbound::Ping(payload) => out.pong(&payload).await,
            Inbound::Pong(_) => Ok(()),
            Inbound::Close(reason) => return Some(End::ClientClosed(reason)),
        };
        written.err().map(|_| End::Gone)
    }
}

/// Sleeps until `at`; never wakes when it is `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gaps ending close together share one `resync`, due within the jitter; a gap soon after a
    /// written one waits for the interval.
    #[tokio::test(start_paused = true)]
    async fn resyncs_are_coalesced_and_spaced() {
        let mut schedule = ResyncSchedule::default();
        let start = Instant::now();
        schedule.gap_ended();
        let first = schedule.due.expect("due");
        assert!(first <= start + RESYNC_JITTER);
        for _ in 0..100 {
            schedule.gap_ended();
        }
        assert_eq!(schedule.due, Some(first), "later gaps join the pending one");
        tokio::time::advance(first - start).await;
        schedule.written();
        schedule.gap_ended();
        let second = schedule.due.expect("due");
        assert!(
            second >= first + MIN_RESYNC_INTERVAL,
            "spaced by the interval"
        );
    }
}
