//! The internal HTTP server both binaries run on their own port: `/healthz` (alive),
//! `/readyz` (serving, dependencies reachable, health flags up) and `/metrics` (Prometheus text).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};
use async_trait::async_trait;
use prometheus::{Encoder, TextEncoder};

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

/// One dependency or part of the process that readiness checks, under its name.
#[async_trait]
pub trait Probe: Send + Sync {
    /// The name `/readyz` lists when the probe fails (`redis`, `postgres`, `pubsub`).
    fn name(&self) -> &'static str;
    /// Whether it is ready now; a probe answers within about a second.
    async fn ready(&self) -> bool;
}

/// What `/readyz` checks: the lifecycle, then every probe (run concurrently).
#[derive(Clone)]
pub struct Readiness {
    pub lifecycle: Lifecycle,
    pub probes: Vec<Arc<dyn Probe>>,
}

impl Readiness {
    /// Names of the failing checks, in the probes' order; empty when ready.
    pub async fn failing(&self) -> Vec<&'static str> {
        let mut failing: Vec<&'static str> = self.lifecycle.failing().into_iter().collect();
        let results = futures_util::future::join_all(
            self.probes
                .iter()
                .map(|p| async move { (p.name(), p.ready().await) }),
        )
        .await;
        failing.extend(results.into_iter().filter(|(_, ok)| !ok).map(|(n, _)| n));
        failing
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
