//! The chat gateway node: holds WebSocket connections, accepts messages into Redis, fans them out
//! through Redis pub/sub, and serves the HTTP API and the internal admin port.
//!
//! # Layout
//! - [`config`]: the one typed configuration, validated before anything binds.
//! - [`node`]: the composition root handlers share.
//! - [`session`]: one WebSocket connection (handshake, frame loop, heartbeats).
//! - [`inbound`]: a client's WebSocket frames, reassembled, with RFC 6455 close codes.
//! - [`echo`]: the WebSocket echo route for conformance tests (off unless configured).
//! - [`hub`]: local connections by user, bounded outbound queues.
//! - [`broker`]: Redis append script and the node's pub/sub subscriptions.
//! - [`accounts`]: register, login, `users/me`, recipient directory.
//! - [`conversations`]: membership directory, conversation list, history endpoint.
//! - [`history`]: a seq range merged from the Redis tail and Postgres.
//! - [`rooms`]: room creation and membership.
//! - [`web_client`]: the reference web client, embedded and served at `/`.
//! - [`limits`]: login attempts, handshakes per IP, connections per user.
//! - [`presence`]: who is online (Redis, TTL heartbeats, sweeper), users list, batch status.
//! - [`auth`]: argon2id and HS256 JWT.
//! - [`password_reset`]: forgot-password tokens, their notifier, revoking older tokens.
//! - [`api_error`]: JSON error responses.
//! - [`metrics`]: every `chat_gateway_*` metric.
//! - [`tls`]: native TLS on the public port, certificates reloaded when their files change.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod api_error;
pub mod auth;
pub mod broker;
pub mod config;
pub mod conversations;
pub mod echo;
pub mod history;
pub mod hub;
pub mod inbound;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod password_reset;
pub mod presence;
pub mod rooms;
pub mod session;
pub mod tls;
pub mod web_client;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use chat_core::admin::{self, Lifecycle, Readiness};
use chat_core::keys::KeySchema;
use chat_core::stream::Appender;
use tokio_util::sync::CancellationToken;

use crate::accounts::UserDirectory;
use crate::auth::Auth;
use crate::broker::Broker;
use crate::config::Validated;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::node::Node;

/// Largest JSON body the HTTP API accepts.
const MAX_JSON_BODY_BYTES: usize = 16 * 1024;
/// Largest JSON body the room endpoints accept (1,000 user ids with room to spare).
const MAX_ROOM_JSON_BODY_BYTES: usize = 64 * 1024;
/// Bound of the "recipient exists" cache.
const DIRECTORY_CACHE_USERS: usize = 100_000;

/// The gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Db(#[from] chat_core::db::DbError),
    #[error(transparent)]
    Redis(#[from] chat_core::redis_pool::RedisPoolError),
    #[error("broker: {0}")]
    Broker(#[from] broker::BrokerError),
    #[error("password hashing setup: {0}")]
    Auth(String),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("password reset notifier: {0}")]
    Notifier(#[from] reqwest::Error),
}

/// The two listening sockets, bound before `run` so tests can use port 0.
pub struct Listeners {
    pub public: TcpListener,
    pub internal: TcpListener,
}

impl Listeners {
    pub fn bind(config: &Validated) -> std::io::Result<Self> {
        Ok(Listeners {
            public: TcpListener::bind(config.listen)?,
            internal: TcpListener::bind(config.internal_listen)?,
        })
    }
}

/// Runs one gateway node until `shutdown` is cancelled, then drains: readiness fails, every
/// connection is told to reconnect elsewhere (close 1001), and the servers stop.
pub async fn run(
    config: Validated,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let cfg = config.raw.clone();
    let metrics = Metrics::new()?;
    let db = chat_core::db::pool(&cfg.database_url, cfg.gateway_pg_pool_size)?;
    let redis = chat_core::redis_pool::build(&cfg.redis_url, cfg.gateway_redis_pool_size)?;
    let lifecycle = Lifecycle::default();
    let keys = KeySchema::new(cfg.redis_prefix.clone(), cfg.redis_partitions);
    let hub = Arc::new(Hub::new(metrics.clone()));
    let appender = Appender::with_limits(
        keys,
        cfg.gateway_history_tail_len,
        cfg.gateway_history_tail_ttl_secs.saturating_mul(1000),
        cfg.gateway_send_dedup_window_secs.saturating_mul(1000),
    );
    let (broker, broker_task) = Broker::start(
        &cfg.redis_url,
        appender,
        hub.clone(),
        db.clone(),
        metrics.clone(),
        Duration::from_millis(cfg.gateway_subscribe_timeout_ms),
        shutdown.clone(),
    )?;

    // Readiness (failing with "starting") and metrics are served while we wait for the database.
    let admin_server = admin::serve(
        listeners.internal,
        metrics.registry.clone(),
        Readiness {
            redis: redis.clone(),
            postgres: db.clone(),
            lifecycle: lifecycle.clone(),
            flags: vec![("pubsub", broker.pubsub_up())],
        },
        metrics::READY_METRIC,
    )?;
    let admin_handle = admin_server.handle();
    let admin_task = actix_web::rt::spawn(admin_server);

    if !chat_core::db::migrate_until_done(&cfg.database_url, &shutdown).await {
        admin_handle.stop(true).await;
        let _ = admin_task.await;
        let _ = broker_task.await;
        return Ok(());
    }

    let mut auth = Auth::new(&config.jwt_secret, cfg.jwt_ttl_secs)
        .map_err(|e| GatewayError::Auth(e.to_string()))?;
    if let Some(external) = &config.external_jwt {
        let provider = external
            .provider()
            .map_err(|e| GatewayError::Auth(e.to_string()))?;
        auth = auth.with_external(provider);
    }
    let workers = if cfg.gateway_workers == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        cfg.gateway_workers
    };
    let public_addr = listeners.public.local_addr()?;
    let presence = presence::Presence::new(
        KeySchema::new(cfg.redis_prefix.clone(), cfg.redis_partitions),
        config.node_id.clone(),
        Duration::from_secs(cfg.presence_ttl_secs),
    );
    metrics
        .connections_limit
        .set(i64::try_from(cfg.gateway_max_connections).unwrap_or(i64::MAX));
    let node = web::Data::new(Node {
        config: Arc::new(config),
        auth,
        db,
        hub,
        broker,
        directory: UserDirectory::new(DIRECTORY_CACHE_USERS),
        conversations: conversations::Directory::new(DIRECTORY_CACHE_USERS),
        presence,
        handshakes: limits::HandshakeLimiter::new(cfg.gateway_handshakes_per_ip_per_sec),
        passwords: auth::PasswordPool::new(if cfg.gateway_password_hash_concurrency == 0 {
            workers
        } else {
            cfg.gateway_password_hash_concurrency
        })?,
        password_resets: password_reset::Notifier::from_config(
            cfg.password_reset_webhook_url.as_deref(),
            cfg.dev_mode,
        )?,
        metrics,
        shutdown: shutdown.clone(),
    });

    let tls = match &node.config.tls {
        Some(files) => {
            let (server_config, slot) = tls::server_config(files)?;
            let watcher = actix_web::rt::spawn(tls::watch(files.clone(), slot, shutdown.clone()));
            Some((server_config, watcher))
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let app_node = node.clone();
    let debug_echo = node.config.raw.gateway_debug_echo;
    if debug_echo {
        tracing::warn!("gateway_debug_echo is on: /debug/echo echoes WebSocket frames without authentication; never in production");
    }
    let server = HttpServer::new(move || {
        let app = App::new()
            .app_data(app_node.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(MAX_JSON_BODY_BYTES)
                    .error_handler(api_error::json_body_error),
            )
            .app_data(web::QueryConfig::default().error_handler(api_error::query_error));
        let app = if debug_echo {
            app.route("/debug/echo", web::get().to(echo::echo))
        } else {
            app
        };
        app.route("/ws", web::get().to(session::handshake))
            .configure(crate::web_client::routes)
            .service(
                web::scope("/api/v1")
                    .route("/auth/register", web::post().to(accounts::register))
                    .route("/auth/login", web::post().to(accounts::login))
                    .route("/users/me", web::get().to(accounts::me))
                    .route("/users/me", web::patch().to(accounts::update_me))
                    .route(
                        "/auth/password-reset/request",
                        web::post().to(password_reset::request),
                    )
                    .route(
                        "/auth/password-reset/confirm",
                        web::post().to(password_reset::confirm),
                    )
                    .route("/users", web::get().to(presence::list_users))
                    .route("/presence", web::get().to(presence::batch))
                    .route("/conversations", web::get().to(conversations::list))
                    .route(
                        "/conversations/{id}/messages",
                        web::get().to(conversations::messages),
                    )
                    .service(
                        // Up to 1,000 user ids per request need more than the default limit.
                        web::scope("/rooms")
                            .app_data(
                                web::JsonConfig::default()
                                    .limit(MAX_ROOM_JSON_BODY_BYTES)
                                    .error_handler(api_error::json_body_error),
                            )
                            .route("", web::post().to(rooms::create))
                            .route("/{id}", web::get().to(rooms::show))
                            .route("/{id}/members", web::post().to(rooms::add_members))
                            .route(
                                "/{id}/members/{user_id}",
                                web::delete().to(rooms::remove_member),
                            ),
                    ),
            )
            .default_service(web::to(api_error::not_found))
    })
    .workers(workers)
    // Acks and deliveries are small writes; Nagle would hold them for the peer's delayed ACK.
    .tcp_nodelay(true)
    .disable_signals()
    .shutdown_timeout(1);
    let (server, tls_watcher) = match tls {
        Some((server_config, watcher)) => (
            server.listen_rustls_0_23(listeners.public, server_config)?,
            Some(watcher),
        ),
        None => (server.listen(listeners.public)?, None),
    };
    let server = server.run();
    let server_handle = server.handle();
    let server_task = actix_web::rt::spawn(server);
    tracing::info!(
        node_id = %node.config.node_id,
        public = %public_addr,
        scheme,
        workers,
        "gateway listening"
    );

    let heartbeats = actix_web::rt::spawn(presence::run_heartbeats(node.clone(), shutdown.clone()));
    lifecycle.serving();

    shutdown.cancelled().await;
    tracing::info!("draining");
    lifecycle.draining();
    // Sessions saw the same token and are closing with 1001; wait for them within the grace.
    let grace = Duration::from_secs(cfg.gateway_shutdown_grace_secs);
    let deadline = tokio::time::Instant::now() + grace;
    while node.metrics.connections_open.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server_handle.stop(true).await;
    let _ = server_task.await;
    let _ = heartbeats.await;
    if let Some(watcher) = tls_watcher {
        let _ = watcher.await;
    }
    admin_handle.stop(true).await;
    let _ = admin_task.await;
    let _ = broker_task.await;
    tracing::info!("gateway stopped");
    Ok(())
}
