//! The node's local connection registry: which users have connections here, and the bounded
//! outbound queue of each. Delivery hands the same frame bytes to every local recipient.

use std::collections::HashMap;
use std::sync::Mutex;

use bytestring::ByteString;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::Metrics;

/// One local connection as the hub sees it.
pub struct LocalConn {
    pub conn_id: Uuid,
    /// Bounded: when full, the connection is a slow consumer and is closed.
    pub outbound: mpsc::Sender<ByteString>,
    /// Cancelled to make the session close itself as a slow consumer.
    pub kick: CancellationToken,
}

/// Registry of local connections by user. The lock is never held across an `.await`.
pub struct Hub {
    users: Mutex<HashMap<Uuid, Vec<LocalConn>>>,
    metrics: Metrics,
}

impl Hub {
    pub fn new(metrics: Metrics) -> Self {
        Hub {
            users: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<LocalConn>>> {
        // A panic while holding this lock would be a bug in this module; the map stays usable.
        self.users
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a connection.
    pub fn register(&self, user: Uuid, conn: LocalConn) {
        self.lock().entry(user).or_default().push(conn);
    }

    /// Removes a connection; returns true if it was the user's last one on this node.
    pub fn unregister(&self, user: Uuid, conn_id: Uuid) -> bool {
        let mut users = self.lock();
        let Some(conns) = users.get_mut(&user) else {
            return true;
        };
        conns.retain(|c| c.conn_id != conn_id);
        if conns.is_empty() {
            users.remove(&user);
            true
        } else {
            false
        }
    }

    /// Whether `user` has any connection on this node.
    pub fn has_local(&self, user: Uuid) -> bool {
        self.lock().contains_key(&user)
    }

    /// Every user with a local connection (for re-subscribing after a pub/sub reconnect).
    pub fn users(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    /// Queues `frame` for every local connection of `user` except `origin`.
    /// Returns how many connections it was queued for.
    pub fn deliver(&self, user: Uuid, origin: Uuid, frame: &ByteString) -> usize {
        let users = self.lock();
        let Some(conns) = users.get(&user) else {
            return 0;
        };
        let mut queued = 0;
        for conn in conns.iter().filter(|c| c.conn_id != origin) {
            match conn.outbound.try_send(frame.clone()) {
                Ok(()) => queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if !conn.kick.is_cancelled() {
                        self.metrics.outbound_dropped.inc();
                        conn.kick.cancel();
                    }
                }
                // The session is ending and will unregister itself.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(queue: usize) -> (LocalConn, mpsc::Receiver<ByteString>) {
        let (tx, rx) = mpsc::channel(queue);
        (
            LocalConn {
                conn_id: Uuid::new_v4(),
                outbound: tx,
                kick: CancellationToken::new(),
            },
            rx,
        )
    }

    /// Delivery skips the origin connection, reaches the others, and a full queue kicks its
    /// connection without affecting the rest.
    #[test]
    fn deliver_skips_origin_and_kicks_slow_consumers() {
        let hub = Hub::new(Metrics::new().expect("metrics"));
        let user = Uuid::now_v7();
        let (a, mut rx_a) = conn(4);
        let (b, mut rx_b) = conn(1);
        let (c, mut rx_c) = conn(4);
        let (a_id, b_kick) = (a.conn_id, b.kick.clone());
        hub.register(user, a);
        hub.register(user, b);
        hub.register(user, c);

        let frame = ByteString::from_static("{}");
        assert_eq!(hub.deliver(user, a_id, &frame), 2);
        assert!(
            rx_a.try_recv().is_err(),
            "origin must not get its own message"
        );
        assert!(rx_b.try_recv().is_ok());
        assert!(rx_c.try_recv().is_ok());

        hub.deliver(user, a_id, &frame); // fills b (capacity 1)
        hub.deliver(user, a_id, &frame); // overflows b
        assert!(b_kick.is_cancelled());
        assert_eq!(rx_c.len(), 2, "the fast connection got every frame");
    }

    /// A user stays local until their last connection leaves.
    #[test]
    fn last_unregister_reports_true() {
        let hub = Hub::new(Metrics::new().expect("metrics"));
        let user = Uuid::now_v7();
        let (a, _ra) = conn(1);
        let (b, _rb) = conn(1);
        let (a_id, b_id) = (a.conn_id, b.conn_id);
        hub.register(user, a);
        hub.register(user, b);
        assert!(!hub.unregister(user, a_id));
        assert!(hub.has_local(user));
        assert!(hub.unregister(user, b_id));
        assert!(!hub.has_local(user));
    }
}
