//! A user's own dagmq binary: DAGs and tasks written in Rust, registered beside the DAG files.
//!
//! ```text
//! cargo run -p rust-dag-example -- standalone --dags examples/dags
//! cargo run -p rust-dag-example -- trigger word_count --param text="a b a" --wait
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dagmq::App;
use dagmq_core::{Dag, FollowUp, Task, TaskContext, TaskError, TaskOutcome, TaskSpec, async_trait};

/// Splits the `text` parameter into chunks and returns one follow-up task per chunk: the
/// number of tasks is decided at run time.
struct Split;

#[async_trait]
impl Task for Split {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        let text = ctx.param("text").ok_or_else(|| TaskError::fatal("needs --param text=..."))?;
        let words: Vec<&str> = text.split_whitespace().collect();
        ctx.log(format!("{} words", words.len()));
        let follow_ups = words
            .chunks(2)
            .enumerate()
            .map(|(i, chunk)| FollowUp::new(format!("count{i}"), "count", serde_json::json!({ "words": chunk })))
            .collect();
        Ok(TaskOutcome::with_follow_ups(follow_ups))
    }
}

/// Counts the words it is given and logs the counts; reports progress as it goes.
struct Count {
    /// The words of this chunk.
    words: Vec<String>,
}

#[async_trait]
impl Task for Count {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        let mut counts = BTreeMap::new();
        for (i, word) in self.words.iter().enumerate() {
            *counts.entry(word.clone()).or_insert(0) += 1;
            ctx.set_progress((i + 1) as f64 / self.words.len() as f64);
        }
        for (word, count) in counts {
            ctx.log(format!("{word} {count}"));
        }
        Ok(TaskOutcome::done())
    }
}

/// Fails on its first try: shows retries with a Rust error type deciding whether to retry.
struct Flaky;

#[async_trait]
impl Task for Flaky {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        if ctx.try_number == 1 {
            return Err(TaskError::new("the first try always fails"));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => Ok(TaskOutcome::done()),
            _ = ctx.cancel_signal().cancelled() => Err(TaskError::fatal("cancelled")),
        }
    }
}

fn word_count() -> Dag {
    Dag::builder("word_count")
        .description("splits text into chunks at run time and counts each chunk in its own task")
        .task(TaskSpec::rust("split", Split))
        .task(TaskSpec::rust("flaky", Flaky).retries(2).retry_delay(
            Duration::from_millis(500),
            2.0,
            Duration::from_secs(5),
        ))
        .task(TaskSpec::rust("done", dagmq_worker_noop()).after(["split", "flaky"]))
        .build()
        .expect("the word_count dag is valid")
}

/// The builtin no-op task, as a DAG's join point.
fn dagmq_worker_noop() -> impl Task {
    struct Join;
    #[async_trait]
    impl Task for Join {
        async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
            ctx.log("all chunks counted");
            Ok(TaskOutcome::done())
        }
    }
    Join
}

fn main() -> std::process::ExitCode {
    App::new()
        .task("count", |args| {
            let words = args
                .get("words")
                .and_then(|w| w.as_array())
                .ok_or("count needs args.words, a list of strings")?
                .iter()
                .filter_map(|w| w.as_str().map(str::to_string))
                .collect();
            Ok(Arc::new(Count { words }) as Arc<dyn Task>)
        })
        .dag(word_count())
        .main()
}
