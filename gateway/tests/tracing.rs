//! Traces across the gateway and the worker: a gateway process and an in-process worker export
//! spans over OTLP/HTTP to a receiver in this test, and the worker's batch span links to the
//! gateway span that accepted the message.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// One received span and the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

type Spans = Arc<Mutex<Vec<Received>>>;

/// `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`, as an OpenTelemetry collector.
async fn receive(spans: web::Data<Spans>, body: web::Bytes) -> HttpResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut held = spans.lock().expect("lock");
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                held.push(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

fn find(spans: &Spans, service: &str, name: &str) -> Vec<Span> {
    spans
        .lock()
        .expect("lock")
        .iter()
        .filter(|r| r.service == service && r.span.name == name)
        .map(|r| r.span.clone())
        .collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            any_value::Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[actix_web::test]
async fn spans_arrive_and_the_worker_batch_links_to_the_send() {
    let spans: Spans = Arc::default();
    let data = web::Data::new(spans.clone());
    let receiver = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
            .route("/v1/traces", web::post().to(receive))
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")
    .expect("bind the receiver");
    let endpoint = format!("http://{}", receiver.addrs()[0]);
    let receiver = receiver.run();
    let receiver_handle = receiver.handle();
    actix_web::rt::spawn(receiver);

    // This process hosts the worker; it exports as the worker binary does.
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let telemetry = chat_core::telemetry::init(
        chat_core::telemetry::LogFormat::Text,
        &chat_core::telemetry::TracingSettings {
            endpoint: Some(endpoint.clone()),
            sampling_ratio: 1.0,
            service_name: "chat-persistence-worker",
            instance: "tracing-test".into(),
        },
    )
    .expect("tracing starts");
    assert!(
        chat_core::telemetry::exporting(),
        "this test owns the subscriber"
    );

    let cluster = Cluster::new().await;
    let node = cluster
        .spawn_process(
            "traced",
            &[
                ("CHAT_OTEL_ENDPOINT", endpoint.as_str()),
                ("CHAT_OTEL_SAMPLING_RATIO", "1.0"),
                ("CHAT_OTEL_TRUST_CLIENT_CONTEXT", "true"),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ],
        )
        .await;
    // A node that does not trust its clients' trace context (the default).
    let wary = cluster
        .spawn_process(
            "wary",
            &[
                ("CHAT_OTEL_ENDPOINT", endpoint.as_str()),
                ("CHAT_OTEL_SAMPLING_RATIO", "1.0"),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ],
        )
        .await;
    let alice = register_at(node.http, "alice").await;
    let bob = register_at(node.http, "bob").await;
    let (mut bob_ws, _) = connect_to(node.http, &bob).await;
    let (mut alice_ws, _) = connect_to(node.http, &alice).await;
    send_json(&mut alice_ws, send_frame("traced-1", bob.id, "hello")).await;
    let ack = recv(&mut alice_ws).await.expect("ack");
    assert_eq!(ack["type"], "ack", "{ack}");
    let delivered = recv(&mut bob_ws).await.expect("message");
    assert_eq!(delivered["seq"], ack["seq"]);
    let worker = cluster.start_worker();

    let arrived = chat_core::testing::eventually(Duration::from_secs(30), || {
        let spans = spans.clone();
        async move {
            !find(&spans, "chat-gateway", "chat.send").is_empty()
                && !find(&spans, "chat-gateway", "chat.deliver").is_empty()
                && !find(&spans, "chat-persistence-worker", "worker.insert").is_empty()
        }
    })
    .await;
    assert!(arrived, "spans from both services arrive");

    let handshakes = find(&spans, "chat-gateway", "ws.handshake");
    assert!(
        handshakes.len() >= 2
            && handshakes
                .iter()
                .all(|s| attribute(s, "result").as_deref() == Some("accepted")),
        "both handshakes are traced with their result"
    );

    let sends = find(&spans, "chat-gateway", "chat.send");
    assert_eq!(sends.len(), 1, "one send, one span");
    let send = &sends[0];
    assert_eq!(attribute(send, "outcome").as_deref(), Some("ack"));
    for child in ["chat.send.validate", "log.append"] {
        let children = find(&spans, "chat-gateway", child);
        assert_eq!(children.len(), 1, "{child}");
        assert_eq!(
            children[0].trace_id, send.trace_id,
            "{child} is in the send's trace"
        );
        assert_eq!(
            children[0].parent_span_id, send.span_id,
            "{child} is a child of the send"
        );
    }

    // The node delivering to Bob continues the trace from the published payload.
    let deliveries = find(&spans, "chat-gateway", "chat.deliver");
    assert!(
        deliveries
            .iter()
            .any(|d| d.trace_id == send.trace_id && d.parent_span_id == send.span_id),
        "a delivery span is a child of the send"
    );

    // The worker's batch links to the span that accepted the message, through the stream entry.
    let batches = find(&spans, "chat-persistence-worker", "worker.batch");
    let linked = batches
        .iter()
        .find(|b| {
            b.links
                .iter()
                .any(|l| l.trace_id == send.trace_id && l.span_id == send.span_id)
        })
        .unwrap_or_else(|| {
            panic!(
                "a batch links to trace {} span {}",
                hex(&send.trace_id),
                hex(&send.span_id)
            )
        });
    assert_ne!(
        linked.trace_id, send.trace_id,
        "a batch starts its own trace"
    );
    let inserts = find(&spans, "chat-persistence-worker", "worker.insert");
    assert!(
        inserts
            .iter()
            .any(|i| i.trace_id == linked.trace_id && i.parent_span_id == linked.span_id),
        "the insert is a child of the batch"
    );

    // A caller's traceparent on the handshake continues the caller's trace.
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut request = format!("ws://{}/ws?access_token={}", node.http, alice.token)
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-b7ad6b7169203331-01")
            .parse()
            .expect("header"),
    );
    let (_ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("handshake");
    let continued = chat_core::testing::eventually(Duration::from_secs(10), || {
        let spans = spans.clone();
        async move {
            find(&spans, "chat-gateway", "ws.handshake")
                .iter()
                .any(|s| hex(&s.trace_id) == caller_trace)
        }
    })
    .await;
    assert!(continued, "the handshake span joins the caller's trace");

    // Without CHAT_OTEL_TRUST_CLIENT_CONTEXT the caller's traceparent is ignored: the handshake
    // is traced in a trace of the node's own.
    let ignored_trace = "1bf7651916cd43dd8448eb211c80319d";
    let before = find(&spans, "chat-gateway", "ws.handshake").len();
    let mut request = format!("ws://{}/ws?access_token={}", wary.http, alice.token)
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "traceparent",
        format!("00-{ignored_trace}-b7ad6b7169203331-01")
            .parse()
            .expect("header"),
    );
    let (_wary_ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("handshake");
    let exported = chat_core::testing::eventually(Duration::from_secs(10), || {
        let spans = spans.clone();
        async move { find(&spans, "chat-gateway", "ws.handshake").len() > before }
    })
    .await;
    assert!(exported, "the wary node's handshake is traced");
    assert!(
        !find(&spans, "chat-gateway", "ws.handshake")
            .iter()
            .any(|s| hex(&s.trace_id) == ignored_trace),
        "an untrusted caller's trace context is not continued"
    );

    // The message bodies never reach the exported spans.
    let body_leaked = spans.lock().expect("lock").iter().any(|r| {
        r.span.attributes.iter().any(|kv| {
            matches!(kv.value.as_ref().and_then(|v| v.value.as_ref()),
                Some(any_value::Value::StringValue(s)) if s.contains("hello"))
        })
    });
    assert!(!body_leaked, "no span attribute holds a message body");

    worker.cancel();
    node.terminate();
    wary.terminate();
    receiver_handle.stop(false).await;
    std::thread::spawn(move || telemetry.shutdown())
        .join()
        .expect("flush");
}
