//! No seq is ever issued twice, whatever Redis loses: the three ways a single Redis loses data
//! (restarted empty, restarted from an append-only file older than Postgres, `FLUSHALL`), each
//! against a `redis-server` of its own with conversations already in Postgres. New messages get
//! seqs above every seq that can have been issued, none is dead-lettered, clients are told which
//! seqs will never exist (`rebased`), and sync and history pass over them in one step. Also: a
//! partition that holds its backlog bound refuses sends until the worker drains it.

mod support;

use std::time::Duration;

use chat_core::conversation::direct_conversation_id;
use serde_json::{json, Value};
use support::*;
use uuid::Uuid;

/// The backlog bound these tests run with: also the margin a re-base adds above Postgres.
const MARGIN: i64 = 1000;

/// Two nodes and a worker on `redis`, with Alice on the first and Bob on the second, connected.
struct Deployment {
    cluster: Cluster,
    a: NodeHandle,
    b: NodeHandle,
    alice: User,
    bob: User,
    alice_ws: Ws,
    bob_ws: Ws,
    _worker: tokio_util::sync::DropGuard,
}

/// Two gateway nodes on `redis`, with [`MARGIN`] as their backlog bound.
async fn two_nodes(cluster: &Cluster, redis: &OwnRedis) -> (NodeHandle, NodeHandle) {
    let config = |node_id: &str| gateway::config::GatewayConfig {
        redis_log_max_backlog: MARGIN as u64,
        ..cluster.config_on(node_id, &redis.url)
    };
    let a = cluster.start_with(config("node-a")).await;
    let b = cluster.start_with(config("node-b")).await;
    (a, b)
}

impl Deployment {
    async fn start(redis: &OwnRedis) -> Self {
        let cluster = Cluster::new().await;
        let (a, b) = two_nodes(&cluster, redis).await;
        let worker = cluster.start_worker_on(&redis.url).drop_guard();
        let alice = register(&a, "alice").await;
        let bob = register(&b, "bob").await;
        let (alice_ws, _) = connect(&a, &alice).await;
        let (bob_ws, _) = connect(&b, &bob).await;
        Deployment {
            cluster,
            a,
            b,
            alice,
            bob,
            alice_ws,
            bob_ws,
            _worker: worker,
        }
    }

    fn conversation(&self) -> Uuid {
        direct_conversation_id(self.alice.id, self.bob.id)
    }

    /// Alice sends `id` until it is acked (Redis may still be coming back); the ack.
    async fn send_acked(&mut self, id: &str) -> Value {
        for _ in 0..40 {
            send_json(&mut self.alice_ws, send_frame(id, self.bob.id, id)).await;
            let reply = recv_until(&mut self.alice_ws, |f| f["id"] == id).await;
            if let Some(ack) = reply.last().filter(|f| f["type"] == "ack") {
                return ack.clone();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{id} was never acked");
    }

    /// The seqs Postgres holds for the conversation, once it holds `count` rows.
    async fn persisted(&self, count: usize) -> Vec<i64> {
        let db = chat_core::testing::connect(&self.cluster.db_url).await;
        let conversation = self.conversation();
        let mut seqs = Vec::new();
        for _ in 0..100 {
            seqs = db
                .query(
                    "SELECT seq FROM messages WHERE conversation_id = $1 ORDER BY seq",
                    &[&conversation],
                )
                .await
                .expect("messages")
                .iter()
                .map(|r| r.get::<_, i64>(0))
                .collect();
            if seqs.len() >= count {
                return seqs;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("postgres holds {seqs:?}, not {count} messages");
    }

    async fn both_ready(&self) {
        assert!(
            wait_ready(&self.a).await && wait_ready(&self.b).await,
            "both nodes serve again without a restart"
        );
    }

    /// After data loss: the next message is acked above every seq that can have been issued
    /// (`persisted` + the margin), Bob is told of the skipped range and gets the message live,
    /// Postgres stores it beside the earlier ones without a dead letter, and a sync from 0 on a
    /// new connection, and the history, pass over the skipped range in one step.
    async fn check_rebased(&mut self, redis: &OwnRedis, persisted: i64, known: i64) {
        self.both_ready().await;
        let ack = self.send_acked("after-loss").await;
        let seq = persisted + MARGIN + 1;
        assert_eq!(ack["seq"], seq, "re-based above every issued seq: {ack}");
        let frames = recv_until(&mut self.bob_ws, |f| {
            f["type"] == "message" && f["body"] == "after-loss"
        })
        .await;
        let rebased = frames
            .iter()
            .find(|f| f["type"] == "rebased")
            .unwrap_or_else(|| panic!("bob is told of the skipped seqs: {frames:?}"));
        assert_eq!(
            (rebased["from_seq"].clone(), rebased["to_seq"].clone()),
            (json!(known + 1), json!(seq - 1)),
            "{rebased}"
        );
        assert_eq!(frames.last().expect("message")["seq"], seq);

        let mut expected: Vec<i64> = (1..=persisted).collect();
        expected.push(seq);
        assert_eq!(self.persisted(expected.len()).await, expected);
        assert_eq!(dead_letters(redis, &self.cluster.prefix).await, 0);

        // Bob on a new connection syncs from the start: one page covers the skipped range.
        let (mut ws, _) = connect(&self.a, &self.bob).await;
        let conversation = self.conversation();
        send_json(
            &mut ws,
            json!({"type": "sync", "conversations": [{"conversation_id": conversation, "after_seq": 0}]}),
        )
        .await;
        let frames = recv_until(&mut ws, |f| f["type"] == "synced").await;
        let synced: Vec<i64> = frames
            .iter()
            .filter(|f| f["type"] == "message")
            .filter_map(|f| f["seq"].as_i64())
            .collect();
        assert_eq!(synced, expected, "sync sends every stored message once");
        assert_eq!(
            (
                frames.last().expect("synced")["last_seq"].clone(),
                frames.last().expect("synced")["complete"].clone()
            ),
            (json!(seq), json!(true)),
            "one page reaches past the skipped range"
        );
        let history = all_history_seqs(self.b.http, &self.bob.token, conversation).await;
        assert_eq!(history, expected, "history pages past the skipped range");
    }
}

/// Entries moved to the dead letters of every partition.
async fn dead_letters(redis: &OwnRedis, prefix: &str) -> i64 {
    let client = redis::Client::open(redis.url.as_str()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys = chat_core::keys::KeySchema::new(prefix, 4);
    let mut total = 0;
    for p in 0..4 {
        let len: i64 = redis::cmd("XLEN")
            .arg(keys.dead_letter(p))
            .query_async(&mut conn)
            .await
            .expect("xlen");
        total += len;
    }
    total
}

/// Redis restarted without its data: the counter is gone, Postgres holds 3 messages.
#[actix_web::test]
async fn redis_restarted_empty_never_issues_a_seq_twice() {
    let port = spare_port();
    let redis = OwnRedis::start_on(port, None).await;
    let mut d = Deployment::start(&redis).await;
    for i in 1..=3 {
        assert_eq!(d.send_acked(&format!("before-{i}")).await["seq"], i);
    }
    assert_eq!(d.persisted(3).await, vec![1, 2, 3]);

    drop(redis);
    let redis = OwnRedis::start_on(port, None).await;
    d.check_rebased(&redis, 3, 3).await;
}

/// Redis restarted from an append-only file taken after 3 messages, while Postgres holds 5:
/// the counter Redis restores (3) is behind what was issued.
#[actix_web::test]
async fn redis_restored_from_an_older_aof_never_issues_a_seq_twice() {
    let dir = std::env::temp_dir().join(format!("chat-aof-{}", Uuid::new_v4().simple()));
    let old = dir.with_extension("old");
    std::fs::create_dir_all(&dir).expect("aof dir");
    let port = spare_port();
    let redis = OwnRedis::start_on(port, Some(&dir)).await;
    let mut d = Deployment::start(&redis).await;
    for i in 1..=3 {
        assert_eq!(d.send_acked(&format!("before-{i}")).await["seq"], i);
    }
    assert_eq!(d.persisted(3).await, vec![1, 2, 3]);
    copy_dir(&dir, &old); // fsynced on every write: a consistent AOF of this moment
    for i in 4..=5 {
        assert_eq!(d.send_acked(&format!("before-{i}")).await["seq"], i);
    }
    assert_eq!(d.persisted(5).await, vec![1, 2, 3, 4, 5]);

    drop(redis);
    std::fs::remove_dir_all(&dir).expect("remove aof");
    std::fs::rename(&old, &dir).expect("restore the older aof");
    let redis = OwnRedis::start_on(port, Some(&dir)).await;
    d.check_rebased(&redis, 5, 5).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `FLUSHALL` on a running Redis: the scripts stay loaded, every key is gone.
#[actix_web::test]
async fn flushall_never_issues_a_seq_twice() {
    let redis = OwnRedis::start().await;
    let mut d = Deployment::start(&redis).await;
    for i in 1..=3 {
        assert_eq!(d.send_acked(&format!("before-{i}")).await["seq"], i);
    }
    assert_eq!(d.persisted(3).await, vec![1, 2, 3]);
    let client = redis::Client::open(redis.url.as_str()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("flushall");
    d.check_rebased(&redis, 3, 3).await;
}

/// A partition that holds `redis_log_max_backlog` entries refuses sends with `unavailable`
/// (nothing acked, nothing stored, no idempotency record kept); once the worker drains and trims
/// it, the same send is acked, and stored.
#[actix_web::test]
async fn a_full_partition_refuses_sends_until_the_worker_drains_it() {
    let cluster = Cluster::new().await;
    let config = |node_id: &str| gateway::config::GatewayConfig {
        redis_log_max_backlog: 3,
        ..cluster.config(node_id)
    };
    let a = cluster.start_with(config("node-a")).await;
    let alice = register(&a, "alice").await;
    let bob = register(&a, "bob").await;
    let (mut ws, _) = connect(&a, &alice).await;
    for i in 1..=3 {
        let id = format!("m-{i}");
        send_json(&mut ws, send_frame(&id, bob.id, "x")).await;
        let reply = recv_until(&mut ws, |f| f["id"] == id.as_str()).await;
        assert_eq!(reply.last().expect("ack")["seq"], i);
    }
    send_json(&mut ws, send_frame("m-4", bob.id, "x")).await;
    let reply = recv_until(&mut ws, |f| f["id"] == "m-4").await;
    let reply = reply.last().expect("reply");
    assert_eq!(
        (reply["type"].clone(), reply["code"].clone()),
        (json!("error"), json!("unavailable")),
        "{reply}"
    );
    assert_eq!(
        metric(&a, "chat_gateway_log_events_total{event=\"backlog_full\"}").await,
        Some(1.0)
    );

    let _worker = cluster.start_worker().drop_guard();
    let mut acked = None;
    for _ in 0..100 {
        send_json(&mut ws, send_frame("m-4", bob.id, "x")).await;
        let reply = recv_until(&mut ws, |f| f["id"] == "m-4").await;
        if let Some(ack) = reply.last().filter(|f| f["type"] == "ack") {
            acked = Some(ack.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        acked.expect("acked once the worker drained the partition")["seq"],
        4,
        "the refused sends took no seq"
    );
    // The ack stands for a stored message: the refusals left no record of "m-4" behind that a
    // retry could be answered from without an append.
    let (mut bob_ws, _) = connect(&a, &bob).await;
    let conversation = direct_conversation_id(alice.id, bob.id);
    assert_eq!(
        sync_all(&mut bob_ws, conversation, 0).await,
        vec![1, 2, 3, 4],
        "every acked seq is there to sync"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Two gateways whose first appends to a fresh Redis come at once (each meets `NOSCRIPT`, or
/// finds no epoch) open one epoch between them: the conversation's seqs are 1..=40 with no
/// re-base, where each used to replace the other's epoch and push the counter up by the margin.
#[actix_web::test]
async fn gateways_starting_at_once_open_one_epoch() {
    let redis = OwnRedis::start().await;
    let cluster = Cluster::new().await;
    let (a, b) = two_nodes(&cluster, &redis).await;
    let alice = register(&a, "alice").await;
    let bob = register(&b, "bob").await;
    // Ten connections, five on each node, all send their first frames before any answer.
    let mut conns = Vec::new();
    for i in 0..10 {
        let node = if i % 2 == 0 { &a } else { &b };
        conns.push(connect(node, &alice).await.0);
    }
    for (i, ws) in conns.iter_mut().enumerate() {
        for n in 0..4 {
            send_json(ws, send_frame(&format!("c{i}-{n}"), bob.id, "at once")).await;
        }
    }
    let mut seqs = Vec::new();
    for ws in &mut conns {
        let mut answered = 0;
        while answered < 4 {
            let frame = recv(ws).await.expect("an answer to every send");
            match frame["type"].as_str() {
                Some("ack") => seqs.push(frame["seq"].as_i64().expect("seq")),
                Some("error") => panic!("a send was refused: {frame}"),
                _ => continue,
            }
            answered += 1;
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>(), "one epoch, no re-base");
}
