//! A RabbitMQ cluster of three nodes started by the test (own node names, AMQP and distribution
//! ports, data, log and config directories under a temp dir; joined with `rabbitmqctl
//! join_cluster`; never the broker on 5672), a scheduler and two workers given the three URLs,
//! and SIGKILLs of the node that leads `dagmq.tasks.default` in the middle of a fan-out and of a
//! chain, then of the node a worker is connected to. Also the refusals of a bad URL list.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dagmq_core::queue::{Queue, Topic};
use dagmq_rabbitmq::{RabbitConfig, RabbitQueue};

use crate::cluster::{Cluster, required};
use crate::support::{dagmq, free_port, server_port, text};

/// Where the Debian package keeps the scripts that run as the calling user (the ones in
/// /usr/sbin switch to the rabbitmq user, in a session of their own).
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// A RabbitMQ program: the calling user's script when there is one, else from the PATH.
fn program(name: &str) -> String {
    let own = format!("{RABBITMQ_BIN}/{name}");
    if Path::new(&own).exists() { own } else { name.to_string() }
}

/// Whether a program is on the PATH.
fn have(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success())
}

/// One node of the test's cluster.
struct Node {
    /// `dagmq-cN-PORT@localhost`.
    name: String,
    /// The AMQP port.
    port: u16,
    /// The Erlang distribution port.
    dist_port: u16,
    /// Its config, data and logs.
    dir: PathBuf,
    /// The running `rabbitmq-server` (in a process group of its own), if running.
    child: Option<Child>,
}

/// Three RabbitMQ nodes joined into one cluster; every node is killed when this is dropped
/// (a panic included) and the directory removed.
struct RabbitCluster {
    /// HOME of the nodes and of `rabbitmqctl`: the shared Erlang cookie is there.
    home: PathBuf,
    nodes: Vec<Node>,
}

impl RabbitCluster {
    /// Starts `size` nodes in parallel and joins the others to the first; `None` (skip) when
    /// `rabbitmq-server` is missing outside CI.
    fn start(size: usize) -> Option<RabbitCluster> {
        if !have("rabbitmq-server") && !Path::new(&format!("{RABBITMQ_BIN}/rabbitmq-server")).exists() {
            assert!(!required(), "the RabbitMQ cluster test needs rabbitmq-server (DAGMQ_REQUIRE_SERVICES=1)");
            eprintln!("skipping: rabbitmq-server not installed");
            return None;
        }
        let home = std::env::temp_dir().join(format!("dagmq-rabbit-cluster-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&home).unwrap();
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("DAGMQTESTCOOKIE{}", free_port())).unwrap();
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
        let nodes = (0..size)
            .map(|i| {
                let port = server_port();
                Node {
                    name: format!("dagmq-c{i}-{port}@localhost"),
                    port,
                    dist_port: server_port(),
                    dir: home.join(format!("node{i}")),
                    child: None,
                }
            })
            .collect();
        let mut cluster = RabbitCluster { home, nodes };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_listening(i, Duration::from_secs(120));
        }
        // The others join the first, in parallel.
        let cluster_ref = &cluster;
        std::thread::scope(|scope| {
            for i in 1..size {
                scope.spawn(move || {
                    let first = cluster_ref.nodes[0].name.clone();
                    for args in [vec!["stop_app"], vec!["join_cluster", &first], vec!["start_app"]] {
                        let output = cluster_ref.ctl(i, &args);
                        assert!(output.status.success(), "{args:?} on node {i}: {}", text(&output.stderr));
                    }
                });
            }
        });
        cluster.wait_running(size, Duration::from_secs(60));
        Some(cluster)
    }

    /// Starts node `i` (its data kept from an earlier run: a restarted node rejoins).
    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let dir = &node.dir;
        std::fs::create_dir_all(dir.join("mnesia")).unwrap();
        std::fs::write(dir.join("rabbit.conf"), format!("listeners.tcp.default = 127.0.0.1:{}\n", node.port)).unwrap();
        let d = |name: &str| dir.join(name).display().to_string();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("out.log")).unwrap();
        let mut command = Command::new(program("rabbitmq-server"));
        command
            .env("HOME", &self.home)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_PORT", node.port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", d("rabbit"))
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("plugins"))
            .env("RABBITMQ_PID_FILE", d("pid"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", d("mnesia/feature_flags"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        self.nodes[i].child = Some(child);
    }

    /// Waits until node `i` accepts AMQP connections.
    fn wait_listening(&mut self, i: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        let port = self.nodes[i].port;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Ok(Some(status))) = self.nodes[i].child.as_mut().map(Child::try_wait) {
                panic!("node {i} exited ({status}) before listening: {}", self.node_log(i));
            }
            assert!(Instant::now() < deadline, "node {i} not listening within {limit:?}: {}", self.node_log(i));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The tail of node `i`'s log.
    fn node_log(&self, i: usize) -> String {
        let log = std::fs::read_to_string(self.nodes[i].dir.join("out.log")).unwrap_or_default();
        log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// `rabbitmqctl -n NODE args` with the cluster's cookie.
    fn ctl(&self, i: usize, args: &[&str]) -> Output {
        Command::new(program("rabbitmqctl"))
            .env("HOME", &self.home)
            .args(["-n", &self.nodes[i].name, "--quiet"])
            .args(args)
            .output()
            .expect("rabbitmqctl runs")
    }

    /// A running node to ask, other than `except`.
    fn live_node(&self, except: Option<usize>) -> usize {
        (0..self.nodes.len()).find(|&i| Some(i) != except && self.nodes[i].child.is_some()).expect("a live node")
    }

    /// Waits until the cluster has `count` running nodes.
    fn wait_running(&self, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let output = self.ctl(self.live_node(None), &["cluster_status", "--formatter", "json"]);
            let running = serde_json::from_slice::<serde_json::Value>(&output.stdout)
                .ok()
                .and_then(|status| status["running_nodes"].as_array().map(Vec::len));
            if running == Some(count) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{count} running nodes not reached within {limit:?}: {} {}",
                text(&output.stdout),
                text(&output.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The URL of node `i`.
    fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    /// Every node's URL, comma-separated.
    fn urls(&self) -> String {
        (0..self.nodes.len()).map(|i| self.url(i)).collect::<Vec<_>>().join(",")
    }

    /// The node whose AMQP port is `port`.
    fn by_port(&self, port: u16) -> usize {
        self.nodes.iter().position(|n| n.port == port).unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// The quorum queue `queue`: its leader's index and its members' count, asked of a live node.
    fn queue_leader(&self, queue: &str) -> (usize, usize) {
        let output =
            self.ctl(self.live_node(None), &["list_queues", "name", "leader", "members", "--formatter", "json"]);
        let queues: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("list_queues: {e}: {} {}", text(&output.stdout), text(&output.stderr)));
        let entry = queues
            .as_array()
            .and_then(|all| all.iter().find(|q| q["name"] == queue))
            .unwrap_or_else(|| panic!("no queue {queue} in {queues}"));
        let leader = entry["leader"].as_str().unwrap_or_default();
        let index = self.nodes.iter().position(|n| n.name == leader).unwrap_or_else(|| panic!("leader {entry}"));
        (index, entry["members"].as_array().map_or(0, Vec::len))
    }

    /// SIGKILLs node `i` (its whole process group).
    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            kill_group(&mut child);
        }
    }

    /// Starts node `i` again and waits until the cluster has every node running.
    fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_listening(i, Duration::from_secs(120));
        self.wait_running(self.nodes.len(), Duration::from_secs(60));
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                kill_group(&mut child);
            }
        }
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// Kills a process group started with `process_group(0)`.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", child.id())]).status();
    let _ = child.wait();
}

/// The parallel tasks of the fan-out.
const FAN: usize = 48;

/// A wide DAG: [`FAN`] parallel tasks of a second each between a start and an end.
fn fan_dag() -> String {
    let mut dag = String::from("id = \"fan\"\n[[task]]\nid = \"start\"\ncommand = [\"true\"]\n");
    for i in 0..FAN {
        dag.push_str(&format!("[[task]]\nid = \"t{i:02}\"\ncommand = [\"sleep\", \"1\"]\nafter = [\"start\"]\n"));
    }
    let all: Vec<String> = (0..FAN).map(|i| format!("\"t{i:02}\"")).collect();
    dag.push_str(&format!("[[task]]\nid = \"end\"\ncommand = [\"true\"]\nafter = [{}]\n", all.join(", ")));
    dag
}

/// A chain of 12 hops.
fn chain_dag() -> String {
    let mut dag = String::from("id = \"chain\"\n");
    for i in 0..12 {
        dag.push_str(&format!("[[task]]\nid = \"h{i:02}\"\ncommand = [\"sleep\", \"0.3\"]\n"));
        if i > 0 {
            dag.push_str(&format!("after = [\"h{:02}\"]\n", i - 1));
        }
    }
    dag
}

/// Triggered through the trigger queue only.
const QUEUED: &str = r#"
id = "queued"
[[task]]
id = "a"
command = ["true"]
[[task]]
id = "b"
command = ["true"]
after = ["a"]
"#;

/// A line of a dagmq log without its colour codes.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... a letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The "connected to rabbitmq" lines of a log: when, and the AMQP port of the node.
fn connections(log: &str) -> Vec<(DateTime<Utc>, u16)> {
    log.lines()
        .map(plain)
        .filter(|line| line.contains("connected to rabbitmq"))
        .filter_map(|line| {
            let at = DateTime::parse_from_rfc3339(line.split_whitespace().next()?).ok()?.with_timezone(&Utc);
            let url = line.split("broker=").nth(1)?.split_whitespace().next()?;
            let port = url.split("@127.0.0.1:").nth(1)?.split('/').next()?.parse().ok()?;
            Some((at, port))
        })
        .collect()
}

/// The node (AMQP port) process `name` is connected to now: its last connection.
fn connected_port(cluster: &Cluster, name: &str) -> u16 {
    connections(&cluster.log(name)).last().unwrap_or_else(|| panic!("{name} never connected")).1
}

/// For each process that was connected to the node on `port` when it was killed at `killed`:
/// how long until it was connected to another node (from its log's timestamps).
fn reconnects(cluster: &Cluster, names: &[&str], port: u16, killed: DateTime<Utc>) -> Vec<(String, Duration)> {
    let mut found = Vec::new();
    for name in names {
        let lines = connections(&cluster.log(name));
        let before = lines.iter().rev().find(|(at, _)| *at <= killed);
        if before.is_none_or(|(_, p)| *p != port) {
            continue;
        }
        let (at, to) = lines
            .iter()
            .find(|(at, _)| *at > killed)
            .unwrap_or_else(|| panic!("{name} did not connect again after the kill: {}", cluster.logs_text()));
        assert_ne!(*to, port, "{name} connected to the killed node again");
        found.push((name.to_string(), (*at - killed).to_std().unwrap_or_default()));
    }
    found
}

/// Triggers `dag` through the API; on failure, the processes' logs (the scheduler's whole).
fn trigger(cluster: &Cluster, dag: &str) -> String {
    let output = cluster.cli(&["trigger", dag, "--json"]);
    assert!(
        output.status.success(),
        "trigger {dag}: {}\nscheduler:\n{}\n{}",
        text(&output.stderr),
        cluster.log("scheduler"),
        cluster.logs_text()
    );
    serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()["run_id"].as_str().unwrap().to_string()
}

/// How many tasks of a run have succeeded.
fn successes(cluster: &Cluster, run_id: &str) -> usize {
    let run = cluster.json(&["runs", "show", run_id]);
    run["tasks"].as_array().map_or(0, |tasks| tasks.iter().filter(|t| t["state"] == "success").count())
}

/// Publishes one trigger of the `queued` DAG with `key` to the trigger queue, again and again
/// until a confirm comes (a publish whose confirm was lost with its node is published again;
/// the key keeps a second copy from making a second run).
async fn publish_trigger(queue: &RabbitQueue, key: &str) {
    let payload = serde_json::json!({"v": 1, "dag_id": "queued", "key": key}).to_string().into_bytes();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(err) = queue.publish(&Topic::Triggers, payload.clone()).await {
        assert!(Instant::now() < deadline, "trigger {key} not published within 60 s: {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts a finished run succeeded with every task's one and only try a success.
fn assert_each_task_succeeded_once(run: &serde_json::Value) {
    assert_eq!(run["state"], "success", "{run}");
    for task in run["tasks"].as_array().unwrap() {
        assert_eq!(
            (task["state"].as_str(), task["try_number"].as_u64()),
            (Some("success"), Some(1)),
            "{}: {task}",
            run["run_id"]
        );
    }
}

#[test]
fn node_loss_in_a_three_node_rabbitmq_cluster_loses_no_run_trigger_or_task() {
    let started = Instant::now();
    let Some(mut rabbit) = RabbitCluster::start(3) else { return };
    let cluster_up = started.elapsed();
    let (fan, chain) = (fan_dag(), chain_dag());
    let Some(mut cluster) =
        Cluster::on_broker(&[("fan.toml", &fan), ("chain.toml", &chain), ("queued.toml", QUEUED)], &rabbit.urls())
    else {
        return;
    };
    cluster.start_scheduler();
    // Every task through the broker (no eager dispatch), four at a time per worker.
    for name in ["w1", "w2"] {
        cluster.start_worker_with(name, &["--no-eager", "--concurrency", "4"]);
    }
    cluster.wait_for_workers(2);
    let tasks_queue = format!("{}.dagmq.tasks.default", cluster.namespace);
    let (_, members) = rabbit.queue_leader(&tasks_queue);
    assert_eq!(members, 3, "the quorum queue has a member on every node");
    let processes = ["scheduler", "w1", "w2"];
    let spread: Vec<u16> = processes.iter().map(|name| connected_port(&cluster, name)).collect();
    eprintln!("processes on nodes (AMQP ports) {spread:?}; cluster up in {cluster_up:?}");

    // The test's own trigger publisher, on the same list.
    let mut config = RabbitConfig::new(rabbit.urls());
    config.namespace = cluster.namespace.clone();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let publisher = runtime.block_on(RabbitQueue::connect(config)).unwrap();

    let mut runs = Vec::new();
    let mut keys = 0;
    let mut bounds = Vec::new();
    for phase in ["leader", "worker's node"] {
        // A fan-out and a chain, each some way in (the chain's hops queue behind the fan's tasks).
        let chain_run = trigger(&cluster, "chain");
        cluster.wait_until(Duration::from_secs(60), || successes(&cluster, &chain_run) >= 1);
        let fan_run = trigger(&cluster, "fan");
        cluster.wait_until(Duration::from_secs(60), || successes(&cluster, &fan_run) >= 4);
        let done = (successes(&cluster, &fan_run), successes(&cluster, &chain_run));
        assert!(done.0 < FAN + 2 && done.1 < 12, "both runs still going: {done:?}");
        let victim = match phase {
            "leader" => rabbit.queue_leader(&tasks_queue).0,
            _ => rabbit.by_port(connected_port(&cluster, "w1")),
        };
        let killed = Utc::now();
        rabbit.kill(victim);
        eprintln!("{phase}: killed node {victim} ({}) at {killed}, tasks done {done:?}", rabbit.nodes[victim].name);
        // Triggers while the node is gone: through the API and through the trigger queue.
        for dag in ["fan", "chain"] {
            runs.push(trigger(&cluster, dag));
        }
        runtime.block_on(async {
            for _ in 0..5 {
                keys += 1;
                publish_trigger(&publisher, &format!("key-{keys}")).await;
            }
        });
        runs.extend([fan_run, chain_run]);
        for run_id in &runs {
            assert_each_task_succeeded_once(&cluster.wait_run(run_id, Duration::from_secs(180)));
        }
        cluster.wait_until(Duration::from_secs(120), || {
            let queued = cluster.json(&["runs", "list", "--dag", "queued", "--limit", "500"]);
            let all = queued.as_array().unwrap();
            all.len() >= keys && all.iter().all(|r| r["state"] == "success")
        });
        let queued = cluster.json(&["runs", "list", "--dag", "queued", "--limit", "500"]);
        assert_eq!(queued.as_array().unwrap().len(), keys, "one run per trigger key: {queued}");
        for run in queued.as_array().unwrap() {
            let run_id = run["run_id"].as_str().unwrap();
            assert_each_task_succeeded_once(&cluster.json(&["runs", "show", run_id]));
        }
        let moved = reconnects(&cluster, &processes, rabbit.nodes[victim].port, killed);
        eprintln!("{phase}: reconnected {moved:?}");
        if phase == "worker's node" {
            assert!(moved.iter().any(|(name, _)| name == "w1"), "w1 was on the killed node: {moved:?}");
        }
        bounds.extend(moved.into_iter().map(|(_, took)| took));
        let (leader, _) = rabbit.queue_leader(&tasks_queue);
        assert_ne!(leader, victim, "a new leader");
        if phase == "leader" {
            // A majority of the queue's members for the next kill.
            let restart = Instant::now();
            rabbit.restart(victim);
            eprintln!("node {victim} back in {:?}", restart.elapsed());
        }
    }
    let worst = bounds.iter().max().copied().unwrap_or_default();
    eprintln!("reconnects {bounds:?}, worst {worst:?}; whole test {:?}", started.elapsed());
    assert!(!bounds.is_empty(), "some process was on a killed node");
    assert!(worst < Duration::from_secs(5), "reconnected within 5 s: {bounds:?}");
    let whole: String = processes.iter().map(|name| cluster.log(name)).collect();
    let renewed = whole.matches("publishing on a new channel").count();
    eprintln!("publishing channels renewed after a refusal: {renewed}");
    assert!(!whole.contains("guest:guest"), "no password in the logs");
}

/// Runs `dagmq scheduler` with `amqp` (on the command line, or in DAGMQ_AMQP_URL, or in a file)
/// and a Redis no one answers on: its exit code and stderr.
fn scheduler_with(amqp: &str, how: &str) -> (Option<i32>, String) {
    let mut command = dagmq();
    command.args(["scheduler", "--redis", "redis://127.0.0.1:1", "--port", &free_port().to_string()]);
    let file = std::env::temp_dir().join(format!("dagmq-amqp-list-{}-{}", std::process::id(), free_port()));
    match how {
        "flag" => drop(command.args(["--amqp", amqp])),
        "env" => drop(command.env("DAGMQ_AMQP_URL", amqp)),
        _ => {
            std::fs::write(&file, format!("{amqp}\n")).unwrap();
            command.arg("--amqp-file").arg(&file);
        }
    }
    let output = command.env("DAGMQ_LOG", "warn").stdin(Stdio::null()).output().unwrap();
    let _ = std::fs::remove_file(&file);
    (output.status.code(), text(&output.stderr))
}

#[test]
fn a_bad_amqp_url_list_is_a_usage_error_and_a_good_one_tries_every_node() {
    let (a, b) = (free_port(), free_port());
    for how in ["flag", "env", "file"] {
        let (code, stderr) =
            scheduler_with(&format!("amqp://u:s3cretpw@127.0.0.1:{a}/%2f,,amqp://u:s3cretpw@127.0.0.1:{b}/%2f"), how);
        assert_eq!(code, Some(2), "{how}: {stderr}");
        assert!(stderr.contains("empty element (number 2 of 3)"), "{how}: {stderr}");
        assert!(!stderr.contains("s3cretpw"), "{how}: {stderr}");
        let (code, stderr) =
            scheduler_with(&format!("amqp://u:s3cretpw@127.0.0.1:{a}/%2f,redis://u:s3cretpw@127.0.0.1:{b}"), how);
        assert_eq!(code, Some(2), "{how}: {stderr}");
        assert!(stderr.contains("is not an amqp:// or amqps:// URL"), "{how}: {stderr}");
        assert!(!stderr.contains("s3cretpw"), "{how}: {stderr}");
        // A good list of nodes none of which answers: each is tried, each named, masked.
        let (code, stderr) =
            scheduler_with(&format!("amqp://u:s3cretpw@127.0.0.1:{a}/%2f, amqp://u:s3cretpw@127.0.0.1:{b}/%2f"), how);
        assert_eq!(code, Some(1), "{how}: {stderr}");
        assert!(stderr.contains("no node of the 2 answered"), "{how}: {stderr}");
        assert!(stderr.contains(&format!("amqp://u:***@127.0.0.1:{b}/%2f")), "{how}: {stderr}");
        assert!(!stderr.contains("s3cretpw"), "{how}: {stderr}");
    }
}
