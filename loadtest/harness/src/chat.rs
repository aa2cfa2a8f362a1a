//! The `chat` workload: pairs of users, one on each of two nodes, send each other one-to-one
//! messages at fixed offered rates (open loop) and then as fast as acks allow (closed loop, a
//! window of unacked sends per connection). Latency is measured inside this process from the
//! moment a message was due to be sent (so a stalled server cannot hide its queueing: no
//! coordinated omission) to the moment its recipient read it, into HDR histograms.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::identity::{new_users, seed_users, TokenMint};
use crate::procstat::{CpuMeter, Watched};
use crate::proto::{Credentials, Incoming, Protocol, Ws};
use crate::report::{self, micros_histogram, Latency};

#[derive(clap::Args)]
pub struct ChatArgs {
    #[arg(long, value_enum, default_value = "chat")]
    protocol: Protocol,
    /// Nodes, comma-separated `ws://host:port`; each pair's first user connects to the first
    /// node and its second user to the second node.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// Pairs of users (two connections each).
    #[arg(long, default_value_t = 500)]
    pairs: usize,
    /// Offered rates to step through, messages per second over all connections.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    rates: Vec<u64>,
    /// After the rates, a closed-loop step with this many unacked sends per connection (0: none).
    #[arg(long, default_value_t = 0)]
    saturate_window: usize,
    /// Seconds per step.
    #[arg(long, default_value_t = 10)]
    step_secs: u64,
    /// Seconds of unreported traffic at the first rate before the steps.
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    /// Body size in bytes (at least 18: the step and the send time travel in the body).
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    #[arg(long, env = "LOADGEN_JWT_SECRET")]
    jwt_secret: String,
    #[command(flatten)]
    pusher: crate::proto::PusherArgs,
    /// The gateway's Postgres, to seed the users (our gateway refuses unknown recipients).
    #[arg(long)]
    database_url: Option<String>,
    /// Processes whose CPU use is reported per step, as `name=pid` (repeatable).
    #[arg(long = "watch")]
    watch: Vec<Watched>,
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    #[arg(long, default_value = "run")]
    label: String,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug)]
enum Load {
    /// Open loop: this many messages per second over all connections.
    Rate(u64),
    /// Closed loop: at most this many unacked sends per connection.
    Window(usize),
}

#[derive(Default)]
struct StepCounters {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    delivered: AtomicU64,
}

#[derive(Serialize)]
pub struct StepResult {
    kind: &'static str,
    offered_per_sec: Option<u64>,
    window: Option<usize>,
    secs: f64,
    sent: u64,
    acked: u64,
    errors: u64,
    delivered: u64,
    /// Acked but never read by the recipient within the drain wait.
    undelivered: u64,
    delivered_per_sec: f64,
    /// Message due → read by the recipient.
    latency: Latency,
    /// Message due → ack read by the sender.
    ack_latency: Latency,
    cpu_percent: BTreeMap<String, f64>,
}

#[derive(Serialize)]
pub struct ChatResult {
    label: String,
    protocol: Protocol,
    nodes: Vec<String>,
    pairs: usize,
    connections: usize,
    body_bytes: usize,
    disconnects: u64,
    steps: Vec<StepResult>,
}

/// The private channel a pair talks on (Pusher): the same name from either side.
fn pair_channel(a: Uuid, b: Uuid) -> String {
    format!("private-pair-{}", a.min(b).simple())
}

/// Nanoseconds since the harness started: the clock both sides of a pair share.
fn now_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The body that carries its step and due time: `SS` + 16 hex digits + padding.
fn make_body(step: usize, due_nanos: u64, len: usize) -> String {
    let mut body = format!("{:02}{due_nanos:016x}", step % 100);
    while body.len() < len {
        body.push('x');
    }
    body
}

fn parse_body(body: &str) -> Option<(usize, u64)> {
    let step = body.get(..2)?.parse().ok()?;
    let due = u64::from_str_radix(body.get(2..18)?, 16).ok()?;
    Some((step, due))
}

/// The client id that carries the step and due time, so the ack can be timed.
fn parse_client_id(id: &str) -> Option<(usize, u64)> {
    let (step, due) = id.split_once('.')?;
    Some((step.parse().ok()?, u64::from_str_radix(due, 16).ok()?))
}

type Sink = Arc<Mutex<SplitSink<Ws, Message>>>;

struct Peer {
    sink: Sink,
    partner: String,
    window: Arc<Semaphore>,
}

/// What the run's readers share.
struct Shared {
    protocol: Protocol,
    counters: Vec<StepCounters>,
    closed_loop: Vec<bool>,
    disconnects: AtomicU64,
}

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    if args.body_bytes < 18 {
        bail!("--body-bytes must be at least 18");
    }
    if args.nodes.is_empty() || args.pairs == 0 || args.rates.is_empty() {
        bail!("--nodes, --pairs and --rates must not be empty");
    }
    let mut loads = vec![Load::Rate(args.rates[0])];
    loads.extend(args.rates.iter().map(|r| Load::Rate(*r)));
    if args.saturate_window > 0 && args.protocol.acks() {
        loads.push(Load::Window(args.saturate_window));
    } else if args.saturate_window > 0 {
        eprintln!("loadgen: no closed-loop step: this protocol does not ack sends");
    }
    if loads.len() > 100 {
        bail!("at most 99 steps");
    }

    let users = new_users(args.pairs * 2);
    if let Some(url) = &args.database_url {
        seed_users(url, &users).await?;
    } else if args.protocol == Protocol::Chat {
        bail!("--database-url is needed to seed users for our gateway");
    }
    let mint = TokenMint::new(&args.jwt_secret);
    let _ = now_nanos();

    let shared = Arc::new(Shared {
        protocol: args.protocol,
        counters: loads.iter().map(|_| StepCounters::default()).collect(),
        closed_loop: loads.iter().map(|l| matches!(l, Load::Window(_))).collect(),
        disconnects: AtomicU64::new(0),
    });
    let stop = CancellationToken::new();

    eprintln!("loadgen: connecting {} users", users.len());
    let plan: Vec<(usize, Uuid, Uuid, String)> = users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let partner = users[i ^ 1];
            let node = args.nodes[(i % 2) % args.nodes.len()].clone();
            (i, *user, partner, node)
        })
        .collect();
    let protocol = args.protocol;
    let mint = &mint;
    let pusher_app = args.pusher.app();
    let pusher_app = pusher_app.as_ref();
    let connected: Vec<anyhow::Result<(usize, Ws, String)>> = futures_util::stream::iter(plan)
        .map(|(i, user, partner, node)| async move {
            let token = mint.token(user)?;
            let channel = pair_channel(user, partner);
            let credentials = Credentials {
                token: &token,
                pusher: pusher_app.map(|app| (app, Some(channel.as_str()))),
                room: None,
            };
            let ws = protocol
                .connect(&node, &credentials, None)
                .await
                .with_context(|| format!("connecting user {i} to {node}"))?;
            // Pusher addresses the pair's channel; the others address the partner.
            let to = match protocol {
                Protocol::Pusher => channel,
                Protocol::Chat | Protocol::Socketio => partner.to_string(),
            };
            Ok((i, ws, to))
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;

    let mut peers = Vec::with_capacity(connected.len());
    let mut readers = Vec::with_capacity(connected.len());
    for c in connected {
        let (_, ws, partner) = c?;
        let (sink, stream) = ws.split();
        let sink = Arc::new(Mutex::new(sink));
        let window = Arc::new(Semaphore::new(args.saturate_window));
        readers.push(tokio::spawn(read_loop(
            stream,
            sink.clone(),
            window.clone(),
            shared.clone(),
            stop.clone(),
        )));
        peers.push(Peer {
            sink,
            partner,
            window,
        });
    }
    let peers = Arc::new(peers);

    let mut steps = Vec::new();
    for (step, load) in loads.iter().enumerate() {
        let secs = if step == 0 {
            args.warmup_secs
        } else {
            args.step_secs
        };
        if secs == 0 {
            continue;
        }
        eprintln!("loadgen: step {step}: {load:?} for {secs}s");
        let cpu = CpuMeter::start(&args.watch);
        let began = Instant::now();
        run_step(step, *load, secs, &peers, &shared, args.body_bytes).await;
        let secs_run = began.elapsed().as_secs_f64();
        let counters = &shared.counters[step];
        // Let messages still in flight arrive before counting.
        let wait_until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < wait_until {
            let done =
                counters.acked.load(Ordering::Relaxed) + counters.errors.load(Ordering::Relaxed);
            let delivered = counters.delivered.load(Ordering::Relaxed);
            if done >= counters.sent.load(Ordering::Relaxed)
                && delivered >= counters.acked.load(Ordering::Relaxed)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cpu_percent = cpu.finish();
        if step > 0 {
            steps.push((step, *load, secs_run, cpu_percent));
        }
    }

    stop.cancel();
    let mut delivery: Vec<Histogram<u64>> = loads.iter().map(|_| micros_histogram()).collect();
    let mut acks: Vec<Histogram<u64>> = loads.iter().map(|_| micros_histogram()).collect();
    for reader in readers {
        let (d, a) = reader.await.context("a reader task failed")?;
        for (into, from) in delivery.iter_mut().zip(&d) {
            into.add(from).context("merging histograms")?;
        }
        for (into, from) in acks.iter_mut().zip(&a) {
            into.add(from).context("merging histograms")?;
        }
    }

    let steps = steps
        .into_iter()
        .map(|(step, load, secs, cpu_percent)| {
            let c = &shared.counters[step];
            let acked = c.acked.load(Ordering::Relaxed);
            let delivered = c.delivered.load(Ordering::Relaxed);
            StepResult {
                kind: match load {
                    Load::Rate(_) => "rate",
                    Load::Window(_) => "saturate",
                },
                offered_per_sec: match load {
                    Load::Rate(r) => Some(r),
                    Load::Window(_) => None,
                },
                window: match load {
                    Load::Rate(_) => None,
                    Load::Window(w) => Some(w),
                },
                secs: (secs * 100.0).round() / 100.0,
                sent: c.sent.load(Ordering::Relaxed),
                acked,
                errors: c.errors.load(Ordering::Relaxed),
                delivered,
                undelivered: acked.saturating_sub(delivered),
                delivered_per_sec: (delivered as f64 / secs).round(),
                latency: Latency::from_micros(&delivery[step]),
                ack_latency: Latency::from_micros(&acks[step]),
                cpu_percent,
            }
        })
        .collect();
    let result = ChatResult {
        label: args.label,
        protocol: args.protocol,
        nodes: args.nodes,
        pairs: args.pairs,
        connections: args.pairs * 2,
        body_bytes: args.body_bytes,
        disconnects: shared.disconnects.load(Ordering::Relaxed),
        steps,
    };
    report::write(&args.out, "chat", result)
}

/// Runs the writers of one step until its time is up.
async fn run_step(
    step: usize,
    load: Load,
    secs: u64,
    peers: &Arc<Vec<Peer>>,
    shared: &Arc<Shared>,
    body_bytes: usize,
) {
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let n = peers.len();
    let mut writers = Vec::with_capacity(n);
    for i in 0..n {
        let peers = peers.clone();
        let shared = shared.clone();
        writers.push(tokio::spawn(async move {
            let peer = &peers[i];
            let counters = &shared.counters[step];
            let protocol = shared.protocol;
            match load {
                Load::Rate(rate) => {
                    let period = Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
                    let mut due = start + period.mul_f64(i as f64 / n as f64);
                    while due < deadline {
                        tokio::time::sleep_until(due).await;
                        let due_nanos = now_nanos().saturating_sub(due.elapsed().as_nanos() as u64);
                        if send(protocol, peer, step, due_nanos, body_bytes)
                            .await
                            .is_err()
                        {
                            return;
                        }
                        counters.sent.fetch_add(1, Ordering::Relaxed);
                        if !protocol.acks() {
                            // Fire-and-forget: a send that left the socket counts as accepted.
                            counters.acked.fetch_add(1, Ordering::Relaxed);
                        }
                        due += period;
                    }
                }
                Load::Window(_) => loop {
                    let permit = tokio::select! {
                        p = peer.window.acquire() => p,
                        _ = tokio::time::sleep_until(deadline) => return,
                    };
                    match permit {
                        Ok(p) => p.forget(),
                        Err(_) => return,
                    }
                    if send(protocol, peer, step, now_nanos(), body_bytes)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                },
            }
        }));
    }
    for w in writers {
        let _ = w.await;
    }
}

async fn send(
    protocol: Protocol,
    peer: &Peer,
    step: usize,
    due_nanos: u64,
    body_bytes: usize,
) -> anyhow::Result<()> {
    let id = format!("{step}.{due_nanos:x}");
    let body = make_body(step, due_nanos, body_bytes);
    let frame = protocol.encode_send(&id, &peer.partner, &body);
    peer.sink.lock().await.send(Message::text(frame)).await?;
    Ok(())
}

/// Reads one connection until the run stops; returns its delivery and ack histograms per step.
async fn read_loop(
    mut stream: SplitStream<Ws>,
    sink: Sink,
    window: Arc<Semaphore>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> (Vec<Histogram<u64>>, Vec<Histogram<u64>>) {
    let steps = shared.counters.len();
    let mut delivery: Vec<Histogram<u64>> = (0..steps).map(|_| micros_histogram()).collect();
    let mut acks: Vec<Histogram<u64>> = (0..steps).map(|_| micros_histogram()).collect();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            msg = stream.next() => msg,
        };
        let text = match msg {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                shared.disconnects.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Some(Ok(_)) => continue,
        };
        let now = now_nanos();
        match shared.protocol.decode(text.as_str()) {
            Incoming::Message(body) => {
                if let Some((step, due)) = parse_body(&body).filter(|(s, _)| *s < steps) {
                    shared.counters[step]
                        .delivered
                        .fetch_add(1, Ordering::Relaxed);
                    delivery[step].saturating_record((now.saturating_sub(due) / 1000).max(1));
                }
            }
            Incoming::Ack(id) => {
                if let Some((step, due)) = parse_client_id(&id).filter(|(s, _)| *s < steps) {
                    shared.counters[step].acked.fetch_add(1, Ordering::Relaxed);
                    acks[step].saturating_record((now.saturating_sub(due) / 1000).max(1));
                    if shared.closed_loop[step] {
                        window.add_permits(1);
                    }
                }
            }
            Incoming::Error(id) => {
                let step = id.as_deref().and_then(parse_client_id).map(|(s, _)| s);
                if let Some(step) = step.filter(|s| *s < steps) {
                    shared.counters[step].errors.fetch_add(1, Ordering::Relaxed);
                    if shared.closed_loop[step] {
                        window.add_permits(1);
                    }
                }
            }
            Incoming::Ping => {
                if let Some(pong) = shared.protocol.pong() {
                    let _ = sink.lock().await.send(Message::text(pong)).await;
                }
            }
            Incoming::Other => {}
        }
    }
    (delivery, acks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The step and due time survive the trip through the body and the client id.
    #[test]
    fn body_and_id_round_trip() {
        let body = make_body(7, 0xdead_beef_1234, 64);
        assert_eq!(body.len(), 64);
        assert_eq!(parse_body(&body), Some((7, 0xdead_beef_1234)));
        assert_eq!(parse_client_id("12.ff"), Some((12, 255)));
        assert_eq!(parse_body("short"), None);
        assert_eq!(parse_client_id("nodot"), None);
    }
}
