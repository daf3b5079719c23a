//! The run listings over the sorted-set indices: which index a listing walks, reading run
//! records a page at a time, pruning entries of expired runs, and the one-time build of the
//! indexes of finished runs by state for a store written before they existed.

use dagmq_core::store::RunFilter;
use dagmq_core::{BackendError, RunRecord, RunState};
use redis::AsyncCommands;

use crate::{RedisStore, decode, redis_error};

impl RedisStore {
    /// Runs matching `filter`, newest first (`Store::list_runs`).
    pub(crate) async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, BackendError> {
        // Every run that has not finished is in the unfinished index: a listing of queued,
        // running or suspended runs walks that, not the whole history of finished runs.
        // A finished state has an index of its own, so failed runs among a history of
        // successes are found without reading the successes. A finishing run trims the runs
        // index and the state indexes to its horizon but only its own DAG's index, which can
        // keep a run the others have let go: one DAG's runs are those of the DAG's index also in
        // the runs index, and in a finished state those in both the DAG's index and the state's
        // (the smaller is walked, each of its runs checked in the other). So a run is in every
        // listing it matches or in none, whichever index is walked.
        let (index, also_in) = match (&filter.dag_id, filter.state) {
            (_, Some(state)) if !state.is_final() => (self.unfinished_key(), None),
            (None, Some(state)) => {
                self.index_finished_runs().await?;
                (self.final_runs_key(state), None)
            }
            (Some(dag_id), Some(state)) => {
                self.index_finished_runs().await?;
                let (walked, other) = self.smaller_first(self.final_runs_key(state), self.dag_runs_key(dag_id)).await?;
                (walked, Some(other))
            }
            (Some(dag_id), None) => (self.dag_runs_key(dag_id), Some(self.runs_key())),
            (None, None) => (self.runs_key(), None),
        };
        let mut found = Vec::new();
        // Pages as large as what is still wanted (the runs to skip for the offset, then the
        // rest of the page), at most 500: a deep offset costs reads of every run before it (a
        // listing with a filter counts its offset among the runs that match), in few calls.
        // Without a filter every run of the index matches: the page starts at the offset. With
        // one (a state, a second index), the first `offset` matches are skipped as they are read.
        let (mut start, mut skip) = if filter.state.is_none() && also_in.is_none() {
            (isize::try_from(filter.offset).unwrap_or(isize::MAX), 0)
        } else {
            (0, filter.offset)
        };
        while found.len() < filter.limit {
            let ids: Vec<String> = {
                let mut conn = self.conn().await?;
                let page = (skip + filter.limit - found.len()).clamp(1, 500);
                conn.zrevrange(&index, start, start + page as isize - 1).await.map_err(redis_error)?
            };
            if ids.is_empty() {
                break;
            }
            start += ids.len() as isize;
            let records = self.records(&ids).await?;
            let in_both = match &also_in {
                Some(other) => Some(self.members_of(other, &ids).await?),
                None => None,
            };
            if records.len() < ids.len() {
                let present: std::collections::HashSet<&str> = records.iter().map(|r| r.run_id.as_str()).collect();
                let gone: Vec<String> = ids.iter().filter(|id| !present.contains(id.as_str())).cloned().collect();
                start -= gone.len() as isize;
                self.prune(&index, &gone).await?;
            }
            for record in records {
                if filter.state.is_none_or(|s| s == record.state)
                    && filter.dag_id.as_ref().is_none_or(|d| *d == record.dag_id)
                    && in_both.as_ref().is_none_or(|ids| ids.contains(record.run_id.as_str()))
                    && found.len() < filter.limit
                {
                    if skip > 0 {
                        skip -= 1;
                    } else {
                        found.push(record);
                    }
                }
            }
        }
        Ok(found)
    }

    /// Reads run records for ids, skipping ones that expired.
    pub(crate) async fn records(&self, ids: &[String]) -> Result<Vec<RunRecord>, BackendError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.get(self.meta_key(id));
        }
        let values: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
        values.into_iter().flatten().map(|v| decode(&v)).collect()
    }

    /// Two indexes, the one with fewer entries first: a listing that filters on both walks
    /// that one and checks each run it reads in the other.
    async fn smaller_first(&self, a: String, b: String) -> Result<(String, String), BackendError> {
        let mut conn = self.conn().await?;
        let (len_a, len_b): (u64, u64) =
            redis::pipe().zcard(&a).zcard(&b).query_async(&mut conn).await.map_err(redis_error)?;
        Ok(if len_a <= len_b { (a, b) } else { (b, a) })
    }

    /// Makes sure every finished run is in the index of its state. Transitions keep those
    /// indexes, but a store written by a dagmq before they existed has finished runs in none:
    /// the first listing of a finished state walks the runs index once, adds each finished run
    /// to its state's index, then sets the `indexed` key; later listings find the key (one
    /// `EXISTS`) and walk nothing. The walk goes by score and, among runs of one score (created
    /// in the same instant), by id, which is how Redis orders them: it resumes after the last
    /// run it read, never at a count, so entries that leave the index meanwhile (a horizon
    /// trim, expired runs pruned by a listing) cannot make it skip others. Walks at the same
    /// time (two API calls) add the same entries; an entry made stale by a transition meanwhile
    /// is harmless, as listings check each record's state. A run finished by a
    /// scheduler of an earlier version after the walk is in no index: during a rolling upgrade,
    /// delete `P:runs:state:indexed` once the last old scheduler is gone, and the next listing
    /// walks again.
    async fn index_finished_runs(&self) -> Result<(), BackendError> {
        let marker = self.final_runs_indexed_key();
        let indexed: bool = {
            let mut conn = self.conn().await?;
            conn.exists(&marker).await.map_err(redis_error)?
        };
        if indexed {
            return Ok(());
        }
        // The last run read: its score (as Redis reads it back) and its id.
        let mut after: Option<(String, String)> = None;
        loop {
            let page: Vec<(String, f64)> = {
                let mut conn = self.conn().await?;
                // The rest of the runs of the last score read, else the next page above it.
                let rest: Vec<(String, f64)> = match &after {
                    Some((score, id)) => {
                        let same: Vec<(String, f64)> =
                            conn.zrangebyscore_withscores(self.runs_key(), score, score).await.map_err(redis_error)?;
                        same.into_iter().filter(|(other, _)| other.as_bytes() > id.as_bytes()).collect()
                    }
                    None => Vec::new(),
                };
                if rest.is_empty() {
                    let above = after.as_ref().map_or_else(|| "-inf".to_string(), |(score, _)| format!("({score}"));
                    conn.zrangebyscore_limit_withscores(self.runs_key(), above, "+inf", 0, 500)
                        .await
                        .map_err(redis_error)?
                } else {
                    rest
                }
            };
            let Some((last_id, last_score)) = page.last().cloned() else { break };
            for chunk in page.chunks(500) {
                self.index_finished_page(chunk).await?;
            }
            dagmq_core::fail_point!("redis::index_finished_runs::after_page");
            after = Some((format!("{last_score}"), last_id));
        }
        let mut conn = self.write_conn().await?;
        let () = conn.set(&marker, 1).await.map_err(redis_error)?;
        Ok(())
    }

    /// Adds the finished runs among `page` (ids with their scores in the runs index) to the
    /// indexes of their states, each only while it is still in the runs index (`INDEX_FINISHED`:
    /// a run trimmed meanwhile by a finishing run's horizon stays out of every listing).
    async fn index_finished_page(&self, page: &[(String, f64)]) -> Result<(), BackendError> {
        let ids: Vec<String> = page.iter().map(|(id, _)| id.clone()).collect();
        let finished: Vec<RunRecord> = self.records(&ids).await?.into_iter().filter(|r| r.state.is_final()).collect();
        if finished.is_empty() {
            return Ok(());
        }
        dagmq_core::fail_point!("redis::index_finished_runs::before_add");
        let mut invocation = self.scripts.index_finished.key(self.runs_key());
        invocation
            .key(self.final_runs_key(RunState::Success))
            .key(self.final_runs_key(RunState::Failed))
            .key(self.final_runs_key(RunState::Cancelled));
        for record in &finished {
            invocation.arg(&record.run_id).arg(record.state.as_str());
        }
        let mut conn = self.conn().await?;
        let _: i64 = invocation.invoke_async(&mut conn).await.map_err(redis_error)?;
        Ok(())
    }

    /// Which of `ids` are in the sorted set `index`.
    async fn members_of(&self, index: &str, ids: &[String]) -> Result<std::collections::HashSet<String>, BackendError> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.zscore(index, id);
        }
        let mut conn = self.conn().await?;
        let scores: Vec<Option<f64>> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
        Ok(ids.iter().zip(scores).filter(|(_, score)| score.is_some()).map(|(id, _)| id.clone()).collect())
    }

    /// Removes index entries of runs that no longer exist (expired by retention).
    async fn prune(&self, index: &str, ids: &[String]) -> Result<(), BackendError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let _: () = conn.zrem(index, ids).await.map_err(redis_error)?;
        Ok(())
    }
}
