//! Concurrency limits: named pools with slots, a DAG's `max_active_tasks` and a task's
//! `max_active`. A task takes its share of each limit that applies to it while it is `queued` or
//! `running`; the scheduler queues a task only when every such limit has room, and otherwise
//! keeps it waiting, in order, behind the limit that stopped it.
//!
//! Usage is counted from the scheduler's views of its active runs (each `ActiveRun` adds and
//! takes back its tasks as their states change), so after a takeover the new scheduler's counts
//! are what the store holds: limits hold across schedulers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use dagmq_core::{Dag, Pools, TaskState};

/// One limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LimitKey {
    /// A named pool.
    Pool(String),
    /// A DAG's `max_active_tasks`.
    Dag(String),
    /// A task's `max_active` (DAG id, task id).
    Task(String, String),
}

impl LimitKey {
    /// How the API says a task waits for it (`waiting_for`).
    pub(crate) fn reason(&self) -> String {
        match self {
            LimitKey::Pool(pool) => format!("pool {pool}"),
            LimitKey::Dag(_) => "max_active_tasks".to_string(),
            LimitKey::Task(..) => "max_active".to_string(),
        }
    }
}

/// What a task takes of each limit that applies to it: (limit, amount, capacity).
pub(crate) type Claim = Vec<(LimitKey, u32, u32)>;

/// The limits that apply to task `task_id` of `dag`; empty for most tasks (and follow-ups).
pub(crate) fn claim_of(dag: &Dag, task_id: &str, pools: &Pools) -> Claim {
    let mut claim = Claim::new();
    let Some(spec) = dag.task(task_id) else { return claim };
    if let Some(pool) = &spec.config.pool {
        // An unknown pool is refused when the DAG loads; should one get here, it does not limit.
        let capacity = pools.get(pool).copied().unwrap_or(u32::MAX);
        claim.push((LimitKey::Pool(pool.clone()), spec.config.pool_slots, capacity));
    }
    if let Some(max) = dag.max_active_tasks {
        claim.push((LimitKey::Dag(dag.id.clone()), 1, max));
    }
    if let Some(max) = spec.config.max_active {
        claim.push((LimitKey::Task(dag.id.clone(), spec.id.clone()), 1, max));
    }
    claim
}

/// Whether a task in `state` holds its share of its limits.
pub(crate) fn occupies(state: TaskState) -> bool {
    matches!(state, TaskState::Queued | TaskState::Running)
}

/// How much of each limit is taken, shared by the engine and the views of its runs.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    used: HashMap<LimitKey, u32>,
    /// Limits that had room given back since the engine last looked.
    freed: HashSet<LimitKey>,
}

impl Usage {
    /// Takes (`sign` 1) or gives back (`sign` -1) a task's claim.
    pub(crate) fn add(&mut self, claim: &Claim, sign: i64) {
        for (key, amount, _) in claim {
            let used = self.used.entry(key.clone()).or_default();
            if sign > 0 {
                *used += amount;
            } else {
                *used = used.saturating_sub(*amount);
                self.freed.insert(key.clone());
            }
        }
    }

    /// The first limit of `claim` without room, counting `reserved` as taken too.
    pub(crate) fn blocking(&self, claim: &Claim, reserved: &HashMap<LimitKey, u32>) -> Option<LimitKey> {
        claim
            .iter()
            .find(|(key, amount, capacity)| {
                let used = self.used.get(key).copied().unwrap_or(0) + reserved.get(key).copied().unwrap_or(0);
                used + amount > *capacity
            })
            .map(|(key, ..)| key.clone())
    }

    /// The limits freed since the last call.
    pub(crate) fn take_freed(&mut self) -> Vec<LimitKey> {
        self.freed.drain().collect()
    }

    /// Has the engine look at `key`'s waiting tasks again (after a pass it could not finish).
    pub(crate) fn mark_freed(&mut self, key: LimitKey) {
        self.freed.insert(key);
    }

    /// How much of `key` is taken.
    #[cfg(test)]
    pub(crate) fn used(&self, key: &LimitKey) -> u32 {
        self.used.get(key).copied().unwrap_or(0)
    }
}

/// The shared usage, locked.
pub(crate) fn lock(usage: &Mutex<Usage>) -> MutexGuard<'_, Usage> {
    usage.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why each waiting task waits, by (run id, task id): what the API shows as `waiting_for`.
pub type WaitingFor = Arc<Mutex<HashMap<(String, String), String>>>;

/// The pools the live workers consume, as of the scheduler's last look at the registry
/// (`None` before the first): a task queued on any other pool waits for a worker.
pub type WorkerPools = Arc<Mutex<Option<std::collections::HashSet<String>>>>;

/// What the API shows as `waiting_for` of a task queued on `pool`: `no live worker consumes pool
/// POOL` when the scheduler's last look at the registry found no live worker consuming it.
pub(crate) fn unserved_reason(pools: &WorkerPools, pool: &str) -> Option<String> {
    let pools = pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    pools.as_ref().filter(|pools| !pools.contains(pool)).map(|_| format!("no live worker consumes pool {pool}"))
}

/// The engine's side: the pools, the shared usage, and the tasks waiting behind each limit.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    /// Pools and their slots.
    pub(crate) pools: Pools,
    /// Taken shares, kept by the runs' views.
    pub(crate) usage: Arc<Mutex<Usage>>,
    /// Tasks waiting behind each limit, oldest first.
    pub(crate) waiting: HashMap<LimitKey, VecDeque<(String, String)>>,
    /// The limit each waiting task waits behind.
    pub(crate) blocked_on: HashMap<(String, String), LimitKey>,
    /// The reasons, for the API.
    pub(crate) waiting_for: WaitingFor,
}

impl Limits {
    /// Records that a task waits behind `key` (once, however often it is found blocked).
    pub(crate) fn wait(&mut self, run_id: &str, task_id: &str, key: LimitKey) {
        let id = (run_id.to_string(), task_id.to_string());
        if self.blocked_on.get(&id) == Some(&key) {
            return;
        }
        if let Some(old) = self.blocked_on.insert(id.clone(), key.clone())
            && let Some(queue) = self.waiting.get_mut(&old)
        {
            queue.retain(|entry| *entry != id);
        }
        lock_reasons(&self.waiting_for).insert(id.clone(), key.reason());
        self.waiting.entry(key).or_default().push_back(id);
    }

    /// Forgets that a task waits (it was queued, or its run ended).
    pub(crate) fn stop_waiting(&mut self, run_id: &str, task_id: &str) {
        let id = (run_id.to_string(), task_id.to_string());
        if let Some(key) = self.blocked_on.remove(&id) {
            lock_reasons(&self.waiting_for).remove(&id);
            if let Some(queue) = self.waiting.get_mut(&key) {
                queue.retain(|entry| *entry != id);
            }
        }
    }

    /// Forgets every task of a run that ended.
    pub(crate) fn forget_run(&mut self, run_id: &str) {
        if self.blocked_on.is_empty() {
            return;
        }
        let ids: Vec<(String, String)> = self.blocked_on.keys().filter(|(r, _)| r == run_id).cloned().collect();
        for (run, task) in ids {
            self.stop_waiting(&run, &task);
        }
    }

    /// Forgets everything waiting (a new term rebuilds it from the store).
    pub(crate) fn clear_waiting(&mut self) {
        self.waiting.clear();
        self.blocked_on.clear();
        lock_reasons(&self.waiting_for).clear();
    }
}

fn lock_reasons(reasons: &WaitingFor) -> MutexGuard<'_, HashMap<(String, String), String>> {
    reasons.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The reason task `task_id` of `run_id` waits, if it does.
pub(crate) fn waiting_reason(reasons: &WaitingFor, run_id: &str, task_id: &str) -> Option<String> {
    lock_reasons(reasons).get(&(run_id.to_string(), task_id.to_string())).cloned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use dagmq_core::TaskSpec;

    #[test]
    fn claims_follow_the_dag_and_usage_counts_them() {
        let dag = Dag::builder("d")
            .max_active_tasks(3)
            .task(TaskSpec::command("a", ["true"]).pool("db", 2).max_active(1))
            .task(TaskSpec::command("b", ["true"]))
            .build()
            .unwrap();
        let pools: Pools = [("db".to_string(), 4)].into();
        let a = claim_of(&dag, "a", &pools);
        assert_eq!(
            a,
            vec![
                (LimitKey::Pool("db".into()), 2, 4),
                (LimitKey::Dag("d".into()), 1, 3),
                (LimitKey::Task("d".into(), "a".into()), 1, 1)
            ]
        );
        let mut usage = Usage::default();
        assert_eq!(usage.blocking(&a, &HashMap::new()), None);
        usage.add(&a, 1);
        assert_eq!(usage.blocking(&a, &HashMap::new()), Some(LimitKey::Task("d".into(), "a".into())));
        let reserved: HashMap<LimitKey, u32> = [(LimitKey::Pool("db".into()), 1)].into();
        let b_like: Claim = vec![(LimitKey::Pool("db".into()), 2, 4)];
        assert_eq!(usage.blocking(&b_like, &reserved), Some(LimitKey::Pool("db".into())), "reservations count");
        assert_eq!(usage.used(&LimitKey::Pool("db".into())), 2);
        usage.add(&a, -1);
        assert_eq!(usage.take_freed().len(), 3);
        assert_eq!(usage.used(&LimitKey::Dag("d".into())), 0);
        assert!(claim_of(&dag, "b", &pools).len() == 1, "b only counts against the dag's limit");
    }

    #[test]
    fn a_waiting_task_waits_once_behind_one_limit() {
        let mut limits = Limits::default();
        limits.wait("r", "a", LimitKey::Pool("db".into()));
        limits.wait("r", "a", LimitKey::Pool("db".into()));
        assert_eq!(limits.waiting[&LimitKey::Pool("db".into())].len(), 1);
        limits.wait("r", "a", LimitKey::Dag("d".into()));
        assert!(limits.waiting[&LimitKey::Pool("db".into())].is_empty());
        assert_eq!(waiting_reason(&limits.waiting_for, "r", "a").as_deref(), Some("max_active_tasks"));
        limits.forget_run("r");
        assert_eq!(waiting_reason(&limits.waiting_for, "r", "a"), None);
        assert!(limits.waiting[&LimitKey::Dag("d".into())].is_empty());
    }
}
