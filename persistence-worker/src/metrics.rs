//! Every `chat_worker_*` metric, registered in the worker's own registry.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The readiness gauges the admin server registers and evaluates on every probe and scrape: 1
/// while `/readyz` answers 200, and a degraded gauge that stays empty (no worker check is
/// degraded-only: without Redis or Postgres a worker does nothing).
pub const ADMIN_METRICS: chat_core::admin::AdminMetrics = chat_core::admin::AdminMetrics {
    ready: "chat_worker_ready",
    degraded: "chat_worker_degraded",
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub batches: IntCounter,
    pub rows_written: IntCounter,
    pub entries_acked: IntCounter,
    pub claimed: IntCounter,
    pub dead_lettered: IntCounter,
    pub errors: IntCounterVec,
    pub batch_size: Histogram,
    pub batch_duration: Histogram,
    pub pending: IntGaugeVec,
    pub stream_length: IntGaugeVec,
    pub oldest_pending_age: IntGaugeVec,
}

impl Metrics {
    /// Every metric, in a registry of its own.
    pub fn new() -> Result<Self, prometheus::Error> {
        Self::register_in(Registry::new())
    }

    /// Every metric, registered in `registry` (a one-process gateway adds them to its own).
    pub fn register_in(registry: Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge_vec = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["partition"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let errors = IntCounterVec::new(
            Opts::new(
                "chat_worker_errors_total",
                "Failed operations by dependency",
            ),
            &["dependency"],
        )?;
        registry.register(Box::new(errors.clone()))?;
        // Exported at 0 from the start, so rate() sees the first error.
        for dependency in ["redis", "postgres"] {
            errors.with_label_values(&[dependency]);
        }
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("chat_worker_batch_size", "Entries per written batch")
                .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0]),
        )?;
        registry.register(Box::new(batch_size.clone()))?;
        let batch_duration = Histogram::with_opts(
            HistogramOpts::new(
                "chat_worker_batch_duration_seconds",
                "Time to write and ack one batch",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        registry.register(Box::new(batch_duration.clone()))?;
        Ok(Metrics {
            batches: counter("chat_worker_batches_total", "Batches committed to Postgres")?,
            rows_written: counter(
                "chat_worker_rows_written_total",
                "Message rows inserted (duplicates excluded)",
            )?,
            entries_acked: counter(
                "chat_worker_entries_acked_total",
                "Stream entries acknowledged",
            )?,
            claimed: counter(
                "chat_worker_claimed_total",
                "Entries claimed from idle consumers",
            )?,
            dead_lettered: counter(
                "chat_worker_dead_lettered_total",
                "Entries moved to the dead-letter stream (undecodable or rejected by Postgres)",
            )?,
            errors,
            batch_size,
            batch_duration,
            pending: gauge_vec(
                "chat_worker_pending_entries",
                "Entries delivered to the group but not acked",
            )?,
            stream_length: gauge_vec(
                "chat_worker_stream_length",
                "Entries in the stream partition",
            )?,
            oldest_pending_age: gauge_vec(
                "chat_worker_oldest_pending_age_seconds",
                "Age of the oldest unacked entry",
            )?,
            registry,
        })
    }
}
