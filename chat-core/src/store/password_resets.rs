//! Password reset tokens (stored as hashes only) and the password change a token confirms.

use uuid::Uuid;

use super::{Store, StoreError, TokenFloor};

/// Who a reset link goes to.
#[derive(Debug, Clone)]
pub struct ResetTarget {
    pub user_id: Uuid,
    pub name: String,
    pub email: String,
}

impl Store {
    /// The account with `email` (case-insensitively), if any.
    pub async fn reset_target(&self, email: &str) -> Result<Option<ResetTarget>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, name, email FROM users WHERE lower(email) = lower($1)",
                &[&email],
            )
            .await?;
        Ok(row.map(|r| ResetTarget {
            user_id: r.get(0),
            name: r.get(1),
            email: r.get(2),
        }))
    }

    /// Stores a reset token's hash for `user`, usable for `ttl_secs`; returns when it expires
    /// (Unix seconds).
    pub async fn create_reset(
        &self,
        token_hash: &[u8],
        user: Uuid,
        ttl_secs: i64,
    ) -> Result<i64, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "INSERT INTO password_resets (token_hash, user_id, expires_at)
                 VALUES ($1, $2, now() + $3::int8 * interval '1 second')
                 RETURNING floor(extract(epoch FROM expires_at))::int8",
                &[&token_hash, &user, &ttl_secs],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Uses the token (once, unexpired) and sets its user's password hash, in one transaction.
    /// Returns the user and the new token floor (Unix seconds), or `None` for a token that is
    /// unknown, used or expired.
    /// Whether `token_hash` names an unused, unexpired reset token (looked up before any
    /// password is hashed for it, so that strangers cannot make the node hash for nothing).
    pub async fn reset_token_usable(&self, token_hash: &[u8]) -> Result<bool, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT 1 FROM password_resets
                 WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()",
                &[&token_hash],
            )
            .await?;
        Ok(row.is_some())
    }

    /// Spends a usable token and sets the password; returns the user and their token floor
    /// after the change (its version incremented), or `None` for an unusable token.
    pub async fn confirm_reset(
        &self,
        token_hash: &[u8],
        password_hash: &str,
    ) -> Result<Option<(Uuid, TokenFloor)>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Single use: the token is marked used in the same statement that finds it.
        let used = tx
            .query_opt(
                "UPDATE password_resets SET used_at = now()
                 WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
                 RETURNING user_id",
                &[&token_hash],
            )
            .await?;
        let Some(row) = used else {
            return Ok(None);
        };
        let user_id: Uuid = row.get(0);
        let row = tx
            .query_one(
                "UPDATE users
                 SET password_hash = $2, password_changed_at = now(),
                     token_version = token_version + 1
                 WHERE id = $1
                 RETURNING floor(extract(epoch FROM password_changed_at))::int8, token_version",
                &[&user_id, &password_hash],
            )
            .await?;
        let floor = TokenFloor {
            changed_at: row.get(0),
            version: row.get(1),
        };
        tx.commit().await?;
        Ok(Some((user_id, floor)))
    }
}
