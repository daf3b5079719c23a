//! Backfill and clear end to end in both modes, through the CLI and the HTTP API.

use std::time::Duration;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::support::{Cli, Standalone, cli_json as json, free_port, text};

const DAILY: &str = r#"id = "daily"
schedule = "@daily"
start = "2026-10-01T00:00:00Z"
paused = true
max_active_runs = 2
[[task]]
id = "work"
command = ["sh", "-c", "echo {{ logical_date }}"]
"#;

const DIAMOND: &str = r#"id = "diamond"
[[task]]
id = "a"
command = ["true"]
[[task]]
id = "b"
after = ["a"]
command = ["true"]
[[task]]
id = "c"
after = ["a"]
command = ["true"]
[[task]]
id = "d"
after = ["b", "c"]
command = ["true"]
"#;

fn scenario(cli: Cli, api: &str) {
    // Five days, waited for with progress; a second backfill of an overlapping range adds only
    // the new points.
    let output =
        cli(&["dags", "backfill", "daily", "--from", "2026-11-01T00:00:00Z", "--to", "2026-11-05T00:00:00Z", "--wait"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(stderr.starts_with("5 runs: 5 created, 0 existing\n"), "{stderr}");
    assert!(stderr.contains("5/5 runs finished: 5 success"), "{stderr}");
    let lines: Vec<String> = text(&output.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0], "daily--scheduled--20261101T000000.000Z success");
    let again =
        json(cli, &["dags", "backfill", "daily", "--from", "2026-11-04T00:00:00Z", "--to", "2026-11-06T00:00:00Z"]);
    assert_eq!((&again["created"], &again["existing"]), (&Value::from(1), &Value::from(2)), "{again}");
    let runs = json(cli, &["runs", "list", "--dag", "daily", "--limit", "50"]);
    assert_eq!(runs.as_array().unwrap().len(), 6);
    assert!(runs.as_array().unwrap().iter().all(|r| r["kind"] == "backfill"), "{runs}");
    let first = json(cli, &["runs", "show", "daily--scheduled--20261101T000000.000Z"]);
    assert_eq!(first["logical_date"], "2026-11-01T00:00:00Z");
    // Bad ranges are 400s (exit 2) with the reason.
    let reversed =
        cli(&["dags", "backfill", "daily", "--from", "2026-11-05T00:00:00Z", "--to", "2026-11-01T00:00:00Z"]);
    assert_eq!(reversed.status.code(), Some(2));
    assert!(text(&reversed.stderr).contains("backfill range is reversed"), "{}", text(&reversed.stderr));
    let manual =
        cli(&["dags", "backfill", "diamond", "--from", "2026-11-01T00:00:00Z", "--to", "2026-11-02T00:00:00Z"]);
    assert_eq!(manual.status.code(), Some(2));
    assert!(text(&manual.stderr).contains("has no schedule"), "{}", text(&manual.stderr));
    let (status, body) = crate::support::http_post_json(api, "/api/v1/dags/daily/backfill", r#"{"from": "yesterday"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad backfill body"), "{body}");

    // Clear from a task with its downstream, in a diamond that succeeded.
    let run = json(cli, &["trigger", "diamond", "--wait"]);
    let run_id = run["run_id"].as_str().unwrap().to_string();
    let cleared = cli(&["runs", "clear", &run_id, "--task", "b", "--downstream"]);
    assert!(cleared.status.success(), "{}", text(&cleared.stderr));
    assert_eq!(text(&cleared.stdout), format!("{run_id} cleared: b, d\n"));
    let mut shown = Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while shown["state"] != "success" || shown["tasks"].as_array().unwrap().iter().any(|t| t["state"] != "success") {
        assert!(std::time::Instant::now() < deadline, "the cleared run did not finish: {shown}");
        std::thread::sleep(Duration::from_millis(100));
        shown = json(cli, &["runs", "show", &run_id]);
    }
    let tries: Vec<&Value> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| &shown["tasks"].as_array().unwrap().iter().find(|t| t["task_id"] == *id).unwrap()["try_number"])
        .collect();
    assert_eq!(tries, [1, 2, 1, 2]);
    let unknown = cli(&["runs", "clear", &run_id, "--task", "zz"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("has no task \"zz\""), "{}", text(&unknown.stderr));
}

#[test]
fn backfill_and_clear_in_standalone() {
    let dir = std::env::temp_dir().join(format!("dagmq-operations-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("daily.toml"), DAILY).unwrap();
    std::fs::write(dir.join("diamond.toml"), DIAMOND).unwrap();
    let standalone = Standalone::start(&dir, &[]);
    scenario(&|args: &[&str]| standalone.cli(args), &standalone.api);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn backfill_and_clear_across_two_workers() {
    let Some(mut cluster) = Cluster::new(&[("daily.toml", DAILY), ("diamond.toml", DIAMOND)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    cluster.wait_for_workers(2);
    let api = cluster.api.clone();
    scenario(&|args: &[&str]| cluster.cli(args), &api);
}

/// 200 ready command tasks in pool `db` (2 slots), a DAG with `max_active_tasks = 3` and a task
/// with `max_active = 1`.
fn limited_dags() -> Vec<(String, String)> {
    let mut wide = String::from("id = \"pooled\"\n");
    for i in 0..200 {
        wide.push_str(&format!("[[task]]\nid = \"t{i}\"\ncommand = [\"sleep\", \"0.02\"]\npool = \"db\"\n"));
    }
    let mut capped = String::from("id = \"capped\"\nmax_active_tasks = 3\n");
    for i in 0..12 {
        capped.push_str(&format!("[[task]]\nid = \"c{i}\"\ncommand = [\"sleep\", \"0.05\"]\n"));
    }
    let single =
        "id = \"single\"\n[[task]]\nid = \"only\"\ncommand = [\"sleep\", \"0.2\"]\nmax_active = 1\n".to_string();
    vec![("pooled.toml".into(), wide), ("capped.toml".into(), capped), ("single.toml".into(), single)]
}

/// The most tries that overlapped, from the start and end times the workers recorded.
fn max_overlap(runs: &[Value], task_filter: impl Fn(&Value) -> bool) -> usize {
    let mut events = Vec::new();
    for run in runs {
        for task in run["tasks"].as_array().unwrap().iter().filter(|t| task_filter(t)) {
            let time = |key: &str| {
                chrono::DateTime::parse_from_rfc3339(task[key].as_str().unwrap_or_else(|| panic!("{key}: {task}")))
                    .unwrap()
            };
            events.push((time("started_at"), 1i32));
            events.push((time("ended_at"), -1i32));
        }
    }
    // An end at the same instant as a start comes first: the slot was free again.
    events.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, step) in events {
        now += step;
        max = max.max(now);
    }
    max as usize
}

fn limits_scenario(cli: Cli) {
    let wait_run = |run_id: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let run = json(cli, &["runs", "show", run_id]);
            if run["state"] == "success" {
                return run;
            }
            assert!(std::time::Instant::now() < deadline, "run {run_id} did not finish: {}", run["task_counts"]);
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let pooled = json(cli, &["trigger", "pooled"])["run_id"].as_str().unwrap().to_string();
    let capped: Vec<String> =
        (0..2).map(|_| json(cli, &["trigger", "capped"])["run_id"].as_str().unwrap().to_string()).collect();
    let single: Vec<String> =
        (0..3).map(|_| json(cli, &["trigger", "single"])["run_id"].as_str().unwrap().to_string()).collect();
    // Ready tasks beyond the slots wait, and say why.
    let shown = json(cli, &["runs", "show", &pooled]);
    let waiting: Vec<&Value> =
        shown["tasks"].as_array().unwrap().iter().filter(|t| t["waiting_for"] == "pool db").collect();
    assert!(!waiting.is_empty(), "{}", shown["task_counts"]);
    assert!(waiting.iter().all(|t| t["state"] == "pending"));
    let pooled = wait_run(&pooled);
    let pooled_tasks = pooled["tasks"].as_array().unwrap();
    assert!(!pooled_tasks.is_empty() && pooled_tasks.iter().all(|t| t["waiting_for"].is_null()), "{pooled}");
    assert_eq!(max_overlap(std::slice::from_ref(&pooled), |_| true), 2, "never more than the pool's 2 slots");
    let capped: Vec<Value> = capped.iter().map(|r| wait_run(r)).collect();
    assert!(max_overlap(&capped, |_| true) <= 3, "max_active_tasks across the dag's runs");
    let single: Vec<Value> = single.iter().map(|r| wait_run(r)).collect();
    assert_eq!(max_overlap(&single, |_| true), 1, "max_active across runs");
}

/// Writes the DAG files and a config file with `[pools]` into a directory of their own.
fn limited_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dagmq-limits-{}", free_port()));
    std::fs::create_dir_all(dir.join("dags")).unwrap();
    for (name, body) in limited_dags() {
        std::fs::write(dir.join("dags").join(name), body).unwrap();
    }
    std::fs::write(dir.join("dagmq.toml"), "[pools]\ndb = 2\n").unwrap();
    dir
}

#[test]
fn pools_and_limits_in_standalone_and_an_unknown_pool_is_refused() {
    let dir = limited_dir();
    // Without the pool, the file that names it is refused with its line.
    let refused = crate::support::dagmq().args(["validate", "--dags"]).arg(dir.join("dags")).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("pooled.toml:3: dag \"pooled\": task \"t0\": unknown pool \"db\""),
        "{}",
        text(&refused.stderr)
    );
    let ok = crate::support::dagmq()
        .args(["--config"])
        .arg(dir.join("dagmq.toml"))
        .args(["validate", "--dags"])
        .arg(dir.join("dags"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let standalone = Standalone::start_with_args(&dir.join("dags"), &["--pool", "db=2"]);
    limits_scenario(&|args: &[&str]| standalone.cli(args));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pools_and_limits_across_two_workers_by_the_workers_own_records() {
    let files = limited_dags();
    let named: Vec<(&str, &str)> = files.iter().map(|(n, b)| (n.as_str(), b.as_str())).collect();
    let Some(mut cluster) = Cluster::new(&named) else { return };
    cluster.scheduler_flags(&["--pool", "db=2"]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    cluster.wait_for_workers(2);
    limits_scenario(&|args: &[&str]| cluster.cli(args));
}
