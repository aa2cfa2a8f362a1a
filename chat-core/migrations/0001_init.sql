-- Users, direct conversations and their messages.
CREATE TABLE users (
    id            uuid PRIMARY KEY,
    name          text        NOT NULL,
    email         text        NOT NULL,
    password_hash text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz
);
-- Email is unique case-insensitively.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

CREATE TABLE conversations (
    id         uuid PRIMARY KEY,
    kind       text        NOT NULL CHECK (kind IN ('direct', 'room')),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conversation_members (
    conversation_id uuid        NOT NULL REFERENCES conversations (id),
    user_id         uuid        NOT NULL REFERENCES users (id),
    joined_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX conversation_members_user_idx ON conversation_members (user_id);

-- One row per message; id is the gateway's msg_id, so a redelivered stream entry is a no-op.
CREATE TABLE messages (
    id              uuid PRIMARY KEY,
    conversation_id uuid        NOT NULL REFERENCES conversations (id),
    seq             bigint      NOT NULL CHECK (seq > 0),
    sender_id       uuid        NOT NULL REFERENCES users (id),
    recipient_id    uuid        REFERENCES users (id),
    body            text        NOT NULL,
    sent_at         timestamptz NOT NULL,
    stored_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (conversation_id, seq)
);
