//! `dagmq bench`: no-op workloads through a real scheduler and worker, in-process over the
//! in-memory backends (standalone mode). Prints one machine-readable line per figure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dagmq_core::memory::{MemoryQueue, MemoryStore};
use dagmq_core::store::RunFilter;
use dagmq_core::task::CancelHandle;
use dagmq_core::{CancelSignal, Clock, Dag, DagRegistry, Queue, RunState, Store, SystemClock, TaskSpec, Topic};
use dagmq_scheduler::{SchedulerConfig, SchedulerHandle};
use dagmq_worker::{Noop, WorkerConfig};

use crate::cli::{BenchArgs, BenchWorkload};
use crate::{CliError, CliResult};

/// A scheduler and a worker over fresh in-memory backends.
struct Rig {
    /// The scheduler.
    handle: SchedulerHandle,
    /// The store, to read results.
    store: Arc<dyn Store>,
    /// The queue, to publish triggers.
    queue: Arc<dyn Queue>,
    /// Stops both.
    stop: CancelHandle,
}

impl Rig {
    fn start(dags: DagRegistry, concurrency: usize) -> Rig {
        let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let (stop, signal) = CancelSignal::new();
        let (handle, _) = dagmq_scheduler::spawn(
            SchedulerConfig::new(dags.clone(), clock.clone()),
            queue.clone(),
            store.clone(),
            signal.clone(),
        );
        let mut worker = WorkerConfig::new("bench-worker", dags, clock);
        worker.concurrency = concurrency;
        tokio::spawn(dagmq_worker::run(worker, queue.clone(), store.clone(), signal));
        Rig { handle, store, queue, stop }
    }

    async fn wait_final(&self, run_id: &str) -> CliResult<RunState> {
        loop {
            match self.store.run(run_id).await.map_err(|e| CliError::runtime(e.to_string()))? {
                Some(run) if run.state.is_final() => return Ok(run.state),
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
}

/// Runs one workload.
pub(crate) async fn bench(args: &BenchArgs) -> CliResult<()> {
    match args.workload {
        BenchWorkload::Fanout { n } => fanout(n, args.concurrency).await,
        BenchWorkload::Chain { k } => chain(k, args.concurrency).await,
        BenchWorkload::Runs { m } => runs(m, args.concurrency).await,
    }
}

fn registry(dag: Dag) -> DagRegistry {
    let mut registry = DagRegistry::new();
    let _ = registry.add(dag);
    registry
}

fn build(builder: dagmq_core::DagBuilder) -> CliResult<Dag> {
    builder.build().map_err(|e| CliError::runtime(e.to_string()))
}

async fn fanout(n: usize, concurrency: usize) -> CliResult<()> {
    let mut dag = Dag::builder("bench-fanout").task(TaskSpec::rust("root", Noop));
    let ids: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    for id in &ids {
        dag = dag.task(TaskSpec::rust(id.clone(), Noop).after(["root"]));
    }
    dag = dag.task(TaskSpec::rust("sink", Noop).after(ids));
    let rig = Rig::start(registry(build(dag)?), concurrency);
    let run_id = trigger(&rig, "bench-fanout").await?;
    let state = rig.wait_final(&run_id).await?;
    let tasks = rig.store.tasks(&run_id).await.map_err(|e| CliError::runtime(e.to_string()))?;
    let root = tasks.iter().find(|t| t.task_id == "root");
    let sink = tasks.iter().find(|t| t.task_id == "sink");
    let (Some(start), Some(end)) = (root.and_then(|t| t.started_at), sink.and_then(|t| t.ended_at)) else {
        return Err(CliError::runtime(format!("fanout run ended {state} without timestamps")));
    };
    let elapsed = (end - start).to_std().unwrap_or_default();
    let total = n + 2;
    println!(
        "bench=fanout mode=standalone n={n} state={state} tasks={total} elapsed_ms={:.1} tasks_per_s={:.0} peak_rss_mb={:.1}",
        elapsed.as_secs_f64() * 1e3,
        total as f64 / elapsed.as_secs_f64().max(1e-9),
        peak_rss_mb()
    );
    rig.stop.cancel();
    Ok(())
}

async fn chain(k: usize, concurrency: usize) -> CliResult<()> {
    let k = k.max(2);
    let mut dag = Dag::builder("bench-chain");
    for i in 0..k {
        let mut task = TaskSpec::rust(format!("t{i}"), Noop);
        if i > 0 {
            task = task.after([format!("t{}", i - 1)]);
        }
        dag = dag.task(task);
    }
    let rig = Rig::start(registry(build(dag)?), concurrency);
    let run_id = trigger(&rig, "bench-chain").await?;
    let state = rig.wait_final(&run_id).await?;
    let tasks = rig.store.tasks(&run_id).await.map_err(|e| CliError::runtime(e.to_string()))?;
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
        "bench=chain mode=standalone k={k} state={state} hops={} p50_us={:.1} p99_us={:.1} max_us={:.1} peak_rss_mb={:.1}",
        hops.len(),
        percentile(&hops, 0.50),
        percentile(&hops, 0.99),
        hops.last().copied().unwrap_or(0.0),
        peak_rss_mb()
    );
    rig.stop.cancel();
    Ok(())
}

async fn runs(m: usize, concurrency: usize) -> CliResult<()> {
    let middle: Vec<String> = (1..=8).map(|i| format!("m{i}")).collect();
    let mut dag = Dag::builder("bench-diamond")
        .max_active_runs(u32::try_from(m.max(1)).unwrap_or(u32::MAX))
        .task(TaskSpec::rust("top", Noop));
    for id in &middle {
        dag = dag.task(TaskSpec::rust(id.clone(), Noop).after(["top"]));
    }
    dag = dag.task(TaskSpec::rust("bottom", Noop).after(middle));
    let rig = Rig::start(registry(build(dag)?), concurrency);
    let started = Instant::now();
    let trigger = br#"{"v":1,"dag_id":"bench-diamond"}"#.to_vec();
    rig.queue
        .publish_many((0..m).map(|_| (Topic::Triggers, trigger.clone())).collect())
        .await
        .map_err(|e| CliError::runtime(e.to_string()))?;
    let filter = RunFilter { state: Some(RunState::Success), limit: m, ..RunFilter::default() };
    loop {
        let done = rig.store.list_runs(&filter).await.map_err(|e| CliError::runtime(e.to_string()))?.len();
        if done >= m {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    println!(
        "bench=runs mode=standalone m={m} tasks={} elapsed_ms={:.1} runs_per_s={:.0} tasks_per_s={:.0} peak_rss_mb={:.1}",
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
    rig.handle
        .trigger(dag_id, Default::default(), None)
        .await
        .map(|outcome| outcome.run_id)
        .map_err(|e| CliError::runtime(e.to_string()))
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
