//! `ack_durability = replicas:1` against a Redis master with a replica of its own: an ack means
//! the replica has the message; without a replica the sender gets `unavailable` (never an ack),
//! and the retry with the same id, once the replica is back, gets the original seq.

mod support;

use serde_json::json;
use support::*;

#[actix_web::test]
async fn replicas_1_acks_only_what_a_replica_confirmed() {
    let master_port = spare_port();
    let replica_port = spare_port();
    let master = OwnRedis::start_on(master_port, None).await;
    let replica = OwnRedis::start_replica(replica_port, master_port).await;
    let cluster = Cluster::new().await;
    let node = cluster
        .start_with(gateway::config::GatewayConfig {
            ack_durability: "replicas:1".into(),
            ack_replica_timeout_ms: 300,
            ..cluster.config_on("node-a", &master.url)
        })
        .await;
    let alice = register(&node, "alice").await;
    let bob = register(&node, "bob").await;
    let (mut ws, _) = connect(&node, &alice).await;
    let conversation = chat_core::conversation::direct_conversation_id(alice.id, bob.id);
    let keys = chat_core::keys::KeySchema::new(cluster.prefix.clone(), 4);
    let replica_seq = |url: String| {
        let key = keys.seq_counter(conversation);
        async move {
            let client = redis::Client::open(url.as_str()).expect("url");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("replica");
            let n: Option<i64> = redis::cmd("HGET")
                .arg(key)
                .arg("n")
                .query_async(&mut conn)
                .await
                .expect("hget");
            n
        }
    };

    send_json(&mut ws, send_frame("one", bob.id, "one")).await;
    let reply = recv_until(&mut ws, |f| f["id"] == "one").await;
    assert_eq!(reply.last().expect("ack")["seq"], 1, "{reply:?}");
    assert_eq!(
        replica_seq(replica.url.clone()).await,
        Some(1),
        "the replica had the message when it was acked"
    );

    drop(replica); // SIGKILL: no replica can confirm now
    send_json(&mut ws, send_frame("two", bob.id, "two")).await;
    let reply = recv_until(&mut ws, |f| f["id"] == "two").await;
    let reply = reply.last().expect("reply");
    assert_eq!(
        (reply["type"].clone(), reply["code"].clone()),
        (json!("error"), json!("unavailable")),
        "not acked without a replica: {reply}"
    );
    assert_eq!(
        metric(
            &node,
            "chat_gateway_log_events_total{event=\"replicas_short\"}"
        )
        .await,
        Some(1.0)
    );

    // The replica comes back (empty; it resyncs from the master). The retry with the same id
    // finds the first attempt, which the master applied, and acks its seq once it is confirmed.
    let replica = OwnRedis::start_replica(replica_port, master_port).await;
    send_json(&mut ws, send_frame("two", bob.id, "two")).await;
    let reply = recv_until(&mut ws, |f| f["id"] == "two").await;
    assert_eq!(reply.last().expect("ack")["type"], "ack", "{reply:?}");
    assert_eq!(
        reply.last().expect("ack")["seq"],
        2,
        "the original seq, stored once"
    );
    assert_eq!(replica_seq(replica.url.clone()).await, Some(2));
}
