//! A worker that consumes several pools (`--queues a,b`): its slots are shared by all of them,
//! so neither an idle pool nor a busy one keeps the other's tries from its slots.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dagmq_core::task::CancelHandle;
use dagmq_core::{Dag, DagRegistry, Queue, RunState, TaskSpec, TaskState, Topic};

use crate::support::{Harness, Journal, Probe, ProcessFaults, origin};

/// A harness whose one worker has a single slot and consumes pools `default` and `other`, with
/// DAG `many` (six probe tasks `a1`..`a6` of `work` each in `default`, no upstream) and DAG
/// `lone` (one probe task `b` of `work` in `other`).
async fn two_pools_one_slot(work: Duration) -> (Harness, Journal) {
    let (mut h, journal, stop, task, _) = two_pools_one_slot_worker(work).await;
    h.keep_worker(stop, task);
    (h, journal)
}

/// The worker started by [`two_pools_one_slot`], left to the caller: how to stop it, its task
/// and its faults.
async fn two_pools_one_slot_worker(
    work: Duration,
) -> (Harness, Journal, CancelHandle, tokio::task::JoinHandle<Result<(), dagmq_core::BackendError>>, ProcessFaults) {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let mut many = Dag::builder("many");
    for n in 1..=6 {
        many = many.task(TaskSpec::rust(format!("a{n}"), Probe { work, ..Probe::new(&journal, &clock) }));
    }
    let lone =
        Dag::builder("lone").task(TaskSpec::rust("b", Probe { work, ..Probe::new(&journal, &clock) }).queue("other"));
    let mut registry = DagRegistry::new();
    registry.add(many.build().unwrap()).unwrap();
    registry.add(lone.build().unwrap()).unwrap();
    let mut h = Harness::start(registry).await;
    h.stop_worker().await;
    let live = Arc::new(dagmq_core::LiveDags::new(h.dags.clone(), Vec::new(), Default::default()));
    let faults = ProcessFaults::default();
    let (stop, task, _) = h.extra_worker("two-pools", live, &faults, |config| {
        config.concurrency = 1;
        config.queues = vec!["default".into(), "other".into()];
    });
    (h, journal, stop, task, faults)
}

/// Waits until some task has started.
async fn wait_a_start(journal: &Journal) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while starts(journal).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no task started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (a minute of paused time at most) until a first try of `many` has started.
async fn first_start(journal: &Journal) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while starts(journal).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no task of `many` started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The order in which the tasks started.
fn starts(journal: &Journal) -> Vec<String> {
    journal.entries().into_iter().filter_map(|e| e.strip_prefix("start:").map(str::to_string)).collect()
}

/// A pool with no message must not hold the worker's only slot while it waits for one: run
/// after run of the other pool finishes. (Failed before: each pool's consumer took a slot
/// before waiting for a message, so the idle pool's held the slot for good and the other
/// pool's tries waited forever.)
#[tokio::test(start_paused = true)]
async fn an_idle_pool_does_not_hold_the_only_slot_of_a_worker_of_two_pools() {
    let (h, journal) = two_pools_one_slot(Duration::from_millis(10)).await;
    for _ in 0..2 {
        let run = h.trigger("many").await;
        assert_eq!(h.wait_final(&run).await, RunState::Success, "{:?}", starts(&journal));
    }
    assert_eq!(starts(&journal).len(), 12);
    h.stop().await;
}

/// A pool with a backlog must not starve another pool of the same worker: `b`, queued while
/// `a1` runs in the only slot, starts before the backlog of `many` is through. (Failed before:
/// a slot whose try ended took its own pool's next message while one was at hand, so `b` only
/// started once `default` had none left, after all six.)
#[tokio::test(start_paused = true)]
async fn a_pool_with_a_backlog_does_not_starve_another_pool_of_the_same_worker() {
    let (h, journal) = two_pools_one_slot(Duration::from_secs(1)).await;
    let many = h.trigger("many").await;
    first_start(&journal).await;
    let lone = h.trigger("lone").await;
    assert_eq!(h.wait_final(&lone).await, RunState::Success);
    assert_eq!(h.wait_final(&many).await, RunState::Success);
    let starts = starts(&journal);
    let b = starts.iter().position(|id| id == "b").unwrap();
    assert!(b <= 2, "`b` started after {b} tries of the other pool: {starts:?}");
    h.stop().await;
}

/// A malformed message at hand as a try ends in the worker's only slot (taken by that slot, or
/// by the pool's consume loop as the slot frees) is dead-lettered with its reason, and the
/// slot goes on with the pool's other messages.
#[tokio::test(start_paused = true)]
async fn a_malformed_message_at_hand_as_a_try_ends_is_dead_lettered_with_its_reason() {
    let (h, journal) = two_pools_one_slot(Duration::from_secs(1)).await;
    let many = h.trigger("many").await;
    first_start(&journal).await;
    h.queue.publish(&Topic::Tasks("default".into()), b"{not json".to_vec()).await.unwrap();
    let mut dead = h.queue.consume(&Topic::Dead, 10).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(60), dead.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(delivery.payload, b"{not json");
    assert!(
        delivery.error.as_deref().is_some_and(|e| e.starts_with("task: malformed message")),
        "{:?}",
        delivery.error
    );
    delivery.ack().await.unwrap();
    assert_eq!(h.wait_final(&many).await, RunState::Success);
    assert_eq!(starts(&journal).len(), 6);
    h.stop().await;
}

/// A message a slot took as its try ended, of another run (so not claimed with the outcome),
/// is not started once the worker is stopping: the outcome's write was held up (a slow store)
/// until after the stop, and the message is put back for another worker, its task `queued`.
/// (Failed before: the slot claimed and ran it after the stop, as the drain went on.)
#[tokio::test(start_paused = true)]
async fn a_message_a_slot_took_is_put_back_not_started_when_the_worker_stops_meanwhile() {
    let (h, journal, stop, worker, faults) = two_pools_one_slot_worker(Duration::from_secs(1)).await;
    let first = h.trigger("lone").await;
    wait_a_start(&journal).await;
    let lone = h.trigger("lone").await;
    h.wait_task(&lone, "b", |t| t.state == TaskState::Queued).await;
    // The try running ends while the store does not answer this worker: the slot takes `b`'s
    // message, then waits for the outcome's write, and the worker is told to stop meanwhile.
    faults.store.calls_stalled.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !journal.entries().iter().any(|e| e.starts_with("end:")) {
        assert!(tokio::time::Instant::now() < deadline, "the first try did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    faults.store.calls_stalled.store(false, Ordering::SeqCst);
    worker.await.unwrap().unwrap();
    assert_eq!(starts(&journal).len(), 1, "{:?}", journal.entries());
    assert_eq!(h.tasks(&lone).await["b"].state, TaskState::Queued);
    let mut other = h.queue.consume(&Topic::Tasks("other".into()), 1).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), other.next()).await.unwrap().unwrap().unwrap();
    let message: dagmq_core::messages::TaskToExec = dagmq_core::messages::decode(&delivery.payload).unwrap();
    assert_eq!((message.run_id.as_str(), message.task_id.as_str()), (lone.as_str(), "b"));
    drop(delivery);
    let _ = first;
    h.stop().await;
}
