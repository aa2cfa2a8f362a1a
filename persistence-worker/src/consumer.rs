//! Reads one stream partition with the consumer group: own pending entries first, then new ones,
//! plus periodic claims of entries idle on dead consumers and trimming below what is acked.
//! An entry is acked only after the batch holding it has committed.

use std::collections::HashMap;
use std::time::Duration;

use chat_core::backoff::Backoff;
use chat_core::keys::{KeySchema, PERSISTENCE_GROUP};
use chat_core::stream::{entry_trace_parent, StoredMessage};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Value};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Validated;
use crate::metrics::Metrics;
use crate::sink::{Sink, SinkError};

/// What one partition loop needs.
#[derive(Clone)]
pub struct Context {
    pub config: std::sync::Arc<Validated>,
    pub keys: KeySchema,
    pub client: redis::Client,
    pub sink: Sink,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
}

/// Most links from one batch span to the spans that accepted its messages.
const MAX_BATCH_LINKS: usize = 128;

/// A Redis failure in the loop; the loop reconnects with backoff.
type RedisResult<T> = redis::RedisResult<T>;

/// Runs the partition until shutdown, reconnecting to Redis with backoff.
pub async fn run_partition(ctx: Context, partition: u16) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let label = partition.to_string();
    while !ctx.shutdown.is_cancelled() {
        let mut reader = PartitionReader::new(&ctx, partition, &label);
        match reader.serve(&mut backoff).await {
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

struct PartitionReader<'a> {
    ctx: &'a Context,
    stream: String,
    dead_letter: String,
    label: &'a str,
}

impl<'a> PartitionReader<'a> {
    fn new(ctx: &'a Context, partition: u16, label: &'a str) -> Self {
        PartitionReader {
            ctx,
            stream: ctx.keys.stream(partition),
            dead_letter: ctx.keys.dead_letter(partition),
            label,
        }
    }

    async fn connect(&self) -> RedisResult<MultiplexedConnection> {
        // Reads block for worker_block_ms; the response timeout must allow for that.
        let block = Duration::from_millis(self.ctx.config.raw.worker_block_ms);
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(block + Duration::from_secs(5));
        self.ctx
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Returns Ok on shutdown, Err on a Redis failure.
    async fn serve(&mut self, backoff: &mut Backoff) -> RedisResult<()> {
        let cfg = &self.ctx.config.raw;
        let mut conn = self.connect().await?;
        let created: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(PERSISTENCE_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created {
            if e.code() != Some("BUSYGROUP") {
                return Err(e);
            }
        }
        backoff.reset();
        let claim_every = Duration::from_millis(cfg.worker_claim_interval_ms);
        let trim_every = Duration::from_millis(cfg.worker_trim_interval_ms);
        let linger = Duration::from_millis(cfg.worker_batch_linger_ms);
        let mut next_claim = tokio::time::Instant::now();
        let mut next_trim = tokio::time::Instant::now();
        // Our own pending entries (from before a restart) come first: read from id 0.
        let mut backlog = true;
        loop {
            if self.ctx.shutdown.is_cancelled() {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= next_claim {
                self.claim(&mut conn).await?;
                next_claim = now + claim_every;
            }
            if now >= next_trim {
                self.trim_and_observe(&mut conn).await?;
                next_trim = now + trim_every;
            }
            let mut opts = StreamReadOptions::default()
                .group(PERSISTENCE_GROUP, &self.ctx.config.consumer_name)
                .count(cfg.worker_batch_size);
            let start = if backlog {
                "0"
            } else {
                opts = opts.block(cfg.worker_block_ms as usize);
                ">"
            };
            let keys = [self.stream.as_str()];
            let starts = [start];
            let read = tokio::select! {
                r = conn.xread_options::<_, _, Option<StreamReadReply>>(&keys, &starts, &opts) => r?,
                _ = self.ctx.shutdown.cancelled() => return Ok(()),
            };
            let entries: Vec<StreamId> = read
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default();
            if backlog && entries.is_empty() {
                backlog = false;
                continue;
            }
            let partial = entries.len() < cfg.worker_batch_size;
            if !self.process(&mut conn, entries).await? {
                return Ok(());
            }
            // Below full batches, linger: fewer, larger transactions cost Postgres far less
            // than one commit per handful of messages (docs/benchmarks.md).
            if partial && !backlog && linger > Duration::ZERO {
                tokio::select! {
                    _ = tokio::time::sleep(linger) => {}
                    _ = self.ctx.shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }

    /// Claims entries idle longer than the claim threshold (their consumer died) and processes them.
    async fn claim(&mut self, conn: &mut MultiplexedConnection) -> RedisResult<()> {
        let cfg = &self.ctx.config.raw;
        let mut cursor = String::from("0-0");
        // Bounded: at most 100 rounds per claim tick.
        for _ in 0..100 {
            if self.ctx.shutdown.is_cancelled() {
                return Ok(());
            }
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(PERSISTENCE_GROUP)
                .arg(&self.ctx.config.consumer_name)
                .arg(cfg.worker_claim_idle_ms)
                .arg(&cursor)
                .arg("COUNT")
                .arg(cfg.worker_batch_size)
                .query_async(conn)
                .await?;
            if !reply.claimed.is_empty() {
                self.ctx.metrics.claimed.inc_by(reply.claimed.len() as u64);
                tracing::info!(stream = %self.stream, count = reply.claimed.len(), "claimed idle entries");
            }
            // Deleted entries (trimmed while pending) cannot be written; nothing to ack for them.
            let done = reply.next_stream_id == "0-0";
            cursor = reply.next_stream_id;
            if !self.process(conn, reply.claimed).await? {
                return Ok(());
            }
            if done {
                break;
            }
        }
        Ok(())
    }

    /// Writes a batch (retrying while Postgres is down) and acks it, in a `worker.batch` span
    /// linked to the gateway spans that accepted its traced messages. Returns false when
    /// shutdown interrupted a retry; the entries then stay pending for a later claim.
    async fn process(
        &mut self,
        conn: &mut MultiplexedConnection,
        entries: Vec<StreamId>,
    ) -> RedisResult<bool> {
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
                .filter_map(|e| entry_trace_parent(&e.map))
                .take(MAX_BATCH_LINKS)
            {
                chat_core::telemetry::link_to(&span, &tp);
            }
        }
        self.process_batch(conn, entries).instrument(span).await
    }

    async fn process_batch(
        &mut self,
        conn: &mut MultiplexedConnection,
        entries: Vec<StreamId>,
    ) -> RedisResult<bool> {
        let started = std::time::Instant::now();
        let mut messages = Vec::with_capacity(entries.len());
        let mut sources = Vec::with_capacity(entries.len());
        for entry in &entries {
            match StoredMessage::decode(&entry.map) {
                Ok(m) => {
                    messages.push(m);
                    sources.push(entry);
                }
                Err(e) => {
                    self.dead_letter(conn, &entry.id, &entry.map, &e.to_string())
                        .await?;
                }
            }
        }
        let Some(written) = self.write(conn, &messages, &sources).await? else {
            return Ok(false);
        };
        let ids: Vec<&str> = sources.iter().map(|e| e.id.as_str()).collect();
        if !ids.is_empty() {
            let acked: i64 = conn.xack(&self.stream, PERSISTENCE_GROUP, &ids).await?;
            self.ctx.metrics.entries_acked.inc_by(acked.max(0) as u64);
        }
        let m = &self.ctx.metrics;
        m.batches.inc();
        m.rows_written.inc_by(written);
        m.batch_size.observe(entries.len() as f64);
        m.batch_duration.observe(started.elapsed().as_secs_f64());
        Ok(true)
    }

    /// Writes the decoded entries (`sources[i]` is the stream entry of `messages[i]`). Rows
    /// Postgres rejects are dead-lettered one by one, so one bad entry cannot stall the
    /// partition. `Some(rows)` once committed; `None` when shutdown interrupted a retry, and the
    /// entries then stay pending for a later claim.
    async fn write(
        &self,
        conn: &mut MultiplexedConnection,
        messages: &[StoredMessage],
        sources: &[&StreamId],
    ) -> RedisResult<Option<u64>> {
        let reason = match self.write_retrying(messages).await {
            None => return Ok(None),
            Some(Ok(rows)) => return Ok(Some(rows)),
            Some(Err(reason)) => reason,
        };
        tracing::warn!(stream = %self.stream, error = %reason, "batch rejected; writing one by one");
        let mut written = 0;
        for (message, source) in messages.iter().zip(sources) {
            match self.write_retrying(std::slice::from_ref(message)).await {
                None => return Ok(None),
                Some(Ok(rows)) => written += rows,
                Some(Err(reason)) => {
                    self.dead_letter(conn, &source.id, &source.map, &reason)
                        .await?
                }
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
            match self.ctx.sink.write(batch).instrument(insert).await {
                Ok(rows) => return Some(Ok(rows)),
                Err(SinkError::Rejected(reason)) => return Some(Err(reason)),
                Err(SinkError::Unavailable(reason)) => {
                    self.ctx
                        .metrics
                        .errors
                        .with_label_values(&["postgres"])
                        .inc();
                    tracing::warn!(stream = %self.stream, error = %reason, "postgres write failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = self.ctx.shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Copies an entry to the partition's dead-letter stream with the reason, then acks it.
    async fn dead_letter(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
        fields: &HashMap<String, Value>,
        reason: &str,
    ) -> RedisResult<()> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.dead_letter)
            .arg("*")
            .arg("source_id")
            .arg(id)
            .arg("reason")
            .arg(reason);
        for (k, v) in fields {
            if let Value::BulkString(bytes) = v {
                cmd.arg(k).arg(bytes.as_slice());
            }
        }
        let _: String = cmd.query_async(conn).await?;
        // Acked here: an entry that cannot be decoded is never in a written batch.
        let _: i64 = conn.xack(&self.stream, PERSISTENCE_GROUP, &[id]).await?;
        self.ctx.metrics.dead_lettered.inc();
        tracing::error!(stream = %self.stream, entry = id, reason, "entry moved to dead-letter stream");
        Ok(())
    }

    /// Trims entries below both the oldest unacked entry and the retention window, and updates
    /// the pending, length and oldest-age gauges.
    async fn trim_and_observe(&mut self, conn: &mut MultiplexedConnection) -> RedisResult<()> {
        let pending: Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(PERSISTENCE_GROUP)
            .query_async(conn)
            .await?;
        let (count, oldest) = parse_pending_summary(&pending);
        let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(conn)
            .await?;
        let last_delivered = groups
            .iter()
            .find(|g| value_text(g.get("name")).as_deref() == Some(PERSISTENCE_GROUP))
            .and_then(|g| value_text(g.get("last-delivered-id")))
            .and_then(|id| parse_stream_id(&id));
        let now_ms = u64::try_from(chat_core::now_ms()).unwrap_or(0);
        let retention_floor = (
            now_ms.saturating_sub(self.ctx.config.raw.worker_stream_retention_secs * 1000),
            0,
        );
        let acked_floor = match (oldest.as_deref().and_then(parse_stream_id), last_delivered) {
            (Some(p), _) => Some(p),
            (None, Some(d)) => Some(d),
            (None, None) => None,
        };
        if let Some(floor) = acked_floor {
            let min_id = floor.min(retention_floor);
            let _: i64 = redis::cmd("XTRIM")
                .arg(&self.stream)
                .arg("MINID")
                .arg(format!("{}-{}", min_id.0, min_id.1))
                .query_async(conn)
                .await?;
        }
        let len: i64 = conn.xlen(&self.stream).await?;
        let m = &self.ctx.metrics;
        m.pending.with_label_values(&[self.label]).set(count);
        m.stream_length.with_label_values(&[self.label]).set(len);
        let age = oldest
            .as_deref()
            .and_then(parse_stream_id)
            .map(|(ms, _)| now_ms.saturating_sub(ms) / 1000)
            .unwrap_or(0);
        m.oldest_pending_age
            .with_label_values(&[self.label])
            .set(age as i64);
        Ok(())
    }
}

fn value_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `XPENDING key group` summary: (count, smallest pending id).
fn parse_pending_summary(v: &Value) -> (i64, Option<String>) {
    match v {
        Value::Array(items) if !items.is_empty() => {
            let count = match &items[0] {
                Value::Int(n) => *n,
                _ => 0,
            };
            (count, value_text(items.get(1)))
        }
        _ => (0, None),
    }
}

/// `"1700000000000-3"` → `(1700000000000, 3)`.
pub fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stream ids order numerically, not as text.
    #[test]
    fn stream_ids_parse_and_order() {
        let a = parse_stream_id("999-5").expect("id");
        let b = parse_stream_id("1000-0").expect("id");
        assert!(a < b);
        assert_eq!(parse_stream_id("nope"), None);
    }
}
