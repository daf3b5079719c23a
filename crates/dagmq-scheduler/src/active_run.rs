//! The scheduler's in-memory view of one running run: its tasks as last read from the store,
//! the graph between them, and for each task its upstreams counted by outcome. With those
//! counters a status update decides the downstream tasks (run, skip, upstream_failed, wait, by
//! their trigger rules) in time proportional to the number of downstream tasks, not to the size
//! of the run or of any task's upstream list.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dagmq_core::trigger::{Decision, TriggerRule, UpstreamCounts, decide};
use dagmq_core::{Dag, FollowUp, RunRecord, TaskInstance, TaskState};

use crate::limits::{Claim, Usage, claim_of, occupies};
use crate::metrics::{ViewCounts, state_index};

/// One running run.
pub(crate) struct ActiveRun {
    /// The run's record as last written.
    pub(crate) record: RunRecord,
    /// The DAG the run belongs to.
    pub(crate) dag: Arc<Dag>,
    /// Tasks as last read from (or written to) the store.
    pub(crate) tasks: Vec<TaskInstance>,
    /// Task id to index in `tasks`.
    pub(crate) index: HashMap<String, usize>,
    /// For each task, the indices of the tasks that wait for it.
    pub(crate) downstream: Vec<Vec<usize>>,
    /// For each task, its upstreams counted by outcome.
    pub(crate) upstream: Vec<UpstreamCounts>,
    /// For each task with branch tasks among its upstreams, their indices (empty for a DAG
    /// without branches): a branch that succeeded without choosing the task decides it.
    branch_upstreams: HashMap<usize, Vec<usize>>,
    /// Tasks that succeeded with follow-ups not in the run yet (their addition is still to
    /// come, or failed): their downstream tasks wait. Empty but for that moment.
    expanding: Vec<usize>,
    /// How many tasks are in a final state.
    pub(crate) final_count: usize,
    /// The scheduler-wide counts by state this run's tasks are part of.
    view: Arc<ViewCounts>,
    /// This run's share of `view`, taken back out when the run is dropped.
    counted: [i64; TaskState::ALL.len()],
    /// The scheduler-wide usage of concurrency limits this run's queued and running tasks
    /// take part in.
    usage: Arc<Mutex<Usage>>,
    /// The claims this view added to `usage`, by task: given back exactly as taken, whatever
    /// the tasks say by then (a sweep puts fresh tasks in place before it rebuilds).
    held: HashMap<String, Claim>,
    /// Changes found when a compare-and-set to queue a task was refused because the task had
    /// moved on (a worker claimed it as its upstream succeeded, and it may have finished since),
    /// kept to be acted on as a status update would be before the run goes back into the active
    /// set: the view never takes in an outcome without acting on it. Kept by task id, not by
    /// index: a sweep may rebuild the view from a listing in another order before they are
    /// acted on.
    pub(crate) deferred: Vec<(String, TaskInstance)>,
    /// The store may hold another state for the run than `record` says: a suspend or resume
    /// whose answer was lost, and whose run could not be read again. `record` then says
    /// `suspended` (safe whichever way the write went: nothing new is queued) until the run is
    /// read again, by a retried command (which finishes what the first one began) or the sweep.
    pub(crate) in_doubt: bool,
    /// The store may hold other task states than `tasks` says: a change to tasks (a clear)
    /// whose answer was lost, and whose run's tasks could not be read again. The run does not
    /// end from this view (`put_back`) until its tasks are read again whole (the sweep).
    pub(crate) tasks_in_doubt: bool,
}

impl Drop for ActiveRun {
    fn drop(&mut self) {
        for (state, count) in TaskState::ALL.into_iter().zip(self.counted) {
            self.view.add(state, -count);
        }
        if !self.held.is_empty() {
            let mut usage = crate::limits::lock(&self.usage);
            for claim in self.held.values() {
                usage.add(claim, -1);
            }
        }
    }
}

impl ActiveRun {
    /// Builds the view from a run and its tasks, counting them in `view`.
    pub(crate) fn new(
        record: RunRecord,
        dag: Arc<Dag>,
        mut tasks: Vec<TaskInstance>,
        view: Arc<ViewCounts>,
        usage: Arc<Mutex<Usage>>,
    ) -> ActiveRun {
        // Instances read from the store carry copies of their upstream lists: share the DAG's.
        for task in &mut tasks {
            if let Some(spec) = dag.task(&task.task_id) {
                share_after(&mut task.after, &spec.after);
            }
        }
        let index: HashMap<String, usize> = tasks.iter().enumerate().map(|(i, t)| (t.task_id.clone(), i)).collect();
        let mut downstream = vec![Vec::new(); tasks.len()];
        let mut upstream = vec![UpstreamCounts::default(); tasks.len()];
        let branches: Vec<bool> = tasks.iter().map(|t| is_branch(&dag, t)).collect();
        let mut branch_upstreams: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, task) in tasks.iter().enumerate() {
            for up in task.after.iter() {
                if let Some(&u) = index.get(up) {
                    downstream[u].push(i);
                    upstream[i].total += 1;
                    upstream[i].add(tasks[u].state, 1);
                    if branches[u] {
                        branch_upstreams.entry(i).or_default().push(u);
                    }
                }
            }
        }
        let expanding = (0..tasks.len()).filter(|&i| follow_ups_missing(&tasks, &index, i)).collect();
        let final_count = tasks.iter().filter(|t| t.state.is_final()).count();
        let mut counted = [0i64; TaskState::ALL.len()];
        for task in &tasks {
            counted[state_index(task.state)] += 1;
        }
        for (state, count) in TaskState::ALL.into_iter().zip(counted) {
            view.add(state, count);
        }
        let mut run = ActiveRun {
            record,
            dag,
            tasks,
            index,
            downstream,
            upstream,
            branch_upstreams,
            expanding,
            final_count,
            view,
            counted,
            usage,
            held: HashMap::new(),
            deferred: Vec::new(),
            in_doubt: false,
            tasks_in_doubt: false,
        };
        for i in 0..run.tasks.len() {
            run.hold_limits(i);
        }
        run
    }

    /// Makes the limits task `i` holds match its state: a queued or running task holds its
    /// share of each limit that applies to it, any other holds none.
    fn hold_limits(&mut self, i: usize) {
        let task = &self.tasks[i];
        let holds = self.held.contains_key(&task.task_id);
        if occupies(task.state) && !holds {
            let claim = claim_of(&self.dag, &task.task_id, &dagmq_core::Pools::new());
            if !claim.is_empty() {
                crate::limits::lock(&self.usage).add(&claim, 1);
                self.held.insert(task.task_id.clone(), claim);
            }
        } else if !occupies(task.state)
            && holds
            && let Some(claim) = self.held.remove(&task.task_id)
        {
            crate::limits::lock(&self.usage).add(&claim, -1);
        }
    }

    /// Rebuilds the graph after tasks were added or rewired.
    pub(crate) fn rebuild(&mut self) {
        // The new view takes the limits its tasks hold; this one gives back what it took when
        // it is dropped below.
        let tasks = std::mem::take(&mut self.tasks);
        // The new view counts every task; dropping the old one takes back what it counted.
        let mut rebuilt =
            ActiveRun::new(self.record.clone(), self.dag.clone(), tasks, self.view.clone(), self.usage.clone());
        rebuilt.deferred = std::mem::take(&mut self.deferred);
        rebuilt.in_doubt = self.in_doubt;
        rebuilt.tasks_in_doubt = self.tasks_in_doubt;
        *self = rebuilt;
    }

    /// The run id.
    pub(crate) fn id(&self) -> &str {
        &self.record.run_id
    }

    /// Records that task `i` now has instance `new`, keeping the counters right. Returns the
    /// previous instance.
    pub(crate) fn replace(&mut self, i: usize, mut new: TaskInstance) -> TaskInstance {
        share_after(&mut new.after, &self.tasks[i].after);
        let old = std::mem::replace(&mut self.tasks[i], new);
        let new_state = self.tasks[i].state;
        if occupies(old.state) != occupies(new_state) {
            self.hold_limits(i);
        }
        if old.state != new_state {
            self.counted[state_index(old.state)] -= 1;
            self.counted[state_index(new_state)] += 1;
            self.view.add(old.state, -1);
            self.view.add(new_state, 1);
        }
        match (old.state.is_final(), new_state.is_final()) {
            (false, true) => self.final_count += 1,
            (true, false) => self.final_count -= 1,
            _ => {}
        }
        if old.state != new_state {
            for &d in &self.downstream[i] {
                self.upstream[d].add(old.state, -1);
                self.upstream[d].add(new_state, 1);
            }
        }
        if !old.follow_ups.is_empty() || !self.tasks[i].follow_ups.is_empty() {
            self.expanding.retain(|&p| p != i);
            if follow_ups_missing(&self.tasks, &self.index, i) {
                self.expanding.push(i);
            }
        }
        old
    }

    /// Whether every task is final.
    pub(crate) fn all_final(&self) -> bool {
        self.final_count == self.tasks.len()
    }

    /// Whether a task succeeded with follow-ups that are not in the run yet (their addition
    /// failed or is still to come): the run is not done, whatever the states say.
    pub(crate) fn expansion_pending(&self) -> bool {
        (0..self.tasks.len())
            .any(|i| self.tasks[i].state == TaskState::Success && matches!(self.expansion(i), Ok(Some(_))))
    }

    /// What becomes of task `i` now: `Wait` unless it is pending and its trigger rule decides;
    /// `Skip` once a branch upstream succeeded without choosing it, whatever the rule says (so
    /// a skip of the unchosen tasks that did not reach the store cannot let another upstream's
    /// success queue them); `Wait` while an upstream's follow-ups are not in the run (so a
    /// failed insertion cannot let another upstream's success queue the task before them).
    pub(crate) fn decision(&self, i: usize) -> Decision {
        if self.tasks[i].state != TaskState::Pending {
            return Decision::Wait;
        }
        if self.branch_upstreams.get(&i).is_some_and(|ups| ups.iter().any(|&b| !self.chose(b, i))) {
            return Decision::Skip;
        }
        if self.expanding.iter().any(|&p| self.downstream[p].contains(&i)) {
            return Decision::Wait;
        }
        decide(self.trigger_rule(i), self.upstream[i])
    }

    /// Whether branch task `b` leaves its direct downstream task `i` to its trigger rule: it
    /// has not succeeded yet, or its output chose `i` (an output the worker should have
    /// refused chooses nothing).
    fn chose(&self, b: usize, i: usize) -> bool {
        let branch = &self.tasks[b];
        branch.state != TaskState::Success
            || dagmq_core::trigger::chooses(branch.output.as_ref(), &self.tasks[i].task_id)
    }

    /// A task's trigger rule (follow-ups use the default).
    fn trigger_rule(&self, i: usize) -> TriggerRule {
        self.dag.task(&self.tasks[i].task_id).map_or(TriggerRule::AllSuccess, |t| t.config.trigger_rule)
    }

    /// Sorts task indices highest priority first, without repeats.
    pub(crate) fn by_priority(&self, mut indices: Vec<usize>) -> Vec<usize> {
        indices.sort_by_key(|&i| (std::cmp::Reverse(self.priority(i)), i));
        indices.dedup();
        indices
    }

    /// A task's priority (follow-ups inherit nothing and run at 0).
    fn priority(&self, i: usize) -> u8 {
        self.dag.task(&self.tasks[i].task_id).map_or(0, |t| t.config.priority)
    }

    /// The pending direct downstream tasks that branch task `i` (a success) did not choose,
    /// with the reason; empty when `i` is not a branch. An output the worker should have
    /// refused chooses nothing.
    pub(crate) fn not_chosen(&self, i: usize) -> Vec<usize> {
        let task = &self.tasks[i];
        let Some(spec) = self.dag.task(&task.task_id).filter(|s| s.config.branch && task.follow_up.is_none()) else {
            return Vec::new();
        };
        let choices = self.dag.downstream_of(&spec.id);
        let chosen = dagmq_core::trigger::branch_choice(task.output.as_ref(), &choices).unwrap_or_else(|reason| {
            tracing::error!(run = %self.id(), task = %task.task_id, "branch output: {reason}; no downstream task runs");
            Vec::new()
        });
        choices
            .into_iter()
            .filter(|id| !chosen.iter().any(|c| c == id))
            .filter_map(|id| self.index.get(id).copied())
            .filter(|&d| self.tasks[d].state == TaskState::Pending)
            .collect()
    }

    /// The first upstream of task `i` that failed or was upstream_failed, for messages.
    pub(crate) fn failed_upstream(&self, i: usize) -> Option<&str> {
        self.tasks[i]
            .after
            .iter()
            .filter_map(|up| self.index.get(up))
            .map(|&u| &self.tasks[u])
            .find(|t| matches!(t.state, TaskState::Failed | TaskState::UpstreamFailed))
            .map(|t| t.task_id.as_str())
    }

    /// The follow-up instances and downstream rewiring for the follow-ups of task `i`, or
    /// `None` when they were added already. Follow-up ids are prefixed with the parent's id,
    /// so two parents cannot collide; `Err` names a clash with an existing task.
    #[allow(clippy::type_complexity)]
    pub(crate) fn expansion(
        &self,
        i: usize,
    ) -> Result<Option<(Vec<TaskInstance>, Vec<(String, Vec<String>)>)>, String> {
        let parent = &self.tasks[i];
        if parent.follow_ups.is_empty() {
            return Ok(None);
        }
        let prefixed = |id: &str| dagmq_core::task::follow_up_task_id(&parent.task_id, id);
        let ids: Vec<String> = parent.follow_ups.iter().map(|f| prefixed(&f.id)).collect();
        if ids.iter().all(|id| self.index.contains_key(id)) {
            return Ok(None);
        }
        if let Some(clash) = ids.iter().find(|id| self.index.contains_key(*id)) {
            return Err(format!("follow-up id {clash:?} clashes with an existing task"));
        }
        let new_tasks = parent
            .follow_ups
            .iter()
            .map(|f| {
                let mut after = vec![parent.task_id.clone()];
                after.extend(f.after.iter().map(|a| prefixed(a)));
                let retries = f.retries.unwrap_or(parent.retries);
                let mut instance = TaskInstance::pending(prefixed(&f.id), after, parent.queue.clone(), retries);
                instance.follow_up = Some(Box::new(FollowUp { id: prefixed(&f.id), ..f.clone() }));
                instance
            })
            .collect();
        let rewired = self.downstream[i]
            .iter()
            .map(|&d| {
                let mut after = self.tasks[d].after.to_vec();
                after.extend(ids.iter().cloned());
                (self.tasks[d].task_id.clone(), after)
            })
            .collect();
        Ok(Some((new_tasks, rewired)))
    }

    /// Applies an expansion to the view.
    pub(crate) fn apply_expansion(&mut self, new_tasks: Vec<TaskInstance>, rewired: Vec<(String, Vec<String>)>) {
        for (task_id, after) in rewired {
            if let Some(&i) = self.index.get(&task_id) {
                self.tasks[i].after = after.into();
            }
        }
        self.tasks.extend(new_tasks);
        self.rebuild();
    }
}

/// Whether task `i` succeeded with follow-ups that are not in the run (`index`) yet, as
/// [`ActiveRun::expansion`] sees it: none of their ids is there (one that clashes with an
/// existing task is never added, and its parent's downstream goes on without them).
fn follow_ups_missing(tasks: &[TaskInstance], index: &HashMap<String, usize>, i: usize) -> bool {
    let task = &tasks[i];
    task.state == TaskState::Success
        && !task.follow_ups.is_empty()
        && task
            .follow_ups
            .iter()
            .all(|f| !index.contains_key(&dagmq_core::task::follow_up_task_id(&task.task_id, &f.id)))
}

/// Whether `task` is a branch task of `dag` (a follow-up never is).
fn is_branch(dag: &Dag, task: &TaskInstance) -> bool {
    task.follow_up.is_none() && dag.task(&task.task_id).is_some_and(|spec| spec.config.branch)
}

/// Points `after` at `shared` when both list the same ids, so one copy serves every instance.
fn share_after(after: &mut Arc<[String]>, shared: &Arc<[String]>) {
    if !Arc::ptr_eq(after, shared) && after[..] == shared[..] {
        *after = shared.clone();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use dagmq_core::{RunKind, RunState, TaskSpec};

    /// A running run `r` of dag `d`.
    fn running_record() -> RunRecord {
        let at = chrono::DateTime::from_timestamp(0, 0).unwrap();
        RunRecord {
            run_id: "r".into(),
            dag_id: "d".into(),
            state: RunState::Running,
            kind: RunKind::Manual,
            logical_date: at,
            params: Default::default(),
            key: None,
            created_at: at,
            started_at: None,
            ended_at: None,
            dag_version: None,
        }
    }

    fn decoded(task: &TaskInstance) -> TaskInstance {
        serde_json::from_str(&serde_json::to_string(task).unwrap()).unwrap()
    }

    #[test]
    fn instances_share_the_dag_s_upstream_lists() {
        let dag = Dag::builder("d")
            .task(TaskSpec::command("a", ["true"]))
            .task(TaskSpec::command("b", ["true"]))
            .task(TaskSpec::command("c", ["true"]).after(["a", "b"]))
            .build()
            .unwrap();
        let dag = Arc::new(dag);
        let spec_after = dag.task("c").unwrap().after.clone();
        let record = running_record();
        // As read from a store: every list a copy of its own.
        let tasks: Vec<TaskInstance> = dag
            .tasks()
            .iter()
            .map(|t| decoded(&TaskInstance::pending(t.id.clone(), t.after.to_vec(), "default", 0)))
            .collect();
        assert!(!Arc::ptr_eq(&tasks[2].after, &spec_after));
        let mut run = ActiveRun::new(record, dag.clone(), tasks, Arc::default(), Arc::default());
        let c = run.index["c"];
        assert!(Arc::ptr_eq(&run.tasks[c].after, &spec_after));
        assert_eq!(run.upstream[c], UpstreamCounts { total: 2, ..Default::default() });

        // A fresh read of the same task keeps sharing; a changed list (a rewiring) is kept.
        let mut fresh = decoded(&run.tasks[c]);
        fresh.state = TaskState::UpstreamFailed;
        run.replace(c, fresh);
        assert!(Arc::ptr_eq(&run.tasks[c].after, &spec_after));
        let mut rewired = decoded(&run.tasks[c]);
        rewired.after = vec!["a".to_string(), "b".to_string(), "a.x".to_string()].into();
        run.replace(c, rewired);
        assert_eq!(run.tasks[c].after.len(), 3);
    }

    /// The sweep puts the store's tasks in place of a stale view and rebuilds it: the limits the
    /// old view took must be given back whatever the new tasks say.
    #[test]
    fn a_rebuild_over_fresh_tasks_gives_back_exactly_what_the_view_took() {
        use crate::limits::{LimitKey, Usage};
        let dag = Arc::new(
            Dag::builder("d")
                .task(TaskSpec::command("a", ["true"]).pool("db", 1))
                .task(TaskSpec::command("b", ["true"]).pool("db", 1))
                .build()
                .unwrap(),
        );
        let record = running_record();
        let task = |id: &str, state: TaskState| {
            let mut t = TaskInstance::pending(id, Vec::<String>::new(), "default", 0);
            t.state = state;
            t
        };
        let usage: Arc<Mutex<Usage>> = Arc::default();
        let db = LimitKey::Pool("db".into());
        let mut run = ActiveRun::new(
            record,
            dag,
            vec![task("a", TaskState::Running), task("b", TaskState::Pending)],
            Arc::default(),
            usage.clone(),
        );
        assert_eq!(crate::limits::lock(&usage).used(&db), 1);
        // The store says a finished (a status update the view missed): its slot is free.
        run.tasks = vec![task("a", TaskState::Success), task("b", TaskState::Pending)];
        run.rebuild();
        assert_eq!(crate::limits::lock(&usage).used(&db), 0, "a gave its slot back");
        // And b was queued meanwhile: it holds the slot.
        run.tasks = vec![task("a", TaskState::Success), task("b", TaskState::Queued)];
        run.rebuild();
        assert_eq!(crate::limits::lock(&usage).used(&db), 1);
        drop(run);
        assert_eq!(crate::limits::lock(&usage).used(&db), 0);
    }

    /// A branch that succeeded decides its unchosen direct downstream tasks (`Skip`) whatever
    /// their rules and other upstreams say; before it succeeds, and for the tasks it chose,
    /// the rules decide.
    #[test]
    fn a_branch_that_did_not_choose_a_task_decides_it() {
        let dag = Arc::new(
            Dag::builder("d")
                .task(TaskSpec::command("pick", ["true"]).branch())
                .task(TaskSpec::command("extract", ["true"]))
                .task(TaskSpec::command("a", ["true"]).after(["pick", "extract"]))
                .task(TaskSpec::command("b", ["true"]).after(["pick", "extract"]))
                .task(TaskSpec::command("c", ["true"]).after(["pick"]).trigger_rule(TriggerRule::AllDone))
                .build()
                .unwrap(),
        );
        let tasks =
            dag.tasks().iter().map(|t| TaskInstance::pending(t.id.clone(), t.after.to_vec(), "default", 0)).collect();
        let mut run = ActiveRun::new(running_record(), dag, tasks, Arc::default(), Arc::default());
        let (pick, extract, a, b, c) =
            (run.index["pick"], run.index["extract"], run.index["a"], run.index["b"], run.index["c"]);
        let ended = |id: &str, state: TaskState, output: Option<serde_json::Value>| {
            let mut t = TaskInstance::pending(id, Vec::<String>::new(), "default", 0);
            t.state = state;
            t.output = output;
            t
        };
        run.replace(extract, ended("extract", TaskState::Success, None));
        assert_eq!([run.decision(a), run.decision(b), run.decision(c)], [Decision::Wait; 3]);
        run.replace(pick, ended("pick", TaskState::Success, Some(serde_json::json!(["a"]))));
        assert_eq!(
            [run.decision(a), run.decision(b), run.decision(c)],
            [Decision::Run, Decision::Skip, Decision::Skip]
        );
        // A branch that failed chose nothing: the rules decide.
        run.replace(pick, ended("pick", TaskState::Failed, Some(serde_json::json!(["a"]))));
        assert_eq!(run.decision(b), Decision::UpstreamFailed);
        assert_eq!(run.decision(c), Decision::Run);
    }

    /// A task waits while an upstream's follow-ups are not in the run, whatever the counts of
    /// its upstreams as stored say; once they are added it waits for them by the counts.
    #[test]
    fn a_task_waits_for_the_follow_ups_of_an_upstream_not_added_yet() {
        let dag = Arc::new(
            Dag::builder("d")
                .task(TaskSpec::command("p", ["true"]))
                .task(TaskSpec::command("a", ["true"]))
                .task(TaskSpec::command("d", ["true"]).after(["p", "a"]))
                .build()
                .unwrap(),
        );
        let tasks =
            dag.tasks().iter().map(|t| TaskInstance::pending(t.id.clone(), t.after.to_vec(), "default", 0)).collect();
        let mut run = ActiveRun::new(running_record(), dag, tasks, Arc::default(), Arc::default());
        let (p, a, d) = (run.index["p"], run.index["a"], run.index["d"]);
        let mut p_done = run.tasks[p].clone();
        p_done.state = TaskState::Success;
        p_done.follow_ups = vec![FollowUp::new("x", "step", serde_json::Value::Null)];
        run.replace(p, p_done);
        let mut a_done = run.tasks[a].clone();
        a_done.state = TaskState::Success;
        run.replace(a, a_done);
        assert_eq!(run.decision(d), Decision::Wait, "p.x is not in the run yet");
        let (new_tasks, rewired) = run.expansion(p).unwrap().unwrap();
        run.apply_expansion(new_tasks, rewired);
        assert_eq!(run.decision(d), Decision::Wait, "p.x is pending");
        let x = run.index["p.x"];
        let mut x_done = run.tasks[x].clone();
        x_done.state = TaskState::Success;
        run.replace(x, x_done);
        assert_eq!(run.decision(d), Decision::Run);
    }
}
