//! The scheduler's event loop. One task owns all scheduling state and handles a closed set of
//! events one at a time: status updates and triggers from the queue, commands from the API,
//! and timers (schedule points, retry delays, run timeouts, the reconciliation sweep).
//!
//! The store is the source of truth; the loop's [`ActiveRun`] views are caches of it. Every
//! write is a compare-and-set, so every action here is idempotent: a duplicate status message,
//! a redelivered trigger or a restart of the scheduler repeats nothing that already happened.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use dagmq_core::fail_point;
use dagmq_core::messages::{self, Control, StatusUpdate, TaskToExec, Trigger, VERSION};
use dagmq_core::queue::join_all;
use dagmq_core::records::DagRecord;
use dagmq_core::state::{TaskEvent, run_outcome, task_transition};
use dagmq_core::store::{CreateRun, TaskChange};
use dagmq_core::trigger::Decision;
use dagmq_core::{
    BackendError, CancelSignal, Dag, DagRegistry, Delivery, LiveDags, Params, Queue, RunKind, RunRecord, RunState,
    Store, Subscription, TaskConfig, TaskInstance, TaskState, Topic, WorkerInfo,
};
use tokio::sync::mpsc;

use crate::active_run::ActiveRun;
use crate::commands::{BackfillOutcome, Command, CommandError, MAX_BACKFILL_POINTS, SchedulerHandle, TriggerOutcome};
use crate::ids::{manual_run_id, scheduled_run_id};
use crate::limits::{LimitKey, Limits, claim_of};
use crate::metrics::{SchedulerMetrics, reason_label};
use crate::notifier::{Notification, NotificationKind, Notifier};
use dagmq_core::Clock;

/// What the scheduler needs besides its queue and store.
pub struct SchedulerConfig {
    /// The DAGs to schedule.
    pub dags: Arc<DagRegistry>,
    /// Default parameters per DAG (a DAG file's `[params]`).
    pub default_params: HashMap<String, Params>,
    /// Where failure and retry notifications go.
    pub notifier: Arc<dyn Notifier>,
    /// Source of `now`.
    pub clock: Arc<dyn Clock>,
    /// How often running runs are reconciled with the store, the safety net for status
    /// messages lost between a worker's store write and its publish.
    pub sweep_interval: Duration,
    /// Most scheduled runs one DAG gets per watcher pass (the next pass follows at once).
    pub catch_up_batch: usize,
    /// A worker whose last heartbeat is older than this is lost: its running tries are
    /// requeued as new tries and it leaves the registry.
    pub worker_timeout: Duration,
    /// How often lost workers are looked for.
    pub zombie_check_interval: Duration,
    /// DAG files that were refused, as (file, `file:line: reason`), listed by `/api/v1/dags`.
    pub refused_dags: Vec<(String, String)>,
    /// The scheduler lease lasts this long unless renewed (every third of it); a standby
    /// scheduler takes over at most this long after the active one dies.
    pub lease_ttl: Duration,
    /// A task `queued` this long without being claimed may have lost its message (a publish
    /// that failed after the compare-and-set, a message dead-lettered by the broker): it is
    /// read again and, still `queued`, published again (duplicates are harmless: a worker's
    /// claim is a compare-and-set). Checked with the lost workers.
    pub republish_after: Duration,
    /// A try `running` under a live worker whose heartbeats have not listed it for this long
    /// is not being run (its claim applied but the worker took it for failed): it is requeued
    /// as a new try.
    pub unlisted_grace: Duration,
    /// Named pools and their slots (`[pools]`, `--pool NAME=SLOTS`).
    pub pools: dagmq_core::Pools,
    /// The DAGs as a live set that a reload replaces (see [`SchedulerHandle::dags_changed`]);
    /// when absent, `dags`, `default_params` and `refused_dags` are the set for good.
    pub live: Option<Arc<LiveDags>>,
}

impl SchedulerConfig {
    /// A configuration with defaults: log notifications, 30 s sweep, batches of 100.
    pub fn new(dags: DagRegistry, clock: Arc<dyn Clock>) -> SchedulerConfig {
        SchedulerConfig {
            dags: Arc::new(dags),
            default_params: HashMap::new(),
            notifier: Arc::new(crate::notifier::LogNotifier),
            clock,
            sweep_interval: Duration::from_secs(30),
            catch_up_batch: 100,
            worker_timeout: Duration::from_secs(20),
            zombie_check_interval: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(10),
            refused_dags: Vec::new(),
            republish_after: Duration::from_secs(20),
            unlisted_grace: Duration::from_secs(10),
            pools: dagmq_core::Pools::new(),
            live: None,
        }
    }
}

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
    let live = config.live.clone().unwrap_or_else(|| {
        Arc::new(LiveDags::new((*config.dags).clone(), config.refused_dags.clone(), config.default_params.clone()))
    });
    let handle = SchedulerHandle {
        live: live.clone(),
        waiting_for: limits.waiting_for.clone(),
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
        republished: HashMap::new(),
        unlisted: HashMap::new(),
        lease_name: format!("scheduler-{}", uuid::Uuid::new_v4().simple()),
        term: 1,
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

/// Longest wait between two republishes of one queued try, and how long a queued try waits
/// before it is republished while its pool's queue still holds messages.
const REPUBLISH_MAX_WAIT: Duration = Duration::from_secs(600);

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
    /// refused once another scheduler holds it (see [`dagmq_core::store::Fence`]).
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
    outbox: Vec<(Topic, Vec<u8>)>,
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
    /// Queued tries published again by the reconciliation: when last, and the wait before the
    /// next time.
    republished: HashMap<TryKey, (DateTime<Utc>, Duration)>,
    /// Running tries a live worker's heartbeat did not list: when first seen so, and that
    /// heartbeat's stamp (a later heartbeat must miss it too).
    unlisted: HashMap<TryKey, (DateTime<Utc>, DateTime<Utc>)>,
    /// This scheduler's name; the lease holder is this name and the term.
    lease_name: String,
    /// The term of leadership this scheduler is in or is trying for: a new one after every
    /// loss of the lease, so writes of an earlier term are refused by the fence.
    term: u64,
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
            loop {
                match self
                    .base_store
                    .acquire_lease(&self.holder(), self.config.clock.now(), self.config.lease_ttl)
                    .await
                {
                    Ok(true) => break,
                    Ok(false) if !announced => {
                        tracing::info!(holder = %self.holder(), "another scheduler is active; standing by");
                        announced = true;
                    }
                    Ok(false) => {}
                    Err(err) => tracing::error!("taking the scheduler lease: {err}"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    Some(command) = commands.recv() => command.refuse(CommandError::Standby),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            tracing::info!(holder = %self.holder(), "holding the scheduler lease: active");
            let lost = self.run(&mut commands, &shutdown).await?;
            self.store = self.base_store.clone();
            if !lost {
                if let Err(err) = self.base_store.release_lease(&self.holder()).await {
                    tracing::warn!("releasing the scheduler lease: {err}");
                }
                return Ok(());
            }
            tracing::warn!(holder = %self.holder(), "lost the scheduler lease: stepping down and standing by");
            self.term += 1;
        }
    }

    /// The lease holder of this scheduler's current term.
    fn holder(&self) -> String {
        format!("{}-{}", self.lease_name, self.term)
    }

    /// The loop, while this scheduler holds the lease. Answers `true` when the lease was lost,
    /// `false` on shutdown.
    ///
    /// The lease is renewed by a task of its own, every third of its time, so a long turn of
    /// the loop cannot let it lapse unnoticed. The loop ends at once when the renewal fails
    /// for two thirds of the lease time, when another scheduler holds it, or when the store
    /// refuses one of this scheduler's writes: every write carries the term's holder as a
    /// fence, so a deposed scheduler (paused, partitioned, its clock stepped) changes nothing.
    async fn run(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        shutdown: &CancelSignal,
    ) -> Result<bool, BackendError> {
        // The consumers live as long as this term of leadership.
        let (term_stop, term) = CancelSignal::new();
        let _term = StopOnDrop(term_stop);
        let (deposed_handle, deposed) = CancelSignal::new();
        let deposed_handle = Arc::new(deposed_handle);
        let fence = dagmq_core::store::Fence { holder: self.holder(), on_refused: deposed_handle.clone() };
        self.store = self.base_store.fenced(fence).unwrap_or_else(|| self.base_store.clone());
        self.deposed = deposed.clone();
        tokio::spawn(renew_lease(
            self.base_store.clone(),
            self.config.clock.clone(),
            self.holder(),
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
            let chunk: Vec<(Topic, Vec<u8>)> = messages.by_ref().take(PUBLISH_CHUNK).collect();
            if chunk.is_empty() {
                return;
            }
            let mut delay = Duration::from_millis(100);
            loop {
                match self.queue.publish_many(chunk.clone()).await {
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

    /// Loads the DAG bookkeeping and every unfinished run; republishes queued tasks, whose
    /// messages may never have reached the queue.
    async fn recover(&mut self) -> Result<(), BackendError> {
        self.sync_dags();
        self.active.clear();
        self.limits.clear_waiting();
        self.queued.clear();
        self.running.clear();
        self.timers.clear();
        // Another scheduler may have held the lease meanwhile: re-read its bookkeeping.
        self.dag_records.clear();
        self.now_cache = self.config.clock.now();
        let dags: Vec<Arc<Dag>> = self.config.dags.iter().cloned().collect();
        for dag in &dags {
            self.dag_record(dag).await?;
        }
        for record in self.store.unfinished_runs().await? {
            if self.dag_of(&record).is_none() {
                tracing::warn!(run = %record.run_id, dag = %record.dag_id, "run of an unknown dag left as it is");
                continue;
            }
            match record.state {
                RunState::Queued => self.queued.entry(record.dag_id.clone()).or_default().push_back(record.run_id),
                _ => self.activate(record, true).await?,
            }
        }
        self.dirty.extend(dags.iter().map(|d| d.id.clone()));
        self.watch_at = Some(self.now_cache);
        Ok(())
    }

    /// The cached bookkeeping of a DAG, created on first sight.
    async fn dag_record(&mut self, dag: &Dag) -> Result<DagRecord, BackendError> {
        if let Some(record) = self.dag_records.get(&dag.id) {
            return Ok(record.clone());
        }
        let record = match self.store.dag_record(&dag.id).await? {
            Some(record) => record,
            None => {
                // Whole seconds, so that `@every` points of a DAG without a start fall on them.
                let first_seen = self.now_cache.with_nanosecond(0).unwrap_or(self.now_cache);
                let record = DagRecord { dag_id: dag.id.clone(), paused: dag.paused, first_seen, last_scheduled: None };
                self.store.put_dag_record(&record).await?;
                record
            }
        };
        self.dag_records.insert(dag.id.clone(), record.clone());
        Ok(record)
    }

    async fn handle_command(&mut self, command: Command) {
        match command {
            Command::Trigger { dag_id, params, key, reply } => {
                let _ = reply.send(self.trigger(&dag_id, params, key).await);
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

    /// Creates the run a trigger message asks for. A trigger without a `key` is deduplicated by
    /// the producer's AMQP `message_id` when it set one (the id becomes the run's key); without
    /// either, a redelivery after a crash between creating the run and acknowledging the
    /// message creates a second run.
    async fn on_trigger_message(&mut self, payload: &[u8], message_id: Option<&str>) -> Settle {
        let trigger: Trigger = match messages::decode(payload) {
            Ok(trigger) => trigger,
            Err(err) => return Settle::DeadLetter(format!("trigger: {err}")),
        };
        let key = trigger.key.or_else(|| message_id.filter(|id| id.len() <= 200).map(str::to_string));
        match self.trigger(&trigger.dag_id, trigger.params, key).await {
            Ok(outcome) => {
                tracing::debug!(dag = %trigger.dag_id, run = %outcome.run_id, created = outcome.created, "trigger from queue");
                Settle::Ack
            }
            Err(CommandError::Backend(err)) => {
                tracing::error!("trigger: {err}");
                Settle::Requeue
            }
            Err(err) => Settle::DeadLetter(format!("trigger: {err}")),
        }
    }

    /// Reads, in one call per run, the store's instances of the tasks (by run) that a batch of
    /// status updates is about. A failed read is no error: each update then reads its task alone.
    async fn prefetch(&self, wanted: HashMap<String, Vec<String>>) -> HashMap<(String, String), TaskInstance> {
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

    async fn on_status_message(
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
    async fn on_task_changed(
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

    /// Skips the direct downstream tasks that branch task `i`, a success, did not choose.
    async fn skip_not_chosen(&mut self, run: &mut ActiveRun, i: usize) -> Result<(), BackendError> {
        let skipped = run.not_chosen(i);
        if skipped.is_empty() {
            return Ok(());
        }
        let changes = skipped.iter().map(|&d| (d, TaskState::Skipped, None)).collect();
        let applied = self.end_pending(run, changes).await?;
        self.advance(run, applied.into_iter().flat_map(|d| run.downstream[d].clone()).collect()).await
    }

    /// Decides the pending tasks among `candidates` by their trigger rules: queues those that
    /// run, ends those that are skipped or upstream_failed, and goes on with the downstream
    /// tasks of each ended one until nothing more is decided.
    async fn advance(&mut self, run: &mut ActiveRun, candidates: Vec<usize>) -> Result<(), BackendError> {
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
    async fn expand(&mut self, run: &mut ActiveRun, i: usize) -> Result<(), BackendError> {
        match run.expansion(i) {
            Ok(None) => Ok(()),
            Ok(Some((new_tasks, rewired))) => {
                self.store.add_tasks(run.id(), &new_tasks, &rewired).await?;
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
    async fn queue_task(&mut self, run: &mut ActiveRun, i: usize) -> Result<(), BackendError> {
        self.queue_tasks(run, vec![i]).await
    }

    /// Queues a new try of each of `indices`, with one batch of compare-and-sets in the store
    /// per [`QUEUE_CHUNK`] tasks; each that applies gets a message in the outbox, each refused
    /// is read again. A large outbox is published as it grows, so workers start early and the
    /// scheduler never holds every message of a wide DAG at once.
    async fn queue_tasks(&mut self, run: &mut ActiveRun, indices: Vec<usize>) -> Result<(), BackendError> {
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
            let applied = self.store.transition_tasks(run.id(), &changes).await?;
            fail_point!("scheduler::queue::after_cas");
            for ((i, change), applied) in queued.into_iter().zip(changes).zip(applied) {
                if applied {
                    self.outbox.push((Topic::Tasks(change.task.queue.clone()), task_message(run, &change.task)));
                    run.replace(i, change.task);
                } else {
                    self.refresh_refused(run, i).await?;
                }
            }
            // The usage counts the tasks that are queued now; the others took nothing.
            reserved.clear();
            if self.outbox.len() >= OUTBOX_HIGH_WATER {
                self.flush().await;
            }
        }
        Ok(())
    }

    /// Queues tasks waiting behind limits that had room given back, oldest first, until a
    /// limit is full again. A task found blocked behind another limit moves to its queue.
    async fn wake_waiting(&mut self) -> Result<(), BackendError> {
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
                    Some(i) if run.decision(i) == Decision::Run => self.queue_tasks(&mut run, vec![i]).await,
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

    /// Re-reads task `i` after a refused compare-and-set to queue it, and takes what it finds
    /// into the view with `take_moved_on`.
    async fn refresh_refused(&mut self, run: &mut ActiveRun, i: usize) -> Result<(), BackendError> {
        if let Some(fresh) = self.store.task(run.id(), &run.tasks[i].task_id).await? {
            take_moved_on(run, i, fresh);
        }
        Ok(())
    }

    /// Re-reads task `i` after a refused compare-and-set.
    async fn refresh_task(&mut self, run: &mut ActiveRun, i: usize) -> Result<(), BackendError> {
        if let Some(fresh) = self.store.task(run.id(), &run.tasks[i].task_id).await? {
            run.replace(i, fresh);
        }
        Ok(())
    }

    /// Sets the retry time of a task that is `up_for_retry` and starts its timer.
    async fn schedule_retry(&mut self, run: &mut ActiveRun, i: usize, notify: bool) -> Result<(), BackendError> {
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
        let kind =
            TimerKind::Retry { run_id: run.id().to_string(), task_id: new.task_id.clone(), try_number: new.try_number };
        run.replace(i, new);
        self.add_timer(at, kind);
        if notify && task_config(run, i).alert_on_retry {
            self.notify(run, i, NotificationKind::Retry);
        }
        Ok(())
    }

    /// Brings a run's whole view in line with its tasks' states: follow-ups added, failures
    /// propagated, retries timed, ready tasks queued, and (when recovering) queued tasks
    /// published again.
    async fn settle(&mut self, run: &mut ActiveRun, republish_queued: bool) -> Result<(), BackendError> {
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
                    self.outbox.push((Topic::Tasks(task.queue.clone()), message));
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

    /// Starts a queued run (or takes over a running one on recovery) and loads its view.
    async fn activate(&mut self, mut record: RunRecord, recovering: bool) -> Result<(), BackendError> {
        let Some(dag) = self.dag_of(&record) else { return Ok(()) };
        if record.state == RunState::Queued {
            let mut started = record.clone();
            started.state = RunState::Running;
            started.started_at = Some(self.now_cache);
            if !self.store.transition_run(RunState::Queued, &started).await? {
                return Ok(());
            }
            record = started;
            tracing::info!(dag = %record.dag_id, run = %record.run_id, "run started");
        }
        if let (Some(timeout), Some(started_at)) = (dag.run_timeout, record.started_at) {
            let at = started_at + chrono::Duration::from_std(timeout).unwrap_or_default();
            self.add_timer(at, TimerKind::RunTimeout { run_id: record.run_id.clone() });
        }
        let tasks = match self.created.remove(&record.run_id) {
            Some((_, tasks)) if !recovering => tasks,
            _ => self.store.tasks(&record.run_id).await?,
        };
        *self.running.entry(record.dag_id.clone()).or_default() += 1;
        let mut run = ActiveRun::new(record, dag, tasks, self.metrics.view.clone(), self.limits.usage.clone());
        let result = self.settle(&mut run, recovering).await;
        self.put_back(run).await?;
        result
    }

    /// The definition a run completes with: the version it was created with when this
    /// scheduler has loaded it (the current file, or an earlier version it saw before a
    /// reload), else the current one. After a restart, a run of a version that is no longer on
    /// disk completes with its recorded graph (task instances carry their upstreams) and the
    /// current file's task settings.
    fn dag_of(&self, record: &RunRecord) -> Option<Arc<Dag>> {
        let current = self.config.dags.get(&record.dag_id).cloned();
        match &record.dag_version {
            Some(version) if current.as_ref().is_none_or(|dag| &dag.version != version) => {
                self.live.version(&record.dag_id, version).or(current)
            }
            _ => current,
        }
    }

    /// Takes the DAGs of the latest reload: new runs use them, runs in flight keep theirs, the
    /// watcher looks at the schedules again.
    fn sync_dags(&mut self) {
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
    async fn put_back(&mut self, mut run: ActiveRun) -> Result<(), BackendError> {
        while !run.deferred.is_empty() {
            let (i, fresh) = run.deferred.remove(0);
            if fresh.try_number < run.tasks[i].try_number {
                continue;
            }
            if let Err(err) = self.on_task_changed(&mut run, i, fresh, true).await {
                // The rest stay deferred; the sweep reads the whole run again anyway.
                self.active.insert(run.id().to_string(), run);
                return Err(err);
            }
        }
        if !run.all_final() {
            self.active.insert(run.id().to_string(), run);
            return Ok(());
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
        self.limits.forget_run(&finished.run_id);
        tracing::info!(dag = %dag_id, run = %finished.run_id, state = %outcome, "run finished");
        self.metrics.runs_finished.inc(&[dag_id.as_str(), outcome.as_str()]);
        if let Some(count) = self.running.get_mut(&dag_id) {
            *count = count.saturating_sub(1);
        }
        self.dirty.insert(dag_id);
        Ok(())
    }

    /// Starts queued runs of every DAG that may have a free slot.
    async fn start_dirty(&mut self) -> Result<(), BackendError> {
        let started = self.start_dirty_runs().await;
        self.created.clear();
        started
    }

    /// The work of `start_dirty`.
    async fn start_dirty_runs(&mut self) -> Result<(), BackendError> {
        while let Some(dag_id) = self.dirty.pop_first() {
            // A DAG a reload removed still starts the runs it queued, with the definition they
            // were created with (each run's own version, in `activate`).
            let known = self.config.dags.get(&dag_id).cloned().or_else(|| {
                self.live.versions_of(&dag_id).first().and_then(|version| self.live.version(&dag_id, version))
            });
            let Some(dag) = known else { continue };
            loop {
                let running = self.running.get(&dag_id).copied().unwrap_or(0);
                if running >= dag.max_active_runs {
                    break;
                }
                let Some(run_id) = self.queued.get_mut(&dag_id).and_then(VecDeque::pop_front) else { break };
                let record = match self.created.get(&run_id) {
                    Some((record, _)) => record.clone(),
                    None => match self.store.run(&run_id).await? {
                        Some(record) => record,
                        None => continue,
                    },
                };
                if record.state == RunState::Queued {
                    self.activate(record, false).await?;
                }
            }
        }
        Ok(())
    }

    /// Creates a run in `queued`; it starts when its DAG has a free slot.
    async fn create_run(
        &mut self,
        dag: &Dag,
        kind: RunKind,
        logical_date: DateTime<Utc>,
        params: Params,
        key: Option<String>,
    ) -> Result<TriggerOutcome, BackendError> {
        let run_id = match kind {
            // A backfilled point gets the id its scheduled run has, so a point never gets two.
            RunKind::Scheduled | RunKind::Backfill => scheduled_run_id(&dag.id, logical_date),
            RunKind::Manual => manual_run_id(&dag.id, logical_date),
        };
        let record = RunRecord {
            run_id: run_id.clone(),
            dag_id: dag.id.clone(),
            state: RunState::Queued,
            kind,
            logical_date,
            params,
            key,
            created_at: self.now_cache,
            started_at: None,
            ended_at: None,
            dag_version: Some(dag.version.clone()),
        };
        let tasks: Vec<TaskInstance> = dag
            .tasks()
            .iter()
            .map(|t| TaskInstance::pending(t.id.clone(), t.after.clone(), t.config.queue.clone(), t.config.retries))
            .collect();
        fail_point!("scheduler::create_run::before");
        let created = self.store.create_run(&record, &tasks).await?;
        fail_point!("scheduler::create_run::after");
        match created {
            CreateRun::Created => {
                tracing::info!(dag = %dag.id, run = %run_id, "run created");
                self.created.insert(run_id.clone(), (record, tasks));
                self.queued.entry(dag.id.clone()).or_default().push_back(run_id.clone());
                self.dirty.insert(dag.id.clone());
                Ok(TriggerOutcome { run_id, created: true })
            }
            CreateRun::Exists(existing) => Ok(TriggerOutcome { run_id: existing, created: false }),
        }
    }

    async fn trigger(
        &mut self,
        dag_id: &str,
        params: Params,
        key: Option<String>,
    ) -> Result<TriggerOutcome, CommandError> {
        let Some(dag) = self.config.dags.get(dag_id).cloned() else {
            return Err(CommandError::NotFound(format!("unknown dag {dag_id:?}")));
        };
        if let Some(key) = &key
            && (key.is_empty() || key.len() > 200)
        {
            return Err(CommandError::BadInput("key must be 1 to 200 characters".to_string()));
        }
        let mut merged = self.config.default_params.get(dag_id).cloned().unwrap_or_default();
        merged.extend(params);
        self.create_run(&dag, RunKind::Manual, self.now_cache, merged, key)
            .await
            .map_err(|e| CommandError::Backend(e.to_string()))
    }

    /// Creates the runs of a backfill, oldest first; existing points are counted, not touched.
    async fn backfill(
        &mut self,
        dag_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        params: Params,
    ) -> Result<BackfillOutcome, CommandError> {
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let Some(dag) = self.config.dags.get(dag_id).cloned() else {
            return Err(CommandError::NotFound(format!("unknown dag {dag_id:?}")));
        };
        if matches!(dag.schedule, dagmq_core::schedule::Schedule::Manual) {
            return Err(CommandError::BadInput(format!(
                "dag {dag_id:?} has no schedule, so it has no schedule points to backfill; trigger it instead"
            )));
        }
        if from > to {
            return Err(CommandError::BadInput(format!("backfill range is reversed: from {from} is after to {to}")));
        }
        let record = self.dag_record(&dag).await.map_err(backend)?;
        let anchor = dag.start.unwrap_or(record.first_seen);
        let points = dag.schedule.points_between(anchor, from, to, MAX_BACKFILL_POINTS + 1);
        if points.len() > MAX_BACKFILL_POINTS {
            return Err(CommandError::BadInput(format!(
                "backfill from {from} to {to} covers more than {MAX_BACKFILL_POINTS} schedule points of dag \
                 {dag_id:?}; split the range"
            )));
        }
        let mut merged = self.config.default_params.get(dag_id).cloned().unwrap_or_default();
        merged.extend(params);
        let mut outcome = BackfillOutcome { runs: Vec::with_capacity(points.len()), created: 0, existing: 0 };
        for point in points {
            let created =
                self.create_run(&dag, RunKind::Backfill, point, merged.clone(), None).await.map_err(backend)?;
            if created.created {
                outcome.created += 1;
            } else {
                outcome.existing += 1;
            }
            outcome.runs.push(created.run_id);
        }
        tracing::info!(dag = %dag_id, created = outcome.created, existing = outcome.existing, "backfill from {from} to {to}");
        Ok(outcome)
    }

    /// Runs tasks of a run again: the named ones, with `downstream` all their descendants, and
    /// in any case the descendants that ended without running (skipped, upstream_failed), whose
    /// rules decide again. Each gets a fresh retry budget; the run is `running` again.
    async fn clear(&mut self, run_id: &str, named: &[String], downstream: bool) -> Result<Vec<String>, CommandError> {
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
        if self.dag_of(&record).is_none() {
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
        if let Some(dag) = self.dag_of(&record) {
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
            let result = async {
                let applied = self.store.transition_tasks(run_id, &changes).await?;
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
            let mut restarted = record.clone();
            restarted.state = RunState::Running;
            restarted.ended_at = None;
            if !self.store.transition_run_with_tasks(record.state, &restarted, &changes).await.map_err(backend)? {
                return Err(CommandError::Conflict(format!("run {run_id:?} changed state meanwhile; try again")));
            }
            self.activate(restarted, false).await.map_err(backend)?;
        }
        tracing::info!(run = %run_id, tasks = ?cleared, "tasks cleared");
        Ok(cleared)
    }

    async fn restart(&mut self, run_id: &str) -> Result<(), CommandError> {
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
        if self.dag_of(&record).is_none() {
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
        let mut restarted = record.clone();
        restarted.state = RunState::Running;
        restarted.started_at = Some(self.now_cache);
        restarted.ended_at = None;
        // The run and its reset tasks change in one step: a crash cannot leave one without the
        // other.
        if !self.store.transition_run_with_tasks(record.state, &restarted, &changes).await.map_err(backend)? {
            return Err(CommandError::Conflict(format!("run {run_id:?} changed state meanwhile; try again")));
        }
        fail_point!("scheduler::restart::after");
        tracing::info!(run = %run_id, "run restarted");
        self.activate(restarted, false).await.map_err(backend)
    }

    /// Cancels a queued or running run: unfinished tasks become `cancelled` and workers are
    /// told to stop the ones running. Answers whether anything was cancelled.
    async fn cancel(&mut self, run_id: &str, reason: &str) -> Result<bool, CommandError> {
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
        if !self.store.transition_run(record.state, &cancelled).await.map_err(backend)? {
            return Err(CommandError::Conflict(format!("run {run_id:?} changed state meanwhile; try again")));
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
        tracing::info!(run = %run_id, "run cancelled: {reason}");
        Ok(true)
    }

    /// Moves every unfinished task of a run to `cancelled` and broadcasts the stop.
    async fn cancel_tasks(&mut self, run_id: &str, reason: &str) -> Result<(), BackendError> {
        let dag_id = self.store.run(run_id).await?.map(|r| r.dag_id).unwrap_or_default();
        for mut task in self.store.tasks(run_id).await? {
            // A worker may claim a queued try meanwhile: read it again until the cancel
            // applies, so no try runs on inside a cancelled run.
            while let Ok(state) = task_transition(task.state, TaskEvent::Cancel) {
                let mut new = task.clone();
                new.state = state;
                new.ended_at = Some(self.now_cache);
                new.error = Some(reason.to_string());
                if self.store.transition_task(run_id, task.state, task.try_number, &new).await? {
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
        // The broadcast only hastens the stop: workers check their tries against the store at
        // every heartbeat, so a lost broadcast delays the stop by one heartbeat interval.
        let control = Control::CancelRun { v: VERSION, run_id: run_id.to_string() };
        if let Err(err) = self.queue.broadcast(messages::encode(&control)).await {
            tracing::warn!(run = %run_id, "broadcasting the cancel: {err}; workers learn it from the store");
        }
        Ok(())
    }

    /// Suspends a running run: the run first (so nothing new is queued), then its queued and
    /// running tasks, then the broadcast that stops the tries. A crash in between leaves a
    /// suspended run whose view `settle` finishes suspending on recovery.
    async fn suspend(&mut self, run_id: &str) -> Result<(), CommandError> {
        let suspended = self.move_run(run_id, RunState::Running, RunState::Suspended, "suspended").await?;
        fail_point!("scheduler::suspend::after_run");
        tracing::info!(run = %run_id, "run suspended");
        let Some(mut run) = self.active.remove(run_id) else { return Ok(()) };
        run.record = suspended;
        let result = self.suspend_tasks(&mut run).await;
        self.put_back(run).await.map_err(|e| CommandError::Backend(e.to_string()))?;
        result.map_err(|e| CommandError::Backend(e.to_string()))
    }

    /// Moves a run from `from` to `to` with a compare-and-set and answers its new record: a
    /// 404 for an unknown run, a 409 for one in another state (`verb`: what only a run in
    /// `from` can be) or that changed meanwhile.
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
        if record.state != from {
            return Err(CommandError::Conflict(format!(
                "run {run_id:?} is {}; only a {from} run can be {verb}",
                record.state
            )));
        }
        let mut moved = record;
        moved.state = to;
        if !self.store.transition_run(from, &moved).await.map_err(backend)? {
            return Err(CommandError::Conflict(format!("run {run_id:?} changed state meanwhile; try again")));
        }
        Ok(moved)
    }

    /// Moves the queued and running tasks of a suspended run to `suspended` (reading a task
    /// again when a worker claimed it meanwhile) and tells workers to stop the run's tries.
    async fn suspend_tasks(&mut self, run: &mut ActiveRun) -> Result<(), BackendError> {
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
        let mut stopped = 0;
        for i in 0..run.tasks.len() {
            while let Ok(state) = task_transition(run.tasks[i].state, TaskEvent::Suspend) {
                let old = &run.tasks[i];
                let mut new = old.clone();
                new.state = state;
                new.ended_at = Some(self.now_cache);
                new.error = Some(format!("try {} stopped: the run was suspended", old.try_number));
                new.progress = None;
                if self.store.transition_task(run.id(), old.state, old.try_number, &new).await? {
                    run.replace(i, new);
                    stopped += 1;
                    break;
                }
                match self.store.task(run.id(), &run.tasks[i].task_id).await? {
                    Some(fresh) => drop(run.replace(i, fresh)),
                    None => break,
                }
            }
        }
        if stopped > 0 {
            // As for a cancel, the broadcast only hastens the stop: workers stop a try the store
            // no longer has running under them at their next heartbeat.
            let control = Control::CancelRun { v: VERSION, run_id: run.id().to_string() };
            if let Err(err) = self.queue.broadcast(messages::encode(&control)).await {
                tracing::warn!(run = %run.id(), "broadcasting the suspension: {err}; workers learn it from the store");
            }
        }
        Ok(())
    }

    /// Resumes a suspended run: the run goes back to `running`, its suspended tasks get new
    /// tries (try numbers go on; the stopped try does not count against retries) and ready tasks
    /// are queued.
    async fn resume(&mut self, run_id: &str) -> Result<(), CommandError> {
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let running = self.move_run(run_id, RunState::Suspended, RunState::Running, "resumed").await?;
        fail_point!("scheduler::resume::after_run");
        tracing::info!(run = %run_id, "run resumed");
        let Some(mut run) = self.active.remove(run_id) else { return Ok(()) };
        run.record = running;
        let result = self.settle(&mut run, false).await;
        self.put_back(run).await.map_err(backend)?;
        result.map_err(backend)
    }

    async fn set_paused(&mut self, dag_id: &str, paused: bool) -> Result<(), CommandError> {
        let Some(dag) = self.config.dags.get(dag_id).cloned() else {
            return Err(CommandError::NotFound(format!("unknown dag {dag_id:?}")));
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
            self.republish_stale_queued().await?;
            self.requeue_unlisted(&live).await?;
        }
        Ok(())
    }

    /// Finds lost worker instances and requeues the tries they were running as new tries. An
    /// instance is lost when its heartbeat is older than `worker_timeout` (the entry then leaves
    /// the registry), or when a worker of the same name started again (a new instance). Tries
    /// are found through the lost instance's last heartbeat and, for tries claimed after it,
    /// through the running runs' tasks.
    /// Answers the live workers by name.
    async fn requeue_lost_workers(&mut self) -> Result<HashMap<String, WorkerInfo>, BackendError> {
        let now = self.now_cache;
        let timeout = chrono::Duration::from_std(self.config.worker_timeout).unwrap_or_default();
        // (worker name, the live instance to keep or none, the lost heartbeat entry if any)
        let mut lost: Vec<(String, Option<String>, Option<WorkerInfo>)> = Vec::new();
        let mut live = HashMap::new();
        let workers = self.store.workers().await?;
        // Heartbeats are judged by the store's clock when it has one (Redis stamps each
        // heartbeat with its own time), so a worker whose clock is behind is not taken for lost.
        let store_now = self.store.now().await?.unwrap_or(now);
        for worker in workers {
            if store_now - worker.last_heartbeat > timeout {
                tracing::warn!(worker = %worker.name, last_heartbeat = %worker.last_heartbeat, "worker lost: requeueing its tries");
                self.known_instances.remove(&worker.name);
                lost.push((worker.name.clone(), None, Some(worker)));
            } else {
                if self.known_instances.get(&worker.name) != Some(&worker.instance) {
                    // A worker seen for the first time, or restarted: tries of other instances
                    // of the same name belong to processes that are gone.
                    self.known_instances.insert(worker.name.clone(), worker.instance.clone());
                    lost.push((worker.name.clone(), Some(worker.instance.clone()), None));
                }
                live.insert(worker.name.clone(), worker);
            }
        }
        for (name, keep, entry) in lost {
            let mut candidates: Vec<(String, String)> = entry
                .as_ref()
                .map(|w| w.running.iter().map(|t| (t.run_id.clone(), t.task_id.clone())).collect())
                .unwrap_or_default();
            for run in self.active.values() {
                for task in &run.tasks {
                    if matches!(task.state, TaskState::Queued | TaskState::Running) {
                        candidates.push((run.id().to_string(), task.task_id.clone()));
                    }
                }
            }
            candidates.sort();
            candidates.dedup();
            for (run_id, task_id) in candidates {
                let Some(task) = self.store.task(&run_id, &task_id).await? else { continue };
                if task.state != TaskState::Running
                    || task.worker.as_deref() != Some(name.as_str())
                    || (keep.is_some() && task.worker_instance == keep)
                {
                    continue;
                }
                let reason = format!("try {} interrupted: worker {name} lost", task.try_number);
                self.requeue_interrupted(&run_id, &task, reason, "worker_lost").await?;
            }
            if entry.is_some() {
                self.store.remove_worker(&name).await?;
            }
        }
        Ok(live)
    }

    /// Reads again the tasks this scheduler's view holds as `queued` for longer than
    /// `republish_after`, and publishes again the ones still waiting: their message may be gone
    /// (a publish that failed after the compare-and-set, a message dead-lettered after too many
    /// deliveries). While the pool's queue holds messages the try may simply be waiting its
    /// turn, so it is republished only after [`REPUBLISH_MAX_WAIT`]; each further republish of
    /// one try waits twice as long as the one before, up to that bound. Tasks that moved on
    /// (claimed, or finished with the status update lost) update the view.
    async fn republish_stale_queued(&mut self) -> Result<(), BackendError> {
        let now = self.now_cache;
        let after = chrono::Duration::from_std(self.config.republish_after).unwrap_or_default();
        let mut stale: HashMap<String, Vec<String>> = HashMap::new();
        let mut queued = std::collections::HashSet::new();
        for run in self.active.values() {
            for task in run.tasks.iter().filter(|t| t.state == TaskState::Queued) {
                queued.insert((run.id().to_string(), task.task_id.clone(), task.try_number));
                if task.queued_at.is_none_or(|at| now - at >= after) {
                    stale.entry(run.id().to_string()).or_default().push(task.task_id.clone());
                }
            }
        }
        // Tries no longer queued need no memory of their republishes.
        self.republished.retain(|key, _| queued.contains(key));
        let mut depths: HashMap<String, u64> = HashMap::new();
        for (run_id, task_ids) in stale {
            let ids: Vec<&str> = task_ids.iter().map(String::as_str).collect();
            let fresh = self.store.tasks_by_id(&run_id, &ids).await?;
            let Some(mut run) = self.active.remove(&run_id) else { continue };
            let result = async {
                for task in fresh.into_iter().flatten() {
                    let Some(&i) = run.index.get(&task.task_id) else { continue };
                    if task.state != TaskState::Queued || task.try_number != run.tasks[i].try_number {
                        self.on_task_changed(&mut run, i, task, true).await?;
                        continue;
                    }
                    let key = (run_id.clone(), task.task_id.clone(), task.try_number);
                    let waited = self.republished.get(&key).map(|(at, wait)| (now - *at, *wait));
                    let depth = match depths.get(&task.queue) {
                        Some(depth) => *depth,
                        None => {
                            let depth = self.queue.depth(&Topic::Tasks(task.queue.clone())).await.unwrap_or(0);
                            depths.insert(task.queue.clone(), depth);
                            depth
                        }
                    };
                    let queued_for = task.queued_at.map_or(chrono::Duration::MAX, |at| now - at);
                    let max_wait = chrono::Duration::from_std(REPUBLISH_MAX_WAIT).unwrap_or_default();
                    let due = match waited {
                        None => depth == 0 || queued_for >= max_wait,
                        Some((since, wait)) => since >= chrono::Duration::from_std(wait).unwrap_or_default(),
                    };
                    if !due {
                        continue;
                    }
                    let next_wait =
                        waited.map_or(self.config.republish_after * 2, |(_, wait)| wait * 2).min(REPUBLISH_MAX_WAIT);
                    tracing::warn!(
                        run = %run_id, task = %task.task_id, try_number = task.try_number,
                        "task queued since {} and not claimed: publishing its message again",
                        task.queued_at.map_or("?".to_string(), |t| t.to_rfc3339())
                    );
                    self.metrics.republished.inc(&[]);
                    self.outbox.push((Topic::Tasks(task.queue.clone()), task_message(&run, &task)));
                    self.republished.insert(key, (now, next_wait));
                }
                Ok::<(), BackendError>(())
            }
            .await;
            self.put_back(run).await?;
            result?;
        }
        Ok(())
    }

    /// Requeues, as new tries, tries that the store has `running` under a live worker whose
    /// heartbeats keep not listing them: the worker is not running them (a claim that applied
    /// although the worker saw an error). A try is requeued once a heartbeat written after the
    /// one that first missed it misses it too, and `unlisted_grace` has passed.
    async fn requeue_unlisted(&mut self, live: &HashMap<String, WorkerInfo>) -> Result<(), BackendError> {
        let now = self.now_cache;
        let grace = chrono::Duration::from_std(self.config.unlisted_grace).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let mut due: Vec<(TryKey, Unrun)> = Vec::new();
        for run in self.active.values() {
            for task in &run.tasks {
                if task.state != TaskState::Running {
                    continue;
                }
                let key = (run.id().to_string(), task.task_id.clone(), task.try_number);
                let Some(worker) = task.worker.as_ref().and_then(|name| live.get(name)) else {
                    // Running under a worker that left the registry (lost): a try the view learned
                    // of after the loss was handled (claimed eagerly, its upstream's status lost
                    // with the worker). Requeued once `unlisted_grace` has passed.
                    if task.worker.is_some() {
                        seen.insert(key.clone());
                        match self.unlisted.get(&key) {
                            None => drop(self.unlisted.insert(key, (now, DateTime::<Utc>::MIN_UTC))),
                            Some((since, _)) if now - *since >= grace => due.push((key, Unrun::Gone)),
                            Some(_) => {}
                        }
                    }
                    continue;
                };
                if task.worker_instance.as_deref() != Some(worker.instance.as_str()) {
                    // A try of an earlier process of a worker that has started again (one the
                    // view learned of after the restart was seen: a try claimed eagerly, whose
                    // upstream's status update died with that process).
                    if task.worker_instance.is_some() {
                        due.push((key, Unrun::Restarted));
                    }
                    continue;
                }
                let listed = worker
                    .running
                    .iter()
                    .any(|t| t.run_id == run.id() && t.task_id == task.task_id && t.try_number == task.try_number);
                if listed {
                    continue;
                }
                seen.insert(key.clone());
                match self.unlisted.get(&key) {
                    None => {
                        self.unlisted.insert(key, (now, worker.last_heartbeat));
                    }
                    Some((since, stamp)) => {
                        if now - *since >= grace && worker.last_heartbeat != *stamp {
                            due.push((key, Unrun::Unlisted));
                        }
                    }
                }
            }
        }
        self.unlisted.retain(|key, _| seen.contains(key));
        for ((run_id, task_id, try_number), unrun) in due {
            self.unlisted.remove(&(run_id.clone(), task_id.clone(), try_number));
            let Some(task) = self.store.task(&run_id, &task_id).await? else { continue };
            if !unrun.holds(&task, try_number, live) {
                continue;
            }
            let worker = task.worker.clone().unwrap_or_default();
            let reason = format!("try {try_number} interrupted: worker {worker} {}", unrun.reason());
            self.requeue_interrupted(&run_id, &task, reason, unrun.label()).await?;
        }
        Ok(())
    }

    /// Moves a `running` try whose worker is not running it to a new queued try (or to failed,
    /// past the bound on interruptions), queues its message and updates the run's view. `why`
    /// labels the `dagmq_tries_requeued_total` counter.
    async fn requeue_interrupted(
        &mut self,
        run_id: &str,
        task: &TaskInstance,
        reason: String,
        why: &str,
    ) -> Result<(), BackendError> {
        let next = task.after_interruption(self.now_cache, reason);
        if !self.store.transition_task(run_id, TaskState::Running, task.try_number, &next).await? {
            return Ok(());
        }
        tracing::warn!(
            run = %run_id, task = %task.task_id, try_number = task.try_number, next_try = next.try_number,
            state = %next.state, why, "interrupted try handled"
        );
        self.metrics.requeued.inc(&[why]);
        let Some(mut run) = self.active.remove(run_id) else { return Ok(()) };
        let result = match run.index.get(&task.task_id).copied() {
            Some(i) => {
                if next.state == TaskState::Queued {
                    self.outbox.push((Topic::Tasks(next.queue.clone()), task_message(&run, &next)));
                }
                self.on_task_changed(&mut run, i, next, true).await
            }
            None => Ok(()),
        };
        self.put_back(run).await?;
        result
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
                }
                self.put_back(run).await?;
                result
            }
        }
    }

    /// The run watcher: creates a run for every due schedule point of every unpaused DAG.
    async fn watch(&mut self) -> Result<(), BackendError> {
        let now = self.now_cache;
        let mut next: Option<DateTime<Utc>> = None;
        let dags: Vec<Arc<Dag>> = self.config.dags.iter().cloned().collect();
        for dag in dags {
            let mut record = self.dag_record(&dag).await?;
            if record.paused || matches!(dag.schedule, dagmq_core::schedule::Schedule::Manual) {
                continue;
            }
            let start = dag.start.unwrap_or(record.first_seen);
            let batch = self.config.catch_up_batch.max(1);
            let points = dag.schedule.due_points(start, record.last_scheduled, now, dag.catch_up, batch);
            for &point in &points {
                self.create_run(
                    &dag,
                    RunKind::Scheduled,
                    point,
                    self.config.default_params.get(&dag.id).cloned().unwrap_or_default(),
                    None,
                )
                .await?;
                record.last_scheduled = Some(point);
            }
            if !points.is_empty() {
                self.store.put_dag_record(&record).await?;
                self.dag_records.insert(dag.id.clone(), record.clone());
            }
            let candidate = if points.len() == batch { Some(now) } else { dag.next_run_after(start, now) };
            next = match (next, candidate) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        self.watch_at = next;
        Ok(())
    }

    /// Re-reads every running run from the store and settles it: the safety net for status
    /// messages that were lost between a worker's store write and its publish.
    async fn sweep(&mut self) -> Result<(), BackendError> {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for run_id in ids {
            let Some(mut run) = self.active.remove(&run_id) else { continue };
            let result = async {
                run.tasks = self.store.tasks(&run_id).await?;
                run.rebuild();
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
        for record in self.store.unfinished_runs().await? {
            if self.active.contains_key(&record.run_id) || known.contains(&record.run_id) {
                continue;
            }
            if self.dag_of(&record).is_none() {
                continue;
            }
            tracing::warn!(run = %record.run_id, state = %record.state, "run missing from the scheduler's view: taking it up");
            match record.state {
                RunState::Queued => {
                    self.dirty.insert(record.dag_id.clone());
                    self.queued.entry(record.dag_id.clone()).or_default().push_back(record.run_id);
                }
                _ => self.activate(record, true).await?,
            }
        }
        Ok(())
    }

    fn add_timer(&mut self, at: DateTime<Utc>, kind: TimerKind) {
        self.timer_seq += 1;
        self.timers.push(Reverse((at, self.timer_seq, kind)));
    }

    /// Sends a notification off the loop.
    fn notify(&self, run: &ActiveRun, i: usize, kind: NotificationKind) {
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

/// Renews the lease every third of its time until the term ends; fires `deposed` when another
/// scheduler holds it, or when no renewal has succeeded for two thirds of its time (it may have
/// lapsed by then; the fence refuses any write after it did).
async fn renew_lease(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    holder: String,
    ttl: Duration,
    deposed: Arc<dagmq_core::task::CancelHandle>,
    term: CancelSignal,
) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = term.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let attempt = tokio::time::Instant::now();
        // The lease's own clock is Redis's; `now` matters only to stores without one.
        let renewed = tokio::time::timeout(ttl / 3, async {
            fail_point!("scheduler::lease::renew", BackendError::new("injected: lease renewal failed"));
            store.acquire_lease(&holder, clock.now(), ttl).await
        })
        .await;
        match renewed {
            Ok(Ok(true)) => last_ok = attempt,
            Ok(Ok(false)) => {
                tracing::warn!(holder = %holder, "another scheduler holds the lease");
                deposed.cancel();
                return;
            }
            Ok(Err(err)) => tracing::error!("renewing the scheduler lease: {err}"),
            Err(_) => tracing::error!("renewing the scheduler lease: no answer within {:?}", ttl / 3),
        }
        if last_ok.elapsed() >= ttl * 2 / 3 {
            tracing::warn!(holder = %holder, "the lease was not renewed for {:?}: stepping down", last_ok.elapsed());
            deposed.cancel();
            return;
        }
    }
}

/// Fires a cancel handle when dropped: ends a leadership term's consumers on every exit path.
struct StopOnDrop(dagmq_core::task::CancelHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Why the zombie check takes a `running` try for one that nobody runs.
#[derive(Debug, Clone, Copy)]
enum Unrun {
    /// Its worker left the registry.
    Gone,
    /// Its worker started again: the try belongs to an earlier process.
    Restarted,
    /// Its live worker keeps not listing it in its heartbeats.
    Unlisted,
}

impl Unrun {
    /// Whether `task`, read again, is still such a try at `try_number`.
    fn holds(self, task: &TaskInstance, try_number: u32, live: &HashMap<String, WorkerInfo>) -> bool {
        if task.state != TaskState::Running || task.try_number != try_number {
            return false;
        }
        let worker = task.worker.as_ref().and_then(|name| live.get(name));
        match self {
            Unrun::Gone => worker.is_none(),
            Unrun::Restarted => worker.is_some_and(|w| task.worker_instance.as_deref() != Some(w.instance.as_str())),
            Unrun::Unlisted => true,
        }
    }

    /// What happened to the worker, for the try's error.
    fn reason(self) -> &'static str {
        match self {
            Unrun::Gone => "lost",
            Unrun::Restarted => "restarted",
            Unrun::Unlisted => "is not running it",
        }
    }

    /// The `dagmq_tries_requeued_total` label.
    fn label(self) -> &'static str {
        match self {
            Unrun::Gone | Unrun::Restarted => "worker_lost",
            Unrun::Unlisted => "not_running",
        }
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
fn take_moved_on(run: &mut ActiveRun, i: usize, fresh: TaskInstance) {
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
    run.deferred.push((i, fresh));
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

/// A task's configuration: from the DAG, or the defaults for follow-up tasks.
fn task_config(run: &ActiveRun, i: usize) -> TaskConfig {
    run.dag.task(&run.tasks[i].task_id).map(|t| t.config.clone()).unwrap_or_default()
}

/// The task-to-exec message for a queued task.
fn task_message(run: &ActiveRun, task: &TaskInstance) -> Vec<u8> {
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
