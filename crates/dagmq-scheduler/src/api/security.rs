//! What keeps other sites and callers without the token out: the cross-site checks on every
//! request (`Host`, `Origin`, content type), the bearer token of `/api` and of `/metrics`.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiResult, AppState};

/// Refuses what a web page on another site could make a browser send (the API uses no cookies,
/// but without a token a page could still reach a loopback API):
/// - a `Host` that is not a loopback name or an allowed host, when hosts are checked (DNS
///   rebinding): 403;
/// - a state-changing request whose `Origin` is neither the API's own origin nor an allowed
///   origin: 403;
/// - a state-changing request with a body that is not `application/json` (a form or a
///   `text/plain` fetch needs no preflight): 415.
///
/// Requests without `Origin` (the CLI, curl, other programs) pass the origin check.
pub(super) async fn refuse_cross_site(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let host_name = host_name(host);
    // A request without `Host` (HTTP/1.0, probes) comes from no browser.
    if let Some(allowed) = &state.config.allowed_hosts
        && !host.is_empty()
        && !["127.0.0.1", "localhost", "::1", "[::1]"].contains(&host_name)
        && !allowed.iter().any(|a| a == host || a == host_name)
    {
        return refuse(
            &request,
            StatusCode::FORBIDDEN,
            format!(
                "host {host:?} is not this API's (allowed: loopback names{})",
                if allowed.is_empty() { String::new() } else { format!(", {}", allowed.join(", ")) }
            ),
        );
    }
    if !matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS) {
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let own = [format!("http://{host}"), format!("https://{host}")];
            if !own.iter().any(|o| o == origin) && !state.config.allowed_origins.iter().any(|o| o == origin) {
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

/// With a metrics token set, a scrape must bear it (the scheduler's `/metrics` and a worker's).
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
}
