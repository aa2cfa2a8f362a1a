//! The Postgres lookups every request, handshake or presence change makes (a token's floor, a
//! user's rooms, who hears of their presence, their `last_seen`), coalesced: callers that arrive while earlier queries run wait together and are answered by
//! one query (`WHERE id = ANY($1)`), so a reconnect storm costs Postgres a query per batch, not
//! per client. A lone caller is sent at once; nothing waits for a batch to fill.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;

use chat_core::store::{Audience, Store, StoreError, TokenFloor};
use prometheus::HistogramVec;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Most keys in one query.
const MAX_BATCH: usize = 256;
/// Queries of one kind in flight at once; callers arriving meanwhile form the next batch.
const MAX_IN_FLIGHT: usize = 4;
/// Callers queued before `get` waits for room (backpressure, not a limit on anything else).
const QUEUE: usize = 4 * MAX_BATCH;

/// Why a lookup has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node is stopping and the lookup task ended.
    #[error("the node is stopping")]
    Stopped,
}

type Answer<V> = oneshot::Sender<Result<Option<V>, LookupError>>;
type Loaded<K, V> = Pin<Box<dyn Future<Output = Result<HashMap<K, V>, StoreError>> + Send>>;
/// Runs one query for many keys; a key missing from the map has no value.
type Load<K, V> = Arc<dyn Fn(Vec<K>) -> Loaded<K, V> + Send + Sync>;

/// A handle to one kind of coalesced lookup; cheap to clone.
pub struct Batcher<K, V> {
    requests: mpsc::Sender<(K, Answer<V>)>,
}

impl<K, V> Clone for Batcher<K, V> {
    fn clone(&self) -> Self {
        Batcher {
            requests: self.requests.clone(),
        }
    }
}

impl<K, V> Batcher<K, V>
where
    K: Copy + Eq + Hash + Send + 'static,
    V: Clone + Send + 'static,
{
    /// The handle, and the task that runs the queries until `stop`; whoever spawns the task
    /// joins it. `sizes` observes each batch's size.
    fn new(
        load: Load<K, V>,
        sizes: prometheus::Histogram,
        stop: CancellationToken,
    ) -> (Self, impl Future<Output = ()>) {
        let (requests, queue) = mpsc::channel(QUEUE);
        (Batcher { requests }, serve(queue, load, sizes, stop))
    }

    /// `key`'s value (`None` when the query found none), from a query shared with whoever
    /// else asked meanwhile.
    pub async fn get(&self, key: K) -> Result<Option<V>, LookupError> {
        let (answer, answered) = oneshot::channel();
        self.requests
            .send((key, answer))
            .await
            .map_err(|_| LookupError::Stopped)?;
        answered.await.unwrap_or(Err(LookupError::Stopped))
    }
}

/// Takes callers off `queue`: everyone waiting when a query slot is free goes into one batch.
async fn serve<K, V>(
    mut queue: mpsc::Receiver<(K, Answer<V>)>,
    load: Load<K, V>,
    sizes: prometheus::Histogram,
    stop: CancellationToken,
) where
    K: Copy + Eq + Hash + Send + 'static,
    V: Clone + Send + 'static,
{
    let mut in_flight = JoinSet::new();
    loop {
        if in_flight.len() >= MAX_IN_FLIGHT {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = in_flight.join_next() => continue,
            }
        }
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = in_flight.join_next() => continue,
            first = queue.recv() => first,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        sizes.observe(batch.len() as f64);
        let load = load.clone();
        in_flight.spawn(async move {
            // One user may be asked for twice (two tabs); a key goes to the query once.
            let keys: HashSet<K> = batch.iter().map(|(k, _)| *k).collect();
            let keys = keys.into_iter().collect();
            match load(keys).await {
                Ok(found) => {
                    for (key, answer) in batch {
                        let _ = answer.send(Ok(found.get(&key).cloned()));
                    }
                }
                Err(e) => {
                    for (_, answer) in batch {
                        let _ = answer.send(Err(LookupError::Store(e.clone())));
                    }
                }
            }
        });
    }
    // Callers still queued get `Stopped` when the queue drops; running queries finish.
    while in_flight.join_next().await.is_some() {}
}

/// How much each lookup reads.
#[derive(Debug, Clone, Copy)]
pub struct LookupLimits {
    /// Rooms loaded (and subscribed) per user at the handshake.
    pub rooms_per_user: usize,
    /// Rooms of at most this many members hear of a member's presence changes.
    pub audience_room_max_members: usize,
    /// Direct conversations whose peers hear of a presence change (the most recently active).
    pub audience_peers: i64,
}

/// The coalesced lookups of one node.
#[derive(Clone)]
pub struct Lookups {
    /// A user's token floor; `None` for a user that does not exist.
    pub floors: Batcher<Uuid, TokenFloor>,
    /// A user's rooms (at most `rooms_per_user`); `None` for a user in no room.
    pub rooms: Batcher<Uuid, Vec<Uuid>>,
    /// Who hears of a user's presence changes; `None` for nobody but watchers.
    pub audiences: Batcher<Uuid, Audience>,
    /// Records that a user went offline now (`last_seen`); answers `None`.
    pub last_seen: Batcher<Uuid, ()>,
}

impl Lookups {
    /// The lookups, and the task serving them until `stop` (the node joins it after its HTTP
    /// server and its connections stopped, so nobody is left waiting).
    pub fn new(
        store: Store,
        limits: LookupLimits,
        sizes: &HistogramVec,
        stop: CancellationToken,
    ) -> (Self, impl Future<Output = ()>) {
        let batcher = |lookup: &str| (sizes.with_label_values(&[lookup]), stop.clone());
        let (floors, serve_floors) = with_store(&store, batcher("token_floor"), |store, ids| {
            Box::pin(async move { store.token_floors(&ids).await })
        });
        let limit = i64::try_from(limits.rooms_per_user).unwrap_or(i64::MAX);
        let (rooms, serve_rooms) = with_store(&store, batcher("rooms"), move |store, users| {
            Box::pin(async move { store.rooms_of_each(&users, limit).await })
        });
        let (audiences, serve_audiences) =
            with_store(&store, batcher("audience"), move |store, users| {
                Box::pin(async move {
                    store
                        .presence_audiences(
                            &users,
                            limits.audience_room_max_members,
                            limits.audience_peers,
                        )
                        .await
                })
            });
        let (last_seen, serve_last_seen) =
            with_store(&store, batcher("last_seen"), |store, users| {
                Box::pin(async move {
                    store.touch_last_seen_many(&users).await?;
                    Ok(HashMap::new())
                })
            });
        let serve = async move {
            tokio::join!(serve_floors, serve_rooms, serve_audiences, serve_last_seen);
        };
        let lookups = Lookups {
            floors,
            rooms,
            audiences,
            last_seen,
        };
        (lookups, serve)
    }
}

/// A batcher whose query is `query(store, keys)`.
fn with_store<K, V>(
    store: &Store,
    (sizes, stop): (prometheus::Histogram, CancellationToken),
    query: impl Fn(Store, Vec<K>) -> Loaded<K, V> + Send + Sync + 'static,
) -> (Batcher<K, V>, impl Future<Output = ()>)
where
    K: Copy + Eq + Hash + Send + 'static,
    V: Clone + Send + 'static,
{
    let store = store.clone();
    Batcher::new(
        Arc::new(move |keys| query(store.clone(), keys)),
        sizes,
        stop,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A batcher whose query answers `key * 10` for even keys (odd keys have no value), takes
    /// 50 ms, and counts its calls; fails when `fail` is set.
    fn tens(
        calls: Arc<AtomicUsize>,
        fail: bool,
        stop: CancellationToken,
    ) -> (Batcher<u32, u32>, impl Future<Output = ()>) {
        let sizes = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("s", "s"))
            .expect("histogram");
        Batcher::new(
            Arc::new(move |keys: Vec<u32>| {
                let calls = calls.clone();
                Box::pin(async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    if fail {
                        return Err(StoreError::Unavailable("down".into()));
                    }
                    Ok(keys
                        .into_iter()
                        .filter(|k| k % 2 == 0)
                        .map(|k| (k, k * 10))
                        .collect())
                }) as Loaded<u32, u32>
            }),
            sizes,
            stop,
        )
    }

    #[tokio::test]
    async fn waiting_callers_share_queries_and_each_gets_its_own_answer() {
        let calls = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (batcher, serve) = tens(calls.clone(), false, stop.clone());
        let serving = tokio::spawn(serve);
        // 200 callers at once, each key asked twice: at most 4 queries run at a time, so
        // the rest wait and share the next ones.
        let asks = (0..400u32).map(|i| {
            let batcher = batcher.clone();
            async move { (i % 200, batcher.get(i % 200).await) }
        });
        for (key, answer) in futures_util::future::join_all(asks).await {
            let expected = (key % 2 == 0).then_some(key * 10);
            assert_eq!(answer.expect("answered"), expected, "key {key}");
        }
        let queries = calls.load(Ordering::SeqCst);
        assert!(queries < 20, "{queries} queries for 400 callers");
        stop.cancel();
        serving.await.expect("served");
        assert!(matches!(batcher.get(2).await, Err(LookupError::Stopped)));
    }

    #[tokio::test]
    async fn a_failed_query_fails_every_caller_it_had() {
        let calls = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (batcher, serve) = tens(calls, true, stop.clone());
        let serving = tokio::spawn(serve);
        let asks = (0..10u32).map(|i| {
            let batcher = batcher.clone();
            async move { batcher.get(i).await }
        });
        for answer in futures_util::future::join_all(asks).await {
            assert!(matches!(answer, Err(LookupError::Store(_))), "{answer:?}");
        }
        stop.cancel();
        serving.await.expect("served");
    }
}
