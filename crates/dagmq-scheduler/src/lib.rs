//! dagmq-scheduler: turns schedules and triggers into DAG runs, walks each run's graph and
//! queues the tasks whose upstreams succeeded, and serves the HTTP API.
//!
//! Entry point: [`spawn`] with a [`SchedulerConfig`], a queue, a store and a shutdown signal;
//! then [`api::router`] over the returned [`SchedulerHandle`].

mod active_run;
pub mod api;
mod commands;
mod engine;
pub mod ids;
mod limits;
pub mod metrics;
pub mod notifier;
pub mod openapi;

pub use commands::{BackfillOutcome, CommandError, MAX_BACKFILL_POINTS, SchedulerHandle, TriggerOutcome};
pub use dagmq_core::clock::{Clock, SystemClock, TokioClock};
pub use engine::{SchedulerConfig, spawn};
pub use limits::{WaitingFor, WorkerPools};
pub use metrics::SchedulerMetrics;
pub use notifier::{LogNotifier, Notification, NotificationKind, Notifier};
