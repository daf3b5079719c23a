//! `dagmq bench`: every workload runs to success and prints its machine-readable line, in
//! standalone mode and against the real services (with worker processes that end with it).

use std::collections::HashMap;

use crate::cluster::Cluster;
use crate::support::{dagmq, text};

/// The `bench=NAME` line of an output, as key/value pairs.
fn line(stdout: &str, bench: &str) -> HashMap<String, String> {
    let prefix = format!("bench={bench} ");
    let found = stdout.lines().find(|l| l.starts_with(&prefix));
    let found = found.unwrap_or_else(|| panic!("no bench={bench} line in:\n{stdout}"));
    found.split_whitespace().filter_map(|pair| pair.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
}

fn number(fields: &HashMap<String, String>, key: &str) -> f64 {
    fields.get(key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number {key} in {fields:?}"))
}

fn bench(args: &[&str]) -> String {
    let output = dagmq().arg("bench").args(args).output().unwrap();
    assert!(output.status.success(), "bench {args:?}: {}", text(&output.stderr));
    text(&output.stdout)
}

#[test]
fn standalone_bench_runs_every_workload_to_success() {
    let fanout = line(&bench(&["fanout", "300"]), "fanout");
    assert_eq!(
        (fanout["mode"].as_str(), fanout["state"].as_str(), fanout["tasks"].as_str()),
        ("standalone", "success", "302")
    );
    assert!(number(&fanout, "tasks_per_s") > 0.0 && number(&fanout, "peak_rss_mb") > 0.0, "{fanout:?}");
    assert!(number(&fanout, "peak_rss_mb") >= number(&fanout, "base_rss_mb"), "{fanout:?}");

    let chain = line(&bench(&["chain", "40"]), "chain");
    assert_eq!((chain["state"].as_str(), chain["hops"].as_str()), ("success", "39"));
    assert!(number(&chain, "p99_us") >= number(&chain, "p50_us"), "{chain:?}");

    let runs = line(&bench(&["runs", "30"]), "runs");
    assert_eq!(runs["tasks"], "300");
    assert!(number(&runs, "runs_per_s") > 0.0, "{runs:?}");

    let layers = line(&bench(&["layers", "6", "5"]), "layers");
    assert_eq!((layers["state"].as_str(), layers["tasks"].as_str()), ("success", "30"));
    assert!(number(&layers, "barrier_p50_us") > 0.0, "every layer waits for the one before: {layers:?}");
}

#[test]
fn distributed_bench_measures_the_broker_and_leaves_no_worker_behind() {
    let Some(cluster) = Cluster::new(&[]) else { return };
    let child = dagmq()
        .args(["bench", "fanout", "300", "--concurrency", "50", "--prefetch", "7"])
        .args(["--amqp", &cluster.amqp, "--redis", &cluster.redis])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", text(&output.stderr));
    assert!(number(&line(&stdout, "raw_throughput"), "msgs_per_s") > 0.0);
    let round_trip = line(&stdout, "raw_round_trip");
    assert_eq!(round_trip["hops"], "500");
    let fanout = line(&stdout, "fanout");
    assert_eq!((fanout["mode"].as_str(), fanout["state"].as_str()), ("distributed", "success"));
    // The workers' work waiting histograms reached the bench: nearly every task came from a
    // message (a few were claimed eagerly as the root succeeded).
    assert!(number(&fanout, "work_waiting_tries") >= 250.0, "{fanout:?}");
    assert!(number(&fanout, "work_waiting_p99_us") >= number(&fanout, "work_waiting_p50_us"), "{fanout:?}");
    assert!(number(&fanout, "redis_cpu_ms_per_1000_tasks") >= 0.0, "{fanout:?}");
    // Each worker process held the window given (`worker --prefetch`), and says so.
    assert_eq!(fanout.get("window").map(String::as_str), Some("7"), "{fanout:?}");

    // The worker processes were this binary with --worker-of under the bench's namespace; none
    // may outlive the bench.
    let pattern = format!("worker-of dagmq-bench-{pid}/");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let found = std::process::Command::new("pgrep").args(["-f", &pattern]).output().unwrap();
        if !found.status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "bench workers still running: {}", text(&found.stdout));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `bench history` measures every figure on an empty store and again after seeding finished
/// runs, and the API answers over the seeded history (its listings of running and of failed
/// runs included).
#[test]
fn distributed_bench_history_measures_with_and_without_a_seeded_history() {
    let Some(cluster) = Cluster::new(&[]) else { return };
    let stdout = bench(&["history", "300", "--amqp", &cluster.amqp, "--redis", &cluster.redis]);
    let seed = line(&stdout, "history_seed");
    assert_eq!((seed["runs"].as_str(), seed["tasks"].as_str()), ("300", "3000"));
    for name in ["runs", "fanout", "chain"] {
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with(&format!("bench={name} "))).collect();
        assert_eq!(lines.len(), 2, "{name} on an empty store and with the history:\n{stdout}");
        assert!(!lines[0].contains("history_runs="), "{stdout}");
        assert!(lines[1].contains("history_runs=300"), "{stdout}");
    }
    let calls: Vec<&str> = stdout.lines().filter(|l| l.starts_with("bench=api ")).collect();
    assert_eq!(calls.len(), 14, "seven calls, twice:\n{stdout}");
    for call in ["running_runs", "failed_runs"] {
        let name = format!("call={call} ");
        assert!(calls.iter().any(|l| l.contains("history_runs=300") && l.contains(&name)), "{stdout}");
    }
}
