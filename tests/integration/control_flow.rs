//! Trigger rules, `skipped`, branching and restart of runs with skipped tasks, over the in-memory
//! backends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use dagmq_core::dag_file::parse_dag_file;
use dagmq_core::{
    Dag, DagRegistry, RunState, Task, TaskContext, TaskError, TaskOutcome, TaskSpec, TaskState, TriggerRule,
};
use serde_json::{Value, json};

use crate::support::Harness;

#[path = "../rule_table.rs"]
mod rule_table;

/// Fails while it has failures left, then succeeds; returns its output when it succeeds.
struct Flaky {
    failures: AtomicU32,
    output: Option<Value>,
}

impl Flaky {
    fn new(failures: u32, output: Option<Value>) -> Flaky {
        Flaky { failures: AtomicU32::new(failures), output }
    }
}

#[async_trait]
impl Task for Flaky {
    async fn run(&self, _ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err(TaskError::fatal("failing on purpose"));
        }
        Ok(self.output.clone().map_or_else(TaskOutcome::done, TaskOutcome::with_output))
    }
}

fn ok() -> TaskSpec {
    TaskSpec::rust("placeholder", Flaky::new(0, None))
}

fn task(id: &str, spec: TaskSpec) -> TaskSpec {
    TaskSpec { id: id.to_string(), ..spec }
}

fn registry(dags: Vec<Dag>) -> DagRegistry {
    let mut registry = DagRegistry::new();
    for dag in dags {
        registry.add(dag).unwrap();
    }
    registry
}

async fn states(h: &Harness, run: &str) -> Vec<(String, String)> {
    let mut states: Vec<(String, String)> =
        h.tasks(run).await.into_values().map(|t| (t.task_id, t.state.to_string())).collect();
    states.sort();
    states
}

#[tokio::test(start_paused = true)]
async fn every_trigger_rule_against_a_table_of_upstream_outcomes() {
    let mut tasks = dagmq_worker::builtin_tasks();
    tasks.register("fail", |_| Ok(Arc::new(Flaky::new(u32::MAX, None)) as Arc<dyn Task>));
    let (toml, mut expected) = rule_table::rule_table_dag("run = \"noop\"", "run = \"fail\"");
    let dag = parse_dag_file("rules.toml", &toml, &tasks).unwrap().dag;
    let h = Harness::start_with(registry(vec![dag]), tasks).await;
    let run = h.trigger("rules").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed, "failed upstreams fail the run");
    expected.sort();
    assert_eq!(states(&h, &run).await, expected);
    let tasks = h.tasks(&run).await;
    assert_eq!(tasks["ss_all_failed"].try_number, 0, "a skipped task never had a try");
    assert_eq!(tasks["ff_all_success"].error.as_deref(), Some("upstream task \"ff_up0\" failed"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_branch_skips_the_paths_it_did_not_choose_and_the_skip_spreads() {
    let dag = Dag::builder("branchy")
        .task(task("pick", ok()).branch())
        .task(task("left", ok()).after(["pick"]))
        .task(task("right", ok()).after(["pick"]))
        .task(task("right2", ok()).after(["right"]))
        .task(task("choose_deep", TaskSpec::rust("x", Flaky::new(0, Some(json!(["deep_a"]))))).branch().after(["left"]))
        .task(task("deep_a", ok()).after(["choose_deep"]))
        .task(task("deep_b", ok()).after(["choose_deep"]))
        .task(task("deep_b2", ok()).after(["deep_b"]))
        .task(task("join_all", ok()).after(["deep_a", "right2"]))
        .task(task("join_none_failed", ok()).after(["deep_a", "right2"]).trigger_rule(TriggerRule::NoneFailed))
        .task(task("join_one", ok()).after(["deep_b2", "right2"]).trigger_rule(TriggerRule::OneSuccess))
        .build();
    let Ok(dag) = dag else { panic!("the branch dag is valid") };
    // The top branch outputs a single id rather than a list.
    let mut dags = vec![dag];
    dags[0] = rebuild_with_output(&dags[0], "pick", json!("left"));
    let bad = Dag::builder("bad_branch")
        .task(task("pick", TaskSpec::rust("x", Flaky::new(0, Some(json!("nowhere"))))).branch().retries(1))
        .task(task("a", ok()).after(["pick"]))
        .task(task("b", ok()).after(["pick"]))
        .build()
        .unwrap();
    dags.push(bad);
    let h = Harness::start(registry(dags)).await;

    let run = h.trigger("branchy").await;
    assert_eq!(h.wait_final(&run).await, RunState::Success, "skipped tasks do not fail a run");
    let tasks = h.tasks(&run).await;
    let state = |id: &str| tasks[id].state;
    for id in ["pick", "left", "choose_deep", "deep_a", "join_none_failed"] {
        assert_eq!(state(id), TaskState::Success, "{id}");
    }
    for id in ["right", "right2", "deep_b", "deep_b2", "join_all", "join_one"] {
        assert_eq!(state(id), TaskState::Skipped, "{id}");
        assert_eq!(tasks[id].try_number, 0, "{id} never ran");
    }

    let run = h.trigger("bad_branch").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    let tasks = h.tasks(&run).await;
    assert_eq!(tasks["pick"].try_number, 2, "a bad branch output fails the try, which is retried");
    let error = tasks["pick"].error.clone().unwrap_or_default();
    assert!(error.contains("\"nowhere\", which is not a direct downstream task; expected one of a, b"), "{error}");
    assert_eq!((tasks["a"].state, tasks["b"].state), (TaskState::UpstreamFailed, TaskState::UpstreamFailed));
    h.stop().await;
}

/// The same DAG with task `id` outputting `output`.
fn rebuild_with_output(dag: &Dag, id: &str, output: Value) -> Dag {
    let mut builder = Dag::builder(dag.id.clone());
    for spec in dag.tasks() {
        let spec = if spec.id == id {
            TaskSpec { kind: TaskSpec::rust(id, Flaky::new(0, Some(output.clone()))).kind, ..spec.clone() }
        } else {
            spec.clone()
        };
        builder = builder.task(spec);
    }
    builder.build().unwrap()
}

#[tokio::test(start_paused = true)]
async fn cleanup_and_alert_tasks_run_on_failure_and_a_restart_keeps_what_a_branch_skipped() {
    let dag = Dag::builder("guarded")
        .task(task("pick", TaskSpec::rust("x", Flaky::new(0, Some(json!("load"))))).branch())
        .task(task("load", TaskSpec::rust("x", Flaky::new(1, None))).after(["pick"]))
        .task(task("skip_load", ok()).after(["pick"]))
        .task(task("report", ok()).after(["load"]))
        .task(task("cleanup", ok()).after(["report"]).trigger_rule(TriggerRule::AllDone))
        .task(task("alert", ok()).after(["load"]).trigger_rule(TriggerRule::OneFailed))
        .build()
        .unwrap();
    let h = Harness::start(registry(vec![dag])).await;
    let run = h.trigger("guarded").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    let first = h.tasks(&run).await;
    let state = |tasks: &std::collections::HashMap<String, dagmq_core::TaskInstance>, id: &str| tasks[id].state;
    assert_eq!(state(&first, "load"), TaskState::Failed);
    assert_eq!(state(&first, "report"), TaskState::UpstreamFailed);
    assert_eq!(state(&first, "cleanup"), TaskState::Success, "all_done runs after a failure");
    assert_eq!(state(&first, "alert"), TaskState::Success, "one_failed runs on failure");
    assert_eq!(state(&first, "skip_load"), TaskState::Skipped);

    h.scheduler.restart(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let second = h.tasks(&run).await;
    assert_eq!((state(&second, "load"), second["load"].try_number), (TaskState::Success, 2));
    assert_eq!(state(&second, "report"), TaskState::Success);
    assert_eq!(state(&second, "skip_load"), TaskState::Skipped, "the branch still chose load");
    assert_eq!(second["pick"].try_number, 1, "the branch is not run again");
    assert_eq!(second["cleanup"].try_number, 1, "a task that succeeded is not run again");
    h.stop().await;
}

/// Skipped tasks downstream of a failure are decided again after a restart, by their rules over
/// the new outcomes; the run succeeds once every task is `success` or `skipped`.
#[tokio::test(start_paused = true)]
async fn a_restart_decides_again_the_skipped_tasks_behind_a_failure() {
    let dag = Dag::builder("alerting")
        .task(task("work", TaskSpec::rust("x", Flaky::new(1, None))))
        .task(task("side", ok()))
        .task(task("on_success", ok()).after(["work"]))
        .task(task("both_failed", ok()).after(["work", "side"]).trigger_rule(TriggerRule::AllFailed))
        .task(task("after_both", ok()).after(["both_failed"]))
        .task(task("tail", ok()).after(["on_success", "after_both"]).trigger_rule(TriggerRule::NoneFailed))
        .build()
        .unwrap();
    let h = Harness::start(registry(vec![dag])).await;
    let run = h.trigger("alerting").await;
    assert_eq!(h.wait_final(&run).await, RunState::Failed);
    let first = h.tasks(&run).await;
    assert_eq!(first["on_success"].state, TaskState::UpstreamFailed);
    assert_eq!((first["both_failed"].state, first["after_both"].state), (TaskState::Skipped, TaskState::Skipped));
    assert_eq!(first["tail"].state, TaskState::UpstreamFailed);
    let skipped_at = first["after_both"].ended_at;
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;

    h.scheduler.restart(&run).await.unwrap();
    assert_eq!(h.wait_final(&run).await, RunState::Success);
    let second = h.tasks(&run).await;
    assert_eq!((second["work"].state, second["work"].try_number), (TaskState::Success, 2));
    assert_eq!(second["on_success"].state, TaskState::Success);
    assert_eq!((second["both_failed"].state, second["after_both"].state), (TaskState::Skipped, TaskState::Skipped));
    assert_ne!(second["after_both"].ended_at, skipped_at, "decided again after the restart");
    assert_eq!(second["tail"].state, TaskState::Success, "none_failed runs over a success and a skip");
    assert_eq!(second["side"].try_number, 1, "a task that succeeded is not run again");
    h.stop().await;
}
