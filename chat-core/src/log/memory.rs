//! The message log inside one process, with Postgres as its durable record: an append takes the
//! conversation's next seq at once but is acked only after the in-process sink (the worker's
//! consumer loop, reading this log through [`LogConsumer`]) has committed it, and is published
//! then. So an ack means "in Postgres", a crash loses nothing acked, and history needs no tail.
//!
//! Seq counters start from Postgres's `last_seq` the first time a conversation is used. Only one
//! process may own a database this way (see `gateway::backend_lock`).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytestring::ByteString;
use chat_protocol::MessageFrame;
use hashlink::LinkedHashMap;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    ClaimPage, LogConsumer, LogEntry, MessageLog, PartitionReader, PartitionStats, ReadFrom,
    Retention,
};
use crate::backend::BackendError;
use crate::message::{Appended, NewMessage, StoredMessage};
use crate::pubsub::{Envelope, MessageEnvelope, PubSub, Publication};
use crate::store::Store;

/// Appended entries not yet committed, at most; appends beyond are refused (`unavailable`).
pub const MAX_UNCOMMITTED: usize = 10_000;
/// Client ids remembered within the dedup window, at most; appends beyond are refused rather
/// than risk storing a retried message twice.
pub const MAX_DEDUP_RECORDS: usize = 500_000;
/// Conversations whose counters are kept; counters without uncommitted entries are dropped
/// beyond it (and read from Postgres again when needed).
const MAX_COUNTERS: usize = 100_000;
/// Dead letters kept for inspection (they are also logged).
const MAX_DEAD_LETTERS: usize = 1_000;
/// Longest an append waits for its commit before it answers `Timeout` (the entry stays queued:
/// it commits later, and a retry with the same client id then gets the original ack).
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(3);

/// A conversation's seq counter.
#[derive(Debug, Clone, Copy)]
struct Counter {
    /// The last seq given to a message.
    assigned: i64,
    /// The last seq committed (or dead-lettered): every seq up to it is settled.
    settled: i64,
}

/// Where a client id's message is.
#[derive(Debug)]
enum Sent {
    /// Appended, not yet committed: the entry's id.
    Pending(u64),
    /// Committed: the original ack.
    Done { seq: i64, msg_id: Uuid, ts: i64 },
}

/// A client id's record, expiring at the end of the dedup window.
#[derive(Debug)]
struct SentRecord {
    sent: Sent,
    expires: Instant,
}

/// An appended entry, until it is committed or dead-lettered.
struct Entry {
    message: StoredMessage,
    trace_parent: Option<String>,
    origin: Uuid,
    frame: ByteString,
    client_key: (Uuid, Uuid, String),
    /// Everyone waiting for the commit: the appender and any retry of the same client id.
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
}

#[derive(Default)]
struct State {
    counters: HashMap<Uuid, Counter>,
    /// Client id records by (conversation, sender, client id), oldest first.
    sent: LinkedHashMap<(Uuid, Uuid, String), SentRecord>,
    /// Every uncommitted entry by id.
    uncommitted: HashMap<u64, Entry>,
    /// Entries no consumer has read, in append order.
    queue: VecDeque<u64>,
    /// Entries read and not acked, with when they were read.
    delivered: BTreeSet<u64>,
    next_id: u64,
    dead: VecDeque<(LogEntry, String)>,
}

impl State {
    fn log_entry(&self, id: u64) -> Option<LogEntry> {
        let entry = self.uncommitted.get(&id)?;
        Some(LogEntry {
            id: entry_id(id),
            message: Ok(entry.message.clone()),
            trace_parent: entry.trace_parent.clone(),
            raw: Vec::new(),
        })
    }

    /// Drops expired client id records.
    fn expire_sent(&mut self, now: Instant) {
        while let Some((_, record)) = self.sent.front() {
            if record.expires > now {
                break;
            }
            self.sent.pop_front();
        }
    }

    /// Drops counters of conversations with nothing uncommitted, when there are too many.
    fn bound_counters(&mut self) {
        if self.counters.len() > MAX_COUNTERS {
            self.counters.retain(|_, c| c.assigned > c.settled);
        }
    }
}

fn entry_id(id: u64) -> String {
    format!("{id}-0")
}

fn parse_entry_id(id: &str) -> Option<u64> {
    id.strip_suffix("-0")?.parse().ok()
}

struct Inner {
    state: Mutex<State>,
    arrived: Notify,
    store: Store,
    pubsub: Arc<dyn PubSub>,
    dedup_window: Duration,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The in-process log. Cheap to clone.
#[derive(Clone)]
pub struct MemoryLog {
    inner: Arc<Inner>,
}

impl MemoryLog {
    /// A log whose counters start from `store` and whose committed messages are published on
    /// `pubsub`.
    pub fn new(store: Store, pubsub: Arc<dyn PubSub>, retention: Retention) -> Self {
        MemoryLog {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                arrived: Notify::new(),
                store,
                pubsub,
                dedup_window: Duration::from_millis(retention.dedup_window_ms.max(1)),
            }),
        }
    }

    /// Entries appended and not yet committed.
    pub fn uncommitted(&self) -> usize {
        self.inner.lock().uncommitted.len()
    }

    /// Makes sure the conversation's counter is loaded from Postgres.
    async fn load_counter(&self, conversation: Uuid) -> Result<(), BackendError> {
        if self.inner.lock().counters.contains_key(&conversation) {
            return Ok(());
        }
        let last = self
            .inner
            .store
            .last_seq(conversation)
            .await
            .map_err(|e| BackendError::Unavailable(e.to_string()))?;
        let mut state = self.inner.lock();
        state.bound_counters();
        state.counters.entry(conversation).or_insert(Counter {
            assigned: last,
            settled: last,
        });
        Ok(())
    }
}

/// What an append found under the lock.
enum Step {
    Done(Appended),
    Wait(oneshot::Receiver<Result<(), String>>, Appended),
    LoadCounter,
}

#[async_trait]
impl MessageLog for MemoryLog {
    async fn append(
        &self,
        msg: &NewMessage,
        client_id: &str,
        origin: Uuid,
    ) -> Result<Appended, BackendError> {
        let conversation = msg.conversation_id;
        let key = (conversation, msg.from, client_id.to_string());
        let (frame_head, frame_tail) = msg.frame_around_seq();
        loop {
            let step = {
                let mut state = self.inner.lock();
                let now = Instant::now();
                state.expire_sent(now);
                let prior = state.sent.get(&key).map(|r| match r.sent {
                    Sent::Done { seq, msg_id, ts } => Err(Appended::Repeat { seq, msg_id, ts }),
                    Sent::Pending(id) => Ok(id),
                });
                match prior {
                    Some(Err(repeat)) => Step::Done(repeat),
                    Some(Ok(id)) => {
                        let (tx, rx) = oneshot::channel();
                        match state.uncommitted.get_mut(&id) {
                            Some(entry) => {
                                entry.waiters.push(tx);
                                let m = &entry.message;
                                let repeat = Appended::Repeat {
                                    seq: m.seq,
                                    msg_id: m.msg_id,
                                    ts: m.ts,
                                };
                                Step::Wait(rx, repeat)
                            }
                            None => {
                                return Err(BackendError::Unavailable(
                                    "the original message was not stored".into(),
                                ))
                            }
                        }
                    }
                    None if !state.counters.contains_key(&conversation) => Step::LoadCounter,
                    None => {
                        if state.uncommitted.len() >= MAX_UNCOMMITTED {
                            return Err(BackendError::Unavailable(
                                "too many messages waiting for postgres".into(),
                            ));
                        }
                        if state.sent.len() >= MAX_DEDUP_RECORDS {
                            return Err(BackendError::Unavailable(
                                "too many recent messages to remember".into(),
                            ));
                        }
                        let Some(counter) = state.counters.get_mut(&conversation) else {
                            continue;
                        };
                        counter.assigned += 1;
                        let seq = counter.assigned;
                        state.next_id += 1;
                        let id = state.next_id;
                        let (tx, rx) = oneshot::channel();
                        let frame = ByteString::from(format!("{frame_head}{seq}{frame_tail}"));
                        state.uncommitted.insert(
                            id,
                            Entry {
                                message: msg.stored(seq),
                                trace_parent: msg.trace_parent.clone(),
                                origin,
                                frame,
                                client_key: key.clone(),
                                waiters: vec![tx],
                            },
                        );
                        state.queue.push_back(id);
                        state.sent.insert(
                            key.clone(),
                            SentRecord {
                                sent: Sent::Pending(id),
                                expires: now + self.inner.dedup_window,
                            },
                        );
                        Step::Wait(rx, Appended::New { seq })
                    }
                }
            };
            match step {
                Step::Done(appended) => return Ok(appended),
                Step::LoadCounter => self.load_counter(conversation).await?,
                Step::Wait(committed, appended) => {
                    self.inner.arrived.notify_one();
                    return match tokio::time::timeout(COMMIT_TIMEOUT, committed).await {
                        Ok(Ok(Ok(()))) => Ok(appended),
                        Ok(Ok(Err(reason))) => Err(BackendError::Unavailable(reason)),
                        Ok(Err(_)) => Err(BackendError::Stopped),
                        Err(_) => Err(BackendError::Timeout),
                    };
                }
            }
        }
    }

    async fn last_seq(&self, conversation: Uuid) -> Result<i64, BackendError> {
        self.load_counter(conversation).await?;
        Ok(self
            .inner
            .lock()
            .counters
            .get(&conversation)
            .map_or(0, |c| c.settled))
    }

    /// Nothing: every message is in Postgres before anyone can see it.
    async fn recent(
        &self,
        _conversation: Uuid,
        _lo: i64,
        _hi: i64,
    ) -> Result<Vec<MessageFrame>, BackendError> {
        Ok(Vec::new())
    }

    /// Unknown here: a direct conversation is in Postgres before its first message is acked.
    async fn direct_pair(&self, _conversation: Uuid) -> Result<Option<(Uuid, Uuid)>, BackendError> {
        Ok(None)
    }

    async fn in_flight(&self, conversation: Uuid, seqs: &[i64]) -> Result<bool, BackendError> {
        // What the sink has not committed yet is still held here, uncommitted.
        let state = self.inner.lock();
        Ok(state
            .uncommitted
            .values()
            .any(|e| e.message.conversation_id == conversation && seqs.contains(&e.message.seq)))
    }
}

#[async_trait]
impl LogConsumer for MemoryLog {
    fn partitions(&self) -> u16 {
        1
    }

    async fn reader(
        &self,
        _partition: u16,
        _consumer: &str,
    ) -> Result<Box<dyn PartitionReader>, BackendError> {
        Ok(Box::new(self.clone()))
    }
}

#[async_trait]
impl PartitionReader for MemoryLog {
    async fn read(&mut self, from: ReadFrom, count: usize) -> Result<Vec<LogEntry>, BackendError> {
        let block = match from {
            ReadFrom::Pending => {
                let state = self.inner.lock();
                return Ok(state
                    .delivered
                    .iter()
                    .take(count)
                    .filter_map(|id| state.log_entry(*id))
                    .collect());
            }
            ReadFrom::New { block } => block,
        };
        let deadline = Instant::now() + block;
        loop {
            {
                let mut state = self.inner.lock();
                let take = state.queue.len().min(count);
                if take > 0 {
                    let ids: Vec<u64> = state.queue.drain(..take).collect();
                    state.delivered.extend(ids.iter().copied());
                    return Ok(ids.iter().filter_map(|id| state.log_entry(*id)).collect());
                }
            }
            // A permit stored by an append that came before this wait is not lost.
            if tokio::time::timeout_at(deadline, self.inner.arrived.notified())
                .await
                .is_err()
            {
                return Ok(Vec::new());
            }
        }
    }

    async fn claim(
        &mut self,
        _min_idle: Duration,
        _cursor: &str,
        _count: usize,
    ) -> Result<ClaimPage, BackendError> {
        // One consumer in one process: nobody else holds entries.
        Ok(ClaimPage::default())
    }

    async fn ack(&mut self, ids: &[&str]) -> Result<u64, BackendError> {
        let mut committed = Vec::new();
        {
            let mut state = self.inner.lock();
            for id in ids.iter().filter_map(|id| parse_entry_id(id)) {
                if !state.delivered.remove(&id) {
                    continue;
                }
                let Some(entry) = state.uncommitted.remove(&id) else {
                    continue;
                };
                let m = &entry.message;
                if let Some(counter) = state.counters.get_mut(&m.conversation_id) {
                    counter.settled = counter.settled.max(m.seq);
                }
                if let Some(record) = state.sent.get_mut(&entry.client_key) {
                    record.sent = Sent::Done {
                        seq: m.seq,
                        msg_id: m.msg_id,
                        ts: m.ts,
                    };
                }
                committed.push(entry);
            }
        }
        let acked = committed.len() as u64;
        // Published in commit order (seq order per conversation), then the senders are acked.
        let publications = committed
            .iter()
            .map(|entry| {
                let m = &entry.message;
                Publication {
                    topics: m.topics(),
                    envelope: Envelope::Message(MessageEnvelope {
                        origin: entry.origin,
                        conversation: m.conversation_id,
                        seq: m.seq,
                        ts: m.ts,
                        trace_parent: entry.trace_parent.as_deref().map(Box::from),
                        frame: entry.frame.clone(),
                    }),
                }
            })
            .collect();
        if let Err(e) = self.inner.pubsub.publish(publications).await {
            tracing::warn!(error = %e, "in-process publish failed");
        }
        for entry in committed {
            for waiter in entry.waiters {
                let _ = waiter.send(Ok(()));
            }
        }
        Ok(acked)
    }

    async fn dead_letter(&mut self, entry: &LogEntry, reason: &str) -> Result<(), BackendError> {
        let Some(id) = parse_entry_id(&entry.id) else {
            return Ok(());
        };
        let waiters = {
            let mut state = self.inner.lock();
            state.delivered.remove(&id);
            let Some(removed) = state.uncommitted.remove(&id) else {
                return Ok(());
            };
            let m = &removed.message;
            if let Some(counter) = state.counters.get_mut(&m.conversation_id) {
                counter.settled = counter.settled.max(m.seq);
            }
            state.sent.remove(&removed.client_key);
            if state.dead.len() >= MAX_DEAD_LETTERS {
                state.dead.pop_front();
            }
            state.dead.push_back((entry.clone(), reason.to_string()));
            removed.waiters
        };
        for waiter in waiters {
            let _ = waiter.send(Err(format!("message not stored: {reason}")));
        }
        Ok(())
    }

    async fn trim(&mut self, _retention: Duration) -> Result<PartitionStats, BackendError> {
        let state = self.inner.lock();
        Ok(PartitionStats {
            pending: state.delivered.len() as i64,
            length: state.uncommitted.len() as i64,
            oldest_pending_age_secs: 0,
        })
    }
}
