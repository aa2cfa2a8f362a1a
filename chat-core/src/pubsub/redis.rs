//! Pub/sub on one Redis: a channel per topic, one multiplexed pub/sub connection per node. A
//! manager task owns the connection and the set of subscribed channels and reconciles it with
//! what the subscriber wants; a reader task decodes each payload once into an [`Envelope`] and
//! pushes it into the subscriber. Publishing pipelines `PUBLISH` on the shared command
//! connection. A [`Canary`] proves the connection delivers; when it stops, the manager connects
//! again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::canary::{Canary, Verdict};
use super::{Envelope, Interest, PubSub, Publication, Subscriber, Topic};
use crate::backend::BackendError;
use crate::backoff::Backoff;
use crate::keys::KeySchema;
use crate::redis_conn::Commands;

/// Most subscription commands handled in one reconciliation.
const MAX_COMMAND_BATCH: usize = 512;
/// Bound of the subscription command queue.
const COMMAND_QUEUE: usize = 8192;
/// How often the subscriptions are compared with what the subscriber wants, catching releases
/// that could not be queued.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// Longest wait for a new pub/sub connection: a black-holed link must not hang the manager.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a subscription change to be answered on a connection: the connection has
/// no response timeout of its own, and one that stays open but answers nothing (half-open)
/// would otherwise hold the manager, its canary check and its shutdown.
const SUBSCRIBE_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) enum Command {
    /// Make sure the topics are subscribed; answer when they are (if anyone waits).
    Ensure {
        topics: Vec<Topic>,
        done: Option<oneshot::Sender<()>>,
    },
    /// The subscriber may no longer need these topics.
    Release { topics: Vec<Topic> },
}

impl Command {
    pub(super) fn from_interest(interest: Interest) -> impl Iterator<Item = Command> {
        let ensure = (!interest.subscribe.is_empty()).then_some(Command::Ensure {
            topics: interest.subscribe,
            done: None,
        });
        let release = (!interest.release.is_empty()).then_some(Command::Release {
            topics: interest.release,
        });
        ensure.into_iter().chain(release)
    }
}

/// Sends an ensure for `topics` and waits, up to `timeout`, until the manager confirms them.
pub(super) async fn ensure(
    commands: &mpsc::Sender<Command>,
    topics: Vec<Topic>,
    timeout: Duration,
) -> Result<(), BackendError> {
    let (done, confirmed) = oneshot::channel();
    let wait = async {
        commands
            .send(Command::Ensure {
                topics,
                done: Some(done),
            })
            .await
            .map_err(|_| BackendError::Stopped)?;
        confirmed.await.map_err(|_| BackendError::Stopped)
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| BackendError::Timeout)?
}

/// Queues a release without waiting; when the queue is full, the periodic reconciliation drops
/// the topics later.
pub(super) fn release(commands: &mpsc::Sender<Command>, topics: Vec<Topic>) {
    if !topics.is_empty() {
        let _ = commands.try_send(Command::Release { topics });
    }
}

/// What a batch of subscription commands asks of a manager: topics to subscribe (before the
/// waiters are answered), the waiters, and topics to drop (only those the subscriber no longer
/// wants). Decided by the subscriber alone: a topic nobody here needs must not stay subscribed,
/// even if an (abandoned) ensure for it came in the same batch.
pub(super) struct Plan {
    pub subscribe: Vec<Topic>,
    pub waiting: Vec<oneshot::Sender<()>>,
    pub unsubscribe: Vec<Topic>,
}

impl Plan {
    pub(super) fn of(
        batch: Vec<Command>,
        subscribed: &HashSet<Topic>,
        subscriber: &dyn Subscriber,
    ) -> Plan {
        let mut to_subscribe = Vec::new();
        let mut waiting = Vec::new();
        let mut released = HashSet::new();
        for cmd in batch {
            match cmd {
                // The caller gave up waiting (timeout): nothing to do for it.
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
                Command::Release { topics } => released.extend(topics),
            }
        }
        to_subscribe.retain(|t| subscriber.wants(*t));
        let unsubscribe = released
            .into_iter()
            .filter(|t| subscribed.contains(t) && !subscriber.wants(*t))
            .collect();
        Plan {
            subscribe: to_subscribe,
            waiting,
            unsubscribe,
        }
    }

    /// The changes a periodic comparison of `subscribed` with what the subscriber wants finds.
    pub(super) fn reconciliation(
        subscribed: &HashSet<Topic>,
        subscriber: &dyn Subscriber,
    ) -> Vec<Command> {
        let wanted: HashSet<Topic> = subscriber.topics().into_iter().collect();
        vec![
            Command::Ensure {
                topics: wanted.difference(subscribed).copied().collect(),
                done: None,
            },
            Command::Release {
                topics: subscribed.difference(&wanted).copied().collect(),
            },
        ]
    }
}

/// Redis pub/sub for one node.
pub struct RedisPubSub {
    commands: mpsc::Sender<Command>,
    /// True while the pub/sub connection is up and every wanted topic is subscribed on it.
    healthy: Arc<AtomicBool>,
    keys: KeySchema,
    publisher: Commands,
    subscribe_timeout: Duration,
}

impl RedisPubSub {
    /// Starts the manager; it runs until `shutdown` is cancelled. `subscribe_timeout` bounds
    /// how long [`PubSub::subscribe`] waits for a confirmation.
    pub fn start(
        commands: Commands,
        keys: KeySchema,
        subscriber: Arc<dyn Subscriber>,
        subscribe_timeout: Duration,
        canary: Canary,
        shutdown: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let healthy = Arc::new(AtomicBool::new(false));
        let manager = Manager {
            own_commands: tx.clone(),
            commands: rx,
            healthy: healthy.clone(),
            redis: commands.clone(),
            keys: keys.clone(),
            subscriber,
            canary,
            shutdown,
            background: JoinSet::new(),
        };
        let task = tokio::spawn(manager.run());
        (
            RedisPubSub {
                commands: tx,
                healthy,
                keys,
                publisher: commands,
                subscribe_timeout,
            },
            task,
        )
    }
}

#[async_trait]
impl PubSub for RedisPubSub {
    async fn subscribe(&self, topics: Vec<Topic>) -> Result<(), BackendError> {
        ensure(&self.commands, topics, self.subscribe_timeout).await
    }

    fn release(&self, topics: Vec<Topic>) {
        release(&self.commands, topics)
    }

    async fn publish(&self, publications: Vec<Publication>) -> Result<(), BackendError> {
        let mut pipe = redis::pipe();
        for publication in &publications {
            let payload = publication.envelope.encode();
            for topic in &publication.topics {
                pipe.cmd("PUBLISH")
                    .arg(self.keys.channel(*topic))
                    .arg(&payload)
                    .ignore();
            }
        }
        self.publisher.query("command", &pipe).await
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// Owns the pub/sub connection and the set of subscribed topics.
struct Manager {
    /// Handed to the reader and to background work, which queue subscription changes.
    own_commands: mpsc::Sender<Command>,
    commands: mpsc::Receiver<Command>,
    healthy: Arc<AtomicBool>,
    redis: Commands,
    keys: KeySchema,
    subscriber: Arc<dyn Subscriber>,
    canary: Canary,
    shutdown: CancellationToken,
    /// Work the manager started and joins before it ends (reloads after a loss, canary
    /// publishes); finished ones are reaped at every canary tick.
    background: JoinSet<()>,
}

impl Manager {
    async fn run(mut self) {
        self.serve().await;
        self.healthy.store(false, Ordering::Relaxed);
        self.background.shutdown().await;
    }

    async fn serve(&mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut connected_before = false;
        // After a lost canary, a new connection is healthy only once a canary came back on it
        // (the token it must see is at least this one).
        let mut prove_from: Option<u64> = None;
        let Some(client) = self.redis.client().cloned() else {
            tracing::error!("classic pub/sub needs one Redis instance, not a cluster");
            return;
        };
        loop {
            let pubsub = tokio::select! {
                r = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()) => {
                    r.unwrap_or_else(|_| Err(redis::RedisError::from((
                        redis::ErrorKind::IoError,
                        "pub/sub connect timed out",
                    ))))
                }
                _ = self.shutdown.cancelled() => return,
            };
            let (sink, stream) = match pubsub {
                Ok(p) => p.split(),
                Err(e) => {
                    tracing::warn!(error = %e, "pub/sub connect failed");
                    self.count_error("pubsub_connect");
                    if self.sleep(backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            };
            // Every topic needed here must be subscribed again on the new connection.
            let mut subscribed = HashSet::new();
            let wanted = self.subscriber.topics();
            let canary_channel = self.canary.channel().to_string();
            let resubscribed = async {
                sink.clone().subscribe(canary_channel).await?;
                self.set_subscribed(&sink, &wanted, true).await
            };
            let resubscribed = tokio::time::timeout(CONNECT_TIMEOUT, resubscribed)
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from((
                        redis::ErrorKind::IoError,
                        "re-subscribe timed out",
                    )))
                });
            if let Err(e) = resubscribed {
                tracing::warn!(error = %e, "re-subscribe failed");
                if self.sleep(backoff.next_delay()).await {
                    return;
                }
                continue;
            }
            subscribed.extend(wanted);
            self.set_gauge(&subscribed);
            if connected_before {
                if let Some(m) = self.redis.metrics() {
                    m.reconnects.inc();
                }
                tracing::warn!(
                    topics = subscribed.len(),
                    "pub/sub reconnected and re-subscribed; the node catches up"
                );
                // Envelopes published while the connection was down were not received.
                let subscriber = self.subscriber.clone();
                let commands = self.own_commands.clone();
                self.background.spawn(async move {
                    for command in Command::from_interest(subscriber.missed().await) {
                        let _ = commands.send(command).await;
                    }
                });
            }
            connected_before = true;
            self.healthy.store(prove_from.is_none(), Ordering::Relaxed);
            backoff.reset();

            let mut reader = tokio::spawn(read(
                stream,
                self.keys.clone(),
                self.subscriber.clone(),
                self.own_commands.clone(),
                self.canary.clone(),
            ));
            let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
            reconcile.tick().await;
            let mut canary_tick = tokio::time::interval(self.canary.every());
            let lost = loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => {
                        reader.abort();
                        let _ = reader.await;
                        return;
                    }
                    _ = &mut reader => break true,
                    _ = canary_tick.tick() => {
                        while self.background.try_join_next().is_some() {}
                        if let Some(from) = prove_from {
                            if self.canary.returned_since(from) {
                                prove_from = None;
                                self.healthy.store(true, Ordering::Relaxed);
                            }
                        }
                        match self.canary.tick() {
                            Verdict::Lost => {
                                tracing::warn!(
                                    "delivery canary did not come back; reconnecting pub/sub"
                                );
                                prove_from = Some(self.canary.last_token() + 1);
                                reader.abort();
                                let _ = (&mut reader).await;
                                break true;
                            }
                            Verdict::Fine(Some(token)) => self.publish_canary(token),
                            Verdict::Fine(None) => {}
                        }
                    }
                    _ = reconcile.tick() => {
                        let change = Plan::reconciliation(&subscribed, self.subscriber.as_ref());
                        if let Err(e) = answered(self.reconcile(&sink, &mut subscribed, change)).await {
                            tracing::warn!(error = %e, "subscription reconciliation failed");
                            reader.abort();
                            let _ = (&mut reader).await;
                            break true;
                        }
                    }
                    cmd = self.commands.recv() => {
                        let Some(cmd) = cmd else {
                            reader.abort();
                            let _ = reader.await;
                            return;
                        };
                        let mut batch = vec![cmd];
                        while batch.len() < MAX_COMMAND_BATCH {
                            match self.commands.try_recv() {
                                Ok(c) => batch.push(c),
                                Err(_) => break,
                            }
                        }
                        if let Err(e) = answered(self.reconcile(&sink, &mut subscribed, batch)).await {
                            tracing::warn!(error = %e, "subscription change failed");
                            reader.abort();
                            let _ = (&mut reader).await;
                            break true;
                        }
                    }
                }
            };
            if lost {
                // Until subscribed again, envelopes for local users are not received.
                self.healthy.store(false, Ordering::Relaxed);
                self.count_error("pubsub");
                tracing::warn!("pub/sub connection lost; reconnecting");
            }
        }
    }

    fn count_error(&self, op: &str) {
        self.redis.count_error(op);
    }

    /// Publishes canary `token` beside the manager (it never waits on Redis).
    fn publish_canary(&mut self, token: u64) {
        let (redis, canary) = (self.redis.clone(), self.canary.clone());
        self.background.spawn(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("PUBLISH")
                .arg(canary.channel())
                .arg(token.to_string())
                .ignore();
            if redis.query::<()>("command", &pipe).await.is_ok() {
                canary.published(token);
            }
        });
    }

    fn set_gauge(&self, subscribed: &HashSet<Topic>) {
        self.redis.set_subscriptions(subscribed.len());
    }

    /// Sleeps unless shutdown comes first; returns true on shutdown.
    async fn sleep(&self, delay: Duration) -> bool {
        crate::shutdown::sleep_or_shutdown(delay, &self.shutdown).await
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

    /// Brings the subscriptions in line with the subscriber for the topics in `batch`, then
    /// answers whoever waits.
    async fn reconcile(
        &self,
        sink: &redis::aio::PubSubSink,
        subscribed: &mut HashSet<Topic>,
        batch: Vec<Command>,
    ) -> redis::RedisResult<()> {
        let plan = Plan::of(batch, subscribed, self.subscriber.as_ref());
        self.set_subscribed(sink, &plan.subscribe, true).await?;
        subscribed.extend(plan.subscribe);
        for done in plan.waiting {
            let _ = done.send(());
        }
        self.set_subscribed(sink, &plan.unsubscribe, false).await?;
        for t in &plan.unsubscribe {
            subscribed.remove(t);
        }
        self.set_gauge(subscribed);
        Ok(())
    }
}

/// `change`, or an error once it has waited [`SUBSCRIBE_ANSWER_TIMEOUT`] for an answer.
async fn answered(
    change: impl std::future::Future<Output = redis::RedisResult<()>>,
) -> redis::RedisResult<()> {
    tokio::time::timeout(SUBSCRIBE_ANSWER_TIMEOUT, change)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "subscription change not answered",
            )))
        })
}

/// Decodes every payload once and pushes it into the subscriber until the connection ends; the
/// subscription changes an envelope causes are queued before the next payload is read, so a
/// node follows a membership change before the room's next message.
async fn read(
    mut stream: redis::aio::PubSubStream,
    keys: KeySchema,
    subscriber: Arc<dyn Subscriber>,
    commands: mpsc::Sender<Command>,
    canary: Canary,
) {
    while let Some(msg) = stream.next().await {
        if msg.get_channel_name() == canary.channel() {
            canary.arrived(msg.get_payload_bytes());
            continue;
        }
        let Some(topic) = keys.parse_channel(msg.get_channel_name()) else {
            continue;
        };
        let envelope = match Envelope::decode(msg.get_payload_bytes()) {
            Ok(envelope) => envelope,
            Err(e) => {
                tracing::warn!(error = %e, "pub/sub payload dropped");
                continue;
            }
        };
        for command in Command::from_interest(subscriber.deliver(topic, envelope)) {
            let _ = commands.send(command).await;
        }
    }
}
