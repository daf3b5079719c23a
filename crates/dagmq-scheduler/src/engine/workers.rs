//! Zombie handling: tries whose worker is lost, restarted or not running them are requeued as new
//! tries, and queued tries that nobody claimed have their message published again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dagmq_core::fail_point;
use dagmq_core::{BackendError, RunState, TaskInstance, TaskState, Topic, WorkerInfo};

use super::queueing::{task_headers, task_message};
use super::{Engine, TryKey};

/// Longest wait between two republishes of one queued try, and how long a queued try waits
/// before it is republished while its pool's queue still holds messages.
const REPUBLISH_MAX_WAIT: Duration = Duration::from_secs(600);

/// Pools with queued tasks and no live worker consuming them: how many looks in a row found each
/// so. A pool is to be logged once, at the second look in a row (so not for a worker that is
/// only starting), and again only after a look found it served or without queued tasks.
#[derive(Debug, Default)]
pub(super) struct UnservedPools {
    looks: HashMap<String, u32>,
}

impl UnservedPools {
    /// Takes one look, `waiting` being the unserved pools with their queued tasks; answers the
    /// pools to log now, with their tasks, by name.
    pub(super) fn look<'a>(&mut self, waiting: HashMap<&'a str, usize>) -> Vec<(&'a str, usize)> {
        self.looks.retain(|pool, _| waiting.contains_key(pool.as_str()));
        let mut due: Vec<(&str, usize)> = waiting
            .into_iter()
            .filter(|(pool, _)| {
                let looks = self.looks.entry(pool.to_string()).or_default();
                *looks = looks.saturating_add(1);
                *looks == 2
            })
            .collect();
        due.sort_unstable();
        due
    }
}

impl Engine {
    /// Shares the pools `live` workers consume with the API, and logs a pool that has queued
    /// tasks and no live worker consuming it: once, when two looks in a row (one zombie check
    /// interval apart, so not a worker that is only starting) found it so, and again only after
    /// a worker consumed it in between.
    pub(super) fn note_unserved_pools(&mut self, live: &HashMap<String, WorkerInfo>) {
        let served: HashSet<String> = live.values().flat_map(|worker| worker.queues.iter().cloned()).collect();
        let mut waiting: HashMap<&str, usize> = HashMap::new();
        for run in self.active.values() {
            for task in run.tasks.iter().filter(|task| task.state == TaskState::Queued) {
                if !served.contains(&task.queue) {
                    *waiting.entry(task.queue.as_str()).or_default() += 1;
                }
            }
        }
        let mut consumed: Vec<&str> = served.iter().map(String::as_str).collect();
        consumed.sort_unstable();
        for (pool, tasks) in self.unserved.look(waiting) {
            tracing::warn!(
                pool,
                tasks,
                "tasks queued on pool {pool:?} wait: no live worker consumes it (live workers consume: {}); \
                 start a worker with --queues {pool}, or check the task's `queue`",
                if consumed.is_empty() { "nothing, no worker is live".to_string() } else { consumed.join(", ") }
            );
        }
        *self.worker_pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(served);
    }

    /// Finds lost worker instances and requeues the tries they were running as new tries. An
    /// instance is lost when its heartbeat is older than `worker_timeout` (the entry then leaves
    /// the registry), or when a worker of the same name started again (a new instance). Tries
    /// are found through the lost instance's last heartbeat and, for tries claimed after it,
    /// through the running runs' tasks.
    /// Answers the live workers by name.
    pub(super) async fn requeue_lost_workers(&mut self) -> Result<HashMap<String, WorkerInfo>, BackendError> {
        let now = self.now_cache;
        let timeout = chrono::Duration::from_std(self.config.worker_timeout).unwrap_or_default();
        // (worker name, the live instance to keep or none, the lost heartbeat entry if any)
        let mut lost: Vec<(String, Option<String>, Option<WorkerInfo>)> = Vec::new();
        let mut live = HashMap::new();
        let workers = self.store.workers().await?;
        // Heartbeats are judged by the store's clock when it has one (Redis stamps each
        // heartbeat with its own time), so a worker whose clock is behind is not taken for lost.
        let store_now = self.store.now().await?.unwrap_or(now);
        for worker in workers {
            if store_now - worker.last_heartbeat > timeout {
                tracing::warn!(worker = %worker.name, last_heartbeat = %worker.last_heartbeat, "worker lost: requeueing its tries");
                self.known_instances.remove(&worker.name);
                lost.push((worker.name.clone(), None, Some(worker)));
            } else {
                if self.known_instances.get(&worker.name) != Some(&worker.instance) {
                    // A worker seen for the first time, or restarted: tries of other instances
                    // of the same name belong to processes that are gone.
                    self.known_instances.insert(worker.name.clone(), worker.instance.clone());
                    lost.push((worker.name.clone(), Some(worker.instance.clone()), None));
                }
                live.insert(worker.name.clone(), worker);
            }
        }
        for (name, keep, entry) in lost {
            let mut candidates: Vec<(String, String)> = entry
                .as_ref()
                .map(|w| w.running.iter().map(|t| (t.run_id.clone(), t.task_id.clone())).collect())
                .unwrap_or_default();
            for run in self.active.values() {
                for task in &run.tasks {
                    if matches!(task.state, TaskState::Queued | TaskState::Running) {
                        candidates.push((run.id().to_string(), task.task_id.clone()));
                    }
                }
            }
            candidates.sort();
            candidates.dedup();
            for (run_id, task_id) in candidates {
                let Some(task) = self.store.task(&run_id, &task_id).await? else { continue };
                if task.state != TaskState::Running
                    || task.worker.as_deref() != Some(name.as_str())
                    || (keep.is_some() && task.worker_instance == keep)
                {
                    continue;
                }
                let reason = format!("try {} interrupted: worker {name} lost", task.try_number);
                self.requeue_interrupted(&run_id, &task, reason, "worker_lost").await?;
            }
            if entry.is_some() {
                self.store.remove_worker(&name).await?;
            }
        }
        Ok(live)
    }

    /// Reads again the tasks this scheduler's view holds as `queued` for longer than
    /// `republish_after`, and publishes again the ones still waiting: their message may be gone
    /// (a publish that failed after the compare-and-set, a message dead-lettered after too many
    /// deliveries). While the pool's queue holds messages the try may simply be waiting its
    /// turn, so it is republished only after [`REPUBLISH_MAX_WAIT`]; each further republish of
    /// one try waits twice as long as the one before, up to that bound. Tasks that moved on
    /// (claimed, or finished with the status update lost) update the view.
    pub(super) async fn republish_stale_queued(&mut self) -> Result<(), BackendError> {
        let now = self.now_cache;
        let after = chrono::Duration::from_std(self.config.republish_after).unwrap_or_default();
        let mut stale: HashMap<String, Vec<String>> = HashMap::new();
        let mut queued = std::collections::HashSet::new();
        for run in self.active.values() {
            for task in run.tasks.iter().filter(|t| t.state == TaskState::Queued) {
                queued.insert((run.id().to_string(), task.task_id.clone(), task.try_number));
                if task.queued_at.is_none_or(|at| now - at >= after) {
                    stale.entry(run.id().to_string()).or_default().push(task.task_id.clone());
                }
            }
        }
        // Tries no longer queued need no memory of their republishes.
        self.republished.retain(|key, _| queued.contains(key));
        let mut depths: HashMap<String, u64> = HashMap::new();
        for (run_id, task_ids) in stale {
            let ids: Vec<&str> = task_ids.iter().map(String::as_str).collect();
            let fresh = self.store.tasks_by_id(&run_id, &ids).await?;
            let Some(mut run) = self.active.remove(&run_id) else { continue };
            let result = async {
                for task in fresh.into_iter().flatten() {
                    let Some(&i) = run.index.get(&task.task_id) else { continue };
                    if task.state != TaskState::Queued || task.try_number != run.tasks[i].try_number {
                        self.on_task_changed(&mut run, i, task, true).await?;
                        continue;
                    }
                    let key = (run_id.clone(), task.task_id.clone(), task.try_number);
                    let waited = self.republished.get(&key).map(|(at, wait)| (now - *at, *wait));
                    let depth = match depths.get(&task.queue) {
                        Some(depth) => *depth,
                        None => {
                            let depth = self.queue.depth(&Topic::Tasks(task.queue.clone())).await.unwrap_or(0);
                            depths.insert(task.queue.clone(), depth);
                            depth
                        }
                    };
                    let queued_for = task.queued_at.map_or(chrono::Duration::MAX, |at| now - at);
                    let max_wait = chrono::Duration::from_std(REPUBLISH_MAX_WAIT).unwrap_or_default();
                    let due = match waited {
                        None => depth == 0 || queued_for >= max_wait,
                        Some((since, wait)) => since >= chrono::Duration::from_std(wait).unwrap_or_default(),
                    };
                    if !due {
                        continue;
                    }
                    let next_wait =
                        waited.map_or(self.config.republish_after * 2, |(_, wait)| wait * 2).min(REPUBLISH_MAX_WAIT);
                    tracing::warn!(
                        run = %run_id, task = %task.task_id, try_number = task.try_number,
                        "task queued since {} and not claimed: publishing its message again",
                        task.queued_at.map_or("?".to_string(), |t| t.to_rfc3339())
                    );
                    self.metrics.republished.inc(&[]);
                    self.outbox.push((Topic::Tasks(task.queue.clone()), task_message(&run, &task), task_headers(&run)));
                    self.republished.insert(key, (now, next_wait));
                }
                Ok::<(), BackendError>(())
            }
            .await;
            self.put_back(run).await?;
            result?;
        }
        Ok(())
    }

    /// Requeues, as new tries, tries that the store has `running` under a live worker whose
    /// heartbeats keep not listing them: the worker is not running them (a claim that applied
    /// although the worker saw an error). A try is requeued once a heartbeat written after the
    /// one that first missed it misses it too, and `unlisted_grace` has passed.
    pub(super) async fn requeue_unlisted(&mut self, live: &HashMap<String, WorkerInfo>) -> Result<(), BackendError> {
        let now = self.now_cache;
        let grace = chrono::Duration::from_std(self.config.unlisted_grace).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let mut due: Vec<(TryKey, Unrun)> = Vec::new();
        for run in self.active.values() {
            for task in &run.tasks {
                if task.state != TaskState::Running {
                    continue;
                }
                let key = (run.id().to_string(), task.task_id.clone(), task.try_number);
                let Some(worker) = task.worker.as_ref().and_then(|name| live.get(name)) else {
                    // Running under a worker that left the registry (lost): a try the view learned
                    // of after the loss was handled (claimed eagerly, its upstream's status lost
                    // with the worker). Requeued once `unlisted_grace` has passed.
                    if task.worker.is_some() {
                        seen.insert(key.clone());
                        match self.unlisted.get(&key) {
                            None => drop(self.unlisted.insert(key, (now, DateTime::<Utc>::MIN_UTC))),
                            Some((since, _)) if now - *since >= grace => due.push((key, Unrun::Gone)),
                            Some(_) => {}
                        }
                    }
                    continue;
                };
                if task.worker_instance.as_deref() != Some(worker.instance.as_str()) {
                    // A try of an earlier process of a worker that has started again (one the
                    // view learned of after the restart was seen: a try claimed eagerly, whose
                    // upstream's status update died with that process).
                    if task.worker_instance.is_some() {
                        due.push((key, Unrun::Restarted));
                    }
                    continue;
                }
                let listed = worker
                    .running
                    .iter()
                    .any(|t| t.run_id == run.id() && t.task_id == task.task_id && t.try_number == task.try_number);
                if listed {
                    continue;
                }
                seen.insert(key.clone());
                match self.unlisted.get(&key) {
                    None => {
                        self.unlisted.insert(key, (now, worker.last_heartbeat));
                    }
                    Some((since, stamp)) => {
                        if now - *since >= grace && worker.last_heartbeat != *stamp {
                            due.push((key, Unrun::Unlisted));
                        }
                    }
                }
            }
        }
        self.unlisted.retain(|key, _| seen.contains(key));
        for ((run_id, task_id, try_number), unrun) in due {
            self.unlisted.remove(&(run_id.clone(), task_id.clone(), try_number));
            let Some(task) = self.store.task(&run_id, &task_id).await? else { continue };
            if !unrun.holds(&task, try_number, live) {
                continue;
            }
            let worker = task.worker.clone().unwrap_or_default();
            let reason = format!("try {try_number} interrupted: worker {worker} {}", unrun.reason());
            self.requeue_interrupted(&run_id, &task, reason, unrun.label()).await?;
        }
        Ok(())
    }

    /// Moves a `running` try whose worker is not running it to a new queued try (or to failed,
    /// past the bound on interruptions), queues its message and updates the run's view. `why`
    /// labels the `dagmq_tries_requeued_total` counter.
    async fn requeue_interrupted(
        &mut self,
        run_id: &str,
        task: &TaskInstance,
        reason: String,
        why: &str,
    ) -> Result<(), BackendError> {
        // A suspended run queues nothing, a new try of an interrupted one included: the try is
        // stopped as the suspension stops it, and resuming the run queues the next.
        let suspended = self.active.get(run_id).is_some_and(|run| run.record.state == RunState::Suspended);
        let next = match task.stopped_by_suspension(self.now_cache) {
            Some(stopped) if suspended => stopped,
            _ => task.after_interruption(self.now_cache, reason),
        };
        if !self.store.transition_task(run_id, TaskState::Running, task.try_number, &next).await? {
            return Ok(());
        }
        fail_point!("scheduler::requeue::after_cas");
        tracing::warn!(
            run = %run_id, task = %task.task_id, try_number = task.try_number, next_try = next.try_number,
            state = %next.state, why, "interrupted try handled"
        );
        self.metrics.requeued.inc(&[why]);
        let Some(mut run) = self.active.remove(run_id) else { return Ok(()) };
        let result = match run.index.get(&task.task_id).copied() {
            Some(i) => {
                if next.state == TaskState::Queued {
                    self.outbox.push((Topic::Tasks(next.queue.clone()), task_message(&run, &next), task_headers(&run)));
                }
                self.on_task_changed(&mut run, i, next, true).await
            }
            None => Ok(()),
        };
        self.put_back(run).await?;
        result
    }
}

/// Why the zombie check takes a `running` try for one that nobody runs.
#[derive(Debug, Clone, Copy)]
enum Unrun {
    /// Its worker left the registry.
    Gone,
    /// Its worker started again: the try belongs to an earlier process.
    Restarted,
    /// Its live worker keeps not listing it in its heartbeats.
    Unlisted,
}

impl Unrun {
    /// Whether `task`, read again, is still such a try at `try_number`.
    fn holds(self, task: &TaskInstance, try_number: u32, live: &HashMap<String, WorkerInfo>) -> bool {
        if task.state != TaskState::Running || task.try_number != try_number {
            return false;
        }
        let worker = task.worker.as_ref().and_then(|name| live.get(name));
        match self {
            Unrun::Gone => worker.is_none(),
            Unrun::Restarted => worker.is_some_and(|w| task.worker_instance.as_deref() != Some(w.instance.as_str())),
            Unrun::Unlisted => true,
        }
    }

    /// What happened to the worker, for the try's error.
    fn reason(self) -> &'static str {
        match self {
            Unrun::Gone => "lost",
            Unrun::Restarted => "restarted",
            Unrun::Unlisted => "is not running it",
        }
    }

    /// The `dagmq_tries_requeued_total` label.
    fn label(self) -> &'static str {
        match self {
            Unrun::Gone | Unrun::Restarted => "worker_lost",
            Unrun::Unlisted => "not_running",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unserved_pool_is_logged_once_at_its_second_look_and_again_after_it_was_served() {
        let mut pools = UnservedPools::default();
        let gpu = |tasks| HashMap::from([("gpu", tasks)]);
        assert_eq!(pools.look(gpu(1)), [], "a first look may see a worker that is only starting");
        assert_eq!(pools.look(gpu(2)), [("gpu", 2)]);
        for tasks in 3..50 {
            assert_eq!(pools.look(gpu(tasks)), [], "logged again at look {tasks}");
        }
        // A worker came (or the tasks went): the next time it is unserved is news again.
        assert_eq!(pools.look(HashMap::new()), []);
        assert_eq!(pools.look(gpu(1)), []);
        assert_eq!(pools.look(gpu(1)), [("gpu", 1)]);
        // Two pools are told apart, in the order of their names.
        let both = |a, b| HashMap::from([("gpu", a), ("arm", b)]);
        assert_eq!(pools.look(both(1, 1)), []);
        assert_eq!(pools.look(both(1, 3)), [("arm", 3)]);
        assert_eq!(pools.look(both(1, 3)), []);
    }
}
