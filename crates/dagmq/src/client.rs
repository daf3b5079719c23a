//! The HTTP client of the CLI and the webhook notifier: `http://` and `https://` (reqwest over
//! rustls), JSON bodies, the system's trust roots plus `--tls-ca`, and a client certificate
//! with `--tls-cert`/`--tls-key`.

use std::time::Duration;

use dagmq_core::TlsSettings;

/// Largest response read, in bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Makes ring the process's TLS crypto provider (the one every client here is built with).
/// Calling it again does nothing.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err only when a provider is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client for one base address, such as `https://dagmq.example.com:9191/prefix`.
#[derive(Debug, Clone)]
pub struct HttpClient {
    /// The connection pool and TLS configuration.
    client: reqwest::Client,
    /// The base address, without a trailing slash.
    base: String,
    /// The base address as errors show it: with its password masked, or less (see
    /// [`HttpClient::showing`]).
    shown: String,
}

/// A response: status, the dagmq API's header and body.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// The value of [`dagmq_scheduler::api::API_HEADER`], which every answer of a dagmq API has.
    pub api_version: Option<String>,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpClient {
    /// A client for `base` (`http://` or `https://`) whose every request gives up after
    /// `timeout`.
    pub fn new(base: &str, tls: &TlsSettings, timeout: Duration) -> Result<HttpClient, String> {
        let shown = dagmq_core::mask_url(base.trim_end_matches('/'));
        let parsed = reqwest::Url::parse(base).map_err(|e| format!("{shown:?} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!("{shown:?} is not an http:// or https:// address"));
        }
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &tls.ca_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| format!("--tls-ca: {}", chain(&e)))?;
            builder = builder.tls_certs_merge(roots);
        }
        if let Some(client) = &tls.client {
            let mut pem = client.cert_pem.clone();
            pem.push(b'\n');
            pem.extend_from_slice(&client.key_pem);
            let identity =
                reqwest::Identity::from_pem(&pem).map_err(|e| format!("--tls-cert/--tls-key: {}", chain(&e)))?;
            builder = builder.identity(identity);
        }
        let client = builder.build().map_err(|e| format!("cannot set up the HTTP client: {}", chain(&e)))?;
        Ok(HttpClient { client, base: base.trim_end_matches('/').to_string(), shown })
    }

    /// The same client, naming its base address `shown` in errors (a webhook's scheme and host,
    /// where its path is a secret).
    pub fn showing(mut self, shown: String) -> HttpClient {
        self.shown = shown;
        self
    }

    /// The reqwest client itself (its TLS set up), for a protocol client of its own.
    pub fn inner(&self) -> &reqwest::Client {
        &self.client
    }

    /// The base address.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The base address as errors show it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Sends one request to the base address followed by `path`, with a JSON body and a bearer
    /// token where given, and reads the whole response.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Result<HttpResponse, String> {
        let target = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| format!("bad method {method:?}"))?;
        let mut request = self.client.request(method.clone(), &target).header("accept", "application/json");
        let target = format!("{}{path}", self.shown);
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_vec());
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let fail = |e: reqwest::Error| {
            // reqwest's own text repeats the URL; the causes say what went wrong.
            let mut cause = std::error::Error::source(&e).map_or_else(|| e.to_string(), chain);
            if cause.contains("InvalidContentType") && self.base.starts_with("https://") {
                cause.push_str(" (the server does not answer in TLS: is it a plain http:// address?)");
            }
            if e.is_connect() {
                format!("cannot connect to {} ({method} {target}): {cause}", self.shown)
            } else if e.is_timeout() {
                format!("{method} {target}: no answer within the timeout")
            } else {
                format!("{method} {target}: {cause}")
            }
        };
        let mut response = request.send().await.map_err(fail)?;
        let status = response.status().as_u16();
        let api_version = response
            .headers()
            .get(dagmq_scheduler::api::API_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(fail)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(format!("{method} {target}: the answer is larger than {MAX_RESPONSE_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse { status, api_version, body })
    }
}

/// An error with its causes, `outer: inner: innermost`, so that a TLS failure says why (an
/// unknown issuer, a name that does not match) rather than only "error sending request".
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_http() {
        let tls = TlsSettings::default();
        let timeout = Duration::from_secs(1);
        assert!(HttpClient::new("ftp://x", &tls, timeout).unwrap_err().contains("not an http:// or https://"));
        assert!(HttpClient::new("127.0.0.1:9191", &tls, timeout).is_err());
        assert!(HttpClient::new("http://x:notaport", &tls, timeout).unwrap_err().contains("not a URL"));
        assert_eq!(
            HttpClient::new("https://hooks.local/a/b/", &tls, timeout).unwrap().base(),
            "https://hooks.local/a/b"
        );
        let bad_ca = TlsSettings {
            ca_pem: Some(b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n".to_vec()),
            client: None,
        };
        assert!(HttpClient::new("https://x", &bad_ca, timeout).unwrap_err().contains("--tls-ca"));
    }
}
