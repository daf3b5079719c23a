//! Liveness calls and large replies (race 8). A store's calls share a few multiplexed
//! connections, and a connection answers in order: a call queued behind a large reply (a sweep
//! reading a big run, a long log) waits until that reply has come through. The lease renewal
//! and the heartbeats must not wait so: a renewal that misses its deadline deposes a healthy
//! scheduler, heartbeats that miss theirs make a healthy worker stop its tries. These tests put
//! a slow link between the store and a Redis of their own, so that a large reply takes seconds
//! to come through, and keep every shared connection busy with one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use dagmq_core::records::WorkerInfo;
use dagmq_core::store::CreateRun;
use dagmq_core::{RunKind, RunRecord, RunState, Store, TaskInstance};
use dagmq_redis::RedisStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::redis_ambiguity::OwnRedis;

/// Bytes a second the slow link passes from Redis to the store, on each connection.
const LINK_RATE: usize = 1_000_000;

/// A TCP proxy in front of Redis that passes each connection's replies at [`LINK_RATE`], as a
/// slow or busy link does; requests pass at once.
struct SlowLink {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    async fn start(redis_port: u16) -> SlowLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else { continue };
                let (mut client_read, client_write) = client.into_split();
                let (server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                tokio::spawn(slowly(server_read, client_write));
            }
        });
        SlowLink { port, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` at [`LINK_RATE`].
async fn slowly(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_secs_f64(n as f64 / LINK_RATE as f64)).await;
    }
    let _ = to.shutdown().await;
}

/// A finished run whose tasks read back as about 4 MB: 4 s through the slow link.
async fn big_run(store: &RedisStore) {
    let now = Utc::now();
    let record = RunRecord {
        run_id: "big".into(),
        dag_id: "big".into(),
        state: RunState::Queued,
        kind: RunKind::Manual,
        logical_date: now,
        params: Default::default(),
        key: None,
        created_at: now,
        started_at: None,
        ended_at: None,
        dag_version: None,
    };
    let tasks: Vec<TaskInstance> = (0..1000)
        .map(|i| {
            let mut task = TaskInstance::pending(format!("t{i}"), Vec::<String>::new(), "default", 0);
            task.output = Some(serde_json::json!("x".repeat(4000)));
            task
        })
        .collect();
    assert_eq!(store.create_run(&record, &tasks).await.unwrap(), CreateRun::Created);
    let done = RunRecord { state: RunState::Success, ended_at: Some(now), ..record };
    assert!(store.transition_run(RunState::Queued, &done).await.unwrap());
}

/// Reads the big run on every shared connection, again and again, until `stop` is set: a
/// sweep of big runs, or a UI reading them.
fn keep_shared_connections_busy(store: &Arc<RedisStore>, stop: &Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let (store, stop) = (store.clone(), stop.clone());
    tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let reads: Vec<_> = (0..dagmq_redis::CONNECTIONS)
                .map(|_| {
                    let store = store.clone();
                    tokio::spawn(async move { store.tasks("big").await.map(|tasks| tasks.len()) })
                })
                .collect();
            for read in reads {
                assert_eq!(read.await.unwrap().unwrap(), 1000);
            }
        }
    })
}

/// How long `call` took.
async fn timed<T>(call: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let answer = call.await;
    (answer, started.elapsed())
}

/// The lease calls, a heartbeat and `now` answer within a third of a 3 s lease (the renewal's
/// deadline) while every shared connection carries a large reply that takes seconds.
#[tokio::test(flavor = "multi_thread")]
async fn liveness_calls_are_not_held_up_by_large_replies() {
    let Some(redis) = OwnRedis::start() else { return };
    let link = SlowLink::start(redis.port).await;
    let store = Arc::new(RedisStore::connect(&link.url(), "live", None).await.unwrap());
    big_run(&store).await;
    // The link is slow for a large reply, and fast for a small one.
    let (_, big) = timed(store.tasks("big")).await;
    assert!(big >= Duration::from_secs(2), "precondition: a read of the big run took {big:?}");
    let (_, small) = timed(store.now()).await;
    assert!(small < Duration::from_millis(300), "precondition: a small call took {small:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let busy = keep_shared_connections_busy(&store, &stop);
    // The reads are on their way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A renewal's deadline: a third of a 3 s lease. The lease itself is longer here, so that
    // every call gets its answer however long it waits.
    let deadline = Duration::from_secs(1);
    let ttl = Duration::from_secs(60);
    let mut took = Vec::new();
    let (lease, time) = timed(store.acquire_lease("s", Utc::now(), ttl)).await;
    let lease = lease.unwrap().expect("a free lease");
    took.push(("acquire_lease", time));
    let (renewed, time) = timed(store.renew_lease(&lease, Utc::now(), ttl)).await;
    assert!(renewed.unwrap(), "the term is in force");
    took.push(("renew_lease", time));
    let worker = WorkerInfo {
        name: "w".into(),
        instance: "w@1".into(),
        host: "h".into(),
        queues: vec!["default".into()],
        concurrency: 1,
        running: Vec::new(),
        started_at: Utc::now(),
        last_heartbeat: Utc::now(),
    };
    let (beat, time) = timed(store.heartbeat(&worker)).await;
    beat.unwrap();
    took.push(("heartbeat", time));
    let (now, time) = timed(store.now()).await;
    assert!(now.unwrap().is_some());
    took.push(("now", time));
    let (released, time) = timed(store.release_lease(&lease)).await;
    released.unwrap();
    took.push(("release_lease", time));
    stop.store(true, Ordering::SeqCst);
    busy.await.unwrap();
    let late: Vec<_> = took.iter().filter(|(_, time)| *time >= deadline).collect();
    assert!(
        late.is_empty(),
        "liveness calls waited behind large replies past a renewal's deadline ({deadline:?}; a read of the big \
         run takes {big:?}): {took:?}"
    );
}

/// A scheduler with a 3 s lease keeps its term while its store's shared connections carry
/// large replies: it is healthy, and must not be deposed.
#[tokio::test(flavor = "multi_thread")]
async fn a_healthy_scheduler_keeps_its_term_while_large_replies_come_through() {
    let Some(redis) = OwnRedis::start() else { return };
    let link = SlowLink::start(redis.port).await;
    let store = Arc::new(RedisStore::connect(&link.url(), "term", None).await.unwrap());
    big_run(&store).await;
    let mut dags = dagmq_core::DagRegistry::new();
    dags.add(
        dagmq_core::Dag::builder("idle")
            .task(dagmq_core::TaskSpec::rust("a", dagmq_worker::Sleep { duration: Duration::from_millis(1) }))
            .build()
            .unwrap(),
    )
    .unwrap();
    let mut config = dagmq_scheduler::SchedulerConfig::new(dags, Arc::new(dagmq_core::SystemClock));
    config.lease_ttl = Duration::from_secs(3);
    let queue: Arc<dyn dagmq_core::Queue> = Arc::new(dagmq_core::memory::MemoryQueue::new());
    let (stop_scheduler, signal) = dagmq_core::CancelSignal::new();
    let (_handle, scheduler) = dagmq_scheduler::spawn(config, queue, store.clone(), signal);
    let lease = || redis.cli(&["GET", "term:scheduler:lease"]).trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lease().is_empty() {
        assert!(Instant::now() < deadline, "the scheduler never took the lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let term = lease();

    let stop = Arc::new(AtomicBool::new(false));
    let busy = keep_shared_connections_busy(&store, &stop);
    let watch_until = Instant::now() + Duration::from_secs(10);
    let mut seen = vec![term.clone()];
    while Instant::now() < watch_until {
        let now = lease();
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    busy.await.unwrap();
    stop_scheduler.cancel();
    scheduler.await.unwrap().unwrap();
    assert_eq!(seen, vec![term], "the healthy scheduler lost its term (the lease key over 10 s; empty: expired)");
}
