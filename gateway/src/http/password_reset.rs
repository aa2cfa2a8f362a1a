//! Forgot password: single-use reset tokens that expire, stored only as SHA-256 hashes, handed
//! to the user through the notifier; a confirmed reset refuses every token issued before it, on
//! every node, and closes the user's open connections.

use actix_web::{web, HttpResponse};
use chat_core::pubsub::{PubSub, Publication, Topic};
use chat_core::store::Store;
use serde::Deserialize;

use crate::api_error::ApiError;
use crate::fields::MAX_EMAIL_BYTES;
use crate::notifier::{hash_token, ResetRequests, TOKEN_BYTES};
use crate::passwords::{password_problem, Passwords};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    #[serde(default)]
    email: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetConfirm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    new_password: String,
}

/// `POST /api/v1/auth/password-reset/request` `{"email"}`: always 202, in the same time
/// whether or not the email has an account (the lookup, the token and the webhook happen on the
/// reset worker), so the answer tells nobody which emails are registered.
pub async fn request(
    requests: web::Data<ResetRequests>,
    body: web::Json<ResetRequest>,
) -> Result<HttpResponse, ApiError> {
    let email = body.into_inner().email.trim().to_string();
    if !email.is_empty() && email.len() <= MAX_EMAIL_BYTES {
        requests.submit(email);
    }
    Ok(HttpResponse::Accepted().json(serde_json::json!({"status": "accepted"})))
}

/// `POST /api/v1/auth/password-reset/confirm` `{"token","new_password"}`: sets the password once
/// per token, then refuses every token issued before, and closes the user's connections.
pub async fn confirm(
    store: web::Data<Store>,
    passwords: web::Data<Passwords>,
    pubsub: web::Data<dyn PubSub>,
    body: web::Json<ResetConfirm>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let mut err = ApiError::validation();
    if let Some(code) = password_problem(&body.new_password) {
        err.fields.insert("new_password", code);
    }
    if body.token.len() != TOKEN_BYTES * 2 {
        err.fields.insert("token", "token_invalid");
    }
    err.into_result()?;
    let token_hash = hash_token(&body.token);
    // Looked up first: a stranger's guess costs a query, not an argon2id hash. The update below
    // still spends the token atomically (a concurrent confirm of the same token finds it used).
    if !store.reset_token_usable(&token_hash).await? {
        return Err(ApiError::invalid_field("token", "token_invalid"));
    }
    let hash = passwords.hash(body.new_password).await?;
    let Some((user_id, floor)) = store.confirm_reset(&token_hash, &hash).await? else {
        return Err(ApiError::invalid_field("token", "token_invalid"));
    };
    tracing::info!(%user_id, "password reset");
    // Open connections with older tokens close on every node; new requests with them are
    // refused by the authenticator whatever happens to this publish. A node that misses it
    // (its pub/sub connection was down) re-checks its users' floors when it reconnects.
    let revoked = Publication {
        topics: vec![Topic::User(user_id)],
        envelope: crate::authn::revocation(floor),
    };
    if let Err(e) = pubsub.publish(vec![revoked]).await {
        tracing::warn!(%user_id, error = %e, "revocation not published; nodes re-check at their next pub/sub reconnect, and new requests are refused");
    }
    Ok(HttpResponse::NoContent().finish())
}
