//! The `drain` workload: a burst of messages appended straight to the stream (with the gateway's
//! own append script), then the persistence worker timed until its backlog is back to zero and
//! every message is in Postgres exactly once. With `--worker-pid` the worker is paused during
//! the burst, so the drain is measured from a full backlog.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_core::conversation::direct_conversation_id;
use chat_core::keys::{KeySchema, PERSISTENCE_GROUP};
use chat_core::log::redis::RedisLog;
use chat_core::log::{MessageLog, Retention};
use chat_core::message::NewMessage;
use chat_core::redis_conn::Commands;
use rand::Rng;
use serde::Serialize;
use uuid::Uuid;

use crate::identity::{new_users, seed_users};
use crate::procstat::{CpuMeter, Watched};
use crate::report;

#[derive(clap::Args)]
pub struct DrainArgs {
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The deployment's key prefix and partition count (`CHAT_REDIS_PREFIX`, `CHAT_REDIS_PARTITIONS`).
    #[arg(long, default_value = "chat")]
    prefix: String,
    #[arg(long, default_value_t = 8)]
    partitions: u16,
    /// The worker's Postgres; users are seeded there and the stored rows counted.
    #[arg(long)]
    database_url: String,
    /// Messages in the burst.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Conversations the burst is spread over (each a pair of users, as in a real chat).
    #[arg(long, default_value_t = 500)]
    conversations: usize,
    /// Appends in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Pause this worker (SIGSTOP) during the burst and resume it (SIGCONT) after.
    #[arg(long)]
    worker_pid: Option<u32>,
    /// Processes whose CPU use is reported, as `name=pid` (repeatable).
    #[arg(long = "watch")]
    watch: Vec<Watched>,
    /// Give up waiting for the drain after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    #[arg(long, default_value = "run")]
    label: String,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Serialize)]
pub struct DrainResult {
    label: String,
    count: u64,
    worker_paused_during_burst: bool,
    append_secs: f64,
    append_per_sec: f64,
    peak_backlog: u64,
    /// From the end of the burst (and the worker's resume, when it was paused) to a zero backlog.
    drain_secs: f64,
    /// From the start of the burst to a zero backlog.
    zero_backlog_after_secs: f64,
    /// Messages per second the worker stored from a full backlog (only when it was paused:
    /// a running worker keeps up with the burst, so its rate is the burst's).
    drain_per_sec: Option<f64>,
    stored: i64,
    cpu_percent_during_drain: BTreeMap<String, f64>,
    /// (seconds since the burst began, entries not yet acked by the worker)
    backlog_series: Vec<(f64, u64)>,
}

pub async fn run(args: DrainArgs) -> anyhow::Result<()> {
    if args.conversations == 0 {
        bail!("--conversations must be positive");
    }
    let users = new_users(args.conversations * 2);
    seed_users(&args.database_url, &users).await?;
    let pairs = pairs_of(&users);
    let keys = KeySchema::new(args.prefix.clone(), args.partitions);
    let client = redis::Client::open(args.redis_url.as_str()).context("redis url")?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;

    if let Some(pid) = args.worker_pid {
        signal(pid, "STOP")?;
    }
    let began = Instant::now();
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let keys = keys.clone();
        let conn = conn.clone();
        let sampling = sampling.clone();
        tokio::spawn(async move { sample_backlog(conn, keys, began, sampling).await })
    };
    let appended = append_load(
        &args.redis_url,
        &keys,
        &pairs,
        args.concurrency,
        Until::Count(args.count),
        args.body_bytes,
    )
    .await;
    let append_secs = began.elapsed().as_secs_f64();
    if let Some(pid) = args.worker_pid {
        signal(pid, "CONT")?;
    }
    let appended = appended?;
    eprintln!("loadgen: appended {appended} in {append_secs:.2}s; waiting for the drain");

    let cpu = CpuMeter::start(&args.watch);
    let drained_at = loop {
        let backlog = backlog(&mut conn, &keys).await?;
        if backlog == 0 {
            break began.elapsed().as_secs_f64();
        }
        if began.elapsed() > Duration::from_secs(args.timeout_secs) {
            bail!("backlog still {backlog} after {}s", args.timeout_secs);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu_percent = cpu.finish();
    sampling.cancel();
    let mut series = sampler.await.context("the backlog sampler failed")?;
    series.push((round2(drained_at), 0));
    let drain_secs = drained_at - append_secs;

    let (db, driver) = tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres")?;
    let driver = tokio::spawn(driver);
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM messages WHERE sender_id = ANY($1)",
            &[&users],
        )
        .await
        .context("counting stored messages")?
        .get(0);
    drop(db);
    let _ = driver.await;

    let result = DrainResult {
        label: args.label,
        count: appended,
        worker_paused_during_burst: args.worker_pid.is_some(),
        append_secs: round2(append_secs),
        append_per_sec: (appended as f64 / append_secs).round(),
        peak_backlog: series.iter().map(|(_, b)| *b).max().unwrap_or(0),
        drain_secs: round2(drain_secs),
        zero_backlog_after_secs: round2(drained_at),
        drain_per_sec: args
            .worker_pid
            .map(|_| (appended as f64 / drain_secs.max(1e-3)).round()),
        stored,
        cpu_percent_during_drain: cpu_percent,
        backlog_series: series,
    };
    report::write(&args.out, "drain", result)
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// Entries not yet acked by the persistence group, over all partitions (lag + pending).
async fn backlog(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &KeySchema,
) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for p in 0..keys.partitions() {
        let reply: redis::streams::StreamInfoGroupsReply = match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(keys.stream(p))
            .query_async(conn)
            .await
        {
            Ok(r) => r,
            // No stream yet on this partition: nothing to drain there.
            Err(e) if e.to_string().contains("no such key") => continue,
            Err(e) => return Err(e).context("XINFO GROUPS"),
        };
        if let Some(g) = reply.groups.iter().find(|g| g.name == PERSISTENCE_GROUP) {
            total += (g.lag.unwrap_or(0) + g.pending) as u64;
        } else {
            total += redis::cmd("XLEN")
                .arg(keys.stream(p))
                .query_async::<u64>(conn)
                .await
                .context("XLEN")?;
        }
    }
    Ok(total)
}

async fn sample_backlog(
    mut conn: redis::aio::MultiplexedConnection,
    keys: KeySchema,
    began: Instant,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<(f64, u64)> {
    let mut series = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while series.len() < 100_000 {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Ok(b) = backlog(&mut conn, &keys).await {
            series.push((round2(began.elapsed().as_secs_f64()), b));
        }
    }
    series
}

/// The Postgres side of the log for a load that appends under a fresh prefix without Postgres:
/// nothing persisted, no earlier epoch, so counters start at 1 as on a new deployment.
struct NoPostgres;

#[async_trait::async_trait]
impl chat_core::log::SeqFloor for NoPostgres {
    async fn persisted_last_seq(&self, _: Uuid) -> Result<i64, chat_core::backend::BackendError> {
        Ok(0)
    }
    async fn open_epoch(
        &self,
        _: &str,
        _: u16,
        _: &str,
    ) -> Result<bool, chat_core::backend::BackendError> {
        Ok(false)
    }
    async fn mark_used(
        &self,
        _: &str,
        _: u16,
        _: &str,
    ) -> Result<(), chat_core::backend::BackendError> {
        Ok(())
    }
    async fn record_gap(
        &self,
        _: Uuid,
        _: i64,
        _: i64,
    ) -> Result<(), chat_core::backend::BackendError> {
        Ok(())
    }
}

/// When an append load stops.
#[derive(Clone, Copy)]
pub enum Until {
    Count(u64),
    Elapsed(Duration),
}

/// Users paired off: (0, 1), (2, 3), ...
pub fn pairs_of(users: &[Uuid]) -> Vec<(Uuid, Uuid)> {
    users.chunks_exact(2).map(|p| (p[0], p[1])).collect()
}

/// Appends messages in random `pairs` (either direction) with `concurrency` appends in flight,
/// until `until`; returns how many were appended.
pub async fn append_load(
    redis_url: &str,
    keys: &KeySchema,
    pairs: &[(Uuid, Uuid)],
    concurrency: usize,
    until: Until,
    body_bytes: usize,
) -> anyhow::Result<u64> {
    let redis = Commands::new(redis_url, None).context("redis url")?;
    let retention = Retention {
        // The drain benchmark fills partitions with the worker paused.
        max_backlog: i64::MAX as u64,
        ..Retention::default()
    };
    let log = RedisLog::new(redis, keys.clone(), retention, Arc::new(NoPostgres));
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    if pairs.is_empty() {
        bail!("no conversations to append to");
    }
    let pairs: Arc<Vec<(Uuid, Uuid)>> = Arc::new(pairs.to_vec());
    let deadline = match until {
        Until::Elapsed(d) => Some(Instant::now() + d),
        Until::Count(_) => None,
    };
    let body = "b".repeat(body_bytes.max(1));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (log, issued, done, pairs, body) = (
            log.clone(),
            issued.clone(),
            done.clone(),
            pairs.clone(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                match (until, deadline) {
                    (Until::Count(n), _) if i >= n => return Ok::<(), anyhow::Error>(()),
                    (_, Some(d)) if Instant::now() >= d => return Ok(()),
                    _ => {}
                }
                let (from, to) = {
                    let mut rng = rand::rng();
                    let (a, b) = pairs[rng.random_range(0..pairs.len())];
                    if rng.random_bool(0.5) {
                        (a, b)
                    } else {
                        (b, a)
                    }
                };
                let msg = NewMessage {
                    msg_id: Uuid::now_v7(),
                    conversation_id: direct_conversation_id(from, to),
                    from,
                    to: Some(to),
                    body: body.clone(),
                    ts: chat_core::now_ms(),
                    trace_parent: None,
                };
                log.append(&msg, &msg.msg_id.to_string(), Uuid::nil())
                    .await
                    .context("appending")?;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.context("an append task failed")??;
    }
    Ok(done.load(Ordering::Relaxed))
}
