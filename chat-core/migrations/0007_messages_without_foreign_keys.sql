-- The messages table keeps no foreign keys. Each one made Postgres look up the referenced row and
-- lock it (FOR KEY SHARE) for every message inserted: with the three (conversation, sender,
-- recipient), the worker's insert of 10,000 messages took 380 ms instead of 115 ms
-- (EXPLAIN ANALYZE; docs/benchmarks.md, "Worker drain"). Nothing is lost by it:
--   - only the persistence worker inserts messages, and only entries a gateway appended after
--     checking them: the sender is the authenticated user, a direct recipient exists, a room is
--     one the sender is a member of;
--   - the worker inserts a direct conversation and its members in the same transaction as its
--     first messages, and rooms exist before anyone can send to them;
--   - no code deletes users or conversations.
-- An operator who deletes a user by hand leaves that user's messages in place (their ids stay in
-- history), where the keys would have refused the delete.
ALTER TABLE messages
    DROP CONSTRAINT IF EXISTS messages_conversation_id_fkey,
    DROP CONSTRAINT IF EXISTS messages_sender_id_fkey,
    DROP CONSTRAINT IF EXISTS messages_recipient_id_fkey;
