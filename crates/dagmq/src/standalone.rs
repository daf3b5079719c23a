//! The serving commands: `standalone` (everything in one process), `scheduler` and `worker`.
//! Only here are backends chosen: in memory, or RabbitMQ and Redis.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dagmq_core::memory::{MemoryQueue, MemoryStore};
use dagmq_core::trace::SpanSink;
use dagmq_core::{CancelSignal, Clock, LiveDags, Queue, Store, SystemClock};
use dagmq_rabbitmq::{RabbitConfig, RabbitQueue};
use dagmq_redis::{RedisEndpoint, RedisOptions, RedisStore, RedisTimeouts, SentinelEndpoint};
use dagmq_scheduler::SchedulerConfig;
use dagmq_scheduler::api::ApiConfig;
use dagmq_scheduler::notifier::{FanoutNotifier, LogNotifier, Notifier};
use dagmq_worker::WorkerConfig;

use crate::cli::ServeArgs;
use crate::config_file::ConfigFile;
use crate::load::load_dags;
use crate::otel::{OtlpSink, OtlpTarget};
use crate::reload::Reloader;
use crate::webhook::WebhookNotifier;
use crate::{App, CliError, CliResult};

/// How long finished runs stay in Redis unless `--retention` says otherwise.
const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Which parts this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Scheduler, API and a worker.
    Standalone,
    /// Scheduler and API.
    Scheduler,
    /// A worker.
    Worker,
}

/// Runs the role until SIGINT or SIGTERM, then stops the worker gracefully and the rest after it.
pub(crate) async fn serve(app: &App, args: &ServeArgs, file: &ConfigFile, role: Role) -> CliResult<()> {
    let dags_dir = args.common.dags.clone().or_else(|| file.dags.clone());
    let port = args.scheduler.port.or(file.port).unwrap_or(9191);
    let bind = args.common.bind.clone().or_else(|| file.bind.clone()).unwrap_or_else(|| "127.0.0.1".to_string());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let concurrency = args.worker.concurrency.or(file.concurrency).unwrap_or(cores * 4);
    if concurrency == 0 && role != Role::Scheduler {
        let from = if args.worker.concurrency.is_some() { "--concurrency" } else { "the config file's concurrency" };
        return Err(CliError::usage(format!("{from} is 0: a worker needs at least 1 slot")));
    }
    let grace_period = match (&args.worker.grace_period, &file.grace_period) {
        (Some(text), _) => {
            dagmq_core::duration::parse_duration(text).map_err(|e| CliError::usage(format!("--grace-period: {e}")))?
        }
        (None, Some(text)) => {
            dagmq_core::duration::parse_duration(text).map_err(|e| CliError::usage(format!("grace_period: {e}")))?
        }
        (None, None) => Duration::from_secs(30),
    };
    let retention = match args.scheduler.retention.as_deref() {
        Some("off") => None,
        Some(text) => {
            Some(dagmq_core::duration::parse_duration(text).map_err(|e| CliError::usage(format!("--retention: {e}")))?)
        }
        None => Some(DEFAULT_RETENTION),
    };
    let mut redis_timeouts = RedisTimeouts::default();
    if let Some(text) = &args.connection.redis_timeout {
        redis_timeouts.response =
            dagmq_core::duration::parse_duration(text).map_err(|e| CliError::usage(format!("--redis-timeout: {e}")))?;
    }
    let worker_timeout = match &args.common.worker_timeout {
        Some(text) => Some(
            dagmq_core::duration::parse_duration(text)
                .map_err(|e| CliError::usage(format!("--worker-timeout: {e}")))?,
        ),
        None => None,
    };
    let dag_version_wait = match &args.worker.dag_version_wait {
        Some(text) => Some(
            dagmq_core::duration::parse_duration(text)
                .map_err(|e| CliError::usage(format!("--dag-version-wait: {e}")))?,
        ),
        None => None,
    };
    let token = crate::secrets::env_secret("DAGMQ_API_TOKEN").map_err(CliError::usage)?;
    let metrics_token = crate::secrets::env_secret("DAGMQ_METRICS_TOKEN").map_err(CliError::usage)?;
    // A scrape needs the metrics token, or the API token where no metrics token is set.
    let scrape_token = metrics_token.clone().or_else(|| token.clone());
    // Without a token (on loopback, or anywhere with --insecure), or when hosts are named, the
    // API and a worker's metrics endpoint check `Host` against loopback names, IP addresses, the
    // allowed hosts and the allowed origins' hosts, so no page can reach them by rebinding
    // another name to their address.
    let allowed_hosts: Option<Vec<String>> = (token.is_none() || !args.common.allowed_host.is_empty()).then(|| {
        args.common
            .allowed_host
            .iter()
            .map(|h| h.trim().to_string())
            .chain(
                args.scheduler
                    .allowed_origin
                    .iter()
                    .filter_map(|o| o.split_once("://").map(|(_, rest)| rest.trim_end_matches('/').to_string())),
            )
            .collect()
    });
    let amqp_url = crate::secrets::url_or_file(
        args.connection.amqp.as_deref(),
        args.connection.amqp_file.as_deref(),
        "--amqp-file",
    )
    .map_err(CliError::usage)?;
    // The nodes of one RabbitMQ cluster, or one node; a bad list is a usage error.
    let amqp_nodes = match &amqp_url {
        Some(list) => dagmq_rabbitmq::node_urls(list).map_err(CliError::usage)?,
        None => Vec::new(),
    };
    let redis_url = crate::secrets::url_or_file(
        args.connection.redis.as_deref(),
        args.connection.redis_file.as_deref(),
        "--redis-file",
    )
    .map_err(CliError::usage)?;
    if let Some(flag) = args.connection.tls.first_given() {
        let redis = redis_url.iter().map(|url| (url.as_str(), "redis", "Redis"));
        for (url, plain, what) in amqp_nodes.iter().map(|url| (url.as_str(), "amqp", "RabbitMQ")).chain(redis) {
            if has_scheme(url, plain) {
                return Err(CliError::usage(format!(
                    "{flag} is set but the {what} URL is a plain {plain}:// one, which would connect in \
                     cleartext: use {plain}s:// (or leave out the TLS flags)"
                )));
            }
        }
    }
    let tls = args.connection.tls.load().map_err(CliError::usage)?;
    let address: IpAddr = bind.parse().map_err(|_| CliError::usage(format!("--bind {bind:?} is not an IP address")))?;
    if role != Role::Worker && !address.is_loopback() && token.is_none() && !args.scheduler.insecure {
        return Err(CliError::usage(format!(
            "refusing to listen on {bind} without DAGMQ_API_TOKEN; set a token or pass --insecure"
        )));
    }
    let redis_endpoint = redis_endpoint(args, redis_url.as_deref())?;
    if role != Role::Standalone && (amqp_url.is_none() || redis_endpoint.is_none()) {
        return Err(CliError::usage(
            "the scheduler and workers need --amqp URL and --redis URL (or DAGMQ_AMQP_URL and DAGMQ_REDIS_URL, \
             or --amqp-file and --redis-file, or --redis-sentinel with --redis-master for Redis)",
        ));
    }
    let webhook = crate::secrets::url_or_file(
        args.scheduler.notify_webhook.as_deref(),
        args.scheduler.notify_webhook_file.as_deref(),
        "--notify-webhook-file",
    )
    .map_err(CliError::usage)?
    .or_else(|| file.notify_webhook.clone());
    let mut notifiers: Vec<Box<dyn Notifier>> = vec![Box::new(LogNotifier)];
    if let Some(url) = &webhook {
        let notifier =
            WebhookNotifier::new(url, &tls).map_err(|e| CliError::usage(format!("--notify-webhook: {e}")))?;
        tracing::info!(webhook = %notifier.shown(), "failure notifications go to a webhook");
        notifiers.push(Box::new(notifier));
    }

    let pools = file.pools(&args.scheduler.pools).map_err(CliError::usage)?;
    // Workers do not enforce pools, so they load DAGs whatever pools they name.
    let checked_pools = (role != Role::Worker).then_some(&pools);
    // With a directory, the DAGs are live: read again every 2 s and on SIGHUP.
    let (live, reloader) = match dags_dir.as_deref() {
        Some(dir) => {
            let reloader = Reloader::new(dir, &app.dags, &app.tasks, checked_pools)
                .map_err(|e| CliError::usage(format!("{e:#}")))?;
            (reloader.live(), Some(reloader))
        }
        None => {
            let loaded =
                load_dags(None, &app.dags, &app.tasks, checked_pools).map_err(|e| CliError::usage(format!("{e:#}")))?;
            (Arc::new(LiveDags::new(loaded.dags, loaded.refused, loaded.default_params)), None)
        }
    };
    if live.current().is_empty() {
        match (dags_dir.as_deref(), live.refused().len()) {
            (None, _) => tracing::warn!("no dags loaded; pass --dags DIR"),
            (Some(dir), 0) => tracing::warn!("no DAG files (*.toml) in {}", dir.display()),
            (Some(dir), refused) => {
                tracing::error!(
                    "every DAG file in {} was refused ({refused} refused; the reasons are above)",
                    dir.display()
                )
            }
        }
    }
    tracing::info!(dags = live.current().len(), refused = live.refused().len(), "dags loaded");

    let namespace = args.connection.namespace.clone().unwrap_or_default();
    let queue: Arc<dyn Queue> = match &amqp_url {
        Some(url) => {
            let mut config = RabbitConfig::new(url.clone());
            config.namespace = namespace.clone();
            config.tls = tls.clone();
            Arc::new(RabbitQueue::connect(config).await.map_err(|e| connect_error(&e.to_string()))?)
        }
        None => Arc::new(MemoryQueue::new()),
    };
    let store: Arc<dyn Store> = match &redis_endpoint {
        Some(endpoint) => {
            let prefix = if namespace.is_empty() { "dagmq".to_string() } else { namespace.clone() };
            let replicas = args.connection.redis_replicas.unwrap_or(0);
            let options = RedisOptions { timeouts: redis_timeouts, tls: tls.clone(), replicas };
            if let RedisEndpoint::Sentinel(sentinel) = endpoint {
                tracing::info!(redis = %sentinel.shown(), replicas, "redis primary found through sentinel");
            }
            Arc::new(
                RedisStore::open(endpoint, &prefix, retention, &options)
                    .await
                    .map_err(|e| connect_error(&e.to_string()))?,
            )
        }
        None => Arc::new(MemoryStore::with_retention(retention)),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let choice =
        OtlpTarget::from_settings(args.common.otlp_endpoint.as_deref(), args.common.otlp_traces_endpoint.as_deref());
    if let Some(warning) = &choice.warning {
        tracing::warn!("traces: {warning}");
    }
    let spans = match &choice.target {
        Some(target) => {
            let service = match role {
                Role::Standalone => "dagmq",
                Role::Scheduler => "dagmq-scheduler",
                Role::Worker => "dagmq-worker",
            };
            let sink = Arc::new(OtlpSink::start(target, choice.from_flag, service, &tls).map_err(CliError::usage)?);
            tracing::info!(endpoint = %dagmq_core::mask_url(target.url()), "traces go to an OTLP collector");
            Some(sink)
        }
        None => None,
    };
    let (stop_scheduler, scheduler_signal) = CancelSignal::new();
    let (stop_worker, worker_signal) = CancelSignal::new();
    let (hurry_worker, hurry_signal) = CancelSignal::new();

    // The worker's metrics port before anything starts, as the API's: one in use ends the
    // process first.
    let metrics_listener = match args.worker.metrics_port.filter(|_| role != Role::Scheduler) {
        Some(metrics_port) => Some((metrics_port, listen(address, &bind, metrics_port).await?)),
        None => None,
    };
    let mut scheduler = None;
    let mut scheduler_handle: Option<dagmq_scheduler::SchedulerHandle> = None;
    let mut reload_stop = None;
    let mut server = None;
    if role != Role::Worker {
        let mut config = SchedulerConfig::new((*live.current()).clone(), clock.clone());
        config.default_params = (*live.default_params()).clone();
        config.pools = pools.clone();
        config.refused_dags = (*live.refused()).clone();
        config.live = Some(live.clone());
        config.notifier = Arc::new(FanoutNotifier(notifiers));
        config.spans = spans.clone().map(|sink| sink as Arc<dyn SpanSink>);
        if let Some(timeout) = worker_timeout {
            config.worker_timeout = timeout;
        }
        // The API's port first: a port taken ends the process before the scheduler takes the
        // lease or creates a run.
        let listener = listen(address, &bind, port).await?;
        let (handle, task) = dagmq_scheduler::spawn(config, queue.clone(), store.clone(), scheduler_signal.clone());
        scheduler_handle = Some(handle.clone());
        let api_config = ApiConfig {
            token,
            metrics_token: metrics_token.clone(),
            allowed_origins: args.scheduler.allowed_origin.clone(),
            allowed_hosts: allowed_hosts.clone(),
        };
        scheduler = Some(task);
        tracing::info!("api on http://{}", listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
        server = Some(tokio::spawn(dagmq_scheduler::api::serve(listener, handle, api_config, scheduler_signal)));
    }
    let mut worker = None;
    if role != Role::Scheduler {
        let mut config =
            WorkerConfig::new(args.worker.name.clone().unwrap_or_else(worker_name), (*live.current()).clone(), clock);
        config.live = Some(live.clone());
        config.host = host_name();
        config.concurrency = concurrency;
        config.tasks = app.tasks.clone();
        config.grace_period = grace_period;
        config.hurry = Some(hurry_signal);
        config.eager = !args.worker.no_eager;
        config.spans = spans.clone().map(|sink| sink as Arc<dyn SpanSink>);
        if amqp_url.is_none() {
            // Measured: spawning a task per further claim costs more than the in-memory round
            // through the scheduler it saves.
            config.eager_claims = 1;
            config.batch_status = false;
            // The only worker of an in-memory queue: there is nobody to leave work to.
            config.prefetch = u16::MAX;
        }
        if let Some(timeout) = worker_timeout {
            config.worker_timeout = timeout;
        }
        if let Some(wait) = dag_version_wait {
            config.dag_version_wait = wait;
        }
        if let Some(window) = args.worker.prefetch {
            config.window = Some(window);
        }
        if !args.worker.queues.is_empty() {
            config.queues = args.worker.queues.clone();
        }
        if let Some((metrics_port, listener)) = metrics_listener {
            let metrics = config.metrics.clone();
            tracing::info!("worker metrics on http://{bind}:{metrics_port}/metrics");
            tokio::spawn(dagmq_scheduler::api::serve_metrics(
                listener,
                Arc::new(move || metrics.render()),
                scrape_token.clone(),
                allowed_hosts.clone(),
                worker_signal.clone(),
            ));
        }
        worker = Some(tokio::spawn(dagmq_worker::run(config, queue, store, worker_signal)));
    }

    if let Some(reloader) = reloader {
        let (stop_reloads, reload_signal) = CancelSignal::new();
        let scheduler = scheduler_handle.clone();
        tokio::spawn(reloader.watch(reload_signal, move || {
            let scheduler = scheduler.clone();
            async move {
                if let Some(scheduler) = scheduler {
                    scheduler.dags_changed().await;
                }
            }
        }));
        reload_stop = Some(stop_reloads);
    }

    wait_for_signal().await;
    if worker.is_some() {
        tracing::info!(grace = ?grace_period, "shutting down: running tries get the grace period to finish (stop again to end it now)");
    } else {
        tracing::info!("shutting down");
    }
    // A second Ctrl-C or SIGTERM ends the worker's grace period at once (Celery's cold
    // shutdown): its running tries are stopped and requeued.
    let second = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::warn!("stopped again: ending the grace period now");
        hurry_worker.cancel();
    });
    if let Some(stop) = reload_stop {
        stop.cancel();
    }
    stop_worker.cancel();
    if let Some(worker) = worker {
        let _ = worker.await;
    }
    stop_scheduler.cancel();
    if let Some(scheduler) = scheduler {
        let _ = scheduler.await;
    }
    if let Some(server) = server {
        let _ = server.await;
    }
    second.abort();
    if let Some(sink) = spans {
        // The spans of the last tries and runs go out before the process ends.
        let _ = tokio::task::spawn_blocking(move || sink.shutdown()).await;
    }
    Ok(())
}

/// A listener on `address` (given as `bind`) and `port`; a port in use is a runtime error.
async fn listen(address: IpAddr, bind: &str, port: u16) -> CliResult<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind((address, port))
        .await
        .with_context(|| format!("cannot listen on {bind}:{port}"))
        .map_err(|e| CliError::runtime(format!("{e:#}")))
}

/// Whether `url` starts with `scheme://` (in any case).
fn has_scheme(url: &str, scheme: &str) -> bool {
    url.split_once("://").is_some_and(|(given, _)| given.eq_ignore_ascii_case(scheme))
}

/// A failed connection to the broker or the store, with a hint where the cause is a server
/// certificate that does not verify.
/// Where Redis is: the primary the Sentinels name (the node URL, if given, lending its
/// credentials and TLS), or the URL's server; `None` without either. A malformed Sentinel list
/// is a usage error (exit 2), as is `--redis-replicas` without Redis.
fn redis_endpoint(args: &ServeArgs, redis_url: Option<&str>) -> CliResult<Option<RedisEndpoint>> {
    let sentinel = crate::secrets::url_or_file(
        args.connection.redis_sentinel.as_deref(),
        args.connection.redis_sentinel_file.as_deref(),
        "--redis-sentinel-file",
    )
    .map_err(CliError::usage)?;
    let endpoint = match (&sentinel, &args.connection.redis_master) {
        (Some(list), Some(master)) => {
            let sentinels: Vec<String> = list.split(',').map(|s| s.trim().to_string()).collect();
            for entry in &sentinels {
                check_sentinel_entry(entry).map_err(|reason| {
                    CliError::usage(format!(
                        "--redis-sentinel (DAGMQ_REDIS_SENTINEL): entry {:?} {reason}: give HOST:PORT[,HOST:PORT...]",
                        dagmq_core::mask_url(entry)
                    ))
                })?;
            }
            if master.trim().is_empty() {
                return Err(CliError::usage("--redis-master (DAGMQ_REDIS_MASTER) is empty: give the monitored name"));
            }
            Some(RedisEndpoint::Sentinel(SentinelEndpoint {
                sentinels,
                master: master.trim().to_string(),
                node_url: redis_url.map(str::to_string),
            }))
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(CliError::usage(
                "--redis-sentinel (or --redis-sentinel-file) and --redis-master (DAGMQ_REDIS_SENTINEL, \
                 DAGMQ_REDIS_MASTER) go together",
            ));
        }
        (None, None) => redis_url.map(|url| RedisEndpoint::Url(url.to_string())),
    };
    if endpoint.is_none() && args.connection.redis_replicas.is_some_and(|n| n > 0) {
        return Err(CliError::usage(
            "--redis-replicas (DAGMQ_REDIS_REPLICAS) needs Redis: --redis URL or --redis-sentinel with --redis-master",
        ));
    }
    Ok(endpoint)
}

/// Why an entry of the Sentinel list is not `HOST:PORT` or a `redis://`/`rediss://` URL.
fn check_sentinel_entry(entry: &str) -> Result<(), &'static str> {
    if entry.is_empty() {
        return Err("is empty");
    }
    if let Some((scheme, _)) = entry.split_once("://") {
        return if scheme == "redis" || scheme == "rediss" { Ok(()) } else { Err("has a scheme other than redis://") };
    }
    let Some((host, port)) = entry.rsplit_once(':') else { return Err("has no port") };
    if host.is_empty() {
        return Err("has no host");
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(()),
        _ => Err("has no valid port"),
    }
}

fn connect_error(message: &str) -> CliError {
    if message.contains("invalid peer certificate") {
        CliError::runtime(format!(
            "{message} (the server's certificate does not verify against the system's trust roots or the CA \
             given with --tls-ca)"
        ))
    } else {
        CliError::runtime(message)
    }
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match terminate.as_mut() {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// This machine's name, for the worker registry.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// A worker name unique on this machine: host and process id.
pub(crate) fn worker_name() -> String {
    format!("{}-{}", host_name(), std::process::id())
}
