//! One suite of `Store` behaviour, run against the in-memory store and against Redis.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use dagmq_core::dag_version::DagVersionRecord;
use dagmq_core::memory::MemoryStore;
use dagmq_core::records::{DagRecord, RunningTry};
use dagmq_core::store::{
    ClaimAnswer, Claimant, CreateRun, EagerClaim, Fence, FinishedAndClaimed, FinishedTry, LOG_CUT_MARKER, LeaseTerm,
    MAX_LOG_LINES_PER_TRY, NextClaim, RunFilter, TaskChange,
};
use dagmq_core::{
    Clock, FollowUp, RunKind, RunRecord, RunState, Store, TaskInstance, TaskState, TokioClock, WorkerInfo,
};

use crate::services::redis_store;

fn at(seconds: i64) -> DateTime<Utc> {
    crate::support::origin() + Duration::seconds(seconds)
}

fn run(id: &str, dag: &str, created: i64, key: Option<&str>) -> RunRecord {
    RunRecord {
        run_id: id.to_string(),
        dag_id: dag.to_string(),
        state: RunState::Queued,
        kind: RunKind::Manual,
        logical_date: at(created),
        params: [("date".to_string(), serde_json::json!("2026-11-22"))].into(),
        key: key.map(str::to_string),
        created_at: at(created),
        started_at: None,
        ended_at: None,
        dag_version: Some("v1".to_string()),
    }
}

/// A stored version of `dag`: tasks `a` and `b` after it, as `tasks()` makes them.
pub fn version(dag: &str, version: &str) -> DagVersionRecord {
    let built = dagmq_core::Dag::builder(dag)
        .version(version)
        .task(dagmq_core::TaskSpec::command("a", ["true"]).retries(1))
        .task(dagmq_core::TaskSpec::command("b", ["true"]).after(["a"]))
        .build()
        .expect("a valid dag");
    DagVersionRecord::of(&built)
}

/// Stores the versions the runs of these scenarios name, as a scheduler does first.
async fn store_versions(store: &dyn Store) {
    for dag in ["etl", "other"] {
        store.put_dag_version(&version(dag, "v1")).await.unwrap();
    }
}

fn tasks() -> Vec<TaskInstance> {
    vec![
        TaskInstance::pending("a", vec![], "default", 1),
        TaskInstance::pending("b", vec!["a".to_string()], "default", 0),
    ]
}

fn with(task: &TaskInstance, state: TaskState, try_number: u32) -> TaskInstance {
    TaskInstance { state, try_number, ..task.clone() }
}

async fn contract(store: Arc<dyn Store>) {
    store_versions(store.as_ref()).await;
    // Runs: creation is idempotent by id and by (dag, key).
    assert_eq!(store.create_run(&run("r1", "etl", 1, Some("k")), &tasks()).await.unwrap(), CreateRun::Created);
    assert_eq!(store.create_run(&run("r1", "etl", 1, None), &tasks()).await.unwrap(), CreateRun::Exists("r1".into()));
    assert_eq!(
        store.create_run(&run("r2", "etl", 2, Some("k")), &tasks()).await.unwrap(),
        CreateRun::Exists("r1".into())
    );
    assert_eq!(store.create_run(&run("r3", "other", 3, Some("k")), &tasks()).await.unwrap(), CreateRun::Created);
    assert_eq!(store.create_run(&run("r4", "etl", 4, None), &tasks()).await.unwrap(), CreateRun::Created);
    let stored = store.run("r1").await.unwrap().unwrap();
    assert_eq!(stored, run("r1", "etl", 1, Some("k")));
    assert_eq!(store.run("nope").await.unwrap(), None);

    // Listing: newest first, by DAG, by state, limited.
    let all = RunFilter { limit: 10, ..RunFilter::default() };
    let ids = |runs: Vec<RunRecord>| runs.into_iter().map(|r| r.run_id).collect::<Vec<_>>();
    assert_eq!(ids(store.list_runs(&all).await.unwrap()), vec!["r4", "r3", "r1"]);
    let etl = RunFilter { dag_id: Some("etl".into()), limit: 10, ..RunFilter::default() };
    assert_eq!(ids(store.list_runs(&etl).await.unwrap()), vec!["r4", "r1"]);
    assert_eq!(ids(store.list_runs(&RunFilter { limit: 1, ..all.clone() }).await.unwrap()), vec!["r4"]);
    // Pages: an offset skips that many matching runs.
    assert_eq!(ids(store.list_runs(&RunFilter { limit: 1, offset: 1, ..all.clone() }).await.unwrap()), vec!["r3"]);
    assert_eq!(ids(store.list_runs(&RunFilter { offset: 2, ..all.clone() }).await.unwrap()), vec!["r1"]);
    assert_eq!(ids(store.list_runs(&RunFilter { offset: 1, ..etl.clone() }).await.unwrap()), vec!["r1"]);
    assert!(store.list_runs(&RunFilter { offset: 3, ..all.clone() }).await.unwrap().is_empty());

    // Run compare-and-set.
    let mut running = stored.clone();
    running.state = RunState::Running;
    running.started_at = Some(at(5));
    assert!(store.transition_run(RunState::Queued, &running).await.unwrap());
    assert!(!store.transition_run(RunState::Queued, &running).await.unwrap(), "a second identical move is refused");
    let mut done = running.clone();
    done.state = RunState::Success;
    assert!(store.transition_run(RunState::Running, &done).await.unwrap());
    let success = RunFilter { state: Some(RunState::Success), limit: 10, ..RunFilter::default() };
    assert_eq!(ids(store.list_runs(&success).await.unwrap()), vec!["r1"]);
    assert!(store.list_runs(&RunFilter { offset: 1, ..success.clone() }).await.unwrap().is_empty());
    // A finished run that is restarted and fails is listed under its new state only, alone or
    // with its DAG, and under its old one again once it succeeds.
    let failed = RunFilter { state: Some(RunState::Failed), limit: 10, ..RunFilter::default() };
    let mut again = done.clone();
    for (from, to) in [(RunState::Success, RunState::Running), (RunState::Running, RunState::Failed)] {
        again.state = to;
        assert!(store.transition_run(from, &again).await.unwrap());
    }
    assert!(store.list_runs(&success).await.unwrap().is_empty());
    assert_eq!(ids(store.list_runs(&failed).await.unwrap()), vec!["r1"]);
    let failed_of = |dag: &str| RunFilter { dag_id: Some(dag.to_string()), ..failed.clone() };
    assert_eq!(ids(store.list_runs(&failed_of("etl")).await.unwrap()), vec!["r1"]);
    assert!(store.list_runs(&failed_of("other")).await.unwrap().is_empty());
    for (from, to) in [(RunState::Failed, RunState::Running), (RunState::Running, RunState::Success)] {
        again.state = to;
        assert!(store.transition_run(from, &again).await.unwrap());
    }
    assert!(store.list_runs(&failed).await.unwrap().is_empty());
    assert_eq!(ids(store.list_runs(&success).await.unwrap()), vec!["r1"]);
    let queued = RunFilter { state: Some(RunState::Queued), limit: 10, ..RunFilter::default() };
    assert_eq!(ids(store.list_runs(&RunFilter { offset: 1, ..queued }).await.unwrap()), vec!["r3"]);
    assert_eq!(ids(store.unfinished_runs().await.unwrap()), vec!["r3", "r4"]);
    // A suspended run is unfinished: a scheduler that starts loads it with the running ones.
    let mut suspended = store.run("r3").await.unwrap().unwrap();
    suspended.state = RunState::Running;
    assert!(store.transition_run(RunState::Queued, &suspended).await.unwrap());
    suspended.state = RunState::Suspended;
    assert!(store.transition_run(RunState::Running, &suspended).await.unwrap());
    let unfinished = store.unfinished_runs().await.unwrap();
    assert_eq!(ids(unfinished.clone()), vec!["r3", "r4"]);
    assert_eq!(unfinished[0].state, RunState::Suspended);

    // Task compare-and-set on (state, try).
    let a = store.task("r4", "a").await.unwrap().unwrap();
    assert_eq!((a.state, a.try_number, a.max_try), (TaskState::Pending, 0, 2));
    let queued = with(&a, TaskState::Queued, 1);
    assert!(store.transition_task("r4", TaskState::Pending, 0, &queued).await.unwrap());
    assert!(!store.transition_task("r4", TaskState::Pending, 0, &queued).await.unwrap(), "duplicate refused");
    let running = with(&a, TaskState::Running, 1);
    assert!(!store.transition_task("r4", TaskState::Queued, 2, &running).await.unwrap(), "wrong try refused");
    assert!(!store.transition_task("r4", TaskState::Pending, 1, &running).await.unwrap(), "wrong state refused");
    assert!(store.transition_task("r4", TaskState::Queued, 1, &running).await.unwrap());
    assert!(!store.transition_task("r4", TaskState::Queued, 1, &with(&a, TaskState::Success, 1)).await.unwrap());
    assert!(!store.transition_task("nope", TaskState::Pending, 0, &queued).await.unwrap());

    // Progress counts only for the running try.
    store.set_progress("r4", "a", 1, 0.25).await.unwrap();
    assert_eq!(store.task("r4", "a").await.unwrap().unwrap().progress, Some(0.25));
    store.set_progress("r4", "a", 7, 0.9).await.unwrap();
    assert_eq!(store.task("r4", "a").await.unwrap().unwrap().progress, Some(0.25));
    store.set_progress("r4", "b", 0, 0.5).await.unwrap();
    assert_eq!(store.task("r4", "b").await.unwrap().unwrap().progress, None);

    // Follow-ups: added once, downstream rewired.
    let mut success = with(&a, TaskState::Success, 1);
    success.follow_ups = vec![FollowUp::new("x", "noop", serde_json::Value::Null)];
    // An output with the shapes a Lua round trip could spoil (empty list, empty object, unicode).
    let output = serde_json::json!({"rows": 3, "empty": [], "none": {}, "name": "Zürich"});
    success.output = Some(output.clone());
    assert!(store.transition_task("r4", TaskState::Running, 1, &success).await.unwrap());
    assert_eq!(store.task("r4", "a").await.unwrap().unwrap().output, Some(output));
    let follow = TaskInstance::pending("a.x", vec!["a".to_string()], "default", 0);
    let rewire = vec![("b".to_string(), vec!["a".to_string(), "a.x".to_string()])];
    store.add_tasks("r4", std::slice::from_ref(&follow), &rewire).await.unwrap();
    store.add_tasks("r4", std::slice::from_ref(&follow), &rewire).await.unwrap();
    let mut all_tasks = store.tasks("r4").await.unwrap();
    all_tasks.sort_by(|x, y| x.task_id.cmp(&y.task_id));
    assert_eq!(all_tasks.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(), vec!["a", "a.x", "b"]);
    assert_eq!(all_tasks[0].follow_ups.len(), 1);
    assert_eq!(*all_tasks[2].after, ["a", "a.x"]);
    assert!(*all_tasks[1].after == ["a"] && all_tasks[1].state == TaskState::Pending);

    // Logs: per try, in order, from an offset, capped with a marker.
    let lines: Vec<String> = (0..5).map(|i| format!("line {i}")).collect();
    store.append_log("r4", "a", 1, &lines[..3]).await.unwrap();
    store.append_log("r4", "a", 1, &lines[3..]).await.unwrap();
    store.append_log("r4", "a", 2, &["other try".to_string()]).await.unwrap();
    assert_eq!(store.read_log("r4", "a", 1, 0).await.unwrap(), lines);
    assert_eq!(store.read_log("r4", "a", 1, 3).await.unwrap(), lines[3..].to_vec());
    assert_eq!(store.read_log("r4", "a", 2, 0).await.unwrap(), vec!["other try"]);
    assert!(store.read_log("r4", "b", 1, 0).await.unwrap().is_empty());
    let many: Vec<String> = (0..MAX_LOG_LINES_PER_TRY + 10).map(|i| i.to_string()).collect();
    store.append_log("r4", "b", 1, &many).await.unwrap();
    store.append_log("r4", "b", 1, &["more".to_string()]).await.unwrap();
    let capped = store.read_log("r4", "b", 1, 0).await.unwrap();
    assert_eq!(capped.len(), MAX_LOG_LINES_PER_TRY + 1);
    assert_eq!(capped.last().unwrap(), LOG_CUT_MARKER);

    // DAG bookkeeping and workers.
    assert_eq!(store.dag_record("etl").await.unwrap(), None);
    let record = DagRecord { dag_id: "etl".into(), paused: true, first_seen: at(0), last_scheduled: Some(at(60)) };
    store.put_dag_record(&record).await.unwrap();
    assert_eq!(store.dag_record("etl").await.unwrap(), Some(record));
    let worker = WorkerInfo {
        name: "w1".into(),
        instance: "w1@1-2".into(),
        host: "h".into(),
        queues: vec!["default".into()],
        concurrency: 4,
        running: vec![RunningTry { run_id: "r4".into(), task_id: "a".into(), try_number: 1 }],
        started_at: at(0),
        last_heartbeat: at(9),
    };
    store.heartbeat(&worker).await.unwrap();
    match store.now().await.unwrap() {
        // A store with a clock stamps the heartbeat with its own time, whatever the worker's
        // clock says.
        Some(now) => {
            let listed = store.workers().await.unwrap();
            assert_eq!(listed.len(), 1);
            assert!((now - listed[0].last_heartbeat).num_seconds().abs() <= 2, "stamped by the store: {listed:?}");
            assert_eq!(listed[0], WorkerInfo { last_heartbeat: listed[0].last_heartbeat, ..worker.clone() });
        }
        None => assert_eq!(store.workers().await.unwrap(), vec![worker]),
    }
    store.remove_worker("w1").await.unwrap();
    assert!(store.workers().await.unwrap().is_empty());
    lease_terms(store.clone()).await;
    fencing(store.clone()).await;
    store.ping().await.unwrap();
    dag_versions(store.as_ref()).await;
    batches(store.clone()).await;
    eager_claims(store.clone()).await;
    finish_and_claim(store.clone()).await;
    claims(store).await;
}

/// A clock for lease calls and fences: the real time, from `at(0)` on. The in-memory store
/// judges expiry by the `now` its callers pass (and a fence's clock), Redis by its own clock;
/// both go by real time here.
fn lease_clock() -> Arc<dyn Clock> {
    Arc::new(TokioClock::starting_at(at(0)))
}

/// The scheduler lease: one term in force at a time; every grant a new term numbered above
/// every earlier one; renewal extends only the term in force, never one that ended (expired,
/// released, or followed by another grant), so a scheduler frozen past its lease cannot take it
/// back under its old term.
async fn lease_terms(store: Arc<dyn Store>) {
    let clock = lease_clock();
    let ttl = std::time::Duration::from_secs(30);
    let a1 = store.acquire_lease("a", clock.now(), ttl).await.unwrap().expect("a free lease is granted");
    assert_eq!(a1.holder, "a");
    assert_eq!(store.acquire_lease("b", clock.now(), ttl).await.unwrap(), None, "one holder at a time");
    assert!(store.renew_lease(&a1, clock.now(), ttl).await.unwrap(), "the term in force is renewed");
    let forged = LeaseTerm { holder: "b".into(), term: a1.term };
    assert!(!store.renew_lease(&forged, clock.now(), ttl).await.unwrap(), "only by its holder");
    store.release_lease(&forged).await.unwrap();
    assert_eq!(store.acquire_lease("b", clock.now(), ttl).await.unwrap(), None, "only the term in force is released");

    // The same holder asking again (an answer it did not get) is granted a new term at once,
    // and the earlier one has ended.
    let a2 = store.acquire_lease("a", clock.now(), ttl).await.unwrap().expect("the holder takes it again");
    assert!(a2.term > a1.term, "{a2} follows {a1}");
    assert!(!store.renew_lease(&a1, clock.now(), ttl).await.unwrap(), "an ended term is not renewed");
    store.release_lease(&a1).await.unwrap();
    assert_eq!(store.acquire_lease("b", clock.now(), ttl).await.unwrap(), None, "releasing an ended term does nothing");
    store.release_lease(&a2).await.unwrap();
    let b1 = store.acquire_lease("b", clock.now(), ttl).await.unwrap().expect("a released lease is free");
    assert!(b1.term > a2.term);
    assert!(!store.renew_lease(&a2, clock.now(), ttl).await.unwrap(), "a released term is not renewed");
    store.release_lease(&b1).await.unwrap();

    // Race 5 at the store: `a` is frozen past its term, `b` takes the lease and gives it up;
    // `a`'s renewal, when it comes, finds the lease free and must not take it back under the
    // term that ended.
    let short = std::time::Duration::from_millis(300);
    let a3 = store.acquire_lease("a", clock.now(), short).await.unwrap().expect("free");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let b2 = store.acquire_lease("b", clock.now(), ttl).await.unwrap().expect("an expired lease is free");
    assert!(b2.term > a3.term);
    store.release_lease(&b2).await.unwrap();
    assert!(!store.renew_lease(&a3, clock.now(), ttl).await.unwrap(), "the frozen holder's term has ended");
    assert!(!store.renew_lease(&b2, clock.now(), ttl).await.unwrap(), "so has the released one");
    // Nor is an expired term renewed when nobody took the lease meanwhile.
    let a4 = store.acquire_lease("a", clock.now(), short).await.unwrap().expect("free");
    assert!(a4.term > b2.term);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(!store.renew_lease(&a4, clock.now(), ttl).await.unwrap(), "an expired term is not renewed");
    let a5 = store.acquire_lease("a", clock.now(), short).await.unwrap().expect("an expired lease is free");
    assert!(a5.term > a4.term);
    store.release_lease(&a5).await.unwrap();
}

/// What the fenced writes of [`fencing`] touch, to show a refused write changed nothing.
async fn fenced_state(
    store: &Arc<dyn Store>,
) -> (Option<DagRecord>, Option<RunRecord>, Vec<TaskInstance>, Vec<String>) {
    let mut tasks = store.tasks("fenced-run").await.unwrap();
    tasks.sort_by(|x, y| x.task_id.cmp(&y.task_id));
    let workers = store.workers().await.unwrap().into_iter().map(|w| w.name).collect();
    (store.dag_record("fenced").await.unwrap(), store.run("fenced-run").await.unwrap(), tasks, workers)
}

/// Fencing: every scheduler write (DAG bookkeeping, run creation, run and task transitions one
/// by one and in batches, a restart's run-with-tasks step, follow-ups, worker removal) applies
/// through a view whose term is in force, and is refused, with nothing changed and the view's
/// scheduler told, once that term has ended: another holder was granted the lease, the same
/// holder was granted a new term, or the term expired with nobody granted it since (Redis's
/// key expiry refuses that by Redis's clock; the in-memory store by the fence's clock).
async fn fencing(store: Arc<dyn Store>) {
    let clock = lease_clock();
    let ttl = std::time::Duration::from_secs(30);
    let view_of = |lease: &LeaseTerm| {
        let (handle, refused) = dagmq_core::CancelSignal::new();
        let fence = Fence { lease: lease.clone(), on_refused: Arc::new(handle), clock: clock.clone() };
        (store.fenced(fence), refused)
    };
    let worker = |name: &str| WorkerInfo {
        name: name.into(),
        instance: format!("{name}@1"),
        host: "h".into(),
        queues: vec!["default".into()],
        concurrency: 1,
        running: Vec::new(),
        started_at: at(0),
        last_heartbeat: at(0),
    };
    let a1 = store.acquire_lease("fenced-a", clock.now(), ttl).await.unwrap().expect("free");
    let (Some(view), refused) = view_of(&a1) else {
        store.release_lease(&a1).await.unwrap();
        return;
    };

    // In force: every fenced write applies.
    let record = DagRecord { dag_id: "fenced".into(), paused: true, first_seen: at(0), last_scheduled: None };
    view.put_dag_record(&record).await.unwrap();
    // A run is created only once its DAG version is stored (a fenced write too).
    view.put_dag_version(&version("fenced", "v1")).await.unwrap();
    let created = run("fenced-run", "fenced", 1, None);
    assert_eq!(view.create_run(&created, &tasks()).await.unwrap(), CreateRun::Created);
    let running = RunRecord { state: RunState::Running, started_at: Some(at(2)), ..created.clone() };
    assert!(view.transition_run(RunState::Queued, &running).await.unwrap());
    let (a, b) =
        (store.task("fenced-run", "a").await.unwrap().unwrap(), store.task("fenced-run", "b").await.unwrap().unwrap());
    assert!(view.transition_task("fenced-run", TaskState::Pending, 0, &with(&a, TaskState::Queued, 1)).await.unwrap());
    let change = |task: &TaskInstance, from: TaskState, to: TaskState, try_number: u32| TaskChange {
        expected_state: from,
        expected_try: task.try_number,
        task: with(task, to, try_number),
    };
    let batch = [change(&b, TaskState::Pending, TaskState::Queued, 1)];
    assert_eq!(view.transition_tasks("fenced-run", &batch).await.unwrap(), vec![true]);
    let follow = TaskInstance::pending("a.x", vec!["a".to_string()], "default", 0);
    view.add_tasks("fenced-run", std::slice::from_ref(&follow), &[]).await.unwrap();
    let a_queued = with(&a, TaskState::Queued, 1);
    let restart = [change(&a_queued, TaskState::Queued, TaskState::Running, 1)];
    assert!(view.transition_run_with_tasks(RunState::Running, &running, &restart).await.unwrap());
    store.heartbeat(&worker("fenced-w1")).await.unwrap();
    view.remove_worker("fenced-w1").await.unwrap();
    assert!(!refused.is_cancelled(), "no write was refused while the term was in force");

    // Each write that would apply, were its term in force.
    let every_write = async |view: &Arc<dyn Store>, refused: &dagmq_core::CancelSignal, why: &str| {
        store.heartbeat(&worker("fenced-w2")).await.unwrap();
        let before = fenced_state(&store).await;
        let (a, b) = (before.2[0].clone(), before.2[2].clone());
        assert_eq!(
            (a.task_id.as_str(), a.state, b.task_id.as_str(), b.state),
            ("a", TaskState::Running, "b", TaskState::Queued)
        );
        let done = RunRecord { state: RunState::Success, ended_at: Some(at(9)), ..running.clone() };
        let answers = [
            ("put_dag_record", view.put_dag_record(&DagRecord { paused: false, ..record.clone() }).await.err()),
            ("create_run", view.create_run(&run("fenced-other", "fenced", 3, None), &tasks()).await.err()),
            ("transition_run", view.transition_run(RunState::Running, &done).await.err()),
            (
                "transition_run_with_tasks",
                view.transition_run_with_tasks(
                    RunState::Running,
                    &done,
                    &[change(&b, TaskState::Queued, TaskState::Pending, 1)],
                )
                .await
                .err(),
            ),
            (
                "transition_task",
                view.transition_task("fenced-run", TaskState::Running, 1, &with(&a, TaskState::Success, 1)).await.err(),
            ),
            (
                "transition_tasks",
                view.transition_tasks("fenced-run", &[change(&b, TaskState::Queued, TaskState::Running, 1)])
                    .await
                    .err(),
            ),
            (
                "add_tasks",
                view.add_tasks("fenced-run", &[TaskInstance::pending("a.y", vec!["a".to_string()], "default", 0)], &[])
                    .await
                    .err(),
            ),
            ("remove_worker", view.remove_worker("fenced-w2").await.err()),
            ("put_dag_version", view.put_dag_version(&version("fenced", "v-fenced")).await.err()),
        ];
        for (what, err) in answers {
            assert!(err.as_ref().is_some_and(|e| e.fenced), "{why}: {what} was not refused by the fence: {err:?}");
        }
        assert!(refused.is_cancelled(), "{why}: the scheduler is told at once");
        assert_eq!(fenced_state(&store).await, before, "{why}: a refused write changes nothing");
        assert!(store.run("fenced-other").await.unwrap().is_none(), "{why}");
        assert_eq!(store.dag_version("fenced", "v-fenced").await.unwrap(), None, "{why}");
    };

    // Another holder's term.
    store.release_lease(&a1).await.unwrap();
    let b1 = store.acquire_lease("fenced-b", clock.now(), ttl).await.unwrap().expect("released");
    every_write(&view, &refused, "after another holder took the lease").await;
    store.release_lease(&b1).await.unwrap();

    // A new term of the same holder: the earlier term's view is refused, the new one's is not.
    let a2 = store.acquire_lease("fenced-a", clock.now(), ttl).await.unwrap().expect("released");
    let (Some(view2), refused2) = view_of(&a2) else { unreachable!("the store fenced before") };
    let a3 = store.acquire_lease("fenced-a", clock.now(), ttl).await.unwrap().expect("its own");
    every_write(&view2, &refused2, "after a new term of the same holder").await;
    let (Some(view3), refused3) = view_of(&a3) else { unreachable!("the store fenced before") };
    view3.put_dag_record(&record).await.unwrap();
    assert!(!refused3.is_cancelled());
    store.release_lease(&a3).await.unwrap();

    // A term that expired, with nobody granted the lease since.
    let short = std::time::Duration::from_millis(300);
    let a4 = store.acquire_lease("fenced-a", clock.now(), short).await.unwrap().expect("released");
    let (Some(view4), refused4) = view_of(&a4) else { unreachable!("the store fenced before") };
    view4.put_dag_record(&record).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    every_write(&view4, &refused4, "after the term expired").await;
    store.release_lease(&a4).await.unwrap();
}

/// DAG versions: stored by (DAG, version), written again idempotently; a run that names a
/// version is created only once the store has it (and nothing of it is written before).
async fn dag_versions(store: &dyn Store) {
    assert_eq!(store.dag_version("versioned", "v1").await.unwrap(), None);
    let first = run("ver-1", "versioned", 1, Some("vk"));
    assert_eq!(store.create_run(&first, &tasks()).await.unwrap(), CreateRun::MissingVersion);
    assert_eq!(store.run("ver-1").await.unwrap(), None);
    assert!(!store.unfinished_runs().await.unwrap().iter().any(|r| r.run_id == "ver-1"), "not listed either");
    let stored = version("versioned", "v1");
    store.put_dag_version(&stored).await.unwrap();
    store.put_dag_version(&stored).await.unwrap();
    assert_eq!(store.dag_version("versioned", "v1").await.unwrap(), Some(stored.clone()));
    assert_eq!(store.dag_version("versioned", "v2").await.unwrap(), None);
    assert_eq!(store.dag_version("unversioned", "v1").await.unwrap(), None);
    // The refusal took no key: the same trigger creates the run now.
    assert_eq!(store.create_run(&first, &tasks()).await.unwrap(), CreateRun::Created);
    assert_eq!(store.create_run(&first, &tasks()).await.unwrap(), CreateRun::Exists("ver-1".into()));
    // Another version of the same DAG is a version of its own.
    let second = RunRecord { dag_version: Some("v2".into()), ..run("ver-2", "versioned", 2, None) };
    assert_eq!(store.create_run(&second, &tasks()).await.unwrap(), CreateRun::MissingVersion);
    // A run that names no version (created before versions were stored) needs none.
    let old = RunRecord { dag_version: None, ..run("ver-0", "versioned", 0, None) };
    assert_eq!(store.create_run(&old, &tasks()).await.unwrap(), CreateRun::Created);
    // The stored record is the scheduling definition, back whole.
    let dag = store.dag_version("versioned", "v1").await.unwrap().unwrap().to_dag().unwrap();
    assert_eq!(dag.task("b").map(|t| t.after.to_vec()), Some(vec!["a".to_string()]));
    assert_eq!(dag.task("a").map(|t| t.config.retries), Some(1));
    for id in ["ver-1", "ver-0"] {
        let mut done = store.run(id).await.unwrap().unwrap();
        let from = done.state;
        done.state = RunState::Cancelled;
        assert!(store.transition_run(from, &done).await.unwrap());
    }
}

/// A claim in one call: a queued try of a running run becomes exactly `claimed_by` the
/// claimant; anything else is answered unchanged (a queued try of a run that is not running
/// too: queued, suspended or finished); other tasks are read with it.
async fn claims(store: Arc<dyn Store>) {
    let claimant = Claimant { worker: "w1".into(), instance: "w1@1-2".into(), at: at(40) };
    let mut queued = TaskInstance::pending("q", vec!["p".to_string()], "default", 2).next_try(at(39));
    queued.output = Some(serde_json::json!({"kept": [1.5, "x"]}));
    // A try of an earlier worker left its instance name behind: claimed all the same.
    let mut stale = TaskInstance::pending("s", vec![], "default", 0).next_try(at(39));
    stale.worker_instance = Some("w0@0-1".into());
    // Queued while the run does not run (a requeue that raced a suspension): never claimed.
    let left = TaskInstance::pending("f", vec![], "default", 0).next_try(at(39));
    let tasks = vec![TaskInstance::pending("p", vec![], "default", 0), queued.clone(), stale.clone(), left.clone()];
    assert_eq!(store.create_run(&run("claims", "etl", 30, None), &tasks).await.unwrap(), CreateRun::Created);

    let refused = store.claim_try("claims", "f", 1, &claimant, &["p"]).await.unwrap();
    assert_eq!(refused, ClaimAnswer { task: Some(left.clone()), claimed: false, read: vec![Some(tasks[0].clone())] });
    assert_eq!(store.task("claims", "f").await.unwrap(), Some(left.clone()), "a queued run's try is not claimed");
    move_run(store.as_ref(), "claims", RunState::Running, 35).await;

    let answer = store.claim_try("claims", "q", 1, &claimant, &["p", "nope"]).await.unwrap();
    assert!(answer.claimed);
    assert_eq!(answer.task, Some(queued.claimed_by(&claimant)));
    assert_eq!(store.task("claims", "q").await.unwrap(), Some(queued.claimed_by(&claimant)));
    assert_eq!(answer.read, vec![Some(tasks[0].clone()), None]);
    // The claimed instance still takes compare-and-sets as any other.
    let mut done = queued.claimed_by(&claimant);
    done.state = TaskState::Success;
    assert!(store.transition_task("claims", TaskState::Running, 1, &done).await.unwrap());

    let other = Claimant { worker: "w2".into(), ..claimant.clone() };
    let again = store.claim_try("claims", "q", 1, &other, &[]).await.unwrap();
    assert_eq!((again.claimed, again.task), (false, Some(done)));
    let wrong_try = store.claim_try("claims", "s", 2, &claimant, &[]).await.unwrap();
    assert_eq!((wrong_try.claimed, wrong_try.task), (false, Some(stale.clone())));
    let answer = store.claim_try("claims", "s", 1, &claimant, &[]).await.unwrap();
    assert!(answer.claimed);
    assert_eq!(store.task("claims", "s").await.unwrap(), Some(stale.claimed_by(&claimant)));

    move_run(store.as_ref(), "claims", RunState::Suspended, 41).await;
    let refused = store.claim_try("claims", "f", 1, &claimant, &[]).await.unwrap();
    assert_eq!((refused.claimed, refused.task), (false, Some(left.clone())), "a suspended run's try");
    // A claim whose answer was lost is found as it is, running under its claimant, whatever
    // the run's state now.
    let lost = store.claim_try("claims", "s", 1, &claimant, &[]).await.unwrap();
    assert_eq!((lost.claimed, lost.task), (false, Some(stale.claimed_by(&claimant))));
    move_run(store.as_ref(), "claims", RunState::Cancelled, 42).await;
    let refused = store.claim_try("claims", "f", 1, &claimant, &[]).await.unwrap();
    assert_eq!((refused.claimed, refused.task), (false, Some(left.clone())), "a cancelled run's try");
    assert_eq!(store.task("claims", "f").await.unwrap(), Some(left));
    let unknown = store.claim_try("claims", "nope", 1, &claimant, &["p"]).await.unwrap();
    assert_eq!((unknown.claimed, unknown.task, unknown.read.len()), (false, None, 1));
}

/// A finished try's outcome and the claim of its slot's next try, in one call: the outcome
/// applies as `finish_try` applies it, the claim as `claim_try` makes it, each on its own
/// conditions (a stale outcome claims all the same; a claim refused leaves the outcome written),
/// and a call repeated after a lost answer finds both done, the claim running under its
/// claimant.
async fn finish_and_claim(store: Arc<dyn Store>) {
    let claimant = Claimant { worker: "w1".into(), instance: "w1@1-2".into(), at: at(50) };
    let queued = |id: &str| TaskInstance::pending(id, vec![], "default", 1).next_try(at(49));
    let (d, n, m, l) = (queued("d"), queued("n"), queued("m"), queued("l"));
    let mut o = TaskInstance::pending("o", vec![], "default", 0);
    o.output = Some(serde_json::json!({"read": true}));
    let tasks = vec![d.clone(), n.clone(), m.clone(), l.clone(), o.clone()];
    assert_eq!(store.create_run(&run("slots", "etl", 45, None), &tasks).await.unwrap(), CreateRun::Created);
    move_run(store.as_ref(), "slots", RunState::Running, 46).await;
    let running = store.claim_try("slots", "d", 1, &claimant, &[]).await.unwrap().task.unwrap();
    let mut done = running.clone();
    done.state = TaskState::Success;
    done.ended_at = Some(at(51));
    let next = NextClaim { task_id: "n", try_number: 1, claimant: &claimant, read: &["o", "nope"] };

    let answer = store.finish_and_claim("slots", &done, &next).await.unwrap();
    let claimed = n.claimed_by(&claimant);
    let expected = ClaimAnswer { task: Some(claimed.clone()), claimed: true, read: vec![Some(o.clone()), None] };
    assert_eq!(answer, FinishedAndClaimed { applied: true, next: expected });
    assert_eq!(store.task("slots", "d").await.unwrap(), Some(done.clone()));
    assert_eq!(store.task("slots", "n").await.unwrap(), Some(claimed.clone()));

    // The answer lost, the call again: the outcome is found written (not applied again), the
    // claim found running under its claimant (not claimed again).
    let again = store.finish_and_claim("slots", &done, &next).await.unwrap();
    assert_eq!((again.applied, again.next.claimed, again.next.task), (false, false, Some(claimed.clone())));

    // Another worker's claim of a try claimed already, or of another try, changes nothing but the
    // outcome.
    let other = Claimant { worker: "w2".into(), instance: "w2@1-2".into(), at: at(52) };
    let mut failed = claimed.clone();
    failed.state = TaskState::Failed;
    let wrong = NextClaim { task_id: "m", try_number: 2, claimant: &other, read: &[] };
    let answer = store.finish_and_claim("slots", &failed, &wrong).await.unwrap();
    assert_eq!((answer.applied, answer.next.claimed, answer.next.task), (true, false, Some(m.clone())));
    assert_eq!(store.task("slots", "n").await.unwrap(), Some(failed.clone()));
    assert_eq!(store.task("slots", "m").await.unwrap(), Some(m.clone()));

    // A stale outcome (the try moved on) is refused; the next try is claimed all the same.
    let stale = NextClaim { task_id: "m", try_number: 1, claimant: &other, read: &[] };
    let answer = store.finish_and_claim("slots", &done, &stale).await.unwrap();
    assert_eq!((answer.applied, answer.next.claimed), (false, true));
    assert_eq!(store.task("slots", "m").await.unwrap(), Some(m.claimed_by(&other)));
    assert_eq!(store.task("slots", "d").await.unwrap(), Some(done.clone()));

    // A suspended run's try is not claimed; the outcome is written.
    move_run(store.as_ref(), "slots", RunState::Suspended, 53).await;
    let mut m_done = m.claimed_by(&other);
    m_done.state = TaskState::Success;
    let suspended = NextClaim { task_id: "l", try_number: 1, claimant: &claimant, read: &["o"] };
    let answer = store.finish_and_claim("slots", &m_done, &suspended).await.unwrap();
    let refused = ClaimAnswer { task: Some(l.clone()), claimed: false, read: vec![Some(o.clone())] };
    assert_eq!(answer, FinishedAndClaimed { applied: true, next: refused });
    assert_eq!(store.task("slots", "l").await.unwrap(), Some(l.clone()));
    assert_eq!(store.task("slots", "m").await.unwrap(), Some(m_done));

    // Unknown tasks and runs.
    let unknown = NextClaim { task_id: "nope", try_number: 1, claimant: &claimant, read: &["o"] };
    let answer = store.finish_and_claim("slots", &done, &unknown).await.unwrap();
    assert_eq!(
        (answer.applied, answer.next.claimed, answer.next.task, answer.next.read.len()),
        (false, false, None, 1)
    );
    let answer = store.finish_and_claim("no-such-run", &done, &next).await.unwrap();
    assert_eq!(
        (answer.applied, answer.next.claimed, answer.next.task, answer.next.read),
        (false, false, None, vec![None, None])
    );
    move_run(store.as_ref(), "slots", RunState::Cancelled, 54).await;
}

/// Eager dispatch: an outcome and the claim of a downstream task it made ready, in one step.
async fn eager_claims(store: Arc<dyn Store>) {
    let after = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut b = TaskInstance::pending("b", after(&["a"]), "default", 2);
    // An instance with a try history and an output left from a cleared try: what the worker
    // read must compare equal to what the store holds, field for field.
    b.tries = vec![dagmq_core::records::TryRecord {
        try_number: 1,
        outcome: "success".into(),
        queued_at: Some(at(1)),
        started_at: Some(at(2)),
        ended_at: Some(at(3)),
        worker: Some("w".into()),
        error: Some("exited with status 1: \"é\"".into()),
        log_tail: vec!["é\u{1b}[0m".into(), "[dagmq] try 1 failed".into()],
    }];
    b.try_number = 1;
    b.max_try = 4;
    b.output = Some(serde_json::json!({"z": 0.1, "a": [1.5e300, -0.0, "x"], "m": {}}));
    let tasks = vec![
        with(&TaskInstance::pending("a", vec![], "default", 0), TaskState::Running, 1),
        with(&TaskInstance::pending("x", vec![], "default", 0), TaskState::Running, 1),
        b,
        TaskInstance::pending("c", after(&["a", "x"]), "default", 0),
        TaskInstance::pending("d", after(&["a"]), "default", 0),
        TaskInstance::pending("e", after(&["a"]), "default", 1),
    ];
    let mut record = run("eager", "etl", 20, None);
    record.state = RunState::Running;
    assert_eq!(store.create_run(&record, &tasks).await.unwrap(), CreateRun::Created);
    let read = |id: &'static str| {
        let store = store.clone();
        async move { store.task("eager", id).await.unwrap().unwrap() }
    };
    let claim_of = |expected: TaskInstance, worker: &str| {
        let mut claimed = expected.next_try(at(30));
        claimed.state = TaskState::Running;
        claimed.worker = Some(worker.to_string());
        EagerClaim { expected, claimed, then: vec!["c".to_string(), "nope".to_string()], branches: Vec::new() }
    };
    let (a, b, c, d, e) = (read("a").await, read("b").await, read("c").await, read("d").await, read("e").await);
    let done = |task: &TaskInstance, state: TaskState| TaskInstance { state, ended_at: Some(at(29)), ..task.clone() };

    // The outcome of another try applies to nothing and claims nothing.
    let stale = TaskInstance { try_number: 7, ..done(&a, TaskState::Success) };
    let candidates = [claim_of(c.clone(), "w1"), claim_of(b.clone(), "w1"), claim_of(e.clone(), "w1")];
    let finished = store.finish_try("eager", &stale, &candidates).await.unwrap();
    assert_eq!(finished, FinishedTry::default());
    assert_eq!(read("b").await, b);

    // `c` also waits for `x`, still running: the ready candidates, `b` and `e`, are claimed,
    // each with the tasks it names read.
    let finished = store.finish_try("eager", &done(&a, TaskState::Success), &candidates).await.unwrap();
    let reads = vec![Some(c.clone()), None];
    assert_eq!(finished, FinishedTry { applied: true, claimed: vec![(1, reads.clone()), (2, reads)] });
    assert_eq!(read("e").await, candidates[2].claimed);
    assert_eq!(read("a").await.state, TaskState::Success);
    assert_eq!(read("b").await, candidates[1].claimed, "b is the claimed try, try 2 with its history");
    assert_eq!(read("c").await, c, "c is untouched");

    // A candidate changed since it was read is not claimed; a failure claims nothing; a
    // suspended run claims nothing.
    let x = read("x").await;
    let moved = TaskInstance { retries: 5, ..d.clone() };
    assert!(store.transition_task("eager", TaskState::Pending, 0, &moved).await.unwrap());
    let finished = store.finish_try("eager", &done(&x, TaskState::Success), &[claim_of(d.clone(), "w2")]).await;
    assert_eq!(finished.unwrap(), FinishedTry { applied: true, ..FinishedTry::default() });
    assert_eq!(read("d").await, moved);
    let mut suspended = store.run("eager").await.unwrap().unwrap();
    suspended.state = RunState::Suspended;
    assert!(store.transition_run(RunState::Running, &suspended).await.unwrap());
    let b_running = read("b").await;
    let b_done = done(&b_running, TaskState::Success);
    let finished = store.finish_try("eager", &b_done, &[claim_of(moved.clone(), "w2")]).await.unwrap();
    assert_eq!(finished, FinishedTry { applied: true, ..FinishedTry::default() });
    assert_eq!(read("d").await, moved, "nothing is claimed in a suspended run");
    // Back to running, a failure claims nothing.
    suspended.state = RunState::Running;
    assert!(store.transition_run(RunState::Suspended, &suspended).await.unwrap());
    let y = TaskInstance::pending("y", vec![], "default", 0);
    let z = TaskInstance::pending("z", after(&["y"]), "default", 0);
    store.add_tasks("eager", &[with(&y, TaskState::Running, 1), z.clone()], &[]).await.unwrap();
    let (y, z) = (read("y").await, read("z").await);
    let finished = store.finish_try("eager", &done(&y, TaskState::Failed), &[claim_of(z.clone(), "w3")]).await;
    assert_eq!(finished.unwrap(), FinishedTry { applied: true, ..FinishedTry::default() });
    assert_eq!(read("z").await, z, "a failure claims nothing");
    eager_claims_of_joins(store.clone()).await;
}

/// Eager claims of a join whose other upstream is a branch or returned follow-ups: the store
/// reads the branch's choice and the follow-ups itself, whether or not the scheduler has acted
/// on them yet (issue 22, races 1 and 2).
async fn eager_claims_of_joins(store: Arc<dyn Store>) {
    let after = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let read = |run: &'static str, id: &'static str| {
        let store = store.clone();
        async move { store.task(run, id).await.unwrap().unwrap() }
    };
    let claim_of = |expected: &TaskInstance, branches: &[&str]| {
        let mut claimed = expected.next_try(at(50));
        claimed.state = TaskState::Running;
        claimed.worker = Some("w".to_string());
        EagerClaim { expected: expected.clone(), claimed, then: Vec::new(), branches: after(branches) }
    };
    let succeeded = |task: &TaskInstance, output: serde_json::Value| TaskInstance {
        state: TaskState::Success,
        ended_at: Some(at(49)),
        output: Some(output),
        ..task.clone()
    };
    let mut record = run("joins", "etl", 40, None);
    record.state = RunState::Running;

    // `pick` (a branch) chose `ba` and `bc`; the scheduler has skipped nothing yet. `extract`
    // succeeds: of its downstream tasks only the chosen ones are claimed. Its output mentions
    // follow-ups inside a value, which are not its own.
    let pick = with(&TaskInstance::pending("pick", vec![], "default", 0), TaskState::Running, 1);
    let pick = succeeded(&pick, serde_json::json!(["ba", "bc"]));
    let extract = with(&TaskInstance::pending("extract", vec![], "default", 0), TaskState::Running, 1);
    let join = |id: &str| TaskInstance::pending(id, after(&["pick", "extract"]), "default", 0);
    let tasks = vec![pick, extract.clone(), join("ba"), join("bb"), join("bc")];
    assert_eq!(store.create_run(&record, &tasks).await.unwrap(), CreateRun::Created);
    let (ba, bb, bc) = (read("joins", "ba").await, read("joins", "bb").await, read("joins", "bc").await);
    let candidates = [claim_of(&ba, &["pick"]), claim_of(&bb, &["pick"]), claim_of(&bc, &["pick"])];
    let extract_done = succeeded(&extract, serde_json::json!({"follow_ups": [{"id": "not-mine"}]}));
    let finished = store.finish_try("joins", &extract_done, &candidates).await.unwrap();
    assert_eq!(finished, FinishedTry { applied: true, claimed: vec![(0, vec![]), (2, vec![])] });
    assert_eq!(read("joins", "bb").await, bb, "bb, which pick did not choose, is not claimed");
    assert_eq!(read("joins", "ba").await, candidates[0].claimed);

    // `p` succeeds with follow-up `x`, which the scheduler has not added yet: `e`, after `p`
    // alone, waits for `p.x`. `q` succeeds next: `d`, after both, waits for `p.x` too. Once
    // `p.x` is added before `d` and `e` and succeeds, `d` is claimed with it.
    let p = with(&TaskInstance::pending("p", vec![], "default", 0), TaskState::Running, 1);
    let q = with(&TaskInstance::pending("q", vec![], "default", 0), TaskState::Running, 1);
    let d = TaskInstance::pending("d", after(&["p", "q"]), "default", 0);
    let e = TaskInstance::pending("e", after(&["p"]), "default", 0);
    record.run_id = "follow".to_string();
    let tasks = [p.clone(), q.clone(), d.clone(), e.clone()];
    assert_eq!(store.create_run(&record, &tasks).await.unwrap(), CreateRun::Created);
    let mut p_done = succeeded(&p, serde_json::Value::Null);
    p_done.follow_ups = vec![FollowUp::new("x", "step", serde_json::Value::Null)];
    let finished = store.finish_try("follow", &p_done, &[claim_of(&e, &[])]).await;
    assert_eq!(finished.unwrap(), FinishedTry { applied: true, ..FinishedTry::default() });
    assert_eq!(read("follow", "e").await, e, "e waits for the follow-up of p, which just succeeded");
    let finished = store.finish_try("follow", &succeeded(&q, serde_json::Value::Null), &[claim_of(&d, &[])]).await;
    assert_eq!(finished.unwrap(), FinishedTry { applied: true, ..FinishedTry::default() });
    assert_eq!(read("follow", "d").await, d, "d waits for the follow-up of p, not added yet");
    let x = with(&TaskInstance::pending("p.x", after(&["p"]), "default", 0), TaskState::Running, 1);
    let rewired = [("d".to_string(), after(&["p", "q", "p.x"])), ("e".to_string(), after(&["p", "p.x"]))];
    store.add_tasks("follow", std::slice::from_ref(&x), &rewired).await.unwrap();
    let d = read("follow", "d").await;
    let claim = claim_of(&d, &[]);
    let x_done = succeeded(&x, serde_json::Value::Null);
    let finished = store.finish_try("follow", &x_done, std::slice::from_ref(&claim)).await;
    assert_eq!(finished.unwrap(), FinishedTry { applied: true, claimed: vec![(0, vec![])] });
    assert_eq!(read("follow", "d").await, claim.claimed);
}

/// Batched reads and compare-and-sets answer as one call each would, in order.
async fn batches(store: Arc<dyn Store>) {
    // More tasks than one Redis script call takes, so the batches are split.
    let many: Vec<TaskInstance> =
        (0..1203).map(|i| TaskInstance::pending(format!("t{i}"), vec![], "default", 0)).collect();
    assert_eq!(store.create_run(&run("batch", "etl", 9, None), &many).await.unwrap(), CreateRun::Created);
    let found = store.tasks_by_id("batch", &["t7", "nope", "t0"]).await.unwrap();
    let found_ids: Vec<Option<&str>> = found.iter().map(|t| t.as_ref().map(|t| t.task_id.as_str())).collect();
    assert_eq!(found_ids, vec![Some("t7"), None, Some("t0")]);
    assert_eq!(store.tasks_by_id("nope", &["t0"]).await.unwrap(), vec![None]);

    let mut changes: Vec<TaskChange> = many
        .iter()
        .map(|t| TaskChange {
            expected_state: TaskState::Pending,
            expected_try: 0,
            task: with(t, TaskState::Queued, 1),
        })
        .collect();
    // A wrong try, an unknown task, and a repeat of the first change (refused: it applied already).
    changes[5].expected_try = 3;
    changes.push(TaskChange {
        expected_state: TaskState::Pending,
        expected_try: 0,
        task: TaskInstance::pending("nope", vec![], "default", 0),
    });
    changes.push(changes[0].clone());
    let applied = store.transition_tasks("batch", &changes).await.unwrap();
    assert_eq!(applied.len(), changes.len());
    let refused: Vec<usize> = (0..applied.len()).filter(|&i| !applied[i]).collect();
    assert_eq!(refused, vec![5, 1203, 1204]);
    let states = store.tasks_by_id("batch", &["t0", "t5", "t1202"]).await.unwrap();
    let states: Vec<(TaskState, u32)> =
        states.into_iter().map(|t| t.map(|t| (t.state, t.try_number)).unwrap()).collect();
    assert_eq!(states, vec![(TaskState::Queued, 1), (TaskState::Pending, 0), (TaskState::Queued, 1)]);
    assert_eq!(store.transition_tasks("nope", &changes[..2]).await.unwrap(), vec![false, false]);

    // A running try's progress comes with it, as from `task`.
    let running = with(&many[1], TaskState::Running, 1);
    assert!(store.transition_task("batch", TaskState::Queued, 1, &running).await.unwrap());
    store.set_progress("batch", "t1", 1, 0.5).await.unwrap();
    let read = store.tasks_by_id("batch", &["t1"]).await.unwrap();
    assert_eq!(read[0].as_ref().and_then(|t| t.progress), Some(0.5));
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn redis_store_keeps_the_contract() {
    let Some(store) = redis_store().await else { return };
    contract(store.clone()).await;
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn redis_finished_runs_expire_after_retention() {
    let Some(probe) = redis_store().await else { return };
    drop(probe);
    let prefix = crate::services::namespace();
    let store = dagmq_redis::RedisStore::connect(
        &crate::services::redis_url(),
        &prefix,
        Some(std::time::Duration::from_secs(1)),
    )
    .await
    .unwrap();
    store_versions(&store).await;
    store.create_run(&run("old", "etl", 0, Some("k")), &tasks()).await.unwrap();
    store.append_log("old", "a", 1, &["x".to_string()]).await.unwrap();
    let mut running = run("old", "etl", 0, Some("k"));
    running.state = RunState::Running;
    assert!(store.transition_run(RunState::Queued, &running).await.unwrap());
    let mut done = running.clone();
    done.state = RunState::Failed;
    assert!(store.transition_run(RunState::Running, &done).await.unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.run("old").await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "the finished run did not expire");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(store.tasks("old").await.unwrap().is_empty());
    assert!(store.read_log("old", "a", 1, 0).await.unwrap().is_empty());
    assert!(store.list_runs(&RunFilter { limit: 10, ..RunFilter::default() }).await.unwrap().is_empty());
    // The trigger key lived no longer than its run; so did the version (a scheduler writes it
    // again before the next run).
    assert_eq!(store.dag_version("etl", "v1").await.unwrap(), None);
    store_versions(&store).await;
    assert_eq!(store.create_run(&run("new", "etl", 5, Some("k")), &tasks()).await.unwrap(), CreateRun::Created);
    store.delete_all().await.unwrap();
}

/// The task scripts read state and try with a pattern over serde's field order; an instance
/// stored in another order (another writer) is decoded instead, with the same answers.
#[tokio::test]
async fn redis_task_scripts_read_instances_in_any_field_order() {
    let Some(probe) = redis_store().await else { return };
    drop(probe);
    let prefix = crate::services::namespace();
    let store = dagmq_redis::RedisStore::connect(&crate::services::redis_url(), &prefix, None).await.unwrap();
    store_versions(&store).await;
    store.create_run(&run("order", "etl", 0, None), &tasks()).await.unwrap();
    let reordered =
        r#"{"try_number":0,"state":"pending","max_try":2,"retries":1,"task_id":"a","after":[],"queue":"default"}"#;
    let written = std::process::Command::new("redis-cli")
        .args(["-u", &crate::services::redis_url(), "HSET", &format!("{prefix}:run:{{order}}:tasks"), "a", reordered])
        .output()
        .expect("redis-cli runs");
    assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
    let a = store.task("order", "a").await.unwrap().unwrap();
    assert_eq!((a.state, a.try_number), (TaskState::Pending, 0));
    assert!(!store.transition_task("order", TaskState::Pending, 1, &with(&a, TaskState::Queued, 1)).await.unwrap());
    assert!(!store.transition_task("order", TaskState::Queued, 0, &with(&a, TaskState::Queued, 1)).await.unwrap());
    assert!(store.transition_task("order", TaskState::Pending, 0, &with(&a, TaskState::Queued, 1)).await.unwrap());
    let change =
        TaskChange { expected_state: TaskState::Queued, expected_try: 1, task: with(&a, TaskState::Running, 1) };
    assert_eq!(store.transition_tasks("order", &[change]).await.unwrap(), vec![true]);
    // A queued instance in another field order is claimed with an outcome all the same (by the
    // compare-and-set the claim falls back to).
    let queued_b =
        r#"{"try_number":1,"state":"queued","max_try":1,"retries":0,"task_id":"b","after":["a"],"queue":"default"}"#;
    let written = std::process::Command::new("redis-cli")
        .args(["-u", &crate::services::redis_url(), "HSET", &format!("{prefix}:run:{{order}}:tasks"), "b", queued_b])
        .output()
        .expect("redis-cli runs");
    assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
    move_run(&store, "order", RunState::Running, 1).await;
    let claimant = Claimant { worker: "w".into(), instance: "w@1-1".into(), at: at(2) };
    let next = NextClaim { task_id: "b", try_number: 1, claimant: &claimant, read: &[] };
    let answer = store.finish_and_claim("order", &with(&a, TaskState::Success, 1), &next).await.unwrap();
    assert!(answer.applied && answer.next.claimed, "{answer:?}");
    let b = store.task("order", "b").await.unwrap().unwrap();
    assert_eq!((b.state, b.worker_instance.as_deref()), (TaskState::Running, Some("w@1-1")));
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn memory_finished_runs_and_their_keys_expire_after_retention() {
    let store = MemoryStore::with_retention(Some(std::time::Duration::from_secs(3600)));
    store_versions(&store).await;
    store.create_run(&run("old", "etl", 0, Some("k")), &tasks()).await.unwrap();
    store.create_run(&run("open", "etl", 1, None), &tasks()).await.unwrap();
    store.append_log("old", "a", 1, &["x".to_string()]).await.unwrap();
    let mut done = run("old", "etl", 0, Some("k"));
    done.state = RunState::Failed;
    done.ended_at = Some(at(10));
    assert!(store.transition_run(RunState::Queued, &done).await.unwrap());
    // Within the retention period the run and its key stay.
    assert_eq!(
        store.create_run(&run("again", "etl", 3000, Some("k")), &tasks()).await.unwrap(),
        CreateRun::Exists("old".into())
    );
    // Past it, a new run drops it: record, tasks, logs and key; unfinished runs stay.
    assert_eq!(store.create_run(&run("later", "etl", 3611, None), &tasks()).await.unwrap(), CreateRun::Created);
    assert!(store.run("old").await.unwrap().is_none());
    assert!(store.read_log("old", "a", 1, 0).await.unwrap().is_empty());
    assert!(store.run("open").await.unwrap().is_some());
    assert_eq!(
        store.create_run(&run("fresh", "etl", 3612, Some("k")), &tasks()).await.unwrap(),
        CreateRun::Created,
        "the key expired with its run"
    );
    let listed = store.list_runs(&RunFilter { limit: 10, ..RunFilter::default() }).await.unwrap();
    assert_eq!(listed.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), vec!["fresh", "later", "open"]);
}

/// Writes `count` finished runs of `etl` into `store` as `seed_finished_runs` does: run `i` is
/// `{id}{i:04}`, created at second `created(i)`, failed when `failed(i)`, else successful.
/// With `as_older`, the indexes by state and their marker are removed, as an older dagmq left
/// the store.
async fn seed_history(
    store: &dagmq_redis::RedisStore,
    redis: &crate::redis_ambiguity::OwnRedis,
    prefix: &str,
    (id, count): (&str, i64),
    created: impl Fn(i64) -> i64,
    failed: impl Fn(i64) -> bool,
    as_older: bool,
) {
    let history: Vec<(RunRecord, Vec<TaskInstance>)> = (0..count)
        .map(|i| {
            let mut record = run(&format!("{id}{i:04}"), "etl", created(i), None);
            record.state = if failed(i) { RunState::Failed } else { RunState::Success };
            (record, tasks().iter().map(|t| with(t, TaskState::Success, 1)).collect())
        })
        .collect();
    store.seed_finished_runs(&history).await.unwrap();
    if as_older {
        let keys = ["runs:state:success", "runs:state:failed", "runs:state:indexed"].map(|k| format!("{prefix}:{k}"));
        redis.cli(&["DEL", &keys[0], &keys[1], &keys[2]]);
    }
}

/// Failed runs among a long history of successes are listed from an index of their own, not
/// found by reading the successes; a store written before that index existed has it built by
/// its first listing of a finished state, once.
#[tokio::test]
async fn redis_listing_failed_runs_reads_none_of_the_successes() {
    let Some(redis) = crate::redis_ambiguity::OwnRedis::start() else { return };
    let store = dagmq_redis::RedisStore::connect(&redis.url(), "failures", None).await.unwrap();
    store_versions(&store).await;
    // 2,000 finished runs of `etl`, one in 500 failed.
    seed_history(&store, &redis, "failures", ("old", 2000), |i| i, |i| i % 500 == 499, false).await;
    // One run of `etl` fails through the store's transitions; one of `other` fails and is
    // restarted, so it is failed no longer.
    assert_eq!(store.create_run(&run("failing", "etl", 5000, None), &tasks()).await.unwrap(), CreateRun::Created);
    assert_eq!(store.create_run(&run("restarted", "other", 5001, None), &tasks()).await.unwrap(), CreateRun::Created);
    move_run(&store, "failing", RunState::Running, 5002).await;
    move_run(&store, "failing", RunState::Failed, 5003).await;
    for state in [RunState::Running, RunState::Failed, RunState::Running] {
        move_run(&store, "restarted", state, 5004).await;
    }
    /// Lists failed runs four ways: all, of `etl` (the DAG with the history), from an offset,
    /// and of `other` (whose one run is failed no longer).
    async fn listings(store: &dagmq_redis::RedisStore) {
        let failed = |dag: Option<&str>, offset: usize| RunFilter {
            dag_id: dag.map(str::to_string),
            state: Some(RunState::Failed),
            limit: 50,
            offset,
        };
        let ids = |runs: Vec<RunRecord>| runs.into_iter().map(|r| r.run_id).collect::<Vec<_>>();
        let expected = ["failing", "old1999", "old1499", "old0999", "old0499"];
        assert_eq!(ids(store.list_runs(&failed(None, 0)).await.unwrap()), expected);
        assert_eq!(ids(store.list_runs(&failed(Some("etl"), 0)).await.unwrap()), expected);
        assert_eq!(ids(store.list_runs(&failed(None, 3)).await.unwrap()), expected[3..]);
        assert!(store.list_runs(&failed(Some("other"), 0)).await.unwrap().is_empty());
    }
    // The first listing of this store checks that its indexes are complete; after it, listing
    // failed runs reads the failed ones (and the restarted one of `other`), not the history.
    listings(&store).await;
    redis.cli(&["CONFIG", "RESETSTAT"]);
    listings(&store).await;
    // At most 20 records, and the listing horizon once per listing.
    let reads = command_calls(&redis, "get");
    assert!(reads <= 24, "four listings of failed runs read {reads} run records");

    // A store written before the indexes existed (or whose marker an operator deleted): the
    // first listing builds them, once, in a process that listed before too.
    redis.cli(&["DEL", "failures:runs:state:success", "failures:runs:state:failed", "failures:runs:state:indexed"]);
    listings(&store).await;
    redis.cli(&["CONFIG", "RESETSTAT"]);
    listings(&dagmq_redis::RedisStore::connect(&redis.url(), "failures", None).await.unwrap()).await;
    let reads = command_calls(&redis, "get");
    assert!(reads <= 24, "after the indexes were built, four listings read {reads} run records");
}

/// The one-time build of the indexes by state (a store an older dagmq wrote) walks the runs
/// index by score: runs leaving that index while it walks (another run's horizon trimming the
/// oldest) cannot make it skip runs that stay, nor list those that left.
#[tokio::test]
async fn redis_building_the_indexes_by_state_skips_no_run_when_the_runs_index_shrinks() {
    let Some(redis) = crate::redis_ambiguity::OwnRedis::start() else { return };
    let store = dagmq_redis::RedisStore::connect(&redis.url(), "walk", None).await.unwrap();
    store_versions(&store).await;
    // 3,000 finished runs, one in 100 failed, as an older dagmq left them: in the runs index
    // and their DAG's, in no index by state, no marker.
    seed_history(&store, &redis, "walk", ("old", 3000), |i| i, |i| i % 100 == 99, true).await;
    // Once the walk has read its first page (the 500 oldest), a finishing run's horizon trims
    // the 1,000 oldest runs.
    let trimmed = trim_once_at("redis::index_finished_runs::after_page", &redis, "walk", 999);
    let failed = RunFilter { state: Some(RunState::Failed), limit: 100, ..RunFilter::default() };
    let listed: Vec<String> = store.list_runs(&failed).await.unwrap().into_iter().map(|r| r.run_id).collect();
    fail::remove("redis::index_finished_runs::after_page");
    assert!(trimmed.load(std::sync::atomic::Ordering::SeqCst), "the runs index shrank during the walk");
    // Every failed run still in the runs index is listed, and only those.
    let staying: Vec<String> = (1000..3000).rev().filter(|i| i % 100 == 99).map(|i| format!("old{i:04}")).collect();
    assert_eq!(listed, staying);
}

/// At a fail point of the one-time build, on this test's thread only (other tests' walks are
/// left alone) and once: trims the runs index and the indexes by state of the store `prefix` as
/// a finishing run's horizon would, up to the run created at second `up_to` of `run`.
fn trim_once_at(
    point: &'static str,
    redis: &crate::redis_ambiguity::OwnRedis,
    prefix: &str,
    up_to: i64,
) -> Arc<std::sync::atomic::AtomicBool> {
    let port = redis.port.to_string();
    let prefix = prefix.to_string();
    let horizon = at(up_to).timestamp_millis().to_string();
    let walker = std::thread::current().id();
    let trimmed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trimmed_in_callback = trimmed.clone();
    fail::cfg_callback(point, move || {
        if std::thread::current().id() == walker && !trimmed_in_callback.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            for index in ["runs", "runs:state:success", "runs:state:failed"] {
                let output = std::process::Command::new("redis-cli")
                    .args(["-p", &port, "ZREMRANGEBYSCORE", &format!("{prefix}:{index}"), "-inf", &horizon])
                    .output()
                    .expect("redis-cli");
                assert!(output.status.success(), "{output:?}");
            }
        }
    })
    .unwrap();
    trimmed
}

/// A finishing run that trims the indexes after the one-time build read a page of runs and
/// before it added them to the indexes by state: the trimmed runs stay out of every listing.
#[tokio::test]
async fn redis_building_the_indexes_by_state_adds_no_run_trimmed_meanwhile() {
    let Some(redis) = crate::redis_ambiguity::OwnRedis::start() else { return };
    let store = dagmq_redis::RedisStore::connect(&redis.url(), "race", None).await.unwrap();
    store_versions(&store).await;
    seed_history(&store, &redis, "race", ("old", 400), |i| i, |i| i % 100 == 99, true).await;
    let trimmed = trim_once_at("redis::index_finished_runs::before_add", &redis, "race", 199);
    let listed = async |dag: Option<&str>, state: Option<RunState>| {
        let filter = RunFilter { dag_id: dag.map(str::to_string), state, limit: 500, offset: 0 };
        store.list_runs(&filter).await.unwrap().into_iter().map(|r| r.run_id).collect::<Vec<_>>()
    };
    let failed = listed(None, Some(RunState::Failed)).await;
    fail::remove("redis::index_finished_runs::before_add");
    assert!(trimmed.load(std::sync::atomic::Ordering::SeqCst), "the trim came between the read and the add");
    assert_eq!(failed, ["old0399", "old0299"]);
    assert_eq!(listed(Some("etl"), Some(RunState::Failed)).await, ["old0399", "old0299"]);
    assert_eq!(listed(Some("etl"), None).await.len(), 200);
    assert_eq!(listed(None, Some(RunState::Success)).await.len(), 198);
}

/// A run is in every listing it matches or in none, whichever index a listing walks. With
/// retention, a finishing run trims the runs index and the state indexes to its horizon (its
/// creation less the retention period) but only its own DAG's index. A run that ran longer than
/// that, trimmed while it ran, is listed everywhere once it finishes; when a newer run of
/// another DAG trims it again, its DAG's index still holds it, and one DAG's failed runs were
/// listed with it or without it depending on which index was smaller. Redis now lists it in
/// none of them from then on (its record and run page stay until it expires); the in-memory
/// store, which trims nothing, lists it everywhere.
#[tokio::test]
async fn a_run_longer_than_the_retention_is_in_every_listing_it_matches_or_in_none() {
    let Some(redis) = crate::redis_ambiguity::OwnRedis::start() else { return };
    let retention = Some(std::time::Duration::from_secs(3600));
    let redis_store = dagmq_redis::RedisStore::connect(&redis.url(), "long", retention).await.unwrap();
    let memory = MemoryStore::with_retention(retention);
    for (name, store) in [("redis", &redis_store as &dyn Store), ("memory", &memory as &dyn Store)] {
        store_versions(store).await;
        assert_eq!(store.create_run(&run("long", "etl", 0, None), &tasks()).await.unwrap(), CreateRun::Created);
        move_run(store, "long", RunState::Running, 1).await;
        // Two hours later a newer run of `etl` succeeds: its horizon is an hour after `long`.
        assert_eq!(store.create_run(&run("newer", "etl", 7200, None), &tasks()).await.unwrap(), CreateRun::Created);
        move_run(store, "newer", RunState::Running, 7201).await;
        move_run(store, "newer", RunState::Success, 7202).await;
        move_run(store, "long", RunState::Failed, 7300).await;
        let listed = |dag: Option<&str>, state: Option<RunState>| {
            let filter = RunFilter { dag_id: dag.map(str::to_string), state, limit: 10, offset: 0 };
            async move { store.list_runs(&filter).await.unwrap().into_iter().map(|r| r.run_id).collect::<Vec<_>>() }
        };
        // Just finished: in every listing it matches, in both stores.
        assert_eq!(listed(Some("etl"), Some(RunState::Failed)).await, ["long"], "{name}");
        assert_eq!(listed(None, Some(RunState::Failed)).await, ["long"], "{name}");
        assert_eq!(listed(Some("etl"), None).await, ["newer", "long"], "{name}");
        assert_eq!(listed(None, None).await, ["newer", "long"], "{name}");
        // Runs of another DAG fail, one at a time, so that the failed index is first the
        // smaller one for `etl`, then the larger.
        let long: &[&str] = if name == "redis" { &[] } else { &["long"] };
        for (i, id) in ["o1", "o2", "o3", "o4"].into_iter().enumerate() {
            assert_eq!(
                store.create_run(&run(id, "other", 7400 + i as i64, None), &tasks()).await.unwrap(),
                CreateRun::Created
            );
            move_run(store, id, RunState::Running, 7410).await;
            move_run(store, id, RunState::Failed, 7420).await;
            let mut etl = vec!["newer"];
            etl.extend(long);
            assert_eq!(listed(Some("etl"), Some(RunState::Failed)).await, long, "{name}, after {id}");
            assert_eq!(listed(Some("etl"), None).await, etl, "{name}, after {id}");
            assert_eq!(listed(None, None).await[i + 1..], etl, "{name}, after {id}");
            assert_eq!(listed(None, Some(RunState::Failed)).await[i + 1..], *long, "{name}, after {id}");
        }
        assert!(store.run("long").await.unwrap().is_some(), "{name}: the record stays until it expires");
        // Paging one DAG's runs one at a time gives each once.
        let mut paged = Vec::new();
        for offset in 0..3 {
            let filter = RunFilter { dag_id: Some("etl".to_string()), state: None, limit: 1, offset };
            paged.extend(store.list_runs(&filter).await.unwrap().into_iter().map(|r| r.run_id));
        }
        let mut etl = vec!["newer"];
        etl.extend(long);
        assert_eq!(paged, etl, "{name}");
    }
}

/// The one-time build of the indexes by state resumes after the last run it read, not at a
/// count, among runs of one score too (created in the same instant: a backfill): one of them
/// pruned while it walks (its record expired) cannot make it skip another.
#[tokio::test]
async fn redis_building_the_indexes_by_state_skips_no_run_of_a_shared_score() {
    let Some(redis) = crate::redis_ambiguity::OwnRedis::start() else { return };
    let store = dagmq_redis::RedisStore::connect(&redis.url(), "ties", None).await.unwrap();
    store_versions(&store).await;
    // 1,200 finished runs created in the same millisecond, one in 100 failed (tie0000, tie0100,
    // ...), as an older dagmq left them.
    seed_history(&store, &redis, "ties", ("tie", 1200), |_| 10, |i| i % 100 == 0, true).await;
    // After the walk's first page (tie0000-tie0499), one run it read leaves the runs index: a
    // walk that resumed at a count would skip tie0500.
    let port = redis.port.to_string();
    let walker = std::thread::current().id();
    let pruned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pruned_in_callback = pruned.clone();
    fail::cfg_callback("redis::index_finished_runs::after_page", move || {
        if std::thread::current().id() == walker && !pruned_in_callback.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let output = std::process::Command::new("redis-cli")
                .args(["-p", &port, "ZREM", "ties:runs", "tie0001"])
                .output()
                .expect("redis-cli");
            assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1");
        }
    })
    .unwrap();
    let failed = RunFilter { state: Some(RunState::Failed), limit: 100, ..RunFilter::default() };
    let listed: Vec<String> = store.list_runs(&failed).await.unwrap().into_iter().map(|r| r.run_id).collect();
    fail::remove("redis::index_finished_runs::after_page");
    assert!(pruned.load(std::sync::atomic::Ordering::SeqCst), "a run left the runs index during the walk");
    let mut expected: Vec<String> = (0..1200).filter(|i| i % 100 == 0).map(|i| format!("tie{i:04}")).collect();
    let mut sorted = listed.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "listed {listed:?}");
}

/// Moves a run to `state` from the state it is in.
async fn move_run(store: &dyn Store, run_id: &str, state: RunState, at_seconds: i64) {
    let mut record = store.run(run_id).await.unwrap().unwrap();
    let from = record.state;
    record.state = state;
    record.ended_at = state.is_final().then(|| at(at_seconds));
    assert!(store.transition_run(from, &record).await.unwrap());
}

/// A stored version lives as long as the runs that name it: an unfinished run keeps it past the
/// retention period, and it leaves with the last of its runs.
#[tokio::test]
async fn memory_dag_versions_stay_while_their_runs_do() {
    let store = MemoryStore::with_retention(Some(std::time::Duration::from_secs(3600)));
    store_versions(&store).await;
    store.create_run(&run("done", "etl", 0, None), &tasks()).await.unwrap();
    store.create_run(&run("open", "etl", 1, None), &tasks()).await.unwrap();
    move_run(&store, "done", RunState::Failed, 10).await;
    // Past the retention period of `done`, which leaves; `open` still names the version.
    store.create_run(&RunRecord { dag_version: None, ..run("x1", "x", 3611, None) }, &tasks()).await.unwrap();
    assert!(store.run("done").await.unwrap().is_none());
    assert_eq!(store.dag_version("etl", "v1").await.unwrap(), Some(version("etl", "v1")));
    // A run that ends and is restarted keeps it too.
    move_run(&store, "open", RunState::Failed, 3620).await;
    move_run(&store, "open", RunState::Running, 3620).await;
    store.create_run(&RunRecord { dag_version: None, ..run("x2", "x", 7300, None) }, &tasks()).await.unwrap();
    assert_eq!(store.dag_version("etl", "v1").await.unwrap(), Some(version("etl", "v1")));
    // Once its last run is gone, so is the version.
    move_run(&store, "open", RunState::Success, 7400).await;
    store.create_run(&RunRecord { dag_version: None, ..run("x3", "x", 11_001, None) }, &tasks()).await.unwrap();
    assert!(store.run("open").await.unwrap().is_none());
    assert_eq!(store.dag_version("etl", "v1").await.unwrap(), None);
    assert_eq!(store.dag_version("other", "v1").await.unwrap(), Some(version("other", "v1")), "no run named it");
}

/// As in memory, on Redis's clock (retention 1 s): an unfinished run keeps its version past the
/// retention period, a restart keeps it again, and it expires once the last of its runs
/// finished; a version no run names expires too.
#[tokio::test]
async fn redis_dag_versions_stay_while_their_runs_do() {
    let Some(probe) = redis_store().await else { return };
    drop(probe);
    let prefix = crate::services::namespace();
    let retention = Some(std::time::Duration::from_secs(1));
    let store = dagmq_redis::RedisStore::connect(&crate::services::redis_url(), &prefix, retention).await.unwrap();
    let past_retention = || tokio::time::sleep(std::time::Duration::from_millis(2200));
    store_versions(&store).await;
    store.create_run(&run("done", "etl", 0, None), &tasks()).await.unwrap();
    store.create_run(&run("open", "etl", 1, None), &tasks()).await.unwrap();
    move_run(&store, "done", RunState::Failed, 10).await;
    past_retention().await;
    assert!(store.run("done").await.unwrap().is_none(), "the finished run expired");
    assert_eq!(store.dag_version("etl", "v1").await.unwrap(), Some(version("etl", "v1")));
    assert_eq!(store.dag_version("other", "v1").await.unwrap(), None, "no run named it");
    // A run that ends and is restarted within the retention period keeps it again.
    move_run(&store, "open", RunState::Failed, 20).await;
    move_run(&store, "open", RunState::Running, 20).await;
    past_retention().await;
    assert_eq!(store.dag_version("etl", "v1").await.unwrap(), Some(version("etl", "v1")));
    // Written again while a run names it, it stays.
    store.put_dag_version(&version("etl", "v1")).await.unwrap();
    past_retention().await;
    assert_eq!(store.dag_version("etl", "v1").await.unwrap(), Some(version("etl", "v1")));
    // Once the last of its runs finished, it expires with them.
    move_run(&store, "open", RunState::Success, 30).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.dag_version("etl", "v1").await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "the version did not expire after its last run");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(store.run("open").await.unwrap().is_none());
    store.delete_all().await.unwrap();
}

/// The calls of one Redis command since its counters were last reset (`INFO commandstats`).
fn command_calls(redis: &crate::redis_ambiguity::OwnRedis, command: &str) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.trim().parse().ok())
        .unwrap_or(0)
}

/// A listing of runs that have not finished walks the unfinished index, not the history: with
/// 2,000 finished runs stored, listing the running ones reads a few records, where it read every
/// run record before (the API's `?status=running` grew with history). Listings of everything,
/// of a DAG and of finished runs read the newest runs, as before.
#[tokio::test]
async fn redis_listing_runs_not_finished_reads_none_of_the_history() {
    let Some(redis) = crate::redis_ambiguity::OwnRedis::start() else { return };
    let store = dagmq_redis::RedisStore::connect(&redis.url(), "history", None).await.unwrap();
    store_versions(&store).await;
    let history: Vec<(RunRecord, Vec<TaskInstance>)> = (0..2000)
        .map(|i| {
            let mut record = run(&format!("old{i:04}"), if i % 2 == 0 { "etl" } else { "other" }, i, None);
            record.state = RunState::Success;
            let done = tasks().iter().map(|t| with(t, TaskState::Success, 1)).collect();
            (record, done)
        })
        .collect();
    store.seed_finished_runs(&history).await.unwrap();
    let queued = run("new", "etl", 5000, None);
    assert_eq!(store.create_run(&queued, &tasks()).await.unwrap(), CreateRun::Created);
    assert_eq!(store.create_run(&run("waiting", "other", 5001, None), &tasks()).await.unwrap(), CreateRun::Created);
    let running = RunRecord { state: RunState::Running, ..queued };
    assert!(store.transition_run(RunState::Queued, &running).await.unwrap());

    redis.cli(&["CONFIG", "RESETSTAT"]);
    let filter = |dag: Option<&str>, state: Option<RunState>| RunFilter {
        dag_id: dag.map(str::to_string),
        state,
        limit: 50,
        offset: 0,
    };
    let ids = |runs: Vec<RunRecord>| runs.into_iter().map(|r| r.run_id).collect::<Vec<_>>();
    assert_eq!(ids(store.list_runs(&filter(None, Some(RunState::Running))).await.unwrap()), vec!["new"]);
    assert_eq!(ids(store.list_runs(&filter(Some("etl"), Some(RunState::Running))).await.unwrap()), vec!["new"]);
    assert!(store.list_runs(&filter(Some("other"), Some(RunState::Running))).await.unwrap().is_empty());
    assert_eq!(ids(store.list_runs(&filter(None, Some(RunState::Queued))).await.unwrap()), vec!["waiting"]);
    let reads = command_calls(&redis, "get");
    assert!(reads <= 8, "four listings of unfinished runs read {reads} run records");

    // The seeded history is listed as finished runs, newest first, and reading 50 of them reads
    // at most two pages of 50 records (the first of the DAG's holds the running run too), not
    // the history. (The first listing of a finished state checks once that the indexes by
    // state are complete: `redis_listing_failed_runs_reads_none_of_the_successes`.)
    let newest_of_etl = filter(Some("etl"), Some(RunState::Success));
    assert_eq!(store.list_runs(&newest_of_etl).await.unwrap().len(), 50);
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let newest = ids(store.list_runs(&newest_of_etl).await.unwrap());
    assert_eq!(newest.len(), 50);
    assert_eq!(newest[..2], ["old1998".to_string(), "old1996".to_string()]);
    let newest = ids(store.list_runs(&filter(None, Some(RunState::Success))).await.unwrap());
    assert_eq!(newest[..2], ["old1999".to_string(), "old1998".to_string()]);
    let reads = command_calls(&redis, "get");
    // 150 records and the listing horizon once per listing.
    assert!(reads <= 152, "listing 50 finished runs twice read {reads} run records");
    let all = ids(store.list_runs(&filter(None, None)).await.unwrap());
    assert_eq!(all[..3], ["waiting".to_string(), "new".to_string(), "old1999".to_string()]);
    assert_eq!(store.tasks("old0007").await.unwrap().iter().filter(|t| t.state == TaskState::Success).count(), 2);
    assert!(
        store.seed_finished_runs(&[(run("unfinished", "etl", 1, None), tasks())]).await.is_err(),
        "only finished runs are seeded"
    );
}
