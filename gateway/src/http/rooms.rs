//! Rooms: create, show, add members, remove members (or leave, with a block), change roles.
//! Membership lives in Postgres; every change is then published to the affected user's topic and
//! to the room's topic, so every node's room index follows at once.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use chat_core::protocol::{ErrorCode, MembershipChange, RoomRole, ServerFrame};
use chat_core::pubsub::{Envelope, PubSub, Publication, Topic};
use chat_core::store::{Block, RoomRefusal, Store};
use serde::Deserialize;
use uuid::Uuid;

use super::conversations::parse_id;
use super::{Authenticated, HttpSettings};
use crate::api_error::ApiError;
use crate::fields::name_problem;

/// Most user ids one request may name.
pub const MAX_IDS_PER_REQUEST: usize = 1000;

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRole {
    role: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// Comma-separated: `room`, `adder`.
    #[serde(default)]
    block: Option<String>,
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such room")
}

impl From<RoomRefusal> for ApiError {
    fn from(refusal: RoomRefusal) -> Self {
        match refusal {
            RoomRefusal::NotFound => not_found(),
            RoomRefusal::NoSuchMember => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such member")
            }
            RoomRefusal::Forbidden(who) => {
                ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, who)
            }
            RoomRefusal::Invalid { field, code } => ApiError::invalid_field(field, code),
        }
    }
}

/// Dedups the ids and checks their number; `field` names them in errors.
fn check_ids(ids: Vec<Uuid>, field: &'static str) -> Result<Vec<Uuid>, ApiError> {
    if ids.len() > MAX_IDS_PER_REQUEST {
        return Err(ApiError::invalid_field(field, "too_many"));
    }
    let mut ids = ids;
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// One change to announce: the user, what changed, their role after it.
type Change = (Uuid, MembershipChange, Option<RoomRole>);

/// Publishes one membership event per change, each to the user's topic and then the room's.
async fn announce(
    pubsub: &dyn PubSub,
    room: Uuid,
    changes: impl IntoIterator<Item = Change>,
    by: Uuid,
) -> Result<(), ApiError> {
    let publications = changes
        .into_iter()
        .map(|(user, change, role)| Publication {
            topics: vec![Topic::User(user), Topic::Room(room)],
            envelope: Envelope::event(
                Uuid::nil(),
                ServerFrame::Membership {
                    conversation_id: room,
                    user_id: user,
                    change,
                    by,
                    role,
                },
            ),
        })
        .collect();
    pubsub.publish(publications).await.map_err(|e| {
        tracing::warn!(error = %e, %room, "membership change not published");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the change is stored but not yet live on every node; repeat the request",
        )
    })
}

/// `added` events for `users`, each with their role (the caller owns a room they create).
fn added(users: &[Uuid], owner: Option<Uuid>) -> impl Iterator<Item = Change> + '_ {
    users.iter().map(move |u| {
        let role = if Some(*u) == owner {
            RoomRole::Owner
        } else {
            RoomRole::Member
        };
        (*u, MembershipChange::Added, Some(role))
    })
}

/// `POST /api/v1/rooms` `{"name","member_ids"}`: the caller creates a room and owns it.
pub async fn create(
    store: web::Data<Store>,
    pubsub: web::Data<dyn PubSub>,
    settings: web::Data<HttpSettings>,
    body: web::Json<CreateRoom>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let name = body.name.trim().to_string();
    if let Some(code) = name_problem(&name) {
        return Err(ApiError::invalid_field("name", code));
    }
    let mut members = check_ids(body.member_ids, "member_ids")?;
    members.retain(|m| *m != caller.user_id);
    members.insert(0, caller.user_id);
    if members.len() > settings.max_room_members {
        return Err(ApiError::invalid_field("member_ids", "too_many"));
    }
    let room = Uuid::now_v7();
    store
        .create_room(room, &name, &members, settings.max_rooms_per_user)
        .await??;
    tracing::info!(%room, members = members.len(), "room created");
    announce(
        pubsub.as_ref(),
        room,
        added(&members, Some(caller.user_id)),
        caller.user_id,
    )
    .await?;
    let view = store.room_view(room).await??;
    Ok(HttpResponse::Created().json(view))
}

/// `GET /api/v1/rooms/{id}`: the room, for its members.
pub async fn show(
    store: web::Data<Store>,
    path: web::Path<String>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let room = parse_id(&path)?;
    let view = store.room_for_member(room, caller.user_id).await??;
    Ok(HttpResponse::Ok().json(view))
}

/// `POST /api/v1/rooms/{id}/members` `{"user_ids"}`: the owner or an admin adds users as plain
/// members. Adding a member again is not an error (the event is sent again).
pub async fn add_members(
    store: web::Data<Store>,
    pubsub: web::Data<dyn PubSub>,
    settings: web::Data<HttpSettings>,
    path: web::Path<String>,
    body: web::Json<AddMembers>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let room = parse_id(&path)?;
    let users = check_ids(body.into_inner().user_ids, "user_ids")?;
    if users.is_empty() {
        return Err(ApiError::invalid_field("user_ids", "required"));
    }
    // A member added again keeps the role they had.
    let roles = store
        .add_members(
            room,
            caller.user_id,
            &users,
            settings.max_room_members,
            settings.max_rooms_per_user,
        )
        .await??;
    let changes = roles
        .into_iter()
        .map(|(u, role)| (u, MembershipChange::Added, Some(role)));
    announce(pubsub.as_ref(), room, changes, caller.user_id).await?;
    Ok(HttpResponse::Ok().json(store.room_view(room).await??))
}

/// What `?block=` asks for: a comma-separated list of `room` and `adder`.
fn parse_block(text: Option<&str>) -> Result<Block, ApiError> {
    let mut block = Block::default();
    for word in text.unwrap_or("").split(',').filter(|w| !w.is_empty()) {
        match word {
            "room" => block.room = true,
            "adder" => block.adder = true,
            _ => return Err(ApiError::invalid_field("block", "invalid")),
        }
    }
    Ok(block)
}

/// `DELETE /api/v1/rooms/{id}/members/{user_id}[?block=room,adder]`: leave (yourself, with what
/// to refuse from then on), or remove someone (the owner anyone, an admin plain members).
/// Removing a user who is not a member is not an error.
pub async fn remove_member(
    store: web::Data<Store>,
    pubsub: web::Data<dyn PubSub>,
    path: web::Path<(String, String)>,
    query: web::Query<RemoveQuery>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let (room, user) = path.into_inner();
    let room = parse_id(&room)?;
    let user = Uuid::parse_str(&user).map_err(|_| not_found())?;
    let block = parse_block(query.block.as_deref())?;
    if block != Block::default() && user != caller.user_id {
        return Err(ApiError::invalid_field("block", "only_when_leaving"));
    }
    let removal = store
        .remove_member(room, caller.user_id, user, block)
        .await??;
    let heir = removal
        .new_owner
        .map(|heir| (heir, MembershipChange::Role, Some(RoomRole::Owner)));
    let changes = std::iter::once((user, MembershipChange::Removed, None)).chain(heir);
    announce(pubsub.as_ref(), room, changes, caller.user_id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `PUT /api/v1/rooms/{id}/members/{user_id}` `{"role"}`: the owner makes a member an admin or
/// a plain member, or hands the room over (`owner`; the caller becomes an admin).
pub async fn set_role(
    store: web::Data<Store>,
    pubsub: web::Data<dyn PubSub>,
    path: web::Path<(String, String)>,
    body: web::Json<SetRole>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let (room, user) = path.into_inner();
    let room = parse_id(&room)?;
    let user = Uuid::parse_str(&user).map_err(|_| not_found())?;
    let role =
        RoomRole::parse(&body.role).ok_or_else(|| ApiError::invalid_field("role", "invalid"))?;
    let changes = store.set_role(room, caller.user_id, user, role).await??;
    announce(
        pubsub.as_ref(),
        room,
        changes
            .into_iter()
            .map(|(u, r)| (u, MembershipChange::Role, Some(r))),
        caller.user_id,
    )
    .await?;
    Ok(HttpResponse::Ok().json(store.room_view(room).await??))
}
