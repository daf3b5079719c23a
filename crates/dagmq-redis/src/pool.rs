//! The connection pool: deadpool over multiplexed connections, without a round trip per
//! checkout. deadpool-redis checks every connection it hands out with `UNWATCH` and `PING`,
//! one round trip before every store call (a third of the commands Redis served in a
//! benchmark). Here a connection that failed is taken out of the pool at once instead, so one
//! used within [`TRUSTED_FOR`] is handed out as it is; one idle for longer is checked as before.

use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// A connection used this recently without an error is handed out without a check.
const TRUSTED_FOR: Duration = Duration::from_secs(5);

/// Makes and recycles connections; wraps deadpool-redis's manager.
pub(crate) struct Manager(pub(crate) deadpool_redis::Manager);

impl managed::Manager for Manager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        managed::Manager::create(&self.0).await
    }

    async fn recycle(&self, conn: &mut MultiplexedConnection, metrics: &Metrics) -> RecycleResult<RedisError> {
        if metrics.last_used() < TRUSTED_FOR {
            return Ok(());
        }
        managed::Manager::recycle(&self.0, conn, metrics).await
    }
}

/// The pool.
pub(crate) type Pool = managed::Pool<Manager>;

/// A connection checked out of the pool. A call that fails for anything but a reply of the
/// server (a broken or timed-out connection) takes the connection out of the pool when it is
/// dropped, so it is never handed out again unchecked.
pub(crate) struct Conn {
    inner: Option<Object<Manager>>,
    broken: bool,
}

impl Conn {
    pub(crate) fn new(inner: Object<Manager>) -> Conn {
        Conn { inner: Some(inner), broken: false }
    }

    fn connection(&mut self) -> &mut MultiplexedConnection {
        // Present until drop.
        self.inner.as_deref_mut().unwrap_or_else(|| unreachable!("a connection after drop"))
    }

    fn note<T>(&mut self, result: &Result<T, RedisError>) {
        if let Err(err) = result
            && (err.is_io_error()
                || err.is_timeout()
                || err.is_connection_dropped()
                || err.is_connection_refusal()
                || err.is_unrecoverable_error())
        {
            self.broken = true;
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.broken
            && let Some(object) = self.inner.take()
        {
            drop(Object::take(object));
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.connection().req_packed_command(cmd).await;
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
            let result = self.connection().req_packed_commands(pipeline, offset, count).await;
            self.note(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.as_ref().map_or(0, |object| object.get_db())
    }
}
