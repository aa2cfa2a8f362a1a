//! The persistence worker against real Redis and Postgres: exactly-once storage of what the
//! gateway's append script wrote, across a SIGKILLed worker and a Postgres outage.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chat_core::conversation::direct_conversation_id;
use chat_core::keys::{KeySchema, PERSISTENCE_GROUP};
use chat_core::log::redis::RedisLog;
use chat_core::log::{MessageLog, Retention};
use chat_core::message::NewMessage;
use chat_core::redis_conn::Commands;
use chat_core::testing::{self, eventually, Proxy};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PARTITIONS: u16 = 4;

/// A deployment: database, prefix, users, and the append path the gateway uses.
struct Fixture {
    db_url: String,
    prefix: String,
    users: Vec<Uuid>,
    db: tokio_postgres::Client,
}

impl Fixture {
    async fn new() -> Self {
        let db_url = testing::fresh_database().await;
        let db = testing::connect(&db_url).await;
        let mut users = Vec::new();
        for name in ["u1", "u2", "u3", "u4"] {
            users.push(testing::insert_user(&db, name).await);
        }
        Fixture {
            db_url,
            prefix: testing::unique_prefix(),
            users,
            db,
        }
    }

    /// A proxy in front of this test's Postgres, and the database URL that goes through it.
    async fn postgres_proxy(&self) -> (Proxy, String) {
        testing::postgres_proxy(&self.db_url).await
    }

    fn keys(&self) -> KeySchema {
        KeySchema::new(self.prefix.clone(), PARTITIONS)
    }

    /// Appends `n` messages spread over every pair of users; returns their ids.
    async fn append(&self, n: usize) -> Vec<Uuid> {
        let redis = Commands::new(&testing::redis_url(), None).expect("redis url");
        let store = chat_core::store::Store::connect(&self.db_url, 2).expect("store");
        let log = RedisLog::new(redis, self.keys(), Retention::default(), Arc::new(store));
        let mut pairs = Vec::new();
        for (i, a) in self.users.iter().enumerate() {
            for b in &self.users[i + 1..] {
                pairs.push((*a, *b));
            }
        }
        let mut ids = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            let sends = chunk.iter().map(|i| {
                let (from, to) = pairs[i % pairs.len()];
                let msg = NewMessage {
                    msg_id: Uuid::now_v7(),
                    conversation_id: direct_conversation_id(from, to),
                    from,
                    to: Some(to),
                    body: format!("message {i}"),
                    ts: chat_core::now_ms(),
                    trace_parent: None,
                };
                let log = log.clone();
                async move {
                    log.append(&msg, &msg.msg_id.to_string(), Uuid::nil())
                        .await
                        .expect("append");
                    msg.msg_id
                }
            });
            ids.extend(futures_util::future::join_all(sends).await);
        }
        ids
    }

    async fn stored(&self) -> i64 {
        self.db
            .query_one("SELECT count(*) FROM messages", &[])
            .await
            .expect("count")
            .get(0)
    }

    /// Waits (up to `timeout`) until every id is stored and nothing is pending, then checks
    /// exactly-once.
    async fn assert_drained(&self, ids: &[Uuid], timeout: Duration) {
        let want = ids.len() as i64;
        let stored = eventually(timeout, || async { self.stored().await == want }).await;
        assert!(stored, "stored {} of {want}", self.stored().await);
        let acked = eventually(Duration::from_secs(5), || async {
            self.pending_total().await == 0
        })
        .await;
        assert!(
            acked,
            "{} entries still pending",
            self.pending_total().await
        );
        self.assert_exactly_once(ids).await;
    }

    /// Every id stored exactly once, seqs unique per conversation, and nothing left pending.
    async fn assert_exactly_once(&self, ids: &[Uuid]) {
        let rows = self
            .db
            .query("SELECT id FROM messages", &[])
            .await
            .expect("ids");
        let stored: HashSet<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(rows.len(), ids.len(), "row count equals appended count");
        assert_eq!(
            stored,
            ids.iter().copied().collect::<HashSet<_>>(),
            "every appended id stored"
        );
        let distinct: i64 = self
            .db
            .query_one(
                "SELECT count(DISTINCT (conversation_id, seq)) FROM messages",
                &[],
            )
            .await
            .expect("distinct")
            .get(0);
        assert_eq!(distinct as usize, ids.len());
        let pending = self.pending_total().await;
        assert_eq!(pending, 0, "every entry acked");
    }

    async fn pending_total(&self) -> i64 {
        let client = redis::Client::open(testing::redis_url()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let mut total = 0;
        for p in 0..PARTITIONS {
            let summary: redis::Value = redis::cmd("XPENDING")
                .arg(self.keys().stream(p))
                .arg(PERSISTENCE_GROUP)
                .query_async(&mut conn)
                .await
                .expect("xpending");
            if let redis::Value::Array(items) = summary {
                if let Some(redis::Value::Int(n)) = items.first() {
                    total += n;
                }
            }
        }
        total
    }

    fn worker_config(
        &self,
        db_url: &str,
        consumer: &str,
    ) -> persistence_worker::config::WorkerConfig {
        persistence_worker::config::WorkerConfig {
            redis_url: testing::redis_url(),
            database_url: db_url.to_string(),
            redis_prefix: self.prefix.clone(),
            redis_partitions: PARTITIONS,
            worker_internal_listen: "127.0.0.1:0".into(),
            worker_consumer_name: Some(consumer.into()),
            worker_block_ms: 200,
            worker_claim_idle_ms: 1000,
            worker_claim_interval_ms: 300,
            ..Default::default()
        }
    }

    fn start_in_process(&self, db_url: &str, consumer: &str) -> CancellationToken {
        self.start_configured(self.worker_config(db_url, consumer))
    }

    fn start_configured(
        &self,
        config: persistence_worker::config::WorkerConfig,
    ) -> CancellationToken {
        let config = config.validate().expect("config");
        let listener = std::net::TcpListener::bind(config.internal_listen).expect("bind");
        let token = CancellationToken::new();
        actix_web::rt::spawn(persistence_worker::run(config, listener, token.clone()));
        token
    }

    /// Starts the real `persistence-worker` binary; it is killed when the guard drops, so a
    /// failing assertion does not leave it running.
    fn spawn_process(&self, db_url: &str, consumer: &str, batch: usize) -> WorkerProcess {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_persistence-worker"))
            .env("CHAT_REDIS_URL", testing::redis_url())
            .env("CHAT_DATABASE_URL", db_url)
            .env("CHAT_REDIS_PREFIX", &self.prefix)
            .env("CHAT_REDIS_PARTITIONS", PARTITIONS.to_string())
            .env("CHAT_WORKER_INTERNAL_LISTEN", "127.0.0.1:0")
            .env("CHAT_WORKER_CONSUMER_NAME", consumer)
            .env("CHAT_WORKER_BATCH_SIZE", batch.to_string())
            .env("CHAT_WORKER_BLOCK_MS", "200")
            .env("CHAT_WORKER_CLAIM_IDLE_MS", "1000")
            .env("CHAT_WORKER_CLAIM_INTERVAL_MS", "300")
            .env("CHAT_LOG_FORMAT", "text")
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn persistence-worker");
        WorkerProcess(child)
    }
}

/// 10,000 appended messages land in Postgres exactly once and are all acked.
#[actix_web::test]
async fn ten_thousand_messages_land_exactly_once() {
    let fx = Fixture::new().await;
    let ids = fx.append(10_000).await;
    let worker = fx.start_in_process(&fx.db_url, "solo");
    fx.assert_drained(&ids, Duration::from_secs(60)).await;
    worker.cancel();
}

/// A worker process SIGKILLed while it holds batches it has read but not acked (its Postgres is
/// cut off, so it cannot commit them) is replaced by a worker with another name, which claims
/// them: every message is stored exactly once.
#[actix_web::test]
async fn killed_worker_is_replaced_without_loss_or_duplicates() {
    let fx = Fixture::new().await;
    let (proxy, doomed_db) = fx.postgres_proxy().await;
    let ids = fx.append(10_000).await;
    let mut first = fx.spawn_process(&doomed_db, "doomed", 50);
    let started = eventually(Duration::from_secs(30), || async { fx.stored().await > 0 }).await;
    assert!(started, "first worker never wrote");
    proxy.cut();
    // Delivered but unacked entries can only be the doomed worker's batches in hand.
    let holding = eventually(Duration::from_secs(10), || async {
        fx.pending_total().await > 0
    })
    .await;
    assert!(holding, "the doomed worker should hold unacked entries");
    first.kill();
    let at_kill = fx.stored().await;
    assert!(
        at_kill < 10_000,
        "the kill must land mid-run; stored {at_kill}"
    );

    let _replacement = fx.spawn_process(&fx.db_url, "replacement", 500);
    fx.assert_drained(&ids, Duration::from_secs(60)).await;
}

/// Entries in every partition stream.
async fn stream_lengths(fx: &Fixture, conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let mut total = 0;
    for p in 0..PARTITIONS {
        let len: i64 = redis::cmd("XLEN")
            .arg(fx.keys().stream(p))
            .query_async(conn)
            .await
            .expect("xlen");
        total += len;
    }
    total
}

/// With no retention, the worker trims each stream right behind what the group has acked, and
/// never an entry still pending: entries another consumer read and never acked stay until the
/// worker claims and stores them, then go too.
#[actix_web::test]
async fn streams_are_trimmed_behind_the_acked_and_never_past_the_pending() {
    let fx = Fixture::new().await;
    let mut conn = redis::Client::open(testing::redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let first = fx.append(400).await;
    // A consumer that reads every partition's entries and dies without acking them.
    for p in 0..PARTITIONS {
        let stream = fx.keys().stream(p);
        let _: redis::Value = redis::cmd("XGROUP")
            .arg(&["CREATE", &stream, PERSISTENCE_GROUP, "0", "MKSTREAM"])
            .query_async(&mut conn)
            .await
            .expect("group");
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg(&[
                "GROUP",
                PERSISTENCE_GROUP,
                "dead",
                "COUNT",
                "1000",
                "STREAMS",
                &stream,
                ">",
            ])
            .query_async(&mut conn)
            .await
            .expect("read as the dead consumer");
    }
    assert_eq!(fx.pending_total().await, 400);
    let worker = fx.start_configured(persistence_worker::config::WorkerConfig {
        worker_stream_retention_secs: 0,
        worker_trim_interval_ms: 200,
        // Longer than the check below: the dead consumer's entries stay pending meanwhile.
        worker_claim_idle_ms: 4000,
        ..fx.worker_config(&fx.db_url, "trimmer")
    });
    let second = fx.append(400).await;
    let stored_second = eventually(Duration::from_secs(20), || async {
        fx.stored().await == 400
    })
    .await;
    assert!(stored_second, "the new entries are stored");
    // Trims run meanwhile: the dead consumer's 400 pending entries are older than every new
    // one, so nothing may go yet.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        stream_lengths(&fx, &mut conn).await >= 400,
        "an entry still pending was trimmed"
    );
    let mut ids = first;
    ids.extend(second);
    fx.assert_drained(&ids, Duration::from_secs(30)).await;
    let trimmed = eventually(Duration::from_secs(10), || async {
        stream_lengths(&fx, &mut conn.clone()).await <= i64::from(PARTITIONS)
    })
    .await;
    assert!(
        trimmed,
        "{} entries left after everything was acked",
        stream_lengths(&fx, &mut conn).await
    );
    worker.cancel();
}

/// A worker process, SIGKILLed on drop.
struct WorkerProcess(std::process::Child);

impl WorkerProcess {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Postgres unreachable for a while: the worker keeps entries pending, retries, and after
/// Postgres returns every message is stored exactly once.
#[actix_web::test]
async fn postgres_outage_loses_nothing() {
    let fx = Fixture::new().await;
    let (proxy, proxied_url) = fx.postgres_proxy().await;

    let mut ids = fx.append(1000).await;
    let worker = fx.start_in_process(&proxied_url, "outage");
    assert!(
        eventually(Duration::from_secs(30), || async {
            fx.stored().await == 1000
        })
        .await
    );

    proxy.cut();
    ids.extend(fx.append(2000).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fx.stored().await,
        1000,
        "nothing can be written while Postgres is cut off"
    );
    assert!(
        fx.pending_total().await > 0,
        "entries wait, pending, for Postgres"
    );

    proxy.restore();
    fx.assert_drained(&ids, Duration::from_secs(60)).await;
    worker.cancel();
}
