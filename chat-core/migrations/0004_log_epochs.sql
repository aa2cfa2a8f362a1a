-- The Redis log's epochs and the seq ranges a re-base skipped (docs/architecture.md, "When
-- Redis loses data"). An epoch is opened for a log partition whenever a process finds that Redis
-- lost (or never had) the partition's epoch key, or restarted; it is marked used before the
-- first seq is issued in it. In a partition that had a used epoch before, every conversation's
-- counter is re-based above every seq that can have been issued before it issues another.
CREATE TABLE log_epochs (
    key_prefix text        NOT NULL,
    partition  integer     NOT NULL,
    epoch      text        NOT NULL,
    opened_at  timestamptz NOT NULL DEFAULT now(),
    used       boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (key_prefix, partition, epoch)
);

-- Seqs of a conversation that will never hold a message: a re-base moved the counter past them
-- (they were issued to messages Redis lost, or never issued). History and sync skip them.
CREATE TABLE seq_gaps (
    conversation_id uuid        NOT NULL,
    lo              int8        NOT NULL,
    hi              int8        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, lo),
    CHECK (lo <= hi)
);
