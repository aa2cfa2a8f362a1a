//! A line-oriented WebSocket client for trying the gateway by hand: prints every frame the server
//! sends; each line typed is sent as a text frame. `to <user-id> <text>` is a shortcut for a
//! `send` frame.
//!
//! `cargo run -p gateway --example ws-client -- ws://127.0.0.1:8080/ws <token>`

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(token)) = (args.next(), args.next()) else {
        eprintln!("usage: ws-client <ws://host:port/ws> <token>");
        std::process::exit(2);
    };
    let mut request = url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
    let (mut sink, mut stream) = ws.split();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut next_id = 1u64;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => println!("< {t}"),
                Some(Ok(Message::Close(f))) => { println!("< close {f:?}"); break; }
                Some(Ok(_)) => {}
                Some(Err(e)) => { eprintln!("error: {e}"); break; }
                None => break,
            },
            line = lines.next_line() => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => {
                    let frame = match line.strip_prefix("to ").and_then(|rest| rest.split_once(' ')) {
                        Some((to, body)) => {
                            next_id += 1;
                            serde_json::json!({"type": "send", "id": format!("cli-{next_id}"), "to": to, "body": body}).to_string()
                        }
                        None => line,
                    };
                    sink.send(Message::text(frame)).await?;
                }
                None => break,
            },
        }
    }
    Ok(())
}
