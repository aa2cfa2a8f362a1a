//! Accounts: register, log in, who am I; and the directory the send path asks whether a
//! recipient exists. Users live in Postgres, written only here.

use std::collections::HashSet;
use std::sync::Mutex;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chat_core::protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api_error::ApiError;
use crate::auth::{self, Identity};
use crate::node::Node;

const MAX_NAME_CHARS: usize = 100;
const MAX_EMAIL_BYTES: usize = 254;
const MIN_PASSWORD_CHARS: usize = 8;
/// Bounds the argon2 work an attacker can ask for per request.
const MAX_PASSWORD_BYTES: usize = 1024;

/// A user as the API shows it.
#[derive(Debug, Serialize)]
pub struct User {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    /// An `https://` URL of the user's picture, or null.
    pub avatar_url: Option<String>,
}

impl User {
    /// From a row of `id, name, email, avatar_url`.
    fn from_row(row: &tokio_postgres::Row) -> Self {
        User {
            id: row.get(0),
            name: row.get(1),
            email: row.get(2),
            avatar_url: row.get(3),
        }
    }
}

/// Longest avatar URL accepted.
const MAX_AVATAR_URL_BYTES: usize = 2048;

#[derive(Debug, Deserialize)]
pub struct RegisterRequest {
    #[serde(default)]
    name: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

#[derive(Debug, Deserialize)]
pub struct LoginRequest {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

#[derive(Debug, Serialize)]
struct AuthResponse {
    user: User,
    token: String,
}

/// Checks an email address loosely: one `@`, a dotted domain, no spaces, bounded length.
fn email_is_valid(email: &str) -> bool {
    if email.len() > MAX_EMAIL_BYTES || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        }
        None => false,
    }
}

/// The field code for a password that is too short or too long.
pub fn password_problem(password: &str) -> Option<&'static str> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        Some("password_too_short")
    } else if password.len() > MAX_PASSWORD_BYTES {
        Some("password_too_long")
    } else {
        None
    }
}

/// The field code for a bad (trimmed) display name (users and rooms).
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("name_required")
    } else if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        Some("name_invalid")
    } else {
        None
    }
}

fn validate_registration(req: &RegisterRequest) -> Result<(), ApiError> {
    let mut err = ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::ValidationFailed,
        "some fields are invalid",
    );
    if let Some(code) = name_problem(req.name.trim()) {
        err.fields.insert("name", code);
    }
    if !email_is_valid(req.email.trim()) {
        err.fields.insert("email", "email_invalid");
    }
    if let Some(code) = password_problem(&req.password) {
        err.fields.insert("password", code);
    }
    if err.fields.is_empty() {
        Ok(())
    } else {
        Err(err)
    }
}

/// Runs CPU- and memory-heavy password work (argon2id: 19 MiB each) on the node's password
/// threads (`gateway_password_hash_concurrency`); 503 when a thousand are already waiting.
pub async fn password_work<T: Send + 'static>(
    node: &Node,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    node.passwords.run(f).await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "too many password checks in progress; retry shortly",
        )
    })
}

/// `POST /api/v1/auth/register`
pub async fn register(
    node: web::Data<Node>,
    body: web::Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let req = body.into_inner();
    validate_registration(&req)?;
    let password = req.password;
    let hash = password_work(&node, move || auth::hash_password(&password))
        .await?
        .map_err(|_| ApiError::internal())?;
    let user = User {
        id: Uuid::now_v7(),
        name: req.name.trim().to_string(),
        email: req.email.trim().to_string(),
        avatar_url: None,
    };
    let client = node.db.get().await.map_err(ApiError::pool)?;
    let inserted = client
        .execute(
            "INSERT INTO users (id, name, email, password_hash) VALUES ($1, $2, $3, $4)
             ON CONFLICT ((lower(email))) DO NOTHING",
            &[&user.id, &user.name, &user.email, &hash],
        )
        .await
        .map_err(ApiError::db)?;
    if inserted == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::EmailTaken,
            "an account with this email exists",
        ));
    }
    node.directory.remember(user.id);
    let token = node.auth.issue(user.id).map_err(|_| ApiError::internal())?;
    tracing::info!(user_id = %user.id, "user registered");
    Ok(HttpResponse::Created().json(AuthResponse { user, token }))
}

/// `POST /api/v1/auth/login`
pub async fn login(
    node: web::Data<Node>,
    http: HttpRequest,
    body: web::Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let req = body.into_inner();
    let email = req.email.trim().to_string();
    if req.password.len() > MAX_PASSWORD_BYTES || email.len() > MAX_EMAIL_BYTES {
        return Err(invalid_credentials());
    }
    // Counted before the password is checked: guessing costs an attempt whether it is right.
    let ip = crate::limits::client_ip(&node, &http);
    if !crate::limits::login_allowed(&node, &email, ip).await {
        node.metrics
            .rate_limited
            .with_label_values(&["login"])
            .inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            "too many login attempts; wait and try again",
        ));
    }
    let client = node.db.get().await.map_err(ApiError::pool)?;
    let row = client
        .query_opt(
            "SELECT id, name, email, avatar_url, password_hash FROM users
             WHERE lower(email) = lower($1)",
            &[&email],
        )
        .await
        .map_err(ApiError::db)?;
    let (user, hash) = match row {
        Some(row) => (Some(User::from_row(&row)), row.get::<_, String>(4)),
        // Verify against a real hash anyway so both failures take the same time.
        None => (None, node.auth.dummy_hash().to_string()),
    };
    let password = req.password;
    let matches = password_work(&node, move || auth::verify_password(&password, &hash)).await?;
    match user {
        Some(user) if matches => {
            let token = node.auth.issue(user.id).map_err(|_| ApiError::internal())?;
            Ok(HttpResponse::Ok().json(AuthResponse { user, token }))
        }
        _ => Err(invalid_credentials()),
    }
}

fn invalid_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::InvalidCredentials,
        "email or password is wrong",
    )
}

/// `GET /api/v1/users/me`
pub async fn me(node: web::Data<Node>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let identity = authenticate(&node, &req, false).await?;
    let client = node.db.get().await.map_err(ApiError::pool)?;
    let row = client
        .query_opt(
            "SELECT id, name, email, avatar_url FROM users WHERE id = $1",
            &[&identity.user_id],
        )
        .await
        .map_err(ApiError::db)?;
    match row {
        Some(row) => Ok(HttpResponse::Ok().json(User::from_row(&row))),
        None => Err(ApiError::unauthorized("the token's user no longer exists")),
    }
}

/// `PATCH /api/v1/users/me` `{"name"?, "avatar_url"?}`: changes the caller's name and picture;
/// `avatar_url: null` removes the picture. Fields left out stay as they are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileUpdate {
    name: Option<String>,
    #[serde(default, deserialize_with = "present_or_null")]
    avatar_url: Option<Option<String>>,
}

/// Tells a field that is null (`Some(None)`) from one left out (`None`).
fn present_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// An avatar URL: `https://`, a host, no whitespace or control characters, bounded.
fn avatar_url_is_valid(url: &str) -> bool {
    url.len() <= MAX_AVATAR_URL_BYTES
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
        && url
            .strip_prefix("https://")
            .and_then(|rest| rest.split(['/', '?', '#']).next())
            .is_some_and(|host| !host.is_empty() && !host.contains('@'))
}

pub async fn update_me(
    node: web::Data<Node>,
    req: HttpRequest,
    body: web::Json<ProfileUpdate>,
) -> Result<HttpResponse, ApiError> {
    let identity = authenticate(&node, &req, false).await?;
    let update = body.into_inner();
    let mut err = ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::ValidationFailed,
        "some fields are invalid",
    );
    let name = update.name.as_deref().map(str::trim);
    if let Some(name) = name {
        if let Some(code) = name_problem(name) {
            err.fields.insert("name", code);
        }
    }
    if let Some(Some(url)) = &update.avatar_url {
        if !avatar_url_is_valid(url) {
            err.fields.insert("avatar_url", "avatar_url_invalid");
        }
    }
    if !err.fields.is_empty() {
        return Err(err);
    }
    let client = node.db.get().await.map_err(ApiError::pool)?;
    let row = client
        .query_one(
            "UPDATE users SET
                 name = COALESCE($2, name),
                 avatar_url = CASE WHEN $3 THEN $4 ELSE avatar_url END
             WHERE id = $1
             RETURNING id, name, email, avatar_url",
            &[
                &identity.user_id,
                &name,
                &update.avatar_url.is_some(),
                &update.avatar_url.flatten(),
            ],
        )
        .await
        .map_err(ApiError::db)?;
    Ok(HttpResponse::Ok().json(User::from_row(&row)))
}

/// The caller's identity from `Authorization: Bearer`, or (when `allow_query`, for browsers'
/// WebSockets) the `access_token` query parameter. The token must be valid, its user must
/// exist, and it must not predate the user's last password change (checked in Postgres, so a
/// reset refuses old tokens on every node at once).
pub async fn authenticate(
    node: &Node,
    req: &HttpRequest,
    allow_query: bool,
) -> Result<Identity, ApiError> {
    let identity = verify_token(node, req, allow_query)?;
    let client = node.db.get().await.map_err(ApiError::pool)?;
    if let Some(profile) = &identity.external {
        // Created once; after that the directory knows the user and no write is needed.
        if !node.directory.knows(identity.user_id) {
            provision_external_user(&client, &identity, profile.name.as_deref()).await?;
            node.directory.remember(identity.user_id);
        }
    }
    // Every request and handshake runs this: prepared once per pooled connection, it is one
    // round trip instead of two (parse, then execute).
    let statement = client
        .prepare_cached(
            "SELECT floor(extract(epoch FROM password_changed_at))::int8 FROM users WHERE id = $1",
        )
        .await
        .map_err(ApiError::db)?;
    let row = client
        .query_opt(&statement, &[&identity.user_id])
        .await
        .map_err(ApiError::db)?
        .ok_or_else(|| ApiError::unauthorized("the token's user no longer exists"))?;
    match row.get::<_, Option<i64>>(0) {
        Some(changed) if (identity.iat as i64) < changed => Err(ApiError::unauthorized(
            "the token predates a password change; log in again",
        )),
        _ => Ok(identity),
    }
}

/// Creates the user of an external identity on first use: its id is derived from issuer and
/// subject, its name is the token's `name` claim when that is a valid display name, and it has
/// no usable password or email (it logs in through its identity provider only).
async fn provision_external_user(
    client: &deadpool_postgres::Client,
    identity: &Identity,
    name: Option<&str>,
) -> Result<(), ApiError> {
    let name = name
        .map(str::trim)
        .filter(|n| name_problem(n).is_none())
        .unwrap_or("user");
    let placeholder_email = format!("{}@external.invalid", identity.user_id);
    client
        .execute(
            "INSERT INTO users (id, name, email, password_hash) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
            &[
                &identity.user_id,
                &name,
                &placeholder_email,
                &EXTERNAL_PASSWORD_HASH,
            ],
        )
        .await
        .map_err(ApiError::db)?;
    Ok(())
}

/// The password hash of users from an external identity provider: not a PHC string, so no
/// password ever verifies against it.
const EXTERNAL_PASSWORD_HASH: &str = "!external";

fn verify_token(node: &Node, req: &HttpRequest, allow_query: bool) -> Result<Identity, ApiError> {
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
    let token = match header {
        Some(t) => Some(t),
        None if allow_query => web::Query::<TokenQuery>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.into_inner().access_token),
        None => None,
    };
    let token = token.ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    node.auth
        .verify(&token)
        .map_err(|e| ApiError::unauthorized(e.to_string()))
}

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

/// Whether users exist, for the send path. Users are never deleted, so a positive answer is
/// cached; the cache is bounded and cleared when full.
pub struct UserDirectory {
    known: Mutex<HashSet<Uuid>>,
    capacity: usize,
}

impl UserDirectory {
    pub fn new(capacity: usize) -> Self {
        UserDirectory {
            known: Mutex::new(HashSet::new()),
            capacity,
        }
    }

    /// Whether `user` is known to exist, without asking Postgres.
    pub fn knows(&self, user: Uuid) -> bool {
        self.known
            .lock()
            .map(|known| known.contains(&user))
            .unwrap_or(false)
    }

    /// Records a user known to exist.
    pub fn remember(&self, user: Uuid) {
        if let Ok(mut known) = self.known.lock() {
            if known.len() >= self.capacity {
                known.clear();
            }
            known.insert(user);
        }
    }

    /// Whether `user` exists; asks Postgres on a cache miss.
    pub async fn exists(
        &self,
        db: &deadpool_postgres::Pool,
        user: Uuid,
    ) -> Result<bool, DirectoryError> {
        if self
            .known
            .lock()
            .map(|k| k.contains(&user))
            .unwrap_or(false)
        {
            return Ok(true);
        }
        let lookup = async {
            let client = db
                .get()
                .await
                .map_err(|e| DirectoryError(chat_core::db::describe_pool(&e)))?;
            client
                .query_opt("SELECT 1 FROM users WHERE id = $1", &[&user])
                .await
                .map_err(|e| DirectoryError(chat_core::db::describe(&e)))
        };
        let found = tokio::time::timeout(std::time::Duration::from_secs(3), lookup)
            .await
            .map_err(|_| DirectoryError("postgres did not answer in time".into()))??
            .is_some();
        if found {
            self.remember(user);
        }
        Ok(found)
    }
}

/// The directory could not answer (Postgres unavailable).
#[derive(Debug, thiserror::Error)]
#[error("user directory: {0}")]
pub struct DirectoryError(String);

#[cfg(test)]
mod tests {
    use super::*;

    /// The email check accepts ordinary addresses and refuses malformed ones.
    #[test]
    fn email_validation() {
        for ok in ["a@b.co", "first.last+tag@example.org"] {
            assert!(email_is_valid(ok), "{ok}");
        }
        for bad in [
            "", "a", "a@", "@b.co", "a@b", "a b@c.de", "a@b@c.de", "a@.com", "a@com.",
        ] {
            assert!(!email_is_valid(bad), "{bad}");
        }
    }

    /// Avatar URLs must be https with a host, and bounded.
    #[test]
    fn avatar_urls() {
        assert!(avatar_url_is_valid("https://cdn.example.com/a.png?s=64"));
        for bad in [
            "http://cdn.example.com/a.png",
            "https://",
            "https:///a.png",
            "javascript:alert(1)",
            "https://a b.com/",
            "https://user@evil.com/",
        ] {
            assert!(!avatar_url_is_valid(bad), "{bad}");
        }
        assert!(!avatar_url_is_valid(&format!(
            "https://a.com/{}",
            "x".repeat(2100)
        )));
    }

    /// Each invalid field gets its own code.
    #[test]
    fn registration_reports_each_field() {
        let err = validate_registration(&RegisterRequest {
            name: "  ".into(),
            email: "nope".into(),
            password: "short".into(),
        })
        .expect_err("invalid");
        assert_eq!(err.fields.get("name"), Some(&"name_required"));
        assert_eq!(err.fields.get("email"), Some(&"email_invalid"));
        assert_eq!(err.fields.get("password"), Some(&"password_too_short"));
    }
}
