//! Key names, as laid out in the crate documentation.

use crate::RedisStore;

impl RedisStore {
    pub(crate) fn meta_key(&self, run_id: &str) -> String {
        format!("{}:run:{{{run_id}}}:meta", self.prefix)
    }

    pub(crate) fn tasks_key(&self, run_id: &str) -> String {
        format!("{}:run:{{{run_id}}}:tasks", self.prefix)
    }

    pub(crate) fn logs_key(&self, run_id: &str) -> String {
        format!("{}:run:{{{run_id}}}:logs", self.prefix)
    }

    pub(crate) fn log_key(&self, run_id: &str, task_id: &str, try_number: u32) -> String {
        format!("{}:run:{{{run_id}}}:log:{task_id}:{try_number}", self.prefix)
    }

    pub(crate) fn runs_key(&self) -> String {
        format!("{}:runs", self.prefix)
    }

    pub(crate) fn dag_runs_key(&self, dag_id: &str) -> String {
        format!("{}:runs:dag:{dag_id}", self.prefix)
    }

    pub(crate) fn unfinished_key(&self) -> String {
        format!("{}:runs:unfinished", self.prefix)
    }

    /// The index of finished runs in `state` (`success`, `failed` or `cancelled`).
    pub(crate) fn final_runs_key(&self, state: dagmq_core::RunState) -> String {
        format!("{}:runs:state:{}", self.prefix, state.as_str())
    }

    /// Set once every finished run is in the index of its state (`list_runs` builds the
    /// indexes of a store written before they existed).
    pub(crate) fn final_runs_indexed_key(&self) -> String {
        format!("{}:runs:state:indexed", self.prefix)
    }

    pub(crate) fn idempotency_key(&self, dag_id: &str, key: &str) -> String {
        format!("{}:key:{dag_id}:{key}", self.prefix)
    }

    pub(crate) fn dag_version_key(&self, dag_id: &str, version: &str) -> String {
        format!("{}:dagversion:{dag_id}:{version}", self.prefix)
    }

    /// The version hash a run's transitions keep up to date, or an unused name for a run that
    /// names no version (the scripts leave it alone).
    pub(crate) fn run_version_key(&self, run: &dagmq_core::RunRecord) -> String {
        match &run.dag_version {
            Some(version) => self.dag_version_key(&run.dag_id, version),
            None => format!("{}:dagversion:-", self.prefix),
        }
    }

    pub(crate) fn lease_key(&self) -> String {
        format!("{}:scheduler:lease", self.prefix)
    }

    pub(crate) fn lease_terms_key(&self) -> String {
        format!("{}:scheduler:terms", self.prefix)
    }

    pub(crate) fn workers_key(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    pub(crate) fn heartbeats_key(&self) -> String {
        format!("{}:workers:seen", self.prefix)
    }
}
