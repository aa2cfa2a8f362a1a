//! The wire protocols the harness speaks: ours (JSON frames on `/ws`) and Socket.IO v4 over a
//! WebSocket (the reference stack): connecting, the handshake, encoding a send, decoding replies.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// Longest the harness waits for a connection and its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Our gateway: `GET /ws` with a bearer token, JSON frames.
    Chat,
    /// The Socket.IO reference: Engine.IO v4 over WebSocket, auth token in the CONNECT packet.
    Socketio,
}

/// What one incoming text frame means to the harness.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A message delivered to this user; its body.
    Message(Cow<'a, str>),
    /// The ack of one of our sends; its client id.
    Ack(Cow<'a, str>),
    /// An error answer to one of our sends; its client id when the server echoed it.
    Error(Option<Cow<'a, str>>),
    /// An Engine.IO ping, to be answered with a pong.
    Ping,
    Other,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    body: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
}

impl<'a> Frame<'a> {
    fn into_incoming(self) -> Incoming<'a> {
        match self.kind.as_ref() {
            "message" => match self.body {
                Some(body) => Incoming::Message(body),
                None => Incoming::Other,
            },
            "ack" => match self.id {
                Some(id) => Incoming::Ack(id),
                None => Incoming::Other,
            },
            "error" => Incoming::Error(self.id),
            _ => Incoming::Other,
        }
    }
}

impl Protocol {
    /// Opens a WebSocket to `base` (`ws://host:port`) from `source` and completes the protocol's
    /// handshake as the holder of `token`.
    pub async fn connect(
        self,
        base: &str,
        token: &str,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Ws> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connect_inner(base, token, source))
            .await
            .map_err(|_| anyhow!("handshake timed out"))?
    }

    async fn connect_inner(
        self,
        base: &str,
        token: &str,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Ws> {
        let authority = base
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow!("target {base} must start with ws://"))?
            .trim_end_matches('/');
        let addr: SocketAddr = tokio::net::lookup_host(authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .ok_or_else(|| anyhow!("{authority} resolves to nothing"))?;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding source address {ip}"))?;
        }
        let stream = socket.connect(addr).await.context("tcp connect")?;
        stream.set_nodelay(true)?;

        let url = match self {
            Protocol::Chat => format!("ws://{authority}/ws"),
            Protocol::Socketio => format!("ws://{authority}/socket.io/?EIO=4&transport=websocket"),
        };
        let mut request = url.into_client_request()?;
        if self == Protocol::Chat {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        // Small buffers: the harness holds tens of thousands of connections per process.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .context("websocket upgrade")?;

        match self {
            Protocol::Chat => {
                let first = next_text(&mut ws).await?;
                if !first.starts_with("{\"type\":\"hello\"") {
                    bail!("expected hello, got {}", truncate(&first));
                }
            }
            Protocol::Socketio => {
                let open = next_text(&mut ws).await?;
                if !open.starts_with('0') {
                    bail!(
                        "expected the engine.io open packet, got {}",
                        truncate(&open)
                    );
                }
                let connect = serde_json::json!({ "token": token });
                ws.send(Message::text(format!("40{connect}"))).await?;
                loop {
                    let reply = next_text(&mut ws).await?;
                    if reply.starts_with("40") {
                        break;
                    }
                    if reply == "2" {
                        ws.send(Message::text("3")).await?;
                        continue;
                    }
                    bail!("socket.io connect refused: {}", truncate(&reply));
                }
            }
        }
        Ok(ws)
    }

    /// The text frame that sends `body` to `to` with client id `id`.
    pub fn encode_send(self, id: &str, to: &str, body: &str) -> String {
        let payload = serde_json::json!({ "id": id, "to": to, "body": body });
        match self {
            Protocol::Chat => {
                serde_json::json!({ "type": "send", "id": id, "to": to, "body": body }).to_string()
            }
            // Event with an ack id: the server's ack comes back as `43<ack id>[...]`. The ack id is
            // independent of our client id; the harness always uses 1 and reads our id from the ack.
            Protocol::Socketio => format!("421[\"send\",{payload}]"),
        }
    }

    /// The reply to a ping that needs one, if this protocol has application-level pings.
    pub fn pong(self) -> Option<&'static str> {
        match self {
            Protocol::Chat => None,
            Protocol::Socketio => Some("3"),
        }
    }

    /// Classifies one incoming text frame.
    pub fn decode(self, text: &str) -> Incoming<'_> {
        match self {
            Protocol::Chat => serde_json::from_str::<Frame>(text)
                .map(Frame::into_incoming)
                .unwrap_or(Incoming::Other),
            Protocol::Socketio => {
                if text == "2" {
                    return Incoming::Ping;
                }
                if let Some(event) = text.strip_prefix("42") {
                    return match serde_json::from_str::<(Cow<str>, Frame)>(event) {
                        Ok((name, frame)) if name == "message" => frame.into_incoming(),
                        _ => Incoming::Other,
                    };
                }
                if let Some(ack) = text.strip_prefix("43") {
                    let args = ack.trim_start_matches(|c: char| c.is_ascii_digit());
                    return match serde_json::from_str::<(Frame,)>(args) {
                        Ok((frame,)) => frame.into_incoming(),
                        Err(_) => Incoming::Other,
                    };
                }
                Incoming::Other
            }
        }
    }
}

/// The next text frame, answering nothing; fails on close or end of stream.
async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_string()),
            Some(Ok(Message::Close(c))) => bail!("closed during handshake: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("reading handshake"),
            None => bail!("connection ended during handshake"),
        }
    }
}

fn truncate(s: &str) -> &str {
    let end = s.char_indices().nth(120).map(|(i, _)| i).unwrap_or(s.len());
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our frames decode to the events the harness counts.
    #[test]
    fn decodes_our_frames() {
        let p = Protocol::Chat;
        assert_eq!(
            p.decode(r#"{"type":"message","msg_id":"m","body":"01abc","seq":3}"#),
            Incoming::Message("01abc".into())
        );
        assert_eq!(
            p.decode(r#"{"type":"ack","id":"1.2","seq":3}"#),
            Incoming::Ack("1.2".into())
        );
        assert_eq!(
            p.decode(r#"{"type":"error","id":"7","code":"rate_limited"}"#),
            Incoming::Error(Some("7".into()))
        );
        assert_eq!(p.decode("not json"), Incoming::Other);
    }

    /// Socket.IO packets decode the same way, and engine.io pings are recognised.
    #[test]
    fn decodes_socketio_packets() {
        let p = Protocol::Socketio;
        assert_eq!(p.decode("2"), Incoming::Ping);
        assert_eq!(
            p.decode(r#"42["message",{"type":"message","body":"01abc"}]"#),
            Incoming::Message("01abc".into())
        );
        assert_eq!(
            p.decode(r#"4312[{"type":"ack","id":"1.2"}]"#),
            Incoming::Ack("1.2".into())
        );
        assert_eq!(
            p.decode(r#"42["other",{"type":"message","body":"x"}]"#),
            Incoming::Other
        );
        let send = p.encode_send("1.2", "u", "b");
        assert!(send.starts_with("421[\"send\","));
        let json: serde_json::Value = serde_json::from_str(&send[3..]).expect("json");
        assert_eq!(json[1]["id"], "1.2");
    }
}
