//! The `ceiling` workload: Redis's own limit on our publish path. It runs the gateway's append
//! script (INCR, XADD, two PUBLISHes) as fast as Redis takes it, with no gateway in between, on a
//! throwaway key prefix that it deletes afterwards.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_core::keys::KeySchema;
use serde::Serialize;

use crate::drain::{append_load, pairs_of, Until};
use crate::identity::new_users;
use crate::procstat::{CpuMeter, Watched};
use crate::report;

#[derive(clap::Args)]
pub struct CeilingArgs {
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Appends in flight (over one multiplexed connection, as the gateway pipelines).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    #[arg(long, default_value_t = 8)]
    partitions: u16,
    /// Processes whose CPU use is reported, as `name=pid` (for example the Redis server).
    #[arg(long = "watch")]
    watch: Vec<Watched>,
    #[arg(long, default_value = "run")]
    label: String,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Serialize)]
pub struct CeilingResult {
    label: String,
    secs: f64,
    concurrency: usize,
    appends: u64,
    appends_per_sec: f64,
    cpu_percent: std::collections::BTreeMap<String, f64>,
}

pub async fn run(args: CeilingArgs) -> anyhow::Result<()> {
    let prefix = format!("ceiling{}", uuid::Uuid::new_v4().simple());
    let keys = KeySchema::new(prefix.clone(), args.partitions);
    let client = redis::Client::open(args.redis_url.as_str()).context("redis url")?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let pairs = pairs_of(&new_users(1000));
    let cpu = CpuMeter::start(&args.watch);
    let began = Instant::now();
    let appends = append_load(
        &args.redis_url,
        &keys,
        &pairs,
        args.concurrency,
        Until::Elapsed(Duration::from_secs(args.secs)),
        args.body_bytes,
    )
    .await?;
    let secs = began.elapsed().as_secs_f64();
    let cpu_percent = cpu.finish();

    // Remove what the run wrote.
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .context("SCAN")?;
        if !found.is_empty() {
            redis::cmd("UNLINK")
                .arg(&found)
                .query_async::<()>(&mut conn)
                .await
                .context("UNLINK")?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }

    let result = CeilingResult {
        label: args.label,
        secs: (secs * 100.0).round() / 100.0,
        concurrency: args.concurrency,
        appends,
        appends_per_sec: (appends as f64 / secs).round(),
        cpu_percent,
    };
    report::write(&args.out, "ceiling", result)
}
