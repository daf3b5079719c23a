//! A DAG version as the store keeps it for scheduling: the graph and every setting the scheduler
//! decides with, not what the tasks run. The scheduler writes it before the first run of the
//! version is created, so any scheduler, after any restart, schedules a run with the version it
//! was created with, also once the DAG file has changed or is gone. Workers never read it: they
//! run only definitions they loaded themselves.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dag::{Dag, DagError, TaskConfig, TaskKind, TaskSpec};
use crate::trigger::TriggerRule;

/// One version of a DAG as the scheduler needs it (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DagVersionRecord {
    /// The DAG.
    pub dag_id: String,
    /// Its version ([`Dag::version`]).
    pub version: String,
    /// At most this many runs of the DAG running at once.
    pub max_active_runs: u32,
    /// At most this many of the DAG's tasks queued or running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_active_tasks: Option<u32>,
    /// A run unfinished this long after it started fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_timeout: Option<Duration>,
    /// The tasks, every one after its upstreams.
    pub tasks: Vec<TaskVersionRecord>,
}

/// One task of a [`DagVersionRecord`]: its upstreams and settings. A setting at its default is
/// left out of the JSON, so a wide DAG's record stays small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskVersionRecord {
    /// The task's id.
    pub id: String,
    /// Ids of the tasks it waits for.
    #[serde(skip_serializing_if = "no_upstreams")]
    pub after: Arc<[String]>,
    /// Tries after the first.
    #[serde(skip_serializing_if = "is_default_retries")]
    pub retries: u32,
    /// Wait before the first retry.
    #[serde(skip_serializing_if = "is_default_retry_delay")]
    pub retry_delay: Duration,
    /// Each further retry waits this many times longer.
    #[serde(skip_serializing_if = "is_default_retry_backoff")]
    pub retry_backoff: f64,
    /// Upper bound of the wait between tries.
    #[serde(skip_serializing_if = "is_default_retry_delay_max")]
    pub retry_delay_max: Duration,
    /// Per-try time limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Worker pool (queue) the task goes to.
    #[serde(skip_serializing_if = "is_default_queue")]
    pub queue: String,
    /// Priority among ready tasks.
    #[serde(skip_serializing_if = "is_default_priority")]
    pub priority: u8,
    /// Notify on the task's final failure.
    #[serde(skip_serializing_if = "is_default_alert_on_failure")]
    pub alert_on_failure: bool,
    /// Notify on each retry.
    #[serde(skip_serializing_if = "is_default_alert_on_retry")]
    pub alert_on_retry: bool,
    /// When the task runs, given how its upstreams ended.
    #[serde(skip_serializing_if = "is_default_trigger_rule")]
    pub trigger_rule: TriggerRule,
    /// Whether the task's output chooses which of its direct downstream tasks run.
    #[serde(skip_serializing_if = "is_default_branch")]
    pub branch: bool,
    /// The named pool whose slots the task takes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// How many slots of its pool it takes.
    #[serde(skip_serializing_if = "is_default_pool_slots")]
    pub pool_slots: u32,
    /// At most this many tries of the task queued or running at once, across the DAG's runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_active: Option<u32>,
}

/// The defaults the record leaves out.
static DEFAULTS: LazyLock<TaskConfig> = LazyLock::new(TaskConfig::default);

impl Default for TaskVersionRecord {
    fn default() -> TaskVersionRecord {
        TaskVersionRecord::of(&TaskSpec::new("", TaskKind::Unloaded))
    }
}

impl TaskVersionRecord {
    /// The record of a task.
    pub fn of(task: &TaskSpec) -> TaskVersionRecord {
        let c = &task.config;
        TaskVersionRecord {
            id: task.id.clone(),
            after: task.after.clone(),
            retries: c.retries,
            retry_delay: c.retry_delay,
            retry_backoff: c.retry_backoff,
            retry_delay_max: c.retry_delay_max,
            timeout: c.timeout,
            queue: c.queue.clone(),
            priority: c.priority,
            alert_on_failure: c.alert_on_failure,
            alert_on_retry: c.alert_on_retry,
            trigger_rule: c.trigger_rule,
            branch: c.branch,
            pool: c.pool.clone(),
            pool_slots: c.pool_slots,
            max_active: c.max_active,
        }
    }

    /// The task this record describes, as a scheduler sees it: what it runs is not known.
    fn to_task(&self) -> TaskSpec {
        TaskSpec {
            id: self.id.clone(),
            after: self.after.clone(),
            kind: TaskKind::Unloaded,
            config: TaskConfig {
                retries: self.retries,
                retry_delay: self.retry_delay,
                retry_backoff: self.retry_backoff,
                retry_delay_max: self.retry_delay_max,
                timeout: self.timeout,
                queue: self.queue.clone(),
                priority: self.priority,
                alert_on_failure: self.alert_on_failure,
                alert_on_retry: self.alert_on_retry,
                trigger_rule: self.trigger_rule,
                branch: self.branch,
                pool: self.pool.clone(),
                pool_slots: self.pool_slots,
                max_active: self.max_active,
            },
            args: serde_json::Value::Null,
            env: std::collections::BTreeMap::new(),
        }
    }
}

impl DagVersionRecord {
    /// The record of a DAG's version.
    pub fn of(dag: &Dag) -> DagVersionRecord {
        DagVersionRecord {
            dag_id: dag.id.clone(),
            version: dag.version.clone(),
            max_active_runs: dag.max_active_runs,
            max_active_tasks: dag.max_active_tasks,
            run_timeout: dag.run_timeout,
            tasks: dag.tasks().iter().map(TaskVersionRecord::of).collect(),
        }
    }

    /// The DAG this record describes, validated as a DAG file's would be, with the settings a
    /// run is scheduled by. Its tasks are [`TaskKind::Unloaded`], and what concerns only new runs
    /// (schedule, start, catch-up, pause) is left at the builder's defaults: runs are created
    /// from the DAGs loaded now, never from a stored version.
    pub fn to_dag(&self) -> Result<Dag, DagError> {
        let mut builder = Dag::builder(self.dag_id.clone())
            .version(self.version.clone())
            .source("the store")
            .max_active_runs(self.max_active_runs);
        if let Some(max) = self.max_active_tasks {
            builder = builder.max_active_tasks(max);
        }
        if let Some(timeout) = self.run_timeout {
            builder = builder.run_timeout(timeout);
        }
        for task in &self.tasks {
            builder = builder.task(task.to_task());
        }
        builder.build()
    }
}

fn no_upstreams(after: &Arc<[String]>) -> bool {
    after.is_empty()
}

fn is_default_retries(value: &u32) -> bool {
    *value == DEFAULTS.retries
}

fn is_default_retry_delay(value: &Duration) -> bool {
    *value == DEFAULTS.retry_delay
}

fn is_default_retry_backoff(value: &f64) -> bool {
    *value == DEFAULTS.retry_backoff
}

fn is_default_retry_delay_max(value: &Duration) -> bool {
    *value == DEFAULTS.retry_delay_max
}

fn is_default_queue(value: &str) -> bool {
    value == DEFAULTS.queue
}

fn is_default_priority(value: &u8) -> bool {
    *value == DEFAULTS.priority
}

fn is_default_alert_on_failure(value: &bool) -> bool {
    *value == DEFAULTS.alert_on_failure
}

fn is_default_alert_on_retry(value: &bool) -> bool {
    *value == DEFAULTS.alert_on_retry
}

fn is_default_trigger_rule(value: &TriggerRule) -> bool {
    *value == DEFAULTS.trigger_rule
}

fn is_default_branch(value: &bool) -> bool {
    *value == DEFAULTS.branch
}

fn is_default_pool_slots(value: &u32) -> bool {
    *value == DEFAULTS.pool_slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(id: &str) -> TaskSpec {
        TaskSpec::command(id, ["true"])
    }

    /// Every scheduling setting survives the store; what the tasks run does not go in it.
    #[test]
    fn a_version_comes_back_from_its_record_with_every_setting() {
        let dag = Dag::builder("etl")
            .version("abc")
            .max_active_runs(2)
            .max_active_tasks(3)
            .run_timeout(Duration::from_secs(90))
            .task(cmd("pick").branch().retries(2).retry_delay(
                Duration::from_millis(1500),
                3.0,
                Duration::from_secs(60),
            ))
            .task(cmd("a").after(["pick"]).pool("db", 2).max_active(1).queue("gpu").priority(7))
            .task(cmd("b").after(["pick"]).timeout(Duration::from_secs(5)).alerts(false, true))
            .task(cmd("join").after(["a", "b"]).trigger_rule(TriggerRule::NoneFailed))
            .build()
            .unwrap();
        let record = DagVersionRecord::of(&dag);
        let json = serde_json::to_string(&record).unwrap();
        let back: DagVersionRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record);
        let stored = back.to_dag().unwrap();
        assert_eq!((stored.id.as_str(), stored.version.as_str()), ("etl", "abc"));
        assert_eq!(
            (stored.max_active_runs, stored.max_active_tasks, stored.run_timeout),
            (2, Some(3), Some(Duration::from_secs(90)))
        );
        for task in dag.tasks() {
            let again = stored.task(&task.id).unwrap();
            assert_eq!((&again.after, &again.config), (&task.after, &task.config), "task {}", task.id);
            assert!(matches!(again.kind, TaskKind::Unloaded));
            assert_eq!(stored.downstream_of(&task.id), dag.downstream_of(&task.id));
        }
        let order = |d: &Dag| d.tasks().iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        assert_eq!(order(&stored), order(&dag));
    }

    /// A stored trigger rule reads as DAG files and the API name it.
    #[test]
    fn trigger_rules_are_stored_by_their_names() {
        for rule in TriggerRule::ALL {
            assert_eq!(serde_json::to_string(&rule).unwrap(), format!("\"{}\"", rule.as_str()));
        }
    }

    /// Settings at their defaults are left out of the JSON.
    #[test]
    fn a_task_at_the_defaults_is_its_id_and_upstreams() {
        let dag = Dag::builder("d").task(cmd("a")).task(cmd("b").after(["a"])).build().unwrap();
        let json = serde_json::to_string(&DagVersionRecord::of(&dag)).unwrap();
        assert_eq!(
            json,
            r#"{"dag_id":"d","version":"rust","max_active_runs":16,"tasks":[{"id":"a"},{"id":"b","after":["a"]}]}"#
        );
    }
}
