//! The Redis command connection pool (one per process).

/// Could not build the pool (bad URL).
#[derive(Debug, thiserror::Error)]
#[error("redis pool: {0}")]
pub struct RedisPoolError(String);

/// Builds a pool of multiplexed connections. Connections open lazily.
pub fn build(url: &str, max_size: usize) -> Result<deadpool_redis::Pool, RedisPoolError> {
    let cfg = deadpool_redis::Config::from_url(url);
    cfg.builder()
        .map_err(|e| RedisPoolError(e.to_string()))?
        .max_size(max_size)
        .wait_timeout(Some(std::time::Duration::from_secs(2)))
        .create_timeout(Some(std::time::Duration::from_secs(2)))
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .map_err(|e| RedisPoolError(e.to_string()))
}
