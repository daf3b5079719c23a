//! Redis behind Sentinel: a primary, a replica and three Sentinels of the test's own (own
//! ports and temp dirs, killed by a guard, also on panic), a scheduler and two workers that
//! find the primary through the Sentinels. The primary is SIGKILLed mid-run, or failed over
//! with `SENTINEL FAILOVER` while triggers keep coming. With `--redis-replicas 1` every trigger
//! the API acknowledged has its run; with 0 or 1, every run in the store finishes, with every
//! task `success`, within a bound measured here (RELIABILITY.md quotes it).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, required};
use crate::support::{free_port, server_port};

/// The name under which the Sentinels monitor the primary.
const MASTER: &str = "dagmq";

/// Longest time from the fault until every run has finished. Measured: 5-10 s with one
/// replica, up to 45 s with none (a lost outcome waits for the zombie check); see RELIABILITY.md.
const SETTLE: Duration = Duration::from_secs(120);

const WIDE: &str = r#"
id = "wide"
[[task]]
id = "root"
run = "noop"
[[task]]
id = "a"
after = ["root"]
run = "sleep"
args = { ms = 300 }
[[task]]
id = "b"
after = ["root"]
run = "sleep"
args = { ms = 300 }
[[task]]
id = "c"
after = ["root"]
run = "sleep"
args = { ms = 300 }
[[task]]
id = "d"
after = ["root"]
run = "sleep"
args = { ms = 300 }
[[task]]
id = "sink"
after = ["a", "b", "c", "d"]
run = "noop"
"#;

const CHAIN: &str = r#"
id = "chain"
[[task]]
id = "c1"
run = "sleep"
args = { ms = 500 }
[[task]]
id = "c2"
after = ["c1"]
run = "sleep"
args = { ms = 1500 }
[[task]]
id = "c3"
after = ["c2"]
run = "sleep"
args = { ms = 500 }
"#;

/// One redis-server (a data node or a Sentinel) of the test's own.
struct Node {
    child: Option<Child>,
    port: u16,
}

/// A primary, a replica and three Sentinels, all on loopback ports of their own, under one temp
/// directory; every process is killed and the directory removed when dropped.
struct SentinelSet {
    /// The two data nodes (the first starts as primary).
    data: Vec<Node>,
    sentinels: Vec<Node>,
    dir: PathBuf,
}

/// Whether `redis-server` is installed: `None` skips (outside CI only).
fn have_redis() -> Option<()> {
    if Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(());
    }
    assert!(!required(), "the Sentinel tests need redis-server (DAGMQ_REQUIRE_SERVICES=1 or CI)");
    eprintln!("skipping: redis-server not installed");
    None
}

fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl SentinelSet {
    fn start() -> Option<SentinelSet> {
        have_redis()?;
        let dir = std::env::temp_dir().join(format!("dagmq-sentinel-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut set = SentinelSet { data: Vec::new(), sentinels: Vec::new(), dir };
        let primary = server_port();
        set.data.push(set.data_node(primary, None));
        set.data.push(set.data_node(server_port(), Some(primary)));
        let replica = set.data[1].port;
        wait_for("the replica in sync", Duration::from_secs(20), || {
            cli(replica, &["INFO", "replication"]).contains("master_link_status:up")
        });
        for _ in 0..3 {
            let port = server_port();
            let config = set.dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\nsentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 10000\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    set.dir.display()
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&config)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel runs");
            set.sentinels.push(Node { child: Some(child), port });
        }
        // Every Sentinel knows the replica and the other Sentinels: a failover can happen.
        for port in set.sentinels.iter().map(|s| s.port).collect::<Vec<_>>() {
            wait_for("the sentinels see each other and the replica", Duration::from_secs(30), || {
                let answer = cli(port, &["SENTINEL", "master", MASTER]);
                let field = |name: &str| {
                    let lines: Vec<&str> = answer.lines().collect();
                    lines.iter().position(|l| *l == name).and_then(|i| lines.get(i + 1)).map(|v| v.to_string())
                };
                field("num-slaves").as_deref() == Some("1") && field("num-other-sentinels").as_deref() == Some("2")
            });
        }
        Some(set)
    }

    /// Starts a data node on `port`, a replica of `primary` if given.
    fn data_node(&self, port: u16, primary: Option<u16>) -> Node {
        let node_dir = self.dir.join(format!("node-{port}"));
        std::fs::create_dir_all(&node_dir).unwrap();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--daemonize", "no", "--save", ""])
            .args(["--appendonly", "no", "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&node_dir);
        if let Some(primary) = primary {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        let child = command.stdout(Stdio::null()).spawn().expect("redis-server runs");
        wait_for("a data node answers", Duration::from_secs(20), || cli(port, &["PING"]).contains("PONG"));
        Node { child: Some(child), port }
    }

    /// `HOST:PORT,...` of the Sentinels.
    fn sentinel_list(&self) -> String {
        self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect::<Vec<_>>().join(",")
    }

    /// The port of the primary as the first Sentinel that answers names it.
    fn primary(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            cli(s.port, &["SENTINEL", "get-master-addr-by-name", MASTER]).lines().nth(1)?.trim().parse().ok()
        })
    }

    /// Waits until every Sentinel names a primary other than `old` that says it is one.
    fn wait_new_primary(&self, old: u16) -> u16 {
        let mut new = 0;
        wait_for("a new primary", Duration::from_secs(60), || {
            let named: BTreeSet<Option<u16>> = self
                .sentinels
                .iter()
                .map(|s| {
                    cli(s.port, &["SENTINEL", "get-master-addr-by-name", MASTER]).lines().nth(1)?.trim().parse().ok()
                })
                .collect();
            match named.into_iter().collect::<Vec<_>>()[..] {
                [Some(port)] if port != old && cli(port, &["ROLE"]).starts_with("master") => {
                    new = port;
                    true
                }
                _ => false,
            }
        });
        new
    }

    /// SIGKILLs the data node on `port`.
    fn kill(&mut self, port: u16) {
        let node = self.data.iter_mut().find(|n| n.port == port).unwrap();
        let mut child = node.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts the killed node on `port` again as a replica of `primary` (as its supervisor would,
    /// with Sentinel's rewritten config), and waits until it is in sync.
    fn restart_as_replica(&mut self, port: u16, primary: u16) {
        let node = self.data_node(port, Some(primary));
        *self.data.iter_mut().find(|n| n.port == port).unwrap() = node;
        wait_for("the old primary in sync as a replica", Duration::from_secs(30), || {
            cli(port, &["INFO", "replication"]).contains("master_link_status:up")
        });
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for node in self.data.iter_mut().chain(self.sentinels.iter_mut()) {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What happens to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL, then the node is started again as a replica of the new primary.
    Kill,
    /// `SENTINEL FAILOVER`: the replica is promoted, the primary demoted.
    Failover,
}

/// Runs one scenario and answers the time from the fault to the last run finished.
fn scenario(replicas: usize, fault: Fault) -> Option<Duration> {
    let mut set = SentinelSet::start()?;
    let mut cluster = Cluster::new(&[("wide.toml", WIDE), ("chain.toml", CHAIN)])?;
    let primary = set.primary().unwrap();
    // The URL lends its credentials and scheme only; the Sentinels name the node.
    cluster.redis = format!("redis://127.0.0.1:{primary}");
    let sentinels = set.sentinel_list();
    let replicas_text = replicas.to_string();
    cluster.common_flags(&[
        "--redis-sentinel",
        &sentinels,
        "--redis-master",
        MASTER,
        "--redis-replicas",
        &replicas_text,
    ]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    // Runs the API acknowledged (a trigger that failed is not counted).
    let mut acked = vec![cluster.trigger("chain")];
    for _ in 0..4 {
        acked.push(cluster.trigger("wide"));
    }
    cluster.wait_task_state(&acked[0], "c2", "running");
    let fault_at = Instant::now();
    match fault {
        Fault::Kill => set.kill(primary),
        Fault::Failover => {
            let answer = cli(set.sentinels[0].port, &["SENTINEL", "FAILOVER", MASTER]);
            assert!(answer.contains("OK"), "SENTINEL FAILOVER: {answer}");
        }
    }
    // Triggers keep coming while the primary changes.
    let new_primary = std::thread::scope(|scope| {
        let waiter = scope.spawn(|| set.wait_new_primary(primary));
        while !waiter.is_finished() {
            if let Some(run_id) = try_trigger(&cluster, "wide") {
                acked.push(run_id);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        waiter.join().unwrap()
    });
    let promoted = fault_at.elapsed();
    // With one replica to wait for, nothing is acknowledged until the old primary is back as a
    // replica of the new one (SIGKILL: started again; failover: demoted by the Sentinels).
    match fault {
        Fault::Kill => set.restart_as_replica(primary, new_primary),
        Fault::Failover => wait_for("the old primary in sync as a replica", Duration::from_secs(60), || {
            cli(primary, &["INFO", "replication"]).contains("master_link_status:up")
        }),
    }
    // After the failover, triggers are acknowledged again (the scheduler may first have stepped
    // down at a write it could not confirm, and takes the lease again within its 10 s).
    for _ in 0..3 {
        let mut run_id = None;
        cluster.wait_until(Duration::from_secs(60), || {
            run_id = try_trigger(&cluster, "wide");
            run_id.is_some()
        });
        acked.extend(run_id);
    }
    // Every run in the store finishes; with replicas, every acknowledged one is there.
    let mut lost = Vec::new();
    cluster.wait_until(SETTLE, || {
        let runs = cluster.json(&["runs", "list", "--limit", "500"]);
        let runs = runs.as_array().unwrap();
        let stored: BTreeSet<&str> = runs.iter().filter_map(|r| r["run_id"].as_str()).collect();
        lost = acked.iter().filter(|id| !stored.contains(id.as_str())).cloned().collect();
        runs.iter().all(|r| matches!(r["state"].as_str(), Some("success" | "failed" | "cancelled")))
    });
    let settled = fault_at.elapsed();
    if replicas > 0 {
        assert!(lost.is_empty(), "acknowledged runs lost with --redis-replicas {replicas}: {lost:?}");
    }
    let runs = cluster.json(&["runs", "list", "--limit", "500"]);
    for run in runs.as_array().unwrap() {
        let run_id = run["run_id"].as_str().unwrap();
        let run: Value = cluster.json(&["runs", "show", run_id]);
        assert_eq!(run["state"], "success", "run {run_id}: {run}\n{}", cluster.logs_text());
        for task in run["tasks"].as_array().unwrap() {
            assert_eq!(task["state"], "success", "run {run_id} task {}", task["task_id"]);
        }
    }
    eprintln!(
        "sentinel {fault:?} replicas {replicas}: new primary after {:.1} s, every run finished {:.1} s after the \
         fault; {} runs acknowledged, {} lost",
        promoted.as_secs_f64(),
        settled.as_secs_f64(),
        acked.len(),
        lost.len()
    );
    Some(settled)
}

/// Triggers `dag_id` once; the run id if the API acknowledged it.
fn try_trigger(cluster: &Cluster, dag_id: &str) -> Option<String> {
    let output = cluster.cli(&["trigger", dag_id, "--json"]);
    if !output.status.success() {
        return None;
    }
    let answer: Value = serde_json::from_slice(&output.stdout).ok()?;
    answer["run_id"].as_str().map(str::to_string)
}

#[test]
fn primary_sigkilled_mid_run_with_one_replica_to_wait_for_loses_nothing_acknowledged() {
    scenario(1, Fault::Kill);
}

#[test]
fn primary_sigkilled_mid_run_without_replicas_to_wait_for_leaves_no_run_stuck() {
    scenario(0, Fault::Kill);
}

#[test]
fn sentinel_failover_under_load_with_one_replica_to_wait_for_loses_nothing_acknowledged() {
    scenario(1, Fault::Failover);
}

#[test]
fn sentinel_failover_under_load_without_replicas_to_wait_for_leaves_no_run_stuck() {
    scenario(0, Fault::Failover);
}

/// Bad Sentinel flags are usage errors (exit 2) that say what is wrong, before any connect,
/// and never echo a password.
#[test]
fn bad_sentinel_flags_exit_2_with_a_clear_message() {
    let amqp = "amqp://guest:guest@127.0.0.1:1/%2f";
    for (flags, expected) in [
        (vec!["--redis-sentinel", "127.0.0.1:26379"], "go together"),
        (vec!["--redis-master", "dagmq"], "go together"),
        (vec!["--redis-sentinel", "127.0.0.1", "--redis-master", "dagmq"], "has no port"),
        (vec!["--redis-sentinel", "a:1,,b:2", "--redis-master", "dagmq"], "is empty"),
        (vec!["--redis-sentinel", "http://:hunter2@a:1", "--redis-master", "dagmq"], "scheme"),
        (vec!["--redis-sentinel", "a:1", "--redis-master", " "], "--redis-master"),
        (vec!["--redis-replicas", "1"], "needs Redis"),
    ] {
        let output = crate::support::dagmq()
            .args(["worker", "--amqp", amqp])
            .args(&flags)
            .env_remove("DAGMQ_REDIS_URL")
            .output()
            .unwrap();
        let stderr = crate::support::text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{flags:?} shows the password: {stderr}");
    }
}
