//! A distributed installation for one test: its own RabbitMQ vhost and Redis prefix, a
//! scheduler process and worker processes, each of which can be killed and started again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{dagmq, dagmq_with_rust_tasks, free_port, text};

/// Whether a test that cannot reach a service must fail rather than skip: with
/// `DAGMQ_REQUIRE_SERVICES` set (to anything but `0`), and in CI (`CI` set to anything but
/// `false` or `0`; CI systems set it to `true`, `1`, `yes` or their own name).
pub(crate) fn required() -> bool {
    let set = |name: &str, off: &[&str]| {
        std::env::var(name)
            .is_ok_and(|v| !v.trim().is_empty() && !off.contains(&v.trim().to_ascii_lowercase().as_str()))
    };
    set("DAGMQ_REQUIRE_SERVICES", &["0"]) || set("CI", &["false", "0"])
}

/// The RabbitMQ URL of the tests (`DAGMQ_AMQP_URL`, by default the local broker's `/` vhost).
pub(crate) fn amqp_url() -> String {
    std::env::var("DAGMQ_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// The Redis URL of the tests (`DAGMQ_REDIS_URL`, by default the local Redis).
pub(crate) fn redis_url() -> String {
    std::env::var("DAGMQ_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A service URL in parts: `scheme://[user[:password]@]host:port[/path]`.
pub(crate) struct ServiceUrl {
    pub scheme: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// `host:port`.
    pub address: String,
}

impl ServiceUrl {
    /// Parses `url`; `default_port` when it names none.
    pub(crate) fn parse(url: &str, default_port: u16) -> ServiceUrl {
        let (scheme, rest) =
            url.split_once("://").unwrap_or_else(|| panic!("not a URL: {}", dagmq_core::mask_url(url)));
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
            Some((user, password)) => {
                (Some(user.to_string()).filter(|u| !u.is_empty()), Some(password.to_string()).filter(|p| !p.is_empty()))
            }
            None => (None, None),
        };
        let address = if host.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
            host.to_string()
        } else {
            format!("{host}:{default_port}")
        };
        ServiceUrl { scheme: scheme.to_string(), user, password, address }
    }

    /// The URL with other credentials and `path` (`/vhost`, or empty).
    pub(crate) fn with(&self, user: Option<&str>, password: Option<&str>, path: &str) -> String {
        let userinfo = match (user, password) {
            (Some(user), Some(password)) => format!("{user}:{password}@"),
            (Some(user), None) => format!("{user}@"),
            (None, Some(password)) => format!(":{password}@"),
            (None, None) => String::new(),
        };
        format!("{}://{userinfo}{}{path}", self.scheme, self.address)
    }
}

/// Whether something answers on `address` (`host:port`) within 2 s.
fn reachable(address: &str) -> bool {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .is_ok_and(|mut addrs| addrs.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()))
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
    /// Start processes as `dagmq` with the tests' Rust tasks (`app.rs`).
    rust_tasks: bool,
    /// Whether the vhost is this cluster's own on the shared broker (to delete).
    own_vhost: bool,
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
        let (amqp, redis) = (ServiceUrl::parse(&amqp_url(), 5672), redis_url());
        let redis_address = ServiceUrl::parse(&redis, 6379).address;
        if !(reachable(&amqp.address) && reachable(&redis_address)) {
            let what = format!("RabbitMQ ({}) and Redis ({redis_address})", amqp.address);
            assert!(!required(), "{what} are required (DAGMQ_REQUIRE_SERVICES or CI is set)");
            eprintln!("skipping: {what} unreachable");
            return None;
        }
        let lock = broker_lock(exclusive);
        let namespace = format!("dagmq-e2e-{}-{}", std::process::id(), free_port());
        // The vhost is made with `rabbitmqctl`, which reaches the broker of this machine.
        let added = rabbitmqctl(&["add_vhost", &namespace]);
        assert!(added.status.success(), "add_vhost: {}", text(&added.stderr));
        let user = amqp.user.clone().unwrap_or_else(|| "guest".to_string());
        let allowed = rabbitmqctl(&["set_permissions", "-p", &namespace, &user, ".*", ".*", ".*"]);
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
            amqp: amqp.with(amqp.user.as_deref(), amqp.password.as_deref(), &format!("/{namespace}")),
            redis,
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
            rust_tasks: false,
            own_vhost: true,
            _broker_lock: lock,
        })
    }

    /// Like `new`, but on a broker the test started itself (`amqp`, one URL or a list), with
    /// its queues under the namespace in the URL's vhost; the shared broker is not touched.
    /// `None` when Redis is unreachable outside CI.
    pub fn on_broker(dag_files: &[(&str, &str)], amqp: &str) -> Option<Cluster> {
        let redis = redis_url();
        let redis_address = ServiceUrl::parse(&redis, 6379).address;
        if !reachable(&redis_address) {
            assert!(!required(), "Redis ({redis_address}) is required (DAGMQ_REQUIRE_SERVICES or CI is set)");
            eprintln!("skipping: Redis ({redis_address}) unreachable");
            return None;
        }
        let namespace = format!("dagmq-e2e-{}-{}", std::process::id(), free_port());
        let dir = std::env::temp_dir().join(&namespace);
        let (dags, logs) = (dir.join("dags"), dir.join("logs"));
        std::fs::create_dir_all(&dags).unwrap();
        std::fs::create_dir_all(&logs).unwrap();
        for (name, body) in dag_files {
            std::fs::write(dags.join(name), body).unwrap();
        }
        let port = free_port();
        Some(Cluster {
            amqp: amqp.to_string(),
            redis,
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
            rust_tasks: false,
            own_vhost: false,
            _broker_lock: broker_lock(false),
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
            .args(["-u", &cluster.redis])
            .args(["ACL", "SETUSER", &user, "on", &format!(">{password}"), &format!("~{user}:*"), "+@all"])
            .output()
            .expect("redis-cli runs");
        assert_eq!(text(&acl.stdout).trim(), "OK", "{}", text(&acl.stderr));
        let (amqp, redis) = (ServiceUrl::parse(&cluster.amqp, 5672), ServiceUrl::parse(&cluster.redis, 6379));
        cluster.amqp = amqp.with(Some(&user), Some(password), &format!("/{user}"));
        cluster.redis = redis.with(Some(&user), Some(password), "");
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
        let mut extra = vec!["--port".to_string(), port.to_string()];
        extra.extend(self.extra.clone());
        self.spawn("scheduler", name, &extra)
    }

    /// The scheduler's process id.
    pub fn scheduler_pid(&self) -> Option<u32> {
        self.scheduler.as_ref().map(Child::id)
    }

    /// Worker `name`'s process id.
    pub fn worker_pid(&self, name: &str) -> Option<u32> {
        self.workers.get(name).map(Child::id)
    }

    /// How the scheduler process ended, once it has.
    pub fn scheduler_status(&mut self) -> Option<std::process::ExitStatus> {
        self.scheduler.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// How worker `name`'s process ended, once it has.
    pub fn worker_status(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        self.workers.get_mut(name).and_then(|child| child.try_wait().ok().flatten())
    }

    /// The whole log of process `name` (`scheduler`, a worker's name, ...), every start of it
    /// appended.
    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Messages ready and unacknowledged in each queue of the vhost, by name. A listing that
    /// fails, or a line that does not read as counts, fails the test: counts never default to 0.
    pub fn queue_counts(&self) -> std::collections::BTreeMap<String, (u64, u64)> {
        let output = rabbitmqctl(&[
            "list_queues",
            "-p",
            &self.namespace,
            "--quiet",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        assert!(output.status.success(), "rabbitmqctl list_queues: {}", text(&output.stderr));
        let listing = text(&output.stdout);
        listing
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let parts: Vec<&str> = line.split_whitespace().collect();
                let count = |i: usize| -> u64 {
                    parts.get(i).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad queue line {line:?}"))
                };
                assert_eq!(parts.len(), 3, "bad queue line {line:?}");
                (parts[0].to_string(), (count(1), count(2)))
            })
            .collect()
    }

    /// Messages ready and unacknowledged in queue `name` (`dagmq.triggers`, with or without the
    /// namespace's prefix), which must exist.
    pub fn queue_count(&self, name: &str) -> (u64, u64) {
        let counts = self.queue_counts();
        let suffix = format!(".{name}");
        let found = counts.iter().find(|(queue, _)| *queue == name || queue.ends_with(&suffix));
        *found.unwrap_or_else(|| panic!("no queue {name} in {counts:?}")).1
    }

    /// The scheduler lease's holder, as Redis has it (`None` while nobody holds it). A Redis
    /// that does not answer fails the test.
    pub fn lease_holder(&self) -> Option<String> {
        let key = format!("{}:scheduler:lease", self.namespace);
        let redis_cli = |args: &[&str]| {
            let output = std::process::Command::new("redis-cli")
                .args(["-u", &self.redis, "--no-auth-warning"])
                .args(args)
                .output()
                .expect("redis-cli runs");
            assert!(output.status.success(), "redis-cli {args:?}: {}", text(&output.stderr));
            text(&output.stdout).trim().to_string()
        };
        let mut value = redis_cli(&["GET", &key]);
        if value.starts_with("WRONGTYPE") {
            // A lease kept as a hash (holder and term, say): all its values, one a line.
            value = redis_cli(&["HGETALL", &key]);
        }
        assert!(!value.starts_with("ERR") && !value.starts_with("NOAUTH"), "redis-cli GET {key}: {value}");
        Some(value).filter(|v| !v.is_empty())
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
        let mut args = vec![role.to_string(), "--dags".to_string(), dags.display().to_string()];
        match &self.secret_files {
            Some(dir) => args.extend(["--amqp-file".to_string(), format!("{dir}/amqp.url")]),
            None => args.extend(["--amqp".to_string(), self.amqp.clone(), "--redis".to_string(), self.redis.clone()]),
        }
        args.extend(["--namespace".to_string(), self.namespace.clone()]);
        args.extend(self.common.iter().cloned());
        args.extend(extra.iter().cloned());
        let mut command = if self.rust_tasks {
            dagmq_with_rust_tasks(&args)
        } else {
            let mut command = dagmq();
            command.args(&args);
            command
        };
        if let Some(dir) = &self.secret_files {
            command
                .env("DAGMQ_REDIS_URL_FILE", format!("{dir}/redis.url"))
                .env("DAGMQ_API_TOKEN_FILE", format!("{dir}/api.token"));
        }
        command
            .env("DAGMQ_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log);
        command.spawn().expect("start dagmq")
    }

    /// From now on, processes are `dagmq` with the tests' Rust tasks (`app.rs`).
    pub fn with_rust_tasks(&mut self) {
        self.rust_tasks = true;
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

    /// The whole log of process `name` (`scheduler`, a worker's name).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The processes' logs, for failure messages.
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
        if self.own_vhost {
            let _ = rabbitmqctl(&["delete_vhost", &self.namespace]);
        }
        if self.users {
            let _ = rabbitmqctl(&["delete_user", &self.namespace]);
            let _ = std::process::Command::new("redis-cli")
                .args(["-u", &redis_url(), "ACL", "DELUSER", &self.namespace])
                .output();
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
