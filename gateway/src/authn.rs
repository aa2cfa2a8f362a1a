//! Who is calling: a bearer token verified, its user checked to exist and the token checked
//! not to predate the user's last password change (in Postgres, so a reset refuses old tokens
//! on every node at once), and a user of an external identity provider created on first use.
//! The HTTP layer's `Authenticated` extractor and the WebSocket handshake both use it.

use std::sync::Arc;

use actix_web::{web, HttpRequest};
use chat_core::store::Store;
use serde::Deserialize;

use crate::api_error::ApiError;
use crate::auth::{Auth, Identity};
use crate::directory::Directory;
use crate::fields::name_problem;

/// The password hash of users from an external identity provider: not a PHC string, so no
/// password ever verifies against it.
const EXTERNAL_PASSWORD_HASH: &str = "!external";

/// Where a token may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFrom {
    /// `Authorization: Bearer` only (the HTTP API).
    Header,
    /// The header, or the `access_token` query parameter (browsers' WebSockets cannot set
    /// headers).
    HeaderOrQuery,
}

/// Authenticates requests.
pub struct Authenticator {
    auth: Arc<Auth>,
    store: Store,
    directory: Arc<Directory>,
}

impl Authenticator {
    pub fn new(auth: Arc<Auth>, store: Store, directory: Arc<Directory>) -> Self {
        Authenticator {
            auth,
            store,
            directory,
        }
    }

    /// The caller's identity.
    pub async fn authenticate(
        &self,
        req: &HttpRequest,
        from: TokenFrom,
    ) -> Result<Identity, ApiError> {
        let token =
            bearer(req, from).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        self.identify(&token).await
    }

    /// The identity a token proves.
    pub async fn identify(&self, token: &str) -> Result<Identity, ApiError> {
        let identity = self
            .auth
            .verify(token)
            .map_err(|e| ApiError::unauthorized(e.to_string()))?;
        if let Some(profile) = &identity.external {
            // Created once; after that the directory knows the user and no write is needed.
            if !self.directory.knows_user(identity.user_id) {
                let name = profile
                    .name
                    .as_deref()
                    .map(str::trim)
                    .filter(|n| name_problem(n).is_none())
                    .unwrap_or("user");
                let placeholder_email = format!("{}@external.invalid", identity.user_id);
                self.store
                    .provision_external_user(
                        identity.user_id,
                        name,
                        &placeholder_email,
                        EXTERNAL_PASSWORD_HASH,
                    )
                    .await?;
                self.directory.remember_user(identity.user_id);
            }
        }
        match self.store.token_floor(identity.user_id).await? {
            None => Err(ApiError::unauthorized("the token's user no longer exists")),
            Some(floor) if !floor.admits(identity.iat, identity.version) => Err(
                ApiError::unauthorized("the token predates a password change; log in again"),
            ),
            Some(_) => Ok(identity),
        }
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

/// The token a request carries.
fn bearer(req: &HttpRequest, from: TokenFrom) -> Option<String> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .map(str::to_string);
    match (header, from) {
        (Some(t), _) => Some(t),
        (None, TokenFrom::HeaderOrQuery) => {
            web::Query::<TokenQuery>::from_query(req.query_string())
                .ok()
                .and_then(|q| q.into_inner().access_token)
        }
        (None, TokenFrom::Header) => None,
    }
}
