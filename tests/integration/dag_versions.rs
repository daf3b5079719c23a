//! A run's DAG version on workers that have not loaded it: a try is never claimed by a worker
//! without its version, goes unclaimed to a worker that has it, and fails only once it has waited
//! longer than `WorkerConfig::dag_version_wait`. (The race of a worker a read behind the
//! scheduler is `races::a_run_triggered_right_after_a_dag_file_changed_waits_for_its_worker_to_load_it`.)

use std::sync::Arc;
use std::time::Duration;

use dagmq_core::{Dag, DagRegistry, LiveDags, RunState, Store, TaskSpec, TaskState};
use dagmq_worker::Noop;

use crate::support::{Harness, ProcessFaults};

/// DAG `changing` at `version`: one task `t` with a retry.
fn changing(version: &str) -> DagRegistry {
    let mut dags = DagRegistry::new();
    dags.add(Dag::builder("changing").version(version).task(TaskSpec::rust("t", Noop).retries(1)).build().unwrap())
        .unwrap();
    dags
}

/// A live DAG set holding `dags`, as a process that read its DAG directory has.
fn live(dags: &DagRegistry) -> Arc<LiveDags> {
    Arc::new(LiveDags::new(dags.clone(), Vec::new(), Default::default()))
}

/// A harness whose scheduler has loaded v2 and whose worker (`worker-1`) only v1, for good (its
/// DAG directory still holds v1).
async fn scheduler_ahead_of_its_worker() -> Harness {
    let v1 = changing("v1");
    let scheduler_dags = live(&v1);
    let mut h = Harness::start_live(v1.clone(), scheduler_dags.clone()).await;
    h.stop_worker().await;
    h.live = Some(live(&v1));
    h.start_worker();
    scheduler_dags.replace(changing("v2"), Vec::new(), Default::default());
    h.scheduler.dags_changed().await;
    h
}

/// Polls `check` every 10 ms until it holds; panics with `what` after `limit` of tokio time.
async fn wait_until(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_try_of_a_version_its_worker_lacks_goes_unclaimed_to_a_worker_that_has_it() {
    let h = scheduler_ahead_of_its_worker().await;
    let run = h.trigger("changing").await;
    // worker-1 reads its directory again (nobody answers here), waits, and puts the message back.
    wait_until(Duration::from_secs(60), "worker-1 put the try back", async || {
        h.worker_metrics.version_not_loaded.value(&[]) >= 1.0
    })
    .await;
    let t = h.store.task(&run, "t").await.unwrap().unwrap();
    assert_eq!((t.state, t.try_number, t.tries_left()), (TaskState::Queued, 1, 1), "no try was used up: {t:?}");

    // A worker that has v2 takes it.
    let (stop, worker, _) = h.extra_worker("worker-2", live(&changing("v2")), &ProcessFaults::default(), |_| {});
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let t = h.store.task(&run, "t").await.unwrap().unwrap();
    assert_eq!(
        (t.try_number, t.tries_left(), t.worker.as_deref(), t.error.as_deref()),
        (1, 1, Some("worker-2"), None),
        "the try ran once, on the worker that has the version"
    );
    stop.cancel();
    worker.await.unwrap().unwrap();
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_try_of_a_version_no_worker_loads_fails_once_it_has_waited_the_version_wait() {
    let mut h = scheduler_ahead_of_its_worker().await;
    h.stop_worker().await;
    let wait = Duration::from_secs(30);
    let (stop, worker, metrics) =
        h.extra_worker("worker-2", live(&changing("v1")), &ProcessFaults::default(), |config| {
            config.dag_version_wait = wait;
        });
    let run = h.trigger("changing").await;
    let queued_at = h.wait_task(&run, "t", |t| t.state == TaskState::Queued).await.queued_at.unwrap();

    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    let t = h.store.task(&run, "t").await.unwrap().unwrap();
    let error = t.error.clone().unwrap_or_default();
    assert!(
        error.contains("has not loaded version v2 of dag \"changing\"")
            && error.contains("no worker that has loaded it took the try within"),
        "{error}"
    );
    assert_eq!((t.state, t.try_number), (TaskState::Failed, 1), "put back unclaimed until then: {t:?}");
    let failed_after = t.ended_at.unwrap() - queued_at;
    assert!(
        failed_after >= chrono::Duration::from_std(wait).unwrap(),
        "failed {failed_after} after it was queued, before the version wait ({wait:?})"
    );
    assert!(metrics.version_not_loaded.value(&[]) >= 1.0, "it was put back first");
    stop.cancel();
    worker.await.unwrap().unwrap();
    h.stop().await;
}
