//! Trigger rules and branching: when a pending task runs, given how its upstream tasks ended.
//!
//! The scheduler keeps, for each pending task, counts of its upstreams by outcome
//! ([`UpstreamCounts`]), so deciding costs the same for a task with one upstream as for a join
//! of ten thousand. [`decide`] is the rule table of DESIGN.md as a pure function.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use crate::state::TaskState;

/// When a task runs, over the final states of its upstream tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerRule {
    /// All upstreams succeeded (the default). Otherwise `upstream_failed` if any failed or
    /// was upstream_failed, else `skipped`.
    #[default]
    AllSuccess,
    /// All upstreams are final, however they ended. Never skipped.
    AllDone,
    /// All upstreams failed or were upstream_failed. Otherwise `skipped`.
    AllFailed,
    /// As soon as one upstream succeeded. Otherwise `upstream_failed` if any failed, else
    /// `skipped`.
    OneSuccess,
    /// As soon as one upstream failed or was upstream_failed. Otherwise `skipped`.
    OneFailed,
    /// All upstreams are final and none failed or was upstream_failed (skipped ones are fine).
    /// Otherwise `upstream_failed`.
    NoneFailed,
}

impl TriggerRule {
    /// Every rule.
    pub const ALL: [TriggerRule; 6] = [
        TriggerRule::AllSuccess,
        TriggerRule::AllDone,
        TriggerRule::AllFailed,
        TriggerRule::OneSuccess,
        TriggerRule::OneFailed,
        TriggerRule::NoneFailed,
    ];

    /// The snake_case name used in DAG files and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerRule::AllSuccess => "all_success",
            TriggerRule::AllDone => "all_done",
            TriggerRule::AllFailed => "all_failed",
            TriggerRule::OneSuccess => "one_success",
            TriggerRule::OneFailed => "one_failed",
            TriggerRule::NoneFailed => "none_failed",
        }
    }
}

impl fmt::Display for TriggerRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TriggerRule {
    type Err = String;
    fn from_str(text: &str) -> Result<TriggerRule, String> {
        TriggerRule::ALL.into_iter().find(|r| r.as_str() == text).ok_or_else(|| {
            let names: Vec<&str> = TriggerRule::ALL.iter().map(|r| r.as_str()).collect();
            format!("unknown trigger_rule {text:?} (one of {})", names.join(", "))
        })
    }
}

/// How a task's upstream tasks ended so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamCounts {
    /// Number of upstream tasks.
    pub total: u32,
    /// Upstreams that are `success`.
    pub succeeded: u32,
    /// Upstreams that are `failed` or `upstream_failed`.
    pub failed: u32,
    /// Upstreams that are `skipped` (or `cancelled`, which ends a task without running it).
    pub skipped: u32,
}

impl UpstreamCounts {
    /// Counts `states` of a task's upstreams.
    pub fn of(states: impl IntoIterator<Item = TaskState>) -> UpstreamCounts {
        let mut counts = UpstreamCounts::default();
        for state in states {
            counts.total += 1;
            counts.add(state, 1);
        }
        counts
    }

    /// Adds (`delta` 1) or takes back (`delta` -1) one upstream in `state`; states that are not
    /// final count only in `total`.
    pub fn add(&mut self, state: TaskState, delta: i32) {
        let slot = match state {
            TaskState::Success => &mut self.succeeded,
            TaskState::Failed | TaskState::UpstreamFailed => &mut self.failed,
            TaskState::Skipped | TaskState::Cancelled => &mut self.skipped,
            _ => return,
        };
        *slot = slot.saturating_add_signed(delta);
    }

    /// Upstreams in a final state.
    pub fn done(&self) -> u32 {
        self.succeeded + self.failed + self.skipped
    }
}

/// What becomes of a pending task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not yet decided: more upstreams must finish.
    Wait,
    /// Queue it.
    Run,
    /// It ends `skipped` without running.
    Skip,
    /// It ends `upstream_failed` without running.
    UpstreamFailed,
}

/// The rule table: what becomes of a pending task under `rule` with upstreams `counts`. A task
/// without upstreams runs. Each answer other than `Wait` is final: no later upstream outcome
/// could change it.
pub fn decide(rule: TriggerRule, counts: UpstreamCounts) -> Decision {
    let UpstreamCounts { total, succeeded, failed, skipped } = counts;
    let all_done = counts.done() >= total;
    match rule {
        TriggerRule::AllSuccess if succeeded >= total => Decision::Run,
        TriggerRule::AllSuccess if failed > 0 => Decision::UpstreamFailed,
        TriggerRule::AllSuccess if all_done => Decision::Skip,
        TriggerRule::AllDone if all_done => Decision::Run,
        TriggerRule::AllFailed if failed >= total => Decision::Run,
        TriggerRule::AllFailed if succeeded + skipped > 0 => Decision::Skip,
        TriggerRule::OneSuccess if succeeded > 0 || total == 0 => Decision::Run,
        TriggerRule::OneSuccess if all_done && failed > 0 => Decision::UpstreamFailed,
        TriggerRule::OneSuccess if all_done => Decision::Skip,
        TriggerRule::OneFailed if failed > 0 || total == 0 => Decision::Run,
        TriggerRule::OneFailed if all_done => Decision::Skip,
        TriggerRule::NoneFailed if failed > 0 => Decision::UpstreamFailed,
        TriggerRule::NoneFailed if all_done => Decision::Run,
        _ => Decision::Wait,
    }
}

/// Whether a branch task's `output` chooses task `id`: names it alone or in its list. Unlike
/// [`branch_choice`] it does not check the rest of the output (the worker did, before it
/// recorded the branch's success); an output that names nothing chooses nothing.
pub fn chooses(output: Option<&Value>, id: &str) -> bool {
    match output {
        Some(Value::String(chosen)) => chosen == id,
        Some(Value::Array(items)) => items.iter().any(|item| item.as_str() == Some(id)),
        _ => false,
    }
}

/// The direct downstream tasks a branch task's `output` chooses: one id or a list of ids, each
/// one of `downstream`. Anything else is an error that says what was expected.
pub fn branch_choice(output: Option<&Value>, downstream: &[&str]) -> Result<Vec<String>, String> {
    let expected = || format!("one of {} or a list of them", downstream.join(", "));
    let ids: Vec<String> = match output {
        Some(Value::String(id)) => vec![id.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(id) => Ok(id.clone()),
                other => Err(format!("branch output lists {other}, not a task id; expected {}", expected())),
            })
            .collect::<Result<_, _>>()?,
        None | Some(Value::Null) => {
            return Err(format!(
                "a branch task must output the task ids to follow ({}); it output nothing",
                expected()
            ));
        }
        Some(other) => return Err(format!("branch output {other} is not a task id; expected {}", expected())),
    };
    if let Some(unknown) = ids.iter().find(|id| !downstream.contains(&id.as_str())) {
        return Err(format!(
            "branch output names {unknown:?}, which is not a direct downstream task; expected {}",
            expected()
        ));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{Run, Skip, UpstreamFailed as UpFailed, Wait};
    use TaskState as S;

    /// Upstream outcomes (`Running` stands for "not final yet") and what each rule makes of them,
    /// in the order of `TriggerRule::ALL`: all_success, all_done, all_failed, one_success,
    /// one_failed, none_failed.
    const TABLE: &[(&[TaskState], [Decision; 6])] = &[
        (&[], [Run, Run, Run, Run, Run, Run]),
        (&[S::Success, S::Success], [Run, Run, Skip, Run, Skip, Run]),
        (&[S::Success, S::Running], [Wait, Wait, Skip, Run, Wait, Wait]),
        (&[S::Failed, S::Running], [UpFailed, Wait, Wait, Wait, Run, UpFailed]),
        (&[S::Failed, S::Failed], [UpFailed, Run, Run, UpFailed, Run, UpFailed]),
        (&[S::UpstreamFailed, S::Failed], [UpFailed, Run, Run, UpFailed, Run, UpFailed]),
        (&[S::Success, S::Failed], [UpFailed, Run, Skip, Run, Run, UpFailed]),
        (&[S::Skipped, S::Skipped], [Skip, Run, Skip, Skip, Skip, Run]),
        (&[S::Success, S::Skipped], [Skip, Run, Skip, Run, Skip, Run]),
        (&[S::Skipped, S::Running], [Wait, Wait, Skip, Wait, Wait, Wait]),
        (&[S::Skipped, S::Failed], [UpFailed, Run, Skip, UpFailed, Run, UpFailed]),
        (&[S::Running, S::Running], [Wait, Wait, Wait, Wait, Wait, Wait]),
        (&[S::UpForRetry], [Wait, Wait, Wait, Wait, Wait, Wait]),
        (&[S::Cancelled, S::Success], [Skip, Run, Skip, Run, Skip, Run]),
    ];

    #[test]
    fn the_rule_table() {
        for (states, decisions) in TABLE {
            let counts = UpstreamCounts::of(states.iter().copied());
            for (rule, want) in TriggerRule::ALL.into_iter().zip(decisions) {
                assert_eq!(decide(rule, counts), *want, "{rule} over {states:?}");
            }
        }
    }

    /// A decision other than `Wait` stands whatever the unfinished upstreams do later.
    #[test]
    fn decisions_never_change_as_upstreams_finish() {
        let outcomes = [S::Success, S::Failed, S::UpstreamFailed, S::Skipped, S::Running];
        for a in outcomes {
            for b in outcomes {
                for c in outcomes {
                    let states = [a, b, c];
                    let counts = UpstreamCounts::of(states);
                    for rule in TriggerRule::ALL {
                        let now = decide(rule, counts);
                        if now == Wait {
                            continue;
                        }
                        for later in outcomes {
                            let finished = states.map(|s| if s == S::Running { later } else { s });
                            let then = decide(rule, UpstreamCounts::of(finished));
                            if then != Wait {
                                assert_eq!(then, now, "{rule}: {states:?} then {finished:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn counts_move_with_their_upstreams() {
        let mut counts = UpstreamCounts::of([S::Running, S::Success]);
        counts.add(S::Running, -1);
        counts.add(S::Failed, 1);
        assert_eq!(counts, UpstreamCounts { total: 2, succeeded: 1, failed: 1, skipped: 0 });
        counts.add(S::Success, -1);
        assert_eq!(counts.done(), 1);
    }

    #[test]
    fn rule_names_round_trip() {
        for rule in TriggerRule::ALL {
            assert_eq!(rule.as_str().parse::<TriggerRule>(), Ok(rule));
        }
        let err = "any_success".parse::<TriggerRule>().unwrap_err();
        assert!(err.contains("one of all_success, all_done"), "{err}");
    }

    #[test]
    fn a_branch_chooses_the_tasks_its_output_names() {
        assert!(chooses(Some(&Value::from("load")), "load"));
        assert!(chooses(Some(&serde_json::json!(["skip_load", "load"])), "load"));
        assert!(!chooses(Some(&serde_json::json!(["skip_load"])), "load"));
        assert!(!chooses(Some(&serde_json::json!([])), "load"));
        assert!(!chooses(Some(&serde_json::json!({"load": true})), "load"));
        assert!(!chooses(Some(&Value::Null), "load"));
        assert!(!chooses(None, "load"));
    }

    #[test]
    fn a_branch_names_its_direct_downstream_tasks() {
        let down = ["load", "skip_load"];
        assert_eq!(branch_choice(Some(&Value::from("load")), &down), Ok(vec!["load".to_string()]));
        assert_eq!(branch_choice(Some(&serde_json::json!(["load", "skip_load"])), &down).map(|v| v.len()), Ok(2));
        assert_eq!(branch_choice(Some(&serde_json::json!([])), &down), Ok(vec![]));
        let err = branch_choice(Some(&Value::from("extract")), &down).unwrap_err();
        assert!(err.contains("\"extract\", which is not a direct downstream task"), "{err}");
        assert!(err.contains("load, skip_load"), "{err}");
        assert!(branch_choice(None, &down).unwrap_err().contains("output nothing"));
        assert!(branch_choice(Some(&serde_json::json!({"a": 1})), &down).unwrap_err().contains("is not a task id"));
        assert!(branch_choice(Some(&serde_json::json!(["load", 3])), &down).unwrap_err().contains("lists 3"));
    }
}
