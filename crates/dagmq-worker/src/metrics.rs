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
    /// Work waiting: for each try started from a task message, the time from when both a slot
    /// of this worker was free and the try was queued to when the try started (the claim and,
    /// when no message is at hand, the broker's delivery). Eager tries, which start in the slot
    /// of their upstream without a message, are not counted.
    pub work_waiting: Family,
}

/// Bucket bounds of [`WorkerMetrics::work_waiting`], in seconds: fine below a few
/// milliseconds, where a busy worker's figure lies.
pub const WORK_WAITING_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_15, 0.000_2, 0.000_3, 0.000_4, 0.000_5, 0.000_75, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0, 5.0,
];

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
            work_waiting: Family::histogram(
                "dagmq_worker_work_waiting_seconds",
                "Time from a free slot and a queued try to the try's start, for tries started from a task message.",
                &[],
                WORK_WAITING_BUCKETS,
            ),
        }
    }
}

impl WorkerMetrics {
    /// The text format of [`WorkerMetrics::work_waiting`] alone.
    pub fn work_waiting_text(&self) -> String {
        let mut out = String::new();
        self.work_waiting.render(&mut out);
        out
    }

    /// The text format of every family.
    pub fn render(&self) -> String {
        dagmq_core::metrics::render([
            &self.tries,
            &self.dead_lettered,
            &self.running,
            &self.duplicates,
            &self.eager,
            &self.version_not_loaded,
            &self.work_waiting,
        ])
    }
}
