//! Pub/sub on a Redis Cluster: shard channels only (`SSUBSCRIBE`, `SPUBLISH`; nothing is
//! broadcast to every shard). A user's topic is one channel per stream partition, so the append
//! script publishes each message in its conversation's slot; a node subscribes to the channels
//! of what it holds over one RESP3 connection per master (redis-rs's cluster connection, which
//! follows MOVED/ASK and failovers). A manager task owns the subscribed set like the one-instance
//! manager does; a reader task decodes every pushed message once and pushes it into the
//! subscriber. When a node connection drops, the server moves a subscribed slot away (it
//! pushes `sunsubscribe`), or pushes overflow, the manager subscribes every wanted channel
//! again where its slot now lives and tells the subscriber it missed envelopes (its connections
//! resync). A delivery canary per stream partition (a shard channel in that partition's slot,
//! published to and read back every few seconds) finds a link that stays open but delivers
//! nothing: the manager then builds a new client, subscribes everything on it and resyncs.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::canary::{Canary, CanaryMetrics, CanarySettings, Verdict};
use super::redis::{ensure, release, Command, Plan};
use super::{Envelope, PubSub, Publication, Subscriber, Topic};
use crate::backend::BackendError;
use crate::backoff::Backoff;
use crate::keys::KeySchema;
use crate::redis_conn::{slot_owners, Commands, RedisTarget, COMMAND_TIMEOUT};

/// Pushed frames waiting for the reader, at most; beyond, they are dropped and the node
/// resyncs its connections (as after a lost connection).
const PUSH_QUEUE: usize = 65_536;
/// Bound of the subscription command queue.
const COMMAND_QUEUE: usize = 8192;
/// Most subscription commands handled in one reconciliation.
const MAX_COMMAND_BATCH: usize = 512;
/// How often the subscriptions are compared with what the subscriber wants.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// How often the manager reads which master owns which slots (`CLUSTER NODES`).
const OWNERS_EVERY: Duration = Duration::from_secs(2);
/// Attempts at subscribing everything again on one client before building a new one: a link
/// that stays open and answers nothing (half-open) fails every attempt on that client.
const RESUBSCRIBE_ATTEMPTS: u32 = 3;
/// A round that served this long resets the backoff between rebuilds.
const SERVED_WELL: Duration = Duration::from_secs(10);

/// Shard pub/sub for one node.
pub struct RedisClusterPubSub {
    commands: mpsc::Sender<Command>,
    healthy: Arc<AtomicBool>,
    keys: KeySchema,
    publisher: Commands,
    subscribe_timeout: Duration,
}

impl RedisClusterPubSub {
    /// Starts the manager on the cluster `seeds`, with one delivery canary per stream partition;
    /// it runs until `shutdown` is cancelled.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        seeds: Vec<String>,
        publisher: Commands,
        keys: KeySchema,
        subscriber: Arc<dyn Subscriber>,
        subscribe_timeout: Duration,
        canary: CanarySettings,
        canary_metrics: Option<CanaryMetrics>,
        shutdown: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let healthy = Arc::new(AtomicBool::new(false));
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let canaries = (0..keys.partitions())
            .map(|p| {
                Canary::on_channel(
                    keys.canary_channel(p, &run_id),
                    canary,
                    canary_metrics.clone(),
                )
            })
            .collect();
        let manager = Manager {
            canaries: Arc::new(canaries),
            own_commands: tx.clone(),
            commands: rx,
            healthy: healthy.clone(),
            seeds,
            redis: publisher.clone(),
            keys: keys.clone(),
            subscriber,
            shutdown,
            background: JoinSet::new(),
        };
        let task = tokio::spawn(manager.run());
        (
            RedisClusterPubSub {
                commands: tx,
                healthy,
                keys,
                publisher,
                subscribe_timeout,
            },
            task,
        )
    }
}

#[async_trait]
impl PubSub for RedisClusterPubSub {
    async fn subscribe(&self, topics: Vec<Topic>) -> Result<(), BackendError> {
        ensure(&self.commands, topics, self.subscribe_timeout).await
    }

    fn release(&self, topics: Vec<Topic>) {
        release(&self.commands, topics)
    }

    /// `SPUBLISH` to each topic's channel, in the slot of the envelope's conversation where it
    /// has one (so a receipt follows its conversation's messages on the same channel).
    async fn publish(&self, publications: Vec<Publication>) -> Result<(), BackendError> {
        for publication in &publications {
            let payload = publication.envelope.encode();
            let p = publication
                .envelope
                .conversation()
                .map(|c| self.keys.partition_of(c))
                .unwrap_or(0);
            let sends = publication.topics.iter().map(|topic| {
                let channel = self.keys.channel_in(*topic, p);
                let payload = payload.as_slice();
                self.publisher.run("command", move |mut conn| async move {
                    redis::cmd("SPUBLISH")
                        .arg(channel)
                        .arg(payload)
                        .query_async::<i64>(&mut conn)
                        .await
                })
            });
            for sent in futures_util::future::join_all(sends).await {
                sent?;
            }
        }
        Ok(())
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// What the reader tells the manager.
enum Lost {
    /// A node connection dropped, or pushes overflowed: everything may have missed envelopes.
    Everything,
    /// The server moved this channel's slot away (it pushed `sunsubscribe`).
    Channel(Topic),
}

/// How a round of [`Manager::serve`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// Shutdown, or nothing left to serve.
    Stop,
    /// The link stopped delivering (a lost canary, the reader gone, subscribing failed again
    /// and again): build everything again.
    Rebuild,
}

/// How [`Manager::resubscribe_all`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Resubscribed {
    Done,
    /// Shutdown came first.
    Stop,
    /// Every attempt failed on this client: build a new one.
    GaveUp,
}

struct Manager {
    /// One per stream partition, each on a shard channel in that partition's slot.
    canaries: Arc<Vec<Canary>>,
    own_commands: mpsc::Sender<Command>,
    commands: mpsc::Receiver<Command>,
    healthy: Arc<AtomicBool>,
    seeds: Vec<String>,
    /// The command client (never a subscribed link): canaries' `SPUBLISH`, the slot owners,
    /// and its metrics.
    redis: Commands,
    keys: KeySchema,
    subscriber: Arc<dyn Subscriber>,
    shutdown: CancellationToken,
    background: JoinSet<()>,
}

impl Manager {
    async fn run(mut self) {
        let mut missed = false;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let started = tokio::time::Instant::now();
            if self.serve(missed).await == Served::Stop {
                break;
            }
            self.healthy.store(false, Ordering::Relaxed);
            missed = true;
            if started.elapsed() > SERVED_WELL {
                backoff.reset();
            }
            if self.sleep(backoff.next_delay()).await {
                break;
            }
        }
        self.healthy.store(false, Ordering::Relaxed);
        self.background.shutdown().await;
    }

    /// One client and its connections, from connecting until shutdown or until they stop
    /// delivering. With `missed`, the subscriber is told envelopes were lost before it.
    async fn serve(&mut self, missed: bool) -> Served {
        // A canary in flight on the last client is not held against this one.
        for canary in self.canaries.iter() {
            canary.forget();
        }
        let (push_tx, push_rx) = mpsc::channel::<PushInfo>(PUSH_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let on_push = {
            let overflowed = overflowed.clone();
            move |info: PushInfo| -> Result<(), ()> {
                if push_tx.try_send(info).is_err() {
                    overflowed.store(true, Ordering::Relaxed);
                }
                Ok(())
            }
        };
        let client = match RedisTarget::cluster_client(&self.seeds, COMMAND_TIMEOUT, Some(on_push))
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "shard pub/sub client not built");
                return Served::Stop;
            }
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut conn = loop {
            let attempt = tokio::select! {
                c = client.get_async_connection() => c,
                _ = self.shutdown.cancelled() => return Served::Stop,
            };
            match attempt {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "shard pub/sub connect failed");
                    self.count_error("pubsub_connect");
                    if self.sleep(backoff.next_delay()).await {
                        return Served::Stop;
                    }
                }
            }
        };
        let (lost_tx, mut lost_rx) = mpsc::channel::<Lost>(1024);
        let canaries = self
            .canaries
            .iter()
            .map(|c| (c.channel().as_bytes().to_vec(), c.clone()))
            .collect();
        let mut reader = tokio::spawn(read(
            push_rx,
            overflowed,
            self.keys.clone(),
            canaries,
            self.subscriber.clone(),
            self.own_commands.clone(),
            lost_tx,
        ));
        let mut subscribed: HashSet<Topic> = HashSet::new();
        // The slot owners are read on the command client by a task of their own: a read on
        // this client's links would hold up the canaries' check for as long as a half-open
        // link takes to time out.
        let (moved_tx, mut moved_rx) = mpsc::channel::<()>(1);
        let mut watch = tokio::spawn(watch_owners(self.redis.clone(), moved_tx));
        // The very first subscription of everything wanted is a recovery without anything
        // missed; after a rebuild, everything published meanwhile may be.
        let first = self
            .resubscribe_all(&mut conn, &mut subscribed, missed)
            .await;
        let served = match first.ended() {
            Some(end) => end,
            None => {
                self.keep(conn, subscribed, &mut reader, &mut moved_rx, &mut lost_rx)
                    .await
            }
        };
        for task in [&mut reader, &mut watch] {
            task.abort();
            let _ = task.await;
        }
        served
    }

    /// Keeps `conn`'s subscriptions in line with the subscriber until shutdown or until the
    /// link must be built again.
    async fn keep(
        &mut self,
        mut conn: ClusterConnection,
        mut subscribed: HashSet<Topic>,
        reader: &mut JoinHandle<()>,
        moved_rx: &mut mpsc::Receiver<()>,
        lost_rx: &mut mpsc::Receiver<Lost>,
    ) -> Served {
        let mut canary_tick = tokio::time::interval(self.canaries[0].every());
        let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
        reconcile.tick().await;
        loop {
            tokio::select! {
                // In this order when several are ready: the canaries' check must not wait
                // behind work on a link that may be the one that stopped delivering.
                biased;
                _ = self.shutdown.cancelled() => return Served::Stop,
                _ = canary_tick.tick() => {
                    while self.background.try_join_next().is_some() {}
                    let mut lost = false;
                    for canary in self.canaries.iter() {
                        match canary.tick() {
                            Verdict::Lost => lost = true,
                            Verdict::Fine(Some(token)) => {
                                publish_canary(&mut self.background, &self.redis, canary, token);
                            }
                            Verdict::Fine(None) => {}
                        }
                    }
                    if lost {
                        tracing::warn!("delivery canary did not come back; connecting shard pub/sub again");
                        self.count_error("pubsub");
                        return Served::Rebuild;
                    }
                }
                _ = &mut *reader => {
                    tracing::error!("shard pub/sub reader ended; connecting again");
                    return Served::Rebuild;
                }
                // A slot that changed master (a failover, a demotion, a migration) may have taken
                // subscriptions with it without a push saying so: subscribe again and resync.
                Some(()) = moved_rx.recv() => {
                    tracing::warn!("redis cluster slots changed masters; subscribing again");
                    self.count_error("pubsub");
                    subscribed.clear();
                    if let Some(end) = self.resubscribe_all(&mut conn, &mut subscribed, true).await.ended() {
                        return end;
                    }
                }
                lost = lost_rx.recv() => {
                    let Some(lost) = lost else { return Served::Stop };
                    let mut everything = matches!(lost, Lost::Everything);
                    let mut moved = Vec::new();
                    if let Lost::Channel(t) = lost { moved.push(t) }
                    while let Ok(more) = lost_rx.try_recv() {
                        match more {
                            Lost::Everything => everything = true,
                            Lost::Channel(t) => moved.push(t),
                        }
                    }
                    tracing::warn!(everything, moved = moved.len(), "shard pub/sub lost envelopes; subscribing again");
                    self.count_error("pubsub");
                    if everything {
                        subscribed.clear();
                    } else {
                        for t in &moved { subscribed.remove(t); }
                    }
                    if let Some(end) = self.resubscribe_all(&mut conn, &mut subscribed, true).await.ended() {
                        return end;
                    }
                }
                _ = reconcile.tick() => {
                    let change = Plan::reconciliation(&subscribed, self.subscriber.as_ref());
                    if let Err(e) = self.reconcile(&mut conn, &mut subscribed, change).await {
                        tracing::warn!(error = %e, "shard subscription reconciliation failed");
                        if e.is_timeout() {
                            return self.unanswered();
                        }
                    }
                }
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { return Served::Stop };
                    let mut batch = vec![cmd];
                    while batch.len() < MAX_COMMAND_BATCH {
                        match self.commands.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = self.reconcile(&mut conn, &mut subscribed, batch).await {
                        if e.is_timeout() {
                            return self.unanswered();
                        }
                        tracing::warn!(error = %e, "shard subscription change failed; subscribing again");
                        self.healthy.store(false, Ordering::Relaxed);
                        subscribed.clear();
                        if let Some(end) = self.resubscribe_all(&mut conn, &mut subscribed, true).await.ended() {
                            return end;
                        }
                    }
                }
            }
        }
    }

    /// Subscribes every topic the subscriber wants, retrying with backoff a few times (a
    /// failover takes the cluster's node timeout; the run loop's rebuilds back off further).
    /// With `missed`, the subscriber is told afterwards that envelopes were lost meanwhile.
    async fn resubscribe_all(
        &mut self,
        conn: &mut ClusterConnection,
        subscribed: &mut HashSet<Topic>,
        missed: bool,
    ) -> Resubscribed {
        self.healthy.store(false, Ordering::Relaxed);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut attempts = 0;
        loop {
            let wanted = self.subscriber.topics();
            let canaries = self.canaries.iter().map(|c| c.channel().to_string());
            let attempt = tokio::select! {
                r = async {
                    set_channels(conn, canaries, true).await?;
                    set_subscribed(conn, &self.keys, &wanted, true).await
                } => r,
                _ = self.shutdown.cancelled() => return Resubscribed::Stop,
            };
            match attempt {
                Ok(()) => {
                    subscribed.clear();
                    subscribed.extend(wanted);
                    self.set_gauge(subscribed);
                    break;
                }
                Err(e) => {
                    attempts += 1;
                    self.count_error("pubsub");
                    // No answer in time: the link may be half-open, and retrying on it waits
                    // out the same timeout again.
                    if e.is_timeout() || attempts >= RESUBSCRIBE_ATTEMPTS {
                        tracing::warn!(error = %e, attempts, "shard re-subscribe failed; building a new client");
                        return Resubscribed::GaveUp;
                    }
                    tracing::warn!(error = %e, "shard re-subscribe failed; retrying");
                    if self.sleep(backoff.next_delay()).await {
                        return Resubscribed::Stop;
                    }
                }
            }
        }
        if missed {
            if let Some(m) = self.redis.metrics() {
                m.reconnects.inc();
            }
            let subscriber = self.subscriber.clone();
            let commands = self.own_commands.clone();
            self.background.spawn(async move {
                for command in Command::from_interest(subscriber.missed().await) {
                    let _ = commands.send(command).await;
                }
            });
        }
        self.healthy.store(true, Ordering::Relaxed);
        Resubscribed::Done
    }

    /// Brings the subscriptions in line with the subscriber for the topics in `batch`.
    async fn reconcile(
        &self,
        conn: &mut ClusterConnection,
        subscribed: &mut HashSet<Topic>,
        batch: Vec<Command>,
    ) -> redis::RedisResult<()> {
        let plan = Plan::of(batch, subscribed, self.subscriber.as_ref());
        set_subscribed(conn, &self.keys, &plan.subscribe, true).await?;
        subscribed.extend(plan.subscribe);
        for done in plan.waiting {
            let _ = done.send(());
        }
        // Removed first: a `sunsubscribe` push for them is expected.
        for t in &plan.unsubscribe {
            subscribed.remove(t);
        }
        set_subscribed(conn, &self.keys, &plan.unsubscribe, false).await?;
        self.set_gauge(subscribed);
        Ok(())
    }

    /// A subscription command got no answer in time: the link may be open and dead (a retry
    /// would wait as long again, and redis-rs keeps a link that only times out), so the round
    /// ends and a new client is built.
    fn unanswered(&self) -> Served {
        tracing::warn!("shard pub/sub link did not answer; connecting again");
        self.count_error("pubsub");
        Served::Rebuild
    }

    fn count_error(&self, op: &str) {
        self.redis.count_error(op);
    }

    fn set_gauge(&self, subscribed: &HashSet<Topic>) {
        self.redis.set_subscriptions(subscribed.len());
    }

    /// Sleeps unless shutdown comes first; returns true on shutdown.
    async fn sleep(&self, delay: Duration) -> bool {
        crate::shutdown::sleep_or_shutdown(delay, &self.shutdown).await
    }
}

/// Publishes canary `token` beside the manager; it counts once Redis answered.
fn publish_canary(background: &mut JoinSet<()>, redis: &Commands, canary: &Canary, token: u64) {
    let (redis, canary) = (redis.clone(), canary.clone());
    background.spawn(async move {
        let channel = canary.channel().to_string();
        let sent = redis
            .run("command", move |mut conn| async move {
                redis::cmd("SPUBLISH")
                    .arg(channel)
                    .arg(token.to_string())
                    .query_async::<i64>(&mut conn)
                    .await
            })
            .await;
        if sent.is_ok() {
            canary.published(token);
        }
    });
}

/// `SSUBSCRIBE` (or `SUNSUBSCRIBE`) every channel of `topics`, one command per channel (each
/// routed to its slot's master), all in flight at once.
async fn set_subscribed(
    conn: &mut ClusterConnection,
    keys: &KeySchema,
    topics: &[Topic],
    subscribe: bool,
) -> redis::RedisResult<()> {
    let channels = topics.iter().flat_map(|topic| keys.channels(*topic));
    set_channels(conn, channels, subscribe).await
}

/// `SSUBSCRIBE` (or `SUNSUBSCRIBE`) each of `channels`, all in flight at once.
async fn set_channels(
    conn: &mut ClusterConnection,
    channels: impl Iterator<Item = String>,
    subscribe: bool,
) -> redis::RedisResult<()> {
    let calls = channels.map(|channel| {
        let mut conn = conn.clone();
        async move {
            if subscribe {
                conn.ssubscribe(channel).await
            } else {
                conn.sunsubscribe(channel).await
            }
        }
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .collect()
}

impl Resubscribed {
    /// How the serving round ends, unless it goes on.
    fn ended(self) -> Option<Served> {
        match self {
            Resubscribed::Done => None,
            Resubscribed::Stop => Some(Served::Stop),
            Resubscribed::GaveUp => Some(Served::Rebuild),
        }
    }
}

/// Reads the slot owners every [`OWNERS_EVERY`] on the command client and says when they
/// changed; runs until aborted.
async fn watch_owners(redis: Commands, moved: mpsc::Sender<()>) {
    let mut tick = tokio::time::interval(OWNERS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owners = None;
    loop {
        tick.tick().await;
        // No answer (during a failover) is no news.
        let Ok(nodes) = redis.cluster_nodes().await else {
            continue;
        };
        let now = slot_owners(&nodes);
        if owners.as_ref().is_some_and(|o| *o != now) {
            // Full means a change is already waiting to be handled.
            let _ = moved.try_send(());
        }
        owners = Some(now);
    }
}

fn bulk(v: Option<&Value>) -> Option<&[u8]> {
    match v? {
        Value::BulkString(b) => Some(b),
        _ => None,
    }
}

/// Decodes every pushed message once and pushes it into the subscriber; reports losses to the
/// manager.
async fn read(
    mut pushes: mpsc::Receiver<PushInfo>,
    overflowed: Arc<AtomicBool>,
    keys: KeySchema,
    canaries: HashMap<Vec<u8>, Canary>,
    subscriber: Arc<dyn Subscriber>,
    commands: mpsc::Sender<Command>,
    lost: mpsc::Sender<Lost>,
) {
    while let Some(push) = pushes.recv().await {
        if overflowed.swap(false, Ordering::Relaxed) {
            tracing::warn!("shard pub/sub pushes overflowed; resyncing");
            let _ = lost.send(Lost::Everything).await;
        }
        match push.kind {
            PushKind::SMessage => {
                let (Some(channel), Some(payload)) =
                    (bulk(push.data.first()), bulk(push.data.get(1)))
                else {
                    continue;
                };
                if let Some(canary) = canaries.get(channel) {
                    canary.arrived(payload);
                    continue;
                }
                let Some(topic) = std::str::from_utf8(channel)
                    .ok()
                    .and_then(|c| keys.parse_channel(c))
                else {
                    continue;
                };
                let envelope = match Envelope::decode(payload) {
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
            // The server dropped a subscription we did not drop (its slot moved to another
            // master): subscribe it again where it lives now.
            PushKind::SUnsubscribe => {
                let topic = bulk(push.data.first())
                    .and_then(|c| std::str::from_utf8(c).ok())
                    .and_then(|c| keys.parse_channel(c));
                if let Some(topic) = topic.filter(|t| subscriber.wants(*t)) {
                    let _ = lost.send(Lost::Channel(topic)).await;
                }
            }
            PushKind::Disconnection => {
                let _ = lost.send(Lost::Everything).await;
            }
            _ => {}
        }
    }
}
