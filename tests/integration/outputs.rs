//! Task outputs: what a Rust task returns is kept with its try in the store; an output over the
//! limit fails the try like any failure.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use dagmq_core::task::MAX_OUTPUT_BYTES;
use dagmq_core::{Dag, DagRegistry, RunState, Task, TaskContext, TaskError, TaskOutcome, TaskSpec, TaskState};
use serde_json::{Value, json};

use crate::faults::Faults;
use crate::support::Harness;

/// Returns a fixed output.
struct Emit(Value);

#[async_trait]
impl Task for Emit {
    async fn run(&self, _ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        Ok(TaskOutcome::with_output(self.0.clone()))
    }
}

/// Hands nothing on.
struct Quiet;

#[async_trait]
impl Task for Quiet {
    async fn run(&self, _ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        Ok(TaskOutcome::done())
    }
}

#[tokio::test(start_paused = true)]
async fn a_rust_task_output_is_stored_and_an_oversize_one_fails_the_try() {
    let rows = json!({"path": "/data/2026-12-02.csv", "rows": 3});
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("etl")
            .task(TaskSpec::rust("extract", Emit(rows.clone())))
            .task(TaskSpec::rust("quiet", Quiet))
            .task(TaskSpec::rust("big", Emit(json!("x".repeat(MAX_OUTPUT_BYTES)))).retries(1))
            .build()
            .unwrap(),
    )
    .unwrap();
    let harness = Harness::start(dags).await;
    let run_id = harness.trigger("etl").await;
    let extract = harness.wait_task(&run_id, "extract", |t| t.state == TaskState::Success).await;
    assert_eq!(extract.output, Some(rows));
    let quiet = harness.wait_task(&run_id, "quiet", |t| t.state == TaskState::Success).await;
    assert_eq!(quiet.output, None);
    let big = harness.wait_task(&run_id, "big", |t| t.state == TaskState::Failed).await;
    assert_eq!((big.try_number, big.output.as_ref()), (2, None), "retried once, then failed");
    let error = big.error.unwrap_or_default();
    assert!(error.contains(&format!("more than the limit of {MAX_OUTPUT_BYTES}")), "{error}");
    harness.stop().await;
}

/// Sums the `rows` of its inputs and hands the sum on.
struct SumRows;

#[async_trait]
impl Task for SumRows {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        let inputs = ctx.inputs().await?;
        let rows: i64 = inputs.values().filter_map(|v| v["rows"].as_i64()).sum();
        let names: Vec<&String> = inputs.keys().collect();
        ctx.log(format!("inputs from {names:?}"));
        Ok(TaskOutcome::with_output(json!({"rows": rows, "from": inputs.len()})))
    }
}

#[tokio::test(start_paused = true)]
async fn a_rust_task_reads_its_upstream_outputs_from_its_context() {
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("sum")
            .task(TaskSpec::rust("a", Emit(json!({"rows": 3}))))
            .task(TaskSpec::rust("b", Emit(json!({"rows": 4}))))
            .task(TaskSpec::rust("nothing", Quiet))
            .task(TaskSpec::rust("total", SumRows).after(["a", "b", "nothing"]))
            .build()
            .unwrap(),
    )
    .unwrap();
    let harness = Harness::start(dags).await;
    let run_id = harness.trigger("sum").await;
    let total = harness.wait_task(&run_id, "total", |t| t.state == TaskState::Success).await;
    assert_eq!(total.output, Some(json!({"rows": 7, "from": 3})), "a task without output is an input of null");
    harness.stop().await;
}

/// Takes the worker's store down for three seconds, then reads its inputs.
struct ReadsThroughAnOutage(Arc<OnceLock<Arc<Faults>>>);

#[async_trait]
impl Task for ReadsThroughAnOutage {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        let faults = self.0.get().expect("the test sets the faults").clone();
        faults.down.store(true, Ordering::SeqCst);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            faults.down.store(false, Ordering::SeqCst);
        });
        let inputs = ctx.inputs().await?;
        Ok(TaskOutcome::with_output(Value::Object(inputs)))
    }
}

/// A store that does not answer while a task reads its inputs is waited for: the try goes on
/// once it answers, and no retry is used up.
#[tokio::test(start_paused = true)]
async fn reading_inputs_waits_out_a_short_store_outage_instead_of_failing_the_try() {
    let faults = Arc::new(OnceLock::new());
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("outage")
            .task(TaskSpec::rust("a", Emit(json!({"rows": 3}))))
            .task(TaskSpec::rust("b", ReadsThroughAnOutage(faults.clone())).after(["a"]))
            .build()
            .unwrap(),
    )
    .unwrap();
    let harness = Harness::start(dags).await;
    faults.set(harness.worker_faults.store.clone()).ok();
    let run_id = harness.trigger("outage").await;
    assert_eq!(harness.wait_final(&run_id).await, RunState::Success);
    let b = harness.wait_task(&run_id, "b", |t| t.state == TaskState::Success).await;
    assert_eq!((b.try_number, b.output), (1, Some(json!({"a": {"rows": 3}}))));
    assert!(harness.worker_faults.store.refused.load(Ordering::SeqCst) > 0, "the outage was met");
    harness.stop().await;
}

/// Logs `lines` lines (the first with a long line), then fails; succeeds on a try numbered
/// `succeeds_on`.
struct Chatty {
    lines: usize,
    succeeds_on: u32,
}

#[async_trait]
impl Task for Chatty {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        ctx.log("é".repeat(400));
        for i in 1..self.lines {
            ctx.log(format!("line {i}"));
        }
        if ctx.try_number >= self.succeeds_on {
            return Ok(TaskOutcome::done());
        }
        Err(TaskError::new("the warehouse refused the load"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_try_keeps_the_last_lines_of_its_log_and_a_success_clears_them() {
    let mut dags = DagRegistry::new();
    dags.add(
        Dag::builder("etl")
            .task(TaskSpec::rust("load", Chatty { lines: 30, succeeds_on: 99 }))
            .task(TaskSpec::rust("short", Chatty { lines: 2, succeeds_on: 99 }))
            .task(TaskSpec::rust("flaky", Chatty { lines: 3, succeeds_on: 3 }).retries(2))
            .build()
            .unwrap(),
    )
    .unwrap();
    let harness = Harness::start(dags).await;
    let run_id = harness.trigger("etl").await;
    let load = harness.wait_task(&run_id, "load", |t| t.state == TaskState::Failed).await;
    let mut expected: Vec<String> = (21..30).map(|i| format!("line {i}")).collect();
    expected.push("[dagmq] try 1 failed: the warehouse refused the load".to_string());
    assert_eq!(load.log_tail, expected, "the last 10 lines, the failure last");
    let short = harness.wait_task(&run_id, "short", |t| t.state == TaskState::Failed).await;
    assert_eq!(short.log_tail.len(), 3);
    assert_eq!(short.log_tail[0].len(), 500, "a long line is cut at 500 bytes, on a character boundary");
    assert!(short.log_tail[0].chars().all(|c| c == 'é'));
    let flaky = harness.wait_task(&run_id, "flaky", |t| t.state == TaskState::Success).await;
    assert_eq!(flaky.try_number, 3);
    assert!(flaky.log_tail.is_empty(), "a success clears the failed try's lines: {:?}", flaky.log_tail);
    // Each failed try keeps its own lines and error with it in the history.
    let filed: Vec<(u32, &str, Option<&str>, Option<&str>)> = flaky
        .tries
        .iter()
        .map(|t| (t.try_number, t.outcome.as_str(), t.error.as_deref(), t.log_tail.last().map(String::as_str)))
        .collect();
    let refused = Some("the warehouse refused the load");
    assert_eq!(
        filed,
        [
            (1, "up_for_retry", refused, Some("[dagmq] try 1 failed: the warehouse refused the load")),
            (2, "up_for_retry", refused, Some("[dagmq] try 2 failed: the warehouse refused the load")),
        ]
    );
    assert_eq!(flaky.tries[0].log_tail.len(), 4, "{:?}", flaky.tries[0].log_tail);
    harness.stop().await;
}
