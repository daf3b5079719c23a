//! The simulated world: one in-memory store and queue that every process shares, seen by each
//! process through a fault layer of its own. The layer draws from the seed, at every call: a
//! delay or a few yields (which reorders what the processes do), a call that fails before it
//! applies, a call that applies and then loses its answer, a call that hangs past the response
//! timeout, a message lost, duplicated or delivered again. It also makes processes crash (every
//! call of theirs hangs for good, and their unsettled deliveries go back to the queue, as when a
//! broker sees a connection die) and freeze (every call waits until thawed, as under SIGSTOP).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dagmq_core::dag_version::DagVersionRecord;
use dagmq_core::memory::{MemoryQueue, MemoryStore};
use dagmq_core::queue::Acker;
use dagmq_core::records::DagRecord;
use dagmq_core::store::{
    ClaimAnswer, Claimant, CreateRun, EagerClaim, Fence, FinishedAndClaimed, FinishedTry, LeaseTerm, NextClaim,
    RunFilter, TaskChange,
};
use dagmq_core::{
    BackendError, Clock, Consumer, Delivery, Headers, Queue, RunRecord, RunState, Store, TaskInstance, TaskState,
    Topic, WorkerInfo,
};

use crate::rng::Rng;

/// How likely each fault is at one call while faults are on.
#[derive(Debug, Clone, Copy)]
pub struct FaultRates {
    /// A store or queue call fails without applying.
    pub fail_before: f64,
    /// A write applies, then its answer is lost (an error comes back).
    pub lost_answer: f64,
    /// A call hangs past the response timeout, then fails (applied or not).
    pub hang: f64,
    /// A published message is lost.
    pub message_lost: f64,
    /// A published message arrives twice.
    pub message_duplicated: f64,
    /// A delivered message is put back and delivered again (a channel lost before the ack).
    pub redelivered: f64,
    /// A call is slow (100 ms to 2 s).
    pub slow: f64,
}

impl FaultRates {
    /// No faults: the world after the storm.
    pub const NONE: FaultRates = FaultRates {
        fail_before: 0.0,
        lost_answer: 0.0,
        hang: 0.0,
        message_lost: 0.0,
        message_duplicated: 0.0,
        redelivered: 0.0,
        slow: 0.0,
    };
}

/// How long a hung call waits before it fails, as the Redis client's response timeout.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Faults that happened, by kind, for the report.
#[derive(Debug, Default)]
pub struct FaultCounts(Mutex<BTreeMap<&'static str, u64>>);

impl FaultCounts {
    /// Counts one fault of `kind`.
    pub fn add(&self, kind: &'static str) {
        *self.0.lock().unwrap().entry(kind).or_default() += 1;
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().unwrap().clone()
    }
}

/// One successful lease acquisition or renewal, in the order the store applied them.
#[derive(Debug, Clone)]
pub struct LeaseGrant {
    /// The term granted or renewed.
    pub lease: LeaseTerm,
    /// A renewal of the term, not its grant.
    pub renewal: bool,
    /// The process that asked.
    pub process: String,
    /// Simulated time, in ms since the start.
    pub at_ms: u64,
}

/// What is shared by every process of one simulation.
pub struct World {
    /// The seeded generator.
    pub rng: Rng,
    /// The store every process shares.
    pub store: Arc<MemoryStore>,
    /// The queue every process shares.
    pub queue: Arc<MemoryQueue>,
    /// Fault rates in force now.
    pub rates: Mutex<FaultRates>,
    /// Faults that happened.
    pub faults: FaultCounts,
    /// Every lease grant, in order.
    pub leases: Mutex<Vec<LeaseGrant>>,
    /// Limits each write is checked against, and the violations found.
    pub limits: crate::check::LimitWatch,
    /// The tokio instant the simulation started at.
    pub start: tokio::time::Instant,
    /// Store and queue calls made, all processes.
    pub calls: AtomicU64,
    /// `finish_and_claim` calls (an outcome written with its slot's next claim): those whose
    /// claim applied and was answered, and those answered with an error (a fault).
    pub outcome_claims: AtomicU64,
    pub outcome_claims_faulted: AtomicU64,
    /// A line for each crash, freeze, restart, command and try, for `DAGMQ_SIM_TRACE`.
    pub trace: Mutex<Vec<String>>,
    /// What writes did that they must not, found at the instant they applied (at most a few
    /// kept): a task queued in a run the store has suspended.
    pub violations: Mutex<Vec<String>>,
}

impl World {
    /// A world for `seed`, with no faults yet.
    pub fn new(seed: u64, limits: crate::check::LimitWatch) -> Arc<World> {
        Arc::new(World {
            rng: Rng::new(seed),
            store: Arc::new(MemoryStore::new()),
            queue: Arc::new(MemoryQueue::new()),
            rates: Mutex::new(FaultRates::NONE),
            faults: FaultCounts::default(),
            leases: Mutex::new(Vec::new()),
            limits,
            start: tokio::time::Instant::now(),
            calls: AtomicU64::new(0),
            outcome_claims: AtomicU64::new(0),
            outcome_claims_faulted: AtomicU64::new(0),
            trace: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
        })
    }

    /// Notes each of `queued`, tries a write just queued, in the trace, and records a violation
    /// for each when the store has their run suspended: a suspended run queues nothing (resuming
    /// it queues what is ready).
    pub async fn check_queued(&self, process: &str, run_id: &str, queued: Vec<(String, u32)>) {
        if queued.is_empty() {
            return;
        }
        for (task, try_number) in &queued {
            self.note(format_args!("  {process} queued {run_id}/{task} try {try_number}"));
        }
        let Ok(Some(run)) = self.store.run(run_id).await else { return };
        if run.state != RunState::Suspended {
            return;
        }
        for (task, try_number) in queued {
            self.violation(format!(
                "{process} queued try {try_number} of {run_id}/{task} at {} ms while the run was suspended",
                self.now_ms()
            ));
        }
    }

    /// Records a violation the processes' own code saw (the first 20).
    pub fn violation(&self, what: String) {
        let mut violations = self.violations.lock().unwrap();
        if violations.len() < 20 {
            violations.push(what);
        }
    }

    /// Simulated milliseconds since the start.
    pub fn now_ms(&self) -> u64 {
        (tokio::time::Instant::now() - self.start).as_millis() as u64
    }

    /// Adds a line to the trace, stamped with the simulated time.
    pub fn note(&self, line: impl std::fmt::Display) {
        let at = self.now_ms();
        self.trace.lock().unwrap().push(format!("{:>4}.{:03} {line}", at / 1000, at % 1000));
    }

    fn rates(&self) -> FaultRates {
        *self.rates.lock().unwrap()
    }

    /// Draws whether a fault of `kind` happens at rate `p`, and counts it.
    fn roll(&self, p: f64, kind: &'static str) -> bool {
        if p > 0.0 && self.rng.chance(p) {
            self.note(format_args!("fault: {kind}"));
            self.faults.add(kind);
            return true;
        }
        false
    }

    /// A delay or a few yields, drawn from the seed: what makes the processes interleave
    /// differently from one seed to the next.
    async fn jitter(&self) {
        let slow = self.rates().slow;
        match self.rng.below(10) {
            0..=4 => {}
            5..=7 => {
                for _ in 0..self.rng.between(1, 3) {
                    tokio::task::yield_now().await;
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(self.rng.between(1, 20))).await,
        }
        if self.roll(slow, "slow call") {
            tokio::time::sleep(Duration::from_millis(self.rng.between(100, 2000))).await;
        }
    }
}

/// One process: a scheduler or a worker, alive, frozen or crashed.
pub struct Proc {
    /// Its name (a worker's name; "scheduler-N").
    pub name: String,
    /// Crashed: every call hangs for good.
    pub dead: AtomicBool,
    /// Frozen: every call waits until thawed.
    pub frozen: AtomicBool,
    /// Its unsettled deliveries, given back to the queue when it crashes.
    deliveries: Mutex<Vec<Weak<Mutex<Option<Delivery>>>>>,
    /// A worker's slots (0: not a worker), and the tries running in it now: a try claimed
    /// ahead must not start while its slot runs another.
    pub slots: AtomicUsize,
    pub running: AtomicUsize,
}

impl Proc {
    /// A live process.
    pub fn new(name: impl Into<String>) -> Arc<Proc> {
        Arc::new(Proc {
            name: name.into(),
            dead: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            deliveries: Mutex::new(Vec::new()),
            slots: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
        })
    }

    /// Crashes the process: from now on none of its calls returns, and its unsettled deliveries
    /// go back to their queues.
    pub fn crash(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let held: Vec<_> = self.deliveries.lock().unwrap().drain(..).collect();
        for delivery in held.iter().filter_map(Weak::upgrade) {
            drop(delivery.lock().unwrap().take());
        }
    }

    /// Whether the process crashed.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Waits while the process is frozen; never returns once it crashed.
    pub async fn gate(&self) {
        loop {
            if self.is_dead() {
                std::future::pending::<()>().await;
            }
            if !self.frozen.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The store as one process sees it.
pub struct SimStore {
    inner: Arc<dyn Store>,
    world: Arc<World>,
    proc: Arc<Proc>,
}

impl SimStore {
    /// The shared store seen through `proc`'s fault layer.
    pub fn of(world: &Arc<World>, proc: &Arc<Proc>) -> Arc<dyn Store> {
        Arc::new(SimStore { inner: world.store.clone(), world: world.clone(), proc: proc.clone() })
    }

    /// Checks the limits after a write of this process, and notes what it found in the trace.
    async fn check_limits(&self, what: &str) {
        for found in self.world.limits.check(&self.world.store, what).await {
            self.world.note(format_args!("  {} {found}", self.proc.name));
        }
    }

    /// One call: gate, jitter, faults before, the call, faults after, the limit check.
    async fn call<T>(
        &self,
        what: &'static str,
        write: bool,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        self.proc.gate().await;
        self.world.calls.fetch_add(1, Ordering::Relaxed);
        self.world.jitter().await;
        let rates = self.world.rates();
        if self.world.roll(rates.fail_before, "store call failed before applying") {
            self.world.note(format_args!("  {} {what}: failed before applying", self.proc.name));
            return Err(BackendError::new(format!("simulated: {what}: no answer (not applied)")));
        }
        if self.world.roll(rates.hang, "store call hung past the timeout") {
            self.world.note(format_args!("  {} {what}: hangs past the timeout", self.proc.name));
            tokio::time::sleep(RESPONSE_TIMEOUT).await;
            self.proc.gate().await;
            if self.world.rng.chance(0.5) {
                let _ = call.await;
                if write {
                    self.check_limits(what).await;
                }
            }
            return Err(BackendError::new(format!("simulated: {what}: response timed out")));
        }
        let result = call.await;
        if write && result.is_ok() {
            self.check_limits(what).await;
        }
        // A process that crashed during the call never sees the answer.
        self.proc.gate().await;
        if write && result.is_ok() && self.world.roll(rates.lost_answer, "store write applied, answer lost") {
            self.world.note(format_args!("  {} {what}: applied, answer lost", self.proc.name));
            return Err(BackendError::new(format!("simulated: {what}: applied, then the answer was lost")));
        }
        result
    }
}

#[async_trait]
impl Store for SimStore {
    async fn dag_record(&self, dag_id: &str) -> Result<Option<DagRecord>, BackendError> {
        self.call("dag_record", false, self.inner.dag_record(dag_id)).await
    }
    async fn put_dag_record(&self, record: &DagRecord) -> Result<(), BackendError> {
        self.call("put_dag_record", true, self.inner.put_dag_record(record)).await
    }
    async fn put_dag_version(&self, version: &DagVersionRecord) -> Result<(), BackendError> {
        self.call("put_dag_version", true, self.inner.put_dag_version(version)).await
    }
    async fn dag_version(&self, dag_id: &str, version: &str) -> Result<Option<DagVersionRecord>, BackendError> {
        self.call("dag_version", false, self.inner.dag_version(dag_id, version)).await
    }
    async fn create_run(&self, run: &RunRecord, tasks: &[TaskInstance]) -> Result<CreateRun, BackendError> {
        self.call("create_run", true, self.inner.create_run(run, tasks)).await
    }
    async fn run(&self, run_id: &str) -> Result<Option<RunRecord>, BackendError> {
        self.call("run", false, self.inner.run(run_id)).await
    }
    async fn transition_run(&self, expected: RunState, run: &RunRecord) -> Result<bool, BackendError> {
        let result = self.call("transition_run", true, self.inner.transition_run(expected, run)).await;
        self.world
            .note(format_args!("  {} run {} {expected} -> {}: {result:?}", self.proc.name, run.run_id, run.state));
        result
    }
    async fn transition_run_with_tasks(
        &self,
        expected: RunState,
        run: &RunRecord,
        changes: &[TaskChange],
    ) -> Result<bool, BackendError> {
        self.call("transition_run_with_tasks", true, self.inner.transition_run_with_tasks(expected, run, changes)).await
    }
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, BackendError> {
        self.call("list_runs", false, self.inner.list_runs(filter)).await
    }
    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>, BackendError> {
        self.call("unfinished_runs", false, self.inner.unfinished_runs()).await
    }
    async fn tasks(&self, run_id: &str) -> Result<Vec<TaskInstance>, BackendError> {
        self.call("tasks", false, self.inner.tasks(run_id)).await
    }
    async fn task(&self, run_id: &str, task_id: &str) -> Result<Option<TaskInstance>, BackendError> {
        self.call("task", false, self.inner.task(run_id, task_id)).await
    }
    async fn transition_task(
        &self,
        run_id: &str,
        expected_state: TaskState,
        expected_try: u32,
        task: &TaskInstance,
    ) -> Result<bool, BackendError> {
        let write = async {
            let applied = self.inner.transition_task(run_id, expected_state, expected_try, task).await?;
            if applied && task.state == TaskState::Queued && expected_state != TaskState::Queued {
                self.world.check_queued(&self.proc.name, run_id, vec![(task.task_id.clone(), task.try_number)]).await;
            }
            Ok(applied)
        };
        self.call("transition_task", true, write).await
    }
    async fn tasks_by_id(&self, run_id: &str, task_ids: &[&str]) -> Result<Vec<Option<TaskInstance>>, BackendError> {
        self.call("tasks_by_id", false, self.inner.tasks_by_id(run_id, task_ids)).await
    }
    async fn transition_tasks(&self, run_id: &str, changes: &[TaskChange]) -> Result<Vec<bool>, BackendError> {
        let write = async {
            let applied = self.inner.transition_tasks(run_id, changes).await?;
            let queued = changes
                .iter()
                .zip(&applied)
                .filter(|(c, a)| **a && c.task.state == TaskState::Queued && c.expected_state != TaskState::Queued)
                .map(|(c, _)| (c.task.task_id.clone(), c.task.try_number))
                .collect();
            self.world.check_queued(&self.proc.name, run_id, queued).await;
            Ok(applied)
        };
        self.call("transition_tasks", true, write).await
    }
    async fn claim_try(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        claimant: &Claimant,
        read: &[&str],
    ) -> Result<ClaimAnswer, BackendError> {
        self.call("claim_try", true, self.inner.claim_try(run_id, task_id, try_number, claimant, read)).await
    }
    async fn finish_try(
        &self,
        run_id: &str,
        done: &TaskInstance,
        candidates: &[EagerClaim],
    ) -> Result<FinishedTry, BackendError> {
        self.call("finish_try", true, self.inner.finish_try(run_id, done, candidates)).await
    }
    async fn finish_and_claim(
        &self,
        run_id: &str,
        done: &TaskInstance,
        next: &NextClaim<'_>,
    ) -> Result<FinishedAndClaimed, BackendError> {
        let mut answer = self.call("finish_and_claim", true, self.inner.finish_and_claim(run_id, done, next)).await;
        // The step is rare beside the other calls: its answer is lost more often, so the seeds
        // reach its unknown outcome (the claim applied, the worker not told) often enough.
        let lost = (self.world.rates().lost_answer * 10.0).min(0.5);
        if answer.as_ref().is_ok_and(|a| a.next.claimed)
            && self.world.roll(lost, "outcome and next claim applied, answer lost")
        {
            self.world.note(format_args!("  {} finish_and_claim: applied, answer lost", self.proc.name));
            answer = Err(BackendError::new("simulated: finish_and_claim: applied, then the answer was lost"));
        }
        match &answer {
            Ok(answer) if answer.next.claimed => drop(self.world.outcome_claims.fetch_add(1, Ordering::Relaxed)),
            Ok(_) => {}
            Err(_) => drop(self.world.outcome_claims_faulted.fetch_add(1, Ordering::Relaxed)),
        }
        answer
    }
    async fn add_tasks(
        &self,
        run_id: &str,
        new_tasks: &[TaskInstance],
        new_upstreams: &[(String, Vec<String>)],
    ) -> Result<(), BackendError> {
        self.call("add_tasks", true, self.inner.add_tasks(run_id, new_tasks, new_upstreams)).await
    }
    async fn set_progress(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        progress: f64,
    ) -> Result<(), BackendError> {
        self.call("set_progress", false, self.inner.set_progress(run_id, task_id, try_number, progress)).await
    }
    async fn append_log(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        lines: &[String],
    ) -> Result<(), BackendError> {
        self.call("append_log", false, self.inner.append_log(run_id, task_id, try_number, lines)).await
    }
    async fn read_log(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        from: usize,
    ) -> Result<Vec<String>, BackendError> {
        self.call("read_log", false, self.inner.read_log(run_id, task_id, try_number, from)).await
    }
    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<(), BackendError> {
        self.call("heartbeat", false, self.inner.heartbeat(worker)).await
    }
    async fn remove_worker(&self, name: &str) -> Result<(), BackendError> {
        self.call("remove_worker", true, self.inner.remove_worker(name)).await
    }
    async fn workers(&self) -> Result<Vec<WorkerInfo>, BackendError> {
        self.call("workers", false, self.inner.workers()).await
    }
    async fn acquire_lease(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<Option<LeaseTerm>, BackendError> {
        let world = self.world.clone();
        let process = self.proc.name.clone();
        let inner = self.inner.clone();
        self.call("acquire_lease", false, async move {
            // The store's clock, as Redis `TIME` would give it, not the process's own.
            let _ = now;
            let granted = inner.acquire_lease(holder, store_now(&world), ttl).await?;
            if let Some(lease) = &granted {
                world.leases.lock().unwrap().push(LeaseGrant {
                    lease: lease.clone(),
                    renewal: false,
                    process,
                    at_ms: world.now_ms(),
                });
            }
            Ok(granted)
        })
        .await
    }
    async fn renew_lease(&self, lease: &LeaseTerm, now: DateTime<Utc>, ttl: Duration) -> Result<bool, BackendError> {
        let world = self.world.clone();
        let process = self.proc.name.clone();
        let inner = self.inner.clone();
        self.call("renew_lease", false, async move {
            let _ = now;
            let renewed = inner.renew_lease(lease, store_now(&world), ttl).await?;
            if renewed {
                world.leases.lock().unwrap().push(LeaseGrant {
                    lease: lease.clone(),
                    renewal: true,
                    process,
                    at_ms: world.now_ms(),
                });
            }
            Ok(renewed)
        })
        .await
    }
    async fn release_lease(&self, lease: &LeaseTerm) -> Result<(), BackendError> {
        self.call("release_lease", false, self.inner.release_lease(lease)).await
    }
    fn fenced(&self, mut fence: Fence) -> Option<Arc<dyn Store>> {
        // The term's expiry is judged by the store's clock, as Redis's key expiry is.
        fence.clock = Arc::new(StoreClock(self.world.clone()));
        let inner = self.inner.fenced(fence)?;
        Some(Arc::new(SimStore { inner, world: self.world.clone(), proc: self.proc.clone() }))
    }
    async fn now(&self) -> Result<Option<DateTime<Utc>>, BackendError> {
        let world = self.world.clone();
        self.call("now", false, async move { Ok(Some(store_now(&world))) }).await
    }
    async fn ping(&self) -> Result<(), BackendError> {
        self.call("ping", false, self.inner.ping()).await
    }
}

/// The store's own clock: the simulation's true time, whatever the processes' clocks say.
pub fn store_now(world: &World) -> DateTime<Utc> {
    crate::origin() + chrono::Duration::milliseconds(world.now_ms() as i64)
}

/// [`store_now`] as a [`Clock`], for the fences of the processes' views.
struct StoreClock(Arc<World>);

#[async_trait]
impl Clock for StoreClock {
    fn now(&self) -> DateTime<Utc> {
        store_now(&self.0)
    }
    async fn sleep_until(&self, at: DateTime<Utc>) {
        let wait = (at - self.now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
    }
}

/// The queue as one process sees it.
pub struct SimQueue {
    inner: Arc<dyn Queue>,
    world: Arc<World>,
    proc: Arc<Proc>,
}

impl SimQueue {
    /// The shared queue seen through `proc`'s fault layer.
    pub fn of(world: &Arc<World>, proc: &Arc<Proc>) -> Arc<dyn Queue> {
        Arc::new(SimQueue { inner: world.queue.clone(), world: world.clone(), proc: proc.clone() })
    }

    /// Whether messages of `topic` may be lost: those whose loss the protocol promises to
    /// survive (task messages and status updates; the store is the truth). A trigger from an
    /// outside producer, once confirmed, is the broker's to keep.
    fn lossy(topic: &Topic) -> bool {
        matches!(topic, Topic::Tasks(_) | Topic::Status)
    }

    /// Publishes one message with its headers (a broker keeps them with the message, and with
    /// its duplicate), lost or duplicated as the world's rates say.
    async fn publish_one(&self, topic: &Topic, payload: Vec<u8>, headers: Headers) -> Result<(), BackendError> {
        let rates = self.world.rates();
        if Self::lossy(topic) && self.world.roll(rates.message_lost, "message lost") {
            return Ok(());
        }
        if self.world.roll(rates.message_duplicated, "message duplicated") {
            self.inner.publish_with_headers(vec![(topic.clone(), payload.clone(), headers.clone())]).await?;
        }
        self.inner.publish_with_headers(vec![(topic.clone(), payload, headers)]).await
    }

    async fn enter(&self, what: &str) -> Result<(), BackendError> {
        self.proc.gate().await;
        self.world.calls.fetch_add(1, Ordering::Relaxed);
        self.world.jitter().await;
        if self.world.roll(self.world.rates().fail_before, "queue call failed before applying") {
            return Err(BackendError::new(format!("simulated: {what}: broker did not answer (not applied)")));
        }
        Ok(())
    }

    async fn leave(&self, what: &str) -> Result<(), BackendError> {
        self.proc.gate().await;
        if self.world.roll(self.world.rates().lost_answer, "publish applied, confirm lost") {
            return Err(BackendError::new(format!("simulated: {what}: published, then the confirm was lost")));
        }
        Ok(())
    }
}

#[async_trait]
impl Queue for SimQueue {
    async fn publish(&self, topic: &Topic, payload: Vec<u8>) -> Result<(), BackendError> {
        self.enter("publish").await?;
        self.publish_one(topic, payload, Headers::new()).await?;
        self.leave("publish").await
    }
    async fn publish_many(&self, messages: Vec<(Topic, Vec<u8>)>) -> Result<(), BackendError> {
        self.enter("publish_many").await?;
        for (topic, payload) in messages {
            self.publish_one(&topic, payload, Headers::new()).await?;
        }
        self.leave("publish_many").await
    }
    async fn publish_with_headers(&self, messages: Vec<(Topic, Vec<u8>, Headers)>) -> Result<(), BackendError> {
        self.enter("publish_many").await?;
        for (topic, payload, headers) in messages {
            self.publish_one(&topic, payload, headers).await?;
        }
        self.leave("publish_many").await
    }
    async fn consume(&self, topic: &Topic, prefetch: u16) -> Result<Box<dyn Consumer>, BackendError> {
        self.enter("consume").await?;
        let inner = self.inner.consume(topic, prefetch).await?;
        Ok(Box::new(SimConsumer {
            inner,
            world: self.world.clone(),
            proc: self.proc.clone(),
            acked: true,
            taken: None,
        }))
    }
    async fn broadcast(&self, payload: Vec<u8>) -> Result<(), BackendError> {
        self.enter("broadcast").await?;
        self.inner.broadcast(payload).await?;
        self.leave("broadcast").await
    }
    async fn subscribe_broadcasts(&self) -> Result<Box<dyn Consumer>, BackendError> {
        self.enter("subscribe_broadcasts").await?;
        let inner = self.inner.subscribe_broadcasts().await?;
        Ok(Box::new(SimConsumer {
            inner,
            world: self.world.clone(),
            proc: self.proc.clone(),
            acked: false,
            taken: None,
        }))
    }
    async fn depth(&self, topic: &Topic) -> Result<u64, BackendError> {
        self.enter("depth").await?;
        self.inner.depth(topic).await
    }
    async fn ping(&self) -> Result<(), BackendError> {
        self.enter("ping").await?;
        self.inner.ping().await
    }
}

/// A consumer of one process: deliveries come late (reordered against other consumers), now
/// and then twice, and never to a crashed process. A call dropped before it answers (a worker's
/// slot looks for a delivery at hand without waiting: `Subscription::try_next`) keeps the
/// delivery it took for the next call, as a broker's consumer does.
struct SimConsumer {
    inner: Box<dyn Consumer>,
    world: Arc<World>,
    proc: Arc<Proc>,
    /// Whether deliveries are settled (task and status queues), not broadcasts.
    acked: bool,
    /// A delivery taken from the queue by a call that was dropped before it answered.
    taken: Option<Delivery>,
}

#[async_trait]
impl Consumer for SimConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, BackendError>> {
        loop {
            if self.taken.is_none() {
                self.taken = Some(match self.inner.next().await? {
                    Ok(delivery) => delivery,
                    Err(e) => return Some(Err(e)),
                });
            }
            if self.proc.is_dead() {
                self.taken = None;
                return std::future::pending().await;
            }
            self.world.jitter().await;
            self.proc.gate().await;
            let delivery = self.taken.take()?;
            if !self.acked {
                return Some(Ok(delivery));
            }
            if self.world.roll(self.world.rates().redelivered, "delivery put back (channel lost)") {
                drop(delivery);
                continue;
            }
            let (payload, redelivered, error, message_id) =
                (delivery.payload.clone(), delivery.redelivered, delivery.error.clone(), delivery.message_id.clone());
            let held = Arc::new(Mutex::new(Some(delivery)));
            self.proc.deliveries.lock().unwrap().retain(|d| d.strong_count() > 0);
            self.proc.deliveries.lock().unwrap().push(Arc::downgrade(&held));
            let acker = SimAcker { held, proc: self.proc.clone() };
            return Some(Ok(Delivery::new(payload, redelivered, error, Box::new(acker)).with_message_id(message_id)));
        }
    }
}

/// Settles a delivery through the process, unless the process crashed (then the queue has it
/// back already).
struct SimAcker {
    held: Arc<Mutex<Option<Delivery>>>,
    proc: Arc<Proc>,
}

impl SimAcker {
    async fn take(&self) -> Option<Delivery> {
        self.proc.gate().await;
        self.held.lock().unwrap().take()
    }
}

#[async_trait]
impl Acker for SimAcker {
    async fn ack(self: Box<Self>) -> Result<(), BackendError> {
        match self.take().await {
            Some(delivery) => delivery.ack().await,
            None => Ok(()),
        }
    }
    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), BackendError> {
        match self.take().await {
            Some(delivery) => delivery.dead_letter(reason).await,
            None => Ok(()),
        }
    }
    async fn requeue(self: Box<Self>) -> Result<(), BackendError> {
        match self.take().await {
            Some(delivery) => delivery.requeue().await,
            None => Ok(()),
        }
    }
}
