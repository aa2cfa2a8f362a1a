//! Hostile input: forged, confused and expired tokens (ours and an external identity
//! provider's), another user's conversation, and SQL metacharacters and odd Unicode in every
//! field. Each is refused with its documented status or stored as plain data.

mod support;

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;
use uuid::Uuid;

const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "chat-gateway";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).expect("encode")
}

fn rsa_key(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_der(&std::fs::read(fixture(name)).expect("fixture"))
}

/// Unsigned `alg: none` token with these claims.
fn unsigned(claims: &Value) -> String {
    use base64_url::encode;
    format!(
        "{}.{}.",
        encode(br#"{"alg":"none","typ":"JWT"}"#),
        encode(claims.to_string().as_bytes())
    )
}

/// Minimal base64url without padding, for the hand-made `none` token.
mod base64_url {
    pub fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }
}

async fn me(node: &NodeHandle, token: &str) -> (u16, Value) {
    get(
        &format!("http://{}/api/v1/users/me", node.http),
        Some(token),
    )
    .await
}

on_both_backends! {
    async fn external_provider_tokens_are_verified_and_confusions_refused(backend) {
        let cluster = Cluster::on(backend).await;
        let mut config = cluster.config("idp");
        config.jwt_jwks_path = Some(fixture("idp-jwks.json"));
        config.jwt_external_issuer = Some(ISSUER.into());
        config.jwt_external_audience = Some(AUDIENCE.into());
        let node = cluster.start_with(config).await;
        let now = gateway::auth::unix_now();
        let claims = |sub: &str| {
            json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300,
                   "name": "Grace from Corp"})
        };
        let rsa = rsa_key("idp-rsa.der");
        let ec = EncodingKey::from_ec_der(&std::fs::read(fixture("idp-ec.der")).expect("fixture"));

        // RS256 and ES256 tokens from the provider: the user is created on first use, once.
        let rs = sign(Algorithm::RS256, Some("rsa-1"), &rsa, &claims("grace"));
        let (status, body) = me(&node, &rs).await;
        assert_eq!(status, 200, "{body}");
        let grace = gateway::auth::external_user_id(ISSUER, "grace");
        assert_eq!(body["id"], grace.to_string());
        assert_eq!(body["name"], "Grace from Corp");
        let es = sign(Algorithm::ES256, Some("ec-1"), &ec, &claims("grace"));
        let (status, body) = me(&node, &es).await;
        assert_eq!(
            (status, body["id"].clone()),
            (200, json!(grace.to_string()))
        );
        let no_kid = sign(Algorithm::ES256, None, &ec, &claims("heidi"));
        assert_eq!(
            me(&node, &no_kid).await.0,
            200,
            "a token without kid tries the keys of its alg"
        );
        // The provider's user chats like any other: a WebSocket, and a message to a local user.
        let local = register(&node, "local").await;
        let grace_user = User {
            id: grace,
            token: rs.clone(),
        };
        let (mut ws, hello) = connect(&node, &grace_user).await;
        assert_eq!(hello["user_id"], grace.to_string());
        send_json(&mut ws, send_frame("ext-1", local.id, "hello from the IdP")).await;
        assert_eq!(recv(&mut ws).await.expect("ack")["type"], "ack");
        // Provider users have no password: logging in with any password fails.
        let (status, _) = post(
            &node,
            "/api/v1/auth/login",
            json!({"email": format!("{grace}@external.invalid"), "password": "!external"}),
        )
        .await;
        assert_eq!(status, 401);

        let refused: Vec<(&str, String)> = vec![
            ("wrong issuer", {
                let mut c = claims("grace");
                c["iss"] = json!("https://evil.example");
                sign(Algorithm::RS256, Some("rsa-1"), &rsa, &c)
            }),
            ("wrong audience", {
                let mut c = claims("grace");
                c["aud"] = json!("another-app");
                sign(Algorithm::RS256, Some("rsa-1"), &rsa, &c)
            }),
            ("no audience", {
                let mut c = claims("grace");
                c.as_object_mut().expect("object").remove("aud");
                sign(Algorithm::RS256, Some("rsa-1"), &rsa, &c)
            }),
            ("expired", {
                let mut c = claims("grace");
                c["exp"] = json!(now - 120);
                sign(Algorithm::RS256, Some("rsa-1"), &rsa, &c)
            }),
            ("not yet valid", {
                let mut c = claims("grace");
                c["nbf"] = json!(now + 120);
                sign(Algorithm::ES256, Some("ec-1"), &ec, &c)
            }),
            (
                "signed by a key not in the set",
                sign(
                    Algorithm::RS256,
                    Some("rsa-1"),
                    &rsa_key("attacker-rsa.der"),
                    &claims("grace"),
                ),
            ),
            (
                "RS256 under the EC key's kid",
                sign(Algorithm::RS256, Some("ec-1"), &rsa, &claims("grace")),
            ),
            (
                "unknown kid",
                sign(Algorithm::RS256, Some("rsa-9"), &rsa, &claims("grace")),
            ),
            (
                "HS256 keyed with the provider's public key (HS/RS confusion)",
                sign(
                    Algorithm::HS256,
                    Some("rsa-1"),
                    &EncodingKey::from_secret(
                        &std::fs::read(fixture("idp-rsa-public.pem")).expect("fixture"),
                    ),
                    &claims("grace"),
                ),
            ),
            ("alg none", unsigned(&claims("grace"))),
            (
                "RS384 (not an accepted algorithm)",
                sign(Algorithm::RS384, Some("rsa-1"), &rsa, &claims("grace")),
            ),
        ];
        for (what, token) in &refused {
            let (status, body) = me(&node, token).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{what}: {body}"
            );
            let (status, _) = refused_upgrade(&node, token).await;
            assert_eq!(status, 401, "{what} at the WebSocket handshake");
        }
        node.shutdown.cancel();
    }
}

/// The handshake's status for a token.
async fn refused_upgrade(node: &NodeHandle, token: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .get(format!("http://{}/ws", node.http))
        .bearer_auth(token)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("http");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

on_both_backends! {
    async fn our_tokens_refuse_none_not_yet_valid_and_deleted_users(backend) {
        let cluster = Cluster::on(backend).await;
        let node = cluster.start_node("own").await;
        let ivan = register(&node, "ivan").await;
        let now = gateway::auth::unix_now();
        let secret = EncodingKey::from_secret(SECRET.as_bytes());
        let claims = json!({"sub": ivan.id, "iat": now, "exp": now + 300});
        assert_eq!(
            me(&node, &sign(Algorithm::HS256, None, &secret, &claims))
                .await
                .0,
            200
        );
        let mut early = claims.clone();
        early["nbf"] = json!(now + 120);
        for (what, token) in [
            ("alg none", unsigned(&claims)),
            (
                "not yet valid",
                sign(Algorithm::HS256, None, &secret, &early),
            ),
            (
                "HS512 with our secret",
                sign(Algorithm::HS512, None, &secret, &claims),
            ),
            (
                "RS256 with no provider configured",
                sign(Algorithm::RS256, None, &rsa_key("idp-rsa.der"), &claims),
            ),
        ] {
            assert_eq!(me(&node, &token).await.0, 401, "{what}");
        }
        // A token whose user no longer exists.
        let db = chat_core::testing::connect(&cluster.db_url).await;
        db.execute("DELETE FROM users WHERE id = $1", &[&ivan.id])
            .await
            .expect("delete");
        let (status, body) = me(&node, &ivan.token).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("unauthorized"))
        );
        assert_eq!(refused_upgrade(&node, &ivan.token).await.0, 401);
        node.shutdown.cancel();
    }
}

on_both_backends! {
    async fn another_users_conversation_is_neither_read_nor_written(backend) {
        let (cluster, a, _b, alice, bob) = Cluster::two_nodes_on(backend).await;
        let mallory = register(&a, "mallory").await;
        let (mut alice_ws, _) = connect(&a, &alice).await;
        send_json(
            &mut alice_ws,
            send_frame("private-1", bob.id, "for bob only"),
        )
        .await;
        let ack = recv(&mut alice_ws).await.expect("ack");
        let conversation = ack["conversation_id"]
            .as_str()
            .expect("conversation")
            .to_string();

        let (status, body) = get(
            &format!(
                "http://{}/api/v1/conversations/{conversation}/messages",
                a.http
            ),
            Some(&mallory.token),
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
        let (mut mallory_ws, _) = connect(&a, &mallory).await;
        for frame in [
            json!({"type": "send", "id": "m-1", "conversation_id": conversation, "body": "injected"}),
            json!({"type": "sync", "conversation_id": conversation, "after_seq": 0}),
            json!({"type": "read", "conversation_id": conversation, "seq": 1}),
            json!({"type": "typing", "conversation_id": conversation}),
        ] {
            send_json(&mut mallory_ws, frame.clone()).await;
            let reply = recv(&mut mallory_ws).await.expect("reply");
            assert_eq!(reply["type"], "error", "{frame} -> {reply}");
            assert_eq!(reply["code"], "forbidden", "{frame} -> {reply}");
        }
        // Nothing reached Alice or Bob's conversation.
        assert_eq!(
            history_bodies(&a, &conversation, &alice).await,
            ["for bob only"]
        );
        drop(cluster);
    }
}

on_both_backends! {
    async fn sql_metacharacters_and_odd_unicode_are_stored_as_data(backend) {
        let cluster = Cluster::on(backend).await;
        let node = cluster.start_node("data").await;
        let worker = cluster.start_worker();
        let hostile = [
            "Robert'); DROP TABLE users; --",
            "1' OR '1'='1",
            "\\'; SELECT pg_sleep(10); --",
            "$1 $$ E'\\x00' ::text",
            "\u{202e}evil\u{202c} \u{200d}\u{200b}\u{feff}",
            "Z\u{0351}\u{0364}\u{0363}\u{0364}a\u{0336}\u{0353}l\u{0313}\u{0307}g\u{0326}o",
            "👩‍👩‍👧‍👦 𝕳𝖊𝖑𝖑𝖔 \u{10FFFF}",
            "<script>alert(1)</script>",
        ];
        let mut users = Vec::new();
        for (i, name) in hostile.iter().enumerate() {
            let email = format!("o'hara+{i}-{}@example.test", Uuid::new_v4().simple());
            let (status, body) = post(
                &node,
                "/api/v1/auth/register",
                json!({"name": name, "email": email, "password": "password'; --"}),
            )
            .await;
            assert_eq!(status, 201, "{name:?}: {body}");
            assert_eq!(body["user"]["name"], *name, "the name is stored as given");
            let (status, body) = post(
                &node,
                "/api/v1/auth/login",
                json!({"email": email, "password": "password'; --"}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            users.push(user_from(&body));
        }
        let (alice, bob) = (&users[0], &users[1]);
        let (mut ws, _) = connect(&node, alice).await;
        let mut conversation = String::new();
        for (i, body) in hostile.iter().enumerate() {
            let id = format!("{body}-{i}");
            send_json(&mut ws, send_frame(&id, bob.id, body)).await;
            let ack = recv(&mut ws).await.expect("ack");
            assert_eq!(
                (ack["type"].as_str(), ack["id"].as_str()),
                (Some("ack"), Some(id.as_str()))
            );
            conversation = ack["conversation_id"].as_str().expect("conv").to_string();
        }
        // A room named with every hostile string in turn, and a search for them.
        for name in &hostile {
            let (status, body) = call(
                reqwest::Method::POST,
                &node,
                "/api/v1/rooms",
                alice,
                Some(json!({"name": name, "member_ids": [bob.id]})),
            )
            .await;
            assert_eq!(
                (status, body["name"].as_str()),
                (201, Some(*name)),
                "{body}"
            );
            let (status, _) = get(
                &format!("http://{}/api/v1/users?q={}", node.http, url_escape(name)),
                Some(&alice.token),
            )
            .await;
            assert_eq!(status, 200, "search for {name:?}");
        }
        // Once in Postgres, history returns every body byte for byte.
        let db = chat_core::testing::connect(&cluster.db_url).await;
        let stored = chat_core::testing::eventually(Duration::from_secs(15), || {
            let db = &db;
            async move {
                db.query_one("SELECT count(*) FROM messages", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0) == hostile.len() as i64)
                    .unwrap_or(false)
            }
        })
        .await;
        assert!(stored, "every message reached Postgres");
        assert_eq!(history_bodies(&node, &conversation, bob).await, hostile);
        let tables: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE tablename IN ('users', 'messages')",
                &[],
            )
            .await
            .expect("tables")
            .get(0);
        assert_eq!(tables, 2, "no statement was injected");
        worker.cancel();
        node.shutdown.cancel();
    }
}

/// The bodies of a conversation's first 50 messages, as `user` reads them through the history API.
async fn history_bodies(node: &NodeHandle, conversation: &str, user: &User) -> Vec<String> {
    let (status, page) = get(
        &format!(
            "http://{}/api/v1/conversations/{conversation}/messages?limit=50",
            node.http
        ),
        Some(&user.token),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["body"].as_str().map(str::to_string))
        .collect()
}

/// Percent-encodes every byte outside unreserved characters.
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Makes one frame of a flood.
type FrameMaker = Box<dyn Fn() -> String>;

/// One flood frame of each kind a client can send, each aimed at what costs the node most.
fn flood_frames() -> Vec<(&'static str, FrameMaker)> {
    let random_ids = |n: usize| (0..n).map(|_| Uuid::new_v4()).collect::<Vec<_>>();
    vec![
        (
            "sync",
            Box::new(move || {
                let points: Vec<Value> = random_ids(100)
                    .into_iter()
                    .map(|c| json!({"conversation_id": c, "after_seq": 0}))
                    .collect();
                json!({"type": "sync", "conversations": points}).to_string()
            }),
        ),
        (
            "read",
            Box::new(|| {
                json!({"type": "read", "conversation_id": Uuid::new_v4(), "seq": 1}).to_string()
            }),
        ),
        (
            "typing",
            Box::new(|| json!({"type": "typing", "conversation_id": Uuid::new_v4()}).to_string()),
        ),
        (
            "presence.watch",
            Box::new(move || {
                json!({"type": "presence.watch", "user_ids": random_ids(300)}).to_string()
            }),
        ),
        (
            "presence.unwatch",
            Box::new(|| {
                json!({"type": "presence.unwatch", "user_ids": [Uuid::new_v4()]}).to_string()
            }),
        ),
        (
            "invalid",
            Box::new(|| "{\"type\": \"nonsense\"".to_string()),
        ),
    ]
}

on_both_backends! {
    /// A flood of each client frame type from one user is answered `rate_limited` and then
    /// closed with 4029, while another user's `GET /users/me` keeps answering 200, each within
    /// 1 s (a debug build on 2 cores; it answers in a few ms when idle).
    async fn a_flood_of_any_frame_type_is_limited_and_harms_nobody_else(backend) {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let cluster = Cluster::on(backend).await;
        let node = cluster
            .start_with(gateway::config::GatewayConfig {
                gateway_frame_budget_per_sec: 20,
                ..cluster.config("node-a")
            })
            .await;
        let mallory = register(&node, "mallory").await;
        let alice = register(&node, "alice").await;
        for (kind, frame) in flood_frames() {
            let stop = tokio_util::sync::CancellationToken::new();
            let watcher = {
                let (http, token, stop) = (node.http, alice.token.clone(), stop.clone());
                tokio::spawn(async move {
                    let url = format!("http://{http}/api/v1/users/me");
                    let mut slowest = Duration::ZERO;
                    while !stop.is_cancelled() {
                        let started = tokio::time::Instant::now();
                        let (status, _) = get(&url, Some(&token)).await;
                        assert_eq!(status, 200);
                        slowest = slowest.max(started.elapsed());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    slowest
                })
            };
            let (mut ws, _) = connect(&node, &mallory).await;
            let (mut limited, mut code, mut sent) = (0, None, 0);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            'flood: while tokio::time::Instant::now() < deadline {
                for _ in 0..20 {
                    if ws.send(Message::text(frame())).await.is_err() {
                        break;
                    }
                    sent += 1;
                }
                while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(5), ws.next()).await {
                    match msg {
                        Ok(Message::Text(text)) => {
                            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                            if v["code"] == "rate_limited" {
                                limited += 1;
                            }
                        }
                        Ok(Message::Close(f)) => {
                            code = f.map(|f| u16::from(f.code));
                            break 'flood;
                        }
                        Ok(_) => {}
                        Err(_) => break 'flood,
                    }
                }
            }
            stop.cancel();
            let slowest = watcher.await.expect("watcher");
            assert!(limited >= 1, "{kind}: answered rate_limited first ({sent} sent, close {code:?})");
            assert_eq!(code, Some(4029), "{kind}: closed as abusive after {sent} frames");
            assert!(
                slowest < Duration::from_secs(1),
                "{kind}: another user's /users/me took {slowest:?}"
            );
        }
        assert!(
            metric(&node, "chat_gateway_rate_limited_total{limit=\"frames\"}")
                .await
                .unwrap_or(0.0)
                >= 6.0
        );
    }
}

/// One account floods from 20 connections over two nodes for 3 s (each sends 15/s, under its own
/// limit of 20/s; 300/s offered) while another pair chats: the account gets `rate_limited` past its
/// budget of 20 sends/s (200 per 10 s window; two windows at most, each passed by at most what
/// the other node accepted in the second before it reported), every acked flood message is
/// stored once with a gap-free seq (in Postgres, once the worker drains it), the pair's every
/// send is acked and delivered within 1 s, and Redis grows by under 16 MB.
///
/// Left out of the Redis Cluster pass (deploy/test.sh): it runs on a Redis of its own, the same in
/// both passes.
#[actix_web::test]
async fn one_account_flooding_from_many_connections_is_held_to_its_budget() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let redis = OwnRedis::start().await;
    let cluster = Cluster::new().await;
    let config = |node_id: &str| gateway::config::GatewayConfig {
        gateway_send_rate_per_sec: 20,
        gateway_account_send_rate_per_sec: 20,
        ..cluster.config_on(node_id, &redis.url)
    };
    let a = cluster.start_with(config("node-a")).await;
    let b = cluster.start_with(config("node-b")).await;
    let flooder = register(&a, "flooder").await;
    let sink = register(&a, "sink").await;
    let (alice, bob) = (register(&a, "alice").await, register(&b, "bob").await);
    let used_memory = || {
        let url = redis.url.clone();
        async move {
            let mut conn = redis::Client::open(url.as_str())
                .expect("url")
                .get_multiplexed_async_connection()
                .await
                .expect("redis");
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut conn)
                .await
                .expect("info");
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<i64>().ok())
                .expect("used_memory")
        }
    };
    let memory_before = used_memory().await;

    let flood = tokio::spawn({
        let (a, b, flooder, sink) = (a.http, b.http, flooder.clone(), sink.id);
        async move {
            let mut tasks = Vec::new();
            for i in 0..20 {
                let node = if i % 2 == 0 { a } else { b };
                let flooder = flooder.clone();
                tasks.push(tokio::spawn(async move {
                    let (mut ws, _) = connect_to(node, &flooder).await;
                    let (mut acked, mut limited, mut replies) = (Vec::new(), 0, 0);
                    let mut other = Vec::new();
                    let mut closed: Option<u16> = None;
                    let ours = format!("f{i}-");
                    // Every frame answering one of this connection's sends is a reply: an ack,
                    // `rate_limited`, or another error (kept, to be reported).
                    let mut take = |t: &str, acked: &mut Vec<i64>, limited: &mut usize| {
                        let v: Value = serde_json::from_str(t).unwrap_or(Value::Null);
                        if !v["id"].as_str().is_some_and(|id| id.starts_with(&ours)) {
                            return false;
                        }
                        match v["type"].as_str() {
                            Some("ack") => acked.push(v["seq"].as_i64().expect("seq")),
                            Some("error") if v["code"] == "rate_limited" => *limited += 1,
                            _ => other.push(v),
                        }
                        true
                    };
                    // Paced below the connection's own limit (a stall is not made up with a
                    // burst), so only the account's budget refuses, and a 4029 (the connection
                    // ignoring its own limit) is a failure. Between sends it reads everything.
                    let until = tokio::time::Instant::now() + Duration::from_secs(3);
                    let mut pace = tokio::time::interval(Duration::from_millis(1000 / 15));
                    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut n = 0;
                    'flood: while tokio::time::Instant::now() < until {
                        let next = pace.tick().await + Duration::from_millis(1000 / 15);
                        let frame = send_frame(&format!("f{i}-{n}"), sink, &"x".repeat(1000));
                        if ws.send(Message::text(frame.to_string())).await.is_err() {
                            break;
                        }
                        n += 1;
                        while let Ok(Some(Ok(message))) =
                            tokio::time::timeout_at(next, ws.next()).await
                        {
                            match message {
                                Message::Text(t) => {
                                    replies += usize::from(take(&t, &mut acked, &mut limited));
                                }
                                Message::Close(frame) => {
                                    closed = frame.map(|f| u16::from(f.code));
                                    break 'flood;
                                }
                                _ => {}
                            }
                        }
                    }
                    // Every send gets exactly one answer: wait for all of them.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                    while closed.is_none() && replies < n && tokio::time::Instant::now() < deadline {
                        match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
                            Ok(Some(Ok(Message::Text(t)))) => {
                                replies += usize::from(take(&t, &mut acked, &mut limited));
                            }
                            Ok(Some(Ok(Message::Close(frame)))) => {
                                closed = frame.map(|f| u16::from(f.code));
                            }
                            Ok(Some(Ok(_))) | Err(_) => {}
                            Ok(_) => break,
                        }
                    }
                    // Each of the 20 connections also receives the copies of the other 19's
                    // messages (the sender's other devices). One that falls behind on them (this
                    // machine's two cores also run both nodes, Redis and the other 21 clients) is
                    // closed as a slow consumer (4008), as documented, and its client would
                    // resend what was unanswered; any other end is a failure.
                    match closed {
                        Some(4008) => println!("flood connection {i}: closed with 4008 after {replies} answers to {n} sends"),
                        _ => assert_eq!(replies, n, "an answer to every send (closed: {closed:?})"),
                    }
                    // `unavailable` is a right answer when this machine starves Redis of CPU.
                    let wrong: Vec<&Value> = other
                        .iter()
                        .filter(|v| v["code"] != "unavailable")
                        .collect();
                    assert!(
                        wrong.is_empty(),
                        "answers other than ack, rate_limited or unavailable: {wrong:?}"
                    );
                    (acked, limited)
                }));
            }
            let mut all = (Vec::new(), 0);
            for t in tasks {
                let (acked, limited) = t.await.expect("flood connection");
                all.0.extend(acked);
                all.1 += limited;
            }
            all
        }
    });

    // Meanwhile Alice and Bob chat, one message every 100 ms.
    let (mut alice_ws, _) = connect(&a, &alice).await;
    let (mut bob_ws, _) = connect(&b, &bob).await;
    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        let started = tokio::time::Instant::now();
        let id = format!("pair-{i}");
        send_json(&mut alice_ws, send_frame(&id, bob.id, "still here")).await;
        let ack = recv_until(&mut alice_ws, |f| f["id"] == id.as_str()).await;
        assert_eq!(ack.last().expect("ack")["type"], "ack", "{ack:?}");
        recv_until(&mut bob_ws, |f| f["type"] == "message").await;
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut acked, limited) = flood.await.expect("flood");
    println!(
        "flood: {} acked, {limited} rate_limited; the pair's slowest round trip {slowest:?}",
        acked.len()
    );
    assert!(limited > 0, "the account was told rate_limited");
    assert!(
        !acked.is_empty() && acked.len() <= 800,
        "{} acked: at most two windows of 200, each passed by at most 200",
        acked.len()
    );
    assert!(
        slowest < Duration::from_secs(1),
        "the pair waited {slowest:?}"
    );
    let grown = used_memory().await - memory_before;
    assert!(grown < 16 << 20, "Redis grew by {grown} bytes");

    // The worker drains the flood into Postgres (the tails keep only the newest 512 KiB of each
    // conversation); then history holds every acked message once.
    acked.sort_unstable();
    let conversation = chat_core::conversation::direct_conversation_id(flooder.id, sink.id);
    let worker = cluster.start_worker_on(&redis.url);
    let db = chat_core::testing::connect(&cluster.db_url).await;
    let drained = chat_core::testing::eventually(Duration::from_secs(20), || async {
        db.query_one(
            "SELECT count(*) FROM messages WHERE conversation_id = $1",
            &[&conversation],
        )
        .await
        .is_ok_and(|r| r.get::<_, i64>(0) >= acked.len() as i64)
    })
    .await;
    assert!(drained, "the worker stored the flood");
    let stored = all_history_seqs(a.http, &flooder.token, conversation).await;
    worker.cancel();
    assert_eq!(
        stored, acked,
        "every acked message stored once, nothing else"
    );
    let expected: Vec<i64> = (1..=stored.len() as i64).collect();
    let odd: Vec<&i64> = stored.iter().filter(|s| !expected.contains(s)).collect();
    assert!(
        odd.is_empty(),
        "gap-free, but {odd:?} of {} stored",
        stored.len()
    );
}

/// The provider's JWKS is read again when a token names a key we do not have (at most every
/// 2 s) and every `jwt_jwks_reload_secs`: a key added to the file works from its first token
/// after that, and a key removed stops working within a reload, with no restart.
#[actix_web::test]
async fn external_keys_rotate_without_a_restart() {
    let cluster = Cluster::new().await;
    let all: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("idp-jwks.json")).expect("jwks"))
            .expect("json");
    let only = |kid: &str| {
        json!({"keys": all["keys"].as_array().expect("keys").iter()
            .filter(|k| k["kid"] == kid).cloned().collect::<Vec<_>>()})
    };
    let path = std::env::temp_dir().join(format!("jwks-{}.json", Uuid::new_v4().simple()));
    let write = |jwks: &Value| std::fs::write(&path, jwks.to_string()).expect("write jwks");
    write(&only("rsa-1"));
    let idp = |node_id: &str, reload_secs: u64| {
        let mut config = cluster.config(node_id);
        config.jwt_jwks_path = Some(path.to_string_lossy().into_owned());
        config.jwt_external_issuer = Some(ISSUER.into());
        config.jwt_external_audience = Some(AUDIENCE.into());
        config.jwt_jwks_reload_secs = reload_secs;
        config
    };
    // One node reads the file only on demand (its periodic reload is an hour away), the other
    // every second.
    let node = cluster.start_with(idp("on-demand", 3600)).await;
    let periodic = cluster.start_with(idp("periodic", 1)).await;
    let now = gateway::auth::unix_now();
    let claims =
        json!({"sub": "rotor", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300});
    let rs = sign(
        Algorithm::RS256,
        Some("rsa-1"),
        &rsa_key("idp-rsa.der"),
        &claims,
    );
    let ec = EncodingKey::from_ec_der(&std::fs::read(fixture("idp-ec.der")).expect("fixture"));
    let es = sign(Algorithm::ES256, Some("ec-1"), &ec, &claims);
    assert_eq!(me(&node, &rs).await.0, 200);
    assert_eq!(me(&node, &es).await.0, 401, "ec-1 is not in the file yet");

    // The provider publishes ec-1: the first token naming it after the 2 s gap works.
    write(&all);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        me(&node, &es).await.0,
        200,
        "read again for the unknown key"
    );

    // The provider retires rsa-1: within a periodic reload its tokens stop working.
    assert_eq!(me(&periodic, &rs).await.0, 200);
    write(&only("ec-1"));
    let retired = chat_core::testing::eventually(Duration::from_secs(5), || {
        let (periodic, rs) = (&periodic, rs.clone());
        async move { me(periodic, &rs).await.0 == 401 }
    })
    .await;
    assert!(
        retired,
        "a key removed from the file is refused after a reload"
    );
    assert_eq!(me(&periodic, &es).await.0, 200);
    // A file that does not load keeps the keys in use.
    std::fs::write(&path, "not json").expect("write");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        me(&periodic, &es).await.0,
        200,
        "a broken file changes nothing"
    );
    let _ = std::fs::remove_file(&path);
}

/// The shared counters every limit stands on, against this run's Redis (the cluster rerun uses a
/// Redis Cluster): adds and peeks of keys in many slots at once answer each key's own count,
/// where a pipeline of them once crossed slots, failed, and let login limits fail open.
#[actix_web::test]
async fn shared_counters_count_keys_in_many_slots_at_once() {
    use chat_core::counters::{CounterKey, Counters};

    let redis = chat_core::redis_conn::Commands::open(&test_redis_target(), None).expect("redis");
    let counters = chat_core::counters::redis::RedisCounters::new(
        redis,
        test_keys(&chat_core::testing::unique_prefix()),
    );
    let window = Duration::from_secs(60);
    let keys: Vec<CounterKey> = (0..12)
        .map(|i| CounterKey::login_failed_email(&format!("user{i}@example.test")))
        .collect();
    let adds: Vec<(CounterKey, u64)> = keys
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, k)| (k, i as u64 + 1))
        .collect();
    assert_eq!(
        counters.add_many(&adds, window).await.expect("add"),
        (1..=12).collect::<Vec<u64>>()
    );
    assert_eq!(
        counters.add_many(&adds, window).await.expect("add again"),
        (1..=12).map(|n| 2 * n).collect::<Vec<u64>>()
    );
    let mut peeked = keys.clone();
    peeked.push(CounterKey::login_failed_email("nobody@example.test"));
    let mut expected: Vec<u64> = (1..=12).map(|n| 2 * n).collect();
    expected.push(0);
    assert_eq!(counters.peek(&peeked).await.expect("peek"), expected);
}
