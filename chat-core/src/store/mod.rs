//! The SQL store: every statement the gateway and the worker run against Postgres, behind one
//! cloneable [`Store`] (a connection pool). Nothing outside this module holds SQL.
//!
//! One file per group of tables: [`users`], [`password_resets`], [`conversations`] (membership,
//! lists, read positions, the direct-conversation insert both binaries share), [`rooms`] (with
//! roles), [`blocks`], [`messages`] (history ranges and the worker's batch insert),
//! [`log_epochs`] (what the Redis log re-bases its counters against after a data loss), and
//! [`migrate`].

pub mod blocks;
pub mod conversations;
pub mod lock;
pub mod log_epochs;
pub mod messages;
pub mod migrate;
pub mod password_resets;
pub mod rooms;
pub mod users;

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::NoTls;

pub use blocks::{Blocked, Blocks};
pub use conversations::{Audience, ConversationRow, Member, Membership};
pub use rooms::{Block, Removal, RoomRefusal, RoomView};
pub use users::{Credentials, TokenFloor, User, UserListRow};

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

/// A statement failed. Cloned when one query answered many callers (`gateway::lookups`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Postgres is unreachable or failed transiently: retry later (clients get `unavailable`).
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// Postgres refused the data (an integrity violation or a data exception): retrying the
    /// same statement will not help.
    #[error("postgres rejected the data: {0}")]
    Rejected(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let text = describe(&e);
        match e.code() {
            // 22: data exception (e.g. invalid byte sequence), 23: integrity violation.
            Some(code) if code.code().starts_with("23") || code.code().starts_with("22") => {
                StoreError::Rejected(text)
            }
            _ => StoreError::Unavailable(text),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::Unavailable(describe_pool(&e))
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

/// How long one readiness probe may take.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// The Postgres store of one process: a pool whose connections open lazily, so building it
/// succeeds while Postgres is down.
#[derive(Clone)]
pub struct Store {
    pool: deadpool_postgres::Pool,
}

impl Store {
    /// A store on `url` with at most `max_size` connections.
    pub fn connect(url: &str, max_size: usize) -> Result<Store, DbError> {
        let mut cfg =
            tokio_postgres::Config::from_str(url).map_err(|e| DbError::Url(e.to_string()))?;
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
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(max_size)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Pool(e.to_string()))?;
        Ok(Store { pool })
    }

    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        Ok(self.pool.get().await?)
    }
}

#[async_trait::async_trait]
impl crate::admin::Probe for Store {
    fn name(&self) -> &'static str {
        "postgres"
    }

    /// Whether Postgres answers a trivial query within a second.
    async fn ready(&self) -> bool {
        let probe = async {
            let client = self.pool.get().await.ok()?;
            client.simple_query("SELECT 1").await.ok()
        };
        matches!(tokio::time::timeout(PING_TIMEOUT, probe).await, Ok(Some(_)))
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    /// A rejected row is described by message, SQLSTATE and constraint, without the row's values
    /// (which would put message bodies in logs); pooled connections carry the statement timeout.
    #[tokio::test]
    async fn describe_names_the_constraint_not_the_row() {
        let url = crate::testing::fresh_database().await;
        let store = super::Store::connect(&url, 1).expect("store");
        let client = store.client().await.expect("client");
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
        assert!(matches!(
            super::StoreError::from(err),
            super::StoreError::Rejected(_)
        ));
    }
}
