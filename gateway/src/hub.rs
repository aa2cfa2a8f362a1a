//! The node's local connection registry: which users have connections here, the rooms and
//! presence watches of those users, and the outbound queue of each connection, bounded in frames
//! and in bytes (per connection and on the node). Delivery hands the same [`Outbound`] (one
//! allocation, its frame bytes shared) to every local recipient.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chat_core::pubsub::{Envelope, Topic};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::Metrics;

/// What a connection's outbound queue carries.
#[derive(Debug)]
pub enum Outbound {
    /// An envelope from a topic the connection is reached by.
    Envelope(Envelope),
    /// This node may have missed envelopes (its pub/sub connection dropped): sync everything.
    Resync,
}

impl Outbound {
    /// The bytes it puts on the wire, as its queue counts them (a frame shared by many
    /// connections counts once in each).
    pub fn wire_len(&self) -> usize {
        match self {
            Outbound::Envelope(Envelope::Message(m)) => m.frame.len(),
            Outbound::Envelope(Envelope::Event { json, .. }) => json.len(),
            Outbound::Envelope(Envelope::Revoked { .. }) | Outbound::Resync => 64,
        }
    }
}

/// One queued item, shared by every local recipient.
pub type Queued = Arc<Outbound>;

/// How many bytes the outbound queues may hold.
#[derive(Debug, Clone, Copy)]
pub struct QueueBytes {
    /// In one connection's queue.
    pub per_connection: usize,
    /// In all the queues of this node together.
    pub node: usize,
}

/// The bytes in one connection's queue, and in the node's queues: added by the hub as it
/// queues, taken off by the connection as it dequeues.
#[derive(Clone)]
pub struct QueueMeter {
    conn: Arc<AtomicUsize>,
    node: prometheus::IntGauge,
}

impl QueueMeter {
    /// Counts `n` bytes in, unless that would pass a bound.
    fn add(&self, n: usize, bounds: QueueBytes) -> bool {
        let conn = self.conn.fetch_add(n, Ordering::Relaxed) + n;
        let n64 = i64::try_from(n).unwrap_or(i64::MAX);
        self.node.add(n64);
        let node = usize::try_from(self.node.get()).unwrap_or(0);
        if conn > bounds.per_connection || node > bounds.node {
            self.taken(n);
            return false;
        }
        true
    }

    /// `n` bytes left the queue.
    pub fn taken(&self, n: usize) {
        self.conn.fetch_sub(n, Ordering::Relaxed);
        self.node.sub(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// One local connection as the hub sees it.
pub struct LocalConn {
    pub conn_id: Uuid,
    /// Bounded: when full, the connection is a slow consumer and is closed.
    pub outbound: mpsc::Sender<Queued>,
    /// Cancelled to make the session close itself as a slow consumer.
    pub kick: CancellationToken,
    /// The bytes in `outbound` (from [`Hub::meter`]).
    pub meter: QueueMeter,
}

/// What the hub guards with its one lock.
#[derive(Default)]
struct State {
    /// Local connections by user.
    users: HashMap<Uuid, Vec<LocalConn>>,
    /// Local users in each room (only users with a connection here).
    room_members: HashMap<Uuid, HashSet<Uuid>>,
    /// The rooms of each local user: the reverse of `room_members`.
    rooms_of: HashMap<Uuid, HashSet<Uuid>>,
    /// Local connections (user, connection) watching each user's presence.
    watchers: HashMap<Uuid, Vec<(Uuid, Uuid)>>,
    /// The users each local connection watches: the reverse of `watchers`.
    watches_of: HashMap<Uuid, HashSet<Uuid>>,
}

impl State {
    /// Drops `watched` from connection `conn`'s watches; returns the presence topics nobody
    /// here watches any more.
    fn unwatch(&mut self, conn: Uuid, watched: &[Uuid]) -> Vec<Topic> {
        let mut released = Vec::new();
        let Some(mine) = self.watches_of.get_mut(&conn) else {
            return released;
        };
        for user in watched {
            if !mine.remove(user) {
                continue;
            }
            if let Some(list) = self.watchers.get_mut(user) {
                list.retain(|(_, c)| *c != conn);
                if list.is_empty() {
                    self.watchers.remove(user);
                    released.push(Topic::Presence(*user));
                }
            }
        }
        if mine.is_empty() {
            self.watches_of.remove(&conn);
        }
        released
    }
}

/// Registry of local connections by user and of local users by room. The lock is never held
/// across an `.await`.
pub struct Hub {
    state: Mutex<State>,
    metrics: Metrics,
    bytes: QueueBytes,
}

impl Hub {
    pub fn new(metrics: Metrics, bytes: QueueBytes) -> Self {
        Hub {
            state: Mutex::new(State::default()),
            metrics,
            bytes,
        }
    }

    /// The meter of a new connection's queue.
    pub fn meter(&self) -> QueueMeter {
        QueueMeter {
            conn: Arc::default(),
            node: self.metrics.outbound_queued_bytes.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the map stays usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a connection unless the user has `max` here already; `Some(first)` with true when
    /// it is the user's first one on this node, `None` when over the limit. Checked and added
    /// under one lock, so concurrent handshakes cannot pass the limit together.
    pub fn register(&self, user: Uuid, conn: LocalConn, max: usize) -> Option<bool> {
        let mut state = self.lock();
        let conns = state.users.entry(user).or_default();
        if conns.len() >= max {
            if conns.is_empty() {
                state.users.remove(&user);
            }
            return None;
        }
        conns.push(conn);
        Some(conns.len() == 1)
    }

    /// Removes a connection. When it was the user's last one here, the user leaves every room
    /// index too, and the topics nobody here needs any more are returned (to unsubscribe).
    pub fn unregister(&self, user: Uuid, conn_id: Uuid) -> Vec<Topic> {
        let mut state = self.lock();
        let watched: Vec<Uuid> = state
            .watches_of
            .get(&conn_id)
            .map(|w| w.iter().copied().collect())
            .unwrap_or_default();
        let mut released = state.unwatch(conn_id, &watched);
        if let Some(conns) = state.users.get_mut(&user) {
            conns.retain(|c| c.conn_id != conn_id);
            if !conns.is_empty() {
                return released;
            }
        }
        state.users.remove(&user);
        released.push(Topic::User(user));
        for room in state.rooms_of.remove(&user).unwrap_or_default() {
            if let Some(members) = state.room_members.get_mut(&room) {
                members.remove(&user);
                if members.is_empty() {
                    state.room_members.remove(&room);
                    released.push(Topic::Room(room));
                }
            }
        }
        released
    }

    /// Records that local `user` is a member of `rooms`; returns the rooms that had no local
    /// member before (to subscribe). Does nothing for a user with no connection here.
    pub fn join(&self, user: Uuid, rooms: &[Uuid]) -> Vec<Uuid> {
        let mut state = self.lock();
        if !state.users.contains_key(&user) {
            return Vec::new();
        }
        let mut new_rooms = Vec::new();
        for room in rooms {
            let members = state.room_members.entry(*room).or_default();
            if members.is_empty() {
                new_rooms.push(*room);
            }
            members.insert(user);
            state.rooms_of.entry(user).or_default().insert(*room);
        }
        new_rooms
    }

    /// Replaces local `user`'s rooms with `rooms` (from Postgres, after events may have been
    /// missed); returns the rooms that now need a subscription and those nobody here needs.
    pub fn set_rooms(&self, user: Uuid, rooms: &HashSet<Uuid>) -> (Vec<Uuid>, Vec<Uuid>) {
        let current: HashSet<Uuid> = self.lock().rooms_of.get(&user).cloned().unwrap_or_default();
        let added: Vec<Uuid> = rooms.difference(&current).copied().collect();
        let subscribe = self.join(user, &added);
        let release = current
            .difference(rooms)
            .filter(|room| self.leave(user, **room))
            .copied()
            .collect();
        (subscribe, release)
    }

    /// Records that `user` left `room`; returns true when no local member is left in it.
    pub fn leave(&self, user: Uuid, room: Uuid) -> bool {
        let mut state = self.lock();
        if let Some(rooms) = state.rooms_of.get_mut(&user) {
            rooms.remove(&room);
        }
        match state.room_members.get_mut(&room) {
            Some(members) => {
                members.remove(&user);
                if members.is_empty() {
                    state.room_members.remove(&room);
                    true
                } else {
                    false
                }
            }
            None => false,
        }
    }

    /// Adds `watched` to the presence watches of connection `conn` of `user`, unless that would
    /// make more than `max` watches on it; returns the users nobody here watched before (to
    /// subscribe), or `None` when over the limit.
    pub fn watch(&self, user: Uuid, conn: Uuid, watched: &[Uuid], max: usize) -> Option<Vec<Uuid>> {
        let mut state = self.lock();
        let mine = state.watches_of.entry(conn).or_default();
        let adding: Vec<Uuid> = watched
            .iter()
            .filter(|w| !mine.contains(w))
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if mine.len() + adding.len() > max {
            if mine.is_empty() {
                state.watches_of.remove(&conn);
            }
            return None;
        }
        mine.extend(adding.iter().copied());
        let mut new_topics = Vec::new();
        for w in adding {
            let list = state.watchers.entry(w).or_default();
            if list.is_empty() {
                new_topics.push(w);
            }
            list.push((user, conn));
        }
        Some(new_topics)
    }

    /// Removes watches of connection `conn`; returns the presence topics nobody here needs.
    pub fn unwatch(&self, conn: Uuid, watched: &[Uuid]) -> Vec<Topic> {
        self.lock().unwatch(conn, watched)
    }

    /// Every user with a connection here (for presence heartbeats).
    pub fn local_users(&self) -> Vec<Uuid> {
        self.lock().users.keys().copied().collect()
    }

    /// Whether local `user` is a member of `room` as this node knows it.
    pub fn is_member(&self, user: Uuid, room: Uuid) -> bool {
        self.lock()
            .rooms_of
            .get(&user)
            .is_some_and(|rooms| rooms.contains(&room))
    }

    /// Whether anything here needs `topic`: a local connection of the user, or a local member
    /// of the room.
    pub fn has_local(&self, topic: Topic) -> bool {
        let state = self.lock();
        match topic {
            Topic::User(u) => state.users.contains_key(&u),
            Topic::Room(r) => state.room_members.contains_key(&r),
            Topic::Presence(u) => state.watchers.contains_key(&u),
        }
    }

    /// Every topic needed here (for re-subscribing after a pub/sub reconnect).
    pub fn topics(&self) -> Vec<Topic> {
        let state = self.lock();
        state
            .users
            .keys()
            .map(|u| Topic::User(*u))
            .chain(state.room_members.keys().map(|r| Topic::Room(*r)))
            .chain(state.watchers.keys().map(|u| Topic::Presence(*u)))
            .collect()
    }

    /// Queues `frame` for every local connection the topic reaches (the user's, or every local
    /// member's of the room) except `origin` and except the connections of `skip_user`.
    /// Returns how many connections it was queued for.
    pub fn deliver(
        &self,
        topic: Topic,
        origin: Uuid,
        skip_user: Option<Uuid>,
        frame: &Queued,
    ) -> usize {
        let state = self.lock();
        match topic {
            Topic::User(user) => self.queue(&state, user, |c| c != origin, frame),
            Topic::Room(room) => state.room_members.get(&room).map_or(0, |members| {
                members
                    .iter()
                    .filter(|u| Some(**u) != skip_user)
                    .map(|u| self.queue(&state, *u, |c| c != origin, frame))
                    .sum()
            }),
            Topic::Presence(watched) => state.watchers.get(&watched).map_or(0, |list| {
                list.iter()
                    .map(|(user, conn)| self.queue(&state, *user, |c| c == *conn, frame))
                    .sum()
            }),
        }
    }

    /// Queues `frame` for every local connection; returns how many.
    pub fn broadcast(&self, frame: &Queued) -> usize {
        let state = self.lock();
        state
            .users
            .keys()
            .map(|user| self.queue(&state, *user, |_| true, frame))
            .sum()
    }

    /// Queues `frame` for the connections of `user` that `pick` accepts.
    fn queue(
        &self,
        state: &State,
        user: Uuid,
        pick: impl Fn(Uuid) -> bool,
        frame: &Queued,
    ) -> usize {
        let Some(conns) = state.users.get(&user) else {
            return 0;
        };
        let mut queued = 0;
        let size = frame.wire_len();
        for conn in conns.iter().filter(|c| pick(c.conn_id)) {
            if !conn.meter.add(size, self.bytes) {
                self.kick(conn);
                continue;
            }
            match conn.outbound.try_send(frame.clone()) {
                Ok(()) => queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    conn.meter.taken(size);
                    self.kick(conn);
                }
                // The session is ending and will unregister itself.
                Err(mpsc::error::TrySendError::Closed(_)) => conn.meter.taken(size),
            }
        }
        queued
    }

    /// A connection whose queue is full (in frames or bytes) is a slow consumer: it closes.
    fn kick(&self, conn: &LocalConn) {
        if !conn.kick.is_cancelled() {
            self.metrics.outbound_dropped.inc();
            conn.kick.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounds no test but the byte test reaches.
    const ROOMY: QueueBytes = QueueBytes {
        per_connection: 1 << 30,
        node: 1 << 40,
    };

    fn test_hub() -> Hub {
        Hub::new(Metrics::new().expect("metrics"), ROOMY)
    }

    fn conn(queue: usize) -> (LocalConn, mpsc::Receiver<Queued>) {
        conn_metered(queue, test_hub().meter())
    }

    fn conn_metered(queue: usize, meter: QueueMeter) -> (LocalConn, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(queue);
        (
            LocalConn {
                conn_id: Uuid::new_v4(),
                outbound: tx,
                kick: CancellationToken::new(),
                meter,
            },
            rx,
        )
    }

    fn message_of(bytes: usize) -> Queued {
        Arc::new(Outbound::Envelope(Envelope::Message(
            chat_core::pubsub::MessageEnvelope {
                origin: Uuid::nil(),
                conversation: Uuid::nil(),
                seq: 1,
                ts: 0,
                trace_parent: None,
                frame: "x".repeat(bytes).into(),
            },
        )))
    }

    /// A connection whose queued bytes would pass its bound is kicked though its frame queue
    /// has room; taking frames off makes room again; the node's bound holds over connections.
    #[test]
    fn queues_are_bounded_in_bytes_per_connection_and_per_node() {
        let hub = Hub::new(
            Metrics::new().expect("metrics"),
            QueueBytes {
                per_connection: 10_000,
                node: 15_000,
            },
        );
        let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let (a, mut rx_a) = conn_metered(100, hub.meter());
        let (b, _rx_b) = conn_metered(100, hub.meter());
        let (a_meter, a_kick, b_kick) = (a.meter.clone(), a.kick.clone(), b.kick.clone());
        hub.register(alice, a, 10);
        hub.register(bob, b, 10);
        let frame = message_of(4_000);
        assert_eq!(
            hub.deliver(Topic::User(alice), Uuid::nil(), None, &frame),
            1
        );
        assert_eq!(
            hub.deliver(Topic::User(alice), Uuid::nil(), None, &frame),
            1
        );
        assert_eq!(
            hub.deliver(Topic::User(alice), Uuid::nil(), None, &frame),
            0,
            "a third 4,000-byte frame passes 10,000 bytes"
        );
        assert!(a_kick.is_cancelled());
        let taken = rx_a.try_recv().expect("queued");
        a_meter.taken(taken.wire_len());
        assert_eq!(hub.metrics.outbound_queued_bytes.get(), 4_000);
        assert_eq!(hub.deliver(Topic::User(bob), Uuid::nil(), None, &frame), 1);
        assert_eq!(hub.deliver(Topic::User(bob), Uuid::nil(), None, &frame), 1);
        assert_eq!(
            hub.deliver(Topic::User(bob), Uuid::nil(), None, &frame),
            0,
            "the node's 15,000 bytes are full before Bob's own 10,000"
        );
        assert!(b_kick.is_cancelled());
        assert_eq!(hub.metrics.outbound_queued_bytes.get(), 12_000);
    }

    /// Delivery skips the origin connection, reaches the others, and a full queue kicks its
    /// connection without affecting the rest.
    #[test]
    fn deliver_skips_origin_and_kicks_slow_consumers() {
        let hub = test_hub();
        let user = Uuid::now_v7();
        let (a, mut rx_a) = conn(4);
        let (b, mut rx_b) = conn(1);
        let (c, mut rx_c) = conn(4);
        let (a_id, b_kick) = (a.conn_id, b.kick.clone());
        hub.register(user, a, 10);
        hub.register(user, b, 10);
        hub.register(user, c, 10);

        let frame: Queued = Arc::new(Outbound::Resync);
        let user_topic = Topic::User(user);
        assert_eq!(hub.deliver(user_topic, a_id, None, &frame), 2);
        assert!(
            rx_a.try_recv().is_err(),
            "origin must not get its own message"
        );
        assert!(rx_b.try_recv().is_ok());
        assert!(rx_c.try_recv().is_ok());

        hub.deliver(user_topic, a_id, None, &frame); // fills b (capacity 1)
        hub.deliver(user_topic, a_id, None, &frame); // overflows b
        assert!(b_kick.is_cancelled());
        assert_eq!(rx_c.len(), 2, "the fast connection got every frame");
    }

    /// A user stays local until their last connection leaves.
    #[test]
    fn last_unregister_reports_true() {
        let hub = test_hub();
        let user = Uuid::now_v7();
        let (a, _ra) = conn(1);
        let (b, _rb) = conn(1);
        let (a_id, b_id) = (a.conn_id, b.conn_id);
        assert_eq!(
            hub.register(user, a, 2),
            Some(true),
            "the first connection here"
        );
        assert_eq!(hub.register(user, b, 2), Some(false));
        let (c, _rc) = conn(1);
        assert_eq!(hub.register(user, c, 2), None, "over the per-user limit");
        assert!(hub.unregister(user, a_id).is_empty());
        assert!(hub.has_local(Topic::User(user)));
        assert_eq!(hub.unregister(user, b_id), vec![Topic::User(user)]);
        assert!(!hub.has_local(Topic::User(user)));
    }

    /// Room delivery reaches local members only; leaving stops it at once, and the last local
    /// member leaving releases the room.
    #[test]
    fn rooms_deliver_to_local_members_until_they_leave() {
        let hub = test_hub();
        let (alice, bob, room) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let (a, mut rx_a) = conn(8);
        let (b, mut rx_b) = conn(8);
        let b_id = b.conn_id;
        hub.register(alice, a, 10);
        hub.register(bob, b, 10);
        assert_eq!(hub.join(alice, &[room]), vec![room], "first local member");
        assert!(hub.join(bob, &[room]).is_empty());
        assert!(
            hub.join(Uuid::now_v7(), &[room]).is_empty(),
            "not local: ignored"
        );
        let frame: Queued = Arc::new(Outbound::Resync);
        assert_eq!(hub.deliver(Topic::Room(room), Uuid::nil(), None, &frame), 2);
        assert_eq!(
            hub.deliver(Topic::Room(room), Uuid::nil(), Some(bob), &frame),
            1
        );
        assert!(!hub.leave(alice, room));
        assert!(!hub.is_member(alice, room));
        assert_eq!(hub.deliver(Topic::Room(room), Uuid::nil(), None, &frame), 1);
        assert_eq!(rx_a.len(), 2, "alice got nothing after leaving");
        assert_eq!(rx_b.len(), 2);
        while rx_b.try_recv().is_ok() {}
        assert_eq!(
            hub.unregister(bob, b_id),
            vec![Topic::User(bob), Topic::Room(room)]
        );
        assert!(!hub.has_local(Topic::Room(room)));
        let _ = rx_a.try_recv();
    }

    /// Watches are bounded per connection, deliver only to the watching connection, and are
    /// released when the connection goes.
    #[test]
    fn presence_watches_follow_connections() {
        let hub = test_hub();
        let (alice, watched) = (Uuid::now_v7(), Uuid::now_v7());
        let (a1, mut rx1) = conn(8);
        let (a2, mut rx2) = conn(8);
        let (id1, id2) = (a1.conn_id, a2.conn_id);
        hub.register(alice, a1, 10);
        hub.register(alice, a2, 10);
        assert_eq!(hub.watch(alice, id1, &[watched], 2), Some(vec![watched]));
        assert_eq!(
            hub.watch(alice, id1, &[Uuid::now_v7(), Uuid::now_v7()], 2),
            None
        );
        let frame: Queued = Arc::new(Outbound::Resync);
        assert_eq!(
            hub.deliver(Topic::Presence(watched), Uuid::nil(), None, &frame),
            1
        );
        assert_eq!((rx1.len(), rx2.len()), (1, 0));
        assert_eq!(hub.unregister(alice, id1), vec![Topic::Presence(watched)]);
        assert!(!hub.has_local(Topic::Presence(watched)));
        let _ = (rx1.try_recv(), rx2.try_recv(), id2);
    }
}
