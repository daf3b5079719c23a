//! A distributed installation for one test: its own RabbitMQ vhost and Redis prefix, a
//! scheduler process and worker processes, each of which can be killed and started again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{dagmq, free_port, text};

/// Whether a test that cannot reach a service must fail rather than skip.
pub(crate) fn required() -> bool {
    std::env::var("DAGMQ_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

fn reachable(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).is_ok()
}

fn rabbitmqctl(args: &[&str]) -> Output {
    std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl runs")
}

/// One installation.
pub struct Cluster {
    /// Names the vhost, the Redis prefix and the temp directory.
    pub namespace: String,
    /// The API of the scheduler.
    pub api: String,
    pub amqp: String,
    pub redis: String,
    port: u16,
    dags: PathBuf,
    logs: PathBuf,
    scheduler: Option<Child>,
    workers: HashMap<String, Child>,
    extra: Vec<String>,
    /// Flags of every process started (TLS files, say).
    common: Vec<String>,
    /// Pass the service URLs and the API token in files, never on a command line.
    secret_files: Option<String>,
    /// Environment of the next process started.
    env: Vec<(String, String)>,
    /// Whether a RabbitMQ user and a Redis ACL user of this namespace exist (to delete).
    users: bool,
    /// Held shared by every cluster, exclusively by a test that restarts the broker.
    _broker_lock: std::fs::File,
}

/// The lock that keeps broker restarts away from the other distributed tests.
fn broker_lock(exclusive: bool) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("dagmq-e2e-broker.lock"))
        .unwrap();
    if exclusive {
        file.lock().unwrap()
    } else {
        file.lock_shared().unwrap()
    }
    file
}

impl Cluster {
    /// A vhost and prefix of its own, and DAG files from `dag_files` (name, text); `None` when
    /// the services are unreachable outside CI.
    pub fn new(dag_files: &[(&str, &str)]) -> Option<Cluster> {
        Cluster::create(dag_files, false)
    }

    /// Like `new`, alone on the broker: for tests that stop and start it.
    pub fn new_exclusive(dag_files: &[(&str, &str)]) -> Option<Cluster> {
        Cluster::create(dag_files, true)
    }

    fn create(dag_files: &[(&str, &str)], exclusive: bool) -> Option<Cluster> {
        if !(reachable(5672) && reachable(6379)) {
            assert!(!required(), "RabbitMQ (5672) and Redis (6379) are required (DAGMQ_REQUIRE_SERVICES=1)");
            eprintln!("skipping: RabbitMQ or Redis unreachable");
            return None;
        }
        let lock = broker_lock(exclusive);
        let namespace = format!("dagmq-e2e-{}-{}", std::process::id(), free_port());
        let added = rabbitmqctl(&["add_vhost", &namespace]);
        assert!(added.status.success(), "add_vhost: {}", text(&added.stderr));
        let allowed = rabbitmqctl(&["set_permissions", "-p", &namespace, "guest", ".*", ".*", ".*"]);
        assert!(allowed.status.success(), "set_permissions: {}", text(&allowed.stderr));
        let dir = std::env::temp_dir().join(&namespace);
        let dags = dir.join("dags");
        let logs = dir.join("logs");
        std::fs::create_dir_all(&dags).unwrap();
        std::fs::create_dir_all(&logs).unwrap();
        for (name, body) in dag_files {
            std::fs::write(dags.join(name), body).unwrap();
        }
        let port = free_port();
        Some(Cluster {
            amqp: format!("amqp://guest:guest@127.0.0.1:5672/{namespace}"),
            redis: "redis://127.0.0.1:6379".to_string(),
            api: format!("http://127.0.0.1:{port}"),
            namespace,
            port,
            dags,
            logs,
            scheduler: None,
            workers: HashMap::new(),
            extra: Vec::new(),
            common: Vec::new(),
            secret_files: None,
            env: Vec::new(),
            users: false,
            _broker_lock: lock,
        })
    }

    /// Like `new`, but RabbitMQ and Redis are reached as users of their own with a password (a
    /// RabbitMQ user limited to the vhost, a Redis ACL user limited to the namespace's keys).
    pub fn with_users(dag_files: &[(&str, &str)], password: &str) -> Option<Cluster> {
        let mut cluster = Cluster::new(dag_files)?;
        let user = cluster.namespace.clone();
        let added = rabbitmqctl(&["add_user", &user, password]);
        assert!(added.status.success(), "add_user: {}", text(&added.stderr));
        let allowed = rabbitmqctl(&["set_permissions", "-p", &user, &user, ".*", ".*", ".*"]);
        assert!(allowed.status.success(), "set_permissions: {}", text(&allowed.stderr));
        let acl = std::process::Command::new("redis-cli")
            .args(["ACL", "SETUSER", &user, "on", &format!(">{password}"), &format!("~{user}:*"), "+@all"])
            .output()
            .expect("redis-cli runs");
        assert_eq!(text(&acl.stdout).trim(), "OK", "{}", text(&acl.stderr));
        cluster.amqp = format!("amqp://{user}:{password}@127.0.0.1:5672/{user}");
        cluster.redis = format!("redis://{user}:{password}@127.0.0.1:6379");
        cluster.users = true;
        Some(cluster)
    }

    /// Extra flags for the scheduler.
    pub fn scheduler_flags(&mut self, flags: &[&str]) {
        self.extra = flags.iter().map(|f| f.to_string()).collect();
    }

    /// From now on, processes read the RabbitMQ URL from `--amqp-file`, the Redis URL from
    /// `DAGMQ_REDIS_URL_FILE` and the API token `token` from `DAGMQ_API_TOKEN_FILE`, as a
    /// deployment with mounted secrets would; the CLI reads the token the same way.
    pub fn secrets_in_files(&mut self, token: &str) {
        let dir = self.dags.parent().unwrap().to_path_buf();
        std::fs::write(dir.join("amqp.url"), format!("{}\n", self.amqp)).unwrap();
        std::fs::write(dir.join("redis.url"), format!("{}\n", self.redis)).unwrap();
        std::fs::write(dir.join("api.token"), format!("{token}\n")).unwrap();
        self.secret_files = Some(dir.display().to_string());
    }

    /// Flags for every scheduler and worker started from now on.
    pub fn common_flags(&mut self, flags: &[&str]) {
        self.common = flags.iter().map(|f| f.to_string()).collect();
    }

    /// Environment for the next process started (e.g. `FAILPOINTS`); cleared by each start.
    pub fn next_env(&mut self, env: &[(&str, &str)]) {
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }

    /// Whether the scheduler process has exited (crashed at a fail point, say).
    pub fn scheduler_exited(&mut self) -> bool {
        self.scheduler.as_mut().is_none_or(|child| child.try_wait().ok().flatten().is_some())
    }

    /// Starts another scheduler of this installation with its API on `port` (a standby while
    /// another holds the lease).
    pub fn spawn_scheduler_on(&self, port: u16, name: &str) -> Child {
        self.spawn("scheduler", name, &["--port".to_string(), port.to_string()])
    }

    /// The scheduler's process id.
    pub fn scheduler_pid(&self) -> Option<u32> {
        self.scheduler.as_ref().map(Child::id)
    }

    /// Worker `name`'s process id.
    pub fn worker_pid(&self, name: &str) -> Option<u32> {
        self.workers.get(name).map(Child::id)
    }

    /// Whether worker `name` has exited.
    pub fn worker_exited(&mut self, name: &str) -> bool {
        self.workers.get_mut(name).is_none_or(|child| child.try_wait().ok().flatten().is_some())
    }

    /// Forgets an exited scheduler, so that `start_scheduler` can start another.
    pub fn reap_scheduler(&mut self) {
        if let Some(mut child) = self.scheduler.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&self, role: &str, name: &str, extra: &[String]) -> Child {
        self.spawn_reading(role, name, extra, &self.dags)
    }

    /// Spawns a process that reads the DAG files of `dags`.
    fn spawn_reading(&self, role: &str, name: &str, extra: &[String], dags: &std::path::Path) -> Child {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.logs.join(format!("{name}.log"))).unwrap();
        let mut command = dagmq();
        command.arg(role).arg("--dags").arg(dags);
        match &self.secret_files {
            Some(dir) => {
                command
                    .args(["--amqp-file", &format!("{dir}/amqp.url")])
                    .env("DAGMQ_REDIS_URL_FILE", format!("{dir}/redis.url"))
                    .env("DAGMQ_API_TOKEN_FILE", format!("{dir}/api.token"));
            }
            None => {
                command.args(["--amqp", &self.amqp, "--redis", &self.redis]);
            }
        }
        command
            .args(["--namespace", &self.namespace])
            .args(&self.common)
            .args(extra)
            .env("DAGMQ_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log);
        command.spawn().expect("start dagmq")
    }

    /// Starts the scheduler and waits until its API answers.
    pub fn start_scheduler(&mut self) {
        let mut extra = vec!["--port".to_string(), self.port.to_string()];
        extra.extend(self.extra.clone());
        self.scheduler = Some(self.spawn("scheduler", "scheduler", &extra));
        self.env.clear();
        self.wait_until(Duration::from_secs(60), || self.cli(&["dags", "list"]).status.success());
    }

    /// Starts `dagmq standalone` against the services (scheduler, API and a worker in one process).
    pub fn start_standalone(&mut self) {
        let extra = vec!["--port".to_string(), self.port.to_string()];
        self.scheduler = Some(self.spawn("standalone", "standalone", &extra));
        self.wait_until(Duration::from_secs(60), || self.cli(&["dags", "list"]).status.success());
    }

    /// Starts a worker named `name`.
    pub fn start_worker(&mut self, name: &str) {
        self.start_worker_with(name, &[]);
    }

    /// Starts a worker named `name` with extra flags.
    pub fn start_worker_with(&mut self, name: &str, flags: &[&str]) {
        let mut extra = vec!["--name".to_string(), name.to_string()];
        if !flags.contains(&"--concurrency") {
            extra.extend(["--concurrency".to_string(), "16".to_string()]);
        }
        extra.extend(flags.iter().map(|f| f.to_string()));
        let child = self.spawn("worker", name, &extra);
        self.env.clear();
        self.workers.insert(name.to_string(), child);
    }

    /// Starts a worker named `name` that reads the DAG files of `dags`, a directory of its own
    /// (a host whose copy of the files is updated later than the scheduler's), with extra flags.
    pub fn start_worker_reading(&mut self, name: &str, dags: &std::path::Path, flags: &[&str]) {
        let mut extra = vec!["--name".to_string(), name.to_string()];
        extra.extend(flags.iter().map(|f| f.to_string()));
        let child = self.spawn_reading("worker", name, &extra, dags);
        self.env.clear();
        self.workers.insert(name.to_string(), child);
    }

    /// The directory of the cluster's DAG files.
    pub fn dags_path(&self) -> &std::path::Path {
        &self.dags
    }

    /// SIGKILLs the scheduler.
    pub fn kill_scheduler(&mut self) {
        if let Some(mut child) = self.scheduler.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the scheduler.
    pub fn signal_scheduler(&self, signal: &str) {
        let pid = self.scheduler.as_ref().expect("a running scheduler").id();
        let status =
            std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Sends SIGTERM to a worker and waits for it to exit; answers whether it exited cleanly.
    pub fn terminate_worker(&mut self, name: &str) -> bool {
        let mut child = self.workers.remove(name).expect("a running worker");
        let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        child.wait().unwrap().success()
    }

    /// Restarts every worker that has exited (a supervisor's job); answers how many.
    pub fn restart_exited_workers(&mut self) -> usize {
        let exited: Vec<String> =
            self.workers.iter_mut().filter_map(|(n, c)| c.try_wait().ok().flatten().map(|_| n.clone())).collect();
        for name in &exited {
            self.workers.remove(name);
            self.start_worker(name);
        }
        exited.len()
    }

    /// SIGKILLs a worker.
    pub fn kill_worker(&mut self, name: &str) {
        let mut child = self.workers.remove(name).expect("a running worker");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits until both workers are registered.
    pub fn wait_for_workers(&self, count: usize) {
        self.wait_until(Duration::from_secs(60), || {
            self.json(&["workers"]).as_array().is_some_and(|w| w.len() == count)
        });
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = dagmq();
        if let Some(dir) = &self.secret_files {
            command.env("DAGMQ_API_TOKEN_FILE", format!("{dir}/api.token"));
        }
        command.args(args).env("DAGMQ_API", &self.api).output().unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let output = self.cli(&all);
        assert!(output.status.success(), "{args:?}: {}", text(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    }

    pub fn wait_until(&self, limit: Duration, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !condition() {
            if Instant::now() >= deadline {
                panic!("condition not met within {limit:?}; logs:\n{}", self.logs_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Triggers a DAG through the CLI and answers the run id.
    pub fn trigger(&self, dag_id: &str) -> String {
        self.json(&["trigger", dag_id])["run_id"].as_str().unwrap().to_string()
    }

    /// Waits until task `task_id` of run `run_id` is in `state`.
    pub fn wait_task_state(&self, run_id: &str, task_id: &str, state: &str) {
        self.wait_until(Duration::from_secs(30), || {
            let run = self.json(&["runs", "show", run_id]);
            run["tasks"]
                .as_array()
                .is_some_and(|tasks| tasks.iter().any(|t| t["task_id"] == task_id && t["state"] == state))
        });
    }

    /// Waits for a run to finish and answers it with its tasks.
    pub fn wait_run(&self, run_id: &str, limit: Duration) -> serde_json::Value {
        let mut run = serde_json::Value::Null;
        self.wait_until(limit, || {
            let output = self.cli(&["runs", "show", run_id, "--json"]);
            if !output.status.success() {
                return false;
            }
            run = serde_json::from_slice(&output.stdout).unwrap();
            matches!(run["state"].as_str(), Some("success" | "failed" | "cancelled"))
        });
        run
    }

    /// The processes' logs, for failure messages.
    /// The whole log of process `name` (`scheduler`, a worker's name).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn logs_text(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.logs) {
            for entry in entries.flatten() {
                let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = body.lines().rev().take(40).collect();
                all.push_str(&format!("--- {}\n", entry.path().display()));
                for line in tail.into_iter().rev() {
                    all.push_str(line);
                    all.push('\n');
                }
            }
        }
        all
    }

    /// Runs an async block on a runtime of its own (for direct queue and store access).
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_scheduler();
        for (_, mut child) in self.workers.drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = rabbitmqctl(&["delete_vhost", &self.namespace]);
        if self.users {
            let _ = rabbitmqctl(&["delete_user", &self.namespace]);
            let _ = std::process::Command::new("redis-cli").args(["ACL", "DELUSER", &self.namespace]).output();
        }
        let prefix = self.namespace.clone();
        let redis = self.redis.clone();
        self.block_on(async move {
            if let Ok(store) = dagmq_redis::RedisStore::connect(&redis, &prefix, None).await {
                let _ = store.delete_all().await;
            }
        });
        if let Some(dir) = self.dags.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
