//! The persistence worker: drains every partition of the message log into Postgres with a
//! consumer group, in batches, idempotently, acking only what has committed.
//!
//! # Layout
//! - [`config`]: the one typed configuration.
//! - [`consumer`]: one loop per partition: read, claim, write, ack, trim. Also run in-process by
//!   a one-process gateway (`CHAT_BACKEND=memory`) against its in-memory log.
//! - [`metrics`]: every `chat_worker_*` metric.
//!
//! The SQL it runs (the batch insert) is in `chat_core::store`; the log it reads is a
//! `chat_core::log::LogConsumer`.
#![forbid(unsafe_code)]

pub mod config;
pub mod consumer;
pub mod metrics;

use std::sync::Arc;
use std::time::Duration;

use chat_core::admin::{self, Lifecycle, Readiness};
use chat_core::keys::KeySchema;
use chat_core::log::redis::RedisLogConsumer;
use chat_core::redis_conn::Commands;
use chat_core::store::Store;
use tokio_util::sync::CancellationToken;

use crate::config::Validated;
use crate::consumer::{ConsumerSettings, Context};
use crate::metrics::Metrics;

/// The worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Db(#[from] chat_core::store::DbError),
    #[error(transparent)]
    Redis(#[from] chat_core::backend::BackendError),
    #[error("admin server: {0}")]
    Io(#[from] std::io::Error),
}

impl ConsumerSettings {
    /// The worker's settings.
    pub fn from_config(config: &Validated) -> Self {
        let cfg = &config.raw;
        ConsumerSettings {
            consumer: config.consumer_name.clone(),
            batch_size: cfg.worker_batch_size,
            block: Duration::from_millis(cfg.worker_block_ms),
            linger: Duration::from_millis(cfg.worker_batch_linger_ms),
            claim_idle: Duration::from_millis(cfg.worker_claim_idle_ms),
            claim_every: Duration::from_millis(cfg.worker_claim_interval_ms),
            trim_every: Duration::from_millis(cfg.worker_trim_interval_ms),
            retention: Duration::from_secs(cfg.worker_stream_retention_secs),
        }
    }
}

/// Runs until `shutdown`; each partition finishes (writes and acks) the batch in hand first.
pub async fn run(
    config: Validated,
    internal: std::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let cfg = config.raw.clone();
    let metrics = Metrics::new()?;
    let store = Store::connect(&cfg.database_url, cfg.worker_pg_pool_size)?;
    let keys = KeySchema::for_target(
        cfg.redis_prefix.clone(),
        cfg.redis_partitions,
        &config.redis_target,
    );
    let settings = ConsumerSettings::from_config(&config);
    let log = RedisLogConsumer::open(&config.redis_target, keys, settings.block)?;
    let lifecycle = Lifecycle::default();
    let admin_server = admin::serve(
        internal,
        metrics.registry.clone(),
        Readiness {
            lifecycle: lifecycle.clone(),
            probes: vec![
                Arc::new(Commands::open(&config.redis_target, None)?),
                Arc::new(store.clone()),
            ],
            degraded: Vec::new(),
        },
        metrics::ADMIN_METRICS,
    )?;
    let admin_handle = admin_server.handle();
    let admin_task = actix_web::rt::spawn(admin_server);

    if !chat_core::store::migrate::migrate_until_done(&cfg.database_url, &shutdown).await {
        admin_handle.stop(true).await;
        let _ = admin_task.await;
        return Ok(());
    }

    let ctx = Context {
        log: Arc::new(log),
        store,
        settings: Arc::new(settings),
        metrics,
        shutdown: shutdown.clone(),
    };
    tracing::info!(
        consumer = %ctx.settings.consumer,
        partitions = cfg.redis_partitions,
        "worker consuming"
    );
    let tasks = consumer::spawn_all(&ctx);
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
