//! The gateway's one typed configuration, loaded once (defaults, `--config` TOML, `CHAT_*` env)
//! and validated completely before any port is bound.

use std::net::SocketAddr;
use std::path::Path;

use chat_core::settings::{self, SettingsError};
use chat_core::telemetry::LogFormat;
use serde::Deserialize;

/// Secret used only when `dev_mode` is on and no secret is set. Never use it in production.
const DEV_JWT_SECRET: &str = "dev-only-insecure-secret-do-not-use-in-production";

/// Where the message log, pub/sub, presence and shared counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Redis (`redis_url`): any number of nodes.
    Redis,
    /// This process, with Postgres as the durable record: one node only, no Redis.
    Memory,
}

/// Whose presence (online, last seen) and whose entry in the users list a user sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceVisibility {
    /// The people who share a conversation (direct or room) with them.
    Contacts,
    /// Everyone (one community whose members may all see each other).
    Everyone,
}

/// Every setting; the key is the env var without `CHAT_`, lowercased. See `docs/operations.md`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// `redis` (default) or `memory` (one process, no Redis).
    pub backend: BackendKind,
    pub redis_url: String,
    /// Seed nodes of a Redis Cluster, comma-separated (`redis://host:port` each). Not empty:
    /// the cluster is used and `redis_url` is not.
    pub redis_cluster_urls: String,
    pub database_url: String,
    pub redis_prefix: String,
    /// Stream partitions; must match the worker's and must not change once data exists.
    pub redis_partitions: u16,
    /// Entries one stream partition may hold (messages not yet drained into Postgres, and
    /// those the worker keeps for `worker_stream_retention_secs`) before sends are refused with
    /// `unavailable`. Also how far a conversation's seq jumps after Redis lost data.
    pub redis_log_max_backlog: u64,
    /// When a send is acked: `leader` (the Redis master applied the append) or `replicas:<N>`
    /// (also N replicas confirmed it, Redis `WAIT`, within `ack_replica_timeout_ms`).
    pub ack_durability: String,
    /// How long an append waits for its replicas with `replicas:<N>` before the sender gets
    /// `unavailable`.
    pub ack_replica_timeout_ms: u64,
    /// Refuse to start on a Redis without `appendonly yes` and `maxmemory-policy noeviction`
    /// (false: warn and start; development only).
    pub redis_require_durability: bool,
    /// Sends are refused with `unavailable` while the fullest Redis node's `used_memory` is at
    /// least this fraction of its `maxmemory` (nodes without a limit never count).
    pub redis_memory_refuse_ratio: f64,
    /// How often each node reads Redis's memory use.
    pub redis_memory_check_ms: u64,
    pub jwt_secret: Option<String>,
    pub jwt_ttl_secs: u64,
    /// JWKS file of an external identity provider whose RS256/ES256 tokens are also accepted.
    pub jwt_jwks_path: Option<String>,
    /// How often the JWKS file is read again (it is also read when a token names an unknown
    /// key, at most every 2 s).
    pub jwt_jwks_reload_secs: u64,
    /// Required `iss` of external tokens (required with `jwt_jwks_path`).
    pub jwt_external_issuer: Option<String>,
    /// Required `aud` of external tokens (required with `jwt_jwks_path`).
    pub jwt_external_audience: Option<String>,
    /// Allows starting without a JWT secret (a fixed, public one is used) and says so loudly.
    pub dev_mode: bool,
    pub log_format: LogFormat,
    pub gateway_listen: String,
    pub gateway_internal_listen: String,
    pub gateway_node_id: Option<String>,
    /// Comma-separated Origins allowed to open WebSockets; empty allows any.
    pub gateway_allowed_origins: String,
    /// Comma-separated hosts (with an optional `:port`) avatar URLs may point at; empty: no
    /// avatars. The web client's CSP allows images from these hosts only.
    pub avatar_hosts: String,
    /// `contacts` (default) or `everyone`: whose presence and list entry a user sees.
    pub presence_visibility: PresenceVisibility,
    /// HTTP worker threads; 0 means one per core.
    pub gateway_workers: usize,
    pub gateway_heartbeat_secs: u64,
    pub gateway_client_timeout_secs: u64,
    pub gateway_max_body_bytes: usize,
    pub gateway_max_frame_bytes: usize,
    pub gateway_outbound_queue: usize,
    /// Bytes one connection's outbound queue may hold before it is closed as a slow consumer.
    pub gateway_outbound_queue_bytes: usize,
    /// Bytes all outbound queues of the node may hold together; the connection whose frame
    /// would pass it is closed as a slow consumer.
    pub gateway_outbound_node_bytes: usize,
    pub gateway_pg_pool_size: usize,
    /// Upper bound on the time a subscription may take during a handshake.
    pub gateway_subscribe_timeout_ms: u64,
    /// How often the node sends its delivery canary through Redis pub/sub to itself.
    pub gateway_delivery_canary_interval_ms: u64,
    /// How long a published canary may take to come back before the pub/sub connection is
    /// taken as dead (reconnected, connections resynced).
    pub gateway_delivery_canary_timeout_ms: u64,
    /// How long SIGTERM waits for connections to close before exiting.
    pub gateway_shutdown_grace_secs: u64,
    /// Recent messages kept per conversation in Redis (the tail history and sync read before
    /// the worker has written them to Postgres).
    pub gateway_history_tail_len: u32,
    /// Most bytes of frames a conversation's tail keeps in Redis (one account flooding 4 KiB
    /// messages cannot hold 1,000 of them per conversation).
    pub gateway_history_tail_max_bytes: u64,
    /// How long a conversation's tail lives in Redis after its last message.
    pub gateway_history_tail_ttl_secs: u64,
    /// Most members a room may have.
    pub gateway_max_room_members: usize,
    /// Most rooms a user may be a member of.
    pub gateway_max_rooms_per_user: usize,
    /// A room membership the node's index reports is confirmed in Postgres at most this long
    /// ago before a send, sync, read or history request relies on it.
    pub gateway_membership_recheck_secs: u64,
    /// How often the node reloads its users' rooms from Postgres (delivery follows changes
    /// whose events were lost).
    pub gateway_room_reload_secs: u64,
    /// Most WebSocket connections this node holds; handshakes beyond it get 503.
    pub gateway_max_connections: usize,
    /// Sustained `send` frames per second per connection (token bucket; bursts of twice this).
    pub gateway_send_rate_per_sec: u32,
    /// Units of work per second per connection for every other frame (a `sync` costs one per
    /// conversation; bursts of ten seconds' worth).
    pub gateway_frame_budget_per_sec: u32,
    /// Sends per second per account over all its connections and nodes, counted in 10 s
    /// windows.
    pub gateway_account_send_rate_per_sec: u32,
    /// Most users one connection may watch with `presence.watch`.
    pub gateway_max_watched_users: usize,
    /// Presence events go to the members of a user's rooms only when a room has at most this
    /// many members (bigger rooms would turn every connect into a storm).
    pub gateway_presence_room_max_members: usize,
    /// How long a node's presence entry for a user lives without a refresh.
    pub presence_ttl_secs: u64,
    /// How often a node refreshes its users' presence and sweeps users of dead nodes.
    pub presence_heartbeat_secs: u64,
    /// A `send` repeating a client id the user sent in the same conversation within this window
    /// gets the original ack and stores nothing.
    pub gateway_send_dedup_window_secs: u64,
    /// Handshakes per second per client IP on one node (token bucket, bursts of twice this).
    pub gateway_handshakes_per_ip_per_sec: u32,
    /// Connections one user may hold on one node.
    pub gateway_max_connections_per_user: usize,
    /// Failed logins for one email from one client IP, in one window across all nodes, before
    /// that IP is refused for that email.
    pub gateway_login_failures_per_email_ip: u32,
    /// Failed logins from one client IP, any email, before the IP is refused.
    pub gateway_login_failures_per_ip: u32,
    /// Failed logins for one email, from anywhere, after which its attempts are slowed (up to
    /// 3 s each), never refused.
    pub gateway_login_slow_after_failures: u32,
    pub gateway_login_window_secs: u64,
    /// Registrations per client IP, and on the whole deployment, in one window.
    pub gateway_registrations_per_ip: u32,
    pub gateway_registrations_total: u32,
    pub gateway_registration_window_secs: u64,
    /// Comma-separated CIDRs (or addresses) of the proxies in front of the gateway whose
    /// `X-Forwarded-For` is believed: the client is the rightmost entry not in this list.
    pub gateway_trusted_proxies: String,
    /// Replaced by `gateway_trusted_proxies`; setting it to true is refused with that advice.
    pub gateway_trust_forwarded_for: Option<bool>,
    /// Password hashes computed at once (argon2id, 19 MiB each); 0 means one per worker thread.
    pub gateway_password_hash_concurrency: usize,
    /// How long a password reset token stays usable.
    pub password_reset_ttl_secs: u64,
    /// Where reset tokens are POSTed (see docs/operations.md); unset: logged in dev mode only.
    pub password_reset_webhook_url: Option<String>,
    /// PEM certificate chain for native TLS on the public port; with the key, turns TLS on.
    pub gateway_tls_cert_path: Option<String>,
    /// PEM private key for native TLS.
    pub gateway_tls_key_path: Option<String>,
    /// How often the certificate files are checked for changes.
    pub gateway_tls_reload_secs: u64,
    /// Serves `/debug/echo`, an unauthenticated WebSocket echo for protocol conformance tests.
    /// Never in production.
    pub gateway_debug_echo: bool,
    /// OTLP/HTTP endpoint spans are exported to (`http://collector:4318`); unset: no export.
    pub otel_endpoint: Option<String>,
    /// Fraction of new traces exported (a continued trace follows its parent's decision).
    pub otel_sampling_ratio: f64,
    /// Continue the trace of a client's `traceparent` header (a client could otherwise make
    /// every one of its handshakes sampled). Only when the clients are your own services.
    pub otel_trust_client_context: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            backend: BackendKind::Redis,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_cluster_urls: String::new(),
            database_url: "postgres://postgres@127.0.0.1:5432/chat".into(),
            redis_prefix: "chat".into(),
            redis_partitions: 8,
            redis_log_max_backlog: chat_core::log::DEFAULT_MAX_BACKLOG,
            ack_durability: "leader".into(),
            ack_replica_timeout_ms: 1000,
            redis_require_durability: true,
            redis_memory_refuse_ratio: 0.9,
            redis_memory_check_ms: 2000,
            jwt_secret: None,
            jwt_ttl_secs: 86_400,
            jwt_jwks_path: None,
            jwt_jwks_reload_secs: 300,
            jwt_external_issuer: None,
            jwt_external_audience: None,
            dev_mode: false,
            log_format: LogFormat::Json,
            gateway_listen: "0.0.0.0:8080".into(),
            gateway_internal_listen: "0.0.0.0:9090".into(),
            gateway_node_id: None,
            gateway_allowed_origins: String::new(),
            avatar_hosts: String::new(),
            presence_visibility: PresenceVisibility::Contacts,
            gateway_workers: 0,
            gateway_heartbeat_secs: 15,
            gateway_client_timeout_secs: 45,
            gateway_max_body_bytes: 4096,
            gateway_max_frame_bytes: 16 * 1024,
            gateway_outbound_queue: 256,
            gateway_outbound_queue_bytes: 256 * 1024,
            gateway_outbound_node_bytes: 256 * 1024 * 1024,
            gateway_pg_pool_size: 16,
            gateway_subscribe_timeout_ms: 3000,
            gateway_delivery_canary_interval_ms: 2000,
            gateway_delivery_canary_timeout_ms: 5000,
            gateway_shutdown_grace_secs: 20,
            gateway_history_tail_len: chat_core::log::DEFAULT_TAIL_LEN,
            gateway_history_tail_max_bytes: chat_core::log::DEFAULT_TAIL_MAX_BYTES,
            gateway_history_tail_ttl_secs: chat_core::log::DEFAULT_TAIL_TTL_MS / 1000,
            gateway_max_room_members: 10_000,
            gateway_max_rooms_per_user: 1_000,
            gateway_membership_recheck_secs: 5,
            gateway_room_reload_secs: 60,
            gateway_max_connections: 20_000,
            gateway_send_rate_per_sec: 50,
            gateway_frame_budget_per_sec: 100,
            gateway_account_send_rate_per_sec: 100,
            gateway_max_watched_users: 1_000,
            gateway_presence_room_max_members: 100,
            presence_ttl_secs: 30,
            presence_heartbeat_secs: 10,
            gateway_send_dedup_window_secs: chat_core::log::DEFAULT_DEDUP_WINDOW_MS / 1000,
            gateway_handshakes_per_ip_per_sec: 20,
            gateway_max_connections_per_user: 10,
            gateway_login_failures_per_email_ip: 10,
            gateway_login_failures_per_ip: 100,
            gateway_login_slow_after_failures: 20,
            gateway_login_window_secs: 900,
            gateway_registrations_per_ip: 20,
            gateway_registrations_total: 10_000,
            gateway_registration_window_secs: 3600,
            gateway_trusted_proxies: String::new(),
            gateway_trust_forwarded_for: None,
            gateway_password_hash_concurrency: 0,
            password_reset_ttl_secs: 1800,
            password_reset_webhook_url: None,
            gateway_tls_cert_path: None,
            gateway_tls_key_path: None,
            gateway_tls_reload_secs: 30,
            gateway_debug_echo: false,
            otel_endpoint: None,
            otel_sampling_ratio: 0.1,
            otel_trust_client_context: false,
        }
    }
}

/// The configuration after validation: parsed addresses, the effective secret and node id.
#[derive(Debug, Clone)]
pub struct Validated {
    pub raw: GatewayConfig,
    pub listen: SocketAddr,
    pub internal_listen: SocketAddr,
    pub node_id: String,
    pub jwt_secret: String,
    pub allowed_origins: Vec<String>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: crate::client_ip::TrustedProxies,
    /// Hosts avatar URLs may point at.
    pub avatar_hosts: Vec<String>,
    /// True when the dev secret is in use (logged as a warning at start).
    pub insecure_dev_secret: bool,
    /// Native TLS on the public port, when configured (checked to load).
    pub tls: Option<crate::tls::TlsFiles>,
    /// Span export, when `otel_endpoint` is set.
    pub tracing: chat_core::telemetry::TracingSettings,
    /// The external identity provider, when `jwt_jwks_path` is set (checked to load).
    pub external_jwt: Option<ExternalJwt>,
    /// When a send is acked.
    pub durability: chat_core::log::Durability,
    /// Where Redis is (with `backend = redis`).
    pub redis_target: chat_core::redis_conn::RedisTarget,
}

/// An external identity provider's JWKS document, issuer and audience.
#[derive(Debug, Clone)]
pub struct ExternalJwt {
    /// Where the JWKS file is (read again every `jwt_jwks_reload_secs`).
    pub path: String,
    pub jwks: String,
    pub issuer: String,
    pub audience: String,
}

impl ExternalJwt {
    /// The provider's keys.
    pub fn provider(&self) -> Result<crate::auth::ExternalProvider, crate::auth::JwksError> {
        crate::auth::ExternalProvider::from_jwks(&self.jwks, &self.issuer, &self.audience)
    }
}

impl GatewayConfig {
    /// Loads from defaults, the optional TOML file and the environment.
    pub fn load(file: Option<&Path>) -> Result<Validated, SettingsError> {
        settings::load::<GatewayConfig>(file)?.validate()
    }

    /// Checks every setting; the error names the first bad key.
    pub fn validate(self) -> Result<Validated, SettingsError> {
        let listen = settings::parse_listen("gateway_listen", &self.gateway_listen)?;
        let internal_listen =
            settings::parse_listen("gateway_internal_listen", &self.gateway_internal_listen)?;
        settings::check_prefix("redis_prefix", &self.redis_prefix)?;
        let redis_url = (self.backend == BackendKind::Redis).then_some(self.redis_url.as_str());
        settings::check_urls(redis_url, &self.database_url)?;
        if self.redis_partitions == 0 || self.redis_partitions > 1024 {
            return Err(SettingsError::invalid(
                "redis_partitions",
                "must be 1 to 1024",
            ));
        }
        let durability = self.durability()?;
        if !(self.redis_memory_refuse_ratio > 0.0 && self.redis_memory_refuse_ratio <= 1.0) {
            return Err(SettingsError::invalid(
                "redis_memory_refuse_ratio",
                "must be above 0 and at most 1",
            ));
        }
        let redis_target = match self.backend {
            BackendKind::Redis => {
                settings::redis_target(&self.redis_url, &self.redis_cluster_urls)?
            }
            // Not read by the memory backend.
            BackendKind::Memory => {
                chat_core::redis_conn::RedisTarget::Single(self.redis_url.clone())
            }
        };
        let positive = [
            ("jwt_ttl_secs", self.jwt_ttl_secs as usize),
            ("jwt_jwks_reload_secs", self.jwt_jwks_reload_secs as usize),
            (
                "gateway_heartbeat_secs",
                self.gateway_heartbeat_secs as usize,
            ),
            ("gateway_max_body_bytes", self.gateway_max_body_bytes),
            ("gateway_outbound_queue", self.gateway_outbound_queue),
            (
                "gateway_outbound_queue_bytes",
                self.gateway_outbound_queue_bytes,
            ),
            (
                "gateway_outbound_node_bytes",
                self.gateway_outbound_node_bytes,
            ),
            ("gateway_pg_pool_size", self.gateway_pg_pool_size),
            (
                "gateway_subscribe_timeout_ms",
                self.gateway_subscribe_timeout_ms as usize,
            ),
            (
                "gateway_delivery_canary_interval_ms",
                self.gateway_delivery_canary_interval_ms as usize,
            ),
            (
                "gateway_delivery_canary_timeout_ms",
                self.gateway_delivery_canary_timeout_ms as usize,
            ),
            (
                "gateway_history_tail_len",
                self.gateway_history_tail_len as usize,
            ),
            (
                "gateway_history_tail_ttl_secs",
                self.gateway_history_tail_ttl_secs as usize,
            ),
            (
                "gateway_history_tail_max_bytes",
                usize::try_from(self.gateway_history_tail_max_bytes).unwrap_or(usize::MAX),
            ),
            ("gateway_max_room_members", self.gateway_max_room_members),
            (
                "gateway_max_rooms_per_user",
                self.gateway_max_rooms_per_user,
            ),
            ("gateway_max_connections", self.gateway_max_connections),
            (
                "gateway_membership_recheck_secs",
                self.gateway_membership_recheck_secs as usize,
            ),
            (
                "gateway_room_reload_secs",
                self.gateway_room_reload_secs as usize,
            ),
            (
                "gateway_send_rate_per_sec",
                self.gateway_send_rate_per_sec as usize,
            ),
            (
                "gateway_frame_budget_per_sec",
                self.gateway_frame_budget_per_sec as usize,
            ),
            (
                "gateway_account_send_rate_per_sec",
                self.gateway_account_send_rate_per_sec as usize,
            ),
            ("redis_memory_check_ms", self.redis_memory_check_ms as usize),
            ("gateway_max_watched_users", self.gateway_max_watched_users),
            (
                "presence_heartbeat_secs",
                self.presence_heartbeat_secs as usize,
            ),
            (
                "gateway_send_dedup_window_secs",
                self.gateway_send_dedup_window_secs as usize,
            ),
            (
                "redis_log_max_backlog",
                usize::try_from(self.redis_log_max_backlog).unwrap_or(usize::MAX),
            ),
            (
                "password_reset_ttl_secs",
                self.password_reset_ttl_secs as usize,
            ),
            (
                "gateway_handshakes_per_ip_per_sec",
                self.gateway_handshakes_per_ip_per_sec as usize,
            ),
            (
                "gateway_max_connections_per_user",
                self.gateway_max_connections_per_user,
            ),
            (
                "gateway_login_failures_per_email_ip",
                self.gateway_login_failures_per_email_ip as usize,
            ),
            (
                "gateway_login_failures_per_ip",
                self.gateway_login_failures_per_ip as usize,
            ),
            (
                "gateway_login_window_secs",
                self.gateway_login_window_secs as usize,
            ),
            (
                "gateway_registrations_per_ip",
                self.gateway_registrations_per_ip as usize,
            ),
            (
                "gateway_registrations_total",
                self.gateway_registrations_total as usize,
            ),
            (
                "gateway_registration_window_secs",
                self.gateway_registration_window_secs as usize,
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(SettingsError::invalid(key, "must be greater than 0"));
        }
        if self.gateway_client_timeout_secs <= self.gateway_heartbeat_secs {
            return Err(SettingsError::invalid(
                "gateway_client_timeout_secs",
                "must be greater than gateway_heartbeat_secs",
            ));
        }
        if self.presence_ttl_secs <= self.presence_heartbeat_secs {
            return Err(SettingsError::invalid(
                "presence_ttl_secs",
                "must be greater than presence_heartbeat_secs",
            ));
        }
        if self.gateway_max_frame_bytes < self.gateway_max_body_bytes + 512 {
            return Err(SettingsError::invalid(
                "gateway_max_frame_bytes",
                "must exceed gateway_max_body_bytes by at least 512 bytes of envelope",
            ));
        }
        let (jwt_secret, insecure_dev_secret) = match (&self.jwt_secret, self.dev_mode) {
            (Some(s), _) if s.len() >= 32 => (s.clone(), false),
            (Some(_), _) => {
                return Err(SettingsError::invalid(
                    "jwt_secret",
                    "must be at least 32 bytes",
                ))
            }
            (None, true) => (DEV_JWT_SECRET.to_string(), true),
            (None, false) => return Err(SettingsError::invalid(
                "jwt_secret",
                "is required (set CHAT_JWT_SECRET, or CHAT_DEV_MODE=true for local development)",
            )),
        };
        let tls = match (
            self.gateway_tls_cert_path
                .as_deref()
                .filter(|p| !p.is_empty()),
            self.gateway_tls_key_path
                .as_deref()
                .filter(|p| !p.is_empty()),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                if self.gateway_tls_reload_secs == 0 {
                    return Err(SettingsError::invalid(
                        "gateway_tls_reload_secs",
                        "must be greater than 0",
                    ));
                }
                let files = crate::tls::TlsFiles {
                    cert: cert.into(),
                    key: key.into(),
                    reload_every: std::time::Duration::from_secs(self.gateway_tls_reload_secs),
                };
                crate::tls::load(&files.cert, &files.key)
                    .map_err(|e| SettingsError::invalid("gateway_tls_cert_path", e.to_string()))?;
                Some(files)
            }
            (Some(_), None) => {
                return Err(SettingsError::invalid(
                    "gateway_tls_key_path",
                    "is required when gateway_tls_cert_path is set",
                ))
            }
            (None, Some(_)) => {
                return Err(SettingsError::invalid(
                    "gateway_tls_cert_path",
                    "is required when gateway_tls_key_path is set",
                ))
            }
        };
        if self.gateway_trust_forwarded_for == Some(true) {
            return Err(SettingsError::invalid(
                "gateway_trust_forwarded_for",
                "is replaced by gateway_trusted_proxies (the CIDRs of your proxies)",
            ));
        }
        let trusted_proxies =
            crate::client_ip::TrustedProxies::parse(&self.gateway_trusted_proxies)
                .map_err(|e| SettingsError::invalid("gateway_trusted_proxies", e))?;
        let avatar_hosts = crate::fields::parse_avatar_hosts(&self.avatar_hosts)
            .map_err(|e| SettingsError::invalid("avatar_hosts", e))?;
        let otel_endpoint =
            settings::check_tracing(self.otel_endpoint.as_deref(), self.otel_sampling_ratio)?;
        let external_jwt = self.external_jwt()?;
        let allowed_origins = self
            .gateway_allowed_origins
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect();
        let node_id = self
            .gateway_node_id
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| settings::hostname_or("gateway"));
        let tracing = chat_core::telemetry::TracingSettings {
            endpoint: otel_endpoint,
            sampling_ratio: self.otel_sampling_ratio,
            service_name: "chat-gateway",
            instance: node_id.clone(),
        };
        Ok(Validated {
            raw: self,
            listen,
            internal_listen,
            node_id,
            jwt_secret,
            allowed_origins,
            trusted_proxies,
            avatar_hosts,
            insecure_dev_secret,
            tls,
            tracing,
            external_jwt,
            durability,
            redis_target,
        })
    }

    /// `ack_durability` with its timeout; `replicas` needs Redis.
    fn durability(&self) -> Result<chat_core::log::Durability, SettingsError> {
        use chat_core::log::Durability;
        let durability: Durability = self
            .ack_durability
            .parse()
            .map_err(|e| SettingsError::invalid("ack_durability", e))?;
        if !(1..=2500).contains(&self.ack_replica_timeout_ms) {
            return Err(SettingsError::invalid(
                "ack_replica_timeout_ms",
                "must be 1 to 2500 (an append answers within 3 s)",
            ));
        }
        match durability {
            Durability::Leader => Ok(durability),
            Durability::Replicas { .. } if self.backend == BackendKind::Memory => {
                Err(SettingsError::invalid(
                    "ack_durability",
                    "replicas needs backend = redis (memory acks after the Postgres commit)",
                ))
            }
            Durability::Replicas { count, .. } => Ok(Durability::Replicas {
                count,
                timeout: std::time::Duration::from_millis(self.ack_replica_timeout_ms),
            }),
        }
    }

    /// Reads and checks the external provider's settings and JWKS file.
    fn external_jwt(&self) -> Result<Option<ExternalJwt>, SettingsError> {
        let Some(path) = self.jwt_jwks_path.as_deref().filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let required = |key: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .ok_or_else(|| SettingsError::invalid(key, "is required when jwt_jwks_path is set"))
        };
        let external = ExternalJwt {
            path: path.to_string(),
            jwks: std::fs::read_to_string(path)
                .map_err(|e| SettingsError::invalid("jwt_jwks_path", format!("{path}: {e}")))?,
            issuer: required("jwt_external_issuer", &self.jwt_external_issuer)?,
            audience: required("jwt_external_audience", &self.jwt_external_audience)?,
        };
        external
            .provider()
            .map_err(|e| SettingsError::invalid("jwt_jwks_path", e.to_string()))?;
        Ok(Some(external))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> GatewayConfig {
        GatewayConfig {
            jwt_secret: Some("x".repeat(32)),
            ..GatewayConfig::default()
        }
    }

    /// Without a secret the gateway refuses to start unless dev mode is on.
    #[test]
    fn secret_required_unless_dev_mode() {
        let err = GatewayConfig::default()
            .validate()
            .expect_err("no secret")
            .to_string();
        assert!(err.contains("jwt_secret"), "{err}");
        let dev = GatewayConfig {
            dev_mode: true,
            ..GatewayConfig::default()
        }
        .validate()
        .expect("dev mode");
        assert!(dev.insecure_dev_secret);
    }

    /// A bad listen address is reported by key.
    #[test]
    fn bad_listen_names_key() {
        let err = GatewayConfig {
            gateway_listen: "nope".into(),
            ..base()
        }
        .validate()
        .expect_err("bad")
        .to_string();
        assert!(
            err.contains("gateway_listen") && err.contains("CHAT_GATEWAY_LISTEN"),
            "{err}"
        );
    }

    /// `ack_durability` is `leader` or `replicas:<1-16>` (with Redis), and names itself when not.
    #[test]
    fn ack_durability_parses_or_names_its_key() {
        use chat_core::log::Durability;
        let mut config = base();
        config.ack_durability = "replicas:2".into();
        config.ack_replica_timeout_ms = 700;
        assert_eq!(
            config.clone().validate().expect("valid").durability,
            Durability::Replicas {
                count: 2,
                timeout: std::time::Duration::from_millis(700)
            }
        );
        for bad in ["replicas:0", "replicas", "all", "replicas:17"] {
            let mut config = base();
            config.ack_durability = bad.into();
            let err = config.validate().expect_err(bad).to_string();
            assert!(err.contains("ack_durability"), "{err}");
        }
        let memory = GatewayConfig {
            backend: BackendKind::Memory,
            ack_durability: "replicas:1".into(),
            ..base()
        };
        assert!(memory.validate().is_err(), "replicas needs redis");
    }

    /// Every count, rate and period must be positive: zero would refuse all traffic or spin.
    #[test]
    fn zero_limits_name_their_key() {
        type Zero = fn(&mut GatewayConfig);
        let cases: [(&str, Zero); 5] = [
            ("gateway_send_rate_per_sec", |c| {
                c.gateway_send_rate_per_sec = 0
            }),
            ("presence_heartbeat_secs", |c| c.presence_heartbeat_secs = 0),
            ("gateway_max_connections", |c| c.gateway_max_connections = 0),
            ("gateway_send_dedup_window_secs", |c| {
                c.gateway_send_dedup_window_secs = 0
            }),
            ("redis_log_max_backlog", |c| c.redis_log_max_backlog = 0),
        ];
        for (key, set) in cases {
            let mut config = base();
            set(&mut config);
            let err = config.validate().expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    /// A cluster is chosen by its seed URLs, each checked; without them, the single URL.
    #[test]
    fn cluster_urls_choose_the_cluster() {
        use chat_core::redis_conn::RedisTarget;
        let config = GatewayConfig {
            redis_cluster_urls: " redis://a:7000, redis://b:7001 ,".into(),
            ..base()
        };
        assert_eq!(
            config.validate().expect("valid").redis_target,
            RedisTarget::Cluster(vec!["redis://a:7000".into(), "redis://b:7001".into()])
        );
        let bad = GatewayConfig {
            redis_cluster_urls: "redis://a:7000,http://b".into(),
            ..base()
        };
        let err = bad.validate().expect_err("bad seed").to_string();
        assert!(err.contains("redis_cluster_urls"), "{err}");
        assert_eq!(
            base().validate().expect("valid").redis_target,
            RedisTarget::Single("redis://127.0.0.1:6379".into())
        );
    }

    /// The backend is `redis` by default; `memory` takes no Redis URL, `redis` checks it.
    #[test]
    fn backend_choice() {
        assert_eq!(
            base().validate().expect("valid").raw.backend,
            BackendKind::Redis
        );
        let bad_redis = GatewayConfig {
            redis_url: "http://nope".into(),
            ..base()
        };
        let err = bad_redis
            .clone()
            .validate()
            .expect_err("bad url")
            .to_string();
        assert!(err.contains("redis_url"), "{err}");
        let memory = GatewayConfig {
            backend: BackendKind::Memory,
            ..bad_redis
        };
        assert!(memory.validate().is_ok(), "memory does not use redis_url");
    }

    /// Origins are split, trimmed and normalised without a trailing slash.
    #[test]
    fn origins_are_parsed() {
        let v = GatewayConfig {
            gateway_allowed_origins: " https://a.example/ ,https://b.example,,".into(),
            ..base()
        }
        .validate()
        .expect("valid");
        assert_eq!(
            v.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
    }
}
