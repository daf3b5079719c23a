//! The command line: flags, with environment variables behind them and a config file behind
//! those (flags > env > file > defaults).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// dagmq: DAG scheduler and workers.
#[derive(Debug, Parser)]
#[command(name = "dagmq", version, about = "DAG scheduler and distributed workers", propagate_version = true)]
pub struct Cli {
    /// TOML file with defaults for flags (dags, port, bind, concurrency, api, notify_webhook, grace_period).
    #[arg(long, global = true, env = "DAGMQ_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scheduler, worker and API in one process; in-memory queue and store unless --amqp/--redis.
    Standalone(StandaloneArgs),
    /// The scheduler and the API, against RabbitMQ and Redis.
    Scheduler(SchedulerArgs),
    /// A worker, against RabbitMQ and Redis.
    Worker(WorkerArgs),
    /// Parse and check DAG files; exit 2 with `file:line: reason` for each bad one.
    Validate(ValidateArgs),
    /// Start a run of a DAG.
    Trigger(TriggerArgs),
    /// List DAGs, pause and unpause them, backfill their schedule.
    Dags(DagsArgs),
    /// List and show runs; restart, cancel, clear, suspend and resume them.
    Runs(RunsArgs),
    /// Print a task's log.
    Logs(LogsArgs),
    /// List live workers.
    Workers(ClientArgs),
    /// Run a benchmark and print one `bench=...` line per figure.
    Bench(BenchArgs),
}

/// TLS material for every `amqps://`, `rediss://` and `https://` connection the command makes.
#[derive(Debug, Args, Clone, Default)]
pub struct TlsArgs {
    /// PEM file of a private CA to trust (besides the system's roots; for Redis, instead of them).
    #[arg(long, global = true, env = "DAGMQ_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM file of a client certificate, for servers that require mutual TLS (with --tls-key).
    #[arg(long, global = true, env = "DAGMQ_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key (with --tls-cert).
    #[arg(long, global = true, env = "DAGMQ_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// Reads the files; an error names the flag's file and what is wrong with it.
    pub fn load(&self) -> Result<dagmq_core::TlsSettings, String> {
        dagmq_core::TlsSettings::load(self.tls_ca.as_deref(), self.tls_cert.as_deref(), self.tls_key.as_deref())
    }

    /// The first TLS flag given, by name, if any.
    pub fn first_given(&self) -> Option<&'static str> {
        if self.tls_ca.is_some() {
            Some("--tls-ca (DAGMQ_TLS_CA)")
        } else if self.tls_cert.is_some() {
            Some("--tls-cert (DAGMQ_TLS_CERT)")
        } else if self.tls_key.is_some() {
            Some("--tls-key (DAGMQ_TLS_KEY)")
        } else {
            None
        }
    }
}

/// How a serving process reaches RabbitMQ and Redis (a scheduler, a worker, or standalone with
/// --amqp and --redis).
#[derive(Debug, Args, Clone, Default)]
pub struct ConnectionArgs {
    /// RabbitMQ, e.g. amqp://guest:guest@127.0.0.1:5672/%2f (amqps:// for TLS); for a cluster,
    /// its nodes' URLs separated by commas (a process connects to one that answers and moves to
    /// another when its node goes). A password here shows in `ps`: prefer DAGMQ_AMQP_URL or
    /// --amqp-file.
    #[arg(long, env = "DAGMQ_AMQP_URL", hide_env_values = true, value_name = "URL", conflicts_with = "amqp_file")]
    pub amqp: Option<String>,
    /// A file holding the RabbitMQ URL, or the comma-separated URLs of a cluster's nodes (a
    /// mounted secret), so the password is in no command line.
    #[arg(long, env = "DAGMQ_AMQP_URL_FILE", value_name = "FILE")]
    pub amqp_file: Option<PathBuf>,
    /// Redis, e.g. redis://127.0.0.1:6379 (rediss:// for TLS). A password here shows in `ps`:
    /// prefer DAGMQ_REDIS_URL or --redis-file.
    #[arg(long, env = "DAGMQ_REDIS_URL", hide_env_values = true, value_name = "URL", conflicts_with = "redis_file")]
    pub redis: Option<String>,
    /// A file holding the Redis URL (a mounted secret), so the password is in no command line.
    #[arg(long, env = "DAGMQ_REDIS_URL_FILE", value_name = "FILE")]
    pub redis_file: Option<PathBuf>,
    /// Prefix of queue names and Redis keys, so several installations can share the services.
    #[arg(long, env = "DAGMQ_NAMESPACE", value_name = "NAME")]
    pub namespace: Option<String>,
    /// Longest wait for an answer from Redis (default 30s); a call that times out is treated
    /// as unknown and read again, never as not applied.
    #[arg(long, env = "DAGMQ_REDIS_TIMEOUT", value_name = "DURATION")]
    pub redis_timeout: Option<String>,
    /// Redis behind Sentinel: the Sentinels, HOST:PORT[,HOST:PORT...] (an entry may be a URL,
    /// redis://:PASSWORD@HOST:PORT, where the Sentinels have a password of their own); with
    /// --redis-master. The data nodes' password and TLS come from --redis if given too.
    #[arg(
        long,
        env = "DAGMQ_REDIS_SENTINEL",
        hide_env_values = true,
        value_name = "HOST:PORT,...",
        conflicts_with = "redis_sentinel_file"
    )]
    pub redis_sentinel: Option<String>,
    /// A file holding the Sentinel list (a mounted secret, when an entry carries a password).
    #[arg(long, env = "DAGMQ_REDIS_SENTINEL_FILE", value_name = "FILE")]
    pub redis_sentinel_file: Option<PathBuf>,
    /// The name under which the Sentinels monitor the Redis primary (with --redis-sentinel).
    #[arg(long, env = "DAGMQ_REDIS_MASTER", value_name = "NAME")]
    pub redis_master: Option<String>,
    /// Replicas every state change must reach (Redis WAIT, 2 s) before dagmq acts on it or
    /// acknowledges a message (default 0).
    #[arg(long, env = "DAGMQ_REDIS_REPLICAS", value_name = "N")]
    pub redis_replicas: Option<usize>,
    /// TLS flags.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Flags every serving role reads.
#[derive(Debug, Args, Clone, Default)]
pub struct CommonServeArgs {
    /// Directory of DAG files (*.toml).
    #[arg(long, env = "DAGMQ_DAGS", value_name = "DIR")]
    pub dags: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<String>,
    /// A host name (`dagmq.example.com`, or with its port) under which clients reach the API;
    /// repeat for more. When given, or when there is no API token, a request whose `Host` is
    /// none of these, no loopback name and no IP address is refused (DNS rebinding).
    #[arg(long, env = "DAGMQ_ALLOWED_HOST", value_delimiter = ',', value_name = "HOST")]
    pub allowed_host: Vec<String>,
    /// The scheduler treats a worker silent this long as lost and requeues its tries (default 20s).
    #[arg(long, value_name = "DURATION")]
    pub worker_timeout: Option<String>,
    /// Send traces to this OpenTelemetry collector over OTLP/HTTP (JSON), e.g.
    /// http://127.0.0.1:4318 (spans are POSTed to URL/v1/traces): a trace per run, a span per
    /// try. Off by default. Without the flag: OTEL_EXPORTER_OTLP_ENDPOINT, unless
    /// OTEL_TRACES_EXPORTER=none, OTEL_SDK_DISABLED=true or a grpc protocol on a gRPC endpoint
    /// (see the README); the flag is used whatever those say, without OTEL_EXPORTER_OTLP_HEADERS.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// The URL spans are POSTed to, used as is, for a collector whose traces path is not
    /// /v1/traces; beats --otlp-endpoint. Without either flag: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    /// then OTEL_EXPORTER_OTLP_ENDPOINT (a flag beats every variable).
    #[arg(long, value_name = "URL")]
    pub otlp_traces_endpoint: Option<String>,
}

/// Flags of the scheduler and its API (`scheduler`, `standalone`).
#[derive(Debug, Args, Clone, Default)]
pub struct SchedulerRoleArgs {
    /// Port of the HTTP API and UI.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// A named concurrency pool with its slots, NAME=SLOTS; repeat for more (beside `[pools]` of
    /// the config file). Tasks take slots with `pool` and `pool_slots`; the scheduler enforces them.
    #[arg(long = "pool", value_name = "NAME=SLOTS")]
    pub pools: Vec<String>,
    /// Finished runs, their logs and trigger keys are deleted from Redis this long after they
    /// finish (default 30d; `off` keeps them for ever).
    #[arg(long, env = "DAGMQ_RETENTION", value_name = "DURATION")]
    pub retention: Option<String>,
    /// POST a JSON notification here on task failure (and retry, where asked for). Webhook URLs
    /// often hold a secret in their path: prefer DAGMQ_NOTIFY_WEBHOOK or --notify-webhook-file;
    /// logs show only the scheme and host.
    #[arg(
        long,
        env = "DAGMQ_NOTIFY_WEBHOOK",
        hide_env_values = true,
        value_name = "URL",
        conflicts_with = "notify_webhook_file"
    )]
    pub notify_webhook: Option<String>,
    /// A file holding the webhook URL (a mounted secret), so it is in no command line.
    #[arg(long, env = "DAGMQ_NOTIFY_WEBHOOK_FILE", value_name = "FILE")]
    pub notify_webhook_file: Option<PathBuf>,
    /// Listen on a non-loopback address without an API token. Requests still need a `Host` that
    /// is a loopback name, an IP address or an --allowed-host.
    #[arg(long)]
    pub insecure: bool,
    /// An origin (`https://ops.example.com`) besides the API's own whose web pages may send it
    /// commands; repeat for more. Pages of any other origin are refused.
    #[arg(long, env = "DAGMQ_ALLOWED_ORIGINS", value_delimiter = ',', value_name = "ORIGIN")]
    pub allowed_origin: Vec<String>,
}

/// Flags of a worker (`worker`, `standalone`).
#[derive(Debug, Args, Clone, Default)]
pub struct WorkerRoleArgs {
    /// Worker pools this worker consumes, comma-separated (default: default).
    #[arg(long, value_delimiter = ',', value_name = "POOLS")]
    pub queues: Vec<String>,
    /// Most tasks the worker runs at once (default: 4 per core).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Most messages per pool the worker holds that it has not started (default over RabbitMQ: 4
    /// per slot, at most 64, and never less than one per slot plus up to 8). Messages it holds wait for its
    /// slots while other workers may be idle: with long tasks, give 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,
    /// Turn eager dispatch off: by default a worker whose try succeeds claims, in the same store
    /// step, a downstream task that became ready (default trigger rule, a pool it consumes, no
    /// concurrency limit) and runs it next without a round through the scheduler and the broker.
    /// Off, every task is queued by the scheduler in priority order.
    #[arg(long)]
    pub no_eager: bool,
    /// This worker's name in the registry (default: host-pid).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Serve the worker's own metrics on this port (127.0.0.1, or --bind).
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// How long a try of a DAG version this worker has not loaded may wait, since it was queued,
    /// for a worker that has loaded it before it fails (default 5m). Meanwhile the worker reads
    /// its DAG directory again at once and leaves the try, unclaimed, to other workers.
    #[arg(long, value_name = "DURATION")]
    pub dag_version_wait: Option<String>,
    /// On shutdown (SIGTERM, SIGINT), how long running tries may take to finish before they are
    /// put back in the queue for another worker (default 30s; the config file's grace_period).
    #[arg(long, env = "DAGMQ_GRACE_PERIOD", value_name = "DURATION")]
    pub grace_period: Option<String>,
}

/// Flags of `standalone`: every role's.
#[derive(Debug, Args)]
pub struct StandaloneArgs {
    /// Connections (optional: in-memory queue and store without them).
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Flags of every role.
    #[command(flatten)]
    pub common: CommonServeArgs,
    /// The scheduler's and the API's.
    #[command(flatten)]
    pub scheduler: SchedulerRoleArgs,
    /// The worker's.
    #[command(flatten)]
    pub worker: WorkerRoleArgs,
}

/// Flags of `scheduler`: no worker flag (--concurrency, --queues ... are an error here).
#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Connections.
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Flags of every role.
    #[command(flatten)]
    pub common: CommonServeArgs,
    /// The scheduler's and the API's.
    #[command(flatten)]
    pub scheduler: SchedulerRoleArgs,
}

/// Flags of `worker`: no scheduler or API flag (--port, --pool ... are an error here).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Connections.
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Flags of every role.
    #[command(flatten)]
    pub common: CommonServeArgs,
    /// The worker's.
    #[command(flatten)]
    pub worker: WorkerRoleArgs,
}

/// Every serving flag, as the serving code reads them: a role's own flags, and the defaults for
/// the flags of the roles it does not play.
#[derive(Debug, Clone, Default)]
pub struct ServeArgs {
    /// Connections.
    pub connection: ConnectionArgs,
    /// Flags of every role.
    pub common: CommonServeArgs,
    /// The scheduler's and the API's.
    pub scheduler: SchedulerRoleArgs,
    /// The worker's.
    pub worker: WorkerRoleArgs,
}

impl From<&StandaloneArgs> for ServeArgs {
    fn from(args: &StandaloneArgs) -> ServeArgs {
        ServeArgs {
            connection: args.connection.clone(),
            common: args.common.clone(),
            scheduler: args.scheduler.clone(),
            worker: args.worker.clone(),
        }
    }
}

impl From<&SchedulerArgs> for ServeArgs {
    fn from(args: &SchedulerArgs) -> ServeArgs {
        ServeArgs {
            connection: args.connection.clone(),
            common: args.common.clone(),
            scheduler: args.scheduler.clone(),
            worker: WorkerRoleArgs::default(),
        }
    }
}

impl From<&WorkerArgs> for ServeArgs {
    fn from(args: &WorkerArgs) -> ServeArgs {
        ServeArgs {
            connection: args.connection.clone(),
            common: args.common.clone(),
            scheduler: SchedulerRoleArgs::default(),
            worker: args.worker.clone(),
        }
    }
}

/// Flags of `validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// DAG files to check (instead of a directory): `dagmq validate dags/*.toml`.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Directory of DAG files (*.toml).
    #[arg(long, env = "DAGMQ_DAGS", value_name = "DIR")]
    pub dags: Option<PathBuf>,
    /// A named pool with its slots, NAME=SLOTS; repeat for more (beside `[pools]` of the config
    /// file). A task naming a pool that is not declared is refused.
    #[arg(long = "pool", value_name = "NAME=SLOTS")]
    pub pools: Vec<String>,
}

/// Flags every client command takes.
#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// The scheduler's API (default http://127.0.0.1:9191).
    #[arg(long, global = true, env = "DAGMQ_API", value_name = "URL")]
    pub api: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// TLS flags, for an https:// API.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Flags of `trigger`.
#[derive(Debug, Args)]
pub struct TriggerArgs {
    /// The DAG to run.
    pub dag_id: String,
    /// A parameter, KEY=VALUE (converted to the type the DAG declares for KEY); repeat for more.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// Idempotency key: a second trigger with the same key creates no second run.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Wait for the run to finish; exit 0 on success, 1 otherwise.
    #[arg(long)]
    pub wait: bool,
    /// Client flags.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `dags` subcommands.
#[derive(Debug, Args)]
pub struct DagsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: DagsCommand,
    /// Client flags.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What to do with DAGs.
#[derive(Debug, Subcommand)]
pub enum DagsCommand {
    /// List DAGs with schedule, next run and last run.
    List,
    /// Stop scheduled runs of a DAG.
    Pause {
        /// The DAG.
        dag_id: String,
    },
    /// Resume scheduled runs of a DAG.
    Unpause {
        /// The DAG.
        dag_id: String,
    },
    /// A run for every schedule point from FROM to TO (both included), oldest first; points
    /// that have a run already are left alone; `max_active_runs` holds.
    Backfill {
        /// The DAG.
        dag_id: String,
        /// First time: RFC 3339 (`2026-11-01T06:00:00Z`), a date (`2026-11-01`, midnight in the
        /// DAG's timezone) or a time without an offset (`2026-11-01T06:00`, in the DAG's timezone).
        #[arg(long, value_name = "TIME")]
        from: String,
        /// Last time, included; the same forms as --from.
        #[arg(long, value_name = "TIME")]
        to: String,
        /// A parameter, KEY=VALUE (converted to the type the DAG declares for KEY); repeat for more.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Wait for every run to finish, showing progress; exit 0 if all succeeded, 1 otherwise.
        #[arg(long)]
        wait: bool,
    },
}

/// `runs` subcommands.
#[derive(Debug, Args)]
pub struct RunsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: RunsCommand,
    /// Client flags.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What to do with runs.
#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Latest runs, newest first.
    List {
        /// Only this DAG.
        #[arg(long = "dag", value_name = "DAG_ID")]
        dag_id: Option<String>,
        /// Only this state (queued, running, suspended, success, failed, cancelled).
        #[arg(long, value_name = "STATE")]
        status: Option<String>,
        /// How many (at most 500).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// How many of the newest to pass over first (page back through older runs).
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },
    /// A run with every task.
    Show {
        /// The run.
        run_id: String,
    },
    /// Re-run the failed and not-run tasks of a finished run.
    Restart {
        /// The run.
        run_id: String,
    },
    /// Cancel a run (also a suspended one); running tasks are told to stop.
    Cancel {
        /// The run.
        run_id: String,
    },
    /// Run tasks of a run again with a fresh retry budget, even if they succeeded.
    Clear {
        /// The run.
        run_id: String,
        /// A task to run again; repeat for more.
        #[arg(long = "task", value_name = "ID", required = true)]
        tasks: Vec<String>,
        /// Every task after them runs again too.
        #[arg(long)]
        downstream: bool,
    },
    /// Suspend a running run: nothing new is queued; running tries are stopped and their tasks
    /// become suspended without using up a retry.
    Suspend {
        /// The run.
        run_id: String,
    },
    /// Resume a suspended run: suspended tasks get new tries.
    Resume {
        /// The run.
        run_id: String,
    },
}

/// Flags of `logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The run.
    pub run_id: String,
    /// The task.
    pub task_id: String,
    /// The try (default: the latest).
    #[arg(long = "try", value_name = "N")]
    pub try_number: Option<u32>,
    /// Keep printing new lines until the try ends.
    #[arg(long)]
    pub follow: bool,
    /// Client flags.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    pub workload: BenchWorkload,
    /// Most tasks each worker runs at once.
    #[arg(long, global = true, default_value_t = 1000)]
    pub concurrency: usize,
    /// Workers without eager dispatch (every task through the scheduler), for comparison.
    #[arg(long, global = true)]
    pub no_eager: bool,
    /// Distributed mode: each worker's window exactly (`worker --prefetch N`), in place of the
    /// default of 4 unstarted messages per slot.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,
    /// Distributed mode: RabbitMQ for the queue (with --redis); one scheduler and two workers,
    /// each with connections of its own, and the raw broker limit measured first.
    #[arg(long, global = true, value_name = "URL", requires = "redis")]
    pub amqp: Option<String>,
    /// Distributed mode: Redis for the store (with --amqp).
    #[arg(long, global = true, value_name = "URL", requires = "amqp")]
    pub redis: Option<String>,
    /// Internal: run as one of a distributed bench's worker processes under this namespace,
    /// until standard input closes.
    #[arg(long, global = true, hide = true, value_name = "NAMESPACE", requires = "amqp")]
    pub worker_of: Option<String>,
}

/// Benchmark workloads.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum BenchWorkload {
    /// One root, N parallel no-op tasks, one sink: tasks per second.
    Fanout {
        /// Parallel tasks.
        #[arg(default_value_t = 10_000)]
        n: usize,
    },
    /// K no-op tasks in sequence: latency from a task's success to its successor's start.
    Chain {
        /// Tasks in the chain.
        #[arg(default_value_t = 1000)]
        k: usize,
    },
    /// M triggers of a 10-task diamond published to dagmq.triggers: runs per second.
    Runs {
        /// Triggers.
        #[arg(default_value_t = 1000)]
        m: usize,
    },
    /// Cost against history (distributed mode only): `runs 1000`, `fanout 2000`, `chain 200`
    /// and the API's list and run-page calls, on an empty store, then again after RUNS finished
    /// runs of 10 tasks each are written into it; each line names the history it ran with.
    History {
        /// Finished runs to seed.
        #[arg(default_value_t = 100_000)]
        runs: usize,
    },
    /// Redis alone (distributed mode only): N queued tasks of one run claimed and finished as a
    /// worker does (`claim_try`, `finish_try`), 64 at a time, without the broker: the store's
    /// ceiling in tasks/s, and Redis's CPU meanwhile.
    Store {
        /// Tasks.
        #[arg(default_value_t = 50_000)]
        n: usize,
    },
    /// DEPTH layers of WIDTH no-op tasks; every task waits for the whole layer before it.
    Layers {
        /// Tasks per layer.
        #[arg(default_value_t = 100)]
        width: usize,
        /// Layers.
        #[arg(default_value_t = 100)]
        depth: usize,
    },
}

impl BenchWorkload {
    /// The workload as command-line words, for the worker processes of a distributed bench.
    pub(crate) fn to_args(self) -> Vec<String> {
        match self {
            BenchWorkload::Fanout { n } => vec!["fanout".into(), n.to_string()],
            BenchWorkload::Chain { k } => vec!["chain".into(), k.to_string()],
            BenchWorkload::Runs { m } => vec!["runs".into(), m.to_string()],
            BenchWorkload::Layers { width, depth } => vec!["layers".into(), width.to_string(), depth.to_string()],
            BenchWorkload::History { runs } => vec!["history".into(), runs.to_string()],
            BenchWorkload::Store { n } => vec!["store".into(), n.to_string()],
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// A URL setting that carries a secret hides its value from `--help`, and every setting that
    /// hides its value is kept, with its `_FILE` form, from tasks' environments.
    #[test]
    fn secret_settings_are_hidden_from_help_and_kept_from_tasks() {
        let secrets = dagmq_core::redact::SECRET_ENV_VARS;
        let mut hidden = Vec::new();
        let mut pending = vec![Cli::command()];
        while let Some(command) = pending.pop() {
            for arg in command.get_arguments() {
                let Some(env) = arg.get_env().and_then(|e| e.to_str()) else { continue };
                let takes_url = arg.get_value_names().is_some_and(|names| names.iter().any(|n| n.as_str() == "URL"));
                if secrets.contains(&env) && takes_url {
                    assert!(arg.is_hide_env_values_set(), "--help shows the value of {env}");
                }
                if arg.is_hide_env_values_set() {
                    assert!(secrets.contains(&env), "{env} is not kept from tasks");
                    assert!(secrets.contains(&format!("{env}_FILE").as_str()), "{env}_FILE is not kept from tasks");
                    hidden.push(env.to_string());
                }
            }
            pending.extend(command.get_subcommands().cloned());
        }
        for name in ["DAGMQ_AMQP_URL", "DAGMQ_REDIS_URL", "DAGMQ_NOTIFY_WEBHOOK"] {
            assert!(hidden.iter().any(|h| h == name), "{name} is a setting with its value hidden");
        }
    }
}
