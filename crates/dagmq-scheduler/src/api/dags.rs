//! The DAG routes: listing the DAGs (with refused files), one DAG, pausing and unpausing,
//! triggering a run and backfilling.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use dagmq_core::records::DagRecord;
use dagmq_core::store::RunFilter;
use dagmq_core::task::mask_params;
use dagmq_core::{Dag, ParamType, Params, RunState, TaskKind, TimeArg};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{ApiQuery, ApiResult, AppState, bad_request, json_body, not_found_error};

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
    /// The params the DAG declares (plain defaults too), sorted by name.
    #[serde(default)]
    pub params: Vec<ParamView>,
    /// Whether the DAG declares a schema (a `[params.NAME]` table): then a trigger with a
    /// param it does not list is refused.
    #[serde(default)]
    pub params_declared: bool,
    /// For a DAG file that was refused: why (`file:line: reason`). A file that loaded before
    /// keeps its last good version, which this entry shows and which runs; a file that never
    /// loaded is an entry of its own (no version, no tasks) that runs nothing.
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

/// A param a DAG declares.
#[derive(Debug, Serialize, Deserialize)]
pub struct ParamView {
    /// Name.
    pub name: String,
    /// Type; absent for an untyped param (a plain default, or a table without `type`).
    #[serde(rename = "type")]
    pub kind: Option<ParamType>,
    /// The value a run gets when its trigger gives none; `***` for a param whose name says it
    /// holds a secret (`password`, `secret`, `token`, `key`), as in a run's params.
    pub default: Option<serde_json::Value>,
    /// For `enum`: the values allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// For `string`: the regular expression the whole value must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// For `string`: the most characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// A trigger must give it.
    pub required: bool,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// A run's id and state.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// Run id.
    pub run_id: String,
    /// State.
    pub state: RunState,
}

/// The view of a loaded DAG: its settings, tasks and params, with its pause flag, next run and
/// last run from the store.
async fn dag_view(state: &AppState, dag: &Dag) -> ApiResult<DagView> {
    let handle = &state.scheduler;
    let now = handle.clock.now();
    let record: Option<DagRecord> = handle.store.dag_record(&dag.id).await?;
    let paused = record.as_ref().map_or(dag.paused, |r| r.paused);
    let start = record.as_ref().map_or(now, |r| r.first_seen);
    // Defaults of secret-named params are masked as a run's values are (`mask_params`).
    let defaults = mask_params(&dag.params.defaults());
    let last = handle
        .store
        .list_runs(&RunFilter { dag_id: Some(dag.id.clone()), limit: 1, ..RunFilter::default() })
        .await?
        .into_iter()
        .next()
        .map(|r| RunSummary { run_id: r.run_id, state: r.state });
    Ok(DagView {
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
                    TaskKind::Unloaded => "unloaded".to_string(),
                },
                queue: t.config.queue.clone(),
                retries: t.config.retries,
            })
            .collect(),
        source: dag.source.clone(),
        params: dag
            .params
            .iter()
            .map(|(name, spec)| ParamView {
                name: name.clone(),
                kind: spec.kind,
                default: defaults.get(name).cloned(),
                values: spec.values.clone(),
                pattern: spec.pattern.clone(),
                max_length: spec.max_length,
                required: spec.required,
                description: spec.description.clone(),
            })
            .collect(),
        params_declared: dag.params.declared(),
        error: None,
    })
}

pub(super) async fn list_dags(State(state): State<AppState>) -> ApiResult<Json<Vec<DagView>>> {
    let handle = &state.scheduler;
    let refused = handle.refused_dags();
    let dags = handle.dags();
    let mut views = Vec::new();
    for dag in dags.iter() {
        let mut view = dag_view(&state, dag).await?;
        // A file whose change was refused keeps its last good version: one row, marked.
        view.error = refused.iter().find(|(file, _)| *file == dag.source).map(|(_, error)| error.clone());
        views.push(view);
    }
    // A refused file with no good version: a row of its own, which runs nothing.
    for (file, error) in refused.iter().filter(|(file, _)| !dags.iter().any(|dag| dag.source == *file)) {
        views.push(DagView {
            dag_id: dagmq_core::dag::refused_dag_id(file, error, &dags),
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
            params: Vec::new(),
            params_declared: false,
            error: Some(error.clone()),
        });
    }
    Ok(Json(views))
}

pub(super) async fn show_dag(State(state): State<AppState>, Path(dag_id): Path<String>) -> ApiResult<Json<DagView>> {
    let Some(dag) = state.scheduler.dags().get(&dag_id).cloned() else {
        return Err(not_found_error(format!("unknown dag {dag_id:?}")));
    };
    Ok(Json(dag_view(&state, &dag).await?))
}

/// Query of `GET /api/v1/dags/{id}/grid`.
#[derive(Debug, Deserialize)]
pub(super) struct GridQuery {
    /// How many runs (default 25, at most 100).
    limit: Option<usize>,
    /// Skip this many newest runs first (paging to older runs).
    offset: Option<usize>,
}

/// One run as the grid shows it: no params, each task's state only.
#[derive(Debug, Serialize, Deserialize)]
pub struct GridRun {
    /// The run.
    pub run_id: String,
    /// Its state.
    pub state: RunState,
    /// Why it exists.
    pub kind: dagmq_core::RunKind,
    /// Its schedule point or trigger time.
    pub logical_date: DateTime<Utc>,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// Each task's state, by task id.
    pub tasks: BTreeMap<String, dagmq_core::TaskState>,
}

/// The answer of `GET /api/v1/dags/{id}/grid`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Grid {
    /// Runs, newest first.
    pub runs: Vec<GridRun>,
    /// The offset asked for.
    pub offset: usize,
    /// Whether older runs follow.
    pub more: bool,
}

/// The runs of a DAG as a grid polled by the DAG page: a run's tasks as states only, about a
/// tenth of the bytes of the full run documents. A finished run's states come from the
/// [`GridCache`], so a poll reads the tasks of unfinished runs only; and its `ETag` is computed
/// from what it shows before the answer is built: a poll whose `If-None-Match` still holds is
/// a `304` that costs one listing of the runs and the tasks of the unfinished ones.
pub(super) async fn dag_grid(
    State(state): State<AppState>,
    Path(dag_id): Path<String>,
    ApiQuery(query): ApiQuery<GridQuery>,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::response::Response> {
    use axum::http::header;
    use axum::response::IntoResponse;
    if state.scheduler.dags().get(&dag_id).is_none() {
        return Err(not_found_error(format!("unknown dag {dag_id:?}")));
    }
    let limit = query.limit.unwrap_or(25);
    if limit == 0 || limit > 100 {
        return Err(bad_request("limit must be 1 to 100"));
    }
    let offset = query.offset.unwrap_or(0);
    if offset > super::MAX_OFFSET {
        return Err(bad_request(format!("offset must be at most {}", super::MAX_OFFSET)));
    }
    let store = &state.scheduler.store;
    let filter = RunFilter { dag_id: Some(dag_id), limit: limit + 1, offset, ..RunFilter::default() };
    let mut records = store.list_runs(&filter).await?;
    let more = records.len() > limit;
    records.truncate(limit);
    // What the answer shows, in a few bytes per run: each run's record, and the states of a run
    // that is not finished for good (a finished one's are fixed under its record's stamp).
    let mut shown = format!("{offset} {more}\n");
    let mut read = Vec::with_capacity(records.len());
    for run in &records {
        let (tasks, kept) = match state.grid_cache.get(run) {
            Some(tasks) => (tasks, true),
            None => {
                let tasks: BTreeMap<_, _> =
                    store.tasks(&run.run_id).await?.into_iter().map(|task| (task.task_id, task.state)).collect();
                let tasks = Arc::new(tasks);
                let kept = state.grid_cache.put(run, &tasks);
                (tasks, kept)
            }
        };
        shown.push_str(&format!(
            "{} {:?} {:?} {} {:?} {:?}\n",
            run.run_id, run.state, run.kind, run.logical_date, run.started_at, run.ended_at
        ));
        if !kept {
            for (task, task_state) in tasks.iter() {
                shown.push_str(&format!("{task} {task_state:?}\n"));
            }
        }
        read.push(tasks);
    }
    let tag = format!("\"grid-{}\"", dagmq_core::dag::content_version_bytes(shown.as_bytes()));
    let cache = [(header::ETAG, tag.clone()), (header::CACHE_CONTROL, "no-cache, private".to_string())];
    let asked = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).unwrap_or("");
    if asked.split(',').any(|one| one.trim() == tag) {
        return Ok((axum::http::StatusCode::NOT_MODIFIED, cache).into_response());
    }
    let runs = records
        .into_iter()
        .zip(read)
        .map(|(run, tasks)| GridRun {
            run_id: run.run_id,
            state: run.state,
            kind: run.kind,
            logical_date: run.logical_date,
            started_at: run.started_at,
            ended_at: run.ended_at,
            tasks: Arc::unwrap_or_clone(tasks),
        })
        .collect();
    Ok((cache, Json(Grid { runs, offset, more })).into_response())
}

pub(super) async fn pause_dag(
    State(state): State<AppState>,
    Path(dag_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    state.scheduler.set_paused(&dag_id, true).await?;
    Ok(Json(serde_json::json!({"dag_id": dag_id, "paused": true})))
}

pub(super) async fn unpause_dag(
    State(state): State<AppState>,
    Path(dag_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
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

pub(super) async fn trigger_run(
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

/// Body of `POST /api/v1/dags/{id}/backfill`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackfillBody {
    /// First time of the range: RFC 3339, or a date or time without an offset, in the DAG's
    /// timezone ([`TimeArg`]).
    from: String,
    /// Last time of the range, inclusive, as `from`.
    to: String,
    /// Parameters over the DAG's defaults.
    #[serde(default)]
    params: Params,
}

pub(super) async fn backfill_dag(
    State(state): State<AppState>,
    Path(dag_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let body: BackfillBody = json_body(body, "backfill")?;
    let time = |end: &str, text: &str| TimeArg::parse(text).map_err(|e| bad_request(format!("backfill {end}: {e}")));
    let (from, to) = (time("from", &body.from)?, time("to", &body.to)?);
    let outcome = state.scheduler.backfill(&dag_id, from, to, body.params).await?;
    let answer = serde_json::json!({"runs": outcome.runs, "created": outcome.created, "existing": outcome.existing});
    Ok((StatusCode::CREATED, Json(answer)))
}

/// Most task states the [`GridCache`] holds (about 100 bytes each); past it, it starts over.
const GRID_CACHE_STATES: usize = 200_000;

/// The task states of finished runs, as the grid last read them: a finished run whose tasks are
/// all final changes only through a restart or a clear, which reopen it (its state and end time
/// change), so its states are read from the store once instead of on every poll of the DAG page.
#[derive(Debug, Default)]
pub(crate) struct GridCache {
    runs: std::sync::Mutex<GridRuns>,
}

/// The cached runs: by run id, the record's (state, start, end) they were read under, and the
/// states; with the count of states held.
#[derive(Debug, Default)]
struct GridRuns {
    by_run: std::collections::HashMap<String, (GridStamp, GridStates)>,
    states: usize,
}

/// A run's task states, by task id, shared between the cache and an answer being built.
pub(crate) type GridStates = Arc<BTreeMap<String, dagmq_core::TaskState>>;

/// What identifies one finishing of a run: a reopened run finishes again with another end.
type GridStamp = (RunState, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

fn grid_stamp(run: &dagmq_core::records::RunRecord) -> GridStamp {
    (run.state, run.started_at, run.ended_at)
}

impl GridCache {
    /// The states of `run`'s tasks when they were cached under this same finishing of the run.
    pub(crate) fn get(&self, run: &dagmq_core::records::RunRecord) -> Option<GridStates> {
        if !run.state.is_final() {
            return None;
        }
        let runs = self.runs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        runs.by_run.get(&run.run_id).filter(|(stamp, _)| *stamp == grid_stamp(run)).map(|(_, tasks)| tasks.clone())
    }

    /// Keeps `tasks` (read after `run`) when the run is finished and every task is final, and
    /// says whether it did (or had them already): then they are fixed under the run's record.
    pub(crate) fn put(&self, run: &dagmq_core::records::RunRecord, tasks: &GridStates) -> bool {
        if !run.state.is_final() || !tasks.values().all(|state| state.is_final()) {
            return false;
        }
        let mut runs = self.runs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if runs.by_run.get(&run.run_id).is_some_and(|(stamp, _)| *stamp == grid_stamp(run)) {
            return true;
        }
        if runs.states + tasks.len() > GRID_CACHE_STATES {
            runs.by_run.clear();
            runs.states = 0;
        }
        runs.states += tasks.len();
        if let Some((_, old)) = runs.by_run.insert(run.run_id.clone(), (grid_stamp(run), tasks.clone())) {
            runs.states -= old.len();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagmq_core::TaskState;
    use dagmq_core::records::RunRecord;

    fn run(state: RunState, ended: Option<i64>) -> RunRecord {
        let mut run: RunRecord = serde_json::from_value(serde_json::json!({
            "run_id": "r1", "dag_id": "d", "state": "running", "kind": "manual",
            "logical_date": "2026-12-01T00:00:00Z", "created_at": "2026-12-01T00:00:00Z",
        }))
        .unwrap();
        run.state = state;
        run.ended_at = ended.and_then(|s| DateTime::from_timestamp(s, 0));
        run
    }

    fn states(all: &[(&str, TaskState)]) -> GridStates {
        Arc::new(all.iter().map(|(id, state)| (id.to_string(), *state)).collect())
    }

    /// A finished run's states are kept; an unfinished run's, a run with a task not final, or a
    /// run reopened and finished again (another end) are read again.
    #[test]
    fn the_grid_cache_keeps_only_finished_runs_under_the_same_finishing() {
        let cache = GridCache::default();
        let done = states(&[("a", TaskState::Success), ("b", TaskState::Failed)]);
        assert!(!cache.put(&run(RunState::Running, None), &done));
        assert_eq!(cache.get(&run(RunState::Running, None)), None, "an unfinished run");
        assert!(!cache.put(&run(RunState::Cancelled, Some(5)), &states(&[("a", TaskState::Running)])));
        assert_eq!(cache.get(&run(RunState::Cancelled, Some(5))), None, "a task not final");
        assert!(cache.put(&run(RunState::Failed, Some(10)), &done));
        assert_eq!(cache.get(&run(RunState::Failed, Some(10))), Some(done.clone()));
        assert_eq!(cache.get(&run(RunState::Running, Some(10))), None, "reopened");
        assert_eq!(cache.get(&run(RunState::Success, Some(20))), None, "finished again");
        assert!(cache.put(&run(RunState::Success, Some(20)), &states(&[("a", TaskState::Success)])));
        assert_eq!(cache.runs.lock().unwrap().states, 1, "the replaced entry's states are not counted twice");
    }
}
