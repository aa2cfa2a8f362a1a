-- Password reset and profile: single-use reset tokens (stored hashed), the time a password last
-- changed (tokens issued before it are refused), and an avatar URL.
ALTER TABLE users
    ADD COLUMN avatar_url          text,
    ADD COLUMN password_changed_at timestamptz;

CREATE TABLE password_resets (
    token_hash bytea       PRIMARY KEY,
    user_id    uuid        NOT NULL REFERENCES users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX password_resets_user_idx ON password_resets (user_id);
