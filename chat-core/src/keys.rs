//! The Redis key and channel schema. Every name starts with the configured prefix; every key a
//! script touches shares one hash tag (`{p<N>}`, the stream partition), so the schema runs on
//! Redis Cluster unchanged.

use uuid::Uuid;

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

    /// The per-conversation sequence counter (in the conversation's partition slot).
    pub fn seq(&self, conversation_id: Uuid) -> String {
        let p = self.partition_of(conversation_id);
        format!("{}:{{p{}}}:seq:{}", self.prefix, p, conversation_id)
    }

    /// The pub/sub channel carrying frames for every connection of one user.
    pub fn user_channel(&self, user_id: Uuid) -> String {
        format!("{}:user:{}", self.prefix, user_id)
    }

    /// The user id a channel from [`Self::user_channel`] belongs to.
    pub fn parse_user_channel(&self, channel: &str) -> Option<Uuid> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix(":user:")?;
        Uuid::parse_str(rest).ok()
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
            assert!(keys.seq(conv).contains(&tag));
            assert!(keys.stream(p).contains(&tag));
        }
    }

    /// Channel names round-trip to the user id, and foreign prefixes are not ours.
    #[test]
    fn user_channel_round_trips() {
        let keys = KeySchema::new("t1", 4);
        let user = Uuid::now_v7();
        assert_eq!(
            keys.parse_user_channel(&keys.user_channel(user)),
            Some(user)
        );
        let other = KeySchema::new("t2", 4);
        assert_eq!(keys.parse_user_channel(&other.user_channel(user)), None);
    }
}
