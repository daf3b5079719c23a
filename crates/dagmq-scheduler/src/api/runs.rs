//! The run routes: listing runs, a run with its tasks, a try's logs, and the commands on a run
//! (clear, restart, cancel, suspend, resume).

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use dagmq_core::store::RunFilter;
use dagmq_core::task::mask_params;
use dagmq_core::{Dag, RunKind, RunRecord, RunState, TaskInstance, TaskState};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiQuery, ApiResult, AppState, MAX_LIMIT, bad_request, json_body, not_found_error};

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

pub(super) async fn clear_run(
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
pub(super) struct RunsQuery {
    /// Only this DAG.
    dag_id: Option<String>,
    /// Only this state.
    status: Option<String>,
    /// How many (default 50, at most 500).
    limit: Option<usize>,
    /// Skip this many first (paging: the next page's offset is this one's plus its length).
    offset: Option<usize>,
}

/// A run as the API lists it: the run without its params, which may be large and which a
/// listing polled every few seconds has no use for (`GET /api/v1/runs/{id}` has them), and
/// its task counts.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunView {
    /// Unique id.
    pub run_id: String,
    /// The DAG.
    pub dag_id: String,
    /// Current state.
    pub state: RunState,
    /// Scheduled, manual (the API), message (a trigger message) or backfill.
    pub kind: RunKind,
    /// The schedule point (scheduled) or trigger time (manual, message).
    pub logical_date: DateTime<Utc>,
    /// Idempotency key of the trigger, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When the run was created.
    pub created_at: DateTime<Utc>,
    /// When it last went to `running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// The version of the DAG the run was created with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dag_version: Option<String>,
    /// How many tasks are in each state.
    pub task_counts: BTreeMap<TaskState, usize>,
}

impl RunView {
    /// The listing of `run`, whose tasks are counted in `task_counts`.
    pub fn new(run: RunRecord, task_counts: BTreeMap<TaskState, usize>) -> RunView {
        // Every field named, so that a new one is left out or listed on purpose.
        let RunRecord {
            run_id,
            dag_id,
            state,
            kind,
            logical_date,
            params: _,
            key,
            created_at,
            started_at,
            ended_at,
            dag_version,
        } = run;
        RunView {
            run_id,
            dag_id,
            state,
            kind,
            logical_date,
            key,
            created_at,
            started_at,
            ended_at,
            dag_version,
            task_counts,
        }
    }
}

pub(super) async fn list_runs(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<RunsQuery>,
) -> ApiResult<Json<Vec<RunView>>> {
    let status = match &query.status {
        Some(text) if !text.is_empty() => {
            Some(text.parse::<RunState>().map_err(|e| bad_request(format!("status: {e}")))?)
        }
        _ => None,
    };
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(bad_request(format!("limit must be 1 to {MAX_LIMIT}")));
    }
    let offset = query.offset.unwrap_or(0);
    if offset > super::MAX_OFFSET {
        return Err(bad_request(format!("offset must be at most {}", super::MAX_OFFSET)));
    }
    let filter = RunFilter { dag_id: query.dag_id.filter(|d| !d.is_empty()), state: status, limit, offset };
    let store = &state.scheduler.store;
    let mut views = Vec::new();
    for run in store.list_runs(&filter).await? {
        let tasks = store.tasks(&run.run_id).await?;
        views.push(RunView::new(run, count_states(&tasks)));
    }
    Ok(Json(views))
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
    /// For a queued run held back by its DAG's `max_active_runs`: `max_active_runs 3/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// The IANA timezone of the run's DAG (the version it was created with, else as loaded now),
    /// in which the UI shows the run's times; absent when this process has not loaded the DAG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Every task as the store keeps it, in the order of the run's DAG (each after its
    /// upstream tasks; tasks the DAG does not name, follow-ups, last), each with `"output"` (null when it handed nothing on)
    /// and `"waiting_for"` (the concurrency limit a ready task waits for, or, for a queued task,
    /// `no live worker consumes pool POOL`; else null).
    pub tasks: Vec<serde_json::Value>,
}

/// Puts `tasks` in the order of their run's `dag` (the version the run was created with, or the
/// DAG as loaded now when this process has not loaded that version: `capacity::dag_of`; by id
/// without either), every task after its upstreams; tasks the DAG does not name (follow-ups) go
/// last, by id.
fn sort_in_graph_order(dag: Option<&Dag>, tasks: &mut [TaskInstance]) {
    let Some(dag) = dag else {
        tasks.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        return;
    };
    let position: std::collections::HashMap<&str, usize> =
        dag.tasks().iter().enumerate().map(|(index, task)| (task.id.as_str(), index)).collect();
    tasks.sort_by(|a, b| {
        let key = |task: &TaskInstance| position.get(task.task_id.as_str()).copied().unwrap_or(usize::MAX);
        key(a).cmp(&key(b)).then_with(|| a.task_id.cmp(&b.task_id))
    });
}

/// Why queued `run` waits: `max_active_runs A/M` when its DAG's active runs fill its
/// `max_active_runs` (else it is about to start).
async fn held_back(state: &AppState, run: &RunRecord) -> ApiResult<Option<String>> {
    let Some(dag) = state.scheduler.live.current().get(&run.dag_id).cloned() else { return Ok(None) };
    let active = state
        .scheduler
        .store
        .unfinished_runs()
        .await?
        .iter()
        .filter(|other| other.dag_id == run.dag_id && super::capacity::is_active(other.state))
        .count();
    Ok((active as u64 >= u64::from(dag.max_active_runs))
        .then(|| super::capacity::held_reason(active, dag.max_active_runs)))
}

pub(super) async fn show_run(State(state): State<AppState>, Path(run_id): Path<String>) -> ApiResult<Json<RunDetail>> {
    let store = &state.scheduler.store;
    let Some(mut run) = store.run(&run_id).await? else {
        return Err(not_found_error(format!("unknown run {run_id:?}")));
    };
    run.params = mask_params(&run.params);
    let mut tasks = store.tasks(&run_id).await?;
    let dag = super::capacity::dag_of(&state, &run);
    sort_in_graph_order(dag.as_deref(), &mut tasks);
    let timezone = dag.map(|dag| dag.timezone.name().to_string());
    let task_counts = count_states(&tasks);
    let mut views = Vec::with_capacity(tasks.len());
    for task in &tasks {
        let mut value =
            serde_json::to_value(task).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        if let Some(object) = value.as_object_mut() {
            object.entry("output").or_insert(serde_json::Value::Null);
            let waiting = match task.state {
                TaskState::Pending => state.scheduler.waiting_reason(&run_id, &task.task_id),
                TaskState::Queued => state.scheduler.unserved_reason(&task.queue),
                _ => None,
            };
            object
                .insert("waiting_for".to_string(), waiting.map_or(serde_json::Value::Null, serde_json::Value::String));
        }
        views.push(value);
    }
    let waiting_for = match run.state {
        RunState::Queued => held_back(&state, &run).await?,
        _ => None,
    };
    Ok(Json(RunDetail { run, task_counts, waiting_for, timezone, tasks: views }))
}

pub(super) async fn restart_run(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.restart(&run_id).await?;
    Ok(Json(serde_json::json!({"run_id": run_id, "restarted": true})))
}

pub(super) async fn cancel_run(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.cancel(&run_id).await?;
    Ok(Json(serde_json::json!({"run_id": run_id, "cancelled": true})))
}

pub(super) async fn suspend_run(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.suspend(&run_id).await?;
    Ok(Json(serde_json::json!({"run_id": run_id, "suspended": true})))
}

pub(super) async fn resume_run(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.resume(&run_id).await?;
    Ok(Json(serde_json::json!({"run_id": run_id, "resumed": true})))
}

/// Query of the logs route.
#[derive(Debug, Deserialize)]
pub(super) struct LogsQuery {
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

pub(super) async fn task_logs(
    State(state): State<AppState>,
    Path((run_id, task_id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> ApiResult<Json<LogView>> {
    let store = &state.scheduler.store;
    if store.run(&run_id).await?.is_none() {
        return Err(not_found_error(format!("unknown run {run_id:?}")));
    }
    let Some(task) = store.task(&run_id, &task_id).await? else {
        return Err(not_found_error(format!("run {run_id:?} has no task {task_id:?}")));
    };
    if task.try_number == 0 {
        return Err(not_found_error(format!(
            "task {task_id:?} of run {run_id:?} has not run ({}): it has no log",
            task.state
        )));
    }
    let try_number = query.try_number.unwrap_or(task.try_number);
    if try_number == 0 || try_number > task.try_number {
        return Err(not_found_error(format!(
            "task {task_id:?} of run {run_id:?} has no try {try_number} (its tries are 1 to {})",
            task.try_number
        )));
    }
    let from = query.from.unwrap_or(0);
    let lines = store.read_log(&run_id, &task_id, try_number, from).await?;
    let next = from + lines.len();
    Ok(Json(LogView { run_id, task_id, try_number, state: task.state, lines, next }))
}
