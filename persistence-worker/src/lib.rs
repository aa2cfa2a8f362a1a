//! The persistence worker: drains every message stream partition into Postgres with a consumer
//! group, in batches, idempotently, acking only what has committed.
//!
//! # Layout
//! - [`config`]: the one typed configuration.
//! - [`consumer`]: one loop per partition: read, claim, write, ack, trim.
//! - [`sink`]: the Postgres batch writer.
//! - [`metrics`]: every `chat_worker_*` metric.
#![forbid(unsafe_code)]

pub mod config;
pub mod consumer;
pub mod metrics;
pub mod sink;

use std::sync::Arc;

use chat_core::admin::{self, Lifecycle, Readiness};
use chat_core::keys::KeySchema;
use tokio_util::sync::CancellationToken;

use crate::config::Validated;
use crate::consumer::Context;
use crate::metrics::Metrics;
use crate::sink::Sink;

/// The worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Db(#[from] chat_core::db::DbError),
    #[error(transparent)]
    RedisPool(#[from] chat_core::redis_pool::RedisPoolError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("admin server: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs until `shutdown`; each partition finishes (writes and acks) the batch in hand first.
pub async fn run(
    config: Validated,
    internal: std::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let cfg = config.raw.clone();
    let metrics = Metrics::new()?;
    let db = chat_core::db::pool(&cfg.database_url, cfg.worker_pg_pool_size)?;
    let redis_pool = chat_core::redis_pool::build(&cfg.redis_url, 2)?;
    let lifecycle = Lifecycle::default();
    let admin_server = admin::serve(
        internal,
        metrics.registry.clone(),
        Readiness {
            redis: redis_pool,
            postgres: db.clone(),
            lifecycle: lifecycle.clone(),
            flags: Vec::new(),
        },
        metrics::READY_METRIC,
    )?;
    let admin_handle = admin_server.handle();
    let admin_task = actix_web::rt::spawn(admin_server);

    if !chat_core::db::migrate_until_done(&cfg.database_url, &shutdown).await {
        admin_handle.stop(true).await;
        let _ = admin_task.await;
        return Ok(());
    }

    let ctx = Context {
        keys: KeySchema::new(cfg.redis_prefix.clone(), cfg.redis_partitions),
        client: redis::Client::open(cfg.redis_url.as_str())?,
        sink: Sink::new(db),
        metrics,
        shutdown: shutdown.clone(),
        config: Arc::new(config),
    };
    tracing::info!(
        consumer = %ctx.config.consumer_name,
        partitions = cfg.redis_partitions,
        "worker consuming"
    );
    let tasks: Vec<_> = (0..cfg.redis_partitions)
        .map(|p| tokio::spawn(consumer::run_partition(ctx.clone(), p)))
        .collect();
    lifecycle.serving();
    shutdown.cancelled().await;
    lifecycle.draining();
    for task in tasks {
        let _ = task.await;
    }
    admin_handle.stop(true).await;
    let _ = admin_task.await;
    tracing::info!("worker stopped");
    Ok(())
}
