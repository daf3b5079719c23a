//! The DAG model: tasks, their dependencies and settings, and the DAG's schedule. Built through
//! [`DagBuilder`], which refuses cycles, unknown upstreams and duplicate ids.
//!
//! - this file: the model ([`Dag`], [`TaskSpec`], [`TaskConfig`], [`DagError`]);
//! - `builder`: [`DagBuilder`] and every check a DAG passes before it exists (graph, ids,
//!   templates, pools);
//! - `live`: the DAGs a process has loaded ([`DagRegistry`], [`LiveDags`]) and file versions.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::params::ParamsSchema;
use crate::schedule::Schedule;
use crate::task::Task;
use crate::trigger::TriggerRule;

mod builder;
mod live;

pub use builder::{DagBuilder, Pools, check_id, check_pools};
pub use live::{DagRegistry, LiveDags, content_version, content_version_bytes, refused_dag_id};

/// The default worker pool.
pub const DEFAULT_QUEUE: &str = "default";

/// A validated DAG. Tasks are stored in a topological order (every task after its upstreams).
pub struct Dag {
    /// Unique name of the DAG.
    pub id: String,
    /// Free text for people.
    pub description: String,
    /// When runs are created.
    pub schedule: Schedule,
    /// Timezone of the cron schedule and of displayed times.
    pub timezone: Tz,
    /// No schedule point before this instant is due; when absent, the moment the scheduler
    /// first saw the DAG (so a new DAG does not catch up from the beginning of time).
    pub start: Option<DateTime<Utc>>,
    /// Create every due run since start (true) or only the latest (false).
    pub catch_up: bool,
    /// At most this many runs of the DAG are `running` at once; more wait as `queued`.
    pub max_active_runs: u32,
    /// At most this many of the DAG's tasks are queued or running at once, across its runs.
    pub max_active_tasks: Option<u32>,
    /// A paused DAG gets no scheduled runs (triggers still queue runs).
    pub paused: bool,
    /// Labels for people and filters.
    pub tags: Vec<String>,
    /// A run still unfinished this long after it started is cancelled and marked failed.
    pub run_timeout: Option<Duration>,
    /// Where the DAG came from (a file path, or "rust"), for error messages.
    pub source: String,
    /// Which definition this is: a hash of the DAG file's text (`rust` for DAGs compiled in).
    /// Every run records it and completes with that definition.
    pub version: String,
    /// The params the DAG declares: their types, defaults and allowed values.
    pub params: Arc<ParamsSchema>,
    /// Tasks in topological order.
    tasks: Vec<TaskSpec>,
    /// Task id to index in `tasks`.
    index: HashMap<String, usize>,
    /// For each task (by index), the indices of the tasks that wait for it, in topological order.
    downstream: Vec<Vec<usize>>,
}

/// One task of a DAG: what it runs, what it waits for, how it is retried.
#[derive(Clone)]
pub struct TaskSpec {
    /// Id, unique within the DAG.
    pub id: String,
    /// Ids of the tasks that must succeed before this one runs.
    pub after: Arc<[String]>,
    /// What runs.
    pub kind: TaskKind,
    /// Retries, timeout, queue and alerts.
    pub config: TaskConfig,
    /// Settings passed to a Rust task as `ctx.args`.
    pub args: serde_json::Value,
    /// For a command: environment variables of each try, by name, each a template rendered
    /// with any value (params, upstream outputs, dagmq's own). This is how values from outside
    /// reach a command: a program reads them from its environment, no shell parses them.
    pub env: BTreeMap<String, String>,
}

/// What a task runs.
#[derive(Clone)]
pub enum TaskKind {
    /// A process: argv, where only values that are plain words may be templated (dagmq's own
    /// and params of a safe type); its output is its log.
    Command(Vec<String>),
    /// A task written in Rust; `name` is its registry name when it came from `run = "NAME"`.
    Rust {
        /// Registry name, if registered by name.
        name: Option<String>,
        /// The implementation.
        task: Arc<dyn Task>,
    },
    /// A task of a DAG version a scheduler read back from the store
    /// ([`crate::dag_version::DagVersionRecord`]): its place in the graph and its settings are
    /// known, what it runs is not. Only a scheduler builds such tasks, and nothing runs them.
    Unloaded,
}

/// How a task is retried, timed out, routed and alerted on.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskConfig {
    /// Tries after the first.
    pub retries: u32,
    /// Wait before the first retry.
    pub retry_delay: Duration,
    /// Each further retry waits this many times longer.
    pub retry_backoff: f64,
    /// Upper bound of the wait between tries.
    pub retry_delay_max: Duration,
    /// A try running longer than this is stopped and fails.
    pub timeout: Option<Duration>,
    /// Worker pool the task goes to.
    pub queue: String,
    /// Higher runs first among ready tasks (0-9).
    pub priority: u8,
    /// Notify on the task's final failure.
    pub alert_on_failure: bool,
    /// Notify on each retry.
    pub alert_on_retry: bool,
    /// When the task runs, given how its upstreams ended.
    pub trigger_rule: TriggerRule,
    /// The task's output names which of its direct downstream tasks run; the others are skipped.
    pub branch: bool,
    /// The named pool whose slots the task takes while queued or running.
    pub pool: Option<String>,
    /// How many slots of its pool the task takes (default 1).
    pub pool_slots: u32,
    /// At most this many tries of this task queued or running at once, across the DAG's runs.
    pub max_active: Option<u32>,
}

impl Default for TaskConfig {
    fn default() -> TaskConfig {
        TaskConfig {
            retries: 0,
            retry_delay: Duration::from_secs(5),
            retry_backoff: 2.0,
            retry_delay_max: Duration::from_secs(600),
            timeout: None,
            queue: DEFAULT_QUEUE.to_string(),
            priority: 0,
            alert_on_failure: true,
            alert_on_retry: false,
            trigger_rule: TriggerRule::AllSuccess,
            branch: false,
            pool: None,
            pool_slots: 1,
            max_active: None,
        }
    }
}

impl TaskConfig {
    /// The wait before retry number `retry` (1 for the first retry).
    pub fn retry_delay_for(&self, retry: u32) -> Duration {
        let factor = self.retry_backoff.max(1.0).powi(retry.saturating_sub(1).min(64) as i32);
        let secs = (self.retry_delay.as_secs_f64() * factor).min(self.retry_delay_max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }
}

/// A DAG that could not be built, naming the DAG, the task and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DagError {
    /// Two tasks share an id.
    #[error("dag {dag:?}: duplicate task id {task:?}")]
    DuplicateTask {
        /// The DAG.
        dag: String,
        /// The repeated id.
        task: String,
    },
    /// A task waits for a task that does not exist.
    #[error("dag {dag:?}, task {task:?}: unknown upstream {upstream:?}")]
    UnknownUpstream {
        /// The DAG.
        dag: String,
        /// The task that names it.
        task: String,
        /// The missing id.
        upstream: String,
    },
    /// The dependencies loop.
    #[error("dag {dag:?}: cycle {}", path.join(" -> "))]
    Cycle {
        /// The DAG.
        dag: String,
        /// The tasks of the loop, first repeated at the end.
        path: Vec<String>,
    },
    /// A command reads the output of a task that does not run before it.
    #[error(
        "dag {dag:?}, task {task:?}: {{{{ tasks.{referenced}.output }}}} names a task that is not upstream of it \
         (directly or through others), so its output may not exist yet"
    )]
    NotAnAncestor {
        /// The DAG.
        dag: String,
        /// The task whose command names it.
        task: String,
        /// The task named.
        referenced: String,
    },
    /// A param of the schema is wrong.
    #[error("dag {dag:?}: param {param:?}: {reason}")]
    Param {
        /// The DAG.
        dag: String,
        /// The param.
        param: String,
        /// What is wrong.
        reason: String,
    },
    /// A command templates a value that may come from outside (or an unknown one).
    #[error("dag {dag:?}, task {task:?}: {{{{ {name} }}}} in `command`: {reason}")]
    CommandTemplate {
        /// The DAG.
        dag: String,
        /// The task.
        task: String,
        /// The placeholder's name.
        name: String,
        /// Why it may not be there, and what to write instead.
        reason: String,
    },
    /// A task's `env` is wrong.
    #[error("dag {dag:?}, task {task:?}: env: {reason}")]
    Env {
        /// The DAG.
        dag: String,
        /// The task.
        task: String,
        /// What is wrong.
        reason: String,
    },
    /// Any other bad setting.
    #[error("dag {dag:?}: {reason}")]
    Invalid {
        /// The DAG.
        dag: String,
        /// What is wrong.
        reason: String,
    },
}

impl Dag {
    /// Starts a DAG with this id.
    pub fn builder(id: impl Into<String>) -> DagBuilder {
        DagBuilder::new(id)
    }

    /// Tasks in topological order.
    pub fn tasks(&self) -> &[TaskSpec] {
        &self.tasks
    }

    /// Ids of the tasks that name `id` among their upstreams (its direct downstream tasks).
    pub fn downstream_of(&self, id: &str) -> Vec<&str> {
        let Some(&i) = self.index.get(id) else { return Vec::new() };
        self.downstream[i].iter().map(|&d| self.tasks[d].id.as_str()).collect()
    }

    /// The task with this id.
    pub fn task(&self, id: &str) -> Option<&TaskSpec> {
        self.index.get(id).map(|&i| &self.tasks[i])
    }

    /// The next schedule point strictly after `now`, for a DAG whose start is `start` (the
    /// DAG's own or, when it has none, when the scheduler first saw it).
    pub fn next_run_after(&self, start: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.next_after(self.start.unwrap_or(start), now)
    }
}

impl fmt::Debug for Dag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dag")
            .field("id", &self.id)
            .field("schedule", &self.schedule.describe())
            .field("tasks", &self.tasks.iter().map(|t| &t.id).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for TaskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            TaskKind::Command(argv) => format!("command {argv:?}"),
            TaskKind::Rust { name, .. } => format!("rust {}", name.as_deref().unwrap_or("(unnamed)")),
            TaskKind::Unloaded => "unloaded".to_string(),
        };
        f.debug_struct("TaskSpec")
            .field("id", &self.id)
            .field("after", &self.after)
            .field("kind", &kind)
            .field("env", &self.env)
            .finish()
    }
}

impl TaskSpec {
    /// A task that runs a process.
    pub fn command<S: Into<String>>(id: impl Into<String>, argv: impl IntoIterator<Item = S>) -> TaskSpec {
        TaskSpec::new(id, TaskKind::Command(argv.into_iter().map(Into::into).collect()))
    }

    /// A task written in Rust.
    pub fn rust(id: impl Into<String>, task: impl Task) -> TaskSpec {
        TaskSpec::new(id, TaskKind::Rust { name: None, task: Arc::new(task) })
    }

    /// A task of any kind with default settings.
    pub fn new(id: impl Into<String>, kind: TaskKind) -> TaskSpec {
        TaskSpec {
            id: id.into(),
            after: Arc::from([]),
            kind,
            config: TaskConfig::default(),
            args: serde_json::Value::Null,
            env: BTreeMap::new(),
        }
    }

    /// For a command: sets environment variable `name` of each try to `template` rendered
    /// (`{{ params.KEY }}`, `{{ tasks.ID.output... }}`, `{{ run_id }}` ...). The way to hand a
    /// value from outside to a command: `.env("DAY", "{{ params.day }}")` and `"$DAY"` in it.
    pub fn env(mut self, name: impl Into<String>, template: impl Into<String>) -> TaskSpec {
        self.env.insert(name.into(), template.into());
        self
    }

    /// Waits for these tasks.
    pub fn after<S: Into<String>>(mut self, upstream: impl IntoIterator<Item = S>) -> TaskSpec {
        self.after = self.after.iter().cloned().chain(upstream.into_iter().map(Into::into)).collect();
        self
    }

    /// Tries after the first.
    pub fn retries(mut self, retries: u32) -> TaskSpec {
        self.config.retries = retries;
        self
    }

    /// Wait before the first retry, growing by `backoff` per retry up to `max`.
    pub fn retry_delay(mut self, delay: Duration, backoff: f64, max: Duration) -> TaskSpec {
        self.config.retry_delay = delay;
        self.config.retry_backoff = backoff;
        self.config.retry_delay_max = max;
        self
    }

    /// Per-try time limit.
    pub fn timeout(mut self, timeout: Duration) -> TaskSpec {
        self.config.timeout = Some(timeout);
        self
    }

    /// Worker pool.
    pub fn queue(mut self, queue: impl Into<String>) -> TaskSpec {
        self.config.queue = queue.into();
        self
    }

    /// Priority among ready tasks, 0-9.
    pub fn priority(mut self, priority: u8) -> TaskSpec {
        self.config.priority = priority;
        self
    }

    /// Settings passed to a Rust task as `ctx.args`.
    pub fn args(mut self, args: serde_json::Value) -> TaskSpec {
        self.args = args;
        self
    }

    /// Sets when the task runs, given how its upstreams ended (default `all_success`).
    pub fn trigger_rule(mut self, rule: TriggerRule) -> TaskSpec {
        self.config.trigger_rule = rule;
        self
    }

    /// Takes `slots` slots of the named pool while queued or running.
    pub fn pool(mut self, pool: impl Into<String>, slots: u32) -> TaskSpec {
        self.config.pool = Some(pool.into());
        self.config.pool_slots = slots;
        self
    }

    /// At most `max` tries of this task queued or running at once, across the DAG's runs.
    pub fn max_active(mut self, max: u32) -> TaskSpec {
        self.config.max_active = Some(max);
        self
    }

    /// Makes this a branch task: its output (one id or a list of ids) names which of its direct
    /// downstream tasks run; the others become `skipped`.
    pub fn branch(mut self) -> TaskSpec {
        self.config.branch = true;
        self
    }

    /// Sets whether to notify on final failure and on each retry.
    pub fn alerts(mut self, on_failure: bool, on_retry: bool) -> TaskSpec {
        self.config.alert_on_failure = on_failure;
        self.config.alert_on_retry = on_retry;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_caps() {
        let config = TaskConfig {
            retry_delay: Duration::from_secs(1),
            retry_backoff: 2.0,
            retry_delay_max: Duration::from_secs(5),
            ..TaskConfig::default()
        };
        let delays: Vec<u64> = (1..=5).map(|r| config.retry_delay_for(r).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5]);
    }
}
