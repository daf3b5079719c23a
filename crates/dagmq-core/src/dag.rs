//! The DAG model: tasks, their dependencies and settings, and the DAG's schedule. Built through
//! [`DagBuilder`], which refuses cycles, unknown upstreams and duplicate ids.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::params::{ParamSpec, ParamsSchema};
use crate::schedule::Schedule;
use crate::task::Task;
use crate::trigger::TriggerRule;

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

/// Collects a DAG's settings and tasks; [`DagBuilder::build`] validates them.
pub struct DagBuilder {
    /// The DAG under construction (tasks in insertion order until built).
    dag: Dag,
    /// Schedule text, parsed at build time once the timezone is known.
    schedule: Option<String>,
    /// Timezone name, parsed at build time.
    timezone: String,
}

impl DagBuilder {
    /// A manual-only DAG in UTC, catching up, at most 16 active runs.
    pub fn new(id: impl Into<String>) -> DagBuilder {
        DagBuilder {
            dag: Dag {
                id: id.into(),
                description: String::new(),
                schedule: Schedule::Manual,
                timezone: Tz::UTC,
                start: None,
                catch_up: true,
                max_active_runs: 16,
                max_active_tasks: None,
                paused: false,
                tags: Vec::new(),
                run_timeout: None,
                source: "rust".to_string(),
                version: "rust".to_string(),
                params: Arc::new(ParamsSchema::new()),
                tasks: Vec::new(),
                index: HashMap::new(),
                downstream: Vec::new(),
            },
            schedule: None,
            timezone: "UTC".to_string(),
        }
    }

    /// Free text for people.
    pub fn description(mut self, text: impl Into<String>) -> DagBuilder {
        self.dag.description = text.into();
        self
    }

    /// A six-field cron, `@every DURATION` or a shorthand such as `@daily`.
    pub fn schedule(mut self, text: impl Into<String>) -> DagBuilder {
        self.schedule = Some(text.into());
        self
    }

    /// IANA timezone name for the cron schedule.
    pub fn timezone(mut self, name: impl Into<String>) -> DagBuilder {
        self.timezone = name.into();
        self
    }

    /// No schedule point before this is due.
    pub fn start(mut self, start: DateTime<Utc>) -> DagBuilder {
        self.dag.start = Some(start);
        self
    }

    /// Whether missed schedule points each get a run.
    pub fn catch_up(mut self, catch_up: bool) -> DagBuilder {
        self.dag.catch_up = catch_up;
        self
    }

    /// How many runs may be `running` at once.
    pub fn max_active_runs(mut self, max: u32) -> DagBuilder {
        self.dag.max_active_runs = max;
        self
    }

    /// At most `max` of the DAG's tasks queued or running at once, across its runs.
    pub fn max_active_tasks(mut self, max: u32) -> DagBuilder {
        self.dag.max_active_tasks = Some(max);
        self
    }

    /// Whether the DAG starts paused.
    pub fn paused(mut self, paused: bool) -> DagBuilder {
        self.dag.paused = paused;
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> DagBuilder {
        self.dag.tags.push(tag.into());
        self
    }

    /// Fails a run that is still unfinished this long after it started.
    pub fn run_timeout(mut self, timeout: Duration) -> DagBuilder {
        self.dag.run_timeout = Some(timeout);
        self
    }

    /// Sets the version (what a DAG file's loader derives from its text).
    pub fn version(mut self, version: impl Into<String>) -> DagBuilder {
        self.dag.version = version.into();
        self
    }

    /// Where the DAG came from, for error messages.
    pub fn source(mut self, source: impl Into<String>) -> DagBuilder {
        self.dag.source = source.into();
        self
    }

    /// Declares a param: its type, default and allowed values (see [`ParamSpec`]). A DAG
    /// that declares a param refuses triggers with params it does not declare (plain defaults,
    /// [`ParamSpec::plain`], excepted).
    pub fn param(mut self, name: impl Into<String>, spec: ParamSpec) -> DagBuilder {
        Arc::make_mut(&mut self.dag.params).insert(name, spec);
        self
    }

    /// Adds a task.
    pub fn task(mut self, task: TaskSpec) -> DagBuilder {
        self.dag.tasks.push(task);
        self
    }

    /// Validates and returns the DAG: ids, upstreams, cycles, schedule, timezone, settings.
    pub fn build(self) -> Result<Dag, DagError> {
        let DagBuilder { mut dag, schedule, timezone } = self;
        let invalid = |reason: String| DagError::Invalid { dag: dag.id.clone(), reason };
        check_id(&dag.id).map_err(|reason| invalid(format!("bad dag id: {reason}")))?;
        dag.timezone = timezone.parse::<Tz>().map_err(|_| invalid(format!("unknown timezone {timezone:?}")))?;
        if let Some(text) = schedule {
            dag.schedule = Schedule::parse(&text, dag.timezone).map_err(&invalid)?;
        }
        if dag.max_active_runs == 0 {
            return Err(invalid("max_active_runs must be at least 1".to_string()));
        }
        if dag.max_active_tasks == Some(0) {
            return Err(invalid("max_active_tasks must be at least 1".to_string()));
        }
        if dag.tasks.is_empty() {
            return Err(invalid("a dag needs at least one task".to_string()));
        }
        Arc::make_mut(&mut dag.params).validate().map_err(|e| DagError::Param {
            dag: dag.id.clone(),
            param: e.param,
            reason: e.reason,
        })?;
        if !matches!(dag.schedule, Schedule::Manual)
            && let Some((name, _)) = dag.params.iter().find(|(_, spec)| spec.required)
        {
            return Err(DagError::Param {
                dag: dag.id.clone(),
                param: name.clone(),
                reason: "required without a default, but scheduled runs have only defaults: give it a default"
                    .to_string(),
            });
        }
        for task in &dag.tasks {
            check_id(&task.id).map_err(|reason| invalid(format!("task {:?}: bad id: {reason}", task.id)))?;
            if let TaskKind::Command(argv) = &task.kind
                && argv.is_empty()
            {
                return Err(invalid(format!("task {:?}: empty command", task.id)));
            }
            if task.config.pool_slots == 0 {
                return Err(invalid(format!("task {:?}: pool_slots must be at least 1", task.id)));
            }
            if task.config.max_active == Some(0) {
                return Err(invalid(format!("task {:?}: max_active must be at least 1", task.id)));
            }
            if let Some(pool) = &task.config.pool {
                check_id(pool).map_err(|reason| invalid(format!("task {:?}: bad pool name: {reason}", task.id)))?;
            }
            if task.config.priority > 9 {
                return Err(invalid(format!("task {:?}: priority must be 0-9", task.id)));
            }
            if !(task.config.retry_backoff.is_finite() && task.config.retry_backoff >= 1.0) {
                return Err(invalid(format!("task {:?}: retry_backoff must be at least 1.0", task.id)));
            }
            check_id(&task.config.queue)
                .map_err(|reason| invalid(format!("task {:?}: bad queue name: {reason}", task.id)))?;
            check_templates(&dag.id, &dag.params, task)?;
        }
        let mut word_starts = BTreeMap::new();
        for task in &dag.tasks {
            let TaskKind::Command(argv) = &task.kind else { continue };
            for name in argv.iter().flat_map(|arg| crate::template::word_start_placeholders(arg)) {
                if let Some(param) = name.strip_prefix("params.") {
                    word_starts.entry(param.to_string()).or_insert_with(|| task.id.clone());
                }
            }
        }
        Arc::make_mut(&mut dag.params).set_word_starts(word_starts).map_err(|e| DagError::Param {
            dag: dag.id.clone(),
            param: e.param,
            reason: e.reason,
        })?;
        let order = topological_order(&dag.id, &dag.tasks)?;
        let mut slots: Vec<Option<TaskSpec>> = dag.tasks.drain(..).map(Some).collect();
        dag.tasks = order.into_iter().filter_map(|i| slots[i].take()).collect();
        dag.index = dag.tasks.iter().enumerate().map(|(i, t)| (t.id.clone(), i)).collect();
        dag.downstream = vec![Vec::new(); dag.tasks.len()];
        for (i, task) in dag.tasks.iter().enumerate() {
            for up in task.after.iter() {
                if let Some(&u) = dag.index.get(up) {
                    dag.downstream[u].push(i);
                }
            }
        }
        check_output_references(&dag)?;
        for task in dag.tasks.iter().filter(|t| t.config.branch) {
            if dag.downstream_of(&task.id).is_empty() {
                return Err(invalid(format!(
                    "task {:?}: branch = true, but no task runs after it, so there is nothing to choose",
                    task.id
                )));
            }
        }
        Ok(dag)
    }
}

/// Refuses what a task may not template: in `command`, anything but dagmq's own values and
/// params of a type whose values are plain words (values from outside would be pasted into a
/// command line, where a shell, an interpreter or an option parser may take them for code);
/// in `env`, bad names and unclosed placeholders.
fn check_templates(dag: &str, params: &ParamsSchema, task: &TaskSpec) -> Result<(), DagError> {
    let env_error = |reason: String| DagError::Env { dag: dag.to_string(), task: task.id.clone(), reason };
    let argv = match &task.kind {
        TaskKind::Command(argv) => argv,
        _ if !task.env.is_empty() => {
            return Err(env_error(
                "is for command tasks; a Rust task reads ctx.params and ctx.inputs() itself".to_string(),
            ));
        }
        _ => return Ok(()),
    };
    for (name, template) in &task.env {
        crate::params::check_env_name(name).map_err(&env_error)?;
        let names = crate::template::placeholders(template).map_err(|e| env_error(format!("{name}: {e}")))?;
        for placeholder in &names {
            if let Some(reason) = env_template_refusal(params, placeholder) {
                return Err(env_error(format!("{name}: {{{{ {placeholder} }}}}: {reason}")));
            }
        }
        if let (Some(first), Some(entry)) = (names.first(), crate::params::code_env_name(name)) {
            return Err(env_error(format!(
                "{name} takes a template, but programs other than the task's own read {name} ({entry}) as code, \
                 options or a place to load code from, so a value put there could run as code in any of them; \
                 only a literal value may set it. Pass the value under a name of your own: \
                 env = {{ VALUE = \"{{{{ {first} }}}}\" }} and \"$VALUE\" in the command"
            )));
        }
    }
    for arg in argv {
        let names = crate::template::placeholders(arg).map_err(|reason| DagError::Invalid {
            dag: dag.to_string(),
            reason: format!("task {:?}: command: {reason}", task.id),
        })?;
        for name in names {
            if let Some(reason) = command_template_refusal(params, name) {
                return Err(DagError::CommandTemplate {
                    dag: dag.to_string(),
                    task: task.id.clone(),
                    name: name.to_string(),
                    reason,
                });
            }
        }
    }
    Ok(())
}

/// Why `{{ name }}` names nothing a task's `env` can be given, or `None` when it names
/// dagmq's own value, a param (one the DAG declares, when it declares any) or an upstream
/// output.
fn env_template_refusal(params: &ParamsSchema, name: &str) -> Option<String> {
    if crate::params::DAGMQ_VALUES.contains(&name) {
        return None;
    }
    if let Some(param) = name.strip_prefix("params.") {
        if !params.declared() || params.get(param).is_some() {
            return None;
        }
        let known: Vec<&str> = params.iter().map(|(name, _)| name.as_str()).collect();
        return Some(format!("param {param:?} is not declared (this dag declares: {})", known.join(", ")));
    }
    let output = name
        .strip_prefix("tasks.")
        .and_then(|tail| tail.split_once(".output"))
        .is_some_and(|(id, rest)| !id.is_empty() && (rest.is_empty() || rest.starts_with('.')));
    if output {
        return None;
    }
    Some(format!(
        "unknown template variable (known: {}, params.NAME, tasks.ID.output)",
        crate::params::DAGMQ_VALUES.join(", ")
    ))
}

/// Why `{{ name }}` may not be templated into a command (with what to write instead), or
/// `None` when it may.
fn command_template_refusal(params: &ParamsSchema, name: &str) -> Option<String> {
    const RULE: &str = "only dagmq's own values (run_id, dag_id, task_id, try, logical_date, ds) and params of \
                        type integer, number, boolean, date, datetime or enum may be templated into a command, where \
                        text from outside could become code or options";
    if crate::params::DAGMQ_VALUES.contains(&name) {
        return None;
    }
    if let Some(param) = name.strip_prefix("params.") {
        let what = match params.get(param) {
            Some(spec) if spec.safe_in_command() => return None,
            Some(spec) if spec.kind.is_some() => format!("param {param:?} is a string"),
            Some(_) => format!("param {param:?} has no type"),
            None => format!("param {param:?} is not declared"),
        };
        let var: String = crate::params::param_env_name(param).trim_start_matches("DAGMQ_PARAM_").to_string();
        return Some(format!(
            "{what}; {RULE}. Pass it through the environment: env = {{ {var} = \"{{{{ {name} }}}}\" }} in the task \
             and \"${var}\" in the command (or ${})",
            crate::params::param_env_name(param)
        ));
    }
    if name.starts_with("tasks.") && name.contains(".output") {
        return Some(format!(
            "an upstream output is text from outside; {RULE}. Pass it through the environment: \
             env = {{ VALUE = \"{{{{ {name} }}}}\" }} in the task and \"$VALUE\" in the command (or read \
             $DAGMQ_INPUTS)"
        ));
    }
    Some(format!(
        "unknown template variable (known in a command: {}, and params.NAME of a safe type)",
        crate::params::DAGMQ_VALUES.join(", ")
    ))
}

/// Refuses a task that reads `{{ tasks.ID.output }}` (in its `env`) of a task that is not its
/// ancestor. Only tasks with such references cost a walk up the graph.
fn check_output_references(dag: &Dag) -> Result<(), DagError> {
    for task in &dag.tasks {
        let TaskKind::Command(argv) = &task.kind else { continue };
        let texts = argv.iter().chain(task.env.values());
        for referenced in texts.flat_map(|text| crate::template::output_references(text)) {
            if !is_ancestor(dag, &referenced, task) {
                return Err(DagError::NotAnAncestor { dag: dag.id.clone(), task: task.id.clone(), referenced });
            }
        }
    }
    Ok(())
}

/// Whether `ancestor` is reached by walking up from `task`'s upstreams.
fn is_ancestor(dag: &Dag, ancestor: &str, task: &TaskSpec) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<&str> = task.after.iter().map(String::as_str).collect();
    while let Some(id) = stack.pop() {
        if id == ancestor {
            return true;
        }
        if seen.insert(id)
            && let Some(up) = dag.task(id)
        {
            stack.extend(up.after.iter().map(String::as_str));
        }
    }
    false
}

/// The pools a process knows, by name, with their slots.
pub type Pools = BTreeMap<String, u32>;

/// The first task of `dag` that names a pool not in `pools`, as an error that says where pools
/// come from.
pub fn check_pools(dag: &Dag, pools: &Pools) -> Result<(), DagError> {
    for task in &dag.tasks {
        if let Some(pool) = &task.config.pool {
            match pools.get(pool) {
                None => {
                    let known: Vec<&str> = pools.keys().map(String::as_str).collect();
                    let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                    return Err(DagError::Invalid {
                        dag: dag.id.clone(),
                        reason: format!(
                            "task {:?}: unknown pool {pool:?} (pools: {known}; declare it under [pools] in the \
                             config file or with --pool {pool}=SLOTS)",
                            task.id
                        ),
                    });
                }
                Some(&slots) if slots < task.config.pool_slots => {
                    return Err(DagError::Invalid {
                        dag: dag.id.clone(),
                        reason: format!(
                            "task {:?}: pool_slots {} is more than pool {pool:?} has ({slots}), so it could never run",
                            task.id, task.config.pool_slots
                        ),
                    });
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Ids are what URLs, queue names and Redis keys carry: letters, digits, `_`, `-` and `.`.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty".to_string());
    }
    if id.len() > 200 {
        return Err(format!("{id:?} is longer than 200 characters"));
    }
    if let Some(bad) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!("{id:?} contains {bad:?}; use letters, digits, '_', '-' and '.'"));
    }
    Ok(())
}

/// Indices of `tasks` in an order where every task follows its upstreams; refuses duplicates,
/// unknown upstreams and cycles (naming the tasks of the cycle).
fn topological_order(dag: &str, tasks: &[TaskSpec]) -> Result<Vec<usize>, DagError> {
    let mut index = HashMap::new();
    for (i, task) in tasks.iter().enumerate() {
        if index.insert(task.id.as_str(), i).is_some() {
            return Err(DagError::DuplicateTask { dag: dag.to_string(), task: task.id.clone() });
        }
    }
    let mut upstreams: Vec<Vec<usize>> = Vec::with_capacity(tasks.len());
    for task in tasks {
        let mut ups = Vec::with_capacity(task.after.len());
        for up in task.after.iter() {
            match index.get(up.as_str()) {
                Some(&i) => ups.push(i),
                None => {
                    return Err(DagError::UnknownUpstream {
                        dag: dag.to_string(),
                        task: task.id.clone(),
                        upstream: up.clone(),
                    });
                }
            }
        }
        upstreams.push(ups);
    }
    // Depth-first search with colours; the grey stack names the cycle when one is found.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour = vec![Colour::White; tasks.len()];
    let mut order = Vec::with_capacity(tasks.len());
    for root in 0..tasks.len() {
        if colour[root] != Colour::White {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        colour[root] = Colour::Grey;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&up) = upstreams[node].get(*next) {
                *next += 1;
                match colour[up] {
                    Colour::White => {
                        colour[up] = Colour::Grey;
                        stack.push((up, 0));
                    }
                    Colour::Grey => {
                        let from = stack.iter().position(|&(n, _)| n == up).unwrap_or(0);
                        let mut path: Vec<String> = stack[from..].iter().map(|&(n, _)| tasks[n].id.clone()).collect();
                        path.reverse();
                        path.insert(0, tasks[up].id.clone());
                        return Err(DagError::Cycle { dag: dag.to_string(), path });
                    }
                    Colour::Black => {}
                }
            } else {
                colour[node] = Colour::Black;
                order.push(node);
                stack.pop();
            }
        }
    }
    Ok(order)
}

/// A DAG file's version: the FNV-1a 64-bit hash of its text, in hex. Stable across builds and
/// machines, so a scheduler and its workers agree on it.
pub fn content_version(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The DAGs a process has loaded, replaced as a whole when its DAG files change (live reload),
/// with every version it has loaded, so a run completes with the definition it was created
/// with. Readers take a snapshot (`current`); a reload bumps `generation`.
///
/// Whoever keeps the set up to date (the binary's reloader) also answers requests to read the
/// sources now ([`LiveDags::request_read`]): a worker handed a try of a version it has not
/// loaded yet asks for one, and waits for the reads that follow ([`LiveDags::reads`]).
#[derive(Default)]
pub struct LiveDags {
    state: std::sync::RwLock<LiveState>,
    /// Requests to read the sources now; one made while a read is under way is kept for the
    /// next.
    requests: tokio::sync::Notify,
    /// Counts the reads of the sources (each replacement, and each read that found nothing
    /// new), so that a waiter wakes up after each.
    reads: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct LiveState {
    current: Arc<DagRegistry>,
    refused: Arc<Vec<(String, String)>>,
    default_params: Arc<HashMap<String, crate::task::Params>>,
    /// Every version loaded, by DAG id and version (looked up by `&str` on a worker's hot path).
    versions: HashMap<String, HashMap<String, Arc<Dag>>>,
    generation: u64,
}

impl LiveDags {
    /// The DAGs loaded at start, the files refused, and the files' `[params]` defaults.
    pub fn new(
        dags: DagRegistry,
        refused: Vec<(String, String)>,
        default_params: HashMap<String, crate::task::Params>,
    ) -> LiveDags {
        let live = LiveDags::default();
        live.replace(dags, refused, default_params);
        live
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, LiveState> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The DAGs loaded now.
    pub fn current(&self) -> Arc<DagRegistry> {
        self.read().current.clone()
    }

    /// The files refused at the last (re)load, as (file, `file:line: reason`).
    pub fn refused(&self) -> Arc<Vec<(String, String)>> {
        self.read().refused.clone()
    }

    /// `[params]` defaults per DAG.
    pub fn default_params(&self) -> Arc<HashMap<String, crate::task::Params>> {
        self.read().default_params.clone()
    }

    /// Bumped by every reload.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// The definition of `dag_id` at `version`, if this process has loaded it at some point.
    pub fn version(&self, dag_id: &str, version: &str) -> Option<Arc<Dag>> {
        self.read().versions.get(dag_id).and_then(|versions| versions.get(version)).cloned()
    }

    /// The versions of `dag_id` this process has loaded.
    pub fn versions_of(&self, dag_id: &str) -> Vec<String> {
        let mut versions: Vec<String> =
            self.read().versions.get(dag_id).map(|v| v.keys().cloned().collect()).unwrap_or_default();
        versions.sort();
        versions
    }

    /// Asks whoever keeps this set up to date to read its sources now (a worker handed a try of a
    /// version it has not loaded). Without a reloader, nobody answers, and the set changes only
    /// when it is replaced.
    pub fn request_read(&self) {
        self.requests.notify_one();
    }

    /// Waits for a [`LiveDags::request_read`] (made before or during this wait), for the
    /// reloader.
    pub async fn read_requested(&self) {
        self.requests.notified().await;
    }

    /// Tells the waiters that the sources were read and nothing changed (a replacement tells
    /// them itself).
    pub fn read_done(&self) {
        self.reads.send_modify(|reads| *reads += 1);
    }

    /// A receiver that sees a change after every read of the sources: a replacement, or a read
    /// that found nothing new. Take it before looking for a version, so that no read between
    /// the look and the wait is missed.
    pub fn reads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reads.subscribe()
    }

    /// Puts a new set in place; earlier versions stay known.
    pub fn replace(
        &self,
        dags: DagRegistry,
        refused: Vec<(String, String)>,
        default_params: HashMap<String, crate::task::Params>,
    ) {
        let mut state = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for dag in dags.iter() {
            state.versions.entry(dag.id.clone()).or_default().entry(dag.version.clone()).or_insert_with(|| dag.clone());
        }
        state.current = Arc::new(dags);
        state.refused = Arc::new(refused);
        state.default_params = Arc::new(default_params);
        state.generation += 1;
        drop(state);
        self.read_done();
    }
}

/// DAGs by id, as the scheduler and workers load them.
#[derive(Default, Clone)]
pub struct DagRegistry {
    /// DAGs by id, sorted for stable listings.
    dags: BTreeMap<String, Arc<Dag>>,
}

impl DagRegistry {
    /// An empty registry.
    pub fn new() -> DagRegistry {
        DagRegistry::default()
    }

    /// Adds a DAG that is shared already (a reload keeping the last good version).
    pub fn add_shared(&mut self, dag: Arc<Dag>) -> Result<(), DagError> {
        if let Some(existing) = self.dags.get(&dag.id) {
            return Err(DagError::Invalid {
                dag: dag.id.clone(),
                reason: format!("defined twice: in {} and in {}", existing.source, dag.source),
            });
        }
        self.dags.insert(dag.id.clone(), dag);
        Ok(())
    }

    /// Adds a DAG; refuses a second DAG with the same id.
    pub fn add(&mut self, dag: Dag) -> Result<(), DagError> {
        if let Some(existing) = self.dags.get(&dag.id) {
            return Err(DagError::Invalid {
                dag: dag.id.clone(),
                reason: format!("defined twice: in {} and in {}", existing.source, dag.source),
            });
        }
        self.dags.insert(dag.id.clone(), Arc::new(dag));
        Ok(())
    }

    /// One DAG by id.
    pub fn get(&self, id: &str) -> Option<&Arc<Dag>> {
        self.dags.get(id)
    }

    /// All DAGs, sorted by id.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Dag>> {
        self.dags.values()
    }

    /// Number of DAGs.
    pub fn len(&self) -> usize {
        self.dags.len()
    }

    /// Whether there are no DAGs.
    pub fn is_empty(&self) -> bool {
        self.dags.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(id: &str) -> TaskSpec {
        TaskSpec::command(id, ["true"])
    }

    fn check(builder: DagBuilder, expected: Result<Vec<&str>, &str>) {
        match (builder.build(), expected) {
            (Ok(dag), Ok(order)) => assert_eq!(dag.tasks().iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), order),
            (Err(err), Err(message)) => assert_eq!(err.to_string(), message),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[tokio::test]
    async fn a_read_request_reaches_the_reloader_and_each_read_wakes_the_waiters() {
        let registry = |version: &str| {
            let mut dags = DagRegistry::new();
            dags.add(Dag::builder("d").version(version).task(cmd("a")).build().unwrap()).unwrap();
            dags
        };
        let live = LiveDags::new(registry("v1"), Vec::new(), HashMap::new());
        // A request made before the reloader waits is kept for it.
        live.request_read();
        live.read_requested().await;
        let mut reads = live.reads();
        assert!(!reads.has_changed().unwrap());
        live.read_done();
        assert!(reads.has_changed().unwrap(), "a read that found nothing new wakes the waiters");
        reads.borrow_and_update();
        assert!(live.version("d", "v2").is_none());
        live.replace(registry("v2"), Vec::new(), HashMap::new());
        assert!(reads.has_changed().unwrap(), "a replacement wakes the waiters");
        assert!(live.version("d", "v2").is_some() && live.version("d", "v1").is_some());
    }

    #[test]
    fn builds_in_dependency_order() {
        check(
            Dag::builder("d").task(cmd("c").after(["b"])).task(cmd("b").after(["a"])).task(cmd("a")),
            Ok(vec!["a", "b", "c"]),
        );
        check(
            Dag::builder("diamond")
                .task(cmd("join").after(["l", "r"]))
                .task(cmd("l").after(["root"]))
                .task(cmd("r").after(["root"]))
                .task(cmd("root")),
            Ok(vec!["root", "l", "r", "join"]),
        );
    }

    #[test]
    fn refuses_bad_graphs() {
        check(
            Dag::builder("etl").task(cmd("extract")).task(cmd("load").after(["extrct"])),
            Err(r#"dag "etl", task "load": unknown upstream "extrct""#),
        );
        check(Dag::builder("etl").task(cmd("a")).task(cmd("a")), Err(r#"dag "etl": duplicate task id "a""#));
        check(
            Dag::builder("etl").task(cmd("a").after(["c"])).task(cmd("b").after(["a"])).task(cmd("c").after(["b"])),
            Err(r#"dag "etl": cycle a -> b -> c -> a"#),
        );
        check(Dag::builder("etl").task(cmd("a").after(["a"])), Err(r#"dag "etl": cycle a -> a"#));
        check(Dag::builder("etl"), Err(r#"dag "etl": a dag needs at least one task"#));
    }

    #[test]
    fn refuses_bad_settings() {
        check(
            Dag::builder("etl").schedule("0 0 25 * * *").task(cmd("a")),
            Err(r#"dag "etl": bad cron "0 0 25 * * *": hour field "25": "25" is outside 0-23 or reversed"#),
        );
        check(
            Dag::builder("etl").timezone("Mars/Olympus").task(cmd("a")),
            Err(r#"dag "etl": unknown timezone "Mars/Olympus""#),
        );
        check(
            Dag::builder("e t l").task(cmd("a")),
            Err(r#"dag "e t l": bad dag id: "e t l" contains ' '; use letters, digits, '_', '-' and '.'"#),
        );
        check(
            Dag::builder("etl").max_active_runs(0).task(cmd("a")),
            Err(r#"dag "etl": max_active_runs must be at least 1"#),
        );
        check(
            Dag::builder("etl").task(TaskSpec::command("a", Vec::<String>::new())),
            Err(r#"dag "etl": task "a": empty command"#),
        );
    }

    #[test]
    fn rust_dags_declare_params_and_template_like_files() {
        use crate::params::{ParamSpec, ParamType};
        let dag = Dag::builder("etl")
            .param("day", ParamSpec::typed(ParamType::Date).default_value(serde_json::json!("2026-01-01")))
            .param("who", ParamSpec::typed(ParamType::String).max_length(20))
            .task(TaskSpec::command("a", ["sh", "-c", "echo {{ params.day }} \"$WHO\""]).env("WHO", "{{ params.who }}"))
            .build()
            .unwrap();
        assert!(dag.params.declared());
        assert_eq!(dag.params.defaults(), [("day".to_string(), serde_json::json!("2026-01-01"))].into());
        assert_eq!(dag.task("a").unwrap().env["WHO"], "{{ params.who }}");
        let err = Dag::builder("etl")
            .param("who", ParamSpec::typed(ParamType::String))
            .task(TaskSpec::command("a", ["sh", "-c", "echo {{ params.who }}"]))
            .build()
            .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "dag \"etl\", task \"a\": {{ params.who }} in `command`: param \"who\" is a string; only dagmq's own"
            ),
            "{err}"
        );
        check(
            Dag::builder("etl")
                .param("n", ParamSpec::typed(ParamType::Integer).default_value(serde_json::json!(1.5)))
                .task(cmd("a")),
            Err(r#"dag "etl": param "n": default: expected an integer, got 1.5"#),
        );
        check(Dag::builder("etl").task(cmd("a").env("", "x")), Err(r#"dag "etl", task "a": env: an empty name"#));
        // A negative number where a word starts would be an option: refused at trigger (and by
        // the worker's check); after an option's `=` it is that option's value.
        let dag = Dag::builder("etl")
            .param("n", ParamSpec::typed(ParamType::Integer))
            .param("x", ParamSpec::typed(ParamType::Number))
            .task(TaskSpec::command("a", ["sh", "-c", "tail {{ params.n }} f --x={{ params.x }}"]))
            .build()
            .unwrap();
        let given = |name: &str, value: serde_json::Value| [(name.to_string(), value)].into();
        let err = dag.params.resolve(given("n", serde_json::json!(-1))).unwrap_err();
        assert!(err.starts_with("param \"n\": -1 starts with '-', and task \"a\" templates"), "{err}");
        assert!(dag.params.check("n", serde_json::json!(-1)).is_err());
        dag.params.resolve(given("n", serde_json::json!(1))).unwrap();
        dag.params.resolve(given("x", serde_json::json!(-1e300))).unwrap();
        // Rust DAGs go through the same env check as files.
        let err = Dag::builder("etl")
            .param("s", ParamSpec::typed(ParamType::String))
            .task(cmd("a").env("BASH_ENV", "{{ params.s }}"))
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("dag \"etl\", task \"a\": env: BASH_ENV takes a template, but "), "{err}");
    }

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

    #[test]
    fn registry_refuses_duplicate_dag() {
        let mut registry = DagRegistry::new();
        registry.add(Dag::builder("a").source("a.toml").task(cmd("t")).build().unwrap()).unwrap();
        let err = registry.add(Dag::builder("a").source("b.toml").task(cmd("t")).build().unwrap()).unwrap_err();
        assert_eq!(err.to_string(), r#"dag "a": defined twice: in a.toml and in b.toml"#);
    }
}
