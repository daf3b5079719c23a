//! The HTTP API: JSON over the scheduler's store and commands. Reads go straight to the store;
//! changes go through the scheduler's event loop, which owns all scheduling state.
//!
//! The router, the server and the error answers are here; the routes live in a file per
//! resource: `dags`, `runs` and `stats`, with the checks every request passes in `security`.

mod capacity;
mod dags;
mod runs;
mod security;
mod stats;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::commands::{CommandError, SchedulerHandle};
pub use capacity::{Capacity, DagUse, HeldRun, PoolUse, QueueUse, WorkerUse};
pub use dags::{DagView, ParamView, RunSummary, TaskView};
pub use dags::{Grid, GridRun};
use dags::{backfill_dag, dag_grid, list_dags, pause_dag, show_dag, trigger_run, unpause_dag};
pub use runs::{LogView, RunDetail, RunView};
use runs::{cancel_run, clear_run, list_runs, restart_run, resume_run, show_run, suspend_run, task_logs};
pub use security::{API_HEADER, CONTENT_SECURITY_POLICY};
use security::{check_metrics_token, refuse_cross_site, require_token, security_headers};
pub use stats::{MinuteCount, StatsView};
use stats::{list_workers, metrics, stats};

/// Largest request body accepted (a trigger's params), in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Most items one listing returns.
pub const MAX_LIMIT: usize = 500;

/// Largest `offset` of a listing: far past any history kept (finished runs expire after the
/// retention period), and small enough that no index arithmetic overflows.
pub const MAX_OFFSET: usize = 10_000_000;

/// A worker whose heartbeat is older than this is not listed as live.
pub const WORKER_STALE_AFTER: chrono::Duration = chrono::Duration::seconds(30);

/// Settings of the HTTP API.
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    /// When set, every `/api` call needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// When set, `GET /metrics` needs `Authorization: Bearer <metrics token>`; when not, it needs
    /// the API token (if that is set).
    pub metrics_token: Option<String>,
    /// Origins (`scheme://host:port`) besides the API's own whose pages may send it commands.
    pub allowed_origins: Vec<String>,
    /// When set, the `Host` of every request must be a loopback name (`127.0.0.1`, `localhost`,
    /// `[::1]`), an IP address or one of these: a page on another name cannot reach the API by
    /// rebinding that name's DNS to the API's address. The binary sets it when it listens without
    /// a token (on loopback, or anywhere with `--insecure`) and whenever `--allowed-host` is given.
    pub allowed_hosts: Option<Vec<String>>,
}

impl ApiConfig {
    /// The token a scrape of `/metrics` must bear: the metrics token, or else the API token.
    pub fn scrape_token(&self) -> Option<&str> {
        self.metrics_token.as_deref().or(self.token.as_deref())
    }
}

/// The shared state of the handlers.
#[derive(Clone)]
struct AppState {
    /// The scheduler.
    scheduler: SchedulerHandle,
    /// The API settings.
    config: Arc<ApiConfig>,
    /// The task states of finished runs, for the DAG page's grid.
    grid_cache: Arc<dags::GridCache>,
}

/// The API's router.
pub fn router(scheduler: SchedulerHandle, config: ApiConfig) -> Router {
    let state = AppState { scheduler, config: Arc::new(config), grid_cache: Arc::default() };
    let api = Router::new()
        .route("/dags", get(list_dags))
        .route("/dags/{dag_id}", get(show_dag))
        .route("/dags/{dag_id}/pause", post(pause_dag))
        .route("/dags/{dag_id}/unpause", post(unpause_dag))
        .route("/dags/{dag_id}/runs", post(trigger_run))
        .route("/dags/{dag_id}/backfill", post(backfill_dag))
        .route("/runs", get(list_runs))
        .route("/runs/{run_id}", get(show_run))
        .route("/runs/{run_id}/restart", post(restart_run))
        .route("/runs/{run_id}/cancel", post(cancel_run))
        .route("/runs/{run_id}/clear", post(clear_run))
        .route("/runs/{run_id}/suspend", post(suspend_run))
        .route("/runs/{run_id}/resume", post(resume_run))
        .route("/runs/{run_id}/tasks/{task_id}/logs", get(task_logs))
        .route("/workers", get(list_workers))
        .route("/stats", get(stats))
        .route("/capacity", get(capacity::capacity))
        .route("/dags/{dag_id}/grid", get(dag_grid))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(middleware::from_fn(conditional_get))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(ui))
        .route("/ui/app.js", get(ui_script))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), refuse_cross_site))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// Largest answer [`conditional_get`] tags; a larger one goes out untagged.
const MAX_TAGGED_BYTES: usize = 8 << 20;

/// Conditional GETs: every successful `GET` of the API carries an `ETag` (a hash of its body)
/// and `Cache-Control: no-cache`, so a browser asks again with `If-None-Match` and an answer
/// that has not changed costs a `304` with no body. A page polled every 1.5 s moves bytes only
/// when something changed.
async fn conditional_get(request: Request, next: middleware::Next) -> Response {
    if request.method() != axum::http::Method::GET {
        return next.run(request).await;
    }
    let asked = request.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::to_string);
    let response = next.run(request).await;
    if response.status() != StatusCode::OK {
        return response;
    }
    // A route that tags its own answers (computed before the answer is built, so that it can
    // answer a 304 without building it) keeps its tag.
    if response.headers().contains_key(header::ETAG) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // A larger answer (or one of unknown length) goes out as it is, untagged: buffering it
    // only to refuse it would turn a big run's detail into an error.
    if axum::body::HttpBody::size_hint(&body).upper().is_none_or(|n| n > MAX_TAGGED_BYTES as u64) {
        return Response::from_parts(parts, body);
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_TAGGED_BYTES).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "answer too large to send").into_response();
    };
    let tag = format!("\"{}\"", dagmq_core::dag::content_version_bytes(&bytes));
    parts.headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache, private"));
    if let Ok(value) = header::HeaderValue::from_str(&tag) {
        parts.headers.insert(header::ETAG, value);
    }
    if asked.is_some_and(|asked| asked.split(',').any(|one| one.trim() == tag || one.trim() == "*")) {
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.status = StatusCode::NOT_MODIFIED;
        return Response::from_parts(parts, axum::body::Body::empty());
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    scheduler: SchedulerHandle,
    config: ApiConfig,
    shutdown: dagmq_core::CancelSignal,
) -> std::io::Result<()> {
    axum::serve(listener, router(scheduler, config))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Serves `GET /metrics` with whatever `render` answers, until `shutdown` fires (a worker's own
/// metrics endpoint); with a `token`, only to requests that bear it; with `allowed_hosts`, only
/// to requests whose `Host` passes the same check as the API's (DNS rebinding). Every answer
/// carries the API's security headers.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    token: Option<String>,
    allowed_hosts: Option<Vec<String>>,
    shutdown: dagmq_core::CancelSignal,
) -> std::io::Result<()> {
    let router = Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let render = render.clone();
                let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
                let refused = security::host_refusal(host, allowed_hosts.as_deref());
                let allowed = check_metrics_token(token.as_deref(), &headers);
                async move {
                    if let Some(refusal) = refused {
                        tracing::warn!("refused a metrics scrape: {refusal}");
                        return Err(ApiError(StatusCode::FORBIDDEN, refusal));
                    }
                    allowed?;
                    ApiResult::Ok(
                        ([(header::CONTENT_TYPE, dagmq_core::metrics::CONTENT_TYPE)], render()).into_response(),
                    )
                }
            }),
        )
        .layer(middleware::from_fn(security_headers));
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

/// An error answer: `{"error": "..."}` with a status code.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
        }
        (self.0, Json(Body { error: self.1 })).into_response()
    }
}

impl From<CommandError> for ApiError {
    fn from(err: CommandError) -> ApiError {
        let status = match &err {
            CommandError::NotFound(_) => StatusCode::NOT_FOUND,
            CommandError::Conflict(_) => StatusCode::CONFLICT,
            CommandError::BadInput(_) => StatusCode::BAD_REQUEST,
            CommandError::Backend(_) | CommandError::Stopped | CommandError::Standby => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, err.to_string())
    }
}

impl From<dagmq_core::BackendError> for ApiError {
    fn from(err: dagmq_core::BackendError) -> ApiError {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

fn not_found_error(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, message.into())
}

async fn not_found(uri: axum::extract::OriginalUri, request: Request) -> ApiError {
    not_found_error(format!("no route {} {}", request.method(), uri.path()))
}

async fn healthz(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.store.ping().await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")))?;
    state.scheduler.queue.ping().await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("queue: {e}")))?;
    Ok(Json(serde_json::json!({"status": "ok"})))
}

/// The web UI: one page, embedded in the binary, talking to the API below.
async fn ui() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("../ui/index.html")).into_response()
}

/// The UI's script, a file of its own so that the page's policy allows no inline script.
async fn ui_script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("../ui/app.js")).into_response()
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

/// A query string read into `T`, or a JSON 400 (`{"error": ...}`, like every other error of
/// the API) that names the parameter and why, instead of axum's plain-text rejection.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::try_from_uri(&parts.uri) {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(bad_request(format!("bad query string: {}", query_reason(&rejection.body_text())))),
        }
    }
}

/// The reason of a query rejection without axum's generic prefix.
fn query_reason(text: &str) -> &str {
    text.strip_prefix("Failed to deserialize query string: ").unwrap_or(text)
}

/// A request's JSON body, or a 400 that names the route (`what`) and the reason.
fn json_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>, what: &str) -> ApiResult<T> {
    let bytes = body.map_err(|rejection| ApiError(rejection.status(), rejection.body_text()))?;
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("bad {what} body: {e}")))
}

#[cfg(test)]
mod tests {
    /// Every `.route(...)` in `router()` is documented with its method; routes inside the `/api`
    /// router are nested under `/api/v1`.
    #[test]
    fn every_route_of_the_router_is_in_the_openapi_document() {
        let source = include_str!("api.rs");
        let body = &source[source.find("pub fn router(").unwrap()..];
        let body = &body[..body.find("\n}\n").unwrap()];
        let nested_until = body.find(".fallback(not_found)").unwrap();
        let document = crate::openapi::document();
        let mut checked = 0;
        for (offset, _) in body.match_indices(".route(\"") {
            let rest = &body[offset + 8..];
            let path = &rest[..rest.find('"').unwrap()];
            let method = rest[rest.find(", ").unwrap() + 2..].split('(').next().unwrap();
            let full = if offset < nested_until { format!("/api/v1{path}") } else { path.to_string() };
            assert!(
                document["paths"][&full][method].is_object(),
                "{method} {full} is served but not in the OpenAPI document"
            );
            checked += 1;
        }
        assert!(checked >= 15, "only {checked} routes found");
        let documented: usize =
            document["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(documented, checked, "the document describes routes the router does not serve");
    }

    /// An answer above the ETag cap (8 MiB: the detail of a run of about 25,000 tasks, a DAG
    /// list of many large DAGs) still goes out, untagged, as the cap's doc says; it must not
    /// turn into a 500.
    #[tokio::test]
    async fn an_answer_above_the_etag_cap_goes_out_untagged_not_as_a_500() {
        use axum::routing::get;
        let big = "x".repeat(super::MAX_TAGGED_BYTES + 1);
        let app = axum::Router::new()
            .route("/big", get(move || async move { big }))
            .layer(axum::middleware::from_fn(super::conditional_get));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let head = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            stream.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).unwrap();
            String::from_utf8_lossy(&answer[..answer.len().min(512)]).to_string()
        })
        .await
        .unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "answer: {head}");
        assert!(!head.to_ascii_lowercase().contains("etag:"), "tagged although above the cap: {head}");
    }
}
