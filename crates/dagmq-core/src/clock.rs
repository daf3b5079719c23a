//! Where the scheduler and workers get `now` from, and how they sleep until a wall-clock time.
//! Production reads the system clock; tests use [`TokioClock`], which follows tokio's (pausable)
//! clock so that schedules, retries and timeouts run under `tokio::time::pause`.
//!
//! This module is the one place in dagmq-core that reads time; nothing else in the crate calls
//! it. Core logic takes `now` as a parameter, and the scheduler and worker get a `Clock`.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

/// A source of wall-clock time.
#[async_trait]
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;

    /// Completes at or after `at`.
    async fn sleep_until(&self, at: DateTime<Utc>);
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    async fn sleep_until(&self, at: DateTime<Utc>) {
        // Sleep in slices of at most a minute so a wall-clock jump is noticed.
        loop {
            let left = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(Duration::from_secs(60))).await;
        }
    }
}

/// Wall-clock time derived from tokio's clock: a fixed origin plus tokio's elapsed time.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    /// Wall-clock time at `origin_instant`.
    origin: DateTime<Utc>,
    /// tokio instant the clock was created at.
    origin_instant: tokio::time::Instant,
}

impl TokioClock {
    /// A clock that reads `origin` now and advances with tokio's clock.
    pub fn starting_at(origin: DateTime<Utc>) -> TokioClock {
        TokioClock { origin, origin_instant: tokio::time::Instant::now() }
    }
}

#[async_trait]
impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now() - self.origin_instant;
        self.origin + chrono::Duration::from_std(elapsed).unwrap_or_default()
    }

    async fn sleep_until(&self, at: DateTime<Utc>) {
        let left = (at - self.now()).to_std().unwrap_or(Duration::ZERO);
        tokio::time::sleep(left).await;
    }
}
