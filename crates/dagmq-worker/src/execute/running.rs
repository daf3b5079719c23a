//! The tries running on this worker: the registry the heartbeat lists (a try is registered
//! before its claim), and stopping tries: those a control broadcast names (`control_loop`),
//! those the store no longer has running here, checked at every heartbeat (`stop_superseded`),
//! or all at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dagmq_core::messages::{self, Control, StoppedTry};
use dagmq_core::records::RunningTry;
use dagmq_core::task::CancelHandle;
use dagmq_core::{BackendError, CancelSignal, Subscription, TaskState};

use crate::Shared;

use super::Registered;

/// Tries running on this worker, by (run, task, try).
pub(crate) type RunningTries = Arc<Mutex<HashMap<TryKey, TryHandle>>>;

/// A try: (run, task, try number).
pub(crate) type TryKey = (String, String, u32);

/// How to stop one running try, and why it was stopped. A try is registered before its
/// claim, so every heartbeat written after the claim lists it, and leaves once its outcome is
/// recorded.
pub(crate) struct TryHandle {
    /// Fires the try's cancellation signal.
    pub(super) cancel: CancelHandle,
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
    pub(super) fn from_u8(value: u8) -> StopReason {
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

/// How long a stopped try may take to wind down before it is aborted.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long a try stopped by self-fencing may take to wind down before it is aborted.
pub(crate) const FENCED_STOP_GRACE: Duration = Duration::from_secs(5);

pub(super) fn lock(running: &RunningTries) -> MutexGuard<'_, HashMap<TryKey, TryHandle>> {
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

/// Stops every running try; answers how many.
pub(crate) fn stop_all(shared: &Shared, reason: StopReason) -> usize {
    let running = lock(&shared.running);
    for handle in running.values() {
        handle.reason.store(reason as u8, Ordering::SeqCst);
        handle.cancel.cancel();
    }
    running.len()
}

/// Stops the tries that the store no longer has `running` on this worker instance: a cancel
/// whose broadcast this worker missed, or a try requeued elsewhere. Called after every
/// heartbeat, so a cancel reaches every running try within a heartbeat interval from the
/// store. Answers how many were stopped.
pub(crate) async fn stop_superseded(shared: &Shared) -> Result<usize, BackendError> {
    stop_superseded_in(shared, |_| true).await
}

/// [`stop_superseded`] for the tries of the runs that `in_run` accepts.
async fn stop_superseded_in(shared: &Shared, in_run: impl Fn(&str) -> bool) -> Result<usize, BackendError> {
    let mut by_run: HashMap<String, Vec<(String, u32)>> = HashMap::new();
    for ((run_id, task_id, try_number), handle) in lock(&shared.running).iter() {
        if handle.claimed.load(Ordering::SeqCst) && in_run(run_id) {
            by_run.entry(run_id.clone()).or_default().push((task_id.clone(), *try_number));
        }
    }
    let mut stopped = 0;
    // A run whose tasks cannot be read must not keep the others' tries from being checked:
    // every run is checked, and the first error is answered after.
    let mut failed = None;
    for (run_id, tries) in by_run {
        let ids: Vec<&str> = tries.iter().map(|(task_id, _)| task_id.as_str()).collect();
        let found = match shared.store.tasks_by_id(&run_id, &ids).await {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(run = %run_id, "reading the tries of the run to check them: {err}");
                failed.get_or_insert(err);
                continue;
            }
        };
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
    match failed {
        Some(err) => Err(err),
        None => Ok(stopped),
    }
}

/// Stops the tries of `run_id` that a stop broadcast names, whether their claim's answer is
/// back or not (a try stopped before it starts never starts); any other try of the run (a
/// later try of a resumed or restarted run) runs on. Answers how many were stopped.
fn stop_named(shared: &Shared, run_id: &str, tries: &[StoppedTry]) -> usize {
    let running = lock(&shared.running);
    let mut stopped = 0;
    for named in tries {
        let key = (run_id.to_string(), named.task_id.clone(), named.try_number);
        if let Some(handle) = running.get(&key)
            && StopReason::from_u8(handle.reason.load(Ordering::SeqCst)) == StopReason::None
        {
            handle.reason.store(StopReason::Cancelled as u8, Ordering::SeqCst);
            handle.cancel.cancel();
            stopped += 1;
        }
    }
    stopped
}

/// Listens for control broadcasts (run cancelled or suspended) and stops the affected tries.
///
/// A broadcast may arrive late: to a worker that was frozen when it was sent, after the run
/// was resumed or restarted and this worker claimed a new try of it. It names the tries the
/// scheduler stopped, by try number: those stop at once, with no store call, whether their
/// claim's answer is back or not, and a new try runs on. A broadcast without the list (from an
/// older scheduler) prompts the heartbeat's check for that run's tries instead: those the store
/// no longer has running here stop; should the store not answer, the next heartbeat's check
/// stops them.
pub(crate) async fn control_loop(shared: Arc<Shared>, shutdown: CancelSignal) {
    let mut subscription = Subscription::broadcasts(shared.queue.clone());
    let limit = shared.config.heartbeat_interval / 2;
    while let Some(delivery) = subscription.next(&shutdown).await {
        match messages::decode::<Control>(&delivery.payload) {
            Ok(Control::CancelRun { run_id, tries: Some(tries), .. }) => {
                let count = stop_named(&shared, &run_id, &tries);
                if count > 0 {
                    tracing::info!(run = %run_id, count, "stopped tries of a cancelled or suspended run");
                }
            }
            Ok(Control::CancelRun { run_id, tries: None, .. }) => {
                match tokio::time::timeout(limit, stop_superseded_in(&shared, |r| r == run_id)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(count)) => {
                        tracing::info!(run = %run_id, count, "stopped tries of a cancelled or suspended run")
                    }
                    Ok(Err(err)) => tracing::warn!(
                        run = %run_id,
                        "checking the tries of a cancelled or suspended run with the store: {err}; the next \
                         heartbeat checks them again"
                    ),
                    Err(_) => tracing::warn!(
                        run = %run_id,
                        "checking the tries of a cancelled or suspended run with the store: no answer within \
                         {limit:?}; the next heartbeat checks them again"
                    ),
                }
            }
            Err(err) => tracing::warn!("ignoring a control message: {err}"),
        }
        let _ = delivery.ack().await;
    }
}

/// Registers a try before its claim, so every heartbeat written after the claim lists it;
/// `None` when this try is registered already (a duplicate delivery being handled here).
pub(super) fn register(shared: &Shared, key: &TryKey) -> Option<Registered> {
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
