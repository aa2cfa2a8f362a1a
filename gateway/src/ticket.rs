//! WebSocket tickets: what a browser puts in `/ws?ticket=` instead of its token. A ticket is an
//! HS256 JWT signed with a key derived from the JWT secret (so it never verifies as a bearer
//! token, nor a token as a ticket), valid for [`TICKET_TTL_SECS`], carrying what the handshake
//! needs of the token it was issued for; its id makes it single use (checked by the caller).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::auth::{unix_now, ExternalProfile, Identity, TokenError};

/// How long a ticket may wait before its handshake.
pub const TICKET_TTL_SECS: u64 = 30;

/// What the key is derived with: a new label makes every outstanding ticket invalid.
const KEY_LABEL: &[u8] = b"chat-gateway ws ticket v1\0";

#[derive(Debug, Serialize, Deserialize)]
struct TicketClaims {
    sub: Uuid,
    /// The ticket's id: spent by its first handshake.
    jti: Uuid,
    exp: u64,
    /// The token's `iat`, `exp` and version: the connection is the token's, not the ticket's.
    tiat: u64,
    texp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tv: Option<i64>,
    /// Set for a user of the external identity provider (with its `name`, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ext: Option<Option<String>>,
}

/// Issues and verifies tickets.
#[derive(Clone)]
pub struct Tickets {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Tickets {
    /// Keys derived from the JWT `secret`.
    pub fn new(secret: &str) -> Self {
        let key = Sha256::new()
            .chain_update(KEY_LABEL)
            .chain_update(secret.as_bytes())
            .finalize();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = 2;
        validation.set_required_spec_claims(&["exp", "sub", "jti"]);
        Tickets {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            validation,
        }
    }

    /// A ticket standing for `identity` for [`TICKET_TTL_SECS`] (less if the token expires
    /// sooner).
    pub fn issue(&self, identity: &Identity) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = TicketClaims {
            sub: identity.user_id,
            jti: Uuid::new_v4(),
            exp: (unix_now() + TICKET_TTL_SECS).min(identity.exp),
            tiat: identity.iat,
            texp: identity.exp,
            tv: identity.version,
            ext: identity.external.as_ref().map(|p| p.name.clone()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// The identity a ticket stands for, and the ticket's id (the caller spends it).
    pub fn verify(&self, ticket: &str) -> Result<(Identity, Uuid), TokenError> {
        let data = jsonwebtoken::decode::<TicketClaims>(ticket, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid,
        })?;
        let c = data.claims;
        let identity = Identity {
            user_id: c.sub,
            iat: c.tiat,
            exp: c.texp,
            version: c.tv,
            external: c.ext.map(|name| ExternalProfile { name }),
        };
        Ok((identity, c.jti))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Auth;

    const SECRET: &str = "ssssssssssssssssssssssssssssssss";

    /// A ticket carries the token's identity; it is not a bearer token, a token is not a
    /// ticket, and another secret's ticket is refused.
    #[test]
    fn tickets_stand_for_their_token_and_nothing_else() {
        let auth = Auth::new(SECRET, 3600);
        let tickets = Tickets::new(SECRET);
        let user = Uuid::now_v7();
        let token = auth.issue(user, 4).expect("issue");
        let identity = auth.verify(&token).expect("verify");
        let ticket = tickets.issue(&identity).expect("ticket");
        let (back, jti) = tickets.verify(&ticket).expect("ticket verifies");
        assert_eq!(
            (back.user_id, back.iat, back.exp, back.version),
            (user, identity.iat, identity.exp, Some(4))
        );
        assert!(back.external.is_none());
        assert_ne!(tickets.verify(&ticket).expect("again").1, Uuid::nil());
        assert_eq!(jti, tickets.verify(&ticket).expect("same").1);
        assert!(auth.verify(&ticket).is_err(), "a ticket is no bearer token");
        assert!(tickets.verify(&token).is_err(), "a token is no ticket");
        let other = Tickets::new(&"o".repeat(32));
        assert!(other.verify(&ticket).is_err());
    }
}
