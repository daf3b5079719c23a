//! Fault injection for the in-memory backends: a store and a queue that wrap the real in-memory
//! ones and, when told, fail calls, hold them, or apply a call and then report an error (an
//! ambiguous result, as a timed-out Redis script that still ran). Each process of a test gets its own
//! wrapper, so a fault can hit the worker and spare the scheduler, or the other way round.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dagmq_core::dag_version::DagVersionRecord;
use dagmq_core::records::DagRecord;
use dagmq_core::store::{
    ClaimAnswer, Claimant, CreateRun, EagerClaim, FinishedAndClaimed, FinishedTry, LeaseTerm, NextClaim, RunFilter,
    TaskChange,
};
use dagmq_core::{
    BackendError, Consumer, Headers, Queue, RunRecord, RunState, Store, TaskInstance, TaskState, Topic, WorkerInfo,
};

/// Switches shared by a test and one wrapper.
#[derive(Default)]
pub struct Faults {
    /// Every call fails, as with a store or broker that does not answer.
    pub down: AtomicBool,
    /// The next this many claims (`queued` -> `running`) apply, then answer an error.
    pub claims_applied_then_failed: AtomicU32,
    /// The next this many publishes to a task pool fail.
    pub task_publishes_failing: AtomicU32,
    /// Broadcasts (run cancelled) fail.
    pub broadcasts_failing: AtomicBool,
    /// Run creation fails (the rest of the store answers).
    pub create_run_failing: AtomicBool,
    /// The next this many run creations apply, then answer an error.
    pub creations_applied_then_failed: AtomicU32,
    /// Calls refused while down.
    pub refused: AtomicU32,
    /// Every call waits while set, as with a process stopped by SIGSTOP mid-call.
    pub stalled: AtomicBool,
    /// Writes the store refused because this process no longer holds the scheduler lease.
    pub fenced: AtomicU32,
    /// Reads of whole runs' tasks (`unfinished_runs`, `tasks`, `tasks_by_id`, `task`).
    pub task_reads: AtomicU32,
    /// Publishes of status updates fail while set.
    pub status_publishes_failing: AtomicBool,
    /// The next run transition to this state applies, then answers an error (its answer is
    /// lost, as a Redis script that ran but timed out).
    pub lose_run_answer_to: Mutex<Option<RunState>>,
    /// Reads of a whole run's tasks (`tasks`) fail while set.
    pub task_lists_failing: AtomicBool,
    /// `tasks` answers in reverse order while set. The store contract gives the listing no order
    /// (Redis answers `HGETALL` in its hash's order, which changes as the hash grows).
    pub task_lists_reversed: AtomicBool,
    /// The next `transition_tasks` batch that changes one of these tasks fails before applying
    /// (each id once).
    pub batches_failing_for: Mutex<Vec<String>>,
    /// Every call but the lease's waits while set: a scheduler's loop frozen mid-call while its
    /// lease renewal goes on.
    pub calls_stalled: AtomicBool,
    /// Lease calls (`acquire_lease`, `renew_lease`, `release_lease`) wait while set, before
    /// they apply.
    pub lease_held: AtomicBool,
    /// Lease calls that waited on `lease_held`.
    pub lease_waits: AtomicU32,
    /// `acquire_lease` and `renew_lease` calls that answered that the caller holds the lease.
    pub leases_taken: AtomicU32,
    /// Reads of run records (`run`).
    pub run_reads: AtomicU32,
    /// The next this many `add_tasks` calls (follow-ups added to a run) fail before applying.
    pub add_tasks_failing: AtomicU32,
    /// The next this many `transition_tasks` batches that queue a task apply, then answer an
    /// error (the answer is lost).
    pub queue_answers_lost: AtomicU32,
    /// Reads of run records (`run`) fail while set.
    pub run_reads_failing: AtomicBool,
    /// When set, a run transition whose answer is lost (`lose_run_answer_to`) also sets
    /// `run_reads_failing`: the caller cannot read the run again to learn whether it applied.
    pub lost_run_answer_hides_run: AtomicBool,
    /// The next this many `transition_tasks` batches that set a task back to `pending` (a clear)
    /// apply, then answer an error.
    pub reset_answers_lost: AtomicU32,
    /// When set, a reset whose answer is lost (`reset_answers_lost`) also sets
    /// `task_lists_failing`: the caller cannot read the run's tasks again to learn whether it
    /// applied.
    pub lost_reset_answer_hides_tasks: AtomicBool,
    /// The next claim that applies freezes the process before its answer is read (sets
    /// `stalled`), as SIGSTOP between the store taking the claim and the worker reading the
    /// answer; it answers once the test thaws the process.
    pub freeze_after_claim: AtomicBool,
    /// Heartbeats fail while set (the rest of the store answers).
    pub heartbeats_failing: AtomicBool,
    /// Reads of several tasks by id (`tasks_by_id`) fail while set.
    pub task_batch_reads_failing: AtomicBool,
    /// For the next this many `transition_tasks` batches that queue tasks and have some of
    /// them refused, the next read (`task`) of each refused task fails.
    pub refused_rereads_failing: AtomicU32,
    /// Tasks whose next `task` read fails (each id once), armed by `refused_rereads_failing`.
    pub task_reads_failing_for: Mutex<Vec<String>>,
    /// Tries claimed with the outcome of the try before (`finish_and_claim` calls whose claim
    /// applied).
    pub claimed_with_outcomes: AtomicU32,
    /// The next this many `finish_and_claim` calls whose claim applies answer an error.
    pub outcome_claims_applied_then_failed: AtomicU32,
}

impl Faults {
    /// Takes one from a counter if it is above zero.
    fn take(counter: &AtomicU32) -> bool {
        counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    /// Waits while the process is stalled.
    async fn gate(&self) {
        while self.stalled.load(Ordering::SeqCst) || self.calls_stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits while the process is stalled or its lease calls are held.
    async fn lease_gate(&self) {
        if self.lease_held.load(Ordering::SeqCst) {
            self.lease_waits.fetch_add(1, Ordering::SeqCst);
        }
        while self.stalled.load(Ordering::SeqCst) || self.lease_held.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the answer to a run transition to `state` that applied is to be lost (once).
    fn lose_answer_to(&self, state: RunState) -> bool {
        let mut target = self.lose_run_answer_to.lock().unwrap();
        if *target == Some(state) {
            *target = None;
            return true;
        }
        false
    }

    /// Whether a batch changing these tasks is to fail (once per listed id).
    fn batch_fails(&self, changes: &[TaskChange]) -> bool {
        let mut failing = self.batches_failing_for.lock().unwrap();
        let before = failing.len();
        failing.retain(|id| !changes.iter().any(|c| c.task.task_id == *id));
        failing.len() != before
    }

    /// Counts a fenced refusal.
    fn track<T>(&self, result: Result<T, BackendError>) -> Result<T, BackendError> {
        if result.as_ref().is_err_and(|e| e.fenced) {
            self.fenced.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    fn check(&self, what: &str) -> Result<(), BackendError> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(BackendError::new(format!("injected: {what}: no answer")));
        }
        Ok(())
    }
}

/// A store that fails as its [`Faults`] say.
pub struct FaultyStore {
    pub inner: Arc<dyn Store>,
    pub faults: Arc<Faults>,
}

#[async_trait]
impl Store for FaultyStore {
    async fn dag_record(&self, dag_id: &str) -> Result<Option<DagRecord>, BackendError> {
        self.faults.gate().await;
        self.faults.check("dag_record")?;
        self.inner.dag_record(dag_id).await
    }
    async fn put_dag_record(&self, record: &DagRecord) -> Result<(), BackendError> {
        self.faults.gate().await;
        self.faults.check("put_dag_record")?;
        self.faults.track(self.inner.put_dag_record(record).await)
    }
    async fn put_dag_version(&self, version: &DagVersionRecord) -> Result<(), BackendError> {
        self.faults.gate().await;
        self.faults.check("put_dag_version")?;
        self.faults.track(self.inner.put_dag_version(version).await)
    }
    async fn dag_version(&self, dag_id: &str, version: &str) -> Result<Option<DagVersionRecord>, BackendError> {
        self.faults.gate().await;
        self.faults.check("dag_version")?;
        self.inner.dag_version(dag_id, version).await
    }
    async fn create_run(&self, run: &RunRecord, tasks: &[TaskInstance]) -> Result<CreateRun, BackendError> {
        self.faults.gate().await;
        self.faults.check("create_run")?;
        if self.faults.create_run_failing.load(Ordering::SeqCst) {
            self.faults.refused.fetch_add(1, Ordering::SeqCst);
            return Err(BackendError::new("injected: create_run: no answer"));
        }
        let created = self.faults.track(self.inner.create_run(run, tasks).await)?;
        if Faults::take(&self.faults.creations_applied_then_failed) {
            return Err(BackendError::new("injected: create_run applied, then the answer was lost"));
        }
        Ok(created)
    }
    async fn run(&self, run_id: &str) -> Result<Option<RunRecord>, BackendError> {
        self.faults.gate().await;
        self.faults.check("run")?;
        self.faults.run_reads.fetch_add(1, Ordering::SeqCst);
        if self.faults.run_reads_failing.load(Ordering::SeqCst) {
            return Err(BackendError::new("injected: run: no answer"));
        }
        self.inner.run(run_id).await
    }
    async fn transition_run(&self, expected: RunState, run: &RunRecord) -> Result<bool, BackendError> {
        self.faults.gate().await;
        self.faults.check("transition_run")?;
        let applied = self.faults.track(self.inner.transition_run(expected, run).await)?;
        if applied && self.faults.lose_answer_to(run.state) {
            if self.faults.lost_run_answer_hides_run.load(Ordering::SeqCst) {
                self.faults.run_reads_failing.store(true, Ordering::SeqCst);
            }
            return Err(BackendError::new(format!(
                "injected: the run's move to {} applied, its answer was lost",
                run.state
            )));
        }
        Ok(applied)
    }
    async fn transition_run_with_tasks(
        &self,
        expected: RunState,
        run: &RunRecord,
        changes: &[TaskChange],
    ) -> Result<bool, BackendError> {
        self.faults.gate().await;
        self.faults.check("transition_run_with_tasks")?;
        let applied = self.faults.track(self.inner.transition_run_with_tasks(expected, run, changes).await)?;
        if applied && self.faults.lose_answer_to(run.state) {
            return Err(BackendError::new(format!(
                "injected: the run's move to {} (with its tasks) applied, its answer was lost",
                run.state
            )));
        }
        Ok(applied)
    }
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, BackendError> {
        self.faults.gate().await;
        self.faults.check("list_runs")?;
        self.inner.list_runs(filter).await
    }
    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>, BackendError> {
        self.faults.gate().await;
        self.faults.check("unfinished_runs")?;
        self.faults.task_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.unfinished_runs().await
    }
    async fn tasks(&self, run_id: &str) -> Result<Vec<TaskInstance>, BackendError> {
        self.faults.gate().await;
        self.faults.check("tasks")?;
        self.faults.task_reads.fetch_add(1, Ordering::SeqCst);
        if self.faults.task_lists_failing.load(Ordering::SeqCst) {
            return Err(BackendError::new("injected: tasks: no answer"));
        }
        let mut tasks = self.inner.tasks(run_id).await?;
        if self.faults.task_lists_reversed.load(Ordering::SeqCst) {
            tasks.reverse();
        }
        Ok(tasks)
    }
    async fn task(&self, run_id: &str, task_id: &str) -> Result<Option<TaskInstance>, BackendError> {
        self.faults.gate().await;
        self.faults.check("task")?;
        self.faults.task_reads.fetch_add(1, Ordering::SeqCst);
        {
            let mut failing = self.faults.task_reads_failing_for.lock().unwrap();
            if let Some(at) = failing.iter().position(|id| id == task_id) {
                failing.remove(at);
                return Err(BackendError::new(format!("injected: task {task_id}: no answer")));
            }
        }
        self.inner.task(run_id, task_id).await
    }
    async fn transition_task(
        &self,
        run_id: &str,
        expected_state: TaskState,
        expected_try: u32,
        task: &TaskInstance,
    ) -> Result<bool, BackendError> {
        self.faults.gate().await;
        self.faults.check("transition_task")?;
        let applied =
            self.faults.track(self.inner.transition_task(run_id, expected_state, expected_try, task).await)?;
        if applied
            && expected_state == TaskState::Queued
            && task.state == TaskState::Running
            && Faults::take(&self.faults.claims_applied_then_failed)
        {
            return Err(BackendError::new("injected: the claim applied, its answer timed out"));
        }
        Ok(applied)
    }
    async fn claim_try(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        claimant: &Claimant,
        read: &[&str],
    ) -> Result<ClaimAnswer, BackendError> {
        self.faults.gate().await;
        self.faults.check("claim_try")?;
        let answer = self.inner.claim_try(run_id, task_id, try_number, claimant, read).await?;
        if answer.claimed && self.faults.freeze_after_claim.swap(false, Ordering::SeqCst) {
            self.faults.stalled.store(true, Ordering::SeqCst);
            self.faults.gate().await;
        }
        if answer.claimed && Faults::take(&self.faults.claims_applied_then_failed) {
            return Err(BackendError::new("injected: the claim applied, its answer timed out"));
        }
        Ok(answer)
    }
    async fn finish_try(
        &self,
        run_id: &str,
        done: &TaskInstance,
        candidates: &[EagerClaim],
    ) -> Result<FinishedTry, BackendError> {
        self.faults.gate().await;
        self.faults.check("finish_try")?;
        self.inner.finish_try(run_id, done, candidates).await
    }
    async fn finish_and_claim(
        &self,
        run_id: &str,
        done: &TaskInstance,
        next: &NextClaim<'_>,
    ) -> Result<FinishedAndClaimed, BackendError> {
        self.faults.gate().await;
        self.faults.check("finish_and_claim")?;
        let answer = self.inner.finish_and_claim(run_id, done, next).await?;
        if answer.next.claimed {
            self.faults.claimed_with_outcomes.fetch_add(1, Ordering::SeqCst);
        }
        if answer.next.claimed && Faults::take(&self.faults.outcome_claims_applied_then_failed) {
            return Err(BackendError::new("injected: the outcome and claim applied, their answer timed out"));
        }
        Ok(answer)
    }
    async fn tasks_by_id(&self, run_id: &str, task_ids: &[&str]) -> Result<Vec<Option<TaskInstance>>, BackendError> {
        self.faults.gate().await;
        self.faults.check("tasks_by_id")?;
        self.faults.task_reads.fetch_add(1, Ordering::SeqCst);
        if self.faults.task_batch_reads_failing.load(Ordering::SeqCst) {
            return Err(BackendError::new("injected: tasks_by_id: no answer"));
        }
        self.inner.tasks_by_id(run_id, task_ids).await
    }
    async fn transition_tasks(&self, run_id: &str, changes: &[TaskChange]) -> Result<Vec<bool>, BackendError> {
        self.faults.gate().await;
        self.faults.check("transition_tasks")?;
        if self.faults.batch_fails(changes) {
            return Err(BackendError::new("injected: transition_tasks: no answer"));
        }
        let applied = self.faults.track(self.inner.transition_tasks(run_id, changes).await)?;
        if changes.iter().any(|c| c.task.state == TaskState::Pending) && Faults::take(&self.faults.reset_answers_lost) {
            if self.faults.lost_reset_answer_hides_tasks.load(Ordering::SeqCst) {
                self.faults.task_lists_failing.store(true, Ordering::SeqCst);
            }
            return Err(BackendError::new("injected: transition_tasks (a reset) applied, its answer was lost"));
        }
        if changes.iter().any(|c| c.task.state == TaskState::Queued) && Faults::take(&self.faults.queue_answers_lost) {
            return Err(BackendError::new("injected: transition_tasks applied, its answer was lost"));
        }
        let refused: Vec<String> = changes
            .iter()
            .zip(&applied)
            .filter(|(c, applied)| c.task.state == TaskState::Queued && !**applied)
            .map(|(c, _)| c.task.task_id.clone())
            .collect();
        if !refused.is_empty() && Faults::take(&self.faults.refused_rereads_failing) {
            self.faults.task_reads_failing_for.lock().unwrap().extend(refused);
        }
        Ok(applied)
    }
    async fn add_tasks(
        &self,
        run_id: &str,
        new_tasks: &[TaskInstance],
        new_upstreams: &[(String, Vec<String>)],
    ) -> Result<(), BackendError> {
        self.faults.gate().await;
        self.faults.check("add_tasks")?;
        if Faults::take(&self.faults.add_tasks_failing) {
            return Err(BackendError::new("injected: add_tasks: no answer"));
        }
        self.faults.track(self.inner.add_tasks(run_id, new_tasks, new_upstreams).await)
    }
    async fn set_progress(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        progress: f64,
    ) -> Result<(), BackendError> {
        self.faults.gate().await;
        self.faults.check("set_progress")?;
        self.inner.set_progress(run_id, task_id, try_number, progress).await
    }
    async fn append_log(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        lines: &[String],
    ) -> Result<(), BackendError> {
        self.faults.gate().await;
        self.faults.check("append_log")?;
        self.inner.append_log(run_id, task_id, try_number, lines).await
    }
    async fn read_log(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        from: usize,
    ) -> Result<Vec<String>, BackendError> {
        self.faults.gate().await;
        self.faults.check("read_log")?;
        self.inner.read_log(run_id, task_id, try_number, from).await
    }
    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<(), BackendError> {
        self.faults.gate().await;
        self.faults.check("heartbeat")?;
        if self.faults.heartbeats_failing.load(Ordering::SeqCst) {
            return Err(BackendError::new("injected: heartbeat failed"));
        }
        self.inner.heartbeat(worker).await
    }
    async fn remove_worker(&self, name: &str) -> Result<(), BackendError> {
        self.faults.gate().await;
        self.faults.check("remove_worker")?;
        self.faults.track(self.inner.remove_worker(name).await)
    }
    async fn workers(&self) -> Result<Vec<WorkerInfo>, BackendError> {
        self.faults.gate().await;
        self.faults.check("workers")?;
        self.inner.workers().await
    }
    async fn acquire_lease(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<Option<LeaseTerm>, BackendError> {
        self.faults.lease_gate().await;
        self.faults.check("acquire_lease")?;
        let taken = self.inner.acquire_lease(holder, now, ttl).await?;
        if taken.is_some() {
            self.faults.leases_taken.fetch_add(1, Ordering::SeqCst);
        }
        Ok(taken)
    }
    async fn renew_lease(&self, lease: &LeaseTerm, now: DateTime<Utc>, ttl: Duration) -> Result<bool, BackendError> {
        self.faults.lease_gate().await;
        self.faults.check("renew_lease")?;
        let renewed = self.inner.renew_lease(lease, now, ttl).await?;
        if renewed {
            self.faults.leases_taken.fetch_add(1, Ordering::SeqCst);
        }
        Ok(renewed)
    }
    async fn release_lease(&self, lease: &LeaseTerm) -> Result<(), BackendError> {
        self.faults.lease_gate().await;
        self.faults.check("release_lease")?;
        self.inner.release_lease(lease).await
    }
    fn fenced(&self, fence: dagmq_core::store::Fence) -> Option<Arc<dyn Store>> {
        let inner = self.inner.fenced(fence)?;
        Some(Arc::new(FaultyStore { inner, faults: self.faults.clone() }))
    }
    async fn now(&self) -> Result<Option<DateTime<Utc>>, BackendError> {
        self.faults.gate().await;
        self.faults.check("now")?;
        self.inner.now().await
    }
    async fn ping(&self) -> Result<(), BackendError> {
        self.faults.gate().await;
        self.faults.check("ping")?;
        self.inner.ping().await
    }
}

/// A queue that fails publishes as its [`Faults`] say.
pub struct FaultyQueue {
    pub inner: Arc<dyn Queue>,
    pub faults: Arc<Faults>,
}

#[async_trait]
impl Queue for FaultyQueue {
    async fn publish(&self, topic: &Topic, payload: Vec<u8>) -> Result<(), BackendError> {
        self.publish_with_headers(vec![(topic.clone(), payload, Headers::new())]).await
    }
    async fn publish_many(&self, messages: Vec<(Topic, Vec<u8>)>) -> Result<(), BackendError> {
        self.publish_with_headers(
            messages.into_iter().map(|(topic, payload)| (topic, payload, Headers::new())).collect(),
        )
        .await
    }
    /// Publishes each message with its headers, failing as the faults say, one at a time.
    async fn publish_with_headers(&self, messages: Vec<(Topic, Vec<u8>, Headers)>) -> Result<(), BackendError> {
        for (topic, payload, headers) in messages {
            self.faults.check("publish")?;
            if matches!(topic, Topic::Tasks(_)) && Faults::take(&self.faults.task_publishes_failing) {
                return Err(BackendError::new("injected: publish to a task pool failed"));
            }
            if topic == Topic::Status && self.faults.status_publishes_failing.load(Ordering::SeqCst) {
                return Err(BackendError::new("injected: publish of a status update failed"));
            }
            self.inner.publish_with_headers(vec![(topic, payload, headers)]).await?;
        }
        Ok(())
    }
    async fn consume(&self, topic: &Topic, prefetch: u16) -> Result<Box<dyn Consumer>, BackendError> {
        self.inner.consume(topic, prefetch).await
    }
    async fn broadcast(&self, payload: Vec<u8>) -> Result<(), BackendError> {
        self.faults.check("broadcast")?;
        if self.faults.broadcasts_failing.load(Ordering::SeqCst) {
            return Err(BackendError::new("injected: broadcast lost"));
        }
        self.inner.broadcast(payload).await
    }
    async fn subscribe_broadcasts(&self) -> Result<Box<dyn Consumer>, BackendError> {
        self.inner.subscribe_broadcasts().await
    }
    async fn depth(&self, topic: &Topic) -> Result<u64, BackendError> {
        self.inner.depth(topic).await
    }
    async fn ping(&self) -> Result<(), BackendError> {
        self.faults.check("ping")?;
        self.inner.ping().await
    }
}
