//! One delivery from decoding to the try's outcome: claim the try with a compare-and-set,
//! acknowledge the message while the try starts, run it, write the outcome, publish the status
//! update.
//!
//! The delivery itself is here; the rest lives in a file per step: `running` (the tries running
//! here and stopping them), `claim` (the claim and resolving what runs), `run_try` (running a try
//! to its end), `outcome` (writing and publishing its outcome), `eager` (the downstream tries a
//! success claims and runs at once), `next` (the slot's next message, claimed with the outcome
//! of the try that gives the slot back) and `version` (a try of a DAG version not loaded here
//! yet).

mod claim;
mod eager;
mod next;
mod outcome;
mod run_try;
mod running;
mod version;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dagmq_core::fail_point;
use dagmq_core::messages::{self, TaskToExec};
use dagmq_core::trace::{TRACEPARENT_HEADER, TraceParent};
use dagmq_core::{BackendError, CancelSignal, Delivery, Task, TaskInstance};

use crate::Shared;
use claim::{Claim, Settle, Won, claim};
use eager::run_claimed;
use next::Taken;
pub(crate) use running::{RunningTries, StopReason, control_loop, running_tries, stop_all, stop_superseded};
use running::{TryKey, lock, register};

/// What a message asks to run.
enum Executable {
    /// A Rust task with its args.
    Rust(Arc<dyn Task>, serde_json::Value),
    /// A process.
    Command(crate::command::CommandSpec),
}

/// A claimed try's task, resolved once at the claim against the DAG version of its run.
struct Resolved {
    /// What runs.
    executable: Executable,
    /// For a branch task: the direct downstream tasks its output must choose among.
    branch: Option<Vec<String>>,
    /// How long the try may run before it is stopped, as the run's DAG version says (a
    /// follow-up has none).
    timeout: Option<Duration>,
}

/// Handles one delivery; never fails: whatever goes wrong costs this message only.
///
/// The message is acknowledged as soon as the try is claimed (`running` in the store, with this
/// worker's name): from then on the store and this worker's heartbeat carry the try, so a try
/// longer than the broker's consumer timeout is never redelivered, and a lost worker's tries
/// are requeued by the scheduler.
///
/// `free_since` is when the slot this delivery runs in became free (for the work waiting
/// metric).
pub(crate) async fn execute(shared: &Arc<Shared>, delivery: Delivery, free_since: DateTime<Utc>) {
    let next = handle(shared, delivery, free_since, None).await;
    run_claimed(shared, next).await;
}

/// Handles one delivery in a slot, as [`execute`] does, up to its claim; answers what the slot
/// runs next (the try claimed, whose message is acknowledged as it starts). `taken`: the delivery's try is registered already, by a slot that took it
/// as its try ended and whose call that claimed it with that try's outcome was answered with an
/// error (the claim is unknown: it may have applied).
async fn handle(
    shared: &Arc<Shared>,
    delivery: Delivery,
    free_since: DateTime<Utc>,
    taken: Option<Taken>,
) -> Option<eager::Next> {
    let message: TaskToExec = match messages::decode(&delivery.payload) {
        Ok(message) => message,
        Err(err) => {
            shared.config.metrics.dead_lettered.inc(&[err.label()]);
            settle(delivery.dead_letter(&format!("task: {err}")).await);
            return None;
        }
    };
    let key = (message.run_id.clone(), message.task_id.clone(), message.try_number);
    let (registered, first_sent) = match taken {
        Some(Taken { registered, sent }) => (Some(registered), sent),
        None => (register(shared, &key), tokio::time::Instant::now()),
    };
    let Some(Registered { signal, reason, claimed }) = registered else {
        // Another delivery of this very try is being handled here: this one is a duplicate.
        shared.config.metrics.duplicates.inc(&[]);
        settle(delivery.ack().await);
        return None;
    };
    // Out of touch with the store (no heartbeat written for half the worker timeout), a claim
    // could not start its try: wait for contact, and leave the message to other workers if it
    // does not come back within the worker timeout (or the worker stops first).
    let in_touch = shared.contact.in_touch()
        || tokio::select! {
            in_touch = shared.contact.wait_in_touch(shared.config.worker_timeout, &signal) => in_touch,
            _ = shared.shutdown.cancelled() => false,
        };
    if !in_touch {
        lock(&shared.running).remove(&key);
        tracing::warn!(
            run = %message.run_id, task = %message.task_id, try_number = message.try_number,
            "no heartbeat reached the store for {:?}: leaving the try, unclaimed, to another worker",
            shared.contact.silent_for()
        );
        fail_point!("worker::claim::out_of_touch");
        settle(delivery.requeue().await);
        return None;
    }
    // A store that does not answer must not turn the message into a dead letter (a requeue
    // counts against the broker's delivery limit): keep it and try again with backoff.
    let mut delay = Duration::from_millis(100);
    let claimed_try = loop {
        match claim(shared, &message, &signal, first_sent).await {
            Ok(claim) => break claim,
            Err(err) => {
                if signal.is_cancelled() {
                    lock(&shared.running).remove(&key);
                    settle(delivery.requeue().await);
                    return None;
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
        Claim::Settle(how) => {
            settle_unclaimed(shared, &key, &message, delivery, how).await;
            None
        }
        Claim::Run(won) => {
            fail_point!("worker::claim::before_ack");
            claimed.store(true, Ordering::SeqCst);
            // The try is ours: the slot runs it next, while the ack is on its way.
            Some(eager::Next::Claimed {
                first: ClaimedTry::won(key, &delivery, *won, signal, reason, free_since),
                delivery,
            })
        }
    }
}

/// Settles a delivery whose try this worker did not claim (`how`), and forgets the try.
async fn settle_unclaimed(shared: &Shared, key: &TryKey, message: &TaskToExec, delivery: Delivery, how: Settle) {
    lock(&shared.running).remove(key);
    match how {
        Settle::Ack => settle(delivery.ack().await),
        Settle::PutBack(why) => {
            shared.config.metrics.version_not_loaded.inc(&[]);
            // The message comes back every few seconds while no other worker takes it.
            if shared.quiet.due(&why) {
                tracing::warn!(
                    run = %message.run_id, task = %message.task_id, try_number = message.try_number,
                    "{why} (its dag directory was read again): leaving the try, unclaimed, to another worker \
                     (said again in {} at the earliest)", dagmq_core::duration::format_duration(crate::quiet::QUIET_FOR)
                );
            } else {
                tracing::debug!(run = %message.run_id, task = %message.task_id, "{why}: left to another worker again");
            }
            fail_point!("worker::version::before_put_back");
            settle(delivery.requeue().await)
        }
        Settle::DeadLetter(reason) => {
            shared.config.metrics.dead_lettered.inc(&[if reason.contains("has no task") {
                "unknown_task"
            } else {
                "unresolvable"
            }]);
            tracing::warn!(run = %message.run_id, task = %message.task_id, "dead-lettering: {reason}");
            settle(delivery.dead_letter(&reason).await)
        }
    }
}

/// A try registered on this worker: how it is stopped and whether its claim applied.
struct Registered {
    signal: CancelSignal,
    reason: Arc<AtomicU8>,
    claimed: Arc<AtomicBool>,
}

/// A try this worker holds `running` in the store, ready to run.
struct ClaimedTry {
    /// (run, task, try), its entry among the running tries.
    key: TryKey,
    /// The span the try's span is a child of: its message's `traceparent`, or its run's root
    /// span (see [`dagmq_core::trace`]).
    parent: TraceParent,
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
    /// When the store call that claimed the try was sent: the try is this worker's since then
    /// at the latest, and must not start if the scheduler may have taken the worker for lost
    /// since (`Contact::in_touch_since`).
    claimed_since: tokio::time::Instant,
    /// For a try from a task message, when the slot it runs in became free (the work waiting
    /// metric counts from then, or from its queueing if later); none for an eager try.
    free_since: Option<DateTime<Utc>>,
}

impl ClaimedTry {
    /// The try of `delivery` that a claim made this worker's (`won`), stopped through `signal`
    /// (`reason` says why), run in a slot free since `free_since`. Its span's parent is the
    /// message's `traceparent` (or its run's root span).
    fn won(
        key: TryKey,
        delivery: &Delivery,
        won: Won,
        signal: CancelSignal,
        reason: Arc<AtomicU8>,
        free_since: DateTime<Utc>,
    ) -> ClaimedTry {
        let Won { running, resolved, message, eager, claimed_since } = won;
        let parent = TraceParent::of_message(delivery.header(TRACEPARENT_HEADER), &message.run_id);
        ClaimedTry {
            key,
            parent,
            message,
            running,
            resolved,
            signal,
            reason,
            eager,
            claimed_since,
            free_since: Some(free_since),
        }
    }
}

/// Logs a failure to settle a delivery; the queue redelivers it and the claim dedupes.
fn settle(result: Result<(), BackendError>) {
    if let Err(err) = result {
        tracing::error!("settling a delivery: {err}");
    }
}
