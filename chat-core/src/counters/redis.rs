//! Shared counters on Redis: `INCR` and `PEXPIRE NX` in one pipeline per count, `GET`s to peek.

use std::time::Duration;

use async_trait::async_trait;

use super::{CounterKey, Counters};
use crate::backend::BackendError;
use crate::keys::KeySchema;
use crate::redis_conn::Commands;

/// Counters in Redis, shared by every node of a deployment.
pub struct RedisCounters {
    redis: Commands,
    keys: KeySchema,
}

impl RedisCounters {
    pub fn new(redis: Commands, keys: KeySchema) -> Self {
        RedisCounters { redis, keys }
    }
}

#[async_trait]
impl Counters for RedisCounters {
    async fn count(&self, key: &CounterKey, window: Duration) -> Result<u64, BackendError> {
        let key = self.keys.counter(key);
        let mut pipe = redis::pipe();
        pipe.cmd("INCR")
            .arg(&key)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(u64::try_from(window.as_millis()).unwrap_or(u64::MAX))
            .arg("NX")
            .ignore();
        let (count,): (u64,) = self.redis.query("command", &pipe).await?;
        Ok(count)
    }

    async fn add_many(
        &self,
        adds: &[(CounterKey, u64)],
        window: Duration,
    ) -> Result<Vec<u64>, BackendError> {
        // One request per key, all at once: the keys live in different slots of a cluster, and
        // one instance pipelines concurrent requests on its connection anyway.
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let requests = adds.iter().map(|(key, n)| {
            let key = self.keys.counter(key);
            let mut pipe = redis::pipe();
            pipe.cmd("INCRBY")
                .arg(&key)
                .arg(*n)
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(ms)
                .arg("NX")
                .ignore();
            async move {
                let (total,): (u64,) = self.redis.query("command", &pipe).await?;
                Ok::<u64, BackendError>(total)
            }
        });
        futures_util::future::try_join_all(requests).await
    }

    async fn peek(&self, keys: &[CounterKey]) -> Result<Vec<u64>, BackendError> {
        // One GET each, all at once (the keys may live in different slots of a cluster).
        let requests = keys.iter().map(|key| {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(self.keys.counter(key));
            async move {
                let (count,): (Option<u64>,) = self.redis.query("command", &pipe).await?;
                Ok::<u64, BackendError>(count.unwrap_or_default())
            }
        });
        futures_util::future::try_join_all(requests).await
    }
}
