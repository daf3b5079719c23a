//! Run and task states and the transitions between them, as pure functions.
//!
//! Stores apply a transition only as a compare-and-set on (run, task, try): the caller names the
//! state and try it expects, and a store refuses when either differs. With [`task_transition`]
//! deciding which moves exist at all, a duplicate or late message can neither move a state
//! backwards nor apply the same move twice.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// State of a DAG run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Created, waiting for a slot under `max_active_runs`.
    Queued,
    /// Its tasks are being scheduled.
    Running,
    /// Every task succeeded.
    Success,
    /// Every task is final and at least one failed.
    Failed,
    /// Stopped on request.
    Cancelled,
    /// Suspended on request: nothing new is queued and its running tries were stopped until it
    /// is resumed.
    Suspended,
}

/// State of one task in one run (a DRT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for upstream tasks.
    Pending,
    /// Published to a worker queue, not yet taken.
    Queued,
    /// A worker is running it.
    Running,
    /// Finished well.
    Success,
    /// Finished badly with no tries left.
    Failed,
    /// Failed with tries left; queued again after the retry delay.
    UpForRetry,
    /// An upstream task failed for good, so this one will not run.
    UpstreamFailed,
    /// The run was cancelled before this task finished.
    Cancelled,
    /// Its trigger rule or a branch decided it does not run.
    Skipped,
    /// Its try was stopped (or never started) because the run was suspended; resuming gives it a
    /// new try without using up a retry.
    Suspended,
}

/// What happens to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEvent {
    /// Upstreams succeeded, or the retry delay passed: publish a new try.
    Queue,
    /// A worker took the try.
    Start,
    /// The try succeeded.
    Succeed,
    /// The try failed and tries are left.
    FailWithRetry,
    /// The try failed and no tries are left (or the error was fatal).
    Fail,
    /// An upstream failed for good.
    UpstreamFail,
    /// The run was cancelled.
    Cancel,
    /// A finished run is restarted and this task runs again.
    Reset,
    /// The worker running the try stopped (shutdown past its grace period, or lost): the task
    /// is queued again as a new try, without spending its retry budget.
    Requeue,
    /// Its trigger rule or a branch decided it does not run.
    Skip,
    /// The run was suspended while the task was queued or running.
    Suspend,
    /// A user cleared the task (or an upstream of it) to run it again, even if it succeeded.
    Clear,
}

/// A transition that the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("task cannot go from {from} on {event:?}")]
pub struct Refused {
    /// State the task was in.
    pub from: TaskState,
    /// What was attempted.
    pub event: TaskEvent,
}

/// The state after `event` in `from`, or why not.
pub fn task_transition(from: TaskState, event: TaskEvent) -> Result<TaskState, Refused> {
    use TaskEvent as E;
    use TaskState as S;
    let to = match (from, event) {
        (S::Pending | S::UpForRetry | S::Suspended, E::Queue) => S::Queued,
        (S::Queued, E::Start) => S::Running,
        (S::Running, E::Succeed) => S::Success,
        (S::Running, E::FailWithRetry) => S::UpForRetry,
        (S::Running, E::Fail) => S::Failed,
        // A queued try that can never start (its message was dead-lettered) fails as a whole.
        (S::Queued, E::Fail) => S::Failed,
        (S::Pending, E::UpstreamFail) => S::UpstreamFailed,
        (S::Pending, E::Skip) => S::Skipped,
        (S::Pending | S::Queued | S::Running | S::UpForRetry | S::Suspended, E::Cancel) => S::Cancelled,
        (S::Failed | S::UpstreamFailed | S::Cancelled | S::Skipped | S::Pending, E::Reset) => S::Pending,
        (S::Running, E::Requeue) => S::Queued,
        (S::Queued | S::Running, E::Suspend) => S::Suspended,
        (
            S::Pending | S::Success | S::Failed | S::UpForRetry | S::UpstreamFailed | S::Cancelled | S::Skipped,
            E::Clear,
        ) => S::Pending,
        _ => return Err(Refused { from, event }),
    };
    Ok(to)
}

impl TaskState {
    /// Whether nothing more happens to the task unless the run is restarted.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Success
                | TaskState::Failed
                | TaskState::UpstreamFailed
                | TaskState::Cancelled
                | TaskState::Skipped
        )
    }

    /// Every state, in lifecycle order.
    pub const ALL: [TaskState; 10] = [
        TaskState::Pending,
        TaskState::Queued,
        TaskState::Running,
        TaskState::Success,
        TaskState::Failed,
        TaskState::UpForRetry,
        TaskState::UpstreamFailed,
        TaskState::Cancelled,
        TaskState::Skipped,
        TaskState::Suspended,
    ];

    /// The snake_case name used on the wire and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Success => "success",
            TaskState::Failed => "failed",
            TaskState::UpForRetry => "up_for_retry",
            TaskState::UpstreamFailed => "upstream_failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Skipped => "skipped",
            TaskState::Suspended => "suspended",
        }
    }
}

impl RunState {
    /// Whether the run has finished.
    pub fn is_final(self) -> bool {
        matches!(self, RunState::Success | RunState::Failed | RunState::Cancelled)
    }

    /// Every state, in lifecycle order.
    pub const ALL: [RunState; 6] = [
        RunState::Queued,
        RunState::Running,
        RunState::Success,
        RunState::Failed,
        RunState::Cancelled,
        RunState::Suspended,
    ];

    /// The snake_case name used on the wire and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Success => "success",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Suspended => "suspended",
        }
    }
}

/// Whether a run may move from `from` to `to`: forward only, between `running` and
/// `suspended`, and a finished run only back to `running` through a restart.
pub fn run_transition_allowed(from: RunState, to: RunState) -> bool {
    use RunState as R;
    matches!(
        (from, to),
        (R::Queued, R::Running | R::Cancelled)
            | (R::Running, R::Success | R::Failed | R::Cancelled | R::Suspended)
            | (R::Suspended, R::Running | R::Success | R::Failed | R::Cancelled)
            | (R::Success | R::Failed | R::Cancelled, R::Running)
    )
}

/// The run's state once every task is final: success if every task succeeded or was skipped,
/// failed when any task failed, was upstream_failed or was cancelled.
pub fn run_outcome(tasks: impl IntoIterator<Item = TaskState>) -> Option<RunState> {
    let mut all_success = true;
    for state in tasks {
        if !state.is_final() {
            return None;
        }
        if !matches!(state, TaskState::Success | TaskState::Skipped) {
            all_success = false;
        }
    }
    Some(if all_success { RunState::Success } else { RunState::Failed })
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(text: &str) -> Result<TaskState, String> {
        TaskState::ALL.into_iter().find(|s| s.as_str() == text).ok_or_else(|| format!("unknown task state {text:?}"))
    }
}

impl FromStr for RunState {
    type Err = String;
    fn from_str(text: &str) -> Result<RunState, String> {
        RunState::ALL.into_iter().find(|s| s.as_str() == text).ok_or_else(|| format!("unknown run state {text:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENTS: [TaskEvent; 12] = [
        TaskEvent::Queue,
        TaskEvent::Start,
        TaskEvent::Succeed,
        TaskEvent::FailWithRetry,
        TaskEvent::Fail,
        TaskEvent::UpstreamFail,
        TaskEvent::Cancel,
        TaskEvent::Reset,
        TaskEvent::Requeue,
        TaskEvent::Skip,
        TaskEvent::Suspend,
        TaskEvent::Clear,
    ];

    /// The whole table: every (state, event) pair, allowed ones with their target, the rest refused.
    #[test]
    fn task_state_table() {
        use TaskEvent as E;
        use TaskState as S;
        let allowed = [
            (S::Pending, E::Queue, S::Queued),
            (S::Pending, E::UpstreamFail, S::UpstreamFailed),
            (S::Pending, E::Cancel, S::Cancelled),
            (S::Pending, E::Reset, S::Pending),
            (S::Pending, E::Skip, S::Skipped),
            (S::Queued, E::Suspend, S::Suspended),
            (S::Running, E::Suspend, S::Suspended),
            (S::Suspended, E::Queue, S::Queued),
            (S::Suspended, E::Cancel, S::Cancelled),
            (S::Skipped, E::Reset, S::Pending),
            (S::Pending, E::Clear, S::Pending),
            (S::Success, E::Clear, S::Pending),
            (S::Failed, E::Clear, S::Pending),
            (S::UpForRetry, E::Clear, S::Pending),
            (S::UpstreamFailed, E::Clear, S::Pending),
            (S::Cancelled, E::Clear, S::Pending),
            (S::Skipped, E::Clear, S::Pending),
            (S::Queued, E::Start, S::Running),
            (S::Queued, E::Fail, S::Failed),
            (S::Queued, E::Cancel, S::Cancelled),
            (S::Running, E::Succeed, S::Success),
            (S::Running, E::FailWithRetry, S::UpForRetry),
            (S::Running, E::Fail, S::Failed),
            (S::Running, E::Cancel, S::Cancelled),
            (S::Running, E::Requeue, S::Queued),
            (S::UpForRetry, E::Queue, S::Queued),
            (S::UpForRetry, E::Cancel, S::Cancelled),
            (S::Failed, E::Reset, S::Pending),
            (S::UpstreamFailed, E::Reset, S::Pending),
            (S::Cancelled, E::Reset, S::Pending),
        ];
        let mut count = 0;
        for from in TaskState::ALL {
            for event in EVENTS {
                let expected = allowed.iter().find(|(f, e, _)| *f == from && *e == event).map(|(_, _, to)| *to);
                match (task_transition(from, event), expected) {
                    (Ok(to), Some(want)) => {
                        assert_eq!(to, want, "{from} on {event:?}");
                        count += 1;
                    }
                    (Err(refused), None) => assert_eq!(refused, Refused { from, event }),
                    (got, want) => panic!("{from} on {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        assert_eq!(count, allowed.len());
    }

    #[test]
    fn success_is_left_only_by_a_clear() {
        for event in EVENTS {
            assert_eq!(task_transition(TaskState::Success, event).is_ok(), event == TaskEvent::Clear, "{event:?}");
        }
    }

    #[test]
    fn run_state_table() {
        use RunState as R;
        let allowed = [
            (R::Queued, R::Running),
            (R::Queued, R::Cancelled),
            (R::Running, R::Success),
            (R::Running, R::Failed),
            (R::Running, R::Cancelled),
            (R::Running, R::Suspended),
            (R::Suspended, R::Running),
            (R::Suspended, R::Success),
            (R::Suspended, R::Failed),
            (R::Suspended, R::Cancelled),
            (R::Success, R::Running),
            (R::Failed, R::Running),
            (R::Cancelled, R::Running),
        ];
        for from in RunState::ALL {
            for to in RunState::ALL {
                assert_eq!(run_transition_allowed(from, to), allowed.contains(&(from, to)), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn run_outcome_needs_all_final() {
        use TaskState as S;
        assert_eq!(run_outcome([S::Success, S::Success]), Some(RunState::Success));
        assert_eq!(run_outcome([S::Success, S::UpstreamFailed, S::Failed]), Some(RunState::Failed));
        assert_eq!(run_outcome([S::Success, S::Running]), None);
        assert_eq!(run_outcome([S::UpForRetry]), None);
        assert_eq!(run_outcome([S::Success, S::Skipped]), Some(RunState::Success));
        assert_eq!(run_outcome([S::Skipped, S::Failed]), Some(RunState::Failed));
        assert_eq!(run_outcome([S::Success, S::Suspended]), None);
    }

    #[test]
    fn names_round_trip() {
        for state in TaskState::ALL {
            assert_eq!(state.as_str().parse::<TaskState>(), Ok(state));
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("\"{state}\""));
        }
        for state in RunState::ALL {
            assert_eq!(state.as_str().parse::<RunState>(), Ok(state));
        }
        assert!("done".parse::<TaskState>().is_err());
    }
}
