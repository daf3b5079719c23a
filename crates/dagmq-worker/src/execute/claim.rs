//! Claiming a message's try: the compare-and-set in the store (`Store::claim_try`), the run's
//! record from a small cache, and resolving what runs against the DAG version the run was
//! created with.

use std::sync::Arc;

use tokio::time::Instant;

use dagmq_core::messages::TaskToExec;
use dagmq_core::store::{ClaimAnswer, Claimant};
use dagmq_core::{BackendError, CancelSignal, TaskInstance, TaskKind, TaskState};

use crate::Shared;

use super::eager::eager_candidates;
use super::outcome::publish_status;
use super::version::{Waited, wait_for_version};
use super::{Executable, Resolved};

/// What to do with the delivery.
pub(super) enum Settle {
    /// Done with.
    Ack,
    /// Cannot ever be processed.
    DeadLetter(String),
    /// Not for this worker now (it has not loaded the run's DAG version, as the text says):
    /// back to the queue, unclaimed, for another worker or for this one later.
    PutBack(String),
}

/// The outcome of trying to claim a message's try.
pub(super) enum Claim {
    /// Nothing to run: settle the delivery so.
    Settle(Settle),
    /// The try is ours (`running` in the store): run it.
    Run(Box<Won>),
}

/// A try this worker claimed: as the store describes it, with the downstream tasks it may claim
/// as it succeeds, and when the call that claimed it was sent.
pub(super) struct Won {
    /// The instance as claimed.
    pub(super) running: TaskInstance,
    /// The task, resolved at the claim.
    pub(super) resolved: Resolved,
    /// The message, as the store and this worker's DAGs describe it.
    pub(super) message: TaskToExec,
    /// The downstream tasks read with the claim.
    pub(super) eager: Vec<TaskInstance>,
    /// When the call that claimed it was sent.
    pub(super) claimed_since: Instant,
}

/// Claims the try (`queued` -> `running`, `Store::claim_try`, which also reads the downstream
/// tasks it may claim eagerly); a message whose try is not `queued` (nor ours from a claim whose
/// answer was lost) is a duplicate or stale and runs nothing. A try of a DAG version this worker
/// has not loaded is not claimed until the worker has loaded it (`version`); `signal` stops that
/// wait. `first_sent` is when the first attempt of this claim began: a claim found ours (an
/// earlier attempt applied, its answer lost) dates from then.
pub(super) async fn claim(
    shared: &Shared,
    message: &TaskToExec,
    signal: &CancelSignal,
    first_sent: Instant,
) -> Result<Claim, BackendError> {
    let store = &shared.store;
    let run = run_record(shared, &message.run_id).await?;
    let mut gave_up = None;
    if let Some(run) = &run
        && dag_version(shared, &run.dag_id, run.dag_version.as_deref()).is_err()
    {
        match wait_for_version(shared, message, run, signal).await? {
            Waited::Loaded => {}
            Waited::Stale => {
                shared.config.metrics.duplicates.inc(&[]);
                return Ok(Claim::Settle(Settle::Ack));
            }
            Waited::PutBack => {
                let why = dag_version(shared, &run.dag_id, run.dag_version.as_deref()).err().unwrap_or_default();
                return Ok(Claim::Settle(Settle::PutBack(why)));
            }
            Waited::GiveUp(waited) => gave_up = Some(waited),
        }
    }
    // The downstream tasks this try may claim as it succeeds are read with the claim, in one
    // round trip.
    let dag = run.as_ref().and_then(|run| dag_version(shared, &run.dag_id, run.dag_version.as_deref()).ok());
    let candidates = match &dag {
        Some(dag) if message.follow_up.is_none() => eager_candidates(shared, dag, &message.task_id),
        _ => Vec::new(),
    };
    let ids: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let sent = Instant::now();
    let answer =
        store.claim_try(&message.run_id, &message.task_id, message.try_number, &claimant(shared), &ids).await?;
    claim_answered(shared, message, run, gave_up, answer, sent, first_sent).await
}

/// What a claim's answer means for the delivery: the try to run, if the claim applied (`sent`
/// is when the call that claimed it was sent) or applied in an earlier call of this worker's
/// whose answer was lost (sent at `first_sent` at the earliest), or how to settle the message.
/// `run` is the run's record, `gave_up` how long the try waited for a worker that has loaded its
/// DAG version, if this one has not.
pub(super) async fn claim_answered(
    shared: &Shared,
    message: &TaskToExec,
    run: Option<Arc<dagmq_core::RunRecord>>,
    gave_up: Option<chrono::Duration>,
    answer: ClaimAnswer,
    sent: Instant,
    first_sent: Instant,
) -> Result<Claim, BackendError> {
    let claimed_since = if answer.claimed { sent } else { first_sent };
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
        Ok(resolved) => {
            Ok(Claim::Run(Box::new(Won { running: current, resolved, message: message.clone(), eager, claimed_since })))
        }
        Err(reason) => {
            let reason = match gave_up {
                Some(waited) => format!(
                    "{reason}; no worker that has loaded it took the try within {} of its queueing",
                    dagmq_core::duration::format_duration(waited.to_std().unwrap_or_default())
                ),
                None => reason,
            };
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
pub(super) fn claimant(shared: &Shared) -> Claimant {
    Claimant { worker: shared.config.name.clone(), instance: shared.instance.clone(), at: shared.config.clock.now() }
}

/// A run's record, from a small cache: a run's DAG, parameters and logical date never change.
pub(super) async fn run_record(
    shared: &Shared,
    run_id: &str,
) -> Result<Option<Arc<dagmq_core::RunRecord>>, BackendError> {
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

/// Finds what the message asks to run among this worker's DAGs and registered tasks; anything
/// else is refused, so a message can never make a worker run something unregistered.
pub(super) fn resolve(shared: &Shared, message: &TaskToExec, version: Option<&str>) -> Result<Resolved, String> {
    let dag = dag_version(shared, &message.dag_id, version)?;
    if let Some(follow_up) = &message.follow_up {
        let task = shared.config.tasks.build(&follow_up.run, &follow_up.args)?;
        return Ok(Resolved {
            executable: Executable::Rust(task, follow_up.args.clone()),
            branch: None,
            timeout: None,
        });
    }
    let Some(spec) = dag.task(&message.task_id) else {
        return Err(format!("dag {:?} has no task {:?}", message.dag_id, message.task_id));
    };
    let executable = match &spec.kind {
        TaskKind::Command(argv) => Executable::Command(crate::command::CommandSpec {
            argv: argv.clone(),
            env: spec.env.clone(),
            params: dag.params.clone(),
        }),
        TaskKind::Rust { task, .. } => Executable::Rust(task.clone(), spec.args.clone()),
        // Only a scheduler builds such tasks (from a stored version); a worker's DAGs are loaded.
        TaskKind::Unloaded => {
            return Err(format!("dag {:?}, task {:?}: not loaded from a DAG file", message.dag_id, message.task_id));
        }
    };
    let branch = spec.config.branch.then(|| dag.downstream_of(&spec.id).into_iter().map(str::to_string).collect());
    Ok(Resolved { executable, branch, timeout: spec.config.timeout })
}

/// The definition of `dag_id` a run created with `version` completes with: that version, which
/// this worker must have loaded (now or before a reload). A worker never runs another one.
pub(super) fn dag_version(
    shared: &Shared,
    dag_id: &str,
    version: Option<&str>,
) -> Result<Arc<dagmq_core::Dag>, String> {
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
