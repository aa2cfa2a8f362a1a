//! The node's side of Redis messaging: appending a message (one script round trip on one shared,
//! multiplexed, self-reconnecting command connection) and the one multiplexed pub/sub connection
//! that carries frames for the users held here. A manager task owns the subscriptions and
//! reconciles them with the hub; a reader task feeds the hub.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use chat_core::backoff::Backoff;
use chat_core::keys::KeySchema;
use chat_core::stream::{frame_ts, split_published, Appender, NewMessage};
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::hub::Hub;
use crate::metrics::Metrics;

/// Most subscription commands handled in one reconciliation.
const MAX_COMMAND_BATCH: usize = 512;
/// Longest an append may take before the sender gets `unavailable`.
const APPEND_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound of the subscription command queue.
const COMMAND_QUEUE: usize = 8192;

/// A Redis operation failed; the client gets `unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("subscription not confirmed in time")]
    SubscribeTimeout,
    #[error("redis did not answer in time")]
    Timeout,
    #[error("broker stopped")]
    Stopped,
}

enum Command {
    /// Make sure the user's channel is subscribed; answer when it is.
    Ensure {
        user: Uuid,
        done: oneshot::Sender<()>,
    },
    /// The user's last local connection closed; unsubscribe unless they came back.
    Release { user: Uuid },
}

/// Cloneable handle to the node's Redis messaging.
#[derive(Clone)]
pub struct Broker {
    commands: mpsc::Sender<Command>,
    /// True while the pub/sub connection is up and every local user is subscribed on it.
    pubsub_up: Arc<AtomicBool>,
    appender: Appender,
    client: redis::Client,
    /// Every append pipelines through this one connection, created at the first append; it
    /// reconnects by itself (requests fail while it does). A pool would cost a health-check
    /// round trip per message; measured in docs/benchmarks.md.
    commands_conn: Arc<tokio::sync::OnceCell<ConnectionManager>>,
    metrics: Metrics,
    subscribe_timeout: Duration,
}

impl Broker {
    /// Starts the subscription manager; it runs until `shutdown` is cancelled.
    pub fn start(
        redis_url: &str,
        keys: KeySchema,
        hub: Arc<Hub>,
        metrics: Metrics,
        subscribe_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<(Broker, JoinHandle<()>), BrokerError> {
        let client = redis::Client::open(redis_url)?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let pubsub_up = Arc::new(AtomicBool::new(false));
        let manager = Manager {
            pubsub_up: pubsub_up.clone(),
            client: client.clone(),
            keys: keys.clone(),
            hub,
            metrics: metrics.clone(),
            commands: rx,
            shutdown,
        };
        let task = tokio::spawn(manager.run());
        Ok((
            Broker {
                commands: tx,
                pubsub_up,
                appender: Appender::new(keys),
                client,
                commands_conn: Arc::new(tokio::sync::OnceCell::new()),
                metrics,
                subscribe_timeout,
            },
            task,
        ))
    }

    /// The health flag readiness reports as `pubsub`.
    pub fn pubsub_up(&self) -> Arc<AtomicBool> {
        self.pubsub_up.clone()
    }

    /// Returns once this node receives `user`'s channel. Call after registering in the hub.
    pub async fn ensure_subscribed(&self, user: Uuid) -> Result<(), BrokerError> {
        let (done, confirmed) = oneshot::channel();
        let wait = async {
            self.commands
                .send(Command::Ensure { user, done })
                .await
                .map_err(|_| BrokerError::Stopped)?;
            confirmed.await.map_err(|_| BrokerError::Stopped)
        };
        tokio::time::timeout(self.subscribe_timeout, wait)
            .await
            .map_err(|_| BrokerError::SubscribeTimeout)?
    }

    /// Call after the user's last local connection unregistered.
    pub async fn release(&self, user: Uuid) {
        let _ = self.commands.send(Command::Release { user }).await;
    }

    /// The shared command connection, connecting it on first use.
    async fn commands_conn(&self) -> Result<ConnectionManager, BrokerError> {
        let conn = self
            .commands_conn
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(APPEND_TIMEOUT)
                    .set_number_of_retries(2)
                    .set_max_delay(1000);
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await?;
        Ok(conn.clone())
    }

    /// Appends and publishes one message; returns its seq.
    pub async fn append(&self, msg: &NewMessage, origin: Uuid) -> Result<i64, BrokerError> {
        let attempt = async {
            let mut conn = self.commands_conn().await?;
            Ok::<_, BrokerError>(self.appender.append(&mut conn, msg, origin).await?)
        };
        // On timeout the script may still have run: the client is told `unavailable`, never acked.
        let result = tokio::time::timeout(APPEND_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(BrokerError::Timeout));
        if result.is_err() {
            self.metrics
                .redis_errors
                .with_label_values(&["append"])
                .inc();
        }
        result
    }
}

/// Owns the pub/sub connection and the set of subscribed users.
struct Manager {
    client: redis::Client,
    pubsub_up: Arc<AtomicBool>,
    keys: KeySchema,
    hub: Arc<Hub>,
    metrics: Metrics,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
}

impl Manager {
    async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut connected_before = false;
        loop {
            let pubsub = tokio::select! {
                r = self.client.get_async_pubsub() => r,
                _ = self.shutdown.cancelled() => return,
            };
            let (sink, stream) = match pubsub {
                Ok(p) => p.split(),
                Err(e) => {
                    tracing::warn!(error = %e, "pub/sub connect failed");
                    self.metrics
                        .redis_errors
                        .with_label_values(&["pubsub_connect"])
                        .inc();
                    if self.sleep(backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            };
            // Everyone connected here must be subscribed again on the new connection.
            let mut subscribed = HashSet::new();
            let local = self.hub.users();
            if let Err(e) = self.set_subscribed(&sink, &local, true).await {
                tracing::warn!(error = %e, "re-subscribe failed");
                if self.sleep(backoff.next_delay()).await {
                    return;
                }
                continue;
            }
            subscribed.extend(local);
            self.metrics
                .pubsub_subscriptions
                .set(subscribed.len() as i64);
            if connected_before {
                self.metrics.pubsub_reconnects.inc();
                tracing::warn!(
                    users = subscribed.len(),
                    "pub/sub reconnected and re-subscribed"
                );
            }
            connected_before = true;
            self.pubsub_up.store(true, Ordering::Relaxed);
            backoff.reset();

            let mut reader = tokio::spawn(read(
                stream,
                self.keys.clone(),
                self.hub.clone(),
                self.metrics.clone(),
            ));
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => {
                        reader.abort();
                        return;
                    }
                    _ = &mut reader => break,
                    cmd = self.commands.recv() => {
                        let Some(cmd) = cmd else {
                            reader.abort();
                            return;
                        };
                        let mut batch = vec![cmd];
                        while batch.len() < MAX_COMMAND_BATCH {
                            match self.commands.try_recv() {
                                Ok(c) => batch.push(c),
                                Err(_) => break,
                            }
                        }
                        if let Err(e) = self.reconcile(&sink, &mut subscribed, batch).await {
                            tracing::warn!(error = %e, "subscription change failed");
                            reader.abort();
                            break;
                        }
                    }
                }
            }
            // Until re-subscribed, frames for local users are not received: not ready.
            self.pubsub_up.store(false, Ordering::Relaxed);
            self.metrics
                .redis_errors
                .with_label_values(&["pubsub"])
                .inc();
            tracing::warn!("pub/sub connection lost; reconnecting");
        }
    }

    /// Sleeps unless shutdown comes first; returns true on shutdown.
    async fn sleep(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = self.shutdown.cancelled() => true,
        }
    }

    /// SUBSCRIBE (or UNSUBSCRIBE) each user's channel, one command per channel, pipelined: the
    /// client pairs one reply with one command, so a multi-channel command would be mis-paired.
    async fn set_subscribed(
        &self,
        sink: &redis::aio::PubSubSink,
        users: &[Uuid],
        subscribe: bool,
    ) -> redis::RedisResult<()> {
        let calls = users.iter().map(|user| {
            let mut sink = sink.clone();
            let channel = self.keys.user_channel(*user);
            async move {
                if subscribe {
                    sink.subscribe(channel).await
                } else {
                    sink.unsubscribe(channel).await
                }
            }
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .collect()
    }

    /// Brings the subscriptions in line with the hub for the users in `batch`, then answers.
    async fn reconcile(
        &self,
        sink: &redis::aio::PubSubSink,
        subscribed: &mut HashSet<Uuid>,
        batch: Vec<Command>,
    ) -> redis::RedisResult<()> {
        let mut to_subscribe = Vec::new();
        let mut waiting = Vec::new();
        let mut released = HashSet::new();
        for cmd in batch {
            match cmd {
                // The handshake gave up waiting (timeout): nothing to do for it.
                Command::Ensure { done, .. } if done.is_closed() => {}
                Command::Ensure { user, done } => {
                    if !subscribed.contains(&user) && !to_subscribe.contains(&user) {
                        to_subscribe.push(user);
                    }
                    waiting.push(done);
                }
                Command::Release { user } => {
                    released.insert(user);
                }
            }
        }
        // Decided by the hub alone: a user with no local connection must not stay subscribed,
        // even if an (abandoned) ensure for them came in the same batch.
        to_subscribe.retain(|u| self.hub.has_local(*u));
        let to_unsubscribe: Vec<Uuid> = released
            .into_iter()
            .filter(|u| subscribed.contains(u) && !self.hub.has_local(*u))
            .collect();
        self.set_subscribed(sink, &to_subscribe, true).await?;
        subscribed.extend(to_subscribe);
        for done in waiting {
            let _ = done.send(());
        }
        self.set_subscribed(sink, &to_unsubscribe, false).await?;
        for u in &to_unsubscribe {
            subscribed.remove(u);
        }
        self.metrics
            .pubsub_subscriptions
            .set(subscribed.len() as i64);
        Ok(())
    }
}

/// Forwards every published frame to the hub until the connection ends.
async fn read(
    mut stream: redis::aio::PubSubStream,
    keys: KeySchema,
    hub: Arc<Hub>,
    metrics: Metrics,
) {
    while let Some(msg) = stream.next().await {
        let Some(user) = keys.parse_user_channel(msg.get_channel_name()) else {
            continue;
        };
        let Some((origin, frame)) = split_published(msg.get_payload_bytes()) else {
            tracing::warn!("malformed pub/sub payload dropped");
            continue;
        };
        // Validated as UTF-8 once here; every recipient shares these bytes.
        let Ok(frame) = ByteString::try_from(Bytes::copy_from_slice(frame)) else {
            tracing::warn!("non-UTF-8 pub/sub payload dropped");
            continue;
        };
        if let Some(ts) = frame_ts(&frame) {
            let age_ms = (chat_core::now_ms() - ts).max(0);
            metrics.delivery_latency.observe(age_ms as f64 / 1000.0);
        }
        hub.deliver(user, origin, &frame);
    }
}
