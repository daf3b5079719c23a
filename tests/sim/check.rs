//! The referee: a reference model of dagmq's semantics written plainly, without the scheduler's
//! code (trigger rules, branch choice, follow-ups before downstream, skip propagation, the final
//! run state), and the checks every history must pass. Limits are checked at every write, at the
//! instant it applied; everything else once the simulation has settled.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use dagmq_core::memory::MemoryStore;
use dagmq_core::store::{LeaseTerm, RunFilter};
use dagmq_core::{RunKind, RunRecord, RunState, Store, TaskInstance, TaskState, TriggerRule};

use crate::workload::{DagPlan, Event, History};
use crate::world::LeaseGrant;

/// Checks every write against the limits: pools, `max_active`, `max_active_tasks` and
/// `max_active_runs`, counted as the scheduler counts them (queued and running tasks of the
/// DAG's tasks, not of follow-ups, in running runs; running runs), at the instant the write
/// applied.
pub struct LimitWatch {
    /// Every version of every DAG, by (id, version).
    plans: Mutex<HashMap<(String, String), DagPlan>>,
    pools: dagmq_core::Pools,
    /// What was exceeded, where (at most a few kept).
    pub violations: Mutex<Vec<String>>,
}

impl LimitWatch {
    /// A watch over these DAGs and pools.
    pub fn new(plans: &[DagPlan], pools: dagmq_core::Pools) -> LimitWatch {
        LimitWatch {
            plans: Mutex::new(plans.iter().map(|p| ((p.id.clone(), p.version.clone()), p.clone())).collect()),
            pools,
            violations: Mutex::new(Vec::new()),
        }
    }

    /// Adds a version a reload made.
    pub fn add_plan(&self, plan: &DagPlan) {
        self.plans.lock().unwrap().insert((plan.id.clone(), plan.version.clone()), plan.clone());
    }

    /// Counts usage in the store as it is now; records any limit exceeded, and answers what
    /// it found.
    pub async fn check(&self, store: &MemoryStore, after: &str) -> Vec<String> {
        // A suspended run keeps its place under `max_active_runs` (the scheduler counts it
        // until it ends), so it is counted with the running ones.
        let mut runs = Vec::new();
        for state in [RunState::Running, RunState::Suspended] {
            let filter = RunFilter { state: Some(state), limit: usize::MAX, ..RunFilter::default() };
            let Ok(found) = store.list_runs(&filter).await else { return Vec::new() };
            runs.extend(found);
        }
        // Slots used by pool, and the tries using them.
        let mut pool_use: BTreeMap<String, (u32, Vec<String>)> = BTreeMap::new();
        let mut task_use: BTreeMap<(String, String), u32> = BTreeMap::new();
        let mut running_runs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        // `max_active_tasks` counts the DAG's tasks across all its runs, as Airflow's does.
        let mut dag_use: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut found = Vec::new();
        let plans = self.plans.lock().unwrap().clone();
        // Limits are the same in every version of a DAG (reloads change other settings).
        let limits_of = |dag: &str| plans.values().find(|p| p.id == dag).cloned();
        for run in &runs {
            let version = run.dag_version.clone().unwrap_or_default();
            let Some(plan) = plans.get(&(run.dag_id.clone(), version)) else { continue };
            running_runs.entry(run.dag_id.clone()).or_default().push(format!("{}={}", run.run_id, run.state));
            let Ok(tasks) = store.tasks(&run.run_id).await else { continue };
            let busy: Vec<&TaskInstance> =
                tasks.iter().filter(|t| matches!(t.state, TaskState::Queued | TaskState::Running)).collect();
            for task in busy {
                // Follow-ups take no share of any limit.
                let Some(spec) = plan.task(&task.task_id) else { continue };
                if plan.max_active_tasks.is_some() {
                    dag_use
                        .entry(run.dag_id.clone())
                        .or_default()
                        .push(format!("{}/{}#{}", run.run_id, task.task_id, task.try_number));
                }
                if let Some((pool, slots)) = &spec.pool {
                    let used = pool_use.entry(pool.clone()).or_default();
                    used.0 += slots;
                    used.1.push(format!("{}/{}#{} {}", run.run_id, task.task_id, task.try_number, task.state));
                }
                if spec.max_active.is_some() {
                    *task_use.entry((run.dag_id.clone(), task.task_id.clone())).or_default() += 1;
                }
            }
        }
        for (pool, (used, by)) in &pool_use {
            let slots = self.pools.get(pool).copied().unwrap_or(0);
            if *used > slots {
                found.push(format!("pool {pool}: {used} slots used of {slots} ({})", by.join(", ")));
            }
        }
        for (dag, busy) in &dag_use {
            let max = limits_of(dag).and_then(|p| p.max_active_tasks).unwrap_or(u32::MAX);
            if busy.len() as u32 > max {
                found.push(format!(
                    "dag {dag}: {} tasks busy ({}), max_active_tasks {max}",
                    busy.len(),
                    busy.join(" ")
                ));
            }
        }
        for ((dag, task), used) in &task_use {
            let max = limits_of(dag).and_then(|p| p.task(task).and_then(|t| t.max_active)).unwrap_or(u32::MAX);
            if *used > max {
                found.push(format!("task {dag}/{task}: {used} busy, max_active {max}"));
            }
        }
        for (dag, running) in &running_runs {
            let max = limits_of(dag).map_or(u32::MAX, |p| p.max_active_runs);
            if running.len() as u32 > max {
                found.push(format!(
                    "dag {dag}: {} runs running ({}), max_active_runs {max}",
                    running.len(),
                    running.join(" ")
                ));
            }
        }
        let found: Vec<String> = found.into_iter().map(|f| format!("limit exceeded after {after}: {f}")).collect();
        let mut violations = self.violations.lock().unwrap();
        if violations.len() < 20 {
            violations.extend(found.iter().cloned());
        }
        found
    }
}

/// The store's final state: every run with its tasks.
pub struct Final {
    /// Runs by id.
    pub runs: BTreeMap<String, (RunRecord, Vec<TaskInstance>)>,
}

impl Final {
    /// Reads every run and task from the store.
    pub async fn read(store: &MemoryStore) -> Final {
        let mut runs = BTreeMap::new();
        let filter = RunFilter { limit: usize::MAX, ..RunFilter::default() };
        for run in store.list_runs(&filter).await.expect("memory store answers") {
            let tasks = store.tasks(&run.run_id).await.expect("memory store answers");
            runs.insert(run.run_id.clone(), (run, tasks));
        }
        Final { runs }
    }
}

/// A try that ended well: when (simulated ms), and what it chose if it is a branch.
type Success<'a> = (u64, Option<&'a Vec<String>>);

/// Every violation of the contract the history and the final state show.
pub fn check(
    plans: &[DagPlan],
    history: &History,
    done: &Final,
    leases: &[LeaseGrant],
    bounded: &BTreeSet<String>,
) -> Vec<String> {
    // Every version of every DAG: a run is held against its own version.
    let by_version: HashMap<(&str, &str), &DagPlan> =
        plans.iter().map(|p| ((p.id.as_str(), p.version.as_str()), p)).collect();
    let plan_of =
        |run: &RunRecord| by_version.get(&(run.dag_id.as_str(), run.dag_version.as_deref().unwrap_or(""))).copied();
    let events = history.events.lock().unwrap().clone();
    let commands = history.commands.lock().unwrap().clone();
    let mut violations = Vec::new();

    // Runs an operator reset (restart, clear) or cancelled: some checks do not apply to them.
    let reset: HashSet<&str> = commands
        .iter()
        .filter(|c| matches!(c.kind, "restart" | "clear" | "clear_downstream"))
        .map(|c| c.target.as_str())
        .collect();
    let cancelled: HashSet<&str> = commands.iter().filter(|c| c.kind == "cancel").map(|c| c.target.as_str()).collect();

    // Every trigger key made exactly one run.
    let mut keys: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
    for (run, _) in done.runs.values() {
        if let Some(key) = &run.key {
            keys.entry((&run.dag_id, key)).or_default().push(&run.run_id);
        }
    }
    for ((dag, key), runs) in &keys {
        if runs.len() > 1 {
            violations.push(format!("trigger key {key:?} of {dag} made {} runs: {runs:?}", runs.len()));
        }
    }

    // Every schedule point made at most one run (scheduled or backfilled), and no two runs of
    // one point ran tasks.
    let mut points: HashMap<(&str, DateTime<Utc>), Vec<&str>> = HashMap::new();
    for (run, _) in done.runs.values() {
        if matches!(run.kind, RunKind::Scheduled | RunKind::Backfill) {
            points.entry((&run.dag_id, run.logical_date)).or_default().push(&run.run_id);
        }
    }
    for ((dag, point), runs) in &points {
        if runs.len() > 1 {
            violations.push(format!("schedule point {point} of {dag} has {} runs: {runs:?}", runs.len()));
        }
    }

    // Every run that existed when the faults stopped ended.
    for (run, tasks) in done.runs.values() {
        if bounded.contains(&run.run_id) && !run.state.is_final() {
            let states: Vec<String> =
                tasks.iter().map(|t| format!("{}={}#{}", t.task_id, t.state, t.try_number)).collect();
            violations.push(format!(
                "run {} of {} is stuck in {}: {}",
                run.run_id,
                run.dag_id,
                run.state,
                states.join(" ")
            ));
        }
    }

    // Try numbers: each try runs at most once, and the store's try number is never below one
    // that ran. (An older try may start after a newer one when its worker was frozen between
    // the claim and the start: the documented two-copies window; its outcome is refused.)
    let mut last_try: HashMap<(&str, &str), u32> = HashMap::new();
    let mut started: HashSet<(&str, &str, u32)> = HashSet::new();
    for event in &events {
        if let Event::Start { run, task, try_number, worker, at } = event {
            if !started.insert((run.as_str(), task.as_str(), *try_number)) {
                violations.push(format!(
                    "run {run} task {task}: try {try_number} started a second time, on {worker} at {at} ms"
                ));
            }
            let last = last_try.entry((run.as_str(), task.as_str())).or_default();
            *last = (*last).max(*try_number);
        }
    }
    for (run, tasks) in done.runs.values() {
        for task in tasks {
            if let Some(ran) = last_try.get(&(run.run_id.as_str(), task.task_id.as_str()))
                && task.try_number < *ran
            {
                violations.push(format!(
                    "run {} task {}: stored try {} is below try {ran}, which ran",
                    run.run_id, task.task_id, task.try_number
                ));
            }
        }
    }

    // When each try ended successfully, and what each branch chose.
    // Only tries the store recorded as successes count: a body that ended well as its timeout
    // fired (or after its try was requeued) is a failed or refused try, and chose nothing.
    let recorded = |run: &str, task: &str, try_number: u32| {
        done.runs.get(run).is_some_and(|(_, tasks)| {
            tasks.iter().filter(|t| t.task_id == task).any(|t| {
                (t.try_number == try_number && t.state == TaskState::Success)
                    || t.tries.iter().any(|r| r.try_number == try_number && r.outcome == "success")
            })
        })
    };
    let mut successes: HashMap<(&str, &str), Vec<Success<'_>>> = HashMap::new();
    for event in &events {
        if let Event::End { run, task, try_number, ok: true, chose, at } = event
            && recorded(run, task, *try_number)
        {
            successes.entry((run.as_str(), task.as_str())).or_default().push((*at, chose.as_ref()));
        }
    }

    // No try starts after its task's successful try ended (outside a restart or a clear).
    for (run, tasks) in done.runs.values() {
        if reset.contains(run.run_id.as_str()) {
            continue;
        }
        for task in tasks.iter().filter(|t| t.state == TaskState::Success) {
            let won = events.iter().find_map(|e| match e {
                Event::End { run: r, task: t, try_number, ok: true, at, .. }
                    if *r == run.run_id && *t == task.task_id && *try_number == task.try_number =>
                {
                    Some(*at)
                }
                _ => None,
            });
            let Some(won) = won else { continue };
            for event in &events {
                if let Event::Start { run: r, task: t, try_number, worker, at } = event
                    && *r == run.run_id
                    && *t == task.task_id
                    && *at > won
                {
                    violations.push(format!(
                        "run {r} task {t}: try {try_number} started on {worker} at {at} ms, after try {} had succeeded at {won} ms",
                        task.try_number
                    ));
                }
            }
        }
    }

    // A task ran only when the model says it may.
    for event in &events {
        let Event::Start { run, task, try_number, at, .. } = event else { continue };
        let Some((record, tasks)) = done.runs.get(run) else {
            violations.push(format!("try {try_number} of {run}/{task} ran, but the store has no run {run}"));
            continue;
        };
        let Some(plan) = plan_of(record) else { continue };
        let Some(stored) = tasks.iter().find(|t| &t.task_id == task) else {
            violations.push(format!("try {try_number} of {run}/{task} ran, but the run has no task {task}"));
            continue;
        };
        let rule = plan.task(task).map(|t| t.rule).unwrap_or(TriggerRule::AllSuccess);
        let succeeded_before =
            |up: &str| successes.get(&(run.as_str(), up)).is_some_and(|ends| ends.iter().any(|(end, _)| end <= at));
        if rule == TriggerRule::AllSuccess {
            for up in stored.after.iter() {
                if !succeeded_before(up) {
                    violations.push(format!(
                        "run {run}: {task} (try {try_number}) started at {at} ms before its upstream {up} had succeeded"
                    ));
                }
            }
        }
        // A branch's unchosen direct downstream never runs, unless its rule can decide to run
        // it before every upstream ended (one_success, one_failed): then it may have been
        // decided before the branch's choice was known.
        // (A clear or a restart of the branch leaves its downstream as it was, so a try of
        // it that started under the branch's earlier choice may go on: those runs are left out.)
        let early = matches!(rule, TriggerRule::OneSuccess | TriggerRule::OneFailed) || reset.contains(run.as_str());
        for up in stored.after.iter().filter(|_| !early) {
            if !plan.task(up).is_some_and(|t| t.branch) {
                continue;
            }
            let latest = successes
                .get(&(run.as_str(), up.as_str()))
                .and_then(|ends| ends.iter().filter(|(end, _)| end <= at).max_by_key(|(end, _)| *end));
            if let Some((_, Some(chose))) = latest
                && !chose.contains(task)
            {
                violations.push(format!(
                    "run {run}: {task} (try {try_number}) started at {at} ms though branch {up} chose {chose:?}"
                ));
            }
        }
    }

    for (run, tasks) in done.runs.values() {
        if !run.state.is_final() || run.state == RunState::Cancelled || cancelled.contains(run.run_id.as_str()) {
            continue;
        }
        let Some(plan) = plan_of(run) else { continue };
        let by_id: HashMap<&str, &TaskInstance> = tasks.iter().map(|t| (t.task_id.as_str(), t)).collect();
        // A restart or a clear keeps the tasks it does not reset as they ended (a success
        // stays, whatever its upstreams do next, as in Airflow): the final states of such a
        // run need not agree with the rules.
        let rules_hold = !reset.contains(run.run_id.as_str());
        for task in tasks {
            if rules_hold
                && let Some(expected) = expected_states(plan, task, &by_id)
                && !expected.contains(&task.state)
            {
                violations.push(format!(
                    "run {} ({}): task {} ({}) ended {} but the model says {:?} (upstreams: {})",
                    run.run_id,
                    run.state,
                    task.task_id,
                    plan.task(&task.task_id).map_or("follow-up".to_string(), |t| format!(
                        "{}{}",
                        t.rule,
                        if t.branch { ", branch" } else { "" }
                    )),
                    task.state,
                    expected,
                    task.after
                        .iter()
                        .map(|u| format!("{u}={}", by_id.get(u.as_str()).map_or("?".into(), |t| t.state.to_string())))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            if task.state == TaskState::Success
                && !successes.contains_key(&(run.run_id.as_str(), task.task_id.as_str()))
            {
                violations
                    .push(format!("run {}: task {} is success but no try of it succeeded", run.run_id, task.task_id));
            }
        }
        // A task fails only when a try of it failed, ran past its timeout or was interrupted
        // too often: never for a reason of dagmq's own (a worker that had not loaded the run's
        // version, a lost answer).
        for task in tasks.iter().filter(|t| t.state == TaskState::Failed) {
            let tried_and_failed = events.iter().any(|e| {
                matches!(e, Event::End { run: r, task: t, ok: false, .. } if *r == run.run_id && *t == task.task_id)
            });
            let error = task.error.clone().unwrap_or_default();
            let allowed = ["timed out", "timeout", "interrupted", "stopped"].iter().any(|w| error.contains(w));
            if !tried_and_failed && !allowed {
                violations.push(format!(
                    "run {}: task {} failed though no try of it failed: {error}",
                    run.run_id, task.task_id
                ));
            }
        }
        let all_fine = tasks.iter().all(|t| matches!(t.state, TaskState::Success | TaskState::Skipped));
        let expected = if all_fine { RunState::Success } else { RunState::Failed };
        if run.state != expected {
            let states: Vec<String> =
                tasks.iter().map(|t| format!("{}={} try {}", t.task_id, t.state, t.try_number)).collect();
            violations.push(format!(
                "run {} ended {} but its tasks say {expected} ({})",
                run.run_id,
                run.state,
                states.join(", ")
            ));
        }
        // Every task of a successful run has exactly one successful try (unless an operator
        // asked for it to run again).
        if run.state == RunState::Success && !reset.contains(run.run_id.as_str()) {
            for task in tasks.iter().filter(|t| t.state == TaskState::Success) {
                let stored = task.tries.iter().filter(|t| t.outcome == "success").count() + 1;
                if stored != 1 {
                    violations.push(format!("run {}: task {} has {stored} successful tries", run.run_id, task.task_id));
                }
            }
        }
    }

    // Lease terms: once another term was granted, an earlier term is never granted or renewed
    // again (a term is an epoch, not a name), and each grant's number is above every earlier
    // one's.
    let mut ended: HashSet<&LeaseTerm> = HashSet::new();
    let mut current: Option<&LeaseTerm> = None;
    let mut highest = 0;
    for grant in leases {
        if !grant.renewal {
            if grant.lease.term <= highest {
                violations.push(format!(
                    "lease {} ({}) granted at {} ms under a number not above the last one granted ({highest})",
                    grant.lease, grant.process, grant.at_ms
                ));
            }
            highest = highest.max(grant.lease.term);
        }
        if current != Some(&grant.lease) {
            if ended.contains(&grant.lease) || grant.renewal {
                violations.push(format!(
                    "lease {} ({}) {} again at {} ms after another term had it",
                    grant.lease,
                    grant.process,
                    if grant.renewal { "renewed" } else { "granted" },
                    grant.at_ms
                ));
            }
            if let Some(previous) = current {
                ended.insert(previous);
            }
            current = Some(&grant.lease);
        }
    }
    violations
}

/// The final states the model allows for `task`, given its upstreams' final states; `None`
/// when the model has nothing to say (an upstream unknown to the store).
fn expected_states(
    plan: &DagPlan,
    task: &TaskInstance,
    by_id: &HashMap<&str, &TaskInstance>,
) -> Option<Vec<TaskState>> {
    let mut ups = Vec::new();
    for up in task.after.iter() {
        ups.push(*by_id.get(up.as_str())?);
    }
    // An unchosen direct downstream of a successful branch is skipped, unless its trigger rule
    // could decide it before the branch ended (an upstream failed first, or one_success met
    // by another upstream): then either is right, depending on which upstream ended first, as
    // in Airflow.
    for up in &ups {
        if plan.task(&up.task_id).is_some_and(|t| t.branch) && up.state == TaskState::Success {
            let chose: Vec<String> = match &up.output {
                Some(serde_json::Value::Array(ids)) => {
                    ids.iter().filter_map(|v| v.as_str().map(String::from)).collect()
                }
                Some(serde_json::Value::String(id)) => vec![id.clone()],
                _ => Vec::new(),
            };
            if !chose.contains(&task.task_id) {
                let mut states = vec![TaskState::Skipped];
                let others: Vec<&TaskInstance> = ups.iter().filter(|u| u.task_id != up.task_id).copied().collect();
                states.extend(early_decision(plan, task, &others, ups.len()));
                return Some(states);
            }
        }
    }
    Some(by_rule(plan, task, &ups))
}

/// What the task's trigger rule could decide while some of its `total` upstreams had not
/// ended yet, from the ones in `known`: nothing when the rule has to wait for them.
fn early_decision(plan: &DagPlan, task: &TaskInstance, known: &[&TaskInstance], total: usize) -> Vec<TaskState> {
    let succeeded = known.iter().filter(|u| u.state == TaskState::Success).count();
    let failed = known.iter().filter(|u| matches!(u.state, TaskState::Failed | TaskState::UpstreamFailed)).count();
    let rule = plan.task(&task.task_id).map(|t| t.rule).unwrap_or(TriggerRule::AllSuccess);
    let _ = total;
    match rule {
        TriggerRule::AllSuccess | TriggerRule::NoneFailed if failed > 0 => vec![TaskState::UpstreamFailed],
        TriggerRule::OneSuccess if succeeded > 0 => vec![TaskState::Success, TaskState::Failed],
        TriggerRule::OneFailed if failed > 0 => vec![TaskState::Success, TaskState::Failed],
        _ => Vec::new(),
    }
}

/// What the task's trigger rule makes of its upstreams' final states.
fn by_rule(plan: &DagPlan, task: &TaskInstance, ups: &[&TaskInstance]) -> Vec<TaskState> {
    const RAN: [TaskState; 2] = [TaskState::Success, TaskState::Failed];
    let total = ups.len();
    let succeeded = ups.iter().filter(|u| u.state == TaskState::Success).count();
    let failed = ups.iter().filter(|u| matches!(u.state, TaskState::Failed | TaskState::UpstreamFailed)).count();
    let rule = plan.task(&task.task_id).map(|t| t.rule).unwrap_or(TriggerRule::AllSuccess);
    let ran = RAN.to_vec();
    match rule {
        TriggerRule::AllSuccess if succeeded == total => ran,
        TriggerRule::AllSuccess if failed > 0 => vec![TaskState::UpstreamFailed],
        TriggerRule::AllSuccess => vec![TaskState::Skipped],
        TriggerRule::AllDone => ran,
        TriggerRule::AllFailed if failed == total => ran,
        TriggerRule::AllFailed => vec![TaskState::Skipped],
        TriggerRule::OneSuccess if succeeded > 0 || total == 0 => ran,
        TriggerRule::OneSuccess if failed > 0 => vec![TaskState::UpstreamFailed],
        TriggerRule::OneSuccess => vec![TaskState::Skipped],
        TriggerRule::OneFailed if failed > 0 || total == 0 => ran,
        TriggerRule::OneFailed => vec![TaskState::Skipped],
        TriggerRule::NoneFailed if failed > 0 => vec![TaskState::UpstreamFailed],
        TriggerRule::NoneFailed => ran,
    }
}
