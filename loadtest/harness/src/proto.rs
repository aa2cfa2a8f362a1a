//! The wire protocols the harness speaks: ours (JSON frames on `/ws`), Socket.IO v4 over a
//! WebSocket, and Pusher's protocol 7 as Sockudo speaks it (the reference stacks): connecting,
//! the handshake, encoding a send, decoding replies.

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
    /// Sockudo: Pusher protocol 7. A pair shares a private channel and talks in client events,
    /// which Pusher delivers to the channel's other subscribers and never acks.
    Pusher,
}

/// What a connection authenticates and subscribes with.
pub struct Credentials<'a> {
    /// Our JWT (ours and Socket.IO).
    pub token: &'a str,
    /// Pusher: the app, and the private channel to subscribe to if any.
    pub pusher: Option<(&'a PusherApp, Option<&'a str>)>,
    /// Socket.IO: a room to join at connect (the reference trusts it; ours reads a user's rooms
    /// from Postgres, Pusher subscribes to the room's channel).
    pub room: Option<&'a str>,
}

/// Command-line options for Pusher targets.
#[derive(clap::Args, Clone, Debug)]
pub struct PusherArgs {
    /// Pusher app key (`--protocol pusher`).
    #[arg(long, env = "LOADGEN_PUSHER_KEY")]
    pusher_key: Option<String>,
    /// Pusher app secret, to sign private-channel subscriptions.
    #[arg(long, env = "LOADGEN_PUSHER_SECRET")]
    pusher_secret: Option<String>,
}

impl PusherArgs {
    pub fn app(&self) -> Option<PusherApp> {
        Some(PusherApp {
            key: self.pusher_key.clone()?,
            secret: self.pusher_secret.clone()?,
        })
    }

    /// The same options as environment variables, for child processes.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = Vec::new();
        if let Some(k) = &self.pusher_key {
            env.push(("LOADGEN_PUSHER_KEY", k.clone()));
        }
        if let Some(s) = &self.pusher_secret {
            env.push(("LOADGEN_PUSHER_SECRET", s.clone()));
        }
        env
    }
}

/// A Pusher app's key and secret (channel auth signatures are computed from them).
#[derive(Clone, Debug)]
pub struct PusherApp {
    pub key: String,
    pub secret: String,
}

impl PusherApp {
    /// The `auth` of a private-channel subscription:
    /// `key:hex(hmac_sha256(secret, socket_id:channel))`.
    pub fn channel_auth(&self, socket_id: &str, channel: &str) -> anyhow::Result<String> {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(self.secret.as_bytes())
            .map_err(|e| anyhow!("pusher secret: {e}"))?;
        mac.update(format!("{socket_id}:{channel}").as_bytes());
        let digest = mac.finalize().into_bytes();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("{}:{hex}", self.key))
    }
}

const PUSHER_PONG: &str = r#"{"event":"pusher:pong","data":{}}"#;

/// Pusher frames carry `data` as a JSON-encoded string or, from some servers, as an object.
fn pusher_data(data: &serde_json::Value) -> serde_json::Value {
    match data.as_str() {
        Some(text) => serde_json::from_str(text).unwrap_or(serde_json::Value::Null),
        None => data.clone(),
    }
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
        credentials: &Credentials<'_>,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Ws> {
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            self.connect_inner(base, credentials, source),
        )
        .await
        .map_err(|_| anyhow!("handshake timed out"))?
    }

    /// Whether the server acks each send (Pusher's client events are fire-and-forget).
    pub fn acks(self) -> bool {
        self != Protocol::Pusher
    }

    async fn connect_inner(
        self,
        base: &str,
        credentials: &Credentials<'_>,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Ws> {
        let token = credentials.token;
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
            Protocol::Pusher => {
                let (app, _) = credentials.pusher.ok_or_else(|| {
                    anyhow!("the pusher protocol needs --pusher-key and --pusher-secret")
                })?;
                format!(
                    "ws://{authority}/app/{}?protocol=7&client=loadgen&version=0.1",
                    app.key
                )
            }
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
                let connect = match credentials.room {
                    Some(room) => serde_json::json!({ "token": token, "room": room }),
                    None => serde_json::json!({ "token": token }),
                };
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
            Protocol::Pusher => pusher_handshake(&mut ws, credentials).await?,
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
            Protocol::Pusher => serde_json::json!({
                "event": "client-message",
                "channel": to,
                "data": { "id": id, "body": body },
            })
            .to_string(),
        }
    }

    /// The text frame that posts `body` into room `room` (its name in this protocol) with client
    /// id `id`. The sender's own connection does not receive it in any of the three.
    pub fn encode_room_send(self, id: &str, room: &str, body: &str) -> String {
        match self {
            Protocol::Chat => serde_json::json!({
                "type": "send", "id": id, "conversation_id": room, "body": body,
            })
            .to_string(),
            Protocol::Socketio => {
                let payload = serde_json::json!({ "id": id, "room": room, "body": body });
                format!("421[\"send\",{payload}]")
            }
            Protocol::Pusher => self.encode_send(id, room, body),
        }
    }

    /// The reply to a ping that needs one, if this protocol has application-level pings.
    pub fn pong(self) -> Option<&'static str> {
        match self {
            Protocol::Chat => None,
            Protocol::Socketio => Some("3"),
            Protocol::Pusher => Some(PUSHER_PONG),
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
            Protocol::Pusher => {
                let Ok(frame) = serde_json::from_str::<serde_json::Value>(text) else {
                    return Incoming::Other;
                };
                match frame["event"].as_str() {
                    Some("client-message") => match pusher_data(&frame["data"])["body"].as_str() {
                        Some(body) => Incoming::Message(Cow::Owned(body.to_string())),
                        None => Incoming::Other,
                    },
                    Some("pusher:ping") => Incoming::Ping,
                    Some("pusher:error") => Incoming::Error(None),
                    _ => Incoming::Other,
                }
            }
        }
    }
}

/// After the upgrade: wait for `pusher:connection_established`, then subscribe to the private
/// channel (signed with the app secret) and wait for the subscription to succeed.
async fn pusher_handshake(ws: &mut Ws, credentials: &Credentials<'_>) -> anyhow::Result<()> {
    let established: serde_json::Value = serde_json::from_str(&next_text(ws).await?)?;
    if established["event"] != "pusher:connection_established" {
        bail!("expected pusher:connection_established, got {established}");
    }
    let data = pusher_data(&established["data"]);
    let socket_id = data["socket_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no socket_id in {established}"))?;
    let Some((app, Some(channel))) = credentials.pusher else {
        return Ok(());
    };
    let subscribe = serde_json::json!({
        "event": "pusher:subscribe",
        "data": { "channel": channel, "auth": app.channel_auth(socket_id, channel)? },
    });
    ws.send(Message::text(subscribe.to_string())).await?;
    loop {
        let reply: serde_json::Value = serde_json::from_str(&next_text(ws).await?)?;
        match reply["event"].as_str() {
            Some("pusher_internal:subscription_succeeded") => return Ok(()),
            Some("pusher:ping") => ws.send(Message::text(PUSHER_PONG)).await?,
            _ => bail!("pusher subscription refused: {reply}"),
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

    /// Pusher client events decode whether `data` is a string or an object; pings are seen.
    #[test]
    fn decodes_pusher_frames() {
        let p = Protocol::Pusher;
        assert_eq!(
            p.decode(
                r#"{"event":"client-message","channel":"private-x","data":"{\"body\":\"01ab\"}"}"#
            ),
            Incoming::Message("01ab".into())
        );
        assert_eq!(
            p.decode(r#"{"event":"client-message","channel":"private-x","data":{"body":"01ab"}}"#),
            Incoming::Message("01ab".into())
        );
        assert_eq!(
            p.decode(r#"{"event":"pusher:ping","data":{}}"#),
            Incoming::Ping
        );
        assert!(!p.acks());
        let send: serde_json::Value =
            serde_json::from_str(&p.encode_send("1.2", "private-x", "b")).expect("json");
        assert_eq!(send["channel"], "private-x");
        assert_eq!(send["data"]["body"], "b");
    }

    /// The channel signature matches the example in Pusher's channel authentication docs.
    #[test]
    fn pusher_channel_auth_matches_the_spec_example() {
        let app = PusherApp {
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        };
        assert_eq!(
            app.channel_auth("1234.1234", "private-foobar")
                .expect("auth"),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
    }
}
