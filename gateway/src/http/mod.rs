//! The HTTP API: every route in one table ([`routes`]), one file per resource, each handler
//! taking the services it uses and the caller as an [`Authenticated`] extractor.
//!
//! - [`accounts`]: register, log in, `users/me`.
//! - [`password_reset`]: request and confirm a password reset.
//! - [`users`]: the users list with presence, and batch presence.
//! - [`conversations`]: the caller's conversation list and a conversation's history.
//! - [`rooms`]: create, show, add and remove members, roles.
//! - [`blocks`]: the rooms and people a user refuses being added to and by.

pub mod accounts;
pub mod authenticated;
pub mod blocks;
pub mod conversations;
pub mod password_reset;
pub mod rooms;
pub mod users;

use actix_web::web;

pub use authenticated::Authenticated;

use crate::api_error;

/// Largest JSON body the HTTP API accepts.
const MAX_JSON_BODY_BYTES: usize = 16 * 1024;
/// Largest JSON body the room endpoints accept (1,000 user ids with room to spare).
const MAX_ROOM_JSON_BODY_BYTES: usize = 64 * 1024;

/// Settings the handlers read.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: crate::client_ip::TrustedProxies,
    /// Hosts avatar URLs may point at (`avatar_hosts`).
    pub avatar_hosts: Vec<String>,
    /// Most members a room may have.
    pub max_room_members: usize,
    /// Most rooms a user may be a member of.
    pub max_rooms_per_user: usize,
}

/// The body and query error handlers (JSON errors instead of actix's plain text).
pub fn extractors(config: &mut web::ServiceConfig) {
    config
        .app_data(
            web::JsonConfig::default()
                .limit(MAX_JSON_BODY_BYTES)
                .error_handler(api_error::json_body_error),
        )
        .app_data(web::QueryConfig::default().error_handler(api_error::query_error));
}

/// Every route under `/api/v1`.
pub fn routes(config: &mut web::ServiceConfig) {
    config.service(
        web::scope("/api/v1")
            .route("/auth/register", web::post().to(accounts::register))
            .route("/auth/login", web::post().to(accounts::login))
            .route("/users/me", web::get().to(accounts::me))
            .route("/users/me", web::patch().to(accounts::update_me))
            .route("/ws/ticket", web::post().to(accounts::ws_ticket))
            .route(
                "/auth/password-reset/request",
                web::post().to(password_reset::request),
            )
            .route(
                "/auth/password-reset/confirm",
                web::post().to(password_reset::confirm),
            )
            .route("/users", web::get().to(users::list))
            .route("/presence", web::get().to(users::presence))
            .route("/conversations", web::get().to(conversations::list))
            .route(
                "/conversations/{id}/messages",
                web::get().to(conversations::messages),
            )
            .service(
                // Up to 1,000 user ids per request need more than the default limit.
                web::scope("/rooms")
                    .app_data(
                        web::JsonConfig::default()
                            .limit(MAX_ROOM_JSON_BODY_BYTES)
                            .error_handler(api_error::json_body_error),
                    )
                    .route("", web::post().to(rooms::create))
                    .route("/{id}", web::get().to(rooms::show))
                    .route("/{id}/members", web::post().to(rooms::add_members))
                    .route(
                        "/{id}/members/{user_id}",
                        web::delete().to(rooms::remove_member),
                    )
                    .route("/{id}/members/{user_id}", web::put().to(rooms::set_role)),
            )
            .route("/blocks", web::get().to(blocks::list))
            .route("/blocks/rooms/{id}", web::delete().to(blocks::unblock_room))
            .route("/blocks/users/{id}", web::delete().to(blocks::unblock_user)),
    );
}
