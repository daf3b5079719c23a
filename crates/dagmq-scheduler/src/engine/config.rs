//! What the scheduler is given besides its queue and store, with its defaults.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dagmq_core::{Clock, DagRegistry, LiveDags, Params};

use crate::notifier::Notifier;

/// What the scheduler needs besides its queue and store.
pub struct SchedulerConfig {
    /// The DAGs to schedule.
    pub dags: Arc<DagRegistry>,
    /// Default parameters per DAG (a DAG file's `[params]`).
    pub default_params: HashMap<String, Params>,
    /// Where failure and retry notifications go.
    pub notifier: Arc<dyn Notifier>,
    /// Source of `now`.
    pub clock: Arc<dyn Clock>,
    /// How often running runs are reconciled with the store, the safety net for status
    /// messages lost between a worker's store write and its publish.
    pub sweep_interval: Duration,
    /// Most scheduled runs one DAG gets per watcher pass (the next pass follows at once).
    pub catch_up_batch: usize,
    /// A worker whose last heartbeat is older than this is lost: its running tries are
    /// requeued as new tries and it leaves the registry.
    pub worker_timeout: Duration,
    /// How often lost workers are looked for.
    pub zombie_check_interval: Duration,
    /// DAG files that were refused, as (file, `file:line: reason`), listed by `/api/v1/dags`.
    pub refused_dags: Vec<(String, String)>,
    /// The scheduler lease lasts this long unless renewed (every third of it); a standby
    /// scheduler takes over at most this long after the active one dies.
    pub lease_ttl: Duration,
    /// A task `queued` this long without being claimed may have lost its message (a publish
    /// that failed after the compare-and-set, a message dead-lettered by the broker): it is
    /// read again and, still `queued`, published again (duplicates are harmless: a worker's
    /// claim is a compare-and-set). Checked with the lost workers.
    pub republish_after: Duration,
    /// A try `running` under a live worker whose heartbeats have not listed it for this long
    /// is not being run (its claim applied but the worker took it for failed): it is requeued
    /// as a new try.
    pub unlisted_grace: Duration,
    /// Named pools and their slots (`[pools]`, `--pool NAME=SLOTS`).
    pub pools: dagmq_core::Pools,
    /// The DAGs as a live set that a reload replaces (see [`SchedulerHandle::dags_changed`]);
    /// when absent, `dags`, `default_params` and `refused_dags` are the set for good.
    pub live: Option<Arc<LiveDags>>,
    /// Where the root span of each run that ends goes (see [`dagmq_core::trace`]); `None`
    /// (the default) records none.
    pub spans: dagmq_core::trace::Spans,
}

impl SchedulerConfig {
    /// A configuration with defaults: log notifications, 30 s sweep, batches of 100.
    pub fn new(dags: DagRegistry, clock: Arc<dyn Clock>) -> SchedulerConfig {
        SchedulerConfig {
            dags: Arc::new(dags),
            default_params: HashMap::new(),
            notifier: Arc::new(crate::notifier::LogNotifier),
            clock,
            sweep_interval: Duration::from_secs(30),
            catch_up_batch: 100,
            worker_timeout: Duration::from_secs(20),
            zombie_check_interval: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(10),
            refused_dags: Vec::new(),
            republish_after: Duration::from_secs(20),
            unlisted_grace: Duration::from_secs(10),
            pools: dagmq_core::Pools::new(),
            live: None,
            spans: None,
        }
    }
}
