//! Logging and tracing setup: JSON lines in production, readable text in development, filtered by
//! `RUST_LOG`, each line inside a span carrying its trace id; spans exported over OTLP/HTTP when
//! an endpoint is configured; and the W3C trace context carried in stream entries and pub/sub.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::{OpenTelemetrySpanExt, OtelData};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// Where and how much to trace.
#[derive(Debug, Clone)]
pub struct TracingSettings {
    /// OTLP/HTTP base URL such as `http://otel-collector:4318`; `None` turns tracing off.
    pub endpoint: Option<String>,
    /// Fraction of new traces kept, 0.0 to 1.0. A span whose parent was sampled is always kept.
    pub sampling_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: &'static str,
    /// `service.instance.id`: the node id or consumer name.
    pub instance: String,
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// Keeps the span exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
#[must_use = "dropping the telemetry handle without shutdown loses buffered spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter. Blocks up to a few seconds, so
    /// call it outside the async runtime, after the service stopped.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "flushing spans at shutdown failed");
            }
        }
    }
}

/// Whether spans are exported; when not, no trace context is built or carried.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// True when spans are exported (an OTLP endpoint is configured).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The OTLP/HTTP traces URL for a base endpoint (`/v1/traces` appended unless already there).
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Installs the global subscriber: logs, and span export when `tracing.endpoint` is set.
/// Installs nothing if a subscriber is already set (tests call it more than once).
pub fn init(format: LogFormat, tracing: &TracingSettings) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(endpoint) = tracing.endpoint.as_deref() else {
        let _ = subscriber(format, filter, std::io::stdout, None).try_init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(tracing.service_name)
        .with_attribute(KeyValue::new(
            "service.instance.id",
            tracing.instance.clone(),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            tracing.sampling_ratio.clamp(0.0, 1.0),
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(tracing.service_name);
    let installed = subscriber(format, filter, std::io::stdout, Some(tracer))
        .try_init()
        .is_ok();
    if installed {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// Log lines in `format` to `writer`, filtered by `filter`, and span export to `tracer` at info
/// and above whatever the filter says about log lines.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .event_format(WithTraceId(
                format::format().json().flatten_event(true),
                LogFormat::Json,
            ))
            .fmt_fields(format::JsonFields::new())
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .event_format(WithTraceId(format::format(), LogFormat::Text))
            .boxed(),
    };
    let spans = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
}

/// `make()` when spans are exported, else a disabled span: per-message spans cost nothing
/// (no registry slot, no formatted fields) while tracing is off.
pub fn span_if_exporting(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if exporting() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// The W3C `traceparent` of `span` when it is sampled and exported, to carry in a stream entry or
/// a published payload.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_sampled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// The remote span context a `traceparent` names, if valid.
pub fn remote_context(traceparent: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// Makes the span a `traceparent` names the parent of `span` (a continuation of a remote trace).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if let Some(remote) = remote_context(traceparent) {
        let parent = opentelemetry::Context::new().with_remote_span_context(remote);
        let _ = span.set_parent(parent);
    }
}

/// Links `span` to the span a `traceparent` names (a batch that handles many traces' messages).
pub fn link_to(span: &tracing::Span, traceparent: &str) {
    if let Some(remote) = remote_context(traceparent) {
        span.add_link(remote);
    }
}

/// An event format that adds `trace_id` of the innermost exported span to each line inside one.
struct WithTraceId<F>(F, LogFormat);

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let trace_id = ctx.event_scope().and_then(|scope| {
            scope
                .filter_map(|span| span.extensions().get::<OtelData>()?.trace_id())
                .find(|id| *id != opentelemetry::TraceId::INVALID)
        });
        let Some(trace_id) = trace_id else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match self.1 {
            LogFormat::Json => match line.strip_prefix('{') {
                Some(rest) => write!(writer, "{{\"trace_id\":\"{trace_id}\",{rest}"),
                None => writer.write_str(&line),
            },
            LogFormat::Text => {
                let body = line.trim_end_matches('\n');
                writeln!(writer, "{body} trace_id={trace_id}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(
            traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/v1/traces"),
            "http://collector:4318/v1/traces"
        );
    }

    #[test]
    fn traceparents_round_trip_and_garbage_is_ignored() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let remote = remote_context(header).expect("a valid traceparent");
        assert_eq!(
            remote.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(remote.span_id().to_string(), "00f067aa0ba902b7");
        assert!(remote.is_sampled() && remote.is_remote());
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(remote_context(bad).is_none(), "{bad:?} is not a context");
        }
    }

    /// Collects what the log layer writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines_logged(format: LogFormat) -> Vec<String> {
        let captured = Captured::default();
        let provider = SdkTracerProvider::builder().build();
        let writer = captured.clone();
        let subscriber = subscriber(
            format,
            EnvFilter::new("info"),
            move || writer.clone(),
            Some(provider.tracer("test")),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let span = tracing::info_span!("outer", conn_id = 7);
            let _entered = span.enter();
            tracing::info!(seq = 3, "inside a span");
            let inner = tracing::info_span!("inner");
            let _inner = inner.enter();
            tracing::warn!("nested");
        });
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        text.lines().map(str::to_string).collect()
    }

    /// JSON lines inside a span start with the span's trace id (the same for nested spans);
    /// lines outside spans have none; every line stays valid JSON.
    #[test]
    fn json_lines_inside_spans_carry_the_trace_id() {
        let lines = lines_logged(LogFormat::Json);
        assert_eq!(lines.len(), 3, "{lines:?}");
        let parsed: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert!(parsed[0].get("trace_id").is_none(), "{}", lines[0]);
        let trace_id = parsed[1]["trace_id"]
            .as_str()
            .expect("trace id inside a span");
        assert_eq!(trace_id.len(), 32);
        assert!(trace_id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(trace_id, "0".repeat(32));
        assert_eq!(parsed[1]["message"], "inside a span");
        assert_eq!(parsed[1]["seq"], 3);
        assert_eq!(
            parsed[2]["trace_id"], trace_id,
            "nested spans share the trace"
        );
    }

    /// Text lines inside a span end with `trace_id=`.
    #[test]
    fn text_lines_inside_spans_carry_the_trace_id() {
        let lines = lines_logged(LogFormat::Text);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(!lines[0].contains("trace_id="), "{}", lines[0]);
        for line in &lines[1..] {
            let (_, id) = line.rsplit_once(" trace_id=").expect("trace id at the end");
            assert_eq!(id.len(), 32, "{line}");
        }
    }
}
