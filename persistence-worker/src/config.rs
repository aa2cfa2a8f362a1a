//! The worker's one typed configuration, loaded once and validated before the admin port binds.

use std::net::SocketAddr;
use std::path::Path;

use chat_core::settings::{self, SettingsError};
use chat_core::telemetry::LogFormat;
use serde::Deserialize;

/// Every setting; the key is the env var without `CHAT_`, lowercased. See `docs/operations.md`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WorkerConfig {
    pub redis_url: String,
    /// Seed nodes of a Redis Cluster, comma-separated (`redis://host:port` each). Not empty:
    /// the cluster is used and `redis_url` is not.
    pub redis_cluster_urls: String,
    pub database_url: String,
    pub redis_prefix: String,
    /// Must match the gateways'.
    pub redis_partitions: u16,
    pub log_format: LogFormat,
    pub worker_internal_listen: String,
    pub worker_consumer_name: Option<String>,
    /// Most entries read, written and acked together.
    pub worker_batch_size: usize,
    /// How long one read waits for new entries.
    pub worker_block_ms: u64,
    /// After a batch smaller than `worker_batch_size`, wait this long before the next read, so
    /// that entries arriving meanwhile share one transaction. 0 reads again at once.
    pub worker_batch_linger_ms: u64,
    /// Entries pending this long on any consumer are claimed (their consumer is presumed dead).
    pub worker_claim_idle_ms: u64,
    pub worker_claim_interval_ms: u64,
    pub worker_trim_interval_ms: u64,
    /// Acked entries younger than this stay in the stream (nothing reads them; they are there
    /// to inspect). They count towards the gateway's `redis_log_max_backlog`; 0 trims right
    /// behind what the group has acked.
    pub worker_stream_retention_secs: u64,
    pub worker_pg_pool_size: usize,
    /// OTLP/HTTP endpoint spans are exported to (`http://collector:4318`); unset: no export.
    pub otel_endpoint: Option<String>,
    /// Fraction of batch traces exported.
    pub otel_sampling_ratio: f64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_cluster_urls: String::new(),
            database_url: "postgres://postgres@127.0.0.1:5432/chat".into(),
            redis_prefix: "chat".into(),
            redis_partitions: 8,
            log_format: LogFormat::Json,
            worker_internal_listen: "0.0.0.0:9091".into(),
            worker_consumer_name: None,
            worker_batch_size: 500,
            worker_block_ms: 1000,
            worker_batch_linger_ms: 50,
            worker_claim_idle_ms: 30_000,
            worker_claim_interval_ms: 5_000,
            worker_trim_interval_ms: 10_000,
            worker_stream_retention_secs: 0,
            // One per partition loop (8 by default) and one for the readiness probe.
            worker_pg_pool_size: 9,
            otel_endpoint: None,
            otel_sampling_ratio: 0.1,
        }
    }
}

/// The configuration after validation.
#[derive(Debug, Clone)]
pub struct Validated {
    pub raw: WorkerConfig,
    pub internal_listen: SocketAddr,
    pub consumer_name: String,
    /// Span export, when `otel_endpoint` is set.
    pub tracing: chat_core::telemetry::TracingSettings,
    /// Where Redis is.
    pub redis_target: chat_core::redis_conn::RedisTarget,
}

impl WorkerConfig {
    pub fn load(file: Option<&Path>) -> Result<Validated, SettingsError> {
        settings::load::<WorkerConfig>(file)?.validate()
    }

    pub fn validate(self) -> Result<Validated, SettingsError> {
        let internal_listen =
            settings::parse_listen("worker_internal_listen", &self.worker_internal_listen)?;
        settings::check_prefix("redis_prefix", &self.redis_prefix)?;
        settings::check_urls(Some(&self.redis_url), &self.database_url)?;
        let redis_target = settings::redis_target(&self.redis_url, &self.redis_cluster_urls)?;
        if self.redis_partitions == 0 || self.redis_partitions > 1024 {
            return Err(SettingsError::invalid(
                "redis_partitions",
                "must be 1 to 1024",
            ));
        }
        if self.worker_batch_linger_ms > 1000 {
            return Err(SettingsError::invalid(
                "worker_batch_linger_ms",
                "must be 0 to 1000",
            ));
        }
        if self.worker_batch_size == 0 || self.worker_batch_size > 10_000 {
            return Err(SettingsError::invalid(
                "worker_batch_size",
                "must be 1 to 10000",
            ));
        }
        for (key, v) in [
            ("worker_block_ms", self.worker_block_ms),
            ("worker_claim_idle_ms", self.worker_claim_idle_ms),
            ("worker_claim_interval_ms", self.worker_claim_interval_ms),
            ("worker_trim_interval_ms", self.worker_trim_interval_ms),
            ("worker_pg_pool_size", self.worker_pg_pool_size as u64),
        ] {
            if v == 0 {
                return Err(SettingsError::invalid(key, "must be greater than 0"));
            }
        }
        let consumer_name = self
            .worker_consumer_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| settings::hostname_or("worker"));
        let tracing = chat_core::telemetry::TracingSettings {
            endpoint: settings::check_tracing(
                self.otel_endpoint.as_deref(),
                self.otel_sampling_ratio,
            )?,
            sampling_ratio: self.otel_sampling_ratio,
            service_name: "chat-persistence-worker",
            instance: consumer_name.clone(),
        };
        Ok(Validated {
            raw: self,
            internal_listen,
            consumer_name,
            tracing,
            redis_target,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zero batch size is refused by name.
    #[test]
    fn zero_batch_names_key() {
        let err = WorkerConfig {
            worker_batch_size: 0,
            ..WorkerConfig::default()
        }
        .validate()
        .expect_err("invalid")
        .to_string();
        assert!(err.contains("worker_batch_size"), "{err}");
    }

    /// A linger over a second is refused by name; zero (no linger) is allowed.
    #[test]
    fn linger_is_bounded() {
        let err = WorkerConfig {
            worker_batch_linger_ms: 1001,
            ..WorkerConfig::default()
        }
        .validate()
        .expect_err("invalid")
        .to_string();
        assert!(err.contains("worker_batch_linger_ms"), "{err}");
        let zero = WorkerConfig {
            worker_batch_linger_ms: 0,
            ..WorkerConfig::default()
        };
        assert!(zero.validate().is_ok());
    }
}
