//! Conversation identity: a direct conversation's id is derived from its two members, so every
//! node computes the same id for a pair without asking anyone.

use uuid::Uuid;

/// Namespace for direct-conversation ids (UUID v5). Changing it changes every id: never do.
const DIRECT_NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_5e1a_9b7d_4c1e_8f3a_2d4b_6e8f_0a11);

/// The id of the direct conversation between `a` and `b`, the same whichever order they come in.
pub fn direct_conversation_id(a: Uuid, b: Uuid) -> Uuid {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let mut name = [0u8; 32];
    name[..16].copy_from_slice(low.as_bytes());
    name[16..].copy_from_slice(high.as_bytes());
    Uuid::new_v5(&DIRECT_NAMESPACE, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pair's id does not depend on who sends, and differs between pairs.
    #[test]
    fn direct_id_is_symmetric_and_distinct() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        let c = Uuid::now_v7();
        assert_eq!(direct_conversation_id(a, b), direct_conversation_id(b, a));
        assert_ne!(direct_conversation_id(a, b), direct_conversation_id(a, c));
    }
}
