//! The composition root: builds every service of one gateway node from its configuration, once,
//! in [`run`]; wires each to the few others it uses; serves until shutdown; then drains. No other
//! module wires services, and only `lib.rs` uses this one.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use async_trait::async_trait;
use chat_core::admin::{self, Lifecycle, Probe, Readiness};
use chat_core::counters::memory::MemoryCounters;
use chat_core::counters::redis::RedisCounters;
use chat_core::counters::Counters;
use chat_core::keys::KeySchema;
use chat_core::log::memory::MemoryLog;
use chat_core::log::redis::RedisLog;
use chat_core::log::{MessageLog, Retention};
use chat_core::presence::memory::MemoryPresence;
use chat_core::presence::redis::RedisPresence;
use chat_core::presence::PresenceStore;
use chat_core::pubsub::canary::{Canary, CanarySettings};
use chat_core::pubsub::memory::MemoryPubSub;
use chat_core::pubsub::redis::RedisPubSub;
use chat_core::pubsub::redis_cluster::RedisClusterPubSub;
use chat_core::pubsub::PubSub;
use chat_core::redis_conn::{Commands, RedisTarget};
use chat_core::store::lock::{BackendLock, LockMode};
use chat_core::store::Store;
use persistence_worker::consumer::{self as sink, ConsumerSettings};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::account_budget::AccountBudget;
use crate::auth::Auth;
use crate::authn::Authenticator;
use crate::config::{BackendKind, Validated};
use crate::delivery::Delivery;
use crate::directory::Directory;
use crate::history::History;
use crate::http::HttpSettings;
use crate::hub::{Hub, QueueBytes};
use crate::limits::{HandshakeLimiter, LoginLimiter, LoginLimits, RegistrationLimiter};
use crate::memory_guard::MemoryGuard;
use crate::metrics::Metrics;
use crate::notifier::{reset_requests, Notifier, ResetRequests};
use crate::passwords::Passwords;
use crate::presence::Presence;
use crate::ws::admission::Slots;
use crate::ws::{Services, WsSettings};
use crate::{api_error, web_client, ws, GatewayError, Listeners};

/// The roles a backend plays, and what it runs beside them.
struct Backend {
    log: Arc<dyn MessageLog>,
    pubsub: Arc<dyn PubSub>,
    presence: Arc<dyn PresenceStore>,
    counters: Arc<dyn Counters>,
    /// What readiness checks of the backend (the Redis connection).
    probes: Vec<Arc<dyn Probe>>,
    /// The shared Redis command connection (Redis only): the start-up durability check and the
    /// memory guard read `INFO` on it rather than open connections of their own.
    redis: Option<Commands>,
    /// The backend's own tasks (the pub/sub manager, the in-process sink), stopped after the
    /// connections have drained.
    tasks: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Redis: any number of nodes share one Redis.
    fn redis(
        config: &Validated,
        metrics: &Metrics,
        store: &Store,
        delivery: Arc<Delivery>,
        stop: CancellationToken,
    ) -> Result<Backend, GatewayError> {
        let cfg = &config.raw;
        let target = &config.redis_target;
        let keys = KeySchema::for_target(cfg.redis_prefix.clone(), cfg.redis_partitions, target);
        let redis = Commands::open(target, Some(metrics.redis()))?;
        let subscribe_timeout = Duration::from_millis(cfg.gateway_subscribe_timeout_ms);
        let canary = CanarySettings {
            every: Duration::from_millis(cfg.gateway_delivery_canary_interval_ms),
            timeout: Duration::from_millis(cfg.gateway_delivery_canary_timeout_ms),
        };
        let (pubsub, manager): (Arc<dyn PubSub>, _) = match target {
            RedisTarget::Single(_) => {
                let canary = Canary::new(keys.prefix(), canary, Some(metrics.canary()));
                let (pubsub, manager) = RedisPubSub::start(
                    redis.clone(),
                    keys.clone(),
                    delivery,
                    subscribe_timeout,
                    canary,
                    stop.clone(),
                );
                (Arc::new(pubsub), manager)
            }
            RedisTarget::Cluster(seeds) => {
                let (pubsub, manager) = RedisClusterPubSub::start(
                    seeds.clone(),
                    redis.clone(),
                    keys.clone(),
                    delivery,
                    subscribe_timeout,
                    canary,
                    Some(metrics.canary()),
                    stop.clone(),
                );
                (Arc::new(pubsub), manager)
            }
        };
        Ok(Backend {
            log: Arc::new(
                RedisLog::new(
                    redis.clone(),
                    keys.clone(),
                    retention(config),
                    Arc::new(store.clone()),
                )
                .with_durability(config.durability),
            ),
            pubsub,
            presence: Arc::new(RedisPresence::new(
                redis.clone(),
                keys.clone(),
                config.node_id.clone(),
                Duration::from_secs(cfg.presence_ttl_secs),
            )),
            counters: Arc::new(RedisCounters::new(redis.clone(), keys)),
            tasks: vec![
                manager,
                tokio::spawn(watch_cluster(redis.clone(), metrics.clone(), stop.clone())),
            ],
            probes: vec![Arc::new(redis.clone())],
            redis: Some(redis),
        })
    }

    /// This process: the log, pub/sub, presence and counters in memory, and the worker's
    /// consumer loop draining the log into Postgres in-process.
    fn memory(
        config: &Validated,
        metrics: &Metrics,
        store: &Store,
        delivery: Arc<Delivery>,
        stop: CancellationToken,
    ) -> Result<Backend, GatewayError> {
        let pubsub: Arc<dyn PubSub> = Arc::new(MemoryPubSub::new(
            delivery,
            Some(metrics.pubsub_subscriptions.clone()),
        ));
        let log = MemoryLog::new(store.clone(), pubsub.clone(), retention(config));
        let sink = sink::Context {
            log: Arc::new(log.clone()),
            store: store.clone(),
            settings: Arc::new(ConsumerSettings {
                consumer: format!("{}-in-process", config.node_id),
                batch_size: 500,
                block: Duration::from_secs(1),
                // Appends wait for the commit: no lingering.
                linger: Duration::ZERO,
                claim_idle: Duration::from_secs(30),
                claim_every: Duration::from_secs(60),
                trim_every: Duration::from_secs(10),
                retention: Duration::ZERO,
            }),
            metrics: persistence_worker::metrics::Metrics::register_in(metrics.registry.clone())?,
            shutdown: stop,
        };
        Ok(Backend {
            log: Arc::new(log),
            pubsub,
            presence: Arc::new(MemoryPresence::new(Duration::from_secs(
                config.raw.presence_ttl_secs,
            ))),
            counters: Arc::new(MemoryCounters::default()),
            probes: Vec::new(),
            redis: None,
            tasks: sink::spawn_all(&sink),
        })
    }
}

impl Backend {
    /// Stops the backend's tasks and waits for them.
    async fn stop(self, stop: &CancellationToken) {
        stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The admin server and its task.
struct Admin {
    handle: actix_web::dev::ServerHandle,
    task: JoinHandle<Result<(), std::io::Error>>,
}

impl Admin {
    async fn stop(self) {
        self.handle.stop(true).await;
        let _ = self.task.await;
    }
}

/// Readiness of the backend lock, taken once migrations have run (and taken again if its
/// connection drops).
#[derive(Default)]
struct LockProbe(std::sync::OnceLock<BackendLock>);

#[async_trait]
impl Probe for LockProbe {
    fn name(&self) -> &'static str {
        "backend_lock"
    }

    async fn ready(&self) -> bool {
        match self.0.get() {
            Some(lock) => lock.ready().await,
            None => false,
        }
    }
}

fn retention(config: &Validated) -> Retention {
    let cfg = &config.raw;
    Retention {
        tail_len: cfg.gateway_history_tail_len,
        tail_max_bytes: cfg.gateway_history_tail_max_bytes,
        tail_ttl_ms: cfg.gateway_history_tail_ttl_secs.saturating_mul(1000),
        dedup_window_ms: cfg.gateway_send_dedup_window_secs.saturating_mul(1000),
        max_backlog: cfg.redis_log_max_backlog,
    }
}

/// How often a node reads the Redis Cluster's shape for its gauges.
const CLUSTER_WATCH_EVERY: Duration = Duration::from_secs(5);

/// On a Redis Cluster, keeps the cluster gauges current until `stop` (the alerts on a shard
/// down or a master without a replica read them); on one instance, ends at once.
async fn watch_cluster(redis: Commands, metrics: Metrics, stop: CancellationToken) {
    if !redis.target().is_cluster() {
        return;
    }
    let mut tick = tokio::time::interval(CLUSTER_WATCH_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match redis.cluster_health().await {
            Ok(Some(h)) => {
                metrics.cluster_masters.set(h.masters);
                metrics
                    .cluster_masters_without_replica
                    .set(h.masters_without_replica);
                metrics.cluster_slots_uncovered.set(h.slots_uncovered);
            }
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "redis cluster shape unreadable"),
        }
    }
}

/// Refuses to start (with `required`; otherwise warns) on a Redis whose nodes would lose acked
/// messages: without `appendonly yes` (a restart loses what the AOF did not hold) or with a
/// `maxmemory-policy` other than `noeviction` (Redis would drop streams and counters to make
/// room). Waits, with backoff, until Redis answers or shutdown (readiness says `starting`).
async fn check_redis_durability(
    redis: &Commands,
    required: bool,
    shutdown: &CancellationToken,
) -> Result<(), GatewayError> {
    let mut backoff =
        chat_core::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let nodes = loop {
        match redis.node_info().await {
            Ok(nodes) if !nodes.is_empty() => break nodes,
            Ok(_) => tracing::warn!("redis durability not checked yet: no node answered"),
            Err(e) => tracing::warn!(error = %e, "redis durability not checked yet; retrying"),
        }
        if chat_core::shutdown::sleep_or_shutdown(backoff.next_delay(), shutdown).await {
            return Ok(());
        }
    };
    let problems: Vec<String> = nodes.iter().filter_map(|n| n.problem()).collect();
    if problems.is_empty() {
        tracing::info!(
            nodes = nodes.len(),
            "redis keeps acked messages: appendonly, noeviction"
        );
        return Ok(());
    }
    let problems = problems.join("; ");
    if required {
        return Err(GatewayError::UnsafeRedis(problems));
    }
    tracing::warn!(%problems, "redis would lose acked messages; starting anyway because redis_require_durability is false");
    Ok(())
}

/// Reloads every local user's rooms from Postgres every `every` until `shutdown`, and follows
/// with the subscriptions: a membership change whose event was lost (an add or a removal
/// published while this node's pub/sub was down, and not caught by the resync) takes effect
/// for delivery within `every`.
async fn reload_rooms_every(
    delivery: Arc<Delivery>,
    pubsub: Arc<dyn PubSub>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match delivery.reload_rooms().await {
            Ok(interest) => {
                if !interest.release.is_empty() {
                    tracing::info!(
                        rooms = interest.release.len(),
                        "room memberships reloaded: left rooms released"
                    );
                    pubsub.release(interest.release);
                }
                if !interest.subscribe.is_empty() {
                    if let Err(e) = pubsub.subscribe(interest.subscribe).await {
                        tracing::warn!(error = %e, "rooms found on reload not subscribed yet");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "room memberships not reloaded"),
        }
    }
}

/// Readiness of the pub/sub subscriptions.
struct PubSubProbe(Arc<dyn PubSub>);

#[async_trait]
impl Probe for PubSubProbe {
    fn name(&self) -> &'static str {
        "pubsub"
    }

    async fn ready(&self) -> bool {
        self.0.healthy()
    }
}

/// Every service a request or a connection uses, each built once. Handlers receive the ones
/// they name as `web::Data`; nothing receives the node.
struct Node {
    store: Store,
    metrics: Metrics,
    auth: Arc<Auth>,
    passwords: Arc<Passwords>,
    directory: Arc<Directory>,
    authenticator: Arc<Authenticator>,
    login_limiter: Arc<LoginLimiter>,
    registration_limiter: Arc<RegistrationLimiter>,
    presence: Arc<Presence>,
    history: Arc<History>,
    pubsub: Arc<dyn PubSub>,
    reset_requests: Arc<ResetRequests>,
    http: Arc<HttpSettings>,
    ws: Services,
    debug_echo: bool,
    /// The web client's Content-Security-Policy (its image sources are the avatar hosts).
    csp: Arc<str>,
}

impl Node {
    /// Registers every service and route of the public port on one app.
    fn configure(&self, app: &mut web::ServiceConfig) {
        app.app_data(web::Data::new(self.store.clone()))
            .app_data(web::Data::new(self.metrics.clone()))
            .app_data(web::Data::from(self.auth.clone()))
            .app_data(web::Data::from(self.passwords.clone()))
            .app_data(web::Data::from(self.directory.clone()))
            .app_data(web::Data::from(self.authenticator.clone()))
            .app_data(web::Data::from(self.login_limiter.clone()))
            .app_data(web::Data::from(self.registration_limiter.clone()))
            .app_data(web::Data::from(self.presence.clone()))
            .app_data(web::Data::from(self.history.clone()))
            .app_data(web::Data::from(self.pubsub.clone()))
            .app_data(web::Data::from(self.reset_requests.clone()))
            .app_data(web::Data::from(self.http.clone()))
            .app_data(web::Data::new(self.ws.clone()))
            .configure(crate::http::extractors)
            .route("/ws", web::get().to(ws::handshake::handshake))
            .configure(|app| web_client::routes(app, &self.csp))
            .configure(crate::http::routes);
        if self.debug_echo {
            app.route("/debug/echo", web::get().to(ws::echo::echo));
        }
    }
}

/// Runs one gateway node until `shutdown` is cancelled, then drains: readiness fails, every
/// connection is told to reconnect elsewhere (close 1001) and waited for, and the servers stop.
pub async fn run(
    config: Validated,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let cfg = config.raw.clone();
    let metrics = Metrics::new()?;
    let store = Store::connect(&cfg.database_url, cfg.gateway_pg_pool_size)?;
    let lifecycle = Lifecycle::default();
    let hub = Arc::new(Hub::new(
        metrics.clone(),
        QueueBytes {
            per_connection: cfg.gateway_outbound_queue_bytes,
            node: cfg.gateway_outbound_node_bytes,
        },
    ));
    let delivery = Arc::new(Delivery::new(hub.clone(), store.clone()));
    // The backend outlives the connections: it stops after they have drained.
    let backend_stop = CancellationToken::new();
    let build = match cfg.backend {
        BackendKind::Redis => Backend::redis,
        BackendKind::Memory => Backend::memory,
    };
    let backend = build(
        &config,
        &metrics,
        &store,
        delivery.clone(),
        backend_stop.clone(),
    )?;

    let lock = Arc::new(LockProbe::default());
    let mut probes: Vec<Arc<dyn Probe>> = vec![Arc::new(PubSubProbe(backend.pubsub.clone()))];
    probes.extend(backend.probes.iter().cloned());
    let postgres: Vec<Arc<dyn Probe>> = vec![Arc::new(store.clone()), lock.clone()];
    // On Redis, open connections and sends keep working without Postgres (logins, handshakes
    // and history answer 503): a Postgres blip degrades every node alike, and failing readiness
    // would only take them all out of the load balancer. In one-process mode Postgres is where
    // messages go, so it is required.
    let degraded = match cfg.backend {
        BackendKind::Redis => postgres,
        BackendKind::Memory => {
            probes.extend(postgres);
            Vec::new()
        }
    };
    // Readiness (failing with "starting") and metrics are served while we wait for the database.
    let admin_server = admin::serve(
        listeners.internal,
        metrics.registry.clone(),
        Readiness {
            lifecycle: lifecycle.clone(),
            probes,
            degraded,
        },
        crate::metrics::ADMIN_METRICS,
    )?;
    let admin = Admin {
        handle: admin_server.handle(),
        task: actix_web::rt::spawn(admin_server),
    };

    if !chat_core::store::migrate::migrate_until_done(&cfg.database_url, &shutdown).await {
        backend.stop(&backend_stop).await;
        admin.stop().await;
        return Ok(());
    }
    let mode = match cfg.backend {
        BackendKind::Redis => LockMode::Shared,
        BackendKind::Memory => LockMode::Exclusive,
    };
    if let Some(redis) = &backend.redis {
        let checked = check_redis_durability(redis, cfg.redis_require_durability, &shutdown).await;
        if let Err(e) = checked {
            backend.stop(&backend_stop).await;
            admin.stop().await;
            return Err(e);
        }
    }
    match BackendLock::take(&cfg.database_url, mode, backend_stop.clone()).await {
        Ok(taken) => {
            let _ = lock.0.set(taken);
        }
        Err(e) => {
            backend.stop(&backend_stop).await;
            admin.stop().await;
            return Err(e.into());
        }
    }

    let workers = if cfg.gateway_workers == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        cfg.gateway_workers
    };
    let mut auth = Auth::new(&config.jwt_secret, cfg.jwt_ttl_secs);
    let mut jwks_reloads = None;
    if let Some(external) = &config.external_jwt {
        let keys = Arc::new(
            crate::auth::ExternalKeys::load(&external.path, &external.issuer, &external.audience)
                .map_err(|e| GatewayError::Auth(e.to_string()))?,
        );
        jwks_reloads = Some(actix_web::rt::spawn(keys.clone().run(
            Duration::from_secs(cfg.jwt_jwks_reload_secs),
            shutdown.clone(),
        )));
        auth = auth.with_external(keys);
    }
    let auth = Arc::new(auth);
    let passwords = Arc::new(
        Passwords::new(if cfg.gateway_password_hash_concurrency == 0 {
            workers
        } else {
            cfg.gateway_password_hash_concurrency
        })?
        .counted(metrics.password_work.clone()),
    );
    let directory = Arc::new(Directory::new(
        store.clone(),
        backend.log.clone(),
        hub.clone(),
        Duration::from_secs(cfg.gateway_membership_recheck_secs),
        cfg.presence_visibility,
    ));
    let room_reloads = actix_web::rt::spawn(reload_rooms_every(
        delivery.clone(),
        backend.pubsub.clone(),
        Duration::from_secs(cfg.gateway_room_reload_secs),
        shutdown.clone(),
    ));
    // Stopped after the HTTP server and the presence tasks, so nobody is left without an answer.
    let lookups_stop = CancellationToken::new();
    let (lookups, serve_lookups) = crate::lookups::Lookups::new(
        store.clone(),
        crate::lookups::LookupLimits {
            rooms_per_user: cfg.gateway_max_rooms_per_user,
            audience_room_max_members: cfg.gateway_presence_room_max_members,
            audience_peers: crate::presence::MAX_DIRECT_PEERS,
        },
        &metrics.lookup_batch_size,
        lookups_stop.clone(),
    );
    let lookups_task = actix_web::rt::spawn(serve_lookups);
    let authenticator = Arc::new(Authenticator::new(
        auth.clone(),
        crate::ticket::Tickets::new(&config.jwt_secret),
        backend.counters.clone(),
        store.clone(),
        lookups.floors.clone(),
        directory.clone(),
    ));
    let presence = Arc::new(Presence::new(
        backend.presence.clone(),
        backend.pubsub.clone(),
        store.clone(),
        lookups.audiences,
        lookups.last_seen,
        hub.clone(),
        metrics.clone(),
    ));
    let history = Arc::new(History::new(
        backend.log.clone(),
        store.clone(),
        metrics.clone(),
    ));
    metrics
        .connections_limit
        .set(i64::try_from(cfg.gateway_max_connections).unwrap_or(i64::MAX));
    let tasks = TaskTracker::new();
    let account_budget = Arc::new(AccountBudget::new(
        backend.counters.clone(),
        cfg.gateway_account_send_rate_per_sec,
    ));
    let account_reports = actix_web::rt::spawn(account_budget.clone().run(shutdown.clone()));
    let memory_guard = Arc::new(MemoryGuard::new(cfg.redis_memory_refuse_ratio));
    let memory_watch = backend.redis.clone().map(|redis| {
        let (guard, metrics, stop) = (memory_guard.clone(), metrics.clone(), shutdown.clone());
        let every = Duration::from_millis(cfg.redis_memory_check_ms);
        actix_web::rt::spawn(async move { guard.watch(redis, metrics, every, stop).await })
    });
    let ws = Services {
        settings: Arc::new(WsSettings {
            node_id: config.node_id.clone(),
            allowed_origins: config.allowed_origins.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            trust_client_trace: cfg.otel_trust_client_context,
            heartbeat: Duration::from_secs(cfg.gateway_heartbeat_secs),
            client_timeout: Duration::from_secs(cfg.gateway_client_timeout_secs),
            max_frame_bytes: cfg.gateway_max_frame_bytes,
            outbound_queue: cfg.gateway_outbound_queue,
            max_connections_per_user: cfg.gateway_max_connections_per_user,
            max_rooms_per_user: cfg.gateway_max_rooms_per_user,
            send_rate_per_sec: cfg.gateway_send_rate_per_sec,
            frame_budget_per_sec: cfg.gateway_frame_budget_per_sec,
            account_send_rate_per_sec: cfg.gateway_account_send_rate_per_sec,
            max_body_bytes: cfg.gateway_max_body_bytes,
            max_watched_users: cfg.gateway_max_watched_users,
        }),
        metrics: metrics.clone(),
        slots: Arc::new(Slots::new(
            cfg.gateway_max_connections,
            metrics.connections_open.clone(),
        )),
        handshakes: Arc::new(HandshakeLimiter::new(cfg.gateway_handshakes_per_ip_per_sec)),
        account_budget: account_budget.clone(),
        memory_guard: memory_guard.clone(),
        authenticator: authenticator.clone(),
        hub: hub.clone(),
        pubsub: backend.pubsub.clone(),
        log: backend.log.clone(),
        directory: directory.clone(),
        history: history.clone(),
        presence: presence.clone(),
        store: store.clone(),
        rooms: lookups.rooms,
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    };
    let (reset_requests, reset_worker) = reset_requests(
        store.clone(),
        Notifier::from_config(cfg.password_reset_webhook_url.as_deref(), cfg.dev_mode)?,
        cfg.password_reset_ttl_secs,
        metrics.reset_requests.clone(),
    );
    let reset_worker = actix_web::rt::spawn(reset_worker.run(shutdown.clone()));
    let node = Arc::new(Node {
        store: store.clone(),
        metrics: metrics.clone(),
        auth,
        passwords,
        directory,
        authenticator,
        login_limiter: Arc::new(LoginLimiter::new(
            backend.counters.clone(),
            LoginLimits {
                per_email_ip: cfg.gateway_login_failures_per_email_ip,
                per_ip: cfg.gateway_login_failures_per_ip,
                slow_per_email: cfg.gateway_login_slow_after_failures,
                window: Duration::from_secs(cfg.gateway_login_window_secs),
            },
        )),
        registration_limiter: Arc::new(RegistrationLimiter::new(
            backend.counters.clone(),
            cfg.gateway_registrations_per_ip,
            cfg.gateway_registrations_total,
            Duration::from_secs(cfg.gateway_registration_window_secs),
        )),
        presence: presence.clone(),
        history,
        pubsub: backend.pubsub.clone(),
        reset_requests: Arc::new(reset_requests),
        http: Arc::new(HttpSettings {
            trusted_proxies: config.trusted_proxies.clone(),
            avatar_hosts: config.avatar_hosts.clone(),
            max_room_members: cfg.gateway_max_room_members,
            max_rooms_per_user: cfg.gateway_max_rooms_per_user,
        }),
        ws,
        debug_echo: cfg.gateway_debug_echo,
        csp: web_client::content_security_policy(&config.avatar_hosts).into(),
    });

    let tls = match &config.tls {
        Some(files) => {
            let (server_config, slot) = crate::tls::server_config(files)?;
            let watcher =
                actix_web::rt::spawn(crate::tls::watch(files.clone(), slot, shutdown.clone()));
            Some((server_config, watcher))
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    if node.debug_echo {
        tracing::warn!("gateway_debug_echo is on: /debug/echo echoes WebSocket frames without authentication; never in production");
    }
    let public_addr = listeners.public.local_addr()?;
    let app_node = node.clone();
    let server = HttpServer::new(move || {
        App::new()
            .configure(|app| app_node.configure(app))
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
        node_id = %config.node_id,
        public = %public_addr,
        scheme,
        workers,
        backend = ?cfg.backend,
        "gateway listening"
    );

    let heartbeats = actix_web::rt::spawn(presence.clone().run_heartbeats(
        Duration::from_secs(cfg.presence_heartbeat_secs),
        shutdown.clone(),
    ));
    lifecycle.serving();

    shutdown.cancelled().await;
    tracing::info!("draining");
    lifecycle.draining();
    // Connections saw the same token and are closing with 1001; wait for their tasks (and what
    // they started) within the grace period.
    tasks.close();
    let grace = Duration::from_secs(cfg.gateway_shutdown_grace_secs);
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            connections = node.ws.slots.open(),
            "grace period over with connections still open"
        );
    }
    server_handle.stop(true).await;
    let _ = server_task.await;
    let _ = heartbeats.await;
    let _ = reset_worker.await;
    let _ = account_reports.await;
    let _ = room_reloads.await;
    if let Some(reloads) = jwks_reloads {
        let _ = reloads.await;
    }
    if let Some(watch) = memory_watch {
        let _ = watch.await;
    }
    if let Some(watcher) = tls_watcher {
        let _ = watcher.await;
    }
    // Last of the node's tasks: requests, connections closing and presence sweeps use it.
    lookups_stop.cancel();
    let _ = lookups_task.await;
    backend.stop(&backend_stop).await;
    if let Some(lock) = lock.0.get() {
        lock.release().await;
    }
    admin.stop().await;
    tracing::info!("gateway stopped");
    Ok(())
}
