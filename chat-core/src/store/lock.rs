//! Which kind of gateway owns a database: a session-level advisory lock, held on a connection
//! of its own for the life of the process. A one-process gateway (`CHAT_BACKEND=memory`) holds it
//! exclusively, gateways on Redis hold it shared; so a second one-process gateway, or a Redis
//! gateway beside a one-process one, cannot start on the same database. If the connection
//! drops, the lock is taken again (readiness reports `backend_lock` until it is).

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::{describe, DbError};
use crate::backoff::Backoff;

/// Arbitrary constant key of the backend lock ("chatbknd").
const BACKEND_LOCK_KEY: i64 = 0x6368_6174_626b_6e64;

/// How a gateway holds the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Alone: the one-process gateway.
    Exclusive,
    /// Beside other gateways on Redis.
    Shared,
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// Another gateway holds it in a way that excludes this one.
    #[error("the database is in use by {0}")]
    Held(&'static str),
}

/// An open session holding the lock.
struct Session {
    _client: tokio_postgres::Client,
    driver: JoinHandle<()>,
}

/// Connects and tries the lock once.
async fn try_lock(url: &str, mode: LockMode) -> Result<Option<Session>, DbError> {
    let mut config =
        tokio_postgres::Config::from_str(url).map_err(|e| DbError::Url(e.to_string()))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    let (client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "backend lock connection ended");
        }
    });
    let sql = match mode {
        LockMode::Exclusive => "SELECT pg_try_advisory_lock($1)",
        LockMode::Shared => "SELECT pg_try_advisory_lock_shared($1)",
    };
    let taken: bool = client
        .query_one(sql, &[&BACKEND_LOCK_KEY])
        .await
        .map_err(|e| DbError::Postgres(describe(&e)))?
        .get(0);
    Ok(taken.then_some(Session {
        _client: client,
        driver,
    }))
}

/// The lock, held until dropped or until `shutdown`.
pub struct BackendLock {
    held: Arc<AtomicBool>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl BackendLock {
    /// Takes the lock or says who holds it; then keeps it, taking it again after a lost
    /// connection, until `shutdown`.
    pub async fn take(
        url: &str,
        mode: LockMode,
        shutdown: CancellationToken,
    ) -> Result<BackendLock, LockError> {
        let Some(session) = try_lock(url, mode).await? else {
            return Err(LockError::Held(match mode {
                LockMode::Exclusive => {
                    "other gateways (a one-process gateway, CHAT_BACKEND=memory, must be the only one)"
                }
                LockMode::Shared => "a one-process gateway (CHAT_BACKEND=memory)",
            }));
        };
        let held = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(keep(url.to_string(), mode, session, held.clone(), shutdown));
        Ok(BackendLock {
            held,
            task: std::sync::Mutex::new(Some(task)),
        })
    }

    /// Waits for the keeper to end (after shutdown), which releases the lock.
    pub async fn release(&self) {
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn keep(
    url: String,
    mode: LockMode,
    mut session: Session,
    held: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = &mut session.driver => {}
            _ = shutdown.cancelled() => return,
        }
        held.store(false, Ordering::Relaxed);
        tracing::error!("backend lock lost with its connection; taking it again");
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.cancelled() => return,
            }
            match try_lock(&url, mode).await {
                Ok(Some(again)) => {
                    session = again;
                    held.store(true, Ordering::Relaxed);
                    backoff.reset();
                    tracing::info!("backend lock taken again");
                    break;
                }
                Ok(None) => tracing::error!("backend lock held by another gateway"),
                Err(e) => tracing::warn!(error = %e, "backend lock not taken yet"),
            }
        }
    }
}

#[async_trait::async_trait]
impl crate::admin::Probe for BackendLock {
    fn name(&self) -> &'static str {
        "backend_lock"
    }

    async fn ready(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;

    /// One exclusive holder, or any number of shared ones, never both; a released lock can be
    /// taken again. Per database.
    #[tokio::test]
    async fn exclusive_and_shared_exclude_each_other() {
        let url = crate::testing::fresh_database().await;
        let other_db = crate::testing::fresh_database().await;
        let stop = CancellationToken::new();
        let alone = BackendLock::take(&url, LockMode::Exclusive, stop.clone())
            .await
            .expect("first exclusive");
        assert!(matches!(
            BackendLock::take(&url, LockMode::Exclusive, stop.clone()).await,
            Err(LockError::Held(_))
        ));
        assert!(matches!(
            BackendLock::take(&url, LockMode::Shared, stop.clone()).await,
            Err(LockError::Held(_))
        ));
        let elsewhere = BackendLock::take(&other_db, LockMode::Exclusive, stop.clone())
            .await
            .expect("another database is another lock");
        stop.cancel();
        alone.release().await;
        elsewhere.release().await;
        let stop = CancellationToken::new();
        let a = BackendLock::take(&url, LockMode::Shared, stop.clone())
            .await
            .expect("shared after release");
        let b = BackendLock::take(&url, LockMode::Shared, stop.clone())
            .await
            .expect("shared twice");
        assert!(matches!(
            BackendLock::take(&url, LockMode::Exclusive, stop.clone()).await,
            Err(LockError::Held(_))
        ));
        stop.cancel();
        a.release().await;
        b.release().await;
    }
}
