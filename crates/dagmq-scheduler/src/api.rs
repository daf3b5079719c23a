//! The HTTP API: JSON over the scheduler's store and commands. Reads go straight to the store;
//! changes go through the scheduler's event loop, which owns all scheduling state.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use dagmq_core::records::DagRecord;
use dagmq_core::store::RunFilter;
use dagmq_core::task::mask_params;
use dagmq_core::{Params, RunRecord, RunState, TaskInstance, TaskKind, TaskState, Topic, WorkerInfo};
use serde::{Deserialize, Serialize};

use crate::commands::{CommandError, SchedulerHandle};

/// Largest request body accepted (a trigger's params), in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Most items one listing returns.
pub const MAX_LIMIT: usize = 500;

/// A worker whose heartbeat is older than this is not listed as live.
pub const WORKER_STALE_AFTER: chrono::Duration = chrono::Duration::seconds(30);

/// Settings of the HTTP API.
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    /// When set, every `/api` call needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// When set, `GET /metrics` needs `Authorization: Bearer <metrics token>`.
    pub metrics_token: Option<String>,
    /// Origins (`scheme://host:port`) besides the API's own whose pages may send it commands.
    pub allowed_origins: Vec<String>,
    /// When set, the `Host` of every request must be a loopback name (`127.0.0.1`, `localhost`,
    /// `[::1]`) or one of these: a page on another name cannot reach the API by rebinding that
    /// name's DNS to 127.0.0.1. The binary sets it when it listens on loopback without a token.
    pub allowed_hosts: Option<Vec<String>>,
}

/// The shared state of the handlers.
#[derive(Clone)]
struct AppState {
    /// The scheduler.
    scheduler: SchedulerHandle,
    /// The API settings.
    config: Arc<ApiConfig>,
}

/// The API's router.
pub fn router(scheduler: SchedulerHandle, config: ApiConfig) -> Router {
    let state = AppState { scheduler, config: Arc::new(config) };
    let api = Router::new()
        .route("/dags", get(list_dags))
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
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(ui))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), refuse_cross_site))
        .with_state(state)
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
/// metrics endpoint); with a `token`, only to requests that bear it.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    token: Option<String>,
    shutdown: dagmq_core::CancelSignal,
) -> std::io::Result<()> {
    let router = Router::new().route(
        "/metrics",
        get(move |headers: axum::http::HeaderMap| {
            let render = render.clone();
            let allowed = check_metrics_token(token.as_deref(), &headers);
            async move {
                allowed?;
                ApiResult::Ok(([(header::CONTENT_TYPE, dagmq_core::metrics::CONTENT_TYPE)], render()).into_response())
            }
        }),
    );
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
async fn refuse_cross_site(State(state): State<AppState>, request: Request, next: Next) -> Response {
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
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
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
fn check_metrics_token(expected: Option<&str>, headers: &axum::http::HeaderMap) -> ApiResult<()> {
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

async fn healthz(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.store.ping().await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")))?;
    state.scheduler.queue.ping().await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("queue: {e}")))?;
    Ok(Json(serde_json::json!({"status": "ok"})))
}

/// The web UI: one page, embedded in the binary, talking to the API below.
async fn ui() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("../ui/index.html")).into_response()
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

/// OpenMetrics text: the loop's counters plus queue depths and live workers read now. Tasks in
/// flight come from counts the scheduler keeps of its runs, so a scrape costs one depth query
/// per queue and one read of the worker registry, however many runs are unfinished.
async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> ApiResult<Response> {
    check_metrics_token(state.config.metrics_token.as_deref(), &headers)?;
    let handle = &state.scheduler;
    let mut depths = Vec::new();
    for topic in topics(handle) {
        depths.push((vec![topic.name()], handle.queue.depth(&topic).await? as f64));
    }
    handle.metrics.queue_depth.replace_all(depths);
    let workers = live_workers(&state).await?;
    let in_flight = in_flight_counts(handle, &workers);
    handle
        .metrics
        .tasks_in_flight
        .replace_all(in_flight.into_iter().map(|(state, count)| (vec![state.as_str().to_string()], count as f64)));
    handle.metrics.workers.set(&[], workers.len() as f64);
    Ok(([(header::CONTENT_TYPE, dagmq_core::metrics::CONTENT_TYPE)], handle.metrics.render()).into_response())
}

/// Every queue the scheduler knows of: its own and the pools of its DAGs' tasks.
fn topics(handle: &SchedulerHandle) -> Vec<Topic> {
    let mut topics: Vec<Topic> = vec![Topic::Status, Topic::Triggers, Topic::Dead];
    let mut pools: Vec<String> =
        handle.dags().iter().flat_map(|d| d.tasks().iter().map(|t| t.config.queue.clone())).collect();
    pools.sort();
    pools.dedup();
    topics.extend(pools.into_iter().map(Topic::Tasks));
    topics
}

/// A DAG as the API lists it.
#[derive(Debug, Serialize, Deserialize)]
pub struct DagView {
    /// Id.
    pub dag_id: String,
    /// The loaded definition's version (a hash of its file; `rust` when compiled in); empty for
    /// a refused file.
    #[serde(default)]
    pub version: String,
    /// Description.
    pub description: String,
    /// Schedule as written; absent for manual-only DAGs.
    pub schedule: Option<String>,
    /// IANA timezone of the schedule.
    pub timezone: String,
    /// Whether scheduled runs are paused.
    pub paused: bool,
    /// Next schedule point (absent when paused or manual).
    pub next_run: Option<DateTime<Utc>>,
    /// The newest run, if any.
    pub last_run: Option<RunSummary>,
    /// Tags.
    pub tags: Vec<String>,
    /// Tasks with their upstreams and kinds.
    pub tasks: Vec<TaskView>,
    /// Where the DAG was defined.
    pub source: String,
    /// For a DAG file that was refused: why (`file:line: reason`); the DAG does not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A task of a DAG.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskView {
    /// Id.
    pub task_id: String,
    /// Upstream ids.
    pub after: Vec<String>,
    /// `command` or `rust`.
    pub kind: String,
    /// Worker pool.
    pub queue: String,
    /// Tries after the first.
    pub retries: u32,
}

/// A run's id and state.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// Run id.
    pub run_id: String,
    /// State.
    pub state: RunState,
}

async fn list_dags(State(state): State<AppState>) -> ApiResult<Json<Vec<DagView>>> {
    let handle = &state.scheduler;
    let now = handle.clock.now();
    let mut views = Vec::new();
    for dag in handle.dags().iter() {
        let record: Option<DagRecord> = handle.store.dag_record(&dag.id).await?;
        let paused = record.as_ref().map_or(dag.paused, |r| r.paused);
        let start = record.as_ref().map_or(now, |r| r.first_seen);
        let last = handle
            .store
            .list_runs(&RunFilter { dag_id: Some(dag.id.clone()), state: None, limit: 1 })
            .await?
            .into_iter()
            .next()
            .map(|r| RunSummary { run_id: r.run_id, state: r.state });
        views.push(DagView {
            dag_id: dag.id.clone(),
            version: dag.version.clone(),
            description: dag.description.clone(),
            schedule: dag.schedule.describe(),
            timezone: dag.timezone.name().to_string(),
            paused,
            next_run: if paused { None } else { dag.next_run_after(start, now) },
            last_run: last,
            tags: dag.tags.clone(),
            tasks: dag
                .tasks()
                .iter()
                .map(|t| TaskView {
                    task_id: t.id.clone(),
                    after: t.after.to_vec(),
                    kind: match &t.kind {
                        TaskKind::Command(_) => "command".to_string(),
                        TaskKind::Rust { name, .. } => name.clone().map_or("rust".to_string(), |n| format!("rust:{n}")),
                    },
                    queue: t.config.queue.clone(),
                    retries: t.config.retries,
                })
                .collect(),
            source: dag.source.clone(),
            error: None,
        });
    }
    for (file, error) in handle.refused_dags().iter() {
        let stem = std::path::Path::new(file).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        views.push(DagView {
            dag_id: stem,
            version: String::new(),
            description: String::new(),
            schedule: None,
            timezone: "UTC".to_string(),
            paused: true,
            next_run: None,
            last_run: None,
            tags: Vec::new(),
            tasks: Vec::new(),
            source: file.clone(),
            error: Some(error.clone()),
        });
    }
    Ok(Json(views))
}

async fn pause_dag(State(state): State<AppState>, Path(dag_id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.set_paused(&dag_id, true).await?;
    Ok(Json(serde_json::json!({"dag_id": dag_id, "paused": true})))
}

async fn unpause_dag(State(state): State<AppState>, Path(dag_id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.set_paused(&dag_id, false).await?;
    Ok(Json(serde_json::json!({"dag_id": dag_id, "paused": false})))
}

/// Body of `POST /api/v1/dags/{dag_id}/runs`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerBody {
    /// Parameters.
    #[serde(default)]
    params: Params,
    /// Idempotency key.
    #[serde(default)]
    key: Option<String>,
}

async fn trigger_run(
    State(state): State<AppState>,
    Path(dag_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let body: TriggerBody = match body {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => TriggerBody::default(),
        body => json_body(body, "trigger")?,
    };
    let outcome = state.scheduler.trigger(&dag_id, body.params, body.key).await?;
    let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(serde_json::json!({"run_id": outcome.run_id, "created": outcome.created}))))
}

/// A request's JSON body, or a 400 that names the route (`what`) and the reason.
fn json_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>, what: &str) -> ApiResult<T> {
    let bytes = body.map_err(|rejection| ApiError(rejection.status(), rejection.body_text()))?;
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("bad {what} body: {e}")))
}

/// Body of `POST /api/v1/dags/{id}/backfill`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackfillBody {
    /// First instant of the range (RFC 3339).
    from: DateTime<Utc>,
    /// Last instant of the range, inclusive (RFC 3339).
    to: DateTime<Utc>,
    /// Parameters over the DAG's defaults.
    #[serde(default)]
    params: Params,
}

async fn backfill_dag(
    State(state): State<AppState>,
    Path(dag_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let body: BackfillBody = json_body(body, "backfill")?;
    let outcome = state.scheduler.backfill(&dag_id, body.from, body.to, body.params).await?;
    let answer = serde_json::json!({"runs": outcome.runs, "created": outcome.created, "existing": outcome.existing});
    Ok((StatusCode::CREATED, Json(answer)))
}

/// Body of `POST /api/v1/runs/{id}/clear`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClearBody {
    /// The tasks to run again.
    tasks: Vec<String>,
    /// Every task after them too.
    #[serde(default)]
    downstream: bool,
}

async fn clear_run(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let body: ClearBody = json_body(body, "clear")?;
    let cleared = state.scheduler.clear(&run_id, body.tasks, body.downstream).await?;
    Ok(Json(serde_json::json!({"run_id": run_id, "cleared": cleared})))
}

/// Query of `GET /api/v1/runs`.
#[derive(Debug, Deserialize)]
struct RunsQuery {
    /// Only this DAG.
    dag_id: Option<String>,
    /// Only this state.
    status: Option<String>,
    /// How many (default 50, at most 500).
    limit: Option<usize>,
}

/// A run as the API lists it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunView {
    /// The run.
    #[serde(flatten)]
    pub run: RunRecord,
    /// How many tasks are in each state.
    pub task_counts: BTreeMap<TaskState, usize>,
}

async fn list_runs(State(state): State<AppState>, Query(query): Query<RunsQuery>) -> ApiResult<Json<Vec<RunView>>> {
    let status = match &query.status {
        Some(text) if !text.is_empty() => Some(text.parse::<RunState>().map_err(bad_request)?),
        _ => None,
    };
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(bad_request(format!("limit must be 1 to {MAX_LIMIT}")));
    }
    let filter = RunFilter { dag_id: query.dag_id.filter(|d| !d.is_empty()), state: status, limit };
    let store = &state.scheduler.store;
    let mut views = Vec::new();
    for mut run in store.list_runs(&filter).await? {
        let tasks = store.tasks(&run.run_id).await?;
        run.params = mask_params(&run.params);
        views.push(RunView { task_counts: count_states(&tasks), run });
    }
    Ok(Json(views))
}

/// Tasks queued, running and waiting to retry, without reading a task. The scheduler's view
/// holds a task `queued` until its outcome arrives, so the tries that live workers list in their
/// heartbeats are counted `running` and taken from `queued`.
fn in_flight_counts(handle: &SchedulerHandle, workers: &[WorkerInfo]) -> [(TaskState, u64); 3] {
    let view = &handle.metrics.view;
    let listed: u64 = workers.iter().map(|w| w.running.len() as u64).sum();
    let started = view.get(TaskState::Queued) + view.get(TaskState::Running);
    let running = listed.min(started);
    [
        (TaskState::Queued, started - running),
        (TaskState::Running, running),
        (TaskState::UpForRetry, view.get(TaskState::UpForRetry)),
    ]
}

fn count_states(tasks: &[TaskInstance]) -> BTreeMap<TaskState, usize> {
    let mut counts = BTreeMap::new();
    for task in tasks {
        *counts.entry(task.state).or_insert(0) += 1;
    }
    counts
}

/// A run with all its tasks.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunDetail {
    /// The run.
    #[serde(flatten)]
    pub run: RunRecord,
    /// How many tasks are in each state.
    pub task_counts: BTreeMap<TaskState, usize>,
    /// Every task as the store keeps it, each with `"output"` (null when it handed nothing on)
    /// and `"waiting_for"` (the concurrency limit a ready task waits for, else null).
    pub tasks: Vec<serde_json::Value>,
}

async fn show_run(State(state): State<AppState>, Path(run_id): Path<String>) -> ApiResult<Json<RunDetail>> {
    let store = &state.scheduler.store;
    let Some(mut run) = store.run(&run_id).await? else {
        return Err(not_found_error(format!("unknown run {run_id:?}")));
    };
    run.params = mask_params(&run.params);
    let tasks = store.tasks(&run_id).await?;
    let task_counts = count_states(&tasks);
    let mut views = Vec::with_capacity(tasks.len());
    for task in &tasks {
        let mut value =
            serde_json::to_value(task).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        if let Some(object) = value.as_object_mut() {
            object.entry("output").or_insert(serde_json::Value::Null);
            let waiting = match task.state {
                TaskState::Pending => state.scheduler.waiting_reason(&run_id, &task.task_id),
                _ => None,
            };
            object
                .insert("waiting_for".to_string(), waiting.map_or(serde_json::Value::Null, serde_json::Value::String));
        }
        views.push(value);
    }
    Ok(Json(RunDetail { run, task_counts, tasks: views }))
}

async fn restart_run(State(state): State<AppState>, Path(run_id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.restart(&run_id).await?;
    Ok(Json(serde_json::json!({"run_id": run_id, "restarted": true})))
}

async fn cancel_run(State(state): State<AppState>, Path(run_id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.cancel(&run_id).await?;
    Ok(Json(serde_json::json!({"run_id": run_id, "cancelled": true})))
}

async fn suspend_run(State(state): State<AppState>, Path(run_id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.suspend(&run_id).await?;
    Ok(Json(serde_json::json!({"run_id": run_id, "suspended": true})))
}

async fn resume_run(State(state): State<AppState>, Path(run_id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.resume(&run_id).await?;
    Ok(Json(serde_json::json!({"run_id": run_id, "resumed": true})))
}

/// Query of the logs route.
#[derive(Debug, Deserialize)]
struct LogsQuery {
    /// The try (default: the task's current try).
    #[serde(rename = "try")]
    try_number: Option<u32>,
    /// First line to return, 0-based (for tailing).
    from: Option<usize>,
}

/// A try's log lines.
#[derive(Debug, Serialize, Deserialize)]
pub struct LogView {
    /// The run.
    pub run_id: String,
    /// The task.
    pub task_id: String,
    /// The try.
    pub try_number: u32,
    /// The task's state now.
    pub state: TaskState,
    /// Lines from `from` on.
    pub lines: Vec<String>,
    /// Where the next read should start.
    pub next: usize,
}

async fn task_logs(
    State(state): State<AppState>,
    Path((run_id, task_id)): Path<(String, String)>,
    Query(query): Query<LogsQuery>,
) -> ApiResult<Json<LogView>> {
    let store = &state.scheduler.store;
    if store.run(&run_id).await?.is_none() {
        return Err(not_found_error(format!("unknown run {run_id:?}")));
    }
    let Some(task) = store.task(&run_id, &task_id).await? else {
        return Err(not_found_error(format!("run {run_id:?} has no task {task_id:?}")));
    };
    let try_number = query.try_number.unwrap_or(task.try_number);
    if try_number == 0 || try_number > task.try_number {
        return Err(not_found_error(format!(
            "task {task_id:?} of run {run_id:?} has no try {try_number} (tries so far: {})",
            task.try_number
        )));
    }
    let from = query.from.unwrap_or(0);
    let lines = store.read_log(&run_id, &task_id, try_number, from).await?;
    let next = from + lines.len();
    Ok(Json(LogView { run_id, task_id, try_number, state: task.state, lines, next }))
}

async fn list_workers(State(state): State<AppState>) -> ApiResult<Json<Vec<WorkerInfo>>> {
    Ok(Json(live_workers(&state).await?))
}

async fn live_workers(state: &AppState) -> ApiResult<Vec<WorkerInfo>> {
    let now = state.scheduler.clock.now();
    let workers = state.scheduler.store.workers().await?;
    Ok(workers.into_iter().filter(|w| now - w.last_heartbeat <= WORKER_STALE_AFTER).collect())
}

/// Counts for an overview.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsView {
    /// Runs by state, among the newest 500.
    pub runs: BTreeMap<RunState, usize>,
    /// Tasks by state, in the runs the scheduler is running (its own counts; tries listed by
    /// live workers count as running).
    pub tasks: BTreeMap<TaskState, usize>,
    /// Waiting messages per queue.
    pub queues: BTreeMap<String, u64>,
    /// Live workers.
    pub workers: usize,
    /// Tasks that ended in each of the last 60 minutes, oldest first (since this scheduler
    /// started leading).
    pub finished_per_minute: Vec<MinuteCount>,
}

/// Tasks that ended in one minute.
#[derive(Debug, Serialize, Deserialize)]
pub struct MinuteCount {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// How many tasks ended in it.
    pub count: u64,
}

async fn stats(State(state): State<AppState>) -> ApiResult<Json<StatsView>> {
    let handle = &state.scheduler;
    let store = &handle.store;
    let mut runs = BTreeMap::new();
    for run in store.list_runs(&RunFilter { limit: MAX_LIMIT, ..RunFilter::default() }).await? {
        *runs.entry(run.state).or_insert(0) += 1;
    }
    let live = live_workers(&state).await?;
    let mut tasks: BTreeMap<TaskState, usize> =
        TaskState::ALL.into_iter().map(|s| (s, handle.metrics.view.get(s) as usize)).collect();
    for (state, count) in in_flight_counts(handle, &live) {
        tasks.insert(state, count as usize);
    }
    tasks.retain(|_, count| *count > 0);
    let mut queues = BTreeMap::new();
    for topic in topics(handle) {
        queues.insert(topic.name(), handle.queue.depth(&topic).await?);
    }
    let finished_per_minute = handle
        .metrics
        .throughput
        .last_hour(handle.clock.now())
        .into_iter()
        .map(|(minute, count)| MinuteCount { minute, count })
        .collect();
    Ok(Json(StatsView { runs, tasks, queues, workers: live.len(), finished_per_minute }))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
