//! `dagmq bench`: no-op workloads through a real scheduler and real workers, in one process.
//! Standalone mode uses the in-memory backends; distributed mode (`--amqp`, `--redis`) runs one
//! scheduler and two workers, each with its own RabbitMQ connection and Redis pool, under a
//! namespace of its own, and first measures the raw limit of the broker on the same machine.
//! Prints one machine-readable `bench=...` line per figure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dagmq_core::memory::{MemoryQueue, MemoryStore};
use dagmq_core::store::RunFilter;
use dagmq_core::task::CancelHandle;
use dagmq_core::{CancelSignal, Clock, Dag, DagRegistry, Queue, RunState, Store, SystemClock, TaskSpec, Topic};
use dagmq_rabbitmq::{RabbitConfig, RabbitQueue};
use dagmq_redis::RedisStore;
use dagmq_scheduler::{SchedulerConfig, SchedulerHandle};
use dagmq_worker::{Noop, WorkerConfig};

use crate::cli::{BenchArgs, BenchWorkload};
use crate::{CliError, CliResult};

/// Where a bench runs.
enum Backends {
    /// In memory, one process.
    Memory,
    /// RabbitMQ and Redis under a fresh namespace.
    Services {
        /// RabbitMQ URL.
        amqp: String,
        /// Redis URL.
        redis: String,
        /// Queue and key prefix of this bench.
        namespace: String,
    },
}

impl Backends {
    fn mode(&self) -> &'static str {
        match self {
            Backends::Memory => "standalone",
            Backends::Services { .. } => "distributed",
        }
    }

    /// A queue and a store for one component (each its own connection in distributed mode).
    async fn connect(&self, memory: &(Arc<dyn Queue>, Arc<dyn Store>)) -> CliResult<(Arc<dyn Queue>, Arc<dyn Store>)> {
        match self {
            Backends::Memory => Ok(memory.clone()),
            Backends::Services { amqp, redis, namespace } => {
                let mut config = RabbitConfig::new(amqp.clone());
                config.namespace = namespace.clone();
                config.queue_expires = Some(Duration::from_secs(600));
                let queue = RabbitQueue::connect(config).await.map_err(runtime)?;
                let store = RedisStore::connect(redis, namespace, None).await.map_err(runtime)?;
                Ok((Arc::new(queue), Arc::new(store)))
            }
        }
    }
}

fn runtime(err: impl std::fmt::Display) -> CliError {
    CliError::runtime(err.to_string())
}

/// A scheduler and workers.
struct Rig {
    /// The scheduler.
    handle: SchedulerHandle,
    /// The scheduler's store, to read results.
    store: Arc<dyn Store>,
    /// The scheduler's queue, to publish triggers.
    queue: Arc<dyn Queue>,
    /// Stops everything.
    stop: CancelHandle,
}

impl Rig {
    async fn start(dags: DagRegistry, concurrency: usize, backends: &Backends) -> CliResult<Rig> {
        let memory: (Arc<dyn Queue>, Arc<dyn Store>) = (Arc::new(MemoryQueue::new()), Arc::new(MemoryStore::new()));
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let (stop, signal) = CancelSignal::new();
        let (queue, store) = backends.connect(&memory).await?;
        let (handle, _) = dagmq_scheduler::spawn(
            SchedulerConfig::new(dags.clone(), clock.clone()),
            queue.clone(),
            store.clone(),
            signal.clone(),
        );
        let workers = if matches!(backends, Backends::Memory) { 1 } else { 2 };
        for i in 0..workers {
            let (worker_queue, worker_store) = backends.connect(&memory).await?;
            let mut worker = WorkerConfig::new(format!("bench-worker-{i}"), dags.clone(), clock.clone());
            worker.concurrency = concurrency;
            tokio::spawn(dagmq_worker::run(worker, worker_queue, worker_store, signal.clone()));
        }
        Ok(Rig { handle, store, queue, stop })
    }

    async fn wait_final(&self, run_id: &str) -> CliResult<RunState> {
        loop {
            match self.store.run(run_id).await.map_err(runtime)? {
                Some(run) if run.state.is_final() => return Ok(run.state),
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }
}

/// Runs one workload.
pub(crate) async fn bench(args: &BenchArgs) -> CliResult<()> {
    let backends = match (&args.amqp, &args.redis) {
        (Some(amqp), Some(redis)) => Backends::Services {
            amqp: amqp.clone(),
            redis: redis.clone(),
            namespace: format!("dagmq-bench-{}", std::process::id()),
        },
        _ => Backends::Memory,
    };
    if let Backends::Services { amqp, redis, namespace } = &backends {
        raw_limits(amqp, redis, namespace).await?;
    }
    let result = match args.workload {
        BenchWorkload::Fanout { n } => fanout(n, args.concurrency, &backends).await,
        BenchWorkload::Chain { k } => chain(k, args.concurrency, &backends).await,
        BenchWorkload::Runs { m } => runs(m, args.concurrency, &backends).await,
    };
    if let Backends::Services { amqp, redis, namespace } = &backends {
        cleanup(amqp, redis, namespace).await;
    }
    result
}

/// The broker's own limits on this machine: persistent publishes with confirms consumed and
/// acknowledged on one quorum queue, and a sequential publish-consume-Redis-publish-consume
/// round trip (the floor of one dependency hop).
async fn raw_limits(amqp: &str, redis: &str, namespace: &str) -> CliResult<()> {
    let mut config = RabbitConfig::new(amqp);
    config.namespace = format!("{namespace}-raw");
    config.queue_expires = Some(Duration::from_secs(600));
    let publisher = RabbitQueue::connect(config.clone()).await.map_err(runtime)?;
    let consumer_side = RabbitQueue::connect(config).await.map_err(runtime)?;
    let topic = Topic::Tasks("raw".into());
    let mut consumer = consumer_side.consume(&topic, 1000).await.map_err(runtime)?;
    let total = 10_000usize;
    let started = Instant::now();
    let publish = {
        let publisher = publisher.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for _ in 0..total / 500 {
                publisher.publish_many((0..500).map(|_| (topic.clone(), vec![b'x'; 200])).collect()).await?;
            }
            Ok::<(), dagmq_core::BackendError>(())
        })
    };
    for _ in 0..total {
        let delivery = consumer.next().await.ok_or_else(|| runtime("raw consumer closed"))?.map_err(runtime)?;
        delivery.ack().await.map_err(runtime)?;
    }
    publish.await.map_err(runtime)?.map_err(runtime)?;
    let elapsed = started.elapsed();
    println!(
        "bench=raw_throughput mode=distributed messages={total} elapsed_ms={:.1} msgs_per_s={:.0}",
        elapsed.as_secs_f64() * 1e3,
        total as f64 / elapsed.as_secs_f64()
    );

    let store = RedisStore::connect(redis, &format!("{namespace}-raw"), None).await.map_err(runtime)?;
    let hop_a = Topic::Tasks("hop-a".into());
    let hop_b = Topic::Tasks("hop-b".into());
    let mut consume_a = consumer_side.consume(&hop_a, 10).await.map_err(runtime)?;
    let mut consume_b = consumer_side.consume(&hop_b, 10).await.map_err(runtime)?;
    let mut hops = Vec::new();
    for i in 0..500 {
        let started = Instant::now();
        publisher.publish(&hop_a, b"a".to_vec()).await.map_err(runtime)?;
        let delivery = consume_a.next().await.ok_or_else(|| runtime("closed"))?.map_err(runtime)?;
        delivery.ack().await.map_err(runtime)?;
        store.append_log("raw", "hop", i, &["x".to_string()]).await.map_err(runtime)?;
        publisher.publish(&hop_b, b"b".to_vec()).await.map_err(runtime)?;
        let delivery = consume_b.next().await.ok_or_else(|| runtime("closed"))?.map_err(runtime)?;
        delivery.ack().await.map_err(runtime)?;
        hops.push(started.elapsed().as_secs_f64() * 1e6);
    }
    hops.sort_by(f64::total_cmp);
    println!(
        "bench=raw_round_trip mode=distributed hops={} p50_us={:.1} p99_us={:.1}",
        hops.len(),
        percentile(&hops, 0.5),
        percentile(&hops, 0.99)
    );
    let _ = store.delete_all().await;
    let _ = publisher.delete_topology(&["raw", "hop-a", "hop-b"]).await;
    Ok(())
}

async fn cleanup(amqp: &str, redis: &str, namespace: &str) {
    let mut config = RabbitConfig::new(amqp);
    config.namespace = namespace.to_string();
    config.queue_expires = Some(Duration::from_secs(600));
    if let Ok(queue) = RabbitQueue::connect(config).await {
        let _ = queue.delete_topology(&["default"]).await;
    }
    if let Ok(store) = RedisStore::connect(redis, namespace, None).await {
        let _ = store.delete_all().await;
    }
}

fn registry(dag: Dag) -> DagRegistry {
    let mut registry = DagRegistry::new();
    let _ = registry.add(dag);
    registry
}

fn build(builder: dagmq_core::DagBuilder) -> CliResult<Dag> {
    builder.build().map_err(runtime)
}

async fn fanout(n: usize, concurrency: usize, backends: &Backends) -> CliResult<()> {
    let mut dag = Dag::builder("bench-fanout").task(TaskSpec::rust("root", Noop));
    let ids: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    for id in &ids {
        dag = dag.task(TaskSpec::rust(id.clone(), Noop).after(["root"]));
    }
    dag = dag.task(TaskSpec::rust("sink", Noop).after(ids));
    let rig = Rig::start(registry(build(dag)?), concurrency, backends).await?;
    let run_id = trigger(&rig, "bench-fanout").await?;
    let state = rig.wait_final(&run_id).await?;
    let tasks = rig.store.tasks(&run_id).await.map_err(runtime)?;
    let root = tasks.iter().find(|t| t.task_id == "root");
    let sink = tasks.iter().find(|t| t.task_id == "sink");
    let (Some(start), Some(end)) = (root.and_then(|t| t.started_at), sink.and_then(|t| t.ended_at)) else {
        return Err(CliError::runtime(format!("fanout run ended {state} without timestamps")));
    };
    let elapsed = (end - start).to_std().unwrap_or_default();
    let total = n + 2;
    println!(
        "bench=fanout mode={} n={n} state={state} tasks={total} elapsed_ms={:.1} tasks_per_s={:.0} peak_rss_mb={:.1}",
        backends.mode(),
        elapsed.as_secs_f64() * 1e3,
        total as f64 / elapsed.as_secs_f64().max(1e-9),
        peak_rss_mb()
    );
    rig.stop.cancel();
    Ok(())
}

async fn chain(k: usize, concurrency: usize, backends: &Backends) -> CliResult<()> {
    let k = k.max(2);
    let mut dag = Dag::builder("bench-chain");
    for i in 0..k {
        let mut task = TaskSpec::rust(format!("t{i}"), Noop);
        if i > 0 {
            task = task.after([format!("t{}", i - 1)]);
        }
        dag = dag.task(task);
    }
    let rig = Rig::start(registry(build(dag)?), concurrency, backends).await?;
    let run_id = trigger(&rig, "bench-chain").await?;
    let state = rig.wait_final(&run_id).await?;
    let tasks = rig.store.tasks(&run_id).await.map_err(runtime)?;
    let by_id: std::collections::HashMap<&str, &dagmq_core::TaskInstance> =
        tasks.iter().map(|t| (t.task_id.as_str(), t)).collect();
    let mut hops: Vec<f64> = (1..k)
        .filter_map(|i| {
            let prev = by_id.get(format!("t{}", i - 1).as_str())?.ended_at?;
            let next = by_id.get(format!("t{i}").as_str())?.started_at?;
            Some((next - prev).num_nanoseconds()? as f64 / 1e3)
        })
        .collect();
    hops.sort_by(f64::total_cmp);
    println!(
        "bench=chain mode={} k={k} state={state} hops={} p50_us={:.1} p99_us={:.1} max_us={:.1} peak_rss_mb={:.1}",
        backends.mode(),
        hops.len(),
        percentile(&hops, 0.50),
        percentile(&hops, 0.99),
        hops.last().copied().unwrap_or(0.0),
        peak_rss_mb()
    );
    rig.stop.cancel();
    Ok(())
}

async fn runs(m: usize, concurrency: usize, backends: &Backends) -> CliResult<()> {
    let middle: Vec<String> = (1..=8).map(|i| format!("m{i}")).collect();
    let mut dag = Dag::builder("bench-diamond")
        .max_active_runs(u32::try_from(m.max(1)).unwrap_or(u32::MAX))
        .task(TaskSpec::rust("top", Noop));
    for id in &middle {
        dag = dag.task(TaskSpec::rust(id.clone(), Noop).after(["top"]));
    }
    dag = dag.task(TaskSpec::rust("bottom", Noop).after(middle));
    let rig = Rig::start(registry(build(dag)?), concurrency, backends).await?;
    let started = Instant::now();
    let trigger = br#"{"v":1,"dag_id":"bench-diamond"}"#.to_vec();
    rig.queue.publish_many((0..m).map(|_| (Topic::Triggers, trigger.clone())).collect()).await.map_err(runtime)?;
    let filter = RunFilter { state: Some(RunState::Success), limit: m, ..RunFilter::default() };
    loop {
        let done = rig.store.list_runs(&filter).await.map_err(runtime)?.len();
        if done >= m {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    println!(
        "bench=runs mode={} m={m} tasks={} elapsed_ms={:.1} runs_per_s={:.0} tasks_per_s={:.0} peak_rss_mb={:.1}",
        backends.mode(),
        m * 10,
        elapsed.as_secs_f64() * 1e3,
        m as f64 / elapsed.as_secs_f64().max(1e-9),
        (m * 10) as f64 / elapsed.as_secs_f64().max(1e-9),
        peak_rss_mb()
    );
    rig.stop.cancel();
    Ok(())
}

async fn trigger(rig: &Rig, dag_id: &str) -> CliResult<String> {
    rig.handle.trigger(dag_id, Default::default(), None).await.map(|outcome| outcome.run_id).map_err(runtime)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// This process's peak resident memory, from /proc (0 where that is not available).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
