-- Room roles and blocks: each room member is its owner, an admin or a plain member (owners and
-- admins add and remove people; plain members cannot add anyone), with who added them; a user
-- can refuse being added again to a room, or by a person.
ALTER TABLE conversation_members
    ADD COLUMN role     text NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'admin', 'member')),
    ADD COLUMN added_by uuid REFERENCES users (id);

UPDATE conversation_members m SET role = 'owner'
FROM conversations c
WHERE c.id = m.conversation_id AND c.kind = 'room' AND c.owner_id = m.user_id;

-- The user refuses being added to this room again.
CREATE TABLE room_blocks (
    user_id         uuid        NOT NULL REFERENCES users (id),
    conversation_id uuid        NOT NULL REFERENCES conversations (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, conversation_id)
);

-- The user refuses being added to any room by `blocked_id`.
CREATE TABLE adder_blocks (
    user_id    uuid        NOT NULL REFERENCES users (id),
    blocked_id uuid        NOT NULL REFERENCES users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, blocked_id)
);
