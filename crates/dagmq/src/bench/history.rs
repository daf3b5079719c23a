//! `bench history`: the same figures on an empty store and on one seeded with finished runs, with
//! the API's latencies and the scheduler's memory, to show that dagmq's cost does not grow with
//! its history.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use dagmq_core::store::RunFilter;
use dagmq_core::{CancelSignal, RunState};
use dagmq_redis::RedisStore;

use super::{Backends, Rig, chain, fanout, percentile, registry, runs, runtime, workload_dag};
use crate::cli::{BenchArgs, BenchWorkload};
use crate::{CliError, CliResult};

/// Finished runs of 10 tasks each in a seeded history (1,000,000 task instances for 100,000).
const HISTORY_TASKS_PER_RUN: usize = 10;

/// `bench history`: the figures of `runs 1000`, `fanout 2000` and `chain 200`, the API's
/// latencies and the scheduler's memory, on an empty store and then with `seeded` finished runs
/// in it.
pub(super) async fn history(args: &BenchArgs, seeded: usize, backends: &Backends) -> CliResult<()> {
    let Backends::Services { amqp, redis, namespace, .. } = backends else {
        return Err(CliError::usage("bench history needs --amqp and --redis"));
    };
    let with = |workload| BenchArgs {
        workload,
        concurrency: args.concurrency,
        no_eager: args.no_eager,
        prefetch: args.prefetch,
        amqp: args.amqp.clone(),
        redis: args.redis.clone(),
        worker_of: None,
    };
    for history in [0, seeded] {
        if history > 0 {
            seed(redis, namespace, history).await?;
        }
        let backends =
            Backends::Services { amqp: amqp.clone(), redis: redis.clone(), namespace: namespace.clone(), history };
        runs(&with(BenchWorkload::Runs { m: 1000 }), 1000, &backends).await?;
        fanout(&with(BenchWorkload::Fanout { n: 2000 }), 2000, &backends).await?;
        chain(&with(BenchWorkload::Chain { k: 200 }), 200, &backends).await?;
        api_latency(&with(BenchWorkload::Runs { m: 1 }), &backends).await?;
    }
    Ok(())
}

/// Writes `count` finished runs of the diamond (`bench-diamond`, 10 tasks each) into the
/// store, created over the 30 days before now, in pipelines of 500 runs, four at a time.
async fn seed(redis: &str, namespace: &str, count: usize) -> CliResult<()> {
    let store = Arc::new(RedisStore::connect(redis, namespace, None).await.map_err(runtime)?);
    let started = Instant::now();
    let origin = Utc::now() - chrono::Duration::days(30);
    let step_ms = (30 * 24 * 3600 * 1000 / count.max(1)) as i64;
    let mut pending = tokio::task::JoinSet::new();
    for first in (0..count).step_by(500) {
        while pending.len() >= 4 {
            if let Some(done) = pending.join_next().await {
                done.map_err(runtime)??;
            }
        }
        let store = store.clone();
        pending.spawn(async move {
            let batch: Vec<_> = (first..(first + 500).min(count))
                .map(|i| seeded_run(i, origin + chrono::Duration::milliseconds(step_ms * i as i64)))
                .collect();
            store.seed_finished_runs(&batch).await.map_err(runtime)
        });
    }
    while let Some(done) = pending.join_next().await {
        done.map_err(runtime)??;
    }
    println!(
        "bench=history_seed mode=distributed runs={count} tasks={} elapsed_ms={:.0}",
        count * HISTORY_TASKS_PER_RUN,
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// One seeded run in this many failed (its `bottom` task failed): failures are rare in a
/// history, which is what makes listing them the costly case.
const HISTORY_FAILED_EVERY: usize = 1000;

/// The `index`th finished run of a seeded history, created at `created`: a successful diamond,
/// or a failed one every [`HISTORY_FAILED_EVERY`] runs.
fn seeded_run(index: usize, created: DateTime<Utc>) -> (dagmq_core::RunRecord, Vec<dagmq_core::TaskInstance>) {
    let at = |ms: i64| created + chrono::Duration::milliseconds(ms);
    let failed = index % HISTORY_FAILED_EVERY == HISTORY_FAILED_EVERY - 1;
    let run = dagmq_core::RunRecord {
        run_id: format!("seeded-{index:07}"),
        dag_id: "bench-diamond".to_string(),
        state: if failed { RunState::Failed } else { RunState::Success },
        kind: dagmq_core::RunKind::Manual,
        logical_date: created,
        params: Default::default(),
        key: None,
        created_at: created,
        started_at: Some(at(1)),
        ended_at: Some(at(30)),
        dag_version: None,
    };
    let middle: Vec<String> = (1..=8).map(|i| format!("m{i}")).collect();
    let mut tasks = vec![dagmq_core::TaskInstance::pending("top", Vec::new(), "default", 0)];
    tasks.extend(
        middle.iter().map(|id| dagmq_core::TaskInstance::pending(id.clone(), vec!["top".to_string()], "default", 0)),
    );
    tasks.push(dagmq_core::TaskInstance::pending("bottom", middle, "default", 0));
    for (n, task) in tasks.iter_mut().enumerate() {
        let n = n as i64;
        task.state = if failed && task.task_id == "bottom" {
            dagmq_core::TaskState::Failed
        } else {
            dagmq_core::TaskState::Success
        };
        task.try_number = 1;
        task.queued_at = Some(at(2 + n));
        task.started_at = Some(at(3 + n));
        task.ended_at = Some(at(4 + n));
        task.worker = Some("bench-worker-0".to_string());
    }
    debug_assert_eq!(tasks.len(), HISTORY_TASKS_PER_RUN);
    (run, tasks)
}

/// The latency of the API's listings and run page, through the HTTP API of a scheduler over
/// the store as it is: `GET /api/v1/runs` (newest 50; of one DAG; of running runs, which are
/// few; of failed runs, one in a thousand of a seeded history), `GET /api/v1/runs/{id}` of the newest run, `GET /api/v1/dags` and `/stats`; each
/// called 20 times, p50 and max.
async fn api_latency(args: &BenchArgs, backends: &Backends) -> CliResult<()> {
    let rig = Rig::start(args, registry(workload_dag(args.workload)?), backends).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(runtime)?;
    let address = listener.local_addr().map_err(runtime)?;
    let (stop, signal) = CancelSignal::new();
    tokio::spawn(dagmq_scheduler::api::serve(listener, rig.handle.clone(), Default::default(), signal));
    let outcome = async {
        let client =
            crate::client::HttpClient::new(&format!("http://{address}"), &Default::default(), Duration::from_secs(30))
                .map_err(runtime)?;
        let newest = rig.store.list_runs(&RunFilter { limit: 1, ..RunFilter::default() }).await.map_err(runtime)?;
        let run_page = newest.first().map(|r| format!("/api/v1/runs/{}", r.run_id));
        let mut lines = Vec::new();
        for (name, path) in [
            ("runs", Some("/api/v1/runs?limit=50".to_string())),
            ("runs_of_dag", Some("/api/v1/runs?dag_id=bench-diamond&limit=50".to_string())),
            ("running_runs", Some("/api/v1/runs?status=running&limit=50".to_string())),
            ("failed_runs", Some("/api/v1/runs?status=failed&limit=50".to_string())),
            ("run_page", run_page),
            ("dags", Some("/api/v1/dags".to_string())),
            ("stats", Some("/api/v1/stats".to_string())),
        ] {
            let Some(path) = path else { continue };
            let mut times = Vec::new();
            for _ in 0..20 {
                let started = Instant::now();
                let response = client.request("GET", &path, None, None).await.map_err(runtime)?;
                times.push(started.elapsed().as_secs_f64() * 1e3);
                if response.status != 200 {
                    return Err(runtime(format!("GET {path}: status {}", response.status)));
                }
            }
            times.sort_by(f64::total_cmp);
            lines.push(format!(
                "bench=api mode={} call={name} p50_ms={:.2} max_ms={:.2}",
                backends.mode(),
                percentile(&times, 0.5),
                times.last().copied().unwrap_or(0.0)
            ));
        }
        Ok::<_, CliError>(lines)
    }
    .await;
    stop.cancel();
    rig.stop();
    for line in outcome? {
        println!("{line}");
    }
    Ok(())
}
