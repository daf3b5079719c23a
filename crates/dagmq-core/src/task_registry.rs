//! Rust tasks known by name, so DAG files (`run = "NAME"`) and follow-up tasks can refer to them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::task::Task;

/// Builds a task from its `args`; refuses bad args with a reason.
pub type TaskFactory = Arc<dyn Fn(&serde_json::Value) -> Result<Arc<dyn Task>, String> + Send + Sync>;

/// Named Rust tasks.
#[derive(Clone, Default)]
pub struct TaskRegistry {
    /// Factories by name.
    factories: BTreeMap<String, TaskFactory>,
}

impl TaskRegistry {
    /// An empty registry.
    pub fn new() -> TaskRegistry {
        TaskRegistry::default()
    }

    /// Registers `name`; a later registration of the same name replaces the earlier one.
    pub fn register<F>(&mut self, name: impl Into<String>, factory: F) -> &mut TaskRegistry
    where
        F: Fn(&serde_json::Value) -> Result<Arc<dyn Task>, String> + Send + Sync + 'static,
    {
        self.factories.insert(name.into(), Arc::new(factory));
        self
    }

    /// Builds task `name` with `args`.
    pub fn build(&self, name: &str, args: &serde_json::Value) -> Result<Arc<dyn Task>, String> {
        match self.factories.get(name) {
            Some(factory) => factory(args),
            None => Err(format!(
                "unknown task {name:?} (registered: {})",
                self.factories.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }
}

impl fmt::Debug for TaskRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.factories.keys()).finish()
    }
}
