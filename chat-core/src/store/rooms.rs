//! Rooms: creation, the room view, adding and removing members, roles and blocks, with the
//! member and room-count limits and who may do what checked inside the transaction that changes
//! them.

use chat_protocol::RoomRole;
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
    /// Up to 1000 members, in the order they joined, each with their role.
    pub members: Vec<Member>,
}

/// Why a room change was refused (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomRefusal {
    /// No such room, or the caller is not a member (answered alike).
    NotFound,
    /// The user the change names is not a member.
    NoSuchMember,
    /// The caller's role does not allow it; the text says who may.
    Forbidden(&'static str),
    /// A field is invalid: the field and its code (`unknown_user`, `room_limit_reached`,
    /// `room_full`, `blocked`).
    Invalid {
        field: &'static str,
        code: &'static str,
    },
}

/// A room change: done, refused, or failed.
pub type RoomResult<T> = Result<Result<T, RoomRefusal>, StoreError>;

/// What a member leaving refuses from then on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Block {
    /// Being added to this room again.
    pub room: bool,
    /// Being added to any room by whoever added them to this one.
    pub adder: bool,
}

/// What a removal changed besides the membership.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removal {
    /// The owner left, and this member owns the room now.
    pub new_owner: Option<Uuid>,
}

/// Refuses when a user does not exist, is already in `max_rooms` rooms, or refuses being added
/// by `adder` (or, with `room`, to that room).
async fn check_users(
    tx: &deadpool_postgres::Transaction<'_>,
    users: &[Uuid],
    adder: Uuid,
    room: Option<Uuid>,
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
    let blocked = tx
        .query_opt(
            "SELECT 1 FROM adder_blocks WHERE user_id = ANY($1) AND blocked_id = $2
             UNION ALL
             SELECT 1 FROM room_blocks WHERE user_id = ANY($1) AND conversation_id = $3
             LIMIT 1",
            &[&users, &adder, &room],
        )
        .await?;
    if blocked.is_some() {
        return Ok(Some(RoomRefusal::Invalid {
            field,
            code: "blocked",
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

/// `user`'s role in room `room`; `None` when they are not a member (or there is no such room).
async fn role_of(
    client: &impl deadpool_postgres::GenericClient,
    room: Uuid,
    user: Uuid,
) -> Result<Option<RoomRole>, StoreError> {
    let row = client
        .query_opt(
            "SELECT m.role FROM conversation_members m
             JOIN conversations c ON c.id = m.conversation_id AND c.kind = 'room'
             WHERE m.conversation_id = $1 AND m.user_id = $2",
            &[&room, &user],
        )
        .await?;
    Ok(row.and_then(|r| RoomRole::parse(r.get::<_, &str>(0))))
}

/// Locks the room's row until the transaction ends: changes to one room's members run one after
/// the other (and take the room row before member rows, as the worker's batches do). False when
/// there is no such room.
async fn lock_room(
    tx: &deadpool_postgres::Transaction<'_>,
    room: Uuid,
) -> Result<bool, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM conversations WHERE id = $1 AND kind = 'room' FOR UPDATE",
            &[&room],
        )
        .await?
        .is_some())
}

/// Makes `user` the room's owner.
async fn make_owner(
    tx: &deadpool_postgres::Transaction<'_>,
    room: Uuid,
    user: Uuid,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE conversation_members SET role = 'owner' WHERE conversation_id = $1 AND user_id = $2",
        &[&room, &user],
    )
    .await?;
    tx.execute(
        "UPDATE conversations SET owner_id = $2 WHERE id = $1",
        &[&room, &user],
    )
    .await?;
    Ok(())
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
        if let Some(refusal) =
            check_users(&tx, members, *owner, None, max_rooms, "member_ids").await?
        {
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
            "INSERT INTO conversation_members (conversation_id, user_id, role, added_by)
             SELECT $1, u, CASE WHEN u = $3 THEN 'owner' ELSE 'member' END, $3
             FROM unnest($2::uuid[]) AS t(u)",
            &[&room, &members, owner],
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
                "SELECT u.id, u.name, u.avatar_url, m.last_read_seq, m.role
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
                role: RoomRole::parse(r.get::<_, &str>(4)),
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
        if role_of(&client, room, user).await?.is_none() {
            return Ok(Err(RoomRefusal::NotFound));
        }
        drop(client);
        self.room_view(room).await
    }

    /// `by` (the owner or an admin) adds `users` (deduplicated) as plain members; adding a
    /// member again is not an error and keeps their role. Refused when one of the new users
    /// refuses being added to this room or by `by`. Returns each user's role in the room now.
    pub async fn add_members(
        &self,
        room: Uuid,
        by: Uuid,
        users: &[Uuid],
        max_members: usize,
        max_rooms: usize,
    ) -> RoomResult<Vec<(Uuid, RoomRole)>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !lock_room(&tx, room).await? {
            return Ok(Err(RoomRefusal::NotFound));
        }
        match role_of(&tx, room, by).await? {
            None => return Ok(Err(RoomRefusal::NotFound)),
            Some(RoomRole::Member) => {
                return Ok(Err(RoomRefusal::Forbidden(
                    "only the room's owner and admins add members",
                )))
            }
            Some(RoomRole::Owner | RoomRole::Admin) => {}
        }
        let existing: std::collections::HashMap<Uuid, RoomRole> = tx
            .query(
                "SELECT user_id, role FROM conversation_members
                 WHERE conversation_id = $1 AND user_id = ANY($2)",
                &[&room, &users],
            )
            .await?
            .iter()
            .map(|r| {
                let role = RoomRole::parse(r.get::<_, &str>(1)).unwrap_or(RoomRole::Member);
                (r.get(0), role)
            })
            .collect();
        let roles: Vec<(Uuid, RoomRole)> = users
            .iter()
            .map(|u| (*u, existing.get(u).copied().unwrap_or(RoomRole::Member)))
            .collect();
        let new: Vec<Uuid> = users
            .iter()
            .filter(|u| !existing.contains_key(u))
            .copied()
            .collect();
        let count: i64 = tx
            .query_one(
                "SELECT member_count FROM conversations WHERE id = $1",
                &[&room],
            )
            .await?
            .get::<_, i32>(0)
            .into();
        if count as usize + new.len() > max_members {
            return Ok(Err(RoomRefusal::Invalid {
                field: "user_ids",
                code: "room_full",
            }));
        }
        if new.is_empty() {
            return Ok(Ok(roles));
        }
        if let Some(refusal) = check_users(&tx, &new, by, Some(room), max_rooms, "user_ids").await?
        {
            return Ok(Err(refusal));
        }
        let added = tx
            .execute(
                "INSERT INTO conversation_members (conversation_id, user_id, role, added_by)
                 SELECT $1, u, 'member', $3 FROM unnest($2::uuid[]) AS t(u)
                 ON CONFLICT DO NOTHING",
                &[&room, &new, &by],
            )
            .await?;
        tx.execute(
            "UPDATE conversations SET member_count = member_count + $2 WHERE id = $1",
            &[&room, &i32::try_from(added).unwrap_or(i32::MAX)],
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(roles))
    }

    /// `by` removes `user` from the room. Removing yourself is leaving, open to every member,
    /// with `block` saying what to refuse from then on; when the owner leaves, the earliest
    /// admin (else the earliest member) owns the room. Removing someone else needs the owner
    /// (anyone) or an admin (plain members only). Removing a user who is not a member is not an
    /// error.
    pub async fn remove_member(
        &self,
        room: Uuid,
        by: Uuid,
        user: Uuid,
        block: Block,
    ) -> RoomResult<Removal> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !lock_room(&tx, room).await? {
            return Ok(Err(RoomRefusal::NotFound));
        }
        let target = role_of(&tx, room, user).await?;
        if user != by {
            let allowed = match (role_of(&tx, room, by).await?, target) {
                (None, _) => return Ok(Err(RoomRefusal::NotFound)),
                (Some(RoomRole::Owner), _) => true,
                (Some(RoomRole::Admin), None | Some(RoomRole::Member)) => true,
                _ => false,
            };
            if !allowed {
                return Ok(Err(RoomRefusal::Forbidden(
                    "the owner removes anyone; admins remove plain members",
                )));
            }
        }
        let removed = tx
            .query_opt(
                "DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = $2
                 RETURNING added_by",
                &[&room, &user],
            )
            .await?;
        let mut removal = Removal::default();
        if removed.is_some() {
            tx.execute(
                "UPDATE conversations SET member_count = member_count - 1 WHERE id = $1",
                &[&room],
            )
            .await?;
        }
        if user == by {
            if block.room {
                tx.execute(
                    "INSERT INTO room_blocks (user_id, conversation_id) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &[&user, &room],
                )
                .await?;
            }
            let adder = removed.and_then(|r| r.get::<_, Option<Uuid>>(0));
            if let Some(adder) = adder.filter(|a| block.adder && *a != user) {
                tx.execute(
                    "INSERT INTO adder_blocks (user_id, blocked_id) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &[&user, &adder],
                )
                .await?;
            }
        }
        if target == Some(RoomRole::Owner) {
            let heir = tx
                .query_opt(
                    "SELECT user_id FROM conversation_members WHERE conversation_id = $1
                     ORDER BY role = 'admin' DESC, joined_at, user_id LIMIT 1",
                    &[&room],
                )
                .await?
                .map(|r| r.get::<_, Uuid>(0));
            match heir {
                Some(heir) => {
                    make_owner(&tx, room, heir).await?;
                    removal.new_owner = Some(heir);
                }
                None => {
                    tx.execute(
                        "UPDATE conversations SET owner_id = NULL WHERE id = $1",
                        &[&room],
                    )
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(Ok(removal))
    }

    /// The owner `by` gives member `user` role `role`. Giving `owner` hands the room over: `by`
    /// becomes an admin. Returns every member whose role changed, with the new role.
    pub async fn set_role(
        &self,
        room: Uuid,
        by: Uuid,
        user: Uuid,
        role: RoomRole,
    ) -> RoomResult<Vec<(Uuid, RoomRole)>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if !lock_room(&tx, room).await? {
            return Ok(Err(RoomRefusal::NotFound));
        }
        match role_of(&tx, room, by).await? {
            None => return Ok(Err(RoomRefusal::NotFound)),
            Some(RoomRole::Owner) if user != by => {}
            Some(RoomRole::Owner) => {
                return Ok(Err(RoomRefusal::Forbidden(
                    "the owner hands the room over by making another member its owner",
                )))
            }
            Some(_) => {
                return Ok(Err(RoomRefusal::Forbidden(
                    "only the room's owner changes roles",
                )))
            }
        }
        if role_of(&tx, room, user).await?.is_none() {
            return Ok(Err(RoomRefusal::NoSuchMember));
        }
        let changes = if role == RoomRole::Owner {
            make_owner(&tx, room, user).await?;
            tx.execute(
                "UPDATE conversation_members SET role = 'admin'
                 WHERE conversation_id = $1 AND user_id = $2",
                &[&room, &by],
            )
            .await?;
            vec![(user, RoomRole::Owner), (by, RoomRole::Admin)]
        } else {
            tx.execute(
                "UPDATE conversation_members SET role = $3
                 WHERE conversation_id = $1 AND user_id = $2",
                &[&room, &user, &role.as_str()],
            )
            .await?;
            vec![(user, role)]
        };
        tx.commit().await?;
        Ok(Ok(changes))
    }
}
