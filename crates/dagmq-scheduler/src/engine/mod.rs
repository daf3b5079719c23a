//! The scheduler's event loop. One task owns all scheduling state and handles a closed set of
//! events one at a time: status updates and triggers from the queue, commands from the API,
//! and timers (schedule points, retry delays, run timeouts, the reconciliation sweep).
//!
//! The store is the source of truth; the loop's [`ActiveRun`] views are caches of it. Every
//! write is a compare-and-set, so every action here is idempotent: a duplicate status message,
//! a redelivered trigger or a restart of the scheduler repeats nothing that already happened.
//!
//! The loop itself, its state and its timers are here; what it does lives in a file per concern:
//! `runs` (run creation and the watcher), `queueing` (trigger rules, queueing and limits),
//! `outcomes` (status updates and retries), `operator` (commands on runs and DAGs), `recovery`
//! (taking over, settling and the sweep), `workers` (lost workers and unclaimed tries) and
//! `lease` (the lease and fencing); `config` is what the loop is given, with its defaults.

mod config;
mod lease;
mod operator;
mod outcomes;
mod queueing;
mod recovery;
mod runs;
mod spans;
mod workers;

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dagmq_core::fail_point;
use dagmq_core::messages;
use dagmq_core::queue::join_all;
use dagmq_core::records::DagRecord;
use dagmq_core::{
    BackendError, CancelSignal, Dag, Delivery, Headers, LiveDags, Queue, RunKind, RunRecord, Store, Subscription,
    TaskInstance, TaskState, Topic,
};
use tokio::sync::mpsc;

use crate::active_run::ActiveRun;
use crate::commands::{Command, CommandError, SchedulerHandle};
use crate::limits::Limits;
use crate::metrics::{SchedulerMetrics, reason_label};
use lease::{StopOnDrop, renew_lease};

pub use config::SchedulerConfig;

/// Tasks queued with one batch of compare-and-sets in the store.
const QUEUE_CHUNK: usize = 500;

/// Messages published with one `publish_many` (one round of confirms).
const PUBLISH_CHUNK: usize = 1000;

/// Outbox size at which queueing stops to publish before it goes on.
const OUTBOX_HIGH_WATER: usize = 2000;

/// Starts the scheduler. It runs until `shutdown` fires; the returned task ends with an error
/// only if the queue refuses to let it consume.
pub fn spawn(
    config: SchedulerConfig,
    queue: Arc<dyn Queue>,
    store: Arc<dyn Store>,
    shutdown: CancelSignal,
) -> (SchedulerHandle, tokio::task::JoinHandle<Result<(), BackendError>>) {
    let (commands_tx, commands) = mpsc::channel(256);
    let metrics = Arc::new(SchedulerMetrics::default());
    let limits = Limits { pools: config.pools.clone(), ..Limits::default() };
    let worker_pools = crate::limits::WorkerPools::default();
    let live = config.live.clone().unwrap_or_else(|| {
        Arc::new(LiveDags::new((*config.dags).clone(), config.refused_dags.clone(), config.default_params.clone()))
    });
    let handle = SchedulerHandle {
        live: live.clone(),
        waiting_for: limits.waiting_for.clone(),
        worker_pools: worker_pools.clone(),
        pools: config.pools.clone(),
        metrics: metrics.clone(),
        commands: commands_tx,
        store: store.clone(),
        queue: queue.clone(),
        clock: config.clock.clone(),
    };
    let engine = Engine {
        metrics,
        now_cache: config.clock.now(),
        sweep_at: config.clock.now() + chrono::Duration::from_std(config.sweep_interval).unwrap_or_default(),
        zombie_at: config.clock.now() + chrono::Duration::from_std(config.zombie_check_interval).unwrap_or_default(),
        known_instances: HashMap::new(),
        worker_pools,
        unserved: workers::UnservedPools::default(),
        republished: HashMap::new(),
        unlisted: HashMap::new(),
        lease_name: format!("scheduler-{}", uuid::Uuid::new_v4().simple()),
        config,
        queue,
        base_store: store.clone(),
        store,
        deposed: CancelSignal::new().1,
        active: HashMap::new(),
        queued: HashMap::new(),
        running: HashMap::new(),
        dag_records: HashMap::new(),
        timers: BinaryHeap::new(),
        timer_seq: 0,
        outbox: Vec::new(),
        created: HashMap::new(),
        shutdown: shutdown.clone(),
        dirty: BTreeSet::new(),
        watch_at: None,
        limits,
        dags_generation: live.generation(),
        live,
        stored_dags: HashMap::new(),
        versions_written: HashSet::new(),
        restarting: HashSet::new(),
    };
    let task = tokio::spawn(engine.supervise(commands, shutdown));
    (handle, task)
}

/// Something the loop waits for on a timer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// A retry delay ended.
    Retry {
        /// The run.
        run_id: String,
        /// The task.
        task_id: String,
        /// The try that failed.
        try_number: u32,
    },
    /// A run's timeout ended.
    RunTimeout {
        /// The run.
        run_id: String,
    },
}

/// The reason a user's cancel writes on the tasks it cancels.
const USER_CANCEL: &str = "run cancelled";

/// A try: (run, task, try number).
type TryKey = (String, String, u32);

/// A message from a queue consumer.
enum Incoming {
    /// From `dagmq.status`.
    Status(Delivery),
    /// From `dagmq.triggers`.
    Trigger(Delivery),
}

/// What to do with a delivery once its effects are durable.
enum Settle {
    /// Done with.
    Ack,
    /// Bad message: to `dagmq.dead` with the reason.
    DeadLetter(String),
    /// Could not be handled now (backend failure): deliver again later.
    Requeue,
}

/// The event loop's state.
struct Engine {
    /// Counters the loop keeps.
    metrics: Arc<SchedulerMetrics>,
    /// Configuration.
    config: SchedulerConfig,
    /// The queue.
    queue: Arc<dyn Queue>,
    /// The store this scheduler writes to: while it holds the lease, a view whose writes are
    /// refused once its term has ended (see [`dagmq_core::store::Fence`]).
    store: Arc<dyn Store>,
    /// Running runs by id.
    active: HashMap<String, ActiveRun>,
    /// Queued runs per DAG, oldest first, waiting for a slot under `max_active_runs`.
    queued: HashMap<String, VecDeque<String>>,
    /// Running runs per DAG.
    running: HashMap<String, u32>,
    /// Cached per-DAG bookkeeping.
    dag_records: HashMap<String, DagRecord>,
    /// Pending timers, earliest first.
    timers: BinaryHeap<Reverse<(DateTime<Utc>, u64, TimerKind)>>,
    /// Tie-breaker keeping timers of the same instant in insertion order.
    timer_seq: u64,
    /// Messages to publish at the end of the current batch (or sooner, past
    /// [`OUTBOX_HIGH_WATER`]).
    outbox: Vec<(Topic, Vec<u8>, Headers)>,
    /// Fires when the scheduler must stop; ends a publish that keeps failing.
    shutdown: CancelSignal,
    /// The records and task instances of runs created in this turn of the loop, so a run that
    /// starts at once is not read back from the store; emptied at the end of every `start_dirty`.
    created: HashMap<String, (RunRecord, Vec<TaskInstance>)>,
    /// DAGs whose queued runs may be able to start.
    dirty: BTreeSet<String>,
    /// When the run watcher must look again; `None` when no DAG has a future schedule point.
    watch_at: Option<DateTime<Utc>>,
    /// When the next reconciliation sweep is due.
    sweep_at: DateTime<Utc>,
    /// When lost workers are next looked for.
    zombie_at: DateTime<Utc>,
    /// The instance last seen of each live worker.
    known_instances: HashMap<String, String>,
    /// The pools the live workers consume, shared with the API.
    worker_pools: crate::limits::WorkerPools,
    /// Pools with queued tasks and no live worker, and how many looks in a row found them so.
    unserved: workers::UnservedPools,
    /// Queued tries published again by the reconciliation: when last, and the wait before the
    /// next time.
    republished: HashMap<TryKey, (DateTime<Utc>, Duration)>,
    /// Running tries a live worker's heartbeat did not list: when first seen so, and that
    /// heartbeat's stamp (a later heartbeat must miss it too).
    unlisted: HashMap<TryKey, (DateTime<Utc>, DateTime<Utc>)>,
    /// This scheduler's name as the lease's holder. The store numbers each term it grants,
    /// and the term, not the name, fences the writes: a term that ended is never in force
    /// again, so a scheduler that lost the lease writes again only in a new term, after
    /// recovery.
    lease_name: String,
    /// The store as given; `store` is its fenced view while this scheduler holds the lease.
    base_store: Arc<dyn Store>,
    /// Fires when this scheduler loses the lease in its current term.
    deposed: CancelSignal,
    /// `now` at the start of the current event, so one event sees one instant.
    now_cache: DateTime<Utc>,
    /// Pools, the usage of every concurrency limit, and the tasks waiting for room.
    limits: Limits,
    /// The DAGs as loaded and reloaded, with every version seen.
    live: Arc<LiveDags>,
    /// The reload whose DAGs `config.dags` holds.
    dags_generation: u64,
    /// DAG versions runs name that this process has not loaded, as read from the store, by
    /// (DAG, version); `None` for a version the store does not have (a run created before
    /// versions were stored). Read afresh in each term.
    stored_dags: HashMap<(String, String), Option<Arc<Dag>>>,
    /// The DAG versions this term wrote to the store ahead of their first runs.
    versions_written: HashSet<(String, String)>,
    /// Runs whose view was dropped because the store has them `queued` again (a rollback lost
    /// their start): their start reads their tasks and publishes the `queued` ones again.
    restarting: HashSet<String>,
}

impl Engine {
    /// Stands by until this scheduler holds the lease, runs the loop while it does, and stands
    /// by again if the lease is lost. Commands on standby are answered with `Standby`.
    async fn supervise(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancelSignal,
    ) -> Result<(), BackendError> {
        loop {
            let mut announced = false;
            let lease = loop {
                match self
                    .base_store
                    .acquire_lease(&self.lease_name, self.config.clock.now(), self.config.lease_ttl)
                    .await
                {
                    Ok(Some(lease)) => break lease,
                    Ok(None) if !announced => {
                        tracing::info!(holder = %self.lease_name, "another scheduler is active; standing by");
                        announced = true;
                    }
                    Ok(None) => {}
                    Err(err) => tracing::error!("taking the scheduler lease: {err}"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    Some(command) = commands.recv() => command.refuse(CommandError::Standby),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            };
            tracing::info!(holder = %lease.holder, term = lease.term, "holding the scheduler lease: active");
            let lost = self.run(&lease, &mut commands, &shutdown).await?;
            self.store = self.base_store.clone();
            if !lost {
                if let Err(err) = self.base_store.release_lease(&lease).await {
                    tracing::warn!("releasing the scheduler lease: {err}");
                }
                return Ok(());
            }
            // The next term starts with recovery: the store is read again, whatever others
            // changed while this scheduler did not hold the lease.
            tracing::warn!(holder = %lease.holder, term = lease.term, "lost the scheduler lease: stepping down and standing by");
        }
    }

    /// The loop, while this scheduler holds `lease`. Answers `true` when the lease was lost,
    /// `false` on shutdown.
    ///
    /// The lease is renewed by a task of its own, every third of its time, so a long turn of
    /// the loop cannot let it lapse unnoticed. The loop ends at once when the renewal fails
    /// for two thirds of the lease time, when the term has ended (renewal extends only the term
    /// in force), or when the store refuses one of this scheduler's writes: every write carries
    /// the term as a fence, so a deposed scheduler (paused, partitioned, its clock stepped)
    /// changes nothing.
    async fn run(
        &mut self,
        lease: &dagmq_core::store::LeaseTerm,
        commands: &mut mpsc::Receiver<Command>,
        shutdown: &CancelSignal,
    ) -> Result<bool, BackendError> {
        // The consumers live as long as this term of leadership.
        let (term_stop, term) = CancelSignal::new();
        let _term = StopOnDrop(term_stop);
        let (deposed_handle, deposed) = CancelSignal::new();
        let deposed_handle = Arc::new(deposed_handle);
        let fence = dagmq_core::store::Fence {
            lease: lease.clone(),
            on_refused: deposed_handle.clone(),
            clock: self.config.clock.clone(),
        };
        self.store = self.base_store.fenced(fence).unwrap_or_else(|| self.base_store.clone());
        self.deposed = deposed.clone();
        tokio::spawn(renew_lease(
            self.base_store.clone(),
            self.config.clock.clone(),
            lease.clone(),
            self.config.lease_ttl,
            deposed_handle,
            term.clone(),
        ));
        let shutdown = shutdown.clone();
        let (events_tx, mut events) = mpsc::channel::<Incoming>(4096);
        spawn_forwarder(self.queue.clone(), Topic::Status, 1024, Incoming::Status, events_tx.clone(), term.clone());
        spawn_forwarder(self.queue.clone(), Topic::Triggers, 64, Incoming::Trigger, events_tx, term.clone());
        while let Err(err) = self.recover().await {
            if deposed.is_cancelled() {
                return Ok(true);
            }
            tracing::error!("scheduler recovery failed, retrying in 1s: {err}");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = deposed.cancelled() => return Ok(true),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::info!(dags = self.config.dags.len(), runs = self.active.len(), "scheduler started");
        loop {
            if deposed.is_cancelled() {
                return Ok(true);
            }
            let wake = self.next_wake();
            let clock = self.config.clock.clone();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = deposed.cancelled() => return Ok(true),
                Some(command) = commands.recv() => {
                    self.now_cache = self.config.clock.now();
                    self.handle_command(command).await;
                }
                Some(first) = events.recv() => {
                    self.now_cache = self.config.clock.now();
                    let mut batch = vec![first];
                    while batch.len() < 512 {
                        match events.try_recv() {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    self.handle_incoming(batch).await;
                }
                _ = clock.sleep_until(wake) => {
                    self.now_cache = self.config.clock.now();
                    let lag = (self.now_cache - wake).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                    self.metrics.loop_lag.set(&[], lag);
                    if let Err(err) = self.handle_timers().await {
                        tracing::error!("scheduler timers: {err}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            if deposed.is_cancelled() {
                return Ok(true);
            }
            if let Err(err) = self.start_dirty().await {
                tracing::error!("starting queued runs: {err}");
            }
            if let Err(err) = self.wake_waiting().await {
                // The sweep finds the waiting tasks again.
                tracing::error!("queueing tasks that waited for a limit: {err}");
            }
            self.flush().await;
        }
        tracing::info!("scheduler stopped");
        Ok(false)
    }

    /// The earliest timer, watcher pass or sweep.
    fn next_wake(&self) -> DateTime<Utc> {
        let mut wake = self.sweep_at.min(self.zombie_at);
        if let Some(Reverse((at, _, _))) = self.timers.peek() {
            wake = wake.min(*at);
        }
        if let Some(at) = self.watch_at {
            wake = wake.min(at);
        }
        wake
    }

    /// Publishes the outbox in chunks of [`PUBLISH_CHUNK`], each retried until the queue takes
    /// it or the scheduler stops. The tasks are `queued` in the store already; a scheduler that
    /// dies here republishes them on start.
    async fn flush(&mut self) {
        let mut messages = std::mem::take(&mut self.outbox).into_iter();
        loop {
            let chunk: Vec<(Topic, Vec<u8>, Headers)> = messages.by_ref().take(PUBLISH_CHUNK).collect();
            if chunk.is_empty() {
                return;
            }
            let mut delay = Duration::from_millis(100);
            loop {
                match self.queue.publish_with_headers(chunk.clone()).await {
                    Ok(()) => break,
                    Err(err) => {
                        tracing::error!("publishing {} messages failed, retrying in {delay:?}: {err}", chunk.len());
                        tokio::select! {
                            _ = self.shutdown.cancelled() => return,
                            _ = self.deposed.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    async fn handle_command(&mut self, command: Command) {
        match command {
            Command::Trigger { dag_id, params, key, reply } => {
                let _ = reply.send(self.trigger(&dag_id, params, key, RunKind::Manual).await);
            }
            Command::Restart { run_id, reply } => {
                let _ = reply.send(self.restart(&run_id).await);
            }
            Command::Cancel { run_id, reply } => {
                let _ = reply.send(self.cancel(&run_id, USER_CANCEL).await.map(|_| ()));
            }
            Command::Backfill { dag_id, from, to, params, reply } => {
                let _ = reply.send(self.backfill(&dag_id, from, to, params).await);
            }
            Command::Clear { run_id, tasks, downstream, reply } => {
                let _ = reply.send(self.clear(&run_id, &tasks, downstream).await);
            }
            Command::SetSuspended { run_id, suspended: true, reply } => {
                let _ = reply.send(self.suspend(&run_id).await);
            }
            Command::SetSuspended { run_id, suspended: false, reply } => {
                let _ = reply.send(self.resume(&run_id).await);
            }
            Command::DagsChanged => self.sync_dags(),
            Command::SetPaused { dag_id, paused, reply } => {
                let _ = reply.send(self.set_paused(&dag_id, paused).await);
            }
        }
    }

    async fn handle_incoming(&mut self, batch: Vec<Incoming>) {
        let mut settled = Vec::with_capacity(batch.len());
        let mut decoded = Vec::with_capacity(batch.len());
        for incoming in batch {
            match incoming {
                Incoming::Status(delivery) => {
                    let updates = messages::decode_status(&delivery.payload);
                    decoded.push((delivery, Some(updates)));
                }
                Incoming::Trigger(delivery) => decoded.push((delivery, None)),
            }
        }
        let mut wanted: HashMap<String, Vec<String>> = HashMap::new();
        for (_, updates) in &decoded {
            for update in updates.iter().flat_map(|u| u.iter().flatten()) {
                if self.active.contains_key(&update.run_id) {
                    let ids = wanted.entry(update.run_id.clone()).or_default();
                    ids.push(update.task_id.clone());
                    ids.extend(update.next.iter().cloned());
                }
            }
        }
        let mut fresh = self.prefetch(wanted).await;
        for (delivery, updates) in decoded {
            let settle = match updates {
                None => {
                    let mut settle = self.on_trigger_message(&delivery.payload, delivery.message_id.as_deref()).await;
                    let mut delay = Duration::from_millis(100);
                    while self.keep_trying(&settle, &mut delay).await {
                        settle = self.on_trigger_message(&delivery.payload, delivery.message_id.as_deref()).await;
                    }
                    settle
                }
                Some(Err(err)) => Settle::DeadLetter(format!("status: {err}")),
                Some(Ok(updates)) => {
                    // Every update of a message is acted on; a bad one sets the whole message
                    // aside once the others' effects are durable (they are wake-ups: acting on
                    // them again does nothing).
                    let mut outcome = Settle::Ack;
                    for update in updates {
                        let prefetched = fresh.remove(&(update.run_id.clone(), update.task_id.clone()));
                        let claimed: Vec<TaskInstance> = update
                            .next
                            .iter()
                            .filter_map(|next| fresh.remove(&(update.run_id.clone(), next.clone())))
                            .collect();
                        let mut settle = self.on_status_message(update.clone(), prefetched, claimed).await;
                        let mut delay = Duration::from_millis(100);
                        while self.keep_trying(&settle, &mut delay).await {
                            settle = self.on_status_message(update.clone(), None, Vec::new()).await;
                        }
                        match settle {
                            Settle::Ack => {}
                            Settle::DeadLetter(reason) if matches!(outcome, Settle::Ack) => {
                                outcome = Settle::DeadLetter(reason)
                            }
                            Settle::DeadLetter(_) => {}
                            Settle::Requeue => outcome = Settle::Requeue,
                        }
                    }
                    outcome
                }
            };
            settled.push((delivery, settle));
        }
        // Effects must be durable before the messages that caused them are acknowledged.
        if let Err(err) = self.start_dirty().await {
            tracing::error!("starting queued runs: {err}");
        }
        self.flush().await;
        fail_point!("scheduler::publish::before_ack");
        // Settled together: each ack waits for the connection's writer, so one at a time would
        // cost a round of thread wake-ups per delivery.
        let mut settling = Vec::with_capacity(settled.len());
        for (delivery, settle) in settled {
            match &settle {
                Settle::Ack => {}
                Settle::DeadLetter(reason) => {
                    tracing::warn!("dead-lettering a message: {reason}");
                    let queue = if reason.starts_with("trigger") { "dagmq.triggers" } else { "dagmq.status" };
                    self.metrics.dead_lettered.inc(&[queue, reason_label(reason)]);
                }
                Settle::Requeue => {}
            }
            settling.push(async move {
                match settle {
                    Settle::Ack => delivery.ack().await,
                    Settle::DeadLetter(reason) => delivery.dead_letter(&reason).await,
                    Settle::Requeue => delivery.requeue().await,
                }
            });
        }
        for result in join_all(settling).await {
            if let Err(err) = result {
                tracing::error!("settling a delivery: {err}");
            }
        }
    }

    /// Whether to act on a delivery again after `settle`: a store that does not answer must not
    /// turn a valid message into a dead letter (a requeue counts against the broker's delivery
    /// limit), so a requeue waits (`delay`, doubling up to 5 s) and tries again, until the store
    /// answers or the scheduler stops.
    async fn keep_trying(&mut self, settle: &Settle, delay: &mut Duration) -> bool {
        if !matches!(settle, Settle::Requeue) || self.shutdown.is_cancelled() || self.deposed.is_cancelled() {
            return false;
        }
        tokio::select! {
            _ = self.shutdown.cancelled() => return false,
            _ = self.deposed.cancelled() => return false,
            _ = tokio::time::sleep(*delay) => {}
        }
        *delay = (*delay * 2).min(Duration::from_secs(5));
        self.now_cache = self.config.clock.now();
        true
    }

    /// Fires due timers, the run watcher and the sweep.
    async fn handle_timers(&mut self) -> Result<(), BackendError> {
        let now = self.now_cache;
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, kind))) = self.timers.pop() else { break };
            self.fire(kind).await?;
        }
        if self.watch_at.is_some_and(|at| at <= now) {
            self.watch().await?;
        }
        if self.sweep_at <= now {
            self.sweep_at = now + chrono::Duration::from_std(self.config.sweep_interval).unwrap_or_default();
            self.sweep().await?;
        }
        if self.zombie_at <= now {
            self.zombie_at = now + chrono::Duration::from_std(self.config.zombie_check_interval).unwrap_or_default();
            let live = self.requeue_lost_workers().await?;
            self.note_unserved_pools(&live);
            self.republish_stale_queued().await?;
            self.requeue_unlisted(&live).await?;
        }
        Ok(())
    }

    async fn fire(&mut self, kind: TimerKind) -> Result<(), BackendError> {
        match kind {
            TimerKind::Retry { run_id, task_id, try_number } => {
                let Some(mut run) = self.active.remove(&run_id) else { return Ok(()) };
                let result = match run.index.get(&task_id).copied() {
                    Some(i) if run.tasks[i].state == TaskState::UpForRetry && run.tasks[i].try_number == try_number => {
                        self.queue_task(&mut run, i).await
                    }
                    _ => Ok(()),
                };
                self.put_back(run).await?;
                result
            }
            TimerKind::RunTimeout { run_id } => {
                let Some(mut run) = self.active.remove(&run_id) else { return Ok(()) };
                let timeout = run.dag.run_timeout.unwrap_or_default();
                let reason = format!("run timed out after {}", dagmq_core::duration::format_duration(timeout));
                tracing::warn!(run = %run_id, "{reason}");
                let result = self.cancel_tasks(&run_id, &reason).await;
                if let Ok(tasks) = self.store.tasks(&run_id).await {
                    run.tasks = tasks;
                    run.rebuild();
                    run.tasks_in_doubt = false;
                }
                self.put_back(run).await?;
                result
            }
        }
    }

    fn add_timer(&mut self, at: DateTime<Utc>, kind: TimerKind) {
        self.timer_seq += 1;
        self.timers.push(Reverse((at, self.timer_seq, kind)));
    }
}

/// Forwards one topic's deliveries into the loop.
fn spawn_forwarder(
    queue: Arc<dyn Queue>,
    topic: Topic,
    prefetch: u16,
    wrap: fn(Delivery) -> Incoming,
    events: mpsc::Sender<Incoming>,
    shutdown: CancelSignal,
) {
    tokio::spawn(async move {
        let mut subscription = Subscription::topic(queue, topic, prefetch);
        while let Some(delivery) = subscription.next(&shutdown).await {
            if events.send(wrap(delivery)).await.is_err() {
                return;
            }
        }
    });
}
