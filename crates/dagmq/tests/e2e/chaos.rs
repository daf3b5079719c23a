//! A chaos run with a history checker (the Jepsen idea): two schedulers and three workers on
//! RabbitMQ and a Redis of the test's own, a stream of keyed triggers of DAGs whose command
//! tasks append `start`/`end` records (run, task, try, time) to a side-effect log, while a
//! nemesis kills and restarts workers and schedulers, pauses processes, closes broker
//! connections, restarts the broker and slows Redis. After healing, a checker reads the store
//! and the side-effect log and proves the guarantees of RELIABILITY.md.
//!
//! `DAGMQ_CHAOS_SECS` sets how long the nemesis acts (default 90 s; RELIABILITY.md reports a
//! 30-minute run); `DAGMQ_CHAOS_SEED` replays a run's choice of faults.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dagmq_core::store::RunFilter;
use dagmq_core::{Queue, RunState, Store, TaskState, Topic};

use crate::cluster::Cluster;
use crate::distributed::PrivateRedis;
use crate::support::free_port;

/// A small deterministic generator (xorshift), so a seed replays a run's faults.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A command task that records its start and end in `log`.
fn task(id: &str, after: &[&str], log: &std::path::Path) -> String {
    let record = |what: &str| {
        format!("echo \\\"{what} $DAGMQ_RUN_ID $DAGMQ_TASK_ID $DAGMQ_TRY $(date +%s%N)\\\" >> {}", log.display())
    };
    let after: Vec<String> = after.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[task]]\nid = \"{id}\"\nafter = [{}]\ncommand = [\"sh\", \"-c\", \"{}; sleep 0.2; {}\"]\n",
        after.join(", "),
        record("start"),
        record("end")
    )
}

fn send(signal: &str, pid: u32) {
    let _ = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
}

/// One record of the side-effect log.
struct Record {
    start: bool,
    run: String,
    task: String,
    try_number: u32,
    at: u128,
}

fn read_history(log: &std::path::Path) -> Vec<Record> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            Some(Record {
                start: *parts.first()? == "start",
                run: parts.get(1)?.to_string(),
                task: parts.get(2)?.to_string(),
                try_number: parts.get(3)?.parse().ok()?,
                at: parts.get(4)?.parse().ok()?,
            })
        })
        .collect()
}

#[test]
fn chaos_with_a_history_checker() {
    let secs: u64 = std::env::var("DAGMQ_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(90);
    let seed: u64 = std::env::var("DAGMQ_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    let log = std::env::temp_dir().join(format!("dagmq-chaos-{}-{seed}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let diamond = format!(
        "id = \"diamond\"\n{}{}{}{}",
        task("d1", &[], &log),
        task("d2", &["d1"], &log),
        task("d3", &["d1"], &log),
        task("d4", &["d2", "d3"], &log)
    );
    let chain =
        format!("id = \"chain\"\n{}{}{}", task("c1", &[], &log), task("c2", &["c1"], &log), task("c3", &["c2"], &log));
    let Some(mut cluster) = Cluster::new_exclusive(&[("diamond.toml", &diamond), ("chain.toml", &chain)]) else {
        return;
    };
    let redis_port = free_port();
    let redis = PrivateRedis::start(redis_port, &std::env::temp_dir().join(format!("{}-redis", cluster.namespace)));
    cluster.redis = format!("redis://127.0.0.1:{redis_port}");
    cluster.start_scheduler();
    let standby_port = free_port();
    let mut standby = Some(cluster.spawn_scheduler_on(standby_port, "standby"));
    let workers = ["w1", "w2", "w3"];
    for name in workers {
        cluster.start_worker(name);
    }
    eprintln!("chaos: seed {seed}, {secs} s, namespace {}", cluster.namespace);

    // Triggers: a keyed trigger every 300 ms, every tenth key published twice.
    let stop = Arc::new(AtomicBool::new(false));
    let sent: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let producer = {
        let (amqp, namespace, stop, sent) =
            (cluster.amqp.clone(), cluster.namespace.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let mut config = dagmq_rabbitmq::RabbitConfig::new(amqp);
                config.namespace = namespace;
                let queue = loop {
                    match dagmq_rabbitmq::RabbitQueue::connect(config.clone()).await {
                        Ok(queue) => break queue,
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                };
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let dag = if n.is_multiple_of(2) { "diamond" } else { "chain" };
                    let key = format!("k{n}");
                    let copies = if n.is_multiple_of(10) { 2 } else { 1 };
                    for _ in 0..copies {
                        let payload = format!(r#"{{"v":1,"dag_id":"{dag}","key":"{key}"}}"#).into_bytes();
                        // Unconfirmed publishes are sent again: the key makes that harmless.
                        while queue.publish(&Topic::Triggers, payload.clone()).await.is_err() {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                    sent.lock().unwrap().push((dag.to_string(), key));
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
        })
    };

    // The nemesis.
    let mut rng = Rng(seed);
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(2000 + rng.below(4000)));
        cluster.restart_exited_workers();
        let worker = workers[rng.below(3) as usize];
        let kind = match rng.below(10) {
            0 => {
                if let Some(pid) = cluster.worker_pid(worker) {
                    send("KILL", pid);
                }
                "worker killed"
            }
            1 => {
                if let Some(pid) = cluster.worker_pid(worker) {
                    send("TERM", pid);
                }
                "worker stopped (SIGTERM)"
            }
            2 => {
                cluster.kill_scheduler();
                cluster.start_scheduler();
                "scheduler killed"
            }
            3 => {
                if let Some(mut child) = standby.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                standby = Some(cluster.spawn_scheduler_on(standby_port, "standby"));
                "standby scheduler killed"
            }
            4 => {
                if let Some(pid) = cluster.scheduler_pid() {
                    send("STOP", pid);
                    std::thread::sleep(Duration::from_secs(12));
                    send("CONT", pid);
                }
                "scheduler paused past its lease"
            }
            5 => {
                if let Some(pid) = cluster.worker_pid(worker) {
                    send("STOP", pid);
                    std::thread::sleep(Duration::from_secs(8));
                    send("CONT", pid);
                }
                "worker paused"
            }
            6 => {
                let _ = Command::new("rabbitmqctl")
                    .args(["close_all_connections", "--vhost", &cluster.namespace, "chaos"])
                    .output();
                "broker connections closed"
            }
            7 => {
                let _ = Command::new("rabbitmqctl").arg("stop_app").output();
                std::thread::sleep(Duration::from_secs(2));
                let _ = Command::new("rabbitmqctl").arg("start_app").output();
                let _ = Command::new("rabbitmqctl").arg("await_startup").output();
                "broker restarted"
            }
            8 => {
                let _ = Command::new("redis-cli").args(["-p", &redis_port.to_string(), "DEBUG", "SLEEP", "2"]).output();
                "redis slowed (DEBUG SLEEP 2)"
            }
            _ => {
                let _ =
                    Command::new("redis-cli").args(["-p", &redis_port.to_string(), "CLIENT", "PAUSE", "3000"]).output();
                "redis paused (CLIENT PAUSE 3000)"
            }
        };
        *faults.entry(kind).or_default() += 1;
    }

    // Healing: triggers stop, every process runs.
    stop.store(true, Ordering::SeqCst);
    producer.join().unwrap();
    cluster.restart_exited_workers();
    if cluster.scheduler_exited() {
        cluster.reap_scheduler();
        cluster.start_scheduler();
    }
    let sent = sent.lock().unwrap().clone();
    let (redis_url, prefix) = (cluster.redis.clone(), cluster.namespace.clone());
    let wanted: BTreeSet<String> = sent.iter().map(|(_, key)| key.clone()).collect();

    // Every run terminal, read from the store.
    let deadline = Instant::now() + Duration::from_secs(300);
    let (runs, tasks) = loop {
        let (runs, tasks) = cluster
            .block_on({
                let (redis_url, prefix) = (redis_url.clone(), prefix.clone());
                async move {
                    let store = dagmq_redis::RedisStore::connect(&redis_url, &prefix, None).await.ok()?;
                    let runs = store.list_runs(&RunFilter { limit: 1_000_000, ..Default::default() }).await.ok()?;
                    let mut tasks = HashMap::new();
                    for run in &runs {
                        tasks.insert(run.run_id.clone(), store.tasks(&run.run_id).await.ok()?);
                    }
                    Some((runs, tasks))
                }
            })
            .unwrap_or_default();
        let keys: BTreeSet<String> = runs.iter().filter_map(|r| r.key.clone()).collect();
        let done = keys == wanted && runs.iter().all(|r| r.state.is_final());
        if done {
            break (runs, tasks);
        }
        if Instant::now() > deadline {
            let open: Vec<_> = runs.iter().filter(|r| !r.state.is_final()).map(|r| &r.run_id).collect();
            let missing: Vec<_> = wanted.difference(&keys).collect();
            panic!("not healed in 300 s: unfinished {open:?}, keys without a run {missing:?}\n{}", cluster.logs_text());
        }
        std::thread::sleep(Duration::from_secs(1));
    };

    // The checker.
    let history = read_history(&log);
    let mut violations: Vec<String> = Vec::new();
    let mut by_key: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for run in &runs {
        by_key.entry(run.key.clone().unwrap_or_default()).or_default().push(&run.run_id);
    }
    for (key, ids) in &by_key {
        if ids.len() != 1 {
            violations.push(format!("trigger key {key} made {} runs: {ids:?}", ids.len()));
        }
    }
    let mut successes = 0usize;
    let mut task_count = 0usize;
    for run in &runs {
        let run_tasks = &tasks[&run.run_id];
        task_count += run_tasks.len();
        let expected = dagmq_core::state::run_outcome(run_tasks.iter().map(|t| t.state));
        if expected != Some(run.state) {
            violations.push(format!("run {} is {} but its tasks say {expected:?}", run.run_id, run.state));
        }
        let ended: HashMap<(&str, u32), u128> = history
            .iter()
            .filter(|r| !r.start && r.run == run.run_id)
            .map(|r| ((r.task.as_str(), r.try_number), r.at))
            .collect();
        let state_of: HashMap<&str, &dagmq_core::TaskInstance> =
            run_tasks.iter().map(|t| (t.task_id.as_str(), t)).collect();
        for task in run_tasks {
            let starts: Vec<&Record> =
                history.iter().filter(|r| r.start && r.run == run.run_id && r.task == task.task_id).collect();
            let tries: Vec<u32> = starts.iter().map(|r| r.try_number).collect();
            let mut sorted = tries.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != tries.len() {
                violations.push(format!("{}/{}: a try started twice: {tries:?}", run.run_id, task.task_id));
            }
            if task.state == TaskState::Success {
                successes += 1;
                if !ended.contains_key(&(task.task_id.as_str(), task.try_number)) {
                    violations.push(format!(
                        "{}/{}: try {} succeeded but never ended",
                        run.run_id, task.task_id, task.try_number
                    ));
                }
            } else if run.state == RunState::Success {
                violations.push(format!("{}/{} is {} in a successful run", run.run_id, task.task_id, task.state));
            }
            for start in &starts {
                for upstream in task.after.iter() {
                    let Some(up) = state_of.get(upstream.as_str()) else { continue };
                    let up_end = ended.get(&(upstream.as_str(), up.try_number)).copied();
                    if up.state != TaskState::Success || up_end.is_none_or(|end| end > start.at) {
                        violations.push(format!(
                            "{}/{} try {} started before upstream {upstream} had ended successfully",
                            run.run_id, task.task_id, start.try_number
                        ));
                    }
                }
            }
        }
    }
    let executions = history.iter().filter(|r| r.start).count();
    let total_faults: u32 = faults.values().sum();
    eprintln!(
        "chaos summary: seed {seed}, {secs} s of faults; runs {}, tasks {task_count}, successful tasks {successes}, \
         executions {executions}, duplicates {}, faults {total_faults} {faults:?}, violations {}",
        runs.len(),
        executions.saturating_sub(successes),
        violations.len()
    );
    assert!(executions >= successes, "executions {executions} < successes {successes}");
    assert!(runs.len() >= 10, "too few runs to judge: {}", runs.len());
    assert!(violations.is_empty(), "violations:\n{}", violations.join("\n"));
    if let Some(mut child) = standby.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(redis);
    let _ = std::fs::remove_file(&log);
}
