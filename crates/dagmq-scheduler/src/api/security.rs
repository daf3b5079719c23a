//! What keeps other sites and callers without the token out: the cross-site checks on every
//! request (`Host`, `Origin`, content type), the bearer token of `/api` and of `/metrics`, and
//! the headers that keep the UI out of other sites' frames and its page to its own scripts.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiResult, AppState};

/// The page's policy: scripts, styles, images and API calls from the API's own origin only; no
/// plugins, no `<base>` or form posts elsewhere, and no framing by any page. Styles may be
/// inline (the UI colours and sizes elements with `style` attributes): with images and
/// connections limited to the API's origin, an injected style could not send anything away.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The header every answer of the API carries, with the API's version (`v1`), so that a client
/// can tell the API from another server that answers at the same address (the CLI names such an
/// `--api` as not dagmq's).
pub const API_HEADER: &str = "dagmq-api";

/// Adds to every answer the headers that keep it out of other sites' frames (clickjacking: a
/// page that frames the UI under a decoy could make a click restart a run) and hold the UI to
/// [`CONTENT_SECURITY_POLICY`], and [`API_HEADER`].
pub(super) async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(API_HEADER, HeaderValue::from_static("v1"));
    response
}

/// Refuses what a web page on another site could make a browser send (the API uses no cookies,
/// but without a token a page could still reach the API):
/// - a `Host` that is not a loopback name, an IP address or an allowed host (names compared
///   without regard to case), when hosts are checked (DNS rebinding): 403. An IP address is never rebound: a page can only reach the
///   API under an address by being served from that very address;
/// - a state-changing request whose `Origin` is neither the API's own origin nor an allowed
///   origin: 403;
/// - a state-changing request with a body that is not `application/json` (a form or a
///   `text/plain` fetch needs no preflight): 415.
///
/// Requests without `Origin` (the CLI, curl, other programs) pass the origin check.
pub(super) async fn refuse_cross_site(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if let Some(refusal) = host_refusal(host, state.config.allowed_hosts.as_deref()) {
        return refuse(&request, StatusCode::FORBIDDEN, refusal);
    }
    if !matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS) {
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let own = [format!("http://{host}"), format!("https://{host}")];
            // Scheme and host are case-insensitive; browsers send them in lower case.
            let same = |o: &String| o.eq_ignore_ascii_case(origin);
            if !own.iter().any(same) && !state.config.allowed_origins.iter().any(same) {
                return refuse(
                    &request,
                    StatusCode::FORBIDDEN,
                    format!("origin {origin:?} may not send commands to this API (see --allowed-origin)"),
                );
            }
        }
        let has_body =
            headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() != "0")
                || headers.contains_key(header::TRANSFER_ENCODING);
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")));
        if has_body && !json {
            return refuse(
                &request,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "a request body must be application/json".to_string(),
            );
        }
    }
    next.run(request).await
}

/// Why a request with `Host` header `host` is refused when hosts are checked (`allowed` is
/// `Some`): it is not a loopback name, an IP address or an allowed host (names compared without
/// regard to case). A request without `Host` (HTTP/1.0, probes) comes from no browser and passes.
pub(super) fn host_refusal(host: &str, allowed: Option<&[String]>) -> Option<String> {
    let allowed = allowed?;
    let name = host_name(host);
    let passes = host.is_empty()
        || ["127.0.0.1", "localhost", "::1", "[::1]"].iter().any(|l| l.eq_ignore_ascii_case(name))
        || is_ip_address(name)
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(name));
    (!passes).then(|| {
        format!(
            "host {host:?} is not this API's (allowed: loopback names, IP addresses{}; see --allowed-host)",
            if allowed.is_empty() { String::new() } else { format!(", {}", allowed.join(", ")) }
        )
    })
}

/// Logs a refused request (an attempt from a web page, most likely) and answers it.
fn refuse(request: &Request, status: StatusCode, message: String) -> Response {
    tracing::warn!(method = %request.method(), path = %request.uri().path(), "refused a cross-site request: {message}");
    ApiError(status, message).into_response()
}

/// The name part of a `Host` header (`[::1]:9191` -> `[::1]`, `a:80` -> `a`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Whether a `Host` name is an IPv4 address or a bracketed IPv6 address.
fn is_ip_address(name: &str) -> bool {
    let bare = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    bare.parse::<std::net::IpAddr>().is_ok()
}

/// Checks the bearer token in constant time when one is configured.
pub(super) async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.config.token
        && !bearer_is(request.headers(), expected)
    {
        return ApiError(StatusCode::UNAUTHORIZED, "missing or wrong bearer token".to_string()).into_response();
    }
    next.run(request).await
}

/// Whether the request's `Authorization: Bearer` token is `expected`, compared in constant time.
fn bearer_is(headers: &axum::http::HeaderMap, expected: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), expected.as_bytes())
}

/// With a token for scrapes (the metrics token, or the API token where no metrics token is
/// set), a scrape must bear it (the scheduler's `/metrics` and a worker's).
pub(super) fn check_metrics_token(expected: Option<&str>, headers: &axum::http::HeaderMap) -> ApiResult<()> {
    match expected {
        Some(expected) if !bearer_is(headers, expected) => {
            Err(ApiError(StatusCode::UNAUTHORIZED, "missing or wrong metrics token".to_string()))
        }
        _ => Ok(()),
    }
}

/// Compares without an early exit, so the time taken does not tell how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn ip_addresses_are_told_from_names() {
        for address in ["10.0.0.5", "0.0.0.0", "[fe80::1]", "[::1]"] {
            assert!(is_ip_address(address), "{address}");
        }
        for name in ["evil.example", "10.0.0.5.nip.io", "[evil]", "::1x", ""] {
            assert!(!is_ip_address(name), "{name}");
        }
    }
}
