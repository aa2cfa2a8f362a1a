//! A reader that stops reading, against a real gateway process: its bounded queue overflows and
//! the gateway closes it with 4008 (slow consumer), the room's other member gets every message
//! without waiting for it, and the gateway's memory stays flat while tens of megabytes are
//! addressed to the stalled socket. The numbers it prints are recorded in docs/benchmarks.md.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Body of every flood message (the default limit is 4096 bytes).
const BODY_BYTES: usize = 4000;
/// Messages sent while the slow member does not read.
const FLOOD: usize = 10_000;
/// Messages every member reads before the flood, so buffers and allocator arenas that any
/// traffic needs exist before the baseline is taken.
const WARM_UP: usize = 300;
/// Sends in flight before the sender waits for acks.
const WINDOW: usize = 64;

/// Resident memory of a process, in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A WebSocket whose socket receive buffer is 4 KiB, so that once the client stops reading
/// the gateway's writes block after a few frames, not after the megabytes that loopback's
/// autotuned buffers would take.
async fn connect_small_buffer(
    addr: std::net::SocketAddr,
    user: &User,
) -> WebSocketStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(addr).await.expect("tcp connect");
    let (ws, _) = tokio_tungstenite::client_async(ws_request(addr, user), stream)
        .await
        .expect("ws handshake");
    ws
}

/// Reads `count` `message` frames (skipping other frames) and returns their seqs in order and
/// the largest delivery delay seen (receive time minus the message's `ts`), in ms.
async fn read_messages<S>(ws: &mut S, count: usize) -> (Vec<i64>, i64)
where
    S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut seqs = Vec::with_capacity(count);
    let mut worst_delay_ms = 0;
    while seqs.len() < count {
        let text = match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
            other => panic!("stream ended after {} messages: {other:?}", seqs.len()),
        };
        let frame: Value = serde_json::from_str(text.as_str()).expect("json frame");
        if frame["type"] == "message" {
            seqs.push(frame["seq"].as_i64().expect("seq"));
            let delay = unix_ms() - frame["ts"].as_i64().expect("ts");
            worst_delay_ms = worst_delay_ms.max(delay);
        }
    }
    (seqs, worst_delay_ms)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sends `count` room messages with at most [`WINDOW`] unacknowledged; returns the acks.
async fn send_to_room(ws: &mut Ws, room: uuid::Uuid, count: usize, tag: &str) -> usize {
    let body = "m".repeat(BODY_BYTES);
    let (mut sent, mut acked) = (0, 0);
    while acked < count {
        while sent < count && sent - acked < WINDOW {
            let frame = json!({"type": "send", "id": format!("{tag}-{sent}"),
                "conversation_id": room, "body": body});
            send_json(ws, frame).await;
            sent += 1;
        }
        let reply = recv_within(ws, Duration::from_secs(30))
            .await
            .expect("an ack in time");
        match reply["type"].as_str() {
            Some("ack") => acked += 1,
            // Presence and read events of the room's members may come between the acks.
            Some("presence" | "read" | "message") => {}
            _ => panic!("unexpected reply: {reply}"),
        }
    }
    acked
}

#[actix_web::test]
async fn a_stalled_reader_is_closed_with_4008_and_costs_bounded_memory() {
    let cluster = Cluster::new().await;
    let node = cluster.spawn_process("slow-reader-node", &[]).await;
    let pid = node.child.id();
    let sender = register_at(node.http, "sender").await;
    let fast = register_at(node.http, "fast").await;
    let slow = register_at(node.http, "slow").await;
    let room = create_room_at(node.http, &sender, &[fast.id, slow.id]).await;

    let (mut fast_ws, _) = connect_to(node.http, &fast).await;
    let mut slow_ws = connect_small_buffer(node.http, &slow).await;
    let (mut sender_ws, _) = connect_to(node.http, &sender).await;

    // Warm-up: everyone reads.
    let (warm_sent, (warm_fast, _), (warm_slow, _)) = tokio::join!(
        send_to_room(&mut sender_ws, room, WARM_UP, "warm"),
        read_messages(&mut fast_ws, WARM_UP),
        read_messages(&mut slow_ws, WARM_UP),
    );
    assert_eq!(
        (warm_sent, warm_fast.len(), warm_slow.len()),
        (WARM_UP, WARM_UP, WARM_UP)
    );
    let baseline_kib = rss_kib(pid);

    // The flood: the slow member stops reading. Memory is sampled throughout.
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let sampling = sampling.clone();
        actix_web::rt::spawn(async move {
            let mut peak = 0;
            while !sampling.is_cancelled() {
                peak = peak.max(rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let started = Instant::now();
    let (acked, (fast_seqs, fast_worst_ms)) = tokio::join!(
        send_to_room(&mut sender_ws, room, FLOOD, "flood"),
        read_messages(&mut fast_ws, FLOOD),
    );
    let fast_done = started.elapsed();

    // The slow member is closed once its write times out (10 s after it stopped draining).
    let slow_closed = chat_core::testing::eventually(Duration::from_secs(40), || async {
        metric_at(
            node.internal,
            "chat_gateway_closes_total{reason=\"slow_consumer\"}",
        )
        .await
            == Some(1.0)
    })
    .await;
    let closed_after = started.elapsed();
    sampling.cancel();
    let peak_kib = sampler.await.expect("sampler");

    // Bytes of message frames addressed to the stalled socket during the flood.
    let addressed_kib = (FLOOD * (BODY_BYTES + 250) / 1024) as u64;
    let growth_kib = peak_kib.saturating_sub(baseline_kib);
    eprintln!(
        "slow reader: baseline {baseline_kib} KiB, peak {peak_kib} KiB (+{growth_kib} KiB) while \
         {addressed_kib} KiB were addressed to the stalled reader; fast reader had all {FLOOD} \
         after {:.1} s (worst delay {fast_worst_ms} ms); slow reader closed by {:.1} s",
        fast_done.as_secs_f64(),
        closed_after.as_secs_f64(),
    );
    assert_eq!(acked, FLOOD, "every flood message acked");
    let first = warm_fast.last().copied().unwrap_or(0) + 1;
    let expected: Vec<i64> = (first..first + FLOOD as i64).collect();
    assert_eq!(
        fast_seqs, expected,
        "the fast member got every message, in order"
    );
    assert!(
        slow_closed,
        "the stalled member was closed as a slow consumer"
    );
    let overflows = metric_at(node.internal, "chat_gateway_outbound_queue_overflows_total").await;
    assert_eq!(overflows, Some(1.0), "its outbound queue overflowed once");

    // Holding the stalled reader's messages would grow by `addressed_kib`; the bounded queue
    // (256 frames of about 4 KiB) and the write buffers hold a few MiB at most.
    assert!(
        growth_kib < addressed_kib / 4,
        "memory grew by {growth_kib} KiB for {addressed_kib} KiB addressed to a stalled reader"
    );

    // When the slow member reads again it finds some of the flood, never all of it, and then
    // the end of the connection.
    let mut late_messages = 0;
    let mut close_code = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), slow_ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(text.as_str()).expect("json");
                if frame["type"] == "message" {
                    late_messages += 1;
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                close_code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => break,
            Err(_) => panic!("the stalled connection was still open 30 s after it read again"),
        }
    }
    eprintln!("slow reader read {late_messages} late messages, then close code {close_code:?}");
    assert!(
        late_messages < FLOOD,
        "the stalled reader did not get the whole flood"
    );
    assert_eq!(
        close_code,
        Some(4008),
        "the stalled reader is told why it was closed"
    );

    // The others are unharmed: the sender and the fast member still talk.
    send_json(
        &mut sender_ws,
        json!({"type": "send", "id": "after", "conversation_id": room, "body": "still here"}),
    )
    .await;
    let frames = recv_until(&mut fast_ws, |f| f["type"] == "message").await;
    assert_eq!(
        frames.last().map(|f| f["body"].clone()),
        Some(json!("still here"))
    );
    let _ = sender_ws.close(None).await;
}

/// A reader that stops reading is closed with 4008 once its queue holds more bytes than
/// `gateway_outbound_queue_bytes` (64 KiB here), long before its 10,000 frames fill: the kick
/// (`chat_gateway_outbound_queue_overflows_total`) comes within 3,000 messages of 4 KB (the
/// socket buffers hold the first few MB), not from the write timeout or the frame bound, and the
/// node's queued bytes go back to zero.
#[actix_web::test]
async fn a_reader_behind_by_more_bytes_than_its_queue_holds_is_closed() {
    let cluster = Cluster::new().await;
    let node = cluster
        .start_with(gateway::config::GatewayConfig {
            gateway_outbound_queue: 10_000,
            gateway_outbound_queue_bytes: 64 * 1024,
            gateway_send_rate_per_sec: 100_000,
            ..cluster.config("node-a")
        })
        .await;
    let (sender, stalled) = (
        register(&node, "sender").await,
        register(&node, "stalled").await,
    );
    let room = create_room(&node, &sender, &[stalled.id]).await;
    let mut slow = connect_small_buffer(node.http, &stalled).await;
    let (mut ws, _) = connect(&node, &sender).await;
    let mut sent = 0;
    let mut closed = None;
    while sent < 3_000 && closed.is_none() {
        send_to_room(&mut ws, room, 50, &format!("b{sent}")).await;
        sent += 50;
        if metric(&node, "chat_gateway_outbound_queue_overflows_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
        {
            closed = Some(sent);
        }
    }
    // The socket buffers of loopback take a few MB first (about 750 messages here).
    let kicked_after = closed.expect("kicked for its bytes, long before its 10,000 frames");
    println!("kicked after {kicked_after} messages of 4 KB");
    // The stalled client finds the close behind what its buffers held.
    let code = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(msg)) = slow.next().await {
            if let Message::Close(frame) = msg {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    assert_eq!(code, Some(4008));
    let drained = chat_core::testing::eventually(Duration::from_secs(10), || {
        let node = &node;
        async move { metric(node, "chat_gateway_outbound_queued_bytes").await == Some(0.0) }
    })
    .await;
    assert!(
        drained,
        "the closed connection's queue left the node's count"
    );
}
