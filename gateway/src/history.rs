//! Message history: any seq range of one conversation, merged from the log's recent tail
//! (messages possibly not yet in Postgres) and Postgres (everything the sink wrote), so an acked
//! message is readable at once on every node. History requests and sync both read through it.
//!
//! Seqs are gap-free from 1 to the conversation's last seq, except for the ranges a re-base
//! skipped after Redis lost data (recorded in Postgres), so the seqs a request wants are known
//! before reading: the tail answers them when it holds them all, Postgres fills in the rest, a
//! seq in a skipped range is passed over (and a page that ends in one reaches to its far end),
//! and any other seq that neither has is reported rather than skipped while the sink may still
//! write it (it is above what Postgres recorded, or still pending on a persistence worker).

use std::collections::BTreeMap;
use std::sync::Arc;

use chat_core::log::MessageLog;
use chat_core::protocol::MessageFrame;
use chat_core::store::Store;
use uuid::Uuid;

use crate::metrics::Metrics;

/// Why a range could not be read completely.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("postgres: {0}")]
    Postgres(String),
    /// A wanted message is neither in the tail nor (yet) in Postgres: the sink is behind by
    /// more than the tail holds, or the log is unreachable while it is behind. Retry.
    #[error("history is catching up")]
    CatchingUp,
}

impl From<chat_core::store::StoreError> for HistoryError {
    fn from(e: chat_core::store::StoreError) -> Self {
        HistoryError::Postgres(e.to_string())
    }
}

/// What a range read found.
#[derive(Debug)]
pub struct Range {
    /// The messages, ascending.
    pub messages: Vec<MessageFrame>,
    /// The seqs the read accounts for: the range asked, extended over skipped ranges that
    /// cover either end (a page that ends in one continues after it).
    pub covered: (i64, i64),
}

/// Reads history.
pub struct History {
    log: Arc<dyn MessageLog>,
    store: Store,
    metrics: Metrics,
}

impl History {
    pub fn new(log: Arc<dyn MessageLog>, store: Store, metrics: Metrics) -> Self {
        History {
            log,
            store,
            metrics,
        }
    }

    /// The conversation's last seq: the log's, or Postgres's record when the log cannot
    /// answer. 0 for a conversation without messages.
    pub async fn last_seq(&self, conversation: Uuid) -> Result<i64, HistoryError> {
        match self.log.last_seq(conversation).await {
            Ok(seq) => Ok(seq),
            Err(e) => {
                tracing::warn!(error = %e, "seq counter unreadable; using postgres");
                Ok(self.store.last_seq(conversation).await?)
            }
        }
    }

    /// The messages with `lo <= seq <= hi`, ascending, and the seqs the read accounts for
    /// (`lo..=hi`, reaching further where a skipped range covers either end). Call with a
    /// bounded range (it is read whole).
    pub async fn read_range(
        &self,
        conversation: Uuid,
        lo: i64,
        hi: i64,
    ) -> Result<Range, HistoryError> {
        let lo = lo.max(1);
        if lo > hi {
            return Ok(Range {
                messages: Vec::new(),
                covered: (lo, hi),
            });
        }
        let wanted = usize::try_from(hi - lo + 1).unwrap_or(usize::MAX);
        let mut found: BTreeMap<i64, MessageFrame> =
            match self.log.recent(conversation, lo, hi).await {
                Ok(frames) => frames.into_iter().map(|m| (m.seq, m)).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "history tail unreadable; using postgres");
                    BTreeMap::new()
                }
            };
        if found.len() < wanted {
            for m in self.store.messages_in_range(conversation, lo, hi).await? {
                found.entry(m.seq).or_insert(m);
            }
        }
        let mut covered = (lo, hi);
        if found.len() < wanted {
            let gaps = self.store.seq_gaps(conversation, lo, hi).await?;
            for &(glo, ghi) in &gaps {
                if glo <= lo {
                    covered.0 = covered.0.min(glo.max(1));
                }
                if ghi >= hi {
                    covered.1 = covered.1.max(ghi);
                }
            }
            let skipped = |s: i64| gaps.iter().any(|&(glo, ghi)| glo <= s && s <= ghi);
            let missing_above = (lo..=hi)
                .filter(|s| !found.contains_key(s) && !skipped(*s))
                .max()
                .unwrap_or(0);
            // A hole above what Postgres has recorded may still be written by the sink. One at
            // or below it will never fill (a dead-lettered entry, or Redis data loss) unless
            // a worker still holds it: one that died with it pending while others wrote later
            // seqs. Only a hole the log no longer holds is skipped; when the log cannot say,
            // the caller retries rather than skip a message for good.
            if missing_above > 0 {
                let behind = missing_above > self.store.last_seq(conversation).await?;
                let holes: Vec<i64> = (lo..=hi)
                    .filter(|s| !found.contains_key(s) && !skipped(*s))
                    .collect();
                let pending = behind
                    || self
                        .log
                        .in_flight(conversation, &holes)
                        .await
                        .unwrap_or(true);
                if pending {
                    self.metrics.history_incomplete.inc();
                    return Err(HistoryError::CatchingUp);
                }
                tracing::warn!(%conversation, "history has a permanent hole; skipping it");
            }
        }
        Ok(Range {
            messages: found.into_values().collect(),
            covered,
        })
    }
}
