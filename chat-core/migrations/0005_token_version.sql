-- Token versions: a password change increments the user's version, and our tokens carry the
-- version they were issued at, so a change revokes exactly the tokens issued before it (Unix
-- seconds could not tell a token issued in the same second before the change from one after).
ALTER TABLE users ADD COLUMN token_version bigint NOT NULL DEFAULT 0;
