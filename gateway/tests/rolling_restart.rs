//! A rolling restart under steady traffic: one of two gateway processes gets SIGTERM while a
//! client sends through it. Readiness turns 503 first, the client is told to reconnect (1001),
//! sends again with the same ids through the other node, and the recipient, after a sync,
//! holds every acked message once; Postgres stores each once.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// How a run of sends ended.
#[derive(Debug, PartialEq)]
enum Stopped {
    /// Every id was acked.
    Done,
    /// The server closed the connection with this close code (`None`: no close frame) before
    /// the id at this index was acked.
    Closed { at: usize, code: Option<u16> },
}

/// Sends `ids` in order on `ws`, one after the other's ack; returns the acked (id, seq, msg_id)
/// and how the run ended.
async fn send_until_closed(
    ws: &mut Ws,
    to: uuid::Uuid,
    ids: &[String],
) -> (Vec<(String, i64, String)>, Stopped) {
    let mut acked = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let sent = ws
            .send(Message::text(send_frame(id, to, "steady").to_string()))
            .await;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let frame: Value = serde_json::from_str(text.as_str()).expect("json");
                    if sent.is_ok() && frame["type"] == "ack" && frame["id"] == id.as_str() {
                        let msg_id = frame["msg_id"].as_str().expect("msg_id").to_string();
                        acked.push((id.clone(), frame["seq"].as_i64().expect("seq"), msg_id));
                        break;
                    }
                    assert_ne!(frame["type"], "error", "{frame}");
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    let code = frame.map(|f| u16::from(f.code));
                    return (acked, Stopped::Closed { at: i, code });
                }
                Ok(Some(Ok(_))) => {}
                _ => return (acked, Stopped::Closed { at: i, code: None }),
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (acked, Stopped::Done)
}

/// SIGTERM one node of two under steady sends: no acked message lost or stored twice.
#[actix_web::test]
async fn rolling_restart_loses_no_acked_message() {
    let cluster = Cluster::new().await;
    let worker = cluster.start_worker();
    let b = cluster.start_node("node-b").await;
    let draining = cluster
        .spawn_process("node-a", &[("CHAT_GATEWAY_SHUTDOWN_GRACE_SECS", "5")])
        .await;
    let alice = register(&b, "alice").await;
    let bob = register(&b, "bob").await;
    let (mut bob_ws, _) = connect(&b, &bob).await;
    let (mut alice_ws, _) = connect_to(draining.http, &alice).await;

    let ids: Vec<String> = (0..400).map(|i| format!("roll-{i}")).collect();
    let sender = {
        let ids = ids.clone();
        let to = bob.id;
        tokio::spawn(async move { send_until_closed(&mut alice_ws, to, &ids).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    draining.terminate();
    // Readiness fails while it drains (or the process is already gone).
    let internal = draining.internal;
    let not_ready = chat_core::testing::eventually(Duration::from_secs(5), || async move {
        !matches!(reqwest::get(format!("http://{internal}/readyz")).await, Ok(r) if r.status() == 200)
    })
    .await;
    assert!(not_ready, "readiness turns off on SIGTERM");

    let (mut acked, stopped) = sender.await.expect("sender");
    let Stopped::Closed { at: resume, code } = stopped else {
        panic!("the draining node closed the connection mid-run");
    };
    assert_eq!(code, Some(1001), "a draining node says going away");
    let Some((last_id, last_seq, last_msg_id)) = acked.last().cloned() else {
        panic!("no message went through the draining node");
    };
    // Reconnect elsewhere. First the last acked id once more, as a client unsure of its ack
    // would: the other node answers the original ack and stores nothing.
    let (mut again, _) = connect(&b, &alice).await;
    let repeats_before = metric(&b, "chat_gateway_sends_repeated_total")
        .await
        .unwrap_or(0.0);
    let (repeat, done) =
        send_until_closed(&mut again, bob.id, std::slice::from_ref(&last_id)).await;
    assert_eq!(done, Stopped::Done);
    assert_eq!(
        repeat,
        vec![(last_id, last_seq, last_msg_id)],
        "a repeated id gets its original ack"
    );
    assert_eq!(
        metric(&b, "chat_gateway_sends_repeated_total").await,
        Some(repeats_before + 1.0)
    );
    // Then from the first unacked id on (it may have been appended before the close: then its
    // repeat gets the original ack too).
    let (more, done) = send_until_closed(&mut again, bob.id, &ids[resume..]).await;
    assert_eq!(done, Stopped::Done, "the other node takes the rest");
    acked.extend(more);
    let by_id: BTreeMap<&str, i64> = acked
        .iter()
        .map(|(id, seq, _)| (id.as_str(), *seq))
        .collect();
    assert_eq!(by_id.len(), ids.len(), "every id acked");
    let mut seqs: Vec<i64> = by_id.values().copied().collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "one message per id"
    );

    // Bob, who stayed on the other node, syncs and holds each seq once.
    let conversation = chat_core::conversation::direct_conversation_id(alice.id, bob.id);
    let mut held = Vec::new();
    while let Some(frame) = recv_within(&mut bob_ws, Duration::from_millis(300)).await {
        if frame["type"] == "message" {
            held.push(frame["seq"].as_i64().expect("seq"));
        }
    }
    let from = gap_free(&held);
    held.extend(sync_all(&mut bob_ws, conversation, from).await);
    held.sort_unstable();
    held.dedup();
    assert_eq!(held, seqs, "the recipient holds every acked message");

    let db = chat_core::testing::connect(&cluster.db_url).await;
    let stored = chat_core::testing::eventually(Duration::from_secs(15), || async {
        db.query_one("SELECT count(*), count(DISTINCT seq) FROM messages", &[])
            .await
            .map(|r| {
                r.get::<_, i64>(0) == ids.len() as i64 && r.get::<_, i64>(1) == ids.len() as i64
            })
            .unwrap_or(false)
    })
    .await;
    assert!(stored, "Postgres stores each acked message once");
    worker.cancel();
}
