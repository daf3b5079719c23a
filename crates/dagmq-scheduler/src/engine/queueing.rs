//! Queueing: deciding pending tasks by their trigger rules, ending those that do not run,
//! adding follow-ups, and queueing new tries under the concurrency limits (`queue_tasks`, the only
//! place a task is queued), including the tasks that waited for a limit to give room back.

use std::collections::HashMap;

use dagmq_core::fail_point;
use dagmq_core::messages::{self, TaskToExec, VERSION};
use dagmq_core::state::{TaskEvent, task_transition};
use dagmq_core::store::TaskChange;
use dagmq_core::trigger::Decision;
use dagmq_core::{BackendError, Headers, RunState, TaskInstance, TaskState, Topic};

use crate::active_run::ActiveRun;
use crate::limits::{LimitKey, claim_of};

use super::outcomes::take_moved_on;
use super::{Engine, OUTBOX_HIGH_WATER, QUEUE_CHUNK};

impl Engine {
    /// Skips the direct downstream tasks that branch task `i`, a success, did not choose.
    pub(super) async fn skip_not_chosen(&mut self, run: &mut ActiveRun, i: usize) -> Result<(), BackendError> {
        let skipped = run.not_chosen(i);
        if skipped.is_empty() {
            return Ok(());
        }
        let changes = skipped.iter().map(|&d| (d, TaskState::Skipped, None)).collect();
        let applied = self.end_pending(run, changes).await?;
        fail_point!("scheduler::branch::after_skip");
        self.advance(run, applied.into_iter().flat_map(|d| run.downstream[d].clone()).collect()).await
    }

    /// Decides the pending tasks among `candidates` by their trigger rules: queues those that
    /// run, ends those that are skipped or upstream_failed, and goes on with the downstream
    /// tasks of each ended one until nothing more is decided.
    pub(super) async fn advance(&mut self, run: &mut ActiveRun, candidates: Vec<usize>) -> Result<(), BackendError> {
        let mut wave = candidates;
        let mut ready = Vec::new();
        while !wave.is_empty() {
            let mut ends = Vec::new();
            for i in run.by_priority(std::mem::take(&mut wave)) {
                match run.decision(i) {
                    Decision::Wait => {}
                    Decision::Run => ready.push(i),
                    Decision::Skip => ends.push((i, TaskState::Skipped, None)),
                    Decision::UpstreamFailed => {
                        let reason = match run.failed_upstream(i) {
                            Some(up) => format!("upstream task {up:?} failed"),
                            None => "an upstream task failed".to_string(),
                        };
                        ends.push((i, TaskState::UpstreamFailed, Some(reason)));
                    }
                }
            }
            let ended = self.end_pending(run, ends).await?;
            wave = ended.into_iter().flat_map(|d| run.downstream[d].clone()).collect();
        }
        let ready = run.by_priority(ready);
        self.queue_tasks(run, ready).await
    }

    /// Ends pending tasks without running them (`skipped` or `upstream_failed`, with an error
    /// for the latter), in one batch of compare-and-sets. Returns the ones that applied; a
    /// refused one is read again.
    async fn end_pending(
        &mut self,
        run: &mut ActiveRun,
        ends: Vec<(usize, TaskState, Option<String>)>,
    ) -> Result<Vec<usize>, BackendError> {
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        let changes: Vec<TaskChange> = ends
            .iter()
            .map(|(d, state, error)| {
                let old = &run.tasks[*d];
                let mut new = old.clone();
                new.state = *state;
                new.ended_at = Some(self.now_cache);
                new.error = error.clone();
                TaskChange { expected_state: TaskState::Pending, expected_try: old.try_number, task: new }
            })
            .collect();
        let applied = self.store.transition_tasks(run.id(), &changes).await?;
        let mut ended = Vec::with_capacity(ends.len());
        for ((d, state, _), (change, applied)) in ends.into_iter().zip(changes.into_iter().zip(applied)) {
            if applied {
                self.metrics.tasks_finished.inc(&[run.record.dag_id.as_str(), state.as_str()]);
                self.metrics.throughput.note(self.now_cache);
                run.replace(d, change.task);
                ended.push(d);
            } else {
                self.refresh_task(run, d).await?;
            }
        }
        Ok(ended)
    }

    /// Adds task `i`'s follow-ups to the run, if it has any not added yet.
    pub(super) async fn expand(&mut self, run: &mut ActiveRun, i: usize) -> Result<(), BackendError> {
        match run.expansion(i) {
            Ok(None) => Ok(()),
            Ok(Some((new_tasks, rewired))) => {
                self.store.add_tasks(run.id(), &new_tasks, &rewired).await?;
                fail_point!("scheduler::follow_ups::after_add");
                tracing::info!(run = %run.id(), task = %run.tasks[i].task_id, count = new_tasks.len(), "follow-up tasks added");
                run.apply_expansion(new_tasks, rewired);
                Ok(())
            }
            Err(reason) => {
                tracing::error!(run = %run.id(), task = %run.tasks[i].task_id, "follow-ups not added: {reason}");
                Ok(())
            }
        }
    }

    /// Queues a new try of task `i`: compare-and-set in the store, then a message in the outbox.
    pub(super) async fn queue_task(&mut self, run: &mut ActiveRun, i: usize) -> Result<(), BackendError> {
        self.queue_tasks(run, vec![i]).await
    }

    /// Queues a new try of each of `indices`, with one batch of compare-and-sets in the store
    /// per [`QUEUE_CHUNK`] tasks; each that applies gets a message in the outbox, each refused
    /// is read again. A large outbox is published as it grows, so workers start early and the
    /// scheduler never holds every message of a wide DAG at once.
    pub(super) async fn queue_tasks(&mut self, run: &mut ActiveRun, indices: Vec<usize>) -> Result<(), BackendError> {
        if run.record.state == RunState::Suspended {
            // Nothing new is queued in a suspended run; resuming queues what is ready then.
            return Ok(());
        }
        // Shares of concurrency limits taken by tasks of this call that are not queued yet.
        let mut reserved: HashMap<LimitKey, u32> = HashMap::new();
        for chunk in indices.chunks(QUEUE_CHUNK) {
            let mut queued = Vec::with_capacity(chunk.len());
            let mut changes = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let old = &run.tasks[i];
                if task_transition(old.state, TaskEvent::Queue).is_err() {
                    continue;
                }
                let claim = claim_of(&run.dag, &old.task_id, &self.limits.pools);
                if !claim.is_empty() {
                    let blocking = crate::limits::lock(&self.limits.usage).blocking(&claim, &reserved);
                    if let Some(key) = blocking {
                        self.limits.wait(run.id(), &old.task_id, key);
                        continue;
                    }
                    for (key, amount, _) in &claim {
                        *reserved.entry(key.clone()).or_default() += amount;
                    }
                    self.limits.stop_waiting(run.id(), &old.task_id);
                }
                let new = old.next_try(self.now_cache);
                queued.push(i);
                changes.push(TaskChange { expected_state: old.state, expected_try: old.try_number, task: new });
            }
            if changes.is_empty() {
                continue;
            }
            let applied = match self.store.transition_tasks(run.id(), &changes).await {
                Ok(applied) => applied,
                Err(err) => {
                    self.after_unknown_queueing(run, queued, changes).await;
                    return Err(err);
                }
            };
            fail_point!("scheduler::queue::after_cas");
            // Every change that applied joins the view (taking its shares of the limits) and gets
            // its message before any refused one is read again: a read that fails must not
            // leave a task queued in the store but not in the view, outside the limits' count.
            let mut refused = Vec::new();
            for ((i, change), applied) in queued.into_iter().zip(changes).zip(applied) {
                if applied {
                    self.outbox.push((
                        Topic::Tasks(change.task.queue.clone()),
                        task_message(run, &change.task),
                        task_headers(run),
                    ));
                    run.replace(i, change.task);
                } else {
                    refused.push(i);
                }
            }
            for i in refused {
                self.refresh_refused(run, i).await?;
            }
            // The usage counts the tasks that are queued now; the others took nothing.
            reserved.clear();
            if self.outbox.len() >= OUTBOX_HIGH_WATER {
                self.flush().await;
            }
        }
        Ok(())
    }

    /// After a queueing batch that answered an error: each change may have applied (a lost
    /// answer) or not. The tasks are read back; one the store has queued (or further on) joins
    /// the view, so its shares of the limits stay taken and nothing else is queued in its
    /// place, and its message goes out. When even the read fails, the view takes every change
    /// as applied, the safe side for the limits: the sweep reads the run again, and a message
    /// for a try the store does not have queued costs nothing (a worker's claim is refused).
    async fn after_unknown_queueing(&mut self, run: &mut ActiveRun, queued: Vec<usize>, changes: Vec<TaskChange>) {
        let ids: Vec<&str> = changes.iter().map(|c| c.task.task_id.as_str()).collect();
        match self.store.tasks_by_id(run.id(), &ids).await {
            Ok(found) => {
                for ((i, change), fresh) in queued.into_iter().zip(changes).zip(found) {
                    let Some(fresh) = fresh else { continue };
                    if fresh.try_number < change.task.try_number {
                        // Not applied: the task is decided again when the caller tries again.
                        continue;
                    }
                    if fresh.state == TaskState::Queued && fresh.try_number == change.task.try_number {
                        self.outbox.push((
                            Topic::Tasks(fresh.queue.clone()),
                            task_message(run, &fresh),
                            task_headers(run),
                        ));
                    }
                    take_moved_on(run, i, fresh);
                }
            }
            Err(err) => {
                tracing::warn!(run = %run.id(), "queueing answered no and the tasks cannot be read back: {err}");
                for (i, change) in queued.into_iter().zip(changes) {
                    self.outbox.push((
                        Topic::Tasks(change.task.queue.clone()),
                        task_message(run, &change.task),
                        task_headers(run),
                    ));
                    run.replace(i, change.task);
                }
            }
        }
    }

    /// Queues tasks waiting behind limits that had room given back, oldest first, until a
    /// limit is full again. A task found blocked behind another limit moves to its queue.
    pub(super) async fn wake_waiting(&mut self) -> Result<(), BackendError> {
        let freed = crate::limits::lock(&self.limits.usage).take_freed();
        let mut failure = None;
        for key in freed {
            if failure.is_some() {
                // Look at this limit again next time.
                crate::limits::lock(&self.limits.usage).mark_freed(key);
                continue;
            }
            let Some(mut queue) = self.limits.waiting.remove(&key) else { continue };
            while let Some((run_id, task_id)) = queue.pop_front() {
                // Waiting no more unless it is found blocked again (the deque is out of the map).
                self.limits.stop_waiting(&run_id, &task_id);
                let Some(mut run) = self.active.remove(&run_id) else { continue };
                let result = match run.index.get(&task_id).copied() {
                    // A retry waits here too once its timer found the limit full: it is due.
                    Some(i)
                        if run.decision(i) == Decision::Run
                            || (run.tasks[i].state == TaskState::UpForRetry
                                && run.tasks[i].retry_at.is_some_and(|at| at <= self.now_cache)) =>
                    {
                        self.queue_tasks(&mut run, vec![i]).await
                    }
                    _ => Ok(()),
                };
                if let Err(err) = self.put_back(run).await.and(result) {
                    // The rest keep their places; the sweep finds this one again.
                    failure = Some(err);
                    crate::limits::lock(&self.limits.usage).mark_freed(key.clone());
                    break;
                }
                if self.limits.blocked_on.get(&(run_id, task_id)) == Some(&key) {
                    // Full again: the rest keep their places behind it.
                    break;
                }
            }
            if !queue.is_empty() {
                let again = self.limits.waiting.entry(key).or_default();
                for entry in queue {
                    again.push_back(entry);
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// The task-to-exec message for a queued task.
/// The headers of a task message of `run`: the run's trace parent (`traceparent`), so that the
/// worker's span of the try joins the run's trace.
pub(super) fn task_headers(run: &ActiveRun) -> Headers {
    dagmq_core::trace::task_headers(run.id())
}

pub(super) fn task_message(run: &ActiveRun, task: &TaskInstance) -> Vec<u8> {
    messages::encode(&TaskToExec {
        v: VERSION,
        run_id: run.record.run_id.clone(),
        dag_id: run.record.dag_id.clone(),
        task_id: task.task_id.clone(),
        try_number: task.try_number,
        max_try: task.max_try,
        params: run.record.params.clone(),
        logical_date: run.record.logical_date,
        follow_up: task.follow_up.as_deref().cloned(),
    })
}
