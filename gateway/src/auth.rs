//! Tokens: our HS256 JWTs, and RS256/ES256 JWTs from an external identity provider verified
//! with keys from a JWKS file; every algorithm is pinned on verify.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a token was refused. Deliberately coarse: the client learns only "unauthorized".
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token invalid")]
    Invalid,
    /// An external token names a key the provider's JWKS (as last read) does not have.
    #[error("token signed with an unknown key")]
    UnknownKey,
}

/// JWT claims.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    iat: u64,
    exp: u64,
    /// The user's token version when issued (a password change increments it); absent in
    /// tokens of 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tv: Option<i64>,
}

/// Claims of an external identity provider's token (issuer, audience and expiry are checked by
/// the validation; `sub` is the provider's own user id, any string).
#[derive(Debug, Deserialize)]
struct ExternalClaims {
    sub: String,
    #[serde(default)]
    iat: Option<u64>,
    exp: u64,
    #[serde(default)]
    name: Option<String>,
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: Uuid,
    /// Issued at, Unix seconds: tokens issued before the user's last password change are refused.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// The user's token version when issued; `None` for external and 0.2 tokens.
    pub version: Option<i64>,
    /// Set when an external identity provider issued the token.
    pub external: Option<ExternalProfile>,
}

/// What an external provider's token says about its user, who is created on first use.
#[derive(Debug, Clone)]
pub struct ExternalProfile {
    /// The `name` claim, if any.
    pub name: Option<String>,
}

/// The user id of an external identity: a UUIDv5 of issuer and subject, the same on every node,
/// so concurrent first logins create one user.
pub fn external_user_id(issuer: &str, subject: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("{issuer}#{subject}").as_bytes(),
    )
}

/// A JWKS that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("not a JWKS document: {0}")]
    Parse(String),
    #[error("key {kid:?}: {reason}")]
    Key { kid: String, reason: String },
    #[error("no RS256 or ES256 signing key in the set")]
    Empty,
}

/// One provider key, usable with exactly one algorithm.
#[derive(Clone)]
struct ProviderKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// An external identity provider: its signing keys (RS256 and ES256 only), issuer and audience.
#[derive(Clone)]
pub struct ExternalProvider {
    issuer: String,
    keys: Vec<ProviderKey>,
    validations: Vec<(Algorithm, Validation)>,
}

impl ExternalProvider {
    /// Keys from a JWKS document; tokens must carry `iss` = `issuer` and `aud` containing
    /// `audience`. Keys for other algorithms or uses are skipped; at least one must remain.
    pub fn from_jwks(jwks: &str, issuer: &str, audience: &str) -> Result<Self, JwksError> {
        use jsonwebtoken::jwk::{
            AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse,
        };
        let set: JwkSet =
            serde_json::from_str(jwks).map_err(|e| JwksError::Parse(e.to_string()))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                    if p.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| JwksError::Key {
                kid: jwk.common.key_id.clone().unwrap_or_default(),
                reason: e.to_string(),
            })?;
            keys.push(ProviderKey {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            });
        }
        if keys.is_empty() {
            return Err(JwksError::Empty);
        }
        let validations = [Algorithm::RS256, Algorithm::ES256]
            .into_iter()
            .map(|algorithm| {
                let mut v = Validation::new(algorithm);
                v.algorithms = vec![algorithm];
                v.leeway = 5;
                v.validate_nbf = true;
                v.set_issuer(&[issuer]);
                v.set_audience(&[audience]);
                v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
                (algorithm, v)
            })
            .collect();
        Ok(ExternalProvider {
            issuer: issuer.to_string(),
            keys,
            validations,
        })
    }

    /// Verifies a token whose header names `algorithm` (RS256 or ES256) and `kid`.
    fn verify(
        &self,
        token: &str,
        algorithm: Algorithm,
        kid: Option<&str>,
    ) -> Result<Identity, TokenError> {
        let validation = self
            .validations
            .iter()
            .find(|(a, _)| *a == algorithm)
            .map(|(_, v)| v)
            .ok_or(TokenError::Invalid)?;
        // A token naming a key must use that key, with that key's algorithm; one naming none is
        // tried against every key of its algorithm.
        if let Some(kid) = kid {
            if !self.keys.iter().any(|k| k.kid.as_deref() == Some(kid)) {
                return Err(TokenError::UnknownKey);
            }
        }
        let candidates = self
            .keys
            .iter()
            .filter(|k| k.algorithm == algorithm && (kid.is_none() || k.kid.as_deref() == kid));
        let mut outcome = Err(TokenError::Invalid);
        for candidate in candidates {
            match jsonwebtoken::decode::<ExternalClaims>(token, &candidate.key, validation) {
                Ok(data) => {
                    let claims = data.claims;
                    if claims.sub.is_empty() || claims.sub.len() > 255 {
                        return Err(TokenError::Invalid);
                    }
                    return Ok(Identity {
                        user_id: external_user_id(&self.issuer, &claims.sub),
                        iat: claims.iat.unwrap_or(0),
                        exp: claims.exp,
                        version: None,
                        external: Some(ExternalProfile { name: claims.name }),
                    });
                }
                Err(e) => outcome = Err(token_error(&e)),
            }
        }
        outcome
    }
}

fn token_error(e: &jsonwebtoken::errors::Error) -> TokenError {
    match e.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
        _ => TokenError::Invalid,
    }
}

/// Issues and verifies tokens and hashes passwords.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: u64,
    /// RS256/ES256 tokens from an external identity provider, when configured.
    external: Option<Arc<ExternalKeys>>,
}

/// Where an external provider's keys come from: its JWKS file, read again periodically and when
/// a token names a key it does not have (at most every [`MIN_JWKS_RELOAD_GAP`]), so a key
/// rotation needs no restart. A file that does not load keeps the keys in use.
pub struct ExternalKeys {
    path: String,
    issuer: String,
    audience: String,
    current: RwLock<ExternalProvider>,
    last_read: Mutex<Option<std::time::Instant>>,
}

/// Shortest time between two reads of the JWKS file that tokens with unknown keys ask for.
pub const MIN_JWKS_RELOAD_GAP: Duration = Duration::from_secs(2);

impl ExternalKeys {
    /// Keys from the JWKS file at `path`.
    pub fn load(path: &str, issuer: &str, audience: &str) -> Result<Self, JwksError> {
        let jwks = std::fs::read_to_string(path).map_err(|e| JwksError::Parse(e.to_string()))?;
        Ok(ExternalKeys {
            path: path.to_string(),
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            current: RwLock::new(ExternalProvider::from_jwks(&jwks, issuer, audience)?),
            last_read: Mutex::new(Some(std::time::Instant::now())),
        })
    }

    fn verify(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Identity, TokenError> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .verify(token, alg, kid)
    }

    /// Reads the file again; true when it loaded (its keys are in use from now on).
    pub async fn reload(&self) -> bool {
        *self.last_read.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await;
        let loaded = match read {
            Ok(Ok(jwks)) => ExternalProvider::from_jwks(&jwks, &self.issuer, &self.audience)
                .map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match loaded {
            Ok(provider) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = provider;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %self.path, "jwks not reloaded; the keys in use stay");
                false
            }
        }
    }

    /// [`Self::reload`], unless the file was read less than [`MIN_JWKS_RELOAD_GAP`] ago.
    pub async fn reload_if_due(&self) -> bool {
        let due = self
            .last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|at| at.elapsed() >= MIN_JWKS_RELOAD_GAP);
        due && self.reload().await
    }

    /// Reads the file every `every` until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => { self.reload().await; }
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

impl Auth {
    pub fn new(secret: &str, ttl_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Auth {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            ttl_secs,
            external: None,
        }
    }

    /// Also accepts tokens signed with `keys`.
    pub fn with_external(mut self, keys: Arc<ExternalKeys>) -> Self {
        self.external = Some(keys);
        self
    }

    /// Reads the external provider's keys again when a token named an unknown one (rate
    /// limited); true when they were read.
    pub async fn refresh_external_keys(&self) -> bool {
        match &self.external {
            Some(keys) => keys.reload_if_due().await,
            None => false,
        }
    }

    /// A new token for `user_id`, at the user's current token `version`.
    pub fn issue(
        &self,
        user_id: Uuid,
        version: i64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = unix_now();
        let claims = Claims {
            sub: user_id,
            iat: now,
            exp: now + self.ttl_secs,
            tv: Some(version),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// Verifies signature, algorithm, expiry and not-before. HS256 tokens are ours; RS256 and
    /// ES256 tokens are the external provider's (never checked with our secret, and ours never
    /// with its keys); every other algorithm, `none` included, is refused.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        match (header.alg, &self.external) {
            (Algorithm::HS256, _) => {
                match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
                    Ok(data) => Ok(Identity {
                        user_id: data.claims.sub,
                        iat: data.claims.iat,
                        exp: data.claims.exp,
                        version: data.claims.tv,
                        external: None,
                    }),
                    Err(e) => Err(token_error(&e)),
                }
            }
            (alg @ (Algorithm::RS256 | Algorithm::ES256), Some(keys)) => {
                keys.verify(token, alg, header.kid.as_deref())
            }
            _ => Err(TokenError::Invalid),
        }
    }
}

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&"s".repeat(32), 60)
    }

    /// A token round-trips; a token signed with another secret or algorithm is refused.
    #[test]
    fn tokens_are_pinned_to_secret_and_algorithm() {
        let a = auth();
        let user = Uuid::now_v7();
        let token = a.issue(user, 0).expect("issue");
        assert_eq!(a.verify(&token).expect("verify").user_id, user);

        let other = Auth::new(&"o".repeat(32), 60);
        assert!(other.verify(&token).is_err());

        let now = unix_now();
        let claims = Claims {
            sub: user,
            iat: now,
            exp: now + 60,
            tv: None,
        };
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret("s".repeat(32).as_bytes()),
        )
        .expect("encode");
        assert!(a.verify(&hs512).is_err(), "HS512 must be refused");
        assert!(a.verify("not.a.jwt").is_err());
    }

    /// Expired tokens are reported as expired.
    #[test]
    fn expired_tokens_are_refused() {
        let a = auth();
        let now = unix_now();
        let claims = Claims {
            sub: Uuid::now_v7(),
            iat: now - 120,
            exp: now - 60,
            tv: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret("s".repeat(32).as_bytes()),
        )
        .expect("encode");
        assert!(matches!(a.verify(&token), Err(TokenError::Expired)));
    }
}
