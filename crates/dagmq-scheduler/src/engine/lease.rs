//! The scheduler lease: the task that renews this scheduler's term of it and fires `deposed`
//! when the term ends, and the guard that ends a term's consumers.

use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "failpoints")]
use dagmq_core::BackendError;
use dagmq_core::fail_point;
use dagmq_core::store::LeaseTerm;
use dagmq_core::{CancelSignal, Clock, Store};

/// Renews `lease` every third of its time until the term ends; fires `deposed` when the store
/// answers that the term is no longer in force (it expired, or another term was granted), or
/// when no renewal has succeeded for two thirds of its time (it may have lapsed by then; the
/// fence refuses any write after it did). A renewal only ever extends the term in force: a
/// scheduler that was frozen past its lease finds its term ended and steps down, and takes the
/// lease again only as a new term, with recovery.
pub(super) async fn renew_lease(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    lease: LeaseTerm,
    ttl: Duration,
    deposed: Arc<dagmq_core::task::CancelHandle>,
    term: CancelSignal,
) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = term.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let attempt = tokio::time::Instant::now();
        // The lease's own clock is Redis's; `now` matters only to stores without one.
        let renewed = tokio::time::timeout(ttl / 3, async {
            fail_point!("scheduler::lease::renew", BackendError::new("injected: lease renewal failed"));
            store.renew_lease(&lease, clock.now(), ttl).await
        })
        .await;
        match renewed {
            Ok(Ok(true)) => last_ok = attempt,
            Ok(Ok(false)) => {
                tracing::warn!(holder = %lease.holder, term = lease.term, "the lease term has ended (expired, or another scheduler's term began): stepping down");
                deposed.cancel();
                return;
            }
            Ok(Err(err)) => tracing::error!("renewing the scheduler lease: {err}"),
            Err(_) => tracing::error!("renewing the scheduler lease: no answer within {:?}", ttl / 3),
        }
        if last_ok.elapsed() >= ttl * 2 / 3 {
            tracing::warn!(holder = %lease.holder, term = lease.term, "the lease was not renewed for {:?}: stepping down", last_ok.elapsed());
            deposed.cancel();
            return;
        }
    }
}

/// Fires a cancel handle when dropped: ends a leadership term's consumers on every exit path.
pub(super) struct StopOnDrop(pub(super) dagmq_core::task::CancelHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
