//! The `conns` workload: hold as many idle connections against one server process as it allows
//! and report its resident memory per connection. The client side is spread over child processes
//! (each under its own descriptor limit) bound to different source addresses in 127.0.0.0/8.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::identity::{new_users, seed_users, TokenMint};
use crate::procstat::{fd_count, rss_bytes, CpuMeter, Watched};
use crate::proto::{Credentials, Incoming, Protocol};
use crate::report::{self, micros_histogram, Latency};

#[derive(clap::Args)]
pub struct ConnsArgs {
    #[arg(long, value_enum, default_value = "chat")]
    protocol: Protocol,
    /// The server, `ws://host:port`.
    #[arg(long)]
    url: String,
    /// Connections to open in all.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Child processes to spread them over (each has its own descriptor limit).
    #[arg(long, default_value_t = 2)]
    procs: usize,
    /// Handshakes in flight per child.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Child `i` connects from 127.0.0.(first_source + i).
    #[arg(long, default_value_t = 2)]
    first_source: u8,
    /// The secret the server verifies tokens with.
    #[arg(long, env = "LOADGEN_JWT_SECRET")]
    jwt_secret: String,
    #[command(flatten)]
    pusher: crate::proto::PusherArgs,
    /// The server process whose memory is measured.
    #[arg(long)]
    server_pid: u32,
    /// Our gateway's Postgres: the users are seeded there first (the gateway refuses tokens of
    /// users it does not know).
    #[arg(long)]
    database_url: Option<String>,
    /// Processes whose CPU use while the connections open is reported, as `name=pid` or
    /// `name=comm:NAME` (repeatable): the server, Postgres and Redis in a reconnect storm.
    #[arg(long = "watch")]
    watch: Vec<Watched>,
    /// Seconds to hold the connections before measuring memory.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// A name for this run in the results (for example `ours` or `socketio`).
    #[arg(long, default_value = "run")]
    label: String,
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct ShardArgs {
    #[arg(long, value_enum)]
    protocol: Protocol,
    #[arg(long)]
    url: String,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    concurrency: usize,
    #[arg(long)]
    source: IpAddr,
    /// A file with this child's user ids, one per line (seeded by the parent); new ids otherwise.
    #[arg(long)]
    users_file: Option<PathBuf>,
    #[arg(long, env = "LOADGEN_JWT_SECRET")]
    jwt_secret: String,
    #[command(flatten)]
    pusher: crate::proto::PusherArgs,
}

/// What a child reports once its connections are open.
#[derive(Serialize, Deserialize)]
struct ShardReport {
    opened: usize,
    failed: usize,
    handshake_us: Vec<u64>,
    errors: Vec<String>,
}

#[derive(Serialize)]
pub struct ConnsResult {
    label: String,
    protocol: Protocol,
    target: usize,
    opened: usize,
    failed: usize,
    procs: usize,
    connect_secs: f64,
    /// Connections opened per second while connecting.
    handshakes_per_sec: f64,
    handshake: Latency,
    /// Percent of one core each watched process used while the connections opened.
    cpu_percent_connecting: std::collections::BTreeMap<String, f64>,
    server_rss_before_bytes: u64,
    server_rss_held_bytes: u64,
    server_rss_after_close_bytes: u64,
    rss_per_conn_bytes: u64,
    server_fds_held: usize,
    sample_errors: Vec<String>,
}

pub async fn run(args: ConnsArgs) -> anyhow::Result<()> {
    if args.procs == 0 || args.count == 0 {
        bail!("--procs and --count must be positive");
    }
    let exe = std::env::current_exe().context("finding the loadgen binary")?;
    // Seeded users, one file per child (too many ids for an argument or a variable).
    let mut users_files = Vec::new();
    if let Some(url) = &args.database_url {
        let users = new_users(args.count);
        seed_users(url, &users).await?;
        let mut rest = users.as_slice();
        for i in 0..args.procs {
            let share = args.count / args.procs + usize::from(i < args.count % args.procs);
            let (mine, others) = rest.split_at(share);
            rest = others;
            let path =
                std::env::temp_dir().join(format!("loadgen-users-{}-{i}", std::process::id()));
            let text: String = mine.iter().map(|u| format!("{u}\n")).collect();
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            users_files.push(path);
        }
    }
    let rss_before = rss_bytes(args.server_pid)?;
    let cpu = CpuMeter::start(&args.watch);
    let started = Instant::now();
    let mut children = Vec::new();
    for i in 0..args.procs {
        let share = args.count / args.procs + usize::from(i < args.count % args.procs);
        let source = format!("127.0.0.{}", usize::from(args.first_source) + i);
        let mut command = tokio::process::Command::new(&exe);
        command.arg("conns-shard");
        if let Some(path) = users_files.get(i) {
            command.arg("--users-file").arg(path);
        }
        let child = command
            .args(["--protocol", protocol_arg(args.protocol)])
            .args(["--url", &args.url])
            .args(["--count", &share.to_string()])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args(["--source", &source])
            .env("LOADGEN_JWT_SECRET", &args.jwt_secret)
            .envs(args.pusher.to_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a conns-shard child")?;
        children.push(child);
    }

    let mut handshakes = micros_histogram();
    let (mut opened, mut failed, mut errors) = (0, 0, Vec::new());
    for child in &mut children {
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("child without stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await?;
        let shard: ShardReport = serde_json::from_str(&line)
            .with_context(|| format!("reading a child's report: {line:?}"))?;
        opened += shard.opened;
        failed += shard.failed;
        for us in shard.handshake_us {
            handshakes.saturating_record(us.max(1));
        }
        errors.extend(shard.errors);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let cpu_connecting = cpu.finish();
    eprintln!("loadgen: {opened} open, {failed} failed after {connect_secs:.1}s; holding");

    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let rss_held = rss_bytes(args.server_pid)?;
    let fds_held = fd_count(args.server_pid)?;

    // Closing a child's stdin tells it to drop its connections and exit.
    for child in &mut children {
        drop(child.stdin.take());
    }
    for child in &mut children {
        child.wait().await?;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_after_close = rss_bytes(args.server_pid)?;

    errors.truncate(5);
    let result = ConnsResult {
        label: args.label,
        protocol: args.protocol,
        target: args.count,
        opened,
        failed,
        procs: args.procs,
        connect_secs: (connect_secs * 100.0).round() / 100.0,
        handshakes_per_sec: (opened as f64 / connect_secs.max(1e-9)).round(),
        handshake: Latency::from_micros(&handshakes),
        cpu_percent_connecting: cpu_connecting,
        server_rss_before_bytes: rss_before,
        server_rss_held_bytes: rss_held,
        server_rss_after_close_bytes: rss_after_close,
        rss_per_conn_bytes: rss_held.saturating_sub(rss_before) / opened.max(1) as u64,
        server_fds_held: fds_held,
        sample_errors: errors,
    };
    // Children remove their file once read; this covers a child that failed before.
    for path in &users_files {
        let _ = std::fs::remove_file(path);
    }
    report::write(&args.out, "conns", result)
}

fn protocol_arg(p: Protocol) -> &'static str {
    match p {
        Protocol::Chat => "chat",
        Protocol::Socketio => "socketio",
        Protocol::Pusher => "pusher",
    }
}

pub async fn run_shard(args: ShardArgs) -> anyhow::Result<()> {
    let mint = TokenMint::new(&args.jwt_secret);
    let users = match &args.users_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            // A hand-over from the parent, read once.
            let _ = std::fs::remove_file(path);
            text.lines()
                .map(|l| l.parse::<uuid::Uuid>().context("a user id"))
                .collect::<anyhow::Result<Vec<_>>>()?
        }
        None => new_users(args.count),
    };
    let tokens = users
        .into_iter()
        .map(|u| mint.token(u))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stop = CancellationToken::new();
    let protocol = args.protocol;
    let url = args.url.as_str();
    let source = Some(args.source);
    let pusher_app = args.pusher.app();
    let pusher_app = pusher_app.as_ref();
    let results: Vec<Result<u64, String>> = futures_util::stream::iter(tokens)
        .map(|token| {
            let stop = stop.clone();
            async move {
                let began = Instant::now();
                let credentials = Credentials {
                    token: &token,
                    pusher: pusher_app.map(|app| (app, None)),
                    room: None,
                };
                match protocol.connect(url, &credentials, source).await {
                    Ok(ws) => {
                        let took = began.elapsed().as_micros() as u64;
                        tokio::spawn(hold(protocol, ws, stop));
                        Ok(took)
                    }
                    Err(e) => Err(format!("{e:#}")),
                }
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let mut report = ShardReport {
        opened: 0,
        failed: 0,
        handshake_us: Vec::with_capacity(results.len()),
        errors: Vec::new(),
    };
    for r in results {
        match r {
            Ok(us) => {
                report.opened += 1;
                report.handshake_us.push(us);
            }
            Err(e) => {
                report.failed += 1;
                if report.errors.len() < 5 {
                    report.errors.push(e);
                }
            }
        }
    }
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(format!("{}\n", serde_json::to_string(&report)?).as_bytes())
        .await?;
    stdout.flush().await?;
    // Hold until the parent closes our stdin.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    stop.cancel();
    Ok(())
}

/// Keeps one idle connection alive: reads (tungstenite answers WebSocket pings) and answers
/// application pings, until told to stop.
async fn hold(protocol: Protocol, mut ws: crate::proto::Ws, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if protocol.decode(text.as_str()) == Incoming::Ping {
                        if let Some(pong) = protocol.pong() {
                            if ws.send(Message::text(pong)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    }
}
