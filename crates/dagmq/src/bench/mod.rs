//! `dagmq bench`: no-op workloads through a real scheduler and real workers.
//! Standalone mode runs everything in one process over the in-memory backends. Distributed mode
//! (`--amqp`, `--redis`) runs the scheduler in this process and two worker processes (this
//! binary again, with the hidden `--worker-of`), each with its own RabbitMQ connection and Redis
//! pool, under a namespace of their own; it first measures the raw limit of the broker on the
//! same machine. The peak RSS printed is this process's: in distributed mode, the scheduler's.
//! Prints one machine-readable `bench=...` line per figure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use dagmq_core::memory::{MemoryQueue, MemoryStore};
use dagmq_core::store::RunFilter;
use dagmq_core::task::CancelHandle;
use dagmq_core::{CancelSignal, Clock, Dag, DagRegistry, Queue, RunState, Store, SystemClock, TaskSpec, Topic};
use dagmq_rabbitmq::{RabbitConfig, RabbitQueue};
use dagmq_redis::RedisStore;
use dagmq_scheduler::{SchedulerConfig, SchedulerHandle};
use dagmq_worker::{Noop, WORK_WAITING_BUCKETS, WorkerConfig, WorkerMetrics};

use crate::cli::{BenchArgs, BenchWorkload};
use crate::{CliError, CliResult};

mod history;
mod limits;

use history::history;
use limits::{cleanup, raw_limits, store_ceiling};

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
        /// Finished runs seeded into the store before the figure (`bench history`).
        history: usize,
    },
}

impl Backends {
    /// The mode of a bench line, with the history it ran with where one was seeded.
    fn mode(&self) -> String {
        match self {
            Backends::Memory => "standalone".to_string(),
            Backends::Services { history: 0, .. } => "distributed".to_string(),
            Backends::Services { history, .. } => format!("distributed history_runs={history}"),
        }
    }

    /// The CPU time Redis has used since it started (seconds), in distributed mode; read
    /// before and after a figure, its cost to Redis (other clients of that Redis count too).
    async fn redis_cpu(&self) -> Option<f64> {
        let Backends::Services { redis, .. } = self else { return None };
        let store = RedisStore::connect(redis, "dagmq-bench-probe", None).await.ok()?;
        store.server_cpu_seconds().await.ok()
    }

    /// A queue and a store for one component (each its own connection in distributed mode).
    async fn connect(&self, memory: &(Arc<dyn Queue>, Arc<dyn Store>)) -> CliResult<(Arc<dyn Queue>, Arc<dyn Store>)> {
        match self {
            Backends::Memory => Ok(memory.clone()),
            Backends::Services { amqp, redis, namespace, .. } => {
                let mut config = RabbitConfig::new(amqp.clone());
                config.namespace = namespace.clone();
                config.queue_expires = Some(Duration::from_secs(600));
                let queue = RabbitQueue::connect(config).await.map_err(runtime)?;
                // `DAGMQ_REDIS_REPLICAS` (inherited by the worker processes) measures the cost of
                // waiting for replicas, as the serving commands' `--redis-replicas` does.
                let replicas = std::env::var("DAGMQ_REDIS_REPLICAS").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
                let options = dagmq_redis::RedisOptions { replicas, ..Default::default() };
                let endpoint = dagmq_redis::RedisEndpoint::Url(redis.clone());
                let store = RedisStore::open(&endpoint, namespace, None, &options).await.map_err(runtime)?;
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
    /// Stops everything in this process.
    stop: CancelHandle,
    /// Worker processes (distributed mode); they stop when their standard input closes.
    children: Vec<std::process::Child>,
    /// This process's resident memory once everything runs, before any work (MB).
    base_rss_mb: f64,
    /// The in-process worker's metrics (standalone mode).
    worker_metrics: Option<Arc<WorkerMetrics>>,
}

impl Rig {
    async fn start(args: &BenchArgs, dags: DagRegistry, backends: &Backends) -> CliResult<Rig> {
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
        let mut children = Vec::new();
        let worker_metrics;
        match backends {
            Backends::Memory => {
                let mut worker = WorkerConfig::new("bench-worker-0", dags, clock);
                worker.concurrency = args.concurrency;
                worker.eager = !args.no_eager;
                // As `dagmq standalone` does over its in-memory queue.
                worker.eager_claims = 1;
                worker.batch_status = false;
                // The only worker of an in-memory queue: there is nobody to leave work to.
                worker.prefetch = u16::MAX;
                worker_metrics = Some(worker.metrics.clone());
                tokio::spawn(dagmq_worker::run(worker, queue.clone(), store.clone(), signal.clone()));
            }
            Backends::Services { amqp, redis, namespace, .. } => {
                for i in 0..2 {
                    children.push(spawn_worker_process(args, amqp, redis, namespace, i)?);
                }
                let rig = Rig { handle, store, queue, stop, children, base_rss_mb: 0.0, worker_metrics: None };
                if let Err(err) = wait_for_workers(&rig.store, rig.children.len()).await {
                    rig.stop();
                    return Err(err);
                }
                return Ok(Rig { base_rss_mb: rss_mb("VmRSS:"), ..rig });
            }
        }
        Ok(Rig { handle, store, queue, stop, children, base_rss_mb: rss_mb("VmRSS:"), worker_metrics })
    }

    async fn wait_final(&self, run_id: &str) -> CliResult<RunState> {
        loop {
            match self.store.run(run_id).await.map_err(runtime)? {
                Some(run) if run.state.is_final() => return Ok(run.state),
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    /// The memory figures of a bench line: this process's peak resident memory, its resident
    /// memory before the run, and the growth between the two per task of the run.
    fn memory(&self, tasks: usize) -> String {
        let peak = rss_mb("VmHWM:");
        let per_task = (peak - self.base_rss_mb).max(0.0) * 1024.0 * 1024.0 / tasks.max(1) as f64;
        format!(
            "peak_rss_mb={peak:.1} base_rss_mb={:.1} bytes_per_task={per_task:.0} rss_mb={:.1}",
            self.base_rss_mb,
            rss_mb("VmRSS:")
        )
    }

    /// Stops the scheduler and in-process worker, and ends the worker processes. Answers the
    /// work waiting figures of every worker (` work_waiting_p50_us=... work_waiting_p99_us=...`,
    /// interpolated in the histogram's buckets), or nothing when no try started from a message,
    /// then the worker processes' window (` window=N`, each worker's if they differ).
    fn stop(mut self) -> String {
        self.stop.cancel();
        let mut counts = vec![0u64; WORK_WAITING_BUCKETS.len() + 1];
        let mut windows: Vec<String> = Vec::new();
        if let Some(metrics) = &self.worker_metrics {
            add_bucket_counts(&mut counts, &metrics.work_waiting_text());
        }
        for child in &mut self.children {
            drop(child.stdin.take());
            // A worker process prints its histogram as it ends; one that does not end soon is
            // killed, and counts for nothing.
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            let mut text = String::new();
            if let Some(mut out) = child.stdout.take() {
                let _ = std::io::Read::read_to_string(&mut out, &mut text);
            }
            add_bucket_counts(&mut counts, &text);
            windows.extend(text.lines().filter_map(|l| l.strip_prefix(WINDOW_LINE)).map(str::to_string));
        }
        windows.dedup();
        let window = if windows.is_empty() { String::new() } else { format!(" window={}", windows.join("/")) };
        work_waiting_figures(&counts) + &window
    }
}

/// How a bench worker process names its window in its output (`# window N`).
const WINDOW_LINE: &str = "# window ";

/// Adds the cumulative bucket counts of `dagmq_worker_work_waiting_seconds` found in a metrics
/// text to `counts` (one per bound of [`WORK_WAITING_BUCKETS`], then `+Inf`).
fn add_bucket_counts(counts: &mut [u64], text: &str) {
    for line in text.lines().filter(|l| l.starts_with("dagmq_worker_work_waiting_seconds_bucket")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let Some(le) = labels.split("le=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let index = if le == "+Inf" {
            Some(WORK_WAITING_BUCKETS.len())
        } else {
            le.parse::<f64>().ok().and_then(|le| WORK_WAITING_BUCKETS.iter().position(|b| (b - le).abs() < 1e-12))
        };
        if let Some(index) = index {
            counts[index] += value as u64;
        }
    }
}

/// The p50 and p99 of the work waiting histogram (cumulative `counts`), in microseconds,
/// interpolated linearly within a bucket.
fn work_waiting_figures(counts: &[u64]) -> String {
    let total = counts.last().copied().unwrap_or(0);
    if total == 0 {
        return String::new();
    }
    let quantile = |q: f64| {
        let wanted = (q * total as f64).max(1.0);
        let mut previous = (0.0, 0u64);
        for (i, &count) in counts.iter().enumerate() {
            let bound = WORK_WAITING_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            if count as f64 >= wanted {
                if bound.is_infinite() {
                    return previous.0 * 1e6;
                }
                let within = (wanted - previous.1 as f64) / (count - previous.1).max(1) as f64;
                return (previous.0 + (bound - previous.0) * within) * 1e6;
            }
            previous = (bound, count);
        }
        previous.0 * 1e6
    };
    format!(
        " work_waiting_p50_us={:.0} work_waiting_p99_us={:.0} work_waiting_tries={total}",
        quantile(0.5),
        quantile(0.99)
    )
}

/// Starts one worker process of a distributed bench: this binary, same workload, `--worker-of`.
fn spawn_worker_process(
    args: &BenchArgs,
    amqp: &str,
    redis: &str,
    namespace: &str,
    index: usize,
) -> CliResult<std::process::Child> {
    let exe = std::env::current_exe().map_err(runtime)?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("bench")
        .args(args.workload.to_args())
        .arg("--concurrency")
        .arg(args.concurrency.to_string())
        .args(args.no_eager.then_some("--no-eager"))
        .args(args.prefetch.iter().flat_map(|n| ["--prefetch".to_string(), n.to_string()]))
        .args(["--amqp", amqp, "--redis", redis, "--worker-of"])
        .arg(format!("{namespace}/{index}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    command.spawn().map_err(|e| CliError::runtime(format!("starting a bench worker process: {e}")))
}

/// Waits until `count` workers have registered.
async fn wait_for_workers(store: &Arc<dyn Store>, count: usize) -> CliResult<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.workers().await.map_err(runtime)?.len() < count {
        if Instant::now() > deadline {
            return Err(CliError::runtime("the bench worker processes did not register within 30s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The body of a bench worker process: one worker under the parent's namespace, until standard
/// input closes (the parent ended or stopped it).
async fn worker_process(args: &BenchArgs, of: &str) -> CliResult<()> {
    let (Some(amqp), Some(redis)) = (&args.amqp, &args.redis) else {
        return Err(CliError::usage("--worker-of needs --amqp and --redis"));
    };
    let (namespace, index) = of.rsplit_once('/').unwrap_or((of, "0"));
    let backends =
        Backends::Services { amqp: amqp.clone(), redis: redis.clone(), namespace: namespace.to_string(), history: 0 };
    let unused: (Arc<dyn Queue>, Arc<dyn Store>) = (Arc::new(MemoryQueue::new()), Arc::new(MemoryStore::new()));
    let (queue, store) = backends.connect(&unused).await?;
    let (stop, signal) = CancelSignal::new();
    let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = closed_tx.send(());
    });
    let dags = registry(workload_dag(args.workload)?);
    let mut worker = WorkerConfig::new(format!("bench-worker-{index}"), dags, Arc::new(SystemClock));
    worker.concurrency = args.concurrency;
    worker.eager = !args.no_eager;
    worker.window = args.prefetch;
    let window = worker.effective_window();
    let metrics = worker.metrics.clone();
    let running = tokio::spawn(dagmq_worker::run(worker, queue, store, signal));
    let _ = closed.await;
    stop.cancel();
    let _ = running.await;
    // For the parent's work waiting figures, and the window they were measured with.
    println!("{}", metrics.work_waiting_text());
    println!("{WINDOW_LINE}{window}");
    Ok(())
}

/// Runs one workload.
pub(crate) async fn bench(args: &BenchArgs) -> CliResult<()> {
    if let Some(of) = &args.worker_of {
        return worker_process(args, of).await;
    }
    let backends = match (&args.amqp, &args.redis) {
        (Some(amqp), Some(redis)) => Backends::Services {
            amqp: amqp.clone(),
            redis: redis.clone(),
            namespace: format!("dagmq-bench-{}", std::process::id()),
            history: 0,
        },
        _ => Backends::Memory,
    };
    if let Backends::Services { amqp, redis, namespace, .. } = &backends {
        raw_limits(amqp, redis, namespace).await?;
    }
    let result = match args.workload {
        BenchWorkload::Fanout { n } => fanout(args, n, &backends).await,
        BenchWorkload::Chain { k } => chain(args, k, &backends).await,
        BenchWorkload::Runs { m } => runs(args, m, &backends).await,
        BenchWorkload::Layers { width, depth } => layers(args, width, depth, &backends).await,
        BenchWorkload::History { runs } => history(args, runs, &backends).await,
        BenchWorkload::Store { n } => store_ceiling(n, &backends).await,
    };
    if let Backends::Services { amqp, redis, namespace, .. } = &backends {
        cleanup(amqp, redis, namespace).await;
    }
    result
}

fn registry(dag: Dag) -> DagRegistry {
    let mut registry = DagRegistry::new();
    let _ = registry.add(dag);
    registry
}

/// The DAG a workload runs; the worker processes build the same one.
fn workload_dag(workload: BenchWorkload) -> CliResult<Dag> {
    let dag = match workload {
        BenchWorkload::Fanout { n } => {
            let mut dag = Dag::builder("bench-fanout").task(TaskSpec::rust("root", Noop));
            let ids: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
            for id in &ids {
                dag = dag.task(TaskSpec::rust(id.clone(), Noop).after(["root"]));
            }
            dag.task(TaskSpec::rust("sink", Noop).after(ids))
        }
        BenchWorkload::Chain { k } => {
            let mut dag = Dag::builder("bench-chain");
            for i in 0..k.max(2) {
                let mut task = TaskSpec::rust(format!("t{i}"), Noop);
                if i > 0 {
                    task = task.after([format!("t{}", i - 1)]);
                }
                dag = dag.task(task);
            }
            dag
        }
        BenchWorkload::Runs { m } => {
            let middle: Vec<String> = (1..=8).map(|i| format!("m{i}")).collect();
            let mut dag = Dag::builder("bench-diamond")
                .max_active_runs(u32::try_from(m.max(1)).unwrap_or(u32::MAX))
                .task(TaskSpec::rust("top", Noop));
            for id in &middle {
                dag = dag.task(TaskSpec::rust(id.clone(), Noop).after(["top"]));
            }
            dag.task(TaskSpec::rust("bottom", Noop).after(middle))
        }
        BenchWorkload::History { .. } | BenchWorkload::Store { .. } => {
            return Err(CliError::usage("bench history and bench store have no DAG of their own"));
        }
        BenchWorkload::Layers { width, depth } => {
            let mut dag = Dag::builder("bench-layers");
            let mut previous: Vec<String> = Vec::new();
            for layer in 0..depth.max(1) {
                let ids: Vec<String> = (0..width.max(1)).map(|i| format!("l{layer}-t{i}")).collect();
                for id in &ids {
                    dag = dag.task(TaskSpec::rust(id.clone(), Noop).after(previous.iter().cloned()));
                }
                previous = ids;
            }
            dag
        }
    };
    dag.build().map_err(runtime)
}

/// Starts the rig for `args.workload`, triggers one run and waits for it to end.
async fn one_run(args: &BenchArgs, dag_id: &str, backends: &Backends) -> CliResult<(Rig, String, RunState)> {
    let rig = Rig::start(args, registry(workload_dag(args.workload)?), backends).await?;
    let outcome = async {
        let run_id = trigger(&rig, dag_id).await?;
        let state = rig.wait_final(&run_id).await?;
        Ok::<_, CliError>((run_id, state))
    }
    .await;
    match outcome {
        Ok((run_id, state)) => Ok((rig, run_id, state)),
        Err(err) => {
            rig.stop();
            Err(err)
        }
    }
}

async fn fanout(args: &BenchArgs, n: usize, backends: &Backends) -> CliResult<()> {
    let redis_before = backends.redis_cpu().await;
    let (rig, run_id, state) = one_run(args, "bench-fanout", backends).await?;
    let total = n + 2;
    let redis = redis_cost(redis_before, backends.redis_cpu().await, total);
    let memory = rig.memory(total);
    let tasks = rig.store.tasks(&run_id).await.map_err(runtime)?;
    let waiting = rig.stop();
    let root = tasks.iter().find(|t| t.task_id == "root");
    let sink = tasks.iter().find(|t| t.task_id == "sink");
    let (Some(start), Some(end)) = (root.and_then(|t| t.started_at), sink.and_then(|t| t.ended_at)) else {
        return Err(CliError::runtime(format!("fanout run ended {state} without timestamps")));
    };
    let elapsed = (end - start).to_std().unwrap_or_default();
    println!(
        "bench=fanout mode={} n={n} state={state} tasks={total} elapsed_ms={:.1} tasks_per_s={:.0} {memory}{waiting}{redis}",
        backends.mode(),
        elapsed.as_secs_f64() * 1e3,
        total as f64 / elapsed.as_secs_f64().max(1e-9),
    );
    Ok(())
}

async fn chain(args: &BenchArgs, k: usize, backends: &Backends) -> CliResult<()> {
    let k = k.max(2);
    let (rig, run_id, state) = one_run(args, "bench-chain", backends).await?;
    let memory = rig.memory(k);
    let tasks = rig.store.tasks(&run_id).await.map_err(runtime)?;
    let waiting = rig.stop();
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
        "bench=chain mode={} k={k} state={state} hops={} p50_us={:.1} p99_us={:.1} max_us={:.1} {memory}{waiting}",
        backends.mode(),
        hops.len(),
        percentile(&hops, 0.50),
        percentile(&hops, 0.99),
        hops.last().copied().unwrap_or(0.0),
    );
    Ok(())
}

async fn layers(args: &BenchArgs, width: usize, depth: usize, backends: &Backends) -> CliResult<()> {
    let (width, depth) = (width.max(1), depth.max(1));
    let (rig, run_id, state) = one_run(args, "bench-layers", backends).await?;
    let total = width * depth;
    let memory = rig.memory(total);
    let tasks = rig.store.tasks(&run_id).await.map_err(runtime)?;
    let waiting = rig.stop();
    let (Some(start), Some(end)) =
        (tasks.iter().filter_map(|t| t.started_at).min(), tasks.iter().filter_map(|t| t.ended_at).max())
    else {
        return Err(CliError::runtime(format!("layers run ended {state} without timestamps")));
    };
    // The barrier between layers: from the last end in a layer to the first start in the next,
    // in two parts: until the scheduler queued the next layer, and from then to the first start.
    let layer_of = |id: &str| id.strip_prefix('l')?.split_once('-')?.0.parse::<usize>().ok();
    let mut last_end = vec![None; depth];
    let mut first_queued = vec![None; depth];
    let mut first_start = vec![None; depth];
    let earliest = |a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    for task in &tasks {
        let Some(layer) = layer_of(&task.task_id).filter(|&l| l < depth) else { continue };
        last_end[layer] = last_end[layer].max(task.ended_at);
        first_queued[layer] = earliest(first_queued[layer], task.queued_at);
        first_start[layer] = earliest(first_start[layer], task.started_at);
    }
    let micros =
        |from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>| Some((to? - from?).num_nanoseconds()? as f64 / 1e3);
    let sorted = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values
    };
    let barriers = sorted((1..depth).filter_map(|l| micros(last_end[l - 1], first_start[l])).collect());
    let to_queued = sorted((1..depth).filter_map(|l| micros(last_end[l - 1], first_queued[l])).collect());
    let to_start = sorted((1..depth).filter_map(|l| micros(first_queued[l], first_start[l])).collect());
    let elapsed = (end - start).to_std().unwrap_or_default();
    println!(
        "bench=layers mode={} width={width} depth={depth} state={state} tasks={total} elapsed_ms={:.1} tasks_per_s={:.0} barrier_p50_us={:.1} barrier_p99_us={:.1} to_queued_p50_us={:.1} queued_to_start_p50_us={:.1} {memory}{waiting}",
        backends.mode(),
        elapsed.as_secs_f64() * 1e3,
        total as f64 / elapsed.as_secs_f64().max(1e-9),
        percentile(&barriers, 0.50),
        percentile(&barriers, 0.99),
        percentile(&to_queued, 0.50),
        percentile(&to_start, 0.50),
    );
    Ok(())
}

async fn runs(args: &BenchArgs, m: usize, backends: &Backends) -> CliResult<()> {
    let rig = Rig::start(args, registry(workload_dag(args.workload)?), backends).await?;
    let redis_before = backends.redis_cpu().await;
    let started = Instant::now();
    let trigger = br#"{"v":1,"dag_id":"bench-diamond"}"#.to_vec();
    let published =
        rig.queue.publish_many((0..m).map(|_| (Topic::Triggers, trigger.clone())).collect()).await.map_err(runtime);
    if let Err(err) = published {
        rig.stop();
        return Err(err);
    }
    // Watched on the scheduler's own counters (in this process), so the wait puts no load on
    // the store; the store is asked once at the end.
    let finished = |state: &str| rig.handle.metrics.runs_finished.value(&["bench-diamond", state]) as usize;
    while finished("success") + finished("failed") < m {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let redis = redis_cost(redis_before, backends.redis_cpu().await, m * 10);
    let filter = RunFilter { state: Some(RunState::Success), limit: m, ..RunFilter::default() };
    let succeeded = match rig.store.list_runs(&filter).await {
        Ok(runs) => runs.len(),
        Err(err) => {
            rig.stop();
            return Err(runtime(err));
        }
    };
    if succeeded < m {
        rig.stop();
        return Err(CliError::runtime(format!("{} of {m} runs failed", m - succeeded)));
    }
    let memory = rig.memory(m * 10);
    let waiting = rig.stop();
    println!(
        "bench=runs mode={} m={m} tasks={} elapsed_ms={:.1} runs_per_s={:.0} tasks_per_s={:.0} {memory}{waiting}{redis}",
        backends.mode(),
        m * 10,
        elapsed.as_secs_f64() * 1e3,
        m as f64 / elapsed.as_secs_f64().max(1e-9),
        (m * 10) as f64 / elapsed.as_secs_f64().max(1e-9),
    );
    Ok(())
}

async fn trigger(rig: &Rig, dag_id: &str) -> CliResult<String> {
    rig.handle.trigger(dag_id, Default::default(), None).await.map(|outcome| outcome.run_id).map_err(runtime)
}

/// Redis's CPU time between two readings, per 1,000 tasks of the figure
/// (` redis_cpu_ms_per_1000_tasks=...`), or nothing without both readings.
fn redis_cost(before: Option<f64>, after: Option<f64>, tasks: usize) -> String {
    match (before, after) {
        (Some(before), Some(after)) => {
            format!(" redis_cpu_ms_per_1000_tasks={:.1}", (after - before) * 1e6 / tasks.max(1) as f64)
        }
        _ => String::new(),
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// A memory figure of this process from /proc/self/status (`VmHWM:` peak, `VmRSS:` now), in
/// MB; 0 where that is not available.
fn rss_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
