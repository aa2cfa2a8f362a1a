//! Direct messages across two real gateway nodes sharing one real Redis, and into Postgres.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;
use support::*;
use uuid::Uuid;

/// Collects `message` frames until `n` arrived or 5 s of silence; then checks nothing more comes.
async fn collect_messages(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        match recv(ws).await {
            Some(v) if v["type"] == "message" => got.push(v),
            Some(other) => panic!("unexpected frame {other}"),
            None => break,
        }
    }
    got
}

/// Nothing but presence events (see `recv`) for 300 ms.
async fn assert_silent(ws: &mut Ws) {
    let extra = frames_within(ws, Duration::from_millis(300)).await;
    assert!(extra.is_empty(), "unexpected extra frames {extra:?}");
}

on_both_backends! {
    /// Alice on node A sends; Bob's connections on both nodes and Alice's other connection on node B
    /// each get every message exactly once, in seq order; the sending connection gets acks only.
    async fn two_nodes_deliver_exactly_once_in_seq_order(backend) {
        let (_cluster, a, b, alice, bob) = Cluster::two_nodes_on(backend).await;

        let (mut alice_a, hello) = connect(&a, &alice).await;
        assert_eq!(hello["node_id"], "node-a");
        assert_eq!(hello["user_id"], alice.id.to_string());
        let (mut alice_b, _) = connect(&b, &alice).await;
        let (mut bob_b, _) = connect(&b, &bob).await;
        let (mut bob_a, _) = connect(&a, &bob).await;

        const N: usize = 25;
        let mut acks = Vec::new();
        for i in 0..N {
            send_json(
                &mut alice_a,
                send_frame(&format!("c{i}"), bob.id, &format!("hello {i}")),
            )
            .await;
            let ack = recv(&mut alice_a).await.expect("ack");
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(ack["id"], format!("c{i}"));
            acks.push(ack);
        }
        let seqs: Vec<i64> = acks
            .iter()
            .map(|a| a["seq"].as_i64().expect("seq"))
            .collect();
        assert_eq!(seqs, (1..=N as i64).collect::<Vec<_>>());
        let conversation = acks[0]["conversation_id"].clone();
        assert!(acks.iter().all(|a| a["conversation_id"] == conversation));

        for ws in [&mut bob_b, &mut bob_a, &mut alice_b] {
            let got = collect_messages(ws, N).await;
            assert_eq!(got.len(), N);
            for (i, m) in got.iter().enumerate() {
                assert_eq!(m["seq"], (i + 1) as i64, "order follows seq");
                assert_eq!(m["body"], format!("hello {i}"));
                assert_eq!(m["from"], alice.id.to_string());
                assert_eq!(m["to"], bob.id.to_string());
                assert_eq!(m["conversation_id"], conversation);
                assert_eq!(m["msg_id"], acks[i]["msg_id"]);
                assert_eq!(m["ts"], acks[i]["ts"]);
            }
            assert_silent(ws).await;
        }
        assert_silent(&mut alice_a).await;

        a.shutdown.cancel();
        b.shutdown.cancel();
    }
}

on_both_backends! {
    /// 500 sends each way at once, through both nodes, get seqs 1..=1000 exactly once, and each side
    /// receives all of the other's messages.
    async fn concurrent_sends_in_both_directions_get_gapless_unique_seqs(backend) {
        let (_cluster, a, b, alice, bob) = Cluster::two_nodes_on(backend).await;
        let (alice_ws, _) = connect(&a, &alice).await;
        let (bob_ws, _) = connect(&b, &bob).await;

        const N: usize = 500;
        // Sends and reads at once, as a client must: one that only sends while 1,000 frames come
        // back may fall a queue behind and be closed as a slow consumer (4008).
        async fn blast(ws: Ws, to: Uuid) -> (Vec<i64>, Vec<i64>) {
            use futures_util::{SinkExt, StreamExt};
            use tokio_tungstenite::tungstenite::Message;
            let (mut sink, mut stream) = ws.split();
            let send = async move {
                for i in 0..N {
                    sink.feed(Message::text(send_frame(&format!("m{i}"), to, "x").to_string()))
                        .await
                        .expect("feed");
                }
                sink.flush().await.expect("flush");
                sink // kept open until the reading ends
            };
            let read = async {
                let (mut acked, mut received) = (Vec::new(), Vec::new());
                while acked.len() < N || received.len() < N {
                    let message = tokio::time::timeout(Duration::from_secs(20), stream.next())
                        .await
                        .expect("a frame within 20 s")
                        .expect("the connection open")
                        .expect("a frame");
                    let text = match message {
                        Message::Text(t) => t,
                        Message::Close(f) => panic!("closed: {f:?}"),
                        _ => continue,
                    };
                    let v: Value = serde_json::from_str(text.as_str()).expect("json");
                    match v["type"].as_str() {
                        Some("ack") => acked.push(v["seq"].as_i64().expect("seq")),
                        Some("message") => received.push(v["seq"].as_i64().expect("seq")),
                        // The peer's coming online is announced beside the handshake, at any
                        // time after it.
                        Some("presence") => {}
                        _ => panic!("unexpected {v}"),
                    }
                }
                (acked, received)
            };
            let (_sink, result) = tokio::join!(send, read);
            result
        }
        let (alice_res, bob_res) = tokio::join!(blast(alice_ws, bob.id), blast(bob_ws, alice.id));

        let all: BTreeSet<i64> = alice_res
            .0
            .iter()
            .chain(bob_res.0.iter())
            .copied()
            .collect();
        assert_eq!(all.len(), 2 * N, "no seq assigned twice");
        assert_eq!(all, (1..=2 * N as i64).collect::<BTreeSet<_>>(), "no gaps");
        // Each side's received seqs are exactly the other's acked seqs, in increasing order.
        assert_eq!(alice_res.1, bob_res.0);
        assert_eq!(bob_res.1, alice_res.0);
        assert!(alice_res.1.windows(2).all(|w| w[0] < w[1]));

        a.shutdown.cancel();
        b.shutdown.cancel();
    }
}

on_both_backends! {
    /// Messages acked on two nodes are stored in Postgres by the worker exactly once, with the seq,
    /// sender, recipient and body that were acked.
    async fn acked_messages_reach_postgres_exactly_once(backend) {
        let (cluster, a, b, alice, bob) = Cluster::two_nodes_on(backend).await;
        let worker = cluster.start_worker();
        let (mut alice_ws, _) = connect(&a, &alice).await;
        let (mut bob_ws, _) = connect(&b, &bob).await;

        let mut acked: HashMap<String, (i64, String)> = HashMap::new();
        for i in 0..20 {
            let (ws, to, body) = if i % 2 == 0 {
                (&mut alice_ws, bob.id, format!("from alice {i}"))
            } else {
                (&mut bob_ws, alice.id, format!("from bob {i}"))
            };
            send_json(ws, send_frame(&format!("{i}"), to, &body)).await;
            let ack = loop {
                let v = recv(ws).await.expect("frame");
                if v["type"] == "ack" {
                    break v;
                }
            };
            acked.insert(
                ack["msg_id"].as_str().expect("id").to_string(),
                (ack["seq"].as_i64().expect("seq"), body),
            );
        }

        let db = chat_core::testing::connect(&cluster.db_url).await;
        let stored = chat_core::testing::eventually(Duration::from_secs(15), || async {
            let row = db
                .query_one("SELECT count(*) FROM messages", &[])
                .await
                .expect("count");
            row.get::<_, i64>(0) == 20
        })
        .await;
        assert!(stored, "worker did not store 20 messages");
        let rows = db
            .query(
                "SELECT id, seq, body, sender_id, recipient_id FROM messages",
                &[],
            )
            .await
            .expect("rows");
        assert_eq!(rows.len(), 20);
        for row in rows {
            let id: Uuid = row.get(0);
            let (seq, body) = acked
                .get(&id.to_string())
                .expect("stored message was acked");
            assert_eq!(row.get::<_, i64>(1), *seq);
            assert_eq!(&row.get::<_, String>(2), body);
            let sender: Uuid = row.get(3);
            let recipient: Uuid = row.get(4);
            assert!(
                (sender == alice.id && recipient == bob.id)
                    || (sender == bob.id && recipient == alice.id)
            );
        }
        let members = db
            .query_one("SELECT count(*) FROM conversation_members", &[])
            .await
            .expect("members");
        assert_eq!(members.get::<_, i64>(0), 2);

        worker.cancel();
        a.shutdown.cancel();
        b.shutdown.cancel();
    }
}

/// A node subscribes to a user's channel only while it holds a connection of theirs: one
/// subscription per node however many devices, none on nodes without the user, and none after
/// the last local connection closes.
///
/// Left out of the Redis Cluster pass (deploy/test.sh): it counts one instance's PUBSUB NUMSUB;
/// tests/redis_cluster.rs counts shard channels.
#[actix_web::test]
async fn subscriptions_follow_local_connections() {
    let (cluster, a, b, _alice, bob) = Cluster::two_nodes().await;
    let channel = chat_core::keys::KeySchema::new(cluster.prefix.clone(), 4)
        .channel(chat_core::pubsub::Topic::User(bob.id));
    let redis = redis::Client::open(chat_core::testing::redis_url()).expect("redis url");
    let conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let subscribers = || {
        let channel = channel.clone();
        let mut conn = conn.clone();
        async move {
            let (_, n): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut conn)
                .await
                .expect("numsub");
            n
        }
    };
    assert_eq!(subscribers().await, 0, "registering subscribes nothing");

    let (mut phone, _) = connect(&b, &bob).await;
    assert_eq!(subscribers().await, 1, "subscribed before the hello");
    let (mut laptop, _) = connect(&b, &bob).await;
    assert_eq!(
        subscribers().await,
        1,
        "one subscription per node, not per connection"
    );
    let (mut tablet, _) = connect(&a, &bob).await;
    assert_eq!(
        subscribers().await,
        2,
        "each node holding bob subscribes once"
    );

    phone.close(None).await.expect("close");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(subscribers().await, 2, "node b still holds bob's laptop");
    laptop.close(None).await.expect("close");
    let gone_from_b = chat_core::testing::eventually(Duration::from_secs(5), || async {
        subscribers().await == 1
    })
    .await;
    assert!(
        gone_from_b,
        "node b unsubscribes after bob's last connection there"
    );
    tablet.close(None).await.expect("close");
    let gone = chat_core::testing::eventually(Duration::from_secs(5), || async {
        subscribers().await == 0
    })
    .await;
    assert!(gone, "no node subscribes to a user with no connections");
    a.shutdown.cancel();
    b.shutdown.cancel();
}

on_both_backends! {
    /// A send repeated with the same client id (a retry after a lost ack, even through another node)
    /// gets the original ack and is stored and delivered once; a new id is a new message.
    async fn repeated_client_id_gets_the_original_ack_once(backend) {
        let (cluster, a, b, alice, bob) = Cluster::two_nodes_on(backend).await;
        let worker = cluster.start_worker();
        let (mut bob_ws, _) = connect(&b, &bob).await;
        let (mut first, _) = connect(&a, &alice).await;
        send_json(&mut first, send_frame("retry-1", bob.id, "once")).await;
        let original = recv(&mut first).await.expect("ack");
        assert_eq!(original["type"], "ack", "{original}");
        drop(first);

        let (mut second, _) = connect(&b, &alice).await;
        send_json(&mut second, send_frame("retry-1", bob.id, "once")).await;
        let repeat = recv(&mut second).await.expect("ack");
        for field in ["msg_id", "seq", "ts", "conversation_id"] {
            assert_eq!(repeat[field], original[field], "{field}");
        }
        send_json(&mut second, send_frame("retry-2", bob.id, "twice")).await;
        let fresh = recv(&mut second).await.expect("ack");
        assert_eq!(fresh["seq"], 2);

        // Up to seq 2 however long it takes, then half a second for a duplicate to show.
        let mut frames = recv_until(&mut bob_ws, |f| f["type"] == "message" && f["seq"] == 2).await;
        while let Some(frame) = recv_within(&mut bob_ws, Duration::from_millis(500)).await {
            frames.push(frame);
        }
        let delivered: Vec<i64> = frames
            .iter()
            .filter(|f| f["type"] == "message")
            .map(|f| f["seq"].as_i64().expect("seq"))
            .collect();
        assert_eq!(delivered, vec![1, 2], "each message delivered once");
        let db = chat_core::testing::connect(&cluster.db_url).await;
        let stored = chat_core::testing::eventually(Duration::from_secs(10), || async {
            db.query_one("SELECT count(*) FROM messages", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == 2)
                .unwrap_or(false)
        })
        .await;
        assert!(stored, "two rows, not three");
        worker.cancel();
    }
}
