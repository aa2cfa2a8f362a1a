//! Users for a run: ids, tokens minted with the deployment's JWT secret, and rows seeded straight
//! into Postgres (registering thousands of users through argon2id would measure argon2id).

use anyhow::Context;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;
use uuid::Uuid;

#[derive(Serialize)]
struct Claims {
    sub: Uuid,
    iat: u64,
    exp: u64,
}

/// Mints HS256 tokens the gateway (and the reference stack) accept.
pub struct TokenMint {
    key: EncodingKey,
}

impl TokenMint {
    pub fn new(secret: &str) -> Self {
        TokenMint {
            key: EncodingKey::from_secret(secret.as_bytes()),
        }
    }

    /// A token for `user` valid for a day.
    pub fn token(&self, user: Uuid) -> anyhow::Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("clock before 1970")?
            .as_secs();
        let claims = Claims {
            sub: user,
            iat: now,
            exp: now + 86_400,
        };
        jsonwebtoken::encode(&Header::default(), &claims, &self.key).context("signing a token")
    }
}

/// `count` new user ids.
pub fn new_users(count: usize) -> Vec<Uuid> {
    (0..count).map(|_| Uuid::now_v7()).collect()
}

/// Inserts `users` into the gateway's database, in one statement per 10,000.
pub async fn seed_users(database_url: &str, users: &[Uuid]) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .with_context(|| "connecting to Postgres to seed users")?;
    let driver = tokio::spawn(connection);
    for chunk in users.chunks(10_000) {
        let names: Vec<String> = chunk
            .iter()
            .map(|u| format!("load {}", u.simple()))
            .collect();
        let emails: Vec<String> = chunk
            .iter()
            .map(|u| format!("{}@load.test", u.simple()))
            .collect();
        client
            .execute(
                "INSERT INTO users (id, name, email, password_hash)
                 SELECT id, name, email, 'seeded-no-login'
                 FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS t (id, name, email)",
                &[&chunk, &names, &emails],
            )
            .await
            .context("inserting seeded users")?;
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}
