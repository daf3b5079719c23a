//! Outcomes: status updates read against the store and acted on (success, failure, retry), the
//! tries a worker claimed eagerly, re-reads after a refused compare-and-set, retry timers, and
//! failure and retry notifications.

use std::collections::HashMap;

use dagmq_core::fail_point;
use dagmq_core::messages::StatusUpdate;
use dagmq_core::queue::join_all;
use dagmq_core::{BackendError, TaskConfig, TaskInstance, TaskState};

use crate::active_run::ActiveRun;
use crate::notifier::{Notification, NotificationKind};

use super::{Engine, Settle, TimerKind};

impl Engine {
    /// Reads, in one call per run, the store's instances of the tasks (by run) that a batch of
    /// status updates is about. A failed read is no error: each update then reads its task alone.
    pub(super) async fn prefetch(
        &self,
        wanted: HashMap<String, Vec<String>>,
    ) -> HashMap<(String, String), TaskInstance> {
        // The reads of all runs go out together (the store pipelines them on its connections).
        let reads = wanted.into_iter().map(|(run_id, task_ids)| async move {
            let ids: Vec<&str> = task_ids.iter().map(String::as_str).collect();
            let found = self.store.tasks_by_id(&run_id, &ids).await;
            (run_id, task_ids.len(), found)
        });
        let mut fresh = HashMap::new();
        for (run_id, count, found) in join_all(reads).await {
            match found {
                Ok(found) => {
                    for task in found.into_iter().flatten() {
                        fresh.insert((run_id.clone(), task.task_id.clone()), task);
                    }
                }
                Err(err) => tracing::warn!(run = %run_id, "reading {count} tasks at once: {err}"),
            }
        }
        fresh
    }

    pub(super) async fn on_status_message(
        &mut self,
        update: StatusUpdate,
        prefetched: Option<TaskInstance>,
        claimed: Vec<TaskInstance>,
    ) -> Settle {
        let Some(mut run) = self.active.remove(&update.run_id) else {
            // A finished, cancelled or unknown run: nothing left to schedule.
            tracing::debug!(run = %update.run_id, task = %update.task_id, "status for an inactive run ignored");
            return Settle::Ack;
        };
        for claimed in claimed {
            take_claimed(&mut run, claimed);
        }
        let result = self.on_status(&mut run, &update, prefetched).await;
        let put_back = self.put_back(run).await;
        match put_back.and(result) {
            Ok(settle) => settle,
            Err(err) => {
                tracing::error!(run = %update.run_id, task = %update.task_id, "status: {err}");
                Settle::Requeue
            }
        }
    }

    /// Acts on one status update. `prefetched` is the task as read at the start of the batch;
    /// an instance older than the scheduler's own view (an earlier try) is read again.
    async fn on_status(
        &mut self,
        run: &mut ActiveRun,
        update: &StatusUpdate,
        prefetched: Option<TaskInstance>,
    ) -> Result<Settle, BackendError> {
        let Some(&i) = run.index.get(&update.task_id) else {
            return Ok(Settle::DeadLetter(format!("status: run {:?} has no task {:?}", update.run_id, update.task_id)));
        };
        let fresh = match prefetched {
            Some(task) if task.try_number >= run.tasks[i].try_number => Some(task),
            _ => self.store.task(run.id(), &update.task_id).await?,
        };
        fail_point!("scheduler::status::after_read");
        match fresh {
            Some(fresh) => self.on_task_changed(run, i, fresh, true).await?,
            None => tracing::warn!(run = %update.run_id, task = %update.task_id, "task vanished from the store"),
        }
        Ok(Settle::Ack)
    }

    /// Takes the store's latest instance of task `i` and does what its change calls for.
    pub(super) async fn on_task_changed(
        &mut self,
        run: &mut ActiveRun,
        i: usize,
        fresh: TaskInstance,
        notify: bool,
    ) -> Result<(), BackendError> {
        let old = run.replace(i, fresh);
        let new = &run.tasks[i];
        if old.state == new.state && old.try_number == new.try_number {
            return Ok(());
        }
        if matches!(new.state, TaskState::Success | TaskState::Failed | TaskState::UpForRetry) {
            let dag = run.record.dag_id.as_str();
            self.metrics.tasks_finished.inc(&[dag, new.state.as_str()]);
            if new.state != TaskState::UpForRetry {
                self.metrics.throughput.note(self.now_cache);
            }
            if let (Some(start), Some(end)) = (new.started_at, new.ended_at) {
                let seconds = (end - start).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                self.metrics.task_duration.observe(&[dag], seconds);
            }
        }
        match new.state {
            TaskState::Success => {
                self.expand(run, i).await?;
                self.skip_not_chosen(run, i).await?;
                self.advance(run, run.downstream[i].clone()).await?;
            }
            TaskState::UpForRetry if new.retry_at.is_none() => {
                self.schedule_retry(run, i, notify).await?;
            }
            TaskState::Failed => {
                if notify && task_config(run, i).alert_on_failure {
                    self.notify(run, i, NotificationKind::Failure);
                }
                self.advance(run, run.downstream[i].clone()).await?;
            }
            TaskState::UpstreamFailed | TaskState::Skipped => {
                self.advance(run, run.downstream[i].clone()).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Re-reads task `i` after a refused compare-and-set to queue it, and takes what it finds
    /// into the view with `take_moved_on`.
    pub(super) async fn refresh_refused(&mut self, run: &mut ActiveRun, i: usize) -> Result<(), BackendError> {
        if let Some(fresh) = self.store.task(run.id(), &run.tasks[i].task_id).await? {
            take_moved_on(run, i, fresh);
        }
        Ok(())
    }

    /// Re-reads task `i` after a refused compare-and-set.
    pub(super) async fn refresh_task(&mut self, run: &mut ActiveRun, i: usize) -> Result<(), BackendError> {
        if let Some(fresh) = self.store.task(run.id(), &run.tasks[i].task_id).await? {
            run.replace(i, fresh);
        }
        Ok(())
    }

    /// Sets the retry time of a task that is `up_for_retry` and starts its timer.
    pub(super) async fn schedule_retry(
        &mut self,
        run: &mut ActiveRun,
        i: usize,
        notify: bool,
    ) -> Result<(), BackendError> {
        let task = &run.tasks[i];
        let first_try = task.max_try.saturating_sub(task.retries).max(1);
        let retry_number = task.try_number + 1 - first_try.min(task.try_number);
        let delay = task_config(run, i).retry_delay_for(retry_number);
        let mut new = task.clone();
        let at = self.now_cache + chrono::Duration::from_std(delay).unwrap_or_default();
        new.retry_at = Some(at);
        if !self.store.transition_task(run.id(), TaskState::UpForRetry, task.try_number, &new).await? {
            return self.refresh_task(run, i).await;
        }
        fail_point!("scheduler::retry::after_cas");
        let kind =
            TimerKind::Retry { run_id: run.id().to_string(), task_id: new.task_id.clone(), try_number: new.try_number };
        run.replace(i, new);
        self.add_timer(at, kind);
        if notify && task_config(run, i).alert_on_retry {
            self.notify(run, i, NotificationKind::Retry);
        }
        Ok(())
    }

    /// Sends a notification off the loop.
    fn notify(&self, run: &ActiveRun, i: usize, kind: NotificationKind) {
        fail_point!("scheduler::notify::before_send");
        let task = &run.tasks[i];
        let notification = Notification {
            kind,
            dag_id: run.record.dag_id.clone(),
            run_id: run.id().to_string(),
            task_id: task.task_id.clone(),
            try_number: task.try_number,
            error: task.error.clone(),
            at: self.now_cache,
        };
        let notifier = self.config.notifier.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            match notifier.notify(&notification).await {
                Ok(()) => metrics.notifications.inc(&["sent"]),
                Err(err) => {
                    tracing::error!(run = %notification.run_id, task = %notification.task_id, "notification not delivered: {err}");
                    metrics.notifications.inc(&["failed"]);
                }
            }
        });
    }
}

/// Takes into the view a try that a worker claimed as its upstream succeeded (eager dispatch),
/// read with that upstream's status update, so the scheduler does not try to queue it.
fn take_claimed(run: &mut ActiveRun, claimed: TaskInstance) {
    let Some(&j) = run.index.get(&claimed.task_id) else { return };
    if claimed.try_number > run.tasks[j].try_number {
        take_moved_on(run, j, claimed);
    }
}

/// Takes into the view task `i` as found in the store after it moved on without the scheduler
/// (a worker claimed it as its upstream succeeded, and it may have finished since). A queued or
/// running try joins the view at once. Any other change waits in the run's `deferred` list and
/// is acted on before the run goes back (`put_back`), as its status update would be: taking it
/// into the view now would make that update look like a duplicate. Until then a newer try is
/// shown as running, so nothing tries to queue it again.
pub(super) fn take_moved_on(run: &mut ActiveRun, i: usize, fresh: TaskInstance) {
    if matches!(fresh.state, TaskState::Queued | TaskState::Running) {
        run.replace(i, fresh);
        return;
    }
    if fresh.try_number > run.tasks[i].try_number {
        let mut running = fresh.clone();
        running.state = TaskState::Running;
        running.ended_at = None;
        running.error = None;
        running.output = None;
        running.retry_at = None;
        running.follow_ups.clear();
        run.replace(i, running);
    }
    run.deferred.push((fresh.task_id.clone(), fresh));
}

/// A task's configuration: from the DAG, or the defaults for follow-up tasks.
fn task_config(run: &ActiveRun, i: usize) -> TaskConfig {
    run.dag.task(&run.tasks[i].task_id).map(|t| t.config.clone()).unwrap_or_default()
}
