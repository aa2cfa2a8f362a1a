//! The internal HTTP server both binaries run on their own port: `/healthz` (alive),
//! `/readyz` (serving, dependencies reachable, health flags up) and `/metrics` (Prometheus text).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use prometheus::{Encoder, TextEncoder};

/// How long one readiness probe of a dependency may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

const STARTING: u8 = 0;
const SERVING: u8 = 1;
const DRAINING: u8 = 2;

/// Where the process is in its life. Readiness is green only while serving: not while it still
/// migrates or connects (starting), nor once shutdown began (draining).
#[derive(Clone, Default)]
pub struct Lifecycle(Arc<AtomicU8>);

impl Lifecycle {
    /// Everything is up: take traffic.
    pub fn serving(&self) {
        self.0.store(SERVING, Ordering::Relaxed);
    }

    /// Shutdown began: stop taking traffic. Never goes back to serving.
    pub fn draining(&self) {
        self.0.store(DRAINING, Ordering::Relaxed);
    }

    /// The failing check's name, unless serving.
    fn failing(&self) -> Option<&'static str> {
        match self.0.load(Ordering::Relaxed) {
            STARTING => Some("starting"),
            SERVING => None,
            _ => Some("draining"),
        }
    }
}

/// A health flag owned by another part of the process (for example the gateway's pub/sub
/// connection); readiness fails under `name` while it is false.
pub type HealthFlag = (&'static str, Arc<AtomicBool>);

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub redis: deadpool_redis::Pool,
    pub postgres: deadpool_postgres::Pool,
    pub lifecycle: Lifecycle,
    pub flags: Vec<HealthFlag>,
}

impl Readiness {
    /// Names of the failing checks; empty when ready.
    pub async fn failing(&self) -> Vec<&'static str> {
        let mut failing: Vec<&'static str> = self.lifecycle.failing().into_iter().collect();
        for (name, healthy) in &self.flags {
            if !healthy.load(Ordering::Relaxed) {
                failing.push(name);
            }
        }
        let (redis_ok, pg_ok) = tokio::join!(self.redis_ok(), self.postgres_ok());
        if !redis_ok {
            failing.push("redis");
        }
        if !pg_ok {
            failing.push("postgres");
        }
        failing
    }

    async fn redis_ok(&self) -> bool {
        let probe = async {
            let mut conn = self.redis.get().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, probe).await,
            Ok(Some(_))
        )
    }

    async fn postgres_ok(&self) -> bool {
        let probe = async {
            let client = self.postgres.get().await.ok()?;
            client.simple_query("SELECT 1").await.ok()
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, probe).await,
            Ok(Some(_))
        )
    }
}

struct AdminState {
    registry: prometheus::Registry,
    readiness: Readiness,
    /// 1 when `/readyz` would answer 200; evaluated on every probe and every scrape.
    ready: prometheus::IntGauge,
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let failing = state.readiness.failing().await;
    state.ready.set(i64::from(failing.is_empty()));
    if failing.is_empty() {
        HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))
    } else {
        HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"status": "not_ready", "failing": failing}))
    }
}

async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    let ready = state.readiness.failing().await.is_empty();
    state.ready.set(i64::from(ready));
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(buf),
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

/// Starts the admin server on `listener` (one worker thread; it serves probes and scrapes only).
/// Registers `ready_metric` (a gauge, 1 while ready) in `registry`.
pub fn serve(
    listener: std::net::TcpListener,
    registry: prometheus::Registry,
    readiness: Readiness,
    ready_metric: &str,
) -> std::io::Result<actix_web::dev::Server> {
    let ready = prometheus::IntGauge::new(ready_metric, "1 when /readyz answers 200, else 0")
        .map_err(std::io::Error::other)?;
    registry
        .register(Box::new(ready.clone()))
        .map_err(std::io::Error::other)?;
    let state = web::Data::new(AdminState {
        registry,
        readiness,
        ready,
    });
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run())
}
