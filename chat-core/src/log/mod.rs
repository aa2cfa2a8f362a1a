//! The message log: the durable record an `ack` points to. Gateways append to it ([`MessageLog`]:
//! a gap-free seq per conversation, idempotent on the sender's client id, published to the
//! message's topics in the same step) and read its recent tail; persistence workers drain it
//! into Postgres partition by partition ([`LogConsumer`]), acking only what has committed.
//!
//! Implementations: [`redis`] (streams, one script per append), [`memory`] (one process; an
//! append is acked once the in-process sink has committed it).

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use chat_protocol::MessageFrame;
use uuid::Uuid;

use crate::backend::BackendError;
use crate::message::{Appended, NewMessage, StoredMessage};

/// Default length of a conversation's tail (recent messages kept for history and sync).
pub const DEFAULT_TAIL_LEN: u32 = 1000;
/// Default bound on the bytes of a conversation's tail (its frames): 512 KiB holds 1,000 frames
/// of about 500 bytes, or about 110 of the largest (4 KiB bodies).
pub const DEFAULT_TAIL_MAX_BYTES: u64 = 512 * 1024;
/// Default idle lifetime of a conversation's tail.
pub const DEFAULT_TAIL_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Default window in which a repeated client id gets the original ack.
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Default bound on the entries a partition holds (its backlog): appends beyond it are refused
/// (`unavailable`). It is also how far a counter jumps when Redis may have lost seqs it issued.
pub const DEFAULT_MAX_BACKLOG: u64 = 1_000_000;

/// What the log keeps beside the entries: the tail and the idempotency records.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Recent messages kept per conversation.
    pub tail_len: u32,
    /// Most bytes of frames a conversation's tail keeps.
    pub tail_max_bytes: u64,
    /// How long a conversation's tail lives after its last message.
    pub tail_ttl_ms: u64,
    /// How long a client id is remembered.
    pub dedup_window_ms: u64,
    /// Entries a partition may hold before appends are refused. Every message appended and not
    /// yet in Postgres is among them, so no conversation has more seqs issued beyond what
    /// Postgres holds: the margin a re-base adds (see [`SeqFloor`]).
    pub max_backlog: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            tail_len: DEFAULT_TAIL_LEN,
            tail_max_bytes: DEFAULT_TAIL_MAX_BYTES,
            tail_ttl_ms: DEFAULT_TAIL_TTL_MS,
            dedup_window_ms: DEFAULT_DEDUP_WINDOW_MS,
            max_backlog: DEFAULT_MAX_BACKLOG,
        }
    }
}

/// When an append is acked: what the log must have done with it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Once the log's primary applied it (on Redis: the master ran the script). A failover
    /// to a replica that had not received it loses it.
    #[default]
    Leader,
    /// Once `count` replicas confirmed it (Redis `WAIT`), within `timeout`; otherwise the
    /// sender is told `unavailable`, and a retry with the same client id is idempotent.
    Replicas {
        count: u32,
        timeout: std::time::Duration,
    },
}

impl std::str::FromStr for Durability {
    type Err = String;

    /// `leader` or `replicas:<N>` (N from 1 to 16).
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "leader" {
            return Ok(Durability::Leader);
        }
        let count = text
            .strip_prefix("replicas:")
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| format!("{text:?} is neither `leader` nor `replicas:<1-16>`"))?;
        Ok(Durability::Replicas {
            count,
            timeout: std::time::Duration::from_millis(1000),
        })
    }
}

/// What a log that can lose data (Redis after a restart, failover or flush) consults in the
/// durable store so that it never issues a seq twice: how far Postgres holds a conversation,
/// a record of every epoch it opens, and the seq ranges a re-base skipped. Implemented by
/// [`crate::store::Store`].
#[async_trait]
pub trait SeqFloor: Send + Sync {
    /// The conversation's highest seq in Postgres (0 without messages).
    async fn persisted_last_seq(&self, conversation: Uuid) -> Result<i64, BackendError>;
    /// Records a new epoch of `partition` in the log named `prefix`; true when seqs were
    /// issued in an earlier epoch of it (so some may be lost to the log).
    async fn open_epoch(
        &self,
        prefix: &str,
        partition: u16,
        epoch: &str,
    ) -> Result<bool, BackendError>;
    /// Marks `epoch` as one seqs are issued in; called before the first is.
    async fn mark_used(
        &self,
        prefix: &str,
        partition: u16,
        epoch: &str,
    ) -> Result<(), BackendError>;
    /// Records that seqs `lo..=hi` of `conversation` will never hold a message.
    async fn record_gap(&self, conversation: Uuid, lo: i64, hi: i64) -> Result<(), BackendError>;
}

/// The gateway's side of the log.
#[async_trait]
pub trait MessageLog: Send + Sync {
    /// Appends `msg` with the conversation's next seq and publishes it to its topics, unless
    /// its sender appended `client_id` in this conversation within the dedup window (then the
    /// original message is answered and nothing changes). `origin` is the sending connection,
    /// which gets the ack instead of the message. Answers within about 3 s. On an error the
    /// append may still have taken effect: the client is told `unavailable`, never acked, and a
    /// retry with the same client id finds it.
    async fn append(
        &self,
        msg: &NewMessage,
        client_id: &str,
        origin: Uuid,
    ) -> Result<Appended, BackendError>;

    /// The conversation's last seq: every seq from 1 to it is taken. 0 without messages.
    async fn last_seq(&self, conversation: Uuid) -> Result<i64, BackendError>;

    /// What the conversation's tail holds of `lo..=hi` (possibly nothing), ascending.
    async fn recent(
        &self,
        conversation: Uuid,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<MessageFrame>, BackendError>;

    /// The two members of a direct conversation, known from its first message on.
    async fn direct_pair(&self, conversation: Uuid) -> Result<Option<(Uuid, Uuid)>, BackendError>;

    /// Whether any of `seqs` of the conversation is still waiting to be written to Postgres:
    /// delivered to a persistence worker that has not acked it (perhaps a dead one, until its
    /// entries are claimed). History must not skip such a seq as lost.
    async fn in_flight(&self, conversation: Uuid, seqs: &[i64]) -> Result<bool, BackendError>;
}

/// Why a log entry could not be decoded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("field {0} is missing")]
    Missing(&'static str),
    #[error("field {0} is malformed")]
    Malformed(&'static str),
}

/// One entry as a consumer reads it.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// The entry's id in its partition (acked by it).
    pub id: String,
    /// The message, or why the entry is not one (it is dead-lettered).
    pub message: Result<StoredMessage, DecodeError>,
    /// The accepting span's `traceparent`, when the send was traced.
    pub trace_parent: Option<String>,
    /// The entry's fields as stored, kept for a dead letter.
    pub raw: Vec<(String, Vec<u8>)>,
}

/// Where a read starts.
#[derive(Debug, Clone, Copy)]
pub enum ReadFrom {
    /// This consumer's own entries, read before and not acked (after a restart).
    Pending,
    /// Entries no consumer of the group has read, waiting up to `block` for one.
    New { block: Duration },
}

/// A page of entries claimed from consumers that stopped acking them.
#[derive(Debug, Default)]
pub struct ClaimPage {
    pub entries: Vec<LogEntry>,
    /// Where the next page starts; `None` once every idle entry was visited.
    pub next: Option<String>,
}

/// What a partition holds, for the worker's gauges.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PartitionStats {
    /// Entries read but not acked.
    pub pending: i64,
    /// Entries in the partition.
    pub length: i64,
    /// Age of the oldest unacked entry, seconds (0 when none).
    pub oldest_pending_age_secs: i64,
}

/// The consumer group's side of the log (the persistence workers').
#[async_trait]
pub trait LogConsumer: Send + Sync {
    /// How many partitions the log has; each is drained by one loop.
    fn partitions(&self) -> u16;
    /// A reader of `partition` for the consumer named `consumer`, with the group created.
    async fn reader(
        &self,
        partition: u16,
        consumer: &str,
    ) -> Result<Box<dyn PartitionReader>, BackendError>;
}

/// One consumer's reader of one partition.
#[async_trait]
pub trait PartitionReader: Send + Sync {
    /// Up to `count` entries.
    async fn read(&mut self, from: ReadFrom, count: usize) -> Result<Vec<LogEntry>, BackendError>;
    /// Takes over up to `count` entries idle for `min_idle` on any consumer, from `cursor`
    /// (`"0-0"` first).
    async fn claim(
        &mut self,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<ClaimPage, BackendError>;
    /// Acknowledges entries whose messages have committed; returns how many were pending.
    async fn ack(&mut self, ids: &[&str]) -> Result<u64, BackendError>;
    /// Moves an entry that can never be written to the dead letters, with the reason, and acks it.
    async fn dead_letter(&mut self, entry: &LogEntry, reason: &str) -> Result<(), BackendError>;
    /// Drops entries no consumer needs any more (acked, and older than `retention`), and
    /// reports what the partition holds.
    async fn trim(&mut self, retention: Duration) -> Result<PartitionStats, BackendError>;
}
