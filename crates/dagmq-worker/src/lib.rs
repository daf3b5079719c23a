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
mod quiet;
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
    /// Most messages the worker prefetches per pool: [`PREFETCH_PER_SLOT`] per slot up to
    /// this, and never less than one per slot (up to this) plus [`PREFETCH_MARGIN`] (at most
    /// the concurrency again): [`consumer_prefetch`]. Messages are acknowledged when their try
    /// is claimed, so a worker whose slots are all busy holds at most that many messages that
    /// other workers could start.
    pub prefetch: u16,
    /// The consumer's prefetch per pool exactly (`--prefetch`), in place of
    /// [`consumer_prefetch`]'s: the most messages the worker holds that it has not started.
    pub window: Option<u16>,
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
    /// Where the span of each finished try goes (see [`dagmq_core::trace`]); `None` (the
    /// default) records none.
    pub spans: dagmq_core::trace::Spans,
    /// Fired while the worker stops, ends its grace period at once: running tries are stopped
    /// and requeued as at its end (a second Ctrl-C, as Celery's cold shutdown). `None` (the
    /// default): the grace period always runs out.
    pub hurry: Option<CancelSignal>,
}

/// Most status updates a worker has on their way at once after their tries gave their slots
/// back: one full batch of the status publisher. Were it the concurrency, a worker of few slots
/// would again wait a broker confirm per try.
const REPORTS_IN_FLIGHT: u32 = 1000;

/// The default [`WorkerConfig::prefetch`]: enough to keep claims pipelined, few enough that a
/// busy worker does not hoard work.
pub const DEFAULT_PREFETCH: u16 = 64;

/// Unstarted messages a consumer holds beyond one per slot (at most one more per slot): the
/// next message is at hand when a slot frees, where with one per slot the slot waited for
/// the broker to deliver it after the previous one's ack. With [`DEFAULT_PREFETCH`], a busy
/// worker of 64 slots or more holds at most 72 unstarted messages per pool.
pub const PREFETCH_MARGIN: u16 = 8;

/// Messages a consumer may hold per slot, up to [`WorkerConfig::prefetch`] (Celery's default
/// prefetch multiplier): a worker of few slots keeps enough at hand that a slot whose try ends
/// finds its next one there, and claims it with the outcome, rather than waiting a delivery
/// and a claim of its own. With [`DEFAULT_PREFETCH`], 8 slots hold at most 32 messages per pool.
pub const PREFETCH_PER_SLOT: u16 = 4;

/// The default [`WorkerConfig::dag_version_wait`]: far longer than a DAG directory takes to be
/// read again everywhere (every 2 s), long enough for a file copied to the workers' hosts a
/// little later than to the scheduler's.
pub const DEFAULT_DAG_VERSION_WAIT: Duration = Duration::from_secs(300);

impl WorkerConfig {
    /// The prefetch of each pool's consumer: [`WorkerConfig::window`] when given, else
    /// [`consumer_prefetch`] of the concurrency and [`WorkerConfig::prefetch`].
    pub fn effective_window(&self) -> u16 {
        self.window.map_or_else(|| consumer_prefetch(self.concurrency.max(1), self.prefetch), |n| n.max(1))
    }

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
            window: None,
            metrics: Arc::new(WorkerMetrics::default()),
            live: None,
            eager: true,
            eager_claims: 8,
            dag_version_wait: DEFAULT_DAG_VERSION_WAIT,
            batch_status: true,
            spans: None,
            hurry: None,
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
    /// Each pool's feed of messages (`dagmq.tasks.<pool>`), in the order of `--queues`: its
    /// consumer loop waits on it for a message, then for a free slot to run it in, and a slot
    /// whose try ends takes the next message at hand, to claim that try with the outcome
    /// (`Store::finish_and_claim`), looking at the pools in turn (`turn`).
    pub(crate) feeds: Vec<Arc<tokio::sync::Mutex<Feed>>>,
    /// Which pool's feed a slot whose try ends looks at first: each slot that looks starts one
    /// pool further, so a pool with a backlog does not starve the others.
    pub(crate) turn: std::sync::atomic::AtomicUsize,
    /// Status updates on their way after their tries gave their slots back (one permit each,
    /// [`REPORTS_IN_FLIGHT`] in all): a broker that confirms slowly holds new tries back rather
    /// than piling updates up, and the worker waits for them as it stops.
    pub(crate) reports: Arc<Semaphore>,
    /// Warnings a redelivered message would repeat, written once in a while.
    pub(crate) quiet: quiet::Quiet,
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
    let prefetch = config.effective_window();
    let mut pools: Vec<&String> = Vec::new();
    for pool in &config.queues {
        if !pools.contains(&pool) {
            pools.push(pool);
        }
    }
    let feeds = pools
        .into_iter()
        .map(|pool| {
            let subscription = Subscription::topic(queue.clone(), Topic::Tasks(pool.clone()), prefetch);
            Arc::new(tokio::sync::Mutex::new(Feed { subscription, held: None }))
        })
        .collect();
    let shared = Arc::new(Shared {
        feeds,
        turn: std::sync::atomic::AtomicUsize::new(0),
        live,
        status: status::StatusSender::start(queue.clone(), config.batch_status),
        shutdown: shutdown.clone(),
        slots: Arc::new(Semaphore::new(concurrency)),
        reports: Arc::new(Semaphore::new(REPORTS_IN_FLIGHT as usize)),
        quiet: quiet::Quiet::default(),
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
    for feed in &shared.feeds {
        consumers.push(tokio::spawn(consume_loop(shared.clone(), feed.clone(), slots.clone(), shutdown.clone())));
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
    let hurried = async {
        match &shared.config.hurry {
            Some(hurry) => hurry.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let finished = tokio::select! {
        // Tries that have all ended are not stopped, whatever was asked meanwhile.
        biased;
        done = tokio::time::timeout(shared.config.grace_period, slots.acquire_many(all)) => done.is_ok(),
        () = hurried => {
            tracing::warn!("told to stop at once: the grace period ends now");
            false
        }
    };
    if !finished {
        let count = execute::stop_all(&shared, StopReason::Interrupted);
        tracing::warn!(count, "grace period over: requeueing running tries");
        let _ = tokio::time::timeout(Duration::from_secs(30), slots.acquire_many(all)).await;
    }
    // Status updates still on their way: the outcomes are in the store already, so an update
    // that does not go out within this wait costs the scheduler's sweep interval, not state.
    let reports = shared.reports.acquire_many(REPORTS_IN_FLIGHT);
    if tokio::time::timeout(Duration::from_secs(10), reports).await.is_err() {
        tracing::warn!("status updates not sent within 10s of stopping: the scheduler's sweep finds their outcomes");
    }
    heartbeats.abort();
    controls.abort();
    if let Err(err) = shared.store.remove_worker(&shared.config.name).await {
        tracing::warn!("removing the worker from the registry: {err}");
    }
    tracing::info!(worker = %shared.config.name, "worker stopped");
    Ok(())
}

/// The prefetch of a pool's consumer: [`PREFETCH_PER_SLOT`] messages per slot up to
/// `prefetch`, and never less than a message for each slot (up to `prefetch`) plus a margin of
/// up to [`PREFETCH_MARGIN`] (at most the concurrency), so that the message a slot takes as it
/// frees is at hand, not a broker round trip away. Messages are acknowledged at their claim, so
/// a worker whose slots are all busy holds at most this many unstarted messages.
pub fn consumer_prefetch(concurrency: usize, prefetch: u16) -> u16 {
    let slots = u16::try_from(concurrency.max(1)).unwrap_or(u16::MAX);
    let prefetch = prefetch.max(1);
    let per_slot = slots.saturating_mul(PREFETCH_PER_SLOT).min(prefetch);
    let margin = slots.min(prefetch).saturating_add(slots.min(PREFETCH_MARGIN));
    per_slot.max(margin)
}

/// One pool's messages: its subscription, and the message its consumer loop took and holds
/// while it waits for a free slot.
pub(crate) struct Feed {
    /// The pool's subscription.
    subscription: Subscription,
    /// The pool's oldest message at hand, taken off the subscription, not handled yet.
    held: Option<dagmq_core::Delivery>,
}

impl Feed {
    /// The pool's next message at hand, never waiting: the one held, else one the consumer
    /// holds already.
    pub(crate) fn take(&mut self) -> Option<dagmq_core::Delivery> {
        self.held.take().or_else(|| self.subscription.try_next())
    }
}

/// Runs one pool's messages in the worker's slots: waits for a message, holding no slot, then
/// for a free slot to run it in (so a pool with no message never keeps a slot from the other
/// pools). A slot whose try ends may take the message held meanwhile (`execute`): this loop
/// only fills slots that free. On shutdown, a message held is put back.
async fn consume_loop(
    shared: Arc<Shared>,
    feed: Arc<tokio::sync::Mutex<Feed>>,
    slots: Arc<Semaphore>,
    shutdown: CancelSignal,
) {
    loop {
        let waiting_since = shared.config.clock.now();
        {
            let mut feed = feed.lock().await;
            if feed.held.is_none() {
                let Some(delivery) = feed.subscription.next(&shutdown).await else { return };
                feed.held = Some(delivery);
            }
        }
        // The slot is free from now (from when this loop began waiting for a message, if a
        // slot was free at once): the try this message carries starts after the work waiting
        // (`WorkerMetrics::work_waiting`) of the delivery and the claim.
        let (slot, free_since) = match slots.clone().try_acquire_owned() {
            Ok(slot) => (slot, waiting_since),
            Err(_) => {
                let slot = tokio::select! {
                    _ = shutdown.cancelled() => None,
                    slot = slots.clone().acquire_owned() => slot.ok(),
                };
                let Some(slot) = slot else {
                    if let Some(delivery) = feed.lock().await.held.take()
                        && let Err(err) = delivery.requeue().await
                    {
                        tracing::warn!("putting back a message not started as the worker stops: {err}");
                    }
                    return;
                };
                (slot, shared.config.clock.now())
            }
        };
        // A slot whose try ended may have taken the message meanwhile.
        let Some(delivery) = feed.lock().await.held.take() else { continue };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer prefetches four messages per slot up to the prefetch setting, and never less
    /// than a message per slot (up to the setting) plus a margin of up to 8: a busy worker of 8
    /// slots holds at most 32 unstarted messages, one of 64 slots or more at most 72.
    #[test]
    fn the_consumer_prefetch_is_four_per_slot_or_the_slots_plus_a_small_margin() {
        assert_eq!(consumer_prefetch(1, DEFAULT_PREFETCH), 4);
        assert_eq!(consumer_prefetch(0, DEFAULT_PREFETCH), 4);
        assert_eq!(consumer_prefetch(4, DEFAULT_PREFETCH), 16);
        assert_eq!(consumer_prefetch(8, DEFAULT_PREFETCH), 32);
        assert_eq!(consumer_prefetch(16, DEFAULT_PREFETCH), 64);
        assert_eq!(consumer_prefetch(60, DEFAULT_PREFETCH), 68);
        assert_eq!(consumer_prefetch(100, DEFAULT_PREFETCH), 72);
        assert_eq!(consumer_prefetch(1000, DEFAULT_PREFETCH), 72);
        assert_eq!(consumer_prefetch(8, 10), 16);
        assert_eq!(consumer_prefetch(1000, 10), 18);
        assert_eq!(consumer_prefetch(1, 1), 2);
        assert_eq!(consumer_prefetch(100_000, u16::MAX), u16::MAX);
    }
}
