//! dagmq-worker: consumes task-to-exec messages of its pools, runs each try (a Rust task or a
//! process) under the task's timeout, writes the try's log, reports the outcome to the store
//! and to `dagmq.status`, and acknowledges the message only after that report is durable.
//!
//! Entry point: [`run`] with a [`WorkerConfig`], a queue, a store and a shutdown signal.

mod builtin;
mod command;
mod contact;
mod execute;
mod guard;
mod log_sink;
mod metrics;
mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dagmq_core::records::RunningTry;
use dagmq_core::{
    BackendError, CancelSignal, Clock, DagRegistry, Queue, Store, Subscription, TaskRegistry, Topic, WorkerInfo,
};
use tokio::sync::Semaphore;

pub use builtin::{Noop, Sleep, builtin_tasks};
pub use metrics::{WORK_WAITING_BUCKETS, WorkerMetrics};

use execute::{RunningTries, StopReason};

/// What a worker needs besides its queue and store.
pub struct WorkerConfig {
    /// Unique name in the worker registry.
    pub name: String,
    /// Host name, for operators.
    pub host: String,
    /// Pools to consume (`dagmq.tasks.<pool>`).
    pub queues: Vec<String>,
    /// Most tries running at once.
    pub concurrency: usize,
    /// DAGs whose tasks this worker may run, when `live` is absent (the live set is then made
    /// of these). A try never takes a setting from here: everything it applies (what runs, its
    /// args, timeout, branch choices, eager claims) comes from its run's DAG version.
    pub dags: Arc<DagRegistry>,
    /// Named Rust tasks, for follow-up tasks.
    pub tasks: TaskRegistry,
    /// Source of `now`.
    pub clock: Arc<dyn Clock>,
    /// On shutdown, how long running tries may take to finish before they are requeued.
    pub grace_period: Duration,
    /// How often the worker refreshes its registry entry, and checks with the store that its
    /// running tries are still its own (a cancel reaches a try within this interval).
    pub heartbeat_interval: Duration,
    /// The scheduler's worker timeout: a worker that could not heartbeat for half of it stops
    /// its running tries (self-fencing), so that they have stopped before the scheduler
    /// requeues them elsewhere.
    pub worker_timeout: Duration,
    /// Most unstarted messages the worker holds per pool (the consumer's prefetch, at most
    /// `concurrency`). Messages are acknowledged when their try is claimed, so a worker whose
    /// slots are all busy holds at most this many messages that other workers could start.
    pub prefetch: u16,
    /// Counters of what the worker did.
    pub metrics: Arc<WorkerMetrics>,
    /// The DAGs as a live set that a reload replaces; when absent, `dags` for good. Every
    /// version loaded stays known, and a try runs the version its run was created with.
    pub live: Option<Arc<dagmq_core::LiveDags>>,
    /// Eager dispatch: a try that succeeds claims, in the same store step, a downstream task it
    /// made ready (default rule, this worker's pools, no concurrency limit) and runs it next in
    /// its own slot, without a task message. Off, every task goes through the scheduler.
    pub eager: bool,
    /// With eager dispatch, most downstream tries claimed as one try succeeds: the first runs
    /// in that try's slot, each other in a free slot of the worker, in a task of its own. Over an
    /// in-memory queue, where a round through the scheduler costs microseconds, 1 is faster.
    pub eager_claims: usize,
    /// How long a try of a DAG version this worker has not loaded may wait, since it was queued,
    /// for a worker that has loaded it, before a worker that has not fails it. Meanwhile such a
    /// try is never claimed here: the worker asks its reloader to read the DAG directory now,
    /// waits a few seconds for the version, and otherwise puts the message back for another
    /// worker (or for itself, later), so a run triggered right after a file changed waits for
    /// its workers to load it and uses up no try.
    pub dag_version_wait: Duration,
    /// Send status updates together (one confirmed message for every outcome that finished
    /// while the previous one was confirmed). Off, each goes alone, as over an in-memory queue,
    /// where a publish costs no round trip to save.
    pub batch_status: bool,
}

/// The default [`WorkerConfig::prefetch`]: enough to keep claims pipelined, few enough that a
/// busy worker does not hoard work.
pub const DEFAULT_PREFETCH: u16 = 64;

/// The default [`WorkerConfig::dag_version_wait`]: far longer than a DAG directory takes to be
/// read again everywhere (every 2 s), long enough for a file copied to the workers' hosts a
/// little later than to the scheduler's.
pub const DEFAULT_DAG_VERSION_WAIT: Duration = Duration::from_secs(300);

impl WorkerConfig {
    /// Defaults: pool `default`, 1000 tries at once, builtin tasks, 30 s grace, 5 s heartbeat.
    pub fn new(name: impl Into<String>, dags: DagRegistry, clock: Arc<dyn Clock>) -> WorkerConfig {
        WorkerConfig {
            name: name.into(),
            host: "localhost".to_string(),
            queues: vec![dagmq_core::dag::DEFAULT_QUEUE.to_string()],
            concurrency: 1000,
            dags: Arc::new(dags),
            tasks: builtin_tasks(),
            clock,
            grace_period: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            worker_timeout: Duration::from_secs(20),
            prefetch: DEFAULT_PREFETCH,
            metrics: Arc::new(WorkerMetrics::default()),
            live: None,
            eager: true,
            eager_claims: 8,
            dag_version_wait: DEFAULT_DAG_VERSION_WAIT,
            batch_status: true,
        }
    }
}

/// What every try of this worker shares.
pub(crate) struct Shared {
    /// Configuration.
    pub(crate) config: WorkerConfig,
    /// The queue.
    pub(crate) queue: Arc<dyn Queue>,
    /// The store.
    pub(crate) store: Arc<dyn Store>,
    /// Tries running now, to stop them and to report them in heartbeats.
    pub(crate) running: RunningTries,
    /// This process's identity in the registry and on claimed tries.
    pub(crate) instance: String,
    /// Records of runs this worker ran tries of (immutable parts only are used).
    pub(crate) runs: Mutex<HashMap<String, Arc<dagmq_core::RunRecord>>>,
    /// The DAGs this worker has loaded, every version of them.
    pub(crate) live: Arc<dagmq_core::LiveDags>,
    /// Sends status updates, batched.
    pub(crate) status: status::StatusSender,
    /// Fires when the worker is shutting down: it claims no more downstream tries then.
    pub(crate) shutdown: CancelSignal,
    /// The worker's slots (its concurrency): one per try running.
    pub(crate) slots: Arc<Semaphore>,
    /// Its contact with the store, from its heartbeats: a try claimed before a silence long
    /// enough for the scheduler to take the worker for lost never starts.
    pub(crate) contact: contact::Contact,
}

impl Shared {
    /// Whether the worker is shutting down.
    pub(crate) fn stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

/// Runs the worker until `shutdown` fires, then stops taking work, lets running tries finish
/// within the grace period and requeues the ones that do not.
pub async fn run(
    config: WorkerConfig,
    queue: Arc<dyn Queue>,
    store: Arc<dyn Store>,
    shutdown: CancelSignal,
) -> Result<(), BackendError> {
    let concurrency = config.concurrency.max(1);
    let started_at = config.clock.now();
    let instance = format!("{}@{}-{}", config.name, started_at.timestamp_micros(), std::process::id());
    let live = config
        .live
        .clone()
        .unwrap_or_else(|| Arc::new(dagmq_core::LiveDags::new((*config.dags).clone(), Vec::new(), HashMap::new())));
    let shared = Arc::new(Shared {
        live,
        status: status::StatusSender::start(queue.clone(), config.batch_status),
        shutdown: shutdown.clone(),
        slots: Arc::new(Semaphore::new(concurrency)),
        contact: contact::Contact::new(config.worker_timeout),
        config,
        queue,
        store,
        running: Arc::new(Mutex::new(HashMap::new())),
        instance,
        runs: Mutex::new(HashMap::new()),
    });
    let slots = shared.slots.clone();
    tracing::info!(worker = %shared.config.name, queues = ?shared.config.queues, concurrency, "worker started");

    let sent = tokio::time::Instant::now();
    if heartbeat(&shared, started_at).await {
        shared.contact.heartbeat_written(sent);
    }
    let heartbeats = tokio::spawn(heartbeat_loop(shared.clone(), started_at, shutdown.clone()));
    let controls = tokio::spawn(execute::control_loop(shared.clone(), shutdown.clone()));
    let mut consumers = Vec::new();
    for pool in shared.config.queues.clone() {
        let prefetch = u16::try_from(concurrency).unwrap_or(u16::MAX).min(shared.config.prefetch.max(1));
        consumers.push(tokio::spawn(consume_loop(
            shared.clone(),
            Topic::Tasks(pool),
            prefetch,
            slots.clone(),
            shutdown.clone(),
        )));
    }
    shutdown.cancelled().await;
    for consumer in consumers {
        let _ = consumer.await;
    }
    let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
    let in_flight = concurrency - slots.available_permits();
    if in_flight > 0 {
        tracing::info!(in_flight, grace = ?shared.config.grace_period, "waiting for running tries to finish");
    }
    if tokio::time::timeout(shared.config.grace_period, slots.acquire_many(all)).await.is_err() {
        let count = execute::stop_all(&shared, StopReason::Interrupted);
        tracing::warn!(count, "grace period over: requeueing running tries");
        let _ = tokio::time::timeout(Duration::from_secs(30), slots.acquire_many(all)).await;
    }
    heartbeats.abort();
    controls.abort();
    if let Err(err) = shared.store.remove_worker(&shared.config.name).await {
        tracing::warn!("removing the worker from the registry: {err}");
    }
    tracing::info!(worker = %shared.config.name, "worker stopped");
    Ok(())
}

/// Takes deliveries from one pool while slots are free.
async fn consume_loop(shared: Arc<Shared>, topic: Topic, prefetch: u16, slots: Arc<Semaphore>, shutdown: CancelSignal) {
    let mut subscription = Subscription::topic(shared.queue.clone(), topic, prefetch);
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        // The slot is free from now: the try this message carries starts after the work
        // waiting (`WorkerMetrics::work_waiting`) of the delivery and the claim.
        let free_since = shared.config.clock.now();
        let Some(delivery) = subscription.next(&shutdown).await else { return };
        let shared = shared.clone();
        tokio::spawn(async move {
            execute::execute(&shared, delivery, free_since).await;
            drop(slot);
        });
    }
}

/// Refreshes the registry entry every heartbeat interval and stops tries the store no longer
/// has running here. A worker whose heartbeats have not reached the store for half the worker
/// timeout stops every running try (self-fencing): the scheduler requeues a lost worker's
/// tries only after the whole timeout, and a fenced try is aborted within
/// [`execute::running::FENCED_STOP_GRACE`], so two copies of one try never run at once as long
/// as that grace is shorter than the other half.
async fn heartbeat_loop(shared: Arc<Shared>, started_at: chrono::DateTime<chrono::Utc>, shutdown: CancelSignal) {
    let interval = shared.config.heartbeat_interval;
    let fence_after = shared.config.worker_timeout / 2;
    // Checked every second (or heartbeat, if shorter), and a heartbeat may hang at most half an
    // interval, so fencing happens at most that much after half the worker timeout.
    let tick = interval.min(Duration::from_secs(1));
    let mut next_beat = tokio::time::Instant::now() + interval;
    let mut fenced = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next_beat.min(tokio::time::Instant::now() + tick)) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= next_beat {
            next_beat = now + interval;
            let written = matches!(tokio::time::timeout(interval / 2, heartbeat(&shared, started_at)).await, Ok(true));
            if written {
                shared.contact.heartbeat_written(now);
                fenced = false;
                match tokio::time::timeout(interval / 2, execute::stop_superseded(&shared)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => tracing::warn!("checking running tries with the store: {err}"),
                    Err(_) => {
                        tracing::warn!("checking running tries with the store: no answer within {:?}", interval / 2)
                    }
                }
            }
        }
        let silent_for = shared.contact.silent_for();
        if !fenced && silent_for >= fence_after {
            fenced = true;
            let count = execute::stop_all(&shared, StopReason::Fenced);
            tracing::error!(
                count,
                "no heartbeat reached the store for {silent_for:?}: stopping running tries before the scheduler \
                 requeues them"
            );
        }
    }
}

/// Writes the registry entry once; answers whether the store took it.
async fn heartbeat(shared: &Shared, started_at: chrono::DateTime<chrono::Utc>) -> bool {
    let running: Vec<RunningTry> = execute::running_tries(shared);
    let info = WorkerInfo {
        name: shared.config.name.clone(),
        instance: shared.instance.clone(),
        host: shared.config.host.clone(),
        queues: shared.config.queues.clone(),
        concurrency: u32::try_from(shared.config.concurrency).unwrap_or(u32::MAX),
        running,
        started_at,
        last_heartbeat: shared.config.clock.now(),
    };
    match shared.store.heartbeat(&info).await {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!("heartbeat: {err}");
            false
        }
    }
}
