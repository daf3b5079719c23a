//! Day-two operations over the in-memory backends on tokio's paused clock: backfill and clear.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dagmq_core::{
    Dag, DagRegistry, RunKind, RunState, Store, Task, TaskContext, TaskError, TaskOutcome, TaskSpec, TaskState,
};
use dagmq_scheduler::CommandError;

use crate::support::{Harness, Journal, Probe, origin};

/// Counts its runs; fails while it has failures left.
struct Counted {
    runs: Arc<AtomicU32>,
    failures: AtomicU32,
}

impl Counted {
    fn new(runs: &Arc<AtomicU32>, failures: u32) -> Counted {
        Counted { runs: runs.clone(), failures: AtomicU32::new(failures) }
    }
}

#[async_trait]
impl Task for Counted {
    async fn run(&self, _ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err(TaskError::fatal("failing on purpose"));
        }
        Ok(TaskOutcome::done())
    }
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

#[tokio::test(start_paused = true)]
async fn a_backfill_makes_one_run_per_point_in_order_and_never_a_second_one() {
    let runs = Arc::new(AtomicU32::new(0));
    let mut dags = DagRegistry::new();
    // Daily at 02:00 UTC since the day before the test's clock starts: one scheduled run is due.
    let start = origin() - chrono::Duration::days(1);
    dags.add(
        Dag::builder("daily")
            .schedule("0 0 2 * * *")
            .start(start)
            .catch_up(false)
            .max_active_runs(1)
            .task(TaskSpec::rust("work", Counted::new(&runs, 0)))
            .build()
            .unwrap(),
    )
    .unwrap();
    dags.add(Dag::builder("manual").task(TaskSpec::rust("work", Counted::new(&runs, 0))).build().unwrap()).unwrap();
    let h = Harness::start(dags).await;
    // The schedule's own run for 2026-11-23T02:00.
    let scheduled = dagmq_scheduler::ids::scheduled_run_id("daily", at("2026-11-23T02:00:00Z"));
    h.wait_run(&scheduled, |r| r.state == RunState::Success).await;

    let outcome = h
        .scheduler
        .backfill("daily", at("2026-11-19T00:00:00Z"), at("2026-11-23T02:00:00Z"), Default::default())
        .await
        .unwrap();
    assert_eq!((outcome.created, outcome.existing), (4, 1), "{outcome:?}");
    assert_eq!(outcome.runs.len(), 5);
    assert_eq!(outcome.runs[4], scheduled, "the scheduled point kept its run");
    assert_eq!(outcome.runs[0], dagmq_scheduler::ids::scheduled_run_id("daily", at("2026-11-19T02:00:00Z")));
    // max_active_runs = 1: one at a time, oldest first.
    let mut started = Vec::new();
    for run_id in &outcome.runs[..4] {
        let run = h.wait_run(run_id, |r| r.state == RunState::Success).await;
        assert_eq!(run.kind, RunKind::Backfill);
        started.push((run.started_at.unwrap(), run.ended_at.unwrap()));
    }
    for pair in started.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "one run at a time, in order: {started:?}");
    }

    // Again: nothing new.
    let again = h
        .scheduler
        .backfill("daily", at("2026-11-19T00:00:00Z"), at("2026-11-23T02:00:00Z"), Default::default())
        .await
        .unwrap();
    assert_eq!((again.created, again.existing), (0, 5));
    assert_eq!(runs.load(Ordering::SeqCst), 5);

    let refused = |result: Result<_, CommandError>| match result {
        Err(CommandError::BadInput(reason)) => reason,
        other => panic!("expected a 400, got {other:?}"),
    };
    let manual =
        h.scheduler.backfill("manual", at("2026-11-19T00:00:00Z"), at("2026-11-20T00:00:00Z"), Default::default());
    assert!(refused(manual.await).contains("has no schedule"));
    let reversed =
        h.scheduler.backfill("daily", at("2026-11-20T00:00:00Z"), at("2026-11-19T00:00:00Z"), Default::default());
    assert!(refused(reversed.await).contains("reversed"));
    let huge =
        h.scheduler.backfill("daily", at("1990-01-01T00:00:00Z"), at("2026-11-19T00:00:00Z"), Default::default());
    assert!(refused(huge.await).contains("more than 10000 schedule points"));
    let unknown =
        h.scheduler.backfill("nope", at("2026-11-19T00:00:00Z"), at("2026-11-20T00:00:00Z"), Default::default());
    assert!(matches!(unknown.await, Err(CommandError::NotFound(_))));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn clear_with_downstream_reruns_the_named_task_and_what_follows_in_a_diamond() {
    let counts: Vec<Arc<AtomicU32>> = (0..4).map(|_| Arc::new(AtomicU32::new(0))).collect();
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("diamond")
            .task(TaskSpec::rust("a", Counted::new(&counts[0], 0)))
            .task(TaskSpec::rust("b", Counted::new(&counts[1], 0)).after(["a"]))
            .task(TaskSpec::rust("c", Counted::new(&counts[2], 0)).after(["a"]))
            .task(TaskSpec::rust("d", Counted::new(&counts[3], 0)).after(["b", "c"]).retries(1))
            .build()
            .unwrap(),
    )
    .unwrap();
    let h = Harness::start(dags).await;
    let run = h.trigger("diamond").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);

    let cleared = h.scheduler.clear(&run, vec!["b".to_string()], true).await.unwrap();
    assert_eq!(cleared, vec!["b".to_string(), "d".to_string()]);
    assert_eq!(h.store.run(&run).await.unwrap().unwrap().state, RunState::Running, "the run is running again");
    // A task that is queued or running cannot be cleared meanwhile.
    h.wait_task(&run, "b", |t| t.state == TaskState::Running).await;
    let busy = h.scheduler.clear(&run, vec!["b".to_string()], false).await.unwrap_err();
    assert!(matches!(busy, CommandError::Conflict(_)), "{busy}");
    assert!(busy.to_string().contains("task \"b\" of run"), "{busy}");
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let tasks = h.tasks(&run).await;
    let tries: Vec<u32> = ["a", "b", "c", "d"].iter().map(|id| tasks[*id].try_number).collect();
    assert_eq!(tries, vec![1, 2, 1, 2], "b and d ran again, a and c did not");
    assert_eq!(tasks["d"].tries_left(), 1, "a fresh retry budget");
    let ran: Vec<u32> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(ran, vec![1, 2, 1, 2]);

    // Without --downstream, only the named task (of a running run, too).
    h.scheduler.clear(&run, vec!["c".to_string()], false).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    assert_eq!(h.tasks(&run).await["c"].try_number, 2);
    assert_eq!(h.tasks(&run).await["d"].try_number, 2);

    let unknown = h.scheduler.clear(&run, vec!["z".to_string()], false).await.unwrap_err();
    assert_eq!(unknown.to_string(), format!("run {run:?} has no task \"z\""));
    assert!(matches!(
        h.scheduler.clear("diamond--x", vec!["a".to_string()], false).await,
        Err(CommandError::NotFound(_))
    ));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn clearing_a_failed_task_decides_again_the_tasks_after_it_that_never_ran() {
    let runs = Arc::new(AtomicU32::new(0));
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("chain")
            .task(TaskSpec::rust("a", Counted::new(&runs, 1)))
            .task(TaskSpec::rust("b", Counted::new(&runs, 0)).after(["a"]))
            .build()
            .unwrap(),
    )
    .unwrap();
    let h = Harness::start(dags).await;
    let run = h.trigger("chain").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    assert_eq!(h.tasks(&run).await["b"].state, TaskState::UpstreamFailed);
    let cleared = h.scheduler.clear(&run, vec!["a".to_string()], false).await.unwrap();
    assert_eq!(cleared, vec!["a".to_string(), "b".to_string()], "b never ran, so it is decided again");
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    h.stop().await;
}

/// Records how many of its kind run at once, by the tasks' own count.
struct Gauge {
    now: Arc<AtomicU32>,
    max: Arc<AtomicU32>,
}

#[async_trait]
impl Task for Gauge {
    async fn run(&self, _ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(TaskOutcome::done())
    }
}

fn gauge() -> (Arc<AtomicU32>, Arc<AtomicU32>) {
    (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)))
}

#[tokio::test(start_paused = true)]
async fn pools_and_task_limits_hold_under_200_ready_tasks_and_across_a_scheduler_restart() {
    let (pool_now, pool_max) = gauge();
    let (dag_now, dag_max) = gauge();
    let (task_now, task_max) = gauge();
    let mut dags = DagRegistry::new();
    // 200 ready tasks in pool "db" (3 slots); two of them take 2 slots each.
    let mut wide = Dag::builder("wide");
    for i in 0..200 {
        let slots = if i < 2 { 2 } else { 1 };
        let spec = TaskSpec::rust(format!("t{i}"), Gauge { now: pool_now.clone(), max: pool_max.clone() });
        wide = wide.task(spec.pool("db", slots));
    }
    dags.add(wide.build().unwrap()).unwrap();
    let mut capped = Dag::builder("capped").max_active_tasks(4);
    for i in 0..20 {
        capped = capped.task(TaskSpec::rust(format!("c{i}"), Gauge { now: dag_now.clone(), max: dag_max.clone() }));
    }
    dags.add(capped.build().unwrap()).unwrap();
    dags.add(
        Dag::builder("single")
            .task(TaskSpec::rust("only", Gauge { now: task_now.clone(), max: task_max.clone() }).max_active(1))
            .build()
            .unwrap(),
    )
    .unwrap();
    let pools: dagmq_core::Pools = [("db".to_string(), 3)].into();
    let mut h = Harness::start_with_pools(dags, dagmq_worker::builtin_tasks(), pools).await;
    let wide_run = h.trigger("wide").await;
    let capped_runs = [h.trigger("capped").await, h.trigger("capped").await];
    let mut single_runs = Vec::new();
    for _ in 0..3 {
        single_runs.push(h.trigger("single").await);
    }
    // A waiting task says why, in the API.
    let waiting = h
        .wait_task(&wide_run, "t199", |t| {
            t.state == TaskState::Pending && h.scheduler.waiting_reason(&wide_run, "t199").is_some()
        })
        .await;
    assert_eq!(waiting.state, TaskState::Pending);
    assert_eq!(h.scheduler.waiting_reason(&wide_run, "t199").as_deref(), Some("pool db"));
    // A takeover halfway: the new scheduler counts what is queued and running from the store.
    h.wait_task(&wide_run, "t100", |t| t.state == TaskState::Success).await;
    h.restart_scheduler().await;
    assert_eq!(h.wait_final(&wide_run).await, RunState::Success);
    for run in capped_runs.iter().chain(&single_runs) {
        assert_eq!(h.wait_final(run).await, RunState::Success);
    }
    assert_eq!(pool_max.load(Ordering::SeqCst), 3, "never more than the pool's slots running");
    assert_eq!(dag_max.load(Ordering::SeqCst), 4, "max_active_tasks across the dag's runs");
    assert_eq!(task_max.load(Ordering::SeqCst), 1, "max_active across runs");
    assert_eq!(h.scheduler.waiting_reason(&wide_run, "t199"), None);
    h.stop().await;
}

/// A DAG removed by a reload while a run of it is in flight and another waits `queued` behind
/// `max_active_runs`: both complete with the definition they were created with; none is stuck.
#[tokio::test(start_paused = true)]
async fn runs_of_a_dag_removed_by_a_reload_complete_even_those_still_queued() {
    let runs = Arc::new(AtomicU32::new(0));
    let dag =
        Dag::builder("gone").max_active_runs(1).task(TaskSpec::rust("work", Counted::new(&runs, 0))).build().unwrap();
    let mut dags = DagRegistry::new();
    dags.add(dag).unwrap();
    let live = Arc::new(dagmq_core::LiveDags::new(dags.clone(), Vec::new(), Default::default()));
    let h = Harness::start_live(dags, live.clone()).await;
    let first = h.trigger("gone").await;
    let second = h.trigger("gone").await;
    h.wait_task(&first, "work", |t| t.state == TaskState::Running).await;
    assert_eq!(h.store.run(&second).await.unwrap().unwrap().state, RunState::Queued);
    live.replace(DagRegistry::new(), Vec::new(), Default::default());
    h.scheduler.dags_changed().await;
    assert!(h.scheduler.dags().get("gone").is_none());
    assert_eq!(h.wait_final(&first).await, RunState::Success);
    assert_eq!(h.wait_final(&second).await, RunState::Success);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // No new run can be made of it.
    assert!(matches!(h.scheduler.trigger("gone", Default::default(), None).await, Err(CommandError::NotFound(_))));
    h.stop().await;
}

/// Found by the simulator (seed 131): a clear in a running run whose store step applied but
/// whose answer was lost left the view with the cleared task still `success`, so the run ended
/// `success` while the store had the task pending again, never to run.
#[tokio::test(start_paused = true)]
async fn a_clear_whose_answer_was_lost_still_runs_the_task_again_before_the_run_ends() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let dag = Dag::builder("clear_lost")
        .task(TaskSpec::rust("a", Probe::new(&journal, &clock)))
        .task(TaskSpec::rust("long", Probe { work: Duration::from_secs(2), ..Probe::new(&journal, &clock) }))
        .build()
        .unwrap();
    let mut registry = DagRegistry::new();
    registry.add(dag).unwrap();
    let h = Harness::start(registry).await;
    let run = h.trigger("clear_lost").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Success).await;
    h.wait_task(&run, "long", |t| t.state == TaskState::Running).await;
    h.scheduler_faults.store.reset_answers_lost.store(1, std::sync::atomic::Ordering::SeqCst);
    assert!(h.scheduler.clear(&run, vec!["a".into()], false).await.is_err(), "the clear's answer was to be lost");
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let a = h.store.task(&run, "a").await.unwrap().unwrap();
    assert_eq!((a.state, a.try_number), (TaskState::Success, 2), "the cleared task did not run again: {a:?}");
    h.stop().await;
}

/// Found by the simulator (seed 3009490): as above, but the read of the run's tasks that should
/// have told the clear whether it applied failed too. The view was kept as it was, with the
/// cleared task still `success`, and the run ended `success` at its next status update, before
/// any sweep read the tasks again, while the store had the task pending, never to run.
#[tokio::test(start_paused = true)]
async fn a_clear_whose_answer_and_reread_were_lost_still_runs_the_task_again_before_the_run_ends() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let dag = Dag::builder("clear_unread")
        .task(TaskSpec::rust("a", Probe::new(&journal, &clock)))
        .task(TaskSpec::rust("long", Probe { work: Duration::from_secs(2), ..Probe::new(&journal, &clock) }))
        .build()
        .unwrap();
    let mut registry = DagRegistry::new();
    registry.add(dag).unwrap();
    let h = Harness::start(registry).await;
    let run = h.trigger("clear_unread").await;
    h.wait_task(&run, "a", |t| t.state == TaskState::Success).await;
    h.wait_task(&run, "long", |t| t.state == TaskState::Running).await;
    let faults = &h.scheduler_faults.store;
    faults.lost_reset_answer_hides_tasks.store(true, Ordering::SeqCst);
    faults.reset_answers_lost.store(1, Ordering::SeqCst);
    assert!(h.scheduler.clear(&run, vec!["a".into()], false).await.is_err(), "the clear's answer was to be lost");
    assert!(faults.task_lists_failing.load(Ordering::SeqCst), "the clear's reset was to hide the tasks");
    // The store answers again at once: only the clear's own re-read was lost.
    faults.task_lists_failing.store(false, Ordering::SeqCst);
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let a = h.store.task(&run, "a").await.unwrap().unwrap();
    assert_eq!((a.state, a.try_number), (TaskState::Success, 2), "the cleared task did not run again: {a:?}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_backfill_takes_dates_and_local_times_in_the_dags_timezone() {
    let runs = Arc::new(AtomicU32::new(0));
    let mut dags = DagRegistry::new();
    // Daily at midnight, Warsaw time (UTC+1 in November), paused so that only the backfill runs.
    dags.add(
        Dag::builder("warsaw")
            .schedule("0 0 0 * * *")
            .timezone("Europe/Warsaw")
            .start(at("2026-01-01T00:00:00Z"))
            .paused(true)
            .task(TaskSpec::rust("work", Counted::new(&runs, 0)))
            .build()
            .unwrap(),
    )
    .unwrap();
    let h = Harness::start(dags).await;
    let time = |text: &str| dagmq_core::TimeArg::parse(text).unwrap();
    // Plain dates are midnight in Warsaw, both ends included.
    let outcome =
        h.scheduler.backfill("warsaw", time("2026-11-19"), time("2026-11-21"), Default::default()).await.unwrap();
    let expected: Vec<String> = ["2026-11-18T23:00:00Z", "2026-11-19T23:00:00Z", "2026-11-20T23:00:00Z"]
        .iter()
        .map(|point| dagmq_scheduler::ids::scheduled_run_id("warsaw", at(point)))
        .collect();
    assert_eq!(outcome.runs, expected);
    // A local time with minutes, and an instant with an offset, in one range.
    let outcome = h
        .scheduler
        .backfill("warsaw", time("2026-11-22T00:30"), time("2026-11-23T23:00:00Z"), Default::default())
        .await
        .unwrap();
    let points = ["2026-11-22T23:00:00Z", "2026-11-23T23:00:00Z"];
    assert_eq!(
        outcome.runs,
        points.map(|point| dagmq_scheduler::ids::scheduled_run_id("warsaw", at(point))),
        "00:30 local is after the 23rd's midnight; 23:00Z is the 24th's midnight in Warsaw, included"
    );
    // A time the clocks skip in Warsaw is refused, saying why.
    match h.scheduler.backfill("warsaw", time("2026-03-29T02:30"), time("2026-03-30"), Default::default()).await {
        Err(CommandError::BadInput(reason)) => assert_eq!(
            reason,
            "backfill from: 2026-03-29 02:30:00 does not exist in Europe/Warsaw (the clocks skip it); give a time \
             with an offset"
        ),
        other => panic!("expected a 400, got {other:?}"),
    }
    for run_id in &expected {
        assert_eq!(h.wait_run(run_id, |r| r.state == RunState::Success).await.kind, RunKind::Backfill);
    }
    h.stop().await;
}
