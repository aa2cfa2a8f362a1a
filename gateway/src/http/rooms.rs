//! Rooms: create, show, add members, remove members (or leave). Membership lives in Postgres;
//! every change is then published to the affected user's topic and to the room's topic, so every
//! node's room index follows at once.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use chat_core::protocol::{ErrorCode, MembershipChange, ServerFrame};
use chat_core::pubsub::{Envelope, PubSub, Publication, Topic};
use chat_core::store::{RoomRefusal, Store};
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

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such room")
}

impl From<RoomRefusal> for ApiError {
    fn from(refusal: RoomRefusal) -> Self {
        match refusal {
            RoomRefusal::NotFound => not_found(),
            RoomRefusal::NotOwner => ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "only the room's owner can remove other members",
            ),
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

/// Publishes one membership event per user, each to the user's topic and then the room's.
async fn announce(
    pubsub: &dyn PubSub,
    room: Uuid,
    users: &[Uuid],
    change: MembershipChange,
    by: Uuid,
) -> Result<(), ApiError> {
    let publications = users
        .iter()
        .map(|user| Publication {
            topics: vec![Topic::User(*user), Topic::Room(room)],
            envelope: Envelope::event(
                Uuid::nil(),
                ServerFrame::Membership {
                    conversation_id: room,
                    user_id: *user,
                    change,
                    by,
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
        &members,
        MembershipChange::Added,
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

/// `POST /api/v1/rooms/{id}/members` `{"user_ids"}`: any member adds users. Adding a member
/// again is not an error (the event is sent again).
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
    store
        .add_members(
            room,
            caller.user_id,
            &users,
            settings.max_room_members,
            settings.max_rooms_per_user,
        )
        .await??;
    announce(
        pubsub.as_ref(),
        room,
        &users,
        MembershipChange::Added,
        caller.user_id,
    )
    .await?;
    Ok(HttpResponse::Ok().json(store.room_view(room).await??))
}

/// `DELETE /api/v1/rooms/{id}/members/{user_id}`: leave (yourself), or remove someone (the
/// room's owner only). Removing a user who is not a member is not an error.
pub async fn remove_member(
    store: web::Data<Store>,
    pubsub: web::Data<dyn PubSub>,
    path: web::Path<(String, String)>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let (room, user) = path.into_inner();
    let room = parse_id(&room)?;
    let user = Uuid::parse_str(&user).map_err(|_| not_found())?;
    store.remove_member(room, caller.user_id, user).await??;
    announce(
        pubsub.as_ref(),
        room,
        &[user],
        MembershipChange::Removed,
        caller.user_id,
    )
    .await?;
    Ok(HttpResponse::NoContent().finish())
}
