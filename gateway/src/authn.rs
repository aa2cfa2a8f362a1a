//! Who is calling: a bearer token (or, at `/ws`, a single-use ticket standing for one) verified,
//! its user checked to exist and the token checked not to predate the user's last password
//! change (in Postgres, so a reset refuses old tokens on every node at once), and a user of an
//! external identity provider created on first use. The HTTP layer's `Authenticated` extractor
//! and the WebSocket handshake both use it.

use std::sync::Arc;

use actix_web::{web, HttpRequest};
use chat_core::counters::{CounterKey, Counters};
use chat_core::pubsub::Envelope;
use chat_core::store::{Store, TokenFloor};
use serde::Deserialize;
use uuid::Uuid;

use crate::api_error::ApiError;
use crate::auth::{Auth, Identity, TokenError};
use crate::directory::Directory;
use crate::fields::name_problem;
use crate::lookups::{Batcher, LookupError};
use crate::ticket::{Tickets, TICKET_TTL_SECS};

/// The password hash of users from an external identity provider: not a PHC string, so no
/// password ever verifies against it.
const EXTERNAL_PASSWORD_HASH: &str = "!external";

/// Where a token may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFrom {
    /// `Authorization: Bearer` only (the HTTP API).
    Header,
    /// The header, a `ticket` query parameter (see [`Authenticator::ticket`]), or the
    /// `access_token` query parameter (browsers' WebSockets cannot set headers).
    HeaderOrQuery,
}

/// Authenticates requests.
pub struct Authenticator {
    auth: Arc<Auth>,
    tickets: Tickets,
    /// Where spent ticket ids are counted, across nodes.
    counters: Arc<dyn Counters>,
    store: Store,
    /// Token floors, one query per batch of concurrent callers.
    floors: Batcher<Uuid, TokenFloor>,
    directory: Arc<Directory>,
}

impl Authenticator {
    pub fn new(
        auth: Arc<Auth>,
        tickets: Tickets,
        counters: Arc<dyn Counters>,
        store: Store,
        floors: Batcher<Uuid, TokenFloor>,
        directory: Arc<Directory>,
    ) -> Self {
        Authenticator {
            auth,
            tickets,
            counters,
            store,
            floors,
            directory,
        }
    }

    /// The caller's identity.
    pub async fn authenticate(
        &self,
        req: &HttpRequest,
        from: TokenFrom,
    ) -> Result<Identity, ApiError> {
        match credential(req, from) {
            Some(Credential::Token(token)) => self.identify(&token).await,
            Some(Credential::Ticket(ticket)) => self.redeem(&ticket).await,
            None => Err(ApiError::unauthorized("missing bearer token")),
        }
    }

    /// A single-use ticket standing for the caller's token at `/ws?ticket=` for about 30 s,
    /// and its lifetime in seconds.
    pub fn ticket(&self, caller: &Identity) -> Result<(String, u64), ApiError> {
        let ticket = self
            .tickets
            .issue(caller)
            .map_err(|_| ApiError::internal())?;
        Ok((ticket, TICKET_TTL_SECS))
    }

    /// The identity a ticket stands for, spending it: a second handshake with it, on any
    /// node, is refused. Refused too when the shared counters cannot say whether it was spent.
    async fn redeem(&self, ticket: &str) -> Result<Identity, ApiError> {
        let (identity, id) = self
            .tickets
            .verify(ticket)
            .map_err(|e| ApiError::unauthorized(format!("ticket: {e}")))?;
        let window = std::time::Duration::from_secs(2 * TICKET_TTL_SECS);
        match self.counters.count(&CounterKey::WsTicket(id), window).await {
            Ok(1) => self.admit(identity).await,
            Ok(_) => Err(ApiError::unauthorized("the ticket was used already")),
            Err(e) => {
                tracing::warn!(error = %e, "ticket not checked: counters unavailable");
                Err(ApiError::unavailable("tickets"))
            }
        }
    }

    /// The identity a token proves. A token naming a provider key we do not have makes the
    /// provider's keys be read again (at most every 2 s) and is checked once more: a rotated
    /// key works from its first token.
    pub async fn identify(&self, token: &str) -> Result<Identity, ApiError> {
        let verified = match self.auth.verify(token) {
            Err(TokenError::UnknownKey) if self.auth.refresh_external_keys().await => {
                self.auth.verify(token)
            }
            other => other,
        };
        let identity = verified.map_err(|e| ApiError::unauthorized(e.to_string()))?;
        self.admit(identity).await
    }

    /// A verified identity, once its user exists (an external one is created) and its token
    /// predates no password change.
    async fn admit(&self, identity: Identity) -> Result<Identity, ApiError> {
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
        let floor = self
            .floors
            .get(identity.user_id)
            .await
            .map_err(lookup_failed)?;
        match floor {
            None => Err(ApiError::unauthorized("the token's user no longer exists")),
            Some(floor) if !floor.admits(identity.iat, identity.version) => Err(
                ApiError::unauthorized("the token predates a password change; log in again"),
            ),
            Some(_) => Ok(identity),
        }
    }
}

/// A lookup that found no answer, as the caller is told.
pub fn lookup_failed(e: LookupError) -> ApiError {
    match e {
        LookupError::Store(e) => ApiError::store(e),
        LookupError::Stopped => ApiError::unavailable("this node"),
    }
}

/// The envelope that tells every node a password change revoked `floor`'s older tokens.
pub fn revocation(floor: TokenFloor) -> Envelope {
    Envelope::Revoked {
        before: floor
            .changed_at
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(0),
        version: Some(floor.version),
    }
}

/// Whether a revocation (`before`, `version`, as [`revocation`] sent it) revokes a token issued
/// at `iat` with `token_version`. From a 0.2 node (no version) only the second is known.
pub fn revokes(before: u64, version: Option<i64>, iat: u64, token_version: Option<i64>) -> bool {
    match version {
        Some(version) => !TokenFloor {
            changed_at: Some(i64::try_from(before).unwrap_or(i64::MAX)),
            version,
        }
        .admits(iat, token_version),
        None => iat < before,
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
    ticket: Option<String>,
}

/// What proves a caller.
enum Credential {
    Token(String),
    Ticket(String),
}

/// The credential a request carries: the header first, then a ticket, then a token in the
/// query (where allowed).
fn credential(req: &HttpRequest, from: TokenFrom) -> Option<Credential> {
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
        (Some(t), _) => Some(Credential::Token(t)),
        (None, TokenFrom::HeaderOrQuery) => {
            let query = web::Query::<TokenQuery>::from_query(req.query_string())
                .ok()?
                .into_inner();
            match (query.ticket, query.access_token) {
                (Some(ticket), _) => Some(Credential::Ticket(ticket)),
                (None, token) => token.map(Credential::Token),
            }
        }
        (None, TokenFrom::Header) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a revocation sends revokes the tokens its floor does not admit, and only those; a
    /// 0.2 node's revocation (no version) compares seconds.
    #[test]
    fn revocations_carry_the_floor() {
        let floor = TokenFloor {
            changed_at: Some(100),
            version: 2,
        };
        let Envelope::Revoked { before, version } = revocation(floor) else {
            panic!("a revocation");
        };
        assert_eq!((before, version), (100, Some(2)));
        assert!(
            revokes(before, version, 100, Some(1)),
            "older version, same second"
        );
        assert!(
            !revokes(before, version, 100, Some(2)),
            "issued after the change"
        );
        assert!(
            revokes(before, version, 100, None),
            "unversioned, same second"
        );
        assert!(revokes(100, None, 99, Some(5)) && !revokes(100, None, 100, Some(5)));
    }
}
