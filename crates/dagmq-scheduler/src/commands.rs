//! Requests to the scheduler's event loop from the HTTP API and the CLI, and its answers.

use std::sync::Arc;

use dagmq_core::{DagRegistry, Params, Queue, Store};
use tokio::sync::{mpsc, oneshot};

use dagmq_core::Clock;

/// Something asked of the scheduler.
pub(crate) enum Command {
    /// Create a manual run.
    Trigger {
        /// The DAG.
        dag_id: String,
        /// Parameters over the DAG's defaults.
        params: Params,
        /// Idempotency key.
        key: Option<String>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<TriggerOutcome, CommandError>>,
    },
    /// Re-run a finished run's failed and not-run tasks.
    Restart {
        /// The run.
        run_id: String,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Cancel a run.
    Cancel {
        /// The run.
        run_id: String,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Create a run for every schedule point in a range.
    Backfill {
        /// The DAG.
        dag_id: String,
        /// First time of the range (a time without an offset is in the DAG's timezone).
        from: dagmq_core::TimeArg,
        /// Last time of the range (inclusive).
        to: dagmq_core::TimeArg,
        /// Parameters over the DAG's defaults, for every run created.
        params: Params,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<BackfillOutcome, CommandError>>,
    },
    /// Run tasks of a run again (with their downstream tasks when asked).
    Clear {
        /// The run.
        run_id: String,
        /// The tasks named.
        tasks: Vec<String>,
        /// Every task after them too.
        downstream: bool,
        /// Where the answer goes: the ids of the tasks that will run again.
        reply: oneshot::Sender<Result<Vec<String>, CommandError>>,
    },
    /// Suspend a running run, or resume a suspended one.
    SetSuspended {
        /// The run.
        run_id: String,
        /// Suspend (true) or resume (false).
        suspended: bool,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// The live DAG set was reloaded: take it.
    DagsChanged,
    /// Pause or unpause a DAG's schedule.
    SetPaused {
        /// The DAG.
        dag_id: String,
        /// Paused or not.
        paused: bool,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
}

/// What a trigger did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerOutcome {
    /// The run: new, or the existing one for a repeated key.
    pub run_id: String,
    /// Whether the run is new.
    pub created: bool,
}

/// What a backfill did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillOutcome {
    /// The run of every schedule point in the range, oldest first: new or already there.
    pub runs: Vec<String>,
    /// How many were created.
    pub created: usize,
    /// How many points had a run already (scheduled, backfilled earlier).
    pub existing: usize,
}

/// The most schedule points one backfill may cover.
pub const MAX_BACKFILL_POINTS: usize = 10_000;

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// An unknown DAG or run (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is bad (HTTP 400).
    #[error("{0}")]
    BadInput(String),
    /// The queue or store failed (HTTP 503).
    #[error("{0}")]
    Backend(String),
    /// The scheduler is shutting down (HTTP 503).
    #[error("the scheduler is not running")]
    Stopped,
    /// Another scheduler holds the lease; this one stands by (HTTP 503).
    #[error("this scheduler is on standby: another scheduler is active")]
    Standby,
}

/// A cloneable handle to a running scheduler: send it commands, read its store.
#[derive(Clone)]
pub struct SchedulerHandle {
    /// Commands to the event loop.
    pub(crate) commands: mpsc::Sender<Command>,
    /// The store, for reads.
    pub store: Arc<dyn Store>,
    /// The queue, for health and depths.
    pub queue: Arc<dyn Queue>,
    /// The DAGs the scheduler runs, as loaded and reloaded.
    pub live: Arc<dagmq_core::LiveDags>,
    /// The scheduler's clock.
    pub clock: Arc<dyn Clock>,
    /// The scheduler's metrics.
    pub metrics: Arc<crate::metrics::SchedulerMetrics>,
    /// Why tasks wait for a concurrency limit, by (run, task): the API's `waiting_for`.
    pub waiting_for: crate::limits::WaitingFor,
    /// The pools live workers consume: a queued task on another pool waits for a worker.
    pub worker_pools: crate::limits::WorkerPools,
    /// The named pools and their slots.
    pub pools: dagmq_core::Pools,
}

impl Command {
    /// Answers the command with `error` without doing it.
    pub(crate) fn refuse(self, error: CommandError) {
        match self {
            Command::DagsChanged => {}
            Command::Trigger { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::Backfill { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::Clear { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::Restart { reply, .. }
            | Command::Cancel { reply, .. }
            | Command::SetSuspended { reply, .. }
            | Command::SetPaused { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

impl SchedulerHandle {
    /// Why task `task_id` of run `run_id` waits to be queued (`"pool db"`, `"max_active_tasks"`,
    /// `"max_active"`), if it waits for a concurrency limit.
    pub fn waiting_reason(&self, run_id: &str, task_id: &str) -> Option<String> {
        crate::limits::waiting_reason(&self.waiting_for, run_id, task_id)
    }

    /// Why a task queued on `pool` waits: `no live worker consumes pool POOL` when no live worker
    /// consumed it at the scheduler's last look at the worker registry (every 5 s by default).
    pub fn unserved_reason(&self, pool: &str) -> Option<String> {
        crate::limits::unserved_reason(&self.worker_pools, pool)
    }

    /// Sends a command and waits for its answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, CommandError>>) -> Command,
    ) -> Result<T, CommandError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| CommandError::Stopped)?;
        answer.await.map_err(|_| CommandError::Stopped)?
    }

    /// Creates a manual run of `dag_id`; with a key already used, answers the existing run.
    pub async fn trigger(
        &self,
        dag_id: &str,
        params: Params,
        key: Option<String>,
    ) -> Result<TriggerOutcome, CommandError> {
        let dag_id = dag_id.to_string();
        self.ask(|reply| Command::Trigger { dag_id, params, key, reply }).await
    }

    /// Restarts a finished run.
    pub async fn restart(&self, run_id: &str) -> Result<(), CommandError> {
        let run_id = run_id.to_string();
        self.ask(|reply| Command::Restart { run_id, reply }).await
    }

    /// Cancels a queued or running run.
    pub async fn cancel(&self, run_id: &str) -> Result<(), CommandError> {
        let run_id = run_id.to_string();
        self.ask(|reply| Command::Cancel { run_id, reply }).await
    }

    /// Creates a run (kind `backfill`) for every schedule point `t` of `dag_id` with
    /// `from <= t <= to`, oldest first, skipping points that have a run already; the runs start
    /// as `max_active_runs` allows.
    pub async fn backfill(
        &self,
        dag_id: &str,
        from: impl Into<dagmq_core::TimeArg>,
        to: impl Into<dagmq_core::TimeArg>,
        params: Params,
    ) -> Result<BackfillOutcome, CommandError> {
        let dag_id = dag_id.to_string();
        let (from, to) = (from.into(), to.into());
        self.ask(|reply| Command::Backfill { dag_id, from, to, params, reply }).await
    }

    /// Runs `tasks` of a run again with a fresh retry budget, even those that succeeded, and
    /// with `downstream` every task after them; answers the ids of the tasks that run again.
    pub async fn clear(&self, run_id: &str, tasks: Vec<String>, downstream: bool) -> Result<Vec<String>, CommandError> {
        let run_id = run_id.to_string();
        self.ask(|reply| Command::Clear { run_id, tasks, downstream, reply }).await
    }

    /// Suspends a running run: nothing new is queued, and its queued and running tries are
    /// stopped and become `suspended` without using up a retry.
    pub async fn suspend(&self, run_id: &str) -> Result<(), CommandError> {
        let run_id = run_id.to_string();
        self.ask(|reply| Command::SetSuspended { run_id, suspended: true, reply }).await
    }

    /// Resumes a suspended run: its suspended tasks get new tries and scheduling goes on.
    pub async fn resume(&self, run_id: &str) -> Result<(), CommandError> {
        let run_id = run_id.to_string();
        self.ask(|reply| Command::SetSuspended { run_id, suspended: false, reply }).await
    }

    /// The DAGs loaded now.
    pub fn dags(&self) -> Arc<DagRegistry> {
        self.live.current()
    }

    /// DAG files refused at the last (re)load: (file, `file:line: reason`).
    pub fn refused_dags(&self) -> Arc<Vec<(String, String)>> {
        self.live.refused()
    }

    /// Tells the scheduler that its live DAG set was reloaded; it takes the new set at once.
    pub async fn dags_changed(&self) {
        let _ = self.commands.send(Command::DagsChanged).await;
    }

    /// Pauses or unpauses a DAG.
    pub async fn set_paused(&self, dag_id: &str, paused: bool) -> Result<(), CommandError> {
        let dag_id = dag_id.to_string();
        self.ask(|reply| Command::SetPaused { dag_id, paused, reply }).await
    }
}
