//! The `rooms` workload: one sender and rooms of growing size (100, 1,000, 10,000 members by
//! default) with the members spread over the nodes. The sender posts one message at a time: the
//! next goes out once every member has the last one (or the drain time passed), and no sooner
//! than the interval after it, so each fan-out is measured alone rather than queued behind the
//! previous one. Every member's connection records when it read each message. Reported per room
//! size: every delivery's latency (the fan-out) and, per message, the time until the last member
//! had it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::identity::{new_users, seed_users, TokenMint};
use crate::procstat::{CpuMeter, Watched};
use crate::proto::{Credentials, Incoming, Protocol, Ws};
use crate::report::{self, micros_histogram, Latency};

#[derive(clap::Args)]
pub struct RoomsArgs {
    #[arg(long, value_enum, default_value = "chat")]
    protocol: Protocol,
    /// Nodes, comma-separated `ws://host:port`; members are dealt over them in turn, the sender
    /// is on the first.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// Room sizes to run one after the other, members including the sender.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    sizes: Vec<usize>,
    /// Messages the sender posts per room size.
    #[arg(long, default_value_t = 20)]
    messages: usize,
    /// Least milliseconds between two messages (the next also waits for the last fan-out).
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// Body size in bytes (at least 24: the message's index and send time travel in the body).
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Longest wait for one message to reach every member before the next is sent.
    #[arg(long, default_value_t = 15)]
    drain_secs: u64,
    #[arg(long, env = "LOADGEN_JWT_SECRET")]
    jwt_secret: String,
    #[command(flatten)]
    pusher: crate::proto::PusherArgs,
    /// The gateway's Postgres (ours): users and rooms are seeded there.
    #[arg(long)]
    database_url: Option<String>,
    /// Processes whose CPU use is reported per room size, as `name=pid` (repeatable).
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

#[derive(Serialize)]
pub struct RoomStep {
    /// Members including the sender.
    members: usize,
    /// Members on each node, in `nodes` order.
    members_per_node: Vec<usize>,
    connect_secs: f64,
    connect_failures: usize,
    messages: usize,
    /// Deliveries expected: every message to every member but the sender.
    expected: u64,
    delivered: u64,
    /// Members that lost their connection during the step.
    disconnects: u64,
    /// Send time → read by a member, over every delivery.
    fanout: Latency,
    /// Send time → read by the last member to read it, one sample per message (only messages
    /// every member read).
    last_member: Latency,
    /// Send time → ack read by the sender (protocols with acks).
    ack: Latency,
    cpu_percent: BTreeMap<String, f64>,
}

#[derive(Serialize)]
pub struct RoomsResult {
    label: String,
    protocol: Protocol,
    nodes: Vec<String>,
    body_bytes: usize,
    interval_ms: u64,
    steps: Vec<RoomStep>,
}

/// Nanoseconds since the harness started: the clock the sender and every member share.
fn now_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A body carrying the message's index and send time: 8 + 16 hex digits, then padding.
fn make_body(index: usize, sent_nanos: u64, len: usize) -> String {
    let mut body = format!("{index:08x}{sent_nanos:016x}");
    while body.len() < len {
        body.push('x');
    }
    body
}

fn parse_body(body: &str) -> Option<(usize, u64)> {
    let index = usize::from_str_radix(body.get(..8)?, 16).ok()?;
    let sent = u64::from_str_radix(body.get(8..24)?, 16).ok()?;
    Some((index, sent))
}

/// The room's name as each protocol addresses it.
fn room_target(protocol: Protocol, room: Uuid) -> String {
    match protocol {
        Protocol::Chat | Protocol::Socketio => room.to_string(),
        Protocol::Pusher => format!("private-room-{}", room.simple()),
    }
}

/// Inserts a room with these members (the first is its owner) into the gateway's database.
async fn seed_room(database_url: &str, room: Uuid, members: &[Uuid]) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres to seed a room")?;
    let driver = tokio::spawn(connection);
    let count = i32::try_from(members.len()).context("room size")?;
    client
        .execute(
            "INSERT INTO conversations (id, kind, name, owner_id, member_count)
             VALUES ($1, 'room', 'load room', $2, $3)",
            &[&room, &members[0], &count],
        )
        .await
        .context("inserting the room")?;
    client
        .execute(
            "INSERT INTO conversation_members (conversation_id, user_id)
             SELECT $1, u FROM unnest($2::uuid[]) AS t(u)",
            &[&room, &members],
        )
        .await
        .context("inserting the room's members")?;
    drop(client);
    let _ = driver.await;
    Ok(())
}

pub async fn run(args: RoomsArgs) -> anyhow::Result<()> {
    if args.body_bytes < 24 {
        bail!("--body-bytes must be at least 24");
    }
    if args.protocol == Protocol::Chat && args.database_url.is_none() {
        bail!("--database-url is required for our gateway (users and rooms are seeded there)");
    }
    let mut steps = Vec::new();
    for &size in &args.sizes {
        if size < 2 {
            bail!("a room needs at least 2 members");
        }
        eprintln!("loadgen: rooms: {size} members");
        steps.push(run_size(&args, size).await?);
    }
    let result = RoomsResult {
        label: args.label.clone(),
        protocol: args.protocol,
        nodes: args.nodes.clone(),
        body_bytes: args.body_bytes,
        interval_ms: args.interval_ms,
        steps,
    };
    report::write(&args.out, "rooms", result)
}

async fn run_size(args: &RoomsArgs, size: usize) -> anyhow::Result<RoomStep> {
    let protocol = args.protocol;
    let users = new_users(size);
    let room = Uuid::now_v7();
    if let Some(url) = &args.database_url {
        seed_users(url, &users).await?;
        seed_room(url, room, &users).await?;
    }
    let target = Arc::new(room_target(protocol, room));
    let mint = Arc::new(TokenMint::new(&args.jwt_secret));
    let pusher_app = args.pusher.app().map(Arc::new);

    // Connect every member, dealt over the nodes; the sender (users[0]) is on the first node.
    let began = Instant::now();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut connecting = Vec::with_capacity(size);
    let mut members_per_node = vec![0; args.nodes.len()];
    for (i, user) in users.iter().enumerate() {
        let node = args.nodes[i % args.nodes.len()].clone();
        members_per_node[i % args.nodes.len()] += 1;
        let (gate, mint, pusher_app, target) = (
            gate.clone(),
            mint.clone(),
            pusher_app.clone(),
            target.clone(),
        );
        let user = *user;
        connecting.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.context("semaphore")?;
            let token = mint.token(user)?;
            let credentials = Credentials {
                token: &token,
                pusher: pusher_app
                    .as_deref()
                    .map(|app| (app, Some(target.as_str()))),
                room: Some(target.as_str()),
            };
            protocol.connect(&node, &credentials, None).await
        }));
    }
    let mut sockets = Vec::with_capacity(size);
    let mut connect_failures = 0;
    for task in connecting {
        match task.await.context("connect task")? {
            Ok(ws) => sockets.push(Some(ws)),
            Err(e) => {
                connect_failures += 1;
                if connect_failures <= 3 {
                    eprintln!("loadgen: rooms: connect failed: {e:#}");
                }
                sockets.push(None);
            }
        }
    }
    let connect_secs = began.elapsed().as_secs_f64();
    let Some(sender) = sockets.first_mut().and_then(Option::take) else {
        bail!("the sender could not connect");
    };
    // Joins on other nodes travel through Redis; give them a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let stop = CancellationToken::new();
    let disconnects = Arc::new(AtomicU64::new(0));
    let reached: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.messages).map(|_| AtomicU64::new(0)).collect());
    let mut readers = Vec::with_capacity(size);
    for ws in sockets.into_iter().skip(1).flatten() {
        readers.push(tokio::spawn(read_member(
            ws,
            protocol,
            args.messages,
            stop.clone(),
            disconnects.clone(),
            reached.clone(),
        )));
    }
    let connected = readers.len() as u64;

    let cpu = CpuMeter::start(&args.watch);
    let fanned_out = |i: usize| reached[i].load(Ordering::Relaxed) >= connected;
    let acks = send_all(sender, protocol, &target, args, fanned_out).await?;
    let cpu_percent = cpu.finish();
    stop.cancel();

    let mut fanout = micros_histogram();
    let mut last = vec![0u64; args.messages];
    let mut got = vec![0u64; args.messages];
    for reader in readers {
        let per_message_micros = reader.await.context("reader task")?;
        for (i, micros) in per_message_micros.iter().enumerate() {
            if *micros > 0 {
                fanout.record(*micros).context("recording")?;
                got[i] += 1;
                last[i] = last[i].max(*micros);
            }
        }
    }
    let mut last_member = micros_histogram();
    for (i, micros) in last.iter().enumerate() {
        if got[i] == connected {
            last_member.record(*micros).context("recording")?;
        }
    }
    let delivered = fanout.len();
    let expected = (size as u64 - 1) * args.messages as u64;
    eprintln!(
        "loadgen: rooms: {size} members ({connected} readers connected): {delivered} of \
         {expected} delivered, last member p50 {:.1} ms",
        last_member.value_at_quantile(0.5) as f64 / 1000.0
    );
    Ok(RoomStep {
        members: size,
        members_per_node,
        connect_secs,
        connect_failures,
        messages: args.messages,
        expected,
        delivered,
        disconnects: disconnects.load(Ordering::Relaxed),
        fanout: Latency::from_micros(&fanout),
        last_member: Latency::from_micros(&last_member),
        ack: Latency::from_micros(&acks),
        cpu_percent,
    })
}

/// Posts `args.messages` messages one at a time: each after the previous one has reached every
/// member (`fanned_out`) or waited the drain time, and at least the interval after it. Answers
/// pings and reads acks meanwhile; returns the ack latencies.
async fn send_all(
    mut ws: Ws,
    protocol: Protocol,
    target: &str,
    args: &RoomsArgs,
    fanned_out: impl Fn(usize) -> bool,
) -> anyhow::Result<Histogram<u64>> {
    let mut acks = micros_histogram();
    let mut sent_at = vec![0u64; args.messages];
    let interval = Duration::from_millis(args.interval_ms);
    let drain = Duration::from_secs(args.drain_secs);
    let mut poll = tokio::time::interval(Duration::from_millis(2));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    for index in 0..args.messages {
        let now = now_nanos();
        sent_at[index] = now;
        let body = make_body(index, now, args.body_bytes);
        let frame = protocol.encode_room_send(&index.to_string(), target, &body);
        ws.send(Message::text(frame)).await.context("sending")?;
        let sent = Instant::now();
        let mut done = false;
        // Until this message reached everyone (or the drain time) and the interval passed.
        while !(done && sent.elapsed() >= interval) {
            tokio::select! {
                _ = poll.tick() => {
                    if !done && (fanned_out(index) || sent.elapsed() >= drain) {
                        if !fanned_out(index) {
                            eprintln!("loadgen: rooms: message {index} did not reach every member");
                        }
                        done = true;
                    }
                }
                frame = ws.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(e).context("sender connection"),
                        None => bail!("the sender's connection ended"),
                    };
                    match protocol.decode(text.as_str()) {
                        Incoming::Ack(id) => {
                            let at = id.parse::<usize>().ok().and_then(|i| sent_at.get(i));
                            if let Some(at) = at {
                                acks.record((now_nanos() - at) / 1000).context("recording")?;
                            }
                        }
                        Incoming::Error(_) => {
                            bail!("the server refused a room send: {}", text.as_str())
                        }
                        Incoming::Ping => {
                            if let Some(pong) = protocol.pong() {
                                ws.send(Message::text(pong)).await.context("pong")?;
                            }
                        }
                        Incoming::Message(_) | Incoming::Other => {}
                    }
                }
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(acks)
}

/// Reads one member's connection until `stop`, answering pings. Returns, per message, the
/// latency of this member's read in µs (0 when it never read it): one small vector per member,
/// where a histogram each would cost tens of KiB, hundreds of MiB for a room of 10,000.
async fn read_member(
    mut ws: Ws,
    protocol: Protocol,
    messages: usize,
    stop: CancellationToken,
    disconnects: Arc<AtomicU64>,
    reached: Arc<Vec<AtomicU64>>,
) -> Vec<u64> {
    let mut per_message_micros = vec![0; messages];
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => break,
            frame = ws.next() => frame,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => {
                disconnects.fetch_add(1, Ordering::Relaxed);
                break;
            }
        };
        match protocol.decode(text.as_str()) {
            Incoming::Message(body) => {
                if let Some((index, sent)) = parse_body(&body) {
                    let micros = (now_nanos().saturating_sub(sent) / 1000).max(1);
                    if let Some(slot) = per_message_micros.get_mut(index) {
                        if *slot == 0 {
                            *slot = micros;
                            reached[index].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Incoming::Ping => {
                if let Some(pong) = protocol.pong() {
                    let _ = ws.send(Message::text(pong)).await;
                }
            }
            Incoming::Ack(_) | Incoming::Error(_) | Incoming::Other => {}
        }
    }
    let _ = ws.close(None).await;
    per_message_micros
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index and send time read back from a body, whatever its padding.
    #[test]
    fn body_round_trip() {
        let body = make_body(17, 0x1234_5678_9abc, 64);
        assert_eq!(body.len(), 64);
        assert_eq!(parse_body(&body), Some((17, 0x1234_5678_9abc)));
        assert_eq!(parse_body("short"), None);
    }
}
