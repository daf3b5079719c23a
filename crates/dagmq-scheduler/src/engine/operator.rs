//! Operator commands on runs and DAGs: clear, restart, cancel, suspend, resume and pause, with the
//! helpers that choose which tasks a restart or a clear sets back to `pending`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use dagmq_core::fail_point;
use dagmq_core::messages::{Control, StoppedTry};
use dagmq_core::state::{TaskEvent, task_transition};
use dagmq_core::store::TaskChange;
use dagmq_core::{BackendError, RunRecord, RunState, TaskInstance, TaskState};

use crate::active_run::ActiveRun;
use crate::commands::CommandError;

use super::Engine;

impl Engine {
    /// Runs tasks of a run again: the named ones, with `downstream` all their descendants, and
    /// in any case the descendants that ended without running (skipped, upstream_failed), whose
    /// rules decide again. Each gets a fresh retry budget; the run is `running` again.
    pub(super) async fn clear(
        &mut self,
        run_id: &str,
        named: &[String],
        downstream: bool,
    ) -> Result<Vec<String>, CommandError> {
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let Some(record) = self.store.run(run_id).await.map_err(backend)? else {
            return Err(CommandError::NotFound(format!("unknown run {run_id:?}")));
        };
        if named.is_empty() {
            return Err(CommandError::BadInput("name at least one task to clear".to_string()));
        }
        if !matches!(record.state, RunState::Running | RunState::Success | RunState::Failed | RunState::Cancelled) {
            return Err(CommandError::Conflict(format!(
                "run {run_id:?} is {}; only a running or finished run can be cleared",
                record.state
            )));
        }
        if self.dag_of(&record).await.map_err(backend)?.is_none() {
            return Err(CommandError::Conflict(format!("run {run_id:?} belongs to unknown dag {:?}", record.dag_id)));
        }
        let tasks = self.store.tasks(run_id).await.map_err(backend)?;
        let index: HashMap<&str, usize> = tasks.iter().enumerate().map(|(i, t)| (t.task_id.as_str(), i)).collect();
        let mut clear = vec![false; tasks.len()];
        for id in named {
            match index.get(id.as_str()) {
                Some(&i) => clear[i] = true,
                None => return Err(CommandError::BadInput(format!("run {run_id:?} has no task {id:?}"))),
            }
        }
        // Descendants: all of them with `downstream`, else those that never ran.
        mark_descendants(&tasks, &mut clear, |task| {
            downstream || matches!(task.state, TaskState::Skipped | TaskState::UpstreamFailed)
        });
        if let Some(busy) =
            tasks.iter().zip(&clear).find(|(t, c)| **c && matches!(t.state, TaskState::Queued | TaskState::Running))
        {
            return Err(CommandError::Conflict(format!(
                "task {:?} of run {run_id:?} is {}; wait for it to finish (or cancel the run) before clearing it",
                busy.0.task_id, busy.0.state
            )));
        }
        let mut changes = Vec::new();
        for (task, _) in tasks.iter().zip(&clear).filter(|(_, c)| **c) {
            if task_transition(task.state, TaskEvent::Clear).is_ok() {
                changes.push(fresh_budget(task, self.now_cache));
            }
        }
        // In the DAG's order (the store's listing has none of its own), follow-ups after.
        if let Some(dag) = self.dag_of(&record).await.map_err(backend)? {
            let order: HashMap<&str, usize> = dag.tasks().iter().enumerate().map(|(i, t)| (t.id.as_str(), i)).collect();
            changes.sort_by_key(|c| {
                (order.get(c.task.task_id.as_str()).copied().unwrap_or(usize::MAX), c.task.task_id.clone())
            });
        }
        let cleared: Vec<String> = changes.iter().map(|c| c.task.task_id.clone()).collect();
        if record.state == RunState::Running {
            let Some(mut run) = self.active.remove(run_id) else {
                return Err(CommandError::Conflict(format!("run {run_id:?} is not loaded yet; try again")));
            };
            if run.in_doubt {
                // A resume whose answer was lost applied: the record just read says so.
                run.record = record.clone();
                run.in_doubt = false;
            }
            let applied = match self.store.transition_tasks(run_id, &changes).await {
                Ok(applied) => applied,
                Err(err) => {
                    // The answer is unknown: the clear may have applied. The view must not end
                    // the run from its old, final tasks while the store has some pending again:
                    // it reads them again, or, failing that, stays unfinished for the sweep.
                    match self.store.tasks(run_id).await {
                        Ok(fresh) => {
                            run.tasks = fresh;
                            run.rebuild();
                            run.tasks_in_doubt = false;
                            let settled = self.settle(&mut run, false).await;
                            self.put_back(run).await.map_err(backend)?;
                            settled.map_err(backend)?;
                        }
                        Err(_) => {
                            run.tasks_in_doubt = true;
                            self.active.insert(run_id.to_string(), run);
                        }
                    }
                    return Err(backend(err));
                }
            };
            fail_point!("scheduler::clear::after_tasks");
            let result = async {
                for (change, applied) in changes.into_iter().zip(&applied) {
                    if let (true, Some(&i)) = (*applied, run.index.get(&change.task.task_id)) {
                        run.replace(i, change.task);
                    }
                }
                self.settle(&mut run, false).await.map(|()| applied)
            }
            .await;
            self.put_back(run).await.map_err(backend)?;
            if !result.map_err(backend)?.iter().all(|&a| a) {
                return Err(CommandError::Conflict(format!(
                    "run {run_id:?}: a task changed meanwhile; the others were cleared, try again"
                )));
            }
        } else {
            self.reopen(&record, &changes, false).await?;
        }
        tracing::info!(run = %run_id, tasks = ?cleared, "tasks cleared");
        Ok(cleared)
    }

    pub(super) async fn restart(&mut self, run_id: &str) -> Result<(), CommandError> {
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let Some(record) = self.store.run(run_id).await.map_err(backend)? else {
            return Err(CommandError::NotFound(format!("unknown run {run_id:?}")));
        };
        if !record.state.is_final() {
            return Err(CommandError::Conflict(format!(
                "run {run_id:?} is {}; only a finished run can be restarted",
                record.state
            )));
        }
        if self.dag_of(&record).await.map_err(backend)?.is_none() {
            return Err(CommandError::Conflict(format!("run {run_id:?} belongs to unknown dag {:?}", record.dag_id)));
        }
        let tasks = self.store.tasks(run_id).await.map_err(backend)?;
        let reset = tasks_to_reset(&tasks);
        if !reset.iter().any(|&r| r) {
            return Err(CommandError::Conflict(format!("run {run_id:?}: every task succeeded; nothing to restart")));
        }
        let mut changes = Vec::new();
        for (task, reset) in tasks.iter().zip(reset) {
            if reset {
                changes.push(fresh_budget(task, self.now_cache));
            }
        }
        self.reopen(&record, &changes, true).await
    }

    /// Puts a run whose state is in doubt at the head of its DAG's queue: `start_dirty` takes
    /// it up (loads it if running, starts it if queued, drops it if finished) before any other
    /// run of the DAG starts, so it holds its place under `max_active_runs` meanwhile.
    pub(super) fn settle_first(&mut self, record: &RunRecord) {
        self.queued.entry(record.dag_id.clone()).or_default().push_front(record.run_id.clone());
        self.dirty.insert(record.dag_id.clone());
    }

    /// Opens a finished run again with `changes` (its reset tasks) applied, in one store step
    /// so that a crash cannot leave one without the other: `running` at once when its DAG has
    /// room under `max_active_runs`, else `queued` behind the DAG's queued runs (as Airflow's
    /// cleared runs), started by `start_dirty` when a slot frees.
    async fn reopen(&mut self, record: &RunRecord, changes: &[TaskChange], restart: bool) -> Result<(), CommandError> {
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let run_id = record.run_id.as_str();
        let max = self.dag_of(record).await.map_err(backend)?.map_or(u32::MAX, |dag| dag.max_active_runs);
        // Runs already waiting go first (one whose start's answer was lost waits at the head).
        let waiting = self.queued.get(&record.dag_id).is_some_and(|queue| !queue.is_empty());
        let room = !waiting && self.running.get(&record.dag_id).copied().unwrap_or(0) < max;
        let mut reopened = record.clone();
        reopened.state = if room { RunState::Running } else { RunState::Queued };
        if restart && room {
            reopened.started_at = Some(self.now_cache);
        }
        reopened.ended_at = None;
        match self.store.transition_run_with_tasks(record.state, &reopened, changes).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(CommandError::Conflict(format!("run {run_id:?} changed state meanwhile; try again")));
            }
            Err(err) => {
                // The answer is unknown: the run may be open again. Reopened `running` (the
                // DAG's queue was empty), it goes to the head of that queue, so that it is
                // settled (loaded if running, dropped if still finished) before any other run
                // of the DAG starts. Reopened `queued`, it cannot be running: it waits behind
                // the runs already queued (started in its turn, dropped if still finished), and
                // never goes ahead of a run at the head whose start is in doubt, which may be
                // running already (simulator seed 2002351).
                if room {
                    self.settle_first(record);
                } else {
                    self.queued.entry(record.dag_id.clone()).or_default().push_back(record.run_id.clone());
                    self.dirty.insert(record.dag_id.clone());
                }
                return Err(backend(err));
            }
        }
        fail_point!("scheduler::restart::after");
        tracing::info!(run = %run_id, state = %reopened.state, "run {}", if restart { "restarted" } else { "cleared" });
        if room {
            if let Err(err) = self.activate(reopened.clone(), false).await {
                // The run is open again but its view may not be loaded: it goes to the head of
                // its DAG's queue, to be taken up before any other run of the DAG starts.
                self.settle_first(&reopened);
                return Err(backend(err));
            }
            Ok(())
        } else {
            self.queued.entry(reopened.dag_id.clone()).or_default().push_back(reopened.run_id.clone());
            self.dirty.insert(reopened.dag_id);
            Ok(())
        }
    }

    /// Cancels a queued or running run: unfinished tasks become `cancelled` and workers are
    /// told to stop the ones running. Answers whether anything was cancelled.
    pub(super) async fn cancel(&mut self, run_id: &str, reason: &str) -> Result<bool, CommandError> {
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let Some(record) = self.store.run(run_id).await.map_err(backend)? else {
            return Err(CommandError::NotFound(format!("unknown run {run_id:?}")));
        };
        if record.state.is_final() {
            return Err(CommandError::Conflict(format!("run {run_id:?} is already {}", record.state)));
        }
        self.cancel_tasks(run_id, reason).await.map_err(backend)?;
        fail_point!("scheduler::cancel::after_tasks");
        let mut cancelled = record.clone();
        cancelled.state = RunState::Cancelled;
        cancelled.ended_at = Some(self.now_cache);
        match self.store.transition_run(record.state, &cancelled).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(CommandError::Conflict(format!("run {run_id:?} changed state meanwhile; try again")));
            }
            // A suspended run keeps its view: settling from the store starts only queued and
            // running runs, and a suspended run dropped here would free its DAG's slot.
            Err(err) if record.state != RunState::Running => return Err(backend(err)),
            Err(err) => {
                // The run may be cancelled already (and then restarted): a view kept would go on
                // scheduling it as running and hold its DAG's slot. The view goes, and the run
                // is settled from the store before any other run of its DAG starts (loaded
                // again if still running, dropped if cancelled).
                self.limits.forget_run(run_id);
                if self.active.remove(run_id).is_some()
                    && let Some(count) = self.running.get_mut(&record.dag_id)
                {
                    *count = count.saturating_sub(1);
                }
                self.settle_first(&record);
                return Err(backend(err));
            }
        }
        self.limits.forget_run(run_id);
        if self.active.remove(run_id).is_some()
            && let Some(count) = self.running.get_mut(&record.dag_id)
        {
            *count = count.saturating_sub(1);
        }
        if let Some(queued) = self.queued.get_mut(&record.dag_id) {
            queued.retain(|id| id != run_id);
        }
        self.dirty.insert(record.dag_id.clone());
        self.metrics.runs_finished.inc(&[record.dag_id.as_str(), "cancelled"]);
        self.record_run_span(&cancelled);
        tracing::info!(run = %run_id, "run cancelled: {reason}");
        Ok(true)
    }

    /// Moves every unfinished task of a run to `cancelled` and broadcasts the stop.
    pub(super) async fn cancel_tasks(&mut self, run_id: &str, reason: &str) -> Result<(), BackendError> {
        let dag_id = self.store.run(run_id).await?.map(|r| r.dag_id).unwrap_or_default();
        // The tries to stop: those this cancel moved out of `queued` or `running`, and those an
        // earlier attempt of it cancelled (its broadcast may not have gone out). No try of a
        // task the store has cancelled at that try may run.
        let mut stopped = Vec::new();
        for mut task in self.store.tasks(run_id).await? {
            if task.state == TaskState::Cancelled && task.try_number > 0 {
                stopped.push(StoppedTry { task_id: task.task_id.clone(), try_number: task.try_number });
            }
            // A worker may claim a queued try meanwhile: read it again until the cancel
            // applies, so no try runs on inside a cancelled run.
            while let Ok(state) = task_transition(task.state, TaskEvent::Cancel) {
                let mut new = task.clone();
                new.state = state;
                new.ended_at = Some(self.now_cache);
                new.error = Some(reason.to_string());
                if self.store.transition_task(run_id, task.state, task.try_number, &new).await? {
                    if matches!(task.state, TaskState::Queued | TaskState::Running) {
                        stopped.push(StoppedTry { task_id: task.task_id.clone(), try_number: task.try_number });
                    }
                    self.metrics.tasks_finished.inc(&[dag_id.as_str(), "cancelled"]);
                    self.metrics.throughput.note(self.now_cache);
                    break;
                }
                match self.store.task(run_id, &task.task_id).await? {
                    Some(fresh) => task = fresh,
                    None => break,
                }
            }
        }
        // The broadcast names the tries stopped, which workers stop at once, claimed or not yet;
        // it only hastens the stop: workers check their tries against the store at every
        // heartbeat, so a lost broadcast delays the stop by one heartbeat interval.
        if let Err(err) = self.queue.broadcast(Control::encode_cancel(run_id, stopped)).await {
            tracing::warn!(run = %run_id, "broadcasting the cancel: {err}; workers learn it from the store");
        }
        Ok(())
    }

    /// Suspends a running run: the run first (so nothing new is queued), then its queued and
    /// running tasks, then the broadcast that stops the tries. A crash in between leaves a
    /// suspended run whose view `settle` finishes suspending on recovery; a suspend whose answer
    /// was lost is finished by the next suspend of the run, or by the sweep.
    pub(super) async fn suspend(&mut self, run_id: &str) -> Result<(), CommandError> {
        let suspended = self.move_run(run_id, RunState::Running, RunState::Suspended, "suspended").await?;
        fail_point!("scheduler::suspend::after_run");
        tracing::info!(run = %run_id, "run suspended");
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let Some(mut run) = self.active.remove(run_id) else {
            // Not in the view (its loading failed): load it now, which stops its tries.
            return self.activate(suspended, false).await.map_err(backend);
        };
        run.record = suspended;
        run.in_doubt = false;
        let result = self.suspend_tasks(&mut run).await;
        self.put_back(run).await.map_err(backend)?;
        result.map_err(backend)
    }

    /// Moves a run from `from` to `to` with a compare-and-set and answers its new record: a
    /// 404 for an unknown run, a 409 for one in another state (`verb`: what only a run in
    /// `from` can be) or that changed meanwhile.
    ///
    /// `from` and `to` are `running` and `suspended`, one way or the other. An error from the
    /// store leaves it unknown whether the move applied: the run is read again, and when that
    /// read fails too, the view is left `suspended` and in doubt (`ActiveRun::in_doubt`), which
    /// is safe whichever way the write went. A run already in `to` whose view is in doubt is
    /// answered as moved: the command is a retry of one whose answer was lost, and finishes it.
    async fn move_run(
        &mut self,
        run_id: &str,
        from: RunState,
        to: RunState,
        verb: &str,
    ) -> Result<RunRecord, CommandError> {
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let Some(record) = self.store.run(run_id).await.map_err(backend)? else {
            return Err(CommandError::NotFound(format!("unknown run {run_id:?}")));
        };
        if record.state == to && self.active.get(run_id).is_some_and(|run| run.in_doubt) {
            return Ok(record);
        }
        if record.state != from {
            return Err(CommandError::Conflict(format!(
                "run {run_id:?} is {}; only a {from} run can be {verb}",
                record.state
            )));
        }
        let mut moved = record;
        moved.state = to;
        let err = match self.store.transition_run(from, &moved).await {
            Ok(true) => return Ok(moved),
            Ok(false) => {
                return Err(CommandError::Conflict(format!("run {run_id:?} changed state meanwhile; try again")));
            }
            Err(err) => err,
        };
        match self.store.run(run_id).await {
            Ok(Some(found)) if found.state == to => {
                tracing::warn!(run = %run_id, "moving the run to {to}: {err}; read again, it applied");
                Ok(found)
            }
            Ok(Some(found)) if found.state == from => Err(backend(err)),
            Ok(_) => Err(CommandError::Conflict(format!("run {run_id:?} changed state meanwhile; try again"))),
            Err(again) => {
                tracing::warn!(run = %run_id, "moving the run to {to}: {err}; reading it again: {again}; in doubt");
                if let Some(run) = self.active.get_mut(run_id) {
                    run.record.state = RunState::Suspended;
                    run.in_doubt = true;
                }
                Err(backend(err))
            }
        }
    }

    /// Moves the queued and running tasks of a suspended run to `suspended` (reading a task
    /// again when a worker claimed it meanwhile) and tells workers to stop the run's tries.
    pub(super) async fn suspend_tasks(&mut self, run: &mut ActiveRun) -> Result<(), BackendError> {
        // A worker may have claimed a task as its upstream succeeded, which the view does not
        // know yet: read them all (the run is suspended in the store, so none is claimed now).
        for task in self.store.tasks(run.id()).await? {
            if let Some(&i) = run.index.get(&task.task_id)
                && matches!(task.state, TaskState::Queued | TaskState::Running)
                && run.tasks[i].state == TaskState::Pending
            {
                run.replace(i, task);
            }
        }
        let mut stopped = Vec::new();
        for i in 0..run.tasks.len() {
            while let Some(new) = run.tasks[i].stopped_by_suspension(self.now_cache) {
                let old = &run.tasks[i];
                if self.store.transition_task(run.id(), old.state, old.try_number, &new).await? {
                    stopped.push(StoppedTry { task_id: old.task_id.clone(), try_number: old.try_number });
                    run.replace(i, new);
                    break;
                }
                match self.store.task(run.id(), &run.tasks[i].task_id).await? {
                    Some(fresh) => drop(run.replace(i, fresh)),
                    None => break,
                }
            }
        }
        if !stopped.is_empty() {
            // As for a cancel, the broadcast names the tries stopped and only hastens the stop:
            // workers stop a try the store no longer has running under them at their next
            // heartbeat.
            if let Err(err) = self.queue.broadcast(Control::encode_cancel(run.id(), stopped)).await {
                tracing::warn!(run = %run.id(), "broadcasting the suspension: {err}; workers learn it from the store");
            }
        }
        Ok(())
    }

    /// Resumes a suspended run: the run goes back to `running`, its suspended tasks get new
    /// tries (try numbers go on; the stopped try does not count against retries) and ready tasks
    /// are queued. A resume whose answer was lost is finished by the next resume of the run, or
    /// by the sweep.
    pub(super) async fn resume(&mut self, run_id: &str) -> Result<(), CommandError> {
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let running = self.move_run(run_id, RunState::Suspended, RunState::Running, "resumed").await?;
        fail_point!("scheduler::resume::after_run");
        tracing::info!(run = %run_id, "run resumed");
        let Some(mut run) = self.active.remove(run_id) else {
            // Not in the view (its loading failed): load it now, which queues what is ready.
            return self.activate(running, false).await.map_err(backend);
        };
        run.record = running;
        run.in_doubt = false;
        let result = self.settle(&mut run, false).await;
        self.put_back(run).await.map_err(backend)?;
        result.map_err(backend)
    }

    pub(super) async fn set_paused(&mut self, dag_id: &str, paused: bool) -> Result<(), CommandError> {
        let Some(dag) = self.config.dags.get(dag_id).cloned() else {
            return Err(self.unknown_dag(dag_id));
        };
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let mut record = self.dag_record(&dag).await.map_err(backend)?;
        record.paused = paused;
        self.store.put_dag_record(&record).await.map_err(backend)?;
        self.dag_records.insert(dag_id.to_string(), record);
        self.watch_at = Some(self.now_cache);
        tracing::info!(dag = %dag_id, paused, "dag {}", if paused { "paused" } else { "unpaused" });
        Ok(())
    }
}

/// Which tasks a restart sets back to `pending`: those that failed, were upstream_failed or
/// cancelled, and the skipped ones downstream of those (their rules decide again). A task
/// skipped by a branch or rule whose upstreams all stay as they are stays skipped.
fn tasks_to_reset(tasks: &[TaskInstance]) -> Vec<bool> {
    let mut reset: Vec<bool> = tasks
        .iter()
        .map(|t| t.state != TaskState::Skipped && task_transition(t.state, TaskEvent::Reset).is_ok())
        .collect();
    mark_descendants(tasks, &mut reset, |task| task.state == TaskState::Skipped);
    reset
}

/// Marks, transitively, every task that `follows` allows and that has a marked upstream.
/// Tasks come in no guaranteed order (follow-ups are appended): repeats until nothing changes.
fn mark_descendants(tasks: &[TaskInstance], marked: &mut [bool], follows: impl Fn(&TaskInstance) -> bool) {
    let index: HashMap<&str, usize> = tasks.iter().enumerate().map(|(i, t)| (t.task_id.as_str(), i)).collect();
    let mut changed = true;
    while changed {
        changed = false;
        for (i, task) in tasks.iter().enumerate() {
            if !marked[i]
                && follows(task)
                && task.after.iter().any(|up| index.get(up.as_str()).is_some_and(|&u| marked[u]))
            {
                marked[i] = true;
                changed = true;
            }
        }
    }
}

/// The change that sets a task back to `pending` with a fresh retry budget (a restart or a
/// clear): its current try is filed in its history, and what the try left is cleared.
fn fresh_budget(task: &TaskInstance, now: DateTime<Utc>) -> TaskChange {
    let mut new = task.clone();
    new.close_try(task.state.as_str(), now);
    new.state = TaskState::Pending;
    new.max_try = task.try_number + task.retries + 1;
    new.error = None;
    new.ended_at = None;
    new.retry_at = None;
    new.worker = None;
    new.progress = None;
    new.output = None;
    TaskChange { expected_state: task.state, expected_try: task.try_number, task: new }
}
