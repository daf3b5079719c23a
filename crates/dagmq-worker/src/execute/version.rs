//! A try of a DAG version this worker has not loaded (yet). Each process reads its DAG directory
//! on its own, so the scheduler may create a run of a changed file's new version before this
//! worker has read the file. Such a try is not claimed: the worker asks its reloader to read the
//! directory now and waits a few seconds for the version; if it does not come, the message goes
//! back to the queue, for another worker that has the version or for this one later. No try is
//! used up, and no retry. Only a try still waiting [`crate::WorkerConfig::dag_version_wait`]
//! after it was queued is claimed and failed, as one of a version that no worker has.

use std::time::Duration;

use dagmq_core::messages::TaskToExec;
use dagmq_core::{BackendError, CancelSignal, RunRecord, TaskState};

use crate::Shared;

use super::claim::dag_version;

/// How long one delivery waits for its version (the reload it asks for, and the periodic reads
/// after it) before its message goes back to the queue.
pub(super) const VERSION_WAIT: Duration = Duration::from_secs(5);

/// What came of waiting for a run's DAG version.
pub(super) enum Waited {
    /// The version is loaded now (or the try is ours already): claim it as usual.
    Loaded,
    /// The message names a try that is no longer waiting for a worker: a duplicate or stale.
    Stale,
    /// The version did not come (or the worker is stopping): put the message back, unclaimed.
    PutBack,
    /// The try has waited longer than the worker may leave it: claim it and fail it, saying so.
    GiveUp(chrono::Duration),
}

/// Waits for the DAG version of `run`, which this worker has not loaded, at most
/// [`VERSION_WAIT`] (less when `signal` fires or the worker stops). One store read first: a
/// message whose try no longer waits for a worker waits for nothing.
pub(super) async fn wait_for_version(
    shared: &Shared,
    message: &TaskToExec,
    run: &RunRecord,
    signal: &CancelSignal,
) -> Result<Waited, BackendError> {
    let Some(task) = shared.store.task(&message.run_id, &message.task_id).await? else {
        // The claim finds no task either, and sets the message aside.
        return Ok(Waited::Loaded);
    };
    if task.try_number != message.try_number {
        return Ok(Waited::Stale);
    }
    let ours = task.state == TaskState::Running && task.worker_instance.as_deref() == Some(shared.instance.as_str());
    match task.state {
        // A claim of this delivery's whose answer was lost: the claim finds it ours again.
        TaskState::Running if ours => return Ok(Waited::Loaded),
        TaskState::Queued => {}
        _ => return Ok(Waited::Stale),
    }
    let waited = task.queued_at.map_or(chrono::Duration::zero(), |at| shared.config.clock.now() - at);
    if waited >= chrono::Duration::from_std(shared.config.dag_version_wait).unwrap_or(chrono::Duration::MAX) {
        return Ok(Waited::GiveUp(waited));
    }
    // Taken before the first look, so that no read between the look and the wait is missed.
    let mut reads = shared.live.reads();
    shared.live.request_read();
    let deadline = tokio::time::Instant::now() + VERSION_WAIT;
    loop {
        if dag_version(shared, &run.dag_id, run.dag_version.as_deref()).is_ok() {
            return Ok(Waited::Loaded);
        }
        tokio::select! {
            changed = reads.changed() => if changed.is_err() { return Ok(Waited::PutBack) },
            _ = tokio::time::sleep_until(deadline) => return Ok(Waited::PutBack),
            _ = signal.cancelled() => return Ok(Waited::PutBack),
            _ = shared.shutdown.cancelled() => return Ok(Waited::PutBack),
        }
    }
}
