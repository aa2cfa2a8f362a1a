//! Users: accounts, profiles, the token floor a password change sets, `last_seen`, the users list.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use uuid::Uuid;

use super::{Store, StoreError};

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
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

/// Which of a user's tokens are still good after password changes: the version a change set,
/// and the Unix second of the last change (for tokens that carry no version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenFloor {
    /// When the password last changed, Unix seconds; `None` when it never did.
    pub changed_at: Option<i64>,
    /// Incremented by every password change.
    pub version: i64,
}

impl TokenFloor {
    /// Whether a token issued at `iat` (Unix seconds) with `version` (`None`: a token of 0.2 or
    /// of an external provider) is still good. A versioned token is good unless a change came
    /// after it; one without a version only if issued in a later second than the last change
    /// (never in the same second: it may have come before the change).
    pub fn admits(&self, iat: u64, version: Option<i64>) -> bool {
        match (version, self.changed_at) {
            (Some(v), _) => v >= self.version,
            (None, None) => true,
            (None, Some(changed)) => i64::try_from(iat).unwrap_or(i64::MAX) > changed,
        }
    }
}

/// A user's login record.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: User,
    pub password_hash: String,
    /// The version tokens issued now carry.
    pub token_version: i64,
}

/// One row of the users list.
#[derive(Debug, Clone)]
pub struct UserListRow {
    pub id: Uuid,
    pub name: String,
    /// The lowercased name the list orders by (the cursor carries it).
    pub sort_name: String,
    /// When the user last went offline, Unix ms.
    pub last_seen: Option<i64>,
    pub avatar_url: Option<String>,
}

fn list_row(r: &tokio_postgres::Row) -> UserListRow {
    UserListRow {
        id: r.get(0),
        name: r.get(1),
        sort_name: r.get(2),
        last_seen: r.get(3),
        avatar_url: r.get(4),
    }
}

/// Where a users-list page starts: after this (lowercased name, id).
pub type UserCursor<'a> = (&'a str, Uuid);

impl Store {
    /// Creates a user; false when the email (case-insensitively) is taken.
    pub async fn create_user(&self, user: &User, password_hash: &str) -> Result<bool, StoreError> {
        let inserted = self
            .client()
            .await?
            .execute(
                "INSERT INTO users (id, name, email, password_hash) VALUES ($1, $2, $3, $4)
                 ON CONFLICT ((lower(email))) DO NOTHING",
                &[&user.id, &user.name, &user.email, &password_hash],
            )
            .await?;
        Ok(inserted == 1)
    }

    /// The user with `email` (case-insensitively), their password hash and token version.
    pub async fn credentials(&self, email: &str) -> Result<Option<Credentials>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, name, email, avatar_url, password_hash, token_version FROM users
                 WHERE lower(email) = lower($1)",
                &[&email],
            )
            .await?;
        Ok(row.map(|row| Credentials {
            user: User::from_row(&row),
            password_hash: row.get(4),
            token_version: row.get(5),
        }))
    }

    /// The user with `id`.
    pub async fn user(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, name, email, avatar_url FROM users WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(User::from_row))
    }

    /// Whether a user with `id` exists.
    pub async fn user_exists(&self, id: Uuid) -> Result<bool, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT 1 FROM users WHERE id = $1", &[&id])
            .await?;
        Ok(row.is_some())
    }

    /// Changes a name (when given) and the avatar (when `avatar` is `Some`; `Some(None)` removes
    /// it); returns the user as stored.
    pub async fn update_profile(
        &self,
        id: Uuid,
        name: Option<&str>,
        avatar: Option<Option<&str>>,
    ) -> Result<User, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "UPDATE users SET
                     name = COALESCE($2, name),
                     avatar_url = CASE WHEN $3 THEN $4 ELSE avatar_url END
                 WHERE id = $1
                 RETURNING id, name, email, avatar_url",
                &[&id, &name, &avatar.is_some(), &avatar.flatten()],
            )
            .await?;
        Ok(User::from_row(&row))
    }

    /// The token floors of those of `ids` that exist (a missing id is a deleted or unknown
    /// user). Every request and handshake needs one; concurrent callers share this query
    /// (`gateway::lookups`), prepared once per pooled connection.
    pub async fn token_floors(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, TokenFloor>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, floor(extract(epoch FROM password_changed_at))::int8, token_version
                 FROM users WHERE id = ANY($1)",
            )
            .await?;
        let rows = client.query(&statement, &[&ids]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                let floor = TokenFloor {
                    changed_at: r.get(1),
                    version: r.get(2),
                };
                (r.get(0), floor)
            })
            .collect())
    }

    /// The token floors of those of `ids` whose password ever changed (the others' tokens are
    /// all good): what a node re-checks its connections against after it may have missed a
    /// revocation.
    pub async fn changed_token_floors(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, TokenFloor)>, StoreError> {
        let floors = self.token_floors(ids).await?;
        Ok(floors
            .into_iter()
            .filter(|(_, floor)| floor.changed_at.is_some())
            .collect())
    }

    /// Creates the user of an external identity unless it exists: `password_hash` is not a PHC
    /// string, so no password ever verifies against it.
    pub async fn provision_external_user(
        &self,
        id: Uuid,
        name: &str,
        email: &str,
        password_hash: &str,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO users (id, name, email, password_hash) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
                &[&id, &name, &email, &password_hash],
            )
            .await?;
        Ok(())
    }

    /// Records now as `last_seen` of every user in `ids` (who went offline), in one statement.
    pub async fn touch_last_seen_many(&self, ids: &[Uuid]) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "UPDATE users SET last_seen = now() WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(())
    }

    /// Users by name: those whose name matches the `ILIKE` `pattern` (when given), among the
    /// contacts of `contacts_of` (when given: the users who share a conversation with them),
    /// after `cursor`, at most `limit`.
    pub async fn list_users(
        &self,
        pattern: Option<&str>,
        contacts_of: Option<Uuid>,
        cursor: UserCursor<'_>,
        limit: i64,
    ) -> Result<Vec<UserListRow>, StoreError> {
        let client = self.client().await?;
        let rows = match contacts_of {
            // The contacts first (bounded by the viewer's conversations), then their names: a
            // viewer with few contacts never walks the whole users table.
            Some(viewer) => {
                client
                    .query(
                        "WITH contacts AS (
                             SELECT DISTINCT b.user_id FROM conversation_members a
                             JOIN conversation_members b ON b.conversation_id = a.conversation_id
                             WHERE a.user_id = $5 AND b.user_id <> $5)
                         SELECT u.id, u.name, lower(u.name),
                                (extract(epoch FROM u.last_seen) * 1000)::int8, u.avatar_url
                         FROM users u JOIN contacts c ON c.user_id = u.id
                         WHERE ($1::text IS NULL OR u.name ILIKE $1)
                           AND (lower(u.name), u.id) > ($2, $3)
                         ORDER BY lower(u.name), u.id
                         LIMIT $4",
                        &[&pattern, &cursor.0, &cursor.1, &limit, &viewer],
                    )
                    .await?
            }
            None => {
                client
                    .query(
                        "SELECT id, name, lower(name), (extract(epoch FROM last_seen) * 1000)::int8, avatar_url
                         FROM users
                         WHERE ($1::text IS NULL OR name ILIKE $1)
                           AND (lower(name), id) > ($2, $3)
                         ORDER BY lower(name), id
                         LIMIT $4",
                        &[&pattern, &cursor.0, &cursor.1, &limit],
                    )
                    .await?
            }
        };
        Ok(rows.iter().map(list_row).collect())
    }

    /// The user with this email (case-insensitive), for finding someone by their address.
    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserListRow>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, name, lower(name), (extract(epoch FROM last_seen) * 1000)::int8, avatar_url
                 FROM users WHERE lower(email) = lower($1)",
                &[&email],
            )
            .await?;
        Ok(row.as_ref().map(list_row))
    }

    /// Which of `ids` share a conversation (direct or room) with `viewer`.
    pub async fn contacts_among(
        &self,
        viewer: Uuid,
        ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT DISTINCT b.user_id FROM conversation_members a
                 JOIN conversation_members b ON b.conversation_id = a.conversation_id
                 WHERE a.user_id = $1 AND b.user_id = ANY($2)",
                &[&viewer, &ids],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// `last_seen` (Unix ms, null if never) of each of `ids` that exists.
    pub async fn last_seen(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Option<i64>>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, (extract(epoch FROM last_seen) * 1000)::int8 FROM users WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A versioned token is good until a change increments the version, whatever the second; a
    /// token without one only if issued in a later second than the change.
    #[test]
    fn token_floors_compare_versions_not_seconds() {
        let never = TokenFloor {
            changed_at: None,
            version: 0,
        };
        assert!(never.admits(100, Some(0)));
        assert!(never.admits(100, None));
        let changed = TokenFloor {
            changed_at: Some(100),
            version: 1,
        };
        assert!(
            !changed.admits(100, Some(0)),
            "same second, issued before the change"
        );
        assert!(
            !changed.admits(200, Some(0)),
            "a later second does not help an old version"
        );
        assert!(
            changed.admits(100, Some(1)),
            "same second, issued after the change"
        );
        assert!(
            !changed.admits(100, None),
            "unversioned, same second: may be older"
        );
        assert!(!changed.admits(99, None));
        assert!(changed.admits(101, None));
    }
}
