//! Failure notifications as JSON POSTs to a webhook.

use async_trait::async_trait;
use dagmq_scheduler::{Notification, Notifier};

use crate::client::{HttpUrl, request};

/// POSTs each notification to one URL; failures are logged, never retried.
pub(crate) struct WebhookNotifier {
    /// Where.
    url: HttpUrl,
}

impl WebhookNotifier {
    /// A notifier for `url` (http:// only).
    pub(crate) fn new(url: &str) -> Result<WebhookNotifier, String> {
        Ok(WebhookNotifier { url: HttpUrl::parse(url)? })
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn notify(&self, notification: &Notification) {
        let body = serde_json::to_vec(notification).unwrap_or_default();
        match request(&self.url, "POST", "", Some(&body), None).await {
            Ok(response) if (200..300).contains(&response.status) => {}
            Ok(response) => tracing::warn!(status = response.status, "notification webhook refused the notification"),
            Err(err) => tracing::warn!("notification webhook: {err}"),
        }
    }
}
