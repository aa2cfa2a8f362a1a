-- Conversations as the API lists them: rooms with a name and an owner; the activity and last seq
-- the worker keeps current; each member's read position.
ALTER TABLE conversations
    ADD COLUMN name             text,
    ADD COLUMN owner_id         uuid REFERENCES users (id),
    ADD COLUMN last_seq         bigint      NOT NULL DEFAULT 0,
    ADD COLUMN last_activity_at timestamptz NOT NULL DEFAULT now(),
    -- Rooms only, kept by the room endpoints: presence fan-out skips big rooms without counting.
    ADD COLUMN member_count     integer     NOT NULL DEFAULT 0;

ALTER TABLE conversation_members
    ADD COLUMN last_read_seq bigint NOT NULL DEFAULT 0 CHECK (last_read_seq >= 0);

