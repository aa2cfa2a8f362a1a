//! The Redis key and channel schema. Every name starts with the configured prefix; the keys the
//! append script touches share one hash tag (`{p<N>}`, the stream partition). Only the Redis
//! backend's files use it.

use uuid::Uuid;

use crate::counters::CounterKey;
use crate::pubsub::Topic;

/// Consumer group the persistence workers read each stream partition with.
pub const PERSISTENCE_GROUP: &str = "persistence";

/// Builds key and channel names for one deployment (one prefix, one partition count).
#[derive(Debug, Clone)]
pub struct KeySchema {
    prefix: String,
    partitions: u16,
}

impl KeySchema {
    /// `partitions` must be at least 1 (configuration validation guarantees it).
    pub fn new(prefix: impl Into<String>, partitions: u16) -> Self {
        KeySchema {
            prefix: prefix.into(),
            partitions: partitions.max(1),
        }
    }

    /// The configured prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Number of stream partitions.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// The partition a conversation's messages and sequence counter live in. Stable: it depends
    /// only on the id and the partition count.
    pub fn partition_of(&self, conversation_id: Uuid) -> u16 {
        let bytes = conversation_id.as_bytes();
        let mut head = [0u8; 8];
        head.copy_from_slice(&bytes[..8]);
        (u64::from_be_bytes(head) % u64::from(self.partitions)) as u16
    }

    /// The message stream of partition `p`.
    pub fn stream(&self, p: u16) -> String {
        format!("{}:{{p{}}}:stream", self.prefix, p)
    }

    /// Dead-letter stream of partition `p`: entries the worker could not decode or that Postgres
    /// rejected (integrity or data errors).
    pub fn dead_letter(&self, p: u16) -> String {
        format!("{}:{{p{}}}:dead", self.prefix, p)
    }

    /// The per-conversation sequence counter (in the conversation's partition slot): a hash
    /// whose field `n` is the last seq issued and `e` the log epoch it was validated in (see
    /// [`Self::epoch`]).
    pub fn seq_counter(&self, conversation_id: Uuid) -> String {
        let p = self.partition_of(conversation_id);
        format!("{}:{{p{}}}:ctr:{}", self.prefix, p, conversation_id)
    }

    /// The counter as 0.2 kept it (a plain integer). Read once, when a conversation is first
    /// validated in an epoch, so an upgrade never issues a seq 0.2 issued.
    pub fn legacy_seq(&self, conversation_id: Uuid) -> String {
        let p = self.partition_of(conversation_id);
        format!("{}:{{p{}}}:seq:{}", self.prefix, p, conversation_id)
    }

    /// The log epoch of partition `p`: `<token>:<margin>`, set when a process first appends to
    /// the partition after Redis started (or lost the key). A counter validated in another
    /// epoch (or in none) is re-based above what Postgres holds before it issues a seq.
    pub fn epoch(&self, p: u16) -> String {
        format!("{}:{{p{}}}:epoch", self.prefix, p)
    }

    /// The recent tail of one conversation: a stream whose entry ids are `<seq>-0` and whose one
    /// field is the `message` frame, capped in length and expiring when idle. History and sync
    /// read it so an acked message is visible before the worker has written it to Postgres.
    pub fn tail(&self, conversation_id: Uuid) -> String {
        let p = self.partition_of(conversation_id);
        format!("{}:{{p{}}}:tail:{}", self.prefix, p, conversation_id)
    }

    /// The two members of a direct conversation (`<low>:<high>`), written with its first message,
    /// so a node can resolve a direct `conversation_id` before Postgres has the conversation.
    pub fn pair(&self, conversation_id: Uuid) -> String {
        let p = self.partition_of(conversation_id);
        format!("{}:{{p{}}}:pair:{}", self.prefix, p, conversation_id)
    }

    /// The record of a client id a user appended in a conversation (`<seq>:<msg_id>:<ts>`), kept
    /// for the dedup window, so a repeated send gets the original ack.
    pub fn sent(&self, conversation_id: Uuid, user_id: Uuid, client_id: &str) -> String {
        let p = self.partition_of(conversation_id);
        format!(
            "{}:{{p{}}}:sent:{}:{}:{}",
            self.prefix, p, conversation_id, user_id, client_id
        )
    }

    /// The pub/sub channel carrying frames for every connection of one user.
    pub fn user_channel(&self, user_id: Uuid) -> String {
        format!("{}:user:{}", self.prefix, user_id)
    }

    /// The pub/sub channel of one room: its messages, receipts, typing and membership events.
    pub fn room_channel(&self, room_id: Uuid) -> String {
        format!("{}:room:{}", self.prefix, room_id)
    }

    /// The pub/sub channel of one user's presence changes, for connections that watch them.
    pub fn presence_channel(&self, user_id: Uuid) -> String {
        format!("{}:presence:{}", self.prefix, user_id)
    }

    /// A user's presence: a sorted set of the nodes holding a connection of theirs, each scored
    /// with the (Redis clock) time its entry expires unless the node refreshes it.
    pub fn presence(&self, user_id: Uuid) -> String {
        format!("{}:presence:u:{}", self.prefix, user_id)
    }

    /// Every present user, scored with the latest expiry of their nodes' entries: the index
    /// the sweeper walks to find users whose nodes died.
    pub fn presence_deadlines(&self) -> String {
        format!("{}:presence:deadlines", self.prefix)
    }

    /// A shared counter's key; it expires with its window.
    pub fn counter(&self, key: &CounterKey) -> String {
        match key {
            CounterKey::LoginEmail(email) => format!("{}:limit:login:email:{email}", self.prefix),
            CounterKey::LoginIp(ip) => format!("{}:limit:login:ip:{ip}", self.prefix),
        }
    }

    /// The channel name of a topic.
    pub fn channel(&self, topic: Topic) -> String {
        match topic {
            Topic::User(u) => self.user_channel(u),
            Topic::Room(r) => self.room_channel(r),
            Topic::Presence(u) => self.presence_channel(u),
        }
    }

    /// The topic a channel from [`Self::channel`] belongs to; `None` for foreign names.
    pub fn parse_channel(&self, channel: &str) -> Option<Topic> {
        let rest = channel.strip_prefix(&self.prefix)?;
        if let Some(user) = rest.strip_prefix(":user:") {
            return Uuid::parse_str(user).ok().map(Topic::User);
        }
        if let Some(user) = rest.strip_prefix(":presence:") {
            return Uuid::parse_str(user).ok().map(Topic::Presence);
        }
        let room = rest.strip_prefix(":room:")?;
        Uuid::parse_str(room).ok().map(Topic::Room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conversation's counter and its stream share a hash tag, so one script may touch both.
    #[test]
    fn seq_and_stream_share_a_hash_tag() {
        let keys = KeySchema::new("chat", 8);
        for _ in 0..100 {
            let conv = Uuid::new_v4();
            let p = keys.partition_of(conv);
            assert!(p < 8);
            let tag = format!("{{p{p}}}");
            assert!(keys.seq_counter(conv).contains(&tag));
            assert!(keys.epoch(p).contains(&tag));
            assert!(keys.stream(p).contains(&tag));
        }
    }

    /// Channel names round-trip to their topic, and foreign prefixes are not ours.
    #[test]
    fn channels_round_trip() {
        let keys = KeySchema::new("t1", 4);
        let id = Uuid::now_v7();
        for topic in [Topic::User(id), Topic::Room(id), Topic::Presence(id)] {
            assert_eq!(keys.parse_channel(&keys.channel(topic)), Some(topic));
        }
        let other = KeySchema::new("t2", 4);
        assert_eq!(keys.parse_channel(&other.user_channel(id)), None);
        assert_eq!(keys.parse_channel("t1:room:nope"), None);
    }

    /// The tail and pair keys live in the conversation's slot, beside its counter.
    #[test]
    fn tail_and_pair_share_the_counter_slot() {
        let keys = KeySchema::new("chat", 8);
        let conv = Uuid::new_v4();
        let tag = format!("{{p{}}}", keys.partition_of(conv));
        assert!(keys.tail(conv).contains(&tag));
        assert!(keys.pair(conv).contains(&tag));
        assert!(keys.sent(conv, Uuid::now_v7(), "c-1").contains(&tag));
    }
}
