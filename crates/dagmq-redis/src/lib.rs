//! dagmq-redis: the `Store` over Redis.
//!
//! Key layout (prefix `P`, default `dagmq`; every key of one run shares the hash tag `{RUN}`):
//! - `P:run:{RUN}:meta` — the run record (JSON).
//! - `P:run:{RUN}:tasks` — hash: task id → task instance (JSON); `TASK#progress` → `TRY:FRACTION`.
//! - `P:run:{RUN}:log:TASK:TRY` — list of log lines; `P:run:{RUN}:logs` — set of those keys.
//! - `P:runs` and `P:runs:dag:DAG` — sorted sets of run ids by creation time (newest-first
//!   listings without scans); `P:runs:unfinished` — runs not yet finished;
//!   `P:runs:state:STATE` — finished runs in STATE (`success`, `failed`, `cancelled`), and
//!   `P:runs:state:indexed` once every finished run is in those (a store written before they
//!   existed gets them built by its first listing of a finished state).
//! - `P:key:DAG:KEY` — the run created by a trigger's idempotency key.
//! - `P:dag:DAG` — the scheduler's per-DAG bookkeeping; `P:workers` — hash of worker entries.
//! - `P:scheduler:lease` — the term of the scheduler lease in force, `TERM:HOLDER`, expiring
//!   with the lease; `P:scheduler:terms` — the number of the last term granted (kept for good).
//! - `P:dagversion:DAG:VERSION` — hash: `dag` → what the scheduler needs of that version of the
//!   DAG (JSON); `run:RUN` → `1` for each unfinished run of it. Kept while it lists a run, and
//!   expires after the retention period once the last of them finished.
//!
//! Every state transition is a Lua compare-and-set (see `scripts`); WATCH/MULTI is unsound on
//! shared, multiplexed connections. Finished runs expire after the retention period, if set.

mod keys;
mod listing;
mod pool;
mod scripts;
mod store;

use std::sync::Arc;
use std::time::Duration;

use dagmq_core::store::{Fence, Store};
use dagmq_core::{BackendError, RunRecord, TaskInstance, TlsSettings};
pub use pool::{CONNECTIONS, IDLE_CHECK_AFTER};
use pool::{Pool, Source, Wait};
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{AsyncCommands, ConnectionAddr, IntoConnectionInfo, Script, TlsMode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A store over one Redis server. Clones share the connections.
#[derive(Clone)]
pub struct RedisStore {
    /// Connections.
    pool: Pool,
    /// Prefix of every key, so installations and tests can share a server.
    prefix: String,
    /// Finished runs expire this long after they finish; `None` keeps them.
    retention: Option<Duration>,
    /// The scripts, hashed once.
    scripts: Arc<Scripts>,
    /// For a scheduler's view: its writes carry this fence (see [`Store::fenced`]).
    fence: Option<Fence>,
    /// The fence as the scripts compare it with the lease key's value (`TERM:HOLDER`); empty
    /// for a view that writes unfenced.
    fence_arg: String,
}

/// The Lua scripts.
struct Scripts {
    transition_task: Script,
    finish_try: Script,
    claim_try: Script,
    finish_and_claim: Script,
    transition_tasks: Script,
    transition_run: Script,
    index_finished: Script,
    create_run: Script,
    add_tasks: Script,
    set_progress: Script,
    append_log: Script,
    acquire_lease: Script,
    renew_lease: Script,
    release_lease: Script,
    put_fenced: Script,
    put_dag_version: Script,
    hdel_fenced: Script,
    heartbeat: Script,
}

/// How long the client waits for Redis. A timed-out call may still have applied (a script
/// runs to its end once started), so callers treat a timeout as "unknown" and read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisTimeouts {
    /// Longest wait for an answer. Sized far above the largest script: creating a run of
    /// 100,000 tasks blocks the server for less than half a second on the test machine, and
    /// Redis serves nobody else meanwhile, so any call may wait that long; 30 s also rides out
    /// a short pause (`CLIENT PAUSE`, a failover) without an error.
    pub response: Duration,
    /// Longest wait for a new connection.
    pub connect: Duration,
}

impl Default for RedisTimeouts {
    fn default() -> RedisTimeouts {
        RedisTimeouts { response: Duration::from_secs(30), connect: Duration::from_secs(5) }
    }
}

/// How long each write waits for its replicas (`WAIT`) with `--redis-replicas N` before its
/// outcome counts as unknown. A replica on the same network acknowledges in about a
/// millisecond; two seconds ride out a busy replica or a short stall without an error, stay
/// below every deadline of the protocol (the 20 s worker timeout, the 30 s response timeout),
/// and bound how long a write waits when a replica is gone before the caller retries.
pub const REPLICA_WAIT: Duration = Duration::from_secs(2);

/// Where the store finds its Redis primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisEndpoint {
    /// One server, by its URL (`redis://[:PASSWORD@]HOST:PORT[/DB]`, `rediss://` for TLS).
    Url(String),
    /// The primary that Sentinels name, looked up again at every connect.
    Sentinel(SentinelEndpoint),
}

/// Redis behind Sentinel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelEndpoint {
    /// The Sentinels, each `HOST:PORT`, or a URL (`redis://[[USER]:PASSWORD@]HOST:PORT`,
    /// `rediss://` for TLS) where the Sentinels need a password of their own; the first
    /// entry with a password gives it for all of them.
    pub sentinels: Vec<String>,
    /// The name under which the Sentinels monitor the primary (`sentinel monitor NAME ...`).
    pub master: String,
    /// A URL whose user, password, database and scheme (`rediss://` for TLS) the data nodes
    /// take; its host and port are not used (the Sentinels name those).
    pub node_url: Option<String>,
}

/// How the store connects and how durable its writes are.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Response and connect timeouts.
    pub timeouts: RedisTimeouts,
    /// TLS settings of `rediss://` connections (nodes and Sentinels).
    pub tls: TlsSettings,
    /// Replicas that must have each state change before the call returns (`WAIT`); 0 waits
    /// for none.
    pub replicas: usize,
}

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`, `redis://:password@host/0`) with the
    /// default timeouts and checks that the server answers.
    pub async fn connect(url: &str, prefix: &str, retention: Option<Duration>) -> Result<RedisStore, BackendError> {
        RedisStore::connect_with(url, prefix, retention, RedisTimeouts::default()).await
    }

    /// Connects with explicit timeouts and checks that the server answers.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        retention: Option<Duration>,
        timeouts: RedisTimeouts,
    ) -> Result<RedisStore, BackendError> {
        RedisStore::connect_tls(url, prefix, retention, timeouts, &TlsSettings::default()).await
    }

    /// Connects with explicit timeouts and, for a `rediss://` URL, these TLS settings (a CA
    /// given here is the only root trusted for Redis: the client takes one root store, not
    /// two), and checks that the server answers.
    pub async fn connect_tls(
        url: &str,
        prefix: &str,
        retention: Option<Duration>,
        timeouts: RedisTimeouts,
        tls: &TlsSettings,
    ) -> Result<RedisStore, BackendError> {
        let options = RedisOptions { timeouts, tls: tls.clone(), replicas: 0 };
        RedisStore::open(&RedisEndpoint::Url(url.to_string()), prefix, retention, &options).await
    }

    /// Connects to the endpoint's server or primary with these options and checks that it
    /// answers. Behind Sentinel, every connect (the first and each after a broken
    /// connection) asks the Sentinels for the primary and checks it is one.
    pub async fn open(
        endpoint: &RedisEndpoint,
        prefix: &str,
        retention: Option<Duration>,
        options: &RedisOptions,
    ) -> Result<RedisStore, BackendError> {
        let (source, shown, secrets) = match endpoint {
            RedisEndpoint::Url(url) => {
                // The client's own messages may quote the URL or its password: scrubbed of both.
                let bad_url = |e: redis::RedisError| {
                    BackendError::new(format!(
                        "redis {}: {}",
                        mask_url(url),
                        dagmq_core::scrub_url(&e.to_string(), url)
                    ))
                };
                let client = match certificates(url, &options.tls) {
                    Some(certificates) => redis::Client::build_with_tls(url.as_str(), certificates).map_err(bad_url)?,
                    None => redis::Client::open(url.as_str()).map_err(bad_url)?,
                };
                (Source::Direct(client), mask_url(url), vec![url.clone()])
            }
            RedisEndpoint::Sentinel(sentinel) => {
                let client = sentinel_client(sentinel, &options.tls)?;
                (Source::Sentinel(tokio::sync::Mutex::new(client)), sentinel.shown(), sentinel.secrets())
            }
        };
        let scrub = |message: &str| secrets.iter().fold(message.to_string(), |m, url| dagmq_core::scrub_url(&m, url));
        let timeouts = options.timeouts;
        let connection = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(timeouts.response))
            .set_connection_timeout(Some(timeouts.connect));
        let wait = (options.replicas > 0)
            .then(|| Wait { replicas: options.replicas, timeout: REPLICA_WAIT.min(timeouts.response) });
        let pool = Pool::new(source, connection, timeouts.connect, wait);
        let store = RedisStore {
            pool,
            prefix: prefix.to_string(),
            retention,
            fence: None,
            fence_arg: String::new(),
            scripts: Arc::new(Scripts {
                transition_task: Script::new(scripts::TRANSITION_TASK),
                finish_try: Script::new(scripts::FINISH_TRY),
                claim_try: Script::new(scripts::CLAIM_TRY),
                finish_and_claim: Script::new(scripts::FINISH_AND_CLAIM),
                transition_tasks: Script::new(scripts::TRANSITION_TASKS),
                transition_run: Script::new(scripts::TRANSITION_RUN),
                index_finished: Script::new(scripts::INDEX_FINISHED),
                create_run: Script::new(scripts::CREATE_RUN),
                add_tasks: Script::new(scripts::ADD_TASKS),
                set_progress: Script::new(scripts::SET_PROGRESS),
                append_log: Script::new(scripts::APPEND_LOG),
                acquire_lease: Script::new(scripts::ACQUIRE_LEASE),
                renew_lease: Script::new(scripts::RENEW_LEASE),
                release_lease: Script::new(scripts::RELEASE_LEASE),
                put_fenced: Script::new(scripts::PUT_FENCED),
                put_dag_version: Script::new(scripts::PUT_DAG_VERSION),
                hdel_fenced: Script::new(scripts::HDEL_FENCED),
                heartbeat: Script::new(scripts::HEARTBEAT),
            }),
        };
        store.ping().await.map_err(|e| BackendError::new(format!("redis {shown}: {}", scrub(&e.message))))?;
        Ok(store)
    }

    /// Deletes every key under this store's prefix (for tests and uninstalling).
    pub async fn delete_all(&self) -> Result<(), BackendError> {
        let mut conn = self.conn().await?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.prefix))
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            if !keys.is_empty() {
                let _: () = conn.del(keys).await.map_err(redis_error)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Writes finished runs and their tasks straight into the key layout, in one pipeline (one
    /// round trip) per call, as the scripts would leave them once finished: the record, the
    /// tasks hash, the runs and DAG indices, with the retention's expiry. For benchmarks and
    /// tests that need a long history in seconds; a run not finished is refused, since the
    /// scheduler's unfinished index and DAG versions are not written.
    pub async fn seed_finished_runs(&self, runs: &[(RunRecord, Vec<TaskInstance>)]) -> Result<(), BackendError> {
        if let Some((run, _)) = runs.iter().find(|(run, _)| !run.state.is_final()) {
            return Err(BackendError::new(format!("seeding: run {} is {}, not finished", run.run_id, run.state)));
        }
        let mut pipe = redis::pipe();
        for (run, tasks) in runs {
            let score = run.created_at.timestamp_millis();
            pipe.set(self.meta_key(&run.run_id), encode(run)?).ignore();
            let fields =
                tasks.iter().map(|t| Ok((t.task_id.clone(), encode(t)?))).collect::<Result<Vec<_>, BackendError>>()?;
            if !fields.is_empty() {
                pipe.hset_multiple(self.tasks_key(&run.run_id), &fields).ignore();
            }
            if let Some(retention) = self.retention {
                let secs = i64::try_from(retention.as_secs().max(1)).unwrap_or(i64::MAX);
                pipe.expire(self.meta_key(&run.run_id), secs).ignore();
                pipe.expire(self.tasks_key(&run.run_id), secs).ignore();
            }
            pipe.zadd(self.runs_key(), &run.run_id, score).ignore();
            pipe.zadd(self.dag_runs_key(&run.dag_id), &run.run_id, score).ignore();
            pipe.zadd(self.final_runs_key(run.state), &run.run_id, score).ignore();
        }
        let mut conn = self.conn().await?;
        let () = pipe.query_async(&mut conn).await.map_err(redis_error)?;
        Ok(())
    }

    /// The CPU time the Redis server has used since it started, user and system, in seconds
    /// (`INFO cpu`): read before and after a workload, what it cost Redis.
    pub async fn server_cpu_seconds(&self) -> Result<f64, BackendError> {
        let mut conn = self.conn().await?;
        let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await.map_err(redis_error)?;
        Ok(info
            .lines()
            .filter_map(|line| line.split_once(':'))
            .filter(|(name, _)| matches!(*name, "used_cpu_sys" | "used_cpu_user"))
            .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
            .sum())
    }

    async fn conn(&self) -> Result<pool::Conn, BackendError> {
        self.pool.get().await.map_err(|e| BackendError::new(format!("redis: no connection: {e}")))
    }

    /// A connection for a state change: with `--redis-replicas N`, each call on it answers
    /// only once N replicas have its write (see [`pool::Pool::write`]).
    async fn write_conn(&self) -> Result<pool::Conn, BackendError> {
        self.pool.write().await.map_err(|e| BackendError::new(format!("redis: no connection: {e}")))
    }

    /// The connection of liveness calls (see [`pool::Pool::liveness`]).
    async fn liveness_conn(&self) -> Result<pool::Conn, BackendError> {
        self.pool.liveness().await.map_err(|e| BackendError::new(format!("redis: no connection: {e}")))
    }

    /// The first argument of a fenced script: this view's fence, or none.
    fn fence_arg(&self) -> &str {
        &self.fence_arg
    }

    /// The error of a fenced write: a refusal by the fence tells the scheduler.
    fn write_error(&self, what: &str, err: redis::RedisError) -> BackendError {
        if err.to_string().contains("DAGMQ_FENCED") {
            return match &self.fence {
                Some(fence) => fence.refused(what),
                None => BackendError::fenced(format!("{what} refused by the fence: the lease term has ended")),
            };
        }
        redis_error(err)
    }

    fn retention_secs(&self) -> u64 {
        self.retention.map_or(0, |r| r.as_secs().max(1))
    }
}

impl SentinelEndpoint {
    /// The Sentinels and the master name as logs and errors show them (passwords masked).
    pub fn shown(&self) -> String {
        let sentinels: Vec<String> = self.sentinels.iter().map(|s| mask_url(s.trim())).collect();
        format!("sentinel {} master {}", sentinels.join(","), self.master)
    }

    /// The URLs whose passwords errors must not quote.
    fn secrets(&self) -> Vec<String> {
        self.sentinels.iter().map(|s| s.trim().to_string()).chain(self.node_url.clone()).collect()
    }
}

/// The client certificates and CA of a `rediss://` URL, when TLS settings are given.
fn certificates(url: &str, tls: &TlsSettings) -> Option<redis::TlsCertificates> {
    (url.starts_with("rediss://") && !tls.is_default()).then(|| redis::TlsCertificates {
        client_tls: tls.client.as_ref().map(|client| redis::ClientTlsConfig {
            client_cert: client.cert_pem.clone(),
            client_key: client.key_pem.clone(),
        }),
        root_cert: tls.ca_pem.clone(),
    })
}

/// A Sentinel client for the endpoint's primary: the Sentinels' addresses and password from
/// their entries, the data nodes' credentials, database and TLS from the node URL.
fn sentinel_client(
    endpoint: &SentinelEndpoint,
    tls: &TlsSettings,
) -> Result<redis::sentinel::SentinelClient, BackendError> {
    let shown = endpoint.shown();
    let bad = |what: String| BackendError::new(format!("redis {shown}: {what}"));
    if endpoint.sentinels.is_empty() {
        return Err(bad("no Sentinel given".into()));
    }
    if endpoint.master.trim().is_empty() {
        return Err(bad("no master name given".into()));
    }
    let mut addresses = Vec::new();
    let mut sentinel_auth: Option<(Option<String>, String)> = None;
    let mut sentinel_tls = false;
    for entry in &endpoint.sentinels {
        let entry = entry.trim();
        let url = if entry.contains("://") { entry.to_string() } else { format!("redis://{entry}") };
        let info = url.as_str().into_connection_info().map_err(|e| {
            bad(format!("Sentinel {}: {}", mask_url(entry), dagmq_core::scrub_url(&e.to_string(), entry)))
        })?;
        sentinel_tls |= matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        if sentinel_auth.is_none()
            && let Some(password) = info.redis_settings().password()
        {
            sentinel_auth = Some((info.redis_settings().username().map(str::to_string), password.to_string()));
        }
        addresses.push(info.addr().clone());
    }
    let mut builder = SentinelClientBuilder::new(addresses, endpoint.master.trim(), SentinelServerType::Master)
        .map_err(|e| bad(e.to_string()))?;
    if let Some((username, password)) = sentinel_auth {
        if let Some(username) = username {
            builder = builder.set_client_to_sentinel_username(username);
        }
        builder = builder.set_client_to_sentinel_password(password);
    }
    if sentinel_tls && let Some(certificates) = certificates("rediss://", tls) {
        builder = builder.set_client_to_sentinel_certificates(certificates);
    }
    if let Some(url) = &endpoint.node_url {
        let info = url.as_str().into_connection_info().map_err(|e| {
            bad(format!("data node URL {}: {}", mask_url(url), dagmq_core::scrub_url(&e.to_string(), url)))
        })?;
        let settings = info.redis_settings();
        if let Some(username) = settings.username() {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = settings.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if settings.db() != 0 {
            builder = builder.set_client_to_redis_db(settings.db());
        }
        if let ConnectionAddr::TcpTls { insecure, .. } = info.addr() {
            builder = builder.set_client_to_redis_tls_mode(if *insecure { TlsMode::Insecure } else { TlsMode::Secure });
            if let Some(certificates) = certificates(url, tls) {
                builder = builder.set_client_to_redis_certificates(certificates);
            }
        }
    }
    builder.build().map_err(|e| bad(e.to_string()))
}

/// The value of the lease key for a term, which is also the fence of its writes.
fn lease_value(lease: &dagmq_core::store::LeaseTerm) -> String {
    format!("{}:{}", lease.term, lease.holder)
}

fn redis_error(err: redis::RedisError) -> BackendError {
    BackendError::new(format!("redis: {err}"))
}

fn encode<T: Serialize>(value: &T) -> Result<String, BackendError> {
    serde_json::to_string(value).map_err(|e| BackendError::new(format!("redis: cannot encode: {e}")))
}

fn decode<T: DeserializeOwned>(text: &str) -> Result<T, BackendError> {
    serde_json::from_str(text).map_err(|e| BackendError::new(format!("redis: stored value does not parse: {e}")))
}

pub use dagmq_core::mask_url;
