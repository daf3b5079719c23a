//! What the scheduler and its workers are doing now: `/metrics`, the live workers and the stats
//! of the overview page.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use dagmq_core::store::RunFilter;
use dagmq_core::{RunState, TaskState, Topic, WorkerInfo};
use serde::{Deserialize, Serialize};

use crate::commands::SchedulerHandle;

use super::security::check_metrics_token;
use super::{ApiResult, AppState, MAX_LIMIT, WORKER_STALE_AFTER};

/// OpenMetrics text: the loop's counters plus queue depths and live workers read now. Tasks in
/// flight come from counts the scheduler keeps of its runs, so a scrape costs one depth query
/// per queue and one read of the worker registry, however many runs are unfinished.
pub(super) async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> ApiResult<Response> {
    check_metrics_token(state.config.scrape_token(), &headers)?;
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

pub(super) async fn list_workers(State(state): State<AppState>) -> ApiResult<Json<Vec<WorkerInfo>>> {
    Ok(Json(live_workers(&state).await?))
}

pub(super) async fn live_workers(state: &AppState) -> ApiResult<Vec<WorkerInfo>> {
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

pub(super) async fn stats(State(state): State<AppState>) -> ApiResult<Json<StatsView>> {
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
