//! The one-process gateway (`CHAT_BACKEND=memory`): no Redis; an ack means the message is in
//! Postgres; a Postgres outage refuses sends and loses nothing; a restart continues every seq; and
//! a database has either one such gateway or gateways on Redis, never both.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use uuid::Uuid;

/// `(seq, body)` of every stored message of a conversation, in seq order.
async fn stored(db: &tokio_postgres::Client, conversation: Uuid) -> Vec<(i64, String)> {
    db.query(
        "SELECT seq, body FROM messages WHERE conversation_id = $1 ORDER BY seq",
        &[&conversation],
    )
    .await
    .expect("messages")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The reply to the `send` with client id `id`.
async fn reply_to(ws: &mut Ws, id: &str) -> Value {
    recv_until(ws, |f| f["id"] == id)
        .await
        .pop()
        .expect("a reply")
}

/// Without Redis (its URL points at a closed port): two users chat, each acked message is in
/// Postgres by the time its ack arrives, exactly once, and history reads it back.
#[actix_web::test]
async fn an_ack_means_the_message_is_in_postgres() {
    let cluster = Cluster::on(Backend::Memory).await;
    let node = cluster
        .start_with(gateway::config::GatewayConfig {
            redis_url: "redis://127.0.0.1:1".into(),
            ..cluster.config("solo")
        })
        .await;
    let db = chat_core::testing::connect(&cluster.db_url).await;
    let alice = register(&node, "alice").await;
    let bob = register(&node, "bob").await;
    let (mut alice_ws, _) = connect(&node, &alice).await;
    let (mut bob_ws, _) = connect(&node, &bob).await;
    let conversation = chat_core::conversation::direct_conversation_id(alice.id, bob.id);
    for i in 1..=20 {
        let id = format!("m{i}");
        send_json(&mut alice_ws, send_frame(&id, bob.id, &format!("body {i}"))).await;
        let ack = reply_to(&mut alice_ws, &id).await;
        assert_eq!(
            (ack["type"].clone(), ack["seq"].clone()),
            (json!("ack"), json!(i))
        );
        let rows = stored(&db, conversation).await;
        assert_eq!(rows.len() as i64, i, "acked means stored: {rows:?}");
        assert_eq!(rows.last(), Some(&(i, format!("body {i}"))));
    }
    let got = recv_until(&mut bob_ws, |f| f["type"] == "message" && f["seq"] == 20).await;
    let seqs: Vec<i64> = got
        .iter()
        .filter(|f| f["type"] == "message")
        .filter_map(|f| f["seq"].as_i64())
        .collect();
    assert_eq!(
        seqs,
        (1..=20).collect::<Vec<_>>(),
        "delivered live, in order, once"
    );
    let (status, page) = get(
        &format!(
            "http://{}/api/v1/conversations/{conversation}/messages?limit=200",
            node.http
        ),
        Some(&bob.token),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(20));
    assert!(
        metric(&node, "chat_worker_batches_total")
            .await
            .unwrap_or(0.0)
            >= 1.0,
        "the in-process sink reports as the worker does"
    );
    node.shutdown.cancel();
}

/// The error a node with `config` stops with at start.
async fn refused(config: gateway::config::GatewayConfig) -> String {
    let node = spawn_node(config);
    tokio::time::timeout(Duration::from_secs(15), node.task)
        .await
        .expect("refused in time")
        .expect("task")
        .expect_err("refused")
        .to_string()
}

/// A second one-process gateway, or a gateway on Redis, on the same database refuses to start
/// and says why; so does a one-process gateway beside a gateway on Redis.
#[actix_web::test]
async fn a_database_has_one_one_process_gateway_or_gateways_on_redis() {
    use gateway::config::{BackendKind, GatewayConfig};
    let cluster = Cluster::on(Backend::Memory).await;
    let solo = cluster.start_node("solo").await;
    for (backend, who) in [
        (BackendKind::Memory, "second one-process"),
        (BackendKind::Redis, "redis"),
    ] {
        let err = refused(GatewayConfig {
            backend,
            ..cluster.config(who)
        })
        .await;
        assert!(err.contains("in use by"), "{who}: {err}");
    }
    solo.shutdown.cancel();
    let _ = solo.task.await;

    let on_redis = Cluster::new().await;
    let node = on_redis.start_node("redis-node").await;
    let err = refused(GatewayConfig {
        backend: BackendKind::Memory,
        ..on_redis.config("lonely")
    })
    .await;
    assert!(err.contains("in use by other gateways"), "{err}");
    node.shutdown.cancel();
}

/// Postgres cut off: sends are answered `unavailable`, never acked, and readiness fails; once it
/// is back, the same client ids are acked with the seqs they were given, each stored once, with
/// no gap, and the conversation goes on.
#[actix_web::test]
async fn a_postgres_outage_refuses_sends_and_loses_nothing() {
    let cluster = Cluster::on(Backend::Memory).await;
    let (proxy, proxied) = chat_core::testing::postgres_proxy(&cluster.db_url).await;
    let node = cluster
        .start_with(gateway::config::GatewayConfig {
            database_url: proxied,
            ..cluster.config("solo")
        })
        .await;
    let db = chat_core::testing::connect(&cluster.db_url).await;
    let alice = register(&node, "alice").await;
    let bob = register(&node, "bob").await;
    let (mut alice_ws, _) = connect(&node, &alice).await;
    let conversation = chat_core::conversation::direct_conversation_id(alice.id, bob.id);
    send_json(&mut alice_ws, send_frame("before", bob.id, "before")).await;
    assert_eq!(reply_to(&mut alice_ws, "before").await["seq"], 1);

    proxy.cut();
    for id in ["during-1", "during-2"] {
        send_json(&mut alice_ws, send_frame(id, bob.id, id)).await;
        let reply = reply_to(&mut alice_ws, id).await;
        assert_eq!(
            (reply["type"].clone(), reply["code"].clone()),
            (json!("error"), json!("unavailable")),
            "{reply}"
        );
    }
    let internal = node.internal;
    let not_ready = chat_core::testing::eventually(Duration::from_secs(5), || async move {
        matches!(reqwest::get(format!("http://{internal}/readyz")).await, Ok(r) if r.status() == 503)
    })
    .await;
    assert!(not_ready, "readiness fails while Postgres is away");

    proxy.restore();
    let mut replies = Vec::new();
    for id in ["during-1", "during-2"] {
        // A client retries with the same id until acked, as docs/protocol.md asks.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let reply = loop {
            send_json(&mut alice_ws, send_frame(id, bob.id, id)).await;
            let reply = reply_to(&mut alice_ws, id).await;
            if reply["type"] == "ack" || tokio::time::Instant::now() > deadline {
                break reply;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(
            reply["type"], "ack",
            "{id} is acked once Postgres is back: {reply}"
        );
        replies.push(reply);
    }
    send_json(&mut alice_ws, send_frame("after", bob.id, "after")).await;
    assert_eq!(reply_to(&mut alice_ws, "after").await["seq"], 4);
    let rows = stored(&db, conversation).await;
    assert_eq!(
        rows,
        vec![
            (1, "before".to_string()),
            (2, "during-1".to_string()),
            (3, "during-2".to_string()),
            (4, "after".to_string()),
        ],
        "each message once, no gap, no seq given twice ({replies:?})"
    );
    node.shutdown.cancel();
}

/// A one-process gateway stopped and started again on the same database continues every
/// conversation's seq where it was, and sync serves what came before.
#[actix_web::test]
async fn a_restart_continues_every_seq() {
    let cluster = Cluster::on(Backend::Memory).await;
    let node = cluster.start_node("solo").await;
    let alice = register(&node, "alice").await;
    let bob = register(&node, "bob").await;
    let (mut ws, _) = connect(&node, &alice).await;
    for i in 1..=3 {
        let id = format!("a{i}");
        send_json(&mut ws, send_frame(&id, bob.id, "first life")).await;
        assert_eq!(reply_to(&mut ws, &id).await["seq"], i);
    }
    drop(ws);
    node.shutdown.cancel();
    let _ = node.task.await;

    let again = cluster.start_node("solo").await;
    let (mut ws, _) = connect(&again, &alice).await;
    send_json(&mut ws, send_frame("b1", bob.id, "second life")).await;
    assert_eq!(reply_to(&mut ws, "b1").await["seq"], 4);
    let conversation = chat_core::conversation::direct_conversation_id(alice.id, bob.id);
    let (mut bob_ws, _) = connect(&again, &bob).await;
    assert_eq!(
        sync_all(&mut bob_ws, conversation, 0).await,
        vec![1, 2, 3, 4]
    );
    again.shutdown.cancel();
}
