//! The versioned migrations both binaries apply at start, serialized by an advisory lock.

use std::str::FromStr;

use tokio_postgres::NoTls;

use super::DbError;

/// The migrations, in order. Never edit one that has shipped; add a new file.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "conversations",
        include_str!("../../migrations/0002_conversations.sql"),
    ),
    (
        3,
        "accounts",
        include_str!("../../migrations/0003_accounts.sql"),
    ),
    (
        4,
        "log_epochs",
        include_str!("../../migrations/0004_log_epochs.sql"),
    ),
    (
        5,
        "token_version",
        include_str!("../../migrations/0005_token_version.sql"),
    ),
    (
        6,
        "room_roles",
        include_str!("../../migrations/0006_room_roles.sql"),
    ),
    (
        7,
        "messages_without_foreign_keys",
        include_str!("../../migrations/0007_messages_without_foreign_keys.sql"),
    ),
];

/// Arbitrary constant key for the migration advisory lock.
const MIGRATION_LOCK_KEY: i64 = 0x6368_6174_6d69_6772; // "chatmigr"

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
