//! An in-memory store: one lock around plain maps, so every operation is atomic, as the Lua
//! scripts of the Redis store are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::BackendError;
use crate::dag_version::DagVersionRecord;
use crate::records::{DagRecord, RunRecord, TaskInstance, WorkerInfo};
use crate::state::{RunState, TaskState};
use crate::store::{
    ClaimAnswer, Claimant, CreateRun, EagerClaim, Fence, FinishedAndClaimed, FinishedTry, LeaseTerm, NextClaim,
    RunFilter, Store, TaskChange, append_capped,
};

/// An in-memory store.
#[derive(Default)]
pub struct MemoryStore {
    /// Everything, behind one lock; shared with this store's fenced views.
    inner: Arc<Mutex<Inner>>,
    /// For a scheduler's view: its writes need this fence to hold the lease.
    fence: Option<Fence>,
    /// Finished runs are dropped this long after they finish (checked as runs are created, by
    /// the new run's creation time); `None` keeps them.
    retention: Option<Duration>,
}

/// Everything a [`MemoryStore`] held at one moment (see [`MemoryStore::snapshot`]).
pub struct MemorySnapshot(Inner);

/// The maps.
#[derive(Default, Clone)]
struct Inner {
    /// Per-DAG bookkeeping.
    dags: HashMap<String, DagRecord>,
    /// Runs by id.
    runs: HashMap<String, RunEntry>,
    /// Run ids in creation order, for newest-first listings.
    order: Vec<String>,
    /// (DAG, idempotency key) to run id.
    keys: HashMap<(String, String), String>,
    /// Workers by name.
    workers: HashMap<String, WorkerInfo>,
    /// The scheduler lease's term in force (if any), with its expiry.
    lease: Option<(LeaseTerm, DateTime<Utc>)>,
    /// The number of the last term granted: the next grant is numbered above it.
    last_term: u64,
    /// Finished runs in the order they finished, with when, for retention.
    finished: std::collections::VecDeque<(DateTime<Utc>, String)>,
    /// DAG versions by (DAG, version), each with how many runs in `runs` name it: a version is
    /// dropped with the last of its runs.
    versions: HashMap<(String, String), (DagVersionRecord, usize)>,
}

impl Inner {
    /// Drops runs (with their tasks, logs and keys) that finished before `horizon`.
    fn expire_before(&mut self, horizon: DateTime<Utc>) {
        let mut gone = std::collections::HashSet::new();
        while let Some((ended, _)) = self.finished.front() {
            if *ended >= horizon {
                break;
            }
            let Some((_, run_id)) = self.finished.pop_front() else { break };
            let expired =
                |e: &RunEntry| e.record.state.is_final() && e.record.ended_at.unwrap_or(e.record.created_at) < horizon;
            if self.runs.get(&run_id).is_some_and(expired)
                && let Some(entry) = self.runs.remove(&run_id)
            {
                if let Some(version) = entry.record.dag_version {
                    let key = (entry.record.dag_id, version);
                    if let Some((_, runs)) = self.versions.get_mut(&key) {
                        *runs = runs.saturating_sub(1);
                        if *runs == 0 {
                            self.versions.remove(&key);
                        }
                    }
                }
                gone.insert(run_id);
            }
        }
        if !gone.is_empty() {
            self.order.retain(|id| !gone.contains(id));
            self.keys.retain(|_, id| !gone.contains(id));
        }
    }
}

/// A run with its tasks and logs.
#[derive(Clone)]
struct RunEntry {
    /// The run.
    record: RunRecord,
    /// Its tasks in creation order.
    tasks: Vec<TaskInstance>,
    /// Task id to index in `tasks`.
    index: HashMap<String, usize>,
    /// Log lines by (task, try).
    logs: HashMap<(String, u32), Vec<String>>,
}

impl RunEntry {
    /// Replaces a task's instance if it is still in `expected_state` at `expected_try`.
    fn transition(&mut self, expected_state: TaskState, expected_try: u32, task: &TaskInstance) -> bool {
        let Some(&i) = self.index.get(&task.task_id) else { return false };
        let current = &mut self.tasks[i];
        if current.state != expected_state || current.try_number != expected_try {
            return false;
        }
        *current = task.clone();
        true
    }

    /// Claims a try as [`Store::claim_try`] does, in this run.
    fn claim(&mut self, task_id: &str, try_number: u32, claimant: &Claimant, read: &[&str]) -> ClaimAnswer {
        let read: Vec<Option<TaskInstance>> =
            read.iter().map(|id| self.index.get(*id).map(|&i| self.tasks[i].clone())).collect();
        let Some(&i) = self.index.get(task_id) else { return ClaimAnswer { task: None, claimed: false, read } };
        let running = self.record.state == RunState::Running;
        let current = &mut self.tasks[i];
        if current.state != TaskState::Queued || current.try_number != try_number || !running {
            return ClaimAnswer { task: Some(current.clone()), claimed: false, read };
        }
        *current = current.claimed_by(claimant);
        ClaimAnswer { task: Some(current.clone()), claimed: true, read }
    }
}

impl MemoryStore {
    /// An empty store that keeps finished runs.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// An empty store that drops finished runs, their logs and trigger keys `retention` after
    /// they finish, so a long-lived standalone process stays bounded.
    pub fn with_retention(retention: Option<Duration>) -> MemoryStore {
        MemoryStore { retention, ..MemoryStore::default() }
    }

    /// A copy of everything stored, to roll back to with [`MemoryStore::roll_back`].
    pub fn snapshot(&self) -> MemorySnapshot {
        MemorySnapshot(self.inner().clone())
    }

    /// Puts everything back as it was at `snapshot`, losing every write since: what a Redis
    /// failover does to a primary's writes its replica had not received (`--redis-replicas 0`).
    /// For tests of that loss.
    pub fn roll_back(&self, snapshot: MemorySnapshot) {
        *self.inner() = snapshot.0;
    }

    /// The maps, even after a panic elsewhere (every critical section leaves them consistent).
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The maps for a scheduler's write: refused unless this view's fence is the term in force
    /// and that term has not expired (by the fence's clock, the one its holder renews by, as
    /// Redis's key expiry refuses it by Redis's clock), checked under the same lock as the write.
    fn writable(&self, what: &str) -> Result<MutexGuard<'_, Inner>, BackendError> {
        let inner = self.inner();
        match &self.fence {
            Some(fence)
                if !inner
                    .lease
                    .as_ref()
                    .is_some_and(|(lease, expires)| *lease == fence.lease && *expires > fence.clock.now()) =>
            {
                Err(fence.refused(what))
            }
            _ => Ok(inner),
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn dag_record(&self, dag_id: &str) -> Result<Option<DagRecord>, BackendError> {
        Ok(self.inner().dags.get(dag_id).cloned())
    }

    async fn put_dag_record(&self, record: &DagRecord) -> Result<(), BackendError> {
        self.writable("dag record")?.dags.insert(record.dag_id.clone(), record.clone());
        Ok(())
    }

    async fn put_dag_version(&self, version: &DagVersionRecord) -> Result<(), BackendError> {
        let mut inner = self.writable("dag version")?;
        let key = (version.dag_id.clone(), version.version.clone());
        let runs = inner.versions.get(&key).map_or(0, |(_, runs)| *runs);
        inner.versions.insert(key, (version.clone(), runs));
        Ok(())
    }

    async fn dag_version(&self, dag_id: &str, version: &str) -> Result<Option<DagVersionRecord>, BackendError> {
        let inner = self.inner();
        Ok(inner.versions.get(&(dag_id.to_string(), version.to_string())).map(|(record, _)| record.clone()))
    }

    async fn create_run(&self, run: &RunRecord, tasks: &[TaskInstance]) -> Result<CreateRun, BackendError> {
        let mut inner = self.writable("run creation")?;
        if let Some(retention) = self.retention {
            inner.expire_before(run.created_at - chrono::Duration::from_std(retention).unwrap_or_default());
        }
        if inner.runs.contains_key(&run.run_id) {
            return Ok(CreateRun::Exists(run.run_id.clone()));
        }
        if let Some(key) = &run.key
            && let Some(existing) = inner.keys.get(&(run.dag_id.clone(), key.clone()))
        {
            return Ok(CreateRun::Exists(existing.clone()));
        }
        if let Some(version) = &run.dag_version {
            match inner.versions.get_mut(&(run.dag_id.clone(), version.clone())) {
                Some((_, runs)) => *runs += 1,
                None => return Ok(CreateRun::MissingVersion),
            }
        }
        if let Some(key) = &run.key {
            inner.keys.insert((run.dag_id.clone(), key.clone()), run.run_id.clone());
        }
        let index = tasks.iter().enumerate().map(|(i, t)| (t.task_id.clone(), i)).collect();
        inner.order.push(run.run_id.clone());
        inner.runs.insert(
            run.run_id.clone(),
            RunEntry { record: run.clone(), tasks: tasks.to_vec(), index, logs: HashMap::new() },
        );
        Ok(CreateRun::Created)
    }

    async fn run(&self, run_id: &str) -> Result<Option<RunRecord>, BackendError> {
        Ok(self.inner().runs.get(run_id).map(|e| e.record.clone()))
    }

    async fn transition_run(&self, expected: RunState, run: &RunRecord) -> Result<bool, BackendError> {
        self.transition_run_with_tasks(expected, run, &[]).await
    }

    async fn transition_run_with_tasks(
        &self,
        expected: RunState,
        run: &RunRecord,
        changes: &[TaskChange],
    ) -> Result<bool, BackendError> {
        let mut inner = self.writable("run transition")?;
        match inner.runs.get_mut(&run.run_id) {
            Some(entry) if entry.record.state == expected => {
                entry.record = run.clone();
                for change in changes {
                    entry.transition(change.expected_state, change.expected_try, &change.task);
                }
                if run.state.is_final() {
                    inner.finished.push_back((run.ended_at.unwrap_or(run.created_at), run.run_id.clone()));
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, BackendError> {
        let inner = self.inner();
        Ok(inner
            .order
            .iter()
            .rev()
            .filter_map(|id| inner.runs.get(id))
            .map(|e| &e.record)
            .filter(|r| filter.dag_id.as_ref().is_none_or(|d| *d == r.dag_id))
            .filter(|r| filter.state.is_none_or(|s| s == r.state))
            .skip(filter.offset)
            .take(filter.limit)
            .cloned()
            .collect())
    }

    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>, BackendError> {
        let inner = self.inner();
        Ok(inner
            .order
            .iter()
            .filter_map(|id| inner.runs.get(id))
            .filter(|e| !e.record.state.is_final())
            .map(|e| e.record.clone())
            .collect())
    }

    async fn tasks(&self, run_id: &str) -> Result<Vec<TaskInstance>, BackendError> {
        Ok(self.inner().runs.get(run_id).map(|e| e.tasks.clone()).unwrap_or_default())
    }

    async fn task(&self, run_id: &str, task_id: &str) -> Result<Option<TaskInstance>, BackendError> {
        let inner = self.inner();
        Ok(inner.runs.get(run_id).and_then(|e| e.index.get(task_id).map(|&i| e.tasks[i].clone())))
    }

    async fn transition_task(
        &self,
        run_id: &str,
        expected_state: TaskState,
        expected_try: u32,
        task: &TaskInstance,
    ) -> Result<bool, BackendError> {
        let mut inner = self.writable("task transition")?;
        Ok(inner.runs.get_mut(run_id).is_some_and(|entry| entry.transition(expected_state, expected_try, task)))
    }

    async fn claim_try(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        claimant: &Claimant,
        read: &[&str],
    ) -> Result<ClaimAnswer, BackendError> {
        let mut inner = self.writable("claim")?;
        let Some(entry) = inner.runs.get_mut(run_id) else {
            return Ok(ClaimAnswer { task: None, claimed: false, read: vec![None; read.len()] });
        };
        Ok(entry.claim(task_id, try_number, claimant, read))
    }

    async fn finish_and_claim(
        &self,
        run_id: &str,
        done: &TaskInstance,
        next: &NextClaim<'_>,
    ) -> Result<FinishedAndClaimed, BackendError> {
        let mut inner = self.writable("task transition and claim")?;
        let Some(entry) = inner.runs.get_mut(run_id) else {
            let next = ClaimAnswer { task: None, claimed: false, read: vec![None; next.read.len()] };
            return Ok(FinishedAndClaimed { applied: false, next });
        };
        let applied = entry.transition(TaskState::Running, done.try_number, done);
        let next = entry.claim(next.task_id, next.try_number, next.claimant, next.read);
        Ok(FinishedAndClaimed { applied, next })
    }

    async fn finish_try(
        &self,
        run_id: &str,
        done: &TaskInstance,
        candidates: &[EagerClaim],
    ) -> Result<FinishedTry, BackendError> {
        let mut inner = self.writable("task transition")?;
        let Some(entry) = inner.runs.get_mut(run_id) else { return Ok(FinishedTry::default()) };
        if !entry.transition(TaskState::Running, done.try_number, done) {
            return Ok(FinishedTry::default());
        }
        let applied = FinishedTry { applied: true, ..FinishedTry::default() };
        if done.state != TaskState::Success || entry.record.state != RunState::Running {
            return Ok(applied);
        }
        let mut finished = applied;
        for (n, candidate) in candidates.iter().enumerate() {
            let Some(&i) = entry.index.get(&candidate.expected.task_id) else { continue };
            let upstream = |id: &str| entry.index.get(id).map(|&u| &entry.tasks[u]);
            if entry.tasks[i] == candidate.expected && candidate.upstreams_allow(upstream) {
                entry.tasks[i] = candidate.claimed.clone();
                let then =
                    candidate.then.iter().map(|id| entry.index.get(id).map(|&t| entry.tasks[t].clone())).collect();
                finished.claimed.push((n, then));
            }
        }
        Ok(finished)
    }

    async fn tasks_by_id(&self, run_id: &str, task_ids: &[&str]) -> Result<Vec<Option<TaskInstance>>, BackendError> {
        let inner = self.inner();
        let entry = inner.runs.get(run_id);
        Ok(task_ids.iter().map(|id| entry.and_then(|e| e.index.get(*id).map(|&i| e.tasks[i].clone()))).collect())
    }

    async fn transition_tasks(&self, run_id: &str, changes: &[TaskChange]) -> Result<Vec<bool>, BackendError> {
        let mut inner = self.writable("task transitions")?;
        let Some(entry) = inner.runs.get_mut(run_id) else { return Ok(vec![false; changes.len()]) };
        Ok(changes.iter().map(|c| entry.transition(c.expected_state, c.expected_try, &c.task)).collect())
    }

    async fn add_tasks(
        &self,
        run_id: &str,
        new_tasks: &[TaskInstance],
        new_upstreams: &[(String, Vec<String>)],
    ) -> Result<(), BackendError> {
        let mut inner = self.writable("follow-ups")?;
        let Some(entry) = inner.runs.get_mut(run_id) else {
            return Err(BackendError::new(format!("run {run_id:?} not found")));
        };
        if new_tasks.iter().any(|t| entry.index.contains_key(&t.task_id)) {
            return Ok(());
        }
        for task in new_tasks {
            entry.index.insert(task.task_id.clone(), entry.tasks.len());
            entry.tasks.push(task.clone());
        }
        for (task_id, after) in new_upstreams {
            if let Some(&i) = entry.index.get(task_id) {
                entry.tasks[i].after = after.as_slice().into();
            }
        }
        Ok(())
    }

    async fn set_progress(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        progress: f64,
    ) -> Result<(), BackendError> {
        let mut inner = self.inner();
        if let Some(entry) = inner.runs.get_mut(run_id)
            && let Some(&i) = entry.index.get(task_id)
        {
            let task = &mut entry.tasks[i];
            if task.try_number == try_number && task.state == TaskState::Running {
                task.progress = Some(progress);
            }
        }
        Ok(())
    }

    async fn append_log(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        lines: &[String],
    ) -> Result<(), BackendError> {
        let mut inner = self.inner();
        if let Some(entry) = inner.runs.get_mut(run_id) {
            append_capped(entry.logs.entry((task_id.to_string(), try_number)).or_default(), lines);
        }
        Ok(())
    }

    async fn read_log(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        from: usize,
    ) -> Result<Vec<String>, BackendError> {
        let inner = self.inner();
        Ok(inner
            .runs
            .get(run_id)
            .and_then(|e| e.logs.get(&(task_id.to_string(), try_number)))
            .map(|log| log.iter().skip(from).cloned().collect())
            .unwrap_or_default())
    }

    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<(), BackendError> {
        self.inner().workers.insert(worker.name.clone(), worker.clone());
        Ok(())
    }

    async fn remove_worker(&self, name: &str) -> Result<(), BackendError> {
        self.writable("worker removal")?.workers.remove(name);
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, BackendError> {
        let mut workers: Vec<WorkerInfo> = self.inner().workers.values().cloned().collect();
        workers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(workers)
    }

    async fn acquire_lease(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<Option<LeaseTerm>, BackendError> {
        let mut inner = self.inner();
        let free = match &inner.lease {
            Some((current, expires)) => current.holder == holder || *expires <= now,
            None => true,
        };
        if !free {
            return Ok(None);
        }
        inner.last_term += 1;
        let lease = LeaseTerm { holder: holder.to_string(), term: inner.last_term };
        inner.lease = Some((lease.clone(), now + chrono::Duration::from_std(ttl).unwrap_or_default()));
        Ok(Some(lease))
    }

    async fn renew_lease(&self, lease: &LeaseTerm, now: DateTime<Utc>, ttl: Duration) -> Result<bool, BackendError> {
        let mut inner = self.inner();
        match &mut inner.lease {
            Some((current, expires)) if current == lease && *expires > now => {
                *expires = now + chrono::Duration::from_std(ttl).unwrap_or_default();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_lease(&self, lease: &LeaseTerm) -> Result<(), BackendError> {
        let mut inner = self.inner();
        if inner.lease.as_ref().is_some_and(|(current, _)| current == lease) {
            inner.lease = None;
        }
        Ok(())
    }

    fn fenced(&self, fence: Fence) -> Option<Arc<dyn Store>> {
        Some(Arc::new(MemoryStore { inner: self.inner.clone(), fence: Some(fence), retention: self.retention }))
    }

    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }
}
