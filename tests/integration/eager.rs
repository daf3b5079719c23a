//! Eager dispatch: a worker that records a success claims, in the same store step, a downstream
//! task it made ready and runs it next in its own slot. Over the in-memory backends on tokio's
//! paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dagmq_core::{
    Clock, Dag, DagRegistry, RunState, Task, TaskContext, TaskError, TaskOutcome, TaskSpec, TaskState, TriggerRule,
};

use crate::support::{Harness, Journal, Probe, origin};

fn probe(journal: &Journal, clock: &Arc<dagmq_core::TokioClock>) -> Probe {
    Probe::new(journal, clock)
}

/// A chain a -> b -> c -> d and a diamond a -> (b, c) -> d, of probes.
fn shapes(journal: &Journal, clock: &Arc<dagmq_core::TokioClock>) -> DagRegistry {
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("chain")
            .task(TaskSpec::rust("a", probe(journal, clock)))
            .task(TaskSpec::rust("b", probe(journal, clock)).after(["a"]))
            .task(TaskSpec::rust("c", probe(journal, clock)).after(["b"]))
            .task(TaskSpec::rust("d", probe(journal, clock)).after(["c"]))
            .build()
            .unwrap(),
    )
    .unwrap();
    dags.add(
        Dag::builder("diamond")
            .task(TaskSpec::rust("a", probe(journal, clock)))
            .task(TaskSpec::rust("b", probe(journal, clock)).after(["a"]))
            .task(TaskSpec::rust("c", probe(journal, clock)).after(["a"]))
            .task(TaskSpec::rust("d", probe(journal, clock)).after(["b", "c"]))
            .build()
            .unwrap(),
    )
    .unwrap();
    dags
}

/// Every task ran once, after all of its upstreams ended.
fn assert_in_order(journal: &Journal, edges: &[(&str, &str)]) {
    for (up, down) in edges {
        let ended = journal.position(&format!("end:{up}"));
        let started = journal.position(&format!("start:{down}"));
        assert!(ended < started, "{down} started before {up} ended: {:?}", journal.entries());
    }
}

async fn run_both(eager: bool) -> (Harness, u64) {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let mut h = Harness::start(shapes(&journal, &clock)).await;
    h.eager = eager;
    h.stop_worker().await;
    h.start_worker();
    for (dag, edges) in [
        ("chain", &[("a", "b"), ("b", "c"), ("c", "d")][..]),
        ("diamond", &[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")][..]),
    ] {
        let run = h.trigger(dag).await;
        assert_eq!(h.wait_final(&run).await, RunState::Success, "{dag}");
        let tasks = h.tasks(&run).await;
        assert_eq!(tasks.len(), 4, "{dag}: {tasks:?}");
        assert!(tasks.values().all(|t| t.state == TaskState::Success && t.try_number == 1), "{dag}: {tasks:?}");
        assert_in_order(&journal, edges);
        journal.0.lock().unwrap().clear();
    }
    let eager_claims = h.worker_metrics.eager.value(&[]) as u64;
    (h, eager_claims)
}

#[tokio::test(start_paused = true)]
async fn a_success_claims_the_next_task_in_the_same_store_step_and_the_scheduler_follows() {
    let (h, claims) = run_both(true).await;
    // Chain: b, c and d. Diamond: b and c together (the worker has free slots), then d, by
    // whichever of b and c finished second.
    assert_eq!(claims, 6);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn without_eager_dispatch_every_task_goes_through_the_scheduler() {
    let (h, claims) = run_both(false).await;
    assert_eq!(claims, 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn tasks_under_limits_other_rules_or_a_branch_are_left_to_the_scheduler() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("mixed")
            .task(TaskSpec::rust("a", probe(&journal, &clock)))
            .task(TaskSpec::rust("pooled", probe(&journal, &clock)).after(["a"]).pool("p", 1))
            .task(TaskSpec::rust("limited", probe(&journal, &clock)).after(["a"]).max_active(1))
            .task(TaskSpec::rust("all_done", probe(&journal, &clock)).after(["a"]).trigger_rule(TriggerRule::AllDone))
            .task(TaskSpec::rust("plain", probe(&journal, &clock)).after(["a"]))
            .build()
            .unwrap(),
    )
    .unwrap();
    let pools: dagmq_core::Pools = [("p".to_string(), 1)].into();
    let h = Harness::start_with_pools(dags, dagmq_worker::builtin_tasks(), pools).await;
    let run = h.trigger("mixed").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    assert_eq!(h.worker_metrics.eager.value(&[]) as u64, 1, "only `plain` may be claimed eagerly");
    assert_eq!(h.tasks(&run).await["plain"].try_number, 1);
    h.stop().await;
}

/// Works for a minute unless stopped; counts its starts and stops.
struct Slow {
    starts: Arc<AtomicU32>,
    stops: Arc<AtomicU32>,
}

#[async_trait]
impl Task for Slow {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(TaskOutcome::done()),
            _ = ctx.cancel_signal().cancelled() => {
                self.stops.fetch_add(1, Ordering::SeqCst);
                Err(TaskError::fatal("stopped"))
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_suspension_stops_a_task_claimed_eagerly_that_the_scheduler_has_not_heard_of() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let (starts, stops) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("gap")
            .task(TaskSpec::rust("a", probe(&journal, &clock)))
            .task(TaskSpec::rust("b", Slow { starts: starts.clone(), stops: stops.clone() }).after(["a"]))
            .build()
            .unwrap(),
    )
    .unwrap();
    let h = Harness::start(dags).await;
    // The worker's status updates do not get through: the scheduler's view keeps `a` running
    // and `b` pending while `b` runs.
    h.worker_faults.queue.status_publishes_failing.store(true, Ordering::SeqCst);
    let run = h.trigger("gap").await;
    h.wait_task(&run, "b", |t| t.state == TaskState::Running).await;
    assert_eq!(h.worker_metrics.eager.value(&[]) as u64, 1);

    h.scheduler.suspend(&run).await.unwrap();
    // Suspended by the command itself, not later by the scheduler's sweep.
    let b = &h.tasks(&run).await["b"];
    assert_eq!((b.state, b.try_number), (TaskState::Suspended, 1));
    // The stop reaches the try by broadcast (or, at worst, the next heartbeat's check).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stops.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the eagerly claimed try was not stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    h.worker_faults.queue.status_publishes_failing.store(false, Ordering::SeqCst);
    h.scheduler.resume(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let b = &h.tasks(&run).await["b"];
    assert_eq!((b.try_number, starts.load(Ordering::SeqCst)), (2, 2));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn outcomes_the_scheduler_learns_late_and_out_of_order_are_acted_on_without_waiting_for_the_sweep() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("late")
            .task(TaskSpec::rust("a", probe(&journal, &clock)))
            .task(TaskSpec::rust("b", probe(&journal, &clock)).after(["a"]))
            .task(TaskSpec::rust("c", probe(&journal, &clock)).after(["b"]).pool("p", 1))
            .build()
            .unwrap(),
    )
    .unwrap();
    let pools: dagmq_core::Pools = [("p".to_string(), 1)].into();
    let h = Harness::start_with_pools(dags, dagmq_worker::builtin_tasks(), pools).await;
    // `b` runs eagerly while no status update gets through; `c`, in a pool, is the scheduler's
    // to queue once it hears of `b`.
    h.worker_faults.queue.status_publishes_failing.store(true, Ordering::SeqCst);
    let run = h.trigger("late").await;
    h.wait_task(&run, "b", |t| t.state == TaskState::Success).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.tasks(&run).await["c"].state, TaskState::Pending);
    h.worker_faults.queue.status_publishes_failing.store(false, Ordering::SeqCst);
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    // The scheduler hears of `a` and finds `b` finished when it tries to queue it: it acts on
    // that as on `b`'s own update (which then changes nothing), and queues `c` at once. The
    // scheduler's sweep (every 5 s here) would have queued `c` too, but later.
    let took = h.clock.now() - origin();
    assert!(took < chrono::Duration::seconds(3), "the run finished only after {took}");
    h.stop().await;
}
