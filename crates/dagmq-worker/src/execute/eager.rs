//! Eager dispatch: the downstream tasks a try claims in the same store step that writes its
//! success, and running them in this worker's slots without a task message.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use dagmq_core::messages::{StatusUpdate, TaskToExec};
use dagmq_core::store::EagerClaim;
use dagmq_core::trace::TraceParent;
use dagmq_core::trigger::TriggerRule;
use dagmq_core::{Delivery, TaskInstance};

use crate::Shared;

use super::claim::{claimant, dag_version, resolve};
use super::next::Taken;
use super::outcome::{finish, report};
use super::running::{TryKey, register};
use super::{ClaimedTry, Registered, Resolved, handle, settle};

/// Runs what a slot runs next, one after the other, until nothing is left: the tries claimed as
/// their upstream succeeded (the first here, each other in a task of its own with the slot taken
/// for it, while the status update of the try before is on its way), a try claimed from its
/// message (acknowledged as the try starts), or a message the slot took
/// to handle as usual (put back instead, unclaimed, if the worker is stopping by then).
pub(super) fn run_claimed(
    shared: &Arc<Shared>,
    mut next: Option<Next>,
) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        while let Some(step) = next {
            next = match step {
                Next::Eager { first, others, update } => {
                    report(shared, update).await;
                    for (claimed, permit) in others {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            let next = finish(&shared, claimed).await;
                            run_claimed(&shared, next).await;
                            drop(permit);
                        });
                    }
                    finish(shared, first).await
                }
                Next::Claimed { first, delivery } => {
                    let (acked, next) = tokio::join!(delivery.ack(), finish(shared, first));
                    settle(acked);
                    next
                }
                // A message the slot took, not claimed, stays unstarted once the worker stops
                // (its consume loops take no more): back to the queue for another worker.
                Next::Delivery { delivery, taken: None, .. } if shared.stopping() => {
                    tracing::info!("putting back a message taken as a try ended: the worker is stopping");
                    settle(delivery.requeue().await);
                    None
                }
                Next::Delivery { delivery, taken, free_since } => handle(shared, delivery, free_since, taken).await,
            };
        }
    })
}

/// What a slot runs next.
pub(super) enum Next {
    /// What a try that succeeded claimed: the try to run next in its slot, the others claimed
    /// with slots of their own, and its status update (naming them), which is sent as they run.
    Eager { first: ClaimedTry, others: Vec<(ClaimedTry, tokio::sync::OwnedSemaphorePermit)>, update: StatusUpdate },
    /// A try claimed from its message (as the slot handled it, or with the outcome of the slot's
    /// try before), and that message, acknowledged as the try starts.
    Claimed { first: ClaimedTry, delivery: Delivery },
    /// A message the slot took as its try ended, handled as usual (`taken`: registered already,
    /// its claim unknown), the slot free since `free_since`.
    Delivery { delivery: Delivery, taken: Option<Taken>, free_since: DateTime<Utc> },
}

/// A downstream task made ready to claim as its upstream's outcome is written: registered
/// already, so a heartbeat written after the claim lists it.
pub(super) struct EagerCandidate {
    pub(super) key: TryKey,
    pub(super) claim: EagerClaim,
    message: TaskToExec,
    resolved: Resolved,
    registered: Registered,
    /// The trace parent of its upstream's try, which is the run's.
    parent: TraceParent,
}

impl EagerCandidate {
    /// The candidate as the try this worker runs next, once the store claimed it by a call sent
    /// at `claimed_since`, with the downstream tasks it may claim in turn (read in the same
    /// step).
    pub(super) fn into_claimed(
        self,
        eager: impl Iterator<Item = TaskInstance>,
        claimed_since: tokio::time::Instant,
    ) -> ClaimedTry {
        self.registered.claimed.store(true, Ordering::SeqCst);
        ClaimedTry {
            key: self.key,
            parent: self.parent,
            message: self.message,
            running: self.claim.claimed,
            resolved: self.resolved,
            signal: self.registered.signal,
            reason: self.registered.reason,
            eager: eager.collect(),
            claimed_since,
            free_since: None,
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
pub(super) fn eager_candidates(shared: &Shared, dag: &dagmq_core::Dag, task_id: &str) -> Vec<String> {
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
pub(super) fn prepare_eager(
    shared: &Shared,
    message: &TaskToExec,
    parent: TraceParent,
    eager: Vec<TaskInstance>,
) -> Vec<EagerCandidate> {
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
        let branches = branch_upstreams(&dag, &expected);
        let claim = EagerClaim { expected, claimed, then, branches };
        candidates.push(EagerCandidate { key, claim, message: next, resolved, registered, parent });
    }
    candidates
}

/// The upstream tasks of `task` that are branch tasks in the run's DAG version: the store claims
/// it only if each of them chose it.
fn branch_upstreams(dag: &dagmq_core::Dag, task: &TaskInstance) -> Vec<String> {
    task.after.iter().filter(|up| dag.task(up).is_some_and(|spec| spec.config.branch)).cloned().collect()
}
