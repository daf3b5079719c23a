//! A Redis call that times out may still apply: a script runs to its end once the server reads
//! it. These tests give a Redis server of their own (the shared one is never blocked) scripts
//! that outlast a short response timeout, and check that what applied is whole and that a
//! retry finds it. The last one checks how a store shares its connections, and that it
//! connects again when Redis drops them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dagmq_core::store::{CreateRun, RunFilter};
use dagmq_core::{RunKind, RunRecord, RunState, Store, TaskInstance};
use dagmq_redis::{RedisStore, RedisTimeouts};

use crate::services::unavailable;

/// A redis-server of the test's own on a free port, without persistence.
pub(crate) struct OwnRedis {
    child: Child,
    pub(crate) port: u16,
}

impl OwnRedis {
    pub(crate) fn start() -> Option<OwnRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = match Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(err) => {
                unavailable("redis-server", err)?;
                return None;
            }
        };
        let own = OwnRedis { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !own.cli(&["ping"]).contains("PONG") {
            assert!(Instant::now() < deadline, "own redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(own)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_790_000_000 + seconds, 0).unwrap()
}

fn run(id: &str, key: Option<&str>) -> RunRecord {
    RunRecord {
        run_id: id.into(),
        dag_id: "etl".into(),
        state: RunState::Queued,
        kind: RunKind::Manual,
        logical_date: at(0),
        params: Default::default(),
        key: key.map(str::to_string),
        created_at: at(0),
        started_at: None,
        ended_at: None,
        dag_version: Some("v1".to_string()),
    }
}

/// Stores the DAG version the runs of these tests name, as a scheduler does before creating
/// them.
async fn store_version(store: &RedisStore) {
    store.put_dag_version(&crate::store_contract::version("etl", "v1")).await.unwrap();
}

fn tasks(count: usize) -> Vec<TaskInstance> {
    (0..count).map(|i| TaskInstance::pending(format!("t{i}"), Vec::<String>::new(), "default", 0)).collect()
}

/// Waits for `check` with a deadline.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The issue's case: creating a run of 100,000 tasks takes Redis longer than a short response
/// timeout; the client gives up and the outcome is unknown. How long the script takes depends on
/// the machine (on a fast one it answers within 100 ms), so Redis holds writes back for 300 ms
/// (`CLIENT PAUSE ... WRITE`) while the call is sent: the answer always comes too late. The pool
/// then drops the timed-out connection, so the script runs when the pause ends if Redis had the
/// whole call by then, and not at all otherwise (which of the two depends on timing). Either
/// way it is all or nothing, and a retry settles it: told the run exists when it applied (then
/// whole, listed, and seen by recovery), creating it when it did not.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_creation_that_times_out_applies_whole_and_a_retry_finds_it() {
    let Some(redis) = OwnRedis::start() else { return };
    let timeouts = RedisTimeouts { response: Duration::from_millis(100), connect: Duration::from_secs(2) };
    let store = RedisStore::connect_with(&redis.url(), "amb", None, timeouts).await.unwrap();
    store_version(&store).await;
    // Loads the script, so the slow call is one EVALSHA.
    store.create_run(&run("warm-up", None), &tasks(1)).await.unwrap();
    let big = tasks(100_000);

    redis.cli(&["CLIENT", "PAUSE", "300", "WRITE"]);
    let answer = store.create_run(&run("r1", None), &big).await;
    assert!(answer.is_err(), "the call timed out: {answer:?}");
    // A write of the test's own waits out the pause, behind the first call when Redis has it.
    redis.cli(&["SET", "amb:after-the-pause", "1"]);
    let retried = store.create_run(&run("r1", None), &tasks(1)).await.ok();
    let tasks_stored = redis.cli(&["HLEN", "amb:run:{r1}:tasks"]).trim().to_string();
    match retried {
        Some(CreateRun::Exists(id)) => {
            // The first call applied, whole, with its index entries: listings and recovery see it.
            assert_eq!(id, "r1");
            assert_eq!(tasks_stored, "100000");
            let listed = store.list_runs(&RunFilter { limit: 10, ..Default::default() }).await.unwrap();
            assert!(listed.iter().any(|r| r.run_id == "r1"), "listed");
            assert!(store.unfinished_runs().await.unwrap().iter().any(|r| r.run_id == "r1"), "recovery sees it");
        }
        // The first call never applied: nothing of it is left, the run is the retry's.
        Some(CreateRun::Created) => assert_eq!(tasks_stored, "1"),
        other => panic!("the retry answered {other:?}"),
    }

    // A keyed trigger retried under another run id: the key makes one run, the first call's
    // when it applied, else the retry's.
    redis.cli(&["CLIENT", "PAUSE", "300", "WRITE"]);
    assert!(store.create_run(&run("k1", Some("2026-12-01")), &big).await.is_err());
    redis.cli(&["SET", "amb:after-the-pause", "2"]);
    let made = match store.create_run(&run("k2", Some("2026-12-01")), &tasks(1)).await.unwrap() {
        CreateRun::Created => "k2".to_string(),
        CreateRun::Exists(id) => id,
        other => panic!("the keyed retry answered {other:?}"),
    };
    eventually("a later retry told the key's run", async || {
        matches!(store.create_run(&run("k3", Some("2026-12-01")), &tasks(1)).await, Ok(CreateRun::Exists(id)) if id == made)
    })
    .await;
    let other = if made == "k1" { "k2" } else { "k1" };
    assert!(store.run(other).await.unwrap().is_none(), "one run for the key, {made}");
    assert!(store.run("k3").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_is_one_step_and_a_finished_run_leaves_the_unfinished_index_with_it() {
    let Some(redis) = OwnRedis::start() else { return };
    let store = RedisStore::connect(&redis.url(), "amb", None).await.unwrap();
    store_version(&store).await;
    let mut record = run("r", None);
    store.create_run(&record, &tasks(2)).await.unwrap();
    record.state = RunState::Failed;
    assert!(store.transition_run(RunState::Queued, &record).await.unwrap());
    assert!(store.unfinished_runs().await.unwrap().is_empty());
    let mut failed = store.task("r", "t0").await.unwrap().unwrap();
    failed.state = dagmq_core::TaskState::Failed;
    assert!(store.transition_task("r", dagmq_core::TaskState::Pending, 0, &failed).await.unwrap());
    let mut reset = failed.clone();
    reset.state = dagmq_core::TaskState::Pending;
    let change =
        dagmq_core::store::TaskChange { expected_state: dagmq_core::TaskState::Failed, expected_try: 0, task: reset };
    let mut restarted = record.clone();
    restarted.state = RunState::Running;
    // Refused as a whole when the run is not in the expected state...
    assert!(
        !store.transition_run_with_tasks(RunState::Success, &restarted, std::slice::from_ref(&change)).await.unwrap()
    );
    assert_eq!(store.task("r", "t0").await.unwrap().unwrap().state, dagmq_core::TaskState::Failed);
    // ...and applied as a whole, index entry included, when it is.
    assert!(store.transition_run_with_tasks(RunState::Failed, &restarted, &[change]).await.unwrap());
    assert_eq!(store.task("r", "t0").await.unwrap().unwrap().state, dagmq_core::TaskState::Pending);
    assert_eq!(store.unfinished_runs().await.unwrap().len(), 1);
}

/// A clock some seconds behind the real one.
struct Behind(chrono::Duration);

#[dagmq_core::async_trait]
impl dagmq_core::Clock for Behind {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() - self.0
    }
    async fn sleep_until(&self, at: DateTime<Utc>) {
        dagmq_core::SystemClock.sleep_until(at + self.0).await;
    }
}

/// Worker liveness is judged by Redis's clock: a worker whose clock is 30 s behind the
/// scheduler's (with a 20 s worker timeout) is not taken for lost, and its try runs once.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_clock_is_30s_behind_is_not_taken_for_lost() {
    let Some(redis) = OwnRedis::start() else { return };
    let store: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(RedisStore::connect(&redis.url(), "clock", None).await.unwrap());
    let queue: std::sync::Arc<dyn dagmq_core::Queue> = std::sync::Arc::new(dagmq_core::memory::MemoryQueue::new());
    let mut dags = dagmq_core::DagRegistry::new();
    dags.add(
        dagmq_core::Dag::builder("slow")
            .task(dagmq_core::TaskSpec::rust("a", dagmq_worker::Sleep { duration: Duration::from_secs(3) }))
            .build()
            .unwrap(),
    )
    .unwrap();
    let mut config = dagmq_scheduler::SchedulerConfig::new(dags.clone(), std::sync::Arc::new(dagmq_core::SystemClock));
    config.zombie_check_interval = Duration::from_millis(200);
    let (stop_scheduler, scheduler_signal) = dagmq_core::CancelSignal::new();
    let (handle, scheduler) = dagmq_scheduler::spawn(config, queue.clone(), store.clone(), scheduler_signal);
    let mut worker =
        dagmq_worker::WorkerConfig::new("w", dags, std::sync::Arc::new(Behind(chrono::Duration::seconds(30))));
    worker.heartbeat_interval = Duration::from_millis(500);
    let (stop_worker, worker_signal) = dagmq_core::CancelSignal::new();
    let worker = tokio::spawn(dagmq_worker::run(worker, queue, store.clone(), worker_signal));

    let deadline = Instant::now() + Duration::from_secs(30);
    let run_id = loop {
        match handle.trigger("slow", Default::default(), None).await {
            Ok(outcome) => break outcome.run_id,
            Err(err) => assert!(Instant::now() < deadline, "no scheduler: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eventually("the run finished", async || {
        store.run(&run_id).await.is_ok_and(|r| r.is_some_and(|r| r.state.is_final()))
    })
    .await;
    let task = store.task(&run_id, "a").await.unwrap().unwrap();
    assert_eq!((task.state, task.try_number, task.interruptions), (dagmq_core::TaskState::Success, 1, 0));
    stop_worker.cancel();
    worker.await.unwrap().unwrap();
    stop_scheduler.cancel();
    scheduler.await.unwrap().unwrap();
}

/// The clients connected to `redis` besides the `redis-cli` that asks.
fn store_connections(redis: &OwnRedis) -> usize {
    let info = redis.cli(&["INFO", "clients"]);
    let connected = info
        .lines()
        .find_map(|line| line.strip_prefix("connected_clients:"))
        .and_then(|count| count.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no client count in {info:?}"));
    connected - 1
}

/// A store's calls share a few multiplexed connections: 400 calls at once open no more than
/// `dagmq_redis::CONNECTIONS` (a pool that hands each call a connection of its own opens one
/// per concurrent call, up to its size, and pipelines nothing). When Redis drops them, the
/// calls that were on them fail and later calls connect again; when it drops them while they
/// are idle, no call fails.
#[tokio::test(flavor = "multi_thread")]
async fn calls_share_a_few_connections_and_a_dropped_one_is_made_again() {
    let Some(redis) = OwnRedis::start() else { return };
    let store = std::sync::Arc::new(RedisStore::connect(&redis.url(), "conns", None).await.unwrap());
    store_version(&store).await;
    for i in 0..40 {
        store.create_run(&run(&format!("r{i}"), None), &tasks(3)).await.unwrap();
    }
    let calls: Vec<_> = (0..400)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.tasks(&format!("r{}", i % 40)).await.map(|tasks| tasks.len()) })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), 3);
    }
    let connections = store_connections(&redis);
    assert!(
        (1..=dagmq_redis::CONNECTIONS).contains(&connections),
        "{connections} connections for 400 concurrent calls"
    );

    // Redis drops every connection but the asking one (`SKIPME yes` is the default).
    assert!(redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]).trim().parse::<usize>().unwrap() >= 1);
    let mut failed = 0;
    eventually("the store answers again", async || {
        let answer = store.run("r1").await;
        failed += usize::from(answer.is_err());
        answer.is_ok_and(|run| run.is_some())
    })
    .await;
    assert!(failed <= dagmq_redis::CONNECTIONS, "{failed} calls failed after the connections were dropped");
    for i in 0..40 {
        assert_eq!(store.tasks(&format!("r{i}")).await.unwrap().len(), 3);
    }
    assert!((1..=dagmq_redis::CONNECTIONS).contains(&store_connections(&redis)));

    // Dropped while idle (a server's idle timeout, a restart between calls): the check before
    // the next call finds it, and no call fails.
    assert!(redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]).trim().parse::<usize>().unwrap() >= 1);
    tokio::time::sleep(dagmq_redis::IDLE_CHECK_AFTER + Duration::from_millis(500)).await;
    for i in 0..40 {
        let answer = store.tasks(&format!("r{i}")).await;
        assert_eq!(answer.map(|tasks| tasks.len()), Ok(3), "call {i} after an idle drop");
    }
}

/// With `--redis-replicas 1`, a write that no replica acknowledges within `REPLICA_WAIT` is
/// an error (unknown), never "not applied": it applied on the primary, and a retry finds it.
/// Once a replica follows, the same writes answer at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_no_replica_acknowledges_in_time_is_unknown_and_a_retry_finds_it_applied() {
    let Some(primary) = OwnRedis::start() else { return };
    let plain = RedisStore::connect(&primary.url(), "wait", None).await.unwrap();
    store_version(&plain).await;
    let options = dagmq_redis::RedisOptions { replicas: 1, ..Default::default() };
    let endpoint = dagmq_redis::RedisEndpoint::Url(primary.url());
    let waiting = RedisStore::open(&endpoint, "wait", None, &options).await.unwrap();

    let started = Instant::now();
    let answer = waiting.create_run(&run("w1", None), &tasks(3)).await;
    let error = answer.expect_err("no replica has the write");
    assert!(error.message.contains("unknown") && error.message.contains("WAIT"), "{}", error.message);
    assert!(started.elapsed() >= dagmq_redis::REPLICA_WAIT, "answered after {:?}", started.elapsed());
    assert!(plain.run("w1").await.unwrap().is_some(), "the write applied on the primary");
    assert!(matches!(plain.create_run(&run("w1", None), &tasks(3)).await, Ok(CreateRun::Exists(id)) if id == "w1"));

    let Some(replica) = OwnRedis::start() else { return };
    // The initial sync goes over the socket, so neither server writes an RDB file where the
    // test runs.
    assert!(primary.cli(&["CONFIG", "SET", "repl-diskless-sync", "yes"]).contains("OK"));
    assert!(primary.cli(&["CONFIG", "SET", "repl-diskless-sync-delay", "0"]).contains("OK"));
    assert!(replica.cli(&["CONFIG", "SET", "repl-diskless-load", "swapdb"]).contains("OK"));
    assert!(replica.cli(&["REPLICAOF", "127.0.0.1", &primary.port.to_string()]).contains("OK"));
    eventually("the replica in sync", async || replica.cli(&["INFO", "replication"]).contains("master_link_status:up"))
        .await;
    let started = Instant::now();
    assert!(matches!(waiting.create_run(&run("w2", None), &tasks(3)).await, Ok(CreateRun::Created)));
    assert!(started.elapsed() < Duration::from_secs(1), "answered after {:?}", started.elapsed());
    assert_eq!(replica.cli(&["EXISTS", "wait:run:{w2}:meta"]).trim(), "1", "the replica has it");
}
