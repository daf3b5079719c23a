//! Failure notifications as JSON POSTs to a webhook (`http://` or `https://`). A webhook's
//! path and query are often a secret (a token the receiver checks), so logs and errors show
//! only its scheme and host.

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
    /// A notifier for `url`, trusting `tls`'s CA besides the system's roots. An error never
    /// repeats the URL.
    pub(crate) fn new(url: &str, tls: &TlsSettings) -> Result<WebhookNotifier, String> {
        let shown = scheme_and_host(url)?;
        let http = HttpClient::new(url, tls, TIMEOUT).map_err(|e| e.replace(url, &shown))?.showing(shown);
        Ok(WebhookNotifier { http, in_flight: Semaphore::new(MAX_IN_FLIGHT) })
    }

    /// The webhook as logs show it: its scheme and host.
    pub(crate) fn shown(&self) -> &str {
        self.http.shown()
    }
}

/// `scheme://host[:port]` of an `http://` or `https://` URL, with no user, path or query.
fn scheme_and_host(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("the webhook is not a URL: {e}"))?;
    let scheme = parsed.scheme();
    let host = match parsed.host_str() {
        Some(host) if matches!(scheme, "http" | "https") => host,
        _ => return Err(format!("the webhook is not an http:// or https:// address (scheme {scheme:?})")),
    };
    Ok(match parsed.port() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
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
        Err(format!("notification webhook {}: {last}", self.http.shown()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_show_only_scheme_and_host() {
        let check = |url: &str, shown: &str| assert_eq!(scheme_and_host(url).unwrap(), shown, "{url}");
        check("https://hooks.example.com/services/T0/B0/s3cr3t", "https://hooks.example.com");
        check("http://user:pw@10.0.0.7:8080/hook?token=s3cr3t#x", "http://10.0.0.7:8080");
        check("https://[::1]:9443/h", "https://[::1]:9443");
        check("HTTPS://Hooks.Example.com:443/p", "https://hooks.example.com");
        for bad in ["ftp://h/s3cr3t", "hooks.example.com/s3cr3t", "http://:s3cr3t@/", "mailto:s3cr3t@x"] {
            let err = scheme_and_host(bad).unwrap_err();
            assert!(!err.contains("s3cr3t"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_failed_post_names_only_scheme_and_host() {
        crate::client::install_crypto_provider();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/hook/s3cr3t?token=t0k3n");
        let notifier = WebhookNotifier::new(&url, &TlsSettings::default()).unwrap();
        assert_eq!(notifier.shown(), format!("http://127.0.0.1:{port}"));
        let err = notifier.http.request("POST", "", Some(b"{}"), None).await.unwrap_err();
        assert!(err.contains(&format!("http://127.0.0.1:{port}")), "{err}");
        assert!(!err.contains("s3cr3t") && !err.contains("t0k3n"), "{err}");
    }
}
