//! Backfill and clear end to end in both modes, through the CLI and the HTTP API.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::support::{Standalone, free_port, text};

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

/// Runs a `dagmq` client command against the mode under test.
type Cli<'a> = &'a dyn Fn(&[&str]) -> Output;

fn json(cli: Cli, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let output = cli(&all);
    assert!(output.status.success(), "{args:?}: {}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

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
