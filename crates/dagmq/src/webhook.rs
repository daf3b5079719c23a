//! Failure notifications as JSON POSTs to a webhook (`http://` or `https://`).

use std::time::Duration;

use async_trait::async_trait;
use dagmq_core::TlsSettings;
use dagmq_scheduler::{Notification, Notifier};
use tokio::sync::Semaphore;

use crate::client::HttpClient;

/// Longest one POST may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Tries per notification.
const TRIES: u32 = 3;

/// Wait before the second try; doubled before each later one.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Most POSTs in flight at once; a burst of failures waits its turn rather than opening a
/// connection per notification.
const MAX_IN_FLIGHT: usize = 8;

/// POSTs each notification to one URL, retrying a failed POST with backoff.
pub(crate) struct WebhookNotifier {
    /// The webhook.
    http: HttpClient,
    /// Bounds the POSTs in flight.
    in_flight: Semaphore,
}

impl WebhookNotifier {
    /// A notifier for `url`, trusting `tls`'s CA besides the system's roots.
    pub(crate) fn new(url: &str, tls: &TlsSettings) -> Result<WebhookNotifier, String> {
        Ok(WebhookNotifier { http: HttpClient::new(url, tls, TIMEOUT)?, in_flight: Semaphore::new(MAX_IN_FLIGHT) })
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    /// Up to three tries, 1 s then 2 s apart. A 4xx answer other than 408 and 429 says the
    /// webhook will never take this body, so it is not retried.
    async fn notify(&self, notification: &Notification) -> Result<(), String> {
        let body = serde_json::to_vec(notification).map_err(|e| e.to_string())?;
        let _permit = self.in_flight.acquire().await.map_err(|e| e.to_string())?;
        let mut wait = FIRST_BACKOFF;
        let mut last = String::new();
        for attempt in 1..=TRIES {
            match self.http.request("POST", "", Some(&body), None).await {
                Ok(response) if (200..300).contains(&response.status) => return Ok(()),
                Ok(response) => {
                    last = format!("the webhook answered HTTP {}", response.status);
                    if (400..500).contains(&response.status) && !matches!(response.status, 408 | 429) {
                        break;
                    }
                }
                Err(err) => last = err,
            }
            if attempt < TRIES {
                tracing::warn!(attempt, "notification webhook: {last}; trying again in {wait:?}");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
        Err(format!("notification webhook {}: {last}", self.http.base()))
    }
}
