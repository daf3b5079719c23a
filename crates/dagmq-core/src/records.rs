//! What the store keeps: runs, task instances (DRTs), workers and DAG metadata. These are
//! serialized into Redis, so they are a boundary too and derive serde.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::state::{RunState, TaskState};
use crate::task::{FollowUp, Params};

/// Why a run exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// Created by the schedule for a schedule point.
    Scheduled,
    /// Created by a trigger through the API (the CLI and the UI use it).
    Manual,
    /// Created by a trigger message on `dagmq.triggers` (an outside producer).
    Message,
    /// Created by a backfill for a schedule point in a range (same id as the scheduled run of
    /// that point would have, so a point never gets two runs).
    Backfill,
}

/// Interrupted tries after which a task fails instead of being requeued again.
pub const MAX_INTERRUPTIONS: u32 = 3;

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// One DAG run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Unique id; for scheduled runs derived from the DAG and schedule point, so a point can never
    /// get two runs.
    pub run_id: String,
    /// The DAG.
    pub dag_id: String,
    /// Current state.
    pub state: RunState,
    /// Scheduled or manual.
    pub kind: RunKind,
    /// The schedule point (scheduled) or trigger time (manual).
    pub logical_date: DateTime<Utc>,
    /// Parameters given to every task.
    #[serde(default)]
    pub params: Params,
    /// Idempotency key of the trigger, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When the run was created.
    pub created_at: DateTime<Utc>,
    /// When it last went to `running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// The version of the DAG the run was created with ([`crate::Dag::version`]); it completes
    /// with that definition. Absent in runs created before versions were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dag_version: Option<String>,
}

/// One task in one run (DRT): its state and the bookkeeping of its tries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInstance {
    /// Task id within the run.
    pub task_id: String,
    /// Current state.
    pub state: TaskState,
    /// Current try: 0 before the first, then 1, 2, ...; never reused within a run.
    pub try_number: u32,
    /// The last try the current retry budget allows; a failure at this try is final.
    pub max_try: u32,
    /// Tries after the first in each budget (a restart grants a new budget).
    #[serde(default)]
    pub retries: u32,
    /// Upstream task ids (including follow-ups inserted before it); shared, as it rarely
    /// changes and an instance is copied at every transition.
    #[serde(default)]
    pub after: Arc<[String]>,
    /// Worker pool.
    pub queue: String,
    /// For a follow-up task: what it runs (static tasks are found in the DAG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_up: Option<Box<FollowUp>>,
    /// When the current try was queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<DateTime<Utc>>,
    /// When the current try started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the current try ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// For `up_for_retry`: when the next try is queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    /// Worker running or last running the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// The worker process (incarnation) running the try; a restarted worker with the same name
    /// is another instance, and the tries of the old one are lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_instance: Option<String>,
    /// Error of the last failed try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last lines of the last failed try's log (at most [`LOG_TAIL_LINES`], each cut to
    /// [`LOG_TAIL_LINE_BYTES`]), kept with the try so that a run's page shows why it failed
    /// without reading any log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
    /// Progress reported by the running try, 0.0 to 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// How many tries were interrupted (worker lost or stopped) rather than failed; bounded so a
    /// task that kills its worker every time ends as failed instead of looping.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interruptions: u32,
    /// Follow-up tasks returned by the successful try, kept here so that a lost status message
    /// cannot lose them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub follow_ups: Vec<FollowUp>,
    /// What the successful try handed on (JSON, at most [`crate::task::MAX_OUTPUT_BYTES`]);
    /// kept per try here in the store, never carried in a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Value>,
    /// The task's earlier tries, oldest first (at most [`MAX_TRY_HISTORY`]): what the Gantt
    /// chart draws beside the current try.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tries: Vec<TryRecord>,
}

/// Lines of a failed try's log kept with the task ([`TaskInstance::log_tail`]).
pub const LOG_TAIL_LINES: usize = 10;

/// Longest line of [`TaskInstance::log_tail`], in bytes; a longer one is cut.
pub const LOG_TAIL_LINE_BYTES: usize = 500;

/// How many earlier tries a task keeps.
pub const MAX_TRY_HISTORY: usize = 50;

/// One earlier try of a task: when it was queued, ran and ended, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TryRecord {
    /// The try.
    pub try_number: u32,
    /// How it ended: a task state's name (`success`, `failed`, `up_for_retry`, `suspended`,
    /// `cancelled`), or `interrupted` (its worker stopped or was lost).
    pub outcome: String,
    /// When it was queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<DateTime<Utc>>,
    /// When a worker started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// The worker that ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Why it failed, for a failed try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last lines of its log, for a failed try ([`TaskInstance::log_tail`] as it ended); only
    /// the newest [`LOG_TAIL_TRIES`] filed tries keep theirs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
}

/// Longest error a task keeps, in bytes (the current try's and each filed try's): a longer one is
/// cut at a character boundary and ends with [`ERROR_CUT_MARKER`], so that a task retried many
/// times with a large error does not grow its record (read and rewritten at every transition)
/// without bound.
pub const MAX_ERROR_BYTES: usize = 4096;

/// Ends an error cut at [`MAX_ERROR_BYTES`].
pub const ERROR_CUT_MARKER: &str = " [dagmq: error cut at 4 KiB]";

/// `error` cut to [`MAX_ERROR_BYTES`], marked when cut.
pub fn cut_error(error: String) -> String {
    crate::store::cut_marked(error, MAX_ERROR_BYTES, ERROR_CUT_MARKER)
}

/// How many of a task's filed tries keep the last lines of their log ([`TryRecord::log_tail`]),
/// the newest ones: with [`LOG_TAIL_LINES`] lines of at most [`LOG_TAIL_LINE_BYTES`] each, a
/// task's record grows by at most 25 KB for them however often it is retried.
pub const LOG_TAIL_TRIES: usize = 5;

impl TaskInstance {
    /// Files the current try in `tries` before a new one replaces it (a retry, a requeue, a
    /// resume, a restart or a clear), with its error and the last lines of its log; `outcome`
    /// says how it ended, `now` stands in for an end the try did not record. Nothing happens
    /// before the first try, or when it is filed.
    pub fn close_try(&mut self, outcome: &str, now: DateTime<Utc>) {
        if self.try_number == 0 || self.tries.last().is_some_and(|t| t.try_number >= self.try_number) {
            return;
        }
        if self.tries.len() >= MAX_TRY_HISTORY {
            self.tries.remove(0);
        }
        self.tries.push(TryRecord {
            try_number: self.try_number,
            outcome: outcome.to_string(),
            queued_at: self.queued_at,
            started_at: self.started_at,
            ended_at: self.ended_at.or(self.started_at.map(|_| now)),
            worker: self.worker.clone(),
            error: self.error.clone().map(cut_error),
            log_tail: self.log_tail.clone(),
        });
        let keeping_tails = self.tries.len().saturating_sub(LOG_TAIL_TRIES);
        for older in &mut self.tries[..keeping_tails] {
            older.log_tail.clear();
        }
    }

    /// The next try of this task, `queued` at `now`: the current try is filed in the history and
    /// what it left is cleared. A try that a suspension stopped does not count against the
    /// retries. The scheduler queues tasks so, and a worker that claims a downstream task as
    /// it records its upstream's success (eager dispatch) makes the same try of it.
    pub fn next_try(&self, now: DateTime<Utc>) -> TaskInstance {
        let mut new = self.queued_again(self.state.as_str(), now);
        if self.state == TaskState::Suspended {
            new.max_try += 1;
        }
        new
    }

    /// The next try, `queued` at `now`, with the current one filed as `outcome`.
    fn queued_again(&self, outcome: &str, now: DateTime<Utc>) -> TaskInstance {
        let mut new = self.clone();
        new.close_try(outcome, now);
        new.state = TaskState::Queued;
        new.try_number += 1;
        new.queued_at = Some(now);
        new.started_at = None;
        new.ended_at = None;
        new.retry_at = None;
        new.worker = None;
        new.worker_instance = None;
        new.error = None;
        new.log_tail.clear();
        new.progress = None;
        new.follow_ups.clear();
        new
    }

    /// This queued try as `claimant` claims it: `running`, started at the claimant's time, under
    /// its name and process instance.
    pub fn claimed_by(&self, claimant: &crate::store::Claimant) -> TaskInstance {
        let mut running = self.clone();
        running.state = TaskState::Running;
        running.started_at = Some(claimant.at);
        running.worker = Some(claimant.worker.clone());
        running.worker_instance = Some(claimant.instance.clone());
        running.progress = None;
        running
    }

    /// A task that has not run yet, with a budget of `retries` tries after the first.
    pub fn pending(
        task_id: impl Into<String>,
        after: impl Into<Arc<[String]>>,
        queue: impl Into<String>,
        retries: u32,
    ) -> TaskInstance {
        TaskInstance {
            task_id: task_id.into(),
            state: TaskState::Pending,
            try_number: 0,
            max_try: retries + 1,
            retries,
            after: after.into(),
            queue: queue.into(),
            follow_up: None,
            queued_at: None,
            started_at: None,
            ended_at: None,
            retry_at: None,
            worker: None,
            worker_instance: None,
            error: None,
            log_tail: Vec::new(),
            progress: None,
            interruptions: 0,
            follow_ups: Vec::new(),
            output: None,
            tries: Vec::new(),
        }
    }

    /// The instance once a suspension of its run stopped its try (a queued or running one):
    /// `suspended`, ended at `now`, with the reason; resuming the run queues a new try, which
    /// does not count against retries. `None` for a task no suspension stops.
    pub fn stopped_by_suspension(&self, now: DateTime<Utc>) -> Option<TaskInstance> {
        let state = crate::state::task_transition(self.state, crate::state::TaskEvent::Suspend).ok()?;
        let mut new = self.clone();
        new.state = state;
        new.ended_at = Some(now);
        new.error = Some(format!("try {} stopped: the run was suspended", self.try_number));
        new.progress = None;
        Some(new)
    }

    /// What follows a try that was interrupted (its worker lost or stopped) rather than failed:
    /// the next try, queued with one more try granted; or, once interruptions reach
    /// [`MAX_INTERRUPTIONS`], the task failed for good. `reason` says what interrupted it.
    pub fn after_interruption(&self, now: DateTime<Utc>, reason: String) -> TaskInstance {
        // The interrupted try is filed with the reason as its error.
        let mut interrupted = self.clone();
        interrupted.error = Some(reason.clone());
        if self.interruptions >= MAX_INTERRUPTIONS {
            let mut next = interrupted;
            next.close_try("interrupted", now);
            next.state = TaskState::Failed;
            next.ended_at = Some(now);
            next.error = Some(format!("{reason}; interrupted {} times, giving up", self.interruptions + 1));
            return next;
        }
        let mut next = interrupted.queued_again("interrupted", now);
        next.max_try += 1;
        next.interruptions += 1;
        next.error = Some(reason);
        next
    }

    /// Tries left in the current budget after the current one.
    pub fn tries_left(&self) -> u32 {
        self.max_try.saturating_sub(self.try_number)
    }
}

/// A worker as it registers itself and heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Unique name (`--name`, default host and process id).
    pub name: String,
    /// This process of the worker: changes when a worker restarts under the same name.
    #[serde(default)]
    pub instance: String,
    /// Host it runs on.
    pub host: String,
    /// Pools it consumes.
    pub queues: Vec<String>,
    /// Most tasks it runs at once.
    pub concurrency: u32,
    /// Tries it is running now.
    pub running: Vec<RunningTry>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its latest heartbeat.
    pub last_heartbeat: DateTime<Utc>,
}

/// One try a worker is running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningTry {
    /// The run.
    pub run_id: String,
    /// The task.
    pub task_id: String,
    /// The try.
    pub try_number: u32,
}

/// What the store keeps per DAG beyond the DAG file: the scheduler's bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DagRecord {
    /// The DAG.
    pub dag_id: String,
    /// Paused by an operator (overrides the file's `paused` once set).
    pub paused: bool,
    /// When the scheduler first saw the DAG: its start when the DAG file names none.
    pub first_seen: DateTime<Utc>,
    /// The newest schedule point that has a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_kept_to_4_kib_in_the_task_and_in_each_filed_try() {
        let now = Utc::now();
        let mut task = TaskInstance::pending("t", vec![], "default", 60);
        let error = "é".repeat(50 * 1024);
        for try_number in 1..=50 {
            task.try_number = try_number;
            task.error = Some(cut_error(error.clone()));
            task.close_try("up_for_retry", now);
        }
        let cut = task.tries[0].error.as_deref().unwrap();
        assert!(
            cut.len() <= MAX_ERROR_BYTES + ERROR_CUT_MARKER.len() && cut.ends_with(ERROR_CUT_MARKER),
            "{}",
            cut.len()
        );
        let bytes = serde_json::to_string(&task).unwrap_or_default().len();
        assert!(bytes < 300 * 1024, "a task record of {bytes} bytes");
        assert_eq!(cut_error("short".to_string()), "short");
    }

    #[test]
    fn a_new_try_starts_without_the_lines_of_the_one_before() {
        let now = Utc::now();
        let mut task = TaskInstance::pending("t", vec![], "default", 3);
        task.state = TaskState::UpForRetry;
        task.try_number = 1;
        task.error = Some("try 1 failed".into());
        task.log_tail = vec!["line of try 1".into()];
        let mut second = task.next_try(now);
        assert!(second.log_tail.is_empty(), "try 2 begins with try 1's lines");
        assert_eq!(second.tries[0].log_tail, ["line of try 1"], "they are filed with try 1");
        second.state = TaskState::Running;
        let next = second.after_interruption(now, "try 2 interrupted: worker w lost".into());
        assert_eq!(next.tries[1].try_number, 2);
        assert!(next.tries[1].log_tail.is_empty(), "try 2 filed with try 1's lines: {:?}", next.tries[1].log_tail);
    }

    #[test]
    fn an_interrupted_try_is_filed_with_its_reason() {
        let now = Utc::now();
        let mut task = TaskInstance::pending("t", vec![], "default", 0);
        task.state = TaskState::Running;
        task.try_number = 1;
        let next = task.after_interruption(now, "try 1 interrupted: worker w1 lost".to_string());
        assert_eq!((next.state, next.try_number), (TaskState::Queued, 2));
        assert_eq!(next.tries[0].outcome, "interrupted");
        assert_eq!(next.tries[0].error.as_deref(), Some("try 1 interrupted: worker w1 lost"));
        assert_eq!(next.error.as_deref(), Some("try 1 interrupted: worker w1 lost"), "the queued try says why");
    }

    #[test]
    fn only_the_newest_filed_tries_keep_their_log_tails() {
        let now = Utc::now();
        let mut task = TaskInstance::pending("t", vec![], "default", 20);
        for try_number in 1..=8 {
            task.try_number = try_number;
            task.error = Some(format!("try {try_number} failed"));
            task.log_tail = vec![format!("line of try {try_number}")];
            task.close_try("up_for_retry", now);
        }
        let kept: Vec<(u32, usize, Option<&str>)> =
            task.tries.iter().map(|t| (t.try_number, t.log_tail.len(), t.error.as_deref())).collect();
        assert_eq!(kept.len(), 8);
        for (try_number, tail, error) in kept {
            assert_eq!(tail, usize::from(try_number > 3), "try {try_number}");
            assert_eq!(error, Some(format!("try {try_number} failed").as_str()), "every try keeps its error");
        }
        assert_eq!(task.tries[7].log_tail, ["line of try 8"]);
    }

    /// The Redis task scripts find state and try by this prefix (and decode anything else).
    #[test]
    fn a_task_instance_serializes_id_state_and_try_first() {
        let mut task = TaskInstance::pending("t-1.x", vec!["a".to_string()], "default", 1);
        task.state = TaskState::UpForRetry;
        task.try_number = 12;
        let json = serde_json::to_string(&task).unwrap_or_default();
        assert!(json.starts_with(r#"{"task_id":"t-1.x","state":"up_for_retry","try_number":12,"#), "{json}");
    }

    #[test]
    fn interruptions_requeue_with_a_new_try_until_the_bound_then_fail() {
        let now = DateTime::from_timestamp(1_000, 0).unwrap_or_default();
        let mut task = TaskInstance::pending("t", vec![], "default", 1);
        task.state = TaskState::Running;
        task.try_number = 1;
        task.worker = Some("w1".into());
        for n in 1..=MAX_INTERRUPTIONS {
            let next = task.after_interruption(now, format!("lost {n}"));
            assert_eq!(
                (next.state, next.try_number, next.max_try, next.interruptions),
                (TaskState::Queued, n + 1, n + 2, n)
            );
            assert_eq!((next.worker.as_deref(), next.error.as_deref()), (None, Some(format!("lost {n}").as_str())));
            task = TaskInstance { state: TaskState::Running, ..next };
        }
        let last = task.after_interruption(now, "lost again".into());
        assert_eq!((last.state, last.try_number), (TaskState::Failed, task.try_number));
        assert_eq!(last.error.as_deref(), Some("lost again; interrupted 4 times, giving up"));
        assert_eq!(last.ended_at, Some(now));
    }
}
