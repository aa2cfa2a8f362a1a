//! Where password reset tokens go: a webhook in production, a log line in dev mode, or nowhere.

use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

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
