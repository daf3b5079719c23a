//! The Rust tasks every dagmq binary ships: `noop` and `sleep`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dagmq_core::{Task, TaskContext, TaskError, TaskOutcome, TaskRegistry};

/// Does nothing: joins in a graph, and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct Noop;

#[async_trait]
impl Task for Noop {
    async fn run(&self, _ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        Ok(TaskOutcome::done())
    }
}

/// Sleeps `ms` milliseconds (`args = { ms = 500 }`), stopping early when cancelled.
#[derive(Debug, Clone, Copy)]
pub struct Sleep {
    /// How long.
    pub duration: Duration,
}

#[async_trait]
impl Task for Sleep {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutcome, TaskError> {
        ctx.log(format!("sleeping {} ms", self.duration.as_millis()));
        tokio::select! {
            _ = tokio::time::sleep(self.duration) => Ok(TaskOutcome::done()),
            _ = ctx.cancel_signal().cancelled() => Err(TaskError::fatal("cancelled while sleeping")),
        }
    }
}

/// A registry with `noop` and `sleep`.
pub fn builtin_tasks() -> TaskRegistry {
    let mut registry = TaskRegistry::new();
    registry.register("noop", |_| Ok(Arc::new(Noop) as Arc<dyn Task>));
    registry.register("sleep", |args| {
        let ms = match args.get("ms") {
            Some(value) => {
                value.as_u64().ok_or_else(|| format!("args.ms must be a whole number of milliseconds, not {value}"))?
            }
            None => return Err("needs args = { ms = MILLISECONDS }".to_string()),
        };
        Ok(Arc::new(Sleep { duration: Duration::from_millis(ms) }) as Arc<dyn Task>)
    });
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_needs_ms() {
        let registry = builtin_tasks();
        assert!(registry.build("sleep", &serde_json::json!({"ms": 5})).is_ok());
        assert_eq!(
            registry.build("sleep", &serde_json::Value::Null).err().unwrap(),
            "needs args = { ms = MILLISECONDS }"
        );
        assert!(registry.build("sleep", &serde_json::json!({"ms": "x"})).err().unwrap().contains("whole number"));
        assert!(registry.build("noop", &serde_json::Value::Null).is_ok());
    }
}
