//! Accounts: register, log in, who am I, changing one's name and picture, and the ticket a
//! browser opens its WebSocket with.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chat_core::protocol::ErrorCode;
use chat_core::store::{Store, User};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Authenticated, HttpSettings};
use crate::api_error::ApiError;
use crate::auth::Auth;
use crate::directory::Directory;
use crate::fields::{avatar_url_problem, email_is_valid, name_problem, MAX_EMAIL_BYTES};
use crate::limits::{LoginGate, LoginLimiter, RegistrationLimiter};
use crate::metrics::Metrics;
use crate::passwords::{password_problem, Passwords, MAX_PASSWORD_BYTES};

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

fn validate_registration(req: &RegisterRequest) -> Result<(), ApiError> {
    let mut err = ApiError::validation();
    if let Some(code) = name_problem(req.name.trim()) {
        err.fields.insert("name", code);
    }
    if !email_is_valid(req.email.trim()) {
        err.fields.insert("email", "email_invalid");
    }
    if let Some(code) = password_problem(&req.password) {
        err.fields.insert("password", code);
    }
    err.into_result()
}

/// `POST /api/v1/auth/register`
#[allow(clippy::too_many_arguments)]
pub async fn register(
    store: web::Data<Store>,
    passwords: web::Data<Passwords>,
    auth: web::Data<Auth>,
    directory: web::Data<Directory>,
    limiter: web::Data<RegistrationLimiter>,
    metrics: web::Data<Metrics>,
    settings: web::Data<HttpSettings>,
    http: HttpRequest,
    body: web::Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let req = body.into_inner();
    validate_registration(&req)?;
    // Counted before the password is hashed: the hash is the work being limited.
    if !limiter
        .allow(settings.trusted_proxies.client_ip(&http))
        .await
    {
        metrics.rate_limited.with_label_values(&["register"]).inc();
        return Err(too_many("too many registrations; wait and try again"));
    }
    let hash = passwords.hash(req.password).await?;
    let user = User {
        id: Uuid::now_v7(),
        name: req.name.trim().to_string(),
        email: req.email.trim().to_string(),
        avatar_url: None,
    };
    if !store.create_user(&user, &hash).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::EmailTaken,
            "an account with this email exists",
        ));
    }
    directory.remember_user(user.id);
    let token = auth.issue(user.id, 0).map_err(|_| ApiError::internal())?;
    tracing::info!(user_id = %user.id, "user registered");
    Ok(HttpResponse::Created().json(AuthResponse { user, token }))
}

/// `POST /api/v1/auth/login`
#[allow(clippy::too_many_arguments)]
pub async fn login(
    store: web::Data<Store>,
    passwords: web::Data<Passwords>,
    auth: web::Data<Auth>,
    limiter: web::Data<LoginLimiter>,
    metrics: web::Data<Metrics>,
    settings: web::Data<HttpSettings>,
    http: HttpRequest,
    body: web::Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let req = body.into_inner();
    let email = req.email.trim().to_string();
    if req.password.len() > MAX_PASSWORD_BYTES || email.len() > MAX_EMAIL_BYTES {
        return Err(invalid_credentials());
    }
    let ip = settings.trusted_proxies.client_ip(&http);
    match limiter.check(&email, ip).await {
        LoginGate::Refused => {
            metrics.rate_limited.with_label_values(&["login"]).inc();
            return Err(too_many("too many failed logins; wait and try again"));
        }
        LoginGate::Proceed(delay) if !delay.is_zero() => {
            metrics
                .rate_limited
                .with_label_values(&["login_slowed"])
                .inc();
            tokio::time::sleep(delay).await;
        }
        LoginGate::Proceed(_) => {}
    }
    let credentials = store.credentials(&email).await?;
    let hash = credentials.as_ref().map(|c| c.password_hash.clone());
    let matches = passwords.verify(req.password, hash).await?;
    match credentials {
        Some(c) if matches => {
            let token = auth
                .issue(c.user.id, c.token_version)
                .map_err(|_| ApiError::internal())?;
            Ok(HttpResponse::Ok().json(AuthResponse {
                user: c.user,
                token,
            }))
        }
        _ => {
            limiter.failed(&email, ip).await;
            Err(invalid_credentials())
        }
    }
}

fn too_many(message: &str) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RateLimited,
        message,
    )
}

fn invalid_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::InvalidCredentials,
        "email or password is wrong",
    )
}

/// `POST /api/v1/ws/ticket`: a single-use ticket for `/ws?ticket=`, so a browser never puts its
/// token in a URL (where proxies and ingress logs keep it).
pub async fn ws_ticket(
    authenticator: web::Data<crate::authn::Authenticator>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let (ticket, expires_in) = authenticator.ticket(&caller)?;
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(serde_json::json!({"ticket": ticket, "expires_in": expires_in})))
}

/// `GET /api/v1/users/me`
pub async fn me(
    store: web::Data<Store>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    match store.user(caller.user_id).await? {
        Some(user) => Ok(HttpResponse::Ok().json(user)),
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

pub async fn update_me(
    store: web::Data<Store>,
    settings: web::Data<HttpSettings>,
    body: web::Json<ProfileUpdate>,
    Authenticated(caller): Authenticated,
) -> Result<HttpResponse, ApiError> {
    let update = body.into_inner();
    let mut err = ApiError::validation();
    let name = update.name.as_deref().map(str::trim);
    if let Some(code) = name.and_then(name_problem) {
        err.fields.insert("name", code);
    }
    if let Some(Some(url)) = &update.avatar_url {
        if let Some(code) = avatar_url_problem(url, &settings.avatar_hosts) {
            err.fields.insert("avatar_url", code);
        }
    }
    err.into_result()?;
    let avatar = update.avatar_url.as_ref().map(Option::as_deref);
    let user = store.update_profile(caller.user_id, name, avatar).await?;
    Ok(HttpResponse::Ok().json(user))
}

#[cfg(test)]
mod tests {
    use super::*;

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
