//! One delivery from decoding to the try's outcome: claim the try with a compare-and-set,
//! acknowledge the message while the try starts, run it, write the outcome, publish the status
//! update.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use dagmq_core::fail_point;
use dagmq_core::messages::{self, Control, StatusUpdate, TaskToExec, VERSION};
use dagmq_core::records::RunningTry;
use dagmq_core::store::{Claimant, EagerClaim};
use dagmq_core::task::CancelHandle;
use dagmq_core::trigger::TriggerRule;
use dagmq_core::{
    BackendError, CancelSignal, Delivery, FollowUp, Subscription, Task, TaskContext, TaskError, TaskInstance, TaskKind,
    TaskOutcome, TaskState, Topic,
};

use crate::Shared;
use crate::command::run_command;
use crate::log_sink;

/// Tries running on this worker, by (run, task, try).
pub(crate) type RunningTries = Arc<Mutex<HashMap<TryKey, TryHandle>>>;

/// A try: (run, task, try number).
pub(crate) type TryKey = (String, String, u32);

/// How to stop one running try, and why it was stopped. A try is registered before its
/// claim, so every heartbeat written after the claim lists it, and leaves once its outcome is
/// recorded.
pub(crate) struct TryHandle {
    /// Fires the try's cancellation signal.
    cancel: CancelHandle,
    /// A [`StopReason`] as a number, set before `cancel` fires.
    reason: Arc<AtomicU8>,
    /// Whether the claim applied (the store has the try `running` here).
    claimed: Arc<AtomicBool>,
}

/// Why a try was stopped before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum StopReason {
    /// Not stopped.
    None = 0,
    /// The task's timeout passed.
    Timeout = 1,
    /// The run was cancelled.
    Cancelled = 2,
    /// The worker is shutting down past its grace period.
    Interrupted = 3,
    /// The store no longer has the try `running` on this worker (cancelled, or requeued as a
    /// new try elsewhere): its outcome would be refused, so it stops.
    Superseded = 4,
    /// The worker could not heartbeat for half the worker timeout: the scheduler may take its
    /// tries for lost and requeue them, so it stops them first (self-fencing).
    Fenced = 5,
}

impl StopReason {
    fn from_u8(value: u8) -> StopReason {
        match value {
            1 => StopReason::Timeout,
            2 => StopReason::Cancelled,
            3 => StopReason::Interrupted,
            4 => StopReason::Superseded,
            5 => StopReason::Fenced,
            _ => StopReason::None,
        }
    }
}

/// What a message asks to run.
enum Executable {
    /// A Rust task with its args.
    Rust(Arc<dyn Task>, serde_json::Value),
    /// A process.
    Command(Vec<String>),
}

/// A claimed try's task, resolved once at the claim against the DAG version of its run.
struct Resolved {
    /// What runs.
    executable: Executable,
    /// For a branch task: the direct downstream tasks its output must choose among.
    branch: Option<Vec<String>>,
}

/// How long a stopped try may take to wind down before it is aborted.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long a try stopped by self-fencing may take to wind down before it is aborted.
pub(crate) const FENCED_STOP_GRACE: Duration = Duration::from_secs(5);

fn lock(running: &RunningTries) -> MutexGuard<'_, HashMap<TryKey, TryHandle>> {
    running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The tries running now, for the heartbeat.
pub(crate) fn running_tries(shared: &Shared) -> Vec<RunningTry> {
    let mut tries: Vec<RunningTry> = lock(&shared.running)
        .keys()
        .map(|(run_id, task_id, try_number)| RunningTry {
            run_id: run_id.clone(),
            task_id: task_id.clone(),
            try_number: *try_number,
        })
        .collect();
    tries.sort_by(|a, b| (&a.run_id, &a.task_id).cmp(&(&b.run_id, &b.task_id)));
    tries
}

/// Stops every running try (or those of one run); answers how many.
pub(crate) fn stop_all(shared: &Shared, reason: StopReason) -> usize {
    stop_matching(shared, reason, |_| true)
}

fn stop_matching(shared: &Shared, reason: StopReason, matches: impl Fn(&str) -> bool) -> usize {
    let running = lock(&shared.running);
    let mut count = 0;
    for ((run_id, _, _), handle) in running.iter() {
        if matches(run_id) {
            handle.reason.store(reason as u8, Ordering::SeqCst);
            handle.cancel.cancel();
            count += 1;
        }
    }
    count
}

/// Stops the tries that the store no longer has `running` on this worker instance: a cancel
/// whose broadcast this worker missed, or a try requeued elsewhere. Called after every
/// heartbeat, so a cancel reaches every running try within a heartbeat interval from the
/// store. Answers how many were stopped.
pub(crate) async fn stop_superseded(shared: &Shared) -> Result<usize, BackendError> {
    let mut by_run: HashMap<String, Vec<(String, u32)>> = HashMap::new();
    for ((run_id, task_id, try_number), handle) in lock(&shared.running).iter() {
        if handle.claimed.load(Ordering::SeqCst) {
            by_run.entry(run_id.clone()).or_default().push((task_id.clone(), *try_number));
        }
    }
    let mut stopped = 0;
    for (run_id, tries) in by_run {
        let ids: Vec<&str> = tries.iter().map(|(task_id, _)| task_id.as_str()).collect();
        let found = shared.store.tasks_by_id(&run_id, &ids).await?;
        for ((task_id, try_number), task) in tries.iter().zip(found) {
            let ours = task.as_ref().is_some_and(|t| {
                t.try_number == *try_number
                    && t.worker_instance.as_deref() == Some(shared.instance.as_str())
                    && matches!(
                        t.state,
                        TaskState::Running | TaskState::Success | TaskState::Failed | TaskState::UpForRetry
                    )
            });
            if ours {
                continue;
            }
            let reason =
                if task.as_ref().is_some_and(|t| matches!(t.state, TaskState::Cancelled | TaskState::Suspended)) {
                    StopReason::Cancelled
                } else {
                    StopReason::Superseded
                };
            let key = (run_id.clone(), task_id.clone(), *try_number);
            if let Some(handle) = lock(&shared.running).get(&key)
                && StopReason::from_u8(handle.reason.load(Ordering::SeqCst)) == StopReason::None
            {
                tracing::warn!(
                    run = %run_id, task = %task_id, try_number, state = ?task.map(|t| t.state),
                    "the store no longer has this try running here: stopping it"
                );
                handle.reason.store(reason as u8, Ordering::SeqCst);
                handle.cancel.cancel();
                stopped += 1;
            }
        }
    }
    Ok(stopped)
}

/// Listens for control broadcasts (run cancelled or suspended) and stops the affected tries.
pub(crate) async fn control_loop(shared: Arc<Shared>, shutdown: CancelSignal) {
    let mut subscription = Subscription::broadcasts(shared.queue.clone());
    while let Some(delivery) = subscription.next(&shutdown).await {
        match messages::decode::<Control>(&delivery.payload) {
            Ok(Control::CancelRun { run_id, .. }) => {
                let count = stop_matching(&shared, StopReason::Cancelled, |r| r == run_id);
                if count > 0 {
                    tracing::info!(run = %run_id, count, "stopping tries of a cancelled or suspended run");
                }
            }
            Err(err) => tracing::warn!("ignoring a control message: {err}"),
        }
        let _ = delivery.ack().await;
    }
}

/// Handles one delivery; never fails: whatever goes wrong costs this message only.
///
/// The message is acknowledged as soon as the try is claimed (`running` in the store, with this
/// worker's name): from then on the store and this worker's heartbeat carry the try, so a try
/// longer than the broker's consumer timeout is never redelivered, and a lost worker's tries
/// are requeued by the scheduler.
pub(crate) async fn execute(shared: &Arc<Shared>, delivery: Delivery) {
    let message: TaskToExec = match messages::decode(&delivery.payload) {
        Ok(message) => message,
        Err(err) => {
            shared.config.metrics.dead_lettered.inc(&[err.label()]);
            settle(delivery.dead_letter(&format!("task: {err}")).await);
            return;
        }
    };
    let key = (message.run_id.clone(), message.task_id.clone(), message.try_number);
    let Some(Registered { signal, reason, claimed }) = register(shared, &key) else {
        // Another delivery of this very try is being handled here: this one is a duplicate.
        shared.config.metrics.duplicates.inc(&[]);
        settle(delivery.ack().await);
        return;
    };
    // A store that does not answer must not turn the message into a dead letter (a requeue
    // counts against the broker's delivery limit): keep it and try again with backoff.
    let mut delay = Duration::from_millis(100);
    let claimed_try = loop {
        match claim(shared, &message).await {
            Ok(claim) => break claim,
            Err(err) => {
                if signal.is_cancelled() {
                    lock(&shared.running).remove(&key);
                    settle(delivery.requeue().await);
                    return;
                }
                tracing::error!(run = %message.run_id, task = %message.task_id, "claiming: {err}; trying again in {delay:?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = signal.cancelled() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    match claimed_try {
        Claim::Settle(Settle::Ack) => {
            lock(&shared.running).remove(&key);
            settle(delivery.ack().await)
        }
        Claim::Settle(Settle::DeadLetter(reason)) => {
            lock(&shared.running).remove(&key);
            shared.config.metrics.dead_lettered.inc(&[if reason.contains("has no task") {
                "unknown_task"
            } else {
                "unresolvable"
            }]);
            tracing::warn!(run = %message.run_id, task = %message.task_id, "dead-lettering: {reason}");
            settle(delivery.dead_letter(&reason).await)
        }
        Claim::Run(running, resolved, trusted, eager) => {
            fail_point!("worker::claim::before_ack");
            claimed.store(true, Ordering::SeqCst);
            let first = ClaimedTry { key, message: *trusted, running: *running, resolved, signal, reason, eager };
            // The try is ours: it starts while the ack is on its way.
            let (acked, next) = tokio::join!(delivery.ack(), finish(shared, first));
            settle(acked);
            run_claimed(shared, next).await;
        }
    }
}

/// Runs the tries claimed as their upstream succeeded: the first here, one after the other
/// (each may claim more), the others each in a task of its own with the slot taken for it,
/// while the status update of the try before is on its way.
fn run_claimed(shared: &Arc<Shared>, mut next: Option<Next>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        while let Some(Next { first, others, update }) = next {
            if shared.status.confirms_take_time() {
                tokio::spawn(publish_status_until_sent(shared.clone(), update));
            } else {
                // An in-memory publish: done at once, not worth a task.
                publish_status_until_sent(shared.clone(), update).await;
            }
            for (claimed, permit) in others {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let next = finish(&shared, claimed).await;
                    run_claimed(&shared, next).await;
                    drop(permit);
                });
            }
            next = finish(shared, first).await;
        }
    })
}

/// A try registered on this worker: how it is stopped and whether its claim applied.
struct Registered {
    signal: CancelSignal,
    reason: Arc<AtomicU8>,
    claimed: Arc<AtomicBool>,
}

/// Registers a try before its claim, so every heartbeat written after the claim lists it;
/// `None` when this try is registered already (a duplicate delivery being handled here).
fn register(shared: &Shared, key: &TryKey) -> Option<Registered> {
    let (cancel, signal) = CancelSignal::new();
    let handle = TryHandle {
        cancel,
        reason: Arc::new(AtomicU8::new(StopReason::None as u8)),
        claimed: Arc::new(AtomicBool::new(false)),
    };
    let registered = Registered { signal, reason: handle.reason.clone(), claimed: handle.claimed.clone() };
    match lock(&shared.running).entry(key.clone()) {
        std::collections::hash_map::Entry::Occupied(_) => None,
        std::collections::hash_map::Entry::Vacant(entry) => {
            entry.insert(handle);
            Some(registered)
        }
    }
}

/// A try this worker holds `running` in the store, ready to run.
struct ClaimedTry {
    /// (run, task, try), its entry among the running tries.
    key: TryKey,
    /// What it runs, as the store and this worker's DAGs describe it.
    message: TaskToExec,
    /// The instance as claimed.
    running: TaskInstance,
    /// The task, resolved at the claim.
    resolved: Resolved,
    /// Fires when the try must stop; `reason` says why.
    signal: CancelSignal,
    reason: Arc<AtomicU8>,
    /// Downstream tasks that this worker may claim as the try succeeds, as read at the claim
    /// (`pending` then).
    eager: Vec<TaskInstance>,
}

/// A try's future, polled in place; a panic while polling ends it with the panic's text.
struct CatchPanic(Pin<Box<dyn Future<Output = Result<TaskOutcome, TaskError>> + Send>>);

impl Future for CatchPanic {
    type Output = Result<Result<TaskOutcome, TaskError>, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text panic payload".to_string()))),
        }
    }
}

/// Logs a failure to settle a delivery; the queue redelivers it and the claim dedupes.
fn settle(result: Result<(), BackendError>) {
    if let Err(err) = result {
        tracing::error!("settling a delivery: {err}");
    }
}

/// What to do with the delivery.
enum Settle {
    /// Done with.
    Ack,
    /// Cannot ever be processed.
    DeadLetter(String),
}

/// The outcome of trying to claim a message's try.
enum Claim {
    /// Nothing to run: settle the delivery so.
    Settle(Settle),
    /// The try is ours (`running` in the store): run it, as the store describes it, with the
    /// downstream tasks it may claim as it succeeds.
    Run(Box<TaskInstance>, Resolved, Box<TaskToExec>, Vec<TaskInstance>),
}

/// Claims the try (`queued` -> `running`, `Store::claim_try`, which also reads the downstream
/// tasks it may claim eagerly); a message whose try is not `queued` (nor ours from a claim whose
/// answer was lost) is a duplicate or stale and runs nothing.
async fn claim(shared: &Shared, message: &TaskToExec) -> Result<Claim, BackendError> {
    let store = &shared.store;
    let run = run_record(shared, &message.run_id).await?;
    // The downstream tasks this try may claim as it succeeds are read with the claim, in one
    // round trip.
    let dag = run.as_ref().and_then(|run| dag_version(shared, &run.dag_id, run.dag_version.as_deref()).ok());
    let candidates = match &dag {
        Some(dag) if message.follow_up.is_none() => eager_candidates(shared, dag, &message.task_id),
        _ => Vec::new(),
    };
    let ids: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let answer =
        store.claim_try(&message.run_id, &message.task_id, message.try_number, &claimant(shared), &ids).await?;
    let Some(current) = answer.task else {
        return Ok(Claim::Settle(Settle::DeadLetter(format!(
            "task: run {:?} has no task {:?}",
            message.run_id, message.task_id
        ))));
    };
    // A claim of ours whose answer was lost (an error after the script applied) is found
    // running under this worker instance when the delivery is handled again.
    let ours = answer.claimed
        || (current.state == TaskState::Running
            && current.try_number == message.try_number
            && current.worker_instance.as_deref() == Some(shared.instance.as_str()));
    let Some(run) = run else {
        if ours {
            fail_claimed(shared, &message.run_id, &current, format!("no run {:?}", message.run_id)).await?;
        }
        return Ok(Claim::Settle(Settle::DeadLetter(format!("task: no run {:?}", message.run_id))));
    };
    let eager: Vec<TaskInstance> =
        answer.read.into_iter().flatten().filter(|t| t.state == TaskState::Pending).collect();
    // The message only names the run, the task and the try; what runs, with which parameters,
    // is what the store and this worker's DAG files say, so a forged message changes nothing.
    let message = &TaskToExec {
        dag_id: run.dag_id.clone(),
        params: run.params.clone(),
        logical_date: run.logical_date,
        follow_up: current.follow_up.as_deref().cloned(),
        max_try: current.max_try,
        ..message.clone()
    };
    if !ours {
        tracing::info!(
            run = %message.run_id, task = %message.task_id, try_number = message.try_number,
            state = %current.state, current_try = current.try_number,
            "duplicate or stale task message (or another worker claimed the try first) acknowledged without running"
        );
        shared.config.metrics.duplicates.inc(&[]);
        return Ok(Claim::Settle(Settle::Ack));
    }
    match resolve(shared, message, run.dag_version.as_deref()) {
        Ok(resolved) => Ok(Claim::Run(Box::new(current), resolved, Box::new(message.clone()), eager)),
        Err(reason) => {
            // The run must not hang on a task no worker can run: fail the try, then set the
            // message aside.
            fail_claimed(shared, &message.run_id, &current, reason.clone()).await?;
            Ok(Claim::Settle(Settle::DeadLetter(format!("task: {reason}"))))
        }
    }
}

/// Fails a try this worker claimed but cannot run, and tells the scheduler.
async fn fail_claimed(
    shared: &Shared,
    run_id: &str,
    running: &TaskInstance,
    reason: String,
) -> Result<(), BackendError> {
    let mut failed = running.clone();
    failed.state = TaskState::Failed;
    failed.ended_at = Some(shared.config.clock.now());
    failed.error = Some(reason);
    if shared.store.transition_task(run_id, TaskState::Running, running.try_number, &failed).await? {
        publish_status(shared, &failed, run_id).await?;
    }
    Ok(())
}

/// This worker instance as it claims a try now.
fn claimant(shared: &Shared) -> Claimant {
    Claimant { worker: shared.config.name.clone(), instance: shared.instance.clone(), at: shared.config.clock.now() }
}

/// A run's record, from a small cache: a run's DAG, parameters and logical date never change.
async fn run_record(shared: &Shared, run_id: &str) -> Result<Option<Arc<dagmq_core::RunRecord>>, BackendError> {
    const CACHED_RUNS: usize = 4096;
    if let Some(record) = shared.runs.lock().unwrap_or_else(|p| p.into_inner()).get(run_id) {
        return Ok(Some(record.clone()));
    }
    let Some(record) = shared.store.run(run_id).await? else { return Ok(None) };
    let record = Arc::new(record);
    let mut runs = shared.runs.lock().unwrap_or_else(|p| p.into_inner());
    if runs.len() >= CACHED_RUNS {
        runs.clear();
    }
    runs.insert(run_id.to_string(), record.clone());
    Ok(Some(record))
}

/// Runs a claimed try and records its outcome, retrying the store and queue until they answer:
/// the message is acknowledged already, so the outcome must not be dropped. Answers the
/// downstream tries claimed as this one succeeded, if any, with this try's status update, which
/// is sent while they run.
async fn finish(shared: &Shared, claimed: ClaimedTry) -> Option<Next> {
    let ClaimedTry { key, message, mut running, resolved, signal, reason, mut eager } = claimed;
    let message = &message;
    // The try starts now (the claim's time is when it was claimed); the outcome records this.
    running.started_at = Some(shared.config.clock.now());
    shared.config.metrics.running.add(&[], 1.0);
    let Resolved { executable, branch } = resolved;
    let (result, reason) = run_try(shared, message, running.after.clone(), executable, signal, reason).await;
    // An output over the limit fails the try like any failure (and is retried while tries
    // are left); every output, a command's or a Rust task's, is measured here once.
    let result = result.and_then(|outcome| match outcome.output.as_ref().map(dagmq_core::task::check_output) {
        Some(Err(reason)) => Err(TaskError::new(reason)),
        _ => Ok(outcome),
    });
    // A branch task's output must name its direct downstream tasks; anything else fails the try.
    let result = result.and_then(|outcome| match &branch {
        Some(downstream) => {
            let choices: Vec<&str> = downstream.iter().map(String::as_str).collect();
            match dagmq_core::trigger::branch_choice(outcome.output.as_ref(), &choices) {
                Err(reason) => Err(TaskError::new(reason)),
                Ok(_) => Ok(outcome),
            }
        }
        None => Ok(outcome),
    });
    shared.config.metrics.running.add(&[], -1.0);
    let outcome = match (&result, reason) {
        (_, StopReason::Interrupted | StopReason::Fenced) => "interrupted",
        (_, StopReason::Superseded) => "superseded",
        (Ok(_), _) => "success",
        (Err(e), _) if e.retryable && running.try_number < running.max_try => "up_for_retry",
        (Err(_), _) => "failed",
    };
    shared.config.metrics.tries.inc(&[outcome]);
    let mut delay = Duration::from_millis(100);
    let next = loop {
        match record_outcome(shared, message, &running, &result, reason, &mut eager).await {
            Ok(next) => break next,
            Err(err) => {
                tracing::error!(run = %message.run_id, task = %message.task_id, "recording the outcome: {err}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    lock(&shared.running).remove(&key);
    next
}

/// Writes a finished try's outcome (or its requeue, when interrupted) and tells the scheduler.
/// A success claims, in the same store step, the `eager` downstream tasks that it made ready
/// (as many as it has slots for; taken on the first attempt only); those tries are answered,
/// with the status update the caller then sends.
async fn record_outcome(
    shared: &Shared,
    message: &TaskToExec,
    running: &TaskInstance,
    result: &Result<TaskOutcome, TaskError>,
    reason: StopReason,
    eager: &mut Vec<TaskInstance>,
) -> Result<Option<Next>, BackendError> {
    let eager = std::mem::take(eager);
    let store = &shared.store;
    let now = shared.config.clock.now();
    if matches!(reason, StopReason::Interrupted | StopReason::Fenced) {
        let why = if reason == StopReason::Fenced {
            format!("try {} interrupted: worker {} lost the store", running.try_number, shared.config.name)
        } else {
            format!("try {} interrupted: worker {} shut down", running.try_number, shared.config.name)
        };
        let next = running.after_interruption(now, why);
        if !store.transition_task(&message.run_id, TaskState::Running, running.try_number, &next).await? {
            // Applied by an earlier attempt whose publish failed, or the task moved on.
            let current = store.task(&message.run_id, &message.task_id).await?;
            let ours = current.is_some_and(|c| c.state == next.state && c.try_number == next.try_number);
            if !ours {
                return Ok(None);
            }
        }
        fail_point!("worker::requeue::before_publish");
        if next.state == TaskState::Queued {
            let message = TaskToExec { try_number: next.try_number, max_try: next.max_try, ..message.clone() };
            shared.queue.publish(&Topic::Tasks(next.queue.clone()), messages::encode(&message)).await?;
            tracing::info!(run = %message.run_id, task = %message.task_id, try_number = next.try_number, "requeued as a new try");
        } else {
            publish_status(shared, &next, &message.run_id).await?;
        }
        return Ok(None);
    }
    let mut done = running.clone();
    done.ended_at = Some(now);
    // Only a success hands an output on.
    done.output = None;
    match result {
        Ok(outcome) => match check_follow_ups(shared, &outcome.follow_ups) {
            Ok(()) => {
                done.state = TaskState::Success;
                done.follow_ups = outcome.follow_ups.clone();
                done.output = outcome.output.clone();
            }
            Err(reason) => {
                done.state = TaskState::Failed;
                done.error = Some(reason);
            }
        },
        Err(error) => {
            let retry = error.retryable && running.try_number < running.max_try;
            done.state = if retry { TaskState::UpForRetry } else { TaskState::Failed };
            done.error = Some(error.message.clone());
        }
    }
    // The first candidate claimed runs next in this try's slot; each further one needs a free
    // slot of this worker, taken now (and given back if it is not claimed).
    let mut permits = Vec::new();
    let candidates = if done.state == TaskState::Success && done.follow_ups.is_empty() && !shared.stopping() {
        while permits.len() + 1 < eager.len().min(shared.config.eager_claims) {
            match shared.slots.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        let mut eager = eager;
        eager.truncate(permits.len() + 1);
        prepare_eager(shared, message, eager)
    } else {
        Vec::new()
    };
    let claims: Vec<EagerClaim> = candidates.iter().map(|c| c.claim.clone()).collect();
    let finished = store.finish_try(&message.run_id, &done, &claims).await;
    // Only the claimed candidates stay registered; an error claimed none that this worker knows
    // of (should the store have applied one, the scheduler requeues it: no heartbeat lists it).
    let mut reads: HashMap<usize, Vec<Option<TaskInstance>>> =
        finished.as_ref().map(|f| f.claimed.iter().cloned().collect()).unwrap_or_default();
    let mut claimed = Vec::new();
    for (n, candidate) in candidates.into_iter().enumerate() {
        match reads.remove(&n) {
            Some(then) => claimed
                .push(candidate.into_claimed(then.into_iter().flatten().filter(|t| t.state == TaskState::Pending))),
            None => drop(lock(&shared.running).remove(&candidate.key)),
        }
    }
    if finished?.applied {
        if !claimed.is_empty() {
            shared.config.metrics.eager.add(&[], claimed.len() as f64);
            fail_point!("worker::eager::after_claim");
            let mut update = status_update(shared, &done, &message.run_id);
            update.next = claimed.iter().map(|c| c.message.task_id.clone()).collect();
            let mut claimed = claimed.into_iter();
            let first = claimed.next().unwrap_or_else(|| unreachable!("claimed is not empty"));
            let others = claimed.zip(permits).collect();
            return Ok(Some(Next { first, others, update }));
        }
        fail_point!("worker::outcome::before_publish");
        publish_status(shared, &done, &message.run_id).await?;
    } else {
        // Already recorded by an earlier attempt of this loop, or the task moved on.
        let current = store.task(&message.run_id, &message.task_id).await?;
        match current {
            Some(current) if current.try_number == done.try_number && current.state == done.state => {
                publish_status(shared, &done, &message.run_id).await?;
            }
            _ => tracing::info!(
                run = %message.run_id, task = %message.task_id,
                "try outcome not recorded: the task moved on (cancelled or requeued)"
            ),
        }
    }
    Ok(None)
}

/// What a try that succeeded claimed: the try to run next in its slot, the others claimed with
/// slots of their own, and its status update (naming them), which is sent as they run.
struct Next {
    first: ClaimedTry,
    others: Vec<(ClaimedTry, tokio::sync::OwnedSemaphorePermit)>,
    update: StatusUpdate,
}

/// A downstream task made ready to claim as its upstream's outcome is written: registered
/// already, so a heartbeat written after the claim lists it.
struct EagerCandidate {
    key: TryKey,
    claim: EagerClaim,
    message: TaskToExec,
    resolved: Resolved,
    registered: Registered,
}

impl EagerCandidate {
    /// The candidate as the try this worker runs next, once the store claimed it, with the
    /// downstream tasks it may claim in turn (read in the same step).
    fn into_claimed(self, eager: impl Iterator<Item = TaskInstance>) -> ClaimedTry {
        self.registered.claimed.store(true, Ordering::SeqCst);
        ClaimedTry {
            key: self.key,
            message: self.message,
            running: self.claim.claimed,
            resolved: self.resolved,
            signal: self.registered.signal,
            reason: self.registered.reason,
            eager: eager.collect(),
        }
    }
}

/// Most downstream tasks a try offers to claim as it succeeds.
const EAGER_MAX_CANDIDATES: usize = 8;

/// Most upstream tasks of a task claimed eagerly (the store checks each of them).
const EAGER_MAX_UPSTREAMS: usize = 16;

/// The direct downstream tasks of `task_id` that this worker may claim eagerly as it succeeds:
/// those that run when all their upstreams succeed (the default rule), in a pool this worker
/// consumes, under no concurrency limit (limits are counted by the scheduler), with few
/// upstreams. A branch task's choice is the scheduler's to apply, so it offers none.
fn eager_candidates(shared: &Shared, dag: &dagmq_core::Dag, task_id: &str) -> Vec<String> {
    let Some(spec) = dag.task(task_id) else { return Vec::new() };
    if !shared.config.eager || spec.config.branch || dag.max_active_tasks.is_some() {
        return Vec::new();
    }
    dag.downstream_of(task_id)
        .into_iter()
        .filter_map(|id| dag.task(id))
        .filter(|d| {
            d.config.trigger_rule == TriggerRule::AllSuccess
                && d.config.pool.is_none()
                && d.config.max_active.is_none()
                && d.after.len() <= EAGER_MAX_UPSTREAMS
                && shared.config.queues.contains(&d.config.queue)
        })
        .take(EAGER_MAX_CANDIDATES)
        .map(|d| d.id.clone())
        .collect()
}

/// Makes each pending downstream task read at the claim a candidate: its next try as this
/// worker would claim it, resolved against the run's DAG version, and registered.
fn prepare_eager(shared: &Shared, message: &TaskToExec, eager: Vec<TaskInstance>) -> Vec<EagerCandidate> {
    let mut candidates = Vec::with_capacity(eager.len());
    let now = shared.config.clock.now();
    let run = shared.runs.lock().unwrap_or_else(|p| p.into_inner()).get(&message.run_id).cloned();
    let Some(run) = run else { return candidates };
    let Ok(dag) = dag_version(shared, &run.dag_id, run.dag_version.as_deref()) else { return candidates };
    for expected in eager {
        let claimed = expected.next_try(now).claimed_by(&claimant(shared));
        let next = TaskToExec {
            task_id: expected.task_id.clone(),
            try_number: claimed.try_number,
            max_try: claimed.max_try,
            follow_up: None,
            ..message.clone()
        };
        let Ok(resolved) = resolve(shared, &next, run.dag_version.as_deref()) else { continue };
        let key = (next.run_id.clone(), next.task_id.clone(), next.try_number);
        let Some(registered) = register(shared, &key) else { continue };
        let then = eager_candidates(shared, &dag, &expected.task_id);
        let claim = EagerClaim { expected, claimed, then };
        candidates.push(EagerCandidate { key, claim, message: next, resolved, registered });
    }
    candidates
}

/// Finds what the message asks to run among this worker's DAGs and registered tasks; anything
/// else is refused, so a message can never make a worker run something unregistered.
fn resolve(shared: &Shared, message: &TaskToExec, version: Option<&str>) -> Result<Resolved, String> {
    let dag = dag_version(shared, &message.dag_id, version)?;
    if let Some(follow_up) = &message.follow_up {
        let task = shared.config.tasks.build(&follow_up.run, &follow_up.args)?;
        return Ok(Resolved { executable: Executable::Rust(task, follow_up.args.clone()), branch: None });
    }
    let Some(spec) = dag.task(&message.task_id) else {
        return Err(format!("dag {:?} has no task {:?}", message.dag_id, message.task_id));
    };
    let executable = match &spec.kind {
        TaskKind::Command(argv) => Executable::Command(argv.clone()),
        TaskKind::Rust { task, .. } => Executable::Rust(task.clone(), spec.args.clone()),
    };
    let branch = spec.config.branch.then(|| dag.downstream_of(&spec.id).into_iter().map(str::to_string).collect());
    Ok(Resolved { executable, branch })
}

/// The definition of `dag_id` a run created with `version` completes with: that version, which
/// this worker must have loaded (now or before a reload). A worker never runs another one.
fn dag_version(shared: &Shared, dag_id: &str, version: Option<&str>) -> Result<Arc<dagmq_core::Dag>, String> {
    let current = shared.live.current().get(dag_id).cloned();
    let Some(version) = version else {
        return current.ok_or_else(|| format!("worker {:?} does not know dag {dag_id:?}", shared.config.name));
    };
    if let Some(dag) = shared.live.version(dag_id, version) {
        return Ok(dag);
    }
    match current {
        None => Err(format!("worker {:?} does not know dag {dag_id:?}", shared.config.name)),
        Some(dag) => Err(format!(
            "worker {:?} has not loaded version {version} of dag {dag_id:?}, which the run was created with (it has \
             version {}); the DAG file changed, and a worker runs only a definition it loaded",
            shared.config.name, dag.version
        )),
    }
}

/// The longest wait between reads of upstream outputs from a store that does not answer
/// (100 ms doubling: 9 reads over about 25 s).
const INPUT_READ_BACKOFF_MAX: Duration = Duration::from_millis(12_800);

/// Reads other tasks' outputs from the store, for a try that asks.
struct StoreOutputs(Arc<dyn dagmq_core::Store>);

#[async_trait::async_trait]
impl dagmq_core::task::OutputSource for StoreOutputs {
    async fn outputs(
        &self,
        run_id: &str,
        task_ids: &[String],
    ) -> Result<std::collections::BTreeMap<String, Option<serde_json::Value>>, String> {
        let ids: Vec<&str> = task_ids.iter().map(String::as_str).collect();
        // A store that does not answer is not the task's fault: wait for it (about 30 s in
        // all) before the try fails, so a short outage does not use up a retry.
        let mut delay = Duration::from_millis(100);
        let tasks = loop {
            match self.0.tasks_by_id(run_id, &ids).await {
                Ok(tasks) => break tasks,
                Err(err) if delay <= INPUT_READ_BACKOFF_MAX => {
                    tracing::warn!(run = %run_id, "reading upstream outputs: {err}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(err) => return Err(format!("reading upstream outputs: {err}")),
            }
        };
        Ok(task_ids.iter().cloned().zip(tasks.into_iter().map(|t| t.and_then(|t| t.output))).collect())
    }
}

/// Refuses follow-ups that no worker could run or that do not form a graph.
fn check_follow_ups(shared: &Shared, follow_ups: &[FollowUp]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for f in follow_ups {
        dagmq_core::dag::check_id(&f.id).map_err(|e| format!("follow-up id: {e}"))?;
        if !shared.config.tasks.contains(&f.run) {
            return Err(format!("follow-up {:?}: unknown task {:?}", f.id, f.run));
        }
        if let Some(up) = f.after.iter().find(|a| !seen.contains(a.as_str())) {
            return Err(format!("follow-up {:?}: waits for {up:?}, which is not an earlier follow-up", f.id));
        }
        if !seen.insert(f.id.as_str()) {
            return Err(format!("follow-up id {:?} repeated", f.id));
        }
    }
    Ok(())
}

/// Runs one try to its end: success, failure, panic, timeout or stop. Answers the result and
/// why it was stopped, if it was.
async fn run_try(
    shared: &Shared,
    message: &TaskToExec,
    upstream: Arc<[String]>,
    executable: Executable,
    signal: CancelSignal,
    reason: Arc<AtomicU8>,
) -> (Result<TaskOutcome, TaskError>, StopReason) {
    let key = (message.run_id.clone(), message.task_id.clone(), message.try_number);

    let (sink, flusher) = log_sink::start(
        shared.store.clone(),
        message.run_id.clone(),
        message.task_id.clone(),
        message.try_number,
        dagmq_core::task::secret_values(&message.params),
    );
    let try_itself = async {
        let timeout = shared
            .config
            .dags
            .get(&message.dag_id)
            .and_then(|dag| dag.task(&message.task_id))
            .and_then(|spec| spec.config.timeout)
            .filter(|_| message.follow_up.is_none());
        let (args, logical_date) = (
            match &executable {
                Executable::Rust(_, args) => args.clone(),
                Executable::Command(_) => serde_json::Value::Null,
            },
            message.logical_date.to_rfc3339(),
        );
        let ctx = TaskContext::new(
            message.run_id.clone(),
            message.dag_id.clone(),
            message.task_id.clone(),
            message.try_number,
            message.params.clone(),
            args,
            Arc::new(sink.clone()),
            Arc::new(sink.clone()),
            signal.clone(),
        )
        .with_outputs(upstream, Arc::new(StoreOutputs(shared.store.clone())));
        // Polled here, not spawned: one task less per try; a panic is caught at the poll.
        let mut running = CatchPanic(match executable {
            Executable::Rust(task, _) => Box::pin(async move { task.run(ctx).await }),
            Executable::Command(argv) => Box::pin(async move { run_command(&argv, ctx, &logical_date).await }),
        });
        let timed_out = async {
            match timeout {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let joined = tokio::select! {
            joined = &mut running => Some(joined),
            _ = timed_out => {
                reason.store(StopReason::Timeout as u8, Ordering::SeqCst);
                if let Some(handle) = lock(&shared.running).get(&key) {
                    handle.cancel.cancel();
                }
                None
            }
            _ = signal.cancelled() => None,
        };
        // A stopped try gets a grace period to wind down; then it is dropped (aborted). A
        // fenced one gets less, so it has surely stopped before the scheduler can take the
        // worker for lost.
        let joined = match joined {
            Some(joined) => Some(joined),
            None => {
                let grace = if StopReason::from_u8(reason.load(Ordering::SeqCst)) == StopReason::Fenced {
                    FENCED_STOP_GRACE
                } else {
                    STOP_GRACE
                };
                tokio::time::timeout(grace, &mut running).await.ok()
            }
        };
        drop(running);
        let stop = StopReason::from_u8(reason.load(Ordering::SeqCst));
        let result = match (stop, joined) {
            (StopReason::Timeout, _) => {
                let limit = dagmq_core::duration::format_duration(timeout.unwrap_or_default());
                Err(TaskError::new(format!("timed out after {limit}")))
            }
            (StopReason::Cancelled, _) => Err(TaskError::fatal("cancelled")),
            (StopReason::Superseded, _) => {
                Err(TaskError::fatal("stopped: the store no longer has this try running here"))
            }
            (StopReason::Fenced, _) => Err(TaskError::new("stopped: the worker could not reach the store")),
            (_, Some(Ok(result))) => result,
            (_, Some(Err(panic))) => Err(TaskError::new(format!("task panicked: {panic}"))),
            (_, None) => Err(TaskError::new("task aborted")),
        };
        if let Err(error) = &result {
            dagmq_core::task::LogSink::line(&sink, format!("[dagmq] try {} failed: {error}", message.try_number));
        }
        drop(sink);
        (result, stop)
    };
    let ((result, stop), ()) = tokio::join!(try_itself, flusher);
    (result, stop)
}

/// The status update that tells the scheduler a try changed state.
fn status_update(shared: &Shared, task: &TaskInstance, run_id: &str) -> StatusUpdate {
    StatusUpdate {
        v: VERSION,
        run_id: run_id.to_string(),
        task_id: task.task_id.clone(),
        try_number: task.try_number,
        state: task.state,
        worker: Some(shared.config.name.clone()),
        error: task.error.clone(),
        next: Vec::new(),
    }
}

/// Tells the scheduler that a try changed state; returns once the queue has it durably.
async fn publish_status(shared: &Shared, task: &TaskInstance, run_id: &str) -> Result<(), BackendError> {
    shared.status.send(&status_update(shared, task, run_id)).await
}

/// Sends a status update, trying again with backoff until the queue takes it: the outcome is
/// in the store already, and the update is what wakes the scheduler up sooner than its sweep.
async fn publish_status_until_sent(shared: Arc<Shared>, update: StatusUpdate) {
    let mut delay = Duration::from_millis(100);
    while let Err(err) = shared.status.send(&update).await {
        tracing::error!(run = %update.run_id, task = %update.task_id, "publishing a status update: {err}; retrying in {delay:?}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
