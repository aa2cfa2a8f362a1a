//! Redis trouble, each test against a `redis-server` of its own so nothing else is touched: a
//! node's pub/sub connection killed under traffic (the node re-subscribes, tells its connections
//! to resync, reloads room memberships), and Redis killed and restarted from its AOF (sends
//! answered `unavailable`, never acked; readiness off; recovery without a restart, the seq
//! re-based above every seq that can have been issued).

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// Two nodes on `redis`, Alice registered on the first and Bob on the second.
async fn two_nodes_on(redis: &OwnRedis) -> (Cluster, NodeHandle, NodeHandle, User, User) {
    let cluster = Cluster::new().await;
    let config = |node_id: &str| gateway::config::GatewayConfig {
        ..cluster.config_on(node_id, &redis.url)
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
#[actix_web::test]
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

    // The node subscribed again: what is sent now reaches Bob live, without a sync.
    assert!(wait_ready(&b).await, "node b is subscribed again");
    assert!(
        metric(&b, "chat_gateway_pubsub_reconnects_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        metric(&b, "chat_gateway_pubsub_subscriptions").await,
        Some(1.0),
        "Bob's topic, once"
    );
    let (mut alice_ws, _) = connect(&a, &alice).await;
    for i in 1..=10 {
        let id = format!("after-{i}");
        send_json(&mut alice_ws, send_frame(&id, bob_id, "after")).await;
        recv_until(&mut alice_ws, |f| f["id"] == id.as_str()).await;
    }
    let frames = recv_until(&mut bob_ws, |f| f["seq"] == TOTAL + 10).await;
    let after: Vec<i64> = frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(seq)
        .collect();
    assert_eq!(
        after,
        (TOTAL + 1..=TOTAL + 10).collect::<Vec<_>>(),
        "delivered live after the reconnects"
    );
}

/// A pub/sub connection killed again and again for two seconds does not become a resync storm:
/// an idle connection gets one `resync` per gap that ended, at most one per two seconds (here 1
/// to 3, where it used to get one per reconnect, hundreds), and the node counts every reconnect.
#[actix_web::test]
async fn a_flapping_pubsub_connection_sends_few_resyncs() {
    let redis = OwnRedis::start().await;
    let (_cluster, _a, b, _alice, bob) = two_nodes_on(&redis).await;
    let (mut bob_ws, _) = connect(&b, &bob).await;
    let mut admin = redis::Client::open(redis.url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("admin");
    let started = tokio::time::Instant::now();
    let mut killed = 0;
    while started.elapsed() < Duration::from_secs(2) {
        killed += redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "pubsub"])
            .query_async::<i64>(&mut admin)
            .await
            .expect("client kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut resyncs = 0;
    while let Some(frame) = recv_within(&mut bob_ws, Duration::from_secs(3)).await {
        if frame["type"] == "resync" {
            resyncs += 1;
        }
    }
    let reconnects = metric(&b, "chat_gateway_pubsub_reconnects_total")
        .await
        .unwrap_or(0.0);
    assert!(
        killed >= 5 && reconnects >= 5.0,
        "the link flapped (killed {killed}, reconnects {reconnects}), else this proves nothing"
    );
    assert!(
        (1..=3).contains(&resyncs),
        "{resyncs} resync frames for {reconnects} reconnects"
    );
}

/// Membership changes a node never heard of (here written straight to Postgres, as if their
/// events were published while its pub/sub connection was down) take effect once it reconnects.
#[actix_web::test]
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
    // A probe of the loop above may still arrive first (it came after its 300 ms).
    let frames = recv_until(&mut carol_ws, |f| {
        f["type"] == "message" && f["body"] == "last"
    })
    .await;
    assert_eq!(frames.last().expect("message")["body"], "last");
    while let Some(frame) = recv_within(&mut bob_ws, Duration::from_millis(300)).await {
        assert_ne!(
            frame["type"], "message",
            "a removed member still receives: {frame}"
        );
    }
}

/// Redis killed (SIGKILL) and started again from its append-only file: connections stay open,
/// sends get `unavailable` (never an ack) and readiness fails while it is down; afterwards both
/// nodes serve again by themselves, the conversation's seq is re-based above every seq that can
/// have been issued (none is given twice) and Bob is told, history still has every acked
/// message, and sends are delivered live again.
#[actix_web::test]
async fn redis_restart_from_its_aof_answers_unavailable_then_rebases_the_seq() {
    let aof = std::env::temp_dir().join(format!("chat-aof-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&aof).expect("aof dir");
    let port = spare_port();
    let redis = OwnRedis::start_on(port, Some(&aof)).await;
    let (_cluster, a, b, alice, bob) = two_nodes_on(&redis).await;
    let (mut alice_ws, _) = connect(&a, &alice).await;
    let (mut bob_ws, _) = connect(&b, &bob).await;
    for i in 1..=3 {
        let id = format!("before-{i}");
        send_json(&mut alice_ws, send_frame(&id, bob.id, "before")).await;
        let reply = recv_until(&mut alice_ws, |f| f["id"] == id.as_str()).await;
        assert_eq!(reply.last().expect("ack")["seq"], i);
    }

    drop(redis); // SIGKILL: the process is gone; what it acked is in its AOF.
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

    let _again = OwnRedis::start_on(port, Some(&aof)).await;
    assert!(
        wait_ready(&a).await && wait_ready(&b).await,
        "both nodes recover without a restart"
    );
    // The same connections work again. A Redis that restarted may have lost what it acked
    // last, so the conversation's counter is re-based above every seq that can have been
    // issued (Postgres holds none here: no worker runs, so 0 + the default backlog bound):
    // no seq is given twice, and Bob is told which seqs will never exist.
    let mut acked = None;
    for _ in 0..20 {
        send_json(&mut alice_ws, send_frame("during", bob.id, "during")).await;
        let reply = recv_until(&mut alice_ws, |f| f["id"] == "during").await;
        if let Some(ack) = reply.last().filter(|f| f["type"] == "ack") {
            acked = Some(ack.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ack = acked.expect("acked once Redis is back");
    let margin = chat_core::log::DEFAULT_MAX_BACKLOG as i64;
    assert_eq!(
        ack["seq"],
        margin + 1,
        "re-based above every seq that can have been issued: {ack}"
    );
    let frames = recv_until(&mut bob_ws, |f| {
        f["type"] == "message" && f["body"] == "during"
    })
    .await;
    let rebased = frames
        .iter()
        .find(|f| f["type"] == "rebased")
        .expect("bob is told of the skipped seqs");
    assert_eq!(
        (rebased["from_seq"].clone(), rebased["to_seq"].clone()),
        (json!(4), json!(margin))
    );
    assert_eq!(
        frames.last().map(|f| f["seq"].clone()),
        Some(json!(margin + 1)),
        "delivered live on the same connection"
    );
    let conversation = chat_core::conversation::direct_conversation_id(alice.id, bob.id);
    let seqs = all_history_seqs(b.http, &bob.token, conversation).await;
    assert_eq!(
        seqs,
        vec![1, 2, 3, margin + 1],
        "history holds every acked message"
    );
    let _ = std::fs::remove_dir_all(&aof);
}

/// Node A on Redis directly, node B through a proxy the test freezes, with the given canary
/// settings; Alice on A and Bob on B, one message delivered live between them.
struct HalfOpen {
    _a: NodeHandle,
    b: NodeHandle,
    alice_ws: Ws,
    bob_ws: Ws,
    bob: User,
    proxy: chat_core::testing::Proxy,
    _cluster: Cluster,
    _redis: OwnRedis,
}

impl HalfOpen {
    async fn start(canary_interval_ms: u64, canary_timeout_ms: u64) -> Self {
        let redis = OwnRedis::start().await;
        let (proxy, proxied) = redis_proxy(&redis).await;
        let cluster = Cluster::new().await;
        let a = cluster
            .start_with(cluster.config_on("node-a", &redis.url))
            .await;
        let b = cluster
            .start_with(gateway::config::GatewayConfig {
                gateway_delivery_canary_interval_ms: canary_interval_ms,
                gateway_delivery_canary_timeout_ms: canary_timeout_ms,
                ..cluster.config_on("node-b", &proxied)
            })
            .await;
        let alice = register(&a, "alice").await;
        let bob = register(&b, "bob").await;
        let (mut alice_ws, _) = connect(&a, &alice).await;
        let (mut bob_ws, _) = connect(&b, &bob).await;
        delivered_live(&mut alice_ws, &mut bob_ws, bob.id, "1", "before").await;
        HalfOpen {
            _a: a,
            b,
            alice_ws,
            bob_ws,
            bob,
            proxy,
            _cluster: cluster,
            _redis: redis,
        }
    }
}

/// A half-open pub/sub connection (a proxy that stops forwarding it without closing it): the
/// node's delivery canary does not come back, so within a few seconds the node connects again,
/// its connection gets `resync` and recovers the message sent into the silence by sync. While
/// new pub/sub links freeze too, readiness fails with `pubsub`; it recovers once they forward.
#[actix_web::test]
async fn a_half_open_pubsub_connection_is_found_by_the_canary() {
    let mut t = HalfOpen::start(300, 1000).await;
    t.proxy.freeze(true, false);
    let conversation = sent_into_silence(&mut t.alice_ws, t.bob.id).await;
    resynced_over_silence(
        &mut t.bob_ws,
        &conversation,
        Duration::from_secs(8),
        "the canary found the dead link",
    )
    .await;
    let (b, proxy) = (&t.b, &t.proxy);
    assert!(
        metric(b, "chat_gateway_delivery_canary_lost_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        metric(b, "chat_gateway_delivery_canary_round_trip_seconds_count")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );

    // Every pub/sub link freezes, new ones too: the node cannot deliver and says so.
    proxy.freeze(true, true);
    let readyz = format!("http://{}/readyz", b.internal);
    let unready = chat_core::testing::eventually(Duration::from_secs(15), || {
        let readyz = readyz.clone();
        async move {
            let (status, body) = get(&readyz, None).await;
            status == 503
                && body["failing"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|c| c == "pubsub"))
        }
    })
    .await;
    assert!(
        unready,
        "readiness fails with pubsub while no link delivers"
    );
    proxy.thaw();
    assert!(wait_ready(b).await, "ready again once links forward");
}

/// A subscription sent on a half-open pub/sub connection gets no answer: the node gives up on
/// it within seconds, connects again and resyncs, instead of waiting for ever (the connection has
/// no response timeout of its own). The canary is set too slow to act within the test, so only
/// that bound can find the dead link.
#[actix_web::test]
async fn a_subscription_unanswered_on_a_half_open_pubsub_connection_reconnects() {
    let mut t = HalfOpen::start(600_000, 600_000).await;
    let carol = register(&t.b, "carol").await;
    t.proxy.freeze(true, false);
    let conversation = sent_into_silence(&mut t.alice_ws, t.bob.id).await;
    // Carol's handshake subscribes her channel on the frozen connection.
    let mut carol_ws = connect_eventually(t.b.http, &carol, Duration::from_secs(30)).await;
    resynced_over_silence(
        &mut t.bob_ws,
        &conversation,
        Duration::from_secs(20),
        "the unanswered subscription made the node connect again",
    )
    .await;
    delivered_live(&mut t.alice_ws, &mut carol_ws, carol.id, "3", "hello carol").await;
}

/// A gateway refuses to start on a Redis that would lose acked messages (here one without AOF),
/// naming what is wrong; on one with `appendonly yes` and `noeviction` it starts.
#[actix_web::test]
async fn a_redis_that_would_lose_acked_messages_is_refused_at_start() {
    let cluster = Cluster::new().await;
    let unsafe_redis = OwnRedis::start().await;
    let node = spawn_node(gateway::config::GatewayConfig {
        redis_require_durability: true,
        ..cluster.config_on("refused", &unsafe_redis.url)
    });
    let ended = tokio::time::timeout(Duration::from_secs(20), node.task)
        .await
        .expect("the node stops by itself")
        .expect("joined");
    match ended {
        Err(gateway::GatewayError::UnsafeRedis(problem)) => {
            assert!(problem.contains("appendonly is off"), "{problem}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let dir = std::env::temp_dir().join(format!("chat-aof-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("aof dir");
    let durable = OwnRedis::start_on(spare_port(), Some(&dir)).await;
    let node = cluster
        .start_with(gateway::config::GatewayConfig {
            redis_require_durability: true,
            ..cluster.config_on("accepted", &durable.url)
        })
        .await;
    assert!(wait_ready(&node).await);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Redis near its `maxmemory`: while its used memory is at least 90% of it, sends are refused
/// with `unavailable` (nothing appended), the ratio is exported, and once it has room again sends
/// are acked; Redis itself never gets to refuse writes.
#[actix_web::test]
async fn a_nearly_full_redis_refuses_sends_before_it_is_full() {
    let redis = OwnRedis::start().await;
    let mut admin = redis::Client::open(redis.url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("admin");
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "64mb"])
        .query_async(&mut admin)
        .await
        .expect("maxmemory");
    let cluster = Cluster::new().await;
    let a = cluster
        .start_with(gateway::config::GatewayConfig {
            redis_memory_check_ms: 200,
            ..cluster.config_on("node-a", &redis.url)
        })
        .await;
    let alice = register(&a, "alice").await;
    let bob = register(&a, "bob").await;
    let (mut ws, _) = connect(&a, &alice).await;
    async fn send(ws: &mut Ws, n: &mut usize, to: uuid::Uuid) -> Value {
        *n += 1;
        let id = format!("m{n}");
        send_json(ws, send_frame(&id, to, "hello")).await;
        let reply = recv_until(ws, |f| f["id"] == id.as_str()).await;
        reply.last().expect("reply").clone()
    }
    let mut n = 0;
    assert_eq!(send(&mut ws, &mut n, bob.id).await["type"], "ack");

    // Fill Redis to about 92% of 64 MiB with junk.
    let mut junk = 0;
    loop {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut admin)
            .await
            .expect("info");
        let used: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory");
        if used >= 64 * 1024 * 1024 * 92 / 100 {
            break;
        }
        let _: () = redis::cmd("SET")
            .arg(format!("junk:{junk}"))
            .arg(vec![b'x'; 1 << 20])
            .query_async(&mut admin)
            .await
            .expect("junk");
        junk += 1;
    }
    let mut refused = Value::Null;
    for _ in 0..30 {
        refused = send(&mut ws, &mut n, bob.id).await;
        if refused["type"] == "error" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{refused}"
    );
    assert!(
        metric(&a, "chat_gateway_redis_memory_used_ratio")
            .await
            .unwrap_or(0.0)
            >= 0.9
    );
    for i in 0..junk {
        let _: () = redis::cmd("DEL")
            .arg(format!("junk:{i}"))
            .query_async(&mut admin)
            .await
            .expect("del");
    }
    let mut acked = Value::Null;
    for _ in 0..30 {
        acked = send(&mut ws, &mut n, bob.id).await;
        if acked["type"] == "ack" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        acked["type"], "ack",
        "accepted again once Redis has room: {acked}"
    );
}

/// A room removal whose event never reaches the removed member's node (the membership deleted in
/// Postgres behind the nodes' backs, with no publish and no pub/sub loss to resync after): within
/// `gateway_membership_recheck_secs` (1 s here) the removed member's sends, syncs and history
/// requests are refused, and within `gateway_room_reload_secs` (2 s here) live delivery to them
/// stops too.
#[actix_web::test]
async fn a_room_removal_holds_without_its_event() {
    let cluster = Cluster::new().await;
    let config = |node_id: &str| gateway::config::GatewayConfig {
        gateway_membership_recheck_secs: 1,
        gateway_room_reload_secs: 2,
        ..cluster.config(node_id)
    };
    let a = cluster.start_with(config("node-a")).await;
    let b = cluster.start_with(config("node-b")).await;
    let (alice, bob) = (register(&a, "alice").await, register(&b, "bob").await);
    let room = create_room(&a, &alice, &[bob.id]).await;
    let (mut alice_ws, _) = connect(&a, &alice).await;
    let (mut bob_ws, _) = connect(&b, &bob).await;
    let room_send =
        |id: &str| json!({"type": "send", "id": id, "conversation_id": room, "body": id});
    send_json(&mut bob_ws, room_send("before")).await;
    let reply = recv_until(&mut bob_ws, |f| f["id"] == "before").await;
    assert_eq!(reply.last().expect("ack")["type"], "ack");

    let db = chat_core::testing::connect(&cluster.db_url).await;
    db.execute(
        "DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = $2",
        &[&room, &bob.id],
    )
    .await
    .expect("remove bob behind the nodes' backs");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    send_json(&mut bob_ws, room_send("after")).await;
    let reply = recv_until(&mut bob_ws, |f| f["id"] == "after").await;
    let reply = reply.last().expect("reply");
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{reply}"
    );
    send_json(
        &mut bob_ws,
        json!({"type": "sync", "conversation_id": room, "after_seq": 0}),
    )
    .await;
    let frames = recv_until(&mut bob_ws, |f| {
        f["type"] == "error" || f["type"] == "synced"
    })
    .await;
    assert_eq!(
        frames.last().expect("answer")["code"],
        "forbidden",
        "{frames:?}"
    );
    let (status, _) = get(
        &format!("http://{}/api/v1/conversations/{room}/messages", b.http),
        Some(&bob.token),
    )
    .await;
    assert!(status == 403 || status == 404, "history refused: {status}");

    // Delivery follows at the next reload.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    while recv_within(&mut bob_ws, Duration::from_millis(100))
        .await
        .is_some()
    {}
    send_json(&mut alice_ws, room_send("unseen")).await;
    recv_until(&mut alice_ws, |f| f["id"] == "unseen").await;
    while let Some(frame) = recv_within(&mut bob_ws, Duration::from_millis(700)).await {
        assert_ne!(
            frame["type"], "message",
            "a removed member still receives: {frame}"
        );
    }
}
