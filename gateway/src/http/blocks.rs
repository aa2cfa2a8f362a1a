//! Blocks: the rooms and people the caller refuses being added to and by (set when leaving a
//! room with `?block=`), listed and lifted.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use chat_core::protocol::ErrorCode;
use chat_core::store::Store;
use uuid::Uuid;

use super::conversations::parse_id;
use super::Authenticated;
use crate::api_error::ApiError;

/// `GET /api/v1/blocks`: `{"rooms": [{"id","name"}], "users": [{"id","name"}]}`, newest first.
pub async fn list(
    store: web::Data<Store>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(store.blocks(caller.user_id).await?))
}

/// `DELETE /api/v1/blocks/rooms/{id}`: the caller may be added to that room again.
pub async fn unblock_room(
    store: web::Data<Store>,
    path: web::Path<String>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let room = parse_id(&path)?;
    store.unblock_room(caller.user_id, room).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `DELETE /api/v1/blocks/users/{id}`: that person may add the caller to rooms again.
pub async fn unblock_user(
    store: web::Data<Store>,
    path: web::Path<String>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let user = Uuid::parse_str(&path)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such user"))?;
    store.unblock_adder(caller.user_id, user).await?;
    Ok(HttpResponse::NoContent().finish())
}
