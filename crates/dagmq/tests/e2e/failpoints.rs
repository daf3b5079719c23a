//! A crash at every named step of the protocol (RELIABILITY.md lists the points). Each test
//! arms one fail point in one process (`FAILPOINTS`), proves that the process aborted there
//! (killed by SIGABRT, with the fail point's own line in its log), starts it again without the
//! point, and checks the runs from the store and from the tasks' side-effect log (`history.rs`):
//! each task in its expected state with its expected try number, no try started twice or above
//! the stored one, nothing started after its task's successful try or before its upstream tasks
//! had ended, no unchosen branch run; and, once the trigger queue is drained, the number of runs.
//!
//! The binary under test must be built with the `failpoints` feature: `cargo test -p dagmq`
//! builds it so (a dev-dependency of the crate on itself turns the feature on), as does
//! `cargo test --workspace`. Every test checks first, and fails with that advice otherwise.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use dagmq_core::{Queue, Topic};
use serde_json::Value;

use crate::cluster::Cluster;
use crate::history::{self, Record};
use crate::support::{WebhookReceiver, dagmq, text};

/// Fails, saying how to build it, unless the binary under test has fail points.
fn require_failpoints() {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        let output = dagmq()
            .args(["validate", "--dags"])
            .arg(crate::support::examples())
            .env("FAILPOINTS", "dagmq::probe=off")
            .env("DAGMQ_LOG", "info")
            .output()
            .expect("run dagmq validate");
        let stderr = text(&output.stderr);
        if stderr.contains("fail points armed") { Ok(()) } else { Err(stderr) }
    });
    if let Err(stderr) = checked {
        panic!(
            "the dagmq binary under test has no fail points, so no crash test can fire: build it with the \
             `failpoints` feature (`cargo test -p dagmq` does, through the crate's dev-dependency on itself, \
             and so does `cargo test --workspace`); it said: {stderr}"
        );
    }
}

/// A cluster for a crash test, with the fail points checked and a side-effect log of its own;
/// `dag` makes its one DAG file from the log's path.
fn cluster(name: &str, dag: impl FnOnce(&Path) -> String) -> Option<(Cluster, PathBuf)> {
    require_failpoints();
    let log = side_log(name);
    let cluster = Cluster::new(&[("dag.toml", &dag(&log))])?;
    Some((cluster, log))
}

/// Runs a client command that must succeed once the scheduler is active (a scheduler started
/// after a crash stands by until the dead one's lease lapses), and parses its JSON answer.
fn json_when_active(cluster: &Cluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let output = cluster.cli(&all);
        if output.status.success() {
            return serde_json::from_slice(&output.stdout).unwrap();
        }
        let stderr = text(&output.stderr);
        assert!(stderr.contains("standby") && Instant::now() < deadline, "{args:?}: {stderr}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Three recorded command tasks in a chain.
fn steps_dag(log: &Path) -> String {
    let mut dag = String::from("id = \"steps\"\n");
    for (i, task) in ["s1", "s2", "s3"].iter().enumerate() {
        dag.push_str(&format!("[[task]]\nid = \"{task}\"\n{}", history::command(log, "sleep 0.3")));
        if i > 0 {
            dag.push_str(&format!("after = [\"s{i}\"]\n"));
        }
    }
    dag
}

/// A side-effect log of the test's own.
fn side_log(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("dagmq-fp-{}-{}.log", name.replace("::", "-"), unique()));
    let _ = std::fs::remove_file(&path);
    path
}

fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    )
}

/// Publishes a keyed trigger on `dagmq.triggers`, as an outside producer would.
fn publish_trigger(cluster: &Cluster, dag: &str, key: &str) {
    let (amqp, namespace) = (cluster.amqp.clone(), cluster.namespace.clone());
    let payload = format!(r#"{{"v":1,"dag_id":"{dag}","key":"{key}"}}"#).into_bytes();
    cluster.block_on(async move {
        let mut config = dagmq_rabbitmq::RabbitConfig::new(amqp);
        config.namespace = namespace;
        let queue = dagmq_rabbitmq::RabbitQueue::connect(config).await.unwrap();
        queue.publish(&Topic::Triggers, payload).await.unwrap();
    });
}

/// The runs of `dag`, once there are `count`, by run id.
fn the_runs(cluster: &Cluster, dag: &str, count: usize) -> Vec<String> {
    let mut runs = Value::Null;
    cluster.wait_until(Duration::from_secs(60), || {
        runs = cluster.json(&["runs", "list", "--dag", dag, "--limit", "500"]);
        runs.as_array().is_some_and(|r| r.len() >= count)
    });
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), count, "one run per trigger key: {runs:?}");
    let mut ids: Vec<String> = runs.iter().map(|r| r["run_id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

/// Counts the runs of `dag` again once the trigger queue is drained (nothing ready, nothing
/// unacknowledged), so a trigger redelivered after the restart has made its run by then.
fn assert_run_count_settles(cluster: &Cluster, dag: &str, count: usize) {
    cluster.wait_until(Duration::from_secs(30), || cluster.queue_count("dagmq.triggers") == (0, 0));
    let runs = cluster.json(&["runs", "list", "--dag", dag, "--limit", "500"]);
    assert_eq!(runs.as_array().map(Vec::len), Some(count), "runs of {dag} after the restart settled: {runs}");
}

/// Checks that `status` is an abort at `point`, and that the process's log says so.
fn assert_aborted_at(status: ExitStatus, log: &str, point: &str) {
    assert_eq!(status.signal(), Some(6), "the process ended by SIGABRT at {point}, not {status:?}:\n{log}");
    let line = format!("dagmq: failpoint {point} panic: aborting");
    assert!(log.contains(&line), "the log has no {line:?}:\n{log}");
}

/// Waits until the scheduler has aborted at `point` (at most 90 s), and proves it.
fn wait_scheduler_abort(cluster: &mut Cluster, point: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = cluster.scheduler_status() {
            break status;
        }
        assert!(Instant::now() < deadline, "the scheduler never reached {point}:\n{}", cluster.logs_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_aborted_at(status, &cluster.log_of("scheduler"), point);
}

/// Waits until worker `name` has aborted at `point` (at most 60 s), and proves it.
fn wait_worker_abort(cluster: &mut Cluster, name: &str, point: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = cluster.worker_status(name) {
            break status;
        }
        assert!(Instant::now() < deadline, "worker {name} never reached {point}:\n{}", cluster.logs_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_aborted_at(status, &cluster.log_of(name), point);
}

/// Sends a command to the scheduler, again while it stands by, until it aborts at `point` (at
/// most 90 s), and proves it.
fn command_until_abort(cluster: &mut Cluster, args: &[&str], point: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = cluster.scheduler_status() {
            break status;
        }
        assert!(Instant::now() < deadline, "the scheduler never reached {point}:\n{}", cluster.logs_text());
        let output = cluster.cli(args);
        if !output.status.success() {
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_aborted_at(status, &cluster.log_of("scheduler"), point);
}

/// A task's expected end: its state and, for a task that ran, its try number in the store.
/// Tasks that did not run (skipped, upstream_failed) must have no execution at all.
type Expected<'a> = &'a [(&'a str, &'a str, u32)];

/// Checks a finished run against `expected` (every task of the run, none more) and the
/// side-effect log. `rerun` names tasks that ran again after their downstream tasks had started
/// (a clear): their downstream tasks are checked against an earlier successful try.
fn check_run(run: &Value, state: &str, log: &Path, expected: Expected, rerun: &[&str]) {
    assert_eq!(run["state"], state, "{run}");
    let run_id = run["run_id"].as_str().unwrap();
    let records: Vec<Record> = history::read(log).into_iter().filter(|r| r.run == run_id).collect();
    let shown = || records.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>().join("\n");
    let tasks: BTreeMap<&str, &Value> =
        run["tasks"].as_array().unwrap().iter().map(|t| (t["task_id"].as_str().unwrap(), t)).collect();
    let mut ids: Vec<&str> = tasks.keys().copied().collect();
    let mut wanted: Vec<&str> = expected.iter().map(|(id, _, _)| *id).collect();
    ids.sort_unstable();
    wanted.sort_unstable();
    assert_eq!(ids, wanted, "the run's tasks: {run}");
    // When each task's stored try ended (for the upstream checks): its one `end` record.
    let mut success_end: BTreeMap<&str, u128> = BTreeMap::new();
    for &(id, task_state, try_number) in expected {
        let task = tasks[id];
        assert_eq!(task["state"], task_state, "{id}: {task}");
        let starts: Vec<&Record> = records.iter().filter(|r| r.start && r.task == id).collect();
        let tries: Vec<u32> = starts.iter().map(|r| r.try_number).collect();
        if !matches!(task_state, "success" | "failed" | "cancelled") {
            assert!(starts.is_empty(), "{id} is {task_state} but ran: {tries:?}\n{}", shown());
            continue;
        }
        assert_eq!(task["try_number"], try_number, "{id}: the stored try\n{}", shown());
        assert!(tries.windows(2).all(|w| w[0] < w[1]), "{id}: a try started twice: {tries:?}\n{}", shown());
        assert!(tries.iter().all(|&t| t <= try_number), "{id}: a try above the stored one ran: {tries:?}");
        assert!(tries.contains(&try_number), "{id}: the stored try {try_number} never started: {tries:?}");
        let ends: Vec<&Record> =
            records.iter().filter(|r| !r.start && r.task == id && r.try_number == try_number).collect();
        if task_state == "success" {
            assert_eq!(ends.len(), 1, "{id}: the successful try ended once\n{}", shown());
            let end = ends[0].at;
            success_end.insert(id, end);
            let late: Vec<&&Record> = starts.iter().filter(|r| r.at > end).collect();
            assert!(late.is_empty(), "{id}: started after its successful try ended: {late:?}");
        }
    }
    for &(id, _, try_number) in expected {
        let Some(start) = records.iter().find(|r| r.start && r.task == id && r.try_number == try_number) else {
            continue;
        };
        for upstream in tasks[id]["after"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let ended = if rerun.contains(&upstream) {
                records.iter().filter(|r| !r.start && r.task == upstream).map(|r| r.at).min()
            } else {
                success_end.get(upstream).copied()
            };
            if let Some(ended) = ended {
                assert!(
                    ended <= start.at,
                    "{id} try {try_number} started before upstream {upstream} ended\n{}",
                    shown()
                );
            } else if tasks[upstream]["state"] == "success" {
                panic!("{id}: upstream {upstream} succeeded without an end record\n{}", shown());
            }
        }
    }
}

/// The `steps` chain, every task successful with the given try numbers.
fn steps(tries: [u32; 3]) -> [(&'static str, &'static str, u32); 3] {
    [("s1", "success", tries[0]), ("s2", "success", tries[1]), ("s3", "success", tries[2])]
}

/// Starts the scheduler with `point` armed, lets it crash there, starts it again, and checks
/// the run that a keyed trigger asked for.
fn scheduler_crash_at(point: &str, tries: [u32; 3]) {
    let Some((mut cluster, log)) = cluster(point, steps_dag) else { return };
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    publish_trigger(&cluster, "steps", "k1");
    wait_scheduler_abort(&mut cluster, point);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run_id = the_runs(&cluster, "steps", 1).remove(0);
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    check_run(&run, "success", &log, &steps(tries), &[]);
    assert_run_count_settles(&cluster, "steps", 1);
    let _ = std::fs::remove_file(&log);
}

/// Starts worker `w1` with `point` armed, lets it crash there, starts it again, and checks.
fn worker_crash_at(point: &str, tries: [u32; 3]) {
    let Some((mut cluster, log)) = cluster(point, steps_dag) else { return };
    cluster.start_scheduler();
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_worker("w1");
    publish_trigger(&cluster, "steps", "k1");
    wait_worker_abort(&mut cluster, "w1", point);
    assert_eq!(cluster.restart_exited_workers(), 1);
    let run_id = the_runs(&cluster, "steps", 1).remove(0);
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    check_run(&run, "success", &log, &steps(tries), &[]);
    assert_run_count_settles(&cluster, "steps", 1);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn crash_before_run_creation() {
    scheduler_crash_at("scheduler::create_run::before", [1, 1, 1]);
}

/// The scheduler stores the DAG's version before the first run of it, then dies before it
/// creates the run: the trigger comes again, and the next scheduler writes the version again
/// and creates the run.
#[test]
fn crash_between_storing_the_dag_version_and_creating_the_run() {
    scheduler_crash_at("scheduler::create_run::after_version", [1, 1, 1]);
}

#[test]
fn crash_between_run_creation_and_the_trigger_ack() {
    scheduler_crash_at("scheduler::create_run::after", [1, 1, 1]);
}

#[test]
fn crash_between_the_queued_compare_and_set_and_the_publish() {
    scheduler_crash_at("scheduler::queue::after_cas", [1, 1, 1]);
}

#[test]
fn crash_between_the_publish_and_the_ack() {
    scheduler_crash_at("scheduler::publish::before_ack", [1, 1, 1]);
}

#[test]
fn crash_between_reading_a_status_update_and_acting_on_it() {
    scheduler_crash_at("scheduler::status::after_read", [1, 1, 1]);
}

/// The try claimed by the dead process is requeued as try 2 once the worker starts again.
#[test]
fn crash_between_the_claim_and_the_ack() {
    worker_crash_at("worker::claim::before_ack", [2, 1, 1]);
}

/// The try ran, and its process died before the outcome reached the store: the scheduler
/// requeues it as try 2 once the worker starts again.
#[test]
fn crash_between_a_try_and_its_outcome_compare_and_set() {
    worker_crash_at("worker::outcome::before_cas", [2, 1, 1]);
}

/// The outcome is in the store: nothing runs again. (With eager claims, `s1` and `s2` reach
/// the point of the eager claim instead; `s3`, the last, reaches this one.)
#[test]
fn crash_between_the_outcome_and_the_status_publish() {
    worker_crash_at("worker::outcome::before_publish", [1, 1, 1]);
}

/// The worker claims the next task as the one before succeeds (eager dispatch), and dies
/// before the status update of the one before is sent: the scheduler learns of the success when
/// it reads the queued try again, finds the next task running under the dead process, and
/// requeues it as try 2.
#[test]
fn crash_between_an_eager_claim_and_the_status_publish() {
    worker_crash_at("worker::eager::after_claim", [1, 2, 1]);
}

/// The same crash, with the worker gone for good: another worker, started after the crash,
/// runs the next task once the scheduler has taken the dead worker for lost.
#[test]
fn crash_between_an_eager_claim_and_the_status_publish_with_the_worker_gone() {
    let point = "worker::eager::after_claim";
    let Some((mut cluster, log)) = cluster("eager-gone", steps_dag) else { return };
    cluster.start_scheduler();
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_worker("w1");
    publish_trigger(&cluster, "steps", "k1");
    wait_worker_abort(&mut cluster, "w1", point);
    cluster.start_worker("w2");
    let run_id = the_runs(&cluster, "steps", 1).remove(0);
    let run = cluster.wait_run(&run_id, Duration::from_secs(120));
    check_run(&run, "success", &log, &steps([1, 2, 1]), &[]);
    let s2 = run["tasks"].as_array().unwrap().iter().find(|t| t["task_id"] == "s2").unwrap();
    assert_eq!(s2["worker"], "w2", "{s2}");
    assert_run_count_settles(&cluster, "steps", 1);
    let _ = std::fs::remove_file(&log);
}

/// Three tasks with no upstream, all queued at once.
fn fan_dag(log: &Path) -> String {
    let mut dag = String::from("id = \"fan\"\n");
    for task in ["f1", "f2", "f3"] {
        dag.push_str(&format!("[[task]]\nid = \"{task}\"\n{}", history::command(log, "sleep 0.3")));
    }
    dag
}

/// A worker of one slot ends a try and claims the slot's next try, from a message its consumer
/// holds already, in the same store call as the outcome (`Store::finish_and_claim`), then dies
/// before acknowledging that message. The outcome is in the store; the next try is `running`
/// under the dead process and never started: its message, delivered again, is found claimed by
/// another instance, and the scheduler requeues the try as try 2 once the worker starts again.
#[test]
fn crash_between_an_outcome_with_the_next_claim_and_the_ack() {
    let point = "worker::claim_next::before_ack";
    let Some((mut cluster, log)) = cluster(point, fan_dag) else { return };
    cluster.start_scheduler();
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_worker_with("w1", &["--concurrency", "1"]);
    publish_trigger(&cluster, "fan", "k1");
    wait_worker_abort(&mut cluster, "w1", point);
    assert_eq!(cluster.restart_exited_workers(), 1);
    let run_id = the_runs(&cluster, "fan", 1).remove(0);
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    // One task was claimed with the outcome as the worker died: it alone needed a second try.
    let tries: BTreeMap<&str, u64> = run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task_id"].as_str().unwrap(), t["try_number"].as_u64().unwrap()))
        .collect();
    assert_eq!(tries.values().filter(|&&n| n == 2).count(), 1, "{run}");
    assert_eq!(tries.values().filter(|&&n| n == 1).count(), 2, "{run}");
    let expected: Vec<(&str, &str, u32)> =
        ["f1", "f2", "f3"].into_iter().map(|id| (id, "success", tries[id] as u32)).collect();
    check_run(&run, "success", &log, &expected, &[]);
    assert_run_count_settles(&cluster, "fan", 1);
    let _ = std::fs::remove_file(&log);
}

/// A worker stopping gracefully past its grace period requeues its try as a new one and dies
/// before publishing the message: the scheduler republishes the queued try.
#[test]
fn crash_between_a_shutdown_requeue_and_its_publish() {
    let point = "worker::requeue::before_publish";
    let Some((mut cluster, log)) =
        cluster("requeue", |log| format!("id = \"long\"\n[[task]]\nid = \"l\"\n{}", history::command(log, "sleep 3")))
    else {
        return;
    };
    let config = std::env::temp_dir().join(format!("dagmq-fp-grace-{}.toml", unique()));
    std::fs::write(&config, "grace_period = \"1s\"\n").unwrap();
    cluster.start_scheduler();
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic")), ("DAGMQ_CONFIG", config.to_str().unwrap())]);
    cluster.start_worker("w1");
    let run_id = cluster.trigger("long");
    cluster.wait_task_state(&run_id, "l", "running");
    assert!(!cluster.terminate_worker("w1"), "the worker aborted at the fail point");
    let line = format!("dagmq: failpoint {point} panic: aborting");
    assert!(cluster.log_of("w1").contains(&line), "{}", cluster.log_of("w1"));
    cluster.start_worker("w1");
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    // The interrupted try was requeued as try 2.
    check_run(&run, "success", &log, &[("l", "success", 2)], &[]);
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&config);
}

/// The scheduler requeues the try of a worker that started again (SIGKILLed mid-try) and dies
/// before publishing the new try: the next scheduler publishes the queued try on recovery.
#[test]
fn crash_right_after_a_zombie_requeue() {
    let point = "scheduler::requeue::after_cas";
    let Some((mut cluster, log)) = cluster("zombie", |log| {
        format!(
            "id = \"long\"\n[[task]]\nid = \"l\"\n{}[[task]]\nid = \"m\"\nafter = [\"l\"]\n{}",
            history::command(log, "sleep 3"),
            history::command(log, "true")
        )
    }) else {
        return;
    };
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("long");
    cluster.wait_task_state(&run_id, "l", "running");
    cluster.kill_worker("w1");
    // The same name, another instance: the zombie check requeues the dead one's try at once.
    cluster.start_worker("w1");
    wait_scheduler_abort(&mut cluster, point);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    // Try 1's process outlived its worker (SIGKILL does not reach the task's shell) and may
    // have ended; try 2 is the one the store has.
    check_run(&run, "success", &log, &[("l", "success", 2), ("m", "success", 1)], &[]);
    let _ = std::fs::remove_file(&log);
}

/// A try failed with a retry left: the scheduler stores the retry time and dies before starting
/// the timer. The next scheduler finds the retry time on recovery and runs try 2 then.
#[test]
fn crash_right_after_a_retry_is_timed() {
    let point = "scheduler::retry::after_cas";
    let Some((mut cluster, log)) = cluster("retry", |log| {
        format!(
            "id = \"flaky\"\n[[task]]\nid = \"f\"\nretries = 1\nretry_delay = \"1s\"\n{}[[task]]\nid = \"g\"\nafter = [\"f\"]\n{}",
            history::command(log, "test \"$DAGMQ_TRY\" -ge 2"),
            history::command(log, "true")
        )
    }) else {
        return;
    };
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    publish_trigger(&cluster, "flaky", "k1");
    wait_scheduler_abort(&mut cluster, point);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run_id = the_runs(&cluster, "flaky", 1).remove(0);
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    check_run(&run, "success", &log, &[("f", "success", 2), ("g", "success", 1)], &[]);
    assert_run_count_settles(&cluster, "flaky", 1);
    let _ = std::fs::remove_file(&log);
}

/// A Rust task returned follow-ups; the scheduler added them to the run and died before taking
/// them into its view. The next scheduler loads them from the store: they run, before the
/// downstream task, once each.
#[test]
fn crash_right_after_follow_ups_are_added() {
    let point = "scheduler::follow_ups::after_add";
    let Some((mut cluster, log)) = cluster("follow-ups", |log| {
        format!(
            "id = \"split\"\n[[task]]\nid = \"split\"\nrun = \"split\"\nargs = {{ log = {} }}\n[[task]]\nid = \"merge\"\nafter = [\"split\"]\n{}",
            history::toml_string(&log.display().to_string()),
            history::command(log, "true")
        )
    }) else {
        return;
    };
    cluster.with_rust_tasks();
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    publish_trigger(&cluster, "split", "k1");
    wait_scheduler_abort(&mut cluster, point);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run_id = the_runs(&cluster, "split", 1).remove(0);
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    let expected = [
        ("split", "success", 1),
        ("split.part1", "success", 1),
        ("split.part2", "success", 1),
        ("merge", "success", 1),
    ];
    check_run(&run, "success", &log, &expected, &[]);
    let merge = run["tasks"].as_array().unwrap().iter().find(|t| t["task_id"] == "merge").unwrap();
    // Follow-up ids are the returning task's id, a dot and the id it gave.
    for part in ["split.part1", "split.part2"] {
        assert!(merge["after"].as_array().unwrap().iter().any(|a| a == part), "merge waits for {part}: {merge}");
    }
    assert_run_count_settles(&cluster, "split", 1);
    let _ = std::fs::remove_file(&log);
}

/// A branch task chose `left`; the scheduler skipped `right` and died before deciding what
/// follows. The next scheduler spreads the skip and runs the join: nothing unchosen runs.
#[test]
fn crash_right_after_a_branch_skips() {
    let point = "scheduler::branch::after_skip";
    let Some((mut cluster, log)) = cluster("branch", |log| {
        format!(
            "id = \"branch\"\n\
         [[task]]\nid = \"pick\"\nbranch = true\n{}\
         [[task]]\nid = \"left\"\nafter = [\"pick\"]\n{}\
         [[task]]\nid = \"right\"\nafter = [\"pick\"]\n{}\
         [[task]]\nid = \"after_right\"\nafter = [\"right\"]\n{}\
         [[task]]\nid = \"join\"\nafter = [\"left\", \"right\"]\ntrigger_rule = \"none_failed\"\n{}",
            history::command(log, "echo '\"left\"' > \"$DAGMQ_OUTPUT\""),
            history::command(log, "true"),
            history::command(log, "true"),
            history::command(log, "true"),
            history::command(log, "true"),
        )
    }) else {
        return;
    };
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    publish_trigger(&cluster, "branch", "k1");
    wait_scheduler_abort(&mut cluster, point);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run_id = the_runs(&cluster, "branch", 1).remove(0);
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    let expected = [
        ("pick", "success", 1),
        ("left", "success", 1),
        ("right", "skipped", 0),
        ("after_right", "skipped", 0),
        ("join", "success", 1),
    ];
    check_run(&run, "success", &log, &expected, &[]);
    assert_run_count_settles(&cluster, "branch", 1);
    let _ = std::fs::remove_file(&log);
}

/// The first of two runs of a DAG with `max_active_runs = 1` ends; the scheduler dies right
/// after storing that. The next scheduler starts the second run, and both end once.
#[test]
fn crash_right_after_a_run_finishes() {
    let point = "scheduler::finish_run::after";
    let Some((mut cluster, log)) = cluster("finish", |log| {
        steps_dag(log).replacen("id = \"steps\"\n", "id = \"steps\"\nmax_active_runs = 1\n", 1)
    }) else {
        return;
    };
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    publish_trigger(&cluster, "steps", "k1");
    publish_trigger(&cluster, "steps", "k2");
    wait_scheduler_abort(&mut cluster, point);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    for run_id in the_runs(&cluster, "steps", 2) {
        let run = cluster.wait_run(&run_id, Duration::from_secs(90));
        check_run(&run, "success", &log, &steps([1, 1, 1]), &[]);
    }
    assert_run_count_settles(&cluster, "steps", 2);
    let _ = std::fs::remove_file(&log);
}

/// A task failed for good and the scheduler died before sending its notification. The run
/// ends `failed` with the next scheduler, and the failure is not notified twice. (It is not
/// notified at all: notifications are sent at most once, RELIABILITY.md.)
#[test]
fn crash_between_a_final_failure_and_its_notification() {
    let point = "scheduler::notify::before_send";
    let Some((mut cluster, log)) = cluster("notify", |log| {
        format!(
            "id = \"bad\"\n[[task]]\nid = \"boom\"\n{}[[task]]\nid = \"never\"\nafter = [\"boom\"]\n{}",
            history::command(log, "false"),
            history::command(log, "true")
        )
    }) else {
        return;
    };
    let hook = WebhookReceiver::start();
    cluster.scheduler_flags(&["--notify-webhook", &hook.url]);
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    publish_trigger(&cluster, "bad", "k1");
    wait_scheduler_abort(&mut cluster, point);
    assert!(hook.bodies().is_empty(), "nothing was sent before the crash: {:?}", hook.bodies());
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let first = the_runs(&cluster, "bad", 1).remove(0);
    let run = cluster.wait_run(&first, Duration::from_secs(90));
    check_run(&run, "failed", &log, &[("boom", "failed", 1), ("never", "upstream_failed", 0)], &[]);
    // A second failure is notified; by then a notification of the first, if any, was sent too.
    publish_trigger(&cluster, "bad", "k2");
    let second = the_runs(&cluster, "bad", 2).into_iter().find(|id| *id != first).unwrap();
    let bodies = hook.wait_for(1, Duration::from_secs(60));
    let second_run = cluster.wait_run(&second, Duration::from_secs(60));
    assert_eq!(second_run["state"], "failed", "{second_run}");
    let about = |run_id: &str| bodies.iter().filter(|b| b.contains(&format!("\"run_id\":\"{run_id}\""))).count();
    assert_eq!(about(&second), 1, "{bodies:?}");
    assert!(about(&first) <= 1, "the first failure was notified twice: {bodies:?}");
    eprintln!("notifications of the failure the crash interrupted: {}", about(&first));
    assert_run_count_settles(&cluster, "bad", 2);
    let _ = std::fs::remove_file(&log);
}

/// A backfill of five points is cut off by a crash after its third run: the three runs created
/// complete with the next scheduler, and the same backfill again creates the two missing runs
/// only.
#[test]
fn crash_in_the_middle_of_a_backfill() {
    let point = "scheduler::backfill::after_run";
    let Some((mut cluster, log)) = cluster("backfill", |log| {
        format!(
            "id = \"daily\"\nschedule = \"@daily\"\nstart = \"2026-10-01T00:00:00Z\"\npaused = true\n[[task]]\nid = \"work\"\n{}",
            history::command(log, "true")
        )
    }) else {
        return;
    };
    // The third run's creation is the third time the point is reached.
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=2*off->panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let backfill = ["dags", "backfill", "daily", "--from", "2026-11-01T00:00:00Z", "--to", "2026-11-05T00:00:00Z"];
    command_until_abort(&mut cluster, &backfill, point);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let done = the_runs(&cluster, "daily", 3);
    let again = json_when_active(&cluster, &backfill);
    assert_eq!((&again["created"], &again["existing"]), (&Value::from(2), &Value::from(3)), "{again}");
    let all = the_runs(&cluster, "daily", 5);
    assert!(done.iter().all(|id| all.contains(id)), "{done:?} {all:?}");
    for run_id in &all {
        let run = cluster.wait_run(run_id, Duration::from_secs(90));
        check_run(&run, "success", &log, &[("work", "success", 1)], &[]);
    }
    assert_run_count_settles(&cluster, "daily", 5);
    let _ = std::fs::remove_file(&log);
}

/// A clear of a finished task of a running run reached the store, and the scheduler died before
/// queueing it: the next scheduler queues it, and it runs as try 2.
#[test]
fn crash_in_the_middle_of_a_clear() {
    let point = "scheduler::clear::after_tasks";
    let Some((mut cluster, log)) = cluster("clear", |log| {
        format!(
            "id = \"pair\"\n[[task]]\nid = \"a\"\n{}[[task]]\nid = \"b\"\nafter = [\"a\"]\n{}",
            history::command(log, "true"),
            history::command(log, "sleep 4")
        )
    }) else {
        return;
    };
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("pair");
    cluster.wait_task_state(&run_id, "b", "running");
    command_until_abort(&mut cluster, &["runs", "clear", &run_id, "--task", "a"], point);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    check_run(&run, "success", &log, &[("a", "success", 2), ("b", "success", 1)], &["a"]);
    let _ = std::fs::remove_file(&log);
}

/// A crash right after a restart changed the run and its tasks (one script): the next
/// scheduler finds the run running and finishes it.
#[test]
fn crash_right_after_a_restart() {
    let point = "scheduler::restart::after";
    let mark = std::env::temp_dir().join(format!("dagmq-fp-mark-{}", unique()));
    let Some((mut cluster, log)) = cluster("restart", |log| {
        format!(
            "id = \"flaky\"\n[[task]]\nid = \"f\"\n{}",
            history::command(log, &format!("test -f '{0}' || {{ touch '{0}'; exit 1; }}", mark.display()))
        )
    }) else {
        return;
    };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("flaky");
    assert_eq!(cluster.wait_run(&run_id, Duration::from_secs(60))["state"], "failed");
    cluster.kill_scheduler();
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    // The new scheduler stands by until the killed one's lease lapses.
    command_until_abort(&mut cluster, &["runs", "restart", &run_id], point);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run = cluster.wait_run(&run_id, Duration::from_secs(60));
    check_run(&run, "success", &log, &[("f", "success", 2)], &[]);
    let _ = std::fs::remove_file(&mark);
    let _ = std::fs::remove_file(&log);
}

/// A crash after a cancel reached the tasks but before the run: the next scheduler ends the
/// run `cancelled`, and the running try is stopped.
#[test]
fn crash_in_the_middle_of_a_cancel() {
    let point = "scheduler::cancel::after_tasks";
    let Some((mut cluster, log)) =
        cluster("cancel", |log| format!("id = \"long\"\n[[task]]\nid = \"l\"\n{}", history::command(log, "sleep 60")))
    else {
        return;
    };
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("long");
    cluster.wait_task_state(&run_id, "l", "running");
    command_until_abort(&mut cluster, &["runs", "cancel", &run_id], point);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run = cluster.wait_run(&run_id, Duration::from_secs(60));
    assert_eq!(run["state"], "cancelled", "{run}");
    assert_eq!(run["tasks"][0]["state"], "cancelled");
    assert_eq!(run["tasks"][0]["try_number"], 1);
    // The worker stopped the try (from the broadcast, or from the store at its next heartbeat).
    cluster.wait_until(Duration::from_secs(15), || {
        let logs = cluster.log_of("w1");
        logs.contains("stopped tries of a cancelled") || logs.contains("the store no longer has this try running here")
    });
    let _ = std::fs::remove_file(&log);
}

/// The workers, which must list `name`: each with the tries it runs.
fn running_on(cluster: &Cluster, name: &str) -> Vec<Value> {
    let workers = cluster.json(&["workers"]);
    let worker = workers.as_array().unwrap().iter().find(|w| w["name"] == name).cloned();
    let worker = worker.unwrap_or_else(|| panic!("worker {name} is not registered: {workers}"));
    worker["running"].as_array().unwrap().clone()
}

/// A crash after a suspend reached the run but before its tasks: the next scheduler finishes the
/// suspension (the task becomes `suspended` and its try is stopped). A crash after a resume
/// reached the run but before its tasks were queued: the next scheduler queues them.
#[test]
fn crash_in_the_middle_of_a_suspend_and_of_a_resume() {
    let (suspend, resume) = ("scheduler::suspend::after_run", "scheduler::resume::after_run");
    let Some((mut cluster, log)) =
        cluster("suspend", |log| format!("id = \"long\"\n[[task]]\nid = \"l\"\n{}", history::command(log, "sleep 60")))
    else {
        return;
    };
    cluster.next_env(&[("FAILPOINTS", &format!("{suspend}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("long");
    cluster.wait_task_state(&run_id, "l", "running");
    command_until_abort(&mut cluster, &["runs", "suspend", &run_id], suspend);
    cluster.reap_scheduler();
    cluster.next_env(&[("FAILPOINTS", &format!("{resume}=panic"))]);
    cluster.start_scheduler();
    cluster.wait_task_state(&run_id, "l", "suspended");
    assert_eq!(cluster.json(&["runs", "show", &run_id])["state"], "suspended");
    // The worker stopped the try (from the broadcast, or from the store at its next heartbeat).
    cluster.wait_until(Duration::from_secs(15), || running_on(&cluster, "w1").is_empty());

    command_until_abort(&mut cluster, &["runs", "resume", &run_id], resume);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    cluster.wait_until(Duration::from_secs(30), || {
        let run = cluster.json(&["runs", "show", &run_id]);
        run["state"] == "running" && run["tasks"][0]["state"] == "running" && run["tasks"][0]["try_number"] == 2
    });
    // Try 1 was stopped, try 2 runs: each started once, and no other.
    cluster.wait_until(Duration::from_secs(15), || {
        history::read(&log).iter().filter(|r| r.start).map(|r| r.try_number).collect::<Vec<_>>() == [1, 2]
    });
    assert!(cluster.cli(&["runs", "cancel", &run_id]).status.success());
    let _ = std::fs::remove_file(&log);
}

/// Lease renewals that fail make the scheduler step down, take the lease again under a new
/// term, and go on; the run completes.
#[test]
fn failed_lease_renewals_step_the_scheduler_down_and_it_takes_over_again() {
    let Some((mut cluster, log)) = cluster("lease", steps_dag) else { return };
    cluster.next_env(&[("FAILPOINTS", "scheduler::lease::renew=3*return")]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.wait_until(Duration::from_secs(60), || cluster.log_of("scheduler").contains("stepping down"));
    publish_trigger(&cluster, "steps", "k1");
    let run_id = the_runs(&cluster, "steps", 1).remove(0);
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    check_run(&run, "success", &log, &steps([1, 1, 1]), &[]);
    assert!(!cluster.scheduler_exited(), "the scheduler went on");
    assert_run_count_settles(&cluster, "steps", 1);
    let _ = std::fs::remove_file(&log);
}
