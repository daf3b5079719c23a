//! Recovery and reconciliation: loading every unfinished run when this scheduler takes the lease,
//! bringing a run's view in line with the store (`settle`), putting a view back or finishing its
//! run, taking up reloaded DAGs, and the periodic sweep that reads running runs again and adopts
//! runs missing from the view or whose start the store lost.

use std::collections::HashSet;
use std::sync::Arc;

use dagmq_core::fail_point;
use dagmq_core::state::run_outcome;
use dagmq_core::{BackendError, Dag, RunRecord, RunState, TaskState, Topic};

use crate::active_run::ActiveRun;

use super::queueing::{task_headers, task_message};
use super::{Engine, TimerKind, USER_CANCEL};

impl Engine {
    /// Loads the DAG bookkeeping and every unfinished run; republishes queued tasks, whose
    /// messages may never have reached the queue.
    pub(super) async fn recover(&mut self) -> Result<(), BackendError> {
        self.sync_dags();
        self.active.clear();
        self.limits.clear_waiting();
        self.queued.clear();
        self.restarting.clear();
        self.running.clear();
        self.timers.clear();
        // Another scheduler may have held the lease meanwhile: re-read its bookkeeping, and
        // write the versions of new runs again (one may have expired meanwhile).
        self.dag_records.clear();
        self.stored_dags.clear();
        self.versions_written.clear();
        self.now_cache = self.config.clock.now();
        let dags: Vec<Arc<Dag>> = self.config.dags.iter().cloned().collect();
        for dag in &dags {
            self.dag_record(dag).await?;
        }
        let mut taken = Vec::new();
        for record in self.store.unfinished_runs().await? {
            if self.dag_of(&record).await?.is_none() {
                tracing::warn!(run = %record.run_id, dag = %record.dag_id, "run of an unknown dag left as it is");
                continue;
            }
            match record.state {
                RunState::Queued => self.queued.entry(record.dag_id.clone()).or_default().push_back(record.run_id),
                _ => taken.push(record),
            }
        }
        self.take_up(taken).await?;
        // Every DAG with queued runs, also one whose file is gone (its runs start with their
        // stored versions).
        self.dirty.extend(dags.iter().map(|d| d.id.clone()));
        self.dirty.extend(self.queued.keys().cloned());
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
                    self.outbox.push((Topic::Tasks(task.queue.clone()), message, task_headers(run)));
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

    /// Starts a queued run (or takes up a running one the view lacks) and loads its view.
    pub(super) async fn activate(&mut self, record: RunRecord, recovering: bool) -> Result<(), BackendError> {
        let Some(mut run) = self.load(record, recovering).await? else { return Ok(()) };
        let result = self.settle(&mut run, recovering).await;
        self.put_back(run).await?;
        result
    }

    /// Takes up running and suspended runs the view lacks: loads every one of them first and
    /// settles them after. A view counts its queued and running tasks against the concurrency
    /// limits, so settling one run before the others are loaded would queue tasks past a limit
    /// that the others' tasks already fill.
    async fn take_up(&mut self, records: Vec<RunRecord>) -> Result<(), BackendError> {
        let mut loaded = Vec::with_capacity(records.len());
        for record in records {
            if let Some(run) = self.load(record, true).await? {
                loaded.push(run.id().to_string());
                // Loaded, not yet settled: should loading another fail, the sweep settles it.
                self.active.insert(run.id().to_string(), run);
            }
        }
        for run_id in loaded {
            let Some(mut run) = self.active.remove(&run_id) else { continue };
            let result = self.settle(&mut run, true).await;
            self.put_back(run).await?;
            result?;
        }
        Ok(())
    }

    /// Loads a run's view: starts the run if it is queued, reads its tasks (unless it was
    /// created in this turn), counts it as running and times its timeout. `None` when the run
    /// does not start (another scheduler started it meanwhile) or its DAG is unknown.
    async fn load(&mut self, mut record: RunRecord, recovering: bool) -> Result<Option<ActiveRun>, BackendError> {
        let Some(dag) = self.dag_of(&record).await? else { return Ok(None) };
        // A run found started already is read from the store, whatever was cached at creation.
        let mut read_tasks = recovering;
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
                        read_tasks = true;
                    }
                    _ => return Ok(None),
                }
            }
            tracing::info!(dag = %record.dag_id, run = %record.run_id, "run started");
        }
        let tasks = match self.created.remove(&record.run_id) {
            Some((_, tasks)) if !read_tasks => tasks,
            _ => self.store.tasks(&record.run_id).await?,
        };
        if let (Some(timeout), Some(started_at)) = (dag.run_timeout, record.started_at) {
            let at = started_at + chrono::Duration::from_std(timeout).unwrap_or_default();
            self.add_timer(at, TimerKind::RunTimeout { run_id: record.run_id.clone() });
        }
        *self.running.entry(record.dag_id.clone()).or_default() += 1;
        Ok(Some(ActiveRun::new(record, dag, tasks, self.metrics.view.clone(), self.limits.usage.clone())))
    }

    /// The definition a run completes with: the version it was created with. That is the
    /// current file's DAG, an earlier version this process loaded before a reload, or else the
    /// version as the store keeps it (written before the version's first run was created), so
    /// after a restart a run is scheduled with its own version too, also when its file changed
    /// or is gone. A run created before versions were stored completes with its recorded graph
    /// (task instances carry their upstreams) and the current file's settings. `None` when the
    /// DAG is unknown.
    pub(super) async fn dag_of(&mut self, record: &RunRecord) -> Result<Option<Arc<Dag>>, BackendError> {
        let current = self.config.dags.get(&record.dag_id).cloned();
        let Some(version) = &record.dag_version else { return Ok(current) };
        if let Some(dag) = current.as_ref().filter(|dag| &dag.version == version) {
            return Ok(Some(dag.clone()));
        }
        if let Some(dag) = self.live.version(&record.dag_id, version) {
            return Ok(Some(dag));
        }
        let key = (record.dag_id.clone(), version.clone());
        if !self.stored_dags.contains_key(&key) {
            let stored = self.store.dag_version(&record.dag_id, version).await?;
            let dag = stored.and_then(|stored| match stored.to_dag() {
                Ok(dag) => Some(Arc::new(dag)),
                Err(err) => {
                    tracing::error!(dag = %record.dag_id, version = %version, "stored dag version does not build: {err}");
                    None
                }
            });
            self.stored_dags.insert(key.clone(), dag);
        }
        match self.stored_dags.get(&key).cloned().flatten() {
            Some(dag) => Ok(Some(dag)),
            None => {
                if current.is_some() {
                    tracing::warn!(run = %record.run_id, dag = %record.dag_id, version = %version,
                        "the store has no definition of the run's version: scheduling it with the current file's settings");
                }
                Ok(current)
            }
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
            let (task_id, fresh) = run.deferred.remove(0);
            // By id: a sweep may have rebuilt the view in another order since it was deferred.
            let Some(&i) = run.index.get(&task_id) else { continue };
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
        // Nor does a view whose tasks the store may have changed (a clear whose answer and
        // re-read were lost: `ActiveRun::tasks_in_doubt`) end the run: the sweep reads them.
        if !run.all_final() || run.expansion_pending() || run.tasks_in_doubt {
            self.active.insert(run.id().to_string(), run);
            return Ok(());
        }
        // The run is finished from the state the store has, which a view in doubt does not know.
        if let Err(err) = self.resolve_doubt(&mut run).await {
            self.active.insert(run.id().to_string(), run);
            return Err(err);
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
        self.record_run_span(&finished);
        if let Some(count) = self.running.get_mut(&dag_id) {
            *count = count.saturating_sub(1);
        }
        self.dirty.insert(dag_id);
        Ok(())
    }

    /// Reads the record of a run whose view is in doubt (`ActiveRun::in_doubt`: a suspend or
    /// resume whose answer was lost) and takes the store's state, so that `settle` finishes
    /// what the command began: it stops the tries of a suspended run and queues what is ready
    /// in a running one.
    pub(super) async fn resolve_doubt(&mut self, run: &mut ActiveRun) -> Result<(), BackendError> {
        if !run.in_doubt {
            return Ok(());
        }
        if let Some(record) = self.store.run(run.id()).await? {
            tracing::info!(run = %run.id(), state = %record.state, "run read again after a lost answer");
            run.record = record;
        }
        run.in_doubt = false;
        Ok(())
    }

    /// Re-reads every running run from the store and settles it: the safety net for status
    /// messages that were lost between a worker's store write and its publish, and for the
    /// state of a run whose suspend or resume lost its answer.
    pub(super) async fn sweep(&mut self) -> Result<(), BackendError> {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for run_id in ids {
            let Some(mut run) = self.active.remove(&run_id) else { continue };
            let result = async {
                self.resolve_doubt(&mut run).await?;
                run.tasks = self.store.tasks(&run_id).await?;
                run.rebuild();
                run.tasks_in_doubt = false;
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
        let mut taken = Vec::new();
        for record in self.store.unfinished_runs().await? {
            if let Some(view) = self.active.get(&record.run_id) {
                if record.state == RunState::Queued {
                    self.restart_rolled_back(&record);
                } else if record.state != view.record.state && !view.in_doubt {
                    self.take_stored_state(record).await?;
                }
                continue;
            }
            if self.active.contains_key(&record.run_id) || known.contains(&record.run_id) {
                continue;
            }
            if self.dag_of(&record).await?.is_none() {
                continue;
            }
            tracing::warn!(run = %record.run_id, state = %record.state, "run missing from the scheduler's view: taking it up");
            match record.state {
                RunState::Queued => {
                    self.dirty.insert(record.dag_id.clone());
                    self.queued.entry(record.dag_id.clone()).or_default().push_back(record.run_id);
                }
                _ => taken.push(record),
            }
        }
        self.take_up(taken).await
    }

    /// Drops the view of a run the store has `queued` again while the view has it started: a
    /// store that went backwards (a Redis failover without replicas to wait for) lost the run's
    /// start. Every claim of its tries is refused while the run is `queued`, so the view would
    /// queue and republish them for ever and hold its DAG's slot under `max_active_runs`. The
    /// view goes (its running count and limit usage with it) and the run waits at the head of
    /// its DAG's queue, to be started again, its `queued` tasks published again, before any
    /// other run of the DAG starts.
    fn restart_rolled_back(&mut self, record: &RunRecord) {
        let Some(run) = self.active.remove(&record.run_id) else { return };
        tracing::warn!(
            run = %record.run_id, view = %run.record.state,
            "the store has the run queued again (its start was lost): starting it again"
        );
        drop(run);
        self.limits.forget_run(&record.run_id);
        self.republished.retain(|(run_id, _, _), _| run_id != &record.run_id);
        if let Some(count) = self.running.get_mut(&record.dag_id) {
            *count = count.saturating_sub(1);
        }
        self.restarting.insert(record.run_id.clone());
        if let Some(queue) = self.queued.get_mut(&record.dag_id) {
            queue.retain(|id| id != &record.run_id);
        }
        self.settle_first(record);
    }

    /// Takes the store's state of a run whose view holds it `running` while the store has it
    /// `suspended`, or the other way round, with no command in doubt: a store that went
    /// backwards lost a suspend or a resume (the command is undone, as its answer says nothing
    /// of a later failover). The view follows the store and is settled: a running run queues
    /// its suspended tasks as new tries (as a resume does), a suspended one stops its tries.
    async fn take_stored_state(&mut self, record: RunRecord) -> Result<(), BackendError> {
        let Some(mut run) = self.active.remove(&record.run_id) else { return Ok(()) };
        tracing::warn!(
            run = %record.run_id, view = %run.record.state, store = %record.state,
            "the store has the run in another state (a command lost in a rollback): taking the store's"
        );
        run.record = record;
        let result = async {
            run.tasks = self.store.tasks(run.id()).await?;
            run.rebuild();
            run.tasks_in_doubt = false;
            self.settle(&mut run, false).await
        }
        .await;
        self.put_back(run).await?;
        result
    }
}
