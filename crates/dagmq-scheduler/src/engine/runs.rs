//! Run creation: triggers (from the API and from `dagmq.triggers`), backfills, the run watcher
//! that creates scheduled runs, the per-DAG bookkeeping, and the start of queued runs when their
//! DAG has a free slot under `max_active_runs`.

use std::collections::VecDeque;
use std::sync::Arc;

use chrono::{DateTime, Timelike, Utc};
use dagmq_core::dag_version::DagVersionRecord;
use dagmq_core::fail_point;
use dagmq_core::messages::{self, Trigger};
use dagmq_core::records::DagRecord;
use dagmq_core::store::CreateRun;
use dagmq_core::{BackendError, Dag, Params, RunKind, RunRecord, RunState, TaskInstance, TimeArg};

use crate::commands::{BackfillOutcome, CommandError, MAX_BACKFILL_POINTS, TriggerOutcome};
use crate::ids::{manual_run_id, message_run_id, scheduled_run_id};

use super::{Engine, Settle};

impl Engine {
    /// The cached bookkeeping of a DAG, created on first sight.
    pub(super) async fn dag_record(&mut self, dag: &Dag) -> Result<DagRecord, BackendError> {
        if let Some(record) = self.dag_records.get(&dag.id) {
            return Ok(record.clone());
        }
        let record = match self.store.dag_record(&dag.id).await? {
            Some(record) => record,
            None => {
                // Whole seconds, so that `@every` points of a DAG without a start fall on them.
                let first_seen = self.now_cache.with_nanosecond(0).unwrap_or(self.now_cache);
                let record = DagRecord { dag_id: dag.id.clone(), paused: dag.paused, first_seen, last_scheduled: None };
                self.store.put_dag_record(&record).await?;
                record
            }
        };
        self.dag_records.insert(dag.id.clone(), record.clone());
        Ok(record)
    }

    /// Creates the run a trigger message asks for. A trigger without a `key` is deduplicated by
    /// the producer's AMQP `message_id` when it set one (the id becomes the run's key); without
    /// either, a redelivery after a crash between creating the run and acknowledging the
    /// message creates a second run.
    pub(super) async fn on_trigger_message(&mut self, payload: &[u8], message_id: Option<&str>) -> Settle {
        let trigger: Trigger = match messages::decode(payload) {
            Ok(trigger) => trigger,
            Err(err) => return Settle::DeadLetter(format!("trigger: {err}")),
        };
        let key = trigger.key.or_else(|| message_id.filter(|id| id.len() <= 200).map(str::to_string));
        match self.trigger(&trigger.dag_id, trigger.params, key, RunKind::Message).await {
            Ok(outcome) => {
                tracing::debug!(dag = %trigger.dag_id, run = %outcome.run_id, created = outcome.created, "trigger from queue");
                Settle::Ack
            }
            Err(CommandError::Backend(err)) => {
                tracing::error!("trigger: {err}");
                Settle::Requeue
            }
            Err(err) => Settle::DeadLetter(format!("trigger: {err}")),
        }
    }

    /// Starts queued runs of every DAG that may have a free slot.
    pub(super) async fn start_dirty(&mut self) -> Result<(), BackendError> {
        let started = self.start_dirty_runs().await;
        self.created.clear();
        started
    }

    /// The work of `start_dirty`.
    async fn start_dirty_runs(&mut self) -> Result<(), BackendError> {
        while let Some(dag_id) = self.dirty.pop_first() {
            let current = self.config.dags.get(&dag_id).cloned();
            loop {
                let running = self.running.get(&dag_id).copied().unwrap_or(0);
                if current.as_ref().is_some_and(|dag| running >= dag.max_active_runs) {
                    break;
                }
                let Some(run_id) = self.queued.get(&dag_id).and_then(VecDeque::front).cloned() else { break };
                if current.is_none() {
                    // A DAG a reload or a restart removed still starts the runs it queued, under
                    // the `max_active_runs` of the version the next one was created with (each
                    // run completes with its own version, in `activate`).
                    let record = match self.created.get(&run_id) {
                        Some((record, _)) => record.clone(),
                        None => match self.store.run(&run_id).await? {
                            Some(record) => record,
                            None => {
                                self.queued.get_mut(&dag_id).and_then(VecDeque::pop_front);
                                continue;
                            }
                        },
                    };
                    let Some(dag) = self.dag_of(&record).await? else { break };
                    if running >= dag.max_active_runs {
                        break;
                    }
                }
                // The run leaves the queue only once it started: a start whose answer was lost
                // (it may have applied) is tried again before any other run of the DAG starts,
                // so that run holds its place under `max_active_runs` meanwhile.
                if let Err(err) = self.start_queued(&run_id).await {
                    self.dirty.insert(dag_id);
                    return Err(err);
                }
                if let Some(queue) = self.queued.get_mut(&dag_id) {
                    queue.pop_front();
                }
            }
        }
        Ok(())
    }

    /// Starts a queued run: it becomes `running` and its view is loaded. A run the store has
    /// `running` already (an earlier start applied, its answer lost) is taken into the view.
    async fn start_queued(&mut self, run_id: &str) -> Result<(), BackendError> {
        let record = match self.created.get(run_id) {
            Some((record, _)) => record.clone(),
            None => match self.store.run(run_id).await? {
                Some(record) => record,
                None => return Ok(()),
            },
        };
        match record.state {
            // A run whose start a rollback of the store lost has tasks `queued` whose messages
            // were consumed by refused claims: they are published again.
            RunState::Queued => {
                let restarting = self.restarting.remove(run_id);
                self.activate(record, restarting).await
            }
            RunState::Running if !self.active.contains_key(run_id) => self.activate(record, true).await,
            _ => Ok(()),
        }
    }

    /// Creates a run in `queued`; it starts when its DAG has a free slot.
    async fn create_run(
        &mut self,
        dag: &Dag,
        kind: RunKind,
        logical_date: DateTime<Utc>,
        params: Params,
        key: Option<String>,
    ) -> Result<TriggerOutcome, BackendError> {
        let run_id = match kind {
            // A backfilled point gets the id its scheduled run has, so a point never gets two.
            RunKind::Scheduled | RunKind::Backfill => scheduled_run_id(&dag.id, logical_date),
            RunKind::Manual => manual_run_id(&dag.id, logical_date),
            RunKind::Message => message_run_id(&dag.id, logical_date),
        };
        let record = RunRecord {
            run_id: run_id.clone(),
            dag_id: dag.id.clone(),
            state: RunState::Queued,
            kind,
            logical_date,
            params,
            key,
            created_at: self.now_cache,
            started_at: None,
            ended_at: None,
            dag_version: Some(dag.version.clone()),
        };
        let tasks: Vec<TaskInstance> = dag
            .tasks()
            .iter()
            .map(|t| TaskInstance::pending(t.id.clone(), t.after.clone(), t.config.queue.clone(), t.config.retries))
            .collect();
        self.store_version(dag).await?;
        fail_point!("scheduler::create_run::before");
        let mut created = self.store.create_run(&record, &tasks).await?;
        if created == CreateRun::MissingVersion {
            // The version expired from the store since this term wrote it (every run of it had
            // ended longer than the retention period ago): write it again.
            self.versions_written.remove(&(dag.id.clone(), dag.version.clone()));
            self.store_version(dag).await?;
            created = self.store.create_run(&record, &tasks).await?;
        }
        fail_point!("scheduler::create_run::after");
        match created {
            CreateRun::Created => {
                tracing::info!(dag = %dag.id, run = %run_id, "run created");
                self.created.insert(run_id.clone(), (record, tasks));
                self.queued.entry(dag.id.clone()).or_default().push_back(run_id.clone());
                self.dirty.insert(dag.id.clone());
                Ok(TriggerOutcome { run_id, created: true })
            }
            CreateRun::Exists(existing) => Ok(TriggerOutcome { run_id: existing, created: false }),
            CreateRun::MissingVersion => Err(BackendError::new(format!(
                "dag {:?}: the store refused run {run_id:?}: it has no version {} of the dag, written just before",
                dag.id, dag.version
            ))),
        }
    }

    /// Writes what scheduling needs of `dag`'s version to the store before the first run of it
    /// is created (once a term), so that any scheduler, after any restart, schedules the run
    /// with this version, also once the DAG file has changed or is gone.
    async fn store_version(&mut self, dag: &Dag) -> Result<(), BackendError> {
        let key = (dag.id.clone(), dag.version.clone());
        if self.versions_written.contains(&key) {
            return Ok(());
        }
        self.store.put_dag_version(&DagVersionRecord::of(dag)).await?;
        fail_point!("scheduler::create_run::after_version");
        self.versions_written.insert(key);
        Ok(())
    }

    /// The params of a run of `dag` triggered (or backfilled) with `given`: checked against the
    /// DAG's schema (types, required, unknown names), normalised, over the defaults, at most
    /// [`dagmq_core::params::MAX_PARAMS_BYTES`] of JSON before and after, without NUL bytes or
    /// two names for one `DAGMQ_PARAM_` variable ([`dagmq_core::params::check_run_params`]).
    fn run_params(&self, dag: &Dag, given: Params) -> Result<Params, CommandError> {
        let bad = |reason: String| CommandError::BadInput(format!("dag {:?}: {reason}", dag.id));
        dagmq_core::params::check_size(&given).map_err(bad)?;
        let resolved = dag.params.resolve(given).map_err(bad)?;
        let mut merged = self.config.default_params.get(&dag.id).cloned().unwrap_or_default();
        merged.extend(resolved);
        dagmq_core::params::check_run_params(&merged).map_err(bad)?;
        Ok(merged)
    }

    /// Why `dag_id`, which is not loaded, cannot be run: its file's refusal when a refused file
    /// is its, else that no such DAG exists.
    pub(super) fn unknown_dag(&self, dag_id: &str) -> CommandError {
        match self.live.refusal_of(dag_id) {
            Some(reason) => {
                CommandError::NotFound(format!("dag {dag_id:?} is not loaded: its file was refused: {reason}"))
            }
            None => CommandError::NotFound(format!("unknown dag {dag_id:?}")),
        }
    }

    /// Creates a run of `dag_id` now (`kind` says who asked: the API or a trigger message).
    pub(super) async fn trigger(
        &mut self,
        dag_id: &str,
        params: Params,
        key: Option<String>,
        kind: RunKind,
    ) -> Result<TriggerOutcome, CommandError> {
        let Some(dag) = self.config.dags.get(dag_id).cloned() else {
            return Err(self.unknown_dag(dag_id));
        };
        if let Some(key) = &key
            && (key.is_empty() || key.len() > 200)
        {
            return Err(CommandError::BadInput("key must be 1 to 200 characters".to_string()));
        }
        let merged = self.run_params(&dag, params)?;
        self.create_run(&dag, kind, self.now_cache, merged, key).await.map_err(|e| CommandError::Backend(e.to_string()))
    }

    /// Creates the runs of a backfill, oldest first; existing points are counted, not touched.
    pub(super) async fn backfill(
        &mut self,
        dag_id: &str,
        from: TimeArg,
        to: TimeArg,
        params: Params,
    ) -> Result<BackfillOutcome, CommandError> {
        let backend = |e: BackendError| CommandError::Backend(e.to_string());
        let Some(dag) = self.config.dags.get(dag_id).cloned() else {
            return Err(self.unknown_dag(dag_id));
        };
        if matches!(dag.schedule, dagmq_core::schedule::Schedule::Manual) {
            return Err(CommandError::BadInput(format!(
                "dag {dag_id:?} has no schedule, so it has no schedule points to backfill; trigger it instead"
            )));
        }
        let resolve = |end: &str, time: TimeArg| {
            time.resolve(dag.timezone).map_err(|e| CommandError::BadInput(format!("backfill {end}: {e}")))
        };
        let (from, to) = (resolve("from", from)?, resolve("to", to)?);
        if from > to {
            return Err(CommandError::BadInput(format!("backfill range is reversed: from {from} is after to {to}")));
        }
        let record = self.dag_record(&dag).await.map_err(backend)?;
        let anchor = dag.start.unwrap_or(record.first_seen);
        let points = dag.schedule.points_between(anchor, from, to, MAX_BACKFILL_POINTS + 1);
        if points.len() > MAX_BACKFILL_POINTS {
            return Err(CommandError::BadInput(format!(
                "backfill from {from} to {to} covers more than {MAX_BACKFILL_POINTS} schedule points of dag \
                 {dag_id:?}; split the range"
            )));
        }
        let merged = self.run_params(&dag, params)?;
        let mut outcome = BackfillOutcome { runs: Vec::with_capacity(points.len()), created: 0, existing: 0 };
        for point in points {
            let created =
                self.create_run(&dag, RunKind::Backfill, point, merged.clone(), None).await.map_err(backend)?;
            fail_point!("scheduler::backfill::after_run");
            if created.created {
                outcome.created += 1;
            } else {
                outcome.existing += 1;
            }
            outcome.runs.push(created.run_id);
        }
        tracing::info!(dag = %dag_id, created = outcome.created, existing = outcome.existing, "backfill from {from} to {to}");
        Ok(outcome)
    }

    /// The run watcher: creates a run for every due schedule point of every unpaused DAG.
    pub(super) async fn watch(&mut self) -> Result<(), BackendError> {
        let now = self.now_cache;
        let mut next: Option<DateTime<Utc>> = None;
        let dags: Vec<Arc<Dag>> = self.config.dags.iter().cloned().collect();
        for dag in dags {
            let mut record = self.dag_record(&dag).await?;
            if record.paused || matches!(dag.schedule, dagmq_core::schedule::Schedule::Manual) {
                continue;
            }
            let start = dag.start.unwrap_or(record.first_seen);
            let batch = self.config.catch_up_batch.max(1);
            let points = dag.schedule.due_points(start, record.last_scheduled, now, dag.catch_up, batch);
            for &point in &points {
                let mut params = self.config.default_params.get(&dag.id).cloned().unwrap_or_default();
                params.extend(dag.params.defaults());
                self.create_run(&dag, RunKind::Scheduled, point, params, None).await?;
                record.last_scheduled = Some(point);
            }
            if !points.is_empty() {
                self.store.put_dag_record(&record).await?;
                self.dag_records.insert(dag.id.clone(), record.clone());
            }
            let candidate = if points.len() == batch { Some(now) } else { dag.next_run_after(start, now) };
            next = match (next, candidate) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        self.watch_at = next;
        Ok(())
    }
}
