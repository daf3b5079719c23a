//! dagmq-core: the pure part of dagmq. The DAG model and builder, schedules, DAG files, the run
//! and task state machine, wire messages, and the `Queue` and `Store` traits with in-memory
//! implementations. Nothing here does I/O, and only `clock` reads time: everywhere else `now` is a
//! parameter.

pub mod clock;
pub mod cron;
pub mod dag;
pub mod dag_file;
pub mod dag_version;
pub mod duration;
pub mod memory;
pub mod messages;
pub mod metrics;
pub mod params;
pub mod queue;
pub mod records;
pub mod redact;
pub mod schedule;
pub mod state;
pub mod store;
pub mod task;
pub mod task_registry;
pub mod template;
pub mod time_arg;
pub mod tls;
pub mod trace;
pub mod trigger;

pub use clock::{Clock, SystemClock, TokioClock};
pub use dag::{Dag, DagBuilder, DagError, DagRegistry, LiveDags, Pools, TaskConfig, TaskKind, TaskSpec};
pub use params::{ParamSpec, ParamType, ParamsSchema};
pub use queue::{Consumer, Delivery, Headers, Queue, Subscription, Topic};
pub use records::{RunKind, RunRecord, TaskInstance, WorkerInfo};
pub use redact::{mask_url, scrub_url};
pub use state::{RunState, TaskState};
pub use store::Store;
pub use task::{CancelSignal, FollowUp, Params, Task, TaskContext, TaskError, TaskOutcome};
pub use task_registry::TaskRegistry;
pub use time_arg::TimeArg;
pub use tls::TlsSettings;
pub use trigger::TriggerRule;

/// A queue or store that failed: unreachable, refused, or broken. Callers retry or give up;
/// it never means bad input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// What failed, naming the backend and the operation.
    pub message: String,
    /// The store refused a scheduler's write because that scheduler no longer holds the lease
    /// (see [`store::Fence`]): it must step down, not retry.
    pub fenced: bool,
}

impl BackendError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> BackendError {
        BackendError { message: message.into(), fenced: false }
    }

    /// A write refused because the writer lost the scheduler lease.
    pub fn fenced(message: impl Into<String>) -> BackendError {
        BackendError { message: message.into(), fenced: true }
    }
}

/// Re-exported so users' `#[async_trait]` matches the trait definitions.
pub use async_trait::async_trait;

/// A named point between two steps of the protocol (RELIABILITY.md lists them). In a crate built
/// with its `failpoints` feature (which must depend on the `fail` crate), a test can make the
/// process crash there (`FAILPOINTS=name=panic`) or, where the point names an error, fail the
/// step (`name=return`); without the feature it expands to nothing.
#[macro_export]
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
