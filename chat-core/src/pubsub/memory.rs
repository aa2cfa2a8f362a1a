//! Pub/sub inside one process: a publication is pushed straight into the subscriber for every
//! topic it is subscribed to, in the publisher's task, in order. Nothing is ever lost, so the
//! subscriber is never told to catch up.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{Interest, PubSub, Publication, Subscriber, Topic};
use crate::backend::BackendError;

/// In-process pub/sub for one node.
pub struct MemoryPubSub {
    subscriber: Arc<dyn Subscriber>,
    subscribed: Mutex<HashSet<Topic>>,
    /// Set to the number of subscribed topics, as the Redis backend does.
    gauge: Option<prometheus::IntGauge>,
}

impl MemoryPubSub {
    pub fn new(subscriber: Arc<dyn Subscriber>, gauge: Option<prometheus::IntGauge>) -> Self {
        MemoryPubSub {
            subscriber,
            subscribed: Mutex::new(HashSet::new()),
            gauge,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashSet<Topic>> {
        self.subscribed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies subscription changes: wanted topics added, unwanted released ones dropped.
    fn apply(&self, interest: Interest) {
        let mut subscribed = self.lock();
        for topic in interest.subscribe {
            if self.subscriber.wants(topic) {
                subscribed.insert(topic);
            }
        }
        for topic in interest.release {
            if !self.subscriber.wants(topic) {
                subscribed.remove(&topic);
            }
        }
        if let Some(gauge) = &self.gauge {
            gauge.set(subscribed.len() as i64);
        }
    }
}

#[async_trait]
impl PubSub for MemoryPubSub {
    async fn subscribe(&self, topics: Vec<Topic>) -> Result<(), BackendError> {
        self.apply(Interest {
            subscribe: topics,
            release: Vec::new(),
        });
        Ok(())
    }

    fn release(&self, topics: Vec<Topic>) {
        self.apply(Interest {
            subscribe: Vec::new(),
            release: topics,
        });
    }

    async fn publish(&self, publications: Vec<Publication>) -> Result<(), BackendError> {
        for publication in publications {
            for topic in publication.topics {
                // The lock is not held while the subscriber works.
                let subscribed = self.lock().contains(&topic);
                if subscribed {
                    let interest = self.subscriber.deliver(topic, publication.envelope.clone());
                    if !interest.is_empty() {
                        self.apply(interest);
                    }
                }
            }
        }
        Ok(())
    }

    fn healthy(&self) -> bool {
        true
    }
}
