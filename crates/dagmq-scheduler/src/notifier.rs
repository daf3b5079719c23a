//! Notifications on a task's final failure and, when asked for, on each retry.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// The task failed with no tries left.
    Failure,
    /// The task failed and will be retried.
    Retry,
}

/// One notification, as sent to the log and as the body of a webhook POST.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notification {
    /// Failure or retry.
    pub kind: NotificationKind,
    /// The DAG.
    pub dag_id: String,
    /// The run.
    pub run_id: String,
    /// The task.
    pub task_id: String,
    /// The try that failed.
    pub try_number: u32,
    /// Why it failed.
    pub error: Option<String>,
    /// When the scheduler learnt of it.
    pub at: DateTime<Utc>,
}

/// Receives notifications. Called off the scheduler's event loop, so it may be slow (and retry).
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// Sends one notification. An error says why it was not delivered, after any retries the
    /// notifier makes; the scheduler logs it and counts it in `dagmq_notifications_total`.
    async fn notify(&self, notification: &Notification) -> Result<(), String>;
}

/// Writes notifications to the log at ERROR (failure) or WARN (retry) level.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogNotifier;

#[async_trait]
impl Notifier for LogNotifier {
    async fn notify(&self, n: &Notification) -> Result<(), String> {
        let error = n.error.as_deref().unwrap_or("");
        match n.kind {
            NotificationKind::Failure => tracing::error!(
                dag = %n.dag_id, run = %n.run_id, task = %n.task_id, try_number = n.try_number,
                "task failed with no tries left: {error}"
            ),
            NotificationKind::Retry => tracing::warn!(
                dag = %n.dag_id, run = %n.run_id, task = %n.task_id, try_number = n.try_number,
                "task failed and will be retried: {error}"
            ),
        }
        Ok(())
    }
}

/// Sends each notification to several notifiers, all of them even when one fails.
pub struct FanoutNotifier(pub Vec<Box<dyn Notifier>>);

#[async_trait]
impl Notifier for FanoutNotifier {
    async fn notify(&self, notification: &Notification) -> Result<(), String> {
        let mut errors = Vec::new();
        for notifier in &self.0 {
            if let Err(err) = notifier.notify(notification).await {
                errors.push(err);
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }
}
