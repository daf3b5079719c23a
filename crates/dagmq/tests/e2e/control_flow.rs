//! Trigger rules, branching, cleanup tasks, and suspend and resume, end to end in both modes:
//! `dagmq standalone`, and a scheduler with two workers over RabbitMQ and Redis. Each scenario
//! drives the `dagmq` CLI only, so the same function checks both modes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Cluster;
use crate::support::{Cli, Standalone, cli_json as json, examples, free_port, text};

#[path = "../../../../tests/rule_table.rs"]
mod rule_table;

/// `dagmq trigger ... --wait --json`: the finished run, whether it succeeded (exit 0) or not.
fn trigger_wait(cli: Cli, args: &[&str]) -> (bool, Value) {
    let mut all = vec!["trigger"];
    all.extend_from_slice(args);
    all.extend(["--wait", "--json"]);
    let output = cli(&all);
    let run = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {} {}", text(&output.stdout), text(&output.stderr)));
    (output.status.success(), run)
}

fn states(run: &Value) -> BTreeMap<String, String> {
    run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task_id"].as_str().unwrap().to_string(), t["state"].as_str().unwrap().to_string()))
        .collect()
}

fn task<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["tasks"].as_array().unwrap().iter().find(|t| t["task_id"] == id).unwrap()
}

fn wait(limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "condition not met within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The rule table with commands (`true`, `false`): every task ends as the table says, and the
/// run fails.
fn rule_table_scenario(cli: Cli) {
    let (_, mut expected) = rule_table::rule_table_dag("command = [\"true\"]", "command = [\"false\"]");
    let (succeeded, run) = trigger_wait(cli, &["rules"]);
    assert!(!succeeded, "failed upstreams fail the run, and the CLI says so");
    assert_eq!(run["state"], "failed");
    expected.sort();
    assert_eq!(states(&run).into_iter().collect::<Vec<_>>(), expected);
    let skipped = expected.iter().filter(|(_, state)| state == "skipped").count();
    assert_eq!(run["task_counts"]["skipped"], skipped, "{}", run["task_counts"]);
}

/// The branch and cleanup examples, down each of their paths.
fn examples_scenario(cli: Cli) {
    let (ok, small) = trigger_wait(cli, &["branch"]);
    assert!(ok, "{small}");
    let small = states(&small);
    assert_eq!(
        [&small["pick"], &small["row_load"], &small["bulk_load"], &small["bulk_check"], &small["report"]],
        ["success", "success", "skipped", "skipped", "success"]
    );
    let (ok, big) = trigger_wait(cli, &["branch", "--param", "size=big"]);
    assert!(ok, "{big}");
    assert_eq!(task(&big, "pick")["output"], serde_json::json!(["bulk_load"]));
    let big = states(&big);
    assert_eq!([&big["row_load"], &big["bulk_load"], &big["bulk_check"]], ["skipped", "success", "success"]);

    let (ok, fine) = trigger_wait(cli, &["cleanup"]);
    assert!(ok, "{fine}");
    let dir = task(&fine, "make_scratch")["output"]["dir"].as_str().unwrap().to_string();
    assert!(!Path::new(&dir).exists(), "the scratch directory {dir} was removed");
    assert_eq!(states(&fine)["alert"], "skipped");
    let (ok, broken) = trigger_wait(cli, &["cleanup", "--param", "fail=yes"]);
    assert!(!ok);
    assert_eq!(broken["state"], "failed", "the cleanup does not hide the failure");
    let dir = task(&broken, "make_scratch")["output"]["dir"].as_str().unwrap().to_string();
    assert!(!Path::new(&dir).exists(), "removed after the failure too");
    let broken = states(&broken);
    assert_eq!([&broken["work"], &broken["remove_scratch"], &broken["alert"]], ["failed", "success", "success"]);
}

/// A DAG whose first task waits for a file `go` in `dir`, then fails its first try that got
/// that far (retries 1), so a retry after a resume shows the budget is intact.
fn hold_dag(dir: &Path) -> String {
    format!(
        r#"id = "hold"
[[task]]
id = "gate"
retries = 1
retry_delay = "1s"
command = ["sh", "-c", "while [ ! -f {dir}/go ]; do sleep 0.05; done; if [ ! -f {dir}/failed ]; then touch {dir}/failed; exit 1; fi"]

[[task]]
id = "after_gate"
after = ["gate"]
command = ["true"]
"#,
        dir = dir.display()
    )
}

/// Suspend while a try runs, nothing runs while suspended, resume with a new try that keeps the
/// retry budget; a suspended run can be cancelled; wrong states are refused.
fn suspend_scenario(cli: Cli, dir: &Path) {
    let show = |run: &str| json(cli, &["runs", "show", run]);
    let run_id = json(cli, &["trigger", "hold"])["run_id"].as_str().unwrap().to_string();
    wait(Duration::from_secs(30), || task(&show(&run_id), "gate")["state"] == "running");

    let refused = cli(&["runs", "resume", &run_id]);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("only a suspended run can be resumed"), "{}", text(&refused.stderr));
    let suspended = cli(&["runs", "suspend", &run_id]);
    assert!(suspended.status.success(), "{}", text(&suspended.stderr));
    assert_eq!(text(&suspended.stdout), format!("{run_id} suspended\n"));
    let run = show(&run_id);
    assert_eq!(run["state"], "suspended");
    assert_eq!((&task(&run, "gate")["state"], &task(&run, "gate")["try_number"]), (&"suspended".into(), &1.into()));
    let again = cli(&["runs", "suspend", &run_id]);
    assert!(
        text(&again.stderr).contains("is suspended; only a running run can be suspended"),
        "{}",
        text(&again.stderr)
    );

    // The worker stops the try: its process goes away, and no try starts while suspended.
    wait(Duration::from_secs(15), || {
        // The worker must be listed: an empty registry would say nothing about its tries.
        let workers = json(cli, &["workers"]);
        let workers = workers.as_array().unwrap();
        !workers.is_empty() && workers.iter().all(|w| w["running"].as_array().unwrap().is_empty())
    });
    std::fs::write(dir.join("go"), "").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let run = show(&run_id);
    assert_eq!((&run["state"], &task(&run, "gate")["try_number"]), (&"suspended".into(), &1.into()));
    assert!(!dir.join("failed").exists(), "no try ran while suspended");

    let resumed = cli(&["runs", "resume", &run_id]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    wait(Duration::from_secs(60), || show(&run_id)["state"] == "success");
    let run = show(&run_id);
    // Try 2 failed on purpose and was retried: the suspended try 1 did not use up the retry.
    assert_eq!(task(&run, "gate")["try_number"], 3);
    assert_eq!(task(&run, "after_gate")["state"], "success");

    // Cancel works on a suspended run.
    std::fs::remove_file(dir.join("go")).unwrap();
    let second = json(cli, &["trigger", "hold"])["run_id"].as_str().unwrap().to_string();
    wait(Duration::from_secs(30), || task(&show(&second), "gate")["state"] == "running");
    assert!(cli(&["runs", "suspend", &second]).status.success());
    assert!(cli(&["runs", "cancel", &second]).status.success());
    let run = show(&second);
    assert_eq!(run["state"], "cancelled");
    let tasks = run["tasks"].as_array().unwrap();
    assert!(!tasks.is_empty() && tasks.iter().all(|t| t["state"] == "cancelled"), "{run}");
}

/// DAG files for the scenarios: the examples, the rule table and the hold DAG.
fn dag_files(scratch: &Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = ["branch.toml", "cleanup.toml"]
        .iter()
        .map(|name| (name.to_string(), std::fs::read_to_string(examples().join(name)).unwrap()))
        .collect();
    let (rules, _) = rule_table::rule_table_dag("command = [\"true\"]", "command = [\"false\"]");
    files.push(("rules.toml".to_string(), rules));
    files.push(("hold.toml".to_string(), hold_dag(scratch)));
    files
}

fn scratch(mode: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dagmq-control-{mode}-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn trigger_rules_branches_and_suspend_in_standalone() {
    let scratch = scratch("standalone");
    let dags = scratch.join("dags");
    std::fs::create_dir_all(&dags).unwrap();
    for (name, body) in dag_files(&scratch) {
        std::fs::write(dags.join(name), body).unwrap();
    }
    let standalone = Standalone::start(&dags, &[]);
    let cli = |args: &[&str]| standalone.cli(args);
    rule_table_scenario(&cli);
    examples_scenario(&cli);
    suspend_scenario(&cli, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn trigger_rules_branches_and_suspend_across_two_workers() {
    let scratch = scratch("distributed");
    let files = dag_files(&scratch);
    let named: Vec<(&str, &str)> = files.iter().map(|(n, b)| (n.as_str(), b.as_str())).collect();
    let Some(mut cluster) = Cluster::new(&named) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    cluster.wait_for_workers(2);
    let cli = |args: &[&str]| cluster.cli(args);
    rule_table_scenario(&cli);
    examples_scenario(&cli);
    suspend_scenario(&cli, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
}
