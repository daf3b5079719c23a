//! Scheduler and worker against the in-memory queue and store with tokio's paused clock.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dagmq_core::messages::{self, TaskToExec, VERSION};
use dagmq_core::{Dag, DagRegistry, FollowUp, Queue, RunState, Store, Task, TaskSpec, TaskState, Topic, TriggerRule};

use crate::support::{Harness, Journal, Probe, origin};

fn registry(dags: Vec<Dag>) -> DagRegistry {
    let mut registry = DagRegistry::new();
    for dag in dags {
        registry.add(dag).unwrap();
    }
    registry
}

/// Builds a DAG of probes from (task, upstreams) pairs, all writing to one journal.
fn probe_dag(id: &str, journal: &Journal, clock: &Arc<dagmq_core::TokioClock>, edges: &[(&str, &[&str])]) -> Dag {
    let mut builder = Dag::builder(id);
    for (task, after) in edges {
        builder = builder.task(TaskSpec::rust(*task, Probe::new(journal, clock)).after(after.iter().copied()));
    }
    builder.build().unwrap()
}

/// A harness whose DAGs need the harness's clock: build it with a placeholder clock first.
async fn harness_with(make: impl FnOnce(&Journal, &Arc<dagmq_core::TokioClock>) -> Vec<Dag>) -> (Harness, Journal) {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let harness = Harness::start(registry(make(&journal, &clock))).await;
    (harness, journal)
}

fn assert_before(journal: &Journal, first: &str, then: &str) {
    assert!(
        journal.position(&format!("end:{first}")) < journal.position(&format!("start:{then}")),
        "{first} must end before {then} starts: {:?}",
        journal.entries()
    );
}

#[tokio::test(start_paused = true)]
async fn linear_diamond_and_wide_dags_run_in_dependency_order() {
    let wide: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
    let (h, journal) = harness_with(|j, c| {
        let mut wide_dag = Dag::builder("wide").task(TaskSpec::rust("root", Probe::new(j, c)));
        for id in &wide {
            wide_dag = wide_dag.task(TaskSpec::rust(id.clone(), Probe::new(j, c)).after(["root"]));
        }
        wide_dag = wide_dag.task(TaskSpec::rust("sink", Probe::new(j, c)).after(wide.clone()));
        vec![
            probe_dag("linear", j, c, &[("a", &[]), ("b", &["a"]), ("c", &["b"])]),
            probe_dag(
                "diamond",
                j,
                c,
                &[("top", &[]), ("left", &["top"]), ("right", &["top"]), ("bottom", &["left", "right"])],
            ),
            wide_dag.build().unwrap(),
        ]
    })
    .await;
    let linear = h.trigger("linear").await;
    assert_eq!(h.wait_final(&linear).await, RunState::Success);
    assert_before(&journal, "a", "b");
    assert_before(&journal, "b", "c");

    let diamond = h.trigger("diamond").await;
    assert_eq!(h.wait_final(&diamond).await, RunState::Success);
    for (first, then) in [("top", "left"), ("top", "right"), ("left", "bottom"), ("right", "bottom")] {
        assert_before(&journal, first, then);
    }

    let run = h.trigger("wide").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    for id in ["w0", "w17", "w49"] {
        assert_before(&journal, "root", id);
        assert_before(&journal, id, "sink");
    }
    let tasks = h.tasks(&run).await;
    assert_eq!(tasks.len(), 52);
    assert!(tasks.values().all(|t| t.state == TaskState::Success && t.try_number == 1), "{tasks:?}");
    // The wide tasks ran concurrently: all started before any of them ended.
    let entries = journal.entries();
    let last_start = entries.iter().rposition(|e| e.starts_with("start:w")).unwrap();
    let first_end = entries.iter().position(|e| e.starts_with("end:w")).unwrap();
    assert!(last_start < first_end, "wide tasks ran one at a time");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn retries_wait_with_backoff_then_succeed() {
    let (h, journal) = harness_with(|j, c| {
        let flaky = Probe { failures: 3, work: Duration::ZERO, ..Probe::new(j, c) };
        vec![
            Dag::builder("flaky")
                .task(TaskSpec::rust("flaky", flaky).retries(3).retry_delay(
                    Duration::from_secs(10),
                    2.0,
                    Duration::from_secs(30),
                ))
                .task(TaskSpec::rust("after", Probe::new(j, c)).after(["flaky"]))
                .build()
                .unwrap(),
        ]
    })
    .await;
    let run = h.trigger("flaky").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let starts = journal.times_of("start:flaky");
    assert_eq!(starts.len(), 4);
    let gaps: Vec<i64> = starts.windows(2).map(|w| (w[1] - w[0]).num_seconds()).collect();
    assert_eq!(gaps, vec![10, 20, 30], "delays grow by the backoff and stop at the cap");
    let tasks = h.tasks(&run).await;
    assert_eq!(tasks["flaky"].try_number, 4);
    assert_eq!(tasks["after"].state, TaskState::Success);
    // Each try has its own log.
    for try_number in 1..=4 {
        let log = h.store.read_log(&run, "flaky", try_number, 0).await.unwrap();
        assert_eq!(log[0], format!("try {try_number} of flaky"));
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn final_failure_marks_downstream_upstream_failed() {
    let (h, _journal) = harness_with(|j, c| {
        let broken = Probe { failures: u32::MAX, ..Probe::new(j, c) };
        vec![
            Dag::builder("broken")
                .task(TaskSpec::rust("extract", Probe::new(j, c)))
                .task(TaskSpec::rust("transform", broken).after(["extract"]).retries(1).retry_delay(
                    Duration::from_secs(1),
                    1.0,
                    Duration::from_secs(1),
                ))
                .task(TaskSpec::rust("load", Probe::new(j, c)).after(["transform"]))
                .task(TaskSpec::rust("report", Probe::new(j, c)).after(["load"]))
                .task(TaskSpec::rust("side", Probe::new(j, c)).after(["extract"]))
                .build()
                .unwrap(),
        ]
    })
    .await;
    let run = h.trigger("broken").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    let tasks = h.tasks(&run).await;
    assert_eq!(tasks["extract"].state, TaskState::Success);
    assert_eq!(tasks["transform"].state, TaskState::Failed);
    assert_eq!(tasks["transform"].try_number, 2);
    assert_eq!(tasks["transform"].error.as_deref(), Some("failure 2"));
    assert_eq!(tasks["load"].state, TaskState::UpstreamFailed);
    assert_eq!(tasks["report"].state, TaskState::UpstreamFailed);
    assert_eq!(tasks["load"].error.as_deref(), Some("upstream task \"transform\" failed"));
    // An independent branch still runs.
    assert_eq!(tasks["side"].state, TaskState::Success);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn fatal_error_skips_remaining_retries() {
    let (h, _journal) = harness_with(|j, c| {
        let fatal = Probe { failures: 1, fatal: true, ..Probe::new(j, c) };
        vec![Dag::builder("fatal").task(TaskSpec::rust("t", fatal).retries(5)).build().unwrap()]
    })
    .await;
    let run = h.trigger("fatal").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    assert_eq!(h.tasks(&run).await["t"].try_number, 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn timeout_fails_the_try() {
    let (h, journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(3600), ..Probe::new(j, c) };
        vec![Dag::builder("slow").task(TaskSpec::rust("slow", slow).timeout(Duration::from_secs(30))).build().unwrap()]
    })
    .await;
    let run = h.trigger("slow").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    let task = &h.tasks(&run).await["slow"];
    assert_eq!(task.error.as_deref(), Some("timed out after 30s"));
    assert_eq!(journal.entries(), vec!["start:slow", "stopped:slow"]);
    let took = task.ended_at.unwrap() - task.started_at.unwrap();
    assert_eq!(took.num_seconds(), 30);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn panic_fails_the_try_and_the_worker_keeps_running() {
    let (h, _journal) = harness_with(|j, c| {
        let panicky = Probe { panic: true, ..Probe::new(j, c) };
        vec![
            Dag::builder("panicky").task(TaskSpec::rust("boom", panicky)).build().unwrap(),
            probe_dag("fine", j, c, &[("a", &[])]),
        ]
    })
    .await;
    let run = h.trigger("panicky").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    let task = &h.tasks(&run).await["boom"];
    assert_eq!(task.error.as_deref(), Some("task panicked: probe boom panics on purpose"));
    let log = h.store.read_log(&run, "boom", 1, 0).await.unwrap();
    assert_eq!(log.last().unwrap(), "[dagmq] try 1 failed: task panicked: probe boom panics on purpose");
    let next = h.trigger("fine").await;
    assert_eq!(h.wait_final(&next).await, RunState::Success);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn restart_reruns_only_failed_and_not_run_tasks() {
    let (h, journal) = harness_with(|j, c| {
        // Fails its first two tries: the first run (no retries) fails it once, the restart
        // fails it again, and only the second restart succeeds.
        let flaky = Probe { failures: 2, ..Probe::new(j, c) };
        vec![
            Dag::builder("etl")
                .task(TaskSpec::rust("extract", Probe::new(j, c)))
                .task(TaskSpec::rust("transform", flaky).after(["extract"]))
                .task(TaskSpec::rust("load", Probe::new(j, c)).after(["transform"]))
                .build()
                .unwrap(),
        ]
    })
    .await;
    let run = h.trigger("etl").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    assert_eq!(h.tasks(&run).await["load"].state, TaskState::UpstreamFailed);

    let conflict = h.scheduler.restart("etl--nope").await.unwrap_err();
    assert_eq!(conflict.to_string(), "unknown run \"etl--nope\"");

    h.scheduler.restart(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    h.scheduler.restart(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let tasks = h.tasks(&run).await;
    assert_eq!(tasks["extract"].try_number, 1, "a successful task is not re-run");
    assert_eq!(journal.times_of("start:extract").len(), 1);
    assert_eq!(tasks["transform"].try_number, 3, "try numbers continue across restarts");
    assert_eq!(tasks["load"].try_number, 1);
    // Logs of every try are still there, keyed by try.
    for try_number in 1..=3 {
        assert!(!h.store.read_log(&run, "transform", try_number, 0).await.unwrap().is_empty());
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn restart_of_a_running_run_is_a_conflict() {
    let (h, _journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(60), ..Probe::new(j, c) };
        vec![Dag::builder("slow").task(TaskSpec::rust("slow", slow)).build().unwrap()]
    })
    .await;
    let run = h.trigger("slow").await;
    h.wait_task(&run, "slow", |t| t.state == TaskState::Running).await;
    let err = h.scheduler.restart(&run).await.unwrap_err();
    assert_eq!(err.to_string(), format!("run {run:?} is running; only a finished run can be restarted"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cancel_stops_a_running_task() {
    let (h, journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(3600), ..Probe::new(j, c) };
        vec![
            Dag::builder("slow")
                .task(TaskSpec::rust("slow", slow))
                .task(TaskSpec::rust("next", Probe::new(j, c)).after(["slow"]))
                .build()
                .unwrap(),
        ]
    })
    .await;
    let run = h.trigger("slow").await;
    h.wait_task(&run, "slow", |t| t.state == TaskState::Running).await;
    h.scheduler.cancel(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Cancelled);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !journal.entries().contains(&"stopped:slow".to_string()) {
        assert!(tokio::time::Instant::now() < deadline, "the running task was not stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tasks = h.tasks(&run).await;
    assert_eq!(tasks["slow"].state, TaskState::Cancelled);
    assert_eq!(tasks["next"].state, TaskState::Cancelled);
    // Its log ends saying it was stopped, not that it failed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = h.store.read_log(&run, "slow", 1, 0).await.unwrap();
        if log.last().map(String::as_str) == Some("[dagmq] try 1 stopped: cancelled") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the log ends {:?}", log.last());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let again = h.scheduler.cancel(&run).await.unwrap_err();
    assert_eq!(again.to_string(), format!("run {run:?} is already cancelled"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn duplicate_delivery_runs_one_transition() {
    let (h, journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(5), ..Probe::new(j, c) };
        vec![Dag::builder("dup").task(TaskSpec::rust("t", slow)).build().unwrap()]
    })
    .await;
    let run = h.trigger("dup").await;
    let running = h.wait_task(&run, "t", |t| t.state == TaskState::Running).await;
    let record = h.store.run(&run).await.unwrap().unwrap();
    let duplicate = TaskToExec {
        v: VERSION,
        run_id: run.clone(),
        dag_id: "dup".into(),
        task_id: "t".into(),
        try_number: running.try_number,
        max_try: running.max_try,
        params: Default::default(),
        logical_date: record.logical_date,
        follow_up: None,
    };
    // Once while the try runs, and once more after it finished.
    h.queue.publish(&Topic::Tasks("default".into()), messages::encode(&duplicate)).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    h.queue.publish(&Topic::Tasks("default".into()), messages::encode(&duplicate)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while h.queue.depth(&Topic::Tasks("default".into())).await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(journal.times_of("start:t").len(), 1, "the duplicate message did not run the task again");
    let task = &h.tasks(&run).await["t"];
    assert_eq!((task.state, task.try_number), (TaskState::Success, 1));
    assert_eq!(h.queue.depth(&Topic::Dead).await.unwrap(), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn scheduler_restart_mid_run_resumes_from_the_store() {
    let (mut h, journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(30), ..Probe::new(j, c) };
        vec![
            Dag::builder("long")
                .task(TaskSpec::rust("first", Probe::new(j, c)))
                .task(TaskSpec::rust("slow", slow).after(["first"]))
                .task(TaskSpec::rust("last", Probe::new(j, c)).after(["slow"]))
                .build()
                .unwrap(),
        ]
    })
    .await;
    let run = h.trigger("long").await;
    h.wait_task(&run, "slow", |t| t.state == TaskState::Running).await;
    h.restart_scheduler().await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    for task in ["first", "slow", "last"] {
        assert_eq!(journal.times_of(&format!("start:{task}")).len(), 1, "{task} ran once");
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn follow_up_tasks_run_before_downstream() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let mut tasks = dagmq_worker::builtin_tasks();
    let (j, c) = (journal.clone(), clock.clone());
    tasks.register("probe", move |_| Ok(Arc::new(Probe::new(&j, &c)) as Arc<dyn Task>));
    let spawner = Probe {
        follow_ups: vec![
            FollowUp::new("part1", "probe", serde_json::json!({})),
            FollowUp::new("part2", "probe", serde_json::json!({})),
            FollowUp {
                after: vec!["part1".into(), "part2".into()],
                ..FollowUp::new("merge", "probe", serde_json::json!({}))
            },
        ],
        ..Probe::new(&journal, &clock)
    };
    let dag = Dag::builder("dynamic")
        .task(TaskSpec::rust("plan", spawner))
        .task(TaskSpec::rust("publish", Probe::new(&journal, &clock)).after(["plan"]))
        .build()
        .unwrap();
    let h = Harness::start_with(registry(vec![dag]), tasks).await;
    let run = h.trigger("dynamic").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let states = h.tasks(&run).await;
    assert_eq!(states.len(), 5);
    for id in ["plan.part1", "plan.part2", "plan.merge"] {
        assert_eq!(states[id].state, TaskState::Success, "{id}");
    }
    assert_before(&journal, "plan", "plan.part1");
    assert_before(&journal, "plan.part1", "plan.merge");
    assert_before(&journal, "plan.part2", "plan.merge");
    assert_before(&journal, "plan.merge", "publish");
    h.stop().await;
}

/// Found by the simulator (seed 35): the last task of a run succeeds with follow-ups, and the
/// store does not answer when the scheduler adds them. The run must not end before they ran: it
/// ended `success` with the follow-ups never added (or left `pending`).
#[tokio::test(start_paused = true)]
async fn a_run_does_not_end_before_the_follow_ups_of_its_last_task_are_added_and_run() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let mut tasks = dagmq_worker::builtin_tasks();
    let (j, c) = (journal.clone(), clock.clone());
    tasks.register("probe", move |_| Ok(Arc::new(Probe::new(&j, &c)) as Arc<dyn Task>));
    let spawner = Probe {
        follow_ups: vec![FollowUp::new("part1", "probe", serde_json::json!({}))],
        ..Probe::new(&journal, &clock)
    };
    let dag = Dag::builder("dynamic_last").task(TaskSpec::rust("plan", spawner)).build().unwrap();
    let h = Harness::start_with(registry(vec![dag]), tasks).await;
    h.scheduler_faults.store.add_tasks_failing.store(2, std::sync::atomic::Ordering::SeqCst);
    let run = h.trigger("dynamic_last").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let states = h.tasks(&run).await;
    let part1 = states.get("plan.part1").map(|t| t.state);
    assert_eq!(part1, Some(TaskState::Success), "the follow-up of the last task never ran: {states:?}");
    assert_before(&journal, "plan", "plan.part1");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn follow_up_naming_an_unknown_task_fails_the_parent() {
    let (h, _journal) = harness_with(|j, c| {
        let spawner =
            Probe { follow_ups: vec![FollowUp::new("x", "no-such-task", serde_json::Value::Null)], ..Probe::new(j, c) };
        vec![Dag::builder("bad-dynamic").task(TaskSpec::rust("plan", spawner)).build().unwrap()]
    })
    .await;
    let run = h.trigger("bad-dynamic").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    assert_eq!(h.tasks(&run).await["plan"].error.as_deref(), Some("follow-up \"x\": unknown task \"no-such-task\""));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn schedule_catches_up_in_order_and_holds_max_active_runs() {
    let (h, _journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(60), ..Probe::new(j, c) };
        vec![
            Dag::builder("every5m")
                .schedule("@every 5m")
                .start(origin() - chrono::Duration::hours(1))
                .max_active_runs(2)
                .task(TaskSpec::rust("t", slow))
                .build()
                .unwrap(),
        ]
    })
    .await;
    // 13 due points from start to now inclusive; two run at once, the rest wait as queued.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let runs = loop {
        let runs = h.store.list_runs(&dagmq_core::store::RunFilter { limit: 100, ..Default::default() }).await.unwrap();
        if runs.len() >= 13 {
            break runs;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {} runs", runs.len());
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let running = runs.iter().filter(|r| r.state == RunState::Running).count();
    assert!(running <= 2, "{running} runs at once");
    let mut points: Vec<_> = runs.iter().map(|r| r.logical_date).collect();
    points.sort();
    assert_eq!(points.first(), Some(&(origin() - chrono::Duration::hours(1))));
    assert_eq!(points.last(), Some(&origin()));
    // Runs start oldest first.
    let oldest = runs.iter().min_by_key(|r| r.logical_date).unwrap();
    assert_eq!(oldest.state, RunState::Running);
    // Every catch-up run finishes, two at a time, and the schedule keeps going.
    h.wait_run(&oldest.run_id, |r| r.state == RunState::Success).await;
    let newest = runs.iter().max_by_key(|r| r.logical_date).unwrap();
    h.wait_run(&newest.run_id, |r| r.state == RunState::Success).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn paused_dag_gets_no_scheduled_runs_until_unpaused() {
    let (h, _journal) = harness_with(|j, c| {
        vec![
            Dag::builder("paused")
                .schedule("@every 10s")
                .start(origin())
                .catch_up(false)
                .paused(true)
                .task(TaskSpec::rust("t", Probe::new(j, c)))
                .build()
                .unwrap(),
        ]
    })
    .await;
    let all = dagmq_core::store::RunFilter { limit: 100, ..Default::default() };
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(h.store.list_runs(&all).await.unwrap().is_empty());
    h.scheduler.set_paused("paused", false).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let runs = loop {
        let runs = h.store.list_runs(&all).await.unwrap();
        if !runs.is_empty() {
            break runs;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Without catch-up only the latest missed point runs.
    assert_eq!(runs.len(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn triggers_from_the_queue_dedupe_by_key_and_bad_ones_are_dead_lettered() {
    let (h, _journal) = harness_with(|j, c| vec![probe_dag("etl", j, c, &[("a", &[])])]).await;
    let trigger = br#"{"v":1,"dag_id":"etl","params":{"date":"2026-11-22"},"key":"etl-2026-11-22"}"#;
    h.queue.publish(&Topic::Triggers, trigger.to_vec()).await.unwrap();
    h.queue.publish(&Topic::Triggers, trigger.to_vec()).await.unwrap();
    for bad in [&b"{not json"[..], br#"{"v":1,"dag_id":"nope"}"#, br#"{"v":9,"dag_id":"etl"}"#] {
        h.queue.publish(&Topic::Triggers, bad.to_vec()).await.unwrap();
    }
    let mut dead = h.queue.consume(&Topic::Dead, 10).await.unwrap();
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), dead.next()).await.unwrap().unwrap().unwrap();
        reasons.push(delivery.error.clone().unwrap());
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        reasons,
        vec![
            "trigger: malformed message: key must be a string at line 1 column 2",
            "trigger: unknown dag \"nope\"",
            "trigger: unsupported message version 9 (this build reads v=1)",
        ]
    );
    let runs = h.store.list_runs(&dagmq_core::store::RunFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(runs.len(), 1, "the repeated key created no second run");
    assert_eq!(runs[0].params["date"], serde_json::json!("2026-11-22"));
    assert_eq!(runs[0].kind, dagmq_core::RunKind::Message, "a run a trigger message asked for says so");
    assert!(runs[0].run_id.starts_with("etl--message--"), "its id says so too: {}", runs[0].run_id);
    assert_eq!(h.wait_final(&runs[0].run_id).await, RunState::Success);
    // The scheduler keeps serving.
    let next = h.trigger("etl").await;
    assert_eq!(h.wait_final(&next).await, RunState::Success);
    assert_eq!(h.store.run(&next).await.unwrap().unwrap().kind, dagmq_core::RunKind::Manual);
    assert!(next.starts_with("etl--manual--"), "{next}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn graceful_worker_stop_finishes_in_flight_tries() {
    let (mut h, journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(10), ..Probe::new(j, c) };
        vec![Dag::builder("slow").task(TaskSpec::rust("slow", slow)).build().unwrap()]
    })
    .await;
    let run = h.trigger("slow").await;
    h.wait_task(&run, "slow", |t| t.state == TaskState::Running).await;
    h.stop_worker().await;
    let task = &h.tasks(&run).await["slow"];
    assert_eq!((task.state, task.try_number), (TaskState::Success, 1));
    assert_eq!(journal.times_of("end:slow").len(), 1);
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn worker_stop_past_the_grace_period_requeues_as_a_new_try() {
    let (mut h, journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(120), ..Probe::new(j, c) };
        vec![Dag::builder("slow").task(TaskSpec::rust("slow", slow).retries(1)).build().unwrap()]
    })
    .await;
    let run = h.trigger("slow").await;
    h.wait_task(&run, "slow", |t| t.state == TaskState::Running).await;
    h.stop_worker().await;
    let task = &h.tasks(&run).await["slow"];
    assert_eq!((task.state, task.try_number), (TaskState::Queued, 2), "interrupted try requeued as try 2");
    assert_eq!(task.tries_left(), 1, "the stopped try does not count against the retries");
    assert_eq!(journal.entries(), vec!["start:slow", "stopped:slow"]);
    h.start_worker();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    assert_eq!(h.tasks(&run).await["slow"].try_number, 2);
    h.stop().await;
}

/// A second stop (Ctrl-C twice) ends the grace period at once: the running try is stopped and
/// requeued then, not after the hour the grace period would allow.
#[tokio::test(start_paused = true)]
async fn a_worker_told_to_hurry_while_stopping_ends_its_grace_period_at_once() {
    let (mut h, journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(7200), ..Probe::new(j, c) };
        vec![Dag::builder("slow").task(TaskSpec::rust("slow", slow).retries(1)).build().unwrap()]
    })
    .await;
    h.stop_worker().await;
    let live = Arc::new(dagmq_core::LiveDags::new(h.dags.clone(), Vec::new(), Default::default()));
    let (hurry, hurried) = dagmq_core::CancelSignal::new();
    let (stop, worker, _) = h.extra_worker("worker-2", live, &Default::default(), |config| {
        config.grace_period = Duration::from_secs(3600);
        config.hurry = Some(hurried);
    });
    let run = h.trigger("slow").await;
    h.wait_task(&run, "slow", |t| t.state == TaskState::Running).await;
    let stopping = tokio::time::Instant::now();
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!worker.is_finished(), "the try still has its grace period");
    hurry.cancel();
    worker.await.unwrap().unwrap();
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(60), "stopped {took:?} after the first stop, not at once after the second");
    let task = &h.tasks(&run).await["slow"];
    assert_eq!((task.state, task.try_number), (TaskState::Queued, 2), "the stopped try requeued as try 2");
    assert_eq!(journal.entries(), vec!["start:slow", "stopped:slow"]);
    // Try 1 is filed with why it ended and the last lines of its own log.
    let filed = &task.tries[0];
    assert_eq!(
        (filed.outcome.as_str(), filed.error.as_deref()),
        ("interrupted", Some("try 1 interrupted: worker worker-2 shut down"))
    );
    assert!(
        filed.log_tail.last().is_some_and(|line| line.starts_with("[dagmq] try 1 stopped: ")),
        "{:?}",
        filed.log_tail
    );
    assert!(task.log_tail.is_empty(), "try 2 begins with no lines: {:?}", task.log_tail);
    h.start_worker();
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn notifications_on_final_failure_once_and_on_retry_when_asked() {
    let (h, _journal) = harness_with(|j, c| {
        let broken = Probe { failures: u32::MAX, ..Probe::new(j, c) };
        let quiet = Probe { failures: u32::MAX, ..Probe::new(j, c) };
        vec![
            Dag::builder("alerts")
                .task(TaskSpec::rust("loud", broken).retries(2).alerts(true, true).retry_delay(
                    Duration::from_secs(1),
                    1.0,
                    Duration::from_secs(1),
                ))
                .task(TaskSpec::rust("quiet", quiet).alerts(false, false))
                .build()
                .unwrap(),
        ]
    })
    .await;
    let run = h.trigger("alerts").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut sent: Vec<(String, String, u32)> = h
        .notifications
        .lock()
        .unwrap()
        .iter()
        .map(|n| (format!("{:?}", n.kind), n.task_id.clone(), n.try_number))
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        vec![
            ("Failure".to_string(), "loud".to_string(), 3),
            ("Retry".to_string(), "loud".to_string(), 1),
            ("Retry".to_string(), "loud".to_string(), 2),
        ]
    );
    let failure = h.notifications.lock().unwrap().iter().find(|n| n.try_number == 3).cloned().unwrap();
    assert_eq!(failure.error.as_deref(), Some("failure 3"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn run_timeout_cancels_unfinished_tasks_and_fails_the_run() {
    let (h, journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(600), ..Probe::new(j, c) };
        vec![
            Dag::builder("bounded")
                .run_timeout(Duration::from_secs(60))
                .task(TaskSpec::rust("quick", Probe::new(j, c)))
                .task(TaskSpec::rust("slow", slow).after(["quick"]))
                .task(TaskSpec::rust("never", Probe::new(j, c)).after(["slow"]))
                .build()
                .unwrap(),
        ]
    })
    .await;
    let run = h.trigger("bounded").await;
    let record = h.wait_run(&run, |r| r.state.is_final()).await;
    assert_eq!(record.state, RunState::Failed);
    let took = record.ended_at.unwrap() - record.started_at.unwrap();
    assert_eq!(took.num_seconds(), 60);
    let tasks = h.tasks(&run).await;
    assert_eq!(tasks["quick"].state, TaskState::Success);
    assert_eq!(tasks["slow"].state, TaskState::Cancelled);
    assert_eq!(tasks["slow"].error.as_deref(), Some("run timed out after 1m"));
    assert_eq!(tasks["never"].state, TaskState::Cancelled);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !journal.entries().contains(&"stopped:slow".to_string()) {
        assert!(tokio::time::Instant::now() < deadline, "the running task was not stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn progress_and_worker_are_visible_while_running() {
    let (h, _journal) = harness_with(|j, c| {
        let slow = Probe { work: Duration::from_secs(30), ..Probe::new(j, c) };
        vec![Dag::builder("progress").task(TaskSpec::rust("t", slow)).build().unwrap()]
    })
    .await;
    let run = h.trigger("progress").await;
    let task = h.wait_task(&run, "t", |t| t.progress == Some(0.5)).await;
    assert_eq!(task.state, TaskState::Running);
    assert_eq!(task.worker.as_deref(), Some("worker-1"));
    let workers = h.store.workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let workers = h.store.workers().await.unwrap();
    assert_eq!(workers[0].running.len(), 1, "the heartbeat lists the running try");
    assert_eq!(workers[0].running[0].task_id, "t");
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    h.stop().await;
}

/// Found by the simulator (seed 117): the store starts a queued run (`queued` -> `running`) but
/// the answer is lost. The scheduler must still count that run under `max_active_runs`: it
/// started the next queued run of the DAG at once, so two ran while the DAG allows one.
#[tokio::test(start_paused = true)]
async fn a_run_start_whose_answer_was_lost_still_holds_its_place_under_max_active_runs() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let slow = Probe { work: Duration::from_secs(30), ..Probe::new(&journal, &clock) };
    let dag = Dag::builder("one_at_a_time").max_active_runs(1).task(TaskSpec::rust("work", slow)).build().unwrap();
    let h = Harness::start_with(registry(vec![dag]), dagmq_worker::builtin_tasks()).await;
    *h.scheduler_faults.store.lose_run_answer_to.lock().unwrap() = Some(RunState::Running);
    let first = h.trigger("one_at_a_time").await;
    let second = h.trigger("one_at_a_time").await;
    let first_done = h.wait_run(&first, |r| r.state.is_final()).await;
    let second_done = h.wait_run(&second, |r| r.state.is_final()).await;
    assert_eq!((first_done.state, second_done.state), (RunState::Success, RunState::Success));
    let (a, b) = if first_done.started_at <= second_done.started_at {
        (first_done, second_done)
    } else {
        (second_done, first_done)
    };
    assert!(
        b.started_at >= a.ended_at,
        "two runs of a DAG with max_active_runs 1 ran at once: {} ran {:?}..{:?}, {} started {:?}",
        a.run_id,
        a.started_at,
        a.ended_at,
        b.run_id,
        b.started_at
    );
    h.stop().await;
}

/// Found by the simulator (seed 2002351): a queued run's start applied but its answer was lost,
/// so the run waits at the head of its DAG's queue holding its place; then a clear of a finished
/// run of the DAG (reopened as `queued`, the DAG's slot being taken) applied and its answer was
/// lost too. The cleared run must not jump ahead of the run in doubt: it was put at the head of
/// the queue and started at once, while the run in doubt was `running` already, so two runs of a
/// DAG with `max_active_runs` 1 ran at once.
#[tokio::test(start_paused = true)]
async fn a_clear_in_doubt_does_not_start_ahead_of_a_run_start_in_doubt() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let slow = Probe { work: Duration::from_secs(30), ..Probe::new(&journal, &clock) };
    let dag = Dag::builder("one_at_a_time").max_active_runs(1).task(TaskSpec::rust("work", slow)).build().unwrap();
    let h = Harness::start_with(registry(vec![dag]), dagmq_worker::builtin_tasks()).await;
    let finished = h.trigger("one_at_a_time").await;
    assert_eq!(h.wait_final(&finished).await, RunState::Success);
    let running = h.trigger("one_at_a_time").await;
    h.wait_run(&running, |r| r.state == RunState::Running).await;
    let waiting = h.trigger("one_at_a_time").await;

    // The most runs of the DAG the store ever holds `running` at once, seen every 10 ms.
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watch = {
        let (store, most) = (h.store.clone(), most.clone());
        tokio::spawn(async move {
            loop {
                let runs = store.list_runs(&dagmq_core::store::RunFilter { limit: 100, ..Default::default() }).await;
                let now = runs.unwrap().iter().filter(|r| r.state == RunState::Running).count();
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // `running` ends; the start of `waiting` applies, its answer is lost, and the run cannot be
    // read again meanwhile, so it waits at the head of the DAG's queue, in doubt.
    let faults = &h.scheduler_faults.store;
    faults.lost_run_answer_hides_run.store(true, Ordering::SeqCst);
    *faults.lose_run_answer_to.lock().unwrap() = Some(RunState::Running);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while faults.lose_run_answer_to.lock().unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "precondition: the start of {waiting} was not tried");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(faults.run_reads_failing.load(Ordering::SeqCst), "precondition: the start's answer was lost");
    faults.lost_run_answer_hides_run.store(false, Ordering::SeqCst);
    faults.run_reads_failing.store(false, Ordering::SeqCst);
    // The clear of the finished run reopens it `queued` (the slot is taken); its answer is lost.
    *faults.lose_run_answer_to.lock().unwrap() = Some(RunState::Queued);
    let cleared = h.scheduler.clear(&finished, vec!["work".into()], false).await;
    let fault = faults.lose_run_answer_to.lock().unwrap().take();
    assert_eq!(fault, None, "precondition: the clear's answer was lost (it answered {cleared:?})");

    for run in [&running, &waiting, &finished] {
        assert_eq!(h.wait_final(run).await, RunState::Success, "{run}");
    }
    watch.abort();
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "two runs of a DAG with max_active_runs 1 ran at once (the cleared run {finished} started ahead of \
         {waiting}, whose start's answer was lost)"
    );
    h.stop().await;
}

/// Found by the simulator: a restart (or a clear) made a finished run `running` at once, though
/// its DAG's `max_active_runs` was taken by another run. It must wait `queued` for a slot, as a
/// new run does (Airflow's cleared runs go back to `queued` too).
#[tokio::test(start_paused = true)]
async fn a_restarted_run_waits_for_a_slot_under_max_active_runs() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let failing = Probe { failures: 1, ..Probe::new(&journal, &clock) };
    let slow = Probe { work: Duration::from_secs(60), ..Probe::new(&journal, &clock) };
    let dag = Dag::builder("single")
        .max_active_runs(1)
        .task(TaskSpec::rust("flaky", failing))
        .task(TaskSpec::rust("long", slow).after(["flaky"]).trigger_rule(TriggerRule::AllDone))
        .build()
        .unwrap();
    let h = Harness::start_with(registry(vec![dag]), dagmq_worker::builtin_tasks()).await;
    let first = h.trigger("single").await;
    assert_eq!(h.wait_final(&first).await, RunState::Failed);
    let second = h.trigger("single").await;
    h.wait_run(&second, |r| r.state == RunState::Running).await;
    h.scheduler.restart(&first).await.unwrap();
    let restarted = h.store.run(&first).await.unwrap().unwrap();
    assert_eq!(restarted.state, RunState::Queued, "the restarted run took a slot max_active_runs does not have");
    let second_done = h.wait_run(&second, |r| r.state.is_final()).await;
    let first_done = h.wait_run(&first, |r| r.state.is_final()).await;
    assert_eq!(first_done.state, RunState::Success);
    assert!(first_done.started_at >= second_done.ended_at, "{first_done:?} started before {second_done:?} ended");
    h.stop().await;
}

/// Found by the simulator (seed 18): a restart whose store step applied but whose answer was
/// lost left the run `running` in the store and unknown to the scheduler, which then started
/// another run of the DAG beside it, over `max_active_runs`.
#[tokio::test(start_paused = true)]
async fn a_restart_whose_answer_was_lost_still_holds_its_place_under_max_active_runs() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let failing = Probe { failures: 1, ..Probe::new(&journal, &clock) };
    let slow = Probe { work: Duration::from_secs(60), ..Probe::new(&journal, &clock) };
    let dag = Dag::builder("single_restart")
        .max_active_runs(1)
        .task(TaskSpec::rust("flaky", failing))
        .task(TaskSpec::rust("long", slow).after(["flaky"]).trigger_rule(TriggerRule::AllDone))
        .build()
        .unwrap();
    let h = Harness::start_with(registry(vec![dag]), dagmq_worker::builtin_tasks()).await;
    let first = h.trigger("single_restart").await;
    assert_eq!(h.wait_final(&first).await, RunState::Failed);
    *h.scheduler_faults.store.lose_run_answer_to.lock().unwrap() = Some(RunState::Running);
    assert!(h.scheduler.restart(&first).await.is_err(), "the restart's answer was to be lost");
    let second = h.trigger("single_restart").await;
    let first_done = h.wait_run(&first, |r| r.state.is_final()).await;
    let second_done = h.wait_run(&second, |r| r.state.is_final()).await;
    assert_eq!((first_done.state, second_done.state), (RunState::Success, RunState::Success));
    assert!(
        second_done.started_at >= first_done.ended_at,
        "two runs of a DAG with max_active_runs 1 ran at once: {first_done:?} and {second_done:?}"
    );
    h.stop().await;
}

/// Found by the simulator (seeds 83, 119): the store queued a task (compare-and-set applied)
/// but the answer was lost, so the scheduler did not count the task under its pool and queued
/// another one into the full pool. Two tasks of a one-slot pool ran at once.
#[tokio::test(start_paused = true)]
async fn a_queueing_whose_answer_was_lost_still_takes_its_pool_slot() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let work = Probe { work: Duration::from_secs(30), ..Probe::new(&journal, &clock) };
    let dag = Dag::builder("pooled").task(TaskSpec::rust("a", work).pool("db", 1)).build().unwrap();
    let pools: dagmq_core::Pools = [("db".to_string(), 1)].into_iter().collect();
    let h = Harness::start_with_pools(registry(vec![dag]), dagmq_worker::builtin_tasks(), pools).await;
    h.scheduler_faults.store.queue_answers_lost.store(1, std::sync::atomic::Ordering::SeqCst);
    let first = h.trigger("pooled").await;
    let second = h.trigger("pooled").await;
    assert_eq!(h.wait_final(&first).await, RunState::Success);
    assert_eq!(h.wait_final(&second).await, RunState::Success);
    let starts = journal.times_of("start:a");
    let ends = journal.times_of("end:a");
    assert_eq!(starts.len(), 2, "{:?}", journal.entries());
    assert!(starts[1] >= ends[0], "a ran twice at once in a one-slot pool: starts {starts:?}, ends {ends:?}");
    h.stop().await;
}

/// Found by the simulator (seed 1001476): a queueing batch in which one compare-and-set was
/// refused (a worker had claimed `b` eagerly, which the scheduler did not know: the batch read
/// of the status update failed) and another applied (`c`, in a one-slot pool). Reading `b`
/// again failed, and the scheduler gave up on the batch's answer there: `c` stayed pending in
/// its view, queued in the store, holding no share of its pool and with no message sent. The
/// next run's `c` was queued into the full pool, and both ran at once.
#[tokio::test(start_paused = true)]
async fn a_queueing_batch_whose_refused_task_cannot_be_read_again_still_takes_the_pool_slots_of_the_others() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let slow = Probe { work: Duration::from_secs(30), ..Probe::new(&journal, &clock) };
    let dag = Dag::builder("pooled")
        .task(TaskSpec::rust("a", Probe::new(&journal, &clock)))
        .task(TaskSpec::rust("b", Probe::new(&journal, &clock)).after(["a"]))
        .task(TaskSpec::rust("c", slow).after(["a"]).pool("api", 1))
        .build()
        .unwrap();
    let pools: dagmq_core::Pools = [("api".to_string(), 1)].into_iter().collect();
    let h = Harness::start_with_pools(registry(vec![dag]), dagmq_worker::builtin_tasks(), pools).await;
    let faults = &h.scheduler_faults.store;
    faults.task_batch_reads_failing.store(true, std::sync::atomic::Ordering::SeqCst);
    faults.refused_rereads_failing.store(1, std::sync::atomic::Ordering::SeqCst);
    let first = h.trigger("pooled").await;
    h.wait_task(&first, "c", |t| t.state == TaskState::Queued || t.state == TaskState::Running).await;
    assert!(
        faults.task_reads_failing_for.lock().unwrap().is_empty(),
        "the refused task was read again (and the read failed)"
    );
    faults.task_batch_reads_failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let second = h.trigger("pooled").await;
    assert_eq!(h.wait_final(&first).await, RunState::Success);
    assert_eq!(h.wait_final(&second).await, RunState::Success);
    let starts = journal.times_of("start:c");
    let ends = journal.times_of("end:c");
    assert_eq!(starts.len(), 2, "{:?}", journal.entries());
    assert!(starts[1] >= ends[0], "c ran twice at once in a one-slot pool: starts {starts:?}, ends {ends:?}");
    h.stop().await;
}

/// Found by the simulator (seed 235), the scheduler's side of race 2: `D` after `[P, A]`, `P`
/// succeeds with follow-ups that the store does not take at first (`add_tasks` fails), then `A`
/// succeeds. The scheduler decided `D` from its upstream counts (both succeeded) and queued it
/// before the follow-ups were added and had run.
#[tokio::test(start_paused = true)]
async fn a_task_waits_for_follow_ups_of_an_upstream_not_added_yet() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let mut tasks = dagmq_worker::builtin_tasks();
    let (j, c) = (journal.clone(), clock.clone());
    tasks.register("probe", move |_| Ok(Arc::new(Probe::new(&j, &c)) as Arc<dyn Task>));
    let parent = Probe {
        follow_ups: vec![FollowUp::new("part", "probe", serde_json::json!({}))],
        ..Probe::new(&journal, &clock)
    };
    let slower = Probe { work: Duration::from_secs(2), ..Probe::new(&journal, &clock) };
    let dag = Dag::builder("follow_join")
        .task(TaskSpec::rust("p", parent))
        .task(TaskSpec::rust("a", slower))
        .task(TaskSpec::rust("d", Probe::new(&journal, &clock)).after(["p", "a"]))
        .build()
        .unwrap();
    let mut h = Harness::start_with(registry(vec![dag]), tasks).await;
    // No eager claims: this is the scheduler's own decision.
    h.stop_worker().await;
    h.eager = false;
    h.start_worker();
    h.scheduler_faults.store.add_tasks_failing.store(3, std::sync::atomic::Ordering::SeqCst);
    let run = h.trigger("follow_join").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    assert_before(&journal, "p.part", "d");
    h.stop().await;
}

/// Found by the simulator (seed 2008629): a cancel whose run write applied but answered an
/// error returned before the scheduler dropped its view of the run, so the view kept the run
/// `running` and its DAG's slot taken. A restart (allowed: the store had the run `cancelled`)
/// found no room under max_active_runs 1 and queued the run, and the stale view went on queueing
/// its tasks in a run the store had `queued`: the run and every later run of the DAG hung.
#[tokio::test(start_paused = true)]
async fn a_cancel_whose_answer_was_lost_then_a_restart_runs_the_run_and_the_next_one() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let slow = Probe { work: Duration::from_secs(60), ..Probe::new(&journal, &clock) };
    let dag = Dag::builder("single_cancel")
        .max_active_runs(1)
        .task(TaskSpec::rust("t0", slow))
        .task(TaskSpec::rust("t1", Probe::new(&journal, &clock)).after(["t0"]))
        .build()
        .unwrap();
    let h = Harness::start_with(registry(vec![dag]), dagmq_worker::builtin_tasks()).await;
    let first = h.trigger("single_cancel").await;
    h.wait_task(&first, "t0", |t| t.state == TaskState::Running).await;
    *h.scheduler_faults.store.lose_run_answer_to.lock().unwrap() = Some(RunState::Cancelled);
    let lost = h.scheduler.cancel(&first).await;
    let fault = h.scheduler_faults.store.lose_run_answer_to.lock().unwrap().take();
    assert_eq!(fault, None, "precondition: the cancel's answer was lost (the command answered {lost:?})");
    assert!(lost.is_err(), "the cancel's answer was lost, yet it answered {lost:?}");
    assert_eq!(h.store.run(&first).await.unwrap().unwrap().state, RunState::Cancelled, "precondition: it applied");
    h.scheduler.restart(&first).await.unwrap();
    let second = h.trigger("single_cancel").await;
    let first_done = h.wait_run(&first, |r| r.state.is_final()).await;
    let second_done = h.wait_run(&second, |r| r.state.is_final()).await;
    assert_eq!((first_done.state, second_done.state), (RunState::Success, RunState::Success));
    assert!(
        second_done.started_at >= first_done.ended_at,
        "two runs of a DAG with max_active_runs 1 ran at once: {first_done:?} and {second_done:?}"
    );
    h.stop().await;
}

/// Found by the simulator (seed 2005020): a retry whose timer fired while its DAG's
/// max_active_tasks was full waited for the limit, and when the slot freed the wake-up took it
/// off the wait queue without queueing it (only `pending` tasks were queued there). Under steady
/// load the retry was starved for ever; here it must be queued as soon as the slot frees.
#[tokio::test(start_paused = true)]
async fn a_retry_due_while_max_active_tasks_is_full_is_queued_when_the_slot_frees() {
    let journal = Journal::default();
    let clock = Arc::new(dagmq_core::TokioClock::starting_at(origin()));
    let flaky = Probe { failures: 1, ..Probe::new(&journal, &clock) };
    let slow = Probe { work: Duration::from_secs(60), ..Probe::new(&journal, &clock) };
    let dag = Dag::builder("one_slot")
        .max_active_tasks(1)
        .task(TaskSpec::rust("flaky", flaky).retries(1).retry_delay(
            Duration::from_secs(5),
            1.0,
            Duration::from_secs(5),
        ))
        .task(TaskSpec::rust("long", slow))
        .build()
        .unwrap();
    let h = Harness::start_with(registry(vec![dag]), dagmq_worker::builtin_tasks()).await;
    let run = h.trigger("one_slot").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success, "{:?}", journal.entries());
    let flaky_starts = journal.times_of("start:flaky");
    let long_starts = journal.times_of("start:long");
    let long_ends = journal.times_of("end:long");
    assert_eq!(flaky_starts.len(), 2, "{:?}", journal.entries());
    assert!(
        flaky_starts[0] < long_starts[0] && long_starts[0] < flaky_starts[0] + chrono::Duration::seconds(5),
        "precondition: flaky failed first and long took the slot before its retry was due: {:?}",
        journal.entries()
    );
    // The retry was due while long held the slot: it is queued (try 2) as the slot frees, not
    // when a later sweep happens to find the slot free.
    assert!(
        flaky_starts[1] >= long_ends[0] && flaky_starts[1] - long_ends[0] < chrono::Duration::seconds(1),
        "the retry was not queued when the slot freed: long ended at {}, flaky's try 2 started at {}",
        long_ends[0],
        flaky_starts[1]
    );
    assert_eq!(h.store.task(&run, "flaky").await.unwrap().unwrap().try_number, 2);
    h.stop().await;
}

/// The trace context travels in the task message, as W3C `traceparent`: the run's trace and its
/// root span, so that the span of the try (on whichever worker takes the message) joins the
/// run's trace.
#[tokio::test(start_paused = true)]
async fn a_task_message_carries_its_runs_trace_parent_as_a_header() {
    let mut dags = DagRegistry::new();
    dags.add(Dag::builder("traced").task(TaskSpec::rust("t", dagmq_worker::Noop)).build().unwrap()).unwrap();
    let mut h = Harness::start(dags).await;
    h.stop_worker().await;
    let run = h.trigger("traced").await;
    let mut tasks = h.queue.consume(&Topic::Tasks("default".to_string()), 1).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), tasks.next()).await.unwrap().unwrap().unwrap();
    let message: TaskToExec = messages::decode(&delivery.payload).unwrap();
    assert_eq!((message.run_id.as_str(), message.task_id.as_str()), (run.as_str(), "t"));
    let expected = dagmq_core::trace::TraceParent::of_run(&run).header();
    assert_eq!(delivery.header(dagmq_core::trace::TRACEPARENT_HEADER), Some(expected.as_str()));
    assert!(expected.starts_with("00-") && expected.ends_with("-01"), "{expected}");
    h.stop().await;
}
