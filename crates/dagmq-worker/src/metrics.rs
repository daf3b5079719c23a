//! A worker's metrics, served on its own `--metrics-port`.

use dagmq_core::metrics::Family;

/// Every metric a worker exposes.
pub struct WorkerMetrics {
    /// Tries this worker ran, by outcome (success, up_for_retry, failed, interrupted,
    /// superseded), and tries it claimed but did not start (not_started: stopped first, or
    /// claimed before a silence in which the scheduler may have requeued them).
    pub tries: Family,
    /// Messages this worker set aside to dagmq.dead, by reason.
    pub dead_lettered: Family,
    /// Tries running now.
    pub running: Family,
    /// Duplicate or stale task messages acknowledged without running.
    pub duplicates: Family,
    /// Downstream tries this worker claimed as it recorded their upstream's success (eager
    /// dispatch), without a task message.
    pub eager: Family,
    /// Task messages put back for another worker, unclaimed, because this worker has not
    /// loaded their run's DAG version (yet).
    pub version_not_loaded: Family,
}

impl Default for WorkerMetrics {
    fn default() -> WorkerMetrics {
        WorkerMetrics {
            tries: Family::counter("dagmq_worker_tries_total", "Tries this worker ran, by outcome.", &["state"]),
            dead_lettered: Family::counter(
                "dagmq_worker_dead_lettered_total",
                "Messages this worker set aside to dagmq.dead, by reason.",
                &["reason"],
            ),
            running: Family::gauge("dagmq_worker_running", "Tries running now.", &[]),
            duplicates: Family::counter(
                "dagmq_worker_duplicates_total",
                "Task messages acknowledged without running (duplicate or stale).",
                &[],
            ),
            eager: Family::counter(
                "dagmq_worker_eager_claims_total",
                "Downstream tries claimed as their upstream's success was recorded, without a task message.",
                &[],
            ),
            version_not_loaded: Family::counter(
                "dagmq_worker_version_not_loaded_total",
                "Task messages put back unclaimed: this worker has not loaded their run's DAG version (yet).",
                &[],
            ),
        }
    }
}

impl WorkerMetrics {
    /// The text format of every family.
    pub fn render(&self) -> String {
        dagmq_core::metrics::render([
            &self.tries,
            &self.dead_lettered,
            &self.running,
            &self.duplicates,
            &self.eager,
            &self.version_not_loaded,
        ])
    }
}
