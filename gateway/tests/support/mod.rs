//! Starts real gateway nodes (and a worker) in-process on 127.0.0.1:0 against the real Redis and
//! Postgres, and speaks the protocol to them as a client would.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway::config::GatewayConfig;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";

/// The backend a test deploys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Redis: any number of nodes.
    Redis,
    /// One process, no Redis (`CHAT_BACKEND=memory`): "two nodes" are one node reached twice.
    Memory,
}

/// Runs a test on both backends: the body, with `backend` in scope, becomes the test
/// `<name>::redis` and the test `<name>::memory`.
#[macro_export]
macro_rules! on_both_backends {
    ($(#[$meta:meta])* async fn $name:ident($backend:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$meta])*
            async fn case($backend: Backend) $body
            #[actix_web::test]
            async fn redis() {
                case(Backend::Redis).await
            }
            #[actix_web::test]
            async fn memory() {
                case(Backend::Memory).await
            }
        }
    };
}

/// One deployment under test: a database, a Redis prefix, a backend, and its nodes.
pub struct Cluster {
    pub db_url: String,
    pub prefix: String,
    pub backend: Backend,
}

pub struct NodeHandle {
    pub http: SocketAddr,
    pub internal: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: actix_web::rt::task::JoinHandle<Result<(), gateway::GatewayError>>,
}

impl Cluster {
    /// A deployment on Redis.
    pub async fn new() -> Self {
        Self::on(Backend::Redis).await
    }

    /// A deployment on `backend`.
    pub async fn on(backend: Backend) -> Self {
        Cluster {
            db_url: chat_core::testing::fresh_database().await,
            prefix: chat_core::testing::unique_prefix(),
            backend,
        }
    }

    pub fn config(&self, node_id: &str) -> GatewayConfig {
        GatewayConfig {
            backend: match self.backend {
                Backend::Redis => gateway::config::BackendKind::Redis,
                Backend::Memory => gateway::config::BackendKind::Memory,
            },
            redis_url: chat_core::testing::redis_url(),
            redis_cluster_urls: chat_core::testing::redis_cluster_urls(),
            database_url: self.db_url.clone(),
            redis_prefix: self.prefix.clone(),
            redis_partitions: 4,
            jwt_secret: Some(SECRET.into()),
            log_format: chat_core::telemetry::LogFormat::Text,
            gateway_listen: "127.0.0.1:0".into(),
            gateway_internal_listen: "127.0.0.1:0".into(),
            gateway_node_id: Some(node_id.into()),
            gateway_workers: 1,
            // Tests blast hundreds of sends from one connection; the limit has its own test.
            gateway_send_rate_per_sec: 100_000,
            gateway_account_send_rate_per_sec: 1_000_000,
            gateway_handshakes_per_ip_per_sec: 100_000,
            gateway_registrations_per_ip: 1_000_000,
            avatar_hosts: "cdn.example.com".into(),
            // The shared test Redis runs without AOF; the check itself is tested on its own.
            redis_require_durability: false,
            gateway_registrations_total: 1_000_000,
            ..GatewayConfig::default()
        }
    }

    /// [`Self::config`] on the single Redis at `redis_url` (an instance of the test's own),
    /// whatever this run's Redis is.
    pub fn config_on(&self, node_id: &str, redis_url: &str) -> GatewayConfig {
        GatewayConfig {
            redis_url: redis_url.to_string(),
            redis_cluster_urls: String::new(),
            ..self.config(node_id)
        }
    }

    pub async fn start_node(&self, node_id: &str) -> NodeHandle {
        self.start_with(self.config(node_id)).await
    }

    pub async fn start_with(&self, config: GatewayConfig) -> NodeHandle {
        let node = spawn_node(config);
        let internal = node.internal;
        let ready = chat_core::testing::eventually(Duration::from_secs(15), || async move {
            matches!(reqwest::get(format!("http://{internal}/readyz")).await, Ok(r) if r.status() == 200)
        })
        .await;
        assert!(ready, "node at {} did not become ready", node.http);
        node
    }

    /// Two ready nodes and two registered users, Alice and Bob, on Redis.
    pub async fn two_nodes() -> (Cluster, NodeHandle, NodeHandle, User, User) {
        Self::two_nodes_on(Backend::Redis).await
    }

    /// Two ready nodes (on `Memory`, one node reached twice) and two registered users, Alice
    /// and Bob.
    pub async fn two_nodes_on(backend: Backend) -> (Cluster, NodeHandle, NodeHandle, User, User) {
        let cluster = Cluster::on(backend).await;
        let (a, b) = cluster
            .start_pair(cluster.config("node-a"), cluster.config("node-b"))
            .await;
        let alice = register(&a, "alice").await;
        let bob = register(&b, "bob").await;
        (cluster, a, b, alice, bob)
    }

    /// Starts two nodes with these configurations; on `Memory`, the first alone, reached twice.
    pub async fn start_pair(
        &self,
        first: GatewayConfig,
        second: GatewayConfig,
    ) -> (NodeHandle, NodeHandle) {
        let a = self.start_with(first).await;
        let b = match self.backend {
            Backend::Redis => self.start_with(second).await,
            Backend::Memory => a.alias(),
        };
        (a, b)
    }

    /// Starts a persistence worker in-process against this deployment. On `Memory` the node
    /// drains its own log into Postgres and there is nothing to start.
    pub fn start_worker(&self) -> CancellationToken {
        self.start_worker_with(
            &chat_core::testing::redis_url(),
            &chat_core::testing::redis_cluster_urls(),
        )
    }

    /// Starts a persistence worker in-process against this deployment's log on `redis_url`.
    pub fn start_worker_on(&self, redis_url: &str) -> CancellationToken {
        self.start_worker_with(redis_url, "")
    }

    fn start_worker_with(&self, redis_url: &str, cluster_urls: &str) -> CancellationToken {
        if self.backend == Backend::Memory {
            return CancellationToken::new();
        }
        let config = persistence_worker::config::WorkerConfig {
            redis_url: redis_url.into(),
            redis_cluster_urls: cluster_urls.into(),
            database_url: self.db_url.clone(),
            redis_prefix: self.prefix.clone(),
            redis_partitions: 4,
            worker_internal_listen: "127.0.0.1:0".into(),
            worker_consumer_name: Some(format!("w-{}", Uuid::new_v4().simple())),
            worker_block_ms: 200,
            ..Default::default()
        }
        .validate()
        .expect("valid worker config");
        let listener = std::net::TcpListener::bind(config.internal_listen).expect("bind");
        let token = CancellationToken::new();
        actix_web::rt::spawn(persistence_worker::run(config, listener, token.clone()));
        token
    }
}

impl NodeHandle {
    /// Another handle to the same node (its task stays with the first handle).
    pub fn alias(&self) -> NodeHandle {
        NodeHandle {
            http: self.http,
            internal: self.internal,
            shutdown: self.shutdown.clone(),
            task: actix_web::rt::spawn(async { Ok(()) }),
        }
    }
}

/// Starts a node without waiting for it to be ready.
pub fn spawn_node(config: GatewayConfig) -> NodeHandle {
    let validated = config.validate().expect("valid test config");
    let listeners = gateway::Listeners::bind(&validated).expect("bind");
    let http = listeners.public.local_addr().expect("addr");
    let internal = listeners.internal.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let task = actix_web::rt::spawn(gateway::run(validated, listeners, shutdown.clone()));
    NodeHandle {
        http,
        internal,
        shutdown,
        task,
    }
}

/// A registered user.
#[derive(Clone, Debug)]
pub struct User {
    pub id: Uuid,
    pub token: String,
}

pub async fn register(node: &NodeHandle, name: &str) -> User {
    register_at(node.http, name).await
}

/// [`register`] at a node by address (a node running as its own process).
pub async fn register_at(addr: SocketAddr, name: &str) -> User {
    let email = format!("{name}-{}@example.test", Uuid::new_v4().simple());
    let resp = post_to(
        addr,
        "/api/v1/auth/register",
        json!({"name": name, "email": email, "password": "password123"}),
    )
    .await;
    assert_eq!(resp.0, 201, "register: {}", resp.1);
    user_from(&resp.1)
}

/// The user a register or login answer (`{"user": {...}, "token"}`) names.
pub fn user_from(body: &Value) -> User {
    User {
        id: body["user"]["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("user id"),
        token: body["token"].as_str().expect("token").to_string(),
    }
}

/// POSTs JSON; returns status and JSON body.
pub async fn post(node: &NodeHandle, path: &str, body: Value) -> (u16, Value) {
    post_to(node.http, path, body).await
}

/// [`post`] to a node by address.
pub async fn post_to(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    post_with(addr, path, &[], body).await
}

/// [`post_to`] with extra request headers.
pub async fn post_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    body: Value,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .json(&body);
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let resp = req.send().await.expect("http");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Opens a WebSocket with the token in the Authorization header and returns it after the hello.
pub async fn connect(node: &NodeHandle, user: &User) -> (Ws, Value) {
    connect_to(node.http, user).await
}

/// The `/ws` upgrade request of a node by address, with the user's token in the header.
pub fn ws_request(
    addr: SocketAddr,
    user: &User,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", user.token).parse().expect("header"),
    );
    req
}

/// [`connect`] to a node by address (a node running as its own process).
pub async fn connect_to(addr: SocketAddr, user: &User) -> (Ws, Value) {
    let req = ws_request(addr, user);
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    let hello = recv(&mut ws).await.expect("hello");
    assert_eq!(hello["type"], "hello");
    (ws, hello)
}

/// Connects `user` to a node by address, trying again until its `hello` comes within `within`
/// (a handshake may be refused while the node connects to Redis again).
pub async fn connect_eventually(addr: SocketAddr, user: &User, within: Duration) -> Ws {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never got in within {within:?}",
            user.id
        );
        if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(ws_request(addr, user)).await {
            if let Some(hello) = recv_within(&mut ws, Duration::from_secs(10)).await {
                if hello["type"] == "hello" {
                    return ws;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The next JSON text frame within 5 s, presence events left out (and pings, which the library
/// answers). Presence frames come unbidden whenever a contact of the connection's user comes or
/// goes: two users of a test become contacts with their first message, and a connection's
/// presence is recorded just after its hello, so one can land between a send and its ack. Tests
/// of presence read them with `recv_within` (presence.rs).
pub async fn recv(ws: &mut Ws) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = recv_within(ws, left).await?;
        if frame["type"] != "presence" {
            return Some(frame);
        }
    }
}

/// The frames other than presence events (see `recv`) that arrive on `ws` within `window`.
pub async fn frames_within(ws: &mut Ws, window: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + window;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match recv_within(ws, left).await {
            Some(frame) if frame["type"] == "presence" => {}
            Some(frame) => out.push(frame),
            None => return out,
        }
    }
}

/// Waits until `ws`'s connection handles frames: its presence is recorded by then (the gateway
/// joins presence after `hello` and before it reads the first frame: ws/connection.rs). An empty
/// `sync` is the probe: refused with `bad_request`, it changes nothing.
pub async fn presence_recorded(ws: &mut Ws) {
    send_json(ws, json!({"type": "sync", "conversations": []})).await;
    let frames = recv_until(ws, |f| f["type"] == "error").await;
    assert_eq!(
        frames.last().map(|f| f["code"].clone()),
        Some(json!("bad_request")),
        "the probe's answer: {frames:?}"
    );
}

/// Every frame on `ws` until a `resync` (the last one then) or until `within` passes.
pub async fn frames_until_resync(ws: &mut Ws, within: Duration) -> Vec<Value> {
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline
        && !frames.iter().any(|f: &Value| f["type"] == "resync")
    {
        if let Some(f) = recv_within(ws, Duration::from_millis(200)).await {
            frames.push(f);
        }
    }
    frames
}

/// `from` sends `to_user` a message with client id `id`; it is acked, and `to` has it live.
pub async fn delivered_live(from: &mut Ws, to: &mut Ws, to_user: Uuid, id: &str, body: &str) {
    send_json(from, send_frame(id, to_user, body)).await;
    recv_until(from, |f| f["type"] == "ack" && f["id"] == id).await;
    let live = recv_until(to, |f| f["type"] == "message").await;
    assert_eq!(live.last().expect("live")["body"], body);
}

/// `from` sends `to_user` their second message, "in the silence" (see
/// [`resynced_over_silence`]); returns its conversation once acked.
pub async fn sent_into_silence(from: &mut Ws, to_user: Uuid) -> Value {
    send_json(from, send_frame("2", to_user, "in the silence")).await;
    let ack = recv_until(from, |f| f["type"] == "ack").await;
    ack.last().expect("ack")["conversation_id"].clone()
}

/// After a message with seq 2 and body "in the silence" was sent to this connection's user over
/// a pub/sub link that delivered nothing: the connection gets `resync` within `within` (`why`
/// says what found the dead link) and not the message live, and has it by sync of
/// `conversation`.
pub async fn resynced_over_silence(ws: &mut Ws, conversation: &Value, within: Duration, why: &str) {
    let frames = frames_until_resync(ws, within).await;
    assert!(
        !frames.iter().any(|f| f["body"] == "in the silence"),
        "the frozen link delivered nothing: {frames:?}"
    );
    assert!(
        frames.iter().any(|f| f["type"] == "resync"),
        "{why} and the node told the user to resync: {frames:?}"
    );
    assert_eq!(
        sync_all(ws, conversation, 1).await,
        vec![2],
        "the message sent into the silence, by sync"
    );
}

pub async fn recv_within(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .ok()??
            .ok()?;
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).ok(),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

/// GETs `url` (with a bearer token when given); returns status and JSON body.
pub async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("http");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The close code the server sends next (frames before it are skipped), within 5 s.
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    let wait = async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(frame) = msg {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("closed in time")
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

pub fn send_frame(id: &str, to: Uuid, body: &str) -> Value {
    json!({"type": "send", "id": id, "to": to, "body": body})
}

/// A user inserted straight into the database with a token minted with the test secret: for
/// tests that need hundreds of users (registering hashes a password each time).
pub async fn quick_user(db: &tokio_postgres::Client, auth: &gateway::auth::Auth) -> User {
    let id = chat_core::testing::insert_user(db, "member").await;
    User {
        id,
        token: auth.issue(id, 0).expect("token"),
    }
}

/// Token issuing with the test secret.
pub fn test_auth() -> gateway::auth::Auth {
    gateway::auth::Auth::new(SECRET, 3600)
}

/// Sends an HTTP request with a bearer token and an optional JSON body; status and JSON body.
pub async fn call(
    method: reqwest::Method,
    node: &NodeHandle,
    path: &str,
    user: &User,
    body: Option<Value>,
) -> (u16, Value) {
    call_at(method, node.http, path, user, body).await
}

/// [`call`] to a node by address (a node running as its own process).
pub async fn call_at(
    method: reqwest::Method,
    addr: SocketAddr,
    path: &str,
    user: &User,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("http://{addr}{path}"))
        .bearer_auth(&user.token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("http");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Creates a room owned by `owner` with `members`; returns its id.
pub async fn create_room(node: &NodeHandle, owner: &User, members: &[Uuid]) -> Uuid {
    create_room_at(node.http, owner, members).await
}

/// [`create_room`] on a node by address.
pub async fn create_room_at(addr: SocketAddr, owner: &User, members: &[Uuid]) -> Uuid {
    let (status, body) = call_at(
        reqwest::Method::POST,
        addr,
        "/api/v1/rooms",
        owner,
        Some(json!({"name": "room", "member_ids": members})),
    )
    .await;
    assert_eq!(status, 201, "create room: {body}");
    body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("room id")
}

/// Frames until one matches `pred` (or 5 s pass); returns every frame read, the match last.
pub async fn recv_until(ws: &mut Ws, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut frames = Vec::new();
    while let Some(frame) = recv(ws).await {
        let done = pred(&frame);
        frames.push(frame);
        if done {
            break;
        }
    }
    frames
}

/// The value of one series (`name` or `name{labels}` exactly as exported) on a node's /metrics.
pub async fn metric(node: &NodeHandle, series: &str) -> Option<f64> {
    metric_at(node.internal, series).await
}

/// [`metric`] from a node's internal address (a node running as its own process).
pub async fn metric_at(internal: SocketAddr, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{internal}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A gateway running as its own process (to be killed or signalled); SIGKILLed when dropped.
pub struct NodeProcess {
    pub child: std::process::Child,
    pub http: SocketAddr,
    pub internal: SocketAddr,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    /// Sends SIGTERM, as Kubernetes does to a pod being replaced.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "SIGTERM sent");
    }
}

fn spare_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("spare port")
}

impl Cluster {
    /// Starts the real `gateway` binary for this deployment with extra `CHAT_*` settings, and
    /// waits until it is ready.
    pub async fn spawn_process(&self, node_id: &str, settings: &[(&str, &str)]) -> NodeProcess {
        let (http, internal) = (spare_addr(), spare_addr());
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"));
        command
            .env(
                "CHAT_BACKEND",
                match self.backend {
                    Backend::Redis => "redis",
                    Backend::Memory => "memory",
                },
            )
            .env("CHAT_REDIS_URL", chat_core::testing::redis_url())
            .env(
                "CHAT_REDIS_CLUSTER_URLS",
                chat_core::testing::redis_cluster_urls(),
            )
            .env("CHAT_DATABASE_URL", &self.db_url)
            .env("CHAT_REDIS_PREFIX", &self.prefix)
            .env("CHAT_REDIS_PARTITIONS", "4")
            .env("CHAT_JWT_SECRET", SECRET)
            .env("CHAT_GATEWAY_LISTEN", http.to_string())
            .env("CHAT_GATEWAY_INTERNAL_LISTEN", internal.to_string())
            .env("CHAT_GATEWAY_NODE_ID", node_id)
            .env("CHAT_GATEWAY_WORKERS", "1")
            .env("CHAT_GATEWAY_SEND_RATE_PER_SEC", "100000")
            .env("CHAT_GATEWAY_ACCOUNT_SEND_RATE_PER_SEC", "1000000")
            .env("CHAT_GATEWAY_HANDSHAKES_PER_IP_PER_SEC", "100000")
            .env("CHAT_GATEWAY_REGISTRATIONS_PER_IP", "1000000")
            .env("CHAT_REDIS_REQUIRE_DURABILITY", "false")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (key, value) in settings {
            command.env(key, value);
        }
        let node = NodeProcess {
            child: command.spawn().expect("spawn gateway"),
            http,
            internal,
        };
        let ready = chat_core::testing::eventually(Duration::from_secs(20), || async move {
            matches!(reqwest::get(format!("http://{internal}/readyz")).await, Ok(r) if r.status() == 200)
        })
        .await;
        assert!(ready, "the gateway process became ready");
        node
    }
}

/// The client's gap-free point: the highest seq with every seq from 1 up to it in `held`.
pub fn gap_free(held: &[i64]) -> i64 {
    let mut seqs = held.to_vec();
    seqs.sort_unstable();
    seqs.dedup();
    seqs.iter()
        .enumerate()
        .take_while(|(i, s)| **s == *i as i64 + 1)
        .count() as i64
}

/// Syncs one conversation from `after_seq` until `synced` says complete, as docs/protocol.md
/// tells clients to; returns the seqs of the `message` frames it got, in arrival order.
pub async fn sync_all(
    ws: &mut Ws,
    conversation: impl serde::Serialize,
    after_seq: i64,
) -> Vec<i64> {
    let conversation = json!(conversation);
    let mut after = after_seq;
    let mut got = Vec::new();
    loop {
        send_json(
            ws,
            json!({"type": "sync", "conversation_id": conversation, "after_seq": after}),
        )
        .await;
        let frames = recv_until(ws, |f| f["type"] == "synced").await;
        got.extend(
            frames
                .iter()
                .filter(|f| f["type"] == "message")
                .filter_map(|f| f["seq"].as_i64()),
        );
        let synced = frames.last().expect("synced");
        assert_eq!(synced["type"], "synced", "sync answered: {frames:?}");
        after = synced["last_seq"].as_i64().expect("last_seq");
        if synced["complete"] == true {
            return got;
        }
    }
}

/// A TCP proxy in front of `redis`, and the URL that goes through it.
pub async fn redis_proxy(redis: &OwnRedis) -> (chat_core::testing::Proxy, String) {
    let target = redis
        .url
        .trim_start_matches("redis://")
        .trim_end_matches('/');
    let proxy = chat_core::testing::Proxy::start(target.parse().expect("redis addr")).await;
    let url = format!("redis://{}", proxy.addr);
    (proxy, url)
}

/// A `redis-server` on a spare port, killed (SIGKILL) when dropped.
pub struct OwnRedis {
    child: std::process::Child,
    pub url: String,
}

impl OwnRedis {
    /// Without persistence.
    pub async fn start() -> Self {
        Self::start_on(spare_port(), None).await
    }

    /// On `port`; with `aof_dir`, it keeps an append-only file there, fsynced on every write
    /// (the setting docs/operations.md requires), and loads it when it starts.
    pub async fn start_on(port: u16, aof_dir: Option<&std::path::Path>) -> Self {
        Self::start_with(port, aof_dir, None).await
    }

    /// A replica of the Redis on `master_port`, on `port`, once its link to the master is up.
    pub async fn start_replica(port: u16, master_port: u16) -> Self {
        let redis = Self::start_with(port, None, Some(master_port)).await;
        let client = redis::Client::open(redis.url.as_str()).expect("url");
        let linked = chat_core::testing::eventually(Duration::from_secs(10), || {
            let client = client.clone();
            async move {
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                    return false;
                };
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                info.contains("master_link_status:up")
            }
        })
        .await;
        assert!(linked, "replica linked to its master");
        redis
    }

    async fn start_with(
        port: u16,
        aof_dir: Option<&std::path::Path>,
        master_port: Option<u16>,
    ) -> Self {
        let mut command = std::process::Command::new("redis-server");
        if let Some(master) = master_port {
            command.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        command.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]);
        match aof_dir {
            Some(dir) => command
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(dir),
            None => command.args(["--appendonly", "no"]),
        };
        let child = command
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).expect("url");
        let up = chat_core::testing::eventually(Duration::from_secs(10), || {
            let client = client.clone();
            async move {
                match client.get_multiplexed_async_connection().await {
                    // Up, and done loading its AOF.
                    Ok(mut conn) => redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        assert!(up, "own redis-server started");
        OwnRedis { child, url }
    }
}

pub fn spare_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("spare port")
        .port()
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every seq of `conversation`'s history, read page by page from the oldest as a client would
/// (following `next_after_seq`, which passes over skipped ranges).
pub async fn all_history_seqs(http: SocketAddr, token: &str, conversation: Uuid) -> Vec<i64> {
    let mut seqs = Vec::new();
    let mut after = 0;
    for _ in 0..20 {
        let (status, page) = get(
            &format!("http://{http}/api/v1/conversations/{conversation}/messages?after_seq={after}&limit=100"),
            Some(token),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        seqs.extend(
            page["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .filter_map(|m| m["seq"].as_i64()),
        );
        match page["next_after_seq"].as_i64() {
            Some(next) => after = next,
            None => return seqs,
        }
    }
    panic!("history did not end within 20 pages: {seqs:?}");
}

/// The Redis this run deploys on (one instance, or the cluster).
pub fn test_redis_target() -> chat_core::redis_conn::RedisTarget {
    chat_core::redis_conn::RedisTarget::from_settings(
        &chat_core::testing::redis_url(),
        &chat_core::testing::redis_cluster_urls(),
    )
}

/// The key schema of a deployment with `prefix` (4 partitions) on this run's Redis.
pub fn test_keys(prefix: &str) -> chat_core::keys::KeySchema {
    chat_core::keys::KeySchema::for_target(prefix, 4, &test_redis_target())
}

/// Runs one command on this run's Redis (routed by its key on a cluster).
pub async fn redis_query<T: redis::FromRedisValue + Send + 'static>(cmd: redis::Cmd) -> T {
    let redis = chat_core::redis_conn::Commands::open(&test_redis_target(), None).expect("redis");
    redis
        .run("test", |mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
        .expect("redis command")
}

/// Waits until `node` says it is ready.
pub async fn wait_ready(node: &NodeHandle) -> bool {
    let internal = node.internal;
    chat_core::testing::eventually(Duration::from_secs(15), || async move {
        matches!(reqwest::get(format!("http://{internal}/readyz")).await, Ok(r) if r.status() == 200)
    })
    .await
}

/// A Redis Cluster of this test's own (3 masters, 3 replicas; `deploy/redis-cluster.sh`) on
/// spare loopback ports, stopped and removed when dropped.
pub struct OwnCluster {
    pub base: u16,
    pub urls: String,
    dir: std::path::PathBuf,
}

impl OwnCluster {
    pub fn start() -> Self {
        // Below the kernel's ephemeral range (32768 and up here): a port checked free there can be
        // taken by any outgoing connection before redis-server binds it, the bus ports
        // (+10000) too. A start that still fails (a port taken since the check) tries elsewhere.
        let mut failures = Vec::new();
        let (base, dir) = loop {
            assert!(failures.len() < 3, "cluster started: {failures:#?}");
            let base = 10000 + (rand_u16() % 12700);
            let free = (base..base + 6)
                .flat_map(|p| [p, p + 10000])
                .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
            if !free {
                continue;
            }
            let dir =
                std::env::temp_dir().join(format!("chat-cluster-{}", Uuid::new_v4().simple()));
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/redis-cluster.sh");
            // Blocks this test's thread for the few seconds the cluster takes; nothing else runs yet.
            let out = std::process::Command::new("bash")
                .arg(script)
                .arg("start")
                .arg(base.to_string())
                .env("REDIS_CLUSTER_DIR", &dir)
                .output()
                .expect("deploy/redis-cluster.sh");
            if out.status.success() {
                break (base, dir);
            }
            failures.push(format!(
                "base {base}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            let _ = std::process::Command::new("bash")
                .arg(script)
                .arg("stop")
                .arg(base.to_string())
                .env("REDIS_CLUSTER_DIR", &dir)
                .output();
        };
        let urls = (base..base + 6)
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        OwnCluster { base, urls, dir }
    }

    /// The ports of the current masters and the slot ranges they own.
    pub async fn masters(&self) -> Vec<(u16, Vec<(u16, u16)>)> {
        let mut masters = Vec::new();
        for port in self.base..self.base + 6 {
            let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
                continue;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let Ok(nodes) = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async::<String>(&mut conn)
                .await
            else {
                continue;
            };
            for line in nodes.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 8 || !fields[2].contains("master") || fields[2].contains("fail") {
                    continue;
                }
                let Some(p) = fields[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse::<u16>().ok())
                else {
                    continue;
                };
                let ranges = fields[8..]
                    .iter()
                    .filter(|r| !r.starts_with('['))
                    .filter_map(|r| match r.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => r.parse().ok().map(|s| (s, s)),
                    })
                    .collect::<Vec<_>>();
                if !ranges.is_empty() {
                    masters.push((p, ranges));
                }
            }
            break;
        }
        masters.sort();
        masters
    }

    /// The master that owns `slot` now, if any (none while it fails over).
    pub async fn owner(&self, slot: u16) -> Option<u16> {
        self.masters()
            .await
            .into_iter()
            .find(|(_, ranges)| ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|(p, _)| p)
    }

    /// The master that owns `slot` now.
    pub async fn master_of(&self, slot: u16) -> u16 {
        self.owner(slot).await.expect("a master owns the slot")
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(port.to_string()).join("redis.pid"))
            .expect("pid file");
        let status = std::process::Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill");
        assert!(status.success(), "killed {port}");
    }

    /// Starts the node on `port` again (it rejoins the cluster from its own files).
    pub fn restart(&self, port: u16) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/redis-cluster.sh");
        let status = std::process::Command::new("bash")
            .arg(script)
            .arg("node")
            .arg(port.to_string())
            .arg(self.base.to_string())
            .env("REDIS_CLUSTER_DIR", &self.dir)
            .status()
            .expect("deploy/redis-cluster.sh node");
        assert!(status.success(), "node {port} started again");
    }

    /// Moves `slot` and its keys from the master on `from` to the one on `to`, as
    /// `redis-cli --cluster reshard` does for each slot: IMPORTING/MIGRATING, MIGRATE in
    /// batches, then the new owner announced to every master.
    pub async fn migrate_slot(&self, slot: u16, from: u16, to: u16) {
        let id = |port: u16| async move {
            let id: String = self.query(port, &["CLUSTER", "MYID"]).await;
            id
        };
        let (from_id, to_id) = (id(from).await, id(to).await);
        let slot_text = slot.to_string();
        let _: () = self
            .query(
                to,
                &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id],
            )
            .await;
        let _: () = self
            .query(
                from,
                &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id],
            )
            .await;
        loop {
            let keys: Vec<String> = self
                .query(from, &["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"])
                .await;
            if keys.is_empty() {
                break;
            }
            let to_port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let _: String = self.query(from, &args).await;
        }
        for (port, _) in self.masters().await {
            let _: () = self
                .query(port, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id])
                .await;
        }
    }

    /// Runs `args` on the node on `port` and returns its reply.
    /// Puts a [`chat_core::testing::Proxy`] in front of every node and has each node announce
    /// its proxy's port (its bus port stays its own), so that clients following the cluster's
    /// topology reach every node through a proxy the test can freeze. Returns the proxies and
    /// seed URLs through them, once every node reports the proxied topology.
    pub async fn behind_proxies(&self) -> (Vec<chat_core::testing::Proxy>, String) {
        let mut proxies = Vec::new();
        for port in self.base..self.base + 6 {
            let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let proxy = chat_core::testing::Proxy::start(target).await;
            let announce = proxy.addr.port().to_string();
            let bus = (port + 10000).to_string();
            let _: () = self
                .query(port, &["CONFIG", "SET", "cluster-announce-bus-port", &bus])
                .await;
            let _: () = self
                .query(port, &["CONFIG", "SET", "cluster-announce-port", &announce])
                .await;
            proxies.push(proxy);
        }
        let proxied: Vec<String> = proxies.iter().map(|p| p.addr.port().to_string()).collect();
        let everywhere = chat_core::testing::eventually(Duration::from_secs(15), || async {
            for port in self.base..self.base + 6 {
                let nodes: String = self.query(port, &["CLUSTER", "NODES"]).await;
                if !proxied.iter().all(|p| nodes.contains(&format!(":{p}@"))) {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(everywhere, "every node announces its proxy");
        let urls = proxies
            .iter()
            .map(|p| format!("redis://{}", p.addr))
            .collect::<Vec<_>>()
            .join(",");
        (proxies, urls)
    }

    pub async fn query<T: redis::FromRedisValue>(&self, port: u16, args: &[&str]) -> T {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("node");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await.expect("node command")
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/redis-cluster.sh");
        let _ = std::process::Command::new("bash")
            .arg(script)
            .arg("stop")
            .arg(self.base.to_string())
            .env("REDIS_CLUSTER_DIR", &self.dir)
            .status();
    }
}

fn rand_u16() -> u16 {
    (Uuid::new_v4().as_u128() % 65_536) as u16
}
