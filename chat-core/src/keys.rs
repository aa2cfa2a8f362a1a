//! The Redis key and channel schema. Every name starts with the configured prefix; the keys the
//! append script touches share one hash tag (the stream partition's), and a user's presence key
//! shares one with its presence partition's index, so every script touches one slot. On one
//! instance the tags are `{p<N>}` and `{q<N>}`; on a Redis Cluster each is chosen so that the
//! partitions' slots spread evenly over the slot range (partition `k` of `n` lands in the `k`-th
//! `n`th of it), and so over the masters. Only the Redis backend's files use it.

use uuid::Uuid;

use crate::counters::CounterKey;
use crate::pubsub::Topic;

/// Consumer group the persistence workers read each stream partition with.
pub const PERSISTENCE_GROUP: &str = "persistence";

/// Presence partitions: each has its index of present users, and a user's presence key shares
/// its partition's hash tag, so join, leave and the sweep touch one slot each.
pub const PRESENCE_PARTITIONS: u16 = 16;

/// Slots of a Redis Cluster.
pub const CLUSTER_SLOTS: u16 = 16384;

/// Builds key and channel names for one deployment (one prefix, one partition count).
#[derive(Debug, Clone)]
pub struct KeySchema {
    prefix: String,
    partitions: u16,
    /// The hash tag of each stream partition.
    tags: std::sync::Arc<[String]>,
    /// The hash tag of each presence partition.
    presence_tags: std::sync::Arc<[String]>,
    /// On a Redis Cluster: channels are shard channels carrying their partition's tag.
    cluster: bool,
}

impl KeySchema {
    /// The schema on one Redis instance. `partitions` must be at least 1 (configuration
    /// validation guarantees it).
    pub fn new(prefix: impl Into<String>, partitions: u16) -> Self {
        let partitions = partitions.max(1);
        KeySchema {
            prefix: prefix.into(),
            partitions,
            tags: (0..partitions).map(|p| format!("p{p}")).collect(),
            presence_tags: (0..PRESENCE_PARTITIONS).map(|q| format!("q{q}")).collect(),
            cluster: false,
        }
    }

    /// The schema on a Redis Cluster: tags spread evenly over the slots.
    pub fn cluster(prefix: impl Into<String>, partitions: u16) -> Self {
        let partitions = partitions.max(1);
        KeySchema {
            prefix: prefix.into(),
            partitions,
            tags: (0..partitions)
                .map(|p| balanced_tag('p', p, partitions))
                .collect(),
            presence_tags: (0..PRESENCE_PARTITIONS)
                .map(|q| balanced_tag('q', q, PRESENCE_PARTITIONS))
                .collect(),
            cluster: true,
        }
    }

    /// The schema for `target`.
    pub fn for_target(
        prefix: impl Into<String>,
        partitions: u16,
        target: &crate::redis_conn::RedisTarget,
    ) -> Self {
        if target.is_cluster() {
            Self::cluster(prefix, partitions)
        } else {
            Self::new(prefix, partitions)
        }
    }

    /// True on a Redis Cluster (shard channels, `SPUBLISH`/`SSUBSCRIBE`).
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The hash tag of stream partition `p` (without braces).
    pub fn tag(&self, p: u16) -> &str {
        &self.tags[usize::from(p % self.partitions)]
    }

    /// The cluster slot stream partition `p` lives in.
    pub fn partition_slot(&self, p: u16) -> u16 {
        slot(self.stream(p).as_bytes())
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
        format!("{}:{{{}}}:stream", self.prefix, self.tag(p))
    }

    /// Dead-letter stream of partition `p`: entries the worker could not decode or that Postgres
    /// rejected (integrity or data errors).
    pub fn dead_letter(&self, p: u16) -> String {
        format!("{}:{{{}}}:dead", self.prefix, self.tag(p))
    }

    /// The per-conversation sequence counter (in the conversation's partition slot): a hash
    /// whose field `n` is the last seq issued and `e` the log epoch it was validated in (see
    /// [`Self::epoch`]).
    pub fn seq_counter(&self, conversation_id: Uuid) -> String {
        let p = self.partition_of(conversation_id);
        format!(
            "{}:{{{}}}:ctr:{}",
            self.prefix,
            self.tag(p),
            conversation_id
        )
    }

    /// The counter as 0.2 kept it (a plain integer). Read once, when a conversation is first
    /// validated in an epoch, so an upgrade never issues a seq 0.2 issued.
    pub fn legacy_seq(&self, conversation_id: Uuid) -> String {
        let p = self.partition_of(conversation_id);
        format!(
            "{}:{{{}}}:seq:{}",
            self.prefix,
            self.tag(p),
            conversation_id
        )
    }

    /// The log epoch of partition `p`: `<token>:<margin>`, set when a process first appends to
    /// the partition after Redis started (or lost the key). A counter validated in another
    /// epoch (or in none) is re-based above what Postgres holds before it issues a seq.
    pub fn epoch(&self, p: u16) -> String {
        format!("{}:{{{}}}:epoch", self.prefix, self.tag(p))
    }

    /// The recent tail of one conversation: a stream whose entry ids are `<seq>-0` and whose one
    /// field is the `message` frame, capped in length and expiring when idle. History and sync
    /// read it so an acked message is visible before the worker has written it to Postgres.
    pub fn tail(&self, conversation_id: Uuid) -> String {
        let p = self.partition_of(conversation_id);
        format!(
            "{}:{{{}}}:tail:{}",
            self.prefix,
            self.tag(p),
            conversation_id
        )
    }

    /// The two members of a direct conversation (`<low>:<high>`), written with its first message,
    /// so a node can resolve a direct `conversation_id` before Postgres has the conversation.
    pub fn pair(&self, conversation_id: Uuid) -> String {
        let p = self.partition_of(conversation_id);
        format!(
            "{}:{{{}}}:pair:{}",
            self.prefix,
            self.tag(p),
            conversation_id
        )
    }

    /// The record of a client id a user appended in a conversation (`<seq>:<msg_id>:<ts>`), kept
    /// for the dedup window, so a repeated send gets the original ack.
    pub fn sent(&self, conversation_id: Uuid, user_id: Uuid, client_id: &str) -> String {
        let p = self.partition_of(conversation_id);
        format!(
            "{}:{{{}}}:sent:{}:{}:{}",
            self.prefix,
            self.tag(p),
            conversation_id,
            user_id,
            client_id
        )
    }

    /// The presence partition of a user.
    pub fn presence_partition(&self, user_id: Uuid) -> u16 {
        let bytes = user_id.as_bytes();
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&bytes[8..]);
        (u64::from_be_bytes(tail) % u64::from(PRESENCE_PARTITIONS)) as u16
    }

    /// A user's presence: a sorted set of the nodes holding a connection of theirs, each scored
    /// with the (Redis clock) time its entry expires unless the node refreshes it. In the slot
    /// of the user's presence partition.
    pub fn presence(&self, user_id: Uuid) -> String {
        let q = self.presence_partition(user_id);
        format!(
            "{}:{{{}}}:presence:u:{}",
            self.prefix,
            self.presence_tags[usize::from(q)],
            user_id
        )
    }

    /// Every present user of presence partition `q`, scored with the latest expiry of their
    /// nodes' entries: the index the sweeper walks to find users whose nodes died.
    pub fn presence_deadlines(&self, q: u16) -> String {
        format!(
            "{}:{{{}}}:presence:deadlines",
            self.prefix,
            self.presence_tags[usize::from(q % PRESENCE_PARTITIONS)]
        )
    }

    /// A shared counter's key; it expires with its window.
    pub fn counter(&self, key: &CounterKey) -> String {
        match key {
            CounterKey::LoginFailedEmail(email) => {
                format!("{}:limit:login-failed:email:{email}", self.prefix)
            }
            CounterKey::LoginFailedEmailIp(email, ip) => {
                format!("{}:limit:login-failed:email-ip:{ip}:{email}", self.prefix)
            }
            CounterKey::LoginFailedIp(ip) => format!("{}:limit:login-failed:ip:{ip}", self.prefix),
            CounterKey::RegisterIp(ip) => format!("{}:limit:register:ip:{ip}", self.prefix),
            CounterKey::RegisterAll => format!("{}:limit:register:all", self.prefix),
            CounterKey::WsTicket(id) => format!("{}:ticket:{id}", self.prefix),
            CounterKey::AccountSends(user, window) => {
                format!("{}:limit:sends:{user}:{window}", self.prefix)
            }
        }
    }

    /// The channel `topic`'s envelopes about stream partition `p` go to. On one instance a
    /// topic has one channel (`{prefix}:user:<id>`, `{prefix}:room:<id>`,
    /// `{prefix}:presence:<id>`). On a cluster a user's topic has one shard channel per stream
    /// partition (`{prefix}:{<tag>}:user:<id>`), so the append script publishes a message in
    /// its own slot, atomically and in seq order; a room's channel carries its conversation's
    /// tag, and a presence channel its user's presence tag. `p` matters only for a user.
    pub fn channel_in(&self, topic: Topic, p: u16) -> String {
        match (self.cluster, topic) {
            (false, Topic::User(u)) => format!("{}:user:{}", self.prefix, u),
            (false, Topic::Room(r)) => format!("{}:room:{}", self.prefix, r),
            (false, Topic::Presence(u)) => format!("{}:presence:{}", self.prefix, u),
            (true, Topic::User(u)) => format!("{}:{{{}}}:user:{}", self.prefix, self.tag(p), u),
            (true, Topic::Room(r)) => format!(
                "{}:{{{}}}:room:{}",
                self.prefix,
                self.tag(self.partition_of(r)),
                r
            ),
            (true, Topic::Presence(u)) => format!(
                "{}:{{{}}}:presence:{}",
                self.prefix,
                self.presence_tags[usize::from(self.presence_partition(u))],
                u
            ),
        }
    }

    /// The channel of a topic for envelopes not about a conversation (on a cluster, a user's
    /// partition-0 channel).
    pub fn channel(&self, topic: Topic) -> String {
        self.channel_in(topic, 0)
    }

    /// Every channel a node subscribes to for `topic`.
    pub fn channels(&self, topic: Topic) -> Vec<String> {
        match topic {
            Topic::User(_) if self.cluster => (0..self.partitions)
                .map(|p| self.channel_in(topic, p))
                .collect(),
            _ => vec![self.channel(topic)],
        }
    }

    /// The shard channel of a node's delivery canary in partition `p`'s slot (`id` names the
    /// node's run). [`KeySchema::parse_channel`] reads no topic from it.
    pub fn canary_channel(&self, p: u16, id: &str) -> String {
        format!("{}:{{{}}}:canary:{id}", self.prefix, self.tag(p))
    }

    /// The topic a channel from [`Self::channel_in`] belongs to; `None` for foreign names.
    pub fn parse_channel(&self, channel: &str) -> Option<Topic> {
        let mut rest = channel.strip_prefix(&self.prefix)?;
        if self.cluster {
            let tagged = rest.strip_prefix(":{")?;
            let close = tagged.find('}')?;
            rest = &tagged[close + 1..];
        }
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

/// CRC16-XMODEM, the hash Redis Cluster maps keys to slots with.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The Redis Cluster slot of a key (or shard channel): of its hash tag, the text between the
/// first `{` and the next `}` when that is not empty, else of the whole name.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % CLUSTER_SLOTS
}

/// A hash tag for partition `k` of `n` whose slot lies in the `k`-th `n`th of the slot range
/// (`<letter><k>` with the first suffix that lands there), so `n` partitions spread evenly over
/// any cluster whose masters own contiguous, equal slot ranges.
fn balanced_tag(letter: char, k: u16, n: u16) -> String {
    let lo = u32::from(k) * u32::from(CLUSTER_SLOTS) / u32::from(n);
    let hi = (u32::from(k) + 1) * u32::from(CLUSTER_SLOTS) / u32::from(n);
    for suffix in 0u32.. {
        let tag = format!("{letter}{k}.{suffix}");
        let s = u32::from(slot(tag.as_bytes()));
        if (lo..hi).contains(&s) {
            return tag;
        }
    }
    unreachable!("some suffix lands in every range of at least one slot")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot function agrees with Redis's (values from the Redis Cluster specification
    /// and `CLUSTER KEYSLOT`).
    #[test]
    fn slots_match_redis() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(
            slot(b"foo{}{bar}"),
            slot(b"bar"),
            "an empty tag hashes the whole name"
        );
    }

    /// On a cluster, partition k of n lands in the k-th nth of the slots; the tags are stable.
    #[test]
    fn cluster_partitions_spread_evenly() {
        for n in [1u16, 3, 8, 16, 64] {
            let keys = KeySchema::cluster("chat", n);
            for p in 0..n {
                let s = u32::from(keys.partition_slot(p));
                let (lo, hi) = (
                    u32::from(p) * 16384 / u32::from(n),
                    (u32::from(p) + 1) * 16384 / u32::from(n),
                );
                assert!((lo..hi).contains(&s), "partition {p} of {n} at slot {s}");
            }
        }
        assert_eq!(
            KeySchema::cluster("a", 8).tag(3),
            KeySchema::cluster("b", 8).tag(3)
        );
        assert_eq!(
            KeySchema::new("a", 8).tag(3),
            "p3",
            "one instance keeps 0.2's tags"
        );
    }

    /// A user's presence key and their partition's index share a slot.
    #[test]
    fn presence_keys_share_their_index_slot() {
        for keys in [KeySchema::new("chat", 8), KeySchema::cluster("chat", 8)] {
            for _ in 0..50 {
                let user = Uuid::new_v4();
                let q = keys.presence_partition(user);
                assert_eq!(
                    slot(keys.presence(user).as_bytes()),
                    slot(keys.presence_deadlines(q).as_bytes())
                );
            }
        }
    }

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
            let cluster = KeySchema::cluster("chat", 8);
            let s = slot(cluster.stream(p).as_bytes());
            for key in [
                cluster.seq_counter(conv),
                cluster.epoch(p),
                cluster.tail(conv),
                cluster.pair(conv),
                cluster.sent(conv, conv, "c"),
                cluster.dead_letter(p),
            ] {
                assert_eq!(slot(key.as_bytes()), s, "{key}");
            }
        }
    }

    /// Channel names round-trip to their topic, and foreign prefixes are not ours.
    #[test]
    fn channels_round_trip() {
        let id = Uuid::now_v7();
        for keys in [KeySchema::new("t1", 4), KeySchema::cluster("t1", 4)] {
            for topic in [Topic::User(id), Topic::Room(id), Topic::Presence(id)] {
                for channel in keys.channels(topic) {
                    assert_eq!(keys.parse_channel(&channel), Some(topic), "{channel}");
                }
            }
            let other = KeySchema::new("t2", 4);
            assert_eq!(keys.parse_channel(&other.channel(Topic::User(id))), None);
            assert_eq!(keys.parse_channel("t1:room:nope"), None);
        }
        assert_eq!(
            KeySchema::cluster("t", 4).channels(Topic::User(id)).len(),
            4
        );
        assert_eq!(KeySchema::new("t", 4).channels(Topic::User(id)).len(), 1);
    }

    /// On a cluster, a conversation's channels share the slot of its counter and stream (the
    /// append script publishes there); every partition has a user channel.
    #[test]
    fn cluster_channels_share_their_partition_slot() {
        let keys = KeySchema::cluster("chat", 8);
        let (user, conv) = (Uuid::now_v7(), Uuid::new_v4());
        let p = keys.partition_of(conv);
        let s = slot(keys.stream(p).as_bytes());
        assert_eq!(slot(keys.channel_in(Topic::User(user), p).as_bytes()), s);
        assert_eq!(slot(keys.channel_in(Topic::Room(conv), p).as_bytes()), s);
        assert_eq!(
            slot(keys.channel(Topic::Presence(user)).as_bytes()),
            slot(keys.presence(user).as_bytes())
        );
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
