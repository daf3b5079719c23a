//! `dagmq standalone` on the example DAGs, driven only through the CLI.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Standalone, examples, text};

fn trigger_and_wait(standalone: &Standalone, args: &[&str]) -> Value {
    let mut all = vec!["trigger"];
    all.extend_from_slice(args);
    all.push("--wait");
    standalone.json(&all)
}

fn task<'a>(run: &'a Value, task_id: &str) -> &'a Value {
    run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == task_id)
        .unwrap_or_else(|| panic!("no task {task_id}"))
}

#[test]
fn every_example_dag_reaches_its_final_state() {
    let standalone = Standalone::start(&examples(), &[]);

    let hello = trigger_and_wait(&standalone, &["hello"]);
    assert_eq!(hello["state"], "success");
    let run_id = hello["run_id"].as_str().unwrap();
    let log = standalone.cli(&["logs", run_id, "greet"]);
    assert_eq!(text(&log.stdout), format!("hello from greet, run {run_id}, try 1\n"));

    let diamond = trigger_and_wait(&standalone, &["diamond_retry"]);
    assert_eq!(diamond["state"], "success");
    assert_eq!(task(&diamond, "flaky")["try_number"], 2);
    let diamond_id = diamond["run_id"].as_str().unwrap();
    let first_try = standalone.cli(&["logs", diamond_id, "flaky", "--try", "1"]);
    assert_eq!(text(&first_try.stdout), "first try fails\n[dagmq] try 1 failed: command exited with status 3\n");

    let params = trigger_and_wait(&standalone, &["params", "--param", "date=2026-11-22", "--param", "who=x; id #"]);
    assert_eq!(params["state"], "success");
    let params_id = params["run_id"].as_str().unwrap();
    let extract = standalone.cli(&["logs", params_id, "extract"]);
    assert_eq!(text(&extract.stdout), "extracting 2026-11-22, incremental, at most 100 rows, for x; id #\n");
    let load = standalone.cli(&["logs", params_id, "load"]);
    assert_eq!(text(&load.stdout), format!("loading 2026-11-22 in run {params_id}\n"));

    // The paused cron DAG runs when triggered by hand.
    let nightly = trigger_and_wait(&standalone, &["nightly_etl"]);
    assert_eq!(nightly["state"], "success");

    // The scheduled DAG gets runs on its own.
    standalone.wait_until(Duration::from_secs(30), || {
        let runs = standalone.json(&["runs", "list", "--dag", "every_10s", "--status", "success"]);
        runs.as_array().is_some_and(|r| !r.is_empty())
    });
    let runs = standalone.json(&["runs", "list", "--dag", "every_10s"]);
    assert_eq!(runs[0]["kind"], "scheduled");

    let dags = standalone.json(&["dags", "list"]);
    let nightly = dags.as_array().unwrap().iter().find(|d| d["dag_id"] == "nightly_etl").unwrap();
    assert_eq!(nightly["paused"], true);
    assert_eq!(nightly["timezone"], "Europe/Warsaw");
}

#[test]
fn keys_restart_cancel_and_errors_through_the_cli() {
    let standalone = Standalone::start(&examples(), &[]);

    let first = standalone.json(&["trigger", "hello", "--key", "k-1"]);
    let second = standalone.json(&["trigger", "hello", "--key", "k-1"]);
    assert_eq!(first["run_id"], second["run_id"]);
    assert_eq!((first["created"].as_bool(), second["created"].as_bool()), (Some(true), Some(false)));

    // Unknown ids are bad input: exit 2 with the reason.
    let unknown = standalone.cli(&["trigger", "no_such_dag"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert_eq!(text(&unknown.stderr), "error: unknown dag \"no_such_dag\" (HTTP 404)\n");
    let unknown_run = standalone.cli(&["runs", "show", "nope"]);
    assert_eq!(unknown_run.status.code(), Some(2));
    assert!(text(&unknown_run.stderr).contains("unknown run \"nope\""));

    // A run with a long task can be cancelled; its running task is stopped.
    let dir = std::env::temp_dir().join(format!("dagmq-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("long.toml"),
        "id = \"long\"\n[[task]]\nid = \"sleepy\"\ncommand = [\"sh\", \"-c\", \"echo started; sleep 300\"]\n[[task]]\nid = \"after\"\nafter = [\"sleepy\"]\ncommand = [\"true\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("fails.toml"),
        "id = \"fails\"\n[params.ok]\ntype = \"enum\"\nvalues = [\"no\", \"yes\"]\ndefault = \"no\"\n[[task]]\nid = \"check\"\ncommand = [\"sh\", \"-c\", \"test {{ params.ok }} = yes\"]\n[[task]]\nid = \"next\"\nafter = [\"check\"]\ncommand = [\"echo\", \"next\"]\n",
    )
    .unwrap();
    let custom = Standalone::start(&dir, &[]);
    let long = custom.json(&["trigger", "long"]);
    let long_id = long["run_id"].as_str().unwrap().to_string();
    custom.wait_until(Duration::from_secs(30), || {
        custom.json(&["logs", &long_id, "sleepy"])["lines"].as_array().is_some_and(|l| !l.is_empty())
    });
    let cancel = custom.cli(&["runs", "cancel", &long_id]);
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    let run = custom.json(&["runs", "show", &long_id]);
    assert_eq!(run["state"], "cancelled");
    assert_eq!(task(&run, "sleepy")["state"], "cancelled");
    assert_eq!(task(&run, "after")["state"], "cancelled");

    // A failing run exits 1 from --wait, shows upstream_failed, and restarts.
    let failed = custom.cli(&["trigger", "fails", "--wait"]);
    assert_eq!(failed.status.code(), Some(1));
    let runs = custom.json(&["runs", "list", "--dag", "fails"]);
    let failed_id = runs[0]["run_id"].as_str().unwrap().to_string();
    let run = custom.json(&["runs", "show", &failed_id]);
    assert_eq!(run["state"], "failed");
    assert_eq!(task(&run, "check")["state"], "failed");
    assert_eq!(task(&run, "next")["state"], "upstream_failed");
    let restart = custom.cli(&["runs", "restart", &failed_id]);
    assert!(restart.status.success(), "{}", text(&restart.stderr));
    custom.wait_until(Duration::from_secs(30), || custom.json(&["runs", "show", &failed_id])["state"] == "failed");
    let run = custom.json(&["runs", "show", &failed_id]);
    assert_eq!(task(&run, "check")["try_number"], 2, "the restart ran a new try");
    let conflict = custom.cli(&["runs", "cancel", &failed_id]);
    assert_eq!(conflict.status.code(), Some(2));
    assert!(text(&conflict.stderr).contains("is already failed (HTTP 409)"), "{}", text(&conflict.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn api_token_is_required_when_set() {
    let standalone = Standalone::start(&examples(), &[("DAGMQ_API_TOKEN", "s3cret")]);
    let denied = standalone.cli(&["dags", "list"]);
    assert_eq!(denied.status.code(), Some(2));
    assert!(text(&denied.stderr).contains("missing or wrong bearer token (HTTP 401)"));
    let allowed = crate::support::dagmq()
        .args(["dags", "list", "--json"])
        .env("DAGMQ_API", &standalone.api)
        .env("DAGMQ_API_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert!(allowed.status.success(), "{}", text(&allowed.stderr));
}

#[test]
fn final_failure_is_posted_to_the_webhook() {
    let receiver = crate::support::WebhookReceiver::start();
    let dir = std::env::temp_dir().join(format!("dagmq-webhook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bad.toml"), "id = \"bad\"\n[[task]]\nid = \"boom\"\ncommand = [\"false\"]\n").unwrap();
    let standalone = Standalone::start_with_args(&dir, &["--notify-webhook", &receiver.url]);
    let run = standalone.json(&["trigger", "bad"]);
    // The receiver never blocks: a notification that does not come fails here, within 30 s.
    let bodies = receiver.wait_for(1, Duration::from_secs(30));
    drop(standalone);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let (request_line, body) = bodies[0].split_once('\n').unwrap();
    assert_eq!(request_line, "POST /hook HTTP/1.1");
    let notification: Value = serde_json::from_str(body).unwrap();
    assert_eq!(notification["kind"], "failure");
    assert_eq!(notification["dag_id"], "bad");
    assert_eq!(notification["run_id"], run["run_id"]);
    assert_eq!(notification["task_id"], "boom");
    assert_eq!(notification["try_number"], 1);
    assert_eq!(notification["error"], "command exited with status 1");
}

#[test]
fn metrics_parse_and_count_a_known_run() {
    use crate::support::{free_port, http_get, parse_metrics};

    let metrics_port = free_port();
    let dir = std::env::temp_dir().join(format!("dagmq-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(examples().join("hello.toml"), dir.join("hello.toml")).unwrap();
    let standalone = Standalone::start_with_args(&dir, &["--metrics-port", &metrics_port.to_string()]);
    let run = trigger_and_wait(&standalone, &["hello"]);
    assert_eq!(run["state"], "success");
    let failed = standalone.cli(&["trigger", "no_such_dag"]);
    assert_eq!(failed.status.code(), Some(2));
    let port: u16 = standalone.api.rsplit(':').next().unwrap().parse().unwrap();
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    let values = parse_metrics(&body);
    assert_eq!(values.get(r#"dagmq_runs_finished_total{dag="hello",state="success"}"#), Some(&1.0), "{body}");
    assert_eq!(values.get(r#"dagmq_tasks_finished_total{dag="hello",state="success"}"#), Some(&3.0), "{body}");
    assert_eq!(values.get(r#"dagmq_task_duration_seconds_count{dag="hello"}"#), Some(&3.0), "{body}");
    assert_eq!(values.get("dagmq_workers"), Some(&1.0), "{body}");
    assert_eq!(values.get(r#"dagmq_queue_depth{queue="dagmq.tasks.default"}"#), Some(&0.0), "{body}");
    assert_eq!(values.get(r#"dagmq_tasks_in_flight{state="running"}"#), Some(&0.0), "{body}");
    let (status, worker) = http_get(metrics_port, "/metrics");
    assert_eq!(status, 200);
    let worker = parse_metrics(&worker);
    assert_eq!(worker.get(r#"dagmq_worker_tries_total{state="success"}"#), Some(&3.0));
    assert_eq!(worker.get("dagmq_worker_running"), Some(&0.0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn secret_params_are_masked_in_the_api_and_in_logs() {
    let dir = std::env::temp_dir().join(format!("dagmq-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("login.toml"),
        "id = \"login\"\n[[task]]\nid = \"connect\"\ncommand = [\"sh\", \"-c\", \"echo connecting as $NAME with $DAGMQ_PARAM_DB_PASSWORD\"]\nenv = { NAME = \"{{ params.user }}\" }\n",
    )
    .unwrap();
    let standalone = Standalone::start(&dir, &[]);
    let run = trigger_and_wait(&standalone, &["login", "--param", "user=ada", "--param", "db_password=hunter22"]);
    assert_eq!(run["state"], "success");
    assert_eq!(run["params"], serde_json::json!({"db_password": "***", "user": "ada"}));
    let run_id = run["run_id"].as_str().unwrap();
    let listed = standalone.json(&["runs", "list", "--dag", "login"]);
    assert!(listed[0].get("params").is_none(), "run lists leave params out: {listed}");
    let shown = standalone.json(&["runs", "show", run_id]);
    assert_eq!(shown["params"]["db_password"], "***");
    let log = standalone.cli(&["logs", run_id, "connect"]);
    assert_eq!(text(&log.stdout), "connecting as ada with ***\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refused_dag_files_are_listed_with_their_reason_and_the_good_ones_run() {
    let dir = std::env::temp_dir().join(format!("dagmq-refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(examples().join("hello.toml"), dir.join("hello.toml")).unwrap();
    // A file named otherwise than its DAG (zz_loop.toml holds `loop`) is listed under its DAG.
    std::fs::write(
        dir.join("zz_loop.toml"),
        "id = \"loop\"\n[[task]]\nid = \"a\"\ncommand = [\"true\"]\nafter = [\"a\"]\n",
    )
    .unwrap();
    let standalone = Standalone::start(&dir, &[]);
    let dags = standalone.json(&["dags", "list"]);
    let refused = dags.as_array().unwrap().iter().find(|d| d["error"].is_string()).expect("the refused file is listed");
    assert_eq!(refused["dag_id"], "loop");
    let reason = format!("{}/zz_loop.toml:3: dag \"loop\": cycle a -> a", dir.display());
    assert_eq!(refused["error"], reason);
    let table = standalone.cli(&["dags", "list"]);
    assert!(text(&table.stderr).contains("refused: "), "{}", text(&table.stderr));
    // Triggering it says why it is not there, not that it does not exist.
    let output = standalone.cli(&["trigger", "loop"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(
        text(&output.stderr).trim(),
        format!("error: dag \"loop\" is not loaded: its file was refused: {reason} (HTTP 404)")
    );
    let output = standalone.cli(&["trigger", "nope"]);
    assert_eq!(text(&output.stderr).trim(), "error: unknown dag \"nope\" (HTTP 404)");
    assert_eq!(trigger_and_wait(&standalone, &["hello"])["state"], "success");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whether process `pid` is gone (or a zombie waiting to be reaped).
fn process_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// A worker killed with SIGKILL leaves no task process behind: its command's guard sees the
/// worker's lifeline break and kills the task's process group, shell and children alike.
#[test]
fn a_sigkilled_worker_leaves_no_task_process_running() {
    let dir = std::env::temp_dir().join(format!("dagmq-orphans-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pids = dir.join("pids");
    std::fs::write(
        dir.join("orphans.toml"),
        format!(
            "id = \"orphans\"\n[[task]]\nid = \"a\"\ncommand = [\"sh\", \"-c\", \"sleep 300 & echo $! >> {0}; echo $$ >> {0}; wait\"]\n",
            pids.display()
        ),
    )
    .unwrap();
    let mut standalone = Standalone::start(&dir, &[]);
    let out = standalone.cli(&["trigger", "orphans"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    standalone
        .wait_until(Duration::from_secs(30), || std::fs::read_to_string(&pids).is_ok_and(|t| t.lines().count() == 2));
    let started: Vec<String> = std::fs::read_to_string(&pids).unwrap().lines().map(str::to_string).collect();
    assert!(started.iter().all(|pid| !process_gone(pid)), "the task runs: {started:?}");
    standalone.child.kill().unwrap();
    standalone.child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !started.iter().all(|pid| process_gone(pid)) {
        assert!(std::time::Instant::now() < deadline, "task processes outlived their worker: {started:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

pub(crate) const OUTPUTS: &str = r#"
id = "outputs"
[[task]]
id = "count"
command = ["sh", "-c", "printf '{\"path\": \"/data/x.csv\", \"rows\": 3}' > \"$DAGMQ_OUTPUT\""]
[[task]]
id = "silent"
command = ["true"]
[[task]]
id = "garbled"
command = ["sh", "-c", "echo 'rows=3' > \"$DAGMQ_OUTPUT\""]
retries = 1
retry_delay = "1s"
[[task]]
id = "huge"
command = ["sh", "-c", "printf '\"%070000d\"' 0 > \"$DAGMQ_OUTPUT\""]
[[task]]
id = "failing"
command = ["sh", "-c", "echo '{\"half\": true}' > \"$DAGMQ_OUTPUT\"; exit 3"]
"#;

#[test]
fn command_outputs_are_read_after_exit_0_and_shown_by_the_api_and_the_cli() {
    let dir = std::env::temp_dir().join(format!("dagmq-outputs-e2e-{}", crate::support::free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("outputs.toml"), OUTPUTS).unwrap();
    let standalone = Standalone::start(&dir, &[]);
    // `trigger --wait --json` prints the finished run, outputs included.
    let output = standalone.cli(&["trigger", "outputs", "--wait", "--json"]);
    assert_eq!(output.status.code(), Some(1), "the run fails: {}", text(&output.stderr));
    let run: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(task(&run, "count")["output"], serde_json::json!({"path": "/data/x.csv", "rows": 3}));
    assert_eq!(task(&run, "silent")["output"], Value::Null, "no file: no output (and the key is there)");
    let garbled = task(&run, "garbled");
    assert_eq!((garbled["state"].as_str(), garbled["try_number"].as_u64()), (Some("failed"), Some(2)), "{garbled}");
    assert!(garbled["error"].as_str().unwrap().starts_with("the output file (DAGMQ_OUTPUT) is not JSON"), "{garbled}");
    let huge = task(&run, "huge");
    assert_eq!(huge["state"], "failed");
    assert!(huge["error"].as_str().unwrap().contains("holds 70002 bytes, more than the limit of 65536"), "{huge}");
    let failing = task(&run, "failing");
    assert_eq!(
        (failing["state"].as_str(), &failing["output"]),
        (Some("failed"), &Value::Null),
        "exit 3 hands nothing on"
    );
    // The table of `runs show` has the output column.
    let run_id = run["run_id"].as_str().unwrap();
    let shown = text(&standalone.cli(&["runs", "show", run_id]).stdout);
    assert!(shown.contains("OUTPUT") && shown.contains(r#"{"path":"/data/x.csv","rows":3}"#), "{shown}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn outputs_reach_downstream_tasks_through_templates_and_the_inputs_file() {
    let standalone = Standalone::start(&examples(), &[]);
    let run = trigger_and_wait(&standalone, &["etl_outputs"]);
    assert_eq!(run["state"], "success", "{run}");
    let run_id = run["run_id"].as_str().unwrap();
    let path = format!("/tmp/dagmq-etl-{run_id}.csv");
    assert_eq!(task(&run, "extract")["output"], serde_json::json!({"path": path, "rows": 3}));
    assert_eq!(task(&run, "load")["output"], serde_json::json!({"loaded": 3}));
    let load = text(&standalone.cli(&["logs", run_id, "load"]).stdout);
    assert_eq!(
        load,
        format!("loading 3 rows from {path}\ninputs: {{\"extract\":{{\"path\":\"{path}\",\"rows\":3}}}}\n"),
        "the template fields and DAGMQ_INPUTS"
    );
    let report = text(&standalone.cli(&["logs", run_id, "report"]).stdout);
    assert_eq!(report, format!("extract said {{\"path\":\"{path}\",\"rows\":3}}, load said 3\n"), "two steps down");
    assert!(!std::path::Path::new(&path).exists(), "load removed the file it was handed");
}

/// Sends `signal` (`INT`, `TERM`) to `child`.
fn signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{signal}");
}

#[test]
fn a_second_ctrl_c_ends_the_grace_period_at_once() {
    let dir = std::env::temp_dir().join(format!("dagmq-e2e-hurry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("slow.toml"), "id = \"slow\"\n[[task]]\nid = \"wait\"\ncommand = [\"sleep\", \"300\"]\n")
        .unwrap();
    let log = dir.join("standalone.log");
    let mut standalone = Standalone::start_logged_with(&dir, &log, &["--grace-period", "600s"]);
    let run_id = standalone.json(&["trigger", "slow"])["run_id"].as_str().unwrap().to_string();
    standalone
        .wait_until(Duration::from_secs(30), || standalone.json(&["runs", "show", &run_id])["state"] == "running");
    standalone.wait_until(Duration::from_secs(30), || {
        standalone.json(&["runs", "show", &run_id])["tasks"][0]["state"] == "running"
    });
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    signal(&standalone.child, "INT");
    standalone.wait_until(Duration::from_secs(30), || logged().contains("stop again to end it now"));
    assert_eq!(standalone.child.try_wait().unwrap(), None, "the try has 600 s to finish");
    let second = std::time::Instant::now();
    signal(&standalone.child, "INT");
    let deadline = second + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = standalone.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "still running 20 s after the second Ctrl-C: {}", logged());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}: {}", logged());
    assert!(logged().contains("stopped again: ending the grace period now"), "{}", logged());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_port_in_use_ends_the_process_before_the_scheduler_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let free = crate::support::free_port().to_string();
    for flags in [["--port", &port, "--metrics-port", &free], ["--port", &free, "--metrics-port", &port]] {
        let output = crate::support::dagmq()
            .args(["standalone", "--dags"])
            .arg(examples())
            .args(flags)
            .env("DAGMQ_LOG", "info")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{flags:?}: {output:?}");
        let said = text(&output.stderr);
        assert!(said.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{flags:?}: {said}");
        assert!(
            !said.contains("scheduler started") && !said.contains("run created"),
            "{flags:?}: the scheduler ran: {said}"
        );
    }
}

#[test]
fn a_config_files_worker_settings_do_not_stop_a_scheduler() {
    let dir = std::env::temp_dir().join(format!("dagmq-e2e-shared-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("dagmq.toml");
    std::fs::write(&config, "concurrency = 0\n").unwrap();
    let output = crate::support::dagmq().args(["scheduler", "--config"]).arg(&config).output().unwrap();
    assert!(!text(&output.stderr).contains("concurrency"), "{}", text(&output.stderr));
    let output = crate::support::dagmq().args(["standalone", "--config"]).arg(&config).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("the config file's concurrency is 0"), "{}", text(&output.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_log_of_a_task_that_never_ran_says_so() {
    let standalone = Standalone::start(&examples(), &[]);
    let run = standalone.json(&["trigger", "cleanup", "--wait"]);
    let run_id = run["run_id"].as_str().unwrap_or_else(|| panic!("{run}"));
    // The alert runs only on failure: skipped here, it never ran.
    let output = standalone.cli(&["logs", run_id, "alert"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(
        text(&output.stderr).trim(),
        format!("error: task \"alert\" of run \"{run_id}\" has not run (skipped): it has no log (HTTP 404)")
    );
    let output = standalone.cli(&["logs", run_id, "work", "--try", "2"]);
    assert!(text(&output.stderr).contains("has no try 2 (its tries are 1 to 1)"), "{}", text(&output.stderr));
}
