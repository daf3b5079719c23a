//! dagmq-scheduler: turns schedules and triggers into DAG runs, walks each run's graph and
//! queues the tasks whose upstreams succeeded, and serves the HTTP API.
//!
//! Entry point: [`spawn`] with a [`SchedulerConfig`], a queue, a store and a shutdown signal;
//! then [`api::router`] over the returned [`SchedulerHandle`].

/// A named point between two steps of the protocol (listed in RELIABILITY.md). With the
/// `failpoints` feature, a test can make the process crash there (`FAILPOINTS=name=panic`)
/// or, where the point names an error, fail the step (`name=return`); without it, nothing.
macro_rules! fail_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
    ($name:literal, $error:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| Err($error));
    };
}

mod active_run;
pub mod api;
mod commands;
mod engine;
pub mod ids;
pub mod metrics;
pub mod notifier;
pub mod openapi;

pub use commands::{CommandError, SchedulerHandle, TriggerOutcome};
pub use dagmq_core::clock::{Clock, SystemClock, TokioClock};
pub use engine::{SchedulerConfig, spawn};
pub use metrics::SchedulerMetrics;
pub use notifier::{LogNotifier, Notification, NotificationKind, Notifier};
