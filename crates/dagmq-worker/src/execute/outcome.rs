//! A try's outcome: written to the store (with the eager claims of a success) and published as a
//! status update, each retried until it is taken, since the message is acknowledged already.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dagmq_core::fail_point;
use dagmq_core::messages::{self, StatusUpdate, TaskToExec, VERSION};
use dagmq_core::records::cut_error;
use dagmq_core::store::{EagerClaim, NextClaim};
use dagmq_core::trace::{FinishedSpan, SpanValue, TRACEPARENT_HEADER, TraceParent, new_span_id};
use dagmq_core::{BackendError, FollowUp, RunState, TaskError, TaskInstance, TaskOutcome, TaskState, Topic};

use crate::Shared;

use super::claim::{Claim, claim_answered, claimant};
use super::eager::{Next, prepare_eager};
use super::next::{After, Claimable, Taken, TakenMessage, take_next};
use super::run_try::{run_try, stop_error};
use super::running::{StopReason, lock};
use super::{ClaimedTry, Resolved, settle_unclaimed};

/// Runs a claimed try and records its outcome, retrying the store and queue until they answer:
/// the message is acknowledged already, so the outcome must not be dropped. Answers the
/// downstream tries claimed as this one succeeded, if any, with this try's status update, which
/// is sent while they run.
pub(super) async fn finish(shared: &Arc<Shared>, claimed: ClaimedTry) -> Option<Next> {
    let ClaimedTry {
        key,
        parent,
        message,
        mut running,
        resolved,
        signal,
        reason,
        mut eager,
        claimed_since,
        free_since,
    } = claimed;
    let message = &message;
    let Resolved { executable, branch, timeout } = resolved;
    // A try stopped before it starts (cancelled, fenced) never starts; nor does one claimed
    // before a silence long enough for the scheduler to take this worker for lost and requeue
    // the try elsewhere (the process frozen, or the store out of reach, between the claim and
    // now). Its outcome is recorded as for any stopped try, and refused if the try moved on.
    let stopped_before = if signal.is_cancelled() {
        Some(StopReason::from_u8(reason.load(Ordering::SeqCst)))
    } else if !shared.contact.in_touch_since(claimed_since) {
        tracing::warn!(
            run = %message.run_id, task = %message.task_id, try_number = running.try_number,
            "not starting the try: no heartbeat reached the store for long enough since its claim that the \
             scheduler may have requeued it"
        );
        fail_point!("worker::start::out_of_touch");
        reason.store(StopReason::Fenced as u8, Ordering::SeqCst);
        Some(StopReason::Fenced)
    } else {
        None
    };
    let (result, reason, tail) = match stopped_before {
        Some(stop) => {
            shared.config.metrics.tries.inc(&["not_started"]);
            (
                Err(stop_error(stop, timeout).unwrap_or_else(|| TaskError::new("stopped before it started"))),
                stop,
                Vec::new(),
            )
        }
        None => {
            // The try starts now (the claim's time is when it was claimed); the outcome
            // records this.
            let started_at = shared.config.clock.now();
            running.started_at = Some(started_at);
            if let Some(free_since) = free_since {
                let waiting_since = running.queued_at.map_or(free_since, |queued| queued.max(free_since));
                let waited = (started_at - waiting_since).to_std().unwrap_or_default();
                shared.config.metrics.work_waiting.observe(&[], waited.as_secs_f64());
            }
            shared.config.metrics.running.add(&[], 1.0);
            let ran = run_try(shared, message, running.after.clone(), executable, timeout, signal, reason).await;
            shared.config.metrics.running.add(&[], -1.0);
            ran
        }
    };
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
    let outcome = match (&result, reason) {
        _ if stopped_before.is_some() => None,
        (_, StopReason::Interrupted | StopReason::Fenced) => Some("interrupted"),
        (_, StopReason::Superseded) => Some("superseded"),
        (Ok(_), _) => Some("success"),
        (Err(e), _) if e.retryable && running.try_number < running.max_try => Some("up_for_retry"),
        (Err(_), _) => Some("failed"),
    };
    if let Some(outcome) = outcome {
        shared.config.metrics.tries.inc(&[outcome]);
    }
    // The try's span ends here: before its outcome is written, so before its run can end.
    let ended = shared.config.clock.now();
    let mut delay = Duration::from_millis(100);
    let mut after = After::default();
    let next = loop {
        match record_outcome(shared, message, parent, &running, &result, &tail, reason, &mut eager, &mut after).await {
            Ok(next) => break next,
            Err(err) => {
                tracing::error!(run = %message.run_id, task = %message.task_id, "recording the outcome: {err}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    lock(&shared.running).remove(&key);
    if let Some(spans) = &shared.config.spans {
        let state = outcome.unwrap_or("not_started");
        spans.record(try_span(shared, message, &running, parent, (state, ended), result.as_ref().err()));
    }
    // Eager tries are claimed only when the slot took no message, and the other way round.
    match (next, after) {
        (Some(next), _) => Some(next),
        (None, After { claimed: Some((first, delivery)), .. }) => Some(Next::Claimed { first, delivery }),
        (None, After { handle: Some((delivery, taken)), .. }) => {
            Some(Next::Delivery { delivery, taken, free_since: shared.config.clock.now() })
        }
        (None, _) => None,
    }
}

/// The span of a finished try: a child of `parent` (its run's root span), from its start (or
/// its end, for a try that never started) to `end`, when it ended in `state`.
fn try_span(
    shared: &Shared,
    message: &TaskToExec,
    running: &TaskInstance,
    parent: TraceParent,
    (state, end): (&str, chrono::DateTime<chrono::Utc>),
    error: Option<&TaskError>,
) -> FinishedSpan {
    let start = running.started_at.unwrap_or(end).min(end);
    FinishedSpan {
        trace_id: parent.trace_id,
        span_id: new_span_id(),
        parent_span_id: Some(parent.span_id),
        name: format!("try {}", message.task_id),
        start,
        end,
        attributes: vec![
            ("dagmq.dag_id", SpanValue::Str(message.dag_id.clone())),
            ("dagmq.run_id", SpanValue::Str(message.run_id.clone())),
            ("dagmq.task_id", SpanValue::Str(message.task_id.clone())),
            ("dagmq.try_number", SpanValue::Int(i64::from(running.try_number))),
            ("dagmq.worker", SpanValue::Str(shared.config.name.clone())),
            ("dagmq.state", SpanValue::Str(state.to_string())),
        ],
        error: match error {
            Some(error) if state != "success" => Some(cut_error(error.message.clone())),
            _ => None,
        },
    }
}

/// Writes a finished try's outcome (or its requeue, when interrupted) and tells the scheduler.
/// A success claims, in the same store step, the `eager` downstream tasks that it made ready
/// (as many as it has slots for; taken on the first attempt only); those tries are answered,
/// with the status update the caller then sends. Otherwise, on the first attempt, the slot takes
/// its next message if its pool's consumer holds one (`next`): its try is claimed in the same
/// store call as the outcome, if it can be, and kept in `after` either way.
#[allow(clippy::too_many_arguments)]
async fn record_outcome(
    shared: &Arc<Shared>,
    message: &TaskToExec,
    parent: TraceParent,
    running: &TaskInstance,
    result: &Result<TaskOutcome, TaskError>,
    tail: &[String],
    reason: StopReason,
    eager: &mut Vec<TaskInstance>,
    after: &mut After,
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
        // A suspended run queues nothing, a new try of an interrupted one included: the try is
        // stopped as the suspension stops it (the suspension's own pass over the tasks may have
        // failed, or not reached this one yet), and resuming the run queues the next.
        let suspended = store.run(&message.run_id).await?.is_some_and(|run| run.state == RunState::Suspended);
        // The stopped try is filed with the last lines of its own log.
        let mut ended = running.clone();
        ended.log_tail = tail.to_vec();
        let next = match ended.stopped_by_suspension(now) {
            Some(stopped) if suspended => stopped,
            _ => ended.after_interruption(now, why),
        };
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
            let headers = vec![(TRACEPARENT_HEADER.to_string(), parent.header())];
            let topic = Topic::Tasks(next.queue.clone());
            shared.queue.publish_with_headers(vec![(topic, messages::encode(&message), headers)]).await?;
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
                done.error = Some(cut_error(reason));
            }
        },
        Err(error) => {
            let retry = error.retryable && running.try_number < running.max_try;
            done.state = if retry { TaskState::UpForRetry } else { TaskState::Failed };
            done.error = Some(cut_error(error.message.clone()));
        }
    }
    // A failed try keeps the last lines of its log with it: why it failed, at no log read.
    done.log_tail = if done.state == TaskState::Success { Vec::new() } else { tail.to_vec() };
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
        prepare_eager(shared, message, parent, eager)
    } else {
        Vec::new()
    };
    let claims: Vec<EagerClaim> = candidates.iter().map(|c| c.claim.clone()).collect();
    let taken = match candidates.is_empty() && !std::mem::replace(&mut after.took, true) {
        true => take_next(shared, &message.run_id),
        false => None,
    };
    fail_point!("worker::outcome::before_cas");
    match taken {
        Some(TakenMessage::Claimable(next)) => return finish_and_claim(shared, message, &done, *next, after).await,
        Some(TakenMessage::Other(delivery)) => after.handle = Some((delivery, None)),
        None => {}
    }
    let sent = tokio::time::Instant::now();
    let finished = store.finish_try(&message.run_id, &done, &claims).await;
    // Only the claimed candidates stay registered; an error claimed none that this worker knows
    // of (should the store have applied one, the scheduler requeues it: no heartbeat lists it).
    let mut reads: HashMap<usize, Vec<Option<TaskInstance>>> =
        finished.as_ref().map(|f| f.claimed.iter().cloned().collect()).unwrap_or_default();
    let mut claimed = Vec::new();
    for (n, candidate) in candidates.into_iter().enumerate() {
        match reads.remove(&n) {
            Some(then) => claimed.push(
                candidate.into_claimed(then.into_iter().flatten().filter(|t| t.state == TaskState::Pending), sent),
            ),
            None => drop(lock(&shared.running).remove(&candidate.key)),
        }
    }
    let applied = finished?.applied;
    if applied && !claimed.is_empty() {
        shared.config.metrics.eager.add(&[], claimed.len() as f64);
        fail_point!("worker::eager::after_claim");
        let mut update = status_update(shared, &done, &message.run_id);
        update.next = claimed.iter().map(|c| c.message.task_id.clone()).collect();
        let mut claimed = claimed.into_iter();
        let first = claimed.next().unwrap_or_else(|| unreachable!("claimed is not empty"));
        let others = claimed.zip(permits).collect();
        return Ok(Some(Next::Eager { first, others, update }));
    }
    outcome_written(shared, message, &done, applied).await?;
    Ok(None)
}

/// After the call that wrote a finished try's outcome `done` (`applied`: whether it applied, or
/// `false` when it did not), tells the scheduler: an outcome written, or found written by an
/// earlier attempt, is published (the try gives its slot back while its update is sent); one
/// refused because the task moved on is not.
async fn outcome_written(
    shared: &Arc<Shared>,
    message: &TaskToExec,
    done: &TaskInstance,
    applied: bool,
) -> Result<(), BackendError> {
    if !applied {
        // Already recorded by an earlier attempt of this loop, or the task moved on.
        let current = shared.store.task(&message.run_id, &message.task_id).await?;
        if !current.is_some_and(|c| c.try_number == done.try_number && c.state == done.state) {
            tracing::info!(
                run = %message.run_id, task = %message.task_id,
                "try outcome not recorded: the task moved on (cancelled or requeued)"
            );
            return Ok(());
        }
    }
    fail_point!("worker::outcome::before_publish");
    report(shared, status_update(shared, done, &message.run_id)).await;
    Ok(())
}

/// Writes a finished try's outcome `done` and claims `next`, the try of the message its slot
/// took, in one store call; the claimed try is kept in `after`, to run next in the slot once its
/// message is acknowledged. A call answered with an error leaves both unknown: the outcome is
/// written again (the error is answered), and the message is handled as usual, its try still
/// registered here, so a claim that applied is found running under this worker.
async fn finish_and_claim(
    shared: &Arc<Shared>,
    message: &TaskToExec,
    done: &TaskInstance,
    next: Claimable,
    after: &mut After,
) -> Result<Option<Next>, BackendError> {
    let Claimable { delivery, message: next_message, key, registered, run, read } = next;
    let claimant = claimant(shared);
    let ids: Vec<&str> = read.iter().map(String::as_str).collect();
    let claim = NextClaim {
        task_id: &next_message.task_id,
        try_number: next_message.try_number,
        claimant: &claimant,
        read: &ids,
    };
    let sent = tokio::time::Instant::now();
    let answer = match shared.store.finish_and_claim(&message.run_id, done, &claim).await {
        Ok(answer) => answer,
        Err(err) => {
            after.handle = Some((delivery, Some(Taken { registered, sent })));
            return Err(err);
        }
    };
    fail_point!("worker::claim_next::before_ack");
    let free_since = shared.config.clock.now();
    match claim_answered(shared, &next_message, Some(run), None, answer.next, sent, sent).await {
        Ok(Claim::Run(won)) => {
            registered.claimed.store(true, Ordering::SeqCst);
            let first = ClaimedTry::won(key, &delivery, *won, registered.signal, registered.reason, free_since);
            after.claimed = Some((first, delivery));
        }
        Ok(Claim::Settle(how)) => settle_unclaimed(shared, &key, &next_message, delivery, how).await,
        // A try claimed that this worker cannot run, whose failure was not written: handled as
        // usual, found ours.
        Err(err) => {
            tracing::warn!(run = %next_message.run_id, task = %next_message.task_id, "claimed with an outcome: {err}");
            after.handle = Some((delivery, Some(Taken { registered, sent })));
        }
    }
    outcome_written(shared, message, done, answer.applied).await?;
    Ok(None)
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
pub(super) async fn publish_status(shared: &Shared, task: &TaskInstance, run_id: &str) -> Result<(), BackendError> {
    shared.status.send(&status_update(shared, task, run_id)).await
}

/// Sends the status update of a try whose outcome is in the store, without holding its slot:
/// in a task of its own with a permit of [`Shared::reports`] (waiting for one while the most
/// updates allowed are on their way), or at once over an in-memory queue.
pub(super) async fn report(shared: &Arc<Shared>, update: StatusUpdate) {
    if !shared.status.confirms_take_time() {
        // An in-memory publish: done at once, not worth a task.
        publish_status_until_sent(shared.clone(), update).await;
        return;
    }
    match shared.reports.clone().acquire_owned().await {
        Ok(permit) => {
            let shared = shared.clone();
            tokio::spawn(async move {
                publish_status_until_sent(shared, update).await;
                drop(permit);
            });
        }
        Err(_) => publish_status_until_sent(shared.clone(), update).await,
    }
}

/// Sends a status update, trying again with backoff until the queue takes it: the outcome is
/// in the store already, and the update is what wakes the scheduler up sooner than its sweep.
pub(super) async fn publish_status_until_sent(shared: Arc<Shared>, update: StatusUpdate) {
    let mut delay = Duration::from_millis(100);
    while let Err(err) = shared.status.send(&update).await {
        tracing::error!(run = %update.run_id, task = %update.task_id, "publishing a status update: {err}; retrying in {delay:?}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
