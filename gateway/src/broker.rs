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
use chat_core::keys::{KeySchema, Topic};
use chat_core::protocol::{MembershipChange, ServerFrame};
use chat_core::stream::{split_published, Appended, Appender, NewMessage};
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
    /// Make sure the topics' channels are subscribed; answer when they are (if anyone waits).
    Ensure {
        topics: Vec<Topic>,
        done: Option<oneshot::Sender<()>>,
    },
    /// Nothing here may need these topics any more; unsubscribe those the hub no longer needs.
    Release { topics: Vec<Topic> },
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
        appender: Appender,
        hub: Arc<Hub>,
        db: deadpool_postgres::Pool,
        metrics: Metrics,
        subscribe_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<(Broker, JoinHandle<()>), BrokerError> {
        let client = redis::Client::open(redis_url)?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let pubsub_up = Arc::new(AtomicBool::new(false));
        let manager = Manager {
            own_commands: tx.clone(),
            pubsub_up: pubsub_up.clone(),
            client: client.clone(),
            keys: appender.keys().clone(),
            hub,
            db,
            metrics: metrics.clone(),
            commands: rx,
            shutdown,
        };
        let task = tokio::spawn(manager.run());
        Ok((
            Broker {
                commands: tx,
                pubsub_up,
                appender,
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

    /// Returns once this node receives the topics' channels. Call after the hub needs them
    /// (a registered connection, a joined room).
    pub async fn ensure_subscribed(&self, topics: Vec<Topic>) -> Result<(), BrokerError> {
        let (done, confirmed) = oneshot::channel();
        let wait = async {
            self.commands
                .send(Command::Ensure {
                    topics,
                    done: Some(done),
                })
                .await
                .map_err(|_| BrokerError::Stopped)?;
            confirmed.await.map_err(|_| BrokerError::Stopped)
        };
        tokio::time::timeout(self.subscribe_timeout, wait)
            .await
            .map_err(|_| BrokerError::SubscribeTimeout)?
    }

    /// Call with the topics the hub released (a user's last local connection closed).
    pub async fn release(&self, topics: Vec<Topic>) {
        if !topics.is_empty() {
            let _ = self.commands.send(Command::Release { topics }).await;
        }
    }

    /// Publishes client frames (`<origin>\n<frame>`) to channels, in order, in one pipeline:
    /// receipts, typing and membership events. Membership events name the affected user's
    /// channel first, so every node updates its room index before the room's next message.
    pub async fn publish(
        &self,
        channels: &[String],
        origin: Uuid,
        frame: &str,
    ) -> Result<(), BrokerError> {
        let payload = format!("{origin}\n{frame}");
        let mut pipe = redis::pipe();
        for channel in channels {
            pipe.cmd("PUBLISH").arg(channel).arg(&payload).ignore();
        }
        self.query(&pipe).await
    }

    /// Runs a pipeline on the shared command connection and returns its replies.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, BrokerError> {
        self.on_command_conn("command", |mut conn| async move {
            pipe.query_async(&mut conn).await
        })
        .await
    }

    /// Runs a script on the shared command connection and returns its reply.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, BrokerError> {
        self.on_command_conn("command", |mut conn| async move {
            invocation.invoke_async(&mut conn).await
        })
        .await
    }

    /// Runs `op` on the shared command connection within the append timeout; counts failures
    /// under `label`.
    async fn on_command_conn<T, F, Fut>(&self, label: &str, op: F) -> Result<T, BrokerError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let conn = self.commands_conn().await?;
            Ok::<_, BrokerError>(op(conn).await?)
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(APPEND_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(BrokerError::Timeout));
        self.metrics
            .redis_command_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.redis_errors.with_label_values(&[label]).inc();
        }
        result
    }

    /// The key schema of this deployment.
    pub fn keys(&self) -> &KeySchema {
        self.appender.keys()
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

    /// Appends and publishes one message, or finds that `client_id` was appended before. On
    /// timeout the script may still have run: the client is told `unavailable`, never acked.
    pub async fn append(
        &self,
        msg: &NewMessage,
        client_id: &str,
        origin: Uuid,
    ) -> Result<Appended, BrokerError> {
        self.on_command_conn("append", |mut conn| async move {
            self.appender
                .append(&mut conn, msg, client_id, origin)
                .await
        })
        .await
    }
}

/// Owns the pub/sub connection and the set of subscribed topics.
struct Manager {
    /// Handed to the reader, which asks for room subscriptions when membership events arrive.
    own_commands: mpsc::Sender<Command>,
    client: redis::Client,
    pubsub_up: Arc<AtomicBool>,
    keys: KeySchema,
    hub: Arc<Hub>,
    /// Room memberships are reloaded from here after a reconnect.
    db: deadpool_postgres::Pool,
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
            // Every topic needed here must be subscribed again on the new connection.
            let mut subscribed = HashSet::new();
            let local = self.hub.topics();
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
                // Frames published while the connection was down were not received: every local
                // connection may have a gap and must sync.
                let told = self.hub.broadcast(&ByteString::from(RESYNC_FRAME.as_str()));
                // Membership events may have been missed too: rebuild the room index.
                tokio::spawn(reload_rooms(
                    self.db.clone(),
                    self.hub.clone(),
                    self.own_commands.clone(),
                ));
                tracing::warn!(
                    topics = subscribed.len(),
                    connections = told,
                    "pub/sub reconnected and re-subscribed; connections told to resync"
                );
            }
            connected_before = true;
            self.pubsub_up.store(true, Ordering::Relaxed);
            backoff.reset();

            let mut reader = tokio::spawn(read(
                stream,
                self.keys.clone(),
                self.hub.clone(),
                self.own_commands.clone(),
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

    /// SUBSCRIBE (or UNSUBSCRIBE) each topic's channel, one command per channel, pipelined: the
    /// client pairs one reply with one command, so a multi-channel command would be mis-paired.
    async fn set_subscribed(
        &self,
        sink: &redis::aio::PubSubSink,
        topics: &[Topic],
        subscribe: bool,
    ) -> redis::RedisResult<()> {
        let calls = topics.iter().map(|topic| {
            let mut sink = sink.clone();
            let channel = self.keys.channel(*topic);
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
        subscribed: &mut HashSet<Topic>,
        batch: Vec<Command>,
    ) -> redis::RedisResult<()> {
        let mut to_subscribe = Vec::new();
        let mut waiting = Vec::new();
        let mut released = HashSet::new();
        for cmd in batch {
            match cmd {
                // The handshake gave up waiting (timeout): nothing to do for it.
                Command::Ensure {
                    done: Some(done), ..
                } if done.is_closed() => {}
                Command::Ensure { topics, done } => {
                    for topic in topics {
                        if !subscribed.contains(&topic) && !to_subscribe.contains(&topic) {
                            to_subscribe.push(topic);
                        }
                    }
                    waiting.extend(done);
                }
                Command::Release { topics } => {
                    released.extend(topics);
                }
            }
        }
        // Decided by the hub alone: a topic nobody here needs must not stay subscribed, even if
        // an (abandoned) ensure for it came in the same batch.
        to_subscribe.retain(|t| self.hub.has_local(*t));
        let to_unsubscribe: Vec<Topic> = released
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

/// Reloads every local user's rooms and brings the room subscriptions in line.
async fn reload_rooms(db: deadpool_postgres::Pool, hub: Arc<Hub>, commands: mpsc::Sender<Command>) {
    match crate::rooms::reload_memberships(&db, &hub).await {
        Ok((subscribe, release)) => {
            tracing::info!(
                joined = subscribe.len(),
                left = release.len(),
                "room memberships reloaded after pub/sub loss"
            );
            if !subscribe.is_empty() {
                let _ = commands
                    .send(Command::Ensure {
                        topics: subscribe,
                        done: None,
                    })
                    .await;
            }
            if !release.is_empty() {
                let _ = commands.send(Command::Release { topics: release }).await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "room memberships not reloaded; they update at the next event or reconnect")
        }
    }
}

/// Sent to every local connection after the pub/sub connection came back.
static RESYNC_FRAME: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    ServerFrame::Resync {
        reason: "pubsub_reconnected".into(),
    }
    .to_json()
});

/// The start of a membership event frame, which the node acts on before forwarding it.
const MEMBERSHIP_PREFIX: &str = "{\"type\":\"membership\"";
/// The start of a presence event frame; in a room it skips the user it is about.
const PRESENCE_PREFIX: &str = "{\"type\":\"presence\"";

/// Forwards every published frame to the hub until the connection ends. Membership events on a
/// user's channel update the room index (and the room subscriptions) before anything else of
/// that room is read.
async fn read(
    mut stream: redis::aio::PubSubStream,
    keys: KeySchema,
    hub: Arc<Hub>,
    commands: mpsc::Sender<Command>,
) {
    while let Some(msg) = stream.next().await {
        let Some(topic) = keys.parse_channel(msg.get_channel_name()) else {
            continue;
        };
        let Some(published) = split_published(msg.get_payload_bytes()) else {
            tracing::warn!("malformed pub/sub payload dropped");
            continue;
        };
        let (origin, frame) = (published.origin, published.frame);
        // A traced message gets a delivery span on every node that hands it to local sockets.
        let delivery = published
            .trace_parent
            .filter(|_| chat_core::telemetry::exporting())
            .map(|tp| {
                let span = tracing::info_span!("chat.deliver", connections = tracing::field::Empty);
                chat_core::telemetry::continue_trace(&span, tp);
                span
            });
        // Validated as UTF-8 once here; every recipient shares these bytes.
        let Ok(frame) = ByteString::try_from(Bytes::copy_from_slice(frame)) else {
            tracing::warn!("non-UTF-8 pub/sub payload dropped");
            continue;
        };
        let mut skip_user = None;
        if frame.starts_with(MEMBERSHIP_PREFIX) {
            match serde_json::from_str::<ServerFrame>(&frame) {
                Ok(ServerFrame::Membership {
                    conversation_id,
                    user_id,
                    change,
                    ..
                }) => {
                    match topic {
                        Topic::User(_) => {
                            let command = match change {
                                MembershipChange::Added => {
                                    let new = hub.join(user_id, &[conversation_id]);
                                    (!new.is_empty()).then(|| Command::Ensure {
                                        topics: vec![Topic::Room(conversation_id)],
                                        done: None,
                                    })
                                }
                                MembershipChange::Removed => hub
                                    .leave(user_id, conversation_id)
                                    .then(|| Command::Release {
                                        topics: vec![Topic::Room(conversation_id)],
                                    }),
                            };
                            if let Some(command) = command {
                                let _ = commands.send(command).await;
                            }
                        }
                        // The affected user gets the event on their own channel.
                        Topic::Room(_) | Topic::Presence(_) => skip_user = Some(user_id),
                    }
                }
                _ => {
                    tracing::warn!("malformed membership event dropped");
                    continue;
                }
            }
        } else if frame.starts_with(PRESENCE_PREFIX) {
            if let Ok(ServerFrame::Presence { user_id, .. }) = serde_json::from_str(&frame) {
                skip_user = Some(user_id);
            }
        }
        let queued = {
            let _entered = delivery.as_ref().map(|span| span.enter());
            hub.deliver(topic, origin, skip_user, &frame)
        };
        if let Some(span) = delivery {
            span.record("connections", queued);
        }
    }
}
