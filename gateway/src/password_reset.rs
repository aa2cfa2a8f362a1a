//! Forgot password: single-use reset tokens that expire, stored only as SHA-256 hashes, handed
//! to the user through a notifier (a webhook in production, a log line in dev mode); a confirmed
//! reset refuses every token issued before it, on every node, and closes the user's open
//! connections.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use chat_core::protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::api_error::ApiError;
use crate::node::Node;

/// Longest a webhook call may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Reset tokens are 32 random bytes, sent as 64 hex characters.
const TOKEN_BYTES: usize = 32;

/// Where reset tokens go.
pub enum Notifier {
    /// POST the [`ResetNotice`] as JSON to this URL.
    Webhook {
        url: String,
        client: reqwest::Client,
    },
    /// Dev mode only: log the token (it is a secret; never in production).
    DevLog,
    /// No notifier: requests are accepted and logged without the token, and nobody can reset.
    Disabled,
}

impl Notifier {
    pub fn from_config(webhook_url: Option<&str>, dev_mode: bool) -> Result<Self, reqwest::Error> {
        Ok(match webhook_url.filter(|u| !u.is_empty()) {
            Some(url) => Notifier::Webhook {
                url: url.to_string(),
                client: reqwest::Client::builder()
                    .timeout(WEBHOOK_TIMEOUT)
                    .build()?,
            },
            None if dev_mode => Notifier::DevLog,
            None => Notifier::Disabled,
        })
    }
}

/// The webhook's JSON body (documented in `docs/operations.md`).
#[derive(Debug, Serialize)]
pub struct ResetNotice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    user_id: Uuid,
    email: &'a str,
    name: &'a str,
    token: &'a str,
    /// Unix seconds.
    expires_at: i64,
}

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

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn new_token() -> String {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "password reset failed");
    ApiError::unavailable("the database")
}

/// `POST /api/v1/auth/password-reset/request` `{"email"}`: always 202, whether or not the
/// email has an account, so the answer tells nobody which emails are registered.
pub async fn request(
    node: web::Data<Node>,
    body: web::Json<ResetRequest>,
) -> Result<HttpResponse, ApiError> {
    let email = body.into_inner().email.trim().to_string();
    let accepted = HttpResponse::Accepted().json(serde_json::json!({"status": "accepted"}));
    if email.is_empty() || email.len() > 254 {
        return Ok(accepted);
    }
    let client = node.db.get().await.map_err(unavailable)?;
    let Some(row) = client
        .query_opt(
            "SELECT id, name, email FROM users WHERE lower(email) = lower($1)",
            &[&email],
        )
        .await
        .map_err(|e| unavailable(chat_core::db::describe(&e)))?
    else {
        return Ok(accepted);
    };
    let (user_id, name, email): (Uuid, String, String) = (row.get(0), row.get(1), row.get(2));
    let token = new_token();
    let ttl = i64::try_from(node.config.raw.password_reset_ttl_secs).unwrap_or(i64::MAX);
    let expires_at: i64 = client
        .query_one(
            "INSERT INTO password_resets (token_hash, user_id, expires_at)
             VALUES ($1, $2, now() + $3::int8 * interval '1 second')
             RETURNING floor(extract(epoch FROM expires_at))::int8",
            &[&hash_token(&token), &user_id, &ttl],
        )
        .await
        .map_err(|e| unavailable(chat_core::db::describe(&e)))?
        .get(0);
    let notice = ResetNotice {
        kind: "password_reset",
        user_id,
        email: &email,
        name: &name,
        token: &token,
        expires_at,
    };
    match &node.password_resets {
        Notifier::Webhook { url, client } => {
            // The user learns nothing either way; the operator sees failures in the logs.
            match client.post(url).json(&notice).send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(%user_id, "password reset notice sent")
                }
                Ok(r) => tracing::warn!(%user_id, status = %r.status(), "reset webhook refused"),
                Err(e) => tracing::warn!(%user_id, error = %e, "reset webhook failed"),
            }
        }
        Notifier::DevLog => {
            tracing::warn!(%user_id, token = %token, "dev mode: password reset token (never logged outside dev mode)")
        }
        Notifier::Disabled => {
            tracing::warn!(%user_id, "password reset requested but no notifier is configured")
        }
    }
    Ok(accepted)
}

/// `POST /api/v1/auth/password-reset/confirm` `{"token","new_password"}`: sets the password once
/// per token, then refuses every token issued before, and closes the user's connections.
pub async fn confirm(
    node: web::Data<Node>,
    body: web::Json<ResetConfirm>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let mut err = ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::ValidationFailed,
        "some fields are invalid",
    );
    if let Some(code) = crate::accounts::password_problem(&body.new_password) {
        err.fields.insert("new_password", code);
    }
    if body.token.len() != TOKEN_BYTES * 2 {
        err.fields.insert("token", "token_invalid");
    }
    if !err.fields.is_empty() {
        return Err(err);
    }
    let password = body.new_password;
    let hash = crate::accounts::password_work(&node, move || crate::auth::hash_password(&password))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(|_| ApiError::internal())?;
    let mut client = node.db.get().await.map_err(unavailable)?;
    let tx = client.transaction().await.map_err(unavailable)?;
    // Single use: the token is marked used in the same statement that finds it.
    let used = tx
        .query_opt(
            "UPDATE password_resets SET used_at = now()
             WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
             RETURNING user_id",
            &[&hash_token(&body.token)],
        )
        .await
        .map_err(|e| unavailable(chat_core::db::describe(&e)))?;
    let Some(row) = used else {
        err.fields.insert("token", "token_invalid");
        return Err(err);
    };
    let user_id: Uuid = row.get(0);
    let changed_at: i64 = tx
        .query_one(
            "UPDATE users SET password_hash = $2, password_changed_at = now() WHERE id = $1
             RETURNING floor(extract(epoch FROM password_changed_at))::int8",
            &[&user_id, &hash],
        )
        .await
        .map_err(|e| unavailable(chat_core::db::describe(&e)))?
        .get(0);
    tx.commit()
        .await
        .map_err(|e| unavailable(chat_core::db::describe(&e)))?;
    tracing::info!(%user_id, "password reset");
    // Open connections with older tokens close on every node; new requests with them are
    // refused by `authenticate` whatever happens to this publish.
    let frame = format!("{{\"type\":\"revoked\",\"before\":{changed_at}}}");
    let channel = node.broker.keys().user_channel(user_id);
    if let Err(e) = node.broker.publish(&[channel], Uuid::nil(), &frame).await {
        tracing::warn!(%user_id, error = %e, "revocation not published; connections stay until their tokens expire or they reconnect");
    }
    Ok(HttpResponse::NoContent().finish())
}
