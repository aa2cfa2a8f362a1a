//! Postgres: the connection pool and the versioned migrations both binaries apply at start.

use std::str::FromStr;

use tokio_postgres::NoTls;

/// The migrations, in order. Never edit one that has shipped; add a new file.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "conversations",
        include_str!("../migrations/0002_conversations.sql"),
    ),
    (
        3,
        "accounts",
        include_str!("../migrations/0003_accounts.sql"),
    ),
];

/// Arbitrary constant key for the migration advisory lock.
const MIGRATION_LOCK_KEY: i64 = 0x6368_6174_6d69_6772; // "chatmigr"

/// A database problem at start-up.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database url: {0}")]
    Url(String),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("postgres pool: {0}")]
    Pool(String),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Postgres(describe(&e))
    }
}

/// The server's own words for an error (`tokio_postgres::Error` displays only "db error"):
/// message, SQLSTATE and constraint. Never the detail: for some errors it quotes the failing row,
/// message body included, and this text is logged and stored in dead letters.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.constraint() {
            Some(constraint) => format!(
                "{} ({}, constraint {constraint})",
                db.message(),
                db.code().code()
            ),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => e.to_string(),
    }
}

/// [`describe`] for a pool error, which wraps the Postgres error when connecting failed.
pub fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(pg) => describe(pg),
        other => other.to_string(),
    }
}

/// Longest any pooled query may run: a query that never answers must not hold a request, a
/// batch or a shutdown forever. Migrations use their own connection and are not bounded.
const STATEMENT_TIMEOUT_MS: u32 = 30_000;

/// Builds a pool. Connections open lazily, so this succeeds while Postgres is down.
pub fn pool(url: &str, max_size: usize) -> Result<deadpool_postgres::Pool, DbError> {
    let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| DbError::Url(e.to_string()))?;
    let options = format!(
        "{} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
        cfg.get_options().unwrap_or_default()
    );
    cfg.options(options.trim_start());
    let manager = deadpool_postgres::Manager::from_config(
        cfg,
        NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(max_size)
        .wait_timeout(Some(std::time::Duration::from_secs(5)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Applies migrations, retrying with backoff while Postgres is unreachable or refuses them.
/// Returns false if `shutdown` came first.
pub async fn migrate_until_done(url: &str, shutdown: &tokio_util::sync::CancellationToken) -> bool {
    let mut backoff = crate::backoff::Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(10),
    );
    loop {
        // Dropping an attempt closes its session: Postgres rolls back the migration in progress
        // and releases the advisory lock, so shutdown need not wait for it.
        let attempt = tokio::select! {
            r = migrate(url) => r,
            _ = shutdown.cancelled() => return false,
        };
        match attempt {
            Ok(_) => return true,
            Err(e) => tracing::warn!(error = %e, "migrations not applied yet; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => return false,
        }
    }
}

/// Applies every migration not yet applied. Safe when several processes start at once: they
/// serialize on an advisory lock held by a dedicated session, which ends (and releases the lock)
/// whatever happens.
pub async fn migrate(url: &str) -> Result<Vec<i32>, DbError> {
    let mut config =
        tokio_postgres::Config::from_str(url).map_err(|e| DbError::Url(e.to_string()))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(5));
    }
    let (mut client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "migration connection ended");
        }
    });
    let result = apply(&mut client).await;
    drop(client);
    let _ = driver.await;
    result
}

async fn apply(client: &mut tokio_postgres::Client) -> Result<Vec<i32>, DbError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let done: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "migration applied");
        applied.push(*version);
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    Ok(applied)
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    /// A rejected row is described by message, SQLSTATE and constraint, without the row's values
    /// (which would put message bodies in logs); pooled connections carry the statement timeout.
    #[tokio::test]
    async fn describe_names_the_constraint_not_the_row() {
        let url = crate::testing::fresh_database().await;
        let pool = super::pool(&url, 1).expect("pool");
        let client = pool.get().await.expect("client");
        let timeout: String = client
            .query_one("SHOW statement_timeout", &[])
            .await
            .expect("show")
            .get(0);
        assert_eq!(timeout, "30s");
        client
            .execute(
                "CREATE TABLE t (id int PRIMARY KEY, body text NOT NULL CHECK (body <> 'secret body'))",
                &[],
            )
            .await
            .expect("create");
        let err = client
            .execute("INSERT INTO t VALUES (1, 'secret body')", &[])
            .await
            .expect_err("check violation");
        let text = super::describe(&err);
        assert!(
            text.contains("23514") && text.contains("t_body_check"),
            "{text}"
        );
        assert!(
            !text.contains("secret body"),
            "the row must not be quoted: {text}"
        );
    }
}
