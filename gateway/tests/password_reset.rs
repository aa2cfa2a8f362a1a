//! Forgot password and profile against a real node: 202 for any email, a single-use expiring
//! token delivered by webhook, older tokens refused and open connections closed with 4101,
//! profile changes validated.

mod support;

use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use support::*;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// A webhook receiver on 127.0.0.1: every JSON body POSTed to `/hook` comes out of the channel.
fn webhook() -> (
    String,
    mpsc::UnboundedReceiver<Value>,
    actix_web::dev::ServerHandle,
) {
    slow_webhook(Duration::ZERO)
}

/// [`webhook`], answering each call after `delay`.
fn slow_webhook(
    delay: Duration,
) -> (
    String,
    mpsc::UnboundedReceiver<Value>,
    actix_web::dev::ServerHandle,
) {
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let server = HttpServer::new(move || {
        let tx = tx.clone();
        App::new().route(
            "/hook",
            web::post().to(move |body: web::Json<Value>| {
                let tx = tx.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(body.into_inner());
                    HttpResponse::NoContent().finish()
                }
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .expect("listen")
    .run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (url, rx, handle)
}

async fn login(node: &NodeHandle, email: &str, password: &str) -> u16 {
    post(
        node,
        "/api/v1/auth/login",
        json!({"email": email, "password": password}),
    )
    .await
    .0
}

on_both_backends! {
    /// The whole reset: request (same answer for unknown emails), token by webhook, confirm once,
    /// the old password and every older token refused, the open connection closed with 4101.
    async fn reset_password_revokes_older_tokens_everywhere(backend) {
        let (hook, mut notices, hook_server) = webhook();
        let cluster = Cluster::on(backend).await;
        let (a, b) = cluster
            .start_pair(
                gateway::config::GatewayConfig {
                    password_reset_webhook_url: Some(hook.clone()),
                    ..cluster.config("node-a")
                },
                cluster.config("node-b"),
            )
            .await;
        let email = format!("reset-{}@example.test", uuid::Uuid::new_v4().simple());
        let (status, body) = post(
            &a,
            "/api/v1/auth/register",
            json!({"name": "Rita", "email": email, "password": "old password"}),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let rita = user_from(&body);
        let (mut open_ws, _) = connect(&b, &rita).await;

        let request = |email: String| {
            let a = &a;
            async move {
                post(
                    a,
                    "/api/v1/auth/password-reset/request",
                    json!({"email": email}),
                )
                .await
            }
        };
        let (status, _) = request("nobody@example.test".into()).await;
        assert_eq!(status, 202, "unknown emails get the same answer");
        let (status, _) = request(email.to_uppercase()).await;
        assert_eq!(status, 202);
        let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
            .await
            .expect("webhook called")
            .expect("notice");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), notices.recv())
                .await
                .is_err(),
            "no notice for the unknown email"
        );
        assert_eq!(notice["type"], "password_reset");
        assert_eq!(notice["user_id"], rita.id.to_string());
        assert_eq!(notice["email"], email);
        let token = notice["token"].as_str().expect("token").to_string();
        assert_eq!(token.len(), 64);

        // Tokens are stored hashed, never as sent.
        let db = chat_core::testing::connect(&cluster.db_url).await;
        let stored: Vec<u8> = db
            .query_one("SELECT token_hash FROM password_resets", &[])
            .await
            .expect("row")
            .get(0);
        assert_ne!(stored, token.as_bytes());

        let confirm = |token: String, password: &'static str| {
            let b = &b;
            async move {
                post(
                    b,
                    "/api/v1/auth/password-reset/confirm",
                    json!({"token": token, "new_password": password}),
                )
                .await
            }
        };
        let (status, body) = confirm(token.clone(), "short").await;
        assert_eq!(status, 422);
        assert_eq!(
            body["error"]["fields"]["new_password"],
            "password_too_short"
        );
        // The token was not spent by the refused attempt; the second node confirms it, most
        // likely in the second the old token was issued in: versions, not seconds, revoke it.
        let (status, body) = confirm(token.clone(), "new password").await;
        assert_eq!(status, 204, "{body}");
        let (status, body) = confirm(token, "another password").await;
        assert_eq!(status, 422, "single use");
        assert_eq!(body["error"]["fields"]["token"], "token_invalid");

        assert_eq!(open_ws_close(&mut open_ws).await, Some(4101));
        let (status, _) = get(
            &format!("http://{}/api/v1/users/me", a.http),
            Some(&rita.token),
        )
        .await;
        assert_eq!(status, 401, "the old token is refused");
        assert_eq!(login(&a, &email, "old password").await, 401);
        assert_eq!(login(&b, &email, "new password").await, 200);
        hook_server.stop(false).await;
    }
}

/// Registers a user on `node` with `password`; returns it and its email.
async fn register_with_password(node: &NodeHandle, password: &str) -> (User, String) {
    let email = format!("reset-{}@example.test", uuid::Uuid::new_v4().simple());
    let (status, body) = post(
        node,
        "/api/v1/auth/register",
        json!({"name": "Rita", "email": email, "password": password}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let user = user_from(&body);
    (user, email)
}

/// The revocation's publish is lost on the node holding the stolen session (its Redis link is
/// cut while the reset happens elsewhere): when the link comes back the node re-checks its
/// users' tokens and closes the old session with 4101 within 10 s; a session opened with the
/// new password survives the next re-check.
///
/// Left out of the Redis Cluster pass (deploy/test.sh): it runs on a Redis of its own, the same in
/// both passes.
#[actix_web::test]
async fn a_revocation_lost_in_a_pubsub_gap_still_closes_the_old_session() {
    let redis = OwnRedis::start().await;
    let (proxy, proxied) = redis_proxy(&redis).await;
    let (hook, mut notices, hook_server) = webhook();
    let cluster = Cluster::new().await;
    let a = cluster
        .start_with(gateway::config::GatewayConfig {
            password_reset_webhook_url: Some(hook),
            ..cluster.config_on("node-a", &redis.url)
        })
        .await;
    let b = cluster
        .start_with(gateway::config::GatewayConfig {
            ..cluster.config_on("node-b", &proxied)
        })
        .await;
    let (rita, email) = register_with_password(&a, "old password").await;
    let (mut stolen, _) = connect(&b, &rita).await;

    let (status, _) = post(
        &a,
        "/api/v1/auth/password-reset/request",
        json!({"email": email}),
    )
    .await;
    assert_eq!(status, 202);
    let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
        .await
        .expect("webhook called")
        .expect("notice");
    let token = notice["token"].as_str().expect("token").to_string();

    // Node b loses Redis; the reset is confirmed on node a and published while b hears nothing.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = post(
        &a,
        "/api/v1/auth/password-reset/confirm",
        json!({"token": token, "new_password": "new password"}),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(msg)) = stolen.next().await {
            if let Message::Close(frame) = msg {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await;
    assert_eq!(
        closed.ok().flatten(),
        Some(4101),
        "the stolen session is closed"
    );

    // The owner's new session is not closed by the next re-check.
    let (status, body) = post(
        &a,
        "/api/v1/auth/login",
        json!({"email": email, "password": "new password"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let owner = User {
        id: rita.id,
        token: body["token"].as_str().expect("token").to_string(),
    };
    let (mut fresh, _) = connect(&b, &owner).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    let frames = recv_until(&mut fresh, |f| f["type"] == "resync").await;
    assert!(
        frames.iter().any(|f| f["type"] == "resync"),
        "the node reconnected and told the session to resync: {frames:?}"
    );
    send_json(&mut fresh, json!({"type": "sync", "conversations": []})).await;
    let answer = recv_within(&mut fresh, Duration::from_secs(3)).await;
    assert!(answer.is_some(), "the new session is still open");
    hook_server.stop(false).await;
}

async fn open_ws_close(ws: &mut Ws) -> Option<u16> {
    close_code(ws).await
}

on_both_backends! {
    /// An expired token is refused; a malformed one too.
    async fn expired_reset_tokens_are_refused(backend) {
        let (hook, mut notices, hook_server) = webhook();
        let cluster = Cluster::on(backend).await;
        let a = cluster
            .start_with(gateway::config::GatewayConfig {
                password_reset_webhook_url: Some(hook),
                password_reset_ttl_secs: 1,
                ..cluster.config("node-a")
            })
            .await;
        let email = format!("late-{}@example.test", uuid::Uuid::new_v4().simple());
        let (status, _) = post(
            &a,
            "/api/v1/auth/register",
            json!({"name": "Late", "email": email, "password": "old password"}),
        )
        .await;
        assert_eq!(status, 201);
        post(
            &a,
            "/api/v1/auth/password-reset/request",
            json!({"email": email}),
        )
        .await;
        let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
            .await
            .expect("webhook")
            .expect("notice");
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let (status, body) = post(
            &a,
            "/api/v1/auth/password-reset/confirm",
            json!({"token": notice["token"], "new_password": "new password"}),
        )
        .await;
        assert_eq!(
            (status, body["error"]["fields"]["token"].clone()),
            (422, json!("token_invalid"))
        );
        let (status, _) = post(
            &a,
            "/api/v1/auth/password-reset/confirm",
            json!({"token": "'; DROP TABLE users; --", "new_password": "new password"}),
        )
        .await;
        assert_eq!(status, 422);
        // A well-formed token nobody issued is refused before any password is hashed for it.
        let hashes = || metric(&a, "chat_gateway_password_work_total{op=\"hash\"}");
        let before = hashes().await;
        for _ in 0..5 {
            let (status, body) = post(
                &a,
                "/api/v1/auth/password-reset/confirm",
                json!({"token": "ab".repeat(32), "new_password": "new password"}),
            )
            .await;
            assert_eq!(
                (status, body["error"]["fields"]["token"].clone()),
                (422, json!("token_invalid"))
            );
        }
        assert_eq!(hashes().await, before, "no hash for an unknown token");
        assert_eq!(login(&a, &email, "old password").await, 200);
        hook_server.stop(false).await;
    }
}

on_both_backends! {
    /// Name and avatar change through `PATCH /users/me`, with validation; null removes the avatar;
    /// an avatar on a host not in `avatar_hosts` is refused, and the web client's CSP loads
    /// pictures from the listed hosts only.
    async fn profile_name_and_avatar(backend) {
        let (_cluster, a, _b, alice, _bob) = Cluster::two_nodes_on(backend).await;
        let patch = |body: Value| call(Method::PATCH, &a, "/api/v1/users/me", &alice, Some(body));
        let (status, me) = patch(json!({"avatar_url": "https://cdn.example.com/alice.png"})).await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["avatar_url"], "https://cdn.example.com/alice.png");
        assert_eq!(me["name"], "alice", "left out: unchanged");
        let (_, me) = patch(json!({"name": "  Alice Liddell "})).await;
        assert_eq!(me["name"], "Alice Liddell");
        assert_eq!(me["avatar_url"], "https://cdn.example.com/alice.png");
        let (status, body) = patch(json!({"name": "", "avatar_url": "javascript:alert(1)"})).await;
        assert_eq!(status, 422);
        assert_eq!(body["error"]["fields"]["name"], "name_required");
        assert_eq!(body["error"]["fields"]["avatar_url"], "avatar_url_invalid");
        let (status, body) = patch(json!({"avatar_url": "https://tracker.example/pixel.png"})).await;
        assert_eq!(status, 422);
        assert_eq!(body["error"]["fields"]["avatar_url"], "avatar_url_host_not_allowed");
        let page = reqwest::get(format!("http://{}/", a.http)).await.expect("page");
        let csp = page
            .headers()
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(csp.contains("img-src 'self' data: https://cdn.example.com;"), "{csp}");
        assert!(!csp.contains("https:;") && !csp.contains("https: "), "no wildcard: {csp}");
        let (_, me) = patch(json!({"avatar_url": null})).await;
        assert!(me["avatar_url"].is_null());
        let (status, _) = patch(json!({"email": "x@y.z"})).await;
        assert_eq!(status, 400, "unknown fields are refused");
        let (_, me) = call(Method::GET, &a, "/api/v1/users/me", &alice, None).await;
        assert_eq!(me["name"], "Alice Liddell");
    }
}

/// A reset request answers in the same time whether or not the email has an account, even when
/// the webhook takes 800 ms: the lookup, the token and the call happen after the answer. The
/// notice still arrives.
#[actix_web::test]
async fn reset_requests_take_the_same_time_for_known_and_unknown_emails() {
    let (hook, mut notices, hook_server) = slow_webhook(Duration::from_millis(800));
    let cluster = Cluster::new().await;
    let node = cluster
        .start_with(gateway::config::GatewayConfig {
            password_reset_webhook_url: Some(hook),
            ..cluster.config("node-a")
        })
        .await;
    let (_, email) = register_with_password(&node, "a password").await;
    let timed = |email: String| {
        let node = &node;
        async move {
            let started = std::time::Instant::now();
            let (status, _) = post(
                node,
                "/api/v1/auth/password-reset/request",
                json!({"email": email}),
            )
            .await;
            assert_eq!(status, 202);
            started.elapsed()
        }
    };
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..10 {
        known.push(timed(email.clone()).await);
        unknown.push(timed(format!("nobody-{i}@example.test")).await);
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[5], unknown[5]);
    let slowest = *known.last().expect("timed");
    println!("median known {k:?}, unknown {u:?}, slowest known {slowest:?}");
    assert!(
        slowest < Duration::from_millis(400),
        "a known email waited for the webhook: {known:?}"
    );
    assert!(
        k.abs_diff(u) < Duration::from_millis(50),
        "medians differ: known {k:?}, unknown {u:?}"
    );
    let notice = tokio::time::timeout(Duration::from_secs(10), notices.recv())
        .await
        .expect("a notice in time")
        .expect("notice");
    assert_eq!(notice["email"], email);
    hook_server.stop(false).await;
}
