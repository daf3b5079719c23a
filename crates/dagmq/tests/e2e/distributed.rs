//! Distributed mode: a scheduler process and worker processes over a real RabbitMQ and Redis.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dagmq_core::{Queue, Topic};
use serde_json::Value;

use crate::cluster::Cluster;
use crate::support::text;

fn wide_dag(width: usize) -> String {
    let mut dag = String::from("id = \"wide\"\n[[task]]\nid = \"root\"\nrun = \"noop\"\n");
    for i in 0..width {
        dag.push_str(&format!("[[task]]\nid = \"t{i}\"\nafter = [\"root\"]\nrun = \"sleep\"\nargs = {{ ms = 20 }}\n"));
    }
    let all: Vec<String> = (0..width).map(|i| format!("\"t{i}\"")).collect();
    dag.push_str(&format!("[[task]]\nid = \"sink\"\nafter = [{}]\nrun = \"noop\"\n", all.join(", ")));
    dag
}

const CHAIN: &str = r#"
id = "chain"
[[task]]
id = "c1"
run = "sleep"
args = { ms = 800 }
[[task]]
id = "c2"
after = ["c1"]
run = "sleep"
args = { ms = 1500 }
[[task]]
id = "c3"
after = ["c2"]
run = "sleep"
args = { ms = 800 }
[[task]]
id = "c4"
after = ["c3"]
command = ["echo", "done"]
"#;

const LONG: &str = r#"
id = "long"
[[task]]
id = "slow"
command = ["sh", "-c", "echo try $DAGMQ_TRY starting; sleep 6; echo try $DAGMQ_TRY done"]
[[task]]
id = "after"
after = ["slow"]
run = "noop"
"#;

/// Every task of the run succeeded, on its first try: nothing ran twice as a state transition.
fn assert_every_task_succeeded_once(run: &Value) {
    for (id, task) in tasks(run) {
        assert_eq!((task["state"].as_str(), task["try_number"].as_u64()), (Some("success"), Some(1)), "{id}");
    }
}

fn tasks(run: &Value) -> BTreeMap<String, Value> {
    run["tasks"].as_array().unwrap().iter().map(|t| (t["task_id"].as_str().unwrap().to_string(), t.clone())).collect()
}

#[test]
fn two_workers_share_a_200_task_dag_and_each_task_succeeds_once() {
    let Some(mut cluster) = Cluster::new(&[("wide.toml", &wide_dag(198))]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    cluster.wait_for_workers(2);
    let trigger = cluster.json(&["trigger", "wide"]);
    let run = cluster.wait_run(trigger["run_id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(run["state"], "success", "{}", cluster.logs_text());
    let tasks = tasks(&run);
    assert_eq!(tasks.len(), 200);
    let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks.values() {
        assert_eq!(task["state"], "success");
        assert_eq!(task["try_number"], 1, "{task}");
        *by_worker.entry(task["worker"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(
        by_worker.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["w1".to_string(), "w2".to_string()]),
        "{by_worker:?}"
    );
}

#[test]
fn raw_triggers_create_runs_once_per_key_and_bad_ones_are_dead_lettered() {
    let Some(mut cluster) = Cluster::new(&[("wide.toml", &wide_dag(2))]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let (amqp, namespace) = (cluster.amqp.clone(), cluster.namespace.clone());
    let dead = cluster.block_on(async move {
        // An outside producer: a plain persistent publish to `<namespace>.dagmq.triggers`.
        let mut config = dagmq_rabbitmq::RabbitConfig::new(amqp);
        config.namespace = namespace;
        let queue = dagmq_rabbitmq::RabbitQueue::connect(config).await.unwrap();
        let good = br#"{"v":1,"dag_id":"wide","params":{"date":"2026-11-22"},"key":"wide-2026-11-22"}"#.to_vec();
        queue.publish(&Topic::Triggers, good.clone()).await.unwrap();
        queue.publish(&Topic::Triggers, good).await.unwrap();
        queue.publish(&Topic::Triggers, b"{\"v\":1,\"dag_id\":".to_vec()).await.unwrap();
        queue.publish(&Topic::Triggers, br#"{"v":1,"dag_id":"nope"}"#.to_vec()).await.unwrap();
        let mut dead = queue.consume(&Topic::Dead, 10).await.unwrap();
        let mut reasons = Vec::new();
        for _ in 0..2 {
            let delivery = tokio::time::timeout(Duration::from_secs(30), dead.next()).await.unwrap().unwrap().unwrap();
            reasons.push(delivery.error.clone().unwrap_or_default());
            delivery.ack().await.unwrap();
        }
        reasons
    });
    assert_eq!(
        dead,
        vec![
            "trigger: malformed message: EOF while parsing a value at line 1 column 16".to_string(),
            "trigger: unknown dag \"nope\"".to_string(),
        ]
    );
    cluster.wait_until(Duration::from_secs(30), || {
        cluster.json(&["runs", "list", "--dag", "wide", "--status", "success"]).as_array().is_some_and(|r| r.len() == 1)
    });
    let runs = cluster.json(&["runs", "list", "--dag", "wide"]);
    assert_eq!(runs.as_array().unwrap().len(), 1, "the repeated key created no second run");
    let run = cluster.json(&["runs", "show", runs[0]["run_id"].as_str().unwrap()]);
    assert_eq!(run["params"]["date"], "2026-11-22");
    assert_eq!(run["kind"], "message", "{run}");
    assert!(run["run_id"].as_str().unwrap().starts_with("wide--message--"), "{run}");
    // The scheduler keeps serving.
    let again = cluster.cli(&["trigger", "wide", "--wait"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
}

#[test]
fn scheduler_killed_mid_run_resumes_and_nothing_runs_twice() {
    let Some(mut cluster) = Cluster::new(&[("chain.toml", CHAIN)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("chain");
    cluster.wait_task_state(&run_id, "c2", "running");
    cluster.kill_scheduler();
    cluster.start_scheduler();
    let run = cluster.wait_run(&run_id, Duration::from_secs(60));
    assert_eq!(run["state"], "success", "{}", cluster.logs_text());
    assert_every_task_succeeded_once(&run);
}

#[test]
fn worker_killed_mid_task_the_task_completes_on_the_other_worker_as_a_new_try() {
    // With retries too: a lost try does not spend the retry budget.
    let with_retries = LONG
        .replace("id = \"long\"", "id = \"long_retries\"")
        .replace("command = [\"sh\", \"-c\", \"echo try", "retries = 1\ncommand = [\"sh\", \"-c\", \"echo try");
    let Some(mut cluster) = Cluster::new(&[("long.toml", LONG), ("long_retries.toml", &with_retries)]) else { return };
    cluster.scheduler_flags(&["--worker-timeout", "12s"]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    cluster.wait_for_workers(2);
    let run_id = cluster.trigger("long");
    let mut victim = String::new();
    cluster.wait_until(Duration::from_secs(30), || {
        let slow = &tasks(&cluster.json(&["runs", "show", &run_id]))["slow"];
        victim = slow["worker"].as_str().unwrap_or_default().to_string();
        slow["state"] == "running"
    });
    cluster.kill_worker(&victim);
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    assert_eq!(run["state"], "success", "{}", cluster.logs_text());
    let slow = &tasks(&run)["slow"];
    assert_eq!(slow["try_number"], 2, "the lost try was replaced by a new one");
    assert_ne!(slow["worker"].as_str().unwrap(), victim);
    let log = cluster.cli(&["logs", &run_id, "slow", "--try", "2"]);
    assert_eq!(text(&log.stdout), "try 2 starting\ntry 2 done\n");
    let workers = cluster.json(&["workers"]);
    assert_eq!(workers.as_array().unwrap().len(), 1, "the lost worker left the registry");
    // The same with a retry budget: try 2 on the survivor, the budget of two tries intact.
    let run_id = cluster.trigger("long_retries");
    let survivor = workers[0]["name"].as_str().unwrap().to_string();
    cluster.wait_task_state(&run_id, "slow", "running");
    cluster.start_worker(&victim);
    cluster.wait_for_workers(2);
    cluster.kill_worker(&survivor);
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    assert_eq!(run["state"], "success", "{}", cluster.logs_text());
    let slow = &tasks(&run)["slow"];
    assert_eq!(slow["try_number"], 2);
    assert_eq!(slow["max_try"], 3, "one more try for the interruption, the retry kept");
    assert_eq!(slow["worker"].as_str().unwrap(), victim);
}

#[test]
fn broker_closing_every_connection_costs_a_pause_not_the_run() {
    let Some(mut cluster) = Cluster::new(&[("chain.toml", CHAIN)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("chain");
    cluster.wait_task_state(&run_id, "c2", "running");
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["close_all_connections", "--vhost", &cluster.namespace, "test: connection dropped"])
        .output()
        .unwrap();
    assert!(closed.status.success(), "{}", text(&closed.stderr));
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    assert_eq!(run["state"], "success", "{}", cluster.logs_text());
    for (id, task) in tasks(&run) {
        assert_eq!(task["state"], "success", "{id}");
    }
}

#[test]
fn a_long_running_task_leaves_nothing_for_the_broker_to_redeliver() {
    let Some(mut cluster) = Cluster::new(&[("long.toml", LONG)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("long");
    cluster.wait_task_state(&run_id, "slow", "running");
    // The claim acknowledged the message: the broker has nothing unacknowledged that a consumer
    // timeout could redeliver while the try runs.
    assert_eq!(cluster.queue_count("dagmq.tasks.default"), (0, 0), "ready and unacknowledged task messages");
    assert_eq!(tasks(&cluster.json(&["runs", "show", &run_id]))["slow"]["state"], "running");
    let run = cluster.wait_run(&run_id, Duration::from_secs(60));
    assert_eq!(run["state"], "success");
    assert_eq!(tasks(&run)["slow"]["try_number"], 1);
}

#[test]
fn standalone_runs_against_rabbitmq_and_redis_too() {
    let hello = std::fs::read_to_string(crate::support::examples().join("hello.toml")).unwrap();
    let Some(mut cluster) = Cluster::new(&[("hello.toml", &hello)]) else { return };
    cluster.start_standalone();
    let output = cluster.cli(&["trigger", "hello", "--wait", "--json"]);
    assert!(output.status.success(), "{}\n{}", text(&output.stderr), cluster.logs_text());
    let run: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(run["state"], "success");
    // The run is in Redis under the namespace, not in memory.
    let (redis, prefix, run_id) =
        (cluster.redis.clone(), cluster.namespace.clone(), run["run_id"].as_str().unwrap().to_string());
    let stored = cluster.block_on(async move {
        let store = dagmq_redis::RedisStore::connect(&redis, &prefix, None).await.unwrap();
        dagmq_core::Store::run(&store, &run_id).await.unwrap()
    });
    assert_eq!(stored.unwrap().state, dagmq_core::RunState::Success);
}

#[test]
fn bad_messages_on_every_queue_are_dead_lettered_with_reasons_and_counted() {
    use crate::support::{http_get, parse_metrics};

    let Some(mut cluster) = Cluster::new(&[("wide.toml", &wide_dag(2))]) else { return };
    let metrics_port = crate::support::free_port();
    cluster.start_scheduler();
    cluster.start_worker_with("w1", &["--metrics-port", &metrics_port.to_string()]);
    let (amqp, namespace) = (cluster.amqp.clone(), cluster.namespace.clone());
    let reasons = cluster.block_on(async move {
        let mut config = dagmq_rabbitmq::RabbitConfig::new(amqp);
        config.namespace = namespace;
        let queue = dagmq_rabbitmq::RabbitQueue::connect(config).await.unwrap();
        let bad: Vec<Vec<u8>> = vec![
            b"{not json".to_vec(),
            br#"{"v":2,"dag_id":"wide"}"#.to_vec(),
            br#"{"v":1}"#.to_vec(),
            vec![b' '; 20 * 1024 * 1024],
            vec![0xff, 0xfe, 0x00, 0x01, 0x80],
        ];
        for topic in [Topic::Triggers, Topic::Status, Topic::Tasks("default".into())] {
            for payload in &bad {
                queue.publish(&topic, payload.clone()).await.unwrap();
            }
        }
        let mut dead = queue.consume(&Topic::Dead, 20).await.unwrap();
        let mut reasons = Vec::new();
        for _ in 0..15 {
            let delivery = tokio::time::timeout(Duration::from_secs(60), dead.next()).await.unwrap().unwrap().unwrap();
            reasons.push(delivery.error.clone().unwrap_or_default());
            delivery.ack().await.unwrap();
        }
        reasons
    });
    for prefix in ["trigger: ", "status: ", "task: "] {
        let mine: Vec<&String> = reasons.iter().filter(|r| r.starts_with(prefix)).collect();
        assert_eq!(mine.len(), 5, "{prefix}: {reasons:#?}");
        assert!(mine.iter().any(|r| r.contains("exceeds the limit of 1048576 bytes")), "{reasons:#?}");
        assert!(mine.iter().any(|r| r.contains("unsupported message version 2")), "{reasons:#?}");
        assert!(mine.iter().any(|r| r.contains("missing field")), "{reasons:#?}");
        assert!(mine.iter().filter(|r| r.contains("malformed message")).count() >= 3, "{reasons:#?}");
    }
    // Counted, and everything else unharmed.
    let port: u16 = cluster.api.rsplit(':').next().unwrap().parse().unwrap();
    let scheduler = parse_metrics(&http_get(port, "/metrics").1);
    let sum = |values: &std::collections::BTreeMap<String, f64>, prefix: &str| -> f64 {
        values.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum()
    };
    assert_eq!(sum(&scheduler, "dagmq_dead_lettered_total{queue=\"dagmq.triggers\""), 5.0);
    assert_eq!(sum(&scheduler, "dagmq_dead_lettered_total{queue=\"dagmq.status\""), 5.0);
    assert_eq!(scheduler.get("dagmq_dead_lettered_total{queue=\"dagmq.triggers\",reason=\"too_large\"}"), Some(&1.0));
    let worker = parse_metrics(&http_get(metrics_port, "/metrics").1);
    assert_eq!(sum(&worker, "dagmq_worker_dead_lettered_total"), 5.0);
    let run = cluster.cli(&["trigger", "wide", "--wait"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
}

#[test]
fn a_duplicated_task_message_runs_the_task_once() {
    let Some(mut cluster) = Cluster::new(&[("long.toml", LONG)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    cluster.wait_for_workers(2);
    let run_id = cluster.trigger("long");
    cluster.wait_task_state(&run_id, "slow", "running");
    let message = format!(
        r#"{{"v":1,"run_id":"{run_id}","dag_id":"long","task_id":"slow","try_number":1,"max_try":1,"logical_date":"2026-11-23T00:00:00Z"}}"#
    );
    let (amqp, namespace) = (cluster.amqp.clone(), cluster.namespace.clone());
    cluster.block_on(async move {
        let mut config = dagmq_rabbitmq::RabbitConfig::new(amqp);
        config.namespace = namespace;
        let queue = dagmq_rabbitmq::RabbitQueue::connect(config).await.unwrap();
        queue.publish(&Topic::Tasks("default".into()), message.clone().into_bytes()).await.unwrap();
        queue.publish(&Topic::Tasks("default".into()), message.into_bytes()).await.unwrap();
    });
    let run = cluster.wait_run(&run_id, Duration::from_secs(60));
    assert_eq!(run["state"], "success");
    assert_eq!(tasks(&run)["slow"]["try_number"], 1);
    let log = cluster.cli(&["logs", &run_id, "slow"]);
    assert_eq!(text(&log.stdout), "try 1 starting\ntry 1 done\n", "ran once");
}

#[test]
fn password_protected_services_work_and_secrets_stay_out_of_logs_ps_and_answers() {
    let password = "pw-Zq8xK2";
    let token = "tok-Vb93hQ7";
    let Some(mut cluster) = Cluster::with_users(&[("chain.toml", CHAIN)], password) else { return };
    cluster.secrets_in_files(token);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let output = cluster.cli(&["trigger", "chain", "--wait", "--param", "api_key=k-Secret-991"]);
    assert!(output.status.success(), "{}\n{}", text(&output.stderr), cluster.logs_text());
    let logs = cluster.logs_text();
    let broker = crate::cluster::ServiceUrl::parse(&cluster.amqp, 5672).address;
    assert!(logs.contains(&format!(":***@{broker}")), "the broker URL is logged masked: {logs}");
    for secret in [password, token, "k-Secret-991"] {
        assert!(!logs.contains(secret), "{secret} reached the logs: {logs}");
    }
    // `ps` shows command lines: neither password nor token is on one.
    for pid in [cluster.scheduler_pid().unwrap(), cluster.worker_pid("w1").unwrap()] {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("--amqp-file"), "{cmdline}");
        assert!(!cmdline.contains(password) && !cmdline.contains(token), "{cmdline}");
    }
    // Nor does any API answer hold one.
    let runs = cluster.json(&["runs", "list"]);
    let run_id = runs[0]["run_id"].as_str().unwrap().to_string();
    let answers = [
        runs.to_string(),
        cluster.json(&["runs", "show", &run_id]).to_string(),
        cluster.json(&["workers"]).to_string(),
    ];
    for answer in &answers {
        for secret in [password, token, "k-Secret-991"] {
            assert!(!answer.contains(secret), "{secret} in an API answer: {answer}");
        }
    }
    // The token read from the file is required.
    let refused = crate::support::dagmq().args(["dags", "list", "--api", &cluster.api]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("401"), "{}", text(&refused.stderr));
    // A wrong password is a clear startup error, with the password masked.
    let wrong = crate::support::dagmq()
        .args(["worker", "--amqp", &cluster.amqp.replace(password, "nope"), "--redis", &cluster.redis])
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    let stderr = text(&wrong.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert!(!stderr.contains("nope@"), "{stderr}");
}

const RETRY: &str = r#"
id = "retry"
[[task]]
id = "flaky"
command = ["sh", "-c", "echo try $DAGMQ_TRY; test $DAGMQ_TRY -ge 2"]
retries = 2
retry_delay = "4s"
[[task]]
id = "after"
after = ["flaky"]
run = "noop"
"#;

const POISON: &str = r#"
id = "poison"
[[task]]
id = "kills_its_worker"
# The task's parent is its guard; the guard's parent is the worker.
command = ["sh", "-c", "echo goodbye; kill -9 $(cut -d' ' -f4 /proc/$PPID/stat); sleep 5"]
"#;

#[test]
fn worker_sigterm_mid_task_finishes_the_try_and_requeues_nothing() {
    let Some(mut cluster) = Cluster::new(&[("long.toml", LONG)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("long");
    cluster.wait_task_state(&run_id, "slow", "running");
    assert!(cluster.terminate_worker("w1"), "the worker exits cleanly");
    let slow = &tasks(&cluster.json(&["runs", "show", &run_id]))["slow"];
    assert_eq!((slow["state"].as_str(), slow["try_number"].as_u64()), (Some("success"), Some(1)), "{slow}");
    cluster.start_worker("w2");
    let run = cluster.wait_run(&run_id, Duration::from_secs(30));
    assert_eq!(run["state"], "success");
    assert_eq!(tasks(&run)["slow"]["try_number"], 1);
    assert_eq!(text(&cluster.cli(&["logs", &run_id, "slow"]).stdout), "try 1 starting\ntry 1 done\n");
}

#[test]
fn scheduler_killed_right_after_creating_a_run_and_during_a_retry_delay() {
    let Some(mut cluster) = Cluster::new(&[("chain.toml", CHAIN), ("retry.toml", RETRY)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    // Right after the run is created.
    let created = cluster.trigger("chain");
    cluster.kill_scheduler();
    cluster.start_scheduler();
    let run = cluster.wait_run(&created, Duration::from_secs(60));
    assert_eq!(run["state"], "success", "{}", cluster.logs_text());
    let chain = tasks(&run);
    assert!(!chain.is_empty() && chain.values().all(|t| t["try_number"] == 1), "{run}");
    // During a retry delay.
    let retried = cluster.trigger("retry");
    cluster.wait_task_state(&retried, "flaky", "up_for_retry");
    cluster.kill_scheduler();
    cluster.start_scheduler();
    let run = cluster.wait_run(&retried, Duration::from_secs(60));
    assert_eq!(run["state"], "success", "{}", cluster.logs_text());
    let flaky = &tasks(&run)["flaky"];
    assert_eq!(flaky["try_number"], 2, "one retry, not two: {flaky}");
    assert_eq!(text(&cluster.cli(&["logs", &retried, "flaky", "--try", "2"]).stdout), "try 2\n");
}

#[test]
fn a_poison_task_that_kills_its_worker_fails_after_bounded_attempts_and_others_flow() {
    // The other DAG runs on a pool of its own, so the poison's worker deaths do not touch it.
    let other = CHAIN.replace("[[task]]", "[[task]]\nqueue = \"other\"");
    let Some(mut cluster) = Cluster::new(&[("poison.toml", POISON), ("chain.toml", &other)]) else { return };
    cluster.scheduler_flags(&["--worker-timeout", "7s"]);
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker_with("w2", &["--queues", "other"]);
    let poison = cluster.trigger("poison");
    let chain = cluster.trigger("chain");
    let mut restarts = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    while cluster.json(&["runs", "show", &poison])["state"] != "failed" {
        assert!(std::time::Instant::now() < deadline, "the poison run did not fail in time:\n{}", cluster.logs_text());
        restarts += cluster.restart_exited_workers();
        std::thread::sleep(Duration::from_millis(200));
    }
    let task = &tasks(&cluster.json(&["runs", "show", &poison]))["kills_its_worker"];
    assert_eq!(task["state"], "failed");
    assert_eq!(task["try_number"], 4, "the first try and three requeues: {task}");
    assert!(task["error"].as_str().unwrap().contains("giving up"), "{task}");
    assert_eq!(restarts, 4, "the worker died once per try");
    let run = cluster.wait_run(&chain, Duration::from_secs(60));
    assert_eq!(run["state"], "success", "other work kept flowing");
}

/// A Redis server of the test's own, with AOF every second, that can be restarted.
pub(crate) struct PrivateRedis {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    pub(crate) fn start(port: u16, dir: &std::path::Path) -> PrivateRedis {
        std::fs::create_dir_all(dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--enable-debug-command",
                "local",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
        {
            assert!(std::time::Instant::now() < deadline, "private redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateRedis { child, port, dir: dir.to_path_buf() }
    }

    fn restart(&mut self) {
        std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        self.child.wait().unwrap();
        *self = PrivateRedis::start(self.port, &self.dir.clone());
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn redis_restarted_with_aof_mid_run_the_run_completes() {
    let Some(mut cluster) = Cluster::new(&[("chain.toml", CHAIN)]) else { return };
    let port = crate::support::free_port();
    let mut redis = PrivateRedis::start(port, &std::env::temp_dir().join(format!("{}-redis", cluster.namespace)));
    cluster.redis = format!("redis://127.0.0.1:{port}");
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("chain");
    cluster.wait_task_state(&run_id, "c2", "running");
    redis.restart();
    let run = cluster.wait_run(&run_id, Duration::from_secs(90));
    assert_eq!(run["state"], "success", "{}", cluster.logs_text());
    assert_every_task_succeeded_once(&run);
}

/// `DEBUG SLEEP 2` blocks the test's own Redis for two seconds (four times the client's old
/// 500 ms response timeout), and `CLIENT PAUSE 3000` holds every client for three: calls time
/// out or wait, scripts may still apply, and the run completes with every task once.
#[test]
fn a_slow_and_a_paused_redis_mid_run_the_run_completes() {
    let Some(mut cluster) = Cluster::new(&[("chain.toml", CHAIN), ("wide.toml", &wide_dag(98))]) else { return };
    let port = crate::support::free_port();
    let _redis = PrivateRedis::start(port, &std::env::temp_dir().join(format!("{}-redis", cluster.namespace)));
    cluster.redis = format!("redis://127.0.0.1:{port}");
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    let chain = cluster.trigger("chain");
    let wide = cluster.trigger("wide");
    cluster.wait_task_state(&chain, "c2", "running");
    let cli = |args: &[&str]| {
        let output =
            std::process::Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().unwrap();
        assert!(output.status.success(), "redis-cli {args:?}: {}", text(&output.stderr));
    };
    cli(&["DEBUG", "SLEEP", "2"]);
    cli(&["CLIENT", "PAUSE", "3000"]);
    for run_id in [chain, wide] {
        let run = cluster.wait_run(&run_id, Duration::from_secs(120));
        assert_eq!(run["state"], "success", "{}", cluster.logs_text());
        assert_every_task_succeeded_once(&run);
    }
}

#[test]
fn rabbitmq_stopped_and_started_during_a_500_task_run_loses_nothing() {
    let Some(mut cluster) = Cluster::new_exclusive(&[("wide.toml", &wide_dag(498))]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    cluster.wait_for_workers(2);
    let run_id = cluster.trigger("wide");
    cluster.wait_until(Duration::from_secs(60), || {
        cluster.json(&["runs", "show", &run_id])["task_counts"]["success"].as_u64().unwrap_or(0) >= 20
    });
    let ctl = |args: &[&str]| {
        let output = std::process::Command::new("rabbitmqctl").args(args).output().unwrap();
        assert!(output.status.success(), "rabbitmqctl {args:?}: {}", text(&output.stderr));
    };
    ctl(&["stop_app"]);
    std::thread::sleep(Duration::from_secs(2));
    ctl(&["start_app"]);
    ctl(&["await_startup"]);
    let run = cluster.wait_run(&run_id, Duration::from_secs(180));
    assert_eq!(run["state"], "success", "{}", cluster.logs_text());
    let tasks = tasks(&run);
    assert_eq!(tasks.len(), 500);
    assert_every_task_succeeded_once(&run);
    // Nothing left behind in the broker: the task queue drained, nothing dead-lettered. (A
    // listing that fails fails the test; it does not read as empty queues.)
    let queues = cluster.queue_counts();
    assert!(queues.keys().any(|q| q.ends_with("dagmq.tasks.default")), "the task queue is listed: {queues:?}");
    for (queue, counts) in &queues {
        assert_eq!(*counts, (0, 0), "messages left in {queue}");
    }
}

/// A DAG scheduled every 2 s whose task records each execution in `log`.
fn every_dag(log: &std::path::Path) -> String {
    format!(
        "id = \"every2s\"\nschedule = \"@every 2s\"\ncatch_up = false\n[[task]]\nid = \"tick\"\n{}",
        crate::history::command(log, "true")
    )
}

#[test]
fn two_schedulers_one_active_the_other_takes_over_and_no_schedule_point_runs_twice() {
    let log =
        std::env::temp_dir().join(format!("dagmq-every-{}-{}.log", std::process::id(), crate::support::free_port()));
    let every = every_dag(&log);
    let Some(mut cluster) = Cluster::new(&[("every.toml", &every), ("chain.toml", CHAIN)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    // A second scheduler on the same Redis and broker stands by.
    let standby_port = crate::support::free_port();
    let standby_api = format!("http://127.0.0.1:{standby_port}");
    let standby = crate::support::dagmq()
        .args(["scheduler", "--dags"])
        .arg(cluster.dags_path())
        .args(["--amqp", &cluster.amqp, "--redis", &cluster.redis, "--namespace", &cluster.namespace])
        .args(["--port", &standby_port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut standby = Guard(standby);
    let on_standby =
        |args: &[&str]| crate::support::dagmq().args(args).env("DAGMQ_API", &standby_api).output().unwrap();
    cluster.wait_until(Duration::from_secs(30), || on_standby(&["dags", "list"]).status.success());
    let refused = on_standby(&["trigger", "chain"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("this scheduler is on standby: another scheduler is active (HTTP 503)"),
        "{}",
        text(&refused.stderr)
    );
    // The active one is killed: the standby takes over within 15 s.
    cluster.wait_until(Duration::from_secs(30), || {
        cluster.json(&["runs", "list", "--dag", "every2s"]).as_array().is_some_and(|r| r.len() >= 2)
    });
    cluster.kill_scheduler();
    let killed_at = std::time::Instant::now();
    let deadline = killed_at + Duration::from_secs(15);
    let run_id = loop {
        let output = on_standby(&["trigger", "chain", "--json"]);
        if output.status.success() {
            break serde_json::from_slice::<Value>(&output.stdout).unwrap()["run_id"].as_str().unwrap().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no takeover within 15 s: {}", text(&output.stderr));
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("takeover after {:?}", killed_at.elapsed());
    let wait = on_standby(&["trigger", "every2s", "--wait"]);
    assert!(wait.status.success(), "{}", text(&wait.stderr));
    let mut done = serde_json::Value::Null;
    cluster.wait_until(Duration::from_secs(60), || {
        let output = on_standby(&["runs", "show", &run_id, "--json"]);
        done = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        done["state"] == "success"
    });
    // No schedule point ran twice. Run ids are built from the point, so the store cannot hold
    // two runs of one point; what could go wrong is a point's task executed twice (by both
    // schedulers' queueing, say): count executions. The runs are listed before the log is read
    // (every run that succeeded by then has its execution in the log) and after (every
    // execution in the log belongs to a listed run).
    let list = || -> Vec<Value> {
        let output = on_standby(&["runs", "list", "--dag", "every2s", "--limit", "500", "--json"]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        serde_json::from_slice::<Value>(&output.stdout).unwrap().as_array().unwrap().clone()
    };
    let before = list();
    let executions: Vec<crate::history::Record> = crate::history::read(&log).into_iter().filter(|r| r.start).collect();
    let after = list();
    let mut per_run: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for execution in &executions {
        per_run.entry(execution.run.as_str()).or_default().push(execution.try_number);
    }
    for (run_id, tries) in &per_run {
        assert!(after.iter().any(|r| r["run_id"] == *run_id), "an execution of unknown run {run_id}");
        assert_eq!(tries, &[1], "run {run_id}'s tick ran as tries {tries:?}");
    }
    let succeeded: Vec<&str> =
        before.iter().filter(|r| r["state"] == "success").map(|r| r["run_id"].as_str().unwrap()).collect();
    assert!(succeeded.len() >= 2, "{before:?}");
    for run_id in &succeeded {
        assert!(per_run.contains_key(run_id), "run {run_id} succeeded without its tick running");
    }
    let _ = std::fs::remove_file(&log);
    let _ = standby.0.kill();
}

/// Kills the wrapped process when dropped.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn scheduler_killed_again_and_again_during_a_40_hop_chain_runs_each_task_once() {
    let mut chain = String::from("id = \"hops\"\n");
    for i in 0..40 {
        chain.push_str(&format!("[[task]]\nid = \"h{i}\"\nrun = \"sleep\"\nargs = {{ ms = 60 }}\n"));
        if i > 0 {
            chain.push_str(&format!("after = [\"h{}\"]\n", i - 1));
        }
    }
    let Some(mut cluster) = Cluster::new(&[("hops.toml", &chain)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    let run_id = cluster.trigger("hops");
    // Kill the scheduler at five moments of the run, each while tasks are completing, so kills
    // fall between a status update and the publish of the next task as often as anywhere.
    for round in 0..5 {
        cluster.wait_until(Duration::from_secs(60), || {
            cluster.json(&["runs", "show", &run_id])["task_counts"]["success"].as_u64().unwrap_or(0) >= 3 + round * 6
        });
        std::thread::sleep(Duration::from_millis(30 * round));
        cluster.kill_scheduler();
        cluster.start_scheduler();
    }
    let run = cluster.wait_run(&run_id, Duration::from_secs(120));
    assert_eq!(run["state"], "success", "{}", cluster.logs_text());
    let tasks = tasks(&run);
    assert_eq!(tasks.len(), 40);
    assert_every_task_succeeded_once(&run);
}

const LIMITED: &str = r#"
id = "limited"
max_active_runs = 1
[[task]]
id = "a"
run = "sleep"
args = { ms = 1500 }
[[task]]
id = "b"
after = ["a"]
run = "sleep"
args = { ms = 1500 }
"#;

/// A TCP proxy in front of Redis whose requests can be held, as over a link that stalls: while
/// held, what a client sends is kept back (and recorded), and passes on, in order, once
/// released. Replies always pass.
struct HeldLink {
    /// Where the proxy listens.
    port: u16,
    /// Requests are kept back while set.
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// What was sent while held.
    kept: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl HeldLink {
    /// A proxy to `target` (`host:port`).
    fn start(target: String) -> HeldLink {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (link_held, link_kept) = (held.clone(), kept.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(&target) else { continue };
                let (mut replies_from, mut replies_to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut replies_from, &mut replies_to);
                    let _ = replies_to.shutdown(std::net::Shutdown::Write);
                });
                let (chunks_in, chunks_out) = std::sync::mpsc::channel::<Vec<u8>>();
                let (mut requests_from, held, kept) = (client, link_held.clone(), link_kept.clone());
                std::thread::spawn(move || {
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = requests_from.read(&mut buffer) {
                        if held.load(Ordering::SeqCst) {
                            kept.lock().unwrap().extend_from_slice(&buffer[..n]);
                        }
                        if chunks_in.send(buffer[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                });
                let (mut requests_to, held) = (server, link_held.clone());
                std::thread::spawn(move || {
                    for chunk in chunks_out {
                        while held.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        if requests_to.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                    let _ = requests_to.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        HeldLink { port, held, kept }
    }

    /// `url` (a Redis URL) through this proxy.
    fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (credentials, rest) = rest.rsplit_once('@').map_or(("", rest), |(c, r)| (c, r));
        let path = rest.find('/').map_or("", |at| &rest[at..]);
        let at = if credentials.is_empty() { String::new() } else { format!("{credentials}@") };
        format!("{scheme}://{at}127.0.0.1:{}{path}", self.port)
    }

    fn hold(&self, held: bool) {
        self.held.store(held, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether what was sent while held contains `needle`.
    fn kept_back(&self, needle: &str) -> bool {
        String::from_utf8_lossy(&self.kept.lock().unwrap()).contains(needle)
    }
}

/// `host:port` of a Redis URL.
fn redis_address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split('/').next().unwrap().to_string()
}

/// Split brain: the active scheduler is stopped (SIGSTOP) for longer than its lease, the
/// standby takes over and finishes every run; when the old one is continued (SIGCONT) its
/// writes are refused by the fence and it steps down. No run is stuck or doubled, no task runs
/// twice, and `max_active_runs = 1` holds across the takeover.
///
/// To tell a fenced write from a plain lease expiry, the old scheduler is stopped with a write
/// under way: its link to Redis (a proxy of the test's own) holds its requests back while it
/// creates a run, it is stopped, and once the standby has taken over, the link passes the
/// creation on to Redis, which refuses it by the fence; the old scheduler reads the refusal when
/// it is continued, logs it, and steps down at once.
#[test]
fn a_scheduler_stopped_past_its_lease_is_fenced_when_it_resumes_and_nothing_is_stuck_or_doubled() {
    let Some(mut cluster) = Cluster::new(&[("limited.toml", LIMITED), ("chain.toml", CHAIN)]) else { return };
    let link = HeldLink::start(redis_address(&cluster.redis));
    let through_link = link.url_for(&cluster.redis);
    let redis = std::mem::replace(&mut cluster.redis, through_link);
    cluster.start_scheduler();
    cluster.redis = redis;
    cluster.start_worker("w1");
    let standby_port = crate::support::free_port();
    let standby_api = format!("http://127.0.0.1:{standby_port}");
    let _standby = Guard(
        crate::support::dagmq()
            .args(["scheduler", "--dags"])
            .arg(cluster.dags_path())
            .args(["--amqp", &cluster.amqp, "--redis", &cluster.redis, "--namespace", &cluster.namespace])
            .args(["--port", &standby_port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let on_standby =
        |args: &[&str]| crate::support::dagmq().args(args).env("DAGMQ_API", &standby_api).output().unwrap();
    cluster.wait_until(Duration::from_secs(30), || on_standby(&["dags", "list"]).status.success());
    let mut runs: Vec<String> = (0..4).map(|_| cluster.trigger("limited")).collect();
    runs.push(cluster.trigger("chain"));
    cluster.wait_task_state(&runs[0], "a", "running");

    // A run creation under way, kept back on the link; then the old scheduler stops.
    link.hold(true);
    let (api, probe_key) = (cluster.api.clone(), "fenced-probe");
    let probe = std::thread::spawn(move || {
        crate::support::dagmq().args(["trigger", "chain", "--key", probe_key]).env("DAGMQ_API", api).output().unwrap()
    });
    cluster.wait_until(Duration::from_secs(30), || link.kept_back(probe_key));
    cluster.signal_scheduler("STOP");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let output = on_standby(&["trigger", "chain", "--json"]);
        if output.status.success() {
            runs.push(serde_json::from_slice::<Value>(&output.stdout).unwrap()["run_id"].as_str().unwrap().to_string());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no takeover: {}", text(&output.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
    // The standby holds the lease: the kept-back creation reaches Redis now, and the old
    // scheduler reads the answer when it goes on.
    link.hold(false);
    cluster.signal_scheduler("CONT");
    let probe = probe.join().unwrap();
    assert!(!probe.status.success(), "the stopped scheduler's run creation was refused: {}", text(&probe.stdout));
    cluster
        .wait_until(Duration::from_secs(30), || text(&cluster.cli(&["trigger", "chain"]).stderr).contains("standby"));
    let log = cluster.log("scheduler");
    assert!(
        log.contains("run creation refused by the fence"),
        "the old scheduler's write was refused by the fence, not only its lease found lapsed:\n{log}"
    );
    assert!(log.contains("stepping down"), "{log}");

    let show = |run_id: &str| -> Value {
        serde_json::from_slice(&on_standby(&["runs", "show", run_id, "--json"]).stdout).unwrap_or(Value::Null)
    };
    cluster.wait_until(Duration::from_secs(120), || runs.iter().all(|r| show(r)["state"] == "success"));
    let chains = serde_json::from_slice::<Value>(
        &on_standby(&["runs", "list", "--dag", "chain", "--limit", "50", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(chains.as_array().unwrap().len(), 2, "the refused creation made no run: {chains}");

    let mut spans = Vec::new();
    for run_id in &runs {
        let run = show(run_id);
        assert_eq!(run["state"], "success", "{run}");
        assert_every_task_succeeded_once(&run);
        if run["dag_id"] == "limited" {
            let at = |field: &str| chrono::DateTime::parse_from_rfc3339(run[field].as_str().unwrap()).unwrap();
            spans.push((at("started_at"), at("ended_at")));
        }
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "limited runs overlapped: {spans:?}");
    }
    let listed = serde_json::from_slice::<Value>(
        &on_standby(&["runs", "list", "--dag", "limited", "--limit", "50", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4, "no run doubled: {listed}");
}

/// A worker whose slots are all busy holds at most its prefetch (64) and the margin (8) of
/// unstarted messages, not as many as it has slots: a worker that starts later gets the rest
/// of the work.
#[test]
fn a_busy_worker_holds_few_unstarted_messages_and_a_later_worker_gets_the_rest() {
    let mut busy = String::from("id = \"busy\"\n");
    for i in 0..300 {
        busy.push_str(&format!("[[task]]\nid = \"t{i}\"\nrun = \"sleep\"\nargs = {{ ms = 4000 }}\n"));
    }
    let Some(mut cluster) = Cluster::new(&[("busy.toml", &busy)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker_with("w1", &["--concurrency", "100"]);
    let run_id = cluster.trigger("busy");
    cluster.wait_until(Duration::from_secs(60), || {
        cluster.json(&["runs", "show", &run_id])["task_counts"]["running"].as_u64() == Some(100)
    });
    let (_, held) = cluster.queue_count("dagmq.tasks.default");
    assert!(held <= 72, "a busy worker holds {held} unstarted messages");
    cluster.start_worker_with("w2", &["--concurrency", "150"]);
    let run = cluster.wait_run(&run_id, Duration::from_secs(120));
    assert_eq!(run["state"], "success");
    assert_every_task_succeeded_once(&run);
    let by_w2 = tasks(&run).values().filter(|t| t["worker"] == "w2").count();
    assert!(by_w2 >= 100, "the later worker ran {by_w2} tasks");
}

/// A worker of few slots holds four messages per slot that it has not started (so that a slot
/// whose try ends finds its next one at hand), and `--prefetch N` holds exactly N, for long tasks.
#[test]
fn a_worker_holds_four_unstarted_messages_per_slot_and_prefetch_sets_exactly_how_many() {
    let mut busy = String::from("id = \"busy\"\n");
    for i in 0..120 {
        busy.push_str(&format!("[[task]]\nid = \"t{i}\"\nrun = \"sleep\"\nargs = {{ ms = 1500 }}\n"));
    }
    let Some(mut cluster) = Cluster::new(&[("busy.toml", &busy)]) else { return };
    cluster.start_scheduler();
    cluster.start_worker_with("w1", &["--concurrency", "2", "--prefetch", "1"]);
    let run_id = cluster.trigger("busy");
    cluster.wait_until(Duration::from_secs(60), || {
        cluster.json(&["runs", "show", &run_id])["task_counts"]["running"].as_u64() == Some(2)
            && cluster.queue_count("dagmq.tasks.default").1 == 1
    });
    cluster.start_worker_with("w2", &["--concurrency", "8"]);
    cluster.wait_until(Duration::from_secs(60), || cluster.queue_count("dagmq.tasks.default").1 == 1 + 32);
    for _ in 0..3 {
        let (_, held) = cluster.queue_count("dagmq.tasks.default");
        assert!(held <= 33, "the workers hold {held} unstarted messages, more than 1 + 4 x 8");
    }
    let run = cluster.wait_run(&run_id, Duration::from_secs(120));
    assert_eq!(run["state"], "success");
    assert_every_task_succeeded_once(&run);
}

#[test]
fn outputs_pass_between_tasks_on_different_workers_through_redis() {
    let example = std::fs::read_to_string(crate::support::examples().join("etl_outputs.toml")).unwrap();
    let Some(mut cluster) =
        Cluster::new(&[("etl_outputs.toml", &example), ("outputs.toml", crate::standalone::OUTPUTS)])
    else {
        return;
    };
    cluster.start_scheduler();
    cluster.start_worker("w1");
    cluster.start_worker("w2");
    cluster.wait_for_workers(2);
    let output = cluster.cli(&["trigger", "etl_outputs", "--wait", "--json"]);
    assert!(output.status.success(), "{}\n{}", text(&output.stderr), cluster.logs_text());
    let run: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let run_id = run["run_id"].as_str().unwrap();
    let path = format!("/tmp/dagmq-etl-{run_id}.csv");
    assert_eq!(tasks(&run)["extract"]["output"], serde_json::json!({"path": path, "rows": 3}));
    assert_eq!(tasks(&run)["load"]["output"], serde_json::json!({"loaded": 3}));
    let report = text(&cluster.cli(&["logs", run_id, "report"]).stdout);
    assert_eq!(report, format!("extract said {{\"path\":\"{path}\",\"rows\":3}}, load said 3\n"));

    // Malformed and oversize outputs fail their tries on whichever worker ran them.
    let output = cluster.cli(&["trigger", "outputs", "--wait", "--json"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let run: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let tasks = tasks(&run);
    assert_eq!(tasks["count"]["output"], serde_json::json!({"path": "/data/x.csv", "rows": 3}));
    assert_eq!((&tasks["garbled"]["state"], &tasks["garbled"]["try_number"]), (&"failed".into(), &2.into()));
    assert!(tasks["garbled"]["error"].as_str().unwrap().starts_with("the output file (DAGMQ_OUTPUT) is not JSON"));
    assert!(tasks["huge"]["error"].as_str().unwrap().contains("more than the limit of 65536"), "{}", tasks["huge"]);
}
