//! The `Store` abstraction: run metadata, task instances with compare-and-set transitions,
//! task logs per try, the worker registry and the scheduler's per-DAG bookkeeping.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::BackendError;
use crate::clock::Clock;
use crate::dag_version::DagVersionRecord;
use crate::records::{DagRecord, RunRecord, TaskInstance, WorkerInfo};
use crate::state::{RunState, TaskState};
use crate::task::CancelHandle;

/// A try's log keeps at most this many lines; further lines are replaced by one marker line.
pub const MAX_LOG_LINES_PER_TRY: usize = 10_000;

/// The marker that ends a log cut at [`MAX_LOG_LINES_PER_TRY`].
pub const LOG_CUT_MARKER: &str = "[dagmq: log cut at 10000 lines]";

/// A try's log keeps at most this many bytes of lines; the rest is replaced by
/// [`LOG_BYTES_CUT_MARKER`].
pub const MAX_LOG_BYTES_PER_TRY: usize = 1024 * 1024;

/// The marker that ends a log cut at [`MAX_LOG_BYTES_PER_TRY`].
pub const LOG_BYTES_CUT_MARKER: &str = "[dagmq: log cut at 1 MiB]";

/// A log line keeps at most this many bytes; the rest is replaced by [`LINE_CUT_MARKER`].
pub const MAX_LOG_LINE_BYTES: usize = 64 * 1024;

/// Ends a line cut at [`MAX_LOG_LINE_BYTES`].
pub const LINE_CUT_MARKER: &str = " [dagmq: line cut at 64 KiB]";

/// Cuts a line to [`MAX_LOG_LINE_BYTES`] (at a character boundary) and marks the cut.
pub fn cut_line(line: String) -> String {
    cut_marked(line, MAX_LOG_LINE_BYTES, LINE_CUT_MARKER)
}

/// `text` cut to `max` bytes at a character boundary, then ended with `marker`; as it is when
/// not longer.
pub fn cut_marked(mut text: String, max: usize, marker: &str) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(marker);
    text
}

/// One term of the scheduler lease, as the store granted it: who asked, and the term's number.
/// Every grant is a new term, numbered above every term granted before, so a term, once it has
/// ended (expired, released, or taken by another grant), is never in force again: renewal
/// extends only the term in force, and a fence names the term its writes belong to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseTerm {
    /// The scheduler that asked for the lease (for logs and for taking it again at once).
    pub holder: String,
    /// The term's number: higher than the number of every earlier grant.
    pub term: u64,
}

impl std::fmt::Display for LeaseTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "term {} of {}", self.term, self.holder)
    }
}

/// What a scheduler's writes carry, so that a store refuses them unless their term of the lease
/// is still in force (a fencing token): once the term has expired, been released, or been
/// followed by another grant, every write of the view is refused, atomically with the write.
#[derive(Clone)]
pub struct Fence {
    /// The term the writes belong to.
    pub lease: LeaseTerm,
    /// Fired when the store refuses a write for this fence, so the scheduler steps down at
    /// once instead of going on with a stale view.
    pub on_refused: Arc<CancelHandle>,
    /// The clock the term's expiry is judged by in a store without a clock of its own (the
    /// in-memory one): the clock whose `now` the holder passes to `acquire_lease` and
    /// `renew_lease`. A store with its own clock (Redis) ignores it.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence").field("lease", &self.lease).finish_non_exhaustive()
    }
}

impl Fence {
    /// The error for a refused write, after telling the scheduler.
    pub fn refused(&self, what: &str) -> BackendError {
        self.on_refused.cancel();
        let message = format!("{what} refused by the fence: {} no longer holds the scheduler lease", self.lease);
        tracing::warn!("{message}");
        BackendError::fenced(message)
    }
}

/// Which runs to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only runs of this DAG.
    pub dag_id: Option<String>,
    /// Only runs in this state.
    pub state: Option<RunState>,
    /// At most this many, newest first.
    pub limit: usize,
    /// Skip this many matching runs first (the next page starts at the previous page's
    /// offset plus its length).
    pub offset: usize,
}

/// What `create_run` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateRun {
    /// The run is new.
    Created,
    /// A run with the same id, or the same DAG and idempotency key, exists: this one.
    Exists(String),
    /// Nothing was created: the run names a DAG version the store does not have
    /// ([`Store::put_dag_version`] comes first).
    MissingVersion,
}

/// One compare-and-set of [`Store::transition_tasks`]: `task` replaces the stored instance if
/// that is still in `expected_state` at `expected_try`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskChange {
    /// The state the stored instance must be in.
    pub expected_state: TaskState,
    /// The try it must be at.
    pub expected_try: u32,
    /// The new instance.
    pub task: TaskInstance,
}

/// A downstream task that a worker may claim in the same atomic step that records its
/// upstream's success (eager dispatch), so it runs next in the worker's own slot without a
/// round through the scheduler and the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct EagerClaim {
    /// The task as the worker read it, `pending`: the claim applies only while the store still
    /// has exactly this instance (no other try, no restart or rewiring meanwhile).
    pub expected: TaskInstance,
    /// The try it becomes: [`TaskInstance::next_try`] of `expected`, `running` under the worker.
    pub claimed: TaskInstance,
    /// Ids of the tasks that this one may claim in turn when it succeeds: read in the same step
    /// when it is claimed, so a chain of eager claims costs one round trip a task.
    pub then: Vec<String>,
    /// Those of its upstream tasks that are branch tasks in the run's DAG version: the claim
    /// applies only if each one's stored output chose this task (whether or not the scheduler
    /// has skipped the tasks it did not choose yet).
    pub branches: Vec<String>,
}

impl EagerClaim {
    /// Whether the upstream tasks let the candidate run now, by their stored instances
    /// (`upstream` answers one by id): every upstream is `success`; every branch among them
    /// (`branches`) chose it; and every upstream that returned follow-ups has them among the
    /// candidate's upstreams already (the scheduler adds them and rewires in one step, after
    /// the parent's success is recorded, so until then the candidate must wait for them too).
    /// The memory store checks this; the Redis `finish_try` script checks the same.
    pub fn upstreams_allow<'a>(&self, upstream: impl Fn(&str) -> Option<&'a TaskInstance>) -> bool {
        let after = &self.expected.after;
        let ready = |id: &String| {
            upstream(id).is_some_and(|up| {
                up.state == TaskState::Success
                    && up.follow_ups.iter().all(|f| after.contains(&crate::task::follow_up_task_id(&up.task_id, &f.id)))
            })
        };
        let chose = |id: &String| {
            upstream(id).is_some_and(|up| crate::trigger::chooses(up.output.as_ref(), &self.expected.task_id))
        };
        after.iter().all(ready) && self.branches.iter().all(chose)
    }
}

/// What [`Store::finish_try`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FinishedTry {
    /// Whether the outcome applied (the try was still `running` at its number).
    pub applied: bool,
    /// The candidates claimed, by index among the candidates, in order, each with the tasks
    /// its `then` names as stored (`None` for an unknown id).
    pub claimed: Vec<(usize, Vec<Option<TaskInstance>>)>,
}

/// Who claims a try, and when (see [`Store::claim_try`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimant {
    /// The worker's name.
    pub worker: String,
    /// The worker process's instance.
    pub instance: String,
    /// When it claims.
    pub at: DateTime<Utc>,
}

/// What [`Store::claim_try`] found and did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClaimAnswer {
    /// The task after the call: the claimed try, or the instance that was not claimable
    /// (`None` for an unknown task).
    pub task: Option<TaskInstance>,
    /// Whether this call claimed it.
    pub claimed: bool,
    /// The tasks asked to be read with it, in order (`None` for an unknown id).
    pub read: Vec<Option<TaskInstance>>,
}

/// The try a worker claims for the slot a finished try gives back, in the same store call
/// that records that try's outcome ([`Store::finish_and_claim`]): a try of the same run, from a
/// task message the worker holds already.
#[derive(Debug, Clone, Copy)]
pub struct NextClaim<'a> {
    /// The task the message names.
    pub task_id: &'a str,
    /// The try the message names.
    pub try_number: u32,
    /// Who claims it, and when.
    pub claimant: &'a Claimant,
    /// The tasks read with the claim, as [`Store::claim_try`] reads them.
    pub read: &'a [&'a str],
}

/// What [`Store::finish_and_claim`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FinishedAndClaimed {
    /// Whether the outcome applied (the try was still `running` at its number).
    pub applied: bool,
    /// The next try's claim, as [`Store::claim_try`] answers it.
    pub next: ClaimAnswer,
}

/// Durable state of the system. Every task transition is a compare-and-set on
/// (run, task, state, try): a store applies it only if both still match.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The scheduler's bookkeeping for a DAG.
    async fn dag_record(&self, dag_id: &str) -> Result<Option<DagRecord>, BackendError>;

    /// Writes the bookkeeping for a DAG.
    async fn put_dag_record(&self, record: &DagRecord) -> Result<(), BackendError>;

    /// Stores what a scheduler needs of one version of a DAG, by DAG id and version; writing it
    /// again replaces it (with the same content: a version names one definition). It is kept
    /// as long as any run that names it is kept (Redis: until the retention period after the
    /// last of its runs finished; memory: until the last of its runs is dropped), and a version
    /// no run names yet expires after the retention period (Redis) or stays (memory).
    async fn put_dag_version(&self, version: &DagVersionRecord) -> Result<(), BackendError>;

    /// A stored DAG version.
    async fn dag_version(&self, dag_id: &str, version: &str) -> Result<Option<DagVersionRecord>, BackendError>;

    /// Creates a run and its tasks atomically, unless a run with the same id, or the same DAG
    /// and key, exists, or the run names a DAG version ([`RunRecord::dag_version`]) the store
    /// does not have: no run of a version is ever stored without that version.
    async fn create_run(&self, run: &RunRecord, tasks: &[TaskInstance]) -> Result<CreateRun, BackendError>;

    /// One run.
    async fn run(&self, run_id: &str) -> Result<Option<RunRecord>, BackendError>;

    /// Replaces a run's record if its state is still `expected`.
    async fn transition_run(&self, expected: RunState, run: &RunRecord) -> Result<bool, BackendError>;

    /// Replaces a run's record if its state is still `expected` and, only then, applies the
    /// task compare-and-sets of `changes` (a restart). Atomic where the backend allows it, so a
    /// crash cannot leave the run's tasks reset and the run finished, or the other way round.
    async fn transition_run_with_tasks(
        &self,
        expected: RunState,
        run: &RunRecord,
        changes: &[TaskChange],
    ) -> Result<bool, BackendError> {
        if !self.transition_run(expected, run).await? {
            return Ok(false);
        }
        self.transition_tasks(&run.run_id, changes).await?;
        Ok(true)
    }

    /// Runs matching `filter`, newest first.
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, BackendError>;

    /// Every run not in a final state (`queued`, `running` or `suspended`), oldest first.
    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>, BackendError>;

    /// Every task of a run.
    async fn tasks(&self, run_id: &str) -> Result<Vec<TaskInstance>, BackendError>;

    /// One task of a run.
    async fn task(&self, run_id: &str, task_id: &str) -> Result<Option<TaskInstance>, BackendError>;

    /// Replaces a task's instance if its state and try are still `expected_state` and
    /// `expected_try`; `false` when they are not (a duplicate or late transition).
    async fn transition_task(
        &self,
        run_id: &str,
        expected_state: TaskState,
        expected_try: u32,
        task: &TaskInstance,
    ) -> Result<bool, BackendError>;

    /// Several tasks of one run, in the order asked (`None` for an unknown id): one round trip
    /// where the backend allows it.
    async fn tasks_by_id(&self, run_id: &str, task_ids: &[&str]) -> Result<Vec<Option<TaskInstance>>, BackendError> {
        let mut found = Vec::with_capacity(task_ids.len());
        for task_id in task_ids {
            found.push(self.task(run_id, task_id).await?);
        }
        Ok(found)
    }

    /// Several compare-and-sets on tasks of one run, each as [`Store::transition_task`] would
    /// apply it; answers, in order, which applied. Each is atomic on its own; one round trip
    /// where the backend allows it.
    async fn transition_tasks(&self, run_id: &str, changes: &[TaskChange]) -> Result<Vec<bool>, BackendError> {
        let mut applied = Vec::with_capacity(changes.len());
        for change in changes {
            applied.push(self.transition_task(run_id, change.expected_state, change.expected_try, &change.task).await?);
        }
        Ok(applied)
    }

    /// Claims a try for a worker: if the task is `queued` at `try_number` and its run is
    /// `running` it becomes [`TaskInstance::claimed_by`] `claimant`, atomically; otherwise
    /// nothing changes. A try queued in a run that is not running (a suspension or a cancel
    /// came between a requeue's read of the run and its write) is refused, answered with the
    /// task as it is: the suspension, or the scheduler's sweep, stops it; a cancel cancels it.
    /// The tasks named by `read` are read in the same call. One round trip where the backend
    /// allows it.
    async fn claim_try(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        claimant: &Claimant,
        read: &[&str],
    ) -> Result<ClaimAnswer, BackendError> {
        let mut ids = Vec::with_capacity(1 + read.len());
        ids.push(task_id);
        ids.extend_from_slice(read);
        let mut found = self.tasks_by_id(run_id, &ids).await?.into_iter();
        let task = found.next().flatten();
        let read = found.collect();
        let Some(current) = task else { return Ok(ClaimAnswer { task: None, claimed: false, read }) };
        if current.state != TaskState::Queued || current.try_number != try_number {
            return Ok(ClaimAnswer { task: Some(current), claimed: false, read });
        }
        if self.run(run_id).await?.is_none_or(|run| run.state != RunState::Running) {
            return Ok(ClaimAnswer { task: Some(current), claimed: false, read });
        }
        claim_queued(self, run_id, current, claimant, read).await
    }

    /// Records a finished try: `done` replaces the stored instance if that is still `running` at
    /// `done.try_number`. Then, only if it applied, `done` is a success and the run is
    /// `running`, claims each of `candidates` whose stored instance is still exactly its
    /// `expected` one and whose upstream tasks allow it ([`EagerClaim::upstreams_allow`]: all
    /// `success`, each branch among them chose it, and every follow-up they returned is among
    /// its upstreams already): that task becomes its `claimed` try, and the tasks its `then`
    /// names are read. All in one atomic step, so no cancel, suspension, restart, branch
    /// choice, follow-up or other claim can come between the checks and the claims. A store
    /// that cannot do this atomically records the outcome and claims nothing.
    async fn finish_try(
        &self,
        run_id: &str,
        done: &TaskInstance,
        candidates: &[EagerClaim],
    ) -> Result<FinishedTry, BackendError> {
        let _ = candidates;
        let applied = self.transition_task(run_id, TaskState::Running, done.try_number, done).await?;
        Ok(FinishedTry { applied, ..FinishedTry::default() })
    }

    /// Records a finished try as [`Store::finish_try`] does with no candidates, and claims
    /// `next`, a try of the same run, as [`Store::claim_try`] does (`queued` at its number in a
    /// `running` run, else nothing changes), whether or not the outcome applied: in one atomic
    /// step, so the slot the finished try gives back never waits a round trip of its own for its
    /// next try. A store that cannot do both atomically does one after the other (the outcome
    /// first); either way an error leaves both unknown, as an error of each call does.
    async fn finish_and_claim(
        &self,
        run_id: &str,
        done: &TaskInstance,
        next: &NextClaim<'_>,
    ) -> Result<FinishedAndClaimed, BackendError> {
        let applied = self.finish_try(run_id, done, &[]).await?.applied;
        let next = self.claim_try(run_id, next.task_id, next.try_number, next.claimant, next.read).await?;
        Ok(FinishedAndClaimed { applied, next })
    }

    /// Adds follow-up tasks to a run and gives existing tasks new upstream lists, atomically.
    /// Tasks whose id exists already are skipped (a repeated expansion changes nothing).
    async fn add_tasks(
        &self,
        run_id: &str,
        new_tasks: &[TaskInstance],
        new_upstreams: &[(String, Vec<String>)],
    ) -> Result<(), BackendError>;

    /// Records a running try's progress; ignored unless that try is running.
    async fn set_progress(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        progress: f64,
    ) -> Result<(), BackendError>;

    /// Appends lines to a try's log, keeping at most [`MAX_LOG_LINES_PER_TRY`].
    async fn append_log(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        lines: &[String],
    ) -> Result<(), BackendError>;

    /// A try's log lines from line `from` (0-based) on.
    async fn read_log(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        from: usize,
    ) -> Result<Vec<String>, BackendError>;

    /// Registers a worker or refreshes its heartbeat.
    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<(), BackendError>;

    /// Removes a worker from the registry.
    async fn remove_worker(&self, name: &str) -> Result<(), BackendError>;

    /// Every registered worker.
    async fn workers(&self) -> Result<Vec<WorkerInfo>, BackendError>;

    /// Grants `holder` a new term of the scheduler lease, until `now + ttl`, if the lease is
    /// free: no term is in force, or the one in force has expired, or it is `holder`'s own (a
    /// scheduler taking the lease again at once, after an answer it did not get). `None` when
    /// another holder's term is in force. Only the holder of the term in force schedules; other
    /// schedulers stand by. A grant always starts a new term: the writes of an earlier one are
    /// refused from then on.
    async fn acquire_lease(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<Option<LeaseTerm>, BackendError>;

    /// Extends `lease` until `now + ttl` if it is still the term in force and has not expired;
    /// `false` otherwise (it expired, was released, or another term was granted since), and
    /// nothing changes: a term that has ended is never renewed, its holder must acquire a new
    /// one (and recover from the store, which others may have changed meanwhile).
    async fn renew_lease(&self, lease: &LeaseTerm, now: DateTime<Utc>, ttl: Duration) -> Result<bool, BackendError>;

    /// Gives the lease up if `lease` is the term in force.
    async fn release_lease(&self, lease: &LeaseTerm) -> Result<(), BackendError>;

    /// This store as a scheduler holding the lease writes to it: every scheduler write (run
    /// creation and transitions, task transitions, follow-ups, DAG bookkeeping and versions, worker
    /// removal)
    /// is refused, atomically with the write, unless `fence.lease` is still the term in force
    /// and has not expired. `None` when the store cannot fence; the scheduler then writes
    /// unfenced.
    fn fenced(&self, fence: Fence) -> Option<Arc<dyn Store>> {
        let _ = fence;
        None
    }

    /// The store's own clock, for liveness decisions shared by processes whose clocks may
    /// disagree (worker heartbeats); `None` when the store has none and callers use their own.
    async fn now(&self) -> Result<Option<DateTime<Utc>>, BackendError> {
        Ok(None)
    }

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), BackendError>;
}

/// Claims `current`, a queued instance as read, with a compare-and-set, and answers as
/// [`Store::claim_try`] does (with `read`, the tasks read beside it); shared by the default
/// `claim_try` and stores whose one-step claim cannot take every instance.
pub async fn claim_queued<S: Store + ?Sized>(
    store: &S,
    run_id: &str,
    current: TaskInstance,
    claimant: &Claimant,
    read: Vec<Option<TaskInstance>>,
) -> Result<ClaimAnswer, BackendError> {
    let running = current.claimed_by(claimant);
    let claimed = store.transition_task(run_id, TaskState::Queued, current.try_number, &running).await?;
    Ok(ClaimAnswer { task: Some(if claimed { running } else { current }), claimed, read })
}

/// Appends `lines` to `log` under the per-try cap; shared by store implementations.
pub fn append_capped(log: &mut Vec<String>, lines: &[String]) {
    for line in lines {
        if log.len() >= MAX_LOG_LINES_PER_TRY {
            if log.last().map(String::as_str) != Some(LOG_CUT_MARKER) {
                log.push(LOG_CUT_MARKER.to_string());
            }
            return;
        }
        log.push(line.clone());
    }
}
