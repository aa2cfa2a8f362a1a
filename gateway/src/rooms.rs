//! Rooms: create, show, add members, remove members (or leave). Membership lives in Postgres,
//! written here; every change is then published to the affected user's channel and to the
//! room's channel, so every node's room index follows at once.

use std::collections::{HashMap, HashSet};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chat_core::keys::Topic;
use chat_core::protocol::{ErrorCode, MembershipChange, ServerFrame};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::accounts::authenticate;
use crate::api_error::ApiError;
use crate::conversations::parse_id;
use crate::node::Node;

/// Most user ids one request may name.
pub const MAX_IDS_PER_REQUEST: usize = 1000;
/// Most members listed by `GET /rooms/{id}`.
const MAX_LISTED_MEMBERS: i64 = 1000;

/// Reloads the rooms of every local user from Postgres into the hub (after the node may have
/// missed membership events); returns the room topics to subscribe and to release.
pub async fn reload_memberships(
    db: &deadpool_postgres::Pool,
    hub: &crate::hub::Hub,
) -> Result<(Vec<Topic>, Vec<Topic>), String> {
    let client = db
        .get()
        .await
        .map_err(|e| chat_core::db::describe_pool(&e))?;
    let (mut subscribe, mut release) = (Vec::new(), Vec::new());
    for users in hub.local_users().chunks(1000) {
        let rows = client
            .query(
                "SELECT m.user_id, m.conversation_id FROM conversation_members m
                 JOIN conversations c ON c.id = m.conversation_id AND c.kind = 'room'
                 WHERE m.user_id = ANY($1)",
                &[&users],
            )
            .await
            .map_err(|e| chat_core::db::describe(&e))?;
        let mut rooms: HashMap<Uuid, HashSet<Uuid>> =
            users.iter().map(|u| (*u, HashSet::new())).collect();
        for row in rows {
            rooms.entry(row.get(0)).or_default().insert(row.get(1));
        }
        for (user, rooms) in rooms {
            let (joined, left) = hub.set_rooms(user, &rooms);
            subscribe.extend(joined.into_iter().map(Topic::Room));
            release.extend(left.into_iter().map(Topic::Room));
        }
    }
    Ok((subscribe, release))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRoom {
    #[serde(default)]
    name: String,
    #[serde(default)]
    member_ids: Vec<Uuid>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMembers {
    #[serde(default)]
    user_ids: Vec<Uuid>,
}

#[derive(Debug, Serialize)]
struct Member {
    id: Uuid,
    name: String,
    avatar_url: Option<String>,
    /// How far this member has read the room.
    last_read_seq: i64,
}

#[derive(Debug, Serialize)]
struct RoomView {
    id: Uuid,
    kind: &'static str,
    name: String,
    owner_id: Option<Uuid>,
    member_count: i64,
    /// Up to 1000 members, in the order they joined.
    members: Vec<Member>,
}

fn validation(field: &'static str, code: &'static str) -> ApiError {
    let mut err = ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::ValidationFailed,
        "some fields are invalid",
    );
    err.fields.insert(field, code);
    err
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such room")
}

/// Dedups the ids and checks their number; `field` names them in errors.
fn check_ids(ids: Vec<Uuid>, field: &'static str) -> Result<Vec<Uuid>, ApiError> {
    if ids.len() > MAX_IDS_PER_REQUEST {
        return Err(validation(field, "too_many"));
    }
    let mut ids = ids;
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Fails when a user does not exist or is already in `gateway_max_rooms_per_user` rooms.
async fn check_users(
    node: &Node,
    client: &tokio_postgres::Transaction<'_>,
    users: &[Uuid],
    field: &'static str,
) -> Result<(), ApiError> {
    let found = client
        .query("SELECT count(*) FROM users WHERE id = ANY($1)", &[&users])
        .await
        .map_err(ApiError::db)?;
    if found[0].get::<_, i64>(0) != users.len() as i64 {
        return Err(validation(field, "unknown_user"));
    }
    let max_rooms = node.config.raw.gateway_max_rooms_per_user as i64;
    let full = client
        .query_opt(
            "SELECT m.user_id FROM conversation_members m
             JOIN conversations c ON c.id = m.conversation_id AND c.kind = 'room'
             WHERE m.user_id = ANY($1)
             GROUP BY m.user_id HAVING count(*) >= $2 LIMIT 1",
            &[&users, &max_rooms],
        )
        .await
        .map_err(ApiError::db)?;
    if full.is_some() {
        return Err(validation(field, "room_limit_reached"));
    }
    Ok(())
}

/// Publishes one membership event per user, each to the user's channel and then the room's.
async fn announce(
    node: &Node,
    room: Uuid,
    users: &[Uuid],
    change: MembershipChange,
    by: Uuid,
) -> Result<(), ApiError> {
    let keys = node.broker.keys();
    let room_channel = keys.room_channel(room);
    let mut pipe = redis::pipe();
    for user in users {
        let frame = ServerFrame::Membership {
            conversation_id: room,
            user_id: *user,
            change,
            by,
        }
        .to_json();
        let payload = format!("{}\n{frame}", Uuid::nil());
        pipe.cmd("PUBLISH")
            .arg(keys.user_channel(*user))
            .arg(&payload)
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(&room_channel)
            .arg(&payload)
            .ignore();
    }
    node.broker.query::<()>(&pipe).await.map_err(|e| {
        tracing::warn!(error = %e, %room, "membership change not published");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the change is stored but not yet live on every node; repeat the request",
        )
    })
}

async fn room_view(client: &deadpool_postgres::Client, room: Uuid) -> Result<RoomView, ApiError> {
    let row = client
        .query_opt(
            "SELECT name, owner_id,
                    (SELECT count(*) FROM conversation_members WHERE conversation_id = $1)
             FROM conversations WHERE id = $1 AND kind = 'room'",
            &[&room],
        )
        .await
        .map_err(ApiError::db)?
        .ok_or_else(not_found)?;
    let members = client
        .query(
            "SELECT u.id, u.name, u.avatar_url, m.last_read_seq
             FROM conversation_members m JOIN users u ON u.id = m.user_id
             WHERE m.conversation_id = $1 ORDER BY m.joined_at, u.id LIMIT $2",
            &[&room, &MAX_LISTED_MEMBERS],
        )
        .await
        .map_err(ApiError::db)?
        .iter()
        .map(|r| Member {
            id: r.get(0),
            name: r.get(1),
            avatar_url: r.get(2),
            last_read_seq: r.get(3),
        })
        .collect();
    Ok(RoomView {
        id: room,
        kind: "room",
        name: row.get::<_, Option<String>>(0).unwrap_or_default(),
        owner_id: row.get(1),
        member_count: row.get(2),
        members,
    })
}

/// The room's owner when the caller is a member of it; 404 otherwise (existing or not).
async fn member_of(
    client: &impl deadpool_postgres::GenericClient,
    room: Uuid,
    user: Uuid,
    lock: bool,
) -> Result<Option<Uuid>, ApiError> {
    let sql = if lock {
        "SELECT c.owner_id FROM conversations c
         JOIN conversation_members m ON m.conversation_id = c.id AND m.user_id = $2
         WHERE c.id = $1 AND c.kind = 'room' FOR UPDATE OF c"
    } else {
        "SELECT c.owner_id FROM conversations c
         JOIN conversation_members m ON m.conversation_id = c.id AND m.user_id = $2
         WHERE c.id = $1 AND c.kind = 'room'"
    };
    let row = client
        .query_opt(sql, &[&room, &user])
        .await
        .map_err(ApiError::db)?
        .ok_or_else(not_found)?;
    Ok(row.get(0))
}

/// `POST /api/v1/rooms` `{"name","member_ids"}`: the caller creates a room and owns it.
pub async fn create(
    node: web::Data<Node>,
    req: HttpRequest,
    body: web::Json<CreateRoom>,
) -> Result<HttpResponse, ApiError> {
    let identity = authenticate(&node, &req, false).await?;
    let body = body.into_inner();
    let name = body.name.trim().to_string();
    if let Some(code) = crate::accounts::name_problem(&name) {
        return Err(validation("name", code));
    }
    let mut members = check_ids(body.member_ids, "member_ids")?;
    members.retain(|m| *m != identity.user_id);
    members.insert(0, identity.user_id);
    if members.len() > node.config.raw.gateway_max_room_members {
        return Err(validation("member_ids", "too_many"));
    }
    let room = Uuid::now_v7();
    let mut client = node.db.get().await.map_err(ApiError::pool)?;
    let tx = client.transaction().await.map_err(ApiError::db)?;
    check_users(&node, &tx, &members, "member_ids").await?;
    let count = i32::try_from(members.len()).unwrap_or(i32::MAX);
    tx.execute(
        "INSERT INTO conversations (id, kind, name, owner_id, member_count)
         VALUES ($1, 'room', $2, $3, $4)",
        &[&room, &name, &identity.user_id, &count],
    )
    .await
    .map_err(ApiError::db)?;
    tx.execute(
        "INSERT INTO conversation_members (conversation_id, user_id)
         SELECT $1, u FROM unnest($2::uuid[]) AS t(u)",
        &[&room, &members],
    )
    .await
    .map_err(ApiError::db)?;
    tx.commit().await.map_err(ApiError::db)?;
    tracing::info!(%room, members = members.len(), "room created");
    announce(
        &node,
        room,
        &members,
        MembershipChange::Added,
        identity.user_id,
    )
    .await?;
    let view = room_view(&client, room).await?;
    Ok(HttpResponse::Created().json(view))
}

/// `GET /api/v1/rooms/{id}`: the room, for its members.
pub async fn show(
    node: web::Data<Node>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let identity = authenticate(&node, &req, false).await?;
    let room = parse_id(&path)?;
    let client = node.db.get().await.map_err(ApiError::pool)?;
    member_of(&client, room, identity.user_id, false).await?;
    Ok(HttpResponse::Ok().json(room_view(&client, room).await?))
}

/// `POST /api/v1/rooms/{id}/members` `{"user_ids"}`: any member adds users. Adding a member
/// again is not an error (the event is sent again).
pub async fn add_members(
    node: web::Data<Node>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<AddMembers>,
) -> Result<HttpResponse, ApiError> {
    let identity = authenticate(&node, &req, false).await?;
    let room = parse_id(&path)?;
    let users = check_ids(body.into_inner().user_ids, "user_ids")?;
    if users.is_empty() {
        return Err(validation("user_ids", "required"));
    }
    let mut client = node.db.get().await.map_err(ApiError::pool)?;
    let tx = client.transaction().await.map_err(ApiError::db)?;
    // Locks the room row: concurrent additions count members one after the other.
    member_of(&tx, room, identity.user_id, true).await?;
    let existing: i64 = tx
        .query_one(
            "SELECT count(*) FROM conversation_members
             WHERE conversation_id = $1 AND NOT (user_id = ANY($2))",
            &[&room, &users],
        )
        .await
        .map_err(ApiError::db)?
        .get(0);
    if existing as usize + users.len() > node.config.raw.gateway_max_room_members {
        return Err(validation("user_ids", "room_full"));
    }
    check_users(&node, &tx, &users, "user_ids").await?;
    let added = tx
        .execute(
            "INSERT INTO conversation_members (conversation_id, user_id)
             SELECT $1, u FROM unnest($2::uuid[]) AS t(u) ON CONFLICT DO NOTHING",
            &[&room, &users],
        )
        .await
        .map_err(ApiError::db)?;
    tx.execute(
        "UPDATE conversations SET member_count = member_count + $2 WHERE id = $1",
        &[&room, &i32::try_from(added).unwrap_or(i32::MAX)],
    )
    .await
    .map_err(ApiError::db)?;
    tx.commit().await.map_err(ApiError::db)?;
    announce(
        &node,
        room,
        &users,
        MembershipChange::Added,
        identity.user_id,
    )
    .await?;
    Ok(HttpResponse::Ok().json(room_view(&client, room).await?))
}

/// `DELETE /api/v1/rooms/{id}/members/{user_id}`: leave (yourself), or remove someone (the
/// room's owner only). Removing a user who is not a member is not an error.
pub async fn remove_member(
    node: web::Data<Node>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let identity = authenticate(&node, &req, false).await?;
    let (room, user) = path.into_inner();
    let room = parse_id(&room)?;
    let user = Uuid::parse_str(&user).map_err(|_| not_found())?;
    let mut client = node.db.get().await.map_err(ApiError::pool)?;
    if user != identity.user_id {
        let owner = member_of(&client, room, identity.user_id, false).await?;
        if owner != Some(identity.user_id) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "only the room's owner can remove other members",
            ));
        }
    }
    // The room row first, then the member row: the order the worker's batches take them in.
    let tx = client.transaction().await.map_err(ApiError::db)?;
    let exists = tx
        .query_opt(
            "SELECT 1 FROM conversations WHERE id = $1 AND kind = 'room' FOR UPDATE",
            &[&room],
        )
        .await
        .map_err(ApiError::db)?;
    if exists.is_none() {
        return Err(not_found());
    }
    let removed = tx
        .execute(
            "DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = $2",
            &[&room, &user],
        )
        .await
        .map_err(ApiError::db)?;
    tx.execute(
        "UPDATE conversations SET member_count = member_count - $2 WHERE id = $1",
        &[&room, &i32::try_from(removed).unwrap_or(0)],
    )
    .await
    .map_err(ApiError::db)?;
    tx.commit().await.map_err(ApiError::db)?;
    announce(
        &node,
        room,
        &[user],
        MembershipChange::Removed,
        identity.user_id,
    )
    .await?;
    Ok(HttpResponse::NoContent().finish())
}
