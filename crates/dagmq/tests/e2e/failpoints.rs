//! A crash at every named step of the protocol (RELIABILITY.md lists the points). Each test
//! arms one fail point in one process (`FAILPOINTS`, which needs the `failpoints` feature that
//! `cargo test --workspace` turns on), lets the process abort there, starts it again without
//! the fail point, and checks that the run completes: every task succeeded exactly once in the
//! store, nothing is stuck, and no try number was used twice (the tasks append a side-effect
//! record of every start and end).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dagmq_core::{Queue, Topic};
use serde_json::Value;

use crate::cluster::Cluster;

/// Three command tasks in a chain, each appending `TASK TRY start|end` to `log`.
fn steps_dag(log: &Path) -> String {
    let mut dag = String::from("id = \"steps\"\n");
    for (i, task) in ["s1", "s2", "s3"].iter().enumerate() {
        dag.push_str(&format!(
            "[[task]]\nid = \"{task}\"\ncommand = [\"sh\", \"-c\", \"echo \\\"$DAGMQ_TASK_ID $DAGMQ_TRY start\\\" >> {0}; sleep 0.3; echo \\\"$DAGMQ_TASK_ID $DAGMQ_TRY end\\\" >> {0}\"]\n",
            log.display()
        ));
        if i > 0 {
            dag.push_str(&format!("after = [\"s{i}\"]\n"));
        }
    }
    dag
}

/// A side-effect log of the test's own.
fn side_log(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("dagmq-fp-{name}-{}.log", uuid_like()));
    let _ = std::fs::remove_file(&path);
    path
}

fn uuid_like() -> String {
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

/// The one run of `dag`, once it exists.
fn the_run(cluster: &Cluster, dag: &str) -> String {
    let mut runs = Value::Null;
    cluster.wait_until(Duration::from_secs(60), || {
        runs = cluster.json(&["runs", "list", "--dag", dag]);
        runs.as_array().is_some_and(|r| !r.is_empty())
    });
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 1, "one run per trigger key: {runs:?}");
    runs[0]["run_id"].as_str().unwrap().to_string()
}

/// Every task succeeded once in the store; in the side-effect log, each task's tries started in
/// increasing order (none twice) and the successful try ended once.
fn check_history(run: &Value, log: &Path) {
    assert_eq!(run["state"], "success", "{run}");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut starts: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut ends: BTreeMap<(String, u32), usize> = BTreeMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (task, try_number) = (parts[0].to_string(), parts[1].parse::<u32>().unwrap());
        match parts[2] {
            "start" => starts.entry(task).or_default().push(try_number),
            _ => *ends.entry((task, try_number)).or_default() += 1,
        }
    }
    for task in run["tasks"].as_array().unwrap() {
        let id = task["task_id"].as_str().unwrap();
        assert_eq!(task["state"], "success", "{task}");
        let tries = &starts[id];
        assert!(tries.windows(2).all(|w| w[0] < w[1]), "{id}: a try number used twice: {tries:?}\n{text}");
        let success = task["try_number"].as_u64().unwrap() as u32;
        assert_eq!(ends.get(&(id.to_string(), success)), Some(&1), "{id}: the successful try ended once\n{text}");
    }
}

/// Sends a command to the scheduler, again while it stands by, until it aborts at its fail
/// point (at most 60 s).
fn command_until_abort(cluster: &mut Cluster, args: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cluster.scheduler_exited() {
        assert!(std::time::Instant::now() < deadline, "the scheduler never aborted:\n{}", cluster.logs_text());
        let output = cluster.cli(args);
        if !output.status.success() && crate::support::text(&output.stderr).contains("standby") {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Starts the scheduler with `point` armed, lets it crash there, starts it again, and checks
/// the run that a keyed trigger asked for.
fn scheduler_crash_at(point: &str) {
    let log = side_log(point.replace("::", "-").as_str());
    let Some(mut cluster) = Cluster::new(&[("steps.toml", &steps_dag(&log))]) else { return };
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    publish_trigger(&cluster, "steps", "k1");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cluster.scheduler_exited() {
        assert!(std::time::Instant::now() < deadline, "the scheduler never reached {point}:\n{}", cluster.logs_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cluster.logs_text().contains(&format!("failpoint {point} panic")), "{}", cluster.logs_text());
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run_id = the_run(&cluster, "steps");
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    check_history(&run, &log);
    let _ = std::fs::remove_file(&log);
}

/// Starts worker `w1` with `point` armed, lets it crash there, starts it again, and checks.
fn worker_crash_at(point: &str) {
    let log = side_log(point.replace("::", "-").as_str());
    let Some(mut cluster) = Cluster::new(&[("steps.toml", &steps_dag(&log))]) else { return };
    cluster.start_scheduler();
    cluster.next_env(&[("FAILPOINTS", &format!("{point}=panic"))]);
    cluster.start_worker("w1");
    publish_trigger(&cluster, "steps", "k1");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cluster.worker_exited("w1") {
        assert!(std::time::Instant::now() < deadline, "the worker never reached {point}:\n{}", cluster.logs_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cluster.restart_exited_workers(), 1);
    let run_id = the_run(&cluster, "steps");
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    check_history(&run, &log);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn crash_before_run_creation() {
    scheduler_crash_at("scheduler::create_run::before");
}

/// The scheduler stores the DAG's version before the first run of it, then dies before it
/// creates the run: the trigger comes again, and the next scheduler writes the version again
/// and creates the run.
#[test]
fn crash_between_storing_the_dag_version_and_creating_the_run() {
    scheduler_crash_at("scheduler::create_run::after_version");
}

#[test]
fn crash_between_run_creation_and_the_trigger_ack() {
    scheduler_crash_at("scheduler::create_run::after");
}

#[test]
fn crash_between_the_queued_compare_and_set_and_the_publish() {
    scheduler_crash_at("scheduler::queue::after_cas");
}

#[test]
fn crash_between_the_publish_and_the_ack() {
    scheduler_crash_at("scheduler::publish::before_ack");
}

#[test]
fn crash_between_reading_a_status_update_and_acting_on_it() {
    scheduler_crash_at("scheduler::status::after_read");
}

#[test]
fn crash_between_the_claim_and_the_ack() {
    worker_crash_at("worker::claim::before_ack");
}

#[test]
fn crash_between_the_outcome_and_the_status_publish() {
    worker_crash_at("worker::outcome::before_publish");
}

/// The worker claims the next task as the one before succeeds (eager dispatch), and dies
/// before the status update of the one before is sent: the scheduler learns of the success when
/// it reads the queued try again, finds the next task running under the dead process, and
/// requeues it.
#[test]
fn crash_between_an_eager_claim_and_the_status_publish() {
    worker_crash_at("worker::eager::after_claim");
}

/// The same crash, with the worker gone for good: another worker, started after the crash,
/// runs the next task once the scheduler has taken the dead worker for lost.
#[test]
fn crash_between_an_eager_claim_and_the_status_publish_with_the_worker_gone() {
    let log = side_log("eager-gone");
    let Some(mut cluster) = Cluster::new(&[("steps.toml", &steps_dag(&log))]) else { return };
    cluster.start_scheduler();
    cluster.next_env(&[("FAILPOINTS", "worker::eager::after_claim=panic")]);
    cluster.start_worker("w1");
    publish_trigger(&cluster, "steps", "k1");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cluster.worker_exited("w1") {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never reached the fail point:\n{}",
            cluster.logs_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.start_worker("w2");
    let run_id = the_run(&cluster, "steps");
    let run = cluster.wait_run(&run_id, Duration::from_secs(120));
    check_history(&run, &log);
    let s2 = run["tasks"].as_array().unwrap().iter().find(|t| t["task_id"] == "s2").unwrap();
    assert_eq!(s2["worker"], "w2", "{s2}");
    let _ = std::fs::remove_file(&log);
}

/// A worker stopping gracefully past its grace period requeues its try as a new one and dies
/// before publishing the message: the scheduler republishes the queued try.
#[test]
fn crash_between_a_shutdown_requeue_and_its_publish() {
    let log = side_log("requeue");
    let long = format!(
        "id = \"long\"\n[[task]]\nid = \"l\"\ncommand = [\"sh\", \"-c\", \"echo \\\"l $DAGMQ_TRY start\\\" >> {0}; sleep 3; echo \\\"l $DAGMQ_TRY end\\\" >> {0}\"]\n",
        log.display()
    );
    let Some(mut cluster) = Cluster::new(&[("long.toml", &long)]) else { return };
    let config = std::env::temp_dir().join(format!("dagmq-fp-grace-{}.toml", uuid_like()));
    std::fs::write(&config, "grace_period = \"1s\"\n").unwrap();
    cluster.start_scheduler();
    cluster.next_env(&[
        ("FAILPOINTS", "worker::requeue::before_publish=panic"),
        ("DAGMQ_CONFIG", config.to_str().unwrap()),
    ]);
    cluster.start_worker("w1");
    let run_id = cluster.trigger("long");
    cluster.wait_task_state(&run_id, "l", "running");
    assert!(!cluster.terminate_worker("w1"), "the worker aborted at the fail point");
    cluster.start_worker("w1");
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    check_history(&run, &log);
    let task = &run["tasks"][0];
    assert_eq!(task["try_number"], 2, "the interrupted try was requeued as try 2: {task}");
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&config);
}

/// A crash right after a restart changed the run and its tasks (one script): the next
/// scheduler finds the run running and finishes it.
#[test]
fn crash_right_after_a_restart() {
    let mark = std::env::temp_dir().join(format!("dagmq-fp-mark-{}", uuid_like()));
    let flaky = format!(
        "id = \"flaky\"\n[[task]]\nid = \"f\"\ncommand = [\"sh\", \"-c\", \"test -f {0} || {{ touch {0}; exit 1; }}\"]\n",
        mark.display()
    );
    let Some(mut cluster) = Cluster::new(&[("flaky.toml", &flaky)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("flaky");
    assert_eq!(cluster.wait_run(&run_id, Duration::from_secs(60))["state"], "failed");
    cluster.kill_scheduler();
    cluster.next_env(&[("FAILPOINTS", "scheduler::restart::after=panic")]);
    cluster.start_scheduler();
    // The new scheduler stands by until the killed one's lease lapses.
    command_until_abort(&mut cluster, &["runs", "restart", &run_id]);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run = cluster.wait_run(&run_id, Duration::from_secs(60));
    assert_eq!(run["state"], "success", "{run}");
    assert_eq!(run["tasks"][0]["try_number"], 2);
    let _ = std::fs::remove_file(&mark);
}

/// A crash after a cancel reached the tasks but before the run: the next scheduler ends the
/// run `cancelled`, and the running try is stopped.
#[test]
fn crash_in_the_middle_of_a_cancel() {
    let Some(mut cluster) =
        Cluster::new(&[("long.toml", "id = \"long\"\n[[task]]\nid = \"l\"\ncommand = [\"sleep\", \"60\"]\n")])
    else {
        return;
    };
    cluster.next_env(&[("FAILPOINTS", "scheduler::cancel::after_tasks=panic")]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("long");
    cluster.wait_task_state(&run_id, "l", "running");
    command_until_abort(&mut cluster, &["runs", "cancel", &run_id]);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    let run = cluster.wait_run(&run_id, Duration::from_secs(60));
    assert_eq!(run["state"], "cancelled", "{run}");
    assert_eq!(run["tasks"][0]["state"], "cancelled");
    // The worker stopped the try (from the broadcast, or from the store at its next heartbeat).
    cluster.wait_until(Duration::from_secs(15), || {
        let logs = cluster.logs_text();
        logs.contains("stopping tries of a cancelled") || logs.contains("the store no longer has this try running here")
    });
}

/// A crash after a suspend reached the run but before its tasks: the next scheduler finishes the
/// suspension (the task becomes `suspended` and its try is stopped). A crash after a resume
/// reached the run but before its tasks were queued: the next scheduler queues them.
#[test]
fn crash_in_the_middle_of_a_suspend_and_of_a_resume() {
    let Some(mut cluster) =
        Cluster::new(&[("long.toml", "id = \"long\"\n[[task]]\nid = \"l\"\ncommand = [\"sleep\", \"60\"]\n")])
    else {
        return;
    };
    cluster.next_env(&[("FAILPOINTS", "scheduler::suspend::after_run=panic")]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("long");
    cluster.wait_task_state(&run_id, "l", "running");
    command_until_abort(&mut cluster, &["runs", "suspend", &run_id]);
    cluster.reap_scheduler();
    cluster.next_env(&[("FAILPOINTS", "scheduler::resume::after_run=panic")]);
    cluster.start_scheduler();
    cluster.wait_task_state(&run_id, "l", "suspended");
    assert_eq!(cluster.json(&["runs", "show", &run_id])["state"], "suspended");
    // The worker stopped the try (from the broadcast, or from the store at its next heartbeat).
    cluster.wait_until(Duration::from_secs(15), || {
        cluster.json(&["workers"]).as_array().unwrap().iter().all(|w| w["running"].as_array().unwrap().is_empty())
    });

    command_until_abort(&mut cluster, &["runs", "resume", &run_id]);
    cluster.reap_scheduler();
    cluster.start_scheduler();
    cluster.wait_until(Duration::from_secs(30), || {
        let run = cluster.json(&["runs", "show", &run_id]);
        run["state"] == "running" && run["tasks"][0]["state"] == "running" && run["tasks"][0]["try_number"] == 2
    });
    assert!(cluster.cli(&["runs", "cancel", &run_id]).status.success());
}

/// Lease renewals that fail make the scheduler step down, take the lease again under a new
/// term, and go on; the run completes.
#[test]
fn failed_lease_renewals_step_the_scheduler_down_and_it_takes_over_again() {
    let log = side_log("lease");
    let Some(mut cluster) = Cluster::new(&[("steps.toml", &steps_dag(&log))]) else { return };
    cluster.next_env(&[("FAILPOINTS", "scheduler::lease::renew=3*return")]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.wait_until(Duration::from_secs(60), || cluster.logs_text().contains("stepping down"));
    publish_trigger(&cluster, "steps", "k1");
    let run_id = the_run(&cluster, "steps");
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    check_history(&run, &log);
    assert!(!cluster.scheduler_exited(), "the scheduler went on");
    let _ = std::fs::remove_file(&log);
}
