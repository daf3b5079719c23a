//! Windows of the protocol where a run could get stuck or lost while every process stays up,
//! each shown with an injected fault (see `faults`) over the in-memory backends on tokio's
//! paused clock. Each test failed before the change that closes its window.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dagmq_core::{Clock, Dag, DagRegistry, Queue, RunState, Store, TaskSpec, TaskState, Topic};

use crate::support::{Harness, Journal, Probe, ProcessFaults, origin};

/// A harness running one DAG `one` with a single probe task `a` taking `work`.
async fn one_task(work: Duration) -> (Harness, Journal) {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let probe = Probe { work, ..Probe::new(&journal, &clock) };
    let mut registry = DagRegistry::new();
    registry.add(Dag::builder("one").task(TaskSpec::rust("a", probe)).build().unwrap()).unwrap();
    (Harness::start(registry).await, journal)
}

/// Takes the next task message off the default pool and acknowledges it: the message is lost.
async fn lose_task_message(h: &Harness) {
    let mut consumer = h.queue.consume(&Topic::Tasks("default".into()), 1).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
    delivery.ack().await.unwrap();
}

/// Triggers `one` with the worker stopped, loses the task's message, and starts the worker
/// again: the task is `queued` with no message. Answers the run and the queued instance.
async fn queued_with_its_message_lost(h: &mut Harness) -> (String, dagmq_core::TaskInstance) {
    h.stop_worker().await;
    let run = h.trigger("one").await;
    let queued = h.wait_task(&run, "a", |t| t.state == TaskState::Queued).await;
    lose_task_message(h).await;
    h.start_worker();
    (run, queued)
}

/// Waits until the journal holds `entry`, failing after `limit` of tokio time; answers when.
async fn wait_journal(journal: &Journal, entry: &str, limit: Duration) -> tokio::time::Instant {
    let deadline = tokio::time::Instant::now() + limit;
    while !journal.entries().iter().any(|e| e == entry) {
        assert!(tokio::time::Instant::now() < deadline, "{entry} not seen within {limit:?}: {:?}", journal.entries());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::Instant::now()
}

#[tokio::test(start_paused = true)]
async fn a_queued_task_whose_message_is_lost_is_published_again_within_30s() {
    let (mut h, journal) = one_task(Duration::from_millis(10)).await;
    let (run, queued) = queued_with_its_message_lost(&mut h).await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let task = &h.tasks(&run).await["a"];
    assert_eq!(task.try_number, 1, "the same try was published again");
    let waited = task.started_at.unwrap() - queued.queued_at.unwrap();
    assert!(waited <= chrono::Duration::seconds(30), "republished after {waited}");
    assert_eq!(journal.entries(), vec!["start:a", "end:a"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_claim_that_applied_but_answered_an_error_still_runs_once() {
    let (h, journal) = one_task(Duration::from_millis(10)).await;
    h.worker_faults.store.claims_applied_then_failed.store(1, Ordering::SeqCst);
    let run = h.trigger("one").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    assert_eq!(h.worker_faults.store.claims_applied_then_failed.load(Ordering::SeqCst), 0, "the fault fired");
    assert_eq!(h.tasks(&run).await["a"].try_number, 1);
    assert_eq!(journal.entries(), vec!["start:a", "end:a"]);
    h.stop().await;
}

/// A harness whose one worker has a single slot, running DAG `four`: four probe tasks with no
/// upstream, all queued at once. Answers the worker's faults.
async fn four_tasks_one_slot() -> (Harness, Journal, ProcessFaults) {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let mut dag = Dag::builder("four");
    for id in ["a", "b", "c", "d"] {
        dag = dag.task(TaskSpec::rust(id, Probe::new(&journal, &clock)));
    }
    let mut registry = DagRegistry::new();
    registry.add(dag.build().unwrap()).unwrap();
    let mut h = Harness::start(registry).await;
    h.stop_worker().await;
    let faults = ProcessFaults::default();
    let live = Arc::new(dagmq_core::LiveDags::new(h.dags.clone(), Vec::new(), Default::default()));
    let (stop, task, _) = h.extra_worker("one-slot", live, &faults, |config| config.concurrency = 1);
    h.keep_worker(stop, task);
    (h, journal, faults)
}

/// A slot whose try ends claims its next try, from a message its consumer holds already, in the
/// same store call that writes the outcome: of four tries through one slot, the last three are
/// claimed so (failed before the worker used `finish_and_claim`: none was).
#[tokio::test(start_paused = true)]
async fn a_slot_claims_its_next_try_with_the_outcome_of_the_one_before() {
    let (h, journal, faults) = four_tasks_one_slot().await;
    let run = h.trigger("four").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    assert_eq!(faults.store.claimed_with_outcomes.load(Ordering::SeqCst), 3);
    let tasks = h.tasks(&run).await;
    for id in ["a", "b", "c", "d"] {
        assert_eq!(tasks[id].try_number, 1, "{id}");
        assert_eq!(journal.entries().iter().filter(|e| **e == format!("start:{id}")).count(), 1, "{id}");
    }
    h.stop().await;
}

/// The call that wrote an outcome and claimed the next try applied, and answered an error: the
/// outcome is written again (found written), the message handled as any, the try found claimed
/// by this worker and run once.
#[tokio::test(start_paused = true)]
async fn an_outcome_and_claim_that_applied_but_answered_an_error_still_run_once() {
    let (h, journal, faults) = four_tasks_one_slot().await;
    faults.store.outcome_claims_applied_then_failed.store(1, Ordering::SeqCst);
    let run = h.trigger("four").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    assert_eq!(faults.store.outcome_claims_applied_then_failed.load(Ordering::SeqCst), 0, "the fault fired");
    let tasks = h.tasks(&run).await;
    for id in ["a", "b", "c", "d"] {
        assert_eq!((tasks[id].state, tasks[id].try_number), (TaskState::Success, 1), "{id}");
        assert_eq!(journal.entries().iter().filter(|e| **e == format!("start:{id}")).count(), 1, "{id}");
    }
    h.stop().await;
}

/// An outcome found already written (its first call applied and answered an error) gives its
/// slot back while its status update waits for the broker, as a written outcome does: with
/// status updates failing, the one slot still runs the next three tries (failed before: the
/// slot retried the update of `a` for as long as the broker refused it, and `b` never started).
#[tokio::test(start_paused = true)]
async fn an_outcome_found_already_written_does_not_hold_its_slot_while_its_update_fails() {
    let (h, journal, faults) = four_tasks_one_slot().await;
    faults.store.outcome_claims_applied_then_failed.store(1, Ordering::SeqCst);
    faults.queue.status_publishes_failing.store(true, Ordering::SeqCst);
    let run = h.trigger("four").await;
    for id in ["a", "b", "c", "d"] {
        h.wait_task(&run, id, |t| t.state == TaskState::Success).await;
    }
    assert_eq!(faults.store.outcome_claims_applied_then_failed.load(Ordering::SeqCst), 0, "the fault fired");
    faults.queue.status_publishes_failing.store(false, Ordering::SeqCst);
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let tasks = h.tasks(&run).await;
    for id in ["a", "b", "c", "d"] {
        assert_eq!(tasks[id].try_number, 1, "{id}");
        assert_eq!(journal.entries().iter().filter(|e| **e == format!("start:{id}")).count(), 1, "{id}");
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_try_running_under_a_live_worker_that_does_not_run_it_is_requeued() {
    let (mut h, journal) = one_task(Duration::from_millis(10)).await;
    let (run, queued) = queued_with_its_message_lost(&mut h).await;
    // The store says the live worker claimed the try, but the worker never ran it.
    let worker = loop {
        if let Some(w) = h.store.workers().await.unwrap().into_iter().next() {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut claimed = queued.clone();
    claimed.state = TaskState::Running;
    claimed.started_at = Some(h.clock.now());
    claimed.worker = Some(worker.name.clone());
    claimed.worker_instance = Some(worker.instance.clone());
    assert!(h.store.transition_task(&run, TaskState::Queued, 1, &claimed).await.unwrap());
    let since = h.clock.now();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let task = &h.tasks(&run).await["a"];
    assert_eq!((task.try_number, task.interruptions), (2, 1), "requeued as a new try");
    let bound = task.queued_at.unwrap() - since;
    assert!(bound <= chrono::Duration::seconds(45), "requeued after {bound}");
    assert_eq!(journal.entries(), vec!["start:a", "end:a"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancel_whose_broadcast_is_lost_reaches_the_try_within_a_heartbeat() {
    let (h, journal) = one_task(Duration::from_secs(3600)).await;
    h.scheduler_faults.queue.broadcasts_failing.store(true, Ordering::SeqCst);
    let run = h.trigger("one").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    let cancelled_at = tokio::time::Instant::now();
    h.scheduler.cancel(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Cancelled);
    let stopped_at = wait_journal(&journal, "stopped:a", Duration::from_secs(60)).await;
    assert!(stopped_at - cancelled_at <= Duration::from_secs(6), "stopped after {:?}", stopped_at - cancelled_at);
    // The stopped try's outcome does not overwrite the cancel.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(h.tasks(&run).await["a"].state, TaskState::Cancelled);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_trigger_during_a_store_outage_waits_and_is_never_dead_lettered() {
    let (h, _journal) = one_task(Duration::from_millis(10)).await;
    // Whole outages, and outages of run creation alone (the lease still renews).
    h.scheduler_faults.store.create_run_failing.store(true, Ordering::SeqCst);
    let trigger = br#"{"v":1,"dag_id":"one","key":"outage-0"}"#;
    h.queue.publish(&Topic::Triggers, trigger.to_vec()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    h.scheduler_faults.store.create_run_failing.store(false, Ordering::SeqCst);
    h.scheduler_faults.store.down.store(true, Ordering::SeqCst);
    let trigger = br#"{"v":1,"dag_id":"one","key":"outage-1"}"#;
    h.queue.publish(&Topic::Triggers, trigger.to_vec()).await.unwrap();
    // Far longer than ten redeliveries 500 ms apart.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(h.scheduler_faults.store.refused.load(Ordering::SeqCst) > 0, "the outage was felt");
    h.scheduler_faults.store.down.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let runs = loop {
        let runs = h.store.list_runs(&dagmq_core::store::RunFilter { limit: 10, ..Default::default() }).await.unwrap();
        if runs.len() == 2 {
            break runs;
        }
        assert!(tokio::time::Instant::now() < deadline, "runs after the outages: {runs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut keys: Vec<_> = runs.iter().map(|r| r.key.clone().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, vec!["outage-0", "outage-1"]);
    for run in runs {
        assert_eq!(h.wait_final(&run.run_id).await, RunState::Success);
    }
    assert_eq!(h.queue.depth(&Topic::Dead).await.unwrap(), 0, "nothing dead-lettered");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_cut_off_from_the_store_stops_its_try_before_the_scheduler_requeues_it() {
    let (h, journal) = one_task(Duration::from_secs(120)).await;
    let run = h.trigger("one").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    let cut = tokio::time::Instant::now();
    h.worker_faults.store.down.store(true, Ordering::SeqCst);
    let stopped = wait_journal(&journal, "stopped:a", Duration::from_secs(60)).await;
    // Self-fencing at half the 20 s worker timeout, checked at each 5 s heartbeat.
    assert!(stopped - cut <= Duration::from_secs(15), "stopped {:?} after the cut", stopped - cut);
    let requeued = h.wait_task(&run, "a", |t| t.try_number == 2).await;
    let requeued_at = tokio::time::Instant::now();
    assert!(requeued_at > stopped, "the scheduler requeued the try only after the worker stopped it");
    assert_eq!(requeued.interruptions, 1);
    h.worker_faults.store.down.store(false, Ordering::SeqCst);
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    assert_eq!(h.tasks(&run).await["a"].try_number, 2);
    assert_eq!(journal.entries(), vec!["start:a", "stopped:a", "start:a", "end:a"]);
    h.stop().await;
}

/// The two-copies window: a worker frozen (SIGSTOP) after the store took its claim and before
/// the try started. The scheduler takes the silent worker for lost and requeues the try as try
/// 2, which another worker runs to success. Thawed, the first worker must not start try 1: it
/// was out of touch with the store since the claim for longer than half the worker timeout, so
/// it knows, without asking the store, that the try may have been requeued.
#[tokio::test(start_paused = true)]
async fn a_worker_frozen_between_its_claim_and_the_start_never_starts_a_try_requeued_meanwhile() {
    let (mut h, journal) = one_task(Duration::from_millis(10)).await;
    h.stop_worker().await;
    let live = Arc::new(dagmq_core::LiveDags::new(h.dags.clone(), Vec::new(), Default::default()));
    let frozen = ProcessFaults::default();
    frozen.store.freeze_after_claim.store(true, Ordering::SeqCst);
    // One slot: while frozen, it takes no other message (try 2's is for the other worker).
    let (stop_1, worker_1, metrics_1) = h.extra_worker("worker-1", live.clone(), &frozen, |config| {
        config.concurrency = 1;
    });
    let run = h.trigger("one").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    assert!(frozen.store.stalled.load(Ordering::SeqCst), "worker-1 froze with its claim applied");

    let (stop_2, worker_2, _) = h.extra_worker("worker-2", live, &ProcessFaults::default(), |_| {});
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let a = &h.tasks(&run).await["a"];
    assert_eq!((a.try_number, a.worker.as_deref(), a.interruptions), (2, Some("worker-2"), 1));
    frozen.store.stalled.store(false, Ordering::SeqCst);

    // Thawed, worker-1 reads its claim's answer and settles try 1 one way or the other.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while metrics_1.tries.value(&["not_started"]) < 1.0 && journal.entries().len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "worker-1 never settled try 1 after the thaw");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        journal.entries(),
        vec!["start:a", "end:a"],
        "worker-1 started try 1, which the scheduler had requeued as try 2 (and which succeeded) while it was frozen"
    );
    assert_eq!(metrics_1.tries.value(&["not_started"]), 1.0);
    let a = &h.tasks(&run).await["a"];
    assert_eq!((a.state, a.try_number), (TaskState::Success, 2), "the outcome stands");
    for (stop, worker) in [(stop_1, worker_1), (stop_2, worker_2)] {
        stop.cancel();
        worker.await.unwrap().unwrap();
    }
    h.stop().await;
}

/// A worker whose heartbeats do not reach the store for half the worker timeout (while its
/// other calls do) claims nothing until one does: a try it claimed then could not start, since
/// the scheduler may take the worker for lost. The message waits; the try runs once, as try 1,
/// when contact is back.
#[tokio::test(start_paused = true)]
async fn a_worker_out_of_touch_with_the_store_claims_nothing_until_a_heartbeat_gets_through() {
    let (h, journal) = one_task(Duration::from_millis(10)).await;
    h.worker_faults.store.heartbeats_failing.store(true, Ordering::SeqCst);
    // Half the 20 s worker timeout without a heartbeat written, and more.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let run = h.trigger("one").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let a = &h.tasks(&run).await["a"];
    assert_eq!((a.state, a.try_number), (TaskState::Queued, 1), "claimed while out of touch: {a:?}");
    assert!(journal.entries().is_empty());
    h.worker_faults.store.heartbeats_failing.store(false, Ordering::SeqCst);
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let a = &h.tasks(&run).await["a"];
    assert_eq!((a.try_number, a.interruptions), (1, 0), "{a:?}");
    assert_eq!(journal.entries(), vec!["start:a", "end:a"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_requeue_whose_publish_failed_is_published_again_by_the_worker() {
    let (mut h, journal) = one_task(Duration::from_secs(120)).await;
    let run = h.trigger("one").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    h.worker_faults.queue.task_publishes_failing.store(1, Ordering::SeqCst);
    h.stop_worker().await;
    assert_eq!(h.worker_faults.queue.task_publishes_failing.load(Ordering::SeqCst), 0, "the fault fired");
    let task = &h.tasks(&run).await["a"];
    assert_eq!((task.state, task.try_number), (TaskState::Queued, 2));
    assert!(h.queue.depth(&Topic::Tasks("default".into())).await.unwrap() >= 1, "its message is in the queue");
    h.start_worker();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    assert_eq!(journal.entries(), vec!["start:a", "stopped:a", "start:a", "end:a"]);
    h.stop().await;
}

/// Logs are bounded per line (64 KiB) and per try (1 MiB) with visible markers; a task that
/// prints 50 MB without a newline costs one cut line.
#[tokio::test(flavor = "multi_thread")]
async fn a_50_mb_line_and_a_flood_of_lines_are_cut_with_markers() {
    use dagmq_core::store::{LINE_CUT_MARKER, LOG_BYTES_CUT_MARKER, MAX_LOG_BYTES_PER_TRY, MAX_LOG_LINE_BYTES};
    let mut registry = DagRegistry::new();
    let dag = Dag::builder("noisy")
        .task(TaskSpec::command("long_line", ["sh", "-c", "head -c 50000000 /dev/zero | tr '\\0' x; echo; echo after"]))
        .task(TaskSpec::command(
            "flood",
            ["sh", "-c", "yes \"$(head -c 200 /dev/zero | tr '\\0' y)\" | head -n 100000"],
        ))
        .build()
        .unwrap();
    registry.add(dag).unwrap();
    let h = Harness::start(registry).await;
    let run = h.trigger("noisy").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);

    let log = h.store.read_log(&run, "long_line", 1, 0).await.unwrap();
    assert_eq!(log.len(), 2, "one cut line, then the next line");
    assert_eq!(log[0].len(), MAX_LOG_LINE_BYTES + LINE_CUT_MARKER.len());
    assert!(log[0].ends_with(LINE_CUT_MARKER));
    assert_eq!(log[1], "after");

    let log = h.store.read_log(&run, "flood", 1, 0).await.unwrap();
    assert_eq!(log.last().map(String::as_str), Some(LOG_BYTES_CUT_MARKER));
    let bytes: usize = log.iter().map(String::len).sum();
    assert!(bytes <= MAX_LOG_BYTES_PER_TRY + LOG_BYTES_CUT_MARKER.len(), "{bytes} bytes kept");
    assert!(log.len() > 5_000, "lines up to the cut are kept: {}", log.len());
    h.stop().await;
}

/// (run, task, "start" or "end", when).
type Event = (String, String, &'static str, chrono::DateTime<chrono::Utc>);

/// Records (run, task, event) with the clock time.
struct Recorder {
    events: Arc<std::sync::Mutex<Vec<Event>>>,
    clock: Arc<dagmq_core::TokioClock>,
    work: Duration,
}

#[dagmq_core::async_trait]
impl dagmq_core::Task for Recorder {
    async fn run(&self, ctx: dagmq_core::TaskContext) -> Result<dagmq_core::TaskOutcome, dagmq_core::TaskError> {
        self.events.lock().unwrap().push((ctx.run_id.clone(), ctx.task_id.clone(), "start", self.clock.now()));
        tokio::time::sleep(self.work).await;
        self.events.lock().unwrap().push((ctx.run_id.clone(), ctx.task_id.clone(), "end", self.clock.now()));
        Ok(dagmq_core::TaskOutcome::done())
    }
}

/// Split brain: the active scheduler stalls mid-protocol (as under SIGSTOP) for longer than its
/// lease; the standby takes over and finishes every run; when the old one resumes, its pending
/// writes are refused by the fence and it steps down. No task runs twice, and
/// `max_active_runs = 1` holds across the takeover.
#[tokio::test(start_paused = true)]
async fn a_stalled_scheduler_is_fenced_and_its_standby_finishes_every_run() {
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let task = |id: &str| {
        TaskSpec::rust(id, Recorder { events: events.clone(), clock: clock.clone(), work: Duration::from_secs(5) })
    };
    let mut registry = DagRegistry::new();
    registry
        .add(Dag::builder("limited").max_active_runs(1).task(task("a")).task(task("b").after(["a"])).build().unwrap())
        .unwrap();
    let h = Harness::start(registry).await;
    let standby_faults = crate::support::ProcessFaults::default();
    let (standby_stop, standby, standby_task) = h.extra_scheduler(&standby_faults);
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(h.trigger("limited").await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = standby.trigger("limited", Default::default(), None).await.unwrap_err();
    assert!(matches!(refused, dagmq_scheduler::CommandError::Standby), "the second scheduler stands by: {refused}");
    h.wait_task(&runs[0], "a", |t| t.state == TaskState::Running).await;

    h.scheduler_faults.store.stalled.store(true, Ordering::SeqCst);
    for run in &runs {
        assert_eq!(h.wait_final(run).await, RunState::Success, "the standby took over and finished {run}");
    }
    h.scheduler_faults.store.stalled.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match h.scheduler.trigger("limited", Default::default(), Some("probe".into())).await {
            Err(dagmq_scheduler::CommandError::Standby) => break,
            other => assert!(tokio::time::Instant::now() < deadline, "the old scheduler did not step down: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(h.scheduler_faults.store.fenced.load(Ordering::SeqCst) > 0, "the old scheduler's writes were refused");

    let events = events.lock().unwrap().clone();
    let mut spans: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>, String)> = Vec::new();
    for run in &runs {
        for task in ["a", "b"] {
            let starts = events.iter().filter(|e| &e.0 == run && e.1 == task && e.2 == "start").count();
            assert_eq!(starts, 1, "{run}/{task} ran once: {events:?}");
        }
        let of_run: Vec<_> = events.iter().filter(|e| &e.0 == run).map(|e| e.3).collect();
        spans.push((*of_run.iter().min().unwrap(), *of_run.iter().max().unwrap(), run.clone()));
        for t in h.tasks(run).await.values() {
            assert_eq!(t.try_number, 1, "{run}/{}", t.task_id);
        }
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "runs overlapped under max_active_runs = 1: {spans:?}");
    }
    standby_stop.cancel();
    standby_task.await.unwrap().unwrap();
    h.stop().await;
}

/// A run creation that applied but answered an error: the trigger is delivered again and finds
/// the run by its key, so no second run is made; the run itself must still start (it was only in
/// the store, not in the scheduler's queue of runs to start). The sweep finds it.
#[tokio::test(start_paused = true)]
async fn a_run_whose_creation_answered_an_error_is_started_by_the_sweep() {
    let (h, _journal) = one_task(Duration::from_millis(10)).await;
    h.scheduler_faults.store.creations_applied_then_failed.store(1, Ordering::SeqCst);
    let trigger = br#"{"v":1,"dag_id":"one","key":"ambiguous"}"#;
    h.queue.publish(&Topic::Triggers, trigger.to_vec()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let run = loop {
        let runs = h.store.list_runs(&dagmq_core::store::RunFilter { limit: 10, ..Default::default() }).await.unwrap();
        if let Some(run) = runs.first() {
            break run.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(h.wait_final(&run.run_id).await, RunState::Success, "started within a sweep");
    let runs = h.store.list_runs(&dagmq_core::store::RunFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(runs.len(), 1, "one run for the key");
    h.stop().await;
}
