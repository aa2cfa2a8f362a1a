//! Users: accounts, profiles, the token floor a password change sets, `last_seen`, the users list.

use std::collections::HashMap;

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

    /// The user with `email` (case-insensitively) and their password hash.
    pub async fn credentials(&self, email: &str) -> Result<Option<(User, String)>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, name, email, avatar_url, password_hash FROM users
                 WHERE lower(email) = lower($1)",
                &[&email],
            )
            .await?;
        Ok(row.map(|row| (User::from_row(&row), row.get(4))))
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

    /// The token floor of a user: `None` when the user does not exist, `Some(None)` when their
    /// password never changed, `Some(Some(t))` when tokens issued before Unix second `t` are void.
    pub async fn token_floor(&self, id: Uuid) -> Result<Option<Option<i64>>, StoreError> {
        let client = self.client().await?;
        // Every request and handshake runs this: prepared once per pooled connection, it is one
        // round trip instead of two (parse, then execute).
        let statement = client
            .prepare_cached(
                "SELECT floor(extract(epoch FROM password_changed_at))::int8 FROM users WHERE id = $1",
            )
            .await?;
        let row = client.query_opt(&statement, &[&id]).await?;
        Ok(row.map(|r| r.get(0)))
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

    /// Records that the user went offline now.
    pub async fn touch_last_seen(&self, id: Uuid) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("UPDATE users SET last_seen = now() WHERE id = $1", &[&id])
            .await?;
        Ok(())
    }

    /// Users by name: those whose name matches the `ILIKE` `pattern` (when given) and whose id
    /// is in `only` (when given), after `cursor`, at most `limit`.
    pub async fn list_users(
        &self,
        pattern: Option<&str>,
        only: Option<&[Uuid]>,
        cursor: UserCursor<'_>,
        limit: i64,
    ) -> Result<Vec<UserListRow>, StoreError> {
        let only: Option<Vec<Uuid>> = only.map(<[Uuid]>::to_vec);
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, name, lower(name), (extract(epoch FROM last_seen) * 1000)::int8, avatar_url
                 FROM users
                 WHERE ($1::text IS NULL OR name ILIKE $1)
                   AND ($2::uuid[] IS NULL OR id = ANY($2))
                   AND (lower(name), id) > ($3, $4)
                 ORDER BY lower(name), id
                 LIMIT $5",
                &[&pattern, &only, &cursor.0, &cursor.1, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| UserListRow {
                id: r.get(0),
                name: r.get(1),
                sort_name: r.get(2),
                last_seen: r.get(3),
                avatar_url: r.get(4),
            })
            .collect())
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
