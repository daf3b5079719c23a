//! `GET /api/v1/capacity`: how much of each concurrency limit is in use, which runs are held
//! back and why, and each live worker's used and free slots. Read from the store's unfinished
//! runs and the worker registry, so it costs reads in proportion to what is in flight, not to
//! the history.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use dagmq_core::{Dag, RunRecord, RunState, TaskInstance, TaskState};
use serde::{Deserialize, Serialize};

use super::{ApiResult, AppState};

/// A pool's slots.
#[derive(Debug, Serialize, Deserialize)]
pub struct PoolUse {
    /// The pool.
    pub pool: String,
    /// Its slots.
    pub slots: u32,
    /// Slots held by queued and running tasks.
    pub used: u32,
    /// Slots free.
    pub free: u32,
    /// Ready tasks waiting for a slot of it.
    pub waiting: usize,
}

/// A DAG's limits in use.
#[derive(Debug, Serialize, Deserialize)]
pub struct DagUse {
    /// The DAG.
    pub dag_id: String,
    /// Its `max_active_runs`.
    pub max_active_runs: u32,
    /// Runs running or suspended (they hold a place under `max_active_runs`).
    pub active_runs: usize,
    /// Runs queued behind them.
    pub queued_runs: usize,
    /// Its `max_active_tasks` (none when unset).
    pub max_active_tasks: Option<u32>,
    /// Tasks queued or running across its runs.
    pub active_tasks: usize,
}

/// A live worker's slots.
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerUse {
    /// The worker.
    pub name: String,
    /// The pools it consumes.
    pub queues: Vec<String>,
    /// Tries it runs at once at most.
    pub concurrency: u32,
    /// Tries it runs now.
    pub used: u32,
    /// Slots free.
    pub free: u32,
}

/// A worker pool (a task queue, `queue` of a task): its backlog and who consumes it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct QueueUse {
    /// The pool (`dagmq.tasks.<queue>`).
    pub queue: String,
    /// Tasks queued on it, waiting for a worker.
    pub queued: usize,
    /// Tasks of it running.
    pub running: usize,
    /// Live workers consuming it.
    pub workers: usize,
    /// Their slots in all (shared with the other pools they consume).
    pub slots: u32,
    /// `no live worker consumes pool Q` while tasks wait on it and no live worker consumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

/// A queued run and what holds it back.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeldRun {
    /// The run.
    pub run_id: String,
    /// Its DAG.
    pub dag_id: String,
    /// Why it waits, e.g. `max_active_runs 3/3`.
    pub waiting_for: String,
}

/// The answer of `GET /api/v1/capacity`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Capacity {
    /// Every pool the scheduler knows, by name.
    pub pools: Vec<PoolUse>,
    /// Every DAG with an unfinished run, by id.
    pub dags: Vec<DagUse>,
    /// The live workers, by name.
    pub workers: Vec<WorkerUse>,
    /// Every worker pool with tasks queued or running, or a live worker consuming it, by name.
    pub queues: Vec<QueueUse>,
    /// Queued runs, oldest first, with what holds each back.
    pub held_runs: Vec<HeldRun>,
}

/// Why a queued run of a DAG whose `max_active_runs` is `max` with `active` runs waits.
pub(super) fn held_reason(active: usize, max: u32) -> String {
    format!("max_active_runs {active}/{max}")
}

/// Runs that hold a place under `max_active_runs`.
pub(super) fn is_active(state: RunState) -> bool {
    matches!(state, RunState::Running | RunState::Suspended)
}

/// The DAG a run was created with, or the DAG as loaded now.
pub(super) fn dag_of(state: &AppState, run: &RunRecord) -> Option<Arc<Dag>> {
    let live = &state.scheduler.live;
    run.dag_version
        .as_deref()
        .and_then(|version| live.version(&run.dag_id, version))
        .or_else(|| live.current().get(&run.dag_id).cloned())
}

pub(super) async fn capacity(State(state): State<AppState>) -> ApiResult<Json<Capacity>> {
    let handle = &state.scheduler;
    let store = &handle.store;
    let mut runs = store.unfinished_runs().await?;
    runs.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.run_id.cmp(&b.run_id)));
    let mut pools: BTreeMap<String, PoolUse> = handle
        .pools
        .iter()
        .map(|(pool, slots)| {
            (pool.clone(), PoolUse { pool: pool.clone(), slots: *slots, used: 0, free: *slots, waiting: 0 })
        })
        .collect();
    let mut dags: BTreeMap<String, DagUse> = BTreeMap::new();
    let mut queues: BTreeMap<String, QueueUse> = BTreeMap::new();
    let queue_use = |queue: &str| QueueUse { queue: queue.to_string(), ..QueueUse::default() };
    for run in &runs {
        let dag = dag_of(&state, run);
        let entry = dags.entry(run.dag_id.clone()).or_insert_with(|| DagUse {
            dag_id: run.dag_id.clone(),
            max_active_runs: dag.as_ref().map_or(u32::MAX, |dag| dag.max_active_runs),
            active_runs: 0,
            queued_runs: 0,
            max_active_tasks: dag.as_ref().and_then(|dag| dag.max_active_tasks),
            active_tasks: 0,
        });
        if run.state == RunState::Queued {
            entry.queued_runs += 1;
            continue;
        }
        entry.active_runs += usize::from(is_active(run.state));
        let tasks: Vec<TaskInstance> = store.tasks(&run.run_id).await?;
        for task in &tasks {
            let holds = matches!(task.state, TaskState::Queued | TaskState::Running);
            entry.active_tasks += usize::from(holds);
            if holds {
                let queue = queues.entry(task.queue.clone()).or_insert_with(|| queue_use(&task.queue));
                queue.queued += usize::from(task.state == TaskState::Queued);
                queue.running += usize::from(task.state == TaskState::Running);
            }
            let spec = dag.as_ref().and_then(|dag| dag.task(&task.task_id));
            let Some(config) = spec.map(|spec| &spec.config) else { continue };
            let Some(pool) = config.pool.as_ref().and_then(|pool| pools.get_mut(pool)) else { continue };
            if holds {
                pool.used += config.pool_slots;
            } else if task.state == TaskState::Pending
                && handle
                    .waiting_reason(&run.run_id, &task.task_id)
                    .is_some_and(|why| why == format!("pool {}", pool.pool))
            {
                pool.waiting += 1;
            }
        }
    }
    for pool in pools.values_mut() {
        pool.free = pool.slots.saturating_sub(pool.used);
    }
    let held_runs = runs
        .iter()
        .filter(|run| run.state == RunState::Queued)
        .filter_map(|run| {
            let dag = &dags[&run.dag_id];
            (dag.active_runs as u64 >= u64::from(dag.max_active_runs)).then(|| HeldRun {
                run_id: run.run_id.clone(),
                dag_id: run.dag_id.clone(),
                waiting_for: held_reason(dag.active_runs, dag.max_active_runs),
            })
        })
        .collect();
    let live = super::stats::live_workers(&state).await?;
    for worker in &live {
        for consumed in &worker.queues {
            let queue = queues.entry(consumed.clone()).or_insert_with(|| queue_use(consumed));
            queue.workers += 1;
            queue.slots = queue.slots.saturating_add(worker.concurrency);
        }
    }
    for queue in queues.values_mut() {
        if queue.workers == 0 && queue.queued > 0 {
            queue.waiting_for = Some(format!("no live worker consumes pool {}", queue.queue));
        }
    }
    let workers = live
        .into_iter()
        .map(|worker| {
            let used = u32::try_from(worker.running.len()).unwrap_or(u32::MAX);
            WorkerUse {
                name: worker.name,
                queues: worker.queues,
                concurrency: worker.concurrency,
                used,
                free: worker.concurrency.saturating_sub(used),
            }
        })
        .collect();
    Ok(Json(Capacity {
        pools: pools.into_values().collect(),
        dags: dags.into_values().collect(),
        workers,
        queues: queues.into_values().collect(),
        held_runs,
    }))
}
