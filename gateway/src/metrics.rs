//! Every gateway metric, defined once and registered in the node's own registry (so several
//! nodes can run in one test process). Labels are low-cardinality only.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// The readiness gauges the admin server registers and evaluates on every probe and scrape:
/// 1 while `/readyz` answers 200, and per `check` 1 while Postgres (which a gateway on Redis
/// works without for a while) fails.
pub const ADMIN_METRICS: chat_core::admin::AdminMetrics = chat_core::admin::AdminMetrics {
    ready: "chat_gateway_ready",
    degraded: "chat_gateway_degraded",
};

/// The gateway's metrics.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub connections_open: IntGauge,
    pub handshakes: IntCounterVec,
    pub frames_in: IntCounterVec,
    pub frames_out: IntCounterVec,
    /// Children of the vectors above for the per-message labels, bound once: a label lookup
    /// hashes and locks, and these are counted for every message.
    pub frames_in_send: IntCounter,
    pub frames_out_ack: IntCounter,
    pub frames_out_message: IntCounter,
    pub errors_sent: IntCounterVec,
    pub closes: IntCounterVec,
    pub messages_accepted: IntCounter,
    pub messages_delivered: IntCounter,
    pub redis_errors: IntCounterVec,
    pub log_events: IntCounterVec,
    pub password_work: IntCounterVec,
    pub pubsub_subscriptions: IntGauge,
    /// On a Redis Cluster, as this node last saw it (every 5 s).
    pub cluster_masters: IntGauge,
    pub cluster_masters_without_replica: IntGauge,
    pub cluster_slots_uncovered: IntGauge,
    pub pubsub_reconnects: IntCounter,
    pub canary_round_trip: Histogram,
    pub canary_lost: IntCounter,
    pub outbound_dropped: IntCounter,
    pub outbound_queued_bytes: IntGauge,
    pub redis_memory_ratio: prometheus::Gauge,
    pub history_incomplete: IntCounter,
    pub sends_repeated: IntCounter,
    pub connections_limit: IntGauge,
    pub rate_limited: IntCounterVec,
    pub reset_requests: IntCounterVec,
    pub presence_transitions: IntCounterVec,
    pub presence_heartbeat_duration: Histogram,
    pub presence_sweep_duration: Histogram,
    pub send_latency: Histogram,
    pub redis_command_duration: HistogramVec,
    pub delivery_latency: Histogram,
    /// Callers answered by one coalesced Postgres lookup (`lookups`), by lookup.
    pub lookup_batch_size: HistogramVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram = |name: &str, help: &str| -> Result<Histogram, prometheus::Error> {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let frames_in = counter_vec(
            "chat_gateway_frames_in_total",
            "Frames received by type",
            &["type"],
        )?;
        let frames_out = counter_vec(
            "chat_gateway_frames_out_total",
            "Frames sent by type",
            &["type"],
        )?;
        Ok(Metrics {
            connections_open: gauge(
                "chat_gateway_connections_open",
                "WebSocket connections open on this node",
            )?,
            handshakes: counter_vec(
                "chat_gateway_handshakes_total",
                "WebSocket handshakes by result",
                &["result"],
            )?,
            frames_in_send: frames_in.with_label_values(&["send"]),
            frames_in,
            frames_out_ack: frames_out.with_label_values(&["ack"]),
            frames_out_message: frames_out.with_label_values(&["message"]),
            frames_out,
            errors_sent: counter_vec(
                "chat_gateway_errors_sent_total",
                "Error frames sent by code",
                &["code"],
            )?,
            closes: counter_vec(
                "chat_gateway_closes_total",
                "Connections closed by close reason",
                &["reason"],
            )?,
            messages_accepted: counter(
                "chat_gateway_messages_accepted_total",
                "Messages appended to Redis and acked",
            )?,
            messages_delivered: counter(
                "chat_gateway_messages_delivered_total",
                "Message frames written to recipient sockets",
            )?,
            redis_errors: counter_vec(
                "chat_gateway_redis_errors_total",
                "Failed Redis operations",
                &["op"],
            )?,
            password_work: counter_vec(
                "chat_gateway_password_work_total",
                "argon2id work started on the password threads, by op: hash, verify",
                &["op"],
            )?,
            log_events: counter_vec(
                "chat_gateway_log_events_total",
                "What the log did about Redis losing data and its bounds: epoch_opened, rebased, backlog_full, replicas_short",
                &["event"],
            )?,
            pubsub_subscriptions: gauge(
                "chat_gateway_pubsub_subscriptions",
                "Channels (users' and rooms') this node is subscribed to",
            )?,
            cluster_masters: gauge(
                "chat_gateway_redis_cluster_masters",
                "Redis Cluster masters that own slots and are not failed, as this node last saw them (0 on one instance)",
            )?,
            cluster_masters_without_replica: gauge(
                "chat_gateway_redis_cluster_masters_without_replica",
                "Redis Cluster masters without a live replica, as this node last saw them",
            )?,
            cluster_slots_uncovered: gauge(
                "chat_gateway_redis_cluster_slots_uncovered",
                "Redis Cluster slots no live master owns, as this node last saw them",
            )?,
            pubsub_reconnects: counter(
                "chat_gateway_pubsub_reconnects_total",
                "Times the pub/sub connection was re-established",
            )?,
            canary_round_trip: histogram(
                "chat_gateway_delivery_canary_round_trip_seconds",
                "Publish to arrival of the node's delivery canary through Redis pub/sub",
            )?,
            canary_lost: counter(
                "chat_gateway_delivery_canary_lost_total",
                "Delivery canaries published and not received back in time (each reconnects pub/sub)",
            )?,
            outbound_dropped: counter(
                "chat_gateway_outbound_queue_overflows_total",
                "Connections whose outbound queue overflowed in frames or bytes (closed as slow consumers)",
            )?,
            redis_memory_ratio: {
                let g = prometheus::Gauge::new(
                    "chat_gateway_redis_memory_used_ratio",
                    "used_memory / maxmemory of the fullest Redis node, as this node last read it (0 without a limit)",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            outbound_queued_bytes: gauge(
                "chat_gateway_outbound_queued_bytes",
                "Bytes waiting in the outbound queues of this node's connections (a frame shared by several counts in each)",
            )?,
            history_incomplete: counter(
                "chat_gateway_history_incomplete_total",
                "History and sync reads refused because a message was neither in the Redis tail nor yet in Postgres",
            )?,
            sends_repeated: counter(
                "chat_gateway_sends_repeated_total",
                "Sends that repeated a client id within the dedup window: answered with the original ack, nothing stored",
            )?,
            connections_limit: gauge(
                "chat_gateway_connections_limit",
                "Most WebSocket connections this node accepts (gateway_max_connections)",
            )?,
            reset_requests: counter_vec(
                "chat_gateway_password_reset_requests_total",
                "Password reset requests by outcome: queued for the reset worker, or dropped (queue full)",
                &["outcome"],
            )?,
            rate_limited: counter_vec(
                "chat_gateway_rate_limited_total",
                "Frames or handshakes refused by a limit, by limit",
                &["limit"],
            )?,
            presence_transitions: counter_vec(
                "chat_gateway_presence_transitions_total",
                "Presence changes this node announced, by status",
                &["status"],
            )?,
            presence_sweep_duration: histogram(
                "chat_gateway_presence_sweep_seconds",
                "One sweep of expired presence entries (users of dead nodes), apart from the heartbeat",
            )?,
            presence_heartbeat_duration: histogram(
                "chat_gateway_presence_heartbeat_seconds",
                "Time to refresh every local user's presence and sweep expired users, per heartbeat",
            )?,
            redis_command_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "chat_gateway_redis_command_seconds",
                        "Round trip of a Redis command or script on the shared command connection, by op",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["op"],
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            lookup_batch_size: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "chat_gateway_lookup_batch_size",
                        "Requests or handshakes answered by one coalesced Postgres lookup, by lookup",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                    &["lookup"],
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            send_latency: histogram(
                "chat_gateway_send_latency_seconds",
                "Send frame received to ack written",
            )?,
            delivery_latency: histogram(
                "chat_gateway_delivery_latency_seconds",
                "Message ts (the accepting node's clock) to the frame written to a recipient's socket, measured on the delivering node",
            )?,
            registry,
        }
        .with_known_labels())
    }

    /// The handles the Redis backend records into.
    pub fn redis(&self) -> chat_core::redis_conn::RedisMetrics {
        chat_core::redis_conn::RedisMetrics {
            command_seconds: self.redis_command_duration.clone(),
            errors: self.redis_errors.clone(),
            subscriptions: self.pubsub_subscriptions.clone(),
            reconnects: self.pubsub_reconnects.clone(),
            log_events: self.log_events.clone(),
        }
    }

    /// What the delivery canary counts.
    pub fn canary(&self) -> chat_core::pubsub::canary::CanaryMetrics {
        chat_core::pubsub::canary::CanaryMetrics {
            round_trip: self.canary_round_trip.clone(),
            lost: self.canary_lost.clone(),
        }
    }

    /// Creates the children every dashboard and alert expects, at 0, so `rate()` sees the first
    /// event and the series exist before it.
    fn with_known_labels(self) -> Self {
        for op in ["append", "command", "pubsub_connect", "pubsub"] {
            self.redis_errors.with_label_values(&[op]);
        }
        for op in ["hash", "verify"] {
            self.password_work.with_label_values(&[op]);
        }
        for event in ["epoch_opened", "rebased", "backlog_full", "replicas_short"] {
            self.log_events.with_label_values(&[event]);
        }
        for limit in [
            "send",
            "account",
            "redis_full",
            "frames",
            "connections",
            "handshakes_per_ip",
            "connections_per_user",
            "login",
            "login_slowed",
            "register",
        ] {
            self.rate_limited.with_label_values(&[limit]);
        }
        for outcome in ["queued", "dropped"] {
            self.reset_requests.with_label_values(&[outcome]);
        }
        for status in ["online", "offline"] {
            self.presence_transitions.with_label_values(&[status]);
        }
        for lookup in ["token_floor", "rooms", "audience", "last_seen"] {
            self.lookup_batch_size.with_label_values(&[lookup]);
        }
        self
    }
}
