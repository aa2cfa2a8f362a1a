//! The internal HTTP server both binaries run on their own port: `/healthz` (alive),
//! `/readyz` (serving, dependencies reachable, health flags up; dependencies the process can do
//! without for a while are reported as degraded, not failed) and `/metrics` (Prometheus text).

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

/// What `/readyz` checks: the lifecycle, then every probe (run concurrently). A failing probe
/// in `probes` makes the process not ready; one in `degraded` is only reported (in the body and
/// the degraded gauge): the process still does its main work without it, and taking every
/// replica out of the load balancer at once would make things worse.
#[derive(Clone)]
pub struct Readiness {
    pub lifecycle: Lifecycle,
    pub probes: Vec<Arc<dyn Probe>>,
    pub degraded: Vec<Arc<dyn Probe>>,
}

/// What `/readyz` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Names of the failing checks, in the probes' order; empty when ready.
    pub failing: Vec<&'static str>,
    /// Every degraded-only probe, with whether it fails.
    pub degraded: Vec<(&'static str, bool)>,
}

impl Readiness {
    /// Every check, the degraded-only ones too.
    pub async fn check(&self) -> Checked {
        let mut failing: Vec<&'static str> = self.lifecycle.failing().into_iter().collect();
        let (results, degraded) = tokio::join!(run_all(&self.probes), run_all(&self.degraded));
        failing.extend(results.into_iter().filter(|(_, ok)| !ok).map(|(n, _)| n));
        Checked {
            failing,
            degraded: degraded.into_iter().map(|(n, ok)| (n, !ok)).collect(),
        }
    }
}

/// Runs `probes` concurrently: each one's name and whether it is ready.
async fn run_all(probes: &[Arc<dyn Probe>]) -> Vec<(&'static str, bool)> {
    futures_util::future::join_all(
        probes
            .iter()
            .map(|p| async move { (p.name(), p.ready().await) }),
    )
    .await
}

struct AdminState {
    registry: prometheus::Registry,
    readiness: Readiness,
    /// 1 when `/readyz` would answer 200; evaluated on every probe and every scrape.
    ready: prometheus::IntGauge,
    /// 1 per degraded-only probe that fails (label `check`).
    degraded: prometheus::IntGaugeVec,
}

impl AdminState {
    /// Runs every check and updates the gauges.
    async fn check(&self) -> Checked {
        let checked = self.readiness.check().await;
        self.ready.set(i64::from(checked.failing.is_empty()));
        for (name, failing) in &checked.degraded {
            self.degraded
                .with_label_values(&[name])
                .set(i64::from(*failing));
        }
        checked
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let checked = state.check().await;
    let degraded: Vec<&str> = checked
        .degraded
        .iter()
        .filter(|(_, failing)| *failing)
        .map(|(n, _)| *n)
        .collect();
    let mut body = if checked.failing.is_empty() {
        serde_json::json!({"status": "ready"})
    } else {
        serde_json::json!({"status": "not_ready", "failing": checked.failing})
    };
    if !degraded.is_empty() {
        body["degraded"] = serde_json::json!(degraded);
    }
    if checked.failing.is_empty() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    state.check().await;
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(buf),
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

/// The names of the gauges the admin server registers.
#[derive(Debug, Clone, Copy)]
pub struct AdminMetrics {
    /// 1 while `/readyz` answers 200.
    pub ready: &'static str,
    /// Per `check`, 1 while a degraded-only probe fails.
    pub degraded: &'static str,
}

/// Starts the admin server on `listener` (one worker thread; it serves probes and scrapes only).
/// Registers the gauges `names` names in `registry`.
pub fn serve(
    listener: std::net::TcpListener,
    registry: prometheus::Registry,
    readiness: Readiness,
    names: AdminMetrics,
) -> std::io::Result<actix_web::dev::Server> {
    let ready = prometheus::IntGauge::new(names.ready, "1 when /readyz answers 200, else 0")
        .map_err(std::io::Error::other)?;
    let degraded = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            names.degraded,
            "1 while a dependency the process works without for a while is failing (check)",
        ),
        &["check"],
    )
    .map_err(std::io::Error::other)?;
    for probe in &readiness.degraded {
        degraded.with_label_values(&[probe.name()]).set(0);
    }
    registry
        .register(Box::new(ready.clone()))
        .map_err(std::io::Error::other)?;
    registry
        .register(Box::new(degraded.clone()))
        .map_err(std::io::Error::other)?;
    let state = web::Data::new(AdminState {
        registry,
        readiness,
        ready,
        degraded,
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
