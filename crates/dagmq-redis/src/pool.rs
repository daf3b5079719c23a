//! Connections: a few multiplexed connections that every call shares, and one more of its own
//! for liveness calls.
//!
//! A multiplexed connection writes every command queued while it was busy in one write, and
//! Redis answers a batch read in one go. Sharing it between concurrent calls therefore
//! pipelines them without any call waiting for another: a worker's claims and outcomes, sent
//! at the same moment by many tries, cost Redis one read and one write instead of one each.
//! A pool that hands each call a connection of its own gives that up (each call is a round
//! trip on its own socket), and checking a connection out costs a round trip or a lock.
//!
//! A connection answers in order, so a call waits behind every reply queued before it on its
//! connection, a large one (a sweep's read of a big run, a long log) included. Liveness calls
//! (the scheduler lease, worker heartbeats, the server's time) have deadlines of a few seconds
//! that such a wait would miss, deposing a healthy scheduler or making a healthy worker stop
//! its tries; they go over a connection of their own ([`Pool::liveness`]), which carries
//! nothing but small calls.
//!
//! A connection on which a call failed for anything but a reply of the server (a broken or
//! timed-out connection) is replaced: the next call on its slot connects again. One that has
//! been idle for [`IDLE_CHECK_AFTER`] is checked with a `PING` before it is used again, so a
//! connection the server or the network dropped while nothing was sent (an idle timeout, a
//! restarted server) costs no call an error.
//!
//! Behind Sentinel ([`Source::Sentinel`]), every connect asks the Sentinels for the primary
//! anew and checks with `ROLE` on the new connection that the server is a primary, so a
//! connection dropped by a failover is made again to the new primary. A `READONLY` reply (a
//! demoted primary still connected) counts as a broken connection, as does an idle check that
//! finds a replica: the next call looks the primary up again.
//!
//! With [`Wait`], a write connection ([`Pool::write`]) sends `WAIT` right behind each script,
//! in the same pipeline on the same connection, and answers only once enough replicas have the
//! write; a `WAIT` that times out short of them is an error, "unknown" like a timeout (the
//! write applied on the primary, but may not survive a failover).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::SentinelClient;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Role, ServerErrorKind, Value,
};

/// Shared connections per store (the liveness connection comes on top). One carries a process's
/// load with room to spare (Redis runs commands one at a time anyway); a second keeps one large
/// reply (a long log, a big run) from holding up every other call. A call waits behind the
/// calls queued before it on its connection, and its response timeout counts that wait.
pub const CONNECTIONS: usize = 2;

/// A connection unused for this long is checked with a `PING` before its next call.
pub const IDLE_CHECK_AFTER: Duration = Duration::from_secs(5);

/// One shared connection, with the number of the connect that made it.
#[derive(Default)]
struct Slot {
    /// The connection and its generation; `None` until the first call, or after a failure.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Held while connecting or checking, so that calls arriving meanwhile wait for one
    /// connect; counts the connects.
    connecting: tokio::sync::Mutex<u64>,
    /// When the slot was last handed out, in milliseconds since the pool was made.
    last_used: AtomicU64,
}

/// The connections of one store. Clones share them.
#[derive(Clone)]
pub(crate) struct Pool(Arc<Inner>);

/// Where a pool's connections go.
pub(crate) enum Source {
    /// One server, by its URL.
    Direct(Client),
    /// The primary the Sentinels name at the time of each connect (the client keeps one
    /// connection to each Sentinel, hence the lock).
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// How many replicas each write waits for, and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wait {
    /// Replicas that must have the write (`WAIT`'s first argument), at least 1.
    pub(crate) replicas: usize,
    /// Longest wait for them; past it the write's outcome is unknown.
    pub(crate) timeout: Duration,
}

/// What a pool's clones share.
struct Inner {
    /// Where connections go.
    source: Source,
    /// Timeouts of each connection.
    config: AsyncConnectionConfig,
    /// Longest wait for the Sentinels' answer, on top of the connect itself.
    lookup_timeout: Duration,
    /// The replicas writes wait for, if any.
    wait: Option<Wait>,
    /// The shared connections, then the liveness connection (the last).
    slots: Vec<Slot>,
    next: AtomicUsize,
    /// The origin of [`Slot::last_used`].
    origin: Instant,
}

impl Pool {
    /// A pool of [`CONNECTIONS`] shared connections and one for liveness calls to `source`,
    /// each made on first use; writes through [`Pool::write`] wait for `wait`'s replicas.
    pub(crate) fn new(
        source: Source,
        config: AsyncConnectionConfig,
        lookup_timeout: Duration,
        wait: Option<Wait>,
    ) -> Pool {
        let slots = (0..=CONNECTIONS).map(|_| Slot::default()).collect();
        Pool(Arc::new(Inner {
            source,
            config,
            lookup_timeout,
            wait,
            slots,
            next: AtomicUsize::new(0),
            origin: Instant::now(),
        }))
    }

    /// A connection to use for one call (or a few): the shared slots take turns.
    pub(crate) async fn get(&self) -> Result<Conn, RedisError> {
        self.slot(self.0.next.fetch_add(1, Ordering::Relaxed) % CONNECTIONS).await
    }

    /// A shared connection for a state change: with replicas to wait for, each command sent
    /// on it is followed by `WAIT` and answers only once they have it.
    pub(crate) async fn write(&self) -> Result<Conn, RedisError> {
        let mut conn = self.get().await?;
        conn.wait = self.0.wait;
        Ok(conn)
    }

    /// The connection of liveness calls (lease, heartbeat, the server's time): no large reply
    /// is ever queued on it, so these calls answer within their deadlines whatever else the
    /// process reads.
    pub(crate) async fn liveness(&self) -> Result<Conn, RedisError> {
        self.slot(CONNECTIONS).await
    }

    /// The connection of slot `index`, made or checked first if need be.
    async fn slot(&self, index: usize) -> Result<Conn, RedisError> {
        let slot = &self.0.slots[index];
        let now = self.millis();
        let idle = Duration::from_millis(now.saturating_sub(slot.last_used.swap(now, Ordering::Relaxed)));
        if idle < IDLE_CHECK_AFTER
            && let Some(conn) = self.current(index)
        {
            return Ok(conn);
        }
        let mut made = slot.connecting.lock().await;
        // Another call may have connected while this one waited.
        if let Some(mut conn) = self.current(index) {
            if idle < IDLE_CHECK_AFTER {
                return Ok(conn);
            }
            if self.check(&mut conn).await {
                return Ok(conn);
            }
            // Dropping it takes the broken connection out of the slot.
            conn.broken = true;
            drop(conn);
        }
        let conn = self.connect().await?;
        *made += 1;
        let generation = *made;
        *lock(&slot.current) = Some((generation, conn.clone()));
        Ok(Conn { conn, pool: self.clone(), index, generation, broken: false, wait: None })
    }

    /// Whether an idle connection still answers and, behind Sentinel, is still the primary's.
    async fn check(&self, conn: &mut Conn) -> bool {
        match self.0.source {
            Source::Direct(_) => {
                let _: Result<(), RedisError> = redis::cmd("PING").query_async(conn).await;
                !conn.broken
            }
            Source::Sentinel(_) => {
                let role: Result<Role, RedisError> = redis::cmd("ROLE").query_async(conn).await;
                !conn.broken && matches!(role, Ok(Role::Primary { .. }))
            }
        }
    }

    /// A new connection: to the URL's server, or to the primary the Sentinels name now,
    /// checked to be one.
    async fn connect(&self) -> Result<MultiplexedConnection, RedisError> {
        let sentinel = match &self.0.source {
            Source::Direct(client) => return client.get_multiplexed_async_connection_with_config(&self.0.config).await,
            Source::Sentinel(sentinel) => sentinel,
        };
        let client = {
            let mut sentinel = sentinel.lock().await;
            tokio::time::timeout(self.0.lookup_timeout, sentinel.async_get_client()).await.map_err(|_| {
                RedisError::from((ErrorKind::Io, "no Sentinel named the primary in time (a failover under way?)"))
            })??
        };
        let mut conn = client.get_multiplexed_async_connection_with_config(&self.0.config).await?;
        // Between the Sentinels' answer and this connect, a failover may have demoted the
        // server: writes to it would be refused at best, lost at worst.
        let role: Role = redis::cmd("ROLE").query_async(&mut conn).await?;
        if !matches!(role, Role::Primary { .. }) {
            return Err(RedisError::from((
                ErrorKind::Io,
                "the server the Sentinels named is not a primary (a failover under way?)",
            )));
        }
        Ok(conn)
    }

    /// The slot's connection, if it has one.
    fn current(&self, index: usize) -> Option<Conn> {
        lock(&self.0.slots[index].current).as_ref().map(|(generation, conn)| Conn {
            conn: conn.clone(),
            pool: self.clone(),
            index,
            generation: *generation,
            broken: false,
            wait: None,
        })
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.0.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Drops the slot's connection if it is still the one of `generation`.
    fn discard(&self, index: usize, generation: u64) {
        let mut current = lock(&self.0.slots[index].current);
        if current.as_ref().is_some_and(|(made, _)| *made == generation) {
            *current = None;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A shared connection as one call uses it. A call that fails for anything but a reply of the
/// server takes the connection out of its slot when this is dropped, so the next call
/// connects again.
pub(crate) struct Conn {
    conn: MultiplexedConnection,
    pool: Pool,
    index: usize,
    generation: u64,
    broken: bool,
    /// Replicas each command waits for (a write connection), or none.
    wait: Option<Wait>,
}

impl Conn {
    fn note<T>(&mut self, result: &Result<T, RedisError>) {
        if let Err(err) = result
            && (err.is_io_error()
                || err.is_timeout()
                || err.is_connection_dropped()
                || err.is_connection_refusal()
                || err.is_unrecoverable_error()
                || is_read_only(err))
        {
            self.broken = true;
        }
    }

    /// Sends `cmd` and `WAIT` in one pipeline: the command's own answer (or error) once
    /// `wait.replicas` replicas have it, an error if they do not within `wait.timeout`.
    async fn send_and_wait(&mut self, cmd: &Cmd, wait: Wait) -> Result<Value, RedisError> {
        let millis = u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipeline = redis::pipe();
        pipeline.add_command(cmd.clone()).cmd("WAIT").arg(wait.replicas).arg(millis);
        let mut values = self.conn.req_packed_commands(&pipeline, 0, 2).await?;
        let (Some(acked), Some(answer)) = (values.pop(), values.pop()) else {
            return Err(RedisError::from((ErrorKind::Io, "WAIT: short pipeline answer")));
        };
        // The command's own error first: a refusal or NOSCRIPT says what happened to it.
        let answer = answer.extract_error()?;
        match acked.extract_error()? {
            Value::Int(count) if usize::try_from(count).is_ok_and(|count| count >= wait.replicas) => Ok(answer),
            Value::Int(count) => {
                // Applied on this primary, but a failover now could lose it: unknown. The next
                // call connects again, so a primary cut off from its replicas is looked up anew.
                self.broken = true;
                Err(RedisError::from((
                    ErrorKind::Extension,
                    "outcome unknown",
                    format!(
                        "the write reached {count} of {} replicas within {millis} ms (WAIT): it applied on the \
                         primary but may be lost by a failover",
                        wait.replicas
                    ),
                )))
            }
            _ => Err(RedisError::from((ErrorKind::Io, "WAIT: answer is not a number"))),
        }
    }
}

/// Whether `cmd` runs a script (every state change is one): `SCRIPT LOAD`, sent when the
/// server lacks a script, writes nothing and waits for no replica.
fn runs_a_script(cmd: &Cmd) -> bool {
    matches!(cmd.args_iter().next(), Some(redis::Arg::Simple(name))
        if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL"))
}

/// A write refused by a replica: a primary demoted by a failover, still connected.
fn is_read_only(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) || err.to_string().contains("READONLY")
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.broken {
            self.pool.discard(self.index, self.generation);
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = match self.wait {
                Some(wait) if runs_a_script(cmd) => self.send_and_wait(cmd, wait).await,
                _ => self.conn.req_packed_command(cmd).await,
            };
            self.note(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.conn.req_packed_commands(pipeline, offset, count).await;
            self.note(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}
