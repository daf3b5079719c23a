//! A `dagmq` program with Rust tasks of the tests' own, for what DAG files cannot express with
//! commands alone (a task that returns follow-ups). It is this test binary: a test started with
//! `support::dagmq_with_rust_tasks` runs only `serve`, which finds its arguments in
//! `support::APP_ARGS` and runs `dagmq` with them (fail points included: the `dagmq` library in
//! this binary is built with them), then exits. Run as a test, without that variable, `serve`
//! returns at once.
//!
//! Tasks (`run = "NAME"`, with `args = { log = "PATH" }`):
//! - `record`: records its start and end in the side-effect log, 200 ms apart;
//! - `split`: the same, and returns the follow-ups `part1` and `part2` (each a `record`;
//!   their task ids in the run are `split.part1` and `split.part2`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dagmq_core::{FollowUp, Task, TaskContext, TaskError, TaskOutcome, async_trait};

use crate::history;
use crate::support::APP_ARGS;

#[test]
fn serve() {
    let Ok(args) = std::env::var(APP_ARGS) else { return };
    let args: Vec<String> = std::iter::once("dagmq".to_string()).chain(args.lines().map(str::to_string)).collect();
    let code = dagmq::App::new()
        .task("record", |args| Ok(Arc::new(Recorded::new(args, false)?) as Arc<dyn Task>))
        .task("split", |args| Ok(Arc::new(Recorded::new(args, true)?) as Arc<dyn Task>))
        .run_with_args(args);
    std::process::exit(if code == std::process::ExitCode::SUCCESS { 0 } else { 1 });
}

/// A task that records its execution; with `split`, it returns two follow-ups.
struct Recorded {
    log: PathBuf,
    split: bool,
}

impl Recorded {
    fn new(args: &serde_json::Value, split: bool) -> Result<Recorded, String> {
        let log = args["log"].as_str().ok_or("args.log: the side-effect log's path is missing")?;
        Ok(Recorded { log: PathBuf::from(log), split })
    }
}

#[async_trait]
impl Task for Recorded {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        history::append(&self.log, true, &ctx.run_id, &ctx.task_id, ctx.try_number);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = ctx.cancel_signal().cancelled() => return Err(TaskError::fatal("stopped")),
        }
        history::append(&self.log, false, &ctx.run_id, &ctx.task_id, ctx.try_number);
        if !self.split {
            return Ok(TaskOutcome::done());
        }
        let args = serde_json::json!({ "log": self.log.display().to_string() });
        Ok(TaskOutcome::with_follow_ups(vec![
            FollowUp::new("part1", "record", args.clone()),
            FollowUp::new("part2", "record", args),
        ]))
    }
}
