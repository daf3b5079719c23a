//! The `Store` over Redis: each call as Redis commands or one of the Lua scripts (`scripts`); the
//! listings, read through the sorted-set indices, are in `listing`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dagmq_core::dag_version::DagVersionRecord;
use dagmq_core::records::DagRecord;
use dagmq_core::store::{
    ClaimAnswer, Claimant, CreateRun, EagerClaim, Fence, FinishedAndClaimed, FinishedTry, LOG_CUT_MARKER, LeaseTerm,
    MAX_LOG_LINES_PER_TRY, NextClaim, RunFilter, Store, TaskChange,
};
use dagmq_core::{BackendError, RunRecord, RunState, TaskInstance, TaskState, WorkerInfo};
use redis::AsyncCommands;

use crate::{RedisStore, decode, encode, lease_value, redis_error};

/// Task transitions per script call in [`RedisStore::transition_tasks`].
const TRANSITION_BATCH: usize = 500;

/// Task instances from a tasks hash, with progress of running tries merged in.
fn tasks_from_hash(fields: Vec<(String, String)>) -> Result<Vec<TaskInstance>, BackendError> {
    let mut tasks = Vec::new();
    let mut progress = std::collections::HashMap::new();
    for (field, value) in fields {
        match field.strip_suffix("#progress") {
            Some(task_id) => {
                if let Some((try_text, fraction)) = value.split_once(':')
                    && let (Ok(try_number), Ok(fraction)) = (try_text.parse::<u32>(), fraction.parse::<f64>())
                {
                    progress.insert(task_id.to_string(), (try_number, fraction));
                }
            }
            None => tasks.push(decode::<TaskInstance>(&value)?),
        }
    }
    for task in &mut tasks {
        if task.state == TaskState::Running
            && let Some((try_number, fraction)) = progress.get(&task.task_id)
            && *try_number == task.try_number
        {
            task.progress = Some(*fraction);
        }
    }
    Ok(tasks)
}

#[async_trait]
impl Store for RedisStore {
    async fn dag_record(&self, dag_id: &str) -> Result<Option<DagRecord>, BackendError> {
        let mut conn = self.conn().await?;
        let value: Option<String> = conn.get(format!("{}:dag:{dag_id}", self.prefix)).await.map_err(redis_error)?;
        value.map(|v| decode(&v)).transpose()
    }

    async fn put_dag_record(&self, record: &DagRecord) -> Result<(), BackendError> {
        let mut conn = self.write_conn().await?;
        let _: i32 = self
            .scripts
            .put_fenced
            .arg(self.fence_arg())
            .arg(encode(record)?)
            .key(format!("{}:dag:{}", self.prefix, record.dag_id))
            .key(self.lease_key())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.write_error("dag record", e))?;
        Ok(())
    }

    async fn put_dag_version(&self, version: &DagVersionRecord) -> Result<(), BackendError> {
        let mut conn = self.write_conn().await?;
        let _: i32 = self
            .scripts
            .put_dag_version
            .arg(self.fence_arg())
            .arg(encode(version)?)
            .arg(self.retention_secs())
            .key(self.dag_version_key(&version.dag_id, &version.version))
            .key(self.lease_key())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.write_error("dag version", e))?;
        Ok(())
    }

    async fn dag_version(&self, dag_id: &str, version: &str) -> Result<Option<DagVersionRecord>, BackendError> {
        let mut conn = self.conn().await?;
        let value: Option<String> =
            conn.hget(self.dag_version_key(dag_id, version), "dag").await.map_err(redis_error)?;
        value.map(|v| decode(&v)).transpose()
    }

    async fn create_run(&self, run: &RunRecord, tasks: &[TaskInstance]) -> Result<CreateRun, BackendError> {
        let mut conn = self.write_conn().await?;
        let key_name = match &run.key {
            Some(key) => self.idempotency_key(&run.dag_id, key),
            None => self.idempotency_key(&run.dag_id, "-"),
        };
        let mut invocation = self.scripts.create_run.arg(self.fence_arg());
        invocation
            .key(self.meta_key(&run.run_id))
            .key(self.tasks_key(&run.run_id))
            .key(self.runs_key())
            .key(self.dag_runs_key(&run.dag_id))
            .key(self.unfinished_key())
            .key(key_name)
            .key(self.run_version_key(run))
            .key(self.lease_key())
            .arg(encode(run)?)
            .arg(&run.run_id)
            .arg(run.created_at.timestamp_millis())
            .arg(if run.key.is_some() { 1 } else { 0 })
            .arg(self.retention_secs())
            .arg(format!("{}:run:{{", self.prefix))
            .arg("}:meta")
            .arg(if run.dag_version.is_some() { 1 } else { 0 });
        for task in tasks {
            invocation.arg(&task.task_id).arg(encode(task)?);
        }
        let answer: String =
            invocation.invoke_async(&mut conn).await.map_err(|e| self.write_error("run creation", e))?;
        Ok(match answer.as_str() {
            "+" => CreateRun::Created,
            "!" => CreateRun::MissingVersion,
            "=" => CreateRun::Exists(run.run_id.clone()),
            existing => CreateRun::Exists(existing.to_string()),
        })
    }

    async fn run(&self, run_id: &str) -> Result<Option<RunRecord>, BackendError> {
        let mut conn = self.conn().await?;
        let value: Option<String> = conn.get(self.meta_key(run_id)).await.map_err(redis_error)?;
        value.map(|v| decode(&v)).transpose()
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
        let mut conn = self.write_conn().await?;
        let horizon = match self.retention {
            Some(retention) => run.created_at.timestamp_millis() - retention.as_millis() as i64,
            None => -1,
        };
        let mut invocation = self.scripts.transition_run.arg(self.fence_arg());
        invocation
            .key(self.meta_key(&run.run_id))
            .key(self.tasks_key(&run.run_id))
            .key(self.logs_key(&run.run_id))
            .key(self.unfinished_key())
            .key(self.runs_key())
            .key(self.dag_runs_key(&run.dag_id))
            .key(self.run_version_key(run))
            .key(self.final_runs_key(RunState::Success))
            .key(self.final_runs_key(RunState::Failed))
            .key(self.final_runs_key(RunState::Cancelled))
            .key(self.lease_key())
            .arg(expected.as_str())
            .arg(encode(run)?)
            .arg(self.retention_secs())
            .arg(&run.run_id)
            .arg(run.created_at.timestamp_millis())
            .arg(horizon.max(-1));
        for change in changes {
            invocation
                .arg(&change.task.task_id)
                .arg(change.expected_state.as_str())
                .arg(change.expected_try)
                .arg(encode(&change.task)?);
        }
        let applied: i32 =
            invocation.invoke_async(&mut conn).await.map_err(|e| self.write_error("run transition", e))?;
        Ok(applied == 1)
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, BackendError> {
        self.list(filter).await
    }

    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>, BackendError> {
        let ids: Vec<String> = {
            let mut conn = self.conn().await?;
            conn.zrange(self.unfinished_key(), 0, -1).await.map_err(redis_error)?
        };
        let records = self.records(&ids).await?;
        Ok(records.into_iter().filter(|r| !r.state.is_final()).collect())
    }

    async fn tasks(&self, run_id: &str) -> Result<Vec<TaskInstance>, BackendError> {
        let mut conn = self.conn().await?;
        let fields: Vec<(String, String)> = conn.hgetall(self.tasks_key(run_id)).await.map_err(redis_error)?;
        tasks_from_hash(fields)
    }

    async fn task(&self, run_id: &str, task_id: &str) -> Result<Option<TaskInstance>, BackendError> {
        Ok(self.tasks_by_id(run_id, &[task_id]).await?.pop().flatten())
    }

    async fn transition_task(
        &self,
        run_id: &str,
        expected_state: TaskState,
        expected_try: u32,
        task: &TaskInstance,
    ) -> Result<bool, BackendError> {
        let mut conn = self.write_conn().await?;
        let applied: i32 = self
            .scripts
            .transition_task
            .arg(self.fence_arg())
            .key(self.tasks_key(run_id))
            .key(self.lease_key())
            .arg(&task.task_id)
            .arg(expected_state.as_str())
            .arg(expected_try)
            .arg(encode(task)?)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.write_error("task transition", e))?;
        Ok(applied == 1)
    }

    async fn claim_try(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        claimant: &Claimant,
        read: &[&str],
    ) -> Result<ClaimAnswer, BackendError> {
        let mut conn = self.write_conn().await?;
        let mut invocation = self.scripts.claim_try.key(self.tasks_key(run_id));
        invocation.key(self.meta_key(run_id));
        claim_args(&mut invocation, task_id, try_number, claimant, read)?;
        let answer: Vec<Option<String>> =
            invocation.invoke_async(&mut conn).await.map_err(|e| self.write_error("claiming a try", e))?;
        self.claim_answer(run_id, task_id, claimant, read, &answer).await
    }

    async fn finish_and_claim(
        &self,
        run_id: &str,
        done: &TaskInstance,
        next: &NextClaim<'_>,
    ) -> Result<FinishedAndClaimed, BackendError> {
        let mut conn = self.write_conn().await?;
        let mut invocation = self.scripts.finish_and_claim.key(self.tasks_key(run_id));
        invocation.key(self.meta_key(run_id)).arg(&done.task_id).arg(done.try_number).arg(encode(done)?);
        claim_args(&mut invocation, next.task_id, next.try_number, next.claimant, next.read)?;
        let answer: Vec<Option<String>> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.write_error("finishing a try and claiming the next", e))?;
        let applied = answer.first().cloned().flatten().as_deref() == Some("1");
        let next =
            self.claim_answer(run_id, next.task_id, next.claimant, next.read, answer.get(1..).unwrap_or(&[])).await?;
        Ok(FinishedAndClaimed { applied, next })
    }

    async fn finish_try(
        &self,
        run_id: &str,
        done: &TaskInstance,
        candidates: &[EagerClaim],
    ) -> Result<FinishedTry, BackendError> {
        let mut conn = self.write_conn().await?;
        let mut invocation = self.scripts.finish_try.key(self.tasks_key(run_id));
        invocation.key(self.meta_key(run_id)).arg(&done.task_id).arg(done.try_number).arg(encode(done)?);
        // Whether the outcome returned follow-ups, so the script need not search its JSON.
        invocation.arg(if done.follow_ups.is_empty() { "0" } else { "1" });
        for candidate in candidates {
            invocation
                .arg(&candidate.expected.task_id)
                .arg(encode(&candidate.expected)?)
                .arg(encode(&candidate.claimed)?)
                .arg(candidate.expected.after.len());
            for upstream in candidate.expected.after.iter() {
                invocation.arg(upstream);
            }
            invocation.arg(candidate.branches.len());
            for branch in &candidate.branches {
                invocation.arg(branch);
            }
            invocation.arg(candidate.then.len());
            for id in &candidate.then {
                invocation.arg(id);
            }
        }
        let answer: Vec<Option<String>> =
            invocation.invoke_async(&mut conn).await.map_err(|e| self.write_error("finishing a try", e))?;
        let mut answer = answer.into_iter();
        let number = |value: Option<Option<String>>| value.flatten().and_then(|v| v.parse::<usize>().ok());
        let mut finished = FinishedTry { applied: number(answer.next()) == Some(1), claimed: Vec::new() };
        while let Some(n) = number(answer.next()) {
            let reads = number(answer.next()).unwrap_or(0);
            let mut then = Vec::with_capacity(reads);
            for json in answer.by_ref().take(reads) {
                then.push(json.as_deref().map(decode::<TaskInstance>).transpose()?);
            }
            finished.claimed.push((n.saturating_sub(1), then));
        }
        Ok(finished)
    }

    async fn tasks_by_id(&self, run_id: &str, task_ids: &[&str]) -> Result<Vec<Option<TaskInstance>>, BackendError> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let mut command = redis::cmd("HMGET");
        command.arg(self.tasks_key(run_id));
        for task_id in task_ids {
            command.arg(*task_id).arg(format!("{task_id}#progress"));
        }
        let values: Vec<Option<String>> = command.query_async(&mut conn).await.map_err(redis_error)?;
        let mut found = Vec::with_capacity(task_ids.len());
        for (task_id, pair) in task_ids.iter().zip(values.chunks(2)) {
            let [Some(task), progress] = pair else {
                found.push(None);
                continue;
            };
            let mut fields = vec![(task_id.to_string(), task.clone())];
            if let Some(progress) = progress {
                fields.push((format!("{task_id}#progress"), progress.clone()));
            }
            found.push(tasks_from_hash(fields)?.pop());
        }
        Ok(found)
    }

    async fn transition_tasks(&self, run_id: &str, changes: &[TaskChange]) -> Result<Vec<bool>, BackendError> {
        let mut conn = self.write_conn().await?;
        let mut applied = Vec::with_capacity(changes.len());
        // Bounded batches keep any one script short: Redis serves nobody else while it runs.
        for batch in changes.chunks(TRANSITION_BATCH) {
            let mut invocation = self.scripts.transition_tasks.arg(self.fence_arg());
            invocation.key(self.tasks_key(run_id)).key(self.lease_key());
            for change in batch {
                invocation
                    .arg(&change.task.task_id)
                    .arg(change.expected_state.as_str())
                    .arg(change.expected_try)
                    .arg(encode(&change.task)?);
            }
            let answers: Vec<i32> =
                invocation.invoke_async(&mut conn).await.map_err(|e| self.write_error("task transitions", e))?;
            if answers.len() != batch.len() {
                return Err(BackendError::new(format!(
                    "redis: {} answers to {} task transitions",
                    answers.len(),
                    batch.len()
                )));
            }
            applied.extend(answers.into_iter().map(|a| a == 1));
        }
        Ok(applied)
    }

    async fn add_tasks(
        &self,
        run_id: &str,
        new_tasks: &[TaskInstance],
        new_upstreams: &[(String, Vec<String>)],
    ) -> Result<(), BackendError> {
        let mut rewired = Vec::new();
        for (task_id, after) in new_upstreams {
            if let Some(mut task) = self.task(run_id, task_id).await? {
                let (state, try_number) = (task.state, task.try_number);
                task.after = after.as_slice().into();
                task.progress = None;
                rewired.push((state, try_number, task));
            }
        }
        let mut conn = self.write_conn().await?;
        let mut invocation = self.scripts.add_tasks.arg(self.fence_arg());
        invocation.key(self.tasks_key(run_id)).key(self.lease_key()).arg(new_tasks.len());
        for task in new_tasks {
            invocation.arg(&task.task_id).arg(encode(task)?);
        }
        for (state, try_number, task) in &rewired {
            invocation.arg(&task.task_id).arg(state.as_str()).arg(*try_number).arg(encode(task)?);
        }
        let _: i32 = invocation.invoke_async(&mut conn).await.map_err(|e| self.write_error("follow-ups", e))?;
        Ok(())
    }

    async fn set_progress(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        progress: f64,
    ) -> Result<(), BackendError> {
        let mut conn = self.conn().await?;
        let _: i32 = self
            .scripts
            .set_progress
            .key(self.tasks_key(run_id))
            .arg(task_id)
            .arg(try_number)
            .arg(progress)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn append_log(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        lines: &[String],
    ) -> Result<(), BackendError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let mut invocation = self.scripts.append_log.key(self.log_key(run_id, task_id, try_number));
        invocation.key(self.logs_key(run_id)).arg(MAX_LOG_LINES_PER_TRY).arg(LOG_CUT_MARKER);
        for line in lines {
            invocation.arg(line);
        }
        let _: i64 = invocation.invoke_async(&mut conn).await.map_err(redis_error)?;
        Ok(())
    }

    async fn read_log(
        &self,
        run_id: &str,
        task_id: &str,
        try_number: u32,
        from: usize,
    ) -> Result<Vec<String>, BackendError> {
        let mut conn = self.conn().await?;
        conn.lrange(self.log_key(run_id, task_id, try_number), from as isize, -1).await.map_err(redis_error)
    }

    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<(), BackendError> {
        // Stamped with the server's clock too: liveness is judged by one clock, whatever the
        // workers' clocks say.
        let mut conn = self.liveness_conn().await?;
        let _: i32 = self
            .scripts
            .heartbeat
            .key(self.workers_key())
            .key(self.heartbeats_key())
            .arg(&worker.name)
            .arg(encode(worker)?)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn remove_worker(&self, name: &str) -> Result<(), BackendError> {
        let mut conn = self.write_conn().await?;
        let _: i32 = self
            .scripts
            .hdel_fenced
            .arg(self.fence_arg())
            .arg(name)
            .key(self.workers_key())
            .key(self.lease_key())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.write_error("worker removal", e))?;
        let _: () = conn.hdel(self.heartbeats_key(), name).await.map_err(redis_error)?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, BackendError> {
        let mut conn = self.conn().await?;
        let (entries, seen): (Vec<(String, String)>, std::collections::HashMap<String, i64>) = redis::pipe()
            .hgetall(self.workers_key())
            .hgetall(self.heartbeats_key())
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut workers = entries.iter().map(|(_, v)| decode::<WorkerInfo>(v)).collect::<Result<Vec<_>, _>>()?;
        for worker in &mut workers {
            // The server's time of the latest heartbeat, not the worker's.
            if let Some(at) = seen.get(&worker.name).and_then(|ms| DateTime::<Utc>::from_timestamp_millis(*ms)) {
                worker.last_heartbeat = at;
            }
        }
        workers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(workers)
    }

    async fn acquire_lease(
        &self,
        holder: &str,
        _now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<Option<LeaseTerm>, BackendError> {
        // Redis's own clock times the lease, so schedulers' clocks need not agree.
        let mut conn = self.liveness_conn().await?;
        let term: u64 = self
            .scripts
            .acquire_lease
            .key(self.lease_key())
            .key(self.lease_terms_key())
            .arg(holder)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok((term > 0).then(|| LeaseTerm { holder: holder.to_string(), term }))
    }

    async fn renew_lease(&self, lease: &LeaseTerm, _now: DateTime<Utc>, ttl: Duration) -> Result<bool, BackendError> {
        let mut conn = self.liveness_conn().await?;
        let renewed: i32 = self
            .scripts
            .renew_lease
            .key(self.lease_key())
            .arg(lease_value(lease))
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(renewed == 1)
    }

    async fn release_lease(&self, lease: &LeaseTerm) -> Result<(), BackendError> {
        let mut conn = self.liveness_conn().await?;
        let _: i32 = self
            .scripts
            .release_lease
            .key(self.lease_key())
            .arg(lease_value(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    fn fenced(&self, fence: Fence) -> Option<Arc<dyn Store>> {
        let fence_arg = lease_value(&fence.lease);
        Some(Arc::new(RedisStore { fence: Some(fence), fence_arg, ..self.clone() }))
    }

    async fn now(&self) -> Result<Option<DateTime<Utc>>, BackendError> {
        let mut conn = self.liveness_conn().await?;
        let (seconds, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.map_err(redis_error)?;
        Ok(DateTime::<Utc>::from_timestamp_micros(seconds * 1_000_000 + micros))
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(redis_error)?;
        Ok(())
    }
}

/// The arguments of a claim (`scripts::CLAIM_TRY`, and the tail of `scripts::FINISH_AND_CLAIM`):
/// the task, its try, the claim's fields as JSON members, then the tasks to read.
fn claim_args(
    invocation: &mut redis::ScriptInvocation<'_>,
    task_id: &str,
    try_number: u32,
    claimant: &Claimant,
    read: &[&str],
) -> Result<(), BackendError> {
    let fields = format!(
        r#","started_at":{},"worker":{},"worker_instance":{}"#,
        encode(&claimant.at)?,
        encode(&claimant.worker)?,
        encode(&claimant.instance)?
    );
    invocation.arg(task_id).arg(try_number).arg(fields);
    for id in read {
        invocation.arg(*id);
    }
    Ok(())
}

impl RedisStore {
    /// A claim's answer from `scripts::CLAIM_TRY`'s reply (the code, the task and its progress,
    /// then each task read with its progress); a claimable instance the script does not rewrite
    /// is claimed here with a compare-and-set.
    async fn claim_answer(
        &self,
        run_id: &str,
        task_id: &str,
        claimant: &Claimant,
        read: &[&str],
        answer: &[Option<String>],
    ) -> Result<ClaimAnswer, BackendError> {
        let instance = |id: &str, json: &Option<String>, progress: &Option<String>| -> Result<_, BackendError> {
            let Some(json) = json else { return Ok(None) };
            let mut fields = vec![(id.to_string(), json.clone())];
            if let Some(progress) = progress {
                fields.push((format!("{id}#progress"), progress.clone()));
            }
            Ok(tasks_from_hash(fields)?.pop())
        };
        let code = answer.first().cloned().flatten().unwrap_or_default();
        let task = instance(task_id, answer.get(1).unwrap_or(&None), answer.get(2).unwrap_or(&None))?;
        let mut reads = Vec::with_capacity(read.len());
        for (n, id) in read.iter().enumerate() {
            let at = 3 + 2 * n;
            reads.push(instance(id, answer.get(at).unwrap_or(&None), answer.get(at + 1).unwrap_or(&None))?);
        }
        match (code.as_str(), task) {
            ("1", task) => Ok(ClaimAnswer { task, claimed: true, read: reads }),
            // An instance the script does not rewrite: claim it with a compare-and-set. The run
            // was running when the script read it; this rare shape (none of this version's
            // writes make it) keeps the window between that read and the compare-and-set.
            ("3", Some(current)) => dagmq_core::store::claim_queued(self, run_id, current, claimant, reads).await,
            (_, task) => Ok(ClaimAnswer { task, claimed: false, read: reads }),
        }
    }
}
