//! Drains one partition of the message log into Postgres: own pending entries first, then new
//! ones, plus periodic claims of entries idle on dead consumers and trimming below what is acked.
//! An entry is acked only after the batch holding it has committed. Works on any
//! [`LogConsumer`]: the worker runs it against Redis, a one-process gateway against its
//! in-memory log.

use std::sync::Arc;
use std::time::Duration;

use chat_core::backend::BackendError;
use chat_core::backoff::Backoff;
use chat_core::log::{LogConsumer, LogEntry, PartitionReader, ReadFrom};
use chat_core::message::StoredMessage;
use chat_core::store::{Store, StoreError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::Metrics;

/// Most links from one batch span to the spans that accepted its messages.
const MAX_BATCH_LINKS: usize = 128;
/// Most claim rounds per claim tick.
const MAX_CLAIM_ROUNDS: usize = 100;

/// How a consumer reads, batches and trims.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The consumer's name in the group (unique per worker process).
    pub consumer: String,
    /// Most entries read, written and acked together.
    pub batch_size: usize,
    /// How long one read waits for new entries.
    pub block: Duration,
    /// After a batch smaller than `batch_size`, wait this long before the next read, so that
    /// entries arriving meanwhile share one transaction.
    pub linger: Duration,
    /// Entries pending this long on any consumer are claimed (their consumer is presumed dead).
    pub claim_idle: Duration,
    pub claim_every: Duration,
    pub trim_every: Duration,
    /// Acked entries younger than this stay in the log.
    pub retention: Duration,
}

/// What one partition loop needs.
#[derive(Clone)]
pub struct Context {
    pub log: Arc<dyn LogConsumer>,
    pub store: Store,
    pub settings: Arc<ConsumerSettings>,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
}

/// Runs one loop per partition of the log until `ctx.shutdown`; returns their tasks.
pub fn spawn_all(ctx: &Context) -> Vec<tokio::task::JoinHandle<()>> {
    (0..ctx.log.partitions())
        .map(|p| tokio::spawn(run_partition(ctx.clone(), p)))
        .collect()
}

/// Runs the partition until shutdown, reconnecting with backoff after a log failure.
pub async fn run_partition(ctx: Context, partition: u16) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let label = partition.to_string();
    while !ctx.shutdown.is_cancelled() {
        let served = async {
            let reader = ctx.log.reader(partition, &ctx.settings.consumer).await?;
            backoff.reset();
            Drain {
                ctx: &ctx,
                reader,
                label: &label,
            }
            .serve()
            .await
        };
        match served.await {
            Ok(()) => return,
            Err(e) => {
                ctx.metrics.errors.with_label_values(&["redis"]).inc();
                tracing::warn!(partition, error = %e, "partition loop failed; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = ctx.shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// One partition's loop on one reader.
struct Drain<'a> {
    ctx: &'a Context,
    reader: Box<dyn PartitionReader>,
    label: &'a str,
}

impl Drain<'_> {
    /// Returns Ok on shutdown, Err on a log failure.
    async fn serve(&mut self) -> Result<(), BackendError> {
        let settings = self.ctx.settings.clone();
        let mut next_claim = tokio::time::Instant::now();
        let mut next_trim = tokio::time::Instant::now();
        // Our own pending entries (from before a restart) come first.
        let mut backlog = true;
        loop {
            if self.ctx.shutdown.is_cancelled() {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= next_claim {
                self.claim().await?;
                next_claim = now + settings.claim_every;
            }
            if now >= next_trim {
                self.trim_and_observe().await?;
                next_trim = now + settings.trim_every;
            }
            let from = if backlog {
                ReadFrom::Pending
            } else {
                ReadFrom::New {
                    block: settings.block,
                }
            };
            let entries = tokio::select! {
                r = self.reader.read(from, settings.batch_size) => r?,
                _ = self.ctx.shutdown.cancelled() => return Ok(()),
            };
            if backlog && entries.is_empty() {
                backlog = false;
                continue;
            }
            let partial = entries.len() < settings.batch_size;
            if !self.process(entries).await? {
                return Ok(());
            }
            // Below full batches, linger: fewer, larger transactions cost Postgres far less
            // than one commit per handful of messages (docs/benchmarks.md).
            if partial && !backlog && settings.linger > Duration::ZERO {
                tokio::select! {
                    _ = tokio::time::sleep(settings.linger) => {}
                    _ = self.ctx.shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }

    /// Claims entries idle longer than the claim threshold (their consumer died) and processes
    /// them.
    async fn claim(&mut self) -> Result<(), BackendError> {
        let settings = self.ctx.settings.clone();
        let mut cursor = String::from("0-0");
        for _ in 0..MAX_CLAIM_ROUNDS {
            if self.ctx.shutdown.is_cancelled() {
                return Ok(());
            }
            let page = self
                .reader
                .claim(settings.claim_idle, &cursor, settings.batch_size)
                .await?;
            if !page.entries.is_empty() {
                self.ctx.metrics.claimed.inc_by(page.entries.len() as u64);
                tracing::info!(
                    partition = self.label,
                    count = page.entries.len(),
                    "claimed idle entries"
                );
            }
            if !self.process(page.entries).await? {
                return Ok(());
            }
            match page.next {
                Some(next) => cursor = next,
                None => break,
            }
        }
        Ok(())
    }

    /// Writes a batch (retrying while Postgres is down) and acks it, in a `worker.batch` span
    /// linked to the gateway spans that accepted its traced messages. Returns false when
    /// shutdown interrupted a retry; the entries then stay pending for a later claim.
    async fn process(&mut self, entries: Vec<LogEntry>) -> Result<bool, BackendError> {
        if entries.is_empty() {
            return Ok(true);
        }
        let span = tracing::info_span!(
            "worker.batch",
            partition = self.label,
            entries = entries.len()
        );
        if chat_core::telemetry::exporting() {
            for tp in entries
                .iter()
                .filter_map(|e| e.trace_parent.as_deref())
                .take(MAX_BATCH_LINKS)
            {
                chat_core::telemetry::link_to(&span, tp);
            }
        }
        self.process_batch(entries).instrument(span).await
    }

    async fn process_batch(&mut self, entries: Vec<LogEntry>) -> Result<bool, BackendError> {
        let started = std::time::Instant::now();
        let count = entries.len();
        let mut messages = Vec::with_capacity(count);
        let mut sources = Vec::with_capacity(count);
        for entry in entries {
            match &entry.message {
                Ok(m) => {
                    messages.push(m.clone());
                    sources.push(entry);
                }
                Err(e) => {
                    let reason = e.to_string();
                    self.dead_letter(&entry, &reason).await?;
                }
            }
        }
        let Some(written) = self.write(&messages, &sources).await? else {
            return Ok(false);
        };
        let ids: Vec<&str> = sources.iter().map(|e| e.id.as_str()).collect();
        let acked = self.reader.ack(&ids).await?;
        let m = &self.ctx.metrics;
        m.entries_acked.inc_by(acked);
        m.batches.inc();
        m.rows_written.inc_by(written);
        m.batch_size.observe(count as f64);
        m.batch_duration.observe(started.elapsed().as_secs_f64());
        Ok(true)
    }

    /// Writes the decoded entries (`sources[i]` is the entry of `messages[i]`). Rows Postgres
    /// rejects are dead-lettered one by one, so one bad entry cannot stall the partition.
    /// `Some(rows)` once committed; `None` when shutdown interrupted a retry, and the entries
    /// then stay pending for a later claim. Dead-lettered entries are removed from `sources`.
    async fn write(
        &mut self,
        messages: &[StoredMessage],
        sources: &[LogEntry],
    ) -> Result<Option<u64>, BackendError> {
        let reason = match self.write_retrying(messages).await {
            None => return Ok(None),
            Some(Ok(rows)) => return Ok(Some(rows)),
            Some(Err(reason)) => reason,
        };
        tracing::warn!(partition = self.label, error = %reason, "batch rejected; writing one by one");
        let mut written = 0;
        for (message, source) in messages.iter().zip(sources) {
            match self.write_retrying(std::slice::from_ref(message)).await {
                None => return Ok(None),
                Some(Ok(rows)) => written += rows,
                Some(Err(reason)) => self.dead_letter(source, &reason).await?,
            }
        }
        Ok(Some(written))
    }

    /// Writes `batch`, retrying with backoff while Postgres is unavailable. `Some(Err(reason))`
    /// when Postgres rejects the data; `None` on shutdown.
    async fn write_retrying(&self, batch: &[StoredMessage]) -> Option<Result<u64, String>> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let insert = tracing::info_span!("worker.insert", rows = batch.len());
            match self
                .ctx
                .store
                .insert_messages(batch)
                .instrument(insert)
                .await
            {
                Ok(rows) => return Some(Ok(rows)),
                Err(StoreError::Rejected(reason)) => return Some(Err(reason)),
                Err(StoreError::Unavailable(reason)) => {
                    self.ctx
                        .metrics
                        .errors
                        .with_label_values(&["postgres"])
                        .inc();
                    tracing::warn!(partition = self.label, error = %reason, "postgres write failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = self.ctx.shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Moves an entry to the dead letters with the reason (it is acked there).
    async fn dead_letter(&mut self, entry: &LogEntry, reason: &str) -> Result<(), BackendError> {
        self.reader.dead_letter(entry, reason).await?;
        self.ctx.metrics.dead_lettered.inc();
        tracing::error!(partition = self.label, entry = %entry.id, reason, "entry moved to the dead letters");
        Ok(())
    }

    /// Trims what no consumer needs any more and updates the pending, length and oldest-age
    /// gauges.
    async fn trim_and_observe(&mut self) -> Result<(), BackendError> {
        let stats = self.reader.trim(self.ctx.settings.retention).await?;
        let m = &self.ctx.metrics;
        m.pending
            .with_label_values(&[self.label])
            .set(stats.pending);
        m.stream_length
            .with_label_values(&[self.label])
            .set(stats.length);
        m.oldest_pending_age
            .with_label_values(&[self.label])
            .set(stats.oldest_pending_age_secs);
        Ok(())
    }
}
