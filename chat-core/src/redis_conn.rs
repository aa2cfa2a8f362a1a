//! The Redis plumbing the Redis backend's roles share: one multiplexed, self-reconnecting
//! command connection per process, every call bounded in time and counted by operation, and the
//! readiness probe on it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::backend::BackendError;

/// Longest one command, pipeline or script may take (connecting included).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the readiness PING may take.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

impl From<redis::RedisError> for BackendError {
    fn from(e: redis::RedisError) -> Self {
        BackendError::Unavailable(e.to_string())
    }
}

/// The Redis metrics of one binary, registered by it under its own names.
#[derive(Clone)]
pub struct RedisMetrics {
    /// Round trip of a command, pipeline or script, by operation.
    pub command_seconds: HistogramVec,
    /// Failed operations, by operation.
    pub errors: IntCounterVec,
    /// Channels the node's pub/sub connection is subscribed to.
    pub subscriptions: IntGauge,
    /// Times the pub/sub connection was established again.
    pub reconnects: IntCounter,
    /// What the log did about Redis losing data and its bounds, by event: `epoch_opened`,
    /// `rebased` (a counter validated in a new epoch), `backlog_full` (an append refused),
    /// `replicas_short` (fewer replicas than `ack_durability` asks confirmed an append).
    pub log_events: IntCounterVec,
}

/// The shared command connection, opened at first use. Concurrent calls pipeline on it; while
/// it reconnects, calls fail (the caller answers `unavailable`). A pool would cost a
/// health-check round trip per message (measured in docs/benchmarks.md).
#[derive(Clone)]
pub struct Commands {
    client: redis::Client,
    conn: Arc<tokio::sync::OnceCell<ConnectionManager>>,
    metrics: Option<RedisMetrics>,
}

impl Commands {
    /// Commands against `url`; `metrics` are recorded when given.
    pub fn new(url: &str, metrics: Option<RedisMetrics>) -> Result<Self, BackendError> {
        Ok(Commands {
            client: redis::Client::open(url)?,
            conn: Arc::new(tokio::sync::OnceCell::new()),
            metrics,
        })
    }

    /// The client, for connections of their own (pub/sub, blocking reads).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The metrics, when recorded.
    pub fn metrics(&self) -> Option<&RedisMetrics> {
        self.metrics.as_ref()
    }

    async fn conn(&self) -> Result<ConnectionManager, BackendError> {
        let conn = self
            .conn
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(COMMAND_TIMEOUT)
                    .set_number_of_retries(2)
                    .set_max_delay(1000);
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await?;
        Ok(conn.clone())
    }

    /// Runs `op` on the shared connection within [`COMMAND_TIMEOUT`]; times it and counts a
    /// failure under `label`.
    pub async fn run<T, F, Fut>(&self, label: &str, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let conn = self.conn().await?;
            Ok::<_, BackendError>(op(conn).await?)
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(COMMAND_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(BackendError::Timeout));
        if let Some(m) = &self.metrics {
            m.command_seconds
                .with_label_values(&[label])
                .observe(started.elapsed().as_secs_f64());
            if result.is_err() {
                m.errors.with_label_values(&[label]).inc();
            }
        }
        result
    }

    /// Runs a pipeline and returns its replies.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        label: &str,
        pipe: &redis::Pipeline,
    ) -> Result<T, BackendError> {
        self.run(label, |mut conn| async move {
            pipe.query_async(&mut conn).await
        })
        .await
    }

    /// Runs a script (EVALSHA, loading it after a flush) and returns its reply.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        label: &str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, BackendError> {
        self.run(label, |mut conn| async move {
            invocation.invoke_async(&mut conn).await
        })
        .await
    }
}

#[async_trait]
impl crate::admin::Probe for Commands {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn ready(&self) -> bool {
        let ping = async {
            let mut conn = self.conn().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        };
        matches!(tokio::time::timeout(PING_TIMEOUT, ping).await, Ok(Some(_)))
    }
}
