//! Redis trouble, each test against a `redis-server` of its own so nothing else is touched: a
//! node's pub/sub connection killed under traffic (the node re-subscribes, tells its connections
//! to resync, reloads room memberships), and Redis down altogether (sends answered
//! `unavailable`, never acked; readiness off; recovery without a restart).

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// A `redis-server` on a spare port, shut down when dropped.
struct OwnRedis {
    child: std::process::Child,
    url: String,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("spare port")
            .port();
        Self::start_on(port).await
    }

    async fn start_on(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).expect("url");
        let up = chat_core::testing::eventually(Duration::from_secs(10), || {
            let client = client.clone();
            async move { client.get_multiplexed_async_connection().await.is_ok() }
        })
        .await;
        assert!(up, "own redis-server started");
        OwnRedis { child, url }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two nodes on `redis`, Alice registered on the first and Bob on the second.
async fn two_nodes_on(redis: &OwnRedis) -> (Cluster, NodeHandle, NodeHandle, User, User) {
    let cluster = Cluster::new().await;
    let config = |node_id: &str| gateway::config::GatewayConfig {
        redis_url: redis.url.clone(),
        ..cluster.config(node_id)
    };
    let a = cluster.start_with(config("node-a")).await;
    let b = cluster.start_with(config("node-b")).await;
    let alice = register(&a, "alice").await;
    let bob = register(&b, "bob").await;
    (cluster, a, b, alice, bob)
}

fn seq(frame: &Value) -> i64 {
    frame["seq"].as_i64().expect("seq")
}

/// Under a steady stream of messages, Bob's node loses its pub/sub connection; Bob gets
/// `resync`, syncs, and ends with every seq once.
#[actix_rt::test]
async fn killed_pubsub_connection_resyncs_clients_without_gaps() {
    let redis = OwnRedis::start().await;
    let (_cluster, a, b, alice, bob) = two_nodes_on(&redis).await;
    let (mut bob_ws, _) = connect(&b, &bob).await;
    let (alice_ws, _) = connect(&a, &alice).await;

    const TOTAL: i64 = 1000;
    let bob_id = bob.id;
    let sender = tokio::spawn(async move {
        let mut ws = alice_ws;
        let mut conversation = Value::Null;
        for i in 0..TOTAL {
            send_json(&mut ws, send_frame(&format!("m{i}"), bob_id, "steady")).await;
            let ack = recv_until(&mut ws, |f| f["type"] == "ack").await;
            conversation = ack.last().expect("ack")["conversation_id"].clone();
        }
        conversation
    });

    let mut held: Vec<i64> = Vec::new();
    while held.len() < 50 {
        let frame = recv(&mut bob_ws).await.expect("message");
        if frame["type"] == "message" {
            held.push(seq(&frame));
        }
    }
    // Kill the nodes' pub/sub connections again and again while the messages flow, so some are
    // published while nobody listens.
    let redis_url = redis.url.clone();
    let killer = tokio::spawn(async move {
        let mut admin = redis::Client::open(redis_url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("admin");
        let mut killed = 0;
        for _ in 0..20 {
            killed += redis::cmd("CLIENT")
                .arg(&["KILL", "TYPE", "pubsub"])
                .query_async::<i64>(&mut admin)
                .await
                .expect("client kill");
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        killed
    });

    // Read on until the sender is done and the line is quiet: live messages and resync notices.
    let mut resyncs = 0;
    while let Some(frame) = recv_within(&mut bob_ws, Duration::from_secs(2)).await {
        match frame["type"].as_str() {
            Some("message") => held.push(seq(&frame)),
            Some("resync") => resyncs += 1,
            _ => {}
        }
    }
    assert!(
        killer.await.expect("killer") >= 2,
        "pub/sub connections were killed"
    );
    assert!(resyncs >= 1, "the node told the connection to resync");
    let conversation = sender.await.expect("sender");
    let mut live = held.clone();
    live.sort_unstable();
    live.dedup();
    assert!(
        live.len() < TOTAL as usize,
        "some messages were published while the node was not subscribed (else the test proves nothing)"
    );
    // Sync as docs/protocol.md says: from the highest seq held without a gap below it.
    let mut synced = sync_all(&mut bob_ws, &conversation, gap_free(&held)).await;
    while let Some(frame) = recv_within(&mut bob_ws, Duration::from_millis(500)).await {
        if frame["type"] == "message" {
            synced.push(seq(&frame));
        }
    }
    // The sync (from the gap-free point) may repeat messages the client received live between
    // two gaps, which it drops by seq; but it repeats nothing within itself.
    let count = synced.len();
    let mut once = synced.clone();
    once.sort_unstable();
    once.dedup();
    assert_eq!(once.len(), count, "the sync sent a seq twice");
    let mut all = held.clone();
    all.extend(synced);
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all,
        (1..=TOTAL).collect::<Vec<_>>(),
        "every seq, none missing"
    );
}

/// Membership changes a node never heard of (here written straight to Postgres, as if their
/// events were published while its pub/sub connection was down) take effect once it reconnects.
#[actix_rt::test]
async fn room_memberships_are_reloaded_after_pubsub_loss() {
    let redis = OwnRedis::start().await;
    let (cluster, a, b, alice, bob) = two_nodes_on(&redis).await;
    let carol = register(&b, "carol").await;
    let room = create_room(&a, &alice, &[bob.id]).await;
    let (mut alice_ws, _) = connect(&a, &alice).await;
    let (mut bob_ws, _) = connect(&b, &bob).await;
    let (mut carol_ws, _) = connect(&b, &carol).await;

    let db = chat_core::testing::connect(&cluster.db_url).await;
    db.execute(
        "DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = $2",
        &[&room, &bob.id],
    )
    .await
    .expect("remove bob behind the node's back");
    db.execute(
        "INSERT INTO conversation_members (conversation_id, user_id) VALUES ($1, $2)",
        &[&room, &carol.id],
    )
    .await
    .expect("add carol behind the node's back");

    let mut admin = redis::Client::open(redis.url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("admin");
    let _: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"])
        .query_async(&mut admin)
        .await
        .expect("client kill");
    for ws in [&mut bob_ws, &mut carol_ws] {
        let frames = recv_until(ws, |f| f["type"] == "resync").await;
        assert_eq!(frames.last().expect("resync")["type"], "resync");
    }
    // The reload runs beside the resync; then messages follow the new membership.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut reached_carol = false;
    while !reached_carol && tokio::time::Instant::now() < deadline {
        let id = uuid::Uuid::new_v4().to_string();
        send_json(
            &mut alice_ws,
            json!({"type": "send", "id": id, "conversation_id": room, "body": "after"}),
        )
        .await;
        recv_until(&mut alice_ws, |f| f["type"] == "ack").await;
        reached_carol = recv_within(&mut carol_ws, Duration::from_millis(300))
            .await
            .is_some_and(|f| f["type"] == "message");
    }
    assert!(
        reached_carol,
        "a member added behind the node's back receives after the reload"
    );
    let send = json!({"type": "send", "id": "last", "conversation_id": room, "body": "last"});
    send_json(&mut alice_ws, send).await;
    recv_until(&mut alice_ws, |f| f["type"] == "ack").await;
    let frames = recv_until(&mut carol_ws, |f| f["type"] == "message").await;
    assert_eq!(frames.last().expect("message")["body"], "last");
    while let Some(frame) = recv_within(&mut bob_ws, Duration::from_millis(300)).await {
        assert_ne!(
            frame["type"], "message",
            "a removed member still receives: {frame}"
        );
    }
}

/// Redis killed and started again: connections stay open, sends get `unavailable` (never an
/// ack) and readiness fails while it is down; afterwards the node serves again by itself.
#[actix_rt::test]
async fn redis_outage_answers_unavailable_and_recovers() {
    let redis = OwnRedis::start().await;
    let port: u16 = redis
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let (_cluster, a, b, alice, bob) = two_nodes_on(&redis).await;
    let (mut alice_ws, _) = connect(&a, &alice).await;
    let (mut bob_ws, _) = connect(&b, &bob).await;
    send_json(&mut alice_ws, send_frame("before", bob.id, "before")).await;
    assert_eq!(
        recv_until(&mut alice_ws, |f| f["id"] == "before")
            .await
            .last()
            .expect("ack")["type"],
        "ack"
    );

    drop(redis); // SIGKILL: the process and its data are gone.
    send_json(&mut alice_ws, send_frame("during", bob.id, "during")).await;
    let reply = recv_until(&mut alice_ws, |f| f["id"] == "during").await;
    let reply = reply.last().expect("reply");
    assert_eq!(
        (reply["type"].clone(), reply["code"].clone()),
        (json!("error"), json!("unavailable")),
        "{reply}"
    );
    let internal = a.internal;
    let not_ready = chat_core::testing::eventually(Duration::from_secs(5), || async move {
        matches!(reqwest::get(format!("http://{internal}/readyz")).await, Ok(r) if r.status() == 503)
    })
    .await;
    assert!(not_ready, "readiness fails while Redis is down");

    let _again = OwnRedis::start_on(port).await;
    let ready = chat_core::testing::eventually(Duration::from_secs(15), || async move {
        matches!(reqwest::get(format!("http://{internal}/readyz")).await, Ok(r) if r.status() == 200)
    })
    .await;
    assert!(ready, "the node recovers without a restart");
    // The same connections work again: the send is acked and delivered across nodes.
    let mut delivered = false;
    for attempt in 0..20 {
        let id = format!("after-{attempt}");
        send_json(&mut alice_ws, send_frame(&id, bob.id, "after")).await;
        let reply = recv_until(&mut alice_ws, |f| f["id"] == id.as_str()).await;
        if reply.last().is_some_and(|f| f["type"] == "ack") {
            let frames = recv_until(&mut bob_ws, |f| {
                f["type"] == "message" && f["body"] == "after"
            })
            .await;
            delivered = frames.last().is_some_and(|f| f["body"] == "after");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        delivered,
        "sends are acked and delivered again on the same connections"
    );
}
