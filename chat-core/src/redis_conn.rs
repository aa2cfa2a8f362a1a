//! The Redis plumbing the Redis backend's roles share: where Redis is ([`RedisTarget`]: one
//! instance, or a Redis Cluster), one multiplexed, self-reconnecting command connection per
//! process (on a cluster, one per master, following MOVED/ASK, slot changes and failovers),
//! every call bounded in time and counted by operation, and the readiness probe on it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::backend::BackendError;

/// Longest one command, pipeline or script may take (connecting included).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the readiness PING may take.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

impl From<redis::RedisError> for BackendError {
    fn from(e: redis::RedisError) -> Self {
        BackendError::Unavailable(e.to_string())
    }
}

/// Where the Redis backend lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One instance (possibly with replicas), at this URL.
    Single(String),
    /// A Redis Cluster, found through these seed nodes.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// The target the settings name: the cluster when `cluster_urls` (comma-separated) is not
    /// empty, else `url`.
    pub fn from_settings(url: &str, cluster_urls: &str) -> Self {
        let seeds: Vec<String> = cluster_urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if seeds.is_empty() {
            RedisTarget::Single(url.to_string())
        } else {
            RedisTarget::Cluster(seeds)
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }

    /// Every URL it names.
    pub fn urls(&self) -> Vec<&str> {
        match self {
            RedisTarget::Single(url) => vec![url.as_str()],
            RedisTarget::Cluster(seeds) => seeds.iter().map(String::as_str).collect(),
        }
    }

    /// A cluster client for these seeds; `resp3` with pushes delivered to `pushes`.
    pub fn cluster_client<P: redis::aio::AsyncPushSender>(
        seeds: &[String],
        response_timeout: Duration,
        pushes: Option<P>,
    ) -> Result<ClusterClient, BackendError> {
        let mut builder = ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(COMMAND_TIMEOUT)
            .response_timeout(response_timeout)
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(1000);
        if let Some(pushes) = pushes {
            builder = builder
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes);
        }
        Ok(builder.build()?)
    }
}

/// A connection: to one instance (self-reconnecting, or plain multiplexed for a connection of
/// its own), or to every master of a cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Multiplexed(redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Multiplexed(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Multiplexed(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Multiplexed(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How a [`Commands`] connects.
#[derive(Clone)]
enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// What a Redis Cluster looks like from one of its nodes (`CLUSTER NODES`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClusterHealth {
    /// Masters that own slots and are not marked failed.
    pub masters: i64,
    /// Of those, masters without a replica that is not marked failed: their next failure loses
    /// their slots until someone intervenes.
    pub masters_without_replica: i64,
    /// Slots no live master owns (a shard is down).
    pub slots_uncovered: i64,
}

/// One line of `CLUSTER NODES` as far as we use it.
struct NodeLine<'a> {
    id: &'a str,
    master: bool,
    /// Agreed failed (`fail`); a node only suspected (`fail?`) still counts as live.
    failed: bool,
    /// The master a replica follows.
    master_id: &'a str,
    /// Slot ranges (`0-5460`, single slots; migration markers `[..]` left out).
    slots: Vec<&'a str>,
}

fn node_lines(nodes: &str) -> impl Iterator<Item = NodeLine<'_>> {
    nodes.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return None;
        }
        let flags: Vec<&str> = fields[2].split(',').collect();
        Some(NodeLine {
            id: fields[0],
            master: flags.contains(&"master"),
            failed: flags.contains(&"fail"),
            master_id: fields[3],
            slots: fields[8..]
                .iter()
                .copied()
                .filter(|r| !r.starts_with('['))
                .collect(),
        })
    })
}

/// Which live master (by node id) owns which slot ranges, sorted: compared over time, a change
/// means a failover, a demotion or a migration.
pub fn slot_owners(nodes: &str) -> Vec<(String, String)> {
    let mut owners: Vec<(String, String)> = node_lines(nodes)
        .filter(|n| n.master && !n.failed && !n.slots.is_empty())
        .map(|n| (n.slots.join(" "), n.id.to_string()))
        .collect();
    owners.sort();
    owners
}

impl ClusterHealth {
    /// Reads the text of `CLUSTER NODES`.
    pub fn parse(nodes: &str) -> Self {
        let lines: Vec<NodeLine> = node_lines(nodes).filter(|n| !n.failed).collect();
        let mut replicas_of: std::collections::HashMap<&str, i64> = Default::default();
        for n in lines.iter().filter(|n| !n.master) {
            *replicas_of.entry(n.master_id).or_default() += 1;
        }
        let masters: Vec<(&str, i64)> = lines
            .iter()
            .filter(|n| n.master)
            .map(|n| {
                let slots = n
                    .slots
                    .iter()
                    .map(|r| match r.split_once('-') {
                        Some((a, b)) => match (a.parse::<i64>(), b.parse::<i64>()) {
                            (Ok(a), Ok(b)) => b - a + 1,
                            _ => 0,
                        },
                        None => i64::from(r.parse::<i64>().is_ok()),
                    })
                    .sum();
                (n.id, slots)
            })
            .filter(|(_, slots)| *slots > 0)
            .collect();
        let covered: i64 = masters.iter().map(|(_, n)| n).sum();
        ClusterHealth {
            masters: masters.len() as i64,
            masters_without_replica: masters
                .iter()
                .filter(|(id, _)| replicas_of.get(id).copied().unwrap_or(0) == 0)
                .count() as i64,
            slots_uncovered: (16384 - covered).max(0),
        }
    }
}

/// The Redis metrics of one binary, registered by it under its own names.
#[derive(Clone)]
pub struct RedisMetrics {
    /// Round trip of a command, pipeline or script, by operation.
    pub command_seconds: HistogramVec,
    /// Failed operations, by operation.
    pub errors: IntCounterVec,
    /// Channels the node's pub/sub connection is subscribed to.
    pub subscriptions: IntGauge,
    /// Times the pub/sub connection was established again.
    pub reconnects: IntCounter,
    /// What the log did about Redis losing data and its bounds, by event: `epoch_opened`,
    /// `rebased` (a counter validated in a new epoch), `backlog_full` (an append refused),
    /// `replicas_short` (fewer replicas than `ack_durability` asks confirmed an append).
    pub log_events: IntCounterVec,
}

/// The value of `name` in `INFO` text (`name:value` lines).
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// What one Redis node's `INFO` says of what an acked message relies on: persistence, the
/// eviction policy and room left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node (its address, or the configured URL on one instance).
    pub node: String,
    /// `appendonly yes`: an acked append survives a restart of the process.
    pub aof: bool,
    /// `maxmemory-policy`: only `noeviction` never drops a stream or a counter to make room.
    pub eviction: String,
    /// `used_memory`, bytes.
    pub used_memory: u64,
    /// `maxmemory`, bytes; 0 when unlimited.
    pub maxmemory: u64,
}

impl NodeInfo {
    /// From `INFO` text (`aof_enabled:1`, `maxmemory_policy:noeviction`).
    pub fn parse(node: String, info: &str) -> Self {
        let field = |name: &str| info_field(info, name).unwrap_or_default();
        NodeInfo {
            node,
            aof: field("aof_enabled") == "1",
            eviction: field("maxmemory_policy").to_string(),
            used_memory: field("used_memory").parse().unwrap_or(0),
            maxmemory: field("maxmemory").parse().unwrap_or(0),
        }
    }

    /// `used_memory / maxmemory`; `None` without a limit.
    pub fn memory_ratio(&self) -> Option<f64> {
        (self.maxmemory > 0).then(|| self.used_memory as f64 / self.maxmemory as f64)
    }

    /// What is wrong with it for holding acked messages, if anything.
    pub fn problem(&self) -> Option<String> {
        match (self.aof, self.eviction == "noeviction") {
            (true, true) => None,
            (false, true) => Some(format!("{}: appendonly is off", self.node)),
            (true, false) => Some(format!(
                "{}: maxmemory-policy is {:?}, not noeviction",
                self.node, self.eviction
            )),
            (false, false) => Some(format!(
                "{}: appendonly is off and maxmemory-policy is {:?}, not noeviction",
                self.node, self.eviction
            )),
        }
    }
}

/// The shared command connection, opened at first use. Concurrent calls pipeline on it; while
/// it reconnects, calls fail (the caller answers `unavailable`). A pool would cost a
/// health-check round trip per message (measured in docs/benchmarks.md).
#[derive(Clone)]
pub struct Commands {
    client: Client,
    target: RedisTarget,
    conn: Arc<tokio::sync::OnceCell<Conn>>,
    metrics: Option<RedisMetrics>,
}

impl Commands {
    /// Commands against one instance at `url`; `metrics` are recorded when given.
    pub fn new(url: &str, metrics: Option<RedisMetrics>) -> Result<Self, BackendError> {
        Self::open(&RedisTarget::Single(url.to_string()), metrics)
    }

    /// Commands against `target`; `metrics` are recorded when given.
    pub fn open(target: &RedisTarget, metrics: Option<RedisMetrics>) -> Result<Self, BackendError> {
        let client = match target {
            RedisTarget::Single(url) => Client::Single(redis::Client::open(url.as_str())?),
            RedisTarget::Cluster(seeds) => Client::Cluster(RedisTarget::cluster_client(
                seeds,
                COMMAND_TIMEOUT,
                None::<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
            )?),
        };
        Ok(Commands {
            client,
            target: target.clone(),
            conn: Arc::new(tokio::sync::OnceCell::new()),
            metrics,
        })
    }

    /// Where these commands go.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// The single instance's client, for connections of its own (pub/sub); `None` on a
    /// cluster.
    pub fn client(&self) -> Option<&redis::Client> {
        match &self.client {
            Client::Single(c) => Some(c),
            Client::Cluster(_) => None,
        }
    }

    /// The metrics, when recorded.
    pub fn metrics(&self) -> Option<&RedisMetrics> {
        self.metrics.as_ref()
    }

    /// Counts a failed operation `op` (when metrics are recorded).
    pub fn count_error(&self, op: &str) {
        if let Some(m) = &self.metrics {
            m.errors.with_label_values(&[op]).inc();
        }
    }

    /// Sets the pub/sub subscriptions gauge (when metrics are recorded).
    pub fn set_subscriptions(&self, n: usize) {
        if let Some(m) = &self.metrics {
            m.subscriptions.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    async fn conn(&self) -> Result<Conn, BackendError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                match &self.client {
                    Client::Single(client) => {
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(COMMAND_TIMEOUT)
                            .set_number_of_retries(2)
                            .set_max_delay(1000);
                        ConnectionManager::new_with_config(client.clone(), config)
                            .await
                            .map(Conn::Single)
                    }
                    Client::Cluster(client) => {
                        client.get_async_connection().await.map(Conn::Cluster)
                    }
                }
            })
            .await?;
        Ok(conn.clone())
    }

    /// Runs `op` on the shared connection within [`COMMAND_TIMEOUT`]; times it and counts a
    /// failure under `label`.
    pub async fn run<T, F, Fut>(&self, label: &str, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let conn = self.conn().await?;
            Ok::<_, BackendError>(op(conn).await?)
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(COMMAND_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(BackendError::Timeout));
        if let Some(m) = &self.metrics {
            m.command_seconds
                .with_label_values(&[label])
                .observe(started.elapsed().as_secs_f64());
            if result.is_err() {
                m.errors.with_label_values(&[label]).inc();
            }
        }
        result
    }

    /// Every node's `INFO` (persistence, eviction, memory): the one instance, or every node of a
    /// cluster, replicas included (one of them may be promoted).
    pub async fn node_info(&self) -> Result<Vec<NodeInfo>, BackendError> {
        let info: Value = self
            .run("command", |conn| async move {
                let info = redis::cmd("INFO");
                match conn {
                    Conn::Cluster(mut c) => {
                        c.route_command(
                            &info,
                            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None)),
                        )
                        .await
                    }
                    mut conn => info.query_async(&mut conn).await,
                }
            })
            .await?;
        let text = |v: &Value| redis::from_redis_value::<String>(v).ok();
        let per_node: Vec<(String, String)> = match &info {
            Value::Map(nodes) => nodes
                .iter()
                .filter_map(|(addr, info)| Some((text(addr)?, text(info)?)))
                .collect(),
            single => text(single)
                .map(|t| vec![(self.target.urls().join(","), t)])
                .unwrap_or_default(),
        };
        Ok(per_node
            .into_iter()
            .map(|(node, info)| NodeInfo::parse(node, &info))
            .collect())
    }

    /// The cluster's shape, as one node sees it; `None` on one instance.
    pub async fn cluster_health(&self) -> Result<Option<ClusterHealth>, BackendError> {
        if !self.target.is_cluster() {
            return Ok(None);
        }
        Ok(Some(ClusterHealth::parse(&self.cluster_nodes().await?)))
    }

    /// The text of `CLUSTER NODES` from one node of the cluster, on the command connection.
    pub async fn cluster_nodes(&self) -> Result<String, BackendError> {
        self.run("command", |mut conn| async move {
            redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut conn)
                .await
        })
        .await
    }

    /// Runs a pipeline and returns its replies.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        label: &str,
        pipe: &redis::Pipeline,
    ) -> Result<T, BackendError> {
        self.run(label, |mut conn| async move {
            pipe.query_async(&mut conn).await
        })
        .await
    }

    /// Runs a script (EVALSHA, loading it after a flush) and returns its reply.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        label: &str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, BackendError> {
        self.run(label, |mut conn| async move {
            invocation.invoke_async(&mut conn).await
        })
        .await
    }
}

#[async_trait]
impl crate::admin::Probe for Commands {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn ready(&self) -> bool {
        let ping = async {
            let mut conn = self.conn().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        };
        matches!(tokio::time::timeout(PING_TIMEOUT, ping).await, Ok(Some(_)))
    }
}

#[cfg(test)]
mod tests {
    /// INFO fields are read whatever the surrounding lines; each missing setting is named.
    #[test]
    fn node_info_is_read_from_info() {
        let info = "# Persistence\r\nloading:0\r\naof_enabled:1\r\n# Memory\r\nused_memory:900\r\nused_memory_human:900B\r\nmaxmemory:1000\r\nmaxmemory_policy:noeviction\r\n";
        let ok = NodeInfo::parse("a".into(), info);
        assert_eq!(ok.problem(), None);
        assert_eq!(ok.memory_ratio(), Some(0.9));
        assert_eq!(
            NodeInfo::parse("u".into(), "maxmemory:0\n").memory_ratio(),
            None
        );
        let bad = NodeInfo::parse("b".into(), "aof_enabled:0\nmaxmemory_policy:allkeys-lru\n");
        let problem = bad.problem().expect("unsafe");
        assert!(
            problem.contains("appendonly is off") && problem.contains("allkeys-lru"),
            "{problem}"
        );
        assert!(NodeInfo::parse("c".into(), "").problem().is_some());
    }

    use super::*;

    /// Failed nodes do not count; a master whose only replica failed is reported, and the slots
    /// of a failed master without a successor are uncovered.
    #[test]
    fn cluster_health_parses_cluster_nodes() {
        let nodes = "\
a 127.0.0.1:7100@17100 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:7101@17101 master - 0 0 2 connected 5461-10922
c 127.0.0.1:7102@17102 master,fail - 0 0 3 connected 10923-16383
d 127.0.0.1:7103@17103 slave a 0 0 1 connected
e 127.0.0.1:7104@17104 slave,fail b 0 0 2 connected
f 127.0.0.1:7105@17105 slave,fail? a 0 0 1 connected
";
        assert_eq!(
            ClusterHealth::parse(nodes),
            ClusterHealth {
                masters: 2,
                masters_without_replica: 1,
                slots_uncovered: 5461,
            }
        );
        assert_eq!(
            slot_owners(nodes),
            vec![
                ("0-5460".to_string(), "a".to_string()),
                ("5461-10922".to_string(), "b".to_string())
            ],
            "a suspected node (fail?) still owns its slots; a failed one does not"
        );
    }
}
