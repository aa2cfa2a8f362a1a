//! Password reset requests, off the request path: the handler only queues the email, and a
//! worker looks it up, stores a token and hands it on (a webhook in production, a log line in dev
//! mode, or nowhere), so the answer takes the same time whether or not the email has an account.

use std::sync::Arc;
use std::time::Duration;

use chat_core::store::Store;
use futures_util::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Requests waiting for the worker, at most; beyond, a request is dropped (and counted).
const QUEUE: usize = 1024;
/// Requests the worker handles at once (each a lookup, an insert and a webhook call).
const CONCURRENCY: usize = 8;
/// Reset tokens are 32 random bytes, sent as 64 hex characters.
pub const TOKEN_BYTES: usize = 32;

/// A reset token's stored form.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn new_token() -> String {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The request handler's side: queues an email without waiting.
pub struct ResetRequests {
    queue: mpsc::Sender<String>,
    /// Requests by outcome: `queued`, `dropped` (the queue was full).
    outcomes: prometheus::IntCounterVec,
}

impl ResetRequests {
    /// Queues a reset for `email`; never waits. A full queue drops it (the user may ask again).
    pub fn submit(&self, email: String) {
        let outcome = match self.queue.try_send(email) {
            Ok(()) => "queued",
            Err(_) => {
                tracing::warn!("password reset request dropped: the queue is full");
                "dropped"
            }
        };
        self.outcomes.with_label_values(&[outcome]).inc();
    }
}

/// The worker's side: handles queued requests until shutdown.
pub struct ResetWorker {
    queue: mpsc::Receiver<String>,
    store: Store,
    notifier: Arc<Notifier>,
    ttl_secs: u64,
}

/// A queue of reset requests and the worker that drains it.
pub fn reset_requests(
    store: Store,
    notifier: Notifier,
    ttl_secs: u64,
    outcomes: prometheus::IntCounterVec,
) -> (ResetRequests, ResetWorker) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (
        ResetRequests {
            queue: tx,
            outcomes,
        },
        ResetWorker {
            queue: rx,
            store,
            notifier: Arc::new(notifier),
            ttl_secs,
        },
    )
}

impl ResetWorker {
    /// Handles requests, a few at once, until `shutdown`; requests still queued then are
    /// dropped (their users may ask again).
    pub async fn run(self, shutdown: CancellationToken) {
        let ResetWorker {
            queue,
            store,
            notifier,
            ttl_secs,
        } = self;
        let requests = futures_util::stream::unfold(queue, |mut q| async move {
            q.recv().await.map(|email| (email, q))
        });
        let work = requests.for_each_concurrent(CONCURRENCY, |email| {
            let (store, notifier) = (store.clone(), notifier.clone());
            async move {
                if let Err(e) = handle(&store, &notifier, ttl_secs, &email).await {
                    tracing::warn!(error = %e, "password reset request failed");
                }
            }
        });
        tokio::select! {
            _ = work => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// One request: nothing for an unknown email; otherwise a token stored (hashed) and sent.
async fn handle(
    store: &Store,
    notifier: &Notifier,
    ttl_secs: u64,
    email: &str,
) -> Result<(), chat_core::store::StoreError> {
    let Some(target) = store.reset_target(email).await? else {
        return Ok(());
    };
    let token = new_token();
    let ttl = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
    let expires_at = store
        .create_reset(&hash_token(&token), target.user_id, ttl)
        .await?;
    notifier
        .notify(&ResetNotice {
            kind: "password_reset",
            user_id: target.user_id,
            email: &target.email,
            name: &target.name,
            token: &token,
            expires_at,
        })
        .await;
    Ok(())
}

/// Longest a webhook call may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where reset tokens go.
pub enum Notifier {
    /// POST the [`ResetNotice`] as JSON to this URL.
    Webhook {
        url: String,
        client: reqwest::Client,
    },
    /// Dev mode only: log the token (it is a secret; never in production).
    DevLog,
    /// No notifier: requests are accepted and logged without the token, and nobody can reset.
    Disabled,
}

impl Notifier {
    pub fn from_config(webhook_url: Option<&str>, dev_mode: bool) -> Result<Self, reqwest::Error> {
        Ok(match webhook_url.filter(|u| !u.is_empty()) {
            Some(url) => Notifier::Webhook {
                url: url.to_string(),
                client: reqwest::Client::builder()
                    .timeout(WEBHOOK_TIMEOUT)
                    .build()?,
            },
            None if dev_mode => Notifier::DevLog,
            None => Notifier::Disabled,
        })
    }
}

/// The webhook's JSON body (documented in `docs/operations.md`).
#[derive(Debug, Serialize)]
pub struct ResetNotice<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub user_id: Uuid,
    pub email: &'a str,
    pub name: &'a str,
    pub token: &'a str,
    /// Unix seconds.
    pub expires_at: i64,
}

impl Notifier {
    /// Hands `notice` on. The user learns nothing either way; the operator sees failures in
    /// the logs.
    pub async fn notify(&self, notice: &ResetNotice<'_>) {
        let user_id = notice.user_id;
        match self {
            Notifier::Webhook { url, client } => match client.post(url).json(notice).send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(%user_id, "password reset notice sent")
                }
                Ok(r) => tracing::warn!(%user_id, status = %r.status(), "reset webhook refused"),
                Err(e) => tracing::warn!(%user_id, error = %e, "reset webhook failed"),
            },
            Notifier::DevLog => {
                tracing::warn!(%user_id, token = %notice.token, "dev mode: password reset token (never logged outside dev mode)")
            }
            Notifier::Disabled => {
                tracing::warn!(%user_id, "password reset requested but no notifier is configured")
            }
        }
    }
}
