//! The scheduler's metrics, served at `/metrics`. Counters are kept by the event loop, and so are
//! the task counts of its runs (`ViewCounts`); gauges of queues and workers are read from the
//! queue and store at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use dagmq_core::TaskState;
use dagmq_core::metrics::Family;

/// Buckets of task durations, in seconds.
const DURATION_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// Every metric the scheduler exposes.
pub struct SchedulerMetrics {
    /// Runs by final state.
    pub runs_finished: Family,
    /// Tasks by final state (success, failed, upstream_failed, cancelled) and retries.
    pub tasks_finished: Family,
    /// Durations of finished tries, per DAG.
    pub task_duration: Family,
    /// Messages dead-lettered by the scheduler, by queue and reason.
    pub dead_lettered: Family,
    /// How late the event loop woke for its last timer.
    pub loop_lag: Family,
    /// Waiting messages per queue (at scrape).
    pub queue_depth: Family,
    /// Tasks queued or running in unfinished runs (at scrape).
    pub tasks_in_flight: Family,
    /// Live workers (at scrape).
    pub workers: Family,
    /// Queued tries whose message was published again by the reconciliation.
    pub republished: Family,
    /// Tries requeued because their worker is lost, stopped or not running them.
    pub requeued: Family,
    /// Notifications by outcome (sent, failed).
    pub notifications: Family,
    /// Tasks of the runs the scheduler is running, by state, kept as its view changes: a
    /// scrape reads these instead of every task of every unfinished run.
    pub view: Arc<ViewCounts>,
    /// Tasks that ended per minute over the last hour, for the stats page.
    pub throughput: Throughput,
}

/// Tasks that reached a final state, per minute, over the last hour (kept in memory: a new
/// scheduler starts from zero).
#[derive(Debug, Default)]
pub struct Throughput {
    minutes: std::sync::Mutex<std::collections::VecDeque<(i64, u64)>>,
}

impl Throughput {
    /// Counts one task that ended at `at`.
    pub fn note(&self, at: DateTime<Utc>) {
        let minute = at.timestamp().div_euclid(60);
        let mut minutes = self.minutes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match minutes.back_mut() {
            Some((last, count)) if *last == minute => *count += 1,
            _ => minutes.push_back((minute, 1)),
        }
        while minutes.front().is_some_and(|(first, _)| *first <= minute - 60) {
            minutes.pop_front();
        }
    }

    /// The 60 minutes up to `now`, oldest first, each with its count (0 when none ended).
    pub fn last_hour(&self, now: DateTime<Utc>) -> Vec<(DateTime<Utc>, u64)> {
        let current = now.timestamp().div_euclid(60);
        let minutes = self.minutes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        (current - 59..=current)
            .map(|minute| {
                let count = minutes.iter().find(|(m, _)| *m == minute).map_or(0, |(_, c)| *c);
                (DateTime::from_timestamp(minute * 60, 0).unwrap_or_default(), count)
            })
            .collect()
    }
}

/// Task counts by state over the scheduler's in-memory runs. Each run adds its tasks when it
/// enters the view, moves one count per state change, and takes its own counts back out when
/// it leaves (finished, cancelled, or the scheduler stops leading).
#[derive(Debug, Default)]
pub struct ViewCounts {
    /// Indexed by the state's position in [`TaskState::ALL`].
    counts: [AtomicI64; TaskState::ALL.len()],
}

impl ViewCounts {
    /// Adds `delta` to `state`'s count.
    pub(crate) fn add(&self, state: TaskState, delta: i64) {
        self.counts[state_index(state)].fetch_add(delta, Ordering::Relaxed);
    }

    /// The count of tasks in `state` (never negative).
    pub fn get(&self, state: TaskState) -> u64 {
        self.counts[state_index(state)].load(Ordering::Relaxed).max(0) as u64
    }
}

/// A state's position in [`TaskState::ALL`].
pub(crate) fn state_index(state: TaskState) -> usize {
    TaskState::ALL.iter().position(|s| *s == state).unwrap_or(0)
}

impl Default for SchedulerMetrics {
    fn default() -> SchedulerMetrics {
        SchedulerMetrics {
            runs_finished: Family::counter(
                "dagmq_runs_finished_total",
                "Runs that finished, by final state.",
                &["dag", "state"],
            ),
            tasks_finished: Family::counter(
                "dagmq_tasks_finished_total",
                "Task tries that ended, by state (success, up_for_retry, failed, upstream_failed, cancelled).",
                &["dag", "state"],
            ),
            task_duration: Family::histogram(
                "dagmq_task_duration_seconds",
                "Duration of finished tries.",
                &["dag"],
                DURATION_BUCKETS,
            ),
            dead_lettered: Family::counter(
                "dagmq_dead_lettered_total",
                "Messages the scheduler set aside to dagmq.dead, by queue and reason.",
                &["queue", "reason"],
            ),
            loop_lag: Family::gauge(
                "dagmq_scheduler_loop_lag_seconds",
                "How late the event loop woke for its last timer.",
                &[],
            ),
            queue_depth: Family::gauge("dagmq_queue_depth", "Messages waiting in each queue.", &["queue"]),
            tasks_in_flight: Family::gauge("dagmq_tasks_in_flight", "Tasks queued or running, by state.", &["state"]),
            workers: Family::gauge("dagmq_workers", "Workers with a recent heartbeat.", &[]),
            republished: Family::counter(
                "dagmq_tasks_republished_total",
                "Queued tries whose message was published again because no worker claimed them.",
                &[],
            ),
            requeued: Family::counter(
                "dagmq_tries_requeued_total",
                "Running tries requeued as new tries, by reason (worker_lost, not_running).",
                &["reason"],
            ),
            notifications: Family::counter(
                "dagmq_notifications_total",
                "Failure and retry notifications, by outcome (sent; failed after the notifier's retries).",
                &["outcome"],
            ),
            view: Arc::default(),
            throughput: Throughput::default(),
        }
    }
}

impl SchedulerMetrics {
    /// The text format of every family.
    pub fn render(&self) -> String {
        dagmq_core::metrics::render([
            &self.runs_finished,
            &self.tasks_finished,
            &self.task_duration,
            &self.dead_lettered,
            &self.loop_lag,
            &self.queue_depth,
            &self.tasks_in_flight,
            &self.workers,
            &self.republished,
            &self.requeued,
            &self.notifications,
        ])
    }
}

/// A short label for a dead-letter reason.
pub(crate) fn reason_label(reason: &str) -> &'static str {
    if reason.contains("exceeds the limit") {
        "too_large"
    } else if reason.contains("unsupported message version") {
        "version"
    } else if reason.contains("malformed message") {
        "malformed"
    } else if reason.contains(": param \"") || reason.contains("unknown param") || reason.contains("a run's params") {
        "bad_params"
    } else if reason.contains("unknown dag") {
        "unknown_dag"
    } else if reason.contains("has no task") {
        "unknown_task"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reasons_have_short_labels() {
        assert_eq!(reason_label("trigger: dag \"d\": param \"n\": expected an integer, got 1.5"), "bad_params");
        assert_eq!(reason_label("trigger: dag \"d\": unknown param \"x\" (this dag declares: n)"), "bad_params");
        assert_eq!(
            reason_label("trigger: dag \"d\": params are 70000 bytes of JSON; a run's params may be at most"),
            "bad_params"
        );
        assert_eq!(reason_label("trigger: unknown dag \"nope\""), "unknown_dag");
    }

    #[test]
    fn throughput_counts_the_last_hour_by_minute() {
        let at = |secs: i64| DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap();
        let throughput = Throughput::default();
        for secs in [0, 10, 70] {
            throughput.note(at(secs));
        }
        let hour = throughput.last_hour(at(90));
        assert_eq!(hour.len(), 60);
        assert_eq!(hour.iter().map(|(_, n)| n).sum::<u64>(), 3);
        assert_eq!(hour[59].1, 1, "the current minute");
        throughput.note(at(3_600 * 2));
        let later = throughput.last_hour(at(3_600 * 2 + 5));
        assert_eq!(later.iter().map(|(_, n)| n).sum::<u64>(), 1, "older minutes fall out");
    }
}
