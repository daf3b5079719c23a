//! Test harness: a scheduler and a worker over the in-memory queue and store, on a clock that
//! follows tokio's, plus Rust tasks that record what they did.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dagmq_core::memory::{MemoryQueue, MemoryStore};
use dagmq_core::task::CancelHandle;
use dagmq_core::{
    CancelSignal, Clock, DagRegistry, FollowUp, RunRecord, RunState, Store, Task, TaskContext, TaskError, TaskInstance,
    TaskOutcome, TaskRegistry, TokioClock,
};
use dagmq_scheduler::{Notification, Notifier, SchedulerConfig, SchedulerHandle};
use dagmq_worker::WorkerConfig;

use crate::faults::{Faults, FaultyQueue, FaultyStore};

/// The fault switches of one process's store and queue.
#[derive(Clone, Default)]
pub struct ProcessFaults {
    pub store: Arc<Faults>,
    pub queue: Arc<Faults>,
}

impl ProcessFaults {
    /// The backends as this process sees them.
    fn wrap(&self, queue: &Arc<MemoryQueue>, store: &Arc<MemoryStore>) -> (Arc<dyn dagmq_core::Queue>, Arc<dyn Store>) {
        let queue: Arc<dyn dagmq_core::Queue> =
            Arc::new(FaultyQueue { inner: queue.clone(), faults: self.queue.clone() });
        let store: Arc<dyn Store> = Arc::new(FaultyStore { inner: store.clone(), faults: self.store.clone() });
        (queue, store)
    }
}

/// The instant every paused-clock test starts at.
pub fn origin() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z").unwrap().with_timezone(&Utc)
}

/// A scheduler and a worker over shared in-memory backends.
pub struct Harness {
    pub queue: Arc<MemoryQueue>,
    pub store: Arc<MemoryStore>,
    pub clock: Arc<TokioClock>,
    pub scheduler: SchedulerHandle,
    pub dags: DagRegistry,
    pub tasks: TaskRegistry,
    /// Every notification the scheduler sent.
    pub notifications: Arc<Mutex<Vec<Notification>>>,
    /// Faults injected into the scheduler's store and queue.
    pub scheduler_faults: ProcessFaults,
    /// Faults injected into the worker's store and queue.
    pub worker_faults: ProcessFaults,
    /// Concurrency pools of the scheduler (and of those started after it).
    pub pools: dagmq_core::Pools,
    /// The live DAG set the scheduler and worker share, when a test reloads DAGs.
    pub live: Option<Arc<dagmq_core::LiveDags>>,
    /// Whether workers started from now on claim downstream tasks eagerly (the default).
    pub eager: bool,
    /// The metrics of the worker started last.
    pub worker_metrics: Arc<dagmq_worker::WorkerMetrics>,
    scheduler_stop: CancelHandle,
    scheduler_task: tokio::task::JoinHandle<Result<(), dagmq_core::BackendError>>,
    worker_stop: Option<CancelHandle>,
    worker_task: Option<tokio::task::JoinHandle<Result<(), dagmq_core::BackendError>>>,
}

impl Harness {
    /// Starts both with the builtin tasks registered.
    pub async fn start(dags: DagRegistry) -> Harness {
        Harness::start_with(dags, dagmq_worker::builtin_tasks()).await
    }

    /// Starts both with these named tasks.
    pub async fn start_with(dags: DagRegistry, tasks: TaskRegistry) -> Harness {
        Harness::start_with_pools(dags, tasks, dagmq_core::Pools::new()).await
    }

    /// Starts both over a live DAG set the test can replace (then tell the scheduler with
    /// `dags_changed`).
    pub async fn start_live(dags: DagRegistry, live: Arc<dagmq_core::LiveDags>) -> Harness {
        Harness::start_full(dags, dagmq_worker::builtin_tasks(), dagmq_core::Pools::new(), Some(live)).await
    }

    /// Starts both with these named tasks and concurrency pools.
    pub async fn start_with_pools(dags: DagRegistry, tasks: TaskRegistry, pools: dagmq_core::Pools) -> Harness {
        Harness::start_full(dags, tasks, pools, None).await
    }

    /// Starts both with everything given.
    async fn start_full(
        dags: DagRegistry,
        tasks: TaskRegistry,
        pools: dagmq_core::Pools,
        live: Option<Arc<dagmq_core::LiveDags>>,
    ) -> Harness {
        let queue = Arc::new(MemoryQueue::new());
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(TokioClock::starting_at(origin()));
        let notifications = Arc::new(Mutex::new(Vec::new()));
        let scheduler_faults = ProcessFaults::default();
        let (scheduler_stop, scheduler, scheduler_task) =
            spawn_scheduler(&dags, &pools, &live, &scheduler_faults, &queue, &store, &clock, &notifications);
        let mut harness = Harness {
            notifications,
            scheduler_faults,
            worker_faults: ProcessFaults::default(),
            pools,
            live,
            eager: true,
            worker_metrics: Arc::default(),
            queue,
            store,
            clock,
            scheduler,
            dags,
            tasks,
            scheduler_stop,
            scheduler_task,
            worker_stop: None,
            worker_task: None,
        };
        harness.start_worker();
        harness
    }

    /// Starts the worker (again).
    pub fn start_worker(&mut self) {
        let mut config = WorkerConfig::new("worker-1", self.dags.clone(), self.clock.clone());
        config.tasks = self.tasks.clone();
        config.concurrency = 64;
        config.live = self.live.clone();
        config.eager = self.eager;
        self.worker_metrics = config.metrics.clone();
        let (stop, signal) = CancelSignal::new();
        let (queue, store) = self.worker_faults.wrap(&self.queue, &self.store);
        self.worker_task = Some(tokio::spawn(dagmq_worker::run(config, queue, store, signal)));
        self.worker_stop = Some(stop);
    }

    /// Starts another worker named `name` beside the harness's, over the same backends seen
    /// through `faults`, with a live DAG set of its own (a process that reads its DAG directory
    /// on its own) and `tweak` applied to its configuration. Answers how to stop it, its task
    /// and its metrics.
    pub fn extra_worker(
        &self,
        name: &str,
        live: Arc<dagmq_core::LiveDags>,
        faults: &ProcessFaults,
        tweak: impl FnOnce(&mut WorkerConfig),
    ) -> (CancelHandle, tokio::task::JoinHandle<Result<(), dagmq_core::BackendError>>, Arc<dagmq_worker::WorkerMetrics>)
    {
        let mut config = WorkerConfig::new(name, (*live.current()).clone(), self.clock.clone());
        config.tasks = self.tasks.clone();
        config.concurrency = 64;
        config.live = Some(live);
        config.eager = self.eager;
        tweak(&mut config);
        let metrics = config.metrics.clone();
        let (stop, signal) = CancelSignal::new();
        let (queue, store) = faults.wrap(&self.queue, &self.store);
        (stop, tokio::spawn(dagmq_worker::run(config, queue, store, signal)), metrics)
    }

    /// Makes a worker started with [`Harness::extra_worker`] the harness's own: stopped with it.
    pub fn keep_worker(
        &mut self,
        stop: CancelHandle,
        task: tokio::task::JoinHandle<Result<(), dagmq_core::BackendError>>,
    ) {
        self.worker_stop = Some(stop);
        self.worker_task = Some(task);
    }

    /// Stops the worker gracefully and waits for it.
    pub async fn stop_worker(&mut self) {
        if let Some(stop) = self.worker_stop.take() {
            stop.cancel();
        }
        if let Some(task) = self.worker_task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Stops the scheduler and starts a new one over the same queue and store, as after a crash.
    pub async fn restart_scheduler(&mut self) {
        self.scheduler_stop.cancel();
        (&mut self.scheduler_task).await.unwrap().unwrap();
        let (stop, handle, task) = spawn_scheduler(
            &self.dags,
            &self.pools,
            &self.live,
            &self.scheduler_faults,
            &self.queue,
            &self.store,
            &self.clock,
            &self.notifications,
        );
        self.scheduler_stop = stop;
        self.scheduler = handle;
        self.scheduler_task = task;
    }

    /// Starts another scheduler over the same queue and store, with faults of its own; it
    /// stands by while the first holds the lease.
    pub fn extra_scheduler(
        &self,
        faults: &ProcessFaults,
    ) -> (CancelHandle, SchedulerHandle, tokio::task::JoinHandle<Result<(), dagmq_core::BackendError>>) {
        spawn_scheduler(
            &self.dags,
            &self.pools,
            &self.live,
            faults,
            &self.queue,
            &self.store,
            &self.clock,
            &self.notifications,
        )
    }

    /// Starts another scheduler as `extra_scheduler` does, whose wall clock is `clock` (one
    /// that runs ahead of or behind the harness's: clock skew between processes).
    pub fn extra_scheduler_with_clock(
        &self,
        faults: &ProcessFaults,
        clock: &Arc<TokioClock>,
    ) -> (CancelHandle, SchedulerHandle, tokio::task::JoinHandle<Result<(), dagmq_core::BackendError>>) {
        spawn_scheduler(
            &self.dags,
            &self.pools,
            &self.live,
            faults,
            &self.queue,
            &self.store,
            clock,
            &self.notifications,
        )
    }

    /// Triggers a run and answers its id.
    pub async fn trigger(&self, dag_id: &str) -> String {
        self.scheduler.trigger(dag_id, Default::default(), None).await.unwrap().run_id
    }

    /// Waits until the run satisfies `done`, failing the test after 10 minutes of tokio time.
    pub async fn wait_run(&self, run_id: &str, done: impl Fn(&RunRecord) -> bool) -> RunRecord {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(run) = self.store.run(run_id).await.unwrap()
                && done(&run)
            {
                return run;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run_id} did not reach the expected state: {:?}",
                self.store.run(run_id).await.unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the run is final and answers its state.
    pub async fn wait_final(&self, run_id: &str) -> RunState {
        self.wait_run(run_id, |r| r.state.is_final()).await.state
    }

    /// Waits until a task satisfies `done`.
    pub async fn wait_task(&self, run_id: &str, task_id: &str, done: impl Fn(&TaskInstance) -> bool) -> TaskInstance {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(task) = self.store.task(run_id, task_id).await.unwrap()
                && done(&task)
            {
                return task;
            }
            assert!(tokio::time::Instant::now() < deadline, "task {run_id}/{task_id} did not reach the expected state");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The run's tasks by id.
    pub async fn tasks(&self, run_id: &str) -> HashMap<String, TaskInstance> {
        self.store.tasks(run_id).await.unwrap().into_iter().map(|t| (t.task_id.clone(), t)).collect()
    }

    /// Stops everything.
    pub async fn stop(mut self) {
        self.stop_worker().await;
        self.scheduler_stop.cancel();
        (&mut self.scheduler_task).await.unwrap().unwrap();
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_scheduler(
    dags: &DagRegistry,
    pools: &dagmq_core::Pools,
    live: &Option<Arc<dagmq_core::LiveDags>>,
    faults: &ProcessFaults,
    queue: &Arc<MemoryQueue>,
    store: &Arc<MemoryStore>,
    clock: &Arc<TokioClock>,
    notifications: &Arc<Mutex<Vec<Notification>>>,
) -> (CancelHandle, SchedulerHandle, tokio::task::JoinHandle<Result<(), dagmq_core::BackendError>>) {
    let mut config = SchedulerConfig::new(dags.clone(), clock.clone() as Arc<dyn Clock>);
    config.notifier = Arc::new(Recorder(notifications.clone()));
    config.sweep_interval = Duration::from_secs(5);
    config.pools = pools.clone();
    config.live = live.clone();
    let (stop, signal) = CancelSignal::new();
    let (queue, store) = faults.wrap(queue, store);
    let (handle, task) = dagmq_scheduler::spawn(config, queue, store, signal);
    (stop, handle, task)
}

/// Keeps every notification.
struct Recorder(Arc<Mutex<Vec<Notification>>>);

#[async_trait]
impl Notifier for Recorder {
    async fn notify(&self, notification: &Notification) -> Result<(), String> {
        self.0.lock().unwrap().push(notification.clone());
        Ok(())
    }
}

/// A shared journal of task events: "start:TASK" and "end:TASK", with the clock time.
#[derive(Clone, Default)]
pub struct Journal(pub Arc<Mutex<Vec<JournalEntry>>>);

/// One journal line and when it was written.
pub type JournalEntry = (String, DateTime<Utc>);

impl Journal {
    pub fn push(&self, entry: String, at: DateTime<Utc>) {
        self.0.lock().unwrap().push((entry, at));
    }

    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().map(|(e, _)| e.clone()).collect()
    }

    pub fn times_of(&self, entry: &str) -> Vec<DateTime<Utc>> {
        self.0.lock().unwrap().iter().filter(|(e, _)| e == entry).map(|(_, t)| *t).collect()
    }

    pub fn position(&self, entry: &str) -> usize {
        self.entries().iter().position(|e| e == entry).unwrap_or_else(|| panic!("{entry} not in journal"))
    }
}

/// Records its start and end in the journal; takes `work` of tokio time; fails the first
/// `failures` tries; panics when `panic` is set; can return follow-ups.
pub struct Probe {
    pub journal: Journal,
    pub clock: Arc<TokioClock>,
    pub work: Duration,
    pub failures: u32,
    pub fatal: bool,
    pub panic: bool,
    pub follow_ups: Vec<FollowUp>,
    pub tries: Arc<AtomicU32>,
}

impl Probe {
    pub fn new(journal: &Journal, clock: &Arc<TokioClock>) -> Probe {
        Probe {
            journal: journal.clone(),
            clock: clock.clone(),
            work: Duration::from_millis(10),
            failures: 0,
            fatal: false,
            panic: false,
            follow_ups: Vec::new(),
            tries: Arc::new(AtomicU32::new(0)),
        }
    }
}

#[async_trait]
impl Task for Probe {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        let n = self.tries.fetch_add(1, Ordering::SeqCst) + 1;
        self.journal.push(format!("start:{}", ctx.task_id), self.clock.now());
        ctx.log(format!("try {} of {}", ctx.try_number, ctx.task_id));
        ctx.set_progress(0.5);
        if self.panic {
            panic!("probe {} panics on purpose", ctx.task_id);
        }
        tokio::select! {
            _ = tokio::time::sleep(self.work) => {}
            _ = ctx.cancel_signal().cancelled() => {
                self.journal.push(format!("stopped:{}", ctx.task_id), self.clock.now());
                return Err(TaskError::fatal("stopped"));
            }
        }
        self.journal.push(format!("end:{}", ctx.task_id), self.clock.now());
        if n <= self.failures {
            return Err(if self.fatal {
                TaskError::fatal(format!("fatal failure {n}"))
            } else {
                TaskError::new(format!("failure {n}"))
            });
        }
        Ok(TaskOutcome::with_follow_ups(self.follow_ups.clone()))
    }
}
