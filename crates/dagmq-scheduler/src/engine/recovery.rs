//! Recovery and reconciliation: loading every unfinished run when this scheduler takes the lease,
//! bringing a run's view in line with the store (`settle`), putting a view back or finishing its
//! run, taking up reloaded DAGs, and the periodic sweep that reads running runs again and adopts
//! runs missing from the view.

use std::collections::HashSet;
use std::sync::Arc;

use dagmq_core::fail_point;
use dagmq_core::state::run_outcome;
use dagmq_core::{BackendError, Dag, RunRecord, RunState, TaskState, Topic};

use crate::active_run::ActiveRun;

use super::queueing::task_message;
use super::{Engine, TimerKind, USER_CANCEL};

impl Engine {
    /// Loads the DAG bookkeeping and every unfinished run; republishes queued tasks, whose
    /// messages may never have reached the queue.
    pub(super) async fn recover(&mut self) -> Result<(), BackendError> {
        self.sync_dags();
        self.active.clear();
        self.limits.clear_waiting();
        self.queued.clear();
        self.running.clear();
        self.timers.clear();
        // Another scheduler may have held the lease meanwhile: re-read its bookkeeping.
        self.dag_records.clear();
        self.now_cache = self.config.clock.now();
        let dags: Vec<Arc<Dag>> = self.config.dags.iter().cloned().collect();
        for dag in &dags {
            self.dag_record(dag).await?;
        }
        for record in self.store.unfinished_runs().await? {
            if self.dag_of(&record).is_none() {
                tracing::warn!(run = %record.run_id, dag = %record.dag_id, "run of an unknown dag left as it is");
                continue;
            }
            match record.state {
                RunState::Queued => self.queued.entry(record.dag_id.clone()).or_default().push_back(record.run_id),
                _ => self.activate(record, true).await?,
            }
        }
        self.dirty.extend(dags.iter().map(|d| d.id.clone()));
        self.watch_at = Some(self.now_cache);
        Ok(())
    }

    /// Brings a run's whole view in line with its tasks' states: follow-ups added, failures
    /// propagated, retries timed, ready tasks queued, and (when recovering) queued tasks
    /// published again.
    pub(super) async fn settle(&mut self, run: &mut ActiveRun, republish_queued: bool) -> Result<(), BackendError> {
        for i in 0..run.tasks.len() {
            if run.tasks[i].state == TaskState::Success {
                self.expand(run, i).await?;
                self.skip_not_chosen(run, i).await?;
            }
        }
        for i in 0..run.tasks.len() {
            let task = &run.tasks[i];
            match task.state {
                TaskState::UpForRetry => match task.retry_at {
                    Some(at) => {
                        let kind = TimerKind::Retry {
                            run_id: run.id().to_string(),
                            task_id: task.task_id.clone(),
                            try_number: task.try_number,
                        };
                        self.add_timer(at, kind);
                    }
                    None => self.schedule_retry(run, i, false).await?,
                },
                TaskState::Queued if republish_queued => {
                    let message = task_message(run, task);
                    self.outbox.push((Topic::Tasks(task.queue.clone()), message));
                }
                _ => {}
            }
        }
        if run.record.state == RunState::Suspended {
            // Finishes a suspension a crash interrupted: no try of a suspended run goes on.
            return self.suspend_tasks(run).await;
        }
        let suspended: Vec<usize> =
            (0..run.tasks.len()).filter(|&i| run.tasks[i].state == TaskState::Suspended).collect();
        self.queue_tasks(run, run.by_priority(suspended)).await?;
        self.advance(run, (0..run.tasks.len()).collect()).await
    }

    /// Starts a queued run (or takes over a running one on recovery) and loads its view.
    pub(super) async fn activate(&mut self, mut record: RunRecord, recovering: bool) -> Result<(), BackendError> {
        let Some(dag) = self.dag_of(&record) else { return Ok(()) };
        if record.state == RunState::Queued {
            let mut started = record.clone();
            started.state = RunState::Running;
            started.started_at = Some(self.now_cache);
            if self.store.transition_run(RunState::Queued, &started).await? {
                record = started;
            } else {
                // Started already: by an earlier try of this start whose answer was lost (then
                // it is ours to load), or it ended meanwhile (cancelled: nothing to do).
                match self.store.run(&record.run_id).await? {
                    Some(current)
                        if current.state == RunState::Running && !self.active.contains_key(&current.run_id) =>
                    {
                        record = current;
                    }
                    _ => return Ok(()),
                }
            }
            tracing::info!(dag = %record.dag_id, run = %record.run_id, "run started");
        }
        if let (Some(timeout), Some(started_at)) = (dag.run_timeout, record.started_at) {
            let at = started_at + chrono::Duration::from_std(timeout).unwrap_or_default();
            self.add_timer(at, TimerKind::RunTimeout { run_id: record.run_id.clone() });
        }
        let tasks = match self.created.remove(&record.run_id) {
            Some((_, tasks)) if !recovering => tasks,
            _ => self.store.tasks(&record.run_id).await?,
        };
        *self.running.entry(record.dag_id.clone()).or_default() += 1;
        let mut run = ActiveRun::new(record, dag, tasks, self.metrics.view.clone(), self.limits.usage.clone());
        let result = self.settle(&mut run, recovering).await;
        self.put_back(run).await?;
        result
    }

    /// The definition a run completes with: the version it was created with when this
    /// scheduler has loaded it (the current file, or an earlier version it saw before a
    /// reload), else the current one. After a restart, a run of a version that is no longer on
    /// disk completes with its recorded graph (task instances carry their upstreams) and the
    /// current file's task settings.
    pub(super) fn dag_of(&self, record: &RunRecord) -> Option<Arc<Dag>> {
        let current = self.config.dags.get(&record.dag_id).cloned();
        match &record.dag_version {
            Some(version) if current.as_ref().is_none_or(|dag| &dag.version != version) => {
                self.live.version(&record.dag_id, version).or(current)
            }
            _ => current,
        }
    }

    /// Takes the DAGs of the latest reload: new runs use them, runs in flight keep theirs, the
    /// watcher looks at the schedules again.
    pub(super) fn sync_dags(&mut self) {
        let generation = self.live.generation();
        if generation == self.dags_generation {
            return;
        }
        self.dags_generation = generation;
        self.config.dags = self.live.current();
        self.config.default_params = (*self.live.default_params()).clone();
        self.watch_at = Some(self.now_cache);
        self.dirty.extend(self.config.dags.iter().map(|d| d.id.clone()));
        self.dirty.extend(self.queued.keys().cloned());
        tracing::info!(dags = self.config.dags.len(), refused = self.live.refused().len(), "dags reloaded");
    }

    /// Keeps a run in the active set, or finishes it once every task is final. Changes found on
    /// the way (`deferred`) are acted on first.
    pub(super) async fn put_back(&mut self, mut run: ActiveRun) -> Result<(), BackendError> {
        while !run.deferred.is_empty() {
            let (i, fresh) = run.deferred.remove(0);
            if fresh.try_number < run.tasks[i].try_number {
                continue;
            }
            if let Err(err) = self.on_task_changed(&mut run, i, fresh, true).await {
                // The rest stay deferred; the sweep reads the whole run again anyway.
                self.active.insert(run.id().to_string(), run);
                return Err(err);
            }
        }
        // Follow-ups a success returned but the store did not take yet keep the run going: the
        // sweep adds them (`settle`), and the run ends after they do.
        if !run.all_final() || run.expansion_pending() {
            self.active.insert(run.id().to_string(), run);
            return Ok(());
        }
        // A run whose tasks a user's cancel reached ends cancelled, even when the scheduler
        // died between cancelling the tasks and the run.
        let cancelled_by_user =
            run.tasks.iter().any(|t| t.state == TaskState::Cancelled && t.error.as_deref() == Some(USER_CANCEL));
        let outcome = if cancelled_by_user {
            RunState::Cancelled
        } else {
            run_outcome(run.tasks.iter().map(|t| t.state)).unwrap_or(RunState::Failed)
        };
        let mut finished = run.record.clone();
        finished.state = outcome;
        finished.ended_at = Some(self.now_cache);
        let dag_id = finished.dag_id.clone();
        if let Err(err) = self.store.transition_run(run.record.state, &finished).await {
            // Keep the run active; the sweep finishes it once the store answers.
            self.active.insert(run.id().to_string(), run);
            return Err(err);
        }
        fail_point!("scheduler::finish_run::after");
        self.limits.forget_run(&finished.run_id);
        tracing::info!(dag = %dag_id, run = %finished.run_id, state = %outcome, "run finished");
        self.metrics.runs_finished.inc(&[dag_id.as_str(), outcome.as_str()]);
        if let Some(count) = self.running.get_mut(&dag_id) {
            *count = count.saturating_sub(1);
        }
        self.dirty.insert(dag_id);
        Ok(())
    }

    /// Re-reads every running run from the store and settles it: the safety net for status
    /// messages that were lost between a worker's store write and its publish.
    pub(super) async fn sweep(&mut self) -> Result<(), BackendError> {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for run_id in ids {
            let Some(mut run) = self.active.remove(&run_id) else { continue };
            let result = async {
                run.tasks = self.store.tasks(&run_id).await?;
                run.rebuild();
                self.settle(&mut run, false).await
            }
            .await;
            self.put_back(run).await?;
            result?;
        }
        self.adopt_unknown_runs().await
    }

    /// Takes up unfinished runs the store has and this scheduler's view does not: a run whose
    /// creation applied but answered an error (the trigger's retry finds it by key and does
    /// not queue it again), or a restarted or cleared run whose loading failed. Queued ones join
    /// their DAG's queue; running and suspended ones are loaded as on recovery.
    async fn adopt_unknown_runs(&mut self) -> Result<(), BackendError> {
        let known: HashSet<String> = self.queued.values().flatten().cloned().collect();
        for record in self.store.unfinished_runs().await? {
            if self.active.contains_key(&record.run_id) || known.contains(&record.run_id) {
                continue;
            }
            if self.dag_of(&record).is_none() {
                continue;
            }
            tracing::warn!(run = %record.run_id, state = %record.state, "run missing from the scheduler's view: taking it up");
            match record.state {
                RunState::Queued => {
                    self.dirty.insert(record.dag_id.clone());
                    self.queued.entry(record.dag_id.clone()).or_default().push_back(record.run_id);
                }
                _ => self.activate(record, true).await?,
            }
        }
        Ok(())
    }
}
