//! A chaos run with a history checker (the Jepsen idea): two schedulers and three workers on a
//! RabbitMQ node and a Redis of the test's own run a mixed workload while a nemesis injects
//! faults; after healing, a checker reads the store and the tasks' side-effect log
//! (`history.rs`) and proves that every run ended in the state its DAG's semantics give, and
//! that what really ran agrees with the store.
//!
//! The workload: keyed triggers, every tenth published twice, of a chain, a task that fails
//! until its second try (retries), a task that fails for good (with a task skipped as
//! upstream_failed and a cleanup task that runs anyway), a branch, two tasks in a pool of one
//! slot, and a Rust task that returns follow-ups; beside them an operator cancels runs of a
//! long task and suspends and resumes runs of another, through the API of whichever scheduler
//! answers.
//!
//! The nemesis deals the fault kinds from a shuffled deck, so each happens in every pass, and
//! checks that each really happened: every command it runs must succeed; "active scheduler"
//! faults hit the process that holds the lease (read from Redis); a worker is frozen (SIGSTOP)
//! while it runs a 35 s try, past the worker timeout, and the scheduler must take it for lost
//! and start the try again elsewhere before the worker wakes up (the first copy still runs); a paused active scheduler
//! must have been replaced by the other one when it wakes up.
//!
//! The checker: every trigger key made exactly one run; every run and task ended as its DAG
//! gives; no try started twice or above the stored try; no execution started after its task's
//! successful try had ended; each successful try started and ended once in the log; no task
//! started before its upstream tasks had ended; nothing skipped ran; no two successful tries
//! of the pool's tasks overlapped.
//!
//! `DAGMQ_CHAOS_SECS` sets how long the nemesis acts (default 60 s, the whole test under about
//! 3 minutes on the 2-core project machine; RELIABILITY.md reports a 30-minute run);
//! `DAGMQ_CHAOS_SEED` replays a run's choices.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dagmq_core::store::RunFilter;
use dagmq_core::{Queue, RunRecord, RunState, Store, TaskInstance, TaskState, Topic};

use crate::cluster::Cluster;
use crate::distributed::PrivateRedis;
use crate::history::{self, Record};
use crate::support::{dagmq, free_port, text};

/// How long a worker is frozen: past the worker timeout (20 s), the next zombie check (5 s) and
/// a takeover by the other scheduler (the nemesis may pause the active one meanwhile).
const WORKER_FREEZE: Duration = Duration::from_secs(40);
/// The workers' names.
const WORKERS: [&str; 3] = ["w1", "w2", "w3"];
/// How long the active scheduler is paused: past its lease (10 s) and the other's takeover.
const SCHEDULER_PAUSE: Duration = Duration::from_secs(15);

/// A small deterministic generator (xorshift), so a seed replays a run's choices.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The DAGs the producer triggers, by weight.
const TRIGGERED: [(&str, u64); 6] =
    [("chain", 3), ("retry", 2), ("fails", 1), ("branch", 2), ("pooled", 1), ("parts", 2)];

/// The workload's DAG files.
fn dag_files(log: &Path) -> Vec<(&'static str, String)> {
    let task =
        |id: &str, extra: &str, body: &str| format!("[[task]]\nid = \"{id}\"\n{extra}{}", history::command(log, body));
    let log_arg = history::toml_string(&log.display().to_string());
    vec![
        (
            "chain.toml",
            format!(
                "id = \"chain\"\n{}{}{}",
                task("c1", "", "sleep 0.2"),
                task("c2", "after = [\"c1\"]\n", "sleep 0.2"),
                task("c3", "after = [\"c2\"]\n", "sleep 0.2")
            ),
        ),
        (
            "retry.toml",
            format!(
                "id = \"retry\"\n{}{}",
                task("flaky", "retries = 2\nretry_delay = \"1s\"\n", "sleep 0.1; test \"$DAGMQ_TRY\" -ge 2"),
                task("tail", "after = [\"flaky\"]\n", "sleep 0.1")
            ),
        ),
        (
            "fails.toml",
            format!(
                "id = \"fails\"\n{}{}{}",
                task("boom", "retries = 1\nretry_delay = \"1s\"\nalert_on_failure = false\n", "sleep 0.1; false"),
                task("never", "after = [\"boom\"]\n", "true"),
                task("cleanup", "after = [\"boom\"]\ntrigger_rule = \"all_done\"\n", "sleep 0.1")
            ),
        ),
        (
            "branch.toml",
            format!(
                "id = \"branch\"\n{}{}{}{}",
                task("pick", "branch = true\n", "echo '\"left\"' > \"$DAGMQ_OUTPUT\""),
                task("left", "after = [\"pick\"]\n", "sleep 0.1"),
                task("right", "after = [\"pick\"]\n", "sleep 0.1"),
                task("join", "after = [\"left\", \"right\"]\ntrigger_rule = \"none_failed\"\n", "true")
            ),
        ),
        (
            "pooled.toml",
            format!(
                "id = \"pooled\"\n{}{}",
                task("p1", "pool = \"one\"\n", "sleep 0.1"),
                task("p2", "pool = \"one\"\n", "sleep 0.1")
            ),
        ),
        (
            "parts.toml",
            format!(
                "id = \"parts\"\n[[task]]\nid = \"split\"\nrun = \"split\"\nargs = {{ log = {log_arg} }}\n{}",
                task("merge", "after = [\"split\"]\n", "true")
            ),
        ),
        // Longer than the whole test: the run cannot end on its own before the operator's cancel
        // lands, however long frozen schedulers make that cancel take (up to 120 s of retries).
        ("hold_cancel.toml", format!("id = \"hold_cancel\"\n{}", task("hold", "", "sleep 3600"))),
        // The try the nemesis freezes a worker in: longer than the freeze takes to be noticed, so
        // the requeued copy starts while the first still runs.
        ("slow.toml", format!("id = \"slow\"\n{}", task("long", "", "sleep 35"))),
        (
            "hold_suspend.toml",
            format!(
                "id = \"hold_suspend\"\n{}{}",
                task("hold", "", "sleep 2"),
                task("after_hold", "after = [\"hold\"]\n", "true")
            ),
        ),
    ]
}

/// The fault kinds, each dealt once per pass of the deck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    WorkerFrozen,
    ActiveSchedulerPaused,
    WorkerKilled,
    WorkerTerminated,
    WorkerPaused,
    ActiveSchedulerKilled,
    StandbySchedulerKilled,
    BrokerConnectionsClosed,
    BrokerRestarted,
    RedisSlowed,
    RedisPaused,
}

impl Fault {
    /// Every kind.
    const ALL: [Fault; 11] = [
        Fault::WorkerFrozen,
        Fault::ActiveSchedulerPaused,
        Fault::WorkerKilled,
        Fault::WorkerTerminated,
        Fault::WorkerPaused,
        Fault::ActiveSchedulerKilled,
        Fault::StandbySchedulerKilled,
        Fault::BrokerConnectionsClosed,
        Fault::BrokerRestarted,
        Fault::RedisSlowed,
        Fault::RedisPaused,
    ];

    /// The long faults first, so they end within the nemesis' time; the rest shuffled.
    fn deck(rng: &mut Rng) -> Vec<Fault> {
        let mut rest = vec![
            Fault::WorkerKilled,
            Fault::WorkerTerminated,
            Fault::WorkerPaused,
            Fault::ActiveSchedulerKilled,
            Fault::StandbySchedulerKilled,
            Fault::BrokerConnectionsClosed,
            Fault::BrokerRestarted,
            Fault::RedisSlowed,
            Fault::RedisPaused,
        ];
        for i in (1..rest.len()).rev() {
            rest.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut deck = vec![Fault::WorkerFrozen, Fault::ActiveSchedulerPaused];
        deck.extend(rest);
        deck
    }

    fn label(self) -> &'static str {
        match self {
            Fault::WorkerFrozen => "worker frozen past the worker timeout (SIGSTOP 40 s)",
            Fault::ActiveSchedulerPaused => "active scheduler paused past its lease (SIGSTOP 15 s)",
            Fault::WorkerKilled => "worker killed (SIGKILL)",
            Fault::WorkerTerminated => "worker stopped (SIGTERM)",
            Fault::WorkerPaused => "worker paused under the timeout (SIGSTOP 5 s)",
            Fault::ActiveSchedulerKilled => "active scheduler killed (SIGKILL)",
            Fault::StandbySchedulerKilled => "standby scheduler killed (SIGKILL)",
            Fault::BrokerConnectionsClosed => "broker connections closed",
            Fault::BrokerRestarted => "broker restarted (stop_app, start_app)",
            Fault::RedisSlowed => "redis slowed (DEBUG SLEEP 2)",
            Fault::RedisPaused => "redis paused (CLIENT PAUSE 3000)",
        }
    }
}

/// Sends `signal` to `pid`; the fault did not happen unless `kill` succeeds.
fn send(signal: &str, pid: u32) {
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid} failed: the fault did not happen");
}

/// Runs a fault's command, which must succeed.
fn must(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

/// Runs a `redis-cli` fault command, which must answer `OK`.
fn redis_ok(port: u16, args: &[&str]) {
    let mut all = vec!["-p".to_string(), port.to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let output = must("redis-cli", &all);
    assert_eq!(text(&output.stdout).trim(), "OK", "redis-cli {args:?}: the fault did not happen");
}

/// A RabbitMQ node of the test's own: the nemesis restarts it, which must disturb no other test.
struct PrivateRabbit {
    child: Child,
    dir: PathBuf,
    node: String,
    port: u16,
}

impl PrivateRabbit {
    /// Starts a node with one plain listener on loopback and waits (up to 180 s) until it
    /// takes connections.
    fn start(dir: &Path) -> PrivateRabbit {
        let port = free_port();
        let node = format!("dagmq-chaos-{port}@localhost");
        std::fs::create_dir_all(dir.join("mnesia")).unwrap();
        std::fs::write(dir.join("rabbit.conf"), format!("listeners.tcp.default = 127.0.0.1:{port}\n")).unwrap();
        let d = |name: &str| dir.join(name).display().to_string();
        // The script under /usr/lib runs the node as the calling user (the one in /usr/sbin
        // switches to the rabbitmq user), in a process group of its own to kill at the end.
        let mut command = Command::new(rabbit_program("rabbitmq-server"));
        command
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_CONFIG_FILE", d("rabbit"))
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("plugins"))
            .env("RABBITMQ_PID_FILE", d("pid"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", d("mnesia/feature_flags"))
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(dir.join("out.log")).unwrap())
            .stderr(std::process::Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("rabbitmq-server runs");
        let deadline = Instant::now() + Duration::from_secs(180);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "rabbitmq-server exited ({status}): {}",
                    std::fs::read_to_string(dir.join("out.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the private RabbitMQ node did not listen within 180 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        PrivateRabbit { child, dir: dir.to_path_buf(), node, port }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl` against the node; a command that fails fails the test.
    fn ctl(&self, args: &[&str]) -> Output {
        let output = Command::new(rabbit_program("rabbitmqctl"))
            .env("HOME", &self.dir)
            .args(["-n", &self.node])
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        assert!(output.status.success(), "rabbitmqctl {args:?} failed ({}): {}", output.status, text(&output.stderr));
        output
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RabbitMQ program that runs as the calling user.
fn rabbit_program(name: &str) -> String {
    let local = format!("/usr/lib/rabbitmq/bin/{name}");
    if Path::new(&local).exists() { local } else { name.to_string() }
}

/// A line of a process's log without its colours.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence runs to its final letter.
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

/// A process the nemesis stopped, and when it wakes it up.
struct Stopped {
    until: Instant,
    pid: u32,
    what: Stop,
}

enum Stop {
    /// A worker frozen past the worker timeout in the middle of a try of run `run_id`: its
    /// name, and how many "worker lost" lines the schedulers had logged for it before.
    Frozen { worker: String, lost_before: usize, run_id: String },
    /// A worker paused for less than the worker timeout.
    Paused,
    /// The active scheduler (`scheduler` or `standby`) and the lease holder it was.
    Scheduler { process: &'static str, holder: String },
}

/// The schedulers: the cluster's own (`scheduler`) and a standby, with their APIs.
struct Schedulers {
    standby: Option<Child>,
    standby_port: u16,
    apis: [String; 2],
}

impl Schedulers {
    /// The process (`scheduler` or `standby`) that holds the lease (its key holds
    /// `TERM:HOLDER`), waiting up to 30 s for a holder, with the holder.
    fn active(&self, cluster: &Cluster) -> (&'static str, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(holder) = cluster.lease_holder() {
                match holder_process(cluster, &holder) {
                    Some(process) => return (process, holder),
                    None => assert!(
                        Instant::now() < deadline,
                        "the lease holder {holder:?} is in neither scheduler's log:\n{}",
                        cluster.logs_text()
                    ),
                }
            }
            assert!(Instant::now() < deadline, "no scheduler took the lease within 30 s:\n{}", cluster.logs_text());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pid(&self, cluster: &Cluster, process: &str) -> Option<u32> {
        match process {
            "scheduler" => cluster.scheduler_pid(),
            _ => self.standby.as_ref().map(Child::id),
        }
    }

    /// SIGKILLs `process` and starts it again.
    fn kill_and_restart(&mut self, cluster: &mut Cluster, process: &str) {
        match process {
            "scheduler" => {
                let pid = cluster.scheduler_pid().expect("a scheduler process");
                send("KILL", pid);
                cluster.reap_scheduler();
                cluster.start_scheduler();
            }
            _ => {
                let mut child = self.standby.take().expect("a standby process");
                send("KILL", child.id());
                let _ = child.wait();
                self.standby = Some(cluster.spawn_scheduler_on(self.standby_port, "standby"));
            }
        }
    }
}

/// Which scheduler process's log names `holder` (each process names itself with a fresh id);
/// a holder kept with other fields (a term, say) is matched by its longest part.
fn holder_process(cluster: &Cluster, holder: &str) -> Option<&'static str> {
    let logs = [("scheduler", cluster.log_of("scheduler")), ("standby", cluster.log_of("standby"))];
    let mut parts: Vec<&str> = vec![holder];
    parts.extend(
        holder.split(|c: char| c.is_whitespace() || c == '|' || c == ',' || c == ':').filter(|p| p.len() >= 16),
    );
    for part in parts {
        let found: Vec<&'static str> = logs.iter().filter(|(_, log)| log.contains(part)).map(|(p, _)| *p).collect();
        if found.len() == 1 {
            return Some(found[0]);
        }
    }
    None
}

/// How many times the schedulers logged `worker` as lost.
fn lost_count(cluster: &Cluster, worker: &str) -> usize {
    let needle = format!("worker={worker} ");
    [cluster.log_of("scheduler"), cluster.log_of("standby")]
        .iter()
        .flat_map(|log| log.lines())
        .map(plain)
        .filter(|line| line.contains("worker lost: requeueing its tries") && line.contains(&needle))
        .count()
}

/// Runs a client command against whichever scheduler answers it (the other stands by, or is
/// down), for up to 120 s; answers the first answer that is not "standby" or "unreachable".
fn operator_command(apis: &[String; 2], args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for api in apis {
            let output = dagmq().args(args).env("DAGMQ_API", api).output().expect("run dagmq client");
            // A 4xx is an answer; a 503 (standby), a 500, no connection or no answer (a paused
            // process) is not, nor is a 409 that asks to try again.
            let stderr = text(&output.stderr);
            if output.status.success() || (stderr.contains("(HTTP 4") && !stderr.contains("try again")) {
                return output;
            }
        }
        assert!(Instant::now() < deadline, "no scheduler answered {args:?} within 120 s");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// What the operator did to a run it triggered.
#[derive(Debug, Clone)]
struct Operated {
    run_id: String,
    key: String,
    dag: &'static str,
    /// A cancel that applied (or found the run cancelled already).
    cancelled: bool,
    /// A suspend that applied, then its resume.
    suspended: bool,
}

/// Triggers `dag` with `key` and answers the run id.
fn operator_trigger(apis: &[String; 2], dag: &str, key: &str) -> String {
    let output = operator_command(apis, &["trigger", dag, "--key", key, "--json"]);
    assert!(output.status.success(), "trigger {dag} {key}: {}", text(&output.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    answer["run_id"].as_str().unwrap().to_string()
}

/// Waits (up to 30 s) until the run's `hold` task runs, so the command hits a running try.
fn wait_hold_running(apis: &[String; 2], run_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let output = operator_command(apis, &["runs", "show", run_id, "--json"]);
        if let Ok(run) = serde_json::from_slice::<serde_json::Value>(&output.stdout)
            && run["tasks"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["task_id"] == "hold" && t["state"] == "running"))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The worker running task `task_id` of the run, once it does (at most 30 s).
fn running_worker(apis: &[String; 2], run_id: &str, task_id: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let output = operator_command(apis, &["runs", "show", run_id, "--json"]);
        if let Ok(run) = serde_json::from_slice::<serde_json::Value>(&output.stdout) {
            let task = run["tasks"].as_array().and_then(|t| t.iter().find(|t| t["task_id"] == task_id).cloned());
            if let Some(task) = task
                && task["state"] == "running"
                && let Some(worker) = task["worker"].as_str()
            {
                return Some(worker.to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// The operator: every few seconds a run to cancel and a run to suspend and resume.
fn operator(apis: [String; 2], stop: Arc<AtomicBool>, done: Arc<Mutex<Vec<Operated>>>) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let key = format!("op{n}");
        if n % 2 == 1 {
            let run_id = operator_trigger(&apis, "hold_cancel", &key);
            wait_hold_running(&apis, &run_id);
            let output = operator_command(&apis, &["runs", "cancel", &run_id]);
            let stderr = text(&output.stderr);
            // A cancel whose answer was lost applied: the retry finds the run cancelled.
            let cancelled = output.status.success() || stderr.contains("is already cancelled");
            assert!(cancelled, "cancel {run_id}: {stderr}");
            done.lock().unwrap().push(Operated { run_id, key, dag: "hold_cancel", cancelled, suspended: false });
        } else {
            let run_id = operator_trigger(&apis, "hold_suspend", &key);
            wait_hold_running(&apis, &run_id);
            let output = operator_command(&apis, &["runs", "suspend", &run_id]);
            let stderr = text(&output.stderr);
            let suspended = output.status.success() || stderr.contains("is suspended");
            if suspended {
                let resumed = operator_command(&apis, &["runs", "resume", &run_id]);
                let stderr = text(&resumed.stderr);
                // A resume whose answer was lost applied: the retry finds the run going on.
                assert!(
                    resumed.status.success() || stderr.contains("is running") || stderr.contains("is success"),
                    "resume {run_id}: {stderr}"
                );
            } else {
                // Only a run that ended already may refuse the suspend.
                assert!(stderr.contains("is success"), "suspend {run_id}: {stderr}");
            }
            done.lock().unwrap().push(Operated { run_id, key, dag: "hold_suspend", cancelled: false, suspended });
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// The nemesis: what it stopped, what it did and what it saw.
struct Nemesis {
    rng: Rng,
    /// The faults left in this pass, the next last.
    deck: Vec<Fault>,
    /// How often each kind happened.
    faults: BTreeMap<Fault, u32>,
    /// Processes stopped now, each with when it wakes up.
    stopped: Vec<Stopped>,
    /// Runs of `slow` it triggered (key, run id).
    slow: Vec<(String, String)>,
    /// Runs of `slow` whose worker it froze during the try, with when the worker woke up
    /// (nanoseconds since the epoch, as in the side-effect log).
    frozen: Vec<(String, Option<u128>)>,
    /// Paused active schedulers that woke up to find the other holding the lease.
    takeovers: u32,
}

impl Nemesis {
    fn new(seed: u64) -> Nemesis {
        Nemesis {
            rng: Rng(seed),
            deck: Vec::new(),
            faults: BTreeMap::new(),
            stopped: Vec::new(),
            slow: Vec::new(),
            frozen: Vec::new(),
            takeovers: 0,
        }
    }

    /// Whether the process `pid` is stopped now.
    fn is_stopped(&self, pid: Option<u32>) -> bool {
        pid.is_some_and(|p| self.stopped.iter().any(|s| s.pid == p))
    }

    /// Wakes up the stopped processes that are due (`all`: every one, when it is due), after
    /// checking what their stop was to prove.
    fn wake(&mut self, cluster: &Cluster, all: bool) {
        let now = Instant::now();
        let (due, later): (Vec<Stopped>, Vec<Stopped>) =
            std::mem::take(&mut self.stopped).into_iter().partition(|s| all || s.until <= now);
        self.stopped = later;
        for stopped in due {
            if let Some(wait) = stopped.until.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            match &stopped.what {
                Stop::Frozen { worker, lost_before, run_id } => {
                    // The window is open: a scheduler took the worker for lost while it was
                    // frozen in the middle of a try (the checker shows the try started again).
                    assert!(
                        lost_count(cluster, worker) > *lost_before,
                        "worker {worker} was frozen {WORKER_FREEZE:?} and no scheduler took it for lost:\n{}",
                        cluster.logs_text()
                    );
                    if let Some(frozen) = self.frozen.iter_mut().find(|(id, _)| id == run_id) {
                        frozen.1 = Some(history::now());
                    }
                }
                Stop::Paused => {}
                Stop::Scheduler { process, holder } => {
                    let now_holder = cluster.lease_holder();
                    assert!(
                        now_holder.as_deref() != Some(holder.as_str()),
                        "the {process} scheduler was paused past its lease and still holds it ({holder})"
                    );
                    self.takeovers += 1;
                }
            }
            send("CONT", stopped.pid);
        }
    }

    /// Wakes up what is due, restarts exited workers, and deals the next fault (`left`: the
    /// nemesis' time left).
    fn step(
        &mut self,
        cluster: &mut Cluster,
        schedulers: &mut Schedulers,
        rabbit: &PrivateRabbit,
        redis_port: u16,
        left: Duration,
    ) {
        self.wake(cluster, false);
        cluster.restart_exited_workers();
        let running: Vec<&str> = WORKERS
            .iter()
            .copied()
            .filter(|w| cluster.worker_pid(w).is_some() && !self.is_stopped(cluster.worker_pid(w)))
            .collect();
        if self.deck.is_empty() {
            self.deck = Fault::deck(&mut self.rng);
            self.deck.reverse();
        }
        let fault = self.deck.pop().unwrap();
        let happened = match fault {
            Fault::WorkerFrozen => {
                // Again only when the run it starts can end within the nemesis' time.
                if running.len() < 2 || (self.faults.contains_key(&fault) && left < Duration::from_secs(60)) {
                    false
                } else {
                    // A run of `slow`: its worker is frozen while its try runs.
                    let key = format!("slow{}", self.slow.len() + 1);
                    let run_id = operator_trigger(&schedulers.apis, "slow", &key);
                    self.slow.push((key, run_id.clone()));
                    match running_worker(&schedulers.apis, &run_id, "long") {
                        Some(worker) if running.contains(&worker.as_str()) => {
                            let lost_before = lost_count(cluster, &worker);
                            let pid = cluster.worker_pid(&worker).unwrap();
                            send("STOP", pid);
                            self.frozen.push((run_id.clone(), None));
                            let what = Stop::Frozen { worker, lost_before, run_id };
                            self.stopped.push(Stopped { until: Instant::now() + WORKER_FREEZE, pid, what });
                            true
                        }
                        _ => false,
                    }
                }
            }
            Fault::ActiveSchedulerPaused => {
                if self.stopped.iter().any(|s| matches!(s.what, Stop::Scheduler { .. })) {
                    false
                } else {
                    let (process, holder) = schedulers.active(cluster);
                    let pid = schedulers.pid(cluster, process).unwrap();
                    send("STOP", pid);
                    let what = Stop::Scheduler { process, holder };
                    self.stopped.push(Stopped { until: Instant::now() + SCHEDULER_PAUSE, pid, what });
                    true
                }
            }
            Fault::WorkerKilled | Fault::WorkerTerminated | Fault::WorkerPaused => {
                if running.len() < 2 {
                    false
                } else {
                    let worker = running[self.rng.below(running.len() as u64) as usize];
                    let pid = cluster.worker_pid(worker).unwrap();
                    match fault {
                        Fault::WorkerKilled => send("KILL", pid),
                        Fault::WorkerTerminated => send("TERM", pid),
                        _ => {
                            send("STOP", pid);
                            let until = Instant::now() + Duration::from_secs(5);
                            self.stopped.push(Stopped { until, pid, what: Stop::Paused });
                        }
                    }
                    true
                }
            }
            Fault::ActiveSchedulerKilled | Fault::StandbySchedulerKilled => {
                let (active, _) = schedulers.active(cluster);
                let target = match (fault, active) {
                    (Fault::ActiveSchedulerKilled, process) => process,
                    (_, "scheduler") => "standby",
                    _ => "scheduler",
                };
                if self.is_stopped(schedulers.pid(cluster, target)) {
                    false
                } else {
                    schedulers.kill_and_restart(cluster, target);
                    true
                }
            }
            Fault::BrokerConnectionsClosed => {
                rabbit.ctl(&["close_all_connections", "--vhost", "/", "chaos"]);
                true
            }
            Fault::BrokerRestarted => {
                rabbit.ctl(&["stop_app"]);
                std::thread::sleep(Duration::from_secs(2));
                rabbit.ctl(&["start_app"]);
                rabbit.ctl(&["await_startup"]);
                true
            }
            Fault::RedisSlowed => {
                redis_ok(redis_port, &["DEBUG", "SLEEP", "2"]);
                true
            }
            Fault::RedisPaused => {
                redis_ok(redis_port, &["CLIENT", "PAUSE", "3000"]);
                true
            }
        };
        if happened {
            *self.faults.entry(fault).or_default() += 1;
        } else if !self.faults.contains_key(&fault) {
            // Dealt again later in this pass (a fault that happened already may be left out).
            self.deck.insert(0, fault);
        }
    }
}

#[test]
fn chaos_with_a_history_checker() {
    let secs: u64 = std::env::var("DAGMQ_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = std::env::var("DAGMQ_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    let log: PathBuf = std::env::temp_dir().join(format!("dagmq-chaos-{}-{seed}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let files = dag_files(&log);
    let files: Vec<(&str, &str)> = files.iter().map(|(n, b)| (*n, b.as_str())).collect();
    let Some(mut cluster) = Cluster::new(&files) else { return };
    // A broker and a Redis of the test's own: the nemesis restarts and pauses them.
    let rabbit = PrivateRabbit::start(&std::env::temp_dir().join(format!("{}-rabbit", cluster.namespace)));
    cluster.amqp = rabbit.url();
    let redis_port = free_port();
    let redis = PrivateRedis::start(redis_port, &std::env::temp_dir().join(format!("{}-redis", cluster.namespace)));
    cluster.redis = format!("redis://127.0.0.1:{redis_port}");
    cluster.with_rust_tasks();
    // Pools are the schedulers' (a worker takes no --pool).
    cluster.scheduler_flags(&["--pool", "one=1"]);
    cluster.start_scheduler();
    let standby_port = free_port();
    let mut schedulers = Schedulers {
        standby: Some(cluster.spawn_scheduler_on(standby_port, "standby")),
        standby_port,
        apis: [cluster.api.clone(), format!("http://127.0.0.1:{standby_port}")],
    };
    for name in WORKERS {
        cluster.start_worker(name);
    }
    cluster.wait_for_workers(3);
    eprintln!("chaos: seed {seed}, {secs} s, namespace {}", cluster.namespace);
    let began = Instant::now();

    // The producer: a keyed trigger every 400 ms, every tenth key published twice.
    let stop = Arc::new(AtomicBool::new(false));
    let sent: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let producer = {
        let (amqp, namespace, stop, sent) =
            (cluster.amqp.clone(), cluster.namespace.clone(), stop.clone(), sent.clone());
        let mut rng = Rng(seed.rotate_left(17) | 1);
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
                let total: u64 = TRIGGERED.iter().map(|(_, w)| w).sum();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let mut pick = rng.below(total);
                    let dag = TRIGGERED
                        .iter()
                        .find(|(_, weight)| {
                            let hit = pick < *weight;
                            pick = pick.saturating_sub(*weight);
                            hit
                        })
                        .map_or("chain", |(dag, _)| dag);
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
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
            });
        })
    };
    let operated: Arc<Mutex<Vec<Operated>>> = Arc::new(Mutex::new(Vec::new()));
    let operator_thread = {
        let (apis, stop, operated) = (schedulers.apis.clone(), stop.clone(), operated.clone());
        std::thread::spawn(move || operator(apis, stop, operated))
    };

    // The nemesis: at least `secs`, and until every kind of fault has happened (at most twice
    // as long).
    let mut nemesis = Nemesis::new(seed);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs)
        || (nemesis.faults.len() < Fault::ALL.len() && started.elapsed() < Duration::from_secs(2 * secs))
    {
        std::thread::sleep(Duration::from_millis(2000 + nemesis.rng.below(2000)));
        let left = Duration::from_secs(secs).saturating_sub(started.elapsed());
        nemesis.step(&mut cluster, &mut schedulers, &rabbit, redis_port, left);
    }

    // Healing: triggers and the operator stop, stopped processes wake up, every process runs.
    stop.store(true, Ordering::SeqCst);
    producer.join().unwrap();
    if let Err(panic) = operator_thread.join() {
        std::panic::resume_unwind(panic);
    }
    nemesis.wake(&cluster, true);
    cluster.restart_exited_workers();
    if cluster.scheduler_exited() {
        cluster.reap_scheduler();
        cluster.start_scheduler();
    }
    let sent = sent.lock().unwrap().clone();
    let operated = operated.lock().unwrap().clone();
    let mut wanted: BTreeMap<String, String> = sent.iter().map(|(dag, key)| (key.clone(), dag.clone())).collect();
    wanted.extend(operated.iter().map(|o| (o.key.clone(), o.dag.to_string())));
    wanted.extend(nemesis.slow.iter().map(|(key, _)| (key.clone(), "slow".to_string())));
    let (redis_url, prefix) = (cluster.redis.clone(), cluster.namespace.clone());

    // Every run final, read from the store.
    let deadline = Instant::now() + Duration::from_secs(180);
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
        let keys: BTreeSet<&String> = runs.iter().filter_map(|r| r.key.as_ref()).collect();
        let open: Vec<&str> = runs.iter().filter(|r| !r.state.is_final()).map(|r| r.run_id.as_str()).collect();
        if !runs.is_empty() && open.is_empty() && wanted.keys().all(|k| keys.contains(k)) {
            break (runs, tasks);
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = wanted.keys().filter(|k| !keys.contains(k)).collect();
            panic!("not healed in 180 s: unfinished {open:?}, keys without a run {missing:?}\n{}", cluster.logs_text());
        }
        std::thread::sleep(Duration::from_secs(1));
    };

    let history = history::read(&log);
    let checked = check(&runs, &tasks, &history, &wanted, &operated, &nemesis.frozen);
    // Two copies of a frozen worker's try ran at once: the first (whose worker was frozen) and
    // the one the scheduler requeued.
    let copies_at_once = nemesis
        .frozen
        .iter()
        .filter(|(run_id, _)| {
            let of = |try_number: u32, start: bool| {
                history
                    .iter()
                    .find(|r| r.run == *run_id && r.task == "long" && r.try_number == try_number && r.start == start)
                    .map(|r| r.at)
            };
            matches!((of(2, true), of(1, false)), (Some(second), Some(first_end)) if second < first_end)
        })
        .count();
    let executions = history.iter().filter(|r| r.start).count();
    let successes: usize = tasks.values().flatten().filter(|t| t.state == TaskState::Success).count();
    let mut by_dag: BTreeMap<&str, usize> = BTreeMap::new();
    for run in &runs {
        *by_dag.entry(run.dag_id.as_str()).or_default() += 1;
    }
    let fault_counts: BTreeMap<&str, u32> = nemesis.faults.iter().map(|(f, n)| (f.label(), *n)).collect();
    eprintln!(
        "chaos summary: seed {seed}, {secs} s of faults, {:?} in all; runs {} {by_dag:?}, tasks {}, successful \
         tasks {successes}, executions {executions}; operator: {} cancelled, {} suspended and resumed; faults {} \
         {fault_counts:?}, workers frozen in a try {} ({copies_at_once} with two copies at once), takeovers from a \
         paused scheduler {}; violations {}",
        began.elapsed(),
        runs.len(),
        tasks.values().map(Vec::len).sum::<usize>(),
        operated.iter().filter(|o| o.cancelled).count(),
        operated.iter().filter(|o| o.suspended).count(),
        nemesis.faults.values().sum::<u32>(),
        nemesis.frozen.len(),
        nemesis.takeovers,
        checked.len()
    );
    // The run proves something only if each fault happened, and the workload was all there.
    let missing: Vec<&str> = Fault::ALL.iter().filter(|k| !nemesis.faults.contains_key(k)).map(|k| k.label()).collect();
    assert!(missing.is_empty(), "faults that never happened: {missing:?}");
    assert!(!nemesis.frozen.is_empty(), "no worker was frozen in a try: the two-copies window never opened");
    assert!(nemesis.takeovers >= 1, "no active scheduler was paused past its lease");
    for (dag, _) in TRIGGERED.iter().chain(&[("hold_cancel", 0), ("hold_suspend", 0)]) {
        assert!(by_dag.get(dag).copied().unwrap_or(0) >= 1, "no run of {dag}: {by_dag:?}");
    }
    assert!(operated.iter().any(|o| o.cancelled), "the operator cancelled nothing");
    assert!(operated.iter().any(|o| o.suspended), "the operator suspended nothing");
    assert!(checked.is_empty(), "violations:\n{}", checked.join("\n"));
    if let Some(mut child) = schedulers.standby.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(cluster);
    drop(redis);
    drop(rabbit);
    let _ = std::fs::remove_file(&log);
}

/// The checker: every violation it finds, as a line.
fn check(
    runs: &[RunRecord],
    tasks: &HashMap<String, Vec<TaskInstance>>,
    history: &[Record],
    wanted: &BTreeMap<String, String>,
    operated: &[Operated],
    frozen: &[(String, Option<u128>)],
) -> Vec<String> {
    let mut violations = Vec::new();
    // Every trigger key made exactly one run, of its DAG; no run without a key.
    let mut by_key: BTreeMap<&str, Vec<&RunRecord>> = BTreeMap::new();
    for run in runs {
        match &run.key {
            Some(key) => by_key.entry(key.as_str()).or_default().push(run),
            None => violations.push(format!("run {} has no trigger key", run.run_id)),
        }
    }
    for (key, dag) in wanted {
        match by_key.get(key.as_str()).map(Vec::as_slice) {
            Some([run]) if run.dag_id == *dag => {}
            Some(found) => violations.push(format!(
                "trigger key {key} ({dag}) made {:?}",
                found.iter().map(|r| (&r.run_id, &r.dag_id)).collect::<Vec<_>>()
            )),
            None => violations.push(format!("trigger key {key} made no run")),
        }
    }
    for key in by_key.keys() {
        if !wanted.contains_key(*key) {
            violations.push(format!("a run of key {key}, which nobody sent"));
        }
    }
    let mut records: HashMap<(&str, &str), Vec<&Record>> = HashMap::new();
    for record in history {
        records.entry((record.run.as_str(), record.task.as_str())).or_default().push(record);
    }
    let operated: HashMap<&str, &Operated> = operated.iter().map(|o| (o.run_id.as_str(), o)).collect();
    let mut pool_tries: Vec<(u128, u128, String)> = Vec::new();
    for run in runs {
        let run_tasks = &tasks[&run.run_id];
        let by_id: HashMap<&str, &TaskInstance> = run_tasks.iter().map(|t| (t.task_id.as_str(), t)).collect();
        let mut complain = |what: String| violations.push(format!("{} ({}): {what}", run.run_id, run.dag_id));
        // The end each DAG's semantics give.
        let state_of = |id: &str| by_id.get(id).map(|t| t.state);
        let expected_run = match run.dag_id.as_str() {
            "fails" => RunState::Failed,
            "hold_cancel" if operated.get(run.run_id.as_str()).is_some_and(|o| o.cancelled) => RunState::Cancelled,
            _ => RunState::Success,
        };
        if run.state != expected_run {
            complain(format!("ended {} where its DAG gives {expected_run}", run.state));
        }
        let mut expect = |id: &str, state: TaskState| {
            if state_of(id) != Some(state) {
                complain(format!("task {id} is {:?} where its DAG gives {state}", state_of(id)));
            }
        };
        match run.dag_id.as_str() {
            "chain" => ["c1", "c2", "c3"].iter().for_each(|t| expect(t, TaskState::Success)),
            "retry" => {
                expect("flaky", TaskState::Success);
                expect("tail", TaskState::Success);
            }
            "fails" => {
                expect("boom", TaskState::Failed);
                expect("never", TaskState::UpstreamFailed);
                expect("cleanup", TaskState::Success);
            }
            "branch" => {
                expect("pick", TaskState::Success);
                expect("left", TaskState::Success);
                expect("right", TaskState::Skipped);
                expect("join", TaskState::Success);
            }
            "pooled" => ["p1", "p2"].iter().for_each(|t| expect(t, TaskState::Success)),
            "parts" => {
                ["split", "split.part1", "split.part2", "merge"].iter().for_each(|t| expect(t, TaskState::Success))
            }
            "hold_cancel" => expect("hold", TaskState::Cancelled),
            "slow" => expect("long", TaskState::Success),
            "hold_suspend" => {
                expect("hold", TaskState::Success);
                expect("after_hold", TaskState::Success);
            }
            other => complain(format!("a run of unknown dag {other}")),
        }
        let tries_of = |id: &str| by_id.get(id).map_or(0, |t| t.try_number);
        if run.dag_id == "retry" && tries_of("flaky") < 2 {
            complain(format!("flaky succeeded at try {}, though it fails before try 2", tries_of("flaky")));
        }
        // A worker frozen past the timeout in the middle of `long`: the try was started again
        // elsewhere before the worker woke up.
        if let Some((_, woke)) = frozen.iter().find(|(id, _)| *id == run.run_id) {
            let again = records
                .get(&(run.run_id.as_str(), "long"))
                .into_iter()
                .flatten()
                .any(|r| r.start && r.try_number >= 2 && woke.is_some_and(|woke| r.at < woke));
            if tries_of("long") < 2 || !again {
                complain(format!(
                    "long's worker was frozen past the timeout, yet no other try started meanwhile (stored try {})",
                    tries_of("long")
                ));
            }
        }
        if run.dag_id == "fails" && tries_of("boom") < 2 {
            complain(format!("boom failed for good at try {}, with a retry left", tries_of("boom")));
        }
        if run.dag_id == "parts"
            && let Some(merge) = by_id.get("merge")
            && !["split.part1", "split.part2"].iter().all(|p| merge.after.iter().any(|a| a == p))
        {
            complain(format!("merge does not wait for the follow-ups: after {:?}", merge.after));
        }
        if dagmq_core::state::run_outcome(run_tasks.iter().map(|t| t.state)).is_none() {
            complain("a task is not final".to_string());
        }

        // What really ran, against the store.
        let success_end = |task: &TaskInstance| -> Option<u128> {
            records
                .get(&(run.run_id.as_str(), task.task_id.as_str()))?
                .iter()
                .find(|r| !r.start && r.try_number == task.try_number)
                .map(|r| r.at)
        };
        for task in run_tasks {
            let own = records.get(&(run.run_id.as_str(), task.task_id.as_str())).cloned().unwrap_or_default();
            let starts: Vec<&Record> = own.iter().copied().filter(|r| r.start).collect();
            let mut tries: Vec<u32> = starts.iter().map(|r| r.try_number).collect();
            tries.sort_unstable();
            if tries.windows(2).any(|w| w[0] == w[1]) {
                complain(format!("{}: a try started twice: {tries:?}", task.task_id));
            }
            if let Some(above) = tries.iter().find(|&&t| t > task.try_number) {
                complain(format!("{}: try {above} ran, above the stored try {}", task.task_id, task.try_number));
            }
            match task.state {
                TaskState::Skipped | TaskState::UpstreamFailed if !starts.is_empty() => {
                    complain(format!("{} is {} but ran: tries {tries:?}", task.task_id, task.state));
                }
                TaskState::Success => {
                    let ends = own.iter().filter(|r| !r.start && r.try_number == task.try_number).count();
                    if ends != 1 || !tries.contains(&task.try_number) {
                        complain(format!(
                            "{}: the successful try {} started {} and ended {ends} times in the log",
                            task.task_id,
                            task.try_number,
                            if tries.contains(&task.try_number) { "once" } else { "never" }
                        ));
                    }
                    if let Some(end) = success_end(task) {
                        for late in starts.iter().filter(|r| r.at > end) {
                            complain(format!(
                                "{}: try {} started after the successful try {} had ended",
                                task.task_id, late.try_number, task.try_number
                            ));
                        }
                        if run.dag_id == "pooled"
                            && let Some(start) = starts.iter().find(|r| r.try_number == task.try_number)
                        {
                            pool_tries.push((start.at, end, format!("{}/{}", run.run_id, task.task_id)));
                        }
                    }
                }
                _ => {}
            }
            // No try started before each upstream task had ended: a successful upstream with
            // its successful try, a failed one with its last try (the cleanup task's rule).
            for start in &starts {
                for upstream in task.after.iter() {
                    let Some(up) = by_id.get(upstream.as_str()) else { continue };
                    let ended = match up.state {
                        TaskState::Success | TaskState::Failed => success_end(up),
                        _ => continue,
                    };
                    if ended.is_none_or(|end| end > start.at) {
                        complain(format!(
                            "{} try {} started before upstream {upstream} ({}) had ended",
                            task.task_id, start.try_number, up.state
                        ));
                    }
                }
            }
        }
    }
    // The pool of one slot: no two successful tries of its tasks ran at once.
    pool_tries.sort();
    for pair in pool_tries.windows(2) {
        if pair[1].0 < pair[0].1 {
            violations.push(format!("pool one (1 slot): {} and {} ran at once", pair[0].2, pair[1].2));
        }
    }
    violations
}
