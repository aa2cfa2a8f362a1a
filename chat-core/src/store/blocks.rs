//! Blocks: the rooms a user refuses being added to again and the people they refuse being added
//! by, listed and lifted here (they are set when the user leaves a room, in [`super::rooms`]).

use serde::Serialize;
use uuid::Uuid;

use super::{Store, StoreError};

/// Most entries of each kind [`Store::blocks`] lists.
const MAX_LISTED: i64 = 1000;

/// Something a user blocked: a room or a person, with its name.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Blocked {
    pub id: Uuid,
    pub name: String,
}

/// What a user blocks, newest first.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Blocks {
    pub rooms: Vec<Blocked>,
    pub users: Vec<Blocked>,
}

impl Store {
    /// The rooms and people `user` refuses being added to and by (up to 1,000 of each).
    pub async fn blocks(&self, user: Uuid) -> Result<Blocks, StoreError> {
        let client = self.client().await?;
        let named = |rows: Vec<tokio_postgres::Row>| {
            rows.iter()
                .map(|r| Blocked {
                    id: r.get(0),
                    name: r.get::<_, Option<String>>(1).unwrap_or_default(),
                })
                .collect()
        };
        let rooms = client
            .query(
                "SELECT c.id, c.name FROM room_blocks b JOIN conversations c ON c.id = b.conversation_id
                 WHERE b.user_id = $1 ORDER BY b.created_at DESC LIMIT $2",
                &[&user, &MAX_LISTED],
            )
            .await?;
        let users = client
            .query(
                "SELECT u.id, u.name FROM adder_blocks b JOIN users u ON u.id = b.blocked_id
                 WHERE b.user_id = $1 ORDER BY b.created_at DESC LIMIT $2",
                &[&user, &MAX_LISTED],
            )
            .await?;
        Ok(Blocks {
            rooms: named(rooms),
            users: named(users),
        })
    }

    /// `user` may be added to `room` again. Lifting a block that does not exist is not an error.
    pub async fn unblock_room(&self, user: Uuid, room: Uuid) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM room_blocks WHERE user_id = $1 AND conversation_id = $2",
                &[&user, &room],
            )
            .await?;
        Ok(())
    }

    /// `user` may be added to rooms by `adder` again.
    pub async fn unblock_adder(&self, user: Uuid, adder: Uuid) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM adder_blocks WHERE user_id = $1 AND blocked_id = $2",
                &[&user, &adder],
            )
            .await?;
        Ok(())
    }
}
