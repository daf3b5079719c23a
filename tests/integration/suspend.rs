//! Suspending and resuming runs (spincycle's suspend and resume), over the in-memory backends on
//! tokio's paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dagmq_core::messages::{self, Control, StoppedTry, TaskToExec, VERSION};
use dagmq_core::{
    Clock, Dag, DagRegistry, Queue, RunState, Store, Task, TaskContext, TaskError, TaskOutcome, TaskSpec, TaskState,
    Topic,
};
use dagmq_scheduler::CommandError;

use crate::support::Harness;

/// Works for a minute unless stopped; counts its starts.
struct Slow(Arc<AtomicU32>);

#[async_trait]
impl Task for Slow {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(TaskOutcome::done()),
            _ = ctx.cancel_signal().cancelled() => Err(TaskError::fatal("stopped")),
        }
    }
}

fn harness_dags(starts: &Arc<AtomicU32>) -> DagRegistry {
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("long")
            .task(TaskSpec::rust("a", Slow(starts.clone())).retries(1))
            .task(TaskSpec::rust("c", Slow(starts.clone())))
            .task(TaskSpec::rust("b", Slow(starts.clone())).after(["a"]))
            .build()
            .unwrap(),
    )
    .unwrap();
    dags
}

#[tokio::test(start_paused = true)]
async fn a_suspended_run_stops_its_tries_and_resumes_with_new_ones_that_keep_the_retry_budget() {
    let starts = Arc::new(AtomicU32::new(0));
    let mut h = Harness::start(harness_dags(&starts)).await;
    let run = h.trigger("long").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    h.wait_task(&run, "c", |t| t.state == TaskState::Running).await;

    let conflict = h.scheduler.resume(&run).await.unwrap_err();
    assert_eq!(conflict.to_string(), format!("run {run:?} is running; only a suspended run can be resumed"));
    h.scheduler.suspend(&run).await.unwrap();
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Suspended);
    let conflict = h.scheduler.suspend(&run).await.unwrap_err();
    assert!(matches!(conflict, CommandError::Conflict(_)), "{conflict}");
    assert_eq!(conflict.to_string(), format!("run {run:?} is suspended; only a running run can be suspended"));
    let unknown = h.scheduler.suspend("long--nope").await.unwrap_err();
    assert!(matches!(unknown, CommandError::NotFound(_)), "{unknown}");

    let tasks = h.tasks(&run).await;
    for id in ["a", "c"] {
        assert_eq!((tasks[id].state, tasks[id].try_number), (TaskState::Suspended, 1), "{id}");
        assert_eq!(tasks[id].error.as_deref(), Some("try 1 stopped: the run was suspended"));
    }
    assert_eq!(tasks["b"].state, TaskState::Pending);
    // Nothing is queued or run while suspended, across a scheduler restart too.
    tokio::time::sleep(Duration::from_secs(120)).await;
    h.restart_scheduler().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(starts.load(Ordering::SeqCst), 2, "no try started while suspended");
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Suspended);
    assert!(h.tasks(&run).await.values().all(|t| matches!(t.state, TaskState::Suspended | TaskState::Pending)));

    h.scheduler.resume(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let tasks = h.tasks(&run).await;
    assert_eq!(tasks["a"].try_number, 2, "try numbers keep increasing");
    assert_eq!(tasks["a"].tries_left(), 1, "the stopped try did not use up the retry");
    assert_eq!((tasks["c"].try_number, tasks["b"].try_number), (2, 1));
    assert_eq!(starts.load(Ordering::SeqCst), 5);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_suspended_run_can_be_cancelled_and_a_lost_stop_broadcast_costs_one_heartbeat() {
    let starts = Arc::new(AtomicU32::new(0));
    let h = Harness::start(harness_dags(&starts)).await;
    let run = h.trigger("long").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    h.wait_task(&run, "c", |t| t.state == TaskState::Running).await;
    h.scheduler_faults.queue.broadcasts_failing.store(true, Ordering::SeqCst);
    let suspended_at = tokio::time::Instant::now();
    h.scheduler.suspend(&run).await.unwrap();
    // The worker learns it from the store at its next heartbeat and stops both tries.
    let worker = async {
        loop {
            let workers = h.store.workers().await.unwrap();
            // The worker must be registered: an empty registry says nothing about its tries.
            if !workers.is_empty() && workers.iter().all(|w| w.running.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), worker).await.expect("the worker stops the suspended tries");
    assert!(suspended_at.elapsed() <= Duration::from_secs(11), "stopped within a heartbeat and its grace");
    assert_eq!(h.tasks(&run).await["a"].state, TaskState::Suspended, "the stopped try's failure is not recorded");

    h.scheduler.cancel(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Cancelled);
    let tasks = h.tasks(&run).await;
    assert!(!tasks.is_empty() && tasks.values().all(|t| t.state == TaskState::Cancelled), "{tasks:?}");
    let conflict = h.scheduler.resume(&run).await.unwrap_err();
    assert_eq!(conflict.to_string(), format!("run {run:?} is cancelled; only a suspended run can be resumed"));
    h.stop().await;
}

/// The store lists a suspended run among the unfinished ones, so a scheduler that starts (after
/// a crash, or taking over) loads it like a running one: a resume right after the restart
/// queues its stopped tasks before it answers, and a cancel ends it before it answers.
#[tokio::test(start_paused = true)]
async fn after_a_scheduler_restart_a_suspended_run_resumes_or_cancels_at_once() {
    for resume in [true, false] {
        let starts = Arc::new(AtomicU32::new(0));
        let mut h = Harness::start(harness_dags(&starts)).await;
        let run = h.trigger("long").await;
        h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
        h.wait_task(&run, "c", |t| t.state == TaskState::Running).await;
        h.scheduler.suspend(&run).await.unwrap();
        h.restart_scheduler().await;

        if resume {
            h.scheduler.resume(&run).await.unwrap();
            let tasks = h.tasks(&run).await;
            for id in ["a", "c"] {
                assert!(
                    matches!(tasks[id].state, TaskState::Queued | TaskState::Running) && tasks[id].try_number == 2,
                    "the resume queued {id}'s next try before it answered: {:?}",
                    tasks[id]
                );
            }
            assert_eq!(h.wait_final(&run).await, RunState::Success);
        } else {
            h.scheduler.cancel(&run).await.unwrap();
            assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Cancelled);
            let tasks = h.tasks(&run).await;
            assert!(tasks.values().all(|t| t.state == TaskState::Cancelled), "{tasks:?}");
        }
        h.stop().await;
    }
}

/// The review of the fix for seed 1008752 (its finding F3): the interrupted worker reads the
/// run and then writes the new try back, two steps, so the suspension can still come between
/// them and the try be queued, with its message, in a suspended run. Here the test writes what
/// that worker wrote: try 2 of `a` queued in the suspended run, and its message. No worker may
/// run it: the claim is refused while the run is not running, the message is acknowledged, the
/// scheduler's sweep stops the queued try as the suspension would have, and after the resume the
/// task runs once.
#[tokio::test(start_paused = true)]
async fn a_try_queued_in_a_suspended_run_is_not_claimed_and_runs_once_after_the_resume() {
    let starts = Arc::new(AtomicU32::new(0));
    let h = Harness::start(harness_dags(&starts)).await;
    let run = h.trigger("long").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    h.wait_task(&run, "c", |t| t.state == TaskState::Running).await;
    h.scheduler.suspend(&run).await.unwrap();
    let a = h.tasks(&run).await["a"].clone();
    assert_eq!((a.state, a.try_number), (TaskState::Suspended, 1), "precondition");

    let queued = a.next_try(h.clock.now());
    assert!(h.store.transition_task(&run, TaskState::Suspended, 1, &queued).await.unwrap(), "precondition");
    let record = h.store.run(&run).await.unwrap().unwrap();
    let message = TaskToExec {
        v: VERSION,
        run_id: run.clone(),
        dag_id: "long".into(),
        task_id: "a".into(),
        try_number: queued.try_number,
        max_try: queued.max_try,
        params: Default::default(),
        logical_date: record.logical_date,
        follow_up: None,
    };
    h.queue.publish(&Topic::Tasks("default".into()), messages::encode(&message)).await.unwrap();

    let stopped = h.wait_task(&run, "a", |t| t.state != TaskState::Queued).await;
    assert_eq!((stopped.state, stopped.try_number), (TaskState::Suspended, 2), "{stopped:?}");
    assert_eq!(stopped.started_at, None, "try 2 of a was never claimed: {stopped:?}");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(starts.load(Ordering::SeqCst), 2, "no try started in the suspended run");
    assert_eq!(h.queue.depth(&Topic::Tasks("default".into())).await.unwrap(), 0, "the message was acknowledged");
    assert_eq!(h.queue.depth(&Topic::Dead).await.unwrap(), 0, "and not dead-lettered");

    h.scheduler.resume(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Success, "tasks {:?}", h.tasks(&run).await);
    let tasks = h.tasks(&run).await;
    assert_eq!((tasks["a"].state, tasks["a"].try_number), (TaskState::Success, 3), "{:?}", tasks["a"]);
    assert_eq!(starts.load(Ordering::SeqCst), 5, "a and c twice, b once");
    h.stop().await;
}

/// Seeds 1001326, 1002062, 1002281 and 1006956 of the simulator. A worker frozen while a run was
/// suspended gets the suspension's stop broadcast only once it thaws, after the run was resumed
/// and it had claimed a try of the resumed run. The broadcast names the run only: the worker
/// stopped the new try as cancelled, and its task failed though nothing of it had failed. Here
/// the late broadcast is sent again by the test after the resume, which is what the frozen
/// worker saw.
#[tokio::test(start_paused = true)]
async fn a_stop_broadcast_that_arrives_after_the_resume_leaves_the_new_tries_running() {
    let starts = Arc::new(AtomicU32::new(0));
    let h = Harness::start(harness_dags(&starts)).await;
    let run = h.trigger("long").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    h.wait_task(&run, "c", |t| t.state == TaskState::Running).await;
    h.scheduler.suspend(&run).await.unwrap();
    h.scheduler.resume(&run).await.unwrap();
    h.wait_task(&run, "a", |t| t.state == TaskState::Running && t.try_number == 2).await;
    h.wait_task(&run, "c", |t| t.state == TaskState::Running && t.try_number == 2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while starts.load(Ordering::SeqCst) < 4 {
        assert!(tokio::time::Instant::now() < deadline, "the second tries of a and c start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The suspension's broadcast names the first tries; an older scheduler's names none.
    let first_tries = ["a", "c"].map(|id| StoppedTry { task_id: id.into(), try_number: 1 }).to_vec();
    h.queue.broadcast(Control::encode_cancel(&run, first_tries)).await.unwrap();
    let late = Control::CancelRun { v: VERSION, run_id: run.clone(), tries: None };
    h.queue.broadcast(messages::encode(&late)).await.unwrap();

    assert_eq!(h.wait_final(&run).await, RunState::Success, "tasks {:?}", h.tasks(&run).await);
    let tasks = h.tasks(&run).await;
    for id in ["a", "c"] {
        assert_eq!((tasks[id].state, tasks[id].try_number), (TaskState::Success, 2), "{id}: {:?}", tasks[id]);
    }
    assert_eq!(starts.load(Ordering::SeqCst), 5, "a and c twice, b once");
    h.stop().await;
}

/// Seed 1008752 of the simulator. The suspension moved the run to `suspended`, then failed to
/// read its tasks, so the try of `a` stayed `running` in the store. Its worker, out of touch
/// with the store (frozen), stopped the try and wrote it back as interrupted: a new try,
/// queued, in a run the store has suspended, which another worker could claim and run.
#[tokio::test(start_paused = true)]
async fn a_try_its_worker_interrupts_in_a_suspended_run_is_not_queued_again() {
    let starts = Arc::new(AtomicU32::new(0));
    let h = Harness::start(harness_dags(&starts)).await;
    let run = h.trigger("long").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
    h.wait_task(&run, "c", |t| t.state == TaskState::Running).await;
    h.scheduler_faults.store.task_lists_failing.store(true, Ordering::SeqCst);
    let failed = h.scheduler.suspend(&run).await;
    assert!(failed.is_err(), "precondition: the suspension's task pass failed, it answered {failed:?}");
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Suspended, "precondition");
    assert_eq!(h.tasks(&run).await["a"].state, TaskState::Running, "precondition: a's try was not stopped");
    // The worker's heartbeats stop reaching the store: at half the worker timeout it stops its
    // tries and writes each back as interrupted.
    h.worker_faults.store.heartbeats_failing.store(true, Ordering::SeqCst);
    let a = h.wait_task(&run, "a", |t| t.state != TaskState::Running).await;
    let c = h.wait_task(&run, "c", |t| t.state != TaskState::Running).await;
    for task in [&a, &c] {
        assert_eq!(
            (task.state, task.try_number),
            (TaskState::Suspended, 1),
            "{}: the interrupted try of a suspended run became {:?}",
            task.task_id,
            task
        );
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(starts.load(Ordering::SeqCst), 2, "no try started in the suspended run");

    h.worker_faults.store.heartbeats_failing.store(false, Ordering::SeqCst);
    h.scheduler_faults.store.task_lists_failing.store(false, Ordering::SeqCst);
    h.scheduler.resume(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Success, "tasks {:?}", h.tasks(&run).await);
    h.stop().await;
}

/// Works for a minute unless stopped; counts its starts and its stops.
struct Counted {
    starts: Arc<AtomicU32>,
    stops: Arc<AtomicU32>,
}

#[async_trait]
impl Task for Counted {
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

fn counted_dag(starts: &Arc<AtomicU32>, stops: &Arc<AtomicU32>) -> DagRegistry {
    let mut dags = DagRegistry::new();
    let task = |id: &str| TaskSpec::rust(id, Counted { starts: starts.clone(), stops: stops.clone() });
    dags.add(Dag::builder("counted").task(task("a")).task(task("c")).build().unwrap()).unwrap();
    dags
}

/// Review finding F2: the stop broadcast names the tries the scheduler stopped, so the worker
/// stops them at once without asking the store. Before, it only prompted a store check of the
/// run's tries: with the worker's reads of that run's tasks failing (its heartbeats going
/// through), a cancelled try ran on to its end.
#[tokio::test(start_paused = true)]
async fn a_cancel_stops_the_running_tries_at_once_though_the_workers_task_reads_fail() {
    for suspend in [false, true] {
        let starts = Arc::new(AtomicU32::new(0));
        let stops = Arc::new(AtomicU32::new(0));
        let h = Harness::start(counted_dag(&starts, &stops)).await;
        let run = h.trigger("counted").await;
        h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
        h.wait_task(&run, "c", |t| t.state == TaskState::Running).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while starts.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "precondition: both tries start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        h.worker_faults.store.task_batch_reads_failing.store(true, Ordering::SeqCst);
        h.worker_faults.store.task_lists_failing.store(true, Ordering::SeqCst);
        let stopped_at = tokio::time::Instant::now();
        if suspend {
            h.scheduler.suspend(&run).await.unwrap();
        } else {
            h.scheduler.cancel(&run).await.unwrap();
        }
        while stops.load(Ordering::SeqCst) < 2 {
            assert!(
                stopped_at.elapsed() < Duration::from_secs(1),
                "suspend {suspend}: both tries stop within a second of the broadcast; {} stopped",
                stops.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        h.worker_faults.store.task_batch_reads_failing.store(false, Ordering::SeqCst);
        h.worker_faults.store.task_lists_failing.store(false, Ordering::SeqCst);
        let tasks = h.tasks(&run).await;
        let stopped = if suspend { TaskState::Suspended } else { TaskState::Cancelled };
        assert!(tasks.values().all(|t| t.state == stopped && t.try_number == 1), "suspend {suspend}: {tasks:?}");
        h.stop().await;
    }
}

/// Review finding F1: a stop broadcast that lands while the worker waits for its claim's answer
/// keeps the try from starting. Before, the broadcast only checked tries whose claim answer was
/// back, and this one started and ran until the next heartbeat's check stopped it.
#[tokio::test(start_paused = true)]
async fn a_stop_broadcast_that_lands_while_the_claim_answer_is_delayed_keeps_the_try_from_starting() {
    for suspend in [false, true] {
        let starts = Arc::new(AtomicU32::new(0));
        let stops = Arc::new(AtomicU32::new(0));
        let mut dags = DagRegistry::new();
        let task = TaskSpec::rust("a", Counted { starts: starts.clone(), stops: stops.clone() });
        dags.add(Dag::builder("one").task(task).build().unwrap()).unwrap();
        let h = Harness::start(dags).await;
        // The worker's store calls hang as the claim applies, before its answer is read.
        h.worker_faults.store.freeze_after_claim.store(true, Ordering::SeqCst);
        let run = h.trigger("one").await;
        h.wait_task(&run, "a", |t| t.state == TaskState::Running).await;
        assert!(h.worker_faults.store.stalled.load(Ordering::SeqCst), "precondition: the claim's answer is held");
        if suspend {
            h.scheduler.suspend(&run).await.unwrap();
        } else {
            h.scheduler.cancel(&run).await.unwrap();
        }
        // On the paused clock a sleep returns once every other task has run as far as it can:
        // the worker has taken the broadcast.
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.worker_faults.store.stalled.store(false, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while h.worker_metrics.tries.value(&["not_started"]) < 1.0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "suspend {suspend}: the claimed try is recorded as not started; {} started",
                starts.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(starts.load(Ordering::SeqCst), 0, "suspend {suspend}: the stopped try never started");
        let stopped = if suspend { TaskState::Suspended } else { TaskState::Cancelled };
        assert_eq!(h.tasks(&run).await["a"].state, stopped, "suspend {suspend}");
        h.stop().await;
    }
}
