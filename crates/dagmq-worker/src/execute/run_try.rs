//! Running one try to its end: the task's future polled in place with panics caught, its
//! timeout and stop with a grace period, its logs, and the outputs of other tasks read from the
//! store when the try asks.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use dagmq_core::messages::TaskToExec;
use dagmq_core::{CancelSignal, TaskContext, TaskError, TaskOutcome};

use crate::Shared;
use crate::command::run_command;
use crate::log_sink;

use super::Executable;
use super::running::{FENCED_STOP_GRACE, STOP_GRACE, StopReason, lock};

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

/// Runs one try to its end: success, failure, panic, timeout or stop. Answers the result, why
/// it was stopped, if it was, and the last lines of its log (for a failure's record). `timeout` is the task's, from the run's DAG version (never
/// from whatever this worker loaded at start).
pub(super) async fn run_try(
    shared: &Shared,
    message: &TaskToExec,
    upstream: Arc<[String]>,
    executable: Executable,
    timeout: Option<Duration>,
    signal: CancelSignal,
    reason: Arc<AtomicU8>,
) -> (Result<TaskOutcome, TaskError>, StopReason, Vec<String>) {
    let key = (message.run_id.clone(), message.task_id.clone(), message.try_number);

    let (sink, flusher) = log_sink::start(
        shared.store.clone(),
        message.run_id.clone(),
        message.task_id.clone(),
        message.try_number,
        dagmq_core::task::secret_values(&message.params),
    );
    let try_itself = async {
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
            Executable::Command(command) => Box::pin(async move { run_command(&command, ctx, &logical_date).await }),
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
        let result = match (stop_error(stop, timeout), joined) {
            (Some(error), _) => Err(error),
            (None, Some(Ok(result))) => result,
            (None, Some(Err(panic))) => Err(TaskError::new(format!("task panicked: {panic}"))),
            (None, None) => Err(TaskError::new("task aborted")),
        };
        if let Err(error) = &result {
            // A try stopped from outside (a cancel, a shutdown, a try taken over) did not fail.
            let how = if matches!(stop, StopReason::None | StopReason::Timeout) { "failed" } else { "stopped" };
            dagmq_core::task::LogSink::line(&sink, format!("[dagmq] try {} {how}: {error}", message.try_number));
        }
        let tail = sink.tail();
        drop(sink);
        (result, stop, tail)
    };
    let ((result, stop, tail), ()) = tokio::join!(try_itself, flusher);
    (result, stop, tail)
}

/// The error a try stopped for `stop` ends with, whatever it returned while it wound down; `None`
/// when the stop keeps what the try returned (an interrupted try is requeued either way).
pub(super) fn stop_error(stop: StopReason, timeout: Option<Duration>) -> Option<TaskError> {
    match stop {
        StopReason::Timeout => {
            let limit = dagmq_core::duration::format_duration(timeout.unwrap_or_default());
            Some(TaskError::new(format!("timed out after {limit}")))
        }
        StopReason::Cancelled => Some(TaskError::fatal("cancelled")),
        StopReason::Superseded => Some(TaskError::fatal("stopped: the store no longer has this try running here")),
        StopReason::Fenced => Some(TaskError::new("stopped: the worker could not reach the store")),
        StopReason::Interrupted | StopReason::None => None,
    }
}
