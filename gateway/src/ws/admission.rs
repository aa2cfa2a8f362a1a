//! Admission: the node's connection slots, taken before any await and released by a guard's
//! `Drop`, and a connection's registration in the hub, released (with the subscriptions only it
//! needed) by a guard's `Drop` too, so a connection that ends in any way, a panic included,
//! gives back what it held.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix_web::HttpRequest;
use chat_core::pubsub::{PubSub, Topic};
use prometheus::IntGauge;
use uuid::Uuid;

use crate::hub::Hub;

/// The node's connection capacity (`gateway_max_connections`).
pub struct Slots {
    open: AtomicUsize,
    max: usize,
    /// `chat_gateway_connections_open`, kept equal to the slots taken.
    gauge: IntGauge,
}

impl Slots {
    pub fn new(max: usize, gauge: IntGauge) -> Self {
        Slots {
            open: AtomicUsize::new(0),
            max,
            gauge,
        }
    }

    /// A slot, or `None` when the node is full. Atomic: concurrent handshakes cannot take more
    /// slots than there are.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .ok()?;
        self.gauge.inc();
        Some(Slot(self.clone()))
    }

    /// Slots taken now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One taken slot; dropping it gives it back.
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

/// A connection's registration in the hub. Dropping it unregisters the connection and releases
/// the topics nobody here needs any more.
pub struct Registration {
    hub: Arc<Hub>,
    pubsub: Arc<dyn PubSub>,
    pub user: Uuid,
    pub conn_id: Uuid,
    /// The user's first connection on this node (it records their presence here; the last one
    /// to close removes it).
    pub first_here: bool,
    released: bool,
}

impl Registration {
    pub fn new(
        hub: Arc<Hub>,
        pubsub: Arc<dyn PubSub>,
        user: Uuid,
        conn_id: Uuid,
        first_here: bool,
    ) -> Self {
        Registration {
            hub,
            pubsub,
            user,
            conn_id,
            first_here,
            released: false,
        }
    }

    /// Unregisters now; true when this was the user's last connection on this node.
    pub fn release(&mut self) -> bool {
        if self.released {
            return false;
        }
        self.released = true;
        let topics = self.hub.unregister(self.user, self.conn_id);
        let last_here = topics.contains(&Topic::User(self.user));
        self.pubsub.release(topics);
        last_here
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether a browser's Origin may open a WebSocket (cross-site WebSocket hijacking). Clients
/// that send no Origin are not browsers and are allowed; an empty allow-list allows any.
pub fn origin_allowed(allowed: &[String], req: &HttpRequest) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = req.headers().get(actix_web::http::header::ORIGIN) else {
        return true;
    };
    let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
    allowed.iter().any(|a| a == origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots are never handed out beyond the limit, come back when dropped (a panicking owner
    /// included) and keep the gauge equal to what is taken.
    #[test]
    fn slots_are_bounded_and_released_by_drop() {
        let gauge = IntGauge::new("slots_test", "test").expect("gauge");
        let slots = Arc::new(Slots::new(2, gauge.clone()));
        let a = slots.take().expect("first");
        let b = slots.take().expect("second");
        assert!(slots.take().is_none(), "full");
        assert_eq!(gauge.get(), 2);
        drop(a);
        let c = slots.take().expect("a slot came back");
        let owner = std::thread::spawn(move || {
            let _held = c;
            panic!("connection task panicked");
        });
        assert!(owner.join().is_err());
        assert_eq!(slots.open(), 1, "the panicking owner's slot came back");
        drop(b);
        assert_eq!((slots.open(), gauge.get()), (0, 0));
    }

    /// Many threads racing for few slots never take more than there are.
    #[test]
    fn concurrent_takes_respect_the_limit() {
        let gauge = IntGauge::new("slots_race", "test").expect("gauge");
        let slots = Arc::new(Slots::new(5, gauge));
        let barrier = Arc::new(std::sync::Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (slots, barrier) = (slots.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    slots.take()
                })
            })
            .collect();
        let held: Vec<Option<Slot>> = threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        assert_eq!(held.iter().filter(|s| s.is_some()).count(), 5);
    }
}
