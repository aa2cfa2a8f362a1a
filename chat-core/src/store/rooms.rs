//! Rooms: creation, the room view, adding and removing members, with the member and room-count
//! limits checked inside the transaction that changes them.

use serde::Serialize;
use uuid::Uuid;

use super::{Member, Store, StoreError};

/// Most members listed by [`Store::room_view`].
const MAX_LISTED_MEMBERS: i64 = 1000;

/// A room as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RoomView {
    pub id: Uuid,
    pub kind: &'static str,
    pub name: String,
    pub owner_id: Option<Uuid>,
    pub member_count: i64,
    /// Up to 1000 members, in the order they joined.
    pub members: Vec<Member>,
}

/// Why a room change was refused (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomRefusal {
    /// No such room, or the caller is not a member (answered alike).
    NotFound,
    /// Only the room's owner removes other members.
    NotOwner,
    /// A field is invalid: the field and its code (`unknown_user`, `room_limit_reached`,
    /// `room_full`).
    Invalid {
        field: &'static str,
        code: &'static str,
    },
}

/// A room change: done, refused, or failed.
pub type RoomResult<T> = Result<Result<T, RoomRefusal>, StoreError>;

/// Refuses when a user does not exist or is already in `max_rooms` rooms.
async fn check_users(
    tx: &deadpool_postgres::Transaction<'_>,
    users: &[Uuid],
    max_rooms: usize,
    field: &'static str,
) -> Result<Option<RoomRefusal>, StoreError> {
    let found = tx
        .query_one("SELECT count(*) FROM users WHERE id = ANY($1)", &[&users])
        .await?;
    if found.get::<_, i64>(0) != users.len() as i64 {
        return Ok(Some(RoomRefusal::Invalid {
            field,
            code: "unknown_user",
        }));
    }
    let full = tx
        .query_opt(
            "SELECT m.user_id FROM conversation_members m
             JOIN conversations c ON c.id = m.conversation_id AND c.kind = 'room'
             WHERE m.user_id = ANY($1)
             GROUP BY m.user_id HAVING count(*) >= $2 LIMIT 1",
            &[&users, &(max_rooms as i64)],
        )
        .await?;
    Ok(full.map(|_| RoomRefusal::Invalid {
        field,
        code: "room_limit_reached",
    }))
}

/// The room's owner when `user` is a member of it; `None` otherwise (existing or not). With
/// `lock`, the room row stays locked until the transaction ends.
async fn owner_if_member(
    client: &impl deadpool_postgres::GenericClient,
    room: Uuid,
    user: Uuid,
    lock: bool,
) -> Result<Option<Option<Uuid>>, StoreError> {
    let sql = if lock {
        "SELECT c.owner_id FROM conversations c
         JOIN conversation_members m ON m.conversation_id = c.id AND m.user_id = $2
         WHERE c.id = $1 AND c.kind = 'room' FOR UPDATE OF c"
    } else {
        "SELECT c.owner_id FROM conversations c
         JOIN conversation_members m ON m.conversation_id = c.id AND m.user_id = $2
         WHERE c.id = $1 AND c.kind = 'room'"
    };
    let row = client.query_opt(sql, &[&room, &user]).await?;
    Ok(row.map(|r| r.get(0)))
}

impl Store {
    /// Creates room `room` named `name`, owned by `members[0]`, with `members` (deduplicated,
    /// the owner first).
    pub async fn create_room(
        &self,
        room: Uuid,
        name: &str,
        members: &[Uuid],
        max_rooms: usize,
    ) -> RoomResult<()> {
        let Some(owner) = members.first() else {
            return Ok(Err(RoomRefusal::Invalid {
                field: "member_ids",
                code: "required",
            }));
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some(refusal) = check_users(&tx, members, max_rooms, "member_ids").await? {
            return Ok(Err(refusal));
        }
        let count = i32::try_from(members.len()).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO conversations (id, kind, name, owner_id, member_count)
             VALUES ($1, 'room', $2, $3, $4)",
            &[&room, &name, owner, &count],
        )
        .await?;
        tx.execute(
            "INSERT INTO conversation_members (conversation_id, user_id)
             SELECT $1, u FROM unnest($2::uuid[]) AS t(u)",
            &[&room, &members],
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// The room, as its members see it.
    pub async fn room_view(&self, room: Uuid) -> RoomResult<RoomView> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT name, owner_id,
                        (SELECT count(*) FROM conversation_members WHERE conversation_id = $1)
                 FROM conversations WHERE id = $1 AND kind = 'room'",
                &[&room],
            )
            .await?
        else {
            return Ok(Err(RoomRefusal::NotFound));
        };
        let members = client
            .query(
                "SELECT u.id, u.name, u.avatar_url, m.last_read_seq
                 FROM conversation_members m JOIN users u ON u.id = m.user_id
                 WHERE m.conversation_id = $1 ORDER BY m.joined_at, u.id LIMIT $2",
                &[&room, &MAX_LISTED_MEMBERS],
            )
            .await?
            .iter()
            .map(|r| Member {
                id: r.get(0),
                name: r.get(1),
                avatar_url: r.get(2),
                last_read_seq: r.get(3),
            })
            .collect();
        Ok(Ok(RoomView {
            id: room,
            kind: "room",
            name: row.get::<_, Option<String>>(0).unwrap_or_default(),
            owner_id: row.get(1),
            member_count: row.get(2),
            members,
        }))
    }

    /// The room for `user`, who must be a member.
    pub async fn room_for_member(&self, room: Uuid, user: Uuid) -> RoomResult<RoomView> {
        let client = self.client().await?;
        if owner_if_member(&client, room, user, false).await?.is_none() {
            return Ok(Err(RoomRefusal::NotFound));
        }
        drop(client);
        self.room_view(room).await
    }

    /// `by` (a member) adds `users` (deduplicated); adding a member again is not an error.
    pub async fn add_members(
        &self,
        room: Uuid,
        by: Uuid,
        users: &[Uuid],
        max_members: usize,
        max_rooms: usize,
    ) -> RoomResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Locks the room row: concurrent additions count members one after the other.
        if owner_if_member(&tx, room, by, true).await?.is_none() {
            return Ok(Err(RoomRefusal::NotFound));
        }
        let existing: i64 = tx
            .query_one(
                "SELECT count(*) FROM conversation_members
                 WHERE conversation_id = $1 AND NOT (user_id = ANY($2))",
                &[&room, &users],
            )
            .await?
            .get(0);
        if existing as usize + users.len() > max_members {
            return Ok(Err(RoomRefusal::Invalid {
                field: "user_ids",
                code: "room_full",
            }));
        }
        if let Some(refusal) = check_users(&tx, users, max_rooms, "user_ids").await? {
            return Ok(Err(refusal));
        }
        let added = tx
            .execute(
                "INSERT INTO conversation_members (conversation_id, user_id)
                 SELECT $1, u FROM unnest($2::uuid[]) AS t(u) ON CONFLICT DO NOTHING",
                &[&room, &users],
            )
            .await?;
        tx.execute(
            "UPDATE conversations SET member_count = member_count + $2 WHERE id = $1",
            &[&room, &i32::try_from(added).unwrap_or(i32::MAX)],
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// `by` removes `user` from the room: themselves (leaving), or anyone when `by` owns it.
    /// Removing a user who is not a member is not an error.
    pub async fn remove_member(&self, room: Uuid, by: Uuid, user: Uuid) -> RoomResult<()> {
        let mut client = self.client().await?;
        if user != by {
            match owner_if_member(&client, room, by, false).await? {
                None => return Ok(Err(RoomRefusal::NotFound)),
                Some(owner) if owner != Some(by) => return Ok(Err(RoomRefusal::NotOwner)),
                Some(_) => {}
            }
        }
        // The room row first, then the member row: the order the worker's batches take them in.
        let tx = client.transaction().await?;
        let exists = tx
            .query_opt(
                "SELECT 1 FROM conversations WHERE id = $1 AND kind = 'room' FOR UPDATE",
                &[&room],
            )
            .await?;
        if exists.is_none() {
            return Ok(Err(RoomRefusal::NotFound));
        }
        let removed = tx
            .execute(
                "DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = $2",
                &[&room, &user],
            )
            .await?;
        tx.execute(
            "UPDATE conversations SET member_count = member_count - $2 WHERE id = $1",
            &[&room, &i32::try_from(removed).unwrap_or(0)],
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }
}
