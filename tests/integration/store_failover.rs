//! A store that goes backwards: a Redis failover with `--redis-replicas 0` promotes a replica
//! that missed the primary's last writes, so outcomes, claims and even run creations that
//! dagmq acted on are gone. `MemoryStore::roll_back` does the same to the in-memory store on
//! tokio's paused clock. No run may be left with a task `running` for good: the try runs again
//! (or its outcome is re-reported), and the run completes.

use std::sync::Arc;
use std::time::Duration;

use dagmq_core::{Dag, DagRegistry, RunState, Store, TaskSpec, TaskState};

use crate::support::{Harness, Journal, Probe, origin};

/// How long after the rollback every run must have completed (tokio time): the zombie check
/// finds a `running` try its worker does not list after about 35 s, the sweep a run the
/// scheduler's view lost after 30 s.
const BOUND: Duration = Duration::from_secs(90);

/// A chain `a -> b -> c` of probe tasks taking `work` each, at most one run at a time.
async fn chain(work: Duration) -> (Harness, Journal) {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let probe = || Probe { work, ..Probe::new(&journal, &clock) };
    let mut registry = DagRegistry::new();
    registry
        .add(
            Dag::builder("chain")
                .max_active_runs(1)
                .task(TaskSpec::rust("a", probe()))
                .task(TaskSpec::rust("b", probe()).after(["a"]))
                .task(TaskSpec::rust("c", probe()).after(["b"]))
                .build()
                .unwrap(),
        )
        .unwrap();
    (Harness::start(registry).await, journal)
}

/// Waits until `run` is final within `BOUND` of now, and answers its state.
async fn final_within_bound(h: &Harness, run: &str) -> RunState {
    let started = tokio::time::Instant::now();
    let state = h.wait_final(run).await;
    let took = started.elapsed();
    assert!(took <= BOUND, "run {run} took {took:?} after the rollback");
    eprintln!("run {run} final {took:?} after the rollback");
    state
}

async fn assert_every_task_succeeded(h: &Harness, run: &str) {
    for (id, task) in h.tasks(run).await {
        assert_eq!(task.state, TaskState::Success, "task {id} of {run}: {task:?}");
    }
}

/// `a`'s success, and the claim of `b` made with it (eager) or after it, are lost after the
/// worker and the scheduler acted on them: the store has `a` running under a worker that
/// finished it, and `b` pending while the worker runs it.
#[tokio::test(start_paused = true)]
async fn an_outcome_lost_after_the_scheduler_and_worker_acted_on_it_runs_again_and_the_run_completes() {
    let (h, _journal) = chain(Duration::from_secs(2)).await;
    let run = h.trigger("chain").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    let before = h.store.snapshot();
    h.wait_task(&run, "b", |t| t.state == TaskState::Running).await;
    h.store.roll_back(before);
    assert_eq!(h.tasks(&run).await["a"].state, TaskState::Running, "the rollback lost a's outcome");
    assert_eq!(final_within_bound(&h, &run).await, RunState::Success);
    assert_every_task_succeeded(&h, &run).await;
    h.stop().await;
}

/// The same with the outcome lost after the run went on to its last task.
#[tokio::test(start_paused = true)]
async fn outcomes_lost_late_in_the_run_run_again_and_the_run_completes() {
    let (h, _journal) = chain(Duration::from_secs(2)).await;
    let run = h.trigger("chain").await;
    h.wait_task(&run, "b", |t| t.state == TaskState::Running).await;
    let before = h.store.snapshot();
    h.wait_task(&run, "c", |t| t.state == TaskState::Running).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    h.store.roll_back(before);
    assert_eq!(final_within_bound(&h, &run).await, RunState::Success);
    assert_every_task_succeeded(&h, &run).await;
    h.stop().await;
}

/// The end of the run is lost after the scheduler dropped it from its view: the store has it
/// running again, its last task `running` under a worker that finished it.
#[tokio::test(start_paused = true)]
async fn a_finished_run_that_the_store_forgot_finishing_is_finished_again() {
    let (h, _journal) = chain(Duration::from_secs(2)).await;
    let run = h.trigger("chain").await;
    h.wait_task(&run, "c", |t| t.state == TaskState::Running).await;
    let before = h.store.snapshot();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    h.store.roll_back(before);
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Running, "the rollback lost the end");
    assert_eq!(final_within_bound(&h, &run).await, RunState::Success);
    assert_every_task_succeeded(&h, &run).await;
    h.stop().await;
}

/// A run whose creation is lost after its trigger was answered: it is gone, and it does not
/// hold its DAG's only slot (`max_active_runs = 1`) for good: the next run completes.
#[tokio::test(start_paused = true)]
async fn a_lost_run_creation_does_not_hold_its_dags_slot() {
    let (h, _journal) = chain(Duration::from_secs(2)).await;
    let before = h.store.snapshot();
    let lost = h.trigger("chain").await;
    h.wait_task(&lost, "a", |t| t.state == TaskState::Running).await;
    h.store.roll_back(before);
    // The rollback lost the lease's renewals too: the scheduler's term may have ended, and a
    // trigger is refused until it holds the lease again.
    let next = loop {
        match h.scheduler.trigger("chain", Default::default(), None).await {
            Ok(answer) => break answer.run_id,
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    assert_eq!(final_within_bound(&h, &next).await, RunState::Success);
    assert_every_task_succeeded(&h, &next).await;
    assert!(h.store.run(&lost).await.unwrap().is_none(), "the lost run stays lost");
    h.stop().await;
}

/// The start of a run is lost after the scheduler acted on it (simulator seed 1000013): with
/// `max_active_runs = 1`, run `b` waits `queued` behind `a`; `a` finishes and `b` starts, then
/// the store rolls back to before both. The store has `b` `queued` again while the scheduler's
/// view has it running: every claim of its tries is refused (its run is not `running`), and
/// the view would hold the DAG's only slot for good. The sweep (30 s) finds the store's state,
/// drops the view and starts `b` again once `a` (running again too) has finished.
#[tokio::test(start_paused = true)]
async fn a_run_whose_start_the_store_lost_is_started_again() {
    let (h, _journal) = chain(Duration::from_secs(1)).await;
    let first = h.trigger("chain").await;
    h.wait_task(&first, "a", |t| t.state == TaskState::Running).await;
    let second = h.trigger("chain").await;
    assert_eq!(h.store.run(&second).await.unwrap().unwrap().state, RunState::Queued);
    let before = h.store.snapshot();
    h.wait_task(&second, "a", |t| t.state == TaskState::Running).await;
    h.store.roll_back(before);
    assert_eq!(h.store.run(&second).await.unwrap().unwrap().state, RunState::Queued, "the rollback lost the start");
    assert_eq!(final_within_bound(&h, &first).await, RunState::Success);
    assert_eq!(final_within_bound(&h, &second).await, RunState::Success);
    assert_every_task_succeeded(&h, &first).await;
    assert_every_task_succeeded(&h, &second).await;
    // The DAG's slot is free again: a third run completes too.
    let third = h.trigger("chain").await;
    assert_eq!(final_within_bound(&h, &third).await, RunState::Success);
    h.stop().await;
}

/// A suspend is lost after the scheduler acted on it (simulator seed 1000240): the store has
/// the run `running` again while the scheduler's view has it `suspended`, and the view's
/// checks suspend its tasks again in the store (a try its worker stopped is requeued as
/// `suspended`). Nobody resumes a run that the store says is running: before, it stayed
/// `running` with a task `suspended` for good. The sweep (30 s) takes the store's state: the
/// suspend is undone (repeat the command), and the run completes.
#[tokio::test(start_paused = true)]
async fn a_suspend_the_store_lost_is_undone_and_the_run_completes() {
    let (h, _journal) = chain(Duration::from_secs(5)).await;
    let run = h.trigger("chain").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    let before = h.store.snapshot();
    h.scheduler.suspend(&run).await.unwrap();
    h.wait_task(&run, "a", |t| t.state == TaskState::Suspended).await;
    h.store.roll_back(before);
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Running, "the rollback lost the suspend");
    assert_eq!(final_within_bound(&h, &run).await, RunState::Success);
    assert_every_task_succeeded(&h, &run).await;
    h.stop().await;
}
