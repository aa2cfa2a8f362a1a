//! Writing to one client: every frame the server sends goes through here, bounded in time (a
//! client that does not read is not waited for forever) and counted by type.

use std::time::Duration;

use actix_ws::{CloseReason, Session};
use bytestring::ByteString;
use chat_core::protocol::ServerFrame;

use crate::metrics::Metrics;

/// Longest a single write to the socket may wait before the client counts as stalled.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteError {
    /// The connection is gone.
    Closed,
    /// The client did not take the frame within [`WRITE_TIMEOUT`].
    Stalled,
}

/// The writing half of one connection.
pub struct Outbox {
    session: Session,
    metrics: Metrics,
}

impl Outbox {
    pub fn new(session: Session, metrics: Metrics) -> Self {
        Outbox { session, metrics }
    }

    async fn timed<F>(write: F) -> Result<(), WriteError>
    where
        F: std::future::Future<Output = Result<(), actix_ws::Closed>>,
    {
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WriteError::Closed),
            Err(_) => Err(WriteError::Stalled),
        }
    }

    /// Writes a server frame, counted by type (and error frames by code).
    pub async fn frame(&mut self, frame: &ServerFrame) -> Result<(), WriteError> {
        match frame {
            ServerFrame::Ack { .. } => self.metrics.frames_out_ack.inc(),
            ServerFrame::Error { code, .. } => {
                self.metrics
                    .errors_sent
                    .with_label_values(&[code.as_str()])
                    .inc();
                self.metrics.frames_out.with_label_values(&["error"]).inc();
            }
            other => self
                .metrics
                .frames_out
                .with_label_values(&[other.kind()])
                .inc(),
        }
        Self::timed(self.session.text(frame.to_json())).await
    }

    /// Writes a frame serialized elsewhere (a message, a relayed event), counted by the caller.
    pub async fn text(&mut self, text: ByteString) -> Result<(), WriteError> {
        Self::timed(self.session.text(text)).await
    }

    pub async fn ping(&mut self) -> Result<(), WriteError> {
        Self::timed(self.session.ping(b"")).await
    }

    pub async fn pong(&mut self, payload: &[u8]) -> Result<(), WriteError> {
        Self::timed(self.session.pong(payload)).await
    }

    /// Sends the close frame (within the write timeout) and ends the session.
    pub async fn close(self, reason: Option<CloseReason>) {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, self.session.close(reason)).await;
    }
}
